// Owns: what the op files share on top of checks.h: output allocation, the q/k/v and block_table
// checks common to several ops, the params filling they share (pointers/strides, sizes, block
// table, score/dropout), the host-side checks of index tensors' contents (cu_seqlens, seqused_k,
// block_table), and the hand-off to the backend of the tensors' device.
// Invariant: contents of index tensors are read only when they live on the host; for CUDA tensors
// the kernels must be robust to bad indices (no device sync here).
#pragma once
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../kernel_src/common/params.h"
#include "../kernel_src/common/philox.h"
#include "../kernel_src/common/split_kv.h"
#include "../kernel_src/cpu/flash_api_cpu.h"
#include "checks.h"

#ifdef CUDA_KERNEL
#ifndef USE_CUDA
#error "CUDA_KERNEL builds need -DUSE_CUDA (it declares aoti_torch_get_current_cuda_stream)"
#endif
#include "../kernel_src/launch/flash_api_cuda.h"
#endif

FLASH_NAMESPACE_BEGIN
// Hidden like torch::stable, whose Tensor these helpers hold.
namespace __attribute__((visibility("hidden"))) binding {

// A new contiguous tensor on t's device.
inline Tensor alloc(const Tensor& t, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(t, std::vector<int64_t>(sizes), dtype);
}

inline Tensor alloc_zeros(const Tensor& t, std::initializer_list<int64_t> sizes,
                          ScalarType dtype) {
  return torch::stable::new_zeros(t, std::vector<int64_t>(sizes), dtype);
}

constexpr double kLog2e = 1.4426950408889634;  // M_LOG2E is not in strict ISO C++

// Scores and dropout, shared by every forward and backward.
inline void set_score_params(FwdParams& p, double softmax_scale, double softcap, Window w,
                             const Dropout& d) {
  p.softmax_scale = softmax_scale;
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.softcap = softcap;
  p.window_left = w.left;
  p.window_right = w.right;
  p.is_causal = w.left < 0 && w.right == 0;
  p.p_dropout = d.p;
  p.keep_scale = d.p > 0.0 ? 1.0 / (1.0 - d.p) : 1.0;
  p.dropout_threshold = d.p > 0.0 ? dropout_threshold(static_cast<float>(d.p)) : 0u;
  p.seed = d.seed;
  p.offset = d.offset;
}

inline void set_alibi(FwdParams& p, const OptTensor& alibi, const Tensor& q, int64_t batch,
                      int64_t nheads) {
  if (!alibi) return;
  p.alibi_batch_stride = check_alibi(*alibi, q, batch, nheads);
  p.alibi_slopes = alibi->const_data_ptr<float>();
}

// No keys at all (seqlen_k 0, an empty pool or cache): every row sees none, so out = 0 and
// lse = +inf as params.h specifies. The backends are never handed empty (null) K/V.
inline void fill_no_keys(Tensor& out, Tensor& lse) {
  torch::stable::zero_(out);
  torch::stable::fill_(lse, std::numeric_limits<double>::infinity());
}

// ---- checks and params shared by the op files -------------------------------------------------

// k and v (k_cache and v_cache) must live on q's device with q's dtype. Call after the rank
// checks; returns q's backend dtype (which refuses unsupported dtypes first).
inline DType check_kv_like_q(const Tensor& q, const Tensor& k, const char* k_name, const Tensor& v,
                             const char* v_name) {
  const DType dtype = backend_dtype(q);
  check_device(k, k_name, q);
  check_device(v, v_name, q);
  check_same_dtype(k, k_name, q);
  check_same_dtype(v, v_name, q);
  return dtype;
}

// k's last dimension must be q's head dimension (checked by check_head_dim).
inline void check_k_head_dim(const Tensor& k, const char* k_name, int head_dim) {
  FLASH_CHECK(k.size(-1) == head_dim, k_name, " has head dimension ", k.size(-1), " but q has ",
              head_dim, "; they must match");
}

inline void check_qkv_last_dim_contiguous(const Tensor& q, const Tensor& k, const char* k_name,
                                          const Tensor& v, const char* v_name) {
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, k_name);
  check_last_dim_contiguous(v, v_name);
}

// q/k/v of the batched ops (fwd, bwd): (batch, seqlen, heads, head_dim) each.
struct BatchedQkv {
  DType dtype;
  int64_t batch, seqlen_q, nheads, seqlen_k, nheads_k;
  int head_dim;
};

