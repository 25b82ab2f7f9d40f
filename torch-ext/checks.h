// Owns: the argument checks of the torch binding. Every failed check throws std::runtime_error
// whose message starts with "flash_attn: " and names the argument at fault; torch surfaces it as
// a Python RuntimeError. Nothing here touches a device: data-dependent checks (index tensors'
// contents) run only on host tensors, so a CUDA call never synchronizes the device.
#pragma once
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "../kernel_src/common/params.h"

FLASH_NAMESPACE_BEGIN
// Hidden like torch::stable, whose Tensor these helpers hold.
namespace __attribute__((visibility("hidden"))) binding {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;
using OptTensor = std::optional<Tensor>;

template <class... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream os;
  os << "flash_attn: ";
  (os << ... << args);
  throw std::runtime_error(os.str());
}

#define FLASH_CHECK(cond, ...)                        \
  do {                                                \
    if (!(cond)) ::FLASH_NAMESPACE::binding::fail(__VA_ARGS__); \
  } while (0)

// Python spellings, so that the message reads like the caller's code.
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Bool: return "torch.bool";
    default: return torch::headeronly::toString(t);
  }
}

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "(";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << (t.dim() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string device_str(const Tensor& t) {
  return t.is_cpu() ? std::string("cpu")
                    : (t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index())
                                   : std::string("an unsupported device"));
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cpu() == b.is_cpu() && a.is_cuda() == b.is_cuda() &&
         (!a.is_cuda() || a.get_device_index() == b.get_device_index());
}

// Sizes, ranks and counts must fit the int fields of the params structs.
inline int to_int(int64_t v, const char* what) {
  FLASH_CHECK(v <= std::numeric_limits<int32_t>::max(), what, " = ", v,
              " is too large (must fit in int32)");
  return static_cast<int>(v);
}

inline void check_rank(const Tensor& t, const char* name, int64_t rank, const char* layout) {
  FLASH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions ", layout, ", got shape ",
              shape_str(t));
}

inline void check_device(const Tensor& t, const char* name, const Tensor& q) {
  FLASH_CHECK(same_device(t, q), name, " is on ", device_str(t), " but q is on ", device_str(q),
              "; all tensors must be on the same device");
}

inline void check_same_dtype(const Tensor& t, const char* name, const Tensor& q) {
  FLASH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ",
              dtype_name(t.scalar_type()), " but q has ", dtype_name(q.scalar_type()),
              "; they must match");
}

inline void check_last_dim_contiguous(const Tensor& t, const char* name) {
  // Strides of an empty tensor are meaningless (autograd hands out expanded stride-0 ones).
  FLASH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must be contiguous in its last dimension (stride(-1) == 1), got stride ",
              t.stride(-1));
}

inline void check_shape(const Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                        const char* layout) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int64_t i = 0;
  for (int64_t s : shape) ok = ok && t.size(i++) == s;
  if (!ok) {
    std::ostringstream want;
    want << "(";
    i = 0;
    for (int64_t s : shape) want << (i++ ? ", " : "") << s;
    want << (shape.size() == 1 ? ",)" : ")");
    fail(name, " must have shape ", want.str(), " ", layout, ", got ", shape_str(t));
  }
}

// The dtypes each backend serves: the CPU backend all four (fp64 for gradcheck), CUDA fp16/bf16.
inline DType backend_dtype(const Tensor& q) {
  FLASH_CHECK(q.is_cpu() || q.is_cuda(), "q is on ", device_str(q),
              "; only CPU and CUDA tensors are supported");
  const ScalarType t = q.scalar_type();
  if (t == ScalarType::Half) return DType::kFloat16;
  if (t == ScalarType::BFloat16) return DType::kBFloat16;
  if (q.is_cpu()) {
    if (t == ScalarType::Float) return DType::kFloat32;
    if (t == ScalarType::Double) return DType::kFloat64;
    fail("q has dtype ", dtype_name(t),
         "; the CPU backend supports torch.float16, torch.bfloat16, torch.float32 and "
         "torch.float64");
  }
  fail("q has dtype ", dtype_name(t),
       "; the CUDA backend supports torch.float16 and torch.bfloat16 only");
}

inline int check_head_dim(const Tensor& q, const char* name = "q") {
  const int64_t d = q.size(-1);
  FLASH_CHECK(d >= 1 && d <= 256, name, " has head dimension ", d,
              "; supported head dimensions are 1 to 256");
  return static_cast<int>(d);
}

