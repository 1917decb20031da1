// The check of an archive's TorchScript code (graph/torchscript_code_check.h): what torch.jit.save writes passes,
// statements that would nest LibTorch's parser past the limit are refused.
#include "graph/torchscript_code_check.h"

#include <gtest/gtest.h>

#include <string>

#include "graph/error.h"

namespace llmem {
namespace {

// From the bundled Llama export's code/__torch__/transformers/models/llama/modeling_llama.py.
const std::string kExported =
    "  def forward(self: __torch__.LlamaAttention,\n"
    "    argument_1: Tensor) -> Tensor:\n"
    "    _0 = torch.view(argument_1, [2, 5, -1, 8])\n"
    "    attn_output = torch.scaled_dot_product_attention(query, key, _90, torch.slice(_95, 3, 0, _92), 0., False, "
    "scale=0.35355339059327379)\n"
    "    return torch.add(torch.mul(_0, 2), _1)  # a comment - + - +\n";

std::string Refusal(const std::string& code) {
  try {
    CheckTorchScriptCode(code, "m.pt's code/m.py");
  } catch (const ModelLoadError& e) {
    return e.what();
  }
  return "";
}

TEST(TorchScriptCodeCheckTest, ExportedCodePasses) { EXPECT_EQ(Refusal(kExported), ""); }

TEST(TorchScriptCodeCheckTest, AStatementNestingPastTheLimitIsRefused) {
  // Unary minuses: 5,000 of them overflowed LibTorch's parser; up to the limit they are only an odd statement.
  // The assignment and n - 1 unary minuses, not indented: n tokens.
  const auto minuses = [](size_t n) { return kExported + "_1 = " + std::string(n - 1, '-') + "_0\n"; };
  EXPECT_EQ(Refusal(minuses(kMaxStatementNesting)), "");
  const std::string r = Refusal(minuses(kMaxStatementNesting + 1));
  EXPECT_NE(r.find("m.pt's code/m.py is damaged (a statement at line 6 nests more than 1000"), std::string::npos)
      << r;
  // An addition chain and the keyword operators count the same way.
  std::string chain = "    _1 = _0";
  for (size_t i = 0; i < kMaxStatementNesting; ++i) chain += i % 2 ? " + _0" : " and _0";
  EXPECT_NE(Refusal(chain + "\n").find("nests more than"), std::string::npos);
}

TEST(TorchScriptCodeCheckTest, BracketsCarryAStatementPastItsNewlines) {
  const size_t n = kMaxStatementNesting + 1;
  std::string spread = "    _1 = ";
  for (size_t i = 0; i < n; ++i) spread += "(\n";
  spread += "_0" + std::string(n, ')') + "\n";
  EXPECT_NE(Refusal(spread).find("a statement at line 1 nests"), std::string::npos) << Refusal(spread);
  // The same tokens over many statements are what a long forward is.
  std::string many;
  for (size_t i = 0; i < n; ++i) many += "    _1 = torch.neg(-_0)\n";
  EXPECT_EQ(Refusal(many), "");
}

TEST(TorchScriptCodeCheckTest, NestedBlocksCountByIndentation) {
  // 8,000 nested `if` blocks overflowed LibTorch's parser; each needs one more column of indentation.
  const auto indented = [](size_t columns) { return kExported + std::string(columns, ' ') + "pass\n"; };
  EXPECT_EQ(Refusal(indented(kMaxStatementNesting)), "");
  const std::string r = Refusal(indented(kMaxStatementNesting + 1));
  EXPECT_NE(r.find("a statement at line 6 nests more than 1000 blocks"), std::string::npos) << r;
  // Inside brackets, a line's leading spaces are layout, not blocks.
  EXPECT_EQ(Refusal("_1 = torch.cat([\n" + std::string(3 * kMaxStatementNesting, ' ') + "_0])\n"), "");
}

TEST(TorchScriptCodeCheckTest, StringsAndCommentsAreNotCounted) {
  const std::string dashes(3 * kMaxStatementNesting, '-');
  EXPECT_EQ(Refusal("    _1 = \"" + dashes + "\\\"\"\n"), "");  // an escaped quote inside
  EXPECT_EQ(Refusal("    _1 = '''" + dashes + "\n" + dashes + "'''\n"), "");
  EXPECT_EQ(Refusal("    # " + dashes + "\n    _1 = _0\n"), "");
}

}  // namespace
}  // namespace llmem
