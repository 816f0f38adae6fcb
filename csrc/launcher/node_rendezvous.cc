#include "launcher/node_rendezvous.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <algorithm>
#include <chrono>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace flashckpt::launcher {
namespace {

using Clock = std::chrono::steady_clock;
namespace rdzv = flashckpt::rendezvous;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string ShortHostName() {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

// The numeric address to bind for host ("localhost" -> 127.0.0.1).
std::string NumericAddress(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) {
    hints.ai_family = AF_UNSPEC;
    if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) return host;
  }
  char text[INET6_ADDRSTRLEN] = {};
  if (found->ai_family == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr, text, sizeof(text));
  } else {
    ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(found->ai_addr)->sin6_addr, text, sizeof(text));
  }
  ::freeaddrinfo(found);
  return text;
}

}  // namespace

rendezvous::NodeDescriptor DescribeThisNode(const DynamicRendezvousOptions& options, const std::string& payload,
                                            int restart_count) {
  rdzv::NodeDescriptor node;
  node.set_node_id(options.node_id);
  node.set_address(options.node_address);
  node.set_master_port(static_cast<uint32_t>(PickFreePort()));  // fresh per round: MASTER_PORT if rank 0
  node.set_local_world_size(static_cast<uint32_t>(options.local_world_size));
  node.set_payload(payload);
  node.set_restart_count(static_cast<uint32_t>(restart_count));
  return node;
}

absl::Status BarrierInterrupted(int rejoin_fd, const std::function<bool()>& stop_requested) {
  uint64_t pending = 0;
  if (::read(rejoin_fd, &pending, sizeof(pending)) == sizeof(pending)) {
    const uint64_t one = 1;
    (void)!::write(rejoin_fd, &one, sizeof(one));  // keep it readable for the agent loop
    return absl::AbortedError("the round ended during the barrier");
  }
  if (stop_requested()) return absl::CancelledError("barrier abandoned: the agent was asked to stop");
  return absl::OkStatus();
}

RoundAssignment AssignmentFromView(const rdzv::RoundView& view) {
  RoundAssignment a;
  a.round = view.round();
  a.group_rank = view.my_group_rank();
  a.group_world_size = view.participants_size();
  a.world_size = 0;
  for (int i = 0; i < view.participants_size(); ++i) {
    const rdzv::NodeDescriptor& n = view.participants(i);
    if (i < a.group_rank) a.rank_offset += static_cast<int>(n.local_world_size());
    a.world_size += static_cast<int>(n.local_world_size());
    a.restart_count = std::max(a.restart_count, static_cast<int>(n.restart_count()));
    a.nodes.push_back(NodeInRound{n.node_id(), n.address(), static_cast<int>(n.local_world_size()), n.payload()});
  }
  if (view.participants_size() > 0) {
    a.master_addr = view.participants(0).address();
    a.master_port = static_cast<int>(view.participants(0).master_port());
  }
  return a;
}

namespace {

class StaticRendezvous : public NodeRendezvous {
 public:
  explicit StaticRendezvous(StaticRendezvousOptions options) : options_(std::move(options)) {}
  absl::StatusOr<RoundAssignment> NextRound(const std::string& payload, int restart_count,
                                            const std::function<bool()>& /*stop_requested*/) override {
    RoundAssignment a;
    a.round = ++round_;
    a.group_rank = options_.node_rank;
    a.group_world_size = options_.nnodes;
    a.rank_offset = options_.node_rank * options_.local_world_size;
    a.world_size = options_.nnodes * options_.local_world_size;
    a.master_addr = options_.master_addr;
    a.master_port = options_.master_port;
    a.restart_count = restart_count;
    a.nodes.push_back(NodeInRound{"static", options_.master_addr, options_.local_world_size, payload});
    return a;
  }
  int RejoinNotifier() const override { return -1; }
  absl::Status Barrier(const std::string&, Clock::time_point, const std::function<bool()>&) override {
    return absl::OkStatus();
  }
  void Leave() override {}
  void Shutdown() override {}
  std::string Describe() const override {
    return absl::StrFormat("static rendezvous (node rank %d of %d)", options_.node_rank, options_.nnodes);
  }

 private:
  StaticRendezvousOptions options_;
  uint64_t round_ = 0;
};

class DynamicRendezvous : public NodeRendezvous {
 public:
  explicit DynamicRendezvous(DynamicRendezvousOptions options) : options_(std::move(options)) {
    rejoin_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  }
  ~DynamicRendezvous() override {
    Shutdown();
    if (rejoin_fd_ >= 0) ::close(rejoin_fd_);
  }

