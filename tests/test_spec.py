"""The spec: strict validation with paths and hints, round trips, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import yaml

from fusionkit import config as cfg
from fusionkit.errors import DataError, SpecError
from fusionkit.spec import dump_spec, load_spec

EXAMPLE = Path(__file__).parents[1] / "fusionkit" / "examples" / "blemore.yaml"


def base(**changes):
    spec = {
        "latent_dim": 32,
        "encoders": [
            {"name": "a", "type": "features", "dim": 8},
            {"name": "b", "type": "features", "dim": 4, "pooling": "stats7"},
            {"name": "c", "type": "features", "dim": 6},
        ],
        "gate": {"type": "attention", "top_n": 2},
    }
    spec.update(changes)
    return spec


def problems_of(data) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_spec(data)
    return err.value.problems


def test_defaults_are_filled():
    spec = load_spec({"encoders": [{"name": "a", "type": "features", "dim": 3}]})
    assert spec.gate.type == "attention" and spec.gate.config.top_n == 2
    assert spec.fusion.type == "rank_concat"
    assert set(spec.heads) == {"presence", "salience"}
    assert spec.labels == ("ang", "disg", "fea", "hap", "sad", "neu") and spec.neutral == "neu"
    assert spec.encoders[0].config.pooling == "none"


def test_wrong_type_names_path_expected_and_found():
    data = base()
    data["encoders"][2]["dim"] = "six"
    (problem,) = problems_of(data)
    assert problem.startswith("encoders[2].dim:")
    assert "expected int" in problem and "'six'" in problem


def test_float_is_not_silently_truncated_to_int():
    data = base()
    data["encoders"][0]["dim"] = 8.5
    (problem,) = problems_of(data)
    assert "encoders[0].dim" in problem and "8.5" in problem


def test_unknown_type_lists_close_matches_and_installed_plugins():
    (problem,) = problems_of(base(gate={"type": "attension"}))
    assert problem.startswith("gate.type:")
    assert "Did you mean 'attention'" in problem
    assert "Installed plugins:" in problem and "fusionkit-example-encoder" in problem


def test_unknown_option_is_an_error_with_a_suggestion():
    (problem,) = problems_of(base(gate={"type": "attention", "tempreature": 2}))
    assert problem.startswith("gate.tempreature:") and "did you mean 'temperature'" in problem


def test_literal_choice_lists_the_choices():
    data = base()
    data["encoders"][1]["pooling"] = "max"
    (problem,) = problems_of(data)
    assert problem.startswith("encoders[1].pooling:") and "stats7" in problem and "'max'" in problem


def test_validator_failure_names_path_and_value():
    (problem,) = problems_of(base(gate={"type": "attention", "top_n": 0}))
    assert problem.startswith("gate.top_n:") and "> 0" in problem and "0" in problem


def test_missing_required_option():
    (problem,) = problems_of({"encoders": [{"name": "a", "type": "features"}]})
    assert problem.startswith("encoders[0].dim:") and "required" in problem


def test_every_problem_is_listed_at_once():
    data = base(latnt_dim=3, fusion={"type": "rank_concat", "out_dim": -1}, heads={"presense": {"type": "presence"}})
    data["encoders"][1]["name"] = "a"
    problems = problems_of(data)
    joined = "\n".join(problems)
    assert len(problems) == 4, problems
    assert "latnt_dim" in joined and "did you mean 'latent_dim'" in joined
    assert "fusion.out_dim" in joined
    assert "heads.presense" in joined
    assert "encoders[1].name" in joined and "already" in joined


def test_specs_cannot_name_import_paths():
    (problem,) = problems_of(base(gate={"type": "os.system"}))
    assert "unknown gate 'os.system'" in problem


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_a_file(tmp_path, suffix):
    spec = load_spec(base(adaptation=[]))
    path = tmp_path / f"spec{suffix}"
    dump_spec(spec, path)
    again = load_spec(path)
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_toml_spec_loads(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(
        'latent_dim = 16\n[[encoders]]\nname = "a"\ntype = "features"\ndim = 3\n[gate]\ntype = "mlp"\ntop_n = 1\n'
    )
    spec = load_spec(path)
    assert spec.gate.type == "mlp" and spec.gate.config.top_n == 1 and spec.latent_dim == 16


def test_parse_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("encoders: [\n")
    with pytest.raises(SpecError, match="broken.yaml"):
        load_spec(path)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_cli_validate_exit_codes(tmp_path, capsys):
    from fusionkit.cli import main

    assert main(["spec", "validate", str(EXAMPLE)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(EXAMPLE.read_text())
    data["encoders"][2]["dim"] = "big"
    data["gate"]["type"] = "atention"
    bad.write_text(yaml.safe_dump(data))
    assert main(["spec", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "encoders[2].dim" in err and "gate.type" in err and "'attention'" in err


def test_cli_schema_covers_installed_components(capsys):
    from fusionkit.cli import main

    assert main(["spec", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    encoder_types = {v["properties"]["type"]["const"] for v in schema["properties"]["encoders"]["items"]["oneOf"]}
    assert {"features", "example_mlp", "timm"} <= encoder_types
    gates = {v["properties"]["type"]["const"]: v for v in schema["properties"]["gate"]["oneOf"] if "properties" in v}
    assert gates["attention"]["properties"]["top_n"]["default"] == 2
    assert gates["attention"]["properties"]["top_n"]["description"]


def test_schema_accepts_the_example_and_rejects_a_bad_spec():
    import jsonschema

    from fusionkit.plugins import get_registry
    from fusionkit.spec.schema import spec_schema

    schema = spec_schema(get_registry())
    data = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.validate(data, schema)
    data["gate"]["top_n"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_precision_written_as_a_number_is_read_as_the_docs_write_it(tmp_path):
    (tmp_path / "spec.yaml").write_text("encoders: [{name: a, type: features, dim: 3}]\ntrain: {precision: 16}\n")
    assert load_spec(tmp_path / "spec.yaml").train.precision == "16"
    (tmp_path / "spec.yaml").write_text("encoders: [{name: a, type: features, dim: 3}]\ntrain: {precision: 32}\n")
    assert load_spec(tmp_path / "spec.yaml").train.precision == "32"
    (tmp_path / "spec.yaml").write_text("encoders: [{name: a, type: features, dim: 3}]\ntrain: {precision: 8}\n")
    with pytest.raises(SpecError, match=r"train.precision: expected one of '32', 'bf16', '16', found 8 \(int\)"):
        load_spec(tmp_path / "spec.yaml")


# --- top-p bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, message", [
    ({"min_n": 3, "max_n": 2}, r"gate.min_n: 3 is more than gate.max_n \(2\)"),
    ({"min_n": 4}, r"gate.min_n: 4 is more than the 3 encoder\(s\) the gate ranks"),
    ({"max_n": 5}, r"gate.max_n: 5 is more than the 3 encoder\(s\) the gate ranks"),
])
def test_top_p_bounds_that_cannot_hold_are_refused(gate, message):
    """min_n > max_n, or > the number of encoders, was accepted and clamped silently."""
    from conftest import tiny_spec

    from fusionkit.errors import SpecError
    from fusionkit.spec import load_spec

    spec = tiny_spec()
    spec["gate"] = {"type": "mlp", "selection": "top_p", "top_p": 0.5, **gate}
    with pytest.raises(SpecError, match=message):
        load_spec(spec)
    spec["gate"] = {"type": "mlp", "selection": "top_p", "top_p": 0.5, "min_n": 2, "max_n": 3}
    load_spec(spec)


# --- lists are strict -----------------------------------------------------------------------------------


def test_a_string_is_not_split_into_a_list_and_bad_items_are_shown(tmp_path, capsys):
    """`--set classes=abc` became ['a','b','c'], and an element's type error hid the value."""
    from fusionkit.cli import main

    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "s"), "--set", "noise=abc"]) == 2
    assert "noise: expected a list (list[float]), found 'abc' (str); write [a, b]" in capsys.readouterr().err
    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "s"), "--set", "noise=[1, abc]"]) == 2
    assert "noise: expected list[float], but item [1] is 'abc' (str), not float" in capsys.readouterr().err
    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "s"), "--set", "noise=[1, 2.5]",
                 "--set", "samples=50"]) == 0
    assert not (tmp_path / "s.partial").exists()


