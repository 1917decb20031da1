#include "graph/exported_program_importer.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "graph/error.h"
#include "graph/json_record.h"
#include "graph/meta_kernels.h"
#include "graph/meta_run.h"
#include "graph/model_file_check.h"

namespace llmem {
namespace {

using nlohmann::json;

// The serialized program's schema (torch/_export/serde/schema.py): the major version this importer reads. Minor
// versions add fields, which are ignored here.
constexpr int kSchemaMajor = 8;
constexpr const char* kModuleTreeFile = "module_tree.json";  // models/program_export.py
// Far past what torch.export nests (a few bodies), and far below what the recursive code that reads, runs and
// frees them can take on a thread's stack.
constexpr size_t kMaxBodyNesting = 100;

std::string ErrorText(const c10::Error& e) { return BriefLoaderReason(e.what_without_backtrace()); }

// schema.py ScalarType -> c10.
std::optional<at::ScalarType> ScalarTypeOf(int64_t code) {
  switch (code) {
    case 1: return at::kByte;
    case 2: return at::kChar;
    case 3: return at::kShort;
    case 4: return at::kInt;
    case 5: return at::kLong;
    case 6: return at::kHalf;
    case 7: return at::kFloat;
    case 8: return at::kDouble;
    case 9: return at::kComplexHalf;
    case 10: return at::kComplexFloat;
    case 11: return at::kComplexDouble;
    case 12: return at::kBool;
    case 13: return at::kBFloat16;
    default: return std::nullopt;
  }
}

// schema.py Layout / MemoryFormat -> c10.
std::optional<at::Layout> LayoutOf(int64_t code) {
  switch (code) {
    case 1: return at::kSparse;
    case 2: return at::kSparseCsr;
    case 3: return at::kSparseCsc;
    case 4: return at::kSparseBsr;
    case 5: return at::kSparseBsc;
    case 6: return at::kMkldnn;
    case 7: return at::kStrided;
    default: return std::nullopt;
  }
}
std::optional<at::MemoryFormat> MemoryFormatOf(int64_t code) {
  switch (code) {
    case 1: return at::MemoryFormat::Contiguous;
    case 2: return at::MemoryFormat::ChannelsLast;
    case 3: return at::MemoryFormat::ChannelsLast3d;
    case 4: return at::MemoryFormat::Preserve;
    default: return std::nullopt;
  }
}

// A member of a JSON object, or null when absent.
const json& Member(const json& j, const char* key) {
  static const json kNull;
  if (!j.is_object()) return kNull;
  const auto it = j.find(key);
  return it == j.end() ? kNull : *it;
}

// A module in the program's nn_module_stack: path from the root, class name, and the Python module defining it.
struct StackEntry {
  std::string path;
  std::string class_name;  // "OPTAttention"
  std::string module;      // "transformers.models.opt.modeling_opt" ("" when the name has no module)
};

// "key,path,module.Class;key,path,module.Class;..." (outermost first), as the serializer joins the node's
// nn_module_stack metadata.
std::vector<StackEntry> ParseModuleStack(const std::string& text) {
  std::vector<StackEntry> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find(';', start);
    if (end == std::string::npos) end = text.size();
    const std::string entry = text.substr(start, end - start);
    start = end + 1;
    const size_t a = entry.find(',');
    const size_t b = a == std::string::npos ? a : entry.find(',', a + 1);
    if (b == std::string::npos) continue;  // the export's placeholder for "no module" has no fields
    StackEntry e;
    e.path = entry.substr(a + 1, b - a - 1);
    const std::string qualified = entry.substr(b + 1);
    const size_t dot = qualified.rfind('.');
    e.class_name = dot == std::string::npos ? qualified : qualified.substr(dot + 1);
    e.module = dot == std::string::npos ? "" : qualified.substr(0, dot);
    out.push_back(std::move(e));
  }
  return out;
}

// The innermost frame's file of a node's stack trace ('File "/x/y.py", line 3, in f' lines, outermost first).
std::string InnermostFile(const std::string& stack_trace) {
  std::string file;
  size_t pos = 0;
  const std::string marker = "File \"";
  while ((pos = stack_trace.find(marker, pos)) != std::string::npos) {
    const size_t begin = pos + marker.size();
    const size_t end = stack_trace.find('"', begin);
    if (end == std::string::npos) break;
    file = stack_trace.substr(begin, end - begin);
    pos = end;
  }
  return file;
}

// One call of the program: its target, its named inputs, its outputs, and where in the model it ran.
struct ProgramNode {
  std::string target;            // "torch.ops.aten.linear.default"
  const json* inputs = nullptr;  // [{name, arg, kind}]
  const json* outputs = nullptr; // [Argument]
  std::string name;
  std::string scope;                    // module path
  std::vector<StackEntry> module_stack; // outermost first, the root excluded
  std::string root_class;               // the exported root's class name (the first call's parent)
  bool in_module_code = false;
  std::optional<c10::OperatorHandle> op;  // ATen targets
  std::string kind;                         // "aten::linear"
  std::string overload;                     // "" for "default"
  // A higher-order op's body (grad mode, autocast): its own nodes, run in place.
  struct Body {
    std::vector<std::string> inputs;  // names bound to the call's tensor operands
    const json* outputs = nullptr;
    std::vector<ProgramNode> nodes;
  };
  std::shared_ptr<Body> body;
  std::optional<bool> grad_enabled;  // wrap_with_set_grad_enabled
};

// The names of the tensors and sizes an Argument reads (nested lists included).
void CollectNames(const json& j, std::unordered_set<std::string>& names) {
  if (j.is_object()) {
    for (const auto& [key, v] : j.items()) {
      if ((key == "name" || key == "as_name") && v.is_string()) names.insert(v.get<std::string>());
      else if (key != "as_graph") CollectNames(v, names);
    }
  } else if (j.is_array()) {
    for (const json& e : j) CollectNames(e, names);
  }
}

// Drops calls whose results nothing reads, as a TorchScript trace has none (torch.jit.trace eliminates dead code):
// an ATen op that writes none of its arguments (schema is_mutable) and makes only values no later call and no output
// reads; repeated until none is left. Eager makes such a tensor and frees it at once (a mask helper's unused
// arange); dropping it keeps one IR for both formats. Higher-order calls keep their bodies as they are.
void RemoveDeadCalls(std::vector<ProgramNode>& nodes, const json& outputs) {
  for (bool changed = true; changed;) {
    changed = false;
    std::unordered_set<std::string> read;
    CollectNames(outputs, read);
    // A call's inputs are named arguments ({name: the schema's, arg}): only the arguments name values.
    const auto read_inputs = [&read](const ProgramNode& n) {
      for (const json& in : *n.inputs) CollectNames(Member(in, "arg"), read);
    };
    for (const ProgramNode& n : nodes) {
      read_inputs(n);
      if (n.body) {
        for (const ProgramNode& b : n.body->nodes) read_inputs(b);
      }
    }
    std::vector<ProgramNode> kept;
    for (ProgramNode& n : nodes) {
      std::unordered_set<std::string> made;
      CollectNames(*n.outputs, made);
      bool used = n.body != nullptr || !n.op || n.op->schema().is_mutable();
      for (const std::string& m : made) used = used || read.count(m) > 0;
      if (used) kept.push_back(std::move(n));
      else changed = true;
    }
    nodes = std::move(kept);
  }
}

}  // namespace

