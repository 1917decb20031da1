// The central directory of a zip archive (what torch.jit.save and torch.export.save write), read by our own code
// before LibTorch's reader (miniz) sees the file: each record's name, compression and sizes, with every offset and
// size checked against the file. LibTorch's reader allocates what a record claims, so a damaged or crafted
// directory must be refused here, in our words.
//
// Format: PKWARE APPNOTE.TXT 6.3 (end of central directory record 4.3.16, zip64 end record and locator 4.3.14-15,
// central directory header 4.3.12, zip64 extended information 4.5.3).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace llmem {

struct ZipRecord {
  std::string name;
  uint16_t method = 0;  // 0 stored, 8 deflated (the two miniz reads)
  uint64_t compressed_bytes = 0;
  uint64_t uncompressed_bytes = 0;
  uint64_t local_header_offset = 0;
  uint64_t data_offset = 0;  // where its (compressed) bytes start, after its local header
};

// The records of the zip archive at `path`; none when the file has no zip end record (not a zip archive, or one cut
// short: a reader finds its directory from the end, whatever the file starts with). Throws ModelLoadError (one line,
// naming the path) for a directory that is cut short or inconsistent with the file's size.
std::optional<std::vector<ZipRecord>> ReadZipDirectory(const std::string& path);

// The bytes of a record of the archive at `path`, inflated when it is deflated (at most its stated uncompressed
// size). Throws ModelLoadError when it cannot be read or does not inflate to its stated size.
std::string ReadRecord(const std::string& path, const ZipRecord& record);

// The most bytes `record` can expand to: its stored size, or DEFLATE's largest ratio (1032:1, a 258-byte match per
// two bits: zlib's algorithm.txt / zlib FAQ) times its compressed size.
uint64_t MaxExpandedBytes(const ZipRecord& record);

}  // namespace llmem
