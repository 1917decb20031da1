#include "distributed/step_time_model.h"

#include <algorithm>
#include <array>
#include <cstdio>

#include "graph/dtype.h"
#include "simulator/step_plan_builder.h"

namespace llmem::dist {
namespace {

constexpr double kTera = 1e12;
constexpr double kGiga = 1e9;
constexpr double kMicro = 1e-6;

// AdamW, foreach (torch/optim/adam.py _multi_tensor_adam; decoupled weight decay, not capturable): one pass per
// parameter-sized tensor each kernel reads or writes.
//   _foreach_mul_(params, 1 - lr * wd)                   2  weight decay
//   _foreach_lerp_(exp_avgs, grads, 1 - beta1)           3
//   _foreach_mul_(exp_avg_sqs, beta2)                    2
//   _foreach_addcmul_(exp_avg_sqs, grads, grads)         3
//   exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)         2  a temporary
//   _foreach_div_(exp_avg_sq_sqrt, bias_correction2)     2
//   _foreach_add_(exp_avg_sq_sqrt, eps)                  2
//   _foreach_addcdiv_(params, exp_avgs, exp_avg_sq_sqrt) 4
constexpr int kAdamWForeachPasses = 20;
// SGD with momentum (torch/optim/sgd.py _multi_tensor_sgd, every step after the first):
//   _foreach_mul_(bufs, momentum) 2, _foreach_add_(bufs, grads) 3, _foreach_add_(params, bufs, -lr) 3.
constexpr int kSgdMomentumForeachPasses = 8;
// SGD without momentum: _foreach_add_(params, grads, alpha=-lr) reads both and writes the parameters.
constexpr int kSgdForeachPasses = 3;
// HF Adafactor (transformers/optimization.py, one parameter at a time, fp32 parameters, factored): _rms(p) 1,
// grad**2 2, + eps 2, row and column means 2, mul(r_factor, c_factor) 1, update.mul_(grad) 3, _rms(update) 1,
// div_ 2, mul_(lr) 2, -update 2, p.add_ 3. The row/column factors are negligible.
constexpr int kAdafactorPasses = 21;
// bitsandbytes 8-bit AdamW on CUDA: one kernel reads the parameter and gradient and writes the parameter
// (3 parameter-sized passes), and reads and writes both uint8 states (4 passes of a quarter of an fp32
// parameter): 4 passes of fp32 parameter bytes.
constexpr int kAdamW8bitPasses = 4;

// How the step-time assumptions name the optimizer's step.
std::string OptimizerStepWords(sim::OptimizerKind optimizer) {
  switch (optimizer) {
    case sim::OptimizerKind::kAdamW: return "AdamW (PyTorch foreach)";
    case sim::OptimizerKind::kSgdMomentum: return "SGD with momentum (PyTorch foreach)";
    case sim::OptimizerKind::kSgdNoMomentum: return "SGD without momentum (PyTorch foreach)";
    case sim::OptimizerKind::kAdafactor: return "Adafactor (HF transformers, one parameter at a time)";
    case sim::OptimizerKind::kAdamW8bit: return "8-bit AdamW (bitsandbytes' CUDA kernel)";
    case sim::OptimizerKind::kPagedAdamW8bit:
      return "paged 8-bit AdamW (bitsandbytes' CUDA kernel; page migration not modelled)";
  }
  return "?";
}


std::string Fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}
std::string Percent(double fraction) { return Fixed(100 * fraction, 0) + "%"; }

// Which peak matmul-like ops run at, in words, for the assumptions.
std::string MatmulPeakWords(const sim::GpuSpec& gpu, sim::Precision precision) {
  const std::string peak = Fixed(MatmulPeakFlops(gpu, precision) / kTera, 1) + " TFLOP/s";
  switch (precision) {
    case sim::Precision::kFp32:
      return peak + " fp32 on the CUDA cores: PyTorch runs fp32 matmuls in full fp32 "
                    "(torch.backends.cuda.matmul.allow_tf32 defaults to False since 1.12)";
    case sim::Precision::kFp16Autocast:
      return peak + " fp16 tensor cores (dense, NVIDIA datasheet)";
    case sim::Precision::kBf16Autocast:
    case sim::Precision::kBf16:
      if (!gpu.bf16_tensor_cores) return peak + " fp32: " + gpu.name + " has no bf16 tensor cores";
      return peak + " bf16 tensor cores (dense, NVIDIA datasheet)";
  }
  return peak;
}

// Step 1: compute per phase, a roofline per op.
void AddComputeSeconds(const StepTimeInputs& in, StepTime& t) {
  const auto& eff = in.efficiency;
  const double matmul_rate = MatmulPeakFlops(in.gpu, in.precision) * eff.compute_fraction;
  const double vector_rate = in.gpu.fp32_tflops * kTera * eff.compute_fraction;
  const double byte_rate = in.gpu.memory_bandwidth_gb_per_s * kGiga * eff.memory_bandwidth_fraction;
  for (size_t i = 0; i < in.per_rank_cost.ops.size(); ++i) {
    const OpCost& op = in.per_rank_cost.ops[i];
    const double rate = op.matmul_like ? matmul_rate : vector_rate;
    const double forward = RooflineSeconds(op.fwd_flops, op.fwd_bytes, rate, byte_rate);
    t.forward_s += forward;
    t.backward_s += RooflineSeconds(op.bwd_flops, op.bwd_bytes, rate, byte_rate);
    if (i < in.recomputed_ops.size() && in.recomputed_ops[i]) t.recompute_s += forward;
  }
  t.backward_s += t.recompute_s;
}

// Step 2: the optimizer step, memory-bound.
void AddOptimizerSeconds(const StepTimeInputs& in, StepTime& t) {
  const double byte_rate = in.gpu.memory_bandwidth_gb_per_s * kGiga * in.efficiency.memory_bandwidth_fraction;
  const double bytes = static_cast<double>(OptimizerPasses(in.optimizer)) *
                       static_cast<double>(in.optimizer_param_bytes);
  t.optimizer_s = RooflineSeconds(0, bytes, 1, byte_rate);
}

// Steps 3 and 4: every collective's time, then what of it the compute of its phase hides.
void AddCommSeconds(const StepTimeInputs& in, StepTime& t) {
  constexpr size_t kPhases = 3;
  std::array<double, kPhases> overlapped{}, blocking{}, largest_overlapped{};
  for (const Collective& c : in.collectives) {
    const Interconnect& link = c.crosses_nodes ? in.inter_node : in.intra_node;
    CollectiveTime ct;
    ct.what = c.what;
    ct.link = link.name;
    ct.phase = c.phase;
    ct.overlapped = c.overlapped;
    ct.seconds = CollectiveSeconds(c, link);
    t.comm_s += ct.seconds;
    const auto p = static_cast<size_t>(c.phase);
    if (c.overlapped) {
      overlapped[p] += ct.seconds;
      const double one = c.count > 0 ? ct.seconds / c.count : 0;
      largest_overlapped[p] = std::max(largest_overlapped[p], one);
    } else {
      blocking[p] += ct.seconds;
    }
    t.collectives.push_back(std::move(ct));
  }
  const std::array<double, kPhases> compute = {t.forward_s, t.backward_s, t.optimizer_s};
  for (size_t p = 0; p < kPhases; ++p) {
    double exposed = std::max(0.0, overlapped[p] - compute[p]);
    if (in.efficiency.expose_one_overlapped_collective) exposed = std::max(exposed, largest_overlapped[p]);
    t.exposed_comm_s += blocking[p] + exposed;
  }
}

// The assumptions behind an estimate, in plain words, with the figures used.
std::vector<std::string> Assumptions(const StepTimeInputs& in) {
  const auto& eff = in.efficiency;
  const auto& gpu = in.gpu;
  std::vector<std::string> a;
  a.push_back("compute: each op takes max(FLOPs / (" + Percent(eff.compute_fraction) + " of peak), bytes / (" +
              Percent(eff.memory_bandwidth_fraction) + " of memory bandwidth)), a roofline; " +
              Percent(eff.compute_fraction) + " sits between large cuBLAS GEMMs (70-80%) and Megatron-LM's 52% " +
              "over whole GPT steps on A100 (Narayanan et al., SC21)");
  a.push_back("matmul-like ops (linear, matmul, bmm, einsum, attention) on " + gpu.name + " in " +
              std::string(sim::PrecisionName(in.precision)) + ": " + MatmulPeakWords(gpu, in.precision));
  a.push_back("other ops: " + Fixed(gpu.fp32_tflops, 1) + " TFLOP/s fp32 on the CUDA cores; memory bandwidth " +
              Fixed(gpu.memory_bandwidth_gb_per_s, 0) + " GB/s (NVIDIA datasheet)");
  a.push_back("FLOP counts: a multiply-add is 2 FLOPs, elementwise ops 1 per element; attention counts its two "
              "matmuls, halved pairs when the op is causal, and its fused backward 2.5x forward (it recomputes "
              "the scores; FlashAttention's benchmark convention); other backwards ~1-2x forward (graph/op_flops.h)");
  if (in.precision == sim::Precision::kBf16Autocast || in.precision == sim::Precision::kFp16Autocast) {
    a.push_back("autocast: matmul-like ops read and write 16-bit copies of their operands (the casts counted); "
                "other ops are costed at the dtypes of the fp32 trace, slightly high for those that read a "
                "matmul's 16-bit output");
  }
  a.push_back("kernel launch and CPU dispatch overheads are not modelled: steps made of many tiny ops run slower "
              "than estimated");
  if (!in.forward_only) {
    a.push_back("optimizer: " + OptimizerStepWords(in.optimizer) + " makes " +
                std::to_string(OptimizerPasses(in.optimizer)) + " memory-bound passes over the " +
                FormatBytes(in.optimizer_param_bytes) + " of parameters this rank updates");
  }
  bool uses_intra = false, uses_inter = false;
  for (const Collective& c : in.collectives) {
    if (c.group_size <= 1) continue;
    (c.crosses_nodes ? uses_inter : uses_intra) = true;
  }
  auto link_words = [](const char* role, const Interconnect& l) {
    return std::string(role) + " link " + l.name + " (" + l.description + "): " +
           Fixed(l.bandwidth_bytes_per_s / kGiga, 1) + " GB/s per GPU per direction; NCCL bus bandwidth " +
           Percent(l.bus_bandwidth_fraction) + " of it (" + l.fraction_source + "); latency " +
           Fixed(l.base_latency_s / kMicro, 1) + " us + " + Fixed(l.step_latency_s / kMicro, 1) +
           " us per ring step (NCCL src/graph/tuning.cc, ring/Simple)";
  };
  if (uses_intra) a.push_back(link_words("intra-node", in.intra_node));
  if (uses_inter) {
    a.push_back(link_words("inter-node", in.inter_node));
    a.push_back("a group spanning nodes runs at the network's per-GPU bandwidth: one NIC per GPU");
  }
  if (uses_intra || uses_inter) {
    a.push_back("collectives use NCCL's ring: all-reduce moves 2(n-1)/n x bytes, all-gather and reduce-scatter "
                "(n-1)/n x bytes, broadcast the bytes, at the bus bandwidth; NVLink SHARP, trees and in-network "
                "reductions are not modelled");
    a.push_back(std::string("overlapped collectives hide behind the compute of their phase") +
                (eff.expose_one_overlapped_collective
                     ? ", except the largest one of each phase (the first prefetch or the last gradient bucket has "
                       "no compute to hide behind)"
                     : "") +
                "; overlapped communication is assumed not to slow the compute (NCCL kernels do take SMs and "
                "memory bandwidth)");
  }
  if (!in.per_rank_cost.generic_kinds.empty()) {
    std::string kinds;
    for (const auto& k : in.per_rank_cost.generic_kinds) kinds += (kinds.empty() ? "" : ", ") + k;
    a.push_back("ops without a cost rule, costed as elementwise: " + kinds);
  }
  if (std::find(in.recomputed_ops.begin(), in.recomputed_ops.end(), true) != in.recomputed_ops.end()) {
    a.push_back("activation checkpointing: backward runs the forward of every checkpointed layer again (each "
                "recomputed op's forward roofline is added to the backward time; the LM head is not recomputed; "
                "non-reentrant's early stop skips the ops after a layer's last saved tensor, counted here anyway)");
  }
  a.push_back("not modelled: pipeline bubbles, gradient clipping, data loading");
  return a;
}

}  // namespace

