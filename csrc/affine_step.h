// Parameters of the fused affine step, shared by the CPU and CUDA kernels.
//
// Per coordinate pair (x_j, m_j) of one sample (j < D = numel of one half):
//   x' = P00 x + P01 m + Q00 ex + Q01 em + R1_00 n0 + R1_01 n1 + R2_00 n2 + R2_01 n3
//   m' = P10 x + P11 m + Q10 ex + Q11 em + R1_10 n0 + R1_11 n1 + R2_10 n2 + R2_11 n3
// with (n0, n1, n2, n3) the normals of Philox counter (j, step, stream, 0) under the sample's seed.
// The definition is psld_fast.program.affine_step_reference; math here is float32.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

namespace psld_fast {

// Order of coef[]: the COEF_LAYOUT of psld_fast/program.py.
enum CoefIndex : int {
  kP00 = 0, kP01, kP10, kP11,
  kQ00, kQ01, kQ10, kQ11,
  kR1_00, kR1_01, kR1_10, kR1_11,
  kR2_00, kR2_01, kR2_10, kR2_11,
  kNumCoef
};

struct AffineStepParams {
  void* u = nullptr;              // (B, 2, D) contiguous state, dtype state_dtype
  const void* eps = nullptr;      // (B, 2, D) contiguous, dtype eps_dtype; nullptr: no eps term
  const int64_t* seeds = nullptr; // (B,) per-sample Philox keys
  int64_t batch = 0;              // B
  int64_t half_numel = 0;         // D < 2^32
  float coef[kNumCoef] = {};
  uint32_t step = 0;              // Philox counter word 1
  uint32_t stream = 0;            // Philox counter word 2
  bool read_state = false;        // false when P == 0: u may hold garbage and is not read
  bool has_eps = false;
  bool has_noise = false;         // false when R == 0: no Philox at all
  bool has_second_draw = false;   // false when R2 == 0: only the first Box-Muller pair is needed
  c10::ScalarType state_dtype = c10::ScalarType::Float;
  c10::ScalarType eps_dtype = c10::ScalarType::Float;
  // Where the eps operand of sample s lies: eps + s * eps_sample_stride (x half) and
  // eps + s * eps_sample_stride + eps_m_offset (m half).  The plain op: 2D and D.  The lifted op
  // (psld_fast::lifted_step_): eps is the denoiser output D of shape (B, D), read for both halves
  // (stride D, offset 0) with Q01 = Q11 = 0.
  int64_t eps_sample_stride = 0;
  int64_t eps_m_offset = 0;
  // Lifted op only: y (B, D), dtype state_dtype, gets wy0 x' + wy1 m' (float32 math, from the new
  // state before it is rounded to the state dtype): the next denoiser call's input.
  void* y = nullptr;
  bool has_y = false;
  float wy0 = 0.0f, wy1 = 0.0f;
  // Multistep ops only (psld_fast::ms_step_ / lifted_ms_step_, make_ms_params): dbuf (B, D)
  // float32 holds the previous call's data estimate D_prev.  has_dprev (g0 or g1 != 0):
  //   x' += g0 D_prev, m' += g1 D_prev  (after the noise term, before y and the rounding);
  // has_drec: dbuf is overwritten, in the same pass, with this call's
  //   D = (a0 x + a1 m) + (c0 ex + c1 em)  of the state and eps before the step
  // (the lifted op: a0 = a1 = c1 = 0, c0 = 1, i.e. D = the denoiser output).  Each element of dbuf
  // is read before it is written, by the same thread/lane.  drec_reads_state: a0 or a1 != 0, so the
  // state is loaded even when P == 0 (read_state false: the P terms are still skipped).
  float* dbuf = nullptr;
  bool has_dprev = false;
  bool has_drec = false;
  bool drec_reads_state = false;
  float g0 = 0.0f, g1 = 0.0f;
  float a0 = 0.0f, a1 = 0.0f, c0 = 0.0f, c1 = 0.0f;
};

// Order of the lifted op's 16 coefficients (psld_fast.lift.LIFTED_COEF_LAYOUT):
//   P00 P01 P10 P11, G0 G1, R1 (4), R2 (4), W0 W1
//   x' = P00 x + P01 m + G0 D + noise;  m' = P10 x + P11 m + G1 D + noise;  y = W0 x' + W1 m'
constexpr int kNumLiftedCoef = 16;

// Validates the lifted op's arguments (u (B, 2C, ...); d and y (B, C, ...) or absent; 16 coef)
// and fills the parameters of the equivalent plain step (Q from G, eps = d for both halves).
AffineStepParams make_lifted_step_params(const at::Tensor& u, const std::optional<at::Tensor>& d,
                                         const std::optional<at::Tensor>& y, const at::Tensor& seeds,
                                         c10::ArrayRef<double> coef, int64_t step, int64_t stream,
                                         c10::DeviceType device_type, at::Tensor& d_holder);

// The multistep ops' extra operands: checks dbuf (float32, contiguous, the shape of one half of u, on
// u's device) and ms (plain op: g0 g1 a0 a1 c0 c1; lifted op: g0 g1, and record copies d) and fills
// the dbuf fields of p (made by make_affine_step_params / make_lifted_step_params).
void add_ms_params(AffineStepParams& p, const at::Tensor& u, const at::Tensor& dbuf,
                   c10::ArrayRef<double> ms, bool record, bool lifted);

// Validates the op's arguments (TORCH_CHECK messages name the argument) for a kernel running on
// `device_type` and fills the parameters.  `eps_holder` keeps a contiguous copy of eps alive when
// the caller passed a non-contiguous one.
AffineStepParams make_affine_step_params(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                                         const at::Tensor& seeds, c10::ArrayRef<double> coef,
                                         int64_t step, int64_t stream, c10::DeviceType device_type,
                                         at::Tensor& eps_holder);

// The CPU kernel's instruction-set path: "avx512", "avx2" or "baseline" (chosen from the CPU at
// first use, or by PSLD_FAST_CPU_ISA).  set_cpu_isa switches paths (tests, benchmarks); it returns
// false, changing nothing, for an unknown name or a path this CPU cannot run.
const char* cpu_isa_name();
bool set_cpu_isa(const char* name);

// Checks the arguments of the test-only op philox_test (seeds (B,) int64 on device_type, numel).
void check_philox_test_args(const at::Tensor& seeds, int64_t numel, c10::DeviceType device_type);

}  // namespace psld_fast
