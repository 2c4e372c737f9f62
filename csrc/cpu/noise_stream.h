// A CPU sampling step that runs while the caller fills its noise tensor, for noise that must come
// from elsewhere (torch.randn with the caller's generator, as diffusers draws it): the caller fills
// the noise in order and publishes how many elements are ready; a helper thread computes the
// (sample, chunk) work items whose noise is ready meanwhile, and finish() takes the rest on the
// calling thread, then writes log_prob. Same results as ddim_forward_cpu on the filled noise.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

#include "ddim_core.h"

namespace ddpo {

class NoiseStream {
 public:
  explicit NoiseStream(const DdimArgs& args);  // validates (std::invalid_argument), starts the helper
  ~NoiseStream();                              // cancels and joins if finish() was not called
  NoiseStream(const NoiseStream&) = delete;
  NoiseStream& operator=(const NoiseStream&) = delete;

  void publish(int64_t ready_elements);  // noise elements [0, ready_elements) are written
  void cancel();                         // the noise will not be completed: skip the remaining items
  void finish();                         // joins; writes log_prob unless cancelled

 private:
  void drain();

  DdimArgs args_;
  double (*forward_item_)(const DdimArgs&, int64_t);
  void (*finish_forward_)(const DdimArgs&, const double*);
  int64_t items_;
  std::atomic<int64_t> next_{0};
  std::vector<double> partial_;
  std::mutex mutex_;
  std::condition_variable more_;
  int64_t ready_;
  int64_t total_;
  bool cancelled_;
  bool finished_;
  std::unique_lock<std::mutex> call_lock_;  // holds the helper; not taken: finish() does all the work
};

}  // namespace ddpo
