#include "exchange.h"

#include <fcntl.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace metronome {

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kLineBytes = 64;
constexpr int64_t kSliceMs = 50;  // a sleeping waiter checks the awaited rank's process this often

// A process is gone when /proc has no entry for it, or the entry is a zombie (a killed child not yet
// reaped by its parent) or dead.
bool process_runs(int64_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!stat || !std::getline(stat, text)) return false;
  const size_t close = text.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos || close + 2 >= text.size()) return false;
  const char state = text[close + 2];
  return state != 'Z' && state != 'X' && state != 'x';
}

// Shared futexes (no FUTEX_PRIVATE_FLAG): the word lives in a mapping other processes share.
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t ms) {
  timespec t{static_cast<time_t>(ms / 1000), static_cast<long>((ms % 1000) * 1000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &t, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

bool reached(uint32_t have, uint64_t want) {  // sequence numbers compare modulo 2^32
  return static_cast<int32_t>(have - static_cast<uint32_t>(want)) >= 0;
}

}  // namespace

struct HostExchange::Line {
  std::atomic<uint32_t> seq;      // the last exchange this rank published (also the futex word)
  std::atomic<uint32_t> waiters;  // ranks sleeping on `seq`: the publisher wakes them only if any
  int64_t bytes[2];               // the byte count of its part in each buffer
};
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are plain 32-bit integers");

int64_t HostExchange::header_bytes(int64_t world) { return ((world * kLineBytes + 4095) / 4096) * 4096; }

HostExchange::~HostExchange() { detach(); }

void HostExchange::attach(const std::string& path, int64_t rank, int64_t world, int64_t capacity,
                          const std::vector<int64_t>& pids, double timeout_s, double spin_us) {
  if (world < 1 || rank < 0 || rank >= world) throw std::invalid_argument("HostExchange: rank outside 0..world-1");
  if (capacity < 64 || capacity % 64) throw std::invalid_argument("HostExchange: capacity must be a multiple of 64");
  if (static_cast<int64_t>(pids.size()) != world) throw std::invalid_argument("HostExchange: one pid per rank");
  if (timeout_s <= 0) throw std::invalid_argument("HostExchange: timeout_s must be positive");
  detach();
  std::lock_guard<std::mutex> lock(mutex_);
  const size_t size = static_cast<size_t>(header_bytes(world) + 2 * world * capacity);
  const int fd = open(path.c_str(), O_RDWR);
  if (fd < 0) throw std::runtime_error("HostExchange: cannot open " + path + ": " + std::strerror(errno));
  struct stat st{};
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < size) {
    close(fd);
    throw std::runtime_error("HostExchange: " + path + " is smaller than " + std::to_string(size) + " bytes");
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);  // the mapping keeps the file
  if (p == MAP_FAILED) throw std::runtime_error(std::string("HostExchange: mmap failed: ") + std::strerror(errno));
  base_ = static_cast<uint8_t*>(p);
  size_ = size;
  rank_ = rank, world_ = world, capacity_ = capacity;
  pids_ = pids;
  timeout_s_ = timeout_s, spin_us_ = spin_us;
  seq_ = 0;
}

void HostExchange::detach() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (base_ != nullptr) munmap(base_, size_);
  base_ = nullptr;
  size_ = 0;
}

HostExchange::Line* HostExchange::line(int64_t r) const { return reinterpret_cast<Line*>(base_ + r * kLineBytes); }

uint8_t* HostExchange::slot(uint64_t seq, int64_t r) const {
  return base_ + header_bytes(world_) + (static_cast<int64_t>(seq & 1) * world_ + r) * capacity_;
}

void HostExchange::fail(int64_t r, const std::string& why) const {
  throw std::runtime_error("tensor-parallel rank " + std::to_string(r) + " (pid " + std::to_string(pids_[r]) + ") " +
                           why + " (host exchange " + std::to_string(seq_) + ")");
}

