"""A spec's data, opened: the feature store it trains on, and the raw manifest of its live encoders.

A :class:`DataSource` says where a spec's inputs come from (what ``--data``, ``--raw``, ``--confine`` and
``--target`` name); ``train``, ``cross_validate``, ``evaluate`` and ``predict`` take one. ``spec_store(spec,
data, raw)`` is what they and a distillation teacher's cache open: the store's encoders checked against the
spec's feature sizes, its labels against the spec's, the spec's NaN policy applied, and the manifest attached.
"""

from __future__ import annotations

import os

import attrs

from fusionkit.data.raw import live_encoder_names, manifest_store, read_manifest
from fusionkit.data.store import FeatureStore, open_store
from fusionkit.data.tables import manifest_is_the_data
from fusionkit.errors import DataError
from fusionkit.spec import Spec

__all__ = ["DataSource", "spec_store"]


def _path(value: str | os.PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)


@attrs.frozen
class DataSource:
    """Where a spec's inputs come from.

    ``data``: a feature store directory, or a raw manifest when every encoder is live. ``raw``: the manifest of the
    live encoders' inputs beside the store. ``confine``: a folder every manifest path must resolve into.
    ``target``: an unlabelled target-domain store for adaptation losses (default: the rows of ``data`` whose domain
    is ``target``).
    """

    data: str = attrs.field(converter=os.fspath)
    raw: str | None = attrs.field(default=None, converter=_path)
    confine: str | None = attrs.field(default=None, converter=_path)
    target: str | None = attrs.field(default=None, converter=_path)

    @classmethod
    def of(cls, data: DataSource | str | os.PathLike, raw: str | os.PathLike | None = None,
           confine: str | os.PathLike | None = None, target: str | os.PathLike | None = None) -> DataSource:
        """``data`` if it is a source already (then the others must be None), else a source of the four."""
        if isinstance(data, DataSource):
            given = [name for name, value in (("raw", raw), ("confine", confine), ("target", target)) if value is not None]
            if given:
                raise TypeError(f"{', '.join(given)}: give them in the DataSource, not beside it")
            return data
        return cls(data, raw, confine, target)

    def open(self, spec: Spec) -> FeatureStore:
        """The store of ``spec``'s inputs (see :func:`spec_store`)."""
        return spec_store(spec, self.data, self.raw, self.confine)

    def open_target(self, spec: Spec) -> FeatureStore | None:
        """The target-domain store, or None when the target rows are those of ``data``."""
        return None if self.target is None else spec_store(spec, self.target)


def spec_store(spec: Spec, data: str | os.PathLike, raw: str | os.PathLike | None = None,
               confine: str | os.PathLike | None = None) -> FeatureStore:
    """Open the data of a spec: a feature store (its encoders' feature sizes checked, the spec's NaN policy
    applied), plus the raw manifest ``raw`` for live encoders; or a manifest alone when every encoder is live.
    ``confine``: a folder every input path of the manifest must resolve into."""
    live = live_encoder_names(spec)
    stored = [e.name for e in spec.encoders if e.name not in live]
    if manifest_is_the_data(data, raw, stored):
        return manifest_store(read_manifest(data, spec.labels, confine))
    dims = {e.name: getattr(e.config, "dim", None) for e in spec.encoders if e.name not in live}
    store = open_store(data, dims, nan_policy=spec.data.nan_policy)
    if tuple(store.labels) != tuple(spec.labels):
        neutral = "neu" if "neu" in store.labels else "null"
        raise DataError(f"{store.path}: labels {list(store.labels)} differ from the spec's {list(spec.labels)} (the "
                        f"spec's default is BlEmoRE's). Write them in the spec, in the store's order: "
                        f"`labels: [{', '.join(store.labels)}]` and `neutral: {neutral}` (the label that never blends, "
                        "or null)")
    if raw is not None:
        manifest = read_manifest(raw, spec.labels, confine)
        store.attach_raw(manifest, manifest.rows_for(store.ids, store.path))
    elif live:
        raise DataError(f"encoder(s) {sorted(live)} are live and read raw inputs: give their manifest with --raw "
                        "(see docs/live-encoders.md)")
    return store
