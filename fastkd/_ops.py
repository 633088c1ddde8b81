"""Loads the compiled extensions and gives their ops what torch.library needs.

Importing this module never fails: a missing extension is logged and reported
by :func:`fastkd.backends`. For each ``fastkd::`` op it registers a fake
(meta) kernel, so the ops trace under ``torch.compile`` and pass
``torch.library.opcheck``. The ops are not differentiable themselves: they
return the gradients, which the autograd Functions of the family modules scale.
"""

from __future__ import annotations

import importlib
import logging

import torch

_log = logging.getLogger("fastkd")



def _load(name: str):
    """(module, None) or (None, why it could not be imported)."""
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"{name} not importable ({exc})"


# _C registers the schemas and the CPU kernels; _C_cuda (loaded second: it
# needs the schemas) registers the CUDA kernels.
_C, CPU_EXTENSION_ERROR = _load("fastkd._C")
if CPU_EXTENSION_ERROR:  # pragma: no cover - depends on the build
    CPU_EXTENSION_ERROR += "; build it with `pip install -e . --no-build-isolation`"
    _log.warning(CPU_EXTENSION_ERROR)
_C_cuda, CUDA_EXTENSION_ERROR = _load("fastkd._C_cuda") if _C is not None else (None, "fastkd._C missing")


def empty_cache() -> int:
    """Free the buffers fastkd's CPU kernels keep for reuse; returns the bytes freed.

    Large CPU outputs (gradients) of the fused kernels, and the large scratch
    matrices of the pairwise losses (the ``N × N`` Gram and distance matrices
    of SP, CC, PKT and RKD's distance, InfoNCE's logits and kept softmax),
    come from a small cache of freed buffers of the same size, so that a
    training loop does not pay page faults for fresh ones every step (at most
    ``FASTKD_CPU_CACHE_MB`` MiB, default 2048, are held; 0 disables it). Like
    ``torch.cuda.empty_cache``, this returns them to the operating system.
    """
    return _C.empty_cache() if _C is not None else 0


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastkd::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if _C is None:
        return False
    try:
        dump = torch._C._dispatch_dump(f"fastkd::{op}")
    except RuntimeError:
        return False
    return f"{dispatch_key}:" in dump


if _C is not None:

    @torch.library.register_fake("fastkd::divergence_forward")
    def _divergence_forward_fake(
        student, teacher, row_mask, kind, inv_temperature, coef, grad_scale, student_grad, teacher_grad,
        labels=None, hard_grad_scale=0.0,
    ):
        rows, vocab = student.shape
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        row_loss = student.new_empty((rows,), dtype=loss_dtype)
        grad_s = student.new_empty((rows, vocab) if student_grad else (0, 0))
        grad_t = teacher.new_empty((rows, vocab) if teacher_grad else (0, 0))
        row_ce = student.new_empty((rows if labels is not None else 0,), dtype=loss_dtype)
        return row_loss, grad_s, grad_t, row_ce

    @torch.library.register_fake("fastkd::info_nce_forward")
    def _info_nce_forward_fake(q, k, labels, inv_temperature, tile_rows):
        loss_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        rows = q.shape[0]
        return q.new_empty((rows,), dtype=loss_dtype), q.new_empty((rows,), dtype=loss_dtype)

    @torch.library.register_fake("fastkd::info_nce_backward")
    def _info_nce_backward_fake(grad_row_loss, q, k, labels, row_lse, inv_temperature, tile_rows):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake("fastkd::info_nce_softmax_forward")
    def _info_nce_softmax_forward_fake(q, k, labels, inv_temperature):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty((q.shape[0],), dtype=acc), q.new_empty((q.shape[0], k.shape[0]), dtype=acc)

    @torch.library.register_fake("fastkd::info_nce_softmax_backward")
    def _info_nce_softmax_backward_fake(grad_row_loss, q, k, labels, probabilities, inv_temperature):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake("fastkd::mmd_forward")
    def _mmd_forward_fake(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows):
        loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((), dtype=loss_dtype)

    @torch.library.register_fake("fastkd::mmd_backward")
    def _mmd_backward_fake(grad, x, y, kernel, bandwidths, degree, c, unbiased, tile_rows):
        return x.new_empty(x.shape), y.new_empty(y.shape)

    def _student_only_divergence_fake(student, student_grad, labels):
        # (row_loss, student_grad, row_ce) of the top-k and mixture ops
        rows, vocab = student.shape
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        row_loss = student.new_empty((rows,), dtype=loss_dtype)
        grad = student.new_empty((rows, vocab) if student_grad else (0, 0))
        row_ce = student.new_empty((rows if labels is not None else 0,), dtype=loss_dtype)
        return row_loss, grad, row_ce

    @torch.library.register_fake("fastkd::topk_divergence_forward")
    def _topk_divergence_forward_fake(
        student, teacher_index, teacher_value, row_mask, kind, inv_temperature, coef, grad_scale,
        student_grad, labels=None, hard_grad_scale=0.0,
    ):
        return _student_only_divergence_fake(student, student_grad, labels)

    @torch.library.register_fake("fastkd::mixture_divergence_forward")
    def _mixture_divergence_forward_fake(
        student, teachers, teacher_weights, row_mask, kind, inv_temperature, coef, grad_scale, student_grad,
        labels=None, hard_grad_scale=0.0,
    ):
        return _student_only_divergence_fake(student, student_grad, labels)

