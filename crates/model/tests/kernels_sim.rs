//! The CUDA kernels (crates/model/kernels), run on the CPU simulator (kernels/sim), against a
//! plain attention computed here in f64 from the same (bf16-rounded where the kernel reads
//! bf16) inputs. This checks the kernels' indexing, masking, online softmax and tiling on
//! every CPU run; the same kernels are checked on a GPU by `internvl check-kernels`.

use half::bf16;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds the simulator harness once per test run.
fn harness() -> &'static Path {
    static HARNESS: OnceLock<PathBuf> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-sim-harness");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&compiler)
            // CUDA code reinterprets memory (vector loads) as nvcc allows; so must g++.
            .args([
                "-std=c++20",
                "-O2",
                "-fno-strict-aliasing",
                "-pthread",
                "-Wall",
                "-Werror",
            ])
            .arg("-o")
            .arg(&out)
            .arg(kernels.join("sim/harness.cpp"))
            .status()
            .unwrap_or_else(|e| panic!("running {compiler} (a C++20 compiler is needed): {e}"));
        assert!(status.success(), "compiling the kernel simulator failed");
        out
    })
}

/// xorshift64*: deterministic inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Roughly standard normal (sum of uniforms).
    fn normal(&mut self) -> f32 {
        ((0..4).map(|_| self.uniform()).sum::<f64>() - 2.0) as f32 * 1.73
    }

    fn normals(&mut self, n: usize, round_to_bf16: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x = self.normal();
                if round_to_bf16 {
                    bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
            .collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
}

fn write_f32(dir: &Path, name: &str, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn write_u32(dir: &Path, name: &str, data: &[u32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn run(kind: &str, dir: &Path) -> Vec<f32> {
    let status = Command::new(harness()).arg(kind).arg(dir).status().unwrap();
    assert!(status.success(), "the simulated {kind} kernel failed");
    std::fs::read(dir.join("out"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// softmax(scale · q·kᵢ) · v over `keys` (each a key and a value row).
fn attend(query: &[f32], keys: &[(&[f32], &[f32])], scale: f32) -> Vec<f64> {
    let scores: Vec<f64> = keys
        .iter()
        .map(|(k, _)| {
            query
                .iter()
                .zip(*k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0f64; query.len()];
    for (w, (_, v)) in weights.iter().zip(keys) {
        for (o, x) in out.iter_mut().zip(*v) {
            *o += w / total * *x as f64;
        }
    }
    out
}

/// Largest |got − want| over the rows that must be written; panics on NaN anywhere in them.
fn max_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert!(
                !g.is_nan(),
                "an output the kernel must write is NaN (unwritten)"
            );
            (*g as f64 - w).abs()
        })
        .fold(0.0, f64::max)
}

/// One sequence in a paged problem: `queries` new tokens ending at position `context`.
struct PagedSequence {
    context: usize,
    queries: usize,
}

struct PagedCase {
    bf16: bool,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    sequences: Vec<PagedSequence>,
}

fn check_paged(case: PagedCase, seed: u64) {
    let mut rng = Rng(seed);
    let PagedCase {
        heads,
        kv_heads,
        head_dim,
        block_size,
        ..
    } = case;
    let blocks_per_seq: Vec<usize> = case
        .sequences
        .iter()
        .map(|s| s.context.div_ceil(block_size))
        .collect();
    // Blocks handed out in a shuffled order, plus a few nobody owns.
    let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3;
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let slot_width = kv_heads * head_dim;
    let k = rng.normals(num_blocks * block_size * slot_width, case.bf16);
    let v = rng.normals(num_blocks * block_size * slot_width, case.bf16);
    // One packed row per query plus one unlisted row, which must stay untouched.
    let rows = case.sequences.iter().map(|s| s.queries).sum::<usize>() + 1;
    let q = rng.normals(rows * heads * head_dim, case.bf16);
    let (mut tables, mut query_rows, mut context_lens, mut table_starts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut expected_rows = Vec::new();
    let mut row = 1; // row 0 is the unlisted one
    for (seq, &blocks) in case.sequences.iter().zip(&blocks_per_seq) {
        let start = tables.len() as u32;
        let table: Vec<u32> = free.drain(..blocks).collect();
        for i in 0..seq.queries {
            let context = seq.context - seq.queries + i + 1;
            query_rows.push(row as u32);
            context_lens.push(context as u32);
            table_starts.push(start);
            expected_rows.push((row, table.clone(), context));
            row += 1;
        }
        tables.extend(table);
    }
    let scale = (head_dim as f32).powf(-0.5);
    let dir = tempfile::tempdir().unwrap();
    let meta = format!(
        "{} {heads} {kv_heads} {head_dim} {block_size} {rows} {} {scale}",
        u8::from(case.bf16),
        query_rows.len()
    );
    std::fs::write(dir.path().join("meta"), meta).unwrap();
    write_f32(dir.path(), "q", &q);
    write_f32(dir.path(), "k", &k);
    write_f32(dir.path(), "v", &v);
    write_u32(dir.path(), "block_tables", &tables);
    write_u32(dir.path(), "query_rows", &query_rows);
    write_u32(dir.path(), "context_lens", &context_lens);
    write_u32(dir.path(), "table_starts", &table_starts);
    let out = run("paged", dir.path());

    let row_width = heads * head_dim;
    assert!(
        out[..row_width].iter().all(|x| x.is_nan()),
        "the unlisted row was written"
    );
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (row, table, context) in expected_rows {
        for h in 0..heads {
            let kv_h = h / (heads / kv_heads);
            let at = |pos: usize| {
                let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                slot * slot_width + kv_h * head_dim
            };
            let keys: Vec<(&[f32], &[f32])> = (0..context)
                .map(|p| (&k[at(p)..][..head_dim], &v[at(p)..][..head_dim]))
                .collect();
            let query = &q[(row * heads + h) * head_dim..][..head_dim];
            want.extend(attend(query, &keys, scale));
            got.extend_from_slice(&out[(row * heads + h) * head_dim..][..head_dim]);
        }
    }
    let err = max_error(&got, &want);
    let tolerance = if case.bf16 { 1.6e-2 } else { 2e-5 };
    assert!(
        err <= tolerance,
        "paged attention max error {err} > {tolerance}"
    );
}

#[test]
fn paged_attention_f32_with_gqa_scattered_blocks_and_chunks() {
    check_paged(
        PagedCase {
            bf16: false,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            block_size: 4,
            sequences: vec![
                PagedSequence {
                    context: 1,
                    queries: 1,
                },
                PagedSequence {
                    context: 7,
                    queries: 1,
                },
                PagedSequence {
                    context: 23,
                    queries: 1,
                },
                PagedSequence {
                    context: 13,
                    queries: 3,
                },
            ],
        },
        1,
    );
}

#[test]
fn paged_attention_bf16_long_context_llama_head() {
    check_paged(
        PagedCase {
            bf16: true,
            heads: 2,
            kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            sequences: vec![
                PagedSequence {
                    context: 300,
                    queries: 1,
                },
                PagedSequence {
                    context: 17,
                    queries: 2,
                },
            ],
        },
        2,
    );
}

#[test]
fn paged_attention_odd_head_dims() {
    for (head_dim, seed) in [(16, 3), (200, 4)] {
        check_paged(
            PagedCase {
                bf16: false,
                heads: 2,
                kv_heads: 1,
                head_dim,
                block_size: 16,
                sequences: vec![PagedSequence {
                    context: 40,
                    queries: 2,
                }],
            },
            seed,
        );
    }
}

struct FlashCase {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    causal: bool,
}

fn check_flash(case: FlashCase, seed: u64) {
    let FlashCase {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        head_dim,
        causal,
    } = case;
    let mut rng = Rng(seed);
    let q = rng.normals(batch * queries * heads * head_dim, true);
    let k = rng.normals(batch * keys * kv_heads * head_dim, true);
    let v = rng.normals(batch * keys * kv_heads * head_dim, true);
    let scale = (head_dim as f32).powf(-0.5);
    let dir = tempfile::tempdir().unwrap();
    let meta = format!(
        "{batch} {heads} {kv_heads} {queries} {keys} {head_dim} {} {scale}",
        u8::from(causal)
    );
    std::fs::write(dir.path().join("meta"), meta).unwrap();
    write_f32(dir.path(), "q", &q);
    write_f32(dir.path(), "k", &k);
    write_f32(dir.path(), "v", &v);
    let out = run("flash", dir.path());

    let mut want = Vec::with_capacity(out.len());
    for b in 0..batch {
        for i in 0..queries {
            for h in 0..heads {
                let kv_h = h / (heads / kv_heads);
                let at = |j: usize| ((b * keys + j) * kv_heads + kv_h) * head_dim;
                let visible = if causal { i + keys - queries + 1 } else { keys };
                let pairs: Vec<(&[f32], &[f32])> = (0..visible)
                    .map(|j| (&k[at(j)..][..head_dim], &v[at(j)..][..head_dim]))
                    .collect();
                let query = &q[((b * queries + i) * heads + h) * head_dim..][..head_dim];
                want.extend(attend(query, &pairs, scale));
            }
        }
    }
    let err = max_error(&out, &want);
    assert!(err <= 2e-2, "flash attention max error {err} > 0.02");
}

#[test]
fn flash_attention_vision_shape_partial_tiles() {
    check_flash(
        FlashCase {
            batch: 2,
            heads: 2,
            kv_heads: 2,
            queries: 77,
            keys: 77,
            head_dim: 64,
            causal: false,
        },
        5,
    );
}

#[test]
fn flash_attention_causal_prefill_after_cached_context_with_gqa() {
    check_flash(
        FlashCase {
            batch: 1,
            heads: 4,
            kv_heads: 2,
            queries: 40,
            keys: 100,
            head_dim: 128,
            causal: true,
        },
        6,
    );
}

#[test]
fn flash_attention_small_and_unaligned_head_dims() {
    check_flash(
        FlashCase {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            queries: 33,
            keys: 33,
            head_dim: 16,
            causal: true,
        },
        7,
    );
    check_flash(
        FlashCase {
            batch: 1,
            heads: 1,
            kv_heads: 1,
            queries: 5,
            keys: 70,
            head_dim: 80,
            causal: false,
        },
        8,
    );
    // Not a multiple of 8: element loads instead of 16-byte ones.
    check_flash(
        FlashCase {
            batch: 2,
            heads: 2,
            kv_heads: 2,
            queries: 9,
            keys: 40,
            head_dim: 20,
            causal: true,
        },
        9,
    );
}
