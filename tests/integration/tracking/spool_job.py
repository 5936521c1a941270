"""A training job killed like kill -9 while its tracking server is down, run as its own process.

    python spool_job.py OUTPUT_DIR URI N_STEPS

Starts a tracker (the server must be up), prints the run id, waits for a line on stdin (the test
stops the server meanwhile), logs ``train/loss`` for steps 1..N_STEPS and dies at once: no
finish, no atexit, whatever the sender had not delivered is only in the spool file.
"""

import os
import sys

from pipeline.config import load_config
from pipeline.tracking import start_tracking

output_dir, uri, n_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(None, [f"train.output_dir={output_dir}", f"tracking.uri={uri}", "tracking.experiment=tests"])
tracker = start_tracking(cfg, world_size=1, rank=0)
print(tracker.run_id, flush=True)
sys.stdin.readline()
for step in range(1, n_steps + 1):
    tracker.log_metrics({"train/loss": 1.0 / step}, step)
os._exit(9)
