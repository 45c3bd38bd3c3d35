"""The spec's objective terms, chosen once: the one place that reads which features a spec turns on
(as :func:`fusionkit.training.tasks.task_for` chooses the task), so that the trainer's loop has no
branch per feature."""

from __future__ import annotations

from fusionkit.data.store import FeatureStore
from fusionkit.hardware.distributed import Dist
from fusionkit.spec import Spec
from fusionkit.training.adaptation import adaptation_loss_factory
from fusionkit.training.compute import ComputeTerm
from fusionkit.training.distill import distillation_term
from fusionkit.training.objective import TermFactory
from fusionkit.training.statistics import DomainStatistics

__all__ = ["objective_terms"]


def objective_terms(spec: Spec, target_store: FeatureStore | None = None, dist: Dist | None = None) -> list[TermFactory]:
    """Factories of the terms the spec asks for: per-domain statistics, adaptation losses, distillation (on the ranks
    of ``dist``), the compute budget of on-demand encoders."""
    terms: list[TermFactory] = []
    if spec.data.standardize_per_domain or spec.projector.domain_norm:
        terms.append(lambda model, store: DomainStatistics(model, store, spec, target_store))
    if spec.adaptation:
        terms.append(adaptation_loss_factory(spec, target_store, dist))
    if spec.distill:
        terms.append(distillation_term(spec, dist))
    if spec.on_demand and spec.conditional.budget_gflops is not None:
        terms.append(lambda model, store: ComputeTerm(model))
    return terms
