#include "rendezvous/etcd_client.h"

#include <google/protobuf/util/json_util.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/x509_vfy.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace flashckpt::rendezvous {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

struct Endpoint {
  enum class Scheme { kNone, kHttp, kHttps };
  std::string host, port;
  Scheme scheme = Scheme::kNone;
  std::string Text() const { return absl::StrCat(host, ":", port); }
  std::string Url() const {
    return absl::StrCat(scheme == Scheme::kHttps ? "https://" : scheme == Scheme::kHttp ? "http://" : "", Text());
  }
};

absl::StatusOr<Endpoint> ParseEndpoint(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  Endpoint ep;
  if (absl::ConsumePrefix(&t, "https://")) ep.scheme = Endpoint::Scheme::kHttps;
  else if (absl::ConsumePrefix(&t, "http://")) ep.scheme = Endpoint::Scheme::kHttp;
  absl::ConsumeSuffix(&t, "/");
  const size_t colon = t.rfind(':');
  int port = 0;
  if (colon == absl::string_view::npos || colon == 0 || !absl::SimpleAtoi(t.substr(colon + 1), &port) || port < 1 ||
      port > 65535)
    return absl::InvalidArgumentError(absl::StrCat(
        "etcd endpoint '", text, "' is not host:port (e.g. 127.0.0.1:2379, http://etcd-0:2379 or https://etcd-0:2379)"));
  ep.host = std::string(t.substr(0, colon));
  ep.port = std::to_string(port);
  return ep;
}

// Every member of a cluster speaks one protocol: a list that mixes http://
// and https:// is a typo, and so is an http:// member when TLS is asked for.
absl::Status CheckOneProtocol(const std::vector<Endpoint>& endpoints, bool tls_asked) {
  std::vector<std::string> plain, secure;
  for (const Endpoint& e : endpoints) {
    if (e.scheme == Endpoint::Scheme::kHttp) plain.push_back(e.Url());
    if (e.scheme == Endpoint::Scheme::kHttps) secure.push_back(e.Url());
  }
  if (!plain.empty() && !secure.empty())
    return absl::InvalidArgumentError(absl::StrCat("etcd endpoints mix plain HTTP (", absl::StrJoin(plain, ", "),
                                                   ") and TLS (", absl::StrJoin(secure, ", "),
                                                   "): the members of one cluster speak one protocol"));
  if (!plain.empty() && tls_asked)
    return absl::InvalidArgumentError(absl::StrCat(
        "etcd endpoint ", plain[0], " is plain HTTP, but TLS is asked for (--rdzv-conf protocol=https, cacert, cert "
        "or key): write it https://", plain[0].substr(7), " or without a scheme"));
  return absl::OkStatus();
}

// `path` can be opened for reading; else an error that names it and why.
absl::Status CheckReadable(const char* what, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat("etcd TLS: the ", what, " file ", path, " cannot be read: ", std::strerror(errno)));
  std::fclose(f);
  return absl::OkStatus();
}

// Loads one PEM file into the TLS context; an error names the file, what
// OpenSSL said, and what the file should hold.
template <typename Load>
absl::Status LoadPemFile(const char* what, const std::string& path, const std::string& needed, Load&& load) {
  if (absl::Status s = CheckReadable(what, path); !s.ok()) return s;
  beast::error_code ec;
  load(path, ec);
  if (ec)
    return absl::InvalidArgumentError(
        absl::StrCat("etcd TLS: the ", what, " file ", path, " cannot be loaded: ", ec.message(), " (", needed, ")"));
  return absl::OkStatus();
}

