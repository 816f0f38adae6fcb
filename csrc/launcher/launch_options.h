// flashrun's command line: every torchrun flag with torchrun's defaults, both
// spellings (--nproc-per-node / --nproc_per_node) and PET_<FLAG> environment
// defaults, plus a few of our own. Bad values give argparse-style errors.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace flashckpt::launcher {

// Which std streams of which local ranks go to log files ("-r 3", "-r 0:1,1:2").
struct StreamSelection {
  std::optional<int> all_ranks;       // 0 none, 1 stdout, 2 stderr, 3 both
  std::map<int, int> per_local_rank;  // local rank -> the same bits
  int ForLocalRank(int local_rank) const;
};

struct LaunchOptions {
  int min_nodes = 1;
  int max_nodes = 1;
  std::string nproc_per_node_text = "1";
  int nproc_per_node = 1;
  std::string rdzv_backend = "static";
  std::string rdzv_endpoint;
  std::string rdzv_id = "none";
  std::map<std::string, std::string> rdzv_conf;
  bool standalone = false;
  int max_restarts = 0;
  double monitor_interval_s = 5.0;
  std::string start_method = "spawn";
  std::string role = "default";
  bool module = false;
  bool no_python = false;
  bool run_path = false;
  std::string log_dir;
  StreamSelection redirects;
  StreamSelection tee;
  std::optional<std::vector<int>> local_ranks_filter;
  // Worker output lines that contain any of these are also written to
  // <log dir>/<run>/attempt_<n>/filtered_{stdout,stderr}.log (torchrun 2.7).
  std::vector<std::string> duplicate_stdout_filters;
  std::vector<std::string> duplicate_stderr_filters;
  std::string event_log_handler = "null";  // "null" or "console" (torchelastic events as JSON lines on stderr)
  bool virtual_local_rank = false;         // LOCAL_RANK=0, CUDA_VISIBLE_DEVICES = the worker's device
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool master_addr_given = false;
  bool master_port_given = false;
  std::string local_addr;
  std::vector<int> signals_to_handle;
  double shutdown_timeout_s = 30.0;
  // Beyond torchrun.
  double worker_timeout_s = 0.0;  // 0: no hang detection
  std::string node_name;          // identity of this agent in the rendezvous (tests run several per host)
  bool standby = false;           // warm standby interpreters (see standby.h)
  std::string standby_import = "torch";
  std::string training_script;
  std::vector<std::string> training_script_args;
};

struct ParseOutcome {
  std::optional<LaunchOptions> options;  // set when the launch should go on
  int exit_code = 0;                     // otherwise: 0 after --help, 2 after an error
};

// argv without the program name. `getenv` reads PET_* defaults (injectable for tests).
// Errors and help are written to the given streams.
ParseOutcome ParseLaunchOptions(const std::vector<std::string>& args,
                                const std::function<const char*(const char*)>& getenv,
                                std::string* out_text, std::string* err_text);

std::string UsageLine();

// The GPUs a worker sees: torch.cuda.device_count()'s rule for
// CUDA_VISIBLE_DEVICES (nullptr: unset, every one of `physical`): the entries
// up to the first that is not a device (an index below `physical`, or a GPU-/MIG-
// UUID), without repeats.
int VisibleGpus(int physical, const char* cuda_visible_devices);
// torchrun's comma_separated_list: "a,b" -> {a, b}; ",," is a literal comma. Empty items are dropped.
std::vector<std::string> CommaSeparatedList(const std::string& text);

// "SIGTERM" -> 15; nullopt for an unknown name.
std::optional<int> SignalNumberFromName(const std::string& name);
std::string SignalName(int signal_number);

}  // namespace flashckpt::launcher
