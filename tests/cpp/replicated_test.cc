// Replicated state: stored once over the ranks (rank-<r>.replica), each rank's
// memory snapshot whole, every rank loading all of it back from storage, into
// the same or another world size; ranks that disagree fail the commit.
#include <cstring>
#include <fstream>
#include <functional>
#include <thread>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"
#include "shm/segment.h"
#include "snapshot/snapshot.h"
#include "storage/layout.h"
#include "test_util.h"

namespace flashckpt::testing {
namespace {

TensorRef FloatRef(const std::string& key, const std::vector<float>& v) {
  TensorRef r;
  r.key = key;
  r.data = v.data();
  r.nbytes = v.size() * 4;
  r.dtype = "torch.float32";
  r.shape = {static_cast<int64_t>(v.size())};
  r.element_size = 4;
  return r;
}

// The data-parallel part (same on every rank) and a rank's own part.
struct RankState {
  FakeState shared;
  std::vector<float> own;
  std::vector<TensorRef> Refs(bool with_own = true) const {
    std::vector<TensorRef> refs = shared.Refs();
    for (auto& r : refs) r.replicated = true;
    if (with_own) refs.push_back(FloatRef("rng.state", own));
    return refs;
  }
  static RankState For(int64_t step, int rank) {
    RankState s{FakeState::ForStep(step, 4), std::vector<float>(3000 + 100 * rank)};
    for (size_t i = 0; i < s.own.size(); ++i) s.own[i] = static_cast<float>(rank * 1000000 + step * 1000 + i);
    return s;
  }
};

uint64_t FileSize(const std::string& p) { return std::filesystem::file_size(p); }

std::string SaveExpectingFailure(Checkpointer& c, int64_t step, const std::vector<TensorRef>& refs,
                                 const std::vector<BlobRef>& blobs) {
  try {
    c.save(step, refs, blobs).wait_durable();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Replicated, StoredOnceSplitEvenlyOverTheRanksAndLoadsBitExact) {
  ScratchDirs dirs;
  constexpr int kWorld = 4;
  std::vector<std::unique_ptr<Checkpointer>> ranks;
  std::vector<RankState> states;
  std::vector<SaveHandle> handles;
  for (int r = 0; r < kWorld; ++r) {
    ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, kWorld)));
    states.push_back(RankState::For(5, r));
  }
  for (int r = 0; r < kWorld; ++r) handles.push_back(ranks[r]->save(5, states[r].Refs(), states[r].shared.Blobs()));
  for (auto& h : handles) h.wait_durable();

  // One copy of the replicated bytes over the four .replica files, each within
  // one 4 KiB unit of a quarter; .data holds only the rank's own tensor.
  uint64_t shared_bytes = 0;
  for (const auto& d : states[0].shared.data) shared_bytes += d.size() * 4;
  const std::string dir = StepDir(dirs.ckpt, 5);
  uint64_t replica_total = 0, lo = UINT64_MAX, hi = 0;
  for (int r = 0; r < kWorld; ++r) {
    const uint64_t n = FileSize(dir + "/" + RankReplicaName(r));
    replica_total += n;
    lo = std::min(lo, n);
    hi = std::max(hi, n);
    EXPECT_LE(FileSize(dir + "/" + RankDataName(r)), AlignUp(states[r].own.size() * 4, 4096)) << "rank " << r;
  }
  EXPECT_GE(replica_total, shared_bytes);
  EXPECT_LT(replica_total, shared_bytes + 4096 * 16);  // tensor alignment padding only
  EXPECT_LE(hi - lo, kReplicaAlign) << "uneven shares: " << lo << " .. " << hi;

