// The SIMD body of the CPU affine-step kernel, written once over W-lane GCC vector types and
// included by affine_step_cpu.cpp once per instruction set (AVX-512: W = 16, AVX2: W = 8, baseline:
// W = 4), each time inside its own namespace and `#pragma GCC target` region.  No include guard on
// purpose; the includer provides <cstdint>, <cstring>, philox.h, affine_step.h and, on x86,
// <immintrin.h>, and defines before including:
//   PSLD_W            lanes per vector
//   PSLD_MULHILO_ISA  0 baseline (SSE2 intrinsics on x86-64, else a 64-bit widening multiply),
//                     2 AVX2 intrinsics, 5 AVX-512 intrinsics
//
// Every path runs the same IEEE float32 operations in the same order (no FMA: the build passes
// -ffp-contract=off, sqrt is correctly rounded everywhere), so the three paths give bit-identical
// results, equal to psld_fast.rng's normals within float32 rounding (the log/sincos polynomials are
// Cephes', accurate to a few ulps).  The Philox words are integers: bit-exact on every path.

constexpr int W = PSLD_W;
typedef float VF __attribute__((vector_size(4 * W)));
typedef int32_t VI __attribute__((vector_size(4 * W)));
typedef uint32_t VU __attribute__((vector_size(4 * W)));
typedef uint64_t VU64 __attribute__((vector_size(8 * W)));

#define PSLD_VINLINE inline __attribute__((always_inline))

PSLD_VINLINE VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

PSLD_VINLINE void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }

PSLD_VINLINE VF vsplat(float f) { return VF{} + f; }

PSLD_VINLINE VU usplat(uint32_t u) { return VU{} + u; }

PSLD_VINLINE VU iota_u() {
  VU v;
  for (int i = 0; i < W; ++i) v[i] = static_cast<uint32_t>(i);
  return v;
}

// hi and lo 32-bit halves of the 64-bit products a * M (per lane, M a constant).
PSLD_VINLINE void mulhilo(VU a, uint32_t M, VU& hi, VU& lo) {
#if PSLD_MULHILO_ISA == 5
  const __m512i av = reinterpret_cast<__m512i>(a), mv = _mm512_set1_epi32(static_cast<int>(M));
  const __m512i even = _mm512_mul_epu32(av, mv);                        // lanes 0, 2, ..: 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), mv);  // lanes 1, 3, ..
  hi = reinterpret_cast<VU>(_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd));
  lo = a * M;
#elif PSLD_MULHILO_ISA == 2
  const __m256i av = reinterpret_cast<__m256i>(a), mv = _mm256_set1_epi32(static_cast<int>(M));
  const __m256i even = _mm256_mul_epu32(av, mv);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
  hi = reinterpret_cast<VU>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
  lo = a * M;
#elif defined(__SSE2__) && PSLD_W == 4
  // SSE2 has no 32-bit mullo: both halves come from the two even/odd 64-bit products.
  const __m128i av = reinterpret_cast<__m128i>(a), mv = _mm_set1_epi32(static_cast<int>(M));
  const __m128i even = _mm_mul_epu32(av, mv);                     // lo0 hi0 lo2 hi2
  const __m128i odd = _mm_mul_epu32(_mm_srli_epi64(av, 32), mv);  // lo1 hi1 lo3 hi3
  hi = reinterpret_cast<VU>(_mm_unpacklo_epi32(_mm_shuffle_epi32(even, _MM_SHUFFLE(3, 3, 3, 1)),
                                               _mm_shuffle_epi32(odd, _MM_SHUFFLE(3, 3, 3, 1))));
  lo = reinterpret_cast<VU>(_mm_unpacklo_epi32(_mm_shuffle_epi32(even, _MM_SHUFFLE(2, 2, 2, 0)),
                                               _mm_shuffle_epi32(odd, _MM_SHUFFLE(2, 2, 2, 0))));
#else
  const VU64 p = __builtin_convertvector(a, VU64) * static_cast<uint64_t>(M);
  hi = __builtin_convertvector(p >> 32, VU);
  lo = a * M;
#endif
}

PSLD_VINLINE VF vsqrt(VF x) {
#if PSLD_MULHILO_ISA == 5
  return reinterpret_cast<VF>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#elif PSLD_MULHILO_ISA == 2
  return reinterpret_cast<VF>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#elif defined(__SSE2__) && PSLD_W == 4
  return reinterpret_cast<VF>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
#else
  for (int i = 0; i < W; ++i) x[i] = __builtin_sqrtf(x[i]);
  return x;
#endif
}

