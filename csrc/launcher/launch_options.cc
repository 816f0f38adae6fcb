#include "launcher/launch_options.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <set>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace flashckpt::launcher {
namespace {

constexpr const char* kUsage =
    "usage: flashrun [-h] [--nnodes NNODES] [--nproc-per-node NPROC_PER_NODE]\n"
    "                [--rdzv-backend RDZV_BACKEND] [--rdzv-endpoint RDZV_ENDPOINT]\n"
    "                [--rdzv-id RDZV_ID] [--rdzv-conf RDZV_CONF] [--standalone]\n"
    "                [--max-restarts MAX_RESTARTS]\n"
    "                [--monitor-interval MONITOR_INTERVAL]\n"
    "                [--start-method {spawn,fork,forkserver}] [--role ROLE] [-m]\n"
    "                [--no-python] [--run-path] [--log-dir LOG_DIR] [-r REDIRECTS]\n"
    "                [-t TEE] [--local-ranks-filter LOCAL_RANKS_FILTER]\n"
    "                [--duplicate-stdout-filters DUPLICATE_STDOUT_FILTERS]\n"
    "                [--duplicate-stderr-filters DUPLICATE_STDERR_FILTERS]\n"
    "                [--event-log-handler EVENT_LOG_HANDLER]\n"
    "                [--node-rank NODE_RANK] [--master-addr MASTER_ADDR]\n"
    "                [--master-port MASTER_PORT] [--local-addr LOCAL_ADDR]\n"
    "                [--logs-specs LOGS_SPECS] [--numa-binding NUMA_BINDING]\n"
    "                [--signals-to-handle SIGNALS_TO_HANDLE]\n"
    "                [--shutdown-timeout SHUTDOWN_TIMEOUT] [--virtual-local-rank]\n"
    "                [--worker-timeout WORKER_TIMEOUT] [--node-name NODE_NAME]\n"
    "                [--standby] [--standby-import STANDBY_IMPORT]\n"
    "                [--max-nproc-per-node MAX_NPROC_PER_NODE]\n"
    "                training_script ...\n";

constexpr const char* kHelpBody =
    "\n"
    "flashrun: Torch Distributed Elastic Training Launcher (torchrun-compatible)\n"
    "\n"
    "positional arguments:\n"
    "  training_script       Full path to the (single GPU) training program/script\n"
    "                        to be launched in parallel, followed by all the\n"
    "                        arguments for the training script.\n"
    "  training_script_args\n"
    "\n"
    "options:\n"
    "  -h, --help            show this help message and exit\n"
    "  --nnodes NNODES       Number of nodes, or the range of nodes in form\n"
    "                        <minimum_nodes>:<maximum_nodes>.\n"
    "  --nproc-per-node NPROC_PER_NODE, --nproc_per_node NPROC_PER_NODE\n"
    "                        Number of workers per node; supported values: [auto,\n"
    "                        cpu, gpu, xpu, int] (gpu counts the devices\n"
    "                        CUDA_VISIBLE_DEVICES leaves visible).\n"
    "  --rdzv-backend RDZV_BACKEND, --rdzv_backend RDZV_BACKEND\n"
    "                        Rendezvous backend: static, c10d (built in) or\n"
    "                        etcd-v3 (etcd's v3 API; 'etcd' and 'etcd-v2',\n"
    "                        torchrun's v2-API backends, are refused).\n"
    "  --rdzv-endpoint RDZV_ENDPOINT, --rdzv_endpoint RDZV_ENDPOINT\n"
    "                        Rendezvous backend endpoint; usually in form\n"
    "                        <host>:<port>; for etcd-v3 a list of members,\n"
    "                        host:port[,host:port...].\n"
    "  --rdzv-id RDZV_ID, --rdzv_id RDZV_ID\n"
    "                        User-defined group id.\n"
    "  --rdzv-conf RDZV_CONF, --rdzv_conf RDZV_CONF\n"
    "                        Additional rendezvous configuration\n"
    "                        (<key1>=<value1>,<key2>=<value2>,...): join_timeout,\n"
    "                        last_call_timeout, close_timeout, keep_alive_interval,\n"
    "                        keep_alive_max_attempt, is_host, read_timeout,\n"
    "                        token_file; for etcd-v3 also user, password_file\n"
    "                        (or FLASHRUN_ETCD_PASSWORD), key_prefix (default\n"
    "                        /flashrun/), protocol (http or https), cacert (the CA\n"
    "                        file etcd's certificate is checked against; default:\n"
    "                        the system's), cert and key (a client certificate and\n"
    "                        its key, for etcd --client-cert-auth); cacert, cert\n"
    "                        or key imply https.\n"
    "  --standalone          Start a local standalone rendezvous backend on a free\n"
    "                        port. Useful when launching single-node, multi-worker\n"
    "                        job. If specified --rdzv-backend, --rdzv-endpoint,\n"
    "                        --rdzv-id are auto-assigned; any explicitly set values\n"
    "                        are ignored.\n"
    "  --max-restarts MAX_RESTARTS, --max_restarts MAX_RESTARTS\n"
    "                        Maximum number of worker group restarts before\n"
    "                        failing.\n"
    "  --monitor-interval MONITOR_INTERVAL, --monitor_interval MONITOR_INTERVAL\n"
    "                        Interval, in seconds, to monitor the state of workers\n"
    "                        (exits are noticed at once; this bounds heartbeat\n"
    "                        checks).\n"
    "  --start-method {spawn,fork,forkserver}, --start_method {spawn,fork,forkserver}\n"
    "                        Multiprocessing start method to use when creating\n"
    "                        workers: spawn (every worker is a fresh process;\n"
    "                        fork and forkserver are refused, see --standby).\n"
    "  --event-log-handler EVENT_LOG_HANDLER, --event_log_handler EVENT_LOG_HANDLER\n"
    "                        null (default) or console: torchelastic's worker and\n"
    "                        agent status events, a JSON line each on stderr, when\n"
    "                        the job ends.\n"
    "  --role ROLE           User-defined role for the workers.\n"
    "  -m, --module          Change each process to interpret the launch script as\n"
    "                        a Python module, executing with the same behavior as\n"
    "                        'python -m'.\n"
    "  --no-python, --no_python\n"
    "                        Skip prepending the training script with 'python' -\n"
    "                        just execute it directly. Useful when the script is\n"
    "                        not a Python script.\n"
    "  --run-path, --run_path\n"
    "                        Run the training script with runpy.run_path. Script\n"
    "                        must be provided as an abs path (e.g.\n"
    "                        /abs/path/script.py). Takes precedence over\n"
    "                        --no-python.\n"
    "  --log-dir LOG_DIR, --log_dir LOG_DIR\n"
    "                        Base directory to use for log files (e.g.\n"
    "                        /var/log/torch/elastic). The same directory is re-used\n"
    "                        for multiple runs (a unique job-level sub-directory is\n"
    "                        created with rdzv_id as the prefix).\n"
    "  -r REDIRECTS, --redirects REDIRECTS\n"
    "                        Redirect std streams into a log file in the log\n"
    "                        directory (e.g. [-r 3] redirects both stdout+stderr\n"
    "                        for all workers, [-r 0:1,1:2] redirects stdout for\n"
    "                        local rank 0 and stderr for local rank 1).\n"
    "  -t TEE, --tee TEE     Tee std streams into a log file and also to console\n"
    "                        (see --redirects for format).\n"
    "  --local-ranks-filter LOCAL_RANKS_FILTER, --local_ranks_filter LOCAL_RANKS_FILTER\n"
    "                        Only show logs from specified ranks in console (e.g.\n"
    "                        [--local-ranks-filter=0,1,2] will only show logs from\n"
    "                        rank 0, 1 and 2).\n"
    "  --duplicate-stdout-filters DUPLICATE_STDOUT_FILTERS, --duplicate_stdout_filters DUPLICATE_STDOUT_FILTERS\n"
    "                        Duplicates worker stdout lines that contain any of\n"
    "                        these comma-separated strings (',,' is a comma) to\n"
    "                        <log-dir>/<run>/attempt_<n>/filtered_stdout.log.\n"
    "  --duplicate-stderr-filters DUPLICATE_STDERR_FILTERS, --duplicate_stderr_filters DUPLICATE_STDERR_FILTERS\n"
    "                        The same for stderr (filtered_stderr.log).\n"
    "  --node-rank NODE_RANK, --node_rank NODE_RANK\n"
    "                        Rank of the node for multi-node distributed training.\n"
    "  --master-addr MASTER_ADDR, --master_addr MASTER_ADDR\n"
    "                        Address of the master node (rank 0), only used for\n"
    "                        static rendezvous. It should be either the IP address\n"
    "                        or the hostname of rank 0.\n"
    "  --master-port MASTER_PORT, --master_port MASTER_PORT\n"
    "                        Port on the master node (rank 0) to be used for\n"
    "                        communication during distributed training; only used\n"
    "                        for static rendezvous.\n"
    "  --local-addr LOCAL_ADDR, --local_addr LOCAL_ADDR\n"
    "                        Address of the local node. If specified, will use the\n"
    "                        given address for connection. Else, will look up the\n"
    "                        local node address instead.\n"
    "  --logs-specs LOGS_SPECS, --logs_specs LOGS_SPECS\n"
    "                        Refused: a torchrun.logs_specs entry point is Python\n"
    "                        code torchrun loads into itself.\n"
    "  --numa-binding NUMA_BINDING, --numa_binding NUMA_BINDING\n"
    "                        Refused: NUMA binding is not supported yet.\n"
    "  --signals-to-handle SIGNALS_TO_HANDLE, --signals_to_handle SIGNALS_TO_HANDLE\n"
    "                        Comma-separated list of signals to handle and forward\n"
    "                        to the workers.\n"
    "  --shutdown-timeout SHUTDOWN_TIMEOUT, --shutdown_timeout SHUTDOWN_TIMEOUT\n"
    "                        Seconds between SIGTERM and SIGKILL when stopping\n"
    "                        workers.\n"
    "  --virtual-local-rank, --virtual_local_rank\n"
    "                        Every worker gets LOCAL_RANK=0 and, as\n"
    "                        CUDA_VISIBLE_DEVICES, the one device it is assigned\n"
    "                        (the local_rank-th of those the agent sees).\n"
    "  --worker-timeout WORKER_TIMEOUT, --worker_timeout WORKER_TIMEOUT\n"
    "                        (flashrun) A worker that sends no heartbeat for this\n"
    "                        many seconds is treated as hung and restarted\n"
    "                        (default 0: off).\n"
    "  --node-name NODE_NAME, --node_name NODE_NAME\n"
    "                        (flashrun) Identity of this agent in the rendezvous\n"
    "                        (default: <fqdn>_<pid>); lets tests run several nodes\n"
    "                        on one host.\n"
    "  --standby             (flashrun) Keep one warm Python interpreter per local\n"
    "                        rank, with --standby-import already imported, started\n"
    "                        5 s after the workers; a restart hands the worker's\n"
    "                        command and environment to it instead of starting a\n"
    "                        fresh interpreter (the script runs as with runpy).\n"
    "  --standby-import STANDBY_IMPORT, --standby_import STANDBY_IMPORT\n"
    "                        (flashrun) Comma-separated modules a standby imports\n"
    "                        ahead (default: torch).\n"
    "  --max-nproc-per-node MAX_NPROC_PER_NODE, --max_nproc_per_node MAX_NPROC_PER_NODE\n"
    "                        (flashrun) The most workers --nproc-per-node may ask\n"
    "                        for on this node (default: 4 per CPU, at least 64);\n"
    "                        every worker is a whole process with its own memory.\n";

enum class ValueKind { kNone, kRequired };

struct FlagSpec {
  std::string dest;                // e.g. "nproc_per_node"
  std::vector<std::string> names;  // all accepted spellings
  ValueKind kind;
  std::string metavar;
};

const std::vector<FlagSpec>& Flags() {
  static const std::vector<FlagSpec> flags = [] {
    std::vector<FlagSpec> f;
    auto add = [&](std::string dest, std::vector<std::string> extra, ValueKind kind) {
      std::vector<std::string> names;
      std::string hyphen = dest;
      std::replace(hyphen.begin(), hyphen.end(), '_', '-');
      names.push_back("--" + hyphen);
      if (hyphen != dest) names.push_back("--" + dest);
      for (auto& e : extra) names.push_back(e);
      std::string metavar = absl::AsciiStrToUpper(dest);
      f.push_back(FlagSpec{dest, names, kind, metavar});
    };
    add("nnodes", {}, ValueKind::kRequired);
    add("nproc_per_node", {}, ValueKind::kRequired);
    add("rdzv_backend", {}, ValueKind::kRequired);
    add("rdzv_endpoint", {}, ValueKind::kRequired);
    add("rdzv_id", {}, ValueKind::kRequired);
    add("rdzv_conf", {}, ValueKind::kRequired);
    add("standalone", {}, ValueKind::kNone);
    add("max_restarts", {}, ValueKind::kRequired);
    add("monitor_interval", {}, ValueKind::kRequired);
    add("start_method", {}, ValueKind::kRequired);
    add("role", {}, ValueKind::kRequired);
    add("module", {"-m"}, ValueKind::kNone);
    add("no_python", {}, ValueKind::kNone);
    add("run_path", {}, ValueKind::kNone);
    add("log_dir", {}, ValueKind::kRequired);
    add("redirects", {"-r"}, ValueKind::kRequired);
    add("tee", {"-t"}, ValueKind::kRequired);
    add("local_ranks_filter", {}, ValueKind::kRequired);
    add("duplicate_stdout_filters", {}, ValueKind::kRequired);
    add("duplicate_stderr_filters", {}, ValueKind::kRequired);
    add("event_log_handler", {}, ValueKind::kRequired);
    add("logs_specs", {}, ValueKind::kRequired);
    add("numa_binding", {}, ValueKind::kRequired);
    add("virtual_local_rank", {}, ValueKind::kNone);
    add("node_rank", {}, ValueKind::kRequired);
    add("master_addr", {}, ValueKind::kRequired);
    add("master_port", {}, ValueKind::kRequired);
    add("local_addr", {}, ValueKind::kRequired);
    add("signals_to_handle", {}, ValueKind::kRequired);
    add("shutdown_timeout", {}, ValueKind::kRequired);
    add("worker_timeout", {}, ValueKind::kRequired);
    add("node_name", {}, ValueKind::kRequired);
    add("standby", {}, ValueKind::kNone);
    add("standby_import", {}, ValueKind::kRequired);
    add("max_nproc_per_node", {}, ValueKind::kRequired);
    return f;
  }();
  return flags;
}

struct ParseError {
  std::string message;
};

int CountPhysicalGpus() {
  int count = 0;
  for (int i = 0; i < 64; ++i) {
    struct stat st;
    if (::stat(absl::StrCat("/dev/nvidia", i).c_str(), &st) == 0) ++count;
  }
  return count;
}

// Intel GPUs (torch.xpu): DRM render nodes whose PCI vendor is Intel.
int CountXpus() {
  int count = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/sys/class/drm", ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("renderD", 0) != 0) continue;
    std::ifstream vendor(e.path() / "device" / "vendor");
    std::string v;
    if (vendor >> v && v == "0x8086") ++count;
  }
  return count;
}

