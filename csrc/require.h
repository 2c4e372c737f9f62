// The raw interface's argument checks (validate.cpp, flow_validate.cpp): an invalid_argument with the
// message, never a crash.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ddim_core.h"

namespace ddpo {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

inline void require_pointer(uintptr_t p, const char* name) { require(p != 0, std::string(name) + " must not be null"); }

inline void require_dtype(int32_t dtype, const char* name) {
  require(dtype >= kFloat32 && dtype <= kFloat64, std::string(name) + " has an unknown dtype code " + std::to_string(dtype));
}

}  // namespace ddpo
