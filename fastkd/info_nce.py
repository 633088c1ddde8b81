"""InfoNCE / CLIP with in-batch negatives (docs/spec.md §4): :func:`info_nce` and :class:`InfoNCELoss`.

The fused ops come in two modes. Recompute (``fastkd::info_nce_forward`` /
``_backward`` on cpu / cuda, ``kernels/info_nce.py`` on triton) keeps only the
row log-sum-exp between forward and backward and recomputes the logits there.
Keep (``fastkd::info_nce_softmax_forward`` / ``_backward``, cpu / cuda) keeps
the ``(N, M)`` softmax, when it fits ``logits_memory_budget``. The mathematics
is :func:`fastkd.reference.info_nce`'s.
"""

from __future__ import annotations

import torch

from fastkd import _validate
from fastkd import distributed as _distributed
from fastkd._backend import backend_for
from fastkd._module_form import LossModule
from fastkd.reference.info_nce import check_arguments
from fastkd.reference.info_nce import info_nce as reference_info_nce

__all__ = ["DEFAULT_LOGITS_MEMORY_BUDGET", "INFO_NCE_KERNELS", "InfoNCEFunction", "InfoNCELoss", "info_nce"]

# The compiled backends that have an InfoNCE kernel.
INFO_NCE_KERNELS = ("cpu", "triton", "cuda")

# The backends that can keep the softmax between forward and backward (the
# triton kernels hold each logits tile in registers and always recompute).
KEEPING_KERNELS = ("cpu", "cuda")

# Bytes of kept probabilities one call may hold by default: 1 GiB, the float32
# (N, M) softmax up to N = M = 16384. See info_nce's logits_memory_budget.
DEFAULT_LOGITS_MEMORY_BUDGET = 2**30

# What a label outside a rank's keys becomes before gather=True offsets it by
# the rank's first key: still negative after any offset, so the kernels see
# it as out of range.
_OUT_OF_RANGE_LABEL = -(2**62)


