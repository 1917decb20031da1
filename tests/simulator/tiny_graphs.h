// Hand-sized IR graphs shared by the simulator tests, and a replay oracle for their timelines.
//
// Sizes (f32 unless said): x [4,8] = 128 B, labels [4] i64 = 32 B, loss [] = 4 B.
#pragma once

#include <array>
#include <map>
#include <utility>

#include "simulator/memory_timeline.h"
#include "simulator/training_config.h"
#include "tests/simulator/test_graph_builder.h"

namespace llmem::sim::testing {

using llmem::testing::B;
using llmem::testing::D;
using llmem::testing::I;
using llmem::testing::None;
using llmem::testing::Out;
using llmem::testing::T;
using llmem::testing::TestGraphBuilder;

inline TrainingConfig CpuConfig(Precision precision = Precision::kFp32,
                                OptimizerKind optimizer = OptimizerKind::kAdamW) {
  TrainingConfig c;
  c.precision = precision;
  c.optimizer = optimizer;
  c.target.is_cpu = true;
  return c;
}

inline TrainingConfig GpuConfig(const char* gpu, Precision precision = Precision::kFp32,
                                OptimizerKind optimizer = OptimizerKind::kAdamW) {
  TrainingConfig c;
  c.precision = precision;
  c.optimizer = optimizer;
  c.target.is_cpu = false;
  c.target.gpu = *FindGpu(gpu);
  return c;
}

inline ValueId CrossEntropy(TestGraphBuilder& b, ValueId logits, ValueId labels) {
  b.SetHead();
  return b.Op("aten::cross_entropy_loss", {T(logits), T(labels), None(), I(1), I(-100), D(0.0)}, {});
}

// Graph A: x [4,8] -> linear(w [16,8] = 512 B) -> logits [4,16] = 256 B -> cross_entropy(labels) -> loss.
inline Graph LinearCrossEntropy() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {16, 8});
  b.SetLayer(0);
  ValueId logits = b.Op("aten::linear", {T(x), T(w), None()}, {4, 16});
  return b.Build(CrossEntropy(b, logits, labels));
}

// Graph B: x [4,8] -> linear(w1 [8,8] = 256 B) -> h [4,8] = 128 B -> linear(w2 [16,8] = 512 B)
//          -> logits [4,16] = 256 B -> cross_entropy -> loss.
inline Graph TwoLinears() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w1 = b.Param("w1", {8, 8});
  ValueId w2 = b.Param("w2", {16, 8});
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {T(x), T(w1), None()}, {4, 8});
  ValueId logits = b.Op("aten::linear", {T(h), T(w2), None()}, {4, 16});
  return b.Build(CrossEntropy(b, logits, labels));
}

// Graph D: a causal-LM head with module paths (Note [Eager lifetimes]). The norm output h [4,8] = 128 B and the
// logits [4,16] are returned to the model's forward; the upcast f = to(logits, f32) runs in HF's loss function (a
// helper of another file), or, with `model_casts`, in the model's own forward (`lm_logits = lm_logits.to(...)`).
//   op  path             value
//   0   model.body.norm  h = mul(x, x)
//   1   model.lm_head    logits = linear(h, w [16,8])
//   2   model            f = to(logits, f32)           (a view in this fp32 graph)
//   3   model            loss = cross_entropy(f, labels)
inline Graph CausalLmHead(bool model_casts = false) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {16, 8});
  b.SetHead();
  ValueId h = b.OpOut("aten::mul", {T(x), T(x)}, Out({4, 8}), "model.body.norm");
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w), None()}, Out({4, 16}), "model.lm_head");
  b.SetInModuleCode(model_casts);
  ValueId f = b.OpOut("aten::to", {T(logits), I(6), B(false), B(false), None()}, Out({4, 16}).AliasOf(logits),
                      "model");
  b.SetInModuleCode(false);
  return b.Build(b.OpOut("aten::cross_entropy_loss", {T(f), T(labels), None(), I(1), I(-100), D(0.0)}, Out({}),
                         "model"));
}

// Graph C: one weight w [8,8] = 256 B used by two matmuls: h = linear(x, w); y = linear(h, w) [4,8];
// cross_entropy(y).
inline Graph SharedWeight() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {8, 8});
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {T(x), T(w), None()}, {4, 8});
  ValueId y = b.Op("aten::linear", {T(h), T(w), None()}, {4, 8});
  return b.Build(CrossEntropy(b, y, labels));
}

// Exact-bytes replay of a timeline (what the cpu target's allocator counts), assuming it is well formed.
struct Replay {
  int64_t peak = 0;
  std::array<int64_t, 4> phase_peak{};   // max live bytes after any event of the phase
  std::array<int64_t, 4> phase_start{};  // live bytes before the phase's first event
  std::map<std::pair<Phase, int32_t>, int64_t> node_peak;  // (phase, node) -> max live bytes after its events
  int64_t end = 0;                       // live bytes after the last event
};

inline Replay ReplayExact(const Timeline& tl) {
  Replay r;
  std::map<int64_t, int64_t> live;
  int64_t cur = 0;
  std::array<bool, 4> started{};
  for (const auto& e : tl.events) {
    const size_t ph = static_cast<size_t>(e.phase);
    if (!started[ph]) {
      started[ph] = true;
      r.phase_start[ph] = cur;
    }
    if (e.is_alloc) {
      live[e.block] = e.bytes;
      cur += e.bytes;
    } else {
      cur -= live[e.block];
      live.erase(e.block);
    }
    r.peak = std::max(r.peak, cur);
    r.phase_peak[ph] = std::max(r.phase_peak[ph], cur);
    auto& np = r.node_peak[{e.phase, e.node}];
    np = std::max(np, cur);
  }
  r.end = cur;
  return r;
}

// Allocated blocks whose label is exactly `label`, with their sizes.
inline std::vector<int64_t> BlocksLabelled(const Timeline& tl, const std::string& label) {
  std::vector<int64_t> sizes;
  for (const auto& e : tl.events) {
    if (e.is_alloc && tl.block_labels.at(static_cast<size_t>(e.block)) == label) sizes.push_back(e.bytes);
  }
  return sizes;
}

}  // namespace llmem::sim::testing
