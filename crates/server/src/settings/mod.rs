//! `internvl serve` settings: flags > environment (`INTERNVL_*`) > config file > defaults.
//!
//! Each setting is declared once below; the macro gives it its flag, its environment
//! variable, its config-file key (the flag's name with underscores), its help (with the
//! default from [`defaults`]) and the merge.

pub mod defaults;
mod origins;
mod sizes;

pub use origins::AllowedOrigins;
pub use sizes::KvCacheMemory;

use crate::device::parse_dtype;
use anyhow::{bail, Context};
use candle_core::DType;
use internvl_model::quant::{parse_quant, Quantization};
use internvl_model::AttentionChoice;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty, env = $env:literal, default = $default:expr; )*) => {
        /// Every setting as given; `None` where not given.
        #[derive(clap::Args, Deserialize, Debug, Default, Clone)]
        #[serde(deny_unknown_fields)]
        pub struct ServeArgs {
            /// TOML file with any of these settings (keys: the flag names with underscores).
            #[arg(long, env = "INTERNVL_CONFIG")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    env = $env,
                    help = help_text(&[$($doc),*], &$default),
                    num_args = value_count::<$ty>(),
                    default_missing_value = bare_value::<$ty>(),
                )]
                pub $name: Option<$ty>,
            )*
            /// Accepted API key (repeatable; also comma-separated in INTERNVL_API_KEY).
            #[arg(long = "api-key", env = "INTERNVL_API_KEY", value_delimiter = ',')]
            #[serde(default)]
            pub api_key: Vec<String>,
        }

        impl ServeArgs {
            /// Fills what `self` lacks from `lower`.
            fn or(self, lower: ServeArgs) -> ServeArgs {
                ServeArgs {
                    config: self.config,
                    $( $name: self.$name.or(lower.$name), )*
                    api_key: if self.api_key.is_empty() { lower.api_key } else { self.api_key },
                }
            }
        }
    };
}

/// A yes/no setting works as a bare flag (`--allow-private-image-urls` means true) as well as
/// with a value (`--enable-prefix-caching false`); every other setting takes exactly one value.
fn is_switch<T: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<bool>()
}

fn value_count<T: 'static>() -> clap::builder::ValueRange {
    if is_switch::<T>() {
        (0..=1).into()
    } else {
        1.into()
    }
}

fn bare_value<T: 'static>() -> Option<&'static str> {
    is_switch::<T>().then_some("true")
}

/// A setting's help: its doc comment's lines joined, without the closing period, then its
/// default.
fn help_text(doc: &[&str], default: &dyn std::fmt::Display) -> String {
    let text: Vec<&str> = doc.iter().map(|line| line.trim()).collect();
    let text = text.join(" ");
    format!("{} [default: {default}]", text.trim_end_matches('.'))
}

