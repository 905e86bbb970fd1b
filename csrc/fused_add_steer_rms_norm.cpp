// CPU implementation of the fused residual add + steering bias + RMSNorm op.
//
//   x = hidden + residual + table[index[t]]      (fp32; index None: row 0)
//   residual_out = x rounded to the activation dtype (to nearest even)
//   y = residual_out * rsqrt(mean(x^2) + eps) * (weight_offset + weight)
//
// weight_offset is 0 for the usual RMSNorm and 1 for Gemma's, which stores w
// and multiplies by 1 + w; the sum is formed in fp32 as the weight is widened.
//
// The schemas live here (TORCH_LIBRARY) so the op exists with or without
// Triton; kernels/fused_add_steer_rms_norm.py adds the CUDA (Triton) kernels,
// the fake kernels and autograd to the same ops.
//
// Each row is read from memory once: the first sweep writes residual_out and
// sums squares, the second reads residual_out back from L1/L2 (a row is at
// most a few tens of KB) and writes y.
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
#include <limits>
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
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, c10::BFloat16> && !std::is_same_v<N, int64_t>) {
      // a full chunk: widen each half straight from memory (zero-extend, shift
      // into the high half), two ops a vector where ATen's loads the whole
      // chunk and extracts the upper half first
      constexpr int64_t W = aVec::size();
      for (int k = 0; k < 2; ++k) {
#if defined(CPU_CAPABILITY_AVX512)
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k * W)));
        out[k] = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * W)));
        out[k] = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#endif
      }
      return;
    }
#endif
    bVec b = n == bVec::size() ? bVec::loadu(p) : bVec::loadu(p, n);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(b);
  }
}

// fp32 -> bf16 bits, round to nearest even, as four integer ops per vector:
// ATen's conversion also tests every lane for NaN and blends (six ops), which
// made the AVX2 forward compute-bound at 0.8x vLLM's truncating op. Exact for
// every finite value, the infinities, and every NaN whose low 16 bits are zero
// (then the rounding increment cannot carry out of the mantissa); callers
// make sure no other NaN reaches it (forward_row).
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512BF16__)
// x's bits plus the increment that rounds it to nearest even: the bf16 is the high half.
inline __m512i rne_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}
inline __m256i bf16_bits_rne(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rne_bits(v), 16)); }
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i rne_bits(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
}
inline __m256i bf16_bits_rne(__m256 lo, __m256 hi) {
  // packus works within 128-bit lanes; the permute puts the four quarters back in order
  const __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(rne_bits(lo), 16), _mm256_srli_epi32(rne_bits(hi), 16));
  return _mm256_permute4x64_epi64(packed, 0xd8);
}
#endif

// kNaNPayloadsClear: the caller guarantees every NaN in `in` has zero low 16
// bits, so bf16 may take the fast rounding above.
template <bool kNaNPayloadsClear = false, typename T, typename N, typename aVec = typename ChunkOf<T>::aVec>
inline void store_chunk(T* p, N n, const aVec* in) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    n == aVec::size() ? in[0].store(p) : in[0].store(p, n);
  } else {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
      // one instruction for 32 values (round to nearest even, NaN-safe)
      const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(in[1], in[0]);
      n == 32 ? _mm512_storeu_si512(p, b) : _mm512_mask_storeu_epi16(p, (__mmask32)((1ull << n) - 1), b);
      return;
#elif defined(CPU_CAPABILITY_AVX512)
      if constexpr (kNaNPayloadsClear) {
        const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_bits_rne(in[0])), bf16_bits_rne(in[1]), 1);
        n == 32 ? _mm512_storeu_si512(p, b) : _mm512_mask_storeu_epi16(p, (__mmask32)((1ull << n) - 1), b);
        return;
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if constexpr (kNaNPayloadsClear) {
        const at::vec::Vectorized<T> b(bf16_bits_rne(in[0], in[1]));
        n == 16 ? b.store(p) : b.store(p, n);
        return;
      }
