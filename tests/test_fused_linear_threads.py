"""``fused_linear_divergence`` on the cpu backend and the CPU thread count.

Its reductions (the fused divergence + CE op) and its matrix products
(``fastkd::fused_linear_addmm_``: fixed output tiles, one single-threaded gemm
each, a long reduction cut into fixed blocks added in order) give the same
bits for any thread count, so the loss and every gradient do too. Each case
runs in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastkd import _ops

pytestmark = [
    pytest.mark.skipif(_ops.CPU_EXTENSION_ERROR is not None, reason=str(_ops.CPU_EXTENSION_ERROR)),
]

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, torch, fastkd
v, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
g = torch.Generator().manual_seed(0)
n, h = 300, 256
hs = (torch.randn(n, h, generator=g) * 0.05).to(dtype)
ws = (torch.randn(v, h, generator=g) * 0.05).to(dtype)
bs = (torch.randn(v, generator=g) * 0.05).to(dtype)
ht = (torch.randn(n, 64, generator=g) * 0.1).to(dtype)
wt = (torch.randn(v, 64, generator=g) * 0.1).to(dtype)
y = torch.randint(0, v, (n,), generator=g)
s_logits, t_logits = hs @ ws.t(), ht @ wt.t()

def run(threads):
    torch.set_num_threads(threads)
    hid, w, b = hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()
    loss = fastkd.fused_linear_divergence(hid, w, ht, wt, labels=y, hard_weight=0.5, chunk_size=100,
                                          student_bias=b, backend="cpu")
    loss.backward()
    op = torch.ops.fastkd.divergence_forward(s_logits, t_logits, None, 0, 1.0, 0.0, 1.0 / n, True, False,
                                             y, 0.5)
    return [loss.detach(), hid.grad, w.grad, b.grad], list(op)

fused_1, op_1 = run(1)
for threads in (2, 3, 4):
    fused, op = run(threads)
    print("op", threads, all(torch.equal(a, b) for a, b in zip(op, op_1)))
    print("fused", threads, all(torch.equal(a, b) for a, b in zip(fused, fused_1)))
"""


def run_script(vocab: int, dtype: str) -> dict[str, list[bool]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(vocab), dtype], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    result: dict[str, list[bool]] = {"op": [], "fused": []}
    for line in out.splitlines():
        what, _, same = line.split()
        result[what].append(same == "True")
    assert len(result["op"]) == len(result["fused"]) == 3, out
    return result


# V = 9000: the hidden-state gradient's product (100 × 256 output, K = V) is
# few tiles with a long K, so its K is cut into blocks
@pytest.mark.parametrize(("vocab", "dtype"), [(3000, "float32"), (9000, "float32"), (9000, "bfloat16")])
def test_loss_and_gradients_are_thread_count_invariant(vocab, dtype):
    """The fused op's outputs and fused_linear_divergence's loss and gradients
    (hidden states, weight, bias) are bitwise equal for 1, 2, 3 and 4 threads."""
    result = run_script(vocab, dtype)
    assert all(result["op"]) and all(result["fused"])
