"""Sweeps over recipes on Optuna: a search space of spec paths, TPE sampling, median pruning, resumable storage.

The space is a small YAML (or JSON, TOML) file of spec paths (dotted, into the spec as written) and what each may
take::

    train.lr: {float: [1.0e-4, 1.0e-2], log: true}
    latent_dim: {int: [64, 256], step: 64}
    gate.selection: {choices: [top_n, top_p]}
    encoders: {subset: [videomae, hubert, wavlm, openface], min: 2}

``subset`` keeps the spec's encoders whose names are chosen (each one a yes/no parameter). Every trial is an
ordinary run directory (``DIR/trial-NNNN``; with ``cv`` a cross-validation directory of ``foldK`` runs), trained
by :mod:`fusionkit.training.train`, so ``evaluate``, ``predict`` and ``report`` take it as they take any run.

A sweep follows the rules ``train`` follows:

- specs and spaces are read by the one strict, bounded reader (:func:`fusionkit.spec.read_spec_file`);
- ``DIR`` is fusionkit's own: ``DIR/sweep.json`` marks it, and a directory without the marker that holds anything is
  refused, as a run directory or a user's folder is. One sweep directory holds one study;
- a study records its spec and space, and refuses to resume under others, saying what differs;
- every value of the space (each choice, both ends of each range) and the data are checked before the first trial.

The study lives in an Optuna storage: ``DIR/study.db`` (SQLite) by default, or any database URL Optuna accepts, so a
killed sweep resumes and several workers (``jobs`` here, or the same command on other machines against one
database) share it. Each validation reports the Score to the trial, and a MedianPruner stops trials that fall
behind. Worker processes end with the process that started them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from fusionkit.data.open import spec_store
from fusionkit.data.raw import live_encoder_names
from fusionkit.errors import FusionkitError, SpecError
from fusionkit.files import atomic_write_text, describe_contents, is_temporary, json_marker
from fusionkit.hardware.devices import resolve_device
from fusionkit.models.factory import build_model
from fusionkit.spec import dump_spec, load_spec, read_spec_file, spec_differences
from fusionkit.training.loggers import RunLogger
from fusionkit.training.rundir import RUN_FILE
from fusionkit.training.train import cross_validate, make_split, train

__all__ = ["load_space", "apply_params", "sweep", "STUDY_FILE", "SWEEP_FILE", "SWEEP_FORMAT", "is_sweep"]

STUDY_FILE = "study.db"
#: The marker of a sweep directory: its format, study name and storage.
SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "fusionkit-sweep"
KINDS = ("float", "int", "choices", "subset")
#: The study's user attributes that record what it searches; a resume must match them.
_SPEC_ATTR, _SPACE_ATTR = "fusionkit_spec", "fusionkit_space"
MAX_SAMPLER_SEED = 2**32 - 1

is_sweep = json_marker(SWEEP_FILE, "format", (SWEEP_FORMAT,))


def _problem(path: Path, key: str, text: str) -> SpecError:
    return SpecError([f"{key}: {text}"], source=str(path))


def _is_number(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_entry(path: Path, key: str, entry: Any, spec: Mapping[str, Any]) -> None:
    kinds = [k for k in KINDS if isinstance(entry, dict) and k in entry]
    if len(kinds) != 1:
        raise _problem(path, key, f"expected exactly one of {', '.join(KINDS)}, found {entry!r}"[:500])
    kind = kinds[0]
    allowed = {"float": {"float", "log", "step"}, "int": {"int", "log", "step"}, "choices": {"choices"},
               "subset": {"subset", "min"}}[kind]
    extra = set(entry) - allowed
    if extra:
        raise _problem(path, key, f"unknown option(s) {sorted(map(str, extra))} for {kind}; options: {sorted(allowed)}")
    value = entry[kind]
    if kind in ("float", "int"):
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v, kind) for v in value)
                and value[0] < value[1]):
            raise _problem(path, key, f"{kind}: expected [low, high] with low < high, found {value!r}"[:500])
        log, step = entry.get("log", False), entry.get("step")
        if not isinstance(log, bool):
            raise _problem(path, key, f"log: expected true or false, found {log!r}")
        if log and value[0] <= 0:
            raise _problem(path, key, f"log: the range must be positive, found {value!r}")
        if step is not None:
            if not _is_number(step, kind) or step <= 0:
                raise _problem(path, key, f"step: expected a positive {'integer' if kind == 'int' else 'number'}, "
                                          f"found {step!r}")
            if log:
                raise _problem(path, key, "log and step cannot be combined (a log range is sampled without steps); "
                                          "drop one")
        return
    if not (isinstance(value, list) and value):
        raise _problem(path, key, f"{kind}: expected a non-empty list, found {value!r}"[:500])
    if kind == "choices":
        for choice in value:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise _problem(path, key, f"choices: each choice must be a number, a string, true/false or null; found "
                                          f"{choice!r}"[:500])
        return
    names = [e.get("name") for e in spec.get("encoders", []) if isinstance(e, dict)]
    if key != "encoders" or not all(isinstance(v, str) for v in value) or not set(value) <= set(names):
        raise _problem(path, key, f"subset chooses among the spec's encoders {names} (key: encoders), found "
                                  f"{value!r}"[:500])
    if len(set(value)) != len(value):
        raise _problem(path, key, f"subset: names an encoder twice: {value!r}")
    least = entry.get("min", 1)
    if not _is_number(least, "int") or not 0 <= least <= len(value):
        raise _problem(path, key, f"min: expected an integer from 0 to {len(value)} (the subset's size), found "
                                  f"{least!r}; with more, every trial would be pruned")


def _candidates(entry: Mapping[str, Any]) -> list[Any]:
    """Every value of an entry that a trial may take at an extreme: each choice, both ends of a range, the largest
    and the smallest subset."""
    if "choices" in entry:
        return list(entry["choices"])
    if "subset" in entry:
        names, least = entry["subset"], entry.get("min", 1)
        return [list(names)] + ([list(names[:least])] if least < len(names) else [])
    kind = "float" if "float" in entry else "int"
    low, high = entry[kind]
    step = entry.get("step")
    if step is not None:  # Optuna's highest value on the grid
        high = low + math.floor((high - low) / step + 1e-9) * step
    return [low, high]


def load_space(path: str | os.PathLike, spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The search space of ``path``, checked: its format, and that the spec is valid with every value the space can
    give (each choice, both ends of each range), on a device this machine has."""
    path = Path(path)
    space = read_spec_file(path)
    if not isinstance(space, dict) or not space:
        raise SpecError(["expected a mapping of spec paths to ranges or choices, e.g. "
                         "`train.lr: {float: [1.0e-4, 1.0e-2], log: true}`"], source=str(path))
    for key, entry in space.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise _problem(path, repr(key), "expected a dotted spec path such as train.lr")
        _check_entry(path, key, entry, spec)
    first = {k: _candidates(e)[0] for k, e in space.items()}
    problems: list[str] = []
    for key, entry in space.items():
        for value in _candidates(entry):
            params = {**first, key: value}
            problem = _probe(spec, params, space)
            if problem:
                problems.append(f"{key} = {value!r}: {problem}"[:1000])
                break  # one problem per entry is enough to act on
    if problems:
        raise SpecError([f"a spec with this space's values is invalid: {p}" for p in problems], source=str(path))
    return space


