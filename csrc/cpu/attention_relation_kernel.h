// The attention-relation tile kernels (csrc/cpu/attention_relation_kernel.cpp),
// compiled once per CPU capability; csrc/cpu/attention_relation.cpp computes
// a tile of scores (c x_i) · x_j of both models (two GEMMs) and calls the
// variant chosen for this CPU on it, so that the exponentials, three per
// score pair in the forward and two in the backward, run lane-parallel.
#pragma once

#include <cstdint>

#include "../common/attention_relation_op.h"

namespace fastkd {
namespace cpu {

// A tile of rows [first_row, first_row + rows) against keys
// [first_key, first_key + cols) of one (batch element, head).
template <class T>
struct RelationTile {
  const T* scores_s;       // [rows, cols] z_ij = (c_s x_i) · x_j of the student, contiguous
  const T* scores_t;       // [rows, cols] of the teacher
  int64_t rows, cols, first_row, first_key;
  const uint8_t* kept;     // [T] kept positions (as rows and as keys)
  bool causal;             // keys j ≤ i only
  T scale_s, scale_t;      // c = 1 / (√d · τ) of each model (the gradients' chain factor)
};

// The backward's per-row inputs, indexed by the row's position i.
template <class T>
struct RelationRowsBackward {
  const T* lse_s;     // [T, 2] (shift, log l) of the student's rows
  const T* lse_t;     // [T, 2] of the teacher's
  const T* kl;        // [T] the rows' KL
  const T* row_grad;  // [T] upstream gradient of the rows (already divided by A)
  T* grad_s;          // [rows, cols] out: dℓ/d(x_i·x_j) of the student, zero where not kept
  T* grad_t;          // [rows, cols] out: of the teacher
};

#define FASTKD_DECLARE_ATTENTION_RELATION_KERNEL(CAPABILITY)                                              \
  namespace CAPABILITY {                                                                                \
  /* Adds the tile's keys to each kept row's online statistics stats[k] (row first_row + k). */         \
  void relation_tile_statistics(const RelationTile<float>& tile, attention_relation::RelationRow<float>* stats); \
  void relation_tile_statistics(const RelationTile<double>& tile,                                       \
                                attention_relation::RelationRow<double>* stats);                        \
  /* The score gradients of the tile (docs/spec.md §5.3). */                                            \
  void relation_tile_gradients(const RelationTile<float>& tile, const RelationRowsBackward<float>& rows); \
  void relation_tile_gradients(const RelationTile<double>& tile, const RelationRowsBackward<double>& rows); \
  }

FASTKD_DECLARE_ATTENTION_RELATION_KERNEL(DEFAULT)
FASTKD_DECLARE_ATTENTION_RELATION_KERNEL(AVX2)
FASTKD_DECLARE_ATTENTION_RELATION_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
