"""``fused_linear_divergence`` on the cpu backend and the CPU thread count.

Its own reductions (the fused divergence + CE op) give the same bits for any
thread count; its GEMMs are ATen's (``torch.mm`` / ``addmm_``, MKL sgemm), and
MKL splits a long reduction (K = V for the hidden-state gradient, K = chunk
rows for the weight gradient) across threads, so those gradients change at
rounding level with ``torch.set_num_threads``. MKL's strict conditional
numerical reproducibility mode (``MKL_CBWR=<isa>,STRICT``, set before the
process starts) makes its GEMMs, and so the whole loss and its gradients,
bitwise equal for every thread count. Each case runs in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd import _ops

pytestmark = [
    pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR)),
    pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL"),
]

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import torch, fastkd
g = torch.Generator().manual_seed(0)
n, h, v = 300, 256, 3000
hs = torch.randn(n, h, generator=g) * 0.05
ws = torch.randn(v, h, generator=g) * 0.05
ht = torch.randn(n, 64, generator=g) * 0.1
wt = torch.randn(v, 64, generator=g) * 0.1
y = torch.randint(0, v, (n,), generator=g)
s_logits, t_logits = hs @ ws.t(), ht @ wt.t()

def run(threads):
    torch.set_num_threads(threads)
    hid, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fastkd.fused_linear_divergence(hid, w, ht, wt, labels=y, hard_weight=0.5, chunk_size=100,
                                          backend="cpu")
    loss.backward()
    op = torch.ops.fastkd.divergence_forward(s_logits, t_logits, None, 0, 1.0, 0.0, 1.0 / n, True, False,
                                             y, 0.5)
    return [loss.detach(), hid.grad, w.grad], list(op)

fused_1, op_1 = run(1)
for threads in (2, 3, 4):
    fused, op = run(threads)
    print("op", threads, all(torch.equal(a, b) for a, b in zip(op, op_1)))
    print("fused", threads, all(torch.equal(a, b) for a, b in zip(fused, fused_1)))
"""


def run_script(env_extra: dict[str, str]) -> dict[str, list[bool]]:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    result: dict[str, list[bool]] = {"op": [], "fused": []}
    for line in out.splitlines():
        what, _, same = line.split()
        result[what].append(same == "True")
    assert len(result["op"]) == len(result["fused"]) == 3, out
    return result


def test_fused_op_is_thread_count_invariant_and_strict_mkl_makes_the_gemms_so():
    """The fused op's outputs are bitwise equal for 1, 2, 3 and 4 threads; with MKL in
    strict CNR mode, so are the loss and both gradients of fused_linear_divergence."""
    strict = run_script({"MKL_CBWR": "AVX2,STRICT"})
    assert all(strict["op"]) and all(strict["fused"])
    plain = run_script({})
    assert all(plain["op"])
