// Device code and launch decision of the CUDA fused affine step, shared by affine_step_cuda.cu
// (nvcc) and the CPU emulation harness of tests/test_cuda_emulated.py (g++ with
// tests/cuda_emulation/cuda_shim.h, which defines __device__, threadIdx, __fadd_rn, float2, dim3...).
//
// Everything a thread computes is here as a function of the parameters and its grid-stride
// position, and everything the launcher decides (vector width, two-draw variant, grid) is
// dispatch_affine_step: the .cu only adds the __global__ wrappers and the <<<>>> launch, so the
// emulation runs the very code nvcc compiles.
//
// The kernel is memory bound on a GPU (read x, m, ex, em; write x, m; Philox is cheap next to
// that; the lifted op reads x, m, D and writes x, m, y), so it is about access width: each thread handles kVec consecutive elements of one half
// with 16-byte vector loads/stores when every pointer and the half size allow it, and a scalar
// kernel otherwise (odd sizes, storage offsets).  Grid: 1-D, grid-stride over the flattened
// (sample, vector) index space, so a state with 1 element per half fills its blocks as well as a
// large one does (the Philox counter never holds the sample index, so the layout changes no
// number).  Normals come from philox.h (precise logf/sincosf: no fast-math), so the integer stream
// is bit-exact with the CPU kernel and the reference.  kTwoDraws (R2 != 0, only SSCS) selects the
// variant that computes the second Box-Muller pair; the others skip its logf and sincosf.
//
// The lifted op (psld_fast::lifted_step_, make_lifted_step_params) is this kernel with eps = the
// denoiser output D read for both halves (eps_sample_stride D, eps_m_offset 0, Q01 = Q11 = 0) and
// the extra output y (has_y): uniform runtime branches, no further instantiations.  So are the
// multistep ops (ms_step_, lifted_ms_step_: add_ms_params): D_prev read from dbuf and this call's
// data estimate written back to it, by the same thread (read first).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "affine_step.h"
#include "philox.h"

// Called before every vector access with the pointer and the pack's alignment.  A GPU faults on a
// misaligned vector access; the emulation harness defines this to raise instead.
#ifndef PSLD_CHECK_PACK_ALIGNED
#define PSLD_CHECK_PACK_ALIGNED(ptr, bytes) ((void)0)
#endif

