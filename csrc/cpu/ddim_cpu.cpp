// CPU entry points: validation, the choice of instruction-set variant, and the PPO stage.
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/kernels.h"
#include "ddim_math.h"

namespace ddpo {
namespace {

struct CpuIsa {
  const char* name;
  bool (*supported)();
  void (*forward)(const DdimArgs&);
  void (*backward)(const DdimArgs&);
};

bool always() { return true; }
#if defined(DDPO_X86_ISAS)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && has_avx2();
}
#endif

// Best first.
const std::vector<CpuIsa>& all_isas() {
  static const std::vector<CpuIsa> isas = {
#if defined(DDPO_X86_ISAS)
      {"avx512", has_avx512, avx512::forward, avx512::backward},
      {"avx2", has_avx2, avx2::forward, avx2::backward},
#endif
      {"baseline", always, baseline::forward, baseline::backward},
  };
  return isas;
}

const CpuIsa* find_isa(const std::string& name) {
  for (const auto& isa : all_isas()) {
    if (name == isa.name) {
      if (!isa.supported()) throw std::invalid_argument("CPU instruction set '" + name + "' is not supported by this CPU");
      return &isa;
    }
  }
  std::string known;
  for (const auto& isa : all_isas()) known += std::string(known.empty() ? "" : ", ") + isa.name;
  throw std::invalid_argument("unknown CPU instruction set '" + name + "' (built: " + known + ")");
}

// DDPO_FAST_CPU_ISA forces a variant (for tests); otherwise the best the CPU supports.
const CpuIsa* initial_isa() {
  if (const char* forced = std::getenv("DDPO_FAST_CPU_ISA")) {
    if (*forced) return find_isa(forced);
  }
  for (const auto& isa : all_isas()) {
    if (isa.supported()) return &isa;
  }
  return &all_isas().back();
}

const CpuIsa*& active_isa() {
  static const CpuIsa* isa = initial_isa();
  return isa;
}

template <typename T>
void ppo_stage(const DdimArgs& a) {
  const T* log_prob = reinterpret_cast<const T*>(a.log_prob);
  const T* old_log_prob = reinterpret_cast<const T*>(a.old_log_prob);
  const T* advantages = reinterpret_cast<const T*>(a.advantages);
  T* dloss_dlogp = reinterpret_cast<T*>(a.dloss_dlogp);
  double loss = 0.0, kl = 0.0, clipped = 0.0;
  for (int64_t b = 0; b < a.batch; ++b) {
    PpoTerm<T> term = ppo_term<T>(log_prob[b], old_log_prob[b], advantages[b], T(a.ppo_clip_range), T(a.adv_clip_max));
    loss += double(term.loss);
    kl += double(term.kl);
    clipped += double(term.clipped);
    dloss_dlogp[b] = term.dloss_dlogp / T(a.batch);
  }
  *reinterpret_cast<T*>(a.loss) = T(loss / double(a.batch));
  *reinterpret_cast<T*>(a.approx_kl) = T(kl / double(a.batch));
  *reinterpret_cast<T*>(a.clipfrac) = T(clipped / double(a.batch));
}

void run_ppo_stage(const DdimArgs& args) {
  if (args.compute == kFloat64) {
    ppo_stage<double>(args);
  } else {
    ppo_stage<float>(args);
  }
}

}  // namespace

void ddim_forward_cpu(const DdimArgs& args) {
  validate_args(args, /*backward=*/false);
  active_isa()->forward(args);
  if (args.old_log_prob != 0) run_ppo_stage(args);
}

void ddim_backward_cpu(const DdimArgs& args) {
  validate_args(args, /*backward=*/true);
  active_isa()->backward(args);
}

void ppo_forward_cpu(const DdimArgs& args) {
  validate_ppo_args(args);
  run_ppo_stage(args);
}

std::string cpu_isa() { return active_isa()->name; }

void set_cpu_isa(const std::string& name) { active_isa() = find_isa(name); }

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (const auto& isa : all_isas()) {
    if (isa.supported()) names.emplace_back(isa.name);
  }
  return names;
}

}  // namespace ddpo
