"""Overhead of the assembled model over a hand-written module of the same architecture.

K = 7 encoders of input size 7168, latent 256, attention gate, top n = 2,
rank_concat fusion, presence + salience heads, product combiner, batch 64.
Both models get the same weights (the script checks their outputs are equal),
then forward + backward is timed in interleaved rounds; the ratio of medians is
the overhead.

    .venv/bin/python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import machine, markdown_table, write
from torch import nn

K, DIM, LATENT, TOP_N, BATCH, LABELS = 7, 7168, 256, 2, 64, 6
SPEC = {
    "latent_dim": LATENT,
    "encoders": [{"name": f"enc{i}", "type": "features", "dim": DIM} for i in range(K)],
    "projector": {"hidden": 0, "dropout": 0.0, "norm": True},
    "gate": {"type": "attention", "top_n": TOP_N, "heads": 4, "layers": 1, "dropout": 0.0},
    "fusion": {"type": "rank_concat"},
    "heads": {"presence": {"type": "presence", "dropout": 0.0}, "salience": {"type": "salience", "dropout": 0.0}},
    "combiner": {"type": "product"},
}


class HandWritten(nn.Module):
    """The same network written directly, with no registry, spec or plugin indirection."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(K, DIM))  # input standardisation, as the features encoder does
        self.register_buffer("std", torch.ones(K, DIM))
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(DIM, LATENT), nn.LayerNorm(LATENT)) for _ in range(K))
        self.identity = nn.Parameter(torch.zeros(K, LATENT))
        layer = nn.TransformerEncoderLayer(LATENT, 4, 2 * LATENT, dropout=0.0, batch_first=True, norm_first=True)
        self.attn = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(LATENT)
        self.score = nn.Linear(LATENT, 1)
        self.rank = nn.Parameter(torch.zeros(TOP_N, LATENT))
        self.presence = nn.Linear(TOP_N * LATENT, LABELS)
        self.salience = nn.Linear(TOP_N * LATENT, LABELS)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        z = torch.stack([p(torch.addcmul(-m / s, x, 1 / s)) for p, x, m, s in zip(self.proj, xs, self.mean, self.std)], 1)
        z = z + self.identity
        s = self.score(self.norm(self.attn(z))).squeeze(-1)
        top, idx = s.topk(TOP_N, dim=1)
        w = torch.softmax(top, dim=1)
        slots = z.gather(1, idx.unsqueeze(-1).expand(-1, -1, LATENT))
        h = (slots * (w * TOP_N).unsqueeze(-1) + self.rank).flatten(1)
        pres = torch.sigmoid(self.presence(h))
        sal = torch.softmax(self.salience(h), -1)
        p = sal * pres
        return p / p.sum(-1, keepdim=True)


def copy_weights(model: nn.Module, hand: HandWritten) -> None:
    """Give the hand-written module the assembled model's weights (strict loads: same shapes)."""
    for i, name in enumerate(model.encoder_names):
        hand.proj[i].load_state_dict({k.replace("net.", "", 1): v for k, v in model.projectors[name].state_dict().items()})
    hand.attn.load_state_dict(model.gate.encoder.state_dict())
    hand.norm.load_state_dict(model.gate.norm.state_dict())
    hand.score.load_state_dict(model.gate.scorer.state_dict())
    hand.presence.load_state_dict(model.heads["presence"].net[-1].state_dict())
    hand.salience.load_state_dict(model.heads["salience"].net[-1].state_dict())
    with torch.no_grad():
        for i, name in enumerate(model.encoder_names):
            hand.mean[i].copy_(model.encoders[name].input_mean)
            hand.std[i].copy_(model.encoders[name].input_std)
        hand.identity.copy_(model.identity)
        hand.rank.copy_(model.fusion.rank_embedding)


def step_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--per-round", type=int, default=3)
    args = parser.parse_args()
    import fusionkit

    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    model = fusionkit.build_model(SPEC).train()
    hand = HandWritten().train()
    copy_weights(model, hand)
    xs = [torch.randn(BATCH, DIM) for _ in range(K)]
    inputs = {f"enc{i}": x for i, x in enumerate(xs)}
    with torch.no_grad():
        same = torch.allclose(model(inputs).probs, hand(xs), atol=1e-5)
    assert same, "the hand-written module does not compute the same function"
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in hand.parameters()))

    def run_model():
        model.zero_grad(set_to_none=True)
        model(inputs).probs[:, 0].sum().backward()

    def run_hand():
        hand.zero_grad(set_to_none=True)
        hand(xs)[:, 0].sum().backward()

    for fn in (run_model, run_hand, run_model, run_hand):
        fn()
    times = {"fusionkit": [], "hand-written": []}
    for _ in range(args.rounds):
        times["fusionkit"] += step_time(run_model, args.per_round)
        times["hand-written"] += step_time(run_hand, args.per_round)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fusionkit"] / med["hand-written"]
    data = {
        "machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "config": {"K": K, "input_dim": DIM, "latent": LATENT, "top_n": TOP_N, "batch": BATCH},
        "parameters": {"fusionkit": params[0], "hand-written": params[1]},
        "outputs_equal": same, "median_seconds": med, "ratio": ratio, "target": 1.05, "met": ratio <= 1.05,
        "samples": times,
    }
    rows = [[k, f"{v * 1000:.1f}", f"{v / med['hand-written']:.3f}"] for k, v in med.items()]
    section = (
        "## Model overhead\n\n"
        f"`.venv/bin/python benchmarks/overhead.py`: forward + backward, K = {K} encoders of input size {DIM}, "
        f"latent {LATENT}, attention gate, top n = {TOP_N}, rank_concat, presence + salience heads, batch {BATCH}; "
        f"both models hold the same {params[0]:,} parameters and compute equal outputs; "
        f"median of {args.rounds * args.per_round} steps each, interleaved ({data['machine']['cpus']} CPUs, torch {torch.__version__}).\n\n"
        + markdown_table(["model", "median ms / step", "ratio"], rows)
        + f"\n\nTarget ratio ≤ 1.05: **{'met' if data['met'] else 'not met'}** ({ratio:.3f}).\n"
    )
    write("overhead", data, section)


if __name__ == "__main__":
    main()
