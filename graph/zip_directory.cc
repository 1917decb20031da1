#include "graph/zip_directory.h"

#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>

#include "graph/error.h"

namespace llmem {
namespace {

constexpr uint32_t kEndOfDirectory = 0x06054b50;
constexpr uint32_t kZip64EndOfDirectory = 0x06064b50;
constexpr uint32_t kZip64Locator = 0x07064b50;
constexpr uint32_t kDirectoryHeader = 0x02014b50;
constexpr uint32_t kLocalHeader = 0x04034b50;
constexpr size_t kLocalHeaderBytes = 30;
constexpr uint16_t kZip64ExtraId = 0x0001;
constexpr size_t kEndOfDirectoryBytes = 22;
constexpr size_t kZip64LocatorBytes = 20;
constexpr size_t kZip64EndOfDirectoryBytes = 56;
constexpr size_t kDirectoryHeaderBytes = 46;
constexpr size_t kMaxCommentBytes = 0xffff;
constexpr uint64_t kDeflateMaxRatio = 1032;

// Little-endian fields of a byte buffer, bounds-checked by the caller.
uint64_t Field(const std::string& bytes, size_t at, size_t width) {
  uint64_t v = 0;
  for (size_t i = 0; i < width; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[at + i])) << (8 * i);
  return v;
}

class DirectoryReader {
 public:
  explicit DirectoryReader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    if (ec || !in_) Fail("it cannot be read");
    size_ = size;
  }

  std::optional<std::vector<ZipRecord>> Read() {
    // The end record sits in the last 22 bytes plus a comment of up to 64 KiB.
    const uint64_t tail_bytes = std::min<uint64_t>(size_, kEndOfDirectoryBytes + kMaxCommentBytes);
    const std::string tail = Bytes(size_ - tail_bytes, tail_bytes);
    size_t end = std::string::npos;
    for (size_t at = tail.size() >= kEndOfDirectoryBytes ? tail.size() - kEndOfDirectoryBytes + 1 : 0; at-- > 0;) {
      if (Field(tail, at, 4) == kEndOfDirectory) {
        end = at;
        break;
      }
    }
    if (end == std::string::npos) return std::nullopt;
    const uint64_t end_offset = size_ - tail_bytes + end;
    uint64_t entries = Field(tail, end + 10, 2);
    uint64_t directory_bytes = Field(tail, end + 12, 4);
    uint64_t directory_offset = Field(tail, end + 16, 4);
    // miniz (LibTorch's reader) takes the zip64 end record whenever a locator precedes the end record and names a
    // record with the right signature, whatever the 32-bit fields say (torch.jit.save always writes one); this
    // reader must see the records miniz will. A fuzzed export whose zip64 record said "no records" got past our
    // checks and made LibTorch's reader throw after opening the archive, leaking its state.
    std::string zip64_record;
    if (end_offset >= kZip64LocatorBytes) {
      const std::string locator = Bytes(end_offset - kZip64LocatorBytes, kZip64LocatorBytes);
      if (Field(locator, 0, 4) == kZip64Locator) {
        const uint64_t zip64_end = Field(locator, 8, 8);
        if (zip64_end > size_ || size_ - zip64_end < kZip64EndOfDirectoryBytes) {
          Fail("a zip64 end record past its end");
        }
        zip64_record = Bytes(zip64_end, kZip64EndOfDirectoryBytes);
        if (Field(zip64_record, 0, 4) != kZip64EndOfDirectory) zip64_record.clear();
      }
    }
    if (zip64_record.empty() && (entries == 0xffff || directory_bytes == 0xffffffff || directory_offset == 0xffffffff)) {
      Fail("a zip64 directory without its end record");
    }
    if (!zip64_record.empty()) {
      entries = Field(zip64_record, 32, 8);
      directory_bytes = Field(zip64_record, 40, 8);
      directory_offset = Field(zip64_record, 48, 8);
    }
    if (directory_offset > size_ || directory_bytes > size_ - directory_offset) {
      Fail("its zip directory runs past its end");
    }
    // Each header takes at least 46 bytes: a count the directory cannot hold is damage, not a reason to reserve.
    if (entries > directory_bytes / kDirectoryHeaderBytes) Fail("a zip directory shorter than its record count");
    const std::string directory = Bytes(directory_offset, directory_bytes);
    std::vector<ZipRecord> records;
    records.reserve(entries);
    size_t at = 0;
    for (uint64_t i = 0; i < entries; ++i) {
      if (directory.size() - at < kDirectoryHeaderBytes || Field(directory, at, 4) != kDirectoryHeader) {
        Fail("a damaged zip directory entry");
      }
      ZipRecord r;
      r.method = static_cast<uint16_t>(Field(directory, at + 10, 2));
      r.compressed_bytes = Field(directory, at + 20, 4);
      r.uncompressed_bytes = Field(directory, at + 24, 4);
      r.local_header_offset = Field(directory, at + 42, 4);
      const size_t name_bytes = Field(directory, at + 28, 2), extra_bytes = Field(directory, at + 30, 2),
                   comment_bytes = Field(directory, at + 32, 2);
      const size_t variable = name_bytes + extra_bytes + comment_bytes;
      if (directory.size() - at - kDirectoryHeaderBytes < variable) Fail("a damaged zip directory entry");
      r.name = directory.substr(at + kDirectoryHeaderBytes, name_bytes);
      ReadZip64Sizes(directory.substr(at + kDirectoryHeaderBytes + name_bytes, extra_bytes), r);
      r.data_offset = CheckLocalHeader(r);
      records.push_back(std::move(r));
      at += kDirectoryHeaderBytes + variable;
    }
    return records;
  }

