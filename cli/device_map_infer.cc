#include "cli/device_map_infer.h"

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <vector>

#include "cli/generation_time.h"
#include "cli/progress_line.h"
#include "distributed/auto_device_map.h"
#include "distributed/device_map_generation.h"
#include "distributed/generation_search.h"
#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem::cli {
namespace {

constexpr int kExitDoesNotFit = 3;
// get_max_memory's probe tensor, torch.tensor(0, device=i), holds one 2 MiB segment of the caching allocator
// while mem_get_info reads the free memory; _get_device_map adds that reserved, unused segment back.
constexpr int64_t kProbeSegmentBytes = 2 * kMiB;

// The classes from_pretrained keeps whole: the export's record, else the class of the modules in a container
// (ModuleList children: the decoder layers), which _no_split_modules names for every decoder preset.
std::vector<std::string> NoSplitClasses(const DecoderModel& model) {
  if (auto recorded = model.no_split_modules()) return *recorded;
  static const std::regex kIndexed(R"((^|\.)\d+$)");
  std::set<std::string> classes;
  for (const ModuleNode& m : model.module_tree().modules) {
    if (std::regex_search(m.name, kIndexed)) classes.insert(m.class_name);
  }
  return {classes.begin(), classes.end()};
}

// "model.layers.0" .. "model.layers.15" -> "model.layers.0-15"; other names as they are.
std::vector<std::string> CompactNames(const std::vector<std::string>& names) {
  static const std::regex kIndexed(R"((.*\.)(\d+)$)");
  std::vector<std::string> out;
  std::string prefix;
  long first = -1, last = -1;
  const auto flush = [&] {
    if (first < 0) return;
    out.push_back(prefix + std::to_string(first) + (last > first ? "-" + std::to_string(last) : ""));
    first = last = -1;
  };
  for (const std::string& n : names) {
    std::smatch m;
    if (std::regex_match(n, m, kIndexed)) {
      const long i = std::stol(m[2].str());
      if (first >= 0 && m[1].str() == prefix && i == last + 1) {
        last = i;
        continue;
      }
      flush();
      prefix = m[1].str();
      first = last = i;
      continue;
    }
    flush();
    out.push_back(n.empty() ? "(the whole model)" : n);
  }
  flush();
  return out;
}

std::string Join(const std::vector<std::string>& parts) {
  std::string s;
  for (const std::string& p : parts) s += (s.empty() ? "" : ", ") + p;
  return s;
}

}  // namespace

