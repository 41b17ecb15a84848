// herd's CPU matmul kernels for few-row (decode) inputs: int4 and int8 weights against int16-quantized activations,
// AVX512-VNNI (VPDPWSSD: int16 pairs multiplied and summed into int32 lanes); one-row fp32 products; the int4 stream
// dequantized to bf16 for prefill. Built at first use by kernels.py (torch.utils.cpp_extension.load_inline);
// kernels.py documents the layouts and holds the plain twins these are tested against.
//
// Why: torch's packed kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) read SmolLM2's weights at about
// half this machine's memory bandwidth at batch 1. Here 16 output rows sit side by side in one 512-bit register
// (one 32-bit lane per row), so one VPDPWSSD multiplies 2 inputs of 16 rows at once and a row's sum never needs a
// horizontal reduction; each weight byte is read once, in the order it is stored. Activations are int16, not int8
// as in llama.cpp: with int8 per 32 inputs SmolLM2's perplexity rose 2.7% (its activations have outlier channels
// that flatten the rest of their block to a few levels); int16 costs two more shifts per 64 weight bytes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// ---- threads for decode-sized work ---------------------------------------------------------------------------------
// Why not at::parallel_for: with OMP_WAIT_POLICY=PASSIVE (the bench's setting on this shared machine) every parallel
// region wakes sleeping OpenMP threads, which cost ~25-30 us per call at 2 threads here: more than a small matrix
// takes (SmolLM2's 576x576 int4 wo: 35 us on one thread, 56 us on two). A decode step calls the kernels ~120 times,
// a few tens of microseconds apart. These workers spin for kSpin after each job, so the next call of the same step
// finds them awake, and then sleep. Measured at 2 threads: that 576x576 matrix 56 -> ~37 us per call.
constexpr auto kSpin = std::chrono::milliseconds(2);

class SpinPool {
 public:
  const int n_threads;                      // the caller included
  const pid_t pid = getpid();               // a forked child gets a new pool (the parent's threads are not in it)

  // Never destroyed (see parallel_rows): the workers are detached and end with the process.
  explicit SpinPool(int n) : n_threads(n) {
    for (int t = 1; t < n; ++t) std::thread([this, t] { loop(t); }).detach();
  }

  // f(begin, end) over [0, n) split in n_threads contiguous ranges; returns when all are done.
  void run(int64_t n, const std::function<void(int64_t, int64_t)>& f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) {                // another thread is using the pool: do it all here
      f(0, n);
      return;
    }
    job_ = &f;
    job_n_ = n;
    pending_.store(n_threads - 1);
    generation_.fetch_add(1);               // seq_cst: publishes the job; pairs with the sleepers' check (loop)
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    run_share(0);
    while (pending_.load() > 0) _mm_pause();
  }

 private:
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0}, sleeping_{0};
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;

  void run_share(int t) {
    const int64_t per = (job_n_ + n_threads - 1) / n_threads;
    const int64_t begin = std::min(job_n_, t * per), end = std::min(job_n_, begin + per);
    if (begin < end) (*job_)(begin, end);
  }

  void loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (uint32_t spins = 1; generation_.load() == seen; ++spins) {
        _mm_pause();
        if (spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          // Sleep. Either run() sees sleeping_ > 0 and notifies, or its generation_ increment came first and the
          // predicate (checked under mu_ before waiting) sees it: no wake-up is lost.
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1);
          cv_.wait(lk, [&] { return generation_.load() != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      run_share(t);
      pending_.fetch_sub(1);
    }
  }
};

// f(begin, end) over [0, n) on torch's intra-op thread count (torch.set_num_threads) through the SpinPool.
void parallel_rows(int64_t n, const std::function<void(int64_t, int64_t)>& f) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || n <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  static std::mutex make_mu;
  static SpinPool* pool = nullptr;
  SpinPool* p;
  {
    std::lock_guard<std::mutex> lk(make_mu);
    // A new pool when the thread count changes or in a forked child (whose copy of the pool has no threads). The
    // old one is not deleted: another Python thread may still be inside its run(); its workers go to sleep.
    if (pool == nullptr || pool->n_threads != threads || pool->pid != getpid()) pool = new SpinPool(threads);
    p = pool;
  }
  p->run(n, f);
}

