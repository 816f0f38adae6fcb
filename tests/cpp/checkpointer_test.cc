#include "flashckpt/checkpointer.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "gtest/gtest.h"
#include "storage/layout.h"
#include "test_util.h"

namespace flashckpt {
namespace {

namespace fs = std::filesystem;
using testing::FakeState;
using testing::ScratchDirs;

TEST(Checkpointer, SaveLoadFromMemoryAndStorage) {
  ScratchDirs dirs;
  FakeState s = FakeState::ForStep(5);
  {
    Checkpointer ckpt(dirs.Options());
    auto h = ckpt.save(5, s.Refs(), s.Blobs());
    h.wait_durable();
    EXPECT_TRUE(h.persisted());
    EXPECT_EQ(ckpt.latest_step(), 5);
    EXPECT_EQ(ckpt.latest_memory_step(), 5);
    auto mem = ckpt.load();
    EXPECT_EQ(mem->source(), Source::kMemory);
    EXPECT_EQ(mem->step(), 5);
    EXPECT_EQ(s.Diff(*mem), "");
    LoadOptions lo;
    lo.prefer_memory = false;
    auto disk = ckpt.load(lo);
    EXPECT_EQ(disk->source(), Source::kStorage);
    EXPECT_EQ(s.Diff(*disk), "");
    // Files and records as documented.
    EXPECT_TRUE(fs::exists(dirs.ckpt + "/step-5/COMMIT"));
    EXPECT_TRUE(fs::exists(dirs.ckpt + "/step-5/rank-0.data"));
    std::ifstream latest(dirs.ckpt + "/latest");
    int64_t l;
    latest >> l;
    EXPECT_EQ(l, 5);
  }
  // Closed with everything durable: the segment is gone; a new Checkpointer reads storage.
  EXPECT_TRUE(fs::is_empty(dirs.shm));
  Checkpointer again(dirs.Options());
  auto snap = again.load();
  EXPECT_EQ(snap->source(), Source::kStorage);
  EXPECT_EQ(s.Diff(*snap), "");
}

TEST(Checkpointer, RetentionKeepsTheNewestCommittedSteps) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.keep_last = 2;
  Checkpointer ckpt(o);
  for (int64_t step = 1; step <= 5; ++step) {
    FakeState s = FakeState::ForStep(step);
    ckpt.save(step, s.Refs(), s.Blobs()).wait_durable();
  }
  ckpt.wait_all();  // retention runs after the step is reported durable
  std::vector<int64_t> committed;
  for (const auto& st : ckpt.steps())
    if (st.committed) committed.push_back(st.step);
  EXPECT_EQ(committed, (std::vector<int64_t>{4, 5}));
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-3"));
  LoadOptions lo;
  lo.step = 4;
  lo.prefer_memory = false;
  EXPECT_EQ(FakeState::ForStep(4).Diff(*ckpt.load(lo)), "");
}

TEST(Checkpointer, PersistEverySkipsStepsButKeepsThemInMemory) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.persist_every = 2;
  o.num_slots = 3;
  Checkpointer ckpt(o);
  std::vector<SaveHandle> hs;
  for (int64_t step = 1; step <= 4; ++step) {
    FakeState s = FakeState::ForStep(step);
    hs.push_back(ckpt.save(step, s.Refs(), s.Blobs()));
  }
  ckpt.wait_all();
  EXPECT_TRUE(hs[0].persisted());
  EXPECT_FALSE(hs[1].persisted());
  EXPECT_TRUE(hs[2].persisted());
  EXPECT_EQ(ckpt.latest_step(), 3);
  EXPECT_EQ(ckpt.latest_memory_step(), 4);
  auto snap = ckpt.load();  // the newest: step 4 from memory
  EXPECT_EQ(snap->step(), 4);
  EXPECT_EQ(snap->source(), Source::kMemory);
  ckpt.close();
  ckpt.unlink_memory();
}

