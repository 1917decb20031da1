#include "graph/pickle_value.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

#include "graph/error.h"

namespace llmem {
namespace {

using Value = std::shared_ptr<PickleValue>;

class PlainPickleEvaluator {
 public:
  PlainPickleEvaluator(std::string_view bytes, const std::string& where, size_t max_depth)
      : b_(bytes), where_(where), max_depth_(max_depth) {}

  Value Run() {
    while (at_ < b_.size()) {
      op_at_ = at_;
      const auto op = static_cast<unsigned char>(b_[at_++]);
      if (op == '.') {  // STOP
        if (stack_.empty()) Fail("STOP with an empty stack");
        return stack_.back();
      }
      Step(op);
    }
    Fail("no STOP opcode");
  }

 private:
  [[noreturn]] void Fail(const std::string& what) const {
    throw ModelLoadError(where_ + " is damaged (" + what + " at byte " + std::to_string(op_at_) + ")");
  }

  uint64_t Unsigned(size_t width) {
    if (width > b_.size() - at_) Fail("an opcode's argument past the stream's end");
    uint64_t v = 0;
    for (size_t i = 0; i < width; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(b_[at_ + i])) << (8 * i);
    at_ += width;
    return v;
  }
  std::string_view Bytes(uint64_t n) {
    if (n > b_.size() - at_) Fail("an opcode's argument past the stream's end");
    const std::string_view s = b_.substr(at_, n);
    at_ += n;
    return s;
  }
  std::string_view Line() {
    const size_t end = b_.find('\n', at_);
    if (end == std::string_view::npos) Fail("an unterminated line argument");
    const std::string_view s = b_.substr(at_, end - at_);
    at_ = end + 1;
    return s;
  }

