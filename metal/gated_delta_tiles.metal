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
