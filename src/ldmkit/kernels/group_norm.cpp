// GroupNorm, optionally with a per-channel shift added before it and SiLU after it, for bf16
// feature maps on AVX-512 CPUs, called through ctypes.
//
// Why our own: in a bf16 U-Net step on the CPU PyTorch's GroupNorm and the SiLU after it take about
// a fifth of the time. Both are memory-bound, and each is a separate pass (plus one for the time
// embedding's add before the ResNet block's second norm), with a float32 round trip. Here the
// statistics take one read of the input and the output one read and one write: shift, normalise,
// scale, SiLU and the bf16 rounding happen in registers.
//
// Statistics: each channel's sums are taken around its first pixel's value (a shift that keeps
// E[x^2] - E[x]^2 from cancelling when the mean is large against the spread), per thread over a
// slice of the pixels, then merged exactly per group (Chan et al.'s pairwise variance formula).
//
// x and out are (B, C, P) with P = H * W pixels, either NCHW (channel-major, `channels_last` 0) or
// NHWC (pixel-major, 1), contiguous; the same layout for both.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "simd.h"

namespace {

// x * sigmoid(x) = x / (1 + 2^(-x log2 e)), with the reciprocal's estimate (relative error 6e-5,
// as 2^x's 8e-5 below the bf16 rounding of the result); 2^x saturates to inf, whose reciprocal is 0
inline __m512 silu(__m512 x) {
  const __m512 e = ldm::exp2_approx(_mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_mul_ps(x, _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}

// per-channel sums of (x - pivot) and (x - pivot)^2 over pixels [p0, p1) of one image
void channel_sums(const uint16_t* x, long C, long P, bool nhwc, long p0, long p1, const float* pivot, double* s1,
                  double* s2) {
  if (nhwc) {
    std::vector<float> a(C, 0.0f), b(C, 0.0f);  // float32 partials, flushed to double every 256 pixels
    for (long p = p0; p < p1; ++p) {
      const uint16_t* row = x + p * C;
      for (long c = 0; c < C; c += 16) {
        const __mmask16 m = ldm::mask_from(C - c);
        const __m512 d = _mm512_sub_ps(ldm::load16(row + c, m), _mm512_maskz_loadu_ps(m, pivot + c));
        _mm512_mask_storeu_ps(a.data() + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a.data() + c), d));
        _mm512_mask_storeu_ps(b.data() + c, m, _mm512_fmadd_ps(d, d, _mm512_maskz_loadu_ps(m, b.data() + c)));
      }
      if ((p - p0) % 256 == 255 || p == p1 - 1) {
        for (long c = 0; c < C; ++c) s1[c] += a[c], s2[c] += b[c], a[c] = b[c] = 0.0f;
      }
    }
    return;
  }
  for (long c = 0; c < C; ++c) {
    const uint16_t* plane = x + c * P;
    const __m512 piv = _mm512_set1_ps(pivot[c]);
    double t1 = 0, t2 = 0;
    for (long p = p0; p < p1; p += 4096) {  // float32 vectors over 4096 pixels at most, then double
      __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
      const long end = p + 4096 < p1 ? p + 4096 : p1;
      for (long q = p; q < end; q += 16) {
        const __mmask16 m = ldm::mask_from(end - q);
        const __m512 d = _mm512_maskz_sub_ps(m, ldm::load16(plane + q, m), piv);
        a = _mm512_add_ps(a, d);
        b = _mm512_fmadd_ps(d, d, b);
      }
      t1 += _mm512_reduce_add_ps(a), t2 += _mm512_reduce_add_ps(b);
    }
    s1[c] += t1, s2[c] += t2;
  }
}

// out = act(x * scale[c] + offset[c]) for pixels [p0, p1) of one image
template <bool SILU>
void normalise(const uint16_t* x, uint16_t* out, long C, long P, bool nhwc, long p0, long p1, const float* scale,
               const float* offset) {
  if (nhwc) {
    for (long p = p0; p < p1; ++p) {
      for (long c = 0; c < C; c += 16) {
        const __mmask16 m = ldm::mask_from(C - c);
        __m512 y = _mm512_fmadd_ps(ldm::load16(x + p * C + c, m), _mm512_maskz_loadu_ps(m, scale + c),
                                   _mm512_maskz_loadu_ps(m, offset + c));
        ldm::store16(out + p * C + c, SILU ? silu(y) : y, m);
      }
    }
    return;
  }
  for (long c = 0; c < C; ++c) {
    const __m512 a = _mm512_set1_ps(scale[c]), b = _mm512_set1_ps(offset[c]);
    for (long p = p0; p < p1; p += 16) {
      const __mmask16 m = ldm::mask_from(p1 - p);
      const __m512 y = _mm512_fmadd_ps(ldm::load16(x + c * P + p, m), a, b);
      ldm::store16(out + c * P + p, SILU ? silu(y) : y, m);
    }
  }
}

}  // namespace

