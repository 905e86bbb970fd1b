// CPU implementation of the fused residual add + steering bias + RMSNorm op.
//
//   x = hidden + residual + table[index[t]]      (fp32; index None: row 0)
//   y = x * rsqrt(mean(x^2) + eps) * weight
//
// The schemas live here (TORCH_LIBRARY) so the op exists with or without
// Triton; kernels/fused_add_steer_rms_norm.py adds the CUDA (Triton) kernels,
// the fake kernels and autograd to the same ops.
//
// Each row is read from memory once: the fp32 sum x goes to a per-thread row
// buffer (in L1/L2 for any realistic hidden size) while the sum of squares
// accumulates, and the second sweep reads that buffer, not DRAM.
//
// Built once per ISA (setup.py sets CPU_CAPABILITY, the matching -m flags and
// the module name kernels._C_<ISA>); at::vec::Vectorized gives the vector width.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace steering {
namespace {

// Accumulation type: fp32 for fp32/bf16/fp16 activations, fp64 for fp64 (the
// fp64 path exists for gradcheck and references; the table and rstd follow it).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A chunk is one Vectorized<T>: one accumulator vector for fp32/fp64, two for
// bf16/fp16 (each converts to two float vectors).
template <typename T>
struct ChunkOf {
  using aVec = at::vec::Vectorized<acc_t<T>>;
  static constexpr int64_t kSize = at::vec::Vectorized<T>::size();
  static constexpr int64_t kAccWidth = aVec::size();
  static constexpr int kParts = static_cast<int>(kSize / kAccWidth);
};

template <typename T, typename N, typename aVec = typename ChunkOf<T>::aVec>
inline void load_chunk(const T* p, N n, aVec* out) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    out[0] = n == aVec::size() ? aVec::loadu(p) : aVec::loadu(p, n);
  } else {
    using bVec = at::vec::Vectorized<T>;
    bVec b = n == bVec::size() ? bVec::loadu(p) : bVec::loadu(p, n);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(b);
  }
}

template <typename T, typename N, typename aVec = typename ChunkOf<T>::aVec>
inline void store_chunk(T* p, N n, const aVec* in) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    n == aVec::size() ? in[0].store(p) : in[0].store(p, n);
  } else {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // one instruction for 32 values (round to nearest even), where ATen's
      // portable conversion takes a dozen integer ops
      const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(in[1], in[0]);
      n == 32 ? _mm512_storeu_si512(p, b) : _mm512_mask_storeu_epi16(p, (__mmask32)((1ull << n) - 1), b);
      return;
    }
#endif
    auto b = at::vec::convert_from_float<T>(in[0], in[1]);
    n == decltype(b)::size() ? b.store(p) : b.store(p, n);
  }
}

// Accumulator-typed source (the steering table, the row buffers) read in the
// layout of a chunk of T; lanes past n are zero.
template <typename T, typename N, typename aVec = typename ChunkOf<T>::aVec>
inline void load_acc_chunk(const acc_t<T>* p, N n, aVec* out) {
  constexpr int64_t W = aVec::size();
  for (int k = 0; k < ChunkOf<T>::kParts; ++k) {
    const int64_t m = std::min<int64_t>(W, n - k * W);
    out[k] = m >= W ? aVec::loadu(p + k * W) : m > 0 ? aVec::loadu(p + k * W, m) : aVec(0);
  }
}

// Horizontal sum (once per row; Vectorized<double> has no reduce_add).
template <typename V>
inline typename V::value_type horizontal_sum(const V& v) {
  alignas(64) typename V::value_type lanes[V::size()];
  v.store(lanes);
  typename V::value_type sum = 0;
  for (int64_t i = 0; i < V::size(); ++i) sum += lanes[i];
  return sum;
}

int64_t rounded_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Rows per parallel task: enough elements per task that threading pays.
int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)); }

// ---------------------------------------------------------------------------
// argument checks (ValueError / TypeError / IndexError in Python)

