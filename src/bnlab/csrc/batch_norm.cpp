// bnlab's batch norm as one C++ kernel per direction (the opt-in impl="cpp").
//
// Why: on small activations (the chapter's FC layers, (128, 120)) the plain-tensor-op
// fast path is bound by per-op dispatch and Python, not by memory; one loop per direction
// with the autograd node in C++ removes both. The math is the same as bnlab._fused:
//
//   forward   y = (x - mean) * invstd * gamma + beta,  invstd = 1 / sqrt(var + eps)
//   backward  dbeta = sum(dy),  dgamma = sum(dy * x_hat),
//             dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
//
// Statistics take one pass over memory: each chunk (a row of `inner` values, or a block
// of rows) gets its mean and squared deviations from two passes while it is in cache, in
// the input's precision, and the chunks are merged in double (Chan et al.), so a large
// mean costs no precision (no E[x^2] - E[x]^2). Running stats follow
// new = (1 - momentum) * old + momentum * batch, the variance stored unbiased (m / (m - 1)).
//
// Layouts: the input is seen as (outer, C, inner) with channel c of sample n at
// x[(n * C + c) * inner + l]; a contiguous (N, C, *) input has inner = prod(spatial),
// a channels_last one has outer = N * prod(spatial) and inner = 1. CPU, float32/float64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

namespace bnlab {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

struct Layout {
  int64_t outer, channels, inner;
};

Layout layout_of(const Tensor& x) {
  const int64_t channels = x.size(1);
  const int64_t per_sample = x.numel() / std::max<int64_t>(x.size(0), 1);
  if (x.is_contiguous()) return {x.size(0), channels, per_sample / std::max<int64_t>(channels, 1)};
  return {x.numel() / std::max<int64_t>(channels, 1), channels, 1};  // channels_last
}

// Whether the kernel takes this call: a CPU float32/float64 input, contiguous or
// channels_last, with contiguous per-channel vectors of the same dtype.
bool supported(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var) {
  if (!x.device().is_cpu()) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  for (const auto* v : {&weight, &bias, &running_mean, &running_var}) {
    if (v->has_value() && v->value().defined()) {
      const Tensor& t = v->value();
      if (t.scalar_type() != x.scalar_type() || !t.device().is_cpu() || !t.is_contiguous()) return false;
    }
  }
  if (x.is_contiguous()) return true;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

constexpr int64_t kRowBlock = 64;   // rows of C channels per chunk (channels_last, 2D)
constexpr int64_t kGrain = 32768;   // elements below which a loop runs on one thread

// Backward's two sums per channel c, over every n and l: sum_dy[c] = sum dy and
// dot[c] = sum dy * (x - center[c]). Partial sums run in scalar_t over one contiguous
// stretch (which vectorizes) and are added up in double across stretches.
template <typename scalar_t>
void channel_dy_sums(const Layout& s, const scalar_t* dy, const scalar_t* x, const scalar_t* center,
                     double* sum_dy, double* dot) {
  const int64_t C = s.channels;
  std::fill(sum_dy, sum_dy + C, 0.0);
  std::fill(dot, dot + C, 0.0);
  if (s.inner == 1) {  // rows of C channels (2D input, or channels_last)
    std::mutex merge;
    const int64_t blocks = (s.outer + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / (kRowBlock * C)), [&](int64_t lo, int64_t hi) {
      std::vector<double> total_dy(C, 0.0), total_dot(C, 0.0);
      std::vector<scalar_t> block_dy(C), block_dot(C);
      scalar_t *bd = block_dy.data(), *bt = block_dot.data();
      for (int64_t blk = lo; blk < hi; ++blk) {
        std::fill(block_dy.begin(), block_dy.end(), scalar_t(0));
        std::fill(block_dot.begin(), block_dot.end(), scalar_t(0));
        const int64_t last = std::min(s.outer, (blk + 1) * kRowBlock);
        for (int64_t n = blk * kRowBlock; n < last; ++n) {
          const scalar_t* g = dy + n * C;
          const scalar_t* r = x + n * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            bd[c] += g[c];
            bt[c] += g[c] * (r[c] - center[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          total_dy[c] += bd[c];
          total_dot[c] += bt[c];
        }
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += total_dy[c];
        dot[c] += total_dot[c];
      }
    });
    return;
  }
  at::parallel_for(0, C, std::max<int64_t>(1, kGrain / (s.outer * s.inner)), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const scalar_t mid = center[c];
      double total_dy = 0.0, total_dot = 0.0;
      for (int64_t n = 0; n < s.outer; ++n) {
        const scalar_t* g = dy + (n * C + c) * s.inner;
        const scalar_t* r = x + (n * C + c) * s.inner;
        scalar_t part_dy = 0, part_dot = 0;
#pragma omp simd reduction(+ : part_dy, part_dot)
        for (int64_t l = 0; l < s.inner; ++l) {
          part_dy += g[l];
          part_dot += g[l] * (r[l] - mid);
        }
        total_dy += part_dy;
        total_dot += part_dot;
      }
      sum_dy[c] = total_dy;
      dot[c] = total_dot;
    }
  });
}

// Running (count, mean, M2) of one channel, merged chunk by chunk (Chan et al.): each
// chunk's mean and squared deviations come from two passes over the chunk while it is in
// cache, so the statistics take one pass over memory and never form E[x^2] - E[x]^2.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double chunk_mean, double chunk_m2) {
    const double total = count + n, delta = chunk_mean - mean;
    mean += delta * n / total;
    m2 += chunk_m2 + delta * delta * count * n / total;
    count = total;
  }
};

