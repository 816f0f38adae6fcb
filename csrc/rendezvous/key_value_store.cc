#include "rendezvous/key_value_store.h"

#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace flashckpt::rendezvous {

int64_t KeyValueStore::Add(const std::string& key, int64_t delta) {
  int64_t current = 0;
  auto it = values_.find(key);
  if (it != values_.end() && !absl::SimpleAtoi(it->second, &current)) current = 0;
  current += delta;
  values_[key] = absl::StrCat(current);
  return current;
}

size_t KeyValueStore::Delete(const std::string& key, const std::string& range_end) {
  if (range_end.empty()) return values_.erase(key);
  if (range_end <= key) return 0;
  auto first = values_.lower_bound(key);
  auto last = values_.lower_bound(range_end);
  const size_t n = static_cast<size_t>(std::distance(first, last));
  values_.erase(first, last);
  return n;
}

}  // namespace flashckpt::rendezvous