bool IsExportedProgramArchive(const std::string& path) {
  const std::optional<ZipRecord> format = FindArchiveRecord(path, "archive_format");
  if (!format || format->uncompressed_bytes > 16) return false;
  try {
    return ReadRecord(path, *format) == "pt2";
  } catch (const ModelLoadError&) {
    return false;
  }
}

struct ExportedProgramModel::Impl {
  std::string path;
  json program;                       // the serialized ExportedProgram
  std::vector<ProgramNode> nodes;     // the top-level graph's calls
  ModuleTree module_tree;
  ExportRecords records;
  std::unordered_set<std::string> autocast_dtype_casts;  // cast nodes whose autocast target is the 16-bit dtype

  // Placeholders: (program input name, what it is).
  struct Input {
    enum class Kind : uint8_t { kParameter, kBuffer, kConstant, kUser };
    Kind kind = Kind::kUser;
    std::string arg;       // the graph's name for it
    std::string fqn;       // dotted module path of a parameter, buffer or constant
  };
  std::vector<Input> inputs;
  std::unordered_map<std::string, const Input*> inputs_by_fqn;  // parameters, buffers and constants by dotted name
  // 0-dim tensor constants with their values (what a TorchScript trace bakes as CPU scalars), by name.
  std::map<std::string, at::Tensor> scalar_constants;

  // `depth`: how many higher-order op bodies enclose the graph (bounded: the nodes are read, run and freed
  // recursively).
  std::vector<ProgramNode> ReadNodes(const json& graph, size_t depth = 0) const;
  void ReadModuleTree(const std::string& text);
  void ReadAutocastCasts(const std::string& text);
  MetaRun Execute(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype) const;
  // Execute, with a malformed member of the program (json::exception) as ModelLoadError.
  MetaRun Run(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype) const;
  at::Tensor MetaTensorOf(const json& meta, std::optional<at::ScalarType> float_dtype, const std::string& what) const;
};

ExportedProgramModel::ExportedProgramModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExportedProgramModel::ExportedProgramModel(ExportedProgramModel&&) noexcept = default;
ExportedProgramModel& ExportedProgramModel::operator=(ExportedProgramModel&&) noexcept = default;
ExportedProgramModel::~ExportedProgramModel() = default;
const std::string& ExportedProgramModel::path() const { return impl_->path; }
const ModuleTree& ExportedProgramModel::module_tree() const { return impl_->module_tree; }
const ExportRecords& ExportedProgramModel::records() const { return impl_->records; }
ExportRecords& ExportedProgramModel::mutable_records() { return impl_->records; }

