// The export's nn.Module hierarchy, as accelerate reads it to place a model over devices: every module with its
// class, its own parameters then buffers, and its children, in nn.Module's order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/dtype.h"

namespace llmem {

struct ModuleTensor {
  std::string name;  // dotted, from the root: "model.layers.0.self_attn.q_proj.weight"
  int64_t numel = 0;
  DType dtype = DType::kF32;
  bool is_parameter = true;  // false for a buffer
  // A tied weight's first name in named_parameters() order ("model.embed_tokens.weight" for "lm_head.weight");
  // empty when the tensor is its own.
  std::string tied_to;
};

struct ModuleNode {
  std::string name;        // dotted path; "" for the root
  std::string class_name;  // "LlamaDecoderLayer"
  std::vector<ModuleTensor> tensors;  // its own: parameters, then buffers
  std::vector<int> children;          // indices into ModuleTree::modules, in registration order
};

struct ModuleTree {
  std::vector<ModuleNode> modules;  // modules[0] is the root; a parent comes before its children
};

}  // namespace llmem
