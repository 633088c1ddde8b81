"""Shared machinery of the embedding / feature-map property tests: inputs with
a given layout, one run of a loss with a non-unit upstream gradient, and the
parity check of a backend against the float64 reference (with the reference
run in the input dtype as the baseline)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from fastkd import _dispatch
from tests.helpers import DEVICE, assert_matches

# Layouts of a 2-D input built from a contiguous leaf inside the graph, so the
# gradient reaches the leaf through the view.
LAYOUTS_2D = ("contiguous", "transposed", "sliced", "expanded")
# Layouts of a 4-D (N, C, H, W) feature map.
LAYOUTS_4D = ("contiguous", "channels_last", "sliced", "expanded")


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    """The floating dtypes ``backend`` takes (float64 on the reference and cpu)."""
    if backend == "reference":
        return (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    return tuple(d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
                 if d in _dispatch.KERNEL_DTYPES[backend])


def leaf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape of the contiguous leaf from which :func:`apply_layout` builds ``shape``."""
    if layout == "transposed":
        return (shape[1], shape[0]) + tuple(shape[2:])
    if layout == "sliced":
        return (shape[0], 2 * shape[1]) + tuple(shape[2:])
    if layout == "expanded":
        # stride 0 along the last dim: each row (or spatial row) repeats one value
        return tuple(shape[:-1]) + (1,)
    return tuple(shape)


def apply_layout(leaf: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A view (or, for channels_last, a differentiable copy) of ``leaf`` with ``shape``."""
    if layout == "transposed":
        out = leaf.transpose(0, 1)
    elif layout == "sliced":
        out = leaf[:, ::2]
    elif layout == "expanded":
        out = leaf.expand(*shape)
    elif layout == "channels_last":
        out = leaf.contiguous(memory_format=torch.channels_last)
    else:
        out = leaf
    assert tuple(out.shape) == tuple(shape), (out.shape, shape)
    return out


@dataclass
class Operand:
    """One tensor argument: its shape, layout, float64 values (of the leaf), and
    whether its gradient is part of the contract."""

    shape: tuple[int, ...]
    layout: str = "contiguous"
    grad: bool = True
    values: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # fixed dtype (e.g. a CRD bank), else the test's dtype
    integer: bool = False  # an index tensor, passed as is


def make_values(shape, seed: int, *, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset


def run_once(fn: Callable, operands: list[Operand], dtype: torch.dtype, upstream: float):
    """(loss, [gradients of the leaves with grad=True]) of ``fn(*args)``, the
    leaves rounded to ``dtype`` (their own dtype where fixed)."""
    leaves, args = [], []
    for op in operands:
        if op.integer:
            args.append(op.values.to(DEVICE))
            leaves.append(None)
            continue
        leaf = op.values.to(device=DEVICE, dtype=op.dtype or dtype).detach().requires_grad_(op.grad)
        leaves.append(leaf)
        args.append(apply_layout(leaf, op.shape, op.layout))
    out = fn(*args)
    loss = out[0] if isinstance(out, tuple) else out
    wanted = [leaf for leaf, op in zip(leaves, operands, strict=True) if op.grad and not op.integer]
    grads = []
    if wanted:
        loss.backward(torch.full_like(loss, upstream))
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in wanted]
    return loss.detach(), grads


def rounded(operands: list[Operand], dtype: torch.dtype) -> list[Operand]:
    """``operands`` with their values rounded to ``dtype`` and held in float64."""
    out = []
    for op in operands:
        if op.integer:
            out.append(op)
            continue
        values = op.values.to(op.dtype or dtype).to(torch.float64)
        out.append(Operand(op.shape, op.layout, op.grad, values))
    return out


def reordered(reference: Callable, dim: int) -> Callable:
    """``reference`` on its 2-D float arguments reversed along ``dim``: -1 the
    feature columns (these losses see features only through dot products,
    norms and distances), 0 the rows (for losses symmetric in the samples,
    every argument's rows reversed together). The same loss with another
    rounding: one more summation order for the baselines of
    :func:`check_against_reference`."""

    def run(*args):
        return reference(*[a.flip(dim) if a.dim() == 2 and a.dtype.is_floating_point else a for a in args])

    return run


def check_against_reference(fused: Callable, reference: Callable, operands: list[Operand],
                            dtype: torch.dtype, upstream: float, what: str,
                            *, check_grads: bool = True, reorder: tuple[int, ...] = ()) -> None:
    """Loss and gradients of ``fused`` on ``dtype`` inputs match ``reference``
    on the same (rounded) values in float64; the reference on the ``dtype``
    inputs is the baseline. ``reorder`` names the dims (see :func:`reordered`)
    along which the arguments may be reversed without changing the loss: the
    reference on those orders is a further baseline each, so that an
    ill-conditioned case (near-duplicate rows under the Gram form, PKT's
    P ~ eps, a row of tiny norm) is judged against the reference's own
    sensitivity to rounding, float64 included."""
    got = run_once(fused, operands, dtype, upstream)
    want = run_once(reference, rounded(operands, dtype), torch.float64, upstream)
    baselines = [run_once(reference, operands, dtype, upstream)] if dtype != torch.float64 else []
    baselines += [run_once(reordered(reference, dim), operands, dtype, upstream) for dim in reorder]
    assert_matches(got[0], want[0], dtype, f"{what} loss", tuple(b[0] for b in baselines))
    if not check_grads:
        return
    for i, (a, b) in enumerate(zip(got[1], want[1], strict=True)):
        assert a.dtype == operands_grad_dtype(operands, i, dtype), (what, a.dtype)
        assert_matches(a, b, dtype, f"{what} grad[{i}]", tuple(c[1][i] for c in baselines))


def operands_grad_dtype(operands: list[Operand], i: int, dtype: torch.dtype) -> torch.dtype:
    ops = [op for op in operands if op.grad and not op.integer]
    return ops[i].dtype or dtype


# ---- strategies -------------------------------------------------------------

UPSTREAMS = st.sampled_from((0.7, -1.3, 2.5))
SEEDS = st.integers(0, 2**16)
SCALES = st.sampled_from((1.0, 1e-2, 30.0))


def operand(draw, shape, *, layouts=LAYOUTS_2D, grad=True, seed=None, scale=1.0, offset=0.0, dtype=None):
    """An :class:`Operand` of ``shape`` in a drawn layout (one of ``layouts``), its values
    make_values(seed) (a drawn seed unless given) times ``scale`` plus ``offset``."""
    layout = draw(st.sampled_from(layouts))
    values = make_values(leaf_shape(shape, layout), draw(SEEDS) if seed is None else seed,
                         scale=scale, offset=offset)
    return Operand(tuple(shape), layout, grad, values, dtype)
