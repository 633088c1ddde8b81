"""Cross-tokenizer distillation with ULD: a byte-level teacher, a BPE student, on a CPU.

    python examples/cross_tokenizer.py            # 3 seeds → examples/results/cross_tokenizer.{csv,png}
    python examples/cross_tokenizer.py --smoke    # a few steps per run (the examples tests run this)

Corpus, split and teacher are examples/tiny_lm.py's: the docstrings of a fixed
list of standard-library modules, every tenth document held out, and a
3-layer byte-level transformer (dim 128, 64-byte windows) trained on
next-byte prediction. The student reads the same text through a different
tokenizer: a byte-level BPE of 1024 tokens (the 256 single bytes and 768
merges), trained with the ``tokenizers`` library on the training text only,
so that one student token covers about 2.6 of the teacher's bytes. The
student is tiny_lm.py's 1-layer student (dim 64) with that vocabulary.

The text is cut into windows of whole BPE tokens of at most 65 bytes (the
teacher's 64-byte context plus the byte it predicts), consecutive windows
sharing their boundary token; both models predict, in each window, the
tokens after the first. Per batch, the student's rows and the teacher's rows
are paired by the text they predict:

* ``fastkd.align_by_offsets`` on each predicted token's byte span (student)
  and each predicted byte's (teacher) gives the groups: one BPE token and
  the bytes it spells;
* ``fastkd.merge_aligned`` (``strategy="first"``) turns a group's teacher rows
  into one row: the distribution of its first byte times the teacher's
  probabilities of the group's later bytes;
* ``fastkd.uld_loss`` compares those rows with the student's
  (``*_is_logprob=True``) as sorted probability vectors.

The student is trained with the same initialisation, batch order, optimiser
and schedule per seed by

* ``CE alone``: cross-entropy on the next BPE token;
* ``CE + ULD``: that plus ``w · ULD`` (``--uld-weight``, 0.3 by default);
* ``CE + hybrid ULD``: the same with the hybrid table of the 256 single-byte
  BPE tokens paired with the teacher's bytes (compared id to id by a JSD).

The metric is tokenizer-independent: held-out bits per byte, the summed
next-token negative log-likelihood (nats) of the predicted text over its
number of bytes, divided by ln 2; the teacher's over the same bytes, for
reference. Also reported: the held-out ULD loss to the teacher.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastkd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (the examples' shared csv / plot / summary helpers)

tiny_lm = _report.load_example("tiny_lm")  # its corpus, teacher, schedule and training loop

TEACHER_VOCAB = tiny_lm.VOCAB  # bytes


# ---- the student's tokenizer ----------------------------------------------------------


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet's character → byte map: printable Latin-1
    bytes stand for themselves, the other bytes (controls, space, 0x7F–0xA0,
    0xAD) for the characters from U+0100 on, in byte order. This is the
    alphabet of ``tokenizers.pre_tokenizers.ByteLevel``: a token's string
    read through this map is the token's bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + i): b for i, b in enumerate(others)})
    return alphabet


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size``
    tokens trained on ``texts``: the 256 single bytes, then merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # no prefix space: the tokens' bytes concatenate to the text exactly
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id spells, ``[id] → bytes``."""
    alphabet = byte_alphabet()
    vocab = tokenizer.get_vocab()
    spelled = [b""] * len(vocab)
    for token, index in vocab.items():
        spelled[index] = bytes(alphabet[c] for c in token)
    return spelled


def encode(tokenizer, spelled: list[bytes], text: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (T,), ends (T,))``: the BPE tokens of ``text`` and the byte offset
    where each ends (token ``i`` spans bytes ``[ends[i-1], ends[i])``, token 0
    ``[0, ends[0])``). Raises if the tokens do not spell ``text`` exactly."""
    ids = tokenizer.encode(text.decode()).ids
    lengths = torch.tensor([len(spelled[i]) for i in ids], dtype=torch.long)
    if b"".join(spelled[i] for i in ids) != text:
        raise ValueError("the BPE tokens do not spell the text byte for byte")
    return torch.tensor(ids, dtype=torch.long), lengths.cumsum(0)


def shared_byte_tokens(spelled: list[bytes]) -> torch.Tensor:
    """``(M, 2)`` ``(student id, teacher id)`` pairs: the single-byte BPE tokens
    and the teacher's byte of the same value (the hybrid ULD table)."""
    pairs = [(index, token[0]) for index, token in enumerate(spelled) if len(token) == 1]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


