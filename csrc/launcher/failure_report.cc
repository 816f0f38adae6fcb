#include "launcher/failure_report.h"

#include <ctime>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <variant>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "launcher/launch_options.h"

namespace flashckpt::launcher {
namespace {

// Just enough JSON for torch's error files: objects, strings, numbers, literals.
struct JsonValue {
  enum class Kind { kNull, kString, kNumber, kObject, kOther } kind = Kind::kNull;
  std::string text;  // string contents, or the number as written
  std::map<std::string, std::shared_ptr<JsonValue>> members;
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : s_(text) {}
  bool Parse(JsonValue* out) {
    if (!Value(out, 0)) return false;
    SkipSpace();
    return pos_ == s_.size();
  }

 private:
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t' || s_[pos_] == '\r')) ++pos_;
  }
  bool String(std::string* out) {
    if (pos_ >= s_.size() || s_[pos_] != '"') return false;
    ++pos_;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= s_.size()) return false;
      char e = s_[pos_++];
      switch (e) {
        case 'n': out->push_back('\n'); break;
        case 't': out->push_back('\t'); break;
        case 'r': out->push_back('\r'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'u': {
          if (pos_ + 4 > s_.size()) return false;
          unsigned code = 0;
          if (!absl::SimpleHexAtoi(s_.substr(pos_, 4), &code)) return false;
          pos_ += 4;
          if (code < 0x80) {
            out->push_back(static_cast<char>(code));
          } else if (code < 0x800) {
            out->push_back(static_cast<char>(0xc0 | (code >> 6)));
            out->push_back(static_cast<char>(0x80 | (code & 0x3f)));
          } else {
            out->push_back(static_cast<char>(0xe0 | (code >> 12)));
            out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3f)));
            out->push_back(static_cast<char>(0x80 | (code & 0x3f)));
          }
          break;
        }
        default: out->push_back(e);
      }
    }
    if (pos_ >= s_.size()) return false;
    ++pos_;
    return true;
  }
  bool Value(JsonValue* out, int depth) {
    if (depth > 64) return false;
    SkipSpace();
    if (pos_ >= s_.size()) return false;
    const char c = s_[pos_];
    if (c == '"') {
      out->kind = JsonValue::Kind::kString;
      return String(&out->text);
    }
    if (c == '{') {
      out->kind = JsonValue::Kind::kObject;
      ++pos_;
      SkipSpace();
      if (pos_ < s_.size() && s_[pos_] == '}') return ++pos_, true;
      while (true) {
        SkipSpace();
        std::string key;
        if (!String(&key)) return false;
        SkipSpace();
        if (pos_ >= s_.size() || s_[pos_] != ':') return false;
        ++pos_;
        auto member = std::make_shared<JsonValue>();
        if (!Value(member.get(), depth + 1)) return false;
        out->members[key] = member;
        SkipSpace();
        if (pos_ < s_.size() && s_[pos_] == ',') { ++pos_; continue; }
        if (pos_ < s_.size() && s_[pos_] == '}') return ++pos_, true;
        return false;
      }
    }
    if (c == '[') {
      out->kind = JsonValue::Kind::kOther;
      ++pos_;
      SkipSpace();
      if (pos_ < s_.size() && s_[pos_] == ']') return ++pos_, true;
      while (true) {
        JsonValue ignored;
        if (!Value(&ignored, depth + 1)) return false;
        SkipSpace();
        if (pos_ < s_.size() && s_[pos_] == ',') { ++pos_; continue; }
        if (pos_ < s_.size() && s_[pos_] == ']') return ++pos_, true;
        return false;
      }
    }
    const size_t start = pos_;
    while (pos_ < s_.size() && std::string(",}] \n\t\r").find(s_[pos_]) == std::string::npos) ++pos_;
    out->text = s_.substr(start, pos_ - start);
    out->kind = (out->text == "null") ? JsonValue::Kind::kNull
                : (out->text == "true" || out->text == "false") ? JsonValue::Kind::kOther
                                                                 : JsonValue::Kind::kNumber;
    return !out->text.empty();
  }
  const std::string& s_;
  size_t pos_ = 0;
};

