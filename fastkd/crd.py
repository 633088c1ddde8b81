"""Contrastive representation distillation (docs/spec.md §4, RepDistiller ``CRDLoss``) on the fused op.

:func:`crd_nce` is one direction of the loss (embeddings against a memory
bank); :class:`CRDLoss` is the whole module: embed heads, the two banks, ``Z``
and the bank update, which it shares with the reference
(:class:`fastkd.reference.crd.CRDLoss`) so that both update identically; only
the NCE computation differs.

The fused kernels (the ``cpu`` and ``cuda`` op ``torch.ops.fastkd.crd_nce_forward``,
the ``triton`` kernels of ``fastkd.kernels.crd``) gather each bank row, take its
dot product, exponential and NCE term and add its share of the gradient
while the row is in cache (in registers for Triton): the
``(B, K+1, feat_dim)`` gather of the reference never exists, so memory is
O(B · feat_dim) besides the banks. They return the gradient with the loss;
the backward only scales it. The ``cpu`` kernel accumulates
each sample's gradient, a sum over its K+1 bank rows, in float64. The GPU kernels take float32 banks only.
"""

from __future__ import annotations

import torch

from fastkd import (
    _dispatch,
    _ops,  # noqa: F401  (registers fastkd::crd_nce_forward and its fake kernel)
    _validate,
)
from fastkd._backend import backend_for, kernel_op
from fastkd._row_loss import scale_by_upstream
from fastkd.reference import crd as _reference_crd

__all__ = ["CRDLoss", "crd_nce"]

# The compiled backends with a CRD kernel.
CRD_KERNELS = ("cpu", "triton", "cuda")
# The widest feat_dim of the CUDA kernel (kMaxFeatDim of csrc/cuda/crd.cu:
# 32 lanes × 32 registers).
CUDA_MAX_FEAT_DIM = 1024


def _feat_dim_limit(backend: str) -> int | None:
    """The widest feat_dim ``backend``'s kernel takes (None: any)."""
    if backend == "triton":
        from fastkd.kernels import crd as triton_crd

        return triton_crd.MAX_FEAT_DIM
    if backend == "cuda":
        return CUDA_MAX_FEAT_DIM
    return None


def _crd_backend(backend: str, v: torch.Tensor, bank: torch.Tensor) -> str:
    """The backend that runs one direction: ``backend_for`` on the bank (the
    computation's dtype; the GPU kernels take float32 banks, so ``"auto"``
    gives float64 banks on CUDA to the reference), then, for ``"auto"``, the
    next kernel in line when a kernel cannot take this feat_dim."""
    chosen = backend_for("crd", CRD_KERNELS, backend, bank)
    limit = _feat_dim_limit(chosen)
    if limit is None or bank.shape[1] <= limit:
        return chosen
    if backend != "auto":
        raise ValueError(f"backend={chosen!r} takes feat_dim <= {limit}, got {bank.shape[1]}")
    for name in CRD_KERNELS[CRD_KERNELS.index(chosen) + 1:]:
        status = _dispatch.backend_status(name, v.device.type)
        if status.available and (_feat_dim_limit(name) or bank.shape[1]) >= bank.shape[1]:
            return name
    return "reference"