# --- spec and label hints --------------------------------------------------------------------------------


def test_spec_validate_warns_of_a_missing_teacher(tmp_path, capsys):
    """`spec validate` accepted a distill.teacher that does not exist."""
    from fusionkit.cli import main

    spec = {"encoders": [{"name": "a", "type": "features", "dim": 3}],
            "distill": {"teacher": str(tmp_path / "nowhere"), "losses": [{"type": "kd"}]}}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert main(["spec", "validate", str(tmp_path / "s.json")]) == 0
    assert "warning: distill.teacher: " in capsys.readouterr().err


def test_a_label_mismatch_says_which_labels_to_write(tmp_path, uci_source):
    """docs/training.md's command failed on label names with no hint."""
    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.open import spec_store
    from fusionkit.spec import load_spec

    store = build_dataset("uci-mfeat", {"source": uci_source}, tmp_path / "uci")
    spec = load_spec({"encoders": [{"name": "fou", "type": "features", "dim": 76}]})
    with pytest.raises(DataError, match=r"`labels: \[d0, d1, d2, d3, d4, d5\]` and `neutral: null`"):
        spec_store(spec, store)


# --- the declarative spec ----------------------------------------------------------------------------------


def test_the_top_level_keys_are_the_spec_class_fields_and_each_is_documented():
    from fusionkit.spec import TOP_LEVEL_KEYS, Spec

    assert TOP_LEVEL_KEYS == tuple(f.name for f in attrs.fields(Spec))
    assert all(f.metadata.get("doc") for f in attrs.fields(Spec))
    with pytest.raises(SpecError) as exc:
        load_spec(base(lantent_dim=8))
    assert exc.value.problems == [f"lantent_dim: unknown top-level key; did you mean 'latent_dim'? "
                                  f"Keys: {', '.join(TOP_LEVEL_KEYS)}"]


