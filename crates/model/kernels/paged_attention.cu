// Attention of short query runs (decode steps, small prefill chunks) that reads keys and
// values where they lie in the paged KV cache, through each sequence's block table: no copy
// of any context, so decode stays bound by the cache reads it needs anyway.
//
// One CUDA block per (query, head), PAGED_THREADS threads. The warps share the context's
// positions round-robin: first the scores (a few keys per warp at a time, lanes across the head
// dimension), kept in dynamic shared memory (4 bytes per position); then a block-wide softmax;
// then the weighted sum of values, again one position per warp at a time, lanes across the
// head dimension, the warps' partial sums added at the end.
#include "common.cuh"

#define PAGED_THREADS 128
#define PAGED_WARPS (PAGED_THREADS / 32)
#define PAGED_MAX_HEAD_DIM 256
#define PAGED_DIMS_PER_LANE (PAGED_MAX_HEAD_DIM / 32)
#define PAGED_KEYS_PER_WARP 4

template <typename T>
__device__ void paged_attention(
    T* __restrict__ out,                     // [rows, heads, head_dim]; only listed rows written
    const T* __restrict__ q,                 // [rows, heads, head_dim]
    const T* __restrict__ k_cache,           // [slots, kv_heads, head_dim]
    const T* __restrict__ v_cache,           // [slots, kv_heads, head_dim]
    const uint32_t* __restrict__ block_tables,  // all sequences' tables, concatenated
    const uint32_t* __restrict__ query_rows,    // [queries]: row of q and out
    const uint32_t* __restrict__ context_lens,  // [queries]: positions 0..len are attended
    const uint32_t* __restrict__ table_starts,  // [queries]: where its table starts
    int heads, int kv_heads, int head_dim, int block_size, float scale) {
    const int head = blockIdx.x;
    const int query = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t row = query_rows[query];
    const int context = (int)context_lens[query];
    const uint32_t* table = block_tables + table_starts[query];
    const int kv_head = head / (heads / kv_heads);
    const size_t slot_stride = (size_t)kv_heads * head_dim;

    DYNAMIC_SHARED_BYTES(dynamic_shared);
    float* scores = reinterpret_cast<float*>(dynamic_shared);  // [context]
    __shared__ float query_vec[PAGED_MAX_HEAD_DIM];
    __shared__ float partial_out[PAGED_WARPS][PAGED_MAX_HEAD_DIM];
    __shared__ float scratch[PAGED_WARPS];

    const T* q_row = q + (row * heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += PAGED_THREADS)
        query_vec[d] = to_float(q_row[d]) * scale;
    __syncthreads();

    // Each warp scores PAGED_KEYS_PER_WARP positions per round, their loads independent so
    // they are in flight together. Every warp runs the same number of rounds so the shuffles
    // stay block-uniform.
    for (int base = 0; base < context; base += PAGED_WARPS * PAGED_KEYS_PER_WARP) {
        float partial[PAGED_KEYS_PER_WARP];
        for (int u = 0; u < PAGED_KEYS_PER_WARP; ++u) {
            const int pos = base + u * PAGED_WARPS + warp;
            partial[u] = 0.f;
            if (pos < context) {
                const size_t slot =
                    (size_t)table[pos / block_size] * block_size + pos % block_size;
                const T* key = k_cache + slot * slot_stride + (size_t)kv_head * head_dim;
                for (int d = lane; d < head_dim; d += 32)
                    partial[u] += query_vec[d] * to_float(key[d]);
            }
        }
        for (int u = 0; u < PAGED_KEYS_PER_WARP; ++u) {
            const int pos = base + u * PAGED_WARPS + warp;
            const float score = warp_sum(partial[u]);
            if (pos < context && lane == 0) scores[pos] = score;
        }
    }
    __syncthreads();

    float local_max = -INFINITY;
    for (int pos = threadIdx.x; pos < context; pos += PAGED_THREADS)
        local_max = fmaxf(local_max, scores[pos]);
    const float max_score = block_max(local_max, scratch);
    float local_sum = 0.f;
    for (int pos = threadIdx.x; pos < context; pos += PAGED_THREADS) {
        const float e = __expf(scores[pos] - max_score);
        scores[pos] = e;
        local_sum += e;
    }
    const float inv_sum = 1.f / block_sum(local_sum, scratch);  // also orders the writes above

    float acc[PAGED_DIMS_PER_LANE];
    for (int i = 0; i < PAGED_DIMS_PER_LANE; ++i) acc[i] = 0.f;
    for (int pos = warp; pos < context; pos += PAGED_WARPS) {
        const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        const T* value = v_cache + slot * slot_stride + (size_t)kv_head * head_dim;
        const float weight = scores[pos];
        for (int i = 0; i < PAGED_DIMS_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] += weight * to_float(value[d]);
        }
    }
    for (int i = 0; i < PAGED_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) partial_out[warp][d] = acc[i];
    }
    __syncthreads();
    T* out_row = out + (row * heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += PAGED_THREADS) {
        float total = 0.f;
        for (int w = 0; w < PAGED_WARPS; ++w) total += partial_out[w][d];
        out_row[d] = from_float<T>(total * inv_sum);
    }
}

#define PAGED_ATTENTION_ENTRY(NAME, T)                                                          \
    extern "C" __global__ void NAME(                                                            \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* block_tables,  \
        const uint32_t* query_rows, const uint32_t* context_lens, const uint32_t* table_starts, \
        int heads, int kv_heads, int head_dim, int block_size, float scale) {                   \
        paged_attention<T>(out, q, k_cache, v_cache, block_tables, query_rows, context_lens,   \
                           table_starts, heads, kv_heads, head_dim, block_size, scale);        \
    }

PAGED_ATTENTION_ENTRY(paged_attention_f32, float)
PAGED_ATTENTION_ENTRY(paged_attention_bf16, __nv_bfloat16)
