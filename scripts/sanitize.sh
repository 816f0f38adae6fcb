#!/usr/bin/env bash
# Sanitizer stage of CI (.ci/run, after scripts/test.sh). Three stages, each
# in its own build folder; the script fails when any stage finds anything:
#   asan  build-asan/ (clang-14, -DFLASHCKPT_SANITIZE=address: ASan+UBSan, UB is
#         fatal): every ctest test, then the flashrun e2e tests (tests/e2e) with the
#         instrumented flashrun and the normal, uninstrumented Python extension
#         from build/ (so build/ must be built first: scripts/build.sh).
#   tsan  build-tsan/ (-DFLASHCKPT_SANITIZE=thread): flashckpt_core_tests only,
#         the threaded suites (Persister, CheckpointService, SharedSegment, DevicePlugin, Deadlines,
#         Checkpointer, PersistSlot); any report fails.
#   fuzz  build-fuzz/ (clang-14, -DFLASHCKPT_WITH_FUZZERS=ON): rendezvous_frame_fuzzer
#         for FUZZ_SECONDS (default 60) s; a crash fails.
# Sanitizer reports go to files in build-*/sanitizer-logs/ (made fresh each run)
# and are printed; one file there fails the stage, whatever the exit codes said.
# Time here (Debian 12, 2 cores, JOBS=2, fresh build folders), about 13 min in all:
#   asan  ~9 min (build 3 min, ctest 1-2 min, e2e 3.5 min)
#   tsan  ~2.5 min (build 2 min, tests 15 s)
#   fuzz  ~1.5 min (build 30 s, fuzzing FUZZ_SECONDS)
# Env: SANITIZE_STAGES ("asan tsan fuzz" by default, any subset), JOBS (default
# nproc), FUZZ_SECONDS (60), FLASHCKPT_BUILD_DIR (the normal build, default build/).
# shellcheck disable=SC2317  # the stage functions are called as "stage_$2"
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
JOBS="${JOBS:-$(nproc)}"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
STAGES="${SANITIZE_STAGES:-asan tsan fuzz}"
# Suppression files (scripts/<sanitizer>.supp), used where one exists; each entry
# says why it is there.
supp() { if [ -f "$ROOT/scripts/$1.supp" ]; then echo ":suppressions=$ROOT/scripts/$1.supp"; fi; }

# The options of the top-level CMakeLists.txt: only what the tests need.
CLANG=(-DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14)
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=/usr/bin/python3
            -DFLASHCKPT_WITH_PYTHON=OFF -DFLASHCKPT_WITH_TORCH=OFF
            -DFLASHCKPT_WITH_BENCHMARKS=OFF -DFLASHCKPT_WITH_CUDA=OFF)

say() { echo "== sanitize: $*"; }

# A fresh folder for report files; prints its path.
fresh_log_dir() {
  rm -rf "$1"
  mkdir -p "$1"
  echo "$1"
}

