// Owns: the GPU check that bad device index tensors never make the sm80 forward read out of
// bounds (FwdParams::kv_num_blocks / total_k; kernel_src/sm80/seq_info_sm80.h, copy_sm80.h).
// The binding does not sync to validate block_table, cache_batch_idx or cu_seqlens_k, so the
// kernel clamps them. Run it under compute-sanitizer memcheck (any read past an allocation is
// reported there); the program itself checks the defined results of the clamping:
//   * page ids outside [0, kv_num_blocks) read page 0: same bits as a table with 0 there;
//   * cache_batch_idx outside [0, kv_num_blocks): the sequence sees no key (O = 0, lse = +inf);
//   * cu_seqlens_k past total_k: clamped to [0, total_k], the rest of the batch sees no key.
// Why a harness and not a pytest case: cache_batch_idx reaches the kernel only through
// run_fwd_cuda (flash_attn_with_kvcache does not serve CUDA tensors yet), and memcheck sees a
// read past an allocation only when allocations have their exact sizes, as cudaMalloc gives them
// here; under torch's caching allocator such a read usually lands in a neighbouring block.
// Build and run (GPU machine, from the repository root):
//   nvcc -O2 -std=c++17 --expt-relaxed-constexpr -arch=sm_90 -I. \
//     tests/cuda_harness/check_fwd_bad_index.cu kernel_src/launch/flash_api_cuda.cu \
//     kernel_src/instantiations/fwd_sm80_hdim64_bf16.cu -DFLASH_DISABLE_SM90 \
//     -DFLASH_DISABLE_FP16 -DFLASH_DISABLE_HDIM32 -DFLASH_DISABLE_HDIM96 -DFLASH_DISABLE_HDIM128 \
//     -DFLASH_DISABLE_HDIM192 -DFLASH_DISABLE_HDIM256 -o /tmp/bad_index &&
//   compute-sanitizer --tool memcheck --error-exitcode 3 /tmp/bad_index
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernel_src/launch/flash_api_cuda.h"

using namespace FLASH_NAMESPACE;

namespace {

constexpr int kD = 64, kH = 2;
int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  failures += !ok;
}

#define CUDA_OK(x)                                                                   \
  do {                                                                               \
    cudaError_t e = (x);                                                             \
    if (e != cudaSuccess) {                                                          \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, h.size() * sizeof(T)));  // exact size: memcheck sees any overrun
  CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

__nv_bfloat16* random_bf16(size_t n, unsigned seed) {
  std::vector<__nv_bfloat16> h(n);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    h[i] = __float2bfloat16(static_cast<float>(seed >> 8) / 16777216.f - 0.5f);
  }
  return upload(h);
}

struct Result {
  std::vector<__nv_bfloat16> o;
  std::vector<float> lse;
};

