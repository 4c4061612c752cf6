// Flash attention for bf16 inference on the CPU, called through ctypes: the products on Intel AMX
// tiles (Sapphire Rapids and later) or, on CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and 5), as
// vdpbf16ps on 512-bit vectors. It also needs AVX512-VBMI (one byte table lookup per 32
// probabilities), which Intel's Cooper Lake lacks: PyTorch's kernel runs there.
//
// Why our own: at SD's head widths (40, 64, 80, 160) PyTorch's CPU flash kernel spends most of its time
// outside the matrix products: it writes fp32 scores, makes separate passes for the row max and
// the float32 exp, and calls a general GEMM per block. Here the scores of 16 queries x 128 keys
// stay in L1, the exponentials are computed straight into bf16 bits (see probs_step), and the row
// max is usually not needed:
// softmax is the same for any shift of a row, and |q||k|max bounds the row's scores (Cauchy-
// Schwarz), so with that bound as the shift nothing overflows, and while the bound is small
// nothing underflows either. Rows with larger bounds take the usual running max.
//
// q, k, v and out are (B, H, tokens, width) with any strides but a contiguous last dimension, so
// the caller's (B, N, H, D) projections are read and written in place. K and V are first packed
// per head into the VNNI layouts of AMX B tiles (in `scratch`):
//   kp (nkv/16, ksteps, 16, 16, 2)   K^T: per 16 keys and 32 widths, pairs of widths
//   vp (nkv/32, nct, 16, 16, 2)      V: per 32 keys and 16 columns, pairs of keys
// with nkv the key count rounded up to 128 and zeros past the real keys and widths. Each row of a
// tile is also what one vdpbf16ps takes: 16 keys' pairs of widths (against a broadcast pair of
// one query), or 16 columns' pairs of keys (against a broadcast pair of one row's probabilities).
//
// On AMX, widths up to 64 (SD 2.x everywhere, SD 1.x at full resolution) keep the queries in two
// tiles and the output in four; wider heads (SD 1.x's 80 and 160) reload the query tiles per 32
// widths and take the output 64 columns at a time, after the whole block's probabilities.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

namespace {

constexpr int kQRows = 16;     // queries per work item: one tile of rows
// keys per softmax block. 128 keys (8 KB of fp32 scores, 4 KB of probabilities) ran the SD 1.5 U-Net's
// attention 16% faster than 256 (42 against 50 ms at 4096 tokens, 1.9 against 2.9 ms against 77
// text tokens, which 256 padded the most); 64 was no faster than 128.
constexpr int kKeyBlock = 128;
constexpr float kMaxBound = 62.0f;  // base-2 scores lie in [-bound, bound]: 2^(-2*62) is still normal
constexpr int kMaxWidth = 160;  // query/key and value widths taken
constexpr int kMaxKSteps = kMaxWidth / 32, kMaxColTiles = kMaxWidth / 16;

// All 8 tiles 16 rows x 64 bytes, but with a `tail` of widths (query/key widths past 32, under 32):
// the second query tile (1) as 16 x `tail` widths and the second key tile (7) as its tail / 2 pairs,
// so that the padding past the real widths is not loaded (SD 1.x's heads of 40 at 4,096 tokens:
// 10 KB of key tiles per 128 keys instead of 16 KB, and the call 35 against 38 ms).
void configure_tiles(int tail) {
  ldm::TileConfig cfg = ldm::full_tiles();
  if (tail > 0) {
    cfg.colsb[1] = (uint16_t)(2 * tail);
    cfg.rows[7] = (uint8_t)(tail / 2);
  }
  _tile_loadconfig(&cfg);
}

inline __mmask32 mask32_from(int n) {  // lanes [0, n) of 32
  return n >= 32 ? ~(__mmask32)0 : n <= 0 ? (__mmask32)0 : ((__mmask32)1 << n) - 1;
}

inline void store_bf16(uint16_t* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}

inline void store_scores(float* s) {  // tiles 3..6: 64 keys of 16 rows
  _tile_stored(3, s, kKeyBlock * 4);
  _tile_stored(4, s + 16, kKeyBlock * 4);
  _tile_stored(5, s + 32, kKeyBlock * 4);
  _tile_stored(6, s + 48, kKeyBlock * 4);
}

// scores (16 x 128, tiles 3..6 per 64 keys) = q (16 x 32*KSTEPS, in tiles 0/1) . kp tiles, B
// operands in tiles 2/7
template <int KSTEPS>
void block_scores(const uint16_t* q, const uint16_t* kp_block, float* scores) {
  _tile_loadd(0, q, KSTEPS * 64);
  if (KSTEPS == 2) _tile_loadd(1, q + 32, KSTEPS * 64);
  for (int g = 0; g < kKeyBlock / 64; ++g) {
    _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6);
    const uint16_t* k = kp_block + g * 4 * KSTEPS * 512;
#define LDM_KEY_TILE(c, t)                                        \
    _tile_loadd(2, k + ((c) * KSTEPS + 0) * 512, 64);            \
    _tile_dpbf16ps(t, 0, 2);                                     \
    if (KSTEPS == 2) {                                           \
      _tile_loadd(7, k + ((c) * KSTEPS + 1) * 512, 64);          \
      _tile_dpbf16ps(t, 1, 7);                                   \
    }
    LDM_KEY_TILE(0, 3) LDM_KEY_TILE(1, 4) LDM_KEY_TILE(2, 5) LDM_KEY_TILE(3, 6)
#undef LDM_KEY_TILE
    store_scores(scores + g * 64);
  }
}

