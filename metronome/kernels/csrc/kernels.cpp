// metronome's fused CPU kernels for the decode step (AVX-512, x86-64).
//
// Determinism contract: every output row is produced by one fixed code path with a fixed reduction
// order that depends only on that row's own shape (its length D, K, or attention span), never on the
// batch size, on other rows, or on how work is split between threads. Rows (or (row, head) pairs, or
// output columns) are the unit of parallel work: each is computed entirely by one thread.
//
// Numerics: all math in float32, inputs widened exactly (bf16 -> f32, int8 * fp16 scale -> f32), results
// rounded once to the output dtype with round-to-nearest-even (torch's rule). Built without -ffast-math
// and with -ffp-contract=off, so the only fused multiply-adds are the explicit ones below (in
// reductions); elementwise formulas are evaluated in the same order as the pure-torch reference
// (metronome/kernels.py, TorchOps).
//
// Python binding: a plain pybind11 module (functions take and return torch.Tensor).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__) || !defined(__F16C__)
#error "metronome kernels need an x86-64 CPU with AVX-512 F/BW/VL/VNNI and F16C (built with -march=native)"
#endif

namespace {

using at::BFloat16;
using at::Tensor;

// ---------------------------------------------------------------------------------------------------
// Loads and stores of 16 lanes, widened to / rounded from float32.

inline __mmask16 tail_mask(int64_t n) {  // lanes [0, n), n in [0, 16]
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 does).
inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  r = _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0x7FC0), r);
  return _mm512_cvtepi32_epi16(r);
}
// The float32 value a bf16 store of v would hold (round, then widen back).
inline __m512 round_like(__m512 v, const BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}
inline __m512 round_like(__m512 v, const float*) { return v; }

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

// Horizontal sum of 16 lanes in a fixed tree order (8+8, 4+4, 2+2, 1+1).
inline float hsum(__m512 v) {
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// e^x for 16 lanes: x = n*ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation
// error < 6e-9 relative), scaled by 2^n. About 1 ulp. Overflows to +inf, underflows to 0, keeps NaN.
inline __m512 vexp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);  // operand order keeps a NaN x (min/max return the 2nd)
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 high part (exact n*hi)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);  // ln2 low part
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---------------------------------------------------------------------------------------------------
// The kernels' own thread pool. Not OpenMP: libgomp keeps one worker team per calling thread and, as
// soon as its threads outnumber the cores (a server's engine thread next to the main thread's team),
// stops spinning and puts workers to sleep after every parallel region; a decode step has ~150 regions,
// so each paid a futex wake-up (measured: a step took 9.6 ms from a second thread vs 4.0 ms from the
// main thread). These workers spin for a while after each job (a step's ops follow each other within
// microseconds), then sleep until the next job; any thread may submit, one job at a time.
//
// parallel_for(begin, end, grain, f) splits [begin, end) into at most `threads` contiguous chunks of at
// least `grain` items; chunk 0 runs on the caller. Which thread runs which chunk never changes results:
// every kernel here is row-independent.

class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  int64_t threads() {
    if (threads_ == 0) resize(std::max(1, at::get_num_threads()));
    return threads_;
  }

  void resize(int64_t n) {
    std::lock_guard<std::mutex> job(job_mutex_);
    n = std::max<int64_t>(1, n);
    if (n == threads_) return;
    stop_workers();
    threads_ = n;
    for (int64_t id = 1; id < n; ++id) workers_.emplace_back([this, id] { work(id); });
  }

  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t tasks = std::min<int64_t>(threads(), (n + std::max<int64_t>(1, grain) - 1) / std::max<int64_t>(1, grain));
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

  ~Pool() { stop_workers(); }

 private:
  static constexpr int64_t kSpins = 1 << 20;  // ~0.5 ms of pause instructions before sleeping

  void work(int64_t id) {
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

  void stop_workers() {
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

thread_local bool Pool::in_worker_ = false;

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  Pool::get().parallel_for(begin, end, grain, f);
}

void set_threads(int64_t n) {
  TORCH_CHECK(n >= 1, "set_threads: need at least 1 thread, got ", n);
  Pool::get().resize(n);
}

// ---------------------------------------------------------------------------------------------------
// Argument checks (messages name the op and the offending argument).

void check_float_dtype(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", arg,
              " must be float32 or bfloat16, got ", t.scalar_type());
}
void check_cpu(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
}

// Rows of work per parallel task so that a task holds at least ~`min_elems` elements: small calls stay
// on the calling thread (thread hand-off costs more than they do). Grain never changes results.
int64_t grain_for(int64_t elems_per_unit, int64_t min_elems) {
  return std::max<int64_t>(1, min_elems / std::max<int64_t>(1, elems_per_unit));
}

constexpr int64_t kMinParallelElems = 1 << 15;

Tensor weight_f32(const Tensor& w) { return w.scalar_type() == at::kFloat ? w.contiguous() : w.to(at::kFloat).contiguous(); }

// ---------------------------------------------------------------------------------------------------
// RMSNorm: y = (x * (1 / sqrt(mean(x^2) + eps))) * w.
// Sum of squares: four 16-lane accumulators over 64-element steps, then 16-element steps into the
// first, the masked tail into the second, combined (a0 + a1) + (a2 + a3) and summed in a fixed tree.

template <typename T>
float sum_squares(const T* x, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= D; i += 64) {
    __m512 v0 = load16(x + i), v1 = load16(x + i + 16), v2 = load16(x + i + 32), v3 = load16(x + i + 48);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
    a2 = _mm512_fmadd_ps(v2, v2, a2);
    a3 = _mm512_fmadd_ps(v3, v3, a3);
  }
  for (; i + 16 <= D; i += 16) {
    __m512 v = load16(x + i);
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  if (i < D) {
    __m512 v = load16(x + i, tail_mask(D - i));
    a1 = _mm512_fmadd_ps(v, v, a1);
  }
  return hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename T>
void scale_row(const T* x, const float* w, float rstd, T* y, int64_t D) {
  const __m512 r = _mm512_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i), r), load16(w + i)));
  if (i < D) {
    __mmask16 m = tail_mask(D - i);
    store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i, m), r), load16(w + i, m)), m);
  }
}

inline float rstd_of(float sum_sq, int64_t D, float eps) { return 1.0f / std::sqrt(sum_sq / static_cast<float>(D) + eps); }