  // Every rank reads its state back from storage (other ranks' replica files
  // plus its own data file), through load() and load_into(), and from memory.
  for (int r = 0; r < kWorld; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    LoadOptions lo_storage;
    lo_storage.prefer_memory = false;
    auto snap = ranks[r]->load(lo_storage);
    EXPECT_EQ(snap->source(), Source::kStorage);
    EXPECT_EQ(states[r].shared.Diff(*snap), "");
    const TensorInfo* own = snap->find("rng.state");
    ASSERT_NE(own, nullptr);
    ASSERT_EQ(own->nbytes, states[r].own.size() * 4);
    EXPECT_EQ(std::memcmp(own->data, states[r].own.data(), own->nbytes), 0);
    EXPECT_TRUE(snap->find("layer3.weight")->replicated);
    EXPECT_FALSE(own->replicated);

    std::vector<std::vector<float>> bufs;
    std::map<std::string, MutableTensorRef> dest;
    auto refs = states[r].Refs();
    bufs.resize(refs.size());
    for (size_t i = 0; i < refs.size(); ++i) {
      bufs[i].assign(refs[i].nbytes / 4, -1.0f);
      dest[refs[i].key] = {bufs[i].data(), refs[i].nbytes, refs[i].dtype, refs[i].shape};
    }
    Source source = Source::kMemory;
    EXPECT_EQ(ranks[r]->load_into(dest, nullptr, lo_storage, &source), 5);
    EXPECT_EQ(source, Source::kStorage);
    for (size_t i = 0; i < refs.size(); ++i)
      EXPECT_TRUE(refs[i].nbytes == 0 || std::memcmp(bufs[i].data(), refs[i].data, refs[i].nbytes) == 0) << refs[i].key;

    auto mem = ranks[r]->load();
    EXPECT_EQ(mem->source(), Source::kMemory);
    EXPECT_EQ(states[r].shared.Diff(*mem), "");
  }

  // A flipped byte in rank 2's share: rank 0's load names that file and the tensor.
  const std::string replica2 = dir + "/" + RankReplicaName(2);
  {
    std::fstream f(replica2, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(100);
    f.write(&c, 1);
  }
  try {
    LoadOptions lo_storage;
    lo_storage.prefer_memory = false;
    ranks[0]->load(lo_storage);
    ADD_FAILURE() << "a corrupted replica loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption) << e.what();
    EXPECT_NE(std::string(e.what()).find(replica2), std::string::npos) << e.what();
  }
  // Truncated: named before a byte is read.
  std::filesystem::resize_file(replica2, 4096);
  try {
    LoadOptions lo_storage;
    lo_storage.prefer_memory = false;
    ranks[3]->load(lo_storage);
    ADD_FAILURE() << "a truncated replica loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption) << e.what();
    EXPECT_NE(std::string(e.what()).find(replica2), std::string::npos) << e.what();
  }
}

TEST(Replicated, ReplicatedStateLoadsIntoAnotherWorldSizePerRankStateDoesNot) {
  ScratchDirs dirs;
  RankState s = RankState::For(9, 0);
  {
    std::vector<std::unique_ptr<Checkpointer>> ranks;
    std::vector<SaveHandle> handles;
    for (int r = 0; r < 4; ++r) ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, 4)));
    for (int r = 0; r < 4; ++r) handles.push_back(ranks[r]->save(9, s.Refs(/*with_own=*/false), s.shared.Blobs()));
    for (auto& h : handles) h.wait_durable();
    for (auto& c : ranks) c->unlink_memory();
  }
  // Into 2 ranks and into 6: every rank gets the whole replicated state.
  for (int world : {2, 6}) {
    for (int r = 0; r < world; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(world));
      CheckpointerOptions o = dirs.Options(r, world);
      o.shm_dir = (dirs.shm / ("w" + std::to_string(world))).string();
      std::filesystem::create_directories(o.shm_dir);
      Checkpointer c(o);
      auto snap = c.load();
      EXPECT_EQ(snap->step(), 9);
      EXPECT_EQ(s.shared.Diff(*snap), "");
      c.unlink_memory();
    }
  }
  // A step with per-rank tensors does not load into another world size: the
  // error names the directory, both world sizes and the key.
  {
    std::vector<std::unique_ptr<Checkpointer>> ranks;
    std::vector<RankState> states;
    std::vector<SaveHandle> handles;
    for (int r = 0; r < 2; ++r) {
      CheckpointerOptions o = dirs.Options(r, 2);
      o.shm_dir = (dirs.shm / "two").string();
      std::filesystem::create_directories(o.shm_dir);
      ranks.push_back(std::make_unique<Checkpointer>(o));
      states.push_back(RankState::For(10, r));
    }
    for (int r = 0; r < 2; ++r) handles.push_back(ranks[r]->save(10, states[r].Refs(), states[r].shared.Blobs()));
    for (auto& h : handles) h.wait_durable();
    for (auto& c : ranks) c->unlink_memory();
  }
  CheckpointerOptions o = dirs.Options(0, 3);
  o.shm_dir = (dirs.shm / "three").string();
  std::filesystem::create_directories(o.shm_dir);
  Checkpointer c(o);
  try {
    LoadOptions lo;
    lo.step = 10;
    c.load(lo);
    ADD_FAILURE() << "per-rank state loaded into another world size";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("world size 2"), std::string::npos) << m;
    EXPECT_NE(m.find("has 3"), std::string::npos) << m;
    EXPECT_NE(m.find("rng.state"), std::string::npos) << m;
  }
  EXPECT_EQ(s.shared.Diff(*c.load([] { LoadOptions lo; lo.step = 9; return lo; }())), "");
  c.unlink_memory();
}

