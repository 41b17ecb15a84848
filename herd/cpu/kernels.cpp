// herd's CPU matmul kernels for few-row (decode) inputs: int4 and int8 weights against int16-quantized activations;
// one-row fp32 products; the int4 stream dequantized to bf16 for prefill. Written once against simd.h's 16-lane
// vectors and built by setup.py once per instruction set (AVX512-VNNI: VPDPWSSD, int16 pairs multiplied and summed
// into int32 lanes; AVX2 + FMA: VPMADDWD + VPADDD, the same exact sums); extension.py loads the variant the CPU runs.
// kernels.py documents the layouts and holds the plain twins these are tested against.
//
// Why: torch's packed kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) read SmolLM2's weights at about
// half the memory bandwidth at batch 1. Here 16 output rows sit side by side in one 16-lane vector (one 32-bit lane
// per row), so one dot step multiplies 2 inputs of 16 rows at once and a row's sum never needs a horizontal
// reduction; each weight byte is read once, in the order it is stored. Activations are int16, not int8 as in
// llama.cpp: with int8 per 32 inputs SmolLM2's perplexity rose 2.7% (its activations have outlier channels that
// flatten the rest of their block to a few levels); int16 costs two more shifts per 64 weight bytes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "simd.h"

namespace {

using namespace simd;

// ---- threads for decode-sized work ---------------------------------------------------------------------------------
// Why not at::parallel_for: with OMP_WAIT_POLICY=PASSIVE (herd's CLI sets it) every parallel region wakes sleeping
// OpenMP threads, which cost ~25-30 us per call at 2 threads: more than a small matrix takes (SmolLM2's 576x576 int4
// wo: ~35 us on one thread). A decode step calls the kernels ~120 times, a few microseconds apart.
// How it holds up on a busy CPU: a call's work is cut into pieces that any of its threads claims (one atomic
// counter), the caller included, so a worker the OS has not run yet leaves its pieces to the others instead of
// holding the call up; a call waits only for pieces already begun. Idle workers spin kSpin for the next call of the
// same step, then sleep on a condition variable: they never hold a core they are not using for long. (The old
// pool split each call in fixed shares and spun 2 ms: at load ~7 on 2 cores decode fell to 1.4-3.1 tok/s, waiting
// on descheduled workers; 40-60 on one thread.)
constexpr auto kSpin = std::chrono::microseconds(100);
constexpr auto kWaitSpin = std::chrono::microseconds(20);     // the caller's spin on begun pieces before it yields

class WorkerPool {
 public:
  const int n_threads;                      // the caller included
  const pid_t pid = getpid();               // a forked child gets a new pool (the parent's threads are not in it)

  // Never destroyed (see parallel_rows): the workers are detached and end with the process.
  explicit WorkerPool(int n) : n_threads(n) {
    for (int t = 1; t < n; ++t) std::thread([this] { loop(); }).detach();
  }

  // f(begin, end) over [0, n) cut in `pieces` contiguous ranges, each run by whichever thread claims it first;
  // returns when all are done.
  void run(int64_t n, int64_t pieces, const std::function<void(int64_t, int64_t)>& f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) {                // another thread is using the pool: do it all here
      f(0, n);
      return;
    }
    job_.store(&f, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    pieces_.store(pieces, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t generation = (state_.load() >> 32) + 1;
    state_.store(generation << 32);         // seq_cst: publishes the job (piece 0 next); pairs with loop's sleep
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    work(generation);
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t spins = 1; done_.load() < pieces; ++spins) {     // pieces other threads began
      if (spins < 64 || std::chrono::steady_clock::now() - start < kWaitSpin) {
        _mm_pause();
      } else {
        sched_yield();                      // let a preempted worker that holds a piece have the core
      }
    }
  }

 private:
  std::atomic<uint64_t> state_{0};          // generation << 32 | the next unclaimed piece
  std::atomic<int64_t> n_{0}, pieces_{0}, done_{0};
  std::atomic<const std::function<void(int64_t, int64_t)>*> job_{nullptr};
  std::atomic<int> sleeping_{0};
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;

  // Claim and run pieces of this generation's job until none is left. A piece claimed (the CAS) belongs to the
  // current job: the next run cannot start before its done_ count, so job_, n_ and pieces_ stay this job's.
  void work(uint64_t generation) {
    uint64_t s = state_.load();
    for (;;) {
      if ((s >> 32) != generation) return;            // a later job: its own loop() pass picks it up
      const int64_t piece = static_cast<int64_t>(s & 0xFFFFFFFFu);
      if (piece >= pieces_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(s, s + 1)) continue;      // s reloaded
      const int64_t n = n_.load(std::memory_order_relaxed), pieces = pieces_.load(std::memory_order_relaxed);
      const int64_t per = (n + pieces - 1) / pieces;
      const int64_t begin = std::min(n, piece * per), end = std::min(n, begin + per);
      if (begin < end) (*job_.load(std::memory_order_relaxed))(begin, end);
      done_.fetch_add(1);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (uint32_t spins = 1; (state_.load() >> 32) == seen; ++spins) {
        _mm_pause();
        if (spins % 64 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          // Sleep. Either run() sees sleeping_ > 0 and notifies, or its state_ store came first and the predicate
          // (checked under mu_ before waiting) sees it: no wake-up is lost.
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1);
          cv_.wait(lk, [&] { return (state_.load() >> 32) != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = state_.load() >> 32;
      work(seen);
    }
  }
};

// f(begin, end) over [0, n) on torch's intra-op thread count (torch.set_num_threads) through the WorkerPool, in up
// to `per_thread` pieces per thread (so a late thread's share is taken by the others).
void parallel_rows(int64_t n, const std::function<void(int64_t, int64_t)>& f, int64_t per_thread = 4) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || n <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  static std::mutex make_mu;
  static WorkerPool* pool = nullptr;
  WorkerPool* p;
  {
    std::lock_guard<std::mutex> lk(make_mu);
    // A new pool when the thread count changes or in a forked child (whose copy of the pool has no threads). The
    // old one is not deleted: another Python thread may still be inside its run(); its workers go to sleep.
    if (pool == nullptr || pool->n_threads != threads || pool->pid != getpid()) pool = new WorkerPool(threads);
    p = pool;
  }
  p->run(n, std::min<int64_t>(n, per_thread * threads), f);
}

constexpr int kRows = 16;       // output rows per register (16 x 32-bit lanes)
constexpr int kBlock = 32;      // activation quantization block (inputs per scale)
constexpr int kMTile = 4;       // activation rows processed per pass over a row block's weights
// Software prefetch this many bytes ahead of the weight stream: measured on this machine (1 thread, 66 MB of int4
// weights, cold caches) 5.8 GB/s without it or at 512 bytes, 7.9 at 2 KB, 9.2 at 4 KB, 7.2 at 8 KB.
constexpr int kPrefetch = 4096;

// x (M, K) fp32 -> xq (M, K) int16 and one scale per 32 inputs xs (M, K/32): xq = round(x / xs),
// xs = max|x| / 32767. Within every 4 inputs xq is stored in the order k0 k2 k1 k3: the dot steps multiply int16
// pairs, and the weight bytes of 4 inputs split most cheaply into the pairs (k0, k2) and (k1, k3) (see the kernels).
// bsum (M, K/32), if given: the exact fp32 sum of each block's inputs. pair_order = false keeps xq in input order
// (the GGUF block kernels, whose weights come in input order).
void quantize_activations(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs, float* bsum = nullptr,
                          bool pair_order = true) {
  // 16 int16 (32 bytes) per half block; permute each 4 as 0 2 1 3
  const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
                                         0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float* src = x + m * K + b * kBlock;
      const f32x16 a = load(src), c = load(src + 16);
      const float amax = reduce_max(max(abs(a), abs(c)));
      const f32x16 inv = set1(amax > 0.0f ? 32767.0f / amax : 0.0f);
      __m256i ha = narrow_i16_saturate(to_i32(mul(a, inv))), hc = narrow_i16_saturate(to_i32(mul(c, inv)));
      if (pair_order) {
        ha = _mm256_shuffle_epi8(ha, order);
        hc = _mm256_shuffle_epi8(hc, order);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * kBlock), ha);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * kBlock + 16), hc);
      xs[m * (K / kBlock) + b] = amax / 32767.0f;
      if (bsum) bsum[m * (K / kBlock) + b] = reduce_add(add(a, c));
    }
  }
}

// Activation rows per work item of a product with many of them (prefill): its items are (row block, chunk of rows)
// pairs, so that pieces of work stay small where the matrix has few row blocks (SmolLM2's 576 outputs: 36) and the
// threads end together. Measured on Zen 2, 2 threads, int4 576 x 1536 at 512 rows: 6.8-7.0 -> 6.2-6.4 ms.
constexpr int64_t kRowChunk = 64;

// f(rb, m_begin, m_end) for every row block rb < n_rb and chunk [m_begin, m_end) of the M activation rows, over the
// pool, row block by row block (one pass with every row for M <= kRowChunk: decode). Pieces: 4 per thread for a
// decode-sized product, where handing out a piece costs about as much as a row block's work; 8 from 16 rows on, so
// the last piece a thread waits for is short (576 x 1536 at 16 / 32 rows: 220 / 436 -> 207 / 399 us).
void parallel_blocks(int64_t n_rb, int64_t M, const std::function<void(int64_t, int64_t, int64_t)>& f) {
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  parallel_rows(n_rb * chunks, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t rb = i / chunks, c = i % chunks;
      f(rb, c * kRowChunk, std::min(M, (c + 1) * kRowChunk));
    }
  }, M >= 16 ? 8 : 4);
}