  void Push(Value v) { stack_.push_back(std::move(v)); }
  void PushScalar(PickleValue::Kind kind, int64_t integer = 0) {
    auto v = std::make_shared<PickleValue>();
    v->kind = kind;
    v->integer = integer;
    Push(std::move(v));
  }
  Value Pop() {
    if (stack_.size() <= Floor()) Fail("an opcode with too few values on the stack");
    Value v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  // Values above the innermost MARK belong to it; nothing below it may be popped by other opcodes.
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  std::vector<Value> PopToMark() {
    if (marks_.empty()) Fail("an opcode that needs a MARK without one");
    std::vector<Value> items(stack_.begin() + static_cast<std::ptrdiff_t>(marks_.back()), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }

  // A container of `items`: each becomes contained, and the container's depth must stay within the limit.
  template <typename Items>
  void Adopt(PickleValue& container, Items items) {
    for (auto& item : items) {
      if (item.get() == &container) Fail("a list appended to itself");
      container.depth = std::max(container.depth, item->depth + 1);
      contained_.insert(item.get());
      container.items.push_back(std::move(item));
    }
    if (container.depth > max_depth_) Fail("values nested deeper than " + std::to_string(max_depth_));
  }
  void PushContainer(PickleValue::Kind kind, std::vector<Value> items) {
    auto v = std::make_shared<PickleValue>();
    v->kind = kind;
    v->depth = 1;
    Adopt(*v, std::move(items));
    Push(std::move(v));
  }
  void Append(std::vector<Value> items) {
    Value list = Pop();
    if (list->kind != PickleValue::Kind::kList) Fail("APPEND to a value that is not a list");
    // A list inside another value has parents whose depth would not see the new elements.
    if (contained_.count(list.get())) Fail("APPEND to a list already inside another value");
    Adopt(*list, std::move(items));
    Push(std::move(list));
  }
  void Memoize(uint64_t index) {
    if (stack_.empty()) Fail("PUT with an empty stack");
    memo_[index] = stack_.back();
  }
  void Recall(uint64_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) Fail("GET of memo entry " + std::to_string(index) + ", never PUT");
    Push(it->second);
  }

  void Step(unsigned char op) {
    using Kind = PickleValue::Kind;
    switch (op) {
      case 0x80: Unsigned(1); break;  // PROTO
      case 0x95: Unsigned(8); break;  // FRAME: a hint for readers that buffer
      case '(': marks_.push_back(stack_.size()); break;
      case 'N': PushScalar(Kind::kNone); break;
      case 0x88: PushScalar(Kind::kBool, 1); break;
      case 0x89: PushScalar(Kind::kBool, 0); break;
      case 'K': PushScalar(Kind::kInt, static_cast<int64_t>(Unsigned(1))); break;
      case 'M': PushScalar(Kind::kInt, static_cast<int64_t>(Unsigned(2))); break;
      case 'J': PushScalar(Kind::kInt, static_cast<int32_t>(static_cast<uint32_t>(Unsigned(4)))); break;
      case 0x8a: {  // LONG1: a little-endian two's-complement integer of n bytes
        const uint64_t n = Unsigned(1);
        if (n > 8) Fail("an integer wider than 64 bits");
        uint64_t v = Unsigned(n);
        if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);
        PushScalar(Kind::kInt, static_cast<int64_t>(v));
        break;
      }
      case 'G': {  // BINFLOAT: big-endian IEEE double
        uint64_t bits = 0;
        for (char c : Bytes(8)) bits = bits << 8 | static_cast<unsigned char>(c);
        auto v = std::make_shared<PickleValue>();
        v->kind = Kind::kFloat;
        std::memcpy(&v->real, &bits, sizeof bits);
        Push(std::move(v));
        break;
      }
      case 0x8c: case 'X': case 0x8d: {  // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
        const std::string_view s = Bytes(Unsigned(op == 0x8c ? 1 : op == 'X' ? 4 : 8));
        auto v = std::make_shared<PickleValue>();
        v->kind = Kind::kString;
        v->text = std::string(s);
        Push(std::move(v));
        break;
      }
      case ')': PushContainer(Kind::kTuple, {}); break;
      case 't': PushContainer(Kind::kTuple, PopToMark()); break;
      case 0x85: case 0x86: case 0x87: {  // TUPLE1, TUPLE2, TUPLE3
        std::vector<Value> items(op - 0x84);
        for (auto it = items.rbegin(); it != items.rend(); ++it) *it = Pop();
        PushContainer(Kind::kTuple, std::move(items));
        break;
      }
      case ']': PushContainer(Kind::kList, {}); break;
      case 'l': PushContainer(Kind::kList, PopToMark()); break;
      case 'a': { Value item = Pop(); Append({std::move(item)}); break; }
      case 'e': { std::vector<Value> items = PopToMark(); Append(std::move(items)); break; }
      case 'q': Memoize(Unsigned(1)); break;
      case 'r': Memoize(Unsigned(4)); break;
      case 0x94: Memoize(memo_.size()); break;  // MEMOIZE
      case 'h': Recall(Unsigned(1)); break;
      case 'j': Recall(Unsigned(4)); break;
      case 'c': {  // GLOBAL: module and name, one line each
        auto v = std::make_shared<PickleValue>();
        v->kind = Kind::kGlobal;
        v->text = std::string(Line());
        v->text += "." + std::string(Line());
        Push(std::move(v));
        break;
      }
      case 'R': {  // REDUCE: callable(*args)
        Value args = Pop();
        Value callable = Pop();
        if (callable->kind != Kind::kGlobal || args->kind != Kind::kTuple) Fail("REDUCE of a value that is not a global");
        auto v = std::make_shared<PickleValue>();
        v->kind = Kind::kReduce;
        v->text = callable->text;
        v->depth = 1;
        Adopt(*v, args->items);
        Push(std::move(v));
        break;
      }
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        Fail(std::string("pickle opcode ") + hex + ", which plain data does not use");
      }
    }
  }

  std::string_view b_;
  const std::string& where_;
  size_t max_depth_;
  size_t at_ = 0, op_at_ = 0;
  std::vector<Value> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Value> memo_;
  std::unordered_set<const PickleValue*> contained_;
};

}  // namespace

std::shared_ptr<const PickleValue> EvaluatePlainPickle(std::string_view bytes, const std::string& where,
                                                       size_t max_depth) {
  return PlainPickleEvaluator(bytes, where, max_depth).Run();
}

}  // namespace llmem
