#include "rendezvous/key_value_store.h"

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

}  // namespace flashckpt::rendezvous