class CRDNCEFunction(torch.autograd.Function):
    """One CRD direction on the fused op: ``mean_b row_loss_b``.

    The forward op returns ``d row_loss_b / d v_b`` ((B, feat_dim), the only
    thing saved); the backward multiplies it by ``grad_output / B`` with
    :func:`fastkd._row_loss.scale_by_upstream`, which writes over the saved
    gradient only when the graph is freed, so a second backward through a
    retained graph (``retain_graph=True``) gives the same gradient again.
    """

    @staticmethod
    def forward(ctx, v, bank, contrast_idx, z, inv_temperature, backend):
        row_loss, grad, z_used = kernel_op(backend, "crd", "crd_nce_forward")(
            v, bank, contrast_idx, z, inv_temperature, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(z_used)
        return row_loss.mean(), z_used

    @staticmethod
    def backward(ctx, grad_output, _grad_z):
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        return scale_by_upstream(grad, grad_output / grad.shape[0]), None, None, None, None, None


def crd_nce(
    v: torch.Tensor,
    bank: torch.Tensor,
    contrast_idx: torch.Tensor,
    *,
    temperature: float = 0.07,
    z: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of the CRD loss: embeddings ``v`` scored against a memory ``bank``.

    ``P_bj = exp(bank[contrast_idx_bj] · v_b / τ) / Z``;
    ``loss = −(Σ_b log(P_b0 / (P_b0 + c')) + Σ_bk log(c / (P_bk + c'))) / B``
    with ``c = K / n_data``, ``c' = c + 1e-7`` (RepDistiller ``ContrastMemory``
    + ``ContrastLoss``; docs/spec.md §4). The bank gets no gradient.

    Args:
        v: ``(B, feat_dim)`` embeddings (any float dtype; computed in the bank's
            dtype, the gradient comes back in ``v``'s).
        bank: ``(n_data, feat_dim)`` float32 / float64 memory bank.
        contrast_idx: ``(B, K+1)`` integer indices into ``bank``, column 0 the
            positive, the others the negatives, in ``[0, n_data)``. Checked on
            the host for CPU tensors (``ValueError``); on a GPU the kernels give
            a sample with an index outside a NaN loss and gradient (and a NaN
            ``Z`` when it is set from the batch), unless
            ``FASTKD_CHECK_DEVICE_VALUES=1`` asks for the host check there too
            (docs/spec.md §6; the ``"reference"`` backend always checks).
        temperature: ``τ > 0``.
        z: the normalisation constant ``Z > 0``; ``None`` sets it from this
            batch, ``Z = mean_bj exp(s_bj / τ) · n_data``. A ``()`` tensor on
            v's device holds Z (> 0) or, <= 0, asks for the batch's; the
            choice is made on the device, so Z is never read on the host (the
            Z returned can be passed back as it is).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
            The GPU kernels take float32 banks (``"auto"`` uses the reference
            for float64 banks on CUDA) and feat_dim up to 8192 (triton) and
            1024 (cuda); ``"auto"`` moves on to the next backend beyond that.

    Returns:
        ``(loss, Z)``: the ``()`` loss and the ``()`` Z used, both in the
        bank's dtype and on its device (no host synchronisation).
    """
    # the range of GPU indices is checked by the kernels (no device → host sync)
    index_range = not isinstance(contrast_idx, torch.Tensor) or _validate.values_checked_on_host(contrast_idx)
    v, bank, contrast_idx, temperature, z = _reference_crd.check_nce_arguments(
        v, bank, contrast_idx, temperature, z, index_range=index_range
    )
    return _crd_nce_unchecked(v, bank, contrast_idx, temperature, z, backend)


def _crd_nce_unchecked(v, bank, contrast_idx, temperature: float, z, backend: str):
    """:func:`crd_nce` on validated arguments (the module validates once for both directions).

    The callers leave ``contrast_idx``'s range to the kernels exactly where
    ``values_checked_on_host`` is False; the reference, which has no guard,
    checks it then.
    """
    chosen = _crd_backend(backend, v, bank)
    if chosen == "reference":
        if not _validate.values_checked_on_host(contrast_idx):
            _reference_crd.check_index_range("contrast_idx", contrast_idx, bank.shape[0])
        return _reference_crd.crd_nce_unchecked(v, bank, contrast_idx, temperature, z)
    if bank.stride(1) != 1 and bank.shape[1] > 1:
        bank = bank.contiguous()  # the kernel reads rows at any stride, elements at unit stride
    if not isinstance(z, torch.Tensor):
        # the op's Z is a () tensor, <= 0 for "from this batch"
        z = torch.full((), -1.0 if z is None else z, dtype=bank.dtype, device=bank.device)
    return CRDNCEFunction.apply(v.to(bank.dtype), bank.detach(), contrast_idx, z, 1.0 / temperature, chosen)


class CRDLoss(_reference_crd.CRDLoss):
    """Contrastive representation distillation (RepDistiller ``CRDLoss``), fused.

    ``CRDLoss(student_dim, teacher_dim, n_data, feat_dim=128, nce_k=16384,
    nce_t=0.07, nce_m=0.5, *, backend="auto")``;
    ``forward(f_s (B, ...), f_t (B, ...), idx (B,), contrast_idx=None, generator=None)``
    → ``()`` loss.

    Everything but the NCE computation is :class:`fastkd.reference.crd.CRDLoss`'s
    (see there): the ``Embed`` heads (linear + L2 normalisation), the buffers
    ``memory_s``, ``memory_t`` (``(n_data, feat_dim)``) and ``z`` (``[Z_s, Z_t]``,
    set on the first call) in ``state_dict``, how negatives are given or
    drawn (``contrast_idx`` ``(B, K+1)`` with the positive first, or ``(B, K)``
    negatives with ``idx`` as the positive, or ``None``: uniform with
    replacement from ``generator``), and the momentum bank update in training
    mode, ``bank[idx] = l2n(m · bank[idx] + (1 − m) · v)``, after the loss.
    A state dict moves between this module and the reference one.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(student_dim, teacher_dim, n_data, feat_dim, nce_k, nce_t, nce_m)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def _checks_index_values(self, index: torch.Tensor) -> bool:
        # on a GPU the kernels guard contrast_idx and forward checks idx on the
        # device (no device → host sync), docs/spec.md §6
        return _validate.values_checked_on_host(index)

    def _nce(self, v, bank, contrast_idx, z):
        return _crd_nce_unchecked(v, bank, contrast_idx, self.nce_t, z, self.backend)
