// Owns: a C entry point to run_fwd_cuda for the benchmark and check scripts, so that the CUDA
// forward can be measured and verified on the GPU machine before (and independently of) the
// torch binding: benchmarks/flash_harness.py fills FwdParams through ctypes, using the field
// offsets reported here (so a change of params.h cannot silently shift fields).
// Built by benchmarks/build_harness.sh into build/harness/libflash_harness.so.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>

#include "../kernel_src/common/params.h"
#include "../kernel_src/launch/flash_api_cuda.h"

using FLASH_NAMESPACE::FwdParams;

#define FLASH_HARNESS_FIELDS(X)                                                               \
  X(dtype) X(q_ptr) X(k_ptr) X(v_ptr) X(q_batch_stride) X(q_row_stride) X(q_head_stride)      \
  X(k_batch_stride) X(k_row_stride) X(k_head_stride) X(v_batch_stride) X(v_row_stride)        \
  X(v_head_stride) X(o_ptr) X(o_batch_stride) X(o_row_stride) X(o_head_stride)                \
  X(softmax_lse_ptr) X(p_ptr) X(batch) X(nheads) X(nheads_k) X(head_dim) X(seqlen_q)          \
  X(seqlen_k) X(total_q) X(total_k) X(cu_seqlens_q) X(cu_seqlens_k) X(seqused_k) X(leftpad_k) \
  X(cache_batch_idx) X(block_table) X(block_table_batch_stride) X(page_block_size)            \
  X(softmax_scale) X(scale_log2) X(softcap) X(alibi_slopes) X(alibi_batch_stride)             \
  X(window_left) X(window_right) X(is_causal) X(p_dropout) X(keep_scale)                      \
  X(dropout_threshold) X(seed) X(offset) X(num_splits)

extern "C" {

// Writes "name offset size;" for every field, then "sizeof N;" into buf; returns the length.
int flash_harness_layout(char* buf, int buflen) {
  int n = 0;
  auto put = [&](const char* s) {
    while (*s && n + 1 < buflen) buf[n++] = *s++;
  };
  char tmp[128];
#define X(f)                                                                                  \
  snprintf(tmp, sizeof(tmp), "%s %zu %zu;", #f, offsetof(FwdParams, f), sizeof(FwdParams::f)); \
  put(tmp);
  FLASH_HARNESS_FIELDS(X)
#undef X
  snprintf(tmp, sizeof(tmp), "sizeof %zu;", sizeof(FwdParams));
  put(tmp);
  buf[n] = 0;
  return n;
}

#ifndef FLASH_HARNESS_LAYOUT_ONLY
// Runs the forward; returns 0, or 1 with the exception's message in err.
int flash_harness_fwd(const void* params_bytes, int64_t size, void* stream, char* err,
                      int errlen) {
  if (size != static_cast<int64_t>(sizeof(FwdParams))) {
    snprintf(err, errlen, "FwdParams size mismatch: %lld vs %zu", static_cast<long long>(size),
             sizeof(FwdParams));
    return 1;
  }
  FwdParams p;
  std::memcpy(static_cast<void*>(&p), params_bytes, sizeof(FwdParams));
  try {
    FLASH_NAMESPACE::run_fwd_cuda(p, static_cast<cudaStream_t>(stream));
  } catch (const std::exception& e) {
    snprintf(err, errlen, "%s", e.what());
    return 1;
  }
  return 0;
}
#endif

}  // extern "C"