template <typename T>
void rms_norm_rows(const T* x, const float* w, T* y, int64_t rows, int64_t D, float eps) {
  parallel_for(0, rows, grain_for(D, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) scale_row(x + r * D, w, rstd_of(sum_squares(x + r * D, D), D, eps), y + r * D, D);
  });
}

// new_residual = x + residual (rounded to T); y = rms_norm(new_residual).
template <typename T>
void add_rms_norm_rows(const T* x, const T* res, const float* w, T* y, T* new_res, int64_t rows, int64_t D, float eps) {
  parallel_for(0, rows, grain_for(D, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * D;
      const T* rr = res + r * D;
      T* nr = new_res + r * D;
      int64_t i = 0;
      for (; i + 16 <= D; i += 16) store16(nr + i, _mm512_add_ps(load16(xr + i), load16(rr + i)));
      if (i < D) {
        __mmask16 m = tail_mask(D - i);
        store16(nr + i, _mm512_add_ps(load16(xr + i, m), load16(rr + i, m)), m);
      }
      scale_row(nr, w, rstd_of(sum_squares(nr, D), D, eps), y + r * D, D);
    }
  });
}

Tensor rms_norm(const Tensor& x_in, const Tensor& weight, double eps) {
  check_cpu("rms_norm", "x", x_in);
  check_cpu("rms_norm", "weight", weight);
  check_float_dtype("rms_norm", "x", x_in);
  check_float_dtype("rms_norm", "weight", weight);
  TORCH_CHECK(x_in.dim() >= 1, "rms_norm: x must have at least one dimension");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "rms_norm: weight must have shape (", D, ",), got ", weight.sizes());
  Tensor x = x_in.contiguous();
  Tensor w = weight_f32(weight);
  Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, static_cast<float>(eps));
  else
    rms_norm_rows(x.data_ptr<BFloat16>(), w.data_ptr<float>(), y.data_ptr<BFloat16>(), rows, D, static_cast<float>(eps));
  return y;
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x_in, const Tensor& res_in, const Tensor& weight, double eps) {
  check_cpu("add_rms_norm", "x", x_in);
  check_cpu("add_rms_norm", "residual", res_in);
  check_cpu("add_rms_norm", "weight", weight);
  check_float_dtype("add_rms_norm", "x", x_in);
  check_float_dtype("add_rms_norm", "weight", weight);
  TORCH_CHECK(res_in.sizes() == x_in.sizes(), "add_rms_norm: residual shape ", res_in.sizes(), " must equal x's ", x_in.sizes());
  TORCH_CHECK(res_in.scalar_type() == x_in.scalar_type(), "add_rms_norm: residual dtype ", res_in.scalar_type(),
              " must equal x's ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, "add_rms_norm: x must have at least one dimension");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "add_rms_norm: weight must have shape (", D, ",), got ", weight.sizes());
  Tensor x = x_in.contiguous(), res = res_in.contiguous();
  Tensor w = weight_f32(weight);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor nr = at::empty(x.sizes(), x.options());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_rows(x.data_ptr<float>(), res.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(),
                      nr.data_ptr<float>(), rows, D, e);
  else
    add_rms_norm_rows(x.data_ptr<BFloat16>(), res.data_ptr<BFloat16>(), w.data_ptr<float>(), y.data_ptr<BFloat16>(),
                      nr.data_ptr<BFloat16>(), rows, D, e);
  return {y, nr};
}

// ---------------------------------------------------------------------------------------------------
// Rotate-half RoPE: out = x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1] (two products, one sum,
// each rounded: the reference's order). cos/sin rows (Dh,) are shared by the H heads of a (b, t).

// One head's row; y may be x (each step reads its two inputs before writing them).
template <typename T>
inline void rope_row(const T* xr, const float* c, const float* s, T* yr, int64_t Dh) {
  const int64_t half = Dh / 2;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    __m512 x1 = load16(xr + i, m), x2 = load16(xr + half + i, m);
    __m512 lo_out = _mm512_add_ps(_mm512_mul_ps(x1, load16(c + i, m)), _mm512_mul_ps(_mm512_xor_ps(x2, sign), load16(s + i, m)));
    __m512 hi_out = _mm512_add_ps(_mm512_mul_ps(x2, load16(c + half + i, m)), _mm512_mul_ps(x1, load16(s + half + i, m)));
    store16(yr + i, lo_out, m);
    store16(yr + half + i, hi_out, m);
  }
}

template <typename T>
void rope_rows(const T* x, const float* cs, const float* sn, T* y, int64_t BT, int64_t H, int64_t Dh) {
  parallel_for(0, BT * H, grain_for(Dh, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) rope_row(x + r * Dh, cs + (r / H) * Dh, sn + (r / H) * Dh, y + r * Dh, Dh);
  });
}

Tensor rope(const Tensor& x_in, const Tensor& cos_in, const Tensor& sin_in) {
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"x", &x_in}, {"cos", &cos_in}, {"sin", &sin_in}}) {
    check_cpu("rope", name, *t);
    check_float_dtype("rope", name, *t);
  }
  TORCH_CHECK(x_in.dim() == 4, "rope: x must be (B, T, H, Dh), got shape ", x_in.sizes());
  const int64_t B = x_in.size(0), T = x_in.size(1), H = x_in.size(2), Dh = x_in.size(3);
  TORCH_CHECK(Dh % 2 == 0, "rope: head dim ", Dh, " must be even");
  TORCH_CHECK(cos_in.dim() == 3 && cos_in.size(0) == B && cos_in.size(1) == T && cos_in.size(2) == Dh,
              "rope: cos must be (B, T, Dh) = (", B, ", ", T, ", ", Dh, "), got ", cos_in.sizes());
  TORCH_CHECK(sin_in.sizes() == cos_in.sizes(), "rope: sin shape ", sin_in.sizes(), " must equal cos's ", cos_in.sizes());
  Tensor x = x_in.contiguous();
  Tensor c = weight_f32(cos_in), s = weight_f32(sin_in);
  Tensor y = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat)
    rope_rows(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<float>(), B * T, H, Dh);
  else
    rope_rows(x.data_ptr<BFloat16>(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<BFloat16>(), B * T, H, Dh);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Gated activations: out = act(gate) * up, gate = row[:F], up = row[F:].
// silu(g) = g / (1 + e^-g)   (torch's formula)
// gelu_tanh(g) = 0.5*g*(1 + tanh(u)), u = sqrt(2/pi)*(g + 0.044715*g^3), evaluated as the identical
//   g / (1 + e^(-2u)), which has no cancellation for negative g (torch's 1 + tanh(u) loses digits there).

template <bool kGelu, typename T>
void gated_rows(const T* x, T* y, int64_t rows, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 kappa = _mm512_set1_ps(0.044715f);
  const __m512 m2beta = _mm512_set1_ps(-2.0f * 0.7978845608028654f);  // -2*sqrt(2/pi)
  auto act = [&](__m512 g) {
    __m512 arg;
    if constexpr (kGelu) {
      __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
      arg = _mm512_mul_ps(m2beta, _mm512_add_ps(g, _mm512_mul_ps(kappa, g3)));
    } else {
      arg = _mm512_xor_ps(g, _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u))));
    }
    return _mm512_div_ps(g, _mm512_add_ps(one, vexp(arg)));
  };
  parallel_for(0, rows, grain_for(F, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* g = x + r * 2 * F;
      const T* u = g + F;
      T* o = y + r * F;
      int64_t i = 0;
      for (; i + 16 <= F; i += 16) store16(o + i, _mm512_mul_ps(act(load16(g + i)), load16(u + i)));
      if (i < F) {
        __mmask16 m = tail_mask(F - i);
        store16(o + i, _mm512_mul_ps(act(load16(g + i, m)), load16(u + i, m)), m);
      }
    }
  });
}

