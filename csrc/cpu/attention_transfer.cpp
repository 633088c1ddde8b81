// CPU implementation of fastkd::attention_transfer_forward / _backward
// (docs/spec.md §5, RepDistiller `Attention`): for feature maps f of one sample,
//   v_k = (1/C) Σ_c f_ck^p            (attention map over the HW positions k)
//   a   = v / max(‖v‖₂, eps)          (F.normalize)
//   L   = 1/(N·HW) Σ_n Σ_k (a_s − a_t)²
// Student and teacher share N and HW (the caller pools the larger map); their
// channel counts may differ.
//
// One sample at a time (parallel over N): one pass over C per spatial
// position builds v for student and teacher in a per-thread scratch row of
// HW accumulators; the norms, the normalisation and the squared difference
// then run over that row. Nothing but the two per-sample norms is kept for
// the backward, which rebuilds v with the same pass and writes
//   dL/df_ck = g_k · (p/C) · f_ck^(p−1),
//   g = (ga − a (a·ga)) / ‖v‖ (‖v‖ >= eps), ga / eps otherwise,
//   ga = ±2 (a_s − a_t) · upstream / (N·HW)
// in a second pass over C.
//
// Layouts: NCHW-contiguous maps are read channel by channel (each channel a
// contiguous HW row, so the accumulation into v vectorises); channels_last
// maps position by position (each position a contiguous C run). Any other
// strides are copied to NCHW first. Gradients come back in the layout the
// kernel read (channels_last for channels_last input).
//
// bfloat16 / float16 inputs accumulate in float32; float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/attention_transfer_op.h"

