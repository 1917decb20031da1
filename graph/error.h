// Error types for user-facing failures. Every user error is one of these; the CLI maps each type to an exit
// code and prints what() as a single line. Internal invariants use LLMEM_CHECK instead (aborts).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace llmem {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The model file is missing, unreadable, not TorchScript, or not a decoder LM.
class ModelLoadError : public Error {
 public:
  using Error::Error;
};

// An op whose memory behaviour the simulator does not know.
class UnsupportedOpError : public Error {
 public:
  using Error::Error;
};

// Bad options: batch/sequence out of range, unknown GPU, precision or optimizer, byte-count overflow.
class ConfigError : public Error {
 public:
  using Error::Error;
};

namespace detail {
[[noreturn]] void CheckFailed(const char* file, int line, const char* cond, const std::string& msg);

class CheckMessage {
 public:
  CheckMessage(const char* file, int line, const char* cond) : file_(file), line_(line), cond_(cond) {}
  [[noreturn]] ~CheckMessage() noexcept(false) { CheckFailed(file_, line_, cond_, stream_.str()); }
  template <typename T>
  CheckMessage& operator<<(const T& v) {
    stream_ << v;
    return *this;
  }

 private:
  const char* file_;
  int line_;
  const char* cond_;
  std::ostringstream stream_;
};
}  // namespace detail

}  // namespace llmem

// Internal invariant: aborts with file:line and the streamed context. Never for user input.
#define LLMEM_CHECK(cond) \
  if (cond) {             \
  } else                  \
    ::llmem::detail::CheckMessage(__FILE__, __LINE__, #cond)