inline BatchedQkv check_batched_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_rank(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)");
  check_rank(k, "k", 4, "(batch, seqlen_k, nheads_k, head_dim)");
  check_rank(v, "v", 4, "(batch, seqlen_k, nheads_k, head_dim)");
  BatchedQkv d;
  d.dtype = check_kv_like_q(q, k, "k", v, "v");
  d.batch = q.size(0);
  d.seqlen_q = q.size(1);
  d.nheads = q.size(2);
  d.seqlen_k = k.size(1);
  d.nheads_k = k.size(2);
  d.head_dim = check_head_dim(q);
  check_k_head_dim(k, "k", d.head_dim);
  check_shape(k, "k", {d.batch, d.seqlen_k, d.nheads_k, d.head_dim},
              "(batch, seqlen_k, nheads_k, head_dim) matching q");
  check_shape(v, "v", {d.batch, d.seqlen_k, d.nheads_k, d.head_dim},
              "(batch, seqlen_k, nheads_k, head_dim) matching k");
  check_nheads(d.nheads, d.nheads_k);
  check_qkv_last_dim_contiguous(q, k, "k", v, "v");
  return d;
}

// A paged K/V pool: block_table (batch, max_blocks_per_seq, int32) indexes the first dimension
// of k (k_cache), whose second dimension is the page size.
struct PagedKv {
  OptTensor table;  // contiguous copy of block_table
  int64_t page_size = 0, num_blocks = 0;
};

inline PagedKv check_paged_kv(const Tensor& block_table, const Tensor& k, const char* k_name,
                              int64_t batch, const Tensor& q) {
  check_device(block_table, "block_table", q);
  FLASH_CHECK(block_table.scalar_type() == ScalarType::Int,
              "block_table must have dtype torch.int32, got ",
              dtype_name(block_table.scalar_type()));
  FLASH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch,
              "block_table must have shape (batch, max_blocks_per_seq) with batch = ", batch,
              ", got ", shape_str(block_table));
  PagedKv pk;
  pk.table = torch::stable::contiguous(block_table);
  pk.num_blocks = k.size(0);
  pk.page_size = k.size(1);
  FLASH_CHECK(pk.page_size >= 1, k_name,
              " has page_block_size 0 (dimension 1); pages must hold keys");
  return pk;
}

// FwdParams and KvAppendParams both carry the block-table fields.
template <class Params>
inline void set_block_table(Params& p, const Tensor& table, int64_t page_size) {
  p.block_table = table.const_data_ptr<int32_t>();
  p.block_table_batch_stride = table.stride(0);
  p.page_block_size = to_int(page_size, "page_block_size");
}

// Row and head strides are read from the end so that 3-D (varlen) and 4-D (batched, paged)
// tensors share one path; a 3-D tensor has batch stride 0.
inline void read_strides(const Tensor& t, int64_t& batch, int64_t& row, int64_t& head) {
  batch = t.dim() == 4 ? t.stride(0) : 0;
  row = t.stride(-3);
  head = t.stride(-2);
}

// The input pointers and strides of q, k and v.
inline void set_qkv(FwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v) {
  p.q_ptr = q.const_data_ptr();
  p.k_ptr = k.const_data_ptr();
  p.v_ptr = v.const_data_ptr();
  read_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  read_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  read_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
}

