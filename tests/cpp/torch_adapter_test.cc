// The libtorch adapter: a model and its optimizer saved and loaded into a
// fresh model and optimizer built with other hyperparameters continue
// bit-exact; every hyperparameter and every state tensor comes back; a
// mismatch is refused before anything changes.
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <memory>

#include "flashckpt/torch.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace flashckpt {
namespace {

using testing::ScratchDirs;

torch::nn::Sequential Mlp(int hidden = 16) {
  return torch::nn::Sequential(torch::nn::Linear(8, hidden), torch::nn::Tanh(), torch::nn::Linear(hidden, 1));
}

void Train(torch::nn::Sequential& m, torch::optim::Optimizer& opt, int steps, int seed) {
  torch::manual_seed(seed);
  for (int i = 0; i < steps; ++i) {
    torch::Tensor x = torch::randn({32, 8}), y = x.sum(1, true).sin();
    opt.zero_grad();
    torch::mse_loss(m->forward(x), y).backward();
    opt.step();
  }
}

std::vector<torch::Tensor> Params(torch::nn::Sequential& m) {
  std::vector<torch::Tensor> out;
  for (auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

bool SameParams(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

using MakeOptimizer = std::function<std::unique_ptr<torch::optim::Optimizer>(torch::nn::Sequential&, bool)>;

struct OptimizerCase {
  const char* name;
  // tuned: the saved optimizer's hyperparameters; !tuned: the defaults of a
  // fresh one, which the load must replace.
  MakeOptimizer make;
  std::function<void(torch::optim::Optimizer&, torch::optim::Optimizer&)> expect_same_options;
};

template <typename Options>
const Options& Opt(torch::optim::Optimizer& o) {
  return static_cast<const Options&>(o.param_groups()[0].options());
}

const OptimizerCase kCases[] = {
    {"Adam",
     [](torch::nn::Sequential& m, bool tuned) -> std::unique_ptr<torch::optim::Optimizer> {
       auto o = torch::optim::AdamOptions(tuned ? 3e-3 : 1e-3);
       if (tuned) o.betas({0.8, 0.95}).eps(1e-6).weight_decay(0.01).amsgrad(true);
       return std::make_unique<torch::optim::Adam>(m->parameters(), o);
     },
     [](torch::optim::Optimizer& a, torch::optim::Optimizer& b) {
       EXPECT_TRUE(Opt<torch::optim::AdamOptions>(a) == Opt<torch::optim::AdamOptions>(b));
     }},
    {"AdamW",
     [](torch::nn::Sequential& m, bool tuned) -> std::unique_ptr<torch::optim::Optimizer> {
       auto o = torch::optim::AdamWOptions(tuned ? 2e-3 : 1e-3);
       if (tuned) o.betas({0.85, 0.9}).weight_decay(0.1);
       return std::make_unique<torch::optim::AdamW>(m->parameters(), o);
     },
     [](torch::optim::Optimizer& a, torch::optim::Optimizer& b) {
       EXPECT_TRUE(Opt<torch::optim::AdamWOptions>(a) == Opt<torch::optim::AdamWOptions>(b));
     }},
    {"SGD",
     [](torch::nn::Sequential& m, bool tuned) -> std::unique_ptr<torch::optim::Optimizer> {
       auto o = torch::optim::SGDOptions(tuned ? 0.05 : 0.01);
       if (tuned) o.momentum(0.9).nesterov(true).weight_decay(1e-4);
       return std::make_unique<torch::optim::SGD>(m->parameters(), o);
     },
     [](torch::optim::Optimizer& a, torch::optim::Optimizer& b) {
       EXPECT_TRUE(Opt<torch::optim::SGDOptions>(a) == Opt<torch::optim::SGDOptions>(b));
     }},
    {"RMSprop",
     [](torch::nn::Sequential& m, bool tuned) -> std::unique_ptr<torch::optim::Optimizer> {
       auto o = torch::optim::RMSpropOptions(tuned ? 5e-3 : 1e-2);
       if (tuned) o.alpha(0.9).momentum(0.5).centered(true);
       return std::make_unique<torch::optim::RMSprop>(m->parameters(), o);
     },
     [](torch::optim::Optimizer& a, torch::optim::Optimizer& b) {
       EXPECT_TRUE(Opt<torch::optim::RMSpropOptions>(a) == Opt<torch::optim::RMSpropOptions>(b));
     }},
    {"Adagrad",
     [](torch::nn::Sequential& m, bool tuned) -> std::unique_ptr<torch::optim::Optimizer> {
       auto o = torch::optim::AdagradOptions(tuned ? 0.05 : 0.01);
       if (tuned) o.lr_decay(0.01).initial_accumulator_value(0.1);
       return std::make_unique<torch::optim::Adagrad>(m->parameters(), o);
     },
     [](torch::optim::Optimizer& a, torch::optim::Optimizer& b) {
       EXPECT_TRUE(Opt<torch::optim::AdagradOptions>(a) == Opt<torch::optim::AdagradOptions>(b));
     }},
};

class TorchAdapter : public ::testing::TestWithParam<OptimizerCase> {};

TEST_P(TorchAdapter, AFreshModelAndOptimizerContinueBitExactWithEveryHyperparameter) {
  const OptimizerCase& c = GetParam();
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  torch::manual_seed(1);
  auto model = Mlp();
  auto opt = c.make(model, true);
  Train(model, *opt, 5, 7);
  {
    Checkpointer ckpt(o);
    torch_adapter::save(ckpt, 5, *model, opt.get(), {{"note", "five"}}).wait_durable();
    ckpt.close();
    ckpt.unlink_memory();
  }
  // The uninterrupted run goes on for 3 more steps.
  Train(model, *opt, 3, 11);
  const std::vector<torch::Tensor> expected = Params(model);

  // A fresh process's model (other initial weights) and optimizer (defaults).
  torch::manual_seed(2);
  auto fresh = Mlp();
  auto fresh_opt = c.make(fresh, false);
  Checkpointer reader(o);
  std::map<std::string, std::string> extra;
  LoadOptions lo;
  lo.prefer_memory = false;
  EXPECT_EQ(torch_adapter::load(reader, *fresh, fresh_opt.get(), &extra, lo), 5);
  EXPECT_EQ(extra["note"], "five");
  c.expect_same_options(*opt, *fresh_opt);
  Train(fresh, *fresh_opt, 3, 11);
  EXPECT_TRUE(SameParams(Params(fresh), expected)) << c.name << ": the resumed run differs from the uninterrupted one";
  reader.close();
  reader.unlink_memory();
}

INSTANTIATE_TEST_SUITE_P(Optimizers, TorchAdapter, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<OptimizerCase>& i) { return std::string(i.param.name); });

TEST(TorchAdapterMismatch, AModelOfAnotherShapeIsRefusedAndLeftAsItWas) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  auto model = Mlp(16);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));
  Train(model, opt, 2, 3);
  Checkpointer ckpt(o);
  torch_adapter::save(ckpt, 2, *model, &opt).wait_durable();

