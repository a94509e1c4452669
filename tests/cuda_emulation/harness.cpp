// The CUDA kernel's device code (csrc/affine_step_cuda.cuh) run on the CPU: tests/test_cuda_emulated.py
// builds this file with g++ (torch.utils.cpp_extension) and compares it with the reference and the
// C++ CPU kernel.
//
// The launch decision is the .cu's own (dispatch_affine_step); the emulated launch then runs every
// thread of every block one after another (the kernel has no shared memory and no barrier: each
// thread's grid-stride loop is independent), with threadIdx / blockIdx / blockDim / gridDim set
// as the GPU would.  The __global__ wrappers below are the .cu's, line for line.  A vector access
// to a misaligned address raises (a GPU faults there).  Ops (namespace psld_cuda_emu):
//   affine_step_(u, eps, seeds, coef, step, stream) -> [kVec, two_draws, blocks]   (CPU tensors)
//   lifted_step_(u, d, y, seeds, coef16, step, stream) -> [kVec, two_draws, blocks]
//   ms_step_(u, eps, dbuf, seeds, coef, ms6, record, step, stream) -> [kVec, two_draws, blocks]
//   lifted_ms_step_(u, d, y, dbuf, seeds, coef16, ms2, record, step, stream) -> [kVec, two_draws, blocks]
//   philox_test(seeds, numel, step, stream) -> (words, normals)
//   sparse_step(...): a state of any size (> 2^32 elements) in lazily committed memory, only the
//                     given threads run; returns the probed elements (see sparse_step).
#include "cuda_shim.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#define PSLD_CHECK_PACK_ALIGNED(ptr, bytes)                                                        \
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % (bytes) == 0, "emulated CUDA kernel: ", (bytes), \
              "-byte vector access at misaligned address ", static_cast<const void*>(ptr),         \
              " (a GPU faults here)")

#include "affine_step.h"
#include "affine_step_cuda.cuh"

namespace psld_fast {
// bindings.cpp (compiled into this harness for make_affine_step_params) names the CPU kernel's ISA
// switch, which this harness does not have.
const char* cpu_isa_name() { return "emulation"; }
bool set_cpu_isa(const char*) { return false; }
}  // namespace psld_fast

namespace psld_cuda_emu {

using namespace psld_fast;
using namespace psld_fast::cuda_step;

// ---- the .cu's __global__ wrappers
template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
__global__ void __launch_bounds__(kThreads) affine_step_kernel(const AffineStepParams p) {
  affine_step_thread<state_t, eps_t, kVec, kTwoDraws>(p, thread_index(), grid_stride());
}

__global__ void philox_test_kernel(const int64_t* seeds, int64_t batch, int64_t numel,
                                   uint32_t step, uint32_t stream, int64_t* words, float* normals) {
  philox_test_thread(seeds, batch, numel, step, stream, words, normals, thread_index(), grid_stride());
}

// ---- emulated launches
void set_coordinates(unsigned blocks, int64_t global_thread) {
  gridDim = dim3(blocks);
  blockDim = dim3(kThreads);
  blockIdx = dim3(static_cast<unsigned>(global_thread / kThreads));
  threadIdx = dim3(static_cast<unsigned>(global_thread % kThreads));
}

// Runs every thread (or only `only`, global thread indices) of the chosen instantiation; records
// what the launcher chose.
struct EmulatedLauncher {
  const std::vector<int64_t>* only = nullptr;
  std::vector<int64_t> plan;  // kVec, two_draws, blocks

