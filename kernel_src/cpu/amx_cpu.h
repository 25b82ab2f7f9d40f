// Owns: the bf16 matrix path of the CPU backend on Intel AMX (Advanced Matrix Extensions: eight
// 1 KiB tile registers and TDPBF16PS, a 16 x 16 fp32 tile += 16 x 32 bf16 times 32 x 16 bf16 in
// one instruction) with AVX512-BF16 conversions: whether the process may use it, the tile GEMM,
// the operand packing, and the element-wise steps of the bf16 forward and backward that produce
// bf16 operands (probabilities, dS) from fp32 tiles.
//
// Data: bf16 values travel as their bits (uint16_t). Every product accumulates in fp32 inside the
// tile unit; each element of C is a sum over the depth in 32-element chunks, the same for every
// call with the same depth, so the same operands give bitwise the same result in the forward and
// the backward.
//
// Operand layouts of C[M x N] = A[M x K] B[K x N]: A row-major (element (m, k) at A[m * lda + k]);
// B in "pair rows": element (k, n) at B[(k / 2) * ldb + 2 * n + k % 2] (TDPBF16PS multiplies
// pairs of adjacent depth elements; ldb counts bf16 elements of one pair row, 2 x the columns);
// C row-major fp32. M and N multiples of 16, K a multiple of 32, operands zero-padded by the
// caller.
//
// Everything here is compiled with target attributes (AMX, AVX-512); nothing may be called unless
// amx_usable() is true. Without a compiler that knows AMX (GCC < 11, non-x86) amx_usable() is
// false and the callers keep the fp32 path of simd_cpu.h.
#pragma once
#include <cstdint>

#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// True when the CPU has AMX-TILE, AMX-BF16, AVX512-BF16 (and AVX-512F/BW/VL), the OS granted the
// process the tile data state (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), and
// FLASH_ATTN_CPU_NO_AMX is unset. Decided once per process.
bool amx_usable();

// Configures the calling thread's tiles for amx_gemm (at the start of each task: other code on the
// thread, e.g. oneDNN, may have loaded another configuration) / releases them (at its end).
void amx_begin();
void amx_end();

// C = A B (+ C when accumulate), layouts above. lda, ldb, ldc in elements.
void amx_gemm(const uint16_t* A, int lda, const uint16_t* B, int ldb, float* C, int ldc, int M,
              int N, int K, bool accumulate);

// B operand of X^T from X [rows][cols] bf16 row-major (ldx elements, cols even): element (k = c,
// n = j) = X[j][c], i.e. dst[(c / 2) * ldd + 2 * j + c % 2] (a transposition of 32-bit pairs).
// Columns j in [rows, rows_pad) of dst are zeroed.
void amx_pack_transposed(const uint16_t* X, int ldx, int rows, int rows_pad, int cols,
                         uint16_t* dst, int ldd);
// B operand of X from X [rows][cols] bf16 row-major: dst[(k / 2) * ldd + 2 * c + k % 2] = X[k][c];
// depth rows in [rows, rows_pad) are zero (rows_pad even). cols a multiple of 16.
void amx_pack_pairs(const uint16_t* X, int ldx, int rows, int rows_pad, int cols, uint16_t* dst,
                    int ldd);
// The same from fp32 X, rounded to bf16 (nearest even).
void amx_pack_pairs(const float* X, int ldx, int rows, int rows_pad, int cols, uint16_t* dst,
                    int ldd);
// dst[r][c] = bf16(X[r][c]) for c < cols, 0 for cols <= c < cols_pad (cols_pad multiple of 16).
void amx_to_bf16(const float* X, int ldx, int rows, int cols, int cols_pad, uint16_t* dst,
                 int ldd);

// dst[0..width) = src[0..d), zero past d (bf16 bits; width a multiple of 16).
void amx_copy_row(const uint16_t* src, int d, int width, uint16_t* dst);

// dst[c] = bf16(src[c] * f) for c < n, rounded as float_to_bf16 (dtype_cpu.h: nearest even,
// NaN kept quiet, subnormals kept), the product formed in fp32.
void amx_store_bf16(const float* src, int n, float f, uint16_t* dst);

// The forward's online softmax on one tile of raw products S[r][j] (r < rows, j < n, ld lds); the
// logit is scale * S (scale = 1 when S already holds the final logits). Per row (SoftmaxState's
// rules): m the running max (-inf while empty), new reference off = m_new (0 while empty),
// factor exp(m_old - off) (0 for a row empty so far, exactly 1 when the max did not move),
// l = l * factor + sum_j exp(scale * S - off), O[r][0..dpad) *= factor (skipped when 1), and
// P[r][j] = bf16(exp(scale * S[r][j] - off)), zero where keep[r * ldk + j] == 0 (keep null: no
// dropout; dropped ones still count in l) and for n <= j < n_pad.
void amx_softmax_tile(const float* S, int lds, int rows, int n, int n_pad, float scale, float* m,
                      float* l, float* O, int ldo, int dpad, const uint8_t* keep, int ldk,
                      uint16_t* P, int ldp);

// The backward's probabilities: P[r][j] = exp(scale * S[r][j] - lse[r]) in fp32 (the exact
// difference of exp_row: Knuth's TwoSum of the fp32 logit and -lse), 0 for j >= n up to n_pad;
// +inf lse (a row that saw no key) gives 0.
void amx_exp_rows(const float* S, int lds, int rows, int n, int n_pad, float scale,
                  const float* lse, float* P, int ldp);

// The backward's dS, in place of dP: dP[r][j] = P[r][j] * (dP[r][j] z - D[r]) (1 - t^2) for
// r < rows, j < n_pad, with z = keep[r * ldk + j] ? keep_scale : 0 (keep null: z = 1) and t =
// tanh[r * ld + j] (null: t = 0); rows in [rows, rows_pad) are zeroed. P is zero past the tile's
// keys, so dS is too.
void amx_ds_tile(const float* P, float* dP, int ld, int rows, int rows_pad, int n_pad,
                 const float* D, const uint8_t* keep, int ldk, float keep_scale,
                 const float* tanh);

}  // namespace cpu
FLASH_NAMESPACE_END
