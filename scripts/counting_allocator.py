#!/usr/bin/env python3
"""A counting c10 CPU allocator for Python processes (built with torch.utils.cpp_extension.load_inline).

`install()` replaces PyTorch's CPU allocator (c10::SetCPUAllocator) with one that hands out real memory
(posix_memalign, 64-byte aligned like c10's default) and keeps a side table pointer -> requested bytes, so it
knows the live bytes of every CPU tensor storage allocated after the installation, the way
measure/counting_allocator.cc does for `llmem measure`. Tensors allocated before the installation keep their
old deleter and are never counted. Memory that does not go through the c10 CPU allocator (gloo's transport
buffers, oneDNN/BLAS scratch that uses malloc directly, Python objects) is not counted either.

Two independent peak counters ("slots") can be reset separately: slot 0 for per-phase peaks, slot 1 for a
whole measurement window.

The extension is compiled once into $LLMEM_BUILD_DIR/countalloc (default build/countalloc under the repo
root; override with LLMEM_COUNTALLOC_DIR). The first build takes 30-60 s; later loads take about a second.
Build it before starting several ranks (`python scripts/counting_allocator.py --build`), otherwise every rank
waits on load_inline's lock while one of them compiles.
"""
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SLOTS = 2

_CPP = r"""
#include <torch/extension.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {
constexpr int kSlots = 2;
constexpr size_t kAlignment = 64;        // c10's gAlignment
constexpr uint8_t kPriority = 255;       // SetCPUAllocator ignores a lower priority than the current one

std::mutex g_mu;
std::unordered_map<void*, int64_t> g_live;
int64_t g_current = 0;
int64_t g_peak[kSlots] = {0, 0};
int64_t g_num_allocs = 0;
int64_t g_total_bytes = 0;
bool g_log = false;
bool g_log_frees = false;
int64_t g_log_min = 0;
std::vector<int64_t> g_log_sizes;

void CountingFree(void* p) {
  if (p == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_live.find(p);
    if (it != g_live.end()) {
      g_current -= it->second;
      if (g_log && g_log_frees && it->second >= g_log_min) g_log_sizes.push_back(-it->second);
      g_live.erase(it);
    }
  }
  std::free(p);
}

struct CountingAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n > 0) {
      const int rc = posix_memalign(&p, kAlignment, n);
      TORCH_CHECK(rc == 0 && p != nullptr, "counting allocator: out of memory allocating ", n, " bytes");
      std::lock_guard<std::mutex> lock(g_mu);
      g_live[p] = static_cast<int64_t>(n);
      g_current += static_cast<int64_t>(n);
      g_total_bytes += static_cast<int64_t>(n);
      ++g_num_allocs;
      for (int s = 0; s < kSlots; ++s) {
        if (g_current > g_peak[s]) g_peak[s] = g_current;
      }
      if (g_log && static_cast<int64_t>(n) >= g_log_min) g_log_sizes.push_back(static_cast<int64_t>(n));
    }
    // context == data, so Allocator::raw_allocate / raw_deallocate work (oneDNN uses them).
    return {p, p, &CountingFree, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &CountingFree; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CountingAllocator g_allocator;

int CheckSlot(int64_t slot) {
  TORCH_CHECK(slot >= 0 && slot < kSlots, "counting allocator: no peak slot ", slot);
  return static_cast<int>(slot);
}
}  // namespace

void install() { c10::SetCPUAllocator(&g_allocator, kPriority); }
bool installed() { return c10::GetCPUAllocator() == &g_allocator; }
int64_t current() { std::lock_guard<std::mutex> lock(g_mu); return g_current; }
int64_t peak(int64_t slot) { std::lock_guard<std::mutex> lock(g_mu); return g_peak[CheckSlot(slot)]; }
void reset_peak(int64_t slot) { std::lock_guard<std::mutex> lock(g_mu); g_peak[CheckSlot(slot)] = g_current; }
int64_t num_allocs() { std::lock_guard<std::mutex> lock(g_mu); return g_num_allocs; }
int64_t total_allocated() { std::lock_guard<std::mutex> lock(g_mu); return g_total_bytes; }
void start_log(int64_t min_bytes, bool frees) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_log = true; g_log_frees = frees; g_log_min = min_bytes; g_log_sizes.clear();
}
std::vector<int64_t> stop_log() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_log = false;
  std::vector<int64_t> sizes;
  sizes.swap(g_log_sizes);
  return sizes;
}
"""

