"""Moved: the torchrun + DDP pieces live in :mod:`fusionkit.distributed` (extraction shards a manifest with them
too). This path works, with a DeprecationWarning, until the next release."""

from fusionkit.moved import moved_names

__getattr__ = moved_names(__name__, {name: "fusionkit.distributed" for name in (
    "Dist", "setup", "unused_parameters_possible", "wrap")})
