"""``fusionkit plugin new NAME``: a new, clean plugin distribution from the template.

The repository's ``plugins/fusionkit-example-encoder`` is this command's own output
(``fusionkit plugin new example-encoder --component example_mlp --out plugins``); a test
keeps the two identical. Generating rather than copying means a new plugin never carries
the template's ``build/`` or ``*.egg-info`` folders into its first wheel.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from string import Template

from fusionkit.errors import FusionkitError
from fusionkit.files import make_temp_dir

NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = Template('''\
# A fusionkit plugin, made by `fusionkit plugin new $name`.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "fusionkit plugin: the encoder $component"
requires-python = ">=3.11"
dependencies = ["fusionkit"]

# The one line that makes fusionkit find the plugin: group "fusionkit",
# any entry name, value = the module holding the hook implementations.
[project.entry-points.fusionkit]
$entry = "$module"

[tool.setuptools]
packages = ["$module"]
''')

MODULE = Template('''\
"""A fusionkit plugin: registers the encoder ``$component``.

Keep this module cheap to import: fusionkit imports it to learn what the plugin
provides. Import heavy libraries inside the factory (see ``build``).
"""

from __future__ import annotations

import attrs

import fusionkit
from fusionkit.config import option, positive


@attrs.frozen(kw_only=True)
class ${cls}Config:
    """A two-layer MLP over pre-extracted vectors."""

    dim: int = option(doc="Input feature size.", validator=positive)
    hidden: int = option(64, doc="Hidden layer size.", validator=positive)
    out_dim: int = option(32, doc="Size of the encoded vector.", validator=positive)


def build(config: ${cls}Config, context):
    """Factory: called with the validated config and the build context."""
    from torch import nn

    from fusionkit.interfaces import Encoder

    class ${cls}Encoder(Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.out_dim = config.out_dim
            self.net = nn.Sequential(nn.Linear(config.dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.out_dim))

        def forward(self, x, lengths=None):
            return self.net(x)

    return ${cls}Encoder()


@fusionkit.hookimpl
def register_encoders(register):
    register("$component", build, config=${cls}Config, description="An MLP over feature vectors.")
''')

README = Template('''\
# $dist

A fusionkit plugin: it registers the encoder `$component` (a two-layer MLP over
pre-extracted vectors). It was made by `fusionkit plugin new $name`; fusionkit's guide
`docs/writing-a-plugin.md` walks through making it your own, and covers every component kind.

```bash
pip install ./$dist
fusionkit plugins          # $entry ($dist 0.1.0)  encoder: $component
```

In a spec:

```yaml
encoders:
  - {name: audio, type: $component, dim: 1024, hidden: 128, out_dim: 64}
```
''')


def new_plugin(name: str, out: str | Path = ".", component: str | None = None) -> Path:
    """Write the distribution ``fusionkit-NAME`` under ``out``; returns its directory.

    ``name`` is lower-case words joined by ``-`` (``my-encoder``); ``component`` is the name
    specs write in ``type:`` (default: ``name`` with ``_`` for ``-``).
    """
    if not NAME.match(name):
        raise FusionkitError(f"plugin name {name!r}: use lower-case letters and digits, words joined by '-' "
                             "(e.g. my-encoder)")
    snake = name.replace("-", "_")
    component = component or snake
    if not re.match(r"^[a-z][a-z0-9_]*$", component):
        raise FusionkitError(f"component name {component!r}: use lower-case letters, digits and '_'")
    values = {"name": name, "dist": f"fusionkit-{name}", "module": f"fusionkit_{snake}", "entry": snake,
              "component": component, "cls": "".join(part.title() for part in component.split("_"))}
    target = Path(out) / values["dist"]
    if target.exists():
        raise FusionkitError(f"{target}: already exists; nothing was written. Choose another name or --out.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        (tmp / values["module"]).mkdir()
        (tmp / "pyproject.toml").write_text(PYPROJECT.substitute(values), encoding="utf-8")
        (tmp / values["module"] / "__init__.py").write_text(MODULE.substitute(values), encoding="utf-8")
        (tmp / "README.md").write_text(README.substitute(values), encoding="utf-8")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