// quantize_activations over the pool, in chunks of kRowChunk rows, for many rows; on this thread for few.
void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs, float* bsum = nullptr,
                   bool pair_order = true) {
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk, nb = K / kBlock;
  parallel_rows(chunks, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t m = c * kRowChunk, rows = std::min(kRowChunk, M - m);
      quantize_activations(x + m * K, rows, K, xq + m * K, xs + m * nb, bsum ? bsum + m * nb : nullptr, pair_order);
    }
  });
}

inline int32_t load2x16(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// An int4 stream's group header: 16 bf16 scales, then 16 bf16 zero points, or no zero points at all when every one
// is 0 (a symmetric stream: GGUF Q4_0, herd's symmetric int4). Leaving them out saves 32 of each group's 160 bytes
// per 16 rows at G = 32 (4.5 bits per weight, Q4_0's own size, instead of 5): decode reads 10% fewer bytes.
constexpr int64_t int4_header_bytes(bool zeros) { return zeros ? 64 : 32; }

// One row block (16 output rows) of the int4 product for MT activation rows starting at xq.
// Stream per group: the header (above), then G/8 chunks of 64 bytes; in chunk c, lane r holds 4 bytes,
// byte j = u[r][8c + j] | u[r][8c + 4 + j] << 4. Weight w = (u - 8) * scale + zero.
template <int MT, bool Zeros>
void int4_row_block(const uint8_t* stream, int64_t K, int64_t G, const int16_t* xq, const float* xs,
                    const float* xsum, int64_t n_groups, float* out, int64_t out_stride) {
  const i32x16 low4 = set1_i16(0x000F);
  const f32x16 eight = set1(8.0f);
  f32x16 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = zero();
  const uint8_t* p = stream;
  for (int64_t g = 0; g < n_groups; ++g) {
    const f32x16 scale = load_bf16(p), zero_point = Zeros ? load_bf16(p + 32) : zero();
    p += int4_header_bytes(Zeros);
    f32x16 gacc[MT];
    for (int i = 0; i < MT; ++i) gacc[i] = zero();
    for (int64_t b = 0; b < G / kBlock; ++b) {
      const int64_t k0 = g * G + b * kBlock;
      // independent accumulators per row (simd.h: VPDPWSSD waits on its accumulator ~5 cycles)
      constexpr int C = dot_chains<MT>();
      i32x16 iacc[MT][C];
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < C; ++j) iacc[i][j] = zero_i32();
      for (int c = 0; c < kBlock / 8; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        const i32x16 v = load_bytes(p);
        p += 64;
        // per 32-bit lane, int16 halves: bits 0-3 u[k0] / u[k2], 4-7 u[k4] / u[k6], 8-11 u[k1] / u[k3], 12-15
        // u[k5] / u[k7]; as int16 pairs (k0, k2), (k1, k3), (k4, k6), (k5, k7)
        const i32x16 u[4] = {and_bits(v, low4), and_bits(srli_i16<8>(v), low4), and_bits(srli_i16<4>(v), low4),
                             srli_i16<12>(v)};
        for (int i = 0; i < MT; ++i) {
          const int16_t* xr = xq + i * K + k0 + 8 * c;      // k0 k2 k1 k3 k4 k6 k5 k7
          for (int j = 0; j < 4; ++j) {
            i32x16& chain = iacc[i][j % C];
            chain = dot_i16(chain, u[j], set1_i32(load2x16(xr + 2 * j)));
          }
        }
      }
      for (int i = 0; i < MT; ++i) {
        i32x16 sum = iacc[i][0];
        for (int j = 1; j < C; ++j) sum = add_i32(sum, iacc[i][j]);
        gacc[i] = fmadd(to_f32(sum), set1(xs[i * (K / kBlock) + k0 / kBlock]), gacc[i]);
      }
    }
    // sum_k (u - 8) s x + z x = s * sum_k u x + (z - 8 s) * sum_k x
    const f32x16 offset = fnmadd(eight, scale, zero_point);
    for (int i = 0; i < MT; ++i) {
      acc[i] = fmadd(gacc[i], scale, acc[i]);
      acc[i] = fmadd(set1(xsum[i * n_groups + g]), offset, acc[i]);
    }
  }
  for (int i = 0; i < MT; ++i) store(out + i * out_stride, acc[i]);
}

