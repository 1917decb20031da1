// The intra-op threads PyTorch runs CPU kernels with in a process on this machine (at::get_num_threads(): the
// physical cores, or OMP_NUM_THREADS / torch.set_num_threads where set). CPU kernels size per-thread buffers by it,
// so a CPU target's estimate of a real run on this machine needs it.
#pragma once

namespace llmem::measure {

int TorchIntraOpThreads();

}  // namespace llmem::measure