void check_forward_args(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& table,
                        const std::optional<at::Tensor>& index, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "fused_add_steer_rms_norm: hidden must be 2-D [T, d], got shape ",
                    hidden.sizes());
  const int64_t T = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK_VALUE(residual.sizes() == hidden.sizes(), "fused_add_steer_rms_norm: residual shape ",
                    residual.sizes(), " does not match hidden shape ", hidden.sizes());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == d && table.size(0) >= 1,
                    "fused_add_steer_rms_norm: table must be [R >= 1, d=", d, "], got shape ", table.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == d, "fused_add_steer_rms_norm: weight must be [d=", d,
                    "], got shape ", weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                   "fused_add_steer_rms_norm: hidden dtype must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK_TYPE(residual.scalar_type() == dt, "fused_add_steer_rms_norm: residual dtype ",
                   residual.scalar_type(), " does not match hidden dtype ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, "fused_add_steer_rms_norm: weight dtype ", weight.scalar_type(),
                   " does not match hidden dtype ", dt);
  const auto table_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(table.scalar_type() == table_dt, "fused_add_steer_rms_norm: table must be ", table_dt,
                   " for ", dt, " activations, got ", table.scalar_type());
  TORCH_CHECK_VALUE(hidden.is_contiguous(), "fused_add_steer_rms_norm: hidden must be contiguous");
  TORCH_CHECK_VALUE(residual.is_contiguous(), "fused_add_steer_rms_norm: residual must be contiguous");
  TORCH_CHECK_VALUE(table.is_contiguous(), "fused_add_steer_rms_norm: table must be contiguous");
  TORCH_CHECK_VALUE(weight.is_contiguous(), "fused_add_steer_rms_norm: weight must be contiguous");
  if (index.has_value()) {
    const auto& idx = *index;
    TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == T, "fused_add_steer_rms_norm: index must be [T=", T,
                      "], got shape ", idx.sizes());
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                     "fused_add_steer_rms_norm: index must be int64 or int32, got ", idx.scalar_type());
    TORCH_CHECK_VALUE(idx.is_contiguous(), "fused_add_steer_rms_norm: index must be contiguous");
  }
}

void check_index_range(const std::optional<at::Tensor>& index, int64_t num_rows) {
  if (!index.has_value() || index->numel() == 0) return;
  const auto idx = index->to(at::kLong);
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_rows, "fused_add_steer_rms_norm: index values must lie in [0, ", num_rows,
                    ") (table rows), got min ", lo, " max ", hi);
}

template <typename I>
inline int64_t table_row(const I* index, int64_t t) {
  return index == nullptr ? 0 : static_cast<int64_t>(index[t]);
}

// ---------------------------------------------------------------------------
// forward

// Calls body(j, n, slot) over [0, d) in chunks of kChunk. Full chunks get n
// as a compile-time constant, so their loads and stores compile without masks;
// they are unrolled by kSlots, and slot (0 .. kSlots-1, also a constant) lets a
// reduction keep kSlots independent accumulators instead of one FMA chain.
constexpr int kSlots = 4;

template <int64_t kChunk, typename Body>
inline void for_each_chunk(int64_t d, Body&& body) {
  static_assert(kSlots == 4, "the unrolled loop below calls body once per slot");
  using Full = std::integral_constant<int64_t, kChunk>;
  using First = std::integral_constant<int, 0>;
  int64_t j = 0;
  for (; j + kSlots * kChunk <= d; j += kSlots * kChunk) {
    body(j, Full{}, First{});
    body(j + kChunk, Full{}, std::integral_constant<int, 1>{});
    body(j + 2 * kChunk, Full{}, std::integral_constant<int, 2>{});
    body(j + 3 * kChunk, Full{}, std::integral_constant<int, 3>{});
  }
  for (; j + kChunk <= d; j += kChunk) body(j, Full{}, First{});
  if (j < d) body(j, d - j, First{});
}

// Sum of kSlots x kParts accumulators, in a fixed order.
template <typename aVec, int kParts>
inline aVec sum_slots(const aVec (&acc)[kSlots][kParts]) {
  aVec total(0);
  for (int i = 0; i < kSlots; ++i)
    for (int k = 0; k < kParts; ++k) total = total + acc[i][k];
  return total;
}

