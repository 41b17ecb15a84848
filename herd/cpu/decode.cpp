// The small steps between a decode step's matmuls, in C++: RMSNorm, q/k/v post-processing (rotary, QK-norm,
// attention temperature), one query's attention over the KV cache, SiLU gating and whole dense layers. Built with
// kernels.cpp into one extension (bindings.cpp); kernels.cpp comes first, and its matmuls, parallel_rows and simd.h's
// vectors serve here too. decode.py holds the modules that call these and the plain twins they are tested against.
//
// Why: at batch 1 each of these is a handful of torch ops on a few hundred numbers, and each op costs a few
// microseconds of dispatch whatever its size. SmolLM2's decode step ran ~60 such ops per layer (~9 ms of ~22 ms at
// 1 thread); torch's fused RMSNorm alone took ~25 us per call on a 576-vector (it runs as several ops on CPU).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

inline f32x16 load16(const float* p) { return load(p); }
inline f32x16 load16(const at::BFloat16* p) { return load_bf16(p); }
inline f32x16 load16(const at::Half* p) { return load_f16(p); }

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(at::Half x) { return static_cast<float>(x); }

// sum of x[i]^2, i < n
inline float sum_squares(const float* x, int64_t n) {
  f32x16 acc = zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x16 a = load(x + i);
    acc = fmadd(a, a, acc);
  }
  float s = reduce_add(acc);
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y = x * rsqrt(mean(x^2) + eps) [* w], one row of n
inline void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float r = 1.0f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w ? x[i] * r * w[i] : x[i] * r;
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  f32x16 acc = zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = fmadd(load(a + i), load16(b + i), acc);
  float s = reduce_add(acc);
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t n) {     // y += p * x
  const f32x16 pv = set1(p);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store(y + i, fmadd(pv, load16(x + i), load(y + i)));
  for (; i < n; ++i) y[i] += p * to_float(x[i]);
}

// Software prefetch of the cache row kAheadBytes past `row` (one key's K * D values, row_bytes), while at least
// that much is left of the range: a decode step finds the cache out of cache (the weights streamed past it), and
// the per-key work is too short for the hardware prefetcher alone to keep up.
constexpr int64_t kAheadBytes = 4096;
inline void prefetch_ahead(const void* row, int64_t row_bytes, int64_t rows_left) {
  if (rows_left * row_bytes <= kAheadBytes) return;
  const char* p = static_cast<const char*>(row) + kAheadBytes;
  for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// The queries of one attention call: Q rows (a decode token, or the tokens of a prefill piece, which share one cache
// row), row t's H*D values at q + t * stride, its position pos[t] and the first position it may see lo[t] (its
// chunk's start; 0 on global layers). Key j counts for row t iff lo[t] <= k_pos[j] <= pos[t] (k_pos -1: empty slot).
struct Queries {
  const float* q;
  int64_t stride, Q;
  const int64_t *pos, *lo;
};

// a (16 C) += sum over the n keys i that `sees` of w[i] * x[i * stride .. + 16 C], in key order: the sums stay in
// registers across the keys (C is a compile-time count, so the compiler keeps them there).
template <int C, typename T, typename Sees>
inline void value_tile(const float* w, const T* x, int64_t stride, int64_t n, Sees sees, float* a) {
  f32x16 r[C];
  for (int c = 0; c < C; ++c) r[c] = load(a + 16 * c);
  for (int64_t i = 0; i < n; ++i) {
    if (!sees(i)) continue;
    const f32x16 p = set1(w[i]);
    for (int c = 0; c < C; ++c) r[c] = fmadd(p, load16(x + i * stride + 16 * c), r[c]);
  }
  for (int c = 0; c < C; ++c) store(a + 16 * c, r[c]);
}

// Keys j0..j1-1 of `attend_one`, read in memory order: all kv heads of key j, then key j + 1 (the cache is
// (S, K, D)), each key once for all Q queries (a piece's rows read their shared prefix once, not once per row).
// Measured on SmolLM2's shapes, 517 keys, 30 layers' caches from L3, 1 thread: one kv head at a time 262 us per
// layer, in memory order 230, with the prefetch 172-189; 4 keys' sums at once: 105 -> 77 us from L2.
// For each query t and head h, at index t * H + h:
// top = the largest visible score, total = sum of e^(score - top), acc (D) = the sum of those weights times the
// values; the caller merges ranges (log-sum-exp). No visible key: top = -inf, total 0, acc 0.
template <typename T>
void attend_range(const Queries& qs, const T* k, const T* v, const int64_t* kp, int64_t j0, int64_t j1, int64_t K,
                  int64_t G, int64_t D, float* top, float* total, float* acc) {
  const int64_t H = K * G, n = j1 - j0, QH = qs.Q * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<uint8_t> visible(qs.Q * n);             // (Q, n): key j0 + i counts for query t
  for (int64_t t = 0; t < qs.Q; ++t)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = kp[j0 + i];
      visible[t * n + i] = p >= 0 && p >= qs.lo[t] && p <= qs.pos[t];
    }
  auto sees = [&](int64_t t, int64_t j) { return visible[t * n + (j - j0)] != 0; };
  std::vector<float> scores(QH * n);                   // (Q * H, n)
  std::fill(top, top + QH, neg_inf);
  const int64_t row_bytes = K * D * static_cast<int64_t>(sizeof(T));
  int64_t j = j0;
  if (D % 16 == 0) {         // 4 keys at a time: their 4 dot products per head summed across lanes together
    for (; j + 4 <= j1; j += 4) {
      const T* row = k + j * K * D;
      prefetch_ahead(row, 4 * row_bytes, (j1 - j) / 4);
      for (int64_t t = 0; t < qs.Q; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = qs.q + t * qs.stride + h * D;
          const T* kh = row + (h / G) * D;
          f32x16 a[4] = {zero(), zero(), zero(), zero()};
          for (int64_t d = 0; d < D; d += 16) {
            const f32x16 qv = load(qh + d);
            for (int r = 0; r < 4; ++r) a[r] = fmadd(qv, load16(kh + r * K * D + d), a[r]);
          }
          float dots[4];
          _mm_storeu_ps(dots, hsum4(a));
          const int64_t th = t * H + h;
          for (int r = 0; r < 4; ++r) {
            const float sc = sees(t, j + r) ? dots[r] * scale : neg_inf;
            scores[th * n + (j + r - j0)] = sc;
            top[th] = std::max(top[th], sc);
          }
        }
      }
    }
  }
  for (; j < j1; ++j) {
    const T* row = k + j * K * D;
    prefetch_ahead(row, row_bytes, j1 - j);
    for (int64_t t = 0; t < qs.Q; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t th = t * H + h;
        const float sc = sees(t, j) ? dot(qs.q + t * qs.stride + h * D, row + (h / G) * D, D) * scale : neg_inf;
        scores[th * n + (j - j0)] = sc;
        top[th] = std::max(top[th], sc);
      }
    }
  }
  for (int64_t th = 0; th < QH; ++th) {                // e^(s - top); masked scores are -inf and give exactly 0
    float* sh = scores.data() + th * n;
    total[th] = 0.0f;
    if (top[th] == neg_inf) {                          // nothing visible here: weights all 0
      std::fill(sh, sh + n, 0.0f);
      continue;
    }
    const f32x16 m = set1(top[th]);
    f32x16 sum = zero();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const f32x16 e = exp(sub(load(sh + i), m));
      store(sh + i, e);
      sum = add(sum, e);
    }
    total[th] = reduce_add(sum);
    for (; i < n; ++i) {
      sh[i] = std::exp(sh[i] - top[th]);
      total[th] += sh[i];
    }
  }
  std::fill(acc, acc + QH * D, 0.0f);
  if (qs.Q > 1 && D % 16 == 0) {
    // Several queries (a piece): tiles of kValueTile keys (one kv head's values of a tile stay in L1 across the
    // queries and heads that read it); per query and head, up to 64 of its D sums in registers across the tile's
    // keys, instead of loaded and stored for every key. One query (decode) keeps the key-by-key loop below: the
    // tiles measured slower there with an f16 cache.
    constexpr int64_t kValueTile = 32;
    for (int64_t jt = j0; jt < j1; jt += kValueTile) {
      const int64_t je = std::min(j1, jt + kValueTile);
      for (int64_t t = 0; t < qs.Q; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t th = t * H + h;
          const float* w = scores.data() + th * n + (jt - j0);          // the tile's weights
          const T* x = v + jt * K * D + (h / G) * D;                     // its first key's values of head h's kv head
          float* a = acc + th * D;
          auto seen = [&](int64_t i) { return sees(t, jt + i); };
          int64_t d0 = 0;
          for (; d0 + 64 <= D; d0 += 64) value_tile<4>(w, x + d0, K * D, je - jt, seen, a + d0);
          for (; d0 < D; d0 += 16) value_tile<1>(w, x + d0, K * D, je - jt, seen, a + d0);
        }
      }
    }
    return;
  }
  for (j = j0; j < j1; ++j) {
    const T* row = v + j * K * D;
    prefetch_ahead(row, row_bytes, j1 - j);
    for (int64_t t = 0; t < qs.Q; ++t) {
      if (!sees(t, j)) continue;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t th = t * H + h;
        axpy(scores[th * n + (j - j0)], row + (h / G) * D, acc + th * D, D);
      }
    }
  }
}

}  // namespace

