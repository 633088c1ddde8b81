"""MiniLM-style distillation of self-attention relations in a tiny byte-level language model, on a CPU.

    python examples/attention_relations.py          # 3 seeds → examples/results/attention_relations.{csv,png}
    python examples/attention_relations.py --smoke  # a few steps per run (the examples tests run this)

Corpus, tokens, split, schedule and metrics are examples/tiny_lm.py's: the
docstrings of a fixed list of standard-library modules, UTF-8 bytes, every
tenth document held out; perplexity per byte on the held-out text and top-1
agreement with the teacher's next-byte argmax.

A 3-layer causal transformer teacher (dim 128, 4 attention heads) is trained
once; a narrower 2-layer student (dim 64, 2 attention heads) is then trained,
with the same initialisation, batch order and schedule per seed, by

* ``CE alone``: next-byte cross-entropy;
* ``logit KD``: ``fastkd.fused_linear_divergence`` (0.5·CE + 0.5·KL(teacher ‖ student)
  from the last hidden states and both heads' weights);
* ``attention relations``: CE plus MiniLMv2's relation loss, the sum of three
  ``fastkd.attention_relation_loss`` calls (query–query, key–key and
  value–value relations of the teacher's last layer against the student's last
  layer, ``num_relation_heads=4``: 32 teacher and 16 student channels per
  relation head, ``causal=True`` as the models attend);
* ``logit KD + attention relations``: both.

The teacher and student widths and attention-head counts differ: the relation
loss re-splits each model's queries, keys and values into its own relation
heads, so no projection is needed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fastkd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (the examples' shared csv / plot / summary helpers)

tiny_lm = _report.load_example("tiny_lm")  # its corpus, teacher, schedule and training loop

VOCAB = tiny_lm.VOCAB


# ---- models ---------------------------------------------------------------------------


class Block(tiny_lm.Block):
    """tiny_lm's block, also returning its queries, keys and values, ``(B, T, dim)`` each."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # (B, T, dim) each

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x)), (q, k, v)


class RelationLM(tiny_lm.TinyLM):
    """tiny_lm's model with relation blocks: bytes ``(B, T)`` → hidden ``(B, T, H)`` and the last
    block's ``(q, k, v)``; ``head`` → logits."""

    block_class = Block

    def hidden_and_relations(self, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        qkv = ()
        for block in self.blocks:
            x, qkv = block(x)
        return self.norm(x), qkv

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_and_relations(tokens)[0])


TEACHER = tiny_lm.Size(dim=128, layers=3, heads=4)
STUDENT = tiny_lm.Size(dim=64, layers=2, heads=2)
RELATION_HEADS = 4  # divides both widths: 32 teacher, 16 student channels per relation head


def build(size: tiny_lm.Size, context: int) -> RelationLM:
    return RelationLM(size.dim, size.layers, size.heads, context)


# ---- training -------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    logit_kd: bool
    relations: bool
    note: str


METHODS = [
    Method("CE alone", False, False, "next-byte cross-entropy only"),
    Method("logit KD", True, False, "fused_linear_divergence, 0.5·CE + 0.5·KL at T=1"),
    Method("attention relations", False, True, "CE + Σ attention_relation_loss over Q-Q, K-K, V-V"),
    Method("logit KD + attention relations", True, True, "0.5·CE + 0.5·KL + Σ Q/K/V relation losses"),
]


def relation_loss(student_qkv, teacher_qkv) -> torch.Tensor:
    """MiniLMv2: the sum of the Q-Q, K-K and V-V relation losses of the last layers."""
    return sum(
        fastkd.attention_relation_loss(s, t, num_relation_heads=RELATION_HEADS, causal=True)
        for s, t in zip(student_qkv, teacher_qkv, strict=True)
    )


