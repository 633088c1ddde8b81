"""The training-loop surface: :class:`Distiller` (forward hooks, teacher runs,
weighted loss terms) and :class:`EMATeacher` (self-distillation)."""

from __future__ import annotations

import copy
import difflib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OUTPUT", "Distiller", "DistillerOutput", "EMATeacher", "Term"]

OUTPUT = ""
"""The layer name of a model's own output (its logits, for a classifier): the root module's name."""

Layers = str | tuple[str, ...]


@dataclass(frozen=True)
class Term:
    """One distillation loss between a student layer and a teacher layer.

    Attributes:
        loss: called as ``loss(student_value, teacher_value)`` and returning a
            ``()`` tensor: a fastkd loss module (``KDLoss(temperature=4)``,
            ``HintLoss(...)``, ``ATLoss()``), a function
            (``functools.partial(fastkd.kd_loss, temperature=4)``) or your own.
            With ``with_labels=True`` it is called ``loss(s, t, labels)``; with
            ``with_indices=True`` the batch's dataset indices follow
            (``loss(s, t[, labels], indices)``).
            Loss modules with parameters (``HintLoss``'s adapter) become part of
            :meth:`Distiller.parameters`.
        student_layer: the student submodule whose output is used, by its
            ``named_modules()`` name (``"layer3"``, ``"blocks.2.mlp"``), or
            :data:`OUTPUT` (``""``, the default) for the model's output. A tuple
            of names passes a list of outputs (for :class:`fastkd.ATLoss`).
        teacher_layer: the same for the teacher; ``None`` (default) means the
            same name(s) as ``student_layer``.
        weight: multiplies the loss (``>= 0``).
        name: the key of this term in :attr:`DistillerOutput.parts`; default
            derived from the loss and the layers.
        teacher: with several teachers, the index of the one this term uses;
            ``None`` (default) uses every teacher, weighted by ``teacher_weights``.
        with_labels: pass the batch's labels as a third argument (DKD-style losses).
        with_indices: pass the ``indices=`` of the :class:`Distiller` call (each
            sample's index in the training set) after the other arguments —
            what :class:`fastkd.CRDLoss` needs for its memory bank.
        select: applied to each captured output before the loss, to pull a
            tensor out of a tuple or a model-output object
            (``select=lambda out: out.logits``).
    """

    loss: Callable[..., torch.Tensor]
    student_layer: Layers = OUTPUT
    teacher_layer: Layers | None = None
    weight: float = 1.0
    name: str | None = None
    teacher: int | None = None
    with_labels: bool = False
    with_indices: bool = False
    select: Callable[[Any], torch.Tensor] | None = None

    @property
    def teacher_layers(self) -> Layers:
        return self.student_layer if self.teacher_layer is None else self.teacher_layer

    def default_name(self) -> str:
        loss = self.loss
        base = getattr(loss, "__name__", None) or getattr(getattr(loss, "func", None), "__name__", None)
        base = base or type(loss).__name__
        s, t = _names(self.student_layer), _names(self.teacher_layers)
        if s == t == (OUTPUT,):
            return base
        where = ",".join(n or "output" for n in s)
        if t != s:
            where += "→" + ",".join(n or "output" for n in t)
        return f"{base}[{where}]"


