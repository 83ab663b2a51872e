"""Studies end to end on a real Ray cluster, with a real MLflow store and real Optuna storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from analysis.runs import load_runs
from gacd import schema
from gacd.runtime import cpu_model
from study.run import main
from study.spec import spec_from_dict
from tests.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


def study_args(tmp_path: Path, address: str) -> list[str]:
    return [
        "--address",
        address,
        "--storage",
        str(tmp_path / "results"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def write_study(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def digits_base(epochs: int) -> dict:
    return {
        "method": "gacd",
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64},
        "student": {"arch": "small_cnn", "width": 8},
        "optim": {"epochs": epochs, "lr": 0.05},
        "attack": {"epsilon": 0.1, "steps": 2},
        "eval": {"epsilon": 0.1, "val_steps": 2, "autoattack": False, "cw_steps": 5},
        "negatives": {"count": 256},
    }


def test_smoke_study_on_a_local_ray_cluster(tmp_path, ray_cluster):
    """CI's smoke test: `study.run search_spaces/smoke.yaml --address ...` in its own process."""
    command = [sys.executable, "-m", "study.run", "search_spaces/smoke.yaml"]
    done = subprocess.run(
        command + study_args(tmp_path, ray_cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "best full-budget trial" in done.stdout
    assert "mlflow ui --backend-store-uri" in done.stdout
    smoke = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("smoke")
    page = f"/#/experiments/{smoke.experiment_id}?workflowType=machine_learning"
    assert f"open http://127.0.0.1:5000{page}" in done.stdout
    # what a user reads: the teacher's epochs, the study's progress; none of the libraries' noise
    output = done.stdout + done.stderr
    assert "teacher: epoch 2/2" in output
    assert "progress: smoke: 2/2 trials done (2 complete, 0 stopped early, 0 failed)" in output
    for noise in (
        "TensorBoard",
        "Creating initial MLflow database",
        "new study created in",
        "Reporting training result",
    ):
        assert noise not in output, noise

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents = load_runs(uri, "smoke", role="study")
    assert len(parents) == 1 and parents.status[0] == "FINISHED"
    children = load_runs(uri, "smoke", parent_run_id=parents.run_id[0])
    assert len(children) == 2 and set(children.status) == {"FINISHED"}
    for tag in ("study", "variant", "seed", "ray_trial_id", "optuna_trial_number", "config_hash"):
        assert children[f"tags.{tag}"].notna().all(), tag
    assert set(children["tags.full_budget"]) == {"true"}
    assert children["tags.mlflow.source.git.commit"].str.len().min() >= 7
    client = MlflowClient(uri)
    for run_id in children.run_id:
        history = client.get_metric_history(run_id, schema.VAL_PGD_ACC)
        assert [entry.step for entry in history] == [1, 2]
    assert float(children["params.attack.epsilon"][0]) in (0.06, 0.1)
    # what MLflow's UI shows: the runs table first, Source and User, the device used, only the
    # settings of the run's own method, the study's result on its parent's row
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert set(children["params.device"]) == {"cpu"}
    # the machine a CPU run's digits depend on: its CPU, PyTorch's kernels there, 1 thread each
    capability = torch.backends.cpu.get_cpu_capability()
    assert set(children["params.hardware"]) == {
        f"{cpu_model()}, {capability}, 1 thread, torch {torch.__version__}"
    }
    assert not any(column.startswith(("params.crd.", "params.ard.")) for column in children)
    assert "params.negatives.count" in children and "params.teacher.checkpoint" in children
    for runs in (parents, children):
        assert (runs["tags.mlflow.source.name"] == "study.run").all()
        assert runs["tags.mlflow.user"].str.len().min() >= 1
    assert set(children["tags.state"]) == {"complete"}
    # one trial again, alone: `gacd.train` of its own config.json on its one thread gives the
    # validation accuracies MLflow holds for it, to the digit
    first = children.iloc[0]
    folder = tmp_path / "results" / "smoke" / first["tags.ray_trial_id"]
    config = sorted(folder.glob("checkpoint_*/config.json"))[-1]
    again = subprocess.run(
        [sys.executable, "-m", "gacd.train", str(config), "--out", str(tmp_path / "again")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    logged = [e.value for e in client.get_metric_history(first.run_id, schema.VAL_PGD_ACC)]
    lines = (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)[schema.VAL_PGD_ACC] for line in lines] == logged
    for run_id in children.run_id:  # the Dataset column: what each trial trained on
        inputs = client.get_run(run_id).inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert set(contexts) == {"training", "validation"}, contexts  # a search: no test split
        assert {d.name for d in contexts.values()} == {"digits"}
        assert json.loads(contexts["training"].profile)["num_rows"] > 1000
    parent = client.get_run(parents.run_id[0])
    assert parent.data.metrics["study/trials_complete"] == 2
    assert parent.data.metrics["study/trials_failed"] == 0
    best_value = max(children["metrics.val/pgd_acc"])
    assert parent.data.metrics["study/best_value"] == pytest.approx(best_value, abs=1e-12)
    assert parent.data.tags["best"] in set(children["run_name"])

    teachers = load_runs(uri, "gacd-teachers", role="teacher")
    assert len(teachers) == 1 and "metrics.test/pgd_acc" in teachers

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2
    trial_ids = set(children["tags.ray_trial_id"])
    assert {t.user_attrs["ray_trial_id"] for t in study.trials} == trial_ids

    results = ray_results(tmp_path / "results" / "smoke")
    assert len(results) == 2 and results.num_errors == 0
    assert {r.metrics["trial_id"] for r in results} == trial_ids
    assert all(r.checkpoint is not None for r in results)


def ray_results(path: Path):
    """Reopen a study's Ray results as Ray's own `ResultGrid`."""
    from ray import tune

    from study.run import load_study_spec, trainable

    spec = load_study_spec(path, path.parent / "teachers")
    return tune.Tuner.restore(str(path), trainable(spec)).get_results()


@pytest.mark.slow
def test_asha_stops_poor_trials_only_full_budgets_compete_and_optuna_holds_every_epoch(
    tmp_path, ray_cluster, robust_teacher_path, capsys
):
    spec = {
        "study": {
            "name": "asha",
            "num_samples": 6,
            "max_concurrent": 2,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "sampler": {"seed": 1, "n_startup_trials": 6},
        },
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": digits_base(epochs=4),
        "search": {
            "attack.steps": {"distribution": "choice", "values": [1, 2]},
            "attack.epsilon": {"distribution": "choice", "values": [0.01, 0.1]},
            "optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 0.1},
        },
    }
    assert main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = load_runs(uri, "asha")
    stopped = runs[runs["tags.full_budget"] == "false"]
    assert len(runs) == 6 and set(runs.status) == {"FINISHED"}
    assert len(stopped) >= 1, runs[["metrics.epoch", "metrics.val/pgd_acc"]]
    assert (stopped["metrics.epoch"] < 4).all()
    assert set(stopped["tags.state"]) == {"stopped early"}
    assert stopped["run_name"].str.endswith("(stopped early)").all()
    complete = runs[runs["tags.full_budget"] == "true"]
    assert set(complete["tags.state"]) == {"complete"}
    parent = MlflowClient(uri).get_run(load_runs(uri, "asha", role="study").run_id[0])
    assert parent.data.metrics["study/trials_stopped_early"] == len(stopped)
    assert parent.data.metrics["study/trials_complete"] == len(complete)
    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(stopped)
    assert study.metric_names == ["val/pgd_acc"]  # optuna-dashboard's name for the objective
    best = study.best_trial
    assert best.user_attrs["full_budget"] is True
    assert f"best full-budget trial: val/pgd_acc = {best.value:.4f}" in capsys.readouterr().out
    assert_optuna_holds_every_epoch_ray_and_mlflow_hold(tmp_path, "asha", epochs=4)


@pytest.mark.slow
def test_a_search_over_trial_seeds_reports_their_mean_to_asha_optuna_and_mlflow(
    tmp_path, ray_cluster, robust_teacher_path
):
    """`study.trial_seeds: [0, 1]`: each trial trains both seeds side by side; every epoch's
    value that ASHA, Optuna, Ray and MLflow hold is the mean of the seeds' own values, which
    MLflow keeps too (`seeds/0/val/pgd_acc`); the checkpoint holds both seeds' states."""
    spec = {
        "study": {
            "name": "seeds",
            "num_samples": 6,
            "max_concurrent": 2,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "sampler": {"seed": 1, "n_startup_trials": 6},
            "trial_seeds": [0, 1],
        },
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": digits_base(epochs=3),
        "search": {
            "attack.epsilon": {"distribution": "choice", "values": [0.01, 0.1]},
            "optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 0.1},
        },
    }
    assert main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)]) == 0
    assert_optuna_holds_every_epoch_ray_and_mlflow_hold(tmp_path, "seeds", epochs=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = load_runs(uri, "seeds")
    assert set(runs["tags.seed"]) == {"0,1"} and set(runs["params.seed"]) == {"0,1"}
    client = MlflowClient(uri)
    for run_id in runs.run_id:
        mean, *seeds = (
            {m.step: m.value for m in client.get_metric_history(run_id, name)}
            for name in (schema.VAL_PGD_ACC, "seeds/0/val/pgd_acc", "seeds/1/val/pgd_acc")
        )
        assert sorted(mean) == sorted(seeds[0]) == sorted(seeds[1]) and mean
        for epoch, value in mean.items():
            assert value == pytest.approx((seeds[0][epoch] + seeds[1][epoch]) / 2, abs=1e-12)
        # the Dataset column: each seed's own training and validation split, tagged with it
        inputs = client.get_run(run_id).inputs.dataset_inputs
        used = {
            (t["mlflow.data.context"], t["seed"]): i.dataset.digest
            for i in inputs
            for t in [{tag.key: tag.value for tag in i.tags}]
        }
        assert set(used) == {(c, s) for c in ("training", "validation") for s in ("0", "1")}
        assert used["validation", "0"] != used["validation", "1"]
        assert used["training", "0"] != used["training", "1"]
    results = ray_results(tmp_path / "results" / "seeds")
    for result in results:
        with result.checkpoint.as_directory() as folder:
            names = {path.name for path in Path(folder).glob("*.pt")}
        assert names == {"checkpoint.seed0.pt", "checkpoint.seed1.pt"}


def assert_optuna_holds_every_epoch_ray_and_mlflow_hold(tmp_path, name: str, epochs: int):
    """Ray gives a searcher every result but a trial's last through `on_trial_result`, the last
    only to `on_trial_complete`: Optuna must still get each epoch once, at step = epoch, and an
    ASHA-stopped trial's value must be its last epoch's, not the one before."""
    from ray.tune import ExperimentAnalysis

    frames = ExperimentAnalysis(str(tmp_path / "results" / name)).trial_dataframes
    ray_epochs = {}
    for frame in frames.values():
        trial_id = frame["trial_id"].iloc[0]
        assert frame[schema.EPOCH].is_unique, frame[[schema.EPOCH, schema.VAL_PGD_ACC]]
        pairs = zip(frame[schema.EPOCH], frame[schema.VAL_PGD_ACC], strict=True)
        ray_epochs[trial_id] = {int(epoch): float(value) for epoch, value in pairs}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = load_runs(uri, name)
    client = MlflowClient(uri)
    mlflow_epochs = {
        trial_id: {m.step: m.value for m in client.get_metric_history(run_id, schema.VAL_PGD_ACC)}
        for trial_id, run_id in zip(runs["tags.ray_trial_id"], runs.run_id, strict=True)
    }
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == len(ray_epochs) == len(mlflow_epochs)
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.PRUNED in states, [t.state.name for t in study.trials]
    assert states <= {optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE}
    for trial in study.trials:
        trial_id = trial.user_attrs["ray_trial_id"]
        held = trial.intermediate_values
        expected = ray_epochs[trial_id]
        where = (trial.number, trial.state.name, held, expected, mlflow_epochs[trial_id])
        assert sorted(held) == sorted(expected) == sorted(mlflow_epochs[trial_id]), where
        assert sorted(held) == list(range(1, max(held) + 1)), where
        for epoch, value in held.items():
            assert value == pytest.approx(expected[epoch], abs=1e-12, rel=0), where
            assert value == pytest.approx(mlflow_epochs[trial_id][epoch], abs=1e-12, rel=0), where
        last = max(expected)
        assert trial.value == pytest.approx(expected[last], abs=1e-12, rel=0), where
        assert (trial.state == optuna.trial.TrialState.COMPLETE) == (last == epochs), where


@pytest.mark.slow
def test_ablation_runs_every_variant_with_every_seed_on_the_test_split(
    tmp_path, ray_cluster, robust_teacher_path, capsys
):
    spec = {
        "study": {"name": "ablate", "mode": "ablation", "metric": "test/pgd_acc"},
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": digits_base(epochs=2),
        "ablation": {"seeds": [0, 1], "variants": {"no_reweight": {"reweight.gamma": 0}}},
    }
    assert main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = load_runs(uri, "ablate")
    assert len(runs) == 4 and set(runs.status) == {"FINISHED"}
    pairs = set(zip(runs["tags.variant"], runs["tags.seed"], strict=True))
    assert pairs == {(v, s) for v in ("full", "no_reweight") for s in ("0", "1")}
    for name in ("clean", "fgsm", "pgd", "cw"):
        assert runs[f"metrics.test/{name}_acc"].between(0, 1).all()
        assert runs[f"metrics.test_best/{name}_acc"].between(0, 1).all()
    assert runs["metrics.test_best/epoch"].isin([1.0, 2.0]).all()
    assert set(runs["params.reweight.gamma"]) == {"1.0", "0.0"}
    assert set(runs["params.final"]) == {"True"}
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(runs.run_id[0], "checkpoint")}
    assert artifacts == {"checkpoint/checkpoint.pt", "checkpoint/config.json", "checkpoint/best.pt"}
    assert_students_load_back_as_mlflow_models(uri, runs)
    out = capsys.readouterr().out
    assert "full" in out and "no_reweight" in out and "test/pgd_acc" in out
    assert "test_best/pgd_acc" in out and "epoch of best `val/pgd_acc`" in out
    parent = load_runs(uri, "ablate", role="study").run_id[0]
    report = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/pareto.png", "report/curves.png"} <= report
    tables = {a.path for a in client.list_artifacts(parent)}
    assert {"ablation_table.csv", "ablation_table.tex"} <= tables
    csv = client.download_artifacts(parent, "ablation_table.csv", str(tmp_path))
    assert "no_reweight" in Path(csv).read_text()
    parent_run = client.get_run(parent)
    means = {
        variant: runs.loc[runs["tags.variant"] == variant, "metrics.test/pgd_acc"].mean()
        for variant in ("full", "no_reweight")
    }
    assert parent_run.data.tags["best"] == max(means, key=means.get)
    best_value = parent_run.data.metrics["study/best_value"]
    assert best_value == pytest.approx(max(means.values()), abs=1e-12)
    assert parent_run.data.metrics["study/trials_complete"] == 4
    assert_mlflow_ui_shows_the_study(tmp_path, "ablate", runs=4)