// x (..., n) fp32, w (n,) fp32 or empty -> x * rsqrt(mean(x^2) + eps) [* w], fp32 statistics (model.RMSNorm).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() >= 1,
              "rms_norm: x must be a contiguous fp32 tensor; got ", x.scalar_type(), " of shape ", x.sizes());
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const bool weighted = w.numel() > 0;
  TORCH_CHECK(!weighted || (w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == n),
              "rms_norm: the weight must be a contiguous fp32 (", n, ",) tensor; got ", w.scalar_type(), " of shape ",
              w.sizes());
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weighted ? w.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // a decode step's single row stays on this thread: waking another costs more than the row
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * n, wp, n, static_cast<float>(eps), yp + r * n);
  });
  return y;
}

namespace {

// In place on one token's q|k|v ((H + 2K) * D fp32): see decode_qkv.
void prepare_qkv(float* o, const float* cs, int64_t H, int64_t K, int64_t D, bool qk_norm, float eps, float q_scale) {
  std::vector<float> tmp(D);
  for (int64_t h = 0; h < H + K; ++h) {          // q heads, then k heads; v stays as projected
    float* x = o + h * D;
    if (cs) {
      for (int64_t i = 0; i < D / 2; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1], x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
      }
    }
    if (qk_norm) {
      rms_norm_row(x, nullptr, D, eps, tmp.data());
      std::copy(tmp.begin(), tmp.end(), x);
    }
    if (h < H && q_scale != 1.0f) {
      for (int64_t i = 0; i < D; ++i) x[i] *= q_scale;
    }
  }
}

void check_cos_sin(const torch::Tensor& cos_sin, int64_t D) {
  TORCH_CHECK(cos_sin.numel() == 0 || (cos_sin.scalar_type() == torch::kFloat32 && cos_sin.is_contiguous() &&
                                       cos_sin.numel() == D),
              "decode_qkv: cos_sin must be a contiguous fp32 (", D / 2, ", 2) tensor; got ", cos_sin.scalar_type(),
              " of shape ", cos_sin.sizes());
}

}  // namespace

// One decode token's fused q|k|v projection (H + 2K) * D fp32 -> q (H*D), k (K*D), v (K*D), as model.Attention
// prepares them: rotary on q and k when cos_sin (D/2, 2) is given (pairs (x[2i], x[2i+1]) rotated by angle i), then
// QK-norm (RMSNorm without weight over each head's D) when qk_norm, then q times q_scale (attention temperature).
std::vector<torch::Tensor> decode_qkv(torch::Tensor qkv, torch::Tensor cos_sin, int64_t H, int64_t K, bool qk_norm,
                                      double eps, double q_scale) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && H > 0 && K > 0 &&
                  qkv.numel() % (H + 2 * K) == 0,
              "decode_qkv: qkv must be a contiguous fp32 tensor of (", H, " + 2 * ", K, ") * head_dim values; got ",
              qkv.scalar_type(), " of shape ", qkv.sizes());
  const int64_t D = qkv.numel() / (H + 2 * K);
  check_cos_sin(cos_sin, D);
  auto out = qkv.clone();
  prepare_qkv(out.data_ptr<float>(), cos_sin.numel() ? cos_sin.data_ptr<float>() : nullptr, H, K, D, qk_norm,
              static_cast<float>(eps), static_cast<float>(q_scale));
  return {out.narrow(0, 0, H * D), out.narrow(0, H * D, K * D), out.narrow(0, (H + K) * D, K * D)};
}

namespace {

void check_cache(const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                  k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16 ||
                   k.scalar_type() == torch::kHalf),
              "attend_one: k and v must be contiguous (S, K, D) fp32, bf16 or f16 tensors of one shape; got ",
              k.sizes(), " ", k.scalar_type(), " and ", v.sizes(), " ", v.scalar_type());
}