// the same for any number of 32-width steps: the query tile of each step reloaded into tile 0
void block_scores_wide(const uint16_t* q, int ksteps, const uint16_t* kp_block, float* scores) {
  for (int g = 0; g < kKeyBlock / 64; ++g) {
    _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6);
    const uint16_t* k = kp_block + g * 4 * ksteps * 512;
    for (int s = 0; s < ksteps; ++s) {
      _tile_loadd(0, q + 32 * s, ksteps * 64);
      _tile_loadd(2, k + (0 * ksteps + s) * 512, 64); _tile_dpbf16ps(3, 0, 2);
      _tile_loadd(7, k + (1 * ksteps + s) * 512, 64); _tile_dpbf16ps(4, 0, 7);
      _tile_loadd(2, k + (2 * ksteps + s) * 512, 64); _tile_dpbf16ps(5, 0, 2);
      _tile_loadd(7, k + (3 * ksteps + s) * 512, 64); _tile_dpbf16ps(6, 0, 7);
    }
    store_scores(scores + g * 64);
  }
}

// Online softmax, when no fixed bound is safe: m becomes the running max of each row's scaled
// scores, and what acc and l hold so far is rescaled to it.
void raise_row_max(const float* scores, int valid, float c, float* m, float* l, float* acc, int nct) {
  for (int r = 0; r < kQRows; ++r) {
    const float* s = scores + r * kKeyBlock;
    __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
    for (int j = 0; j < valid; j += 32) {
      const __mmask16 lo = ldm::mask_from(valid - j), hi = ldm::mask_from(valid - j - 16);
      mx0 = _mm512_mask_max_ps(mx0, lo, mx0, _mm512_maskz_loadu_ps(lo, s + j));
      mx1 = _mm512_mask_max_ps(mx1, hi, mx1, _mm512_maskz_loadu_ps(hi, s + j + 16));
    }
    const float m_new = fmaxf(m[r], _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)) * c);
    const float alpha = exp2f(m[r] - m_new);  // 0 on the first block (m = -inf)
    m[r] = m_new;
    l[r] *= alpha;
    float* a = acc + r * kMaxWidth;
    for (int k = 0; k < nct; ++k)
      _mm512_storeu_ps(a + 16 * k, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * k), _mm512_set1_ps(alpha)));
  }
}

// 2^(f/128) for f = 0..127 as bf16 mantissas: f - kMantissaDrop[f] is the 7-bit mantissa of the
// bf16 nearest to 2^(f/128) (2^x lies below the chord 1 + x, so the drop is 0..11)
alignas(64) constexpr int8_t kMantissaDrop[128] = {
    0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4,
    4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 8,
    8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10,
    10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11,
    11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11,
    11, 11, 10, 10, 10, 10, 10, 10, 10, 10, 10, 9, 9, 9, 9, 9,
    9, 9, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 6, 6, 6, 6,
    5, 5, 5, 4, 4, 4, 3, 3, 3, 3, 2, 2, 1, 1, 1, 0,
};