TEST(Checkpointer, TwoRanksCommitOnceAfterBothAreDurable) {
  ScratchDirs dirs;
  Checkpointer r0(dirs.Options(0, 2));
  Checkpointer r1(dirs.Options(1, 2));
  FakeState s0 = FakeState::ForStep(10), s1 = FakeState::ForStep(11);
  auto h0 = r0.save(7, s0.Refs(), s0.Blobs());
  // Rank 1 has not saved: no COMMIT yet, rank 0 is not durable.
  EXPECT_FALSE(h0.wait_durable_for(std::chrono::milliseconds(300)));
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-7/COMMIT"));
  auto h1 = r1.save(7, s1.Refs(), s1.Blobs());
  h0.wait_durable();
  h1.wait_durable();
  EXPECT_TRUE(fs::exists(dirs.ckpt + "/step-7/COMMIT"));
  LoadOptions lo;
  lo.prefer_memory = false;
  EXPECT_EQ(s0.Diff(*r0.load(lo)), "");
  EXPECT_EQ(s1.Diff(*r1.load(lo)), "");
}

// Rank 0 drops step 1 from its queue (step 2 came while it was still persisting
// step 0); rank 1 persisted step 1 and waits for its COMMIT. Rank 0's marker
// ends that wait at once, instead of the commit timeout, and both go on to
// commit step 2.
TEST(Checkpointer, StepSupersededOnRankZeroEndsTheWaitOfTheOthers) {
  ScratchDirs dirs;
  CheckpointerOptions o0 = dirs.Options(0, 2), o1 = dirs.Options(1, 2);
  o0.num_slots = o1.num_slots = 4;
  o0.commit_timeout = o1.commit_timeout = std::chrono::seconds(60);
  Checkpointer r0(o0), r1(o1);
  std::vector<FakeState> s;
  for (int step = 0; step <= 2; ++step) s.push_back(FakeState::ForStep(step));
  auto a0 = r0.save(0, s[0].Refs(), s[0].Blobs());  // persister waits for rank 1's record of step 0
  // Step 0 must be in flight (not queued, where step 1 would supersede it):
  // its rank record is written just before rank 0 starts waiting.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!fs::exists(dirs.ckpt + "/step-0/rank-0.durable") && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_TRUE(fs::exists(dirs.ckpt + "/step-0/rank-0.durable")) << "rank 0 never started persisting step 0";
  auto a1 = r0.save(1, s[1].Refs(), s[1].Blobs());
  auto a2 = r0.save(2, s[2].Refs(), s[2].Blobs());  // supersedes step 1 in rank 0's queue
  EXPECT_TRUE(a1.wait_durable_for(std::chrono::seconds(5)));
  EXPECT_FALSE(a1.persisted());
  auto b0 = r1.save(0, s[0].Refs(), s[0].Blobs());
  b0.wait_durable();
  auto t0 = std::chrono::steady_clock::now();
  auto b1 = r1.save(1, s[1].Refs(), s[1].Blobs());
  try {
    b1.wait_durable();
    ADD_FAILURE() << "step 1 was committed though rank 0 never persisted it";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("abandoned by rank 0: superseded by step 2"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-1/COMMIT"));
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-1/rank-1.data"));  // no orphan files of a step never committed
  auto b2 = r1.save(2, s[2].Refs(), s[2].Blobs());
  a2.wait_durable();
  b2.wait_durable();
  EXPECT_TRUE(a2.persisted() && b2.persisted());
  EXPECT_TRUE(fs::exists(dirs.ckpt + "/step-2/COMMIT"));
}

// A standalone job restarted after rank 1 had reported step 9 durable but
// before rank 0 committed it: the new incarnation saves step 9 with other
// bytes. Rank 0 must not commit with the dead incarnation's record (its size
// and crc describe bytes that are being overwritten).
TEST(Checkpointer, RecordOfAnEarlierIncarnationIsNeverCommitted) {
  ScratchDirs dirs;
  {
    CheckpointerOptions o1 = dirs.Options(1, 2);
    o1.commit_timeout = std::chrono::seconds(1);
    Checkpointer r1(o1);
    FakeState old = FakeState::ForStep(900);
    auto h = r1.save(9, old.Refs(), old.Blobs());
    EXPECT_THROW(h.wait_durable(), Error);  // rank 0 never came
    ASSERT_TRUE(fs::exists(dirs.ckpt + "/step-9/rank-1.durable"));
    r1.close();
    r1.unlink_memory();
  }
  Checkpointer r0(dirs.Options(0, 2));
  Checkpointer r1(dirs.Options(1, 2));
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-9/rank-1.durable"));
  FakeState s0 = FakeState::ForStep(9), s1 = FakeState::ForStep(10);
  auto h0 = r0.save(9, s0.Refs(), s0.Blobs());
  EXPECT_FALSE(h0.wait_durable_for(std::chrono::milliseconds(500)));  // waits for this rank 1
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-9/COMMIT"));
  auto h1 = r1.save(9, s1.Refs(), s1.Blobs());
  h0.wait_durable();
  h1.wait_durable();
  LoadOptions lo;
  lo.prefer_memory = false;
  lo.verify = true;
  EXPECT_EQ(s1.Diff(*r1.load(lo)), "");
}

TEST(Checkpointer, SecondCheckpointerOnTheSameDirectoryIsRefused) {
  ScratchDirs dirs;
  Checkpointer a(dirs.Options());
  try {
    Checkpointer b(dirs.Options());
    ADD_FAILURE() << "a second Checkpointer opened the same directory and rank";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find(dirs.ckpt), std::string::npos) << e.what();
  }
}

TEST(Checkpointer, DirectoryThatIsAFileIsRefused) {
  ScratchDirs dirs;
  std::ofstream(dirs.ckpt) << "not a directory";
  try {
    Checkpointer c(dirs.Options());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("not a directory"), std::string::npos) << e.what();
  }
}

