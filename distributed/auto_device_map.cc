#include "distributed/auto_device_map.h"

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <unordered_map>

#include "graph/error.h"

namespace llmem::dist {
namespace {

bool IsFloatingOrComplex(DType d) { return IsFloating(d) || d == DType::kComplex64; }

// Names as accelerate sees them: relative to the loaded model (the tree's root may be a wrapper around it).
class RootNames {
 public:
  RootNames(const ModuleTree& tree, int root) : prefix_(tree.modules.at(static_cast<size_t>(root)).name) {}
  bool Inside(const std::string& full) const {
    return prefix_.empty() || full == prefix_ || full.starts_with(prefix_ + ".");
  }
  std::string Relative(const std::string& full) const {
    return prefix_.empty() ? full : full == prefix_ ? "" : full.substr(prefix_.size() + 1);
  }
  std::string Full(const std::string& relative) const {
    return prefix_.empty() ? relative : relative.empty() ? prefix_ : prefix_ + "." + relative;
  }

 private:
  std::string prefix_;
};

// compute_module_sizes: every tensor once (named_parameters then named_buffers, duplicates under a later name
// dropped), added to each of its dotted prefixes. Keys keep their first-insertion order, as the Python dict does.
// Sizes are in bits: accelerate's dtype_byte_size counts a bool as 1/8 byte (GPT-2's causal-mask buffers).
class ModuleSizes {
 public:
  ModuleSizes(const ModuleTree& tree, const RootNames& names, std::optional<DType> dtype) {
    for (bool parameters : {true, false}) {
      for (const ModuleNode& m : tree.modules) {  // a parent before its children: named_modules() order
        if (!names.Inside(m.name)) continue;
        for (const ModuleTensor& full : m.tensors) {
          if (full.is_parameter != parameters || !full.tied_to.empty()) continue;
          ModuleTensor t = full;
          t.name = names.Relative(full.name);
          int64_t element = t.dtype == DType::kBool ? 1 : 8 * ElementSize(t.dtype);
          if (dtype && IsFloatingOrComplex(t.dtype)) element = std::min(element, 8 * ElementSize(*dtype));
          const int64_t bytes = CheckedMul(t.numel, element, "a module's size");  // bits
          Add("", bytes);
          for (size_t dot = t.name.find('.'); dot != std::string::npos; dot = t.name.find('.', dot + 1)) {
            Add(t.name.substr(0, dot), bytes);
          }
          Add(t.name, bytes);
        }
      }
    }
  }
  // In bits; defaultdict(int): a name never sized is 0.
  int64_t operator[](const std::string& name) const {
    const auto it = sizes_.find(name);
    return it == sizes_.end() ? 0 : it->second;
  }
  const std::vector<std::string>& keys() const { return keys_; }

 private:
  void Add(const std::string& name, int64_t bytes) {
    auto [it, added] = sizes_.emplace(name, 0);
    if (added) keys_.push_back(name);
    it->second = CheckedAdd(it->second, bytes, "a module's size");
  }
  std::unordered_map<std::string, int64_t> sizes_;
  std::vector<std::string> keys_;
};

// get_module_leaves: the names (not "") none of whose keys is a child ("a.b" is a child of "a"; top-level names
// are nobody's child).
std::vector<std::string> Leaves(const std::vector<std::string>& keys) {
  std::unordered_map<std::string, int> children;
  for (const std::string& k : keys) {
    const size_t dot = k.rfind('.');
    if (k.empty() || dot == std::string::npos) continue;
    ++children[k.substr(0, dot)];
  }
  std::vector<std::string> leaves;
  for (const std::string& k : keys) {
    if (!k.empty() && children.count(k) == 0) leaves.push_back(k);
  }
  return leaves;
}

// One entry of accelerate's modules_to_treat: a module (its tree index) or a tensor (module -1).
struct Item {
  std::string name;
  int module = -1;
};

class Walk {
 public:
  Walk(const AutoDeviceMapRequest& r, const RootNames& names, const ModuleSizes& sizes)
      : r_(r), tree_(*r.tree), names_(names), sizes_(sizes) {
    // find_tied_parameters: the names of each shared parameter, sorted.
    std::map<std::string, std::vector<std::string>> groups;
    for (const ModuleNode& m : tree_.modules) {
      if (!names_.Inside(m.name)) continue;
      for (const ModuleTensor& t : m.tensors) {
        if (t.is_parameter && !t.tied_to.empty()) groups[names_.Relative(t.tied_to)].push_back(names_.Relative(t.name));
      }
    }
    for (auto& [first, others] : groups) {
      others.push_back(first);
      std::sort(others.begin(), others.end());
      others.erase(std::unique(others.begin(), others.end()), others.end());
      tied_.push_back(others);
    }
  }

