#include "distributed/chunk_manager.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <string>

#include "graph/error.h"

namespace llmem::dist {
namespace {

int64_t RoundUp(int64_t n, int64_t multiple) { return multiple > 0 ? (n + multiple - 1) / multiple * multiple : n; }

// Unused tail elements when packing `numels` greedily into chunks of `size` (larger params: their own chunk).
int64_t Waste(const std::vector<int64_t>& numels, int64_t size) {
  int64_t waste = 0, left = 0;
  bool open = false;
  for (int64_t n : numels) {
    if (n > size) continue;  // a dedicated chunk, no tail
    if (!open || n > left) {
      if (open) waste += left;
      left = size;
      open = true;
    }
    left -= n;
  }
  return waste + (open ? left : 0);
}

}  // namespace

int64_t SearchChunkNumel(const std::vector<int64_t>& numels, int dp, const ChunkSearchConfig& config) {
  std::vector<int64_t> considered = numels;
  if (config.filter_outliers && numels.size() > 1) {
    const double mean = std::accumulate(numels.begin(), numels.end(), 0.0) / static_cast<double>(numels.size());
    double var = 0;
    for (int64_t n : numels) var += (static_cast<double>(n) - mean) * (static_cast<double>(n) - mean);
    const double limit = mean + 3 * std::sqrt(var / static_cast<double>(numels.size()));
    considered.clear();
    for (int64_t n : numels) {
      if (static_cast<double>(n) <= limit) considered.push_back(n);
    }
  }
  const int64_t largest = considered.empty() ? 0 : *std::max_element(considered.begin(), considered.end());
  const int64_t interval = std::max<int64_t>(1, config.search_interval);
  const int64_t start = RoundUp(std::max(config.min_chunk_numel, largest), interval);
  int64_t best = start, best_waste = -1;
  for (int64_t size = start; size <= start + config.search_range_numel; size += interval) {
    const int64_t w = Waste(considered, size);
    if (best_waste < 0 || w < best_waste) {
      best = size;
      best_waste = w;
    }
  }
  return RoundUp(best, dp);
}

ChunkLayout PackChunks(const Graph& graph, const std::vector<ManagedParam>& params, int dp,
                       const ChunkSearchConfig& config) {
  ChunkLayout layout;
  int64_t total = 0;
  std::vector<int64_t> numels;
  for (const auto& p : params) {
    numels.push_back(p.numel);
    total += p.numel;
  }
  // Regions that use each parameter (a tied weight is used in the embedding and the head).
  const int layers = graph.num_layers();
  auto order = [layers](const Region& r) {
    return r.kind == RegionKind::kEmbedding ? 0 : r.kind == RegionKind::kHead ? layers + 1 : r.layer + 1;
  };
  std::map<int32_t, std::pair<int, int>> uses;  // storage root -> first/last region order
  for (const auto& node : graph.nodes()) {
    for (ValueId in : graph.tensor_inputs(node.id)) {
      const int32_t root = graph.StorageRoot(in).index;
      auto [it, fresh] = uses.emplace(root, std::make_pair(order(node.region), order(node.region)));
      if (!fresh) {
        it->second.first = std::min(it->second.first, order(node.region));
        it->second.second = std::max(it->second.second, order(node.region));
      }
    }
  }
  auto add_param = [&](Chunk& c, size_t i) {
    c.params.push_back(i);
    const int32_t root = graph.StorageRoot(graph.params()[static_cast<size_t>(params[i].index)].value).index;
    auto it = uses.find(root);
    const auto span = it == uses.end() ? std::make_pair(0, 0) : it->second;
    if (c.params.size() == 1) {
      c.first_region = span.first;
      c.last_region = span.second;
    } else {
      c.first_region = std::min(c.first_region, span.first);
      c.last_region = std::max(c.last_region, span.second);
    }
  };
  if (total < config.min_chunk_numel) {
    layout.keep_gathered = true;
    layout.chunk_numel = RoundUp(total, dp);
    Chunk c;
    c.numel = layout.chunk_numel;
    for (size_t i = 0; i < params.size(); ++i) add_param(c, i);
    layout.wasted_numel = c.numel - total;
    if (!params.empty()) layout.chunks.push_back(c);
    return layout;
  }
  layout.chunk_numel = SearchChunkNumel(numels, dp, config);
  int64_t left = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel;
    if (n > layout.chunk_numel) {  // a dedicated chunk sized to the parameter
      Chunk c;
      c.numel = RoundUp(n, dp);
      add_param(c, i);
      layout.wasted_numel += c.numel - n;
      layout.chunks.push_back(c);
      continue;
    }
    if (layout.chunks.empty() || layout.chunks.back().numel != layout.chunk_numel || n > left) {
      if (!layout.chunks.empty() && layout.chunks.back().numel == layout.chunk_numel) layout.wasted_numel += left;
      Chunk c;
      c.numel = layout.chunk_numel;
      layout.chunks.push_back(c);
      left = layout.chunk_numel;
    }
    add_param(layout.chunks.back(), i);
    left -= n;
  }
  if (!layout.chunks.empty() && layout.chunks.back().numel == layout.chunk_numel) layout.wasted_numel += left;
  return layout;
}

