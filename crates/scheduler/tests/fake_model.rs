//! Engine tests with a fake model whose every output depends on the whole KV cache content
//! it reads through the block table, so any misplaced block, stale slot or wrong image row
//! changes the tokens.

use internvl_scheduler::output::channel;
use internvl_scheduler::runner::{ForwardSeq, ModelRunner, RunnerError};
use internvl_scheduler::scheduler::Scheduler;
use internvl_scheduler::{
    ContentHash, EngineConfig, Event, FinishReason, ImageInput, Request, RequestStream,
    SamplingParams, StopParams, TokenDecoder, Usage,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

pub const IMAGE_TOKEN: u32 = 999;
pub const EOS: u32 = 2;
const VOCAB: usize = 64;

fn mix(a: u64, b: u64) -> u64 {
    let x = (a ^ b.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// Writes a value per token into its cache slot; a sequence's logits hash every slot it reads.
pub struct FakeRunner {
    slots: Vec<u64>,
    block_size: usize,
    pub encoded: Arc<std::sync::atomic::AtomicUsize>,
    pub fail_forward_every: Option<usize>,
    /// Fails every forward whose batch holds this token: a fault of one sequence's input.
    pub poison_token: Option<u32>,
    /// Fails every encode whose batch holds the image of this seed.
    pub poison_image: Option<u64>,
    /// Poisoned batches panic instead of returning an error.
    pub poison_panics: bool,
    forwards: usize,
}

impl FakeRunner {
    pub fn new(config: &EngineConfig) -> Self {
        Self {
            slots: vec![0; config.num_blocks * config.block_size],
            block_size: config.block_size,
            encoded: Default::default(),
            fail_forward_every: None,
            poison_token: None,
            poison_image: None,
            poison_panics: false,
            forwards: 0,
        }
    }
}

impl ModelRunner for FakeRunner {
    type Pixels = u64;
    type ImageEmbeds = Vec<u64>;

    fn encode_images(&mut self, images: &[&u64]) -> Result<Vec<Vec<u64>>, RunnerError> {
        if self
            .poison_image
            .is_some_and(|p| images.iter().any(|&&seed| seed == p))
        {
            if self.poison_panics {
                panic!("injected encoder panic");
            }
            return Err(RunnerError("injected encoder failure".into()));
        }
        self.encoded
            .fetch_add(images.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(images
            .iter()
            .map(|&&seed| (0..1000).map(|row| mix(seed, row)).collect())
            .collect())
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn embeds_bytes(&self, embeds: &Vec<u64>) -> usize {
        embeds.len() * 8
    }

    fn forward(
        &mut self,
        batch: &[ForwardSeq<'_, Vec<u64>>],
    ) -> Result<Vec<Vec<f32>>, RunnerError> {
        self.forwards += 1;
        if let Some(every) = self.fail_forward_every {
            if self.forwards.is_multiple_of(every) {
                return Err(RunnerError("injected failure".into()));
            }
        }
        if let Some(poison) = self.poison_token {
            if batch.iter().any(|seq| seq.tokens.contains(&poison)) {
                if self.poison_panics {
                    panic!("injected panic of a poisoned sequence");
                }
                return Err(RunnerError(
                    "injected failure of a poisoned sequence".into(),
                ));
            }
        }
        let bs = self.block_size;
        let mut out = Vec::new();
        for seq in batch {
            let mut rows = seq
                .images
                .iter()
                .flat_map(|(embeds, range)| embeds[range.clone()].iter().copied());
            for (k, &token) in seq.tokens.iter().enumerate() {
                let pos = seq.start + k;
                let image_row = if token == IMAGE_TOKEN {
                    rows.next().expect("an embedding row for every image token")
                } else {
                    0
                };
                let slot = seq.block_table[pos / bs] as usize * bs + pos % bs;
                self.slots[slot] = mix(mix(pos as u64, token as u64), image_row);
            }
            assert!(rows.next().is_none(), "more image rows than placeholders");
            if seq.wants_logits {
                let end = seq.start + seq.tokens.len();
                let h = (0..end).fold(0u64, |h, pos| {
                    mix(
                        h,
                        self.slots[seq.block_table[pos / bs] as usize * bs + pos % bs],
                    )
                });
                let mut logits = vec![0.0f32; VOCAB];
                logits[(h % VOCAB as u64) as usize] = 10.0;
                out.push(logits);
            }
        }
        Ok(out)
    }
}

/// The content hash of the fake image drawn from `seed`.
pub fn image_hash(seed: u64) -> ContentHash {
    ContentHash::of(&seed.to_le_bytes())
}

/// Token `t` reads as `<t>`.
fn decoder() -> Arc<dyn TokenDecoder> {
    Arc::new(|ids: &[u32], _: bool| ids.iter().map(|t| format!("<{t}>")).collect::<String>())
}

/// A prompt of `len` tokens with an image of `image_tokens` placeholders at `offset`.
pub fn request(
    rng: &mut StdRng,
    len: usize,
    images: &[(usize, usize, u64)],
    max_tokens: usize,
) -> Request<u64> {
    let mut prompt: Vec<u32> = (0..len)
        .map(|_| rng.random_range(3..VOCAB as u32))
        .collect();
    let images = images
        .iter()
        .map(|&(offset, n, seed)| {
            prompt[offset..offset + n].fill(IMAGE_TOKEN);
            ImageInput {
                offset,
                num_tokens: n,
                content_hash: image_hash(seed),
                pixels: Arc::new(seed),
            }
        })
        .collect();
    Request {
        prompt,
        images,
        sampling: SamplingParams::default(),
        stop: StopParams {
            max_tokens,
            eos_token_id: Some(EOS),
            ..StopParams::default()
        },
        skip_special_tokens: true,
        n: 1,
        grammar: None,
    }
}

fn clone_request(r: &Request<u64>) -> Request<u64> {
    Request {
        prompt: r.prompt.clone(),
        images: r
            .images
            .iter()
            .map(|i| ImageInput {
                offset: i.offset,
                num_tokens: i.num_tokens,
                content_hash: i.content_hash,
                pixels: i.pixels.clone(),
            })
            .collect(),
        sampling: r.sampling.clone(),
        stop: r.stop.clone(),
        skip_special_tokens: r.skip_special_tokens,
        n: r.n,
        grammar: r.grammar.clone(),
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    reason: Option<FinishReason>,
    usage: Usage,
    error: Option<String>,
}

fn collect(rx: &mut RequestStream) -> Outcome {
    let mut outcome = Outcome {
        tokens: Vec::new(),
        reason: None,
        usage: Usage::default(),
        error: None,
    };
    while let Some(event) = rx.try_next() {
        match event {
            Event::Token { id, .. } => outcome.tokens.push(id),
            Event::Finished { reason, usage, .. } => {
                outcome.reason = Some(reason);
                outcome.usage = usage;
            }
            Event::Error { message, .. } => outcome.error = Some(message),
        }
    }
    outcome
}

fn run_alone(config: &EngineConfig, req: &Request<u64>) -> Outcome {
    let mut config = config.clone();
    config.num_blocks = 512;
    // Read only at the end: room for all of it.
    config.max_buffered_output_bytes = usize::MAX;
    let mut s = Scheduler::new(FakeRunner::new(&config), config, decoder());
    let (tx, mut rx) = channel();
    s.add(clone_request(req), tx).unwrap();
    while s.has_work() {
        s.step();
    }
    collect(&mut rx)
}

fn mixed_workload(rng: &mut StdRng, n: usize) -> Vec<Request<u64>> {
    let shared_prefix: Vec<u32> = (0..40).map(|_| rng.random_range(3..VOCAB as u32)).collect();
    (0..n)
        .map(|i| {
            let len = rng.random_range(80..200);
            let images: Vec<(usize, usize, u64)> = match i % 4 {
                0 => vec![],
                1 => vec![(5, 32, rng.random_range(0..3))],
                2 => vec![(3, 20, rng.random_range(0..3)), (40, 32, 7)],
                _ => vec![(10, 16, 1)],
            };
            let max_tokens = rng.random_range(1..40);
            let mut r = request(rng, len, &images, max_tokens);
            if i % 3 == 0 {
                // A shared text prefix (where no image lies) exercises prefix caching.
                let keep = images.first().map_or(len.min(40), |img| img.0).min(len);
                r.prompt[..keep].copy_from_slice(&shared_prefix[..keep]);
            }
            r
        })
        .collect()
}

/// Each request yields exactly what it yields alone, whatever the batch, the arrival step,
/// the chunking, preemption (a pool too small for all) and prefix caching.
#[test]
fn batch_invariance_under_preemption_and_prefix_caching() {
    for (prefix_caching, num_blocks, budget) in [
        (false, 512, 2048),
        (true, 512, 64),
        (false, 40, 96),
        (true, 40, 2048),
        (true, 32, 37),
    ] {
        let mut rng = StdRng::seed_from_u64(num_blocks as u64 + budget as u64);
        let mut config = EngineConfig::new(num_blocks, 8, 4096);
        config.enable_prefix_caching = prefix_caching;
        config.max_num_batched_tokens = budget;
        config.max_images_per_step = 2;
        let requests = mixed_workload(&mut rng, 32);
        let alone: Vec<Outcome> = requests.iter().map(|r| run_alone(&config, r)).collect();

        let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
        let mut arrivals: Vec<usize> = (0..requests.len())
            .map(|_| rng.random_range(0..30))
            .collect();
        arrivals.sort();
        let mut streams = Vec::new();
        let mut next = 0;
        let mut step = 0;
        while next < requests.len() || s.has_work() {
            while next < requests.len() && arrivals[next] <= step {
                let (tx, rx) = channel();
                s.add(clone_request(&requests[next]), tx).unwrap();
                streams.push(rx);
                next += 1;
            }
            s.step();
            step += 1;
            assert!(step < 100_000, "no progress");
        }
        let stats = s.stats().clone();
        for (i, rx) in streams.iter_mut().enumerate() {
            let got = collect(rx);
            assert_eq!(
                got.tokens, alone[i].tokens,
                "request {i} ({num_blocks} blocks, budget {budget})"
            );
            assert_eq!(got.reason, alone[i].reason);
        }
        assert_eq!(s.free_blocks(), num_blocks, "every block back");
        if num_blocks < 100 {
            assert!(
                stats.preemptions > 0,
                "the small pool must force preemption"
            );
        }
        if prefix_caching {
            assert!(stats.prefix_hits > 0, "shared prefixes must hit");
        }
        println!(
            "{num_blocks} blocks, budget {budget}, prefix caching {prefix_caching}: {stats:?}"
        );
    }
}

#[test]
fn same_text_different_images_never_share_blocks() {
    let mut rng = StdRng::seed_from_u64(1);
    let config = EngineConfig::new(64, 8, 1024);
    let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
    let a = request(&mut rng, 64, &[(8, 32, 100)], 1);
    let mut b = clone_request(&a);
    b.images[0].content_hash = image_hash(200);
    b.images[0].pixels = Arc::new(200);
    let same = clone_request(&a);
    let mut results = Vec::new();
    for r in [a, b, same] {
        let (tx, mut rx) = channel();
        s.add(r, tx).unwrap();
        while s.has_work() {
            s.step();
        }
        results.push(collect(&mut rx));
    }
    // Blocks before the image (tokens 0..8) are shared; none from the image on.
    assert_eq!(results[1].usage.cached_tokens, 8);
    assert_ne!(results[1].tokens, results[0].tokens);
    assert_eq!(
        results[2].usage.cached_tokens, 56,
        "all full blocks but the last token's"
    );
    assert_eq!(results[2].tokens, results[0].tokens);
    assert_eq!(
        s.stats().images_encoded,
        2,
        "the cached prefix covers the third's image"
    );
    // The same image after different text misses the prefix cache but hits the encoder cache.
    let mut d = request(&mut rng, 64, &[(8, 32, 100)], 1);
    d.prompt[0] = 1;
    let (tx, _rx) = channel();
    s.add(d, tx).unwrap();
    while s.has_work() {
        s.step();
    }
    assert_eq!(s.stats().image_cache_hits, 1, "{:?}", s.stats());
    assert_eq!(s.stats().images_encoded, 2);
}

#[test]
fn chunked_prefill_respects_the_token_budget() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut config = EngineConfig::new(64, 8, 1024);
    config.max_num_batched_tokens = 50;
    let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
    let r = request(&mut rng, 300, &[(100, 64, 5)], 3);
    let expected = run_alone(&EngineConfig::new(64, 8, 1024), &r);
    let (tx, mut rx) = channel();
    s.add(r, tx).unwrap();
    let mut steps = 0;
    while s.has_work() {
        s.step();
        assert!(s.stats().tokens_last_step <= 50);
        steps += 1;
    }
    assert_eq!(steps, 6 + 2, "300 tokens in chunks of 50, then 2 decodes");
    assert_eq!(collect(&mut rx).tokens, expected.tokens);
}

#[test]
fn dropping_the_stream_aborts_and_frees_blocks() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut config = EngineConfig::new(64, 8, 1024);
    config.enable_prefix_caching = false;
    let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
    let mut r = request(&mut rng, 40, &[], 100);
    r.stop.eos_token_id = None;
    let (tx, rx) = channel();
    s.add(r, tx).unwrap();
    for _ in 0..5 {
        s.step();
    }
    assert!(s.free_blocks() < 64);
    drop(rx);
    s.step();
    assert!(!s.has_work());
    assert_eq!(s.free_blocks(), 64);
    assert_eq!(s.stats().aborted, 1);
}

#[test]
fn impossible_requests_are_refused_at_once() {
    let mut rng = StdRng::seed_from_u64(4);
    let config = EngineConfig::new(4, 8, 100);
    let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
    let (tx, _rx) = channel();
    let too_long = request(&mut rng, 90, &[], 20);
    assert!(s
        .add(too_long, tx.clone())
        .unwrap_err()
        .to_string()
        .contains("exceeds"));
    let too_big = request(&mut rng, 30, &[], 10);
    assert!(s
        .add(too_big, tx.clone())
        .unwrap_err()
        .to_string()
        .contains("blocks"));
    let mut bad_image = request(&mut rng, 10, &[], 1);
    bad_image.images.push(ImageInput {
        offset: 8,
        num_tokens: 4,
        content_hash: image_hash(0),
        pixels: Arc::new(0),
    });
    assert!(s
        .add(bad_image, tx)
        .unwrap_err()
        .to_string()
        .contains("image 0"));
}

/// Thousands of random requests with cancellations, preemptions and model failures: every
/// block comes back and every request ends exactly once.
#[test]
fn no_block_leaks_under_random_load() {
    let mut rng = StdRng::seed_from_u64(5);
    for round in 0..4 {
        let mut config = EngineConfig::new(rng.random_range(20..60), 4, 512);
        config.enable_prefix_caching = round % 2 == 0;
        config.max_num_batched_tokens = rng.random_range(16..200);
        config.max_num_seqs = rng.random_range(1..20);
        let mut runner = FakeRunner::new(&config);
        runner.fail_forward_every = Some(rng.random_range(20..60));
        let mut s = Scheduler::new(runner, config.clone(), decoder());
        let mut live: Vec<Option<RequestStream>> = Vec::new();
        let mut submitted = 0;
        for _ in 0..2000 {
            if rng.random_bool(0.3) && submitted < 800 {
                let len = rng.random_range(1..60);
                let images = if len > 20 && rng.random_bool(0.5) {
                    vec![(rng.random_range(0..len - 16), 16, rng.random_range(0..4))]
                } else {
                    vec![]
                };
                let max_tokens = rng.random_range(1..30);
                let r = request(&mut rng, len, &images, max_tokens);
                let (tx, rx) = channel();
                if s.add(r, tx).is_ok() {
                    live.push(Some(rx));
                    submitted += 1;
                }
            }
            if rng.random_bool(0.05) && !live.is_empty() {
                let i = rng.random_range(0..live.len());
                live[i] = None;
            }
            s.step();
        }
        while s.has_work() {
            s.step();
        }
        assert_eq!(
            s.free_blocks(),
            config.num_blocks,
            "round {round}: blocks leaked"
        );
        for rx in live.iter_mut().flatten() {
            let mut ends = 0;
            while let Some(event) = rx.try_next() {
                if matches!(event, Event::Finished { .. } | Event::Error { .. }) {
                    ends += 1;
                }
            }
            assert_eq!(ends, 1, "every live request ends exactly once");
        }
        assert!(submitted > 400);
    }
}

/// `n` completions share the prompt's blocks, and completion `k` is what a lone request
/// seeded with seed + k yields.
#[test]
fn n_completions_share_the_prompt() {
    let mut rng = StdRng::seed_from_u64(6);
    let mut config = EngineConfig::new(200, 8, 1024);
    config.enable_prefix_caching = false;
    let mut r = request(&mut rng, 100, &[(10, 32, 9)], 12);
    r.sampling = SamplingParams {
        temperature: 2.0,
        seed: Some(40),
        ..SamplingParams::default()
    };
    r.n = 4;
    let alone: Vec<Vec<u32>> = (0..4u64)
        .map(|k| {
            let mut single = clone_request(&r);
            single.n = 1;
            single.sampling.seed = Some(40 + k);
            run_alone(&config, &single).tokens
        })
        .collect();
    assert!(alone.iter().any(|t| t != &alone[0]), "seeds must matter");

    let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
    let (tx, mut rx) = channel();
    s.add(r, tx).unwrap();
    let mut peak_used = 0;
    while s.has_work() {
        s.step();
        peak_used = peak_used.max(200 - s.free_blocks());
    }
    // Alone, each would hold ceil(112 / 8) = 14 blocks: 56 for four.
    assert!(
        peak_used <= 12 + 4 * 2,
        "prompt blocks are shared: peak {peak_used}"
    );
    let mut outputs = vec![Vec::new(); 4];
    let mut finished = [false; 4];
    while let Some(event) = rx.try_next() {
        match event {
            Event::Token { index, id, .. } => outputs[index].push(id),
            Event::Finished { index, usage, .. } => {
                assert!(!finished[index]);
                finished[index] = true;
                assert_eq!(usage.prompt_tokens, 100);
            }
            Event::Error { message, .. } => panic!("{message}"),
        }
    }
    assert_eq!(finished, [true; 4]);
    assert_eq!(outputs, alone);
    assert_eq!(s.free_blocks(), 200);
}

/// A token no prompt of `request` holds and the fake model never samples (its vocabulary is
/// 0..64): a forward over it fails.
const POISON: u32 = 777;

/// One request's failing forward or encode fails that request alone: whatever the batch,
/// preemption and caching, every other request yields exactly its tokens alone, the failed
/// ones get an error, and every block comes back. The same when the model panics instead of
/// returning an error.
#[test]
fn a_sequence_that_breaks_the_model_fails_alone() {
    let cases = [(true, 512, 2048), (false, 40, 96), (true, 40, 64)];
    for (panics, (prefix_caching, num_blocks, budget)) in [false, true]
        .into_iter()
        .flat_map(|p| cases.into_iter().map(move |c| (p, c)))
    {
        let mut rng = StdRng::seed_from_u64(11 + num_blocks as u64 + budget as u64);
        let mut config = EngineConfig::new(num_blocks, 8, 4096);
        config.enable_prefix_caching = prefix_caching;
        config.max_num_batched_tokens = budget;
        config.max_images_per_step = 2;
        let mut requests = mixed_workload(&mut rng, 24);
        // Request 5 carries a poisoned token, request 9 a poisoned image (seed 13, which
        // `mixed_workload` never draws), among requests that share its batches.
        let poisoned_token = 5;
        // Past its image (5..37) and within every prompt (80 tokens or more).
        requests[poisoned_token].prompt[70] = POISON;
        let poisoned_image = 9;
        requests[poisoned_image] = request(&mut rng, 120, &[(20, 32, 13), (60, 16, 1)], 10);
        let alone: Vec<Outcome> = requests.iter().map(|r| run_alone(&config, r)).collect();

        let mut runner = FakeRunner::new(&config);
        runner.poison_token = Some(POISON);
        runner.poison_image = Some(13);
        runner.poison_panics = panics;
        let mut s = Scheduler::new(runner, config.clone(), decoder());
        let mut streams: Vec<RequestStream> = requests
            .iter()
            .map(|r| {
                let (tx, rx) = channel();
                s.add(clone_request(r), tx).unwrap();
                rx
            })
            .collect();
        let mut steps = 0;
        while s.has_work() {
            s.step();
            steps += 1;
            assert!(steps < 100_000, "no progress");
        }
        for (i, rx) in streams.iter_mut().enumerate() {
            let got = collect(rx);
            if i == poisoned_token || i == poisoned_image {
                let error = got.error.expect("the poisoned request fails");
                assert!(error.contains("injected"), "{error}");
                assert!(got.tokens.is_empty() && got.reason.is_none());
            } else {
                assert_eq!(
                    got, alone[i],
                    "request {i} ({num_blocks} blocks, budget {budget})"
                );
            }
        }
        assert_eq!(s.stats().failed, 2, "{:?}", s.stats());
        assert_eq!(s.free_blocks(), num_blocks, "every block back");
    }
}

/// A model that fails every forward fails every request, each after a bounded number of
/// retries, rather than retrying forever.
#[test]
fn a_model_that_always_fails_fails_every_request() {
    let mut rng = StdRng::seed_from_u64(12);
    let config = EngineConfig::new(128, 8, 1024);
    let mut runner = FakeRunner::new(&config);
    runner.fail_forward_every = Some(1);
    let mut s = Scheduler::new(runner, config.clone(), decoder());
    let mut streams: Vec<RequestStream> = (0..7)
        .map(|_| {
            let (tx, rx) = channel();
            s.add(request(&mut rng, 20, &[], 5), tx).unwrap();
            rx
        })
        .collect();
    s.step();
    assert!(!s.has_work(), "one step fails them all");
    for rx in &mut streams {
        assert_eq!(collect(rx).error.as_deref(), Some("injected failure"));
    }
    assert_eq!(s.stats().failed, 7);
    assert_eq!(s.free_blocks(), 128);
}

/// A request whose reader takes nothing is cancelled once its unread events reach the bound
/// (all its completions, its blocks freed), while a request that is read completes as alone.
#[test]
fn a_request_never_read_is_cancelled_at_the_output_bound() {
    let mut rng = StdRng::seed_from_u64(13);
    let mut config = EngineConfig::new(256, 8, 1024);
    config.max_buffered_output_bytes = 4096;
    let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
    let mut unread = request(&mut rng, 40, &[], 200);
    unread.stop.eos_token_id = None;
    unread.sampling.logprobs = Some(5);
    unread.n = 4;
    let read = request(&mut rng, 50, &[(4, 16, 2)], 30);
    let expected = run_alone(&config, &read);

    let (tx, mut unread_rx) = channel();
    s.add(unread, tx).unwrap();
    let (tx, mut read_rx) = channel();
    s.add(clone_request(&read), tx).unwrap();
    let mut got = Vec::new();
    let mut steps = 0;
    while s.has_work() {
        s.step();
        steps += 1;
        assert!(
            unread_rx.buffered_bytes() <= 4096 + 1024,
            "{} bytes held",
            unread_rx.buffered_bytes()
        );
        while let Some(event) = read_rx.try_next() {
            got.push(event);
        }
    }
    assert!(
        steps < 200,
        "cancelled long before its 4 × 200 tokens: {steps} steps"
    );
    let tokens: Vec<u32> = got
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(tokens, expected.tokens);
    assert!(matches!(got.last(), Some(Event::Finished { .. })));

    let outcome = collect(&mut unread_rx);
    let error = outcome.error.expect("the unread request is cancelled");
    assert!(error.contains("unread"), "{error}");
    assert!(!outcome.tokens.is_empty() && outcome.reason.is_none());
    assert_eq!(unread_rx.buffered_bytes(), 0);
    let stats = s.stats();
    assert_eq!(stats.output_overflows, 1, "{stats:?}");
    assert_eq!(stats.aborted, 4, "every completion of it: {stats:?}");
    assert_eq!(s.free_blocks(), 256, "its blocks are back");
}

/// Requests with `n` > 1 beside long ones on pools barely larger than one context: the
/// engine always makes progress. (Completions waiting to start hold their prompt's shared
/// blocks; a request first in line that needs more than the rest of the pool must not wait
/// for them forever.)
#[test]
fn forks_and_long_requests_on_a_tiny_pool_always_finish() {
    let mut rng = StdRng::seed_from_u64(21);
    for round in 0..400 {
        let block_size = 4;
        let num_blocks = rng.random_range(24..48);
        let max_len = num_blocks * block_size;
        let mut config = EngineConfig::new(num_blocks, block_size, max_len);
        config.enable_prefix_caching = round % 2 == 0;
        config.max_num_batched_tokens = rng.random_range(16..128);
        let mut s = Scheduler::new(FakeRunner::new(&config), config.clone(), decoder());
        let mut streams = Vec::new();
        for _ in 0..rng.random_range(2..8) {
            let mut r = if rng.random_bool(0.5) {
                let len = rng.random_range(8..max_len / 3);
                let max_tokens = rng.random_range(1..20);
                let mut r = request(&mut rng, len, &[], max_tokens);
                r.n = rng.random_range(2..5);
                r
            } else {
                // Nearly a whole context.
                let len = rng.random_range(4..16);
                let max_tokens = max_len - len - rng.random_range(0..4);
                request(&mut rng, len, &[], max_tokens)
            };
            r.stop.eos_token_id = None;
            let (tx, rx) = channel();
            s.add(r, tx).unwrap();
            streams.push(rx);
        }
        let mut steps = 0;
        while s.has_work() {
            s.step();
            steps += 1;
            assert!(
                steps < 20_000,
                "round {round}: no progress ({:?})",
                s.stats()
            );
        }
        for rx in &mut streams {
            let mut ends = 0;
            while let Some(event) = rx.try_next() {
                assert!(!matches!(event, Event::Error { .. }), "{event:?}");
                ends += matches!(event, Event::Finished { .. }) as usize;
            }
            assert!(ends >= 1, "round {round}: a request never finished");
        }
        assert_eq!(s.free_blocks(), num_blocks, "round {round}");
    }
}
