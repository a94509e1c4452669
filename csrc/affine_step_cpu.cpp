// CPU kernel of psld_fast::affine_step_ (and the test-only psld_fast::philox_test).
//
// Why it looks like this: per element the op needs one Philox4x32-10 call (20 32x32->64-bit
// multiplies) and one or two Box-Muller pairs (log, sqrt, sin, cos), against ~12 bytes of memory
// traffic per half element, so on CPU the random numbers, not memory, set the speed.  The body
// (affine_step_cpu_simd.h) is written once over W-lane GCC vector types: Philox's mulhi as two
// even/odd 32x32->64 multiplies and a blend (intrinsics on AVX2/AVX-512), log and sincos as
// Cephes-style polynomials (a few float32 ulps) instead of libm calls, and U independent vectors
// per block so the multiply latency of one Philox chain hides behind the others.  It is compiled
// three times: AVX-512 (W = 16), AVX2+FMA (W = 8) and baseline (W = 4: SSE2 on x86-64, GCC's
// generic vectors elsewhere), and the path is chosen at run time from the CPU (override:
// PSLD_FAST_CPU_ISA=avx512|avx2|baseline, or psld_fast._C.set_cpu_isa).  -ffp-contract=off (no
// FMA contraction) and the same operation order keep the three paths bit-identical.
//
// Two layouts of the work (both give bit-identical results): per sample (a block is L = U * W
// consecutive elements of one sample: one key, contiguous loads) and flat (a block is L
// consecutive (sample, element) pairs, each lane with its own key and counter), used when a half
// is small against L so that a 1-element half does not run L - 1 idle lanes.  at::parallel_for
// splits the tasks of either layout over threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "affine_step.h"
#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(PSLD_FAST_NO_CLONES)
#define PSLD_X86_PATHS 1
#include <immintrin.h>
#else
#define PSLD_X86_PATHS 0
#endif

namespace psld_fast {
namespace {

constexpr int64_t kChunk = 2048;  // elements per parallel task (a multiple of every block)
// Fewer elements than this per thread cost more in wake-ups than they save: ~0.4 ms of work on
// one AVX2 core.  On a busy 2-core machine a parallel region whose second thread is descheduled
// waits a scheduler time slice (4-16 ms measured), so a split must be worth that risk; with 16384
// the (16384, 2, 2) sweep cell lost to eager at 2 threads under load.
constexpr int64_t kMinElementsPerThread = 65536;
// Layout choice: flat when per-sample blocks of kFlatBlock lanes would compute more than 1.6x the
// lanes they use (a flat lane costs ~1.5x a contiguous one: gathered keys, counters and data).
// Fixed (not per ISA) so that every path splits the work alike.
constexpr int64_t kFlatBlock = 32;

}  // namespace

namespace cpu_baseline {
#define PSLD_W 4
#define PSLD_U 4
#define PSLD_MULHILO_ISA 0
#include "affine_step_cpu_simd.h"
#undef PSLD_W
#undef PSLD_U
#undef PSLD_MULHILO_ISA
}  // namespace cpu_baseline

#if PSLD_X86_PATHS
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,lzcnt,movbe,popcnt,f16c")
namespace cpu_avx2 {
#define PSLD_W 8
#define PSLD_U 2
#define PSLD_MULHILO_ISA 2
#include "affine_step_cpu_simd.h"
#undef PSLD_W
#undef PSLD_U
#undef PSLD_MULHILO_ISA
}  // namespace cpu_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (_mm512_undefined_*): not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512cd,avx2,fma,bmi,bmi2,lzcnt,movbe,popcnt,f16c")
namespace cpu_avx512 {
#define PSLD_W 16
#define PSLD_U 2
#define PSLD_MULHILO_ISA 5
#include "affine_step_cpu_simd.h"
#undef PSLD_W
#undef PSLD_U
#undef PSLD_MULHILO_ISA
}  // namespace cpu_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace {

enum CpuIsa : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

bool isa_supported(int isa) {
  if (isa == kIsaBaseline) return true;
#if PSLD_X86_PATHS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  if (isa == kIsaAvx2) return avx2;
  if (isa == kIsaAvx512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return false;
}

int isa_by_name(const char* name) {
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(name, kIsaNames[i]) == 0) return i;
  }
  return -1;
}

