// SwiGLU hidden of the selected experts for a handful of tokens:
// h[n, j*I + i] = silu(gate_e . x_n) * (up_e . x_n) for e = inds[n, j], reading
// each selected gate and up row once and writing only h (float32). With
// MOE_SHARED defined, the shared expert follows as rows K*I .. K*I+IS of h, and
// one extra SIMD-group per token writes zgate[n] = sigmoid(shared_expert_gate . x_n).
// Needs header moe_qdot. Template: T (x), S (scales/biases), BITS, GS
// (+ ZBITS, ZGS for the shared-expert gate). Threadgroups of two SIMD-groups,
// NR rows per SIMD-group; grid (64 * ceil(blocks / 2), N, 1).
constexpr int NR = 4;
constexpr int PW = 32 / BITS;
const int D = x_shape[1];
const int K = inds_shape[1];
const int I = gw_shape[1];
const uint n = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const int block = int(threadgroup_position_in_grid.x * simdgroups_per_threadgroup
                      + simdgroup_index_in_threadgroup);
const int bps = (I + NR - 1) / NR;
#ifdef MOE_SHARED
const int IS = shg_w_shape[0];
#else
const int IS = 0;
#endif
const int sbps = (IS + NR - 1) / NR;
const int H = K * I + IS;
const auto xn = x + size_t(n) * D;

float g[NR] = {0.0f};
float u[NR] = {0.0f};
int out_row;
int nrows;
if (block < K * bps) {
  const int slot = block / bps;
  const int i0 = (block % bps) * NR;
  nrows = min(NR, I - i0);
  const size_t row = size_t(inds[n * K + slot]) * I + i0;
  qrows_dot<BITS, GS, NR>(xn, D, gw + row * (D / PW), gs + row * (D / GS), gb + row * (D / GS), nrows, lane, g);
  qrows_dot<BITS, GS, NR>(xn, D, uw + row * (D / PW), us + row * (D / GS), ub + row * (D / GS), nrows, lane, u);
  out_row = slot * I + i0;
}
#ifdef MOE_SHARED
else if (block < K * bps + sbps) {
  const int i0 = (block - K * bps) * NR;
  nrows = min(NR, IS - i0);
  const size_t row = size_t(i0);
  qrows_dot<BITS, GS, NR>(xn, D, shg_w + row * (D / PW), shg_s + row * (D / GS), shg_b + row * (D / GS), nrows, lane, g);
  qrows_dot<BITS, GS, NR>(xn, D, shu_w + row * (D / PW), shu_s + row * (D / GS), shu_b + row * (D / GS), nrows, lane, u);
  out_row = K * I + i0;
} else if (block == K * bps + sbps) {
  float z[NR] = {0.0f};
  qrows_dot<ZBITS, ZGS, NR>(xn, D, z_w, z_s, z_b, 1, lane, z);
  const float zsum = simd_sum(z[0]);
  if (lane == 0) {
    zgate[n] = 1.0f / (1.0f + metal::exp(-zsum));
  }
  return;
}
#endif
else {
  return;
}

for (int r = 0; r < NR; ++r) {
  const float gr = simd_sum(g[r]);
  const float ur = simd_sum(u[r]);
  if (lane == 0 && r < nrows) {
    h[size_t(n) * H + out_row + r] = gr / (1.0f + metal::exp(-gr)) * ur;
  }
}