// attend_one on raw pointers for the queries qs (one token, or the rows of a prefill piece sharing this cache row):
// k, v (S, K, D) of T, k_pos (S,); query t's output (H*D) written at op + t * out_stride. Long caches are cut in key
// ranges (how many depends only on the cache's size, the number of queries and the thread count, so a query's sums
// are the same bits whichever thread runs its ranges); `split_threads` false runs them all on this thread
// (decode_layer_rows: its rows already run in parallel, and the WorkerPool does not nest).
template <typename T>
void attend_queries_raw(const Queries& qs, const T* k, const T* v, const int64_t* kp, int64_t S, int64_t K,
                        int64_t D, int64_t H, float* op, int64_t out_stride, bool split_threads = true) {
  const int64_t G = H / K, QH = qs.Q * H;
  // Key ranges in parallel (kernels.cpp's SpinPool, as the matmuls around it) only when there is enough work: a
  // short context is cheaper on one thread. Ranges of at least 256 keys for one query, fewer for more (16 for 16).
  const int64_t min_keys = std::max<int64_t>(16, 256 / qs.Q);
  const int64_t n_ranges = S * K * D * qs.Q >= 65536
                               ? std::min<int64_t>(at::get_num_threads(), (S + min_keys - 1) / min_keys) : 1;
  const int64_t per = (S + n_ranges - 1) / n_ranges;
  std::vector<float> top(n_ranges * QH), total(n_ranges * QH), acc(n_ranges * QH * D);
  auto ranges = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j0 = std::min(S, r * per), j1 = std::min(S, j0 + per);
      attend_range(qs, k, v, kp, j0, j1, K, G, D, &top[r * QH], &total[r * QH], &acc[r * QH * D]);
    }
  };
  if (n_ranges > 1 && split_threads) {
    parallel_rows(n_ranges, ranges);
  } else {
    ranges(0, n_ranges);
  }
  // merge: out[t, h] = sum_r e^(top_r - M) acc_r / sum_r e^(top_r - M) total_r, M = max_r top_r
  for (int64_t th = 0; th < QH; ++th) {
    float* o = op + (th / H) * out_stride + (th % H) * D;
    std::fill(o, o + D, 0.0f);
    float M = -std::numeric_limits<float>::infinity(), denom = 0.0f;
    for (int64_t r = 0; r < n_ranges; ++r) M = std::max(M, top[r * QH + th]);
    if (M == -std::numeric_limits<float>::infinity()) continue;      // no visible key at all: zeros
    for (int64_t r = 0; r < n_ranges; ++r) {
      if (total[r * QH + th] == 0.0f) continue;
      const float w = std::exp(top[r * QH + th] - M);
      denom += w * total[r * QH + th];
      axpy(w, &acc[(r * QH + th) * D], o, D);
    }
    for (int64_t i = 0; i < D; ++i) o[i] /= denom;
  }
}

// One query at position q_pos, on a layer of chunk `chunk` (0: global), out (H*D).
template <typename T>
void attend_one_raw(const float* qp, const T* k, const T* v, const int64_t* kp, int64_t S, int64_t K, int64_t D,
                    int64_t H, int64_t q_pos, int64_t chunk, float* op, bool split_threads = true) {
  const int64_t lo = chunk > 0 ? q_pos - q_pos % chunk : 0;
  attend_queries_raw(Queries{qp, 0, 1, &q_pos, &lo}, k, v, kp, S, K, D, H, op, 0, split_threads);
}

void attend_one_raw(const float* q, const torch::Tensor& k, const torch::Tensor& v, const int64_t* kp, int64_t S,
                    int64_t H, int64_t q_pos, int64_t chunk, float* out) {
  const int64_t K = k.size(1), D = k.size(2);
  if (k.scalar_type() == torch::kFloat32) {
    attend_one_raw(q, k.data_ptr<float>(), v.data_ptr<float>(), kp, S, K, D, H, q_pos, chunk, out);
  } else if (k.scalar_type() == torch::kBFloat16) {
    attend_one_raw(q, k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), kp, S, K, D, H, q_pos, chunk, out);
  } else {
    attend_one_raw(q, k.data_ptr<at::Half>(), v.data_ptr<at::Half>(), kp, S, K, D, H, q_pos, chunk, out);
  }
}

}  // namespace

// One query (H*D fp32, position q_pos) over cached keys and values k, v (S, K, D) fp32, bf16 or f16 with
// positions k_pos (S,) int64 -> (H*D) fp32. Key j counts iff 0 <= k_pos[j] <= q_pos and, when chunk > 0, it lies in
// the query's chunk (k_pos[j] >= q_pos - q_pos % chunk): model.attention_mask for one query. Query heads
// h*G .. h*G+G-1 share kv head h (G = H / K).
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_pos, int64_t q_pos,
                         int64_t chunk) {
  check_cache(k, v);
  const int64_t S = k.size(0), K = k.size(1), D = k.size(2);
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.numel() % (K * D) == 0,
              "attend_one: q must be a contiguous fp32 tensor of H * ", D, " values with H a multiple of ", K,
              "; got ", q.scalar_type(), " of shape ", q.sizes());
  TORCH_CHECK(k_pos.scalar_type() == torch::kLong && k_pos.is_contiguous() && k_pos.numel() == S,
              "attend_one: k_pos must be a contiguous int64 (", S, ",) tensor; got ", k_pos.scalar_type(),
              " of shape ", k_pos.sizes());
  const int64_t H = q.numel() / D;
  auto out = torch::empty({H * D}, torch::kFloat32);
  attend_one_raw(q.data_ptr<float>(), k, v, k_pos.data_ptr<int64_t>(), S, H, q_pos, chunk, out.data_ptr<float>());
  return out;
}

namespace {

// o (F) = silu(g) * u for one row: g / (1 + e^-g) * u
void silu_mul_row(const float* g, const float* u, int64_t F, float* o) {
  const f32x16 one = set1(1.0f);
  int64_t i = 0;
  for (; i + 16 <= F; i += 16) {
    const f32x16 gv = load(g + i);
    const f32x16 s = div(gv, add(one, exp(neg(gv))));
    store(o + i, mul(s, load(u + i)));
  }
  for (; i < F; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

// gate_up (..., 2F) fp32 -> silu(gate) * up (..., F), gate the first F of each row (fuse.FusedFeedForward's w13).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.is_contiguous() && gate_up.dim() >= 1 &&
                  gate_up.size(-1) % 2 == 0,
              "silu_mul: gate_up must be a contiguous fp32 tensor with an even last dim; got ", gate_up.scalar_type(),
              " of shape ", gate_up.sizes());
  const int64_t F = gate_up.size(-1) / 2, rows = F ? gate_up.numel() / (2 * F) : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = F;
  auto out = torch::empty(sizes, torch::kFloat32);
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(src + r * 2 * F, src + r * 2 * F + F, F, dst + r * F);
  });
  return out;
}

namespace {

// One of a decode layer's matrices, by how it is stored (kernels.cpp): fp32 (K, N) transposed (decode.HerdLinear), an
// int8 stream with row scales, an int4 stream, or (routed experts only) a GGUF matrix's blocks of a GGML type; as raw
// pointers, checked when built (layer_matrix, expert_matrices, gguf_expert_matrices). `apply` is the product of M
// rows, which the raw kernels compute reading each weight block once for all M.
struct LayerMatrix {
  enum Kind { kFp32, kInt8, kInt4, kGguf } kind;
  const void* data;
  const float* row_scale;     // int8 only
  int64_t K, N, G;            // G: int4 only; for kGguf the GGML type
  bool int4_zeros = true;     // int4 only: whether the stream holds zero points (kernels.cpp's check_int4)

