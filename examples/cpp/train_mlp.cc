// A small libtorch trainer that checkpoints with flashckpt and resumes from
// the newest snapshot when restarted — bit-exact with an uninterrupted run.
//
//   train_mlp --dir /tmp/ckpt --steps 200 --every 10 [--crash-at 57]
//
// --crash-at N kills the process with SIGKILL right after step N, as an OOM
// kill or a node fault would; run the same command again to resume.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "flashckpt/torch.h"

namespace {

struct Args {
  std::string dir = "/tmp/flashckpt-train-mlp";
  int64_t steps = 200;
  int64_t every = 10;
  int64_t crash_at = -1;
  int hidden = 256;
};

[[noreturn]] void Usage(const char* argv0, int code) {
  std::fprintf(code ? stderr : stdout,
               "usage: %s [--dir DIR] [--steps N] [--every K] [--crash-at N] [--hidden H]\n\n"
               "Trains a small MLP on synthetic data, saving a flashckpt snapshot every K steps\n"
               "and resuming from the newest one (shared memory first, then DIR) on restart.\n\n"
               "  --dir DIR      checkpoint directory (default /tmp/flashckpt-train-mlp)\n"
               "  --steps N      train until step N (default 200)\n"
               "  --every K      snapshot every K steps (default 10)\n"
               "  --crash-at N   SIGKILL this process right after step N (to test recovery)\n"
               "  --hidden H     hidden width (default 256)\n",
               argv0);
  std::exit(code);
}

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s: %s needs a value\n", argv[0], f.c_str());
        Usage(argv[0], 2);
      }
      return argv[++i];
    };
    if (f == "--dir") a.dir = value();
    else if (f == "--steps") a.steps = std::stoll(value());
    else if (f == "--every") a.every = std::stoll(value());
    else if (f == "--crash-at") a.crash_at = std::stoll(value());
    else if (f == "--hidden") a.hidden = std::stoi(value());
    else if (f == "-h" || f == "--help") Usage(argv[0], 0);
    else {
      std::fprintf(stderr, "%s: unknown argument %s\n", argv[0], f.c_str());
      Usage(argv[0], 2);
    }
  }
  if (a.every < 1) { std::fprintf(stderr, "%s: --every must be >= 1\n", argv[0]); Usage(argv[0], 2); }
  return a;
}

// The batch of step s depends only on s, so a resumed run sees the same data.
std::pair<torch::Tensor, torch::Tensor> Batch(int64_t step) {
  auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(1000 + step));
  torch::Tensor x = at::randn({64, 32}, gen);
  torch::Tensor y = x.sin().sum(1, true) * 0.5;
  return {x, y};
}

}  // namespace

int main(int argc, char** argv) {
  Args args = Parse(argc, argv);
  at::set_num_threads(1);  // bit-exact results across runs
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(32, args.hidden), torch::nn::ReLU(),
                              torch::nn::Linear(args.hidden, args.hidden), torch::nn::ReLU(),
                              torch::nn::Linear(args.hidden, 1));
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));

  flashckpt::CheckpointerOptions o;
  o.directory = args.dir;
  o.keep_last = 3;
  flashckpt::Checkpointer ckpt(o);

  int64_t start = 0;
  auto mem = ckpt.latest_memory_step();
  auto disk = ckpt.latest_step();
  if (mem || disk) {
    auto t0 = std::chrono::steady_clock::now();
    std::map<std::string, std::string> extra;
    int64_t step = flashckpt::torch_adapter::load(ckpt, *model, &opt, &extra);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("resumed from step %lld (%s) in %.1f ms\n", static_cast<long long>(step),
                mem && *mem == step ? "shared memory" : "storage", ms);
    start = step;
  } else {
    std::printf("no checkpoint in %s: starting from scratch\n", args.dir.c_str());
  }

  for (int64_t step = start + 1; step <= args.steps; ++step) {
    auto [x, y] = Batch(step);
    opt.zero_grad();
    torch::Tensor loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    opt.step();
    if (step % 20 == 0 || step == args.steps) std::printf("step %lld loss %.6f\n", static_cast<long long>(step), loss.item<float>());
    if (step % args.every == 0 || step == args.steps) {
      auto t0 = std::chrono::steady_clock::now();
      flashckpt::torch_adapter::save(ckpt, step, *model, &opt, {{"step", std::to_string(step)}});
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("snapshot of step %lld in %.2f ms\n", static_cast<long long>(step), ms);
    }
    if (step == args.crash_at) {
      std::printf("crashing at step %lld (SIGKILL)\n", static_cast<long long>(step));
      std::fflush(stdout);
      ::kill(::getpid(), SIGKILL);
    }
  }
  ckpt.wait_all();
  // A digest of every parameter's bytes: equal digests mean bit-exact models.
  uint64_t h = 1469598103934665603ull;
  for (const auto& p : model->parameters()) {
    torch::Tensor c = p.detach().contiguous();
    auto* b = static_cast<const uint8_t*>(c.data_ptr());
    for (int64_t i = 0; i < c.numel() * c.element_size(); ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  std::printf("final parameters digest %016llx\n", static_cast<unsigned long long>(h));
  ckpt.close();
  return 0;
}
