#include "graph/pickle_check.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <unordered_map>
#include <vector>

#include "graph/error.h"

namespace llmem {
namespace {

// How an opcode's argument is framed (pickletools.py's ArgumentDescriptor kinds, by encoding).
enum class Arg {
  kNone,
  kFixed1,       // one byte (BININT1, BINGET, BINPUT, PROTO, EXT1)
  kFixed2,       // BININT2, EXT2
  kFixed4,       // BININT, EXT4
  kFixed8,       // BINFLOAT, FRAME
  kMemo1,        // BINGET, BINPUT: a one-byte memo index
  kMemo4,        // LONG_BINGET, LONG_BINPUT: a four-byte memo index
  kCounted1,     // a one-byte length, then that many bytes
  kCounted4,     // a four-byte length, then that many bytes
  kCounted8,     // an eight-byte length, then that many bytes
  kLine,         // up to a newline
  kMemoLine,     // GET, PUT: a decimal memo index up to a newline
  kTwoLines,     // GLOBAL, INST: module and name, each up to a newline
};

Arg ArgumentOf(unsigned char op, bool& known) {
  known = true;
  switch (op) {
    case '(': case '.': case '0': case '1': case '2': case 'N': case 'R': case 'a': case 'b': case 'd': case '}':
    case 'e': case 'l': case ']': case 'o': case 's': case 't': case ')': case 'u': case 'Q':
    case 0x81: case 0x85: case 0x86: case 0x87: case 0x88: case 0x89: case 0x8f: case 0x90: case 0x91: case 0x92:
    case 0x93: case 0x94: case 0x97: case 0x98:
      return Arg::kNone;
    case 'K': case 0x80: case 0x82: return Arg::kFixed1;
    case 'M': case 0x83: return Arg::kFixed2;
    case 'J': case 0x84: return Arg::kFixed4;
    case 'G': case 0x95: return Arg::kFixed8;
    case 'h': case 'q': return Arg::kMemo1;
    case 'j': case 'r': return Arg::kMemo4;
    case 'U': case 'C': case 0x8c: case 0x8a: return Arg::kCounted1;
    case 'T': case 'X': case 'B': case 0x8b: return Arg::kCounted4;
    case 0x8d: case 0x8e: case 0x96: return Arg::kCounted8;
    case 'I': case 'L': case 'F': case 'S': case 'V': case 'P': return Arg::kLine;
    case 'g': case 'p': return Arg::kMemoLine;
    case 'c': case 'i': return Arg::kTwoLines;
    default: known = false; return Arg::kNone;
  }
}

// The nesting of the values a stream builds, followed opcode by opcode (their stack effects: pickletools.py).
// LibTorch frees an unpickled value recursively, so a stream of a million one-element tuples (1 KB deflated)
// overflowed its stack; values nested deeper than kMaxNesting are refused. A value may change (APPEND, SETITEMS,
// BUILD, ...) only through the stack entry that made it and before it is shared through the memo: the picklers
// of PyTorch and CPython fill a value before sharing it, and a change after would deepen its holders unseen.
constexpr uint32_t kMaxNesting = 1000;

class NestingTracker {
 public:
  explicit NestingTracker(const std::function<void(const std::string&)>& fail) : fail_(fail) {}