  template <typename state_t, typename eps_t, int kVec, bool kTwoDraws>
  void launch(const AffineStepParams& p, unsigned blocks) {
    plan = {kVec, kTwoDraws ? 1 : 0, blocks};
    if (only != nullptr) {
      for (const int64_t t : *only) {
        TORCH_CHECK(t >= 0 && t < int64_t(blocks) * kThreads, "sparse_step: thread ", t,
                    " is outside the grid of ", blocks, " x ", kThreads);
        set_coordinates(blocks, t);
        affine_step_kernel<state_t, eps_t, kVec, kTwoDraws>(p);
      }
      return;
    }
    for (int64_t t = 0; t < int64_t(blocks) * kThreads; ++t) {
      set_coordinates(blocks, t);
      affine_step_kernel<state_t, eps_t, kVec, kTwoDraws>(p);
    }
  }
};

// Every op's emulated launch: runs the chosen instantiation's threads, returns the plan.
std::vector<int64_t> launch_emulated(const AffineStepParams& p) {
  if (p.batch == 0 || p.half_numel == 0) return {0, 0, 0};
  EmulatedLauncher launcher;
  dispatch_affine_step(p, launcher);
  return launcher.plan;
}

std::vector<int64_t> affine_step_emulated_(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                                           const at::Tensor& seeds, c10::ArrayRef<double> coef,
                                           int64_t step, int64_t stream) {
  at::Tensor eps_holder;
  return launch_emulated(make_affine_step_params(u, eps, seeds, coef, step, stream, c10::DeviceType::CPU,
                                                 eps_holder));
}

std::vector<int64_t> lifted_step_emulated_(const at::Tensor& u, const std::optional<at::Tensor>& d,
                                           const std::optional<at::Tensor>& y, const at::Tensor& seeds,
                                           c10::ArrayRef<double> coef, int64_t step, int64_t stream) {
  at::Tensor d_holder;
  return launch_emulated(make_lifted_step_params(u, d, y, seeds, coef, step, stream, c10::DeviceType::CPU,
                                                 d_holder));
}

// The multistep ops: the .cu's ms_step_cuda_ / lifted_ms_step_cuda_ with the emulated launch.
std::vector<int64_t> ms_step_emulated_(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                                       const at::Tensor& dbuf, const at::Tensor& seeds,
                                       c10::ArrayRef<double> coef, c10::ArrayRef<double> ms, bool record,
                                       int64_t step, int64_t stream) {
  at::Tensor eps_holder;
  AffineStepParams p = make_affine_step_params(u, eps, seeds, coef, step, stream, c10::DeviceType::CPU,
                                               eps_holder);
  add_ms_params(p, u, dbuf, ms, record, /*lifted=*/false);
  return launch_emulated(p);
}

std::vector<int64_t> lifted_ms_step_emulated_(const at::Tensor& u, const std::optional<at::Tensor>& d,
                                              const std::optional<at::Tensor>& y, const at::Tensor& dbuf,
                                              const at::Tensor& seeds, c10::ArrayRef<double> coef,
                                              c10::ArrayRef<double> ms, bool record, int64_t step,
                                              int64_t stream) {
  at::Tensor d_holder;
  AffineStepParams p = make_lifted_step_params(u, d, y, seeds, coef, step, stream, c10::DeviceType::CPU,
                                               d_holder);
  add_ms_params(p, u, dbuf, ms, record, /*lifted=*/true);
  return launch_emulated(p);
}

std::tuple<at::Tensor, at::Tensor> philox_test_emulated(const at::Tensor& seeds, int64_t numel,
                                                        int64_t step, int64_t stream) {
  check_philox_test_args(seeds, numel, c10::DeviceType::CPU);
  const at::Tensor s = seeds.contiguous();
  const int64_t B = s.size(0);
  at::Tensor words = at::empty({B, numel, 4}, s.options());
  at::Tensor normals = at::empty({B, numel, 4}, s.options().dtype(at::kFloat));
  const int64_t total = B * numel;
  if (total == 0) return {words, normals};
  const unsigned blocks = grid_blocks(total);
  for (int64_t t = 0; t < int64_t(blocks) * kThreads; ++t) {
    set_coordinates(blocks, t);
    philox_test_kernel(s.data_ptr<int64_t>(), B, numel, static_cast<uint32_t>(step),
                       static_cast<uint32_t>(stream), words.data_ptr<int64_t>(),
                       normals.data_ptr<float>());
  }
  return {words, normals};
}

// ---- sparse states: more elements than memory holds

// Anonymous memory committed page by page on first touch (MAP_NORESERVE): a 50 GB state costs
// only the pages the chosen threads touch.
struct LazyBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit LazyBuffer(size_t n) : bytes(n) {
    ptr = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(ptr != MAP_FAILED, "sparse_step: mmap of ", n, " bytes (MAP_NORESERVE) failed: ",
                std::strerror(errno));
  }
  ~LazyBuffer() {
    if (ptr != MAP_FAILED && ptr != nullptr) munmap(ptr, bytes);
  }
  LazyBuffer(const LazyBuffer&) = delete;
  LazyBuffer& operator=(const LazyBuffer&) = delete;
};

