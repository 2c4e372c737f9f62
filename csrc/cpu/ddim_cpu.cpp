// CPU entry points: validation, the choice of instruction-set variant, and the PPO stage.
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/kernels.h"
#include "cpu/noise_stream.h"
#include "ddim_math.h"

namespace ddpo {
namespace {

struct CpuIsa {
  const char* name;
  bool (*supported)();
  void (*forward)(const DdimArgs&);
  void (*backward)(const DdimArgs&);
  double (*forward_item)(const DdimArgs&, int64_t);
  void (*finish_forward)(const DdimArgs&, const double*);
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
      {"avx512", has_avx512, avx512::forward, avx512::backward, avx512::forward_item, avx512::finish_forward},
      {"avx2", has_avx2, avx2::forward, avx2::backward, avx2::forward_item, avx2::finish_forward},
#endif
      {"baseline", always, baseline::forward, baseline::backward, baseline::forward_item, baseline::finish_forward},
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
  *reinterpret_cast<T*>(a.approx_kl) = T(kl / double(a.batch));
  *reinterpret_cast<T*>(a.clipfrac) = T(clipped / double(a.batch));
  if (a.kl == 0) {
    *reinterpret_cast<T*>(a.loss) = T(loss / double(a.batch));
    return;
  }
  // The KL penalty: loss + kl_beta * mean(kl), from the per-sample KL of the forward pass.
  const T* kl_to_reference = reinterpret_cast<const T*>(a.kl);
  double kl_sum = 0.0;
  for (int64_t b = 0; b < a.batch; ++b) kl_sum += double(kl_to_reference[b]);
  const double kl_mean = kl_sum / double(a.batch);
  *reinterpret_cast<T*>(a.kl_mean) = T(kl_mean);
  *reinterpret_cast<T*>(a.loss) = T(loss / double(a.batch) + a.kl_beta * kl_mean);
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

// ---- NoiseStream: a sampling step that runs while its noise tensor is being filled ---------------

namespace {

// One persistent helper thread that runs one job at a time. After fork() the parent's thread does
// not exist in the child: a stale helper is abandoned (never joined) and a new one is made.
class Helper {
 public:
  Helper() : thread_([this] { loop(); }) {}

  void start(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = std::move(job);
    busy_ = true;
    wake_.notify_one();
  }

  void wait_idle() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [this] { return !busy_; });
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return bool(job_); });
      auto job = std::move(job_);
      job_ = nullptr;
      lock.unlock();
      job();
      lock.lock();
      busy_ = false;
      idle_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::function<void()> job_;
  bool busy_ = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

std::mutex g_helper_mutex;  // one stream at a time uses the helper
Helper* g_helper = nullptr;
pid_t g_helper_pid = 0;

Helper& helper() {
  if (g_helper == nullptr || g_helper_pid != getpid()) {
    g_helper = new Helper();  // a previous one (of the parent process) is leaked on purpose
    g_helper_pid = getpid();
  }
  return *g_helper;
}

}  // namespace

NoiseStream::NoiseStream(const DdimArgs& args)
    : args_(args), forward_item_(nullptr), finish_forward_(nullptr), items_(0), ready_(0), total_(0), cancelled_(false), finished_(false) {
  validate_args(args_, /*backward=*/false);
  if (!args_.sample_noise || args_.noise == 0 || args_.old_log_prob != 0) {
    throw std::invalid_argument("NoiseStream needs a sampling step with a noise tensor and no PPO stage");
  }
  forward_item_ = active_isa()->forward_item;
  finish_forward_ = active_isa()->finish_forward;
  items_ = args_.batch * chunks_per_sample(args_.numel);
  total_ = args_.batch * args_.numel;
  partial_.assign(size_t(items_), 0.0);
  // Another stream (another Python thread) holds the helper: this one then runs in finish() alone.
  call_lock_ = std::unique_lock<std::mutex>(g_helper_mutex, std::try_to_lock);
  if (call_lock_.owns_lock()) helper().start([this] { drain(); });
}

NoiseStream::~NoiseStream() {
  if (!finished_) {
    cancel();
    try {
      finish();
    } catch (...) {
    }
  }
}

void NoiseStream::publish(int64_t ready_elements) {
  std::lock_guard<std::mutex> lock(mutex_);
  ready_ = std::max(ready_, std::min(ready_elements, total_));
  more_.notify_all();
}

void NoiseStream::cancel() {
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_ = true;
  ready_ = total_;
  more_.notify_all();
}

// Claims items in order; item (b, c) reads noise elements up to b * numel + its chunk's end.
void NoiseStream::drain() {
  const int64_t chunks = chunks_per_sample(args_.numel);
  for (int64_t item = next_.fetch_add(1); item < items_; item = next_.fetch_add(1)) {
    const int64_t b = item / chunks;
    const int64_t needed = b * args_.numel + std::min(args_.numel, (item % chunks + 1) * kChunk);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      more_.wait(lock, [&] { return ready_ >= needed; });
      if (cancelled_) return;
    }
    partial_[size_t(item)] = forward_item_(args_, item);
  }
}

void NoiseStream::finish() {
  if (finished_) return;
  publish(total_);
  drain();  // the caller takes the remaining items
  if (call_lock_.owns_lock()) {
    helper().wait_idle();
    call_lock_.unlock();
  }
  finished_ = true;
  if (!cancelled_) finish_forward_(args_, partial_.data());
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