#endif
    }
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

// The norm weight, as stored (T) or widened once to the accumulation type.
template <typename T, typename WeightT, typename N, typename aVec = typename ChunkOf<T>::aVec>
inline void load_weight_chunk(const WeightT* p, N n, aVec* out) {
  if constexpr (std::is_same_v<WeightT, T>) {
    load_chunk(p, n, out);
  } else {
    load_acc_chunk<T>(p, n, out);
  }
}

// The weight for a run of rows: widened to fp32 once (bf16/fp16, more than
// one row) rather than once per row and sweep, and offset + weight formed
// there when the offset is not 0; fn(pointer) runs the rows.
template <typename T, typename Fn>
void with_row_weight(const T* weight, double offset, int64_t d, int64_t rows, Fn&& fn) {
  using A = acc_t<T>;
  if (offset != 0 || (!std::is_same_v<T, A> && rows > 1)) {
    std::vector<A> widened(d);
    for (int64_t j = 0; j < d; ++j) widened[j] = static_cast<A>(offset) + static_cast<A>(weight[j]);
    fn(static_cast<const A*>(widened.data()));
    return;
  }
  fn(weight);
}

// NaN guards for the fast bf16 rounding (see forward_row): a NaN made the
// canonical one, and the columns of a non-finite row whose table value is NaN
// written again as NaN.
template <typename A>
inline A canonical_nan(A v) {
  return std::isnan(v) ? std::numeric_limits<A>::quiet_NaN() : v;
}

template <typename T>
void rewrite_table_nans(acc_t<T> sum_sq, const acc_t<T>* steer, T* residual_out, int64_t d) {
  if (std::isfinite(sum_sq)) return;
  for (int64_t j = 0; j < d; ++j) {
    if (std::isnan(steer[j])) residual_out[j] = static_cast<T>(std::numeric_limits<acc_t<T>>::quiet_NaN());
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

// The task's next row, prefetched during this row's second sweep: that sweep reads only what the first left in
// cache, so without it the memory system idles there and every row starts with its reads in flight. For bf16 and
// fp16 only: there (arithmetic-bound, half the bytes) it took the AVX2 build from 0.9x to 1.0-1.5x vLLM's speed
// on rows in DRAM; fp32 rows, twice the bytes, ran 5-20% slower with it (not measured why; likely the prefetches'
// load slots and the next row's lines evicting this row's from L1).
template <typename T>
struct NextRow {
  static constexpr bool kEnabled = sizeof(T) == 2;  // a constant, so fp32 rows carry no test per chunk either
  const T* hidden = nullptr;
  const T* residual = nullptr;
  inline void prefetch(int64_t j) const {
    if constexpr (kEnabled) {
      if (hidden == nullptr) return;
      __builtin_prefetch(hidden + j, 0, 2);
      __builtin_prefetch(residual + j, 0, 2);
    }
  }
};

template <typename T>
inline NextRow<T> next_row(const T* hidden, const T* residual, int64_t t, int64_t end, int64_t d) {
  if (!NextRow<T>::kEnabled || t + 1 >= end) return {};
  return {hidden + (t + 1) * d, residual + (t + 1) * d};
}

// One row: sweep 1 writes residual_out = hidden + residual + steer and sums
// its squares in fp32; sweep 2 reads residual_out back (the row is in L1/L2
// now) and writes y. y is computed from residual_out as stored, i.e. rounded
// to T for bf16/fp16, as vLLM's own CPU op and the HF models do, so that y is
// exactly the norm of the residual the next layer sees and no fp32 row buffer
// is needed. The variance uses the unrounded fp32 sum.
//
// NaNs: bf16 stores take the fast rounding, exact for NaNs whose low 16 bits
// are zero. Values widened from bf16 have such NaNs and arithmetic keeps an
// operand's payload (or makes 0x7fc00000), so only a NaN in the fp32 table
// or in rstd could carry other bits: rstd is made the canonical NaN, and a
// row whose sum of squares is not finite gets its table NaNs written again.
//
// flatten: the chunk lambdas, for_each_chunk and at::vec are inlined, so the
// accumulators live in registers and the pointers are not reloaded through
// the closures after every store (without it gcc kept both in memory and the
// AVX2 build ran at half of vLLM's speed).
template <typename T, typename WeightT>
__attribute__((flatten)) acc_t<T> forward_row(const T* hidden, const T* residual, const acc_t<T>* steer,
                                              const WeightT* weight, T* y, T* residual_out, int64_t d, double eps,
                                              const NextRow<T>& next) {
  using A = acc_t<T>;
  using aVec = typename ChunkOf<T>::aVec;
  constexpr int64_t kChunk = ChunkOf<T>::kSize;
  constexpr int kParts = ChunkOf<T>::kParts;
  aVec sq[kSlots][kParts];
  for (auto& slot : sq) std::fill(slot, slot + kParts, aVec(0));
  for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto slot) {
    aVec h[kParts], r[kParts], s[kParts];
    load_chunk(hidden + j, n, h);
    load_chunk(residual + j, n, r);
    load_acc_chunk<T>(steer + j, n, s);
    for (int k = 0; k < kParts; ++k) {
      h[k] = h[k] + r[k] + s[k];
      sq[slot][k] = at::vec::fmadd(h[k], h[k], sq[slot][k]);
    }
    store_chunk<true>(residual_out + j, n, h);
  });
  const A sum_sq = horizontal_sum(sum_slots(sq));
  rewrite_table_nans(sum_sq, steer, residual_out, d);
  const A rstd = canonical_nan(A(1) / std::sqrt(sum_sq / static_cast<A>(d) + static_cast<A>(eps)));
  const aVec rstd_v(rstd);
  for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto) {
    aVec x[kParts], w[kParts];
    load_chunk(residual_out + j, n, x);
    load_weight_chunk<T>(weight + j, n, w);
    for (int k = 0; k < kParts; ++k) x[k] = x[k] * rstd_v * w[k];
    store_chunk<true>(y + j, n, x);
    next.prefetch(j);
  });
  return rstd;
}

