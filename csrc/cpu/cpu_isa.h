// Which compiled instruction-set variant of the CPU kernels runs (see kernels.h).
#pragma once
#include <string>
#include <vector>

namespace ddpo {

std::string cpu_isa();
void set_cpu_isa(const std::string& name);  // throws std::invalid_argument if unknown/unsupported
std::vector<std::string> supported_cpu_isas();

}  // namespace ddpo
