#include "simulator/timeline_invariants.h"

#include <vector>

#include "graph/error.h"

namespace llmem::sim {
namespace {

// Categories whose blocks belong to one step and must not outlive it (the others persist between steps:
// weights, gradients until zero_grad, optimizer states, inputs, library workspaces, engine buffers).
bool DiesWithinStep(MemoryCategory c) {
  switch (c) {
    case MemoryCategory::kActivations:
    case MemoryCategory::kCheckpointInputs:
    case MemoryCategory::kRecomputed:
    case MemoryCategory::kHeadActivations:
    case MemoryCategory::kAutocastCopies:
    case MemoryCategory::kActivationGrads:
    case MemoryCategory::kTransient:
      return true;
    default:
      return false;
  }
}

}  // namespace

void CheckTimelineInvariants(const Timeline& tl) {
  enum class State : uint8_t { kUnseen, kLive, kFreed };
  std::vector<State> state(tl.block_labels.size(), State::kUnseen);
  std::vector<MemoryCategory> category(tl.block_labels.size(), MemoryCategory::kTransient);
  auto label = [&](int64_t b) { return "block " + std::to_string(b) + " (" + tl.block_labels[static_cast<size_t>(b)] + ")"; };
  int64_t live = 0;
  bool live_overflowed = false;  // a step past 64-bit byte counts: EstimateMemory refuses it; sizes stay checked
  for (const MemoryEvent& e : tl.events) {
    LLMEM_CHECK(e.block >= 0 && static_cast<size_t>(e.block) < state.size()) << "event for unknown block " << e.block;
    LLMEM_CHECK(e.bytes >= 0) << "negative size of " << label(e.block);
    State& s = state[static_cast<size_t>(e.block)];
    if (e.is_alloc) {
      LLMEM_CHECK(s == State::kUnseen) << label(e.block) << " allocated twice";
      s = State::kLive;
      category[static_cast<size_t>(e.block)] = e.category;
      live_overflowed |= __builtin_add_overflow(live, e.bytes, &live);
    } else {
      LLMEM_CHECK(s == State::kLive) << label(e.block) << (s == State::kFreed ? " freed twice" : " freed before it exists");
      s = State::kFreed;
      live_overflowed |= __builtin_sub_overflow(live, e.bytes, &live);
      LLMEM_CHECK(live_overflowed || live >= 0) << "live bytes below zero after freeing " << label(e.block);
    }
  }
  for (size_t b = 0; b < state.size(); ++b) {
    LLMEM_CHECK(state[b] != State::kLive || !DiesWithinStep(category[b]))
        << label(static_cast<int64_t>(b)) << " of the step is still live when it ends";
  }
}

}  // namespace llmem::sim
