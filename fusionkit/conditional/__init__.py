"""Conditional execution: compute budgets, the selection rules (rank-order top-n/top-p, budgets, value per cost) and the rows an on-demand encoder runs on.

The package itself imports nothing, so that the torch-free runtime can import :mod:`.budget` and :mod:`.numpy_rules`."""
