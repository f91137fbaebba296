// Router for a handful of tokens: softmax over E experts, top-K, weights
// (renormalised over the K when NORM), in one SIMD-group per token.
// Replaces softmax + argpartition + gather + sum + divide (five dispatches).
// Template: T (logits), E, K, NORM. Grid (32, N, 1), threadgroup (32, 1, 1).
// Outputs are in descending weight order; ties go to the lower expert id.
constexpr int PER = (E + 31) / 32;
const uint n = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;

float v[PER];
float m = -INFINITY;
for (int p = 0; p < PER; ++p) {
  const uint e = uint(p) * 32 + lane;
  v[p] = e < uint(E) ? float(logits[n * E + e]) : -INFINITY;
  m = max(m, v[p]);
}
m = simd_max(m);
float total = 0.0f;
for (int p = 0; p < PER; ++p) {
  total += metal::exp(v[p] - m);
}
total = simd_sum(total);

// Every lane ends with the same top-K list: each round is a SIMD-wide argmax.
float top_p[K];
uint top_e[K];
float top_sum = 0.0f;
for (int k = 0; k < K; ++k) {
  float best = -INFINITY;
  uint best_e = 0xFFFFFFFFu;
  for (int p = 0; p < PER; ++p) {
    if (v[p] > best) {
      best = v[p];
      best_e = uint(p) * 32 + lane;
    }
  }
  const float win = simd_max(best);
  const uint win_e = simd_min(best == win ? best_e : 0xFFFFFFFFu);
  for (int p = 0; p < PER; ++p) {
    if (uint(p) * 32 + lane == win_e) {
      v[p] = -INFINITY;
    }
  }
  top_p[k] = metal::exp(win - m);
  top_e[k] = win_e;
  top_sum += top_p[k];
}

if (lane == 0) {
  const float denom = NORM ? top_sum : total;
  for (int k = 0; k < K; ++k) {
    weights[n * K + k] = top_p[k] / denom;
    inds[n * K + k] = top_e[k];
  }
}
