"""Inference: a trained model's outputs over a store, within a budget (:mod:`.outputs`), the one front door that the
command line, the Python API and an export's checks share."""

from fusionkit.errors import require_torch

require_torch("fusionkit.inference")

from fusionkit.inference.outputs import (  # noqa: E402 - after the check that torch is there
    TIMED_SAMPLES,
    collect_outputs,
    fit_mean_budget,
    measure_encoder_seconds,
    predictions_for,
)

__all__ = ["collect_outputs", "predictions_for", "fit_mean_budget", "measure_encoder_seconds", "TIMED_SAMPLES"]
