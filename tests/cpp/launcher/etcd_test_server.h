// A real etcd member for tests: Debian's etcd-server on free 127.0.0.1 ports
// with its own data directory, stopped (and its data removed) at the end.
// REQUIRE_ETCD skips a test where no etcd binary is installed.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>

#include "rendezvous/etcd_client.h"

namespace flashckpt::rendezvous::etcd_testing {

namespace etcd_fs = std::filesystem;

inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

inline std::optional<std::string> FindProgram(const char* name) {
  for (const char* dir : {"/usr/bin", "/usr/local/bin", "/usr/sbin"}) {
    etcd_fs::path p = etcd_fs::path(dir) / name;
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return std::nullopt;
}

// One etcd member on 127.0.0.1, stopped (and its data removed) at the end.
class EtcdServer {
 public:
  EtcdServer() {
    auto bin = FindProgram("etcd");
    if (!bin) return;
    dir_ = etcd_fs::temp_directory_path() / ("fck-etcd-" + std::to_string(getpid()) + "-" + std::to_string(counter_++));
    etcd_fs::create_directories(dir_);
    client_port_ = FreePort();
    const int peer = FreePort();
    const std::string client = "http://127.0.0.1:" + std::to_string(client_port_);
    const std::string peer_url = "http://127.0.0.1:" + std::to_string(peer);
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // a crashed test leaves no etcd behind
      const std::string log = (dir_ / "etcd.log").string();
      FILE* f = freopen(log.c_str(), "w", stderr);
      (void)f;
      const std::string data = (dir_ / "data").string();
      execl(bin->c_str(), "etcd", "--name", "m0", "--data-dir", data.c_str(), "--listen-client-urls", client.c_str(),
            "--advertise-client-urls", client.c_str(), "--listen-peer-urls", peer_url.c_str(),
            "--initial-advertise-peer-urls", peer_url.c_str(), "--initial-cluster", ("m0=" + peer_url).c_str(),
            "--log-level", "error", static_cast<char*>(nullptr));
      _exit(127);
    }
    // Up when a client can read (at most 20 s).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      EtcdOptions o;
      o.endpoints = {endpoint()};
      o.request_timeout = std::chrono::milliseconds(500);
      if (EtcdClient::Connect(o).ok()) {
        up_ = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ~EtcdServer() {
    Stop();
    std::error_code ec;
    if (!dir_.empty()) etcd_fs::remove_all(dir_, ec);
  }
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int status;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  bool up() const { return up_; }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(client_port_); }
  pid_t pid() const { return pid_; }

 private:
  static inline int counter_ = 0;
  etcd_fs::path dir_;
  int client_port_ = 0;
  pid_t pid_ = -1;
  bool up_ = false;
};

#define REQUIRE_ETCD(server)                                                                       \
  if (!::flashckpt::rendezvous::etcd_testing::FindProgram("etcd")) GTEST_SKIP() << "no etcd binary (apt install etcd-server)";           \
  ASSERT_TRUE((server).up()) << "etcd did not come up on " << (server).endpoint()

}  // namespace flashckpt::rendezvous::etcd_testing
