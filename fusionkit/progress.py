"""Progress bars on long work (epochs, extraction): tqdm when shown, a silent stand-in otherwise, with
the same methods, so callers never branch on whether a bar is shown."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress_bar"]


class _Silent:
    """A bar that shows nothing: iterates like its iterable, and ignores updates."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable if iterable is not None else ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool, desc: str, unit: str, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand) when ``enabled`` and the output is a terminal or a
    notebook (``disable=None``: tqdm's own test), else a silent stand-in."""
    if not enabled:
        return _Silent(iterable)
    from tqdm.auto import tqdm  # deferred: fusionkit --help never pays for it

    return tqdm(iterable, desc=desc, unit=unit, disable=None, **kwargs)
