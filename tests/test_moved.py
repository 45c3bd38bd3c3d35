"""The old import paths of CHANGELOG.md: each still works, warns naming its new home, and is listed there, so that
none goes by accident before the release that removes them."""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from fusionkit import moved

ROOT = Path(__file__).resolve().parents[1]
#: The living modules whose tails keep moved names (their tables fill moved.MOVED_NAMES on import).
WITH_TAILS = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in (ROOT / "fusionkit").rglob("*.py")
                    if re.search(r"^__getattr__ = moved_names\(__name__", p.read_text(encoding="utf-8"), re.M))


def _import_fresh(name: str):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def _moved_names() -> list[tuple[str, str, str]]:
    for module in WITH_TAILS:
        importlib.import_module(module)
    tables = {**moved.MOVED_NAMES, **{m: t for m, t in moved.MOVED_MODULES.items() if isinstance(t, dict)}}
    return [(module, name, new) for module, table in sorted(tables.items()) for name, new in sorted(table.items())]


def test_every_module_with_a_tail_registers_its_table():
    _moved_names()
    assert len(WITH_TAILS) == 9 and set(WITH_TAILS) <= set(moved.MOVED_NAMES)


@pytest.mark.parametrize("old, new", sorted((o, n) for o, n in moved.MOVED_MODULES.items() if isinstance(n, str)))
def test_a_module_that_moved_whole_imports_from_its_old_path_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} moved to {re.escape(new)}; .* {moved.REMOVED_IN}"):
        module = _import_fresh(old)
    target = importlib.import_module(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, at the import; reading names is then quiet
        for name in target.__all__:
            assert getattr(module, name) is getattr(target, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name


def test_every_moved_name_is_found_at_its_old_path_with_a_warning():
    pairs = _moved_names()
    assert len(pairs) >= 20
    for old_module, name, new_module in pairs:
        module = importlib.import_module(old_module)
        with pytest.warns(DeprecationWarning, match=rf"{re.escape(old_module)}\.{name} moved to "
                                                    rf"{re.escape(new_module)}\.{name}"):
            value = getattr(module, name)
        assert value is getattr(importlib.import_module(new_module), name), (old_module, name)


def test_the_plugin_imports_of_the_earlier_docs_still_work():
    """What plugins written from the 0.1 docs import."""
    with pytest.warns(DeprecationWarning):
        from fusionkit.training.distill import DistillConfig
    with pytest.warns(DeprecationWarning):
        from fusionkit.training.adaptation import AdaptationLoss
    from fusionkit.interfaces import AdaptationLoss as new_loss
    from fusionkit.interfaces import DistillConfig as new_config

    assert (DistillConfig, AdaptationLoss) == (new_config, new_loss)


def test_the_changelog_lists_every_old_path_and_when_it_goes():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    import fusionkit

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["version"] == fusionkit.__version__
    assert f"## [{fusionkit.__version__}]" in text and moved.REMOVED_IN in text
    missing = [old for old in moved.MOVED_MODULES if f"`{old}`" not in text]
    missing += [f"{m}.{n}" for m, n, _ in _moved_names() if m not in moved.MOVED_MODULES and f"`{m}.{n}`" not in text
                and not re.search(rf"`{re.escape(m)}\.[^`]*\b{n}\b", text)]
    assert missing == []


def test_a_file_on_disk_always_wins_over_an_old_path():
    """The finder answers only the paths of the table, after every real finder."""
    finders = list(sys.meta_path)
    assert finders.count(moved._FINDER) == 1
    assert finders.index(importlib.machinery.PathFinder) < finders.index(moved._FINDER)
    assert moved._FINDER.find_spec("fusionkit.spec", None) is None
    for old in moved.MOVED_MODULES:
        parts = old.split(".")[1:]
        assert not (ROOT / "fusionkit" / Path(*parts)).with_suffix(".py").exists(), old