constexpr int kRows = 16;       // output rows per register (16 x 32-bit lanes)
constexpr int kBlock = 32;      // activation quantization block (inputs per scale)
constexpr int kMTile = 4;       // activation rows processed per pass over a row block's weights
// Software prefetch this many bytes ahead of the weight stream: measured on this machine (1 thread, 66 MB of int4
// weights, cold caches) 5.8 GB/s without it or at 512 bytes, 7.9 at 2 KB, 9.2 at 4 KB, 7.2 at 8 KB.
constexpr int kPrefetch = 4096;

// x (M, K) fp32 -> xq (M, K) int16 and one scale per 32 inputs xs (M, K/32): xq = round(x / xs),
// xs = max|x| / 32767. Within every 4 inputs xq is stored in the order k0 k2 k1 k3: VPDPWSSD multiplies int16 pairs,
// and the weight bytes of 4 inputs split most cheaply into the pairs (k0, k2) and (k1, k3) (see the kernels).
// bsum (M, K/32), if given: the exact fp32 sum of each block's inputs.
void quantize_activations(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs, float* bsum = nullptr) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  // 16 int16 (32 bytes) per half block; permute each 4 as 0 2 1 3
  const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
                                         0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float* src = x + m * K + b * kBlock;
      __m512 a = _mm512_loadu_ps(src), c = _mm512_loadu_ps(src + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, c)));
      __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
      __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));     // round to nearest even (default MXCSR)
      __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, inv));
      __m256i ha = _mm256_shuffle_epi8(_mm512_cvtsepi32_epi16(qa), order);
      __m256i hc = _mm256_shuffle_epi8(_mm512_cvtsepi32_epi16(qc), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * kBlock), ha);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * kBlock + 16), hc);
      xs[m * (K / kBlock) + b] = amax / 32767.0f;
      if (bsum) bsum[m * (K / kBlock) + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
    }
  }
}

