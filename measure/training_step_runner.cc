#include "measure/training_step_runner.h"

#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/script.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>

#include "graph/dtype.h"
#include "graph/error.h"
#include "graph/exported_program_importer.h"
#include "graph/meta_kernels.h"
#include "measure/counting_allocator.h"

namespace llmem {
namespace {

// Optimizer settings of the measured step (see MeasureOptions::optimizer).
constexpr double kAdamWLearningRate = 1e-4;
constexpr double kAdamWWeightDecay = 0.01;
constexpr double kSgdLearningRate = 1e-4;
constexpr double kSgdMomentum = 0.9;
// Token ids are i % kInputIdRange: valid for any vocabulary of at least this size; memory does not depend on them.
constexpr int64_t kInputIdRange = 50;

std::string FirstLine(const std::string& text) { return text.substr(0, text.find('\n')); }

// Current/peak bytes of the measured device, with a peak that restarts at each phase.
class MemoryProbe {
 public:
  virtual ~MemoryProbe() = default;
  virtual void ResetPeak() = 0;
  virtual PhaseMemory Read() = 0;  // peak since the last ResetPeak() and current
  virtual void SetPhase(const std::string& phase) {}
  virtual std::vector<AllocationEvent> Events() { return {}; }
};

class CountingProbe final : public MemoryProbe {
 public:
  CountingProbe(const std::vector<c10::DeviceType>& devices, bool record_events)
      : counting_(devices, record_events) {}
  void ResetPeak() override { counting_.ResetPeak(); }
  PhaseMemory Read() override {
    const AllocationCounters c = counting_.counters();
    if (c.overflowed) {
      throw ConfigError("the live bytes of this step overflow a 64-bit integer (over 8 EiB): batch x seq is too large");
    }
    return {c.peak_bytes, c.current_bytes, 0, 0};
  }
  void SetPhase(const std::string& phase) override { counting_.SetPhase(phase); }
  std::vector<AllocationEvent> Events() override { return counting_.events(); }

 private:
  ScopedCountingAllocator counting_;
};

// Reads the CUDA caching allocator's statistics ("allocated" = bytes handed to tensors, "reserved" = segments
// obtained with cudaMalloc); nothing is installed.
class CudaProbe final : public MemoryProbe {
 public:
  explicit CudaProbe(int device_index) : device_(static_cast<c10::DeviceIndex>(device_index)) {}
  void ResetPeak() override { c10::cuda::CUDACachingAllocator::resetPeakStats(device_); }
  PhaseMemory Read() override {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device_);
    const auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return {stats.allocated_bytes[aggregate].peak, stats.allocated_bytes[aggregate].current,
            stats.reserved_bytes[aggregate].peak, stats.reserved_bytes[aggregate].current};
  }

 private:
  c10::DeviceIndex device_;
};

// Mirrors Python's `with torch.autocast(device, dtype)`: enter saves the state, enables autocast with the dtype,
// increments the nesting counter and enables the cast cache; exit clears the cache when the outermost region
// ends and restores the saved state.
class AutocastRegion {
 public:
  AutocastRegion(c10::DeviceType device, c10::ScalarType dtype)
      : device_(device),
        prev_enabled_(at::autocast::is_autocast_enabled(device)),
        prev_dtype_(at::autocast::get_autocast_dtype(device)),
        prev_cache_enabled_(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_enabled(device_, true);
    at::autocast::set_autocast_dtype(device_, dtype);
    at::autocast::increment_nesting();
    at::autocast::set_autocast_cache_enabled(true);
  }
  ~AutocastRegion() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, prev_enabled_);
    at::autocast::set_autocast_dtype(device_, prev_dtype_);
    at::autocast::set_autocast_cache_enabled(prev_cache_enabled_);
  }
  AutocastRegion(const AutocastRegion&) = delete;
  AutocastRegion& operator=(const AutocastRegion&) = delete;

 private:
  c10::DeviceType device_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
  bool prev_cache_enabled_;
};

// Meta copies of CPU tensors that keep shared storages shared (tied embeddings, constants that view a weight).
// Each meta storage has the CPU storage's byte size, so counted bytes stay the same once the CPU tensor is gone.
class MetaStorages {
 public:
  at::Tensor ToMeta(const at::Tensor& cpu) {
    auto it = storages_.find(cpu.storage().unsafeGetStorageImpl());
    if (it == storages_.end()) {
      c10::Storage storage(c10::Storage::use_byte_size_t(), cpu.storage().nbytes(),
                           c10::GetAllocator(c10::DeviceType::Meta), /*resizable=*/true);
      it = storages_.emplace(cpu.storage().unsafeGetStorageImpl(), std::move(storage)).first;
    }
    at::Tensor meta = at::empty({0}, cpu.options().device(c10::kMeta));
    meta.set_(it->second, cpu.storage_offset(), cpu.sizes(), cpu.strides());
    meta.set_requires_grad(cpu.requires_grad());
    return meta;
  }