CollectiveList ChunkCollectives(const ChunkLayout& layout, int dp, bool crosses_nodes) {
  CollectiveList out;
  if (dp <= 1 || layout.chunks.empty()) return out;
  int64_t bytes16 = 0;
  for (const auto& c : layout.chunks) bytes16 += c.numel * 2;
  auto add = [&](CollectiveKind k, StepPhase ph, const char* what) {
    out.push_back(Collective{.kind = k,
                             .bytes = bytes16,
                             .group_size = dp,
                             .crosses_nodes = crosses_nodes,
                             .phase = ph,
                             .overlapped = false,
                             .count = 1,
                             .what = what});
  };
  if (layout.keep_gathered) {
    add(CollectiveKind::kAllReduce, StepPhase::kBackward, "Gemini gradient all-reduce (gathered chunk)");
    return out;
  }
  add(CollectiveKind::kAllGather, StepPhase::kForward, "Gemini chunk all-gather (forward)");
  add(CollectiveKind::kAllGather, StepPhase::kBackward, "Gemini chunk all-gather (backward)");
  add(CollectiveKind::kReduceScatter, StepPhase::kBackward, "Gemini chunk reduce-scatter");
  return out;
}

bool GeminiModelsOptimizer(sim::OptimizerKind optimizer) {
  return optimizer == sim::OptimizerKind::kAdamW || optimizer == sim::OptimizerKind::kSgdMomentum;
}

GeminiHooks::GeminiHooks(const Graph& graph, std::vector<ManagedParam> params, ChunkLayout layout, int dp,
                         sim::OptimizerKind optimizer)
    : params_(std::move(params)),
      layout_(std::move(layout)),
      dp_(dp),
      num_layers_(graph.num_layers()),
      optimizer_states_(optimizer == sim::OptimizerKind::kAdamW ? 2 : 1) {
  if (!GeminiModelsOptimizer(optimizer)) {
    throw ConfigError("chunk-based ZeRO (--engine gemini) is modelled with adamw or sgd, not " +
                      std::string(sim::OptimizerName(optimizer)));
  }
  for (const auto& p : params_) managed_values_.insert(p.value);
  gathered_.assign(layout_.chunks.size(), -1);
}

int64_t GeminiHooks::ResidentParamBytes(const Parameter& p, int64_t full_bytes) const {
  return managed_values_.count(p.value.index) ? 0 : full_bytes;  // chunks hold the parameters
}

int64_t GeminiHooks::OptimizedBytes(const Parameter& p, int64_t full_bytes) const {
  return managed_values_.count(p.value.index) ? 0 : full_bytes;  // states live per chunk (OnSetup)
}

int GeminiHooks::RegionOrder(const Region& r) const {
  return r.kind == RegionKind::kEmbedding ? 0 : r.kind == RegionKind::kHead ? num_layers_ + 1 : r.layer + 1;
}

