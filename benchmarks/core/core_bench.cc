// Core benchmark: a GPT-style state (parameters + Adam moments, several
// hundred tensors) through the flashckpt C++ API, against the physical
// limits measured in the same run:
//   save (snapshot into shared memory)  vs  single-threaded memcpy into touched memory
//   first save of a new Checkpointer    vs  later saves
//   time until durable                  vs  dd oflag=direct conv=fsync of the same bytes
//   load from memory                    vs  memcpy (into touched / fresh memory)
//   load from storage                   vs  dd iflag=direct (sequential O_DIRECT read)
// Medians of --reps runs; results as JSON.
//
//   core_bench --gib 2 --dir /var/tmp/fck-bench --reps 3 --out benchmarks/results/core_2gib.json
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "flashckpt/checkpointer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double Secs(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct Tensor {
  std::string key;
  std::vector<int64_t> shape;
  uint64_t bytes;
  uint8_t* data;
};

// GPT-2-like layout: embeddings, then per layer ln/attn/mlp weights; Adam's
// exp_avg and exp_avg_sq for each parameter.
std::vector<Tensor> GptState(double gib, uint8_t* arena_out[], uint64_t* total) {
  const int64_t d = gib >= 3 ? 1280 : 1024, vocab = 50257, ctx = 1024;
  std::vector<std::pair<std::string, std::vector<int64_t>>> params = {{"wte", {vocab, d}}, {"wpe", {ctx, d}}};
  auto param_bytes = [&] {
    uint64_t b = 0;
    for (auto& p : params) { uint64_t n = 4; for (auto x : p.second) n *= x; b += n; }
    return b;
  };
  const uint64_t target = static_cast<uint64_t>(gib * (1ull << 30));
  for (int l = 0; param_bytes() * 3 < target; ++l) {
    std::string p = absl::StrCat("h.", l, ".");
    params.push_back({p + "ln_1.weight", {d}});
    params.push_back({p + "ln_1.bias", {d}});
    params.push_back({p + "attn.c_attn.weight", {d, 3 * d}});
    params.push_back({p + "attn.c_attn.bias", {3 * d}});
    params.push_back({p + "attn.c_proj.weight", {d, d}});
    params.push_back({p + "attn.c_proj.bias", {d}});
    params.push_back({p + "ln_2.weight", {d}});
    params.push_back({p + "ln_2.bias", {d}});
    params.push_back({p + "mlp.c_fc.weight", {d, 4 * d}});
    params.push_back({p + "mlp.c_fc.bias", {4 * d}});
    params.push_back({p + "mlp.c_proj.weight", {4 * d, d}});
    params.push_back({p + "mlp.c_proj.bias", {d}});
  }
  params.push_back({"ln_f.weight", {d}});
  params.push_back({"ln_f.bias", {d}});
  std::vector<Tensor> out;
  for (const char* prefix : {"model.", "optim.exp_avg.", "optim.exp_avg_sq."})
    for (auto& p : params) {
      uint64_t n = 4;
      for (auto x : p.second) n *= x;
      out.push_back({prefix + p.first, p.second, n, nullptr});
    }
  // Separate allocations, like a framework's tensors.
  *total = 0;
  for (auto& t : out) {
    t.data = static_cast<uint8_t*>(std::aligned_alloc(64, (t.bytes + 63) / 64 * 64));
    for (uint64_t i = 0; i < t.bytes; i += 4096) t.data[i] = static_cast<uint8_t>(i * 7 + t.bytes);
    std::memset(t.data, 0x3c, std::min<uint64_t>(t.bytes, 256));
    *total += t.bytes;
  }
  (void)arena_out;
  return out;
}

std::vector<flashckpt::TensorRef> Refs(const std::vector<Tensor>& ts) {
  std::vector<flashckpt::TensorRef> r;
  for (auto& t : ts) {
    flashckpt::TensorRef x;
    x.key = t.key;
    x.data = t.data;
    x.nbytes = t.bytes;
    x.dtype = "torch.float32";
    x.shape = t.shape;
    x.element_size = 4;
    r.push_back(std::move(x));
  }
  return r;
}

