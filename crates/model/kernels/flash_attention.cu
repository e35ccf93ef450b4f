// Memory-efficient attention for long query runs: the vision encoder's 1025-token sequences
// and LLM prefill. Scores never reach global memory: each CUDA block holds a tile of
// FLASH_QUERIES queries of one head, walks the keys FLASH_KEYS at a time with an online
// softmax (running max and sum per query row), and accumulates the output in shared memory.
// Both products (QKᵀ and PV) run on tensor cores through WMMA in bf16 with f32 accumulation;
// the probabilities are rounded to bf16 before PV, as in FlashAttention.
//
// Layouts are strided so callers pass views without copies: element (b, i, h, d) of q lives at
// q[b * q_batch + i * q_row + h * q_head + d] (d contiguous), likewise k and v; out is
// contiguous [batch, queries, heads, head_dim]. `causal`: query i sees keys j <= i + (keys -
// queries), i.e. the queries are the last positions of the context.
#include "common.cuh"

#define FLASH_QUERIES 32
#define FLASH_KEYS 32
#define FLASH_MAX_HEAD_DIM 128
#define FLASH_THREADS 128
#define FLASH_ROW_THREADS (FLASH_THREADS / FLASH_QUERIES)  // threads sharing one query row

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

// Rows first..first+rows of a [*, head_dim] view (row stride `row_stride` elements) into a
// zero-padded tile. 16-byte loads (8 values) where the layout allows, which it does for the
// model's shapes (head_dim and strides multiples of 8); element loads otherwise.
__device__ __forceinline__ void load_tile(bf16 (*tile)[FLASH_MAX_HEAD_DIM], const bf16* src,
                                          size_t batch_offset, long row_stride, int first,
                                          int rows, int limit, int head_dim) {
    const bf16* base = src + batch_offset;
    const bool vectors = head_dim % 8 == 0 && row_stride % 8 == 0 &&
                         reinterpret_cast<uintptr_t>(base) % 16 == 0;
    if (vectors) {
        const int per_row = FLASH_MAX_HEAD_DIM / 8;
        for (int idx = threadIdx.x; idx < rows * per_row; idx += FLASH_THREADS) {
            const int r = idx / per_row, d = (idx % per_row) * 8;
            const int i = first + r;
            uint4 value = make_uint4(0, 0, 0, 0);
            if (i < limit && d < head_dim)
                value = *reinterpret_cast<const uint4*>(base + (size_t)i * row_stride + d);
            *reinterpret_cast<uint4*>(&tile[r][d]) = value;
        }
        return;
    }
    for (int idx = threadIdx.x; idx < rows * FLASH_MAX_HEAD_DIM; idx += FLASH_THREADS) {
        const int r = idx / FLASH_MAX_HEAD_DIM, d = idx % FLASH_MAX_HEAD_DIM;
        const int i = first + r;
        tile[r][d] = (i < limit && d < head_dim) ? base[(size_t)i * row_stride + d]
                                                 : __float2bfloat16(0.f);
    }
}

