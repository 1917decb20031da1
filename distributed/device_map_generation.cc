#include "distributed/device_map_generation.h"

#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>

#include "graph/error.h"
#include "graph/graph_rewriter.h"

namespace llmem::dist {
namespace {

constexpr const char* kSendToDevice = "accelerate::send_to_device";
constexpr const char* kCallEnd = "accelerate::call_end";

// The mapped module whose call an op belongs to: the assignment covering its scope (the whole model's, "", only
// when the map puts everything on one device).
struct MappedCall {
  std::string module;
  int device = 0;
};

class Placement {
 public:
  explicit Placement(const AutoDeviceMap& map)
      : map_(map), main_(map.placement.empty() ? 0 : map.placement.front().device) {
    for (const DeviceAssignment& a : map.placement) {
      if (a.device < 0) {
        throw ConfigError("device_map=\"auto\" offloads " + (a.name.empty() ? std::string("the model") : a.name) +
                          " to the " + (a.device == kCpuDevice ? "CPU" : "disk") +
                          ": the model does not fit the GPUs (offloaded layers are not modelled)");
      }
    }
  }
  std::optional<MappedCall> CallOf(const std::string& scope) const {
    std::optional<MappedCall> best;
    for (const DeviceAssignment& a : map_.placement) {
      const bool covers = a.name.empty() || scope == a.name || scope.starts_with(a.name + ".");
      if (covers && (!best || a.name.size() >= best->module.size())) best = MappedCall{a.name, a.device};
    }
    return best;
  }
  int DeviceOf(const std::string& path) const { return map_.DeviceOf(path).value_or(main_); }
  // dispatch_model's main device: the first one of the map (GPU 0 unless it holds nothing). The inputs are put
  // there (`inputs.to(model.device)`), the model's outputs come back there, and generate()'s loop runs there.
  int main() const { return main_; }

