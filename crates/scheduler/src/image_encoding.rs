//! A step's images: embeddings for every image the plan's spans reach, from the encoder cache
//! or from one batched call of the vision encoder, with a failure traced to its images.

use crate::content_hash::ContentHash;
use crate::encoder_cache::EncoderCache;
use crate::policy::{Queues, StepPlan};
use crate::runner::{contain, ModelRunner, RunnerError};
use crate::sequence::SeqId;
use crate::stats::EngineStats;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Encoder outputs of this step, by image content.
type Encoded<E> = HashMap<ContentHash, Arc<E>>;

/// The vision encoder and its cache, as a step uses them.
pub(crate) struct ImageEncoding<'a, R: ModelRunner> {
    pub runner: &'a mut R,
    pub cache: &'a mut EncoderCache<R::ImageEmbeds>,
    pub stats: &'a mut EngineStats,
}

impl<R: ModelRunner> ImageEncoding<'_, R> {
    /// Gives every image the plan needs its embeddings: from the encoder cache, or encoded
    /// now, all in one batch. If the batch fails, each image is encoded alone, so that only
    /// the sequences whose own image fails are returned, with the error, to be failed.
    /// Only successful outputs enter the encoder cache.
    pub fn encode(
        &mut self,
        queues: &mut Queues<R::Pixels, R::ImageEmbeds>,
        plan: &StepPlan,
    ) -> Vec<(SeqId, RunnerError)> {
        let mut order: Vec<ContentHash> = Vec::new();
        let mut pixels = Vec::new();
        for scheduled in plan {
            let seq = queues.running_mut(scheduled.seq);
            for image in seq.images_mut() {
                let hash = image.content_hash();
                if image.embeds().is_some()
                    || image.rows_in(&scheduled.span).is_none()
                    || order.contains(&hash)
                {
                    continue;
                }
                match self.cache.get(hash) {
                    Some(embeds) => image.set_embeds(embeds),
                    None => {
                        order.push(hash);
                        pixels.push(image.pixels().clone());
                    }
                }
            }
        }
        if pixels.is_empty() {
            return Vec::new();
        }
        let refs: Vec<&R::Pixels> = pixels.iter().map(|p| p.as_ref()).collect();
        let mut encoded = Encoded::new();
        let mut broken: HashMap<ContentHash, RunnerError> = HashMap::new();
        match self.encode_batch(&refs) {
            Ok(outputs) => self.keep(&order, outputs, &mut encoded),
            Err(e) if refs.len() == 1 => {
                broken.insert(order[0], e);
            }
            Err(_) => {
                for (hash, image) in order.iter().zip(&refs) {
                    match self.encode_batch(&[image]) {
                        Ok(outputs) => self.keep(&[*hash], outputs, &mut encoded),
                        Err(e) => {
                            broken.insert(*hash, e);
                        }
                    }
                }
            }
        }
        let mut failed = Vec::new();
        for scheduled in plan {
            for image in queues.running_mut(scheduled.seq).images_mut() {
                let hash = image.content_hash();
                if let Some(e) = broken.get(&hash) {
                    failed.push((scheduled.seq, e.clone()));
                    break;
                }
                if image.embeds().is_none() {
                    if let Some(embeds) = encoded.get(&hash) {
                        image.set_embeds(embeds.clone());
                    }
                }
            }
        }
        failed
    }

    /// One call of the encoder, checked to give one output per image.
    fn encode_batch(&mut self, images: &[&R::Pixels]) -> Result<Vec<R::ImageEmbeds>, RunnerError> {
        let started = Instant::now();
        let outputs = contain(|| self.runner.encode_images(images));
        self.stats.encode_time += started.elapsed();
        let outputs = outputs?;
        if outputs.len() != images.len() {
            return Err(RunnerError(format!(
                "encoder returned {} outputs for {} images",
                outputs.len(),
                images.len()
            )));
        }
        self.stats.images_encoded += images.len() as u64;
        Ok(outputs)
    }

    /// Caches the encoder's `outputs` for the images `order` names, and notes them for this
    /// step.
    fn keep(
        &mut self,
        order: &[ContentHash],
        outputs: Vec<R::ImageEmbeds>,
        encoded: &mut Encoded<R::ImageEmbeds>,
    ) {
        for (hash, out) in order.iter().zip(outputs) {
            let bytes = self.runner.embeds_bytes(&out);
            let out = Arc::new(out);
            self.cache.insert(*hash, out.clone(), bytes);
            encoded.insert(*hash, out);
        }
    }
}
