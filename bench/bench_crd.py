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
  ``torch.compile``'s graph. On CUDA ``fastkd-triton`` / ``fastkd-cuda``.

Each provider is a module factory (``nce_k`` → module); every configuration
builds one module per provider, all with the same parameters and banks.

No floor: the loss's cost is the random gather of ``2·B·(K+1)`` bank rows
(``gathered_mib`` per step, 1 GiB at the default sizes), which the bank's size
and the cache decide, not streaming bandwidth. ``gathered_gbs`` is that
volume over the median time.

``python -m bench.run --families crd`` runs the sweep; ``pytest bench/``
runs the small pytest-benchmark cases once each.
"""

from __future__ import annotations

import torch

import fastkd
from bench.family import Case, Family
from bench.measure import MIB
from fastkd.reference.crd import CRDLoss as ReferenceCRDLoss

STUDENT_DIM = 64
TEACHER_DIM = 256
FEAT_DIM = 128
N_DATA = 50000
BATCH = 64
NEGATIVES = (4096, 16384)  # K


def make_modules(factories: dict, k: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """One module per provider, all with the same parameters, banks and ``nce_k = k``."""
    modules = {}
    state = None
    for name, factory in factories.items():
        torch.manual_seed(0)
        module = factory(k).to(device)
        if state is None:
            state = module.state_dict()
        module.load_state_dict(state)
        modules[name] = module
    return modules


class CrdBench(Family):
    name = "crd"
    config_columns = ("device", "dtype", "B", "K", "n_data", "feat_dim")
    config_keys = ("dtype", "B", "K", "n_data", "feat_dim")
    config_format = "{dtype} K={K}"
    size_columns = ("K",)
    description = (
        f"fastkd.CRDLoss (B={BATCH}, n_data={N_DATA}, feat_dim={FEAT_DIM}, training step incl. embed "
        "heads and bank update)"
    )
    metric_columns = ("gathered_mib", "gathered_gbs")
    table_metrics = (  # no floor: a random gather
        ("gathered_mib", "gathered MiB", ".0f"),
        ("gathered_gbs", "gathered GB/s", ".1f"),
    )
    size_axis = f"negatives per sample K (B = {BATCH}, n_data = {N_DATA}, feat_dim = {FEAT_DIM})"
    dtypes = {"fp32": torch.float32}
    no_compile = "data-dependent reads of Z and index checks break torch.compile's graph"
    small_configs = (("fp32", 16, 256),)

    def reference(self, options):
        return lambda k: ReferenceCRDLoss(STUDENT_DIM, TEACHER_DIM, N_DATA, FEAT_DIM, k)

    def fused(self, backend, options):
        return lambda k: fastkd.CRDLoss(STUDENT_DIM, TEACHER_DIM, N_DATA, FEAT_DIM, k, backend=backend)

    def all_configs(self):
        return [(dtype, BATCH, k) for dtype in self.dtypes for k in NEGATIVES]

    def quick_configs(self):
        return [("fp32", BATCH, 1024)]

    def case(self, config, device, options, providers):
        dtype_name, batch, k = config
        generator = torch.Generator(device=device).manual_seed(0)
        f_s = torch.randn(batch, STUDENT_DIM, device=device, generator=generator).requires_grad_()
        f_t = torch.randn(batch, TEACHER_DIM, device=device, generator=generator).requires_grad_()
        idx = torch.randperm(N_DATA, device=device, generator=generator)[:batch]
        contrast_idx = torch.randint(N_DATA, (batch, k + 1), device=device, generator=generator)
        contrast_idx[:, 0] = idx
        modules = make_modules(providers, k, device)
        params = sum(p.numel() for p in next(iter(modules.values())).parameters())
        gathered = 2 * batch * (k + 1) * FEAT_DIM * 4
        columns = {
            "dtype": dtype_name, "B": batch, "K": k, "n_data": N_DATA, "feat_dim": FEAT_DIM,
            # the gradients of f_s and f_t and of both heads' parameters
            "output_mib": (f_s.nbytes + f_t.nbytes + 4 * params) / MIB,
            "gathered_mib": gathered / MIB,
            "traffic_bytes": None,
        }

        def reset():
            f_s.grad = f_t.grad = None
            for module in modules.values():
                module.zero_grad(set_to_none=True)

        def loss_fn_for(module):
            return lambda a, b: module(a, b, idx, contrast_idx)

        return Case(
            columns, (f_s, f_t), reset=reset,
            loss_fns={name: loss_fn_for(module) for name, module in modules.items()},
            per_second={"gathered_gbs": gathered / 1e9},
        )


BENCH = CrdBench()
