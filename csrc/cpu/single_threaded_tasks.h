// Parallel loops whose results do not depend on the thread count: each task
// runs on one thread with its BLAS calls single-threaded, and tasks are fixed
// by the shapes (the caller's choice), never by the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>
#include <exception>
#include <mutex>

// MKL's per-thread thread count (the C entry point behind mkl.h's
// mkl_set_num_threads_local macro; the lower-case symbols are the Fortran ones,
// which take a pointer), exported by libtorch_cpu when torch is built with
// MKL; weak, so that a torch without MKL links and runs too.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace fastkd {
namespace cpu {

// Keeps the BLAS of the calling thread single-threaded for its lifetime.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// Runs task(0 .. count-1) on at::get_num_threads() threads inside one OpenMP
// region (an active one whenever there is more than one thread, so that
// oneDNN and OpenBLAS calls inside stay sequential too; MKL is told so by
// SingleThreadedBlas), rethrowing the first exception after it. Each task may
// call ATen ops: they run below autograd (worker threads start with it on).
template <typename Task>
void run_single_threaded_tasks(int64_t count, const Task& task) {
  std::exception_ptr error;
  std::mutex error_lock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < count; ++i) {
    try {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      SingleThreadedBlas sequential;
      task(i);
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace cpu
}  // namespace fastkd
