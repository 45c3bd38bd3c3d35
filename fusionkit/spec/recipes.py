"""Named spec recipes for the UCI Multiple Features task, shared by the demo and the benchmarks.

- ``baseline``: the official BlEmoRE baseline recipe on one encoder — one hidden ReLU layer
  (256), softmax over labels trained with KL, Adam-style optimiser at lr 5e-6, weight decay
  1e-3, batch 32, 200 epochs, constant learning rate, decoded with the official α/β rule.
- ``naive``: every encoder, uniform gate (no selection), ``weighted_sum`` or ``rank_concat``
  (which, with all encoders kept in fixed order, is plain concatenation).
- ``topn``: rank-aware top-n fusion, attention gate with rank supervision, soft warm-up, score
  noise and a small balance loss; presence + salience heads, product combiner.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UCI_DIMS", "UCI_LABELS", "FUSION_TRAIN", "ON_DEMAND_COSTS", "baseline", "naive", "best", "selective",
           "keep_all", "on_demand", "topn", "controls"]

UCI_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
UCI_LABELS = ["d0", "d1", "d2", "d3", "d4", "d5"]

FUSION_TRAIN = {"epochs": 40, "batch_size": 64, "lr": 2.0e-3, "weight_decay": 1.0e-2, "patience": 10, "seed": 0}


def _base(encoders: dict[str, int], seed: int) -> dict[str, Any]:
    return {
        "labels": UCI_LABELS,
        "neutral": "d5",
        "latent_dim": 64,
        "encoders": [{"name": n, "type": "features", "dim": d} for n, d in encoders.items()],
        "projector": {"hidden": 0, "dropout": 0.1},
        "train": {**FUSION_TRAIN, "seed": seed},
    }


def baseline(encoder: str, seed: int = 0, dims: dict[str, int] = UCI_DIMS) -> dict[str, Any]:
    spec = _base({encoder: dims[encoder]}, seed)
    spec.update({
        "latent_dim": 256,
        "projector": {"hidden": 0, "dropout": 0.0, "norm": False},
        "gate": {"type": "uniform", "top_n": 1},
        "fusion": {"type": "weighted_sum"},
        "heads": {"salience": {"type": "classifier", "hidden": 256}},
        "combiner": {"type": "salience_only"},
        "decoder": {"type": "blemore"},
        "train": {"epochs": 200, "batch_size": 32, "lr": 5.0e-6, "weight_decay": 1.0e-3, "schedule": "constant",
                  "warmup_fraction": 0.0, "grad_clip": 0.0, "patience": 200, "eval_every": 5, "seed": seed},
    })
    return spec


def naive(fusion: str = "weighted_sum", seed: int = 0, dims: dict[str, int] = UCI_DIMS) -> dict[str, Any]:
    spec = _base(dict(dims), seed)
    spec.update({"gate": {"type": "uniform", "top_n": len(dims)}, "fusion": {"type": fusion}})
    return spec


def best(seed: int = 0, dims: dict[str, int] = UCI_DIMS) -> dict[str, Any]:
    """The simplest recipe within noise of the best on UCI (docs/benchmarks.md#what-selection-buys): every
    encoder kept, in the spec's order, weighted by the attention gate, fused by rank_attention with the residual
    mean path. :func:`selective` beside it leads, within noise, only with misleading distractors."""
    return keep_all(seed, dims)


def selective(seed: int = 0, dims: dict[str, int] = UCI_DIMS) -> dict[str, Any]:
    """The seed method: top-p 0.9 (at least 2 encoders) in rank order, rank_attention and the residual mean path.
    Its largest lead over :func:`best`, with misleading distractors, is within noise
    (docs/benchmarks.md#what-selection-buys)."""
    return topn(3, "rank_attention", seed=seed, dims=dims, selection="top_p", top_p=0.9, min_n=2, residual_mean=True)


def keep_all(seed: int = 0, dims: dict[str, int] = UCI_DIMS, order: str = "fixed") -> dict[str, Any]:
    """The same gate, fusion and residual path as :func:`selective`, every encoder kept (no selection), in the
    spec's order (``order="fixed"``: no ranking) or in rank order."""
    return topn(len(dims), "rank_attention", seed=seed, dims=dims, selection="top_n", residual_mean=True,
                slot_order=order)


#: Costs per sample declared for :func:`on_demand` (GFLOPs a deployment would pay to extract these views; for the
#: demonstration: the UCI files ship them pre-extracted).
ON_DEMAND_COSTS = {"fac": 1.0, "pix": 2.0}


def on_demand(seed: int = 0, dims: dict[str, int] = UCI_DIMS, costs: dict[str, float] = ON_DEMAND_COSTS
              ) -> dict[str, Any]:
    """:func:`best` with the views of ``costs`` run on demand at those declared costs: one trained model, any
    compute budget at inference (docs/conditional.md)."""
    spec = best(seed, dims)
    for block in spec["encoders"]:
        if block["name"] in costs:
            block.update(run="on_demand", cost_gflops=costs[block["name"]])
    return spec


def controls(seed: int = 0, dims: dict[str, int] = UCI_DIMS) -> dict[str, dict[str, Any]]:
    """The selective recipe and the controls that isolate what selection adds
    (docs/benchmarks.md#what-selection-buys). Each control changes one thing of :func:`selective`:

    - ``keep all, rank order``: every encoder kept (top_n = K): the same gate, rank order, fusion and residual
      path, no selection;
    - ``keep all, fixed order``: every encoder kept, in the spec's order: neither selection nor ranking (the gate
      still weighs the encoders);
    - ``top-p, fixed order``: selection kept, ranking removed (the kept encoders in the spec's order);
    - ``fusion alone, uniform gate``: every encoder with equal weights: the fusion module and residual path alone.
    """
    fixed = selective(seed, dims)
    fixed["gate"] = {**fixed["gate"], "slot_order": "fixed"}
    uniform = keep_all(seed, dims, order="rank")
    uniform["gate"] = {**uniform["gate"], "type": "uniform"}
    return {
        "best: top-p 0.9 (min 2), rank order": selective(seed, dims),
        "keep all, rank order": keep_all(seed, dims, order="rank"),
        "keep all, fixed order": keep_all(seed, dims),
        "top-p 0.9 (min 2), fixed order": fixed,
        "fusion alone, uniform gate": uniform,
    }


def topn(n: int = 2, fusion: str = "rank_concat", gate: str = "attention", seed: int = 0,
         dims: dict[str, int] = UCI_DIMS, **selection: Any) -> dict[str, Any]:
    """The rank-aware recipe; ``selection`` adds gate options (e.g. ``selection="top_p", top_p=0.8``)."""
    spec = _base(dict(dims), seed)
    spec.update({
        "gate": {"type": gate, "top_n": n, "warmup_epochs": 5, "noise": 0.1, "balance_weight": 0.01, "supervision": 1.0,
                 **selection},
        "fusion": {"type": fusion},
    })
    return spec
