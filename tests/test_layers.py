"""The layer rules of docs/concepts.md, checked on the code's own imports (an AST walk, imports inside
functions included, so that none can hide a circle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusionkit"

#: Each module's layer; a module imports only modules of its own layer or a lower one.
LAYERS: dict[str, int] = {
    **dict.fromkeys(["errors", "hookspecs", "registry", "plugins", "config", "files", "moved", "progress"], 1),
    **dict.fromkeys(["interfaces", "pooling", "spec", "checkpoint", "blemore", "conditional", "hardware"], 2),
    **dict.fromkeys(["models", "data", "runtime", "export", "inference"], 3),
    **dict.fromkeys(["components"], 4),
    **dict.fromkeys(["training"], 5),
    **dict.fromkeys(["evaluation"], 6),
    **dict.fromkeys(["", "__main__", "cli"], 7),
}
#: Where an import inside a function may name a fusionkit module: the command line and the package's lazy
#: API (so that `fusionkit --help` imports no torch), and the built-ins' registration hooks (likewise).
DEFERRING = {"fusionkit", "fusionkit.components"}
DEFERRING_PACKAGES = ("fusionkit.cli",)
#: What a plugin distribution may import of fusionkit.
PUBLIC = {"fusionkit", "fusionkit.interfaces", "fusionkit.pooling", "fusionkit.config", "fusionkit.errors",
          "fusionkit.files", "fusionkit.runtime.images"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    rest = module.split(".")[1:] if "." in module else [""]
    key = rest[0]
    assert key in LAYERS, f"{module}: no layer assigned; add it to LAYERS (and the map in docs/concepts.md)"
    return LAYERS[key]


def imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(imported fusionkit module, line, inside a function) of every import in the file (TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, inner) for a in child.names if a.name.split(".")[0] == "fusionkit")
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "fusionkit":
                for alias in child.names:  # `from fusionkit import config` imports the module fusionkit.config
                    full = f"{child.module}.{alias.name}"
                    out.append((full if (PACKAGE / Path(*full.split(".")[1:])).with_suffix(".py").exists()
                                or (PACKAGE / Path(*full.split(".")[1:]) / "__init__.py").exists() else child.module,
                                child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return out


def package_graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p, ROOT): imports(p, module_name(p, ROOT)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)}) at line {line}"
              for m, deps in package_graph().items() for t, line, _ in deps if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_package_has_no_import_circle():
    graph = {m: {t for t, _, _ in deps if t != m} for m, deps in package_graph().items()}
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            found = walk(nxt)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        circle = walk(start)
        assert circle is None, " -> ".join(circle)


def test_imports_inside_functions_only_defer_heavy_work_where_allowed():
    hidden = [f"{m}: line {line} imports {t} inside a function" for m, deps in package_graph().items()
              if m not in DEFERRING and not m.startswith(DEFERRING_PACKAGES) for t, line, inner in deps if inner]
    assert hidden == []


def test_the_command_line_imports_no_numpy_or_torch_to_build_its_parser():
    """Each command module defers what its handler needs, so that `fusionkit --help` stays fast."""
    import subprocess
    import sys

    code = ("import sys, fusionkit.cli; fusionkit.cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'torch', 'yaml', 'attrs'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_package_root_holds_only_the_foundation_and_layer_6_lives_in_its_folder():
    """Layers 1-2 (what plugins import, and the core) sit at the root; the commands live in fusionkit/cli/."""
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert [m for m in root if LAYERS.get(m, 99) > 2] == []
    assert [m for m, layer in LAYERS.items() if layer == max(LAYERS.values())] == ["", "__main__", "cli"]
    assert (PACKAGE / "cli" / "__init__.py").is_file()


@pytest.mark.parametrize("rule, source, forbidden", [
    ("data/ imports neither components/ nor training/", "fusionkit.data", ("fusionkit.components", "fusionkit.training")),
    ("components/ import no training/ module", "fusionkit.components", ("fusionkit.training",)),
    ("models/ do not read data/", "fusionkit.models", ("fusionkit.data",)),
    ("the checkpoint format never builds a model", "fusionkit.checkpoint", ("fusionkit.models",)),
])
def test_named_layer_rules(rule, source, forbidden):
    broken = [f"{m} imports {t}" for m, deps in package_graph().items() if m == source or m.startswith(source + ".")
              for t, _, _ in deps if t.startswith(forbidden)]
    assert broken == [], rule


def test_plugins_import_only_public_modules():
    broken = []
    for path in sorted((ROOT / "plugins").glob("*/*/*.py")):
        if "build" in path.parts:
            continue
        broken += [f"{path.relative_to(ROOT)}:{line} imports {t}" for t, line, _ in imports(path, "")
                   if t not in PUBLIC]
    assert broken == []


def test_public_modules_declare_all():
    missing = [module_name(p, ROOT) for p in sorted(PACKAGE.rglob("*.py"))
               if not p.name.startswith("_") and "__all__" not in p.read_text(encoding="utf-8")
               and "moved_names(__name__" not in p.read_text(encoding="utf-8")]
    assert missing == []


FOLDERS = sorted(key for key in LAYERS if key and (PACKAGE / key / "__init__.py").is_file())
ROOT_MODULES = sorted(key for key in LAYERS if key and key not in FOLDERS and key != "__main__")


def _modules_of(folder: str) -> set[str]:
    """A folder's modules and sub-packages."""
    return ({p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"}
            | {p.parent.name for p in (PACKAGE / folder).glob("*/__init__.py")})


def test_layers_covers_every_module_and_folder():
    on_disk = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | set(FOLDERS)
    assert on_disk == set(LAYERS) - {""}


def test_the_maintainers_layer_table_matches_the_code():
    """Each row of docs/maintainers.md's table names exactly its layer's root modules, folders and their modules."""
    text = (ROOT / "docs" / "maintainers.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d)\. [^|]+\| ([^|]+) \|", text, re.M)
    assert [int(n) for n, _ in rows] == sorted(set(LAYERS.values()))
    for number, cell in rows:
        layer = int(number)
        folders = dict(re.findall(r"`(\w+)/` \(([^)]*)\)", cell))
        root = set(re.findall(r"`(\w+)`", re.sub(r"`\w+/` \([^)]*\)", "", cell)))
        assert root == {m for m in ROOT_MODULES if LAYERS[m] == layer}, f"layer {layer}: root modules"
        assert set(folders) == {f for f in FOLDERS if LAYERS[f] == layer}, f"layer {layer}: folders"
        for folder, listed in folders.items():
            assert set(re.findall(r"`(\w+)`", listed)) == _modules_of(folder), f"layer {layer}: {folder}/"


def test_the_readme_layout_names_every_folder_and_root_module():
    block = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    folders = re.findall(r"^fusionkit/(\w+)/", block, re.M)
    assert sorted(folders) == FOLDERS
    root_text = "\n".join(line for line in block.splitlines() if not re.match(r"fusionkit/\w+/|plugins/|tests/", line))
    named = set(re.findall(r"\b(\w+)\b", root_text))
    assert [m for m in ROOT_MODULES if m not in named] == []


def test_the_package_root_holds_at_most_14_modules():
    """The plugin API and the foundation; everything else lives in a folder named for what it is."""
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 14, root


def test_no_function_in_the_package_is_over_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []
