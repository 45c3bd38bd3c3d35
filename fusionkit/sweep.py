"""Sweeps over recipes on Optuna: a search space of spec paths, TPE sampling, median pruning, resumable storage.

The space is a small YAML file of spec paths (dotted, into the spec as written) and what each may take::

    train.lr: {float: [1.0e-4, 1.0e-2], log: true}
    latent_dim: {int: [64, 256], step: 64}
    gate.selection: {choices: [top_n, top_p]}
    encoders: {subset: [videomae, hubert, wavlm, openface], min: 2}

``subset`` keeps the spec's encoders whose names are chosen (each one a yes/no parameter). Every trial is an
ordinary run directory (``DIR/trial-NNNN``, or its ``foldK`` runs with ``cv``), trained by
:func:`fusionkit.training.train.train`. The study lives in an Optuna storage: ``DIR/study.db`` (SQLite) by
default, or any database URL Optuna accepts, so a killed sweep resumes and several workers (``jobs`` here, or
the same command on other machines against one database) share it. Each validation reports the Score to the
trial, and a MedianPruner stops trials that fall behind.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from fusionkit.data.store import open_store
from fusionkit.errors import FusionkitError, SpecError
from fusionkit.files import atomic_write_text
from fusionkit.spec import dump_spec, load_spec
from fusionkit.training.loggers import RunLogger
from fusionkit.training.train import train

__all__ = ["load_space", "apply_params", "sweep", "STUDY_FILE"]

STUDY_FILE = "study.db"
KINDS = ("float", "int", "choices", "subset")


def _problem(path: Path, key: str, text: str) -> SpecError:
    return SpecError([f"{key}: {text}"], source=str(path))


def load_space(path: str | os.PathLike, spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The search space of ``path``, checked: its format, and that the spec with any of its values is valid."""
    path = Path(path)
    try:
        space = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([f"not a readable YAML search space ({exc})"], source=str(path)) from None
    if not isinstance(space, dict) or not space:
        raise SpecError(["expected a mapping of spec paths to ranges or choices, e.g. "
                         "`train.lr: {float: [1.0e-4, 1.0e-2], log: true}`"], source=str(path))
    for key, entry in space.items():
        if not isinstance(key, str) or not key:
            raise _problem(path, repr(key), "expected a dotted spec path such as train.lr")
        kinds = [k for k in KINDS if isinstance(entry, dict) and k in entry]
        if len(kinds) != 1:
            raise _problem(path, key, f"expected exactly one of {', '.join(KINDS)}, found {entry!r}")
        kind = kinds[0]
        allowed = {"float": {"float", "log", "step"}, "int": {"int", "log", "step"}, "choices": {"choices"},
                   "subset": {"subset", "min"}}[kind]
        extra = set(entry) - allowed
        if extra:
            raise _problem(path, key, f"unknown option(s) {sorted(extra)} for {kind}; options: {sorted(allowed)}")
        value = entry[kind]
        if kind in ("float", "int"):
            numbers = (int,) if kind == "int" else (int, float)
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, numbers) and not isinstance(v, bool)
                                                                         for v in value) and value[0] < value[1]):
                raise _problem(path, key, f"{kind}: expected [low, high] with low < high, found {value!r}")
            if entry.get("log") and value[0] <= 0:
                raise _problem(path, key, f"log: the range must be positive, found {value!r}")
        elif not (isinstance(value, list) and value):
            raise _problem(path, key, f"{kind}: expected a non-empty list, found {value!r}")
        if kind == "subset":
            names = [e.get("name") for e in spec.get("encoders", []) if isinstance(e, dict)]
            if key != "encoders" or not set(value) <= set(names):
                raise _problem(path, key, f"subset chooses among the spec's encoders {names} (key: encoders), found "
                                          f"{value!r}")
    # the spec with each entry's first value must be valid: this catches paths that mean nothing
    probe = {k: (e["float"][0] if "float" in e else e["int"][0] if "int" in e else e["choices"][0]
                 if "choices" in e else e["subset"]) for k, e in space.items()}
    try:
        load_spec(apply_params(spec, probe, space))
    except SpecError as exc:
        raise SpecError([f"a spec with this space's values is invalid: {p}" for p in exc.problems],
                        source=str(path)) from None
    return space