const JsonValue* Member(const JsonValue& v, const std::string& key) {
  if (v.kind != JsonValue::Kind::kObject) return nullptr;
  auto it = v.members.find(key);
  return it == v.members.end() ? nullptr : it->second.get();
}

std::string IsoTimestamp(double seconds) {
  const time_t t = static_cast<time_t>(seconds);
  struct tm local;
  localtime_r(&t, &local);
  char buffer[64];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%d_%H:%M:%S", &local);
  return buffer;
}

std::string FormatOne(int index, const std::string& hostname, const WorkerFailure& f) {
  return absl::StrFormat(
      "[%d]:\n"
      "  time      : %s\n"
      "  host      : %s\n"
      "  rank      : %d (local_rank: %d)\n"
      "  exitcode  : %d (pid: %d)\n"
      "  error_file: %s\n"
      "  traceback : %s",
      index, IsoTimestamp(f.timestamp_s), hostname, f.global_rank, f.local_rank, f.exitcode, f.pid,
      f.error_file.empty() ? "<N/A>" : f.error_file, f.message);
}

}  // namespace

void ReadErrorFile(WorkerFailure* failure) {
  if (!failure->error_file.empty()) {
    std::ifstream in(failure->error_file);
    if (in) {
      std::stringstream buffer;
      buffer << in.rdbuf();
      JsonValue root;
      if (JsonReader(buffer.str()).Parse(&root)) {
        const JsonValue* message = Member(root, "message");
        if (message && message->kind == JsonValue::Kind::kString) {
          failure->message = message->text;
        } else if (message && message->kind == JsonValue::Kind::kObject) {
          const JsonValue* extra = Member(*message, "extraInfo");
          const JsonValue* stack = extra ? Member(*extra, "py_callstack") : nullptr;
          const JsonValue* text = Member(*message, "message");
          if (stack && stack->kind == JsonValue::Kind::kString) {
            failure->message = absl::StrReplaceAll(stack->text, {{"\n", "\n  "}});
          } else if (text && text->kind == JsonValue::Kind::kString) {
            failure->message = absl::StrReplaceAll(text->text, {{"\n", "\n  "}});
          } else {
            failure->message = "<N/A>";
          }
        }
        return;
      }
    }
  }
  if (!failure->message.empty()) return;
  if (failure->exitcode < 0) {
    failure->message = absl::StrFormat("Signal %d (%s) received by PID %d", -failure->exitcode,
                                       SignalName(-failure->exitcode), failure->pid);
  } else {
    failure->message = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html";
  }
}

std::string FormatFailureSummary(const std::string& title_name, const std::string& hostname,
                                 const std::vector<WorkerFailure>& failures) {
  const std::string title = absl::StrFormat("%s FAILED", title_name);
  size_t root = 0;
  for (size_t i = 1; i < failures.size(); ++i) {
    if (failures[i].timestamp_s < failures[root].timestamp_s) root = i;
  }
  std::string root_text;
  std::vector<std::string> others;
  size_t width = title.size();
  for (size_t i = 0; i < failures.size(); ++i) {
    std::string text = FormatOne(static_cast<int>(i), hostname, failures[i]);
    for (absl::string_view line : absl::StrSplit(text, '\n')) width = std::max(width, line.size());
    if (i == root) {
      root_text = text;
    } else {
      others.push_back(text);
    }
  }
  width = std::min<size_t>(width, 60);
  std::string other_text = others.empty() ? "  <NO_OTHER_FAILURES>" : absl::StrJoin(others, "\n");
  return absl::StrFormat("%s\n%s\n%s\nFailures:\n%s\n%s\nRoot Cause (first observed failure):\n%s\n%s\n",
                         std::string(width, '='), title, std::string(width, '-'), other_text,
                         std::string(width, '-'), root_text, std::string(width, '='));
}

}  // namespace flashckpt::launcher