template <bool kGelu>
Tensor gated(const char* op, const Tensor& x_in) {
  check_cpu(op, "gate_up", x_in);
  check_float_dtype(op, "gate_up", x_in);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, op, ": gate_up's last dimension must be even (gate then up), got shape ",
              x_in.sizes());
  Tensor x = x_in.contiguous();
  const int64_t F = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  Tensor y = at::empty(sizes, x.options());
  const int64_t rows = F == 0 ? 0 : x.numel() / (2 * F);
  if (x.scalar_type() == at::kFloat)
    gated_rows<kGelu>(x.data_ptr<float>(), y.data_ptr<float>(), rows, F);
  else
    gated_rows<kGelu>(x.data_ptr<BFloat16>(), y.data_ptr<BFloat16>(), rows, F);
  return y;
}

Tensor silu_mul(const Tensor& x) { return gated<false>("silu_mul", x); }
Tensor gelu_tanh_mul(const Tensor& x) { return gated<true>("gelu_tanh_mul", x); }

// ---------------------------------------------------------------------------------------------------
// Decode attention: one query per (row b, head h) over key positions [first, end) of cache slot
// slots[b]. Per (b, h), three passes in key order: scores s_j = (q . k_j) * scale (16-lane FMA chain over
// Dh, fixed-tree lane sum), p_j = e^(s_j - max), sum of p_j (16-lane accumulator, fixed-tree lane sum),
// then out = (sum_j p_j v_j) / sum, accumulated over j in order. Everything depends only on this row's
// span; an empty span gives zeros.
//
// The query heads that share a kv head (GQA) are processed together, up to 4 at a time, so each key and
// value row is loaded and widened once for all of them; each head still runs exactly the sequence of
// operations above, so its result does not depend on which heads it was grouped with. The unit of
// parallel work is (row, kv head, group of <= 4 heads).

constexpr int kMaxGroup = 4;

template <typename TC, int NG>
void attend_group(const float* qf, float* of, const TC* kb, const TC* vb, int64_t kstride, int64_t vstride, int64_t L,
                  int64_t Dh, float scale, std::vector<float>& scores) {
  const int64_t nchunks = Dh / 16;
  scores.resize(static_cast<size_t>(NG * L));
  float mx[NG];
  for (int g = 0; g < NG; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    const TC* k = kb + j * kstride;
    __m512 acc[NG];
    const __m512 k0 = load16(k);
    for (int g = 0; g < NG; ++g) acc[g] = _mm512_mul_ps(_mm512_loadu_ps(qf + g * Dh), k0);
    for (int64_t c = 1; c < nchunks; ++c) {
      const __m512 kc = load16(k + c * 16);
      for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * Dh + c * 16), kc, acc[g]);
    }
    for (int g = 0; g < NG; ++g) {
      const float sj = hsum(acc[g]) * scale;
      scores[g * L + j] = sj;
      mx[g] = sj > mx[g] ? sj : mx[g];
    }
  }
  __m512 denom[NG];
  for (int g = 0; g < NG; ++g) {
    float* sg = scores.data() + g * L;
    const __m512 vmax = _mm512_set1_ps(mx[g]);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 m = tail_mask(L - j);
      __m512 p = _mm512_maskz_mov_ps(m, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + j), vmax)));
      _mm512_mask_storeu_ps(sg + j, m, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    denom[g] = _mm512_set1_ps(hsum(vsum));
  }
  // Output in groups of up to 4 chunks (64 dims): NG x 4 accumulators in registers.
  for (int64_t c0 = 0; c0 < nchunks; c0 += 4) {
    const int64_t nc = std::min<int64_t>(4, nchunks - c0);
    __m512 a[NG][4];
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = _mm512_setzero_ps();
    const TC* v = vb + c0 * 16;
    for (int64_t j = 0; j < L; ++j, v += vstride) {
      __m512 vc[4];
      for (int c = 0; c < 4; ++c) vc[c] = c < nc ? load16(v + c * 16) : _mm512_setzero_ps();
      for (int g = 0; g < NG; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * L + j]);
        for (int c = 0; c < 4; ++c)
          if (c < nc) a[g][c] = _mm512_fmadd_ps(p, vc[c], a[g][c]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < nc; ++c) _mm512_storeu_ps(of + g * Dh + (c0 + c) * 16, _mm512_div_ps(a[g][c], denom[g]));
  }
}

template <typename TQ, typename TC>
void attention_rows(const TQ* q, TQ* out, const TC* kc, const TC* vc, const int64_t* ks, const int64_t* vs,
                    const int64_t* slots, const int64_t* ends, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                    int64_t window, float scale, int64_t total_keys) {
  const int64_t group = H / Hkv;
  const int64_t ngroups = (group + kMaxGroup - 1) / kMaxGroup;
  const int64_t units = B * Hkv * ngroups;
  const int64_t unit_work = std::max<int64_t>(1, total_keys / std::max<int64_t>(1, B)) * Dh * 2 * std::min<int64_t>(group, kMaxGroup);
  parallel_for(0, units, grain_for(unit_work, 4 * kMinParallelElems), [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(kMaxGroup * Dh), of(kMaxGroup * Dh), scores;
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t b = u / (Hkv * ngroups), kvh = (u / ngroups) % Hkv, gi = u % ngroups;
      const int64_t h0 = kvh * group + gi * kMaxGroup;
      const int64_t ng = std::min<int64_t>(kMaxGroup, group - gi * kMaxGroup);
      const int64_t end = ends[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const int64_t L = end - first;
      TQ* o = out + (b * H + h0) * Dh;
      if (L <= 0) {
        for (int64_t i = 0; i < ng * Dh; i += 16) store16(o + i, _mm512_setzero_ps());
        continue;
      }
      const TQ* qg = q + (b * H + h0) * Dh;
      for (int64_t i = 0; i < ng * Dh; i += 16) _mm512_storeu_ps(qf.data() + i, load16(qg + i));
      const TC* kb = kc + slots[b] * ks[0] + kvh * ks[1] + first * ks[2];
      const TC* vb = vc + slots[b] * vs[0] + kvh * vs[1] + first * vs[2];
      switch (ng) {
        case 1: attend_group<TC, 1>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
        case 2: attend_group<TC, 2>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
        case 3: attend_group<TC, 3>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
        default: attend_group<TC, 4>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
      }
      for (int64_t i = 0; i < ng * Dh; i += 16) store16(o + i, _mm512_loadu_ps(of.data() + i));
    }
  });
}

Tensor decode_attention(const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots_in,
                        const Tensor& ends_in, int64_t window, double scale) {
  const char* op = "decode_attention";
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q_in}, {"k_cache", &k_cache}, {"v_cache", &v_cache},
                         {"slots", &slots_in}, {"ends", &ends_in}})
    check_cpu(op, name, *t);
  check_float_dtype(op, "q", q_in);
  check_float_dtype(op, "k_cache", k_cache);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache dtype ", v_cache.scalar_type(),
              " must equal k_cache's ", k_cache.scalar_type());
  TORCH_CHECK(q_in.dim() == 3, op, ": q must be (B, H, Dh), got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (slots, kv_heads, ctx, Dh), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(), " must equal k_cache's ",
              k_cache.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), Dh = q_in.size(2);
  const int64_t S = k_cache.size(0), Hkv = k_cache.size(1), C = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == Dh, op, ": cache head dim ", k_cache.size(3), " must equal q's ", Dh);
  TORCH_CHECK(Dh > 0 && Dh % 16 == 0, op, ": head dim must be a positive multiple of 16, got ", Dh);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": query heads ", H, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op, ": caches must be contiguous along the head dim");
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no window), got ", window);
  TORCH_CHECK(slots_in.scalar_type() == at::kLong && ends_in.scalar_type() == at::kLong, op,
              ": slots and ends must be int64, got ", slots_in.scalar_type(), " and ", ends_in.scalar_type());
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.size(0) == B && ends_in.dim() == 1 && ends_in.size(0) == B, op,
              ": slots and ends must have shape (", B, ",), got ", slots_in.sizes(), " and ", ends_in.sizes());
  Tensor slots = slots_in.contiguous(), ends = ends_in.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* ep = ends.data_ptr<int64_t>();
  int64_t total_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S, op, ": slots[", b, "] = ", sp[b], " is out of range [0, ", S, ")");
    TORCH_CHECK(ep[b] >= 0 && ep[b] <= C, op, ": ends[", b, "] = ", ep[b], " is out of range [0, ", C, "]");
    total_keys += window > 0 ? std::min(ep[b], window) : ep[b];
  }
  Tensor q = q_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  const int64_t ks[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t vs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const float sc = static_cast<float>(scale);
  const bool q32 = q.scalar_type() == at::kFloat, c32 = k_cache.scalar_type() == at::kFloat;
#define METRONOME_ATTN(TQ, TC)                                                                                        \
  attention_rows<TQ, TC>(q.data_ptr<TQ>(), out.data_ptr<TQ>(), k_cache.data_ptr<TC>(), v_cache.data_ptr<TC>(), ks, vs, \
                         sp, ep, B, H, Hkv, Dh, window, sc, total_keys)
  if (q32 && c32) METRONOME_ATTN(float, float);
  else if (q32) METRONOME_ATTN(float, BFloat16);
  else if (c32) METRONOME_ATTN(BFloat16, float);
  else METRONOME_ATTN(BFloat16, BFloat16);
#undef METRONOME_ATTN
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Q8_0 linear: y[m, n] = sum_k w[n, k] * x[m, k] with w = d * q (GGUF Q8_0: per 32 weights an fp16 d then
// 32 int8 q). q * d is exact in float32 (8-bit times 11-bit significands), so each block widens to the
// exact dequantized weights; the dot product is then an ordinary float32 one: per (m, n) one 16-lane
// accumulator, FMA over blocks in order (low 16 then high 16 weights), fixed-tree lane sum. Every
// (m, n) follows that order whatever the tile it sits in, so the result is independent of M and of the
// split over threads. Output columns are the unit of parallel work.

constexpr int64_t kQ8Block = 32;
constexpr int64_t kQ8Bytes = 34;

inline void q8_block(const uint8_t* p, __m512& w0, __m512& w1) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)))), d);
  w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18)))), d);
}

// NT output columns x MT rows of x, starting at column n0 and row m0.
// A tile reads NT short rows (K/32*34 bytes each) side by side: too short for the hardware prefetcher
// to follow, so each block step prefetches its share of the bytes kQ8PrefetchRows rows further on
// (the matrix is read front to back, tile after tile).
constexpr int64_t kQ8PrefetchRows = 8;

