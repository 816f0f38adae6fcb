// flashrun: a torchrun-compatible elastic launcher and node agent.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "launcher/checkpoint_hooks.h"
#include "launcher/elastic_agent.h"
#include "launcher/launch_options.h"
#include "launcher/worker_group.h"

int main(int argc, char** argv) {
  using namespace flashckpt::launcher;
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string out, err;
  ParseOutcome parsed = ParseLaunchOptions(args, [](const char* name) { return std::getenv(name); }, &out, &err);
  std::fputs(out.c_str(), stdout);
  std::fputs(err.c_str(), stderr);
  if (!parsed.options) return parsed.exit_code;
  // Before any thread exists, so that every thread inherits the mask and the
  // signals arrive only through the agent's signalfd.
  BlockHandledSignals(*parsed.options);
  BecomeSubreaper();
  CheckpointHooks hooks;
  return RunElasticAgent(*parsed.options, hooks);
}
