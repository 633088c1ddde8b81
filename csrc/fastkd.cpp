// The fastkd:: operator schemas, in one place, and the fastkd._C module.
// Importing fastkd._C registers the schemas and the CPU kernels (their
// TORCH_LIBRARY_IMPL blocks live in csrc/cpu/*.cpp, linked into this module).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/allocation.h"
#include "cpu/capability.h"

#ifndef FASTKD_BUILD_CXX_FLAGS
#define FASTKD_BUILD_CXX_FLAGS ""
#endif

TORCH_LIBRARY(fastkd, m) {
  // Softmax-divergence family (docs/spec.md §1), one fused row pass.
  //   student, teacher: [N, V] logits, unit stride along V, same dtype.
  //   row_mask: [N] bool (false → row excluded: loss 0, gradient 0).
  //   kind: fastkd::divergence::Kind; coef: β (JSD) or α (skew), interior.
  //   labels: [N] int64 or None: with labels, the hard-label cross-entropy at
  //   temperature 1 in the same pass, CE_i = lse(s_i) − s_{i, labels_i}
  //   (kept rows' labels must be in [0, V)).
  // Returns (row_loss [N] fp32 (fp64 for fp64 input),
  //          student_grad [N, V] or [0, 0], teacher_grad [N, V] or [0, 0],
  //          row_ce [N] (0 for excluded rows) or [0] without labels);
  // gradients are grad_scale · d(row loss)/d(logits), in the input dtype, the
  // student's plus hard_grad_scale · d(CE_i)/d(s) = (softmax(s_i) − onehot).
  m.def(
      "divergence_forward(Tensor student, Tensor teacher, Tensor? row_mask, int kind, "
      "float inv_temperature, float coef, float grad_scale, bool student_grad, "
      "bool teacher_grad, Tensor? labels=None, float hard_grad_scale=0.) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // InfoNCE (docs/spec.md §4), tiled over the rows of q (Inf-CL style): only a
  // tile_rows × M block of logits exists at a time, and O(N) state (the row
  // log-sum-exp) is kept between forward and backward.
  //   q: [N, D], k: [M, D], same floating dtype; labels: [N] int64 in [0, M)
  //   (arange(N) for diagonal positives); logits = q kᵀ · inv_temperature.
  // info_nce_forward returns (row_loss [N], row_lse [N]), fp32 (fp64 for fp64
  // input): row_loss_i = lse_j logits_ij − logits_{i, labels_i}.
  // info_nce_backward takes the upstream gradient of row_loss and row_lse and
  // returns (grad_q [N, D], grad_k [M, D]) in the input dtype (accumulated in
  // fp32 for bf16 / fp16).
  m.def(
      "info_nce_forward(Tensor q, Tensor k, Tensor labels, float inv_temperature, "
      "int tile_rows) -> (Tensor, Tensor)");
  m.def(
      "info_nce_backward(Tensor grad_row_loss, Tensor q, Tensor k, Tensor labels, "
      "Tensor row_lse, float inv_temperature, int tile_rows) -> (Tensor, Tensor)");
  // The same loss keeping the softmax instead of recomputing it (three GEMMs
  // instead of four, N × M memory between forward and backward):
  // info_nce_softmax_forward returns (row_loss [N], probabilities [N, M]),
  // both fp32 (fp64 for fp64 input), probabilities_ij = softmax_j(logits_i);
  // info_nce_softmax_backward takes the upstream gradient of row_loss and
  // those probabilities (read, not modified) and returns (grad_q, grad_k) as
  // info_nce_backward.
  m.def(
      "info_nce_softmax_forward(Tensor q, Tensor k, Tensor labels, float inv_temperature) "
      "-> (Tensor, Tensor)");
  m.def(
      "info_nce_softmax_backward(Tensor grad_row_loss, Tensor q, Tensor k, Tensor labels, "
      "Tensor probabilities, float inv_temperature) -> (Tensor, Tensor)");

  // Squared MMD (docs/spec.md §3), tiled over the rows of x and of y: only
  // tile_rows × max(N, M) blocks of the kernel matrices exist at a time, and
  // nothing is kept between forward and backward (the backward recomputes).
  //   x: [N, D], y: [M, D], same floating dtype.
  //   kernel: 0 gaussian Σ_σ exp(−‖a−b‖²/(2σ²)), 1 laplacian Σ_σ exp(−‖a−b‖/σ),
  //   2 polynomial (a·b/c + 1)^degree; unbiased: leave out the within-sample
  //   diagonals (then N, M >= 2).
  // mmd_forward returns the () loss, fp32 (fp64 for fp64 input).
  // mmd_backward takes the upstream gradient (one element) and returns
  // (grad_x [N, D], grad_y [M, D]) in the input dtype (accumulated in fp32
  // for bf16 / fp16).
  m.def(
      "mmd_forward(Tensor x, Tensor y, int kernel, float[] bandwidths, int degree, float c, "
      "bool unbiased, int tile_rows) -> Tensor");
  m.def(
      "mmd_backward(Tensor grad, Tensor x, Tensor y, int kernel, float[] bandwidths, "
      "int degree, float c, bool unbiased, int tile_rows) -> (Tensor, Tensor)");

  // Top-k (sparse) teacher divergence (docs/spec.md §1): the teacher is k (id, logit)
  // pairs per row, renormalised over its ids; the student's softmax is over
  // the full vocabulary. No [N, V] teacher tensor is built.
  //   student: [N, V] logits, unit stride along V.
  //   teacher_index: [N, k] int64, distinct ids in [0, V) per row.
  //   teacher_value: [N, k] teacher logits, float32 (float64 for float64 student).
  //   kind: as divergence_forward, except reverse KL (1), which is infinite
  //   off the teacher's ids.
  //   labels, hard_grad_scale: as divergence_forward (the CE of the student).
  // Returns (row_loss [N] fp32 (fp64 for fp64 input), student_grad [N, V] or
  // [0, 0] in the input dtype, = grad_scale · d(row loss)/d(logits) (+ the
  // CE's, as divergence_forward), row_ce [N] or [0] without labels).
  m.def(
      "topk_divergence_forward(Tensor student, Tensor teacher_index, Tensor teacher_value, "
      "Tensor? row_mask, int kind, float inv_temperature, float coef, float grad_scale, "
      "bool student_grad, Tensor? labels=None, float hard_grad_scale=0.) -> (Tensor, Tensor, Tensor)");

  // Multi-teacher divergence (docs/spec.md §1): the target is the mixture
  // p = Σ_k w_k softmax(t_k / T), accumulated in log space in one pass.
  //   student: [N, V]; teachers: [K, N, V], same dtype, unit stride along V.
  //   teacher_weights: [K] float64, >= 0, summing to 1 within 1e-6: on the
  //   CPU (checked there), or on the student's GPU (not read on the host:
  //   invalid weights make every row loss and the gradient NaN).
  //   kind, coef: as divergence_forward. Teachers get no gradient.
  //   labels, hard_grad_scale: as divergence_forward (the CE of the student).
  // Returns (row_loss [N] fp32 (fp64 for fp64 input), student_grad [N, V] or
  // [0, 0] in the input dtype, = grad_scale · d(row loss)/d(logits) (+ the
  // CE's, as divergence_forward), row_ce [N] or [0] without labels).
  m.def(
      "mixture_divergence_forward(Tensor student, Tensor teachers, Tensor teacher_weights, "
      "Tensor? row_mask, int kind, float inv_temperature, float coef, float grad_scale, "
      "bool student_grad, Tensor? labels=None, float hard_grad_scale=0.) -> (Tensor, Tensor, Tensor)");
  // Decoupled KD (docs/spec.md §1, mdistiller), one pass per row (csrc/cpu/dkd.cpp).
  //   student, teacher: [N, C] logits (C >= 2), same dtype; labels: [N] int64
  //   in [0, C). Returns (row_loss [N] = α·TCKD + β·NCKD (no T²), fp32 (fp64
  //   for fp64 input); student_grad [N, C] = grad_scale · d row_loss / d
  //   student in the input dtype, or [0, 0]). The teacher gets no gradient.
  m.def(
      "dkd_forward(Tensor student, Tensor teacher, Tensor labels, float alpha, float beta, "
      "float inv_temperature, float grad_scale, bool student_grad) -> (Tensor, Tensor)");
  // CRD (docs/spec.md §4, RepDistiller CRDLoss), one direction of the NCE loss over a
  // memory bank, fused: gather + dot + exp + NCE terms + gradient per sample,
  // without the (B, K+1, D) gather.
  //   v: [B, D] embeddings, bank: [n_data, D] memory (same dtype, float32 or
  //   float64, unit stride along D); contrast_idx: [B, K+1] int64 in
  //   [0, n_data), column 0 the positive; z: [] floating point on v's
  //   device, the normalisation constant Z, or <= 0 to set it from this
  //   batch (mean exp(s/T) · n_data); on a GPU the choice is made on the
  //   device, so Z is never read on the host.
  // Returns (row_loss [B] in v's dtype, grad [B, D] = d row_loss_b / d v_b
  // (or [0, 0] without student_grad), z_used [] in v's dtype). The bank gets
  // no gradient.
  m.def(
      "crd_nce_forward(Tensor v, Tensor bank, Tensor contrast_idx, Tensor z, "
      "float inv_temperature, bool student_grad) -> (Tensor, Tensor, Tensor)");
  // Attention transfer (docs/spec.md §5, RepDistiller `Attention`), one pass over C
  // per spatial position. student: [N, C_s, H, W], teacher: [N, C_t, H, W]
  // (same N, H, W and dtype; the caller pools the larger map), read as NCHW or
  // channels_last (other strides are copied). a = v / max(‖v‖, eps) with
  // v = mean_c f^p over each sample's HW positions; loss = mean((a_s − a_t)²)
  // over N·HW.
  // attention_transfer_forward returns (loss [], s_norm [N], t_norm [N]) —
  // ‖v‖ per sample, the only state the backward needs — fp32 (fp64 for fp64
  // input). attention_transfer_backward takes the upstream gradient (one
  // element) and returns (grad_student, grad_teacher) in the input dtype and
  // the layout read, or [0] tensors where not requested.
  m.def(
      "attention_transfer_forward(Tensor student, Tensor teacher, int p, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_transfer_backward(Tensor grad, Tensor student, Tensor teacher, Tensor s_norm, "
      "Tensor t_norm, int p, float eps, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");
  // RKD relational losses (docs/spec.md §2) from Gram matrices, O(N²) memory: the
  // distance term (O(N² D)) and the angle term (O(N³) arithmetic).
  //   student: [N, D_s], teacher: [N, D_t], same floating dtype (D may differ);
  //   the teacher is a constant (no gradient).
  // Each returns (loss () fp32 (fp64 for fp64 input), student_grad [N, D_s]
  // in the input dtype, or [0, 0] without student_grad): the gradient of the
  // loss itself (upstream gradient 1), computed in the same pass.
  m.def("rkd_distance_forward(Tensor student, Tensor teacher, bool student_grad) -> (Tensor, Tensor)");
  m.def("rkd_angle_forward(Tensor student, Tensor teacher, bool student_grad) -> (Tensor, Tensor)");
  // PKT, SP and CC (docs/spec.md §2): functions of the Gram matrices X Xᵀ (PKT: of
  // the normalised rows), O(N²) memory. Same arguments and outputs as the
  // RKD ops above, the loss's hyper-parameters last:
  //   pkt_forward: eps > 0 (added to the norms and inside the log ratio);
  //   cc_forward:  gamma > 0, Taylor order >= 1.
  m.def("pkt_forward(Tensor student, Tensor teacher, bool student_grad, float eps) -> (Tensor, Tensor)");
  m.def("sp_forward(Tensor student, Tensor teacher, bool student_grad) -> (Tensor, Tensor)");
  m.def(
      "cc_forward(Tensor student, Tensor teacher, bool student_grad, float gamma, int order) "
      "-> (Tensor, Tensor)");
  // Self-attention relations (docs/spec.md §5.3, MiniLM), flash-style.
  //   student [B, T, D_s], teacher [B, T, D_t], one floating dtype; heads
  //   divides D_s and D_t; mask [B, T] bool or None (false: excluded as row
  //   and key); causal: keys j <= i only; temperature > 0.
  // forward returns (rows [B, T]: the head-mean KL(teacher || student) of
  //   each row, 0 when excluded; lse_student, lse_teacher [B, A, T, 2]: each
  //   row's log-sum-exp split as (shift, log sum exp(z - shift)), shift the
  //   row max, so that log p = (z - shift) - log sum is formed without
  //   rounding at the scores' size; head_kl [B, A, T]), all in the
  //   accumulation dtype (fp32; fp64 for fp64 input).
  // backward takes row_grad [B, T] (the upstream gradient of `rows`) and the
  //   saved statistics; returns (grad_student, grad_teacher) in the input dtype,
  //   [0] where not requested.
  m.def(
      "attention_relation_forward(Tensor student, Tensor teacher, int heads, Tensor? mask, bool causal, "
      "float temperature) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_relation_backward(Tensor row_grad, Tensor student, Tensor teacher, int heads, Tensor? mask, "
      "bool causal, float temperature, Tensor lse_student, Tensor lse_teacher, Tensor head_kl, "
      "bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");
  // Universal Logit Distillation (docs/spec.md §1.14): aligned rows of two
  // vocabularies, per row Σ_k |sort↓(softmax(s/T_s))_k − sort↓(softmax(t/T_t))_k|
  // with the shorter sorted row zero-padded. Sort, L1 and gradient in one pass
  // per row; no sorted [N, V] tensor is written.
  //   student: [N, V_s], teacher: [N, V_t] logits, same dtype, unit stride along V.
  //   row_mask: [N] bool (false → row excluded: loss 0, gradient 0).
  //   student_is_logprob / teacher_is_logprob: that side holds log-probabilities
  //   used as given, p = exp(x) (no softmax, no normalisation; its inverse
  //   temperature must be 1), gradient p · g without the softmax centring.
  // Returns (row_loss [N] fp32 (fp64 for fp64 input), student_grad [N, V_s] or
  // [0, 0], teacher_grad [N, V_t] or [0, 0]); the gradients are grad_scale ·
  // d(row loss)/d(logits) in the input dtype (ties share the mean of their
  // ranks' signs, sign(0) = 0).
  m.def(
      "uld_forward(Tensor student, Tensor teacher, Tensor? row_mask, float inv_student_temperature, "
      "float inv_teacher_temperature, float grad_scale, bool student_grad, bool teacher_grad, "
      "bool student_is_logprob=False, bool teacher_is_logprob=False) -> (Tensor, Tensor, Tensor)");
  // Hidden-state distillation (docs/spec.md §5.4): TinyBERT's MSE (kind 0) and
  // DistilBERT's cosine loss (kind 1) per row, one pass over each row
  // (csrc/common/hidden_state_op.h has the formulas and the cosine guard).
  //   student, teacher: [N, D] (already projected) states, same dtype, unit
  //   stride along D, any row stride. row_mask: [N] bool (false → row
  //   excluded: loss 0, gradients 0).
  // Returns (row_loss [N] fp32 (fp64 for fp64 input), student_grad [N, D] or
  // [0, 0], teacher_grad [N, D] or [0, 0]); the gradients are grad_scale ·
  // d(row loss)/d(states), contiguous, in the input dtype.
  m.def(
      "hidden_state_forward(Tensor student, Tensor teacher, Tensor? row_mask, int kind, "
      "float grad_scale, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  // The matrix products of fused_linear_divergence on CPU tensors (CPU only):
  // out = beta · out + a @ b, beta 0 or 1 (0: out's contents are ignored),
  // out [M, N], a [M, K], b [K, N], one floating dtype; the result does not
  // depend on the thread count.
  m.def("fused_linear_addmm_(Tensor(a!) out, Tensor a, Tensor b, float beta) -> ()");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, module) {
  module.doc() = "fastkd CPU kernels (registers the fastkd:: operators on import)";
  module.def("build_info", [] {
    py::dict info;
    info["compiler"] = __VERSION__;
    info["cxx_flags"] = FASTKD_BUILD_CXX_FLAGS;
    info["simd_variants"] = py::make_tuple("default", "avx2", "avx512");
    return info;
  });
  module.def("cpu_capability", [] {
    return fastkd::cpu::capability_name(fastkd::cpu::active_capability());
  }, "SIMD variant the CPU kernels run (FASTKD_CPU_CAPABILITY may lower it).");
  module.def("empty_cache", &fastkd::cpu::release_cached_outputs,
             "Free the cached CPU output buffers; returns the bytes released.");
  module.def("cached_bytes", &fastkd::cpu::cached_output_bytes,
             "Bytes held in free cached CPU output buffers.");
  module.def("supported_cpu_capability", [] {
    return fastkd::cpu::capability_name(fastkd::cpu::supported_capability());
  }, "Best SIMD variant this CPU supports.");
}
