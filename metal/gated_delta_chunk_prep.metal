// Gated delta rule, chunked prefill, pass 1 of 2: everything inside one chunk
// of 64 tokens that does not depend on the state entering it, for all chunks
// in parallel (one threadgroup of 4 SIMD-groups per chunk and value head).
// With gamma the in-chunk cumulative log decay:
//   A = strict_tril(beta_i k_i.k_j e^(gamma_i - gamma_j)),  Tm = (I + A)^-1
//   w = Tm (beta e^gamma K),  u = Tm (beta V)
//   P = tril(Q K^T e^(gamma_i - gamma_j)),  qp = Q e^gamma - P w,  r = P u
// so that pass 2 (gated_delta_chunk_state) needs only
//   V' = u - w S,  O = qp S + r,  S <- e^gamma_last S + (K e^(gamma_last - gamma))^T V'.
// Layout, registers and traffic: metal/README.md. Needs `gated_delta_tiles` as header.
constexpr int C = 64;
constexpr int NSG = 4;
constexpr int NK = Dk / 8;
constexpr int NV = Dv / 8;
threadgroup float X[C][C];  // A, then Tm, then P
threadgroup float gam[C];
threadgroup float bet[C];
threadgroup float bet_eg[C];
threadgroup float eg[C];

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const GdFrag f = gd_frag(thread_index_in_simdgroup);
const int n = threadgroup_position_in_grid.z;  // b * Hv + hv
const int bi = n / Hv;
const int hv = n % Hv;
const int hk = hv / (Hv / Hk);
const int t0 = threadgroup_position_in_grid.y * C;
const int rows = T - t0;  // valid rows in this chunk (may exceed C)
const int Tp = ((T + C - 1) / C) * C;
const int KLD = Hk * Dk;
const int VLD = Hv * Dv;
auto qc = q + ((bi * T + t0) * Hk + hk) * Dk;
auto kc = k + ((bi * T + t0) * Hk + hk) * Dk;
auto vc = v + ((bi * T + t0) * Hv + hv) * Dv;
auto wn = w + (n * Tp + t0) * Dk;
auto un = u + (n * Tp + t0) * Dv;
auto qpn = qp + (n * Tp + t0) * Dk;
auto rn = r + (n * Tp + t0) * Dv;

