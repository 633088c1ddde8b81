"""Distiller (hooks, teachers, weighting, errors) and EMATeacher."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd import Distiller, EMATeacher, Term


class Net(nn.Module):
    """conv body ("body", "body.0") → "layer2" → pooled → "fc" logits."""

    def __init__(self, channels=4, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.layer2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.layer2(self.body(x))
        return self.fc(h.mean(dim=(2, 3)))


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


class Recorder:
    """A loss that records what it was given and returns a fixed function of it."""

    def __init__(self):
        self.calls = []

    def __call__(self, s, t):
        self.calls.append((s, t))
        first_s = s[0] if isinstance(s, list) else s
        return first_s.float().square().mean()


def hooks_of(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_capture_the_right_modules_and_are_removed():
    student, teacher = Net(4, seed=0), Net(6, seed=1)
    rec_out, rec_body, rec_dotted = Recorder(), Recorder(), Recorder()
    terms = [
        Term(rec_out),
        Term(rec_body, student_layer="layer2", teacher_layer="body", name="mid"),
        Term(rec_dotted, student_layer="body.0", name="conv"),
    ]
    x, y = batch()
    with Distiller(student, teacher, terms, hard_weight=0.0) as distiller:
        assert hooks_of(student) > 0 and hooks_of(teacher) > 0
        distiller.eval()  # BatchNorm in eval: the manual recomputation below is deterministic
        out = distiller(x, labels=y)
    assert hooks_of(student) == 0 and hooks_of(teacher) == 0
    with torch.no_grad():
        assert torch.equal(out.output, student(x))
        assert torch.equal(rec_out.calls[0][0], student(x))
        assert torch.equal(rec_out.calls[0][1], teacher(x))
        assert torch.equal(rec_body.calls[0][0], student.layer2(student.body(x)))
        assert torch.equal(rec_body.calls[0][1], teacher.body(x))
        assert torch.equal(rec_dotted.calls[0][0], student.body[0](x))
        assert torch.equal(rec_dotted.calls[0][1], teacher.body[0](x))
    assert set(out.parts) == {"Recorder", "mid", "conv"}
    # outside a Distiller call the hooks record nothing (and cost nothing)
    distiller2 = Distiller(student, teacher, [Term(Recorder())], hard_weight=0.0)
    student(x)
    assert distiller2._student_capture.values == {}
    distiller2.close()
    assert hooks_of(student) == 0


def test_loss_is_the_weighted_sum_and_teacher_gets_no_gradient():
    student, teacher = Net(4, seed=0), Net(6, seed=1)
    teacher.train()  # the Distiller puts it in eval mode
    kd = functools.partial(fastkd.kd_loss, temperature=2.0)
    x, y = batch()
    distiller = Distiller(student, teacher, [Term(kd, weight=0.3)], hard_weight=0.7)
    assert not teacher.training
    out = distiller(x, labels=y)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert student.training and not teacher.training
    with torch.no_grad():
        s_logits, t_logits = out.output, teacher(x)
        want_kd = 0.3 * fastkd.kd_loss(s_logits, t_logits, temperature=2.0)
        want_hard = 0.7 * F.cross_entropy(s_logits, y)
    assert out.parts["kd_loss"].item() == pytest.approx(want_kd.item(), rel=1e-6)
    assert out.parts["hard"].item() == pytest.approx(want_hard.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.parts.values()), rel=1e-6)
    assert all(not v.requires_grad for v in out.parts.values())


def test_parameters_are_student_and_loss_modules_not_teacher():
    student, teacher = Net(4, seed=0), Net(6, seed=1)
    hint = fastkd.HintLoss(4, 6)
    distiller = Distiller(student, teacher, [Term(hint, student_layer="layer2")])
    ids = {id(p) for p in distiller.parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in hint.parameters()}
    distiller.train()
    assert hint.training and not teacher.training
    x, y = batch()
    out = distiller(x, labels=y)
    out.loss.backward()
    assert all(p.grad is not None for p in hint.parameters())
    assert set(out.parts) == {"HintLoss[layer2]", "hard"}


def test_multi_teacher_weighting_and_single_teacher_terms():
    student = Net(4, seed=0)
    teachers = [Net(6, seed=1), Net(5, seed=2)]
    kd = fastkd.KDLoss(temperature=3.0)
    x, y = batch()
    distiller = Distiller(
        student,
        teachers,
        [Term(kd, name="both"), Term(kd, teacher=1, weight=2.0, name="second")],
        hard_weight=0.0,
        teacher_weights=(0.25, 0.75),
    )
    distiller.eval()
    out = distiller(x)
    with torch.no_grad():
        s = student(x)
        l0, l1 = kd(s, teachers[0](x)), kd(s, teachers[1](x))
    assert out.parts["both"].item() == pytest.approx((0.25 * l0 + 0.75 * l1).item(), rel=1e-6)
    assert out.parts["second"].item() == pytest.approx(2.0 * l1.item(), rel=1e-6)
    for bad in ((0.5, 0.6), (1.0,), (1.5, -0.5)):
        with pytest.raises(ValueError, match="teacher_weights"):
            Distiller(student, teachers, [Term(kd)], teacher_weights=bad)
    with pytest.raises(ValueError, match=r"terms\[0\].teacher"):
        Distiller(student, teachers, [Term(kd, teacher=2)])


def test_self_distillation_detaches_the_teacher_side():
    """Deep supervision: the student's own logits teach an earlier layer; only
    the student side of the term gets a gradient."""
    student = Net(4, seed=0)
    student.eval()
    head = nn.Linear(4, 3)

    def shallow_kd(h, logits):
        return fastkd.kd_loss(head(h.mean(dim=(2, 3))), logits, temperature=2.0)

    x, y = batch()
    distiller = Distiller(student, student, [Term(shallow_kd, student_layer="body", teacher_layer="")])
    out = distiller(x, labels=y)
    out.loss.backward()
    got = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    logits = student(x)
    h = student.body(x)
    want_loss = shallow_kd(h, logits.detach()) + F.cross_entropy(logits, y)
    want_loss.backward()
    assert out.loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    for a, p in zip(got, student.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_precomputed_teacher_outputs():
    student = Net(4, seed=0)
    x, y = batch()
    cached = torch.randn(6, 3, requires_grad=True)
    distiller = Distiller(student, None, [Term(fastkd.KDLoss())])
    out = distiller(x, labels=y, teacher_outputs={"": cached})
    out.loss.backward()
    assert cached.grad is None
    with torch.no_grad():
        want = fastkd.kd_loss(out.output, cached)
    assert out.parts["KDLoss"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="teacher_outputs are required"):
        distiller(x, labels=y)
    with pytest.raises(ValueError, match="no teacher output for layer 'layer2'"):
        Distiller(student, None, [Term(Recorder(), student_layer="layer2")])(x, labels=y, teacher_outputs={})


def test_unknown_layer_names_raise_naming_them():
    student, teacher = Net(4, seed=0), Net(6, seed=1)
    with pytest.raises(ValueError, match="unknown student layer 'layer3'.*did you mean.*layer2"):
        Distiller(student, teacher, [Term(Recorder(), student_layer="layer3")])
    with pytest.raises(ValueError, match="unknown teacher layer 'body.7'"):
        Distiller(student, teacher, [Term(Recorder(), student_layer="body.0", teacher_layer="body.7")])
    assert hooks_of(student) == 0  # a failed construction registered nothing on the student


def test_shape_mismatch_that_cannot_be_bridged_names_the_term_and_shapes():
    student, teacher = Net(4, classes=3), Net(6, classes=5, seed=1)
    x, y = batch()
    distiller = Distiller(student, teacher, [Term(fastkd.KDLoss(), name="logits")])
    with pytest.raises(
        ValueError,
        match=r"term 'logits' \(student 'output' shape \(6, 3\), teacher 'output' shape \(6, 5\)\)",
    ):
        distiller(x, labels=y)
    hint = fastkd.HintLoss(4, 7)
    distiller = Distiller(Net(4), Net(6, seed=1), [Term(hint, student_layer="layer2")], hard_weight=0)
    with pytest.raises(ValueError, match="teacher_features has 6 channels"):
        distiller(x)


def test_layer_tuples_feed_list_losses():
    student, teacher = Net(4, seed=0), Net(6, seed=1)
    x, y = batch()
    at = fastkd.ATLoss()
    distiller = Distiller(
        student, teacher, [Term(at, student_layer=("body", "layer2"), weight=1000.0)], hard_weight=0
    )
    distiller.eval()
    out = distiller(x)
    with torch.no_grad():
        want = 1000.0 * (
            fastkd.at_loss(student.body(x), teacher.body(x))
            + fastkd.at_loss(student.layer2(student.body(x)), teacher.layer2(teacher.body(x)))
        )
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same number"):
        Distiller(student, teacher, [Term(at, student_layer=("body", "layer2"), teacher_layer="body")])


class TupleNet(Net):
    def forward(self, x):
        return super().forward(x), "extra"


def test_non_tensor_outputs_need_select():
    student, teacher = TupleNet(4), TupleNet(6, seed=1)
    x, y = batch()
    hard = lambda out, labels: F.cross_entropy(out[0], labels)  # noqa: E731
    with pytest.raises(ValueError, match="returned tuple, not a tensor; give the Term a select="):
        Distiller(student, teacher, [Term(fastkd.KDLoss())], hard_loss=hard)(x, labels=y)
    out = Distiller(student, teacher, [Term(fastkd.KDLoss(), select=lambda o: o[0])], hard_loss=hard)(
        x, labels=y
    )
    assert torch.isfinite(out.loss)


def test_configuration_errors():
    student, teacher = Net(4), Net(6, seed=1)
    x, y = batch()
    with pytest.raises(ValueError, match="labels are required"):
        Distiller(student, teacher, [Term(Recorder())])(x)
    with pytest.raises(ValueError, match=r"terms\[0\].weight"):
        Distiller(student, teacher, [Term(Recorder(), weight=-1.0)])
    with pytest.raises(ValueError, match="duplicate part name"):
        Distiller(student, teacher, [Term(fastkd.KDLoss()), Term(fastkd.KDLoss())])
    with pytest.raises(ValueError, match="terms must be a sequence"):
        Distiller(student, teacher, Term(Recorder()))
    with pytest.raises(ValueError, match="hard_weight"):
        Distiller(student, teacher, [], hard_weight=float("nan"))
    with pytest.raises(ValueError, match="teacher must be"):
        Distiller(student, "teacher", [])


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(self.lin(x))


def test_module_run_twice_is_ambiguous():
    model = Twice()
    distiller = Distiller(model, Twice(), [Term(Recorder(), student_layer="lin")], hard_weight=0)
    with pytest.raises(RuntimeError, match="'lin' ran more than once"):
        distiller(torch.randn(2, 3))


# ---- EMATeacher ----------------------------------------------------------------------


def test_ema_update_matches_hand_computation_and_copies_buffers():
    student = Net(4, seed=0)
    ema = EMATeacher(student, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    assert all(not p.requires_grad for p in ema.parameters()) and not ema.module.training
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(batch()[0])  # moves the BatchNorm running statistics
    ema.update(student)
    new = student.state_dict()
    for name, value in ema.module.state_dict().items():
        if name in dict(student.named_parameters()):
            torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * new[name], rtol=1e-6, atol=1e-7)
        else:  # buffers: running_mean, running_var, num_batches_tracked
            assert torch.equal(value, new[name])
    assert ema.num_updates == 1
    x = batch()[0]
    ema.module.eval()
    assert torch.equal(ema(x), ema.module(x))


def test_ema_validation_and_as_distiller_teacher():
    student = Net(4, seed=0)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="decay"):
            EMATeacher(student, decay=bad)
    ema = EMATeacher(student, decay=0.5)
    with pytest.raises(ValueError, match="parameter / buffer names"):
        ema.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has shape"):
        ema.update(Net(5))
    x, y = batch()
    rec = Recorder()
    distiller = Distiller(student, ema, [Term(rec, student_layer="layer2")])
    distiller(x, labels=y).loss.backward()
    with torch.no_grad():
        assert torch.equal(rec.calls[0][1], ema.module.layer2(ema.module.body(x)))
    assert all(p.grad is None for p in ema.parameters())
    distiller.close()
    assert hooks_of(ema) == 0


def test_indices_reach_terms_that_ask_for_them_and_crd_trains_through_distiller():
    student, teacher = Net(4, seed=0), Net(6, seed=1)
    seen = []

    def with_both(s, t, labels, indices):
        seen.append((labels.clone(), indices.clone()))
        return s.float().square().mean()

    x, y = batch()
    idx = torch.tensor([5, 0, 3, 9, 2, 7])
    terms = [Term(with_both, with_labels=True, with_indices=True)]
    with Distiller(student, teacher, terms, hard_weight=0.0) as d:
        d(x, labels=y, indices=idx)
        assert torch.equal(seen[0][0], y) and torch.equal(seen[0][1], idx)
        with pytest.raises(ValueError, match="indices are required"):
            d(x, labels=y)

    # CRD (memory bank indexed by the samples' dataset indices) end to end
    crd = fastkd.CRDLoss(student_dim=3, teacher_dim=3, n_data=10, feat_dim=4, nce_k=5)
    with Distiller(student, teacher, [Term(crd, with_indices=True, weight=0.8)], hard_weight=1.0) as d:
        d.train()
        bank_before = crd.memory_s.clone()
        out = d(x, labels=y, indices=idx)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert any(p.grad is not None for p in crd.parameters())  # its embed heads train
        changed = (crd.memory_s != bank_before).any(dim=1)
        assert torch.equal(changed.nonzero().squeeze(1).sort().values, idx.sort().values)