  void apply(const float* x, int64_t M, float* y) const {      // x (M, K) -> y (M, N)
    if (kind == kFp32) {
      fp32_mm_raw(x, M, K, static_cast<const float*>(data), N, y);
    } else if (kind == kInt8) {
      int8_mm_raw(x, M, K, static_cast<const int8_t*>(data), row_scale, N, y);
    } else if (kind == kInt4) {
      int4_mm_raw(x, M, K, static_cast<const uint8_t*>(data), N, G, int4_zeros, y);
    } else {
      gguf_mm_raw(x, M, K, static_cast<const uint8_t*>(data), N, G, y);
    }
  }
};

// decode.HerdBlock passes each matrix as (data, row scale or empty, out dim, group size): fp32 data is HerdLinear's,
// a row scale makes it int8, else it is int4.
LayerMatrix layer_matrix(const torch::Tensor& data, const torch::Tensor& row_scale, int64_t K, int64_t N, int64_t G,
                         const char* name) {
  if (data.scalar_type() == torch::kFloat32) {
    check_fp32(data, K);
    TORCH_CHECK(data.size(1) == N, "decode_layer: ", name, " has ", data.size(1), " outputs, expected ", N);
    return {LayerMatrix::kFp32, data.data_ptr<float>(), nullptr, K, N, G};
  }
  if (row_scale.numel() > 0) {
    TORCH_CHECK(row_scale.numel() == N, "decode_layer: ", name, " has ", row_scale.numel(), " row scales, expected ",
                N);
    check_int8(data, row_scale, K);
    return {LayerMatrix::kInt8, data.data_ptr<int8_t>(), row_scale.data_ptr<float>(), K, N, G};
  }
  const bool zeros = check_int4(data, K, N, G);
  return {LayerMatrix::kInt4, data.data_ptr<uint8_t>(), nullptr, K, N, G, zeros};
}

// E matrices of one shape stacked along a first dim (a MoE's routed experts: decode.HerdExperts' fp32 (E, K, N),
// kernels.HerdInt8Experts' (E, N * K) streams with (E, N) row scales, HerdInt4Experts' (E, bytes) streams). Expert
// 0's matrix is checked as layer_matrix checks one, the others have its shape; expert(e) points at row e.
struct ExpertMatrices {
  LayerMatrix first;
  int64_t data_stride, scale_stride;      // bytes, floats

  LayerMatrix expert(int64_t e) const {
    LayerMatrix m = first;
    m.data = static_cast<const char*>(first.data) + e * data_stride;
    if (m.row_scale != nullptr) m.row_scale += e * scale_stride;
    return m;
  }
};

ExpertMatrices expert_matrices(const torch::Tensor& data, const torch::Tensor& row_scale, int64_t E, int64_t K,
                               int64_t N, int64_t G, const char* name) {
  const bool int8 = row_scale.numel() > 0;
  TORCH_CHECK(data.dim() >= 2 && data.size(0) == E && data.is_contiguous() &&
                  (!int8 || (row_scale.dim() == 2 && row_scale.size(0) == E && row_scale.is_contiguous())),
              "decode_layer: ", name, " must stack one expert per router output (the router's ", E, " outputs) "
              "along a contiguous first dim, int8 row scales as (E, N); got ", data.sizes(), ", row scales ",
              row_scale.sizes());
  const torch::Tensor scale0 = int8 ? row_scale[0] : row_scale;
  return {layer_matrix(data[0], scale0, K, N, G, name), data.stride(0) * data.element_size(),
          int8 ? row_scale.stride(0) : 0};
}

// E GGUF matrices (N, K) of GGML type `type` (kernels.HerdGGUFExperts' w1 / w3 / w2: views of the file, uint8
// (E, N, K/32 * block bytes)); expert(e) points at expert e's rows.
ExpertMatrices gguf_expert_matrices(const torch::Tensor& data, int64_t E, int64_t K, int64_t N, int64_t type,
                                    const char* name) {
  TORCH_CHECK(data.dim() == 3 && data.size(0) == E && data.size(1) == N && data.is_contiguous(),
              "decode_layer: ", name, " must be the GGUF blocks of ", E, " experts (the router's outputs) of ", N,
              " rows, contiguous (E, N, bytes); got ", data.sizes());
  check_gguf(data[0], K, N, type);
  return {{LayerMatrix::kGguf, data.data_ptr<uint8_t>(), nullptr, K, N, type}, data.stride(0), 0};
}

void check_norm(const torch::Tensor& w, int64_t n, const char* name) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == n, "decode_layer: ", name,
              " must be a contiguous fp32 (", n, ",) tensor; got ", w.scalar_type(), " of shape ", w.sizes());
}

// One decoder layer's weights as decode_layer and decode_layer_rows take them, checked by layer_weights.
struct LayerWeights {
  const float *attn_norm, *ffn_norm;
  float eps;
  int64_t dim, H, K, D, F;                 // F: the dense (or shared expert's) hidden dim
  bool qk_norm;
  LayerMatrix qkv, o, w13, w2;
  bool moe;
  const float* router_t;                   // (dim, E), MoE only
  int64_t E, Fe;                           // routed experts and their hidden dim
  bool gguf;                               // GGUF experts: e_13 the gate matrices alone, e_3 the up ones
  ExpertMatrices e_13, e_3, e_2;
};

