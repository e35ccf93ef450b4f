//! The demo checkpoint (`models/demo-internvl`): its tokenizer is the real upstream tokenizer
//! layout, and its model gives the prompt template and image-token counts the server uses.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use internvl_model::tokenizer::Tokenizer;
use internvl_model::{AttentionChoice, Backends, LoadedModel};

/// The checkpoint directory, found from this crate's location so targets run from anywhere.
pub fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo-internvl")
}

/// The demo checkpoint on the CPU, loaded by the first call (loading per input would dwarf
/// the code under test).
pub fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let cpu = &candle_core::Device::Cpu;
        let backends = Backends::resolve(cpu, None, AttentionChoice::Auto).expect("f32 on the CPU");
        LoadedModel::load(&demo_dir(), &backends).expect("the demo checkpoint loads")
    })
}

/// The demo checkpoint's tokenizer (SentencePiece under the slow LlamaTokenizer's rules).
pub fn tokenizer() -> Arc<Tokenizer> {
    model().tokenizer.clone()
}

/// The same vocabulary through the `tokenizers` crate (`tokenizer.json`), the path a
/// checkpoint that ships one takes.
pub fn json_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer-json");
        Tokenizer::from_dir(&dir).expect("the tokenizer.json fixture loads")
    })
}
