// bnlab's batch norm as one C++ kernel per direction (impl="cpp"; impl="auto" once built),
// optionally followed by an activation in the same pass (bnlab.nn.BatchNormAct*).
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
// Deterministic: per-thread partial sums are merged in a fixed order, so a given input
// and thread count give the same bits every run.
//
// Threads: the loops are ATen's at::parallel_for, which splits work only when this file
// is compiled with OpenMP (bnlab._cpp builds it with -fopenmp); parallel_chunks() says
// how many pieces a loop is split into in this build.
//
// Double backward: when the backward itself is recorded (create_graph=True), the node
// computes the gradients with differentiable ATen ops instead (differentiable_backward).
// Inference (no grad needed) runs the forward kernel without an autograd node.
//
// Activation (relu, sigmoid; identity is plain batch norm): applied to each stretch of the
// output right after it is written, while it is in cache, so BN+act moves the bytes of BN
// alone. Backward saves nothing more than batch norm does (x and per-channel statistics):
// it recomputes z = BN(x) per element from x and the saved statistics, the activation's
// derivative from z (relu: y > 0; sigmoid: y (1 - y)), and dz = dy * act'(z), which then
// takes batch norm's backward. Both use ATen's Vectorized ops exactly as torch's own relu
// and sigmoid kernels do (sigmoid = 1 / (1 + exp(-z)) with the same vectorized exp), and the
// scalar formula where torch's loop uses scalar code (ScalarRuns), so the fused result is
// batch norm followed by torch's activation bit for bit.
//
// Operator: the same computation is registered as the torch.library op
// <this build's name>::batch_norm, so that torch.jit.trace records one op (any input size
// replays correctly) and the TorchScript ONNX exporter can map it (bnlab.kernels.cpp
// registers the symbolic). Python calls the pybind function `batch_norm` directly otherwise
// (no dispatcher round trip on the small FC shapes).
//
// Layouts: the input is seen as (outer, C, inner) with channel c of sample n at
// x[(n * C + c) * inner + l]; a contiguous (N, C, *) input has inner = prod(spatial),
// a channels_last one has outer = N * prod(spatial) and inner = 1. CPU, float32/float64.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
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

// Tensors the kernel must not read through a raw pointer: functorch's transform wrappers
// (vmap, grad, jvp, ...), Python-dispatch subclasses (fake, functional tensors), and
// tensors carrying a forward-mode gradient (this node has no jvp). Their calls take
// the fast path, which composes with all of those.
bool plain(const Tensor& t) {
  constexpr auto foreign = c10::functorch_transforms_ks | c10::DispatchKeySet(c10::DispatchKey::Python);
  return !t.key_set().has_any(foreign) && !t._fw_grad(/*level=*/0).defined();
}

