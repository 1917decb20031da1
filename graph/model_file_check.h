// Checks on a model file before and after LibTorch's loader sees it, so that a file which is not a TorchScript
// export is refused in our words: a missing path, a directory, a FIFO or device (which would block a reader
// forever), a file that is not a zip archive, a truncated archive, or a torch.save checkpoint (a state dict or a
// pickled nn.Module, which is not TorchScript). The loader's own reason follows in brief.
//
// It does not load the model; the importer does.
#pragma once

#include <optional>
#include <string>

#include "graph/zip_directory.h"

namespace llmem {

// Throws ModelLoadError unless `path` names an existing regular file that can be opened for reading.
void CheckModelFileReadable(const std::string& path);

// For a file with a zip directory: throws ModelLoadError unless the directory is sound (graph/zip_directory.h), the
// records are PyTorch's (one folder, a version record LibTorch reads), fit in this machine's memory (LibTorch's
// loader allocates each record's claimed size) and every pickle is well framed (graph/pickle_check.h). Run before
// LibTorch's reader opens the file.
void CheckModelArchive(const std::string& path);

// The record `name` of PyTorch's archive at `path` (under the archive's one folder, as LibTorch's reader names it),
// from our reading of the zip directory alone; none for a file that is not such an archive or lacks the record.
std::optional<ZipRecord> FindArchiveRecord(const std::string& path, const std::string& name);

// Whether `path` is a zip archive holding TorchScript (constants.pkl, as torch.jit.save writes); false for anything
// else, unreadable files included.
bool IsTorchScriptArchive(const std::string& path);

// The one-line message for a file LibTorch's loader rejected with `loader_reason` (may be empty): what is wrong
// with the file, then the loader's reason shortened to its first sentence.
std::string DescribeUnloadableModelFile(const std::string& path, const std::string& loader_reason);

// The first non-empty line of `text`, without LibTorch's boilerplate advice, at most 300 characters.
std::string BriefLoaderReason(const std::string& text);

}  // namespace llmem