# ---- windows of whole tokens ----------------------------------------------------------


def window_ranges(ends: torch.Tensor, max_bytes: int) -> list[tuple[int, int]]:
    """Greedy ``[first, last]`` token ranges (inclusive) of at most ``max_bytes``
    bytes and at least two tokens, each starting at the previous one's last
    token (it is the next window's first input). A pair of tokens longer than
    ``max_bytes`` starts no window: the next one starts after it."""
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
    ends_ = ends.tolist()
    ranges, first = [], 0
    while first + 1 < len(ends_):
        last = first
        while last + 1 < len(ends_) and ends_[last + 1] - starts[first] <= max_bytes:
            last += 1
        if last == first:  # the pair (first, first + 1) does not fit
            first += 1
            continue
        ranges.append((first, last))
        first = last
    return ranges


@dataclass
class Windows:
    """Windows of whole BPE tokens and the same text as bytes, zero-padded.

    ``tokens`` ``(W, S + 1)``: a window's token ids, ``n_tokens`` of them;
    ``token_ends`` ``(W, S + 1)``: where each ends, in bytes from the window's
    start; ``bytes`` ``(W, max_bytes)`` uint8, ``n_bytes`` of them. Both models
    predict the window's tokens after the first: bytes
    ``[token_ends[:, 0], n_bytes)``.
    """

    tokens: torch.Tensor
    n_tokens: torch.Tensor
    token_ends: torch.Tensor
    bytes: torch.Tensor
    n_bytes: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def predicted_bytes(self) -> int:
        return int((self.n_bytes - self.token_ends[:, 0]).sum())


def make_windows(ids: torch.Tensor, ends: torch.Tensor, text: bytes, max_bytes: int) -> Windows:
    """The windows of :func:`window_ranges` as padded tensors."""
    ranges = window_ranges(ends, max_bytes)
    width = max(last - first + 1 for first, last in ranges)
    tokens = torch.zeros(len(ranges), width, dtype=torch.long)
    token_ends = torch.zeros(len(ranges), width, dtype=torch.long)
    data = torch.zeros(len(ranges), max_bytes, dtype=torch.uint8)
    n_tokens, n_bytes = [], []
    for w, (first, last) in enumerate(ranges):
        start = int(ends[first - 1]) if first > 0 else 0
        count = last - first + 1
        tokens[w, :count] = ids[first : last + 1]
        token_ends[w, :count] = ends[first : last + 1] - start
        size = int(ends[last]) - start
        data[w, :size] = torch.frombuffer(bytearray(text[start : start + size]), dtype=torch.uint8)
        n_tokens.append(count)
        n_bytes.append(size)
    return Windows(tokens, torch.tensor(n_tokens), token_ends, data, torch.tensor(n_bytes))


@dataclass
class Corpus:
    train: Windows
    held_out: Windows
    n_train_bytes: int
    n_held_bytes: int