// U independent vectors per call, so the latency of one Philox chain hides behind the others.
template <int U>
struct Lanes {
  VU c0[U], c1[U], c2[U], c3[U];
};

// The Philox key of a block: one per lane (flat layout) or one for all lanes (per-sample layout,
// where the round keys stay scalars and are broadcast once per round for all U vectors, which
// frees 2U vector registers).
template <int U>
struct LaneKeys {
  VU k0[U], k1[U];
};

struct SplatKey {
  uint32_t k0, k1;
};

// One Philox round on U vectors with round keys K0, K1 (per vector).
template <int U>
PSLD_VINLINE void philox_round(Lanes<U>& c, const VU* K0, const VU* K1, int stride) {
#pragma GCC unroll 8
  for (int v = 0; v < U; ++v) {
    VU hi0, lo0, hi1, lo1;
    mulhilo(c.c0[v], kPhiloxM0, hi0, lo0);
    mulhilo(c.c2[v], kPhiloxM1, hi1, lo1);
    c.c0[v] = hi1 ^ c.c1[v] ^ K0[v * stride];
    c.c1[v] = lo1;
    c.c2[v] = hi0 ^ c.c3[v] ^ K1[v * stride];
    c.c3[v] = lo0;
  }
}

// Philox4x32-10 on counters (c0, c1, c2, c3), in place.
template <int U>
PSLD_VINLINE void philox(Lanes<U>& c, const LaneKeys<U>& key) {
  LaneKeys<U> k = key;
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round<U>(c, k.k0, k.k1, 1);
#pragma GCC unroll 8
    for (int v = 0; v < U; ++v) {
      k.k0[v] += kPhiloxW0;
      k.k1[v] += kPhiloxW1;
    }
  }
}

