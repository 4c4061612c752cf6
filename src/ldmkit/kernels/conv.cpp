// 3x3 convolution (stride 1, zero padding 1) of bf16 NHWC feature maps on Intel AMX tiles, with
// its bias and optionally a residual added, called through ctypes; as the same GEMM with 4 taps per
// output parity, nearest 2x upsampling then a 3x3 convolution (ldm_upsample_conv3x3); and with one
// tap, a linear layer whose output is a GEGLU (value * GELU(gate), ldm_geglu).
//
// Why our own: the SD 1.5 U-Net's deepest layers are weight-heavy: 29 MB of weights for a
// 1280-channel 3x3 convolution against 1.3 MB of input at 16x16. oneDNN ran them at 1-2 TFLOP/s in
// the U-Net step, a first call on weights that had left the cache much slower than a second (8.0
// against 5.9 ms at 16x16, 3.6 against 2.4 ms at 8x8). Here each thread streams its share of the
// output channels' weights from memory once per group of rows, and the input, which fits in L2,
// is read in place as the A operand (no im2col copy nine times its size).
//
// A convolution is an implicit GEMM: out[b, y, x, o] = sum over taps (dy, dx) and channels c of
// padded[b, y + dy, x + dx, c] w[o, c, dy, dx], with `padded` (B, H + 2, W + 2, C) the input copied
// inside a zero border. Output (b, y, x) is GEMM row q = (b (H+2) + y) (W+2) + x: tap (dy, dx) reads
// padded row q + dy (W+2) + dx, so a tile of 16 consecutive q is 16 rows at a fixed stride (C * 2
// bytes). For W a multiple of 16 the tiles cover each image row exactly; otherwise (8x8) they run
// over whole padded rows, and the rows of border columns (x >= W) are computed and dropped.
//
// Weights: (O, C, 3, 3) as (N, K) = (O, 9C), K in (dy, dx, c) order, in B tiles
// [N/16][K/32][16 pairs][16][2]. Per thread: for each quad of 16-column B tiles (64 output
// channels), for each chunk of kChunk 32-deep steps (its B tiles stay in L1), for each tile of 16
// rows: 1x4 tiles of fp32 sums, kept in a per-thread buffer between chunks. 1x4 rather than 2x2
// tiles: each A tile read from L2 feeds four products, not two, which halved the L2 reads that
// limited the 2x2 version (2560 input channels at 16x16: 15 against 24 ms). Rows are taken
// kRowGroup tiles at a time, so a large input reads the weights once per group, not its whole
// self per chunk.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "simd.h"


namespace {

constexpr int kChunk = 8;      // 32-deep steps per chunk: 32 KB of B tiles and 8 KB of A rows in L1
constexpr int kRowGroup = 32;  // row tiles per pass over the weights: 512 rows

void configure_tiles() {  // all 8 tiles 16 rows x 64 bytes
  const ldm::TileConfig cfg = ldm::full_tiles();
  _tile_loadconfig(&cfg);
}

// The A side of the product: where each 16-row tile's first row is, the output row of each of its
// rows (-1: dropped), and the taps: reduction step s of 32 reads tap s*32 / width at offset
// tap_offset[tap] + the step's place within that tap.
struct Rows {
  std::vector<const uint16_t*> tile;
  std::vector<long> out_row;  // 16 per tile
  long stride = 0;            // bytes between consecutive rows
  long width = 0;             // reduction elements per tap
  long taps = 9;
  long tap_offset[9] = {0};   // elements
  long steps() const { return taps * width / 32; }
  long tiles() const { return (long)tile.size(); }
};

inline __m512 bf16_to_float(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// out[o, 64 q : 64 q + 64] = sums + bias (+ residual) as bf16 for rows [r0, r1) of tile t (sums 16 x 64)
void store_tile(const Rows& rows, long t, int r0, int r1, const float* sums, long q, const float* bias,
                const uint16_t* residual, uint16_t* out, long n) {
  __m512 b[4];
  for (int j = 0; j < 4; ++j) b[j] = _mm512_loadu_ps(bias + 64 * q + 16 * j);
  for (int r = r0; r < r1; ++r) {
    const long o = rows.out_row[16 * t + r];
    if (o < 0) continue;
    __m512 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm512_add_ps(_mm512_loadu_ps(sums + r * 64 + 16 * j), b[j]);
    if (residual) {
      const uint16_t* res = residual + o * n + 64 * q;
      for (int j = 0; j < 4; ++j)
        v[j] = _mm512_add_ps(v[j], bf16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(res + 16 * j))));
    }
    uint16_t* dst = out + o * n + 64 * q;
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    _mm512_storeu_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
  }
}

