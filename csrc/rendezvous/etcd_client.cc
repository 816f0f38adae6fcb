#include "rendezvous/etcd_client.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <mutex>

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
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

struct Endpoint {
  std::string host, port;
  std::string Text() const { return absl::StrCat(host, ":", port); }
};

absl::StatusOr<Endpoint> ParseEndpoint(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  if (absl::ConsumePrefix(&t, "https://"))
    return absl::UnimplementedError(absl::StrCat("etcd endpoint ", text, ": TLS (https) is not supported yet"));
  absl::ConsumePrefix(&t, "http://");
  absl::ConsumeSuffix(&t, "/");
  const size_t colon = t.rfind(':');
  int port = 0;
  if (colon == absl::string_view::npos || colon == 0 || !absl::SimpleAtoi(t.substr(colon + 1), &port) || port < 1 ||
      port > 65535)
    return absl::InvalidArgumentError(
        absl::StrCat("etcd endpoint '", text, "' is not host:port (e.g. 127.0.0.1:2379 or http://etcd-0:2379)"));
  return Endpoint{std::string(t.substr(0, colon)), std::to_string(port)};
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

absl::StatusOr<std::vector<std::string>> ParseEtcdEndpoints(const std::string& text) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    auto ep = ParseEndpoint(part);
    if (!ep.ok()) return ep.status();
    out.push_back(ep->Text());
  }
  if (out.empty()) return absl::InvalidArgumentError("no etcd endpoint given (host:port[,host:port...])");
  return out;
}

struct EtcdClient::Impl {
  EtcdOptions options;
  std::vector<Endpoint> endpoints;
  size_t current = 0;
  std::string token;
  std::mutex mu;  // one exchange at a time: the io_context is not shared between threads
  asio::io_context ioc;

  struct Reply {
    int http_status = 0;
    std::string body;
  };