// probs[:, j:j+32] = 2^(c*s - m) as bf16 for all 16 rows. This is the kernel's bottleneck (an
// exponential per score), so it is computed straight into bf16 bits: y = 128 (c*s - m) + 127*128,
// rounded to an integer, is a bf16 bit pattern whose exponent field (y >> 7) is right and whose
// mantissa field (y & 127) is the fraction f/128 of the power; one table lookup of 128 bytes turns
// f into the mantissa of 2^(f/128). The exponent is rounded to 1/128 (0.27% at most) before the
// bf16 rounding (0.39%) every probability gets anyway. Unsigned saturation takes powers below
// 2^-127 to 0. With SUMS the row sums are added to `sums` (otherwise V carries a column of ones and
// the product sums the probabilities); with MASKED the keys from `valid` on get 0.
template <bool SUMS, bool MASKED>
inline void probs_step(const float* scores, int valid, int j, float c, const float* m, uint16_t* probs,
                       __m512* sums) {
  const __m512 vc = _mm512_set1_ps(128.0f * c);
  const __m512i drop_lo = _mm512_load_si512(kMantissaDrop), drop_hi = _mm512_load_si512(kMantissaDrop + 64);
  const __m512i in_order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);  // undo packus's per-lane interleave
  const __mmask32 live = MASKED ? mask32_from(valid - j) : ~(__mmask32)0;
  for (int r = 0; r < kQRows; ++r) {
    const float* s = scores + r * kKeyBlock + j;
    const __m512 vm = _mm512_set1_ps(128.0f * m[r] - 127.0f * 128.0f);
    const __m512i y0 = _mm512_cvtps_epi32(_mm512_fmsub_ps(_mm512_loadu_ps(s), vc, vm));
    const __m512i y1 = _mm512_cvtps_epi32(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16), vc, vm));
    const __m512i y = _mm512_permutexvar_epi64(in_order, _mm512_packus_epi32(y0, y1));  // 32 x u16
    const __m512i drop = _mm512_maskz_permutex2var_epi8(0x5555555555555555ull, drop_lo, y, drop_hi);
    __m512i p = _mm512_sub_epi16(y, drop);
    if (MASKED) p = _mm512_maskz_mov_epi16(live, p);
    if (SUMS) {
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xffff0000)));
      sums[r] = _mm512_add_ps(sums[r], _mm512_add_ps(lo, hi));
    }
    _mm512_storeu_si512(probs + r * kKeyBlock + j, p);
  }
}

// One block of keys after its scores: per 32 keys, probs = 2^(c*s - m) as bf16 for all 16 rows
// (row sums into l with SUMS), then acc (16 x 16*NCT fp32, tiles 3..6) += probs . V on the tiles
// (A tile 2, B tiles 0, 6, 0 for up to 3 column tiles, which leaves tiles 1 and 7 to a narrowed
// configuration; else 0, 1, 7, 1). The AMX products of one 32-key step overlap the exponentials of
// the next.
template <int NCT, bool SUMS, bool MASKED>
void block_probs_values(const float* scores, int valid, float c, const float* m, float* l, uint16_t* probs,
                        const uint16_t* vp_block, float* acc) {
  constexpr int kAccStride = kMaxWidth * 4;
  if (NCT > 0) _tile_loadd(3, acc, kAccStride);
  if (NCT > 1) _tile_loadd(4, acc + 16, kAccStride);
  if (NCT > 2) _tile_loadd(5, acc + 32, kAccStride);
  if (NCT > 3) _tile_loadd(6, acc + 48, kAccStride);
  __m512 sums[kQRows];
  for (int r = 0; r < kQRows; ++r) sums[r] = _mm512_setzero_ps();
  for (int j = 0; j < valid; j += 32) {
    probs_step<SUMS, MASKED>(scores, valid, j, c, m, probs, sums);
    _tile_loadd(2, probs + j, kKeyBlock * 2);
    const uint16_t* v = vp_block + (j / 32) * NCT * 512;
    if (NCT <= 3) {
      _tile_loadd(0, v, 64); _tile_dpbf16ps(3, 2, 0);
      if (NCT > 1) { _tile_loadd(6, v + 512, 64); _tile_dpbf16ps(4, 2, 6); }
      if (NCT > 2) { _tile_loadd(0, v + 1024, 64); _tile_dpbf16ps(5, 2, 0); }
    } else {
      _tile_loadd(0, v, 64); _tile_dpbf16ps(3, 2, 0);
      _tile_loadd(1, v + 512, 64); _tile_dpbf16ps(4, 2, 1);
      _tile_loadd(7, v + 1024, 64); _tile_dpbf16ps(5, 2, 7);
      _tile_loadd(1, v + 1536, 64); _tile_dpbf16ps(6, 2, 1);
    }
  }
  if (SUMS)
    for (int r = 0; r < kQRows; ++r) l[r] += _mm512_reduce_add_ps(sums[r]);
  if (NCT > 0) _tile_stored(3, acc, kAccStride);
  if (NCT > 1) _tile_stored(4, acc + 16, kAccStride);
  if (NCT > 2) _tile_stored(5, acc + 32, kAccStride);
  if (NCT > 3) _tile_stored(6, acc + 48, kAccStride);
}

