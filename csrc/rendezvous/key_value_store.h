// The agents' key-value store: byte values, and counters for barriers.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace flashckpt::rendezvous {

class KeyValueStore {
 public:
  void Set(const std::string& key, std::string value) { values_[key] = std::move(value); }
  std::optional<std::string> Get(const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) return std::nullopt;
    return it->second;
  }
  // Adds delta to the counter at key (missing or non-numeric counts as 0), returns the sum.
  int64_t Add(const std::string& key, int64_t delta);
  // Erases key, or with a non-empty range_end every key in [key, range_end); returns how many.
  size_t Delete(const std::string& key, const std::string& range_end);
  size_t size() const { return values_.size(); }

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace flashckpt::rendezvous