def assert_mlflow_ui_shows_the_study(tmp_path: Path, name: str, runs: int) -> None:
    """`mlflow ui` on the study's store, on 127.0.0.1, asked through its REST API what the
    browser shows: the experiment opens on its runs table (a model-training experiment), the
    parent run has the study's result, each trial its data sets and models, and the report is
    one HTML page with its pictures inside."""
    import urllib.request

    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "ui", "--host", "127.0.0.1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    command += ["--port", str(port), "--workers", "1"]
    with open(tmp_path / "ui.log", "a") as log:
        ui = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def call(path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if path.startswith("/api/") else raw.decode()

    try:
        wait_for_port(port, ui, timeout=120)
        assert "<html" in call("/").lower()
        experiment = call(f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
        tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        experiment_id = experiment["experiment"]["experiment_id"]
        found = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        by_role = {}
        for run in found:
            role = {t["key"]: t["value"] for t in run["data"]["tags"]}["role"]
            by_role.setdefault(role, []).append(run)
        (parent,) = by_role["study"]
        metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert metrics["study/trials_complete"] == runs and "study/best_value" in metrics
        assert len(by_role["trial"]) == runs
        for run in by_role["trial"]:
            contexts = {
                {t["key"]: t["value"] for t in i["tags"]}["mlflow.data.context"]
                for i in run["inputs"]["dataset_inputs"]
            }
            assert contexts == {"training", "validation", "test"}
        models = call("/api/2.0/mlflow/logged-models/search", {"experiment_ids": [experiment_id]})
        assert len(models["models"]) == 2 * runs
        page = call(f"/get-artifact?path=report/report.html&run_uuid={parent['info']['run_id']}")
        assert "<table>" in page and "data:image/png;base64," in page
    finally:
        stop(ui)


def assert_students_load_back_as_mlflow_models(uri: str, runs) -> None:
    """Each final run's students are MLflow models (the experiment's Models), which load back
    through MLflow alone and score the test split as the run recorded."""
    import mlflow
    import numpy as np

    from gacd.config import DataConfig
    from gacd.data import load_datasets, to_float

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ablate").experiment_id
    models = client.search_logged_models(experiment_ids=[experiment])
    assert sorted(m.name for m in models) == sorted(["student", "student_best"] * len(runs))
    assert {m.source_run_id for m in models} == set(runs.run_id)
    test = load_datasets(DataConfig(name="digits"), seed=0, with_test=True).test
    images, labels = to_float(test.images).numpy(), test.labels.numpy()
    mlflow.set_tracking_uri(uri)
    row = runs.iloc[0]
    for name, metric in (("student", "test/clean_acc"), ("student_best", "test_best/clean_acc")):
        model = mlflow.pyfunc.load_model(f"runs:/{row.run_id}/{name}")
        accuracy = float((np.argmax(model.predict(images), 1) == labels).mean())
        assert accuracy == pytest.approx(row[f"metrics.{metric}"], abs=0.01), name


@pytest.mark.slow
@pytest.mark.parametrize("trial_seeds", [None, [0, 1]], ids=["one seed", "two trial seeds"])
def test_an_interrupted_search_resumes_losing_and_repeating_nothing(
    tmp_path, ray_cluster, robust_teacher_path, trial_seeds
):
    epochs = 10
    spec = {
        "study": {
            "name": "resume",
            "num_samples": 2,
            "scheduler": {"name": "none"},
            "trial_seeds": trial_seeds,
            "sampler": {"points_to_evaluate": [{"tau": 0.2}]},  # run first, and once
        },
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": digits_base(epochs=epochs),
        "search": {"tau": {"distribution": "loguniform", "low": 0.05, "high": 0.5}},
    }
    command = [sys.executable, "-m", "study.run", write_study(tmp_path, spec)]
    command += study_args(tmp_path, ray_cluster)
    driver = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if f"epoch 3/{epochs}" in line:
            driver.send_signal(signal.SIGINT)
            break
    assert driver.wait(timeout=180) == 130, "".join(seen[-30:]) + driver.stdout.read()[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert load_runs(uri, "resume", role="study").status[0] == "KILLED"
    assert "RUNNING" not in set(load_runs(uri, "resume").status)

    assert main([command[3], "--resume", *study_args(tmp_path, ray_cluster)]) == 0
    parent = load_runs(uri, "resume", role="study")
    runs = load_runs(uri, "resume", parent_run_id=parent.run_id[0])
    assert parent.status[0] == "FINISHED"
    assert len(runs) == 2 and set(runs.status) == {"FINISHED"}
    client = MlflowClient(uri)
    for run_id in runs.run_id:
        steps = [m.step for m in client.get_metric_history(run_id, schema.VAL_PGD_ACC)]
        assert sorted(steps) == list(range(1, epochs + 1)), steps
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].params == {"tau": 0.2} and study.trials[1].params["tau"] != 0.2
    assert (runs["params.tau"].astype(float) == 0.2).sum() == 1
    results = ray_results(tmp_path / "results" / "resume")
    restored = [r for r in results if r.metrics["iterations_since_restore"] < epochs]
    assert restored, "no trial continued from a checkpoint: they restarted at epoch 0"
    assert all(r.metrics["training_iteration"] == epochs for r in results)


@pytest.mark.slow
def test_confirm_reruns_the_top_trials_on_fresh_seeds_without_the_test_split(
    tmp_path, ray_cluster, robust_teacher_path, capsys
):
    from study import confirm

    spec = {
        "study": {"name": "winner", "num_samples": 3, "scheduler": {"name": "none"}},
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": digits_base(epochs=2),
        "search": {"reweight.gamma": {"distribution": "uniform", "low": 0.0, "high": 3.0}},
    }
    args = study_args(tmp_path, ray_cluster)
    assert main([write_study(tmp_path, spec), *args]) == 0
    assert confirm.main(["--study", "winner", "--top", "2", "--seeds", "2", *args]) == 0
    runs = load_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "winner_confirm")
    study = optuna.load_study(study_name="winner", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best = sorted(study.trials, key=lambda trial: -trial.value)[:2]
    expected = {"full"} | {f"trial-{trial.number:03d}" for trial in best}
    assert set(runs["tags.variant"]) == expected and len(runs) == 6
    assert set(runs["tags.seed"]) == {"1000", "1001"} and set(runs.status) == {"FINISHED"}
    assert set(runs["params.final"]) == {"False"}
    assert not any(column.startswith("metrics.test/") for column in runs.columns)
    gammas = {float(g) for g in runs["params.reweight.gamma"]}
    assert gammas == {1.0} | {trial.params["reweight.gamma"] for trial in best}
    assert "ranked by mean val/pgd_acc over fresh seeds" in capsys.readouterr().out


def mlflow_server(database: Path, port: int, log: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 (its own process group, so it can be stopped)."""
    command = [str(Path(sys.executable).with_name("mlflow")), "server"]
    command += ["--backend-store-uri", f"sqlite:///{database}", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--artifacts-destination", str(database.parent / "artifacts")]
    with open(log, "a") as output:
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)


@pytest.mark.slow
def test_an_mlflow_server_lost_mid_study_loses_no_epoch(tmp_path, ray_cluster, robust_teacher_path):
    """The study goes on without MLflow; `study.sync` brings every epoch in once it is back."""
    from study import sync

    port, epochs = free_port(), 8
    server = mlflow_server(tmp_path / "server.db", port, tmp_path / "server.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, server, timeout=120)
        spec = {
            "study": {"name": "outage", "num_samples": 2, "scheduler": {"name": "none"}},
            "teacher": {"checkpoint": str(robust_teacher_path)},
            "base": digits_base(epochs=epochs),
            "search": {"tau": {"distribution": "loguniform", "low": 0.05, "high": 0.5}},
        }
        storage = ["--storage", str(tmp_path / "results")]
        command = [sys.executable, "-m", "study.run", write_study(tmp_path, spec)]
        command += ["--address", ray_cluster, "--tracking-uri", uri, *storage]
        command += ["--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
        driver = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        seen = []
        for line in driver.stdout:
            seen.append(line)
            if f"epoch 2/{epochs}" in line:
                stop(server)
                break
        output = "".join(seen) + driver.stdout.read()
        assert driver.wait(timeout=300) == 1, output[-3000:]
        assert "study goes on" in output and "study.sync outage" in output
        server = mlflow_server(tmp_path / "server.db", port, tmp_path / "server.log")
        wait_for_port(port, server, timeout=120)
        assert sync.main(["outage", "--tracking-uri", uri, *storage]) == 0
        runs = load_runs(uri, "outage")
        assert len(runs) == 2 and set(runs.status) == {"FINISHED"}
        client = MlflowClient(uri)
        for run_id in runs.run_id:
            steps = [m.step for m in client.get_metric_history(run_id, schema.VAL_PGD_ACC)]
            assert sorted(steps) == list(range(1, epochs + 1)), steps
    finally:
        if server.poll() is None:
            stop(server)


@pytest.mark.slow
def test_digits_baselines_runs_every_method_with_transfer_and_structure_metrics(
    tmp_path, ray_cluster, capsys
):
    """search_spaces/digits_baselines.yaml end to end, shortened to 2 epochs and one seed."""
    spec = yaml.safe_load((ROOT / "search_spaces" / "digits_baselines.yaml").read_text())
    spec["teacher"]["train"]["optim"]["epochs"] = 2
    spec["base"]["optim"]["epochs"] = 2
    spec["base"]["transfer"]["epochs"] = 5
    spec["base"]["eval"] |= {"pgd_steps": 5, "cw_steps": 5}
    spec["ablation"]["seeds"] = [0]
    assert main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)]) == 0
    runs = load_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "digits_baselines")
    methods = {"full", "natural", "pgd_at", "trades", "kd", "crd", "ard", "rslad"}
    methods.add("crd_current_positive")
    assert set(runs["tags.variant"]) == methods and set(runs.status) == {"FINISHED"}
    for name in (
        "test/pgd_acc",
        "test/cka_clean",
        "test/cka_adversarial",
        "test/class_corr_diff",
        "transfer/clean_acc",
        "transfer/pgd_acc",
        "transfer_best/pgd_acc",
        "test_best/cka_clean",
    ):
        assert runs[f"metrics.{name}"].notna().all(), name
    assert runs["metrics.test/cka_clean"].between(0, 1.0001).all()
    out = capsys.readouterr().out
    assert "transfer/pgd_acc" in out and "test/cka_clean" in out and "| rslad" in out
    # the report shows the teacher's own test metrics, as its MLflow run holds them
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    teacher = load_runs(uri, "gacd-teachers", role="teacher").iloc[0]
    parent = load_runs(uri, "digits_baselines", role="study").run_id[0]
    folder = MlflowClient(uri).download_artifacts(parent, "report", str(tmp_path / "got"))
    report = (Path(folder) / "report.md").read_text()
    section = report.split("## The teacher")[1].split("## ")[0]
    assert teacher.run_id in section and "pgd_at, small_cnn width 32" in section
    assert f"{teacher['metrics.test/pgd_acc']:.3f}" in section


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_127_0_0_1_only():
    """What `study.run` starts without --address: a fresh instance, bound to the loopback."""
    import ray

    from study.run import connect

    try:
        resources = connect(None, num_cpus=1, num_gpus=0)
        assert "node:127.0.0.1" in resources and resources["CPU"] == 1
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_teacher_s_task_takes_the_cpus_its_trials_will_share(ray_cluster):
    """The teacher trains before any trial starts: it gets the CPUs of the concurrent trials
    (at most one node's, at least a trial's), not one trial's share with the rest idle."""
    import ray

    from study.run import connect
    from study.teacher import teacher_cpus

    spec = spec_from_dict(
        {
            "study": {"name": "cpus", "mode": "ablation", "metric": "test/pgd_acc"},
            "teacher": {"checkpoint": "teacher.pt"},
            "base": digits_base(epochs=1),
            "ablation": {"seeds": [0]},
        }
    )
    try:
        connect(ray_cluster, None, None)  # the 2-CPU head node
        assert [teacher_cpus(spec, n) for n in (1, 2, 5, None)] == [1, 2, 2, 2]
        spec.resources.cpus_per_trial = 0.5
        assert [teacher_cpus(spec, n) for n in (1, 2, 4)] == [0.5, 1, 2]
    finally:
        ray.shutdown()