// All the block's probabilities (row sums into l with SUMS).
template <bool SUMS, bool MASKED>
void block_probs(const float* scores, int valid, float c, const float* m, float* l, uint16_t* probs) {
  __m512 sums[kQRows];
  for (int r = 0; r < kQRows; ++r) sums[r] = _mm512_setzero_ps();
  for (int j = 0; j < valid; j += 32) probs_step<SUMS, MASKED>(scores, valid, j, c, m, probs, sums);
  if (SUMS)
    for (int r = 0; r < kQRows; ++r) l[r] += _mm512_reduce_add_ps(sums[r]);
}

// The same for any number of 16-column tiles: all the block's probabilities first, then acc four
// column tiles at a time (tiles 3..6), probs in tile 2 and V in tiles 0, 1, 7, 1.
template <bool SUMS, bool MASKED>
void block_probs_values_wide(const float* scores, int valid, float c, const float* m, float* l, uint16_t* probs,
                             const uint16_t* vp_block, float* acc, int nct) {
  constexpr int kAccStride = kMaxWidth * 4;
  block_probs<SUMS, MASKED>(scores, valid, c, m, l, probs);
  for (int c0 = 0; c0 < nct; c0 += 4) {
    const int n = nct - c0 < 4 ? nct - c0 : 4;
    float* a = acc + 16 * c0;
    _tile_loadd(3, a, kAccStride);
    if (n > 1) _tile_loadd(4, a + 16, kAccStride);
    if (n > 2) _tile_loadd(5, a + 32, kAccStride);
    if (n > 3) _tile_loadd(6, a + 48, kAccStride);
    for (int j = 0; j < valid; j += 32) {
      _tile_loadd(2, probs + j, kKeyBlock * 2);
      const uint16_t* v = vp_block + ((j / 32) * nct + c0) * 512;
      _tile_loadd(0, v, 64); _tile_dpbf16ps(3, 2, 0);
      if (n > 1) { _tile_loadd(1, v + 512, 64); _tile_dpbf16ps(4, 2, 1); }
      if (n > 2) { _tile_loadd(7, v + 1024, 64); _tile_dpbf16ps(5, 2, 7); }
      if (n > 3) { _tile_loadd(1, v + 1536, 64); _tile_dpbf16ps(6, 2, 1); }
    }
    _tile_stored(3, a, kAccStride);
    if (n > 1) _tile_stored(4, a + 16, kAccStride);
    if (n > 2) _tile_stored(5, a + 32, kAccStride);
    if (n > 3) _tile_stored(6, a + 48, kAccStride);
  }
}

// -- the products without AMX: vdpbf16ps, one broadcast pair of bf16 against 16 pairs per call --

inline __m512bh pair_of(const uint16_t* p) {  // the two bf16 at p, in every 32-bit lane
  int32_t x;
  memcpy(&x, p, 4);
  return (__m512bh)_mm512_set1_epi32(x);
}

