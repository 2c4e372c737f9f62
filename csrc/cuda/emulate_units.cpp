// Runs the per-thread code of the CUDA kernels (ddim_cuda_units.cuh: vector and scalar paths,
// dtype packing, Philox units, CFG rows, the KL penalty, the backward) on the CPU, and checks it against a plain
// element-by-element loop over ddim_math.h written independently here. Not part of the module
// (CMake compiles csrc/cuda/*.cu only): tests/test_cuda_emulation.py compiles and runs it, so the
// kernels' indexing and packing logic is tested on machines without a GPU. The few CUDA intrinsics used are emulated with ddim_math.h's
// conversions (round to nearest even, like the hardware ones); the grid is emulated by a loop over
// (sample, chunk) blocks and their threads, summing each block's partials in thread order.
//
//   g++ -std=c++17 -O2 -Wall -Wextra -Wno-unknown-pragmas -Icsrc -o /tmp/emulate_units
//       csrc/cuda/emulate_units.cpp && /tmp/emulate_units
//
// Prints one line per failed configuration and a summary; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ddim_core.h"
#include "ddim_math.h"

// ---- The CUDA vocabulary used by ddim_cuda_units.cuh, on the host ---------------------------------
#define __device__
#define __host__
#define __forceinline__ inline

struct uint4 {
  uint32_t x, y, z, w;
};
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
inline float __uint_as_float(uint32_t u) { return ddpo::bits_as_float(u); }
inline uint32_t __float_as_uint(float f) { return ddpo::float_as_bits(f); }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return ddpo::fp16_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{ddpo::float_to_fp16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{ddpo::float_to_bf16_bits(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t u = (uint64_t(uint32_t(hi)) << 32) | uint32_t(lo);
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}
inline int __double2loint(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return int(uint32_t(u));
}
inline int __double2hiint(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return int(uint32_t(u >> 32));
}

#include "ddim_cuda_units.cuh"

namespace {

using namespace ddpo;
using namespace ddpo::cuda_detail;

// ---- Buffers with a chosen dtype and alignment ------------------------------------------------------

struct Buffer {
  std::vector<unsigned char> storage;
  unsigned char* data = nullptr;
  int32_t dtype = kFloat32;
  int64_t count = 0;

  // misalign: start one element past a 16-byte boundary.
  Buffer(int32_t dt, int64_t n, bool misalign) : dtype(dt), count(n) {
    const int size = dtype_size(dt);
    storage.assign(size_t(n) * size + 64, 0);
    uintptr_t base = reinterpret_cast<uintptr_t>(storage.data());
    base = (base + 15) & ~uintptr_t(15);
    if (misalign) base += size;
    data = reinterpret_cast<unsigned char*>(base);
  }
  double get(int64_t i) const {
    switch (dtype) {
      case kFloat32: { float f; std::memcpy(&f, data + 4 * i, 4); return f; }
      case kFloat16: { uint16_t h; std::memcpy(&h, data + 2 * i, 2); return fp16_bits_to_float(h); }
      case kBFloat16: { uint16_t h; std::memcpy(&h, data + 2 * i, 2); return bf16_bits_to_float(h); }
      default: { double d; std::memcpy(&d, data + 8 * i, 8); return d; }
    }
  }
  // Stores v rounded to the dtype (a double through float for the 16-bit types); returns the stored value.
  double set(int64_t i, double v) {
    switch (dtype) {
      case kFloat32: { float f = float(v); std::memcpy(data + 4 * i, &f, 4); return f; }
      case kFloat16: {
        uint16_t h = float_to_fp16_bits(float(v));
        std::memcpy(data + 2 * i, &h, 2);
        return fp16_bits_to_float(h);
      }
      case kBFloat16: {
        uint16_t h = float_to_bf16_bits(float(v));
        std::memcpy(data + 2 * i, &h, 2);
        return bf16_bits_to_float(h);
      }
      default: { std::memcpy(data + 8 * i, &v, 8); return v; }
    }
  }
  bool same_bytes(const Buffer& o) const {
    return std::memcmp(data, o.data, size_t(count) * dtype_size(dtype)) == 0;
  }
};

struct Config {
  bool dbl = false;  // compute in double
  int64_t batch = 1, numel = 1;
  int32_t prediction = kEpsilon;
  bool cfg = false, clip = false, use_clipped = false;
  int mode = 0;  // 0: Philox, 1: noise tensor, 2: log-prob of a given prev_sample
  bool grad_prev = false;
  bool kl = false;  // the KL penalty to a reference output (mode 2 only)
  int32_t mo_dt = kFloat32, x_dt = kFloat32, prev_dt = kFloat32, noise_dt = kFloat32, gp_dt = kFloat32,
          ref_dt = kFloat32;
  double eta = 1.0, w = 7.5, range = 1.0;
  uint64_t seed = 0, offset = 0;

  std::string str() const {
    char s[320];
    std::snprintf(s, sizeof s,
                  "%s B=%lld N=%lld pred=%d cfg=%d clip=%d uc=%d mode=%d gp=%d kl=%d dt(mo,x,prev,noise,gp,ref)="
                  "%d%d%d%d%d%d eta=%g seed=%llu off=%llu",
                  dbl ? "double" : "float", (long long)batch, (long long)numel, prediction, cfg, clip, use_clipped,
                  mode, grad_prev, kl, mo_dt, x_dt, prev_dt, noise_dt, gp_dt, ref_dt, eta, (unsigned long long)seed,
                  (unsigned long long)offset);
    return s;
  }
};

struct Inputs {
  Buffer mo, x, prev, noise, gp, ref;
  std::vector<double> alpha_t, alpha_prev, glp, gkl;  // values, stored in the compute type below
  Inputs(const Config& c, bool misalign, std::mt19937_64& rng)
      : mo(c.mo_dt, (c.cfg ? 2 : 1) * c.batch * c.numel, misalign),
        x(c.x_dt, c.batch * c.numel, misalign),
        prev(c.prev_dt, c.batch * c.numel, misalign),
        noise(c.noise_dt, c.batch * c.numel, misalign),
        gp(c.gp_dt, c.batch * c.numel, misalign),
        ref(c.ref_dt, c.kl ? (c.cfg ? 2 : 1) * c.batch * c.numel : 0, misalign) {
    std::normal_distribution<double> n01;
    for (int64_t i = 0; i < mo.count; ++i) mo.set(i, n01(rng));
    if (c.kl) {  // a nearby reference
      for (int64_t i = 0; i < ref.count; ++i) ref.set(i, mo.get(i) + 0.3 * n01(rng));
    }
    for (int64_t i = 0; i < x.count; ++i) x.set(i, n01(rng));
    for (int64_t i = 0; i < prev.count; ++i) prev.set(i, n01(rng));
    for (int64_t i = 0; i < noise.count; ++i) noise.set(i, n01(rng));
    for (int64_t i = 0; i < gp.count; ++i) gp.set(i, 0.1 * n01(rng));
    std::uniform_real_distribution<double> u01;
    for (int64_t b = 0; b < c.batch; ++b) {
      const double a = 0.004 + 0.99 * u01(rng);
      const double r = u01(rng);
      alpha_t.push_back(a);
      alpha_prev.push_back(r < 0.25 ? 1.0 : a + (1.0 - a) * u01(rng) * 0.5);
      glp.push_back(n01(rng));
      gkl.push_back(0.5 + u01(rng));
    }
  }
};

template <typename T>
std::vector<T> as_compute(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// ---- The emulated kernels -------------------------------------------------------------------------

template <typename T>
StepParams make_params(const Config& c, Inputs& in, Buffer& out_prev, Buffer& grad, const std::vector<T>& at,
                       const std::vector<T>& ap, const std::vector<T>& glp, const std::vector<T>& gkl, bool vec,
                       bool backward) {
  StepParams p{};
  p.batch = c.batch;
  p.numel = c.numel;
  p.chunks = uint32_t(chunks_per_sample(c.numel));
  p.prediction = c.prediction;
  p.eta = c.eta;
  p.guidance_scale = c.w;
  p.clip_range = c.range;
  p.cfg = c.cfg;
  p.use_clipped = c.use_clipped;
  p.sample_noise = !backward && c.mode != 2;
  p.vec = vec;
  p.model_output = in.mo.data;
  p.model_output_dtype = c.mo_dt;
  p.sample = in.x.data;
  p.sample_dtype = c.x_dt;
  p.prev_sample = (backward || c.mode == 2) ? in.prev.data : out_prev.data;
  p.prev_sample_dtype = c.prev_dt;
  p.noise = (!backward && c.mode == 1) ? in.noise.data : nullptr;
  p.noise_dtype = c.noise_dt;
  p.alpha_t = at.data();
  p.alpha_prev = ap.data();
  p.seed = c.seed;
  p.offset = c.offset;
  p.grad_prev_sample = (backward && c.grad_prev) ? in.gp.data : nullptr;
  p.grad_prev_sample_dtype = c.gp_dt;
  p.grad_log_prob = backward ? glp.data() : nullptr;
  p.grad_model_output = grad.data;
  p.reference_output = c.kl ? in.ref.data : nullptr;
  p.reference_output_dtype = c.ref_dt;
  p.grad_kl = (backward && c.kl) ? gkl.data() : nullptr;
  return p;
}

// log_prob per sample, and with kKL the KL to the reference step into `kl`.
template <typename T, bool kClip, bool kKL>
std::vector<double> emulate_forward(const StepParams& p, std::vector<double>& kl) {
  std::vector<T> workspace(size_t(p.batch) * p.chunks), kl_workspace(size_t(p.batch) * p.chunks);
  for (uint32_t block = 0; block < uint32_t(p.batch) * p.chunks; ++block) {
    const uint32_t b = block / p.chunks, chunk = block - b * p.chunks;
    T sum = T(0), kl_sum = T(0);
    for (int t = 0; t < kThreads; ++t) {
      const int64_t i0 = int64_t(chunk) * kChunk + int64_t(t) * kVec;
      T unit_kl = T(0);
      if (i0 < p.numel)
        sum += p.vec ? forward_unit<T, kClip, true, kKL>(p, b, i0, &unit_kl)
                     : forward_unit<T, kClip, false, kKL>(p, b, i0, &unit_kl);
      kl_sum += unit_kl;
    }
    workspace[block] = sum;
    kl_workspace[block] = kl_sum;
  }
  std::vector<double> log_prob;
  for (int64_t b = 0; b < p.batch; ++b) {
    T sumsq = T(0), kl_sumsq = T(0);
    for (uint32_t c = 0; c < p.chunks; ++c) sumsq += workspace[b * p.chunks + c];
    for (uint32_t c = 0; c < p.chunks; ++c) kl_sumsq += kl_workspace[b * p.chunks + c];
    const StepCoef<T> k = make_step_coef<T>(static_cast<const T*>(p.alpha_t)[b], static_cast<const T*>(p.alpha_prev)[b],
                                            T(p.eta), p.prediction);
    log_prob.push_back(double(log_prob_from_sumsq<T>(k, sumsq, p.numel)));
    kl.push_back(double(kl_from_sumsq<T>(k.inv_var, kl_sumsq, p.numel)));
  }
  return log_prob;
}

template <typename T, bool kClip, bool kKL>
void emulate_backward(const StepParams& p) {
  for (uint32_t block = 0; block < uint32_t(p.batch) * p.chunks; ++block) {
    const uint32_t b = block / p.chunks, chunk = block - b * p.chunks;
    for (int t = 0; t < kThreads; ++t) {
      const int64_t i0 = int64_t(chunk) * kChunk + int64_t(t) * kVec;
      if (i0 >= p.numel) continue;
      if (p.vec) {
        backward_unit<T, kClip, true, kKL>(p, b, i0);
      } else {
        backward_unit<T, kClip, false, kKL>(p, b, i0);
      }
    }
  }
}

// ---- The oracle: one element at a time --------------------------------------------------------------

bool close(double a, double b, double rtol) { return std::fabs(a - b) <= rtol * std::fmax(1.0, std::fabs(b)); }

int gap_errors = 0;  // elements where ddim_mean_gap is not the difference of the two ddim_means

// The guided value of element i of sample b of a model output (the policy's or the reference's).
template <typename T>
T guided(const Config& c, const Buffer& out, int64_t b, int64_t i) {
  T m = T(out.get(b * c.numel + i));
  if (c.cfg) {
    const T mc = T(out.get((c.batch + b) * c.numel + i));
    m = m + T(c.w) * (mc - m);
  }
  return m;
}

template <typename T, bool kClip>
std::vector<double> oracle_forward(const Config& c, const Inputs& in, Buffer& out_prev, const std::vector<T>& at,
                                   const std::vector<T>& ap, std::vector<double>& kl) {
  std::vector<double> log_prob;
  const int64_t n = c.numel;
  for (int64_t b = 0; b < c.batch; ++b) {
    const StepCoef<T> k = make_step_coef<T>(at[b], ap[b], T(c.eta), c.prediction);
    double sumsq = 0, kl_sumsq = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = b * n + i;
      const T m = guided<T>(c, in.mo, b, i);
      T mu, dmu;
      ddim_mean<kClip, T>(k, T(in.x.get(e)), m, T(c.range), c.use_clipped, mu, dmu);
      if (c.kl) {  // the difference of the two means, checked apart against ddim_mean below
        const T gap = ddim_mean_gap<kClip, T>(k, T(in.x.get(e)), m, guided<T>(c, in.ref, b, i), T(c.range),
                                             c.use_clipped);
        kl_sumsq += double(gap * gap);
        T mu_ref, dmu_ref;
        ddim_mean<kClip, T>(k, T(in.x.get(e)), guided<T>(c, in.ref, b, i), T(c.range), c.use_clipped, mu_ref, dmu_ref);
        if (!close(double(gap), double(mu - mu_ref), c.dbl ? 1e-12 : 1e-5)) gap_errors++;
      }
      T stored;
      if (c.mode == 2) {
        stored = T(in.prev.get(e));
      } else {
        T z;
        if (c.mode == 1) {
          z = T(in.noise.get(e));
        } else {
          float zz[4];
          philox_normal4(uint64_t(e) / 4, c.offset, c.seed, zz);
          z = T(zz[e % 4]);
        }
        const T xnew = mu + k.sigma * z;
        stored = T(out_prev.set(e, double(xnew)));
      }
      const T d = stored - mu;
      sumsq += double(d * d);
    }
    log_prob.push_back(double(log_prob_from_sumsq<T>(k, T(sumsq), n)));
    // Written out here, not kl_from_sumsq: the oracle checks that helper too.
    kl.push_back(c.kl ? 0.5 * double(k.inv_var) * kl_sumsq / double(n) : 0.0);
  }
  return log_prob;
}

template <typename T, bool kClip>
void oracle_backward(const Config& c, const Inputs& in, Buffer& grad, const std::vector<T>& at,
                     const std::vector<T>& ap, const std::vector<T>& glp, const std::vector<T>& gkl) {
  const int64_t n = c.numel;
  for (int64_t b = 0; b < c.batch; ++b) {
    const StepCoef<T> k = make_step_coef<T>(at[b], ap[b], T(c.eta), c.prediction);
    const T cb = glp[b] * k.inv_var / T(n);
    const T ck = c.kl ? gkl[b] * k.inv_var / T(n) : T(0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = b * n + i;
      const T m = guided<T>(c, in.mo, b, i);
      T mu, dmu;
      ddim_mean<kClip, T>(k, T(in.x.get(e)), m, T(c.range), c.use_clipped, mu, dmu);
      T gp = c.grad_prev ? T(in.gp.get(e)) : T(0);
      if (c.kl) gp += ck * ddim_mean_gap<kClip, T>(k, T(in.x.get(e)), m, guided<T>(c, in.ref, b, i), T(c.range),
                                                   c.use_clipped);
      const T g = dmu * (gp + cb * (T(in.prev.get(e)) - mu));
      if (c.cfg) {
        grad.set(e, double((T(1) - T(c.w)) * g));
        grad.set((c.batch + b) * n + i, double(T(c.w) * g));
      } else {
        grad.set(e, double(g));
      }
    }
  }
}

// ---- One configuration: oracle vs the scalar path vs the vector path (where it applies) ------------


template <typename T, bool kClip>
int run_config(const Config& c, std::mt19937_64& rng) {
  int failures = 0;
  const bool fits = c.dbl || (c.mo_dt != kFloat64 && c.x_dt != kFloat64 && c.prev_dt != kFloat64 &&
                              (c.mode != 1 || c.noise_dt != kFloat64) && (!c.grad_prev || c.gp_dt != kFloat64) &&
                              (!c.kl || c.ref_dt != kFloat64));
  const bool vec_possible = c.numel % kVec == 0 && fits;
  const uint64_t input_seed = rng();
  // The oracle, on aligned buffers.
  std::mt19937_64 r0(input_seed);
  Inputs in0(c, false, r0);
  const std::vector<T> at = as_compute<T>(in0.alpha_t), ap = as_compute<T>(in0.alpha_prev);
  const std::vector<T> glp = as_compute<T>(in0.glp), gkl = as_compute<T>(in0.gkl);
  Buffer want_prev(c.prev_dt, c.batch * c.numel, false);
  std::vector<double> want_kl;
  const std::vector<double> want_lp = oracle_forward<T, kClip>(c, in0, want_prev, at, ap, want_kl);
  Buffer want_grad(c.mo_dt, in0.mo.count, false);
  oracle_backward<T, kClip>(c, in0, want_grad, at, ap, glp, gkl);
  if (gap_errors) {
    std::printf("FAIL mean gap %s: %d elements\n", c.str().c_str(), gap_errors);
    failures += 1;
    gap_errors = 0;
  }

  for (int variant = 0; variant < 3; ++variant) {  // 0: vector path, 1: scalar path aligned, 2: scalar misaligned
    const bool vec = variant == 0;
    if (vec && !vec_possible) continue;
    std::mt19937_64 r1(input_seed);
    Inputs in(c, variant == 2, r1);
    Buffer prev(c.prev_dt, c.batch * c.numel, variant == 2);
    Buffer grad(c.mo_dt, in.mo.count, variant == 2);
    const char* path = variant == 0 ? "vector" : variant == 1 ? "scalar" : "scalar-misaligned";

    StepParams p = make_params<T>(c, in, prev, grad, at, ap, glp, gkl, vec, /*backward=*/false);
    std::vector<double> kl;
    const std::vector<double> lp = c.kl ? emulate_forward<T, kClip, true>(p, kl) : emulate_forward<T, kClip, false>(p, kl);
    if (c.mode != 2 && !prev.same_bytes(want_prev)) {
      int64_t first = 0;
      while (first < prev.count && prev.get(first) == want_prev.get(first)) ++first;
      std::printf("FAIL prev_sample [%s] %s: first difference at %lld: %.9g vs %.9g\n", path, c.str().c_str(),
                  (long long)first, prev.get(first), want_prev.get(first));
      ++failures;
    }
    for (int64_t b = 0; b < c.batch; ++b) {
      if (!close(lp[b], want_lp[b], c.dbl ? 1e-12 : 2e-6)) {
        std::printf("FAIL log_prob [%s] %s: sample %lld: %.9g vs %.9g\n", path, c.str().c_str(), (long long)b, lp[b],
                    want_lp[b]);
        ++failures;
      }
      if (c.kl && !close(kl[b], want_kl[b], c.dbl ? 1e-12 : 2e-6)) {
        std::printf("FAIL kl [%s] %s: sample %lld: %.9g vs %.9g\n", path, c.str().c_str(), (long long)b, kl[b],
                    want_kl[b]);
        ++failures;
      }
    }
    p = make_params<T>(c, in, prev, grad, at, ap, glp, gkl, vec, /*backward=*/true);
    if (c.kl) {
      emulate_backward<T, kClip, true>(p);
    } else {
      emulate_backward<T, kClip, false>(p);
    }
    if (!grad.same_bytes(want_grad)) {
      int64_t first = 0;
      while (first < grad.count && grad.get(first) == want_grad.get(first)) ++first;
      std::printf("FAIL grad [%s] %s: first difference at %lld: %.9g vs %.9g\n", path, c.str().c_str(),
                  (long long)first, grad.get(first), want_grad.get(first));
      ++failures;
    }
  }
  return failures;
}

int run(const Config& c, std::mt19937_64& rng) {
  if (c.dbl) return c.clip ? run_config<double, true>(c, rng) : run_config<double, false>(c, rng);
  return c.clip ? run_config<float, true>(c, rng) : run_config<float, false>(c, rng);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261122);
  const int64_t sizes[] = {1, 3, 8, 35, 1173, 1564, 4096, 4104, 13120, 16384, 16900};
  const int32_t narrow[] = {kFloat32, kBFloat16, kFloat16};
  const int32_t any[] = {kFloat32, kBFloat16, kFloat16, kFloat64};
  const double etas[] = {1.0, 1.0, 0.5, 0.0}, scales[] = {7.5, 1.0, -2.0}, ranges[] = {1.0, 1.5, 0.3};
  int configs = 0, failures = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    Config c;
    c.dbl = iter % 5 == 4;
    c.numel = sizes[iter % 11];
    c.batch = 1 + int64_t(rng() % 3);
    c.prediction = int32_t(rng() % 3);
    c.cfg = rng() % 2;
    c.clip = rng() % 2;
    c.use_clipped = c.clip && rng() % 2;
    c.mode = int(rng() % 3);
    c.grad_prev = rng() % 2;
    c.kl = c.mode == 2 && rng() % 2;  // the KL penalty belongs to the loss: a given prev_sample
    c.eta = etas[rng() % 4];
    c.w = scales[rng() % 3];
    c.range = ranges[rng() % 3];
    c.seed = rng() >> (rng() % 64);
    c.offset = rng() >> (rng() % 64);
    if (c.dbl) {
      c.mo_dt = c.x_dt = c.prev_dt = c.noise_dt = c.gp_dt = kFloat64;
      if (rng() % 3 == 0) c.prev_dt = narrow[rng() % 3];  // out_dtype narrower than the compute type
      if (rng() % 3 == 0) c.noise_dt = any[rng() % 4];
      c.ref_dt = rng() % 3 == 0 ? narrow[rng() % 3] : kFloat64;
    } else {
      c.mo_dt = narrow[rng() % 3];
      c.x_dt = rng() % 2 ? c.mo_dt : narrow[rng() % 3];
      c.prev_dt = any[rng() % 4];  // float64 storage: the scalar path
      c.noise_dt = any[rng() % 4];
      c.gp_dt = c.prev_dt;
      c.ref_dt = rng() % 2 ? c.mo_dt : any[rng() % 4];
    }
    ++configs;
    const int f = run(c, rng);
    failures += f;
    if (failures > 40) break;
  }
  std::printf("%d configurations, %d failures\n", configs, failures);
  return failures == 0 ? 0 : 1;
}
