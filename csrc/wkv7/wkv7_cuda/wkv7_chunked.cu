// Chunked RWKV-7 WKV (the generalised delta rule) on NVIDIA GPUs (sm_80+): forward and backward, fp32 state,
// fp32 / fp16 / bf16 inputs, any T.
//
// Same recurrence and layout as wkv7_cuda.cu (the step kernel): r, w, k, v, a, b (B, T, H, N), the state
// (B, H, N, N) fp32 key-major, y fp32, the per-step log-decay lw = -exp(w) clamped at -60. The step kernel walks
// the T steps one by one with one block per (batch, head); this kernel walks T / 16 chunks and does each chunk's work
// as matrix products, with one block per (batch, head, 16 value channels): the state update
// S_t = (diag(d_t) + b_t^T a_t) S_{t-1} + k_t^T v_t acts on each value column separately, so value columns split
// freely and B = 1, H = 32, N = 64 already runs 128 blocks of 128 threads.
//
// Per chunk (the WY/UT form of the chunked torch form in ops/wkv7.py, with the decays factored through the chunk
// start; every product of a row factor and a column factor is one decayed term e^{G_t - G_s} <= 1):
//   G_t = sum_{p<=t} lw_p,  D = e^{G_15},  rows = [r_t e^{G_t}; a_t e^{G_{t-1}}],  cols = [b_s e^{-G_s}; k_s e^{-G_s}]
//   [[A_rb, A_rk], [A_ab, A_ak]] = rows @ cols^T  (r rows: s <= t; a rows: s < t)
//   sa = (I - A_ab)^{-1} (a_in @ S + A_ak @ v)      (sa_t = a_t S_{t-1} for the whole chunk)
//   y  = r_in @ S + A_rk @ v + A_rb @ sa            S' = D * (S + cols^T @ [sa; v])
// A chunk whose summed log-decay drops below -60 on some channel (never with RWKV-7's decays, >= -9.8 over 16 steps)
// is split into segments that stay above it, each run as a pass of the same algebra with the other steps masked out,
// so every factor stays a normal fp32 number whatever the inputs. The products are tensor-core MMAs (WMMA m16n16k8
// TF32) in the 3xTF32 split (hi = tf32(x), lo = tf32(x - hi); lo*hi + hi*lo + hi*hi in fp32: fp32 accuracy); the
// factors and the 16 x 16 triangular inverse (forward substitution, one thread per column) are FMA work. The
// algebra, the backward's formulas and a CPU emulation of every step are in tests/wkv7_chunked_emulation.py;
// tests/test_ops_wkv7_chunked.py checks the emulation against the float64 reference.
//
// Backward: `forward` with chunk_states writes the state at every chunk start (no state is kept between the
// forward and the backward), then `backward_kernel` walks the chunks (and a split chunk's segments) from the last,
// carrying the state gradient in shared memory. Per pass, with dE the gradient of S' and dE' = D * dE:
//   d_sa = A_rb^T dy + b_out dE',  g = (I - A_ab)^{-T} d_sa,  dv = A_rk^T dy + k_out dE' + A_ak^T g,
//   dA = [dy; g] [sa; v]^T (masked),  dS = D dE + rows^T [dy; g],
//   d_rows = dA cols + [dy; g] S^T,  d_cols = dA^T rows + [sa; v] dE'^T,
// then per channel the input gradients (d_rows and d_cols times their factors) and the log-decay gradient as a
// suffix sum of dG_t = d_r_in r_in - d_b_out b_out - d_k_out k_out + d_a_in[t+1] a_in[t+1] (+ D rowsum(dE S') at the
// last step). The gradients that sum over value channels (r, a, b, k, the log-decay) come out per value tile and the
// caller adds the N / 16 tiles (deterministic, no atomics); dv is complete per tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "wkv7_chunked.h"

