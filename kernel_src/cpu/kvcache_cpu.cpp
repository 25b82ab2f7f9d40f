// Owns: run_kv_append_cpu (the in-place cache update of flash_attn_with_kvcache, optionally
// rotating the new keys) and run_rotary_q_cpu (the rotated copy of the queries). Conventions:
// params.h (KvAppendParams, RotaryQParams) and docs/design.md (KV cache).
//
// Rotary: rotate_row (rotary_cpu.h, the pair rotation of common/rotary.h) with cos/sin from table
// row = the token's position; the dims past rotary_dim are copied.
// Every task writes distinct rows, so the result does not depend on the thread count.
#include "dtype_cpu.h"
#include "flash_api_cpu.h"
#include "layout_cpu.h"
#include "parallel_cpu.h"
#include "rotary_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

void check_rotary(int rotary_dim, int head_dim, const void* cos, const void* sin) {
  if (rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2 != 0)
    fail("rotary_dim", "must be even and in [0, head_dim]", rotary_dim);
  if (rotary_dim > 0 && (cos == nullptr || sin == nullptr))
    fail("rotary_cos/rotary_sin must both be given when rotary_dim > 0");
}

void check_head_dim(int head_dim) {
  if (head_dim < 1 || head_dim > 256)
    fail("head_dim", "must be in [1, 256] for the CPU backend", head_dim);
}

template <typename T>
void kv_append_typed(const KvAppendParams& p) {
  const int64_t ntasks = static_cast<int64_t>(p.batch) * p.seqlen_new;
  const T* cos = static_cast<const T*>(p.rotary_cos_ptr);
  const T* sin = static_cast<const T*>(p.rotary_sin_ptr);
  const int64_t table_ld = p.rotary_dim / 2;
  const int64_t work = ntasks * p.nheads_k * p.head_dim;
  parallel_tasks(ntasks, work, [&](int64_t t) {
    const int b = static_cast<int>(t / p.seqlen_new);
    const int i = static_cast<int>(t % p.seqlen_new);
    const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + i;  // cache position
    int64_t k_row, v_row;
    if (p.block_table != nullptr) {
      const int64_t page =
          p.block_table[static_cast<int64_t>(b) * p.block_table_batch_stride +
                        pos / p.page_block_size];
      const int64_t r = pos % p.page_block_size;
      k_row = page * p.k_batch_stride + r * p.k_row_stride;
      v_row = page * p.v_batch_stride + r * p.v_row_stride;
    } else {
      const int64_t kb = p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b;
      k_row = kb * p.k_batch_stride + pos * p.k_row_stride;
      v_row = kb * p.v_batch_stride + pos * p.v_row_stride;
    }
    const T* knew = static_cast<const T*>(p.k_new_ptr) +
                    static_cast<int64_t>(b) * p.knew_batch_stride + i * p.knew_row_stride;
    const T* vnew = static_cast<const T*>(p.v_new_ptr) +
                    static_cast<int64_t>(b) * p.vnew_batch_stride + i * p.vnew_row_stride;
    T* kc = static_cast<T*>(p.k_cache_ptr) + k_row;
    T* vc = static_cast<T*>(p.v_cache_ptr) + v_row;
    for (int h = 0; h < p.nheads_k; ++h) {
      const T* ksrc = knew + h * p.knew_head_stride;
      T* kdst = kc + h * p.k_head_stride;
      if (p.rotary_dim > 0)
        rotate_row(ksrc, kdst, p.head_dim, p.rotary_dim, p.rotary_interleaved,
                   cos + pos * table_ld, sin + pos * table_ld);
      else
        for (int col = 0; col < p.head_dim; ++col) kdst[col] = ksrc[col];
      const T* vsrc = vnew + h * p.vnew_head_stride;
      T* vdst = vc + h * p.v_head_stride;
      for (int col = 0; col < p.head_dim; ++col) vdst[col] = vsrc[col];
    }
  });
}

