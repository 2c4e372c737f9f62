// Runs the per-thread code of the flow SDE CUDA kernels (flow_cuda_units.cuh) on the CPU: the grid
// is a loop over (sample, chunk) blocks and their threads, each block's partials summed in thread
// order. Checked against a plain element loop over flow_math.h / ddim_math.h written here: Philox
// lanes across chunk and sample boundaries, CFG rows, storage dtypes and the rounded read-back, the
// optional mean, the log-prob, the KL penalty, the backward with its optional upstream gradients.
// Not part of the module; tests/test_flow_cuda_emulation.py compiles and runs it.
//
//   g++ -std=c++17 -O2 -Wall -Wextra -Icsrc -o /tmp/flow_emulate csrc/cuda/flow_emulate.cpp && /tmp/flow_emulate
//
// Prints one line per failed configuration and a summary; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/flow_cuda_units.cuh"

using namespace ddpo;

namespace {

struct Buffer {  // raw storage of `n` values of `dtype`
  int32_t dtype;
  std::vector<uint8_t> bytes;
  Buffer(int32_t d, int64_t n) : dtype(d), bytes(size_t(n) * (d == kFloat64 ? 8 : d == kFloat32 ? 4 : 2)) {}
  uintptr_t ptr() { return reinterpret_cast<uintptr_t>(bytes.data()); }
  double get(int64_t i) { return flow_cuda::load_as<double>(ptr(), dtype, i); }
  void set(int64_t i, double v) { flow_cuda::store_as<double>(ptr(), dtype, i, v); }
};

template <typename T>
T stored(int32_t dtype, T v) {  // v as `dtype` would store it, independently of store_as
  switch (dtype) {
    case kFloat32: return T(float(v));
    case kFloat64: return v;
    case kFloat16: return T(fp16_bits_to_float(float_to_fp16_bits(float(v))));
    default: return T(bf16_bits_to_float(float_to_bf16_bits(float(v))));
  }
}

bool close(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1.0 + std::fabs(b)); }

