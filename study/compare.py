"""A fair comparison as one study (`mode: compare`): every method tuned with the same budget,
then compared over fresh seeds. `python -m study.run search_spaces/digits_compare.yaml`.

Three stages, each an ordinary study that logs, resumes and tabulates like any other, all in
the comparison's MLflow experiment and nested under its run:

1. `NAME-search`: every method's search at once, on one Ray Tune run: `study.num_samples`
   trials each, or an entry's own `num_samples` (`CompareSearch`: one seeded Optuna study per
   method, `NAME-search.<entry>`), each method's trials stopped early only against its own
   (`PerEntryScheduler`), one epoch budget, one validation split.
2. `NAME-confirm`: each method's `compare.top` best trials (its full-budget ones first, then
   those ASHA stopped latest), and its defaults trial where the searches start from their
   defaults (`study.sampler.points_to_evaluate: [defaults]`), re-run at the full budget on
   `compare.confirm_seeds` (validation split only); the one with the best mean is the
   method's winner, not one seed's luck. Skipped when `top` is 1 and there are no defaults.
3. `NAME-final`: each winner on `compare.seeds`, evaluated on the test split; the table
   compares every method with `compare.reference` (paired over seeds) and says what budget
   each got.

What was decided between stages (each method's candidates, winner, or why it has none) is
kept in `<storage>/NAME/comparison.json`, so `--resume` continues the stage that was running
and never chooses again. A method whose search fails is reported as failed, with its reason.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from gacd import schema
from gacd.config import Config, flatten, uneven_search_notes
from study.spec import ENTRY_KEY, StudySpec, describe_distribution, spec_from_dict

STATE_FILE = "comparison.json"


def stage_name(spec: StudySpec, stage: str) -> str:
    return f"{spec.name}-{stage}"


def describe_comparison(spec: StudySpec) -> list[str]:
    """`--dry-run`'s lines for a comparison: its methods and what each searches."""
    compare = spec.compare
    assert compare is not None
    if not spec.confirms:
        confirm = "each method's best trial its winner (top 1: no confirm stage)"
    else:
        defaults = " (and its defaults)" if spec.starts_from_defaults else ""
        confirm = (
            f"top {compare.top} of each{defaults} re-run on seeds {compare.confirm_seeds} "
            "(validation)"
        )
    trials = spec.trials_by_entry()
    alike = len(set(trials.values())) == 1
    searches = (
        f"{len(compare.methods)} methods x {spec.study.num_samples} trials each"
        if alike
        else f"{len(compare.methods)} methods, {sum(trials.values())} trials"
    )
    lines = [
        f"compare    {searches}; {confirm}, the winners on seeds {compare.seeds} (test); "
        f"reference {compare.reference}"
    ]
    for entry, settings in compare.methods.items():
        overrides = json.dumps(settings.overrides) if settings.overrides else ""
        count = "" if alike else f", {trials[entry]} trials"
        lines.append(f"  {entry} ({compare.entry_method(entry)}{count}) {overrides}".rstrip())
        lines += [
            f"    {key:22} {describe_distribution(value)}"
            for key, value in spec.search_space_of(entry).items()
        ]
    return lines + [f"note       {note}" for note in uneven_searches(spec)]


def uneven_searches(spec: StudySpec) -> list[str]:
    """What the methods' searches do not get alike, each as one line: their trial counts
    where an entry sets its own `num_samples`, and the shared training keys (the learning
    rate, the batch size, ...) that some methods search and others do not, or search over
    different ranges (`gacd.config.uneven_search_notes`; ranges are told apart as they read,
    `loguniform 0.01 to 0.2`)."""
    compare = spec.compare
    assert compare is not None
    notes = []
    groups: dict[int, list[str]] = {}
    for entry, count in spec.trials_by_entry().items():
        groups.setdefault(count, []).append(entry)
    if len(groups) > 1:
        counts = "; ".join(
            f"{', '.join(who)}: {n}" for n, who in sorted(groups.items(), reverse=True)
        )
        notes.append(
            f"the searches' trials differ ({counts}; compare.methods.ENTRY.num_samples): "
            "the budget table's trial-epochs say what each method's search spent"
        )

    def value(entry: str, key: str) -> Any:
        config = dataclasses.asdict(spec.trial_config({ENTRY_KEY: entry}))
        return flatten(config)[key]

    searches = {
        entry: {key: describe_distribution(d) for key, d in spec.search_space_of(entry).items()}
        for entry in compare.methods
    }
    return notes + uneven_search_notes(searches, value)


