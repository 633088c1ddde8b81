"""Distilling a tiny byte-level language model on Python's own docstrings, on a CPU.

    python examples/tiny_lm.py                # 3 seeds, writes examples/results/tiny_lm.{csv,png}
    python examples/tiny_lm.py --seeds 5      # more seeds
    python examples/tiny_lm.py --smoke        # a few steps per run (the test suite runs this)

Corpus: the docstrings (``inspect.getdoc``) of a fixed list of standard-library
modules, their public classes, functions and methods, in a fixed order
(modules as listed, names sorted, repeated docstrings dropped). That is about
2,000 documents and 0.5 MB of real English-and-code text with no download;
the exact text depends on the Python version (3.11 when the README numbers
were measured). Every tenth document is held out.

Tokens are UTF-8 bytes, so ``V = 256`` (about 100 of them occur): the output
head is a real ``(V, H)`` projection, which the fused linear loss never
materialises as logits.

A 3-layer transformer teacher (dim 128, ~670k parameters) is trained once on
next-byte prediction; then a 7.7× smaller 1-layer student (dim 64, ~87k
parameters) is trained three ways, with the same initialisation, batch order,
optimiser and schedule for each seed:

* ``CE alone``: cross-entropy on the next byte;
* ``fused linear KD``: ``fastkd.fused_linear_divergence`` on the student's and
  the teacher's last hidden states and head weights, forward KL at T = 1, mixed
  with the cross-entropy through ``hard_weight`` / ``soft_weight`` (one fused
  call, no ``(N, V)`` logits);
* ``top-k KD``: the teacher's top-k logits over the whole training set are
  stored once (byte ids fit in ``uint8``), then ``fastkd.topk_divergence``
  plus the same cross-entropy: no teacher forward pass during training.

On the held-out text we report perplexity per byte (``exp`` of the mean
next-byte cross-entropy) and top-1 agreement with the teacher's argmax.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastkd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (the examples' shared csv / plot / summary helpers)
from _report import n_params  # noqa: E402

VOCAB = 256  # bytes

MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses "
    "datetime decimal difflib enum fractions functools getopt glob gzip hashlib heapq hmac inspect io "
    "itertools json logging math operator os pathlib pickle pprint queue random re shlex shutil socket "
    "statistics string struct subprocess tarfile tempfile textwrap threading time timeit typing "
    "unittest urllib.parse uuid warnings zipfile"
).split()


# ---- corpus ---------------------------------------------------------------------------


def docstrings(modules: list[str] = MODULES, min_chars: int = 40) -> list[str]:
    """Docstrings of ``modules``, their public classes/routines and those classes' methods.

    Deterministic: modules in the given order, names sorted, a docstring seen
    before (re-exports, inherited text) skipped, short ones (< ``min_chars``) too.
    """
    seen: set[str] = set()
    docs: list[str] = []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        # typing.io / typing.re warn when their docstrings are read (Python 3.11).
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            _add_module(importlib.import_module(name), add)
    return docs


def _add_module(module, add) -> None:
    """``add`` the module, its public classes and routines, and those classes' methods."""
    add(module)
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(obj)
        if not inspect.isclass(obj):
            continue
        for member_name in sorted(vars(obj)):
            member = vars(obj)[member_name]
            if not member_name.startswith("_") and (
                inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod))
            ):
                add(member)


@dataclass
class Corpus:
    train: torch.Tensor  # (W_train, context + 1) uint8 windows
    held_out: torch.Tensor  # (W_held, context + 1)
    n_docs: int
    n_train_bytes: int
    n_held_bytes: int


def windows(stream: bytes, context: int) -> torch.Tensor:
    """Non-overlapping ``(W, context + 1)`` windows: inputs ``[:, :-1]``, next bytes ``[:, 1:]``."""
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    n = (len(data) - 1) // context
    idx = torch.arange(n).unsqueeze(1) * context + torch.arange(context + 1)
    return data[idx]