template <typename T, typename I>
void forward_rows(const T* hidden, const T* residual, const acc_t<T>* table, const I* index, const T* weight,
                  T* y, T* residual_out, acc_t<T>* rstd_out, int64_t num_tokens, int64_t d, double eps) {
  using A = acc_t<T>;
  using aVec = typename ChunkOf<T>::aVec;
  constexpr int64_t kChunk = ChunkOf<T>::kSize, W = ChunkOf<T>::kAccWidth;
  constexpr int kParts = ChunkOf<T>::kParts;
  // bf16/fp16 round residual_out; y is computed from the unrounded x, kept in a
  // per-thread row buffer. For fp32/fp64, residual_out itself is that x.
  constexpr bool kRowBuffer = !std::is_same_v<T, A>;
  at::parallel_for(0, num_tokens, grain_rows(d), [&](int64_t begin, int64_t end) {
    std::vector<A> x_row(kRowBuffer ? rounded_up(d, kChunk) : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t off = t * d;  // int64: T * d can exceed 2^31
      const A* steer = table + table_row(index, t) * d;
      // sweep 1: x = hidden + residual + steer; residual_out <- x; sum of squares
      aVec sq[kSlots][kParts];
      for (auto& slot : sq) std::fill(slot, slot + kParts, aVec(0));
      for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto slot) {
        aVec h[kParts], r[kParts], s[kParts];
        load_chunk(hidden + off + j, n, h);
        load_chunk(residual + off + j, n, r);
        load_acc_chunk<T>(steer + j, n, s);
        for (int k = 0; k < kParts; ++k) {
          h[k] = h[k] + r[k] + s[k];
          sq[slot][k] = at::vec::fmadd(h[k], h[k], sq[slot][k]);
          if constexpr (kRowBuffer) h[k].store(x_row.data() + j + k * W);
        }
        store_chunk(residual_out + off + j, n, h);
      });
      const A rstd = A(1) / std::sqrt(horizontal_sum(sum_slots(sq)) / static_cast<A>(d) + static_cast<A>(eps));
      if (rstd_out != nullptr) rstd_out[t] = rstd;
      // sweep 2 (the row is in L1/L2 now): y = x * rstd * weight
      const aVec rstd_v(rstd);
      for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto) {
        aVec x[kParts], w[kParts];
        if constexpr (kRowBuffer) {
          for (int k = 0; k < kParts; ++k) x[k] = aVec::loadu(x_row.data() + j + k * W);
        } else {
          load_chunk(residual_out + off + j, n, x);
        }
        load_chunk(weight + j, n, w);
        for (int k = 0; k < kParts; ++k) x[k] = x[k] * rstd_v * w[k];
        store_chunk(y + off + j, n, x);
      });
    }
  });
}

template <typename Fn>
void dispatch_index(const std::optional<at::Tensor>& index, Fn&& fn) {
  if (!index.has_value()) {
    fn(static_cast<const int64_t*>(nullptr));
  } else if (index->scalar_type() == at::kLong) {
    fn(index->data_ptr<int64_t>());
  } else {
    fn(index->data_ptr<int32_t>());
  }
}

template <typename T>
acc_t<T>* maybe_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t<T>>() : nullptr;
}

void launch_forward(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& table,
                    const std::optional<at::Tensor>& index, const at::Tensor& weight, double eps, at::Tensor& y,
                    at::Tensor& residual_out, const at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_add_steer_rms_norm", [&] {
    dispatch_index(index, [&](auto* idx) {
      forward_rows<scalar_t>(hidden.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                             table.data_ptr<acc_t<scalar_t>>(), idx, weight.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), residual_out.data_ptr<scalar_t>(), maybe_ptr<scalar_t>(rstd),
                             hidden.size(0), hidden.size(1), eps);
    });
  });
}