 private:
  std::map<const c10::StorageImpl*, c10::Storage> storages_;
};

// Traces bake devices into prim::Constant nodes (e.g. torch.arange(..., device="cpu")) and keep tensors that are
// not parameters or buffers as tensor constants (CodeGen's sinusoidal position table); on meta both must be
// meta, or ops mix devices. The CPU originals are released with the old nodes' attributes. 0-dim constants stay on
// CPU: ops accept CPU scalars next to tensors of any device, and the graph reads some of them as numbers
// (aten::Int / item()), which meta tensors cannot give.
void RewriteConstantsToMeta(torch::jit::Block* block, MetaStorages& storages) {
  for (torch::jit::Node* node : block->nodes()) {
    for (torch::jit::Block* sub : node->blocks()) RewriteConstantsToMeta(sub, storages);
    if (node->kind() != c10::prim::Constant || node->outputs().size() != 1 || !node->hasAttribute(c10::attr::value)) {
      continue;
    }
    if (node->output()->type()->kind() == c10::TypeKind::DeviceObjType) {
      node->s_(c10::attr::value, c10::Device(c10::DeviceType::Meta).str());
    } else if (node->kindOf(c10::attr::value) == torch::jit::AttributeKind::t &&
               node->t(c10::attr::value).defined() && node->t(c10::attr::value).dim() > 0 &&
               !node->t(c10::attr::value).is_meta()) {
      const at::Tensor meta = storages.ToMeta(node->t(c10::attr::value));
      node->t_(c10::attr::value, meta);
      node->output()->inferTypeFrom(meta);
    }
  }
}

// Moves every tensor attribute (parameters, buffers) of every submodule and every tensor constant of the code to
// meta, which Module::to(kMeta) cannot do on a loaded module.
void MoveModuleToMeta(torch::jit::Module& module) {
  MetaStorages storages;
  for (const torch::jit::Module& submodule : module.modules()) {
    const c10::intrusive_ptr<c10::ivalue::Object> object = submodule._ivalue();
    for (size_t slot = 0; slot < object->type()->numAttributes(); ++slot) {
      const c10::IValue value = object->getSlot(slot);
      if (!value.isTensor() || !value.toTensor().defined()) continue;
      object->setSlot(slot, storages.ToMeta(value.toTensor()));
    }
  }
  // All code of the file (methods and free functions) lives in the module's compilation unit.
  for (torch::jit::Function* function : module._ivalue()->compilation_unit()->get_functions()) {
    if (torch::jit::GraphFunction* graph_function = torch::jit::tryToGraphFunction(*function)) {
      RewriteConstantsToMeta(graph_function->graph()->block(), storages);
    }
  }
}

void Validate(const MeasureOptions& options) {
  if (options.batch < 1 || options.seq < 1) {
    throw ConfigError("batch and seq must be >= 1 (got batch " + std::to_string(options.batch) + ", seq " +
                      std::to_string(options.seq) + ")");
  }
  if (options.steps < 1) throw ConfigError("steps must be >= 1 (got " + std::to_string(options.steps) + ")");
  // input_ids and labels are int64 batch x seq tensors.
  CheckedMul(CheckedMul(options.batch, options.seq, "the token ids"), sizeof(int64_t), "the token ids");
  const bool autocast = options.precision == MeasurePrecision::kBf16Autocast ||
                        options.precision == MeasurePrecision::kFp16Autocast;
  if (options.device == MeasureDevice::kMeta && autocast) {
    throw ConfigError("precision " + ToString(options.precision) +
                      " cannot run on meta: autocast has no meta dispatch key, so casts would be skipped; use "
                      "cpu or cuda, or precision fp32/bf16");
  }
  if (options.device == MeasureDevice::kCuda && !torch::cuda::is_available()) {
    throw ConfigError("no CUDA device is available for --device cuda (use cpu or meta)");
  }
}

