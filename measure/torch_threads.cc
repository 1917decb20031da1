#include "measure/torch_threads.h"

#include <ATen/Parallel.h>

namespace llmem::measure {

int TorchIntraOpThreads() { return at::get_num_threads(); }

}  // namespace llmem::measure
