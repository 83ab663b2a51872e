"""What the package's commands share: config files with `--set` overrides, and score tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from gacd.checkpoint import CheckpointError
from gacd.config import Config, ConfigError, ConfigFileError, read_yaml_file, set_dotted
from gacd.data import DatasetNotFoundError


def load_config_file(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """A YAML file of overrides of the defaults, plus dotted-key overrides, as a Config."""
    values = read_yaml_file(path) or {}
    if not isinstance(values, dict):
        raise ConfigFileError(str(path), f"expected a mapping of config keys, got {values!r}")
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value)
    return Config.from_dict(values)


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a dotted config key, {example} (repeatable)",
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["a.b=0.1", "c=8/255"]` -> `{"a.b": 0.1, "c": "8/255"}`, values read as YAML."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise ConfigError(pair, "--set KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def print_scores(
    checkpoints: list[str],
    score: Callable[[str, dict[str, Any]], dict[str, float]],
    override_pairs: list[str],
) -> int:
    """One row of `score(checkpoint, overrides)` per checkpoint, printed as a table; bad input
    is one line and exit status 2."""
    import pandas as pd

    rows = {}
    try:
        overrides = parse_overrides(override_pairs)
        for path in checkpoints:
            rows[path] = score(path, overrides)
    except (CheckpointError, ConfigError, DatasetNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = pd.DataFrame.from_dict(rows, orient="index")
    print(table.to_string(float_format=lambda value: f"{value:.3f}"))
    return 0