std::vector<ProgramNode> ExportedProgramModel::Impl::ReadNodes(const json& graph, size_t depth) const {
  if (depth > kMaxBodyNesting) {
    throw ModelLoadError("the program in " + path + " nests higher-order op bodies more than " +
                         std::to_string(kMaxBodyNesting) + " deep (torch.export nests a few)");
  }
  const json& nodes = Member(graph, "nodes");
  if (!nodes.is_array()) throw ModelLoadError("the program in " + path + " has no node list");
  std::vector<ProgramNode> out;
  for (const json& n : nodes) {
    ProgramNode node;
    const json& target = Member(n, "target");
    node.target = target.is_string() ? target.get<std::string>() : "";
    node.inputs = &Member(n, "inputs");
    node.outputs = &Member(n, "outputs");
    if (!node.inputs->is_array() || !node.outputs->is_array()) {
      throw ModelLoadError("node " + node.target + " of " + path + " has no inputs or outputs list");
    }
    const json& name = Member(n, "name");
    node.name = name.is_string() ? name.get<std::string>() : "";
    const json& metadata = Member(n, "metadata");
    const json& stack = Member(metadata, "nn_module_stack");
    std::vector<StackEntry> entries = ParseModuleStack(stack.is_string() ? stack.get<std::string>() : "");
    // The first entry is the exported root (the loss wrapper), at path "".
    if (!entries.empty() && entries.front().path.empty()) {
      node.root_class = entries.front().class_name;
      entries.erase(entries.begin());
    }
    node.module_stack = entries;
    if (!entries.empty()) node.scope = entries.back().path;
    // The innermost module's own code ran the op when the op's source line is in the file of that module's class
    // ("transformers.models.opt.modeling_opt.OPTAttention" -> .../transformers/models/opt/modeling_opt.py).
    const json& trace = Member(metadata, "stack_trace");
    if (!entries.empty() && !entries.back().module.empty() && trace.is_string()) {
      std::string file = "/" + entries.back().module;
      std::replace(file.begin(), file.end(), '.', '/');
      file += ".py";
      const std::string source = InnermostFile(trace.get<std::string>());
      node.in_module_code = source.size() >= file.size() &&
                            source.compare(source.size() - file.size(), file.size(), file) == 0;
    }
    static const std::string kOps = "torch.ops.";
    if (node.target == "torch.ops.higher_order.wrap_with_set_grad_enabled" ||
        node.target == "torch.ops.higher_order.wrap_with_autocast") {
      node.body = std::make_shared<ProgramNode::Body>();
      for (const json& in : *node.inputs) {
        const json& arg = Member(in, "arg");
        if (const json& g = Member(arg, "as_graph"); !g.is_null()) {
          const json& body = Member(g, "graph");
          node.body->nodes = ReadNodes(body, depth + 1);
          node.body->outputs = &Member(body, "outputs");
          for (const json& b : Member(body, "inputs")) {
            const json& t = Member(Member(b, "as_tensor"), "name");
            node.body->inputs.push_back(t.is_string() ? t.get<std::string>() : "");
          }
        }
      }
      if (node.target.find("set_grad_enabled") != std::string::npos && !node.inputs->empty()) {
        const json& flag = Member(Member((*node.inputs)[0], "arg"), "as_bool");
        if (flag.is_boolean()) node.grad_enabled = flag.get<bool>();
      }
      if (node.body->outputs == nullptr || !node.body->outputs->is_array()) {
        throw ModelLoadError("higher-order op " + node.target + " of " + path + " has no body graph");
      }
    } else if (node.target.rfind(kOps, 0) == 0) {
      // torch.ops.<namespace>.<name>.<overload>
      const std::string rest = node.target.substr(kOps.size());
      const size_t first = rest.find('.'), last = rest.rfind('.');
      if (first == std::string::npos || last == first) {
        throw ModelLoadError("unsupported op target " + node.target + " in " + path);
      }
      node.kind = rest.substr(0, first) + "::" + rest.substr(first + 1, last - first - 1);
      node.overload = rest.substr(last + 1);
      if (node.overload == "default") node.overload.clear();
      const auto handle = c10::Dispatcher::singleton().findSchema({node.kind, node.overload});
      if (!handle) {
        throw ModelLoadError("op " + node.target + " of " + path + " is not an operator this build of LibTorch has");
      }
      node.op = *handle;
    }
    out.push_back(std::move(node));
  }
  return out;
}

void ExportedProgramModel::Impl::ReadModuleTree(const std::string& text) {
  const std::string where = std::string(kModuleTreeFile) + " of " + path;
  const json record = ParseJsonRecord(text, where);
  if (!record.is_object()) throw ModelLoadError(where + " is not a JSON object");
  // Depth first, children in order (the indices a recursive walk would give), on a stack of our own: a crafted tree
  // nested 200,000 deep overflowed the thread's stack when this recursed. Its depth is bounded by the record's JSON
  // nesting (ParseJsonRecord), which the tree's consumers then stay within.
  struct Pending {
    const json* module;
    int parent;
  };
  std::vector<Pending> pending{{&record, -1}};
  while (!pending.empty()) {
    const auto [module, parent] = pending.back();
    pending.pop_back();
    const json& m = *module;
    const int index = static_cast<int>(module_tree.modules.size());
    if (parent >= 0) module_tree.modules[static_cast<size_t>(parent)].children.push_back(index);
    module_tree.modules.push_back({});
    const json& name = Member(m, "name");
    const json& cls = Member(m, "class");
    if (!name.is_string() || !cls.is_string()) throw ModelLoadError(where + ": a module has no name or class");
    module_tree.modules.back().name = name.get<std::string>();
    module_tree.modules.back().class_name = cls.get<std::string>();
    for (const json& t : Member(m, "tensors")) {
      ModuleTensor mt;
      const json& tn = Member(t, "name");
      if (!tn.is_string()) throw ModelLoadError(where + ": a tensor has no name");
      mt.name = tn.get<std::string>();
      mt.is_parameter = Member(t, "parameter").is_boolean() && Member(t, "parameter").get<bool>();
      if (const json& tied = Member(t, "tied_to"); tied.is_string()) mt.tied_to = tied.get<std::string>();
      module_tree.modules[static_cast<size_t>(index)].tensors.push_back(std::move(mt));
    }
    const json& children = Member(m, "children");
    if (!children.is_array()) continue;
    for (auto it = children.rbegin(); it != children.rend(); ++it) pending.push_back({&*it, index});
  }
}

void ExportedProgramModel::Impl::ReadAutocastCasts(const std::string& text) {
  const json record = ParseJsonRecord(text, std::string(kAutocastCastsFile) + " of " + path);
  const json& casts = Member(record, "casts");
  if (!casts.is_object()) throw ModelLoadError(std::string(kAutocastCastsFile) + " of " + path + " has no casts");
  for (const auto& [name, target] : casts.items()) {
    if (target.is_boolean() && target.get<bool>()) autocast_dtype_casts.insert(name);
  }
}

ExportedProgramModel ExportedProgramModel::Load(const std::string& path) {
  try {
    return LoadChecked(path);
  } catch (const json::exception& e) {
    // A member of the wrong type (a hand-edited or damaged program): the serializer never writes one.
    throw ModelLoadError("the program in " + path + " is malformed: " + BriefLoaderReason(e.what()));
  }
}

