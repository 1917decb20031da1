#include "simulator/paged_kv_pool.h"

#include <cmath>
#include <string>

#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem::sim {

int64_t BlocksFor(int64_t tokens, int64_t block_size) { return (tokens + block_size - 1) / block_size; }

PagedPool SizePagedPool(const PagedPoolInputs& in) {
  if (!(in.gpu_memory_utilization > 0 && in.gpu_memory_utilization <= 1)) {
    throw ConfigError("--gpu-memory-utilization must be in (0, 1] (got " + std::to_string(in.gpu_memory_utilization) +
                      ")");
  }
  if (in.block_size < 1 || in.layers < 1 || in.kv_heads < 1 || in.head_size < 1 || in.kv_element_bytes < 1 ||
      in.max_model_len < 1) {
    throw ConfigError("a paged KV cache needs a positive block size, layer count, key/value heads, head size and "
                      "max model length");
  }
  PagedPool p;
  // vLLM keeps requested_memory a float and truncates the difference: int(requested - non_kv_cache_memory).
  const double requested = static_cast<double>(in.total_memory_bytes) * in.gpu_memory_utilization;
  const int64_t non_kv = CheckedAdd(CheckedAdd(in.weights_bytes, in.profile_peak_bytes, "non-KV memory"),
                                    in.non_torch_bytes, "non-KV memory");
  p.requested_bytes = static_cast<int64_t>(requested);
  p.available_bytes = static_cast<int64_t>(std::trunc(requested - static_cast<double>(non_kv)));
  p.page_bytes = CheckedMul(CheckedMul(CheckedMul(2 * in.block_size, in.kv_heads, "KV page"), in.head_size, "KV page"),
                            in.kv_element_bytes, "KV page");
  p.block_bytes = CheckedMul(p.page_bytes, in.layers, "KV block");
  p.num_blocks = p.available_bytes > 0 ? p.available_bytes / p.block_bytes : 0;
  p.tokens = p.num_blocks * in.block_size;
  p.blocks_per_max_len_request = BlocksFor(in.max_model_len, in.block_size);
  p.max_concurrency = static_cast<double>(p.num_blocks) / static_cast<double>(p.blocks_per_max_len_request);
  p.holds_one_max_len_request = p.num_blocks >= p.blocks_per_max_len_request;
  const int64_t free_at_start = in.free_at_start_bytes < 0 ? in.total_memory_bytes : in.free_at_start_bytes;
  p.requested_is_free = static_cast<double>(free_at_start) >= requested;
  return p;
}

}  // namespace llmem::sim
