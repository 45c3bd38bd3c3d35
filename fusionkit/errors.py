"""Exceptions fusionkit raises. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


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

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid spec{where} ({len(self.problems)} problem(s)):\n{lines}")


class CheckpointError(FusionkitError):
    """A checkpoint directory is missing, incomplete, tampered with, or needs a missing plugin."""


class DataError(FusionkitError):
    """Input data is malformed: wrong shapes, NaNs, mismatched sample ids, missing files."""