// The client side of TLS, loaded once per client: the CA to check etcd's
// certificate against, and the client certificate when there is one.
absl::StatusOr<std::unique_ptr<ssl::context>> MakeTlsContext(const EtcdOptions& o) {
  auto ctx = std::make_unique<ssl::context>(ssl::context::tls_client);
  ctx->set_verify_mode(ssl::verify_peer);
  // An encrypted key must fail, not prompt on the terminal for a password.
  ctx->set_password_callback([](size_t, ssl::context::password_purpose) { return std::string(); });
  if (!o.ca_file.empty()) {
    absl::Status s = LoadPemFile("CA certificate (cacert)", o.ca_file, "PEM CA certificates are needed",
                                 [&](const std::string& f, beast::error_code& ec) { ctx->load_verify_file(f, ec); });
    if (!s.ok()) return s;
  } else {
    beast::error_code ec;
    ctx->set_default_verify_paths(ec);
    if (ec)
      return absl::InvalidArgumentError(
          absl::StrCat("etcd TLS: the system's CA store cannot be loaded (", ec.message(),
                       "): give the CA that signed etcd's certificate with --rdzv-conf cacert=..."));
  }
  if (o.cert_file.empty() && !o.key_file.empty())
    return absl::InvalidArgumentError(absl::StrCat("etcd TLS: a client key (key=", o.key_file,
                                                   ") without its certificate: give --rdzv-conf cert=... too"));
  if (o.cert_file.empty()) return ctx;
  absl::Status s = LoadPemFile("client certificate (cert)", o.cert_file, "a PEM certificate (chain) is needed",
                               [&](const std::string& f, beast::error_code& ec) {
                                 ctx->use_certificate_chain_file(f, ec);
                               });
  if (!s.ok()) return s;
  s = LoadPemFile("client key (key)", o.key_file.empty() ? o.cert_file : o.key_file,
                  absl::StrCat("the unencrypted PEM private key of ", o.cert_file, " is needed"),
                  [&](const std::string& f, beast::error_code& ec) {
                    ctx->use_private_key_file(f, ssl::context::pem, ec);
                  });
  if (!s.ok()) return s;
  return ctx;
}

// A watch is quiet while nothing changes, and a peer that went away without a
// word (its host down, a partition) would leave it waiting for ever: TCP
// keep-alive probes after 2 s of quiet, one a second, end it after the third
// goes unanswered (about 5 s), and the caller reads the state whole again.
void KeepProbing(tcp::socket& socket) {
  beast::error_code ignored;
  socket.set_option(asio::socket_base::keep_alive(true), ignored);
  const int fd = socket.native_handle();
  const int idle = 2, interval = 1, count = 3;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
}

bool IsIpAddress(const std::string& host) {
  beast::error_code ec;
  (void)asio::ip::make_address(host, ec);
  return !ec;
}

// A connection to one endpoint, plain or TLS: resolving, connecting and (with
// TLS) the handshake, in one place for the calls and the watches. The streams
// are driven through Visit, which hands the caller the one in use.
class Connection {
 public:
  Connection(asio::io_context& ioc, ssl::context* tls) : resolver_(ioc) {
    if (tls != nullptr) secure_.emplace(ioc, *tls);
    else plain_.emplace(ioc);
  }

  beast::tcp_stream& Tcp() { return secure_ ? beast::get_lowest_layer(*secure_) : *plain_; }

  template <typename F>
  void Visit(F&& f) {
    if (secure_) f(*secure_);
    else f(*plain_);
  }

  // Resolves, connects and shakes hands, then calls `then` (with the error, if any).
  void AsyncOpen(const Endpoint& ep, std::function<void(beast::error_code)> then) {
    then_ = std::move(then);
    stage_ = "resolving";
    // An address needs no resolve: it would be a hand-off to asio's resolver
    // thread and back on every call (most of the agents' CPU with 64 on a host).
    beast::error_code not_an_address;
    const asio::ip::address addr = asio::ip::make_address(ep.host, not_an_address);
    int port = 0;
    if (!not_an_address && absl::SimpleAtoi(ep.port, &port) && port > 0 && port < 65536) {
      Connect(ep, tcp::endpoint(addr, static_cast<unsigned short>(port)));
      return;
    }
    resolver_.async_resolve(ep.host, ep.port, [this, ep](beast::error_code e, tcp::resolver::results_type results) {
      // A resolve that completed just before Close() still succeeds (cancel()
      // reaches only one not yet done): it must not open a connection then,
      // a watch on which nothing would ever end.
      if (!e && closed_) e = asio::error::operation_aborted;
      if (e) return then_(e);
      stage_ = "connecting";
      Tcp().async_connect(results, [this, ep](beast::error_code e2, const tcp::endpoint&) { Connected(ep, e2); });
    });
  }

  const std::string& stage() const { return stage_; }
  void set_stage(std::string stage) { stage_ = std::move(stage); }
  // Why etcd's certificate did not verify, as OpenSSL says it ("" if it did).
  const std::string& verify_failure() const { return verify_failure_; }

  // Ends what is in flight too (its handlers run with operation_aborted).
  // Nothing is started after it: see AsyncOpen.
  void Close() {
    closed_ = true;
    resolver_.cancel();
    beast::error_code ignored;
    Tcp().socket().shutdown(tcp::socket::shutdown_both, ignored);
    Tcp().socket().close(ignored);
  }

 private:
  void Connect(const Endpoint& ep, const tcp::endpoint& to) {
    stage_ = "connecting";
    Tcp().async_connect(to, [this, ep](beast::error_code e) { Connected(ep, e); });
  }

