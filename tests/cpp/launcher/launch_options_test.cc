#include "launcher/launch_options.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

namespace flashckpt::launcher {
namespace {

struct Parsed {
  ParseOutcome outcome;
  std::string out, err;
};

Parsed Parse(std::vector<std::string> args, std::map<std::string, std::string> env = {}) {
  Parsed p;
  p.outcome = ParseLaunchOptions(
      args,
      [&](const char* name) -> const char* {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
      },
      &p.out, &p.err);
  return p;
}

TEST(LaunchOptions, TorchrunDefaults) {
  Parsed p = Parse({"--no-python", "true"});
  ASSERT_TRUE(p.outcome.options) << p.err;
  const LaunchOptions& o = *p.outcome.options;
  EXPECT_EQ(o.min_nodes, 1);
  EXPECT_EQ(o.max_nodes, 1);
  EXPECT_EQ(o.nproc_per_node, 1);
  EXPECT_EQ(o.rdzv_backend, "static");
  EXPECT_EQ(o.rdzv_id, "none");
  EXPECT_EQ(o.max_restarts, 0);
  EXPECT_DOUBLE_EQ(o.monitor_interval_s, 5.0);
  EXPECT_EQ(o.role, "default");
  EXPECT_EQ(o.master_addr, "127.0.0.1");
  EXPECT_EQ(o.master_port, 29500);
  EXPECT_EQ(o.signals_to_handle.size(), 4u);
}

TEST(LaunchOptions, BothSpellingsEqualsFormAndScriptArgs) {
  Parsed p = Parse({"--nproc_per_node=2", "--max-restarts", "3", "--rdzv_conf", "join_timeout=5,is_host=1", "-r3",
                    "-t", "0:1,1:2", "--nnodes", "1:4", "--rdzv-backend", "c10d", "--no_python", "prog", "--nnodes",
                    "x"});
  ASSERT_TRUE(p.outcome.options) << p.err;
  const LaunchOptions& o = *p.outcome.options;
  EXPECT_EQ(o.nproc_per_node, 2);
  EXPECT_EQ(o.max_restarts, 3);
  EXPECT_EQ(o.rdzv_conf.at("join_timeout"), "5");
  EXPECT_EQ(o.redirects.ForLocalRank(7), 3);
  EXPECT_EQ(o.tee.ForLocalRank(1), 2);
  EXPECT_EQ(o.tee.ForLocalRank(2), 0);
  EXPECT_EQ(o.min_nodes, 1);
  EXPECT_EQ(o.max_nodes, 4);
  EXPECT_EQ(o.training_script, "prog");
  EXPECT_EQ(o.training_script_args, (std::vector<std::string>{"--nnodes", "x"}));
}

TEST(LaunchOptions, PetEnvironmentGivesDefaultsAndFlagsWin) {
  Parsed p = Parse({"--max_restarts", "1", "--no-python", "prog"},
                   {{"PET_NPROC_PER_NODE", "3"}, {"PET_MAX_RESTARTS", "9"}, {"PET_STANDALONE", "1"}});
  ASSERT_TRUE(p.outcome.options) << p.err;
  EXPECT_EQ(p.outcome.options->nproc_per_node, 3);
  EXPECT_EQ(p.outcome.options->max_restarts, 1);
  EXPECT_TRUE(p.outcome.options->standalone);
}

TEST(LaunchOptions, BadValuesAreArgparseErrors) {
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"--nnodes", "0", "--no-python", "p"},
           {"--nnodes", "3:2", "--no-python", "p"},
           {"--nproc-per-node", "lots", "--no-python", "p"},
           {"--unknown", "--no-python", "p"},
           {"--rdzv-conf", "nonsense", "--no-python", "p"},
           {"--rdzv-conf", "colour=blue", "--no-python", "p"},
           {"--signals-to-handle", "SIGKILL", "--no-python", "p"},
           {"--start-method", "thread", "--no-python", "p"},
           {"--max-restarts"},
           {"/definitely/not/here.py"},
           {}}) {
    Parsed p = Parse(args);
    EXPECT_FALSE(p.outcome.options);
    EXPECT_EQ(p.outcome.exit_code, 2);
    EXPECT_EQ(p.err.rfind("usage: flashrun", 0), 0u) << p.err;
    EXPECT_NE(p.err.find("flashrun: error: "), std::string::npos) << p.err;
  }
}