settings! {
    /// Checkpoint directory; with random_weights, only its tokenizer is used.
    model: PathBuf, env = "INTERNVL_MODEL", default = "the bundled demo checkpoint";
    /// Random weights for the model this config.json (InternVLChatConfig format) describes,
    /// instead of a checkpoint's: for benchmarks without the real weights.
    random_weights: PathBuf, env = "INTERNVL_RANDOM_WEIGHTS", default = "none";
    /// Model name clients send and see.
    served_model_name: String, env = "INTERNVL_SERVED_MODEL_NAME",
        default = "the checkpoint directory's name";
    /// Address to listen on.
    host: String, env = "INTERNVL_HOST", default = defaults::HOST;
    /// Port to listen on.
    port: u16, env = "INTERNVL_PORT", default = defaults::PORT;
    /// cpu, cuda or cuda:N.
    device: String, env = "INTERNVL_DEVICE", default = defaults::DEVICE;
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16.
    dtype: String, env = "INTERNVL_DTYPE", default = defaults::DTYPE;
    /// Attention: auto (the device's fastest), kernels (the CUDA kernels) or matmul (candle's
    /// ops everywhere).
    attention: String, env = "INTERNVL_ATTENTION", default = defaults::ATTENTION;
    /// Quantize the language model's linear layers while loading: none, q8_0, q6k, q5k, q4k
    /// (or q5_1, q5_0, q4_0). The LM head gets at least q6k.
    quantize: String, env = "INTERNVL_QUANTIZE", default = "none";
    /// Quantize the vision encoder's linear layers while loading: none or q8_0 (its
    /// 3200-wide rows take no k-quant; one asked for falls back per layer).
    quantize_vision: String, env = "INTERNVL_QUANTIZE_VISION", default = "none";
    /// KV-cache element type: auto (the compute dtype), or f16 or bf16 on the CPU (half the
    /// bytes decode attention reads, and twice the tokens per --kv-cache-memory).
    kv_cache_dtype: String, env = "INTERNVL_KV_CACHE_DTYPE", default = "auto";
    /// Most sequences in one engine step.
    max_num_seqs: usize, env = "INTERNVL_MAX_NUM_SEQS", default = defaults::MAX_NUM_SEQS;
    /// Most tokens in one engine step.
    max_num_batched_tokens: usize, env = "INTERNVL_MAX_NUM_BATCHED_TOKENS",
        default = defaults::MAX_NUM_BATCHED_TOKENS;
    /// Most tokens (prompt + completion) of one sequence.
    max_model_len: usize, env = "INTERNVL_MAX_MODEL_LEN", default = "the model's";
    /// KV-cache memory: bytes (suffixes KB, MB, GB, KiB, MiB, GiB) or a fraction such as 0.9
    /// of the memory free after loading the weights.
    kv_cache_memory: String, env = "INTERNVL_KV_CACHE_MEMORY",
        default = defaults::KV_CACHE_MEMORY;
    /// Tokens per KV-cache block.
    block_size: usize, env = "INTERNVL_BLOCK_SIZE", default = defaults::BLOCK_SIZE;
    /// Requests that may wait beyond the running ones before new ones get 429.
    max_queued_requests: usize, env = "INTERNVL_MAX_QUEUED_REQUESTS",
        default = defaults::MAX_QUEUED_REQUESTS;
    /// Most images in one request.
    max_images_per_request: usize, env = "INTERNVL_MAX_IMAGES_PER_REQUEST",
        default = defaults::MAX_IMAGES_PER_REQUEST;
    /// Most images the vision encoder runs in one engine step (one batched pass).
    max_images_per_step: usize, env = "INTERNVL_MAX_IMAGES_PER_STEP",
        default = defaults::MAX_IMAGES_PER_STEP;
    /// Reuse the KV of shared prompt prefixes.
    enable_prefix_caching: bool, env = "INTERNVL_ENABLE_PREFIX_CACHING",
        default = defaults::ENABLE_PREFIX_CACHING;
    /// Most bytes of output one request may hold generated and not yet read by its client;
    /// past it the request is cancelled, so a client that never reads costs a bounded amount
    /// of memory.
    max_buffered_output_bytes: usize, env = "INTERNVL_MAX_BUFFERED_OUTPUT_BYTES",
        default = defaults::MAX_BUFFERED_OUTPUT_BYTES;
    /// Largest request body in bytes.
    max_body_bytes: usize, env = "INTERNVL_MAX_BODY_BYTES", default = defaults::MAX_BODY_BYTES;
    /// Most bytes of text in one prompt, all messages together; longer prompts get 400 before
    /// tokenizing.
    max_prompt_bytes: usize, env = "INTERNVL_MAX_PROMPT_BYTES",
        default = defaults::MAX_PROMPT_BYTES;
    /// Largest image file in bytes.
    max_image_bytes: usize, env = "INTERNVL_MAX_IMAGE_BYTES",
        default = defaults::MAX_IMAGE_BYTES;
    /// Most bytes of image files in one request, all its images together.
    max_request_image_bytes: usize, env = "INTERNVL_MAX_REQUEST_IMAGE_BYTES",
        default = defaults::MAX_REQUEST_IMAGE_BYTES;
    /// Memory for images across all requests (files being fetched, pixels held while a request
    /// lives); past it, new image requests get 429.
    max_image_memory: usize, env = "INTERNVL_MAX_IMAGE_MEMORY",
        default = defaults::MAX_IMAGE_MEMORY;
    /// Largest decoded image in pixels (decompression-bomb guard).
    max_image_pixels: u64, env = "INTERNVL_MAX_IMAGE_PIXELS",
        default = defaults::MAX_IMAGE_PIXELS;
    /// Seconds to fetch an http(s) image.
    image_fetch_timeout: u64, env = "INTERNVL_IMAGE_FETCH_TIMEOUT",
        default = defaults::IMAGE_FETCH_TIMEOUT;
    /// Allow image URLs on loopback, private and link-local addresses.
    allow_private_image_urls: bool, env = "INTERNVL_ALLOW_PRIVATE_IMAGE_URLS",
        default = defaults::ALLOW_PRIVATE_IMAGE_URLS;
    /// Directory `file://` image URLs may read from.
    local_image_dir: PathBuf, env = "INTERNVL_LOCAL_IMAGE_DIR",
        default = "none, file URLs refused";
    /// Web origins whose pages may call the API (CORS): none, `*`, or a comma-separated list
    /// such as https://app.example.
    allowed_origins: String, env = "INTERNVL_ALLOWED_ORIGINS",
        default = defaults::ALLOWED_ORIGINS;
    /// Images preprocessed at once.
    preprocess_workers: usize, env = "INTERNVL_PREPROCESS_WORKERS",
        default = "the number of CPUs";
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    shutdown_timeout: u64, env = "INTERNVL_SHUTDOWN_TIMEOUT",
        default = defaults::SHUTDOWN_TIMEOUT;
    /// Seconds a client has to send a request's headers, from its first byte.
    header_read_timeout: u64, env = "INTERNVL_HEADER_READ_TIMEOUT",
        default = defaults::HEADER_READ_TIMEOUT;
    /// Seconds a client has to send a whole request body, from the end of its headers.
    body_read_timeout: u64, env = "INTERNVL_BODY_READ_TIMEOUT",
        default = defaults::BODY_READ_TIMEOUT;
    /// Seconds a connection may sit with no request before it is closed.
    idle_timeout: u64, env = "INTERNVL_IDLE_TIMEOUT", default = defaults::IDLE_TIMEOUT;
    /// Most open client connections; more are closed as soon as accepted.
    max_connections: usize, env = "INTERNVL_MAX_CONNECTIONS",
        default = defaults::MAX_CONNECTIONS;
    /// Largest request head (request line and headers) in bytes, at least 8192.
    max_header_bytes: usize, env = "INTERNVL_MAX_HEADER_BYTES",
        default = defaults::MAX_HEADER_BYTES;
    /// Log format: text or json.
    log_format: String, env = "INTERNVL_LOG_FORMAT", default = defaults::LOG_FORMAT;
}