TEST(Checkpointer, NewerFormatDirectoryIsRefusedUntouched) {
  ScratchDirs dirs;
  fs::create_directories(dirs.ckpt);
  std::ofstream(dirs.ckpt + "/FORMAT") << "flashckpt format 99\n";
  try {
    Checkpointer c(dirs.Options());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find("newer"), std::string::npos) << e.what();
  }
  std::ifstream f(dirs.ckpt + "/FORMAT");
  std::string line;
  std::getline(f, line);
  EXPECT_EQ(line, "flashckpt format 99");
}

TEST(Checkpointer, LoadIntoWrongBuffersListsTheKeys) {
  ScratchDirs dirs;
  Checkpointer ckpt(dirs.Options());
  FakeState s = FakeState::ForStep(1);
  ckpt.save(1, s.Refs(), s.Blobs()).wait_durable();
  std::vector<float> a(1000), b(5), c(1);
  std::map<std::string, MutableTensorRef> dest = {
      {"layer1.weight", {a.data(), a.size() * 4, "torch.float32", {1000}}},
      {"layer4.weight", {b.data(), b.size() * 4, "torch.float32", {5}}},  // saved with 3 elements
      {"nonexistent", {c.data(), 4, "torch.float32", {1}}},
  };
  try {
    ckpt.load_into(dest);
    ADD_FAILURE();
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(m.find("missing keys [nonexistent]"), std::string::npos) << m;
    EXPECT_NE(m.find("layer0.weight"), std::string::npos) << m;  // unexpected
    EXPECT_NE(m.find("layer4.weight (saved torch.float32 [3]"), std::string::npos) << m;
  }
  // A matching set loads bit-exact.
  std::map<std::string, MutableTensorRef> good;
  std::vector<std::vector<float>> bufs(s.keys.size());
  for (size_t i = 0; i < s.keys.size(); ++i) {
    bufs[i].resize(s.data[i].size());
    good[s.keys[i]] = {bufs[i].data(), bufs[i].size() * 4, "torch.float32", {static_cast<int64_t>(bufs[i].size())}};
  }
  std::map<std::string, std::string> blobs;
  EXPECT_EQ(ckpt.load_into(good, &blobs), 1);
  for (size_t i = 0; i < s.keys.size(); ++i) EXPECT_EQ(bufs[i], s.data[i]);
  EXPECT_EQ(blobs["extra"], s.blob);
}

