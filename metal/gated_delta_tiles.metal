// Header shared by the chunked gated-delta kernels (passed as `header=`).
//
// 8x8 simdgroup_matrix fragments are filled and drained through
// thread_elements() with the lane layout of MLX's steel BaseMMAFrag: each lane
// owns two adjacent elements of one row. Going element-wise instead of
// simdgroup_load lets a tile come from any input type (bfloat, half, float),
// be cut off at the end of the sequence, and be scaled on the way in.

struct GdFrag {
  short row;  // row of both elements this lane owns
  short col;  // the first of its two adjacent columns
};

inline GdFrag gd_frag(ushort lane) {
  const short qid = lane / 4;
  GdFrag f;
  f.row = (qid & 4) + ((lane / 2) % 4);
  f.col = (qid & 2) * 2 + (lane % 2) * 2;
  return f;
}

// Tile whose top-left is src (row stride ld); rows at or past rows_left read 0.
template <typename E>
inline void gd_load(thread simdgroup_float8x8& m, const device E* src, int ld, int rows_left, GdFrag f) {
  const bool ok = f.row < rows_left;
  m.thread_elements()[0] = ok ? static_cast<float>(src[f.row * ld + f.col]) : 0.0f;
  m.thread_elements()[1] = ok ? static_cast<float>(src[f.row * ld + f.col + 1]) : 0.0f;
}

// Transpose of the tile at src: element (i, j) = src[j * ld + i]; source rows
// at or past rows_left read 0.
template <typename E>
inline void gd_load_t(thread simdgroup_float8x8& m, const device E* src, int ld, int rows_left, GdFrag f) {
  m.thread_elements()[0] = f.col < rows_left ? static_cast<float>(src[f.col * ld + f.row]) : 0.0f;
  m.thread_elements()[1] = f.col + 1 < rows_left ? static_cast<float>(src[(f.col + 1) * ld + f.row]) : 0.0f;
}

// Store a tile at dst (row stride ld), skipping rows at or past rows_left.
template <typename E>
inline void gd_store(thread simdgroup_float8x8& m, device E* dst, int ld, int rows_left, GdFrag f) {
  if (f.row < rows_left) {
    dst[f.row * ld + f.col] = static_cast<E>(m.thread_elements()[0]);
    dst[f.row * ld + f.col + 1] = static_cast<E>(m.thread_elements()[1]);
  }
}

inline void gd_scale(thread simdgroup_float8x8& m, float s0, float s1) {
  m.thread_elements()[0] *= s0;
  m.thread_elements()[1] *= s1;
}

// e^(sum of g over the tokens (j, i]) for j < i, from per-token factors that are each
// a sum over their own span: never the difference of two cumulative sums, which
// cancels when a strong and a weak decay share a chunk. Within one 8-token block
// the span is summed from g; across blocks it is e^(rest of j's block) x e^(each
// whole block between) x e^(i's block up to i):
//   gl: g per token; eh: e^(sum g over [block start, i]); et: e^(sum g over (j, block end]);
//   eb: e^(sum g over block b).
inline float gd_span_decay(int i, int j, const threadgroup float* gl, const threadgroup float* eh,
                           const threadgroup float* et, const threadgroup float* eb) {
  if (i / 8 == j / 8) {
    float s = 0.0f;
    for (int m = j + 1; m <= i; ++m) {
      s += gl[m];
    }
    return exp(s);
  }
  float d = et[j] * eh[i];
  for (int b = j / 8 + 1; b < i / 8; ++b) {
    d *= eb[b];
  }
  return d;
}

// Tile (r, c), c <= r, of the unit lower-triangular inverse held in x (row stride ld):
// diagonal tiles in place, the tiles below them transposed into the upper triangle.
inline void gd_load_tinv(thread simdgroup_float8x8& m, const threadgroup float* x, int ld, int r, int c) {
  if (r == c) {
    simdgroup_load(m, x + r * 8 * ld + c * 8, ld);
  } else {
    simdgroup_load(m, x + c * 8 * ld + r * 8, ld, ulong2(0, 0), true);
  }
}