  absl::Status Init() {
    const bool inferred = !options_.is_host.has_value();
    const bool try_host = options_.is_host.value_or(IsLocalHost(options_.endpoint_host));
    if (try_host) {
      rdzv::RendezvousServerOptions server_options;
      server_options.bind_host = NumericAddress(options_.endpoint_host);
      server_options.port = options_.endpoint_port;
      server_options.token = options_.token;
      server_options.run_id = options_.run_id;
      server_options.round.min_nodes = static_cast<uint32_t>(options_.min_nodes);
      server_options.round.max_nodes = static_cast<uint32_t>(options_.max_nodes);
      server_options.round.last_call_timeout = options_.last_call_timeout;
      server_options.round.node_expiry = options_.keep_alive_interval * options_.keep_alive_max_attempt;
      server_options.read_timeout = options_.read_timeout;
      absl::StatusOr<std::unique_ptr<rdzv::RendezvousServer>> server =
          rdzv::RendezvousServer::Start(server_options);
      if (server.ok()) {
        server_ = std::move(*server);
        if (options_.token.empty() && !absl::StartsWith(server_->host(), "127.") && server_->host() != "::1") {
          std::fprintf(stderr,
                       "[flashrun] warning: the rendezvous at %s has no token (set FLASHRUN_RDZV_TOKEN or "
                       "--rdzv-conf token_file=...): anyone who can reach it can join the job\n",
                       rdzv::FormatEndpoint(server_->host(), server_->port()).c_str());
        }
        options_.endpoint_port = server_->port();
        client_host_ = server_->host();
      } else if (!inferred || !absl::StrContains(server.status().message(), "in use")) {
        // An explicit is_host must host; a busy port we only guessed we should own
        // means another agent hosts it.
        return server.status();
      }
    }
    if (client_host_.empty()) client_host_ = options_.endpoint_host;
    client_ = MakeClient();
    return absl::OkStatus();
  }