inline int32_t load2x16(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m512 bf16x16_to_fp32(const void* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One row block (16 output rows) of the int4 product for MT activation rows starting at xq.
// Stream per group: 16 scales + 16 zeros (bf16, 64 bytes), then G/8 chunks of 64 bytes; in chunk c, lane r holds
// 4 bytes, byte j = u[r][8c + j] | u[r][8c + 4 + j] << 4. Weight w = (u - 8) * scale + zero.
template <int MT>
void int4_row_block(const uint8_t* stream, int64_t K, int64_t G, const int16_t* xq, const float* xs,
                    const float* xsum, int64_t n_groups, float* out, int64_t out_stride) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i low8 = _mm512_set1_epi16(0x00FF);
  const __m512 eight = _mm512_set1_ps(8.0f);
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* p = stream;
  for (int64_t g = 0; g < n_groups; ++g) {
    __m512 scale = bf16x16_to_fp32(p), zero = bf16x16_to_fp32(p + 32);
    p += 64;
    __m512 gacc[MT];
    for (int i = 0; i < MT; ++i) gacc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < G / kBlock; ++b) {
      const int64_t k0 = g * G + b * kBlock;
      // four independent accumulators per row: one VPDPWSSD chain would wait ~5 cycles per instruction
      __m512i iacc[MT][4];
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < 4; ++j) iacc[i][j] = _mm512_setzero_si512();
      for (int c = 0; c < kBlock / 8; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        __m512i v = _mm512_loadu_si512(p);
        p += 64;
        // per 32-bit lane: lo = bytes u[k0..k3], hi = bytes u[k4..k7]; as int16 pairs (k0, k2), (k1, k3), ...
        __m512i lo = _mm512_and_si512(v, low4);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        __m512i u02 = _mm512_and_si512(lo, low8), u13 = _mm512_srli_epi16(lo, 8);
        __m512i u46 = _mm512_and_si512(hi, low8), u57 = _mm512_srli_epi16(hi, 8);
        for (int i = 0; i < MT; ++i) {
          const int16_t* xr = xq + i * K + k0 + 8 * c;      // k0 k2 k1 k3 k4 k6 k5 k7
          iacc[i][0] = _mm512_dpwssd_epi32(iacc[i][0], u02, _mm512_set1_epi32(load2x16(xr)));
          iacc[i][1] = _mm512_dpwssd_epi32(iacc[i][1], u13, _mm512_set1_epi32(load2x16(xr + 2)));
          iacc[i][2] = _mm512_dpwssd_epi32(iacc[i][2], u46, _mm512_set1_epi32(load2x16(xr + 4)));
          iacc[i][3] = _mm512_dpwssd_epi32(iacc[i][3], u57, _mm512_set1_epi32(load2x16(xr + 6)));
        }
      }
      for (int i = 0; i < MT; ++i) {
        __m512i sum = _mm512_add_epi32(_mm512_add_epi32(iacc[i][0], iacc[i][1]), _mm512_add_epi32(iacc[i][2], iacc[i][3]));
        gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xs[i * (K / kBlock) + k0 / kBlock]), gacc[i]);
      }
    }
    // sum_k (u - 8) s x + z x = s * sum_k u x + (z - 8 s) * sum_k x
    __m512 offset = _mm512_fnmadd_ps(eight, scale, zero);
    for (int i = 0; i < MT; ++i) {
      acc[i] = _mm512_fmadd_ps(gacc[i], scale, acc[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[i * n_groups + g]), offset, acc[i]);
    }
  }
  for (int i = 0; i < MT; ++i) _mm512_storeu_ps(out + i * out_stride, acc[i]);
}

// One row block of the int8 product. Stream: K/4 chunks of 64 bytes, lane r holding w[r][4c .. 4c + 3], split into
// sign-extended int16 pairs (k0, k2) and (k1, k3).
template <int MT>
void int8_row_block(const int8_t* stream, const float* row_scale, int64_t K, const int16_t* xq, const float* xs,
                    float* out, int64_t out_stride) {
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  const int8_t* p = stream;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512i iacc[MT][2];                                    // two independent VPDPWSSD chains per row
    for (int i = 0; i < MT; ++i) iacc[i][0] = iacc[i][1] = _mm512_setzero_si512();
    for (int c = 0; c < kBlock / 4; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
      __m512i w = _mm512_loadu_si512(p);
      p += 64;
      __m512i w02 = _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8), w13 = _mm512_srai_epi16(w, 8);
      for (int i = 0; i < MT; ++i) {
        const int16_t* xr = xq + i * K + b * kBlock + 4 * c;   // k0 k2 k1 k3
        iacc[i][0] = _mm512_dpwssd_epi32(iacc[i][0], w02, _mm512_set1_epi32(load2x16(xr)));
        iacc[i][1] = _mm512_dpwssd_epi32(iacc[i][1], w13, _mm512_set1_epi32(load2x16(xr + 2)));
      }
    }
    for (int i = 0; i < MT; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(iacc[i][0], iacc[i][1])),
                               _mm512_set1_ps(xs[i * (K / kBlock) + b]), acc[i]);
  }
  __m512 rs = _mm512_loadu_ps(row_scale);
  for (int i = 0; i < MT; ++i) _mm512_storeu_ps(out + i * out_stride, _mm512_mul_ps(acc[i], rs));
}