def _info_nce_tile_rows(m: int) -> int:
    """Rows of q per tile of the InfoNCE ops.

    A tile's logits (tile_rows × M) are the ops' only large temporary: 2**23
    elements, i.e. 32 MiB in float32 (64 MiB for float64 input), whatever N.
    """
    return max(1, 2**23 // max(m, 1))


def _probabilities_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """Bytes of the ``(N, M)`` softmax that the keep mode holds: float32, float64 for float64 input."""
    element = 8 if q.dtype == torch.float64 else 4
    return q.shape[0] * k.shape[0] * element


def _logits_memory_budget(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"logits_memory_budget must be an int >= 0 (bytes), got {value!r}")
    return value


def _info_nce_ops(backend: str):
    """``(forward, backward)`` of ``backend`` with the signatures of ``fastkd::info_nce_forward`` /
    ``fastkd::info_nce_backward``. The Triton kernels keep their logits tile in
    registers, so they take no ``tile_rows`` (it only sizes the ATen tiles of
    the cpu / cuda ops)."""
    if backend == "triton":
        from fastkd.kernels import info_nce as triton_info_nce

        def forward(q, k, labels, inv_temperature, tile_rows):
            return triton_info_nce.info_nce_forward(q, k, labels, inv_temperature)

        def backward(grad_rows, q, k, labels, row_lse, inv_temperature, tile_rows):
            return triton_info_nce.info_nce_backward(grad_rows, q, k, labels, row_lse, inv_temperature)

        return forward, backward
    return torch.ops.fastkd.info_nce_forward, torch.ops.fastkd.info_nce_backward


class InfoNCEFunction(torch.autograd.Function):
    """One InfoNCE direction, ``mean_i (lse_j logits_ij − logits_{i, y_i})``, on the fused kernels.

    With ``keep_probabilities`` (cpu / cuda, and only when ``q`` or ``k``
    needs a gradient) the forward keeps the ``(N, M)`` softmax and the
    backward reads it: three GEMMs in all. Otherwise it keeps only ``labels``
    and the row log-sum-exp (O(N), besides references to ``q`` and ``k``
    themselves) and the backward recomputes the logits tile by tile: four GEMMs.
    """

    @staticmethod
    def forward(ctx, q, k, labels, inv_temperature, tile_rows, backend, keep_probabilities=False):
        ctx.keep = keep_probabilities and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        if ctx.keep:
            row_loss, state = torch.ops.fastkd.info_nce_softmax_forward(q, k, labels, inv_temperature)
        else:
            forward_op, _ = _info_nce_ops(backend)
            row_loss, state = forward_op(q, k, labels, inv_temperature, tile_rows)
        ctx.save_for_backward(q, k, labels, state)
        ctx.inv_temperature = inv_temperature
        ctx.tile_rows = tile_rows
        ctx.backend = backend
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_output):
        q, k, labels, state = ctx.saved_tensors  # state: the probabilities (keep) or the row lse
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None, None
        n = q.shape[0]
        grad_rows = (grad_output.to(state.dtype) / n).expand(n).contiguous()
        if ctx.keep:
            grad_q, grad_k = torch.ops.fastkd.info_nce_softmax_backward(
                grad_rows, q, k, labels, state, ctx.inv_temperature
            )
        else:
            _, backward_op = _info_nce_ops(ctx.backend)
            grad_q, grad_k = backward_op(grad_rows, q, k, labels, state, ctx.inv_temperature, ctx.tile_rows)
        return (
            grad_q if ctx.needs_input_grad[0] else None,
            grad_k if ctx.needs_input_grad[1] else None,
            None, None, None, None, None,
        )


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    temperature: float = 0.07,
    labels: torch.Tensor | None = None,
    symmetric: bool = False,
    normalize: bool = False,
    backend: str = "auto",
    gather: bool = False,
    process_group=None,
    logits_memory_budget: int = DEFAULT_LOGITS_MEMORY_BUDGET,
) -> torch.Tensor:
    """InfoNCE / CLIP loss with in-batch negatives (docs/spec.md §4).

    ``logits = q kᵀ / τ``, ``L = mean_i (lse_j logits_ij − logits_{i, y_i})``
    (``F.cross_entropy(q @ k.T / τ, y)``) with ``y = labels`` or, without
    labels, ``y_i = i`` (keys beyond the N-th are extra negatives).

    The loss needs three ``N × M × D`` matrix products: the logits
    ``q kᵀ`` in the forward, ``G k`` and ``Gᵀ q`` in the backward (``G`` the
    gradient of the logits). The fused kernels run in one of two modes:

    - keep (cpu and cuda, when the ``(N, M)`` softmax fits
      ``logits_memory_budget``): the forward keeps the softmax (float32,
      float64 for float64 input) and the backward reads it; three products,
      ``N·M`` elements held from forward to backward.
    - recompute (otherwise, and always on triton): only the row
      log-sum-exp is kept and the backward recomputes the logits, so memory
      is O(N) instead of O(N·M) (Inf-CL style) at the price of a fourth
      product: the cpu and cuda ops tile the similarity matrix (ATen GEMMs
      on about 32 MiB of logits at a time, plus their own row log-sum-exp /
      softmax-gradient kernels), the triton kernels hold one 64 × 64 logits
      tile per program, flash-attention style.

    Both modes give the same loss and gradients up to rounding.

    Args:
        q: ``(N, D)`` queries, float32 / bfloat16 / float16 / float64.
        k: ``(M, D)`` keys, same dtype and device; without ``labels`` ``M >= N``.
        temperature: ``τ > 0``.
        labels: optional ``(N,)`` integer tensor, each query's positive key in
            ``[0, M)``. Not allowed with ``symmetric=True``. Checked on the
            host for CPU tensors (``ValueError``); on a GPU the kernels give a
            query with a label outside ``[0, M)`` a NaN row loss and a NaN
            gradient row (so the loss, and the keys' gradient, a sum over
            every query, are NaN), unless ``FASTKD_CHECK_DEVICE_VALUES=1``
            asks for the host check there too (docs/spec.md §6; the
            ``"reference"`` backend always checks).
        symmetric: average with the key→query direction (needs ``M == N``).
        normalize: L2-normalise the rows of ``q`` and ``k`` first (in float32,
            float64 for float64 input), as the reference does.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (the GPU kernels take float32 / bfloat16 / float16).
        gather: gather ``q``, ``k`` (and ``labels``, each rank's indexing its
            own keys) from every rank of ``process_group`` (default: the world)
            and compute the loss of the global batch, negatives from every rank
            (:mod:`fastkd.distributed`: same value on every rank; each rank's
            gradient is ``world_size`` × the single-process one of its rows).
            Every rank passes ``labels`` or every rank passes None.
        logits_memory_budget: bytes of kept softmax the call may hold between
            forward and backward (int ``>= 0``): a direction keeps its
            ``N × M`` probabilities (4 bytes each, 8 for float64 input) when
            they fit in what the budget leaves, so with ``symmetric=True``
            the key→query direction keeps its own only if both fit. ``0``
            always recomputes. Nothing is kept when neither ``q`` nor ``k``
            needs a gradient. The default, 1 GiB
            (``DEFAULT_LOGITS_MEMORY_BUDGET``), keeps the float32 softmax up
            to ``N = M = 16384``. Keeping holds one ``N × M`` tensor, half of
            what ``torch.compile`` of the plain loss holds and a fifth of
            eager PyTorch's (bench/bench_info_nce.py), and saves a quarter of
            the products; up to 1 GiB that memory is small next to what
            produced embedding batches of that size, while beyond it grows
            as ``N·M`` (16 GiB at 65536) and O(N) memory is worth the
            recompute's third more products.

    Returns:
        ``()`` loss, float32 (float64 for float64 inputs).
    """
    logits_memory_budget = _logits_memory_budget(logits_memory_budget)
    # the range of GPU labels is guarded by the kernels (no device → host sync)
    label_range = not isinstance(labels, torch.Tensor) or _validate.values_checked_on_host(labels)
    if gather:
        # Every rank must make the same collective calls in the same order.
        diagonal = labels is None and k.shape[0] == q.shape[0]
        q, k, temperature, labels = check_arguments(
            q, k, temperature, labels, symmetric, normalize, label_range=label_range
        )
        keys_per_rank = k.shape[0]
        if not label_range:
            # a label outside this rank's keys must stay outside the gathered
            # ones, not land on another rank's key: negative whatever the offset
            labels = labels.masked_fill((labels < 0) | (labels >= keys_per_rank), _OUT_OF_RANGE_LABEL)
        q = _distributed.gather_with_grad("q", q, process_group)
        k = _distributed.gather_with_grad("k", k, process_group)
        labels = None if diagonal else _distributed.gather_labels(labels, keys_per_rank, process_group)
    q, k, temperature, labels = check_arguments(
        q, k, temperature, labels, symmetric, normalize, label_range=label_range
    )
    chosen = backend_for("info_nce", INFO_NCE_KERNELS, backend, q)
    if chosen == "reference":
        # check_arguments filled in arange labels; the reference rejects labels
        # with symmetric=True (whose positives are the diagonal by definition)
        return reference_info_nce(
            q, k, temperature=temperature, labels=None if symmetric else labels, symmetric=symmetric,
            normalize=normalize,
        )
    if normalize:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = torch.nn.functional.normalize(q.to(acc), dim=1)
        k = torch.nn.functional.normalize(k.to(acc), dim=1)
    inv_temperature = 1.0 / temperature
    budget_left = logits_memory_budget if chosen in KEEPING_KERNELS else 0
    keep = _probabilities_bytes(q, k) <= budget_left
    loss = InfoNCEFunction.apply(q, k, labels, inv_temperature, _info_nce_tile_rows(k.shape[0]), chosen, keep)
    if symmetric:
        keep_back = keep and 2 * _probabilities_bytes(q, k) <= budget_left
        back = InfoNCEFunction.apply(k, q, labels, inv_temperature, _info_nce_tile_rows(q.shape[0]), chosen,
                                     keep_back)
        loss = (loss + back) / 2
    return loss


class InfoNCELoss(LossModule):
    """Module form of :func:`fastkd.info_nce`; keyword arguments as there.

    ``forward(q (N, D), k (M, D), labels=None)`` → ``()`` loss. With
    ``gather=True`` the negatives span every rank of ``process_group``
    (default: the world), as :func:`fastkd.info_nce`'s ``gather``;
    ``logits_memory_budget`` chooses between keeping the softmax and
    recomputing it, as there.
    """

    loss_function = staticmethod(info_nce)

    def __init__(self, *, temperature: float = 0.07, symmetric: bool = False, normalize: bool = False,
                 backend: str = "auto", gather: bool = False, process_group=None,
                 logits_memory_budget: int = DEFAULT_LOGITS_MEMORY_BUDGET) -> None:
        super().__init__(temperature=temperature, symmetric=symmetric, normalize=normalize, backend=backend,
                         gather=_validate.flag("gather", gather), process_group=process_group,
                         logits_memory_budget=_logits_memory_budget(logits_memory_budget))

    def forward(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(q, k, labels=labels)
