// accelerate's device_map="auto" placement on hand-built module trees, each figure worked by hand from accelerate
// 1.16's get_balanced_memory and infer_auto_device_map (the tiny exports are compared with accelerate itself by
// scripts/device_map_check.py, tests/cli/test_cli_device_map.py).
#include "distributed/auto_device_map.h"

#include <gtest/gtest.h>

#include <map>

#include "graph/error.h"

namespace llmem::dist {
namespace {

int Add(ModuleTree& t, int parent, const std::string& name, const std::string& cls) {
  t.modules.push_back({name, cls, {}, {}});
  const int i = static_cast<int>(t.modules.size()) - 1;
  if (parent >= 0) t.modules[static_cast<size_t>(parent)].children.push_back(i);
  return i;
}

void Tensor(ModuleTree& t, int module, const std::string& name, int64_t numel, DType dtype = DType::kF32,
            bool parameter = true, const std::string& tied_to = "") {
  t.modules[static_cast<size_t>(module)].tensors.push_back({name, numel, dtype, parameter, tied_to});
}

// A decoder in miniature under `prefix`: an embedding of 400 B, four 1,000 B blocks (the no-split class) in a
// container, a 40 B norm, and a head tied to the embedding.
ModuleTree Decoder(const std::string& prefix = "") {
  ModuleTree t;
  int root = Add(t, -1, "", "Wrapper");
  const auto at = [&](const std::string& n) { return prefix.empty() ? n : prefix + "." + n; };
  if (!prefix.empty()) root = Add(t, root, prefix, "Model");
  Tensor(t, Add(t, root, at("embed"), "Embedding"), at("embed.weight"), 100);
  const int layers = Add(t, root, at("layers"), "ModuleList");
  for (int i = 0; i < 4; ++i) {
    const std::string block = at("layers." + std::to_string(i));
    const int b = Add(t, layers, block, "Block");
    Tensor(t, Add(t, b, block + ".lin", "Linear"), block + ".lin.weight", 250);
  }
  Tensor(t, Add(t, root, at("norm"), "Norm"), at("norm.weight"), 10);
  Tensor(t, Add(t, root, at("head"), "Linear"), at("head.weight"), 100, DType::kF32, true, at("embed.weight"));
  return t;
}

std::map<std::string, int> Devices(const AutoDeviceMap& m) {
  std::map<std::string, int> out;
  for (const DeviceAssignment& a : m.placement) out[a.name] = a.device;
  return out;
}

// module_sizes: "" 4,440 B (the tied head counts once). get_balanced_memory: 4,440 // 2 = 2,220 plus 1.25 x
// max(first block 1,000, mean of the 6 leaf modules 740) = 1,250: GPU 0 gets 3,470, the last GPU keeps its own.
// infer_auto_device_map: GPU 0 keeps room for the largest layer (1,000): the embedding (and its tied head, placed
// with it), then the container is split and blocks 0 and 1 fit (2,400 <= 2,470); block 2 starts GPU 1.
TEST(AutoDeviceMapTest, BalancesTwoGpusAsAccelerate) {
  const ModuleTree tree = Decoder();
  const AutoDeviceMap m = InferAutoDeviceMap(
      {.tree = &tree, .no_split_classes = {"Block"}, .gpu_free_bytes = {10000, 10000}, .cpu_bytes = 1 << 20});
  EXPECT_EQ(m.max_memory, (std::vector<int64_t>{3470, 10000}));
  EXPECT_EQ(Devices(m), (std::map<std::string, int>{{"embed", 0}, {"head", 0}, {"layers.0", 0}, {"layers.1", 0},
                                                     {"layers.2", 1}, {"layers.3", 1}, {"norm", 1}}));
  EXPECT_EQ(m.DeviceOf("layers.1.lin.weight"), 0);
  EXPECT_EQ(m.DeviceOf("layers.3"), 1);
  EXPECT_EQ(m.DeviceOf("elsewhere"), std::nullopt);
}

// The same model inside an export's wrapper: accelerate sees the wrapped model; the names keep the prefix.
TEST(AutoDeviceMapTest, PlacesTheWrappedModel) {
  const ModuleTree tree = Decoder("model");
  const AutoDeviceMap m = InferAutoDeviceMap({.tree = &tree, .root = 1, .no_split_classes = {"Block"},
                                              .gpu_free_bytes = {10000, 10000}, .cpu_bytes = 1 << 20,
                                              .unused_reserved_bytes = 7});
  EXPECT_EQ(m.max_memory, (std::vector<int64_t>{3477, 10007}));
  EXPECT_EQ(m.DeviceOf("model.layers.1.lin.weight"), 0);
  EXPECT_EQ(m.DeviceOf("model.layers.2"), 1);
  EXPECT_EQ(m.DeviceOf("model.head.weight"), 0);
}

// accelerate's dtype_byte_size counts a bool as 1/8 byte, and a floating tensor at most as wide as the load dtype.
// a: 100 fp32 (400 B, 200 B in bf16); b: 800 bools (100 B). Two GPUs: total / 2 + 1.25 x the mean of the 2 leaves.
TEST(AutoDeviceMapTest, SizesBoolsInBitsAndFloatsInTheLoadDtype) {
  ModuleTree tree;
  const int root = Add(tree, -1, "", "M");
  Tensor(tree, Add(tree, root, "a", "Linear"), "a.weight", 100);
  Tensor(tree, Add(tree, root, "b", "Mask"), "b.mask", 800, DType::kBool, false);
  const auto first = [&](std::optional<DType> dtype) {
    return InferAutoDeviceMap({.tree = &tree, .dtype = dtype, .gpu_free_bytes = {10000, 10000}, .cpu_bytes = 1 << 20})
        .max_memory[0];
  };
  EXPECT_EQ(first(std::nullopt), 250 + 312);    // 500 // 2, int(1.25 x 250)
  EXPECT_EQ(first(DType::kBF16), 150 + 187);    // 300 // 2, int(1.25 x 150)
}

// One GPU: from_pretrained's 90 % of it; what does not fit the GPUs goes to the CPU.
TEST(AutoDeviceMapTest, OneGpuKeepsATenthAndOffloadsTheRest) {
  const ModuleTree tree = Decoder();
  const AutoDeviceMap m = InferAutoDeviceMap(
      {.tree = &tree, .no_split_classes = {"Block"}, .gpu_free_bytes = {3000}, .cpu_bytes = 1 << 20});
  EXPECT_EQ(m.max_memory, (std::vector<int64_t>{2700}));
  // GPU 0 keeps 1,000 for the largest layer: embedding + head, then one block (1,400 <= 1,700); the rest to the CPU.
  const auto d = Devices(m);
  EXPECT_EQ(d.at("layers.0"), 0);
  EXPECT_EQ(d.at("layers.1"), kCpuDevice);
  EXPECT_EQ(d.at("norm"), kCpuDevice);
}

TEST(AutoDeviceMapTest, BadRequestsAreConfigErrors) {
  const ModuleTree tree = Decoder();
  EXPECT_THROW(InferAutoDeviceMap({.tree = &tree, .gpu_free_bytes = {}}), ConfigError);
  EXPECT_THROW(InferAutoDeviceMap({.tree = nullptr, .gpu_free_bytes = {100}}), ConfigError);
  EXPECT_THROW(InferAutoDeviceMap({.tree = &tree, .root = 99, .gpu_free_bytes = {100}}), ConfigError);
}

}  // namespace
}  // namespace llmem::dist
