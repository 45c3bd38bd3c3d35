"""Exceptions fusionkit raises. Every message says what was wrong, where, and what to do."""

from __future__ import annotations

__all__ = ["FusionkitError", "PluginError", "DuplicateComponentError", "UnknownComponentError", "SpecError",
           "CheckpointError", "DataError", "FusionkitWarning", "NO_TORCH", "torch_installed", "require_torch"]


class FusionkitError(Exception):
    """Base class of every error fusionkit raises on purpose."""


class PluginError(FusionkitError):
    """A plugin could not be loaded or registered (raised in strict mode)."""


class DuplicateComponentError(PluginError):
    """Two plugins provide the same component name of one kind."""


class UnknownComponentError(FusionkitError):
    """A spec or a call names a component no installed plugin provides."""


class SpecError(FusionkitError):
    """A spec is invalid. ``problems`` lists every problem, each naming its path."""

    #: At most this many problems, each at most this many characters, are kept: a hostile
    #: document must not turn into megabytes of error text.
    MAX_PROBLEMS = 50
    MAX_PROBLEM_CHARS = 500

    def __init__(self, problems: list[str], source: str | None = None):
        total = len(problems)
        kept = [p if len(p) <= self.MAX_PROBLEM_CHARS else p[: self.MAX_PROBLEM_CHARS] + " ..."
                for p in list(problems)[: self.MAX_PROBLEMS]]
        if total > len(kept):
            kept.append(f"... and {total - len(kept)} more problem(s)")
        self.problems = kept
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid spec{where} ({total} problem(s)):\n{lines}")


class CheckpointError(FusionkitError):
    """A checkpoint directory is missing, incomplete, tampered with, or needs a missing plugin."""


class DataError(FusionkitError):
    """Input data is malformed: wrong shapes, NaNs, mismatched sample ids, missing files."""


class FusionkitWarning(UserWarning):
    """Something the user should know that does not stop the command."""


#: What to do where a part of fusionkit that needs PyTorch is used and torch is not installed (it is an extra, so
#: that ``pip install 'fusionkit[runtime]'`` deploys without it).
NO_TORCH = ("this needs PyTorch, which is not installed here: pip install 'fusionkit[torch]' (or first the torch build "
            "for your CUDA version, https://pytorch.org/get-started); an export runs without it (fusionkit-runtime)")


def torch_installed() -> bool:
    """Whether PyTorch can be imported here (looked up, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # a torch module without a spec: present
        return True


def require_torch(package: str) -> None:
    """Raise :class:`ModuleNotFoundError` naming ``package`` and saying how to install PyTorch, where it is missing:
    the first line of a package that needs torch, so that importing it never ends in a bare "No module named
    'torch'"."""
    if not torch_installed():
        raise ModuleNotFoundError(f"{package}: {NO_TORCH}", name="torch")