// One row block of the int8 product. Stream: K/4 chunks of 64 bytes, lane r holding w[r][4c .. 4c + 3], split into
// sign-extended int16 pairs (k0, k2) and (k1, k3).
template <int MT>
void int8_row_block(const int8_t* stream, const float* row_scale, int64_t K, const int16_t* xq, const float* xs,
                    float* out, int64_t out_stride) {
  f32x16 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = zero();
  const int8_t* p = stream;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    constexpr int C = dot_chains<MT>();
    i32x16 iacc[MT][C];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < C; ++j) iacc[i][j] = zero_i32();
    for (int c = 0; c < kBlock / 4; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
      const i32x16 w = load_bytes(p);
      p += 64;
      const i32x16 u[2] = {srai_i16<8>(slli_i16<8>(w)), srai_i16<8>(w)};     // w02, w13
      for (int i = 0; i < MT; ++i) {
        const int16_t* xr = xq + i * K + b * kBlock + 4 * c;   // k0 k2 k1 k3
        for (int j = 0; j < 2; ++j) {
          i32x16& chain = iacc[i][j % C];
          chain = dot_i16(chain, u[j], set1_i32(load2x16(xr + 2 * j)));
        }
      }
    }
    for (int i = 0; i < MT; ++i) {
      i32x16 sum = iacc[i][0];
      for (int j = 1; j < C; ++j) sum = add_i32(sum, iacc[i][j]);
      acc[i] = fmadd(to_f32(sum), set1(xs[i * (K / kBlock) + b]), acc[i]);
    }
  }
  const f32x16 rs = load(row_scale);
  for (int i = 0; i < MT; ++i) store(out + i * out_stride, mul(acc[i], rs));
}

// ---- the products on raw pointers (decode.cpp's decode_layer calls these directly) ---------------------------------
template <bool Zeros>
void int4_tile(const uint8_t* st, int64_t mt, int64_t K, int64_t G, const int16_t* xr, const float* xsr,
               const float* xsumr, int64_t n_groups, float* orow, int64_t N) {
  switch (mt) {
    case 1: int4_row_block<1, Zeros>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
    case 2: int4_row_block<2, Zeros>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
    case 3: int4_row_block<3, Zeros>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
    default: int4_row_block<4, Zeros>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
  }
}

// x (M, K) fp32 times an int4 stream (N/16 * K/G * (header + G * 8) bytes; zeros: whether the header holds zero
// points) -> out (M, N) fp32.
void int4_mm_raw(const float* x, int64_t M, int64_t K, const uint8_t* s, int64_t N, int64_t G, bool zeros,
                 float* o) {
  const int64_t n_groups = K / G, rb_bytes = n_groups * (int4_header_bytes(zeros) + G * 8);
  // scratch on the C++ heap, not through torch's allocator: this runs ~120 times per SmolLM2 decode step
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / kBlock)), bsum(M * (K / kBlock)), xsum(M * n_groups, 0.0f);
  quantize_rows(x, M, K, xq.data(), xs.data(), bsum.data());
  for (int64_t i = 0; i < M * (K / kBlock); ++i) xsum[i / (G / kBlock)] += bsum[i];   // group sums (M, K/G)
  const int16_t* q = xq.data();
  const float *xsp = xs.data(), *xsump = xsum.data();
  parallel_blocks(N / kRows, M, [&](int64_t rb, int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; m += kMTile) {
      const int64_t mt = std::min<int64_t>(kMTile, m_end - m);
      const uint8_t* st = s + rb * rb_bytes;
      const int16_t* xr = q + m * K;
      const float* xsr = xsp + m * (K / kBlock);
      const float* xsumr = xsump + m * n_groups;
      float* orow = o + m * N + rb * kRows;
      if (zeros) {
        int4_tile<true>(st, mt, K, G, xr, xsr, xsumr, n_groups, orow, N);
      } else {
        int4_tile<false>(st, mt, K, G, xr, xsr, xsumr, n_groups, orow, N);
      }
    }
  });
}

// x (M, K) fp32 times an int8 stream (N/16 * K/4 * 64 bytes) with row scales (N,) -> out (M, N) fp32.
void int8_mm_raw(const float* x, int64_t M, int64_t K, const int8_t* s, const float* rs, int64_t N, float* o) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / kBlock));
  quantize_rows(x, M, K, xq.data(), xs.data());
  const int16_t* q = xq.data();
  const float* xsp = xs.data();
  parallel_blocks(N / kRows, M, [&](int64_t rb, int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; m += kMTile) {
      const int64_t mt = std::min<int64_t>(kMTile, m_end - m);
      const int8_t* st = s + rb * kRows * K;
      const int16_t* xr = q + m * K;
      const float* xsr = xsp + m * (K / kBlock);
      float* orow = o + m * N + rb * kRows;
      switch (mt) {
        case 1: int8_row_block<1>(st, rs + rb * kRows, K, xr, xsr, orow, N); break;
        case 2: int8_row_block<2>(st, rs + rb * kRows, K, xr, xsr, orow, N); break;
        case 3: int8_row_block<3>(st, rs + rb * kRows, K, xr, xsr, orow, N); break;
        default: int8_row_block<4>(st, rs + rb * kRows, K, xr, xsr, orow, N); break;
      }
    }
  });
}

