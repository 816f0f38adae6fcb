#include "flashckpt/torch.h"

#include <functional>
#include <set>
#include <sstream>

#if __has_include(<c10/cuda/CUDAStream.h>) && defined(USE_CUDA)
#include <c10/cuda/CUDAStream.h>
#define FLASHCKPT_TORCH_CUDA 1
#endif

namespace flashckpt::torch_adapter {
namespace {

std::string DtypeName(const torch::Tensor& t) { return std::string("torch.") + std::string(c10::toString(t.scalar_type())); }

std::string StateKey(size_t group, size_t index, const char* field) {
  return "optim.state." + std::to_string(group) + "." + std::to_string(index) + "." + field;
}

std::string GroupKey(size_t group) { return "optim.group." + std::to_string(group); }

// The optimizers whose state goes in as raw tensors (copied at memory speed);
// any other is serialized whole with torch::save ("optim.archive").
const char* OptionsKind(const torch::optim::OptimizerOptions& o) {
  if (dynamic_cast<const torch::optim::AdamOptions*>(&o)) return "adam";
  if (dynamic_cast<const torch::optim::AdamWOptions*>(&o)) return "adamw";
  if (dynamic_cast<const torch::optim::SGDOptions*>(&o)) return "sgd";
  if (dynamic_cast<const torch::optim::RMSpropOptions*>(&o)) return "rmsprop";
  if (dynamic_cast<const torch::optim::AdagradOptions*>(&o)) return "adagrad";
  return nullptr;
}

// One parameter's state: its kind, step counter and named tensors (an
// undefined optional tensor is left out).
struct ParamState {
  std::string kind;
  int64_t step = 0;
  std::vector<std::pair<const char*, torch::Tensor>> tensors;
};

// Adam and AdamW keep the same fields.
template <typename AdamState>
void ReadAdamState(const AdamState& a, const char* kind, ParamState* out) {
  out->kind = kind;
  out->step = a.step();
  for (auto [name, t] : {std::pair<const char*, torch::Tensor>{"exp_avg", a.exp_avg()},
                         {"exp_avg_sq", a.exp_avg_sq()},
                         {"max_exp_avg_sq", a.max_exp_avg_sq()}})
    if (t.defined()) out->tensors.emplace_back(name, t);
}

template <typename AdamState>
std::unique_ptr<torch::optim::OptimizerParamState> MakeAdamState(int64_t step,
                                                                 const std::function<torch::Tensor(const char*)>& get) {
  auto s = std::make_unique<AdamState>();
  s->step(step).exp_avg(get("exp_avg")).exp_avg_sq(get("exp_avg_sq")).max_exp_avg_sq(get("max_exp_avg_sq"));
  return s;
}

bool ReadState(torch::optim::OptimizerParamState& s, ParamState* out) {
  auto add = [&](const char* name, const torch::Tensor& t) {
    if (t.defined()) out->tensors.emplace_back(name, t);
  };
  if (auto* a = dynamic_cast<torch::optim::AdamParamState*>(&s)) {
    ReadAdamState(*a, "adam", out);
  } else if (auto* w = dynamic_cast<torch::optim::AdamWParamState*>(&s)) {
    ReadAdamState(*w, "adamw", out);
  } else if (auto* g = dynamic_cast<torch::optim::SGDParamState*>(&s)) {
    out->kind = "sgd";
    add("momentum_buffer", g->momentum_buffer());
  } else if (auto* r = dynamic_cast<torch::optim::RMSpropParamState*>(&s)) {
    out->kind = "rmsprop";
    out->step = r->step();
    add("square_avg", r->square_avg());
    add("momentum_buffer", r->momentum_buffer());
    add("grad_avg", r->grad_avg());
  } else if (auto* d = dynamic_cast<torch::optim::AdagradParamState*>(&s)) {
    out->kind = "adagrad";
    out->step = d->step();
    add("sum", d->sum());
  } else {
    return false;
  }
  return true;
}

// A new state of `kind` from saved tensors (already checked to exist and match).
std::unique_ptr<torch::optim::OptimizerParamState> MakeState(
    const std::string& kind, int64_t step, const std::map<std::string, torch::Tensor>& t) {
  std::function<torch::Tensor(const char*)> get = [&](const char* name) {
    auto it = t.find(name);
    return it == t.end() ? torch::Tensor() : it->second;
  };
  if (kind == "adam") return MakeAdamState<torch::optim::AdamParamState>(step, get);
  if (kind == "adamw") return MakeAdamState<torch::optim::AdamWParamState>(step, get);
  if (kind == "sgd") {
    auto s = std::make_unique<torch::optim::SGDParamState>();
    s->momentum_buffer(get("momentum_buffer"));
    return s;
  }
  if (kind == "rmsprop") {
    auto s = std::make_unique<torch::optim::RMSpropParamState>();
    s->step(step).square_avg(get("square_avg")).momentum_buffer(get("momentum_buffer")).grad_avg(get("grad_avg"));
    return s;
  }
  auto s = std::make_unique<torch::optim::AdagradParamState>();
  s->step(step).sum(get("sum"));
  return s;
}

const char* const kStateFields[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
                                    "square_avg", "grad_avg", "sum"};

std::string ParamId(const torch::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }

// The optimizer's tensors by name, every param group's hyperparameters (its
// options, serialized) as blobs, and "optim.meta": one line per group (kind,
// number of parameters) and per parameter with state (kind, step). Returns
// false for optimizers this adapter does not know.
bool OptimizerTensors(torch::optim::Optimizer& opt, NamedTensors* out, std::map<std::string, std::string>* blobs) {
  std::ostringstream meta;
  NamedTensors tensors;
  auto& groups = opt.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    const char* kind = OptionsKind(groups[g].options());
    if (kind == nullptr) return false;
    auto& params = groups[g].params();
    meta << "group " << g << " " << kind << " " << params.size() << "\n";
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = opt.state().find(ParamId(params[i]));
      if (it == opt.state().end()) continue;
      ParamState ps;
      if (!ReadState(*it->second, &ps)) return false;
      meta << "state " << g << " " << i << " " << ps.kind << " " << ps.step << "\n";
      for (auto& [name, t] : ps.tensors) tensors.emplace_back(StateKey(g, i, name), t);
    }
  }
  for (auto& t : tensors) out->push_back(std::move(t));
  (*blobs)["optim.meta"] = meta.str();
  return true;
}