# --- the stages' study specs -----------------------------------------------------------------


def search_stage(spec: StudySpec) -> StudySpec:
    stage = copy.deepcopy(spec)
    stage.study.name = stage_name(spec, "search")
    stage.study.experiment = spec.name
    return stage


def candidate_overrides(spec: StudySpec, entry: str, params: dict[str, Any]) -> dict[str, Any]:
    """What one trial of a method's search ran with, over `base`."""
    assert spec.compare is not None
    settings = spec.compare.methods[entry]
    return {"method": spec.compare.entry_method(entry), **settings.overrides, **params}


def explicit(spec: StudySpec, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every variant setting every key any of them sets (to `base`'s value where it sets none
    itself): an ablation lays its variants over its reference, and one method's searched
    values must not reach another's runs."""
    keys = sorted({key for overrides in variants.values() for key in overrides})
    # base and teacher, no method entry, not resolved: a key a method decides (`auto`, like
    # the attack's objective) or that derives from another (`None`, like its step size) stays
    # so, for each run to resolve as its own method and values say
    defaults = flatten(Config.unresolved(spec.trial_values({})).to_dict())
    return {
        name: {key: overrides.get(key, defaults[key]) for key in keys}
        for name, overrides in variants.items()
    }


def test_metric(metric: str) -> str:
    """The final stage's metric: the search's, on the test split."""
    if metric.startswith("val/"):
        return "test/" + metric.removeprefix("val/")
    return schema.accuracy("test", "pgd")


def ablation_stage(
    spec: StudySpec,
    stage: str,
    reference: str,
    variants: dict[str, dict[str, Any]],
    seeds: list[int],
    test_split: bool,
    teachers: Path,
    only: list[str] | None = None,
) -> StudySpec:
    """The comparison turned into one of its ablation stages (confirm or final, or a round of
    either that seeds added on `--resume` start): `variants` made explicit over every key any
    of them sets, then `only` those named (default: all) run, `reference` among them."""
    raw = json.loads(json.dumps(spec.to_dict(), default=str))
    metric = test_metric(spec.study.metric) if test_split else spec.study.metric
    raw["study"] |= {
        "name": stage_name(spec, stage),
        "mode": "ablation",
        "experiment": spec.name,
        "metric": metric,
        "trial_seeds": None,  # the stages' runs are one seed each, the searches' trials not
    }
    raw["study"]["scheduler"]["name"] = "none"
    raw["study"]["sampler"]["points_to_evaluate"] = None  # the searches' own
    raw["compare"], raw["search"] = None, {}
    full = explicit(spec, variants)
    if only is not None:
        full = {name: values for name, values in full.items() if name in only}
    raw["ablation"] = {
        "reference": full[reference],
        "reference_name": reference,
        "from_study": None,
        "variants": {name: values for name, values in full.items() if name != reference},
        "seeds": seeds,
        "test_split": test_split,
    }
    return spec_from_dict(raw, teacher_cache=teachers)


# --- what the stages decided -----------------------------------------------------------------


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"done": [], "candidates": {}, "winners": {}, "failed": {}} | state


def write_state(folder: Path, state: dict[str, Any]) -> None:
    path = folder / STATE_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(path)


def candidates(spec: StudySpec, paths) -> tuple[dict, dict]:
    """Each method's `top` best trials of the search stage (`ranked`), and the methods that have
    no full-budget trial, with why."""
    from analysis.runs import load_study

    search = search_stage(spec)
    assert spec.compare is not None
    chosen, failed = {}, {}
    runs = load_study(paths.tracking_uri, spec.name, search.name).runs
    for entry in spec.compare.methods:
        study = optuna.load_study(
            study_name=search.optuna_study_name(entry), storage=paths.optuna_url
        )
        best = with_defaults(study.get_trials(), spec.compare.top, spec.study.direction == "max")
        if best:
            chosen[entry] = [
                {
                    "name": f"{entry}.{schema.search_run_name(t.number)}",
                    "value": t.value,
                    "epochs": max(t.intermediate_values, default=None),
                    "stopped": t.state == optuna.trial.TrialState.PRUNED,
                    "params": t.params,
                    **({"defaults": True} if is_defaults(t) else {}),
                }
                for t in best
            ]
            continue
        failed[entry] = search_failure(study, runs, entry)
    return chosen, failed


