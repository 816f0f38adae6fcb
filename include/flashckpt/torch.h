// libtorch adapter: save and load named torch::Tensors, a torch::nn::Module
// and its optimizer through a flashckpt::Checkpointer.
//
//   flashckpt::Checkpointer ckpt(opts);
//   flashckpt::torch_adapter::save(ckpt, step, model, &optimizer).wait_snapshot();
//   int64_t step = flashckpt::torch_adapter::load(ckpt, model, &optimizer);
//
// Data parallelism: a ModuleSaveOptions with replicated = true stores the model
// and optimizer once over the ranks; load() then works in a world of any size. Sharded state: DescribeShard() for the save,
// DescribeTarget() and ReadGlobalInto() for a load into any box.
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
// A shard: `t` (contiguous) holds the box [global_offset, global_offset +
// t.sizes()) of a tensor of `global_shape`. Every rank saves its shard under
// the same key with Checkpointer::save; the commit checks that the ranks'
// boxes agree (InvalidArgument at save when the box leaves the global shape).
TensorRef DescribeShard(const std::string& key, const torch::Tensor& t, std::vector<int64_t> global_shape,
                        std::vector<int64_t> global_offset);
// A destination for ReadGlobalInto (include/flashckpt/checkpointer.h): `dst`
// (contiguous, in host memory) is filled with the box [global_offset,
// global_offset + dst.sizes()) of the saved tensor of `global_shape`, from
// whichever ranks' shards cover it, in any world size. Empty global_shape:
// the whole saved tensor, of dst's shape.
MutableTensorRef DescribeTarget(torch::Tensor& dst, std::vector<int64_t> global_shape = {},
                                std::vector<int64_t> global_offset = {});

SaveHandle save(Checkpointer& ckpt, int64_t step, const NamedTensors& tensors,
                const std::map<std::string, std::string>& blobs = {}, bool blocking = true);

struct ModuleSaveOptions {
  ModuleSaveOptions() {}  // not an aggregate: save(..., {{"k", "v"}}) stays the `extra` overload
  std::map<std::string, std::string> extra;  // saved as blobs "extra.<key>"
  bool blocking = true;
  // The model's and the optimizer's tensors are the same on every rank (data
  // parallelism): storage keeps one copy, its bytes split evenly over the
  // ranks, and the step loads into any world size. Ranks whose bytes differ
  // fail that step's commit, naming the key and the ranks.
  bool replicated = false;
};

SaveHandle save(Checkpointer& ckpt, int64_t step, const torch::nn::Module& model,
                torch::optim::Optimizer* optimizer, const ModuleSaveOptions& options);
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