extern "C" __global__ void flash_attention_bf16(
    bf16* __restrict__ out, const bf16* __restrict__ q, const bf16* __restrict__ k,
    const bf16* __restrict__ v, long q_batch, long q_row, long q_head, long k_batch, long k_row,
    long k_head, long v_batch, long v_row, long v_head, int queries, int keys, int heads,
    int kv_heads, int head_dim, float scale, int causal) {
    __shared__ __align__(32) bf16 q_tile[FLASH_QUERIES][FLASH_MAX_HEAD_DIM];
    __shared__ __align__(32) bf16 k_tile[FLASH_KEYS][FLASH_MAX_HEAD_DIM];
    __shared__ __align__(32) bf16 v_tile[FLASH_KEYS][FLASH_MAX_HEAD_DIM];
    __shared__ __align__(32) float s_tile[FLASH_QUERIES][FLASH_KEYS];
    __shared__ __align__(32) bf16 p_tile[FLASH_QUERIES][FLASH_KEYS];
    __shared__ __align__(32) float o_tile[FLASH_QUERIES][FLASH_MAX_HEAD_DIM];

    const int first_query = blockIdx.x * FLASH_QUERIES;
    const int head = blockIdx.y, batch = blockIdx.z;
    const int kv_head = head / (heads / kv_heads);
    const int warp = threadIdx.x / 32;
    const int dim16 = (head_dim + 15) / 16 * 16;  // the products' inner/outer width
    const int offset = keys - queries;

    load_tile(q_tile, q, batch * q_batch + (size_t)head * q_head, q_row, first_query,
              FLASH_QUERIES, queries, head_dim);
    for (int idx = threadIdx.x; idx < FLASH_QUERIES * FLASH_MAX_HEAD_DIM; idx += FLASH_THREADS)
        o_tile[idx / FLASH_MAX_HEAD_DIM][idx % FLASH_MAX_HEAD_DIM] = 0.f;

    // This thread's share of the softmax: one row, FLASH_KEYS / FLASH_ROW_THREADS columns.
    const int row = threadIdx.x / FLASH_ROW_THREADS;
    const int part = threadIdx.x % FLASH_ROW_THREADS;
    const int query_pos = first_query + row + offset;  // position the row's query sits at
    float row_max = -INFINITY, row_sum = 0.f;

    int key_end = keys;
    if (causal) key_end = min(keys, first_query + FLASH_QUERIES + offset);
    for (int first_key = 0; first_key < key_end; first_key += FLASH_KEYS) {
        __syncthreads();  // the previous round is done with k, v and p
        const size_t kv_base = (size_t)kv_head;
        load_tile(k_tile, k, batch * k_batch + kv_base * k_head, k_row, first_key, FLASH_KEYS,
                  keys, head_dim);
        load_tile(v_tile, v, batch * v_batch + kv_base * v_head, v_row, first_key, FLASH_KEYS,
                  keys, head_dim);
        __syncthreads();

        // S = Q Kᵀ: a 2×2 grid of 16×16 fragments, one per warp.
        {
            const int fr = warp / 2, fc = warp % 2;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
            for (int kk = 0; kk < dim16; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                wmma::load_matrix_sync(a, &q_tile[fr * 16][kk], FLASH_MAX_HEAD_DIM);
                wmma::load_matrix_sync(b, &k_tile[fc * 16][kk], FLASH_MAX_HEAD_DIM);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(&s_tile[fr * 16][fc * 16], acc, FLASH_KEYS,
                                    wmma::mem_row_major);
        }
        __syncthreads();

        // Online softmax of this round's scores; rescale what the output holds so far.
        const int cols = FLASH_KEYS / FLASH_ROW_THREADS;
        float scores[FLASH_KEYS / FLASH_ROW_THREADS];
        float round_max = -INFINITY;
        for (int c = 0; c < cols; ++c) {
            const int col = part * cols + c, key = first_key + col;
            const bool visible = key < keys && (!causal || key <= query_pos);
            scores[c] = visible ? s_tile[row][col] * scale : -INFINITY;
            round_max = fmaxf(round_max, scores[c]);
        }
        for (int o = 1; o < FLASH_ROW_THREADS; o <<= 1)
            round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, o));
        const float new_max = fmaxf(row_max, round_max);
        float round_sum = 0.f;
        for (int c = 0; c < cols; ++c) {
            const float p = new_max == -INFINITY ? 0.f : __expf(scores[c] - new_max);
            round_sum += p;
            p_tile[row][part * cols + c] = __float2bfloat16(p);
        }
        for (int o = 1; o < FLASH_ROW_THREADS; o <<= 1)
            round_sum += __shfl_xor_sync(0xffffffffu, round_sum, o);
        const float rescale = row_max == -INFINITY ? 0.f : __expf(row_max - new_max);
        row_sum = row_sum * rescale + round_sum;
        row_max = new_max;
        const int dims = FLASH_MAX_HEAD_DIM / FLASH_ROW_THREADS;
        for (int d = part * dims; d < (part + 1) * dims; ++d) o_tile[row][d] *= rescale;
        __syncthreads();

        // O += P V: 2 × (dim16 / 16) fragments of 16×16, shared out among the warps.
        const int fragments = 2 * (dim16 / 16);
        for (int f = warp; f < fragments; f += FLASH_THREADS / 32) {
            const int fr = f % 2, fc = f / 2;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, &o_tile[fr * 16][fc * 16], FLASH_MAX_HEAD_DIM,
                                   wmma::mem_row_major);
            for (int kk = 0; kk < FLASH_KEYS; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
                wmma::load_matrix_sync(a, &p_tile[fr * 16][kk], FLASH_KEYS);
                wmma::load_matrix_sync(b, &v_tile[kk][fc * 16], FLASH_MAX_HEAD_DIM);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(&o_tile[fr * 16][fc * 16], acc, FLASH_MAX_HEAD_DIM,
                                    wmma::mem_row_major);
        }
    }
    __syncthreads();

    const int query = first_query + row;
    if (query < queries) {
        const float inv_sum = row_sum > 0.f ? 1.f / row_sum : 0.f;
        bf16* out_row = out + (((size_t)batch * queries + query) * heads + head) * head_dim;
        for (int d = part; d < head_dim; d += FLASH_ROW_THREADS)
            out_row[d] = __float2bfloat16(o_tile[row][d] * inv_sum);
    }
}
