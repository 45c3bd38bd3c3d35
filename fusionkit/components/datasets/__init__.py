"""The built-in datasets, one per module, and :func:`build_dataset`, which builds any registered dataset into a store."""

from __future__ import annotations

import os
from pathlib import Path

from fusionkit import config as cfg
from fusionkit.blemore.answers import RATIOS
from fusionkit.components.datasets.blemore import BlemoreConfig, BlemoreRelease
from fusionkit.components.datasets.cmudict import PHONES, SPELLING, Cmudict, CmudictConfig, read_cmudict
from fusionkit.components.datasets.synthetic import Synthetic, SyntheticConfig
from fusionkit.components.datasets.uci_mfeat import (
    UCI_VIEWS,
    UCI_WHEEL_DIR,
    UciMfeat,
    UciMfeatConfig,
    read_uci_mfeat,
    uci_source,
)
from fusionkit.data.store import write_store
from fusionkit.errors import SpecError
from fusionkit.plugins import get_registry

__all__ = ["UCI_VIEWS", "UCI_WHEEL_DIR", "RATIOS", "UciMfeatConfig", "read_uci_mfeat", "uci_source", "UciMfeat",
           "BlemoreConfig", "BlemoreRelease", "SyntheticConfig", "Synthetic", "build_dataset", "CmudictConfig",
           "Cmudict", "read_cmudict", "SPELLING", "PHONES"]


def build_dataset(name: str, options: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Build the registered dataset ``name`` with ``options`` into a store at ``out``."""
    reg = get_registry().get("dataset", name)
    problems: list[str] = []
    config = cfg.structure(reg.config, options, name, problems)
    if problems:
        raise SpecError(problems)
    dataset = reg.factory(config)
    samples, features = dataset.generate()
    return write_store(out, dataset.labels(), samples, features, overwrite=overwrite)