// ---------------------------------------------------------------------------
// bf16 rows in even/odd lanes (AVX2, and AVX-512 without BF16 instructions)
//
// Read as 32-bit lanes, a register of 2W bf16 values holds elements 2k (low
// half) and 2k+1 (high half) in lane k. A shift left by 16 makes the even
// elements fp32 and masking off the low halves makes the odd ones fp32: two
// ops for a chunk where widening in order takes four, and the way back is a
// shift and a blend within lanes where packing in order also needs a cross-
// lane permute. The arithmetic is per element, so it may run in this order as
// long as the fp32 operands, the steering row and the weight, are laid out the
// same way (even_odd::layout, once per task and table row). This keeps the
// AVX2 build, which is compute-bound here, at vLLM's speed while it rounds to
// nearest even and adds the vector. A row's tail (under one chunk) keeps the
// natural order in both.
#if (defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512BF16__)) || defined(CPU_CAPABILITY_AVX2)
#define STEERING_BF16_EVEN_ODD 1
namespace even_odd {
#if defined(CPU_CAPABILITY_AVX512)
using ivec = __m512i;
inline ivec load_bits(const void* p) { return _mm512_loadu_si512(p); }
inline void store_bits(void* p, ivec v) { _mm512_storeu_si512(p, v); }
inline __m512 even(ivec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 odd(ivec v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(~0xffff))); }
inline ivec pack(__m512 e, __m512 o) {
  return _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(rne_bits(e), 16), rne_bits(o));
}
#else
using ivec = __m256i;
inline ivec load_bits(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store_bits(void* p, ivec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline __m256 even(ivec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd(ivec v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(~0xffff))); }
inline ivec pack(__m256 e, __m256 o) {
  return _mm256_blend_epi16(_mm256_srli_epi32(rne_bits(e), 16), rne_bits(o), 0xAA);
}
#endif

constexpr int64_t kChunk = ChunkOf<c10::BFloat16>::kSize;  // 2W values a register
constexpr int64_t W = kChunk / 2;
constexpr int64_t kMinRows = 4;  // below this the layout costs more than it saves

// The fp32 lanes of W even and W odd elements of a whole chunk starting at p: bf16 through the shift and
// the mask above, fp32 deinterleaved from two vectors.
inline std::pair<at::vec::Vectorized<float>, at::vec::Vectorized<float>> split_chunk(const c10::BFloat16* p) {
  const ivec v = load_bits(p);
  return {even(v), odd(v)};
}
inline std::pair<at::vec::Vectorized<float>, at::vec::Vectorized<float>> split_chunk(const float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + W);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  return {_mm512_permutex2var_ps(a, evens, b), _mm512_permutex2var_ps(a, odds, b)};
#else
  // within 128-bit lanes, then the quarters back in order
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + W);
  const auto in_order = [](__m256 v) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xd8)); };
  return {in_order(_mm256_shuffle_ps(a, b, 0x88)), in_order(_mm256_shuffle_ps(a, b, 0xdd))};
