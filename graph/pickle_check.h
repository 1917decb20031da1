// A check of a pickle stream (the .pkl records of PyTorch's archives) by our own code before LibTorch's unpickler
// runs it: every opcode known and complete, every length-prefixed argument within the stream, every memo index
// below the stream's size. LibTorch's unpickler allocates what a length or memo index claims (a 40 KB file asked
// it for 31 GB), so such claims are refused here. It checks the stream's framing, not what it builds; the
// unpickler still does that.
//
// Opcodes and their arguments: CPython's Lib/pickletools.py (protocols 0 to 5).
#pragma once

#include <string>
#include <string_view>

namespace llmem {

// Throws ModelLoadError "<where> is damaged (...)" for a stream whose framing is broken or whose claims exceed it.
void CheckPickleStream(std::string_view bytes, const std::string& where);

}  // namespace llmem
