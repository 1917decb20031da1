#include "measure/counting_allocator.h"

#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <unordered_set>

namespace llmem {
namespace {

// c10's default CPU allocator aligns to 64 bytes (c10/core/alignment.h, gAlignment); kernels may rely on it.
constexpr size_t kCpuAlignmentBytes = 64;
// Must be >= the priority of anything installed before us, or SetAllocator ignores the call (c10/core/Allocator.cpp).
constexpr uint8_t kAllocatorPriority = 255;

// Names of the ops (and autograd nodes) running on this thread, outermost first, kept by a RecordFunction
// callback while events are recorded.
thread_local std::vector<std::string> tls_ops;

std::unique_ptr<at::ObserverContext> PushOp(const at::RecordFunction& fn) {
  tls_ops.emplace_back(fn.name());
  return nullptr;
}

void PopOp(const at::RecordFunction&, at::ObserverContext*) {
  if (!tls_ops.empty()) tls_ops.pop_back();
}

std::string CurrentOps() {
  std::string text;
  for (const std::string& op : tls_ops) {
    if (!text.empty()) text += " > ";
    text += op;
  }
  return text;
}

// Process-lifetime state of one device's counting allocator. The allocators' deleters are plain function
// pointers (c10::DeleterFnPtr), so they can only reach their counters through a static.
class CounterState {
 public:
  void Begin(bool record_events) {
    std::lock_guard<std::mutex> lock(mu_);
    ++generation_;
    counters_ = {};
    events_.clear();
    record_events_ = record_events;
    phase_.clear();
  }

  void OnAlloc(const void* key, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.num_allocs += 1;
    int64_t current = 0;
    if (__builtin_add_overflow(counters_.current_bytes, bytes, &current)) {
      // Not added (and so not subtracted when freed): the counts stay defined, and the flag makes them void.
      counters_.overflowed = true;
      return;
    }
    live_[key] = {bytes, generation_};
    counters_.current_bytes = current;
    if (counters_.current_bytes > counters_.peak_bytes) counters_.peak_bytes = counters_.current_bytes;
    if (record_events_) events_.push_back({true, bytes, counters_.current_bytes, phase_, CurrentOps()});
  }

  void OnFree(const void* key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(key);
    if (it == live_.end()) return;
    const Block block = it->second;
    live_.erase(it);
    if (block.generation != generation_) return;  // allocated under an earlier installation
    counters_.current_bytes -= block.bytes;
    if (record_events_) events_.push_back({false, block.bytes, counters_.current_bytes, phase_, CurrentOps()});
  }

  AllocationCounters counters() {
    std::lock_guard<std::mutex> lock(mu_);
    return counters_;
  }
  void ResetPeak() {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.peak_bytes = counters_.current_bytes;
  }
  void SetPhase(const std::string& phase) {
    std::lock_guard<std::mutex> lock(mu_);
    phase_ = phase;
  }
  std::vector<AllocationEvent> events() {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }

 private:
  struct Block {
    int64_t bytes;
    int64_t generation;
  };
  std::mutex mu_;
  std::map<const void*, Block> live_;
  int64_t generation_ = 0;
  AllocationCounters counters_;
  bool record_events_ = false;
  std::string phase_;
  std::vector<AllocationEvent> events_;
};

CounterState& State() {
  static auto* state = new CounterState();  // never destroyed: tensors may be freed during static destruction
  return *state;
}

void CpuFree(void* data) {
  if (data == nullptr) return;
  State().OnFree(data);
  std::free(data);
}

// Real memory, aligned like c10's allocator. The DataPtr's context is the data pointer itself, because
// Allocator::raw_allocate() (used by oneDNN and some CPU kernels) requires context == data.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &CpuFree, c10::Device(c10::DeviceType::CPU)};
    void* data = nullptr;
    if (posix_memalign(&data, kCpuAlignmentBytes, n) != 0 || data == nullptr) {
      // c10's own allocators raise OutOfMemoryError, which callers (and the runner) tell apart from other errors.
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU out of memory: tried to allocate ", n, " bytes");
    }
    State().OnAlloc(data, static_cast<int64_t>(n));
    return {data, data, &CpuFree, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &CpuFree; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// One heap record per meta allocation keeps frees distinguishable (meta data pointers are all null).
struct MetaBlock {
  int64_t bytes;
};

void MetaFree(void* context) {
  if (context == nullptr) return;
  State().OnFree(context);
  delete static_cast<MetaBlock*>(context);
}

// No memory: data stays null as meta semantics require; only the size is recorded.
class CountingMetaAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &MetaFree, c10::Device(c10::DeviceType::Meta)};
    auto* block = new MetaBlock{static_cast<int64_t>(n)};
    State().OnAlloc(block, block->bytes);
    return {nullptr, block, &MetaFree, c10::Device(c10::DeviceType::Meta)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {}
};

c10::Allocator* CountingAllocatorFor(c10::DeviceType device) {
  static CountingCpuAllocator cpu;
  static CountingMetaAllocator meta;
  if (device == c10::DeviceType::CPU) return &cpu;
  return &meta;
}

}  // namespace

ScopedCountingAllocator::ScopedCountingAllocator(const std::vector<c10::DeviceType>& devices, bool record_events)
    : devices_(devices) {
  for (c10::DeviceType device : devices_) {
    if (device != c10::DeviceType::CPU && device != c10::DeviceType::Meta) {
      throw std::invalid_argument("counting allocators exist for CPU and meta only");
    }
  }
  State().Begin(record_events);
  if (record_events) {
    op_callback_ = at::addGlobalCallback(
        at::RecordFunctionCallback(&PushOp, &PopOp)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  }
  for (c10::DeviceType device : devices_) {
    previous_.push_back(c10::GetAllocator(device));
    c10::SetAllocator(device, CountingAllocatorFor(device), kAllocatorPriority);
  }
}

ScopedCountingAllocator::~ScopedCountingAllocator() {
  if (op_callback_ != 0) at::removeCallback(op_callback_);
  for (size_t i = 0; i < devices_.size(); ++i) c10::SetAllocator(devices_[i], previous_[i], kAllocatorPriority);
}

AllocationCounters ScopedCountingAllocator::counters() const { return State().counters(); }
void ScopedCountingAllocator::ResetPeak() { State().ResetPeak(); }
void ScopedCountingAllocator::SetPhase(const std::string& phase) { State().SetPhase(phase); }
std::vector<AllocationEvent> ScopedCountingAllocator::events() const { return State().events(); }

}  // namespace llmem
