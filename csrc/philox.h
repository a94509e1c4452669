// Philox4x32-10 and Box-Muller, written once for the CPU (g++) and CUDA (nvcc) kernels.
//
// This is the C++ twin of psld_fast/rng.py, which is the definition: the integer words must agree
// bit for bit with it (and with Triton's tl.philox), the normals to float32 rounding.  No curand:
// the stream is keyed per sample by its 64-bit seed and counted by (j, step, stream, 0), so a
// sample's noise never depends on the batch it is drawn in.
//
// The scalar functions here are used by the CUDA kernel; the CPU kernel uses the W-lane vector
// versions in affine_step_cpu_simd.h (same arithmetic, same constants from this file).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSLD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PSLD_HOST_DEVICE inline
#endif

namespace psld_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // Random123 PHILOX_M4x32_0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // Random123 PHILOX_M4x32_1
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump: golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump: sqrt(3) - 1
constexpr int kPhiloxRounds = 10;
constexpr float kUint32ToUniform = 4.6566127342e-10f;  // Triton's uint_to_uniform_float scale
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

struct Uint4 {
  uint32_t x, y, z, w;
};

struct Float4 {
  float x, y, z, w;
};

PSLD_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox4x32 block: counter (c0, c1, c2, c3), key (k0, k1), 10 rounds.
PSLD_HOST_DEVICE Uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Uint4{c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, fold negatives, scale.
PSLD_HOST_DEVICE float uint32_to_uniform(uint32_t r) {
  int32_t s = static_cast<int32_t>(r);
  s = s < 0 ? ~s : s;  // -s - 1 without overflow
  return static_cast<float>(s) * kUint32ToUniform;
}

// Triton's pair_uniform_to_normal; writes (r cos th, r sin th).
PSLD_HOST_DEVICE void box_muller(float u1, float u2, float& n0, float& n1) {
  u1 = u1 < kMinUniform ? kMinUniform : u1;
  const float th = kTwoPi * u2;
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(u1));
  float s, c;
  sincosf(th, &s, &c);  // precise version (no --use_fast_math): matches the reference to rounding
#else
  const float r = __builtin_sqrtf(-2.0f * __builtin_logf(u1));
  const float c = __builtin_cosf(th), s = __builtin_sinf(th);
#endif
  n0 = r * c;
  n1 = r * s;
}

// The four normals of element j of one sample at (step, stream): the layout of psld_fast.rng.
PSLD_HOST_DEVICE Float4 philox_normals4(uint64_t seed, uint32_t j, uint32_t step, uint32_t stream) {
  const Uint4 w = philox4x32_10(j, step, stream, 0u, static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  Float4 n;
  box_muller(uint32_to_uniform(w.x), uint32_to_uniform(w.y), n.x, n.y);
  box_muller(uint32_to_uniform(w.z), uint32_to_uniform(w.w), n.z, n.w);
  return n;
}

}  // namespace psld_fast