#endif
}

// dst = offset + src widened to fp32, each whole chunk as its W even then its W odd elements; the tail as is.
// Vectorized: at a few rows a task (decode batches) the layout is a sizeable share of the call.
template <typename S>
void layout(const S* src, float* dst, int64_t d, float offset = 0) {
  using aVec = at::vec::Vectorized<float>;
  const aVec offset_v(offset);
  int64_t j = 0;
  for (; j + kChunk <= d; j += kChunk) {
    auto [e, o] = split_chunk(src + j);
    if (offset != 0) e = offset_v + e, o = offset_v + o;  // not for 0: 0 + -0 is +0
    e.store(dst + j);
    o.store(dst + j + W);
  }
  for (; j < d; ++j) dst[j] = offset != 0 ? offset + static_cast<float>(src[j]) : static_cast<float>(src[j]);
}

// forward_row for bf16 with the steering row and the weight in even/odd layout
// (steer: the table row itself, for the NaN guard).
__attribute__((flatten)) float forward_row(const c10::BFloat16* hidden, const c10::BFloat16* residual,
                                           const float* steer_eo, const float* steer, const float* weight_eo,
                                           c10::BFloat16* y, c10::BFloat16* residual_out, int64_t d, double eps,
                                           const NextRow<c10::BFloat16>& next) {
  using T = c10::BFloat16;
  using aVec = at::vec::Vectorized<float>;
  aVec sq[kSlots][2];
  for (auto& slot : sq) std::fill(slot, slot + 2, aVec(0));
  for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto slot) {
    if constexpr (std::is_same_v<decltype(n), int64_t>) {  // the tail, in natural order
      aVec h[2], r[2], st[2];
      load_chunk(hidden + j, n, h);
      load_chunk(residual + j, n, r);
      load_acc_chunk<T>(steer_eo + j, n, st);
      for (int k = 0; k < 2; ++k) {
        h[k] = h[k] + r[k] + st[k];
        sq[slot][k] = at::vec::fmadd(h[k], h[k], sq[slot][k]);
      }
      store_chunk<true>(residual_out + j, n, h);
    } else {
      const ivec h = load_bits(hidden + j), r = load_bits(residual + j);
      const aVec xe = aVec(even(h)) + aVec(even(r)) + aVec::loadu(steer_eo + j);
      const aVec xo = aVec(odd(h)) + aVec(odd(r)) + aVec::loadu(steer_eo + j + W);
      sq[slot][0] = at::vec::fmadd(xe, xe, sq[slot][0]);
      sq[slot][1] = at::vec::fmadd(xo, xo, sq[slot][1]);
      store_bits(residual_out + j, pack(xe, xo));
    }
  });
  const float sum_sq = horizontal_sum(sum_slots(sq));
  rewrite_table_nans(sum_sq, steer, residual_out, d);
  const float rstd = canonical_nan(1.0f / std::sqrt(sum_sq / static_cast<float>(d) + static_cast<float>(eps)));
  const aVec rstd_v(rstd);
  for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto) {
    if constexpr (std::is_same_v<decltype(n), int64_t>) {
      aVec x[2], w[2];
      load_chunk(residual_out + j, n, x);
      load_acc_chunk<T>(weight_eo + j, n, w);
      for (int k = 0; k < 2; ++k) x[k] = x[k] * rstd_v * w[k];
      store_chunk<true>(y + j, n, x);
    } else {
      const ivec x = load_bits(residual_out + j);
      const aVec ye = aVec(even(x)) * rstd_v * aVec::loadu(weight_eo + j);
      const aVec yo = aVec(odd(x)) * rstd_v * aVec::loadu(weight_eo + j + W);
      store_bits(y + j, pack(ye, yo));
    }
    next.prefetch(j);
  });
  return rstd;
}