ExportedProgramModel ExportedProgramModel::LoadChecked(const std::string& path) {
  EnsureMetaKernelsRegistered();
  CheckModelFileReadable(path);
  CheckModelArchive(path);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  std::map<std::string, std::string> extra;
  std::string program_text;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("archive_format")) {
      throw ModelLoadError("not an ExportedProgram: " + path + " is a zip archive without archive_format (save it "
                           "with torch.export.save; a TorchScript export is read by its content, not its name)");
    }
    std::vector<std::string> programs;
    for (const std::string& record : reader.getAllRecords()) {
      if (record.rfind("models/", 0) == 0 && record.size() > 12 && record.compare(record.size() - 5, 5, ".json") == 0) {
        programs.push_back(record);
      }
      if (record.rfind("extra/", 0) == 0) {
        auto [data, size] = reader.getRecord(record);
        extra[record.substr(6)] = std::string(static_cast<const char*>(data.get()), size);
      }
    }
    if (programs.empty()) {
      throw ModelLoadError("not an ExportedProgram: " + path + " has no models/<name>.json (save it with "
                           "torch.export.save)");
    }
    if (programs.size() > 1) {
      throw ModelLoadError(path + " holds " + std::to_string(programs.size()) + " programs; llmem reads an archive "
                           "of one (torch.export.save of one ExportedProgram)");
    }
    auto [data, size] = reader.getRecord(programs.front());
    program_text.assign(static_cast<const char*>(data.get()), size);
    // The values of 0-dim constants (torch.tensor(x) in a forward): the meta run reads them as a trace's scalars.
    if (reader.hasRecord("data/constants/model_constants_config.json")) {
      auto [cdata, csize] = reader.getRecord("data/constants/model_constants_config.json");
      const json config = ParseJsonRecord(std::string_view(static_cast<const char*>(cdata.get()), csize),
                                          "data/constants/model_constants_config.json of " + path);
      std::map<std::string, at::Tensor> pool;
      for (const auto& [name, entry] : Member(config, "config").items()) {
        const json& meta = Member(entry, "tensor_meta");
        const json& file = Member(entry, "path_name");
        const json& code = Member(meta, "dtype");
        const auto st = code.is_number_integer() ? ScalarTypeOf(code.get<int64_t>()) : std::nullopt;
        if (!st || !Member(meta, "sizes").empty() || !file.is_string() ||
            !reader.hasRecord("data/constants/" + file.get<std::string>())) {
          continue;
        }
        auto [bytes, nbytes] = reader.getRecord("data/constants/" + file.get<std::string>());
        at::Tensor t = at::empty({}, at::TensorOptions().dtype(*st));
        if (nbytes != static_cast<size_t>(t.element_size())) continue;  // a meta export keeps no values
        std::memcpy(t.data_ptr(), bytes.get(), nbytes);
        // Equal constants are one tensor, as a trace pools them (each layer's module lifts its own copy).
        const std::string key = std::to_string(static_cast<int>(*st)) + ":" +
                                std::string(static_cast<const char*>(bytes.get()), nbytes);
        auto [pooled, added] = pool.try_emplace(key, t);
        impl->scalar_constants[name] = pooled->second;
      }
    }
  } catch (const c10::Error& e) {
    throw ModelLoadError("not a readable .pt2 archive: " + path + " is a truncated or damaged zip archive (" +
                         ErrorText(e) + ")");
  }
  impl->program = ParseJsonRecord(program_text, "the serialized program in " + path);
  if (impl->program.is_discarded() || !impl->program.is_object()) {
    throw ModelLoadError("the serialized program in " + path + " is not valid JSON (truncated or damaged archive)");
  }
  const json& version = Member(impl->program, "schema_version");
  const json& major = Member(version, "major");
  if (!major.is_number_integer()) throw ModelLoadError("the program in " + path + " has no schema_version");
  if (major.get<int>() != kSchemaMajor) {
    const json& minor = Member(version, "minor");
    const std::string v = std::to_string(major.get<int>()) + "." +
                          (minor.is_number_integer() ? std::to_string(minor.get<int>()) : "?");
    throw ModelLoadError("the program in " + path + " has schema version " + v + "; this llmem reads version " +
                         std::to_string(kSchemaMajor) + ".x (torch 2.11): " +
                         (major.get<int>() > kSchemaMajor ? "newer than supported" : "older than supported") +
                         ", re-export it with torch 2.11");
  }
  const json& graph_module = Member(impl->program, "graph_module");
  const json& graph = Member(graph_module, "graph");
  const json& specs = Member(Member(graph_module, "signature"), "input_specs");
  if (!graph.is_object() || !specs.is_array()) throw ModelLoadError("the program in " + path + " has no graph");
  for (const json& spec : specs) {
    Impl::Input in;
    if (const json& p = Member(spec, "parameter"); !p.is_null()) {
      in.kind = Impl::Input::Kind::kParameter;
      in.arg = Member(Member(p, "arg"), "name").get<std::string>();
      in.fqn = Member(p, "parameter_name").get<std::string>();
    } else if (const json& b = Member(spec, "buffer"); !b.is_null()) {
      in.kind = Impl::Input::Kind::kBuffer;
      in.arg = Member(Member(b, "arg"), "name").get<std::string>();
      in.fqn = Member(b, "buffer_name").get<std::string>();
    } else if (const json& c = Member(spec, "tensor_constant"); !c.is_null()) {
      in.kind = Impl::Input::Kind::kConstant;
      in.arg = Member(Member(c, "arg"), "name").get<std::string>();
      in.fqn = Member(c, "tensor_constant_name").get<std::string>();
    } else if (const json& u = Member(spec, "user_input"); !u.is_null()) {
      in.kind = Impl::Input::Kind::kUser;
      const json& t = Member(Member(u, "arg"), "as_tensor");
      if (t.is_null()) throw ModelLoadError("not a decoder LM: forward of " + path + " takes a non-tensor input");
      in.arg = Member(t, "name").get<std::string>();
    } else {
      throw ModelLoadError("the program in " + path + " has an input llmem does not read (" +
                           (spec.is_object() && !spec.empty() ? spec.begin().key() : std::string("?")) + ")");
    }
    impl->inputs.push_back(std::move(in));
  }
  size_t user = 0;
  for (const auto& in : impl->inputs) user += in.kind == Impl::Input::Kind::kUser ? 1 : 0;
  if (user != 2) {
    throw ModelLoadError("not a decoder LM: forward must take (input_ids, labels), found " + std::to_string(user) +
                         " inputs in " + path);
  }
  size_t user_outputs = 0;
  for (const json& spec : Member(Member(graph_module, "signature"), "output_specs")) {
    user_outputs += Member(spec, "user_output").is_null() ? 0 : 1;
  }
  if (user_outputs != 1) throw ModelLoadError("not a decoder LM: forward must return the loss tensor in " + path);
  impl->nodes = impl->ReadNodes(graph);
  RemoveDeadCalls(impl->nodes, Member(graph, "outputs"));
  impl->records.ReadConfig(extra[kConfigFile], path);
  impl->records.ReadExpressionCalls(extra[kExpressionCallsFile], path);
  impl->records.ReadRebindings(extra[kRebindingsFile], path);
  if (!extra[kAutocastCastsFile].empty()) impl->ReadAutocastCasts(extra[kAutocastCastsFile]);
  if (!extra[kModuleTreeFile].empty()) {
    impl->ReadModuleTree(extra[kModuleTreeFile]);
  } else {
    // Without the record: one module holding every parameter and buffer, in the program's order.
    impl->module_tree.modules.push_back({});
    for (const auto& in : impl->inputs) {
      if (in.kind == Impl::Input::Kind::kParameter || in.kind == Impl::Input::Kind::kBuffer) {
        const bool is_parameter = in.kind == Impl::Input::Kind::kParameter;
        impl->module_tree.modules[0].tensors.push_back({in.fqn, 0, DType::kF32, is_parameter, ""});
      }
    }
  }
  for (const auto& in : impl->inputs) impl->inputs_by_fqn[in.fqn] = &in;
  // Sizes and dtypes of the tree's tensors, from the program (as the runs make them, in the file's dtype).
  const json& tensor_values = Member(graph, "tensor_values");
  for (ModuleNode& m : impl->module_tree.modules) {
    for (ModuleTensor& t : m.tensors) {
      const auto it = impl->inputs_by_fqn.find(t.tied_to.empty() ? t.name : t.tied_to);
      if (it == impl->inputs_by_fqn.end()) continue;
      const at::Tensor meta = impl->MetaTensorOf(Member(tensor_values, it->second->arg.c_str()), std::nullopt, t.name);
      t.numel = meta.numel();
      t.dtype = FromScalarType(meta.scalar_type());
    }
  }
  return ExportedProgramModel(std::move(impl));
}

