// The kernels' own thread pool. Not OpenMP: libgomp keeps one worker team per calling thread and, as
// soon as its threads outnumber the cores (a server's engine thread next to the main thread's team),
// stops spinning and puts workers to sleep after every parallel region; a decode step has ~150 regions,
// so each paid a futex wake-up (docs/performance.md, "C++ kernels", has the figures). These workers spin
// for a while after each job (a step's ops follow each other within microseconds), then sleep until the
// next job; any thread may submit, one job at a time.
//
// parallel_for(begin, end, grain, f) splits [begin, end) into at most `threads` contiguous chunks of at
// least `grain` items; chunk 0 runs on the caller. Which thread runs which chunk never changes results:
// every kernel here is row-independent.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace metronome {

class Pool {
 public:
  static Pool& get();

  int64_t threads();  // the pool's size: torch's thread count at first use unless resized

  void resize(int64_t n);

  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t tasks =
        std::min<int64_t>(threads(), (n + std::max<int64_t>(1, grain) - 1) / std::max<int64_t>(1, grain));
    if (tasks <= 1 || in_worker_) {
      f(begin, end);
      return;
    }
    std::lock_guard<std::mutex> job(job_mutex_);
    const int64_t chunk = (n + tasks - 1) / tasks;
    std::function<void(int64_t)> task = [&](int64_t t) {
      const int64_t lo = begin + t * chunk, hi = std::min(end, lo + chunk);
      if (lo < hi) f(lo, hi);
    };
    task_ = &task;
    tasks_ = tasks;
    remaining_.store(threads_ - 1);  // every worker checks in, busy or not: none can lag into the next job
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    in_worker_ = true;
    task(0);
    in_worker_ = false;
    while (remaining_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

  ~Pool();

 private:
  static constexpr int64_t kSpins = 1 << 20;  // pause instructions before a worker sleeps

  void work(int64_t id);
  void stop_workers();

  int64_t threads_ = 0;
  std::vector<std::thread> workers_;
  std::mutex job_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> remaining_{0}, sleepers_{0};
  std::atomic<bool> stop_{false};
  std::function<void(int64_t)>* task_ = nullptr;
  int64_t tasks_ = 0;
  static thread_local bool in_worker_;
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  Pool::get().parallel_for(begin, end, grain, f);
}

void set_threads(int64_t n);  // resizes the pool (n >= 1)

// Rows of work per parallel task so that a task holds at least ~`min_elems` elements: small calls stay
// on the calling thread (thread hand-off costs more than they do). Grain never changes results.
inline int64_t grain_for(int64_t elems_per_unit, int64_t min_elems) {
  return std::max<int64_t>(1, min_elems / std::max<int64_t>(1, elems_per_unit));
}

constexpr int64_t kMinParallelElems = 1 << 15;

}  // namespace metronome
