// Device backends as plugins, with the test backend (test_device_plugin.cc:
// "device" memory is host memory, copies take FLASHCKPT_TEST_DEVICE_DELAY_MS):
// loading and refusing plugins, saving device tensors bit-exact, and a
// non-blocking save whose fence waits for its device copies only, never for
// the persist of an earlier step.
#include <dlfcn.h>
#include <stdlib.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace flashckpt {
namespace {

using testing::FakeState;
using testing::HeldBarrier;
using testing::ScratchDirs;

std::vector<TensorRef> OnTestDevice(const FakeState& s) {
  std::vector<TensorRef> refs = s.Refs();
  for (auto& r : refs) {
    r.device_type = "flashckpt_test";
    r.device = 0;
  }
  return refs;
}

TEST(DevicePlugin, LoadsByPathAndRefusesWhatIsNotOne) {
  EXPECT_EQ(LoadDevicePlugin(FLASHCKPT_TEST_DEVICE_PLUGIN), "flashckpt_test");
  auto types = DeviceTypes();
  EXPECT_NE(std::find(types.begin(), types.end(), "flashckpt_test"), types.end());
  try {
    LoadDevicePlugin("/nonexistent/libnothing.so");
    ADD_FAILURE() << "loaded a plugin that does not exist";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/libnothing.so"), std::string::npos) << e.what();
  }
  try {
    LoadDevicePlugin("libm.so.6");  // a shared library, but no backend
    ADD_FAILURE() << "loaded a library that exports no backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fck_device_backend_v1"), std::string::npos) << e.what();
  }
}

TEST(DevicePlugin, ATypeWithNoBackendFailsTheSaveNamingTypeKeyAndRemedy) {
  ScratchDirs dirs;
  Checkpointer c(dirs.Options());
  FakeState s = FakeState::ForStep(1);
  std::vector<TensorRef> refs = s.Refs();
  refs[2].device_type = "xpu";
  refs[2].device = 0;
  try {
    c.save(1, refs, s.Blobs());
    ADD_FAILURE() << "saved an xpu tensor with no xpu backend";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
    EXPECT_NE(m.find("no device backend for 'xpu' tensors"), std::string::npos) << m;
    EXPECT_NE(m.find("'layer2.weight'"), std::string::npos) << m;
    EXPECT_NE(m.find("load_device_plugin"), std::string::npos) << m;
  }
  EXPECT_TRUE(c.steps().empty());  // nothing half-saved
}

TEST(DevicePlugin, DeviceTensorsSaveAndLoadBitExact) {
  LoadDevicePlugin(FLASHCKPT_TEST_DEVICE_PLUGIN);
  ScratchDirs dirs;
  Checkpointer c(dirs.Options());
  FakeState s = FakeState::ForStep(3);
  c.save(3, OnTestDevice(s), s.Blobs()).wait_durable();
  EXPECT_EQ(s.Diff(*c.load()), "");
  LoadOptions storage;
  storage.prefer_memory = false;
  EXPECT_EQ(s.Diff(*c.load(storage)), "");  // the crc of device bytes was taken after the copy
}

