// When the forward pass releases each value: the op after which the program drops its last reference.
//
// Note [Eager lifetimes]
// The user's program is eager Python (Hugging Face modules), where a tensor lives as long as a Python reference
// holds it: CPython frees an object when its reference count drops to zero. A temporary of an expression dies
// right after its last use, but a value handed between module calls is held by a frame: a result that a module
// returns (`logits = self.lm_head(h)`, `outputs = self.model(...)`) is bound by the caller and, as far as the
// graph can tell, kept until the caller's call returns; an argument passed into a module call is held by the
// caller and by the callee's parameter until that call returns. So under kEager a value whose producer and users
// lie in different module calls lives until
//   - the end of the call of the innermost module that encloses its producer and every user (the frame holding
//     it), when it leaves the module call that produced it, unless the frame's own code drops it by rebinding
//     its name to a cast of it (`x = x.to(torch.float32)`: its last use is a cast that the module's own forward
//     runs, OpNode::in_module_code), and at least
//   - the end of the child call that contains its last use, when that use lies in a module called from the
//     holding frame.
// A call nested in an expression of its caller (`self.down_proj(self.act_fn(self.gate_proj(x)))`, which the export
// records per module class, OpNode::temporary_calls) returns a temporary that nothing binds: it dies at its last
// use, unless that use hands it on unchanged (`self.lm_head(h).contiguous()` returns the same tensor, which the
// caller then binds). Values that stay inside one module call are freed at their last use, as are all values under kTorchScript
// (the TorchScript interpreter drops a value after its last use, as `llmem measure` runs it). The module calls
// are read from each op's module path (OpNode::scope): a call is a maximal run of consecutive ops whose paths
// lie inside the module's path. The graph does not say which locals a frame rebinds; the export reads it from the
// forward's source (OpNode::rebindings): `hidden_states = self.input_layernorm(x)` is rebound by
// `hidden_states, _ = self.self_attn(hidden_states=hidden_states, ...)`, so the norm's result dies when self_attn
// returns; `hidden_states = self.ln_1(x)` is rebound by `hidden_states = attn_output + residual`, a statement that
// calls no child, so it dies before the frame's next call of a child the source does not call in between (ln_2). The
// export records a rule only when every call of the child binds a name that a later statement of the same or an
// enclosing block rebinds, with no other reference taken meanwhile (`residual = x`, a tuple, a call other than a
// child module or a torch function), and for a tuple target (`x, w = self.attn(...)`) the rule holds only when the
// call returns one tensor. Without a rule a returned value is assumed bound until the frame returns: where the
// program rebinds it earlier the estimate holds it a little longer than the program does, never shorter.
//
// Not modelled: locals bound inside one module's forward (a helper's local that outlives its last use), and
// values that a Python object outside the graph keeps.
#pragma once

#include <cstdint>
#include <vector>

#include "graph/graph.h"
#include "simulator/training_config.h"

namespace llmem::sim {

// Per value: the index of the op after which the forward releases it; -1 for a value no op produces or uses;
// nodes().size() for the loss (held until backward). Parameters and graph inputs get their last use like any
// value (the caller decides whether they are released).
std::vector<int32_t> ForwardReleasePoints(const Graph& graph, Lifetimes lifetimes);

}  // namespace llmem::sim
