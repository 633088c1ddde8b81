"""Contrastive representation distillation, docs/spec.md §4 (RepDistiller ``CRDLoss``), in plain PyTorch.

The parts, as RepDistiller's ``crd/`` builds them:

- ``Embed``: a linear layer on the flattened features, then L2 normalisation;
  one for the student, one for the teacher.
- Two memory banks (``n_data × feat_dim``): ``memory_s`` holds a momentum
  average of each training sample's student embedding, ``memory_t`` of its
  teacher embedding. Each is a module buffer, so ``state_dict`` saves it.
- Per sample ``b``: a positive and ``K`` negative bank indices,
  ``contrast_idx (B, K+1)`` with the positive in column 0.
  ``out_bj = exp(bank[contrast_idx_bj] · v_b / τ) / Z``, where ``Z`` is fixed
  from the first batch, ``Z = mean(exp(·/τ)) · n_data``, one per direction
  (a buffer too).
- The NCE loss of one direction (RepDistiller ``ContrastLoss``), with
  ``c = K / n_data`` (``K · P_n``, uniform noise ``P_n = 1 / n_data``):
  ``−(Σ_b log(P_b0 / (P_b0 + c + 1e-7)) + Σ_bk log(c / (P_bk + c + 1e-7))) / B``.
  The student embedding is scored against the teacher bank and the teacher
  embedding against the student bank; the loss is the sum of both.
- After the loss, without gradient: ``bank[idx] = l2n(m · bank[idx] + (1 − m) · v)``.

The ``(B, K+1, feat_dim)`` gathered bank rows are materialised here; the
fused kernel (``fastkd.crd``) does not.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import _validate

# RepDistiller's ContrastLoss eps.
NCE_EPS = 1e-7


class Embed(nn.Module):
    """``l2n(linear(x.flatten(1)))``: ``(B, ...)`` with ``dim_in`` features per sample → ``(B, dim_out)``.

    RepDistiller's ``Embed``. The normalisation is ``F.normalize`` (eps 1e-12),
    which equals RepDistiller's ``x / ‖x‖`` for every non-zero row.
    """

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_index_range(name: str, value: torch.Tensor, high: int) -> None:
    """``ValueError`` unless every entry of ``value`` lies in ``[0, high)``.

    Reads the values: a device → host synchronisation for a GPU tensor.
    """
    if value.numel():
        low_seen, high_seen = (int(x) for x in torch.aminmax(value))  # one pass, no temporaries
        if low_seen < 0 or high_seen >= high:
            raise ValueError(
                f"{name} must lie in [0, n_data) = [0, {high}), got values in [{low_seen}, {high_seen}]"
            )


def _index_tensor(name: str, value, shape: tuple[int, ...], high: int, ref: torch.Tensor, *,
                  check_range: bool = True) -> torch.Tensor:
    """An integer tensor of ``shape`` with values in ``[0, high)`` (the values
    checked unless ``check_range`` is False), as int64."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    _validate.same_device(name, value, "the features", ref)
    if check_range:
        check_index_range(name, value, high)
    return value.long()


def check_nce_arguments(v, bank, contrast_idx, temperature, z, *, index_range: bool = True):
    """Validates one NCE direction's arguments (``ValueError`` naming the argument).

    Returns ``(v, bank, contrast_idx as int64, temperature, z)``, ``z`` None,
    a float or a ``()`` tensor (see :func:`crd_nce`). Shared by the reference
    and the fused backend; ``index_range=False`` leaves out the check that
    reads ``contrast_idx``'s values (the fused kernels guard them,
    docs/spec.md §6).
    """
    bank = _validate.tensor("bank", bank, dtypes=(torch.float32, torch.float64), min_dim=2)
    if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"bank must have shape (n_data, feat_dim) with both >= 1, got {tuple(bank.shape)}")
    v = _validate.tensor("v", v, min_dim=2)
    # B = 0 is refused: Z is set from the batch, and CRDLoss refuses empty features too
    if v.dim() != 2 or v.shape[0] == 0 or v.shape[1] != bank.shape[1]:
        raise ValueError(
            f"v must have shape (B, feat_dim) = (B, {bank.shape[1]}) with B >= 1, got {tuple(v.shape)}"
        )
    _validate.same_device("v", v, "bank", bank)
    if not isinstance(contrast_idx, torch.Tensor) or contrast_idx.dim() != 2 or contrast_idx.shape[1] < 1:
        got = tuple(contrast_idx.shape) if isinstance(contrast_idx, torch.Tensor) else type(contrast_idx)
        raise ValueError(f"contrast_idx must be a (B, K+1) integer tensor, got {got}")
    contrast_idx = _index_tensor(
        "contrast_idx", contrast_idx, (v.shape[0], contrast_idx.shape[1]), bank.shape[0], v,
        check_range=index_range,
    )
    temperature = _validate.real("temperature", temperature, low=0.0, low_open=True)
    if isinstance(z, torch.Tensor):
        _z_tensor(z, v)
    elif z is not None:
        z = _validate.real("z", z, low=0.0, low_open=True)
    return v, bank, contrast_idx, temperature, z