TEST(LaunchOptions, StandbyIsAFlashrunFlagForPythonWorkers) {
  Parsed ok = Parse({"--standby", "--standby-import", "torch,numpy", "--no-python", "--help"});
  EXPECT_NE(ok.out.find("--standby-import STANDBY_IMPORT"), std::string::npos) << ok.out;
  Parsed p = Parse({"--standby", "--standby_import", "json", "-m", "pkg.train"});
  ASSERT_TRUE(p.outcome.options) << p.err;
  EXPECT_TRUE(p.outcome.options->standby);
  EXPECT_EQ(p.outcome.options->standby_import, "json");
  EXPECT_FALSE(Parse({"-m", "pkg.train"}).outcome.options->standby);
  Parsed bad = Parse({"--standby", "--no-python", "trainer"});
  EXPECT_FALSE(bad.outcome.options);
  EXPECT_EQ(bad.outcome.exit_code, 2);
  EXPECT_NE(bad.err.find("argument --standby: a standby is a Python interpreter; it does not go with --no-python"),
            std::string::npos) << bad.err;
}

TEST(LaunchOptions, HelpExitsZero) {
  Parsed p = Parse({"--help"});
  EXPECT_FALSE(p.outcome.options);
  EXPECT_EQ(p.outcome.exit_code, 0);
  EXPECT_NE(p.out.find("--nproc-per-node NPROC_PER_NODE, --nproc_per_node NPROC_PER_NODE"), std::string::npos);
}

// The flags torch 2.x's torchrun has beyond 1.13's (torch/distributed/run.py):
// honoured, or refused with the reason.
TEST(LaunchOptions, Torch2FlagsAreHonouredOrRefusedWithAReason) {
  Parsed p = Parse({"--duplicate-stdout-filters", "loss,,acc,step", "--duplicate_stderr_filters", "NCCL",
                    "--event-log-handler", "console", "--virtual-local-rank", "--no-python", "p"});
  ASSERT_TRUE(p.outcome.options) << p.err;
  const LaunchOptions& o = *p.outcome.options;
  EXPECT_EQ(o.duplicate_stdout_filters, (std::vector<std::string>{"loss,acc", "step"}));
  EXPECT_EQ(o.duplicate_stderr_filters, (std::vector<std::string>{"NCCL"}));
  EXPECT_EQ(o.event_log_handler, "console");
  EXPECT_TRUE(o.virtual_local_rank);
  Parsed d = Parse({"--no-python", "p"});
  EXPECT_TRUE(d.outcome.options->duplicate_stdout_filters.empty());
  EXPECT_EQ(d.outcome.options->event_log_handler, "null");
  EXPECT_FALSE(d.outcome.options->virtual_local_rank);

  struct Refused {
    std::vector<std::string> args;
    std::map<std::string, std::string> env;
    std::string says;
  };
  for (const Refused& r : std::vector<Refused>{
           {{"--logs-specs", "custom", "--no-python", "p"}, {}, "argument --logs-specs: 'custom' names a Python entry point"},
           {{"--numa-binding", "node", "--no-python", "p"}, {}, "argument --numa-binding: 'node' is not supported yet"},
           {{"--start-method", "fork", "--no-python", "p"}, {}, "argument --start-method: 'fork' is not supported"},
           {{"--start_method", "forkserver", "--no-python", "p"}, {}, "use --standby"},
           {{"--event-log-handler", "dynamic_rendezvous", "--no-python", "p"}, {}, "choose from 'null', 'console'"},
           {{"--nproc-per-node", "4", "--virtual-local-rank", "--no-python", "p"},
            {{"CUDA_VISIBLE_DEVICES", "2,3"}},
            "CUDA_VISIBLE_DEVICES='2,3' lists 2 devices for 4 workers"},
       }) {
    Parsed bad = Parse(r.args, r.env);
    EXPECT_FALSE(bad.outcome.options) << r.says;
    EXPECT_EQ(bad.outcome.exit_code, 2);
    EXPECT_NE(bad.err.find(r.says), std::string::npos) << bad.err;
  }
  EXPECT_TRUE(Parse({"--start-method", "spawn", "--no-python", "p"}).outcome.options);
  Parsed help = Parse({"--help"});
  for (const char* flag : {"--duplicate-stdout-filters DUPLICATE_STDOUT_FILTERS", "--event-log-handler",
                           "--virtual-local-rank", "--logs-specs", "--numa-binding", "xpu"})
    EXPECT_NE(help.out.find(flag), std::string::npos) << flag;
}