// ---- the products on raw pointers (decode.cpp's decode_layer calls these directly) ---------------------------------
// x (M, K) fp32 times an int4 stream (N/16 * K/G * (64 + G * 8) bytes) -> out (M, N) fp32.
void int4_mm_raw(const float* x, int64_t M, int64_t K, const uint8_t* s, int64_t N, int64_t G, float* o) {
  const int64_t n_groups = K / G, rb_bytes = n_groups * (64 + G * 8);
  // scratch on the C++ heap, not through torch's allocator: this runs ~120 times per SmolLM2 decode step
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / kBlock)), bsum(M * (K / kBlock)), xsum(M * n_groups, 0.0f);
  quantize_activations(x, M, K, xq.data(), xs.data(), bsum.data());
  for (int64_t i = 0; i < M * (K / kBlock); ++i) xsum[i / (G / kBlock)] += bsum[i];   // group sums (M, K/G)
  const int16_t* q = xq.data();
  const float *xsp = xs.data(), *xsump = xsum.data();
  parallel_rows(N / kRows, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb) {
      for (int64_t m = 0; m < M; m += kMTile) {
        const int64_t mt = std::min<int64_t>(kMTile, M - m);
        const uint8_t* st = s + rb * rb_bytes;
        const int16_t* xr = q + m * K;
        const float* xsr = xsp + m * (K / kBlock);
        const float* xsumr = xsump + m * n_groups;
        float* orow = o + m * N + rb * kRows;
        switch (mt) {
          case 1: int4_row_block<1>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
          case 2: int4_row_block<2>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
          case 3: int4_row_block<3>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
          default: int4_row_block<4>(st, K, G, xr, xsr, xsumr, n_groups, orow, N); break;
        }
      }
    }
  });
}

// x (M, K) fp32 times an int8 stream (N/16 * K/4 * 64 bytes) with row scales (N,) -> out (M, N) fp32.
void int8_mm_raw(const float* x, int64_t M, int64_t K, const int8_t* s, const float* rs, int64_t N, float* o) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / kBlock));
  quantize_activations(x, M, K, xq.data(), xs.data());
  const int16_t* q = xq.data();
  const float* xsp = xs.data();
  parallel_rows(N / kRows, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb) {
      for (int64_t m = 0; m < M; m += kMTile) {
        const int64_t mt = std::min<int64_t>(kMTile, M - m);
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
          __m512 xk[4];
          for (int i = 0; i < 4; ++i) xk[i] = _mm512_set1_ps(i < rows ? xp[m * K + k + i] : 0.0f);
          float* ym = y + m * N;
          int64_t j = 0;
          for (; j + 16 <= N; j += 16) {
            if (m == 0)
              for (int i = 0; i < 4; ++i)
                _mm_prefetch(reinterpret_cast<const char*>(r[i] + j) + kPrefetch, _MM_HINT_T0);
            __m512 acc = _mm512_fmadd_ps(xk[0], _mm512_loadu_ps(r[0] + j), _mm512_loadu_ps(ym + j));
            acc = _mm512_fmadd_ps(xk[1], _mm512_loadu_ps(r[1] + j), acc);
            acc = _mm512_fmadd_ps(xk[2], _mm512_loadu_ps(r[2] + j), acc);
            _mm512_storeu_ps(ym + j, _mm512_fmadd_ps(xk[3], _mm512_loadu_ps(r[3] + j), acc));
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

void check_int4(const torch::Tensor& stream, int64_t K, int64_t N, int64_t G) {
  TORCH_CHECK(G > 0 && G % kBlock == 0 && K % G == 0 && N % kRows == 0 && K % kBlock == 0,
              "int4 shapes: the group size must be a multiple of ", kBlock,
              " dividing the input dim and the output dim a multiple of ", kRows, "; got input ", K, ", group ", G,
              ", output ", N);
  TORCH_CHECK(stream.scalar_type() == torch::kUInt8 && stream.is_contiguous() &&
                  stream.numel() == N / kRows * (K / G) * (64 + G * 8),
              "int4 stream has the wrong size or dtype");
}

void check_int8(const torch::Tensor& stream, const torch::Tensor& row_scale, int64_t K) {
  const int64_t N = row_scale.numel();
  TORCH_CHECK(N % kRows == 0 && K % kBlock == 0, "int8 shapes: the output dim must be a multiple of ", kRows,
              " and the input dim of ", kBlock, "; got input ", K, ", output ", N);
  TORCH_CHECK(stream.scalar_type() == torch::kInt8 && stream.is_contiguous() && stream.numel() == N * K,
              "int8 stream has the wrong size or dtype");
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.is_contiguous(), "row_scale must be fp32");
}

void check_fp32(const torch::Tensor& w_t, int64_t K) {
  TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == torch::kFloat32 && w_t.is_contiguous() && w_t.size(0) == K,
              "fp32_mm: w_t must be a contiguous fp32 (", K, ", N) tensor; got ", w_t.scalar_type(), " of shape ",
              w_t.sizes());
}

}  // namespace

