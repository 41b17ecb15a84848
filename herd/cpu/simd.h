// 16-lane vectors for herd's CPU kernels: one 512-bit register with AVX-512 (+ VNNI), two 256-bit registers with
// AVX2 + FMA + F16C. kernels.cpp and decode.cpp are written once against these types and functions; setup.py
// compiles them once per instruction set (the compiler flags pick the branch below) and extension.py loads the
// variant the CPU runs. It knows nothing of matrices, layouts or torch.
//
// A lane is what one output row or one input needs: the kernels keep 16 output rows side by side, one 32-bit lane
// each, so every operation here is lane-wise except the named reductions, and both branches give the same bits
// lane for lane (int32 sums are exact; float ops are the same IEEE operations in the same order). The reductions
// (reduce_add, reduce_max, fold8) add the lanes in a fixed tree that differs between the branches, so a float
// sum over lanes can differ in its last bits between AVX-512 and AVX2 builds.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define HERD_AVX512 1
#define HERD_ISA "AVX512-VNNI"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HERD_AVX512 0
#define HERD_ISA "AVX2+FMA"
#else
#error "herd's kernels need AVX-512 (F, BW, VL, DQ, VNNI) or AVX2 + FMA + F16C (setup.py passes the -m flags)"
#endif

namespace simd {

#if HERD_AVX512
struct f32x16 { __m512 v; };               // 16 floats
struct i32x16 { __m512i v; };              // 16 int32 lanes; also 32 int16 or 64 bytes, as the operation says
// Independent accumulator chains per dot product in the int kernels: VPDPWSSD's result feeds the next one of the
// chain (~5 cycles latency), so 4 chains keep the unit busy.
constexpr int kDotChains = 4;
#else
struct f32x16 { __m256 lo, hi; };          // lanes 0-7, 8-15
struct i32x16 { __m256i lo, hi; };
// AVX2 has no VPDPWSSD: a dot step is VPMADDWD (independent of the accumulator) + VPADDD (1 cycle), so few chains
// suffice: 2 at one activation row (measured on AMD Zen 2, int4 4096 x 4096, 1 thread: 523 -> 500 us; 4 chains
// 588), 1 from two rows on (2 chains at 2 rows: 874 -> 937 us), where more would not fit in 16 registers.
constexpr int kDotChains = 2;
#endif
// Chains per activation row when MT rows share each weight load: the rows are independent chains themselves, and
// 4 rows x 4 chains of accumulators overflow AVX-512's 32 registers (measured, 576 x 3072 int4 at 2 threads: 122
// GMAC/s at 3 rows x 4 chains, 89 at 4 x 4). AVX-512: at most 8 accumulators in all, at least one per row; AVX2:
// kDotChains at one row, one per row from two rows on (above).
template <int MT>
constexpr int dot_chains() {
  return HERD_AVX512 ? (kDotChains < 8 / MT ? kDotChains : (8 / MT > 0 ? 8 / MT : 1)) : (MT == 1 ? kDotChains : 1);
}

// ---- floats ---------------------------------------------------------------------------------------------------------
#if HERD_AVX512
inline f32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, f32x16 a) { _mm512_storeu_ps(p, a.v); }
inline f32x16 set1(float x) { return {_mm512_set1_ps(x)}; }
inline f32x16 zero() { return {_mm512_setzero_ps()}; }
inline f32x16 add(f32x16 a, f32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline f32x16 sub(f32x16 a, f32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline f32x16 mul(f32x16 a, f32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline f32x16 div(f32x16 a, f32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline f32x16 max(f32x16 a, f32x16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline f32x16 min(f32x16 a, f32x16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }      // a b + c
inline f32x16 fnmadd(f32x16 a, f32x16 b, f32x16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }    // c - a b
inline f32x16 abs(f32x16 a) { return {_mm512_andnot_ps(_mm512_set1_ps(-0.0f), a.v)}; }
inline f32x16 neg(f32x16 a) { return {_mm512_xor_ps(a.v, _mm512_set1_ps(-0.0f))}; }
inline f32x16 round_even(f32x16 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// a < b ? t : f and a > b ? t : f, lane-wise (ordered: a NaN compares false)
inline f32x16 select_lt(f32x16 a, f32x16 b, f32x16 t, f32x16 f) {
  return {_mm512_mask_mov_ps(f.v, _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), t.v)};
}
inline f32x16 select_gt(f32x16 a, f32x16 b, f32x16 t, f32x16 f) {
  return {_mm512_mask_mov_ps(f.v, _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ), t.v)};
}
// p * 2^n for integral n in [-126, 128], exact while the result is a normal float (VSCALEFPS)
inline f32x16 scale_pow2(f32x16 p, f32x16 n) { return {_mm512_scalef_ps(p.v, n.v)}; }
inline float reduce_add(f32x16 a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(f32x16 a) { return _mm512_reduce_max_ps(a.v); }
// lanes i and i + 8 added: the 8 sums
inline __m256 fold8(f32x16 a) { return _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1)); }
// 16 bf16 (32 bytes) -> fp32: the bits shifted into the high half
inline f32x16 load_bf16(const void* p) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline f32x16 load_f16(const void* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)))}; }
#else
inline f32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, f32x16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline f32x16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline f32x16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f32x16 add(f32x16 a, f32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f32x16 sub(f32x16 a, f32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f32x16 mul(f32x16 a, f32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f32x16 div(f32x16 a, f32x16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline f32x16 max(f32x16 a, f32x16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline f32x16 min(f32x16 a, f32x16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 fnmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 abs(f32x16 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
inline f32x16 neg(f32x16 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_xor_ps(a.lo, sign), _mm256_xor_ps(a.hi, sign)};
}
inline f32x16 round_even(f32x16 a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
inline f32x16 select_lt(f32x16 a, f32x16 b, f32x16 t, f32x16 f) {
  return {_mm256_blendv_ps(f.lo, t.lo, _mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ)),
          _mm256_blendv_ps(f.hi, t.hi, _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ))};
}
inline f32x16 select_gt(f32x16 a, f32x16 b, f32x16 t, f32x16 f) {
  return {_mm256_blendv_ps(f.lo, t.lo, _mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ)),
          _mm256_blendv_ps(f.hi, t.hi, _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ))};
}
// p * 2^n for integral n in [-126, 128]: 2^n built in the exponent field as 2^(n/2) * 2^(n - n/2), each factor a
// normal float (2^128 alone is not), so p * a is exact and p * a * b rounds once, as VSCALEFPS does.
inline __m256 pow2_8(__m256i n) {                          // 2^n for integral n in [-126, 127], built in the exponent
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
inline __m256 scale_pow2_8(__m256 p, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2_8(half)), pow2_8(_mm256_sub_epi32(ni, half)));
}
inline f32x16 scale_pow2(f32x16 p, f32x16 n) { return {scale_pow2_8(p.lo, n.lo), scale_pow2_8(p.hi, n.hi)}; }
inline __m256 fold8(f32x16 a) { return _mm256_add_ps(a.lo, a.hi); }
inline float reduce_add(f32x16 a) {
  const __m256 s = fold8(a);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline float reduce_max(f32x16 a) {
  const __m256 s = _mm256_max_ps(a.lo, a.hi);
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
inline __m256 bf16x8_to_fp32(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline f32x16 load_bf16(const void* p) {
  const __m128i* q = static_cast<const __m128i*>(p);
  return {bf16x8_to_fp32(_mm_loadu_si128(q)), bf16x8_to_fp32(_mm_loadu_si128(q + 1))};
}
inline f32x16 load_f16(const void* p) {
  const __m128i* q = static_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
#endif

// ---- integers -------------------------------------------------------------------------------------------------------
#if HERD_AVX512
inline i32x16 load_bytes(const void* p) { return {_mm512_loadu_si512(p)}; }        // 64 bytes
inline i32x16 zero_i32() { return {_mm512_setzero_si512()}; }
inline i32x16 set1_i16(int16_t x) { return {_mm512_set1_epi16(x)}; }
inline i32x16 set1_i32(int32_t x) { return {_mm512_set1_epi32(x)}; }
inline i32x16 and_bits(i32x16 a, i32x16 b) { return {_mm512_and_si512(a.v, b.v)}; }
inline i32x16 add_i32(i32x16 a, i32x16 b) { return {_mm512_add_epi32(a.v, b.v)}; }
template <int n> inline i32x16 srli_i16(i32x16 a) { return {_mm512_srli_epi16(a.v, n)}; }     // per 16-bit lane
template <int n> inline i32x16 slli_i16(i32x16 a) { return {_mm512_slli_epi16(a.v, n)}; }
template <int n> inline i32x16 srai_i16(i32x16 a) { return {_mm512_srai_epi16(a.v, n)}; }
template <int n> inline i32x16 srli_i32(i32x16 a) { return {_mm512_srli_epi32(a.v, n)}; }     // per 32-bit lane
// acc + the sums of adjacent int16 products a[2i] b[2i] + a[2i+1] b[2i+1] in each 32-bit lane (VPDPWSSD)
inline i32x16 dot_i16(i32x16 acc, i32x16 a, i32x16 b) { return {_mm512_dpwssd_epi32(acc.v, a.v, b.v)}; }
inline f32x16 to_f32(i32x16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline i32x16 to_i32(f32x16 a) { return {_mm512_cvtps_epi32(a.v)}; }      // round to nearest even (default MXCSR)
// int32 lanes -> 16 int16 (32 bytes) in lane order, saturating
inline __m256i narrow_i16_saturate(i32x16 a) { return _mm512_cvtsepi32_epi16(a.v); }
// int32 lanes in 0..65535 -> 16 uint16 in lane order (the low halves)
inline __m256i narrow_u16(i32x16 a) { return _mm512_cvtepi32_epi16(a.v); }
// 32 int8 (lo: values 0-15, hi: 16-31) sign-extended to 32 int16 in that order (one 64-byte i32x16)
inline i32x16 widen_i8(__m128i lo, __m128i hi) { return {_mm512_cvtepi8_epi16(_mm256_set_m128i(hi, lo))}; }
#else
inline i32x16 load_bytes(const void* p) {
  const __m256i* q = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
inline i32x16 zero_i32() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline i32x16 set1_i16(int16_t x) { return {_mm256_set1_epi16(x), _mm256_set1_epi16(x)}; }
inline i32x16 set1_i32(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
inline i32x16 and_bits(i32x16 a, i32x16 b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
inline i32x16 add_i32(i32x16 a, i32x16 b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
template <int n> inline i32x16 srli_i16(i32x16 a) { return {_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)}; }
template <int n> inline i32x16 slli_i16(i32x16 a) { return {_mm256_slli_epi16(a.lo, n), _mm256_slli_epi16(a.hi, n)}; }
template <int n> inline i32x16 srai_i16(i32x16 a) { return {_mm256_srai_epi16(a.lo, n), _mm256_srai_epi16(a.hi, n)}; }
template <int n> inline i32x16 srli_i32(i32x16 a) { return {_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)}; }
// VPMADDWD then VPADDD: the same exact int32 sums as VPDPWSSD (no saturation in either)
inline i32x16 dot_i16(i32x16 acc, i32x16 a, i32x16 b) {
  i32x16 r = {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(a.lo, b.lo)),
              _mm256_add_epi32(acc.hi, _mm256_madd_epi16(a.hi, b.hi))};
  // An empty asm that "changes" the sum: each step's sum must exist, in order, so GCC cannot reassociate a block's
  // products into a tree whose partial sums spill out of the 16 registers (it did: a 4-chunk block at 1 row kept
  // ~25 products on the stack). Measured on AMD Zen 2, 1 thread, int4 3072 x 576: 1 row 73.9 -> 59.4 us, 4 rows
  // 205 -> 178 us; SmolLM2 decode step 6.9 -> 6.5 ms at 1 row, 41.5 -> 37.5 ms at 16.
  __asm__("" : "+x"(r.lo), "+x"(r.hi));
  return r;
}
inline f32x16 to_f32(i32x16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline i32x16 to_i32(f32x16 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
// VPACKSSDW interleaves the two inputs per 128-bit half (lo0-3 hi0-3 lo4-7 hi4-7); the 64-bit permute restores order
inline __m256i narrow_i16_saturate(i32x16 a) { return _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), 0xD8); }
inline __m256i narrow_u16(i32x16 a) { return _mm256_permute4x64_epi64(_mm256_packus_epi32(a.lo, a.hi), 0xD8); }
inline i32x16 widen_i8(__m128i lo, __m128i hi) { return {_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)}; }
#endif

// e^x, ~1 ulp over the range softmax and SiLU use (x <= 0 after the max is subtracted; SiLU's e^-x for any x):
// x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (error < 2e-8 relative), times 2^n.
// Inputs below -87.3 give 0, above 88.7 give +inf, NaN gives NaN, like expf.
inline f32x16 exp(f32x16 x) {
  const f32x16 lo = set1(-87.33654f), hi = set1(88.72283f);
  const f32x16 clamped = min(hi, max(lo, x));            // operands in this order: a NaN x stays NaN
  const f32x16 n = round_even(mul(clamped, set1(1.44269504088896341f)));
  // r = x - n ln2, ln2 split in two so n * ln2_hi is exact
  f32x16 r = fnmadd(n, set1(0.693359375f), clamped);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  f32x16 p = set1(1.0f / 720);
  p = fmadd(p, r, set1(1.0f / 120));
  p = fmadd(p, r, set1(1.0f / 24));
  p = fmadd(p, r, set1(1.0f / 6));
  p = fmadd(p, r, set1(0.5f));
  p = fmadd(p, r, set1(1.0f));
  p = fmadd(p, r, set1(1.0f));
  f32x16 y = scale_pow2(p, n);
  y = select_lt(x, lo, zero(), y);
  return select_gt(x, hi, set1(__builtin_inff()), y);
}

// 16 finite floats -> bf16 (32 bytes), rounded to nearest even as torch's .to(bfloat16) (without AVX512-BF16,
// which the kernels do not require): add 0x7FFF plus the lowest kept bit, keep the high 16 bits.
inline __m256i to_bf16(f32x16 x) {
#if HERD_AVX512
  const i32x16 bits{_mm512_castps_si512(x.v)};
#else
  const i32x16 bits{_mm256_castps_si256(x.lo), _mm256_castps_si256(x.hi)};
#endif
  const i32x16 lsb = and_bits(srli_i32<16>(bits), set1_i32(1));
  return narrow_u16(srli_i32<16>(add_i32(bits, add_i32(lsb, set1_i32(0x7FFF)))));
}

// The lane sums of 4 vectors, as one 4-float vector: 16 -> 8 lanes by halves, then horizontal adds.
inline __m128 hsum4(const f32x16 a[4]) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(fold8(a[0]), fold8(a[1])), _mm256_hadd_ps(fold8(a[2]), fold8(a[3])));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));   // per 128-bit half, then the halves
}

}  // namespace simd
