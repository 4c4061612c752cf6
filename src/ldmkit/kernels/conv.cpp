// 3x3 convolution (stride 1, zero padding 1) of bf16 NHWC feature maps on Intel AMX tiles, with
// the bias and optionally a residual added, called through ctypes.
//
// Why our own: the SD 1.5 U-Net's deepest convolutions (1280 channels at 16x16 and 8x8 for a 512x512
// image) are weight-heavy: 29 MB of weights against 1.3 MB of input. oneDNN ran them at 1-2
// TFLOP/s in the U-Net step, a first call on weights that have left the cache much slower than a
// second (8.0 against 5.9 ms at 16x16, 3.6 against 2.4 ms at 8x8). Here each thread streams its
// half of the output channels' weights from memory once, and the input, which fits in L2, is read
// in place as the GEMM's A operand (no im2col copy nine times its size).
//
// The implicit GEMM: out[b, y, x, o] = sum over taps (dy, dx) and channels c of
// padded[b, y + dy, x + dx, c] w[o, c, dy, dx], with `padded` (B, H + 2, W + 2, C) the input copied
// inside a zero border. Output (b, y, x) is row q = (b (H+2) + y) (W+2) + x of the GEMM: tap (dy, dx)
// reads padded row q + dy (W+2) + dx, so a tile of 16 consecutive q is 16 rows at a fixed stride (C * 2
// bytes). For W a multiple of 16 the tiles cover each image row exactly; otherwise (8x8) they run
// over whole padded rows, and the rows of border columns (x >= W) are computed and dropped.
//
// Weights: (O, C, 3, 3) as (O, K) with K = (dy, dx, c), in B tiles [O/16][K/32][16 pairs][16][2].
// Per thread: for each pair of 16-column B tiles, for each chunk of kChunk 32-deep steps (its B
// tiles stay in L1), for each block of 32 rows (two A tiles): 2x2 tiles of fp32 sums, kept in a
// per-thread buffer between chunks. Rows are taken kRowGroup blocks at a time, so a large feature
// map reads its weights once per group, not its whole input per chunk.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