// The checks and raw pointers of a layer's weights for activations of `dim` and K kv heads of D (the cache's
// (..., K, D), checked by the callers against its own shape: check_cache_heads).
LayerWeights layer_weights(int64_t dim, int64_t D, torch::Tensor attn_norm, torch::Tensor ffn_norm,
                           double eps, torch::Tensor wqkv, torch::Tensor wqkv_scale, int64_t wqkv_n, int64_t wqkv_g,
                           torch::Tensor wo, torch::Tensor wo_scale, int64_t wo_n, int64_t wo_g, torch::Tensor w13,
                           torch::Tensor w13_scale, int64_t w13_n, int64_t w13_g, torch::Tensor w2,
                           torch::Tensor w2_scale, int64_t w2_n, int64_t w2_g, torch::Tensor router_t,
                           torch::Tensor experts_w13, torch::Tensor experts_w13_scale, torch::Tensor experts_w2,
                           torch::Tensor experts_w2_scale, int64_t expert_hidden, int64_t experts_g,
                           torch::Tensor experts_w3, int64_t experts_type, int64_t H, int64_t K, bool qk_norm) {
  const int64_t F = w13_n / 2;
  TORCH_CHECK(H > 0 && K > 0 && D > 0 && H % K == 0 && wqkv_n == (H + 2 * K) * D && w13_n % 2 == 0,
              "decode_layer: ", H, " query heads and ", K, " kv heads of ", D, " do not match wqkv's ", wqkv_n,
              " outputs");
  check_norm(attn_norm, dim, "attn_norm");
  check_norm(ffn_norm, dim, "ffn_norm");
  LayerWeights w{attn_norm.data_ptr<float>(), ffn_norm.data_ptr<float>(), static_cast<float>(eps), dim, H, K, D, F,
                 qk_norm,
                 layer_matrix(wqkv, wqkv_scale, dim, wqkv_n, wqkv_g, "wqkv"),
                 layer_matrix(wo, wo_scale, H * D, wo_n, wo_g, "wo"),
                 layer_matrix(w13, w13_scale, dim, w13_n, w13_g, "w13"),
                 layer_matrix(w2, w2_scale, F, w2_n, w2_g, "w2"),
                 router_t.numel() > 0, nullptr, 0, expert_hidden, experts_type != 0, {}, {}, {}};
  TORCH_CHECK(wo_n == dim && w2_n == dim, "decode_layer: wo and w2 must have ", dim, " outputs; got ", wo_n, " and ",
              w2_n);
  if (w.moe) {
    check_fp32(router_t, dim);
    TORCH_CHECK(w.Fe > 0, "decode_layer: expert_hidden must be > 0; got ", w.Fe);
    w.router_t = router_t.data_ptr<float>();
    w.E = router_t.size(-1);
    if (w.gguf) {
      w.e_13 = gguf_expert_matrices(experts_w13, w.E, dim, w.Fe, experts_type, "experts_w13 (gate)");
      w.e_3 = gguf_expert_matrices(experts_w3, w.E, dim, w.Fe, experts_type, "experts_w3 (up)");
      w.e_2 = gguf_expert_matrices(experts_w2, w.E, w.Fe, dim, experts_type, "experts_w2");
    } else {
      w.e_13 = expert_matrices(experts_w13, experts_w13_scale, w.E, dim, 2 * w.Fe, experts_g, "experts_w13");
      w.e_2 = expert_matrices(experts_w2, experts_w2_scale, w.E, w.Fe, dim, experts_g, "experts_w2");
    }
  }
  return w;
}

void check_cache_heads(const torch::Tensor& k_cache, int64_t K, int64_t D) {
  TORCH_CHECK(k_cache.size(-2) == K && k_cache.size(-1) == D, "decode_layer: the cache ", k_cache.sizes(),
              " does not hold the layer's ", K, " kv heads of ", D);
}

// One row's token in the KV cache: its cache row's keys and values (S, K, D, in the cache's dtype) and positions
// (S,), the slot its key, value and position go to, how many slots from 0 attention reads, its position, its rotation
// (D/2 (cos, sin) pairs; null on NoPE layers) and its q scale (the NoPE temperature of its position).
struct RowStep {
  void *k, *v;
  int64_t* k_pos;
  int64_t slot, n_slots, pos;
  const float* cos_sin;
  float q_scale;
};

// this token's k or v (n = K*D fp32) into slot `slot` of a cache row, cast to the cache's dtype (round to nearest
// even, as torch's copy_)
void write_slot(const float* src, void* row, c10::ScalarType dtype, int64_t slot, int64_t n) {
  if (dtype == torch::kFloat32) {
    std::memcpy(static_cast<float*>(row) + slot * n, src, n * sizeof(float));
  } else if (dtype == torch::kBFloat16) {
    at::BFloat16* dst = static_cast<at::BFloat16*>(row) + slot * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i]);
  } else {
    at::Half* dst = static_cast<at::Half*>(row) + slot * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = at::Half(src[i]);
  }
}

// Attention for n rows of a step that share one cache row (a prefill piece's tokens, or one decode row alone): their
// queries (row i's at q + i * q_stride) read the row's keys once for all of them -> row i's (H*D) at out + i * H*D.
void attend_rows(const float* q, int64_t q_stride, const RowStep* rows, int64_t n, c10::ScalarType dtype, int64_t K,
                 int64_t D, int64_t H, int64_t chunk, float* out, bool split_threads) {
  // The rows read up to the most slots any of them reads (on a global layer a piece's token t reads p_t + 1, its
  // own position's slot last); the slots past a row's own hold later tokens' keys, which its visibility excludes.
  std::vector<int64_t> pos(n), lo(n);
  int64_t n_slots = 0;
  for (int64_t i = 0; i < n; ++i) {
    pos[i] = rows[i].pos;
    lo[i] = chunk > 0 ? pos[i] - pos[i] % chunk : 0;
    n_slots = std::max(n_slots, rows[i].n_slots);
  }
  const Queries qs{q, q_stride, n, pos.data(), lo.data()};
  const RowStep& r = rows[0];
  if (dtype == torch::kFloat32) {
    attend_queries_raw(qs, static_cast<const float*>(r.k), static_cast<const float*>(r.v), r.k_pos, n_slots, K, D, H,
                       out, H * D, split_threads);
  } else if (dtype == torch::kBFloat16) {
    attend_queries_raw(qs, static_cast<const at::BFloat16*>(r.k), static_cast<const at::BFloat16*>(r.v), r.k_pos,
                       n_slots, K, D, H, out, H * D, split_threads);
  } else {
    attend_queries_raw(qs, static_cast<const at::Half*>(r.k), static_cast<const at::Half*>(r.v), r.k_pos, n_slots,
                       K, D, H, out, H * D, split_threads);
  }
}

// ffn (B, dim) += each row's top-1 routed expert applied to its normed input (B, dim): the router's logits (B, E) in
// one product; per row the first of the largest logits (as argmax; torch.topk's choice among exact ties is
// unspecified), its sigmoid scaling the row's input; then the rows grouped by expert, so each chosen expert's two
// matrices are read once for all of its rows.
void add_routed(const LayerWeights& w, const float* normed, int64_t B, float* ffn) {
  const int64_t dim = w.dim, E = w.E, Fe = w.Fe;
  std::vector<float> logits(B * E), gate(B), gated(B * dim), gate_up(B * 2 * Fe), act(B * Fe), routed(B * dim);
  std::vector<int64_t> chosen(B), members;
  fp32_mm_raw(normed, B, dim, w.router_t, E, logits.data());
  for (int64_t b = 0; b < B; ++b) {
    const float* l = logits.data() + b * E;
    chosen[b] = std::max_element(l, l + E) - l;                                   // the first largest
    gate[b] = 1.0f / (1.0f + std::exp(-l[chosen[b]]));
  }
  for (int64_t e = 0; e < E; ++e) {
    members.clear();
    for (int64_t b = 0; b < B; ++b)
      if (chosen[b] == e) members.push_back(b);
    const int64_t n = static_cast<int64_t>(members.size());
    if (n == 0) continue;
    for (int64_t i = 0; i < n; ++i)                                               // gated (n, dim)
      for (int64_t j = 0; j < dim; ++j) gated[i * dim + j] = normed[members[i] * dim + j] * gate[members[i]];
    if (w.gguf) {                                        // gate (n, Fe), then up (n, Fe)
      w.e_13.expert(e).apply(gated.data(), n, gate_up.data());
      w.e_3.expert(e).apply(gated.data(), n, gate_up.data() + n * Fe);
      for (int64_t i = 0; i < n; ++i) silu_mul_row(&gate_up[i * Fe], &gate_up[(n + i) * Fe], Fe, &act[i * Fe]);
    } else {                                             // (n, 2 Fe): each row's gate | up
      w.e_13.expert(e).apply(gated.data(), n, gate_up.data());
      for (int64_t i = 0; i < n; ++i)
        silu_mul_row(&gate_up[i * 2 * Fe], &gate_up[i * 2 * Fe + Fe], Fe, &act[i * Fe]);
    }
    w.e_2.expert(e).apply(act.data(), n, routed.data());                          // (n, dim)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < dim; ++j) ffn[members[i] * dim + j] += routed[i * dim + j];   // shared + routed
  }
}