  bool NoSplit(const Item& item) const {
    if (item.module < 0) return true;
    const ModuleNode& m = tree_.modules[static_cast<size_t>(item.module)];
    return m.children.empty() || std::find(r_.no_split_classes.begin(), r_.no_split_classes.end(), m.class_name) !=
                                     r_.no_split_classes.end();
  }
  bool ClassIsNoSplit(const Item& item) const {
    return item.module >= 0 && std::find(r_.no_split_classes.begin(), r_.no_split_classes.end(),
                                         tree_.modules[static_cast<size_t>(item.module)].class_name) !=
                                   r_.no_split_classes.end();
  }
  // named_children with the parent's prefix.
  std::vector<Item> Children(const Item& item) const {
    std::vector<Item> out;
    if (item.module < 0) return out;
    for (int c : tree_.modules[static_cast<size_t>(item.module)].children) {
      out.push_back({names_.Relative(tree_.modules[static_cast<size_t>(c)].name), c});
    }
    return out;
  }
  // named_parameters(recurse=False) of a module, as items (a tied name included: named_parameters keeps it here).
  std::vector<Item> OwnParameters(const Item& item) const {
    std::vector<Item> out;
    if (item.module < 0) return out;
    for (const ModuleTensor& t : tree_.modules[static_cast<size_t>(item.module)].tensors) {
      if (t.is_parameter) out.push_back({names_.Relative(t.name), -1});
    }
    return out;
  }

  // get_max_layer_size over `items` (tensors count as layers).
  std::pair<int64_t, std::vector<std::string>> MaxLayer(std::deque<Item> items, bool modules_only) const {
    int64_t max_size = 0;
    std::vector<std::string> names;
    if (modules_only) {
      std::erase_if(items, [](const Item& i) { return i.module < 0; });
    }
    while (!items.empty()) {
      const Item item = items.front();
      items.pop_front();
      const std::vector<Item> children = Children(item);
      if (children.empty() || ClassIsNoSplit(item)) {
        const int64_t size = sizes_[item.name];
        if (size > max_size) {
          max_size = size;
          names = {item.name};
        } else if (size == max_size) {
          names.push_back(item.name);
        }
      } else {
        items.insert(items.begin(), children.begin(), children.end());
      }
    }
    return {max_size, names};
  }

