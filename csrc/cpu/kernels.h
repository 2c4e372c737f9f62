// The CPU kernels, compiled once per instruction set (see CMakeLists.txt): each variant lives in
// its own namespace and ddim_cpu.cpp picks one at run time.
#pragma once
#include "ddim_core.h"

namespace ddpo {

#define DDPO_DECLARE_CPU_KERNELS(isa)          \
  namespace isa {                              \
  void forward(const DdimArgs& args);          \
  void backward(const DdimArgs& args);         \
  double forward_item(const DdimArgs& args, int64_t item);                   \
  void finish_forward(const DdimArgs& args, const double* partial);          \
  }

DDPO_DECLARE_CPU_KERNELS(baseline)
#if defined(DDPO_X86_ISAS)
DDPO_DECLARE_CPU_KERNELS(avx2)
DDPO_DECLARE_CPU_KERNELS(avx512)
#endif

}  // namespace ddpo