namespace wkv7_chunked {
// external linkage (not an anonymous namespace): the sm_75 pass compiles the kernels as stubs and would warn about
// every helper it leaves unused
namespace detail {

using namespace nvcuda;

inline constexpr int L = kChunk;
inline constexpr int VT = kValueTile;
inline constexpr int kWarps = kThreads / 32;
inline constexpr float kMaxW = 4.0943445622221004f;  // ln 60: the per-step log-decay is clamped at -60
inline constexpr float kLogFactorMax = 60.f;         // a segment's summed log-decay stays >= -60 on every channel

static_assert(L == 16 && VT == 16 && kWarps == 4, "one WMMA tile per chunk and per value tile, four warps");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float log_decay(float w) { return -__expf(fminf(w, kMaxW)); }

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i];
    const float h = wmma::__float_to_tf32(x);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(x - h);
  }
}

// acc += op(A)[m0:m0+16, 0:K] @ op(B)[0:K, n0:n0+16] in 3xTF32, A and B row-major in shared memory (32-byte aligned
// tiles) with leading dimensions lda, ldb; op(X) = X^T where the flag is set (read as a column-major tile).
template <bool kTransA, bool kTransB>
__device__ __forceinline__ void mma(Acc& acc, const float* A, int lda, int m0, const float* B, int ldb, int n0,
                                    int K) {
  using LayoutA = std::conditional_t<kTransA, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kTransB, wmma::col_major, wmma::row_major>;
  const float* a = kTransA ? A + m0 : A + m0 * lda;
  const float* b = kTransB ? B + n0 * ldb : B + n0;
  const int a_step = kTransA ? 8 * lda : 8, b_step = kTransB ? 8 : 8 * ldb;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA> a_hi, a_lo;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB> b_hi, b_lo;
  for (int s = 0; s < K / 8; ++s) {
    wmma::load_matrix_sync(a_hi, a + s * a_step, lda);
    wmma::load_matrix_sync(b_hi, b + s * b_step, ldb);
    split_tf32(a_hi, a_lo);
    split_tf32(b_hi, b_lo);
    // the small terms first, so hi*hi lands on an accumulator that already holds them
    wmma::mma_sync(acc, a_lo, b_hi, acc);
    wmma::mma_sync(acc, a_hi, b_lo, acc);
    wmma::mma_sync(acc, a_hi, b_hi, acc);
  }
}

enum : bool { N_ = false, T_ = true };  // no transpose / transpose, for mma<..>'s flags

// Shared memory of a pass (all row-major; the forward's and, extended, the backward's).
template <int N>
struct PassTiles {
  alignas(32) float rows[2 * L * N];  // [r_in; a_in]
  alignas(32) float cols[2 * L * N];  // [b_out; k_out]
  alignas(32) float G[L * N];         // the chunk's log-decays, then the pass's cumulative log-decays
  alignas(32) float A[2 * L * 2 * L];  // [[A_rb, A_rk], [A_ab, A_ak]]
  alignas(32) float inv[L * L];        // (I - A_ab)^{-1}
  alignas(32) float sav[2 * L * VT];   // [sa; v]
  alignas(32) float rhs[L * VT];       // a_in S + A_ak v
  alignas(32) float y[L * VT];
  alignas(32) float S[N * VT];  // the state tile entering the pass
  alignas(32) float P[N * VT];  // cols^T [sa; v]
  alignas(32) float D[N];
  unsigned segment_starts;  // bit t: a segment starts at step t > 0
};

template <int N>
struct BackwardTiles : PassTiles<N> {
  alignas(32) float dyg[2 * L * VT];  // [dy; g]
  alignas(32) float dsa[L * VT];
  alignas(32) float dv[L * VT];
  alignas(32) float dE[N * VT];   // the gradient of the pass's end state
  alignas(32) float dEs[N * VT];  // D * dE
  alignas(32) float dS[N * VT];   // the gradient of its start state
  alignas(32) float dA[2 * L * 2 * L];
  alignas(32) float d_rows[2 * L * N];
  alignas(32) float d_cols[2 * L * N];
};

// Where a block's inputs are: step t, channel c of (batch, head) at base + t * row + c.
struct Head {
  int T;
  int64_t base, row;
  int j0;  // the value tile's first channel
};