def ranked(trials, top: int, maximize: bool) -> list:
    """A method's `top` candidates: its full-budget trials, best first; where fewer than `top`
    ran their budget (ASHA at a few trials a method lets one or two through), then its
    early-stopped ones, those that ran longest first (they passed the most of ASHA's rungs) and
    at the same length the best at their last epoch: each candidate is re-run at the full
    budget on the confirm seeds, so a stopped one competes on the same terms there. None when
    no trial ran its full budget (the search failed)."""
    sign = -1.0 if maximize else 1.0
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    stopped = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.PRUNED
        and t.intermediate_values
        and t.value is not None
        and t.value == t.value
    ]
    if not complete:
        return []
    complete.sort(key=lambda t: sign * t.value)
    stopped.sort(key=lambda t: (-max(t.intermediate_values), sign * t.value))
    return (complete + stopped)[:top]


def is_defaults(trial) -> bool:
    """A comparison's search trial of `study.sampler.points_to_evaluate: [defaults]` (the only
    point a comparison accepts): its method's base configuration."""
    from study.search import ENQUEUED_ATTR

    return bool(trial.user_attrs.get(ENQUEUED_ATTR))


def with_defaults(trials, top: int, maximize: bool) -> list:
    """A method's candidates: its `top` best trials (`ranked`) and, where its search started
    from its defaults, the defaults trial as well: `top` + 1 candidates for every method alike
    (the defaults and its `top` best others), so that its winner is chosen against its own
    defaults on the confirm seeds, never only against its luckier search trials."""
    defaults = [
        t
        for t in trials
        if is_defaults(t) and t.state == optuna.trial.TrialState.COMPLETE and t.value == t.value
    ]
    best = ranked(trials, top + bool(defaults), maximize)
    if not defaults or defaults[0] in best:
        return best
    return best[:top] + defaults[:1]


def search_failure(study: optuna.Study, runs, entry: str) -> str:
    """Why a method's search has no full-budget trial: its trials by state and the first
    failure's reason (from its MLflow run)."""
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trials"
    reason = ""
    failure, entries = schema.tag_column(schema.TAG_FAILURE), schema.tag_column(schema.TAG_ENTRY)
    if not runs.empty and failure in runs and entries in runs:
        reasons = runs.loc[runs[entries] == entry, failure].dropna()
        reason = f"; first failure: {reasons.iloc[0]}" if not reasons.empty else ""
    return f"search failed: no trial ran its full budget ({counts}){reason}"


def winners(spec: StudySpec, state: dict[str, Any], tracking_uri: str) -> tuple[dict, dict]:
    """Each method's candidate with the best mean over the confirm seeds of every confirm round
    (its first candidate when `top` is 1), and the methods whose every confirm run failed."""
    from analysis.runs import load_study
    from analysis.table import ablation_table

    chosen, failed = {}, {}
    rounds = state.get("confirm_rounds") or [{"stage": "confirm"}]
    if not spec.confirms or any(r["stage"] not in state["done"] for r in rounds):
        for entry, found in state["candidates"].items():
            chosen[entry] = {**searched(found[0]), "mean": None}
        return chosen, failed
    studies = [load_study(tracking_uri, spec.name, stage_name(spec, r["stage"])) for r in rounds]
    runs = pd.concat([study.runs for study in studies], ignore_index=True)
    first = studies[0]
    stats = ablation_table(runs, [spec.study.metric], first.reference, first.variants).stats
    means = stats.xs(spec.study.metric, level="metric") if not stats.empty else None
    for entry, found in state["candidates"].items():
        scored = [
            (float(means.loc[c["name"], "mean"]), float(means.loc[c["name"], "std"]), c)
            for c in found
            if means is not None and c["name"] in means.index and means.loc[c["name"], "n"] > 0
        ]
        if not scored:
            failed[entry] = "confirm failed: no run of its candidates finished"
            continue
        maximize = spec.study.direction == "max"
        mean, std, best = sorted(scored, key=lambda s: s[0], reverse=maximize)[0]
        chosen[entry] = {**searched(best), "mean": mean, "std": std}
        for mean, std, candidate in scored:  # beside the winner: its defaults, as confirmed
            if candidate.get("defaults"):
                chosen[entry]["defaults_confirmed"] = {
                    "name": candidate["name"],
                    "mean": mean,
                    "std": std,
                }
    return chosen, failed