// ---- GGUF's own blocks, read where they lie (gguf.GGUFExperts: a file's memory map) --------------------------------
// A GGUF matrix (N, K) is N rows one after another, each K/32 blocks (ggml-common.h), d and m fp16:
//   Q4_0 (18 bytes): d, 16 bytes of nibbles;  w = d * (u - 8)
//   Q4_1 (20 bytes): d, m, 16 bytes of nibbles;  w = d * u + m
//   Q8_0 (34 bytes): d, 32 int8;  w = d * q
// with byte j of the nibbles holding weight j in its low and weight j + 16 in its high nibble. Unlike the streams
// above, a row's bytes are contiguous, so each output row is one dot product: per block the 32 weights are widened to
// int16 in input order and multiplied with the (input-order) int16 activations, y += d * xs * sum(w xq), and for
// Q4_1 y += m * (the block's exact input sum), as the int4 kernel adds its zero points.
constexpr int64_t kGgmlQ4_0 = 2, kGgmlQ4_1 = 3, kGgmlQ8_0 = 8;      // gguf.GGMLQuantizationType's numbers

int64_t ggml_block_bytes(int64_t type) {
  return type == kGgmlQ4_0 ? 18 : type == kGgmlQ4_1 ? 20 : type == kGgmlQ8_0 ? 34 : 0;
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// one block's 32 weights as int16 in input order: Q4_0 u - 8, Q4_1 u (its m is added apart), Q8_0 q
template <int64_t T>
inline i32x16 block_weights(const uint8_t* blk) {
  if constexpr (T == kGgmlQ8_0) {
    return widen_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)),
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
  } else {
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == kGgmlQ4_1 ? 4 : 2)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(qs, low4), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low4);   // weights 0-15, 16-31
    if constexpr (T == kGgmlQ4_0) {
      const __m128i eight = _mm_set1_epi8(8);
      lo = _mm_sub_epi8(lo, eight);
      hi = _mm_sub_epi8(hi, eight);
    }
    return widen_i8(lo, hi);
  }
}

// One GGUF row (nb blocks of type T) times MT activation rows: out[i * out_stride] = the row's dot with row i.
template <int64_t T, int MT>
void gguf_row(const uint8_t* row, int64_t nb, const int16_t* xq, const float* xs, const float* bsum, int64_t K,
              float* out, int64_t out_stride) {
  constexpr int64_t bytes = T == kGgmlQ4_0 ? 18 : T == kGgmlQ4_1 ? 20 : 34;
  f32x16 acc[MT];
  float min_sum[MT];
  for (int i = 0; i < MT; ++i) acc[i] = zero(), min_sum[i] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * bytes;
    _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetch, _MM_HINT_T0);
    const float d = f16_at(blk);
    const i32x16 w = block_weights<T>(blk);
    for (int i = 0; i < MT; ++i) {
      const i32x16 s = dot_i16(zero_i32(), w, load_bytes(xq + i * K + b * kBlock));   // 16 pair sums
      acc[i] = fmadd(to_f32(s), set1(d * xs[i * nb + b]), acc[i]);
      if constexpr (T == kGgmlQ4_1) min_sum[i] += f16_at(blk + 2) * bsum[i * nb + b];
    }
  }
  for (int i = 0; i < MT; ++i) out[i * out_stride] = reduce_add(acc[i]) + min_sum[i];
}

template <int64_t T>
void gguf_rows(const uint8_t* w, int64_t n_begin, int64_t n_end, int64_t N, int64_t M, int64_t K,
               const int16_t* xq, const float* xs, const float* bsum, float* o) {
  const int64_t nb = K / kBlock, row_bytes = nb * ggml_block_bytes(T);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;          // read from memory by the first tile, from L1 by the others
    for (int64_t m = 0; m < M; m += kMTile) {
      const int64_t mt = std::min<int64_t>(kMTile, M - m);
      const int16_t* xr = xq + m * K;
      const float *xsr = xs + m * nb, *bsr = bsum + m * nb;
      float* orow = o + m * N + n;
      switch (mt) {
        case 1: gguf_row<T, 1>(row, nb, xr, xsr, bsr, K, orow, N); break;
        case 2: gguf_row<T, 2>(row, nb, xr, xsr, bsr, K, orow, N); break;
        case 3: gguf_row<T, 3>(row, nb, xr, xsr, bsr, K, orow, N); break;
        default: gguf_row<T, 4>(row, nb, xr, xsr, bsr, K, orow, N); break;
      }
    }
  }
}

