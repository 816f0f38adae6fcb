// A real etcd member for tests: Debian's etcd-server on free 127.0.0.1 ports
// with its own data directory, stopped (and its data removed) at the end;
// optionally serving TLS (https) with certificates TestCertificates makes with
// the openssl CLI. No gtest here: benchmarks start their etcd with it too
// (etcd_test_server.h adds REQUIRE_ETCD for tests).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

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

// Certificates for TLS tests, made with the openssl CLI into a temporary
// directory removed at the end: a CA, a server certificate it signed for
// 127.0.0.1 (subjectAltName IP:127.0.0.1 only), a client certificate it
// signed, and a second CA that signed nothing etcd has. ok() is false (and
// error() says why) where openssl is missing or failed.
class TestCertificates {
 public:
  TestCertificates() {
    auto openssl = FindProgram("openssl");
    if (!openssl) {
      error_ = "no openssl binary (apt install openssl)";
      return;
    }
    dir_ = etcd_fs::temp_directory_path() / ("fck-tls-" + std::to_string(getpid()) + "-" + std::to_string(counter_++));
    etcd_fs::create_directories(dir_);
    std::ofstream(path("server.ext")) << "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n";
    std::ofstream(path("client.ext")) << "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
    const std::string o = *openssl;
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::vector<std::string> steps = {
        o + " req -x509" + ec + " -days 2 -subj /CN=flashckpt-test-ca -keyout ca.key -out ca.pem",
        o + " req -x509" + ec + " -days 2 -subj /CN=flashckpt-other-ca -keyout other-ca.key -out other-ca.pem",
        o + " req" + ec + " -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
        o + " x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext "
            "-out server.pem",
        o + " req" + ec + " -subj /CN=flashckpt-client -keyout client.key -out client.csr",
        o + " x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext "
            "-out client.pem",
    };
    for (const std::string& step : steps) {
      const std::string command = "cd '" + dir_.string() + "' && " + step + " > openssl.log 2>&1";
      if (std::system(command.c_str()) != 0) {
        std::ifstream log(path("openssl.log"));
        error_ = "openssl failed: " + step + ": " + std::string(std::istreambuf_iterator<char>(log), {});
        return;
      }
    }
  }
  ~TestCertificates() {
    std::error_code ec;
    if (!dir_.empty()) etcd_fs::remove_all(dir_, ec);
  }
  TestCertificates(const TestCertificates&) = delete;
  TestCertificates& operator=(const TestCertificates&) = delete;

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string ca() const { return path("ca.pem"); }
  std::string other_ca() const { return path("other-ca.pem"); }
  std::string server_cert() const { return path("server.pem"); }
  std::string server_key() const { return path("server.key"); }
  std::string client_cert() const { return path("client.pem"); }
  std::string client_key() const { return path("client.key"); }

 private:
  static inline int counter_ = 0;
  etcd_fs::path dir_;
  std::string error_;
};

// How an etcd member serves TLS on its client port.
struct EtcdTls {
  const TestCertificates* certificates = nullptr;
  bool client_cert_auth = false;  // etcd wants a client certificate its CA signed
};

// One etcd member on 127.0.0.1, stopped (and its data removed) at the end.
class EtcdServer {
 public:
  explicit EtcdServer(std::optional<EtcdTls> tls = std::nullopt) : tls_(tls) {
    auto bin = FindProgram("etcd");
    if (!bin) return;
    dir_ = etcd_fs::temp_directory_path() / ("fck-etcd-" + std::to_string(getpid()) + "-" + std::to_string(counter_++));
    etcd_fs::create_directories(dir_);
    log_ = (dir_ / "etcd.log").string();
    bin_ = *bin;
    // A port FreePort() gave can be taken (by another process, or as the local
    // port of an outgoing connection) before etcd binds it: etcd then exits,
    // and another pair of ports is tried.
    for (int attempt = 0; attempt < 3 && !up_; ++attempt) {
      std::error_code ec;
      etcd_fs::remove_all(dir_ / "data", ec);
      client_port_ = FreePort();
      int peer = FreePort();
      while (peer == client_port_) peer = FreePort();
      const std::string client = url();
      const std::string peer_url = "http://127.0.0.1:" + std::to_string(peer);
      std::vector<std::string> args = {"etcd",
                                       "--name", "m0",
                                       "--data-dir", (dir_ / "data").string(),
                                       "--listen-client-urls", client,
                                       "--advertise-client-urls", client,
                                       "--listen-peer-urls", peer_url,
                                       "--initial-advertise-peer-urls", peer_url,
                                       "--initial-cluster", "m0=" + peer_url,
                                       "--log-level", "error"};
      if (tls_) {
        const TestCertificates& c = *tls_->certificates;
        args.insert(args.end(), {"--cert-file", c.server_cert(), "--key-file", c.server_key()});
        if (tls_->client_cert_auth) args.insert(args.end(), {"--client-cert-auth", "--trusted-ca-file", c.ca()});
      }
      args_ = std::move(args);
      Start();
      if (!up_) Stop();
    }
  }
  // Stops this member and starts it again on the same ports and data (what a
  // client had open to it is gone); true when it answers again.
  bool Restart() {
    Stop();
    Start();
    return up_;
  }
  ~EtcdServer() {
    Stop();
    std::error_code ec;
    if (!dir_.empty()) etcd_fs::remove_all(dir_, ec);
  }
  void Stop() {
    if (pid_ <= 0) return;
    if (!exited_) {  // a pid reaped already may be another process's by now
      kill(pid_, SIGKILL);
      int status;
      waitpid(pid_, &status, 0);
    }
    pid_ = -1;
    exited_ = false;
  }
  bool up() const { return up_; }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(client_port_); }
  // With the scheme: https://127.0.0.1:P with TLS, else http://127.0.0.1:P.
  std::string url() const { return (tls_ ? "https://" : "http://") + endpoint(); }
  // Options of a client this member accepts: its CA, and a client certificate when it wants one.
  EtcdOptions client_options() const {
    EtcdOptions o;
    o.endpoints = {url()};
    if (tls_) {
      o.ca_file = tls_->certificates->ca();
      if (tls_->client_cert_auth) {
        o.cert_file = tls_->certificates->client_cert();
        o.key_file = tls_->certificates->client_key();
      }
    }
    return o;
  }
  pid_t pid() const { return pid_; }

 private:
  void Start() {
    up_ = false;
    std::vector<char*> argv;
    for (std::string& a : args_) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // a crashed test leaves no etcd behind
      FILE* f = freopen(log_.c_str(), "a", stderr);
      (void)f;
      execv(bin_.c_str(), argv.data());
      _exit(127);
    }
    // Up when a client can read (at most 20 s).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {  // it gave up (a port in use?): see etcd.log
        exited_ = true;
        return;
      }
      EtcdOptions o = client_options();
      o.request_timeout = std::chrono::milliseconds(500);
      if (EtcdClient::Connect(o).ok()) {
        up_ = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  std::vector<std::string> args_;
  std::string log_, bin_;
  static inline int counter_ = 0;
  std::optional<EtcdTls> tls_;
  etcd_fs::path dir_;
  int client_port_ = 0;
  pid_t pid_ = -1;
  bool exited_ = false;  // reaped already (it exited on its own)
  bool up_ = false;
};

}  // namespace flashckpt::rendezvous::etcd_testing
