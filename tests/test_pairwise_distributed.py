"""``gather=True`` for the pairwise-relation losses (RKD, PKT, SP, CC): two gloo
processes on CPU against the single-process computation on the concatenated batch."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd import _ops

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR)),
]

WORLD = 2
ROWS = 7  # per rank
UPSTREAM = 0.7
LOSSES = {
    "rkd_distance": {},
    "rkd_angle": {},
    "rkd_loss": {"distance_weight": 2.0, "angle_weight": 3.0},
    "pkt_loss": {},
    "sp_loss": {},
    "cc_loss": {"gamma": 0.3},
}


def batch():
    """The whole batch, (WORLD · ROWS, ...) student and teacher (feature sizes differ)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, 3, 4, generator=g), torch.randn(WORLD * ROWS, 5, generator=g)


def _worker(rank: int, init_file: str, results: dict) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        s_all, t_all = batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        out = {}
        for name, kwargs in LOSSES.items():
            s = s_all[rows].clone().requires_grad_(True)
            t = t_all[rows].clone()
            loss = getattr(fastkd, name)(s, t, gather=True, **kwargs)
            loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
            out[name] = (loss.detach(), s.grad)
        module = fastkd.RKDLoss(gather=True)(s_all[rows], t_all[rows])
        out["module"] = (module.detach(), None)
        # ranks disagree on N: every rank raises (none is left waiting)
        with pytest.raises(ValueError, match="same student batch size"):
            fastkd.rkd_distance(s_all[: ROWS + rank], t_all[: ROWS + rank], gather=True)
        results[rank] = out
        dist.barrier()  # no rank tears gloo down while the other finishes
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = traceback.format_exc()


def test_gather_matches_the_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), results), nprocs=WORLD, join=True)
        results = dict(results)
    for rank in range(WORLD):
        assert not isinstance(results[rank], str), results[rank]
    s_all, t_all = batch()
    for name, kwargs in LOSSES.items():
        s = s_all.clone().requires_grad_(True)
        loss = getattr(fastkd, name)(s, t_all, **kwargs)
        loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
        for rank in range(WORLD):
            got_loss, got_grad = results[rank][name]
            torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=1e-7)
            # every rank's loss is the whole batch's; the backward sums them
            want = WORLD * s.grad[rank * ROWS : (rank + 1) * ROWS]
            torch.testing.assert_close(got_grad, want, rtol=1e-5, atol=1e-7)
    single = fastkd.RKDLoss()(s_all, t_all)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["module"][0], single, rtol=1e-5, atol=1e-7)


def test_gather_without_an_initialised_group_raises():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(ValueError, match="init_process_group"):
        fastkd.rkd_angle(torch.randn(4, 3), torch.randn(4, 3), gather=True)
    with pytest.raises(ValueError, match="gather must be a bool"):
        fastkd.sp_loss(torch.randn(4, 3), torch.randn(4, 3), gather=1)
