"""The specification (SPEC.md) in plain PyTorch: the oracle for parity tests.

Nothing here is fused or fast; every function uses ordinary autograd and
computes in float32 (float64 for float64 inputs).
"""

from fastkd.reference.divergence import divergence, row_divergence

__all__ = ["divergence", "row_divergence"]
