#include "rendezvous/rendezvous_server.h"

#include <list>
#include <thread>

#include <boost/asio.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "rendezvous/key_value_store.h"

namespace flashckpt::rendezvous {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

constexpr size_t kMaxConnections = 4096;

bool TokensEqual(const std::string& a, const std::string& b) {
  // Constant time in the length of the expected token.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < b.size(); ++i) {
    diff |= static_cast<unsigned char>(b[i] ^ (i < a.size() ? a[i] : 0));
  }
  return diff == 0;
}

}  // namespace

class RendezvousServer::Impl {
 public:
  explicit Impl(RendezvousServerOptions options)
      : options_(std::move(options)), state_(options_.round), acceptor_(io_), tick_timer_(io_) {}

  absl::Status Bind() {
    boost::system::error_code ec;
    const asio::ip::address address = asio::ip::make_address(options_.bind_host, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "rendezvous server: '%s' is not an IP address to bind: %s", options_.bind_host, ec.message()));
    }
    const tcp::endpoint endpoint(address, options_.port);
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(absl::StrFormat("rendezvous server: cannot listen on %s:%d: %s",
                                                    options_.bind_host, options_.port, ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    return absl::OkStatus();
  }

  void Run() {
    Accept();
    Tick();
    thread_ = std::thread([this] { io_.run(); });
  }

  void Stop() {
    asio::post(io_, [this] {
      boost::system::error_code ec;
      acceptor_.close(ec);
      tick_timer_.cancel();
      for (auto& s : sessions_) s->Close();
      sessions_.clear();
      io_.stop();
    });
    if (thread_.joinable()) thread_.join();
  }

  uint16_t port() const { return port_; }
  const std::string& host() const { return options_.bind_host; }
  const RendezvousServerCounters& counters() const { return counters_; }

 private:
  struct Session : std::enable_shared_from_this<Session> {
    Session(Impl* server, tcp::socket socket)
        : server(server), socket(std::move(socket)), body_timer(server->io_) {}
    Impl* server;
    tcp::socket socket;
    asio::steady_timer body_timer;
    char header[kFrameHeaderBytes];
    std::string body;
    std::string outgoing;
    bool closed = false;
    // A parked long poll: answered when there is news or at the deadline.
    bool parked = false;
    Request parked_request;
    SteadyTime parked_deadline;

    void Close() {
      if (closed) return;
      closed = true;
      boost::system::error_code ec;
      body_timer.cancel();
      socket.shutdown(tcp::socket::shutdown_both, ec);
      socket.close(ec);
    }

    void ReadHeader() {
      auto self = shared_from_this();
      asio::async_read(socket, asio::buffer(header, kFrameHeaderBytes),
                       [self](boost::system::error_code ec, size_t) {
                         if (ec) return self->Close();
                         self->OnHeader();
                       });
    }

    void OnHeader() {
      absl::StatusOr<uint32_t> length =
          DecodeFrameHeader(std::string_view(header, kFrameHeaderBytes), server->options_.max_frame_bytes);
      if (!length.ok()) {
        ++server->counters_.frames_rejected;
        Response response;
        response.set_code(Response::BAD_REQUEST);
        response.set_error(std::string(length.status().message()));
        return SendAndClose(response);
      }
      body.resize(*length);
      auto self = shared_from_this();
      body_timer.expires_after(server->options_.read_timeout);
      body_timer.async_wait([self](boost::system::error_code ec) {
        if (!ec) {
          ++self->server->counters_.frames_rejected;
          self->Close();  // a frame started and never finished
        }
      });
      asio::async_read(socket, asio::buffer(body.data(), body.size()),
                       [self](boost::system::error_code ec, size_t) {
                         self->body_timer.cancel();
                         if (ec) return self->Close();
                         self->server->OnRequest(self);
                       });
    }

    void Send(const Response& response, bool close_after) {
      outgoing = EncodeFrame(response);
      auto self = shared_from_this();
      asio::async_write(socket, asio::buffer(outgoing),
                        [self, close_after](boost::system::error_code ec, size_t) {
                          if (ec || close_after) return self->Close();
                          self->ReadHeader();
                        });
    }
    void SendAndClose(const Response& response) { Send(response, /*close_after=*/true); }
  };

  void Accept() {
    acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec && sessions_.size() >= kMaxConnections) {
        // Agents hold two connections each; this many means a misbehaving peer.
        ++counters_.frames_rejected;
        boost::system::error_code ignored;
        socket.close(ignored);
      } else if (!ec) {
        ++counters_.connections_accepted;
        boost::system::error_code ignored;
        socket.set_option(tcp::no_delay(true), ignored);
        auto session = std::make_shared<Session>(this, std::move(socket));
        sessions_.push_back(session);
        session->ReadHeader();
      }
      Accept();
    });
  }

  void Tick() {
    tick_timer_.expires_after(std::chrono::milliseconds(10));
    tick_timer_.async_wait([this](boost::system::error_code ec) {
      if (ec) return;
      state_.Advance(std::chrono::steady_clock::now());
      AnswerParked();
      sessions_.remove_if([](const std::shared_ptr<Session>& s) { return s->closed; });
      Tick();
    });
  }

  void OnRequest(const std::shared_ptr<Session>& session) {
    absl::StatusOr<Request> request = ParseRequest(session->body);
    Response response;
    if (!request.ok()) {
      ++counters_.frames_rejected;
      response.set_code(Response::BAD_REQUEST);
      response.set_error(std::string(request.status().message()));
      return session->SendAndClose(response);
    }
    if (!options_.token.empty() && !TokensEqual(request->token(), options_.token)) {
      ++counters_.frames_rejected;
      response.set_code(Response::UNAUTHENTICATED);
      response.set_error("wrong or missing rendezvous token");
      return session->SendAndClose(response);
    }
    if (!options_.run_id.empty() && request->run_id() != options_.run_id) {
      ++counters_.frames_rejected;
      response.set_code(Response::WRONG_RUN);
      response.set_error(absl::StrFormat("this server serves run '%s', not '%s'", options_.run_id,
                                         request->run_id()));
      return session->SendAndClose(response);
    }
    ++counters_.requests_served;
    const SteadyTime now = std::chrono::steady_clock::now();
    const uint64_t version_before = state_.version();
    bool park = false;
    switch (request->body_case()) {
      case Request::kJoin:
        state_.Join(request->join().node(), now);
        *response.mutable_round() = state_.ViewFor(request->join().node().node_id());
        break;
      case Request::kSync: {
        const SyncRequest& sync = request->sync();
        state_.KeepAlive(sync.node_id(), now);
        if (sync.wait_ms() > 0 && !state_.HasNewsFor(sync.node_id(), sync.known_round())) {
          park = true;
          session->parked_deadline = now + std::chrono::milliseconds(sync.wait_ms());
        } else {
          *response.mutable_round() = state_.ViewFor(sync.node_id());
        }
        break;
      }
      case Request::kLeave:
        state_.Leave(request->leave().node_id(), now);
        break;
      case Request::kStoreSet:
        store_.Set(request->store_set().key(), request->store_set().value());
        ++store_version_;
        break;
      case Request::kStoreGet: {
        std::optional<std::string> value = store_.Get(request->store_get().key());
        if (value) {
          response.set_value(*value);
        } else if (request->store_get().wait_ms() > 0) {
          park = true;
          session->parked_deadline = now + std::chrono::milliseconds(request->store_get().wait_ms());
        } else {
          response.set_code(Response::NOT_FOUND);
          response.set_error(absl::StrFormat("key '%s' is not set", request->store_get().key()));
        }
        break;
      }
      case Request::kStoreAdd:
        response.set_counter(store_.Add(request->store_add().key(), request->store_add().delta()));
        ++store_version_;
        break;
      case Request::kStoreDelete:
        response.set_counter(static_cast<int64_t>(
            store_.Delete(request->store_delete().key(), request->store_delete().range_end())));
        ++store_version_;
        break;
      default:
        break;
    }
    counters_.store_keys = store_.size();
    if (park) {
      session->parked = true;
      session->parked_request = std::move(*request);
    } else {
      session->Send(response, /*close_after=*/false);
    }
    if (state_.version() != version_before || park == false) AnswerParked();
  }

  // Answers every parked poll that has news or whose wait is over.
  void AnswerParked() {
    const SteadyTime now = std::chrono::steady_clock::now();
    for (auto& s : sessions_) {
      if (!s->parked || s->closed) continue;
      const Request& r = s->parked_request;
      Response response;
      bool answer = now >= s->parked_deadline;
      if (r.has_sync()) {
        if (state_.HasNewsFor(r.sync().node_id(), r.sync().known_round())) answer = true;
        if (answer) {
          state_.KeepAlive(r.sync().node_id(), now);
          *response.mutable_round() = state_.ViewFor(r.sync().node_id());
        }
      } else if (r.has_store_get()) {
        std::optional<std::string> value = store_.Get(r.store_get().key());
        if (value) {
          response.set_value(*value);
          answer = true;
        } else if (answer) {
          response.set_code(Response::TIMEOUT);
          response.set_error(absl::StrFormat("key '%s' was not set within %d ms", r.store_get().key(),
                                             r.store_get().wait_ms()));
        }
      }
      if (answer) {
        s->parked = false;
        s->Send(response, /*close_after=*/false);
      }
    }
  }

  RendezvousServerOptions options_;
  RoundState state_;
  KeyValueStore store_;
  uint64_t store_version_ = 0;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  asio::steady_timer tick_timer_;
  std::list<std::shared_ptr<Session>> sessions_;  // parked ones have no pending handler
  std::thread thread_;
  uint16_t port_ = 0;
  RendezvousServerCounters counters_;
};

absl::StatusOr<std::unique_ptr<RendezvousServer>> RendezvousServer::Start(
    RendezvousServerOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  if (absl::Status bound = impl->Bind(); !bound.ok()) return bound;
  impl->Run();
  return std::unique_ptr<RendezvousServer>(new RendezvousServer(std::move(impl)));
}

RendezvousServer::RendezvousServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RendezvousServer::~RendezvousServer() { impl_->Stop(); }
uint16_t RendezvousServer::port() const { return impl_->port(); }
const std::string& RendezvousServer::host() const { return impl_->host(); }
const RendezvousServerCounters& RendezvousServer::counters() const { return impl_->counters(); }

}  // namespace flashckpt::rendezvous
