#include "api/agent_client.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "agent.pb.h"
#include "common/log.h"
#include "common/status.h"
#include "ipc/agent_protocol.h"

namespace flashckpt {

AgentClient::~AgentClient() { Close(); }

void AgentClient::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

absl::Status AgentClient::Connect() {
  Close();
  FCK_ASSIGN_OR_RETURN(int fd, ConnectUnix(hello_.socket));
  pb::AgentRequest req;
  auto* h = req.mutable_hello();
  h->set_rank(hello_.rank);
  h->set_world_size(hello_.world_size);
  h->set_directory(hello_.directory);
  h->set_shm_path(hello_.shm_path);
  h->set_keep_last(hello_.keep_last);
  h->set_commit_timeout_ms(hello_.commit_timeout.count());
  h->set_pid(getpid());
  h->mutable_io()->set_use_io_uring(hello_.io.use_io_uring);
  h->mutable_io()->set_use_direct_io(hello_.io.use_direct_io);
  h->mutable_io()->set_chunk_bytes(hello_.io.chunk_bytes);
  h->mutable_io()->set_queue_depth(hello_.io.queue_depth);
  absl::Status s = WriteFrame(fd, req);
  if (!s.ok()) {
    ::close(fd);
    return Annotate(s, absl::StrCat("hello to the flashrun agent at ", hello_.socket));
  }
  fd_ = fd;
  return absl::OkStatus();
}

absl::Status AgentClient::Persist(int64_t step, int slot, uint64_t generation) {
  pb::AgentRequest req;
  req.mutable_published()->set_step(step);
  req.mutable_published()->set_slot(slot);
  req.mutable_published()->set_generation(generation);
  if (fd_ < 0) FCK_RETURN_IF_ERROR(Connect());
  absl::Status sent = WriteFrame(fd_, req);
  if (!sent.ok()) {
    // The connection broke (an agent restart, or a reset): connect once more.
    FCK_LOG(kWarn, "lost the connection to the flashrun agent at ", hello_.socket, " (", sent.message(),
            "); reconnecting");
    FCK_RETURN_IF_ERROR(Connect());
    sent = WriteFrame(fd_, req);
  }
  FCK_RETURN_IF_ERROR(Annotate(sent, absl::StrCat("flashrun agent at ", hello_.socket)));
  for (;;) {
    pb::AgentReply rep;
    absl::Status s = ReadFrame(fd_, &rep, hello_.commit_timeout + std::chrono::seconds(60));
    if (!s.ok()) {
      if (s.code() == absl::StatusCode::kUnavailable) Connect().IgnoreError();  // for the next step
      return Annotate(s, absl::StrCat("waiting for the flashrun agent at ", hello_.socket, " to persist step ", step));
    }
    if (rep.step() != step) continue;
    if (!rep.ok()) return absl::InternalError(absl::StrCat("the flashrun agent failed to persist step ", step,
                                                           ": ", rep.error()));
    if (!rep.persisted()) return absl::CancelledError("superseded");
    return absl::OkStatus();
  }
}

}  // namespace flashckpt
