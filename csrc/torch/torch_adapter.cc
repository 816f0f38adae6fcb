#include "flashckpt/torch.h"

#include <sstream>

namespace flashckpt::torch_adapter {
namespace {

std::string DtypeName(const torch::Tensor& t) { return std::string("torch.") + std::string(c10::toString(t.scalar_type())); }

std::string StateKey(size_t group, size_t index, const char* field) {
  return "optim.state." + std::to_string(group) + "." + std::to_string(index) + "." + field;
}

// The optimizer's tensors, in param-group order, by name; non-tensor state
// as text in `blobs`. Returns false for optimizers this adapter does not know.
bool OptimizerTensors(torch::optim::Optimizer& opt, NamedTensors* out, std::map<std::string, std::string>* blobs) {
  std::ostringstream meta;
  auto& groups = opt.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    auto& params = groups[g].params();
    if (auto* a = dynamic_cast<torch::optim::AdamOptions*>(&groups[g].options())) {
      meta << "group " << g << " lr " << std::hexfloat << a->lr() << "\n";
    } else if (auto* s = dynamic_cast<torch::optim::SGDOptions*>(&groups[g].options())) {
      meta << "group " << g << " lr " << std::hexfloat << s->lr() << "\n";
    } else {
      return false;
    }
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = opt.state().find(c10::guts::to_string(params[i].unsafeGetTensorImpl()));
      if (it == opt.state().end()) continue;
      if (auto* st = dynamic_cast<torch::optim::AdamParamState*>(it->second.get())) {
        meta << "adam " << g << " " << i << " step " << st->step() << "\n";
        out->emplace_back(StateKey(g, i, "exp_avg"), st->exp_avg());
        out->emplace_back(StateKey(g, i, "exp_avg_sq"), st->exp_avg_sq());
        if (st->max_exp_avg_sq().defined()) out->emplace_back(StateKey(g, i, "max_exp_avg_sq"), st->max_exp_avg_sq());
      } else if (auto* sg = dynamic_cast<torch::optim::SGDParamState*>(it->second.get())) {
        meta << "sgd " << g << " " << i << "\n";
        out->emplace_back(StateKey(g, i, "momentum_buffer"), sg->momentum_buffer());
      } else {
        return false;
      }
    }
  }
  (*blobs)["optim.meta"] = meta.str();
  return true;
}

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
  return r;
}

SaveHandle save(Checkpointer& ckpt, int64_t step, const NamedTensors& tensors,
                const std::map<std::string, std::string>& blobs, bool blocking) {
  std::vector<torch::Tensor> keep;  // contiguous copies live until the copy is done
  std::vector<TensorRef> refs;
  for (const auto& [k, t] : tensors) {
    torch::Tensor c = t.detach();
    if (!c.is_contiguous()) {
      c = c.contiguous();
      keep.push_back(c);
    }
    refs.push_back(Describe(k, c));
  }
  std::vector<BlobRef> brefs;
  for (const auto& [k, v] : blobs) brefs.push_back({k, v});
  SaveHandle h = ckpt.save(step, refs, brefs, blocking || !keep.empty());
  return h;
}

SaveHandle save(Checkpointer& ckpt, int64_t step, const torch::nn::Module& model,
                torch::optim::Optimizer* optimizer, const std::map<std::string, std::string>& extra,
                bool blocking) {
  NamedTensors tensors;
  for (const auto& p : model.named_parameters()) tensors.emplace_back("model." + p.key(), p.value());
  for (const auto& b : model.named_buffers()) tensors.emplace_back("model." + b.key(), b.value());
  std::map<std::string, std::string> blobs;
  for (const auto& [k, v] : extra) blobs["extra." + k] = v;
  if (optimizer != nullptr && !OptimizerTensors(*optimizer, &tensors, &blobs)) {
    std::ostringstream os;
    torch::serialize::OutputArchive archive;
    optimizer->save(archive);
    archive.save_to(os);
    blobs["optim.archive"] = os.str();
  }
  return save(ckpt, step, tensors, blobs, blocking);
}