  void Mark() { marks_.push_back(stack_.size()); }
  void PushScalar() { stack_.push_back({}); }
  // A new value holding `children` values taken from the stack (and `from_mark` ones above the innermost MARK).
  void Make(size_t children, bool from_mark) { Push(1 + Take(children, from_mark)); }
  // A change of the value under the top `children` values (and those above the innermost MARK) to hold them.
  void Change(size_t children, bool from_mark) {
    const uint32_t inner = Take(children, from_mark);
    if (stack_.size() <= Floor()) fail_("an opcode that changes a value with no value to change");
    Entry& target = stack_.back();
    if (target.shared || (target.cell >= 0 && cells_[target.cell].shared)) {
      fail_("a value changed after it was shared");
    }
    target.depth = std::max(target.depth, 1 + inner);
    if (target.cell >= 0) cells_[target.cell].depth = target.depth;
    Check(target.depth);
  }
  void Pop() {
    if (stack_.size() > Floor()) {
      stack_.pop_back();
    } else if (!marks_.empty()) {
      marks_.pop_back();  // POP on an empty mark drops the mark (CPython's load_pop)
    } else {
      fail_("POP of an empty stack");
    }
  }
  void PopMark() { Take(0, true); }
  void Dup() {
    if (stack_.size() <= Floor()) fail_("DUP of an empty stack");
    Share(stack_.back());
    const Entry copy = stack_.back();
    stack_.push_back(copy);
  }
  void Put(uint64_t index) {
    if (stack_.empty()) fail_("PUT with an empty stack");
    Entry& top = stack_.back();
    if (top.cell < 0) {
      top.cell = static_cast<int32_t>(cells_.size());
      cells_.push_back({top.depth, false});
    }
    memo_[index] = top.cell;
  }
  void Get(uint64_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) fail_("GET of memo entry " + std::to_string(index) + ", never PUT");
    cells_[it->second].shared = true;
    stack_.push_back({cells_[it->second].depth, it->second, true});
  }
  size_t MemoSize() const { return memo_.size(); }

 private:
  struct Entry {
    uint32_t depth = 0;
    int32_t cell = -1;  // its memo cell, once PUT
    bool shared = false;
  };
  struct Cell {
    uint32_t depth;
    bool shared;  // a GET or DUP has taken it
  };

  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void Share(Entry& e) {
    e.shared = true;
    if (e.cell >= 0) cells_[e.cell].shared = true;
  }
  void Check(uint32_t depth) const {
    if (depth > kMaxNesting) fail_("values nested deeper than " + std::to_string(kMaxNesting));
  }
  void Push(uint32_t depth) {
    Check(depth);
    stack_.push_back({depth, -1, false});
  }
  // Pops `n` values (after those above the innermost MARK, and the MARK, when `from_mark`); their deepest depth.
  uint32_t Take(size_t n, bool from_mark) {
    uint32_t deepest = 0;
    if (from_mark) {
      if (marks_.empty()) fail_("an opcode that needs a MARK without one");
      for (size_t i = marks_.back(); i < stack_.size(); ++i) deepest = std::max(deepest, stack_[i].depth);
      stack_.resize(marks_.back());
      marks_.pop_back();
    }
    for (size_t i = 0; i < n; ++i) {
      if (stack_.size() <= Floor()) fail_("an opcode with too few values on the stack");
      deepest = std::max(deepest, stack_.back().depth);
      stack_.pop_back();
    }
    return deepest;
  }

  const std::function<void(const std::string&)>& fail_;
  std::vector<Entry> stack_;
  std::vector<size_t> marks_;
  std::vector<Cell> cells_;
  std::unordered_map<uint64_t, int32_t> memo_;
};

// The stack effect of `op` (its argument already read): pickletools.py's stack_before / stack_after.
void ApplyStackEffect(unsigned char op, uint64_t memo_index, NestingTracker& t) {
  switch (op) {
    case '(': t.Mark(); break;
    case '0': t.Pop(); break;
    case '1': t.PopMark(); break;
    case '2': t.Dup(); break;
    case ')': case ']': case '}': case 0x8f: t.Make(0, false); break;  // EMPTY_TUPLE, _LIST, _DICT, _SET
    case 't': case 'l': case 'd': case 0x91: case 'o': case 'i': t.Make(0, true); break;  // TUPLE ... OBJ, INST
    case 0x85: t.Make(1, false); break;                           // TUPLE1
    case 0x86: t.Make(2, false); break;                           // TUPLE2
    case 0x87: t.Make(3, false); break;                           // TUPLE3
    case 'R': case 0x81: t.Make(2, false); break;                 // REDUCE, NEWOBJ: callable and arguments
    case 0x92: t.Make(3, false); break;                           // NEWOBJ_EX: class, arguments, keywords
    case 'Q': t.Make(1, false); break;                            // BINPERSID: the object of an id
    case 0x93: t.Make(2, false); break;                           // STACK_GLOBAL: module and name
    case 'a': case 'b': t.Change(1, false); break;                // APPEND, BUILD
    case 's': t.Change(2, false); break;                          // SETITEM
    case 'e': case 'u': case 0x90: t.Change(0, true); break;      // APPENDS, SETITEMS, ADDITEMS
    case 'h': case 'j': case 'g': t.Get(memo_index); break;
    case 'q': case 'r': case 'p': t.Put(memo_index); break;
    case 0x94: t.Put(t.MemoSize()); break;                        // MEMOIZE
    case 0x80: case 0x95: case 0x98: case '.': break;             // PROTO, FRAME, READONLY_BUFFER, STOP
    default: t.PushScalar(); break;                               // numbers, strings, None, globals, ...
  }
}

uint64_t Little(std::string_view b, size_t at, size_t width) {
  uint64_t v = 0;
  for (size_t i = 0; i < width; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(b[at + i])) << (8 * i);
  return v;
}

}  // namespace

