//! The local sentence encoder: a BERT model (all-MiniLM-L6-v2 by default) run on the
//! CPU, mean-pooled over the real tokens and L2-normalised, exactly as
//! sentence-transformers computes it. Weights (`model.safetensors`), the model's shape
//! (`config.json`) and its WordPiece vocabulary (`tokenizer.json`) come from one
//! directory; nothing is fetched. Two engines run the same weights: ONNX Runtime
//! (`onnx.rs`, ~2–3× faster, when its library is at hand) and candle (pure Rust,
//! always there). The candle forward pass is written here, compactly (query, key and
//! value projections fused into one matrix product), rather than taken from
//! candle-transformers, which would compile a zoo of other models.
//! Blocking: call from `spawn_blocking`.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum LocalModelError {
    #[error("the embedding model in {dir} is incomplete or unreadable ({what}); run `echod models install`")]
    Missing { dir: String, what: String },
    #[error("the embedding model failed: {0}")]
    Model(String),
}

impl From<candle_core::Error> for LocalModelError {
    fn from(error: candle_core::Error) -> Self {
        LocalModelError::Model(error.to_string())
    }
}

/// The parts of `config.json` the encoder needs.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct BertShape {
    pub(crate) hidden_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub(crate) layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// Which engine runs the model (`embeddings.runtime`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// ONNX Runtime when its library is beside the model (or at `library`), else candle.
    Auto { library: Option<PathBuf> },
    Candle,
    /// ONNX Runtime from this library, or fail.
    OnnxRuntime { library: PathBuf },
}

impl Runtime {
    /// From `embeddings.runtime` and `embeddings.onnxruntime_library`.
    pub fn from_config(runtime: &str, library: Option<&Path>, model_dir: &Path) -> Runtime {
        match runtime {
            "candle" => Runtime::Candle,
            "onnxruntime" => Runtime::OnnxRuntime { library: library.map(Path::to_path_buf).unwrap_or_else(|| model_dir.join(super::onnx::LIBRARY_FILE)) },
            _ => Runtime::Auto { library: library.map(Path::to_path_buf) },
        }
    }
}

pub struct LocalModel {
    engine: Engine,
    tokenizer: tokenizers::Tokenizer,
    max_tokens: usize,
    hidden: usize,
}

enum Engine {
    Candle(Box<CandleBert>),
    Onnx(super::onnx::OnnxBert),
}

struct CandleBert {
    word: Embedding,
    position: Embedding,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    max_tokens: usize,
    device: Device,
}

fn linear(vb: &VarBuilder, name: &str) -> Result<Linear, candle_core::Error> {
    Ok(Linear::new(vb.get_unchecked(&format!("{name}.weight"))?, Some(vb.get_unchecked(&format!("{name}.bias"))?)))
}

fn layer_norm(vb: &VarBuilder, name: &str, eps: f64) -> Result<LayerNorm, candle_core::Error> {
    Ok(LayerNorm::new(vb.get_unchecked(&format!("{name}.weight"))?, vb.get_unchecked(&format!("{name}.bias"))?, eps))
}

impl LocalModel {
    /// Loads the model in `dir` with whichever engine is at hand (ONNX Runtime when its
    /// library is beside the model, else candle); texts longer than `max_tokens` (at
    /// most the model's position limit) are cut.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<LocalModel, LocalModelError> {
        LocalModel::load_with(dir, max_tokens, &Runtime::Auto { library: None })
    }

    /// Loads the model in `dir` with the engine `runtime` names.
    pub fn load_with(dir: &Path, max_tokens: usize, runtime: &Runtime) -> Result<LocalModel, LocalModelError> {
        let missing = |what: &str| LocalModelError::Missing { dir: dir.display().to_string(), what: what.to_string() };
        let shape: BertShape = serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(|e| missing(&format!("config.json: {e}")))?)
            .map_err(|e| missing(&format!("config.json: {e}")))?;
        if shape.hidden_act.as_deref().is_some_and(|act| act != "gelu") || !shape.hidden_size.is_multiple_of(shape.num_attention_heads) {
            return Err(missing("config.json describes a model this encoder does not run (BERT with GELU)"));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| missing(&format!("tokenizer.json: {e}")))?;
        let max_tokens = max_tokens.clamp(8, shape.max_position_embeddings);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| LocalModelError::Model(e.to_string()))?;
        tokenizer.with_padding(None);
        let library = match runtime {
            Runtime::Candle => None,
            Runtime::OnnxRuntime { library } => Some(library.clone()),
            Runtime::Auto { library } => Some(library.clone().unwrap_or_else(|| dir.join(super::onnx::LIBRARY_FILE))).filter(|path| path.is_file()),
        };
        let engine = match library {
            Some(library) => match super::onnx::OnnxBert::load(dir, &shape, &library) {
                Ok(engine) => Engine::Onnx(engine),
                Err(error) if matches!(runtime, Runtime::Auto { .. }) => {
                    tracing::warn!(%error, "ONNX Runtime is beside the model but does not run it; using candle");
                    Engine::Candle(Box::new(CandleBert::load(dir, &shape, max_tokens)?))
                }
                Err(error) => return Err(error),
            },
            None => Engine::Candle(Box::new(CandleBert::load(dir, &shape, max_tokens)?)),
        };
        Ok(LocalModel { engine, tokenizer, max_tokens, hidden: shape.hidden_size })
    }

    /// Which engine runs the model: `onnxruntime` or `candle`.
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::Candle(_) => "candle",
            Engine::Onnx(_) => "onnxruntime",
        }
    }

    pub fn dimension(&self) -> usize {
        self.hidden
    }

    /// How many tokens of each text the model reads (after the cut): for reports.
    pub fn token_counts(&self, texts: &[String]) -> Result<Vec<usize>, LocalModelError> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| LocalModelError::Model(e.to_string()))?;
        Ok(encodings.iter().map(|e| e.get_ids().len().min(self.max_tokens)).collect())
    }

    /// Embeds `texts` (unit-length vectors, in order). Texts are grouped by length so
    /// that little padding is computed.
    pub fn embed(&self, texts: &[String], batch_size: usize) -> Result<Vec<Vec<f32>>, LocalModelError> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| LocalModelError::Model(e.to_string()))?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for group in order.chunks(batch_size.max(1)) {
            let ids: Vec<&[u32]> = group.iter().map(|&i| encodings[i].get_ids()).collect();
            let length = ids.iter().map(|i| i.len()).max().unwrap_or(0).clamp(1, self.max_tokens);
            let pooled = match &self.engine {
                Engine::Candle(model) => model.forward(&ids)?,
                Engine::Onnx(model) => model.forward(&ids, length)?,
            };
            for (slot, vector) in group.iter().zip(pooled) {
                vectors[*slot] = vector;
            }
        }
        Ok(vectors)
    }

}