int64_t load(Checkpointer& ckpt, torch::nn::Module& model, torch::optim::Optimizer* optimizer,
             std::map<std::string, std::string>* extra, const LoadOptions& options) {
  auto snap = ckpt.load(options);
  torch::NoGradGuard no_grad;
  std::vector<std::string> missing, mismatched;
  auto copy_in = [&](const std::string& key, torch::Tensor dst) {
    const TensorInfo* t = snap->find(key);
    if (t == nullptr) { missing.push_back(key); return; }
    if (t->shape != dst.sizes().vec() || t->dtype != DtypeName(dst)) { mismatched.push_back(key); return; }
    auto src = torch::from_blob(const_cast<void*>(t->data), dst.sizes(), dst.options().device(torch::kCPU));
    dst.copy_(src);
  };
  for (auto& p : model.named_parameters()) copy_in("model." + p.key(), p.value());
  for (auto& b : model.named_buffers()) copy_in("model." + b.key(), b.value());
  if (optimizer != nullptr) {
    auto archive = snap->blobs().find("optim.archive");
    auto meta = snap->blobs().find("optim.meta");
    if (archive != snap->blobs().end()) {
      std::istringstream is(archive->second);
      torch::serialize::InputArchive in;
      in.load_from(is);
      optimizer->load(in);
    } else if (meta != snap->blobs().end()) {
      std::istringstream lines(meta->second);
      std::string kind;
      auto& groups = optimizer->param_groups();
      while (lines >> kind) {
        size_t g, i;
        if (kind == "group") {
          std::string lr_word, lr_text;
          lines >> g >> lr_word >> lr_text;
          double lr = std::strtod(lr_text.c_str(), nullptr);
          if (g >= groups.size()) { mismatched.push_back("optimizer param group " + std::to_string(g)); continue; }
          if (auto* a = dynamic_cast<torch::optim::AdamOptions*>(&groups[g].options())) a->lr(lr);
          if (auto* s = dynamic_cast<torch::optim::SGDOptions*>(&groups[g].options())) s->lr(lr);
          continue;
        }
        lines >> g >> i;
        if (g >= groups.size() || i >= groups[g].params().size()) {
          mismatched.push_back("optimizer state of param " + std::to_string(g) + "." + std::to_string(i));
          continue;
        }
        torch::Tensor& p = groups[g].params()[i];
        std::string id = c10::guts::to_string(p.unsafeGetTensorImpl());
        if (kind == "adam") {
          std::string step_word;
          int64_t step;
          lines >> step_word >> step;
          auto st = std::make_unique<torch::optim::AdamParamState>();
          st->step(step);
          st->exp_avg(torch::zeros_like(p));
          st->exp_avg_sq(torch::zeros_like(p));
          copy_in(StateKey(g, i, "exp_avg"), st->exp_avg());
          copy_in(StateKey(g, i, "exp_avg_sq"), st->exp_avg_sq());
          if (snap->find(StateKey(g, i, "max_exp_avg_sq"))) {
            st->max_exp_avg_sq(torch::zeros_like(p));
            copy_in(StateKey(g, i, "max_exp_avg_sq"), st->max_exp_avg_sq());
          }
          optimizer->state()[id] = std::move(st);
        } else if (kind == "sgd") {
          auto st = std::make_unique<torch::optim::SGDParamState>();
          st->momentum_buffer(torch::zeros_like(p));
          copy_in(StateKey(g, i, "momentum_buffer"), st->momentum_buffer());
          optimizer->state()[id] = std::move(st);
        }
      }
    } else {
      missing.push_back("optimizer state (optim.meta or optim.archive)");
    }
  }
  if (!missing.empty() || !mismatched.empty()) {
    std::string m = "cannot load step " + std::to_string(snap->step()) + " into the model: missing [";
    for (size_t i = 0; i < missing.size(); ++i) m += (i ? ", " : "") + missing[i];
    m += "], mismatched shape or dtype [";
    for (size_t i = 0; i < mismatched.size(); ++i) m += (i ? ", " : "") + mismatched[i];
    throw Error(ErrorCode::kInvalidArgument, m + "]");
  }
  if (extra != nullptr) {
    extra->clear();
    for (const auto& [k, v] : snap->blobs())
      if (k.rfind("extra.", 0) == 0) (*extra)[k.substr(6)] = v;
  }
  return snap->step();
}

}  // namespace flashckpt::torch_adapter
