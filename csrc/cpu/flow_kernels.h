// The CPU kernels of the flow SDE step, compiled once per instruction set like the DDIM ones
// (kernels.h); flow_cpu.cpp runs the variant that the DDIM kernels use (cpu_isa()).
#pragma once
#include "flow_core.h"

namespace ddpo {

#define DDPO_DECLARE_FLOW_KERNELS(isa)          \
  namespace isa {                               \
  void flow_forward(const FlowArgs& args);      \
  void flow_backward(const FlowArgs& args);     \
  }

DDPO_DECLARE_FLOW_KERNELS(baseline)
#if defined(DDPO_X86_ISAS)
DDPO_DECLARE_FLOW_KERNELS(avx2)
DDPO_DECLARE_FLOW_KERNELS(avx512)
#endif

}  // namespace ddpo