  void Connected(const Endpoint& ep, beast::error_code e) {
    if (!e && closed_) e = asio::error::operation_aborted;
    if (e || !secure_) return then_(e);
    Handshake(ep);
  }

  void Handshake(const Endpoint& ep) {
    stage_ = "TLS handshake";
    SSL* native = secure_->native_handle();
    if (!IsIpAddress(ep.host)) SSL_set_tlsext_host_name(native, ep.host.c_str());  // SNI takes names only
    const bool by_address = IsIpAddress(ep.host);
    secure_->set_verify_callback(
        [check = ssl::host_name_verification(ep.host), by_address](bool preverified, ssl::verify_context& ctx) {
          if (!preverified) return false;  // the chain does not verify: OpenSSL has said why
          if (check(preverified, ctx)) return true;
          // Say why in the verify result, which host_name_verification leaves at "ok".
          X509_STORE_CTX_set_error(ctx.native_handle(),
                                   by_address ? X509_V_ERR_IP_ADDRESS_MISMATCH : X509_V_ERR_HOSTNAME_MISMATCH);
          return false;
        });
    secure_->async_handshake(ssl::stream_base::client, [this](beast::error_code e) {
      if (e) {
        const long verified = SSL_get_verify_result(secure_->native_handle());
        if (verified != X509_V_OK) verify_failure_ = X509_verify_cert_error_string(verified);
      }
      then_(e);
    });
  }

  tcp::resolver resolver_;
  std::optional<beast::tcp_stream> plain_;
  std::optional<beast::ssl_stream<beast::tcp_stream>> secure_;
  std::function<void(beast::error_code)> then_;
  std::string stage_ = "resolving";
  std::string verify_failure_;
  bool closed_ = false;  // by Close(); the handlers run on the same thread
};

// A failed connection or exchange as a status that names the endpoint and the
// stage, and for TLS what to check. A TLS setup that cannot work is
// FailedPrecondition: another attempt would fail the same way.
absl::Status ConnectionError(const Endpoint& ep, const std::string& doing, const Connection& c, beast::error_code ec,
                             const EtcdOptions& o) {
  const std::string at = absl::StrCat(ep.Text(), ": ", doing.empty() ? "" : doing + ": ");
  if (ec == beast::error::timeout) return absl::DeadlineExceededError(absl::StrCat(at, "no answer in time (", c.stage(), ")"));
  // A closed connection, where a wrong protocol is one likely cause (an outage another): said, not FailedPrecondition.
  const bool closed = ec == ssl::error::stream_truncated || ec == asio::error::eof || ec == http::error::end_of_stream ||
                      ec == asio::error::connection_reset;
  if (closed && o.tls && c.stage() == "TLS handshake")
    return absl::UnavailableError(absl::StrCat(at, c.stage(), ": ", ec.message(),
                                               " (etcd closed the connection during the TLS handshake: if it serves "
                                               "plain HTTP, use http:// or --rdzv-conf protocol=http)"));
  if (closed && !o.tls && c.stage() == "waiting for the answer")
    return absl::UnavailableError(absl::StrCat(at, c.stage(), ": ", ec.message(),
                                               " (etcd closed the connection without an answer: if it serves TLS, "
                                               "use https:// or --rdzv-conf protocol=https,cacert=...)"));
  if (ec.category() != asio::error::get_ssl_category())
    return absl::UnavailableError(absl::StrCat(at, c.stage(), ": ", ec.message()));
  const int reason = ERR_GET_REASON(static_cast<unsigned long>(ec.value()));
  const std::string what = ec.message();
  switch (reason) {
    case SSL_R_CERTIFICATE_VERIFY_FAILED: {
      const std::string& why = c.verify_failure();
      std::string hint;
      if (why == X509_verify_cert_error_string(X509_V_ERR_HOSTNAME_MISMATCH) ||
          why == X509_verify_cert_error_string(X509_V_ERR_IP_ADDRESS_MISMATCH))
        hint = absl::StrCat("etcd's certificate is not for ", ep.host,
                            ": reach etcd by a name or address its certificate lists (subjectAltName)");
      else if (!o.ca_file.empty())
        hint = absl::StrCat("is --rdzv-conf cacert=", o.ca_file, " the CA that signed etcd's certificate?");
      else
        hint = "the system's CA store does not trust it: give the CA that signed etcd's certificate with --rdzv-conf "
               "cacert=...";
      return absl::FailedPreconditionError(
          absl::StrCat(at, "TLS handshake failed: ", what, " (", why.empty() ? "" : why + "; ", hint, ")"));
    }
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
    case SSL_R_RECORD_LENGTH_MISMATCH:
    case SSL_R_UNKNOWN_PROTOCOL:
      return absl::FailedPreconditionError(absl::StrCat(at, c.stage(), ": ", what, " (", ep.Text(),
                                                        " does not answer in TLS: is it plain HTTP? then use http:// "
                                                        "or --rdzv-conf protocol=http)"));
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
    case SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE:
      return absl::FailedPreconditionError(absl::StrCat(
          at, "etcd refused the TLS connection: ", what, " (",
          o.cert_file.empty() ? "etcd asks for a client certificate: give --rdzv-conf cert=...,key=..."
                              : absl::StrCat("is --rdzv-conf cert=", o.cert_file,
                                             " signed by a CA etcd trusts (its --trusted-ca-file) and still valid?"),
          ")"));
    default:
      return absl::UnavailableError(absl::StrCat(at, c.stage(), ": TLS: ", what));
  }
}