namespace psld_fast {
namespace cuda_step {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond 2^24 threads

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* src, float (&dst)[N]) {
  PSLD_CHECK_PACK_ALIGNED(src, alignof(Pack<T, N>));
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = static_cast<float>(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const float (&src)[N]) {
  PSLD_CHECK_PACK_ALIGNED(dst, alignof(Pack<T, N>));
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(src[i]);  // round to nearest even
  *reinterpret_cast<Pack<T, N>*>(dst) = pk;
}

// The first Box-Muller pair of element j (n0, n1 of philox_normals4): the second is not computed.
__device__ __forceinline__ float2 philox_normals2(uint64_t seed, uint32_t j, uint32_t step,
                                                  uint32_t stream) {
  const Uint4 w = philox4x32_10(j, step, stream, 0u, static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  float2 n;
  box_muller(uint32_to_uniform(w.x), uint32_to_uniform(w.y), n.x, n.y);
  return n;
}

// The noise terms r0 n0 + r1 n1 (+ r2 n2 + r3 n3) with the rounding fixed: one multiply, then one
// fused multiply-add per further term, left to right.  Spelled out (instead of `a * b + c`, which
// ptxas may contract into FMAs in any way) so that the scalar and the vector instantiations, whose
// surrounding code differs, give the same bits: a sample does not depend on its tensor's alignment.
__device__ __forceinline__ float noise_sum(float r0, float n0, float r1, float n1) {
  return __fmaf_rn(r1, n1, __fmul_rn(r0, n0));
}

__device__ __forceinline__ float noise_sum(float r0, float n0, float r1, float n1, float r2, float n2,
                                           float r3, float n3) {
  return __fmaf_rn(r3, n3, __fmaf_rn(r2, n2, __fmaf_rn(r1, n1, __fmul_rn(r0, n0))));
}

// kVec consecutive elements j0.. of sample s.  Term order as the reference: ((P) + (Q)) + (R).
template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
__device__ __forceinline__ void step_elements(const AffineStepParams& p, int64_t s, int64_t j0) {
  const int64_t D = p.half_numel;
  state_t* x = static_cast<state_t*>(p.u) + s * 2 * D + j0;
  const float* k = p.coef;
  float xo[kVec], mo[kVec], a[kVec], b[kVec], dn[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) xo[i] = mo[i] = dn[i] = 0.0f;
  if (p.read_state || p.drec_reads_state) {
    load_pack<state_t, kVec>(x, a);
    load_pack<state_t, kVec>(x + D, b);
    if (p.read_state) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        xo[i] = __fadd_rn(__fmul_rn(k[kP00], a[i]), __fmul_rn(k[kP01], b[i]));
        mo[i] = __fadd_rn(__fmul_rn(k[kP10], a[i]), __fmul_rn(k[kP11], b[i]));
      }
    }
    if (p.drec_reads_state) {  // multistep: this call's D, state part (a0 x + a1 m)
#pragma unroll
      for (int i = 0; i < kVec; ++i) dn[i] = __fadd_rn(__fmul_rn(p.a0, a[i]), __fmul_rn(p.a1, b[i]));
    }
  }
  if (p.has_eps) {  // plain op: eps (B, 2D), stride 2D, m half at +D; lifted op: D (B, D) for both
    const eps_t* ex = static_cast<const eps_t*>(p.eps) + s * p.eps_sample_stride + j0;
    load_pack<eps_t, kVec>(ex, a);
    load_pack<eps_t, kVec>(ex + p.eps_m_offset, b);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      xo[i] = __fadd_rn(xo[i], __fadd_rn(__fmul_rn(k[kQ00], a[i]), __fmul_rn(k[kQ01], b[i])));
      mo[i] = __fadd_rn(mo[i], __fadd_rn(__fmul_rn(k[kQ10], a[i]), __fmul_rn(k[kQ11], b[i])));
    }
    if (p.has_drec) {  // + (c0 ex + c1 em)
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        dn[i] = __fadd_rn(dn[i], __fadd_rn(__fmul_rn(p.c0, a[i]), __fmul_rn(p.c1, b[i])));
      }
    }
  }
  if (p.has_noise) {
    const uint64_t seed = static_cast<uint64_t>(p.seeds[s]);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const uint32_t j = static_cast<uint32_t>(j0 + i);
      if constexpr (kTwoDraws) {
        const Float4 n = philox_normals4(seed, j, p.step, p.stream);
        xo[i] = __fadd_rn(xo[i], noise_sum(k[kR1_00], n.x, k[kR1_01], n.y, k[kR2_00], n.z, k[kR2_01], n.w));
        mo[i] = __fadd_rn(mo[i], noise_sum(k[kR1_10], n.x, k[kR1_11], n.y, k[kR2_10], n.z, k[kR2_11], n.w));
      } else {
        const float2 n = philox_normals2(seed, j, p.step, p.stream);
        xo[i] = __fadd_rn(xo[i], noise_sum(k[kR1_00], n.x, k[kR1_01], n.y));
        mo[i] = __fadd_rn(mo[i], noise_sum(k[kR1_10], n.x, k[kR1_11], n.y));
      }
    }
  }
  // multistep ops only (dbuf (B, D) float32; no offset is applied to a null dbuf)
  float* dq = p.has_dprev || p.has_drec ? p.dbuf + s * D + j0 : nullptr;
  if (p.has_dprev) {  // + G D_prev, read before this thread writes the same elements of dbuf
    float dp[kVec];
    load_pack<float, kVec>(dq, dp);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      xo[i] = __fadd_rn(xo[i], __fmul_rn(p.g0, dp[i]));
      mo[i] = __fadd_rn(mo[i], __fmul_rn(p.g1, dp[i]));
    }
  }
  if (p.has_drec) store_pack<float, kVec>(dq, dn);
  store_pack<state_t, kVec>(x, xo);
  store_pack<state_t, kVec>(x + D, mo);
  if (p.has_y) {  // lifted op: the next denoiser input y = W0 x' + W1 m', from the unrounded state
    float yo[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) yo[i] = __fadd_rn(__fmul_rn(p.wy0, xo[i]), __fmul_rn(p.wy1, mo[i]));
    store_pack<state_t, kVec>(static_cast<state_t*>(p.y) + s * D + j0, yo);
  }
}

