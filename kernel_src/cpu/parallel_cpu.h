// Owns: the one parallel loop of the CPU backend and its per-thread scratch.
//
// * OpenMP over independent tasks, dynamic scheduling (causal tiles differ in cost).
// * Small problems run on the calling thread: the CI suite makes thousands of tiny calls, for
//   which waking the OpenMP team costs more than the work (and much more on an oversubscribed
//   machine, where idle workers spin).
// * Exception safety: an exception must not leave an OpenMP worksharing region (the other threads
//   would wait forever at its barrier), so each task catches, the first error is kept, remaining
//   tasks are skipped, and the error is rethrown on the calling thread.
// * Scratch tiles are thread-local and grow-only, so repeated calls pay no allocation, zeroing or
//   page faults; they are bounded by the tile sizes (never by sequence lengths). They are
//   64-byte aligned (Scratch<T>): every tile row is padded to 16 fp32 lanes, so each 64-byte
//   vector load then stays within one cache line (a line-splitting load costs about twice as
//   much; misaligned tiles ran the AVX-512 GEMM at 2/3 of its aligned speed).
// Without -fopenmp the pragmas vanish and the loop runs serially with identical results: tasks
// never share outputs, so results never depend on the thread count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// Multiply-adds below which a call stays on the calling thread (~0.1 ms of single-core work).
constexpr int64_t kParallelMinWork = int64_t(1) << 20;

// body(task) for task in [0, ntasks); parallel only when `work` (multiply-adds, roughly) is
// worth it.
template <typename Body>
void parallel_tasks(int64_t ntasks, int64_t work, Body&& body) {
  std::exception_ptr error = nullptr;
  bool failed = false;
#pragma omp parallel for schedule(dynamic, 1) if (ntasks > 1 && work >= kParallelMinWork)
  for (int64_t t = 0; t < ntasks; ++t) {
    bool skip;
#pragma omp atomic read
    skip = failed;
    if (skip) continue;
    try {
      body(t);
    } catch (...) {
#pragma omp critical
      {
        if (!error) error = std::current_exception();
      }
#pragma omp atomic write
      failed = true;
    }
  }
  if (error) std::rethrow_exception(error);
}

// The number of threads a parallel_tasks loop would use (1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// A 64-byte aligned allocator, and the vector type of every scratch tile and row buffer.
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAlloc<U>&) const { return false; }
};
template <typename T>
using Scratch = std::vector<T, AlignedAlloc<T>>;

// Grow-only resize for scratch vectors (contents beyond what a call writes are never read).
template <typename Vec>
void grow_to(Vec& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// The calling thread's instance of S (default-constructed once per thread; the caller grows it
// to the sizes it needs).
template <typename S>
S& thread_scratch() {
  static thread_local S scratch;
  return scratch;
}

}  // namespace cpu
FLASH_NAMESPACE_END