std::string ToJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

absl::Status FromJson(const std::string& json, google::protobuf::Message* m, const std::string& what) {
  google::protobuf::util::JsonParseOptions o;
  o.ignore_unknown_fields = true;
  auto s = google::protobuf::util::JsonStringToMessage(json, m, o);
  if (!s.ok())
    return absl::DataLossError(absl::StrCat(what, ": the answer is not the JSON expected (", s.ToString(), "): ",
                                            json.substr(0, 200)));
  return absl::OkStatus();
}

}  // namespace

std::string EtcdEndpointNames(const std::vector<std::string>& endpoints) {
  std::vector<std::string> names;
  for (const std::string& e : endpoints) {
    absl::StatusOr<Endpoint> ep = ParseEndpoint(e);
    names.push_back(ep.ok() ? ep->Text() : e);
  }
  return absl::StrJoin(names, ", ");
}

absl::StatusOr<std::vector<std::string>> ParseEtcdEndpoints(const std::string& text) {
  std::vector<Endpoint> parsed;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    auto ep = ParseEndpoint(part);
    if (!ep.ok()) return ep.status();
    parsed.push_back(*ep);
  }
  if (parsed.empty()) return absl::InvalidArgumentError("no etcd endpoint given (host:port[,host:port...])");
  if (absl::Status s = CheckOneProtocol(parsed, /*tls_asked=*/false); !s.ok()) return s;
  std::vector<std::string> out;
  for (const Endpoint& e : parsed) out.push_back(e.Url());
  return out;
}

struct EtcdClient::Impl {
  EtcdOptions options;
  std::vector<Endpoint> endpoints;
  size_t current = 0;
  std::string token;
  std::unique_ptr<ssl::context> tls;  // null: plain HTTP
  std::mutex mu;  // one exchange at a time: the io_context is not shared between threads
  asio::io_context ioc;
  std::unique_ptr<Connection> kept;  // the calls' connection, open while etcd keeps it (not the watches')
  size_t kept_at = 0;                // to endpoints[kept_at]
  bool kept_alive = false;           // the last answer allows another request on its connection

  struct Reply {
    int http_status = 0;
    std::string body;
  };

  // Runs the io_context until `finished()`, the deadline or `cancelled()`
  // (checked every 100 ms). True when `finished()`. Then closes the connection
  // and runs the handlers that cancels, which refer to the caller's frame;
  // with `keep`, a finished exchange leaves it open for the next one instead
  // (its timer disarmed, nothing left in flight).
  // `look`, when given, is called first at once, after each handler, and at
  // the time it returned last, on this thread.
  bool RunUntil(Connection& c, const std::function<bool()>& finished, Clock::time_point deadline,
                const std::function<bool()>& cancelled = {}, bool keep = false,
                const std::function<Clock::time_point()>& look = {}) {
    ioc.restart();
    Clock::time_point next_look = look ? Clock::now() : Clock::time_point::max();
    while (!finished() && Clock::now() < deadline && !(cancelled && cancelled())) {
      if (Clock::now() >= next_look) {
        next_look = look();
        continue;
      }
      const size_t ran = ioc.run_one_until(std::min({deadline, next_look, Clock::now() + std::chrono::milliseconds(100)}));
      if (ran > 0 && look) next_look = Clock::now();  // a handler may have changed what `look` wants
      if (ioc.stopped()) ioc.restart();
    }
    const bool done = finished();
    if (done && keep) {
      c.Tcp().expires_never();
      ioc.restart();
      ioc.poll();
      return true;
    }
    c.Close();
    ioc.restart();
    ioc.run();
    return done;
  }

