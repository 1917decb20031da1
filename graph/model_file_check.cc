#include "graph/model_file_check.h"

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/versions.h>
#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <limits>
#include <vector>

#include "graph/debug_record_check.h"
#include "graph/dtype.h"
#include "graph/error.h"
#include "graph/pickle_check.h"
#include "graph/torchscript_code_check.h"
#include "graph/zip_directory.h"

namespace llmem {
namespace {

constexpr size_t kMaxReasonChars = 300;
// A zip archive (what torch.jit.save and torch.save write) starts with a local file header.
constexpr std::array<char, 4> kZipMagic{'P', 'K', '\x03', '\x04'};
// torch.save's legacy format (before PyTorch 1.6) is a bare pickle, which starts with the PROTO opcode.
constexpr char kPickleProto = '\x80';
constexpr const char* kHowToExport =
    "export the model with torch.jit.trace or torch.jit.script (models/export_hf.py does it for Hugging Face models)";

std::string FileKind(std::filesystem::file_type type) {
  using std::filesystem::file_type;
  switch (type) {
    case file_type::fifo: return "a FIFO";
    case file_type::socket: return "a socket";
    case file_type::character: return "a character device";
    case file_type::block: return "a block device";
    default: return "not a regular file";
  }
}

// The first bytes of the file (fewer when it is shorter).
std::string Head(const std::string& path, size_t n) {
  std::ifstream in(path, std::ios::binary);
  std::string head(n, '\0');
  in.read(head.data(), static_cast<std::streamsize>(n));
  head.resize(static_cast<size_t>(in.gcount()));
  return head;
}

// What a zip archive that is not TorchScript holds, or "" when it looks like a TorchScript archive (or cannot be
// opened, which the caller reports as damage). torch.jit.save writes code/ and constants.pkl; torch.save writes
// data.pkl and data/ only (serialization.py, _save).
std::string NonTorchScriptArchiveKind(caffe2::serialize::PyTorchStreamReader& reader) {
  if (reader.hasRecord("constants.pkl")) return "";
  if (!reader.hasRecord("data.pkl")) return "a zip archive without TorchScript code (no constants.pkl, no code/)";
  auto [data, size] = reader.getRecord("data.pkl");
  const std::string pickle(static_cast<const char*>(data.get()), size);
  // torch.save pickles with protocol 2: PROTO 2, then the top-level object. A class instance starts with the
  // GLOBAL opcode 'c' and "module\nname\n"; a plain dict with EMPTY_DICT '}'.
  constexpr size_t kAfterProto = 2;
  if (pickle.size() > kAfterProto && pickle[kAfterProto] == '}') {
    return "a dict saved with torch.save (a checkpoint), not a TorchScript export";
  }
  if (pickle.size() > kAfterProto && pickle[kAfterProto] == 'c') {
    const size_t module_end = pickle.find('\n', kAfterProto + 1);
    const size_t name_end = module_end == std::string::npos ? module_end : pickle.find('\n', module_end + 1);
    if (name_end != std::string::npos) {
      const std::string module = pickle.substr(kAfterProto + 1, module_end - kAfterProto - 1);
      const std::string name = pickle.substr(module_end + 1, name_end - module_end - 1);
      if (module == "collections" && name == "OrderedDict") {
        return "a state dict saved with torch.save, not a TorchScript export";
      }
      return "a pickled " + module + "." + name +
             " object saved with torch.save (e.g. an nn.Module), not a TorchScript export";
    }
  }
  return "a torch.save checkpoint, not a TorchScript export";
}

}  // namespace

std::optional<ZipRecord> FindArchiveRecord(const std::string& path, const std::string& name) {
  try {
    CheckModelFileReadable(path);
    const std::optional<std::vector<ZipRecord>> records = ReadZipDirectory(path);
    if (!records || records->empty()) return std::nullopt;
    const size_t slash = records->front().name.find('/');
    if (slash == std::string::npos) return std::nullopt;
    const std::string wanted = records->front().name.substr(0, slash + 1) + name;
    for (const ZipRecord& r : *records) {
      if (r.name == wanted) return r;
    }
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

bool IsTorchScriptArchive(const std::string& path) {
  return Head(path, kZipMagic.size()) == std::string(kZipMagic.begin(), kZipMagic.end()) &&
         FindArchiveRecord(path, "constants.pkl").has_value();
}

void CheckModelFileReadable(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) throw ModelLoadError("model file not found: " + path);
  if (fs::is_directory(status)) throw ModelLoadError("model path is a directory, not a TorchScript file: " + path);
  // Opening a FIFO blocks until a writer appears, and a device never ends: refuse before reading.
  if (!fs::is_regular_file(status)) {
    throw ModelLoadError("model path is " + FileKind(status.type()) + ", not a regular file: " + path);
  }
  std::ifstream probe(path, std::ios::binary);
  if (!probe) throw ModelLoadError("cannot read model file: " + path);
}

// The records LibTorch's reader will allocate, checked against what the archive can hold and this machine has.
void CheckModelArchive(const std::string& path) {
  const std::optional<std::vector<ZipRecord>> directory = ReadZipDirectory(path);
  if (!directory) {
    // LibTorch's reader refuses a file without a zip end record before it allocates anything; one that starts as a
    // zip archive was cut short.
    if (Head(path, kZipMagic.size()) != std::string(kZipMagic.begin(), kZipMagic.end())) return;
    throw ModelLoadError("not a readable model file: " + path + " is a truncated or damaged zip archive (no zip "
                         "directory at its end)");
  }
  const std::vector<ZipRecord>& records = *directory;
  if (records.empty()) throw ModelLoadError("not a readable model file: " + path + " is a zip archive with no records");
  // PyTorch's archives keep every record under one folder with a version record (inline_container.h); its reader
  // checks both after opening the archive, and a failed check there leaks the reader's state.
  const size_t slash = records.empty() ? std::string::npos : records.front().name.find('/');
  if (slash == std::string::npos || slash == 0) {
    throw ModelLoadError("not a readable model file: " + path + " is a zip archive, but not one PyTorch writes (its "
                         "records are not in one folder)");
  }
  const std::string folder = records.front().name.substr(0, slash + 1);
  // The reader takes .data/version over version, and parses it as a decimal within the versions it reads.
  const auto named = [&](const std::string& name) {
    return std::find_if(records.begin(), records.end(), [&](const ZipRecord& r) { return r.name == folder + name; });
  };
  const auto data_version = named(".data/version");
  const auto record = data_version != records.end() ? data_version : named("version");
  if (record == records.end()) {
    throw ModelLoadError("not a readable model file: " + path + " is a zip archive without PyTorch's version record "
                         "(" + folder + "version)");
  }
  const std::string text = record->uncompressed_bytes <= 32 ? ReadRecord(path, *record) : std::string();
  const size_t digits = text.find_first_not_of("0123456789");
  const std::string number = text.substr(0, digits);
  const bool readable = !number.empty() && number.size() <= 3 &&
                        (digits == std::string::npos || text.find_first_not_of(" \t\r\n", digits) == std::string::npos);
  const uint64_t value = readable ? std::stoull(number) : 0;
  if (value < caffe2::serialize::kMinSupportedFileFormatVersion ||
      value > caffe2::serialize::kMaxSupportedFileFormatVersion) {
    throw ModelLoadError("not a readable model file: " + path + " holds a format version LibTorch " +
                         "does not read (" + record->name.substr(0, 80) + ": '" + text.substr(0, 32) + "')");
  }
  uint64_t total = 0;
  for (const ZipRecord& r : records) {
    const std::string where = "not a readable model file: " + path + " holds " + r.name.substr(0, 80);
    if (r.method != 0 && r.method != 8) {
      throw ModelLoadError(where + " compressed with zip method " + std::to_string(r.method) +
                           ", which PyTorch's reader does not read (it writes stored records)");
    }
    if (r.uncompressed_bytes > MaxExpandedBytes(r)) {
      throw ModelLoadError(where + ", which claims " + std::to_string(r.uncompressed_bytes) + " bytes from " +
                           std::to_string(r.compressed_bytes) + " in the file: damaged");
    }
    total += r.uncompressed_bytes;  // at most 1032 x the file's size: no wrap
    // The pickles LibTorch's unpickler runs: data, constants and the (deflated) debug records.
    if (r.name.ends_with(".pkl") || r.name.ends_with(".debug_pkl")) {
      const std::string bytes = ReadRecord(path, r);
      const std::string pickle = "not a readable model file: " + path + "'s " + r.name.substr(0, 80);
      CheckPickleStream(bytes, pickle);
      if (r.name.ends_with(".debug_pkl")) CheckDebugRecords(bytes, pickle);
    }
    // The TorchScript code LibTorch compiles when it loads the archive.
    if (r.name.ends_with(".py") && r.name.find("/code/") != std::string::npos) {
      CheckTorchScriptCode(ReadRecord(path, r), "not a readable model file: " + path + "'s " + r.name.substr(0, 80));
    }
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page_bytes = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_bytes > 0 && total > static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_bytes)) {
    throw ModelLoadError("reading " + path + " needs " + FormatBytes(static_cast<int64_t>(std::min<uint64_t>(
                             total, std::numeric_limits<int64_t>::max()))) +
                         " of host memory (LibTorch's loader reads every record), more than this machine's " +
                         FormatBytes(static_cast<int64_t>(pages) * page_bytes) +
                         "; export the model on the meta device (models/export_hf.py --device meta)");
  }
}

std::string BriefLoaderReason(const std::string& text) {
  std::string line;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    line = text.substr(start, end - start);
    if (line.find_first_not_of(" \t\r") != std::string::npos) break;
    line.clear();
    start = end + 1;
  }
  // miniz errors append advice about corrupted checkpoints, which misleads for files that are merely not
  // TorchScript; the reason is what comes before it.
  const size_t advice = line.find(" This is an internal miniz error");
  if (advice != std::string::npos) line.resize(advice);
  const size_t first = line.find_first_not_of(" \t");
  line = first == std::string::npos ? "" : line.substr(first);
  if (line.size() > kMaxReasonChars) line = line.substr(0, kMaxReasonChars) + "...";
  return line;
}

std::string DescribeUnloadableModelFile(const std::string& path, const std::string& loader_reason) {
  std::string reason = BriefLoaderReason(loader_reason);
  if (reason.empty()) reason = "the TorchScript loader gave no reason";
  const std::string head = Head(path, kZipMagic.size());
  if (head.empty()) return "not a readable TorchScript file: " + path + " is empty";
  if (head.size() < kZipMagic.size() || !std::equal(kZipMagic.begin(), kZipMagic.end(), head.begin())) {
    if (head[0] == kPickleProto) {
      return "not a TorchScript file: " + path + " is a pickle (torch.save's legacy format), not a TorchScript " +
             "export; " + kHowToExport;
    }
    return "not a readable TorchScript file: " + path + " is not a zip archive (" + reason + ")";
  }
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    const std::string kind = NonTorchScriptArchiveKind(reader);
    if (!kind.empty()) return "not a TorchScript file: " + path + " is " + kind + "; " + kHowToExport;
  } catch (const c10::Error& e) {
    return "not a readable TorchScript file: " + path + " is a truncated or damaged zip archive (" +
           BriefLoaderReason(e.what_without_backtrace()) + ")";
  }
  return "not a readable TorchScript file: " + path + " (" + reason + ")";
}

}  // namespace llmem
