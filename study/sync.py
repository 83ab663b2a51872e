"""Bring a study's results from Ray's folder into MLflow: `python -m study.sync NAME`.

For a study that ran while MLflow was unreachable (or lost part of its logging): every epoch
Ray recorded is logged to the trial's run (created if missing, never duplicated), and every run
ends as its trial ended. Safe to run any number of times.
"""

from __future__ import annotations

import argparse
import sys

from gacd import schema
from gacd.config import ConfigError
from study.spec import StudyError


def main(argv: list[str] | None = None) -> int:
    from study.run import load_study_spec, study_paths
    from study.tracking import (
        Tracking,
        TrialRuns,
        check_tracking_uri,
        git_commit,
        sync_results,
    )

    parser = argparse.ArgumentParser(prog="python -m study.sync", description=__doc__)
    parser.add_argument("name", help="the study's name")
    parser.add_argument("--storage", help="Ray's results folder (default: ./ray_results)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    args = parser.parse_args(argv)
    try:
        paths = study_paths(args.storage, args.tracking_uri, None)
        path = paths.experiment(args.name)
        if not (path / schema.SPEC_FILE).is_file():
            raise StudyError(f"no study {args.name!r} in {paths.storage}")
        spec = load_study_spec(path, paths.teachers)
        check_tracking_uri(paths.tracking_uri)
        tracking = Tracking(paths.tracking_uri)
        experiment_id = tracking.experiment_id(spec.name)
        parents = tracking.find_runs(
            experiment_id, **{schema.TAG_ROLE: schema.ROLE_STUDY, schema.TAG_STUDY: spec.name}
        )
        if not parents:
            raise StudyError(f"MLflow at {paths.tracking_uri} has no run of study {spec.name!r}")
    except (ConfigError, StudyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    runs = TrialRuns(
        paths.tracking_uri,
        experiment_id,
        parents[0].info.run_id,
        spec,
        git_commit(),
        log_checkpoints=spec.study.mode == "ablation",
    )
    failed = sync_results(runs, path)
    print(
        f"{spec.name}: synced into {paths.tracking_uri}"
        + (f" ({failed} trials failed)" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