void CheckPickleStream(std::string_view bytes, const std::string& where) {
  auto fail = [&](const std::string& what, size_t at) {
    throw ModelLoadError(where + " is damaged (" + what + " at byte " + std::to_string(at) + ")");
  };
  const size_t n = bytes.size();
  // A memo index names an earlier PUT; each PUT takes at least two bytes, so no index reaches the stream's size.
  auto check_memo = [&](uint64_t index, size_t at) {
    if (index >= n) fail("memo index " + std::to_string(index) + " past the stream", at);
  };
  size_t op_at = 0;
  const std::function<void(const std::string&)> fail_here = [&](const std::string& what) { fail(what, op_at); };
  NestingTracker nesting(fail_here);
  size_t at = 0;
  while (at < n) {
    op_at = at;
    const auto op = static_cast<unsigned char>(bytes[at++]);
    bool known = false;
    uint64_t memo_index = 0;
    const Arg arg = ArgumentOf(op, known);
    if (!known) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", op);
      fail(std::string("unknown pickle opcode ") + hex, op_at);
    }
    auto need = [&](uint64_t k) {
      if (k > n - at) fail("an opcode's argument past the stream's end", op_at);
    };
    auto line_end = [&]() {
      const size_t end = bytes.find('\n', at);
      if (end == std::string_view::npos) fail("an unterminated line argument", op_at);
      return end;
    };
    switch (arg) {
      case Arg::kNone: break;
      case Arg::kFixed1: need(1); at += 1; break;
      case Arg::kFixed2: need(2); at += 2; break;
      case Arg::kFixed4: need(4); at += 4; break;
      case Arg::kFixed8: need(8); at += 8; break;
      case Arg::kMemo1: need(1); memo_index = Little(bytes, at, 1); check_memo(memo_index, op_at); at += 1; break;
      case Arg::kMemo4: need(4); memo_index = Little(bytes, at, 4); check_memo(memo_index, op_at); at += 4; break;
      case Arg::kCounted1:
      case Arg::kCounted4:
      case Arg::kCounted8: {
        const size_t width = arg == Arg::kCounted1 ? 1 : arg == Arg::kCounted4 ? 4 : 8;
        need(width);
        const uint64_t len = Little(bytes, at, width);
        at += width;
        need(len);
        at += len;
        break;
      }
      case Arg::kLine: at = line_end() + 1; break;
      case Arg::kMemoLine: {
        const size_t end = line_end();
        uint64_t index = 0;
        for (size_t i = at; i < end; ++i) {
          const char c = bytes[i];
          if (c < '0' || c > '9') fail("a memo index that is not a number", op_at);
          index = index * 10 + static_cast<uint64_t>(c - '0');
          if (index >= n) check_memo(index, op_at);
        }
        memo_index = index;
        at = end + 1;
        break;
      }
      case Arg::kTwoLines:
        at = line_end() + 1;
        at = line_end() + 1;
        break;
    }
    ApplyStackEffect(op, memo_index, nesting);
    if (op == '.') return;  // STOP: LibTorch reads nothing after it
  }
  fail("no STOP opcode", n);
}

}  // namespace llmem
