// The kernels' thread pool (see pool.h).

#include "pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <stdexcept>
#include <string>

namespace metronome {

namespace {

// How long a thread spins on a word before it sleeps: a few times a step's gap between two ops, far
// below the gap between two steps (figures in docs/performance.md).
constexpr auto kSpin = std::chrono::microseconds(50);
// A sleeping thread wakes at least this often to look again (a missed wake-up costs this, never a hang).
constexpr long kSleepNs = 100'000'000;

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are plain 32-bit integers");

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  const timespec timeout{0, kSleepNs};
  // Returns at once when the word no longer holds `expected` (the kernel compares atomically).
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, &timeout, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// Spins while `busy()` for at most kSpin (not at all without `spin`); true when it stopped being busy.
template <typename Busy>
bool spin_while(bool spin, const Busy& busy) {
  if (!spin) return !busy();
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (busy()) {
    // the word is looked at after every pause (waiting out all 64 before looking delayed every
    // hand-off of every parallel region by up to 64 pauses, docs/moe.md); the clock, once per 64 pauses
    for (int i = 0; i < 64 && busy(); ++i) _mm_pause();
    if (std::chrono::steady_clock::now() > until) return !busy();
  }
  return true;
}

int64_t cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

}  // namespace

thread_local bool Pool::in_worker_ = false;

Pool& Pool::get() {
  static Pool pool;
  return pool;
}

int64_t Pool::threads() {
  int64_t n = threads_.load(std::memory_order_acquire);
  if (n == 0) {
    std::lock_guard<std::mutex> job(job_mutex_);
    if (threads_.load() == 0) start(std::max(1, at::get_num_threads()), {});
    n = threads_.load();
  }
  return n;
}

void Pool::resize(int64_t n, const std::vector<int64_t>& cpus) {
  std::lock_guard<std::mutex> job(job_mutex_);
  n = std::max<int64_t>(1, n);
  if (n != threads_.load() || cpus != cpus_) start(n, cpus);
}

std::vector<int64_t> Pool::cpus() {
  std::lock_guard<std::mutex> job(job_mutex_);
  return cpus_;
}

void Pool::start(int64_t n, const std::vector<int64_t>& cpus) {  // under job_mutex_
  stop_workers();
  threads_.store(n);
  cpus_ = cpus;
  spin_ = n <= cores();
  // Each worker starts from the generation of now, under the job lock: a job submitted before the
  // worker's thread first runs is still one it has not seen, so it cannot miss it.
  const uint32_t now = generation_.load();
  for (int64_t id = 1; id < n; ++id) {
    const int64_t cpu = cpus.empty() ? -1 : cpus[id];
    workers_.emplace_back([this, now, cpu] { work(now, cpu); });
  }
}

Pool::~Pool() {
  std::lock_guard<std::mutex> job(job_mutex_);
  stop_workers();
}

void Pool::run(int64_t begin, int64_t end, int64_t most, const std::function<void(int64_t, int64_t)>& f) {
  std::lock_guard<std::mutex> job(job_mutex_);
  const int64_t threads = threads_.load(), tasks = std::min(threads * kChunksPerThread, most);
  if (threads <= 1 || tasks <= 1) {  // the pool shrank since parallel_for looked
    f(begin, end);
    return;
  }
  f_ = &f;
  begin_ = begin, end_ = end;
  chunk_ = (end - begin + tasks - 1) / tasks;
  tasks_ = (end - begin + chunk_ - 1) / chunk_;
  next_.store(0);  // before the generation bump below, which publishes it with the job
  error_ = nullptr;
  remaining_.store(static_cast<uint32_t>(threads - 1));
  generation_.fetch_add(1);  // seq_cst, as the load of sleepers_: a worker going to sleep sees one or the other
  if (sleepers_.load() > 0) futex_wake_all(generation_);
  in_worker_ = true;
  take_tasks();
  in_worker_ = false;
  const auto busy = [this] { return remaining_.load(std::memory_order_acquire) != 0; };
  if (!spin_while(spin_, busy)) {
    caller_sleeping_.store(1);
    for (uint32_t left; (left = remaining_.load()) != 0;) futex_wait(remaining_, left);
    caller_sleeping_.store(0);
  }
  f_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

void Pool::take_tasks() {
  for (int64_t id; (id = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) run_task(id);
}

void Pool::run_task(int64_t id) {
  if (id >= tasks_) return;
  const int64_t lo = begin_ + id * chunk_, hi = std::min(end_, lo + chunk_);
  if (lo >= hi) return;
  try {
    (*f_)(lo, hi);
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }
}

void Pool::work(uint32_t seen, int64_t cpu) {
  in_worker_ = true;
  // named so that a per-thread CPU account (/proc/<pid>/task/*/comm) can tell the kernels' workers apart
  pthread_setname_np(pthread_self(), "metronome-pool");
  if (cpu >= 0) {  // place_threads checked that this process may run on it: a refusal would leave it unpinned
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(static_cast<int>(cpu), &one);
    pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
  }
  while (true) {
    const auto idle = [&] { return generation_.load(std::memory_order_acquire) == seen; };
    if (!spin_while(spin_, idle)) {
      sleepers_.fetch_add(1);
      while (generation_.load() == seen) futex_wait(generation_, seen);
      sleepers_.fetch_sub(1);
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    take_tasks();
    // seq_cst, as the caller's store of caller_sleeping_: the last worker sees it, or the caller sees 0.
    if (remaining_.fetch_sub(1) == 1 && caller_sleeping_.load()) futex_wake_all(remaining_);
  }
}

void Pool::stop_workers() {  // under job_mutex_
  if (workers_.empty()) return;
  stop_.store(true);
  generation_.fetch_add(1);
  futex_wake_all(generation_);
  for (auto& w : workers_) w.join();
  workers_.clear();
  stop_.store(false);
}

void set_threads(int64_t n) {
  TORCH_CHECK(n >= 1, "set_threads: need at least 1 thread, got ", n);
  Pool::get().resize(n);
}

void place_threads(const std::vector<int64_t>& cpus) {
  TORCH_CHECK(!cpus.empty(), "place_threads: need at least one CPU");
  cpu_set_t allowed;
  TORCH_CHECK(sched_getaffinity(0, sizeof(allowed), &allowed) == 0, "place_threads: cannot read this thread's CPUs");
  std::vector<int64_t> seen;
  for (const int64_t cpu : cpus) {
    TORCH_CHECK(cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(static_cast<int>(cpu), &allowed), "place_threads: CPU ", cpu,
                " is not one this thread may run on");
    TORCH_CHECK(std::find(seen.begin(), seen.end(), cpu) == seen.end(), "place_threads: CPU ", cpu, " named twice");
    seen.push_back(cpu);
  }
  Pool::get().resize(static_cast<int64_t>(cpus.size()), cpus);
}

std::vector<int64_t> thread_cpus() { return Pool::get().cpus(); }

int64_t get_threads() { return Pool::get().threads(); }

std::tuple<int64_t, int64_t, int64_t> hold_first_chunk(int64_t items, int64_t grain, int64_t timeout_ms) {
  TORCH_CHECK(items >= 1 && grain >= 1 && timeout_ms >= 0, "hold_first_chunk: items, grain >= 1, timeout_ms >= 0");
  std::atomic<int64_t> held{0}, others{0};
  std::atomic<bool> timed_out{false};
  parallel_for(0, items, grain, [&](int64_t lo, int64_t hi) {
    if (lo != 0) {
      others.fetch_add(hi - lo);
      return;
    }
    held.store(hi - lo);
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (others.load() < items - (hi - lo)) {
      if (std::chrono::steady_clock::now() > until) {
        timed_out.store(true);
        return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  });
  return {held.load(), others.load(), timed_out.load() ? 1 : 0};
}

std::tuple<int64_t, int64_t, int64_t> throw_in_chunk(int64_t items, int64_t grain, int64_t at) {
  TORCH_CHECK(items >= 1 && grain >= 1, "throw_in_chunk: items and grain must be >= 1");
  std::atomic<int64_t> thrower{0}, others{0};
  int64_t rethrown = 0;
  try {
    parallel_for(0, items, grain, [&](int64_t lo, int64_t hi) {
      if (lo <= at && at < hi) {
        thrower.store(hi - lo);
        throw std::runtime_error("throw_in_chunk: the chunk holding item " + std::to_string(at));
      }
      others.fetch_add(hi - lo);
    });
  } catch (const std::runtime_error&) {
    rethrown = 1;
  }
  return {rethrown, thrower.load(), others.load()};
}

}  // namespace metronome
