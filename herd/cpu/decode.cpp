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

// Keys j0..j1-1 of `attend_one`, read in memory order: all kv heads of key j, then key j + 1 (the cache is
// (S, K, D)). Measured on SmolLM2's shapes, 517 keys, 30 layers' caches from L3, 1 thread: one kv head at a time
// 262 us per layer, in memory order 230, with the prefetch 172-189; 4 keys' sums at once: 105 -> 77 us from L2.
// For each query head h:
// top[h] = the largest visible score, total[h] = sum of e^(score - top[h]), acc[h] (D) = the sum of those weights
// times the values; the caller merges ranges (log-sum-exp). No visible key: top = -inf, total 0, acc 0.
template <typename T>
void attend_range(const float* q, const T* k, const T* v, const uint8_t* visible, int64_t j0, int64_t j1,
                  int64_t K, int64_t G, int64_t D, float* top, float* total, float* acc) {
  const int64_t H = K * G, n = j1 - j0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> scores(H * n);                    // (H, n)
  std::fill(top, top + H, neg_inf);
  const int64_t row_bytes = K * D * static_cast<int64_t>(sizeof(T));
  int64_t j = j0;
  if (D % 16 == 0) {         // 4 keys at a time: their 4 dot products per head summed across lanes together
    for (; j + 4 <= j1; j += 4) {
      const T* row = k + j * K * D;
      prefetch_ahead(row, 4 * row_bytes, (j1 - j) / 4);
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = q + h * D;
        const T* kh = row + (h / G) * D;
        f32x16 a[4] = {zero(), zero(), zero(), zero()};
        for (int64_t d = 0; d < D; d += 16) {
          const f32x16 qv = load(qh + d);
          for (int r = 0; r < 4; ++r) a[r] = fmadd(qv, load16(kh + r * K * D + d), a[r]);
        }
        float dots[4];
        _mm_storeu_ps(dots, hsum4(a));
        for (int r = 0; r < 4; ++r) {
          const float s = visible[j + r] ? dots[r] * scale : neg_inf;
          scores[h * n + (j + r - j0)] = s;
          top[h] = std::max(top[h], s);
        }
      }
    }
  }
  for (; j < j1; ++j) {
    const T* row = k + j * K * D;
    prefetch_ahead(row, row_bytes, j1 - j);
    for (int64_t h = 0; h < H; ++h) {
      const float s = visible[j] ? dot(q + h * D, row + (h / G) * D, D) * scale : neg_inf;
      scores[h * n + (j - j0)] = s;
      top[h] = std::max(top[h], s);
    }
  }
  for (int64_t h = 0; h < H; ++h) {                    // e^(s - top); masked scores are -inf and give exactly 0
    float* sh = scores.data() + h * n;
    total[h] = 0.0f;
    if (top[h] == neg_inf) {                           // nothing visible here: weights all 0
      std::fill(sh, sh + n, 0.0f);
      continue;
    }
    const f32x16 m = set1(top[h]);
    f32x16 sum = zero();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const f32x16 e = exp(sub(load(sh + i), m));
      store(sh + i, e);
      sum = add(sum, e);
    }
    total[h] = reduce_add(sum);
    for (; i < n; ++i) {
      sh[i] = std::exp(sh[i] - top[h]);
      total[h] += sh[i];
    }
  }
  std::fill(acc, acc + H * D, 0.0f);
  for (j = j0; j < j1; ++j) {
    if (!visible[j]) continue;
    const T* row = v + j * K * D;
    prefetch_ahead(row, row_bytes, j1 - j);
    for (int64_t h = 0; h < H; ++h) axpy(scores[h * n + (j - j0)], row + (h / G) * D, acc + h * D, D);
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

// attend_one on raw pointers: k, v (S, K, D) of T, k_pos (S,), out (H*D) written.
template <typename T>
void attend_one_raw(const float* qp, const T* k, const T* v, const int64_t* kp, int64_t S, int64_t K, int64_t D,
                    int64_t H, int64_t q_pos, int64_t chunk, float* op) {
  const int64_t G = H / K;
  const int64_t lo = chunk > 0 ? q_pos - q_pos % chunk : 0;
  std::vector<uint8_t> visible(S);
  for (int64_t j = 0; j < S; ++j) visible[j] = kp[j] >= 0 && kp[j] >= lo && kp[j] <= q_pos;
  // Key ranges in parallel (kernels.cpp's SpinPool, as the matmuls around it) only when there is enough cache to
  // read: a short context is cheaper on one thread. Ranges of at least 256 keys.
  const int64_t n_ranges = S * K * D >= 65536 ? std::min<int64_t>(at::get_num_threads(), (S + 255) / 256) : 1;
  const int64_t per = (S + n_ranges - 1) / n_ranges;
  std::vector<float> top(n_ranges * H), total(n_ranges * H), acc(n_ranges * H * D);
  auto ranges = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j0 = std::min(S, r * per), j1 = std::min(S, j0 + per);
      attend_range(qp, k, v, visible.data(), j0, j1, K, G, D, &top[r * H], &total[r * H], &acc[r * H * D]);
    }
  };
  if (n_ranges > 1) {
    parallel_rows(n_ranges, ranges);
  } else {
    ranges(0, 1);
  }
  // merge: out[h] = sum_r e^(top_r - M) acc_r / sum_r e^(top_r - M) total_r, M = max_r top_r
  std::fill(op, op + H * D, 0.0f);
  for (int64_t h = 0; h < H; ++h) {
    float M = -std::numeric_limits<float>::infinity(), denom = 0.0f;
    for (int64_t r = 0; r < n_ranges; ++r) M = std::max(M, top[r * H + h]);
    if (M == -std::numeric_limits<float>::infinity()) continue;      // no visible key at all: zeros
    for (int64_t r = 0; r < n_ranges; ++r) {
      if (total[r * H + h] == 0.0f) continue;
      const float w = std::exp(top[r * H + h] - M);
      denom += w * total[r * H + h];
      axpy(w, &acc[(r * H + h) * D], op + h * D, D);
    }
    for (int64_t i = 0; i < D; ++i) op[h * D + i] /= denom;
  }
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
// pointers, checked when built (layer_matrix, expert_matrices, gguf_expert_matrices). `apply` is one row's product.
struct LayerMatrix {
  enum Kind { kFp32, kInt8, kInt4, kGguf } kind;
  const void* data;
  const float* row_scale;     // int8 only
  int64_t K, N, G;            // G: int4 only; for kGguf the GGML type

