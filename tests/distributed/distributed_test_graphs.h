// Hand-sized IR graphs shared by the distributed tests, built with the simulator tests' TestGraphBuilder, and a
// trace helper that prints a timeline as "phase +label bytes" / "phase -label" lines.
//
// TwoLayerLm (f32; every figure in the tests is summed from these sizes):
//   input_ids [6] i64 = 48 B, labels [6] i64 = 48 B
//   embedding  wte [9,4] = 144 B   e      = embedding(wte, ids)  [6,4] =  96 B
//   layer 0    w0  [5,4] =  80 B   h0     = linear(e, w0)        [6,5] = 120 B
//   layer 1    w1  [4,5] =  80 B   h1     = linear(h0, w1)       [6,4] =  96 B
//   head       wh  [9,4] = 144 B   logits = linear(h1, wh)       [6,9] = 216 B -> cross_entropy -> loss 4 B
// Parameter indices (Graph::params()): wte 0, w0 1, w1 2, wh 3 -- also their first-use order.
//
// TpBlock (f32, B=1, S=3, H=8, 2 heads of 4, MLP width 32, vocabulary `vocab`): a position embedding
// (indices from aten::arange, not a graph input) and the token embedding, then decoder layer 0 with an attention
// path and an MLP, then the LM head and the loss. Node order:
//   0 pos = arange(3)                          1 pe = embedding(wpe [3,8], pos) [3,8]
//   2 x0 = embedding(wte [V,8], ids) [1,3,8]   3 x = add(x0, pe)
//   4/7/10  q|k|v = linear(x, wq|wk|wv [8,8]) [1,3,8]
//   5/8/11  view [1,3,2,4]                     6/9/12 transpose(1,2) [1,2,3,4], strides [24,4,8,1]
//   13 a = scaled_dot_product_attention(qt, kt, vt) [1,2,3,4]
//   14 at = transpose(a,1,2) [1,3,2,4], strides [24,4,12,1]   15 ar = reshape(at, [1,3,8]) (a copy)
//   16 o = linear(ar, wo [8,8])                17 r1 = add(x, o)
//   18 u = linear(r1, w1 [32,8]) [1,3,32]      19 g = gelu(u)      20 d = linear(g, w2 [8,32]) [1,3,8]
//   21 r2 = add(r1, d)                         22 logits = linear(r2, wh [V,8]) [1,3,V]   23 cross_entropy
#pragma once

#include <string>
#include <vector>

#include "graph/graph.h"
#include "simulator/memory_timeline.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::dist::testing {

using llmem::sim::testing::CpuConfig;
using llmem::sim::testing::CrossEntropy;
using llmem::testing::B;
using llmem::testing::D;
using llmem::testing::I;
using llmem::testing::Ints;
using llmem::testing::None;
using llmem::testing::Out;
using llmem::testing::T;
using llmem::testing::TestGraphBuilder;