// The chunk's log-decays (padding: 0) into s.G, then warp 0 splits the chunk into segments: greedy from the start,
// a new one where some channel's running sum would drop below -kLogFactorMax (the emulation's `segments`).
template <typename scalar_t, int N>
__device__ void find_segments(PassTiles<N>& s, const Head& hd, int t0, const scalar_t* __restrict__ w, int tid) {
  for (int i = tid; i < L * N; i += kThreads) {
    const int t = i / N;
    s.G[i] = t0 + t < hd.T ? log_decay(to_float(w[hd.base + (t0 + t) * hd.row + i % N])) : 0.f;
  }
  __syncthreads();
  if (tid < 32) {
    constexpr int kPer = (N + 31) / 32;
    float run[kPer];
#pragma unroll
    for (int q = 0; q < kPer; ++q) run[q] = 0.f;
    unsigned starts = 0;
    int start = 0;
    for (int t = 0; t < L; ++t) {
      float low = INFINITY;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int c = tid + 32 * q;
        if (c < N) {
          run[q] += s.G[t * N + c];
          low = fminf(low, run[q]);
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) low = fminf(low, __shfl_xor_sync(0xffffffffu, low, offset));
      if (t > start && low < -kLogFactorMax) {
        start = t;
        starts |= 1u << t;
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          const int c = tid + 32 * q;
          if (c < N) run[q] = s.G[t * N + c];
        }
      }
    }
    if (tid == 0) s.segment_starts = starts;
  }
  __syncthreads();
}

// [first, last) of segment `index` of the chunk
__device__ __forceinline__ void segment_bounds(unsigned starts, int index, int& first, int& last) {
  first = 0;
  for (int i = 0; i < index; ++i) first = __ffs(starts & ~((2u << first) - 1u)) - 1;
  const unsigned later = starts & ~((2u << first) - 1u);
  last = later ? __ffs(later) - 1 : L;
}

