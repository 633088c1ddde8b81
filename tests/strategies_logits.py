"""Input builders and hypothesis strategies for the logit-family property tests
(tests/test_properties_logits.py): memory layouts, vocabulary sizes around
the kernels' block boundaries, and the parity harness that runs one call on a
backend, on the float64 reference and on the reference in the input dtype."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import strategies as st

from tests.helpers import DEVICE, assert_matches

# Vocabulary sizes at the kernels' block boundaries: SIMD widths of the cpu
# backend (8 / 16 lanes for float32 with AVX2 / AVX-512, 4 / 8 for float64),
# and the Triton chunk (BLOCK = 4096 in kernels/divergence.py, topk.py and
# dkd.py; kernels/mixture.py's [TEACHER_BLOCK, BLOCK] tile of 8192 elements
# in the interpreter, i.e. BLOCK = 4096 for 2 teachers, 2048 for 3-4).
VOCAB_EDGES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 2047, 2049, 4095, 4096, 4097)
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Memory layouts of an (N, V) input: the kernels take any row stride with a
# unit column stride, and the Python layer copies the rest.
LAYOUTS = ("contiguous", "transposed", "row_stride", "col_offset")
IGNORE_INDEX = -100


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    """Input dtypes ``backend`` takes (float64 on the reference and cpu only)."""
    low = (torch.float32, torch.bfloat16, torch.float16)
    return low + ((torch.float64,) if backend in ("reference", "cpu") else ())


def vocab_sizes(largest: int = 300) -> st.SearchStrategy[int]:
    """A SIMD-width boundary, a Triton block boundary (each about a third of the
    draws), or any size up to ``largest``."""
    small = tuple(v for v in VOCAB_EDGES if v <= largest)
    large = tuple(v for v in VOCAB_EDGES if v > largest)
    return st.one_of(st.sampled_from(small), st.sampled_from(large), st.integers(1, largest))


def row_counts(max_rows: int = 8) -> st.SearchStrategy[int]:
    """N = 0 and N = 1 a fifth of the draws each, else 2..``max_rows``."""
    many = st.integers(2, max_rows)
    return st.one_of(many, many, many, st.just(1), st.just(0))


def temperatures() -> st.SearchStrategy[float]:
    """The contract's range 0.05..100, log-uniform, ends included."""
    return st.one_of(
        st.sampled_from((0.05, 1.0, 100.0)),
        st.floats(math.log(0.05), math.log(100.0)).map(lambda x: min(max(math.exp(x), 0.05), 100.0)),
    )


def unit_interval() -> st.SearchStrategy[float]:
    """β or α in [0, 1]: the exact endpoints (special-cased) or an interior value."""
    return st.one_of(st.sampled_from((0.0, 1.0, 0.5)), st.floats(0.0, 1.0))


