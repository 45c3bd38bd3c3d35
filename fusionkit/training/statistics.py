"""Input statistics: standardisation fitted on training rows, and per-domain statistics from target rows.

:func:`fit_standardization` fits each ``features`` encoder's input mean and std (the task does this
on the training rows). :class:`DomainStatistics` is the objective term of per-domain statistics: a
target domain's own input standardisation (``data.standardize_per_domain``) and the AdaBN
re-estimation of :class:`~fusionkit.models.fusion.DomainNorm` (``projector.domain_norm``), both
from unlabelled target rows only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusionkit.data.store import FeatureStore, target_rows
from fusionkit.errors import DataError
from fusionkit.models.fusion import DomainNorm, FusionModel
from fusionkit.spec import Spec
from fusionkit.training.objective import ObjectiveTerm

__all__ = ["DomainStatistics", "estimate_domain_statistics", "fit_standardization"]


def fit_standardization(model: FusionModel, store: FeatureStore, index: np.ndarray, domain: str = "source") -> None:
    """Fit the model's input standardisation on the store's rows ``index`` (the training rows), or a further
    domain's statistics on that domain's rows (features only: labels are not read)."""
    inputs = {}
    for name in model.encoder_names:
        if name not in store.encoders:  # a live encoder: it reads raw inputs, nothing to standardise
            continue
        feats = store.encoders[name]
        rows = index[feats.available[index]]
        if feats.offsets is None:
            inputs[name] = feats.data[torch.as_tensor(rows, dtype=torch.long)]
        else:
            inputs[name] = torch.cat([feats.data[int(feats.offsets[i]) : int(feats.offsets[i + 1])] for i in rows])
    model.fit_standardization(inputs, domain=domain)


@torch.no_grad()
def estimate_domain_statistics(model: FusionModel, store: FeatureStore, index: np.ndarray, domain: str = "target",
                               batch_size: int = 256) -> None:
    """AdaBN: re-estimate the ``domain`` running statistics of every :class:`~fusionkit.models.fusion.DomainNorm`
    from the store's rows ``index`` (inputs only, never labels), as a cumulative average over all of them."""
    norms = [m.norms[domain] for m in model.modules() if isinstance(m, DomainNorm) and domain in m.norms]
    if not norms or len(index) < 2:
        return
    was_training = model.training
    model.eval()
    saved = [(n.momentum, n.training) for n in norms]
    for norm in norms:
        norm.local = True  # one rank makes this pass over every target row (on_best runs on rank 0)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: every row counts the same
        norm.train()
    model.set_domain(domain)
    try:
        for start in range(0, len(index), batch_size):
            rows = index[start : start + batch_size]
            if len(rows) > 1:
                model(*store.inputs_for(model, rows))
    finally:
        model.set_domain("source")
        for norm, (momentum, training) in zip(norms, saved):
            norm.local = False
            norm.momentum = momentum
            norm.train(training)
        model.train(was_training)


class DomainStatistics(ObjectiveTerm):
    """Per-domain statistics: the target's input standardisation is fitted when the term is built; the AdaBN
    statistics are re-estimated before each best checkpoint. Adds no loss."""

    def __init__(self, model: nn.Module, store: FeatureStore, spec: Spec, target_store: FeatureStore | None) -> None:
        super().__init__()
        self.rows = target_rows(store, target_store)
        self.domain_norm = spec.projector.domain_norm
        if len(self.rows[1]) < 2:
            raise DataError(f"{self.rows[0].path}: per-domain statistics (data.standardize_per_domain, "
                            "projector.domain_norm) need target rows: give --target STORE or rows whose domain is "
                            "'target'")
        if spec.data.standardize_per_domain:
            fit_standardization(model, *self.rows, domain="target")

    def on_best(self, model: nn.Module) -> None:
        if self.domain_norm:
            estimate_domain_statistics(model, *self.rows)