uint64_t HostExchange::publish(const void* data, int64_t n) {
  if (base_ == nullptr) throw std::runtime_error("HostExchange: not attached to a group (it was closed)");
  if (n < 0 || n > capacity_)
    throw std::invalid_argument("HostExchange: " + std::to_string(n) + " bytes do not fit a slot of " +
                                std::to_string(capacity_) + "; send larger parts over the process group");
  const uint64_t seq = ++seq_;
  if (n > 0) std::memcpy(slot(seq, rank_), data, static_cast<size_t>(n));
  Line* me = line(rank_);
  me->bytes[seq & 1] = n;
  me->seq.store(static_cast<uint32_t>(seq));             // seq_cst, and so is the load of `waiters`: a waiter that
  if (me->waiters.load() > 0) futex_wake_all(&me->seq);  // counted itself either sees seq or is woken
  return seq;
}

int64_t HostExchange::wait(int64_t r, uint64_t seq) {
  Line* other = line(r);
  const auto start = Clock::now();
  const auto spin_until = start + std::chrono::nanoseconds(static_cast<int64_t>(spin_us_ * 1000));
  for (int i = 0;; ++i) {  // spin: check the clock every 64 rounds
    if (reached(other->seq.load(std::memory_order_acquire), seq)) return other->bytes[seq & 1];
    if ((i & 63) == 63 && Clock::now() >= spin_until) break;
    _mm_pause();
  }
  const auto deadline = start + std::chrono::nanoseconds(static_cast<int64_t>(timeout_s_ * 1e9));
  while (true) {
    other->waiters.fetch_add(1);
    const uint32_t seen = other->seq.load();
    if (!reached(seen, seq)) futex_wait(&other->seq, seen, kSliceMs);
    other->waiters.fetch_sub(1);
    if (reached(other->seq.load(std::memory_order_acquire), seq)) return other->bytes[seq & 1];
    if (!process_runs(pids_[r])) fail(r, "has exited");
    if (Clock::now() >= deadline) {
      std::ostringstream what;
      what << "sent nothing for " << timeout_s_ << " s";
      fail(r, what.str());
    }
  }
}

void HostExchange::all_gather(const void* mine, int64_t n, void* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t seq = publish(mine, n);
  for (int64_t r = 0; r < world_; ++r) {
    const int64_t got = r == rank_ ? n : wait(r, seq);
    if (got != n) fail(r, "sent " + std::to_string(got) + " bytes where this rank sent " + std::to_string(n));
    std::memcpy(static_cast<uint8_t*>(out) + r * n, slot(seq, r), static_cast<size_t>(n));
  }
}

void HostExchange::reduce_chunks(const float* parts, int64_t chunks, int64_t m, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t n = chunks * m * static_cast<int64_t>(sizeof(float));
  const uint64_t seq = publish(parts, n);
  bool first = true;
  for (int64_t r = 0; r < world_; ++r) {  // add each rank's parts as soon as they are there, in order
    const int64_t got = r == rank_ ? n : wait(r, seq);
    if (got != n)
      fail(r, "sent " + std::to_string(got) + " bytes of partial sums where this rank sent " + std::to_string(n));
    const float* p = reinterpret_cast<const float*>(slot(seq, r));
    for (int64_t c = 0; c < chunks; ++c, p += m) {
      if (first) {
        std::memcpy(out, p, static_cast<size_t>(m) * sizeof(float));
        first = false;
        continue;
      }
      for (int64_t i = 0; i < m; ++i) out[i] = out[i] + p[i];
    }
  }
}

std::string HostExchange::broadcast(const std::string& data) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t seq = publish(data.data(), rank_ == 0 ? static_cast<int64_t>(data.size()) : 0);
  std::string got;
  for (int64_t r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    const int64_t n = wait(r, seq);
    if (r == 0) got.assign(reinterpret_cast<const char*>(slot(seq, 0)), static_cast<size_t>(n));
  }
  return rank_ == 0 ? data : got;
}

}  // namespace metronome