template <typename T>
void rotary_q_typed(const RotaryQParams& p) {
  const int64_t ntasks = static_cast<int64_t>(p.batch) * p.seqlen_q;
  const T* cos = static_cast<const T*>(p.rotary_cos_ptr);
  const T* sin = static_cast<const T*>(p.rotary_sin_ptr);
  const int64_t table_ld = p.rotary_dim / 2;
  const int64_t work = ntasks * p.nheads * p.head_dim;
  parallel_tasks(ntasks, work, [&](int64_t t) {
    const int b = static_cast<int>(t / p.seqlen_q);
    const int i = static_cast<int>(t % p.seqlen_q);
    const int64_t base = p.cache_seqlens != nullptr ? p.cache_seqlens[b] : 0;
    const int64_t pos = base + (p.positions_per_row ? i : 0);
    const T* src = static_cast<const T*>(p.q_ptr) + static_cast<int64_t>(b) * p.q_batch_stride +
                   i * p.q_row_stride;
    T* dst = static_cast<T*>(p.q_out_ptr) + (static_cast<int64_t>(b) * p.seqlen_q + i) *
                                                p.nheads * p.head_dim;
    for (int h = 0; h < p.nheads; ++h) {
      const T* s = src + h * p.q_head_stride;
      T* o = dst + static_cast<int64_t>(h) * p.head_dim;
      if (p.rotary_dim > 0)
        rotate_row(s, o, p.head_dim, p.rotary_dim, p.rotary_interleaved,
                   cos + pos * table_ld, sin + pos * table_ld);
      else
        for (int col = 0; col < p.head_dim; ++col) o[col] = s[col];
    }
  });
}

}  // namespace
}  // namespace cpu

void run_kv_append_cpu(const KvAppendParams& p) {
  using cpu::fail;
  if (p.batch < 0) fail("batch", "must be >= 0", p.batch);
  if (p.seqlen_new < 0) fail("seqlen_new", "must be >= 0", p.seqlen_new);
  if (p.nheads_k < 1) fail("nheads_k", "must be >= 1", p.nheads_k);
  cpu::check_head_dim(p.head_dim);
  cpu::check_rotary(p.rotary_dim, p.head_dim, p.rotary_cos_ptr, p.rotary_sin_ptr);
  if (p.batch == 0 || p.seqlen_new == 0) return;
  if (p.k_new_ptr == nullptr || p.v_new_ptr == nullptr) fail("k and v (new tokens) must be given");
  if (p.k_cache_ptr == nullptr || p.v_cache_ptr == nullptr) fail("k_cache/v_cache is null");
  if (p.cache_seqlens == nullptr)
    fail("cache_seqlens is required to append k/v (it is the write position)");
  if (p.block_table != nullptr && p.page_block_size < 1)
    fail("page_block_size", "must be >= 1 with block_table", p.page_block_size);
  if (p.block_table != nullptr && p.cache_batch_idx != nullptr)
    fail("cache_batch_idx is not supported together with block_table");
  for (int b = 0; b < p.batch; ++b) {
    if (p.cache_seqlens[b] < 0)
      fail("cache_seqlens", "holds a negative length", p.cache_seqlens[b]);
    if (p.cache_batch_idx != nullptr && p.cache_batch_idx[b] < 0)
      fail("cache_batch_idx", "holds a negative index", p.cache_batch_idx[b]);
    if (p.block_table != nullptr) {
      const int64_t first = p.cache_seqlens[b] / p.page_block_size;
      const int64_t last = (static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlen_new - 1) /
                           p.page_block_size;
      for (int64_t i = first; i <= last; ++i) {
        const int32_t page =
            p.block_table[static_cast<int64_t>(b) * p.block_table_batch_stride + i];
        if (page < 0) fail("block_table", "holds a negative page id", page);
      }
    }
  }
  cpu::dispatch_dtype(p.dtype, "k_cache", [&](auto tag) {
    using T = decltype(tag);
    cpu::kv_append_typed<T>(p);
  });
}

void run_rotary_q_cpu(const RotaryQParams& p) {
  using cpu::fail;
  if (p.batch < 0) fail("batch", "must be >= 0", p.batch);
  if (p.seqlen_q < 0) fail("seqlen_q", "must be >= 0", p.seqlen_q);
  if (p.nheads < 1) fail("nheads", "must be >= 1", p.nheads);
  cpu::check_head_dim(p.head_dim);
  cpu::check_rotary(p.rotary_dim, p.head_dim, p.rotary_cos_ptr, p.rotary_sin_ptr);
  if (p.batch == 0 || p.seqlen_q == 0) return;
  if (p.q_ptr == nullptr || p.q_out_ptr == nullptr) fail("q / q_out is null");
  if (p.cache_seqlens != nullptr)
    for (int b = 0; b < p.batch; ++b)
      if (p.cache_seqlens[b] < 0)
        fail("cache_seqlens", "holds a negative length", p.cache_seqlens[b]);
  cpu::dispatch_dtype(p.dtype, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::rotary_q_typed<T>(p);
  });
}

FLASH_NAMESPACE_END
