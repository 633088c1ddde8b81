"""Attention transfer (docs/spec.md §5, RepDistiller ``Attention``) in Triton: at_loss's ``triton`` backend.

Same contracts as the C++ ops ``fastkd::attention_transfer_forward`` and
``fastkd::attention_transfer_backward`` (csrc/fastkd.cpp,
csrc/cpu/attention_transfer.cpp). For the feature maps f of one sample,

  v_k = (1/C) Σ_c f_ck^p            (attention map over the HW positions k)
  a   = v / max(‖v‖₂, eps)          (F.normalize)
  L   = 1/(N·HW) Σ_n Σ_k (a_s − a_t)²

Student and teacher share N and HW (the caller pools the larger map); their
channel counts may differ. Between forward and backward only the two (N,)
norms ‖v_s‖, ‖v_t‖ are kept; the backward rebuilds v.

Kernels, and the traffic of each (b bytes per map element, maps N·C·HW):

  _attention_map_kernel       grid (N, HW / BLOCK_K): one pass over C per
                              tile of positions, v into an (N, HW) float32
                              scratch row                 read N·C·HW·b, write 4·N·HW
  _at_loss_kernel             grid (N,): ‖v_s‖, ‖v_t‖, Σ_k (a_s − a_t)² from the
                              two scratch rows (a second loop over HW, not
                              the expansion ‖a_s‖² + ‖a_t‖² − 2 a_s·a_t, which
                              cancels when the maps agree)    read 8·N·HW (twice)
  _at_grad_coef_kernel        grid (N,): g = dL/dv (through the normalisation,
                              times the upstream gradient), in place of v
  _attention_map_grad_kernel  grid (N, HW / BLOCK_K, C / BLOCK_C), elementwise:
                              dL/df_ck = g_k · (p/C) · f_ck^(p−1)
                                                          read N·C·HW·b, write N·C·HW·b

so the forward reads each map once (the floor) and the backward twice (once
to rebuild v, once for the gradient) and writes the gradient: the O(N) saved
state costs one extra read of the maps. The scratch rows are C times smaller
than the maps.

Layouts: NCHW-contiguous maps are tiled with the positions along the fast
axis, channels_last maps with the channels along it (both are contiguous
runs in memory: the loads coalesce); any other strides are copied to NCHW
first, as the CPU kernel does. Gradients come back in the layout read
(channels_last for channels_last input).

Everything is accumulated in float32; bf16 / fp16 maps are widened as they
are loaded and the gradients rounded to the input dtype as they are stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DEVICE_TYPE,  # noqa: F401  (re-exported: callers ask a module where its kernels run)
    check_pair,
    check_positive,
    check_tensor,
    guard_device,
    stored_dtype,
)

__all__ = ["attention_transfer_backward", "attention_transfer_forward"]

# Elements of one [BLOCK_C, BLOCK_K] tile of a map: 16 per thread at 8 warps.
MAX_TILE = 4096
# The widest run of the contiguous axis in one tile (channels for
# channels_last, positions for NCHW): 256 · 4 bytes is eight 128-byte lines.
MAX_RUN = 256
# Per-sample kernels: chunk of HW positions per loop iteration.
MAX_ROW_BLOCK = 4096
# Offsets inside one sample are int32 (the sample base is int64).
MAX_SAMPLE_ELEMENTS = 2**31 - 1


@triton.jit
def _pow(x, P: tl.constexpr):
    # x^P for a constexpr P >= 1, by square-and-multiply over P's bits,
    # unrolled: the same products as the CPU kernel's pow_int
    if P == 1:
        result = x
    elif P == 2:
        result = x * x
    else:
        result = tl.full(x.shape, 1.0, tl.float32)
        base = x
        for i in tl.static_range(31):
            if (P >> i) & 1:
                result = result * base
            if (P >> (i + 1)) > 0:
                base = base * base
    return result


@triton.jit
def _tile_offsets(c0, k0, C, HW, stride_c, stride_k, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # [BLOCK_C, BLOCK_K] offsets inside one sample and their mask
    cs = c0 + tl.arange(0, BLOCK_C)
    ks = k0 + tl.arange(0, BLOCK_K)
    offs = cs[:, None] * stride_c + ks[None, :] * stride_k
    mask = (cs[:, None] < C) & (ks[None, :] < HW)
    return offs, mask


@triton.jit
def _attention_map_kernel(
    f_ptr,  # [N, C, H, W] maps, NCHW- or channels_last-contiguous
    v_ptr,  # [N, HW] float32 out: v_k = (1/C) Σ_c f_ck^P
    C,
    HW,
    stride_n,  # C·HW
    stride_c,  # HW (NCHW) or 1 (channels_last)
    stride_k,  # 1 (NCHW) or C (channels_last)
    inv_c,  # 1 / C
    P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    f_sample = f_ptr + n * stride_n
    # Σ over the channel chunks elementwise, one reduction over the tile at the end
    acc = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _tile_offsets(c0, k0, C, HW, stride_c, stride_k, BLOCK_C, BLOCK_K)
        f = tl.load(f_sample + offs, mask=mask, other=0.0).to(tl.float32)
        acc += _pow(f, P)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(v_ptr + n * HW + ks, tl.sum(acc, 0) * inv_c, mask=ks < HW)


@triton.jit
def _clamp_norm(norm, eps):
    # F.normalize's denominator max(‖v‖, eps), NaN kept
    return tl.where(norm < eps, eps, norm)


@triton.jit
def _at_loss_kernel(
    vs_ptr,  # [N, HW] float32 student v
    vt_ptr,  # [N, HW] float32 teacher v
    s_norm_ptr,  # [N] float32 out: ‖v_s‖
    t_norm_ptr,  # [N] float32 out: ‖v_t‖
    loss_ptr,  # [N] float32 out: Σ_k (a_s − a_t)²
    HW,
    eps,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    vs_row = vs_ptr + n * HW
    vt_row = vt_ptr + n * HW
    cols = tl.arange(0, BLOCK)
    sq_s = tl.zeros([BLOCK], tl.float32)
    sq_t = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, HW, BLOCK):
        ks = k0 + cols
        vs = tl.load(vs_row + ks, mask=ks < HW, other=0.0)
        vt = tl.load(vt_row + ks, mask=ks < HW, other=0.0)
        sq_s += vs * vs
        sq_t += vt * vt
    norm_s = tl.sqrt(tl.sum(sq_s, 0))
    norm_t = tl.sqrt(tl.sum(sq_t, 0))
    inv_s = 1.0 / _clamp_norm(norm_s, eps)
    inv_t = 1.0 / _clamp_norm(norm_t, eps)
    # L_n = Σ_k (a_s − a_t)²
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, HW, BLOCK):
        ks = k0 + cols
        vs = tl.load(vs_row + ks, mask=ks < HW, other=0.0)
        vt = tl.load(vt_row + ks, mask=ks < HW, other=0.0)
        d = vs * inv_s - vt * inv_t
        acc += d * d
    tl.store(s_norm_ptr + n, norm_s)
    tl.store(t_norm_ptr + n, norm_t)
    tl.store(loss_ptr + n, tl.sum(acc, 0))


@triton.jit
def _at_grad_coef_kernel(
    vs_ptr,  # [N, HW] float32 student v in; out: g_s = dL/dv_s
    vt_ptr,  # [N, HW] float32 teacher v in; out: g_t = dL/dv_t
    s_norm_ptr,  # [N] float32 ‖v_s‖ (saved by the forward)
    t_norm_ptr,  # [N] float32 ‖v_t‖
    upstream_ptr,  # [] float32 upstream gradient of L
    HW,
    factor,  # 2 / (N·HW)
    eps,
    BLOCK: tl.constexpr,
):
    # ga = dL/da_s = −dL/da_t = upstream · 2 (a_s − a_t) / (N·HW), then through
    # a = v / max(‖v‖, eps):  g = (ga − a (a·ga)) / ‖v‖  where ‖v‖ >= eps,
    # ga / eps otherwise (clamp_min passes the gradient at equality, as torch)
    n = tl.program_id(0).to(tl.int64)
    vs_row = vs_ptr + n * HW
    vt_row = vt_ptr + n * HW
    cols = tl.arange(0, BLOCK)
    f = tl.load(upstream_ptr).to(tl.float32) * factor
    norm_s = tl.load(s_norm_ptr + n)
    norm_t = tl.load(t_norm_ptr + n)
    den_s = _clamp_norm(norm_s, eps)
    den_t = _clamp_norm(norm_t, eps)
    dot_s = tl.zeros([BLOCK], tl.float32)
    dot_t = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, HW, BLOCK):
        ks = k0 + cols
        a_s = tl.load(vs_row + ks, mask=ks < HW, other=0.0) / den_s
        a_t = tl.load(vt_row + ks, mask=ks < HW, other=0.0) / den_t
        ga = f * (a_s - a_t)
        dot_s += a_s * ga
        dot_t += a_t * ga
    along_s = tl.where(norm_s >= eps, tl.sum(dot_s, 0), 0.0)
    along_t = tl.where(norm_t >= eps, tl.sum(dot_t, 0), 0.0)
    # In place: each element is read and rewritten by the same lane.
    for k0 in range(0, HW, BLOCK):
        ks = k0 + cols
        a_s = tl.load(vs_row + ks, mask=ks < HW, other=0.0) / den_s
        a_t = tl.load(vt_row + ks, mask=ks < HW, other=0.0) / den_t
        ga = f * (a_s - a_t)
        tl.store(vs_row + ks, (ga - a_s * along_s) / den_s, mask=ks < HW)
        tl.store(vt_row + ks, (a_t * along_t - ga) / den_t, mask=ks < HW)


@triton.jit
def _attention_map_grad_kernel(
    f_ptr,  # [N, C, H, W] maps, NCHW- or channels_last-contiguous
    g_ptr,  # [N, HW] float32 dL/dv
    out_ptr,  # [N, C, H, W] dL/df, the layout (and offsets) of f
    C,
    HW,
    stride_n,
    stride_c,
    stride_k,
    scale,  # p / C
    P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dL/df_ck = g_k · (p/C) · f_ck^(p−1)
    n = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    c0 = tl.program_id(2) * BLOCK_C
    ks = k0 + tl.arange(0, BLOCK_K)
    g = tl.load(g_ptr + n * HW + ks, mask=ks < HW, other=0.0) * scale
    offs, mask = _tile_offsets(c0, k0, C, HW, stride_c, stride_k, BLOCK_C, BLOCK_K)
    if P == 1:
        grad = tl.broadcast_to(g[None, :], [BLOCK_C, BLOCK_K])
    else:
        f = tl.load(f_ptr + n * stride_n + offs, mask=mask, other=0.0).to(tl.float32)
        grad = g[None, :] * _pow(f, P - 1)
    tl.store(out_ptr + n * stride_n + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)




def _reads_channels_last(x: torch.Tensor) -> bool:
    # csrc/cpu/attention_transfer.cpp: channels_last only when not also NCHW-contiguous
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class _Maps:
    """One map as the kernels read it: NCHW- or channels_last-contiguous, and its
    strides (computed, not ``x.stride()``: size-1 dims may report any stride)."""

    def __init__(self, x: torch.Tensor):
        self.channels_last = _reads_channels_last(x)
        self.data = x if self.channels_last or x.is_contiguous() else x.contiguous()
        n, c, h, w = x.shape
        self.channels, self.positions = c, h * w
        self.stride_n = c * h * w
        self.stride_c, self.stride_k = (1, c) if self.channels_last else (h * w, 1)

    def tile(self) -> tuple[int, int, int]:
        """(BLOCK_C, BLOCK_K, num_warps): the contiguous axis gets up to MAX_RUN
        elements, the other the rest of a MAX_TILE tile."""
        c = triton.next_power_of_2(self.channels)
        k = triton.next_power_of_2(self.positions)
        if self.channels_last:
            block_c = min(c, MAX_RUN)
            block_k = min(k, max(1, MAX_TILE // block_c))
        else:
            block_k = min(k, MAX_RUN)
            block_c = min(c, max(1, MAX_TILE // block_k))
        return block_c, block_k, 8 if block_c * block_k >= 2048 else 4

    def grad_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.empty(self.data.shape, dtype=dtype, device=self.data.device, memory_format=layout)


def _row_config(positions: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the per-sample kernels over HW positions."""
    block = min(triton.next_power_of_2(positions), MAX_ROW_BLOCK)
    return block, max(1, min(8, block // 256))


def _tiles(count: int, block: int, what: str) -> int:
    """Programs along a grid axis past the first (CUDA caps those at 65535)."""
    tiles = triton.cdiv(count, block)
    if tiles > 65535:
        raise ValueError(f"{count} {what} need {tiles} tiles of {block}, over the grid limit 65535")
    return tiles


def _attention_maps(maps: _Maps, p: int) -> torch.Tensor:
    """``(N, HW)`` float32 ``v = mean_c f^p``."""
    n = maps.data.shape[0]
    v = torch.empty((n, maps.positions), dtype=torch.float32, device=maps.data.device)
    block_c, block_k, num_warps = maps.tile()
    _attention_map_kernel[(n, _tiles(maps.positions, block_k, "positions"))](
        maps.data, v, maps.channels, maps.positions, maps.stride_n, maps.stride_c, maps.stride_k,
        1.0 / maps.channels, P=p, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
    )
    return v


def _check_maps(student, teacher, p, eps) -> None:
    """The checks of csrc/cpu/attention_transfer.cpp (check_at_args) as ValueError."""
    for name, x in (("student", student), ("teacher", teacher)):
        check_tensor(name, x, 4, "N, C, H, W")
        if x.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
        if x[0].numel() > MAX_SAMPLE_ELEMENTS:
            raise ValueError(f"{name} has {x[0].numel()} elements per sample, over {MAX_SAMPLE_ELEMENTS}")
    check_pair("student", student, "teacher", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same batch size N, got {student.shape[0]}, {teacher.shape[0]}"
        )
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same "
            "spatial size (pool the larger map first)"
        )
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p < 2**31:
        raise ValueError(f"p must be an integer in [1, 2**31), got {p!r}")
    check_positive("eps", eps)


@guard_device
def attention_transfer_forward(
    student: torch.Tensor, teacher: torch.Tensor, p: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention-transfer loss and the map norms; the contract of ``fastkd::attention_transfer_forward``.

    Args:
        student: ``(N, C_s, H, W)`` maps, float32 / bfloat16 / float16, any strides.
        teacher: ``(N, C_t, H, W)``, same dtype, device, N and spatial size.
        p: the power, an integer ``>= 1``.
        eps: F.normalize's eps (``> 0``).

    Returns:
        ``loss`` ``()`` float32, ``1/(N·HW) Σ (a_s − a_t)²``; ``s_norm`` and
        ``t_norm`` ``(N,)`` float32, the norms ``‖v‖`` the backward takes.
    """
    _check_maps(student, teacher, p, eps)
    s_maps, t_maps = _Maps(student), _Maps(teacher)
    n, hw = student.shape[0], s_maps.positions
    v_s, v_t = _attention_maps(s_maps, p), _attention_maps(t_maps, p)
    s_norm = torch.empty(n, dtype=torch.float32, device=student.device)
    t_norm = torch.empty_like(s_norm)
    row_loss = torch.empty_like(s_norm)
    block, num_warps = _row_config(hw)
    _at_loss_kernel[(n,)](
        v_s, v_t, s_norm, t_norm, row_loss, hw, float(eps), BLOCK=block, num_warps=num_warps
    )
    # Each sample's sum comes from one program: the loss does not depend on
    # the launch, and torch sums the N row losses in a fixed order.
    return row_loss.sum() / (n * hw), s_norm, t_norm


@guard_device
def attention_transfer_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    s_norm: torch.Tensor,
    t_norm: torch.Tensor,
    p: int,
    eps: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the attention-transfer loss; the contract of ``fastkd::attention_transfer_backward``.

    Args:
        grad: one-element upstream gradient of the loss (read on the device: no sync).
        student, teacher, p, eps: as for :func:`attention_transfer_forward`.
        s_norm, t_norm: ``(N,)`` float32 norms from the forward.
        student_grad, teacher_grad: which gradients to compute.

    Returns:
        ``grad_student`` and ``grad_teacher``, each the shape and dtype of its
        map (channels_last for channels_last input, else NCHW-contiguous), or
        ``(0,)`` when not requested.
    """
    _check_maps(student, teacher, p, eps)
    n = student.shape[0]
    if not isinstance(grad, torch.Tensor) or grad.numel() != 1:
        raise ValueError(f"grad must be a one-element tensor, got {getattr(grad, 'shape', type(grad))}")
    if grad.device != student.device:
        raise ValueError(f"grad ({grad.device}) must be on student's device ({student.device})")
    for name, norm in (("s_norm", s_norm), ("t_norm", t_norm)):
        if not isinstance(norm, torch.Tensor) or norm.shape != (n,) or norm.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor of shape ({n},), got {norm!r:.80}")
        if norm.device != student.device:
            raise ValueError(f"{name} ({norm.device}) must be on student's device ({student.device})")
    s_maps, t_maps = _Maps(student), _Maps(teacher)
    empty = student.new_empty((0,))
    if not (student_grad or teacher_grad):
        return empty, teacher.new_empty((0,))
    hw = s_maps.positions
    g_s, g_t = _attention_maps(s_maps, p), _attention_maps(t_maps, p)
    block, num_warps = _row_config(hw)
    _at_grad_coef_kernel[(n,)](
        g_s, g_t, s_norm.contiguous(), t_norm.contiguous(), grad.reshape(()).to(torch.float32),
        hw, 2.0 / (n * hw), float(eps), BLOCK=block, num_warps=num_warps,
    )
    out = []
    for maps, g, wanted in ((s_maps, g_s, student_grad), (t_maps, g_t, teacher_grad)):
        if not wanted:
            out.append(maps.data.new_empty((0,)))
            continue
        result = maps.grad_buffer(stored_dtype(maps.data.dtype))
        block_c, block_k, num_warps = maps.tile()
        grid = (n, _tiles(hw, block_k, "positions"), _tiles(maps.channels, block_c, "channels"))
        _attention_map_grad_kernel[grid](
            maps.data, g, result, maps.channels, hw, maps.stride_n, maps.stride_c, maps.stride_k,
            float(p) / maps.channels, P=p, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
        )
        out.append(result.to(maps.data.dtype))
    return out[0], out[1]