  // Sizes and memory in bits (ModuleSizes); `max_memory` in bytes.
  AutoDeviceMap Run(std::vector<int64_t> max_memory) {
    AutoDeviceMap out;
    out.max_memory = max_memory;
    const int gpus = static_cast<int>(max_memory.size());
    // devices: the GPUs, "cpu", "disk"; the main devices (room kept for the largest layer): GPU 0 and the CPU.
    std::vector<int> devices;
    for (int g = 0; g < gpus; ++g) devices.push_back(g);
    devices.push_back(kCpuDevice);
    devices.push_back(kDiskDevice);
    const auto max_of = [&](int device) -> std::optional<int64_t> {
      if (device == kDiskDevice) return std::nullopt;
      return CheckedMul(device == kCpuDevice ? r_.cpu_bytes : max_memory[static_cast<size_t>(device)], 8,
                        "a device's memory");
    };
    const auto is_main = [&](int device) { return device == 0 || device == kCpuDevice; };
    std::map<int, int64_t> used;

    const Item root{"", r_.root};
    std::deque<Item> todo;
    for (const Item& p : OwnParameters(root)) todo.push_back(p);
    for (const Item& c : Children(root)) todo.push_back(c);
    for (const ModuleTensor& t : tree_.modules[static_cast<size_t>(r_.root)].tensors) {
      if (!t.is_parameter) todo.push_back({names_.Relative(t.name), -1});
    }
    size_t current = 0;
    auto [max_layer_size, max_layer_names] = MaxLayer(todo, false);
    while (!todo.empty()) {
      const Item item = todo.front();
      todo.pop_front();
      const std::string& name = item.name;
      std::erase_if(max_layer_names, [&](const std::string& n) { return n == name || n.starts_with(name + "."); });
      if (max_layer_names.empty()) std::tie(max_layer_size, max_layer_names) = MaxLayer(todo, true);
      const int64_t module_size = sizes_[name];
      // The tied parameters outside this module of the groups it holds part of (accelerate's substring test).
      const auto contains = [&](const std::string& k) { return (k + ".").find(name + ".") != std::string::npos; };
      std::vector<std::string> tied_params;
      for (const auto& group : tied_) {
        const bool any = std::any_of(group.begin(), group.end(), contains);
        const bool all = std::all_of(group.begin(), group.end(), contains);
        if (!any || all) continue;
        for (const std::string& p : group) {
          if (!contains(p)) tied_params.push_back(p);
        }
      }
      const int device = devices[current];
      std::optional<int64_t> current_max = max_of(device);
      int64_t reserved = 0;
      if (is_main(device) && current_max) {
        *current_max -= max_layer_size;
        reserved = max_layer_size;
      }
      // get_module_size_with_ties: each tied parameter's holder among the modules still to place.
      int64_t with_ties = module_size;
      std::vector<Item> tied_modules;
      for (const std::string& p : tied_params) {
        const auto it = std::find_if(todo.begin(), todo.end(),
                                     [&](const Item& i) { return p == i.name || p.starts_with(i.name + "."); });
        if (it == todo.end()) {
          throw ConfigError("device_map=\"auto\": the tied weight " + p + " of " + name +
                            " is in no module left to place (accelerate fails here too)");
        }
        tied_modules.push_back(*it);
        with_ties += sizes_[it->name] - sizes_[p];
      }
      int64_t& device_used = used[device];
      if (!current_max || device_used + with_ties <= *current_max) {
        device_used += with_ties;
        out.placement.push_back({name, device});
        for (const Item& t : tied_modules) {
          const auto it = std::find_if(todo.begin(), todo.end(), [&](const Item& i) { return i.name == t.name; });
          if (it != todo.end()) todo.erase(it);
          out.placement.push_back({t.name, device});
        }
        continue;
      }
      if (!tied_params.empty() && device_used + module_size <= *current_max) {
        // Split the first tied module that can be split, keeping this module first.
        bool split = false;
        for (const Item& t : tied_modules) {
          if (Children(t).empty() || ClassIsNoSplit(t)) continue;
          std::vector<Item> parts = OwnParameters(t);
          for (const Item& c : Children(t)) parts.push_back(c);
          const auto at = std::find_if(todo.begin(), todo.end(), [&](const Item& i) { return i.name == t.name; });
          const auto index = at - todo.begin();
          std::deque<Item> next{item};
          next.insert(next.end(), todo.begin(), todo.begin() + index);
          next.insert(next.end(), parts.begin(), parts.end());
          next.insert(next.end(), todo.begin() + index + 1, todo.end());
          todo = std::move(next);
          std::tie(max_layer_size, max_layer_names) = MaxLayer(todo, true);
          split = true;
          break;
        }
        if (split) continue;
      }
      if (device_used + module_size >= *current_max && !NoSplit(item)) {
        std::vector<Item> parts = OwnParameters(item);
        for (const Item& c : Children(item)) parts.push_back(c);
        todo.insert(todo.begin(), parts.begin(), parts.end());
        std::tie(max_layer_size, max_layer_names) = MaxLayer(todo, true);
        continue;
      }
      device_used += reserved;
      if (++current >= devices.size()) throw ConfigError("device_map=\"auto\": no device left for " + name);
      todo.push_front(item);
    }
    return out;
  }

