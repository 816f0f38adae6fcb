#!/usr/bin/env bash
# The main job: data-parallel training under flashrun (2 workers, gloo) that
# snapshots every 5 steps; one worker is SIGKILLed mid-run; flashrun restarts
# the group and every rank resumes from the newest snapshot in shared memory,
# held by the node agent. Checked bit-exact against an uninterrupted run.
# Then the same story for the C++ front door (libtorch trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" FLASHCKPT_BUILD_DIR="$PWD/build" PYTHON_EXEC=/usr/bin/python3
FLASHRUN=build/bin/flashrun
WORK="$(mktemp -d /tmp/flashckpt-main-job.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
STEPS=60 EVERY=5 CRASH=37
TRAIN=(examples/python/train.py --steps $STEPS --every $EVERY --width 512 --depth 6)
FLAGS=(--standalone --nproc-per-node 2 --max-restarts 3 --monitor-interval 0.1 -t 3)

echo "== 1/4 uninterrupted run under flashrun: 2 workers, $STEPS steps, snapshot every $EVERY"
$FLASHRUN "${FLAGS[@]}" --log-dir "$WORK/logs-clean" "${TRAIN[@]}" --dir "$WORK/clean" --digest-out "$WORK/clean.digest" \
  > "$WORK/clean.log" 2>&1 || { tail -n 30 "$WORK/clean.log"; exit 1; }
grep -E "done: step" "$WORK/clean.log"

echo "== 2/4 the same run with warm standby workers; rank 1 is SIGKILLed right after step $CRASH"
# --standby: the restarted workers are interpreters that imported torch while the job ran
# (started at once here: FLASHRUN_STANDBY_DELAY=0; steps slowed a little so they are ready)
FLASHRUN_STANDBY_DELAY=0 $FLASHRUN "${FLAGS[@]}" --standby --standby-import torch,flashckpt --log-dir "$WORK/logs-crash" \
  "${TRAIN[@]}" --dir "$WORK/crash" --digest-out "$WORK/crash.digest" --step-sleep 0.15 \
  --crash-at-step $CRASH --crash-rank 1 > "$WORK/crash.log" 2>&1 || { tail -n 30 "$WORK/crash.log"; exit 1; }
grep -E "SIGKILL at|worker group failed|restore step|warm standbys|loaded step|resumed from|done: step|all workers" \
  "$WORK/crash.log"

echo "== 3/4 checks"
a=$(cat "$WORK/clean.digest"); b=$(cat "$WORK/crash.digest")
expected=$(( CRASH / EVERY * EVERY ))
resumed=$(grep -c "resumed from step $expected (memory)" "$WORK/crash.log" || true)
status=$(ls "$WORK"/logs-crash/*/status.json)
echo "   agent status: $(tr -d '\n' < "$status" | sed 's/  */ /g' | cut -c1-400)"
/usr/bin/python3 -m flashckpt ls "$WORK/crash"
if [ "$resumed" -ne 2 ]; then
  echo "main job FAILED: expected both ranks to resume from step $expected in memory" >&2; exit 1
fi
if [ "$a" != "$b" ]; then
  echo "main job FAILED: final parameters differ ($a vs $b)" >&2; exit 1
fi
echo "   both ranks resumed at step $expected from shared memory: no snapshotted step lost"
echo "   final parameters equal the uninterrupted run's, bit for bit ($a)"

echo "== 4/4 the C++ front door: libtorch trainer, SIGKILLed after step 157, restarted"
build/train_mlp --dir "$WORK/cpp-clean" --steps 300 --every 10 | grep digest > "$WORK/cpp-clean.digest"
( build/train_mlp --dir "$WORK/cpp-crash" --steps 300 --every 10 --crash-at 157 ) > /dev/null 2>&1 || true
build/train_mlp --dir "$WORK/cpp-crash" --steps 300 --every 10 2>&1 | tee "$WORK/cpp-resume.log" | grep -E "resumed"
if [ "$(grep digest "$WORK/cpp-resume.log")" != "$(cat "$WORK/cpp-clean.digest")" ]; then
  echo "main job FAILED: the C++ trainer's resumed parameters differ" >&2; exit 1
fi
echo "   C++ trainer resumed bit-exact"
echo "main job OK"