at::Tensor ExportedProgramModel::Impl::MetaTensorOf(const json& meta, std::optional<at::ScalarType> float_dtype,
                                                    const std::string& what) const {
  const json& code = Member(meta, "dtype");
  const auto dtype = code.is_number_integer() ? ScalarTypeOf(code.get<int64_t>()) : std::nullopt;
  if (!dtype) throw ModelLoadError(what + " of " + path + " has a dtype llmem does not read");
  std::vector<int64_t> sizes, strides;
  for (const json& d : Member(meta, "sizes")) {
    const json& v = Member(d, "as_int");
    if (!v.is_number_integer()) throw ModelLoadError(what + " of " + path + " has a symbolic size");
    sizes.push_back(v.get<int64_t>());
  }
  for (const json& d : Member(meta, "strides")) {
    const json& v = Member(d, "as_int");
    if (!v.is_number_integer()) throw ModelLoadError(what + " of " + path + " has a symbolic stride");
    strides.push_back(v.get<int64_t>());
  }
  if (strides.size() != sizes.size()) {
    const auto contiguous = c10::contiguous_strides(sizes);
    strides.assign(contiguous.begin(), contiguous.end());
  }
  at::ScalarType st = *dtype;
  if (float_dtype && at::isFloatingType(st)) st = *float_dtype;
  return at::empty_strided(sizes, strides, at::TensorOptions().device(at::kMeta).dtype(st));
}

