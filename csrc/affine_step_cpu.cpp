// CPU kernel of psld_fast::affine_step_ (and the test-only psld_fast::philox_test).
//
// Why it looks like this: per element the op needs one Philox4x32-10 call (20 32x32->64-bit
// multiplies) and two Box-Muller pairs (log, sqrt, sin, cos), against ~24 bytes of memory traffic,
// so on CPU the random numbers, not memory, set the speed.  We therefore process kLanes = 64
// counters at a time in plain arrays, with loops the compiler vectorises (the Philox rounds as
// widening uint32 multiplies; log and sincos as Cephes-style polynomials, accurate to a few
// float32 ulps, instead of libm calls that would not vectorise; selects need -fno-trapping-math
// to be if-converted).  The hot function is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA)
// and baseline x86-64 (GCC target_clones, picked at load time from the CPU; measured 2.1 / 3.7 /
// 9.7 ms per 393k Philox+Box-Muller elements on one core here), so the wheel stays portable.
// -ffp-contract=off (no FMA contraction) is meant to keep the three versions bit-identical.
// at::parallel_for splits the work over (sample, chunk of kChunk elements).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "affine_step.h"
#include "philox.h"

namespace psld_fast {
namespace {

constexpr int kLanes = 64;        // counters per vectorised block
constexpr int64_t kChunk = 2048;  // elements per half per parallel task (multiple of kLanes)
// Fewer elements than this per thread cost more in wake-ups than they save (a B=1 step of a
// 16x16 image is ~25 us of work; splitting it over a busy 2-core machine cost 8-12 ms).
constexpr int64_t kMinElementsPerThread = 16384;

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(PSLD_FAST_NO_CLONES)
#define PSLD_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PSLD_CPU_CLONES
#endif
#define PSLD_INLINE inline __attribute__((always_inline))

PSLD_INLINE uint32_t float_as_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

PSLD_INLINE float bits_as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// Philox4x32-10 on kLanes consecutive counters (j0 + i, step, stream, 0); same math as philox.h.
PSLD_INLINE void philox_lanes(uint32_t j0, uint32_t step, uint32_t stream, uint32_t k0,
                              uint32_t k1, uint32_t (&w)[4][kLanes]) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    c0[i] = j0 + static_cast<uint32_t>(i);
    c1[i] = step;
    c2[i] = stream;
    c3[i] = 0u;
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int i = 0; i < kLanes; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(p1);
      c3[i] = static_cast<uint32_t>(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int i = 0; i < kLanes; ++i) {
    w[0][i] = c0[i];
    w[1][i] = c1[i];
    w[2][i] = c2[i];
    w[3][i] = c3[i];
  }
}

// Natural log for normal positive x (Cephes logf polynomial, ~1 ulp), vectorisable.
PSLD_INLINE float log_poly(float x) {
  const uint32_t b = float_as_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((b >> 23) & 0xffu) - 126);
  float m = bits_as_float((b & 0x007fffffu) | 0x3f000000u);  // x = m 2^e, m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = m - 1.0f + (small ? m : 0.0f);  // m in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// sin and cos of th in [0, 2 pi] (Cephes sinf/cosf: octant reduction + polynomials).
PSLD_INLINE void sincos_poly(float th, float& s, float& c) {
  int32_t j = static_cast<int32_t>(th * 1.27323954473516f);  // octant, th >= 0
  j = (j + 1) & ~1;
  const float fj = static_cast<float>(j);
  const float x = ((th - fj * 0.78515625f) - fj * 2.4187564849853515625e-4f) -
                  fj * 3.77489497744594108e-8f;  // th - j pi/4, |x| <= pi/4
  const float z = x * x;
  const float yc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                    4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const float ys = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const bool sin_poly = (j & 2) == 0;
  const float s0 = sin_poly ? ys : yc;
  const float c0 = sin_poly ? yc : ys;
  s = (j & 4) ? -s0 : s0;
  c = ((j - 2) & 4) ? c0 : -c0;
}

PSLD_INLINE float uniform_lane(uint32_t r) {
  const int32_t v = static_cast<int32_t>(r);
  return static_cast<float>(v ^ (v >> 31)) * kUint32ToUniform;  // v < 0 ? -v - 1 : v
}

// The normals of kLanes consecutive elements (all four, or only the first pair when pairs == 1);
// the raw words too.
PSLD_INLINE void normals_lanes(uint32_t j0, uint32_t step, uint32_t stream, uint64_t seed,
                               float (&n)[4][kLanes], uint32_t (&w)[4][kLanes], int pairs = 2) {
  philox_lanes(j0, step, stream, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), w);
  for (int pair = 0; pair < pairs; ++pair) {
    for (int i = 0; i < kLanes; ++i) {
      const float u1 = std::max(uniform_lane(w[2 * pair][i]), kMinUniform);
      const float th = kTwoPi * uniform_lane(w[2 * pair + 1][i]);
      const float r = std::sqrt(-2.0f * log_poly(u1));
      float s, c;
      sincos_poly(th, s, c);
      n[2 * pair][i] = r * c;
      n[2 * pair + 1][i] = r * s;
    }
  }
}