c10::Device TorchDevice(const MeasureOptions& options) {
  switch (options.device) {
    case MeasureDevice::kCpu:
      return c10::Device(c10::DeviceType::CPU);
    case MeasureDevice::kMeta:
      return c10::Device(c10::DeviceType::Meta);
    case MeasureDevice::kCuda:
      return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(options.cuda_device_index));
  }
  return c10::Device(c10::DeviceType::CPU);
}

// Weight-free exports (models/*.meta.pt) keep their parameters on meta whatever device the loader maps to.
bool HoldsMetaTensors(const torch::jit::Module& module) {
  for (const at::Tensor& p : module.parameters(/*recurse=*/true)) {
    if (p.is_meta()) return true;
  }
  for (const at::Tensor& b : module.buffers(/*recurse=*/true)) {
    if (b.is_meta()) return true;
  }
  return false;
}

torch::jit::Module LoadModel(const std::string& path, const c10::Device& device) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw ModelLoadError("model file not found: " + path);
  if (IsExportedProgramArchive(path)) {
    throw ModelLoadError("measure runs the TorchScript export of a model (its interpreter is the instrument): " +
                         path + " is a torch.export program; export the model without --format pt2");
  }
  torch::jit::Module module;
  try {
    // Meta: read on CPU, then move the tensors (loading straight to meta needs aten::equal on meta tensors).
    module = torch::jit::load(path, device.is_meta() ? c10::Device(c10::DeviceType::CPU) : device);
  } catch (const c10::OutOfMemoryError& e) {
    throw ConfigError("out of memory while loading " + path + ": " + FirstLine(e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    throw ConfigError("out of memory while loading " + path);
  } catch (const c10::Error& e) {
    throw ModelLoadError("cannot load " + path + " as TorchScript: " + FirstLine(e.what_without_backtrace()));
  }
  if (!device.is_meta() && HoldsMetaTensors(module)) {
    throw ConfigError(path + " is a weight-free export (its parameters are on the meta device), so it cannot run on " +
                      device.str() + ": measure it with --device meta (PyTorch's own allocations of the same step)");
  }
  auto forward = module.find_method("forward");
  // arguments: self, input_ids, labels
  if (!forward || forward->function().getSchema().arguments().size() != 3) {
    throw ModelLoadError("not a decoder LM: " + path + " has no forward(input_ids, labels) returning the loss");
  }
  if (device.is_meta()) MoveModuleToMeta(module);
  return module;
}

std::vector<at::Tensor> Parameters(const torch::jit::Module& module) {
  std::vector<at::Tensor> params;
  for (const at::Tensor& p : module.parameters(/*recurse=*/true)) params.push_back(p);
  return params;
}

std::unique_ptr<torch::optim::Optimizer> MakeOptimizer(MeasureOptimizer kind, std::vector<at::Tensor> params) {
  if (kind == MeasureOptimizer::kSgd) {
    return std::make_unique<torch::optim::SGD>(std::move(params),
                                               torch::optim::SGDOptions(kSgdLearningRate).momentum(kSgdMomentum));
  }
  return std::make_unique<torch::optim::AdamW>(
      std::move(params), torch::optim::AdamWOptions(kAdamWLearningRate).weight_decay(kAdamWWeightDecay));
}

// The message of an error raised while running the model. The TorchScript interpreter wraps a failing op's
// c10::Error into a std::runtime_error whose text is a traceback ending in "<Type>Error: <message>"; that last
// line is the message. Other errors: their first line.
std::string RunErrorMessage(const std::string& text) {
  std::string message;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t end = std::min(text.find('\n', pos), text.size());
    const std::string line = text.substr(pos, end - pos);
    const size_t colon = line.find("Error: ");
    if (colon != std::string::npos && colon > 0 &&
        std::all_of(line.begin(), line.begin() + static_cast<std::ptrdiff_t>(colon),
                    [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '.'; })) {
      message = line.substr(colon + 7);
    }
    pos = end + 1;
  }
  return message.empty() ? FirstLine(text) : message;
}

