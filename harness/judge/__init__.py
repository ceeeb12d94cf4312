"""Judging: metrics of a candidate against its reference, error bounds, verdicts, loss-scale windows, and FP32's own sensitivity to rounding-level perturbation."""
