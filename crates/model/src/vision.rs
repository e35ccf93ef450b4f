//! InternViT-6B, the vision encoder, as upstream's `modeling_intern_vit.py` computes it.
//!
//! Only the layers up to `select_layer` are built: the published checkpoint has 48 but V1.1
//! reads the output of layer 44, so the last three are never loaded or run.

use crate::attention_backend::AttentionBackend;
use crate::backends::Backends;
use crate::config::{VisionConfig, VisionNorm};
use crate::cpu_ops::Elementwise;
use crate::linear::{linear, linear_b, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

/// The encoder's normalisation: RMSNorm in V1.1, LayerNorm in other InternViT releases.
#[derive(Debug, Clone)]
enum Norm {
    Rms(candle_nn::RmsNorm),
    Layer(candle_nn::LayerNorm),
}

impl Norm {
    fn new(kind: VisionNorm, size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            VisionNorm::RmsNorm => Norm::Rms(candle_nn::rms_norm(size, eps, vb)?),
            VisionNorm::LayerNorm => Norm::Layer(candle_nn::layer_norm(size, eps, vb)?),
        })
    }
}

impl Module for Norm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(xs),
            Norm::Layer(n) => n.forward(xs),
        }
    }
}

/// Patch embedding, CLS token and absolute position embeddings.
#[derive(Debug, Clone)]
pub struct VisionEmbeddings {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
}

impl VisionEmbeddings {
    pub fn new(cfg: &VisionConfig, image_size: usize, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let grid = image_size / cfg.patch_size;
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Ok(Self {
            class_embedding: vb.get((1, 1, c), "class_embedding")?,
            patch_embedding: conv2d(3, c, cfg.patch_size, conv_cfg, vb.pp("patch_embedding"))?,
            // The checkpoint's grid must be the image grid: V1.1 trains and serves at one size.
            position_embedding: vb.get((1, grid * grid + 1, c), "position_embedding")?,
        })
    }

    /// `pixel_values` [B, 3, H, W] → [B, 1 + patches, C].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patches = self.patch_embedding.forward(pixel_values)?; // [B, C, g, g]
        let (b, c, _, _) = patches.dims4()?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g*g, C], row-major
        let cls = self.class_embedding.broadcast_as((b, 1, c))?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// How the encoder's attention is computed: its layers' share of [`AttentionBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VisionAttentionKind {
    /// Block by block on the CPU in f32 ([`crate::dense_attention`]).
    CpuBlocks,
    /// candle's matmuls and softmax.
    Matmul,
    /// The flash kernel, where it takes the dtype and head size.
    #[cfg(feature = "cuda")]
    Flash,
}

impl VisionAttentionKind {
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn new(backends: &Backends, head_dim: usize) -> Self {
        match backends.attention() {
            AttentionBackend::CpuF32 => Self::CpuBlocks,
            AttentionBackend::Matmul => Self::Matmul,
            #[cfg(feature = "cuda")]
            AttentionBackend::CudaKernels => {
                if crate::cuda_kernels::flash_supported(backends.dtype(), head_dim) {
                    Self::Flash
                } else {
                    Self::Matmul
                }
            }
        }
    }
}

/// Self-attention with a fused qkv projection and q/k RMSNorm over the full width.
#[derive(Debug, Clone)]
pub struct VisionAttention {
    qkv: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    kind: VisionAttentionKind,
}