template <typename T>
PSLD_INLINE void load_lanes(const T* src, int count, float (&dst)[kLanes]) {
  if (count == kLanes) {
    for (int i = 0; i < kLanes; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int i = 0; i < kLanes; ++i) dst[i] = i < count ? static_cast<float>(src[i]) : 0.0f;
  }
}

template <typename T>
PSLD_INLINE void store_lanes(T* dst, int count, const float (&src)[kLanes]) {
  if (count == kLanes) {
    for (int i = 0; i < kLanes; ++i) dst[i] = static_cast<T>(src[i]);  // round to nearest even
  } else {
    for (int i = 0; i < count; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// One block of `count` <= kLanes elements starting at j0 of one sample.  The terms are added in
// the reference's order ((P) + (Q)) + (R), so results match it to a rounding or two.
template <typename state_t, typename eps_t>
PSLD_INLINE void step_block(const AffineStepParams& p, state_t* x, state_t* m, const eps_t* ex,
                            const eps_t* em, uint32_t j0, int count, uint64_t seed) {
  const float* k = p.coef;
  float xo[kLanes] = {}, mo[kLanes] = {}, a[kLanes], b[kLanes];
  if (p.read_state) {
    load_lanes(x, count, a);
    load_lanes(m, count, b);
    for (int i = 0; i < kLanes; ++i) {
      xo[i] = k[kP00] * a[i] + k[kP01] * b[i];
      mo[i] = k[kP10] * a[i] + k[kP11] * b[i];
    }
  }
  if (p.has_eps) {
    load_lanes(ex, count, a);
    load_lanes(em, count, b);
    for (int i = 0; i < kLanes; ++i) {
      xo[i] = xo[i] + (k[kQ00] * a[i] + k[kQ01] * b[i]);
      mo[i] = mo[i] + (k[kQ10] * a[i] + k[kQ11] * b[i]);
    }
  }
  if (p.has_noise) {
    float n[4][kLanes];
    uint32_t w[4][kLanes];
    if (p.has_second_draw) {
      normals_lanes(j0, p.step, p.stream, seed, n, w, 2);
      for (int i = 0; i < kLanes; ++i) {
        xo[i] = xo[i] + (k[kR1_00] * n[0][i] + k[kR1_01] * n[1][i] + k[kR2_00] * n[2][i] +
                         k[kR2_01] * n[3][i]);
        mo[i] = mo[i] + (k[kR1_10] * n[0][i] + k[kR1_11] * n[1][i] + k[kR2_10] * n[2][i] +
                         k[kR2_11] * n[3][i]);
      }
    } else {  // R2 == 0 (every sampler but SSCS): skip the second Box-Muller pair; the R2 terms
              // would add exact zeros, so the result is the same
      normals_lanes(j0, p.step, p.stream, seed, n, w, 1);
      for (int i = 0; i < kLanes; ++i) {
        xo[i] = xo[i] + (k[kR1_00] * n[0][i] + k[kR1_01] * n[1][i]);
        mo[i] = mo[i] + (k[kR1_10] * n[0][i] + k[kR1_11] * n[1][i]);
      }
    }
  }
  store_lanes(x, count, xo);
  store_lanes(m, count, mo);
}

// Tasks [begin, end) of the (sample, chunk) grid.
template <typename state_t, typename eps_t>
PSLD_INLINE void step_tasks(const AffineStepParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.half_numel;
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = t / chunks;
    const int64_t j_begin = (t % chunks) * kChunk;
    const int64_t j_end = std::min(D, j_begin + kChunk);
    state_t* x = static_cast<state_t*>(p.u) + s * 2 * D;
    const eps_t* ex = p.has_eps ? static_cast<const eps_t*>(p.eps) + s * 2 * D : nullptr;
    const uint64_t seed = static_cast<uint64_t>(p.seeds[s]);
    for (int64_t j = j_begin; j < j_end; j += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, j_end - j));
      step_block<state_t, eps_t>(p, x + j, x + D + j, ex ? ex + j : nullptr,
                                 ex ? ex + D + j : nullptr, static_cast<uint32_t>(j), count, seed);
    }
  }
}

