// Where Hugging Face's from_pretrained(device_map="auto") puts each module over several GPUs: accelerate's
// get_balanced_memory then infer_auto_device_map (accelerate 1.16, utils/modeling.py; called by transformers 4.57's
// _get_device_map), on the export's module tree.
//
// Note [Balanced device map]
// get_balanced_memory caps every GPU but the last at the model's size / GPUs plus a buffer: 1.25 x the larger of
// the first no-split block (the decoder layer) and the mean leaf module. infer_auto_device_map then walks the
// model's children in order, filling GPU 0, then 1, ...: a module that does not fit is split into its own
// parameters and children unless its class is a no-split one (then the next device starts with it); GPU 0 (the
// main device) keeps room for the largest layer still to place; a module with a tied weight is placed with the
// module holding the tie (GPT-2's LM head goes where the embedding goes). Module sizes count every parameter and
// buffer once (a tied weight under its first name), floating ones at most as wide as the load dtype. What does
// not fit the GPUs would go to the CPU, then disk (llmem refuses those: offloaded layers are not modelled).
// The GPUs' memory is what get_max_memory reads: torch.cuda.mem_get_info's free bytes after each device's CUDA
// context and the 2 MiB segment of its probe tensor, to which _get_device_map adds back that unused reserved
// segment.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "graph/dtype.h"
#include "graph/module_tree.h"

namespace llmem::dist {

constexpr int kCpuDevice = -1;
constexpr int kDiskDevice = -2;

struct AutoDeviceMapRequest {
  const ModuleTree* tree = nullptr;
  int root = 0;                               // the module from_pretrained loads (the export may wrap it)
  std::vector<std::string> no_split_classes;  // _no_split_modules
  std::optional<DType> dtype;                 // from_pretrained's dtype; none: as stored
  std::vector<int64_t> gpu_free_bytes;        // per GPU, as get_max_memory reads it
  int64_t cpu_bytes = 0;                      // host memory offered for offload
  int64_t unused_reserved_bytes = 0;          // per GPU, added back after balancing
};

struct DeviceAssignment {
  std::string name;  // a module or tensor path in the tree ("model.layers.3", "lm_head"), with the root's prefix
  int device = 0;    // GPU index, kCpuDevice or kDiskDevice
};

struct AutoDeviceMap {
  std::vector<int64_t> max_memory;          // per GPU: what infer_auto_device_map was given
  std::vector<DeviceAssignment> placement;  // in the order accelerate assigns them (before clean_device_map)
  // The device of a module or tensor path: the assignment of its longest dotted prefix; nullopt when none covers it.
  std::optional<int> DeviceOf(const std::string& path) const;
};

// Throws ConfigError when the request is malformed (no GPU, no tree) or accelerate's walk fails.
AutoDeviceMap InferAutoDeviceMap(const AutoDeviceMapRequest& request);

}  // namespace llmem::dist