// Ranks that disagree about what they call replicated: the commit fails on
// every rank, naming the key and the ranks; the step is not committed and the
// committed one before it still loads.
TEST(Replicated, RanksThatDisagreeFailTheCommitNamingKeyAndRanks) {
  struct Case {
    const char* name;
    std::function<void(std::vector<TensorRef>&, std::vector<float>&)> change;  // applied to rank 1 only
    std::vector<std::string> expect;
  };
  std::vector<Case> cases = {
      {"bytes", [](std::vector<TensorRef>& refs, std::vector<float>& scratch) {
         // layer3 with one element changed
         auto* src = static_cast<const float*>(refs[3].data);
         scratch.assign(src, src + refs[3].nbytes / 4);
         scratch[77] += 1.0f;
         refs[3].data = scratch.data();
       }, {"layer3.weight", "ranks 0 and 1", "differs"}},
      {"shape", [](std::vector<TensorRef>& refs, std::vector<float>&) {
         refs[3].shape = {refs[3].shape[0] / 2, 2};
       }, {"layer3.weight", "rank 0", "rank 1", "global shape"}},
      {"keys", [](std::vector<TensorRef>& refs, std::vector<float>&) { refs[2].replicated = false; },
       {"layer2.weight", "rank 1"}},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    ScratchDirs dirs;
    Checkpointer r0(dirs.Options(0, 2)), r1(dirs.Options(1, 2));
    RankState s0 = RankState::For(1, 0), s1 = RankState::For(1, 1);
    {
      auto h0 = r0.save(1, s0.Refs(), s0.shared.Blobs());
      auto h1 = r1.save(1, s1.Refs(), s1.shared.Blobs());
      h0.wait_durable();
      h1.wait_durable();
    }
    std::vector<TensorRef> bad = s1.Refs();
    std::vector<float> scratch;
    k.change(bad, scratch);
    std::string e1;
    std::thread t([&] { e1 = SaveExpectingFailure(r1, 2, bad, s1.shared.Blobs()); });
    std::string e0 = SaveExpectingFailure(r0, 2, s0.Refs(), s0.shared.Blobs());
    t.join();
    for (const auto& want : k.expect) EXPECT_NE(e0.find(want), std::string::npos) << e0;
    EXPECT_NE(e0.find("step 2"), std::string::npos) << e0;
    EXPECT_FALSE(e1.empty()) << "rank 1's save of step 2 reported durable";
    EXPECT_FALSE(std::filesystem::exists(StepDir(dirs.ckpt, 2) + "/COMMIT"));
    LoadOptions lo;
    lo.prefer_memory = false;
    auto snap = r1.load(lo);
    EXPECT_EQ(snap->step(), 1);
    EXPECT_EQ(s1.shared.Diff(*snap), "");
  }
}