TEST(LaunchOptions, EtcdV3IsABackendWithTlsAndTheV2BackendsAreRefusedWithTheReason) {
  Parsed ok = Parse({"--rdzv-backend", "etcd-v3", "--rdzv-endpoint", "10.0.0.1:2379,10.0.0.2:2379", "--rdzv-conf",
                     "user=job,password_file=/run/pw,key_prefix=/team/,protocol=http", "--nnodes", "1:4",
                     "--no-python", "p"});
  ASSERT_TRUE(ok.outcome.options) << ok.err;
  EXPECT_EQ(ok.outcome.options->rdzv_backend, "etcd-v3");
  EXPECT_EQ(ok.outcome.options->rdzv_conf.at("user"), "job");
  EXPECT_EQ(ok.outcome.options->rdzv_conf.at("key_prefix"), "/team/");
  // TLS as torchrun takes it; the files are checked when the options are parsed.
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("fck-tls-options-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ca = (dir / "ca.pem").string(), cert = (dir / "client.pem").string(),
                    key = (dir / "client.key").string(), missing = (dir / "missing.pem").string();
  for (const std::string& f : {ca, cert, key}) std::ofstream(f) << "PEM\n";
  Parsed tls = Parse({"--rdzv-backend", "etcd-v3", "--rdzv-endpoint", "etcd-0:2379", "--rdzv-conf",
                      "protocol=https,cacert=" + ca + ",cert=" + cert + ",key=" + key, "--no-python", "p"});
  ASSERT_TRUE(tls.outcome.options) << tls.err;
  EXPECT_EQ(tls.outcome.options->rdzv_conf.at("protocol"), "https");
  EXPECT_EQ(tls.outcome.options->rdzv_conf.at("cacert"), ca);
  EXPECT_EQ(tls.outcome.options->rdzv_conf.at("cert"), cert);
  EXPECT_EQ(tls.outcome.options->rdzv_conf.at("key"), key);
  EXPECT_TRUE(Parse({"--rdzv-backend", "etcd-v3", "--rdzv-endpoint", "etcd-0:2379", "--rdzv-conf", "cacert=" + ca,
                     "--no-python", "p"})
                  .outcome.options);
  for (const auto& [args, says] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--rdzv-backend", "etcd"}, "'etcd' is torchrun's rendezvous over etcd's v2 API"},
           {{"--rdzv-backend", "etcd-v2"}, "use --rdzv-backend etcd-v3"},
           {{"--rdzv-backend", "zookeeper"}, "choose from 'static', 'c10d', 'etcd-v3'"},
           {{"--rdzv-conf", "protocol=ftp"}, "argument --rdzv-conf: protocol=ftp must be http or https"},
           {{"--rdzv-conf", "cacert=" + missing},
            "argument --rdzv-conf: cacert=" + missing + " cannot be read: No such file or directory"},
           {{"--rdzv-conf", "cacert=" + ca + ",cert=" + missing}, "cert=" + missing + " cannot be read"},
           {{"--rdzv-conf", "cert=" + cert + ",key=" + missing}, "key=" + missing + " cannot be read"},
           {{"--rdzv-conf", "cacert=" + dir.string()}, "cacert=" + dir.string() + " is a directory"},
           {{"--rdzv-conf", "key_prefix=flashrun"}, "key_prefix=flashrun must start with '/'"},
       }) {
    std::vector<std::string> full = args;
    full.insert(full.end(), {"--no-python", "p"});
    Parsed bad = Parse(full);
    EXPECT_FALSE(bad.outcome.options) << says;
    EXPECT_NE(bad.err.find(says), std::string::npos) << bad.err;
  }
  Parsed help = Parse({"--help"});
  for (const char* key : {"protocol (http or https)", "cacert (the CA", "cert and key"})
    EXPECT_NE(help.out.find(key), std::string::npos) << key;
  std::filesystem::remove_all(dir);
}

TEST(LaunchOptions, VisibleGpusFollowTorchsRuleForCudaVisibleDevices) {
  EXPECT_EQ(VisibleGpus(4, nullptr), 4);
  EXPECT_EQ(VisibleGpus(4, "0,1"), 2);
  EXPECT_EQ(VisibleGpus(4, ""), 0);
  EXPECT_EQ(VisibleGpus(4, "-1"), 0);     // "no GPU", as people write it
  EXPECT_EQ(VisibleGpus(4, "2,7,1"), 1);  // up to the first device that is not there
  EXPECT_EQ(VisibleGpus(4, "1,1"), 1);    // a repeat ends the list
  EXPECT_EQ(VisibleGpus(2, "GPU-8c3a,MIG-1f2e"), 2);
  EXPECT_EQ(VisibleGpus(8, " 3 , 5 "), 2);
  EXPECT_EQ(VisibleGpus(0, "0"), 0);
}

TEST(LaunchOptions, CommaSeparatedListLikeTorchrun) {
  EXPECT_EQ(CommaSeparatedList("a,b"), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(CommaSeparatedList("a,,b"), (std::vector<std::string>{"a,b"}));
  EXPECT_EQ(CommaSeparatedList(""), std::vector<std::string>{});
  EXPECT_EQ(CommaSeparatedList("x,"), (std::vector<std::string>{"x"}));
}

}  // namespace
}  // namespace flashckpt::launcher
