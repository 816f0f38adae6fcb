// flashrun's checkpoint service with real workers (Checkpointers in agent
// mode) over a real Unix socket: the service persists and commits, and
// persists what a stopped worker left in memory.
#include "agent/checkpoint_service.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "storage/uring_io.h"
#include "test_util.h"

namespace flashckpt {
namespace {

namespace fs = std::filesystem;
using testing::FakeState;
using testing::ScratchDirs;

std::string HttpGet(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    std::string err = std::string("connect: ") + std::strerror(errno);
    close(fd);
    return err;
  }
  std::string req = "GET /metrics HTTP/1.0\r\n\r\n";
  (void)send(fd, req.data(), req.size(), 0);
  std::string out;
  char buf[4096];
  ssize_t n;
  // EINTR: io_uring's task work can interrupt a blocking call of the thread that owns a ring.
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0 || (n < 0 && errno == EINTR))
    if (n > 0) out.append(buf, n);
  if (n < 0) out += std::string("\n(recv: ") + std::strerror(errno) + ")";
  close(fd);
  return out;
}

TEST(CheckpointService, PersistsAndCommitsForItsWorkers) {
  ScratchDirs dirs;
  CheckpointServiceOptions so;
  so.socket_path = (dirs.root / "agent.sock").string();
  so.status_file = (dirs.root / "status.json").string();
  so.metrics_port = 0;
  so.node = "testnode";
  auto service = CheckpointService::Start(so);
  ASSERT_TRUE(service.ok()) << service.status();
  {
    std::vector<std::unique_ptr<Checkpointer>> workers;
    for (int r = 0; r < 2; ++r) {
      CheckpointerOptions o = dirs.Options(r, 2);
      o.agent_socket = so.socket_path;
      o.persist_every = 2;  // steps 1 and 3 persisted by the agent; 2 and 4 only in memory
      o.num_slots = 3;
      workers.push_back(std::make_unique<Checkpointer>(o));
    }
    for (int64_t step = 1; step <= 4; ++step) {
      std::vector<SaveHandle> hs;
      for (int r = 0; r < 2; ++r) {
        FakeState s = FakeState::ForStep(step * 10 + r);
        hs.push_back(workers[r]->save(step, s.Refs(), s.Blobs()));
      }
      for (auto& h : hs) h.wait_durable();
      EXPECT_EQ(hs[0].persisted(), step % 2 == 1) << step;
    }
    EXPECT_EQ(workers[0]->latest_step(), 3);
    EXPECT_TRUE(fs::exists(dirs.ckpt + "/step-3/COMMIT"));
    // Workers stop (as after a crash): their segments stay for the agent.
    for (auto& w : workers) w->close();
  }
  auto mem = (*service)->MemorySteps();
  ASSERT_EQ(mem.size(), 2u);
  EXPECT_EQ(mem[0].back(), 4);
  ASSERT_TRUE((*service)->PersistNewest(std::chrono::seconds(60)).ok());
  EXPECT_TRUE(fs::exists(dirs.ckpt + "/step-4/COMMIT")) << "the agent did not persist the newest snapshot";
  {
    CheckpointerOptions o = dirs.Options(1, 2);
    o.use_agent = false;
    Checkpointer reader(o);
    LoadOptions lo;
    lo.prefer_memory = false;
    auto snap = reader.load(lo);
    EXPECT_EQ(snap->step(), 4);
    EXPECT_EQ(FakeState::ForStep(41).Diff(*snap), "");
  }
  std::string metrics = HttpGet((*service)->metrics_port());
  EXPECT_NE(metrics.find("flashckpt_persists_total{node=\"testnode\"} 6"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("flashckpt_newest_durable_step{node=\"testnode\"} 4"), std::string::npos) << metrics;
  std::ifstream status(so.status_file);
  std::string json((std::istreambuf_iterator<char>(status)), {});
  EXPECT_NE(json.find("\"persisted\": 6"), std::string::npos) << json;
  (*service)->ReleaseMemory();
  EXPECT_TRUE(fs::is_empty(dirs.shm));
}

TEST(CheckpointService, UnreachableAgentIsAClearError) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  o.agent_socket = (dirs.root / "nobody.sock").string();
  try {
    Checkpointer c(o);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
    EXPECT_NE(std::string(e.what()).find(o.agent_socket), std::string::npos) << e.what();
  }
}

