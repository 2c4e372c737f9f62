#include "cpu/thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace ddpo {
namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { work(i + 1); });
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

  void run(int64_t n, int parts, const std::function<void(int64_t, int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      n_ = n;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    start_.notify_all();
    run_part(0, fn);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void run_part(int part, const std::function<void(int64_t, int64_t)>& fn) const {
    int64_t begin = n_ * part / parts_, end = n_ * (part + 1) / parts_;
    if (begin < end) fn(begin, end);
  }

  void work(int part) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (part >= parts_) continue;
      const auto* fn = job_;
      lock.unlock();
      run_part(part, *fn);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 1;
  int pending_ = 0;
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

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  std::lock_guard<std::mutex> call_lock(g_call_mutex);
  ThreadPool& p = pool();
  int parts = int(std::min<int64_t>(p.size(), n));
  if (parts == 1) {
    fn(0, n);
    return;
  }
  p.run(n, parts, fn);
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
