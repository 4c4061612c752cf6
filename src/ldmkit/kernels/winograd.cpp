// The transforms of Winograd's F(2x2, 3x3) convolution (Lavin and Gray 2015) for bf16 feature maps
// in channels_last, on AVX-512 CPUs, called through ctypes. The products between them are 16 GEMMs
// on oneDNN (`models.onednn.WinogradConv2d`).
//
// A 3x3 convolution (stride 1, zero padding 1) gives each 2x2 tile of output pixels from the 4x4
// input patch around it as Y = A^T [U (.) V] A, with V = B^T d B the patch's transform, U = G g G^T
// the weight's (made once, in Python) and (.) the product per position of the 4x4, summed over
// input channels: a GEMM per position, 16 multiply-adds per tile and channel pair where the direct
// convolution takes 36. Here
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],   A^T = [1 1 1 0; 0 1 -1 -1]
// take only additions, done in float32 on 16 channels at a time; V is rounded to bf16 for the GEMMs.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "simd.h"

namespace {

// V = B^T d B for one tile's 16 channels from c; d rows and columns past the map are zeros.
void input_tile(const uint16_t* x, int h, int w, long c, long c0, int y0, int x0, uint16_t* v, long plane) {
  const __mmask16 m = ldm::mask_from(c - c0);
  __m512 d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int y = y0 + i, xx = x0 + j;
      d[i][j] = (y >= 0 && y < h && xx >= 0 && xx < w) ? ldm::load16(x + ((long)y * w + xx) * c + c0, m)
                                                      : _mm512_setzero_ps();
    }
  __m512 t[4][4];  // B^T d
  for (int j = 0; j < 4; ++j) {
    t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
    t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
    t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
    t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B, position (i, j) into plane 4i + j
    uint16_t* row = v + (4 * i) * plane + c0;
    ldm::store16(row, _mm512_sub_ps(t[i][0], t[i][2]), m);
    ldm::store16(row + plane, _mm512_add_ps(t[i][1], t[i][2]), m);
    ldm::store16(row + 2 * plane, _mm512_sub_ps(t[i][2], t[i][1]), m);
    ldm::store16(row + 3 * plane, _mm512_sub_ps(t[i][1], t[i][3]), m);
  }
}

// The 2x2 output pixels of one tile's 16 channels from o0: A^T M A + bias (+ residual).
void output_tile(const uint16_t* const* mats, long tile, int h, int w, long o, long o0, int y0, int x0,
                 const float* bias, const uint16_t* residual, uint16_t* out) {
  const __mmask16 m = ldm::mask_from(o - o0);
  __m512 s[2][4];  // A^T M
  for (int j = 0; j < 4; ++j) {
    const long at = tile * o + o0;
    const __m512 m0 = ldm::load16(mats[j] + at, m), m1 = ldm::load16(mats[4 + j] + at, m);
    const __m512 m2 = ldm::load16(mats[8 + j] + at, m), m3 = ldm::load16(mats[12 + j] + at, m);
    s[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
    s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
  }
  const __m512 b = _mm512_maskz_loadu_ps(m, bias + o0);
  for (int i = 0; i < 2; ++i) {
    const __m512 left = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), b);
    const __m512 right = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), b);
    const int y = y0 + i;
    if (y >= h) break;
    for (int j = 0; j < 2 && x0 + j < w; ++j) {
      const long at = ((long)y * w + x0 + j) * o + o0;
      __m512 value = j == 0 ? left : right;
      if (residual) value = _mm512_add_ps(value, ldm::load16(residual + at, m));
      ldm::store16(out + at, value, m);
    }
  }
}

}  // namespace

extern "C" {

// Both transforms take a band of tile rows [row0, row1) of the batch's batch * ceil(h/2) rows (image
// n's tile row ty is row n * ceil(h/2) + ty), so that a large map's transforms and products need
// not all be held at once.

// v (16, tiles, c) = the transforms of x (batch, h, w, c) bf16's tiles in rows [row0, row1), tiles =
// (row1 - row0) * ceil(w/2) in row-major order. Returns nonzero for sizes it does not take.
int ldm_winograd_input(const uint16_t* x, int batch, int h, int w, int c, int row0, int row1, uint16_t* v,
                       int threads) {
  const int th = (h + 1) / 2, tw = (w + 1) / 2;
  if (batch < 1 || h < 1 || w < 1 || c < 1 || threads < 1 || row0 < 0 || row1 <= row0 || row1 > batch * th)
    return 1;
  const long plane = (long)(row1 - row0) * tw * c;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int row = row0; row < row1; ++row)
    for (int tx = 0; tx < tw; ++tx) {
      const int n = row / th, ty = row % th;
      const long tile = (long)(row - row0) * tw + tx;
      for (long c0 = 0; c0 < c; c0 += 16)
        input_tile(x + (long)n * h * w * c, h, w, c, c0, 2 * ty - 1, 2 * tx - 1, v + tile * c, plane);
    }
  return 0;
}

// out (batch, h, w, o) bf16 in tile rows [row0, row1) = the output transforms of mats[p] (tiles, o)
// bf16 (the band's tiles as `ldm_winograd_input` orders them), p the 16 positions, plus bias (o)
// float32 and residual (batch, h, w, o) bf16 when not null. Returns nonzero for sizes it does not take.
int ldm_winograd_output(const uint16_t* const* mats, int batch, int h, int w, int o, int row0, int row1,
                        const float* bias, const uint16_t* residual, uint16_t* out, int threads) {
  const int th = (h + 1) / 2, tw = (w + 1) / 2;
  if (batch < 1 || h < 1 || w < 1 || o < 1 || threads < 1 || row0 < 0 || row1 <= row0 || row1 > batch * th)
    return 1;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int row = row0; row < row1; ++row)
    for (int tx = 0; tx < tw; ++tx) {
      const int n = row / th, ty = row % th;
      const long tile = (long)(row - row0) * tw + tx, image = (long)n * h * w * o;
      for (long o0 = 0; o0 < o; o0 += 16)
        output_tile(mats, tile, h, w, o, o0, 2 * ty, 2 * tx, bias, residual ? residual + image : nullptr,
                    out + image);
    }
  return 0;
}
}
