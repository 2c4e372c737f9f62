#include "cpu/thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace ddpo {
namespace {

// Items are claimed one at a time from an atomic counter by the caller and by whichever workers
// wake up in time: a worker that is descheduled (the machine is busy) delays nothing, because the
// caller only waits for workers that actually joined the job.
class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : threads_) t.join();
  }

  int size() const { return int(threads_.size()) + 1; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      n_ = n;
      next_.store(0);
      open_ = true;
      ++generation_;
    }
    start_.notify_all();
    drain(fn);
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;  // late wakers skip this job
    done_.wait(lock, [this] { return active_ == 0; });
    job_ = nullptr;
  }

 private:
  void drain(const std::function<void(int64_t, int64_t)>& fn) {
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) fn(i, i + 1);
  }

  void work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || (open_ && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      ++active_;
      const auto* fn = job_;
      lock.unlock();
      drain(*fn);
      lock.lock();
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  bool open_ = false;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

std::mutex g_call_mutex;
ThreadPool* g_pool = nullptr;
pid_t g_pool_pid = 0;
int g_num_threads = 0;

int default_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// The pool for this process with the requested size. After fork() the parent's workers do not
// exist in the child: the stale pool is abandoned (never joined) and a new one is made.
ThreadPool& pool() {
  int wanted = g_num_threads > 0 ? g_num_threads : default_threads();
  if (g_pool != nullptr && g_pool_pid != getpid()) g_pool = nullptr;
  if (g_pool == nullptr || g_pool->size() != wanted) {
    delete g_pool;
    g_pool = new ThreadPool(wanted - 1);
    g_pool_pid = getpid();
  }
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, bool parallel) {
  if (n <= 0) return;
  if (!parallel || n == 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(g_call_mutex);
  ThreadPool& p = pool();
  if (p.size() == 1) {
    fn(0, n);
    return;
  }
  p.run(n, fn);
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> call_lock(g_call_mutex);
  g_num_threads = std::max(1, n);
}

int num_threads() {
  std::lock_guard<std::mutex> call_lock(g_call_mutex);
  return g_num_threads > 0 ? g_num_threads : default_threads();
}

}  // namespace ddpo
