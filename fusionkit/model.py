"""Moved: fusion models live in :mod:`fusionkit.models.fusion`, ``build_model`` in
:mod:`fusionkit.models.factory`. This path works, with a DeprecationWarning, until the next release."""

from fusionkit.moved import moved_names

__getattr__ = moved_names(__name__, {
    **{name: "fusionkit.models.fusion" for name in (
        "FusionModel", "FusionOutput", "Trunk", "DomainNorm", "Projector", "count_parameters", "decoder_inputs")},
    "build_model": "fusionkit.models.factory",
})
