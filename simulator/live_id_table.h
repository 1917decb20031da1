// LiveIdTable<T>: what an allocator model keeps per live request id, with map semantics (insert, find, erase).
//
// A simulated step numbers its blocks densely from 0, so the allocator models look an id up on every Alloc and
// Free of a replay that has tens of thousands of events: ids in [0, kDenseIds) live in a vector indexed by id, any
// other id (tests, callers with their own numbering) in a hash map. Both behave the same; only the cost differs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace llmem::sim {

template <typename T>
class LiveIdTable {
 public:
  bool Contains(int64_t id) const { return Find(id) != nullptr; }

  // Inserts a value for an id that is not live.
  void Insert(int64_t id, T value) {
    if (IsDense(id)) {
      const auto i = static_cast<size_t>(id);
      if (i >= dense_.size()) dense_.resize(std::max(i + 1, dense_.size() * 2));
      dense_[i] = std::move(value);
    } else {
      sparse_.insert_or_assign(id, std::move(value));
    }
  }

  // The value of a live id; nullptr when the id is not live.
  const T* Find(int64_t id) const {
    if (IsDense(id)) {
      const auto i = static_cast<size_t>(id);
      return i < dense_.size() && dense_[i].has_value() ? &*dense_[i] : nullptr;
    }
    const auto it = sparse_.find(id);
    return it == sparse_.end() ? nullptr : &it->second;
  }

  // Removes a live id.
  void Erase(int64_t id) {
    if (IsDense(id)) {
      dense_[static_cast<size_t>(id)].reset();
    } else {
      sparse_.erase(id);
    }
  }

 private:
  // Ids below this are dense: a table of this many entries stays small next to the step it simulates.
  static constexpr int64_t kDenseIds = int64_t{1} << 24;
  static bool IsDense(int64_t id) { return id >= 0 && id < kDenseIds; }

  std::vector<std::optional<T>> dense_;
  std::unordered_map<int64_t, T> sparse_;
};

}  // namespace llmem::sim
