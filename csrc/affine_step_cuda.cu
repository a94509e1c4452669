// CUDA kernel of psld_fast::affine_step_ and psld_fast::lifted_step_ (and the test-only
// psld_fast::philox_test).
//
// One launch per step on the current stream, so it is CUDA-graph capturable.  The device code (the
// element step, the grid-stride thread bodies) and the launch decision (vector width, two-draw
// variant, grid) live in affine_step_cuda.cuh, shared with the CPU emulation harness of
// tests/test_cuda_emulated.py; this file holds the __global__ wrappers and the launcher.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "affine_step.h"
#include "affine_step_cuda.cuh"

namespace psld_fast {
namespace {

using namespace cuda_step;

template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
__global__ void __launch_bounds__(kThreads) affine_step_kernel(const AffineStepParams p) {
  affine_step_thread<state_t, eps_t, kVec, kTwoDraws>(p, thread_index(), grid_stride());
}

__global__ void philox_test_kernel(const int64_t* seeds, int64_t batch, int64_t numel,
                                   uint32_t step, uint32_t stream, int64_t* words, float* normals) {
  philox_test_thread(seeds, batch, numel, step, stream, words, normals, thread_index(), grid_stride());
}

// dispatch_affine_step's launcher: the chosen instantiation on the current stream.
struct StreamLauncher {
  cudaStream_t stream;

  template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
  void launch(const AffineStepParams& p, unsigned blocks) {
    affine_step_kernel<state_t, eps_t, kVec, kTwoDraws><<<blocks, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Every op's launch: the chosen instantiation on u's device and current stream.
void launch_cuda(const AffineStepParams& p, const at::Tensor& u) {
  if (p.batch == 0 || p.half_numel == 0) return;
  const c10::cuda::CUDAGuard guard(u.device());
  StreamLauncher launcher{at::cuda::getCurrentCUDAStream()};
  dispatch_affine_step(p, launcher);
}

void affine_step_cuda_(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                       const at::Tensor& seeds, c10::ArrayRef<double> coef, int64_t step,
                       int64_t stream) {
  at::Tensor eps_holder;
  launch_cuda(make_affine_step_params(u, eps, seeds, coef, step, stream, c10::DeviceType::CUDA, eps_holder), u);
}

// The lifted op: the same kernel with eps = d for both halves and the extra output y.
void lifted_step_cuda_(const at::Tensor& u, const std::optional<at::Tensor>& d,
                       const std::optional<at::Tensor>& y, const at::Tensor& seeds,
                       c10::ArrayRef<double> coef, int64_t step, int64_t stream) {
  at::Tensor d_holder;
  launch_cuda(make_lifted_step_params(u, d, y, seeds, coef, step, stream, c10::DeviceType::CUDA, d_holder), u);
}

// The multistep ops: the same kernel with the dbuf operand (D_prev read, this call's D written).
void ms_step_cuda_(const at::Tensor& u, const std::optional<at::Tensor>& eps, const at::Tensor& dbuf,
                   const at::Tensor& seeds, c10::ArrayRef<double> coef, c10::ArrayRef<double> ms,
                   bool record, int64_t step, int64_t stream) {
  at::Tensor eps_holder;
  AffineStepParams p = make_affine_step_params(u, eps, seeds, coef, step, stream,
                                               c10::DeviceType::CUDA, eps_holder);
  add_ms_params(p, u, dbuf, ms, record, /*lifted=*/false);
  launch_cuda(p, u);
}

void lifted_ms_step_cuda_(const at::Tensor& u, const std::optional<at::Tensor>& d,
                          const std::optional<at::Tensor>& y, const at::Tensor& dbuf,
                          const at::Tensor& seeds, c10::ArrayRef<double> coef,
                          c10::ArrayRef<double> ms, bool record, int64_t step, int64_t stream) {
  at::Tensor d_holder;
  AffineStepParams p = make_lifted_step_params(u, d, y, seeds, coef, step, stream,
                                               c10::DeviceType::CUDA, d_holder);
  add_ms_params(p, u, dbuf, ms, record, /*lifted=*/true);
  launch_cuda(p, u);
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
  philox_test_kernel<<<grid_blocks(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<int64_t>(), B, numel, static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
      words.data_ptr<int64_t>(), normals.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {words, normals};
}

}  // namespace
}  // namespace psld_fast

TORCH_LIBRARY_IMPL(psld_fast, CUDA, m) {
  m.impl("affine_step_", &psld_fast::affine_step_cuda_);
  m.impl("lifted_step_", &psld_fast::lifted_step_cuda_);
  m.impl("ms_step_", &psld_fast::ms_step_cuda_);
  m.impl("lifted_ms_step_", &psld_fast::lifted_ms_step_cuda_);
  m.impl("philox_test", &psld_fast::philox_test_cuda);
}