 private:
  // Sizes and offset the 32-bit fields mark as 0xffffffff come from the zip64 extra field, in this order.
  void ReadZip64Sizes(const std::string& extra, ZipRecord& r) {
    for (size_t at = 0; extra.size() - at >= 4;) {
      const uint64_t id = Field(extra, at, 2), bytes = Field(extra, at + 2, 2);
      if (extra.size() - at - 4 < bytes) Fail("a damaged zip64 field of " + Printable(r.name));
      if (id == kZip64ExtraId) {
        size_t field = at + 4;
        for (uint64_t* value : {&r.uncompressed_bytes, &r.compressed_bytes, &r.local_header_offset}) {
          if (*value != 0xffffffff) continue;
          if (field + 8 > at + 4 + bytes) Fail("a damaged zip64 field of " + Printable(r.name));
          *value = Field(extra, field, 8);
          field += 8;
        }
        return;
      }
      at += 4 + bytes;
    }
  }

  // The record's own header, which the reader goes through to its data: there, and its data within the file.
  uint64_t CheckLocalHeader(const ZipRecord& r) {
    if (r.local_header_offset > size_ || size_ - r.local_header_offset < kLocalHeaderBytes) {
      Fail("record " + Printable(r.name) + " runs past its end");
    }
    const std::string header = Bytes(r.local_header_offset, kLocalHeaderBytes);
    if (Field(header, 0, 4) != kLocalHeader) Fail("the header of record " + Printable(r.name) + " is missing");
    const uint64_t data = r.local_header_offset + kLocalHeaderBytes + Field(header, 26, 2) + Field(header, 28, 2);
    if (data > size_ || r.compressed_bytes > size_ - data) Fail("record " + Printable(r.name) + " runs past its end");
    return data;
  }

  std::string Bytes(uint64_t offset, uint64_t n) {
    std::string out(n, '\0');
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(out.data(), static_cast<std::streamsize>(n));
    if (static_cast<uint64_t>(in_.gcount()) != n) Fail("it cannot be read");
    return out;
  }

  static std::string Printable(const std::string& name) {
    std::string out;
    for (const char c : name.substr(0, 80)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
    return out;
  }

  [[noreturn]] void Fail(const std::string& what) const {
    throw ModelLoadError("not a readable model file: " + path_ + " is a truncated or damaged zip archive (" + what +
                         ")");
  }

  std::string path_;
  std::ifstream in_;
  uint64_t size_ = 0;
};

}  // namespace

std::optional<std::vector<ZipRecord>> ReadZipDirectory(const std::string& path) {
  return DirectoryReader(path).Read();
}

std::string ReadRecord(const std::string& path, const ZipRecord& record) {
  const auto fail = [&](const std::string& what) {
    throw ModelLoadError("not a readable model file: " + path + " is a truncated or damaged zip archive (record " +
                         record.name.substr(0, 80) + " " + what + ")");
  };
  std::ifstream in(path, std::ios::binary);
  std::string data(record.compressed_bytes, '\0');
  in.seekg(static_cast<std::streamoff>(record.data_offset));
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  if (!in || static_cast<uint64_t>(in.gcount()) != data.size()) fail("cannot be read");
  if (record.method == 0) return data;
  // Raw DEFLATE (no zlib header), as zip stores it; the stated size bounds the output.
  std::string out(record.uncompressed_bytes, '\0');
  z_stream z{};
  if (inflateInit2(&z, -MAX_WBITS) != Z_OK) fail("cannot be inflated");
  z.next_in = reinterpret_cast<Bytef*>(data.data());
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  const int status = inflate(&z, Z_FINISH);
  const uint64_t produced = z.total_out;
  inflateEnd(&z);
  if (status != Z_STREAM_END || produced != record.uncompressed_bytes) fail("does not inflate to its stated size");
  return out;
}

uint64_t MaxExpandedBytes(const ZipRecord& record) {
  if (record.method == 0) return record.compressed_bytes;
  if (record.compressed_bytes > std::numeric_limits<uint64_t>::max() / kDeflateMaxRatio) {
    return std::numeric_limits<uint64_t>::max();
  }
  return record.compressed_bytes * kDeflateMaxRatio;
}

}  // namespace llmem
