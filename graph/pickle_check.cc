#include "graph/pickle_check.h"

#include <cstdint>
#include <cstdio>

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
  size_t at = 0;
  while (at < n) {
    const size_t op_at = at;
    const auto op = static_cast<unsigned char>(bytes[at++]);
    bool known = false;
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
      case Arg::kMemo1: need(1); check_memo(Little(bytes, at, 1), op_at); at += 1; break;
      case Arg::kMemo4: need(4); check_memo(Little(bytes, at, 4), op_at); at += 4; break;
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
        at = end + 1;
        break;
      }
      case Arg::kTwoLines:
        at = line_end() + 1;
        at = line_end() + 1;
        break;
    }
    if (op == '.') return;  // STOP: LibTorch reads nothing after it
  }
  fail("no STOP opcode", n);
}

}  // namespace llmem
