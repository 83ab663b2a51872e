"""What the driver prints while a study runs: one line per finished epoch, one when a trial
ends, and the study as a whole (trials by state, elapsed time, an estimate of what is left).

In a terminal the study's line stays at the bottom and is redrawn every second; in a log (CI,
`nohup`) it is a plain line when a trial ends and at most once a minute otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray import tune

from gacd import schema
from study.spec import EPOCHS_TOTAL, StudySpec

CLEAR_LINE = "\r\x1b[K"
TERMINAL_INTERVAL_S = 1.0
LOG_INTERVAL_S = 60.0


def duration(seconds: float) -> str:
    """`42s`, `12m05s`, `3h07m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


INTERRUPTED = "interrupted"  # stopped by the driver's Ctrl-C, to be continued by --resume


def trial_state(trial: Any, ended: dict[str, str] | None = None) -> str:
    """running, pending, complete, stopped early or failed (`ended`: states the callbacks saw
    before Ray set the trial's status)."""
    if ended and trial.trial_id in ended:
        return ended[trial.trial_id]
    if trial.status == "ERROR":
        return schema.STATE_FAILED
    if trial.status == "TERMINATED":
        result = trial.last_result or {}
        if result.get(schema.EPOCH) is None:  # ended before its first epoch: only Ctrl-C does
            return INTERRUPTED
        full = result.get(schema.EPOCH) == result.get(EPOCHS_TOTAL)
        return schema.STATE_COMPLETE if full else schema.STATE_STOPPED
    return "running" if trial.status == "RUNNING" else "pending"


def epochs_done(trial: Any) -> int:
    return int((trial.last_result or {}).get(schema.EPOCH, 0) or 0)


class StudyProgress:
    """The study's one-line summary from Ray's trials, with an ETA from the epochs done since
    this driver started (a resumed study's earlier epochs do not flatter the rate)."""

    def __init__(self, name: str, trials_total: int, epochs_per_trial: int, bound: bool) -> None:
        self.name = name
        self.trials_total = trials_total
        self.epochs_per_trial = epochs_per_trial
        self.bound = bound  # a scheduler may stop trials early: the total is an upper bound
        self.started = time.monotonic()
        self.epochs_at_start: int | None = None
        self.ended: dict[str, str] = {}
        self.reported: set[str] = set()  # trials that reported an epoch to this driver

    def state(self, trial: Any) -> str:
        """`trial_state`, except that a trial this driver saw run which stopped short of its
        budget with no callback saying the scheduler stopped it was interrupted (Ctrl-C: Ray
        terminates the running trials), not stopped early; a resume continues it."""
        state = trial_state(trial, self.ended)
        if (
            state == schema.STATE_STOPPED
            and trial.trial_id not in self.ended
            and trial.trial_id in self.reported
        ):
            return INTERRUPTED
        return state

    def line(self, trials: list) -> str:
        states = {trial.trial_id: self.state(trial) for trial in trials}
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        ended = sum(counts.get(s, 0) for s in schema_states())
        done = sum(epochs_done(trial) for trial in trials)
        if self.epochs_at_start is None:
            self.epochs_at_start = done
        # Trials that ended will run no more epochs: what is left is the others' budget.
        expected = sum(
            epochs_done(trial) if states[trial.trial_id] in schema_states() else self.budget(trial)
            for trial in trials
        ) + self.epochs_per_trial * max(self.trials_total - len(trials), 0)
        elapsed = time.monotonic() - self.started
        parts = [
            f"{self.name}: {ended}/{self.trials_total} trials done "
            f"({counts.get(schema.STATE_COMPLETE, 0)} complete, "
            f"{counts.get(schema.STATE_STOPPED, 0)} stopped early, "
            f"{counts.get(schema.STATE_FAILED, 0)} failed)",
            f"{counts.get('running', 0)} running",
            *([f"{counts[INTERRUPTED]} interrupted"] if counts.get(INTERRUPTED) else []),
            f"epochs {done}/{expected}",
            f"elapsed {duration(elapsed)}",
        ]
        new = done - self.epochs_at_start
        if new > 0 and expected > done:
            eta = elapsed / new * (expected - done)
            parts.append(f"ETA {'at most ' if self.bound else ''}{duration(eta)}")
        return ", ".join(parts)

    def budget(self, trial: Any) -> int:
        return int((trial.last_result or {}).get(EPOCHS_TOTAL, self.epochs_per_trial))


def schema_states() -> tuple[str, ...]:
    return (schema.STATE_COMPLETE, schema.STATE_STOPPED, schema.STATE_FAILED)


class EpochLines(tune.Callback):
    """`[full-seed1] epoch 3/12  val/clean_acc=0.951 val/pgd_acc=0.612  (2.3 s)`, the trial's
    end, and the study's progress line.

    Pickled with the experiment (Ray restores callbacks on a resume): the clock restarts then.
    """

    def __init__(self, spec: StudySpec, trials_total: int, epochs_per_trial: int) -> None:
        self.spec = spec
        self.trials_total = trials_total
        self.epochs_per_trial = epochs_per_trial
        self._reset()

    def _reset(self) -> None:
        self.progress = StudyProgress(
            self.spec.name,
            self.trials_total,
            self.epochs_per_trial,
            bound=self.spec.scheduler != "none",
        )
        self.shown_at = 0.0
        self.live = False  # a progress line is on screen without its newline (terminal)

    def __getstate__(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in ("spec", "trials_total", "epochs_per_trial")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @staticmethod
    def terminal() -> bool:
        return sys.stdout.isatty()

    def say(self, text: str) -> None:
        """A line of its own, above the progress line in a terminal."""
        if self.live:
            sys.stdout.write(CLEAR_LINE)
            self.live = False
        print(text, flush=True)

    def show_progress(self, trials: list, now: bool = False) -> None:
        interval = TERMINAL_INTERVAL_S if self.terminal() else LOG_INTERVAL_S
        if not now and time.monotonic() - self.shown_at < interval:
            return
        self.shown_at = time.monotonic()
        line = self.progress.line(trials)
        if self.terminal():
            sys.stdout.write(CLEAR_LINE + line)
            sys.stdout.flush()
            self.live = True
        else:
            print(f"progress: {line}", flush=True)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.show_progress(trials)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.progress.reported.add(trial.trial_id)
        shown = " ".join(
            f"{key}={result[key]:.3f}"
            for key in (schema.VAL_CLEAN_ACC, schema.VAL_PGD_ACC, schema.TRAIN_LOSS_PREFIX)
            if key in result
        )
        self.say(
            f"[{self.spec.trial_label(trial.config, trial.trial_id)}] epoch "
            f"{result.get(schema.EPOCH)}/{result.get(EPOCHS_TOTAL)}  {shown}  "
            f"({result.get(schema.EPOCH_SECONDS, 0.0):.1f} s)"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        early = result.get(schema.EPOCH) != result.get(EPOCHS_TOTAL)
        status = "stopped early by the scheduler" if early else "finished"
        self.say(f"[{self.spec.trial_label(trial.config, trial.trial_id)}] {status}")
        self.progress.ended[trial.trial_id] = (
            schema.STATE_STOPPED if early else schema.STATE_COMPLETE
        )
        self.show_progress(trials, now=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.tracking import failure_reason

        label = self.spec.trial_label(trial.config, trial.trial_id)
        self.say(f"[{label}] FAILED: {failure_reason(trial)}")
        self.progress.ended[trial.trial_id] = schema.STATE_FAILED
        self.show_progress(trials, now=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.show_progress(trials, now=True)
        if self.live:
            print(flush=True)
            self.live = False
