"""The project's shape: the method stays free of orchestration, shipped configs stay valid."""

import subprocess
import sys
from pathlib import Path

import pytest

from gacd.config import ConfigError
from gacd.train import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_the_method_package_imports_no_ray_optuna_or_mlflow():
    modules = [f"gacd.{path.stem}" for path in (ROOT / "gacd").glob("*.py")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'optuna', 'mlflow'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config_file(path)
    assert config.attack.epsilon > 0


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: gacd\nattack: {epsilon: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 3, column 1"):
        load_config_file(path)
