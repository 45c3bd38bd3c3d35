"""Nothing lost and nothing silently wrong (issue 35): owned outputs, bounded specs, budgets, presets, schema."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml
from conftest import tiny_spec

from fusionkit.cli import main
from fusionkit.conditional.budget import Budget
from fusionkit.errors import FusionkitError, SpecError
from fusionkit.spec import load_spec


def owned_spec(**train):
    """Two on-demand encoders beside an always-run one that declares a cost (2 GFLOPs per sample)."""
    spec = tiny_spec(**train)
    spec["encoders"][0].update(cost_gflops=2.0)
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    return spec


@pytest.fixture(scope="module")
def run(synthetic_store, tmp_path_factory):
    from fusionkit.training.train import train

    root = tmp_path_factory.mktemp("hardening")
    train(owned_spec(epochs=1), synthetic_store, root / "run", fold=0, progress=False)
    return root / "run"


def cli(*args) -> int:
    return main([str(a) for a in args])


# --- 1: outputs that fusionkit did not write are never replaced ---------------------------------------------------

def test_a_users_zip_whose_member_names_match_is_never_replaced(run, synthetic_store, tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as zf:
        zf.writestr("archive.json", "the user's own work")
    before = (tmp_path / "archive.zip").read_bytes()
    assert cli("predict", run, "--data", synthetic_store, "--split", "labelled", "--out", tmp_path / "archive.zip") == 2
    assert "not a submission zip written by fusionkit" in capsys.readouterr().err
    assert (tmp_path / "archive.zip").read_bytes() == before and not (tmp_path / "archive.json").exists()


def test_a_users_submission_json_is_never_replaced_and_ours_is(run, synthetic_store, tmp_path, capsys):
    (tmp_path / "sub.json").write_text(json.dumps({"predictions": {}}))
    args = ("predict", run, "--data", synthetic_store, "--split", "labelled", "--out", tmp_path / "sub.json")
    assert cli(*args) == 2
    assert "not a fusionkit submission" in capsys.readouterr().err
    assert json.loads((tmp_path / "sub.json").read_text()) == {"predictions": {}}
    (tmp_path / "sub.json").unlink()
    assert cli(*args) == 0 and cli(*args) == 0  # its own submission, replaced
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert zf.read("sub.json") == (tmp_path / "sub.json").read_bytes()
        assert zf.comment.startswith(b"fusionkit submission ")


def test_a_crash_between_the_zip_and_the_json_stays_recoverable(run, synthetic_store, tmp_path, monkeypatch):
    args = ("predict", run, "--data", synthetic_store, "--split", "labelled", "--out", tmp_path / "sub.json")
    assert cli(*args) == 0
    old = (tmp_path / "sub.json").read_bytes()
    calls = []

    class Crash(BaseException):
        """The process dies here."""

    def crash(path, text):  # the JSON's write dies after the zip was replaced
        calls.append(path)
        raise Crash

    monkeypatch.setattr("fusionkit.blemore.submission.atomic_write_text", crash)
    with pytest.raises(Crash):
        cli(*args, "--id-suffix", ".mov")
    assert calls and (tmp_path / "sub.json").read_bytes() == old  # the old JSON, a new zip beside it
    monkeypatch.undo()
    assert cli(*args, "--id-suffix", ".mov") == 0  # the next run recognises both as its own
    assert all(k.endswith(".mov") for k in json.loads((tmp_path / "sub.json").read_text())["predictions"])


def test_evaluate_and_report_never_replace_a_users_file(run, synthetic_store, capsys):
    user = run / "evaluation_test_budget-25pct.json"
    user.write_text('{"mine": 1}')
    assert cli("evaluate", run, "--data", synthetic_store, "--budget", "25%") == 2
    assert "not an evaluation written by fusionkit" in capsys.readouterr().err
    assert user.read_text() == '{"mine": 1}'
    user.unlink()
    curve = run / "budget_curve_test.json"
    curve.write_text('{"mine": 1}')
    assert cli("evaluate", run, "--data", synthetic_store, "--budget-curve") == 2
    assert curve.read_text() == '{"mine": 1}'
    curve.unlink()
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "notes.txt").write_text("mine")
    assert cli("report", run) == 2
    assert "notes.txt" in capsys.readouterr().err and (run / "report" / "notes.txt").read_text() == "mine"
    (run / "report" / "notes.txt").unlink()


# --- 9, 10, 12, 14: budgets on the command line ---------------------------------------------------------------------

def test_distinct_budgets_write_distinct_files_that_record_them(run, synthetic_store):
    assert cli("evaluate", run, "--data", synthetic_store, "--budget", "1e-1") == 0
    assert cli("evaluate", run, "--data", synthetic_store, "--budget", "1e+1") == 0
    small = json.loads((run / "evaluation_test_budget-0.1.json").read_text())
    large = json.loads((run / "evaluation_test_budget-10.json").read_text())
    assert small["budget"] == "1e-1" and large["budget"] == "1e+1"
    assert small["compute"]["budget"] == "0.1 GFLOPs" and large["compute"]["budget"] == "10 GFLOPs"


def test_a_cap_below_the_always_run_cost_is_reported(run, synthetic_store, capsys):
    assert cli("evaluate", run, "--data", synthetic_store, "--budget", "1") == 0
    assert "below what the always-run encoders cost (2)" in capsys.readouterr().err
    over = json.loads((run / "evaluation_test_budget-1.json").read_text())["compute"]["over_cap"]
    assert over["limit_gflops"] == 1.0 and over["always_run_gflops"] == 2.0


def test_a_budget_curve_with_a_budget_or_of_an_ensemble_is_refused(run, synthetic_store, capsys):
    from fusionkit.training.train import train

    assert cli("evaluate", run, "--data", synthetic_store, "--budget-curve", "--budget", "abc") == 2
    assert "give one or the other" in capsys.readouterr().err
    other = run.parent / "fold1"
    if not other.exists():
        train(owned_spec(epochs=1), synthetic_store, other, fold=1, progress=False)
    assert cli("evaluate", run, other, "--data", synthetic_store, "--budget-curve", "--split", "all") == 2
    assert "a fold ensemble has none" in capsys.readouterr().err


def test_a_mean_budget_is_not_fitted_on_another_store(run, tmp_path, capsys):
    from fusionkit.components.datasets import build_dataset

    other = build_dataset("synthetic", {"samples": 400, "noise": [0.3, 1.0, 3.0], "dim": 8, "seed": 1},
                          tmp_path / "other")
    assert cli("evaluate", run, "--data", other, "--budget", "mean:40%") == 2
    assert "trained on other data" in capsys.readouterr().err
    assert not list(run.glob("evaluation_test_budget-mean-40pct.json"))


def test_overwrite_removes_the_old_models_budget_curves(synthetic_store, tmp_path):
    from fusionkit.training.train import train

    train(owned_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    assert cli("evaluate", tmp_path / "run", "--data", synthetic_store, "--budget-curve") == 0
    assert (tmp_path / "run" / "budget_curve_test.json").exists()
    train(owned_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False, overwrite=True)
    assert not (tmp_path / "run" / "budget_curve_test.json").exists()


# --- 5, 20: the report ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"split": "test", "n": 5, "points": [{"budget_sh', "truncated or damaged"),
    (json.dumps({"split": "test", "n": 5, "costs": "time", "points": [{"budget_share": 0.5, "score": 0.4,
                                                                         "mean_gflops": 1.0}]}), "mean_encoder_seconds"),
])
def test_report_names_a_damaged_budget_curve(run, text, message, capsys):
    (run / "budget_curve_test.json").write_text(text)
    try:
        assert cli("report", run) == 2
        err = capsys.readouterr().err
        assert "budget_curve_test.json" in err and message in err and "Traceback" not in err
    finally:
        (run / "budget_curve_test.json").unlink()


def test_the_summary_is_written_atomically(run, monkeypatch):
    from fusionkit.evaluation import report

    assert cli("report", run) == 0
    before = (run / "report" / "summary.md").read_text()

    def dies(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(report, "atomic_write_text", dies)
    with pytest.raises(OSError):
        report.write_report(run)
    assert (run / "report" / "summary.md").read_text() == before


# --- 2: batch normalisation and one row -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    from fusionkit.components.datasets import build_dataset

    return build_dataset("synthetic", {"samples": 300, "noise": [0.5, 1.0, 2.0], "dim": 8, "seed": 0,
                                       "target_shift": 1.5}, tmp_path_factory.mktemp("shifted") / "store")


def test_domain_norm_trains_when_one_row_of_a_batch_runs_an_encoder(shifted, tmp_path):
    from fusionkit.training.train import train

    spec = owned_spec(epochs=1, batch_size=8)
    spec["projector"] = {"domain_norm": True}
    spec["conditional"] = {"scout_rows": 0.1}
    metrics = train(spec, shifted, tmp_path / "run", fold=0, progress=False)
    assert metrics["epochs_run"] == 1


def test_a_batch_of_one_row_with_batch_norm_is_refused_before_training(shifted, tmp_path):
    from fusionkit.training.train import train

    spec = owned_spec(epochs=1, batch_size=1)
    spec["projector"] = {"domain_norm": True}
    with pytest.raises(FusionkitError, match="train.batch_size: 1 .* batch normalisation"):
        train(spec, shifted, tmp_path / "run", fold=0, progress=False)


# --- 3, 4, 8, 17: specs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, text", [
    (".yaml", "latent_dim: {n}\nencoders: [{{name: a, type: features, dim: 3}}]\n"),
    (".json", '{{"latent_dim": {n}, "encoders": [{{"name": "a", "type": "features", "dim": 3}}]}}'),
    (".toml", 'latent_dim = {n}\n[[encoders]]\nname = "a"\ntype = "features"\ndim = 3\n'),
])
def test_an_integer_of_5000_digits_is_a_clear_error(suffix, text, tmp_path, synthetic_store, capsys):
    path = tmp_path / f"big{suffix}"
    path.write_text(text.format(n="9" * 5000))
    assert cli("spec", "validate", path) == 1
    assert cli("train", path, "--data", synthetic_store, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"big{suffix}" in err and "digits" in err and "Traceback" not in err and "set_int_max" not in err


def test_deep_nesting_names_its_line_and_a_large_file_is_no_alias_bomb(tmp_path):
    (tmp_path / "deep.yaml").write_text("encoders: [{name: a, type: features, dim: 3}]\nx:\n" +
                                        "".join("  " * i + "- \n" for i in range(1, 500)))
    with pytest.raises(SpecError, match=r"nest more than 64 deep(.|\n)*line \d+"):
        load_spec(tmp_path / "deep.yaml")
    (tmp_path / "deep.json").write_text('{"x": ' + "[" * 500 + "]" * 500 + "}")
    with pytest.raises(SpecError, match="nest more than 64 deep"):
        load_spec(tmp_path / "deep.json")
    (tmp_path / "many.yaml").write_text("encoders:\n" + "".join(f"  - {{name: e{i}, type: features, dim: 3}}\n"
                                                                for i in range(15_000)))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "many.yaml")
    assert "alias" not in str(info.value) and "more than 100,000 nodes" in str(info.value)


def test_spec_resolve_measures_a_huge_model_without_allocating_it(tmp_path, capsys):
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump({
        "latent_dim": 65536, "projector": {"hidden": 1048576},
        "encoders": [{"name": n, "type": "features", "dim": 1048576} for n in "ab"]}))
    (tmp_path / "timm.yaml").write_text(yaml.safe_dump({"encoders": [
        {"name": "a", "type": "features", "dim": 3},
        {"name": "img", "type": "timm", "model": "resnet18", "img_size": [8192, 8192], "run": "on_demand"}]}))
    assert cli("spec", "resolve", tmp_path / "huge.yaml") == 0
    assert "# cost per sample (GFLOPs):" in capsys.readouterr().out
    assert cli("spec", "resolve", tmp_path / "timm.yaml") == 0
    out = capsys.readouterr().out
    assert "img" in out.split("# cost per sample (GFLOPs):")[1] and "(measured)" in out


def test_costs_whose_total_is_not_finite_are_refused():
    spec = owned_spec()
    spec["encoders"][1]["cost_gflops"] = spec["encoders"][2]["cost_gflops"] = 1.0e308
    with pytest.raises(SpecError, match="add up to more than a float holds"):
        load_spec(spec)


# --- 6: Budget validates itself -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: Budget.parse(10**400), "too large"),
    (lambda: Budget(share="abc"), "expected a number"),
    (lambda: Budget(share=0.4, mean=True, threshold=float("nan")), "never NaN"),
    (lambda: Budget(share=0.4, mean="yes"), "True or False"),
    (lambda: Budget(gflops=True), "expected a number"),
    (lambda: Budget.parse("1e999"), "expected GFLOPs"),
])
def test_a_budget_refuses_bad_values_itself(make, message):
    with pytest.raises(FusionkitError, match=message):
        make()


def test_a_fitted_threshold_of_infinity_still_means_nothing_on_demand():
    assert Budget(share=0.1, mean=True, threshold=float("inf")).threshold == float("inf")


# --- 7, 15: presets ---------------------------------------------------------------------------------------------------

def preset_plugin(name, losses, **kwargs):
    import fusionkit

    class Plugin:
        @fusionkit.hookimpl
        def register_distill_presets(self, register):
            register(name, losses, **kwargs)

    return Plugin()


def test_a_preset_with_no_description_and_bare_loss_names_registers():
    from fusionkit.plugins import get_registry, register_plugin

    register_plugin(preset_plugin("pairs", ["vrd", "xrd"], description=None), "pairs-plugin")
    preset = get_registry().preset("PAIRS")
    assert preset.description == "" and [b["type"] for b in preset.losses] == ["vrd", "xrd"]


@pytest.mark.parametrize("name, losses, message", [
    ("mine", [{"type": "nope"}], "unknown distillation loss 'nope'"),
    ("loop", ["loop"], "the preset itself"),
    ("opts", [{"type": "vrd", "bogus": 1}], "bogus"),
    ("CLIP-KD", ["vrd"], "built-in name"),
    ("  ", ["vrd"], "non-blank"),
    ("VRD", ["xrd"], "the name of a distillation loss"),
])
def test_a_bad_preset_is_refused_at_registration_naming_its_plugin(name, losses, message):
    from fusionkit.errors import PluginError
    from fusionkit.plugins import register_plugin

    with pytest.raises(PluginError, match=message) as info:
        register_plugin(preset_plugin(name, losses), "bad-preset-plugin")
    assert "bad-preset-plugin" in str(info.value)


def test_an_unknown_preset_names_the_plugins_that_failed_to_load(fake_dist, monkeypatch):
    from fusionkit.plugins import get_registry

    fake_dist("broken-presets", "raise ImportError('no such thing')\n")
    spec = {"towers": {"a": {"encoders": ["x"]}, "b": {"encoders": ["y"]}},
            "encoders": [{"name": "x", "type": "features", "dim": 3}, {"name": "y", "type": "features", "dim": 3}],
            "distill": {"teacher": "t", "preset": "theirs"}}
    with pytest.raises(SpecError, match=r"failed to load(.|\n)*broken"):
        load_spec(spec, registry=get_registry())


# --- 16: the schema accepts what validate accepts -----------------------------------------------------------------------

def schema_validate(data):
    import jsonschema

    from fusionkit.plugins import get_registry
    from fusionkit.spec.schema import spec_schema

    jsonschema.validate(data, spec_schema(get_registry()))


@pytest.mark.parametrize("extra", [{"distill": None}, {"towers": {}}, {"towers": None}, {"gate": "attention"},
                                   {"decoder": "blemore"}])
def test_the_schema_accepts_valid_specs_it_refused(extra):
    spec = {"encoders": [{"name": "a", "type": "features", "dim": 3}], **extra}
    load_spec(spec)
    schema_validate(spec)


def test_the_docs_reference_block_and_resolved_specs_pass_the_schema():
    import re
    from pathlib import Path

    from fusionkit.spec.yaml_reader import load_yaml

    docs = Path(__file__).resolve().parents[1] / "docs"
    checked = 0
    for page in sorted(docs.glob("*.md")):
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S):
            try:
                data = load_yaml(block)
                spec = load_spec(data) if isinstance(data, dict) and "encoders" in data else None
            except (yaml.YAMLError, SpecError):
                continue
            if spec is None:
                continue
            schema_validate(data)
            schema_validate(spec.to_dict())
            checked += 1
    assert checked >= 3


def test_the_schema_knows_the_numeric_ranges_of_the_configs():
    import jsonschema

    spec = {"encoders": [{"name": "a", "type": "features", "dim": 3}], "gate": {"type": "attention", "top_n": 0}}
    with pytest.raises(SpecError):
        load_spec(spec)
    with pytest.raises(jsonschema.ValidationError):
        schema_validate(spec)
    spec["gate"] = {"type": "attention", "top_n": 2, "noise": -1.0}
    with pytest.raises(jsonschema.ValidationError):
        schema_validate(spec)