/// Settings with every default applied and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub model: PathBuf,
    pub using_demo: bool,
    /// The config file whose model is built with random weights instead of loaded.
    pub random_weights: Option<PathBuf>,
    pub served_model_name: String,
    pub host: String,
    pub port: u16,
    pub device: String,
    pub dtype: String,
    pub attention: AttentionChoice,
    pub quantization: Quantization,
    /// `None`: the compute dtype.
    pub kv_cache_dtype: Option<DType>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: Option<usize>,
    /// `None`: the device's default.
    pub kv_cache_memory: Option<KvCacheMemory>,
    pub block_size: usize,
    pub max_queued_requests: usize,
    pub max_images_per_request: usize,
    pub max_images_per_step: usize,
    pub enable_prefix_caching: bool,
    pub max_buffered_output_bytes: usize,
    pub max_body_bytes: usize,
    pub max_prompt_bytes: usize,
    pub max_image_bytes: usize,
    pub max_request_image_bytes: usize,
    pub max_image_memory: usize,
    pub max_image_pixels: u64,
    pub image_fetch_timeout: u64,
    pub allow_private_image_urls: bool,
    pub local_image_dir: Option<PathBuf>,
    pub allowed_origins: AllowedOrigins,
    pub preprocess_workers: usize,
    pub shutdown_timeout: u64,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub json_logs: bool,
    pub api_keys: Vec<String>,
}