// Merges one chunk of n values given in the input's precision: `shifted_sum` is the sum
// of (x - shift) (shift: the chunk's first value, so the sum does not grow with a large
// mean), `sq_dev` the sum of (x - center)^2 around `center`, the chunk mean rounded to
// scalar_t. Corrected in double to the chunk's exact mean and squared deviations.
inline void merge_chunk(Moments& m, double n, double shift, double shifted_sum, double center,
                        double sq_dev) {
  const double chunk_mean = shift + shifted_sum / n, off = chunk_mean - center;
  m.merge(n, chunk_mean, std::max(sq_dev - n * off * off, 0.0));
}

template <typename scalar_t>
void channel_mean_var(const Layout& s, const scalar_t* x, double* mean, double* var) {
  const int64_t C = s.channels;
  std::vector<Moments> acc(C);
  if (s.inner == 1) {  // blocks of kRowBlock rows of C channels
    std::mutex merge;
    const int64_t blocks = (s.outer + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / (kRowBlock * C)), [&](int64_t lo, int64_t hi) {
      std::vector<Moments> local(C);
      std::vector<scalar_t> sum(C), center(C), dev(C);
      scalar_t *sp = sum.data(), *cp = center.data(), *dp = dev.data();
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t first = blk * kRowBlock, last = std::min(s.outer, first + kRowBlock);
        const scalar_t* shift = x + first * C;
        const double rows = double(last - first);
        std::fill(sum.begin(), sum.end(), scalar_t(0));
        std::fill(dev.begin(), dev.end(), scalar_t(0));
        for (int64_t n = first; n < last; ++n) {
          const scalar_t* r = x + n * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sp[c] += r[c] - shift[c];
        }
        for (int64_t c = 0; c < C; ++c) cp[c] = scalar_t(double(shift[c]) + double(sp[c]) / rows);
        for (int64_t n = first; n < last; ++n) {
          const scalar_t* r = x + n * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dp[c] += (r[c] - cp[c]) * (r[c] - cp[c]);
        }
        for (int64_t c = 0; c < C; ++c) merge_chunk(local[c], rows, shift[c], sp[c], cp[c], dp[c]);
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t c = 0; c < C; ++c) acc[c].merge(local[c].count, local[c].mean, local[c].m2);
    });
  } else {  // one chunk per (sample, channel): `inner` contiguous values
    at::parallel_for(0, C, std::max<int64_t>(1, kGrain / (s.outer * s.inner)), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        for (int64_t n = 0; n < s.outer; ++n) {
          const scalar_t* r = x + (n * C + c) * s.inner;
          const scalar_t shift = r[0];
          scalar_t total = 0, dev = 0;
#pragma omp simd reduction(+ : total)
          for (int64_t l = 0; l < s.inner; ++l) total += r[l] - shift;
          const scalar_t center = scalar_t(double(shift) + double(total) / double(s.inner));
#pragma omp simd reduction(+ : dev)
          for (int64_t l = 0; l < s.inner; ++l) dev += (r[l] - center) * (r[l] - center);
          merge_chunk(acc[c], double(s.inner), shift, total, center, dev);
        }
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = acc[c].mean;
    var[c] = acc[c].m2 / acc[c].count;
  }
}