// kl: the KL penalty to a reference output of dtype ref_dtype (a given prev_sample only).
template <typename T>
int run(int64_t batch, int64_t numel, int32_t in_dtype, int32_t out_dtype, bool cfg, int32_t sde_type,
        int noise_kind /* 0 philox, 1 tensor, 2 prev given */, bool with_mean, std::mt19937& rng, bool kl = false,
        int32_t ref_dtype = kFloat32) {
  std::normal_distribution<double> normal;
  const int32_t compute = sizeof(T) == 8 ? kFloat64 : kFloat32;
  const int64_t rows = cfg ? 2 * batch : batch, total = batch * numel;
  Buffer mo(in_dtype, rows * numel), x(in_dtype, total), noise(in_dtype, total), prev(out_dtype, total);
  Buffer mean(compute, total), gprev(kFloat32, total), gmean(compute, total), gmo(in_dtype, rows * numel);
  Buffer ref(ref_dtype, kl ? rows * numel : 0);
  std::vector<T> sigma(batch), sigma_prev(batch), log_prob(batch), std_dev(batch), glogp(batch), kls(batch), gkl(batch);
  for (int64_t i = 0; i < rows * numel; ++i) mo.set(i, normal(rng));
  if (kl) {  // a nearby reference
    for (int64_t i = 0; i < rows * numel; ++i) ref.set(i, mo.get(i) + 0.3 * normal(rng));
  }
  for (int64_t i = 0; i < total; ++i) {
    x.set(i, normal(rng));
    noise.set(i, normal(rng));
    gprev.set(i, normal(rng));
    gmean.set(i, normal(rng));
    if (noise_kind == 2) prev.set(i, normal(rng));
  }
  const double kinds[4][2] = {{1.0, 0.9375}, {0.6, 0.45}, {0.12, 0.05}, {0.05, 0.0}};
  for (int64_t b = 0; b < batch; ++b) {
    sigma[b] = T(kinds[b % 4][0]);
    sigma_prev[b] = T(kinds[b % 4][1]);
    glogp[b] = T(normal(rng));
    gkl[b] = T(0.5 + std::fabs(normal(rng)));
  }
  FlowArgs a;
  a.batch = batch;
  a.numel = numel;
  a.compute = compute;
  a.sde_type = sde_type;
  a.noise_level = 0.7;
  a.sigma_max = 0.9375;
  a.cfg = cfg;
  a.guidance_scale = 4.5;
  a.model_output = mo.ptr();
  a.model_output_dtype = in_dtype;
  a.sample = x.ptr();
  a.sample_dtype = in_dtype;
  a.sigma = reinterpret_cast<uintptr_t>(sigma.data());
  a.sigma_prev = reinterpret_cast<uintptr_t>(sigma_prev.data());
  a.prev_sample = prev.ptr();
  a.prev_sample_dtype = out_dtype;
  a.sample_noise = noise_kind != 2;
  a.noise = noise_kind == 1 ? noise.ptr() : 0;
  a.noise_dtype = in_dtype;
  a.seed = 0x1234567890ABCDEFull;
  a.offset = 7;
  a.log_prob = reinterpret_cast<uintptr_t>(log_prob.data());
  a.std_dev_t = reinterpret_cast<uintptr_t>(std_dev.data());
  a.prev_sample_mean = with_mean ? mean.ptr() : 0;
  if (kl) {
    a.reference_output = ref.ptr();
    a.reference_output_dtype = ref_dtype;
    a.kl = reinterpret_cast<uintptr_t>(kls.data());
  }
  const int64_t chunks = chunks_per_sample(numel);
  std::vector<T> workspace(size_t((kl ? 2 : 1) * batch * chunks));
  a.workspace = reinterpret_cast<uintptr_t>(workspace.data());
  const double cps_sin = std::sin(a.noise_level * 1.57079632679489661923);

  // The emulated grid (the KL sums in the workspace's second half).
  for (int64_t block = 0; block < batch * chunks; ++block) {
    const int64_t b = block / chunks, c = block % chunks;
    T sum = T(0), kl_sum = T(0);
    for (int t = 0; t < flow_cuda::kThreads; ++t) {
      T thread_kl = T(0);
      sum += flow_cuda::forward_thread<T>(a, flow_cuda::coef_of<T>(a, b, cps_sin), b, c, t, &thread_kl);
      kl_sum += thread_kl;
    }
    workspace[size_t(block)] = sum;
    if (kl) workspace[size_t(batch * chunks + block)] = kl_sum;
  }
  for (int64_t b = 0; b < batch; ++b) flow_cuda::finalize_sample<T>(a, cps_sin, chunks, b);

  // The element loop.
  int failures = 0;
  const double tol = sizeof(T) == 8 ? 1e-12 : 2e-5;
  for (int64_t b = 0; b < batch; ++b) {
    const FlowCoef<T> k = make_flow_coef<T>(sigma[b], sigma_prev[b], T(0.9375), T(0.7), T(cps_sin), sde_type);
    double sumsq = 0.0, kl_sumsq = 0.0;
    for (int64_t i = 0; i < numel; ++i) {
      const int64_t g = b * numel + i;
      T v = T(mo.get(b * numel + i));
      if (cfg) v = v + T(4.5) * (T(mo.get((batch + b) * numel + i)) - v);
      const T m = k.cx * T(x.get(g)) + k.cm * v;
      if (kl) {
        T v_ref = T(ref.get(b * numel + i));
        if (cfg) v_ref = v_ref + T(4.5) * (T(ref.get((batch + b) * numel + i)) - v_ref);
        const T gap = m - (k.cx * T(x.get(g)) + k.cm * v_ref);
        kl_sumsq += double(gap * gap);
      }
      T xp;
      if (noise_kind == 2) {
        xp = T(prev.get(g));
      } else {
        float z4[4];
        philox_normal4(uint64_t(g) / 4, 7, 0x1234567890ABCDEFull, z4);
        const T z = noise_kind == 0 ? T(z4[g % 4]) : T(noise.get(g));
        xp = stored<T>(out_dtype, m + k.noise_scale * z);
        if (prev.get(g) != double(xp)) ++failures;
      }
      if (with_mean && !close(mean.get(g), double(m), tol)) ++failures;
      sumsq += double((xp - m) * (xp - m));
    }
    const double lp = double(k.lp_scale) * sumsq / double(numel) + double(k.lp_shift);
    if (!close(double(log_prob[b]), lp, sizeof(T) == 8 ? 1e-10 : 1e-4)) ++failures;
    if (std_dev[b] != k.std_dev_t) ++failures;
    // KL = mean (mean - mean_ref)^2 / (2 noise_scale^2), written out here (not kl_from_sumsq)
    const double scale = double(k.noise_scale);
    if (kl && !close(double(kls[b]), kl_sumsq / (2.0 * scale * scale * double(numel)), sizeof(T) == 8 ? 1e-10 : 1e-4))
      ++failures;
  }

  // Backward, both upstream gradients set; compared element by element.
  a.grad_prev_sample = gprev.ptr();
  a.grad_prev_sample_dtype = kFloat32;
  a.grad_prev_sample_mean = gmean.ptr();
  a.grad_prev_sample_mean_dtype = compute;
  a.grad_log_prob = reinterpret_cast<uintptr_t>(glogp.data());
  if (kl) a.grad_kl = reinterpret_cast<uintptr_t>(gkl.data());
  a.grad_model_output = gmo.ptr();
  for (int64_t g = 0; g < total; ++g) flow_cuda::backward_element<T>(a, cps_sin, g);
  for (int64_t b = 0; b < batch; ++b) {
    const FlowCoef<T> k = make_flow_coef<T>(sigma[b], sigma_prev[b], T(0.9375), T(0.7), T(cps_sin), sde_type);
    for (int64_t i = 0; i < numel; ++i) {
      const int64_t g = b * numel + i;
      T v = T(mo.get(b * numel + i));
      if (cfg) v = v + T(4.5) * (T(mo.get((batch + b) * numel + i)) - v);
      const T m = k.cx * T(x.get(g)) + k.cm * v;
      T up = T(-2) * k.lp_scale * glogp[b] / T(numel) * (T(prev.get(g)) - m) + T(gprev.get(g)) + T(gmean.get(g));
      if (kl) {
        T v_ref = T(ref.get(b * numel + i));
        if (cfg) v_ref = v_ref + T(4.5) * (T(ref.get((batch + b) * numel + i)) - v_ref);
        const double scale = double(k.noise_scale);
        up += T(double(gkl[b]) / (scale * scale * double(numel))) * (m - (k.cx * T(x.get(g)) + k.cm * v_ref));
      }
      const T grad = k.cm * up;
      const double want_u = double(stored<T>(in_dtype, cfg ? grad - T(4.5) * grad : grad));
      const double rel = in_dtype == kFloat32 || in_dtype == kFloat64 ? tol : 1e-2;
      if (!close(gmo.get(g), want_u, rel)) ++failures;
      if (cfg && !close(gmo.get((batch + b) * numel + i), double(stored<T>(in_dtype, T(4.5) * grad)), rel)) ++failures;
    }
  }
  return failures;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int configurations = 0, failed = 0;
  const int64_t numels[] = {105, 4096 + 37, 2 * 4096};  // odd, two chunks with a tail, whole chunks
  const int32_t dtypes[] = {kFloat32, kBFloat16, kFloat16};
  for (int64_t numel : numels)
    for (int64_t batch : {int64_t(1), int64_t(3)})
      for (int32_t in_dtype : dtypes)
        for (int32_t out_dtype : {kFloat32, kBFloat16})
          for (bool cfg : {false, true})
            for (int32_t sde : {kSde, kCps})
              for (int noise_kind : {0, 1, 2}) {
                const bool with_mean = (noise_kind + int(cfg)) % 2 == 0;
                // The KL penalty (a given prev_sample), with a reference of another dtype.
                const bool kl = noise_kind == 2 && out_dtype == kFloat32;
                const int32_t ref_dtype = in_dtype == kFloat32 ? kBFloat16 : kFloat32;
                const int f = run<float>(batch, numel, in_dtype, out_dtype, cfg, sde, noise_kind, with_mean, rng, kl,
                                         ref_dtype);
                ++configurations;
                if (f) {
                  ++failed;
                  std::printf("FAIL numel=%lld batch=%lld in=%d out=%d cfg=%d sde=%d noise=%d mean=%d kl=%d: %d "
                              "elements\n", (long long)numel, (long long)batch, in_dtype, out_dtype, int(cfg), sde,
                              noise_kind, int(with_mean), int(kl), f);
                }
              }
  for (int32_t sde : {kSde, kCps}) {  // float64 compute, sampling and the KL penalty
    for (int noise_kind : {0, 2}) {
      const int f = run<double>(3, 4096 + 37, kFloat64, kFloat64, true, sde, noise_kind, true, rng, noise_kind == 2,
                                kFloat64);
      ++configurations;
      if (f) {
        ++failed;
        std::printf("FAIL float64 sde=%d noise=%d: %d elements\n", sde, noise_kind, f);
      }
    }
  }
  std::printf("%d configurations, %d failures\n", configurations, failed);
  return failed ? 1 : 0;
}