uint64_t ToDeviceBytes() {
  void* h = ::dlopen(FLASHCKPT_TEST_DEVICE_PLUGIN, RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return 0;
  auto fn = reinterpret_cast<uint64_t (*)()>(::dlsym(h, "flashckpt_test_device_to_device_bytes"));
  uint64_t n = fn ? fn() : 0;
  ::dlclose(h);
  return n;
}

// load_into device destinations: host-to-device through the backend, from
// the page-locked slot (the test backend refuses pageable host memory), from
// a fresh Checkpointer's memory and from storage's registered read buffers;
// bit-exact each time. A type with no backend fails before a byte is written.
TEST(DevicePlugin, LoadIntoDeviceTensorsGoesHostToDeviceFromPinnedMemory) {
  LoadDevicePlugin(FLASHCKPT_TEST_DEVICE_PLUGIN);
  ScratchDirs dirs;
  FakeState s = FakeState::ForStep(4, 3);
  uint64_t total = 0;
  for (const auto& d : s.data) total += d.size() * 4;
  std::vector<std::vector<float>> bufs(s.keys.size());
  auto targets = [&](const std::string& type) {
    std::map<std::string, MutableTensorRef> dest;
    for (size_t i = 0; i < s.keys.size(); ++i) {
      bufs[i].assign(s.data[i].size(), -1.0f);
      MutableTensorRef d{bufs[i].data(), bufs[i].size() * 4, "torch.float32", {static_cast<int64_t>(bufs[i].size())}};
      if (i % 2 == 0) {  // every other tensor on the device, the rest on the host
        d.device_type = type;
        d.device = 0;
      }
      dest[s.keys[i]] = d;
    }
    return dest;
  };
  uint64_t on_device = 0;
  for (size_t i = 0; i < s.keys.size(); i += 2) on_device += s.data[i].size() * 4;
  ASSERT_GT(on_device, 0u);
  CheckpointerOptions o = dirs.Options();
  o.unlink_memory_on_close = false;  // the fresh Checkpointer below finds the snapshot in memory
  {
    Checkpointer c(o);
    c.save(4, OnTestDevice(s), s.Blobs()).wait_durable();
    uint64_t before = ToDeviceBytes();
    Source source;
    EXPECT_EQ(c.load_into(targets("flashckpt_test"), nullptr, {}, &source), 4);
    EXPECT_EQ(source, Source::kMemory);
    EXPECT_EQ(bufs, s.data);
    EXPECT_EQ(ToDeviceBytes() - before, on_device);

    try {
      c.load_into(targets("xpu"));
      ADD_FAILURE() << "a load into a type with no backend went through";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("'xpu'"), std::string::npos) << m;
      EXPECT_NE(m.find("load_device_plugin"), std::string::npos) << m;
      for (const auto& b : bufs)
        for (float x : b) ASSERT_EQ(x, -1.0f) << "a buffer changed though the load was refused";
    }
  }
  for (bool memory : {true, false}) {
    SCOPED_TRACE(memory ? "fresh Checkpointer, memory" : "storage");
    Checkpointer c(o);  // its own mapping of the segment, not registered yet
    uint64_t before = ToDeviceBytes();
    LoadOptions lo;
    lo.prefer_memory = memory;
    Source source;
    EXPECT_EQ(c.load_into(targets("flashckpt_test"), nullptr, lo, &source), 4);
    EXPECT_EQ(source, memory ? Source::kMemory : Source::kStorage);
    EXPECT_EQ(bufs, s.data);
    EXPECT_EQ(ToDeviceBytes() - before, on_device);
    if (!memory) c.unlink_memory();  // nothing left behind
  }
}

TEST(DevicePlugin, TheFenceOfANonBlockingSaveNeverWaitsForAPersist) {
  LoadDevicePlugin(FLASHCKPT_TEST_DEVICE_PLUGIN);
  ::setenv("FLASHCKPT_TEST_DEVICE_DELAY_MS", "1000", 1);
  ScratchDirs dirs;
  auto barrier = std::make_shared<HeldBarrier>();
  CheckpointerOptions o = dirs.Options();
  o.commit_barrier = barrier;
  o.num_slots = 3;
  {
    Checkpointer c(o);
    FakeState s1 = FakeState::ForStep(1), s2 = FakeState::ForStep(2);
    SaveHandle h1 = c.save(1, OnTestDevice(s1), s1.Blobs(), /*blocking=*/false);
    // Returned with the device copies queued: nothing published yet.
    EXPECT_FALSE(c.latest_memory_step().has_value());
    h1.wait_snapshot();
    EXPECT_EQ(c.latest_memory_step(), 1);
    ASSERT_TRUE(barrier->WaitEntered());  // step 1's persist is in flight, held
    SaveHandle h2 = c.save(2, OnTestDevice(s2), s2.Blobs(), /*blocking=*/false);
    h2.wait_snapshot();
    // Step 2's bytes are in memory while step 1's persist is still held.
    EXPECT_TRUE(barrier->holding());
    EXPECT_FALSE(h1.persisted());
    EXPECT_EQ(c.latest_memory_step(), 2);
    EXPECT_EQ(s2.Diff(*c.load()), "");
    barrier->Release();
    h1.wait_durable();
    h2.wait_durable();
    EXPECT_TRUE(h2.persisted());
  }
  ::unsetenv("FLASHCKPT_TEST_DEVICE_DELAY_MS");
}

}  // namespace
}  // namespace flashckpt
