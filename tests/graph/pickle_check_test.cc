// The pickle framing check (graph/pickle_check.h) on streams CPython's pickler writes and on damaged copies.
#include "graph/pickle_check.h"

#include <gtest/gtest.h>

#include <string>

#include "graph/error.h"

namespace llmem {
namespace {

using namespace std::string_literals;

// pickle.dumps({'a': [1, 2.5, 'xxx', b'yy', (None, True)]}, protocol=2): memo puts, BININT1, BINFLOAT, BINUNICODE,
// GLOBAL, REDUCE, TUPLE2, SETITEMS.
const std::string kDict =
    "\x80\x02}q\x00X\x01\x00\x00\x00" "aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00X\x03\x00\x00\x00xxxq\x03"
    "c_codecs\nencode\nq\x04X\x02\x00\x00\x00yyq\x05X\x06\x00\x00\x00latin1q\x06\x86q\x07Rq\x08N\x88\x86q\tes."s;
// pickle.dumps([[1]] * 2, protocol=2): a BINGET of memo 1.
const std::string kShared = "\x80\x02]q\x00(]q\x01K\x01" "ah\x01" "e."s;

std::string Refusal(const std::string& bytes) {
  try {
    CheckPickleStream(bytes, "test.pkl");
  } catch (const ModelLoadError& e) {
    return e.what();
  }
  return "";
}

TEST(PickleCheckTest, StreamsThePicklerWritesPass) {
  EXPECT_EQ(Refusal(kDict), "");
  EXPECT_EQ(Refusal(kShared), "");
}

TEST(PickleCheckTest, AMemoIndexPastTheStreamIsRefused) {
  std::string huge = kShared;
  huge.replace(huge.find("h\x01"s), 2, "j\x00\x00\x00\x40"s);  // LONG_BINGET 2^30
  EXPECT_NE(Refusal(huge).find("memo index 1073741824 past the stream"), std::string::npos) << Refusal(huge);
}

TEST(PickleCheckTest, ALengthPastTheStreamIsRefused) {
  std::string longer = kDict;
  longer.replace(longer.find("X\x03\x00\x00\x00"s), 5, "X\xff\xff\xff\x7f"s);
  EXPECT_NE(Refusal(longer).find("argument past the stream's end"), std::string::npos) << Refusal(longer);
}

TEST(PickleCheckTest, UnknownOpcodesAndAMissingStopAreRefused) {
  EXPECT_NE(Refusal("\x80\x02\xff."s).find("unknown pickle opcode 0xff"), std::string::npos);
  EXPECT_NE(Refusal(kShared.substr(0, kShared.size() - 1)).find("no STOP opcode"), std::string::npos);
  EXPECT_NE(Refusal("\x80\x02" "c_codecs\nencode"s).find("unterminated line"), std::string::npos);
}

TEST(PickleCheckTest, ValuesNestedPastTheLimitAreRefused) {
  // None in n one-element tuples: LibTorch frees such a value recursively, and a million levels overflowed its stack.
  const auto nested = [](size_t n) { return "\x80\x02N"s + std::string(n, '\x85') + "."; };
  EXPECT_EQ(Refusal(nested(1000)), "");
  EXPECT_NE(Refusal(nested(1001)).find("values nested deeper than 1000 at byte 1003"), std::string::npos)
      << Refusal(nested(1001));
  // Nesting through the memo counts too: a GET brings the depth the value had.
  const std::string shared = "\x80\x02N"s + std::string(1000, '\x85') + "q\x00h\x00\x85."s;
  EXPECT_NE(Refusal(shared).find("nested deeper than 1000"), std::string::npos) << Refusal(shared);
}

TEST(PickleCheckTest, AValueChangedAfterItWasSharedIsRefused) {
  // EMPTY_LIST, PUT 0, GET 0, POP, then APPEND to the list: a holder of the GET would not see the new depth.
  EXPECT_NE(Refusal("\x80\x02]q\x00h\x00" "0N" "a."s).find("a value changed after it was shared"),
            std::string::npos);
  // Filled, then shared: what the picklers write (kShared's inner list).
  EXPECT_EQ(Refusal("\x80\x02]q\x00N" "ah\x00\x86."s), "");
}

TEST(PickleCheckTest, StackUnderflowsAreRefused) {
  EXPECT_NE(Refusal("\x80\x02\x85."s).find("too few values"), std::string::npos);
  EXPECT_NE(Refusal("\x80\x02K\x01t."s).find("needs a MARK"), std::string::npos);
  EXPECT_NE(Refusal("\x80\x02h\x00."s).find("never PUT"), std::string::npos);
}

}  // namespace
}  // namespace llmem