CostOptions CostOptionsFor(sim::Precision precision) {
  CostOptions o;
  switch (precision) {
    case sim::Precision::kFp32:
      break;
    case sim::Precision::kBf16Autocast:
      o.matmul_dtype = DType::kBF16;
      break;
    case sim::Precision::kFp16Autocast:
      o.matmul_dtype = DType::kF16;
      break;
    case sim::Precision::kBf16:
      o.bf16_weights = true;
      break;
  }
  return o;
}

double MatmulPeakFlops(const sim::GpuSpec& gpu, sim::Precision precision) {
  switch (precision) {
    case sim::Precision::kFp32:
      return gpu.fp32_tflops * kTera;
    case sim::Precision::kFp16Autocast:
      return gpu.fp16_tflops * kTera;
    case sim::Precision::kBf16Autocast:
    case sim::Precision::kBf16:
      return (gpu.bf16_tensor_cores ? gpu.bf16_tflops : gpu.fp32_tflops) * kTera;
  }
  return gpu.fp32_tflops * kTera;
}

double RooflineSeconds(double flops, double bytes, double flops_per_s, double bytes_per_s) {
  const double compute = flops > 0 && flops_per_s > 0 ? flops / flops_per_s : 0;
  const double memory = bytes > 0 && bytes_per_s > 0 ? bytes / bytes_per_s : 0;
  return std::max(compute, memory);
}