int CountCpus() {
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

std::optional<std::string> ParseStreamSelection(const std::string& text, StreamSelection* out) {
  StreamSelection selection;
  int all = 0;
  if (absl::SimpleAtoi(text, &all)) {
    if (all < 0 || all > 3) return "must be 0, 1, 2 or 3 (none, stdout, stderr, both), or <local_rank>:<0-3>,...";
    selection.all_ranks = all;
    *out = selection;
    return std::nullopt;
  }
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<std::string> kv = absl::StrSplit(part, ':');
    int rank = 0, bits = 0;
    if (kv.size() != 2 || !absl::SimpleAtoi(kv[0], &rank) || !absl::SimpleAtoi(kv[1], &bits) || rank < 0 ||
        bits < 0 || bits > 3) {
      return absl::StrFormat("'%s' is not <local_rank>:<0-3>", std::string(part));
    }
    selection.per_local_rank[rank] = bits;
  }
  *out = selection;
  return std::nullopt;
}

bool ParseDouble(const std::string& text, double* value) { return absl::SimpleAtod(text, value); }

// A --rdzv-conf value parsed strictly: a typo must not become 0 (a rendezvous
// that never waits, or keep-alives in a busy loop).
std::optional<std::string> CheckRdzvConfValue(const std::string& key, const std::string& value) {
  static const std::set<std::string> kPositiveSeconds = {"join_timeout", "timeout", "keep_alive_interval",
                                                          "read_timeout"};
  static const std::set<std::string> kSeconds = {"last_call_timeout", "close_timeout"};
  if (kPositiveSeconds.count(key) || kSeconds.count(key)) {
    double v = 0;
    if (!absl::SimpleAtod(value, &v) || !std::isfinite(v))
      return absl::StrFormat("%s=%s is not a number of seconds", key, value);
    if (kPositiveSeconds.count(key) && !(v > 0))
      return absl::StrFormat("%s=%s must be a positive number of seconds", key, value);
    if (v < 0) return absl::StrFormat("%s=%s must be 0 or more seconds", key, value);
    if (key == "keep_alive_interval" && v < 0.05)
      return absl::StrFormat("%s=%s is below 0.05 s (keep-alives that often would only load the server)", key, value);
  } else if (key == "keep_alive_max_attempt") {
    int n = 0;
    if (!absl::SimpleAtoi(value, &n) || n < 1)
      return absl::StrFormat("%s=%s must be a whole number of attempts, 1 or more", key, value);
  } else if (key == "protocol") {
    if (value != "http" && value != "https") return absl::StrFormat("protocol=%s must be http or https", value);
  } else if (key == "cacert" || key == "cert" || key == "key") {
    // Read by every agent when it joins: a wrong path is better found now than at the first rendezvous.
    struct stat st {};
    if (value.empty()) return absl::StrFormat("%s= names no file (a PEM file for TLS to etcd)", key);
    if (::access(value.c_str(), R_OK) != 0 || ::stat(value.c_str(), &st) != 0)
      return absl::StrFormat("%s=%s cannot be read: %s", key, value, std::strerror(errno));
    if (S_ISDIR(st.st_mode)) return absl::StrFormat("%s=%s is a directory, not a PEM file", key, value);
  } else if (key == "key_prefix") {
    if (value.empty() || value.front() != '/')
      return absl::StrFormat("key_prefix=%s must start with '/' (e.g. /flashrun/)", value);
  } else if (key == "is_host") {
    static const std::set<std::string> kBools = {"true", "false", "1", "0", "True", "False", "yes", "no"};
    if (!kBools.count(value)) return absl::StrFormat("%s=%s is not true or false", key, value);
  }
  return std::nullopt;
}

}  // namespace