// Whether the kernel takes this call: a plain CPU float32/float64 input, contiguous or
// channels_last, with plain contiguous per-channel vectors of the same dtype.
bool supported(const Tensor& x, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  if (!x.device().is_cpu()) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (!plain(x)) return false;
  for (const auto* v : {&running_mean, &running_var, &weight, &bias}) {
    if (v->has_value() && v->value().defined()) {
      const Tensor& t = v->value();
      if (t.scalar_type() != x.scalar_type() || !t.device().is_cpu() || !t.is_contiguous() || !plain(t))
        return false;
    }
  }
  if (x.is_contiguous()) return true;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// The activations the kernel fuses, numbered as bnlab.kernels.cpp's KERNEL_ACTIVATIONS.
enum class Act : int64_t { Identity = 0, ReLU = 1, Sigmoid = 2 };

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

// act(z), as torch's CPU kernels compute it: relu is clamp_min(z, 0) (NaN stays NaN),
// sigmoid is 1 / (1 + exp(0 - z)) with ATen's vectorized exp.
template <Act A, typename scalar_t>
inline Vec<scalar_t> activate(Vec<scalar_t> z) {
  if constexpr (A == Act::ReLU) {
    return at::vec::clamp_min(z, Vec<scalar_t>(scalar_t(0)));
  } else if constexpr (A == Act::Sigmoid) {
    return ((Vec<scalar_t>(scalar_t(0)) - z).exp() + Vec<scalar_t>(scalar_t(1))).reciprocal();
  } else {
    return z;
  }
}

// dz = dy * act'(z) from y = act(z), as torch's backward kernels compute it: relu's
// threshold_backward (y <= 0 ? 0 : dy), sigmoid's dy * (1 - y) * y.
template <Act A, typename scalar_t>
inline Vec<scalar_t> activation_grad(Vec<scalar_t> dy, Vec<scalar_t> y) {
  if constexpr (A == Act::ReLU) {
    const Vec<scalar_t> zero(scalar_t(0));
    return Vec<scalar_t>::blendv(dy, zero, y <= zero);
  } else if constexpr (A == Act::Sigmoid) {
    return dy * (Vec<scalar_t>(scalar_t(1)) - y) * y;
  } else {
    return dy;
  }
}

// The same, one value at a time, as torch's scalar code computes them.
template <Act A, typename scalar_t>
inline scalar_t activate_one(scalar_t z) {
  if constexpr (A == Act::ReLU) {
    return z < scalar_t(0) ? scalar_t(0) : z;  // std::max(z, 0): NaN stays NaN
  } else if constexpr (A == Act::Sigmoid) {
    return scalar_t(1) / (scalar_t(1) + std::exp(-z));
  } else {
    return z;
  }
}

template <Act A, typename scalar_t>
inline scalar_t activation_grad_one(scalar_t dy, scalar_t y) {
  if constexpr (A == Act::ReLU) {
    return y <= scalar_t(0) ? scalar_t(0) : dy;
  } else if constexpr (A == Act::Sigmoid) {
    return dy * (scalar_t(1) - y) * y;
  } else {
    return dy;
  }
}

// Where torch computes an elementwise op with scalar code. Its CPU loops (TensorIterator's
// for_each, then cpu_kernel_vec) split a contiguous tensor of n values into parallel chunks
// (one when n <= at::internal::GRAIN_SIZE or on one thread, else min(threads, n / GRAIN_SIZE
// rounded up) chunks of equal size, as at::parallel_for does) and compute the last
// (chunk length mod two vectors) values of each chunk with scalar code: for sigmoid,
// std::exp instead of the vectorized exp, which can differ in the last ulp. The fused
// sigmoid computes those values (by offset in memory, the order torch iterates in) the
// scalar way too, so that it stays bit-identical to batch norm then torch.sigmoid. (relu's
// scalar and vector forms agree: it needs none.) Only bit-identity depends on this rule,
// not correctness; the tests compare fused and unfused bit for bit on shapes that have runs.
struct ScalarRuns {
  std::vector<std::pair<int64_t, int64_t>> runs;  // [begin, end) offsets

  // f(i) for each offset i of [first, first + n) that torch computes with scalar code.
  template <typename F>
  void for_each_in(int64_t first, int64_t n, F f) const {
    for (const auto& [begin, end] : runs)
      for (int64_t i = std::max(begin, first); i < std::min(end, first + n); ++i) f(i);
  }
};

template <Act A, typename scalar_t>
ScalarRuns torch_scalar_runs(int64_t n, int64_t threads) {
  ScalarRuns out;
  if constexpr (A == Act::Sigmoid) {
    const int64_t grain = at::internal::GRAIN_SIZE, step = 2 * Vec<scalar_t>::size();
    const int64_t chunks = (n <= grain || threads <= 1) ? 1 : std::min(threads, (n + grain - 1) / grain);
    const int64_t size = (n + chunks - 1) / chunks;
    for (int64_t begin = 0; begin < n; begin += size) {
      const int64_t end = std::min(n, begin + size), tail = (end - begin) % step;
      if (tail) out.runs.emplace_back(end - tail, end);
    }
  }
  return out;
}

// y[i] = act(y[i]) in place for i in [first, first + n) (the last vector partial); values
// torch computes with scalar code are redone the scalar way from z_at(i), their input.
template <Act A, typename scalar_t, typename Z>
void activate_span(scalar_t* y, int64_t first, int64_t n, const ScalarRuns& runs, Z z_at) {
  if constexpr (A != Act::Identity) {
    constexpr int64_t width = Vec<scalar_t>::size();
    scalar_t* p = y + first;
    int64_t i = 0;
    for (; i + width <= n; i += width) activate<A>(Vec<scalar_t>::loadu(p + i)).store(p + i);
    if (i < n) activate<A>(Vec<scalar_t>::loadu(p + i, n - i)).store(p + i, n - i);
    runs.for_each_in(first, n, [&](int64_t j) { y[j] = activate_one<A>(z_at(j)); });
  }
}

// dz = dy * act'(z) for the values [first, first + n) of one channel, z recomputed from x
// as the forward computed it: z = (x - center) * alpha + beta (scalar runs as above).
template <Act A, typename scalar_t>
void activation_grad_span(const scalar_t* dy, const scalar_t* x, scalar_t* dz, int64_t first, int64_t n,
                          scalar_t center, scalar_t alpha, scalar_t beta, const ScalarRuns& runs) {
  constexpr int64_t width = Vec<scalar_t>::size();
  const Vec<scalar_t> m(center), a(alpha), k(beta);
  const auto one = [&](int64_t i, int64_t count) {
    const Vec<scalar_t> z = (Vec<scalar_t>::loadu(x + i, count) - m) * a + k;
    activation_grad<A>(Vec<scalar_t>::loadu(dy + i, count), activate<A>(z)).store(dz + i, count);
  };
  int64_t i = first;
  for (; i + width <= first + n; i += width) one(i, width);
  if (i < first + n) one(i, first + n - i);
  runs.for_each_in(first, n, [&](int64_t j) {
    dz[j] = activation_grad_one<A>(dy[j], activate_one<A>((x[j] - center) * alpha + beta));
  });
}

// The same over the row of C channels at offset `first` (rows layout), with per-channel
// constants.
template <Act A, typename scalar_t>
void activation_grad_row(const scalar_t* dy, const scalar_t* x, scalar_t* dz, int64_t first, int64_t C,
                         const scalar_t* center, const scalar_t* alpha, const scalar_t* beta,
                         const ScalarRuns& runs) {
  constexpr int64_t width = Vec<scalar_t>::size();
  const auto one = [&](int64_t c, int64_t count) {
    const auto load = [&](const scalar_t* p) { return Vec<scalar_t>::loadu(p, count); };
    const Vec<scalar_t> z = (load(x + first + c) - load(center + c)) * load(alpha + c) + load(beta + c);
    activation_grad<A>(load(dy + first + c), activate<A>(z)).store(dz + first + c, count);
  };
  int64_t c = 0;
  for (; c + width <= C; c += width) one(c, width);
  if (c < C) one(c, C - c);
  runs.for_each_in(first, C, [&](int64_t j) {
    const int64_t ch = j - first;
    dz[j] = activation_grad_one<A>(dy[j], activate_one<A>((x[j] - center[ch]) * alpha[ch] + beta[ch]));
  });
}

// Per-channel constants of y = (x - center) * alpha + beta: center = mean rounded to
// scalar_t (x - center is exact for x near the mean), beta absorbing the rounding
// (mean - center), so a large mean costs no precision. Forward and backward compute them
// from the same doubles, so backward's z is the forward's bit for bit.
template <typename scalar_t>
struct Affine {
  scalar_t center, alpha, beta;
};

template <typename scalar_t>
Affine<scalar_t> affine_of(double mean, double invstd, const scalar_t* w, const scalar_t* b, int64_t c) {
  const double wc = w ? double(w[c]) : 1.0, bc = b ? double(b[c]) : 0.0;
  const scalar_t center = scalar_t(mean);
  return {center, scalar_t(invstd * wc), scalar_t(bc - (mean - double(center)) * invstd * wc)};
}

constexpr int64_t kRowBlock = 64;   // rows of C channels per chunk (channels_last, 2D)
constexpr int64_t kGrain = 32768;   // elements below which a loop runs on one thread

// Channels per task when a loop runs over the (outer, inner) planes of whole channels.
inline int64_t plane_grain(const Layout& s) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s.outer * s.inner));
}