// Rows [begin, end) of a task; the steering row is laid out again when the index changes row.
template <typename I>
void forward_rows(const c10::BFloat16* hidden, const c10::BFloat16* residual, const float* table, const I* index,
                  const c10::BFloat16* weight, double weight_offset, c10::BFloat16* y, c10::BFloat16* residual_out,
                  float* rstd_out, int64_t begin, int64_t end, int64_t d, double eps) {
  std::vector<float> weight_eo(d), steer_eo(d);
  layout(weight, weight_eo.data(), d, static_cast<float>(weight_offset));
  int64_t laid_out = -1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t row = table_row(index, t), off = t * d;
    if (row != laid_out) {
      layout(table + row * d, steer_eo.data(), d);
      laid_out = row;
    }
    const float rstd = forward_row(hidden + off, residual + off, steer_eo.data(), table + row * d, weight_eo.data(),
                                   y + off, residual_out + off, d, eps, next_row(hidden, residual, t, end, d));
    if (rstd_out != nullptr) rstd_out[t] = rstd;
  }
}
}  // namespace even_odd
#endif

template <typename T, typename I>
void forward_rows(const T* hidden, const T* residual, const acc_t<T>* table, const I* index, const T* weight,
                  double weight_offset, T* y, T* residual_out, acc_t<T>* rstd_out, int64_t num_tokens, int64_t d,
                  double eps) {
  at::parallel_for(0, num_tokens, grain_rows(d), [&](int64_t begin, int64_t end) {
#ifdef STEERING_BF16_EVEN_ODD
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (end - begin >= even_odd::kMinRows) {
        even_odd::forward_rows(hidden, residual, table, index, weight, weight_offset, y, residual_out, rstd_out, begin,
                               end, d, eps);
        return;
      }
    }
#endif
    with_row_weight(weight, weight_offset, d, end - begin, [&](const auto* w) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t off = t * d;  // int64: T * d can exceed 2^31
        const auto rstd = forward_row(hidden + off, residual + off, table + table_row(index, t) * d, w, y + off,
                                      residual_out + off, d, eps, next_row(hidden, residual, t, end, d));
        if (rstd_out != nullptr) rstd_out[t] = rstd;
      }
    });
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
                    const std::optional<at::Tensor>& index, const at::Tensor& weight, double eps,
                    double weight_offset, at::Tensor& y, at::Tensor& residual_out, const at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_add_steer_rms_norm", [&] {
    dispatch_index(index, [&](auto* idx) {
      forward_rows<scalar_t>(hidden.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                             table.data_ptr<acc_t<scalar_t>>(), idx, weight.data_ptr<scalar_t>(), weight_offset,
                             y.data_ptr<scalar_t>(), residual_out.data_ptr<scalar_t>(), maybe_ptr<scalar_t>(rstd),
                             hidden.size(0), hidden.size(1), eps);
    });
  });
}

