"""Records its pid in OUT_DIR/pid_<rank> and sleeps (for signal and cleanup tests).
Usage: flashrun_sleep.py OUT_DIR SECONDS"""
import os
import subprocess
import sys
import time

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
# A grandchild in the same process group: it must not outlive the job either.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(os.path.join(out_dir, "pid_%s" % os.environ["RANK"]), "w") as f:
    f.write("%d %d" % (os.getpid(), child.pid))
time.sleep(float(sys.argv[2]))