// x (M, K) fp32, stream uint8 (N/16 * K/G * (64 + G * 8)) -> (M, N) fp32.
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor stream, int64_t N, int64_t group_size) {
  const int64_t M = x.size(0), K = x.size(1);
  check_x(x, K);
  check_int4(stream, K, N, group_size);
  auto out = torch::empty({M, N}, torch::kFloat32);
  int4_mm_raw(x.data_ptr<float>(), M, K, stream.data_ptr<uint8_t>(), N, group_size, out.data_ptr<float>());
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

// An int4 stream (N/16 * K/G * (64 + G * 8) bytes) -> the weight transposed, (K, N) bf16 contiguous, for prefill's
// dense matmul x @ w^T (HerdInt4Linear.dequantize; its twin there runs the same steps as torch ops). Each 64-byte
// chunk holds, in lane r, 8 inputs of row r: byte j = u[k0 + j] | u[k0 + 4 + j] << 4. One nibble of every lane is
// the 16 consecutive outputs n = 16 rb .. 16 rb + 15 of one input k: one 32-byte bf16 store into row k.
// w = (u - 8) * scale + zero in fp32, a multiply then an add (no FMA: the twin rounds twice), rounded once to bf16.
// Measured on SmolLM2's 66 MB of int4 matrices at 2 threads: 45 ms here, 326 ms as the torch steps (~0.3 s of a
// 1.4 s 512-token prefill).
namespace {

// 16 finite floats -> bf16, rounded to nearest even as torch's .to(bfloat16) (without AVX512-BF16, which the
// kernels do not require): add 0x7FFF plus the lowest kept bit, keep the high 16 bits.
inline __m256i fp32x16_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

}  // namespace

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
torch::Tensor int4_dequantize(torch::Tensor stream, int64_t N, int64_t K, int64_t G) {
  check_int4(stream, K, N, G);
  auto out = torch::empty({K, N}, torch::kBFloat16);
  const uint8_t* s = stream.data_ptr<uint8_t>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t n_groups = K / G, rb_bytes = n_groups * (64 + G * 8);
  // torch's OpenMP threads, not the SpinPool: this runs between prefill's torch matmuls, whose OpenMP workers a
  // spinning pool worker would compete with for the cores
  at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t rb = begin; rb < end; ++rb) {
      const uint8_t* p = s + rb * rb_bytes;
      for (int64_t g = 0; g < n_groups; ++g) {
        const __m512 scale = bf16x16_to_fp32(p), zero = bf16x16_to_fp32(p + 32);
        p += 64;
        for (int64_t c = 0; c < G / 8; ++c, p += 64) {
          const __m512i v = _mm512_loadu_si512(p);
          for (int j = 0; j < 8; ++j) {            // nibble j: byte j % 4, high half when j >= 4
            const int shift = 8 * (j % 4) + 4 * (j / 4);
            const __m512i u = _mm512_and_si512(_mm512_srli_epi32(v, shift), low4);
            const __m512 w = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(u), eight), scale), zero);
            const int64_t k = g * G + 8 * c + j;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k * N + rb * kRows), fp32x16_to_bf16(w));
          }
        }
      }
    }
  });
  return out;
}
#pragma GCC pop_options

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