def load_corpus(context: int, max_bytes: int | None = None) -> Corpus:
    """Every tenth document held out; documents separated by a blank line."""
    docs = docstrings()
    train = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9).encode()
    held = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9).encode()
    if max_bytes is not None:  # --smoke
        train, held = train[:max_bytes], held[: max_bytes // 4]
    return Corpus(windows(train, context), windows(held, context), len(docs), len(train), len(held))


# ---- models ---------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4× MLP; with an
    ``attn_mask`` (bool, True: may attend), attention under that mask instead
    (examples/sentence_embeddings.py's bidirectional student)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Bytes ``(B, T)`` → hidden ``(B, T, H)`` → ``head`` (``Linear(H, 256)``, no bias) → logits."""

    block_class = Block  # a subclass may swap the block (examples/attention_relations.py does)

    def __init__(self, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(self.block_class(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))


@dataclass(frozen=True)
class Size:
    dim: int
    layers: int
    heads: int


TEACHER = Size(dim=128, layers=3, heads=4)
STUDENT = Size(dim=64, layers=1, heads=2)


def build(size: Size, context: int) -> TinyLM:
    return TinyLM(size.dim, size.layers, size.heads, context)


# ---- training -------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50


def lr_at(step: int, sched: Schedule) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < sched.warmup:
        return sched.lr * (step + 1) / sched.warmup
    progress = (step - sched.warmup) / max(1, sched.steps - sched.warmup)
    return sched.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batches(n_windows: int, sched: Schedule, seed: int):
    """``sched.steps`` index batches: epochs of a seeded permutation of the windows."""
    order = torch.Generator().manual_seed(1000 + seed)
    step = 0
    while True:
        perm = torch.randperm(n_windows, generator=order)
        for i in range(0, n_windows - sched.batch + 1, sched.batch):
            if step == sched.steps:
                return
            yield step, perm[i : i + sched.batch]
            step += 1


@dataclass(frozen=True)
class TopK:
    """The teacher's top-k logits at every training position, stored once."""

    index: torch.Tensor  # (W, T, k) uint8: byte ids
    values: torch.Tensor  # (W, T, k) float32 logits


@torch.no_grad()
def teacher_topk(teacher: TinyLM, train: torch.Tensor, k: int, chunk: int = 64) -> TopK:
    index, values = [], []
    for i in range(0, len(train), chunk):
        logits = teacher(train[i : i + chunk, :-1].long())
        top = logits.topk(k, dim=-1)
        index.append(top.indices.to(torch.uint8))
        values.append(top.values)
    return TopK(torch.cat(index), torch.cat(values))


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "ce", "fused", "topk"
    note: str


METHODS = [
    Method("CE alone", "ce", "next-byte cross-entropy only"),
    Method("fused linear KD", "fused", "fused_linear_divergence, KL at T=1, 0.5·CE + 0.5·KL"),
    Method("top-k KD", "topk", "stored teacher top-k logits, topk_divergence KL at T=1, 0.5·CE + 0.5·KL"),
]


@dataclass(frozen=True)
class KDSettings:
    hard_weight: float = 0.5
    soft_weight: float = 0.5
    temperature: float = 1.0


def loss_for(
    method: Method,
    student: TinyLM,
    teacher: TinyLM | None,
    topk: TopK | None,
    windows_: torch.Tensor,
    idx: torch.Tensor,
    kd: KDSettings,
) -> torch.Tensor:
    """The training loss of one batch of windows ``idx``."""
    tokens = windows_[idx].long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = student.hidden(inputs)  # (B, T, H_s)
    if method.kind == "ce":
        return F.cross_entropy(student.head(hidden).flatten(0, 1), targets.flatten())
    if method.kind == "fused":
        with torch.no_grad():
            teacher_hidden = teacher.hidden(inputs)
        # One call: both heads' logits, KL and the CE on the labels, chunk by
        # chunk; the gradient reaches the student's hidden states and head.
        return fastkd.fused_linear_divergence(
            hidden,
            student.head.weight,
            teacher_hidden,
            teacher.head.weight,
            divergence="kl",
            temperature=kd.temperature,
            labels=targets,
            hard_weight=kd.hard_weight,
            soft_weight=kd.soft_weight,
        )
    if method.kind == "topk":
        logits = student.head(hidden)
        soft = fastkd.topk_divergence(
            logits,
            topk.index[idx].long(),
            topk.values[idx],
            divergence="kl",
            temperature=kd.temperature,
        )
        hard = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return kd.hard_weight * hard + kd.soft_weight * soft
    raise ValueError(f"unknown method kind {method.kind!r}")


def train(
    student: TinyLM,
    method: Method,
    corpus: Corpus,
    sched: Schedule,
    seed: int,
    teacher: TinyLM | None = None,
    topk: TopK | None = None,
    kd: KDSettings = KDSettings(),
) -> None:
    """Trains ``student`` in place (AdamW, warm-up + cosine, gradient clipping at 1)."""
    fit(student, sched, seed, len(corpus.train),
        lambda idx: loss_for(method, student, teacher, topk, corpus.train, idx, kd))


def fit(model: nn.Module, sched, seed: int, n_examples: int, batch_loss) -> None:
    """Trains ``model`` in place on ``batches(n_examples, sched, seed)``: AdamW
    at ``lr_at(step, sched)`` (warm-up + cosine), gradient clipping at 1;
    ``batch_loss(idx)`` is the loss of the examples ``idx``. Every example
    trains this way (``sched``: any schedule with this one's fields)."""
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=0.01)
    model.train()
    for step, idx in batches(n_examples, sched, seed):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


@torch.no_grad()
def evaluate(
    model: TinyLM, held_out: torch.Tensor, teacher_argmax: torch.Tensor | None, chunk: int = 64
) -> tuple[float, float]:
    """``(perplexity per byte, top-1 agreement with teacher_argmax)`` on the held-out windows."""
    total, agree, count = 0.0, 0, 0
    for i in range(0, len(held_out), chunk):
        tokens = held_out[i : i + chunk].long()
        logits = model(tokens[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
        if teacher_argmax is not None:
            agree += (logits.argmax(-1) == teacher_argmax[i : i + chunk]).sum().item()
        count += tokens[:, 1:].numel()
    return math.exp(total / count), agree / count


@torch.no_grad()
def argmax_on(model: TinyLM, held_out: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    return torch.cat(
        [model(held_out[i : i + chunk, :-1].long()).argmax(-1) for i in range(0, len(held_out), chunk)]
    )


# ---- report ---------------------------------------------------------------------------


def write_results(rows: list[dict], teacher_row: dict, out: Path) -> list[Path]:
    panels = (("ppl", "held-out perplexity per byte (lower is better)", 1.0),
              ("agree", "top-1 agreement with the teacher, %", 100.0))

    def draw(plt):
        fig, axes = _report.point_panels(plt, rows, panels, figsize=(9, 3.2))
        # each panel spans its error bars, the perplexity one the teacher's line too
        for ax, (key, _, factor), ref in zip(axes, panels, (teacher_row["ppl_mean"], None), strict=True):
            if ref is not None:
                ax.axvline(ref, color="#dd8452", ls=":", lw=1.5, label="teacher")
                ax.legend(loc="lower right", fontsize=8, framealpha=1.0)
            lo = min(factor * (r[f"{key}_mean"] - r[f"{key}_std"]) for r in rows)
            hi = max(factor * (r[f"{key}_mean"] + r[f"{key}_std"]) for r in rows)
            low = min(lo, ref) if ref is not None else lo
            pad = 0.15 * max(hi - low, 1e-3)
            ax.set_xlim(low - pad, hi + pad)
        fig.suptitle(
            f"fastkd, tiny byte-level LM on stdlib docstrings: {round(rows[0]['params'] / 1000)}k-parameter "
            f"student, {round(teacher_row['params'] / 1000)}k teacher, {rows[0]['seeds']} seeds",
            fontsize=9,
        )
        return fig

    fields = ["method", "params", "seeds", "ppl_mean", "ppl_std", "agree_mean", "agree_std", "ppls",
              "agreements", "note"]
    return _report.write_results(out, "tiny_lm", [*rows, teacher_row], fields, ("ppls", "agreements"), draw)


def summary(name: str, params: int, ppls: list[float], agrees: list[float], note: str) -> dict:
    return _report.summary(name, params, note, ppl=("ppls", ppls), agree=("agreements", agrees))


def add_training_arguments(parser, steps: int, teacher_steps: int) -> None:
    """The options of the byte-level LM examples (this one and
    attention_relations.py): student and teacher steps, window length."""
    parser.add_argument("--steps", type=int, default=steps, help="student steps (batches of 32 windows)")
    parser.add_argument("--teacher-steps", type=int, default=teacher_steps)
    parser.add_argument("--context", type=int, default=64, help="bytes per training window")


def schedules(args) -> tuple[Schedule, Schedule]:
    """The student's and the teacher's schedules for the parsed options: three
    steps each with ``--smoke``."""
    if args.smoke:
        return Schedule(steps=3, warmup=1), Schedule(steps=3, warmup=1)
    return Schedule(steps=args.steps, warmup=50), Schedule(steps=args.teacher_steps, warmup=100)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = _report.argument_parser(
        __doc__, seeds=3, smoke="a few steps per run on a 20 kB slice, one seed",
        threads="1: tiny matmuls, and 2 threads on a shared 2-core CPU were 30× slower", name="tiny_lm",
    )
    add_training_arguments(parser, steps=800, teacher_steps=1200)
    parser.add_argument("--k", type=int, default=8, help="teacher logits stored per position (top-k KD)")
    args = _report.parse_arguments(parser, argv, "tiny_lm")
    seeds = 1 if args.smoke else args.seeds
    sched, teacher_sched = schedules(args)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]

    start = time.perf_counter()
    corpus = load_corpus(args.context, max_bytes=20_000 if args.smoke else None)
    print(
        f"corpus: {corpus.n_docs} docstrings, {corpus.n_train_bytes} training bytes "
        f"({len(corpus.train)} windows of {args.context}), {corpus.n_held_bytes} held-out bytes"
    )
    torch.manual_seed(0)
    teacher = build(TEACHER, args.context)
    train(teacher, METHODS[0], corpus, teacher_sched, seed=0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_argmax = argmax_on(teacher, corpus.held_out)
    teacher_ppl, _ = evaluate(teacher, corpus.held_out, None)
    t_teacher = time.perf_counter() - start
    topk = teacher_topk(teacher, corpus.train, args.k) if any(m.kind == "topk" for m in methods) else None
    t_topk = time.perf_counter() - start - t_teacher
    n_student = n_params(build(STUDENT, args.context))
    print(
        f"teacher: {n_params(teacher)} parameters, {teacher_sched.steps} steps, held-out perplexity "
        f"{teacher_ppl:.3f} ({t_teacher:.1f} s); top-{args.k} stored in {t_topk:.1f} s; "
        f"student: {n_student} parameters, {sched.steps} steps"
    )

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        ppls, agrees = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = build(STUDENT, args.context)
            train(student, method, corpus, sched, seed, teacher=teacher, topk=topk)
            ppl, agree = evaluate(student, corpus.held_out, teacher_argmax)
            ppls.append(ppl)
            agrees.append(agree)
        rows.append(summary(method.name, n_student, ppls, agrees, method.note))
        r = rows[-1]
        print(
            f"  {method.name:<16} perplexity {r['ppl_mean']:.3f} ± {r['ppl_std']:.3f}, agreement "
            f"{100 * r['agree_mean']:.2f} ± {100 * r['agree_std']:.2f} %   ({time.perf_counter() - t0:.1f} s)"
        )
    teacher_row = summary("teacher", n_params(teacher), [teacher_ppl], [1.0], f"{teacher_sched.steps} steps")

    print(f"\n| method | held-out perplexity ({seeds} seeds) | top-1 agreement with teacher % | setting |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['ppl_mean']:.3f} ± {r['ppl_std']:.3f} "
            f"| {100 * r['agree_mean']:.2f} ± {100 * r['agree_std']:.2f} | {r['note']} |"
        )
    print(
        f"| teacher | {teacher_ppl:.3f} | 100 | {n_params(teacher)} parameters, {teacher_sched.steps} steps |"
    )
    write_results(rows, teacher_row, args.out)
    print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
