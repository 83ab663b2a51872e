"""How well the search searches: `python -m bench.search`.

One study (by default `search_spaces/digits.yaml`: GACD's tau, negative count, reweighting
strength and PGD budget) searched by three arms, each repeated over several sampler seeds:
- `tpe_asha`: TPE proposing, ASHA stopping poor trials (the study file's own scheduler);
- `tpe`: TPE, every trial to the full budget;
- `random`: random search, every trial to the full budget.
Every search runs through `python -m study.run` (Ray, Optuna, MLflow), so what is measured is
the platform's own search. Cost is counted in trial-epochs (the epochs every trial of the search
ran, stopped ones included), not seconds: the figure does not depend on the machine's load.

A search's best trial is one seed's luck as much as a better configuration, so each arm's
incumbent (its best full-budget trial so far, by validation) at each budget of trial-epochs is
re-run on fresh seeds (one ablation study through `study.run`, validation split only, every
distinct configuration once), and the figure is that fresh-seed mean. Written: a JSON of every
search's curve and every incumbent's fresh value, a Markdown table, and a plot.

`--select-top K --select-seeds S..` adds the selection the comparison study makes
(`compare.top`, `compare.confirm_seeds`): at each budget, the search's K best full-budget trials
are re-run on the selection seeds and the best mean is the incumbent, its cost (K x seeds x
epochs) counted on top of the search's. The selection seeds are not the fresh seeds: what is
measured on the fresh seeds is not the noise the choice was made on.

The target (TPE + ASHA within a third of random search's trial-epochs reaches random search's
best) is judged paired by sampler seed, with a 95% interval and a margin (`paired`): holds,
fails, or undecided at this many seeds. A configuration re-run once is not re-run: a later run
of the benchmark in the same `--out` (more sampler seeds, another `--select-top`) takes it from
MLflow (`rerun`), and `--report` judges a finished JSON again without running anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from scipy import stats

from analysis.runs import load_study
from analysis.table import seed_values
from gacd import schema
from gacd.config import ConfigError
from study.confirm import confirm_spec
from study.spec import apply_budget

ARMS = ("tpe_asha", "tpe", "random")
FRESH_STUDY = "bench_search_fresh"
SELECT_STUDY = "bench_search_select"


@dataclass(frozen=True)
class Point:
    """A search after `trial_epochs` epochs of trials: its incumbent and that one's value."""

    trial_epochs: int
    value: float | None  # the incumbent's validation value in the search (one seed)
    params: dict[str, Any] | None
    # the `top` best full-budget trials so far, best first: [{"params": .., "value": ..}]
    leaders: tuple[dict[str, Any], ...] = ()


def curve(
    trials: list[optuna.trial.FrozenTrial], maximize: bool, top: int = 1, seeds_per_trial: int = 1
) -> list[Point]:
    """Trial-epochs spent and the best full-budget trials so far (the first is the incumbent),
    after each trial ends (in the order trials ended). A pruned or failed trial costs its
    epochs and never leads; of equal values the earlier trial ranks first. A trial over
    several training seeds (`study.trial_seeds`) costs its epochs on each."""
    ended = sorted(
        (t for t in trials if t.state.is_finished() and t.datetime_complete is not None),
        key=lambda t: (t.datetime_complete, t.number),
    )
    points, spent, complete = [], 0, []
    for trial in ended:
        spent += len(trial.intermediate_values) * seeds_per_trial
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
            complete.append(trial)
        ranked = sorted(complete, key=lambda t: -t.value if maximize else t.value)[: max(top, 1)]
        best = ranked[0] if ranked else None
        leaders = tuple({"params": dict(t.params), "value": t.value} for t in ranked)
        points.append(
            Point(spent, best.value if best else None, dict(best.params) if best else None, leaders)
        )
    return points


def incumbent_at(points: list[Point], budget: int) -> Point | None:
    """The incumbent once at most `budget` trial-epochs were spent (None: none yet)."""
    within = [point for point in points if point.trial_epochs <= budget and point.params]
    return within[-1] if within else None


def arm_spec(
    base: dict,
    arm: str,
    seed: int,
    trials: int,
    name: str,
    trial_seeds: list[int] | None = None,
    from_defaults: bool = False,
) -> dict:
    """The study file's search, as one arm with one sampler seed (and its trials over
    `trial_seeds`, where given; else as the file says; and, `from_defaults`, the file's own
    configuration run first: `study.sampler.points_to_evaluate: [defaults]`)."""
    spec = json.loads(json.dumps(base))
    study = spec["study"]
    study |= {"name": name, "mode": "search", "num_samples": trials}
    if trial_seeds is not None:
        study["trial_seeds"] = trial_seeds
    sampler = dict(study.get("sampler") or {})
    sampler |= {"name": "random" if arm == "random" else "tpe", "seed": seed}
    if arm == "random":
        for key in ("multivariate", "n_startup_trials"):
            sampler.pop(key, None)
    if from_defaults:
        sampler["points_to_evaluate"] = ["defaults"]
    study["sampler"] = sampler
    if arm != "tpe_asha":
        study["scheduler"] = {"name": "none"}
    elif (study.get("scheduler") or {}).get("name", "none") == "none":
        raise SystemExit(f"the study's scheduler is none: arm {arm} needs its ASHA settings")
    return spec