def apply_params(spec: Mapping[str, Any], params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` (as written) with each parameter set at its dotted path; a subset keeps the chosen encoders."""
    out = json.loads(json.dumps(spec))
    for key, value in params.items():
        if "subset" in space.get(key, {}):
            out["encoders"] = [e for e in out["encoders"] if e["name"] in set(value) or e["name"] not in space[key]["subset"]]
            continue
        *parents, leaf = key.split(".")
        place = out
        for part in parents:
            if not isinstance(place.setdefault(part, {}), dict):
                raise SpecError([f"{key}: {part} is not a block of the spec"])
            place = place[part]
        place[leaf] = value
    return out


def _suggest(trial: Any, key: str, entry: Mapping[str, Any]) -> Any:
    if "float" in entry:
        return trial.suggest_float(key, *entry["float"], log=bool(entry.get("log")), step=entry.get("step"))
    if "int" in entry:
        return trial.suggest_int(key, *entry["int"], log=bool(entry.get("log")), step=entry.get("step", 1))
    if "choices" in entry:
        return trial.suggest_categorical(key, entry["choices"])
    chosen = [name for name in entry["subset"] if trial.suggest_categorical(f"{key}.{name}", [True, False])]
    if len(chosen) < entry.get("min", 1):
        import optuna

        raise optuna.TrialPruned(f"{key}: {len(chosen)} encoders chosen, fewer than min {entry.get('min', 1)}")
    return chosen


class _Reporter(RunLogger):
    """Reports each validation's Score to the trial (step: the epoch, or the fold with cv) and prunes."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def log(self, epoch: int, record: Mapping[str, Any]) -> None:
        import optuna

        score = record.get("val", {}).get("score")
        if score is None:
            return
        self.trial.report(float(score), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: validation Score {score:.4f} below the median of earlier trials")


def _objective(spec: Mapping[str, Any], space: Mapping[str, Any], data: str, out: Path, fold: int, cv: bool,
               progress: bool) -> Any:
    def objective(trial: Any) -> float:
        params = {key: _suggest(trial, key, entry) for key, entry in space.items()}
        trial_spec = apply_params(spec, params, space)
        run = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(run))
        if not cv:
            metrics = train(trial_spec, data, run, fold=fold, progress=progress, overwrite=True, loggers=[_Reporter(trial)])
            return float(metrics["val"]["score"])
        import optuna

        folds = sorted({int(f) for f in open_store(data).folds if f >= 0})
        scores = []
        for k in folds:  # the running mean of the folds' test Scores is reported after each fold
            metrics = train(trial_spec, data, run / f"fold{k}", fold=k, progress=progress, overwrite=True)
            scores.append(float(metrics["test"]["score"]))
            trial.report(sum(scores) / len(scores), k)
            if k != folds[-1] and trial.should_prune():
                raise optuna.TrialPruned(f"after fold {k}: mean Score below the median of earlier trials")
        return sum(scores) / len(scores)

    return objective


def _storage(url: str | None, out: Path, heartbeat: int) -> Any:
    import optuna

    url = url or f"sqlite:///{(out / STUDY_FILE).resolve()}"
    # a worker killed mid-trial stops beating: its trial is marked failed, and the sweep runs a new one in its place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat)


@attrs.frozen
class _Worker:
    """One sweep worker's share: everything a worker process needs (picklable)."""

    spec: dict
    space: dict
    data: str
    out: Path
    trials: int
    storage: str | None
    study_name: str
    fold: int
    cv: bool
    seed: int
    heartbeat: int
    progress: bool
    threads: int | None = None

    def run(self) -> None:
        import optuna

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        study = optuna.load_study(study_name=self.study_name, storage=_storage(self.storage, self.out, self.heartbeat),
                                  sampler=optuna.samplers.TPESampler(seed=self.seed),
                                  pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

        def enough_failures(study: Any, trial: Any) -> None:  # every trial failing must not loop for ever
            if sum(t.state == optuna.trial.TrialState.FAIL for t in study.get_trials(deepcopy=False)) >= self.trials:
                study.stop()

        if sum(t.state in finished for t in study.get_trials(deepcopy=False)) >= self.trials:
            return
        study.optimize(_objective(self.spec, self.space, self.data, self.out, self.fold, self.cv, self.progress),
                       callbacks=[optuna.study.MaxTrialsCallback(self.trials, states=finished), enough_failures],
                       catch=(FusionkitError,))


def _run_worker(worker: _Worker) -> None:
    worker.run()


def sweep(spec: str | os.PathLike | Mapping[str, Any], data: str | os.PathLike, space: str | os.PathLike,
          trials: int, out: str | os.PathLike, *, storage: str | None = None, study_name: str = "fusionkit",
          jobs: int = 1, fold: int = 0, cv: bool = False, seed: int = 0, heartbeat: int = 60,
          progress: bool = False) -> dict[str, Any]:
    """Run (or resume) a sweep until ``trials`` trials have finished (completed or pruned); write the best spec
    (``best.yaml``), a table of the trials (``trials.md``), plots and ``summary.json`` into ``out``; returns the
    summary. ``jobs`` workers run here at once, each in its own process; more may run elsewhere on ``storage``."""
    import optuna

    if trials < 1:
        raise FusionkitError(f"--trials {trials}: give at least one trial")
    if isinstance(spec, (str, os.PathLike)):
        spec_path = Path(spec)
        try:
            spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError([f"not a readable YAML spec ({exc})"], source=str(spec_path)) from None
    load_spec(spec)  # a bad spec fails here, before any trial
    spec = json.loads(json.dumps(spec))
    space_map = load_space(space, spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name=study_name, storage=_storage(storage, out, heartbeat), direction="maximize",
                        load_if_exists=True)
    worker = _Worker(spec, space_map, str(data), out, trials, storage, study_name, fold, cv, seed, heartbeat, progress)
    if jobs <= 1:
        worker.run()
    else:
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs) as pool:
            for future in [pool.submit(_run_worker, attrs.evolve(worker, seed=seed + 1000 * (i + 1), threads=threads))
                           for i in range(jobs)]:
                future.result()
    return _summarize(optuna.load_study(study_name=study_name, storage=_storage(storage, out, heartbeat)), spec,
                      space_map, out)


def _summarize(study: Any, spec: Mapping[str, Any], space: Mapping[str, Any], out: Path) -> dict[str, Any]:
    import optuna

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary: dict[str, Any] = {"trials": len(trials), "complete": len(done),
                               "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
                               "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials)}
    lines = ["| trial | state | Score | run | parameters |", "|---|---|---|---|---|"]
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | {t.user_attrs.get('run', '-')} | {params} |")
    if done:
        best = study.best_trial
        params = _params_of(best.params, space)
        dump_spec(load_spec(apply_params(spec, params, space)), out / "best.yaml")
        summary |= {"best_trial": best.number, "best_score": best.value, "best_params": params,
                    "best_run": best.user_attrs.get("run")}
        lines = [f"Best: trial {best.number}, Score {best.value:.4f} ({best.user_attrs.get('run')}); its spec: "
                 "best.yaml.", "", *lines]
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")
    summary["plots"] = _plots(study, out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _params_of(params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """Trial parameters back in the space's terms (a subset's yes/no per encoder -> the chosen names)."""
    out = {}
    for key, entry in space.items():
        if "subset" in entry:
            out[key] = [n for n in entry["subset"] if params.get(f"{key}.{n}")]
        elif key in params:
            out[key] = params[key]
    return out


def _plots(study: Any, out: Path) -> list[str]:
    """The optimisation history and the parameter importances (Optuna's matplotlib backend), where computable."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    for name, draw in (("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = draw(study)
        except (ValueError, RuntimeError):  # too few complete trials, or parameters that never varied
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax[0].figure
        figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(f"{name}.png")
    return written