// Asks for the next plane of the channel while the current one is summed: planes of one
// channel lie C * inner values apart, each often one page, where hardware prefetchers stop.
template <typename scalar_t>
inline void prefetch_plane(const scalar_t* p, int64_t inner) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < inner * int64_t(sizeof(scalar_t)); b += 64) __builtin_prefetch(bytes + b);
}
// Backward's two sums over channel c's planes: sum_dy = sum dy, dot = sum dy * (x - mid).
// `prepare(offset)` runs first on each plane (the fused activation writes dy there).
template <typename scalar_t, typename Prepare>
void plane_sums(const Layout& s, const scalar_t* dy, const scalar_t* x, int64_t c, scalar_t mid,
                double& sum_dy, double& dot, Prepare prepare) {
  double total_dy = 0.0, total_dot = 0.0;
  for (int64_t n = 0; n < s.outer; ++n) {
    const int64_t offset = (n * s.channels + c) * s.inner;
    prepare(offset);
    const scalar_t* g = dy + offset;
    const scalar_t* r = x + offset;
    if (n + 1 < s.outer) {
      prefetch_plane(g + s.channels * s.inner, s.inner);
      prefetch_plane(r + s.channels * s.inner, s.inner);
    }
    scalar_t part_dy = 0, part_dot = 0;
#pragma omp simd reduction(+ : part_dy, part_dot)
    for (int64_t l = 0; l < s.inner; ++l) {
      part_dy += g[l];
      part_dot += g[l] * (r[l] - mid);
    }
    total_dy += part_dy;
    total_dot += part_dot;
  }
  sum_dy = total_dy;
  dot = total_dot;
}

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
    struct Part {
      int64_t first;
      std::vector<double> dy, dot;
    };
    std::vector<Part> parts;
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
      parts.push_back(Part{lo, std::move(total_dy), std::move(total_dot)});
    });
    // Added up in block order, not in the order threads finish: the same bits every run.
    std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& part : parts)
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += part.dy[c];
        dot[c] += part.dot[c];
      }
    return;
  }
  at::parallel_for(0, C, plane_grain(s), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) plane_sums(s, dy, x, c, center[c], sum_dy[c], dot[c], [](int64_t) {});
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