// Calls f(i, c) for every element index i and its channel c, in vectorizable runs.
template <typename F>
void for_each_element(const Layout& s, F f) {
  const int64_t C = s.channels;
  if (s.inner == 1) {
    at::parallel_for(0, s.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t base = n * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) f(base + c, c);
      }
    });
    return;
  }
  at::parallel_for(0, s.outer * C, std::max<int64_t>(1, kGrain / s.inner), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t c = r % C, base = r * s.inner;
#pragma omp simd
      for (int64_t l = 0; l < s.inner; ++l) f(base + l, c);
    }
  });
}

// new = (1 - momentum) * old + momentum * batch; the variance stored unbiased.
template <typename stat_t>
void update_running(const Tensor& running_mean, const Tensor& running_var,
                    const std::vector<double>& mean, const std::vector<double>& var,
                    double momentum, int64_t count) {
  stat_t* m = running_mean.mutable_data_ptr<stat_t>();
  stat_t* v = running_var.mutable_data_ptr<stat_t>();
  const double unbias = double(count) / double(count - 1);
  for (size_t c = 0; c < mean.size(); ++c) {
    m[c] = stat_t((1.0 - momentum) * double(m[c]) + momentum * mean[c]);
    v[c] = stat_t((1.0 - momentum) * double(v[c]) + momentum * var[c] * unbias);
  }
}