def search_name(
    arm: str, seed: int, trial_seeds: list[int] | None, from_defaults: bool = False
) -> str:
    """`bench_search_tpe_asha_s3`, `..._s3_trials0-1` for trials over seeds 0 and 1, and
    `..._defaults-kept` for a search that runs the file's own configuration first, to its full
    budget (`..._defaults`, in stores of `15abe0a`: ASHA could stop it then)."""
    name = f"bench_search_{arm}_s{seed}"
    if trial_seeds is not None:
        name += f"_trials{'-'.join(map(str, trial_seeds))}"
    return name + ("_defaults-kept" if from_defaults else "")


def arm_trial_seeds(values: list[str], arms: list[str]) -> dict[str, list[int]]:
    """`--trial-seeds tpe_asha=0,1`: each named arm's trials over those training seeds. A
    ValueError names what is wrong."""
    found: dict[str, list[int]] = {}
    for value in values:
        arm, _, seeds = value.partition("=")
        if arm not in arms:
            raise ValueError(
                f"--trial-seeds {value}: expected ARM=SEED,SEED with ARM one of "
                f"--arms ({', '.join(arms)})"
            )
        try:
            found[arm] = [int(seed) for seed in seeds.split(",")]
        except ValueError:
            raise ValueError(
                f"--trial-seeds {value}: expected integer seeds (tpe_asha=0,1)"
            ) from None
        if len(set(found[arm])) != len(found[arm]):
            raise ValueError(f"--trial-seeds {value}: expected distinct seeds")
    return found


def seeds_per_trial(trial_seeds: dict[str, list[int]] | None, arm: str) -> int:
    """How many training seeds each of an arm's trials trains (`--trial-seeds`; else one)."""
    return len((trial_seeds or {}).get(arm) or [None])


def arm_label(result: dict, arm: str) -> str:
    """An arm as the table and the plot name it: `tpe_asha`, `tpe_asha (trials over 2 seeds)`,
    `random (from defaults)`."""
    seeds = seeds_per_trial(result.get("trial_seeds"), arm)
    words = [f"trials over {seeds} seeds"] if seeds > 1 else []
    words += ["from defaults"] if arm in result.get("from_defaults", []) else []
    return f"{arm} ({', '.join(words)})" if words else arm


def search_file(
    path: str, budget: str | None, epochs: int | None, teacher: str | None
) -> tuple[dict, str | None]:
    """The study file every arm starts from, with its budget applied first (a budget's
    `study.num_samples` or `base.optim.epochs` must not replace `--trials` or `--epochs`), then
    `epochs` and `teacher`; and the budget's name (None: none). A bad file or budget raises a
    ValueError that names the file."""
    base = yaml.safe_load(Path(path).read_text())
    if not isinstance(base, dict) or not base.get("search"):
        raise ValueError(f"--study {path}: expected a search file (study.mode search)")
    if (base.get("study") or {}).get("mode", "search") != "search":
        raise ValueError(f"--study {path}: expected a search file (study.mode search)")
    try:
        base = apply_budget(base, budget)
    except ConfigError as error:
        raise ValueError(f"--study {path}: {error}") from error
    budget = base["study"].pop("budget", None)  # applied: the arms' files have no budgets
    if epochs:
        base["base"].setdefault("optim", {})["epochs"] = epochs
        scheduler = base["study"].get("scheduler") or {}
        if scheduler.get("grace_period", 1) > epochs:
            scheduler["grace_period"] = 1
    if teacher:
        base["teacher"] = {"checkpoint": str(Path(teacher).resolve())}
    return base, budget