// x (M, K) fp32 times a GGUF matrix w (N rows of K/32 blocks of `type`) -> out (M, N) fp32, rows over the pool.
void gguf_mm_raw(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t type, float* o) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / kBlock)), bsum(M * (K / kBlock));
  quantize_activations(x, M, K, xq.data(), xs.data(), bsum.data(), /*pair_order=*/false);
  const int16_t* q = xq.data();
  const float *xsp = xs.data(), *bsp = bsum.data();
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    if (type == kGgmlQ4_0) {
      gguf_rows<kGgmlQ4_0>(w, begin, end, N, M, K, q, xsp, bsp, o);
    } else if (type == kGgmlQ4_1) {
      gguf_rows<kGgmlQ4_1>(w, begin, end, N, M, K, q, xsp, bsp, o);
    } else {
      gguf_rows<kGgmlQ8_0>(w, begin, end, N, M, K, q, xsp, bsp, o);
    }
  });
}

// x (M, K) fp32 times w_t (K, N) fp32, the matrix stored transposed (decode.HerdLinear / HerdExperts) -> out (M, N).
// For decode-sized M; torch's GEMM is faster from a few tens of rows on. Each thread takes a contiguous range of
// w_t's rows (the inputs k), streams it front to back once and accumulates its partial (M, N) in a private buffer
// that stays in L1/L2; the partials are summed at the end. Why not x @ w_t: at 2 threads every torch matmul here is an
// OpenMP region (~25-30 us under PASSIVE, see the SpinPool), ~30 of them per tiny-MoE decode step.
void fp32_mm_raw(const float* xp, int64_t M, int64_t K, const float* wp, int64_t N, float* o) {
  // one share per thread, none smaller than 64 KB of weights (a wake-up costs more than streaming that)
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), K * N / 16384));
  const int64_t per = (K + shares - 1) / shares;
  std::vector<float> partial(shares * M * N, 0.0f);
  parallel_rows(shares, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* y = partial.data() + s * M * N;
      const int64_t k_end = std::min(K, (s + 1) * per);
      for (int64_t k = s * per; k < k_end; k += 4) {
        // 4 rows of w_t per pass over y: 4 sequential streams, y loaded and stored once per 4 rows
        const int64_t rows = std::min<int64_t>(4, k_end - k);
        const float* r[4];
        for (int i = 0; i < 4; ++i) r[i] = wp + (k + std::min<int64_t>(i, rows - 1)) * N;
        for (int64_t m = 0; m < M; ++m) {
          f32x16 xk[4];
          for (int i = 0; i < 4; ++i) xk[i] = set1(i < rows ? xp[m * K + k + i] : 0.0f);
          float* ym = y + m * N;
          int64_t j = 0;
          for (; j + 16 <= N; j += 16) {
            if (m == 0)
              for (int i = 0; i < 4; ++i)
                _mm_prefetch(reinterpret_cast<const char*>(r[i] + j) + kPrefetch, _MM_HINT_T0);
            f32x16 acc = fmadd(xk[0], load(r[0] + j), load(ym + j));
            acc = fmadd(xk[1], load(r[1] + j), acc);
            acc = fmadd(xk[2], load(r[2] + j), acc);
            store(ym + j, fmadd(xk[3], load(r[3] + j), acc));
          }
          for (; j < N; ++j)
            for (int i = 0; i < rows; ++i) ym[j] += xp[m * K + k + i] * r[i][j];
        }
      }
    }
  });
  std::memcpy(o, partial.data(), M * N * sizeof(float));
  for (int64_t s = 1; s < shares; ++s)
    for (int64_t i = 0; i < M * N; ++i) o[i] += partial[s * M * N + i];
}

// ---- checks of the matrices' storage, shared by the wrappers below and decode_layer ---------------------------------
void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(1) == K,
              "x must be a contiguous fp32 (M, ", K, ") tensor");
  TORCH_CHECK(K % kBlock == 0, "the input dim must be a multiple of ", kBlock);
}

// Checks an int4 stream of (N, K) in groups of G; returns whether it holds zero points (its size tells: the two
// layouts differ by 32 bytes per group and row block).
bool check_int4(const torch::Tensor& stream, int64_t K, int64_t N, int64_t G) {
  TORCH_CHECK(G > 0 && G % kBlock == 0 && K % G == 0 && N % kRows == 0 && K % kBlock == 0,
              "int4 shapes: the group size must be a multiple of ", kBlock,
              " dividing the input dim and the output dim a multiple of ", kRows, "; got input ", K, ", group ", G,
              ", output ", N);
  const int64_t groups = N / kRows * (K / G);
  const int64_t with_zeros = groups * (int4_header_bytes(true) + G * 8);
  const int64_t symmetric = groups * (int4_header_bytes(false) + G * 8);
  TORCH_CHECK(stream.scalar_type() == torch::kUInt8 && stream.is_contiguous() &&
                  (stream.numel() == with_zeros || stream.numel() == symmetric),
              "int4 stream of (", N, ", ", K, ") in groups of ", G, " must be ", with_zeros, " contiguous uint8 "
              "bytes (with zero points) or ", symmetric, " (symmetric); got ", stream.scalar_type(), " of ",
              stream.numel());
  return stream.numel() == with_zeros;
}

