// Every wait of the public API has a deadline, and its error says what was
// waited for, for how long, and what is still pending.
#include <stdlib.h>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace flashckpt {
namespace {

using std::chrono::milliseconds;
using testing::FakeState;
using testing::HeldBarrier;
using testing::ScratchDirs;

TEST(Deadlines, WaitAllAndWaitDurableGiveUpNamingWhatIsPending) {
  ScratchDirs dirs;
  auto barrier = std::make_shared<HeldBarrier>();
  CheckpointerOptions o = dirs.Options();
  o.commit_barrier = barrier;
  o.num_slots = 3;
  o.wait_timeout = milliseconds(300);
  Checkpointer c(o);
  FakeState s1 = FakeState::ForStep(1), s2 = FakeState::ForStep(2);
  SaveHandle h1 = c.save(1, s1.Refs(), s1.Blobs());
  ASSERT_TRUE(barrier->WaitEntered());
  SaveHandle h2 = c.save(2, s2.Refs(), s2.Blobs());
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c.wait_all(milliseconds(200));
    ADD_FAILURE() << "wait_all returned while a persist is held";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded) << m;
    EXPECT_NE(m.find("0.2 s"), std::string::npos) << m;
    EXPECT_NE(m.find("step 1 in flight"), std::string::npos) << m;
    EXPECT_NE(m.find("queued: 2"), std::string::npos) << m;
  }
  try {
    h2.wait_durable();  // wait_timeout: 0.3 s
    ADD_FAILURE() << "wait_durable returned while its persist is queued";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded) << m;
    EXPECT_NE(m.find("step 2 not durable after 0.3 s"), std::string::npos) << m;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  barrier->Release();
  c.wait_all(std::chrono::seconds(30));
  EXPECT_TRUE(h1.persisted());
  EXPECT_TRUE(h2.persisted());
}

TEST(Deadlines, WaitSnapshotGivesUpOnADeviceCopyThatDoesNotFinish) {
  LoadDevicePlugin(FLASHCKPT_TEST_DEVICE_PLUGIN);
  ::setenv("FLASHCKPT_TEST_DEVICE_DELAY_MS", "1500", 1);
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.wait_timeout = milliseconds(200);
  {
    Checkpointer c(o);
    FakeState s = FakeState::ForStep(4);
    std::vector<TensorRef> refs = s.Refs();
    for (auto& r : refs) r.device_type = "flashckpt_test", r.device = 0;
    SaveHandle h = c.save(4, refs, s.Blobs(), /*blocking=*/false);
    try {
      h.wait_snapshot();
      ADD_FAILURE() << "wait_snapshot returned before the device copies";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded) << m;
      EXPECT_NE(m.find("snapshot of step 4"), std::string::npos) << m;
      EXPECT_NE(m.find("device-to-host"), std::string::npos) << m;
    }
    c.wait_all(std::chrono::seconds(30));  // the copy ends; so does the persist
    EXPECT_EQ(s.Diff(*c.load()), "");
  }
  ::unsetenv("FLASHCKPT_TEST_DEVICE_DELAY_MS");
}

}  // namespace
}  // namespace flashckpt
