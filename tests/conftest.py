"""Shared fixtures: fresh plugin state per test, and fake installed distributions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from fusionkit import plugins

ENV_VARS = ("FUSIONKIT_PLUGINS", "FUSIONKIT_DISABLE_PLUGINS", "FUSIONKIT_STRICT_PLUGINS")


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
