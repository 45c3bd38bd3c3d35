"""The plugin system: entry points, failures, strict mode, allow/block lists, duplicates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit import build_model, plugins
from fusionkit.errors import DuplicateComponentError, FusionkitError, PluginError, SpecError, UnknownComponentError
from fusionkit.spec import load_spec

BROKEN = "raise RuntimeError('boom: this plugin cannot be imported')\n"
BAD_REGISTER = """
import fusionkit
@fusionkit.hookimpl
def register_gates(register):
    register("half_gate", object, config=dict, description="config is not an attrs class")
"""
GOOD = """
import attrs, fusionkit
@attrs.frozen
class Cfg:
    pass
@fusionkit.hookimpl
def register_combiners(register):
    register("{name}", lambda config, context: None, config=Cfg, description="test combiner")
"""


def test_builtins_register_through_the_plugin_hooks():
    state = plugins.load_plugins()
    builtin = state.manager.get_plugin("fusionkit")
    assert builtin is not None and builtin.__name__ == "fusionkit.components"
    reg = state.registry.get("gate", "attention")
    assert reg.provider.distribution == "fusionkit"
    assert reg.provider.version


def test_template_plugin_is_found_through_its_entry_point_alone():
    reg = plugins.get_registry().get("encoder", "example_mlp")
    assert reg.provider.distribution == "fusionkit-example-encoder"
    assert reg.provider.version == "0.1.0"
    assert reg.provider.plugin == "example_encoder"
    assert reg.factory.__module__ == "fusionkit_example_encoder"


def test_template_encoder_can_be_named_validated_and_built():
    import torch

    spec = load_spec({
        "latent_dim": 16,
        "encoders": [{"name": "x", "type": "example_mlp", "dim": 10, "out_dim": 8}, {"name": "y", "type": "features", "dim": 3}],
    })
    assert spec.encoders[0].config.hidden == 64
    model = build_model(spec)
    assert model.encoders["x"].out_dim == 8
    out = model({"x": torch.randn(5, 10), "y": torch.randn(5, 3)})
    assert out.probs.shape == (5, 6)
    with pytest.raises(SpecError) as err:
        load_spec({"encoders": [{"name": "x", "type": "example_mlp", "dim": 10, "hiden": 3}]})
    assert "encoders[0].hiden" in str(err.value) and "hidden" in str(err.value)


def test_a_plugin_whose_import_raises_is_reported_and_skipped(fake_dist):
    fake_dist("fk-broken", BROKEN)
    state = plugins.load_plugins()
    failed = {p.name: p for p in state.failed}
    assert "fk_broken" in failed
    assert failed["fk_broken"].distribution == "fk-broken"
    assert "boom" in failed["fk_broken"].error and "import failed" in failed["fk_broken"].error
    # the others keep working
    assert ("encoder", "example_mlp") in state.registry
    assert ("gate", "attention") in state.registry


def test_strict_mode_turns_a_broken_plugin_into_an_error(fake_dist, monkeypatch):
    fake_dist("fk-broken", BROKEN)
    monkeypatch.setenv("FUSIONKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="fk_broken.*boom"):
        plugins.load_plugins()


def test_a_plugin_whose_registration_fails_leaves_nothing_behind(fake_dist):
    fake_dist("fk-badreg", BAD_REGISTER)
    state = plugins.load_plugins()
    failed = {p.name: p for p in state.failed}
    assert "registration failed" in failed["fk_badreg"].error
    assert ("gate", "half_gate") not in state.registry
    assert state.manager.get_plugin("fk_badreg") is None


def test_allow_and_block_lists(fake_dist, monkeypatch):
    fake_dist("fk-one", GOOD.format(name="one"))
    fake_dist("fk-two", GOOD.format(name="two"))
    state = plugins.load_plugins()
    assert ("combiner", "one") in state.registry and ("combiner", "two") in state.registry

    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_one")  # names are normalised: fk_one == fk-one
    state = plugins.load_plugins()
    assert ("combiner", "one") in state.registry
    assert ("combiner", "two") not in state.registry
    assert ("encoder", "example_mlp") not in state.registry
    assert ("gate", "attention") in state.registry  # built-ins always load

    monkeypatch.delenv("FUSIONKIT_PLUGINS")
    monkeypatch.setenv("FUSIONKIT_DISABLE_PLUGINS", "fk-two,fusionkit-example-encoder")
    state = plugins.load_plugins()
    assert ("combiner", "one") in state.registry
    assert ("combiner", "two") not in state.registry
    assert ("encoder", "example_mlp") not in state.registry


TWO_NAMES = GOOD + """
@fusionkit.hookimpl
def register_heads(register):
    register("{name}_head", lambda config, context: None, config=Cfg, description="test head")