def test_field_problems_and_the_checks_that_relate_fields_are_reported_together():
    """A failing field does not hide a relation check: each check sees the fields that did structure."""
    with pytest.raises(SpecError) as exc:
        load_spec(base(labels=["x", "y"], neutral="z", latent_dim=0, gate={"type": "attention", "selection": "top_p",
                                                                           "min_n": 4}))
    assert sorted(exc.value.problems) == sorted([
        "latent_dim: expected an int in [1, 65536], found 0",
        "neutral: expected one of the labels or null, found 'z'",
        "gate.min_n: 4 is more than the 3 encoder(s) the gate ranks; lower it"])


def test_a_default_block_is_structured_through_the_registry_like_a_written_one():
    spec = load_spec(base())
    assert (spec.gate.type, type(spec.gate.config).__name__) == ("attention", "AttentionGateConfig")
    assert spec.heads["presence"].type == "presence" and spec.fusion.type == "rank_concat"
    tower = load_spec({"labels": ["a", "b"], "neutral": None, "encoders": base()["encoders"][:2],
                       "towers": {"x": {"encoders": ["a"]}, "y": {"encoders": ["b"], "embed_dim": 16}}})
    assert tower.towers["x"].gate.config.top_n == 1 and tower.towers["x"].embed_dim == 128
    assert load_spec(tower.to_dict()) == tower


@attrs.frozen(kw_only=True)
class Inner:
    size: int = cfg.option(1, doc="A size.", validator=cfg.positive)


@attrs.frozen(kw_only=True)
class Outer:
    inner: Inner = cfg.option(factory=Inner, doc="Nested.")
    pair: tuple[int, int] = cfg.option(doc="Two ints.", data_default=[1, 2])


def test_a_path_aware_hook_reports_each_problem_at_its_own_path():
    """fusionkit.config's hooks: inside structure(), where() gives a hook its path; nested attrs classes keep
    their paths and close-match hints (config.nest_attrs)."""
    conv = cfg.nest_attrs(cfg.converter.copy())

    def pair(value, tp):
        path, problems = cfg.where()
        bad = [i for i, v in enumerate(value) if v < 0]
        problems.extend(f"{path}[{i}]: must be >= 0, found {value[i]}" for i in bad)
        if bad:
            raise cfg.Reported
        return tuple(value)

    conv.register_structure_hook_func(lambda tp: tp == tuple[int, int], pair)
    problems: list[str] = []
    assert cfg.structure(Outer, {}, "outer", problems, conv) == Outer(inner=Inner(), pair=(1, 2)) and not problems
    assert cfg.structure(Outer, {"inner": {"sise": 0}, "pair": [-1, -2]}, "outer", problems, conv) is None
    assert problems == ["outer.inner.sise: unknown option; did you mean 'size'? Options of Inner: size",
                        "outer.pair[0]: must be >= 0, found -1", "outer.pair[1]: must be >= 0, found -2"]
    with pytest.raises(RuntimeError, match="call it through fusionkit.config.structure"):
        conv.structure([1, 2], tuple[int, int])


def test_the_schema_covers_every_top_level_key_and_accepts_a_two_tower_spec_with_a_preset():
    import jsonschema

    from fusionkit.plugins import get_registry
    from fusionkit.spec import TOP_LEVEL_KEYS
    from fusionkit.spec.schema import spec_schema

    schema = spec_schema(get_registry())
    assert list(schema["properties"]) == list(TOP_LEVEL_KEYS)
    tower = {"labels": ["a", "b"], "neutral": None, "encoders": [{"name": "a", "type": "features", "dim": 3},
                                                                 {"name": "b", "type": "features", "dim": 3}],
             "towers": {"x": {"encoders": ["a"]}, "y": {"encoders": ["b"], "embed_dim": 16}},
             "distill": {"teacher": "t", "preset": "clip-rd"}, "contrastive": {"temperature": 0.05}}
    jsonschema.validate(tower, schema)
    load_spec(tower)
    for bad in ({"distill": {"teacher": "t", "preset": "clip-xx"}}, {"towers": {"x": {"encoders": ["a"], "size": 1}, "y": {"encoders": ["b"]}}},
                {"encoders": [{"name": "a", "type": "features", "dim": 3, "run": "sometimes"}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**tower, **bad}, schema)
