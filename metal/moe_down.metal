// Down projection of the selected experts, weighted by the router and summed,
// for a handful of tokens: y[n] = sum_j weights[n, j] * down_{inds[n, j]} h[n, j]
// (+ zgate[n] * shared_down h_shared[n] with MOE_SHARED). Each SIMD-group owns
// NR output rows and loops over the experts, so per-expert outputs stay in
// registers and only y is written. h comes from moe_gate_up.
// Needs header moe_qdot. Template: T (y), S (scales/biases), BITS, GS.
// Threadgroups of two SIMD-groups; grid (64 * ceil(D / (2 * NR)), N, 1).
constexpr int NR = 4;
constexpr int PW = 32 / BITS;
const int D = dw_shape[1];
const int I = dw_shape[2] * PW;
const int K = inds_shape[1];
#ifdef MOE_SHARED
const int IS = shd_w_shape[1] * PW;
#else
const int IS = 0;
#endif
const int H = K * I + IS;
const uint n = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const int d0 = int(threadgroup_position_in_grid.x * simdgroups_per_threadgroup
                   + simdgroup_index_in_threadgroup) * NR;
if (d0 >= D) {
  return;
}
const int nrows = min(NR, D - d0);
const auto hn = h + size_t(n) * H;

float acc[NR] = {0.0f};
for (int j = 0; j < K; ++j) {
  const size_t row = size_t(inds[n * K + j]) * D + d0;
  float part[NR] = {0.0f};
  qrows_dot<BITS, GS, NR>(hn + j * I, I, dw + row * (I / PW), ds + row * (I / GS), db + row * (I / GS), nrows, lane, part);
  const float wj = weights[n * K + j];
  for (int r = 0; r < NR; ++r) {
    acc[r] += wj * part[r];
  }
}
#ifdef MOE_SHARED
{
  float part[NR] = {0.0f};
  const size_t row = size_t(d0);
  qrows_dot<BITS, GS, NR>(hn + K * I, IS, shd_w + row * (IS / PW), shd_s + row * (IS / GS), shd_b + row * (IS / GS), nrows, lane, part);
  const float zn = zgate[n];
  for (int r = 0; r < NR; ++r) {
    acc[r] += zn * part[r];
  }
}
#endif

for (int r = 0; r < NR; ++r) {
  const float yr = simd_sum(acc[r]);
  if (lane == 0 && r < nrows) {
    y[size_t(n) * D + d0 + r] = T(yr);
  }
}
