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


def test_garbage_of_every_kind_is_refused_as_a_checkpoint_never_a_crash(tmp_path, digits):
    """250 files no checkpoint loader should trip on: random bytes, text, real checkpoints
    truncated or with bytes flipped, zip files of garbage, pickles of the wrong shape. Each is
    a CheckpointError (one line naming the file) from `load_checkpoint` and `load_teacher`."""
    import pickle
    import random
    import zipfile

    from gacd.checkpoint import CheckpointError, load_checkpoint
    from gacd.config import TeacherConfig
    from gacd.teacher import load_teacher
    from gacd.train import fit
    from tests.conftest import digits_config

    rng = random.Random(0)
    state = fit(digits_config(method="natural", **{"optim.epochs": 1, "data.train_subset": 64}))
    real = tmp_path / "real.pt"
    save_checkpoint(state.state, real)
    good = real.read_bytes()
    files: list[bytes] = []
    files += [rng.randbytes(rng.randint(0, 4096)) for _ in range(62)]
    files += [("not a checkpoint\n" * rng.randint(1, 50)).encode() for _ in range(10)]
    files += [good[: rng.randint(0, len(good) - 1)] for _ in range(60)]
    for _ in range(60):
        flipped = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            flipped[rng.randrange(len(flipped))] ^= 0xFF
        files.append(bytes(flipped))
    for index in range(40):
        archive = tmp_path / f"zip{index}.zip"
        with zipfile.ZipFile(archive, "w") as written:
            written.writestr(f"archive/data{index % 3}.pkl", rng.randbytes(rng.randint(1, 512)))
        files.append(archive.read_bytes())
    shapes = [[], {}, {"format": 0}, {"student": 3}, 1, "x", {"format": 1, "config": {}}]
    files += [pickle.dumps(shape) for shape in shapes]
    files += [pickle.dumps(shape, protocol=2) for shape in shapes]
    files += [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95"]
    assert len(files) >= 250
    refused = 0
    for number, content in enumerate(files):
        path = tmp_path / f"garbage{number}.pt"
        path.write_bytes(content)
        try:
            payload = load_checkpoint(path)
        except CheckpointError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            refused += 1
            continue
        # what loaded (a flipped byte in a tensor's data is still a file): as a teacher it is
        # a checkpoint that fits, or refused as one
        try:
            load_teacher(TeacherConfig(checkpoint=str(path), arch="small_cnn"), digits.spec)
        except CheckpointError:
            refused += 1
        assert payload is not None
    assert refused >= 200, refused