class Runner:
    """`python -m study.run` into one results folder and one MLflow and Optuna store."""

    def __init__(self, out: Path, extra: list[str]) -> None:
        self.out = out
        self.tracking_uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.optuna_uri = f"sqlite:///{(out / 'optuna.db').resolve()}"
        self.extra = extra

    def run(self, spec: dict) -> float:
        name = spec["study"]["name"]
        path = self.out / "studies" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(spec, sort_keys=False)
        log = self.out / "logs" / f"{name}.log"
        done_marker = self.marker(name)
        if done_marker.is_file():  # finished by an earlier run of the benchmark
            if path.is_file() and yaml.safe_load(path.read_text()) != yaml.safe_load(text):
                raise SystemExit(
                    f"bench.search: {name} in {self.out} ran another study file ({path}) than "
                    "this run's; its figures are not this one's: give this run another --out"
                )
            path.write_text(text)
            return float(done_marker.read_text())
        path.write_text(text)
        command = [sys.executable, "-m", "study.run", str(path)]
        command += ["--storage", str(self.out / "ray_results"), "--tracking-uri", self.tracking_uri]
        command += ["--optuna-storage", self.optuna_uri, *self.extra]
        if (self.out / "ray_results" / name / schema.SPEC_FILE).is_file():
            command.append("--resume")  # an interrupted benchmark continues where it was
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        started = time.perf_counter()
        print(f"bench.search: {name}", flush=True)
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(done.stdout)
        if done.returncode != 0:
            tail = done.stdout.decode(errors="replace")[-2000:]
            raise SystemExit(f"bench.search: {name} failed (exit {done.returncode}):\n{tail}")
        done_marker.write_text(str(seconds))
        return seconds

    def marker(self, name: str) -> Path:
        """Where a study that ran to its end has its seconds written."""
        return self.out / "logs" / f"{name}.done"

    def trials(self, name: str) -> tuple[list[optuna.trial.FrozenTrial], bool]:
        study = optuna.load_study(study_name=name, storage=self.optuna_uri)
        return study.trials, study.direction == optuna.study.StudyDirection.MAXIMIZE


def rerun_name(variants: dict[str, dict], seeds: list[int], prefix: str = FRESH_STUDY) -> str:
    """A re-run study's name, from what it runs: a rerun with other searches is another."""
    digest = hashlib.sha256(json.dumps([variants, seeds], sort_keys=True).encode()).hexdigest()
    return f"{prefix}_{digest[:8]}"


def seed_figures(tracking_uri: str, name: str, metric: str) -> dict[str, dict[int, float]]:
    """Each variant's value of `metric` by seed in a re-run study (its finished runs only)."""
    table = seed_values(load_study(tracking_uri, name).runs, metric)
    return {
        str(label): {int(seed): float(value) for seed, value in row.dropna().items()}
        for label, row in table.iterrows()
    }


def figures(by_seed: dict[int, float], seeds: list[int]) -> tuple[float, float, int]:
    """(mean, std, seeds measured) over `seeds`, as the ablation table computes them."""
    values = pd.Series([by_seed[seed] for seed in sorted(seeds) if seed in by_seed], dtype=float)
    return float(values.mean()), float(values.std(ddof=1)), len(values)


def canonical(params: dict) -> str:
    """One configuration's identity, whatever its label in a re-run study."""
    return json.dumps(params, sort_keys=True)


@dataclass
class Rerun:
    """Configurations re-run on seeds: each one's (mean, std, seeds) by label, `full` (the
    file's own configuration) included; the re-run studies those figures come from (ones run
    before first, by name; the ones run now last); and the seconds those studies took, each
    timed when it ran (what the figures cost, whether they were run now or before)."""

    values: dict[str, tuple[float, float, int]]
    studies: list[str]
    seconds: float


def rerun(
    runner: Runner,
    resolved: dict,
    configs: dict[str, dict],
    seeds: list[int],
    prefix: str,
    metric: str,
) -> Rerun:
    """`configs` (label: searched values) re-run on `seeds`, each configuration on each seed
    once in the benchmark's store: a seed that an earlier re-run of the same kind (`prefix`)
    from the same study file measured for a configuration (another `--seeds`, `--select-top`
    or `--fresh-seeds` of this benchmark in the same `--out`) is taken from MLflow as it was;
    only the missing (configuration, seed) pairs run, one more ablation study for each set of
    missing seeds. So extending a finished benchmark with more sampler seeds costs their
    searches and the configurations they add, and more fresh seeds cost only those seeds."""
    known: dict[tuple[str, int], tuple[float, str]] = {}  # (config, seed): (value, study)

    def learn(study: str, variants: dict[str, dict]) -> None:
        for label, by_seed in seed_figures(runner.tracking_uri, study, metric).items():
            key = "full" if label == "full" else canonical(variants[label])
            for seed, value in by_seed.items():  # a failed run's seed stays missing
                known.setdefault((key, seed), (value, study))

    for path in sorted((runner.out / "studies").glob(f"{prefix}_*.yaml")):
        if not runner.marker(path.stem).is_file():
            continue  # interrupted: its own name is run again (and resumed) below if needed
        earlier = yaml.safe_load(path.read_text())
        ablation = earlier.get("ablation") or {}
        variants = ablation.get("variants") or {}
        same = confirm_spec(resolved, variants, ablation.get("seeds") or [], path.stem)
        if yaml.safe_load(yaml.safe_dump(same, sort_keys=False)) != earlier:
            continue  # another study file's base
        learn(path.stem, variants)
    keys = {label: canonical(params) for label, params in configs.items()} | {"full": "full"}

    def lacking(key: str) -> tuple[int, ...]:
        return tuple(seed for seed in seeds if (key, seed) not in known)

    groups: dict[tuple[int, ...], dict[str, dict]] = {}  # missing seeds: configurations
    for label, params in configs.items():
        if lacking(keys[label]):
            groups.setdefault(lacking(keys[label]), {})[label] = params
    ran = []
    for group_seeds, missing in sorted(groups.items()):  # every study also runs `full`
        ran.append(rerun_name(missing, list(group_seeds), prefix))
        runner.run(confirm_spec(resolved, missing, list(group_seeds), ran[-1]))
        learn(ran[-1], missing)
    if lacking("full"):  # the reference alone, on the seeds no study above gave it
        ran.append(rerun_name({}, list(lacking("full")), prefix))
        runner.run(confirm_spec(resolved, {}, list(lacking("full")), ran[-1]))
        learn(ran[-1], {})
    by_seed: dict[str, dict[int, float]] = {}
    studies = set()
    for key in set(keys.values()):
        for seed in seeds:
            if (key, seed) in known:
                value, study = known[key, seed]
                by_seed.setdefault(key, {})[seed] = value
                studies.add(study)
    order = sorted(studies - set(ran)) + [study for study in ran if study in studies]
    seconds = sum(float(runner.marker(study).read_text()) for study in order)
    values = {label: figures(by_seed.get(key, {}), seeds) for label, key in keys.items()}
    return Rerun(values, order, seconds)


