"""Moved: two-tower models live in :mod:`fusionkit.models.towers`, the ``tower`` encoder in
:mod:`fusionkit.components.encoders`. This path works, with a DeprecationWarning, until the next release."""

from fusionkit.moved import moved_names

__getattr__ = moved_names(__name__, {
    **{name: "fusionkit.models.towers" for name in (
        "TwoTowerModel", "TwoTowerOutput", "Tower", "clip_loss", "retrieval_metrics")},
    **{name: "fusionkit.components.encoders" for name in ("TowerEncoder", "TowerEncoderConfig")},
})