def _z_tensor(z: torch.Tensor, ref: torch.Tensor) -> None:
    """A ``()`` floating-point tensor on ``ref``'s device; its value finite
    where :func:`fastkd._validate.values_checked_on_host` says so."""
    if z.dim() != 0 or not z.dtype.is_floating_point:
        raise ValueError(f"z must be a float, None or a () floating-point tensor, got {z.dtype} of shape "
                         f"{tuple(z.shape)}")
    _validate.same_device("z", z, "v", ref)
    if _validate.values_checked_on_host(z) and not math.isfinite(float(z)):
        raise ValueError(f"z must be finite, got {float(z)}")


def nce_loss(out: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss`` on ``out (B, K+1)`` (positive in column 0).

    ``−(Σ_b log(P_b0 / (P_b0 + c')) + Σ_bk log(c / (P_bk + c'))) / B`` with
    ``c = K / n_data`` and ``c' = c + 1e-7``.
    """
    batch, negatives = out.shape[0], out.shape[1] - 1
    c = negatives / n_data
    positive = out[:, 0]
    log_d1 = torch.log(positive / (positive + (c + NCE_EPS)))
    negative = out[:, 1:]
    log_d0 = torch.log(c / (negative + (c + NCE_EPS)))
    return -(log_d1.sum() + log_d0.sum()) / batch


def crd_nce(
    v: torch.Tensor,
    bank: torch.Tensor,
    contrast_idx: torch.Tensor,
    *,
    temperature: float = 0.07,
    z: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of the CRD loss: embeddings ``v`` scored against a memory ``bank``.

    ``out_bj = exp(bank[contrast_idx_bj] · v_b / τ) / Z`` and :func:`nce_loss`
    with ``n_data = bank.shape[0]``. The bank gets no gradient.

    Args:
        v: ``(B, feat_dim)`` embeddings (any float dtype; computed in the bank's dtype).
        bank: ``(n_data, feat_dim)`` float32 / float64 memory.
        contrast_idx: ``(B, K+1)`` integer indices into the bank, the positive in column 0.
        temperature: ``τ > 0``.
        z: the normalisation constant ``Z > 0``; ``None`` sets it from this
            batch, ``mean(exp(·/τ)) · n_data`` (RepDistiller's first batch).
            A ``()`` tensor on v's device holds Z (> 0) or, <= 0, asks for
            the batch's: decided on the device, so Z is never read on the host.
    Returns:
        ``(loss, Z)``: the ``()`` loss and the ``()`` Z used, both in the
        bank's dtype and on its device.
    """
    v, bank, contrast_idx, temperature, z = check_nce_arguments(v, bank, contrast_idx, temperature, z)
    return crd_nce_unchecked(v, bank, contrast_idx, temperature, z)


def crd_nce_unchecked(v, bank, contrast_idx, temperature: float, z):
    """:func:`crd_nce` on arguments already validated (by :func:`check_nce_arguments` or the module)."""
    n_data = bank.shape[0]
    weight = bank.detach().index_select(0, contrast_idx.reshape(-1)).view(*contrast_idx.shape, -1)
    out = torch.exp(torch.bmm(weight, v.to(bank.dtype).unsqueeze(2)).squeeze(2) / temperature)
    batch_z = out.detach().mean() * n_data
    if z is None:
        z_used = batch_z
    elif isinstance(z, torch.Tensor):
        z = z.to(out.dtype)
        z_used = torch.where(z <= 0, batch_z, z)
    else:
        z_used = torch.full((), z, dtype=out.dtype, device=out.device)
    return nce_loss(out / z_used, n_data), z_used


@torch.no_grad()
def update_memory(bank: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, momentum: float,
                  idx_ok: torch.Tensor | None = None) -> None:
    """RepDistiller's bank update, in place: ``bank[idx] = l2n(m · bank[idx] + (1 − m) · v)``.

    ``idx`` must hold distinct indices in ``[0, n_data)`` (each row is
    written once). Where they were not checked on the host, ``idx_ok`` is
    :func:`indices_ok`'s ``()`` bool tensor: the update then indexes with
    ``idx`` clamped into the bank and, unless ``idx_ok``, writes every row
    back as it was (rows that clamping makes collide all get one value),
    so bad indices leave the bank unchanged without a host read.
    """
    if idx_ok is not None:
        idx = idx.clamp(0, bank.shape[0] - 1)
    old = bank.index_select(0, idx)
    rows = old.mul(momentum)
    rows.add_(torch.mul(v.detach().to(bank.dtype), 1 - momentum))
    rows.div_(rows.pow(2).sum(1, keepdim=True).pow(0.5))
    if idx_ok is not None:
        rows = torch.where(idx_ok, rows, old)
    bank.index_copy_(0, idx, rows)


def indices_ok(idx: torch.Tensor, high: int) -> torch.Tensor:
    """``()`` bool tensor: every entry of ``idx`` (B,) lies in ``[0, high)`` and
    none repeats. Computed on ``idx``'s device (no host read)."""
    ordered = idx.sort().values
    in_range = (ordered[:1] >= 0).all() & (ordered[-1:] < high).all()
    return in_range & (ordered[1:] != ordered[:-1]).all()


class CRDLoss(nn.Module):
    """Contrastive representation distillation (RepDistiller ``CRDLoss``), reference.

    ``forward(f_s, f_t, idx, contrast_idx=None, generator=None)``:

    - ``f_s``: ``(B, ...)`` student features, ``student_dim`` values per sample
      (flattened); ``f_t``: ``(B, ...)`` teacher features, ``teacher_dim`` per sample.
    - ``idx``: ``(B,)`` distinct integer indices in ``[0, n_data)`` of the
      samples in the dataset: the bank rows updated after the loss.
    - ``contrast_idx``: bank indices to score against, either ``(B, K+1)``
      (RepDistiller's ``sample_idx``: the positive in column 0, then ``K``
      negatives; the positive may differ from ``idx``, as in its "relax"
      mode) or ``(B, K)`` negatives only (the positive is ``idx``).
      ``K = nce_k``.
    - ``None``: the ``K`` negatives are drawn uniformly with replacement from
      ``[0, n_data)`` (RepDistiller's ``AliasMethod`` over uniform
      probabilities; a negative may equal the positive), with ``generator``
      (a ``torch.Generator`` on the features' device) or the global RNG; the
      positive is ``idx``.

    The loss is ``nce(v_s against memory_t) + nce(v_t against memory_s)``
    (docs/spec.md §4). On the first call each direction's ``Z`` is set from that
    batch and kept in the buffer ``z`` (``[Z_s, Z_t]``, −1 until set). In
    training mode the banks are then updated (:func:`update_memory`); in eval
    mode they are left as they are. Buffers: ``memory_s``, ``memory_t``
    ``(n_data, feat_dim)`` (uniform in ``±1/sqrt(feat_dim/3)`` at first, as in
    RepDistiller) and ``z``, all in ``state_dict``.

    Returns:
        ``()`` loss in the banks' dtype.
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
    ) -> None:
        super().__init__()
        self.student_dim = _positive_int("student_dim", student_dim)
        self.teacher_dim = _positive_int("teacher_dim", teacher_dim)
        self.n_data = _positive_int("n_data", n_data)
        self.feat_dim = _positive_int("feat_dim", feat_dim)
        self.nce_k = _positive_int("nce_k", nce_k)
        self.nce_t = _validate.real("nce_t", nce_t, low=0.0, low_open=True)
        self.nce_m = _validate.real("nce_m", nce_m, low=0.0, high=1.0)
        self.embed_s = Embed(self.student_dim, self.feat_dim)
        self.embed_t = Embed(self.teacher_dim, self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, n_data={self.n_data}, "
            f"feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}"
        )

    def _features(self, name: str, value, dim: int, batch: int | None) -> torch.Tensor:
        value = _validate.tensor(name, value, min_dim=1)
        if value.shape[0] == 0 or value[0].numel() != dim:
            raise ValueError(
                f"{name} must have shape (B, ...) with B >= 1 and {dim} values per sample, "
                f"got {tuple(value.shape)}"
            )
        if batch is not None and value.shape[0] != batch:
            raise ValueError(f"{name} batch size {value.shape[0]} does not match f_s batch size {batch}")
        _validate.same_device(name, value, "memory_s", self.memory_s)
        return value

    def _checks_index_values(self, index: torch.Tensor) -> bool:
        """Whether :meth:`contrast_indices` checks the values of ``idx`` and of a
        given ``contrast_idx`` on the host (range, and ``idx``'s distinctness):
        always here, where the bank is indexed with them (the fused module
        leaves them to the device on a GPU: its kernels guard ``contrast_idx``,
        and :meth:`forward` checks ``idx`` with :func:`indices_ok`)."""
        return True

    def contrast_indices(self, idx, contrast_idx, generator, ref: torch.Tensor):
        """Validated ``(idx (B,), contrast_idx (B, K+1))``, drawing the negatives when needed."""
        batch = ref.shape[0]
        check_idx = isinstance(idx, torch.Tensor) and self._checks_index_values(idx)
        idx = _index_tensor("idx", idx, (batch,), self.n_data, ref, check_range=check_idx)
        if check_idx and batch > 1 and torch.unique(idx).numel() != batch:
            raise ValueError("idx must hold distinct indices (each sample's bank row is updated once)")
        if contrast_idx is None:
            if generator is not None and not isinstance(generator, torch.Generator):
                raise ValueError(
                    f"generator must be a torch.Generator or None, got {type(generator).__name__}"
                )
            contrast_idx = torch.randint(
                self.n_data, (batch, self.nce_k + 1), generator=generator, device=ref.device
            )
            contrast_idx[:, 0] = idx
            return idx, contrast_idx
        if not isinstance(contrast_idx, torch.Tensor):
            raise ValueError(
                f"contrast_idx must be a torch.Tensor or None, got {type(contrast_idx).__name__}"
            )
        check_range = self._checks_index_values(contrast_idx)
        if contrast_idx.dim() == 2 and contrast_idx.shape[1] == self.nce_k:
            contrast_idx = _index_tensor(
                "contrast_idx", contrast_idx, (batch, self.nce_k), self.n_data, ref, check_range=check_range
            )
            return idx, torch.cat([idx[:, None], contrast_idx], dim=1)
        return idx, _index_tensor(
            "contrast_idx", contrast_idx, (batch, self.nce_k + 1), self.n_data, ref, check_range=check_range
        )

    def _nce(self, v: torch.Tensor, bank: torch.Tensor, contrast_idx: torch.Tensor, z: torch.Tensor):
        """One direction: ``(loss, Z used)`` (``()`` tensors), on arguments
        :meth:`forward` validated; ``z`` is the buffer's entry, ``<= 0`` until
        set. The fused module overrides this."""
        return crd_nce_unchecked(v, bank, contrast_idx, self.nce_t, z)

    def forward(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        idx: torch.Tensor,
        contrast_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        f_s = self._features("f_s", f_s, self.student_dim, None)
        f_t = self._features("f_t", f_t, self.teacher_dim, f_s.shape[0])
        idx, contrast_idx = self.contrast_indices(idx, contrast_idx, generator, f_s)
        # idx not checked on the host is checked on the device: bad indices
        # make the loss NaN and leave the banks as they are
        idx_ok = None if self._checks_index_values(idx) else indices_ok(idx, self.n_data)
        v_s = self.embed_s(f_s)
        v_t = self.embed_t(f_t)
        # Z stays on the device: each direction sets its own from this batch
        # while its buffer entry is still −1, and keeps it afterwards
        loss_s, z_s = self._nce(v_s, self.memory_t, contrast_idx, self.z[0])
        loss_t, z_t = self._nce(v_t, self.memory_s, contrast_idx, self.z[1])
        with torch.no_grad():
            self.z.copy_(torch.stack([z_s.detach(), z_t.detach()]))
        if self.training:
            update_memory(self.memory_s, idx, v_s, self.nce_m, idx_ok)
            update_memory(self.memory_t, idx, v_t, self.nce_m, idx_ok)
        loss = loss_s + loss_t
        if idx_ok is not None:
            loss = loss * torch.where(idx_ok, 1.0, float("nan")).to(loss.dtype)
        return loss
