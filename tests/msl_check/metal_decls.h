// Declarations-only stand-in for what MLX puts in front of a custom kernel
// (<metal_stdlib> through its utils.h/bf16.h), for clang's C++-for-OpenCL front
// end (-fsyntax-only). It declares only what the kernels in metal/ use, with
// Metal's signatures, so that the compiler checks Metal's rules:
//   * address spaces: device/constant/threadgroup/thread are OpenCL's
//     global/constant/local/private, which do not convert into one another
//     (a constant buffer cannot go where a device pointer is expected);
//   * program-scope variables (static data members too) must be `constant`;
//   * no double (fp64 is off), no variable-length arrays, no function pointers;
//   * bfloat converts to and from float only explicitly (MLX >= 0.30 uses the
//     native `bfloat`).
// Nothing here is defined; the check never links or runs.
#pragma once
#pragma OPENCL EXTENSION cl_khr_fp16 : enable  // half is a full type in Metal
// uint3 thread_position_in_grid and friends are class-typed kernel parameters here
#pragma OPENCL EXTENSION __cl_clang_non_portable_kernel_param_types : enable

#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
#define METAL_FUNC inline __attribute__((always_inline))
#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))

// clang runs with -cl-no-stdinc: none of OpenCL's own builtins or types.
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
// Metal's vector types take constructor syntax (ulong2(0, 0)), which clang's
// ext_vector_type does not: small structs with the members and constructors used.
template <typename T, int N>
struct vec;
template <typename T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  constexpr vec(T v) : x(v), y(v) {}
  constexpr vec(T a, T b) : x(a), y(b) {}
};
template <typename T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  constexpr vec(T v) : x(v), y(v), z(v) {}
  constexpr vec(T a, T b, T c) : x(a), y(b), z(c) {}
};
template <typename T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  constexpr vec(T v) : x(v), y(v), z(v), w(v) {}
  constexpr vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
};
#define METAL_VEC(T) typedef vec<T, 2> T##2; typedef vec<T, 3> T##3; typedef vec<T, 4> T##4;
METAL_VEC(float)
METAL_VEC(half)
METAL_VEC(int)
METAL_VEC(uint)
METAL_VEC(short)
METAL_VEC(ushort)
METAL_VEC(char)
METAL_VEC(uchar)
METAL_VEC(long)
METAL_VEC(ulong)
METAL_VEC(bool)
#undef METAL_VEC

typedef char int8_t;
typedef uchar uint8_t;
typedef short int16_t;
typedef ushort uint16_t;
typedef int int32_t;
typedef uint uint32_t;
typedef long int64_t;
typedef ulong uint64_t;

namespace metal {

struct bfloat {
  explicit bfloat(float);
  explicit operator float() const;
};

enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

#define METAL_DECL_MATH1(F) float F(float); half F(half);
METAL_DECL_MATH1(exp)
METAL_DECL_MATH1(exp2)
METAL_DECL_MATH1(log)
METAL_DECL_MATH1(log2)
METAL_DECL_MATH1(rsqrt)
METAL_DECL_MATH1(sqrt)
METAL_DECL_MATH1(fabs)
METAL_DECL_MATH1(abs)
METAL_DECL_MATH1(tanh)
#undef METAL_DECL_MATH1
bool isnan(float);
bool isnan(half);
bool isinf(float);
bool isinf(half);
bool isfinite(float);

#define METAL_DECL_MINMAX(T) T max(T, T); T min(T, T); T clamp(T, T, T);
METAL_DECL_MINMAX(float)
METAL_DECL_MINMAX(half)
METAL_DECL_MINMAX(int)
METAL_DECL_MINMAX(uint)
METAL_DECL_MINMAX(short)
METAL_DECL_MINMAX(ushort)
#undef METAL_DECL_MINMAX
float fma(float, float, float);

#define METAL_DECL_SIMD(T)                                                  \
  T simd_sum(T); T simd_max(T); T simd_min(T); T simd_prefix_inclusive_sum(T); \
  T simd_prefix_exclusive_sum(T); T simd_shuffle(T, ushort);                \
  T simd_shuffle_xor(T, ushort); T simd_shuffle_down(T, ushort);            \
  T simd_shuffle_up(T, ushort); T simd_broadcast(T, ushort);                \
  T simd_broadcast_first(T);
METAL_DECL_SIMD(float)
METAL_DECL_SIMD(half)
METAL_DECL_SIMD(int)
METAL_DECL_SIMD(uint)
#undef METAL_DECL_SIMD

// simdgroup_matrix: only 8x8 is used (Metal's default dimensions); each lane owns
// two elements, reached through thread_elements().
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  typedef T element_t __attribute__((ext_vector_type(2)));
  simdgroup_matrix();
  thread element_t& thread_elements() thread;
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int Cols = 8, int Rows = 8>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T);

// Loads and stores take device or threadgroup memory of the matrix's own element
// type (there is no constant or thread overload).
template <typename T, int C, int R>
void simdgroup_load(thread simdgroup_matrix<T, C, R>&, const device T*, ulong elements_per_row = C,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int C, int R>
void simdgroup_load(thread simdgroup_matrix<T, C, R>&, const threadgroup T*, ulong elements_per_row = C,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int C, int R>
void simdgroup_store(thread const simdgroup_matrix<T, C, R>&, device T*, ulong elements_per_row = C,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int C, int R>
void simdgroup_store(thread const simdgroup_matrix<T, C, R>&, threadgroup T*, ulong elements_per_row = C,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int C, int R>
void simdgroup_multiply(thread simdgroup_matrix<T, C, R>&, thread const simdgroup_matrix<T, C, R>&,
                        thread const simdgroup_matrix<T, C, R>&);
template <typename T, int C, int R>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, C, R>&, thread const simdgroup_matrix<T, C, R>&,
                                   thread const simdgroup_matrix<T, C, R>&, thread const simdgroup_matrix<T, C, R>&);

}  // namespace metal

using namespace metal;  // as MLX's bf16.h does
typedef bfloat bfloat16_t;
typedef half float16_t;