// load_into from storage reads the data file through a few chunk buffers
// straight into the caller's buffers (chunks of 1 MiB here: tensors span
// several), with every crc checked; io_uring and the pread fallback alike.
TEST(Checkpointer, LoadIntoFromStorageStreamsIntoTheBuffers) {
  for (bool uring : {true, false}) {
    SCOPED_TRACE(uring ? "io_uring" : "pread");
    ScratchDirs dirs;
    CheckpointerOptions o = dirs.Options();
    o.use_io_uring = uring;
    FakeState s = FakeState::ForStep(3, 5);  // one tensor of ~5 MiB
    {
      Checkpointer writer(o);
      writer.save(3, s.Refs(), s.Blobs()).wait_durable();
      writer.unlink_memory();
    }
    Checkpointer ckpt(o);
    std::vector<std::vector<float>> bufs(s.keys.size());
    std::map<std::string, MutableTensorRef> dest;
    for (size_t i = 0; i < s.keys.size(); ++i) {
      bufs[i].assign(s.data[i].size(), -7.0f);
      dest[s.keys[i]] = {bufs[i].data(), bufs[i].size() * 4, "torch.float32", {static_cast<int64_t>(bufs[i].size())}};
    }
    std::map<std::string, std::string> blobs;
    Source source = Source::kMemory;
    EXPECT_EQ(ckpt.load_into(dest, &blobs, {}, &source), 3);
    EXPECT_EQ(source, Source::kStorage);
    for (size_t i = 0; i < s.keys.size(); ++i) EXPECT_EQ(bufs[i], s.data[i]) << s.keys[i];
    EXPECT_EQ(blobs["extra"], s.blob);

    // One flipped byte in the big tensor: a crc error naming the tensor and the file.
    const std::string data = StepDir(dirs.ckpt, 3) + "/" + RankDataName(0);
    {
      std::fstream f(data, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(3 << 20);
      char c = 0;
      f.read(&c, 1);
      c ^= 0x40;
      f.seekp(3 << 20);
      f.write(&c, 1);
    }
    try {
      LoadOptions lo;
      lo.step = 3;
      ckpt.load_into(dest, nullptr, lo);
      ADD_FAILURE() << "a corrupted data file loaded";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_EQ(e.code(), ErrorCode::kCorruption) << m;
      EXPECT_NE(m.find("layer3.weight"), std::string::npos) << m;
      EXPECT_NE(m.find(data), std::string::npos) << m;
    }
    // Truncated: named before anything is read.
    std::filesystem::resize_file(data, 4096);
    for (auto& b : bufs) std::fill(b.begin(), b.end(), -7.0f);
    try {
      ckpt.load_into(dest);
      ADD_FAILURE() << "a truncated data file loaded";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kCorruption) << e.what();
      EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
    }
    for (auto& b : bufs)
      for (float x : b) ASSERT_EQ(x, -7.0f) << "a buffer changed though the load was refused";
  }
}

TEST(Checkpointer, BadSaveArgumentsNameTheKey) {
  ScratchDirs dirs;
  Checkpointer ckpt(dirs.Options());
  FakeState s = FakeState::ForStep(1);
  auto refs = s.Refs();
  refs.push_back(refs[1]);
  try {
    ckpt.save(1, refs, {});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'layer1.weight' appears twice"), std::string::npos) << e.what();
  }
  refs = s.Refs();
  refs[2].storage_key = "nope";
  EXPECT_THROW(ckpt.save(1, refs, {}), Error);
}