template <int NT, int MT>
void q8_tile(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[NT][MT];
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) acc[n][m] = _mm512_setzero_ps();
  const int64_t nblocks = K / kQ8Block;
  const char* pf = reinterpret_cast<const char*>(wq + (n0 + kQ8PrefetchRows) * row_bytes);
  for (int64_t b = 0; b < nblocks; ++b) {
    const char* p = pf + b * NT * kQ8Bytes;  // NT*34 bytes per step cover the NT rows over the K/32 steps
    _mm_prefetch(p, _MM_HINT_T0);
    if constexpr (NT * kQ8Bytes > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
    if constexpr (NT * kQ8Bytes > 128) _mm_prefetch(p + 128, _MM_HINT_T0);
    __m512 w[NT][2];
    for (int n = 0; n < NT; ++n) q8_block(wq + (n0 + n) * row_bytes + b * kQ8Bytes, w[n][0], w[n][1]);
    for (int m = 0; m < MT; ++m) {
      const float* xr = xf + (m0 + m) * K + b * kQ8Block;
      const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
      for (int n = 0; n < NT; ++n) {
        acc[n][m] = _mm512_fmadd_ps(w[n][0], x0, acc[n][m]);
        acc[n][m] = _mm512_fmadd_ps(w[n][1], x1, acc[n][m]);
      }
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n0 + n] = hsum(acc[n][m]);
}

template <int MT>
void q8_columns(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N, int64_t n_lo,
                int64_t n_hi, int64_t m0) {
  constexpr int NT = MT <= 4 ? 4 : 2;  // NT * MT accumulators + 2 * NT weights fit the 32 registers
  int64_t n = n_lo;
  for (; n + NT <= n_hi; n += NT) q8_tile<NT, MT>(wq, row_bytes, xf, K, y, N, n, m0);
  for (; n < n_hi; ++n) q8_tile<1, MT>(wq, row_bytes, xf, K, y, N, n, m0);
}

void q8_columns_any(int64_t mt, const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N,
                    int64_t n_lo, int64_t n_hi, int64_t m0) {
  switch (mt) {
    case 1: q8_columns<1>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 2: q8_columns<2>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 3: q8_columns<3>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 4: q8_columns<4>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 5: q8_columns<5>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 6: q8_columns<6>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 7: q8_columns<7>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    default: q8_columns<8>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Q4 linear on packed weights. GGUF Q4_0 / Q4_1 blocks (32 weights, w = d*q + m with q in [0, 16);
// Q4_0's m = -8d) are repacked once, at compile time (quant.py, pack_q4), four output rows side by side:
// per group of 4 rows and per block, 80 bytes = 8 fp16 (d0..d3, m0..m3) then each row's 16 code bytes
// (byte j: weight j in the low nibble, weight j+16 in the high one). A thread's rows are then one
// sequential stream.
//
// x is quantized per block of 32 to int8 (dx = max|x| / 127, x8 = round(x / dx)), as llama.cpp does,
// and sx = dx * sum_j x8_j, the sum of the quantized x (the exact float sum would pair a quantized q-term
// with an exact m-term: the errors then no longer cancel and grow ~4x). For row n and block b:
//   sum_j w_j x_j ~= sum_j (d q_j + m) dx x8_j = d * dx * sum_j q_j x8_j + m * sx
// One 512-bit VNNI multiply-add covers 4 rows x 16 weights: lane 4r+i holds row r's products for
// weights 4i..4i+3 (low nibbles against x8[0..16), then high nibbles against x8[16..32)). Per block
// the 16 int32 lanes are scaled (d_r * dx) into a float accumulator, m_r * sx lands in lane 4r; at the
// end row r = (l0 + l1) + (l2 + l3) of its four lanes. The order depends only on (row, block): the same
// whatever M, the tile or the thread split.

enum BlockKind : int64_t { kQ8_0 = 0, kQ4x4 = 1 };

constexpr int64_t kQ4Block = 32;
constexpr int64_t kQ4x4Bytes = 80;  // per 4 rows x 1 block

// x (M, K) -> x8 (M, K) int8, dx and sx (M, K/32).
void quantize_blocks(const float* x, int64_t M, int64_t K, int8_t* x8, float* dx, float* sx) {
  const int64_t nb = K / kQ4Block;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < M * nb; ++i) {
    const __m512 v0 = _mm512_loadu_ps(x + i * 32), v1 = _mm512_loadu_ps(x + i * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, sign), _mm512_and_ps(v1, sign)));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 s = _mm512_set1_ps(id);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, s)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x8 + i * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x8 + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    dx[i] = amax / 127.0f;
    sx[i] = dx[i] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));  // exact integer sum
  }
}

// 4 output rows (one packed group, starting at row n0) x MT rows of x (from m0).
template <int MT>
void q4x4_tile(const uint8_t* w, int64_t nb, const int8_t* x8, const float* dx, const float* sx, int64_t K, float* y,
               int64_t N, int64_t n0, int64_t m0) {
  const __m512i idx_d = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i idx_m = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kQ4x4Bytes;
    const __m512 dm = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 dv = _mm512_permutexvar_ps(idx_d, dm);
    const __m512 mv = _mm512_maskz_permutexvar_ps(0x1111, idx_m, dm);  // m_r in lane 4r only
    const __m512i q = _mm512_loadu_si512(p + 16);
    const __m512i lo = _mm512_and_si512(q, low4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
    for (int m = 0; m < MT; ++m) {
      const int64_t row = (m0 + m);
      const int8_t* xb = x8 + row * K + b * kQ4Block;
      const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
      const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)));
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx[row * nb + b])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[row * nb + b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(64) float l[16];
    _mm512_store_ps(l, acc[m]);
    for (int r = 0; r < 4 && n0 + r < N; ++r) y[(m0 + m) * N + n0 + r] = (l[4 * r] + l[4 * r + 1]) + (l[4 * r + 2] + l[4 * r + 3]);
  }
}

void q4x4_rows(int64_t mt, const uint8_t* w, int64_t nb, const int8_t* x8, const float* dx, const float* sx, int64_t K,
               float* y, int64_t N, int64_t n0, int64_t m0) {
  switch (mt) {
    case 1: q4x4_tile<1>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 2: q4x4_tile<2>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 3: q4x4_tile<3>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 4: q4x4_tile<4>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 5: q4x4_tile<5>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 6: q4x4_tile<6>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 7: q4x4_tile<7>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    default: q4x4_tile<8>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
  }
}

// A matrix for block_linear_rows: GGUF Q8_0 rows (N, K/32*34) or packed Q4 groups (ceil(N/4), K/32*80).
struct BlockMatrix {
  const uint8_t* w;
  int64_t kind, N, K;
  const float* bias;
};

// Scratch a matmul needs for M rows of input (bytes): the int8 copy of x, dx and sx.
int64_t scratch_bytes(int64_t M, int64_t K) { return M * K + 2 * M * (K / kQ4Block) * static_cast<int64_t>(sizeof(float)); }