// Errors while running the model: running out of memory; a missing meta kernel (names the op); a pure-bf16 run
// of an export whose graph bakes float casts (traced in fp32), which mixes dtypes in a matmul or layer norm; and
// anything else, a model that does not behave like a decoder LM.
[[noreturn]] void ThrowRunError(const std::string& text, bool out_of_memory, const std::string& phase,
                                const MeasureOptions& options) {
  const std::string message = RunErrorMessage(text);
  // std::bad_alloc (from host containers) reaches here as its what() text.
  if (out_of_memory || message.find("out of memory") != std::string::npos ||
      message.find("bad_alloc") != std::string::npos) {
    throw ConfigError("out of memory in " + phase + ": " + message);
  }
  if (message.find("'Meta' backend") != std::string::npos || message.find("Meta kernel") != std::string::npos) {
    throw UnsupportedOpError("no meta kernel for an op in " + phase + ": " + message);
  }
  if (options.precision == MeasurePrecision::kBf16 &&
      (message.find("dtype") != std::string::npos || message.find("scalar type") != std::string::npos)) {
    throw ConfigError("precision bf16 cannot run " + options.model_path + ": with bf16 weights its " + phase +
                      " mixes dtypes (" + message +
                      "); the export was probably traced in fp32, which bakes fp32 casts into the graph. Export "
                      "it in bf16, or measure fp32 or bf16-autocast");
  }
  throw ModelLoadError("running the model's " + phase + " failed: " + message);
}

// Runs one phase of the step; LibTorch and interpreter errors become llmem errors (see ThrowRunError).
template <typename Fn>
void RunPhase(const std::string& phase, const MeasureOptions& options, Fn&& fn) {
  try {
    fn();
  } catch (const Error&) {
    throw;
  } catch (const c10::OutOfMemoryError& e) {
    ThrowRunError(e.what_without_backtrace(), /*out_of_memory=*/true, phase, options);
  } catch (const c10::Error& e) {
    ThrowRunError(e.what_without_backtrace(), /*out_of_memory=*/false, phase, options);
  } catch (const std::exception& e) {
    ThrowRunError(e.what(), /*out_of_memory=*/false, phase, options);
  }
}

}  // namespace

MeasureDevice ParseMeasureDevice(const std::string& text) {
  if (text == "cpu") return MeasureDevice::kCpu;
  if (text == "cuda") return MeasureDevice::kCuda;
  if (text == "meta") return MeasureDevice::kMeta;
  throw ConfigError("unknown device '" + text + "' (expected cpu, cuda or meta)");
}

MeasurePrecision ParseMeasurePrecision(const std::string& text) {
  if (text == "fp32") return MeasurePrecision::kFp32;
  if (text == "bf16-autocast") return MeasurePrecision::kBf16Autocast;
  if (text == "fp16-autocast") return MeasurePrecision::kFp16Autocast;
  if (text == "bf16") return MeasurePrecision::kBf16;
  throw ConfigError("unknown precision '" + text + "' (expected fp32, bf16-autocast, fp16-autocast or bf16)");
}

MeasureOptimizer ParseMeasureOptimizer(const std::string& text) {
  if (text == "adamw") return MeasureOptimizer::kAdamW;
  if (text == "sgd") return MeasureOptimizer::kSgd;
  throw ConfigError("unknown optimizer '" + text + "' (expected adamw or sgd)");
}

std::string ToString(MeasureDevice device) {
  switch (device) {
    case MeasureDevice::kCpu:
      return "cpu";
    case MeasureDevice::kCuda:
      return "cuda";
    case MeasureDevice::kMeta:
      return "meta";
  }
  return "?";
}

std::string ToString(MeasurePrecision precision) {
  switch (precision) {
    case MeasurePrecision::kFp32:
      return "fp32";
    case MeasurePrecision::kBf16Autocast:
      return "bf16-autocast";
    case MeasurePrecision::kFp16Autocast:
      return "fp16-autocast";
    case MeasurePrecision::kBf16:
      return "bf16";
  }
  return "?";
}

std::string ToString(MeasureOptimizer optimizer) { return optimizer == MeasureOptimizer::kSgd ? "sgd" : "adamw"; }