// Input pattern at (sample s, element j of the half, half h): exact small float32 values (the
// test computes the same; the storage dtype then rounds them the same way on both sides).
float pattern(int64_t s, int64_t j, int64_t h, int64_t salt) {
  const int64_t v = (s * 7919 + j * 104729 + h * 15485863 + salt * 32452843) % 2001;
  return static_cast<float>(v - 1000) / 1024.0f;
}

template <typename T>
void write_probes(void* base, int64_t D, const at::Tensor& probes, int64_t salt) {
  T* b = static_cast<T*>(base);
  const int64_t* pr = probes.data_ptr<int64_t>();
  for (int64_t i = 0; i < probes.size(0); ++i) {
    const int64_t s = pr[2 * i], j = pr[2 * i + 1];
    b[s * 2 * D + j] = static_cast<T>(pattern(s, j, 0, salt));
    b[s * 2 * D + D + j] = static_cast<T>(pattern(s, j, 1, salt));
  }
}

template <typename T>
void read_probes(const void* base, int64_t D, const at::Tensor& probes, float* out) {
  const T* b = static_cast<const T*>(base);
  const int64_t* pr = probes.data_ptr<int64_t>();
  for (int64_t i = 0; i < probes.size(0); ++i) {
    const int64_t s = pr[2 * i], j = pr[2 * i + 1];
    out[2 * i] = static_cast<float>(b[s * 2 * D + j]);
    out[2 * i + 1] = static_cast<float>(b[s * 2 * D + D + j]);
  }
}

template <typename F>
void with_type(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Half: return f(c10::Half());
    case c10::ScalarType::BFloat16: return f(c10::BFloat16());
    case c10::ScalarType::Float: return f(float());
    default: TORCH_CHECK(false, "sparse_step: unsupported dtype ", t);
  }
}

