// torchrun's failure summary: every failed worker, root cause (first observed
// failure) last, with the traceback from the worker's error file.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace flashckpt::launcher {

struct WorkerFailure {
  int local_rank = 0;
  int global_rank = 0;
  pid_t pid = 0;
  int exitcode = 0;          // negative: killed by that signal (as in torchrun)
  double timestamp_s = 0;    // wall clock when the failure was noticed
  std::string error_file;
  std::string message;       // filled by ReadErrorFile, or a signal / hang description
};

// Fills failure->message (and timestamp when the file has one) from the JSON error
// file a worker wrote through torch.distributed.elastic's @record, as torchrun does.
void ReadErrorFile(WorkerFailure* failure);

// The block torchrun prints when restarts run out ("<script> FAILED").
std::string FormatFailureSummary(const std::string& title_name, const std::string& hostname,
                                 const std::vector<WorkerFailure>& failures);

}  // namespace flashckpt::launcher
