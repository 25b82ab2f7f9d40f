// Owns: the `rotary` op (flash_attn.layers.rotary.apply_rotary_emb): argument checks, the params of
// common/rotary.h, then the backend of x's device. Out of place: returns a new tensor shaped like
// x; `conjugate` rotates by -theta, which is also the op's backward (registered in _ops_meta.py).
#include "ops_common.h"
#include "torch_binding.h"

FLASH_NAMESPACE_BEGIN

using namespace binding;

namespace {

// Both backends serve all four floating dtypes (the op is elementwise).
DType rotary_dtype(const Tensor& x) {
  FLASH_CHECK(x.is_cpu() || x.is_cuda(), "x is on ", device_str(x),
              "; only CPU and CUDA tensors are supported");
  switch (x.scalar_type()) {
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    default:
      fail("x has dtype ", dtype_name(x.scalar_type()),
           "; rotary supports torch.float16, torch.bfloat16, torch.float32 and torch.float64");
  }
}

void check_table(const Tensor& t, const char* name, const Tensor& x) {
  check_device(t, name, x);
  FLASH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ",
              dtype_name(t.scalar_type()), " but x has dtype ", dtype_name(x.scalar_type()),
              "; cos/sin must have x's dtype");
  check_rank(t, name, 2, "(seqlen_ro, rotary_dim / 2)");
}

}  // namespace

Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin,
              const OptTensor& seqlen_offsets, const OptTensor& cu_seqlens,
              int64_t seqlen_offset, int64_t max_seqlen, bool interleaved, bool conjugate) {
  const bool varlen = cu_seqlens.has_value();
  check_rank(x, "x", varlen ? 3 : 4,
             varlen ? "(total, nheads, head_dim) since cu_seqlens is given"
                    : "(batch, seqlen, nheads, head_dim)");
  const DType dtype = rotary_dtype(x);
  check_last_dim_contiguous(x, "x");
  check_table(cos, "cos", x);
  check_table(sin, "sin", x);
  check_shape(sin, "sin", {cos.size(0), cos.size(1)}, "matching cos");
  const int64_t head_dim = x.size(-1), nheads = x.size(-2);
  const int64_t rotary_dim = 2 * cos.size(1);
  FLASH_CHECK(rotary_dim <= head_dim, "cos/sin have ", cos.size(1),
              " columns, so rotary_dim = ", rotary_dim, " exceeds the head dimension ", head_dim,
              " of x");
  const Tensor cos_c = torch::stable::contiguous(cos);
  const Tensor sin_c = torch::stable::contiguous(sin);

  int64_t batch, seqlen;
  std::optional<Tensor> cu;
  if (varlen) {
    batch = cu_seqlens->size(0) - 1;
    FLASH_CHECK(batch >= 0, "cu_seqlens must have batch + 1 entries, got ", shape_str(*cu_seqlens));
    cu = check_index_vector(*cu_seqlens, "cu_seqlens", batch + 1, x, "(batch + 1)");
    FLASH_CHECK(max_seqlen >= 0, "max_seqlen must be given with cu_seqlens, got ", max_seqlen);
    if (x.is_cpu()) {
      const std::vector<int> lens = seqlens_from_cu(*cu, "cu_seqlens", x.size(0), "x");
      check_max_seqlen(max_seqlen, "max_seqlen", lens);
    }
    seqlen = max_seqlen;
  } else {
    batch = x.size(0);
    seqlen = x.size(1);
  }
  std::optional<Tensor> offsets;
  if (seqlen_offsets) {
    offsets = check_index_vector(*seqlen_offsets, "seqlen_offsets", batch, x, "(batch)");
  }
  FLASH_CHECK(cos.size(0) >= seqlen, "cos/sin have ", cos.size(0),
              " rows but the sequences are up to ", seqlen,
              " tokens long; the tables need a row per position (seqlen_ro >= seqlen)");

  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  Tensor out = torch::stable::new_empty(x, sizes, x.scalar_type());

  RotaryParams p;
  p.dtype = dtype;
  p.batch = to_int(batch, "batch");
  p.seqlen = to_int(seqlen, "seqlen");
  p.nheads = to_int(nheads, "nheads");
  p.head_dim = to_int(head_dim, "head_dim");
  p.rotary_dim = to_int(rotary_dim, "rotary_dim");
  p.x_ptr = x.const_data_ptr();
  p.x_batch_stride = varlen ? 0 : x.stride(0);
  p.x_row_stride = x.stride(varlen ? 0 : 1);
  p.x_head_stride = x.stride(-2);
  p.out_ptr = out.mutable_data_ptr();
  p.cos_ptr = cos_c.const_data_ptr();
  p.sin_ptr = sin_c.const_data_ptr();
  p.seqlen_ro = to_int(cos.size(0), "seqlen_ro");
  p.cu_seqlens = cu ? cu->const_data_ptr<int32_t>() : nullptr;
  p.seqlen_offsets = offsets ? offsets->const_data_ptr<int32_t>() : nullptr;
  p.seqlen_offset = seqlen_offset;
  p.interleaved = interleaved;
  p.conjugate = conjugate;

  if (out.numel() == 0) return out;
  if (x.is_cpu()) {
    run_rotary_cpu(p);
  } else {
    FLASH_RUN_CUDA(run_rotary_cuda, p, x);
  }
  return out;
}

FLASH_NAMESPACE_END