// Every param group's hyperparameters (its options, as torch serializes them:
// lr, betas, eps, weight decay, ...), for any optimizer.
void GroupOptions(torch::optim::Optimizer& opt, std::map<std::string, std::string>* blobs) {
  auto& groups = opt.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    torch::serialize::OutputArchive archive;
    groups[g].options().serialize(archive);
    std::ostringstream os;
    archive.save_to(os);
    (*blobs)[GroupKey(g)] = os.str();
  }
}

size_t SavedGroups(const LoadedSnapshot& snap) {
  size_t n = 0;
  while (snap.blobs().count(GroupKey(n))) ++n;
  return n;
}

void ApplyGroupOptions(const LoadedSnapshot& snap, torch::optim::Optimizer& opt) {
  auto& groups = opt.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    std::istringstream is(snap.blobs().at(GroupKey(g)));
    torch::serialize::InputArchive in;
    in.load_from(is);
    groups[g].options().serialize(in);
  }
}

struct SavedState {
  size_t group = 0, index = 0;
  std::string kind;
  int64_t step = 0;
};

}  // namespace

TensorRef Describe(const std::string& key, const torch::Tensor& t) {
  if (!t.is_contiguous())
    throw Error(ErrorCode::kInvalidArgument, "tensor '" + key + "' is not contiguous; call .contiguous() first");
  TensorRef r;
  r.key = key;
  r.data = t.data_ptr();
  r.nbytes = t.numel() * t.element_size();
  r.dtype = DtypeName(t);
  r.shape = t.sizes().vec();
  r.element_size = static_cast<uint32_t>(t.element_size());
  r.device = t.is_cuda() ? t.device().index() : -1;
  r.device_type = t.is_cuda() ? "cuda" : "";
#ifdef FLASHCKPT_TORCH_CUDA
  // After the work the caller queued on its current stream (not the default one).
  if (t.is_cuda()) r.cuda_stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
  return r;
}

TensorRef DescribeShard(const std::string& key, const torch::Tensor& t, std::vector<int64_t> global_shape,
                        std::vector<int64_t> global_offset) {
  TensorRef r = Describe(key, t);
  r.global_shape = std::move(global_shape);
  r.global_offset = std::move(global_offset);
  return r;
}

MutableTensorRef DescribeTarget(torch::Tensor& dst, std::vector<int64_t> global_shape,
                                std::vector<int64_t> global_offset) {
  if (!dst.is_contiguous() || dst.is_cuda())
    throw Error(ErrorCode::kInvalidArgument,
                "a load target must be a contiguous tensor in host memory (got " +
                    std::string(dst.is_cuda() ? "a CUDA tensor" : "a non-contiguous tensor") + ")");
  MutableTensorRef m;
  m.data = dst.data_ptr();
  m.nbytes = dst.numel() * dst.element_size();
  m.dtype = DtypeName(dst);
  m.shape = dst.sizes().vec();
  m.global_shape = std::move(global_shape);
  m.global_offset = std::move(global_offset);
  return m;
}

