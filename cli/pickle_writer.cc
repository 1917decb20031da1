#include "cli/pickle_writer.h"

#include <bit>
#include <cstdint>
#include <cstring>

namespace llmem::cli {
namespace {

// Opcodes (CPython's Lib/pickle.py, protocol 2).
constexpr char kProto = '\x80', kStop = '.', kMark = '(', kNone = 'N', kTrue = '\x88', kFalse = '\x89';
constexpr char kBinInt = 'J', kLong1 = '\x8a', kBinFloat = 'G', kBinUnicode = 'X';
constexpr char kEmptyDict = '}', kSetItems = 'u', kEmptyList = ']', kAppends = 'e';
constexpr size_t kBatch = 1000;  // items per MARK ... SETITEMS / APPENDS, as pickle batches them

void PutLittleEndian(std::string& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

void PutInt(std::string& out, int64_t value) {
  if (value >= INT32_MIN && value <= INT32_MAX) {
    out.push_back(kBinInt);
    PutLittleEndian(out, static_cast<uint32_t>(static_cast<int32_t>(value)), 4);
    return;
  }
  out.push_back(kLong1);  // two's complement, little-endian, 8 bytes hold any int64
  out.push_back(static_cast<char>(8));
  PutLittleEndian(out, static_cast<uint64_t>(value), 8);
}

void PutString(std::string& out, const std::string& text) {
  out.push_back(kBinUnicode);
  PutLittleEndian(out, static_cast<uint32_t>(text.size()), 4);
  out += text;
}

void Put(std::string& out, const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null: out.push_back(kNone); return;
    case nlohmann::json::value_t::boolean: out.push_back(value.get<bool>() ? kTrue : kFalse); return;
    case nlohmann::json::value_t::number_integer: PutInt(out, value.get<int64_t>()); return;
    case nlohmann::json::value_t::number_unsigned: PutInt(out, static_cast<int64_t>(value.get<uint64_t>())); return;
    case nlohmann::json::value_t::number_float: {
      out.push_back(kBinFloat);  // big-endian IEEE 754
      const uint64_t bits = std::bit_cast<uint64_t>(value.get<double>());
      for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
      return;
    }
    case nlohmann::json::value_t::string: PutString(out, value.get_ref<const std::string&>()); return;
    case nlohmann::json::value_t::array: {
      out.push_back(kEmptyList);
      for (size_t start = 0; start < value.size(); start += kBatch) {
        out.push_back(kMark);
        for (size_t i = start; i < std::min(value.size(), start + kBatch); ++i) Put(out, value[i]);
        out.push_back(kAppends);
      }
      return;
    }
    case nlohmann::json::value_t::object: {
      out.push_back(kEmptyDict);
      size_t n = 0;
      for (auto it = value.begin(); it != value.end(); ++it, ++n) {
        if (n % kBatch == 0) out.push_back(kMark);
        PutString(out, it.key());
        Put(out, it.value());
        if (n % kBatch == kBatch - 1) out.push_back(kSetItems);
      }
      if (n % kBatch != 0) out.push_back(kSetItems);
      return;
    }
    default: out.push_back(kNone); return;  // binary and discarded values do not occur in snapshots
  }
}

}  // namespace

std::string Pickle(const nlohmann::json& value) {
  std::string out;
  out.push_back(kProto);
  out.push_back(static_cast<char>(2));
  Put(out, value);
  out.push_back(kStop);
  return out;
}

}  // namespace llmem::cli
