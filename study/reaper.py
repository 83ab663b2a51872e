"""Leave no Ray process behind, however the driver dies.

A study on a local Ray instance starts that instance's processes (GCS, raylet, dashboard,
log monitor; the raylet then starts the agents and the workers). `ray.shutdown()` stops them
when the driver ends normally or by Ctrl-C; a driver killed outright (SIGKILL, the OOM killer)
leaves them running, some listening on 127.0.0.1. This watchdog, started beside the instance
in a session of its own, remembers every process descended from the instance's own (each by
pid and start time, so a reused pid is never touched) while the driver lives; when the
driver is gone it ends them (SIGTERM, then SIGKILL), then exits. It also exits once the
instance's processes are all gone (a normal shutdown). Linux only (it reads /proc).

    python -m study.reaper DRIVER_PID DRIVER_START ROOT_PID [ROOT_PID ...]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0
TERM_GRACE_S = 3.0


def process_table() -> dict[int, tuple[int, int]]:
    """Every process as `pid -> (parent pid, start time in clock ticks)`, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        # `pid (comm) state ppid ...`: comm may hold spaces and parentheses; split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """`roots` and every process below them: `pid -> start time`."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = {}, [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def alive(known: dict[int, int]) -> dict[int, int]:
    return {pid: start for pid, start in known.items() if start_time(pid) == start}


def end(known: dict[int, int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive(known):
            with contextlib.suppress(OSError):  # it ended meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + TERM_GRACE_S
        while alive(known) and time.monotonic() < deadline:
            time.sleep(0.1)


def watch(driver: int, driver_start: int | None, roots: set[int]) -> None:
    own = os.getpid()
    table = process_table()
    known = {pid: start for pid, start in descendants(roots, table).items() if pid != own}
    while True:
        if start_time(driver) != driver_start:  # the driver is gone (or its pid reused)
            end(known)
            return
        table = process_table()
        for pid, start in descendants(set(alive(known)) | roots, table).items():
            if pid != own:
                known.setdefault(pid, start)
        if not alive(known):  # the instance shut down: nothing left to watch
            return
        time.sleep(POLL_S)


def start_reaper(roots: set[int]) -> subprocess.Popen | None:
    """Watch the processes `roots` (the local instance's own) on behalf of this process."""
    if not sys.platform.startswith("linux") or not roots:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "study.reaper", str(os.getpid()), str(start_time(os.getpid()))]
        + [str(pid) for pid in sorted(roots)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the driver, not this
    )


def children_of(pid: int) -> set[int]:
    return {child for child, (parent, _) in process_table().items() if parent == pid}


def main(argv: list[str] | None = None) -> int:
    args = [int(value) for value in (argv if argv is not None else sys.argv[1:])]
    driver, driver_start, roots = args[0], args[1], set(args[2:])
    watch(driver, driver_start, roots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