// scores (16 x 128) = q (16 x 32*ksteps) . K^T, for the 32-key chunks that hold real keys: 8 rows x
// 32 keys (16 accumulators) at a time, over the `pairs` pairs of widths that are not padding.
void vector_block_scores(const uint16_t* q, int ksteps, int pairs, const uint16_t* kp_block, int valid,
                         float* scores) {
  const int dk = 32 * ksteps, groups = (valid + 31) / 32 * 2;  // of 16 keys
  for (int g = 0; g < groups; g += 2) {
    const uint16_t* k0 = kp_block + (long)g * ksteps * 512;  // pair p of 16 keys at k0 + 32 p
    const uint16_t* k1 = k0 + ksteps * 512;
    for (int r0 = 0; r0 < kQRows; r0 += 8) {
      __m512 a0[8], a1[8];
      for (int i = 0; i < 8; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
      for (int p = 0; p < pairs; ++p) {
        const __m512bh kv0 = (__m512bh)_mm512_loadu_si512(k0 + 32 * p), kv1 = (__m512bh)_mm512_loadu_si512(k1 + 32 * p);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const __m512bh qp = pair_of(q + (r0 + i) * dk + 2 * p);
          a0[i] = _mm512_dpbf16_ps(a0[i], qp, kv0);
          a1[i] = _mm512_dpbf16_ps(a1[i], qp, kv1);
        }
      }
      for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(scores + (r0 + i) * kKeyBlock + 16 * g, a0[i]);
        _mm512_storeu_ps(scores + (r0 + i) * kKeyBlock + 16 * g + 16, a1[i]);
      }
    }
  }
}

