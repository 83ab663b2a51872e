"""A study's runs as one tidy table for notebooks: `python -m analysis.export --experiment NAME
--out runs.parquet`. One row per logged value (run, metric, step), each carrying its run's
status, name, params and tags; `final` marks each run's last value of each metric."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.runs import (
    Study,
    add_store_arguments,
    metric_histories,
    run_with_study,
)
from gacd import schema


def tidy_runs(study: Study) -> pd.DataFrame:
    histories = metric_histories(study.tracking_uri, study.runs)
    last = histories.groupby(["run_id", "metric"])["step"].transform("max")
    histories["final"] = histories["step"] == last
    kept = [c for c in study.runs.columns if not c.startswith(schema.METRIC_PREFIX)]
    attributes = study.runs[kept]
    table = histories.merge(attributes, on="run_id", how="left")
    return table.sort_values(["run_id", "metric", "step"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.export", description=__doc__)
    add_store_arguments(parser)
    parser.add_argument("--out", required=True, help="a .parquet (or .csv) file")
    args = parser.parse_args(argv)

    def export(study: Study) -> int:
        table = tidy_runs(study)
        out = Path(args.out)
        if out.suffix == ".csv":
            table.to_csv(out, index=False)
        else:
            table.to_parquet(out, index=False)
        print(f"{len(table)} rows, {table['run_id'].nunique()} runs -> {out}")
        return 0

    return run_with_study(args, export)


if __name__ == "__main__":
    sys.exit(main())
