// Owns: the CPU backend's vectorised primitives on small scratch tiles, fp32 or fp64: the one
// matrix multiply used for every product of the forward and backward passes (S^T = K Q^T and
// O += P V in the forward, S = Q K^T, dV += P^T dO, dP = dO V^T, dQ += dS K, dK += dS^T Q in the
// backward; transposed operands are read in place through A's strides), the exponential of a
// row of logits or of the columns of a transposed score tile, the column max, and exp(a - b).
//
// Implemented in simd_cpu.cpp: register-blocked micro-kernels for SSE2 (the x86-64 baseline the
// Hub build targets), AVX2+FMA and AVX-512, chosen at run time by what the CPU has.
//
// Preconditions: `cols` and `n_pad` are multiples of kPad (callers pad their tiles); rows and depth
// are arbitrary; C does not alias A or B.
#pragma once

#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// Every scratch row length (head dim, key tile, query tile) is padded to this: the fp32 lanes of
// the widest variant (AVX-512).
constexpr int kPad = 16;
constexpr int pad_up(int n) { return (n + kPad - 1) / kPad * kPad; }

// C[rows x cols] = A[rows x depth] * B[depth x cols] (+ C when accumulate). Element (r, k) of A
// is A[r * a_row + k * a_depth] (a tile stored transposed is passed with a_row = 1); B and C are
// row-major with leading dims in elements. Each element of C is one FMA chain over k = 0, 1, ...
// in order (the same for every variant up to FMA contraction), so the same operands give the
// same result whichever shape of product they are part of.
void gemm(const float* A, long a_row, long a_depth, const float* B, int ldb, float* C, int ldc,
          int rows, int depth, int cols, bool accumulate);
void gemm(const double* A, long a_row, long a_depth, const double* B, int ldb, double* C,
          int ldc, int rows, int depth, int cols, bool accumulate);
template <typename Acc>
inline void gemm(const Acc* A, int lda, const Acc* B, int ldb, Acc* C, int ldc, int rows,
                 int depth, int cols, bool accumulate) {
  gemm(A, lda, 1, B, ldb, C, ldc, rows, depth, cols, accumulate);
}

// out[j] = exp(x[j] - offset) for j < n_pad (out may be x); returns the sum of the results. -inf
// (masked) gives exactly 0, and so does anything below the smallest normal result (~1e-38 fp32,
// ~1e-308 fp64): softmax rows hold a 1 (their maximum), so flushing those terms changes no
// result. Accuracy: within ~1 ulp of the correctly rounded exp.
float exp_row(const float* x, float* out, int n_pad, float offset);
double exp_row(const double* x, double* out, int n_pad, double offset);
template <typename Acc>
inline Acc exp_row(Acc* x, int n_pad, Acc offset) {
  return exp_row(x, x, n_pad, offset);
}

// Column forms, for tiles with one query per column (X[j * ld + i]: key j, query i); `cols` is a
// multiple of kPad, `rows` arbitrary.
// m[i] = max(m[i], max_j X[j][i]).
void col_max(const float* X, int ld, int rows, int cols, float* m);
void col_max(const double* X, int ld, int rows, int cols, double* m);
// P[j][i] = exp(X[j][i] - off[i]) (exp_row's accuracy, -inf gives 0), P may be X;
// sum[i] += sum_j P[j][i], added in order of j.
void exp_cols(const float* X, int ldx, float* P, int ldp, int rows, int cols, const float* off,
              float* sum);
void exp_cols(const double* X, int ldx, double* P, int ldp, int rows, int cols,
              const double* off, double* sum);
// The same on fp64 data with the exponential evaluated in fp32 (fp32 inputs): the fp64
// difference is split into an fp32 head h and tail t (h + t = x - off to ~2^-48 relative) and
// exp(h + t) = exp(h) (1 + t); the results are fp32-accurate, stored and summed in fp64.
void exp_cols_f32(const double* X, int ldx, double* P, int ldp, int rows, int cols,
                  const double* off, double* sum);
double exp_row_f32(const double* x, double* out, int n_pad, double offset);
// The same from fp64 logits into fp32 probabilities (the backward's P for fp32 inputs).
float exp_row(const double* x, float* out, int n_pad, double offset);
// C[r][c] = C[r][c] * f[r] + (A B)[r][c] (f null: C += A B) with A, B as gemm's and C fp64: one
// fp32 tile's product (gemm's FMA chain, rounded to fp32 once) added to fp64 sums that run
// across tiles, without storing the fp32 product.
void gemm_fold(const float* A, long a_row, long a_depth, const float* B, int ldb, double* C,
               int ldc, int rows, int depth, int cols, const float* f);
// out[i] = exp(a[i] - b[i]) for i < n_pad (out may be a).
void exp_diff(const float* a, const float* b, float* out, int n_pad);
void exp_diff(const double* a, const double* b, double* out, int n_pad);

// dP[r][c] = P[r][c] * (dP[r][c] - D[r]) for r < rows, c < cols (a multiple of kPad); rows of
// stride ld (the backward's dS without dropout or softcap).
void ds_rows(const float* P, float* dP, int ld, int rows, int cols, const float* D);
void ds_rows(const double* P, double* dP, int ld, int rows, int cols, const double* D);

// dst[cols x rows] = src[rows x cols]^T (for the products that need a transposed operand),
// converted to dst's type where it differs (the backward's fp64 logit operand of fp32 inputs).
template <typename Src, typename Dst>
inline void transpose(const Src* src, int lds, Dst* dst, int ldd, int rows, int cols) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = static_cast<Dst>(src[r * lds + c]);
}

}  // namespace cpu
FLASH_NAMESPACE_END
