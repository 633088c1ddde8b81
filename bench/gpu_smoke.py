"""First-run checks of fastkd's GPU backends: one call of every public loss family, and
the paths that must run without a host synchronisation.

    python bench/gpu_smoke.py smoke [--device cuda|cpu] [--tiny] [--csv PATH]
    python bench/gpu_smoke.py sync  [--device cuda|cpu] [--tiny] [--csv PATH]

``smoke``: every public loss family (``fastkd.<name>``) once, forward and
backward, on small ``float32`` and ``bfloat16`` inputs, on each kernel backend
of the device (``triton`` and ``cuda`` on a GPU; ``cpu`` and ``triton`` on the
CPU, the latter only under ``TRITON_INTERPRET=1``), against the same call on
the ``reference`` backend in float64 on the same (rounded) input values. The
families that have no kernel (NST, FitNets hints, vocabulary-parallel) run once
on their PyTorch path (backend ``torch``). Every case is judged on its own: an
exception is that case's ERROR, and the next case runs.

``sync``: the divergence, top-k, mixture and fused-linear paths without
labels or mask, DKD, RKD, PKT/SP/CC, InfoNCE, CRD and the hidden-state cosine
without a mask (``SYNC_CASES``), forward and backward, in bfloat16 (float32
for CRD, whose GPU kernels take float32 banks), on each GPU backend, under
``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation (an
``.item()``, a ``nonzero``, a copy to pageable host memory) raises, and the
case FAILs with the operation and the fastkd line that asked for it. On a
machine without CUDA the check cannot run: it prints one SKIP line saying so.

Each case prints one verdict line, ``SMOKE|SYNC <case> <backend> <dtype>:
PASS|FAIL|ERROR|SKIP ...``, as soon as it is judged, and appends a row to the
CSV (written row by row, so a run cut short keeps what it judged). The last
line counts the verdicts; the exit status is 1 if any case FAILed or ERRORed.

Error measure: for the loss and every input gradient, ``max |got − want|``
divided by ``max |want|`` (the float64 reference); a case passes when each is
within the dtype's tolerance (:data:`TOLERANCE`). ``--tiny`` shrinks the shapes
for the Triton interpreter (the dry run of ``bench/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory: import this tree's fastkd
    sys.path.insert(0, str(ROOT))

import fastkd  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Relative to max |reference|. float32: the kernels accumulate in float32 (a
# TF32 product or an approximate exp would show as ~1e-3). bfloat16: the
# gradients are rounded to bfloat16 (2^-9 relative) on the way out.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
# Compiled ahead first: its verdicts come before Triton's compile-on-first-call ones.
BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton")}
# The families whose public call has no fastkd kernel: run on their PyTorch path.
TORCH_ONLY = "torch"
CSV_COLUMNS = ("check", "case", "family", "backend", "dtype", "device", "verdict", "loss_err", "grad_err",
               "tolerance", "seconds", "detail")


@dataclass(frozen=True)
class Sizes:
    """Shapes of the smoke inputs: N rows of V logits (V spans more than one Triton block on a GPU),
    N embeddings of width D, feature maps (N, C, H, W), K teachers, top-k width."""

    rows: int
    vocab: int
    hidden: int
    dim: int
    maps: tuple[int, int, int, int]
    teachers: int
    topk: int


FULL = Sizes(rows=48, vocab=5000, hidden=64, dim=96, maps=(8, 16, 12, 12), teachers=3, topk=32)
TINY = Sizes(rows=6, vocab=300, hidden=16, dim=12, maps=(3, 4, 5, 5), teachers=3, topk=8)


@dataclass
class Inputs:
    """Float tensors (``grads`` of them get gradients) and integer / fixed tensors of one call."""

    floats: dict[str, torch.Tensor]
    fixed: dict[str, torch.Tensor]
    grads: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One public call: ``make(sizes, generator)`` draws float64 CPU inputs; ``call(inputs, backend)``
    returns the scalar loss. ``backends`` None: the device's kernel backends; else the listed ones.
    ``dtypes``: the :data:`DTYPES` the call takes (the others are SKIPped)."""

    name: str
    family: str
    make: Callable[[Sizes, torch.Generator], Inputs]
    call: Callable[[dict, str], torch.Tensor]
    backends: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] = tuple(DTYPES)


