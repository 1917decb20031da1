// The plain-data pickle evaluator (graph/pickle_value.h) and the check of TorchScript debug records built on it
// (graph/debug_record_check.h), on a record file in PyTorch's format and on damaged copies.
#include "graph/debug_record_check.h"

#include <gtest/gtest.h>

#include <string>

#include "graph/error.h"
#include "graph/pickle_value.h"

namespace llmem {
namespace {

using namespace std::string_literals;

// pickle.dumps(("FORMAT_WITH_STRING_TABLE", ("", "x = 1\n", "y", "f.py"),
//               ((0, ((build_intlist([1, 2]), 3, 7), 0, 7), -1), (4, (<the same source>, 4, 9), -1))), protocol=2)
// with torch.jit._pickle.build_intlist as the global: the layout torch.jit.save writes. The source's text is
// "x = 1\ny" (7 bytes), its filename "f.py"; the second range ends past the text, as PyTorch's own ranges can.
const std::string kRecords =
    "\x80\x02X\x18\x00\x00\x00" "FORMAT_WITH_STRING_TABLEq\x00(X\x00\x00\x00\x00q\x01X\x06\x00\x00\x00x = 1\x0aq\x02"
    "X\x01\x00\x00\x00yq\x03X\x04\x00\x00\x00" "f.pyq\x04tq\x05K\x00" "ctorch.jit._pickle\x0a" "build_intlist\x0a"
    "q\x06]q\x07(K\x01K\x02" "e\x85q\x08Rq\x09K\x03K\x07\x87q\x0aK\x00K\x07\x87q\x0bJ\xff\xff\xff\xff\x87q\x0c"
    "K\x04h\x0aK\x04K\x09\x87q\x0dJ\xff\xff\xff\xff\x87q\x0e\x86q\x0f\x87q\x10."s;

std::string Replaced(std::string s, const std::string& from, const std::string& to) {
  const size_t at = s.find(from);
  EXPECT_NE(at, std::string::npos) << "the test's pattern is not in the stream";
  return at == std::string::npos ? s : s.replace(at, from.size(), to);
}

std::string Refusal(const std::string& bytes) {
  try {
    CheckDebugRecords(bytes, "m.pt's code/f.py.debug_pkl");
  } catch (const ModelLoadError& e) {
    return e.what();
  }
  return "";
}

TEST(PickleValueTest, EvaluatesTheValueThePicklerWrote) {
  const auto file = EvaluatePlainPickle(kRecords, "r", 8);
  ASSERT_TRUE(file->IsTuple(3));
  EXPECT_EQ(file->items[0]->text, "FORMAT_WITH_STRING_TABLE");
  ASSERT_TRUE(file->items[1]->IsTuple(4));
  EXPECT_EQ(file->items[1]->items[1]->text, "x = 1\n");
  const auto& records = file->items[2]->items;
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0]->items[2]->integer, -1);  // BININT is signed
  const auto& source = records[1]->items[1]->items[0];  // shared through the memo (BINGET)
  EXPECT_EQ(source.get(), records[0]->items[1]->items[0].get());
  const auto& text = source->items[0];
  EXPECT_EQ(text->kind, PickleValue::Kind::kReduce);
  EXPECT_EQ(text->text, "torch.jit._pickle.build_intlist");
  ASSERT_EQ(text->items.size(), 1u);
  ASSERT_EQ(text->items[0]->items.size(), 2u);
  EXPECT_EQ(text->items[0]->items[1]->integer, 2);
  EXPECT_EQ(file->depth, 7u);  // file, records, record, range, source, REDUCE, list
}

TEST(PickleValueTest, LongIntegersAreSignExtended) {
  // LONG1 of 2 bytes 0xff 0xfe is -257; of 8 bytes, the full 64 bits.
  EXPECT_EQ(EvaluatePlainPickle("\x80\x02\x8a\x02\xff\xfe."s, "r", 1)->integer, -257);
  EXPECT_EQ(EvaluatePlainPickle("\x80\x02\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f."s, "r", 1)->integer,
            INT64_MAX);
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01."s, "r", 1),
               ModelLoadError);
}

TEST(PickleValueTest, NestingPastTheLimitIsRefused) {
  const std::string deep = "\x80\x02N" + std::string(9, '\x85') + ".";  // None in 9 one-element tuples
  EXPECT_EQ(EvaluatePlainPickle(deep, "r", 9)->depth, 9u);
  try {
    EvaluatePlainPickle(deep, "r", 8);
    FAIL() << "nine levels passed a limit of eight";
  } catch (const ModelLoadError& e) {
    EXPECT_NE(std::string(e.what()).find("nested deeper than 8"), std::string::npos) << e.what();
  }
}