// The layer for B rows, x (B, dim) -> out (B, dim): see decode_layer (B = 1) and decode_layer_rows. Every matrix is
// one product of all B rows; the per-row steps run row by row, attention one row per thread.
void layer_rows(const LayerWeights& w, const float* x, int64_t B, const std::vector<RowStep>& rows,
                c10::ScalarType cache_dtype, int64_t chunk, float* out) {
  const int64_t dim = w.dim, H = w.H, K = w.K, D = w.D, F = w.F, n_qkv = (H + 2 * K) * D;
  std::vector<float> normed(B * dim), qkv(B * n_qkv), attn(B * H * D), h(B * dim), gate_up(B * 2 * F), act(B * F),
      ffn(B * dim);
  for (int64_t b = 0; b < B; ++b) rms_norm_row(x + b * dim, w.attn_norm, dim, w.eps, &normed[b * dim]);
  w.qkv.apply(normed.data(), B, qkv.data());                                      // (B, (H + 2K) D)
  for (int64_t b = 0; b < B; ++b) {
    const RowStep& r = rows[b];
    float* t = &qkv[b * n_qkv];
    prepare_qkv(t, r.cos_sin, H, K, D, w.qk_norm, w.eps, r.q_scale);
    write_slot(t + H * D, r.k, cache_dtype, r.slot, K * D);
    write_slot(t + (H + K) * D, r.v, cache_dtype, r.slot, K * D);
    r.k_pos[r.slot] = r.pos;
  }
  // Consecutive rows sharing a cache row (a prefill piece's tokens) attend as one group, reading its keys once for
  // all of them (a 16-token piece at position 1000 read each key 16 times before; its step 63.7 -> 49.5 ms on
  // SmolLM2, AVX2, 2 threads). Groups on the threads when there are enough of them, else one group at a time with its
  // keys split over the threads.
  std::vector<int64_t> group_start{0};
  for (int64_t b = 1; b < B; ++b)
    if (rows[b].k != rows[b - 1].k) group_start.push_back(b);
  group_start.push_back(B);
  const int64_t n_groups = static_cast<int64_t>(group_start.size()) - 1;
  const bool by_groups = n_groups > 1 && n_groups >= at::get_num_threads();
  auto attend = [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b0 = group_start[g];
      attend_rows(&qkv[b0 * n_qkv], n_qkv, &rows[b0], group_start[g + 1] - b0, cache_dtype, K, D, H, chunk,
                  &attn[b0 * H * D], !by_groups);
    }
  };
  if (by_groups) {
    parallel_rows(n_groups, attend);
  } else {
    attend(0, n_groups);
  }
  w.o.apply(attn.data(), B, h.data());
  for (int64_t i = 0; i < B * dim; ++i) h[i] += x[i];                    // h = x + wo(...), in the model's order
  for (int64_t b = 0; b < B; ++b) rms_norm_row(&h[b * dim], w.ffn_norm, dim, w.eps, &normed[b * dim]);
  w.w13.apply(normed.data(), B, gate_up.data());                                  // (B, 2F)
  for (int64_t b = 0; b < B; ++b) silu_mul_row(&gate_up[b * 2 * F], &gate_up[b * 2 * F + F], F, &act[b * F]);
  w.w2.apply(act.data(), B, ffn.data());
  if (w.moe) add_routed(w, normed.data(), B, ffn.data());
  for (int64_t i = 0; i < B * dim; ++i) out[i] = h[i] + ffn[i];
}

// One token through one layer (decode_layer, decode_step): x (dim) -> out (dim), its key, value and position written
// to slot `slot` of the cache row k_cache, v_cache (S, K, D) / pos_cache (S,), attention over its first n_slots.
void one_token_layer(const LayerWeights& w, const float* x, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const torch::Tensor& pos_cache, int64_t slot, int64_t n_slots, int64_t pos, const float* cos_sin,
                     float q_scale, int64_t chunk, float* out) {
  check_cache_heads(k_cache, w.K, w.D);
  TORCH_CHECK(slot >= 0 && slot < k_cache.size(0) && n_slots > slot && n_slots <= k_cache.size(0) &&
                  pos_cache.scalar_type() == torch::kLong && pos_cache.is_contiguous() &&
                  pos_cache.numel() == k_cache.size(0),
              "decode_layer: slot ", slot, " / ", n_slots, " slots do not fit a cache of ", k_cache.sizes());
  const std::vector<RowStep> row{{k_cache.data_ptr(), v_cache.data_ptr(), pos_cache.data_ptr<int64_t>(), slot,
                                  n_slots, pos, cos_sin, q_scale}};
  layer_rows(w, x, 1, row, k_cache.scalar_type(), chunk, out);
}

}  // namespace