// GELU(x) = x Phi(x) = x (1 - erfc(x / sqrt 2) / 2) for x >= 0, x erfc(|x| / sqrt 2) / 2 below, with
// erfc(z) = t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z) (Abramowitz and Stegun 7.1.26:
// absolute error 1.5e-7) and exp2_approx's relative 8e-5: far below the bf16 rounding of the output.
// The 1 / sqrt 2 of z is folded into p and the exponent, the 1/2 into the a's.
inline __m512 gelu(__m512 x) {
  const __m512 d = _mm512_fmadd_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.3275911f * 0.70710678f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(d);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));  // one Newton step: 2^-28
  __m512 poly = _mm512_set1_ps(0.5f * 1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.5f * -1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.5f * 1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.5f * -0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.5f * 0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = ldm::exp2_approx(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.5f * 1.44269504f)));
  const __m512 half_erfc = _mm512_mul_ps(poly, e);
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 phi = _mm512_mask_sub_ps(half_erfc, positive, _mm512_set1_ps(1.0f), half_erfc);
  return _mm512_mul_ps(x, phi);
}

// The GEGLU of rows [r0, r1) of tile t: sums (16 x 64) hold the values of 32 output channels in
// columns 0..31 and their gates in 32..63 (ldm_geglu's column order); out[o, 32 q : 32 q + 32] =
// (value + bias) * GELU(gate + bias) as bf16, for an output `width` channels wide.
void store_geglu_tile(const Rows& rows, long t, int r0, int r1, const float* sums, long q, const float* bias,
                      uint16_t* out, long width) {
  __m512 b[4];
  for (int j = 0; j < 4; ++j) b[j] = _mm512_loadu_ps(bias + 64 * q + 16 * j);
  for (int r = r0; r < r1; ++r) {
    const long o = rows.out_row[16 * t + r];
    if (o < 0) continue;
    const float* s = sums + r * 64;
    const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(s), b[0]), v1 = _mm512_add_ps(_mm512_loadu_ps(s + 16), b[1]);
    const __m512 g0 = _mm512_add_ps(_mm512_loadu_ps(s + 32), b[2]), g1 = _mm512_add_ps(_mm512_loadu_ps(s + 48), b[3]);
    _mm512_storeu_si512(out + o * width + 32 * q,
                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(v1, gelu(g1)), _mm512_mul_ps(v0, gelu(g0))));
  }
}

// sums of row tiles [m0, m1) (16 x 64 fp32 per tile, in tiles 0..3) for the quad of column tiles
// at b (each `steps` B tiles long): per 32-deep step one A tile (4) against four B tiles (5, 6, 7,
// then 5 again), so that each A tile read from L2 feeds four products. finish(t, r0, r1) is the
// epilogue of rows [r0, r1) of tile t: for each tile, spread over the next tile's last chunk of
// steps, a few rows after each step's products, so that its vector work fills the time the tile
// products take (an epilogue after all of a tile's products overlapped little with them: the GEGLU
// at 4,096 tokens took 8.5 ms with it, 5.5 without).
template <class Finish>
void quad_of_columns(const Rows& rows, const uint16_t* b, long m0, long m1, float* sums, Finish finish) {
  const long steps = rows.steps();
  const uint16_t* b0 = b;
  const uint16_t* b1 = b + steps * 512;
  const uint16_t* b2 = b + 2 * steps * 512;
  const uint16_t* b3 = b + 3 * steps * 512;
  const long chunks = (steps + kChunk - 1) / kChunk, chunk = (steps + chunks - 1) / chunks;  // even chunks
  for (long k0 = 0; k0 < steps; k0 += chunk) {
    const long k1 = k0 + chunk < steps ? k0 + chunk : steps;
    const bool last = k1 == steps;
    const int rows_per_step = (int)((16 + k1 - k0 - 1) / (k1 - k0));
    for (long m = m0; m < m1; ++m) {
      float* c = sums + (m - m0) * 1024;
      if (k0 == 0) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      } else {
        _tile_loadd(0, c, 256); _tile_loadd(1, c + 16, 256);
        _tile_loadd(2, c + 32, 256); _tile_loadd(3, c + 48, 256);
      }
      const uint16_t* a = rows.tile[m];
      for (long s = k0; s < k1; ++s) {
        const long k = 32 * s, tap = k / rows.width, offset = rows.tap_offset[tap] + (k - tap * rows.width);
        _tile_loadd(4, a + offset, rows.stride);
        _tile_loadd(5, b0 + s * 512, 64);
        _tile_loadd(6, b1 + s * 512, 64);
        _tile_loadd(7, b2 + s * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, b3 + s * 512, 64);
        _tile_dpbf16ps(3, 4, 5);
        const int r0 = (int)(s - k0) * rows_per_step;
        if (last && m > m0 && r0 < 16) finish(m - 1, r0, r0 + rows_per_step < 16 ? r0 + rows_per_step : 16);
      }
      _tile_stored(0, c, 256); _tile_stored(1, c + 16, 256);
      _tile_stored(2, c + 32, 256); _tile_stored(3, c + 48, 256);
    }
  }
  finish(m1 - 1, 0, 16);
}

