// Checks on a model file before and after LibTorch's loader sees it, so that a file which is not a TorchScript
// export is refused in our words: a missing path, a directory, a FIFO or device (which would block a reader
// forever), a file that is not a zip archive, a truncated archive, or a torch.save checkpoint (a state dict or a
// pickled nn.Module, which is not TorchScript). The loader's own reason follows in brief.
//
// It does not load the model; the importer does.
#pragma once

#include <string>

namespace llmem {

// Throws ModelLoadError unless `path` names an existing regular file that can be opened for reading; for a zip
// archive, also unless its directory is sound (graph/zip_directory.h) and its records fit in this machine's memory
// (LibTorch's loader allocates each record's claimed size).
void CheckModelFileReadable(const std::string& path);

// Whether `path` is a zip archive holding TorchScript (constants.pkl, as torch.jit.save writes); false for anything
// else, unreadable files included.
bool IsTorchScriptArchive(const std::string& path);

// The one-line message for a file LibTorch's loader rejected with `loader_reason` (may be empty): what is wrong
// with the file, then the loader's reason shortened to its first sentence.
std::string DescribeUnloadableModelFile(const std::string& path, const std::string& loader_reason);

// The first non-empty line of `text`, without LibTorch's boilerplate advice, at most 300 characters.
std::string BriefLoaderReason(const std::string& text);

}  // namespace llmem
