// Generation with the model placed over several GPUs by from_pretrained(device_map="auto"): each GPU's share of
// every forward.
//
// Note [Device-map forward]
// accelerate's dispatch_model hooks every module of the device map (AlignDevicesHook, accelerate 1.16 hooks.py):
// before the module's forward, each tensor argument on another device is copied to the module's (send_to_device;
// one already there is passed as is) and the copies live as the call's arguments until it returns;
// past_key_values is skipped (transformers' _skip_keys_device_placement), so each layer's cache stays on its
// layer's GPU. Code outside the mapped modules (the model's own forward: masks, position ids) runs where its
// inputs are. The root's hook copies the model's outputs back to its inputs' device (io_same_device): the logits
// come to the main device (the map's first: GPU 0 unless GPU 0 holds nothing), where the inputs are put
// (`inputs.to(model.device)`) and generate()'s loop runs. PlaceOnDevices makes those copies ops of the graph
// (accelerate::send_to_device, with accelerate::call_end reading them when the call returns) and gives every op,
// input and parameter its device; a GPU's estimate is then the one-device simulation counting only what lives
// on it. The GPUs run one after another: nothing overlaps.
#pragma once

#include <vector>

#include "distributed/auto_device_map.h"
#include "graph/graph.h"
#include "simulator/generation_simulator.h"

namespace llmem::dist {

struct DeviceMapForward {
  Graph graph;                    // with the hooks' copies
  std::vector<int> op_device;     // per node
  std::vector<int> value_device;  // per value (parameters, inputs, op outputs)
};

// `graph`'s ops on the devices of `map`; `cache_inputs` are the cache entries it reads (each on the device of the
// layer that reads it). A placed graph comes back unchanged. Throws ConfigError when a module is on the CPU or disk
// (offloading is not modelled).
DeviceMapForward PlaceOnDevices(const Graph& graph, const AutoDeviceMap& map, const std::vector<ValueId>& cache_inputs);

// GPU `device`'s share of each generation forward.
sim::GenerationForwardSimulator DeviceMapGenerationForward(const AutoDeviceMap& map, int device);

}  // namespace llmem::dist