MetaRun ExportedProgramModel::Impl::Execute(int64_t batch, int64_t seq,
                                            std::optional<at::ScalarType> float_dtype) const {
  const json& graph = Member(Member(program, "graph_module"), "graph");
  const json& tensor_values = Member(graph, "tensor_values");
  // Module state: one meta tensor per distinct tensor (a tied name shares its first name's), named as the module
  // tree names it, in the tree's order (what the forward never reads is appended in that order).
  const auto& by_fqn = inputs_by_fqn;
  MetaSlots slots;
  std::vector<at::Tensor> all;
  std::unordered_map<std::string, at::Tensor> state;  // fqn -> tensor
  std::unordered_map<std::string, c10::IValue> env;
  auto make_state = [&](const std::string& fqn, bool is_parameter) {
    const auto it = by_fqn.find(fqn);
    if (it == by_fqn.end()) return;
    at::Tensor t = MetaTensorOf(Member(tensor_values, it->second->arg.c_str()), float_dtype, fqn);
    if (is_parameter && at::isFloatingType(t.scalar_type())) t.set_requires_grad(true);
    slots[t.unsafeGetTensorImpl()] = MetaSlot{fqn, is_parameter};
    all.push_back(t);
    state[fqn] = t;
  };
  for (const ModuleNode& m : module_tree.modules) {
    for (const ModuleTensor& t : m.tensors) {
      if (t.tied_to.empty()) make_state(t.name, t.is_parameter);
    }
  }
  for (const ModuleNode& m : module_tree.modules) {
    for (const ModuleTensor& t : m.tensors) {
      if (!t.tied_to.empty() && state.count(t.tied_to)) state[t.name] = state[t.tied_to];
    }
  }
  MetaRun run(std::move(slots));
  CheckedMul(CheckedMul(batch, seq, "the token ids"), 8, "the token ids");
  const auto M = at::TensorOptions().device(at::kMeta).dtype(at::kLong);
  size_t user = 0;
  for (const Input& in : inputs) {
    if (in.kind == Input::Kind::kUser) {
      at::Tensor t = at::empty({batch, seq}, M);
      env[in.arg] = t;
      // The graph inputs are values 0 and 1 (BuildGraph relies on that).
      run.NewValue(ValueRole::kInput, t, NodeId{}, user++ == 0 ? "input_ids" : "labels");
    } else if (in.kind == Input::Kind::kConstant) {
      const auto known = scalar_constants.find(in.fqn);
      env[in.arg] = known != scalar_constants.end()
                        ? known->second
                        : MetaTensorOf(Member(tensor_values, in.arg.c_str()), std::nullopt, in.fqn);
    } else {
      auto it = state.find(in.fqn);
      if (it == state.end()) {  // a tensor the module tree record does not name
        at::Tensor t = MetaTensorOf(Member(tensor_values, in.arg.c_str()), float_dtype, in.fqn);
        it = state.emplace(in.fqn, t).first;
      }
      env[in.arg] = it->second;
    }
  }

  auto tensor_named = [&](const json& ref) -> at::Tensor {
    const json& name = Member(ref, "name");
    const auto it = name.is_string() ? env.find(name.get<std::string>()) : env.end();
    if (it == env.end() || !it->second.isTensor()) {
      throw ModelLoadError("the program in " + path + " uses a tensor it does not define");
    }
    return it->second.toTensor();
  };
  auto sym_int = [&](const json& a) -> int64_t {
    if (const json& v = Member(a, "as_int"); v.is_number_integer()) return v.get<int64_t>();
    const json& name = Member(a, "as_name");
    const auto it = name.is_string() ? env.find(name.get<std::string>()) : env.end();
    if (it == env.end() || !it->second.isInt()) {
      throw ModelLoadError("the program in " + path + " uses an unknown size");
    }
    return it->second.toInt();
  };
  auto as_float = [](const json& v) -> double {
    if (v.is_number()) return v.get<double>();
    const std::string s = v.is_string() ? v.get<std::string>() : "";
    if (s == "Infinity") return std::numeric_limits<double>::infinity();
    if (s == "-Infinity") return -std::numeric_limits<double>::infinity();
    return std::numeric_limits<double>::quiet_NaN();
  };
  // One serialized Argument as the IValue a boxed kernel takes.
  auto to_ivalue = [&](const json& arg) -> c10::IValue {
    if (!arg.is_object() || arg.empty()) throw ModelLoadError("the program in " + path + " has an empty argument");
    const std::string& key = arg.begin().key();
    const json& v = arg.begin().value();
    if (key == "as_none") return c10::IValue();
    if (key == "as_tensor") return tensor_named(v);
    if (key == "as_tensors") {
      std::vector<at::Tensor> list;
      for (const json& t : v) list.push_back(tensor_named(t));
      return list;
    }
    if (key == "as_optional_tensors") {
      c10::List<std::optional<at::Tensor>> list;
      for (const json& t : v) {
        if (const json& ref = Member(t, "as_tensor"); !ref.is_null()) list.push_back(tensor_named(ref));
        else list.push_back(std::nullopt);
      }
      return list;
    }
    if (key == "as_optional_tensor") {
      if (const json& ref = Member(v, "as_tensor"); !ref.is_null()) return tensor_named(ref);
      return c10::IValue();
    }
    if (key == "as_int") return v.get<int64_t>();
    if (key == "as_sym_int") return sym_int(v);
    if (key == "as_ints") return v.get<std::vector<int64_t>>();
    if (key == "as_sym_ints") {
      std::vector<int64_t> out;
      for (const json& d : v) out.push_back(sym_int(d));
      return out;
    }
    if (key == "as_float") return as_float(v);
    if (key == "as_floats") {
      std::vector<double> out;
      for (const json& d : v) out.push_back(as_float(d));
      return out;
    }
    if (key == "as_bool") return v.get<bool>();
    if (key == "as_bools") {
      c10::List<bool> out;
      for (const json& b : v) out.push_back(b.get<bool>());
      return out;
    }
    if (key == "as_string") return v.get<std::string>();
    if (key == "as_scalar_type") {
      const auto st = ScalarTypeOf(v.get<int64_t>());
      if (!st) throw ModelLoadError("the program in " + path + " names a dtype llmem does not read");
      return static_cast<int64_t>(*st);
    }
    if (key == "as_layout") {
      const auto layout = LayoutOf(v.get<int64_t>());
      if (!layout) throw ModelLoadError("the program in " + path + " names an unknown layout");
      return static_cast<int64_t>(*layout);
    }
    if (key == "as_memory_format") {
      const auto format = MemoryFormatOf(v.get<int64_t>());
      if (!format) throw ModelLoadError("the program in " + path + " names an unknown memory format");
      return static_cast<int64_t>(*format);
    }
    if (key == "as_device") return c10::Device(at::kMeta);  // the export device is baked in; the run is on meta
    throw ModelLoadError("the program in " + path + " has an argument of kind " + key + " llmem does not read");
  };
  // Binds an op's outputs (serialized Arguments) to what the kernel returned.
  auto bind_outputs = [&](const ProgramNode& node, const std::vector<c10::IValue>& results) {
    const json& outs = *node.outputs;
    if (outs.size() == 1 && results.size() == 1) {
      const json& o = outs[0];
      if (const json& t = Member(o, "as_tensor"); !t.is_null()) {
        env[Member(t, "name").get<std::string>()] = results[0];
      } else if (const json& s = Member(o, "as_sym_int"); !s.is_null()) {
        env[Member(s, "as_name").get<std::string>()] = results[0];
      } else if (const json& ts = Member(o, "as_tensors"); !ts.is_null()) {
        const auto list = results[0].toTensorVector();
        if (list.size() != ts.size()) throw ModelLoadError("op " + node.target + " returned another number of tensors");
        for (size_t i = 0; i < list.size(); ++i) env[Member(ts[i], "name").get<std::string>()] = list[i];
      }
      return;
    }
    if (outs.size() != results.size()) {
      throw ModelLoadError("op " + node.target + " of " + path + " returned " + std::to_string(results.size()) +
                           " values, the program names " + std::to_string(outs.size()));
    }
    for (size_t i = 0; i < outs.size(); ++i) {
      if (const json& t = Member(outs[i], "as_tensor"); !t.is_null()) {
        env[Member(t, "name").get<std::string>()] = results[i];
      }
    }
  };

  std::unordered_map<std::string, at::Tensor> wrapped_numbers;
  // The ops whose only effect is a check the export inserted; they make nothing.
  static const std::unordered_set<std::string> kChecks{
      "aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::sym_constrain_range_for_size",
      "aten::sym_constrain_range", "aten::_assert_async"};
  std::function<void(const std::vector<ProgramNode>&)> run_nodes = [&](const std::vector<ProgramNode>& nodes) {
    for (const ProgramNode& node : nodes) {
      if (node.body) {
        // A higher-order op: its operands after the flags are the body's inputs, in order.
        std::vector<c10::IValue> operands;
        for (const json& in : *node.inputs) {
          const json& arg = Member(in, "arg");
          if (!Member(arg, "as_tensor").is_null()) operands.push_back(to_ivalue(arg));
        }
        if (operands.size() != node.body->inputs.size()) {
          throw ModelLoadError("higher-order op " + node.target + " of " + path + " passes " +
                               std::to_string(operands.size()) + " tensors to a body of " +
                               std::to_string(node.body->inputs.size()));
        }
        for (size_t i = 0; i < operands.size(); ++i) env[node.body->inputs[i]] = operands[i];
        {
          std::optional<c10::AutoGradMode> grad;
          if (node.grad_enabled) grad.emplace(*node.grad_enabled);
          run_nodes(node.body->nodes);
        }
        std::vector<c10::IValue> results;
        for (const json& o : *node.body->outputs) results.push_back(to_ivalue(o));
        bind_outputs(node, results);
        continue;
      }
      if (node.target == "_operator.getitem") {  // an element of a multi-output op's result
        const c10::IValue list = to_ivalue(Member((*node.inputs)[0], "arg"));
        const int64_t i = Member(Member((*node.inputs)[1], "arg"), "as_int").get<int64_t>();
        bind_outputs(node, {list.toTensorVector().at(static_cast<size_t>(i))});
        continue;
      }
      if (!node.op) {
        // Size arithmetic between ops (operator.mul, floordiv, ...), on the concrete sizes of this run.
        const bool math = node.target.rfind("_operator.", 0) == 0 || node.target == "torch.sym_max" ||
                          node.target == "torch.sym_min";
        if (math && node.inputs->size() == 2) {
          const int64_t a = to_ivalue(Member((*node.inputs)[0], "arg")).toInt();
          const int64_t b = to_ivalue(Member((*node.inputs)[1], "arg")).toInt();
          const std::string f = node.target.substr(node.target.find('.') + 1);
          int64_t r = 0;
          if (f == "mul") r = CheckedMul(a, b, "a size");
          else if (f == "add") r = a + b;
          else if (f == "sub") r = a - b;
          else if (f == "floordiv" && b != 0) r = a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0);
          else if (f == "mod" && b != 0) r = ((a % b) + b) % b;
          else if (f == "sym_max") r = std::max(a, b);
          else if (f == "sym_min") r = std::min(a, b);
          else throw ModelLoadError("unsupported size arithmetic " + node.target + " in " + path);
          bind_outputs(node, {c10::IValue(r)});
          continue;
        }
        throw ModelLoadError("unsupported op target " + node.target + " in " + path);
      }
      if (kChecks.count(node.kind)) continue;

      // The stack in schema order: every argument by name, defaults for the ones the serializer left out.
      const c10::FunctionSchema& schema = node.op->schema();
      std::unordered_map<std::string, const json*> given;
      for (const json& in : *node.inputs) {
        const json& name = Member(in, "name");
        if (name.is_string()) given[name.get<std::string>()] = &Member(in, "arg");
      }
      torch::jit::Stack stack;
      for (const c10::Argument& a : schema.arguments()) {
        const auto it = given.find(a.name());
        if (it != given.end()) {
          c10::IValue v = to_ivalue(*it->second);
          // A Python number where the schema takes a Tensor (x - 1 as sub.Tensor): eager wraps it as a 0-dim CPU
          // tensor, which takes no part in type promotion beyond its category.
          const bool tensor_arg = a.type()->kind() == c10::TypeKind::TensorType ||
                                  (a.type()->kind() == c10::TypeKind::OptionalType &&
                                   a.type()->containedType(0)->kind() == c10::TypeKind::TensorType);
          if (tensor_arg && (v.isInt() || v.isDouble() || v.isBool())) {
            // One tensor per number, as a trace pools equal constants.
            const std::string key = v.tagKind() + ":" + (v.isDouble() ? std::to_string(v.toDouble()) :
                                                         std::to_string(v.isBool() ? v.toBool() : v.toInt()));
            auto [it, added] = wrapped_numbers.try_emplace(key);
            if (added) {
              it->second = at::scalar_to_tensor(v.toScalar());
              it->second.unsafeGetTensorImpl()->set_wrapped_number(true);
            }
            v = it->second;
          }
          if (v.isTensorList() && a.type()->kind() == c10::TypeKind::ListType &&
              a.type()->containedType(0)->kind() == c10::TypeKind::OptionalType) {  // Tensor?[] given as Tensor[]
            c10::List<std::optional<at::Tensor>> list;
            for (const at::Tensor& t : v.toTensorVector()) list.push_back(t);
            v = list;
          }
          stack.push_back(std::move(v));
        } else if (a.default_value()) {
          stack.push_back(*a.default_value());
        } else {
          throw ModelLoadError("op " + node.target + " of " + path + " lacks its argument " + a.name());
        }
      }
      // torch.tensor(x, device=d) in a forward: eager makes x on the CPU and copies it to d (tensor_new.cpp,
      // internal_new_from_data: .to(device), then detach_), which the program records as the lifted constant's
      // lift_fresh_copy and detach_, on the export's device. Run as eager runs it, on the model's device.
      const c10::OperatorHandle* handle = &*node.op;
      std::string kind = node.kind;
      if (kind == "aten::lift_fresh_copy" || kind == "aten::detach_") {
        static const c10::OperatorHandle to_device = *c10::Dispatcher::singleton().findSchema({"aten::to", "device"});
        static const c10::OperatorHandle detach = *c10::Dispatcher::singleton().findSchema({"aten::detach", ""});
        if (kind == "aten::lift_fresh_copy") {
          const at::Tensor c = stack.at(0).toTensor();
          stack = {c, c10::Device(at::kMeta), static_cast<int64_t>(c.scalar_type()), false, false, c10::IValue()};
          handle = &to_device;
          kind = "aten::to";
        } else {
          handle = &detach;
          kind = "aten::detach";
        }
      }
      std::vector<c10::IValue> in_values(stack.begin(), stack.end());
      if (kind == "aten::slice" && in_values.size() == 5) {
        // x[a:] and x[:b] leave start or end out; a trace records them as 0 and INT64_MAX, as the kernel takes them.
        if (in_values[2].isNone()) in_values[2] = int64_t{0};
        if (in_values[3].isNone()) in_values[3] = std::numeric_limits<int64_t>::max();
      }
      if (node.kind == "aten::scaled_dot_product_attention" && IsBidirectionalAttention(in_values, run.ranges)) {
        throw ModelLoadError(BidirectionalAttentionMessage(
            node.scope, node.module_stack.empty() ? "" : node.module_stack.back().class_name));
      }
      try {
        handle->callBoxed(stack);
      } catch (const c10::Error& e) {
        const std::string msg = ErrorText(e);
        if (msg.find("overflow") != std::string::npos) {
          throw ConfigError("batch " + std::to_string(batch) + " x sequence " + std::to_string(seq) +
                            " is too large: " + msg);
        }
        CheckPositions(run.bounded_lookups, seq, records.max_positions_override, records.max_positions,
                       records.model_type);
        throw ModelLoadError("op " + kind + " failed while tracing shapes on meta: " + msg);
      }
      // sym_size & co. return SymInts: concrete on meta.
      for (c10::IValue& r : stack) {
        if (r.isSymInt()) r = r.toSymInt().expect_int();
      }
      bind_outputs(node, stack);
      run.ranges.Observe(kind, kind == node.kind ? node.overload : "", in_values, stack);
      if (kind == "aten::embedding" || kind == "aten::index") run.ObserveLookup(kind, in_values, node.scope);
      bool has_tensor_out = false;
      for (const auto& iv : stack) has_tensor_out |= iv.isTensor() || iv.isTensorList();
      if (!has_tensor_out || run.IsNoOpView(kind, in_values, stack)) continue;
      OpNode op;
      op.kind = kind;
      op.scope = node.scope;
      op.in_module_code = node.in_module_code;
      op.to_autocast_dtype = autocast_dtype_casts.count(node.name) > 0;
      // How each module's forward treats the call of its child that leads to this op (ExportRecords).
      size_t depth = 0;
      std::string parent_path;
      for (size_t i = 0; i < node.module_stack.size(); ++i) {
        const StackEntry& e = node.module_stack[i];
        const std::string step = parent_path.empty() ? e.path
                                 : e.path.rfind(parent_path + ".", 0) == 0 ? e.path.substr(parent_path.size() + 1)
                                                                            : e.path;
        const std::string child = step.substr(step.rfind('.') + 1);
        records.NoteChildCall(i == 0 ? node.root_class : node.module_stack[i - 1].class_name, child, depth, op);
        depth += static_cast<size_t>(std::count(step.begin(), step.end(), '.')) + 1;
        parent_path = e.path;
      }
      run.AddNode(std::move(op), in_values, stack);
    }
  };
  run_nodes(nodes);
  const json& outputs = Member(graph, "outputs");
  if (!outputs.is_array() || outputs.empty()) throw ModelLoadError("not a decoder LM: forward returns nothing");
  run.Finish(all, to_ivalue(outputs[0]));
  return run;
}