uint8_t* Touched(uint64_t bytes) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
  std::memset(p, 0, bytes);
  return p;
}

double RunSeconds(const std::string& cmd) {
  auto t0 = Clock::now();
  int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
  double s = Secs(t0);
  if (rc != 0) std::fprintf(stderr, "warning: `%s` exited %d\n", cmd.c_str(), rc);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  double gib = 2;
  int reps = 3;
  std::string dir = "/var/tmp/flashckpt-bench", out;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i];
    if (f == "--gib") gib = std::atof(argv[i + 1]);
    else if (f == "--reps") reps = std::atoi(argv[i + 1]);
    else if (f == "--dir") dir = argv[i + 1];
    else if (f == "--out") out = argv[i + 1];
    else { std::fprintf(stderr, "unknown flag %s\n", f.c_str()); return 2; }
  }
  fs::remove_all(dir);
  fs::create_directories(dir);
  uint64_t total = 0;
  auto tensors = GptState(gib, nullptr, &total);
  auto refs = Refs(tensors);
  std::printf("state: %zu tensors, %.2f GiB\n", tensors.size(), total / double(1ull << 30));
  std::map<std::string, std::vector<double>> m;

  // --- physical limits ------------------------------------------------------
  uint8_t* dest = Touched(total + tensors.size() * 4096);
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    uint64_t off = 0;
    for (auto& t : tensors) { std::memcpy(dest + off, t.data, t.bytes); off += (t.bytes + 4095) / 4096 * 4096; }
    m["memcpy_touched_s"].push_back(Secs(t0));
  }
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    auto* fresh = static_cast<uint8_t*>(std::aligned_alloc(4096, (total + 4095) / 4096 * 4096));
    uint64_t off = 0;
    for (auto& t : tensors) { std::memcpy(fresh + off, t.data, t.bytes); off += t.bytes; }
    m["memcpy_fresh_s"].push_back(Secs(t0));
    std::free(fresh);
  }
  const uint64_t mib = (total + (1 << 20) - 1) >> 20;
  const std::string ddfile = dir + "/dd.bin";
  for (int r = 0; r < reps; ++r) {
    fs::remove(ddfile);
    m["dd_write_direct_fsync_s"].push_back(
        RunSeconds(absl::StrFormat("dd if=/dev/zero of=%s bs=1M count=%d oflag=direct conv=fsync", ddfile, mib)));
    m["dd_read_direct_s"].push_back(RunSeconds(absl::StrFormat("dd if=%s of=/dev/null bs=8M iflag=direct", ddfile)));
  }
  fs::remove(ddfile);

  // --- flashckpt --------------------------------------------------------------
  flashckpt::CheckpointerOptions o;
  o.directory = dir + "/ckpt";
  o.keep_last = 1;
  o.run_id = "bench";
  {
    // First save of a Checkpointer that did not reserve its slots.
    for (int r = 0; r < reps; ++r) {
      flashckpt::Checkpointer c(o);
      auto t0 = Clock::now();
      auto h = c.save(r, refs, {});
      m["first_save_unreserved_s"].push_back(Secs(t0));
      h.wait_durable();
      c.close();
      c.unlink_memory();
    }
    // Reserved at construction: the construction pays the page faults.
    for (int r = 0; r < reps; ++r) {
      flashckpt::CheckpointerOptions o2 = o;
      o2.reserve_bytes = total + tensors.size() * 4096 + (1 << 20);
      o2.reserve_in_background = false;
      auto t0 = Clock::now();
      flashckpt::Checkpointer c(o2);
      m["construct_reserved_s"].push_back(Secs(t0));
      t0 = Clock::now();
      auto h = c.save(r, refs, {});
      m["first_save_reserved_s"].push_back(Secs(t0));
      h.wait_durable();
      c.close();
      c.unlink_memory();
    }
  }
  flashckpt::Checkpointer ckpt(o);
  ckpt.save(0, refs, {}).wait_durable();
  for (int r = 1; r <= reps; ++r) {
    auto t0 = Clock::now();
    auto h = ckpt.save(r, refs, {});
    m["save_blocking_s"].push_back(Secs(t0));
    h.wait_durable();
    m["save_to_durable_s"].push_back(Secs(t0));
  }
  for (int r = 0; r < reps; ++r) {
    flashckpt::LoadOptions lo;
    auto t0 = Clock::now();
    auto snap = ckpt.load(lo);
    m["load_memory_fresh_buffer_s"].push_back(Secs(t0));
    if (snap->source() != flashckpt::Source::kMemory) std::fprintf(stderr, "warning: not loaded from memory\n");
  }
  {
    std::map<std::string, flashckpt::MutableTensorRef> into;
    uint64_t off = 0;
    for (auto& t : tensors) {
      into[t.key] = {dest + off, t.bytes, "torch.float32", t.shape};
      off += (t.bytes + 4095) / 4096 * 4096;
    }
    for (int r = 0; r < reps; ++r) {
      auto t0 = Clock::now();
      ckpt.load_into(into);
      m["load_memory_into_touched_s"].push_back(Secs(t0));
    }
  }
  std::free(dest);
  for (int r = 0; r < reps; ++r) {
    flashckpt::LoadOptions lo;
    lo.prefer_memory = false;
    auto t0 = Clock::now();
    auto snap = ckpt.load(lo);
    m["load_storage_s"].push_back(Secs(t0));
  }
  ckpt.close();
  ckpt.unlink_memory();

  std::map<std::string, double> med;
  for (auto& [k, v] : m) med[k] = Median(v);
  const double gb = total / 1e9;
  std::map<std::string, double> derived = {
      {"ratio_save_vs_memcpy", med["save_blocking_s"] / med["memcpy_touched_s"]},
      {"ratio_first_save_reserved_vs_later", med["first_save_reserved_s"] / med["save_blocking_s"]},
      {"durable_throughput_GBps", gb / med["save_to_durable_s"]},
      {"dd_write_throughput_GBps", gb / med["dd_write_direct_fsync_s"]},
      {"ratio_durable_throughput_vs_dd", med["dd_write_direct_fsync_s"] / med["save_to_durable_s"]},
      {"ratio_load_memory_into_vs_memcpy_touched", med["load_memory_into_touched_s"] / med["memcpy_touched_s"]},
      {"ratio_load_memory_fresh_vs_memcpy_fresh", med["load_memory_fresh_buffer_s"] / med["memcpy_fresh_s"]},
      {"ratio_load_storage_throughput_vs_dd_read", med["dd_read_direct_s"] / med["load_storage_s"]},
  };
  std::printf("\n%-44s %10s\n", ("median of " + std::to_string(reps) + " runs").c_str(), "seconds");
  for (auto& [k, v] : med) std::printf("%-44s %10.3f\n", k.c_str(), v);
  std::printf("\n");
  for (auto& [k, v] : derived) std::printf("%-44s %10.3f\n", k.c_str(), v);
  if (!out.empty()) {
    std::ofstream f(out);
    f << "{\n  \"state_bytes\": " << total << ",\n  \"tensors\": " << tensors.size() << ",\n  \"reps\": " << reps
      << ",\n  \"dir\": \"" << dir << "\",\n  \"median_s\": {";
    bool first = true;
    for (auto& [k, v] : med) { f << (first ? "\n" : ",\n") << "    \"" << k << "\": " << v; first = false; }
    f << "\n  },\n  \"runs_s\": {";
    first = true;
    for (auto& [k, v] : m) {
      f << (first ? "\n" : ",\n") << "    \"" << k << "\": [";
      for (size_t i = 0; i < v.size(); ++i) f << (i ? ", " : "") << v[i];
      f << "]";
      first = false;
    }
    f << "\n  },\n  \"derived\": {";
    first = true;
    for (auto& [k, v] : derived) { f << (first ? "\n" : ",\n") << "    \"" << k << "\": " << v; first = false; }
    f << "\n  }\n}\n";
  }
  for (auto& t : tensors) std::free(t.data);
  fs::remove_all(dir);
  return 0;
}