def searched(candidate: dict[str, Any]) -> dict[str, Any]:
    """What a winner keeps of its candidate: its search trial, values, whether ASHA had
    stopped it there (a state written before that was recorded has no `stopped`) and whether
    it is its method's defaults."""
    keys = ("name", "params", "stopped", "defaults")
    return {key: candidate[key] for key in keys if key in candidate}


# --- running ---------------------------------------------------------------------------------


def run_comparison(spec: StudySpec, paths, args: argparse.Namespace, runner) -> int:
    """Check, connect, and run (or continue) the comparison's stages. `runner` is `study.run`,
    handed in (it imports this module, not the other way round): its checks, its cluster and
    `run_on_ray` run each stage."""
    import ray

    from study.tracking import check_tracking_uri

    spec, exists = runner.saved_or_new(spec, paths, args.resume, runner.given_counts(args))
    runner.preflight(search_stage(spec), paths)
    for note in uneven_searches(spec):
        print(f"note: {spec.name}: {note}", file=sys.stderr, flush=True)
    resources = runner.connect(args.address, args.num_cpus, args.num_gpus)
    try:
        max_concurrent = runner.concurrency(spec, resources, args.num_cpus, args.num_gpus)
        check_tracking_uri(paths.tracking_uri)
        return run_stages(spec, paths, args, exists, max_concurrent, runner)
    finally:
        ray.shutdown()


def run_stages(
    spec: StudySpec, paths, args, exists: bool, max_concurrent: int | None, runner
) -> int:
    from study.tracking import Tracking, git_commit

    folder = paths.experiment(spec.name)
    tracking, commit = Tracking(paths.tracking_uri), git_commit()
    parent = comparison_run(tracking, spec, commit, args.resume)
    if exists:
        state, started_with = saved_rounds(folder)
        if grown(spec, started_with):
            record_growth(spec, state, started_with, folder, runner)
    else:
        state = read_state(folder)
        first_rounds(state, spec.to_dict()["compare"])
        folder.mkdir(parents=True, exist_ok=True)
        saved = {"source": runner.spec_source(spec), "resolved": spec.to_dict()}
        (folder / schema.SPEC_FILE).write_text(json.dumps(saved, indent=2, default=str))
    assert spec.compare is not None
    reference = state["reference"] = spec.compare.reference
    state["uneven"] = uneven_searches(spec)  # for the report: what ran, not re-derived later
    state["trials"] = spec.trials_by_entry()

    stage_args = (paths, args, max_concurrent, parent, state, runner)
    code = run_stage(search_stage(spec), "search", *stage_args)
    if code not in (0, 1):
        return stop(tracking, parent, code)
    if "candidates" not in state["done"]:
        state["candidates"], state["failed"] = candidates(spec, paths)
        state["done"].append("candidates")
        write_state(folder, state)
    for entry, reason in state["failed"].items():
        print(f"{spec.name}: {entry}: {reason}", file=sys.stderr)
    if reference not in state["candidates"]:
        return give_up(tracking, parent, spec, paths, state, f"the reference method {reference!r}")

    if spec.confirms:
        found = state["candidates"]
        variants = {
            c["name"]: candidate_overrides(spec, entry, c["params"])
            for entry, cs in found.items()
            for c in cs
        }
        for round_ in confirm_rounds(spec, state):
            write_state(folder, state)
            confirm = ablation_stage(
                spec,
                round_["stage"],
                found[reference][0]["name"],
                variants,
                round_["seeds"],
                False,
                paths.teachers,
            )
            code = run_stage(confirm, round_["stage"], *stage_args)
            if code != 0:
                return stop(tracking, parent, code)
    if "winners" not in state["done"]:
        before = state["winners"]
        chosen, failed = winners(spec, state, paths.tracking_uri)
        state["winners"], state["failed"] = chosen, state["failed"] | failed
        state["done"].append("winners")
        changed = {
            entry: [before[entry]["name"], won["name"]]
            for entry, won in chosen.items()
            if entry in before and before[entry]["name"] != won["name"]
        }
        if before and state.get("growth"):
            state["growth"][-1]["winners_changed"] = changed
        write_state(folder, state)
    if reference not in state["winners"]:
        return give_up(tracking, parent, spec, paths, state, f"the reference method {reference!r}")
    for entry, won in state["winners"].items():
        chosen = ""
        if won["mean"] is not None:
            chosen = f" ({won['mean']:.4f} mean on the confirm seeds)"
        print(f"{spec.name}: {entry}'s winner {won['name']}{chosen}: {won['params']}")

    final_variants = {
        entry: candidate_overrides(spec, entry, won["params"])
        for entry, won in state["winners"].items()
    }
    for round_ in final_rounds(spec, state):
        write_state(folder, state)
        entries = list(round_["winners"])
        final = ablation_stage(
            spec,
            round_["stage"],
            reference if reference in entries else entries[0],
            final_variants,  # explicit over every winner's keys, as in the first round
            round_["seeds"],
            True,
            paths.teachers,
            only=entries,
        )
        code = run_stage(final, round_["stage"], *stage_args)
        if code != 0:
            return stop(tracking, parent, code)
    finish(tracking, parent, spec, paths, state)
    return 0


