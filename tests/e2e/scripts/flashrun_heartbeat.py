"""Heartbeats by touching FLASHCKPT_HEARTBEAT_FILE; on the first attempt it stops
heartbeating and hangs, on later attempts it heartbeats and finishes.
Usage: flashrun_heartbeat.py OUT_DIR"""
import os
import sys
import time

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = os.environ["RANK"]
beat = os.environ["FLASHCKPT_HEARTBEAT_FILE"]
with open(os.path.join(out_dir, "pid_%s_%d" % (rank, restart)), "w") as f:
    f.write(str(os.getpid()))
for _ in range(5):
    os.utime(beat)
    time.sleep(0.1)
if restart == 0:
    time.sleep(120)  # hung: no more heartbeats
with open(os.path.join(out_dir, "done_%s" % rank), "w") as f:
    f.write(str(restart))
