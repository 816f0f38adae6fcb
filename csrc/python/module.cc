// flashckpt._C: the Python binding of the C++ core. All bindings live in this
// file. It links flashckpt_core only, never libtorch: the Python layer hands
// over raw pointers, sizes, dtype names and device ordinals, so one build serves
// PyTorch 1.13 and 2.x. Every call that can block (copy, I/O, waits) releases
// the GIL; flashckpt::Error becomes one of the classes of flashckpt.errors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <tuple>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "flashckpt/checkpointer.h"
#include "flashckpt/config.h"
#include "flashckpt/errors.h"
#include "flashckpt/log.h"

namespace py = pybind11;

namespace flashckpt {
namespace {

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case ErrorCode::kNotFound: return "NOT_FOUND";
    case ErrorCode::kCorruption: return "CORRUPTION";
    case ErrorCode::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case ErrorCode::kPermissionDenied: return "PERMISSION_DENIED";
    case ErrorCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case ErrorCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case ErrorCode::kUnavailable: return "UNAVAILABLE";
    case ErrorCode::kInternal: return "INTERNAL";
  }
  return "INTERNAL";
}

// Raises flashckpt.errors.<class for code>(message). Falls back to
// RuntimeError if the Python package cannot be imported (bare _C use).
void RaiseError(const Error& e) {
  try {
    py::object cls = py::module_::import("flashckpt.errors").attr("error_class")(
        ErrorCodeName(e.code()));
    PyErr_SetString(cls.ptr(), e.what());
  } catch (py::error_already_set&) {
    PyErr_Clear();
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

// A loaded step as Python sees it: metadata plus the buffer protocol over the
// one data buffer, so torch.frombuffer(snapshot, ...) wraps tensors without a
// copy and keeps the snapshot alive for as long as any such tensor lives.
TensorRef HostTensorRef(std::string key, uintptr_t data, uint64_t nbytes, std::string dtype,
                        std::vector<int64_t> shape, uint32_t element_size, bool replicated) {
  TensorRef r;
  r.key = std::move(key);
  r.data = reinterpret_cast<const void*>(data);
  r.nbytes = nbytes;
  r.dtype = std::move(dtype);
  r.shape = std::move(shape);
  r.element_size = element_size;
  r.replicated = replicated;
  return r;
}

struct PySnapshot {
  std::unique_ptr<LoadedSnapshot> snap;
};

py::dict TensorInfoToDict(const TensorInfo& t, const void* base) {
  py::dict d;
  d["key"] = t.key;
  d["dtype"] = t.dtype;
  d["shape"] = t.shape;
  d["strides"] = t.strides;
  d["storage_offset"] = t.storage_offset;
  d["storage_key"] = t.storage_key;
  d["element_size"] = t.element_size;
  d["nbytes"] = t.nbytes;
  d["crc32c"] = t.crc32c;
  d["replicated"] = t.replicated;
  if (!t.global_shape.empty()) {
    d["global_shape"] = t.global_shape;
    d["global_offset"] = t.global_offset;
  }
  if (t.data != nullptr && base != nullptr) {
    d["offset"] = static_cast<int64_t>(static_cast<const char*>(t.data) -
                                       static_cast<const char*>(base));
  } else {
    d["offset"] = py::none();
  }
  return d;
}

// The core's log lines on their way to Python's `logging`: the sink only
// queues (any thread, no GIL), and flashckpt._logging's thread takes them and
// hands them to the `flashckpt` logger. Never freed: core threads may log
// until the process ends.
struct LogQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::tuple<int, std::string, std::string>> lines;
  uint64_t dropped = 0;
};
LogQueue* g_log_queue = new LogQueue;
constexpr size_t kMaxQueuedLines = 10000;

void QueueLogLine(LogLevel level, const std::string& prefix, const std::string& message) {
  LogQueue* q = g_log_queue;
  {
    std::lock_guard<std::mutex> l(q->mu);
    if (q->lines.size() >= kMaxQueuedLines) {
      ++q->dropped;
      return;
    }
    q->lines.emplace_back(static_cast<int>(level), prefix, message);
  }
  q->cv.notify_one();
}

// Up to `timeout_s` for lines; returns (lines, lines dropped since the last call).
std::pair<std::vector<std::tuple<int, std::string, std::string>>, uint64_t> TakeLogLines(double timeout_s) {
  LogQueue* q = g_log_queue;
  std::unique_lock<std::mutex> l(q->mu);
  q->cv.wait_for(l, std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)),
                 [&] { return !q->lines.empty(); });
  std::vector<std::tuple<int, std::string, std::string>> out(std::make_move_iterator(q->lines.begin()),
                                                              std::make_move_iterator(q->lines.end()));
  q->lines.clear();
  uint64_t dropped = q->dropped;
  q->dropped = 0;
  return {std::move(out), dropped};
}

