// A check of what a TorchScript archive's debug records (code/**.debug_pkl) hold, before LibTorch reads them.
// LibTorch reads them lazily, when a node's source range is first asked for, and its SourceRangeDeserializer
// (torch/csrc/jit/serialization/source_range_serialization.cpp) indexes the string table with the record's
// numbers unchecked: a text index past the table read freed memory (a crash in StringCordView::find).
//
// A record file is the tuple ("FORMAT_WITH_STRING_TABLE", texts, records), or the records alone (the format
// before the string table). A record is (byte offset, range, tag); a range is (source, start, end); a source is
// (text indices, filename index, first line), or (text, filename, first line) without the table.
#pragma once

#include <string>
#include <string_view>

namespace llmem {

// Throws ModelLoadError "<where> is damaged (...)" for records LibTorch would read out of bounds.
void CheckDebugRecords(std::string_view bytes, const std::string& where);

}  // namespace llmem