// Padded rows act as g = 0, beta = 0 (and read k = v = 0): they change nothing.
if (tid < C) {
  const bool ok = int(tid) < rows;
  gam[tid] = ok ? static_cast<float>(g[(bi * T + t0 + tid) * Hv + hv]) : 0.0f;
  bet[tid] = ok ? static_cast<float>(beta[(bi * T + t0 + tid) * Hv + hv]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid == 0) {
  float acc = 0.0f;
  for (int i = 0; i < C; ++i) {
    acc += gam[i];
    gam[i] = acc;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid < C) {
  eg[tid] = exp(gam[tid]);
  bet_eg[tid] = bet[tid] * eg[tid];
  gamma_out[n * Tp + t0 + tid] = gam[tid];
}

// A's lower 8x8 tiles: K K^T on the matrix units; a tile per SIMD-group in turn.
for (int tile = sg; tile < 64; tile += NSG) {
  const int tr = tile / 8;
  const int tc = tile % 8;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (tc <= tr) {
    for (int kk = 0; kk < NK; ++kk) {
      simdgroup_float8x8 ma;
      simdgroup_float8x8 mb;
      gd_load(ma, kc + tr * 8 * KLD + kk * 8, KLD, rows - tr * 8, f);
      gd_load_t(mb, kc + tc * 8 * KLD + kk * 8, KLD, rows - tc * 8, f);
      simdgroup_multiply_accumulate(acc, ma, mb, acc);
    }
  }
  simdgroup_store(acc, &X[tr * 8][tc * 8], C);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int e = tid; e < C * C; e += NSG * 32) {
  const int i = e / C;
  const int j = e % C;
  X[i][j] = i > j ? bet[i] * X[i][j] * exp(gam[i] - gam[j]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// Tm = (I + A)^-1 by forward substitution, row by row; thread j owns column j:
// Tm_ij = -A_ij - sum_{j<m<i} A_im Tm_mj. Row i of X still holds A while read.
for (int i = 1; i < C; ++i) {
  float val = 0.0f;
  if (int(tid) < i) {
    val = -X[i][tid];
    for (int m = tid + 1; m < i; ++m) {
      val -= X[i][m] * X[m][tid];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (int(tid) < i) {
    X[i][tid] = val;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (tid < C) {
  X[tid][tid] = 1.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// w = Tm (beta e^gamma K) and u = Tm (beta V); Tm is lower triangular, so
// output row tile tr only needs k-tiles 0..tr.
for (int tile = sg; tile < 8 * NK; tile += NSG) {
  const int tr = tile / NK;
  const int tc = tile % NK;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    simdgroup_load(ma, &X[tr * 8][kk * 8], C);
    gd_load(mb, kc + kk * 8 * KLD + tc * 8, KLD, rows - kk * 8, f);
    gd_scale(mb, bet_eg[kk * 8 + f.row], bet_eg[kk * 8 + f.row]);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  gd_store(acc, wn + tr * 8 * Dk + tc * 8, Dk, C, f);
}
for (int tile = sg; tile < 8 * NV; tile += NSG) {
  const int tr = tile / NV;
  const int tc = tile % NV;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    simdgroup_load(ma, &X[tr * 8][kk * 8], C);
    gd_load(mb, vc + kk * 8 * VLD + tc * 8, VLD, rows - kk * 8, f);
    gd_scale(mb, bet[kk * 8 + f.row], bet[kk * 8 + f.row]);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  gd_store(acc, un + tr * 8 * Dv + tc * 8, Dv, C, f);
}
// Tm is dead after this barrier; w and u are read back below by other SIMD-groups.
threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);

for (int tile = sg; tile < 64; tile += NSG) {
  const int tr = tile / 8;
  const int tc = tile % 8;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (tc <= tr) {
    for (int kk = 0; kk < NK; ++kk) {
      simdgroup_float8x8 ma;
      simdgroup_float8x8 mb;
      gd_load(ma, qc + tr * 8 * KLD + kk * 8, KLD, rows - tr * 8, f);
      gd_load_t(mb, kc + tc * 8 * KLD + kk * 8, KLD, rows - tc * 8, f);
      simdgroup_multiply_accumulate(acc, ma, mb, acc);
    }
  }
  simdgroup_store(acc, &X[tr * 8][tc * 8], C);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int e = tid; e < C * C; e += NSG * 32) {
  const int i = e / C;
  const int j = e % C;
  X[i][j] = i >= j ? X[i][j] * exp(gam[i] - gam[j]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// qp = Q e^gamma - P w and r = P u (P lower triangular: k-tiles 0..tr).
for (int tile = sg; tile < 8 * NK; tile += NSG) {
  const int tr = tile / NK;
  const int tc = tile % NK;
  simdgroup_float8x8 pw = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    simdgroup_load(ma, &X[tr * 8][kk * 8], C);
    simdgroup_load(mb, wn + kk * 8 * Dk + tc * 8, Dk);
    simdgroup_multiply_accumulate(pw, ma, mb, pw);
  }
  simdgroup_float8x8 acc;
  gd_load(acc, qc + tr * 8 * KLD + tc * 8, KLD, rows - tr * 8, f);
  gd_scale(acc, eg[tr * 8 + f.row], eg[tr * 8 + f.row]);
  acc.thread_elements()[0] -= pw.thread_elements()[0];
  acc.thread_elements()[1] -= pw.thread_elements()[1];
  gd_store(acc, qpn + tr * 8 * Dk + tc * 8, Dk, C, f);
}
for (int tile = sg; tile < 8 * NV; tile += NSG) {
  const int tr = tile / NV;
  const int tc = tile % NV;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    simdgroup_load(ma, &X[tr * 8][kk * 8], C);
    simdgroup_load(mb, un + kk * 8 * Dv + tc * 8, Dv);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  gd_store(acc, rn + tr * 8 * Dv + tc * 8, Dv, C, f);
}