int detect_isa() {
  int best = kIsaBaseline;
  for (int i = kIsaAvx512; i > kIsaBaseline; --i) {
    if (isa_supported(i)) {
      best = i;
      break;
    }
  }
  const char* env = std::getenv("PSLD_FAST_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const int want = isa_by_name(env);
    if (want >= 0 && isa_supported(want)) return want;
    TORCH_WARN("PSLD_FAST_CPU_ISA=", env, " is not one of baseline|avx2|avx512 supported by this CPU; using ",
               kIsaNames[best]);
  }
  return best;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = detect_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

void affine_step_range(int isa, const AffineStepParams& p, bool flat, int64_t begin, int64_t end) {
#if PSLD_X86_PATHS
  if (isa == kIsaAvx512) return cpu_avx512::affine_step_range(p, flat, begin, end);
  if (isa == kIsaAvx2) return cpu_avx2::affine_step_range(p, flat, begin, end);
#endif
  (void)isa;
  cpu_baseline::affine_step_range(p, flat, begin, end);
}

void philox_test_range(int isa, const int64_t* seeds, int64_t numel, uint32_t step, uint32_t stream,
                       int64_t* words, float* normals, int64_t s) {
#if PSLD_X86_PATHS
  if (isa == kIsaAvx512) return cpu_avx512::philox_test_range(seeds, numel, step, stream, words, normals, s);
  if (isa == kIsaAvx2) return cpu_avx2::philox_test_range(seeds, numel, step, stream, words, normals, s);
#endif
  (void)isa;
  cpu_baseline::philox_test_range(seeds, numel, step, stream, words, normals, s);
}

bool use_flat_layout(int64_t D) {
  const int64_t waste = (D + kFlatBlock - 1) / kFlatBlock * kFlatBlock - D;
  return waste * 8 > D * 5;
}

void run_cpu(const AffineStepParams& p);

void affine_step_cpu_(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                      const at::Tensor& seeds, c10::ArrayRef<double> coef, int64_t step,
                      int64_t stream) {
  at::Tensor eps_holder;
  run_cpu(make_affine_step_params(u, eps, seeds, coef, step, stream, c10::DeviceType::CPU, eps_holder));
}

// The lifted op: the plain step with eps = the denoiser output d (B, C, ...) for both halves and
// the next call's input y = W0 x' + W1 m' written in the same pass (psld_fast/lift.py).
void lifted_step_cpu_(const at::Tensor& u, const std::optional<at::Tensor>& d,
                      const std::optional<at::Tensor>& y, const at::Tensor& seeds,
                      c10::ArrayRef<double> coef, int64_t step, int64_t stream) {
  at::Tensor d_holder;
  run_cpu(make_lifted_step_params(u, d, y, seeds, coef, step, stream, c10::DeviceType::CPU, d_holder));
}

// The multistep ops: the plain / lifted step plus the previous call's data estimate D_prev from
// dbuf (x' += g0 D_prev, m' += g1 D_prev) and, with record, this call's D written back into dbuf,
// all in the same pass (psld_fast.program.ms_step_reference).
void ms_step_cpu_(const at::Tensor& u, const std::optional<at::Tensor>& eps, const at::Tensor& dbuf,
                  const at::Tensor& seeds, c10::ArrayRef<double> coef, c10::ArrayRef<double> ms,
                  bool record, int64_t step, int64_t stream) {
  at::Tensor eps_holder;
  AffineStepParams p = make_affine_step_params(u, eps, seeds, coef, step, stream, c10::DeviceType::CPU, eps_holder);
  add_ms_params(p, u, dbuf, ms, record, /*lifted=*/false);
  run_cpu(p);
}

void lifted_ms_step_cpu_(const at::Tensor& u, const std::optional<at::Tensor>& d,
                         const std::optional<at::Tensor>& y, const at::Tensor& dbuf,
                         const at::Tensor& seeds, c10::ArrayRef<double> coef,
                         c10::ArrayRef<double> ms, bool record, int64_t step, int64_t stream) {
  at::Tensor d_holder;
  AffineStepParams p = make_lifted_step_params(u, d, y, seeds, coef, step, stream, c10::DeviceType::CPU, d_holder);
  add_ms_params(p, u, dbuf, ms, record, /*lifted=*/true);
  run_cpu(p);
}

void run_cpu(const AffineStepParams& p) {
  if (p.batch == 0 || p.half_numel == 0) return;
  const int isa = current_isa();
  const int64_t D = p.half_numel;
  const bool flat = use_flat_layout(D);
  // Tasks and how many elements (per half) each holds.
  const int64_t tasks = flat ? (p.batch * D + kChunk - 1) / kChunk : p.batch * ((D + kChunk - 1) / kChunk);
  const int64_t per_task = flat ? kChunk : std::min(D, kChunk);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / per_task);
  if (tasks <= grain) {  // one thread's worth: skip parallel_for's bookkeeping
    affine_step_range(isa, p, flat, 0, tasks);
    return;
  }
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    affine_step_range(isa, p, flat, begin, end);
  });
}

// Test-only: the Philox words (as int64) and normals of (B, numel) elements, each (B, numel, 4).
std::tuple<at::Tensor, at::Tensor> philox_test_cpu(const at::Tensor& seeds, int64_t numel,
                                                   int64_t step, int64_t stream) {
  check_philox_test_args(seeds, numel, c10::DeviceType::CPU);
  const at::Tensor s = seeds.contiguous();
  const int64_t B = s.size(0);
  at::Tensor words = at::empty({B, numel, 4}, s.options());
  at::Tensor normals = at::empty({B, numel, 4}, s.options().dtype(at::kFloat));
  const int isa = current_isa();
  for (int64_t b = 0; b < B; ++b) {
    philox_test_range(isa, s.data_ptr<int64_t>(), numel, static_cast<uint32_t>(step),
                      static_cast<uint32_t>(stream), words.data_ptr<int64_t>(),
                      normals.data_ptr<float>(), b);
  }
  return {words, normals};
}

}  // namespace

const char* cpu_isa_name() { return kIsaNames[current_isa()]; }

bool set_cpu_isa(const char* name) {
  const int isa = isa_by_name(name);
  if (isa < 0 || !isa_supported(isa)) return false;
  g_isa.store(isa, std::memory_order_relaxed);
  return true;
}

}  // namespace psld_fast

TORCH_LIBRARY_IMPL(psld_fast, CPU, m) {
  m.impl("affine_step_", &psld_fast::affine_step_cpu_);
  m.impl("lifted_step_", &psld_fast::lifted_step_cpu_);
  m.impl("ms_step_", &psld_fast::ms_step_cpu_);
  m.impl("lifted_ms_step_", &psld_fast::lifted_ms_step_cpu_);
  m.impl("philox_test", &psld_fast::philox_test_cpu);
}
