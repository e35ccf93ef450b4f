//! The engine over the real model (the demo checkpoint, f32 on CPU): whatever else is in the
//! batch, whenever it arrives, however it is chunked, preempted or served from the prefix
//! cache, each greedy request yields exactly the tokens it yields alone.

mod common;

use common::{demo_source, root};
use internvl_model::preprocess::{preprocess, PixelValues};
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_model::LoadedModel;
use internvl_scheduler::output::channel;
use internvl_scheduler::scheduler::Scheduler;
use internvl_scheduler::{
    EngineConfig, Event, Request, RequestStream, SamplingParams, StopParams, TokenDecoder,
};
use internvl_server::runner::{CandleRunner, TokenizerDecoder};
use internvl_server::service;
use internvl_server::service::kv_cache::KvCacheSize;
use internvl_server::service::model::Progress;
use internvl_server::service::request::{Generation, PreparedImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const BLOCK_SIZE: usize = 16;
const MAX_TOKENS: usize = 24;

struct Fixture {
    loaded: LoadedModel,
    images: Vec<PreparedImage>,
}

fn fixture() -> Fixture {
    let loaded = demo_source().load(Progress::Quiet).unwrap();
    let images = [
        "model-a.png",
        "model-b.png",
        "jpg_420_333x250.jpg",
        "png_rgb_37x1001.png",
    ]
    .iter()
    .map(|f| {
        let bytes = std::fs::read(root().join("tests/fixtures/images").join(f)).unwrap();
        PreparedImage::new(&bytes, preprocess(&bytes, &loaded.preprocess).unwrap())
    })
    .collect();
    Fixture { loaded, images }
}

/// 32 conversations: text only, one image, two images, multi-turn; different lengths.
fn conversations(rng: &mut StdRng, images: usize) -> Vec<(Vec<ChatMessage>, Vec<usize>)> {
    let questions = [
        "Describe the picture.",
        "这张图片里有什么？请详细描述。",
        "What colour dominates, and where is the brightest region?",
        "数一数图中有几个物体",
        "Hello",
        "Write a long poem about the sea, the wind, the stars and the people who sail at night 海上的夜晚",
    ];
    (0..32)
        .map(|i| {
            let q = questions[rng.random_range(0..questions.len())].to_string();
            let pick = |rng: &mut StdRng| rng.random_range(0..images);
            match i % 4 {
                0 => (vec![ChatMessage::text(Role::User, q)], vec![]),
                1 => {
                    let img = pick(rng);
                    (vec![user(1, &q)], vec![img])
                }
                2 => {
                    let (a, b) = (pick(rng), pick(rng));
                    (vec![user(2, &q)], vec![a, b])
                }
                _ => {
                    let img = pick(rng);
                    let history = vec![
                        user(1, "What is this?"),
                        ChatMessage::text(Role::Assistant, "An image with shapes."),
                        ChatMessage::text(Role::User, q),
                    ];
                    (history, vec![img])
                }
            }
        })
        .collect()
}

fn user(images: usize, text: &str) -> ChatMessage {
    let mut parts = vec![Part::Image; images];
    parts.push(Part::Text(text.into()));
    ChatMessage {
        role: Role::User,
        parts,
    }
}

fn request(f: &Fixture, messages: &[ChatMessage], images: &[usize]) -> Request<PixelValues> {
    let prompt = f.loaded.encode_prompt(messages).unwrap();
    assert_eq!(prompt.image_offsets.len(), images.len());
    let images = images.iter().map(|&img| f.images[img].clone()).collect();
    let generation = Generation {
        sampling: SamplingParams::default(),
        stop: StopParams {
            max_tokens: MAX_TOKENS,
            eos_token_id: Some(f.loaded.tokenizer.eos_id()),
            ..StopParams::default()
        },
        n: 1,
        grammar: None,
    };
    service::request::request(&f.loaded, &prompt, images, generation)
}

fn tokens(rx: &mut RequestStream) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(event) = rx.try_next() {
        match event {
            Event::Token { id, .. } => out.push(id),
            Event::Finished { .. } => return out,
            Event::Error { message, .. } => panic!("request failed: {message}"),
        }
    }
    panic!("request did not finish");
}

/// A scheduler over the demo model whose KV cache holds `blocks` blocks, configured by
/// `tune`.
fn scheduler(
    f: &Fixture,
    blocks: usize,
    tune: impl FnOnce(&mut EngineConfig),
) -> Scheduler<CandleRunner> {
    let max_len = f.loaded.model.config().llm.max_position_embeddings;
    let layout = KvCacheSize::Blocks(blocks)
        .layout(
            &f.loaded.model.config().llm,
            f.loaded.model.device(),
            f.loaded.model.dtype(),
            BLOCK_SIZE,
            max_len,
        )
        .unwrap();
    let (mut config, runner) = layout.parts(&f.loaded, max_len).unwrap();
    tune(&mut config);
    let decoder: Arc<dyn TokenDecoder> = Arc::new(TokenizerDecoder(f.loaded.tokenizer.clone()));
    Scheduler::new(runner, config, decoder)
}

#[test]
fn each_request_yields_what_it_yields_alone() {
    let f = fixture();
    let mut rng = StdRng::seed_from_u64(11);
    let convs = conversations(&mut rng, f.images.len());

    let mut alone = scheduler(&f, 64, |config| config.enable_prefix_caching = false);
    let expected: Vec<Vec<u32>> = convs
        .iter()
        .map(|(m, imgs)| {
            let (tx, mut rx) = channel();
            alone.add(request(&f, m, imgs), tx).unwrap();
            while alone.has_work() {
                alone.step();
            }
            tokens(&mut rx)
        })
        .collect();

    // (prefix caching, blocks, token budget): roomy; preempting; preempting with small chunks.
    for (prefix, blocks, budget) in [(true, 1200, 2048), (false, 40, 2048), (true, 40, 300)] {
        let mut s = scheduler(&f, blocks, |config| {
            config.enable_prefix_caching = prefix;
            config.max_num_batched_tokens = budget;
            config.max_images_per_step = 3;
        });
        let mut arrivals: Vec<usize> = (0..convs.len()).map(|_| rng.random_range(0..12)).collect();
        arrivals.sort();
        let mut streams = Vec::new();
        let mut step = 0;
        while streams.len() < convs.len() || s.has_work() {
            while streams.len() < convs.len() && arrivals[streams.len()] <= step {
                let (m, imgs) = &convs[streams.len()];
                let (tx, rx) = channel();
                s.add(request(&f, m, imgs), tx).unwrap();
                streams.push(rx);
            }
            s.step();
            step += 1;
        }
        let stats = s.stats().clone();
        for (i, rx) in streams.iter_mut().enumerate() {
            assert_eq!(
                tokens(rx),
                expected[i],
                "request {i}: prefix {prefix}, {blocks} blocks, budget {budget}"
            );
        }
        assert_eq!(s.free_blocks(), blocks);
        if blocks < 100 {
            assert!(
                stats.preemptions > 0,
                "the small pool must force preemption"
            );
        }
        if prefix {
            assert!(stats.prefix_hits > 0);
        }
        println!(
            "prefix {prefix}, {blocks} blocks, budget {budget}: {step} steps, {} preemptions, prefix hits {}/{}, image cache hits {}/{}",
            stats.preemptions, stats.prefix_hits, stats.prefix_queries, stats.image_cache_hits, stats.image_cache_queries
        );
    }
}
