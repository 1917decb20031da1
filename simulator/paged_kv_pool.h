// vLLM's paged KV cache as its V1 engine sizes it at start-up (vllm/v1/worker/gpu_worker.py init_device and
// determine_available_memory, vllm/v1/core/kv_cache_utils.py, vllm/v1/kv_cache_interface.py FullAttentionSpec):
//
//   requested  = total GPU memory x gpu_memory_utilization, which must be free once the context and NCCL exist
//   available  = requested - (weights + the profile run's peak activations + non-torch memory it added)
//   page       = 2 (keys, values) x block_size x kv_heads x head_size x kv dtype bytes      (per layer, per block)
//   num_blocks = available // (page x layers)
//   a request of T tokens holds cdiv(T, block_size) blocks of every layer; max concurrency at max_model_len is
//   num_blocks / cdiv(max_model_len, block_size); the engine refuses to start when one max_model_len request does
//   not fit (check_enough_kv_cache_memory).
//
// What vLLM measures before the profile run (the CUDA context, NCCL's communicators) is outside `requested`, and the
// CUDA graphs it captures after allocating the pool are in neither: both must fit in the (1 - utilization) margin.
#pragma once

#include <cstdint>

namespace llmem::sim {

struct PagedPoolInputs {
  int64_t total_memory_bytes = 0;         // torch.cuda.mem_get_info()[1]
  int64_t free_at_start_bytes = -1;       // free once the CUDA context and NCCL exist (-1: the whole GPU)
  double gpu_memory_utilization = 0.9;    // vLLM's default
  int64_t weights_bytes = 0;              // the rank's model_memory_usage
  int64_t profile_peak_bytes = 0;         // torch peak increase of the profile run (activations)
  int64_t non_torch_bytes = 0;            // non-torch memory the profile run added
  int64_t block_size = 16;                // tokens per block (vLLM's default on CUDA)
  int64_t layers = 0;                     // attention layers with a KV cache
  int64_t kv_heads = 0;                   // key/value heads of each layer on this rank
  int64_t head_size = 0;
  int64_t kv_element_bytes = 2;           // kv_cache_dtype: auto = the model's dtype; fp8 = 1
  int64_t max_model_len = 0;              // the longest request the engine admits (prompt + generated)
};

struct PagedPool {
  int64_t requested_bytes = 0;
  int64_t available_bytes = 0;            // for the pool; <= 0: nothing left
  int64_t page_bytes = 0;                 // one block of one layer
  int64_t block_bytes = 0;                // one block of every layer
  int64_t num_blocks = 0;
  int64_t tokens = 0;                     // num_blocks x block_size
  int64_t blocks_per_max_len_request = 0;
  double max_concurrency = 0;             // requests of max_model_len tokens the pool holds at once
  bool holds_one_max_len_request = false;  // else vLLM refuses to start
  bool requested_is_free = false;          // the requested memory was free at start-up; else vLLM refuses to start
  bool starts() const { return requested_is_free && holds_one_max_len_request; }
};

// Throws ConfigError for inputs out of range (utilization outside (0, 1], a block size or a dimension < 1).
PagedPool SizePagedPool(const PagedPoolInputs& in);

// Blocks a sequence of `tokens` tokens holds in each layer.
int64_t BlocksFor(int64_t tokens, int64_t block_size);

}  // namespace llmem::sim
