// Gated delta rule, chunked prefill, pass 1 of 2: everything inside one chunk
// of C tokens that does not depend on the state entering it, for all chunks
// in parallel (one threadgroup of 4 SIMD-groups per chunk and value head).
// With gamma_i the sum of g over [0, i] and D_ij = e^(sum of g over (j, i]):
//   A = strict_tril(beta_i k_i.k_j D_ij),  Tm = (I + A)^-1
//   w = Tm (beta e^gamma K),  u = Tm (beta V)
//   P = tril(Q K^T D),  qp = Q e^gamma - P w,  r = P u
// so that pass 2 (gated_delta_chunk_state) needs only
//   V' = u - w S,  O = qp S + r,  S <- cdec S + (kdec K)^T V'
// with kdec_j = e^(sum of g over (j, C)) and cdec = e^(gamma_(C-1)), written here.
// Every decay is a sum over its own span (see gd_span_decay), so the result is
// exact to float32 rounding at any mix of strong and weak decay.
// Layout, barriers, registers and traffic: metal/README.md. Needs `gated_delta_tiles` as header.
// C, the chunk length, is a template constant (mlx_qwenmoe/ops/gated_delta/chunked.py: CHUNK).
constexpr int NB = C / 8;  // 8-token blocks in a chunk
constexpr int XP = C + 4;  // padded row: a stride of C = 64 words would put a tile's 8 rows in one bank
constexpr int NSG = 4;
// The prefix scans give each of 32 lanes two tokens, and the inverse gives each
// SIMD-group two block columns.
static_assert(C == 2 * 32 && NB == 2 * NSG, "gated_delta_chunk_prep is written for chunks of 64 tokens");
constexpr int NK = Dk / 8;
constexpr int NV = Dv / 8;
threadgroup float X[C][XP];  // A and (I + A)^-1 (see gd_load_tinv), then P
threadgroup float gl[C];
threadgroup float eh[C];
threadgroup float et[C];
threadgroup float eb[NB];
threadgroup float bet[C];
threadgroup float eg[C];

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const GdFrag f = gd_frag(lane);
const int n = threadgroup_position_in_grid.z;  // b * Hv + hv
const int bi = n / Hv;
const int hv = n % Hv;
const int hk = hv / (Hv / Hk);
const int chunk = threadgroup_position_in_grid.y;
const int t0 = chunk * C;
const int rows = T - t0;  // valid rows in this chunk (may exceed C)
const int Tp = ((T + C - 1) / C) * C;
const int KLD = Hk * Dk;
const int VLD = Hv * Dv;
auto qc = q + ((bi * T + t0) * Hk + hk) * Dk;
auto kc = k + ((bi * T + t0) * Hk + hk) * Dk;
auto vc = v + ((bi * T + t0) * Hv + hv) * Dv;
auto gc = g + (bi * T + t0) * Hv + hv;
auto wn = w + (n * Tp + t0) * Dk;
auto un = u + (n * Tp + t0) * Dv;
auto qpn = qp + (n * Tp + t0) * Dk;
auto rn = r + (n * Tp + t0) * Dv;

