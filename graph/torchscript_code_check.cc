#include "graph/torchscript_code_check.h"

#include "graph/error.h"

namespace llmem {
namespace {

// The characters that can open one more level of LibTorch's recursion: brackets, operators, comparisons and
// attribute access.
bool NestingChar(char c) {
  switch (c) {
    case '(': case '[': case '{': case '.': case '+': case '-': case '*': case '/': case '%': case '@': case '&':
    case '|': case '^': case '~': case '<': case '>': case '=': case '!':
      return true;
    default:
      return false;
  }
}

bool WordChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

[[noreturn]] void Refuse(const std::string& where, size_t line) {
  throw ModelLoadError(where + " is damaged (a statement at line " + std::to_string(line) + " nests more than " +
                       std::to_string(kMaxStatementNesting) + " blocks, brackets and operators; torch.jit.save " +
                       "writes one op per statement)");
}

}  // namespace

void CheckTorchScriptCode(std::string_view code, const std::string& where) {
  size_t tokens = 0;     // nesting tokens in the current statement
  size_t brackets = 0;   // open brackets: a statement goes on past newlines inside them
  size_t line = 1, statement_line = 1;
  bool line_start = true;
  for (size_t i = 0; i < code.size(); ++i) {
    const char c = code[i];
    if (c == '\'' || c == '"') {  // a string literal: skip to its closing quote (escapes included)
      const bool triple = i + 2 < code.size() && code[i + 1] == c && code[i + 2] == c;
      const std::string_view close = triple ? code.substr(i, 3) : code.substr(i, 1);
      size_t j = i + close.size();
      while (j < code.size() && code.substr(j, close.size()) != close) {
        if (code[j] == '\\') ++j;
        if (j < code.size() && code[j] == '\n') ++line;
        ++j;
      }
      i = j + close.size() - 1;
      continue;
    }
    if (c == '#') {  // a comment, to the end of its line
      while (i + 1 < code.size() && code[i + 1] != '\n') ++i;
      continue;
    }
    if (c == '\n') {
      ++line;
      line_start = true;
      if (brackets == 0) {
        tokens = 0;
        statement_line = line;
      }
      continue;
    }
    // A statement's indentation is its depth of nested blocks, each one more level of the parser and emitter.
    if (c == ' ' || c == '\t') {
      if (line_start && brackets == 0 && ++tokens > kMaxStatementNesting) Refuse(where, statement_line);
      continue;
    }
    line_start = false;
    if (c == ';' && brackets == 0) {
      tokens = 0;
      continue;
    }
    if (c == '(' || c == '[' || c == '{') ++brackets;
    if ((c == ')' || c == ']' || c == '}') && brackets > 0) --brackets;
    bool counted = NestingChar(c);
    // The keyword operators (not, and, or, if ... else, lambda) nest as the symbols do.
    if (!counted && WordChar(c) && (i == 0 || !WordChar(code[i - 1]))) {
      size_t end = i;
      while (end < code.size() && WordChar(code[end])) ++end;
      const std::string_view word = code.substr(i, end - i);
      counted = word == "not" || word == "and" || word == "or" || word == "if" || word == "else" || word == "in" ||
                word == "is" || word == "lambda";
      i = end - 1;
    }
    if (counted && ++tokens > kMaxStatementNesting) Refuse(where, statement_line);
  }
}

}  // namespace llmem