impl CandleBert {
    fn load(dir: &Path, shape: &BertShape, max_tokens: usize) -> Result<CandleBert, LocalModelError> {
        let missing = |what: &str| LocalModelError::Missing { dir: dir.display().to_string(), what: what.to_string() };
        let weights = std::fs::read(dir.join("model.safetensors")).map_err(|e| missing(&format!("model.safetensors: {e}")))?;
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)?;
        // Some checkpoints name everything under `bert.`.
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") { vb } else { vb.pp("bert") };
        let eps = shape.layer_norm_eps;
        let hidden = shape.hidden_size;
        let word = Embedding::new(vb.get_unchecked("embeddings.word_embeddings.weight")?, hidden);
        let position = Embedding::new(vb.get_unchecked("embeddings.position_embeddings.weight")?, hidden);
        // Every text is one segment: type 0 for all tokens.
        let token_type = vb.get_unchecked("embeddings.token_type_embeddings.weight")?.get(0)?;
        let embedding_norm = layer_norm(&vb, "embeddings.LayerNorm", eps)?;
        let mut layers = Vec::with_capacity(shape.num_hidden_layers);
        for i in 0..shape.num_hidden_layers {
            let prefix = format!("encoder.layer.{i}");
            let part = |name: &str, kind: &str| vb.get_unchecked(&format!("{prefix}.attention.self.{name}.{kind}"));
            let qkv_weight = Tensor::cat(&[part("query", "weight")?, part("key", "weight")?, part("value", "weight")?], 0)?;
            let qkv_bias = Tensor::cat(&[part("query", "bias")?, part("key", "bias")?, part("value", "bias")?], 0)?;
            layers.push(Layer {
                qkv: Linear::new(qkv_weight, Some(qkv_bias)),
                attention_out: linear(&vb, &format!("{prefix}.attention.output.dense"))?,
                attention_norm: layer_norm(&vb, &format!("{prefix}.attention.output.LayerNorm"), eps)?,
                intermediate: linear(&vb, &format!("{prefix}.intermediate.dense"))?,
                output: linear(&vb, &format!("{prefix}.output.dense"))?,
                output_norm: layer_norm(&vb, &format!("{prefix}.output.LayerNorm"), eps)?,
            });
        }
        Ok(CandleBert {
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            heads: shape.num_attention_heads,
            head_dim: hidden / shape.num_attention_heads,
            hidden,
            max_tokens,
            device,
        })
    }

    /// One padded batch through the encoder; mean-pooled, normalised rows.
    fn forward(&self, ids: &[&[u32]]) -> Result<Vec<Vec<f32>>, LocalModelError> {
        let batch = ids.len();
        let length = ids.iter().map(|i| i.len()).max().unwrap_or(0).clamp(1, self.max_tokens);
        let mut flat = Vec::with_capacity(batch * length);
        let mut mask = Vec::with_capacity(batch * length);
        for row in ids {
            for position in 0..length {
                let real = position < row.len();
                flat.push(if real { row[position] } else { 0 });
                mask.push(if real { 1f32 } else { 0f32 });
            }
        }
        let device = &self.device;
        let input = Tensor::from_vec(flat, (batch, length), device)?;
        let mask = Tensor::from_vec(mask, (batch, length), device)?;
        let positions = Tensor::arange(0u32, length as u32, device)?;
        let mut hidden = self.word.forward(&input)?.broadcast_add(&self.position.forward(&positions)?)?.broadcast_add(&self.token_type)?;
        hidden = self.embedding_norm.forward(&hidden)?;
        // Padding gets a large negative score so softmax ignores it.
        let bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((batch, 1, 1, length))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&hidden)?.reshape((batch, length, 3, self.heads, self.head_dim))?;
            let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, length, self.hidden))?;
            let attended = layer.attention_norm.forward(&(layer.attention_out.forward(&context)? + &hidden)?)?;
            let inner = layer.intermediate.forward(&attended)?.gelu_erf()?;
            hidden = layer.output_norm.forward(&(layer.output.forward(&inner)? + &attended)?)?;
        }
        let weights = mask.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?;
        let counts = weights.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}