// In place: hidden <- y, residual <- residual_out. Within a row every element
// is read before it is written, so the outputs may alias the inputs.
void forward_inplace(at::Tensor& hidden, at::Tensor& residual, const at::Tensor& table,
                     const std::optional<at::Tensor>& index, const at::Tensor& weight, double eps,
                     double weight_offset) {
  check_forward_args(hidden, residual, table, index, weight);
  check_index_range(index, table.size(0));
  launch_forward(hidden, residual, table, index, weight, eps, weight_offset, hidden, residual, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& residual,
                                                      const at::Tensor& table, const std::optional<at::Tensor>& index,
                                                      const at::Tensor& weight, double eps, double weight_offset) {
  check_forward_args(hidden, residual, table, index, weight);
  check_index_range(index, table.size(0));
  auto y = at::empty_like(hidden);
  auto residual_out = at::empty_like(residual);
  auto rstd = at::empty({hidden.size(0)}, table.options());  // accumulation dtype
  launch_forward(hidden, residual, table, index, weight, eps, weight_offset, y, residual_out, rstd);
  return {y, residual_out, rstd};
}

// ---------------------------------------------------------------------------
// backward
//
// With xhat = x * rstd and wdy = (weight_offset + weight) * dy:
//   g = rstd * (wdy - xhat * mean(wdy * xhat)) + d_residual_out
// g is both d_hidden and d_residual. d_table[r] = sum of g over tokens with
// index r, d_weight = sum over tokens of dy * xhat. Both are reduced in two
// stages: a fixed partition of the tokens into parts (it depends on the shapes
// only, never on the thread count), one partial per part, then the parts
// summed in order. No atomics, so the result is bitwise reproducible.

constexpr int64_t kMaxParts = 64;
constexpr int64_t kMinRowsPerPart = 8;  // fewer partials to zero and sum for short inputs
constexpr int64_t kMaxPartialElems = int64_t{1} << 24;  // bounds the partials' memory

int64_t num_parts(int64_t num_tokens, int64_t elems_per_part) {
  int64_t parts = std::clamp<int64_t>((num_tokens + kMinRowsPerPart - 1) / kMinRowsPerPart, 1, kMaxParts);
  return std::min<int64_t>(parts, std::max<int64_t>(1, kMaxPartialElems / std::max<int64_t>(elems_per_part, 1)));
}

// One row of the backward; adds g into table_row and dy * xhat into
// weight_row (this part's partials; either may be null). flatten as in
// forward_row. NaNs in rs and in the row's coefficient are made canonical, so
// every NaN reaching the bf16 store of g has a clean payload (see forward_row).
template <typename T, typename WeightT>
__attribute__((flatten)) void backward_row(const T* dy, const T* dres, const T* x, acc_t<T> rs,
                                           const WeightT* weight, T* g, acc_t<T>* table_row, acc_t<T>* weight_row,
                                           int64_t d) {
  using A = acc_t<T>;
  rs = canonical_nan(rs);
  using aVec = typename ChunkOf<T>::aVec;
  constexpr int64_t kChunk = ChunkOf<T>::kSize, W = ChunkOf<T>::kAccWidth;
  constexpr int kParts = ChunkOf<T>::kParts;
  // sweep 1: dot = sum(weight * dy * x)
  aVec dot[kSlots][kParts];
  for (auto& slot : dot) std::fill(slot, slot + kParts, aVec(0));
  for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto slot) {
    aVec dyv[kParts], xv[kParts], wv[kParts];
    load_chunk(dy + j, n, dyv);
    load_chunk(x + j, n, xv);
    load_weight_chunk<T>(weight + j, n, wv);
    for (int k = 0; k < kParts; ++k) dot[slot][k] = at::vec::fmadd(wv[k] * dyv[k], xv[k], dot[slot][k]);
  });
  // sweep 2 (the row is in L1/L2 now): g = rstd * w * dy - x * (rstd^3 * dot / d) + dres
  const aVec rs_v(rs);
  const aVec coef(canonical_nan(rs * rs * rs * horizontal_sum(sum_slots(dot)) / static_cast<A>(d)));
  for_each_chunk<kChunk>(d, [&](int64_t j, auto n, auto) {
    aVec dyv[kParts], xv[kParts], wv[kParts], gv[kParts], rv[kParts];
    load_chunk(dy + j, n, dyv);
    load_chunk(x + j, n, xv);
    load_weight_chunk<T>(weight + j, n, wv);
    if (dres != nullptr) load_chunk(dres + j, n, rv);
    for (int k = 0; k < kParts; ++k) {
      gv[k] = rs_v * wv[k] * dyv[k] - xv[k] * coef;
      if (dres != nullptr) gv[k] = gv[k] + rv[k];
    }
    store_chunk<true>(g + j, n, gv);
    for (int k = 0; k < kParts; ++k) {
      const int64_t m = std::min<int64_t>(W, n - k * W);
      if (m <= 0) break;
      const int64_t col = j + k * W;
      if (m == W) {
        if (table_row != nullptr) (aVec::loadu(table_row + col) + gv[k]).store(table_row + col);
        if (weight_row != nullptr)
          at::vec::fmadd(dyv[k], xv[k] * rs_v, aVec::loadu(weight_row + col)).store(weight_row + col);
      } else {
        if (table_row != nullptr) (aVec::loadu(table_row + col, m) + gv[k]).store(table_row + col, m);
        if (weight_row != nullptr)
          at::vec::fmadd(dyv[k], xv[k] * rs_v, aVec::loadu(weight_row + col, m)).store(weight_row + col, m);
      }
    }
  });
}