// One whole decoder layer for one token (decode.HerdBlock; twin: model.Block.forward through the engine's cache),
// every matrix (data, row scale or empty, out dim, group size) as layer_matrix takes it:
//   h = x + wo(attention(decode_qkv(wqkv(rms_norm(x)))))
//   dense: out = h + w2(silu_mul(w13(rms_norm(h))))
//   MoE (router_t given): out = h + (shared + routed), shared the dense formula's w2(...) of the shared expert and
//     routed the top-1 expert's: router_t (dim, E) fp32; experts_w13 (2 * expert_hidden outputs) and experts_w2
//     (dim outputs) the E experts' matrices stacked (expert_matrices); the first of the largest router logits (as
//     argmax; torch.topk's choice among exact ties is unspecified), its sigmoid scaling the expert's input. GGUF
//     experts (experts_type a GGML type, not 0): experts_w13 holds the gate and experts_w3 the up matrices,
//     experts_w2 the down ones, each (E, rows, bytes) in GGUF's blocks (gguf_expert_matrices)
// with this token's key, value and position written to slot `slot` of the layer's cache row (k_cache, v_cache
// (S, K, D) fp32, bf16 or f16, pos_cache (S,) int64) and attention over its first n_slots slots. x (1, dim) fp32.
// Everything runs on raw pointers and scratch from the C++ heap: the ~40 torch ops per layer this took as composed
// torch calls cost ~1 ms of a 30-layer SmolLM2 step in dispatch alone. The B = 1 case of decode_layer_rows.
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
                           torch::Tensor wqkv, torch::Tensor wqkv_scale, int64_t wqkv_n, int64_t wqkv_g,
                           torch::Tensor wo, torch::Tensor wo_scale, int64_t wo_n, int64_t wo_g,
                           torch::Tensor w13, torch::Tensor w13_scale, int64_t w13_n, int64_t w13_g,
                           torch::Tensor w2, torch::Tensor w2_scale, int64_t w2_n, int64_t w2_g,
                           torch::Tensor router_t, torch::Tensor experts_w13, torch::Tensor experts_w13_scale,
                           torch::Tensor experts_w2, torch::Tensor experts_w2_scale, int64_t expert_hidden,
                           int64_t experts_g, torch::Tensor experts_w3, int64_t experts_type,
                           torch::Tensor cos_sin, int64_t H, int64_t K, bool qk_norm,
                           double q_scale, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pos_cache,
                           int64_t slot, int64_t n_slots, int64_t pos, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "decode_layer: x must be one contiguous fp32 (1, dim) row; got ", x.scalar_type(), " of shape ",
              x.sizes());
  check_cache(k_cache, v_cache);
  const LayerWeights w = layer_weights(x.size(1), k_cache.size(-1), attn_norm, ffn_norm, eps, wqkv, wqkv_scale,
                                       wqkv_n, wqkv_g, wo, wo_scale, wo_n, wo_g, w13, w13_scale, w13_n, w13_g, w2,
                                       w2_scale, w2_n, w2_g, router_t, experts_w13, experts_w13_scale, experts_w2,
                                       experts_w2_scale, expert_hidden, experts_g, experts_w3, experts_type, H, K,
                                       qk_norm);
  check_cos_sin(cos_sin, w.D);
  auto out = torch::empty({1, w.dim}, torch::kFloat32);
  one_token_layer(w, x.data_ptr<float>(), k_cache, v_cache, pos_cache, slot, n_slots, pos,
                  cos_sin.numel() ? cos_sin.data_ptr<float>() : nullptr, static_cast<float>(q_scale), chunk,
                  out.data_ptr<float>());
  return out;
}

// A model's decode layers, their weights checked once (layer_weights) and held: `decode_step` runs a batch-1 decode
// token through all of them in one call. Built by `layer_stack` from one tuple per layer: decode_layer's weight
// arguments (attn_norm .. experts_type), then H, K, qk_norm, the layer's chunk (0: global) and whether it rotates.
struct LayerStack {
  std::vector<LayerWeights> layers;
  std::vector<int64_t> chunk;
  std::vector<bool> rope;
  std::vector<torch::Tensor> held;           // every tensor the layers' raw pointers point into
};

std::shared_ptr<LayerStack> layer_stack(const std::vector<py::tuple>& layers) {
  auto s = std::make_shared<LayerStack>();
  for (const py::tuple& a : layers) {
    TORCH_CHECK(a.size() == 33, "layer_stack: each layer takes decode_layer's 28 weight arguments, then H, K, "
                "qk_norm, chunk and uses_rope (33 items); got ", a.size());
    auto T = [&](int i) {
      torch::Tensor t = a[i].cast<torch::Tensor>();
      s->held.push_back(t);
      return t;
    };
    auto I = [&](int i) { return a[i].cast<int64_t>(); };
    const torch::Tensor attn_norm = T(0);
    const int64_t H = I(28), K = I(29), qkv_n = I(5);
    TORCH_CHECK(H > 0 && K > 0 && qkv_n % (H + 2 * K) == 0, "layer_stack: wqkv's ", qkv_n, " outputs are not (",
                H, " + 2 * ", K, ") heads");
    s->layers.push_back(layer_weights(attn_norm.numel(), qkv_n / (H + 2 * K), attn_norm, T(1), a[2].cast<double>(),
                                      T(3), T(4), qkv_n, I(6), T(7), T(8), I(9), I(10), T(11), T(12), I(13), I(14),
                                      T(15), T(16), I(17), I(18), T(19), T(20), T(21), T(22), T(23), I(24), I(25),
                                      T(26), I(27), H, K, a[30].cast<bool>()));
    s->chunk.push_back(I(31));
    s->rope.push_back(a[32].cast<bool>());
    TORCH_CHECK(s->layers.back().dim == s->layers.front().dim, "layer_stack: layer ", s->layers.size() - 1,
                " is ", s->layers.back().dim, " wide, layer 0 ", s->layers.front().dim);
  }
  return s;
}

// decode_layer for every layer of a stack in turn, one token at position `pos`: x (1, dim) fp32; per layer l its
// cache row k[l], v[l] (S, K, D) and positions pos_cache[l] (S,), its slot and slots read, its q scale; cos_sin
// (D/2, 2) fp32 this position's rotation, given to the layers that rotate. Twin: decode_layer layer by layer.
torch::Tensor decode_step(const LayerStack& s, torch::Tensor x, torch::Tensor cos_sin, const std::vector<double>& q_scale,
                          const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v,
                          const std::vector<torch::Tensor>& pos_cache, const std::vector<int64_t>& slot,
                          const std::vector<int64_t>& n_slots, int64_t pos) {
  const size_t L = s.layers.size();
  TORCH_CHECK(L > 0 && q_scale.size() == L && k.size() == L && v.size() == L && pos_cache.size() == L &&
                  slot.size() == L && n_slots.size() == L,
              "decode_step: the stack has ", L, " layers; got ", q_scale.size(), " q scales, ", k.size(), " / ",
              v.size(), " / ", pos_cache.size(), " cache rows, ", slot.size(), " slots, ", n_slots.size(),
              " slot counts");
  const int64_t dim = s.layers[0].dim;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == dim && x.scalar_type() == torch::kFloat32 &&
                  x.is_contiguous(),
              "decode_step: x must be one contiguous fp32 (1, ", dim, ") row; got ", x.scalar_type(), " of shape ",
              x.sizes());
  check_cos_sin(cos_sin, s.layers[0].D);
  torch::Tensor a = x.clone(), b = torch::empty_like(x);
  for (size_t l = 0; l < L; ++l) {
    const LayerWeights& w = s.layers[l];
    check_cache(k[l], v[l]);
    TORCH_CHECK(!s.rope[l] || cos_sin.numel() == w.D, "decode_step: layer ", l, " rotates; cos_sin is empty");
    one_token_layer(w, a.data_ptr<float>(), k[l], v[l], pos_cache[l], slot[l], n_slots[l], pos,
                    s.rope[l] ? cos_sin.data_ptr<float>() : nullptr, static_cast<float>(q_scale[l]), s.chunk[l],
                    b.data_ptr<float>());
    std::swap(a, b);
  }
  return a;
}