namespace {
SaveHandle SaveNamed(Checkpointer& ckpt, int64_t step, const NamedTensors& tensors,
                     const std::map<std::string, std::string>& blobs, bool blocking, bool replicated) {
  std::vector<torch::Tensor> keep;  // contiguous copies live until the copy is done
  std::vector<TensorRef> refs;
  for (const auto& [k, t] : tensors) {
    torch::Tensor c = t.detach();
    if (!c.is_contiguous()) {
      c = c.contiguous();
      keep.push_back(c);
    }
    refs.push_back(Describe(k, c));
    refs.back().replicated = replicated;
  }
  std::vector<BlobRef> brefs;
  for (const auto& [k, v] : blobs) brefs.push_back({k, v});
  return ckpt.save(step, refs, brefs, blocking || !keep.empty());
}
}  // namespace

SaveHandle save(Checkpointer& ckpt, int64_t step, const NamedTensors& tensors,
                const std::map<std::string, std::string>& blobs, bool blocking) {
  return SaveNamed(ckpt, step, tensors, blobs, blocking, /*replicated=*/false);
}

SaveHandle save(Checkpointer& ckpt, int64_t step, const torch::nn::Module& model,
                torch::optim::Optimizer* optimizer, const ModuleSaveOptions& options) {
  NamedTensors tensors;
  for (const auto& p : model.named_parameters()) tensors.emplace_back("model." + p.key(), p.value());
  for (const auto& b : model.named_buffers()) tensors.emplace_back("model." + b.key(), b.value());
  std::map<std::string, std::string> blobs;
  for (const auto& [k, v] : options.extra) blobs["extra." + k] = v;
  if (optimizer != nullptr) GroupOptions(*optimizer, &blobs);
  if (optimizer != nullptr && !OptimizerTensors(*optimizer, &tensors, &blobs)) {
    std::ostringstream os;
    torch::serialize::OutputArchive archive;
    optimizer->save(archive);
    archive.save_to(os);
    blobs["optim.archive"] = os.str();
  }
  return SaveNamed(ckpt, step, tensors, blobs, options.blocking, options.replicated);
}

SaveHandle save(Checkpointer& ckpt, int64_t step, const torch::nn::Module& model,
                torch::optim::Optimizer* optimizer, const std::map<std::string, std::string>& extra,
                bool blocking) {
  ModuleSaveOptions o;
  o.extra = extra;
  o.blocking = blocking;
  return save(ckpt, step, model, optimizer, o);
}