 private:
  const AutoDeviceMapRequest& r_;
  const ModuleTree& tree_;
  const RootNames& names_;
  const ModuleSizes& sizes_;
  std::vector<std::vector<std::string>> tied_;
};

}  // namespace

std::optional<int> AutoDeviceMap::DeviceOf(const std::string& path) const {
  std::optional<int> device;
  size_t best = 0;
  for (const DeviceAssignment& a : placement) {
    const bool covers = a.name.empty() || path == a.name || path.starts_with(a.name + ".");
    if (covers && (!device || a.name.size() >= best)) {
      device = a.device;
      best = a.name.size();
    }
  }
  return device;
}

AutoDeviceMap InferAutoDeviceMap(const AutoDeviceMapRequest& r) {
  if (!r.tree || r.tree->modules.empty() || r.root < 0 || static_cast<size_t>(r.root) >= r.tree->modules.size()) {
    throw ConfigError("device_map=\"auto\": the export has no module tree");
  }
  const RootNames names(*r.tree, r.root);
  const int gpus = static_cast<int>(r.gpu_free_bytes.size());
  if (gpus < 1) throw ConfigError("device_map=\"auto\" needs at least one GPU");
  const ModuleSizes sizes(*r.tree, names, r.dtype);
  std::vector<int64_t> max_memory = r.gpu_free_bytes;
  // get_balanced_memory (from_pretrained passes no max_memory).
  if (gpus == 1) {
    max_memory[0] = static_cast<int64_t>(static_cast<double>(max_memory[0]) * 0.9);  // 90 % "for the buffer"
  } else {
    const int64_t total_bits = sizes[""];
    int64_t per_gpu = total_bits / (int64_t{8} * gpus);  // module_sizes[""] // num_devices
    // The first module of each no-split class met in module_sizes' order.
    std::unordered_map<std::string, int> index;
    for (size_t i = 0; i < r.tree->modules.size(); ++i) {
      if (names.Inside(r.tree->modules[i].name)) index[names.Relative(r.tree->modules[i].name)] = static_cast<int>(i);
    }
    std::map<std::string, int64_t> no_split_children;
    for (const std::string& name : sizes.keys()) {
      if (name.empty()) continue;
      const auto it = index.find(name);
      if (it == index.end()) continue;  // a tensor
      const std::string& cls = r.tree->modules[static_cast<size_t>(it->second)].class_name;
      if (std::find(r.no_split_classes.begin(), r.no_split_classes.end(), cls) != r.no_split_classes.end()) {
        no_split_children.emplace(cls, sizes[name]);
      }
      const std::set<std::string> classes(r.no_split_classes.begin(), r.no_split_classes.end());
      if (no_split_children.size() == classes.size()) break;
    }
    int64_t buffer_bits = 0;
    for (const auto& [cls, bits] : no_split_children) buffer_bits = std::max(buffer_bits, bits);
    // The mean size of the final modules: the leaves once the tensors (the first leaves) are dropped.
    const std::vector<std::string> tensor_leaves = Leaves(sizes.keys());
    const std::set<std::string> dropped(tensor_leaves.begin(), tensor_leaves.end());
    std::vector<std::string> modules;
    for (const std::string& k : sizes.keys()) {
      if (!dropped.count(k)) modules.push_back(k);
    }
    const std::vector<std::string> leaves = Leaves(modules);
    double sum = 0;
    for (const std::string& l : leaves) sum += static_cast<double>(sizes[l]) / 8;
    const int64_t mean_leaves =
        static_cast<int64_t>(sum / static_cast<double>(std::max<size_t>(leaves.size(), 1)));
    const int64_t buffer = static_cast<int64_t>(
        1.25 * std::max(static_cast<double>(buffer_bits) / 8, static_cast<double>(mean_leaves)));
    per_gpu += buffer;
    for (int g = 0; g + 1 < gpus; ++g) {
      int64_t& m = max_memory[static_cast<size_t>(g)];
      m = std::min(per_gpu, m);
    }
  }
  // transformers' _get_device_map gives back what the caching allocator holds unused.
  for (int64_t& m : max_memory) m = CheckedAdd(m, r.unused_reserved_bytes, "a GPU's memory");
  Walk walk(r, names, sizes);
  AutoDeviceMap map = walk.Run(std::move(max_memory));
  for (DeviceAssignment& a : map.placement) a.name = names.Full(a.name);
  return map;
}

}  // namespace llmem::dist