namespace {

void check_row_vector(const torch::Tensor& t, int64_t B, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == B, "decode_layer_rows: ", name,
              " must be a contiguous ", dtype, " (", B, ",) tensor, one per row of x; got ", t.scalar_type(),
              " of shape ", t.sizes());
}

}  // namespace

// decode_layer for B >= 1 rows at once, each its own token, position and cache row (ragged lengths): x (B, dim)
// fp32; the layer's whole cache k_cache, v_cache (R, S, K, D) fp32, bf16 or f16 and pos_cache (R, S) int64; per
// row b (int64 (B,) each): rows[b] its cache row (all different), slots[b] where its key, value and position go,
// n_slots[b] how many slots from 0 it attends over, pos[b] >= 0 its position; cos_sin (B, D/2, 2) fp32 its rotation
// (empty on NoPE layers), q_scale (B,) fp32 its attention temperature (empty: 1). Every matrix runs once with M = B
// rows (the int4 / int8 kernels read each weight block once for all of them), a MoE's routed experts once per chosen
// expert with the rows that chose it. Twin: model.Block.forward through the engine's cache (decode.HerdBlock).
torch::Tensor decode_layer_rows(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
                                torch::Tensor wqkv, torch::Tensor wqkv_scale, int64_t wqkv_n, int64_t wqkv_g,
                                torch::Tensor wo, torch::Tensor wo_scale, int64_t wo_n, int64_t wo_g,
                                torch::Tensor w13, torch::Tensor w13_scale, int64_t w13_n, int64_t w13_g,
                                torch::Tensor w2, torch::Tensor w2_scale, int64_t w2_n, int64_t w2_g,
                                torch::Tensor router_t, torch::Tensor experts_w13, torch::Tensor experts_w13_scale,
                                torch::Tensor experts_w2, torch::Tensor experts_w2_scale, int64_t expert_hidden,
                                int64_t experts_g, torch::Tensor experts_w3, int64_t experts_type,
                                torch::Tensor cos_sin, int64_t H, int64_t K, bool qk_norm, torch::Tensor q_scale,
                                torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pos_cache,
                                torch::Tensor rows, torch::Tensor slots,
                                torch::Tensor n_slots, torch::Tensor pos, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "decode_layer_rows: x must be a contiguous fp32 (B, dim) tensor; got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == torch::kFloat32 || k_cache.scalar_type() == torch::kBFloat16 ||
                   k_cache.scalar_type() == torch::kHalf) &&
                  pos_cache.scalar_type() == torch::kLong && pos_cache.is_contiguous() && pos_cache.dim() == 2 &&
                  pos_cache.size(0) == k_cache.size(0) && pos_cache.size(1) == k_cache.size(1),
              "decode_layer_rows: the cache must be contiguous k, v (R, S, K, D) fp32, bf16 or f16 of one shape and "
              "pos (R, S) int64; got ", k_cache.sizes(), " ", k_cache.scalar_type(), ", ", v_cache.sizes(), " ",
              v_cache.scalar_type(), ", ", pos_cache.sizes(), " ", pos_cache.scalar_type());
  const int64_t B = x.size(0), R = k_cache.size(0), S = k_cache.size(1);
  check_row_vector(rows, B, "rows", torch::kLong);
  check_row_vector(slots, B, "slots", torch::kLong);
  check_row_vector(n_slots, B, "n_slots", torch::kLong);
  check_row_vector(pos, B, "pos", torch::kLong);
  const LayerWeights w = layer_weights(x.size(1), k_cache.size(-1), attn_norm, ffn_norm, eps, wqkv, wqkv_scale,
                                       wqkv_n, wqkv_g, wo, wo_scale, wo_n, wo_g, w13, w13_scale, w13_n, w13_g, w2,
                                       w2_scale, w2_n, w2_g, router_t, experts_w13, experts_w13_scale, experts_w2,
                                       experts_w2_scale, expert_hidden, experts_g, experts_w3, experts_type, H, K,
                                       qk_norm);
  check_cache_heads(k_cache, w.K, w.D);
  const int64_t D = w.D, row_values = S * w.K * D;
  TORCH_CHECK(cos_sin.numel() == 0 || (cos_sin.scalar_type() == torch::kFloat32 && cos_sin.is_contiguous() &&
                                       cos_sin.numel() == B * D),
              "decode_layer_rows: cos_sin must be empty or a contiguous fp32 (", B, ", ", D / 2, ", 2) tensor; got ",
              cos_sin.scalar_type(), " of shape ", cos_sin.sizes());
  if (q_scale.numel() > 0) check_row_vector(q_scale, B, "q_scale", torch::kFloat32);
  const int64_t *rp = rows.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>(), *np = n_slots.data_ptr<int64_t>(),
                *pp = pos.data_ptr<int64_t>();
  // Rows may share a cache row (a prefill piece: one sequence's new tokens, KVCache.piece_slots) but never a slot:
  // layer_rows writes every row's key and value before any row attends, each to its own slot.
  std::vector<RowStep> steps(B);
  const size_t elem = k_cache.element_size();
  for (int64_t b = 0; b < B; ++b) {
    bool shared_slot = false;
    for (int64_t a = 0; a < b; ++a) shared_slot |= rp[a] == rp[b] && sp[a] == sp[b];
    TORCH_CHECK(rp[b] >= 0 && rp[b] < R && !shared_slot, "decode_layer_rows: row ", b, "'s cache row ", rp[b],
                " is outside the cache's ", R, " rows or its slot ", sp[b], " is taken by an earlier row");
    TORCH_CHECK(sp[b] >= 0 && sp[b] < np[b] && np[b] <= S && pp[b] >= 0, "decode_layer_rows: row ", b, "'s slot ",
                sp[b], " / ", np[b], " slots at position ", pp[b], " do not fit a cache row of ", S, " slots");
    steps[b] = {static_cast<char*>(k_cache.data_ptr()) + rp[b] * row_values * elem,
                static_cast<char*>(v_cache.data_ptr()) + rp[b] * row_values * elem,
                pos_cache.data_ptr<int64_t>() + rp[b] * S, sp[b], np[b], pp[b],
                cos_sin.numel() ? cos_sin.data_ptr<float>() + b * D : nullptr,
                q_scale.numel() ? q_scale.data_ptr<float>()[b] : 1.0f};
  }
  auto out = torch::empty({B, w.dim}, torch::kFloat32);
  layer_rows(w, x.data_ptr<float>(), B, steps, k_cache.scalar_type(), chunk, out.data_ptr<float>());
  return out;
}