// In place: hidden <- y, residual <- residual_out. Within a row every element
// is read before it is written, so the outputs may alias the inputs.
void forward_inplace(at::Tensor& hidden, at::Tensor& residual, const at::Tensor& table,
                     const std::optional<at::Tensor>& index, const at::Tensor& weight, double eps) {
  check_forward_args(hidden, residual, table, index, weight);
  check_index_range(index, table.size(0));
  launch_forward(hidden, residual, table, index, weight, eps, hidden, residual, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& residual,
                                                      const at::Tensor& table, const std::optional<at::Tensor>& index,
                                                      const at::Tensor& weight, double eps) {
  check_forward_args(hidden, residual, table, index, weight);
  check_index_range(index, table.size(0));
  auto y = at::empty_like(hidden);
  auto residual_out = at::empty_like(residual);
  auto rstd = at::empty({hidden.size(0)}, table.options());  // accumulation dtype
  launch_forward(hidden, residual, table, index, weight, eps, y, residual_out, rstd);
  return {y, residual_out, rstd};
}

// ---------------------------------------------------------------------------
// backward
//
// With xhat = x * rstd and wdy = weight * dy:
//   g = rstd * (wdy - xhat * mean(wdy * xhat)) + d_residual_out
// g is both d_hidden and d_residual. d_table[r] = sum of g over tokens with
// index r, d_weight = sum over tokens of dy * xhat. Both are reduced in two
// stages: a fixed partition of the tokens into parts (it depends on the shapes
// only, never on the thread count), one partial per part, then the parts
// summed in order. No atomics, so the result is bitwise reproducible.

constexpr int64_t kMaxParts = 64;
constexpr int64_t kMaxPartialElems = int64_t{1} << 24;  // bounds the partials' memory

int64_t num_parts(int64_t num_tokens, int64_t elems_per_part) {
  int64_t parts = std::min<int64_t>(kMaxParts, std::max<int64_t>(num_tokens, 1));
  return std::min<int64_t>(parts, std::max<int64_t>(1, kMaxPartialElems / std::max<int64_t>(elems_per_part, 1)));
}

template <typename T, typename I>
void backward_rows(const T* dy, const T* dres, const T* x, const acc_t<T>* rstd, const I* index, const T* weight,
                   T* g, acc_t<T>* table_partials, acc_t<T>* weight_partials, int64_t num_tokens, int64_t d,
                   int64_t num_rows, int64_t parts) {
  using A = acc_t<T>;
  using aVec = typename ChunkOf<T>::aVec;
  constexpr int64_t kChunk = ChunkOf<T>::kSize, W = ChunkOf<T>::kAccWidth;
  constexpr int kParts = ChunkOf<T>::kParts;
  const int64_t rows_per_part = (num_tokens + parts - 1) / parts;
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t p = part_begin; p < part_end; ++p) {
      A* tp = table_partials == nullptr ? nullptr : table_partials + p * num_rows * d;
      A* wp = weight_partials == nullptr ? nullptr : weight_partials + p * d;
      const int64_t t_end = std::min(num_tokens, (p + 1) * rows_per_part);
      for (int64_t t = p * rows_per_part; t < t_end; ++t) {
        const int64_t off = t * d;
        const A rs = rstd[t];
        // sweep 1: dot = sum(weight * dy * x)
        aVec dot[kSlots][kParts];
        for (auto& slot : dot) std::fill(slot, slot + kParts, aVec(0));
        for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto slot) {
          aVec dyv[kParts], xv[kParts], wv[kParts];
          load_chunk(dy + off + j, n, dyv);
          load_chunk(x + off + j, n, xv);
          load_chunk(weight + j, n, wv);
          for (int k = 0; k < kParts; ++k) dot[slot][k] = at::vec::fmadd(wv[k] * dyv[k], xv[k], dot[slot][k]);
        });
        // sweep 2 (the row is in L1/L2 now): g = rstd * w * dy - x * (rstd^3 * dot / d) + dres
        const aVec rs_v(rs);
        const aVec coef(rs * rs * rs * horizontal_sum(sum_slots(dot)) / static_cast<A>(d));
        A* trow = tp == nullptr ? nullptr : tp + table_row(index, t) * d;
        for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto) {
          aVec dyv[kParts], xv[kParts], wv[kParts], gv[kParts], rv[kParts];
          load_chunk(dy + off + j, n, dyv);
          load_chunk(x + off + j, n, xv);
          load_chunk(weight + j, n, wv);
          if (dres != nullptr) load_chunk(dres + off + j, n, rv);
          for (int k = 0; k < kParts; ++k) {
            gv[k] = rs_v * wv[k] * dyv[k] - xv[k] * coef;
            if (dres != nullptr) gv[k] = gv[k] + rv[k];
          }
          store_chunk(g + off + j, n, gv);
          for (int k = 0; k < kParts; ++k) {
            const int64_t m = std::min<int64_t>(W, n - k * W);
            if (m <= 0) break;
            const int64_t col = j + k * W;
            if (trow != nullptr) (aVec::loadu(trow + col, m) + gv[k]).store(trow + col, m);
            if (wp != nullptr) at::vec::fmadd(dyv[k], xv[k] * rs_v, aVec::loadu(wp + col, m)).store(wp + col, m);
          }
        });
      }
    }
  });
}

