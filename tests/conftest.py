"""Shared fixtures: real digits data and small real models trained once per session."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gacd.checkpoint import save_checkpoint
from gacd.config import Config
from gacd.data import load_datasets
from gacd.train import fit

torch.set_num_threads(2)

# The digits budget used across the tests: 0.1 of the pixel range (1.6 of 16 grey levels).
DIGITS_EPSILON = 0.1


def digits_config(**overrides) -> Config:
    """A quick digits run: small CNN, no AutoAttack, CPU."""
    values = {
        "device": "cpu",
        "data.batch_size": 64,
        "attack.epsilon": DIGITS_EPSILON,
        "attack.steps": 5,
        "eval.autoattack": False,
        "eval.val_steps": 5,
        "optim.lr": 0.05,
        "optim.epochs": 2,
        "student.width": 16,
        "negatives.count": 256,
    }
    values.update(overrides)
    return Config.from_dict(values)


@pytest.fixture(scope="session")
def digits():
    return load_datasets(digits_config(method="natural").data, seed=0, with_test=True)


@pytest.fixture(scope="session")
def robust_teacher_path(tmp_path_factory, digits):
    """A small CNN adversarially trained (PGD-AT) on digits by this project's own loop."""
    config = digits_config(method="pgd_at", **{"optim.epochs": 12, "student.width": 32})
    result = fit(config, data=digits)
    return save_checkpoint(result.state, tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def natural_model(digits):
    """A naturally trained small CNN: accurate on clean digits, fragile under attack."""
    return fit(digits_config(method="natural", **{"optim.epochs": 12}), data=digits).method.student


# --- a real Ray cluster ---------------------------------------------------------------------


def pytest_configure(config):
    """Ray's settings for this session, set before anything imports Ray (it caches its
    authentication settings): servers bind to 127.0.0.1, and the test cluster takes a token of
    its own that every driver of this session, in-process or not, sends."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head node on 127.0.0.1:{port} after {timeout} s")


def ray_node(arguments: list[str], log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group (killing the group takes its node
    down), with this session's environment (its token) and no drain on SIGTERM: a test node
    serves no traffic to drain, and Ray would wait up to 30 s."""
    command = [str(Path(sys.executable).with_name("ray")), "start", *arguments, "--block"]
    command += ["--num-gpus=0", "--disable-usage-stats"]
    with open(log, "a") as output:
        return subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        )


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray head node started by `ray start --head` (2 CPUs), on 127.0.0.1 only, with
    token authentication; drivers of this session (in-process or not) join it by address.
    Only the processes this fixture started are stopped at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    process = ray_node(
        ["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"], log
    )
    try:
        wait_for_port(port, process, timeout=90)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
