// libtorch adapter: save and load named torch::Tensors, a torch::nn::Module
// and its optimizer through a flashckpt::Checkpointer.
//
//   flashckpt::Checkpointer ckpt(opts);
//   flashckpt::torch_adapter::save(ckpt, step, model, &optimizer).wait_snapshot();
//   int64_t step = flashckpt::torch_adapter::load(ckpt, model, &optimizer);
//
// The state of Adam, AdamW, SGD, RMSprop and Adagrad goes in as tensors
// (copied at memory speed); other optimizers' state is serialized with
// torch::save into a blob. Every param group's hyperparameters (lr, betas,
// eps, weight decay, momentum, ...) are saved and restored for any optimizer.
// With a CUDA build of libtorch, CUDA tensors are copied after the work
// queued on the caller's current stream.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "flashckpt/checkpointer.h"

namespace flashckpt::torch_adapter {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Describes a tensor for the core (a non-contiguous one must be made
// contiguous by the caller first).
TensorRef Describe(const std::string& key, const torch::Tensor& t);

SaveHandle save(Checkpointer& ckpt, int64_t step, const NamedTensors& tensors,
                const std::map<std::string, std::string>& blobs = {}, bool blocking = true);

SaveHandle save(Checkpointer& ckpt, int64_t step, const torch::nn::Module& model,
                torch::optim::Optimizer* optimizer,
                const std::map<std::string, std::string>& extra = {}, bool blocking = true);

// Loads into the module's parameters and buffers (and the optimizer's
// hyperparameters and state) in place; returns the step. Every check runs
// first: a missing, unexpected or mismatched key (shape, dtype), another
// optimizer kind or other param groups raise Error(kInvalidArgument) listing
// them all, and nothing has changed.
int64_t load(Checkpointer& ckpt, torch::nn::Module& model, torch::optim::Optimizer* optimizer,
             std::map<std::string, std::string>* extra = nullptr, const LoadOptions& options = {});

}  // namespace flashckpt::torch_adapter
