"""Two-tower models and relational distillation: loss properties, a frozen cached teacher, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusionkit.data.open import spec_store
from fusionkit.errors import CheckpointError, FusionkitError, SpecError
from fusionkit.interfaces import DistillBatch
from fusionkit.models.factory import build_model, load_model
from fusionkit.models.towers import TwoTowerModel, clip_loss, retrieval_metrics
from fusionkit.plugins import get_registry
from fusionkit.spec import load_spec
from fusionkit.training.distill import teacher_outputs
from fusionkit.training.train import train

LOSSES = ("kd", "fd", "crd", "icl", "rkd", "vrd", "xrd")


def loss(name, **options):
    reg = get_registry().get("distill_loss", name)
    from fusionkit import config as cfg

    problems = []
    config = cfg.structure(reg.config, options, name, problems)
    assert not problems, problems
    return reg.factory(config, None)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def pair_batch(s_a, t_a, s_b, t_b, logits=None):
    views = {"a": (s_a, t_a), "b": (s_b, t_b)}
    return DistillBatch(views, views, logits or {})


# --- each loss is zero where its definition says, positive otherwise ------------------------------


def test_fd_kd_crd_vanish_when_the_student_is_the_teacher():
    a, b = unit(16, 8, seed=1), unit(16, 8, seed=2)
    same = pair_batch(a, a, b, b)
    other = pair_batch(unit(16, 8, seed=3), a, unit(16, 8, seed=4), b)
    for name in ("fd", "crd", "rkd"):
        assert float(loss(name)(same)) == pytest.approx(0.0, abs=1e-6), name
        assert float(loss(name)(other)) > 1e-3, name
    logits = torch.randn(16, 6)
    kd = loss("kd", temperature=2.0)
    same_logits = {"salience": (logits, logits, "softmax"), "presence": (logits, logits, "sigmoid")}
    assert float(kd(DistillBatch({}, {}, same_logits))) == pytest.approx(0.0, abs=1e-6)
    moved = {"salience": (logits + torch.randn(16, 6), logits, "softmax"),
             "presence": (-logits, logits, "sigmoid")}
    assert float(kd(DistillBatch({}, {}, moved))) > 1e-3


def test_vrd_vanishes_when_both_modalities_relate_alike():
    t_a, t_b = unit(12, 8, seed=1), unit(12, 8, seed=2)
    s_a = unit(12, 8, seed=3)
    # an orthogonal map R carries modality A onto B, the teacher's and the student's alike:
    # then s_B t_Bᵀ = s_A R Rᵀ t_Aᵀ = s_A t_Aᵀ, so P_A = P_B
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5)))[0]
    equal = pair_batch(s_a, t_a, s_a @ rotation, t_a @ rotation)
    assert float(loss("vrd", mode="symmetric")(equal)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss("vrd", mode="symmetric")(pair_batch(s_a, t_a, unit(12, 8, seed=4), t_b))) > 1e-3
    published = loss("vrd")  # its KL part vanishes alike (equal α); its cross-entropies do not
    assert float(published.terms(equal)["kl"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(published(equal).detach()) > 1e-3


def test_xrd_vanishes_when_the_cross_distributions_are_symmetric():
    t_a, s_a = unit(12, 8, seed=1), unit(12, 8, seed=2)
    # with s_B = s_A and t_B = t_A: Q_AB = softmax(s_A t_Aᵀ / τ) = Q_BA (and the published form's four alike)
    for mode in ("symmetric", "published"):
        assert float(loss("xrd", mode=mode)(pair_batch(s_a, t_a, s_a, t_a))) == pytest.approx(0.0, abs=1e-6)
        assert float(loss("xrd", mode=mode)(pair_batch(s_a, t_a, unit(12, 8, seed=3), unit(12, 8, seed=4)))) > 1e-3


def test_icl_is_small_when_student_and_teacher_agree_across_modalities():
    a, b = unit(16, 8, seed=1), unit(16, 8, seed=2)
    icl = loss("icl")
    aligned = float(icl(pair_batch(a, a, a, a)).detach())       # s_A t_Bᵀ has its maximum on the diagonal
    shuffled = float(icl(pair_batch(a, a, b, b)).detach())
    assert aligned < shuffled and 0 < aligned
    assert icl.log_scale.requires_grad


def test_every_loss_is_a_registered_plugin_with_a_documented_config():
    registry = get_registry()
    for name in LOSSES:
        reg = registry.get("distill_loss", name)
        assert reg.description and reg.config.__doc__


# --- two-tower models -------------------------------------------------------------------------------

LABELS = [f"d{i}" for i in range(4)]


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory):
    """Two views of four classes: 'img' and 'txt' are noisy linear maps of one latent per sample."""
    from fusionkit.data.store import Sample, write_store

    rng = np.random.default_rng(0)
    n = 240
    classes = rng.integers(0, 4, size=n)
    latent = rng.normal(size=(n, 6)) + np.eye(4, 6)[classes] * 3
    views = {"img": latent @ rng.normal(size=(6, 10)) + 0.3 * rng.normal(size=(n, 10)),
             "txt": latent @ rng.normal(size=(6, 7)) + 0.3 * rng.normal(size=(n, 7)),
             "aux": rng.normal(size=(n, 3))}
    samples = [Sample(id=f"s{i}", labels=[{"emotion": LABELS[c], "salience": 100.0}], group=f"g{i % 12}", fold=i % 4)
               for i, c in enumerate(classes)]
    return write_store(tmp_path_factory.mktemp("pairs") / "store", LABELS, samples, views)


def tower_spec(width=32, embed=16, epochs=6, **extra):
    return {"labels": LABELS, "neutral": None, "latent_dim": width,
            "encoders": [{"name": "img", "type": "features", "dim": 10}, {"name": "txt", "type": "features", "dim": 7}],
            "towers": {"a": {"encoders": ["img"], "embed_dim": embed}, "b": {"encoders": ["txt"], "embed_dim": embed}},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 5e-3, "seed": 0}, **extra}


@pytest.fixture(scope="module")
def teacher_run(pair_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    metrics = train(tower_spec(width=64, embed=32, epochs=15), pair_store, out, fold=0, progress=False)
    return out, metrics


def test_a_two_tower_model_trains_retrieves_and_round_trips(teacher_run, pair_store, tmp_path):
    out, metrics = teacher_run
    test = metrics["test"]
    assert test["r1"] > 0.1 and test["r5"] > test["r1"]  # chance R@1 is 1/60
    assert {"r1_a_to_b", "r1_b_to_a", "nn_class_accuracy"} <= set(test)
    model = load_model(out / "best")
    assert isinstance(model, TwoTowerModel)
    model.save_pretrained(str(tmp_path / "again"))
    again = load_model(tmp_path / "again")
    x = {"img": torch.randn(5, 10), "txt": torch.randn(5, 7)}
    assert all(torch.equal(model(x).embeddings[k], again(x).embeddings[k]) for k in ("a", "b"))
    assert torch.allclose(model(x).embeddings["a"].norm(dim=-1), torch.ones(5))


def test_a_two_tower_cross_validation_summarises_recall_and_finishes(pair_store, tmp_path):
    from fusionkit.training.train import cross_validate

    summary = cross_validate(tower_spec(epochs=1), pair_store, tmp_path / "cv", progress=False)
    assert set(summary) == {"r1", "r5", "score"} and 0.0 <= summary["r1"]["mean"] <= 1.0
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["test"]["r5"] == summary["r5"]
    assert json.loads((tmp_path / "cv" / "run.json").read_text())["status"] == "finished"
    assert cross_validate(tower_spec(epochs=1), pair_store, tmp_path / "cv", progress=False, resume=True) == summary


def test_a_list_of_presets_is_a_spec_error(teacher_run):
    out, _ = teacher_run
    with pytest.raises(SpecError, match=r"distill.preset: expected one of .*one preset.*found \['clip-kd', 'clip-rd'\]"):
        load_spec(tower_spec(distill={"teacher": str(out / "best"), "preset": ["clip-kd", "clip-rd"]}))


def test_the_clip_scale_stays_within_its_clamp(pair_store, tmp_path):
    spec = tower_spec(epochs=3, contrastive={"temperature": 0.011, "max_scale": 50.0})  # starts at ln(91) > ln(50)
    train(spec, pair_store, tmp_path / "run", fold=0, progress=False)
    for ckpt in ("last", "best"):
        scale = float(load_model(tmp_path / "run" / ckpt).logit_scale.detach().exp())
        assert scale <= 50.0 + 1e-4
    model = build_model(spec)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.011, rel=1e-5)
    a, b = unit(8, 4, seed=1), unit(8, 4, seed=2)
    assert float(clip_loss(a, a, torch.tensor(100.0))) < float(clip_loss(a, b, torch.tensor(100.0)))


def test_retrieval_metrics_count_ranks_in_both_directions():
    a = np.eye(4)
    b = np.eye(4)[[0, 1, 3, 2]]  # samples 2 and 3 are swapped in tower b
    m = retrieval_metrics(a, b, classes=np.array([0, 0, 1, 1]))
    assert m["r1_a_to_b"] == 0.5 and m["r1_b_to_a"] == 0.5 and m["r5"] == 1.0
    assert m["nn_class_accuracy"] == 1.0


def test_a_trained_tower_serves_as_an_encoder_of_a_fusion_model(teacher_run):
    out, _ = teacher_run
    spec = {"labels": LABELS, "neutral": None, "latent_dim": 8,
            "encoders": [{"name": "img", "type": "tower", "checkpoint": str(out / "best"), "tower": "a", "dim": 10},
                         {"name": "txt", "type": "features", "dim": 7}]}
    model = build_model(spec)
    assert model.encoders["img"].out_dim == 32
    tower_weight = model.encoders["img"].tower.embed.weight.clone()
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model({"img": torch.randn(4, 10), "txt": torch.randn(4, 7)}).probs.sum().backward()
    optim.step()
    assert torch.equal(model.encoders["img"].tower.embed.weight, tower_weight)  # frozen by default
    with pytest.raises(FusionkitError, match="has no tower 'c'"):
        build_model({**spec, "encoders": [{**spec["encoders"][0], "tower": "c"}, spec["encoders"][1]]})


# --- distillation in training ---------------------------------------------------------------------------


def weights_hash(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_two_tower_distillation_trains_only_the_student_and_projection(teacher_run, pair_store, tmp_path):
    out, _ = teacher_run
    before = weights_hash(out / "best")
    spec = tower_spec(width=16, embed=8, epochs=3, distill={
        "teacher": str(out / "best"), "losses": [{"type": t} for t in ("fd", "crd", "icl", "rkd", "vrd", "xrd")]})
    metrics = train(spec, pair_store, tmp_path / "student", fold=0, progress=False)
    assert weights_hash(out / "best") == before
    log = [json.loads(x) for x in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert {f"distill_{t}" for t in ("fd", "crd", "icl", "rkd", "vrd", "xrd")} <= set(log[0])
    student = load_model(tmp_path / "student" / "best")
    assert "projections" not in " ".join(student.state_dict())  # the projection is not saved with the student
    assert student.towers["a"].embed_dim == 8 and metrics["test"]["n"] > 0
    last = json.loads((tmp_path / "student" / "last" / "metadata.json").read_text())
    assert last["extra"]["trainer"]["epoch"] == 3


def test_cached_teacher_outputs_equal_fresh_ones(teacher_run, pair_store):
    out, _ = teacher_run
    teacher = load_model(out / "best")
    store = spec_store(teacher.spec, pair_store)
    cache = teacher_outputs(teacher, store, str(out))
    rows = np.array([3, 17, 100])
    fresh = teacher(*store.batch(rows, teacher.encoder_names))
    for name in ("a", "b"):
        assert torch.allclose(cache[f"tower.{name}"][rows], fresh.embeddings[name], atol=1e-6)


def test_fusion_distillation_with_fewer_encoders(pair_store, tmp_path):
    base = {"labels": LABELS, "neutral": None, "latent_dim": 16, "gate": {"type": "attention", "top_n": 2, "heads": 2},
            "train": {"epochs": 3, "batch_size": 64, "lr": 5e-3}}
    teacher = {**base, "encoders": [{"name": n, "type": "features", "dim": d} for n, d in (("img", 10), ("txt", 7), ("aux", 3))]}
    train(teacher, pair_store, tmp_path / "teacher", fold=0, progress=False)
    before = weights_hash(tmp_path / "teacher" / "best")
    student = {**base, "latent_dim": 8, "encoders": teacher["encoders"][:2],
               "distill": {"teacher": str(tmp_path / "teacher" / "best"),
                           "losses": [{"type": "kd"}, {"type": "rkd"}, {"type": "vrd"}, {"type": "xrd"}]}}
    train(student, pair_store, tmp_path / "student", fold=0, progress=False)
    assert weights_hash(tmp_path / "teacher" / "best") == before
    log = json.loads((tmp_path / "student" / "log.jsonl").read_text().splitlines()[0])
    assert all(log[f"distill_{t}"] > 0 for t in ("kd", "rkd", "vrd", "xrd"))
    one = {**student, "encoders": teacher["encoders"][:1]}
    with pytest.raises(FusionkitError, match=r"distill.losses\[2\]: 'vrd' compares pairs .* share \['img'\]"):
        train(one, pair_store, tmp_path / "one", fold=0, progress=False)


def test_a_bad_teacher_gets_a_clear_error(teacher_run, pair_store, tmp_path):
    out, _ = teacher_run
    missing = tower_spec(distill={"teacher": str(tmp_path / "nowhere"), "losses": [{"type": "fd"}]})
    with pytest.raises(CheckpointError, match="distill.teacher: cannot load the teacher: .*nowhere"):
        train(missing, pair_store, tmp_path / "r1", fold=0, progress=False)
    renamed = tower_spec(distill={"teacher": str(out / "best"), "losses": [{"type": "fd"}]})
    renamed["towers"] = {"x": renamed["towers"]["a"], "y": renamed["towers"]["b"]}
    with pytest.raises(CheckpointError, match=r"has towers \['a', 'b'\], the student \['x', 'y'\]"):
        train(renamed, pair_store, tmp_path / "r2", fold=0, progress=False)
    fusion = {"labels": LABELS, "neutral": None, "latent_dim": 8, "encoders": [{"name": "img", "type": "features", "dim": 10}],
              "distill": {"teacher": str(out / "best"), "losses": [{"type": "kd"}]}}
    with pytest.raises(CheckpointError, match="is a two-tower model, but the student is a fusion model"):
        train(fusion, pair_store, tmp_path / "r3", fold=0, progress=False)
    with pytest.raises(FusionkitError, match="'kd' distils label probabilities; a two-tower model has none"):
        train(tower_spec(distill={"teacher": str(out / "best"), "losses": [{"type": "kd"}]}), pair_store,
              tmp_path / "r4", fold=0, progress=False)
    with pytest.raises(SpecError, match=r"distill.losses\[0\].type: unknown distill_loss 'vdr'"):
        load_spec(tower_spec(distill={"teacher": "x", "losses": [{"type": "vdr"}]}))


def test_the_teacher_relative_variants_vanish_when_the_student_is_the_teacher():
    a, b = unit(12, 8, seed=1), unit(12, 8, seed=2)
    for name in ("vrd", "xrd"):
        variant = loss(name, mode="teacher")
        assert float(variant(pair_batch(a, a, b, b))) == pytest.approx(0.0, abs=1e-6)
        assert float(variant(pair_batch(unit(12, 8, seed=3), a, unit(12, 8, seed=4), b))) > 1e-3


@pytest.mark.parametrize("change, message", [
    (lambda s: s["towers"].update(c={"encoders": ["img"]}), "towers: expected a mapping of exactly two towers"),
    (lambda s: s["towers"]["a"].update(encoders=["nope"]), "towers.a.encoders: 'nope' is not one of the spec's encoders"),
    (lambda s: s["towers"]["b"].update(encoders=["img", "txt"]), "towers.b.encoders: 'img' already belongs to tower 'a'"),
    (lambda s: s["towers"]["a"].update(embed_dim=0), "towers.a.embed_dim: expected an int in [1, 65536]"),
    (lambda s: s["towers"]["a"].update(gate={"type": "mlp", "top_n": 0}), "towers.a.gate.top_n: must be > 0"),
    (lambda s: s["towers"]["a"].update(size=3), "towers.a.size: unknown tower option"),
    (lambda s: s.update(encoders=[*s["encoders"], {"name": "aux", "type": "features", "dim": 3}]),
     "towers: encoders ['aux'] belong to no tower"),
    (lambda s: s.update(adaptation=[{"type": "mmd"}]), "adaptation: adaptation losses apply to classification models"),
    (lambda s: s.update(distill={"teacher": "", "losses": []}), "distill.teacher: expected the path"),
])
def test_tower_and_distill_blocks_are_validated(change, message):
    spec = tower_spec()
    change(spec)
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_distillation_from_the_command_line(teacher_run, pair_store, tmp_path, capsys):
    import yaml

    from fusionkit.cli import main

    out, _ = teacher_run
    spec = tower_spec(width=16, embed=8, epochs=2, distill={"teacher": str(out / "best"),
                                                           "losses": [{"type": "crd"}, {"type": "vrd"}, {"type": "xrd"}]})
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "student.yaml"), "--data", str(pair_store), "--out", str(tmp_path / "run"),
                 "--fold", "0", "--quiet"]) == 0
    assert "test  R@1" in capsys.readouterr().out
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"clip", "distill_crd", "distill_vrd", "distill_xrd"} <= set(log)
    assert main(["plugins"]) == 0
    listed = capsys.readouterr().out.split("  distill_loss:\n", 1)[1]
    assert [line.split()[0] for line in listed.splitlines()[:7]] == ["crd", "fd", "icl", "kd", "rkd", "vrd", "xrd"]


# --- what a run's restart may lose or silently change -----------------------------------------------



def test_overwrite_with_a_bad_teacher_keeps_the_previous_run(teacher_run, pair_store, tmp_path):
    """a wrong distill.teacher with --overwrite left only the lock file of the previous run."""
    from fusionkit.errors import CheckpointError
    from fusionkit.training.train import train

    out, _ = teacher_run
    run = tmp_path / "student"
    spec = tower_spec(width=16, embed=8, epochs=2, distill={"teacher": str(out / "best"), "losses": [{"type": "fd"}]})
    train(spec, pair_store, run, fold=0, progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    spec["distill"]["teacher"] = str(tmp_path / "no-such-teacher")
    with pytest.raises(CheckpointError, match="distill.teacher: cannot load the teacher"):
        train(spec, pair_store, run, fold=0, progress=False, overwrite=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    lock = Path(".fusionkit.lock")  # taken again by the refused call: it names that call's process and second
    assert lock in after and {k: v for k, v in after.items() if k != lock} == {k: v for k, v in before.items() if k != lock}


def test_resume_against_a_retrained_teacher_is_refused(teacher_run, pair_store, tmp_path, monkeypatch):
    """a student killed, its teacher changed, then --resume: it went on against another teacher."""
    import shutil

    from fusionkit.errors import CheckpointError
    from fusionkit.training.train import Trainer, train

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run[0] / "best", teacher)
    spec = tower_spec(width=16, embed=8, epochs=3, distill={"teacher": str(teacher), "losses": [{"type": "fd"}]})
    real = Trainer.validate

    def killed_after_one_epoch(self, model, terms, epoch, state, record):
        real(self, model, terms, epoch, state, record)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "validate", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(spec, pair_store, tmp_path / "student", fold=0, progress=False)
    monkeypatch.undo()
    retrained = tower_spec(width=64, embed=32, epochs=2)
    retrained["train"]["seed"] = 1
    train(retrained, pair_store, tmp_path / "retrained", fold=0, progress=False)
    shutil.rmtree(teacher)
    shutil.copytree(tmp_path / "retrained" / "best", teacher)
    with pytest.raises(CheckpointError, match=r"distill.teacher \(the SHA-256 of its weights: it was retrained"):
        train(spec, pair_store, tmp_path / "student", fold=0, progress=False, resume=True)


# --- two-tower runs through evaluate, predict and report -----------------------------------------------


def test_evaluate_predict_and_report_on_a_two_tower_run(teacher_run, pair_store, tmp_path, capsys):
    """evaluate and predict gave a raw AttributeError on a two-tower run, report a misleading error."""
    from fusionkit.cli import main

    run = teacher_run[0]
    assert main(["evaluate", str(run), "--data", str(pair_store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test: R@1 ")
    metrics = json.loads((run / "evaluation_test.json").read_text())
    assert metrics["r1"] == json.loads((run / "metrics.json").read_text())["test"]["r1"]
    assert main(["predict", str(run), "--data", str(pair_store), "--out", str(tmp_path / "sub.json"),
                 "--split", "labelled"]) == 2
    assert "a two-tower model embeds and retrieves; it predicts no answers" in capsys.readouterr().err
    assert not (tmp_path / "sub.json").exists()
    assert main(["report", str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "(two-tower)" in summary and "| test |" in summary
    assert (run / "report" / "retrieval.png").stat().st_size > 1000