  auto other = Mlp(32);
  torch::optim::Adam other_opt(other->parameters(), torch::optim::AdamOptions(0.5));
  const auto before = Params(other);
  try {
    torch_adapter::load(ckpt, *other, &other_opt);
    ADD_FAILURE() << "loaded into a model of another shape";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("nothing was changed"), std::string::npos) << m;
    EXPECT_NE(m.find("model.0.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("model.2.weight"), std::string::npos) << m;
  }
  EXPECT_TRUE(SameParams(Params(other), before));
  EXPECT_DOUBLE_EQ(Opt<torch::optim::AdamOptions>(other_opt).lr(), 0.5);
  EXPECT_TRUE(other_opt.state().empty());
  ckpt.close();
  ckpt.unlink_memory();
}

TEST(TorchAdapterMismatch, AnOptimizerOverOtherParametersIsRefusedBeforeTheModelChanges) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  auto model = Mlp();
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));
  Train(model, opt, 2, 3);
  Checkpointer ckpt(o);
  torch_adapter::save(ckpt, 2, *model, &opt).wait_durable();

  auto fresh = Mlp();
  const auto before = Params(fresh);
  // Same model, but the optimizer holds only the first layer's parameters.
  std::vector<torch::Tensor> first_layer = {fresh->parameters()[0], fresh->parameters()[1]};
  torch::optim::Adam partial(first_layer, torch::optim::AdamOptions(1e-3));
  try {
    torch_adapter::load(ckpt, *fresh, &partial);
    ADD_FAILURE() << "loaded an optimizer of 4 parameters into one of 2";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("4 parameters saved, 2 here"), std::string::npos) << m;
  }
  EXPECT_TRUE(SameParams(Params(fresh), before)) << "the model changed before the optimizer was checked";
  // Another optimizer kind is refused too.
  torch::optim::SGD sgd(fresh->parameters(), torch::optim::SGDOptions(0.1));
  try {
    torch_adapter::load(ckpt, *fresh, &sgd);
    ADD_FAILURE() << "loaded Adam state into SGD";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("saved by adam, loading into sgd"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(SameParams(Params(fresh), before));
  ckpt.close();
  ckpt.unlink_memory();
}

TEST(TorchAdapterMismatch, AnOptimizerTheAdapterDoesNotKnowRoundTripsThroughTorchSerialization) {
  ScratchDirs dirs;
  CheckpointerOptions o = dirs.Options();
  auto model = Mlp();
  torch::optim::LBFGS opt(model->parameters(), torch::optim::LBFGSOptions(0.5).history_size(7));
  Checkpointer ckpt(o);
  torch_adapter::save(ckpt, 1, *model, &opt).wait_durable();
  auto fresh = Mlp();
  torch::optim::LBFGS fresh_opt(fresh->parameters(), torch::optim::LBFGSOptions(1.0));
  EXPECT_EQ(torch_adapter::load(ckpt, *fresh, &fresh_opt), 1);
  EXPECT_TRUE(SameParams(Params(fresh), Params(model)));
  EXPECT_EQ(static_cast<const torch::optim::LBFGSOptions&>(fresh_opt.param_groups()[0].options()).history_size(), 7);
  ckpt.close();
  ckpt.unlink_memory();
}

// Data parallelism: 2 ranks save the same model and Adam state as replicated
// (each persists about half); a world of 1 and one of 3 load it, and training
// goes on exactly as the uninterrupted run.
TEST(TorchAdapterGlobal, ReplicatedModuleStateLoadsIntoAnotherWorldSize) {
  ScratchDirs dirs;
  torch::manual_seed(1);
  auto model = Mlp(64);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));
  Train(model, opt, 4, 7);
  {
    std::vector<std::unique_ptr<Checkpointer>> ranks;
    for (int r = 0; r < 2; ++r) ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, 2)));
    std::vector<SaveHandle> hs;
    torch_adapter::ModuleSaveOptions so;
    so.replicated = true;
    for (auto& c : ranks) hs.push_back(torch_adapter::save(*c, 4, *model, &opt, so));
    for (auto& h : hs) h.wait_durable();
    for (auto& c : ranks) {
      c->close();
      c->unlink_memory();
    }
  }
  // Each rank stored about half of the replicated bytes.
  const auto r0 = std::filesystem::file_size(dirs.ckpt + "/step-4/rank-0.replica");
  const auto r1 = std::filesystem::file_size(dirs.ckpt + "/step-4/rank-1.replica");
  EXPECT_GT(r0, 0u);
  EXPECT_LE(r0 > r1 ? r0 - r1 : r1 - r0, 4096u);
  Train(model, opt, 3, 11);
  const std::vector<torch::Tensor> expected = Params(model);
  for (int world : {1, 3}) {
    for (int r = 0; r < world; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(world));
      torch::manual_seed(100 + r);
      auto fresh = Mlp(64);
      torch::optim::Adam fresh_opt(fresh->parameters(), torch::optim::AdamOptions(1e-3));
      CheckpointerOptions o = dirs.Options(r, world);
      o.persist = false;
      Checkpointer reader(o);
      EXPECT_EQ(torch_adapter::load(reader, *fresh, &fresh_opt), 4);
      Train(fresh, fresh_opt, 3, 11);
      EXPECT_TRUE(SameParams(Params(fresh), expected));
      reader.close();
      reader.unlink_memory();
    }
  }
}

