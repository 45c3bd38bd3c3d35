"""``fusionkit demo``: what the README's main command shows a newcomer."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE_SPEC = Path(__file__).parent / "examples" / "blemore.yaml"


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from fusionkit.cli import model_summary
    from fusionkit.model import build_model
    from fusionkit.plugins import loaded
    from fusionkit.spec import load_spec

    state = loaded()
    print("Installed plugins:")
    for info in state.plugins:
        status = "ok" if info.ok else f"FAILED ({info.error})"
        print(f"  {info.name} {info.version or ''} [{status}]")
    spec = load_spec(EXAMPLE_SPEC)
    print(f"\nExample spec {EXAMPLE_SPEC.name}: valid")
    torch.manual_seed(spec.train.seed)
    model = build_model(spec)
    print(model_summary(model))
    batch = 4
    inputs = {e.name: torch.randn(batch, 20, e.config.dim) for e in spec.encoders}
    out = model.eval()(inputs)
    print("\nOne forward pass on random inputs (untrained):")
    for i in range(batch):
        kept = [model.encoder_names[k] for k in out.kept[i].tolist() if k >= 0]
        print(f"  sample {i}: kept {kept} weights {[round(w, 3) for w in out.weights[i].tolist()]}")
    out_dir = Path(args.out)
    model.save_pretrained(out_dir / "model")
    print(f"\nSaved the untrained model to {out_dir / 'model'}")
    return 0