  http::request<http::string_body> Request(const Endpoint& ep, const std::string& target, const std::string& body) {
    http::request<http::string_body> req{http::verb::post, target, 11};
    req.set(http::field::host, ep.Text());
    req.set(http::field::content_type, "application/json");
    if (!token.empty()) req.set(http::field::authorization, token);
    req.body() = body;
    req.prepare_payload();
    return req;
  }

  // One POST to endpoint `i`, on the connection kept from the call before
  // when it went there (HTTP/1.1 keep-alive: no TCP connect, no TLS handshake,
  // no socket for etcd to accept and tear down per call), else on a new one.
  absl::StatusOr<Reply> Exchange(size_t i, const std::string& target, const std::string& body,
                                 Clock::time_point deadline) {
    if (kept != nullptr && kept_at == i) {
      bool unanswered = false;
      absl::StatusOr<Reply> r = ExchangeOn(*kept, endpoints[i], /*open=*/false, target, body, deadline, &unanswered);
      if (r.ok() && kept_alive) return r;
      kept.reset();
      // etcd had closed the idle connection before it took this request: once more, on a new one.
      if (r.ok() || !unanswered) return r;
    }
    kept = std::make_unique<Connection>(ioc, tls.get());
    kept_at = i;
    bool unanswered = false;
    absl::StatusOr<Reply> r = ExchangeOn(*kept, endpoints[i], /*open=*/true, target, body, deadline, &unanswered);
    if (!r.ok() || !kept_alive) kept.reset();
    return r;
  }

  // The request and its answer on `c`, opened first when `open`. Sets
  // `unanswered` when the connection turned out closed before a byte of an
  // answer came (a kept one that etcd let go), and `kept_alive` when the
  // connection may carry the next call.
  absl::StatusOr<Reply> ExchangeOn(Connection& c, const Endpoint& ep, bool open, const std::string& target,
                                   const std::string& body, Clock::time_point deadline, bool* unanswered) {
    http::request<http::string_body> req = Request(ep, target, body);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    beast::error_code ec;
    bool done = false;
    size_t answered = 0;
    auto fail = [&](beast::error_code e) {
      ec = e;
      done = true;
    };
    auto exchange = [&] {
      c.set_stage("sending");
      c.Visit([&](auto& s) {
        // The handlers run after Visit returns: they hold the stream itself, not Visit's parameter.
        http::async_write(s, req, [&, &stream = s](beast::error_code e2, size_t) {
          if (e2) return fail(e2);
          c.set_stage("waiting for the answer");
          http::async_read(stream, buffer, res, [&](beast::error_code e3, size_t n) {
            answered = n;
            fail(e3);
          });
        });
      });
    };
    kept_alive = false;
    c.Tcp().expires_at(deadline);  // the connect, the handshake, the write and the read
    if (open) {
      c.AsyncOpen(ep, [&](beast::error_code e) {
        if (e) return fail(e);
        exchange();
      });
    } else {
      exchange();
    }
    if (!RunUntil(c, [&] { return done; }, deadline, {}, /*keep=*/true)) {
      return absl::DeadlineExceededError(absl::StrCat(ep.Text(), ": no answer in time (", c.stage(), ")"));
    }
    if (ec) {
      c.Close();  // a kept connection that failed is not used again
      *unanswered = answered == 0 && buffer.size() == 0 &&
                    (ec == http::error::end_of_stream || ec == asio::error::eof ||
                     ec == asio::error::connection_reset || ec == asio::error::broken_pipe ||
                     ec == ssl::error::stream_truncated);
      return ConnectionError(ep, "", c, ec, options);
    }
    kept_alive = res.keep_alive();
    return Reply{static_cast<int>(res.result_int()), std::move(res.body())};
  }

  // The gateway's error answer as a status (gRPC codes are absl's).
  static absl::Status GatewayStatus(const Endpoint& ep, const Reply& r) {
    etcd::GatewayError e;
    std::string message = r.body.substr(0, 300);
    int code = static_cast<int>(absl::StatusCode::kUnknown);
    if (FromJson(r.body, &e, "error").ok()) {
      if (!e.message().empty()) message = e.message();
      else if (!e.error().empty()) message = e.error();
      if (e.code() > 0 && e.code() <= 16) code = e.code();
    }
    if (r.http_status == 400 && absl::StrContains(r.body, "HTTPS server")) {  // Go's answer to plain HTTP on TLS
      return absl::FailedPreconditionError(
          absl::StrCat(ep.Text(), ": HTTP 400: ", absl::StripAsciiWhitespace(message),
                       " (etcd there speaks TLS: use https:// or --rdzv-conf protocol=https,cacert=...)"));
    }
    return absl::Status(static_cast<absl::StatusCode>(code),
                        absl::StrCat(ep.Text(), ": HTTP ", r.http_status, ": ", message));
  }