// acc (16 x 16*NCT fp32) += probs . V over the block's real key pairs, kRows rows at a time with
// their kRows x NCT accumulators in registers (at most 20).
template <int NCT>
void vector_block_values(const uint16_t* probs, int valid, const uint16_t* vp_block, float* acc) {
  constexpr int kRows = NCT <= 5 ? 4 : 2;
  const int pairs = (valid + 1) / 2;  // an odd last key pairs with a probability of 0
  for (int r0 = 0; r0 < kQRows; r0 += kRows) {
    __m512 a[kRows][NCT];
    for (int i = 0; i < kRows; ++i)
      for (int t = 0; t < NCT; ++t) a[i][t] = _mm512_loadu_ps(acc + (r0 + i) * kMaxWidth + 16 * t);
    for (int p = 0; p < pairs; ++p) {
      const uint16_t* v = vp_block + (p / 16) * NCT * 512 + (p % 16) * 32;  // 16 columns' pair p
      __m512bh pp[kRows];
      for (int i = 0; i < kRows; ++i) pp[i] = pair_of(probs + (r0 + i) * kKeyBlock + 2 * p);
#pragma GCC unroll 10
      for (int t = 0; t < NCT; ++t) {
        const __m512bh vv = (__m512bh)_mm512_loadu_si512(v + t * 512);
        for (int i = 0; i < kRows; ++i) a[i][t] = _mm512_dpbf16_ps(a[i][t], pp[i], vv);
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int t = 0; t < NCT; ++t) _mm512_storeu_ps(acc + (r0 + i) * kMaxWidth + 16 * t, a[i][t]);
  }
}

// -- one block of keys, either way ----------------------------------------------------------

// The probabilities and values of one block on AMX, as the block needs: row sums unless V has a
// column of ones (`ones` >= 0), masks unless all its keys are real.
template <int NCT>
void probs_values(const float* scores, int valid, float c, const float* m, float* l, uint16_t* probs,
                  const uint16_t* vp_block, float* acc, int nct, int ones) {
  const bool sums = ones < 0, masked = valid < kKeyBlock;
#define LDM_PV(S, M)                                                                   \
  if constexpr (NCT > 0) block_probs_values<NCT, S, M>(scores, valid, c, m, l, probs, vp_block, acc); \
  else block_probs_values_wide<S, M>(scores, valid, c, m, l, probs, vp_block, acc, nct);
  if (sums && masked) { LDM_PV(true, true) }
  else if (sums) { LDM_PV(true, false) }
  else if (masked) { LDM_PV(false, true) }
  else { LDM_PV(false, false) }
#undef LDM_PV
}

// The products on AMX tiles: KSTEPS (1, 2) and NCT (1..4) fixed for widths up to 64; 0 and 0 for
// wider heads, with their `ksteps` and `nct` at run time.
template <int KSTEPS, int NCT>
struct AmxProducts {
  static constexpr int kKSteps = KSTEPS, kNct = NCT;
  static void scores(const uint16_t* q, int ksteps, int, const uint16_t* kp_block, int, float* scores) {
    if (KSTEPS > 0) block_scores<KSTEPS>(q, kp_block, scores);
    else block_scores_wide(q, ksteps, kp_block, scores);
  }
  static void probs_values(const float* scores, int valid, float c, const float* m, float* l, uint16_t* probs,
                           const uint16_t* vp_block, float* acc, int nct, int ones) {
    ::probs_values<NCT>(scores, valid, c, m, l, probs, vp_block, acc, nct, ones);
  }
};

// The products as vdpbf16ps (NCT: 1..10 column tiles); the probabilities of the whole block first.
template <int NCT>
struct VectorProducts {
  static constexpr int kKSteps = 0, kNct = NCT;
  static void scores(const uint16_t* q, int ksteps, int pairs, const uint16_t* kp_block, int valid, float* scores) {
    vector_block_scores(q, ksteps, pairs, kp_block, valid, scores);
  }
  static void probs_values(const float* scores, int valid, float c, const float* m, float* l, uint16_t* probs,
                           const uint16_t* vp_block, float* acc, int, int ones) {
    const bool sums = ones < 0, masked = valid < kKeyBlock;
    if (sums && masked) block_probs<true, true>(scores, valid, c, m, l, probs);
    else if (sums) block_probs<true, false>(scores, valid, c, m, l, probs);
    else if (masked) block_probs<false, true>(scores, valid, c, m, l, probs);
    else block_probs<false, false>(scores, valid, c, m, l, probs);
    vector_block_values<NCT>(probs, valid, vp_block, acc);
  }
};

// 16 query rows against all keys, the products as P does them (AmxProducts or VectorProducts).
// `pairs`: pairs of query/key widths that are not padding; `ones`: V's column of ones, or -1.
template <class P>
void attend_rows(const uint16_t* q, const uint16_t* kp, const uint16_t* vp, uint16_t* out, int kv_len, float c,
                 const float* bounds, int ksteps, int nct, int pairs, int ones) {
  if (P::kKSteps > 0) ksteps = P::kKSteps;
  if (P::kNct > 0) nct = P::kNct;
  alignas(64) float scores[kQRows * kKeyBlock];
  alignas(64) uint16_t probs[kQRows * kKeyBlock];
  alignas(64) float acc[kQRows * kMaxWidth];
  float m[kQRows], l[kQRows];
  // a fixed bound per row is safe while no score lies more than 2^-126 below it
  bool bounded = bounds != nullptr;
  for (int r = 0; r < kQRows && bounded; ++r) bounded = bounds[r] < kMaxBound;
  for (int r = 0; r < kQRows; ++r) { m[r] = bounded ? bounds[r] : -INFINITY; l[r] = 0.0f; }
  for (int r = 0; r < kQRows; ++r) memset(acc + r * kMaxWidth, 0, nct * 16 * sizeof(float));  // the columns used
  const int blocks = (kv_len + kKeyBlock - 1) / kKeyBlock;
  for (int b = 0; b < blocks; ++b) {
    const uint16_t* kp_block = kp + (size_t)b * (kKeyBlock / 16) * ksteps * 512;
    const uint16_t* vp_block = vp + (size_t)b * (kKeyBlock / 32) * nct * 512;
    const int valid = kv_len - b * kKeyBlock < kKeyBlock ? kv_len - b * kKeyBlock : kKeyBlock;
    P::scores(q, ksteps, pairs, kp_block, valid, scores);
    if (!bounded) raise_row_max(scores, valid, c, m, l, acc, nct);
    P::probs_values(scores, valid, c, m, l, probs, vp_block, acc, nct, ones);
  }
  for (int r = 0; r < kQRows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / (ones >= 0 ? acc[r * kMaxWidth + ones] : l[r]));
    for (int k = 0; k < nct; ++k)
      store_bf16(out + r * nct * 16 + 16 * k, _mm512_mul_ps(_mm512_loadu_ps(acc + r * kMaxWidth + 16 * k), inv));
  }
}

using RowsFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int, float, const float*, int,
                        int, int, int);

template <int K, int N> using A = AmxProducts<K, N>;
template <int N> using V = VectorProducts<N>;

RowsFn pick_amx(int ksteps, int nct) {
  static const RowsFn table[2][4] = {
      {attend_rows<A<1, 1>>, attend_rows<A<1, 2>>, attend_rows<A<1, 3>>, attend_rows<A<1, 4>>},
      {attend_rows<A<2, 1>>, attend_rows<A<2, 2>>, attend_rows<A<2, 3>>, attend_rows<A<2, 4>>}};
  return ksteps <= 2 && nct <= 4 ? table[ksteps - 1][nct - 1] : attend_rows<A<0, 0>>;
}

