"""Previews (docs/conditional.md#previews): a cheap always-run look at an on-demand input, which the scout sees
before it chooses, whose cost counts in every budget, and which the fusion keeps only when ``fused``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fusionkit
from fusionkit.components.datasets import build_dataset
from fusionkit.data.open import spec_store
from fusionkit.errors import SpecError
from fusionkit.export.check import check_export
from fusionkit.export.graphs import export_model
from fusionkit.inference import fit_mean_budget


def preview_spec(**look):
    return {"latent_dim": 8, "gate": {"type": "attention", "top_n": 2},
            "encoders": [{"name": "enc0", "type": "features", "dim": 6},
                         {"name": "enc1", "type": "features", "dim": 6, "run": "on_demand", "cost_gflops": 4.0},
                         {"name": "enc2", "type": "features", "dim": 6, "preview_of": "enc1", "cost_gflops": 0.5,
                          "fused": False, **look}]}


def test_a_preview_runs_on_every_row_counts_in_the_cost_and_is_never_fused():
    torch.manual_seed(0)
    model = fusionkit.build_model(preview_spec()).eval()
    inputs = {f"enc{k}": torch.randn(16, 6) for k in range(3)}
    with torch.no_grad():
        for budget in (None, "0%", "50%", "100%", ["0%", "100%"] * 8):
            out = model(inputs, budget=budget)
            assert out.ran[:, 2].all() and out.ran[:, 0].all()
            assert torch.allclose(out.cost, 0.5 + 4.0 * out.ran[:, 1].double())
            assert not (out.kept == 2).any()  # seen by the scout, never kept by the fusion
        assert (model(inputs, budget="0%").cost == 0.5).all()  # a cap of 0% still pays the preview
        other = dict(inputs, enc2=torch.randn(16, 6))
        assert not torch.allclose(model(inputs, budget="50%").scout_scores, model(other, budget="50%").scout_scores)
        fused = fusionkit.build_model(preview_spec(fused=True)).eval()
        assert (fused(inputs, budget="100%").kept == 2).any()  # fused: true lets the fusion keep it


@pytest.mark.parametrize("change, message", [
    (lambda s: s["encoders"][2].update(preview_of="nope"), r"encoders\[2\].preview_of: 'nope' names no other"),
    (lambda s: s["encoders"][2].update(preview_of="enc2"), r"encoders\[2\].preview_of: 'enc2' names no other"),
    (lambda s: s["encoders"][2].update(preview_of="enc0"), r"encoders\[2\].preview_of: 'enc0' runs always"),
    (lambda s: s["encoders"][2].update(run="on_demand"), r"encoders\[2\].run: a preview runs always"),
    (lambda s: s["encoders"][1].update(fused=False), r"encoders\[1\].fused: an on-demand encoder runs to be fused"),
    (lambda s: s["encoders"][1].pop("run") and s["encoders"][2].pop("preview_of"),
     "no encoder is on demand .* so nothing would read it"),
    (lambda s: s["encoders"][2].update(fused="no"), r"encoders\[2\].fused"),
])
def test_a_bad_preview_is_refused_naming_the_key(change, message):
    spec = preview_spec()
    change(spec)
    with pytest.raises(SpecError, match=message):
        fusionkit.load_spec(spec)


def test_a_preview_exports_and_the_runtime_runs_it(tmp_path):
    store_path = build_dataset("synthetic", {"samples": 60, "noise": [0.3, 1.0, 2.0], "dim": 6, "seed": 7},
                               tmp_path / "store")
    for scout in ("gate", "value"):
        torch.manual_seed(1)
        model = fusionkit.build_model({**preview_spec(), "conditional": {"scout": scout}}).eval()
        store = spec_store(model.spec, store_path)
        budget = fit_mean_budget(model, store, np.arange(30, 60), "mean:40%")
        folder = export_model(model, tmp_path / f"export-{scout}", budget=budget)
        report = check_export(model, folder, store, np.arange(30))  # every budget kind, a batch of mixed budgets
        assert all(line["max_prob_diff"] <= 1e-4 for line in report)
        assert all(line["mean_gflops"] >= 0.5 for line in report)  # the preview is paid at every budget
        from fusionkit.runtime import load

        entry = load(folder).encoders[2]
        assert entry["preview_of"] == "enc1" and entry["fused"] is False


def test_a_live_thumbnail_previews_a_live_encoder_runs_on_every_row_and_exports(tmp_path):
    """A thumbnail of an on-demand CNN's image (a live CNN at 8x8, ``preview_of``, not fused, reading its own column
    of the manifest: the same paths): trained, it runs on every row at every budget and its measured FLOPs count in
    every cost; exported, the runtime reads its images on every row and the on-demand CNN's only where it runs, and
    answers as the model does."""
    from PIL import Image

    from fusionkit.data.store import Sample, write_store
    from fusionkit.errors import DataError
    from fusionkit.runtime import load
    from fusionkit.training.train import train

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines, samples = ["id,labels,fold,cam,cam_thumb"], []
    for i in range(20):
        label = "ab"[i % 2]
        image = rng.random((16, 15)) * 60 + (150 if label == "a" else 40)
        Image.fromarray(image.astype(np.uint8)).save(tmp_path / "img" / f"s{i}.png")
        lines.append(f"s{i},{label},{i % 5},img/s{i}.png,img/s{i}.png")
        samples.append(Sample(id=f"s{i}", labels=[{"emotion": label, "salience": 100.0}], fold=i % 5))
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    write_store(tmp_path / "store", ["a", "b"], samples, {"vec": rng.normal(size=(20, 4)).astype(np.float32)})
    cnn = {"type": "timm", "model": "test_resnet", "in_chans": 1, "crop_pct": 1.0}
    spec = {"labels": ["a", "b"], "latent_dim": 8, "gate": {"type": "attention", "top_n": 2},
            "encoders": [{"name": "vec", "type": "features", "dim": 4},
                         {**cnn, "name": "cam", "img_size": [16, 16], "run": "on_demand"},
                         {**cnn, "name": "cam_thumb", "img_size": [8, 8], "preview_of": "cam", "fused": False}],
            "conditional": {"scout": "value"}, "train": {"epochs": 2, "batch_size": 16}}
    train(spec, tmp_path / "store", tmp_path / "run", fold=0, raw=tmp_path / "manifest.csv", progress=False)
    model = fusionkit.load_model(tmp_path / "run" / "best").eval()
    store = spec_store(model.spec, tmp_path / "store", tmp_path / "manifest.csv")
    costs = model.encoder_costs()
    assert 0 < costs["cam_thumb"] < costs["cam"]
    inputs, lengths, _ = store.inputs_for(model, np.arange(20))
    with torch.no_grad():
        for budget in (None, "0%", "50%", "100%"):
            out = model(inputs, lengths, budget=budget)
            assert out.ran[:, 2].all() and not (out.kept == 2).any()
            assert torch.allclose(out.cost, costs["cam_thumb"] + costs["cam"] * out.ran[:, 1].double())
    folder = export_model(model, tmp_path / "export")
    report = check_export(model, folder, store)
    assert all(line["max_prob_diff"] <= 1e-4 for line in report)
    assert all(line["mean_gflops"] >= costs["cam_thumb"] - 1e-9 for line in report)
    runtime = load(folder)
    rows = runtime.read(tmp_path / "store", tmp_path / "manifest.csv")
    absent = np.array([str(tmp_path / f"absent{i}.png") for i in range(20)], dtype=object)
    out = runtime.predict({**rows.inputs, "cam": absent}, "0%")  # the CNN's images are never read at 0%
    assert out.ran[:, 2].all() and not out.ran[:, 1].any()
    # the thumbnail's images are read on every row
    with pytest.raises(DataError, match=r"absent\d+\.png: not a readable image"):
        runtime.predict({**rows.inputs, "cam_thumb": absent}, "0%")
