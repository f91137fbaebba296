// Router for a handful of tokens: softmax over E experts, top-K, weights
// (renormalised over the K when NORM), in one SIMD-group per token.
// Replaces softmax + argpartition + gather + sum + divide (five dispatches).
// Template: T (logits), E, K, NORM. Grid (32, N, 1), threadgroup (32, 1, 1).
// Outputs are in descending weight order; ties go to the lower expert id.
// NaN logits count as -inf; an expert with a -inf logit can still be picked
// (lowest id first) but gets weight 0, so every id is in [0, E) whatever the
// logits hold: the expert kernels index weights by these ids.
constexpr int PER = (E + 31) / 32;
const uint n = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;

float v[PER];
float m = -INFINITY;
for (int p = 0; p < PER; ++p) {
  const uint e = uint(p) * 32 + lane;
  const float x = e < uint(E) ? float(logits[n * E + e]) : -INFINITY;
  v[p] = isnan(x) ? -INFINITY : x;
  m = max(m, v[p]);
}
m = simd_max(m);
// All logits -inf: every weight is 0 (exp(-inf - -inf) would be NaN).
const bool any_finite = m > -INFINITY;
float total = 0.0f;
for (int p = 0; p < PER; ++p) {
  total += any_finite ? metal::exp(v[p] - m) : 0.0f;
}
total = simd_sum(total);

// Every lane ends with the same top-K list: each round is a SIMD-wide argmax
// over the experts not taken yet (bit p of `taken` marks expert p * 32 + lane).
float top_p[K];
uint top_e[K];
float top_sum = 0.0f;
uint taken = 0u;
for (int k = 0; k < K; ++k) {
  float best = -INFINITY;
  uint best_e = 0xFFFFFFFFu;
  for (int p = 0; p < PER; ++p) {
    const uint e = uint(p) * 32 + lane;
    if (e < uint(E) && !(taken & (1u << p)) && (best_e == 0xFFFFFFFFu || v[p] > best)) {
      best = v[p];
      best_e = e;
    }
  }
  const float win = simd_max(best);
  const uint win_e = simd_min(best == win ? best_e : 0xFFFFFFFFu);
  for (int p = 0; p < PER; ++p) {
    if (uint(p) * 32 + lane == win_e) {
      taken |= 1u << p;
    }
  }
  top_p[k] = win > -INFINITY ? metal::exp(win - m) : 0.0f;
  top_e[k] = win_e;
  top_sum += top_p[k];
}

if (lane == 0) {
  const float denom = NORM ? top_sum : total;
  for (int k = 0; k < K; ++k) {
    weights[n * K + k] = denom > 0.0f ? top_p[k] / denom : 0.0f;
    inds[n * K + k] = top_e[k];
  }
}
