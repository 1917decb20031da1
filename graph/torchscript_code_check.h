// A check of a TorchScript archive's code (code/**.py) before LibTorch compiles it. LibTorch's parser and IR
// emitter recurse once per nested block, bracket, unary operator, binary operator of a chain and postfix access,
// on the thread's stack: one statement of 5,000 unary minuses or 20,000 additions, or 8,000 nested `if` blocks,
// overflowed it (a crash, not an error). What torch.jit.save writes is one op per statement (the bundled exports:
// indented at most 8 columns, at most 4 brackets deep, a dozen operators per statement), so a statement whose
// indentation plus such tokens exceed kMaxStatementNesting is refused.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace llmem {

inline constexpr size_t kMaxStatementNesting = 1000;

// Throws ModelLoadError "<where> is damaged (...)" for a statement that would nest past the limit.
void CheckTorchScriptCode(std::string_view code, const std::string& where);

}  // namespace llmem
