// A small persistent thread pool for the CPU kernels. The core is torch-free, so it cannot use
// ATen's pool; OpenMP is avoided because a second OpenMP runtime beside torch's would spin on the
// same cores. Idle workers block on a condition variable and cost nothing.
#pragma once
#include <cstdint>
#include <functional>

namespace ddpo {

// Runs fn(i, i + 1) for every i in [0, n) on up to num_threads() threads (the caller takes part)
// and returns when all are done; with parallel == false, fn(0, n) on the caller alone. Concurrent
// calls are serialised.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, bool parallel = true);

void set_num_threads(int n);  // n >= 1
int num_threads();

}  // namespace ddpo
