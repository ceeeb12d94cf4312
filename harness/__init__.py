"""A numerical-robustness harness for mixed-precision training.

Runs a registry of scenarios under precision strategies (FP32, TF32, FP16 with and without loss
scaling, BF16, pure and master-weight variants, FP8) against an FP32 reference, and gives each case a
verdict with a reason that cites numbers. See README.md.
"""
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: ``import harness`` (and harness.results for reports) stays free of torch
    if name == "check_model":
        from .models.model_check import check_model
        return check_model
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