// One pass over steps [first, last) of chunk t0 (other steps masked out) from the state tile s.S: loads, factors,
// scores, the inverse and sa; then P = cols^T [sa; v] and, where y_out is given, y. dy_out (the backward) also
// receives the pass's dy rows. Leaves S untouched (the caller updates it or uses it as the pass's start state).
template <typename scalar_t, int N>
__device__ void pass_core(PassTiles<N>& s, const Head& hd, int t0, int first, int last, const scalar_t* __restrict__ r,
                          const scalar_t* __restrict__ w, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ v, const scalar_t* __restrict__ a,
                          const scalar_t* __restrict__ b, const float* __restrict__ dy, float* dy_out, bool want_y,
                          int tid) {
  const int warp = tid / 32;
  for (int i = tid; i < L * N; i += kThreads) {
    const int t = i / N, c = i % N;
    const bool active = t >= first && t < last && t0 + t < hd.T;
    const int64_t idx = hd.base + (t0 + t) * hd.row + c;
    s.rows[i] = active ? to_float(r[idx]) : 0.f;
    s.rows[L * N + i] = active ? to_float(a[idx]) : 0.f;
    s.cols[i] = active ? to_float(b[idx]) : 0.f;
    s.cols[L * N + i] = active ? to_float(k[idx]) : 0.f;
    s.G[i] = active ? log_decay(to_float(w[idx])) : 0.f;
  }
  for (int i = tid; i < L * VT; i += kThreads) {
    const int t = i / VT;
    const bool active = t >= first && t < last && t0 + t < hd.T;
    const int64_t idx = hd.base + (t0 + t) * hd.row + hd.j0 + i % VT;
    s.sav[L * VT + i] = active ? to_float(v[idx]) : 0.f;
    if (dy_out != nullptr) dy_out[i] = active ? dy[idx] : 0.f;
  }
  __syncthreads();
  if (tid < N) {  // factors, one channel per thread, running sums in the emulation's order
    const int c = tid;
    float g = 0.f, e_prev = 1.f;
    for (int t = 0; t < L; ++t) {
      g += s.G[t * N + c];
      s.G[t * N + c] = g;
      const float e = __expf(g), e_neg = __expf(-g);
      s.rows[t * N + c] *= e;
      s.rows[(L + t) * N + c] *= e_prev;
      s.cols[t * N + c] *= e_neg;
      s.cols[(L + t) * N + c] *= e_neg;
      e_prev = e;
    }
    s.D[c] = e_prev;
  }
  __syncthreads();
  {  // scores: one 16 x 16 tile per warp, then the masks
    const int mi = warp / 2, ni = warp % 2;
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mma<N_, T_>(acc, s.rows, N, mi * 16, s.cols, N, ni * 16, N);
    wmma::store_matrix_sync(s.A + mi * 16 * 2 * L + ni * 16, acc, 2 * L, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = tid; i < 4 * L * L; i += kThreads) {
    const int t = i / (2 * L), col = i % (2 * L) % L;
    if (t < L ? col > t : col >= t - L) s.A[i] = 0.f;
  }
  __syncthreads();
  if (tid < L) {  // the inverse, column tid by forward substitution: X[t] = e_t + sum_{s<t} A_ab[t, s] X[s]
    const int j = tid;
    for (int t = 0; t < L; ++t) {
      float x = t == j ? 1.f : 0.f;
      for (int q = 0; q < t; ++q) x = fmaf(s.A[(L + t) * 2 * L + q], s.inv[q * L + j], x);
      s.inv[t * L + j] = x;
    }
  } else if (warp == 1) {  // rhs = a_in S + A_ak v
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mma<N_, N_>(acc, s.rows + L * N, N, 0, s.S, VT, 0, N);
    mma<N_, N_>(acc, s.A + L * 2 * L + L, 2 * L, 0, s.sav + L * VT, VT, 0, L);
    wmma::store_matrix_sync(s.rhs, acc, VT, wmma::mem_row_major);
  } else if (warp == 2 && want_y) {  // y's first two terms: r_in S + A_rk v
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mma<N_, N_>(acc, s.rows, N, 0, s.S, VT, 0, N);
    mma<N_, N_>(acc, s.A + L, 2 * L, 0, s.sav + L * VT, VT, 0, L);
    wmma::store_matrix_sync(s.y, acc, VT, wmma::mem_row_major);
  }
  __syncthreads();
  if (warp == 0) {  // sa = inv rhs
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mma<N_, N_>(acc, s.inv, L, 0, s.rhs, VT, 0, L);
    wmma::store_matrix_sync(s.sav, acc, VT, wmma::mem_row_major);
  }
  __syncthreads();
  if (warp == 0 && want_y) {  // y += A_rb sa
    Acc acc;
    wmma::load_matrix_sync(acc, s.y, VT, wmma::mem_row_major);
    mma<N_, N_>(acc, s.A, 2 * L, 0, s.sav, VT, 0, L);
    wmma::store_matrix_sync(s.y, acc, VT, wmma::mem_row_major);
  }
  for (int tile = warp; tile < N / 16; tile += kWarps) {  // P = cols^T [sa; v]
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mma<T_, N_>(acc, s.cols, N, tile * 16, s.sav, VT, 0, 2 * L);
    wmma::store_matrix_sync(s.P + tile * 16 * VT, acc, VT, wmma::mem_row_major);
  }
  __syncthreads();
}

// S <- D * (S + P): the pass's end state
template <int N>
__device__ __forceinline__ void advance_state(PassTiles<N>& s, int tid) {
  for (int i = tid; i < N * VT; i += kThreads) s.S[i] = s.D[i / VT] * (s.S[i] + s.P[i]);
  __syncthreads();
}

template <typename scalar_t, int N, bool kStoreStates>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(int T, int H, const scalar_t* __restrict__ r, const scalar_t* __restrict__ w,
                   const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, const scalar_t* __restrict__ a,
                   const scalar_t* __restrict__ b, float* __restrict__ y, float* __restrict__ state,
                   float* __restrict__ chunk_states) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  auto& s = *reinterpret_cast<PassTiles<N>*>(smem);
  constexpr int kTiles = N / VT;
  const int bh = blockIdx.x, tile = blockIdx.y, tid = threadIdx.x, C = (T + L - 1) / L;
  const Head hd{T, (static_cast<int64_t>(bh / H) * T * H + bh % H) * N, static_cast<int64_t>(H) * N, tile * VT};
  float* S_global = state + static_cast<int64_t>(bh) * N * N + hd.j0;  // row c of the tile at c * N
  for (int i = tid; i < N * VT; i += kThreads) s.S[i] = S_global[(i / VT) * N + i % VT];
  float* states_out = kStoreStates ? chunk_states + (static_cast<int64_t>(bh) * kTiles + tile) * C * N * VT : nullptr;
  __syncthreads();
  for (int c = 0; c < C; ++c) {
    const int t0 = c * L;
    if (kStoreStates) {
      for (int i = tid; i < N * VT; i += kThreads) states_out[static_cast<int64_t>(c) * N * VT + i] = s.S[i];
    }
    find_segments<scalar_t, N>(s, hd, t0, w, tid);
    const int passes = __popc(s.segment_starts) + 1;
    for (int p = 0; p < passes; ++p) {
      int first, last;
      segment_bounds(s.segment_starts, p, first, last);
      pass_core<scalar_t, N>(s, hd, t0, first, last, r, w, k, v, a, b, nullptr, nullptr, y != nullptr, tid);
      if (y != nullptr) {
        for (int i = tid; i < L * VT; i += kThreads) {
          const int t = i / VT;
          if (t >= first && t < last && t0 + t < T) y[hd.base + (t0 + t) * hd.row + hd.j0 + i % VT] = s.y[i];
        }
      }
      advance_state<N>(s, tid);
    }
  }
  for (int i = tid; i < N * VT; i += kThreads) S_global[(i / VT) * N + i % VT] = s.S[i];
#else
  __trap();  // the host never launches this below sm_80 (WMMA TF32); the step kernel runs there
#endif
}

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(int T, int H, const scalar_t* __restrict__ r, const scalar_t* __restrict__ w,
                    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, const scalar_t* __restrict__ a,
                    const scalar_t* __restrict__ b, const float* __restrict__ dy,
                    const float* __restrict__ chunk_states, float* __restrict__ grad_state,
                    float* __restrict__ dr_tiles, float* __restrict__ dlw_tiles, float* __restrict__ dk_tiles,
                    float* __restrict__ da_tiles, float* __restrict__ db_tiles, float* __restrict__ dv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  auto& s = *reinterpret_cast<BackwardTiles<N>*>(smem);
  constexpr int kTiles = N / VT;
  const int bh = blockIdx.x, tile = blockIdx.y, tid = threadIdx.x, warp = tid / 32, C = (T + L - 1) / L;
  const int B = gridDim.x / H;
  const Head hd{T, (static_cast<int64_t>(bh / H) * T * H + bh % H) * N, static_cast<int64_t>(H) * N, tile * VT};
  const int64_t tile_offset = static_cast<int64_t>(tile) * B * T * H * N;  // this tile's partial gradients
  float* dS_global = grad_state + static_cast<int64_t>(bh) * N * N + hd.j0;
  for (int i = tid; i < N * VT; i += kThreads) s.dE[i] = dS_global[(i / VT) * N + i % VT];
  const float* states_in = chunk_states + (static_cast<int64_t>(bh) * kTiles + tile) * C * N * VT;
  __syncthreads();
  for (int c = C - 1; c >= 0; --c) {
    const int t0 = c * L;
    find_segments<scalar_t, N>(s, hd, t0, w, tid);
    const int passes = __popc(s.segment_starts) + 1;
    for (int p = passes - 1; p >= 0; --p) {
      // the pass's start state: the chunk's, carried through the segments before it
      for (int i = tid; i < N * VT; i += kThreads) s.S[i] = states_in[static_cast<int64_t>(c) * N * VT + i];
      __syncthreads();
      for (int q = 0; q < p; ++q) {
        int first, last;
        segment_bounds(s.segment_starts, q, first, last);
        pass_core<scalar_t, N>(s, hd, t0, first, last, r, w, k, v, a, b, nullptr, nullptr, false, tid);
        advance_state<N>(s, tid);
      }
      int first, last;
      segment_bounds(s.segment_starts, p, first, last);
      pass_core<scalar_t, N>(s, hd, t0, first, last, r, w, k, v, a, b, dy, s.dyg, false, tid);
      for (int i = tid; i < N * VT; i += kThreads) s.dEs[i] = s.D[i / VT] * s.dE[i];
      __syncthreads();
      if (warp == 0) {  // d_sa = A_rb^T dy + b_out dE'
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        mma<T_, N_>(acc, s.A, 2 * L, 0, s.dyg, VT, 0, L);
        mma<N_, N_>(acc, s.cols, N, 0, s.dEs, VT, 0, N);
        wmma::store_matrix_sync(s.dsa, acc, VT, wmma::mem_row_major);
      } else if (warp == 1) {  // dv's first two terms: A_rk^T dy + k_out dE'
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        mma<T_, N_>(acc, s.A + L, 2 * L, 0, s.dyg, VT, 0, L);
        mma<N_, N_>(acc, s.cols + L * N, N, 0, s.dEs, VT, 0, N);
        wmma::store_matrix_sync(s.dv, acc, VT, wmma::mem_row_major);
      }
      __syncthreads();
      if (warp == 0) {  // g = inv^T d_sa
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        mma<T_, N_>(acc, s.inv, L, 0, s.dsa, VT, 0, L);
        wmma::store_matrix_sync(s.dyg + L * VT, acc, VT, wmma::mem_row_major);
      }
      __syncthreads();
      // units: 0 dv += A_ak^T g; 1-4 the tiles of dA = [dy; g] [sa; v]^T; then the tiles of rows^T [dy; g]
      for (int unit = warp; unit < 5 + N / 16; unit += kWarps) {
        Acc acc;
        if (unit == 0) {
          wmma::load_matrix_sync(acc, s.dv, VT, wmma::mem_row_major);
          mma<T_, N_>(acc, s.A + L * 2 * L + L, 2 * L, 0, s.dyg + L * VT, VT, 0, L);
          wmma::store_matrix_sync(s.dv, acc, VT, wmma::mem_row_major);
        } else if (unit < 5) {
          const int mi = (unit - 1) / 2, ni = (unit - 1) % 2;
          wmma::fill_fragment(acc, 0.f);
          mma<N_, T_>(acc, s.dyg, VT, mi * 16, s.sav, VT, ni * 16, VT);
          wmma::store_matrix_sync(s.dA + mi * 16 * 2 * L + ni * 16, acc, 2 * L, wmma::mem_row_major);
        } else {
          const int ct = unit - 5;
          wmma::fill_fragment(acc, 0.f);
          mma<T_, N_>(acc, s.rows, N, ct * 16, s.dyg, VT, 0, 2 * L);
          wmma::store_matrix_sync(s.dS + ct * 16 * VT, acc, VT, wmma::mem_row_major);
        }
      }
      __syncthreads();
      for (int i = tid; i < 4 * L * L; i += kThreads) {
        const int t = i / (2 * L), col = i % (2 * L) % L;
        if (t < L ? col > t : col >= t - L) s.dA[i] = 0.f;
      }
      for (int i = tid; i < N * VT; i += kThreads) s.dS[i] = fmaf(s.D[i / VT], s.dE[i], s.dS[i]);
      __syncthreads();
      // d_rows = dA cols + [dy; g] S^T and d_cols = dA^T rows + [sa; v] dE'^T, 16 x 16 tiles over the warps
      constexpr int kColTiles = N / 16;
      for (int unit = warp; unit < 4 * kColTiles; unit += kWarps) {
        const int which = unit / (2 * kColTiles), mi = unit / kColTiles % 2, ni = unit % kColTiles;
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        if (which == 0) {
          mma<N_, N_>(acc, s.dA, 2 * L, mi * 16, s.cols, N, ni * 16, 2 * L);
          mma<N_, T_>(acc, s.dyg, VT, mi * 16, s.S, VT, ni * 16, VT);
          wmma::store_matrix_sync(s.d_rows + mi * 16 * N + ni * 16, acc, N, wmma::mem_row_major);
        } else {
          mma<T_, N_>(acc, s.dA, 2 * L, mi * 16, s.rows, N, ni * 16, 2 * L);
          mma<N_, T_>(acc, s.sav, VT, mi * 16, s.dEs, VT, ni * 16, VT);
          wmma::store_matrix_sync(s.d_cols + mi * 16 * N + ni * 16, acc, N, wmma::mem_row_major);
        }
      }
      __syncthreads();
      if (tid < N) {  // channel tid: the input gradients and the log-decay gradient's suffix sum
        const int ch = tid;
        float dD = 0.f;
#pragma unroll
        for (int j = 0; j < VT; ++j) dD = fmaf(s.dE[ch * VT + j], s.S[ch * VT + j] + s.P[ch * VT + j], dD);
        float suffix = s.D[ch] * dD;  // dG of the last step gets the end state's term
        for (int t = L - 1; t >= 0; --t) {
          const int i = t * N + ch, ia = (L + t) * N + ch;
          const float G = s.G[i], G_prev = t > 0 ? s.G[i - N] : 0.f;
          suffix += s.d_rows[i] * s.rows[i] - s.d_cols[i] * s.cols[i] - s.d_cols[ia] * s.cols[ia];
          if (t >= first && t < last && t0 + t < T) {
            const int64_t idx = tile_offset + hd.base + (t0 + t) * hd.row + ch;
            const float e_neg = __expf(-G);
            dr_tiles[idx] = s.d_rows[i] * __expf(G);
            da_tiles[idx] = s.d_rows[ia] * __expf(G_prev);
            db_tiles[idx] = s.d_cols[i] * e_neg;
            dk_tiles[idx] = s.d_cols[ia] * e_neg;
            dlw_tiles[idx] = suffix;
          }
          suffix += s.d_rows[ia] * s.rows[ia];  // a_in[t] holds e^{G_{t-1}}: it reaches dG_{t-1}
        }
      } else {
        for (int i = tid - N; i < L * VT; i += kThreads - N) {
          const int t = i / VT;
          if (t >= first && t < last && t0 + t < T) dv[hd.base + (t0 + t) * hd.row + hd.j0 + i % VT] = s.dv[i];
        }
      }
      __syncthreads();
      for (int i = tid; i < N * VT; i += kThreads) s.dE[i] = s.dS[i];
      __syncthreads();
    }
  }
  for (int i = tid; i < N * VT; i += kThreads) dS_global[(i / VT) * N + i % VT] = s.dE[i];
#else
  __trap();
#endif
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  // above 48 KB a kernel must opt in to dynamic shared memory (sm_80+: up to 163 KB per block)
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename scalar_t, int N>
void launch_forward(int B, int T, int H, const scalar_t* r, const scalar_t* w, const scalar_t* k, const scalar_t* v,
                    const scalar_t* a, const scalar_t* b, float* y, float* state, float* chunk_states,
                    cudaStream_t stream) {
  const dim3 grid(B * H, N / VT);
  const size_t bytes = sizeof(PassTiles<N>);
  if (chunk_states != nullptr) {
    allow_shared_memory(forward_kernel<scalar_t, N, true>, bytes);
    forward_kernel<scalar_t, N, true><<<grid, kThreads, bytes, stream>>>(T, H, r, w, k, v, a, b, y, state,
                                                                          chunk_states);
  } else {
    allow_shared_memory(forward_kernel<scalar_t, N, false>, bytes);
    forward_kernel<scalar_t, N, false><<<grid, kThreads, bytes, stream>>>(T, H, r, w, k, v, a, b, y, state, nullptr);
  }
}

template <typename scalar_t, int N>
void launch_backward(int B, int T, int H, const scalar_t* r, const scalar_t* w, const scalar_t* k,
                     const scalar_t* v, const scalar_t* a, const scalar_t* b, const float* dy,
                     const float* chunk_states, float* grad_state, float* dr_tiles, float* dlw_tiles,
                     float* dk_tiles, float* da_tiles, float* db_tiles, float* dv, cudaStream_t stream) {
  const dim3 grid(B * H, N / VT);
  const size_t bytes = sizeof(BackwardTiles<N>);
  allow_shared_memory(backward_kernel<scalar_t, N>, bytes);
  backward_kernel<scalar_t, N><<<grid, kThreads, bytes, stream>>>(T, H, r, w, k, v, a, b, dy, chunk_states,
                                                                  grad_state, dr_tiles, dlw_tiles, dk_tiles,
                                                                  da_tiles, db_tiles, dv);
}

}  // namespace detail