int RunDeviceMapInfer(const InferOptions& o, const DecoderModel& model, const sim::GenerationGraphAt& graph_at,
                      const std::function<sim::GenerationRequest(int64_t, int64_t)>& request_at,
                      const sim::TrainingConfig& config, const std::optional<PositionLimit>& limit,
                      const std::string& loop) {
  const sim::GenerationRequest request = request_at(o.batch, o.prompt);
  if (config.target.is_cpu) throw ConfigError("--device-map auto places the model over GPUs: name one with --gpu");
  if (o.gpus < 1) throw ConfigError("--device-map auto needs --gpus N (the GPUs the model is spread over)");
  const int gpus = o.gpus;
  const sim::GpuSpec& gpu = config.target.gpu;
  const int64_t free = gpu.capacity_bytes - gpu.cuda_context_bytes - kProbeSegmentBytes;
  if (free <= 0) throw ConfigError("--device-map auto: no GPU memory is left after the CUDA context");
  // models/export_hf.py traces a wrapper whose one child is the Hugging Face model from_pretrained would load.
  const ModuleTree& tree = model.module_tree();
  const int root = tree.modules.at(0).tensors.empty() && tree.modules.at(0).children.size() == 1
                       ? tree.modules.at(0).children.front()
                       : 0;
  dist::AutoDeviceMapRequest req{.tree = &tree,
                                 .root = root,
                                 .no_split_classes = NoSplitClasses(model),
                                 .dtype = config.precision == sim::Precision::kBf16 ? DType::kBF16 : DType::kF32,
                                 .gpu_free_bytes = std::vector<int64_t>(static_cast<size_t>(gpus), free),
                                 .cpu_bytes = int64_t{1} << 40,
                                 .unused_reserved_bytes = kProbeSegmentBytes};
  const dist::AutoDeviceMap map = dist::InferAutoDeviceMap(req);
  // accelerate's names: relative to the loaded model.
  const std::string prefix = tree.modules.at(static_cast<size_t>(root)).name;
  const auto shown = [&](const std::string& full) {
    return prefix.empty() ? full : full == prefix ? std::string() : full.substr(prefix.size() + 1);
  };
  for (const dist::DeviceAssignment& a : map.placement) {
    if (a.device < 0) {
      throw ConfigError("device_map=\"auto\" over " + std::to_string(gpus) + " x " + gpu.name + " offloads " +
                        (a.name.empty() ? std::string("the model") : a.name) + " to the " +
                        (a.device == dist::kCpuDevice ? "CPU" : "disk") +
                        " (the weights do not fit the GPUs); offloaded layers are not modelled");
    }
  }
  std::vector<sim::GenerationForwardSimulator> shares;
  for (int d = 0; d < gpus; ++d) shares.push_back(dist::DeviceMapGenerationForward(map, d));
  std::vector<sim::GenerationEstimate> per_gpu;
  for (const auto& share : shares) per_gpu.push_back(sim::EstimateGeneration(graph_at, request, config, share));
  // The searches: a value fits when every GPU's share does.
  ProgressLine progress("infer --device-map", o.json_out);
  const auto largest = [&](int64_t cap, const char* what, std::function<sim::GenerationRequest(int64_t)> request) {
    return dist::LargestFittingGeneration({.graph_at = graph_at,
                                           .request_at = ReportingTries(progress, what, std::move(request)),
                                           .shares = shares,
                                           .limit = cap},
                                          config);
  };
  std::optional<int64_t> max_batch, max_prompt;
  if (o.max_batch) {
    max_batch = largest(int64_t{1} << 20, "the largest batch", [&](int64_t b) { return request_at(b, o.prompt); });
  }
  if (o.max_prompt) {
    const int64_t cap = limit ? limit->max_seq - o.new_tokens + 1 : int64_t{1} << 24;
    max_prompt = cap < 1 ? 0
                         : largest(cap, "the longest prompt", [&](int64_t p) { return request_at(o.batch, p); });
  }
  // Each GPU's share of the cache: the entries of its layers (all of one length).
  const dist::DeviceMapForward placed = dist::PlaceOnDevices(per_gpu[0].prefill_graph, map, {});
  std::vector<int64_t> entry_bytes(static_cast<size_t>(gpus), 0);
  int64_t all_entries = 0;
  for (ValueId v : per_gpu[0].cache_values) {
    const TensorValue& tv = per_gpu[0].prefill_graph.value(v);
    const DType dtype = config.precision == sim::Precision::kBf16 ? tv.dtype_bf16_weights : tv.dtype;
    const int64_t b = ShapeBytes(tv.shape, dtype);
    entry_bytes[static_cast<size_t>(placed.value_device[static_cast<size_t>(v.index)])] += b;
    all_entries += b;
  }
  std::vector<int64_t> cache(static_cast<size_t>(gpus), 0);
  for (int d = 0; d < gpus; ++d) {
    if (all_entries > 0) {
      cache[static_cast<size_t>(d)] = static_cast<int64_t>(
          static_cast<__int128>(per_gpu[0].cache_bytes) * entry_bytes[static_cast<size_t>(d)] / all_entries);
    }
  }
  std::vector<std::vector<std::string>> modules(static_cast<size_t>(gpus));
  for (const dist::DeviceAssignment& a : map.placement) modules[static_cast<size_t>(a.device)].push_back(shown(a.name));
  bool fits = true;
  for (const auto& e : per_gpu) fits = fits && e.fits();
  // The GPUs run one after another: generate()'s time is the roofline of every op, wherever it runs.
  const GenerationTime time = TimeGeneration(per_gpu[0], config, o.new_tokens, {});
  const std::string placement_note =
      "device_map=\"auto\": accelerate's get_balanced_memory + infer_auto_device_map (accelerate 1.16) over " +
      std::to_string(gpus) + " GPUs of " + FormatBytes(free + kProbeSegmentBytes) +
      " free each (capacity - CUDA context); the hooks copy each module's arguments to its GPU and the logits "
      "back to the first GPU of the map, where generate()'s loop runs; the GPUs run in turn";
  if (o.json_out) {
    nlohmann::json placement = nlohmann::json::array();
    for (const dist::DeviceAssignment& a : map.placement) {
      placement.push_back({{"module", shown(a.name)}, {"device", a.device}});
    }
    nlohmann::json devices = nlohmann::json::array();
    for (int d = 0; d < gpus; ++d) {
      const sim::GenerationEstimate& e = per_gpu[static_cast<size_t>(d)];
      nlohmann::json j = {{"device", d},
                          {"max_memory_bytes", map.max_memory[static_cast<size_t>(d)]},
                          {"weights_bytes", e.prefill.weights_bytes},
                          {"cache_bytes", cache[static_cast<size_t>(d)]},
                          {"prefill_peak_allocated_bytes", e.prefill.peak_allocated_bytes},
                          {"peak_reserved_bytes", e.peak_reserved_bytes()},
                          {"nvidia_smi_bytes", e.nvidia_smi_bytes()},
                          {"fits", e.fits()}};
      if (e.decode) j["decode_peak_allocated_bytes"] = e.decode->peak_allocated_bytes;
      devices.push_back(j);
    }
    nlohmann::json j = {{"model", o.model},       {"target", gpu.name},         {"gpus", gpus},
                        {"batch", o.batch},       {"prompt", o.prompt},         {"new_tokens", o.new_tokens},
                        {"precision", o.precision}, {"device_map", placement}, {"devices", devices},
                        {"free_bytes_per_gpu", free},
                        {"cache_bytes", per_gpu[0].cache_bytes}, {"fits", fits},
                        {"loop", loop + "; " + placement_note},
                        {"time", {{"prefill_s", time.prefill_s}, {"generate_s", time.generate_s},
                                  {"assumptions", time.assumptions}}}};
    if (max_batch) j["max_batch"] = *max_batch;
    if (max_prompt) j["max_prompt"] = *max_prompt;
    if (per_gpu[0].decode) {
      j["time"]["decode_step_s"] = time.decode_step_s;
      j["time"]["decode_tokens_per_s"] = static_cast<double>(o.batch) / time.decode_step_s;
    }
    std::cout << j.dump(2) << "\n";
  } else {
    std::printf("model      %s\n", o.model.c_str());
    std::printf("generate   batch %lld, prompt %lld + %lld new tokens, %s weights, %d x %s with device_map=\"auto\"\n",
                static_cast<long long>(o.batch), static_cast<long long>(o.prompt),
                static_cast<long long>(o.new_tokens), o.precision.c_str(), gpus, gpu.name.c_str());
    std::printf("loop       %s\n", loop.c_str());
    std::printf("placement  %s\n\n", placement_note.c_str());
    for (int d = 0; d < gpus; ++d) {
      const auto& held = modules[static_cast<size_t>(d)];
      std::printf("  GPU %d (max_memory %s): %s\n", d, FormatBytes(map.max_memory[static_cast<size_t>(d)]).c_str(),
                  held.empty() ? "nothing" : Join(CompactNames(held)).c_str());
    }
    std::printf("\n%-5s %12s %12s %14s %14s %12s %12s  %s\n", "GPU", "weights", "KV cache", "prefill peak",
                "decode peak", "reserved", "nvidia-smi", "fits");
    for (int d = 0; d < gpus; ++d) {
      const sim::GenerationEstimate& e = per_gpu[static_cast<size_t>(d)];
      std::printf("%-5d %12s %12s %14s %14s %12s %12s  %s\n", d, FormatBytes(e.prefill.weights_bytes).c_str(),
                  FormatBytes(cache[static_cast<size_t>(d)]).c_str(),
                  FormatBytes(e.prefill.peak_allocated_bytes).c_str(),
                  e.decode ? FormatBytes(e.decode->peak_allocated_bytes).c_str() : "-",
                  FormatBytes(e.peak_reserved_bytes()).c_str(), FormatBytes(e.nvidia_smi_bytes()).c_str(),
                  e.fits() ? "yes" : "no");
    }
    std::printf("\ntime (a GPU roofline over every op, the GPUs in turn; the copies between GPUs at memory speed):\n");
    std::printf("  prefill            %8.2f ms\n", time.prefill_s * 1e3);
    if (per_gpu[0].decode) {
      std::printf("  last decode step   %8.2f ms   %12.1f tokens/s (%lld sequences)\n", time.decode_step_s * 1e3,
                  static_cast<double>(o.batch) / time.decode_step_s, static_cast<long long>(o.batch));
    }
    std::printf("  generate()       <= %8.3f s\n", time.generate_s);
    if (max_batch) {
      std::printf("largest batch that fits every GPU: %lld (prompt %lld + %lld new tokens)\n",
                  static_cast<long long>(*max_batch), static_cast<long long>(o.prompt),
                  static_cast<long long>(o.new_tokens));
    }
    if (max_prompt) {
      std::printf("longest prompt that fits every GPU: %lld tokens (+ %lld new, batch %lld)%s\n",
                  static_cast<long long>(*max_prompt), static_cast<long long>(o.new_tokens),
                  static_cast<long long>(o.batch),
                  limit && *max_prompt + o.new_tokens - 1 >= limit->max_seq ? " (the model's position limit)" : "");
    }
  }
  return fits ? 0 : kExitDoesNotFit;
}

}  // namespace llmem::cli
