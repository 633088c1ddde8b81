"""Knowledge distillation on scikit-learn's handwritten digits, every method through fastkd.Distiller.

    python examples/digits.py                 # 5 seeds, writes examples/results/digits.{csv,png}
    python examples/digits.py --seeds 2       # quicker
    python examples/digits.py --smoke         # a few steps per run (the test suite runs this)

The data is ``sklearn.datasets.load_digits`` (1797 8×8 images, bundled with
scikit-learn, no download), split once into 1347 training and 450 test images.
A small CNN teacher (~52k parameters) is trained once; then a ~21× smaller
student (~2.5k parameters) is trained from the same initialisations and batch
orders (one per seed) alone and with each distillation method, and its test
accuracy is reported as mean ± std over the seeds.

Each method is one entry of METHODS: the fastkd.Term list it adds to the
hard-label cross-entropy (weights are the usual published defaults, not tuned
here). Adding a loss is one more entry.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fastkd
from fastkd import Term

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (the examples' shared csv / plot / summary helpers)
from _report import n_params  # noqa: E402

# ---- models ---------------------------------------------------------------------------


class CNN(nn.Module):
    """block1 (C1, 8, 8) → block2 (C2, 4, 4) → embed (32) → fc (10 logits)."""

    def __init__(self, c1: int, c2: int, embed: int = 32) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, embed), nn.ReLU())
        self.fc = nn.Linear(embed, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(self.block2(self.block1(x))))


TEACHER = (32, 64)
N_TRAIN = 1347  # training images (load_data's split); CRD's memory bank has one row per image
STUDENT = (2, 4)


# ---- the methods ----------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of the table: the distillation terms (built fresh for each run:
    HintLoss adapters are trained with the student) and the weight of the
    hard-label cross-entropy. ``teacher="ema"`` distils from an EMA of the
    student itself instead of the trained teacher; ``None`` trains alone."""

    name: str
    terms: Callable[[], list[Term]] = list
    hard_weight: float = 1.0
    teacher: str | None = "cnn"
    note: str = ""


def kd(weight: float = 0.9) -> Term:
    return Term(fastkd.KDLoss(temperature=4.0), weight=weight, name="kd")


def feature_method(name: str, make_loss: Callable[[], nn.Module], student_layer, weight: float,
                   note: str) -> Method:
    """A method of one feature-level term: ``weight · make_loss()`` between the student's and
    the teacher's outputs of ``student_layer`` (a layer name, or a tuple of them)."""
    return Method(name, lambda: [Term(make_loss(), student_layer=student_layer, weight=weight)], note=note)


METHODS = [
    Method("student alone", teacher=None, note="cross-entropy only"),
    Method("KD", lambda: [kd()], hard_weight=0.1, note="Hinton, T=4, 0.1·CE + 0.9·KD"),
    Method(
        "FitNets + KD",
        lambda: [kd(), Term(fastkd.HintLoss(STUDENT[1], TEACHER[1]), student_layer="block2", weight=100.0)],
        hard_weight=0.1,
        note="hint on block2 (1×1 conv + BN adapter), weight 100",
    ),
    feature_method("AT", fastkd.ATLoss, ("block1", "block2"), 1000.0,
                   "attention transfer on block1 and block2, weight 1000"),
    feature_method("NST", fastkd.NSTLoss, "block2", 50.0, "neural selectivity transfer on block2, weight 50"),
    feature_method("MMD", fastkd.MMDLoss, "embed", 10.0,
                   "gaussian MMD between the 32-d embeddings, weight 10"),
    feature_method("InfoNCE", lambda: fastkd.InfoNCELoss(temperature=0.1, normalize=True), "embed", 1.0,
                   "student → teacher embedding, in-batch negatives, τ=0.1"),
    Method(
        "DKD",
        lambda: [Term(fastkd.DKDLoss(), with_labels=True, name="dkd")],
        note="decoupled KD on the logits, α=1, β=8, T=4 (mdistiller's defaults, no warm-up)",
    ),
    feature_method("RKD", fastkd.RKDLoss, "embed", 1.0,
                   "RKD distance (25) + angle (50) on the 32-d embeddings"),
    feature_method("PKT", fastkd.PKTLoss, "embed", 30000.0,
                   "probabilistic knowledge transfer on the embeddings, weight 30000 (RepDistiller)"),
    feature_method("SP", fastkd.SPLoss, "block2", 3000.0,
                   "similarity-preserving on block2, weight 3000 (RepDistiller)"),
    Method(
        "CRD",
        lambda: [
            Term(
                fastkd.CRDLoss(32, 32, n_data=N_TRAIN, feat_dim=32, nce_k=512),
                student_layer="embed",
                with_indices=True,
                weight=0.8,
            )
        ],
        note="contrastive representation distillation on the embeddings, 512 negatives, weight 0.8",
    ),
    Method(
        "self-KD (EMA)",
        lambda: [kd()],
        hard_weight=0.1,
        teacher="ema",
        note="KD from an EMA of the student (decay 0.99), no trained teacher",
    ),
]