"""


def test_a_plugin_taking_a_builtin_name_fails_alone(fake_dist):
    fake_dist("fk-dup", TWO_NAMES.format(name="product"))
    state = plugins.load_plugins()
    (failed,) = state.failed
    assert failed.distribution == "fk-dup" and "built-in name" in failed.error and "'product'" in failed.error
    assert state.registry.get("combiner", "product").provider.distribution == "fusionkit"
    assert ("head", "product_head") not in state.registry  # nothing of the failed plugin stays half-registered
    assert ("encoder", "example_mlp") in state.registry


def test_a_clash_between_two_plugins_fails_only_where_the_name_is_used(fake_dist, monkeypatch, capsys):
    from fusionkit.cli import main

    fake_dist("fk-a", TWO_NAMES.format(name="shared").replace('"shared_head"', '"a_head"'))
    fake_dist("fk-b", GOOD.format(name="shared"))
    registry = plugins.get_registry()
    assert not plugins.loaded().failed
    assert registry.get("head", "a_head").provider.distribution == "fk-a"
    assert registry.get("gate", "attention")
    with pytest.raises(DuplicateComponentError) as err:
        registry.get("combiner", "shared")
    message = str(err.value)
    assert "fk-a" in message and "fk-b" in message and "FUSIONKIT_DISABLE_PLUGINS=" in message
    with pytest.raises(SpecError, match="combiner.type: combiner 'shared' is provided by several plugins"):
        load_spec({"encoders": [{"name": "x", "type": "features", "dim": 3}], "combiner": {"type": "shared"}})
    assert main(["plugins"]) == 0
    assert "CONFLICT: combiner 'shared' is provided by fk-a and fk-b" in capsys.readouterr().out

    monkeypatch.setenv("FUSIONKIT_DISABLE_PLUGINS", "fk-b")
    plugins.reset()
    assert plugins.get_registry().get("combiner", "shared").provider.distribution == "fk-a"


def test_misspelled_distribution_names_in_the_environment_warn(monkeypatch):
    from fusionkit.errors import FusionkitWarning

    monkeypatch.setenv("FUSIONKIT_DISABLE_PLUGINS", "fusionkit-exmaple-encoder")
    with pytest.warns(FusionkitWarning, match="FUSIONKIT_DISABLE_PLUGINS names 'fusionkit-exmaple-encoder'"):
        plugins.load_plugins()


def test_a_disabled_component_says_so(monkeypatch):
    monkeypatch.setenv("FUSIONKIT_DISABLE_PLUGINS", "fusionkit-example-encoder")
    with pytest.raises(UnknownComponentError, match="example_mlp' is provided by distribution "
                       "fusionkit-example-encoder, which is installed but disabled"):
        plugins.get_registry().get("encoder", "example_mlp")


def test_unknown_name_lists_close_matches_and_installed_plugins():
    with pytest.raises(UnknownComponentError) as err:
        plugins.get_registry().get("gate", "atention")
    message = str(err.value)
    assert "'attention'" in message and "fusionkit-example-encoder" in message


NO_HEAVY = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('timm', 'transformers'):
            raise ImportError('heavy import of ' + name)
sys.meta_path.insert(0, Block())
from fusionkit.cli import main
code = main(sys.argv[1:])
heavy = [m for m in sys.modules if m.split('.')[0] in ('timm', 'transformers')]
assert not heavy, heavy
print('LOADED', sorted(m for m in sys.modules if m.startswith('fusionkit_')))
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["plugins", "--json"], ["spec", "schema"]])
def test_registering_plugins_imports_no_heavy_dependency(argv):
    proc = subprocess.run([sys.executable, "-c", NO_HEAVY, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fusionkit_timm" in proc.stdout and "fusionkit_transformers" in proc.stdout


def test_building_a_timm_encoder_without_timm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed, whether it is or not
    with pytest.raises(Exception, match=r"pip install 'fusionkit-timm\[timm\]'"):
        build_model({"encoders": [{"name": "img", "type": "timm", "model": "resnet18"}]})


def test_plugins_json_lists_every_plugin(fake_dist):
    root = fake_dist("fk-broken", BROKEN)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "fusionkit", "plugins", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["fusionkit"]["provides"]["gate"] == ["attention", "mlp", "static", "uniform"]
    assert rows["example_encoder"]["version"] == "0.1.0"
    assert rows["example_encoder"]["provides"] == {"encoder": ["example_mlp"]}
    assert "boom" in rows["fk_broken"]["error"]


def test_the_committed_template_is_exactly_what_plugin_new_writes(tmp_path):
    from fusionkit.cli.scaffold import new_plugin

    made = new_plugin("example-encoder", tmp_path, component="example_mlp")
    template = Path(__file__).parents[1] / "plugins" / "fusionkit-example-encoder"
    files = sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["README.md", "fusionkit_example_encoder/__init__.py", "pyproject.toml"]
    for f in files:
        assert (made / f).read_text() == (template / f).read_text(), f


def test_plugin_new_makes_a_clean_distribution_that_registers(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fusionkit", "plugin", "new", "my-encoder", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "fusionkit-my-encoder"
    wheel_dir = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheel_dir), str(root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = wheel_dir.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fusionkit_my_encoder/__init__.py" in names
    assert not [n for n in names if "example" in n]  # nothing of the template's own module ships
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "my_encoder = fusionkit_my_encoder" in zipfile.ZipFile(wheel).read(entry).decode()
    proc = subprocess.run([sys.executable, "-m", "fusionkit", "plugin", "new", "my-encoder", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already exists; nothing was written" in proc.stderr


# --- plugin descriptions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factory, config", [("Gate", "Plain")])
def test_a_gate_that_breaks_the_gate_contract_is_refused_naming_its_plugin(factory, config):
    """A gate is a Gate subclass with a GateConfig: fusionkit reads scouts, reaches_every_encoder and the selection
    options from them, so a gate registered otherwise is refused when a spec names it, not at some later hasattr.
    (A factory function with a GateConfig, 0.1.0's style, still works with a deprecation: tests/test_plugins_010.py.)"""
    import attrs

    from fusionkit.interfaces import Gate, GateConfig

    @attrs.frozen
    class Plain:
        top_n: int = 1

    class Scored(Gate):
        def score(self, tokens, mask):
            return tokens.sum(-1)

    class Contract:
        @fusionkit.hookimpl
        def register_gates(self, register):
            made = (lambda c, ctx: Scored(c)) if factory == "function" else Scored
            register("odd_gate", made, config={"GateConfig": GateConfig, "Plain": Plain}[config])

    fusionkit.register_plugin(Contract(), "contract-test")
    spec = {"latent_dim": 8, "gate": {"type": "odd_gate"}, "encoders": [{"name": "a", "type": "features", "dim": 2}]}
    made = "a function" if factory == "function" else "class Scored"
    with pytest.raises(SpecError, match=rf"gate.type: gate 'odd_gate' \(plugin 'contract-test'\) registers {made} "
                                        rf"with config {config}; a gate "
                                        r"must be a subclass of fusionkit.interfaces.Gate with a config that derives "
                                        r"from GateConfig"):
        load_spec(spec)


def test_plugins_shows_each_registered_description(capsys):
    """`fusionkit plugins` never showed the description= a plugin registers."""
    from fusionkit.cli import main

    assert main(["plugins"]) == 0
    assert "    example_mlp  An MLP over feature vectors." in capsys.readouterr().out
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["example_encoder"]["descriptions"] == {"encoder": {"example_mlp": "An MLP over feature vectors."}}
    assert rows["example_encoder"]["provides"] == {"encoder": ["example_mlp"]}


# --- scaffolding every kind -----------------------------------------------------------------------------


def test_plugin_new_makes_every_kind_and_each_one_works(tmp_path, monkeypatch, capsys):
    """`plugin new` made encoders only, and its hint `pip install NAME` would search the index."""
    import importlib

    import fusionkit
    from fusionkit.cli import main
    from fusionkit.cli.scaffold import PLUGIN_KINDS
    from fusionkit.components.datasets import build_dataset
    from fusionkit.training.train import train

    monkeypatch.syspath_prepend(str(tmp_path))
    for kind in PLUGIN_KINDS:
        name = f"my-{kind.replace('_', '-')}"
        assert main(["plugin", "new", name, "--kind", kind, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"pip install {(tmp_path / f'fusionkit-{name}').resolve()}" in out
        monkeypatch.syspath_prepend(str(tmp_path / f"fusionkit-{name}"))
        module = importlib.import_module(f"fusionkit_{name.replace('-', '_')}")
        fusionkit.register_plugin(module, f"scaffold-{kind}")
    store = build_dataset("my_dataset", {"samples": 120}, tmp_path / "store")
    teacher = {"labels": ["low", "high"], "neutral": None, "latent_dim": 8,
               "encoders": [{"name": "features", "type": "my_encoder", "dim": 8},
                            {"name": "more", "type": "features", "dim": 8}],
               "train": {"epochs": 2, "batch_size": 32}}
    with pytest.raises(FusionkitError):  # the store has one encoder: 'more' is missing there
        train(teacher, store, tmp_path / "bad", fold=0, progress=False)
    teacher["encoders"] = teacher["encoders"][:1]
    train(teacher, store, tmp_path / "teacher", fold=0, progress=False)
    student = {**teacher, "gate": {"type": "my_gate", "top_n": 1}, "fusion": {"type": "my_fusion"},
               "heads": {"salience": {"type": "my_head"}}, "combiner": {"type": "my_combiner"},
               "decoder": {"type": "my_decoder"}, "adaptation": [{"type": "my_adaptation_loss", "weight": 0.1}],
               "distill": {"teacher": str(tmp_path / "teacher" / "best"), "losses": [{"type": "my_distill_loss"}]}}
    target = build_dataset("my_dataset", {"samples": 40, "seed": 1}, tmp_path / "target")
    metrics = train(student, store, tmp_path / "student", fold=0, progress=False, target=target)
    log = json.loads((tmp_path / "student" / "log.jsonl").read_text().splitlines()[0])
    assert {"distill_my_distill_loss"} <= set(log) and metrics["test"]["n"] > 0
    demand = {**teacher, "encoders": [*teacher["encoders"], {"name": "more", "type": "features", "dim": 8,
                                                             "run": "on_demand", "cost_gflops": 1.0}],
              "conditional": {"scout": {"type": "my_scout", "hidden": 8}}}
    model = fusionkit.build_model(demand).eval()
    with torch.no_grad():
        out = model({"features": torch.randn(6, 8), "more": torch.randn(6, 8)}, budget="100%")
    assert type(model.scout).__name__ == "MyScout" and out.ran.shape == (6, 2)


# --- distillation presets ----------------------------------------------------------------------------------


def _preset_plugin(name, losses):
    class Presets:
        @fusionkit.hookimpl
        def register_distill_presets(self, register):
            register(name, losses, description="A test preset.")

    return Presets()


def test_a_plugin_registers_a_distillation_preset_that_a_spec_names(capsys):
    from fusionkit.cli import main

    losses = [{"type": "rkd"}, {"type": "fd", "weight": 5.0}]
    fusionkit.register_plugin(_preset_plugin("relations", losses), "preset-test")
    losses.append({"type": "kd"})  # the registry holds its own copy
    spec = load_spec({"latent_dim": 8, "encoders": [{"name": "a", "type": "features", "dim": 2}],
                      "distill": {"teacher": "t", "preset": "relations", "losses": [{"type": "crd"}]}})
    assert [c.type for c in spec.distill.losses] == ["rkd", "fd", "crd"]
    assert spec.distill.losses[1].config.weight == 5.0
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["preset-test"]["provides"] == {"distill_preset": ["relations"]}
    assert rows["fusionkit"]["provides"]["distill_preset"] == ["clip-kd", "clip-rd"]


def test_a_preset_block_with_a_bad_option_is_named_by_the_preset_and_position():
    """Refused when its plugin registers, naming the plugin, the preset and the block's position."""
    with pytest.raises(PluginError, match=r"typo-test(.|\n)*distillation preset 'typo' \[1\].wieght: unknown option; "
                                          r"did you mean 'weight'"):
        fusionkit.register_plugin(_preset_plugin("typo", [{"type": "rkd"}, {"type": "fd", "wieght": 2.0}]), "typo-test")
    with pytest.raises(SpecError, match=r"distill.preset: expected one of"):
        load_spec({"latent_dim": 8, "encoders": [{"name": "a", "type": "features", "dim": 2}],
                   "distill": {"teacher": "t", "preset": "typo"}})


@pytest.mark.parametrize("name, losses, message", [
    ("clip-rd", [{"type": "rkd"}], "distillation preset 'clip-rd' is a built-in name of fusionkit; plugin 'p-test'"),
    ("", [{"type": "rkd"}], "a distillation preset name must be a non-blank string"),
    ("empty", [], "losses must be a non-empty list of loss blocks"),
    ("untyped", [{"weight": 1.0}], "losses must be a non-empty list of loss blocks, each a dict with a 'type'"),
])
def test_a_bad_preset_registration_is_refused_naming_the_plugin(name, losses, message):
    with pytest.raises(PluginError, match=rf"plugin 'p-test' failed to register: .*{re.escape(message)}"):
        fusionkit.register_plugin(_preset_plugin(name, losses), "p-test")
    assert plugins.get_registry().preset("empty") is None and plugins.get_registry().preset("untyped") is None
