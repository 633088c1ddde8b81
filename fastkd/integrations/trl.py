"""TRL's distillation losses on fastkd's fused kernels, with TRL's signatures and conventions.

Two drop-ins, each replacing one method of a TRL trainer (README, "LLM distillation"):

- :func:`generalized_jsd_loss`: ``GKDTrainer.generalized_jsd_loss`` (full
  ``(B, T, V)`` logits) on :func:`fastkd.divergence`::

      class FastGKDTrainer(GKDTrainer):
          generalized_jsd_loss = staticmethod(fastkd.integrations.trl.generalized_jsd_loss)

- :func:`distillation_compute_loss`: ``DistillationTrainer._compute_loss``
  (hidden states and the two ``lm_head`` s, the ``(N, V)`` logits never
  materialised) on :func:`fastkd.fused_linear_divergence`; it returns what
  the trainer logs (the student's entropy sum and the valid-token count)::

      class FastDistillationTrainer(DistillationTrainer):
          _compute_loss = fastkd.integrations.trl.distillation_compute_loss

  Its loss alone, with the arguments of TRL's chunked loss, is
  :func:`chunked_divergence_loss`.

The argument mapping (TRL's generalized JSD ``β·KL(p_t‖m) + (1−β)·KL(p_s‖m)``,
``m = β·p_t + (1−β)·p_s``, is fastkd's ``divergence="jsd"`` with the same β;
β = 0 is KL(teacher‖student), fastkd's ``"kl"``, and β = 1 KL(student‖teacher),
``"reverse_kl"``): ``scale=1.0`` (TRL does not multiply by T²), labels with
``ignore_index=-100``, ``reduction="batchmean"`` divides by the kept tokens,
and ``num_items_in_batch`` replaces that count as TRL's does.

Neither TRL nor transformers is imported here: the functions read the trainer
object they are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd

__all__ = ["chunked_divergence_loss", "distillation_compute_loss", "generalized_jsd_loss"]

# TRL's label convention: positions whose label is this are not trained on.
IGNORE_INDEX = -100
# Rows of logits per chunk of the logged entropy: 2**22 logits, 16 MiB of float32.
ENTROPY_CHUNK_ELEMENTS = 2**22


def _jsd_arguments(beta) -> dict:
    """fastkd's divergence for TRL's β (only the coefficient the divergence reads)."""
    beta = float(beta)
    if beta == 0.0:
        return {"divergence": "kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": beta}


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` on :func:`fastkd.divergence` (one fused kernel).

    Args:
        student_logits: ``(B, T, V)`` (or ``(N, V)``).
        teacher_logits: same shape, dtype and device.
        labels: ``(B, T)`` (the logits' leading shape); positions with ``-100``
            are excluded.
        beta: the generalized JSD's weight, in [0, 1] (0: KL(teacher‖student),
            1: KL(student‖teacher)).
        temperature: both distributions are ``softmax(logits / temperature)``;
            no ``T²`` factor.
        reduction: as TRL: ``"batchmean"`` divides the sum by the kept tokens
            (at least 1) with ``labels``, and by ``student_logits.shape[0]``
            (the batch size for ``(B, T, V)``) without; ``"sum"``; ``"mean"``
            divides by the kept tokens · V. TRL's ``"none"`` returns the
            per-element terms, which the fused kernel never forms:
            ``ValueError`` (``fastkd.divergence(reduction="none")`` gives the
            per-token losses).
        num_items_in_batch: as TRL: when given, the loss is the kept-token sum
            over it, whatever ``reduction`` says (a number or a 0-d tensor).

    Returns:
        A scalar: float32 (float64 for float64 logits; TRL's is in the logits'
        dtype, so bfloat16 for bfloat16 logits). With ``labels`` and no kept
        token ``"mean"`` gives 0 where TRL's gives NaN.
    """
    options = dict(_jsd_arguments(beta), temperature=temperature, scale=1.0, labels=labels,
                   ignore_index=IGNORE_INDEX)
    if num_items_in_batch is not None:
        return fastkd.divergence(
            student_logits, teacher_logits, num_items_in_batch=num_items_in_batch, **options
        )
    if reduction == "batchmean" and labels is None:
        # TRL divides the unmasked sum by the first dimension, the batch size for (B, T, V)
        options["scale"] = 1.0 / max(student_logits.shape[0], 1)
        return fastkd.divergence(student_logits, teacher_logits, reduction="sum", **options)
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(
            f"reduction={reduction!r}: TRL returns the per-element terms there, which the fused kernel never "
            "forms; use 'batchmean', 'sum' or 'mean' (or fastkd.divergence(reduction='none') per token)"
        )
    return fastkd.divergence(student_logits, teacher_logits, reduction=reduction, **options)


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: float | torch.Tensor | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``DistillationTrainer`` loss (its ``_chunked_divergence_loss``) on
    :func:`fastkd.fused_linear_divergence`: the ``(N, V)`` logits are never materialised.

    Args:
        student_hidden_states: ``(B, K, H_s)``, the student backbone's output at the completion tokens.
        teacher_hidden_states: ``(B, K, H_t)``, the teacher's, same dtype.
        student_lm_head_weight, teacher_lm_head_weight: ``(V, H_s)``, ``(V, H_t)``.
        completion_mask: ``(B, K)``; nonzero marks the tokens in the loss.
        beta: the generalized JSD's weight (0: KL(teacher‖student), 1: KL(student‖teacher)).
        num_items_in_batch: ``None`` (divide by the valid tokens, at least 1),
            or the count to divide the sum by (number or 0-d tensor).
        student_lm_head_bias, teacher_lm_head_bias: optional ``(V,)``.
        student_logit_scale, teacher_logit_scale: multiply each model's logits.
        student_final_logit_softcapping, teacher_final_logit_softcapping: the
            cap ``c`` of ``c · tanh(z / c)`` applied after the scale (Gemma's
            ``final_logit_softcapping``), or ``None``.
        temperature: both distributions are ``softmax(logits / temperature)``; no ``T²``.

    Returns:
        ``(loss, entropy_sum, n_valid)``: the scalar loss (with a gradient to
        the student's hidden states, weight and bias), the sum over the valid
        tokens of the student's entropy at ``temperature`` (nats, no
        gradient; one extra chunked projection of the student's valid rows
        under ``no_grad``) and the number of valid tokens (a 0-d int64 tensor).
    """
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    # only the tokens in the loss are projected (one host synchronisation, for their count)
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    loss = fastkd.fused_linear_divergence(
        h_s, student_lm_head_weight, h_t, teacher_lm_head_weight, student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias, temperature=temperature, scale=1.0,
        num_items_in_batch=num_items_in_batch, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, student_logit_softcapping=student_final_logit_softcapping,
        teacher_logit_softcapping=teacher_final_logit_softcapping, **_jsd_arguments(beta),
    )
    entropy_sum = _entropy_sum(
        h_s.detach(), student_lm_head_weight.detach(),
        None if student_lm_head_bias is None else student_lm_head_bias.detach(), temperature,
        student_logit_scale, student_final_logit_softcapping,
    )
    return loss, entropy_sum, n_valid


@torch.no_grad()
def _entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                 logit_scale: float, softcapping: float | None) -> torch.Tensor:
    """``Σ_rows H(softmax(z / temperature))`` of the post-processed logits ``z`` (``hidden @ weightᵀ +
    bias``, times ``logit_scale``, then ``c · tanh(z / c)`` with ``c = softcapping`` when given), chunk
    by chunk of rows; float32 (float64 for float64 inputs) from the logits in the heads' dtype."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=hidden.device)
    rows = max(1, ENTROPY_CHUNK_ELEMENTS // max(weight.shape[0], 1))
    for chunk in hidden.split(rows):
        logits = F.linear(chunk, weight, bias).to(acc) * logit_scale
        if softcapping is not None:
            logits = softcapping * torch.tanh(logits / softcapping)
        logits = logits / temperature
        log_p = torch.log_softmax(logits, dim=-1)
        total -= (log_p.exp() * log_p).sum()
    return total


def _logit_scale(config) -> float:
    """The multiplier a causal-LM config applies to its logits (1.0 when none): ``logit_scale``
    (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), or ``logits_scaling``,
    which Granite / MiniCPM3 divide by and HyperCLOVA X multiplies by."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return value
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling


def distillation_compute_loss(trainer, unwrapped_student, inputs: dict, num_items_in_batch):
    """``DistillationTrainer._compute_loss`` on :func:`chunked_divergence_loss`: assign it to
    ``_compute_loss`` in a subclass of TRL's ``DistillationTrainer`` (text models).

    Runs both backbones on the prompt + completion (the teacher without
    gradient, through the trainer's forward redirection, as TRL does),
    projects the completion tokens' hidden states through each model's
    ``lm_head`` inside the fused loss, with the trainer's ``beta`` and
    ``temperature`` and each config's logit scale.

    Returns:
        ``(loss, entropy_sum, n_valid)``, what TRL's ``compute_loss`` reduces and logs.
    """
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    loss_mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        loss_mask = loss_mask * inputs["tool_mask"]
    if "pixel_values" in inputs:
        raise ValueError("fastkd.integrations.trl.distillation_compute_loss takes text models only")
    logits_to_keep = completion_ids.shape[1]

    student_hidden = trainer._get_last_hidden_state(
        unwrapped_student, input_ids, attention_mask, logits_to_keep
    )
    trainer.teacher_model.eval()
    unwrapped_teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    with torch.no_grad():
        teacher_hidden = trainer._forward_redirection(
            trainer.teacher_model, unwrapped_teacher, trainer._get_last_hidden_state, unwrapped_teacher,
            input_ids, attention_mask, logits_to_keep,
        )
    student_head = unwrapped_student.get_output_embeddings()
    teacher_head = unwrapped_teacher.get_output_embeddings()
    device = student_head.weight.device
    student_config = unwrapped_student.config.get_text_config()
    teacher_config = unwrapped_teacher.config.get_text_config()
    loss, entropy_sum, n_valid = chunked_divergence_loss(
        student_hidden.to(device),
        teacher_hidden.to(teacher_head.weight.device),
        student_head.weight,
        teacher_head.weight,
        loss_mask.to(device),
        trainer.beta,
        num_items_in_batch=num_items_in_batch,
        student_lm_head_bias=student_head.bias,
        teacher_lm_head_bias=teacher_head.bias,
        student_logit_scale=_logit_scale(student_config),
        teacher_logit_scale=_logit_scale(teacher_config),
        student_final_logit_softcapping=getattr(student_config, "final_logit_softcapping", None),
        teacher_final_logit_softcapping=getattr(teacher_config, "final_logit_softcapping", None),
        temperature=trainer.temperature,
    )
    return loss, entropy_sum, n_valid