inline Graph TwoLayerLm() {
  TestGraphBuilder b;
  ValueId ids = b.Input("input_ids", {6});
  ValueId labels = b.Input("labels", {6});
  ValueId wte = b.Param("wte", {9, 4});
  ValueId e = b.Op("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, {6, 4});
  b.SetLayer(0);
  ValueId w0 = b.Param("w0", {5, 4});
  ValueId h0 = b.Op("aten::linear", {T(e), T(w0), None()}, {6, 5});
  b.SetLayer(1);
  ValueId w1 = b.Param("w1", {4, 5});
  ValueId h1 = b.Op("aten::linear", {T(h0), T(w1), None()}, {6, 4});
  b.SetHead();
  ValueId wh = b.Param("wh", {9, 4});
  ValueId logits = b.Op("aten::linear", {T(h1), T(wh), None()}, {6, 9});
  return b.Build(CrossEntropy(b, logits, labels), 1, 6);
}

struct TpBlock {
  Graph graph;
  ValueId wpe, wte, pe, x0, x;
  ValueId wq, wk, wv, q, qv, qt, kt, vt, a, at, ar, wo, o, r1;
  ValueId w1, u, g, w2, d, r2, wh, logits;
};

// `batch` and `seq` other than 1 and 3 give the same block at B x S tokens (the figures above are for 1 x 3).
inline TpBlock MakeTpBlock(int64_t vocab = 10, int64_t batch = 1, int64_t seq = 3) {
  TestGraphBuilder b;
  TpBlock t;
  const int64_t n = batch, s = seq;
  ValueId ids = b.Input("input_ids", {n, s});
  ValueId labels = b.Input("labels", {n, s});
  ValueId pos = b.Op("aten::arange", {I(s), None(), None(), None(), None()}, {s}, DType::kI64);
  t.wpe = b.Param("wpe", {3, 8});
  t.pe = b.Op("aten::embedding", {T(t.wpe), T(pos), I(-1), B(false), B(false)}, {s, 8});
  t.wte = b.Param("wte", {vocab, 8});
  t.x0 = b.Op("aten::embedding", {T(t.wte), T(ids), I(-1), B(false), B(false)}, {n, s, 8});
  t.x = b.Op("aten::add", {T(t.x0), T(t.pe), I(1)}, {n, s, 8});
  b.SetLayer(0);
  // q, k, v: linear -> view [B,S,heads,head_dim] -> transpose(1,2) [B,heads,S,head_dim] (a strided view).
  auto head_path = [&](const std::string& name, ValueId* weight, ValueId* proj, ValueId* view) {
    *weight = b.Param(name + ".weight", {8, 8});
    *proj = b.OpOut("aten::linear", {T(t.x), T(*weight), None()}, Out({n, s, 8}), "model.layers.0.attn." + name);
    *view = b.OpOut("aten::view", {T(*proj), Ints({n, s, 2, 4})}, Out({n, s, 2, 4}).AliasOf(*proj));
    ValueId tr = b.OpOut("aten::transpose", {T(*view), I(1), I(2)}, Out({n, 2, s, 4}).AliasOf(*proj));
    b.value(tr).strides = {s * 8, 4, 8, 1};
    return tr;
  };
  ValueId k, kv, v, vv;
  t.qt = head_path("q_proj", &t.wq, &t.q, &t.qv);
  t.kt = head_path("k_proj", &t.wk, &k, &kv);
  t.vt = head_path("v_proj", &t.wv, &v, &vv);
  t.a = b.Op("aten::scaled_dot_product_attention", {T(t.qt), T(t.kt), T(t.vt), None(), D(0.0), B(true)},
             {n, 2, s, 4});
  t.at = b.OpOut("aten::transpose", {T(t.a), I(1), I(2)}, Out({n, s, 2, 4}).AliasOf(t.a));
  b.value(t.at).strides = {s * 8, 4, s * 4, 1};
  t.ar = b.Op("aten::reshape", {T(t.at), Ints({n, s, 8})}, {n, s, 8});  // not mergeable: a copy
  t.wo = b.Param("o_proj.weight", {8, 8});
  t.o = b.OpOut("aten::linear", {T(t.ar), T(t.wo), None()}, Out({n, s, 8}), "model.layers.0.attn.o_proj");
  t.r1 = b.Op("aten::add", {T(t.x), T(t.o), I(1)}, {n, s, 8});
  t.w1 = b.Param("up.weight", {32, 8});
  t.u = b.OpOut("aten::linear", {T(t.r1), T(t.w1), None()}, Out({n, s, 32}), "model.layers.0.mlp.up");
  t.g = b.Op("aten::gelu", {T(t.u)}, {n, s, 32});
  t.w2 = b.Param("down.weight", {8, 32});
  t.d = b.OpOut("aten::linear", {T(t.g), T(t.w2), None()}, Out({n, s, 8}), "model.layers.0.mlp.down");
  t.r2 = b.Op("aten::add", {T(t.r1), T(t.d), I(1)}, {n, s, 8});
  b.SetHead();
  t.wh = b.Param("lm_head.weight", {vocab, 8});
  t.logits = b.OpOut("aten::linear", {T(t.r2), T(t.wh), None()}, Out({n, s, vocab}), "lm_head");
  t.graph = b.Build(CrossEntropy(b, t.logits, labels), n, s);
  return t;
}

// The timeline as one line per event of the blocks `keep` selects (by the category they were allocated with):
// "forward +FSDP2 all-gather output (root) 320" for an allocation, "forward -FSDP2 all-gather output (root)" for
// its free.
template <typename Keep>
std::vector<std::string> TraceOf(const sim::Timeline& tl, Keep keep) {
  std::vector<sim::MemoryCategory> category_of(tl.block_labels.size(), sim::MemoryCategory::kTransient);
  std::vector<std::string> lines;
  for (const auto& e : tl.events) {
    const size_t block = static_cast<size_t>(e.block);
    if (e.is_alloc) category_of[block] = e.category;
    if (!keep(category_of[block])) continue;
    std::string line = std::string(sim::PhaseName(e.phase)) + (e.is_alloc ? " +" : " -") + tl.block_labels[block];
    if (e.is_alloc) line += " " + std::to_string(e.bytes);
    lines.push_back(std::move(line));
  }
  return lines;
}

}  // namespace llmem::dist::testing
