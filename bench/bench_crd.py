"""Benchmark of ``fastkd.CRDLoss``: one training step's forward + backward of
contrastive representation distillation (RepDistiller's ``CRDLoss``): both
embed heads, both NCE directions over memory banks of ``n_data × feat_dim``
rows with ``K`` negatives per sample, and the momentum update of both banks
(training mode). Student features ``(B, 64)``, teacher features
``(B, 256)`` (requires grad like a student's would, both heads' parameters
get gradients), ``n_data = 50000`` (CIFAR-100's training set), ``feat_dim =
128``, ``τ = 0.07``; negatives given as ``contrast_idx (B, K+1)`` drawn in
advance, as RepDistiller's dataset does, so no provider pays for sampling.

Providers:

- ``eager``: ``fastkd.reference.crd.CRDLoss``, RepDistiller's computation:
  ``index_select`` of the ``(B·(K+1), feat_dim)`` bank rows per direction,
  ``bmm``, ``exp``, the NCE terms, autograd.
- ``fastkd-cpu``: ``fastkd.CRDLoss(backend="cpu")``: the same module with the
  fused op per direction (gather, dot, exp, NCE term and gradient per row,
  no gathered tensor).
- ``compile`` is not measured: the module reads ``Z`` from its buffer and
  checks index values (data-dependent ``.item()`` / ``.any()``), which break
  ``torch.compile``'s graph; on CUDA ``fastkd-triton`` / ``fastkd-cuda``,
  each measured when ``fastkd.crd.CRD_KERNELS`` lists it.

No floor: the loss's cost is the random gather of ``2·B·(K+1)`` bank rows
(``gathered_mib`` per step, 1 GiB at the default sizes), which the bank's size
and the cache decide, not streaming bandwidth. ``gathered_gbs`` is that
volume over the median time.

``python -m bench.run --families crd`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases below once each.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from bench.common import (
    COMPILE,
    EAGER,
    MIB,
    SweepContext,
    measure_config,
    synchronize,
)
from fastkd.crd import CRD_KERNELS
from fastkd.reference.crd import CRDLoss as ReferenceCRDLoss

FAMILY = "crd"
STUDENT_DIM = 64
TEACHER_DIM = 256
FEAT_DIM = 128
N_DATA = 50000
BATCH = 64
NEGATIVES = (4096, 16384)  # K
DTYPES = {"fp32": torch.float32}
CONFIG_KEYS = ("dtype", "B", "K", "n_data", "feat_dim")
COLUMNS = (
    "family",
    "device",
    "dtype",
    "B",
    "K",
    "n_data",
    "feat_dim",
    "provider",
    "median_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "peak_extra_mib",
    "output_mib",
    "gathered_mib",
    "gathered_gbs",
    "traffic_bytes",
    "floor_ms",
    "copy_gbs",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "x_floor",
    "loss_rel_diff",
    "other_load",
    "thp",
    "note",
)
TABLE_COLUMNS = (
    ("median_ms", "median ms", ".1f"),
    ("repeats", "runs", "d"),
    ("peak_extra_mib", "peak extra MiB", ".0f"),
    ("gathered_mib", "gathered MiB", ".0f"),
    ("gathered_gbs", "gathered GB/s", ".1f"),
    ("speedup_vs_eager", "vs eager", ".1f"),
    ("other_load", "other load", ".2f"),
)
SIZE_AXIS = f"negatives per sample K (B = {BATCH}, n_data = {N_DATA}, feat_dim = {FEAT_DIM})"
# The gradients of f_s and f_t and of both heads' parameters.
OUTPUT_KEY = "output_mib"


def providers(device: torch.device):
    """(name → module factory of ``nce_k``, name → why it is not measured)."""
    found = {EAGER: lambda k: ReferenceCRDLoss(STUDENT_DIM, TEACHER_DIM, N_DATA, FEAT_DIM, k)}
    skipped = {COMPILE: "data-dependent reads of Z and index checks break torch.compile's graph"}
    status = fastkd.backends()
    for backend in ("cpu",) if device.type == "cpu" else ("triton", "cuda"):
        name = f"fastkd-{backend}"
        if backend not in CRD_KERNELS:
            skipped[name] = f"fastkd has no {backend} CRD kernel yet"
        elif status[backend].available:
            found[name] = lambda k, backend=backend: fastkd.CRDLoss(
                STUDENT_DIM, TEACHER_DIM, N_DATA, FEAT_DIM, k, backend=backend
            )
        else:
            skipped[name] = status[backend].reason
    return found, skipped


def make_modules(found: dict, k: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """One module per provider, all with the same parameters, banks and ``nce_k = k``."""
    modules = {}
    state = None
    for name, factory in found.items():
        torch.manual_seed(0)
        module = factory(k).to(device)
        if state is None:
            state = module.state_dict()
        module.load_state_dict(state)
        modules[name] = module
    return modules


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("fp32", 1024)]
    return [(dtype, k) for dtype in DTYPES for k in NEGATIVES]


def sweep(ctx: SweepContext) -> list[dict]:
    """Every provider on every configuration; one row per (configuration, provider)."""
    device = ctx.device
    found, skipped = providers(device)
    todo = configs(ctx.quick)
    task = ctx.progress.add_task(FAMILY, total=len(todo) * len(found))
    rows = []
    for dtype_name, k in todo:
        generator = torch.Generator(device=device).manual_seed(0)
        f_s = torch.randn(BATCH, STUDENT_DIM, device=device, generator=generator).requires_grad_()
        f_t = torch.randn(BATCH, TEACHER_DIM, device=device, generator=generator).requires_grad_()
        idx = torch.randperm(N_DATA, device=device, generator=generator)[:BATCH]
        contrast_idx = torch.randint(N_DATA, (BATCH, k + 1), device=device, generator=generator)
        contrast_idx[:, 0] = idx
        modules = make_modules(found, k, device)
        label = f"{FAMILY} {dtype_name} K={k}"
        params = sum(p.numel() for p in next(iter(modules.values())).parameters())
        gathered = 2 * BATCH * (k + 1) * FEAT_DIM * 4
        base = {
            "family": FAMILY,
            "device": device.type,
            "dtype": dtype_name,
            "B": BATCH,
            "K": k,
            "n_data": N_DATA,
            "feat_dim": FEAT_DIM,
            "output_mib": (f_s.nbytes + f_t.nbytes + 4 * params) / MIB,
            "gathered_mib": gathered / MIB,
            "traffic_bytes": None,
            "thp": ctx.thp.short,
        }

        def reset(f_s=f_s, f_t=f_t, modules=modules):
            f_s.grad = f_t.grad = None
            for module in modules.values():
                module.zero_grad(set_to_none=True)

        def loss_fn_for(module, idx=idx, contrast_idx=contrast_idx):
            return lambda a, b: module(a, b, idx, contrast_idx)

        loss_fns = {name: loss_fn_for(module) for name, module in modules.items()}
        rows += measure_config(
            ctx, task, label, base, loss_fns, (f_s, f_t), reset, unavailable=skipped,
            per_second={"gathered_gbs": gathered / 1e9},
        )
        del f_s, f_t, modules, loss_fns, reset
    ctx.progress.update(task, description=f"{FAMILY} done")
    return rows


def config_label(row: dict) -> str:
    return f"{row['dtype']} K={row['K']}"


def size_label(row: dict) -> str:
    return f"{row['K']}"


def size_order(row: dict) -> int:
    return row["K"]


def title(rows: list[dict], ctx: SweepContext) -> str:
    return (
        f"fastkd.CRDLoss (B={BATCH}, n_data={N_DATA}, feat_dim={FEAT_DIM}, training step incl. embed "
        f"heads and bank update) forward + backward, {ctx.device.type}, {torch.get_num_threads()} threads, "
        f"THP {ctx.thp.short}"
    )


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_PROVIDERS, _ = providers(_DEVICE)


@pytest.mark.parametrize("provider", list(_PROVIDERS))
def test_crd_fwd_bwd(benchmark, provider):
    torch.manual_seed(0)
    module = _PROVIDERS[provider](256).to(_DEVICE)
    f_s = torch.randn(16, STUDENT_DIM, device=_DEVICE, requires_grad=True)
    f_t = torch.randn(16, TEACHER_DIM, device=_DEVICE, requires_grad=True)
    idx = torch.arange(16, device=_DEVICE)

    def reset():
        f_s.grad = f_t.grad = None
        module.zero_grad(set_to_none=True)

    def step():
        module(f_s, f_t, idx, generator=torch.Generator(device=_DEVICE).manual_seed(1)).backward()
        synchronize(_DEVICE)

    benchmark.pedantic(step, setup=reset, rounds=5, warmup_rounds=1)
    assert f_s.grad is not None and f_s.grad.shape == f_s.shape
    assert module.embed_t.linear.weight.grad is not None