int64_t GeminiHooks::ShardNumel(const Chunk& c) const { return layout_.keep_gathered ? c.numel : c.numel / dp_; }

void GeminiHooks::OnSetup(sim::StepMemory& mem) {
  for (size_t i = 0; i < layout_.chunks.size(); ++i) {
    const int64_t shard = ShardNumel(layout_.chunks[i]);
    const std::string name = "chunk " + std::to_string(i);
    mem.Alloc(shard * 2, sim::MemoryCategory::kWeights, name + " 16-bit shard");
    mem.Alloc(shard * 4, sim::MemoryCategory::kOptimizerState, name + " fp32 master shard");
    for (int s = 0; s < optimizer_states_; ++s) {
      mem.Alloc(shard * 4, sim::MemoryCategory::kOptimizerState, name + " optimizer state");
    }
  }
}

void GeminiHooks::OnRegionStart(sim::Phase phase, const Region& region, sim::StepMemory& mem) {
  if (layout_.keep_gathered || (phase != sim::Phase::kForward && phase != sim::Phase::kBackward)) return;
  const int r = RegionOrder(region);
  for (size_t i = 0; i < layout_.chunks.size(); ++i) {
    const Chunk& c = layout_.chunks[i];
    const int first_use = phase == sim::Phase::kForward ? c.first_region : c.last_region;
    if (first_use == r && gathered_[i] < 0) {
      gathered_[i] =
          mem.Alloc(c.numel * 2, sim::MemoryCategory::kGatheredParams, "gathered chunk " + std::to_string(i));
    }
  }
}

void GeminiHooks::OnRegionEnd(sim::Phase phase, const Region& region, sim::StepMemory& mem) {
  if (phase != sim::Phase::kForward && phase != sim::Phase::kBackward) return;
  const int r = RegionOrder(region);
  for (size_t i = 0; i < layout_.chunks.size(); ++i) {
    const Chunk& c = layout_.chunks[i];
    if (phase == sim::Phase::kBackward) {
      // Gradients of this region's parameters were copied into the chunk as autograd produced them.
      for (size_t p : c.params) {
        if (RegionOrder(params_[p].region) != r) continue;
        const int64_t grad = mem.TakeParamGrad(params_[p].index);
        if (grad >= 0) mem.Free(grad);
      }
    }
    const int last_use = phase == sim::Phase::kForward ? c.last_region : c.first_region;
    if (last_use == r && gathered_[i] >= 0) {
      mem.Free(gathered_[i]);  // released after forward; reduce-scattered into the shard after backward
      gathered_[i] = -1;
    }
  }
}

std::string GeminiHooks::UnmodelledLoop(const sim::LoopPlan& loop) const {
  if (loop.simulated_micro_batches == 1 && !loop.optimizer_in_backward) return "";
  // GeminiDDP reduces each chunk's gradients into the chunk as backward leaves it, and its optimizer steps the
  // fp32 master chunks after backward: neither keeps per-parameter gradients a loop could accumulate or step.
  return sim::LoopFeature(loop) + " is not modelled with chunk-based ZeRO (Gemini): it reduces gradients into "
         "its chunks during backward and steps the master chunks after it";
}

void GeminiHooks::OnOptimizerStepEnd(sim::StepMemory& mem) {
  // HybridAdam reads each chunk's 16-bit gradient shard as fp32, one chunk at a time.
  for (const auto& c : layout_.chunks)
    mem.Free(mem.Alloc(ShardNumel(c) * 4, sim::MemoryCategory::kTransient, "fp32 gradient shard"));
}

std::string GeminiHooks::UnmodelledLoss(const sim::LossPlan& loss) const {
  if (loss.chunk_lengths.empty()) return "";
  // The chunked loop's autocast copy of the LM head weight is the one Gemini's 16-bit chunks make unnecessary.
  return sim::LossFeature(loss) + " is not modelled with chunk-based ZeRO (Gemini): it computes with its 16-bit "
         "weight chunks, which the chunked loop's weight copies do not account for";
}

}  // namespace llmem::dist