struct PySavePlan {
  std::vector<TensorRef> refs;
};

std::vector<BlobRef> BlobRefs(const py::list& blobs) {
  std::vector<BlobRef> out;
  out.reserve(blobs.size());
  for (const auto& item : blobs) {
    auto t = item.cast<py::tuple>();
    out.push_back(BlobRef{t[0].cast<std::string>(), t[1].cast<std::string>()});
  }
  return out;
}

LoadOptions MakeLoadOptions(std::optional<int64_t> step, bool prefer_memory,
                            bool allow_fallback, bool verify) {
  LoadOptions o;
  o.step = step;
  o.prefer_memory = prefer_memory;
  o.allow_fallback = allow_fallback;
  o.verify = verify;
  return o;
}

}  // namespace
}  // namespace flashckpt

PYBIND11_MODULE(_C, m) {
  using namespace flashckpt;
  m.doc() = "flashckpt core binding (internal: use the flashckpt package)";
  m.attr("__version__") = FLASHCKPT_VERSION;
  m.attr("have_cuda") = static_cast<bool>(FLASHCKPT_HAVE_CUDA);
  m.attr("format_version") = kFormatVersion;
  m.def("prepare_load_buffer", &PrepareLoadBuffer, py::arg("nbytes"), py::call_guard<py::gil_scoped_release>(),
        "Maps and touches (in the background) a buffer for the next load of at most nbytes; 0 releases it.");
  m.def("prepared_load_buffer_bytes", &PreparedLoadBufferBytes);
  m.def("load_device_plugin", &LoadDevicePlugin, py::arg("path"), py::call_guard<py::gil_scoped_release>(),
        "Loads a device backend plugin (include/flashckpt/device_plugin.h); returns the device type it serves.");
  m.def("device_types", &DeviceTypes, "Device types with a loaded backend.");
  m.def(
      "read_committed_step",
      [](const std::string& directory, int64_t step, int rank, int world_size, bool verify) {
        std::unique_ptr<LoadedSnapshot> snap;
        {
          py::gil_scoped_release nogil;
          snap = ReadCommittedStep(directory, step, rank, world_size, verify);
        }
        return std::make_unique<PySnapshot>(PySnapshot{std::move(snap)});
      },
      py::arg("directory"), py::arg("step"), py::arg("rank"), py::arg("world_size"), py::arg("verify") = true,
      "Reads a committed step of one rank from storage without opening the directory for writing.");
  m.def(
      "describe_global_step",
      [](const std::string& directory, int64_t step) {
        StepDescription d;
        {
          py::gil_scoped_release nogil;
          d = DescribeGlobalStep(directory, step);
        }
        py::dict out;
        out["step"] = d.step;
        py::list tensors;
        for (const auto& t : d.tensors) {
          py::dict e = TensorInfoToDict(t, nullptr);
          e["held_by"] = t.held_by;
          tensors.append(e);
        }
        out["tensors"] = tensors;
        py::dict blobs;
        for (const auto& [k, v] : d.blobs) blobs[py::str(k)] = py::bytes(v);
        out["blobs"] = blobs;
        py::list rank_blobs;
        for (const auto& rb : d.rank_blobs) {
          py::dict one;
          for (const auto& [k, v] : rb) one[py::str(k)] = py::bytes(v);
          rank_blobs.append(one);
        }
        out["rank_blobs"] = rank_blobs;
        return out;
      },
      py::arg("directory"), py::arg("step"),
      "Every tensor of every rank of a committed step, with the rank holding it (-1: replicated).");
  m.def(
      "read_global_into",
      [](const std::string& directory, int64_t step, const py::dict& dest, bool verify) {
        std::map<std::string, MutableTensorRef> refs;
        for (const auto& [k, v] : dest) refs.emplace(k.cast<std::string>(), v.cast<const MutableTensorRef&>());
        py::gil_scoped_release nogil;
        ReadGlobalInto(directory, step, refs, verify);
      },
      py::arg("directory"), py::arg("step"), py::arg("dest"), py::arg("verify") = true,
      "Fills LoadTargets from whichever rank's files of a committed step hold each key.");
  m.def(
      "describe_committed_step",
      [](const std::string& directory, int64_t step, int rank, int world_size) {
        StepDescription d;
        {
          py::gil_scoped_release nogil;
          d = DescribeCommittedStep(directory, step, rank, world_size);
        }
        py::dict out;
        out["step"] = d.step;
        py::list tensors;
        for (const auto& t : d.tensors) tensors.append(TensorInfoToDict(t, nullptr));
        out["tensors"] = tensors;
        return out;
      },
      py::arg("directory"), py::arg("step"), py::arg("rank") = 0, py::arg("world_size") = 1,
      "The tensor entries of a committed step of one rank (no tensor bytes read, nothing written).");
  m.def("has_device_backend", &HasDeviceBackend, py::arg("device_type"), py::call_guard<py::gil_scoped_release>(),
        "True when tensors of that device type have a backend (CUDA's is loaded on first use).");
  m.def(
      "route_log",
      [](bool to_python) {
        if (!to_python) {
          SetLogSink(nullptr);
          return;
        }
        SetLogSink(&QueueLogLine);
      },
      py::arg("to_python"), "Core log lines to take_log_lines() (True) or to stderr (False).");
  m.def("take_log_lines", &TakeLogLines, py::arg("timeout"), py::call_guard<py::gil_scoped_release>(),
        "Waits up to timeout seconds for routed log lines: ([(level, prefix, message)], dropped).");
  m.def(
      "after_fork_in_child",
      [] {
        // The parent's queue lock may have been held by a thread that does
        // not exist here: a fresh queue, and stderr until routed again.
        SetLogSink(nullptr);
        g_log_queue = new LogQueue;
      },
      "Resets the log queue in a forked child.");
  m.def(
      "set_log_level", [](int level) { SetLogThreshold(static_cast<LogLevel>(std::clamp(level, 0, 3))); },
      py::arg("level"), "The core's threshold: 0 debug, 1 info, 2 warn, 3 error.");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      RaiseError(e);
    }
  });

  // What save() hands over per tensor, by name on both sides of the binding.
  // The records of a save, kept for the next saves of the same layout
  // (python/flashckpt/_state.py, SavePlan): only their data pointers change.
  py::class_<PySavePlan>(m, "SavePlan")
      .def(py::init([](const py::list& records) {
        PySavePlan p;
        p.refs.reserve(records.size());
        for (const auto& item : records) p.refs.push_back(item.cast<const TensorRef&>());
        return p;
      }))
      .def("__len__", [](const PySavePlan& p) { return p.refs.size(); });
  py::class_<TensorRef>(m, "TensorRecord")
      .def(py::init([](std::string key, uintptr_t data, uint64_t nbytes, std::string dtype, std::vector<int64_t> shape,
                       uint32_t element_size, int device, uintptr_t cuda_stream, std::vector<int64_t> strides,
                       int64_t storage_offset, std::string storage_key, std::string device_type, bool replicated,
                       std::vector<int64_t> global_shape, std::vector<int64_t> global_offset) {
             TensorRef r = HostTensorRef(std::move(key), data, nbytes, std::move(dtype), std::move(shape),
                                         element_size, replicated);
             r.global_shape = std::move(global_shape);
             r.global_offset = std::move(global_offset);
             r.device = device;
             r.cuda_stream = reinterpret_cast<void*>(cuda_stream);
             r.strides = std::move(strides);
             r.storage_offset = storage_offset;
             r.storage_key = std::move(storage_key);
             r.device_type = std::move(device_type);
             return r;
           }),
           py::kw_only(), py::arg("key"), py::arg("data"), py::arg("nbytes"), py::arg("dtype"), py::arg("shape"),
           py::arg("element_size"), py::arg("device") = -1, py::arg("cuda_stream") = 0,
           py::arg("strides") = std::vector<int64_t>{}, py::arg("storage_offset") = 0, py::arg("storage_key") = "",
           py::arg("device_type") = "", py::arg("replicated") = false,
           py::arg("global_shape") = std::vector<int64_t>{}, py::arg("global_offset") = std::vector<int64_t>{})
      // The common case, positional (a save calls it once per tensor): a
      // contiguous tensor in host memory.
      .def_static(
          "host",
          [](std::string key, uintptr_t data, uint64_t nbytes, std::string dtype, std::vector<int64_t> shape,
             uint32_t element_size, bool replicated) {
            TensorRef r = HostTensorRef(std::move(key), data, nbytes, std::move(dtype), std::move(shape),
                                        element_size, replicated);
            r.device_type = "cpu";
            return r;
          })
      .def_readonly("key", &TensorRef::key)
      .def_readonly("replicated", &TensorRef::replicated)
      .def_property_readonly("data", [](const TensorRef& r) { return reinterpret_cast<uintptr_t>(r.data); })
      .def_readonly("nbytes", &TensorRef::nbytes)
      .def_readonly("dtype", &TensorRef::dtype)
      .def_readonly("shape", &TensorRef::shape)
      .def_readonly("element_size", &TensorRef::element_size)
      .def_readonly("device", &TensorRef::device)
      .def_readonly("strides", &TensorRef::strides)
      .def_readonly("storage_offset", &TensorRef::storage_offset)
      .def_readonly("storage_key", &TensorRef::storage_key)
      .def_readonly("device_type", &TensorRef::device_type)
      .def_readonly("global_shape", &TensorRef::global_shape)
      .def_readonly("global_offset", &TensorRef::global_offset)
      .def("__repr__", [](const TensorRef& r) {
        return "<TensorRecord " + r.key + " " + r.dtype + " " + std::to_string(r.nbytes) + " bytes>";
      });
  // A load_into() destination: caller-owned host memory of a tensor.
  py::class_<MutableTensorRef>(m, "LoadTarget")
      .def(py::init([](uintptr_t data, uint64_t nbytes, std::string dtype, std::vector<int64_t> shape,
                       std::string device_type, int device, uintptr_t stream, std::vector<int64_t> global_shape,
                       std::vector<int64_t> global_offset) {
             MutableTensorRef r;
             r.global_shape = std::move(global_shape);
             r.global_offset = std::move(global_offset);
             r.data = reinterpret_cast<void*>(data);
             r.nbytes = nbytes;
             r.dtype = std::move(dtype);
             r.shape = std::move(shape);
             r.device_type = std::move(device_type);
             r.device = device;
             r.stream = reinterpret_cast<void*>(stream);
             return r;
           }),
           py::kw_only(), py::arg("data"), py::arg("nbytes"), py::arg("dtype"), py::arg("shape"),
           py::arg("device_type") = "cpu", py::arg("device") = -1, py::arg("stream") = 0,
           py::arg("global_shape") = std::vector<int64_t>{}, py::arg("global_offset") = std::vector<int64_t>{})
      .def_readonly("global_shape", &MutableTensorRef::global_shape)
      .def_readonly("global_offset", &MutableTensorRef::global_offset)
      .def_readonly("device_type", &MutableTensorRef::device_type)
      .def_readonly("device", &MutableTensorRef::device)
      .def_property_readonly("data", [](const MutableTensorRef& r) { return reinterpret_cast<uintptr_t>(r.data); })
      .def_readonly("nbytes", &MutableTensorRef::nbytes)
      .def_readonly("dtype", &MutableTensorRef::dtype)
      .def_readonly("shape", &MutableTensorRef::shape);

  py::class_<SaveHandle>(m, "SaveHandle")
      .def_property_readonly("step", &SaveHandle::step)
      .def("wait_snapshot", &SaveHandle::wait_snapshot,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "wait_durable",
          [](const SaveHandle& h, std::optional<double> timeout_s) {
            py::gil_scoped_release nogil;
            if (!timeout_s) {
              h.wait_durable();
              return true;
            }
            auto ms = std::chrono::milliseconds(
                static_cast<int64_t>(*timeout_s * 1000.0 + 0.5));
            return h.wait_durable_for(ms);
          },
          py::arg("timeout") = py::none(),
          "Blocks until durable; with a timeout (seconds) returns False when it expires.")
      .def("persisted", &SaveHandle::persisted);

  py::class_<PySnapshot>(m, "Snapshot", py::buffer_protocol())
      .def_property_readonly("step", [](const PySnapshot& s) { return s.snap->step(); })
      .def_property_readonly("rank", [](const PySnapshot& s) { return s.snap->rank(); })
      .def_property_readonly("world_size",
                             [](const PySnapshot& s) { return s.snap->world_size(); })
      .def_property_readonly("source",
                             [](const PySnapshot& s) {
                               return s.snap->source() == Source::kMemory ? "memory"
                                                                          : "storage";
                             })
      .def_property_readonly("data_bytes",
                             [](const PySnapshot& s) { return s.snap->data_bytes(); })
      .def_property_readonly("tensors",
                             [](const PySnapshot& s) {
                               py::list out;
                               for (const auto& t : s.snap->tensors())
                                 out.append(TensorInfoToDict(t, s.snap->buffer()));
                               return out;
                             })
      .def_property_readonly("blobs",
                             [](const PySnapshot& s) {
                               py::dict out;
                               for (const auto& [k, v] : s.snap->blobs())
                                 out[py::str(k)] = py::bytes(v);
                               return out;
                             })
      .def_buffer([](PySnapshot& s) -> py::buffer_info {
        // Writable: the buffer is owned by the snapshot, not the shared slot.
        void* p = const_cast<void*>(s.snap->buffer());
        auto n = static_cast<py::ssize_t>(p ? s.snap->data_bytes() : 0);
        return py::buffer_info(p, 1, py::format_descriptor<uint8_t>::format(), 1, {n}, {1},
                               /*readonly=*/false);
      });

  py::class_<Checkpointer>(m, "Checkpointer")
      .def(py::init([](std::string directory, int rank, int world_size, std::string run_id,
                       std::string shm_dir, int num_slots, uint64_t reserve_bytes,
                       bool reserve_in_background, int copy_threads, bool persist,
                       int persist_every, int keep_last, bool use_io_uring,
                       bool use_direct_io, uint32_t io_chunk_bytes, int io_queue_depth,
                       double commit_timeout_s, bool unlink_memory_on_close,
                       bool reuse_memory) {
             CheckpointerOptions o;
             o.directory = std::move(directory);
             o.rank = rank;
             o.world_size = world_size;
             o.run_id = std::move(run_id);
             if (!shm_dir.empty()) o.shm_dir = std::move(shm_dir);
             o.num_slots = num_slots;
             o.reserve_bytes = reserve_bytes;
             o.reserve_in_background = reserve_in_background;
             o.copy_threads = copy_threads;
             o.persist = persist;
             o.persist_every = persist_every;
             o.keep_last = keep_last;
             o.use_io_uring = use_io_uring;
             o.use_direct_io = use_direct_io;
             o.io_chunk_bytes = io_chunk_bytes;
             o.io_queue_depth = io_queue_depth;
             o.commit_timeout = std::chrono::milliseconds(
                 static_cast<int64_t>(commit_timeout_s * 1000.0));
             o.unlink_memory_on_close = unlink_memory_on_close;
             o.reuse_memory = reuse_memory;
             py::gil_scoped_release nogil;
             return std::make_unique<Checkpointer>(std::move(o));
           }),
           py::arg("directory"), py::arg("rank") = 0, py::arg("world_size") = 1,
           py::arg("run_id") = "", py::arg("shm_dir") = "/dev/shm", py::arg("num_slots") = 0,
           py::arg("reserve_bytes") = 0, py::arg("reserve_in_background") = true,
           py::arg("copy_threads") = 0, py::arg("persist") = true,
           py::arg("persist_every") = 1, py::arg("keep_last") = 3,
           py::arg("use_io_uring") = true, py::arg("use_direct_io") = true,
           py::arg("io_chunk_bytes") = 8u << 20, py::arg("io_queue_depth") = 8,
           py::arg("commit_timeout_s") = 600.0, py::arg("unlink_memory_on_close") = true,
           py::arg("reuse_memory") = true)
      .def(
          "save",
          [](Checkpointer& c, int64_t step, const py::list& tensors, const py::list& blobs,
             bool blocking) {
            std::vector<TensorRef> refs;
            refs.reserve(tensors.size());
            for (const auto& item : tensors) refs.push_back(item.cast<const TensorRef&>());
            std::vector<BlobRef> brefs = BlobRefs(blobs);
            py::gil_scoped_release nogil;
            return c.save(step, refs, brefs, blocking);
          },
          py::arg("step"), py::arg("tensors"), py::arg("blobs"), py::arg("blocking") = true)
      .def(
          "save_planned",
          [](Checkpointer& c, int64_t step, PySavePlan& plan, const std::vector<uintptr_t>& data,
             const py::list& blobs, bool blocking) {
            if (data.size() != plan.refs.size())
              throw py::value_error("save_planned: " + std::to_string(data.size()) + " data pointers for a plan of " +
                                    std::to_string(plan.refs.size()) + " tensors");
            for (size_t i = 0; i < data.size(); ++i) plan.refs[i].data = reinterpret_cast<const void*>(data[i]);
            std::vector<BlobRef> brefs = BlobRefs(blobs);
            py::gil_scoped_release nogil;
            return c.save(step, plan.refs, brefs, blocking);
          },
          py::arg("step"), py::arg("plan"), py::arg("data"), py::arg("blobs"), py::arg("blocking") = true)
      .def(
          "load",
          [](Checkpointer& c, std::optional<int64_t> step, bool prefer_memory,
             bool allow_fallback, bool verify) {
            auto opt = MakeLoadOptions(step, prefer_memory, allow_fallback, verify);
            std::unique_ptr<LoadedSnapshot> snap;
            {
              py::gil_scoped_release nogil;
              snap = c.load(opt);
            }
            return std::make_unique<PySnapshot>(PySnapshot{std::move(snap)});
          },
          py::arg("step") = py::none(), py::arg("prefer_memory") = true,
          py::arg("allow_fallback") = false, py::arg("verify") = true)
      .def(
          "describe",
          [](Checkpointer& c, std::optional<int64_t> step, bool prefer_memory) {
            StepDescription d;
            {
              py::gil_scoped_release nogil;
              d = c.describe(MakeLoadOptions(step, prefer_memory, false, true));
            }
            py::dict out;
            out["step"] = d.step;
            out["source"] = d.source == Source::kMemory ? "memory" : "storage";
            py::list tensors;
            for (const auto& t : d.tensors) tensors.append(TensorInfoToDict(t, nullptr));
            out["tensors"] = tensors;
            py::dict blobs;
            for (const auto& [k, v] : d.blobs) blobs[py::str(k)] = py::bytes(v);
            out["blobs"] = blobs;
            return out;
          },
          py::arg("step") = py::none(), py::arg("prefer_memory") = true,
          "The manifest of a step (tensor entries and blobs), no tensor bytes read.")
      .def(
          "load_into",
          [](Checkpointer& c, const py::dict& dest, std::optional<int64_t> step,
             bool prefer_memory, bool allow_fallback, bool verify) {
            // dest: key -> LoadTarget
            std::map<std::string, MutableTensorRef> refs;
            for (const auto& [k, v] : dest) refs.emplace(k.cast<std::string>(), v.cast<const MutableTensorRef&>());
            auto opt = MakeLoadOptions(step, prefer_memory, allow_fallback, verify);
            std::map<std::string, std::string> blobs;
            int64_t loaded;
            Source source = Source::kMemory;
            {
              py::gil_scoped_release nogil;
              loaded = c.load_into(refs, &blobs, opt, &source);
            }
            py::dict out;
            for (const auto& [k, v] : blobs) out[py::str(k)] = py::bytes(v);
            return py::make_tuple(loaded, out, source == Source::kMemory ? "memory" : "storage");
          },
          py::arg("dest"), py::arg("step") = py::none(), py::arg("prefer_memory") = true,
          py::arg("allow_fallback") = false, py::arg("verify") = true)
      .def("latest_step", &Checkpointer::latest_step, py::call_guard<py::gil_scoped_release>())
      .def("latest_memory_step", &Checkpointer::latest_memory_step,
           py::call_guard<py::gil_scoped_release>())
      .def("steps",
           [](Checkpointer& c) {
             std::vector<StepInfo> v;
             {
               py::gil_scoped_release nogil;
               v = c.steps();
             }
             py::list out;
             for (const auto& s : v) {
               py::dict d;
               d["step"] = s.step;
               d["committed"] = s.committed;
               d["in_memory"] = s.in_memory;
               d["bytes"] = s.bytes;
               d["world_size"] = s.world_size;
               out.append(d);
             }
             return out;
           })
      .def("take_restore_step", &Checkpointer::take_restore_step,
           "The step the job agreed to restore, once (None afterwards, and without one).")
      .def(
          "wait_all",
          [](Checkpointer& c, std::optional<double> timeout_s) {
            py::gil_scoped_release nogil;
            if (!timeout_s) return c.wait_all();
            c.wait_all(std::chrono::milliseconds(static_cast<int64_t>(*timeout_s * 1000.0 + 0.5)));
          },
          py::arg("timeout") = py::none(),
          "Waits until every started persist finished; DeadlineExceededError after timeout seconds "
          "(default: the Checkpointer's wait_timeout), naming what is in flight and queued.")
      .def("close", &Checkpointer::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("persist_failures", &Checkpointer::persist_failures)
      .def("unlink_memory", &Checkpointer::unlink_memory,
           py::call_guard<py::gil_scoped_release>())
      .def("memory_segment_path", &Checkpointer::memory_segment_path)
      .def_property_readonly("directory",
                             [](const Checkpointer& c) { return c.options().directory; })
      .def_property_readonly("rank", [](const Checkpointer& c) { return c.options().rank; })
      .def_property_readonly("world_size",
                             [](const Checkpointer& c) { return c.options().world_size; });
}