// Offsets of the chunks written to files named rank-0.data (the I/O hook sees each chunk).
std::mutex chunk_mu;
std::vector<uint64_t> chunk_offsets;
absl::Status RecordChunk(const std::string& path, uint64_t offset) {
  if (path.size() >= 11 && path.compare(path.size() - 11, 11, "rank-0.data") == 0) {
    std::lock_guard<std::mutex> l(chunk_mu);
    chunk_offsets.push_back(offset);
  }
  return absl::OkStatus();
}

// The worker's I/O options reach the agent that persists for it: its 1 MiB
// chunks (against the agent's 8 MiB default) split the rank's data file.
TEST(CheckpointService, PersistsWithTheWorkersIoOptions) {
  ScratchDirs dirs;
  CheckpointServiceOptions so;
  so.socket_path = (dirs.root / "agent.sock").string();
  so.metrics_port = -1;
  so.node = "testnode";
  auto service = CheckpointService::Start(so);
  ASSERT_TRUE(service.ok()) << service.status();
  SetIoFaultHookForTesting(&RecordChunk);
  {
    CheckpointerOptions o = dirs.Options();
    o.agent_socket = so.socket_path;
    o.io_chunk_bytes = 1u << 20;
    Checkpointer worker(o);
    FakeState s = FakeState::ForStep(1, /*scale=*/8);  // about 8 MiB
    SaveHandle h = worker.save(1, s.Refs(), s.Blobs());
    h.wait_durable();
    EXPECT_TRUE(h.persisted());
  }
  SetIoFaultHookForTesting(nullptr);
  std::lock_guard<std::mutex> l(chunk_mu);
  ASSERT_GE(chunk_offsets.size(), 7u) << "the agent wrote with its own chunk size";
  for (uint64_t off : chunk_offsets) EXPECT_EQ(off % (1u << 20), 0u) << off;
}

}  // namespace
}  // namespace flashckpt