template <typename state_t>
PSLD_INLINE void step_tasks_eps(const AffineStepParams& p, int64_t begin, int64_t end) {
  switch (p.eps_dtype) {
    case c10::ScalarType::Half: return step_tasks<state_t, c10::Half>(p, begin, end);
    case c10::ScalarType::BFloat16: return step_tasks<state_t, c10::BFloat16>(p, begin, end);
    default: return step_tasks<state_t, float>(p, begin, end);
  }
}

// The ISA-cloned entry: one call per parallel range, so the ifunc dispatch cost is negligible.
PSLD_CPU_CLONES void affine_step_range(const AffineStepParams& p, int64_t begin, int64_t end) {
  switch (p.state_dtype) {
    case c10::ScalarType::Half: return step_tasks_eps<c10::Half>(p, begin, end);
    case c10::ScalarType::BFloat16: return step_tasks_eps<c10::BFloat16>(p, begin, end);
    default: return step_tasks_eps<float>(p, begin, end);
  }
}

PSLD_CPU_CLONES void philox_test_range(const int64_t* seeds, int64_t numel, uint32_t step,
                                       uint32_t stream, int64_t* words, float* normals,
                                       int64_t s) {
  float n[4][kLanes];
  uint32_t w[4][kLanes];
  for (int64_t j = 0; j < numel; j += kLanes) {
    normals_lanes(static_cast<uint32_t>(j), step, stream, static_cast<uint64_t>(seeds[s]), n, w);
    const int64_t count = std::min<int64_t>(kLanes, numel - j);
    for (int64_t i = 0; i < count; ++i) {
      for (int q = 0; q < 4; ++q) {
        words[((s * numel) + j + i) * 4 + q] = w[q][i];
        normals[((s * numel) + j + i) * 4 + q] = n[q][i];
      }
    }
  }
}

void affine_step_cpu_(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                      const at::Tensor& seeds, c10::ArrayRef<double> coef, int64_t step,
                      int64_t stream) {
  at::Tensor eps_holder;
  const AffineStepParams p = make_affine_step_params(u, eps, seeds, coef, step, stream,
                                                     c10::DeviceType::CPU, eps_holder);
  if (p.batch == 0 || p.half_numel == 0) return;
  const int64_t tasks = p.batch * ((p.half_numel + kChunk - 1) / kChunk);
  const int64_t grain = (kMinElementsPerThread + kChunk - 1) / kChunk;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    affine_step_range(p, begin, end);
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
  for (int64_t b = 0; b < B; ++b) {
    philox_test_range(s.data_ptr<int64_t>(), numel, static_cast<uint32_t>(step),
                      static_cast<uint32_t>(stream), words.data_ptr<int64_t>(),
                      normals.data_ptr<float>(), b);
  }
  return {words, normals};
}

}  // namespace
}  // namespace psld_fast

TORCH_LIBRARY_IMPL(psld_fast, CPU, m) {
  m.impl("affine_step_", &psld_fast::affine_step_cpu_);
  m.impl("philox_test", &psld_fast::philox_test_cpu);
}
