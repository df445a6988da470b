// RWKV-6 WKV recurrence on the CPU: forward and backward, parallel over (batch, head).
//
// Layout (the package's torch op): r, k, v, w are (B, T, H, N); u is (H, N); the state S is (B, H, N, N),
// key-major (row i = key channel, column j = value channel). w is the raw log-log decay: the per-step log-decay is
// -exp(min(w, ln 60)), so the decay never drops below e^-60 and exp(w) never overflows.
//   y_t = r_t (diag(u) k_t^T v_t + S_{t-1}),   S_t = diag(d_t) S_{t-1} + k_t^T v_t
// State and decay math run in float32 (float64 for float64 inputs, so gradcheck works); y and the final state are
// float32 whatever the input dtype.
//
// Every pass, forward and backward, is one scan of the same shape over an N x N matrix X:
//   out_t = c_t X_{t-1}   (a reduction over X's rows),   X_t = diag_or_lanes(a_t) X_{t-1} + p_t^T q_t
// with the decay a_t on X's rows or on its columns. X is stored with the reduced index on rows, so the reduction
// and the update are plain vector FMAs along the columns; a tile of X (kRows rows x kCols vectors) stays in
// registers for a whole chunk of steps, so X is loaded and stored once per chunk instead of once per step:
//   forward          X = S    out = y_t (before the bonus)   c = r,  a = d on rows,    p = k,  q = v
//   backward pass 1  X = S^T  out = S_{t-1} dy_t             c = dy, a = d on columns, p = v,  q = k   (forward in t)
//   backward pass 2  X = G    out = k_t G_t (dv)              c = k,  a = d on rows,    p = r,  q = dy  (backward in t)
//                    X = G^T  out = G_t v_t (dk)              c = v,  a = d on columns, p = dy, q = r
// where G_t = dL/dS_t (G_{t-1} = diag(d_t) G_t + r_t^T dy_t). The backward stores no states (O(1) memory per head).
// The gradient of the log-decay at step t sums every (key s, query tau) pair with s < t < tau, which is
// sum_{tau > t} r_tau (S_{tau-1} dy_tau) - sum_{s >= t} k_s (G_s v_s) (the final-state gradient acting as the query
// tau = T + 1); that running difference is carried in float64 so the cancellation costs nothing measurable.
//
// Inputs are read (converted, turned into decays) one chunk of steps at a time into per-head buffers padded to a
// multiple of the tile width, for a group of heads at once, and outputs go back from such buffers into
// (B, T, H, N): no separate torch passes for the decay, the transposes or dw, which cost more than the recurrence
// itself at N = 64.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "../wkv6_checks.h"
#include "wkv6_cpu.h"

namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr double kMaxW = 4.0943445622221004;  // ln 60: the per-step log-decay is clamped at -60

// The widest vector the build targets (GCC / Clang vector extensions: one source for AVX-512, AVX2, SSE, NEON).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VectorOf<T>::type;
template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);

template <typename T>
inline Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store_vec(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Register tile of X: kRows rows x kCols vectors (8 x 2 fills 20 of AVX-512's 32 registers; AVX2 has 16).
constexpr int kRows = kVectorBytes == 64 ? 8 : 4;
constexpr int kCols = 2;
// Steps per chunk: a head's chunk buffers (11 arrays of kChunk x N, 45 KB at N = 64) about fit in L1 while its scans
// run; 16 measured ~10% faster than 32 in the backward (8 and 12: the same as 16).
constexpr int64_t kChunk = 16;

template <typename T>
constexpr int64_t tile_width() {
  return kCols * kLanes<T>;
}
// N padded to whole tiles; padded channels are zero in every input, so X's padded rows and columns stay zero.
template <typename T>
int64_t padded_size(int64_t N) {
  const int64_t unit = std::max<int64_t>(tile_width<T>(), kRows);
  return (N + unit - 1) / unit * unit;
}

// The scan of the header over one chunk of L steps: X is Np x Np, the inputs and out are L x Np (step-major).
template <bool kDecayOnColumns, typename T>
void scan_chunk(T* __restrict__ X, int64_t Np, int64_t L, const T* __restrict__ c, const T* __restrict__ a,
                const T* __restrict__ p, const T* __restrict__ q, T* __restrict__ out) {
  constexpr int W = kLanes<T>;
  using V = Vec<T>;
  for (int64_t col = 0; col < Np; col += kCols * W) {
    for (int64_t row = 0; row < Np; row += kRows) {
      V x[kRows][kCols];
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < kCols; ++j) x[i][j] = load_vec(X + (row + i) * Np + col + j * W);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t at = t * Np;
        // the tile's share of out in two partial sums (even and odd rows), added to the other tiles' once: shorter
        // dependency chains, and a rounding error that grows with N / kRows + kRows / 2 terms instead of N
        V acc[2][kCols] = {}, qv[kCols], av[kCols];
        for (int j = 0; j < kCols; ++j) {
          qv[j] = load_vec(q + at + col + j * W);
          if constexpr (kDecayOnColumns) av[j] = load_vec(a + at + col + j * W);
        }
        for (int i = 0; i < kRows; ++i) {
          const T ci = c[at + row + i], pi = p[at + row + i];
          for (int j = 0; j < kCols; ++j) {
            acc[i % 2][j] += ci * x[i][j];
            if constexpr (kDecayOnColumns) {
              x[i][j] = av[j] * x[i][j] + pi * qv[j];
            } else {
              x[i][j] = a[at + row + i] * x[i][j] + pi * qv[j];
            }
          }
        }
        for (int j = 0; j < kCols; ++j) {
          const V tile = acc[0][j] + acc[1][j];
          store_vec(out + at + col + j * W, row == 0 ? tile : load_vec(out + at + col + j * W) + tile);
        }
      }
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < kCols; ++j) store_vec(X + (row + i) * Np + col + j * W, x[i][j]);
    }
  }
}