using namespace detail;

template <typename scalar_t>
void forward(int B, int T, int H, int N, const scalar_t* r, const scalar_t* w, const scalar_t* k, const scalar_t* v,
             const scalar_t* a, const scalar_t* b, float* y, float* state, float* chunk_states, cudaStream_t stream) {
  if (B * H == 0) return;
  switch (N) {
    case 16: launch_forward<scalar_t, 16>(B, T, H, r, w, k, v, a, b, y, state, chunk_states, stream); break;
    case 32: launch_forward<scalar_t, 32>(B, T, H, r, w, k, v, a, b, y, state, chunk_states, stream); break;
    case 64: launch_forward<scalar_t, 64>(B, T, H, r, w, k, v, a, b, y, state, chunk_states, stream); break;
    default: break;  // the caller checks head_size_supported
  }
}

template <typename scalar_t>
void backward(int B, int T, int H, int N, const scalar_t* r, const scalar_t* w, const scalar_t* k, const scalar_t* v,
              const scalar_t* a, const scalar_t* b, const float* dy, const float* chunk_states, float* grad_state,
              float* dr_tiles, float* dlw_tiles, float* dk_tiles, float* da_tiles, float* db_tiles, float* dv,
              cudaStream_t stream) {
  if (B * H == 0) return;
  switch (N) {
#define WKV7_CHUNKED_BACKWARD(n)                                                                                   \
  case n:                                                                                                          \
    launch_backward<scalar_t, n>(B, T, H, r, w, k, v, a, b, dy, chunk_states, grad_state, dr_tiles, dlw_tiles,     \
                                 dk_tiles, da_tiles, db_tiles, dv, stream);                                        \
    break;
    WKV7_CHUNKED_BACKWARD(16)
    WKV7_CHUNKED_BACKWARD(32)
    WKV7_CHUNKED_BACKWARD(64)
#undef WKV7_CHUNKED_BACKWARD
    default: break;
  }
}

#define WKV7_CHUNKED_INSTANTIATE(scalar_t)                                                                         \
  template void forward<scalar_t>(int, int, int, int, const scalar_t*, const scalar_t*, const scalar_t*,           \
                                  const scalar_t*, const scalar_t*, const scalar_t*, float*, float*, float*,       \
                                  cudaStream_t);                                                                   \
  template void backward<scalar_t>(int, int, int, int, const scalar_t*, const scalar_t*, const scalar_t*,          \
                                   const scalar_t*, const scalar_t*, const scalar_t*, const float*, const float*,  \
                                   float*, float*, float*, float*, float*, float*, float*, cudaStream_t);
WKV7_CHUNKED_INSTANTIATE(float)
WKV7_CHUNKED_INSTANTIATE(__half)
WKV7_CHUNKED_INSTANTIATE(__nv_bfloat16)
#undef WKV7_CHUNKED_INSTANTIATE

}  // namespace wkv7_chunked