// Moments of channel c over its planes: each (sample, channel) plane of `inner`
// contiguous values is one chunk.
template <typename scalar_t>
Moments plane_moments(const Layout& s, const scalar_t* x, int64_t c) {
  Moments acc;
  for (int64_t n = 0; n < s.outer; ++n) {
    const scalar_t* r = x + (n * s.channels + c) * s.inner;
    if (n + 1 < s.outer) prefetch_plane(r + s.channels * s.inner, s.inner);
    const scalar_t shift = r[0];
    scalar_t total = 0, dev = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < s.inner; ++l) total += r[l] - shift;
    const scalar_t center = scalar_t(double(shift) + double(total) / double(s.inner));
#pragma omp simd reduction(+ : dev)
    for (int64_t l = 0; l < s.inner; ++l) dev += (r[l] - center) * (r[l] - center);
    merge_chunk(acc, double(s.inner), shift, total, center, dev);
  }
  return acc;
}

// Mean and biased variance per channel of a rows-of-C layout (inner == 1), in blocks of
// kRowBlock rows.
template <typename scalar_t>
void row_mean_var(const Layout& s, const scalar_t* x, double* mean, double* var) {
  const int64_t C = s.channels;
  std::vector<Moments> acc(C);
  std::vector<std::pair<int64_t, std::vector<Moments>>> parts;
  {
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
      parts.emplace_back(lo, std::move(local));
    });
  }
  // Merged in block order, not in the order threads finish: the same bits every run.
  std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& part : parts)
    for (int64_t c = 0; c < C; ++c) acc[c].merge(part.second[c].count, part.second[c].mean, part.second[c].m2);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = acc[c].mean;
    var[c] = acc[c].m2 / acc[c].count;
  }
}

// Runs over every element in vectorizable stretches: row(i, c) for each element of a
// channels_last / (N, C) input (channel c = i % C, rows of C channels), plane(base, c)
// for each contiguous stretch of `inner` values of channel c otherwise (the caller's loop
// over it keeps the channel's constants in registers). `rows_done(first, count)` runs after
// each thread's stretch of rows, on the `count` values from `first` (still in cache).
template <typename Row, typename Plane, typename RowsDone>
void for_each_element(const Layout& s, Row row, Plane plane, RowsDone rows_done) {
  const int64_t C = s.channels;
  if (s.inner == 1) {
    at::parallel_for(0, s.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t base = n * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) row(base + c, c);
      }
      rows_done(lo * C, (hi - lo) * C);
    });
    return;
  }
  at::parallel_for(0, s.outer * C, std::max<int64_t>(1, kGrain / s.inner), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) plane(r * s.inner, r % C);
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