constexpr int kChunk = 8;      // 32-deep steps per chunk: 16 KB of B tiles and 16 KB of A rows in L1
constexpr int kRowGroup = 16;  // blocks of 32 rows per pass over the weights: 512 rows

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {  // all 8 tiles 16 rows x 64 bytes
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

struct Geometry {
  long B, H, W, C, PH, PW;
  long tiles_per_image;  // 16-row tiles of GEMM rows
  bool row_tiles;        // tiles cover image rows exactly (W % 16 == 0), else whole padded rows

  Geometry(long b, long h, long w, long c) : B(b), H(h), W(w), C(c), PH(h + 2), PW(w + 2) {
    row_tiles = w % 16 == 0;
    tiles_per_image = row_tiles ? h * (w / 16) : (h * PW + 15) / 16;
  }
  long tiles() const { return B * tiles_per_image; }
  long start(long t) const {  // the GEMM row q of tile t's first row
    const long b = t / tiles_per_image, i = t % tiles_per_image;
    if (!row_tiles) return b * PH * PW + 16 * i;
    const long per_row = W / 16;
    return (b * PH + i / per_row) * PW + 16 * (i % per_row);
  }
  long output(long q) const {  // the output pixel of GEMM row q, or -1 for a dropped row
    const long b = q / (PH * PW), y = q % (PH * PW) / PW, x = q % PW;
    return b < B && y < H && x < W ? (b * H + y) * W + x : -1;
  }
  long padded_rows() const { return B * PH * PW + 16 + 2 * PW + 2; }  // a last tile's taps stay inside
};

inline __m512 bf16_to_float(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// the input (B, H, W, C) into the middle of padded (B, H+2, W+2, C) and zeros around it and after
void pad_input(const Geometry& g, const uint16_t* x, uint16_t* padded) {
  const long rows = g.padded_rows(), bytes = g.C * 2;
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

// out[o, col:col+32] = sums + bias (+ residual) as bf16 for the 16 rows of tile t (sums 16 x 32)
void store_tile(const Geometry& g, long t, const float* sums, const float* bias, const uint16_t* residual,
                uint16_t* out, long N, long col) {
  const __m512 bias0 = _mm512_loadu_ps(bias + col), bias1 = _mm512_loadu_ps(bias + col + 16);
  const long q0 = g.start(t);
  for (int r = 0; r < 16; ++r) {
    const long o = g.output(q0 + r);
    if (o < 0) continue;
    __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(sums + r * 32), bias0);
    __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(sums + r * 32 + 16), bias1);
    if (residual) {
      const __m512i both = _mm512_loadu_si512(residual + o * N + col);
      v0 = _mm512_add_ps(v0, bf16_to_float(_mm512_castsi512_si256(both)));
      v1 = _mm512_add_ps(v1, bf16_to_float(_mm512_extracti64x4_epi64(both, 1)));
    }
    _mm512_storeu_si512(out + o * N + col, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
  }
}

// The output columns [32 p, 32 p + 32) of row blocks [m0, m1) (of 32 rows, tiles 2m and 2m+1):
// sums (per block 32 x 32 fp32, tile 0/1 the top rows' two column halves, 2/3 the bottom's).
void pair_of_columns(const Geometry& g, const uint16_t* padded, const uint16_t* b0, const uint16_t* b1, long steps,
                     long m0, long m1, const long* tap_offset, float* sums) {
  const long lda = g.C * 2, tiles = g.tiles();
  for (long k0 = 0; k0 < steps; k0 += kChunk) {
    const long k1 = k0 + kChunk < steps ? k0 + kChunk : steps;
    for (long m = m0; m < m1; ++m) {
      float* c = sums + (m - m0) * 1024;
      if (k0 == 0) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      } else {
        _tile_loadd(0, c, 128); _tile_loadd(1, c + 16, 128);
        _tile_loadd(2, c + 512, 128); _tile_loadd(3, c + 528, 128);
      }
      const uint16_t* a0 = padded + g.start(2 * m) * g.C;
      const uint16_t* a1 = padded + g.start(2 * m + 1 < tiles ? 2 * m + 1 : 2 * m) * g.C;  // an odd last tile: twice
      for (long s = k0; s < k1; ++s) {
        const long k = 32 * s, tap = k / g.C, offset = tap_offset[tap] + (k - tap * g.C);
        _tile_loadd(4, a0 + offset, lda);
        _tile_loadd(5, a1 + offset, lda);
        _tile_loadd(6, b0 + s * 512, 64);
        _tile_loadd(7, b1 + s * 512, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128);
      _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
    }
  }
}

}  // namespace

extern "C" {

// Ask Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); 0 on success.
int ldm_amx_init() { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

// Elements of the padded input copy (bf16) that ldm_conv3x3 needs as scratch.
long ldm_conv3x3_scratch(int batch, int height, int width, int channels) {
  return Geometry(batch, height, width, channels).padded_rows() * channels;
}

// out (B, H, W, N) = conv3x3(x (B, H, W, C)) + bias (+ residual (B, H, W, N), or null), all bf16
// NHWC contiguous but the float32 bias; w: the weights in B tiles (see the top). C and N multiples
// of 32. Returns nonzero for sizes it does not take.
int ldm_conv3x3(const uint16_t* x, int batch, int height, int width, int channels, const uint16_t* w, int n,
                const float* bias, const uint16_t* residual, uint16_t* out, uint16_t* scratch, int threads) {
  if (batch < 1 || height < 1 || width < 1 || channels % 32 || n % 32 || channels < 32 || n < 32) return 1;
  const Geometry g(batch, height, width, channels);
  const long steps = 9L * channels / 32, blocks = (g.tiles() + 1) / 2, pairs = n / 32;
  long tap_offset[9];
  for (int dy = 0; dy < 3; ++dy)
    for (int dx = 0; dx < 3; ++dx) tap_offset[3 * dy + dx] = (dy * g.PW + dx) * g.C;
#pragma omp parallel num_threads(threads)
  {
    pad_input(g, x, scratch);  // ends with the implicit barrier of its omp for
    configure_tiles();
    alignas(64) float sums[kRowGroup * 1024];
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const long p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;  // this thread's output columns
    for (long m0 = 0; m0 < blocks; m0 += kRowGroup) {
      const long m1 = m0 + kRowGroup < blocks ? m0 + kRowGroup : blocks;
      for (long p = p0; p < p1; ++p) {
        const uint16_t* b0 = w + 2 * p * steps * 512;  // the pair's two column tiles
        pair_of_columns(g, scratch, b0, b0 + steps * 512, steps, m0, m1, tap_offset, sums);
        for (long tile = 2 * m0; tile < 2 * m1 && tile < g.tiles(); ++tile)
          store_tile(g, tile, sums + (tile / 2 - m0) * 1024 + (tile % 2) * 512, bias, residual, out, n, 32 * p);
      }
    }
    _tile_release();
  }
  return 0;
}
}
