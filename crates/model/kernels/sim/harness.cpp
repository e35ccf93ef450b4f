// Runs one of the project's CUDA kernels on the CPU simulator, for the CPU test suite
// (crates/model/tests/kernels_sim.rs). Usage: harness paged|flash DIR. DIR holds the problem
// as written by the test: `meta` (whitespace-separated numbers, see below) and raw
// little-endian f32 / u32 arrays; the harness writes `out` (f32). Outputs start poisoned
// (NaN), so rows a kernel forgets to write show up.
#define KERNEL_SIM
#include "../flash_attention.cu"
#include "../paged_attention.cu"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

template <typename T>
static std::vector<T> read_array(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<T> out(bytes.size() / sizeof(T));
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
    return out;
}

static void write_array(const std::string& path, const std::vector<float>& data) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
}

template <typename T>
static std::vector<T> convert(const std::vector<float>& xs) {
    std::vector<T> out(xs.size());
    for (size_t i = 0; i < xs.size(); ++i) out[i] = from_float<T>(xs[i]);
    return out;
}

template <typename T>
static std::vector<float> widen(const std::vector<T>& xs) {
    std::vector<float> out(xs.size());
    for (size_t i = 0; i < xs.size(); ++i) out[i] = to_float(xs[i]);
    return out;
}

// meta: dtype(0 f32, 1 bf16) heads kv_heads head_dim block_size rows queries scale
template <typename T>
static std::vector<float> run_paged(const std::string& dir, int heads, int kv_heads, int head_dim,
                                    int block_size, int rows, int queries, float scale) {
    auto q = convert<T>(read_array<float>(dir + "/q"));
    auto k = convert<T>(read_array<float>(dir + "/k"));
    auto v = convert<T>(read_array<float>(dir + "/v"));
    auto tables = read_array<uint32_t>(dir + "/block_tables");
    auto query_rows = read_array<uint32_t>(dir + "/query_rows");
    auto context_lens = read_array<uint32_t>(dir + "/context_lens");
    auto table_starts = read_array<uint32_t>(dir + "/table_starts");
    std::vector<T> out(size_t(rows) * heads * head_dim, from_float<T>(NAN));
    uint32_t max_context = 0;
    for (uint32_t c : context_lens) max_context = std::max(max_context, c);
    auto kernel = [&] {
        paged_attention<T>(out.data(), q.data(), k.data(), v.data(), tables.data(),
                           query_rows.data(), context_lens.data(), table_starts.data(), heads,
                           kv_heads, head_dim, block_size, scale);
    };
    sim_launch(SimDim3{(unsigned)heads, (unsigned)queries, 1}, SimDim3{PAGED_THREADS, 1, 1},
               max_context * sizeof(float), kernel);
    return widen(out);
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: harness paged|flash DIR\n";
        return 2;
    }
    const std::string kind = argv[1], dir = argv[2];
    std::ifstream meta(dir + "/meta");
    std::vector<float> out;
    if (kind == "paged") {
        int dtype, heads, kv_heads, head_dim, block_size, rows, queries;
        float scale;
        meta >> dtype >> heads >> kv_heads >> head_dim >> block_size >> rows >> queries >> scale;
        out = dtype == 0 ? run_paged<float>(dir, heads, kv_heads, head_dim, block_size, rows,
                                            queries, scale)
                         : run_paged<__nv_bfloat16>(dir, heads, kv_heads, head_dim, block_size,
                                                    rows, queries, scale);
    } else if (kind == "flash") {
        // meta: batch heads kv_heads queries keys head_dim causal scale; q [b, queries, h, d],
        // k and v [b, keys, kv_heads, d], all contiguous.
        int batch, heads, kv_heads, queries, keys, head_dim, causal;
        float scale;
        meta >> batch >> heads >> kv_heads >> queries >> keys >> head_dim >> causal >> scale;
        auto q = convert<__nv_bfloat16>(read_array<float>(dir + "/q"));
        auto k = convert<__nv_bfloat16>(read_array<float>(dir + "/k"));
        auto v = convert<__nv_bfloat16>(read_array<float>(dir + "/v"));
        std::vector<__nv_bfloat16> o(size_t(batch) * queries * heads * head_dim,
                                     __float2bfloat16(NAN));
        const long q_row = (long)heads * head_dim, kv_row = (long)kv_heads * head_dim;
        sim_launch(SimDim3{(unsigned)((queries + FLASH_QUERIES - 1) / FLASH_QUERIES),
                           (unsigned)heads, (unsigned)batch},
                   SimDim3{FLASH_THREADS, 1, 1}, 0, flash_attention_bf16, o.data(),
                   (const __nv_bfloat16*)q.data(), (const __nv_bfloat16*)k.data(),
                   (const __nv_bfloat16*)v.data(), q_row * queries, q_row, (long)head_dim,
                   kv_row * keys, kv_row, (long)head_dim, kv_row * keys, kv_row, (long)head_dim,
                   queries, keys, heads, kv_heads, head_dim, scale, causal);
        out = widen(o);
    } else {
        std::cerr << "unknown kernel " << kind << "\n";
        return 2;
    }
    write_array(dir + "/out", out);
    return 0;
}
