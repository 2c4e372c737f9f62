// CPU entry points of the flow SDE step: validation, the instruction-set variant (the one the
// DDIM kernels use, so set_cpu_isa selects both), and the PPO stage (the DDIM op's, on log_prob).
#include <stdexcept>
#include <string>

#include "cpu/cpu_isa.h"
#include "cpu/flow_kernels.h"
#include "flow_core.h"

namespace ddpo {
namespace {

struct FlowIsa {
  void (*forward)(const FlowArgs&);
  void (*backward)(const FlowArgs&);
};

FlowIsa active_flow_isa() {
  const std::string name = cpu_isa();
#if defined(DDPO_X86_ISAS)
  if (name == "avx512") return {avx512::flow_forward, avx512::flow_backward};
  if (name == "avx2") return {avx2::flow_forward, avx2::flow_backward};
#endif
  if (name == "baseline") return {baseline::flow_forward, baseline::flow_backward};
  throw std::invalid_argument("no flow kernels for CPU instruction set '" + name + "'");
}

}  // namespace

void flow_forward_cpu(const FlowArgs& args) {
  validate_flow_args(args, /*backward=*/false);
  active_flow_isa().forward(args);
  if (args.old_log_prob != 0) ppo_forward_cpu(flow_ppo_args(args));
}

void flow_backward_cpu(const FlowArgs& args) {
  validate_flow_args(args, /*backward=*/true);
  active_flow_isa().backward(args);
}

}  // namespace ddpo