# An extension built before fastkd::dkd_forward existed lacks it; DKD's cpu
# backend then fails at call time instead of breaking the import.
if _C is not None and has_kernel("dkd_forward", "CPU"):

    @torch.library.register_fake("fastkd::dkd_forward")
    def _dkd_forward_fake(student, teacher, labels, alpha, beta, inv_temperature, grad_scale, student_grad):
        rows, classes = student.shape
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        grad = student.new_empty((rows, classes) if student_grad else (0, 0))
        return student.new_empty((rows,), dtype=loss_dtype), grad
    @torch.library.register_fake("fastkd::crd_nce_forward")
    def _crd_nce_forward_fake(v, bank, contrast_idx, z, inv_temperature, student_grad):
        rows, dim = v.shape
        return v.new_empty((rows,)), v.new_empty((rows, dim) if student_grad else (0, 0)), v.new_empty(())
    def _at_reads_channels_last(x):
        # csrc/cpu/attention_transfer.cpp: channels_last only when not also NCHW-contiguous
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fastkd::attention_transfer_forward")
    def _attention_transfer_forward_fake(student, teacher, p, eps):
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        rows = student.shape[0]
        return (
            student.new_empty((), dtype=loss_dtype),
            student.new_empty((rows,), dtype=loss_dtype),
            student.new_empty((rows,), dtype=loss_dtype),
        )

    @torch.library.register_fake("fastkd::attention_transfer_backward")
    def _attention_transfer_backward_fake(
        grad, student, teacher, s_norm, t_norm, p, eps, student_grad, teacher_grad
    ):
        def grad_like(x, wanted):
            if not wanted:
                return x.new_empty((0,))
            layout = torch.channels_last if _at_reads_channels_last(x) else torch.contiguous_format
            return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)

        return grad_like(student, student_grad), grad_like(teacher, teacher_grad)
    def _rkd_forward_fake(student, teacher, student_grad):
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        grad = student.new_empty(student.shape if student_grad else (0, 0))
        return student.new_empty((), dtype=loss_dtype), grad

    torch.library.register_fake("fastkd::rkd_distance_forward")(_rkd_forward_fake)
    torch.library.register_fake("fastkd::rkd_angle_forward")(_rkd_forward_fake)

    @torch.library.register_fake("fastkd::pkt_forward")
    def _pkt_forward_fake(student, teacher, student_grad, eps):
        return _rkd_forward_fake(student, teacher, student_grad)

    torch.library.register_fake("fastkd::sp_forward")(_rkd_forward_fake)

    @torch.library.register_fake("fastkd::cc_forward")
    def _cc_forward_fake(student, teacher, student_grad, gamma, order):
        return _rkd_forward_fake(student, teacher, student_grad)