  absl::StatusOr<RoundAssignment> NextRound(const std::string& payload, int restart_count,
                                            const std::function<bool()>& stop_requested) override {
    StopWatcher();
    uint64_t drained;
    (void)!::read(rejoin_fd_, &drained, sizeof(drained));

    const Clock::time_point started = Clock::now();
    const Clock::time_point deadline = started + options_.join_timeout;
    const rdzv::NodeDescriptor node = DescribeThisNode(options_, payload, restart_count);

    bool joined = false;
    absl::Status last_error = absl::OkStatus();
    rdzv::RoundView view;
    // A failed call (refused, closed, garbage) is retried after a backoff that
    // doubles from 50 ms up to 2 s, with jitter, within the join deadline: an
    // endpoint that accepts and closes must not be hammered.
    int failed_calls = 0, calls = 0;
    std::minstd_rand jitter(static_cast<uint32_t>(std::hash<std::string>{}(options_.node_id) ^ ::getpid()));
    auto back_off = [&] {
      ++failed_calls;
      const int exp = std::min(failed_calls - 1, 6);
      const int base_ms = std::min(2000, 50 << exp);
      const int ms = base_ms / 2 + static_cast<int>(jitter() % static_cast<uint32_t>(base_ms / 2 + 1));
      const auto until = std::min(deadline, Clock::now() + std::chrono::milliseconds(ms));
      while (Clock::now() < until && !stop_requested())
        std::this_thread::sleep_for(std::min<Clock::duration>(until - Clock::now(), std::chrono::milliseconds(50)));
    };
    while (true) {
      if (Clock::now() >= deadline) break;
      if (stop_requested()) return absl::CancelledError("rendezvous abandoned: the agent was asked to stop");
      if (!joined) {
        ++calls;
        absl::StatusOr<rdzv::RoundView> joined_view =
            client_->Join(node, std::min(deadline, Clock::now() + std::chrono::seconds(1)));
        if (!joined_view.ok()) {
          last_error = joined_view.status();
          if (IsFatal(last_error)) return last_error;
          back_off();
          continue;
        }
        failed_calls = 0;
        joined = true;
        view = *joined_view;
        if (view.my_group_rank() >= 0 && !view.waiting() && view.round() > last_round_) break;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      // Short polls, so that a signal to the agent is handled within a second.
      const auto wait = std::min({left, options_.keep_alive_interval, std::chrono::milliseconds(1000)});
      ++calls;
      absl::StatusOr<rdzv::RoundView> synced = client_->Sync(
          options_.node_id, last_round_, wait, std::min(deadline, Clock::now() + wait + std::chrono::seconds(2)));
      if (!synced.ok()) {
        last_error = synced.status();
        if (IsFatal(last_error)) return last_error;
        back_off();
        continue;
      }
      failed_calls = 0;
      view = *synced;
      if (view.my_group_rank() >= 0 && !view.waiting() && view.round() > last_round_) break;
      if (!view.waiting() && view.my_group_rank() < 0) joined = false;  // dropped from the line: join again
    }
    if (!(view.my_group_rank() >= 0 && !view.waiting() && view.round() > last_round_)) {
      std::string progress = joined ? absl::StrFormat("%d/%d nodes joined", view.nodes_waiting(), options_.min_nodes)
                                    : "this node could not join";
      return absl::DeadlineExceededError(absl::StrFormat(
          "rendezvous '%s' at %s: %s after %.1f s (join_timeout %.0f s; --nnodes %d:%d)%s", options_.run_id,
          client_->endpoint(), progress, SecondsSince(started),
          std::chrono::duration<double>(options_.join_timeout).count(), options_.min_nodes, options_.max_nodes,
          last_error.ok() ? "" : absl::StrFormat("; %d calls, %d failing in a row; last error: %s", calls, failed_calls,
                                                 last_error.message())));
    }
    last_round_ = view.round();
    group_world_size_ = view.participants_size();
    StartWatcher(view.round());
    RoundAssignment assignment = AssignmentFromView(view);
    assignment.store = RendezvousStore{};
    assignment.store->host = client_host_;
    assignment.store->port = options_.endpoint_port;
    assignment.store->token = options_.token;
    assignment.store->run_id = options_.run_id;
    return assignment;
  }

  int RejoinNotifier() const override { return rejoin_fd_; }

  absl::Status Barrier(const std::string& name, Clock::time_point deadline,
                       const std::function<bool()>& stop_requested) override {
    const Clock::time_point started = Clock::now();
    const std::string key = absl::StrFormat("%s/round/%d/barrier/%s", options_.run_id, last_round_, name);
    absl::StatusOr<int64_t> count = client_->StoreAdd(key, 1, deadline);
    while (count.ok() && *count < group_world_size_) {
      if (Clock::now() >= deadline) break;
      if (absl::Status s = BarrierInterrupted(rejoin_fd_, stop_requested); !s.ok()) return s;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      count = client_->StoreAdd(key, 0, deadline);
    }
    if (!count.ok()) return count.status();
    if (*count < group_world_size_) {
      return absl::DeadlineExceededError(absl::StrFormat("barrier '%s' at %s: %d/%d nodes arrived after %.1f s", name,
                                                         client_->endpoint(), *count, group_world_size_,
                                                         SecondsSince(started)));
    }
    return absl::OkStatus();
  }

  void Shutdown() override {
    StopWatcher();
    if (server_) {
      server_.reset();
    }
  }

  void Leave() override {
    StopWatcher();
    if (client_) (void)client_->Leave(options_.node_id, Clock::now() + std::chrono::seconds(2));
  }

  bool hosts_server() const { return server_ != nullptr; }

  std::string Describe() const override {
    return absl::StrFormat("c10d rendezvous '%s' at %s%s", options_.run_id,
                           rdzv::FormatEndpoint(client_host_, options_.endpoint_port),
                           server_ ? " (hosted by this agent)" : "");
  }

 private:
  static bool IsFatal(const absl::Status& status) {
    return status.code() == absl::StatusCode::kUnauthenticated ||
           status.code() == absl::StatusCode::kFailedPrecondition;
  }

  std::unique_ptr<rdzv::RendezvousClient> MakeClient() const {
    return std::make_unique<rdzv::RendezvousClient>(client_host_, options_.endpoint_port, options_.token,
                                                    options_.run_id);
  }

  void StartWatcher(uint64_t round) {
    watcher_client_ = MakeClient();
    watcher_stop_ = false;
    watcher_ = std::thread([this, round, client = watcher_client_.get()] {
      int failures_in_a_row = 0;
      while (!watcher_stop_) {
        // The server answers a long poll after keep_alive_interval; twice that (plus
        // a second for a slow connect) without an answer counts as a missed keep-alive.
        const auto deadline = Clock::now() + 2 * options_.keep_alive_interval + std::chrono::seconds(1);
        absl::StatusOr<rdzv::RoundView> view =
            client->Sync(options_.node_id, round, options_.keep_alive_interval, deadline);
        if (watcher_stop_) return;
        if (view.ok()) {
          failures_in_a_row = 0;
          if (view->must_rejoin() || view->round() != round || view->my_group_rank() < 0) break;
          continue;
        }
        if (++failures_in_a_row >= options_.keep_alive_max_attempt) {
          std::fprintf(stderr, "[flashrun] lost the rendezvous server after %d attempts: %s\n", failures_in_a_row,
                       std::string(view.status().message()).c_str());
          break;
        }
        std::this_thread::sleep_for(options_.keep_alive_interval);
      }
      const uint64_t one = 1;
      (void)!::write(rejoin_fd_, &one, sizeof(one));
    });
  }

  void StopWatcher() {
    if (!watcher_.joinable()) return;
    watcher_stop_ = true;
    watcher_client_->Interrupt();
    watcher_.join();
    watcher_client_.reset();
  }

  DynamicRendezvousOptions options_;
  std::unique_ptr<rdzv::RendezvousServer> server_;
  std::string client_host_;
  std::unique_ptr<rdzv::RendezvousClient> client_;
  std::unique_ptr<rdzv::RendezvousClient> watcher_client_;
  std::thread watcher_;
  std::atomic<bool> watcher_stop_{false};
  int rejoin_fd_ = -1;
  uint64_t last_round_ = 0;
  int group_world_size_ = 1;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NodeRendezvous>> StartDynamicRendezvous(DynamicRendezvousOptions options) {
  auto rendezvous = std::make_unique<DynamicRendezvous>(std::move(options));
  if (absl::Status s = rendezvous->Init(); !s.ok()) return s;
  return std::unique_ptr<NodeRendezvous>(std::move(rendezvous));
}

std::unique_ptr<NodeRendezvous> MakeStaticRendezvous(StaticRendezvousOptions options) {
  return std::make_unique<StaticRendezvous>(std::move(options));
}

int PickFreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_ANY);
  address.sin_port = 0;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
    socklen_t length = sizeof(address);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0) port = ntohs(address.sin_port);
  }
  ::close(fd);
  return port;
}