def lead_shapes(max_rows: int = 8) -> st.SearchStrategy[tuple[int, ...]]:
    """Leading dims of at most ``max_rows`` rows: ``(N,)`` with N = 0 and 1 included, or ``(B, T)``."""
    flat = row_counts(max_rows).map(lambda n: (n,))
    split = st.tuples(st.integers(1, 2), st.integers(1, max_rows // 2))
    return st.one_of(flat, flat, flat, split)


def randn(shape, gen: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    """float64 normal values (CPU, from ``gen``)."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * spread


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (..., V) with the same values in ``layout``; 2-D layouts only for 2-D ``x``.

    The storage around a strided view is filled with NaN: a kernel that reads
    outside the view makes the result NaN.
    """
    if layout == "contiguous" or x.dim() != 2:
        return x.contiguous()
    rows, vocab = x.shape
    if layout == "transposed":  # column-major (V, N)ᵀ
        return x.t().contiguous().t()
    if layout == "row_stride":  # every other row of a wider buffer
        big = torch.full((2 * rows, vocab + 3), math.nan, dtype=x.dtype, device=x.device)
        big[::2, 1 : vocab + 1] = x
        return big[::2, 1 : vocab + 1]
    if layout == "col_offset":  # a column slice: row stride V + 5, storage offset 5
        big = torch.full((rows, vocab + 5), math.nan, dtype=x.dtype, device=x.device)
        big[:, 5:] = x
        return big[:, 5:]
    raise ValueError(f"unknown layout {layout!r}")


def make(values64: torch.Tensor, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """``values64`` rounded to ``dtype``, on DEVICE, in ``layout``."""
    return with_layout(values64.to(device=DEVICE, dtype=dtype), layout)


def row_selectors(lead, vocab: int, selector: str, gen: torch.Generator):
    """``(labels, mask)`` for ``selector`` in none / labels / mask / both: labels are class
    ids in [0, V) with about a third of the rows ``IGNORE_INDEX``; the mask drops about a third."""
    labels = mask = None
    if selector in ("labels", "both"):
        labels = torch.randint(0, vocab, tuple(lead), generator=gen)
        labels[torch.rand(tuple(lead), generator=gen) < 0.35] = IGNORE_INDEX
        labels = labels.to(DEVICE)
    if selector in ("mask", "both"):
        mask = (torch.rand(tuple(lead), generator=gen) > 0.35).to(DEVICE)
    return labels, mask


def upstream_for(loss: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random upstream gradient, never 1: one value per row for ``"none"``, a scalar otherwise."""
    if loss.dim() == 0:
        return torch.tensor(0.25 + 1.5 * torch.rand((), generator=gen).item(), dtype=loss.dtype)
    values = torch.rand(tuple(loss.shape), generator=gen, dtype=torch.float64) * 3.0 - 1.0
    return values.to(device=loss.device, dtype=loss.dtype)


def run(call: Callable, tensors: dict, grad_names, upstream_seed: int):
    """``(loss, {name: grad})`` of ``call(**tensors)`` for the inputs in ``grad_names``.

    Each input is a fresh leaf sharing the given tensor's storage and strides
    (the kernels see the layout); the upstream gradient comes from
    ``upstream_seed`` (the same for every run of one example).
    """
    leaves = {}
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if name in grad_names:
                x.requires_grad_(True)
        leaves[name] = x
    loss = call(**leaves)
    if grad_names:
        loss.backward(upstream_for(loss, torch.Generator().manual_seed(upstream_seed)))
    return loss.detach(), {name: leaves[name].grad for name in grad_names}


def to_float64(tensors: dict) -> dict:
    """Floating tensors in float64 (same values); the rest as given."""
    return {
        k: v.detach().double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v
        for k, v in tensors.items()
    }


def permutations(vocab: int, samples: int):
    """``(perm, inverse)`` pairs: the identity, then ``samples − 1`` random orders of the vocabulary."""
    out = []
    for k in range(samples):
        gen = torch.Generator().manual_seed(k)
        perm = torch.arange(vocab) if k == 0 else torch.randperm(vocab, generator=gen)
        out.append((perm.to(DEVICE), torch.argsort(perm).to(DEVICE)))
    return out


def remap_labels(labels, inverse):
    """Class ids renamed for a permuted vocabulary (``IGNORE_INDEX`` kept)."""
    if labels is None:
        return None
    kept = labels != IGNORE_INDEX
    return torch.where(kept, inverse[labels.clamp_min(0)], labels)


def check_parity(
    backend: str,
    call: Callable,
    tensors: dict,
    grad_names,
    dtype: torch.dtype,
    permute: Callable,
    vocab: int,
    upstream_seed: int,
    *,
    per_row: bool = False,
    samples: int = 6,
    what: str = "",
) -> None:
    """``call(backend, **tensors)`` against ``call("reference", **float64 tensors)``.

    ``permute(tensors, perm, inverse) -> (tensors', {name: grad -> grad in the
    original order})`` renames the vocabulary: the same loss with a different
    rounding, the reference's pass mark (tests/helpers.py
    assert_matches, the baseline rule). Loss and every gradient must match,
    NaN / ±inf pattern included; ``per_row`` also checks each row loss of
    ``reduction="none"`` against its own tolerance.
    """
    got = run(lambda **x: call(backend, **x), tensors, grad_names, upstream_seed)
    want = run(lambda **x: call("reference", **x), to_float64(tensors), grad_names, upstream_seed)
    baselines = []
    for perm, inverse in permutations(vocab, samples):
        permuted, back = permute(tensors, perm, inverse)
        loss, grads = run(lambda **x: call("reference", **x), permuted, grad_names, upstream_seed)
        baselines.append((loss, {n: back[n](g) for n, g in grads.items()}))
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == accumulate, f"{what} {backend}: loss dtype {got[0].dtype}"
    assert_matches(got[0], want[0], dtype, f"{what} {backend} loss", tuple(b[0] for b in baselines),
                   elementwise=per_row)
    for name in grad_names:
        assert got[1][name].dtype == dtype, f"{what} {backend}: {name} grad dtype {got[1][name].dtype}"
        assert_matches(got[1][name], want[1][name], dtype, f"{what} {backend} grad {name}",
                       tuple(b[1][name] for b in baselines))