int64_t load(Checkpointer& ckpt, torch::nn::Module& model, torch::optim::Optimizer* optimizer,
             std::map<std::string, std::string>* extra, const LoadOptions& options) {
  auto snap = ckpt.load(options);
  torch::NoGradGuard no_grad;
  std::vector<std::string> missing, mismatched, unexpected;

  // 1. Every check, before anything changes: a failed load leaves the model
  // and the optimizer as they were.
  auto matches = [&](const std::string& key, const torch::Tensor& like) -> const TensorInfo* {
    const TensorInfo* t = snap->find(key);
    if (t == nullptr) {
      missing.push_back(key);
      return nullptr;
    }
    if (t->shape != like.sizes().vec() || t->dtype != DtypeName(like)) {
      mismatched.push_back(key);
      return nullptr;
    }
    return t;
  };
  std::vector<std::pair<const TensorInfo*, torch::Tensor>> model_copies;
  std::set<std::string> model_keys;
  auto plan_model = [&](const std::string& key, const torch::Tensor& dst) {
    model_keys.insert(key);
    if (const TensorInfo* t = matches(key, dst)) model_copies.emplace_back(t, dst);
  };
  for (auto& p : model.named_parameters()) plan_model("model." + p.key(), p.value());
  for (auto& b : model.named_buffers()) plan_model("model." + b.key(), b.value());
  for (const TensorInfo& t : snap->tensors())
    if (t.key.rfind("model.", 0) == 0 && !model_keys.count(t.key)) unexpected.push_back(t.key);

  std::vector<SavedState> states;
  std::vector<std::string> group_kinds;
  const std::string* archive = nullptr;
  if (optimizer != nullptr) {
    auto& groups = optimizer->param_groups();
    auto a = snap->blobs().find("optim.archive");
    auto meta = snap->blobs().find("optim.meta");
    if (a != snap->blobs().end()) {
      archive = &a->second;
      if (SavedGroups(*snap) != groups.size())
        mismatched.push_back("optimizer param groups: " + std::to_string(SavedGroups(*snap)) + " saved, " +
                             std::to_string(groups.size()) + " here");
    } else if (meta == snap->blobs().end()) {
      missing.push_back("optimizer state (optim.meta or optim.archive)");
    } else {
      std::istringstream lines(meta->second);
      std::string word;
      while (lines >> word) {
        if (word == "group") {
          size_t g = 0, n = 0;
          std::string kind;
          lines >> g >> kind >> n;
          group_kinds.push_back(kind);
          if (g >= groups.size()) {
            mismatched.push_back("optimizer param group " + std::to_string(g) + " (the optimizer has " +
                                 std::to_string(groups.size()) + ")");
            continue;
          }
          const char* have = OptionsKind(groups[g].options());
          if (have == nullptr || kind != have)
            mismatched.push_back("optimizer param group " + std::to_string(g) + ": saved by " + kind +
                                 ", loading into " + (have ? have : "another optimizer"));
          if (n != groups[g].params().size())
            mismatched.push_back("optimizer param group " + std::to_string(g) + ": " + std::to_string(n) +
                                 " parameters saved, " + std::to_string(groups[g].params().size()) + " here");
          if (snap->blobs().find(GroupKey(g)) == snap->blobs().end()) missing.push_back(GroupKey(g));
        } else if (word == "state") {
          SavedState s;
          lines >> s.group >> s.index >> s.kind >> s.step;
          if (s.kind != "adam" && s.kind != "adamw" && s.kind != "sgd" && s.kind != "rmsprop" && s.kind != "adagrad") {
            mismatched.push_back("optimizer state of " + std::to_string(s.group) + "." + std::to_string(s.index) +
                                 " (unknown kind '" + s.kind + "')");
            continue;
          }
          if (s.group >= groups.size() || s.index >= groups[s.group].params().size()) continue;  // named above
          const torch::Tensor& p = groups[s.group].params()[s.index];
          for (const char* f : kStateFields) {
            const std::string key = StateKey(s.group, s.index, f);
            if (snap->find(key)) matches(key, p);
          }
          states.push_back(s);
        } else {
          mismatched.push_back("optim.meta (unknown record '" + word + "')");
          break;
        }
      }
      if (group_kinds.size() != groups.size())
        mismatched.push_back("optimizer param groups: " + std::to_string(group_kinds.size()) + " saved, " +
                             std::to_string(groups.size()) + " here");
    }
  }
  if (!missing.empty() || !mismatched.empty() || !unexpected.empty()) {
    auto list = [](const std::vector<std::string>& v) {
      std::string s;
      for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
      return s;
    };
    throw Error(ErrorCode::kInvalidArgument,
                "cannot load step " + std::to_string(snap->step()) + " into the model and optimizer (nothing was "
                "changed): missing [" + list(missing) + "], mismatched shape, dtype or layout [" + list(mismatched) +
                "], unexpected [" + list(unexpected) + "]");
  }

  // 2. Apply. Copies to a device run on the caller's current stream (ordered
  // after the work queued there), as torch's copy_ does.
  if (archive != nullptr) {
    // Serialized whole: torch's own loader checks it (before the model changes).
    std::istringstream is(*archive);
    torch::serialize::InputArchive in;
    in.load_from(is);
    optimizer->load(in);
    ApplyGroupOptions(*snap, *optimizer);  // torch's loader restores the state, not every option
  }
  auto from_snapshot = [](const TensorInfo* t, const torch::Tensor& like) {
    return torch::from_blob(const_cast<void*>(t->data), like.sizes(), like.options().device(torch::kCPU));
  };
  for (auto& [t, dst] : model_copies) dst.copy_(from_snapshot(t, dst));
  if (optimizer != nullptr && archive == nullptr) {
    auto& groups = optimizer->param_groups();
    ApplyGroupOptions(*snap, *optimizer);  // every hyperparameter: lr, betas, eps, weight decay, ...
    // State of parameters saved without any is dropped, as in a fresh optimizer.
    for (auto& grp : groups)
      for (auto& p : grp.params()) optimizer->state().erase(ParamId(p));
    for (const SavedState& s : states) {
      const torch::Tensor& p = groups[s.group].params()[s.index];
      std::map<std::string, torch::Tensor> tensors;
      for (const char* f : kStateFields) {
        if (const TensorInfo* t = snap->find(StateKey(s.group, s.index, f))) {
          torch::Tensor dst = torch::empty_like(p, torch::MemoryFormat::Contiguous);
          dst.copy_(from_snapshot(t, p));
          tensors[f] = dst;
        }
      }
      optimizer->state()[ParamId(p)] = MakeState(s.kind, s.step, tensors);
    }
  }
  if (extra != nullptr) {
    extra->clear();
    for (const auto& [k, v] : snap->blobs())
      if (k.rfind("extra.", 0) == 0) (*extra)[k.substr(6)] = v;
  }
  return snap->step();
}

}  // namespace flashckpt::torch_adapter