// exp for float32 that the compiler vectorises (std::exp is a libm call per element): 2^n * p(f) with
// f = x - n ln 2 in [-ln2 / 2, ln2 / 2] and a degree-6 polynomial, within 2 ulp of expf over [-87, 88].
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float f = std::fma(n, -0.693359375f, x);  // ln 2 in two parts, so n ln 2 is exact enough
  f = std::fma(n, 2.12194440e-4f, f);
  float p = 1.9875691500e-4f;
  p = std::fma(p, f, 1.3981999507e-3f);
  p = std::fma(p, f, 8.3334519073e-3f);
  p = std::fma(p, f, 4.1665795894e-2f);
  p = std::fma(p, f, 1.6666665459e-1f);
  p = std::fma(p, f, 5.0000001201e-1f);
  p = std::fma(p, f * f, f + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_vectorisable(double x) { return std::exp(x); }

// Sizes of one call; every (batch, time, head, channel) array is (B, T, H, N).
struct Dims {
  int64_t B, T, H, N;
  // offset of (b, t, h, 0) for the flat head index bh = b * H + h
  int64_t offset(int64_t bh, int64_t t) const { return ((bh / H * T + t) * H + bh % H) * N; }
};

// Elementwise work on one step's rows, as functions whose __restrict__ parameters let each loop vectorise.
template <typename scalar_t, typename acc_t>
inline void convert_row(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t N) {
  for (int64_t i = 0; i < N; ++i) dst[i] = static_cast<acc_t>(src[i]);
}
// lw = -exp(min(w, ln 60)) and d = exp(lw), in separate loops (the clamp vectorises with -fno-trapping-math)
template <typename acc_t>
inline void decay_row(const acc_t* __restrict__ w, acc_t* __restrict__ lw, acc_t* __restrict__ d, int64_t N) {
  for (int64_t i = 0; i < N; ++i) lw[i] = -exp_vectorisable(std::min(w[i], static_cast<acc_t>(kMaxW)));
  for (int64_t i = 0; i < N; ++i) d[i] = exp_vectorisable(lw[i]);
}
// Reductions as `omp simd` loops: without it the compiler keeps a float sum's order and adds one lane at a time.
// r . (u k): the coefficient of the current step's own v in y (and of dy in dv)
template <typename acc_t>
inline acc_t bonus_row(const acc_t* __restrict__ r, const acc_t* __restrict__ u, const acc_t* __restrict__ k,
                       int64_t N) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < N; ++i) sum += r[i] * u[i] * k[i];
  return sum;
}
template <typename acc_t>
acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t N) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < N; ++i) sum += a[i] * b[i];
  return sum;
}
// x += a z
template <typename acc_t>
inline void add_scaled_row(acc_t* __restrict__ x, acc_t a, const acc_t* __restrict__ z, int64_t N) {
  for (int64_t i = 0; i < N; ++i) x[i] += a * z[i];
}
// Backward pass 1, one step: dr, A_t = r * (S_{t-1} dy) (parked in dw) and the u-gradient.
template <typename acc_t>
inline void pass1_row(acc_t* __restrict__ dr, acc_t* __restrict__ a_park, acc_t* __restrict__ du,
                      const acc_t* __restrict__ s_dy, const acc_t* __restrict__ r, const acc_t* __restrict__ k,
                      const acc_t* __restrict__ u, acc_t v_dy, int64_t N) {
  for (int64_t c = 0; c < N; ++c) {
    dr[c] = s_dy[c] + u[c] * k[c] * v_dy;
    a_park[c] = r[c] * s_dy[c];
    du[c] += r[c] * k[c] * v_dy;
  }
}
// Backward pass 2, one step: dk, and dw from the running log-decay gradient (a_then_dw holds A_t on entry, dw on
// return); d(log-decay)/dw = -exp(w) is lw below the clamp and 0 above it (as torch's clamp).
template <typename acc_t>
inline void pass2_row(acc_t* __restrict__ dk, acc_t* __restrict__ a_then_dw, double* __restrict__ carry,
                      const acc_t* __restrict__ g_v, const acc_t* __restrict__ r, const acc_t* __restrict__ k,
                      const acc_t* __restrict__ u, const acc_t* __restrict__ w, const acc_t* __restrict__ lw,
                      acc_t v_dy, int64_t N) {
  for (int64_t c = 0; c < N; ++c) {
    dk[c] = g_v[c] + u[c] * r[c] * v_dy;
    const double log_decay_grad = carry[c] - static_cast<double>(k[c]) * g_v[c];
    carry[c] = log_decay_grad + a_then_dw[c];
    a_then_dw[c] = w[c] > static_cast<acc_t>(kMaxW) ? acc_t(0) : static_cast<acc_t>(log_decay_grad) * lw[c];
  }
}

