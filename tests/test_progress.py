"""The driver's study progress line, on Ray's own Trial objects."""

from __future__ import annotations

import re

import pytest
from ray.tune.experiment import Trial

from study.progress import EpochLines, StudyProgress, duration
from study.spec import EPOCHS_TOTAL, spec_from_dict


def trial(trial_id: str, status: str, epoch: int, total: int = 4) -> Trial:
    made = Trial("train_trial", config={}, trial_id=trial_id, stub=True)
    made.set_status(status)
    if epoch:
        made.update_last_result({"epoch": epoch, EPOCHS_TOTAL: total})
    return made


def test_the_line_counts_trials_by_state_and_the_epochs_left():
    progress = StudyProgress("s", trials_total=5, epochs_per_trial=4, bound=True)
    trials = [
        trial("a", Trial.TERMINATED, 4),  # complete
        trial("b", Trial.TERMINATED, 1),  # stopped early: no more epochs
        trial("c", Trial.ERROR, 2),
        trial("d", Trial.RUNNING, 3),
    ]
    line = progress.line(trials)
    assert "3/5 trials done (1 complete, 1 stopped early, 1 failed)" in line, line
    assert "1 running" in line
    # done 4+1+2+3 = 10; expected 4+1+2 (ended) + 4 (d) + 4 (the trial not yet created)
    assert "epochs 10/15" in line, line
    assert "ETA" not in line, "no epoch has finished since this driver started"
    progress.started -= 60  # a minute later, 5 more epochs
    trials[3] = trial("d", Trial.TERMINATED, 4)
    trials.append(trial("e", Trial.RUNNING, 4))
    line = progress.line(trials)
    assert "epochs 15/15" in line and "ETA" not in line, line
    trials[4] = trial("e", Trial.RUNNING, 2)
    line = progress.line(trials)
    # 3 new epochs in 60 s, 2 left: at most 40 s (a scheduler may stop it sooner)
    assert re.search(r"ETA at most 4\ds", line), line


def test_callbacks_see_a_trial_end_before_ray_sets_its_status():
    progress = StudyProgress("s", trials_total=1, epochs_per_trial=2, bound=False)
    running = trial("a", Trial.RUNNING, 2, total=2)
    progress.ended["a"] = "complete"
    assert "1/1 trials done (1 complete" in progress.line([running])


@pytest.mark.parametrize(
    ("seconds", "text"), [(42.2, "42s"), (725, "12m05s"), (3600 * 3 + 420, "3h07m")]
)
def test_durations_read_as_a_clock(seconds, text):
    assert duration(seconds) == text


def test_in_a_log_the_progress_is_a_plain_line_and_survives_pickling(capsys):
    import pickle

    spec = spec_from_dict(
        {
            "study": {"name": "s", "num_samples": 2},
            "base": {"method": "natural"},
            "search": {"optim.lr": {"distribution": "loguniform", "low": 0.01, "high": 0.1}},
        }
    )
    lines = pickle.loads(pickle.dumps(EpochLines(spec, 2, 4)))
    trials = [trial("a", Trial.RUNNING, 1)]
    lines.on_trial_complete(0, trials, trials[0])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("progress: s: 1/2 trials done (0 complete, 1 stopped early")
    assert "\r" not in "".join(out) and "\x1b" not in "".join(out)
    lines.on_step_begin(0, trials)  # within the minute: nothing more
    assert capsys.readouterr().out == ""


def test_a_trial_interrupted_by_ctrl_c_is_not_counted_as_stopped_early():
    """Ray terminates running trials on Ctrl-C: one that reported epochs here and that no
    callback said the scheduler stopped is interrupted (its budget still ahead); one that
    ended before this driver (a resumed study's) keeps its state."""
    progress = StudyProgress("s", trials_total=4, epochs_per_trial=4, bound=True)
    progress.reported |= {"a", "b"}
    progress.ended["a"] = "stopped early"  # the scheduler's, through the callback
    trials = [
        trial("a", Trial.TERMINATED, 1),
        trial("b", Trial.TERMINATED, 2),  # running when Ctrl-C came
        trial("c", Trial.TERMINATED, 1),  # stopped early before this driver started
        trial("d", Trial.TERMINATED, 0),  # started, and Ctrl-C came before its first epoch
    ]
    line = progress.line(trials)
    assert "2/4 trials done (0 complete, 2 stopped early, 0 failed)" in line, line
    assert "2 interrupted" in line and "epochs 4/10" in line, line  # b's 2, d's 4 still to run