// The whole product, inside a parallel region: each thread its share of the quads of columns. With
// `geglu`, each quad's GEGLU goes to an output n / 2 wide (no residual).
void product(const Rows& rows, const uint16_t* w, long n, const float* bias, const uint16_t* residual, uint16_t* out,
             bool geglu = false) {
  configure_tiles();
  alignas(64) float sums[kRowGroup * 1024];
  const long steps = rows.steps(), tiles = rows.tiles(), quads = n / 64;
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  const long q0 = quads * t / nt, q1 = quads * (t + 1) / nt;
  for (long m0 = 0; m0 < tiles; m0 += kRowGroup) {
    const long m1 = m0 + kRowGroup < tiles ? m0 + kRowGroup : tiles;
    for (long q = q0; q < q1; ++q) {
      quad_of_columns(rows, w + 4 * q * steps * 512, m0, m1, sums, [&](long tile, int r0, int r1) {
        const float* s = sums + (tile - m0) * 1024;
        if (geglu) store_geglu_tile(rows, tile, r0, r1, s, q, bias, out, n / 2);
        else store_tile(rows, tile, r0, r1, s, q, bias, residual, out, n);
      });
    }
  }
  _tile_release();
}

// A convolution's geometry (see the top): padded (B, H+2, W+2, C) and its GEMM rows.
struct Padded {
  long B, H, W, C, PH, PW;
  Padded(long b, long h, long w, long c) : B(b), H(h), W(w), C(c), PH(h + 2), PW(w + 2) {}
  long rows() const { return B * PH * PW + 16 + 2 * PW + 2; }  // a last tile's taps stay inside
};

// The GEMM rows of the output grid (B, H, W) over `padded`: a 3x3 convolution's (parity py < 0),
// or those of output parity (py, px) of nearest 2x upsampling then a 3x3 convolution: output (2y +
// py, 2x + px) of the (B, 2H, 2W) map sees low-resolution rows y - 1 + py + a and columns x - 1 + px
// + b for a, b in {0, 1}, padded rows y + py + a: 4 taps whose weights sum the 3x3 kernel's
// (layers.upsample_phase_weight), written in place into the upsampled map.
Rows conv_rows(const Padded& g, const uint16_t* padded, int py = -1, int px = -1) {
  Rows rows;
  const bool row_tiles = g.W % 16 == 0;  // else tiles over whole padded rows
  const long per_image = row_tiles ? g.H * (g.W / 16) : (g.H * g.PW + 15) / 16;
  for (long t = 0; t < g.B * per_image; ++t) {
    const long b = t / per_image, i = t % per_image;
    const long q0 = row_tiles ? (b * g.PH + i / (g.W / 16)) * g.PW + 16 * (i % (g.W / 16)) : b * g.PH * g.PW + 16 * i;
    rows.tile.push_back(padded + q0 * g.C);
    for (long q = q0; q < q0 + 16; ++q) {
      const long bq = q / (g.PH * g.PW), y = q % (g.PH * g.PW) / g.PW, x = q % g.PW;
      const bool real = bq < g.B && y < g.H && x < g.W;
      const long out = py < 0 ? (bq * g.H + y) * g.W + x : (bq * 2 * g.H + 2 * y + py) * 2 * g.W + 2 * x + px;
      rows.out_row.push_back(real ? out : -1);
    }
  }
  rows.stride = g.C * 2;
  rows.width = g.C;
  if (py < 0) {
    for (int dy = 0; dy < 3; ++dy)
      for (int dx = 0; dx < 3; ++dx) rows.tap_offset[3 * dy + dx] = (dy * g.PW + dx) * g.C;
  } else {
    rows.taps = 4;
    for (int a = 0; a < 2; ++a)
      for (int c = 0; c < 2; ++c) rows.tap_offset[2 * a + c] = ((py + a) * g.PW + px + c) * g.C;
  }
  return rows;
}