SEARCH_BEST = "the search's best"


def selections(result: dict) -> list[tuple[str, str]]:
    """How incumbents were chosen: (the searches' key, its name in the table)."""
    kinds = [("incumbents", SEARCH_BEST)]
    if result.get("select_top"):
        top, seeds = result["select_top"], len(result["select_seeds"])
        kinds.append(("selected", f"best of top {top} on {seeds} seeds"))
    return kinds


def summarise(result: dict) -> pd.DataFrame:
    """Per arm, way of choosing and budget: the incumbents' fresh-seed value over sampler
    seeds."""
    rows = []
    for arm in result["arms"]:
        for key, chosen_by in selections(result):
            for budget in result["budgets"]:
                found = [
                    s[key][str(budget)]
                    for s in result["searches"]
                    if s["arm"] == arm and s[key].get(str(budget))
                ]
                values = pd.Series([i["fresh_mean"] for i in found], dtype=float)
                lucky = pd.Series([i["search_value"] for i in found], dtype=float)
                cost = pd.Series([i["cost"] for i in found], dtype=float)
                spent = [s["trial_epochs"] for s in result["searches"] if s["arm"] == arm]
                rows.append(
                    {
                        "arm": arm_label(result, arm),
                        "incumbent": chosen_by,
                        "budget (trial-epochs)": budget,
                        "spent, selection included": cost.mean() if len(cost) else float("nan"),
                        "searches with an incumbent": f"{len(values)}/{len(spent)}",
                        "fresh-seed value": values.mean() if len(values) else float("nan"),
                        "± std over sampler seeds": values.std(ddof=1) if len(values) > 1 else 0.0,
                        "search's own value": lucky.mean() if len(lucky) else float("nan"),
                        "trial-epochs of the whole search": pd.Series(spent, dtype=float).mean(),
                    }
                )
    return pd.DataFrame(rows)


def noise(result: dict) -> dict:
    """How well the benchmark can tell configurations apart. Over the configurations re-run on
    the fresh seeds: the spread (std) of their means against one configuration's spread over
    the seeds (the mean of their stds); over those also re-run on the selection seeds: how well
    a configuration's selection mean predicts its fresh mean (Pearson and Spearman). Where the
    spread of means is not well above the seeds' spread, choosing cannot pay and no arm can
    beat another."""
    columns = ["mean", "std", "n"]
    fresh = pd.DataFrame.from_dict(result["fresh"], orient="index", columns=columns)
    selection = pd.DataFrame.from_dict(
        result.get("selection") or {}, orient="index", columns=columns
    )
    both = fresh.index.intersection(selection.index)
    pair = pd.DataFrame({"fresh": fresh["mean"][both], "selection": selection["mean"][both]})
    pair = pair.dropna()
    nan = float("nan")
    return {
        "configurations": len(fresh),
        "spread_of_means": float(fresh["mean"].std(ddof=1)) if len(fresh) > 1 else nan,
        "seed_std": float(fresh["std"].mean()),  # NaN stds (one seed) are skipped
        "both": len(pair),
        "pearson": float(pair["fresh"].corr(pair["selection"])) if len(pair) > 2 else nan,
        "spearman": (
            float(pair["fresh"].corr(pair["selection"], method="spearman"))
            if len(pair) > 2
            else nan
        ),
    }