# --- seeds added on --resume: rounds ---------------------------------------------------------
#
# The confirm and final stages each run in rounds, one study per round (`NAME-confirm`, then
# `NAME-confirm-2`, ...). A resume whose `compare.confirm_seeds` or `compare.seeds` has grown
# (`--confirm-seeds`, `--final-seeds`) adds a round with only what is missing: every candidate
# on the added confirm seeds (the winners are then chosen again, on the mean over every
# confirm seed), and each winner on the final seeds it has not run on (every final seed for a
# method whose winner changed). Nothing that ran is run again or thrown away; the table reads
# each method's current winner's runs from every final round.


def first_rounds(state: dict[str, Any], compare: dict[str, Any]) -> None:
    """The rounds a comparison started with (`compare`: its resolved section as it started),
    for a state written before rounds were kept."""
    state.setdefault(
        "confirm_rounds", [{"stage": "confirm", "seeds": list(compare["confirm_seeds"])}]
    )
    if "final_rounds" not in state:
        ran = "winners" in state["done"]
        state["final_rounds"] = (
            [{"stage": "final", "seeds": list(compare["seeds"]), "winners": state["winners"]}]
            if ran
            else []
        )


def saved_rounds(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A comparison's state with its rounds, and its resolved `compare` section as it started
    or last grew."""
    state = read_state(folder)
    started_with = json.loads((folder / schema.SPEC_FILE).read_text())["resolved"]["compare"]
    first_rounds(state, started_with)
    return state, started_with


def grown(spec: StudySpec, started_with: dict[str, Any]) -> bool:
    return (
        spec.compare.confirm_seeds != started_with["confirm_seeds"]
        or spec.compare.seeds != started_with["seeds"]
    )


def record_growth(spec: StudySpec, state, started_with: dict[str, Any], folder: Path, runner):
    """A resume with more seeds: the study file saved again with them (a later resume compares
    with these), the growth kept in the state, the winners to be chosen again if the confirm
    seeds grew."""
    added = {
        key: [seed for seed in getattr(spec.compare, key) if seed not in started_with[key]]
        for key in ("confirm_seeds", "seeds")
    }
    state.setdefault("growth", []).append({key: seeds for key, seeds in added.items() if seeds})
    if added["confirm_seeds"] and spec.confirms and "winners" in state["done"]:
        state["done"].remove("winners")
    saved = {"source": runner.spec_source(spec), "resolved": spec.to_dict()}
    (folder / schema.SPEC_FILE).write_text(json.dumps(saved, indent=2, default=str))
    write_state(folder, state)
    print(
        f"{spec.name}: seeds added on --resume: "
        + ", ".join(f"compare.{key} +{seeds}" for key, seeds in added.items() if seeds),
        flush=True,
    )


def resume_plan(spec: StudySpec, folder: Path) -> list[str]:
    """What a `--resume` of this comparison (`spec`: the saved one, its seeds grown) would add
    for seeds added since it last ran (its `--dry-run`); nothing when none were added."""
    state, started_with = saved_rounds(folder)
    if not grown(spec, started_with):
        return []
    lines, reruns = [], False
    if spec.confirms and "candidates" in state["done"]:
        planned = confirm_rounds(spec, copy.deepcopy(state))[len(state["confirm_rounds"]) :]
        for round_ in planned:
            runs = sum(len(found) for found in state["candidates"].values()) * len(round_["seeds"])
            lines.append(
                f"resume     {round_['stage']}: every candidate on the added confirm seeds "
                f"{round_['seeds']} ({runs} runs), then each method's winner chosen again on "
                "every confirm seed"
            )
            reruns = "winners" in state["done"]
    if reruns:
        lines.append(
            f"resume     final: each winner on the final seeds {spec.compare.seeds} it has not "
            "run on (every one for a method whose winner changes)"
        )
    elif "winners" in state["done"]:
        for round_ in final_rounds(spec, copy.deepcopy(state))[len(state["final_rounds"]) :]:
            lines.append(
                f"resume     {round_['stage']}: {', '.join(round_['winners'])} on the added "
                f"final seeds {round_['seeds']} ({len(round_['winners']) * len(round_['seeds'])} "
                "runs)"
            )
    return lines or ["resume     the added seeds join the stages not run yet"]


def next_stage(rounds: list[dict[str, Any]], stage: str) -> str:
    return stage if not rounds else f"{stage}-{len(rounds) + 1}"


def confirm_rounds(spec: StudySpec, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every confirm round, with one for the confirm seeds none has run yet."""
    rounds = state["confirm_rounds"]
    ran = {seed for round_ in rounds for seed in round_["seeds"]}
    added = [seed for seed in spec.compare.confirm_seeds if seed not in ran]
    if added:
        rounds.append({"stage": next_stage(rounds, "confirm"), "seeds": added})
    return rounds


def final_rounds(spec: StudySpec, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every final round, with one for each set of final seeds that some winners have not run
    on (a winner's runs count only in rounds that ran that same winner)."""
    rounds = state["final_rounds"]
    missing: dict[tuple[int, ...], list[str]] = {}
    for entry, won in state["winners"].items():
        ran = {
            seed
            for round_ in rounds
            if round_["winners"].get(entry, {}).get("name") == won["name"]
            for seed in round_["seeds"]
        }
        need = tuple(seed for seed in spec.compare.seeds if seed not in ran)
        if need:
            missing.setdefault(need, []).append(entry)
    for seeds, entries in missing.items():
        rounds.append(
            {
                "stage": next_stage(rounds, "final"),
                "seeds": list(seeds),
                "winners": {entry: state["winners"][entry] for entry in entries},
            }
        )
    return rounds


def run_stage(
    stage: StudySpec, key: str, paths, args, max_concurrent, parent: str, state, runner
) -> int:
    """One stage: started, continued (`--resume` of its own study), or skipped when done."""
    if key in state["done"]:
        return 0
    folder = paths.experiment(stage.name)
    started = (folder / schema.SPEC_FILE).is_file()
    print(f"\n{stage.study.experiment}: stage {key} ({stage.name})", flush=True)
    stage_args = argparse.Namespace(**{**vars(args), "resume": started})
    code = runner.run_on_ray(stage, paths, stage_args, started, max_concurrent, parent)
    if code == 0:
        state["done"].append(key)
        write_state(paths.experiment(stage.study.experiment), state)
    return code


def comparison_run(tracking, spec: StudySpec, commit: str, resume: bool) -> str:
    """The comparison's MLflow run (its stages' study runs are nested under it)."""
    _, run_id = tracking.study_run(spec, commit, resume, role=schema.ROLE_COMPARISON)
    return run_id


def stop(tracking, parent: str, code: int) -> int:
    tracking.finish(parent, "KILLED" if code == 130 else "FAILED")
    return code


def give_up(tracking, parent, spec, paths, state, what: str) -> int:
    """The reference has no winner: nothing to compare with. What is known is reported."""
    from analysis.compare import write_comparison

    reason = state["failed"].get(spec.compare.reference, "no winner")
    write_comparison(paths.tracking_uri, spec.name, paths.experiment(spec.name), state)
    tracking.client.set_tag(parent, schema.TAG_FAILURE, f"{what}: {reason}")
    tracking.finish(parent, "FAILED")
    print(
        f"error: {spec.name}: {what} has no winner ({reason}); nothing to compare with",
        file=sys.stderr,
    )
    return 1


def finish(tracking, parent: str, spec: StudySpec, paths, state: dict[str, Any]) -> None:
    from analysis.compare import write_comparison
    from study.report import browse_command

    report = write_comparison(paths.tracking_uri, spec.name, paths.experiment(spec.name), state)
    tracking.client.log_artifacts(parent, str(report.parent), "report")
    tracking.client.log_dict(parent, state, STATE_FILE)
    print("\n" + report.with_name("comparison.md").read_text())
    print(f"report: {report} (also on the comparison's MLflow run, under report/)")
    experiment = tracking.experiment_id(spec.name)
    print(f"browse the runs: {browse_command(paths.tracking_uri, experiment)}")
    tracking.finish(parent, "FINISHED")
