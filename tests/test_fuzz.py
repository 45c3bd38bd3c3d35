"""Property-based fuzzing: random specs, stores and checkpoints give fusionkit errors naming a
path or file, never raw tracebacks, and a model that builds predicts finite probabilities.

``FUSIONKIT_FUZZ_EXAMPLES`` sets the number of random specs (stores and checkpoints get a
third each); the suite's default keeps it quick.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import signal

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionkit.data.store import Sample, open_store, write_store
from fusionkit.errors import CheckpointError, DataError, FusionkitError, SpecError
from fusionkit.models.factory import build_model, load_model

EXAMPLES = int(os.environ.get("FUSIONKIT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

BASE = {
    "labels": ["ang", "disg", "fea", "hap", "sad", "neu"],
    "latent_dim": 16,
    "encoders": [{"name": "a", "type": "features", "dim": 5},
                 {"name": "b", "type": "features", "dim": 3, "pooling": "stats7"},
                 {"name": "c", "type": "features", "dim": 4, "pooling": "attention"}],
    "projector": {"hidden": 0, "dropout": 0.1, "norm": True},
    "gate": {"type": "attention", "top_n": 2, "heads": 2, "temperature": 1.0, "noise": 0.0},
    "fusion": {"type": "rank_concat"},
    "heads": {"presence": {"type": "presence"}, "salience": {"type": "salience"}},
    "combiner": {"type": "product"},
    "decoder": {"type": "presence_salience"},
    "train": {"epochs": 2, "lr": 1e-3, "seed": 0},
}

NAMES = ["a", "x", "a.b", "keys", "training", "", "x y", "../up", "é", "forward", "A1-b_c"]
TYPES = ["features", "attention", "mlp", "static", "uniform", "weighted_sum", "rank_concat", "rank_attention",
         "presence", "salience", "classifier", "product", "mean", "salience_only", "presence_only", "blemore",
         "presence_salience", "mmd", "coral", "dann", "entropy", "nope"]
KEYS = ["top_n", "temperature", "noise", "heads", "layers", "dim", "pooling", "hidden", "dropout", "gamma",
        "threshold", "on", "weight", "warmup_epochs", "balance_weight", "supervision", "type", "name", "lr",
        "seed", "epochs", "batch_size", "norm", "labels", "neutral", "latent_dim", "bogus"]
PLAUSIBLE = [1, 2, 3, 4, 6, 8, 0, 0.0, 0.5, 1.0, 2.0, True, False, "none", "mean", "stats7", "attention", "fused",
             "encoders", "neu", "product", "mean", "blemore", "rank_attention", "uniform", "static", "mlp",
             ["ang", "neu"], ["a", "b", "c"], None]
wild = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 7, 64, 2**20 + 1, 10**9, 10**20, 1e9, 1e20]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(NAMES + TYPES + ["none", "mean", "stats7", "fused", "encoders", "neu"]),
    st.none(), st.booleans(),
    st.lists(st.sampled_from(["ang", "neu", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(KEYS), st.integers(-2, 4), max_size=2),
)
values = st.one_of(st.sampled_from(PLAUSIBLE), st.sampled_from(PLAUSIBLE), wild)  # two thirds plausible


def paths(node, prefix=()):
    """Every (path, container) where a value can be replaced or a key added."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        if isinstance(child, (dict, list)):
            yield from paths(child, (*prefix, key))