extern "C" {

// out = [silu](group_norm(x + shift[b, c]) * weight[c] + bias[c]) with `groups` groups over (B, C, P);
// shift (B, C) float32 or null, weight and bias (C) float32. Returns nonzero for bad sizes.
int ldm_group_norm(const uint16_t* x, uint16_t* out, int batch, int channels, long pixels, int channels_last,
                   int groups, const float* shift, const float* weight, const float* bias, float eps, int silu_after,
                   int threads) {
  const long C = channels, P = pixels;
  if (batch < 1 || C < 1 || P < 1 || groups < 1 || C % groups || threads < 1) return 1;
  const bool nhwc = channels_last != 0;
  const long cg = C / groups;
  // per thread and image: pixel slice sums (double) of every channel; pivots per image and channel
  std::vector<double> s1((size_t)threads * batch * C, 0.0), s2((size_t)threads * batch * C, 0.0);
  std::vector<float> pivot((size_t)batch * C), scale((size_t)batch * C), offset((size_t)batch * C);
  for (long b = 0; b < batch; ++b)
    for (long c = 0; c < C; ++c) {
      const uint16_t bits = nhwc ? x[b * C * P + c] : x[b * C * P + c * P];
      uint32_t word = (uint32_t)bits << 16;
      float value;
      memcpy(&value, &word, 4);
      pivot[b * C + c] = value;
    }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    for (long b = 0; b < batch; ++b) {
      const long p0 = P * t / nt, p1 = P * (t + 1) / nt;
      if (p0 < p1)
        channel_sums(x + b * C * P, C, P, nhwc, p0, p1, pivot.data() + b * C, s1.data() + (t * batch + b) * C,
                     s2.data() + (t * batch + b) * C);
    }
#pragma omp barrier
#pragma omp single
    for (long b = 0; b < batch; ++b) {
      for (long g = 0; g < groups; ++g) {
        // merge channels: per channel mean (after the shift, which moves only the mean) and M2,
        // then the group's pairwise formula
        double n = 0, mean = 0, m2 = 0;
        for (long c = g * cg; c < (g + 1) * cg; ++c) {
          double t1 = 0, t2 = 0;
          for (int k = 0; k < nt; ++k) t1 += s1[(k * batch + b) * C + c], t2 += s2[(k * batch + b) * C + c];
          const double cmean = pivot[b * C + c] + (shift ? shift[b * C + c] : 0.0f) + t1 / P;
          const double cm2 = t2 - t1 * t1 / P, total = n + P, delta = cmean - mean;
          mean += delta * P / total;
          m2 += (cm2 > 0 ? cm2 : 0) + delta * delta * n * P / total;
          n = total;
        }
        const double rstd = 1.0 / sqrt(m2 / n + eps);
        for (long c = g * cg; c < (g + 1) * cg; ++c) {  // y = (x + shift - mean) * rstd * weight + bias
          const double w = weight[c] * rstd;
          scale[b * C + c] = (float)w;
          offset[b * C + c] = (float)(bias[c] + ((shift ? shift[b * C + c] : 0.0f) - mean) * w);
        }
      }
    }
    for (long b = 0; b < batch; ++b) {
      const long p0 = P * t / nt, p1 = P * (t + 1) / nt;
      if (p0 >= p1) continue;
      if (silu_after)
        normalise<true>(x + b * C * P, out + b * C * P, C, P, nhwc, p0, p1, scale.data() + b * C,
                        offset.data() + b * C);
      else
        normalise<false>(x + b * C * P, out + b * C * P, C, P, nhwc, p0, p1, scale.data() + b * C,
                         offset.data() + b * C);
    }
  }
  return 0;
}
}