TEST(PickleValueTest, ListsThatCouldFormACycleAreRefused) {
  // EMPTY_LIST, PUT 0, GET 0, APPEND: a list inside itself.
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02]q\x00h\x00" "a."s, "r", 8), ModelLoadError);
  // A list put inside a tuple, then appended to through the memo: the tuple's depth would not see it.
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02]q\x00\x85h\x00N" "a."s, "r", 8), ModelLoadError);
  // Appending before the list is placed anywhere is what picklers write.
  EXPECT_EQ(EvaluatePlainPickle("\x80\x02]q\x00N" "a\x85."s, "r", 8)->depth, 2u);
}

TEST(PickleValueTest, OtherOpcodesAndBrokenStacksAreRefused) {
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02}."s, "r", 8), ModelLoadError);        // EMPTY_DICT
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02\x85."s, "r", 8), ModelLoadError);     // TUPLE1 of nothing
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02K\x01t."s, "r", 8), ModelLoadError);   // TUPLE without MARK
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02h\x03."s, "r", 8), ModelLoadError);    // GET of no PUT
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02K\x01(\x85."s, "r", 8), ModelLoadError);  // pops below a MARK
  EXPECT_THROW(EvaluatePlainPickle("\x80\x02N"s, "r", 8), ModelLoadError);         // no STOP
}

TEST(DebugRecordCheckTest, RecordsInPyTorchsLayoutPass) { EXPECT_EQ(Refusal(kRecords), ""); }

TEST(DebugRecordCheckTest, TextIndexPastTheTableIsRefused) {
  // The crash this check keeps out: LibTorch read the string table at index 9 of 4.
  const std::string r = Refusal(Replaced(kRecords, "(K\x01K\x02"s, "(K\x01K\x09"s));
  EXPECT_NE(r.find("m.pt's code/f.py.debug_pkl is damaged"), std::string::npos) << r;
  EXPECT_NE(r.find("string-table index 9 of a table of 4"), std::string::npos) << r;
}

TEST(DebugRecordCheckTest, FilenameIndexPastTheTableIsRefused) {
  const std::string r = Refusal(Replaced(kRecords, "Rq\x09K\x03"s, "Rq\x09J\x00\x00\x00\x80"s));
  EXPECT_NE(r.find("string-table index -2147483648"), std::string::npos) << r;
}

TEST(DebugRecordCheckTest, RangeStartPastItsTextIsRefused) {
  const std::string r = Refusal(Replaced(kRecords, "K\x04K\x09\x87"s, "K\x08K\x09\x87"s));
  EXPECT_NE(r.find("the range 8..9 of a text of 7 bytes"), std::string::npos) << r;
  EXPECT_NE(Refusal(Replaced(kRecords, "K\x04K\x09\x87"s, "K\x04K\x03\x87"s)).find("range 4..3"),
            std::string::npos);
}

TEST(DebugRecordCheckTest, MalformedShapesAreRefused) {
  EXPECT_NE(Refusal("\x80\x02)."s).find("no tuple of records"), std::string::npos);
  EXPECT_NE(Refusal(Replaced(kRecords, "FORMAT_WITH"s, "FORMAT_WOTH"s)).find("unknown record format"),
            std::string::npos);
  // An empty piece before the last: PyTorch ends every line but the last with a newline.
  EXPECT_NE(Refusal(Replaced(kRecords, "(K\x01K\x02"s, "(K\x00K\x02"s)).find("empty line"), std::string::npos);
  // The records' text indices as a plain list rather than build_intlist's.
  EXPECT_NE(Refusal(Replaced(kRecords, "build_intlist"s, "build_boollist"s)).find("list of string-table"),
            std::string::npos);
}

TEST(DebugRecordCheckTest, RecordsWithoutTheStringTablePass) {
  // The format before the string table: ((0, (("x = 1\n", "f.py", 1), 0, 6), -1),)
  const std::string old =
      "\x80\x02K\x00X\x06\x00\x00\x00x = 1\x0aX\x04\x00\x00\x00" "f.pyK\x01\x87K\x00K\x06\x87J\xff\xff\xff\xff"
      "\x87\x85."s;
  EXPECT_EQ(Refusal(old), "");
  EXPECT_NE(Refusal(Replaced(old, "K\x00K\x06"s, "K\x07K\x06"s)).find("range 7..6"), std::string::npos);
}

}  // namespace
}  // namespace llmem