# ---- data and training ----------------------------------------------------------------


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=450, random_state=0, stratify=y.numpy())
    if len(idx_train) != N_TRAIN:  # CRD's bank size; scikit-learn's digits have 1797 images
        raise RuntimeError(f"expected {N_TRAIN} training images, got {len(idx_train)}")
    return Data(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


@dataclass(frozen=True)
class Schedule:
    epochs: int
    batch: int = 64
    lr: float = 3e-3
    max_steps: int | None = None  # --smoke


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(
    student: nn.Module, teacher: nn.Module | None, method: Method, data: Data, sched: Schedule, seed: int
) -> None:
    """Trains ``student`` in place with ``method`` through a Distiller."""
    ema = fastkd.EMATeacher(student, decay=0.99) if method.teacher == "ema" else None
    source = ema if ema is not None else (teacher if method.teacher == "cnn" else None)
    terms = method.terms()
    if source is None and terms:
        raise ValueError(f"{method.name}: terms need a teacher")
    # No teacher and no terms: plain supervised training (the Distiller then
    # only adds the cross-entropy, and never looks at the teacher).
    with fastkd.Distiller(student, source, terms, hard_weight=method.hard_weight) as distiller:
        opt = torch.optim.Adam(distiller.parameters(), lr=sched.lr)
        order = torch.Generator().manual_seed(1000 + seed)
        steps = 0
        distiller.train()
        for _ in range(sched.epochs):
            perm = torch.randperm(len(data.y_train), generator=order)
            for i in range(0, len(perm) - sched.batch + 1, sched.batch):
                idx = perm[i : i + sched.batch]
                out = distiller(data.x_train[idx], labels=data.y_train[idx], indices=idx)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                if ema is not None:
                    ema.update(student)
                steps += 1
                if sched.max_steps is not None and steps >= sched.max_steps:
                    return


# ---- report ---------------------------------------------------------------------------


def write_results(rows: list[dict], teacher_acc: float, out: Path) -> list[Path]:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        names = [r["method"] for r in rows]
        means = [100 * r["mean"] for r in rows]
        stds = [100 * r["std"] for r in rows]
        ax.barh(names, means, xerr=stds, color="#4c72b0", capsize=3)
        ax.axvline(100 * rows[0]["mean"], color="grey", ls="--", lw=1, label="student alone")
        ax.axvline(100 * teacher_acc, color="#dd8452", ls=":", lw=1.5, label="teacher")
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        ax.set_xlim(max(0.0, lo - 2), 100)
        ax.invert_yaxis()
        ax.set_xlabel(f"student test accuracy, % (mean ± std over {rows[0]['seeds']} seeds)")
        ax.set_title("fastkd on sklearn digits: ~2.5k-parameter student, ~52k teacher", fontsize=10)
        ax.legend(loc="lower right", fontsize=8, framealpha=1.0)
        return fig

    fields = ["method", "seeds", "mean", "std", "accuracies", "note"]
    return _report.write_results(out, "digits", rows, fields, ("accuracies",), draw)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = _report.argument_parser(__doc__, seeds=5, smoke="a few steps per run, one seed",
                                     threads="tiny models: 1 is fastest", name="digits")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs (the teacher trains 30)")
    args = _report.parse_arguments(parser, argv, "digits")
    seeds = 1 if args.smoke else args.seeds
    sched = Schedule(epochs=1 if args.smoke else args.epochs, max_steps=3 if args.smoke else None)
    teacher_sched = Schedule(epochs=1 if args.smoke else 30, max_steps=3 if args.smoke else None)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]

    start = time.perf_counter()
    data = load_data()
    torch.manual_seed(0)
    teacher = CNN(*TEACHER)
    train(teacher, None, METHODS[0], data, teacher_sched, seed=0)
    teacher.eval()
    teacher_acc = accuracy(teacher, data.x_test, data.y_test)
    print(
        f"teacher: {n_params(teacher)} parameters, test accuracy {100 * teacher_acc:.2f}% "
        f"({time.perf_counter() - start:.1f} s); student: {n_params(CNN(*STUDENT))} parameters"
    )

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        accs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = CNN(*STUDENT)
            train(student, teacher, method, data, sched, seed)
            accs.append(accuracy(student, data.x_test, data.y_test))
        mean = statistics.fmean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(
            {
                "method": method.name,
                "seeds": seeds,
                "mean": mean,
                "std": std,
                "accuracies": accs,
                "note": method.note,
            }
        )
        print(
            f"  {method.name:<16} {100 * mean:6.2f} ± {100 * std:4.2f} %   ({time.perf_counter() - t0:.1f} s)"
        )

    base = rows[0]["mean"] if rows and rows[0]["method"] == "student alone" else None
    print(f"\n| method | test accuracy % (mean ± std, {seeds} seeds) | vs alone | setting |")
    print("|---|---|---|---|")
    for row in rows:
        delta = "" if base is None else f"{100 * (row['mean'] - base):+.2f}"
        print(
            f"| {row['method']} | {100 * row['mean']:.2f} ± {100 * row['std']:.2f} "
            f"| {delta} | {row['note']} |"
        )
    epochs = teacher_sched.epochs
    print(f"| teacher | {100 * teacher_acc:.2f} | | {n_params(teacher)} parameters, {epochs} epochs |")
    write_results(rows, teacher_acc, args.out)
    print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
