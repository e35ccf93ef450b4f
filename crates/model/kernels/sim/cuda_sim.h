// A CPU stand-in for the slice of CUDA the project's kernels use, so the CPU test suite can
// run them: every CUDA thread of a block is a std::thread, __syncthreads a std::barrier, and
// blocks run one after another (so `__shared__` arrays can be plain statics). Warp shuffles
// exchange through memory between two block-wide barriers, so kernels must call them
// uniformly across the block, which the project's kernels do. WMMA fragments hold the whole
// 16×16 tile in every lane; only lane 0 stores, and the kernels read stores only after a
// __syncthreads. bf16 conversions round to nearest even, as the hardware does.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

struct SimDim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local SimDim3 threadIdx;
inline thread_local SimDim3 blockIdx;
inline SimDim3 blockDim;
inline SimDim3 gridDim;
inline std::barrier<>* sim_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> sim_warp_barriers;
inline std::vector<unsigned char> sim_dynamic_shared;
inline float sim_exchange[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define DYNAMIC_SHARED_BYTES(name) unsigned char* name = sim_dynamic_shared.data()
#define __expf expf

using std::min;
using std::max;

inline void __syncthreads() { sim_barrier->arrive_and_wait(); }

// WMMA calls are warp-uniform, so they may wait for their own warp.
inline void sim_syncwarp() { sim_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned t = threadIdx.x;
    sim_exchange[t] = v;
    __syncthreads();
    const float other = sim_exchange[t ^ (unsigned)lane_mask];
    __syncthreads();
    return other;
}

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
    u += 0x7fff + ((u >> 16) & 1);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

struct uint4 {
    unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    float x[16 * 16];  // element (r, c) of the 16×16 tile at x[r * 16 + c]
};

inline float sim_value(float v) { return v; }
inline float sim_value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout, typename Src>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const Src* p, unsigned ldm) {
    const bool row_major_layout = std::is_same<Layout, row_major>::value;
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = sim_value(row_major_layout ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
    sim_syncwarp();  // every lane has loaded what this store may overwrite
    if (threadIdx.x % 32 == 0)
        for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
                (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
    sim_syncwarp();
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
    for (float& e : f.x) e = v;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
    float result[16 * 16];
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 16; ++col) {
            float sum = c.x[r * 16 + col];
            for (int k = 0; k < 16; ++k) sum += a.x[r * 16 + k] * b.x[k * 16 + col];
            result[r * 16 + col] = sum;
        }
    std::memcpy(d.x, result, sizeof(result));
}
}  // namespace wmma
}  // namespace nvcuda

// Runs `kernel(args...)` over `grid` blocks of `block` threads with `dynamic_shared` bytes.
template <typename Kernel, typename... Args>
void sim_launch(SimDim3 grid, SimDim3 block, size_t dynamic_shared, Kernel kernel,
                Args... args) {
    gridDim = grid;
    blockDim = block;
    sim_dynamic_shared.assign(dynamic_shared + 16, 0xff);  // poisoned, like fresh device memory
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::barrier<> barrier((std::ptrdiff_t)threads);
                sim_barrier = &barrier;
                sim_warp_barriers.clear();
                for (unsigned w = 0; w < (threads + 31) / 32; ++w)
                    sim_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([=] {
                        threadIdx = SimDim3{t, 0, 0};
                        blockIdx = SimDim3{x, y, z};
                        kernel(args...);
                    });
                for (auto& th : pool) th.join();
            }
}
