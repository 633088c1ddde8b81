"""The CPU kernels' size-dependent paths at sizes that reach them: several full
blocks (tiles, chunks, grains) of a compile-time constant plus a partial last
one, against the float64 reference, loss and gradients, upstream 0.7.

The shared parity shapes of each family stop well below these constants (N = 37,
V = 301, T = 70, ...), so a kernel that drops or miscounts its second block, or
the remainder after several full ones, passes every other test of the family.
Each test names the constant (csrc/cpu/...) it reaches and why its size was
chosen. CPU tensors and ``backend="cpu"`` throughout, whatever FASTKD_TEST_DEVICE.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _ops, reference
from fastkd.reference import attention_relation as reference_attention
from fastkd.reference import uld as reference_uld
from tests.helpers import UPSTREAM, assert_matches_at_scale

pytestmark = pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR))


def randn(shape, seed, scale=1.0, dtype=torch.float32):
    """float64 draws (seeded) rounded to ``dtype``, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def run(fn, inputs, wrt):
    """(loss, d(0.7 · loss)/d inputs[i] for i in ``wrt``) on fresh leaf copies of ``inputs``."""
    leaves = [x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    loss = fn(*leaves)
    loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
    return (loss.detach(), *(leaves[i].grad for i in wrt))


def parity(fused, ref, inputs, what, wrt=(0, 1)):
    """Loss and the gradients of ``inputs[i]`` (``i`` in ``wrt``) of ``fused`` (cpu) against ``ref``
    in float64, upstream 0.7, with the tolerance of the inputs' dtype widened by the error of
    ``ref`` in that dtype (assert_matches). Each result is compared relative to the largest
    entry of its float64 value: the losses here are means over N² pairs and their gradients
    as small as 1e-10, where the float32 atol (1e-6) alone would let any error through."""
    dtype = inputs[0].dtype
    got = run(fused, inputs, wrt)
    want = run(ref, [x.double() for x in inputs], wrt)
    same = run(ref, inputs, wrt)
    names = ("loss", *(f"grad {i}" for i in wrt))
    for name, a, b, c in zip(names, got, want, same, strict=True):
        assert_matches_at_scale(a, b, dtype, f"{what} {name}", [c])


# ---- attention_relation.cpp: kRowBlock = 64 rows, kKeyTile = 256 keys ---------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_relation_across_key_tiles(causal):
    """T = 600 = 2 · 256 + 88 keys: two full kKeyTile key tiles and a partial
    third, over 9 full kRowBlock row blocks and a partial tenth (24 rows), with
    the online softmax statistics carried across the tiles in the forward and
    the score tiles recomputed in the backward. The family's own tests reach
    T = 70 (one key tile) without causality and T = 300 with it (one full key
    tile and a remainder, in the last row blocks only). A few masked positions
    fall inside the second and third key tiles."""
    s, t = randn((1, 600, 8), 1), randn((1, 600, 12), 2)
    mask = torch.ones(1, 600, dtype=torch.bool)
    mask[0, [5, 300, 511, 512, 599]] = False
    kwargs = dict(num_relation_heads=2, mask=mask, causal=causal)
    parity(lambda a, b: fastkd.attention_relation_loss(a, b, backend="cpu", **kwargs),
           lambda a, b: reference_attention.attention_relation_loss(a, b, **kwargs),
           [s, t], f"attention_relation T=600 causal={causal}")


# ---- gram_relation_kernel.cpp: kBlock = 1024; gram_relation.cpp: kTile = 64;
# ---- thread_invariant_mm.h: kMaxBlockRows = 256 ------------------------------------------------

GRAM = {
    "sp_loss": (fastkd.sp_loss, reference.sp_loss),
    "pkt_loss": (fastkd.pkt_loss, reference.pkt_loss),
    "cc_loss": (fastkd.cc_loss, reference.cc_loss),
}


@pytest.mark.parametrize("name", GRAM)
def test_gram_relation_rows_of_several_blocks(name):
    """N = 2085 = 2 · 1024 + 37: each Gram row's sums (norms, row sums, loss
    terms, gradient projections) run over two full kBlock blocks of lanes and a
    partial third whose 37 entries end in a SIMD tail; dG + dGᵀ is formed over
    32 full kTile × kTile tiles per side and a partial 33rd; and dX = (dG + dGᵀ) X
    (thread_invariant_mm) runs over 8 full kMaxBlockRows blocks and one of 37
    rows. The family's other tests stop at N = 203 (one lane block, at most two
    matmul blocks) for correctness and N = 600 for the buffer cache."""
    fn, ref = GRAM[name]
    s, t = randn((2085, 24), 3), randn((2085, 16), 4)
    parity(lambda a, b: fn(a, b, backend="cpu"), ref, [s, t], f"{name} N=2085", wrt=(0,))


def test_rkd_distance_product_of_several_row_blocks():
    """rkd_distance at N = 600 = 2 · 256 + 88: its far-pair gradient D X is a
    thread_invariant_mm of three row blocks (two full kMaxBlockRows ones and 88
    rows); the RKD parity shapes stop at N = 37 (two blocks of 19 and 18 rows)."""
    s, t = randn((600, 6), 5), randn((600, 4), 6)
    parity(lambda a, b: fastkd.rkd_distance(a, b, backend="cpu"), reference.rkd_distance, [s, t],
           "rkd_distance N=600", wrt=(0,))


# ---- mmd.cpp: kChunkElements = 1 << 14, kWidth = 64; thread_invariant_mm.h -----------------------

MMD_KERNELS = {
    "gaussian": {"kernel": "gaussian"},
    "laplacian": {"kernel": "laplacian"},
    "polynomial": {"kernel": "polynomial", "degree": 3, "c": 2.0},
}


@pytest.mark.parametrize("kernel", MMD_KERNELS)
def test_mmd_chunks_and_column_sums(kernel):
    """x (600, 24), y (300, 24): one tile of all 600 rows (tile_rows = 2²² / 600),
    whose elementwise passes and ordered sums run in fixed row chunks of
    kChunkElements / cols rows (x–x: 22 full chunks of 27 rows and one of 6;
    x–y and y–y: 5 or 11 full chunks of 54 and a partial one), the cross term's
    column sums over 4 full kWidth = 64 column chunks and one of 44, and the
    gradient products over 2 full kMaxBlockRows blocks and one of 88 rows. The
    MMD parity tests stop at 53 columns (one chunk, one column chunk) and the
    large-N cpu test checks the gaussian loss only."""
    x, y = randn((600, 24), 7, 24**-0.5), randn((300, 24), 8, 24**-0.5) + 0.3
    kwargs = MMD_KERNELS[kernel]
    parity(lambda a, b: fastkd.mmd_loss(a, b, backend="cpu", **kwargs),
           lambda a, b: reference.mmd_loss(a, b, **kwargs), [x, y], f"mmd {kernel} 600x300")


# ---- info_nce_kernel.cpp: kGrainElements = 1 << 15 ----------------------------------------------


@pytest.fixture
def two_threads():
    """At least two intra-op threads, so that a parallel_for of two or more grains splits into tasks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("budget", [2**62, 0], ids=["keep", "recompute"])
def test_info_nce_rows_of_several_grains(budget, two_threads):
    """600 × 600 logits: kGrainElements / 600 = 54 rows a grain, 11 full grains and
    6 rows, so the row passes (row maxima, log-sum-exps, the softmax and its
    gradient in place) run as several parallel_for tasks whose first row is not
    row 0. The InfoNCE parity shapes stop at 37 × 37 (one grain, one task).
    Both modes: the kept softmax and the recomputed tile."""
    q, k = randn((600, 32), 9, 32**-0.5), randn((600, 32), 10, 32**-0.5)
    parity(lambda a, b: fastkd.info_nce(a, b, backend="cpu", logits_memory_budget=budget),
           reference.info_nce, [q, k], f"info_nce 600x600 budget {budget}")


# ---- uld_kernel.cpp: kBlock = 1024 --------------------------------------------------------------


def test_uld_softmax_rows_of_several_blocks():
    """float32 softmax rows (the SIMD row softmax of uld_kernel.cpp) of V_s =
    2085 = 2 · 1024 + 37 and V_t = 2600 = 2 · 1024 + 552 entries: two full kBlock
    blocks of exponentials and a partial third ending in a scalar tail, and the
    gradients through those probabilities. The ULD tests check such wide
    softmax rows for the loss only (8000 = 7 · 1024 + 832, no scalar tail);
    their gradient tests use log-probability rows, which skip the softmax. The
    two sides' scales differ (1 and 3) so that sorted values cross rarely and
    float32 orders them as float64 does."""
    s, t = randn((3, 2085), 11), randn((3, 2600), 12, 3.0)
    upstream = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)

    def rows_and_grads(backend, dtype):
        a, b = s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
        if backend is None:
            rows = reference_uld.uld_loss(a, b, reduction="none")
        else:
            rows = fastkd.uld_loss(a, b, backend=backend, reduction="none")
        grads = torch.autograd.grad((rows * upstream.to(dtype)).sum(), (a, b))
        return (rows.detach(), *grads)

    got = rows_and_grads("cpu", torch.float32)
    want = rows_and_grads(None, torch.float64)
    same = rows_and_grads(None, torch.float32)
    for name, a, b, c in zip(("rows", "student grad", "teacher grad"), got, want, same, strict=True):
        assert_matches_at_scale(a, b, torch.float32, f"uld 2085 / 2600 {name}", [c])


# ---- fused_linear_gemm.cpp: kKBlock = 4096, kMinTiles = 16, kTileRows = 128, kTileCols = 512 ------


def test_fused_linear_long_reduction_split_into_k_blocks():
    """V = 12289 = 3 · 4096 + 1, N = 40 rows, float64. The hidden-state gradient
    dlogits @ W (a 40 × 32 output: one tile < kMinTiles, K = V ≥ 2 · kKBlock) takes
    the K-split path: min(kMinTiles, V / kKBlock) = 3 blocks of ⌈V / 3⌉ = 4097
    columns, the last 4095, summed in block order. The logits (40 × V: 24 full
    kTileCols column tiles and one of 1 column) and the weight gradient (V × 32:
    96 full kTileRows row tiles and one of 1 row) take the tiled path. The
    fused-head parity tests stop at V = 2000 (no K split); the thread-count test
    reaches the split at V = 9000 (two equal blocks) but checks only that the
    bits do not change with the thread count."""
    n, h_s, h_t, vocab = 40, 32, 24, 12289
    f64 = torch.float64
    hs, bs = randn((n, h_s), 13, dtype=f64), randn((vocab,), 15, dtype=f64)
    ws = randn((vocab, h_s), 14, h_s**-0.5 * 2, f64)
    ht, wt = randn((n, h_t), 16, dtype=f64), randn((vocab, h_t), 17, h_t**-0.5 * 2, f64)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(18))
    labels[1] = -100
    kwargs = dict(labels=labels, hard_weight=0.5, temperature=2.0)

    def fused(a, w, b):
        return fastkd.fused_linear_divergence(a, w, ht, wt, student_bias=b, backend="cpu", **kwargs)

    def ref(a, w, b):
        return reference.fused_linear_divergence(a, w, ht, wt, student_bias=b, **kwargs)

    parity(fused, ref, [hs, ws, bs], f"fused_linear V={vocab}", wrt=(0, 1, 2))