// y (M, N) = x (M, K) @ W.T (+ bias), float32. Output columns in fixed chunks of 16 (4 groups of 4) are
// the unit of parallel work; a thread walks its columns once per block of 64 rows of x, so its share
// of W and that block of x stay in L2.
void block_linear_rows(const BlockMatrix& W, const float* x, int64_t M, float* y, uint8_t* scratch) {
  const int64_t nb = W.K / kQ4Block;
  int8_t* x8 = reinterpret_cast<int8_t*>(scratch);
  float* dx = reinterpret_cast<float*>(scratch + ((M * W.K + 63) / 64) * 64);
  float* sx = dx + M * nb;
  if (W.kind == kQ4x4) quantize_blocks(x, M, W.K, x8, dx, sx);
  constexpr int64_t kChunk = 16, kRowBlock = 64;
  const int64_t nchunks = (W.N + kChunk - 1) / kChunk;
  parallel_for(0, nchunks, grain_for(kChunk * W.K * std::max<int64_t>(M, 1), 1 << 16), [&](int64_t lo, int64_t hi) {
    const int64_t n_lo = lo * kChunk, n_hi = std::min(W.N, hi * kChunk);
    for (int64_t mb = 0; mb < M; mb += kRowBlock) {
      const int64_t mb_hi = std::min(M, mb + kRowBlock);
      if (W.kind == kQ8_0) {
        const int64_t row_bytes = nb * kQ8Bytes;
        for (int64_t m0 = mb; m0 < mb_hi; m0 += 8) q8_columns_any(std::min<int64_t>(8, mb_hi - m0), W.w, row_bytes, x, W.K, y, W.N, n_lo, n_hi, m0);
      } else {
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += 4)
          for (int64_t m0 = mb; m0 < mb_hi; m0 += 8)
            q4x4_rows(std::min<int64_t>(8, mb_hi - m0), W.w + (n0 / 4) * nb * kQ4x4Bytes, nb, x8, dx, sx, W.K, y, W.N, n0, m0);
      }
    }
    if (W.bias != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n_lo; n < n_hi; ++n) y[m * W.N + n] += W.bias[n];
  });
}

// w: Q8_0 rows (N, K/32*34), or packed Q4 groups (ceil(N/4), K/32*80) with `rows` = N.
BlockMatrix check_blocks(const char* op, const Tensor& w, int64_t kind, int64_t rows, int64_t K, const Tensor* bias) {
  check_cpu(op, "w", w);
  TORCH_CHECK(kind == kQ8_0 || kind == kQ4x4, op, ": kind must be 0 (Q8_0 rows) or 1 (packed Q4), got ", kind);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), op,
              ": w must be a contiguous 2-D uint8 tensor of blocks, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(K > 0 && K % kQ4Block == 0, op, ": K = ", K, " must be a positive multiple of 32 (the block size)");
  const int64_t N = kind == kQ8_0 ? w.size(0) : rows;
  const int64_t want_rows = kind == kQ8_0 ? N : (N + 3) / 4;
  const int64_t want_bytes = K / kQ4Block * (kind == kQ8_0 ? kQ8Bytes : kQ4x4Bytes);
  TORCH_CHECK(w.size(0) == want_rows && w.size(1) == want_bytes, op, ": w must have ", want_bytes, " bytes per row for K = ",
              K, " (", want_rows, " rows for N = ", N, "), got ", w.sizes());
  const float* b = nullptr;
  if (bias != nullptr && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), op,
                ": bias must be a contiguous float32 (", N, ",) tensor, got ", bias->scalar_type(), " ", bias->sizes());
    b = bias->data_ptr<float>();
  }
  return BlockMatrix{w.data_ptr<uint8_t>(), kind, N, K, b};
}

Tensor block_linear(const Tensor& x_in, const Tensor& w, int64_t kind, int64_t rows, const std::optional<Tensor>& bias) {
  const char* op = "block_linear";
  check_cpu(op, "x", x_in);
  check_float_dtype(op, "x", x_in);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (M, K), got shape ", x_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const BlockMatrix W = check_blocks(op, w, kind, rows, K, bias.has_value() ? &*bias : nullptr);
  Tensor x = weight_f32(x_in);
  Tensor y = at::empty({M, W.N}, x.options());
  std::vector<uint8_t> scratch(static_cast<size_t>(scratch_bytes(M, K) + 64));
  block_linear_rows(W, x.data_ptr<float>(), M, y.data_ptr<float>(), scratch.data());
  return y;
}

// ---------------------------------------------------------------------------------------------------
// The fused decoder: every transformer layer of a plan in one call, for M token rows.
//
// Row r is one token: its cache slot, its position p; it writes its key/value at p and attends over
// [first, p] of its slot (first from the layer's window). All rows' keys and values are written before
// any row attends, so rows of one slot at consecutive positions (a prompt, or a drafted continuation
// being verified) see each other causally. Every op is row-independent (see above), so a row's result
// never depends on the other rows: prefill, decode and verification are the same computation.
//
// Per layer (the model's Block, model.py):
//   h = norm(x); q,k,v = h @ Wqkv (+b); [q,k = per-head norm]; rope; cache <- k,v; a = attend(q);
//   o = a @ Wo; [o = post_norm(o)]; x += o; h = norm(x); g = act(h @ Wgu); d = g @ Wdown;
//   [d = post_norm(d)]; x += d
// Activations and the residual stream are float32 throughout; the cache keeps its own dtype.

struct DecoderLayer {
  BlockMatrix qkv, o, gate_up, down;
  Tensor attn_norm, mlp_norm, post_attn_norm, post_mlp_norm, q_norm, k_norm;  // float32; the last four optional
  std::vector<Tensor> keep;  // the weight tensors, held alive
  int64_t window;  // 0: global attention
  bool local_rope;  // use the local (sliding-window) RoPE table
};