inline void check_nheads(int64_t nheads, int64_t nheads_k) {
  FLASH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, "q has ", nheads,
              " heads, which is not a multiple of the ", nheads_k,
              " heads of k/v (nheads must be divisible by nheads_k)");
}

// Scalars.
inline void check_scalars(double dropout_p, double softmax_scale, double softcap, int64_t wl,
                          int64_t wr) {
  FLASH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  FLASH_CHECK(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);
  FLASH_CHECK(softcap >= 0.0 && std::isfinite(softcap),
              "softcap must be >= 0 and finite (0 disables it), got ", softcap);
  FLASH_CHECK(wl >= -1, "window_size_left must be >= -1 (-1 is unbounded), got ", wl);
  FLASH_CHECK(wr >= -1, "window_size_right must be >= -1 (-1 is unbounded), got ", wr);
}

// FA2 semantics: causal is a right window of 0; a window that covers seqlen_k is unbounded.
struct Window {
  int left = -1, right = -1;
};

inline Window normalize_window(int64_t wl, int64_t wr, bool is_causal, int64_t seqlen_k) {
  Window w;
  w.left = (wl < 0 || wl >= seqlen_k) ? -1 : static_cast<int>(wl);
  w.right = (wr < 0 || wr >= seqlen_k) ? -1 : static_cast<int>(wr);
  if (is_causal) w.right = 0;
  return w;
}

// alibi_slopes: fp32, (nheads) or (batch, nheads). Returns the batch stride (0 for (nheads)).
inline int64_t check_alibi(const Tensor& a, const Tensor& q, int64_t batch, int64_t nheads) {
  check_device(a, "alibi_slopes", q);
  FLASH_CHECK(a.scalar_type() == ScalarType::Float, "alibi_slopes must have dtype torch.float32, got ",
              dtype_name(a.scalar_type()));
  const bool per_head = a.dim() == 1 && a.size(0) == nheads;
  const bool per_batch = a.dim() == 2 && a.size(0) == batch && a.size(1) == nheads;
  FLASH_CHECK(per_head || per_batch, "alibi_slopes must have shape (nheads,) = (", nheads,
              ",) or (batch, nheads) = (", batch, ", ", nheads, "), got ", shape_str(a));
  check_last_dim_contiguous(a, "alibi_slopes");
  return per_batch ? a.stride(0) : 0;
}

// rng_state: int64 CPU tensor [seed, offset], drawn by the Python layer. Only read when
// dropout_p > 0; the op returns a fresh copy (or an empty tensor when dropout is off).
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0, offset = 0;
  Tensor rng_out;
};

inline Dropout check_dropout(double dropout_p, const std::optional<Tensor>& rng_state) {
  Dropout d;
  d.p = dropout_p;
  if (dropout_p > 0.0) {
    FLASH_CHECK(rng_state.has_value(),
                "rng_state is required when dropout_p > 0 (an int64 CPU tensor [seed, offset])");
    const Tensor& r = *rng_state;
    FLASH_CHECK(r.is_cpu() && r.scalar_type() == ScalarType::Long && r.dim() == 1 &&
                    r.size(0) == 2,
                "rng_state must be an int64 CPU tensor of shape (2,) holding [seed, offset], got ",
                dtype_name(r.scalar_type()), " ", shape_str(r), " on ", device_str(r));
    d.rng_out = torch::stable::clone(r);
    const int64_t* v = d.rng_out.const_data_ptr<int64_t>();
    d.seed = static_cast<uint64_t>(v[0]);
    d.offset = static_cast<uint64_t>(v[1]);
  } else {
    d.rng_out = torch::stable::empty({0}, ScalarType::Long, std::nullopt,
                                     torch::stable::Device(torch::headeronly::DeviceType::CPU));
  }
  return d;
}

// An int32 index tensor of `len` entries on q's device, returned contiguous.
inline Tensor check_index_vector(const Tensor& t, const char* name, int64_t len, const Tensor& q,
                                 const char* what) {
  check_device(t, name, q);
  FLASH_CHECK(t.scalar_type() == ScalarType::Int, name, " must have dtype torch.int32, got ",
              dtype_name(t.scalar_type()));
  FLASH_CHECK(t.dim() == 1 && t.size(0) == len, name, " must have shape (", len, ",) ", what,
              ", got ", shape_str(t));
  return torch::stable::contiguous(t);
}

}  // namespace binding
FLASH_NAMESPACE_END
