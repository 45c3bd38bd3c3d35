"""The ``synthetic`` dataset: fast blended data for tests, with encoders of graded quality."""

from __future__ import annotations

import attrs
import numpy as np

from fusionkit.blemore.answers import BLEMORE_LABELS, RATIOS
from fusionkit.config import non_negative, option, positive, seed_range, unit_interval
from fusionkit.interfaces import Dataset, Sample

__all__ = ["SyntheticConfig", "Synthetic"]

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
