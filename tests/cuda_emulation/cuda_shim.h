// Just enough of CUDA for g++ to compile the kernel's device code (csrc/affine_step_cuda.cuh) as
// host code: the function qualifiers vanish, the built-in thread coordinates are globals that the
// emulated launch (harness.cpp) sets before calling a thread body, and the rounding intrinsics are
// their IEEE float32 definitions.  Build with -ffp-contract=off so that a * b + c is never fused
// behind the intrinsics' back (nvcc's __fadd_rn / __fmul_rn are never contracted either).
#pragma once

#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct float2 {
  float x, y;
};

// The thread coordinates of the emulated launch (one thread runs at a time).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }  // one rounding
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