def chosen(means: list[float | None], maximize: bool) -> int:
    """The index of the best of the candidates' selection means (the first of equals). One none
    of whose runs finished (None or NaN) cannot be chosen; if none finished, the first (the
    search's own best) stands."""
    ran = [i for i, mean in enumerate(means) if mean is not None and mean == mean]
    if not ran:
        return 0
    return (max if maximize else min)(ran, key=means.__getitem__)


def third_of_random(searches: list[dict], selection_cost: int = 0, divisor: int = 3) -> int | None:
    """The search budget at which a search and its selection cost a third (1/`divisor`) of what
    the largest random search and its selection cost (None: no random arm, or no budget left)."""
    spent = [search["trial_epochs"] for search in searches if search["arm"] == "random"]
    if not spent:
        return None
    third = (max(spent) + selection_cost) // divisor - selection_cost
    return third if third > 0 else None


def paired(better: dict, worse: dict, margin: float, maximize: bool) -> dict:
    """Non-inferiority of `better` to `worse` ({sampler seed: fresh value}, None: no incumbent)
    over the seeds both have: the paired differences (positive: `better` did better, whichever
    way the metric goes), their mean and two-sided 95% t-interval, and the verdict: "holds"
    when the interval lies above -margin (within the margin or better, beyond the noise),
    "fails" when it lies below -margin, "undecided" when it holds -margin or fewer than two
    seeds pair up. `seeds_to_decide`: how many sampler seeds in all would make the interval's
    half-width the distance from the mean difference to -margin, were the mean and spread to
    stay as measured (None where it cannot be said, or beyond 10,000)."""
    seeds = [s for s in better if better[s] is not None and worse.get(s) is not None]
    sign = 1.0 if maximize else -1.0
    differences = pd.Series([sign * (better[s] - worse[s]) for s in seeds], dtype=float)
    by_seed = dict(zip(seeds, differences.tolist(), strict=True))
    found = {"margin": margin, "seeds": len(seeds), "differences": by_seed}
    nan = float("nan")
    if len(seeds) < 2:
        mean = float(differences.mean()) if seeds else nan
        none = {"std": nan, "ci95": None, "seeds_to_decide": None, "verdict": "undecided"}
        return found | {"mean": mean} | none
    mean, std = float(differences.mean()), float(differences.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(seeds) - 1)) * std / len(seeds) ** 0.5
    low, high = mean - half, mean + half
    verdict = "holds" if low > -margin else "fails" if high < -margin else "undecided"
    gap = abs(mean + margin)
    seeds_to_decide = next(
        (
            n
            for n in range(2, 10_001)
            if gap > 0 and std > 0 and stats.t.ppf(0.975, n - 1) * std / n**0.5 < gap
        ),
        None,
    )
    return found | {
        "mean": mean,
        "std": std,
        "ci95": [low, high],
        "seeds_to_decide": seeds_to_decide,
        "verdict": verdict,
    }