// Heads per group: a group's states stay in L2 while its heads advance chunk by chunk together, so each step's
// rows of (B, T, H, N) are read as one contiguous run instead of one 4 KB page per head and step.
constexpr int64_t kHeadGroup = 16;

// The (B, T, H, N) arrays a pass reads: r, k, v, w; dy in the backward; A_t (parked in dw) in backward pass 2.
template <typename scalar_t, typename acc_t>
struct Inputs {
  const scalar_t *r, *k, *v, *w;
  const acc_t *dy, *a;
  Dims dims;
};

// One chunk of one head's steps in processing order, as acc_t arrays of `rows` (kChunk, or T if shorter) x Np: the
// inputs, the log-decay lw = -exp(min(w, ln 60)), the decay d, and three outputs.
template <typename acc_t>
struct ChunkBuffers {
  int64_t Np;
  std::vector<acc_t> storage;
  acc_t *r, *k, *v, *w, *lw, *d, *dy, *a, *out0, *out1, *out2;
  ChunkBuffers(int64_t padded, int64_t rows) : Np(padded), storage(11 * rows * padded, acc_t(0)) {
    acc_t* next = storage.data();
    for (acc_t** field : {&r, &k, &v, &w, &lw, &d, &dy, &a, &out0, &out1, &out2}) {
      *field = next;
      next += rows * Np;
    }
  }
  // the fields point into storage: a copy would point into the original, a move keeps them valid
  ChunkBuffers(const ChunkBuffers&) = delete;
  ChunkBuffers(ChunkBuffers&&) = default;
  // buffers for the largest group of heads in [bh_begin, bh_end) (sized to the call: decode runs T = 1)
  static std::vector<ChunkBuffers> for_group(int64_t padded, const Dims& dims, int64_t bh_begin, int64_t bh_end) {
    std::vector<ChunkBuffers> group;
    const int64_t heads = std::min(kHeadGroup, bh_end - bh_begin);
    group.reserve(heads);
    for (int64_t h = 0; h < heads; ++h) group.emplace_back(padded, std::min(kChunk, dims.T));
    return group;
  }
  // row s from the inputs' elements at `off`
  template <typename scalar_t>
  void load_step(const Inputs<scalar_t, acc_t>& in, int64_t off, int64_t s) {
    const int64_t N = in.dims.N, row = s * Np;
    convert_row(in.r + off, r + row, N);
    convert_row(in.k + off, k + row, N);
    convert_row(in.v + off, v + row, N);
    convert_row(in.w + off, w + row, N);
    if (in.dy != nullptr) convert_row(in.dy + off, dy + row, N);
    if (in.a != nullptr) convert_row(in.a + off, a + row, N);
    decay_row(w + row, lw + row, d + row, N);
  }
};