namespace flashckpt {
namespace {

// A checkpoint service and its workers `ranks` of a world of `world` (commit
// timeout 600 s), each saving step 1 (FakeState::ForStep(seed + i)); returns
// once every one's record is durable, so that their persists wait in the commit.
struct StuckCommits {
  std::unique_ptr<CheckpointService> service;
  std::vector<std::unique_ptr<Checkpointer>> workers;
  std::vector<SaveHandle> handles;
};
StuckCommits ServiceWithStep1WaitingForTheCommit(const ScratchDirs& dirs, const std::vector<int>& ranks, int world,
                                                 int seed) {
  StuckCommits out;
  CheckpointServiceOptions so;
  so.socket_path = (dirs.root / "agent.sock").string();
  so.status_file = (dirs.root / "status.json").string();
  auto service = CheckpointService::Start(so);
  EXPECT_TRUE(service.ok()) << service.status();
  if (!service.ok()) return out;
  out.service = std::move(*service);
  for (int r : ranks) {
    CheckpointerOptions o = dirs.Options(r, world);
    o.agent_socket = so.socket_path;
    o.commit_timeout = std::chrono::seconds(600);
    out.workers.push_back(std::make_unique<Checkpointer>(o));
  }
  for (size_t i = 0; i < out.workers.size(); ++i) {
    FakeState s = FakeState::ForStep(seed + static_cast<int>(i));
    out.handles.push_back(out.workers[i]->save(1, s.Refs(), s.Blobs()));
  }
  auto durable = [&] {
    for (int r : ranks)
      if (!fs::exists(absl::StrCat(dirs.ckpt, "/step-1/rank-", r, ".durable"))) return false;
    return true;
  };
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!durable() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(durable()) << "the records of step 1 were not durable within 30 s";
  return out;
}

// Rank `rank` of `world` with its own persister (no agent) saves step 1
// (FakeState::ForStep(seed)); "" once it is durable, else the error.
std::string SaveStep1Alone(const ScratchDirs& dirs, int rank, int world, int seed,
                           std::chrono::seconds commit_timeout) {
  CheckpointerOptions o = dirs.Options(rank, world);
  o.use_agent = false;
  o.commit_timeout = commit_timeout;
  Checkpointer alone(o);
  FakeState s = FakeState::ForStep(seed);
  SaveHandle h = alone.save(1, s.Refs(), s.Blobs());
  std::string error;
  try {
    h.wait_durable();
    if (!h.persisted()) error = "not persisted";
  } catch (const std::exception& e) {
    error = e.what();
  }
  alone.unlink_memory();
  return error;
}

// After an elastic change the node no longer runs ranks 2 and 3 of a world of 4:
// their persist of step 1, a non-zero rank waiting for a COMMIT that rank 0 (on
// a node that is gone) will never write, is abandoned at once rather than after
// its 600 s commit timeout, and their segments are removed.
TEST(CheckpointService, RetiresTheRanksANewWorldDoesNotGiveThisNode) {
  ScratchDirs dirs;
  // Both ranks' records are durable: they now wait for rank 0's COMMIT.
  auto [service, workers, hs] = ServiceWithStep1WaitingForTheCommit(dirs, {2, 3}, 4, 10);
  ASSERT_FALSE(::testing::Test::HasFailure());
  int world = -1;
  std::set<int> ranks;
  service->MemoryLayout(&world, &ranks);
  EXPECT_EQ(world, 4);
  EXPECT_EQ(ranks, (std::set<int>{2, 3}));
  std::vector<std::string> segments;
  for (const auto& e : fs::directory_iterator(dirs.shm)) segments.push_back(e.path().string());
  EXPECT_EQ(segments.size(), 2u);

  auto t0 = std::chrono::steady_clock::now();
  service->RetireRanksOutside({0, 1});  // the new world: ranks 0 and 1 of 2 here
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(took, 10.0) << "the retired ranks' persists waited for their commit timeout";
  for (auto& h : hs) {
    h.wait_durable();  // answered: dropped, which is no failure of the worker's
    EXPECT_FALSE(h.persisted());
  }
  service->MemoryLayout(&world, &ranks);
  EXPECT_EQ(world, 0);
  EXPECT_TRUE(ranks.empty());
  EXPECT_TRUE(service->MemorySteps().empty());
  for (const std::string& s : segments) EXPECT_FALSE(fs::exists(s)) << s << " was not removed";
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-1/COMMIT"));
  for (auto& w : workers) w->close();
}

// Before the next rendezvous round (the workers stopped): the round's persists
// are abandoned, so that no step commits after this node's payload said which
// steps are committed; the snapshots stay in memory for the payload.
TEST(CheckpointService, AbandonAllLeavesNoPersistThatCouldCommitLater) {
  ScratchDirs dirs;
  // Ranks 0 and 1 of a world of 3 (rank 2 is late): rank 0's persist waits to commit.
  auto [service, workers, hs] = ServiceWithStep1WaitingForTheCommit(dirs, {0, 1}, 3, 20);
  ASSERT_FALSE(::testing::Test::HasFailure());

  auto t0 = std::chrono::steady_clock::now();
  service->AbandonAll("abandoned for the test");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0)
      << "the abandon waited for the commit timeout";
  for (auto& h : hs) {
    h.wait_durable();
    EXPECT_FALSE(h.persisted());
  }
  // Rank 2 arrives after all, with its own persister: its record would have let
  // rank 0's commit through, had that persist still waited.
  const std::string error = SaveStep1Alone(dirs, 2, 3, 22, std::chrono::seconds(2));
  EXPECT_NE(error.find("COMMIT of step 1"), std::string::npos) << "rank 2's persist: " << error;
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-1/COMMIT")) << "a persist of the abandoned round committed";
  // The snapshots stay: the next round's payload reports them.
  auto mem = service->MemorySteps();
  ASSERT_EQ(mem.size(), 2u);
  EXPECT_EQ(mem[0], std::vector<int64_t>{1});
  for (auto& w : workers) w->close();
  service->ReleaseMemory();
}

// A rank other than 0 abandoned after its record went out keeps its files:
// rank 0 (on a node whose agent has not abandoned yet) may still commit with
// that record, and the committed step must then be whole.
TEST(CheckpointService, AnAbandonedRankKeepsTheFilesItsPublishedRecordNames) {
  ScratchDirs dirs;
  auto [service, workers, hs] = ServiceWithStep1WaitingForTheCommit(dirs, {1}, 2, 31);
  ASSERT_FALSE(::testing::Test::HasFailure());
  service->AbandonAll("abandoned for the test");
  hs[0].wait_durable();
  EXPECT_FALSE(hs[0].persisted());
  EXPECT_EQ(SaveStep1Alone(dirs, 0, 2, 30, std::chrono::seconds(20)), "");  // commits with rank 1's record
  ASSERT_TRUE(fs::exists(dirs.ckpt + "/step-1/COMMIT"));
  for (auto& w : workers) w->close();
  CheckpointerOptions o = dirs.Options(1, 2);
  o.use_agent = false;
  Checkpointer reader(o);
  LoadOptions lo;
  lo.prefer_memory = false;
  auto snap = reader.load(lo);
  ASSERT_TRUE(snap);
  EXPECT_EQ(snap->step(), 1);
  EXPECT_EQ(FakeState::ForStep(31).Diff(*snap), "") << "the committed step lost rank 1's files";
  reader.close();
  service->ReleaseMemory();
}

}  // namespace
}  // namespace flashckpt