void check_int8(const torch::Tensor& stream, const torch::Tensor& row_scale, int64_t K) {
  const int64_t N = row_scale.numel();
  TORCH_CHECK(N % kRows == 0 && K % kBlock == 0, "int8 shapes: the output dim must be a multiple of ", kRows,
              " and the input dim of ", kBlock, "; got input ", K, ", output ", N);
  TORCH_CHECK(stream.scalar_type() == torch::kInt8 && stream.is_contiguous() && stream.numel() == N * K,
              "int8 stream has the wrong size or dtype");
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.is_contiguous(), "row_scale must be fp32");
}

void check_gguf(const torch::Tensor& w, int64_t K, int64_t N, int64_t type) {
  const int64_t bytes = ggml_block_bytes(type);
  TORCH_CHECK(bytes > 0, "gguf_mm: GGML type ", type, " is not one the kernel reads (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)");
  TORCH_CHECK(K % kBlock == 0 && N > 0, "gguf_mm: the input dim must be a multiple of ", kBlock, "; got ", K);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.numel() == N * (K / kBlock) * bytes,
              "gguf_mm: w must be the contiguous uint8 bytes of ", N, " rows of ", K / kBlock, " blocks of ", bytes,
              " bytes; got ", w.scalar_type(), " of ", w.numel(), " elements");
}

void check_fp32(const torch::Tensor& w_t, int64_t K) {
  TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == torch::kFloat32 && w_t.is_contiguous() && w_t.size(0) == K,
              "fp32_mm: w_t must be a contiguous fp32 (", K, ", N) tensor; got ", w_t.scalar_type(), " of shape ",
              w_t.sizes());
}

}  // namespace

// x (M, K) fp32, stream uint8 (N/16 * K/G * (header + G * 8)) -> (M, N) fp32.
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor stream, int64_t N, int64_t group_size) {
  const int64_t M = x.size(0), K = x.size(1);
  check_x(x, K);
  const bool zeros = check_int4(stream, K, N, group_size);
  auto out = torch::empty({M, N}, torch::kFloat32);
  int4_mm_raw(x.data_ptr<float>(), M, K, stream.data_ptr<uint8_t>(), N, group_size, zeros, out.data_ptr<float>());
  return out;
}

// x (M, K) fp32, stream int8 (N/16 * K/4 * 64), row_scale fp32 (N,) -> (M, N) fp32.
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor stream, torch::Tensor row_scale) {
  const int64_t M = x.size(0), K = x.size(1), N = row_scale.numel();
  check_x(x, K);
  check_int8(stream, row_scale, K);
  auto out = torch::empty({M, N}, torch::kFloat32);
  int8_mm_raw(x.data_ptr<float>(), M, K, stream.data_ptr<int8_t>(), row_scale.data_ptr<float>(), N,
              out.data_ptr<float>());
  return out;
}

// Rows `tokens` (n,) int64 of an int8 stream (N/16 * K/4 * 64, row scales (N,)) as fp32 (n, K): row t, input
// k = 4c + j is byte (t / 16) * 16K + 64c + 4 (t % 16) + j, times scale[t] (kernels.HerdInt8Embedding: a tied
// embedding reading the head's stream; its torch twin there). One call where the twin's ~6 torch ops cost ~70 us.
torch::Tensor int8_rows(torch::Tensor stream, torch::Tensor row_scale, torch::Tensor tokens, int64_t K) {
  check_int8(stream, row_scale, K);
  const int64_t N = row_scale.numel(), n = tokens.numel();
  TORCH_CHECK(tokens.scalar_type() == torch::kLong && tokens.is_contiguous(), "int8_rows: tokens must be a "
              "contiguous int64 tensor; got ", tokens.scalar_type());
  const int64_t* tp = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < N, "int8_rows: token ", tp[i], " is outside the ", N, " rows");
  auto out = torch::empty({n, K}, torch::kFloat32);
  const int8_t* sp = stream.data_ptr<int8_t>();
  const float* scale = row_scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tp[i];
    const int8_t* row = sp + (t / kRows) * kRows * K + 4 * (t % kRows);
    for (int64_t c = 0; c < K / 4; ++c)
      for (int j = 0; j < 4; ++j) o[i * K + 4 * c + j] = static_cast<float>(row[64 * c + j]) * scale[t];
  }
  return out;
}

