"""A live timm image encoder exported and run by the runtime without torch: its images read with PIL and numpy
(fusionkit.runtime.images) as timm's transform reads them, only for the rows that run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fusionkit
from fusionkit.cli import main
from fusionkit.data.open import spec_store
from fusionkit.data.store import Sample, write_store
from fusionkit.errors import DataError
from fusionkit.export.check import check_export
from fusionkit.export.graphs import ExportError, export_model
from fusionkit.inference import predictions_for
from fusionkit.runtime import DeploymentError, load
from fusionkit.runtime.__main__ import main as main_runtime
from fusionkit.runtime.images import preprocess, read_image

LABELS = ["a", "b"]
#: Images of other sizes and shapes than the graphs take: portrait, landscape, smaller than the crop, square.
SIZES = [(40, 30), (20, 50), (13, 17), (64, 64)]


def live_spec(**gate):
    return {"labels": LABELS, "latent_dim": 16, "encoders": [
        {"name": "vec", "type": "features", "dim": 5},
        {"name": "gray", "type": "timm", "model": "test_resnet", "in_chans": 1, "img_size": [32, 32],
         "crop_pct": 0.8, "run": "on_demand"},
        {"name": "rgb", "type": "timm", "model": "test_vit", "run": "on_demand"}],
        "gate": {"type": "attention", "top_n": 2, **gate}, "fusion": {"type": "weighted_sum"}}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """12 samples: a grayscale PNG and an RGB JPEG each (of the SIZES), a manifest, a store of one stored encoder,
    an untrained model of both live encoders on demand, and its export."""
    from PIL import Image

    root = tmp_path_factory.mktemp("live-export")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines, samples, vectors = ["id,labels,fold,gray,rgb"], [], []
    for i in range(12):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).save(root / "img" / f"g{i}.png")
        Image.fromarray((rng.random((w, h, 3)) * 255).astype(np.uint8)).save(root / "img" / f"c{i}.jpg")
        label = LABELS[i % 2] if i < 8 else ""
        lines.append(f"s{i},{label},{i % 3},img/g{i}.png,img/c{i}.jpg")
        samples.append(Sample(id=f"s{i}", labels=[{"emotion": label, "salience": 100.0}] if label else None,
                              fold=i % 3))
        vectors.append(rng.normal(size=5))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    write_store(root / "store", LABELS, samples, {"vec": np.array(vectors, dtype=np.float32)})
    model = fusionkit.build_model(live_spec()).eval()
    store = spec_store(model.spec, root / "store", root / "manifest.csv")
    return root, model, store, export_model(model, root / "exported")


def test_the_runtime_reads_images_exactly_as_timm_does(live):
    """Pixel for pixel, each image of each size as TimmEncoder.load gives it, from the manifest's steps."""
    root, model, _, exported = live
    manifest = json.loads((exported / "manifest.json").read_text())
    reads = {e["name"]: e["reads"] for e in manifest["encoders"] if "reads" in e}
    assert reads["gray"] == {"kind": "image", "mode": "L", "steps": [
        {"op": "resize", "size": 40, "interpolation": "bilinear"}, {"op": "center_crop", "size": [32, 32]}]}
    assert reads["rgb"]["mode"] == "RGB" and reads["rgb"]["steps"][0]["interpolation"] == "bicubic"
    assert [e["inputs"]["x"] for e in manifest["encoders"] if e["name"] == "gray"] == [
        {"shape": ["batch", 1, 32, 32], "dtype": "uint8"}]
    for i in range(4):
        for name, file in (("gray", f"img/g{i}.png"), ("rgb", f"img/c{i}.jpg")):
            expected = model.encoders[name].load(file, root).numpy()
            got = read_image(root / file, reads[name])
            assert got.dtype == np.uint8 and np.array_equal(got, expected), (name, file)