_FUNCTIONS = ["install", "installed", "current", "peak", "reset_peak", "num_allocs", "total_allocated",
              "start_log", "stop_log"]
_module = None


def build_dir():
    """Where the extension is compiled: $LLMEM_COUNTALLOC_DIR, else $LLMEM_BUILD_DIR/countalloc."""
    explicit = os.environ.get("LLMEM_COUNTALLOC_DIR")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("LLMEM_BUILD_DIR", "build")
    if not os.path.isabs(base):
        base = os.path.join(_REPO, base)
    return os.path.join(base, "countalloc")


def build(verbose=False):
    """Compile (or load the cached build of) the extension without installing it; returns the module."""
    global _module
    if _module is None:
        import logging

        # "No CUDA runtime is found, using CUDA_HOME=..." on import: irrelevant for a CPU-only extension
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load_inline

        directory = build_dir()
        os.makedirs(directory, exist_ok=True)
        _module = load_inline(name="llmem_countalloc", cpp_sources=[_CPP], functions=_FUNCTIONS,
                              build_directory=directory, extra_cflags=["-O2"], verbose=verbose)
    return _module


class CountingAllocator:
    """Python view of the installed allocator (one per process)."""

    def __init__(self, module):
        self._m = module

    def current(self):
        return self._m.current()

    def peak(self, slot=0):
        return self._m.peak(slot)

    def reset_peak(self, slot=0):
        self._m.reset_peak(slot)

    def num_allocs(self):
        return self._m.num_allocs()

    def total_allocated(self):
        return self._m.total_allocated()

    def start_log(self, min_bytes=0, frees=False):
        """Record the size of every allocation of at least min_bytes until stop_log(); with frees, also every
        such free, as a negative size (in the order they happen)."""
        self._m.start_log(min_bytes, frees)

    def stop_log(self):
        return list(self._m.stop_log())


def install(verbose=False):
    """Build/load the extension and make it PyTorch's CPU allocator. Call before the tensors to be counted."""
    module = build(verbose)
    if not module.installed():
        module.install()
    if not module.installed():
        raise RuntimeError("counting allocator: c10::SetCPUAllocator did not take it (a higher-priority "
                           "CPU allocator is installed)")
    return CountingAllocator(module)


def _self_test():
    import torch

    alloc = install()
    base = alloc.current()
    x = torch.empty(1000, dtype=torch.float32)
    assert alloc.current() - base == 4000, alloc.current() - base
    y = torch.ones(1000, dtype=torch.bfloat16)
    assert alloc.current() - base == 6000
    alloc.reset_peak(0)
    del x
    assert alloc.current() - base == 2000 and alloc.peak(0) - base == 6000 and alloc.peak(1) - base == 6000
    alloc.reset_peak(0)
    assert alloc.peak(0) - base == 2000 and alloc.peak(1) - base == 6000
    del y
    a = torch.randn(256, 256)
    before = alloc.current()
    a.view(-1).add_(1)
    assert alloc.current() == before
    c = a @ a
    assert alloc.current() - before == 256 * 256 * 4
    del a, c
    assert alloc.current() == base
    print(f"counting allocator OK ({build_dir()})")


if __name__ == "__main__":
    if sys.argv[1:] == ["--build"]:
        build(verbose=False)
        print(build_dir())
    elif sys.argv[1:] == ["--self-test"]:
        _self_test()
    else:
        sys.exit("usage: counting_allocator.py --build | --self-test")