 private:
  const AutoDeviceMap& map_;
  int main_;
};

// generate()'s own work after the forward (graph/generation_forward.h): on the device of its input ids.
bool InGenerationLoop(const OpNode& n) { return n.kind.starts_with("hf::") || n.scope == "generate"; }

}  // namespace

DeviceMapForward PlaceOnDevices(const Graph& g, const AutoDeviceMap& map,
                                const std::vector<ValueId>& cache_inputs) {
  const Placement place(map);
  // Devices of the base graph's values, then of the rewriter's new ones (appended).
  std::unordered_map<int32_t, int> device;
  for (const Parameter& p : g.params()) device[p.value.index] = place.DeviceOf(p.name);
  // A cache entry read by a layer lives on that layer's device; every other input comes with the ids (on the main
  // device).
  for (ValueId in : g.inputs()) device[in.index] = place.main();
  // A tensor constant of the trace is made where the code runs (a Python scalar in the model's code): never copied.
  std::set<int32_t> anywhere;
  for (const TensorValue& v : g.values()) {
    if (!v.producer.valid() && v.role != ValueRole::kParameter && !device.count(v.id.index)) {
      anywhere.insert(v.id.index);
    }
  }
  std::set<int32_t> undecided;
  for (ValueId v : cache_inputs) undecided.insert(v.index);
  for (const OpNode& n : g.nodes()) {
    for (ValueId in : g.tensor_inputs(n.id)) {
      if (!undecided.count(in.index)) continue;
      if (const auto call = place.CallOf(n.scope)) device[in.index] = call->device;
      undecided.erase(in.index);
    }
  }

  GraphRewriter rw(g);
  ValueId loss = g.loss();
  std::optional<MappedCall> open;       // the mapped module whose call the last op belonged to
  std::map<int32_t, ValueId> copies;    // in that call: original -> its copy on the call's device
  const OpNode* last_in_call = nullptr;
  int copy_count = 0;
  const auto close = [&] {
    if (!open || copies.empty()) {
      open.reset();
      copies.clear();
      return;
    }
    std::vector<OpArg> args;
    for (const auto& [orig, copy] : copies) args.push_back(TensorArg(copy));
    OpNode end = GraphRewriter::NewNode(*last_in_call, kCallEnd, open->module, std::move(args), ValueId{});
    end.outputs.clear();
    rw.Emit(std::move(end));
    open.reset();
    copies.clear();
  };
  std::map<int32_t, ValueId> loop_copies;  // the root's copies of the model's outputs to the main device
  for (const OpNode& old : g.nodes()) {
    OpNode n = old;
    if (n.kind == kSendToDevice) {  // a placed graph's own copy: keep it
      close();
      const int to = static_cast<int>(n.args.at(1).int_value);
      for (ValueId out : n.outputs) device[out.index] = to;
      rw.Emit(std::move(n));
      continue;
    }
    const bool loop = InGenerationLoop(n);
    const std::optional<MappedCall> call = loop ? std::nullopt : place.CallOf(n.scope);
    if (open && (!call || call->module != open->module || n.kind == kCallEnd)) close();
    if (n.kind == kCallEnd) {
      rw.Emit(std::move(n));
      continue;
    }
    if (call && !open) open = call;
    int d = place.main();
    if (call) {
      d = call->device;
    } else if (!loop) {
      for (ValueId in : g.tensor_inputs(old.id)) {
        if (anywhere.count(in.index)) continue;
        d = device[in.index];
        break;
      }
    }
    if (call || loop) {
      for (OpArg& arg : n.args) {
        for (ValueId& v : arg.tensors) {
          if (anywhere.count(v.index) || g.value(v).role == ValueRole::kParameter) continue;
          if (device[v.index] == d) continue;
          auto& made = loop ? loop_copies : copies;
          auto it = made.find(v.index);
          if (it == made.end()) {
            const TensorValue& tv = g.value(v);
            const ValueId copy = rw.NewValue(tv.name + " on cuda:" + std::to_string(d) + " #" +
                                                 std::to_string(++copy_count),
                                             tv.shape, tv.dtype, tv.dtype_bf16_weights);
            device[copy.index] = d;
            // The root's post-forward runs in its own frame (""); a mapped module's pre-forward in the module's.
            rw.Emit(GraphRewriter::NewNode(old, kSendToDevice, loop ? "" : call->module,
                                           {TensorArg(v), IntArg(d)}, copy));
            it = made.emplace(v.index, copy).first;
            if (loop && v == loss) loss = copy;  // the logits generate() reads are the copy
          }
          v = it->second;
        }
      }
    }
    // A view of a copied argument is a view of the copy.
    for (ValueId out : n.outputs) {
      device[out.index] = d;
      TensorValue& v = rw.value(out);
      if (!v.alias_of.valid() || static_cast<size_t>(v.alias_of.index) >= g.values().size()) continue;
      const ValueId root = g.StorageRoot(v.alias_of);
      for (const auto& [orig, copy] : loop ? loop_copies : copies) {
        if (g.StorageRoot(ValueId{orig}) == root) v.alias_of = copy;
      }
    }
    rw.Emit(std::move(n));
    last_in_call = &old;
  }
  close();

  DeviceMapForward out;
  std::vector<int> base_devices(rw.values().size(), 0);
  for (size_t i = 0; i < base_devices.size(); ++i) {
    if (const auto it = device.find(static_cast<int32_t>(i)); it != device.end()) base_devices[i] = it->second;
  }
  std::vector<int> op_device;
  op_device.reserve(rw.nodes().size());
  for (const OpNode& n : rw.nodes()) {
    int d = place.main();
    if (n.kind == kSendToDevice) {
      d = static_cast<int>(n.args.at(1).int_value);
    } else if (!n.outputs.empty()) {
      d = base_devices[static_cast<size_t>(n.outputs[0].index)];
    } else if (const auto call = place.CallOf(n.scope)) {
      d = call->device;
    }
    op_device.push_back(d);
  }
  // Values keep their producer's device; inputs and parameters are found again by name after renumbering.
  std::map<std::string, int> by_name;
  for (ValueId in : g.inputs()) by_name[g.value(in).name] = base_devices[static_cast<size_t>(in.index)];
  for (const Parameter& p : g.params()) by_name[p.name] = base_devices[static_cast<size_t>(p.value.index)];
  out.graph = rw.Build(g.inputs(), loss);
  out.op_device = std::move(op_device);
  out.value_device.assign(out.graph.values().size(), place.main());
  for (const TensorValue& v : out.graph.values()) {
    if (v.producer.valid()) {
      out.value_device[static_cast<size_t>(v.id.index)] = out.op_device[static_cast<size_t>(v.producer.index)];
    } else if (const auto it = by_name.find(v.name); it != by_name.end()) {
      out.value_device[static_cast<size_t>(v.id.index)] = it->second;
    }
  }
  return out;
}

namespace {

// One GPU's memory: what its ops allocate, its parameters and inputs.
class DeviceShareHooks : public sim::StepHooks {
 public:
  DeviceShareHooks(const DeviceMapForward& f, int device) : f_(f), device_(device) {}
  int64_t ResidentParamBytes(const Parameter& p, int64_t full_bytes) const override {
    return f_.value_device[static_cast<size_t>(p.value.index)] == device_ ? full_bytes : 0;
  }
  bool RunsOnThisDevice(const OpNode& node) const override {
    return f_.op_device[static_cast<size_t>(node.id.index)] == device_;
  }
  bool InputOnThisDevice(const TensorValue& input) const override {
    return f_.value_device[static_cast<size_t>(input.id.index)] == device_;
  }

 private:
  const DeviceMapForward& f_;
  int device_;
};

}  // namespace

sim::GenerationForwardSimulator DeviceMapGenerationForward(const AutoDeviceMap& map, int device) {
  return [map, device](GenerationForward& fw, const sim::TrainingConfig& config) {
    const auto names = [&](const std::vector<ValueId>& ids) {
      std::vector<std::string> n;
      for (ValueId v : ids) n.push_back(fw.graph.value(v).name);
      return n;
    };
    const std::vector<std::string> past = names(fw.past), present = names(fw.present);
    DeviceMapForward placed = PlaceOnDevices(fw.graph, map, fw.past);
    fw.graph = std::move(placed.graph);
    std::map<std::string, ValueId> by_name;
    for (const TensorValue& v : fw.graph.values()) by_name.emplace(v.name, v.id);
    fw.past.clear();
    fw.present.clear();
    for (const std::string& n : past) fw.past.push_back(by_name.at(n));
    for (const std::string& n : present) fw.present.push_back(by_name.at(n));
    fw.logits = fw.graph.loss();
    placed.graph = Graph();
    DeviceShareHooks hooks(placed, device);
    return sim::SimulateGenerationForward(fw, config, &hooks);
  };
}

}  // namespace llmem::dist