// The dtype of the LSE that fwd and varlen_fwd return: fp32, except fp64 for fp64 inputs (CPU),
// which the autograd path carries to the backward so that fp64 gradients need no recomputation
// (the public functions hand out the fp32 LSE; docs/design.md).
inline ScalarType fwd_lse_dtype(const Tensor& q) {
  return q.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Points the params at an LSE tensor: fp32 (softmax_lse_ptr) or fp64 (softmax_lse_f64_ptr).
inline void set_lse(FwdParams& p, const Tensor& lse) {
  void* ptr = const_cast<void*>(lse.const_data_ptr());
  if (lse.scalar_type() == ScalarType::Double) {
    p.softmax_lse_f64_ptr = static_cast<double*>(ptr);
  } else {
    p.softmax_lse_ptr = static_cast<float*>(ptr);
  }
}

// The forward outputs: out (written) and the LSE (fwd_lse_dtype).
inline void set_fwd_outputs(FwdParams& p, Tensor& out, Tensor& lse) {
  p.o_ptr = out.mutable_data_ptr();
  read_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  set_lse(p, lse);
}

// Problem sizes; seqlen_q/k are named for the overflow error by what the caller read them from.
inline void set_sizes(FwdParams& p, int64_t batch, int64_t nheads, int64_t nheads_k, int head_dim,
                      int64_t seqlen_q, const char* seqlen_q_name, int64_t seqlen_k,
                      const char* seqlen_k_name) {
  p.batch = to_int(batch, "batch");
  p.nheads = to_int(nheads, "nheads");
  p.nheads_k = to_int(nheads_k, "nheads_k");
  p.head_dim = head_dim;
  p.seqlen_q = to_int(seqlen_q, seqlen_q_name);
  p.seqlen_k = to_int(seqlen_k, seqlen_k_name);
}

// ---- host-side checks of index tensors' contents --------------------------------------------

// cu_seqlens (batch + 1, int32, contiguous, host): starts at 0, never decreases and, when
// `total` >= 0, ends at `total`. Returns the per-sequence lengths.
inline std::vector<int> seqlens_from_cu(const Tensor& cu, const char* name, int64_t total,
                                        const char* total_name) {
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t n = cu.size(0) - 1;
  FLASH_CHECK(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  std::vector<int> lens(n);
  for (int64_t b = 0; b < n; ++b) {
    FLASH_CHECK(c[b + 1] >= c[b], name, " must be non-decreasing, but ", name, "[", b + 1,
                "] = ", c[b + 1], " < ", name, "[", b, "] = ", c[b]);
    lens[b] = c[b + 1] - c[b];
  }
  if (total >= 0) {
    FLASH_CHECK(c[n] == total, name, "[-1] = ", c[n], " must equal the number of tokens in ",
                total_name, " (", total, ")");
  }
  return lens;
}

inline int max_of(const std::vector<int>& v) {
  return v.empty() ? 0 : *std::max_element(v.begin(), v.end());
}

// A given max_seqlen (>= 0) must bound every sequence; -1 means "not given".
inline void check_max_seqlen(int64_t given, const char* name, const std::vector<int>& lens) {
  if (given < 0) return;
  for (size_t b = 0; b < lens.size(); ++b) {
    FLASH_CHECK(lens[b] <= given, name, " = ", given, " is smaller than the length ", lens[b],
                " of sequence ", b);
  }
}

// seqused_k (batch, int32, host): 0 <= seqused_k[b] <= limit[b] (limit < 0: no upper bound).
inline std::vector<int> apply_seqused(const Tensor& seqused, const std::vector<int>& limit,
                                      const char* limit_what) {
  const int32_t* s = seqused.const_data_ptr<int32_t>();
  std::vector<int> lens(limit.size());
  for (size_t b = 0; b < limit.size(); ++b) {
    FLASH_CHECK(s[b] >= 0, "seqused_k[", b, "] = ", s[b], " is negative");
    FLASH_CHECK(limit[b] < 0 || s[b] <= limit[b], "seqused_k[", b, "] = ", s[b],
                " exceeds the ", limit[b], " ", limit_what, " of sequence ", b);
    lens[b] = s[b];
  }
  return lens;
}

// block_table (batch, max_blocks, int32, host): sequence b reads its first
// ceil(len_k[b] / page_size) entries; each must name a block of the pool.
inline void check_block_table_host(const Tensor& block_table, const std::vector<int>& len_k,
                                   int64_t page_size, int64_t num_blocks) {
  const int32_t* bt = block_table.const_data_ptr<int32_t>();
  const int64_t max_blocks = block_table.size(1), stride = block_table.stride(0);
  for (size_t b = 0; b < len_k.size(); ++b) {
    const int64_t pages = (static_cast<int64_t>(len_k[b]) + page_size - 1) / page_size;
    FLASH_CHECK(pages <= max_blocks, "block_table has ", max_blocks,
                " pages per sequence, too few for the ", len_k[b], " keys of sequence ", b,
                " (page size ", page_size, " needs ", pages, ")");
    for (int64_t i = 0; i < pages; ++i) {
      const int32_t id = bt[b * stride + i];
      FLASH_CHECK(id >= 0 && id < num_blocks, "block_table[", b, ", ", i, "] = ", id,
                  " is out of range; the K/V pool has ", num_blocks, " blocks");
    }
  }
}

// The sequence-length bounds handed to the backend for a varlen call (FwdParams::seqlen_q/k).
// For host index tensors this also checks their contents: cu_seqlens, seqused_k, max_seqlen and
// the block_table entries each sequence reads. For device tensors nothing is read (no sync) and
// the bounds fall back to what the shapes guarantee.
struct VarlenBounds {
  int64_t seqlen_q = 0, seqlen_k = 0;
};

struct VarlenIndex {
  const Tensor* cu_seqlens_q;
  const Tensor* cu_seqlens_k;
  const std::optional<Tensor>* seqused_k;
  const std::optional<Tensor>* block_table;  // paged K/V when set
  int64_t total_q = 0;
  int64_t total_k = 0;  // rows of k when not paged
  int64_t page_size = 0, num_blocks = 0;
  int64_t max_seqlen_q = -1, max_seqlen_k = -1;
};

inline VarlenBounds varlen_bounds(const Tensor& q, const VarlenIndex& ix) {
  const bool paged = ix.block_table->has_value();
  VarlenBounds out;
  if (!q.is_cpu()) {
    out.seqlen_q = ix.max_seqlen_q >= 0 ? ix.max_seqlen_q : ix.total_q;
    out.seqlen_k = ix.max_seqlen_k >= 0
                       ? ix.max_seqlen_k
                       : (paged ? (*ix.block_table)->size(1) * ix.page_size : ix.total_k);
    return out;
  }
  const std::vector<int> lens_q = seqlens_from_cu(*ix.cu_seqlens_q, "cu_seqlens_q", ix.total_q, "q");
  std::vector<int> lens_k =
      seqlens_from_cu(*ix.cu_seqlens_k, "cu_seqlens_k", paged ? -1 : ix.total_k, "k");
  if (ix.seqused_k->has_value()) {
    // Paged: cu_seqlens_k carries no offsets, so seqused_k is bounded by the pages only.
    lens_k = apply_seqused(**ix.seqused_k, paged ? std::vector<int>(lens_k.size(), -1) : lens_k,
                           "keys given by cu_seqlens_k");
  }
  check_max_seqlen(ix.max_seqlen_q, "max_seqlen_q", lens_q);
  check_max_seqlen(ix.max_seqlen_k, "max_seqlen_k", lens_k);
  if (paged) check_block_table_host(**ix.block_table, lens_k, ix.page_size, ix.num_blocks);
  out.seqlen_q = ix.max_seqlen_q >= 0 ? ix.max_seqlen_q : max_of(lens_q);
  out.seqlen_k = ix.max_seqlen_k >= 0 ? ix.max_seqlen_k : max_of(lens_k);
  return out;
}

// cu_seqlens_q/k and seqused_k: dtype, shape and device (contents: varlen_bounds).
struct VarlenTensors {
  int64_t batch = 0;
  Tensor cu_q, cu_k;
  std::optional<Tensor> used;
};

inline VarlenTensors check_varlen_tensors(const Tensor& q, const Tensor& cu_seqlens_q,
                                          const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
                                          int64_t max_seqlen_q, int64_t max_seqlen_k) {
  VarlenTensors t;
  FLASH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1,
              "cu_seqlens_q must have shape (batch + 1,), got ", shape_str(cu_seqlens_q));
  t.batch = cu_seqlens_q.size(0) - 1;
  t.cu_q = check_index_vector(cu_seqlens_q, "cu_seqlens_q", t.batch + 1, q, "(batch + 1,)");
  t.cu_k = check_index_vector(cu_seqlens_k, "cu_seqlens_k", t.batch + 1, q,
                              "(batch + 1,), the length of cu_seqlens_q");
  if (seqused_k) t.used = check_index_vector(*seqused_k, "seqused_k", t.batch, q, "(batch,)");
  FLASH_CHECK(max_seqlen_q >= -1, "max_seqlen_q must be >= 0 (or -1: not given), got ",
              max_seqlen_q);
  FLASH_CHECK(max_seqlen_k >= -1, "max_seqlen_k must be >= 0 (or -1: not given), got ",
              max_seqlen_k);
  return t;
}

// varlen_bounds for the checked index tensors of a varlen op (table: paged K/V when set).
inline VarlenBounds varlen_bounds_of(const Tensor& q, const VarlenTensors& ix,
                                     const std::optional<Tensor>& table, int64_t total_q,
                                     int64_t total_k, int64_t page_size, int64_t num_blocks,
                                     int64_t max_seqlen_q, int64_t max_seqlen_k) {
  VarlenIndex index;
  index.cu_seqlens_q = &ix.cu_q;
  index.cu_seqlens_k = &ix.cu_k;
  index.seqused_k = &ix.used;
  index.block_table = &table;
  index.total_q = total_q;
  index.total_k = total_k;
  index.page_size = page_size;
  index.num_blocks = num_blocks;
  index.max_seqlen_q = max_seqlen_q;
  index.max_seqlen_k = max_seqlen_k;
  return varlen_bounds(q, index);
}

// The index pointers of a varlen op.
inline void set_varlen_index(FwdParams& p, const VarlenTensors& ix, int64_t total_q) {
  p.total_q = to_int(total_q, "total_q");
  p.cu_seqlens_q = ix.cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = ix.cu_k.const_data_ptr<int32_t>();
  p.seqused_k = ix.used ? ix.used->const_data_ptr<int32_t>() : nullptr;
}

// ---- backend hand-off ----------------------------------------------------------------------

#ifdef CUDA_KERNEL
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  // Checked by hand: STABLE_TORCH_ERROR_CODE_CHECK is newer than the torch 2.10/2.11 headers.
  FLASH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
              "could not get the current CUDA stream of device ", t.get_device_index());
  return static_cast<cudaStream_t>(stream);
}
#endif

