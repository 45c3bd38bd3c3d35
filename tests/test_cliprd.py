"""CLIP-RD as its authors compute it: every term's value and gradient from ``KDClipLoss``
(Rosieyang01/CLIP-RD at 3b22493, float64), reproduced through the registered plugins and a
:class:`~fusionkit.interfaces.DistillBatch` (a copy of ``shared/data/cliprd-vectors.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusionkit.interfaces import DistillBatch
from fusionkit.models.towers import clip_loss
from fusionkit.plugins import get_registry
from fusionkit.spec import load_spec

VECTORS = json.loads((Path(__file__).parent / "data" / "cliprd-vectors.json").read_text())
CASES = VECTORS["cases"]
RTOL = 1e-6


def plugin(name: str, **options):
    """A registered distillation loss, built from its spec block, in float64."""
    reg = get_registry().get("distill_loss", name)
    problems: list[str] = []
    from fusionkit.config import structure

    config = structure(reg.config, options, name, problems)
    assert not problems, problems
    return reg.factory(config, None).double()


def inputs(case):
    """Raw student embeddings (leaves) and the batch the objective would build: student normalised in the graph."""
    raw = {k: torch.tensor(case[f"student_{k}"], dtype=torch.float64, requires_grad=True) for k in ("image", "text")}
    teacher = {k: torch.tensor(case[f"teacher_{k}"], dtype=torch.float64) for k in ("image", "text")}
    pairs = {k: (F.normalize(raw[k], dim=-1), teacher[k]) for k in ("image", "text")}  # image first: it plays I
    batch = DistillBatch(views=pairs, modalities=pairs, scale_s=torch.tensor(case["student_logit_scale"], dtype=torch.float64),
                         scale_t=torch.tensor(case["teacher_logit_scale"], dtype=torch.float64))
    return raw, batch


def check(value: torch.Tensor, raw, case, term: str) -> None:
    expected = case["terms"][term]
    assert float(value.detach()) == pytest.approx(expected, rel=RTOL, abs=1e-12), term
    grads = torch.autograd.grad(value, [raw["image"], raw["text"]], allow_unused=True, retain_graph=True)
    for side, grad in zip(("student_image", "student_text"), grads):
        want = torch.tensor(case["grads"][term][side], dtype=torch.float64)
        got = torch.zeros_like(want) if grad is None else grad
        assert torch.allclose(got, want, rtol=RTOL, atol=1e-12 * max(1.0, float(want.abs().max()))), (term, side)


def set_scale(parameter: torch.nn.Parameter, value: float) -> None:
    with torch.no_grad():
        parameter.fill_(value)


@pytest.mark.parametrize("case", CASES, ids=[f"B{c['batch']}-D{c['dim']}-{i}" for i, c in enumerate(CASES)])
def test_every_published_term_matches_the_authors_code(case):
    raw, batch = inputs(case)
    (s_i, _), (s_t, _) = batch.views["image"], batch.views["text"]
    check(clip_loss(s_i, s_t, batch.scale_s), raw, case, "task")
    check(plugin("crd")(batch), raw, case, "hrd")
    check(plugin("fd", form="published")(batch), raw, case, "fd")
    icl = plugin("icl", form="published")
    set_scale(icl.log_scale, case["beta"])
    check(icl(batch), raw, case, "icl")
    vrd = plugin("vrd")  # the published form is the default
    set_scale(vrd.alpha_img, case["alpha_img"])
    set_scale(vrd.alpha_txt, case["alpha_txt"])
    parts = vrd.terms(batch)
    for part in ("kl", "ce_img", "ce_txt"):
        check(parts[part], raw, case, f"vrd_{part}")
    total = vrd(batch)
    assert float(total.detach()) == pytest.approx(sum(case["terms"][f"vrd_{p}"] for p in ("kl", "ce_img", "ce_txt")), rel=RTOL)
    xrd = plugin("xrd")
    set_scale(xrd.beta, case["beta"])
    check(xrd(batch), raw, case, "xrd")


def test_the_published_scales_are_learned_plain_multipliers_starting_at_ln_1_over_0_07():
    import math

    vrd, xrd, icl = plugin("vrd"), plugin("xrd"), plugin("icl", form="published")
    for p in (vrd.alpha_img, vrd.alpha_txt, xrd.beta, icl.log_scale):
        assert p.requires_grad and float(p.detach()) == pytest.approx(math.log(1 / 0.07))
    _, batch = inputs(CASES[0])
    (vrd(batch) + xrd(batch) + icl(batch)).backward()
    assert all(p.grad is not None and float(p.grad) != 0 for p in (vrd.alpha_img, vrd.alpha_txt, xrd.beta, icl.log_scale))


def test_fusionkits_earlier_readings_stay_as_named_variants():
    raw, batch = inputs(CASES[3])
    published, symmetric = plugin("vrd")(batch).detach(), plugin("vrd", mode="symmetric")(batch).detach()
    assert float(published) != pytest.approx(float(symmetric))
    assert float(plugin("fd")(batch).detach()) == pytest.approx(CASES[3]["terms"]["fd"] * CASES[3]["dim"], rel=RTOL)


@pytest.mark.parametrize("preset, expected", [
    ("clip-kd", [("crd", 1.0), ("icl", 1.0), ("fd", 2000.0)]),
    ("clip-rd", [("crd", 1.0), ("icl", 1.0), ("fd", 2000.0), ("vrd", 1.0), ("xrd", 1.0)]),
])
def test_presets_expand_to_the_published_loss_sets(preset, expected):
    spec = load_spec({"encoders": [{"name": "a", "type": "features", "dim": 3}, {"name": "b", "type": "features", "dim": 3}],
                      "towers": {"x": {"encoders": ["a"]}, "y": {"encoders": ["b"]}},
                      "distill": {"teacher": "runs/teacher/best", "preset": preset}})
    assert [(c.type, c.config.weight) for c in spec.distill.losses] == expected
    forms = {c.type: getattr(c.config, "form", getattr(c.config, "mode", None)) for c in spec.distill.losses}
    assert forms["icl"] == forms["fd"] == "published" and forms.get("vrd", "published") == "published"
    extra = load_spec({**spec.to_dict(), "distill": {"teacher": "t", "preset": preset, "losses": [{"type": "rkd"}]}})
    assert [c.type for c in extra.distill.losses][-1] == "rkd"
    assert load_spec(spec.to_dict()).distill.losses == spec.distill.losses  # the resolved spec round-trips