template <int U>
PSLD_VINLINE void philox(Lanes<U>& c, SplatKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const VU K0 = usplat(k0), K1 = usplat(k1);
    philox_round<U>(c, &K0, &K1, 0);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Triton's uint_to_uniform_float: v < 0 ? -v - 1 : v, times 2^-31 (rounded).
PSLD_VINLINE VF to_uniform(VU r) {
  const VI v = reinterpret_cast<VI>(r);
  return __builtin_convertvector(v ^ (v >> 31), VF) * kUint32ToUniform;
}

// Natural log of normal positive x (Cephes logf; see log_poly in git history for the scalar form).
PSLD_VINLINE VF vlog(VF x) {
  const VI b = reinterpret_cast<VI>(x);
  VF e = __builtin_convertvector(((b >> 23) & 0xff) - 126, VF);
  VF m = reinterpret_cast<VF>((b & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
  const VI small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = m - 1.0f + (small ? m : VF{});  // m in [sqrt(1/2) - 1, sqrt(2) - 1)
  const VF z = m * m;
  VF y = vsplat(7.0376836292e-2f);
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
PSLD_VINLINE void vsincos(VF th, VF& s, VF& c) {
  VI j = __builtin_convertvector(th * 1.27323954473516f, VI);  // truncation; th >= 0
  j = (j + 1) & ~1;
  const VF fj = __builtin_convertvector(j, VF);
  const VF x = ((th - fj * 0.78515625f) - fj * 2.4187564849853515625e-4f) -
               fj * 3.77489497744594108e-8f;  // th - j pi/4, |x| <= pi/4
  const VF z = x * x;
  const VF yc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const VF ys = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const VI sin_poly = (j & 2) == 0;
  const VF s0 = sin_poly ? ys : yc;
  const VF c0 = sin_poly ? yc : ys;
  s = (j & 4) != 0 ? -s0 : s0;
  c = ((j - 2) & 4) != 0 ? c0 : -c0;
}

// Box-Muller of one pair of words: (r cos th, r sin th), Triton's pair_uniform_to_normal.
PSLD_VINLINE void box_muller_v(VU w1, VU w2, VF& n0, VF& n1) {
  VF u1 = to_uniform(w1);
  u1 = u1 < kMinUniform ? vsplat(kMinUniform) : u1;
  const VF th = kTwoPi * to_uniform(w2);
  const VF r = vsqrt(-2.0f * vlog(u1));
  VF s, c;
  vsincos(th, s, c);
  n0 = r * c;
  n1 = r * s;
}

// U * W lanes of the fused step.  In: counters j and keys; x, m (state), ex, em (eps) as float
// arrays of U * W lanes (read only as the flags say); dp: the multistep ops' D_prev lanes (read when
// has_dprev), overwritten with this call's D when has_drec.  Out: x, m (and y, dp).  The terms are
// added in the reference's order ((P) + (Q)) + (R) (+ G D_prev), so results match it to a rounding
// or two.
template <int U, typename Key>
PSLD_VINLINE void step_lanes(const AffineStepParams& p, const VU (&j)[U], const Key& key, float* x,
                             float* m, const float* ex, const float* em, float* y, float* dp) {
  const float* k = p.coef;
  VF xo[U], mo[U], dn[U];
#pragma GCC unroll 8
  for (int v = 0; v < U; ++v) {
    xo[v] = VF{};
    mo[v] = VF{};
    dn[v] = VF{};
    if (p.read_state || p.drec_reads_state) {
      const VF a = vload(x + v * W), b = vload(m + v * W);
      if (p.read_state) {
        xo[v] = k[kP00] * a + k[kP01] * b;
        mo[v] = k[kP10] * a + k[kP11] * b;
      }
      if (p.drec_reads_state) dn[v] = p.a0 * a + p.a1 * b;
    }
    if (p.has_eps) {
      const VF a = vload(ex + v * W), b = vload(em + v * W);
      xo[v] = xo[v] + (k[kQ00] * a + k[kQ01] * b);
      mo[v] = mo[v] + (k[kQ10] * a + k[kQ11] * b);
      if (p.has_drec) dn[v] = dn[v] + (p.c0 * a + p.c1 * b);
    }
  }
  if (p.has_noise) {
    Lanes<U> c;
#pragma GCC unroll 8
    for (int v = 0; v < U; ++v) {
      c.c0[v] = j[v];
      c.c1[v] = usplat(p.step);
      c.c2[v] = usplat(p.stream);
      c.c3[v] = VU{};
    }
    philox<U>(c, key);
#pragma GCC unroll 8
    for (int v = 0; v < U; ++v) {
      VF n0, n1;
      box_muller_v(c.c0[v], c.c1[v], n0, n1);
      if (p.has_second_draw) {
        VF n2, n3;
        box_muller_v(c.c2[v], c.c3[v], n2, n3);
        xo[v] = xo[v] + (k[kR1_00] * n0 + k[kR1_01] * n1 + k[kR2_00] * n2 + k[kR2_01] * n3);
        mo[v] = mo[v] + (k[kR1_10] * n0 + k[kR1_11] * n1 + k[kR2_10] * n2 + k[kR2_11] * n3);
      } else {  // R2 == 0 (every sampler but SSCS): the second pair would add exact zeros
        xo[v] = xo[v] + (k[kR1_00] * n0 + k[kR1_01] * n1);
        mo[v] = mo[v] + (k[kR1_10] * n0 + k[kR1_11] * n1);
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < U; ++v) {
    if (p.has_dprev) {  // multistep: the previous call's data estimate (read before dp is written)
      const VF d = vload(dp + v * W);
      xo[v] = xo[v] + p.g0 * d;
      mo[v] = mo[v] + p.g1 * d;
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < U; ++v) {
    vstore(x + v * W, xo[v]);
    vstore(m + v * W, mo[v]);
    if (p.has_y) vstore(y + v * W, p.wy0 * xo[v] + p.wy1 * mo[v]);  // lifted op: next call's input
    if (p.has_drec) vstore(dp + v * W, dn[v]);
  }
}

// Test entry: the words and the four normals of W consecutive counters of one key.
PSLD_VINLINE void philox_normals_lanes(uint32_t j0, uint32_t step, uint32_t stream, uint64_t seed,
                                       uint32_t (&w)[4][W], float (&n)[4][W]) {
  Lanes<1> c;
  c.c0[0] = usplat(j0) + iota_u();
  c.c1[0] = usplat(step);
  c.c2[0] = usplat(stream);
  c.c3[0] = VU{};
  philox<1>(c, SplatKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
  VF nv[4];
  box_muller_v(c.c0[0], c.c1[0], nv[0], nv[1]);
  box_muller_v(c.c2[0], c.c3[0], nv[2], nv[3]);
  const VU wv[4] = {c.c0[0], c.c1[0], c.c2[0], c.c3[0]};
  for (int q = 0; q < 4; ++q) {
    std::memcpy(w[q], &wv[q], sizeof wv[q]);
    std::memcpy(n[q], &nv[q], sizeof nv[q]);
  }
}


// ------------------------------------------------------------------------------------ drivers
// U vectors of W lanes per block; kChunk (from the includer) must be a multiple of L.
constexpr int U = PSLD_U;
constexpr int L = U * W;
static_assert(kChunk % L == 0, "kChunk must be a multiple of the block");

template <typename T>
PSLD_VINLINE float as_float(T v) { return static_cast<float>(v); }

// Per-sample layout: task t is (sample t / chunks, chunk t % chunks) of the half; a block is L
// consecutive elements of one sample, so the key is one splat and the data are contiguous loads.
template <typename state_t, typename eps_t>
void sample_tasks(const AffineStepParams& p, int64_t begin, int64_t end) {
  constexpr bool kDirect = std::is_same<state_t, float>::value && std::is_same<eps_t, float>::value;
  const int64_t D = p.half_numel;
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const bool load_state = p.read_state || p.drec_reads_state;
  const bool has_d = p.has_dprev || p.has_drec;
  alignas(64) float xa[L], ma[L], ea[L], eb[L], ya[L], da[L];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = t / chunks;
    const int64_t j_begin = (t % chunks) * kChunk;
    const int64_t j_end = std::min(D, j_begin + kChunk);
    state_t* x = static_cast<state_t*>(p.u) + s * 2 * D;
    state_t* m = x + D;
    const eps_t* ex = p.has_eps ? static_cast<const eps_t*>(p.eps) + s * p.eps_sample_stride : nullptr;
    const eps_t* em = p.has_eps ? ex + p.eps_m_offset : nullptr;
    state_t* y = p.has_y ? static_cast<state_t*>(p.y) + s * D : nullptr;
    float* dq = has_d ? p.dbuf + s * D : nullptr;
    const uint64_t seed = static_cast<uint64_t>(p.seeds[s]);
    const SplatKey key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    VU jv[U];
    for (int64_t j = j_begin; j < j_end; j += L) {
      const int count = static_cast<int>(std::min<int64_t>(L, j_end - j));
      for (int v = 0; v < U; ++v) jv[v] = usplat(static_cast<uint32_t>(j + v * W)) + iota_u();
      if (kDirect && count == L) {
        step_lanes<U>(p, jv, key, reinterpret_cast<float*>(x + j), reinterpret_cast<float*>(m + j),
                      ex ? reinterpret_cast<const float*>(ex + j) : nullptr,
                      em ? reinterpret_cast<const float*>(em + j) : nullptr,
                      y ? reinterpret_cast<float*>(y + j) : nullptr, dq ? dq + j : nullptr);
        continue;
      }
      for (int i = 0; i < L; ++i) {
        const bool in = i < count;
        xa[i] = in && load_state ? as_float(x[j + i]) : 0.0f;
        ma[i] = in && load_state ? as_float(m[j + i]) : 0.0f;
        ea[i] = in && p.has_eps ? as_float(ex[j + i]) : 0.0f;
        eb[i] = in && p.has_eps ? as_float(em[j + i]) : 0.0f;
        da[i] = in && p.has_dprev ? dq[j + i] : 0.0f;
      }
      step_lanes<U>(p, jv, key, xa, ma, ea, eb, ya, da);
      for (int i = 0; i < count; ++i) {
        x[j + i] = static_cast<state_t>(xa[i]);  // round to nearest even
        m[j + i] = static_cast<state_t>(ma[i]);
      }
      if (y) {
        for (int i = 0; i < count; ++i) y[j + i] = static_cast<state_t>(ya[i]);
      }
      if (p.has_drec) {
        for (int i = 0; i < count; ++i) dq[j + i] = da[i];
      }
    }
  }
}

// Flat layout, for halves smaller than a block: task t is kChunk consecutive (sample, element)
// pairs of the whole batch in row-major order; every lane has its own key and counter, so a
// 1-element half fills the vectors with L samples instead of 1 element and L - 1 idle lanes.
template <typename state_t, typename eps_t>
void flat_tasks(const AffineStepParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.half_numel;
  const int64_t total = p.batch * D;
  state_t* u = static_cast<state_t*>(p.u);
  const eps_t* e = static_cast<const eps_t*>(p.eps);
  state_t* yp = static_cast<state_t*>(p.y);
  const int64_t es = p.eps_sample_stride, em_off = p.eps_m_offset;
  const bool load_state = p.read_state || p.drec_reads_state;
  alignas(64) float xa[L], ma[L], ea[L], eb[L], ya[L], da[L];
  alignas(64) uint32_t ja[L], k0a[L], k1a[L];
  int64_t off[L];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t f_begin = t * kChunk;
    const int64_t f_end = std::min(total, f_begin + kChunk);
    int64_t s = f_begin / D, j = f_begin % D, o = s * 2 * D + j, oe = s * es + j;
    uint64_t seed = static_cast<uint64_t>(p.seeds[s]);
    for (int64_t f = f_begin; f < f_end; f += L) {
      const int count = static_cast<int>(std::min<int64_t>(L, f_end - f));
      for (int i = 0; i < count; ++i) {  // gather: lane i is (sample s, element j)
        off[i] = o;
        ja[i] = static_cast<uint32_t>(j);
        k0a[i] = static_cast<uint32_t>(seed);
        k1a[i] = static_cast<uint32_t>(seed >> 32);
        if (load_state) {
          xa[i] = as_float(u[o]);
          ma[i] = as_float(u[o + D]);
        }
        if (p.has_eps) {
          ea[i] = as_float(e[oe]);
          eb[i] = as_float(e[oe + em_off]);
        }
        ++o;
        ++oe;
        if (++j == D) {  // next sample: skip its m half
          j = 0;
          o += D;
          oe += es - D;
          if (++s < p.batch) seed = static_cast<uint64_t>(p.seeds[s]);
        }
      }
      for (int i = count; i < L; ++i) {
        ja[i] = k0a[i] = k1a[i] = 0u;
        xa[i] = ma[i] = ea[i] = eb[i] = 0.0f;
      }
      if (p.has_dprev) {  // dbuf is (B, D): flat index f of this block is sample-major like the lanes
        for (int i = 0; i < L; ++i) da[i] = i < count ? p.dbuf[f + i] : 0.0f;
      }
      VU jv[U];
      LaneKeys<U> key;
      std::memcpy(jv, ja, sizeof jv);
      std::memcpy(key.k0, k0a, sizeof key.k0);
      std::memcpy(key.k1, k1a, sizeof key.k1);
      step_lanes<U>(p, jv, key, xa, ma, ea, eb, ya, da);
      for (int i = 0; i < count; ++i) {
        u[off[i]] = static_cast<state_t>(xa[i]);
        u[off[i] + D] = static_cast<state_t>(ma[i]);
      }
      if (yp) {  // y is (B, D): flat index f of this block is sample-major like the lanes
        for (int i = 0; i < count; ++i) yp[f + i] = static_cast<state_t>(ya[i]);
      }
      if (p.has_drec) {
        for (int i = 0; i < count; ++i) p.dbuf[f + i] = da[i];
      }
    }
  }
}

template <typename state_t, typename eps_t>
void tasks_for(const AffineStepParams& p, bool flat, int64_t begin, int64_t end) {
  if (flat) {
    flat_tasks<state_t, eps_t>(p, begin, end);
  } else {
    sample_tasks<state_t, eps_t>(p, begin, end);
  }
}

template <typename state_t>
void tasks_eps(const AffineStepParams& p, bool flat, int64_t begin, int64_t end) {
  switch (p.eps_dtype) {
    case c10::ScalarType::Half: return tasks_for<state_t, c10::Half>(p, flat, begin, end);
    case c10::ScalarType::BFloat16: return tasks_for<state_t, c10::BFloat16>(p, flat, begin, end);
    default: return tasks_for<state_t, float>(p, flat, begin, end);
  }
}

// Tasks [begin, end) of the per-sample (flat = false) or flat task grid.
void affine_step_range(const AffineStepParams& p, bool flat, int64_t begin, int64_t end) {
  switch (p.state_dtype) {
    case c10::ScalarType::Half: return tasks_eps<c10::Half>(p, flat, begin, end);
    case c10::ScalarType::BFloat16: return tasks_eps<c10::BFloat16>(p, flat, begin, end);
    default: return tasks_eps<float>(p, flat, begin, end);
  }
}

// Test-only: words and normals of elements [0, numel) of sample s, each (numel, 4) row-major.
void philox_test_range(const int64_t* seeds, int64_t numel, uint32_t step, uint32_t stream,
                       int64_t* words, float* normals, int64_t s) {
  uint32_t w[4][W];
  float n[4][W];
  for (int64_t j = 0; j < numel; j += W) {
    philox_normals_lanes(static_cast<uint32_t>(j), step, stream, static_cast<uint64_t>(seeds[s]), w, n);
    const int64_t count = std::min<int64_t>(W, numel - j);
    for (int64_t i = 0; i < count; ++i) {
      for (int q = 0; q < 4; ++q) {
        words[((s * numel) + j + i) * 4 + q] = w[q][i];
        normals[((s * numel) + j + i) * 4 + q] = n[q][i];
      }
    }
  }
}

#undef PSLD_VINLINE
