#include "graph/debug_record_check.h"

#include <cstdint>

#include "graph/error.h"
#include "graph/pickle_value.h"

namespace llmem {
namespace {

using Value = PickleValue;
constexpr const char* kStringTableFormat = "FORMAT_WITH_STRING_TABLE";
// The deepest a record file nests: file, records, record, range, source, text-index list in its REDUCE.
constexpr size_t kMaxDepth = 8;

class DebugRecordChecker {
 public:
  explicit DebugRecordChecker(const std::string& where) : where_(where) {}

  void Check(const Value& file) {
    // LibTorch reads the file's first element unchecked.
    if (file.kind != Value::Kind::kTuple || file.items.empty()) Fail("no tuple of records");
    const Value* records = &file;
    if (file.items[0]->IsString()) {
      if (file.items[0]->text != kStringTableFormat || file.items.size() < 3) Fail("an unknown record format");
      const Value& texts = *file.items[1];
      if (texts.kind != Value::Kind::kTuple) Fail("a string table that is not a tuple");
      for (const auto& t : texts.items) {
        if (!t->IsString()) Fail("a string table entry that is not a string");
      }
      texts_ = &texts;
      records = file.items[2].get();
      if (records->kind != Value::Kind::kTuple) Fail("records that are not a tuple");
    }
    for (const auto& record : records->items) CheckRecord(*record);
  }

 private:
  [[noreturn]] void Fail(const std::string& what) const {
    throw ModelLoadError(where_ + " is damaged (its debug records hold " + what + ")");
  }

  // LibTorch reads a record's byte offset and its range, then the range's source, start and end.
  void CheckRecord(const Value& record) {
    if (record.kind != Value::Kind::kTuple || record.items.size() < 2) Fail("a record that is not a tuple of 3");
    if (!record.items[0]->IsInt() || record.items[0]->integer < 0) Fail("a record whose byte offset is not one");
    const Value& range = *record.items[1];
    if (!range.IsTuple(3) || !range.items[1]->IsInt() || !range.items[2]->IsInt()) Fail("a malformed range");
    const uint64_t length = SourceLength(*range.items[0]);
    const int64_t start = range.items[1]->integer, end = range.items[2]->integer;
    // An end past the text is written by PyTorch itself (ranges of traced Python lines); a start is not.
    if (start < 0 || static_cast<uint64_t>(start) > length || end < start) {
      Fail("the range " + std::to_string(start) + ".." + std::to_string(end) + " of a text of " +
           std::to_string(length) + " bytes");
    }
  }

  // The byte length of a range's source text; its indices must name entries of the string table.
  uint64_t SourceLength(const Value& source) {
    if (!source.IsTuple(3) || !source.items[2]->IsInt()) Fail("a malformed source");
    const Value& text = *source.items[0];
    const Value& filename = *source.items[1];
    if (!texts_) {
      if (!text.IsString() || !(filename.IsString() || filename.kind == Value::Kind::kNone)) {
        Fail("a malformed source");
      }
      return text.text.size();
    }
    if (!filename.IsInt()) Fail("a malformed source");
    Index(filename.integer);
    // The text's pieces, as torch.jit._pickle.build_intlist([indices]).
    const bool int_list = text.kind == Value::Kind::kReduce && text.text == "torch.jit._pickle.build_intlist" &&
                          text.items.size() == 1 && text.items[0]->kind == Value::Kind::kList;
    if (!int_list) Fail("a source whose text is not a list of string-table indices");
    const auto& pieces = text.items[0]->items;
    uint64_t length = 0;
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (!pieces[i]->IsInt()) Fail("a source whose text is not a list of string-table indices");
      const std::string& piece = Index(pieces[i]->integer);
      // Every line but the last ends in a newline; LibTorch's StringCordView miscounts empty pieces before others.
      if (piece.empty() && i + 1 < pieces.size()) Fail("an empty line inside a source");
      length += piece.size();
    }
    return length;
  }

  const std::string& Index(int64_t i) {
    if (i < 0 || static_cast<uint64_t>(i) >= texts_->items.size()) {
      Fail("string-table index " + std::to_string(i) + " of a table of " + std::to_string(texts_->items.size()));
    }
    return texts_->items[static_cast<size_t>(i)]->text;
  }

  const std::string& where_;
  const Value* texts_ = nullptr;
};

}  // namespace

void CheckDebugRecords(std::string_view bytes, const std::string& where) {
  const auto file = EvaluatePlainPickle(bytes, where, kMaxDepth);
  DebugRecordChecker(where).Check(*file);
}

}  // namespace llmem
