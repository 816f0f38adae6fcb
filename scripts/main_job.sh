#!/usr/bin/env bash
# The main job: a training run that checkpoints, is SIGKILLed mid-run, and
# resumes from the newest snapshot — checked bit-exact against a run that
# was never interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=build/train_mlp
WORK="$(mktemp -d /tmp/flashckpt-main-job.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
STEPS=300 EVERY=10 CRASH=157

echo "== 1/3 uninterrupted run: $STEPS steps, snapshot every $EVERY"
"$TRAIN" --dir "$WORK/clean" --steps $STEPS --every $EVERY | tee "$WORK/clean.log" | grep -E "step (100|200|300) |digest"
echo "== 2/3 the same run, SIGKILLed after step $CRASH"
set +e
"$TRAIN" --dir "$WORK/crashy" --steps $STEPS --every $EVERY --crash-at $CRASH > "$WORK/crash.log" 2>&1
rc=$?
set -e
tail -n 3 "$WORK/crash.log"
echo "   (exit status $rc: killed by signal $((rc - 128)))"
echo "== 3/3 restarted: resumes from the newest snapshot"
"$TRAIN" --dir "$WORK/crashy" --steps $STEPS --every $EVERY 2>&1 | tee "$WORK/resume.log" | grep -E "resumed|loaded|digest"
a=$(grep digest "$WORK/clean.log" | awk '{print $4}')
b=$(grep digest "$WORK/resume.log" | awk '{print $4}')
if [ "$a" = "$b" ]; then
  echo "main job OK: the resumed run's parameters equal the uninterrupted run's, bit for bit ($a)"
else
  echo "main job FAILED: digests differ ($a vs $b)" >&2
  exit 1
fi