  absl::Status Authenticate(Clock::time_point deadline) {
    token.clear();
    etcd::AuthenticateRequest a;
    a.set_name(options.user);
    a.set_password(options.password);
    auto reply = PostRaw("/v3/auth/authenticate", ToJson(a), deadline, /*auth=*/false);
    if (!reply.ok())
      return absl::Status(reply.status().code(), absl::StrCat("etcd authentication as user '", options.user,
                                                               "' failed: ", reply.status().message()));
    etcd::AuthenticateResponse r;
    if (absl::Status s = FromJson(*reply, &r, "/v3/auth/authenticate"); !s.ok()) return s;
    token = r.token();
    return absl::OkStatus();
  }

  // POST to the current endpoint, going on to the others while they cannot
  // be reached (or have no leader). Returns the 200 answer's body.
  absl::StatusOr<std::string> PostRaw(const std::string& target, const std::string& body, Clock::time_point deadline,
                                      bool auth = true) {
    std::vector<std::string> tried;
    bool all_refused = true;  // by a TLS setup that cannot work (FailedPrecondition), not by an outage
    for (size_t n = 0; n < endpoints.size(); ++n) {
      const size_t i = (current + n) % endpoints.size();
      const auto now = Clock::now();
      if (now >= deadline) break;
      // Each endpoint left gets its share of the time (at least a second, if there is that much).
      const auto share = (deadline - now) / static_cast<int64_t>(endpoints.size() - n);
      const auto until = std::min(deadline, now + std::max<Clock::duration>(share, std::chrono::seconds(1)));
      absl::StatusOr<Reply> r = Exchange(i, target, body, until);
      if (!r.ok()) {
        tried.push_back(std::string(r.status().message()));
        all_refused = all_refused && r.status().code() == absl::StatusCode::kFailedPrecondition;
        continue;
      }
      if (r->http_status == 200) {
        current = i;
        return std::move(r->body);
      }
      absl::Status s = GatewayStatus(endpoints[i], *r);
      if (auth && !options.user.empty() && absl::StrContains(s.message(), "invalid auth token")) {
        if (absl::Status a = Authenticate(deadline); !a.ok()) return a;
        return PostRaw(target, body, deadline, /*auth=*/false);
      }
      if (s.code() == absl::StatusCode::kUnavailable) {  // e.g. "etcdserver: no leader": another member may do
        tried.push_back(std::string(s.message()));
        all_refused = false;
        continue;
      }
      current = i;
      return s;
    }
    return absl::Status(
        all_refused && !tried.empty() ? absl::StatusCode::kFailedPrecondition : absl::StatusCode::kUnavailable,
        absl::StrCat("etcd at ", Names(), ": ", target, " failed on every endpoint (",
                     tried.empty() ? "out of time" : absl::StrJoin(tried, "; "), ")"));
  }

  template <typename Response>
  absl::StatusOr<Response> Call(const std::string& target, const google::protobuf::Message& req) {
    std::lock_guard<std::mutex> l(mu);
    auto body = PostRaw(target, ToJson(req), Clock::now() + options.request_timeout);
    if (!body.ok()) return body.status();
    Response resp;
    if (absl::Status s = FromJson(*body, &resp, target); !s.ok()) return s;
    return resp;
  }

  std::string Names() const {
    std::vector<std::string> names;
    for (const auto& e : endpoints) names.push_back(e.Text());
    return absl::StrJoin(names, ", ");
  }
};

EtcdClient::EtcdClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EtcdClient::~EtcdClient() = default;

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Connect(EtcdOptions options) {
  auto impl = std::make_unique<Impl>();
  for (const std::string& e : options.endpoints) {
    auto ep = ParseEndpoint(e);
    if (!ep.ok()) return ep.status();
    impl->endpoints.push_back(*ep);
  }
  if (impl->endpoints.empty()) return absl::InvalidArgumentError("no etcd endpoint given");
  options.tls = options.tls || !options.ca_file.empty() || !options.cert_file.empty() || !options.key_file.empty() ||
                std::any_of(impl->endpoints.begin(), impl->endpoints.end(),
                            [](const Endpoint& e) { return e.scheme == Endpoint::Scheme::kHttps; });
  if (absl::Status s = CheckOneProtocol(impl->endpoints, options.tls); !s.ok()) return s;
  if (options.tls) {
    auto ctx = MakeTlsContext(options);
    if (!ctx.ok()) return ctx.status();
    impl->tls = std::move(*ctx);
  }
  impl->options = std::move(options);
  const auto deadline = Clock::now() + impl->options.request_timeout;
  if (!impl->options.user.empty()) {
    std::lock_guard<std::mutex> l(impl->mu);
    if (absl::Status s = impl->Authenticate(deadline); !s.ok()) return s;
  }
  std::unique_ptr<EtcdClient> c(new EtcdClient(std::move(impl)));
  // Reachable, and the credentials (or none) good enough to read.
  if (auto r = c->Get("\x01flashckpt-probe"); !r.ok()) return r.status();
  return c;
}