// Where a pass writes: a (B, T, H, N) array and the buffer field that holds its rows.
template <typename acc_t>
struct Store {
  acc_t* dst;
  acc_t* ChunkBuffers<acc_t>::*field;
};

// Calls body(bh, n, buffers) for each chunk of each head in [group, group_end), forward or backward in time (row s
// of a chunk is step first + s, or first - s), then writes the fields named in `stores`. The group's heads advance
// chunk by chunk together, and a chunk is read and written step by step across the group, so memory moves in runs
// of group * N elements: one head's steps lie H * N elements apart, and moving them head by head left the loads
// and stores waiting on memory.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_chunk(const Inputs<scalar_t, acc_t>& in, std::vector<ChunkBuffers<acc_t>>& buffers, int64_t group,
                    int64_t group_end, bool reversed, std::initializer_list<Store<acc_t>> stores, Body&& body) {
  const Dims& dims = in.dims;
  const int64_t T = dims.T, N = dims.N, direction = reversed ? -1 : 1;
  for (int64_t first = reversed ? T - 1 : 0; first >= 0 && first < T; first += direction * kChunk) {
    const int64_t n = reversed ? std::min(kChunk, first + 1) : std::min(kChunk, T - first);
    for (int64_t s = 0; s < n; ++s)
      for (int64_t bh = group; bh < group_end; ++bh)
        buffers[bh - group].load_step(in, dims.offset(bh, first + direction * s), s);
    for (int64_t bh = group; bh < group_end; ++bh) body(bh, n, buffers[bh - group]);
    for (int64_t s = 0; s < n; ++s)
      for (int64_t bh = group; bh < group_end; ++bh) {
        const int64_t off = dims.offset(bh, first + direction * s);
        for (const Store<acc_t>& store : stores) {
          const acc_t* row = buffers[bh - group].*store.field + s * buffers[bh - group].Np;
          std::copy(row, row + N, store.dst + off);
        }
      }
  }
}

// N x N matrix (or zeros when src is null) into the zero-padded Np x Np X, transposed or not, and back.
template <typename acc_t>
void matrix_in(acc_t* X, int64_t Np, const acc_t* src, int64_t N, bool transpose) {
  std::fill(X, X + Np * Np, acc_t(0));
  if (src == nullptr) return;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) X[(transpose ? j * Np + i : i * Np + j)] = src[i * N + j];
}
template <typename acc_t>
void matrix_out(const acc_t* X, int64_t Np, acc_t* dst, int64_t N) {
  for (int64_t i = 0; i < N; ++i) std::copy(X + i * Np, X + i * Np + N, dst + i * N);
}


template <typename scalar_t, typename acc_t>
void forward_heads(const Inputs<scalar_t, acc_t>& in, const acc_t* u, acc_t* y, acc_t* state, int64_t bh_begin,
                   int64_t bh_end) {
  const Dims& dims = in.dims;
  const int64_t N = dims.N, Np = padded_size<acc_t>(N), NN = Np * Np;
  auto buffers = ChunkBuffers<acc_t>::for_group(Np, dims, bh_begin, bh_end);
  // the scans update `state` (a copy of the initial state) in place, unless N needs padding to whole tiles
  const bool padded = Np != N;
  std::vector<acc_t> padded_states(padded ? buffers.size() * NN : 0);
  for (int64_t group = bh_begin; group < bh_end; group += kHeadGroup) {
    const int64_t group_end = std::min(group + kHeadGroup, bh_end);
    auto S = [&](int64_t bh) { return padded ? &padded_states[(bh - group) * NN] : state + bh * NN; };
    if (padded)
      for (int64_t bh = group; bh < group_end; ++bh) matrix_in(S(bh), Np, state + bh * N * N, N, /*transpose=*/false);
    for_each_chunk(in, buffers, group, group_end, /*reversed=*/false, {{y, &ChunkBuffers<acc_t>::out0}},
                   [&](int64_t bh, int64_t n, ChunkBuffers<acc_t>& c) {
                     const acc_t* uh = u + (bh % dims.H) * N;
                     scan_chunk</*kDecayOnColumns=*/false>(S(bh), Np, n, c.r, c.d, c.k, c.v, c.out0);
                     for (int64_t row = 0; row < n * Np; row += Np)
                       add_scaled_row(c.out0 + row, bonus_row(c.r + row, uh, c.k + row, N), c.v + row, N);
                   });
    if (padded)
      for (int64_t bh = group; bh < group_end; ++bh) matrix_out(S(bh), Np, state + bh * N * N, N);
  }
}

