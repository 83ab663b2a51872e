"""One line per finished epoch, and one when a trial ends, printed by the driver."""

from __future__ import annotations

from typing import Any

from ray import tune

from gacd import schema
from study.spec import EPOCHS_TOTAL, StudySpec


class EpochLines(tune.Callback):
    """`[full-seed1] epoch 3/12  val/clean_acc=0.951 val/pgd_acc=0.612  (2.3 s)`."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        shown = " ".join(
            f"{key}={result[key]:.3f}"
            for key in (schema.VAL_CLEAN_ACC, schema.VAL_PGD_ACC, schema.TRAIN_LOSS_PREFIX)
            if key in result
        )
        print(
            f"[{self.spec.trial_label(trial.config, trial.trial_id)}] epoch "
            f"{result.get(schema.EPOCH)}/{result.get(EPOCHS_TOTAL)}  {shown}  "
            f"({result.get(schema.EPOCH_SECONDS, 0.0):.1f} s)",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        early = result.get(schema.EPOCH) != result.get(EPOCHS_TOTAL)
        status = "stopped early by the scheduler" if early else "finished"
        print(f"[{self.spec.trial_label(trial.config, trial.trial_id)}] {status}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.tracking import failure_reason

        label = self.spec.trial_label(trial.config, trial.trial_id)
        print(f"[{label}] FAILED: {failure_reason(trial)}", flush=True)
