// How long one training step takes on one rank of a parallel layout: compute from a roofline per op, NCCL
// collectives from ring formulas, their overlap with the compute of their phase, and the optimizer step.
//
// Usage:
//   StepTimeInputs in;
//   in.per_rank_cost = SumCosts(rank_graph, CostOptionsFor(precision));  // graph/op_flops.h
//   in.precision = precision;
//   in.gpu = *sim::FindGpu("a100-80");
//   in.intra_node = *FindInterconnect(in.gpu.intra_node_link);
//   in.inter_node = *FindInterconnect("ib-hdr");
//   in.collectives = ...;                      // the method's CollectiveList (distributed/collective.h)
//   in.optimizer_param_bytes = ...;            // parameter bytes this rank's optimizer updates
//   StepTime t = EstimateStepTime(in);         // t.total_s, and t.assumptions to print
//
// The model (Note [Step time]):
// 1. Compute. Each op takes max(FLOPs / (peak x compute_fraction), bytes / (memory bandwidth x
//    memory_bandwidth_fraction)), forward and backward apart. Matmul-like ops are held to the matmul peak of the
//    precision: fp32 runs on the CUDA cores (PyTorch leaves torch.backends.cuda.matmul.allow_tf32 False since
//    1.12), autocast and pure bf16 on the tensor cores. Every other op is held to the fp32 CUDA-core peak.
// 2. Optimizer step: memory-bound; PyTorch's foreach implementation makes a known number of passes over the
//    parameter-sized tensors (OptimizerPasses), each pass reading or writing the updated parameter bytes once.
// 3. Collectives: ring algorithm over the link of the group (the inter-node network when it crosses nodes):
//    all-reduce 2(n-1)/n x bytes / bus bandwidth, all-gather and reduce-scatter (n-1)/n x bytes, broadcast
//    bytes; plus NCCL's latency, base + per ring step (distributed/interconnect.h).
// 4. Overlap: within a phase, overlapped collectives hide behind that phase's compute (exposed = max(0, comm -
//    compute)), except that one of them, the largest, is always exposed: the first prefetch has nothing before
//    it and the last gradient bucket nothing after it. Collectives that are not overlapped add in full.
// 5. total = forward + backward + optimizer + exposed communication.
// Activation checkpointing runs the forward of every recomputed op again in backward: its forward roofline is
// added to the backward time (recompute_s). Non-reentrant checkpointing stops the recompute at a layer's last
// saved tensor; the ops after it (a residual add) are counted anyway, slightly high.
//
// What it does not model: kernel launch and CPU dispatch overheads (they matter when ops take a few us: tiny
// models or batches), the slowdown overlapped NCCL kernels cause to compute, pipeline bubbles, gradient
// clipping, data loading. The assumptions list of every StepTime says so.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distributed/collective.h"
#include "distributed/interconnect.h"
#include "graph/op_flops.h"
#include "simulator/gpu_catalog.h"
#include "simulator/training_config.h"

namespace llmem::dist {

// The model's named efficiency assumptions; EstimateStepTime prints each one it uses.
struct EfficiencyAssumptions {
  // Share of the peak FLOP rate kernels reach. 0.6: below the 70-80% cuBLAS reaches on large GEMMs, above the 52%
  // of peak Megatron-LM sustains over whole GPT training steps on A100 (Narayanan et al., SC21: 163 of 312
  // TFLOP/s), which also pays for communication and memory-bound ops, modelled separately here.
  double compute_fraction = 0.6;
  // Share of the datasheet memory bandwidth memory-bound kernels reach. 0.8: streaming copies reach 80-90%, and
  // real kernels access memory less regularly.
  double memory_bandwidth_fraction = 0.8;
  // The largest overlapped collective of a phase stays exposed (see Note [Step time], step 4).
  bool expose_one_overlapped_collective = true;
};

struct StepTimeInputs {
  GraphCost per_rank_cost;                                  // SumCosts of the per-rank graph
  sim::Precision precision = sim::Precision::kFp32;          // picks the matmul peak
  sim::GpuSpec gpu;                                          // peaks and memory bandwidth
  Interconnect intra_node;                                   // link of collectives within a node
  Interconnect inter_node;                                   // link of collectives that cross nodes
  CollectiveList collectives;                                // what the parallel method communicates per step
  int64_t optimizer_param_bytes = 0;                         // bytes of the parameters this rank's optimizer
                                                             // updates (its shard under ZeRO), in their dtype
  sim::OptimizerKind optimizer = sim::OptimizerKind::kAdamW;
  // Per op of per_rank_cost: activation checkpointing recomputes it in backward (RecomputedOps; empty: none).
  std::vector<bool> recomputed_ops;
  EfficiencyAssumptions efficiency;
  bool forward_only = false;  // a forward without backward or optimizer (generation): their assumptions go unsaid
};

// Time of one entry of the CollectiveList.
struct CollectiveTime {
  std::string what;      // Collective::what
  std::string link;      // Interconnect::name it ran over
  StepPhase phase = StepPhase::kBackward;
  bool overlapped = false;
  double seconds = 0;    // all Collective::count instances
};

struct StepTime {
  double forward_s = 0;       // forward compute
  double backward_s = 0;      // backward compute, recompute_s included
  double recompute_s = 0;     // the forward of the ops activation checkpointing recomputes in backward
  double optimizer_s = 0;     // optimizer step
  double comm_s = 0;          // every collective, in full
  double exposed_comm_s = 0;  // the part of comm_s not hidden behind compute
  double total_s = 0;         // forward_s + backward_s + optimizer_s + exposed_comm_s
  std::vector<CollectiveTime> collectives;  // one per CollectiveList entry, in its order
  std::vector<std::string> assumptions;     // every assumption used, in plain words, for the CLI to print
};

StepTime EstimateStepTime(const StepTimeInputs& inputs);

// --- Building blocks, exposed for tests ---

// The op-cost options that match a precision: autocast computes matmuls in 16 bits, pure bf16 reads every dtype
// of the bf16-weights run.
CostOptions CostOptionsFor(sim::Precision precision);

// FLOP/s peak of matmul-like ops in `precision` on `gpu` (see Note [Step time], step 1).
double MatmulPeakFlops(const sim::GpuSpec& gpu, sim::Precision precision);

// max(flops / flops_per_s, bytes / bytes_per_s).
double RooflineSeconds(double flops, double bytes, double flops_per_s, double bytes_per_s);

// Seconds of all `count` instances of `c` over `link`, ring algorithm; 0 for a group of one.
double CollectiveSeconds(const Collective& c, const Interconnect& link);

// Per op of `graph`: whether the recipe's activation checkpointing runs its forward again in backward (the ops
// the step plan marks kRecompute); empty without checkpointing.
std::vector<bool> RecomputedOps(const Graph& graph, const sim::TrainingConfig& config);

// Passes over parameter-sized tensors of PyTorch's foreach optimizer step (torch/optim/adam.py
// _multi_tensor_adam, torch/optim/sgd.py _multi_tensor_sgd); see the .cc for the count.
int OptimizerPasses(sim::OptimizerKind optimizer);

}  // namespace llmem::dist