def _probe(spec: Mapping[str, Any], params: Mapping[str, Any], space: Mapping[str, Any]) -> str | None:
    """Why a trial with ``params`` could not train, or None: the spec must be valid, its device here, and its model
    must build (on the meta device, which allocates nothing, unless a live backbone loads weights)."""
    try:
        resolved = load_spec(apply_params(spec, params, space))
        resolve_device(resolved.train.device, "train.device")
        if live_encoder_names(resolved):
            build_model(resolved)
        else:
            with torch.device("meta"):
                build_model(resolved)
    except SpecError as exc:
        return "; ".join(exc.problems)
    except FusionkitError as exc:
        return str(exc)
    return None


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
    """Reports each validation's Score to the trial (step: the epoch) and prunes."""

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
        import optuna

        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {key: _suggest(trial, key, entry) for key, entry in space.items()}
        trial_spec = apply_params(spec, params, space)
        run = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(run))
        try:
            if not cv:
                metrics = train(trial_spec, data, run, fold=fold, progress=progress, overwrite=True,
                                loggers=[_Reporter(trial)])
                return float(metrics["val"]["score"])
            scores: list[float] = []

            def after_fold(k: int, metrics: Mapping[str, Any], last: bool) -> None:
                scores.append(float(metrics["test"]["score"]))
                trial.report(sum(scores) / len(scores), k)  # the running mean of the folds' test Scores
                if not last and trial.should_prune():
                    raise optuna.TrialPruned(f"after fold {k}: mean Score below the median of earlier trials")

            cross_validate(trial_spec, data, run, progress=progress, overwrite=True, after_fold=after_fold)
            return sum(scores) / len(scores)
        except FusionkitError as exc:
            trial.set_user_attr("error", str(exc)[:2000])
            raise

    return objective