// Runs p with fresh O/LSE buffers of rows x kH (O) and lse_n entries; returns them.
Result run(FwdParams p, int rows, int lse_n) {
  __nv_bfloat16* o = nullptr;
  float* lse = nullptr;
  CUDA_OK(cudaMalloc(&o, size_t(rows) * kH * kD * 2));
  CUDA_OK(cudaMalloc(&lse, size_t(lse_n) * 4));
  CUDA_OK(cudaMemset(o, 0xff, size_t(rows) * kH * kD * 2));  // NaN poison
  p.o_ptr = o;
  p.softmax_lse_ptr = lse;
  run_fwd_cuda(p, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  Result r{std::vector<__nv_bfloat16>(size_t(rows) * kH * kD), std::vector<float>(lse_n)};
  CUDA_OK(cudaMemcpy(r.o.data(), o, r.o.size() * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(r.lse.data(), lse, r.lse.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(o));
  CUDA_OK(cudaFree(lse));
  return r;
}

FwdParams base(int batch, int seqlen_q, int seqlen_k) {
  FwdParams p;
  p.dtype = DType::kBFloat16;
  p.batch = batch;
  p.nheads = p.nheads_k = kH;
  p.head_dim = kD;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.total_q = batch * seqlen_q;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = kH * kD;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = kD;
  p.q_batch_stride = p.o_batch_stride = int64_t(seqlen_q) * kH * kD;
  p.softmax_scale = 0.125;
  p.scale_log2 = 0.125f * 1.4426950408889634f;
  return p;
}

bool same_rows(const Result& a, const Result& b, int row0, int rows) {
  const size_t n = size_t(rows) * kH * kD, off = size_t(row0) * kH * kD;
  return std::memcmp(a.o.data() + off, b.o.data() + off, n * 2) == 0;
}

bool zero_rows_inf_lse(const Result& r, int row0, int rows, int lse0, int lse_n) {
  for (size_t i = size_t(row0) * kH * kD; i < size_t(row0 + rows) * kH * kD; ++i) {
    if (__bfloat162float(r.o[i]) != 0.f) return false;
  }
  for (int i = lse0; i < lse0 + lse_n; ++i) {
    if (!std::isinf(r.lse[i]) || r.lse[i] < 0) return false;
  }
  return true;
}

}  // namespace

int main() {
  // 1. Paged K/V: 4 pages of 16 keys; sequence 1's table holds 5000 and -7.
  {
    const int sq = 48, page = 16, pages = 4, batch = 2;
    FwdParams p = base(batch, sq, pages * page);
    p.q_ptr = random_bf16(size_t(batch) * sq * kH * kD, 1);
    p.k_ptr = random_bf16(size_t(pages) * page * kH * kD, 2);
    p.v_ptr = random_bf16(size_t(pages) * page * kH * kD, 3);
    p.k_batch_stride = p.v_batch_stride = int64_t(page) * kH * kD;
    p.page_block_size = page;
    p.block_table_batch_stride = pages;
    p.kv_num_blocks = pages;
    p.window_right = 0;  // causal: masked and unmasked tiles
    p.block_table = upload(std::vector<int32_t>{0, 1, 2, 3, 5000, -7, 1, 2});
    const Result bad = run(p, batch * sq, batch * kH * sq);
    p.block_table = upload(std::vector<int32_t>{0, 1, 2, 3, 0, 0, 1, 2});
    const Result good = run(p, batch * sq, batch * kH * sq);
    check(same_rows(bad, good, 0, batch * sq),
          "paged: page ids 5000 and -7 read page 0 (bit-equal to a table with 0)");
  }
  // 2. cache_batch_idx: K/V hold 2 batch rows; sequence 1 asks for row 99, sequence 2 for -1.
  {
    const int sq = 40, sk = 72, batch = 3, kv_rows = 2;
    FwdParams p = base(batch, sq, sk);
    p.q_ptr = random_bf16(size_t(batch) * sq * kH * kD, 4);
    p.k_ptr = random_bf16(size_t(kv_rows) * sk * kH * kD, 5);
    p.v_ptr = random_bf16(size_t(kv_rows) * sk * kH * kD, 6);
    p.k_batch_stride = p.v_batch_stride = int64_t(sk) * kH * kD;
    p.kv_num_blocks = kv_rows;
    p.cache_batch_idx = upload(std::vector<int32_t>{1, 99, -1});
    const Result bad = run(p, batch * sq, batch * kH * sq);
    p.cache_batch_idx = upload(std::vector<int32_t>{1, 0, 0});
    const Result good = run(p, batch * sq, batch * kH * sq);
    check(same_rows(bad, good, 0, sq), "cache_batch_idx: the valid sequence is unchanged");
    check(zero_rows_inf_lse(bad, sq, 2 * sq, kH * sq, 2 * kH * sq),
          "cache_batch_idx 99 and -1: no keys (O = 0, lse = +inf)");
  }
  // 3. Varlen: cu_seqlens_k runs past total_k (fast kernel: only cu_seqlens are in use).
  {
    const int batch = 3, sq = 32, total_k = 96;
    FwdParams p = base(batch, sq, total_k);
    p.q_batch_stride = p.o_batch_stride = 0;
    p.q_ptr = random_bf16(size_t(batch) * sq * kH * kD, 7);
    p.k_ptr = random_bf16(size_t(total_k) * kH * kD, 8);
    p.v_ptr = random_bf16(size_t(total_k) * kH * kD, 9);
    p.total_k = total_k;
    p.cu_seqlens_q = upload(std::vector<int32_t>{0, sq, 2 * sq, 3 * sq});
    p.cu_seqlens_k = upload(std::vector<int32_t>{0, 64, 100000, 1 << 30});
    const Result bad = run(p, batch * sq, kH * batch * sq);
    p.cu_seqlens_k = upload(std::vector<int32_t>{0, 64, 96, 96});
    const Result good = run(p, batch * sq, kH * batch * sq);
    check(same_rows(bad, good, 0, batch * sq),
          "varlen: cu_seqlens_k past total_k clamped to total_k");
    bool last_empty = true;  // sequence 2: [96, 96) -> no keys
    for (int h = 0; h < kH; ++h) {
      for (int i = 0; i < sq; ++i) last_empty &= std::isinf(bad.lse[h * batch * sq + 2 * sq + i]);
    }
    check(last_empty, "varlen: the sequence past total_k sees no key (lse = +inf)");
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "all passed", failures);
  return failures ? 1 : 0;
}
