#pragma once
// Chunked WKV7 on NVIDIA GPUs (sm_80+): raw-pointer launchers, no torch types, so nvcc can check this file alone.
// Contract and algebra: wkv7_chunked.cu; the torch-facing op and the choice between this and the step kernel:
// wkv7_chunked_op.cu.

#include <cuda_runtime.h>

namespace wkv7_chunked {

constexpr int kChunk = 16;      // tokens per chunk (one MMA tile of rows)
constexpr int kValueTile = 16;  // value channels per thread block (one MMA tile of columns)
constexpr int kThreads = 128;   // four warps per block

// Head sizes with an instantiation (multiples of the value tile; the backward's shared memory grows with N).
inline bool head_size_supported(int N) { return N == 16 || N == 32 || N == 64; }
inline int num_chunks(int T) { return (T + kChunk - 1) / kChunk; }

// r, w, k, v, a, b: (B, T, H, N) in scalar_t (float, __half or __nv_bfloat16); y: (B, T, H, N) fp32.
// state: (B, H, N, N) fp32 key-major, the initial state on entry and the final state on return.
// chunk_states: null, or room for the state at every chunk start, B * H * num_chunks(T) * N * N floats (laid out
// per block: (B * H, N / kValueTile, num_chunks(T), N, kValueTile)); y may be null when only those are wanted.
template <typename scalar_t>
void forward(int B, int T, int H, int N, const scalar_t* r, const scalar_t* w, const scalar_t* k, const scalar_t* v,
             const scalar_t* a, const scalar_t* b, float* y, float* state, float* chunk_states, cudaStream_t stream);

// dy: (B, T, H, N) fp32; chunk_states: as written by `forward`; grad_state: (B, H, N, N) fp32, the final state's
// gradient on entry (zeros if none), the initial state's on return; dv: (B, T, H, N) fp32. The gradients of r, a,
// b, k and of the log-decay lw = -exp(w) come per value tile, each (N / kValueTile, B, T, H, N) fp32: the caller
// sums them over the tiles.
template <typename scalar_t>
void backward(int B, int T, int H, int N, const scalar_t* r, const scalar_t* w, const scalar_t* k, const scalar_t* v,
              const scalar_t* a, const scalar_t* b, const float* dy, const float* chunk_states, float* grad_state,
              float* dr_tiles, float* dlw_tiles, float* dk_tiles, float* da_tiles, float* db_tiles, float* dv,
              cudaStream_t stream);

}  // namespace wkv7_chunked