def load_corpus(vocab_size: int, max_bytes: int, smoke_bytes: int | None = None):
    """``(tiny_lm corpus, Corpus, tokenizer, spelled)``: tiny_lm.py's byte
    windows (the teacher's training data) and the same split as BPE windows."""
    byte_corpus = tiny_lm.load_corpus(max_bytes - 1, max_bytes=smoke_bytes)
    docs = tiny_lm.docstrings()
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    train_text = "\n\n".join(train_docs).encode()
    held_text = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9).encode()
    if smoke_bytes is not None:
        # whole characters: cut at a byte that does not continue a UTF-8 sequence
        train_text = _cut(train_text, smoke_bytes)
        held_text = _cut(held_text, smoke_bytes // 4)
        train_docs = [train_text.decode()]
    tokenizer = train_bpe(train_docs, vocab_size)
    spelled = token_bytes(tokenizer)
    train = make_windows(*encode(tokenizer, spelled, train_text), train_text, max_bytes)
    held = make_windows(*encode(tokenizer, spelled, held_text), held_text, max_bytes)
    return byte_corpus, Corpus(train, held, len(train_text), len(held_text)), tokenizer, spelled


def _cut(text: bytes, size: int) -> bytes:
    """The first ``size`` bytes of UTF-8 ``text`` or fewer, ending on a whole character."""
    while size < len(text) and text[size] & 0xC0 == 0x80:
        size -= 1
    return text[:size]


# ---- models ---------------------------------------------------------------------------


class TokenLM(tiny_lm.TinyLM):
    """tiny_lm's model over a vocabulary of ``vocab`` tokens: ids ``(B, T)`` → logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__(dim, layers, heads, context)
        # tiny_lm's byte embedding and head, replaced by ones over the BPE vocabulary
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def build_student(vocab: int, context: int) -> TokenLM:
    size = tiny_lm.STUDENT
    return TokenLM(vocab, size.dim, size.layers, size.heads, context)


# ---- the aligned rows -----------------------------------------------------------------


@dataclass
class Predictions:
    """The rows of a batch of windows that predict text, in text order, and their byte spans.

    ``student_logits`` ``(N_s, V_s)``, ``student_ids`` ``(N_s,)`` (the tokens
    that occur), ``student_spans`` ``(N_s, 2)``; ``teacher_*`` the same per
    predicted byte (``(N_t, 256)``). Spans are in one byte coordinate for the
    batch: window ``k`` of the batch starts at ``k · max_bytes``.
    """

    student_logits: torch.Tensor | None
    student_ids: torch.Tensor
    student_spans: torch.Tensor
    teacher_logits: torch.Tensor | None
    teacher_ids: torch.Tensor
    teacher_spans: torch.Tensor


def predictions(windows: Windows, idx: torch.Tensor, student: TokenLM | None,
                teacher: tiny_lm.TinyLM | None) -> Predictions:
    """The rows of the windows ``idx``: the student's, and the teacher's without
    gradient (``*_logits`` None for a model that is None)."""
    tokens, n_tokens, token_ends = windows.tokens[idx], windows.n_tokens[idx], windows.token_ends[idx]
    data, n_bytes = windows.bytes[idx].long(), windows.n_bytes[idx]
    width = windows.bytes.shape[1]
    origin = (torch.arange(len(idx)) * width).unsqueeze(1)  # each window's first byte, batch coordinate

    s_valid = torch.arange(tokens.shape[1] - 1) < (n_tokens - 1).unsqueeze(1)  # (B, S): predicts a token
    student_logits = None if student is None else student(tokens[:, :-1])[s_valid]
    student_spans = torch.stack([token_ends[:, :-1] + origin, token_ends[:, 1:] + origin], -1)[s_valid]

    # teacher position j (input byte j) predicts byte j + 1; the window's first token is context only
    predicted = torch.arange(1, width)
    t_valid = (predicted >= token_ends[:, :1]) & (predicted < n_bytes.unsqueeze(1))  # (B, width - 1)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(data[:, :-1])[t_valid]
    starts = predicted + origin
    teacher_spans = torch.stack([starts, starts + 1], -1)[t_valid]
    return Predictions(student_logits, tokens[:, 1:][s_valid], student_spans, teacher_logits,
                       data[:, 1:][t_valid], teacher_spans)


def aligned_rows(p: Predictions, strategy: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """``(student rows (G, V_s), teacher rows (G, 256))``: one row of
    log-probabilities per group of student tokens and teacher bytes that spell
    the same text (``align_by_offsets``, then ``merge_aligned``)."""
    alignment = fastkd.align_by_offsets(p.student_spans, p.teacher_spans)
    student_rows = fastkd.merge_aligned(p.student_logits, p.student_ids, alignment.student_groups,
                                        strategy=strategy)
    teacher_rows = fastkd.merge_aligned(p.teacher_logits, p.teacher_ids, alignment.teacher_groups,
                                        strategy=strategy)
    return student_rows, teacher_rows


def uld(student_rows: torch.Tensor, teacher_rows: torch.Tensor, hybrid: torch.Tensor | None) -> torch.Tensor:
    return fastkd.uld_loss(student_rows, teacher_rows, student_is_logprob=True, teacher_is_logprob=True,
                           hybrid=hybrid)


# ---- training -------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    uld: bool
    hybrid: bool
    note: str


METHODS = [
    Method("CE alone", False, False, "next-token cross-entropy only"),
    Method("CE + ULD", True, False, "CE + w·uld_loss on the merge_aligned rows of align_by_offsets groups"),
    Method("CE + hybrid ULD", True, True, "the same, hybrid table: the 256 single-byte tokens ↔ the bytes"),
]


def loss_for(method: Method, student: TokenLM, teacher: tiny_lm.TinyLM | None, windows: Windows,
             idx: torch.Tensor, uld_weight: float, shared: torch.Tensor | None,
             strategy: str) -> torch.Tensor:
    """The training loss of the windows ``idx``: the mean next-token CE, plus
    ``uld_weight`` times the ULD loss (mean over aligned groups) for a ULD method."""
    p = predictions(windows, idx, student, teacher if method.uld else None)
    loss = F.cross_entropy(p.student_logits, p.student_ids)
    if method.uld:
        student_rows, teacher_rows = aligned_rows(p, strategy)
        loss = loss + uld_weight * uld(student_rows, teacher_rows, shared if method.hybrid else None)
    return loss


@torch.no_grad()
def evaluate(student: TokenLM | None, teacher: tiny_lm.TinyLM, windows: Windows, strategy: str = "first",
             chunk: int = 64) -> tuple[float, float]:
    """``(bits per byte, mean ULD)`` on ``windows``: the summed next-token NLL
    of the predicted text over its bytes / ln 2, and the plain ULD loss to the
    teacher per aligned group. ``student=None``: the teacher's bits per byte (ULD 0)."""
    nll, uld_sum, groups = 0.0, 0.0, 0
    for i in range(0, len(windows), chunk):
        idx = torch.arange(i, min(i + chunk, len(windows)))
        if student is None:
            p = predictions(windows, idx, None, teacher)
            nll += F.cross_entropy(p.teacher_logits, p.teacher_ids, reduction="sum").item()
            continue
        p = predictions(windows, idx, student, teacher)
        nll += F.cross_entropy(p.student_logits, p.student_ids, reduction="sum").item()
        student_rows, teacher_rows = aligned_rows(p, strategy)
        uld_sum += uld(student_rows, teacher_rows, None).item() * len(student_rows)
        groups += len(student_rows)
    return nll / windows.predicted_bytes / math.log(2), uld_sum / max(groups, 1)


def train(student: TokenLM, method: Method, windows: Windows, sched, seed: int, teacher=None,
          uld_weight: float = 0.3, shared: torch.Tensor | None = None, strategy: str = "first") -> None:
    """Trains ``student`` in place with tiny_lm.py's loop (AdamW, warm-up + cosine, clipping at 1)."""
    tiny_lm.fit(student, sched, seed, len(windows),
                lambda idx: loss_for(method, student, teacher, windows, idx, uld_weight, shared, strategy))


# ---- report ---------------------------------------------------------------------------


def summary(name: str, params: int, bpbs, ulds, note: str) -> dict:
    return _report.summary(name, params, note, bpb=("bpbs", bpbs), uld=("ulds", ulds))


def write_results(rows: list[dict], teacher_row: dict, out: Path) -> list[Path]:
    panels = (("bpb", "held-out bits per byte (lower is better)", 1.0),
              ("uld", "held-out ULD loss to the teacher", 1.0))

    def draw(plt):
        fig, axes = _report.point_panels(plt, rows, panels, figsize=(9, 2.8))
        ref = teacher_row["bpb_mean"]
        axes[0].axvline(ref, color="#dd8452", ls=":", lw=1.5, label="teacher")
        axes[0].legend(loc="lower right", fontsize=8, framealpha=1.0)
        lo = min(r["bpb_mean"] - r["bpb_std"] for r in rows)
        hi = max(r["bpb_mean"] + r["bpb_std"] for r in rows)
        pad = 0.15 * max(hi - min(lo, ref), 1e-3)
        axes[0].set_xlim(min(lo, ref) - pad, hi + pad)
        student_k, teacher_k = round(rows[0]["params"] / 1000), round(teacher_row["params"] / 1000)
        fig.suptitle(f"fastkd, ULD across tokenizers: {student_k}k-parameter BPE student, {teacher_k}k "
                     f"byte-level teacher, {rows[0]['seeds']} seeds", fontsize=9)
        return fig

    fields = ["method", "params", "seeds", "bpb_mean", "bpb_std", "uld_mean", "uld_std", "bpbs", "ulds",
              "note"]
    return _report.write_results(out, "cross_tokenizer", [*rows, teacher_row], fields, ("bpbs", "ulds"), draw)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = _report.argument_parser(__doc__, seeds=3, smoke="a few steps per run on a 20 kB slice, one seed",
                                     threads="tiny matmuls: 1 is fastest", name="cross_tokenizer")
    parser.add_argument("--steps", type=int, default=800, help="student steps (batches of 32 windows)")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--context", type=int, default=64, help="the teacher's context in bytes")
    parser.add_argument("--vocab", type=int, default=1024, help="the student's BPE vocabulary size")
    parser.add_argument("--uld-weight", type=float, default=0.3,
                        help="w in CE + w·ULD (0.3: the best of 0.3, 1 and 3 on seed 0, 400 steps)")
    parser.add_argument("--strategy", choices=("first", "last"), default="first",
                        help="merge_aligned's strategy for a group's teacher rows")
    args = _report.parse_arguments(parser, argv, "cross_tokenizer")
    seeds = 1 if args.smoke else args.seeds
    sched, teacher_sched = tiny_lm.schedules(args)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]

    start = time.perf_counter()
    byte_corpus, corpus, tokenizer, spelled = load_corpus(args.vocab, args.context + 1,
                                                          smoke_bytes=20_000 if args.smoke else None)
    vocab = tokenizer.get_vocab_size()
    shared = shared_byte_tokens(spelled)
    print(f"corpus: {corpus.n_train_bytes} training bytes, {corpus.n_held_bytes} held-out bytes; "
          f"BPE of {vocab} tokens, {corpus.n_train_bytes / corpus.train.n_tokens.sub(1).sum().item():.2f} "
          f"bytes per token; {len(corpus.train)} training windows of up to {args.context + 1} bytes "
          f"(at most {corpus.train.tokens.shape[1]} tokens)")
    torch.manual_seed(0)
    teacher = tiny_lm.build(tiny_lm.TEACHER, args.context)
    tiny_lm.train(teacher, tiny_lm.METHODS[0], byte_corpus, teacher_sched, seed=0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_bpb, _ = evaluate(None, teacher, corpus.held_out)
    context = args.context  # a window of context + 1 bytes has at most that many input tokens
    n_student = _report.n_params(build_student(vocab, context))
    print(f"teacher: {_report.n_params(teacher)} parameters, {teacher_sched.steps} steps, held-out "
          f"{teacher_bpb:.3f} bits per byte ({time.perf_counter() - start:.1f} s); student: {n_student} "
          f"parameters, {sched.steps} steps")

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        bpbs, ulds = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = build_student(vocab, context)
            train(student, method, corpus.train, sched, seed, teacher=teacher, uld_weight=args.uld_weight,
                  shared=shared, strategy=args.strategy)
            bpb, uld_value = evaluate(student, teacher, corpus.held_out, args.strategy)
            bpbs.append(bpb)
            ulds.append(uld_value)
        note = f"{method.note}, w = {args.uld_weight}, merge {args.strategy!r}" if method.uld else method.note
        rows.append(summary(method.name, n_student, bpbs, ulds, note))
        r = rows[-1]
        print(f"  {method.name:<16} bits per byte {r['bpb_mean']:.4f} ± {r['bpb_std']:.4f}, held-out ULD "
              f"{r['uld_mean']:.4f} ± {r['uld_std']:.4f}   ({time.perf_counter() - t0:.1f} s)")
    teacher_row = summary("teacher", _report.n_params(teacher), [teacher_bpb], [0.0],
                          f"byte-level, {teacher_sched.steps} steps")

    print(f"\n| method | held-out bits per byte ({seeds} seeds) | held-out ULD to the teacher | setting |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bpb_mean']:.4f} ± {r['bpb_std']:.4f} | {r['uld_mean']:.4f} ± "
              f"{r['uld_std']:.4f} | {r['note']} |")
    print(f"| teacher | {teacher_bpb:.4f} | 0 | byte-level, {_report.n_params(teacher)} parameters, "
          f"{teacher_sched.steps} steps |")
    write_results(rows, teacher_row, args.out)
    print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