class Decoder {
 public:
  Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
          double scale, bool gelu, Tensor k_cache, Tensor v_cache)
      : D_(hidden), H_(heads), Hkv_(kv_heads), Dh_(head_dim), F_(intermediate), eps_(static_cast<float>(eps)),
        scale_(static_cast<float>(scale)), gelu_(gelu), kc_(std::move(k_cache)), vc_(std::move(v_cache)) {
    const char* op = "Decoder";
    TORCH_CHECK(kc_.dim() == 5 && kc_.sizes() == vc_.sizes() && kc_.scalar_type() == vc_.scalar_type(), op,
                ": k_cache and v_cache must be equal (layers, slots, kv_heads, ctx, head_dim) tensors, got ", kc_.sizes(),
                " and ", vc_.sizes());
    check_float_dtype(op, "k_cache", kc_);
    TORCH_CHECK(kc_.is_contiguous() && vc_.is_contiguous(), op, ": caches must be contiguous");
    TORCH_CHECK(kc_.size(2) == Hkv_ && kc_.size(4) == Dh_, op, ": cache shape ", kc_.sizes(), " does not match kv_heads ",
                Hkv_, " and head_dim ", Dh_);
    TORCH_CHECK(Dh_ % 16 == 0 && H_ % Hkv_ == 0, op, ": head_dim must be a multiple of 16 and heads a multiple of kv_heads");
  }

  void add_layer(const Tensor& qkv, int64_t qkv_kind, const std::optional<Tensor>& qkv_bias, const Tensor& o, int64_t o_kind,
                 const Tensor& gate_up, int64_t gate_up_kind, const Tensor& down, int64_t down_kind, const Tensor& attn_norm,
                 const Tensor& mlp_norm, const std::optional<Tensor>& post_attn_norm, const std::optional<Tensor>& post_mlp_norm,
                 const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm, int64_t window, bool local_rope) {
    const char* op = "Decoder.add_layer";
    TORCH_CHECK(static_cast<int64_t>(layers_.size()) < kc_.size(0), op, ": the cache holds ", kc_.size(0), " layers");
    DecoderLayer L;
    L.qkv = check_blocks(op, qkv, qkv_kind, (H_ + 2 * Hkv_) * Dh_, D_, qkv_bias.has_value() ? &*qkv_bias : nullptr);
    L.o = check_blocks(op, o, o_kind, D_, H_ * Dh_, nullptr);
    L.gate_up = check_blocks(op, gate_up, gate_up_kind, 2 * F_, D_, nullptr);
    L.down = check_blocks(op, down, down_kind, D_, F_, nullptr);
    TORCH_CHECK(L.qkv.N == (H_ + 2 * Hkv_) * Dh_ && L.o.N == D_ && L.gate_up.N == 2 * F_ && L.down.N == D_, op,
                ": matrix shapes do not match the decoder's dimensions");
    auto norm = [&](const Tensor& t, int64_t n, const char* name) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous(), op, ": ", name,
                  " must be a contiguous float32 (", n, ",) tensor");
      return t;
    };
    L.attn_norm = norm(attn_norm, D_, "attn_norm");
    L.mlp_norm = norm(mlp_norm, D_, "mlp_norm");
    if (post_attn_norm) L.post_attn_norm = norm(*post_attn_norm, D_, "post_attn_norm");
    if (post_mlp_norm) L.post_mlp_norm = norm(*post_mlp_norm, D_, "post_mlp_norm");
    if (q_norm) L.q_norm = norm(*q_norm, Dh_, "q_norm");
    if (k_norm) L.k_norm = norm(*k_norm, Dh_, "k_norm");
    L.keep = {qkv, o, gate_up, down};
    if (qkv_bias) L.keep.push_back(*qkv_bias);
    L.window = window;
    L.local_rope = local_rope;
    layers_.push_back(std::move(L));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (M, D) float32, updated in place; slots, positions (M,) int64; cos/sin (M, Dh) float32 per row for
  // the global layers, cos_local/sin_local for the sliding-window ones.
  void forward(const Tensor& x, const Tensor& slots, const Tensor& positions, const Tensor& cos, const Tensor& sin,
               const Tensor& cos_local, const Tensor& sin_local) {
    const char* op = "Decoder.forward";
    TORCH_CHECK(num_layers() == kc_.size(0), op, ": ", num_layers(), " layers added, the cache holds ", kc_.size(0));
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == D_ && x.is_contiguous(), op,
                ": x must be a contiguous float32 (M, ", D_, ") tensor, got ", x.scalar_type(), " ", x.sizes());
    const int64_t M = x.size(0);
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"slots", &slots}, {"positions", &positions}})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == M && t->is_contiguous(), op, ": ", name,
                  " must be a contiguous int64 (", M, ",) tensor");
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"cos", &cos}, {"sin", &sin}, {"cos_local", &cos_local},
                           {"sin_local", &sin_local}})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == M && t->size(1) == Dh_ && t->is_contiguous(),
                  op, ": ", name, " must be a contiguous float32 (", M, ", ", Dh_, ") tensor");
    const int64_t S = kc_.size(1), C = kc_.size(3);
    const int64_t* sp = slots.data_ptr<int64_t>();
    const int64_t* pp = positions.data_ptr<int64_t>();
    std::vector<int64_t> ends(static_cast<size_t>(M));
    for (int64_t r = 0; r < M; ++r) {
      TORCH_CHECK(sp[r] >= 0 && sp[r] < S, op, ": slots[", r, "] = ", sp[r], " is out of range [0, ", S, ")");
      TORCH_CHECK(pp[r] >= 0 && pp[r] < C, op, ": positions[", r, "] = ", pp[r], " is out of range [0, ", C, ")");
      ends[r] = pp[r] + 1;
    }
    if (M == 0) return;
    if (kc_.scalar_type() == at::kFloat) run<float>(x.data_ptr<float>(), M, sp, pp, ends.data(), cos, sin, cos_local, sin_local);
    else run<BFloat16>(x.data_ptr<float>(), M, sp, pp, ends.data(), cos, sin, cos_local, sin_local);
  }

 private:
  template <typename TC>
  void run(float* x, int64_t M, const int64_t* sp, const int64_t* pp, const int64_t* ends, const Tensor& cos,
           const Tensor& sin, const Tensor& cos_local, const Tensor& sin_local) {
    const int64_t Q = H_ * Dh_, KV = Hkv_ * Dh_, QKV = Q + 2 * KV;
    // Scratch for M rows, reused by every layer (grown, never shrunk).
    const int64_t widest = std::max({QKV, 2 * F_, D_});
    const int64_t floats = M * (D_ + QKV + 2 * Q + 3 * F_ + D_);
    const int64_t need = floats * 4 + scratch_bytes(M, std::max(D_, F_)) + 64;
    if (scratch_.numel() < need) scratch_ = at::empty({need}, at::kByte);
    float* h = reinterpret_cast<float*>(scratch_.data_ptr<uint8_t>());  // (M, D) normed input of a matmul
    float* qkv = h + M * D_;                 // (M, QKV)
    float* qb = qkv + M * QKV;               // (M, H, Dh) queries, contiguous for the attention kernel
    float* att = qb + M * Q;                 // (M, H, Dh) attention output
    float* gu = att + M * Q;                 // (M, 2F)
    float* act = gu + M * 2 * F_;            // (M, F)
    float* out = act + M * F_;               // (M, D) a sublayer's output
    uint8_t* sx = reinterpret_cast<uint8_t*>(out + M * D_);  // a matmul's quantized input
    const int64_t ks[3] = {kc_.stride(1), kc_.stride(2), kc_.stride(3)};
    int64_t total_keys = 0;
    for (int64_t r = 0; r < M; ++r) total_keys += ends[r];
    const int64_t grain = grain_for(D_, kMinParallelElems);
    for (int64_t l = 0; l < num_layers(); ++l) {
      const DecoderLayer& L = layers_[l];
      const float* cs = (L.local_rope ? cos_local : cos).data_ptr<float>();
      const float* sn = (L.local_rope ? sin_local : sin).data_ptr<float>();
      TC* kc = kc_.data_ptr<TC>() + l * kc_.stride(0);
      TC* vc = vc_.data_ptr<TC>() + l * vc_.stride(0);
      rms_norm_rows(x, L.attn_norm.data_ptr<float>(), h, M, D_, eps_);
      block_linear_rows(L.qkv, h, M, qkv, sx);
      parallel_for(0, M, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          float* qr = qkv + r * QKV;
          float* kr = qr + Q;
          const float* vr = kr + KV;
          if (L.q_norm.defined()) {
            for (int64_t i = 0; i < H_; ++i) scale_row(qr + i * Dh_, L.q_norm.data_ptr<float>(), rstd_of(sum_squares(qr + i * Dh_, Dh_), Dh_, eps_), qr + i * Dh_, Dh_);
            for (int64_t i = 0; i < Hkv_; ++i) scale_row(kr + i * Dh_, L.k_norm.data_ptr<float>(), rstd_of(sum_squares(kr + i * Dh_, Dh_), Dh_, eps_), kr + i * Dh_, Dh_);
          }
          for (int64_t i = 0; i < H_; ++i) rope_row(qr + i * Dh_, cs + r * Dh_, sn + r * Dh_, qr + i * Dh_, Dh_);
          for (int64_t i = 0; i < Hkv_; ++i) {
            rope_row(kr + i * Dh_, cs + r * Dh_, sn + r * Dh_, kr + i * Dh_, Dh_);
            TC* kd = kc + sp[r] * ks[0] + i * ks[1] + pp[r] * ks[2];
            TC* vd = vc + sp[r] * ks[0] + i * ks[1] + pp[r] * ks[2];
            for (int64_t j = 0; j < Dh_; j += 16) {
              store16(kd + j, _mm512_loadu_ps(kr + i * Dh_ + j));
              store16(vd + j, _mm512_loadu_ps(vr + i * Dh_ + j));
            }
          }
          std::memcpy(qb + r * Q, qr, static_cast<size_t>(Q) * sizeof(float));
        }
      });
      attention_rows<float, TC>(qb, att, kc, vc, ks, ks, sp, ends, M, H_, Hkv_, Dh_, L.window, scale_, total_keys);
      block_linear_rows(L.o, att, M, out, sx);
      residual_add(x, out, M, L.post_attn_norm);
      rms_norm_rows(x, L.mlp_norm.data_ptr<float>(), h, M, D_, eps_);
      block_linear_rows(L.gate_up, h, M, gu, sx);
      if (gelu_) gated_rows<true>(gu, act, M, F_);
      else gated_rows<false>(gu, act, M, F_);
      block_linear_rows(L.down, act, M, out, sx);
      residual_add(x, out, M, L.post_mlp_norm);
    }
  }

  // x += post_norm ? norm(y) : y
  void residual_add(float* x, float* y, int64_t M, const Tensor& post_norm) {
    if (post_norm.defined()) rms_norm_rows(y, post_norm.data_ptr<float>(), y, M, D_, eps_);
    parallel_for(0, M, grain_for(D_, kMinParallelElems), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        float* xr = x + r * D_;
        const float* yr = y + r * D_;
        int64_t i = 0;
        for (; i + 16 <= D_; i += 16) _mm512_storeu_ps(xr + i, _mm512_add_ps(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(yr + i)));
        if (i < D_) {
          const __mmask16 m = tail_mask(D_ - i);
          _mm512_mask_storeu_ps(xr + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, xr + i), _mm512_maskz_loadu_ps(m, yr + i)));
        }
      }
    });
  }

  int64_t D_, H_, Hkv_, Dh_, F_;
  float eps_, scale_;
  bool gelu_;
  Tensor kc_, vc_;
  std::vector<DecoderLayer> layers_;
  Tensor scratch_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metronome's fused, row-independent CPU kernels (AVX-512)";
  m.def("rms_norm", &rms_norm, "y = x * rsqrt(mean(x^2) + eps) * weight, f32 math", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "(rms_norm(x + residual), x + residual)", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("rope", &rope, "rotate-half RoPE of (B, T, H, Dh) with cos/sin (B, T, Dh)", py::arg("x"), py::arg("cos"), py::arg("sin"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up for gate_up = [gate, up] along the last dim", py::arg("gate_up"));
  m.def("gelu_tanh_mul", &gelu_tanh_mul, "gelu_tanh(gate) * up for gate_up = [gate, up]", py::arg("gate_up"));
  m.def("decode_attention", &decode_attention, "one-query attention per (row, head) over its own cache span",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("ends"), py::arg("window"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("set_threads", &set_threads, "threads of the kernels' own pool (default: torch's thread count at first use)",
        py::arg("n"));
  m.def("block_linear", &block_linear, "y = x @ W.T (+ bias) in f32, W as Q8_0 rows (kind 0) or packed Q4 (kind 1) of `rows` rows",
        py::arg("x"), py::arg("w"), py::arg("kind"), py::arg("rows"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  py::class_<Decoder>(m, "Decoder", "every layer of a plan, fused: forward(x, slots, positions, cos, sin, cos_local, sin_local)")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool, Tensor, Tensor>(), py::arg("hidden"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"), py::arg("eps"),
           py::arg("scale"), py::arg("gelu"), py::arg("k_cache"), py::arg("v_cache"))
      .def("add_layer", &Decoder::add_layer, py::arg("qkv"), py::arg("qkv_kind"), py::arg("qkv_bias"), py::arg("o"),
           py::arg("o_kind"), py::arg("gate_up"), py::arg("gate_up_kind"), py::arg("down"), py::arg("down_kind"),
           py::arg("attn_norm"), py::arg("mlp_norm"), py::arg("post_attn_norm"), py::arg("post_mlp_norm"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("window"), py::arg("local_rope"))
      .def_property_readonly("num_layers", &Decoder::num_layers)
      .def("forward", &Decoder::forward, py::arg("x"), py::arg("slots"), py::arg("positions"), py::arg("cos"), py::arg("sin"),
           py::arg("cos_local"), py::arg("sin_local"), py::call_guard<py::gil_scoped_release>());
}