impl Settings {
    /// Merges flags and environment (`args`) over the config file, then the defaults.
    pub fn resolve(args: ServeArgs, demo_dir: PathBuf) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => ServeArgs::default(),
        };
        let a = args.or(file);
        let using_demo = a.model.is_none();
        let model = a.model.unwrap_or(demo_dir);
        let served_model_name = match (a.served_model_name, &a.random_weights) {
            (Some(name), _) => name,
            (None, Some(config)) => config
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "internvl".into()),
            (None, None) => model
                .canonicalize()
                .unwrap_or(model.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "internvl".into()),
        };
        let log_format = a.log_format.unwrap_or_else(|| defaults::LOG_FORMAT.into());
        if log_format != "text" && log_format != "json" {
            bail!("log_format must be text or json, got `{log_format}`");
        }
        let settings = Settings {
            model,
            using_demo,
            random_weights: a.random_weights,
            served_model_name,
            host: a.host.unwrap_or_else(|| defaults::HOST.into()),
            port: a.port.unwrap_or(defaults::PORT),
            device: a.device.unwrap_or_else(|| defaults::DEVICE.into()),
            dtype: a.dtype.unwrap_or_else(|| defaults::DTYPE.into()),
            attention: a
                .attention
                .as_deref()
                .unwrap_or(defaults::ATTENTION)
                .parse()
                .context("attention")?,
            quantization: Quantization {
                llm: parse_quant(a.quantize.as_deref().unwrap_or("none")).context("quantize")?,
                vision: parse_quant(a.quantize_vision.as_deref().unwrap_or("none"))
                    .context("quantize_vision")?,
            },
            kv_cache_dtype: parse_dtype(a.kv_cache_dtype.as_deref().unwrap_or("auto"))
                .context("kv_cache_dtype")?,
            max_num_seqs: positive(
                "max_num_seqs",
                a.max_num_seqs.unwrap_or(defaults::MAX_NUM_SEQS),
            )?,
            max_num_batched_tokens: positive(
                "max_num_batched_tokens",
                a.max_num_batched_tokens
                    .unwrap_or(defaults::MAX_NUM_BATCHED_TOKENS),
            )?,
            max_model_len: a
                .max_model_len
                .map(|v| positive("max_model_len", v))
                .transpose()?,
            kv_cache_memory: a
                .kv_cache_memory
                .as_deref()
                .map(KvCacheMemory::parse)
                .transpose()
                .context("kv_cache_memory")?,
            block_size: positive("block_size", a.block_size.unwrap_or(defaults::BLOCK_SIZE))?,
            max_queued_requests: a
                .max_queued_requests
                .unwrap_or(defaults::MAX_QUEUED_REQUESTS),
            max_images_per_request: a
                .max_images_per_request
                .unwrap_or(defaults::MAX_IMAGES_PER_REQUEST),
            max_images_per_step: positive(
                "max_images_per_step",
                a.max_images_per_step
                    .unwrap_or(defaults::MAX_IMAGES_PER_STEP),
            )?,
            enable_prefix_caching: a
                .enable_prefix_caching
                .unwrap_or(defaults::ENABLE_PREFIX_CACHING),
            max_buffered_output_bytes: positive(
                "max_buffered_output_bytes",
                a.max_buffered_output_bytes
                    .unwrap_or(defaults::MAX_BUFFERED_OUTPUT_BYTES.0),
            )?,
            max_body_bytes: positive(
                "max_body_bytes",
                a.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES.0),
            )?,
            max_prompt_bytes: positive(
                "max_prompt_bytes",
                a.max_prompt_bytes.unwrap_or(defaults::MAX_PROMPT_BYTES.0),
            )?,
            max_image_bytes: positive(
                "max_image_bytes",
                a.max_image_bytes.unwrap_or(defaults::MAX_IMAGE_BYTES.0),
            )?,
            max_request_image_bytes: positive(
                "max_request_image_bytes",
                a.max_request_image_bytes
                    .unwrap_or(defaults::MAX_REQUEST_IMAGE_BYTES.0),
            )?,
            max_image_memory: positive(
                "max_image_memory",
                a.max_image_memory.unwrap_or(defaults::MAX_IMAGE_MEMORY.0),
            )?,
            max_image_pixels: a.max_image_pixels.unwrap_or(defaults::MAX_IMAGE_PIXELS),
            image_fetch_timeout: a
                .image_fetch_timeout
                .unwrap_or(defaults::IMAGE_FETCH_TIMEOUT),
            allow_private_image_urls: a
                .allow_private_image_urls
                .unwrap_or(defaults::ALLOW_PRIVATE_IMAGE_URLS),
            local_image_dir: a.local_image_dir,
            allowed_origins: AllowedOrigins::parse(
                a.allowed_origins
                    .as_deref()
                    .unwrap_or(defaults::ALLOWED_ORIGINS),
            )?,
            preprocess_workers: a
                .preprocess_workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            shutdown_timeout: a.shutdown_timeout.unwrap_or(defaults::SHUTDOWN_TIMEOUT),
            header_read_timeout: seconds(
                "header_read_timeout",
                a.header_read_timeout,
                defaults::HEADER_READ_TIMEOUT,
            )?,
            body_read_timeout: seconds(
                "body_read_timeout",
                a.body_read_timeout,
                defaults::BODY_READ_TIMEOUT,
            )?,
            idle_timeout: seconds("idle_timeout", a.idle_timeout, defaults::IDLE_TIMEOUT)?,
            max_connections: positive(
                "max_connections",
                a.max_connections.unwrap_or(defaults::MAX_CONNECTIONS),
            )?,
            max_header_bytes: at_least(
                "max_header_bytes",
                a.max_header_bytes.unwrap_or(defaults::MAX_HEADER_BYTES),
                MIN_HEADER_BYTES,
            )?,
            json_logs: log_format == "json",
            api_keys: api_keys(a.api_key)?,
        };
        Ok(settings)
    }
}

