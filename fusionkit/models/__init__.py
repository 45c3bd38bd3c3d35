"""The model kinds: fusion models (:mod:`.fusion`) and two-tower models (:mod:`.towers`), built and
loaded through one front door, :mod:`.factory` (``build_model``, ``load_model``), as timm's
``create_model`` is. The checkpoint format (:mod:`fusionkit.checkpoint`) reads and writes files only."""

from fusionkit.errors import require_torch

require_torch("fusionkit.models")
