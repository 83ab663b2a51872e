"""The project's shape: the method stays free of orchestration, shipped configs stay valid."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gacd.cli import load_config_file
from gacd.config import ConfigError

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


PACKAGES = ("gacd", "study", "analysis", "bench")
# The deliberate tie: the config asks the registries for valid names while it validates, by
# imports inside its functions (the registries' modules import the config at their top).
REGISTRY_TIE = "gacd.config"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, known: set[str]) -> list[str]:
    """Project modules an import statement names (`from gacd import metrics` is gacd.metrics)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{alias.name}" for alias in node.names]
        found = [name for name in names if name in known]
        return found or ([node.module] if node.module in known else [])
    return []


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, at its top or inside its functions,
    less the registry tie's imports inside `gacd.config`'s functions."""
    paths = [path for package in PACKAGES for path in (ROOT / package).glob("*.py")]
    known = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {name: set() for name in known}
    for path in paths:
        name = module_name(path)
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if name == REGISTRY_TIE and id(node) not in top_level:
                continue
            graph[name].update(m for m in imported_modules(node, known) if m != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_run_one_way():
    """No import circle but the config's registry tie: evaluation never imports training,
    importance and plots do not import each other, and so on."""
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_analysis_imports_nothing_from_study():
    """`analysis/` reads stores; `study/` runs studies and may use `analysis/` for its report."""
    graph = import_graph()
    crossing = {
        (name, target)
        for name, targets in graph.items()
        if name.startswith("analysis")
        for target in targets
        if target.startswith("study")
    }
    assert crossing == set()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config_file(path)
    assert config.attack.epsilon > 0


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: gacd\nattack: {epsilon: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 3, column 1"):
        load_config_file(path)


def test_every_metric_a_run_produces_is_of_a_known_family_and_rays_keys_are_not():
    from gacd import schema

    produced = [schema.EPOCH, schema.LR, schema.EPOCH_SECONDS, schema.train_loss("ce")]
    produced += [
        schema.accuracy(split, name) for split in ("val", "test") for name in schema.ATTACKS
    ]
    produced += [schema.best(schema.TEST_CKA_CLEAN), schema.BEST_EPOCH, schema.TRANSFER_PGD_ACC]
    assert all(schema.is_metric(name) for name in produced)
    for ray_key in ("trial_id", "time_total_s", "training_iteration", "epochs_total", "done"):
        assert not schema.is_metric(ray_key), ray_key


def test_a_metric_of_an_unknown_family_is_refused_where_it_is_produced(digits, monkeypatch):
    """Not dropped on its way to MLflow: `fit` refuses it in the epoch that produced it."""
    import gacd.train as train
    from gacd.schema import UnknownMetricError
    from tests.conftest import digits_config

    measured = train.validation_metrics
    monkeypatch.setattr(
        train, "validation_metrics", lambda *a, **k: {**measured(*a, **k), "valid/pgd_acc": 0.5}
    )
    config = digits_config(method="natural", **{"optim.epochs": 1, "data.train_subset": 128})
    with pytest.raises(UnknownMetricError, match="valid/pgd_acc"):
        train.fit(config, data=digits)
