//! The model against the independent reference: transformers' InternVL (pixel shuffle
//! patched to v1, `vision_feature_layer=-4`) on the same bf16-rounded random weights, run by
//! `scripts/reference/generate_model.py`. Everything here runs in f32.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use internvl_model::preprocess::preprocess;
use internvl_model::SequenceSlice;

/// Tolerances the issue sets for f32: absolute and relative to the reference's magnitude.
const MAX_ABS: f32 = 1e-3;
const MAX_REL: f32 = 1e-4;

#[test]
fn pixel_values_match_pillow() {
    let (loaded, reference) = (load_demo(), Reference::load());
    for image in reference.meta["images"].as_array().unwrap() {
        let file = image["file"].as_str().unwrap();
        let stride = image["pixel_values_stride"].as_u64().unwrap() as usize;
        let bytes = std::fs::read(images_dir().join(file)).unwrap();
        let pixels = preprocess(&bytes, &loaded.preprocess).unwrap();
        let sample: Vec<f32> = pixels.data.iter().step_by(stride).copied().collect();
        let ours = Tensor::new(sample, &Device::Cpu).unwrap();
        let (abs, rel) = errors(
            &ours,
            reference.tensor(&format!("pixel_values.{}", file.trim_end_matches(".png"))),
        );
        let sum: f64 = pixels.data.iter().map(|&v| v as f64).sum();
        let ref_sum = image["pixel_values_sum"].as_f64().unwrap();
        println!(
            "{file}: pixel values max abs {abs:.2e}, rel {rel:.2e}, sum {sum:.4} vs {ref_sum:.4}"
        );
        assert!(abs < 1e-5, "{file}: pixel values differ by {abs}");
        assert!(
            (sum - ref_sum).abs() < 1e-2,
            "{file}: sums {sum} vs {ref_sum}"
        );
    }
}

#[test]
fn vision_embeddings_match_reference() {
    let (loaded, reference) = (load_demo(), Reference::load());
    let files: Vec<_> = reference.meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["file"].as_str().unwrap().to_string())
        .collect();
    let paths: Vec<_> = files.iter().map(|f| images_dir().join(f)).collect();
    let rows = image_rows(&loaded, &paths).unwrap();
    let tokens = loaded.model.config().num_image_tokens();
    for (i, file) in files.iter().enumerate() {
        let ours = rows.narrow(0, i * tokens, tokens).unwrap();
        let name = format!("vision_embeds.{}", file.trim_end_matches(".png"));
        let (abs, rel) = errors(&ours, reference.tensor(&name));
        println!("{file}: vision embeddings max abs {abs:.2e}, rel {rel:.2e}");
        assert!(
            abs < MAX_ABS && rel < MAX_REL,
            "{file}: abs {abs}, rel {rel}"
        );
    }
}

#[test]
fn prompts_and_token_ids_match_reference() {
    let (loaded, reference) = (load_demo(), Reference::load());
    for case in reference.cases() {
        let name = case["name"].as_str().unwrap();
        let (messages, _) = case_messages(case);
        let prompt = loaded.encode_prompt(&messages).unwrap();
        assert_eq!(
            prompt.text,
            case["prompt"].as_str().unwrap(),
            "{name}: prompt"
        );
        assert_eq!(prompt.ids, ids(&case["input_ids"]), "{name}: ids");
    }
}

#[test]
fn logits_and_greedy_tokens_match_reference() {
    let (loaded, reference) = (load_demo(), Reference::load());
    for case in reference.cases() {
        let name = case["name"].as_str().unwrap();
        let (_, files) = case_messages(case);
        let images = image_rows(&loaded, &files);
        let expected_tokens = ids(&case["greedy_tokens"]);
        let (logits, tokens) = greedy(
            &loaded,
            &ids(&case["input_ids"]),
            images.as_ref(),
            expected_tokens.len(),
        );
        let (abs, rel) = errors(&logits, reference.tensor(&format!("logits.{name}")));
        println!(
            "{name}: first-position logits max abs {abs:.2e}, rel {rel:.2e}; {} greedy tokens",
            tokens.len()
        );
        assert!(
            abs < MAX_ABS && rel < MAX_REL,
            "{name}: abs {abs}, rel {rel}"
        );
        assert_eq!(tokens, expected_tokens, "{name}: greedy tokens");
    }
}

/// All cases in one batch, with interleaved block tables, prefill and decode mixed: each
/// sequence must see exactly what it sees alone.
#[test]
fn batched_sequences_match_reference() {
    let (loaded, reference) = (load_demo(), Reference::load());
    let model = &loaded.model;
    let cases = reference.cases();
    let block_size = 16;
    let steps = 8;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
    let blocks: Vec<usize> = prompts
        .iter()
        .map(|p| (p.len() + steps).div_ceil(block_size))
        .collect();
    let mut cache = model.new_kv_cache(blocks.iter().sum(), block_size).unwrap();
    // Blocks are handed out round-robin, so every block table is interleaved with the others.
    let n = cases.len();
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut next = 0u32;
    for b in 0..*blocks.iter().max().unwrap() {
        for i in (0..n).rev() {
            if b < blocks[i] {
                tables[i].push(next);
                next += 1;
            }
        }
    }
    assert_eq!(next as usize, cache.num_blocks());

    let mut embeds = Vec::new();
    let mut slices = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (_, files) = case_messages(case);
        let images = image_rows(&loaded, &files);
        embeds.push(model.embed(&prompts[i], images.as_ref()).unwrap());
        slices.push(SequenceSlice {
            start: 0,
            len: prompts[i].len(),
            block_table: tables[i].clone(),
            wants_logits: true,
        });
    }
    let logits = model
        .forward(&Tensor::cat(&embeds, 0).unwrap(), &slices, &mut cache)
        .unwrap();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut logits = logits;
    for step in 0..steps {
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let best: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        for (i, row) in rows.iter().enumerate() {
            if step == 0 {
                let name = cases[i]["name"].as_str().unwrap();
                let (abs, rel) = errors(
                    &Tensor::new(row.as_slice(), &Device::Cpu).unwrap(),
                    reference.tensor(&format!("logits.{name}")),
                );
                println!("{name} in a batch of {n}: logits max abs {abs:.2e}, rel {rel:.2e}");
                assert!(abs < MAX_ABS && rel < MAX_REL);
            }
            generated[i].push(best[i]);
        }
        if step + 1 == steps {
            break;
        }
        let tokens: Vec<u32> = generated.iter().map(|g| *g.last().unwrap()).collect();
        let embeddings = model.embed(&tokens, None).unwrap();
        let slices: Vec<_> = (0..n)
            .map(|i| SequenceSlice {
                start: prompts[i].len() + step,
                len: 1,
                block_table: tables[i].clone(),
                wants_logits: true,
            })
            .collect();
        logits = model.forward(&embeddings, &slices, &mut cache).unwrap();
    }
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            generated[i],
            ids(&case["greedy_tokens"])[..steps],
            "{}",
            case["name"]
        );
    }
}