def _randn(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _pair(z: Sizes, g, *shape, scale=2.0, grads=("student",)) -> Inputs:
    return Inputs({"student": _randn(g, *shape, scale=scale), "teacher": _randn(g, *shape, scale=scale)}, {},
                  grads)


def _logits(z, g):
    return _pair(z, g, z.rows, z.vocab)


def _embeddings(z, g):
    return _pair(z, g, z.rows, z.dim, scale=1.0)


def _maps(z, g):
    return _pair(z, g, *z.maps, scale=1.0)


def _states(z, g):
    """``(2, T, D)`` hidden states of a transformer layer (queries, keys or values): T = rows."""
    return _pair(z, g, 2, z.rows, z.dim, scale=1.0)


def _uld_inputs(z, g):
    """Aligned rows of two vocabularies, the teacher's the larger; within the Triton kernel's row limit."""
    v_s = min(z.vocab // 5, 1500)  # small: the Triton interpreter's sort is slow (--tiny)
    student, teacher = _randn(g, z.rows, v_s, scale=2.0), _randn(g, z.rows, v_s + v_s // 3, scale=2.0)
    return Inputs({"student": student, "teacher": teacher}, {}, ("student",))


def _dkd_inputs(z, g):
    inputs = _logits(z, g)
    inputs.fixed["labels"] = torch.randint(0, z.vocab, (z.rows,), generator=g)
    return inputs


def _mixture_inputs(z, g):
    return Inputs({"student": _randn(g, z.rows, z.vocab, scale=2.0),
                   "teachers": _randn(g, z.teachers, z.rows, z.vocab, scale=2.0)},
                  {"weights": torch.tensor([0.2, 0.5, 0.3][: z.teachers], dtype=torch.float64)}, ("student",))


def _topk_inputs(z, g):
    index = torch.stack([torch.randperm(z.vocab, generator=g)[: z.topk] for _ in range(z.rows)])
    return Inputs({"student": _randn(g, z.rows, z.vocab, scale=2.0), "values": _randn(g, z.rows, z.topk)},
                  {"index": index}, ("student",))


def _fused_linear_inputs(z, g):
    h = z.hidden
    return Inputs({
        "student_hidden": _randn(g, z.rows, h), "student_weight": _randn(g, z.vocab, h, scale=h**-0.5),
        "teacher_hidden": _randn(g, z.rows, h), "teacher_weight": _randn(g, z.vocab, h, scale=h**-0.5),
    }, {}, ("student_hidden", "student_weight"))


def _crd_inputs(z, g):
    bank_size = 4 * z.rows
    v = F.normalize(_randn(g, z.rows, z.dim), dim=1)
    bank = _randn(g, bank_size, z.dim, scale=0.5)
    contrast_idx = torch.randint(bank_size, (z.rows, z.topk + 1), generator=g)
    return Inputs({"v": v, "bank": bank}, {"contrast_idx": contrast_idx}, ("v",))


def _info_nce_inputs(z, g):
    # unit-norm rows at temperature 0.1: logits within [-10, 10]
    q = F.normalize(_randn(g, z.rows, z.dim), dim=1)
    k = F.normalize(_randn(g, z.rows, z.dim), dim=1)
    return Inputs({"q": q, "k": k}, {}, ("q", "k"))


def _mmd_inputs(z, g):
    return Inputs({"x": _randn(g, z.rows, z.dim), "y": _randn(g, z.rows + 3, z.dim) + 0.3}, {}, ("x", "y"))


def _hint(inputs, backend):
    # FitNets: a 1×1 conv adapter (parameters drawn from a fixed seed) + MSE.
    student = inputs["student"]
    torch.manual_seed(0)
    module = fastkd.HintLoss(student.shape[1], student.shape[1]).to(student.device, student.dtype)
    return module(student, inputs["teacher"])


def _vocab_parallel(inputs, backend):
    # World size 1: the collectives reduce over one rank, the arithmetic is the sharded path's.
    # Its reference is the unsharded divergence.
    import torch.distributed as dist

    if backend == "reference":
        return fastkd.divergence(inputs["student"], inputs["teacher"], temperature=2.0, backend="reference")

    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return fastkd.divergence(inputs["student"], inputs["teacher"], temperature=2.0,
                             process_group=dist.group.WORLD)


def _student_teacher(fn, **kwargs):
    """``call`` for a loss ``fn(student, teacher, backend=..., **kwargs)``."""
    return lambda x, backend: fn(x["student"], x["teacher"], backend=backend, **kwargs)


def _mixture(x, backend):
    return fastkd.divergence(x["student"], x["teachers"], teacher_weights=x["weights"], backend=backend)


def _topk(x, backend):
    return fastkd.topk_divergence(x["student"], x["index"], x["values"], temperature=2.0, backend=backend)


def _fused_linear(x, backend):
    return fastkd.fused_linear_divergence(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], temperature=2.0,
        backend=backend,
    )


def _dkd(x, backend):
    return fastkd.dkd_loss(x["student"], x["teacher"], x["labels"], backend=backend)


def _jsd_with_labels(x, backend):
    return fastkd.divergence(
        x["student"], x["teacher"], divergence="jsd", labels=x["labels"], hard_weight=0.5, backend=backend
    )


def _crd(x, backend):
    return fastkd.crd_nce(x["v"], x["bank"], x["contrast_idx"], temperature=0.3, z=50.0, backend=backend)[0]


def _mmd(x, backend):
    return fastkd.mmd_loss(x["x"], x["y"], backend=backend)


def _info_nce(x, backend):
    return fastkd.info_nce(x["q"], x["k"], temperature=0.1, symmetric=True, backend=backend)


CASES = (
    Case("divergence-kl", "divergence", _logits, _student_teacher(fastkd.divergence, temperature=2.0)),
    Case("divergence-jsd-labels", "divergence", _dkd_inputs, _jsd_with_labels),
    Case("divergence-tvd", "divergence", _logits, _student_teacher(fastkd.divergence, divergence="tvd")),
    # T ≈ 100: where an approximate exp / division on a GPU and the exact interpreter part ways
    Case("kd_loss-T100", "divergence", _logits, _student_teacher(fastkd.kd_loss, temperature=100.0)),
    Case("mixture", "mixture", _mixture_inputs, _mixture),
    Case("topk", "topk", _topk_inputs, _topk),
    Case("fused_linear", "fused_linear", _fused_linear_inputs, _fused_linear),
    Case("dkd", "dkd", _dkd_inputs, _dkd),
    # CRD's memory bank is float32 (or float64) whatever the network's dtype
    Case("crd", "crd", _crd_inputs, _crd, dtypes=("fp32",)),
    Case("rkd", "rkd", _embeddings, _student_teacher(fastkd.rkd_loss)),
    Case("pkt", "gram_relation", _embeddings, _student_teacher(fastkd.pkt_loss)),
    Case("sp", "gram_relation", _embeddings, _student_teacher(fastkd.sp_loss)),
    Case("cc", "gram_relation", _embeddings, _student_teacher(fastkd.cc_loss)),
    Case("mmd", "mmd", _mmd_inputs, _mmd),
    Case("info_nce", "info_nce", _info_nce_inputs, _info_nce),
    Case("attention_transfer", "attention_transfer", _maps, _student_teacher(fastkd.at_loss)),
    Case("nst", "nst", _maps, _student_teacher(fastkd.nst_loss), (TORCH_ONLY,)),
    Case("hint", "hint", _maps, _hint, (TORCH_ONLY,)),
    Case("vocab_parallel", "vocab_parallel", _logits, _vocab_parallel, (TORCH_ONLY,)),
    Case("attention_relation", "attention_relation", _states,
         _student_teacher(fastkd.attention_relation_loss, num_relation_heads=2, causal=True)),
    Case("hidden_state-mse", "hidden_state", _states,
         _student_teacher(fastkd.hidden_state_loss, kind="mse")),
    Case("hidden_state-cosine", "hidden_state", _states,
         _student_teacher(fastkd.hidden_state_loss, kind="cosine")),
    Case("uld", "uld", _uld_inputs, _student_teacher(fastkd.uld_loss)),
)


class Report:
    """Prints verdict lines and appends CSV rows as they come; counts the verdicts."""

    def __init__(self, check: str, device: torch.device, csv_path: Path | None):
        self.check = check
        self.device = device
        self.counts = Counter()
        self._file = None
        if csv_path is not None:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(csv_path, "w", newline="")  # noqa: SIM115 - closed in close()
            self._writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
            self._writer.writeheader()
            self._file.flush()

    def verdict(self, case: str, family: str, backend: str, dtype: str, verdict: str, *, loss_err=None,
                grad_err=None, tolerance=None, seconds=None, detail: str = "") -> None:
        self.counts[verdict] += 1
        numbers = []
        if loss_err is not None:
            numbers.append(f"loss_err={loss_err:.2e}")
        if grad_err is not None:
            numbers.append(f"grad_err={grad_err:.2e}")
        if tolerance is not None:
            numbers.append(f"tol={tolerance:.0e}")
        if seconds is not None:
            numbers.append(f"{seconds:.2f}s")
        line = f"{self.check.upper()} {case} {backend} {dtype}: {verdict}"
        line += "".join(f" {n}" for n in numbers) + (f"  {detail}" if detail else "")
        print(line, flush=True)
        if self._file is not None:
            self._writer.writerow({
                "check": self.check, "case": case, "family": family, "backend": backend, "dtype": dtype,
                "device": self.device.type, "verdict": verdict, "loss_err": _cell(loss_err),
                "grad_err": _cell(grad_err), "tolerance": _cell(tolerance), "seconds": _cell(seconds),
                "detail": detail,
            })
            self._file.flush()

    def close(self) -> int:
        """Print the count line; 1 if any case failed or errored."""
        counts = ", ".join(f"{self.counts[v]} {v}" for v in ("PASS", "FAIL", "ERROR", "SKIP"))
        print(f"{self.check.upper()} SUMMARY: {counts}", flush=True)
        if self._file is not None:
            self._file.close()
        return 1 if self.counts["FAIL"] or self.counts["ERROR"] else 0


def _cell(value) -> str:
    return "" if value is None else f"{value:.3e}"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (both finite), inf where finiteness differs."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return math.inf
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    diff = (got[finite] - want[finite]).abs().max().item()
    scale = want[finite].abs().max().item()
    return diff / scale if scale > 0 else diff


def _forward_backward(case: Case, inputs: Inputs, device, dtype, backend) -> tuple[torch.Tensor, list]:
    """(loss, input gradients) of ``case`` on ``inputs.floats`` cast to ``device`` / ``dtype``
    (``inputs.fixed`` moved to ``device`` as they are)."""
    floats = {k: v.to(device, dtype).requires_grad_(k in inputs.grads) for k, v in inputs.floats.items()}
    fixed = {k: v.to(device) for k, v in inputs.fixed.items()}
    loss = case.call({**floats, **fixed}, backend)
    loss.backward()
    return loss.detach(), [floats[k].grad for k in inputs.grads]


def run_smoke(device: torch.device, sizes: Sizes, report: Report) -> None:
    """Every case on each kernel backend in turn, the PyTorch-only cases once (in the first round)."""
    for round_number, backend in enumerate(BACKENDS[device.type]):
        for case in CASES:
            if case.backends is None:
                chosen = (backend,)
            else:
                chosen = case.backends if round_number == 0 else ()
            for name in chosen:
                for dtype_name, dtype in DTYPES.items():
                    _smoke_case(case, name, dtype_name, dtype, device, sizes, report)


def _smoke_case(case, backend, dtype_name, dtype, device, sizes, report) -> None:
    status = fastkd.backends().get(backend)
    if status is not None and not status.available:
        report.verdict(case.name, case.family, backend, dtype_name, "SKIP", detail=status.reason)
        return
    if dtype_name not in case.dtypes:
        report.verdict(case.name, case.family, backend, dtype_name, "SKIP",
                       detail=f"takes {', '.join(case.dtypes)} only")
        return
    inputs = case.make(sizes, torch.Generator().manual_seed(1234))
    # the reference sees the values the kernel sees: rounded to dtype first
    rounded = Inputs({k: v.to(dtype).double() for k, v in inputs.floats.items()}, inputs.fixed, inputs.grads)
    chosen = "auto" if backend == TORCH_ONLY else backend
    started = time.perf_counter()
    try:
        loss, grads = _forward_backward(case, inputs, device, dtype, chosen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        want_loss, want_grads = _forward_backward(case, rounded, device, torch.float64, "reference")
    except Exception as exc:  # noqa: BLE001 - one case's failure is its verdict, the next case runs
        report.verdict(case.name, case.family, backend, dtype_name, "ERROR",
                       seconds=time.perf_counter() - started, detail=_short(exc))
        return
    missing = [name for name, grad in zip(inputs.grads, grads, strict=True) if grad is None]
    if missing:
        report.verdict(case.name, case.family, backend, dtype_name, "FAIL", seconds=seconds,
                       detail=f"no gradient for {', '.join(missing)}")
        return
    loss_err = _rel_err(loss, want_loss)
    grad_err = max(_rel_err(g, w) for g, w in zip(grads, want_grads, strict=True))
    tolerance = TOLERANCE[dtype_name]
    verdict = "PASS" if loss_err <= tolerance and grad_err <= tolerance else "FAIL"
    detail = "" if case.backends is None else "no kernel: PyTorch path"
    report.verdict(case.name, case.family, backend, dtype_name, verdict, loss_err=loss_err, grad_err=grad_err,
                   tolerance=tolerance, seconds=seconds, detail=detail)


def _short(exc: BaseException) -> str:
    """The exception's type and first line, and the innermost fastkd / kernels line that raised it."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    ours = [f for f in traceback.extract_tb(exc.__traceback__)
            if f"{os.sep}fastkd{os.sep}" in f.filename or f"{os.sep}kernels{os.sep}" in f.filename]
    if ours:
        frame = ours[-1]
        text += f" (at {Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno})"
    return text[:400]


# ---------------------------------------------------------------------------- sync check

# The paths that must not synchronise with the host: the logit losses without
# labels or a mask, DKD (its labels checked in the kernel on a GPU), the
# relational losses (their scalars kept on the device), InfoNCE (its labels
# guarded in the kernels), CRD (its indices guarded in the kernels, Z kept on
# the device) and the hidden-state loss without a mask.
SYNC_CASES = (
    "divergence-kl", "topk", "mixture", "fused_linear", "dkd", "rkd", "pkt", "sp", "cc", "info_nce", "crd",
    "hidden_state-cosine",
)


def run_sync(device: torch.device, sizes: Sizes, report: Report) -> None:
    cases = {case.name: case for case in CASES}
    if device.type != "cuda":
        why = f"not run: a {device.type} run, and torch.cuda.set_sync_debug_mode needs a CUDA device"
        for name in SYNC_CASES:
            report.verdict(name, cases[name].family, "-", "-", "SKIP", detail=why)
        return
    for name in SYNC_CASES:
        for backend in BACKENDS["cuda"]:
            _sync_case(cases[name], backend, device, sizes, report)


def _sync_case(case, backend, device, sizes, report) -> None:
    # bfloat16 where the case takes it (CRD's GPU kernels take float32 only)
    dtype_name = "bf16" if "bf16" in case.dtypes else case.dtypes[0]
    dtype = DTYPES[dtype_name]
    status = fastkd.backends()[backend]
    if not status.available:
        report.verdict(case.name, case.family, backend, dtype_name, "SKIP", detail=status.reason)
        return
    inputs = case.make(sizes, torch.Generator().manual_seed(99))
    try:
        # warm-up outside the check: compiles, caches, first allocations
        _forward_backward(case, inputs, device, dtype, backend)
        floats = {k: v.to(device, dtype).requires_grad_(k in inputs.grads) for k, v in inputs.floats.items()}
        fixed = {k: v.to(device) for k, v in inputs.fixed.items()}
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        report.verdict(case.name, case.family, backend, dtype_name, "ERROR", detail=f"warm-up: {_short(exc)}")
        return
    started = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        case.call({**floats, **fixed}, backend).backward()
    except Exception as exc:  # noqa: BLE001 - a sync is this case's FAIL, anything else its ERROR
        # torch's message: "called a synchronizing CUDA operation"
        verdict = "FAIL" if "synchroniz" in str(exc) else "ERROR"
        detail = f"host sync: {_short(exc)}" if verdict == "FAIL" else _short(exc)
    else:
        verdict, detail = "PASS", "forward + backward without a host sync"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    report.verdict(case.name, case.family, backend, dtype_name, verdict,
                   seconds=time.perf_counter() - started, detail=detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("smoke", "sync"))
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    parser.add_argument("--tiny", action="store_true", help="interpreter-sized shapes")
    parser.add_argument("--csv", type=Path, help="write the verdicts here too")
    args = parser.parse_args(argv)
    # the Triton interpreter evaluates both branches of tl.where in numpy
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{args.check.upper()} SUMMARY: torch sees no CUDA device", flush=True)
        return 1
    sizes = TINY if args.tiny else FULL
    print(f"{args.check}: fastkd {fastkd.__file__}, torch {torch.__version__}, device {device}, "
          f"{'tiny' if args.tiny else 'small'} shapes {sizes}", flush=True)
    for name, status in fastkd.backends().items():
        print(f"  backend {name:9s} {'available' if status.available else 'UNAVAILABLE'}: {status.reason}",
              flush=True)
    report = Report(args.check, device, args.csv)
    try:
        (run_smoke if args.check == "smoke" else run_sync)(device, sizes, report)
    finally:
        status = report.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