  // Runs the io_context until `done` or the deadline; then cancels what is left.
  bool RunUntil(beast::tcp_stream& stream, tcp::resolver& resolver, const bool& done, Clock::time_point deadline) {
    ioc.restart();
    while (!done && Clock::now() < deadline) {
      ioc.run_one_until(deadline);
      if (ioc.stopped()) ioc.restart();
    }
    if (!done) {
      resolver.cancel();
      beast::error_code ignored;
      stream.socket().close(ignored);
      ioc.restart();
      ioc.run();  // the cancelled handlers, which refer to this frame
      return false;
    }
    return true;
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

  // One POST to one endpoint (a fresh connection).
  absl::StatusOr<Reply> Exchange(const Endpoint& ep, const std::string& target, const std::string& body,
                                 Clock::time_point deadline) {
    beast::tcp_stream stream(ioc);
    tcp::resolver resolver(ioc);
    http::request<http::string_body> req = Request(ep, target, body);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    beast::error_code ec;
    bool done = false;
    std::string stage = "resolving";
    stream.expires_at(deadline);
    resolver.async_resolve(ep.host, ep.port, [&](beast::error_code e, tcp::resolver::results_type results) {
      if (e) {
        ec = e;
        done = true;
        return;
      }
      stage = "connecting";
      stream.async_connect(results, [&](beast::error_code e2, const tcp::endpoint&) {
        if (e2) {
          ec = e2;
          done = true;
          return;
        }
        stage = "sending";
        http::async_write(stream, req, [&](beast::error_code e3, size_t) {
          if (e3) {
            ec = e3;
            done = true;
            return;
          }
          stage = "waiting for the answer";
          http::async_read(stream, buffer, res, [&](beast::error_code e4, size_t) {
            ec = e4;
            done = true;
          });
        });
      });
    });
    if (!RunUntil(stream, resolver, done, deadline))
      return absl::DeadlineExceededError(absl::StrCat(ep.Text(), ": no answer in time (", stage, ")"));
    if (ec == beast::error::timeout)
      return absl::DeadlineExceededError(absl::StrCat(ep.Text(), ": no answer in time (", stage, ")"));
    if (ec) return absl::UnavailableError(absl::StrCat(ep.Text(), ": ", stage, ": ", ec.message()));
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
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
    for (size_t n = 0; n < endpoints.size(); ++n) {
      const size_t i = (current + n) % endpoints.size();
      const auto now = Clock::now();
      if (now >= deadline) break;
      // Each endpoint left gets its share of the time (at least a second, if there is that much).
      const auto share = (deadline - now) / static_cast<int64_t>(endpoints.size() - n);
      const auto until = std::min(deadline, now + std::max<Clock::duration>(share, std::chrono::seconds(1)));
      absl::StatusOr<Reply> r = Exchange(endpoints[i], target, body, until);
      if (!r.ok()) {
        tried.push_back(std::string(r.status().message()));
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
        continue;
      }
      current = i;
      return s;
    }
    return absl::UnavailableError(absl::StrCat("etcd at ", Names(), ": ", target, " failed on every endpoint (",
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
  Impl& m = *impl_;
  std::lock_guard<std::mutex> l(m.mu);
  etcd::WatchRequest w;
  w.mutable_create_request()->set_key(std::string(key));
  if (prefix) w.mutable_create_request()->set_range_end(PrefixEnd(key));
  w.mutable_create_request()->set_start_revision(start_revision);
  const std::string body = ToJson(w);
  const Endpoint ep = m.endpoints[m.current];
  beast::tcp_stream stream(m.ioc);
  tcp::resolver resolver(m.ioc);
  http::request<http::string_body> req = m.Request(ep, "/v3/watch", body);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(boost::none);
  beast::error_code ec;
  bool failed = false, header = false;
  std::vector<etcd::Event> events;
  absl::Status error;
  size_t parsed = 0;
  std::function<void()> read_more;
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
  };
  read_more = [&] {
    http::async_read_some(stream, buffer, parser, [&](beast::error_code e, size_t) {
      if (e) {
        ec = e;
        failed = true;
        return;
      }
      take_lines();
      if (!error.ok() || !events.empty() || parser.is_done()) return;
      read_more();
    });
  };
  stream.expires_never();
  resolver.async_resolve(ep.host, ep.port, [&](beast::error_code e, tcp::resolver::results_type results) {
    if (e) {
      ec = e;
      failed = true;
      return;
    }
    stream.async_connect(results, [&](beast::error_code e2, const tcp::endpoint&) {
      if (e2) {
        ec = e2;
        failed = true;
        return;
      }
      http::async_write(stream, req, [&](beast::error_code e3, size_t) {
        if (e3) {
          ec = e3;
          failed = true;
          return;
        }
        http::async_read_header(stream, buffer, parser, [&](beast::error_code e4, size_t) {
          if (e4) {
            ec = e4;
            failed = true;
            return;
          }
          header = true;
          if (parser.get().result_int() != 200) {
            failed = true;
            return;
          }
          read_more();
        });
      });
    });
  });
  m.ioc.restart();
  auto finished = [&] { return failed || !error.ok() || !events.empty() || parser.is_done(); };
  while (!finished() && Clock::now() < deadline && !(cancelled && cancelled())) {
    m.ioc.run_one_for(std::chrono::milliseconds(100));
    if (m.ioc.stopped()) m.ioc.restart();
  }
  const bool ended_here = !finished();  // the deadline or `cancelled`, not the server
  resolver.cancel();
  beast::error_code ignored;
  stream.socket().close(ignored);  // ends the watch on the server too
  m.ioc.restart();
  m.ioc.run();
  if (!error.ok()) return error;
  if (!events.empty() || ended_here) return events;
  if (failed && header)
    return Impl::GatewayStatus(ep, Impl::Reply{static_cast<int>(parser.get().result_int()), parser.get().body()});
  if (failed) {
    m.current = (m.current + 1) % m.endpoints.size();  // the next call tries another member
    return absl::UnavailableError(absl::StrCat(ep.Text(), ": watch: ", ec.message()));
  }
  return events;  // none before the deadline, or cancelled
}

std::string EtcdClient::Describe() const { return absl::StrCat("etcd at ", impl_->Names()); }

}  // namespace flashckpt::rendezvous