double CollectiveSeconds(const Collective& c, const Interconnect& link) {
  const int n = c.group_size;
  if (n <= 1 || c.bytes <= 0 || c.count <= 0) return 0;
  const double bytes = static_cast<double>(c.bytes);
  const double ring = static_cast<double>(n - 1) / n;
  double traffic = 0;  // bytes each GPU sends (and receives) over its link
  int steps = 0;       // ring steps, each paying the link's latency
  switch (c.kind) {
    case CollectiveKind::kAllReduce:  // reduce-scatter, then all-gather
      traffic = 2 * ring * bytes;
      steps = 2 * (n - 1);
      break;
    case CollectiveKind::kAllGather:
    case CollectiveKind::kReduceScatter:
      traffic = ring * bytes;
      steps = n - 1;
      break;
    case CollectiveKind::kBroadcast:  // pipelined along the ring: every GPU receives the whole buffer
      traffic = bytes;
      steps = n - 1;
      break;
  }
  const double bus = link.bus_bandwidth_bytes_per_s();
  const double one = link.base_latency_s + steps * link.step_latency_s + (bus > 0 ? traffic / bus : 0);
  return c.count * one;
}

int OptimizerPasses(sim::OptimizerKind optimizer) {
  switch (optimizer) {
    case sim::OptimizerKind::kAdamW: return kAdamWForeachPasses;
    case sim::OptimizerKind::kSgdMomentum: return kSgdMomentumForeachPasses;
    case sim::OptimizerKind::kSgdNoMomentum: return kSgdForeachPasses;
    case sim::OptimizerKind::kAdafactor: return kAdafactorPasses;
    case sim::OptimizerKind::kAdamW8bit:
    case sim::OptimizerKind::kPagedAdamW8bit: return kAdamW8bitPasses;
  }
  return kAdamWForeachPasses;
}



std::vector<bool> RecomputedOps(const Graph& graph, const sim::TrainingConfig& config) {
  if (config.checkpointing.mode == sim::CheckpointingMode::kNone) return {};
  const sim::StepPlan plan = sim::BuildStepPlan(graph, config);
  std::vector<bool> recomputed(plan.ops.size());
  for (size_t i = 0; i < plan.ops.size(); ++i) recomputed[i] = plan.ops[i].save == sim::SavePolicy::kRecompute;
  return recomputed;
}

StepTime EstimateStepTime(const StepTimeInputs& inputs) {
  StepTime t;
  AddComputeSeconds(inputs, t);    // Step 1: forward and backward, a roofline per op
  AddOptimizerSeconds(inputs, t);  // Step 2: the optimizer step
  AddCommSeconds(inputs, t);       // Steps 3-4: collectives and their overlap
  t.total_s = t.forward_s + t.backward_s + t.optimizer_s + t.exposed_comm_s;  // Step 5
  t.assumptions = Assumptions(inputs);
  return t;
}

}  // namespace llmem::dist
