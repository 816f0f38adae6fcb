// Non-blocking save with a device whose copies take a while, while the
// previous step's persist is slowed to --persist-s seconds (a commit barrier
// that holds every step that long): how long from save() to the fence
// (the device copies of that step done), against how long a persist takes.
// The device is the test backend (host memory, copy delay), so this runs
// without a GPU.
//
//   fence_bench --plugin build/lib/libflashckpt_test_device.so --mb 256 --delay-ms 50 \
//               --persist-s 2 --reps 5 --dir /var/tmp/fck-fence --out fence.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "flashckpt/checkpointer.h"

using namespace flashckpt;
using Clock = std::chrono::steady_clock;

namespace {

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Every step's commit waits `hold` before it goes through.
class SlowBarrier : public CommitBarrier {
 public:
  explicit SlowBarrier(std::chrono::milliseconds hold) : hold_(hold) {}
  void rank_durable(int64_t step, int, const std::string& record) override {
    std::lock_guard<std::mutex> l(mu_);
    records_[step] = record;
  }
  std::vector<std::string> wait_all(int64_t step, int, std::chrono::milliseconds) override {
    std::this_thread::sleep_for(hold_);
    std::lock_guard<std::mutex> l(mu_);
    return {records_[step]};
  }

 private:
  std::chrono::milliseconds hold_;
  std::mutex mu_;
  std::map<int64_t, std::string> records_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string plugin, dir = "/var/tmp/fck-fence", out;
  double mb = 256, persist_s = 2;
  int delay_ms = 50, reps = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i];
    if (f == "--plugin") plugin = argv[i + 1];
    else if (f == "--mb") mb = std::atof(argv[i + 1]);
    else if (f == "--delay-ms") delay_ms = std::atoi(argv[i + 1]);
    else if (f == "--persist-s") persist_s = std::atof(argv[i + 1]);
    else if (f == "--reps") reps = std::atoi(argv[i + 1]);
    else if (f == "--dir") dir = argv[i + 1];
    else if (f == "--out") out = argv[i + 1];
    else {
      std::fprintf(stderr, "fence_bench: unknown flag %s\n", f.c_str());
      return 2;
    }
  }
  if (plugin.empty()) {
    std::fprintf(stderr, "fence_bench: --plugin PATH (build/lib/libflashckpt_test_device.so) is required\n");
    return 2;
  }
  ::setenv("FLASHCKPT_TEST_DEVICE_DELAY_MS", std::to_string(delay_ms).c_str(), 1);
  const std::string type = LoadDevicePlugin(plugin);
  std::filesystem::remove_all(dir);

  std::vector<float> device(static_cast<size_t>(mb * (1 << 20) / sizeof(float)), 1.0f);
  TensorRef t;
  t.key = "model.weight";
  t.data = device.data();
  t.nbytes = device.size() * sizeof(float);
  t.dtype = "torch.float32";
  t.shape = {static_cast<int64_t>(device.size())};
  t.element_size = 4;
  t.device_type = type;
  t.device = 0;

  CheckpointerOptions o;
  o.directory = dir + "/ckpt";
  o.num_slots = 3;
  o.keep_last = 2;
  o.commit_barrier = std::make_shared<SlowBarrier>(
      std::chrono::milliseconds(static_cast<int64_t>(persist_s * 1000)));
  std::vector<double> returned, fenced, persist_in_flight;
  double durable_s = 0;
  {
    Checkpointer ckpt(o);
    // Warm-up and the persist time: one step saved and waited for.
    auto t0 = Clock::now();
    ckpt.save(0, {t}, {}, /*blocking=*/false).wait_durable();
    durable_s = Since(t0);
    SaveHandle previous = ckpt.save(1, {t}, {}, false);
    previous.wait_snapshot();
    for (int r = 0; r < reps; ++r) {
      const int64_t step = 2 + r;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the previous persist is in flight
      const bool in_flight = !previous.wait_durable_for(std::chrono::milliseconds(0));
      auto s0 = Clock::now();
      SaveHandle h = ckpt.save(step, {t}, {}, /*blocking=*/false);
      returned.push_back(Since(s0));
      h.wait_snapshot();  // the fence: this step's device copies are done
      fenced.push_back(Since(s0));
      persist_in_flight.push_back(in_flight ? 1 : 0);
      std::printf("step %lld: save() returned in %.4f s, fence in %.4f s (previous persist %s)\n",
                  static_cast<long long>(step), returned.back(), fenced.back(),
                  in_flight ? "still in flight" : "done");
      previous = h;
    }
    ckpt.wait_all();
    ckpt.close();
    ckpt.unlink_memory();
  }
  std::printf("persist (save -> durable, commit held %.1f s): %.3f s; fence median %.4f s (%d MiB, device copy "
              "delay %d ms)\n", persist_s, durable_s, Median(fenced), static_cast<int>(mb), delay_ms);
  if (!out.empty()) {
    std::ofstream f(out);
    f << "{\n  \"state_mib\": " << mb << ",\n  \"device_copy_delay_ms\": " << delay_ms
      << ",\n  \"persist_held_s\": " << persist_s << ",\n  \"reps\": " << reps
      << ",\n  \"save_to_durable_s\": " << durable_s << ",\n  \"median_s\": {\"save_returned_s\": "
      << Median(returned) << ", \"save_to_fence_s\": " << Median(fenced)
      << "},\n  \"runs_s\": {\"save_to_fence_s\": [";
    for (size_t i = 0; i < fenced.size(); ++i) f << (i ? ", " : "") << fenced[i];
    f << "]},\n  \"previous_persist_in_flight\": [";
    for (size_t i = 0; i < persist_in_flight.size(); ++i) f << (i ? ", " : "") << persist_in_flight[i];
    f << "]\n}\n";
  }
  std::filesystem::remove_all(dir);
  return 0;
}
