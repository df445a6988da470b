// y = x W^T + b for a few rows of x (decode: one row per sequence), float32, on the CPU, W in nn.Linear's (out, in)
// row-major layout.
//
// Why not at::mm: for a handful of rows the product is a matrix-vector one, bound by reading W once; MKL's GEMV on
// the transposed operand (W stored (out, in)) reaches only part of that bandwidth on some CPUs (AMD EPYC: 1.5x the
// time of the same product with W stored (in, out)). Here each output element is a dot product of a W row with an x
// row, both contiguous: a block of kRows W rows is streamed once, with one vector accumulator per W row (kRows
// independent FMA chains, kRows streams for the prefetcher), and reused from L1/L2 for every x row; the x rows
// (a few KB) stay in cache. Blocks are spread over threads with at::parallel_for, each thread's share large enough
// to pay for waking it.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "linear_cpu.h"

namespace {

constexpr int64_t kRows = 4;  // W rows per block
// weight floats a thread must have to itself before a parallel split pays (~0.25 MB: a few microseconds of reads)
constexpr int64_t kFloatsPerThread = 1 << 16;

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
// the last n < 16 floats, zeros beyond: no scalar tail loop for widths that are not a multiple of 16
inline vec vload_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vec vload_tail(const float* p, int64_t n) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - n)));
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// out[j] = dot(w + j * in, x) for j < R (R W rows against one x row), vectorised along `in`
template <int R>
inline void dots(const float* w, const float* x, int64_t in, float* out) {
  vec acc[R];
  for (int j = 0; j < R; ++j) acc[j] = vzero();
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
    const vec xv = vload(x + i);
    for (int j = 0; j < R; ++j) acc[j] = vfma(vload(w + j * in + i), xv, acc[j]);
  }
  if (i < in) {
    const vec xv = vload_tail(x + i, in - i);
    for (int j = 0; j < R; ++j) acc[j] = vfma(vload_tail(w + j * in + i, in - i), xv, acc[j]);
  }
  for (int j = 0; j < R; ++j) out[j] = vsum(acc[j]);
}
#else
template <int R>
inline void dots(const float* w, const float* x, int64_t in, float* out) {
  for (int j = 0; j < R; ++j) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; ++i) s += w[j * in + i] * x[i];
    out[j] = s;
  }
}
#endif

}  // namespace

torch::Tensor linear_forward_cpu(const torch::Tensor& x, const torch::Tensor& weight,
                                 const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear: x must be (rows, in) and weight (out, in)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "linear: x and weight must be float32");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear: x and weight must be on the CPU");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu(),
                "linear: bias must be a float32 CPU vector of weight.size(0)");
  }
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1), out = wc.size(0);
  auto y = torch::empty({rows, out}, xc.options());
  if (rows == 0 || out == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kFloatsPerThread / (kRows * std::max<int64_t>(in, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float part[kRows];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o = block * kRows;
      const int64_t n = std::min(kRows, out - o);
      const float* w = wp + o * in;
      for (int64_t r = 0; r < rows; ++r) {
        if (n == kRows) {
          dots<kRows>(w, xp + r * in, in, part);
        } else {
          for (int64_t j = 0; j < n; ++j) dots<1>(w + j * in, xp + r * in, in, part + j);
        }
        std::copy(part, part + n, yp + r * out + o);
      }
    }
  });
  if (bias.has_value()) y.add_(*bias);
  return y;
}