// y = act((x - center) * alpha + beta) per channel (Affine); writes the batch (or running)
// mean and invstd to mean_out / invstd_out when given (backward needs them). `threads`:
// torch's thread count, which says where torch's own activation uses scalar code (ScalarRuns).
//
// Training on a layout of planes (inner > 1) goes one channel at a time: the channel's
// statistics, then its output while its planes are still in cache, so x comes from
// memory once instead of twice. Rows of C channels (inner == 1) need every row for any
// channel's statistics: statistics first, then the output. The activation runs on each
// plane, or each thread's stretch of rows, right after it is written.
template <typename scalar_t, Act A>
void forward_kernel(const Tensor& x, const Tensor& y, const Tensor& weight, const Tensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, bool training,
                    double momentum, double eps, double* mean_out, double* invstd_out, int64_t threads) {
  const Layout s = layout_of(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const ScalarRuns runs = torch_scalar_runs<A, scalar_t>(x.numel(), threads);
  const int64_t count = s.outer * s.inner, C = s.channels;
  const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  std::vector<double> mean(C), var(C), invstd(C);
  std::vector<scalar_t> alpha(C), beta(C), center(C);
  const auto set_affine = [&](int64_t c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    const Affine<scalar_t> f = affine_of(mean[c], invstd[c], w, b, c);
    center[c] = f.center, alpha[c] = f.alpha, beta[c] = f.beta;
  };
  const auto plane = [&](int64_t base, int64_t c) {
    const scalar_t m = center[c], a = alpha[c], k = beta[c];
    const scalar_t* __restrict xr = xp + base;
    scalar_t* __restrict yr = yp + base;
#pragma omp simd
    for (int64_t l = 0; l < s.inner; ++l) yr[l] = (xr[l] - m) * a + k;
    activate_span<A>(yp, base, s.inner, runs, [&](int64_t i) { return (xp[i] - m) * a + k; });
  };
  if (training && s.inner > 1) {
    at::parallel_for(0, C, plane_grain(s), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Moments m = plane_moments(s, xp, c);
        mean[c] = m.mean, var[c] = m.m2 / m.count;
        set_affine(c);
        for (int64_t n = 0; n < s.outer; ++n) plane((n * C + c) * s.inner, c);
      }
    });
  } else {
    if (training) {
      row_mean_var<scalar_t>(s, xp, mean.data(), var.data());
    } else {  // running statistics, of the input's dtype (supported() checked)
      const scalar_t* rm = running_mean.const_data_ptr<scalar_t>();
      const scalar_t* rv = running_var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) mean[c] = double(rm[c]), var[c] = double(rv[c]);
    }
    for (int64_t c = 0; c < C; ++c) set_affine(c);
    const scalar_t *al = alpha.data(), *be = beta.data(), *ce = center.data();
    for_each_element(
        s, [&](int64_t i, int64_t c) { yp[i] = (xp[i] - ce[c]) * al[c] + be[c]; }, plane,
        [&](int64_t first, int64_t n) {
          activate_span<A>(yp, first, n, runs, [&](int64_t i) {
            const int64_t c = i % C;
            return (xp[i] - ce[c]) * al[c] + be[c];
          });
        });
  }
  if (training && running_mean.defined())
    update_running<scalar_t>(running_mean, running_var, mean, var, momentum, count);
  if (mean_out)
    for (int64_t c = 0; c < C; ++c) mean_out[c] = mean[c], invstd_out[c] = invstd[c];
}

