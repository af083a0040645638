// The kernels' thread pool (see pool.h).

#include "pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace metronome {

thread_local bool Pool::in_worker_ = false;

Pool& Pool::get() {
  static Pool pool;
  return pool;
}

int64_t Pool::threads() {
  if (threads_ == 0) resize(std::max(1, at::get_num_threads()));
  return threads_;
}

void Pool::resize(int64_t n) {
  std::lock_guard<std::mutex> job(job_mutex_);
  n = std::max<int64_t>(1, n);
  if (n == threads_) return;
  stop_workers();
  threads_ = n;
  for (int64_t id = 1; id < n; ++id) workers_.emplace_back([this, id] { work(id); });
}

Pool::~Pool() { stop_workers(); }

void Pool::work(int64_t id) {
  in_worker_ = true;
  uint64_t seen = generation_.load();
  while (true) {
    for (int64_t spin = 0; generation_.load(std::memory_order_acquire) == seen; ++spin) {
      if (spin < kSpins) {
        _mm_pause();
        continue;
      }
      std::unique_lock<std::mutex> lock(sleep_mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
    }
    seen = generation_.load();
    if (stop_.load()) return;
    if (id < tasks_) (*task_)(id);
    remaining_.fetch_sub(1, std::memory_order_release);
  }
}

void Pool::stop_workers() {
  if (workers_.empty()) return;
  stop_.store(true);
  generation_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    wake_.notify_all();
  }
  for (auto& w : workers_) w.join();
  workers_.clear();
  stop_.store(false);
}

void set_threads(int64_t n) {
  TORCH_CHECK(n >= 1, "set_threads: need at least 1 thread, got ", n);
  Pool::get().resize(n);
}

}  // namespace metronome