def loss_for(method: Method, student: RelationLM, teacher: RelationLM | None, tokens: torch.Tensor,
             relation_weight: float) -> torch.Tensor:
    """The training loss of one batch of windows ``tokens`` ``(B, T + 1)``."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden, student_qkv = student.hidden_and_relations(inputs)
    teacher_hidden = teacher_qkv = None
    if method.logit_kd or method.relations:
        with torch.no_grad():
            teacher_hidden, teacher_qkv = teacher.hidden_and_relations(inputs)
    if method.logit_kd:
        loss = fastkd.fused_linear_divergence(
            hidden, student.head.weight, teacher_hidden, teacher.head.weight, divergence="kl",
            labels=targets, hard_weight=0.5, soft_weight=0.5,
        )
    else:
        loss = F.cross_entropy(student.head(hidden).flatten(0, 1), targets.flatten())
    if method.relations:
        loss = loss + relation_weight * relation_loss(student_qkv, teacher_qkv)
    return loss


def train(model: RelationLM, method: Method, corpus, sched, seed: int, teacher: RelationLM | None = None,
          relation_weight: float = 1.0) -> None:
    """Trains ``model`` in place (AdamW, warm-up + cosine, gradient clipping at 1), as tiny_lm.py does."""
    tiny_lm.fit(model, sched, seed, len(corpus.train),
                lambda idx: loss_for(method, model, teacher, corpus.train[idx].long(), relation_weight))


@torch.no_grad()
def held_out_relation_kl(student: RelationLM, teacher: RelationLM, held_out: torch.Tensor,
                         chunk: int = 64) -> float:
    """The mean over held-out windows of the Q/K/V relation loss (MiniLMv2's sum)."""
    total, count = 0.0, 0
    for i in range(0, len(held_out), chunk):
        inputs = held_out[i : i + chunk, :-1].long()
        _, s_qkv = student.hidden_and_relations(inputs)
        _, t_qkv = teacher.hidden_and_relations(inputs)
        total += relation_loss(s_qkv, t_qkv).item() * len(inputs)
        count += len(inputs)
    return total / count


# ---- report ---------------------------------------------------------------------------


def summary(name: str, params: int, ppls, agrees, rels, note: str) -> dict:
    return _report.summary(name, params, note, ppl=("ppls", ppls), agree=("agreements", agrees),
                           rel=("relation_kls", rels))


def write_results(rows: list[dict], teacher_row: dict, out: Path) -> list[Path]:
    panels = (("ppl", "held-out perplexity per byte (lower is better)", 1.0),
              ("agree", "top-1 agreement with the teacher, %", 100.0),
              ("rel", "held-out Q/K/V relation KL to the teacher", 1.0))

    def draw(plt):
        fig, _ = _report.point_panels(plt, rows, panels, figsize=(11, 3.0))
        fig.suptitle(f"fastkd, attention-relation distillation of a tiny byte-level LM: "
                     f"{round(rows[0]['params'] / 1000)}k-parameter student, "
                     f"{round(teacher_row['params'] / 1000)}k teacher, {rows[0]['seeds']} seeds", fontsize=9)
        return fig

    fields = ["method", "params", "seeds", "ppl_mean", "ppl_std", "agree_mean", "agree_std", "rel_mean",
              "rel_std", "ppls", "agreements", "relation_kls", "note"]
    series = ("ppls", "agreements", "relation_kls")
    return _report.write_results(out, "attention_relations", [*rows, teacher_row], fields, series, draw)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = _report.argument_parser(__doc__, seeds=3, smoke="a few steps per run on a 20 kB slice, one seed",
                                     threads="tiny matmuls: 1 is fastest", name="attention_relations")
    tiny_lm.add_training_arguments(parser, steps=300, teacher_steps=600)
    parser.add_argument("--relation-weight", type=float, default=1.0, help="weight of the Q/K/V relation sum")
    args = _report.parse_arguments(parser, argv, "attention_relations")
    seeds = 1 if args.smoke else args.seeds
    sched, teacher_sched = tiny_lm.schedules(args)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]

    start = time.perf_counter()
    corpus = tiny_lm.load_corpus(args.context, max_bytes=20_000 if args.smoke else None)
    print(f"corpus: {corpus.n_docs} docstrings, {corpus.n_train_bytes} training bytes "
          f"({len(corpus.train)} windows of {args.context}), {corpus.n_held_bytes} held-out bytes")
    torch.manual_seed(0)
    teacher = build(TEACHER, args.context)
    train(teacher, METHODS[0], corpus, teacher_sched, seed=0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_argmax = tiny_lm.argmax_on(teacher, corpus.held_out)
    teacher_ppl, _ = tiny_lm.evaluate(teacher, corpus.held_out, None)
    n_student = tiny_lm.n_params(build(STUDENT, args.context))
    print(f"teacher: {tiny_lm.n_params(teacher)} parameters, {teacher_sched.steps} steps, "
          f"held-out perplexity {teacher_ppl:.3f} ({time.perf_counter() - start:.1f} s); "
          f"student: {n_student} parameters, {sched.steps} steps")

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        ppls, agrees, rels = [], [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = build(STUDENT, args.context)
            train(student, method, corpus, sched, seed, teacher=teacher, relation_weight=args.relation_weight)
            ppl, agree = tiny_lm.evaluate(student, corpus.held_out, teacher_argmax)
            ppls.append(ppl)
            agrees.append(agree)
            rels.append(held_out_relation_kl(student, teacher, corpus.held_out))
        rows.append(summary(method.name, n_student, ppls, agrees, rels, method.note))
        r = rows[-1]
        print(f"  {method.name:<31} perplexity {r['ppl_mean']:.3f} ± {r['ppl_std']:.3f}, agreement "
              f"{100 * r['agree_mean']:.2f} ± {100 * r['agree_std']:.2f} %, "
              f"relation KL {r['rel_mean']:.3f} ± {r['rel_std']:.3f}   ({time.perf_counter() - t0:.1f} s)")
    teacher_row = summary("teacher", tiny_lm.n_params(teacher), [teacher_ppl], [1.0], [0.0],
                          f"{teacher_sched.steps} steps")

    print(f"\n| method | held-out perplexity ({seeds} seeds) | top-1 agreement with teacher % "
          f"| held-out Q/K/V relation KL | setting |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl_mean']:.3f} ± {r['ppl_std']:.3f} "
              f"| {100 * r['agree_mean']:.2f} ± {100 * r['agree_std']:.2f} "
              f"| {r['rel_mean']:.3f} ± {r['rel_std']:.3f} | {r['note']} |")
    print(f"| teacher | {teacher_ppl:.3f} | 100 | 0 | {tiny_lm.n_params(teacher)} parameters, "
          f"{teacher_sched.steps} steps |")
    write_results(rows, teacher_row, args.out)
    print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