RowsFn pick_vector(int nct) {
  static const RowsFn table[kMaxColTiles] = {
      attend_rows<V<1>>, attend_rows<V<2>>, attend_rows<V<3>>, attend_rows<V<4>>, attend_rows<V<5>>,
      attend_rows<V<6>>, attend_rows<V<7>>, attend_rows<V<8>>, attend_rows<V<9>>, attend_rows<V<10>>};
  return table[nct - 1];
}

struct View {  // a (B, H, tokens, width) bf16 tensor: element strides of its first three dimensions
  uint16_t* data;
  long sb, sh, sn;
  uint16_t* row(long b, long h, long n) const { return data + b * sb + h * sh + n * sn; }
};

// sum of squares of the bf16 values in x (bf16 is the top half of a float32)
inline __m512 squares(__m512i x, __m512 acc) {
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000)));
  return _mm512_fmadd_ps(hi, hi, _mm512_fmadd_ps(lo, lo, acc));
}

// K^T of head (b, h) in its tile layout, 16 keys at a time: lane j of the vector stored for width
// pair p is key j's pair p. Returns the largest |k|.
float pack_keys(const View& k, long b, long h, int m, int d, int ksteps, int nkv, uint16_t* kp) {
  const int pairs = d / 2;  // d is even: a pair never reads past a row
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)k.sn));
  __m512 kmax2 = _mm512_setzero_ps();
  for (int key = 0; key < nkv; key += 16) {
    const __mmask16 live = ldm::mask_from(m - key);
    const uint16_t* base = live ? k.row(b, h, key) : nullptr;
    uint16_t* kt = kp + (long)(key / 16) * ksteps * 512;
    __m512 norm2 = _mm512_setzero_ps();
    for (int p = 0; p < 16 * ksteps; ++p) {
      __m512i x = _mm512_setzero_si512();
      if (p < pairs && live) {
        x = _mm512_mask_i32gather_epi32(x, live, lanes, base + 2 * p, 2);  // 4 bytes at base + 2*lane*sn
        norm2 = squares(x, norm2);
      }
      _mm512_storeu_si512(kt + (p / 16) * 512 + (p % 16) * 32, x);
    }
    kmax2 = _mm512_max_ps(kmax2, norm2);
  }
  return sqrtf(_mm512_reduce_max_ps(kmax2));
}

// V of head (b, h) in its tile layout: keys 2p and 2p+1 interleaved, 16 columns at a time; with
// `ones` >= 0, that column is 1 for every real key, so that probs . V also sums the probabilities
void pack_values(const View& v, long b, long h, int m, int dv, int nkv, int nct, int ones, uint16_t* vp) {
  const __m256i one = _mm256_set1_epi16(0x3f80);  // bf16 1.0
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int key = 0; key < nkv; key += 2) {
    const uint16_t* r0 = key < m ? v.row(b, h, key) : nullptr;
    const uint16_t* r1 = key + 1 < m ? v.row(b, h, key + 1) : nullptr;
    uint16_t* vt = vp + (long)(key / 32) * nct * 512 + ((key % 32) / 2) * 32;
    for (int c = 0; c < nct; ++c) {
      const __mmask16 cols = ldm::mask_from(dv - 16 * c);
      __m256i a = r0 ? _mm256_maskz_loadu_epi16(cols, r0 + 16 * c) : _mm256_setzero_si256();
      __m256i z = r1 ? _mm256_maskz_loadu_epi16(cols, r1 + 16 * c) : _mm256_setzero_si256();
      if (ones >= 16 * c && ones < 16 * c + 16) {
        const __mmask16 lane = (__mmask16)(1u << (ones - 16 * c));
        if (r0) a = _mm256_mask_mov_epi16(a, lane, one);
        if (r1) z = _mm256_mask_mov_epi16(z, lane, one);
      }
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), z, 1);
      _mm512_storeu_si512(vt + c * 512, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// the 16 queries from `first` zero-padded to 16 x 32*ksteps; bounds = c |q| kmax per query
void load_queries(const View& q, long b, long h, long first, int n, int d, int ksteps, float c, float kmax,
                  uint16_t* block, float* bounds) {
  const int dk = 32 * ksteps;
  for (int r = 0; r < kQRows; ++r) {
    const uint16_t* src = first + r < n ? q.row(b, h, first + r) : nullptr;
    __m512 norm2 = _mm512_setzero_ps();
    for (int s = 0; s < ksteps; ++s) {
      const __m512i x = src ? _mm512_maskz_loadu_epi16(mask32_from(d - 32 * s), src + 32 * s) : _mm512_setzero_si512();
      norm2 = squares(x, norm2);
      _mm512_storeu_si512(block + r * dk + 32 * s, x);
    }
    bounds[r] = c * sqrtf(_mm512_reduce_add_ps(norm2)) * kmax;
  }
}

}  // namespace

