// Gated delta rule, one token (decode), fused with what surrounds it:
// g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), q/k L2 norm and the
// Dk^-0.5 query scale. Layout, registers and traffic: metal/README.md.
//
// One SIMD-group per (batch, value head, value row dv): lane l holds state
// elements [l * Dk/32, (l+1) * Dk/32) of row dv in registers.
constexpr int NPL = Dk / 32;
const uint lane = thread_position_in_threadgroup.x;
const uint n = thread_position_in_grid.z;  // b * Hv + hv
const uint dv = thread_position_in_grid.y;
const uint bi = n / Hv;
const uint hv = n % Hv;
const uint hk = hv / (Hv / Hk);

const uint qk_off = (bi * Hk + hk) * Dk + lane * NPL;
float qv[NPL];
float kv[NPL];
float qss = 0.0f;
float kss = 0.0f;
for (int i = 0; i < NPL; ++i) {
  qv[i] = static_cast<float>(q[qk_off + i]);
  kv[i] = static_cast<float>(k[qk_off + i]);
  qss += qv[i] * qv[i];
  kss += kv[i] * kv[i];
}
// Every SIMD-group of the head recomputes the norms: Dk reads, cheaper than a
// second dispatch or a threadgroup round trip.
qss = simd_sum(qss);
kss = simd_sum(kss);
const float q_scale = rsqrt(qss + 1e-6f) * rsqrt(float(Dk));
const float k_scale = rsqrt(kss + 1e-6f);

const float x = static_cast<float>(a[n]) + static_cast<float>(dt_bias[hv]);
const float softplus = max(x, 0.0f) + log(1.0f + exp(-fabs(x)));
const float decay = exp(-exp(static_cast<float>(A_log[hv])) * softplus);
const float beta = 1.0f / (1.0f + exp(-static_cast<float>(b[n])));

const uint s_off = (n * Dv + dv) * Dk + lane * NPL;
float s[NPL];
float kv_mem = 0.0f;
for (int i = 0; i < NPL; ++i) {
  kv[i] *= k_scale;
  s[i] = state_in[s_off + i] * decay;
  kv_mem += s[i] * kv[i];
}
kv_mem = simd_sum(kv_mem);
const float delta = (static_cast<float>(v[n * Dv + dv]) - kv_mem) * beta;

float out = 0.0f;
for (int i = 0; i < NPL; ++i) {
  s[i] += kv[i] * delta;
  out += s[i] * qv[i];
  state_out[s_off + i] = s[i];
}
out = simd_sum(out) * q_scale;
if (lane == 0) {
  y[n * Dv + dv] = static_cast<InT>(out);
}
