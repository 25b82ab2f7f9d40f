// Owns: run_rotary_cpu, the CPU backend of the `rotary` op (common/rotary.h: RotaryParams and the
// pair rotation). One task per token row; every task writes its own output row, so the result
// does not depend on the thread count.
#include "dtype_cpu.h"
#include "flash_api_cpu.h"
#include "layout_cpu.h"
#include "parallel_cpu.h"
#include "rotary_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

template <typename T>
void rotary_typed(const RotaryParams& p) {
  const T* x = static_cast<const T*>(p.x_ptr);
  T* out = static_cast<T*>(p.out_ptr);
  const T* cos = static_cast<const T*>(p.cos_ptr);
  const T* sin = static_cast<const T*>(p.sin_ptr);
  const int64_t table_ld = p.rotary_dim / 2;
  const int64_t ntasks = static_cast<int64_t>(p.batch) * p.seqlen;
  parallel_tasks(ntasks, ntasks * p.nheads * p.head_dim, [&](int64_t t) {
    const int b = static_cast<int>(t / p.seqlen);
    const int i = static_cast<int>(t % p.seqlen);
    int64_t row;  // the token's row in the (batch * seqlen) or (total) layout
    if (p.cu_seqlens != nullptr) {
      if (i >= p.cu_seqlens[b + 1] - p.cu_seqlens[b]) return;  // past this sequence's end
      row = static_cast<int64_t>(p.cu_seqlens[b]) + i;
    } else {
      row = static_cast<int64_t>(b) * p.seqlen + i;
    }
    const int64_t pos = (p.seqlen_offsets != nullptr ? p.seqlen_offsets[b] : p.seqlen_offset) + i;
    const int rotary_dim = pos >= 0 && pos < p.seqlen_ro ? p.rotary_dim : 0;
    const T* src = x + (p.cu_seqlens != nullptr ? row * p.x_row_stride
                                                : b * p.x_batch_stride + i * p.x_row_stride);
    T* dst = out + row * p.nheads * p.head_dim;
    for (int h = 0; h < p.nheads; ++h) {
      rotate_row(src + h * p.x_head_stride, dst + static_cast<int64_t>(h) * p.head_dim,
                 p.head_dim, rotary_dim, p.interleaved, cos + pos * table_ld,
                 sin + pos * table_ld, p.conjugate);
    }
  });
}

}  // namespace
}  // namespace cpu

void run_rotary_cpu(const RotaryParams& p) {
  using cpu::fail;
  if (p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0)
    fail("rotary_dim", "must be even and in [0, head_dim]", p.rotary_dim);
  if (p.batch == 0 || p.seqlen == 0 || p.nheads == 0 || p.head_dim == 0) return;
  if (p.x_ptr == nullptr || p.out_ptr == nullptr) fail("x / out is null");
  cpu::dispatch_dtype(p.dtype, "x", [&](auto tag) {
    using T = decltype(tag);
    cpu::rotary_typed<T>(p);
  });
}

FLASH_NAMESPACE_END
