"""The model of a Tensor Core's inner products, for the device profile and its probes.

The arithmetic lives in :mod:`harness.values.tensor_core_model` (pure torch, no device), because the blockwise
FP8 emulation (:mod:`harness.values.blockwise`) runs the FP8 accumulator it describes; this module keeps the
device layer's name.
"""
from ..values.tensor_core_model import (ALIGNMENT_REFERENCES, ROUNDINGS, MatMul, TensorCoreModel,  # noqa: F401
                                        round_integer, round_significand)

__all__ = ["ROUNDINGS", "ALIGNMENT_REFERENCES", "TensorCoreModel", "round_integer", "round_significand", "MatMul"]