// x (M, K) fp32, w uint8 (a GGUF matrix's N * K/32 blocks of the GGML type `type`) -> (M, N) fp32 (gguf_mm_raw).
torch::Tensor gguf_mm(torch::Tensor x, torch::Tensor w, int64_t N, int64_t type) {
  const int64_t M = x.size(0), K = x.size(1);
  check_x(x, K);
  check_gguf(w, K, N, type);
  auto out = torch::empty({M, N}, torch::kFloat32);
  gguf_mm_raw(x.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), N, type, out.data_ptr<float>());
  return out;
}

// x (M, K) fp32, w_t (K, N) fp32 -> (M, N) fp32 (fp32_mm_raw).
torch::Tensor fp32_mm(torch::Tensor x, torch::Tensor w_t) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "fp32_mm: x must be a contiguous fp32 (M, K) tensor; got ", x.scalar_type(), " of shape ", x.sizes());
  check_fp32(w_t, x.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w_t.size(1);
  auto out = torch::empty({M, N}, torch::kFloat32);
  fp32_mm_raw(x.data_ptr<float>(), M, K, w_t.data_ptr<float>(), N, out.data_ptr<float>());
  return out;
}

// An int4 stream (N/16 * K/G * (header + G * 8) bytes) -> the weight transposed, (K, N) bf16 or fp32 contiguous, for
// prefill's dense matmul x @ w^T (HerdInt4Linear.dequantize; its twin there runs the same steps as torch ops). Each
// 64-byte chunk holds, in lane r, 8 inputs of row r: byte j = u[k0 + j] | u[k0 + 4 + j] << 4. One nibble of every
// lane is the 16 consecutive outputs n = 16 rb .. 16 rb + 15 of one input k: one 16-value store into row k.
// w = (u - 8) * scale + zero in fp32, a multiply then an add (setup.py compiles with -ffp-contract=off: no FMA, the
// twin rounds twice), then for bf16 rounded once. Measured on SmolLM2's 66 MB of int4 matrices at 2 threads
// (AVX-512 machine): 45 ms here, 326 ms as the torch steps (~0.3 s of a 1.4 s 512-token prefill).
torch::Tensor int4_dequantize(torch::Tensor stream, int64_t N, int64_t K, int64_t G, bool to_bf16_out) {
  const bool zeros = check_int4(stream, K, N, G);
  auto out = torch::empty({K, N}, to_bf16_out ? torch::kBFloat16 : torch::kFloat32);
  const uint8_t* s = stream.data_ptr<uint8_t>();
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t header = int4_header_bytes(zeros), n_groups = K / G, rb_bytes = n_groups * (header + G * 8),
                elem = to_bf16_out ? 2 : 4;
  // torch's OpenMP threads, not the WorkerPool: this runs between prefill's torch matmuls, whose OpenMP workers a
  // spinning pool worker would compete with for the cores
  at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
    const i32x16 low4 = set1_i32(0x0F);
    const f32x16 eight = set1(8.0f);
    for (int64_t rb = begin; rb < end; ++rb) {
      const uint8_t* p = s + rb * rb_bytes;
      for (int64_t g = 0; g < n_groups; ++g) {
        const f32x16 scale = load_bf16(p), zero_point = zeros ? load_bf16(p + 32) : zero();
        p += header;
        for (int64_t c = 0; c < G / 8; ++c, p += 64) {
          const i32x16 v = load_bytes(p);
          // nibble j: byte j % 4, the high half when j >= 4
          const i32x16 nibble[8] = {v, srli_i32<8>(v), srli_i32<16>(v), srli_i32<24>(v), srli_i32<4>(v),
                                    srli_i32<12>(v), srli_i32<20>(v), srli_i32<28>(v)};
          for (int j = 0; j < 8; ++j) {
            const f32x16 w = add(mul(sub(to_f32(and_bits(nibble[j], low4)), eight), scale), zero_point);
            char* dst = o + ((g * G + 8 * c + j) * N + rb * kRows) * elem;
            if (to_bf16_out) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bf16(w));
            } else {
              store(reinterpret_cast<float*>(dst), w);
            }
          }
        }
      }
    }
  });
  return out;
}

// x (M, K) fp32 -> (xq (M, K) int16 in input order, xs (M, K/32) fp32): the activation quantization both kernels
// use, exposed so the Python twins can be checked against exactly what the kernels multiply.
std::vector<torch::Tensor> quantize_x(torch::Tensor x) {
  const int64_t M = x.size(0), K = x.size(1);
  check_x(x, K);
  auto xq = torch::empty({M, K}, torch::kInt16);
  auto xs = torch::empty({M, K / kBlock}, torch::kFloat32);
  quantize_activations(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), xs.data_ptr<float>());
  auto order = torch::tensor({0, 2, 1, 3}, torch::kLong);        // k0 k2 k1 k3 back to k0 k1 k2 k3 (self-inverse)
  return {xq.view({M, K / 4, 4}).index_select(2, order).reshape({M, K}), xs};
}