// The thread's first flattened index and the grid's stride (the thread index of a grid-stride loop).
__device__ __forceinline__ int64_t thread_index() {
  return blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// One thread of affine_step_kernel: flattened (sample s, vector v) index t = s * vecs + v from
// `first` on by `stride`: consecutive threads take consecutive vectors of one sample (coalesced),
// and a sample boundary falls anywhere inside a block.
template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
__device__ __forceinline__ void affine_step_thread(const AffineStepParams& p, int64_t first,
                                                   int64_t stride) {
  const int64_t vecs = p.half_numel / kVec;  // dispatch_affine_step guarantees D % kVec == 0
  const int64_t total = p.batch * vecs;
  if (total <= int64_t(UINT32_MAX)) {  // the usual case: 32-bit division (uniform branch)
    const uint32_t vecs32 = static_cast<uint32_t>(vecs);
    for (int64_t t = first; t < total; t += stride) {
      const uint32_t s = static_cast<uint32_t>(t) / vecs32;
      const uint32_t v = static_cast<uint32_t>(t) - s * vecs32;
      step_elements<state_t, eps_t, kVec, kTwoDraws>(p, s, int64_t(v) * kVec);
    }
  } else {
    for (int64_t t = first; t < total; t += stride) {
      const int64_t s = t / vecs;
      step_elements<state_t, eps_t, kVec, kTwoDraws>(p, s, (t - s * vecs) * kVec);
    }
  }
}

// One thread of philox_test_kernel: the Philox words and normals of (B, numel) elements.
__device__ __forceinline__ void philox_test_thread(const int64_t* seeds, int64_t batch, int64_t numel,
                                                   uint32_t step, uint32_t stream, int64_t* words,
                                                   float* normals, int64_t first, int64_t stride) {
  const int64_t total = batch * numel;
  for (int64_t t = first; t < total; t += stride) {
    const uint64_t seed = static_cast<uint64_t>(seeds[t / numel]);
    const uint32_t j = static_cast<uint32_t>(t % numel);
    const Uint4 w = philox4x32_10(j, step, stream, 0u, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
    const Float4 n = philox_normals4(seed, j, step, stream);
    words[4 * t + 0] = w.x;
    words[4 * t + 1] = w.y;
    words[4 * t + 2] = w.z;
    words[4 * t + 3] = w.w;
    normals[4 * t + 0] = n.x;
    normals[4 * t + 1] = n.y;
    normals[4 * t + 2] = n.z;
    normals[4 * t + 3] = n.w;
  }
}

// ------------------------------------------------------------------------- launch decision (host)

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Blocks of kThreads for `items` grid-stride items, at most kMaxBlocks.
inline unsigned grid_blocks(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename state_t, typename eps_t, int kVec, typename Launcher>
void dispatch_draws(const AffineStepParams& p, Launcher& launcher) {
  const unsigned blocks = grid_blocks(p.batch * (p.half_numel / kVec));
  if (p.has_noise && p.has_second_draw) {
    launcher.template launch<state_t, eps_t, kVec, true>(p, blocks);
  } else {
    launcher.template launch<state_t, eps_t, kVec, false>(p, blocks);
  }
}

template <typename state_t, typename eps_t, typename Launcher>
void dispatch_typed(const AffineStepParams& p, Launcher& launcher) {
  constexpr int kVec = 16 / sizeof(state_t);  // 4 for fp32, 8 for fp16/bf16: 16-byte state packs
  // The eps pack of kVec elements is 8, 16 or 32 bytes (fp32 state + half eps, same size, half
  // state + fp32 eps) and is loaded as aligned pieces of min(pack, 16) bytes.
  constexpr size_t kEpsAlign = std::min<size_t>(kVec * sizeof(eps_t), 16);
  // Vector path: D % kVec == 0 keeps every sample's halves (offsets s * 2D and D, in elements)
  // pack-aligned for u and eps alike (and the lifted op's D and y, offsets s * D), so only the
  // base pointers remain to check.
  // The multistep ops' dbuf (float32, offsets s * D) loads and stores packs of kVec floats, 16 or
  // 32 bytes, as aligned 16-byte pieces.
  const bool vec = p.half_numel % kVec == 0 && is_aligned(p.u, 16) &&
                   (!p.has_eps || is_aligned(p.eps, kEpsAlign)) && (!p.has_y || is_aligned(p.y, 16)) &&
                   (!(p.has_dprev || p.has_drec) || is_aligned(p.dbuf, 16));
  if (vec) {
    dispatch_draws<state_t, eps_t, kVec>(p, launcher);
  } else {
    dispatch_draws<state_t, eps_t, 1>(p, launcher);
  }
}

template <typename state_t, typename Launcher>
void dispatch_eps(const AffineStepParams& p, Launcher& launcher) {
  switch (p.eps_dtype) {
    case c10::ScalarType::Half: return dispatch_typed<state_t, c10::Half>(p, launcher);
    case c10::ScalarType::BFloat16: return dispatch_typed<state_t, c10::BFloat16>(p, launcher);
    default: return dispatch_typed<state_t, float>(p, launcher);
  }
}

// Picks the kernel instantiation and grid for p (batch and half_numel > 0) and calls
// launcher.launch<state_t, eps_t, kVec, kTwoDraws>(p, blocks); blocks of kThreads threads.
template <typename Launcher>
void dispatch_affine_step(const AffineStepParams& p, Launcher& launcher) {
  switch (p.state_dtype) {
    case c10::ScalarType::Half: return dispatch_eps<c10::Half>(p, launcher);
    case c10::ScalarType::BFloat16: return dispatch_eps<c10::BFloat16>(p, launcher);
    default: return dispatch_eps<float>(p, launcher);
  }
}

}  // namespace cuda_step
}  // namespace psld_fast
