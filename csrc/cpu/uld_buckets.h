// The float32 row of fastkd::uld_forward on the CPU without a full sort.
//
// For non-negative a (n_a entries) and b (n_b entries), sorted decreasing and
// zero-padded to one length, the sorted L1 distance is the area between the
// two counting functions:
//   Σ_k |a_k − b_k| = ∫_0^∞ |D(x)| dx,   D(x) = #{a > x} − #{b > x}.
// Cut [0, ∞) into value buckets [lo, hi) by the top bits of the float's bit
// pattern (the bits of a float ≥ 0 order like its value). Let D0 = D(hi) be
// the difference of the counts above a bucket, c_a and c_b its entries. Inside
// the bucket D(x) = D0 + α(x) − β(x) with 0 ≤ α ≤ c_a, 0 ≤ β ≤ c_b, so when
// D0 ≥ c_b (or D0 ≤ −c_a) D keeps one sign s there and
//   ∫_lo^hi |D| = s (D0 (hi − lo) + Σ_a (a − lo) − Σ_b (b − lo)),
// from the bucket's counts and sums alone. The rank-count gradient
// coefficient (uld.cpp's header) of every entry of such a bucket is the same
// sign too: +s for a's entries, −s for b's. Only the other buckets, where D
// can change sign, need their entries in order: those entries are gathered,
// radix-sorted and walked value by value. Two different distributions cross
// in few buckets, so a row usually costs a few sequential passes instead of
// two radix sorts; two equal rows cross everywhere and cost one sort of each.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace fastkd {
namespace cpu {
namespace uld_buckets {

// 8 exponent and 8 mantissa bits: buckets 1/256 of an octave wide, fine
// enough that two rows of 10⁵ entries cross in few of them. Only the buckets
// between a row pair's smallest and largest value get table entries.
constexpr int kShift = 15;

inline uint32_t bits_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

inline float float_of(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// the bucket of a finite v ≥ 0 (a probability); −0 has the sign bit set, so it is cleared
inline uint32_t bucket_of(float v) { return (bits_of(v) & 0x7FFFFFFFu) >> kShift; }

// the bucket's lower edge; its upper edge is the next bucket's lower edge
// (+inf above the largest finite floats)
inline double bucket_low(uint32_t bucket) { return static_cast<double>(float_of(bucket << kShift)); }

// LSD radix sort of packed (~bits(value) << 32 | column) keys on their upper
// 32 bits, three passes of 11 bits (a pass skipped when every key shares its
// digit); returns the buffer holding the keys sorted by decreasing value.
inline uint64_t* radix_sort_descending(uint64_t* keys, uint64_t* swap, int64_t n) {
  constexpr int kBits = 11;
  constexpr uint64_t kDigits = uint64_t(1) << kBits;
  if (n < 2) return keys;
  std::vector<int64_t> count(kDigits);
  uint64_t* from = keys;
  uint64_t* to = swap;
  for (int shift = 32; shift < 64; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t j = 0; j < n; ++j) ++count[(from[j] >> shift) & (kDigits - 1)];
    if (count[(from[0] >> shift) & (kDigits - 1)] == n) continue;
    int64_t total = 0;
    for (uint64_t d = 0; d < kDigits; ++d) {
      const int64_t c = count[d];
      count[d] = total;
      total += c;
    }
    for (int64_t j = 0; j < n; ++j) to[count[(from[j] >> shift) & (kDigits - 1)]++] = from[j];
    std::swap(from, to);
  }
  return from;
}

inline uint64_t sort_key(float v, int64_t column) {
  return (static_cast<uint64_t>(~bits_of(v)) << 32) | static_cast<uint32_t>(column);
}
inline float key_value(uint64_t key) { return float_of(~static_cast<uint32_t>(key >> 32)); }
inline int32_t key_column(uint64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }

inline void bucket_range(const float* x, int64_t n, uint32_t& low, uint32_t& high) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bucket = bucket_of(x[j]);
    low = std::min(low, bucket);
    high = std::max(high, bucket);
  }
}

// Per-thread scratch of one side (a or b) of a row; tables indexed by
// bucket − base.
struct Side {
  std::vector<int64_t> count;
  std::vector<double> sum;
  std::vector<float> coefficient;     // per bucket; NaN: resolved entry by entry
  std::vector<uint64_t> keys, swap;  // entries of the unresolved buckets

  void histogram(const float* x, int64_t n, uint32_t base, uint32_t buckets) {
    count.assign(buckets, 0);
    sum.assign(buckets, 0.0);
    coefficient.resize(buckets);
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t bucket = bucket_of(x[j]) - base;
      ++count[bucket];
      sum[bucket] += static_cast<double>(x[j]);
    }
  }

  // coef[j] = the bucket's coefficient, and the entries of unresolved buckets
  // gathered and sorted; returns the sorted keys (keys.size() of them).
  const uint64_t* spread(const float* x, int64_t n, uint32_t base, float* coef) {
    keys.clear();
    for (int64_t j = 0; j < n; ++j) {
      const float g = coefficient[bucket_of(x[j]) - base];
      if (coef != nullptr) coef[j] = g;
      if (g != g) keys.push_back(sort_key(x[j], j));
    }
    swap.resize(keys.size());
    return radix_sort_descending(keys.data(), swap.data(), static_cast<int64_t>(keys.size()));
  }
};