int StreamSelection::ForLocalRank(int local_rank) const {
  if (all_ranks) return *all_ranks;
  auto it = per_local_rank.find(local_rank);
  return it == per_local_rank.end() ? 0 : it->second;
}

std::string UsageLine() { return kUsage; }

int VisibleGpus(int physical, const char* cuda_visible_devices) {
  if (cuda_visible_devices == nullptr) return physical;
  std::set<std::string> seen;
  int count = 0;
  for (absl::string_view raw : absl::StrSplit(cuda_visible_devices, ',')) {
    const std::string item(absl::StripAsciiWhitespace(raw));
    int index = -1;
    const bool uuid = item.rfind("GPU-", 0) == 0 || item.rfind("MIG-", 0) == 0;
    if (!uuid && (!absl::SimpleAtoi(item, &index) || index < 0 || index >= physical)) break;
    if (!seen.insert(uuid ? item : std::to_string(index)).second) break;
    ++count;
  }
  return std::min(count, physical);
}

std::vector<std::string> CommaSeparatedList(const std::string& text) {
  std::vector<std::string> out;
  std::string item;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',' && i + 1 < text.size() && text[i + 1] == ',') {
      item += ',';
      ++i;
    } else if (text[i] == ',') {
      if (!item.empty()) out.push_back(item);
      item.clear();
    } else {
      item += text[i];
    }
  }
  if (!item.empty()) out.push_back(item);
  return out;
}