@dataclass
class DistillerOutput:
    """What one :class:`Distiller` step returns.

    Attributes:
        loss: ``()`` total loss, ``Σ weight · term + hard_weight · hard_loss``, with autograd.
        parts: each weighted summand, detached, by name (``"hard"`` for the
            label loss); they add up to ``loss``. For logging.
        output: the student's output (logits), for metrics.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    output: Any = None


def _names(layers: Layers) -> tuple[str, ...]:
    return (layers,) if isinstance(layers, str) else tuple(layers)


def _hook_root(model: nn.Module) -> nn.Module:
    """Where layer names are looked up: an :class:`EMATeacher`'s names are its model's."""
    return model.module if isinstance(model, EMATeacher) else model


def _check_layer(model: nn.Module, name: str, what: str) -> nn.Module:
    if not isinstance(name, str):
        raise ValueError(f"{what} layer names must be strings, got {name!r}")
    names = [n for n, _ in model.named_modules()]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown {what} layer {name!r}: not a submodule name of {type(model).__name__} "
            f"(use {OUTPUT!r} for the model output){hint}"
        )
    return model.get_submodule(name)


class _Capture:
    """Forward hooks on named submodules of one model; records only while armed."""

    def __init__(self, model: nn.Module, names: Sequence[str], what: str) -> None:
        self.what = what
        self.armed = False
        self.values: dict[str, Any] = {}
        self.handles = []
        for name in dict.fromkeys(names):  # keeps order, drops duplicates
            module = _check_layer(model, name, what)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(module, args, output):
            if not self.armed:
                return
            if name in self.values:
                raise RuntimeError(
                    f"{self.what} layer {name!r} ran more than once in one forward; its output is ambiguous"
                )
            self.values[name] = output

        return record

    def get(self, name: str) -> Any:
        if name not in self.values:
            raise RuntimeError(f"{self.what} layer {name!r} did not run in the forward pass")
        return self.values[name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


class Distiller(nn.Module):
    """Wraps a student, its teacher(s) and weighted loss terms into one training step.

    ``distiller(*inputs, labels=y)`` runs every teacher on ``inputs`` in eval
    mode under ``torch.no_grad()`` and the student with autograd, captures the
    outputs of the layers the :class:`Term` entries name (forward hooks), and
    returns a :class:`DistillerOutput` whose ``loss`` is

        ``Σ_terms weight · Σ_k w_k · loss(student_layer, teacher_k_layer)
        + hard_weight · hard_loss(student_output, labels)``

    (``w_k`` = ``teacher_weights``; a single teacher has ``w = 1``).

    Teachers:
        - an ``nn.Module`` (or :class:`EMATeacher`), or a sequence of them;
        - the student itself (``teacher=student``): deep supervision /
          self-distillation, the teacher-side layers are the student's own,
          detached;
        - ``None``: no teacher model; pass ``teacher_outputs=`` (a mapping
          layer name → output, or one mapping per teacher) at each call, e.g.
          cached logits. ``teacher_outputs=`` also skips running teacher models.

    ``Distiller`` is an ``nn.Module`` whose submodules are the student and the
    loss modules of the terms, so ``distiller.parameters()`` is what the
    optimizer needs (student and adapters, not the teacher) and
    ``distiller.train()`` does not touch the teacher. Move teachers to a
    device yourself. Hooks are removed by :meth:`close` (or leaving a ``with``
    block); they record only during a ``Distiller`` call.

    Args:
        student: the model being trained.
        teacher: see above.
        terms: the :class:`Term` entries (may be empty: plain supervised training).
        hard_weight: weight of ``hard_loss`` (0 disables it; then ``labels`` are optional).
        hard_loss: ``hard_loss(student_output, labels)``; default ``F.cross_entropy``.
        teacher_weights: ``(K,)`` positive weights summing to 1 for ``K``
            teachers; default uniform.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | None,
        terms: Sequence[Term] = (),
        *,
        hard_weight: float = 1.0,
        hard_loss: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy,
        teacher_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise ValueError(f"student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        self.self_distillation = teacher is student
        if teacher is None or self.self_distillation:
            teachers: tuple[nn.Module, ...] = ()
        elif isinstance(teacher, nn.Module):
            teachers = (teacher,)
        elif isinstance(teacher, Sequence) and teacher and all(isinstance(t, nn.Module) for t in teacher):
            teachers = tuple(teacher)
        else:
            raise ValueError(
                "teacher must be an nn.Module, a non-empty sequence of them, the student, or None"
            )
        # A plain tuple attribute: the teachers are not submodules (not in
        # parameters(), not switched by train()).
        self._teachers = teachers
        self.num_teachers = 1 if teacher is None or self.self_distillation else len(teachers)
        self.teacher_weights = self._teacher_weights(teacher_weights)
        self.hard_weight = _weight("hard_weight", hard_weight)
        if not callable(hard_loss):
            raise ValueError(f"hard_loss must be callable, got {type(hard_loss).__name__}")
        self.hard_loss = hard_loss
        self.terms = self._check_terms(terms)
        self.loss_modules = nn.ModuleList(t.loss for t in self.terms if isinstance(t.loss, nn.Module))

        student_names = [n for t in self.terms for n in _names(t.student_layer)]
        teacher_names = [n for t in self.terms for n in _names(t.teacher_layers)]
        if self.self_distillation:
            student_names += teacher_names
        # Every name is checked on every model before any hook is registered,
        # so a bad name leaves the models untouched.
        wanted = [(student, [*student_names, OUTPUT], "student")] + [
            (_hook_root(t), [*teacher_names, OUTPUT], f"teacher {k}" if len(teachers) > 1 else "teacher")
            for k, t in enumerate(teachers)
        ]
        for model, names, what in wanted:
            for name in names:
                _check_layer(model, name, what)
        captures = [_Capture(model, names, what) for model, names, what in wanted]
        self._student_capture, self._teacher_captures = captures[0], captures[1:]
        for t in teachers:
            t.eval()

    # ---- configuration checks ------------------------------------------------

    def _teacher_weights(self, weights) -> tuple[float, ...]:
        k = self.num_teachers
        if weights is None:
            return (1.0 / k,) * k
        if isinstance(weights, torch.Tensor):
            weights = weights.tolist()
        if not isinstance(weights, Sequence) or len(weights) != k:
            raise ValueError(
                f"teacher_weights must be a sequence of {k} numbers (one per teacher), got {weights!r}"
            )
        weights = tuple(_weight("teacher_weights", w) for w in weights)
        if not math.isclose(sum(weights), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ValueError(f"teacher_weights must sum to 1, got {weights} (sum {sum(weights)})")
        return weights

    def _check_terms(self, terms) -> tuple[Term, ...]:
        if isinstance(terms, Term) or not isinstance(terms, Sequence):
            raise ValueError(f"terms must be a sequence of fastkd.Term, got {type(terms).__name__}")
        seen = set()
        for i, term in enumerate(terms):
            if not isinstance(term, Term):
                raise ValueError(f"terms[{i}] must be a fastkd.Term, got {type(term).__name__}")
            if not callable(term.loss):
                raise ValueError(f"terms[{i}].loss must be callable, got {type(term.loss).__name__}")
            _weight(f"terms[{i}].weight", term.weight)
            s, t = _names(term.student_layer), _names(term.teacher_layers)
            if not s or len(s) != len(t):
                raise ValueError(
                    f"terms[{i}]: student_layer {term.student_layer!r} and teacher_layer "
                    f"{term.teacher_layers!r} must name the same number (>= 1) of layers"
                )
            if term.teacher is not None and not (
                isinstance(term.teacher, int) and 0 <= term.teacher < len(self._teachers)
            ):
                raise ValueError(
                    f"terms[{i}].teacher must be None or a teacher index in [0, {len(self._teachers)}), "
                    f"got {term.teacher!r}"
                )
            name = term.name or term.default_name()
            if name in seen or name == "hard":
                raise ValueError(f"terms[{i}]: duplicate part name {name!r}; give the term a distinct name=")
            seen.add(name)
        return tuple(terms)

    @property
    def teachers(self) -> tuple[nn.Module, ...]:
        return self._teachers

    # ---- the step ------------------------------------------------------------

    def forward(
        self,
        *inputs: Any,
        labels: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        teacher_outputs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> DistillerOutput:
        """One step: ``student(*inputs, **kwargs)`` and the teachers on the same inputs.

        Args:
            inputs, kwargs: the model inputs.
            labels: for the hard loss (required when ``hard_weight > 0``) and
                for terms with ``with_labels=True``.
            indices: ``(B,)`` int64, each sample's index in the training set,
                for terms with ``with_indices=True`` (required then).
            teacher_outputs: precomputed teacher layer outputs (layer name →
                output; :data:`OUTPUT` for the model output), one mapping per
                teacher; given, the teacher models are not run. Detached.

        Returns:
            :class:`DistillerOutput`.
        """
        if self.hard_weight > 0 and labels is None:
            raise ValueError("labels are required when hard_weight > 0 (or set hard_weight=0)")
        if indices is None and any(term.with_indices for term in self.terms):
            raise ValueError("indices are required: a term has with_indices=True (e.g. CRDLoss)")
        # Without terms (plain supervised training) no teacher is needed or run.
        teacher_values = self._teacher_values(inputs, kwargs, teacher_outputs) if self.terms else []
        capture = self._student_capture
        capture.values, capture.armed = {}, True
        try:
            output = self.student(*inputs, **kwargs)
        finally:
            capture.armed = False
        student_values = capture.values
        capture.values = {}
        if self.self_distillation:
            teacher_values = [{k: _detach(v) for k, v in student_values.items()}]

        total = None
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            value = term.weight * self._term_value(term, student_values, teacher_values, labels, indices)
            parts[term.name or term.default_name()] = value.detach()
            total = value if total is None else total + value
        if self.hard_weight > 0:
            hard = self.hard_weight * self.hard_loss(output, labels)
            parts["hard"] = hard.detach()
            total = hard if total is None else total + hard
        if total is None:
            raise ValueError("nothing to optimise: no terms and hard_weight == 0")
        return DistillerOutput(loss=total, parts=parts, output=output)

    def _teacher_values(self, inputs, kwargs, teacher_outputs) -> list[dict[str, Any]]:
        if teacher_outputs is not None:
            outs = [teacher_outputs] if isinstance(teacher_outputs, Mapping) else list(teacher_outputs)
            if len(outs) != self.num_teachers or not all(isinstance(o, Mapping) for o in outs):
                raise ValueError(
                    f"teacher_outputs must be a mapping (layer name → output) or {self.num_teachers} of them"
                )
            return [{k: _detach(v) for k, v in o.items()} for o in outs]
        if self.self_distillation:
            return []
        if not self._teachers:
            raise ValueError(
                "teacher_outputs are required when the Distiller has no teacher model (teacher=None)"
            )
        values = []
        with torch.no_grad():
            for teacher, capture in zip(self._teachers, self._teacher_captures, strict=True):
                if teacher.training:
                    teacher.eval()
                capture.values, capture.armed = {}, True
                try:
                    teacher(*inputs, **kwargs)
                finally:
                    capture.armed = False
                values.append(capture.values)
                capture.values = {}
        return values

    def _term_value(self, term: Term, student_values, teacher_values, labels, indices) -> torch.Tensor:
        name = term.name or term.default_name()
        s_names, t_names = _names(term.student_layer), _names(term.teacher_layers)
        s = [self._pick(student_values, n, "student", term) for n in s_names]
        which = range(self.num_teachers) if term.teacher is None else (term.teacher,)
        total = None
        for k in which:
            t = [self._pick(teacher_values[k], n, "teacher", term) for n in t_names]
            args = (s[0], t[0]) if isinstance(term.student_layer, str) else (s, t)
            if term.with_labels:
                args = (*args, labels)
            if term.with_indices:
                args = (*args, indices)
            try:
                value = term.loss(*args)
            except ValueError as exc:
                raise ValueError(
                    f"term {name!r} (student {_describe(s_names, s)}, teacher {_describe(t_names, t)}): {exc}"
                ) from exc
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"term {name!r}: the loss must return a () tensor, got {_shape_of(value)}")
            w = 1.0 if term.teacher is not None else self.teacher_weights[k]
            value = value * w if w != 1.0 else value
            total = value if total is None else total + value
        return total

    @staticmethod
    def _pick(values: Mapping[str, Any], name: str, side: str, term: Term):
        if name not in values:
            raise ValueError(
                f"term {term.name or term.default_name()!r}: no {side} output for layer {name!r}"
            )
        value = values[name]
        if term.select is not None:
            value = term.select(value)
        elif not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{side} layer {name!r} returned {type(value).__name__}, not a tensor; "
                "give the Term a select= that picks the tensor"
            )
        return value

    # ---- hooks ---------------------------------------------------------------

    def close(self) -> None:
        """Removes every forward hook this Distiller registered."""
        self._student_capture.remove()
        for capture in self._teacher_captures:
            capture.remove()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shape_of(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _describe(names, values) -> str:
    return ", ".join(f"{n or 'output'!r} {_shape_of(v)}" for n, v in zip(names, values, strict=True))


def _weight(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class EMATeacher(nn.Module):
    """An exponential moving average of a model, as a teacher (mean teacher, self-distillation).

    Holds a deep copy of ``model`` (``.module``), in eval mode, without
    gradients. After each optimiser step call ``update(model)``:

        ``θ_ema ← decay · θ_ema + (1 − decay) · θ``   for every parameter,
        ``b_ema ← b``                                  for every buffer (BatchNorm statistics),

    so the teacher is a smoothed student. Calling it runs the copy; a
    :class:`Distiller` looks up layer names in the copy (the student's names).

    Args:
        model: the student (its current weights are the starting point).
        decay: in ``[0, 1]``; 0.999 by default (0 copies the student).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (which must have the copied model's parameter names and shapes)."""
        own_params = dict(self.module.named_parameters())
        new_params = dict(model.named_parameters())
        own_buffers = dict(self.module.named_buffers())
        new_buffers = dict(model.named_buffers())
        if own_params.keys() != new_params.keys() or own_buffers.keys() != new_buffers.keys():
            raise ValueError("model does not have the EMA teacher's parameter / buffer names")
        for name, ema in own_params.items():
            new = new_params[name]
            if new.shape != ema.shape:
                raise ValueError(
                    f"model parameter {name!r} has shape {tuple(new.shape)}, expected {tuple(ema.shape)}"
                )
            ema.mul_(self.decay).add_(new.detach().to(ema.dtype), alpha=1.0 - self.decay)
        for name, ema in own_buffers.items():
            ema.copy_(new_buffers[name])
        self.num_updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"decay={self.decay}, num_updates={self.num_updates}"