template <typename scalar_t, typename acc_t>
void backward_heads(const Inputs<scalar_t, acc_t>& in, const acc_t* u, const acc_t* grad_final_state,
                    const acc_t* initial_state, acc_t* grad_state, acc_t* dr, acc_t* dk, acc_t* dv, acc_t* dw,
                    acc_t* du_per_head, int64_t bh_begin, int64_t bh_end) {
  const Dims& dims = in.dims;
  const int64_t N = dims.N, Np = padded_size<acc_t>(N), NN = Np * Np;
  auto buffers = ChunkBuffers<acc_t>::for_group(Np, dims, bh_begin, bh_end);
  // per head of the group: G (or S^T in pass 1) and G^T
  std::vector<acc_t> X(buffers.size() * NN), XT(buffers.size() * NN);
  std::vector<double> decay_grad_carry(buffers.size() * N);
  for (int64_t group = bh_begin; group < bh_end; group += kHeadGroup) {
    const int64_t group_end = std::min(group + kHeadGroup, bh_end);
    // Pass 1, forward in t over S^T: dr, the u-gradient, and A_t = r_t * (S_{t-1} dy_t), parked in dw until
    // pass 2 consumes it.
    for (int64_t bh = group; bh < group_end; ++bh)
      matrix_in(&XT[(bh - group) * NN], Np, initial_state == nullptr ? nullptr : initial_state + bh * N * N, N,
                /*transpose=*/true);
    const Inputs<scalar_t, acc_t> pass1_in{in.r, in.k, in.v, in.w, in.dy, nullptr, dims};
    for_each_chunk(pass1_in, buffers, group, group_end, /*reversed=*/false,
                   {{dr, &ChunkBuffers<acc_t>::out1}, {dw, &ChunkBuffers<acc_t>::a}},
                   [&](int64_t bh, int64_t n, ChunkBuffers<acc_t>& c) {
                     scan_chunk</*kDecayOnColumns=*/true>(&XT[(bh - group) * NN], Np, n, c.dy, c.d, c.v, c.k, c.out0);
                     for (int64_t row = 0; row < n * Np; row += Np)
                       pass1_row(c.out1 + row, c.a + row, du_per_head + bh * N, c.out0 + row, c.r + row, c.k + row,
                                 u + (bh % dims.H) * N, dot(c.v + row, c.dy + row, N), N);
                   });
    // XT holds S_T^T: the final-state gradient's share of the log-decay gradient, as the query tau = T + 1; then
    // G and G^T start from the final-state gradient.
    for (int64_t bh = group; bh < group_end; ++bh) {
      const acc_t* dS = grad_final_state == nullptr ? nullptr : grad_final_state + bh * N * N;
      const acc_t* ST = &XT[(bh - group) * NN];
      for (int64_t i = 0; i < N; ++i) {
        double a = 0;
        if (dS != nullptr)
          for (int64_t j = 0; j < N; ++j) a += static_cast<double>(ST[j * Np + i]) * dS[i * N + j];
        decay_grad_carry[(bh - group) * N + i] = a;
      }
      matrix_in(&X[(bh - group) * NN], Np, dS, N, /*transpose=*/false);
      matrix_in(&XT[(bh - group) * NN], Np, dS, N, /*transpose=*/true);
    }
    // Pass 2, backward in t over G and G^T: dv, dk, and dw = (log-decay gradient) * d(log-decay)/dw.
    const Inputs<scalar_t, acc_t> pass2_in{in.r, in.k, in.v, in.w, in.dy, dw, dims};
    for_each_chunk(pass2_in, buffers, group, group_end, /*reversed=*/true,
                   {{dv, &ChunkBuffers<acc_t>::out0}, {dk, &ChunkBuffers<acc_t>::out2}, {dw, &ChunkBuffers<acc_t>::a}},
                   [&](int64_t bh, int64_t n, ChunkBuffers<acc_t>& c) {
                     const acc_t* uh = u + (bh % dims.H) * N;
                     scan_chunk</*kDecayOnColumns=*/false>(&X[(bh - group) * NN], Np, n, c.k, c.d, c.r, c.dy, c.out0);
                     scan_chunk</*kDecayOnColumns=*/true>(&XT[(bh - group) * NN], Np, n, c.v, c.d, c.dy, c.r, c.out1);
                     for (int64_t row = 0; row < n * Np; row += Np) {
                       add_scaled_row(c.out0 + row, bonus_row(c.r + row, uh, c.k + row, N), c.dy + row, N);
                       pass2_row(c.out2 + row, c.a + row, &decay_grad_carry[(bh - group) * N], c.out1 + row,
                                 c.r + row, c.k + row, uh, c.w + row, c.lw + row, dot(c.v + row, c.dy + row, N), N);
                     }
                   });
    for (int64_t bh = group; bh < group_end; ++bh) matrix_out(&X[(bh - group) * NN], Np, grad_state + bh * N * N, N);
  }
}