def test_resize_and_center_crop_follow_torchvision_on_odd_sizes():
    """The runtime's steps against torchvision's own transforms, where timm's eval transform never goes: a crop
    larger than the image (zero padding), a resize to [h, w], nearest and lanczos filters."""
    import torchvision.transforms as T
    from PIL import Image

    rng = np.random.default_rng(1)
    for h, w in [(7, 9), (30, 11), (25, 25)]:
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        for steps, transform in [
            ([{"op": "center_crop", "size": [16, 12]}], T.CenterCrop((16, 12))),
            ([{"op": "resize", "size": [12, 20], "interpolation": "nearest"}],
             T.Resize((12, 20), T.InterpolationMode.NEAREST)),
            ([{"op": "resize", "size": 21, "interpolation": "lanczos"}, {"op": "center_crop", "size": [21, 21]}],
             T.Compose([T.Resize(21, T.InterpolationMode.LANCZOS), T.CenterCrop(21)])),
        ]:
            expected = np.asarray(transform(image), dtype=np.uint8).transpose(2, 0, 1)
            assert np.array_equal(preprocess(image, {"kind": "image", "mode": "RGB", "steps": steps}), expected)


def test_a_live_export_runs_as_the_model_at_every_budget(live):
    _, model, store, exported = live
    report = check_export(model, exported, store)
    assert [line["budget"] for line in report] == [None, "0%", "25%", "50%", "100%", "per row"]
    assert all(line["max_prob_diff"] <= 1e-4 for line in report)
    assert report[1]["mean_gflops"] == 0.0 < report[4]["mean_gflops"]


def test_images_are_read_only_for_the_rows_that_run_their_encoder(live, tmp_path):
    """Paths of files that do not exist: at 0% nothing reads them; where a row runs the encoder, its file is
    read and a missing one is named."""
    root, _, _, exported = live
    runtime = load(exported)
    rows = runtime.read(root / "store", root / "manifest.csv")
    inputs = dict(rows.inputs)
    inputs["rgb"] = np.array([str(tmp_path / f"absent{i}.jpg") for i in range(len(rows.ids))], dtype=object)
    out = runtime.predict(inputs, "0%")
    assert not out.ran[:, 1:].any() and out.probs.shape == (12, 2)
    with pytest.raises(DataError, match=r"absent\d+\.jpg: not a readable image"):
        runtime.predict(inputs, "100%")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "clip").mkdir()
    for odd, why in (("fifo.png", "not a regular file"), ("clip", "a folder")):
        inputs["rgb"] = np.array([str(tmp_path / odd)] * len(rows.ids), dtype=object)
        with pytest.raises(DataError, match=why):
            runtime.predict(inputs, "100%")
    pixels = np.stack([read_image(p, runtime.encoders[2]["reads"]) for p in rows.inputs["rgb"]])
    by_paths = runtime.predict(rows.inputs, "100%")
    by_pixels = runtime.predict({**rows.inputs, "rgb": pixels}, "100%")
    assert np.array_equal(by_paths.probs, by_pixels.probs) and np.array_equal(by_paths.ran, by_pixels.ran)
    with pytest.raises(DeploymentError, match=r"inputs\['rgb'\]: expected uint8 pixels"):
        runtime.predict({**rows.inputs, "rgb": pixels.astype(np.float32)})
    with pytest.raises(DeploymentError, match=r"inputs\['rgb'\]: expected \['batch', 3, 160, 160\]"):
        runtime.predict({**rows.inputs, "rgb": pixels[:, :, :32, :32]})