// |diff| · length; 0 where diff = 0, also over the top bucket's infinite width
inline double area(int64_t diff, double length) {
  return diff == 0 ? 0.0 : std::abs(static_cast<double>(diff)) * length;
}

// The coefficient (uld.cpp's rank-count formula) of a run of n equal entries
// of one side, given the difference `above` = #{own > v} − #{other > v} and
// the number `other_equal` of the other side's entries equal to v.
inline float run_coefficient(int64_t above, int64_t n, int64_t other_equal) {
  const int64_t below = std::clamp<int64_t>(above + n - other_equal, 0, n);
  const int64_t over = std::clamp<int64_t>(-above, 0, n);
  return static_cast<float>(static_cast<double>(below - over) / static_cast<double>(n));
}

// Σ_k |sort↓(a)_k − sort↓(b)_k| (zero-padded) of two finite non-negative
// rows in float64, and, when coef_a / coef_b are not null, every entry's
// gradient coefficient.
inline double sorted_l1(const float* a, int64_t n_a, const float* b, int64_t n_b, Side& side_a, Side& side_b,
                        float* coef_a, float* coef_b) {
  const float unresolved = std::numeric_limits<float>::quiet_NaN();
  uint32_t low = std::numeric_limits<uint32_t>::max(), high = 0;
  bucket_range(a, n_a, low, high);
  bucket_range(b, n_b, low, high);
  side_a.histogram(a, n_a, low, high - low + 1);
  side_b.histogram(b, n_b, low, high - low + 1);
  // walk down the buckets: the closed form where D keeps its sign, and the
  // D0 at the top of each other bucket for the exact walk below
  std::vector<std::pair<uint32_t, int64_t>> crossings;
  double total = 0;
  int64_t d = 0;
  for (uint32_t bucket = high + 1; bucket-- > low;) {
    const int64_t ca = side_a.count[bucket - low], cb = side_b.count[bucket - low];
    const double lo = bucket_low(bucket), width = bucket_low(bucket + 1) - lo;
    if (d >= cb || d <= -ca) {
      const double s = d >= cb ? 1.0 : -1.0;
      total += s * (s * area(d, width) + (side_a.sum[bucket - low] - static_cast<double>(ca) * lo) -
                    (side_b.sum[bucket - low] - static_cast<double>(cb) * lo));
      side_a.coefficient[bucket - low] = static_cast<float>(s);
      side_b.coefficient[bucket - low] = static_cast<float>(-s);
    } else {
      crossings.emplace_back(bucket, d);
      side_a.coefficient[bucket - low] = side_b.coefficient[bucket - low] = unresolved;
    }
    d += ca - cb;
  }
  total += area(d, bucket_low(low));  // [0, lowest bucket): D = n_a − n_b
  const uint64_t* sa = side_a.spread(a, n_a, low, coef_a);
  const uint64_t* sb = side_b.spread(b, n_b, low, coef_b);
  const int64_t ea = static_cast<int64_t>(side_a.keys.size()), eb = static_cast<int64_t>(side_b.keys.size());
  int64_t ia = 0, ib = 0;
  for (const auto& [bucket, d0] : crossings) {
    // the bucket's entries, value by value: D changes at each, and a run's
    // coefficient comes from the counts above it
    double x = bucket_low(bucket + 1);
    int64_t diff = d0;  // #{a > v} − #{b > v}
    while ((ia < ea && bucket_of(key_value(sa[ia])) == bucket) || (ib < eb && bucket_of(key_value(sb[ib])) == bucket)) {
      const float va = ia < ea && bucket_of(key_value(sa[ia])) == bucket ? key_value(sa[ia]) : -1.0f;
      const float vb = ib < eb && bucket_of(key_value(sb[ib])) == bucket ? key_value(sb[ib]) : -1.0f;
      const float v = std::max(va, vb);
      total += area(diff, x - static_cast<double>(v));
      int64_t na = 0, nb = 0;
      while (ia + na < ea && key_value(sa[ia + na]) == v) ++na;
      while (ib + nb < eb && key_value(sb[ib + nb]) == v) ++nb;
      if (coef_a != nullptr && na > 0) {
        const float g = run_coefficient(diff, na, nb);
        for (int64_t r = ia; r < ia + na; ++r) coef_a[key_column(sa[r])] = g;
      }
      if (coef_b != nullptr && nb > 0) {
        const float g = run_coefficient(-diff, nb, na);
        for (int64_t r = ib; r < ib + nb; ++r) coef_b[key_column(sb[r])] = g;
      }
      ia += na;
      ib += nb;
      diff += na - nb;
      x = static_cast<double>(v);
    }
    total += area(diff, x - bucket_low(bucket));
  }
  return total;
}

}  // namespace uld_buckets
}  // namespace cpu
}  // namespace fastkd