@st.composite
def specs(draw):
    spec = copy.deepcopy(BASE)
    # first a valid combination of components, then a few mutations that may break it
    gate = draw(st.sampled_from(["attention", "mlp", "static", "uniform"]))
    spec["gate"] = {"type": gate, "top_n": draw(st.integers(1, 4)), **({"heads": 2} if gate == "attention" else {})}
    spec["fusion"]["type"] = draw(st.sampled_from(["weighted_sum", "rank_concat", "rank_attention"]))
    spec["combiner"]["type"] = draw(st.sampled_from(["product", "mean", "salience_only", "presence_only"]))
    spec["decoder"]["type"] = draw(st.sampled_from(["blemore", "presence_salience"]))
    spec["labels"] = list(draw(st.sampled_from([BASE["labels"], ["x", "y"], ["p", "q", "neu"]])))
    if "neu" not in spec["labels"]:
        spec["neutral"] = None
    for enc in spec["encoders"]:
        enc["pooling"] = draw(st.sampled_from(["none", "mean", "stats7", "attention"]))
    if draw(st.booleans()):
        spec["adaptation"] = [{"type": draw(st.sampled_from(["mmd", "coral", "dann", "entropy"])), "on": "encoders"}]
    for _ in range(draw(st.integers(0, 3))):
        targets = list(paths(spec))
        _, node = targets[draw(st.integers(0, len(targets) - 1))]
        if isinstance(node, dict):
            own = node and draw(st.integers(0, 3)) > 0  # mostly an existing key, sometimes any known option name
            key = draw(st.sampled_from(sorted(node, key=str) if own else KEYS))
            node[key] = copy.deepcopy(draw(values))
        elif node:
            node[draw(st.integers(0, len(node) - 1))] = copy.deepcopy(draw(values))
    return spec