def target(result: dict, key: str = "incumbents", margin: float = 0.01, divisor: int = 3) -> dict:
    """TPE + ASHA within a third (1/`divisor`: 1 is the same budget) of random search's
    trial-epochs against random search with all of its own, each search's incumbent (chosen the
    `key` way, its selection's cost counted) as measured on fresh seeds, over sampler seeds,
    paired by sampler seed and judged by `paired` at `margin` (in the metric's units)."""
    cost = result.get("selection_cost", 0) if key == "selected" else 0
    third = third_of_random(result["searches"], cost, divisor)

    def fresh_at(search: dict, budget: int | None) -> float | None:
        incumbent = search[key].get(str(budget))
        return incumbent["fresh_mean"] if incumbent else None

    arm = "tpe_asha" if third is not None else None  # no random arm: no third to hold to
    tpe_asha = {s["seed"]: fresh_at(s, third) for s in result["searches"] if s["arm"] == arm}
    random = {
        s["seed"]: fresh_at(s, s["trial_epochs"])
        for s in result["searches"]
        if s["arm"] == "random"
    }
    found_a = pd.Series([v for v in tpe_asha.values() if v is not None], dtype=float)
    found_r = pd.Series([v for v in random.values() if v is not None], dtype=float)
    difference = paired(tpe_asha, random, margin, result.get("maximize", True))
    return {
        "third": third,  # the budget TPE + ASHA is held to (a third of random search's, or all)
        "divisor": divisor,
        "selection_cost": cost,
        "tpe_asha_at_third": tpe_asha,
        "random_at_all": random,
        "tpe_asha_mean": found_a.mean(),
        "tpe_asha_std": found_a.std(ddof=1),
        "random_mean": found_r.mean(),
        "random_std": found_r.std(ddof=1),
        "difference": difference,
        "holds": difference["verdict"] == "holds",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(result)
    figure, axis = plt.subplots(figsize=(9.6, 4.4))
    for index, name in enumerate(result["arms"]):
        arm = arm_label(result, name)
        color = f"C{index}"  # one colour per arm: its fresh values and its search's own
        seeds = seeds_per_trial(result.get("trial_seeds"), name)
        own = "one seed" if seeds == 1 else f"mean of {seeds} seeds"
        for key, chosen_by in selections(result):
            group = table[(table["arm"] == arm) & (table["incumbent"] == chosen_by)]
            selected = key == "selected"
            axis.errorbar(
                group["spent, selection included"],
                group["fresh-seed value"],
                yerr=group["± std over sampler seeds"],
                marker="s" if selected else "o",
                linestyle="--" if selected else "-",
                capsize=3,
                color=color,
                label=f"{arm}, {chosen_by} (fresh seeds)",
            )
        group = table[(table["arm"] == arm) & (table["incumbent"] == SEARCH_BEST)]
        axis.plot(
            group["budget (trial-epochs)"],
            group["search's own value"],
            linestyle=":",
            color=color,
            alpha=0.6,
            label=f"{arm} (the search's own, {own})",
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("trial-epochs spent (selection included)")
    axis.set_ylabel(result["metric"])
    axis.set_title(f"{result['study']}: incumbent by budget ({len(result['seeds'])} sampler seeds)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__)
    parser.add_argument("--study", default="search_spaces/digits.yaml", help="a search file")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="sampler seeds"
    )
    parser.add_argument("--trials", type=int, default=32, help="trials per search (every arm)")
    parser.add_argument(
        "--trial-seeds",
        nargs="+",
        default=[],
        metavar="ARM=SEEDS",
        help="an arm whose trials each train on several seeds and report their mean "
        "(study.trial_seeds), e.g. tpe_asha=0,1; its trial-epochs count every seed's",
    )
    parser.add_argument(
        "--from-defaults",
        nargs="+",
        default=[],
        choices=ARMS,
        metavar="ARM",
        help="arms whose searches run the file's own configuration first "
        "(study.sampler.points_to_evaluate: [defaults]), e.g. tpe_asha",
    )
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[48, 128, 384],
        help="trial-epochs at which each search's incumbent is re-run on fresh seeds",
    )
    parser.add_argument("--fresh-seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument(
        "--select-top",
        type=int,
        default=3,
        help="also choose each incumbent among the search's K best trials re-run on "
        "--select-seeds, as the comparison study's confirm stage does (0: not; default 3)",
    )
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[2000, 2001])
    parser.add_argument(
        "--budget",
        help="an entry of the file's budgets section (default: its study.budget), applied "
        "before --trials and --epochs, which it cannot undo",
    )
    parser.add_argument("--epochs", type=int, help="override base.optim.epochs (tests)")
    parser.add_argument("--teacher", help="a trained teacher's checkpoint, instead of the file's")
    parser.add_argument("--out", default="runs/bench-search", help="stores and logs")
    parser.add_argument("--results", default=DEFAULT_RESULTS)
    parser.add_argument(
        "--plot",
        help="the figure to write (default: beside --results, its name ending .png, and "
        "docs/search_efficiency.png for the default --results; with --report: none)",
    )
    parser.add_argument("--num-cpus", help="passed to study.run")
    parser.add_argument(
        "--address", help="a running Ray cluster for every study (passed to study.run)"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.01,
        help="the target holds when TPE + ASHA's paired shortfall against random search is "
        "below this (in the metric's units) beyond the noise: its 95%% interval above -margin",
    )
    parser.add_argument(
        "--report",
        metavar="RESULTS",
        help="judge and show a finished benchmark's JSON again (with --margin, --plot) and "
        "run nothing",
    )
    args = parser.parse_args(argv)
    if args.report:  # a figure only where asked for: the default is the digits run's
        return rejudge(args.report, args.margin, args.plot)
    plot_path = default_plot(args.results) if args.plot is None else args.plot

    try:
        base, budget_name = search_file(args.study, args.budget, args.epochs, args.teacher)
        trial_seeds = arm_trial_seeds(args.trial_seeds, args.arms)
        stray = sorted(set(args.from_defaults) - set(args.arms))
        if stray:
            raise ValueError(f"--from-defaults {' '.join(stray)}: expected arms of --arms")
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--num-cpus", args.num_cpus] if args.num_cpus else []
    runner = Runner(out, extra + (["--address", args.address] if args.address else []))
    started = time.perf_counter()

    searches = []
    for seed in args.seeds:  # seed-major: a stopped benchmark has every arm for its seeds
        for arm in args.arms:
            seeds_of_trial, first = trial_seeds.get(arm), arm in args.from_defaults
            name = search_name(arm, seed, seeds_of_trial, first)
            spec = arm_spec(base, arm, seed, args.trials, name, seeds_of_trial, first)
            seconds = runner.run(spec)
            trials, maximize = runner.trials(name)
            per_trial = seeds_per_trial(trial_seeds, arm)
            points = curve(trials, maximize, top=max(args.select_top, 1), seeds_per_trial=per_trial)
            searches.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "name": name,
                    "trial_seeds": seeds_of_trial,
                    "from_defaults": first,
                    "seconds": seconds,
                    "trial_epochs": points[-1].trial_epochs if points else 0,
                    "trials": len(trials),
                    "complete": sum(t.state.name == "COMPLETE" for t in trials),
                    "curve": [vars(point) for point in points],
                }
            )

    saved = out / "ray_results" / searches[0]["name"] / schema.SPEC_FILE
    resolved = json.loads(saved.read_text())["resolved"]
    metric = base["study"].get("metric", "val/pgd_acc")
    epochs = int(resolved["base"]["optim"]["epochs"])
    variants: dict[str, dict] = {}  # every configuration any stage re-runs, labelled once

    def label_of(params: dict) -> str:
        label = next((k for k, v in variants.items() if v == params), None)
        if label is None:
            label = f"config_{len(variants)}"
            variants[label] = params
        return label

    def marks(search: dict, third: int | None) -> list[int]:
        """The budgets a search's incumbent is taken at: the asked ones, its end, the third,
        and random search's whole budget."""
        extra = [budget for budget in (third, third_of_random(searches, divisor=1)) if budget]
        return sorted({*args.budgets, search["trial_epochs"], *extra})

    # Each search's incumbent at every budget (and at a third of random search's, and at its end).
    points = {search["name"]: [Point(**p) for p in search["curve"]] for search in searches}
    third = third_of_random(searches)
    for search in searches:
        search["incumbents"], search["selected"] = {}, {}
        for budget in marks(search, third):
            point = incumbent_at(points[search["name"]], budget)
            if point is not None:
                search["incumbents"][str(budget)] = {
                    "config": label_of(point.params),
                    "trial_epochs": point.trial_epochs,
                    "search_value": point.value,
                    "cost": budget,
                }

    if not variants:
        raise SystemExit("bench.search: no search has a full-budget trial: nothing to confirm")

    # With --select-top: each search's leaders re-run on the selection seeds, the best mean chosen.
    selection_cost = args.select_top * len(args.select_seeds) * epochs
    selection: dict[str, tuple[float, float, int]] = {}
    selection_studies: list[str] = []
    selection_seconds = 0.0
    if args.select_top:
        chosen_third = third_of_random(searches, selection_cost)
        for search in searches:
            for budget in marks(search, chosen_third):
                point = incumbent_at(points[search["name"]], budget)
                if point is not None:
                    search["selected"][str(budget)] = {
                        "candidates": [label_of(leader["params"]) for leader in point.leaders],
                        "values": [leader["value"] for leader in point.leaders],
                        "trial_epochs": point.trial_epochs,
                        "cost": budget + len(point.leaders) * len(args.select_seeds) * epochs,
                    }
        candidates = {
            label: variants[label]
            for search in searches
            for choice in search["selected"].values()
            for label in choice["candidates"]
        }
        chosen_from = rerun(runner, resolved, candidates, args.select_seeds, SELECT_STUDY, metric)
        selection, selection_studies = chosen_from.values, chosen_from.studies
        selection_seconds = chosen_from.seconds
        for search in searches:
            for choice in search["selected"].values():
                means = [selection.get(label, (None,))[0] for label in choice["candidates"]]
                best = chosen(means, maximize)
                choice |= {
                    "config": choice["candidates"][best],
                    "search_value": choice["values"][best],
                    "selection_mean": means[best],
                }
    # Every incumbent, however chosen, on the fresh seeds: each distinct configuration once.
    final = {
        choice["config"]: variants[choice["config"]]
        for search in searches
        for key in ("incumbents", "selected")
        for choice in search[key].values()
    }
    measured = rerun(runner, resolved, final, args.fresh_seeds, FRESH_STUDY, metric)
    fresh = measured.values
    for search in searches:
        for key in ("incumbents", "selected"):
            for choice in search[key].values():
                mean, std, _ = fresh[choice["config"]]
                choice |= {"fresh_mean": mean, "fresh_std": std}

    result = {
        "study": args.study,
        "budget": budget_name,  # the file's budget applied (None: the file as written)
        "metric": metric,
        "arms": args.arms,
        "seeds": args.seeds,
        "trials": args.trials,
        "trial_seeds": trial_seeds,  # the arms whose trials average several training seeds
        "from_defaults": args.from_defaults,  # the arms that ran the file's configuration first
        "budgets": args.budgets,
        "fresh_seeds": args.fresh_seeds,
        "select_top": args.select_top,
        "select_seeds": args.select_seeds if args.select_top else [],
        "selection_cost": selection_cost,
        "selection_studies": selection_studies,  # where the selection's figures come from
        "selection_seconds": selection_seconds,
        "selection": selection,
        "variants": variants,
        "fresh_studies": measured.studies,  # where the fresh figures come from
        "fresh": fresh,
        "fresh_seconds": measured.seconds,
        "searches": searches,
        "maximize": maximize,
        "wall_seconds": time.perf_counter() - started,  # this run of the command only
        # what the figures cost: every search and re-run study, each timed when it ran
        "compute_seconds": sum(s["seconds"] for s in searches)
        + selection_seconds
        + measured.seconds,
        "date": time.strftime("%Y-%m-%d"),
    }
    judge(result, args.margin)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2, default=str))
    show(result, plot_path)
    return 0