// the input (B, H, W, C) into the middle of padded (B, H+2, W+2, C), zeros around it and after
void pad_input(const Padded& g, const uint16_t* x, uint16_t* padded) {
  const long rows = g.rows(), bytes = g.C * 2;
#pragma omp for schedule(static)
  for (long q = 0; q < rows; ++q) {
    const long b = q / (g.PH * g.PW), y = q % (g.PH * g.PW) / g.PW - 1, xx = q % g.PW - 1;
    uint16_t* dst = padded + q * g.C;
    if (b < g.B && y >= 0 && y < g.H && xx >= 0 && xx < g.W)
      memcpy(dst, x + ((b * g.H + y) * g.W + xx) * g.C, bytes);
    else
      memset(dst, 0, bytes);
  }
}

// A linear layer's GEMM rows: x (m, k) row-major, one tap. A last partial tile reads its rows from
// `tail` (16 x k), where the caller copied them, zeros after.
Rows linear_rows(const uint16_t* x, long m, long k, const uint16_t* tail) {
  Rows rows;
  for (long t = 0; 16 * t < m; ++t) {
    rows.tile.push_back(16 * (t + 1) <= m ? x + 16 * t * k : tail);
    for (long r = 16 * t; r < 16 * (t + 1); ++r) rows.out_row.push_back(r < m ? r : -1);
  }
  rows.stride = k * 2;
  rows.width = k;
  rows.taps = 1;
  return rows;
}

}  // namespace

extern "C" {

// Ask Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 0 on success.
int ldm_amx_init() { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

// Elements (bf16) of the padded input copy that ldm_conv3x3 needs as scratch.
long ldm_conv3x3_scratch(int batch, int height, int width, int channels) {
  return Padded(batch, height, width, channels).rows() * channels;
}

// out (B, H, W, N) = conv3x3(x (B, H, W, C)) + bias (+ residual (B, H, W, N), or null), all bf16
// NHWC contiguous but the float32 bias; w: the weights' B tiles. C a multiple of 32, N of 64.
// Returns nonzero for sizes it does not take.
int ldm_conv3x3(const uint16_t* x, int batch, int height, int width, int channels, const uint16_t* w, int n,
                const float* bias, const uint16_t* residual, uint16_t* out, uint16_t* scratch, int threads) {
  if (batch < 1 || height < 1 || width < 1 || channels < 32 || channels % 32 || n < 64 || n % 64) return 1;
  const Padded g(batch, height, width, channels);
  const Rows rows = conv_rows(g, scratch);
#pragma omp parallel num_threads(threads)
  {
    pad_input(g, x, scratch);  // ends with its omp for's barrier
    product(rows, w, n, bias, residual, out);
  }
  return 0;
}

// out (B, 2H, 2W, N) = conv3x3(nearest 2x upsampling of x (B, H, W, C)) + bias, all bf16 NHWC but
// the float32 bias, as the four output parities' 2x2 convolutions of x (conv_rows): w their B tiles,
// parity 2 py + px at w + p * N * 4C. C a multiple of 32, N of 64; scratch as ldm_conv3x3's.
int ldm_upsample_conv3x3(const uint16_t* x, int batch, int height, int width, int channels, const uint16_t* w, int n,
                         const float* bias, uint16_t* out, uint16_t* scratch, int threads) {
  if (batch < 1 || height < 1 || width < 1 || channels < 32 || channels % 32 || n < 64 || n % 64) return 1;
  const Padded g(batch, height, width, channels);
  const Rows parities[4] = {conv_rows(g, scratch, 0, 0), conv_rows(g, scratch, 0, 1), conv_rows(g, scratch, 1, 0),
                            conv_rows(g, scratch, 1, 1)};
#pragma omp parallel num_threads(threads)
  {
    pad_input(g, x, scratch);  // ends with its omp for's barrier
    for (int p = 0; p < 4; ++p) product(parities[p], w + (long)p * n * 4 * channels, n, bias, nullptr, out);
  }
  return 0;
}

// out (m, n / 2) = GEGLU of x (m, k) w^T + bias, all bf16 row-major but the float32 bias (n,): w the
// B tiles of an (n, k) weight whose rows take each 32 output channels' values, then their gates
// (bias alike), so that a quad of column tiles holds both halves of 32 outputs. k a multiple of 32,
// n of 64. Returns nonzero for sizes it does not take.
int ldm_geglu(const uint16_t* x, long m, int k, const uint16_t* w, int n, const float* bias, uint16_t* out,
              int threads) {
  if (m < 1 || k < 32 || k % 32 || n < 64 || n % 64) return 1;
  std::vector<uint16_t> tail(m % 16 ? 16 * (long)k : 0, 0);  // the last rows of a partial tile, zeros after
  if (m % 16) memcpy(tail.data(), x + (m - m % 16) * k, (m % 16) * k * 2);
  const Rows rows = linear_rows(x, m, k, tail.data());
#pragma omp parallel num_threads(threads)
  product(rows, w, n, bias, nullptr, out, true);
  return 0;
}
}