def mutate(doc, draw, pool, rounds, delete=False):
    """Replace (or, with ``delete``, sometimes remove) a random entry of ``doc``, ``rounds`` times."""
    for _ in range(rounds):
        targets = list(paths(doc))
        _, node = targets[draw(st.integers(0, len(targets) - 1))]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if delete and draw(st.booleans()):
                del node[key]
            else:
                node[key] = copy.deepcopy(draw(pool))  # a copy: later rounds must not edit the pool's values
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = copy.deepcopy(draw(pool))


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Fail an example that runs past ``seconds`` (a hang on a FIFO, a runaway expansion) instead of hanging."""
    def hung(*_):
        raise TimeoutError(f"{what} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


#: Stores and checkpoints: a third as many examples as specs.
FILE_FUZZ = settings(max_examples=max(20, EXAMPLES // 3), deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


PROBLEM = re.compile(r"^(spec|[A-Za-z_][\w\-]*(\[\d+\])?(\.[^\s:]+)*): ")


def inputs_for(model, batch=3):
    out = {}
    for name, enc in model.encoders.items():
        dim = getattr(enc, "dim", 4)
        pooled = getattr(enc, "pooling", "none") != "none"
        out[name] = torch.randn(batch, 5, dim) if pooled else torch.randn(batch, dim)
    return out


@functools.cache
def SCHEMA():  # noqa: N802 - a constant, built once the plugins are loaded
    from fusionkit.plugins import get_registry
    from fusionkit.spec.schema import spec_schema

    return spec_schema(get_registry())


@FUZZ
@given(specs())
def test_random_specs_give_path_naming_errors_or_finite_predictions(spec):
    try:
        model = build_model(spec)
    except SpecError as exc:
        assert exc.problems and all(PROBLEM.match(p) for p in exc.problems), exc.problems
        assert len(str(exc)) < 40_000
        return
    except FusionkitError as exc:
        assert re.match(r"^[\w\[\].]+: ", str(exc)), str(exc)  # names the block that failed to build
        return
    jsonschema.validate(spec, SCHEMA())  # valid for validate means valid for the schema
    try:
        preds = model.predict(inputs_for(model))
        out = model(inputs_for(model))
    except FusionkitError:
        return
    assert torch.isfinite(out.probs).all()
    assert len(preds) == 3 and all(len(p) in (1, 2) for p in preds)


@FILE_FUZZ
@given(digits=st.integers(1, 6000), depth=st.integers(0, 600), suffix=st.sampled_from([".yaml", ".json", ".toml"]),
       key=st.sampled_from(["latent_dim", "projector", "x"]))
def test_spec_files_with_long_integers_or_deep_nesting_are_refused_naming_the_file(digits, depth, suffix, key,
                                                                                  tmp_path_factory):
    """Integer size and nesting depth: a valid spec, or a SpecError naming the file; never a raw traceback."""
    from fusionkit.spec import load_spec

    number = "7" * digits
    if suffix == ".toml":
        text = f'[[encoders]]\nname = "a"\ntype = "features"\ndim = 3\n[{key}0]\nv = {"[" * depth}{number}{"]" * depth}\n'
    else:
        doc = {"encoders": [{"name": "a", "type": "features", "dim": 3}]}
        value = "[" * depth + number + "]" * depth
        text = json.dumps(doc)[:-1] + f', "{key}": {value}}}'
    path = tmp_path_factory.mktemp("deep") / f"spec{suffix}"
    path.write_text(text)
    with time_limit(30, "loading the spec"):
        try:
            load_spec(path)
        except SpecError as exc:
            assert all(len(p) < 2000 for p in exc.problems), exc.problems
            if digits > 100 or depth > 63:
                assert any(path.name in p for p in exc.problems), exc.problems


# --- stores -------------------------------------------------------------------------------------

LABELS = ["ang", "sad", "hap"]


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzstore") / "store"
    samples = [Sample(id=f"s{i}", labels=[{"emotion": LABELS[i % 3], "salience": 100.0}], group=f"g{i % 2}",
                      fold=i % 2) for i in range(6)]
    seqs = [np.ones((1 + i % 3, 2), dtype=np.float32) for i in range(6)]
    write_store(root, LABELS, samples, {"v": np.zeros((6, 3)), "q": seqs})
    return root


INDEX_VALUES = st.one_of(values, st.sampled_from(["../../outside.safetensors", "/etc/passwd", "v.safetensors",
                                                  [{"emotion": "ang", "salience": 60}], [{"emotion": "x"}],
                                                  {"file": "q.safetensors"}, float("nan")]))


@FILE_FUZZ
@given(data=st.data())
def test_random_store_indexes_give_data_errors(store_template, tmp_path_factory, data):
    import shutil

    root = tmp_path_factory.mktemp("s") / "store"
    shutil.copytree(store_template, root)
    index = json.loads((root / "index.json").read_text())
    mutate(index, data.draw, INDEX_VALUES, data.draw(st.integers(1, 3)), delete=True)
    (root / "index.json").write_text(json.dumps(index))
    try:
        store = open_store(root)
    except DataError as exc:
        assert str(root) in str(exc)  # names the store's file
        return
    for name, feats in store.encoders.items():
        assert feats.data.dim() == 2 and (root / index["encoders"][name]["file"]).resolve().parent == root.resolve()


# --- checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzckpt") / "ckpt"
    build_model(BASE).save_pretrained(str(root))
    return root


@FILE_FUZZ
@given(data=st.data())
def test_random_checkpoint_metadata_and_specs_give_checkpoint_errors(checkpoint_template, tmp_path_factory, data):
    import shutil

    import yaml

    root = tmp_path_factory.mktemp("c") / "ckpt"
    shutil.copytree(checkpoint_template, root)
    which = data.draw(st.sampled_from(["metadata.json", "spec.yaml", "bytes"]))
    if which == "bytes":
        name = data.draw(st.sampled_from(["metadata.json", "spec.yaml"]))
        raw = bytearray((root / name).read_bytes())
        for _ in range(data.draw(st.integers(1, 5))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (root / name).write_bytes(bytes(raw))
    else:
        path = root / which
        doc = json.loads(path.read_text()) if which.endswith(".json") else yaml.safe_load(path.read_text())
        mutate(doc, data.draw, values, data.draw(st.integers(1, 3)))
        path.write_text(json.dumps(doc) if which.endswith(".json") else yaml.safe_dump(doc))
    try:
        model = load_model(root)
    except CheckpointError as exc:
        assert str(root) in str(exc)
        return
    assert torch.isfinite(model(inputs_for(model)).probs).all()


# --- raw manifests: random CSV/JSONL bytes, paths and media files -------------------------------------------------

RAW_EXAMPLES = max(10, EXAMPLES // 6)
RAW_FUZZ = settings(max_examples=RAW_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RAW_LABELS = ["a", "b"]
RAW_SPEC = {"labels": RAW_LABELS, "neutral": None, "latent_dim": 8,
            "encoders": [{"name": "img", "type": "timm", "model": "test_resnet", "in_chans": 1, "img_size": [16, 16],
                          "crop_pct": 1.0}],
            "gate": {"type": "uniform", "top_n": 1}, "fusion": {"type": "weighted_sum"}, "train": {"seed": 0}}
#: What a manifest's path cell can point at; the media files are made in each example's folder.
MEDIA = ["good.png", "bad.png", "bomb.png", "empty.png", "fifo.png", "folder", "missing.png", "../outside.png",
         "/etc/hostname", "link.png", "", "good.png\n", "gööd.png"]
CELLS = st.one_of(st.sampled_from(["a", "b", "a:70;b:30", "a:50;b:50", "c", "a:60;b:30", "[", "", "source", "target",
                                   "Source", "0", "-1", "x", "1.5", "s1", "s1", "\ufeff", '"', "a,b", "a\nb"]),
                  st.text(max_size=8))


@st.composite
def raw_manifests(draw):
    """(name, bytes) of a manifest: well-formed rows with odd cells, or bytes with no structure at all."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(["m.csv", "m.jsonl"])), draw(st.binary(max_size=200))
    columns = ["id", "labels", "img"] + draw(st.lists(st.sampled_from(["group", "fold", "domain", "id", "img", "extra"]),
                                                     max_size=3))
    rows = []
    for i in range(draw(st.integers(1, 6))):
        row = {c: draw(CELLS) for c in columns}
        row["id"] = draw(st.sampled_from([f"s{i}", f"s{i}", "s0", "", f"s{i} "]))
        row["img"] = draw(st.sampled_from(MEDIA))
        rows.append(row)
    if draw(st.booleans()):
        lines = [",".join(columns)] + [",".join(draw(st.sampled_from([v, json.dumps(v)])) for v in r.values())
                                       for r in rows]
        text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n", ",,\n"]))
        prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
        return "m.csv", prefix + text.encode("utf-8", "surrogatepass")
    lines = [json.dumps({**r, **draw(st.sampled_from([{}, {"fold": 1}, {"fold": "x"}, {"labels": [1]}]))}) for r in rows]
    return "m.jsonl", ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


