// Exchanges between the ranks of one host through a shared-memory file: tensor parallel's row-parallel
// sums, the logits of every rank's vocabulary, and rank 0's calls (parallel/host.py sets it up).
//
// Why not gloo alone: a gloo collective between two processes on the 2-vCPU machine costs 300-650 µs,
// mostly in waking the process group's worker thread and being woken by it, and a decode step makes two
// per layer (docs/parallel.md). Here a rank writes its part into its own slot of the file, raises its
// sequence number, and reads the others' slots once their numbers reach the same exchange: a few cache
// lines cross between cores, and nobody else's thread is involved. vLLM's CPU backend and DeepSpeed's
// CPU inference do the same for ranks that share a host; gloo stays the group (formation, other hosts,
// anything larger than a slot).
//
// The file: a header line per rank (its sequence number, the futex word its waiters sleep on, and the
// byte count of its last part), then two buffers of `world` slots of `capacity` bytes. Exchange k uses
// buffer k % 2. Every exchange waits for every rank, so when a rank writes exchange k+1 into buffer
// (k+1) % 2, every other rank has published exchange k, which it does only after reading all of
// exchange k-1 from that buffer: two buffers are enough, and no rank ever reads a slot being written.
//
// Waiting: spin for `spin_us` (the other rank is usually a few microseconds behind), then sleep on the
// futex in slices of 50 ms; after each slice, check that the awaited rank's process still runs (a killed
// rank fails the exchange within a slice, not at the timeout) and that `timeout_s` has not passed.
// Every wait is bounded; errors are std::runtime_error (RuntimeError in Python) naming the rank.

#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace metronome {

class HostExchange {
 public:
  HostExchange() = default;
  ~HostExchange();
  HostExchange(const HostExchange&) = delete;
  HostExchange& operator=(const HostExchange&) = delete;

  // Map the file at `path` (sized by rank 0: header_bytes() + 2 * world * capacity bytes, zeroed) as rank
  // `rank` of `world`; `pids` are the ranks' process ids, for the liveness checks. Replaces any earlier
  // mapping (a group formed again starts at exchange 0 on a new file).
  void attach(const std::string& path, int64_t rank, int64_t world, int64_t capacity, const std::vector<int64_t>& pids,
              double timeout_s, double spin_us);
  void detach();
  bool attached() const { return base_ != nullptr; }
  int64_t capacity() const { return capacity_; }  // bytes each rank may send per exchange
  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }
  static int64_t header_bytes(int64_t world);

  // Every rank's `n` bytes at `mine`, in rank order, into `out` (world * n bytes).
  void all_gather(const void* mine, int64_t n, void* out);
  // out (m floats) = the sum of every rank's `chunks` parts of m floats, in rank order and each rank's
  // chunks in order, added one after another in float32 (the adds one process makes over all chunks).
  void reduce_chunks(const float* parts, int64_t chunks, int64_t m, float* out);
  // Rank 0's bytes on every rank (the other ranks pass nothing); every rank waits for every rank.
  std::string broadcast(const std::string& data);

 private:
  struct Line;  // one rank's header line
  Line* line(int64_t r) const;
  uint8_t* slot(uint64_t seq, int64_t r) const;
  // Write `n` bytes into this rank's slot of the next exchange and publish it: its sequence number.
  uint64_t publish(const void* data, int64_t n);
  // Until rank r has published exchange `seq`; returns its byte count.
  int64_t wait(int64_t r, uint64_t seq);
  [[noreturn]] void fail(int64_t r, const std::string& why) const;

  std::mutex mutex_;  // one exchange at a time; detach waits for the one in flight
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  int64_t rank_ = 0, world_ = 0, capacity_ = 0;
  std::vector<int64_t> pids_;
  double timeout_s_ = 30.0, spin_us_ = 50.0;
  uint64_t seq_ = 0;  // exchanges done since attach
};

}  // namespace metronome