template <typename T, typename I>
void backward_rows(const T* dy, const T* dres, const T* x, const acc_t<T>* rstd, const I* index, const T* weight,
                   double weight_offset, T* g, acc_t<T>* table_partials, acc_t<T>* weight_partials, int64_t num_tokens, int64_t d,
                   int64_t num_rows, int64_t parts) {
  const int64_t rows_per_part = (num_tokens + parts - 1) / parts;
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t p = part_begin; p < part_end; ++p) {
      acc_t<T>* tp = table_partials == nullptr ? nullptr : table_partials + p * num_rows * d;
      acc_t<T>* wp = weight_partials == nullptr ? nullptr : weight_partials + p * d;
      const int64_t t_begin = p * rows_per_part, t_end = std::min(num_tokens, (p + 1) * rows_per_part);
      with_row_weight(weight, weight_offset, d, t_end - t_begin, [&](const auto* w) {
        for (int64_t t = t_begin; t < t_end; ++t) {
          const int64_t off = t * d;
          backward_row(dy + off, dres == nullptr ? nullptr : dres + off, x + off, rstd[t], w, g + off,
                       tp == nullptr ? nullptr : tp + table_row(index, t) * d, wp, d);
        }
      });
    }
  });
}

// out[j] = sum over p, in order, of partials[p, j]. Parts in the outer loop,
// so the inner loop runs along contiguous columns (vectorized); the columns
// are split across threads, which never changes the order of a sum.
template <typename A, typename T>
void sum_parts(const A* partials, int64_t parts, int64_t n, T* out) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(partials + begin, partials + end);
    for (int64_t p = 1; p < parts; ++p) {
      const A* row = partials + p * n + begin;
      for (int64_t j = 0; j < end - begin; ++j) acc[j] += row[j];
    }
    for (int64_t j = begin; j < end; ++j) out[j] = static_cast<T>(acc[j - begin]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y,
                                                       const std::optional<at::Tensor>& grad_residual_out,
                                                       const at::Tensor& residual_out, const at::Tensor& rstd,
                                                       const std::optional<at::Tensor>& index,
                                                       const at::Tensor& weight, int64_t num_table_rows,
                                                       bool table_grad, bool weight_grad, double weight_offset) {
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
                              weight_offset, g.data_ptr<scalar_t>(), maybe_ptr<scalar_t>(table_partials),
                              maybe_ptr<scalar_t>(weight_partials), T, d, num_table_rows, parts);
    });
    if (weight_grad) sum_parts(weight_partials.data_ptr<A>(), parts, d, d_weight.data_ptr<scalar_t>());
    if (table_grad) sum_parts(table_partials.data_ptr<A>(), parts, num_table_rows * d, d_table.data_ptr<A>());
  });
  return {g, d_table, d_weight};
}