std::string EtcdClient::PrefixEnd(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    if (static_cast<unsigned char>(end.back()) < 0xff) {
      end.back() = static_cast<char>(static_cast<unsigned char>(end.back()) + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

absl::StatusOr<etcd::RangeResponse> EtcdClient::Get(std::string_view key, bool prefix) {
  etcd::RangeRequest r;
  r.set_key(std::string(key));
  if (prefix) r.set_range_end(PrefixEnd(key));
  return impl_->Call<etcd::RangeResponse>("/v3/kv/range", r);
}

absl::StatusOr<etcd::PutResponse> EtcdClient::Put(std::string_view key, std::string_view value, int64_t lease) {
  etcd::PutRequest r;
  r.set_key(std::string(key));
  r.set_value(std::string(value));
  r.set_lease(lease);
  return impl_->Call<etcd::PutResponse>("/v3/kv/put", r);
}

absl::StatusOr<etcd::DeleteRangeResponse> EtcdClient::Delete(std::string_view key, bool prefix) {
  etcd::DeleteRangeRequest r;
  r.set_key(std::string(key));
  if (prefix) r.set_range_end(PrefixEnd(key));
  return impl_->Call<etcd::DeleteRangeResponse>("/v3/kv/deleterange", r);
}

absl::StatusOr<etcd::TxnResponse> EtcdClient::Txn(const etcd::TxnRequest& txn) {
  return impl_->Call<etcd::TxnResponse>("/v3/kv/txn", txn);
}

absl::StatusOr<int64_t> EtcdClient::GrantLease(int64_t ttl_s) {
  etcd::LeaseGrantRequest r;
  r.set_ttl(ttl_s);
  auto g = impl_->Call<etcd::LeaseGrantResponse>("/v3/lease/grant", r);
  if (!g.ok()) return g.status();
  if (!g->error().empty() || g->id() == 0)
    return absl::InternalError(absl::StrCat("etcd at ", impl_->Names(), ": lease grant: ", g->error()));
  return g->id();
}

absl::StatusOr<int64_t> EtcdClient::KeepAlive(int64_t lease) {
  etcd::LeaseKeepAliveRequest r;
  r.set_id(lease);
  auto k = impl_->Call<etcd::LeaseKeepAliveResult>("/v3/lease/keepalive", r);
  if (!k.ok()) return k.status();
  if (k->result().ttl() <= 0)
    return absl::NotFoundError(absl::StrCat("etcd at ", impl_->Names(), ": lease ", lease, " has expired"));
  return k->result().ttl();
}

absl::Status EtcdClient::RevokeLease(int64_t lease) {
  etcd::LeaseRevokeRequest r;
  r.set_id(lease);
  return impl_->Call<etcd::LeaseRevokeResponse>("/v3/lease/revoke", r).status();
}

absl::StatusOr<std::vector<etcd::Event>> EtcdClient::Watch(std::string_view key, bool prefix, int64_t start_revision,
                                                           Clock::time_point deadline,
                                                           const std::function<bool()>& cancelled) {
  std::vector<etcd::Event> events;
  absl::Status s = WatchEach(key, prefix, start_revision, deadline, cancelled, [&](std::vector<etcd::Event>& batch) {
    events = std::move(batch);
    return false;  // the first batch is the answer
  });
  if (!s.ok()) return s;
  return events;
}

absl::Status EtcdClient::WatchEach(std::string_view key, bool prefix, int64_t start_revision,
                                   Clock::time_point deadline, const std::function<bool()>& cancelled,
                                   const std::function<bool(std::vector<etcd::Event>&)>& on_events,
                                   const std::function<std::optional<Clock::time_point>()>& look) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> l(m.mu);
  etcd::WatchRequest w;
  w.mutable_create_request()->set_key(std::string(key));
  if (prefix) w.mutable_create_request()->set_range_end(PrefixEnd(key));
  w.mutable_create_request()->set_start_revision(start_revision);
  const std::string body = ToJson(w);
  const Endpoint ep = m.endpoints[m.current];
  Connection c(m.ioc, m.tls.get());
  http::request<http::string_body> req = m.Request(ep, "/v3/watch", body);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(boost::none);
  beast::error_code ec;
  bool failed = false, header = false, stopped = false;
  std::vector<etcd::Event> events;
  absl::Status error;
  size_t parsed = 0;
  auto fail = [&](beast::error_code e) {
    ec = e;
    failed = true;
  };
  auto take_lines = [&] {
    std::string& b = parser.get().body();
    for (size_t nl; (nl = b.find('\n', parsed)) != std::string::npos; parsed = nl + 1) {
      etcd::WatchStreamMessage msg;
      const std::string line = b.substr(parsed, nl - parsed);
      if (absl::StripAsciiWhitespace(line).empty()) continue;
      if (absl::Status s = FromJson(line, &msg, "/v3/watch"); !s.ok()) {
        error = s;
        return;
      }
      if (msg.has_error()) {
        error = absl::UnavailableError(absl::StrCat(ep.Text(), ": watch: ", msg.error().message()));
        return;
      }
      const etcd::WatchResponse& r = msg.result();
      if (r.canceled()) {
        error = r.compact_revision() > 0
                    ? absl::OutOfRangeError(absl::StrCat(ep.Text(), ": watch from revision ", start_revision,
                                                         ": compacted (the oldest kept is ", r.compact_revision(), ")"))
                    : absl::AbortedError(absl::StrCat(ep.Text(), ": watch canceled: ", r.cancel_reason()));
        return;
      }
      for (const auto& e : r.events()) events.push_back(e);
    }
    // What was read goes: a stream kept open for minutes must not hold all it ever carried.
    b.erase(0, parsed);
    parsed = 0;
  };
  // Hands what arrived to the caller; false when the watch ends here.
  auto deliver = [&] {
    if (events.empty()) return true;
    stopped = !on_events(events);
    events.clear();
    return !stopped;
  };
  std::function<void()> read_more;
  c.Tcp().expires_never();  // the watch's deadline is the loop's below
  c.AsyncOpen(ep, [&](beast::error_code e) {
    if (e) return fail(e);
    KeepProbing(c.Tcp().socket());
    c.set_stage("sending");
    c.Visit([&](auto& s) {
      // The handlers run after Visit returns: they hold the stream itself, not Visit's parameter.
      read_more = [&, &stream = s] {
        http::async_read_some(stream, buffer, parser, [&](beast::error_code e4, size_t) {
          if (e4) return fail(e4);
          take_lines();
          if (!error.ok() || !deliver() || parser.is_done()) return;
          read_more();
        });
      };
      http::async_write(s, req, [&, &stream = s](beast::error_code e2, size_t) {
        if (e2) return fail(e2);
        c.set_stage("waiting for the answer");
        http::async_read_header(stream, buffer, parser, [&](beast::error_code e3, size_t) {
          if (e3) return fail(e3);
          header = true;
          if (parser.get().result_int() != 200) {
            failed = true;
            return;
          }
          c.set_stage("watching");
          read_more();
        });
      });
    });
  });
  auto finished = [&] { return failed || !error.ok() || stopped || parser.is_done(); };
  // Closing the connection at the end ends the watch on the server too.
  std::function<Clock::time_point()> timed;
  if (look)
    timed = [&] {
      const std::optional<Clock::time_point> next = look();
      if (!next) stopped = true;
      return next.value_or(Clock::time_point::max());
    };
  // the deadline or `cancelled`
  const bool ended_here = !m.RunUntil(c, finished, deadline, cancelled, /*keep=*/false, timed);
  if (!error.ok()) return error;
  if (stopped || ended_here) return absl::OkStatus();
  // An error answer; a stream cut after its 200 header is a connection error (the member went away).
  if (failed && header && parser.get().result_int() != 200)
    return Impl::GatewayStatus(ep, Impl::Reply{static_cast<int>(parser.get().result_int()), parser.get().body()});
  if (failed) {
    m.current = (m.current + 1) % m.endpoints.size();  // the next call tries another member
    return ConnectionError(ep, "watch", c, ec, m.options);
  }
  return absl::OkStatus();  // the server ended the watch
}

std::string EtcdClient::Describe() const { return absl::StrCat("etcd at ", impl_->Names()); }

}  // namespace flashckpt::rendezvous
