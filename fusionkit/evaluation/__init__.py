"""Evaluation of trained runs: the controls of an accuracy-compute curve, the curves, fold ensembles and reports."""