def _media(root):
    import struct
    import zlib

    from PIL import Image

    Image.fromarray((np.arange(16 * 15, dtype=np.uint8).reshape(16, 15))).save(root / "good.png")
    Image.fromarray((np.arange(16 * 15, dtype=np.uint8).reshape(16, 15))).save(root / "gööd.png")
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    (root / "empty.png").write_bytes(b"")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                                    + chunk(b"IEND", b""))
    os.mkfifo(root / "fifo.png")
    (root / "folder").mkdir()
    (root / "link.png").symlink_to(root / "good.png")


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@RAW_FUZZ
@given(manifest=raw_manifests(), confine=st.booleans())
def test_raw_manifests_fail_cleanly_and_write_only_their_output(manifest, confine, tmp_path_factory):
    import tempfile
    from pathlib import Path

    from fusionkit.data.extract import extract

    outer = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (outer / "outside.png").write_bytes(b"\x89PNG outside")
    root = outer / "data"
    root.mkdir()
    _media(root)
    name, data = manifest
    (root / name).write_bytes(data)
    before = _listing(outer)

    with time_limit(60, "a raw manifest example"):
        try:
            extract(RAW_SPEC, root / name, root / "out", batch_size=2, workers=0, progress=False,
                    confine=root if confine else None)
        except (DataError, FusionkitError) as exc:
            message = str(exc)
            assert str(root / name) in message or "encoder 'img'" in message or str(root / "out") in message, message
            assert "Traceback" not in message
    written = set(_listing(outer)) - set(before)
    assert all(p.startswith(("data/out", "data/out.partial")) for p in written), written
    assert set(before) <= set(_listing(outer))  # nothing removed


# --- sweep space files ------------------------------------------------------------------------------------

