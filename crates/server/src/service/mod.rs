//! The model behind the engine, built one way for `serve`, `generate`, `bench` and the tests:
//! the weights loaded ([`model`]), the KV cache sized once and that one size given to both
//! the engine and the runner ([`kv_cache`]), and engine requests made from an encoded
//! conversation ([`request`]), and the compiler of their grammars over the model's vocabulary
//! ([`grammar`]).

pub mod grammar;
pub mod kv_cache;
pub mod model;
pub mod request;

use crate::runner::{CandleRunner, TokenizerDecoder};
use anyhow::bail;
use anyhow::Context;
use internvl_model::preprocess::PixelValues;
use internvl_model::LoadedModel;
use internvl_scheduler::{Engine, EngineConfig, GrammarCompiler, ModelRunner};
use kv_cache::{KvCacheLayout, KvCacheSize};
use std::sync::Arc;

/// How an engine is laid out over the model: its block size, its longest sequence and the
/// size of its KV cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineShape {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most tokens of one sequence; the model's positions when `None`.
    pub max_model_len: Option<usize>,
    pub kv_cache: KvCacheSize,
}

/// The model and the engine serving it.
pub struct Service {
    pub loaded: LoadedModel,
    pub engine: Engine<PixelValues>,
    /// Most tokens of one sequence, prompt and answer together.
    pub max_model_len: usize,
    /// The KV cache the engine and the runner share.
    pub kv_cache: KvCacheLayout,
    /// Compiles requests' grammars (structured outputs, tool calls) for this model.
    pub grammars: GrammarCompiler,
}

impl Service {
    /// Starts the engine over `loaded`, shaped by `shape`; `tune` sets the engine's other
    /// knobs (batch limits, caching), never the KV cache's size, which is the shape's.
    pub fn start(
        loaded: LoadedModel,
        shape: &EngineShape,
        tune: impl FnOnce(&mut EngineConfig),
    ) -> anyhow::Result<Service> {
        Self::start_with(loaded, shape, tune, |_, runner| runner)
    }

    /// [`Service::start`] with the runner `wrap` makes of the model's own (a test's faults).
    pub fn start_with<R>(
        loaded: LoadedModel,
        shape: &EngineShape,
        tune: impl FnOnce(&mut EngineConfig),
        wrap: impl FnOnce(&LoadedModel, CandleRunner) -> R,
    ) -> anyhow::Result<Service>
    where
        R: ModelRunner<Pixels = PixelValues>,
    {
        let grammars = grammar::compiler(&loaded.tokenizer, loaded.model.config().llm.vocab_size)
            .context("building the grammar compiler")?;
        let (engine, max_model_len, kv_cache) = start_engine(&loaded, shape, tune, wrap)?;
        Ok(Service {
            loaded,
            engine,
            max_model_len,
            kv_cache,
            grammars,
        })
    }
}

/// Starts an engine over `loaded` (which may serve several engines one after another, as
/// `bench` does): returns it with its longest sequence and its KV cache.
pub fn start_engine<R>(
    loaded: &LoadedModel,
    shape: &EngineShape,
    tune: impl FnOnce(&mut EngineConfig),
    wrap: impl FnOnce(&LoadedModel, CandleRunner) -> R,
) -> anyhow::Result<(Engine<PixelValues>, usize, KvCacheLayout)>
where
    R: ModelRunner<Pixels = PixelValues>,
{
    let max_model_len = max_model_len(loaded, shape.max_model_len)?;
    let layout = shape.kv_cache.layout(
        &loaded.model.config().llm,
        loaded.model.device(),
        loaded.model.kv_dtype(),
        shape.block_size,
        max_model_len,
    )?;
    let (mut config, runner) = layout.parts(loaded, max_model_len)?;
    tune(&mut config);
    if (config.num_blocks, config.block_size) != (layout.num_blocks(), shape.block_size) {
        bail!("the engine's KV cache must be the one its runner holds: set it in the shape");
    }
    let runner = wrap(loaded, runner);
    let decoder = Arc::new(TokenizerDecoder(loaded.tokenizer.clone()));
    let engine = Engine::start(runner, config, decoder).map_err(anyhow::Error::msg)?;
    Ok((engine, max_model_len, layout))
}

/// `wanted`, or the model's positions; never more than those.
fn max_model_len(loaded: &LoadedModel, wanted: Option<usize>) -> anyhow::Result<usize> {
    let positions = loaded.model.config().llm.max_position_embeddings;
    let max_model_len = wanted.unwrap_or(positions);
    if max_model_len > positions {
        bail!("max_model_len {max_model_len} exceeds the model's {positions} positions");
    }
    Ok(max_model_len)
}
