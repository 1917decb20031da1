#include "cli/hf_config_export.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <array>
#include <cctype>
#include <cmath>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "graph/error.h"

extern char** environ;

namespace llmem::cli {
namespace {

namespace fs = std::filesystem;

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::string(value) : fallback;
}

// The exporter and the Python that runs it: the project's, as built; LLMEM_PYTHON / LLMEM_EXPORTER override them.
std::string PythonPath() { return EnvOr("LLMEM_PYTHON", LLMEM_DEFAULT_PYTHON); }
std::string ExporterPath() { return EnvOr("LLMEM_EXPORTER", LLMEM_DEFAULT_EXPORTER); }

fs::path CacheDir() {
  if (const char* dir = std::getenv("LLMEM_CACHE_DIR"); dir != nullptr && *dir != '\0') return fs::path(dir) / "exports";
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0')
    return fs::path(xdg) / "llmem" / "exports";
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0')
    return fs::path(home) / ".cache" / "llmem" / "exports";
  return fs::temp_directory_path() / "llmem-exports";
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// FNV-1a: a stable name for the cache entry (not a security boundary: the cache is the user's own directory).
uint64_t Fnv1a(std::string_view bytes, uint64_t hash = 14695981039346656037ull) {
  for (const unsigned char c : bytes) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

fs::path ConfigFile(const std::string& path) {
  std::error_code ec;
  const fs::path given(path);
  return fs::is_directory(given, ec) ? given / "config.json" : given;
}

// Runs argv with stdout discarded and stderr captured; returns the exit status (-1: could not start it).
int Run(const std::vector<std::string>& argv, std::string& err) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return -1;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDERR_FILENO);
  posix_spawn_file_actions_addclose(&actions, pipe_fds[0]);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(pipe_fds[1]);
  if (spawned != 0) {
    close(pipe_fds[0]);
    return -1;
  }
  std::array<char, 4096> buffer;
  for (ssize_t n; (n = read(pipe_fds[0], buffer.data(), buffer.size())) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    err.append(buffer.data(), static_cast<size_t>(n));
  }
  close(pipe_fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// The exporter's one-line reason (`export_hf.py: error: ...`), else its last line.
std::string ExporterReason(const std::string& err) {
  std::string last;
  std::istringstream lines(err);
  for (std::string line; std::getline(lines, line);) {
    constexpr std::string_view kPrefix = "export_hf.py: error: ";
    if (line.starts_with(kPrefix)) return line.substr(kPrefix.size());
    if (!line.empty()) last = line;
  }
  return last.empty() ? "the exporter stopped without saying why" : last;
}

// Notes the exporter prints for the user (a quantization_config it leaves out), passed on.
void PassOnNotes(const std::string& err) {
  std::istringstream lines(err);
  for (std::string line; std::getline(lines, line);) {
    constexpr std::string_view kPrefix = "export_hf.py: note: ";
    if (line.starts_with(kPrefix)) std::fprintf(stderr, "llmem: note: %s\n", line.c_str() + kPrefix.size());
  }
}

}  // namespace

std::string ConfigModelType(const std::string& text) {
  const auto config = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (config.is_object() && config.contains("model_type") && config["model_type"].is_string()) {
    std::string type = config["model_type"];
    for (char& c : type)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') c = '_';
    if (!type.empty() && type.size() <= 64) return type;
  }
  return "model";
}

void AddModelSource(CLI::App* cmd, ModelSource& source, const char* file_help) {
  cmd->add_option("model", source.file, file_help);
  cmd->add_option("--hf-config", source.hf_config,
                  "a Hugging Face config.json (or the model directory holding it) instead of an export: traced on the "
                  "meta device once, then cached");
  cmd->add_option("--moe-imbalance", source.moe_imbalance,
                  "a mixture-of-experts model with its busiest expert at F times the balanced rows (1: balanced, the "
                  "default routing; a pessimistic bound for a router that favours one expert): traced so by "
                  "--hf-config, or an export made with models/export_hf.py --moe-imbalance F")
      ->check(CLI::Range(1.0, 1024.0));
}

void CheckMoeImbalance(const ModelSource& source, const DecoderModel& model) {
  if (!source.moe_imbalance) return;
  const auto moe = model.moe_routing();
  if (!moe) throw ConfigError("--moe-imbalance applies to a mixture-of-experts model; " + model.path() + " has none");
  if (std::abs(moe->busiest - *source.moe_imbalance) > 0.005) {
    char traced[32], wanted[32];
    std::snprintf(traced, sizeof(traced), "%g", moe->busiest);
    std::snprintf(wanted, sizeof(wanted), "%g", *source.moe_imbalance);
    throw ConfigError(model.path() + " was traced with its busiest expert at " + traced +
                      "x the balanced rows: export it with models/export_hf.py --moe-imbalance " + wanted +
                      " (or give --hf-config, which traces it so)");
  }
}

std::string ExportDtypeFor(const std::string& precision) {
  if (precision == "bf16") return "bfloat16";
  if (precision == "fp16") return "float16";
  return "float32";
}

std::string ModelFile(const ModelSource& source, const std::string& dtype, bool quiet) {
  if (!source.file.empty() && !source.hf_config.empty())
    throw Error("give a model file or --hf-config, not both");
  if (source.hf_config.empty()) {
    if (source.file.empty()) throw Error("give the model: an export file, or --hf-config PATH/config.json");
    return source.file;
  }
  const fs::path config = ConfigFile(source.hf_config);
  std::error_code ec;
  if (!fs::is_regular_file(config, ec))
    throw Error("--hf-config: no config file at " + config.string() +
                (fs::is_directory(source.hf_config, ec) ? " (a model directory holds config.json)" : ""));
  const std::string text = ReadFile(config);
  const std::string python = PythonPath(), exporter = ExporterPath();
  if (!fs::is_regular_file(exporter, ec))
    throw Error("--hf-config needs llmem's exporter, not found at " + exporter + " (set LLMEM_EXPORTER)");
  uint64_t key = Fnv1a(text);
  key = Fnv1a(dtype, key);
  key = Fnv1a(ReadFile(exporter), key);
  key = Fnv1a(python, key);
  std::vector<std::string> routing;  // the exporter's arguments for a stated MoE routing
  if (source.moe_imbalance && *source.moe_imbalance != 1.0) {
    char f[32];
    std::snprintf(f, sizeof(f), "%g", *source.moe_imbalance);
    routing = {"--moe-imbalance", f};
    key = Fnv1a(std::string("moe-imbalance ") + f, key);
  }
  char name[128];
  std::snprintf(name, sizeof(name), "%s-%s-%016llx.meta.pt", ConfigModelType(text).c_str(), dtype.c_str(),
                static_cast<unsigned long long>(key));
  const fs::path dir = CacheDir();
  const fs::path cached = dir / name;
  if (fs::is_regular_file(cached, ec)) return cached.string();
  fs::create_directories(dir, ec);
  if (ec) throw Error("--hf-config: cannot create the export cache " + dir.string() + ": " + ec.message());
  const bool progress = !quiet && isatty(STDERR_FILENO) == 1;
  if (progress)
    std::fprintf(stderr, "llmem: tracing %s on the meta device (once per config; cached in %s) ...\n",
                 config.string().c_str(), dir.string().c_str());
  const auto start = std::chrono::steady_clock::now();
  const fs::path partial = dir / (std::string(name) + "." + std::to_string(getpid()) + ".partial");
  std::string err;
  std::vector<std::string> argv{python, exporter, "--config", config.string(), "--device", "meta", "--dtype", dtype,
                                "--out", partial.string()};
  argv.insert(argv.end(), routing.begin(), routing.end());
  const int status = Run(argv, err);
  if (status == -1 || status == 127)
    throw Error("--hf-config needs the project's Python to run the exporter (" + python +
                " did not start): run scripts/setup.sh, or set LLMEM_PYTHON");
  if (status != 0) {
    fs::remove(partial, ec);
    throw Error("cannot export " + config.string() + ": " + ExporterReason(err));
  }
  PassOnNotes(err);
  fs::rename(partial, cached, ec);
  if (ec) throw Error("--hf-config: cannot keep the export in " + dir.string() + ": " + ec.message());
  if (progress)
    std::fprintf(stderr, "llmem: traced in %.1f s\n",
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return cached.string();
}

}  // namespace llmem::cli
