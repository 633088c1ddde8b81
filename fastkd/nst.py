"""Neural selectivity transfer (docs/spec.md §3): :func:`nst_loss` and :class:`NSTLoss`.

No backend has an NST kernel: the compiled backends take a closed form in
composite ATen. The mathematics is :func:`fastkd.reference.nst_loss`'s.
"""

from __future__ import annotations

import torch

from fastkd._backend import backend_for
from fastkd._module_form import LossModule
from fastkd.reference import nst as _reference

__all__ = ["NST_CLOSED_FORM_BACKENDS", "NSTLoss", "nst_loss"]

# The backends on which nst_loss runs its closed form. That form is composite
# ATen (two batched GEMMs and a reduction, autograd through them), not a
# kernel of any backend: it runs on whatever device the tensors are on, and
# the backend name only says that the closed form, not the reference's
# (N, C, C') kernel matrices, is wanted.
NST_CLOSED_FORM_BACKENDS = ("cpu", "triton", "cuda")


def _nst_closed_form(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """NST on pooled, normalised ``(N, C_s, HW)`` and ``(N, C_t, HW)`` features.

    Per sample, with ``A = s_n``, ``B = t_n`` and ``(a·b)²`` over channel pairs,
    ``mean K(t,t) + mean K(s,s) − 2 mean K(s,t) = ‖AᵀA / C_s − BᵀB / C_t‖²_F``
    (``Σ_{c,c'} (a_c·b_c')² = ⟨AᵀA, BᵀB⟩_F``). That needs two HW × HW Grams
    per sample; the channel form needs C × C products. Whichever is smaller
    is used, so memory is O(N · min(max(C_s, C_t), HW)²).
    """
    c_s, c_t, hw = s.shape[1], t.shape[1], s.shape[2]
    if hw < max(c_s, c_t):
        gram_s = s.transpose(1, 2) @ s  # (N, HW, HW)
        gram_t = t.transpose(1, 2) @ t
        return (gram_s / c_s - gram_t / c_t).square().sum(dim=(1, 2)).mean()

    def pair_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2)).square().mean(dim=(1, 2))

    return (pair_mean(t, t) + pair_mean(s, s) - 2 * pair_mean(s, t)).mean()


def nst_loss(
    student_maps: torch.Tensor, teacher_maps: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Neural selectivity transfer (RepDistiller ``NSTLoss``, docs/spec.md §3).

    Same semantics as :func:`fastkd.reference.nst_loss`: both maps pooled to
    ``(min(H, H'), min(W, W'))``, flattened to ``(N, C, HW)``, L2-normalised
    over HW; per sample ``mean K(t,t) + mean K(s,s) − 2 mean K(s,t)`` with
    ``k(a, b) = (a·b)²`` over channel pairs, averaged over N. Nothing is
    detached (detach ``teacher_maps`` for a frozen teacher).

    There is no NST kernel on any backend: the compiled backends
    (``NST_CLOSED_FORM_BACKENDS``) run composite ATen with autograd, the
    closed form ``‖AᵀA / C_s − BᵀB / C_t‖²_F`` (two HW × HW Grams per sample)
    when HW is smaller than the channel counts, else the C × C channel
    products, so memory is O(N · min(max(C_s, C_t), HW)²). Those are batched
    GEMMs, which is what a kernel would do too; on CUDA tensors they are
    cuBLAS's, whichever of ``"triton"`` / ``"cuda"`` is named.

    Args:
        student_maps: ``(N, C_s, H, W)`` student feature maps.
        teacher_maps: ``(N, C_t, H', W')``; channels and spatial size may differ.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``:
            ``"reference"`` builds the kernel matrices, the others (where
            available) take the closed form above.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    s, t = _reference.check_nst_arguments(student_maps, teacher_maps)
    chosen = backend_for("nst", NST_CLOSED_FORM_BACKENDS, backend, s)
    if chosen == "reference":
        return _reference.nst_loss(s, t)
    return _nst_closed_form(*_reference.nst_features(s, t))


class NSTLoss(LossModule):
    """Module form of :func:`fastkd.nst_loss`.

    ``forward(student_maps (N, C_s, H, W), teacher_maps (N, C_t, H', W'))`` → ``()`` loss.
    """

    loss_function = staticmethod(nst_loss)

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__(backend=backend)