// A (batch, 2, half_numel) state of state_dtype (and eps of eps_dtype, if given) in lazy memory,
// zero except at the probes (s, j) (N, 2) int64, where x, m (and ex, em) hold pattern(); runs the
// emulated kernel's threads `threads` only (global thread indices) and returns the probes' x, m
// after the step (N, 2) float32 and the launch plan [kVec, two_draws, blocks].
std::tuple<at::Tensor, std::vector<int64_t>> sparse_step(
    int64_t batch, int64_t half_numel, c10::ScalarType state_dtype,
    std::optional<c10::ScalarType> eps_dtype, const at::Tensor& seeds, c10::ArrayRef<double> coef,
    int64_t step, int64_t stream, c10::ArrayRef<int64_t> threads, const at::Tensor& probes) {
  TORCH_CHECK(probes.scalar_type() == at::kLong && probes.dim() == 2 && probes.size(1) == 2 &&
                  probes.is_contiguous(), "sparse_step: probes must be a contiguous (N, 2) int64 tensor");
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 1 && seeds.size(0) == batch &&
                  seeds.is_contiguous(), "sparse_step: seeds must be a contiguous (batch,) int64 tensor");
  TORCH_CHECK(coef.size() == kNumCoef, "sparse_step: coef must hold 16 numbers");
  const int64_t* pr = probes.data_ptr<int64_t>();
  for (int64_t i = 0; i < probes.size(0); ++i) {
    TORCH_CHECK(pr[2 * i] >= 0 && pr[2 * i] < batch && pr[2 * i + 1] >= 0 && pr[2 * i + 1] < half_numel,
                "sparse_step: probe ", i, " is outside the state");
  }
  const int64_t numel = batch * 2 * half_numel;
  LazyBuffer u(static_cast<size_t>(numel) * c10::elementSize(state_dtype));
  std::optional<LazyBuffer> e;
  if (eps_dtype.has_value()) e.emplace(static_cast<size_t>(numel) * c10::elementSize(*eps_dtype));
  with_type(state_dtype, [&](auto tag) { write_probes<decltype(tag)>(u.ptr, half_numel, probes, 0); });
  if (e) with_type(*eps_dtype, [&](auto tag) { write_probes<decltype(tag)>(e->ptr, half_numel, probes, 1); });

  // The parameters make_affine_step_params would give for such tensors.
  AffineStepParams p;
  p.u = u.ptr;
  p.eps = e ? e->ptr : nullptr;
  p.seeds = seeds.data_ptr<int64_t>();
  p.batch = batch;
  p.half_numel = half_numel;
  TORCH_CHECK(half_numel < (int64_t(1) << 32), "sparse_step: half_numel must be < 2^32");
  for (int i = 0; i < kNumCoef; ++i) p.coef[i] = static_cast<float>(coef[i]);
  p.read_state = coef[kP00] != 0.0 || coef[kP01] != 0.0 || coef[kP10] != 0.0 || coef[kP11] != 0.0;
  for (int i = kR1_00; i < kNumCoef; ++i) p.has_noise = p.has_noise || coef[i] != 0.0;
  for (int i = kR2_00; i < kNumCoef; ++i) p.has_second_draw = p.has_second_draw || coef[i] != 0.0;
  p.step = static_cast<uint32_t>(step);
  p.stream = static_cast<uint32_t>(stream);
  p.has_eps = e.has_value();
  p.eps_sample_stride = 2 * half_numel;
  p.eps_m_offset = half_numel;
  p.state_dtype = state_dtype;
  p.eps_dtype = eps_dtype.value_or(c10::ScalarType::Float);

  const std::vector<int64_t> only(threads.begin(), threads.end());
  EmulatedLauncher launcher;
  launcher.only = &only;
  dispatch_affine_step(p, launcher);
  at::Tensor out = at::empty({probes.size(0), 2}, probes.options().dtype(at::kFloat));
  with_type(state_dtype, [&](auto tag) {
    read_probes<decltype(tag)>(u.ptr, half_numel, probes, out.data_ptr<float>());
  });
  return {out, launcher.plan};
}

}  // namespace psld_cuda_emu

TORCH_LIBRARY(psld_cuda_emu, m) {
  m.def("affine_step_(Tensor(a!) u, Tensor? eps, Tensor seeds, float[] coef, int step, int stream) -> int[]");
  m.def("lifted_step_(Tensor(a!) u, Tensor? d, Tensor(b!)? y, Tensor seeds, float[] coef, int step, "
        "int stream) -> int[]");
  m.def("ms_step_(Tensor(a!) u, Tensor? eps, Tensor(b!) dbuf, Tensor seeds, float[] coef, float[] ms, "
        "bool record, int step, int stream) -> int[]");
  m.def("lifted_ms_step_(Tensor(a!) u, Tensor? d, Tensor(b!)? y, Tensor(c!) dbuf, Tensor seeds, float[] coef, "
        "float[] ms, bool record, int step, int stream) -> int[]");
  m.def("philox_test(Tensor seeds, int numel, int step, int stream) -> (Tensor, Tensor)");
  m.def("sparse_step(int batch, int half_numel, ScalarType state_dtype, ScalarType? eps_dtype, "
        "Tensor seeds, float[] coef, int step, int stream, int[] threads, Tensor probes) -> (Tensor, int[])");
}

TORCH_LIBRARY_IMPL(psld_cuda_emu, CPU, m) {
  m.impl("affine_step_", &psld_cuda_emu::affine_step_emulated_);
  m.impl("lifted_step_", &psld_cuda_emu::lifted_step_emulated_);
  m.impl("ms_step_", &psld_cuda_emu::ms_step_emulated_);
  m.impl("lifted_ms_step_", &psld_cuda_emu::lifted_ms_step_emulated_);
  m.impl("philox_test", &psld_cuda_emu::philox_test_emulated);
  m.impl("sparse_step", &psld_cuda_emu::sparse_step);
}