  void apply(const float* x, float* y) const {
    if (kind == kFp32) {
      fp32_mm_raw(x, 1, K, static_cast<const float*>(data), N, y);
    } else if (kind == kInt8) {
      int8_mm_raw(x, 1, K, static_cast<const int8_t*>(data), row_scale, N, y);
    } else if (kind == kInt4) {
      int4_mm_raw(x, 1, K, static_cast<const uint8_t*>(data), N, G, y);
    } else {
      gguf_mm_raw(x, 1, K, static_cast<const uint8_t*>(data), N, G, y);
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
  check_int4(data, K, N, G);
  return {LayerMatrix::kInt4, data.data_ptr<uint8_t>(), nullptr, K, N, G};
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

// this token's k or v (K*D fp32) into the cache slot's row, cast to the cache's dtype (round to nearest even, as
// torch's copy_)
void write_slot(const float* src, torch::Tensor& cache, int64_t slot) {
  const int64_t n = cache.size(1) * cache.size(2);
  if (cache.scalar_type() == torch::kFloat32) {
    std::memcpy(cache.data_ptr<float>() + slot * n, src, n * sizeof(float));
  } else if (cache.scalar_type() == torch::kBFloat16) {
    at::BFloat16* dst = cache.data_ptr<at::BFloat16>() + slot * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i]);
  } else {
    at::Half* dst = cache.data_ptr<at::Half>() + slot * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = at::Half(src[i]);
  }
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
// torch calls cost ~1 ms of a 30-layer SmolLM2 step in dispatch alone.
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
  TORCH_CHECK(slot >= 0 && slot < k_cache.size(0) && n_slots > slot && n_slots <= k_cache.size(0) &&
                  pos_cache.scalar_type() == torch::kLong && pos_cache.is_contiguous() &&
                  pos_cache.numel() == k_cache.size(0),
              "decode_layer: slot ", slot, " / ", n_slots, " slots do not fit a cache of ", k_cache.sizes());
  const int64_t dim = x.size(1), D = k_cache.size(2), F = w13_n / 2;
  TORCH_CHECK(H > 0 && k_cache.size(1) == K && H % K == 0 && wqkv_n == (H + 2 * K) * D && w13_n % 2 == 0,
              "decode_layer: ", H, " query heads and ", K, " kv heads of ", D, " do not match wqkv's ", wqkv_n,
              " outputs or the cache ", k_cache.sizes());
  check_norm(attn_norm, dim, "attn_norm");
  check_norm(ffn_norm, dim, "ffn_norm");
  check_cos_sin(cos_sin, D);
  const LayerMatrix m_qkv = layer_matrix(wqkv, wqkv_scale, dim, wqkv_n, wqkv_g, "wqkv"),
                    m_o = layer_matrix(wo, wo_scale, H * D, wo_n, wo_g, "wo"),
                    m_13 = layer_matrix(w13, w13_scale, dim, w13_n, w13_g, "w13"),
                    m_2 = layer_matrix(w2, w2_scale, F, w2_n, w2_g, "w2");
  TORCH_CHECK(wo_n == dim && w2_n == dim, "decode_layer: wo and w2 must have ", dim, " outputs; got ", wo_n, " and ",
              w2_n);
  const bool moe = router_t.numel() > 0;
  const int64_t E = moe ? router_t.size(-1) : 0, Fe = expert_hidden;
  const bool gguf = experts_type != 0;
  ExpertMatrices e_13{}, e_3{}, e_2{};           // GGUF: e_13 the gate only, e_3 the up
  if (moe) {
    check_fp32(router_t, dim);
    TORCH_CHECK(Fe > 0, "decode_layer: expert_hidden must be > 0; got ", Fe);
    if (gguf) {
      e_13 = gguf_expert_matrices(experts_w13, E, dim, Fe, experts_type, "experts_w13 (gate)");
      e_3 = gguf_expert_matrices(experts_w3, E, dim, Fe, experts_type, "experts_w3 (up)");
      e_2 = gguf_expert_matrices(experts_w2, E, Fe, dim, experts_type, "experts_w2");
    } else {
      e_13 = expert_matrices(experts_w13, experts_w13_scale, E, dim, 2 * Fe, experts_g, "experts_w13");
      e_2 = expert_matrices(experts_w2, experts_w2_scale, E, Fe, dim, experts_g, "experts_w2");
    }
  }
  const float e = static_cast<float>(eps);
  const float* xp = x.data_ptr<float>();
  std::vector<float> normed(dim), qkv(wqkv_n), attn(H * D), h(dim), gate_up(w13_n), act(F), ffn(dim);
  rms_norm_row(xp, attn_norm.data_ptr<float>(), dim, e, normed.data());
  m_qkv.apply(normed.data(), qkv.data());
  prepare_qkv(qkv.data(), cos_sin.numel() ? cos_sin.data_ptr<float>() : nullptr, H, K, D, qk_norm, e,
              static_cast<float>(q_scale));
  write_slot(qkv.data() + H * D, k_cache, slot);
  write_slot(qkv.data() + (H + K) * D, v_cache, slot);
  pos_cache.data_ptr<int64_t>()[slot] = pos;
  attend_one_raw(qkv.data(), k_cache, v_cache, pos_cache.data_ptr<int64_t>(), n_slots, H, pos, chunk, attn.data());
  m_o.apply(attn.data(), h.data());
  for (int64_t i = 0; i < dim; ++i) h[i] += xp[i];                 // h = x + wo(...), in the model's order
  rms_norm_row(h.data(), ffn_norm.data_ptr<float>(), dim, e, normed.data());
  m_13.apply(normed.data(), gate_up.data());
  silu_mul_row(gate_up.data(), gate_up.data() + F, F, act.data());
  m_2.apply(act.data(), ffn.data());
  if (moe) {
    std::vector<float> logits(E), gated(dim), e_gate_up(2 * Fe), e_act(Fe), routed(dim);
    fp32_mm_raw(normed.data(), 1, dim, router_t.data_ptr<float>(), E, logits.data());
    const int64_t chosen = std::max_element(logits.begin(), logits.end()) - logits.begin();   // the first largest
    const float gate = 1.0f / (1.0f + std::exp(-logits[chosen]));
    for (int64_t i = 0; i < dim; ++i) gated[i] = normed[i] * gate;
    e_13.expert(chosen).apply(gated.data(), e_gate_up.data());            // gate | up, or the gate alone
    if (gguf) e_3.expert(chosen).apply(gated.data(), e_gate_up.data() + Fe);
    silu_mul_row(e_gate_up.data(), e_gate_up.data() + Fe, Fe, e_act.data());
    e_2.expert(chosen).apply(e_act.data(), routed.data());
    for (int64_t i = 0; i < dim; ++i) ffn[i] += routed[i];          // shared + routed
  }
  auto out = torch::empty({1, dim}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < dim; ++i) o[i] = h[i] + ffn[i];
  return out;
}