namespace fastkd {
namespace cpu {
namespace {

template <typename acc_t>
inline acc_t pow_int(acc_t x, int64_t p) {
  if (p == 2) return x * x;
  if (p == 1) return x;
  acc_t r = 1;
  acc_t base = x;
  for (int64_t e = p; e > 0; e >>= 1) {  // square-and-multiply
    if (e & 1) r *= base;
    base *= base;
  }
  return r;
}

// f^p and d(f^p)/df / p. kP = 2 is compiled as its own case (the common one:
// a plain multiply the compiler vectorises); kP = 0 takes p at run time.
template <int kP, typename acc_t>
inline acc_t power(acc_t x, int64_t p) {
  if constexpr (kP == 2) {
    return x * x;
  } else {
    return pow_int<acc_t>(x, p);
  }
}

template <int kP, typename acc_t>
inline acc_t power_derivative_over_p(acc_t x, int64_t p) {
  if constexpr (kP == 2) {
    return x;
  } else {
    return p == 1 ? acc_t(1) : pow_int<acc_t>(x, p - 1);
  }
}

// Calls f(std::integral_constant<int, kP>) with kP = 2 for p == 2, else 0.
template <typename F>
void with_power(int64_t p, F&& f) {
  if (p == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

// One sample's maps: C × HW values, either NCHW (channel rows of HW) or
// channels_last (position runs of C).
template <typename scalar_t>
struct SampleMaps {
  const scalar_t* data;
  int64_t channels;
  int64_t positions;
  bool channels_last;

  scalar_t at(int64_t c, int64_t k) const {
    return channels_last ? data[k * channels + c] : data[c * positions + k];
  }
};

// v_k = (1/C) Σ_c f_ck^p into v[0, HW); returns ‖v‖₂.
template <int kP, typename scalar_t, typename acc_t>
acc_t attention_map(const SampleMaps<scalar_t>& f, int64_t p, acc_t* v) {
  const int64_t hw = f.positions, c_count = f.channels;
  if (f.channels_last) {
    for (int64_t k = 0; k < hw; ++k) {
      const scalar_t* run = f.data + k * c_count;
      // Eight independent partial sums: a reduction the compiler can vectorise
      // without reassociating (no -ffast-math).
      acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= c_count; c += 8) {
        for (int j = 0; j < 8; ++j) part[j] += power<kP>(static_cast<acc_t>(run[c + j]), p);
      }
      acc_t sum = 0;
      for (; c < c_count; ++c) sum += power<kP>(static_cast<acc_t>(run[c]), p);
      for (int j = 0; j < 8; ++j) sum += part[j];
      v[k] = sum;
    }
  } else {
    for (int64_t k = 0; k < hw; ++k) v[k] = 0;
    for (int64_t c = 0; c < c_count; ++c) {
      const scalar_t* row = f.data + c * hw;
      for (int64_t k = 0; k < hw; ++k) v[k] += power<kP>(static_cast<acc_t>(row[k]), p);
    }
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(c_count);
  acc_t sq = 0;
  for (int64_t k = 0; k < hw; ++k) {
    v[k] *= inv_c;
    sq += v[k] * v[k];
  }
  return std::sqrt(sq);
}

// F.normalize's denominator: max(‖v‖, eps), NaN kept.
template <typename acc_t>
inline acc_t clamp_norm(acc_t norm, double eps) {
  return norm < static_cast<acc_t>(eps) ? static_cast<acc_t>(eps) : norm;
}

// dL/df for one sample's maps, given g_k = dL/dv_k (already divided by the
// normalisation), into `out` (same layout as f).
template <int kP, typename scalar_t, typename acc_t>
void map_grad(const SampleMaps<scalar_t>& f, int64_t p, const acc_t* g, scalar_t* out) {
  const int64_t hw = f.positions, c_count = f.channels;
  const acc_t scale = static_cast<acc_t>(p) / static_cast<acc_t>(c_count);
  if (f.channels_last) {
    for (int64_t k = 0; k < hw; ++k) {
      const scalar_t* run = f.data + k * c_count;
      scalar_t* dst = out + k * c_count;
      const acc_t gk = g[k] * scale;
      for (int64_t c = 0; c < c_count; ++c) {
        dst[c] = static_cast<scalar_t>(gk * power_derivative_over_p<kP>(static_cast<acc_t>(run[c]), p));
      }
    }
  } else {
    for (int64_t c = 0; c < c_count; ++c) {
      const scalar_t* row = f.data + c * hw;
      scalar_t* dst = out + c * hw;
      for (int64_t k = 0; k < hw; ++k) {
        const acc_t x = static_cast<acc_t>(row[k]);
        dst[k] = static_cast<scalar_t>(g[k] * scale * power_derivative_over_p<kP>(x, p));
      }
    }
  }
}

template <typename scalar_t>
SampleMaps<scalar_t> sample(const at::Tensor& x, int64_t n, bool channels_last) {
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  return {x.const_data_ptr<scalar_t>() + n * c * hw, c, hw, channels_last};
}

// Forward over every sample (parallel over N): ‖v_s‖, ‖v_t‖ and Σ_k (a_s − a_t)².
template <int kP, typename scalar_t>
void forward_samples(const at::Tensor& student, const at::Tensor& teacher, bool s_last, bool t_last,
                     int64_t p, double eps, at::Tensor& s_norm, at::Tensor& t_norm, at::Tensor& row_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = student.size(0), hw = student.size(2) * student.size(3);
  acc_t* s_norm_p = s_norm.mutable_data_ptr<acc_t>();
  acc_t* t_norm_p = t_norm.mutable_data_ptr<acc_t>();
  acc_t* loss_p = row_loss.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> vs(hw), vt(hw);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t ns = attention_map<kP, scalar_t, acc_t>(sample<scalar_t>(student, i, s_last), p, vs.data());
      const acc_t nt = attention_map<kP, scalar_t, acc_t>(sample<scalar_t>(teacher, i, t_last), p, vt.data());
      const acc_t inv_s = acc_t(1) / clamp_norm(ns, eps), inv_t = acc_t(1) / clamp_norm(nt, eps);
      acc_t sum = 0;
      for (int64_t k = 0; k < hw; ++k) {
        const acc_t d = vs[k] * inv_s - vt[k] * inv_t;
        sum += d * d;
      }
      s_norm_p[i] = ns;
      t_norm_p[i] = nt;
      loss_p[i] = sum;
    }
  });
}

// Backward over every sample (parallel over N); `factor` = upstream · 2 / (N·HW).
// grad_s / grad_t are written where defined with their full shape.
template <int kP, typename scalar_t>
void backward_samples(const at::Tensor& student, const at::Tensor& teacher, bool s_last, bool t_last,
                      const at::Tensor& s_norm, const at::Tensor& t_norm, int64_t p, double eps,
                      double factor, at::Tensor& grad_s, at::Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = student.size(0), hw = student.size(2) * student.size(3);
  const bool student_grad = grad_s.numel() > 0, teacher_grad = grad_t.numel() > 0;
  const acc_t* s_norm_p = s_norm.const_data_ptr<acc_t>();
  const acc_t* t_norm_p = t_norm.const_data_ptr<acc_t>();
  const acc_t f = static_cast<acc_t>(factor);
  const acc_t eps_acc = static_cast<acc_t>(eps);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> vs(hw), vt(hw), ga(hw);
    for (int64_t i = begin; i < end; ++i) {
      const SampleMaps<scalar_t> fs = sample<scalar_t>(student, i, s_last);
      const SampleMaps<scalar_t> ft = sample<scalar_t>(teacher, i, t_last);
      attention_map<kP, scalar_t, acc_t>(fs, p, vs.data());
      attention_map<kP, scalar_t, acc_t>(ft, p, vt.data());
      const acc_t ns = s_norm_p[i], nt = t_norm_p[i];
      const acc_t den_s = clamp_norm(ns, eps), den_t = clamp_norm(nt, eps);
      // vs, vt become a_s, a_t; ga = dL/da_s = −dL/da_t.
      acc_t dot_s = 0, dot_t = 0;
      for (int64_t k = 0; k < hw; ++k) {
        vs[k] /= den_s;
        vt[k] /= den_t;
        ga[k] = f * (vs[k] - vt[k]);
        dot_s += vs[k] * ga[k];
        dot_t += vt[k] * ga[k];
      }
      // Through a = v / max(‖v‖, eps): the norm only moves a when ‖v‖ >= eps
      // (clamp_min passes the gradient at equality, as torch does).
      if (student_grad) {
        const acc_t along = ns >= eps_acc ? dot_s : acc_t(0);
        for (int64_t k = 0; k < hw; ++k) vs[k] = (ga[k] - vs[k] * along) / den_s;
        scalar_t* out = grad_s.mutable_data_ptr<scalar_t>() + i * fs.channels * hw;
        map_grad<kP, scalar_t, acc_t>(fs, p, vs.data(), out);
      }
      if (teacher_grad) {
        const acc_t along = nt >= eps_acc ? dot_t : acc_t(0);
        for (int64_t k = 0; k < hw; ++k) vt[k] = (vt[k] * along - ga[k]) / den_t;
        scalar_t* out = grad_t.mutable_data_ptr<scalar_t>() + i * ft.channels * hw;
        map_grad<kP, scalar_t, acc_t>(ft, p, vt.data(), out);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_transfer_forward_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, int64_t p, double eps) {
  attention::check_args(student_in, teacher_in, p, eps, at::kCPU);
  const at::Tensor student = attention::readable(student_in), teacher = attention::readable(teacher_in);
  const bool s_last = attention::reads_channels_last(student), t_last = attention::reads_channels_last(teacher);
  const int64_t n = student.size(0), hw = student.size(2) * student.size(3);
  const auto acc = accumulation_type(student);
  const auto acc_options = student.options().dtype(acc);
  at::Tensor s_norm = at::empty({n}, acc_options);
  at::Tensor t_norm = at::empty({n}, acc_options);
  at::Tensor row_loss = at::empty({n}, acc_options);
  const auto dtype = student.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "attention_transfer_forward", [&] {
    with_power(p, [&](auto power_tag) {
      forward_samples<decltype(power_tag)::value, scalar_t>(student, teacher, s_last, t_last, p, eps, s_norm,
                                                            t_norm, row_loss);
    });
  });
  // Each sample's sum comes from one thread: the loss does not depend on how
  // the samples were split between threads.
  at::Tensor loss = row_loss.sum().div_(static_cast<double>(n) * static_cast<double>(hw));
  return {loss, s_norm, t_norm};
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& s_norm, const at::Tensor& t_norm, int64_t p, double eps, bool student_grad,
    bool teacher_grad) {
  attention::check_args(student_in, teacher_in, p, eps, at::kCPU);
  const int64_t n = student_in.size(0), hw = student_in.size(2) * student_in.size(3);
  const auto acc = accumulation_type(student_in);
  attention::check_backward_args(grad, student_in, s_norm, t_norm, acc, at::kCPU);
  const at::Tensor student = attention::readable(student_in), teacher = attention::readable(teacher_in);
  const bool s_last = attention::reads_channels_last(student), t_last = attention::reads_channels_last(teacher);
  at::Tensor grad_s = attention::grad_buffer(student, student_grad);
  at::Tensor grad_t = attention::grad_buffer(teacher, teacher_grad);
  if (!student_grad && !teacher_grad) return {grad_s, grad_t};
  const at::Tensor s_norm_c = s_norm.contiguous(), t_norm_c = t_norm.contiguous();
  const double factor =
      grad.to(at::kDouble).item<double>() * 2.0 / (static_cast<double>(n) * static_cast<double>(hw));
  const auto dtype = student.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "attention_transfer_backward", [&] {
    with_power(p, [&](auto power_tag) {
      backward_samples<decltype(power_tag)::value, scalar_t>(student, teacher, s_last, t_last, s_norm_c,
                                                             t_norm_c, p, eps, factor, grad_s, grad_t);
    });
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("attention_transfer_forward", &fastkd::cpu::attention_transfer_forward_cpu);
  m.impl("attention_transfer_backward", &fastkd::cpu::attention_transfer_backward_cpu);
}