fn read_file(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

fn positive(name: &str, value: usize) -> anyhow::Result<usize> {
    at_least(name, value, 1)
}

fn at_least(name: &str, value: usize, least: usize) -> anyhow::Result<usize> {
    if value < least {
        bail!("{name} must be at least {least}");
    }
    Ok(value)
}

/// The smallest read buffer hyper's HTTP/1 server accepts, so the smallest head limit.
const MIN_HEADER_BYTES: usize = 8192;

/// A timeout in whole seconds: zero would close every connection at once, so it is refused.
fn seconds(name: &str, value: Option<u64>, default: u64) -> anyhow::Result<Duration> {
    match value.unwrap_or(default) {
        0 => bail!("{name} must be at least 1 second"),
        secs => Ok(Duration::from_secs(secs)),
    }
}

/// Keys trimmed of surrounding spaces (`INTERNVL_API_KEY="a, b"` means `a` and `b`). An empty
/// key is an error: `--api-key ""` must not quietly leave the API open.
fn api_keys(given: Vec<String>) -> anyhow::Result<Vec<String>> {
    given
        .into_iter()
        .map(|key| match key.trim() {
            "" => bail!(
                "api_key: an empty API key was given (check --api-key, INTERNVL_API_KEY and \
                 the config file); give a non-empty key, or none to serve without \
                 authentication"
            ),
            key => Ok(key.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("internvl-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "port = 9000\nblock_size = 32\napi_key = [\"a\"]\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", file.to_str().unwrap(), "--port", "9100"]);
        let s = Settings::resolve(cli.args, PathBuf::from("/models/demo")).unwrap();
        assert_eq!((s.port, s.block_size, s.max_num_seqs), (9100, 32, 256));
        assert_eq!(s.api_keys, vec!["a".to_string()]);
        assert!(s.using_demo);
        assert_eq!(s.served_model_name, "demo");
        std::fs::write(&file, "prot = 1\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", file.to_str().unwrap()]);
        let err = format!(
            "{:#}",
            Settings::resolve(cli.args, PathBuf::new()).unwrap_err()
        );
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn yes_no_settings_work_bare_or_with_a_value() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).map(|cli| cli.args);
        let bare = parse(&["x", "--allow-private-image-urls", "--port", "9"]).unwrap();
        assert_eq!(bare.allow_private_image_urls, Some(true));
        assert_eq!(bare.port, Some(9));
        let off = parse(&["x", "--enable-prefix-caching", "false"]).unwrap();
        assert_eq!(off.enable_prefix_caching, Some(false));
        let on = parse(&["x", "--enable-prefix-caching=true"]).unwrap();
        assert_eq!(on.enable_prefix_caching, Some(true));
        assert!(parse(&["x", "--allow-private-image-urls", "maybe"]).is_err());
        // Every other setting still needs its value.
        assert!(parse(&["x", "--port"]).is_err());
        assert!(parse(&["x", "--max-num-seqs", "--port", "9"]).is_err());
    }

    #[test]
    fn the_shipped_config_file_restates_the_defaults() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default.toml");
        let text = std::fs::read_to_string(file).unwrap();
        let stated: toml::Table = toml::from_str(&text).unwrap();
        assert!(stated.len() >= 29, "{} settings stated", stated.len());
        let with_file = ServeArgs {
            config: Some(file.into()),
            ..ServeArgs::default()
        };
        let demo = PathBuf::from("/models/demo");
        assert_eq!(
            Settings::resolve(with_file, demo.clone()).unwrap(),
            Settings::resolve(ServeArgs::default(), demo).unwrap()
        );
    }

    #[test]
    fn help_shows_each_default() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        for shown in [
            "Port to listen on [default: 8000]",
            "Largest request body in bytes [default: 64 MiB]",
            "[default: 1 GiB on CPU, 30 GiB on CUDA]",
            "[default: the bundled demo checkpoint]",
        ] {
            assert!(help.contains(shown), "{shown}: {help}");
        }
    }

    #[test]
    fn random_weights_from_flag_or_file() {
        let cli = Cli::parse_from(["x", "--random-weights", "config/models/big.json"]);
        let s = Settings::resolve(cli.args, PathBuf::from("/models/demo")).unwrap();
        assert_eq!(
            s.random_weights,
            Some(PathBuf::from("config/models/big.json"))
        );
        assert_eq!(s.model, PathBuf::from("/models/demo"));
        assert_eq!(s.served_model_name, "big");
        let args: ServeArgs = toml::from_str("random_weights = \"a/b.json\"").unwrap();
        let s = Settings::resolve(args, PathBuf::new()).unwrap();
        assert_eq!(s.random_weights, Some(PathBuf::from("a/b.json")));
        let s = Settings::resolve(ServeArgs::default(), PathBuf::new()).unwrap();
        assert_eq!(s.random_weights, None);
    }

    #[test]
    fn quantization_from_flags_or_file() {
        use internvl_model::quant::WeightQuant;
        let cli = Cli::parse_from(["x", "--quantize", "q4_k", "--quantize-vision", "q8_0"]);
        let s = Settings::resolve(cli.args, PathBuf::new()).unwrap();
        assert_eq!(s.quantization.llm, Some(WeightQuant::Q4K));
        assert_eq!(s.quantization.vision, Some(WeightQuant::Q8_0));
        let args: ServeArgs = toml::from_str("quantize = \"q6k\"").unwrap();
        let s = Settings::resolve(args, PathBuf::new()).unwrap();
        assert_eq!(s.quantization.llm, Some(WeightQuant::Q6K));
        assert_eq!(s.quantization.vision, None);
        let s = Settings::resolve(ServeArgs::default(), PathBuf::new()).unwrap();
        assert_eq!(s.quantization, Default::default());
        let cli = Cli::parse_from(["x", "--kv-cache-dtype", "bf16"]);
        let s = Settings::resolve(cli.args, PathBuf::new()).unwrap();
        assert_eq!(s.kv_cache_dtype, Some(DType::BF16));
        let cli = Cli::parse_from(["x", "--kv-cache-dtype", "int8"]);
        let err = format!(
            "{:#}",
            Settings::resolve(cli.args, PathBuf::new()).unwrap_err()
        );
        assert!(err.contains("kv_cache_dtype"), "{err}");
        let cli = Cli::parse_from(["x", "--quantize", "q3"]);
        let err = format!(
            "{:#}",
            Settings::resolve(cli.args, PathBuf::new()).unwrap_err()
        );
        assert!(err.contains("quantize") && err.contains("q4k"), "{err}");
    }

    #[test]
    fn bad_settings_fail_clearly() {
        let cli = Cli::parse_from(["x", "--block-size", "0"]);
        let err = Settings::resolve(cli.args, PathBuf::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("block_size"), "{err}");
        let cli = Cli::parse_from(["x", "--kv-cache-memory", "12 parsecs"]);
        assert!(Settings::resolve(cli.args, PathBuf::new()).is_err());
        let cli = Cli::parse_from(["x", "--log-format", "xml"]);
        assert!(Settings::resolve(cli.args, PathBuf::new()).is_err());
    }

    #[test]
    fn api_keys_are_trimmed_and_never_empty() {
        let cli = Cli::parse_from(["x", "--api-key", " a", "--api-key", "b "]);
        let s = Settings::resolve(cli.args, PathBuf::new()).unwrap();
        assert_eq!(s.api_keys, vec!["a".to_string(), "b".to_string()]);
        // The environment variable's form: comma-separated, spaces after the commas.
        let cli = Cli::parse_from(["x", "--api-key", "a, b"]);
        let s = Settings::resolve(cli.args, PathBuf::new()).unwrap();
        assert_eq!(s.api_keys, vec!["a".to_string(), "b".to_string()]);
        for keys in [
            &["x", "--api-key", ""][..],
            &["x", "--api-key", "a, ,b"],
            &["x", "--api-key", "  "],
        ] {
            let cli = Cli::parse_from(keys);
            let err = Settings::resolve(cli.args, PathBuf::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains("empty API key"), "{keys:?}: {err}");
        }
        let args: ServeArgs = toml::from_str("api_key = [\"\"]").unwrap();
        assert!(Settings::resolve(args, PathBuf::new()).is_err());
        let args: ServeArgs = toml::from_str("api_key = []").unwrap();
        assert!(Settings::resolve(args, PathBuf::new())
            .unwrap()
            .api_keys
            .is_empty());
    }

    #[test]
    fn connection_limits() {
        let s = Settings::resolve(ServeArgs::default(), PathBuf::new()).unwrap();
        assert_eq!(s.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.body_read_timeout, Duration::from_secs(60));
        assert_eq!(s.idle_timeout, Duration::from_secs(75));
        assert_eq!((s.max_connections, s.max_header_bytes), (1024, 65536));
        for (flag, value, name) in [
            ("--header-read-timeout", "0", "header_read_timeout"),
            ("--body-read-timeout", "0", "body_read_timeout"),
            ("--idle-timeout", "0", "idle_timeout"),
            ("--max-connections", "0", "max_connections"),
            ("--max-header-bytes", "8191", "max_header_bytes"),
        ] {
            let cli = Cli::parse_from(["x", flag, value]);
            let err = Settings::resolve(cli.args, PathBuf::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{flag} {value}: {err}");
        }
    }
}