torch::ScalarType acc_dtype(const torch::Tensor& r) {
  return r.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

// Heads per parallel task: enough state updates per task (~T N^2 each) that a short call (a decode step) is not
// spread over threads whose start-up costs more than its work.
int64_t heads_per_task(const Dims& dims) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, dims.T * dims.N * dims.N));
}

Dims dims_of(const torch::Tensor& r) { return Dims{r.size(0), r.size(1), r.size(2), r.size(3)}; }

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> wkv6_forward_cpu(const torch::Tensor& r, const torch::Tensor& k,
                                                          const torch::Tensor& v, const torch::Tensor& w,
                                                          const torch::Tensor& u,
                                                          const std::optional<torch::Tensor>& initial_state) {
  wkv6_check_inputs(r, k, v, w, u, initial_state);
  const Dims dims = dims_of(r);
  const auto acc = r.options().dtype(acc_dtype(r));
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uc = u.to(acc).contiguous();
  auto y = torch::empty(r.sizes(), acc);
  // a copy: the kernel writes the final state into it
  auto state = initial_state.has_value() ? initial_state->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous()
                                         : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::parallel_for(0, dims.B * dims.H, heads_per_task(dims), [&](int64_t begin, int64_t end) {
      const Inputs<scalar_t, acc_t> in{rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                                       wc.data_ptr<scalar_t>(), nullptr, nullptr, dims};
      forward_heads(in, uc.data_ptr<acc_t>(), y.data_ptr<acc_t>(), state.data_ptr<acc_t>(), begin, end);
    });
  });
  return {y, state};
}

WKV6Grads wkv6_backward_cpu(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& w, const torch::Tensor& u,
                            const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                            const std::optional<torch::Tensor>& grad_final_state) {
  wkv6_check_inputs(r, k, v, w, u, initial_state);
  const Dims dims = dims_of(r);
  const auto acc = r.options().dtype(acc_dtype(r));
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uc = u.to(acc).contiguous();
  auto dy = grad_y.to(acc).contiguous();
  std::optional<torch::Tensor> s0, dsT;
  if (initial_state.has_value()) s0 = initial_state->to(acc).contiguous();
  if (grad_final_state.has_value()) dsT = grad_final_state->to(acc).contiguous();
  auto grad_state = torch::empty({dims.B, dims.H, dims.N, dims.N}, acc);
  auto dr = torch::empty(r.sizes(), acc), dk = torch::empty(r.sizes(), acc);
  auto dv = torch::empty(r.sizes(), acc), dw = torch::empty(r.sizes(), acc);
  auto du_per_head = torch::zeros({dims.B, dims.H, dims.N}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::parallel_for(0, dims.B * dims.H, heads_per_task(dims), [&](int64_t begin, int64_t end) {
      const Inputs<scalar_t, acc_t> in{rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                                       wc.data_ptr<scalar_t>(), dy.data_ptr<acc_t>(), nullptr, dims};
      backward_heads(in, uc.data_ptr<acc_t>(), dsT.has_value() ? dsT->data_ptr<acc_t>() : nullptr,
                     s0.has_value() ? s0->data_ptr<acc_t>() : nullptr, grad_state.data_ptr<acc_t>(),
                     dr.data_ptr<acc_t>(), dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), dw.data_ptr<acc_t>(),
                     du_per_head.data_ptr<acc_t>(), begin, end);
    });
  });
  const auto dtype = r.scalar_type();
  // the initial-state gradient comes back even without an initial state (the caller drops it): one fixed schema
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {dr.to(dtype), dk.to(dtype), dv.to(dtype), dw.to(dtype), du_per_head.sum(0).to(u.scalar_type()),
          grad_initial_state};
}