def _storage_url(url: str | None, out: Path) -> str:
    return url or f"sqlite:///{(out / STUDY_FILE).resolve()}"


def _storage(url: str | None, out: Path, heartbeat: int) -> Any:
    """The study's Optuna storage, opened; any URL Optuna cannot use is a one-line error naming it."""
    import optuna

    full = _storage_url(url, out)
    if full.startswith("sqlite") and (":memory:" in full or full.rstrip("/") in ("sqlite:", "sqlite:/")):
        raise FusionkitError(f"--storage {url}: an in-memory database keeps no study, so nothing could resume or be "
                             "shared; name a database file (sqlite:///PATH) or a server")
    # a worker killed mid-trial stops beating: its trial is marked failed, and the sweep runs a new one in its place
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(full, heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
    except Exception as exc:  # SQLAlchemy's and the drivers' errors: unknown dialect, no driver, unreadable file
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise FusionkitError(f"--storage {url or full}: cannot open the study's database ({type(exc).__name__}: "
                             f"{reason}). Give a writable sqlite:///PATH or a reachable database URL whose driver "
                             "is installed") from None


class _OneLineFailures(logging.Filter):
    """Optuna logs a failed trial with its traceback; the sweep's users get its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def _quiet_optuna_tracebacks() -> None:
    import optuna

    for handler in optuna.logging.get_logger("optuna").handlers:  # a logger's own filters miss its children's records
        if not any(isinstance(f, _OneLineFailures) for f in handler.filters):
            handler.addFilter(_OneLineFailures())


def _end_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it is gone (killed, even with SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(0.5)

    threading.Thread(target=watch, name="fusionkit-parent-watch", daemon=True).start()


def _fail_dead_trials(study: Any) -> None:
    """Mark failed the running trials whose worker on this machine is gone (a killed sweep), at once rather than
    after the heartbeat's grace period, so a resumed sweep replaces them and its table says what happened."""
    import optuna

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or not isinstance(pid, int) or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive: a worker of another sweep command
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # finished in the meantime
            pass


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

        _quiet_optuna_tracebacks()
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


def _read_spec(spec: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The spec as written (plain data), read as ``train`` reads it, and checked."""
    if isinstance(spec, (str, os.PathLike)):
        source = str(spec)
        spec = read_spec_file(spec)
        if not isinstance(spec, dict):
            raise SpecError([f"expected a mapping of spec options, found {type(spec).__name__}"], source=source)
    load_spec(spec)  # a bad spec fails here, before any trial
    return json.loads(json.dumps(spec))


def _check_directory(out: Path, study_name: str, storage: str | None) -> bool:
    """Whether ``out`` is already this study's sweep directory (False: it is absent or empty). Anything else is
    refused, and nothing in it is touched: a directory that fusionkit did not make as a sweep directory, or the sweep
    directory of another study or storage."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FusionkitError(f"{out}: exists and is not a directory; choose another --out")
    if not out.is_dir() or not any(p for p in out.iterdir() if not is_temporary(p)):
        return False
    if not is_sweep(out):
        what = "a training run" if (out / RUN_FILE).exists() else f"{describe_contents(out)}"
        raise FusionkitError(f"{out}: not a fusionkit sweep directory (no {SWEEP_FILE}), and it holds {what}; "
                             "nothing there is touched. Choose an empty or new --out.")
    recorded = json.loads((out / SWEEP_FILE).read_text(encoding="utf-8"))
    resume = f"--study {recorded.get('study')}" + (f" --storage {recorded['storage']}" if recorded.get("storage") else "")
    if recorded.get("study") != study_name:
        raise FusionkitError(
            f"{out}: holds the trials of study {recorded.get('study')!r}; a second study there would number its "
            f"trials from 0 over them. Resume that one with {resume}, or give study {study_name!r} another --out.")
    if recorded.get("storage") != storage:
        raise FusionkitError(
            f"{out}: its study lives in {recorded.get('storage') or out / STUDY_FILE}, not in "
            f"{storage or out / STUDY_FILE}; resume it with {resume}, or choose another --out.")
    return True


def _mark_directory(out: Path, study_name: str, storage: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marker = {"format": SWEEP_FORMAT, "study": study_name, "storage": storage}
    atomic_write_text(out / SWEEP_FILE, json.dumps(marker, indent=2) + "\n")


def _check_same_study(study: Any, storage: Any, spec: dict[str, Any], space: dict[str, Any], where: str) -> None:
    """Record what the study searches when it is new; refuse to resume it under another spec or space."""
    import optuna

    resolved = json.loads(json.dumps(load_spec(spec).to_dict()))
    recorded = study.user_attrs
    if _SPEC_ATTR not in recorded:
        if study.get_trials(deepcopy=False, states=tuple(optuna.trial.TrialState)):
            raise FusionkitError(f"{where}: study {study.study_name!r} already has trials that no fusionkit sweep "
                                 "recorded; give another --study")
        study.set_user_attr(_SPEC_ATTR, resolved)
        study.set_user_attr(_SPACE_ATTR, space)
        # read back: of two sweeps starting one new study at once, the one whose record was overwritten stops here
        recorded = optuna.load_study(study_name=study.study_name, storage=storage).user_attrs
    diffs = [f"spec {d}" for d in spec_differences(recorded.get(_SPEC_ATTR), resolved)]
    diffs += [f"space {d}" for d in spec_differences(recorded.get(_SPACE_ATTR), space)]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise FusionkitError(f"{where}: study {study.study_name!r} was started with another spec or space ({shown}); "
                             "its trials would mix with these. Resume with the spec and space it was started with, "
                             "or give another --study or --out.")


def sweep(spec: str | os.PathLike | Mapping[str, Any], data: str | os.PathLike, space: str | os.PathLike,
          trials: int, out: str | os.PathLike, *, storage: str | None = None, study_name: str = "fusionkit",
          jobs: int = 1, fold: int = 0, cv: bool = False, seed: int = 0, heartbeat: int = 60,
          progress: bool = False) -> dict[str, Any]:
    """Run (or resume) a sweep until ``trials`` trials have finished (completed or pruned); write the best spec
    (``best.yaml``), a table of the trials (``trials.md``), plots and ``summary.json`` into ``out``; returns the
    summary. ``jobs`` workers run here at once, each in its own process; more may run elsewhere on ``storage``.

    Raises :class:`FusionkitError` for a bad input before any trial runs, and when every trial failed (naming the
    first failure)."""
    import optuna

    _check_options(trials, jobs, heartbeat, seed, study_name)
    spec = _read_spec(spec)
    space_map = load_space(space, spec)
    resolved = load_spec(spec)
    store = spec_store(resolved, data)  # the data and its labels, checked once before any trial
    if cv:
        make_split(store, None)
    else:
        make_split(store, fold)
    out = Path(out)
    marked = _check_directory(out, study_name, storage)
    _quiet_optuna_tracebacks()
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    opened = _storage(storage, out, heartbeat)
    if not marked:
        _mark_directory(out, study_name, storage)
    study = optuna.create_study(study_name=study_name, storage=opened, direction="maximize", load_if_exists=True)
    _check_same_study(study, opened, spec, space_map, storage or str(out / STUDY_FILE))
    _fail_dead_trials(study)
    _run_workers(_Worker(spec, space_map, str(data), out, trials, storage, study_name, fold, cv, seed, heartbeat,
                         progress), jobs)
    study = optuna.load_study(study_name=study_name, storage=opened)
    _fail_dead_trials(study)
    summary = _summarize(study, spec, space_map, out)
    if summary["failed"] and not summary["complete"] and not summary["pruned"]:
        first = min((t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.FAIL),
                    key=lambda t: t.number)
        reason = first.user_attrs.get("error", "it was interrupted or its worker was killed")
        raise FusionkitError(f"every trial failed ({summary['failed']}); the first, trial {first.number}: "
                             f"{' '.join(str(reason).split())}")
    return summary


def _check_options(trials: int, jobs: int, heartbeat: int, seed: int, study_name: str) -> None:
    """The sweep's numbers and study name, refused in one line before anything is read."""
    for name, value, least in (("--trials", trials, 1), ("--jobs", jobs, 1), ("--heartbeat", heartbeat, 1),
                               ("--seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise FusionkitError(f"{name} {value}: expected an integer of at least {least}")
    if seed + 1000 * jobs > MAX_SAMPLER_SEED:  # each worker's sampler takes seed + 1000 * its number
        raise FusionkitError(f"--seed {seed}: expected at most {MAX_SAMPLER_SEED - 1000 * jobs} (Optuna's samplers "
                             "take seeds below 2**32)")
    if not study_name:
        raise FusionkitError("--study: give the study a name")


def _run_workers(worker: _Worker, jobs: int) -> None:
    """``worker`` here, or ``jobs`` copies of it in processes of their own (each its own sampler seed and a share of
    the cores), until the study has its trials."""
    if jobs <= 1:
        worker.run()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_end_with_parent) as pool:
        for future in [pool.submit(_run_worker, attrs.evolve(worker, seed=worker.seed + 1000 * (i + 1),
                                                             threads=threads)) for i in range(jobs)]:
            future.result()


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
