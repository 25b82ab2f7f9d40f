// Owns: the one parallel loop of the CPU backend. OpenMP over independent tasks with per-thread
// scratch, dynamic scheduling (causal tiles differ in cost), and exception safety: an exception
// must not leave an OpenMP worksharing region (the other threads would wait forever at its
// barrier), so each task catches, the first error is kept, remaining tasks are skipped, and the
// error is rethrown on the calling thread. Without -fopenmp the pragmas vanish and the loop runs
// serially with identical results (tasks never share outputs, so results never depend on the
// thread count).
#pragma once
#include <cstdint>
#include <exception>
#include <memory>

#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// make_scratch() -> std::unique_ptr<Scratch>; body(task, Scratch&).
template <typename MakeScratch, typename Body>
void parallel_tasks(int64_t ntasks, MakeScratch&& make_scratch, Body&& body) {
  std::exception_ptr error = nullptr;
  bool failed = false;
#pragma omp parallel if (ntasks > 1)
  {
    decltype(make_scratch()) scratch;
    try {
      scratch = make_scratch();
    } catch (...) {
#pragma omp critical(flash_cpu_error)
      {
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      bool skip;
#pragma omp atomic read
      skip = failed;
      if (skip || !scratch) continue;
      try {
        body(t, *scratch);
      } catch (...) {
#pragma omp critical(flash_cpu_error)
        {
          if (!error) error = std::current_exception();
          failed = true;
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace cpu
FLASH_NAMESPACE_END