MeasureResult MeasureTrainingStep(const MeasureOptions& options) {
  // Step 1: check options and prepare the process (meta kernels; interpreter without graph optimizations, whose
  // autodiff subgraphs would keep different tensors alive than eager PyTorch).
  Validate(options);
  EnsureMetaKernelsRegistered();
  torch::jit::setGraphExecutorOptimize(false);
  const c10::Device device = TorchDevice(options);
  MeasureResult result;
  result.options = options;
  result.device_name = device.str();

  // Step 2: start counting, then load (and convert) the weights.
  std::unique_ptr<MemoryProbe> probe;
  if (device.is_cuda()) {
    probe = std::make_unique<CudaProbe>(options.cuda_device_index);
  } else {
    // A meta run counts CPU too: the model is read on CPU and TorchScript tensor constants stay there.
    probe = std::make_unique<CountingProbe>(device.is_meta()
                                                ? std::vector<c10::DeviceType>{c10::DeviceType::CPU, c10::DeviceType::Meta}
                                                : std::vector<c10::DeviceType>{c10::DeviceType::CPU},
                                            options.record_events);
  }
  probe->SetPhase("load");
  torch::jit::Module module = LoadModel(options.model_path, device);
  module.train();
  if (options.precision == MeasurePrecision::kBf16) {
    RunPhase("conversion to bf16", options, [&] { module.to(at::kBFloat16); });
  }
  std::vector<at::Tensor> params = Parameters(module);
  std::set<const c10::StorageImpl*> seen;  // tied weights (GPT-2's wte/lm_head) appear once per module slot
  for (const at::Tensor& p : params) {
    if (seen.insert(p.storage().unsafeGetStorageImpl()).second) result.num_parameters += p.numel();
  }
  result.weights_bytes = probe->Read().end_bytes;
  if (!device.is_cuda()) {
    // What the loader holds besides tensor storage: live bytes minus every distinct storage of the module's
    // parameters and buffers.
    int64_t tensor_bytes = 0;
    std::set<const c10::StorageImpl*> storages;
    auto add = [&](const at::Tensor& t) {
      if (t.defined() && t.has_storage() && storages.insert(t.storage().unsafeGetStorageImpl()).second) {
        tensor_bytes += static_cast<int64_t>(t.storage().nbytes());
      }
    };
    for (const auto& p : module.named_parameters(/*recurse=*/true)) add(p.value);
    for (const auto& b : module.named_buffers(/*recurse=*/true)) add(b.value);
    result.loader_bytes = std::max<int64_t>(0, result.weights_bytes - tensor_bytes);
    result.weights_bytes -= result.loader_bytes;
  }
  std::unique_ptr<torch::optim::Optimizer> optimizer = MakeOptimizer(options.optimizer, params);

  // Step 3: inputs. Labels are a copy of the ids, as data collators for causal LMs make them (the model shifts
  // them), so both tensors are counted.
  at::Tensor input_ids;
  at::Tensor labels;
  RunPhase("creating the inputs", options, [&] {
    input_ids = at::arange(options.batch * options.seq, at::TensorOptions().dtype(at::kLong).device(device))
                    .remainder(kInputIdRange)
                    .view({options.batch, options.seq});
    labels = input_ids.clone();
  });
  result.inputs_bytes = probe->Read().end_bytes - result.weights_bytes - result.loader_bytes;

  // Step 4: the training steps, one probe reading per phase.
  const bool autocast = options.precision == MeasurePrecision::kBf16Autocast ||
                        options.precision == MeasurePrecision::kFp16Autocast;
  const c10::ScalarType autocast_dtype =
      options.precision == MeasurePrecision::kFp16Autocast ? at::kHalf : at::kBFloat16;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < options.steps; ++step) {
    StepMemory memory;
    optimizer->zero_grad(/*set_to_none=*/true);

    probe->SetPhase("forward");
    probe->ResetPeak();
    at::Tensor loss;
    RunPhase("forward", options, [&] {
      std::optional<AutocastRegion> region;
      if (autocast) region.emplace(device.type(), autocast_dtype);
      c10::IValue out = module.forward({input_ids, labels});
      if (!out.isTensor() || out.toTensor().dim() != 0 || !out.toTensor().is_floating_point()) {
        throw ModelLoadError("not a decoder LM: forward(input_ids, labels) of " + options.model_path +
                             " does not return a scalar loss");
      }
      loss = out.toTensor();
    });
    memory.forward = probe->Read();

    probe->SetPhase("backward");
    probe->ResetPeak();
    RunPhase("backward", options, [&] { loss.backward(); });
    loss.reset();
    memory.backward = probe->Read();

    probe->SetPhase("optimizer");
    probe->ResetPeak();
    RunPhase("optimizer step", options, [&] { optimizer->step(); });
    memory.optimizer = probe->Read();
    result.steps.push_back(memory);
    probe->SetPhase("zero_grad");
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  result.events = probe->Events();
  result.peak_bytes = result.weights_bytes;
  for (StepMemory& s : result.steps) {
    for (PhaseMemory* p : {&s.forward, &s.backward, &s.optimizer}) {
      p->peak_bytes -= result.loader_bytes;  // the loader's records stay live throughout
      p->end_bytes -= result.loader_bytes;
      result.peak_bytes = std::max(result.peak_bytes, p->peak_bytes);
      result.peak_reserved_bytes = std::max(result.peak_reserved_bytes, p->peak_reserved_bytes);
    }
  }
  return result;
}

}  // namespace llmem
