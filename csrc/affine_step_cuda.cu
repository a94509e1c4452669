// CUDA kernel of psld_fast::affine_step_ (and the test-only psld_fast::philox_test).
//
// One launch per step on the current stream, so it is CUDA-graph capturable.  The op is memory
// bound on a GPU (read x, m, ex, em; write x, m; Philox is cheap next to that), so the kernel is
// about access width: each thread handles kVec consecutive elements of one half with 16-byte
// vector loads/stores when every pointer and the half size allow it, and a scalar kernel otherwise
// (odd sizes, storage offsets).  Grid: 1-D, grid-stride over the flattened (sample, vector) index
// space, so a state with 1 element per half fills its blocks as well as a large one does (the
// Philox counter never holds the sample index, so the layout does not change any number).
// Normals come from philox.h (precise logf/sincosf: no fast-math), so the integer stream is
// bit-exact with the CPU kernel and the reference.  kTwoDraws (R2 != 0, only SSCS) selects the
// variant that computes the second Box-Muller pair; the others skip its logf and sincosf.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "affine_step.h"
#include "philox.h"

namespace psld_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond 2^24 threads

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* src, float (&dst)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = static_cast<float>(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const float (&src)[N]) {
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

// kVec consecutive elements j0.. of sample s.  Term order as the reference: ((P) + (Q)) + (R).
template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
__device__ __forceinline__ void step_elements(const AffineStepParams& p, int64_t s, int64_t j0) {
  const int64_t D = p.half_numel;
  state_t* x = static_cast<state_t*>(p.u) + s * 2 * D + j0;
  const float* k = p.coef;
  float xo[kVec], mo[kVec], a[kVec], b[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) xo[i] = mo[i] = 0.0f;
  if (p.read_state) {
    load_pack<state_t, kVec>(x, a);
    load_pack<state_t, kVec>(x + D, b);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      xo[i] = __fadd_rn(__fmul_rn(k[kP00], a[i]), __fmul_rn(k[kP01], b[i]));
      mo[i] = __fadd_rn(__fmul_rn(k[kP10], a[i]), __fmul_rn(k[kP11], b[i]));
    }
  }
  if (p.has_eps) {
    const eps_t* ex = static_cast<const eps_t*>(p.eps) + s * 2 * D + j0;
    load_pack<eps_t, kVec>(ex, a);
    load_pack<eps_t, kVec>(ex + D, b);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      xo[i] = __fadd_rn(xo[i], __fadd_rn(__fmul_rn(k[kQ00], a[i]), __fmul_rn(k[kQ01], b[i])));
      mo[i] = __fadd_rn(mo[i], __fadd_rn(__fmul_rn(k[kQ10], a[i]), __fmul_rn(k[kQ11], b[i])));
    }
  }
  if (p.has_noise) {
    const uint64_t seed = static_cast<uint64_t>(p.seeds[s]);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      // fma is allowed here: the noise term is compared to a tolerance, not bit for bit.
      if constexpr (kTwoDraws) {
        const Float4 n = philox_normals4(seed, static_cast<uint32_t>(j0 + i), p.step, p.stream);
        xo[i] += k[kR1_00] * n.x + k[kR1_01] * n.y + k[kR2_00] * n.z + k[kR2_01] * n.w;
        mo[i] += k[kR1_10] * n.x + k[kR1_11] * n.y + k[kR2_10] * n.z + k[kR2_11] * n.w;
      } else {
        const float2 n = philox_normals2(seed, static_cast<uint32_t>(j0 + i), p.step, p.stream);
        xo[i] += k[kR1_00] * n.x + k[kR1_01] * n.y;
        mo[i] += k[kR1_10] * n.x + k[kR1_11] * n.y;
      }
    }
  }
  store_pack<state_t, kVec>(x, xo);
  store_pack<state_t, kVec>(x + D, mo);
}