// State partitioned over the ranks (each key held by one rank) is read from
// whichever rank's files hold it, by a reader of any world; a key every rank
// holds its own of, a missing key and a wrong shape are refused up front.
TEST(Replicated, GlobalReadTakesEachKeyFromTheRankThatHoldsIt) {
  ScratchDirs dirs;
  RankState s0 = RankState::For(2, 0), s1 = RankState::For(2, 1);
  std::vector<float> part0(5000, 1.5f), part1(7000, -2.5f);
  auto with_part = [](const RankState& s, const std::string& key, const std::vector<float>& part) {
    std::vector<TensorRef> refs = s.Refs();
    refs.push_back(FloatRef(key, part));
    return refs;
  };
  {
    Checkpointer r0(dirs.Options(0, 2)), r1(dirs.Options(1, 2));
    auto h0 = r0.save(2, with_part(s0, "optim/0", part0), s0.shared.Blobs());
    auto h1 = r1.save(2, with_part(s1, "optim/1", part1), s1.shared.Blobs());
    h0.wait_durable();
    h1.wait_durable();
    r0.unlink_memory();
    r1.unlink_memory();
  }
  StepDescription d = DescribeGlobalStep(dirs.ckpt, 2);
  std::map<std::string, std::vector<int>> held;
  for (const auto& t : d.tensors) held[t.key].push_back(t.held_by);
  EXPECT_EQ(held["optim/0"], std::vector<int>{0});
  EXPECT_EQ(held["optim/1"], std::vector<int>{1});
  EXPECT_EQ(held["layer3.weight"], std::vector<int>{-1});
  EXPECT_EQ((held["rng.state"]), (std::vector<int>{0, 1}));
  ASSERT_EQ(d.rank_blobs.size(), 2u);

  std::vector<float> got0(part0.size()), got1(part1.size()), got3(s0.shared.data[3].size());
  std::map<std::string, MutableTensorRef> dest = {
      {"optim/0", {got0.data(), got0.size() * 4, "torch.float32", {static_cast<int64_t>(got0.size())}}},
      {"optim/1", {got1.data(), got1.size() * 4, "torch.float32", {static_cast<int64_t>(got1.size())}}},
      {"layer3.weight", {got3.data(), got3.size() * 4, "torch.float32", {static_cast<int64_t>(got3.size())}}}};
  ReadGlobalInto(dirs.ckpt, 2, dest);
  EXPECT_EQ(got0, part0);
  EXPECT_EQ(got1, part1);
  EXPECT_EQ(got3, s0.shared.data[3]);

  std::vector<float> rng(s0.own.size()), wrong(10);
  auto bad = dest;
  bad["rng.state"] = {rng.data(), rng.size() * 4, "torch.float32", {static_cast<int64_t>(rng.size())}};
  bad["nope"] = {rng.data(), 4, "torch.float32", {1}};
  bad["optim/1"] = {wrong.data(), wrong.size() * 4, "torch.float32", {10}};
  std::fill(got0.begin(), got0.end(), 0.0f);
  try {
    ReadGlobalInto(dirs.ckpt, 2, bad);
    ADD_FAILURE() << "an ambiguous, a missing and a mismatched key loaded";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << m;
    EXPECT_NE(m.find("rng.state (held by ranks 0,1)"), std::string::npos) << m;
    EXPECT_NE(m.find("missing keys [nope]"), std::string::npos) << m;
    EXPECT_NE(m.find("optim/1 (saved torch.float32 [7000], target torch.float32 [10])"), std::string::npos) << m;
  }
  for (float x : got0) ASSERT_EQ(x, 0.0f) << "a buffer was written though the load was refused";
}

// A snapshot a rank of another world left in shared memory (an elastic
// restart that renumbered the ranks: same directory, run id and rank number)
// is not taken when it holds per-rank tensors: the load goes to storage. One
// whose state is all replicated is the same for every rank, and is taken.
TEST(Replicated, AMemorySnapshotOfAnotherWorldIsTakenOnlyWhenAllReplicated) {
  ScratchDirs dirs;
  RankState s1 = RankState::For(6, 1);
  CheckpointerOptions o_old = dirs.Options(1, 2);
  o_old.persist = false;
  o_old.unlink_memory_on_close = false;
  {
    Checkpointer old_rank1(o_old);
    old_rank1.save(6, s1.Refs(), s1.shared.Blobs());              // per-rank tensor inside
  }
  CheckpointerOptions o_new = dirs.Options(1, 3);
  o_new.persist = false;
  {
    Checkpointer new_rank1(o_new);
    EXPECT_FALSE(new_rank1.steps().size() == 1 && new_rank1.steps()[0].in_memory) << "listed as loadable";
    try {
      LoadOptions lo;
      lo.step = 6;
      new_rank1.load(lo);
      ADD_FAILURE() << "rank 1 of 3 took rank 1 of 2's memory snapshot";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kNotFound) << e.what();
    }
    new_rank1.unlink_memory();
  }
  {
    Checkpointer old_rank1(o_old);
    old_rank1.save(7, s1.Refs(/*with_own=*/false), s1.shared.Blobs());  // all replicated
  }
  Checkpointer new_rank1(o_new);
  LoadOptions lo;
  lo.step = 7;
  auto snap = new_rank1.load(lo);
  EXPECT_EQ(snap->source(), Source::kMemory);
  EXPECT_EQ(s1.shared.Diff(*snap), "");
  new_rank1.unlink_memory();
}

}  // namespace
}  // namespace flashckpt::testing