# Fails (prints every report) when the folder holds any report file.
check_logs() {
  local dir="$1" what="$2"
  if compgen -G "$dir/*" > /dev/null; then
    say "$what: sanitizer reports in $dir:" >&2
    for f in "$dir"/*; do
      echo "----- $f" >&2
      cat "$f" >&2
    done
    return 1
  fi
  say "$what: no sanitizer reports"
}

# Warns about shared-memory segments that killed processes left behind (they
# are not sanitizer findings; scripts/test.sh fails on them for the normal build).
warn_leftover_shm() {
  local leftover=(/dev/shm/flashckpt*)
  if [ -e "${leftover[0]}" ]; then
    say "warning: shared-memory segments left behind (by these tests or another run): ${leftover[*]}" >&2
  fi
}

stage_asan() {
  local t0=$SECONDS logs status=0
  # clang, not gcc: gcc links UBSan as a second runtime next to ASan's, and that
  # one writes its reports to stderr whatever log_path says (GCC bug 94328), where
  # a report from a flashrun that an e2e test captures would never be seen.
  # clang has one runtime for both, so log_path holds for every report.
  cmake -S . -B build-asan "${CLANG[@]}" "${CMAKE_ARGS[@]}" -DFLASHCKPT_SANITIZE=address
  cmake --build build-asan -j "$JOBS"
  say "asan: build $((SECONDS - t0)) s"

  # ctest: every test, leaks included. Reports go to files, so that one from a
  # child process (the crash tests' flashckpt_crash_child, which the parent
  # expects to die) cannot pass unseen.
  local t1=$SECONDS
  logs=$(fresh_log_dir "$ROOT/build-asan/sanitizer-logs/ctest")
  ASAN_OPTIONS="log_path=$logs/report:detect_leaks=1:check_initialization_order=1$(supp asan)" \
  UBSAN_OPTIONS="log_path=$logs/report:print_stacktrace=1:halt_on_error=1$(supp ubsan)" \
  LSAN_OPTIONS="print_suppressions=0$(supp lsan)" \
    ctest --test-dir build-asan --output-on-failure --timeout 600 || status=1
  check_logs "$logs" "asan ctest" || status=1
  say "asan: ctest $((SECONDS - t1)) s"

  # e2e: the instrumented flashrun launches the real (uninstrumented) Python
  # workers. LeakSanitizer stays on: flashrun is the only instrumented process
  # (the options reach the Python workers, which ignore them), it leaves main()
  # by returning on every path a test lets it finish, signals included (they
  # arrive through a signalfd), so a leak report at its exit is a leak of the
  # launcher's own objects; a flashrun a test SIGKILLs is never leak-checked, so
  # the kill tests cannot give false reports.
  local t2=$SECONDS build_dir="${FLASHCKPT_BUILD_DIR:-$ROOT/build}"
  if ! compgen -G "$build_dir/python/flashckpt/_C*.so" > /dev/null; then
    say "asan e2e: no Python extension in $build_dir/python/flashckpt (run scripts/build.sh first)" >&2
    return 1
  fi
  logs=$(fresh_log_dir "$ROOT/build-asan/sanitizer-logs/e2e")
  FLASHRUN_BIN="$ROOT/build-asan/bin/flashrun" FLASHCKPT_BUILD_DIR="$build_dir" PYTHON_EXEC=/usr/bin/python3 \
  ASAN_OPTIONS="log_path=$logs/report:detect_leaks=1$(supp asan)" \
  UBSAN_OPTIONS="log_path=$logs/report:print_stacktrace=1:halt_on_error=1$(supp ubsan)" \
    /usr/bin/python3 -m pytest -q tests/e2e -p no:cacheprovider || status=1
  check_logs "$logs" "asan e2e" || status=1
  say "asan: e2e $((SECONDS - t2)) s"
  warn_leftover_shm
  return "$status"
}

# The threaded suites of flashckpt_core_tests (names: --gtest_list_tests).
TSAN_SUITES=(Persister CheckpointService SharedSegment Checkpointer PersistSlot DevicePlugin Deadlines PersistFailure)

stage_tsan() {
  local t0=$SECONDS logs status=0 bin=build-tsan/tests/cpp/flashckpt_core_tests
  cmake -S . -B build-tsan "${CMAKE_ARGS[@]}" -DFLASHCKPT_SANITIZE=thread
  cmake --build build-tsan -j "$JOBS" --target flashckpt_core_tests
  say "tsan: build $((SECONDS - t0)) s"

  # A suite that is renamed away must not leave the filter matching nothing.
  local listed filter="" suite
  listed=$("$bin" --gtest_list_tests)
  for suite in "${TSAN_SUITES[@]}"; do
    if ! grep -qx "$suite\." <<< "$listed"; then
      say "tsan: no test suite '$suite' in $bin (update TSAN_SUITES in $0)" >&2
      return 1
    fi
    filter+="${filter:+:}$suite.*"
  done

  local t1=$SECONDS
  logs=$(fresh_log_dir "$ROOT/build-tsan/sanitizer-logs")
  TSAN_OPTIONS="log_path=$logs/tsan:halt_on_error=1:exitcode=66:second_deadlock_stack=1$(supp tsan)" \
    "$bin" --gtest_filter="$filter" &
  local pid=$!
  wait "$pid" || status=1
  # A report halts the test mid-way, before its scratch folders (named by the
  # test process's pid, tests/cpp/test_util.h) are removed: remove them here,
  # so that a later scripts/test.sh does not take them for leaked segments.
  rm -rf /dev/shm/flashckpt-test-"$pid"-* "${TMPDIR:-/tmp}"/flashckpt-test-"$pid"-*
  check_logs "$logs" "tsan" || status=1
  say "tsan: tests $((SECONDS - t1)) s"
  warn_leftover_shm
  return "$status"
}

stage_fuzz() {
  local t0=$SECONDS rc=0 out=build-fuzz/fuzz
  cmake -S . -B build-fuzz "${CLANG[@]}" "${CMAKE_ARGS[@]}" -DFLASHCKPT_WITH_FUZZERS=ON
  cmake --build build-fuzz -j "$JOBS" --target rendezvous_frame_fuzzer
  say "fuzz: build $((SECONDS - t0)) s"

  local t1=$SECONDS
  rm -rf "$out/artifacts"
  mkdir -p "$out/corpus" "$out/artifacts"
  build-fuzz/bin/rendezvous_frame_fuzzer -max_total_time="$FUZZ_SECONDS" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$out/artifacts/" "$out/corpus" > "$out/fuzz.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then tail -n 80 "$out/fuzz.log"; else grep -E '^(Done |stat::)' "$out/fuzz.log" || true; fi
  local execs
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/fuzz.log" | tail -n 1)
  say "fuzz: ${execs:-?} executions in $((SECONDS - t1)) s (corpus $(find "$out/corpus" -type f | wc -l) inputs)"
  if [ "$rc" -ne 0 ] || compgen -G "$out/artifacts/*" > /dev/null; then
    say "fuzz: rendezvous_frame_fuzzer failed (exit $rc); inputs in $out/artifacts: $(ls "$out/artifacts")" >&2
    return 1
  fi
}

# One stage per process, so that set -e holds inside it.
if [ "${1:-}" = --stage ]; then
  "stage_$2"
  exit $?
fi

for s in $STAGES; do
  case "$s" in asan|tsan|fuzz) ;; *) say "unknown stage '$s' (SANITIZE_STAGES: asan tsan fuzz)" >&2; exit 2 ;; esac
done
status=0
summary=()
for s in $STAGES; do
  t=$SECONDS
  say "$s: start"
  if "$ROOT/scripts/sanitize.sh" --stage "$s"; then r=ok; else r=FAILED; status=1; fi
  summary+=("$s $r $((SECONDS - t)) s")
  say "$s: $r in $((SECONDS - t)) s"
done
say "summary: ${summary[*]}"
exit $status