extern "C" {

// Ask Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 0 on success.
int ldm_amx_init() { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

// Bytes of scratch that ldm_attention needs.
long ldm_attention_scratch_bytes(int b, int h, int m, int d, int dv) {
  const long nkv = (m + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  return (long)b * h * nkv * (32 * ((d + 31) / 32) + 16 * ((dv + 15) / 16)) * 2 + (long)b * h * 4;
}

// out = softmax(scale * q k^T) v, q (B, H, n, d), k (B, H, m, d), v (B, H, m, dv), out (B, H, n, dv);
// strides[12] = (b, h, token) element strides of q, k, v, out. Returns nonzero for unsupported sizes
// (d odd or over 160, dv over 160). `amx`: the products on AMX tiles (after ldm_amx_init), else as
// vdpbf16ps.
int ldm_attention(uint16_t* q, uint16_t* k, uint16_t* v, uint16_t* out, const long* strides, int batch, int heads,
                  int n, int m, int d, int dv, float scale, void* scratch, int threads, int amx) {
  const int ksteps = (d + 31) / 32, nct = (dv + 15) / 16;
  if (ksteps > kMaxKSteps || nct > kMaxColTiles || d % 2 || n < 1 || m < 1) return 1;
  const View qv{q, strides[0], strides[1], strides[2]}, kv{k, strides[3], strides[4], strides[5]},
      vv{v, strides[6], strides[7], strides[8]}, ov{out, strides[9], strides[10], strides[11]};
  const int nkv = (m + kKeyBlock - 1) / kKeyBlock * kKeyBlock, dk = 32 * ksteps;
  const long bh = (long)batch * heads, qblocks = (n + kQRows - 1) / kQRows;
  const long kp_size = (long)nkv * dk, vp_size = (long)nkv * 16 * nct;
  uint16_t* kp = static_cast<uint16_t*>(scratch);
  uint16_t* vp = kp + bh * kp_size;
  float* kmax = reinterpret_cast<float*>(vp + bh * vp_size);
  const RowsFn rows = amx ? pick_amx(ksteps, nct) : pick_vector(nct);
  const int ones = dv % 16 ? dv : -1;  // a spare column in the last value tile carries the row sums
  const float c = scale * 1.4426950408889634f;  // scores to base 2
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (long i = 0; i < bh; ++i) {
      kmax[i] = pack_keys(kv, i / heads, i % heads, m, d, ksteps, nkv, kp + i * kp_size);
      pack_values(vv, i / heads, i % heads, m, dv, nkv, nct, ones, vp + i * vp_size);
    }
    // widths past 32 narrowed where the products are the fixed two-step ones with V's tiles in 0 and 6
    if (amx) configure_tiles(ksteps == 2 && d < 64 && nct <= 3 ? d - 32 : 0);
    alignas(64) uint16_t qblock[kQRows * kMaxWidth];
    alignas(64) uint16_t oblock[kQRows * kMaxWidth];
    float bounds[kQRows];
#pragma omp for schedule(static)
    for (long i = 0; i < bh * qblocks; ++i) {
      const long hb = i / qblocks, b = hb / heads, h = hb % heads, first = (i % qblocks) * kQRows;
      load_queries(qv, b, h, first, n, d, ksteps, c, kmax[hb], qblock, bounds);
      rows(qblock, kp + hb * kp_size, vp + hb * vp_size, oblock, m, c, bounds, ksteps, nct, d / 2, ones);
      for (int r = 0; r < kQRows && first + r < n; ++r)
        memcpy(ov.row(b, h, first + r), oblock + r * nct * 16, dv * 2);
    }
    if (amx) _tile_release();
  }
  return 0;
}
}