// Tensor parallelism: 2 ranks save row halves of a 6x4 weight as shards; a
// load by columns (another layout) gets exactly its box, and a target the core
// cannot fill is refused by name.
TEST(TorchAdapterGlobal, ShardsSavedByRowsLoadIntoAColumnBox) {
  ScratchDirs dirs;
  torch::Tensor full = torch::arange(24, torch::kFloat32).reshape({6, 4});
  {
    std::vector<std::unique_ptr<Checkpointer>> ranks;
    for (int r = 0; r < 2; ++r) ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, 2)));
    std::vector<torch::Tensor> halves = {full.slice(0, 0, 3).contiguous(), full.slice(0, 3, 6).contiguous()};
    std::vector<SaveHandle> hs;
    for (int r = 0; r < 2; ++r)
      hs.push_back(ranks[r]->save(
          1, {torch_adapter::DescribeShard("tp.weight", halves[r], {6, 4}, {3 * r, 0})}, {}));
    for (auto& h : hs) h.wait_durable();
    for (auto& c : ranks) {
      c->close();
      c->unlink_memory();
    }
  }
  torch::Tensor cols = torch::zeros({6, 2});
  ReadGlobalInto(dirs.ckpt, 1, {{"tp.weight", torch_adapter::DescribeTarget(cols, {6, 4}, {0, 2})}});
  EXPECT_TRUE(torch::equal(cols, full.slice(1, 2, 4))) << cols;
  torch::Tensor whole = torch::zeros({6, 4});
  ReadGlobalInto(dirs.ckpt, 1, {{"tp.weight", torch_adapter::DescribeTarget(whole, {6, 4}, {0, 0})}});
  EXPECT_TRUE(torch::equal(whole, full));
  torch::Tensor strided = torch::zeros({2, 6}).t();
  try {
    torch_adapter::DescribeTarget(strided, {6, 4}, {0, 0});
    ADD_FAILURE() << "a non-contiguous target was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("non-contiguous"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flashckpt