def test_the_runtime_command_reads_a_store_and_a_manifest_without_torch(live, tmp_path):
    """fusionkit-runtime --data STORE --raw MANIFEST, with torch and torchvision unimportable, writes what
    fusionkit predict writes; errors name the manifest."""
    root, model, store, exported = live
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = sys.modules["torchvision"] = None  # any import of either fails
        from fusionkit.runtime.__main__ import main
        code = main([{str(exported)!r}, "--data", {str(root / "store")!r}, "--raw", {str(root / "manifest.csv")!r},
                     "--out", {str(tmp_path / "sub.json")!r}, "--split", "all", "--budget", "50%"])
        print(code, [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "0 ['torch', 'torchvision']"  # only the blockers
    got = json.loads((tmp_path / "sub.json").read_text())["predictions"]
    assert got == predictions_for(model, store, np.arange(len(store)), budget="50%")
    from fusionkit.runtime.__main__ import main as runtime_main

    assert runtime_main([str(exported), "--data", str(root / "store"), "--out", str(tmp_path / "b.json")]) == 2
    (tmp_path / "short.csv").write_text("id,gray,rgb\ns0,img/g0.png,img/c0.jpg\n")
    assert runtime_main([str(exported), "--data", str(root / "store"), "--raw", str(tmp_path / "short.csv"),
                         "--out", str(tmp_path / "c.json")]) == 2
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.json").exists()


def test_the_runtime_reads_a_manifest_alone_when_every_encoder_is_live(live, tmp_path, capsys):
    root, _, _, _ = live
    spec = live_spec()
    spec["encoders"] = spec["encoders"][1:]
    spec["encoders"][0]["run"] = "always"
    model = fusionkit.build_model(spec).eval()
    store = spec_store(model.spec, root / "manifest.csv")
    exported = export_model(model, tmp_path / "exp")
    assert [line["budget"] for line in check_export(model, exported, store)][:2] == [None, "0%"]
    runtime = load(exported)
    rows = runtime.read(root / "manifest.csv")
    assert rows.ids == [f"s{i}" for i in range(12)] and rows.labelled.sum() == 8
    with pytest.raises(DataError, match="the data is already a manifest"):
        runtime.read(root / "manifest.csv", root / "manifest.csv")
    assert runtime.read(root / "manifest.csv", confine=root).ids == rows.ids
    with pytest.raises(DataError, match=r"12 path\(s\) of column 'gray' resolve outside --confine .*img/g0\.png"):
        runtime.read(root / "manifest.csv", confine=root / "elsewhere")
    (tmp_path / "holes.csv").write_text("id,gray,rgb\ns0,img/g0.png,\n")
    with pytest.raises(DataError, match=r"column 'rgb' holds no path for sample\(s\) \['s0'\]"):
        runtime.read(tmp_path / "holes.csv")


def test_a_live_encoder_the_runtime_cannot_read_is_refused_naming_it(tmp_path, monkeypatch):
    model = fusionkit.build_model(live_spec()).eval()
    monkeypatch.setattr(type(model.encoders["rgb"]), "export_preprocessing", lambda self: None)
    with pytest.raises(ExportError, match=r"encoder 'gray' \(TimmEncoder\) is live and declares no "
                                          r"export_preprocessing\(\)"):
        export_model(model, tmp_path / "a")
    monkeypatch.setattr(type(model.encoders["rgb"]), "export_preprocessing",
                        lambda self: {"kind": "image", "mode": "RGB", "steps": [{"op": "rotate"}]})
    with pytest.raises(ExportError, match=r"encoder 'gray' .*unknown step \{'op': 'rotate'\}"):
        export_model(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_threads_are_onnxruntimes_and_checked(live):
    _, _, _, exported = live
    assert load(exported, threads=1).sessions["gray"].session.get_session_options().intra_op_num_threads == 1
    cores = len(os.sched_getaffinity(0))
    for bad in (0, -1, cores + 1, 100000, 2147483648, 1.5, "2", True):
        with pytest.raises(DeploymentError, match=rf"threads .*: give a whole number from 1 to {cores}"):
            load(exported, threads=bad)
    assert main_runtime([str(exported), "--data", "x", "--out", "y.json", "--threads", "100000"]) == 2


def test_a_tampered_reads_entry_is_refused_at_load(live, tmp_path):
    import shutil

    _, _, _, exported = live
    copy = tmp_path / "exp"
    shutil.copytree(exported, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["encoders"][1]["reads"]["steps"][0]["interpolation"] = "magic"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match=r"encoder 'gray': reads.steps\[0\]: interpolation 'magic'"):
        load(copy)


def test_the_export_command_checks_a_live_model_with_raw(live, tmp_path, capsys):
    """fusionkit export RUN --check STORE --raw MANIFEST, on a trained run of the live spec."""
    from fusionkit.data.open import DataSource
    from fusionkit.training.train import train

    root, _, _, _ = live
    spec = {**live_spec(), "train": {"epochs": 1, "batch_size": 4, "seed": 0}}
    train(spec, DataSource(root / "store", root / "manifest.csv"), tmp_path / "run", fold=0, progress=False)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp"), "--check", str(root / "store"),
                 "--raw", str(root / "manifest.csv")]) == 0
    assert "the export matches the model" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp2"), "--check", str(root / "store")]) == 2
    assert "give their manifest with --raw" in capsys.readouterr().err