#ifdef CUDA_KERNEL
// Runs a CUDA entry point (flash_api_cuda.h) with q's device current, on its current stream.
template <typename Params>
void run_cuda(void (*entry)(const Params&, cudaStream_t), const Params& p, const Tensor& q) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  entry(p, current_stream(q));
}
#define FLASH_RUN_CUDA(entry, p, q) run_cuda(entry, p, q)
#else
#define FLASH_RUN_CUDA(entry, p, q) \
  fail("q is on ", device_str(q), " but this build of flash_attn has no CUDA backend")
#endif

#ifdef CUDA_KERNEL
// A CUDA forward entry point with its split-KV workspace (common/split_kv.h): the partial
// buffers, allocated through the caching allocator on q's stream when the backend splits, alive
// until the call returns. No host synchronisation, so the call can be captured in a CUDA graph.
inline void run_fwd_split(void (*entry)(const FwdParams&, cudaStream_t), FwdParams p,
                          const Tensor& q) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const int splits = fwd_cuda_num_splits(p);
  p.num_splits = splits;
  Tensor o_accum, lse_accum;
  if (splits > 1) {
    const PartialLayout layout(p);
    o_accum = alloc(q, {splits, layout.rows, p.nheads, layout.width}, ScalarType::Float);
    lse_accum = alloc(q, {splits, layout.lse_numel}, ScalarType::Float);
    p.o_accum_ptr = o_accum.mutable_data_ptr<float>();
    p.lse_accum_ptr = lse_accum.mutable_data_ptr<float>();
  }
  entry(p, current_stream(q));
}
#define FLASH_RUN_CUDA_FWD(entry, p, q) run_fwd_split(entry, p, q)
#else
#define FLASH_RUN_CUDA_FWD(entry, p, q) FLASH_RUN_CUDA(entry, p, q)
#endif

