"""``gather=True`` for InfoNCE and MMD: two gloo processes on CPU against the
single-process computation on the concatenated batch. Each rank's loss must
equal the global loss and its gradient ``world_size`` × the global loss's
gradient with respect to its own rows (fastkd.distributed)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd import _ops
from tests.helpers import assert_matches

pytestmark = pytest.mark.skipif(
    _ops.CPU_EXTENSION_ERROR is not None or not dist.is_available(),
    reason="needs fastkd._C and torch.distributed",
)

WORLD = 2
UPSTREAM = 0.7
ROWS = 5  # per rank


def cases():
    """name → (loss(a, b, **kwargs), rows of a and of b per rank, labels per rank or None)."""
    g = torch.Generator().manual_seed(7)
    labels = [torch.randint(ROWS + 3, (ROWS,), generator=g) for _ in range(WORLD)]
    return {
        "info_nce_reference": (
            lambda a, b, **kw: fastkd.info_nce(a, b, backend="reference", **kw),
            ROWS,
            ROWS,
            None,
        ),
        "info_nce_symmetric_cpu": (
            lambda a, b, **kw: fastkd.info_nce(a, b, symmetric=True, normalize=True, backend="cpu", **kw),
            ROWS,
            ROWS,
            None,
        ),
        "info_nce_labels_cpu": (
            lambda a, b, labels=None, **kw: fastkd.info_nce(a, b, labels=labels, backend="cpu", **kw),
            ROWS,
            ROWS + 3,
            labels,
        ),
        "mmd_gaussian_cpu": (
            lambda a, b, **kw: fastkd.mmd_loss(a, b, backend="cpu", **kw),
            ROWS,
            ROWS + 2,
            None,
        ),
        # the module forms, gather passed at construction
        "info_nce_module_cpu": (
            lambda a, b, gather=False, **kw: fastkd.InfoNCELoss(normalize=True, backend="cpu", gather=gather)(
                a, b, **kw
            ),
            ROWS,
            ROWS,
            None,
        ),
        "mmd_module_laplacian_cpu": (
            lambda a, b, gather=False, **kw: fastkd.MMDLoss(kernel="laplacian", backend="cpu", gather=gather)(
                a, b, **kw
            ),
            ROWS,
            ROWS + 2,
            None,
        ),
        "mmd_unbiased_reference": (
            lambda a, b, **kw: fastkd.mmd_loss(a, b, unbiased=True, backend="reference", **kw),
            ROWS,
            ROWS + 2,
            None,
        ),
    }


def inputs(rank: int, rows_a: int, rows_b: int):
    g = torch.Generator().manual_seed(100 + rank)
    a = torch.randn(rows_a, 6, generator=g, dtype=torch.float64) / 2
    b = torch.randn(rows_b, 6, generator=g, dtype=torch.float64) / 2
    return a, b


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {}
        for name, (fn, rows_a, rows_b, labels) in cases().items():
            a, b = (t.requires_grad_(True) for t in inputs(rank, rows_a, rows_b))
            extra = {} if labels is None else {"labels": labels[rank]}
            loss = fn(a, b, gather=True, **extra)
            loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
            results[name] = (loss.detach(), a.grad, b.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other finishes
    finally:
        dist.destroy_process_group()


def test_gather_matches_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, (fn, rows_a, rows_b, labels) in cases().items():
        parts = [inputs(r, rows_a, rows_b) for r in range(WORLD)]
        a = torch.cat([p[0] for p in parts]).requires_grad_(True)
        b = torch.cat([p[1] for p in parts]).requires_grad_(True)
        extra = {}
        if labels is not None:
            extra["labels"] = torch.cat([lab + r * rows_b for r, lab in enumerate(labels)])
        loss = fn(a, b, **extra)
        loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
        for r in range(WORLD):
            got_loss, got_a, got_b = per_rank[r][name]
            assert_matches(got_loss, loss.detach(), torch.float64, f"{name} loss, rank {r}")
            own_a = a.grad[r * rows_a : (r + 1) * rows_a] * WORLD
            own_b = b.grad[r * rows_b : (r + 1) * rows_b] * WORLD
            assert_matches(got_a, own_a, torch.float64, f"{name} grad a, rank {r}")
            assert_matches(got_b, own_b, torch.float64, f"{name} grad b, rank {r}")


def test_module_gather_must_be_a_bool():
    with pytest.raises(ValueError, match="gather must be a bool"):
        fastkd.InfoNCELoss(gather="yes")
    with pytest.raises(ValueError, match="gather must be a bool"):
        fastkd.MMDLoss(gather=1)


def test_gather_without_process_group_raises():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        fastkd.info_nce(torch.randn(3, 4), torch.randn(3, 4), gather=True)
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        fastkd.mmd_loss(torch.randn(3, 4), torch.randn(3, 4), gather=True)
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        fastkd.InfoNCELoss(gather=True)(torch.randn(3, 4), torch.randn(3, 4))