// Per-token decay factors. Padded rows act as g = 0, beta = 0 (and read
// k = v = 0): they change nothing.
if (tid < C) {
  const int i = tid;
  const int b0 = i / 8 * 8;
  float head = 0.0f;
  for (int m = b0; m <= i; ++m) {
    head += m < rows ? static_cast<float>(gc[m * Hv]) : 0.0f;
  }
  float tail = 0.0f;
  for (int m = i + 1; m < b0 + 8; ++m) {
    tail += m < rows ? static_cast<float>(gc[m * Hv]) : 0.0f;
  }
  gl[i] = i < rows ? static_cast<float>(gc[i * Hv]) : 0.0f;
  bet[i] = i < rows ? static_cast<float>(beta[(bi * T + t0 + i) * Hv + hv]) : 0.0f;
  eh[i] = exp(head);
  et[i] = exp(tail);
  if (i % 8 == 7) {
    eb[i / 8] = exp(head);
  }
}
// Chunk prefix gamma (SIMD-group 0) and suffix sums (SIMD-group 1): one SIMD
// prefix scan each over pairs of tokens, lane l holding tokens 2l, 2l + 1
// (counted from the end for the suffix). Sums of one sign: no cancellation.
if (sg < 2) {
  const int i0 = sg == 0 ? 2 * lane : C - 1 - 2 * lane;
  const int i1 = sg == 0 ? i0 + 1 : i0 - 1;
  const float a = i0 < rows ? static_cast<float>(gc[i0 * Hv]) : 0.0f;
  const float b = i1 < rows ? static_cast<float>(gc[i1 * Hv]) : 0.0f;
  const float before = simd_prefix_exclusive_sum(a + b);
  if (sg == 0) {
    eg[i0] = exp(before + a);
    eg[i1] = exp(before + (a + b));
    if (lane == 31) {
      cdec[n * (Tp / C) + chunk] = exp(before + (a + b));
    }
  } else {
    kdec[n * Tp + t0 + i0] = exp(before);
    kdec[n * Tp + t0 + i1] = exp(before + a);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// A's lower 8x8 tiles: K K^T on the matrix units, scaled in registers; a tile
// per SIMD-group in turn. A diagonal tile is inverted on the spot:
// (I + A_dd)^-1 = (I - A)(I + A^2)(I + A^4) as A_dd^8 = 0.
for (int tile = sg; tile < NB * NB; tile += NSG) {
  const int tr = tile / NB;
  const int tc = tile % NB;
  if (tc > tr) {
    continue;
  }
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.0f);
  for (int kk = 0; kk < NK; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    gd_load(ma, kc + tr * 8 * KLD + kk * 8, KLD, rows - tr * 8, f);
    gd_load_t(mb, kc + tc * 8 * KLD + kk * 8, KLD, rows - tc * 8, f);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  const int i = tr * 8 + f.row;
  for (int e = 0; e < 2; ++e) {
    const int j = tc * 8 + f.col + e;
    acc.thread_elements()[e] = i > j ? bet[i] * acc.thread_elements()[e] * gd_span_decay(i, j, gl, eh, et, eb) : 0.0f;
  }
  if (tc == tr) {
    simdgroup_float8x8 p = acc;
    simdgroup_float8x8 inv;
    inv.thread_elements()[0] = (f.row == f.col ? 1.0f : 0.0f) - acc.thread_elements()[0];
    inv.thread_elements()[1] = (f.row == f.col + 1 ? 1.0f : 0.0f) - acc.thread_elements()[1];
    for (int step = 0; step < 2; ++step) {
      simdgroup_multiply(p, p, p);
      simdgroup_multiply_accumulate(inv, inv, p, inv);
    }
    acc = inv;
  }
  simdgroup_store(acc, &X[tr * 8][tc * 8], XP);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// The tiles of (I + A)^-1 below the diagonal, block row by block row:
//   Tm_rc = -Tm_rr sum_{c <= m < r} A_rm Tm_mc,
// stored transposed at (c, r) so that A's row r stays readable. A SIMD-group owns
// whole block columns (c and 7 - c, which balances the work), so it only reads
// back its own writes: no threadgroup barrier inside.
for (int side = 0; side < 2; ++side) {
  const int c = side == 0 ? int(sg) : NB - 1 - int(sg);
  for (int r = c + 1; r < NB; ++r) {
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.0f);
    for (int m = c; m < r; ++m) {
      simdgroup_float8x8 ma;
      simdgroup_float8x8 mb;
      simdgroup_load(ma, &X[r * 8][m * 8], XP);
      gd_load_tinv(mb, &X[0][0], XP, m, c);
      simdgroup_multiply_accumulate(acc, ma, mb, acc);
    }
    simdgroup_float8x8 diag;
    simdgroup_float8x8 res;
    simdgroup_load(diag, &X[r * 8][r * 8], XP);
    simdgroup_multiply(res, diag, acc);
    gd_scale(res, -1.0f, -1.0f);
    simdgroup_store(res, &X[c * 8][r * 8], XP, ulong2(0, 0), true);
    simdgroup_barrier(mem_flags::mem_threadgroup);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// w = Tm (beta e^gamma K) and u = Tm (beta V); Tm is lower triangular, so
// output row tile tr only needs k-tiles 0..tr.
for (int tile = sg; tile < NB * NK; tile += NSG) {
  const int tr = tile / NK;
  const int tc = tile % NK;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    gd_load_tinv(ma, &X[0][0], XP, tr, kk);
    gd_load(mb, kc + kk * 8 * KLD + tc * 8, KLD, rows - kk * 8, f);
    const float s = bet[kk * 8 + f.row] * eg[kk * 8 + f.row];
    gd_scale(mb, s, s);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  gd_store(acc, wn + tr * 8 * Dk + tc * 8, Dk, C, f);
}
for (int tile = sg; tile < NB * NV; tile += NSG) {
  const int tr = tile / NV;
  const int tc = tile % NV;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    gd_load_tinv(ma, &X[0][0], XP, tr, kk);
    gd_load(mb, vc + kk * 8 * VLD + tc * 8, VLD, rows - kk * 8, f);
    gd_scale(mb, bet[kk * 8 + f.row], bet[kk * 8 + f.row]);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  gd_store(acc, un + tr * 8 * Dv + tc * 8, Dv, C, f);
}
// Tm is dead after this barrier; w and u are read back below by other SIMD-groups.
threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);

// P's lower tiles: Q K^T scaled in registers (D_ii = 1).
for (int tile = sg; tile < NB * NB; tile += NSG) {
  const int tr = tile / NB;
  const int tc = tile % NB;
  if (tc > tr) {
    continue;
  }
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.0f);
  for (int kk = 0; kk < NK; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    gd_load(ma, qc + tr * 8 * KLD + kk * 8, KLD, rows - tr * 8, f);
    gd_load_t(mb, kc + tc * 8 * KLD + kk * 8, KLD, rows - tc * 8, f);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  const int i = tr * 8 + f.row;
  for (int e = 0; e < 2; ++e) {
    const int j = tc * 8 + f.col + e;
    const float d = i > j ? gd_span_decay(i, j, gl, eh, et, eb) : (i == j ? 1.0f : 0.0f);
    acc.thread_elements()[e] *= d;
  }
  simdgroup_store(acc, &X[tr * 8][tc * 8], XP);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// qp = Q e^gamma - P w and r = P u (P lower triangular: k-tiles 0..tr).
for (int tile = sg; tile < NB * NK; tile += NSG) {
  const int tr = tile / NK;
  const int tc = tile % NK;
  simdgroup_float8x8 pw = make_filled_simdgroup_matrix<float, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    simdgroup_load(ma, &X[tr * 8][kk * 8], XP);
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
for (int tile = sg; tile < NB * NV; tile += NSG) {
  const int tr = tile / NV;
  const int tc = tile % NV;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.0f);
  for (int kk = 0; kk <= tr; ++kk) {
    simdgroup_float8x8 ma;
    simdgroup_float8x8 mb;
    simdgroup_load(ma, &X[tr * 8][kk * 8], XP);
    simdgroup_load(mb, un + kk * 8 * Dv + tc * 8, Dv);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  gd_store(acc, rn + tr * 8 * Dv + tc * 8, Dv, C, f);
}