std::string FullyQualifiedHostName() {
  // As Python's socket.getfqdn(), which torchrun uses for MASTER_ADDR: the
  // reverse lookup of the host name, preferring a name with a dot in it.
  const std::string short_name = ShortHostName();
  hostent* forward = ::gethostbyname(short_name.c_str());
  if (forward == nullptr || forward->h_addr_list[0] == nullptr) return short_name;
  hostent* reverse = ::gethostbyaddr(forward->h_addr_list[0], forward->h_length, forward->h_addrtype);
  if (reverse == nullptr || reverse->h_name == nullptr) return short_name;
  std::vector<std::string> names = {reverse->h_name};
  for (char** alias = reverse->h_aliases; alias != nullptr && *alias != nullptr; ++alias) names.push_back(*alias);
  for (const std::string& name : names) {
    if (name.find('.') != std::string::npos) return name;
  }
  return names.front();
}

bool IsLocalHost(const std::string& host) {
  if (host == "localhost" || absl::StartsWith(host, "127.") || host == "::1" || host == "0.0.0.0") return true;
  if (host == ShortHostName() || host == FullyQualifiedHostName()) return true;
  const std::string numeric = NumericAddress(host);
  ifaddrs* interfaces = nullptr;
  if (::getifaddrs(&interfaces) != 0) return false;
  bool local = false;
  for (ifaddrs* i = interfaces; i != nullptr && !local; i = i->ifa_next) {
    if (i->ifa_addr == nullptr) continue;
    char text[INET6_ADDRSTRLEN] = {};
    if (i->ifa_addr->sa_family == AF_INET) {
      ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text, sizeof(text));
    } else if (i->ifa_addr->sa_family == AF_INET6) {
      ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(i->ifa_addr)->sin6_addr, text, sizeof(text));
    } else {
      continue;
    }
    local = numeric == text;
  }
  ::freeifaddrs(interfaces);
  return local;
}

}  // namespace flashckpt::launcher