// out[j] = sum over p, in order, of partials[p, j]
template <typename A, typename T>
void sum_parts(const A* partials, int64_t parts, int64_t n, T* out) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      A acc = 0;
      for (int64_t p = 0; p < parts; ++p) acc += partials[p * n + j];
      out[j] = static_cast<T>(acc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y,
                                                       const std::optional<at::Tensor>& grad_residual_out,
                                                       const at::Tensor& residual_out, const at::Tensor& rstd,
                                                       const std::optional<at::Tensor>& index,
                                                       const at::Tensor& weight, int64_t num_table_rows,
                                                       bool table_grad, bool weight_grad) {
  TORCH_CHECK_VALUE(residual_out.dim() == 2, "fused_add_steer_rms_norm backward: residual_out must be 2-D");
  const int64_t T = residual_out.size(0), d = residual_out.size(1);
  const auto acc_type = residual_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(grad_y.sizes() == residual_out.sizes() && grad_y.scalar_type() == residual_out.scalar_type(),
                    "fused_add_steer_rms_norm backward: grad_y must match residual_out, got ", grad_y.sizes(), " ",
                    grad_y.scalar_type());
  TORCH_CHECK_VALUE(rstd.dim() == 1 && rstd.size(0) == T && rstd.scalar_type() == acc_type,
                    "fused_add_steer_rms_norm backward: rstd must be [T] of the accumulation dtype");
  TORCH_CHECK_VALUE(num_table_rows >= 1, "fused_add_steer_rms_norm backward: num_table_rows must be >= 1");
  const auto dy = grad_y.contiguous();
  const auto x = residual_out.contiguous();
  std::optional<at::Tensor> dres;
  if (grad_residual_out.has_value()) {
    dres = grad_residual_out->contiguous();
    TORCH_CHECK_VALUE(dres->sizes() == x.sizes() && dres->scalar_type() == x.scalar_type(),
                      "fused_add_steer_rms_norm backward: grad_residual_out must match residual_out");
  }
  auto g = at::empty_like(x);
  const auto aopts = x.options().dtype(acc_type);
  auto d_table = at::empty({table_grad ? num_table_rows : 0, d}, aopts);
  auto d_weight = at::empty({weight_grad ? d : 0}, weight.options());
  const int64_t parts = num_parts(T, (table_grad ? num_table_rows * d : 0) + d);
  auto table_partials = table_grad ? at::zeros({parts, num_table_rows, d}, aopts) : at::Tensor();
  auto weight_partials = weight_grad ? at::zeros({parts, d}, aopts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_steer_rms_norm_backward", [&] {
    using A = acc_t<scalar_t>;
    dispatch_index(index, [&](auto* idx) {
      backward_rows<scalar_t>(dy.data_ptr<scalar_t>(), dres.has_value() ? dres->data_ptr<scalar_t>() : nullptr,
                              x.data_ptr<scalar_t>(), rstd.data_ptr<A>(), idx, weight.data_ptr<scalar_t>(),
                              g.data_ptr<scalar_t>(), maybe_ptr<scalar_t>(table_partials),
                              maybe_ptr<scalar_t>(weight_partials), T, d, num_table_rows, parts);
    });
    if (weight_grad) sum_parts(weight_partials.data_ptr<A>(), parts, d, d_weight.data_ptr<scalar_t>());
    if (table_grad) sum_parts(table_partials.data_ptr<A>(), parts, num_table_rows * d, d_table.data_ptr<A>());
  });
  return {g, d_table, d_weight};
}

#define STEERING_STR2(x) #x
#define STEERING_STR(x) STEERING_STR2(x)

std::string cpu_capability() { return STEERING_STR(STEERING_CPU_ISA); }

}  // namespace

TORCH_LIBRARY(steering, m) {
  m.def(
      "fused_add_steer_rms_norm_(Tensor(a!) hidden, Tensor(b!) residual, Tensor table, Tensor? index, "
      "Tensor weight, float eps) -> ()");
  m.def(
      "fused_add_steer_rms_norm_fwd(Tensor hidden, Tensor residual, Tensor table, Tensor? index, "
      "Tensor weight, float eps) -> (Tensor y, Tensor residual_out, Tensor rstd)");
  m.def(
      "fused_add_steer_rms_norm_bwd(Tensor grad_y, Tensor? grad_residual_out, Tensor residual_out, Tensor rstd, "
      "Tensor? index, Tensor weight, int num_table_rows, bool table_grad, bool weight_grad) "
      "-> (Tensor grad_input, Tensor grad_table, Tensor grad_weight)");
  m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(steering, CPU, m) {
  m.impl("fused_add_steer_rms_norm_", &forward_inplace);
  m.impl("fused_add_steer_rms_norm_fwd", &forward);
  m.impl("fused_add_steer_rms_norm_bwd", &backward);
}

}  // namespace steering

// A Python module with no methods: importing kernels._C_<ISA> loads the
// library, whose static initializers register the ops above.
#define STEERING_CAT2(a, b) a##b
#define STEERING_CAT(a, b) STEERING_CAT2(a, b)
PyMODINIT_FUNC STEERING_CAT(PyInit_, STEERING_MODULE_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STEERING_STR(STEERING_MODULE_NAME), nullptr, 0,
                                      nullptr};
  return PyModule_Create(&module);
}
