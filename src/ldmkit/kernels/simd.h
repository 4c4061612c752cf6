// AVX-512 helpers shared by our kernels (header-only; kernels/__init__.py hashes it with each source).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace ldm {

// lanes [0, n) of 16 (none for n <= 0, all for n >= 16)
inline __mmask16 mask_from(long n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

inline __m512 load16(const uint16_t* p, __mmask16 m) {  // 16 bf16 to float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store16(uint16_t* p, __m512 x, __mmask16 m) {  // 16 float32 to bf16, rounded to nearest even
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

// 2^x = 2^floor(x) * p(frac), p a cubic fit of 2^f on [0, 1) (relative error 8e-5). vreduceps
// gives frac = x - floor(x) in one instruction, and scalef takes floor(x) itself: 5 instructions in
// all (GroupNorm's SiLU). scalef takes exponents far below -126 to 0 (or subnormals) and far above
// 127 to inf by itself.
inline __m512 exp2_approx(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // keep 0 bits, round down
  __m512 p = _mm512_set1_ps(0.07803769f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22608059f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69581068f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992900f));
  return _mm512_scalef_ps(p, x);
}

// The AMX tile configuration (palette 1) that _tile_loadconfig reads, all 8 tiles 16 rows x 64
// bytes; callers narrow tiles before loading it.
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline TileConfig full_tiles() {
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

}  // namespace ldm