DEFAULT_RESULTS = "bench/results/search.json"


def default_plot(results: str) -> str:
    """Where a run's figure goes unless `--plot` says: the documented digits figure for the
    default results, else beside the results (another run never overwrites the docs' figure)."""
    if results == DEFAULT_RESULTS:
        return "docs/search_efficiency.png"
    return str(Path(results).with_suffix(".png"))


def judge(result: dict, margin: float) -> dict:
    """The target (both ways of choosing the incumbent, with a selection) and the noise, from
    a result's figures: what a finished benchmark's JSON can be re-judged with."""
    result["target"] = target(result, margin=margin)
    # the same, at random search's whole budget: whether TPE + ASHA does at least as well there
    result["equal_budget"] = target(result, margin=margin, divisor=1)
    result["noise"] = noise(result)
    if result.get("select_top"):
        result["target_selected"] = target(result, "selected", margin)
    return result


def show(result: dict, plot_path: str | None) -> None:
    """The table, the verdicts and the noise, printed; the plot, written."""
    if plot_path:
        plot(result, Path(plot_path))
    table = summarise(result)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    goals = [
        (f"target ({chosen_by})", result["target" if key == "incumbents" else "target_selected"])
        for key, chosen_by in selections(result)
    ]
    if "equal_budget" in result:
        goals.append((f"at random search's budget ({SEARCH_BEST})", result["equal_budget"]))
    searcher = arm_label(result, "tpe_asha")
    for title, goal in goals:
        if goal["third"]:
            paid = f" + {goal['selection_cost']} to select" if goal["selection_cost"] else ""
            print(
                f"{title}: {searcher} within {goal['third']}{paid} trial-epochs "
                f"reaches {goal['tpe_asha_mean']:.3f} ± {goal['tpe_asha_std']:.3f} (fresh seeds), "
                f"{arm_label(result, 'random')} with all of its own {goal['random_mean']:.3f} ± "
                f"{goal['random_std']:.3f}"
            )
            print(f"  {verdict_line(goal['difference'])}")
    spread = result["noise"]
    agreement = (
        f"; selection and fresh means of the {spread['both']} run on both correlate "
        f"{spread['pearson']:.2f} (Spearman {spread['spearman']:.2f})"
        if spread["both"] >= 2  # fewer (no selection: `--select-top 0`): no correlation
        else ""
    )
    print(
        f"noise: over {spread['configurations']} configurations on the fresh seeds, their means "
        f"spread {spread['spread_of_means']:.3f} (std) against {spread['seed_std']:.3f} between "
        f"one configuration's seeds{agreement}"
    )