// The hand-offs to the backend of q's device (the ops checked that all tensors share it).
inline void run_fwd(const FwdParams& p, const Tensor& q) {
  if (q.is_cpu()) return run_fwd_cpu(p);
  FLASH_RUN_CUDA_FWD(run_fwd_cuda, p, q);
}

// The attention step of fwd_kvcache. The CPU forward serves the cache layouts (paging,
// cache_batch_idx, leftpad, seqused_k) itself; CUDA has an entry point of its own for decode.
inline void run_fwd_kvcache(const FwdParams& p, const Tensor& q) {
  if (q.is_cpu()) return run_fwd_cpu(p);
  FLASH_RUN_CUDA_FWD(run_fwd_kvcache_cuda, p, q);
}

// The backward (p.dsoftmax_sum_ptr, D, is the op's output softmax_d, set by the caller); on CUDA
// also its workspace (BwdParams), alive until the call returns (the caching allocator orders its
// reuse on the stream): the fp32 dQ accumulator and the deterministic mode's counters.
inline void run_bwd(BwdParams& p, const Tensor& q) {
  if (q.is_cpu()) return run_bwd_cpu(p);
#ifdef CUDA_KERNEL
  Tensor dq_accum = alloc_zeros(q, {std::max<int64_t>(1, bwd_cuda_dq_accum_elems(p))},
                                ScalarType::Float);
  p.dq_accum_ptr = dq_accum.mutable_data_ptr<float>();
  Tensor semaphores;
  if (p.deterministic) {
    semaphores = alloc_zeros(q, {std::max<int64_t>(1, bwd_cuda_semaphore_count(p))},
                             ScalarType::Int);
    p.dq_semaphore = semaphores.mutable_data_ptr<int32_t>();
  }
#endif
  FLASH_RUN_CUDA(run_bwd_cuda, p, q);
}

// Ops that the CUDA backend does not have yet fail before touching any data.
}  // namespace binding
FLASH_NAMESPACE_END