TEST(Checkpointer, CudaTensorWithoutGpuIsAClearError) {
  ScratchDirs dirs;
  Checkpointer ckpt(dirs.Options());
  FakeState s = FakeState::ForStep(1);
  auto refs = s.Refs();
  refs[1].device = 0;
  try {
    ckpt.save(1, refs, {});
    ADD_FAILURE() << "a CUDA tensor was saved on a machine without a GPU";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
  // The Checkpointer still works for host tensors.
  ckpt.save(2, s.Refs(), s.Blobs()).wait_durable();
  EXPECT_EQ(ckpt.latest_step(), 2);
}

TEST(Checkpointer, GrowingStateReplacesTheSlots) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.reserve_bytes = 1 << 20;
  Checkpointer ckpt(o);
  FakeState small = FakeState::ForStep(1, 1), big = FakeState::ForStep(2, 6);
  ckpt.save(1, small.Refs(), small.Blobs()).wait_durable();
  ckpt.save(2, big.Refs(), big.Blobs()).wait_durable();
  EXPECT_EQ(big.Diff(*ckpt.load()), "");
  LoadOptions lo;
  lo.step = 1;
  EXPECT_EQ(small.Diff(*ckpt.load(lo)), "");
}

}  // namespace
}  // namespace flashckpt

namespace flashckpt {
namespace {

// A load buffer prepared ahead (what a flashrun standby does) is taken by the
// next load of about its size, once; the loaded bytes are the saved ones.
TEST(PreparedLoadBuffer, TakenOnceByALoadOfItsSize) {
  ScratchDirs dirs;
  FakeState s = FakeState::ForStep(3, 64);  // ~64 MB
  Checkpointer ckpt(dirs.Options());
  ckpt.save(3, s.Refs(), s.Blobs()).wait_durable();
  auto first = ckpt.load();
  const uint64_t bytes = first->data_bytes();
  first.reset();

  PrepareLoadBuffer(bytes);
  EXPECT_GE(PreparedLoadBufferBytes(), bytes);
  auto mem = ckpt.load();
  EXPECT_EQ(PreparedLoadBufferBytes(), 0u);  // taken
  EXPECT_EQ(s.Diff(*mem), "");
  LoadOptions disk;
  disk.prefer_memory = false;
  PrepareLoadBuffer(bytes);
  auto stored = ckpt.load(disk);  // the storage path takes it too
  EXPECT_EQ(PreparedLoadBufferBytes(), 0u);
  EXPECT_EQ(s.Diff(*stored), "");

  // Much larger than the load: left for the load it was made for. Smaller: given back.
  PrepareLoadBuffer(8 * bytes);
  EXPECT_EQ(s.Diff(*ckpt.load()), "");
  EXPECT_GE(PreparedLoadBufferBytes(), 8 * bytes);
  PrepareLoadBuffer(bytes / 4);
  EXPECT_EQ(s.Diff(*ckpt.load()), "");
  EXPECT_EQ(PreparedLoadBufferBytes(), 0u);
  PrepareLoadBuffer(bytes);
  PrepareLoadBuffer(0);  // released
  EXPECT_EQ(PreparedLoadBufferBytes(), 0u);
}

}  // namespace
}  // namespace flashckpt