template <typename scalar_t>
void forward_kernel(const Tensor& x, const Tensor& y, const Tensor& weight, const Tensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, bool training,
                    double momentum, double eps, const Tensor& mean_out, const Tensor& invstd_out) {
  const Layout s = layout_of(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t count = s.outer * s.inner;
  std::vector<double> mean(s.channels), var(s.channels);
  if (training) channel_mean_var<scalar_t>(s, xp, mean.data(), var.data());
  if (training && running_mean.defined()) {
    if (running_mean.scalar_type() == at::kFloat)
      update_running<float>(running_mean, running_var, mean, var, momentum, count);
    else
      update_running<double>(running_mean, running_var, mean, var, momentum, count);
  }
  if (!training) {
    auto rm = running_mean.to(at::kDouble).contiguous(), rv = running_var.to(at::kDouble).contiguous();
    for (int64_t c = 0; c < s.channels; ++c) {
      mean[c] = rm.const_data_ptr<double>()[c];
      var[c] = rv.const_data_ptr<double>()[c];
    }
  }
  // y = (x - center) * alpha + beta with center = mean rounded to scalar_t: x - center is
  // exact for x near the mean, and beta absorbs the rounding (mean - center), so a large
  // mean costs no precision.
  std::vector<scalar_t> alpha(s.channels), beta(s.channels), center(s.channels);
  double* mo = mean_out.mutable_data_ptr<double>();
  double* io = invstd_out.mutable_data_ptr<double>();
  for (int64_t c = 0; c < s.channels; ++c) {
    const double invstd = 1.0 / std::sqrt(var[c] + eps);
    const double w = weight.defined() ? double(weight.const_data_ptr<scalar_t>()[c]) : 1.0;
    const double b = bias.defined() ? double(bias.const_data_ptr<scalar_t>()[c]) : 0.0;
    center[c] = scalar_t(mean[c]);
    alpha[c] = scalar_t(invstd * w);
    beta[c] = scalar_t(b - (mean[c] - double(center[c])) * invstd * w);
    mo[c] = mean[c];
    io[c] = invstd;
  }
  const scalar_t *al = alpha.data(), *be = beta.data(), *ce = center.data();
  for_each_element(s, [&](int64_t i, int64_t c) { yp[i] = (xp[i] - ce[c]) * al[c] + be[c]; });
}

template <typename scalar_t>
void backward_kernel(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& mean_t,
                     const Tensor& invstd_t, bool training, const Tensor& dx, const Tensor& dweight,
                     const Tensor& dbias) {
  const Layout s = layout_of(x);
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const double* mean = mean_t.const_data_ptr<double>();
  const double* invstd = invstd_t.const_data_ptr<double>();
  const int64_t count = s.outer * s.inner;
  std::vector<scalar_t> center(s.channels);
  for (int64_t c = 0; c < s.channels; ++c) center[c] = scalar_t(mean[c]);
  std::vector<double> db(s.channels), dot(s.channels);
  channel_dy_sums<scalar_t>(s, g, xp, center.data(), db.data(), dot.data());
  // sum(dy * (x - mean)) from sum(dy * (x - center)): the mean's rounding, exactly
  for (int64_t c = 0; c < s.channels; ++c) dot[c] -= (mean[c] - double(center[c])) * db[c];
  if (dweight.defined()) {  // dgamma = sum(dy * x_hat)
    scalar_t* out = dweight.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < s.channels; ++c) out[c] = scalar_t(dot[c] * invstd[c]);
  }
  if (dbias.defined()) {  // dbeta = sum(dy)
    scalar_t* out = dbias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < s.channels; ++c) out[c] = scalar_t(db[c]);
  }
  if (!dx.defined()) return;
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  std::vector<scalar_t> a(s.channels), b(s.channels), k(s.channels);
  for (int64_t c = 0; c < s.channels; ++c) {
    const double w = weight.defined() ? double(weight.const_data_ptr<scalar_t>()[c]) : 1.0;
    a[c] = scalar_t(w * invstd[c]);
    // training: dx = dy * a + (x - center) * b + k, the mean's rounding folded into k
    const double bc = -w * invstd[c] * invstd[c] * invstd[c] * dot[c] / count;
    b[c] = scalar_t(bc);
    k[c] = scalar_t(-w * invstd[c] * db[c] / count - bc * (mean[c] - double(center[c])));
  }
  const scalar_t *ap = a.data(), *bp = b.data(), *kp = k.data(), *ce = center.data();
  if (training)
    for_each_element(s, [&](int64_t i, int64_t c) { out[i] = g[i] * ap[c] + (xp[i] - ce[c]) * bp[c] + kp[c]; });
  else  // constant statistics: dx = dy * gamma * invstd
    for_each_element(s, [&](int64_t i, int64_t c) { out[i] = g[i] * ap[c]; });
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  // Optional tensors are std::optional: autograd records only the defined ones as inputs.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight_opt,
                        const std::optional<Tensor>& bias_opt, const std::optional<Tensor>& mean_opt,
                        const std::optional<Tensor>& var_opt, bool training, double momentum,
                        double eps) {
    const Tensor weight = weight_opt.value_or(Tensor()), bias = bias_opt.value_or(Tensor());
    const Tensor running_mean = mean_opt.value_or(Tensor()), running_var = var_opt.value_or(Tensor());
    auto y = at::empty_like(x);
    auto opts = x.options().dtype(at::kDouble);
    auto mean = at::empty({x.size(1)}, opts), invstd = at::empty({x.size(1)}, opts);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_forward", [&] {
      forward_kernel<scalar_t>(x, y, weight, bias, running_mean, running_var, training, momentum,
                               eps, mean, invstd);
    });
    ctx->save_for_backward({x, weight, mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["has_weight"] = weight.defined();
    ctx->saved_data["has_bias"] = bias.defined();
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    const bool training = ctx->saved_data["training"].toBool();
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bnlab's cpp batch norm has no double backward (its backward is not "
                "differentiable); use impl='reference' for higher derivatives");
    Tensor dy = grads[0];
    if (!dy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    dy = dy.contiguous(x.suggest_memory_format());
    // needs_input_grad counts only the inputs that were defined tensors: x, then the
    // weight if given, then the bias if given.
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool need_dw = has_weight && ctx->needs_input_grad(1);
    const bool need_db = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_weight ? 2 : 1);
    Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : Tensor();
    Tensor dweight = need_dw ? at::empty({x.size(1)}, x.options()) : Tensor();
    Tensor dbias = need_db ? at::empty({x.size(1)}, x.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_backward", [&] {
      backward_kernel<scalar_t>(dy, x, weight, mean, invstd, training, dx, dweight, dbias);
    });
    return {dx, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The kernel's output, or None when it does not take this call (the caller falls back).
std::optional<Tensor> try_batch_norm(const Tensor& x, const std::optional<Tensor>& weight,
                                     const std::optional<Tensor>& bias,
                                     const std::optional<Tensor>& running_mean,
                                     const std::optional<Tensor>& running_var, bool training,
                                     double momentum, double eps) {
  if (!supported(x, weight, bias, running_mean, running_var)) return std::nullopt;
  return BatchNormFunction::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
}

}  // namespace bnlab

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("try_batch_norm", &bnlab::try_batch_norm,
        "bnlab batch norm (CPU kernel, C++ autograd node); None where the kernel does not apply");
}
