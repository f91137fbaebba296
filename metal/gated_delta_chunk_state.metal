// Gated delta rule, chunked prefill, pass 2 of 2: the sequential walk over
// chunks. One threadgroup of 4 SIMD-groups per (batch, value head, DVT-wide
// column block of the state); the state block S (Dk x DVT, float32) lives in
// threadgroup memory for the whole sequence. Per chunk, with w, qp, u, r and
// the decays kdec, cdec from gated_delta_chunk_prep:
//   V' = u - w S;  O = qp S + r;  S <- cdec S + (kdec K)^T V'
// Layout, registers and traffic: metal/README.md. Needs `gated_delta_tiles` as header.
// C, the chunk length, is a template constant (mlx_qwenmoe/ops/gated_delta/chunked.py: CHUNK).
constexpr int NSG = 4;
constexpr int NK = Dk / 8;
constexpr int NJ = DVT / 8;
constexpr int SP = DVT + 4;  // padded row: a stride of 32 words would put a tile's 8 rows in one bank
threadgroup float Sm[Dk][SP];
threadgroup float Vn[C][SP];

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const GdFrag f = gd_frag(thread_index_in_simdgroup);
const int n = threadgroup_position_in_grid.z;  // b * Hv + hv
const int bi = n / Hv;
const int hv = n % Hv;
const int hk = hv / (Hv / Hk);
const int dv0 = threadgroup_position_in_grid.y * DVT;
const int Tp = ((T + C - 1) / C) * C;
const int KLD = Hk * Dk;

// (state is (Dv, Dk) per head: consecutive threads read consecutive dk)
for (int e = tid; e < Dk * DVT; e += NSG * 32) {
  Sm[e % Dk][e / Dk] = state_in[(n * Dv + dv0 + e / Dk) * Dk + e % Dk];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int t0 = 0; t0 < Tp; t0 += C) {
  const int rows = T - t0;
  auto wc = w + (n * Tp + t0) * Dk;
  auto qpc = qp + (n * Tp + t0) * Dk;
  auto uc = u + (n * Tp + t0) * Dv + dv0;
  auto rc = r + (n * Tp + t0) * Dv + dv0;
  auto kc = k + ((bi * T + t0) * Hk + hk) * Dk;
  auto kd = kdec + n * Tp + t0;

  for (int tile = sg; tile < C / 8 * NJ; tile += NSG) {
    const int tr = tile / NJ;
    const int tj = tile % NJ;
    simdgroup_float8x8 ws = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_float8x8 os = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (int kk = 0; kk < NK; ++kk) {
      simdgroup_float8x8 ms;
      simdgroup_float8x8 ma;
      simdgroup_load(ms, &Sm[kk * 8][tj * 8], SP);
      simdgroup_load(ma, wc + tr * 8 * Dk + kk * 8, Dk);
      simdgroup_multiply_accumulate(ws, ma, ms, ws);
      simdgroup_load(ma, qpc + tr * 8 * Dk + kk * 8, Dk);
      simdgroup_multiply_accumulate(os, ma, ms, os);
    }
    simdgroup_float8x8 mu;
    simdgroup_float8x8 mr;
    simdgroup_load(mu, uc + tr * 8 * Dv + tj * 8, Dv);
    simdgroup_load(mr, rc + tr * 8 * Dv + tj * 8, Dv);
    mu.thread_elements()[0] -= ws.thread_elements()[0];
    mu.thread_elements()[1] -= ws.thread_elements()[1];
    mr.thread_elements()[0] += os.thread_elements()[0];
    mr.thread_elements()[1] += os.thread_elements()[1];
    simdgroup_store(mu, &Vn[tr * 8][tj * 8], SP);
    gd_store(mr, y + ((bi * T + t0 + tr * 8) * Hv + hv) * Dv + dv0 + tj * 8, Hv * Dv, rows - tr * 8, f);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Each state tile is read and rewritten by the one SIMD-group that owns it.
  const float d_last = cdec[n * (Tp / C) + t0 / C];
  for (int tile = sg; tile < NK * NJ; tile += NSG) {
    const int ti = tile / NJ;
    const int tj = tile % NJ;
    simdgroup_float8x8 acc;
    simdgroup_load(acc, &Sm[ti * 8][tj * 8], SP);
    gd_scale(acc, d_last, d_last);
    for (int kk = 0; kk < C / 8; ++kk) {
      simdgroup_float8x8 ma;
      simdgroup_float8x8 mb;
      gd_load_t(ma, kc + kk * 8 * KLD + ti * 8, KLD, rows - kk * 8, f);
      gd_scale(ma, kd[kk * 8 + f.col], kd[kk * 8 + f.col + 1]);
      simdgroup_load(mb, &Vn[kk * 8][tj * 8], SP);
      simdgroup_multiply_accumulate(acc, ma, mb, acc);
    }
    simdgroup_store(acc, &Sm[ti * 8][tj * 8], SP);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

for (int e = tid; e < Dk * DVT; e += NSG * 32) {
  state_out[(n * Dv + dv0 + e / Dk) * Dk + e % Dk] = Sm[e % Dk][e / Dk];
}