// ---------------------------------------------------------------------------
// benchmarks/bench_kernel.py's bandwidth reference: swaps a and b in place,
// row by row, with the forward's threading. It moves exactly the in-place
// forward's bytes the same way (reads both rows, writes both back) and does
// no arithmetic, so time(reference) / time(op) is the op's share of the
// bandwidth this machine gives that access pattern.

template <typename T>
__attribute__((flatten)) void swap_row(T* a, T* b, int64_t d) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kSize = Vec::size();
  int64_t j = 0;
  for (; j + kSize <= d; j += kSize) {
    const Vec x = Vec::loadu(a + j), y = Vec::loadu(b + j);
    y.store(a + j);
    x.store(b + j);
  }
  for (; j < d; ++j) std::swap(a[j], b[j]);
}

void bandwidth_reference_(at::Tensor& a, at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                        a.is_contiguous() && b.is_contiguous(),
                    "bandwidth_reference_: a and b must be contiguous [T, d] tensors of one shape and dtype");
  const int64_t d = a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "bandwidth_reference_", [&] {
    scalar_t* pa = a.data_ptr<scalar_t>();
    scalar_t* pb = b.data_ptr<scalar_t>();
    at::parallel_for(0, a.size(0), grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) swap_row(pa + t * d, pb + t * d, d);
    });
  });
}

#define STEERING_STR2(x) #x
#define STEERING_STR(x) STEERING_STR2(x)

std::string cpu_capability() { return STEERING_STR(STEERING_CPU_ISA); }

}  // namespace

TORCH_LIBRARY(steering, m) {
  m.def(
      "fused_add_steer_rms_norm_(Tensor(a!) hidden, Tensor(b!) residual, Tensor table, Tensor? index, "
      "Tensor weight, float eps, float weight_offset=0.) -> ()");
  m.def(
      "fused_add_steer_rms_norm_fwd(Tensor hidden, Tensor residual, Tensor table, Tensor? index, "
      "Tensor weight, float eps, float weight_offset=0.) -> (Tensor y, Tensor residual_out, Tensor rstd)");
  m.def(
      "fused_add_steer_rms_norm_bwd(Tensor grad_y, Tensor? grad_residual_out, Tensor residual_out, Tensor rstd, "
      "Tensor? index, Tensor weight, int num_table_rows, bool table_grad, bool weight_grad, "
      "float weight_offset=0.) "
      "-> (Tensor grad_input, Tensor grad_table, Tensor grad_weight)");
  m.def("cpu_capability() -> str", &cpu_capability);
  m.def("bandwidth_reference_(Tensor(a!) a, Tensor(b!) b) -> ()");
}

TORCH_LIBRARY_IMPL(steering, CPU, m) {
  m.impl("fused_add_steer_rms_norm_", &forward_inplace);
  m.impl("fused_add_steer_rms_norm_fwd", &forward);
  m.impl("fused_add_steer_rms_norm_bwd", &backward);
  m.impl("bandwidth_reference_", &bandwidth_reference_);
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