// dx, dgamma, dbeta. Training on planes (inner > 1) goes one channel at a time, as the
// forward does: the channel's two sums, then its dx while dy and x are in cache.
//
// With an activation, batch norm's incoming gradient is dz = dy * act'(z), z recomputed
// from x and the saved statistics (and weight and bias): on planes it is written plane by
// plane just before that plane is summed, elsewhere in one pass first. dz goes where dx will
// be (dx is then computed from it in place), or into a scratch tensor when dx is not wanted.
// `threads`: the forward's (ScalarRuns).
template <typename scalar_t, Act A>
void backward_kernel(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                     const Tensor& mean_t, const Tensor& invstd_t, bool training, const Tensor& dx,
                     const Tensor& dweight, const Tensor& dbias, int64_t threads) {
  const Layout s = layout_of(x);
  const ScalarRuns runs = torch_scalar_runs<A, scalar_t>(x.numel(), threads);
  const int64_t C = s.channels;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const double* mean = mean_t.const_data_ptr<double>();
  const double* invstd = invstd_t.const_data_ptr<double>();
  scalar_t* dw = dweight.defined() ? dweight.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* db_out = dbias.defined() ? dbias.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
  Tensor scratch;
  scalar_t* dz = nullptr;
  std::vector<scalar_t> z_center(C), z_alpha(C), z_beta(C);  // the forward's Affine
  if constexpr (A != Act::Identity) {
    if (!out) scratch = at::empty_like(x);
    dz = out ? out : scratch.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const Affine<scalar_t> f = affine_of(mean[c], invstd[c], w, bp, c);
      z_center[c] = f.center, z_alpha[c] = f.alpha, z_beta[c] = f.beta;
    }
  }
  const scalar_t* g = A == Act::Identity ? dyp : dz;  // batch norm's incoming gradient
  const auto activation_grad_plane = [&](int64_t base, int64_t c) {
    if constexpr (A != Act::Identity)
      activation_grad_span<A>(dyp, xp, dz, base, s.inner, z_center[c], z_alpha[c], z_beta[c], runs);
  };
  const double count = double(s.outer * s.inner);
  std::vector<scalar_t> center(C), a(C), b(C), k(C);
  for (int64_t c = 0; c < C; ++c) center[c] = scalar_t(mean[c]);
  std::vector<double> db(C), dot(C);
  // From channel c's sums: dgamma = sum(dy * x_hat), dbeta = sum(dy), and the
  // coefficients of dx = dy * a + (x - center) * b + k (training; the mean's rounding
  // folded into k) or dx = dy * a (constant statistics).
  const auto finish = [&](int64_t c) {
    const double d = dot[c] - (mean[c] - double(center[c])) * db[c];  // sum(dy * (x - mean))
    if (dw) dw[c] = scalar_t(d * invstd[c]);
    if (db_out) db_out[c] = scalar_t(db[c]);
    const double wc = w ? double(w[c]) : 1.0;
    const double bc = -wc * invstd[c] * invstd[c] * invstd[c] * d / count;
    a[c] = scalar_t(wc * invstd[c]);
    b[c] = scalar_t(bc);
    k[c] = scalar_t(-wc * invstd[c] * db[c] / count - bc * (mean[c] - double(center[c])));
  };
  // g and out may be one buffer (dz turned into dx in place): no __restrict on them.
  const auto train_plane = [&](int64_t base, int64_t c) {
    const scalar_t ac = a[c], bb = b[c], kc = k[c], m = center[c];
    const scalar_t* gr = g + base;
    const scalar_t* __restrict xr = xp + base;
    scalar_t* o = out + base;
#pragma omp simd
    for (int64_t l = 0; l < s.inner; ++l) o[l] = gr[l] * ac + (xr[l] - m) * bb + kc;
  };
  if (training && s.inner > 1) {
    at::parallel_for(0, C, plane_grain(s), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        plane_sums(s, g, xp, c, center[c], db[c], dot[c],
                   [&](int64_t offset) { activation_grad_plane(offset, c); });
        finish(c);
        if (out)
          for (int64_t n = 0; n < s.outer; ++n) train_plane((n * C + c) * s.inner, c);
      }
    });
    return;
  }
  if constexpr (A != Act::Identity) {
    if (s.inner == 1) {
      at::parallel_for(0, s.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t lo, int64_t hi) {
        for (int64_t n = lo; n < hi; ++n)
          activation_grad_row<A>(dyp, xp, dz, n * C, C, z_center.data(), z_alpha.data(), z_beta.data(), runs);
      });
    } else {
      at::parallel_for(0, s.outer * C, std::max<int64_t>(1, kGrain / s.inner), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) activation_grad_plane(r * s.inner, r % C);
      });
    }
  }
  channel_dy_sums<scalar_t>(s, g, xp, center.data(), db.data(), dot.data());
  for (int64_t c = 0; c < C; ++c) finish(c);
  if (!out) return;
  const scalar_t *ap = a.data(), *bq = b.data(), *kp = k.data(), *ce = center.data();
  const auto nothing = [](int64_t, int64_t) {};
  if (training)
    for_each_element(
        s, [&](int64_t i, int64_t c) { out[i] = g[i] * ap[c] + (xp[i] - ce[c]) * bq[c] + kp[c]; },
        train_plane, nothing);
  else  // constant statistics: dx = dy * gamma * invstd
    for_each_element(
        s, [&](int64_t i, int64_t c) { out[i] = g[i] * ap[c]; },
        [&](int64_t base, int64_t c) {
          const scalar_t ac = ap[c];
          const scalar_t* gr = g + base;
          scalar_t* o = out + base;
#pragma omp simd
          for (int64_t l = 0; l < s.inner; ++l) o[l] = gr[l] * ac;
        },
        nothing);
}

// Calls f with the activation as a compile-time constant (one instantiation each).
template <typename F>
void with_activation(int64_t activation, F f) {
  switch (static_cast<Act>(activation)) {
    case Act::Identity: return f(std::integral_constant<Act, Act::Identity>{});
    case Act::ReLU: return f(std::integral_constant<Act, Act::ReLU>{});
    case Act::Sigmoid: return f(std::integral_constant<Act, Act::Sigmoid>{});
  }
  TORCH_CHECK(false, "bnlab batch norm: unknown activation code ", activation,
              " (0 identity, 1 relu, 2 sigmoid)");
}

