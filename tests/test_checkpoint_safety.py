"""A checkpoint write that fails (disk full) never replaces or corrupts the last good one."""

import subprocess
import sys

import torch

from gacd.checkpoint import load_checkpoint, save_checkpoint

FILL_THE_DISK = """
import resource, signal, sys, torch
from gacd.checkpoint import CheckpointError, save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with an OSError
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_checkpoint({"weights": torch.ones(100_000)}, sys.argv[1])
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""


def test_a_failed_write_leaves_the_last_good_checkpoint_and_no_partial_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"weights": torch.zeros(10)}, path)
    done = subprocess.run(
        [sys.executable, "-c", FILL_THE_DISK, str(path)], capture_output=True, text=True
    )
    assert done.returncode == 3, done.stderr
    assert "could not be written ([Errno 27] File too large)" in done.stdout
    assert torch.equal(load_checkpoint(path)["weights"], torch.zeros(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