SPACE_EXAMPLES = max(10, EXAMPLES // 6)
SPACE_FUZZ = settings(max_examples=SPACE_EXAMPLES, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SWEEP_SPEC = {"latent_dim": 8, "encoders": [{"name": f"enc{k}", "type": "features", "dim": 8} for k in range(3)],
              "gate": {"type": "attention", "top_n": 2, "heads": 2}, "train": {"epochs": 1, "batch_size": 64, "seed": 0}}
SPACE_BASE = {"train.lr": {"float": [1.0e-3, 1.0e-2], "log": True}, "gate.top_n": {"int": [1, 3], "step": 1},
              "latent_dim": {"choices": [8, 16]}, "encoders": {"subset": ["enc0", "enc1"], "min": 1}}
SPACE_KEYS = ["float", "int", "choices", "subset", "log", "step", "min", "train.lr", "gate.top_n", "latent_dim",
              "gate", "train.device", "projector.dropout", "encoders", "nope.deeper", "", "."]
SPACE_VALUES = st.one_of(values, st.sampled_from([0, -1, "abc", 0.5, 1e-9, [1, 2], [2, 1], [1.0e-3, 1.0e-2], [0, 1],
                                                  ["enc0", "enc9"], ["cpu", "cuda"], [[8], 16], {"a": 1}, 10**11,
                                                  [16, 10**11], float("inf"), ["enc0", "enc0"], [], True]))


@st.composite
def space_files(draw):
    """(name, bytes) of a space file: a mutated valid space as YAML, JSON or TOML-ish text, or raw bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return "space.yaml", draw(st.binary(max_size=200))
    if kind == 1:  # aliases, duplicate keys, YAML 1.1 booleans
        return "space.yaml", draw(st.sampled_from([
            b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nlatent_dim: {choices: *e}\n",
            b"latent_dim: {choices: [8]}\nlatent_dim: {choices: [16]}\n",
            b"gate.top_n: {int: [1, 3], log: yes}\n", b"!!python/object/apply:os.system ['true']\n",
            b"train.lr: {float: [1.0e-3, 1.0e-2], step: 1.0e-3}\n", "latent_dim: {choices: [8]} # caf\xe9\n".encode("latin-1")]))
    space = copy.deepcopy(SPACE_BASE)
    mutate(space, draw, SPACE_VALUES, draw(st.integers(0, 3)), delete=True)
    for _ in range(draw(st.integers(0, 2))):
        entry = space.get(draw(st.sampled_from(sorted(space) or ["x"])))
        if isinstance(entry, dict):
            entry[draw(st.sampled_from(SPACE_KEYS))] = copy.deepcopy(draw(SPACE_VALUES))
    if draw(st.booleans()):
        return "space.json", json.dumps(space).encode()
    import yaml

    return "space.yaml", yaml.safe_dump(space, allow_unicode=True).encode()


@SPACE_FUZZ
@given(space=space_files())
def test_random_space_files_are_refused_naming_the_file_or_sweep_within_their_folder(space, synthetic_store,
                                                                                    tmp_path_factory):
    import tempfile
    from pathlib import Path

    from fusionkit.spec import load_spec
    from fusionkit.training.sweep import _candidates, apply_params, load_space, sweep

    outer = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    name, data = space
    (outer / name).write_bytes(data)
    before = _listing(outer)

    with time_limit(120, "a space example"):
        try:
            checked = load_space(outer / name, SWEEP_SPEC)
        except SpecError as exc:
            assert str(outer / name) in str(exc) and len(str(exc)) < 5000, str(exc)
            return
        for key, entry in checked.items():  # every value a trial can take at an extreme makes a valid spec
            for value in _candidates(entry):
                load_spec(apply_params(SWEEP_SPEC, {key: value}, checked))
        summary = sweep(SWEEP_SPEC, synthetic_store, outer / name, 1, outer / "out")
        assert summary["complete"] + summary["pruned"] == 1
    written = set(_listing(outer)) - set(before)
    assert all(p.startswith("out") for p in written), written


# --- damaged BlEmoRE releases -------------------------------------------------------------------------

RELEASE_EXAMPLES = max(10, EXAMPLES // 6)
RELEASE_FUZZ = settings(max_examples=RELEASE_EXAMPLES, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DAMAGE = ["truncate", "bytes", "cell", "delete", "fifo", "folder", "outside-link", "strings", "object", "3d", "empty",
          "width", "npz-keys", "column-twice", "latin1"]
METADATA_CELLS = st.one_of(CELLS, st.sampled_from(["0", "4", "7", "-1", "nan", "ang", "neu", "mix", "70", "x" * 200_000,
                                                   "A101_ang_int1_ver1.mov", "test_0001.mov", "sad", "30.5"]))


@st.composite
def release_damage(draw):
    return [(draw(st.sampled_from(DAMAGE)), draw(st.integers(0, 10**6)), draw(METADATA_CELLS))
            for _ in range(draw(st.integers(1, 3)))]


def _damage(root, outer, how, pick, cell):
    import csv as csv_module

    files = sorted(p for p in root.rglob("*") if p.is_file())
    path = files[pick % len(files)]
    npys = [p for p in files if p.suffix == ".npy"]
    npy = npys[pick % len(npys)] if npys else path
    meta = root / "train_metadata.csv"
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: pick % max(1, path.stat().st_size)])
    elif how == "bytes":
        raw = bytearray(path.read_bytes() or b"\0")
        for k in range(1 + pick % 4):
            raw[(pick * (k + 7)) % len(raw)] = (pick >> k) & 0xFF
        path.write_bytes(bytes(raw))
    elif how == "cell" and meta.is_file():
        try:
            rows = list(csv_module.reader(meta.open(newline="", encoding="utf-8")))
        except (UnicodeDecodeError, csv_module.Error):
            return
        if len(rows) > 1 and rows[0]:
            row = rows[1 + pick % (len(rows) - 1)]
            if row:
                row[pick % len(row)] = cell
            with meta.open("w", newline="", encoding="utf-8", errors="surrogatepass") as fh:
                csv_module.writer(fh).writerows(rows)
    elif how == "delete":
        path.unlink()
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "outside-link":
        path.unlink()
        path.symlink_to(outer / "outside.npy")
    elif how == "strings":
        np.save(npy, np.array([["1", "x"]]))
    elif how == "object":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif how == "3d":
        np.save(npy, np.zeros((2, 2, 2), dtype=np.float32))
    elif how == "empty":
        np.save(npy, np.zeros((0, 3), dtype=np.float32))
    elif how == "width":
        np.save(npy, np.zeros((3, 1 + pick % 6), dtype=np.float32))
    elif how == "npz-keys":
        static = sorted(root.rglob("*_static_features.npz"))
        if static:
            np.savez(static[pick % len(static)], X=np.array(["a", "b"]), names=np.zeros(2))
    elif how == "column-twice" and meta.is_file():
        text = meta.read_bytes().decode("utf-8", "replace").splitlines()
        if text:
            meta.write_text("\n".join([text[0] + ",fold"] + [line + ",0" for line in text[1:]]) + "\n")
    elif how == "latin1" and meta.is_file():
        meta.write_bytes(meta.read_bytes() + "A101_caf\xe9,,,,,,,,,,,0\n".encode("latin-1"))


@RELEASE_FUZZ
@given(damage=release_damage(), aggregate=st.sampled_from(["stats7", "sequences"]))
def test_damaged_blemore_releases_fail_by_file_and_write_only_their_output(damage, aggregate, tmp_path_factory):
    import tempfile
    from pathlib import Path

    from official_release import write_official_release

    from fusionkit.components.datasets import build_dataset

    outer = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    np.save(outer / "outside.npy", np.ones((2, 3), dtype=np.float32))
    root = outer / "release"
    write_official_release(root)
    for how, pick, cell in damage:
        _damage(root, outer, how, pick, cell)
    before = _listing(outer)

    with time_limit(60, "a release example"):
        try:
            store = open_store(build_dataset("blemore", {"root": str(root), "aggregate": aggregate}, outer / "out"))
            assert len(store) > 0
        except DataError as exc:
            message = str(exc)
            assert str(root) in message or "encoder" in message, message
            assert "Traceback" not in message and len(message) < 5000
    written = set(_listing(outer)) - set(before)
    assert all(p.startswith("out") for p in written), written
    assert set(before) <= set(_listing(outer))