// The gradients as differentiable ATen ops, for a backward that records a graph
// (create_graph=True: gradient penalties, Hessian-vector products). Same formulas as
// backward_kernel; in training the statistics are recomputed from x so that the second
// derivative sees how they depend on it, and with an activation z = x_hat * gamma + beta
// is recomputed so that it sees how act'(z) depends on x, gamma and beta.
tensor_list differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                    const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                    bool training, double eps, int64_t activation, bool need_dx,
                                    bool need_dw, bool need_db) {
  std::vector<int64_t> dims{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = x.size(1);
  Tensor mu, inv;
  if (training) {
    mu = x.mean(dims, /*keepdim=*/true);
    inv = ((x - mu).square().mean(dims, /*keepdim=*/true) + eps).rsqrt();
  } else {  // running statistics: constants
    mu = mean.to(x.scalar_type()).view(shape);
    inv = invstd.to(x.scalar_type()).view(shape);
  }
  const Tensor x_hat = (x - mu) * inv;
  Tensor g = dy;  // batch norm's incoming gradient: dy * act'(z)
  if (static_cast<Act>(activation) != Act::Identity) {
    Tensor z = weight.defined() ? x_hat * weight.view(shape) : x_hat;
    if (bias.defined()) z = z + bias.view(shape);
    g = static_cast<Act>(activation) == Act::ReLU ? at::threshold_backward(dy, at::relu(z), 0)
                                                  : at::sigmoid_backward(dy, at::sigmoid(z));
  }
  const Tensor scale = weight.defined() ? inv * weight.view(shape) : inv;
  Tensor dx, dweight, dbias;
  if (need_db) dbias = g.sum(dims);
  if (need_dw) dweight = (g * x_hat).sum(dims);
  if (need_dx && training)  // scale * (g - mean(g) - x_hat * mean(g * x_hat))
    dx = scale * (g - g.mean(dims, true) - x_hat * (g * x_hat).mean(dims, true));
  else if (need_dx)
    dx = g * scale;
  return {dx, dweight, dbias};
}

// Autograd node; arguments in torch's functional order, then the activation's code.
struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  // Optional tensors are std::optional: autograd records only the defined ones as inputs.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& mean_opt,
                        const std::optional<Tensor>& var_opt, const std::optional<Tensor>& weight_opt,
                        const std::optional<Tensor>& bias_opt, bool training, double momentum, double eps,
                        int64_t activation) {
    const Tensor weight = weight_opt.value_or(Tensor()), bias = bias_opt.value_or(Tensor());
    const Tensor running_mean = mean_opt.value_or(Tensor()), running_var = var_opt.value_or(Tensor());
    auto y = at::empty_like(x);
    const int64_t threads = at::get_num_threads();
    auto opts = x.options().dtype(at::kDouble);
    auto mean = at::empty({x.size(1)}, opts), invstd = at::empty({x.size(1)}, opts);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_forward", [&] {
      with_activation(activation, [&](auto act) {
        forward_kernel<scalar_t, decltype(act)::value>(x, y, weight, bias, running_mean, running_var, training,
                                                       momentum, eps, mean.mutable_data_ptr<double>(),
                                                       invstd.mutable_data_ptr<double>(), threads);
      });
    });
    // Saved: x and per-channel vectors, whatever the activation (weight and bias are
    // parameters: saving them keeps a reference, no copy).
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["threads"] = threads;
    ctx->saved_data["stats"] = int64_t(running_mean.defined()) + int64_t(running_var.defined());
    ctx->saved_data["has_weight"] = weight.defined();
    ctx->saved_data["has_bias"] = bias.defined();
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t activation = ctx->saved_data["activation"].toInt();
    Tensor dy = grads[0];
    const Tensor none;
    if (!dy.defined()) return {none, none, none, none, none, none, none, none, none};
    // needs_input_grad counts only the inputs that were defined tensors: x, the running
    // statistics if given (never differentiated), the weight if given, the bias if given.
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const int64_t stats = ctx->saved_data["stats"].toInt();
    const int64_t w_index = 1 + stats, b_index = 1 + stats + (has_weight ? 1 : 0);
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dw = has_weight && ctx->needs_input_grad(w_index);
    const bool need_db = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(b_index);
    Tensor dx, dweight, dbias;
    if (at::GradMode::is_enabled()) {  // create_graph: a backward that is itself differentiable
      auto g = differentiable_backward(dy, x, weight, bias, mean, invstd, training,
                                       ctx->saved_data["eps"].toDouble(), activation, need_dx, need_dw,
                                       need_db);
      dx = g[0], dweight = g[1], dbias = g[2];
    } else {
      dy = dy.contiguous(x.suggest_memory_format());
      if (need_dx) dx = at::empty_like(x);
      if (need_dw) dweight = at::empty({x.size(1)}, x.options());
      if (need_db) dbias = at::empty({x.size(1)}, x.options());
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_backward", [&] {
        with_activation(activation, [&](auto act) {
          backward_kernel<scalar_t, decltype(act)::value>(dy, x, weight, bias, mean, invstd, training, dx,
                                                          dweight, dbias, ctx->saved_data["threads"].toInt());
        });
      });
    }
    return {dx, none, none, dweight, dbias, none, none, none, none};
  }
};

