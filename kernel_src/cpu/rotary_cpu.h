// Owns: rotate_row, the CPU rotation of one head's row (common/rotary.h's pair rotation applied
// over a row), used by the KV cache append and query rotation (kvcache_cpu.cpp) and by the rotary
// op (rotary_cpu.cpp). Computed in the accumulation type (fp32, fp64 for fp32/fp64 inputs) and
// rounded once, like FA2.
#pragma once
#include "../common/rotary.h"
#include "dtype_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// dst[0:d] = src[0:d] with its first rotary_dim dims rotated by the table rows cos_row/sin_row
// (rotary_dim / 2 entries each); conjugate rotates by -theta.
template <typename T>
inline void rotate_row(const T* src, T* dst, int d, int rotary_dim, bool interleaved,
                       const T* cos_row, const T* sin_row, bool conjugate = false) {
  using Acc = sum_t<T>;  // fp64 for fp32 inputs: two products per element, nothing to save
  for (int m = 0; m < rotary_dim / 2; ++m) {
    int i0, i1;
    rotary_pair_index(m, rotary_dim, interleaved, &i0, &i1);
    const Acc s = Traits<T>::load(sin_row[m]);
    Acc y0, y1;
    rotate_pair<Acc>(Traits<T>::load(src[i0]), Traits<T>::load(src[i1]),
                     Traits<T>::load(cos_row[m]), conjugate ? -s : s, &y0, &y1);
    dst[i0] = Traits<T>::store(y0);
    dst[i1] = Traits<T>::store(y1);
  }
  for (int col = rotary_dim; col < d; ++col) dst[col] = src[col];
}

}  // namespace cpu
FLASH_NAMESPACE_END