std::optional<int> SignalNumberFromName(const std::string& name) {
  static const std::map<std::string, int> known = {
      {"SIGTERM", SIGTERM}, {"SIGINT", SIGINT},   {"SIGHUP", SIGHUP},   {"SIGQUIT", SIGQUIT},
      {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}, {"SIGABRT", SIGABRT}, {"SIGKILL", SIGKILL},
      {"SIGSEGV", SIGSEGV}, {"SIGBUS", SIGBUS},   {"SIGFPE", SIGFPE},   {"SIGILL", SIGILL},
      {"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM}, {"SIGXCPU", SIGXCPU}, {"SIGTRAP", SIGTRAP},
  };
  auto it = known.find(absl::AsciiStrToUpper(name));
  if (it == known.end()) return std::nullopt;
  return it->second;
}

std::string SignalName(int signal_number) {
  static const std::map<int, std::string> names = [] {
    std::map<int, std::string> m;
    for (const char* n : {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGABRT", "SIGKILL",
                          "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGPIPE", "SIGALRM", "SIGXCPU", "SIGTRAP"}) {
      m[*SignalNumberFromName(n)] = n;
    }
    return m;
  }();
  auto it = names.find(signal_number);
  return it == names.end() ? absl::StrCat("SIG", signal_number) : it->second;
}

ParseOutcome ParseLaunchOptions(const std::vector<std::string>& args,
                                const std::function<const char*(const char*)>& getenv,
                                std::string* out_text, std::string* err_text) {
  std::map<std::string, std::string> values;  // dest -> raw text
  std::map<std::string, bool> switches;
  // PET_<DEST> environment variables give defaults, as in torchrun.
  for (const FlagSpec& flag : Flags()) {
    const std::string env_name = "PET_" + absl::AsciiStrToUpper(flag.dest);
    const char* env_value = getenv(env_name.c_str());
    if (env_value == nullptr) continue;
    if (flag.kind == ValueKind::kNone) {
      const std::string v = absl::AsciiStrToLower(env_value);
      switches[flag.dest] = !(v.empty() || v == "0" || v == "false" || v == "no");
    } else {
      values[flag.dest] = env_value;
    }
  }

  auto fail = [&](const std::string& message) {
    *err_text += kUsage;
    *err_text += absl::StrFormat("flashrun: error: %s\n", message);
    return ParseOutcome{std::nullopt, 2};
  };

  LaunchOptions options;
  size_t i = 0;
  for (; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "-h" || arg == "--help") {
      *out_text += kUsage;
      *out_text += kHelpBody;
      return ParseOutcome{std::nullopt, 0};
    }
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg.empty() || arg[0] != '-' || arg == "-") break;  // the training script
    std::string name = arg;
    std::optional<std::string> inline_value;
    if (const size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      name = arg.substr(0, eq);
      inline_value = arg.substr(eq + 1);
    } else if (arg.size() > 2 && arg[0] == '-' && arg[1] != '-') {
      name = arg.substr(0, 2);  // -r3 / -t3
      inline_value = arg.substr(2);
    }
    const FlagSpec* spec = nullptr;
    for (const FlagSpec& flag : Flags()) {
      if (std::find(flag.names.begin(), flag.names.end(), name) != flag.names.end()) spec = &flag;
    }
    if (spec == nullptr) return fail(absl::StrFormat("unrecognized arguments: %s", arg));
    if (spec->kind == ValueKind::kNone) {
      if (inline_value) {
        return fail(absl::StrFormat("argument %s: ignored explicit argument '%s'", spec->names[0], *inline_value));
      }
      switches[spec->dest] = true;
      continue;
    }
    if (inline_value) {
      values[spec->dest] = *inline_value;
    } else {
      if (i + 1 >= args.size()) {
        return fail(absl::StrFormat("argument %s: expected one argument", spec->names[0]));
      }
      values[spec->dest] = args[++i];
    }
  }
  if (i >= args.size()) return fail("the following arguments are required: training_script, training_script_args");
  options.training_script = args[i];
  options.training_script_args.assign(args.begin() + static_cast<long>(i) + 1, args.end());

  auto value_of = [&](const std::string& dest) -> std::optional<std::string> {
    auto it = values.find(dest);
    if (it == values.end()) return std::nullopt;
    return it->second;
  };
  auto int_flag = [&](const std::string& dest, int* out, int min_value) -> std::optional<std::string> {
    auto v = value_of(dest);
    if (!v) return std::nullopt;
    std::string hyphen = dest;
    std::replace(hyphen.begin(), hyphen.end(), '_', '-');
    if (!absl::SimpleAtoi(*v, out)) return absl::StrFormat("argument --%s: invalid int value: '%s'", hyphen, *v);
    if (*out < min_value) return absl::StrFormat("argument --%s: must be at least %d, got %d", hyphen, min_value, *out);
    return std::nullopt;
  };
  // Seconds: a finite number, positive (or also 0, which turns the thing off).
  auto double_flag = [&](const std::string& dest, double* out, bool zero_is_off) -> std::optional<std::string> {
    auto v = value_of(dest);
    if (!v) return std::nullopt;
    std::string hyphen = dest;
    std::replace(hyphen.begin(), hyphen.end(), '_', '-');
    if (!ParseDouble(*v, out) || !std::isfinite(*out))
      return absl::StrFormat("argument --%s: invalid float value: '%s'", hyphen, *v);
    if (zero_is_off && *out < 0)
      return absl::StrFormat("argument --%s: must be a number of seconds, 0 or more (0 turns it off), got '%s'",
                             hyphen, *v);
    if (!zero_is_off && !(*out > 0))
      return absl::StrFormat("argument --%s: must be a positive number of seconds, got '%s'", hyphen, *v);
    return std::nullopt;
  };

  // --nnodes N | MIN:MAX
  if (auto v = value_of("nnodes")) {
    std::vector<std::string> parts = absl::StrSplit(*v, ':');
    int lo = 0, hi = 0;
    bool ok = false;
    if (parts.size() == 1) {
      ok = absl::SimpleAtoi(parts[0], &lo);
      hi = lo;
    } else if (parts.size() == 2) {
      ok = absl::SimpleAtoi(parts[0], &lo) && absl::SimpleAtoi(parts[1], &hi);
    }
    if (!ok) return fail(absl::StrFormat("argument --nnodes: '%s' is not N or MIN:MAX", *v));
    if (lo < 1) return fail(absl::StrFormat("argument --nnodes: the minimum number of nodes must be at least 1, got '%s'", *v));
    if (hi < lo) {
      return fail(absl::StrFormat("argument --nnodes: the maximum (%d) is below the minimum (%d) in '%s'", hi, lo, *v));
    }
    options.min_nodes = lo;
    options.max_nodes = hi;
  }
  if (auto v = value_of("nproc_per_node")) {
    options.nproc_per_node_text = *v;
    int n = 0;
    const char* visible = getenv("CUDA_VISIBLE_DEVICES");
    const int physical = CountPhysicalGpus();
    if (*v == "cpu") {
      n = CountCpus();
    } else if (*v == "gpu") {
      n = VisibleGpus(physical, visible);
      if (n == 0)
        return fail(absl::StrFormat("argument --nproc-per-node: 'gpu' was asked for but no GPU is visible "
                                    "(%d in /dev/nvidia*, CUDA_VISIBLE_DEVICES=%s)",
                                    physical, visible ? absl::StrCat("'", visible, "'") : std::string("unset")));
    } else if (*v == "xpu") {
      n = CountXpus();
      if (n == 0) return fail("argument --nproc-per-node: 'xpu' was asked for but no Intel GPU is visible "
                              "(/sys/class/drm/renderD*, vendor 0x8086)");
    } else if (*v == "auto") {
      n = VisibleGpus(physical, visible);
      if (n == 0) n = CountXpus();
      if (n == 0) n = CountCpus();
    } else if (!absl::SimpleAtoi(*v, &n)) {
      return fail(absl::StrFormat("argument --nproc-per-node: '%s' is not one of [auto, cpu, gpu, xpu, int]", *v));
    }
    if (n < 1) return fail(absl::StrFormat("argument --nproc-per-node: must be at least 1, got '%s'", *v));
    options.nproc_per_node = n;
  }
  {
    // Every worker is a whole process (an interpreter with PyTorch: hundreds
    // of MiB): a count far beyond the node's CPUs is a typo, not a job.
    int limit = std::max(64, 4 * CountCpus());
    const bool given = value_of("max_nproc_per_node").has_value();
    if (auto e = int_flag("max_nproc_per_node", &limit, 1)) return fail(*e);
    if (options.nproc_per_node > limit)
      return fail(absl::StrFormat(
          "argument --nproc-per-node: %d workers is more than this node allows (%d: %s); every worker is a "
          "whole process with its own memory. Pass --max-nproc-per-node %d if you mean it",
          options.nproc_per_node, limit, given ? "--max-nproc-per-node" : absl::StrFormat("4 per CPU of %d, at least 64", CountCpus()),
          options.nproc_per_node));
  }
  if (auto v = value_of("rdzv_backend")) {
    if (*v == "etcd" || *v == "etcd-v2") {
      return fail(absl::StrFormat(
          "argument --rdzv-backend: '%s' is torchrun's rendezvous over etcd's v2 API (python-etcd); flashrun speaks "
          "etcd's v3 API only: use --rdzv-backend etcd-v3 with the same --rdzv-endpoint",
          *v));
    }
    if (*v != "static" && *v != "c10d" && *v != "etcd-v3") {
      return fail(absl::StrFormat(
          "argument --rdzv-backend: invalid choice: '%s' (choose from 'static', 'c10d', 'etcd-v3')", *v));
    }
    options.rdzv_backend = *v;
  }
  if (auto v = value_of("rdzv_endpoint")) options.rdzv_endpoint = *v;
  if (auto v = value_of("rdzv_id")) options.rdzv_id = *v;
  if (auto v = value_of("rdzv_conf")) {
    static const std::vector<std::string> known = {"join_timeout",        "last_call_timeout",
                                                   "close_timeout",       "keep_alive_interval",
                                                   "keep_alive_max_attempt", "is_host",
                                                   "read_timeout",        "timeout",
                                                   "token_file",          "user",
                                                   "password_file",       "key_prefix",
                                                   "protocol",            "cacert",
                                                   "cert",                "key"};
    for (absl::string_view part : absl::StrSplit(*v, ',', absl::SkipEmpty())) {
      std::vector<std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
      if (kv.size() != 2 || kv[0].empty()) {
        return fail(absl::StrFormat("argument --rdzv-conf: '%s' is not <key>=<value>", std::string(part)));
      }
      const std::string key(absl::StripAsciiWhitespace(kv[0]));
      if (std::find(known.begin(), known.end(), key) == known.end()) {
        return fail(absl::StrFormat("argument --rdzv-conf: unknown key '%s'", key));
      }
      const std::string value(absl::StripAsciiWhitespace(kv[1]));
      if (auto e = CheckRdzvConfValue(key, value)) return fail("argument --rdzv-conf: " + *e);
      options.rdzv_conf[key] = value;
    }
  }
  options.standalone = switches["standalone"];
  if (auto e = int_flag("max_restarts", &options.max_restarts, 0)) return fail(*e);
  if (auto e = double_flag("monitor_interval", &options.monitor_interval_s, false)) return fail(*e);
  if (auto v = value_of("start_method")) {
    if (*v != "spawn" && *v != "fork" && *v != "forkserver") {
      return fail(absl::StrFormat(
          "argument --start-method: invalid choice: '%s' (choose from 'spawn', 'fork', 'forkserver')", *v));
    }
    if (*v != "spawn")
      return fail(absl::StrFormat(
          "argument --start-method: '%s' is not supported: flashrun starts every worker as a fresh process "
          "(a new interpreter, as 'spawn' does; torchrun too runs a script that way whatever this says). For "
          "workers that start with their imports done, use --standby",
          *v));
    options.start_method = *v;
  }
  if (auto v = value_of("role")) options.role = *v;
  options.module = switches["module"];
  options.no_python = switches["no_python"];
  options.run_path = switches["run_path"];
  if (auto v = value_of("log_dir")) options.log_dir = *v;
  if (auto v = value_of("redirects")) {
    if (auto e = ParseStreamSelection(*v, &options.redirects)) return fail("argument -r/--redirects: " + *e);
  }
  if (auto v = value_of("tee")) {
    if (auto e = ParseStreamSelection(*v, &options.tee)) return fail("argument -t/--tee: " + *e);
  }
  if (auto v = value_of("local_ranks_filter")) {
    std::vector<int> ranks;
    for (absl::string_view part : absl::StrSplit(*v, ',', absl::SkipEmpty())) {
      int r = 0;
      if (!absl::SimpleAtoi(part, &r) || r < 0) {
        return fail(absl::StrFormat("argument --local-ranks-filter: '%s' is not a list of local ranks", *v));
      }
      ranks.push_back(r);
    }
    options.local_ranks_filter = ranks;
  }
  if (auto v = value_of("duplicate_stdout_filters")) options.duplicate_stdout_filters = CommaSeparatedList(*v);
  if (auto v = value_of("duplicate_stderr_filters")) options.duplicate_stderr_filters = CommaSeparatedList(*v);
  if (auto v = value_of("event_log_handler")) {
    if (*v != "null" && *v != "console")
      return fail(absl::StrFormat("argument --event-log-handler: '%s' is not a handler flashrun has (choose from "
                                  "'null', 'console'; torchrun's others are Python logging handlers registered "
                                  "in its process)",
                                  *v));
    options.event_log_handler = *v;
  }
  if (auto v = value_of("logs_specs"))
    return fail(absl::StrFormat(
        "argument --logs-specs: '%s' names a Python entry point (torchrun.logs_specs) that torchrun loads into "
        "its own interpreter; flashrun is not a Python process and cannot load it. Its log layout is torchrun's "
        "default: --log-dir, -r/--redirects, -t/--tee, --local-ranks-filter, --duplicate-stdout-filters",
        *v));
  if (auto v = value_of("numa_binding"))
    return fail(absl::StrFormat(
        "argument --numa-binding: '%s' is not supported yet (flashrun does not bind workers to NUMA nodes); "
        "bind them yourself, e.g. with numactl --cpunodebind in a --no-python wrapper",
        *v));
  options.virtual_local_rank = switches["virtual_local_rank"];
  if (const char* visible = getenv("CUDA_VISIBLE_DEVICES"); options.virtual_local_rank && visible) {
    const std::vector<std::string> listed = absl::StrSplit(visible, ',', absl::SkipEmpty());
    if (static_cast<int>(listed.size()) < options.nproc_per_node)
      return fail(absl::StrFormat("argument --virtual-local-rank: CUDA_VISIBLE_DEVICES='%s' lists %d devices for "
                                  "%d workers (each worker gets one of them as its device 0)",
                                  visible, listed.size(), options.nproc_per_node));
  }
  if (auto e = int_flag("node_rank", &options.node_rank, 0)) return fail(*e);
  if (auto v = value_of("master_addr")) {
    options.master_addr = *v;
    options.master_addr_given = true;
  }
  if (auto e = int_flag("master_port", &options.master_port, 0)) return fail(*e);
  if (value_of("master_port")) {
    if (options.master_port > 65535) return fail("argument --master-port: must be at most 65535");
    options.master_port_given = true;
  }
  if (auto v = value_of("local_addr")) options.local_addr = *v;
  const std::string signals = value_of("signals_to_handle").value_or("SIGTERM,SIGINT,SIGHUP,SIGQUIT");
  for (absl::string_view part : absl::StrSplit(signals, ',', absl::SkipEmpty())) {
    std::string name(absl::StripAsciiWhitespace(part));
    auto number = SignalNumberFromName(name);
    if (!number || *number == SIGKILL) {
      return fail(absl::StrFormat("argument --signals-to-handle: '%s' is not a signal that can be handled", name));
    }
    options.signals_to_handle.push_back(*number);
  }
  if (auto e = double_flag("shutdown_timeout", &options.shutdown_timeout_s, true)) return fail(*e);
  if (auto e = double_flag("worker_timeout", &options.worker_timeout_s, true)) return fail(*e);
  if (auto v = value_of("node_name")) options.node_name = *v;
  options.standby = switches["standby"];
  if (auto v = value_of("standby_import")) options.standby_import = *v;
  if (options.standby && options.no_python)
    return fail("argument --standby: a standby is a Python interpreter; it does not go with --no-python");

  if (options.node_rank >= options.max_nodes && options.rdzv_backend == "static" && !options.standalone) {
    return fail(absl::StrFormat("argument --node-rank: %d is not below --nnodes %d", options.node_rank, options.max_nodes));
  }
  if (options.rdzv_backend == "static" && !options.standalone && options.min_nodes != options.max_nodes) {
    return fail("argument --nnodes: the static rendezvous needs a fixed number of nodes (N, not MIN:MAX); use --rdzv-backend c10d");
  }
  // The script must exist unless it is a module or a program looked up on PATH.
  if (!options.module && !options.no_python) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(options.training_script, ec)) {
      return fail(absl::StrFormat("training script '%s' does not exist", options.training_script));
    }
  }
  return ParseOutcome{options, 0};
}

}  // namespace flashckpt::launcher