namespace flashckpt {
namespace {

// The restore step is decided once (flashrun's agents, or the caller) and
// applies to the first load only; the environment is read once, at the edge.
TEST(Checkpointer, TheRestoreStepAppliesToTheFirstLoadOnly) {
  testing::ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.restore_step = 1;
  Checkpointer c(o);
  testing::FakeState s1 = testing::FakeState::ForStep(1), s2 = testing::FakeState::ForStep(2);
  c.save(1, s1.Refs(), s1.Blobs()).wait_durable();
  c.save(2, s2.Refs(), s2.Blobs()).wait_durable();
  auto first = c.load();
  EXPECT_EQ(first->step(), 1);
  EXPECT_EQ(s1.Diff(*first), "");
  EXPECT_EQ(c.load()->step(), 2);  // later loads take the newest again
  EXPECT_FALSE(c.take_restore_step().has_value());
}

TEST(Checkpointer, TheEnvironmentIsReadOnceAtTheEdgeAndOnlyWhenAsked) {
  ::setenv("FLASHCKPT_RESTORE_STEP", "7", 1);
  ::setenv("FLASHCKPT_RUN_ID", "job/42", 1);
  CheckpointerOptions resolved = WithEnvironment(CheckpointerOptions{});
  EXPECT_EQ(resolved.restore_step, 7);
  EXPECT_EQ(resolved.run_id, "job/42");
  testing::ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.from_environment = false;
  {
    Checkpointer c(o);
    EXPECT_FALSE(c.take_restore_step().has_value());
    EXPECT_NE(c.memory_segment_path().find("flashckpt-local-"), std::string::npos) << c.memory_segment_path();
  }
  o.from_environment = true;
  {
    Checkpointer c(o);
    EXPECT_EQ(c.take_restore_step(), 7);
    EXPECT_NE(c.memory_segment_path().find("flashckpt-job_42-"), std::string::npos) << c.memory_segment_path();
  }
  ::unsetenv("FLASHCKPT_RESTORE_STEP");
  ::unsetenv("FLASHCKPT_RUN_ID");
}

}  // namespace
}  // namespace flashckpt

namespace flashckpt {
namespace {

// A multi-rank job restarted without flashrun (plain torchrun): the snapshot
// the dead processes left in memory is persisted once the ranks agree to
// restore it, so that it gets its COMMIT; a load that merely picks the
// newest step persists nothing (the ranks might pick different steps).
TEST(Checkpointer, AnAgreedStepLeftInMemoryByEarlierProcessesIsPersistedByEveryRank) {
  testing::ScratchDirs dirs;
  std::vector<testing::FakeState> state{testing::FakeState::ForStep(50), testing::FakeState::ForStep(51)};
  for (int r = 0; r < 2; ++r) {  // the processes that "crashed": step 5 in memory only
    CheckpointerOptions o = dirs.Options(r, 2);
    o.persist = false;
    o.unlink_memory_on_close = false;
    Checkpointer c(o);
    c.save(5, state[r].Refs(), state[r].Blobs()).wait_snapshot();
  }
  std::vector<std::unique_ptr<Checkpointer>> ranks;
  for (int r = 0; r < 2; ++r) ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, 2)));
  EXPECT_FALSE(ranks[0]->latest_step().has_value());  // nothing persisted on its own in a world of 2
  LoadOptions agreed;
  agreed.step = 5;
  for (int r = 0; r < 2; ++r) EXPECT_EQ(state[r].Diff(*ranks[r]->load(agreed)), "");
  for (auto& c : ranks) c->wait_all(std::chrono::seconds(60));
  EXPECT_EQ(ranks[0]->latest_step(), 5);
  for (int r = 0; r < 2; ++r) {
    LoadOptions storage;
    storage.step = 5;
    storage.prefer_memory = false;
    EXPECT_EQ(state[r].Diff(*ranks[r]->load(storage)), "") << "rank " << r;
  }
}

TEST(Checkpointer, ALoadThatPicksTheNewestPersistsNothingLeftBehind) {
  testing::ScratchDirs dirs;
  testing::FakeState s = testing::FakeState::ForStep(8);
  for (int r = 0; r < 2; ++r) {
    CheckpointerOptions o = dirs.Options(r, 2);
    o.persist = false;
    o.unlink_memory_on_close = false;
    Checkpointer c(o);
    c.save(8, s.Refs(), s.Blobs()).wait_snapshot();
  }
  for (int r = 0; r < 2; ++r) {
    CheckpointerOptions o = dirs.Options(r, 2);
    o.unlink_memory_on_close = true;
    Checkpointer c(o);
    EXPECT_EQ(c.load()->step(), 8);
    c.wait_all(std::chrono::seconds(30));
    EXPECT_FALSE(c.latest_step().has_value());
    c.close();
    c.unlink_memory();
  }
}

}  // namespace
}  // namespace flashckpt
