#include "tests/fuzz/fuzz_input_file.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace llmem::fuzz {

const std::string& AsFile(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("llmem-fuzz-input", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0 || ftruncate(fd, 0) != 0) {
    std::perror("llmem fuzz: memfd");
    std::abort();
  }
  for (size_t done = 0; done < size;) {
    const ssize_t n = pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) {
      std::perror("llmem fuzz: write");
      std::abort();
    }
    done += static_cast<size_t>(n);
  }
  return path;
}

}  // namespace llmem::fuzz
