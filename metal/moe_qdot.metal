// Header shared by the MoE expert kernels: dot products of quantized rows with a
// vector, reading MLX's affine layout in place (uint32 words holding 32/BITS
// values, lowest bits first; w = scale * q + bias per group of GS along the
// input dim), so checkpoints stay mlx-lm's.
//
// Decode is bandwidth bound: every weight byte is read once, by one SIMD-group
// that owns NR output rows. Each lane takes two words per step (as MLX's qmv),
// which always lie inside one quantization group because 2 * 32 / BITS divides
// every supported group size (32, 64, 128) for BITS 4 and 8.

// Program-scope data (static members included) must live in the constant
// address space in MSL, as MLX's utils.h and quantized.h write it.
template <int BITS>
struct QLayout {
  static constexpr constant int PER_WORD = 32 / BITS;
  static constexpr constant int VALS = 2 * PER_WORD;  // values per lane per step
  static constexpr constant uint MASK = (1u << BITS) - 1u;
};

// Adds to acc[r] this lane's share of dot(row r, v) for r < nrows.
// w/scales/biases point at row 0; rows are contiguous ((len / PER_WORD) words,
// (len / GS) groups each). The caller simd_sums acc. Pointer types are template
// parameters because mx.fast.metal_kernel binds inputs of fewer than 8 elements
// in the constant address space and larger ones in device.
template <int BITS, int GS, int NR, typename VP, typename WP, typename SP>
METAL_FUNC void qrows_dot(
    VP v,
    int len,
    WP w,
    SP scales,
    SP biases,
    int nrows,
    uint lane,
    thread float* acc) {
  using L = QLayout<BITS>;
  const int words_per_row = len / L::PER_WORD;
  const int groups_per_row = len / GS;
  for (int d0 = int(lane) * L::VALS; d0 < len; d0 += 32 * L::VALS) {
    float vv[L::VALS];
    float vsum = 0.0f;
    for (int i = 0; i < L::VALS; ++i) {
      vv[i] = float(v[d0 + i]);
      vsum += vv[i];
    }
    const int word0 = d0 / L::PER_WORD;
    const int group = d0 / GS;
    for (int r = 0; r < NR; ++r) {
      if (r < nrows) {
        const auto wr = w + r * words_per_row + word0;
        float qsum = 0.0f;
        for (int k = 0; k < 2; ++k) {
          const uint32_t word = wr[k];
          for (int i = 0; i < L::PER_WORD; ++i) {
            qsum += float((word >> (i * BITS)) & L::MASK) * vv[k * L::PER_WORD + i];
          }
        }
        const int g = r * groups_per_row + group;
        acc[r] += float(scales[g]) * qsum + float(biases[g]) * vsum;
      }
    }
  }
}