template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
__global__ void __launch_bounds__(kThreads)
    affine_step_kernel(const AffineStepParams p) {
  // Flattened (sample s, vector v) index t = s * vecs + v: consecutive threads take consecutive
  // vectors of one sample (coalesced), and a sample boundary falls anywhere inside a block.
  const int64_t vecs = p.half_numel / kVec;  // the launcher guarantees D % kVec == 0
  const int64_t total = p.batch * vecs;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (total <= int64_t(UINT32_MAX)) {  // the usual case: 32-bit division (uniform branch)
    const uint32_t vecs32 = static_cast<uint32_t>(vecs);
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += stride) {
      const uint32_t s = static_cast<uint32_t>(t) / vecs32;
      const uint32_t v = static_cast<uint32_t>(t) - s * vecs32;
      step_elements<state_t, eps_t, kVec, kTwoDraws>(p, s, int64_t(v) * kVec);
    }
  } else {
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += stride) {
      const int64_t s = t / vecs;
      step_elements<state_t, eps_t, kVec, kTwoDraws>(p, s, (t - s * vecs) * kVec);
    }
  }
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename state_t, typename eps_t, int kVec>
void launch_vec(const AffineStepParams& p, cudaStream_t stream) {
  const int64_t items = p.batch * (p.half_numel / kVec);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks)));
  if (p.has_noise && p.has_second_draw) {
    affine_step_kernel<state_t, eps_t, kVec, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    affine_step_kernel<state_t, eps_t, kVec, false><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename state_t, typename eps_t>
void launch_typed(const AffineStepParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(state_t);  // 4 for fp32, 8 for fp16/bf16: 16-byte state packs
  // The eps pack of kVec elements is 8, 16 or 32 bytes (fp32 state + half eps, same size, half
  // state + fp32 eps) and is loaded as aligned pieces of min(pack, 16) bytes.
  constexpr size_t kEpsAlign = std::min<size_t>(kVec * sizeof(eps_t), 16);
  // Vector path: D % kVec == 0 keeps every sample's halves (offsets s * 2D and D, in elements)
  // pack-aligned for u and eps alike, so only the base pointers remain to check.
  const bool vec = p.half_numel % kVec == 0 && aligned(p.u, 16) &&
                   (!p.has_eps || aligned(p.eps, kEpsAlign));
  if (vec) {
    launch_vec<state_t, eps_t, kVec>(p, stream);
  } else {
    launch_vec<state_t, eps_t, 1>(p, stream);
  }
}

template <typename state_t>
void launch_eps(const AffineStepParams& p, cudaStream_t stream) {
  switch (p.eps_dtype) {
    case c10::ScalarType::Half: return launch_typed<state_t, c10::Half>(p, stream);
    case c10::ScalarType::BFloat16: return launch_typed<state_t, c10::BFloat16>(p, stream);
    default: return launch_typed<state_t, float>(p, stream);
  }
}

void affine_step_cuda_(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                       const at::Tensor& seeds, c10::ArrayRef<double> coef, int64_t step,
                       int64_t stream) {
  at::Tensor eps_holder;
  const AffineStepParams p = make_affine_step_params(u, eps, seeds, coef, step, stream,
                                                     c10::DeviceType::CUDA, eps_holder);
  if (p.batch == 0 || p.half_numel == 0) return;
  const c10::cuda::CUDAGuard guard(u.device());
  const cudaStream_t cu_stream = at::cuda::getCurrentCUDAStream();
  switch (p.state_dtype) {
    case c10::ScalarType::Half: return launch_eps<c10::Half>(p, cu_stream);
    case c10::ScalarType::BFloat16: return launch_eps<c10::BFloat16>(p, cu_stream);
    default: return launch_eps<float>(p, cu_stream);
  }
}

__global__ void philox_test_kernel(const int64_t* seeds, int64_t batch, int64_t numel,
                                   uint32_t step, uint32_t stream, int64_t* words, float* normals) {
  const int64_t total = batch * numel;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
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

std::tuple<at::Tensor, at::Tensor> philox_test_cuda(const at::Tensor& seeds, int64_t numel,
                                                    int64_t step, int64_t stream) {
  check_philox_test_args(seeds, numel, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(seeds.device());
  const at::Tensor s = seeds.contiguous();
  const int64_t B = s.size(0);
  at::Tensor words = at::empty({B, numel, 4}, s.options());
  at::Tensor normals = at::empty({B, numel, 4}, s.options().dtype(at::kFloat));
  const int64_t total = B * numel;
  if (total == 0) return {words, normals};
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
  philox_test_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<int64_t>(), B, numel, static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
      words.data_ptr<int64_t>(), normals.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {words, normals};
}

}  // namespace
}  // namespace psld_fast

TORCH_LIBRARY_IMPL(psld_fast, CUDA, m) {
  m.impl("affine_step_", &psld_fast::affine_step_cuda_);
  m.impl("philox_test", &psld_fast::philox_test_cuda);
}