MetaRun ExportedProgramModel::Impl::Run(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype) const {
  try {
    return Execute(batch, seq, float_dtype);
  } catch (const json::exception& e) {
    throw ModelLoadError("the program in " + path + " is malformed: " + BriefLoaderReason(e.what()));
  } catch (const c10::Error& e) {  // an argument of the wrong kind for its op (the kernels' own errors are caught)
    throw ModelLoadError("the program in " + path + " cannot run: " + ErrorText(e));
  }
}

Graph ExportedProgramModel::BuildGraph(int64_t batch, int64_t seq) const {
  if (batch <= 0) throw ConfigError("batch size must be positive, got " + std::to_string(batch));
  if (seq <= 0) throw ConfigError("sequence length must be positive, got " + std::to_string(seq));
  CheckedMul(batch, seq, "batch x sequence");
  c10::InferenceMode guard(false);
  c10::AutoGradMode grad_mode(true);
  MetaRun run = impl_->Run(batch, seq, std::nullopt);
  const ExportRecords& r = impl_->records;
  std::optional<PositionLimit> position_limit =
      CheckPositions(run.bounded_lookups, seq, r.max_positions_override, r.max_positions, r.model_type);
  std::optional<MetaRun> half;
  try {
    half.emplace(impl_->Run(batch, seq, at::kBFloat16));
  } catch (const ModelLoadError&) {
  }
  Graph graph = AssembleGraph(std::move(run), half ? &*half : nullptr, {ValueId{0}, ValueId{1}}, batch, seq);
  graph.set_position_limit(std::move(position_limit));
  return graph;
}

Graph ExportedProgramModel::BuildGenerationGraph(int64_t batch, int64_t tokens, int64_t past_tokens) const {
  if (past_tokens < 0) throw ConfigError("the cached tokens cannot be negative");
  Graph training = BuildGraph(batch, tokens);
  for (const OpNode& n : training.nodes()) {
    if (n.kind == "aten::scaled_dot_product_attention") return training;
  }
  throw ConfigError("generation with an eager-attention model (no scaled_dot_product_attention) is traced from "
                    "its TorchScript export: export it without --format pt2");
}

}  // namespace llmem