// The computation without an autograd node (inference, no_grad, below autograd).
Tensor forward_only(const Tensor& x, const std::optional<Tensor>& running_mean,
                    const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, bool training, double momentum, double eps,
                    int64_t activation) {
  const Tensor none;
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_forward", [&] {
    with_activation(activation, [&](auto act) {
      forward_kernel<scalar_t, decltype(act)::value>(x, y, weight.value_or(none), bias.value_or(none),
                                                     running_mean.value_or(none), running_var.value_or(none),
                                                     training, momentum, eps, nullptr, nullptr,
                                                     at::get_num_threads());
    });
  });
  return y;
}

// With the autograd node where a gradient is wanted, without it elsewhere.
Tensor forward_autograd(const Tensor& x, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, bool training, double momentum, double eps,
                        int64_t activation) {
  const auto wants_grad = [](const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (at::GradMode::is_enabled() && (x.requires_grad() || wants_grad(weight) || wants_grad(bias)))
    return BatchNormFunction::apply(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation);
  return forward_only(x, running_mean, running_var, weight, bias, training, momentum, eps, activation);
}

// The kernel's output, or None when it does not take this call (the caller falls back).
// Arguments in torch's functional order (F.batch_norm's), then the activation's code.
std::optional<Tensor> batch_norm(const Tensor& x, const std::optional<Tensor>& running_mean,
                                 const std::optional<Tensor>& running_var, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, bool training, double momentum, double eps,
                                 int64_t activation) {
  if (!supported(x, running_mean, running_var, weight, bias)) return std::nullopt;
  return forward_autograd(x, running_mean, running_var, weight, bias, training, momentum, eps, activation);
}

// The registered op's kernels: the same computation, for inputs in the kernel's scope only
// (a traced graph replayed on other inputs says so rather than reading them wrongly).
template <Tensor (*Run)(const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                        const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double, double,
                        int64_t)>
Tensor checked(const Tensor& x, const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, bool training,
               double momentum, double eps, int64_t activation) {
  TORCH_CHECK(supported(x, running_mean, running_var, weight, bias),
              "bnlab's batch-norm op takes CPU float32/float64 tensors (the input contiguous or channels_last, "
              "the per-channel vectors contiguous, all of one dtype); got a ", x.scalar_type(), " input on ",
              x.device());
  return Run(x, running_mean, running_var, weight, bias, training, momentum, eps, activation);
}

// Pieces at::parallel_for splits a loop of torch.get_num_threads() items into, one item
// per piece at most: the thread count in an OpenMP build, 1 in a build without OpenMP.
int64_t parallel_chunks() {
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { ++chunks; });
  return chunks.load();
}

}  // namespace bnlab

// The op's namespace is this build's module name (TORCH_EXTENSION_NAME, set by
// torch.utils.cpp_extension): two builds loaded in one process never collide. The
// indirection expands the macro before TORCH_LIBRARY pastes it.
#define BNLAB_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define BNLAB_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

BNLAB_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
        "Tensor? bias, bool training, float momentum, float eps, int activation=0) -> Tensor");
}

BNLAB_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("batch_norm", &bnlab::checked<&bnlab::forward_only>);
}

BNLAB_LIBRARY_IMPL(TORCH_EXTENSION_NAME, Autograd, m) {
  m.impl("batch_norm", &bnlab::checked<&bnlab::forward_autograd>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm", &bnlab::batch_norm,
        "bnlab batch norm (CPU kernel, C++ autograd node), arguments as torch.nn.functional."
        "batch_norm's, then the activation's code (0 identity, 1 relu, 2 sigmoid); None where the "
        "kernel does not take the call",
        py::arg("input"), py::arg("running_mean"), py::arg("running_var"), py::arg("weight"), py::arg("bias"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("activation") = 0);
  m.def("supported", &bnlab::supported,
        "whether the kernel takes these tensors (input, running_mean, running_var, weight, bias)");
  m.def("parallel_chunks", &bnlab::parallel_chunks,
        "pieces at::parallel_for splits a loop of torch.get_num_threads() items into (1 without OpenMP)");
}