impl VisionAttention {
    pub fn new(cfg: &VisionConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let (q_norm, k_norm) = if cfg.qk_normalization {
            (
                Some(Norm::new(
                    cfg.norm_type,
                    c,
                    cfg.layer_norm_eps,
                    vb.pp("q_norm"),
                )?),
                Some(Norm::new(
                    cfg.norm_type,
                    c,
                    cfg.layer_norm_eps,
                    vb.pp("k_norm"),
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            qkv: linear_b(
                c,
                3 * c,
                cfg.qkv_bias,
                backends.vision_linear(),
                vb.pp("qkv"),
            )?,
            q_norm,
            k_norm,
            proj: linear(c, c, backends.vision_linear(), vb.pp("proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            kind: VisionAttentionKind::new(backends, cfg.head_dim()),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = xs.dim(D::Minus1)?;
        let qkv = self.qkv.forward(xs)?;
        let mut q = qkv.narrow(D::Minus1, 0, c)?;
        let mut k = qkv.narrow(D::Minus1, c, c)?;
        let v = qkv.narrow(D::Minus1, 2 * c, c)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q.contiguous()?)?;
            k = kn.forward(&k.contiguous()?)?;
        }
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = match self.kind {
            VisionAttentionKind::CpuBlocks => crate::dense_attention::dense_attention_cpu(
                &q,
                &k,
                &v,
                self.num_heads,
                scale as f32,
            )?,
            VisionAttentionKind::Matmul => self.matmul_attention(q, k, v, scale)?,
            #[cfg(feature = "cuda")]
            VisionAttentionKind::Flash => {
                let (b, n, _) = q.dims3()?;
                let heads = |t: &Tensor| t.reshape((b, n, self.num_heads, self.head_dim));
                crate::cuda_kernels::flash_attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, false)?
                    .reshape((b, n, c))?
            }
        };
        self.proj.forward(&out)
    }

    /// softmax(q·kᵀ · scale)·v with candle's ops; `q`, `k`, `v` [B, N, C] → [B, N, C].
    fn matmul_attention(&self, q: Tensor, k: Tensor, v: Tensor, scale: f64) -> Result<Tensor> {
        let (b, n, c) = q.dims3()?;
        let heads = |t: Tensor| {
            t.reshape((b, n, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let scores = (q * scale)?.matmul(&k.t()?)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
    }
}

/// fc1 → exact GELU → fc2.
#[derive(Debug, Clone)]
pub struct VisionMlp {
    fc1: Linear,
    fc2: Linear,
    elementwise: Elementwise,
}

impl VisionMlp {
    pub fn new(cfg: &VisionConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let (c, i, kind) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            backends.vision_linear(),
        );
        Ok(Self {
            fc1: linear(c, i, kind, vb.pp("fc1"))?,
            fc2: linear(i, c, kind, vb.pp("fc2"))?,
            elementwise: backends.elementwise(),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self.elementwise.gelu_erf(&self.fc1.forward(xs)?)?;
        self.fc2.forward(&hidden)
    }
}

/// One pre-norm encoder layer with learned per-channel layer scales.
#[derive(Debug, Clone)]
pub struct VisionLayer {
    norm1: Norm,
    attn: VisionAttention,
    ls1: Tensor,
    norm2: Norm,
    mlp: VisionMlp,
    ls2: Tensor,
}

impl VisionLayer {
    pub fn new(cfg: &VisionConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            norm1: Norm::new(cfg.norm_type, c, eps, vb.pp("norm1"))?,
            attn: VisionAttention::new(cfg, backends, vb.pp("attn"))?,
            ls1: vb.get(c, "ls1")?,
            norm2: Norm::new(cfg.norm_type, c, eps, vb.pp("norm2"))?,
            mlp: VisionMlp::new(cfg, backends, vb.pp("mlp"))?,
            ls2: vb.get(c, "ls2")?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attn = self.attn.forward(&self.norm1.forward(xs)?)?;
        let xs = (xs + attn.broadcast_mul(&self.ls1)?)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&xs)?)?;
        xs + mlp.broadcast_mul(&self.ls2)?
    }
}

/// The encoder truncated at the selected layer.
#[derive(Debug, Clone)]
pub struct InternVisionModel {
    embeddings: VisionEmbeddings,
    layers: Vec<VisionLayer>,
}

impl InternVisionModel {
    /// Builds the embeddings and the first `num_layers` layers only.
    pub fn new(
        cfg: &VisionConfig,
        image_size: usize,
        num_layers: usize,
        backends: &Backends,
        vb: VarBuilder,
    ) -> Result<Self> {
        let embeddings = VisionEmbeddings::new(cfg, image_size, vb.pp("embeddings"))?;
        let vb_layers = vb.pp("encoder.layers");
        let layers = (0..num_layers)
            .map(|i| VisionLayer::new(cfg, backends, vb_layers.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers })
    }

    /// `pixel_values` [B, 3, H, W] → hidden state of the selected layer [B, 1 + patches, C].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }
}
