// The value a pickle of plain data builds, evaluated by our own code: None, booleans, integers, floats, strings,
// tuples, lists, globals and REDUCE calls of them. It lets llmem check what a record holds before LibTorch reads
// it (debug_record_check.h). Any other opcode is refused; so are values nested deeper than asked, and appending
// to a list already inside another value (which no pickler writes for plain data, and which could build a cycle
// or nest past the limit unseen).
//
// Opcodes: CPython's Lib/pickletools.py. The stream's framing is assumed checked first (pickle_check.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace llmem {

struct PickleValue {
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kGlobal, kReduce };
  Kind kind = Kind::kNone;
  int64_t integer = 0;  // kInt, kBool
  double real = 0;      // kFloat
  std::string text;     // kString; "module.name" for kGlobal and for a kReduce's callable
  // kTuple and kList: the elements; kReduce: the arguments the callable was given.
  std::vector<std::shared_ptr<const PickleValue>> items;
  size_t depth = 0;  // 0 for a scalar, 1 + the deepest element for a container

  bool IsInt() const { return kind == Kind::kInt; }
  bool IsString() const { return kind == Kind::kString; }
  bool IsTuple(size_t n) const { return kind == Kind::kTuple && items.size() == n; }
};

// Throws ModelLoadError "<where> is damaged (...)" for a stream outside the plain-data subset.
std::shared_ptr<const PickleValue> EvaluatePlainPickle(std::string_view bytes, const std::string& where,
                                                       size_t max_depth);

}  // namespace llmem
