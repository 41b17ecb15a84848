// The small steps between a decode step's matmuls, in C++: RMSNorm, q/k/v post-processing (rotary, QK-norm,
// attention temperature) and one query's attention over the KV cache. Built with kernels.cpp into one extension
// (kernels.py; the threads are kernels.cpp's parallel_rows); decode.py holds the modules that call these and the
// plain twins they are tested against.
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

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// e^x for 16 floats, ~1 ulp over the range softmax and SiLU use (x <= 0 after the max is subtracted; SiLU's
// e^-x for any x): x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (error < 2e-8 relative),
// times 2^n (VSCALEFPS). Inputs below -87.3 give 0, above 88.7 give +inf, NaN gives NaN, like expf.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.72283f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), over = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
  x = _mm512_min_ps(hi, _mm512_max_ps(lo, x));            // operands in this order: a NaN x stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, ln2 split in two so n * ln2_hi is exact
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512 y = _mm512_scalef_ps(p, n);                       // p * 2^n, exact, no overflow of the exponent field
  y = _mm512_mask_mov_ps(y, under, _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, over, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// sum of x[i]^2, i < n
inline float sum_squares(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 a = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(a, a, acc);
  }
  float s = _mm512_reduce_add_ps(acc);
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
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t n) {     // y += p * x
  const __m512 pv = _mm512_set1_ps(p);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, load16(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * to_float(x[i]);
}

// One kv head's share of `attend_one`: the G query heads q (G, D) over keys/values k, v (S, kv_stride) at offset
// 0 (already advanced to this head), visible[j] says which keys count -> out (G, D). Keys are read once for all G
// query heads; scores and softmax in fp32.
template <typename T>
void attend_kv_head(const float* q, const T* k, const T* v, int64_t kv_stride, const uint8_t* visible, int64_t S,
                    int64_t G, int64_t D, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> scores(G * S);
  std::vector<float> top(G, neg_inf);
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      float s = visible[j] ? dot(q + g * D, k + j * kv_stride, D) * scale : neg_inf;
      scores[g * S + j] = s;
      top[g] = std::max(top[g], s);
    }
  }
  std::vector<float> total(G, 0.0f);
  for (int64_t g = 0; g < G; ++g) {     // e^(s - max); masked scores are -inf and give exactly 0
    float* sg = scores.data() + g * S;
    const __m512 m = _mm512_set1_ps(top[g]);
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= S; j += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + j), m));
      _mm512_storeu_ps(sg + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    total[g] = _mm512_reduce_add_ps(acc);
    for (; j < S; ++j) {
      sg[j] = visible[j] ? std::exp(sg[j] - top[g]) : 0.0f;
      total[g] += sg[j];
    }
  }
  std::fill(out, out + G * D, 0.0f);
  for (int64_t j = 0; j < S; ++j) {
    if (!visible[j]) continue;
    for (int64_t g = 0; g < G; ++g) axpy(scores[g * S + j] / total[g], v + j * kv_stride, out + g * D, D);
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
  const bool rope = cos_sin.numel() > 0;
  TORCH_CHECK(!rope || (cos_sin.scalar_type() == torch::kFloat32 && cos_sin.is_contiguous() && cos_sin.numel() == D),
              "decode_qkv: cos_sin must be a contiguous fp32 (", D / 2, ", 2) tensor; got ", cos_sin.scalar_type(),
              " of shape ", cos_sin.sizes());
  auto out = qkv.clone();
  float* o = out.data_ptr<float>();
  const float* cs = rope ? cos_sin.data_ptr<float>() : nullptr;
  std::vector<float> tmp(D);
  for (int64_t h = 0; h < H + K; ++h) {          // q heads, then k heads; v stays as projected
    float* x = o + h * D;
    if (rope) {
      for (int64_t i = 0; i < D / 2; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1], x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
      }
    }
    if (qk_norm) {
      rms_norm_row(x, nullptr, D, static_cast<float>(eps), tmp.data());
      std::copy(tmp.begin(), tmp.end(), x);
    }
    if (h < H && q_scale != 1.0) {
      for (int64_t i = 0; i < D; ++i) x[i] *= static_cast<float>(q_scale);
    }
  }
  return {out.narrow(0, 0, H * D), out.narrow(0, H * D, K * D), out.narrow(0, (H + K) * D, K * D)};
}

// One query (H*D fp32, position q_pos) over cached keys and values k, v (S, K, D) fp32 or bf16 with positions
// k_pos (S,) int64 -> (H*D) fp32. Key j counts iff 0 <= k_pos[j] <= q_pos and, when chunk > 0, it lies in the
// query's chunk (k_pos[j] >= q_pos - q_pos % chunk): model.attention_mask for one query. Query heads h*G .. h*G+G-1
// share kv head h (G = H / K).
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_pos, int64_t q_pos,
                         int64_t chunk) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                  k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16),
              "attend_one: k and v must be contiguous (S, K, D) fp32 or bf16 tensors of one shape; got ", k.sizes(),
              " ", k.scalar_type(), " and ", v.sizes(), " ", v.scalar_type());
  const int64_t S = k.size(0), K = k.size(1), D = k.size(2);
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.numel() % (K * D) == 0,
              "attend_one: q must be a contiguous fp32 tensor of H * ", D, " values with H a multiple of ", K,
              "; got ", q.scalar_type(), " of shape ", q.sizes());
  TORCH_CHECK(k_pos.scalar_type() == torch::kLong && k_pos.is_contiguous() && k_pos.numel() == S,
              "attend_one: k_pos must be a contiguous int64 (", S, ",) tensor; got ", k_pos.scalar_type(),
              " of shape ", k_pos.sizes());
  const int64_t H = q.numel() / D, G = H / K;
  const int64_t lo = chunk > 0 ? q_pos - q_pos % chunk : 0;
  std::vector<uint8_t> visible(S);
  const int64_t* kp = k_pos.data_ptr<int64_t>();
  for (int64_t j = 0; j < S; ++j) visible[j] = kp[j] >= 0 && kp[j] >= lo && kp[j] <= q_pos;
  auto out = torch::empty({H * D}, torch::kFloat32);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // kv heads in parallel (kernels.cpp's SpinPool, as the matmuls around it) only when there is enough cache to
  // read: a short context is cheaper on one thread
  auto heads = [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      if (k.scalar_type() == torch::kFloat32) {
        attend_kv_head(qp + h * G * D, k.data_ptr<float>() + h * D, v.data_ptr<float>() + h * D, K * D,
                       visible.data(), S, G, D, op + h * G * D);
      } else {
        attend_kv_head(qp + h * G * D, k.data_ptr<at::BFloat16>() + h * D, v.data_ptr<at::BFloat16>() + h * D,
                       K * D, visible.data(), S, G, D, op + h * G * D);
      }
    }
  };
  if (S * D >= 16384) {
    parallel_rows(K, heads);
  } else {
    heads(0, K);
  }
  return out;
}

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
  const __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *g = src + r * 2 * F, *u = g + F;
      float* o = dst + r * F;
      int64_t i = 0;
      for (; i + 16 <= F; i += 16) {           // g / (1 + e^-g) * u
        __m512 gv = _mm512_loadu_ps(g + i);
        __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_xor_ps(gv, sign))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
      }
      for (; i < F; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}