def verdict_line(difference: dict) -> str:
    """One paired comparison, in words."""
    n, margin = difference["seeds"], difference["margin"]
    if difference["ci95"] is None:
        return f"{difference['verdict']}: {n} sampler seed(s) pair up, too few for an interval"
    low, high = difference["ci95"]
    more = difference["seeds_to_decide"]
    tail = ""
    if difference["verdict"] == "undecided" and more:
        tail = f"; {more} sampler seeds in all would decide it, were mean and spread to stay"
    return (
        f"{difference['verdict']} at margin {margin:g}: paired difference "
        f"{difference['mean']:+.3f} (95% CI {low:+.3f} to {high:+.3f}) over {n} sampler "
        f"seeds{tail}"
    )


def rejudge(path: str, margin: float, plot_path: str | None) -> int:
    """`--report`: a finished benchmark's JSON judged again (at another margin, or by a newer
    verdict), written back with only its derived figures replaced, and shown."""
    file = Path(path)
    try:
        result = json.loads(file.read_text())
        result.setdefault("maximize", direction(result["study"]) == "max")
        judge(result, margin)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"bench.search --report {path}: expected the JSON a bench.search run wrote "
            f"(its figures and its study file); {type(error).__name__}: {error}"
        ) from error
    file.write_text(json.dumps(result, indent=2, default=str))
    show(result, plot_path)
    return 0


def direction(study_file: str) -> str:
    """The metric's direction a study file names (`study.direction`, default max)."""
    spec = yaml.safe_load(Path(study_file).read_text()) or {}
    return (spec.get("study") or {}).get("direction", "max")


if __name__ == "__main__":
    raise SystemExit(main())
