// The kernels' own thread pool. Not OpenMP: libgomp keeps one worker team per calling thread and, as
// soon as its threads outnumber the cores (a server's engine thread next to the main thread's team),
// stops spinning and puts workers to sleep after every parallel region; a decode step has ~150 regions,
// so each paid a futex wake-up (docs/performance.md, "C++ kernels", has the figures).
//
// Waiting, on both sides of a job: a worker that finished spins for a short, time-bounded while (a
// step's ops follow each other within microseconds, so the next job usually arrives during the spin),
// then sleeps on a futex until the next job; the thread that submitted a job runs chunk 0 itself, then
// waits for the workers the same way (spin briefly, then sleep until the last one checks in). With more
// threads than free cores the spin is skipped: a spinning thread would hold the core that the thread
// it waits for needs (docs/performance.md, "The kernels' thread pool"). Every sleep has a timeout.
//
// parallel_for(begin, end, grain, f) splits [begin, end) into contiguous chunks of at least `grain` items,
// up to kChunksPerThread per thread, and every thread of the job (the caller too) takes the next chunk
// not yet taken until none is left. Not one fixed chunk per thread: a served step shares the cores with
// the HTTP loop and its clients, and a thread the OS preempts would hold up the whole job with its share
// while the others wait; with smaller chunks taken in turn, the others do its share instead (figures in
// docs/performance.md, "Served vs in process": no measured gain yet). Which thread runs which chunk never changes
// results: every kernel here is row-independent. Any thread may submit, one job at a time; a chunk that throws is
// rethrown on the caller once every worker is done with the job.
//
// Placement: place_threads pins each worker to a CPU of its own (the plan decides which, compile/stages.py
// thread_placement). Left to the OS, a worker and the submitting thread woken after an idle spell could share
// one core, and every hand-off between them then waited for the other to be scheduled.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

namespace metronome {

// Chunks per thread in a job, at most (grain permitting): enough that the others can take over most of a
// preempted thread's share, few enough that taking a chunk (one atomic add) stays negligible.
constexpr int64_t kChunksPerThread = 4;

class Pool {
 public:
  static Pool& get();

  int64_t threads();  // the pool's size: torch's thread count at first use unless resized

  // n threads (the submitting thread and n - 1 workers). `cpus`: empty, or one CPU per thread, the first
  // the submitter's: worker i then runs on cpus[i] only (the pool never pins the submitter; Engine pins its
  // own thread). A different size or placement restarts the workers.
  void resize(int64_t n, const std::vector<int64_t>& cpus = {});
  std::vector<int64_t> cpus();  // the placement the workers were started with (empty: unpinned)

  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t most = (n + std::max<int64_t>(1, grain) - 1) / std::max<int64_t>(1, grain);
    if (most <= 1 || in_worker_ || threads() <= 1) {
      f(begin, end);
      return;
    }
    std::function<void(int64_t, int64_t)> chunk = [&](int64_t lo, int64_t hi) { f(lo, hi); };
    run(begin, end, most, chunk);
  }

  ~Pool();

 private:
  // Splits [begin, end) into min(threads, most) chunks and runs them; takes the job lock.
  void run(int64_t begin, int64_t end, int64_t most, const std::function<void(int64_t, int64_t)>& f);
  void start(int64_t n, const std::vector<int64_t>& cpus);  // (re)starts n - 1 workers, under job_mutex_
  void work(uint32_t seen, int64_t cpu);                    // cpu: the one the worker is pinned to, or -1
  void run_task(int64_t id);
  void take_tasks();  // runs the job's next untaken chunk until none is left
  void stop_workers();

  std::atomic<int64_t> threads_{0};
  bool spin_ = true;  // false while the pool has more threads than this process has cores
  std::vector<std::thread> workers_;
  std::vector<int64_t> cpus_;  // the workers' placement (resize), under job_mutex_
  std::mutex job_mutex_;       // one job (or resize) at a time
  // The current job, written by the submitter under job_mutex_ before generation_ is bumped.
  const std::function<void(int64_t, int64_t)>* f_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 0, tasks_ = 0;
  std::atomic<int64_t> next_{0};  // the job's next chunk to take
  std::exception_ptr error_;      // the first chunk that threw, under error_mutex_
  std::mutex error_mutex_;
  // 32-bit: futex words. generation_ counts jobs (a bump wakes the workers), remaining_ the workers yet
  // to check in for the current job (every worker checks in, busy or not: none can lag into the next one).
  std::atomic<uint32_t> generation_{0}, remaining_{0};
  std::atomic<uint32_t> sleepers_{0}, caller_sleeping_{0};
  std::atomic<bool> stop_{false};
  static thread_local bool in_worker_;
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  Pool::get().parallel_for(begin, end, grain, f);
}

void set_threads(int64_t n);  // resizes the pool (n >= 1), its workers free to run on any core
// Resizes the pool to one thread per CPU of `cpus` (distinct CPUs this process may use), worker i pinned to
// cpus[i]; cpus[0] is for the submitting thread, which the caller pins itself (see Pool::resize).
void place_threads(const std::vector<int64_t>& cpus);
std::vector<int64_t> thread_cpus();  // the pool's placement: empty where its workers are not pinned

// For the pool's tests: a job of `items` items in which the chunk holding item 0 waits (up to `timeout_ms`)
// until every item outside it is done, as a thread the OS preempted would. Returns (items in the held
// chunk, items the other chunks did, 1 if the wait timed out). With one fixed share per thread, the held
// share is half the job at 2 threads; with chunks taken in turn it is a few items and the others do the rest.
std::tuple<int64_t, int64_t, int64_t> hold_first_chunk(int64_t items, int64_t grain, int64_t timeout_ms);
// For the pool's tests: a job of `items` items whose chunk holding item `at` throws (none throws for an `at`
// outside [0, items)). Returns (1 if parallel_for rethrew it on this thread, items in the chunk that threw,
// items the other chunks did): every chunk but the thrower's still runs, and the next job starts without
// the last one's error.
std::tuple<int64_t, int64_t, int64_t> throw_in_chunk(int64_t items, int64_t grain, int64_t at);
int64_t get_threads();  // the pool's size (starting it at torch's thread count if it has not started)

// Rows of work per parallel task so that a task holds at least ~`min_elems` elements: small calls stay
// on the calling thread (thread hand-off costs more than they do). Grain never changes results.
inline int64_t grain_for(int64_t elems_per_unit, int64_t min_elems) {
  return std::max<int64_t>(1, min_elems / std::max<int64_t>(1, elems_per_unit));
}

constexpr int64_t kMinParallelElems = 1 << 15;

}  // namespace metronome
