"""The training layer: the trainer and its seams (``train``), tasks (``tasks``), the supervised and
gate losses (``losses``), objective terms for domain adaptation (``adaptation``) and relational
distillation (``distill``), torchrun + DDP (``distributed``) and run directories (``rundir``)."""

from fusionkit.errors import require_torch

require_torch("fusionkit.training")
