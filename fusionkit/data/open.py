"""A spec's data, opened: the feature store it trains on, and the raw manifest of its live encoders.

``spec_store(spec, data, raw)`` is what ``fusionkit train``, ``evaluate``, ``predict`` and a
distillation teacher's cache open: the store's encoders checked against the spec's feature sizes,
its labels against the spec's, the spec's NaN policy applied, and the manifest attached.
"""

from __future__ import annotations

import os

from fusionkit.data.raw import is_manifest, live_encoder_names, manifest_store, read_manifest
from fusionkit.data.store import FeatureStore, open_store
from fusionkit.errors import DataError
from fusionkit.spec import Spec

__all__ = ["spec_store"]


def spec_store(spec: Spec, data: str | os.PathLike, raw: str | os.PathLike | None = None,
               confine: str | os.PathLike | None = None) -> FeatureStore:
    """Open the data of a spec: a feature store (its encoders' feature sizes checked, the spec's NaN policy
    applied), plus the raw manifest ``raw`` for live encoders; or a manifest alone when every encoder is live.
    ``confine``: a folder every input path of the manifest must resolve into."""
    live = live_encoder_names(spec)
    stored = [e.name for e in spec.encoders if e.name not in live]
    if is_manifest(data):
        if raw is not None:
            raise DataError(f"{data}: the data is already a manifest; --raw adds a manifest to a feature store")
        if stored:
            raise DataError(f"{data}: encoder(s) {stored} read stored features: give a feature store as the data and "
                            f"the manifest as --raw {data}")
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
