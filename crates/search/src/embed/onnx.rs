//! The same BERT encoder as `local.rs`, run by ONNX Runtime instead of candle: the
//! graph is built in memory from the very same `model.safetensors` (ONNX Runtime's
//! Model Editor API, through `ort`), so no `.onnx` file is needed and both engines
//! give the same vectors. It uses ONNX Runtime's fused CPU kernels — `Attention`
//! (Q/K/V in one product, the padding mask applied inside), `SkipLayerNormalization`
//! (residual + bias + norm) and `BiasGelu` (exact, erf-based) — which is where its
//! speed over candle comes from.
//!
//! The runtime library is loaded at run time (`load-dynamic`) from a path: the
//! `libonnxruntime.so` that the PyPI `onnxruntime` wheel carries, placed beside the
//! model by `echod models install`. Nothing is linked at build time, so Echo builds
//! and runs without it (candle is the fallback). One library per process: the first
//! one loaded is used for every later model.
//! Blocking: call from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor as CandleTensor};
use candle_nn::VarBuilder;
use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::operator::Attribute;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType};

use super::local::{BertShape, LocalModelError};

/// ONNX Runtime's own operators (fused kernels) live in this domain.
const MS_DOMAIN: &str = "com.microsoft";
/// The lowest ONNX Runtime whose C API has what this file uses (the Model Editor).
const MIN_RUNTIME: &str = "1.22";

/// The library's file name, as `echod models install` places it in a model directory.
pub const LIBRARY_FILE: &str = "libonnxruntime.so";

fn fail(error: impl std::fmt::Display) -> LocalModelError {
    LocalModelError::Model(format!("ONNX Runtime: {error}"))
}

/// The process's one environment, from the first library that loaded (a failed load
/// is not remembered, so a good path given later still works).
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

fn environment(library: &Path) -> Result<Environment, LocalModelError> {
    let mut slot = ENVIRONMENT.lock().map_err(|_| fail("a previous load panicked"))?;
    if let Some((loaded, environment)) = slot.as_ref() {
        if loaded != library {
            tracing::info!(loaded = %loaded.display(), asked = %library.display(), "ONNX Runtime is already loaded in this process; using it");
        }
        return Ok(environment.clone());
    }
    if !library.is_file() {
        return Err(fail(format!("no runtime library at {}", library.display())));
    }
    let builder = ort::init_from(library).map_err(|e| fail(format!("cannot load {}: {e} (ONNX Runtime ≥ {MIN_RUNTIME} is needed)", library.display())))?;
    let environment = builder.with_name("echo-embeddings").build().map_err(fail)?;
    *slot = Some((library.to_path_buf(), environment.clone()));
    Ok(environment)
}

pub(super) struct OnnxBert {
    /// `Session::run` takes `&mut self`; batches are run one at a time anyway.
    session: Mutex<Session>,
    hidden: usize,
}

/// A graph under construction: nodes and weights by name.
struct Builder {
    graph: Graph,
    nodes: usize,
}

impl Builder {
    fn weight(&mut self, name: &str, tensor: &CandleTensor) -> Result<String, LocalModelError> {
        let shape: Vec<usize> = tensor.dims().to_vec();
        let data = tensor.flatten_all()?.to_vec1::<f32>()?;
        let mut value = Tensor::<f32>::new(&Allocator::default(), shape).map_err(fail)?;
        value.extract_tensor_mut().1.copy_from_slice(&data);
        self.graph.add_initializer(name, value, false).map_err(fail)?;
        Ok(name.to_string())
    }

    fn node(&mut self, op: &str, domain: &str, inputs: &[&str], attributes: Vec<Attribute>) -> Result<String, LocalModelError> {
        self.nodes += 1;
        let output = format!("{}_{}", op.to_ascii_lowercase(), self.nodes);
        let node = Node::new(op, domain, format!("n{}", self.nodes), inputs, [output.as_str()], attributes).map_err(fail)?;
        self.graph.add_node(node).map_err(fail)?;
        Ok(output)
    }
}

fn tensor_type(ty: TensorElementType, dims: &[&str]) -> ValueType {
    ValueType::Tensor {
        ty,
        shape: Shape::new(dims.iter().map(|_| -1i64)),
        dimension_symbols: SymbolicDimensions::new(dims.iter().map(|d| d.to_string())),
    }
}

impl OnnxBert {
    /// Builds the encoder's graph from the weights in `dir` (already checked by the
    /// caller: `config.json` describes a BERT with GELU) and opens a session on it.
    pub(crate) fn load(dir: &Path, shape: &BertShape, library: &Path) -> Result<OnnxBert, LocalModelError> {
        let environment = environment(library)?;
        let weights = std::fs::read(dir.join("model.safetensors")).map_err(|e| LocalModelError::Missing { dir: dir.display().to_string(), what: format!("model.safetensors: {e}") })?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)?;
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") { vb } else { vb.pp("bert") };
        let get = |name: &str| vb.get_unchecked(name);
        // PyTorch stores a linear layer's weight as (out, in); MatMul wants (in, out).
        let transposed = |name: &str| -> Result<CandleTensor, LocalModelError> { Ok(get(name)?.t()?.contiguous()?) };
        let hidden = shape.hidden_size;
        let eps = shape.layer_norm_eps as f32;

        let mut b = Builder { graph: Graph::new().map_err(fail)?, nodes: 0 };
        b.graph
            .set_inputs([
                Outlet::new("input_ids", tensor_type(TensorElementType::Int64, &["batch", "sequence"])),
                Outlet::new("attention_mask", tensor_type(TensorElementType::Int32, &["batch", "sequence"])),
                Outlet::new("position_ids", tensor_type(TensorElementType::Int64, &["sequence"])),
            ])
            .map_err(fail)?;
        b.graph.set_outputs([Outlet::new("hidden", tensor_type(TensorElementType::Float32, &["batch", "sequence", "hidden"]))]).map_err(fail)?;

        // Embeddings: word + (position + token type 0), then LayerNorm. Every text is one
        // segment, so the type row is folded into the position table.
        let word_table = b.weight("word_embeddings", &get("embeddings.word_embeddings.weight")?)?;
        let type_row = get("embeddings.token_type_embeddings.weight")?.get(0)?;
        let position_table = get("embeddings.position_embeddings.weight")?.broadcast_add(&type_row)?;
        let position_table = b.weight("position_embeddings", &position_table)?;
        let words = b.node("Gather", ONNX_DOMAIN, &["word_embeddings", "input_ids"], vec![])?;
        let positions = b.node("Gather", ONNX_DOMAIN, &[&position_table, "position_ids"], vec![])?;
        debug_assert_eq!(word_table, "word_embeddings");
        let summed = b.node("Add", ONNX_DOMAIN, &[&words, &positions], vec![])?;
        let gamma = b.weight("embeddings_norm_gamma", &get("embeddings.LayerNorm.weight")?)?;
        let beta = b.weight("embeddings_norm_beta", &get("embeddings.LayerNorm.bias")?)?;
        let attr = |name: &str, value: f32| Attribute::new(name, value).map_err(fail);
        let mut state = b.node("LayerNormalization", ONNX_DOMAIN, &[&summed, &gamma, &beta], vec![attr("epsilon", eps)?, Attribute::new("axis", -1i64).map_err(fail)?])?;

        for i in 0..shape.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let part = |name: &str, kind: &str| get(&format!("{p}.attention.self.{name}.{kind}"));
            let qkv_weight = CandleTensor::cat(&[part("query", "weight")?, part("key", "weight")?, part("value", "weight")?], 0)?.t()?.contiguous()?;
            let qkv_bias = CandleTensor::cat(&[part("query", "bias")?, part("key", "bias")?, part("value", "bias")?], 0)?;
            let qkv_weight = b.weight(&format!("l{i}_qkv_w"), &qkv_weight)?;
            let qkv_bias = b.weight(&format!("l{i}_qkv_b"), &qkv_bias)?;
            let attended = b.node(
                "Attention",
                MS_DOMAIN,
                &[&state, &qkv_weight, &qkv_bias, "attention_mask"],
                vec![Attribute::new("num_heads", shape.num_attention_heads as i64).map_err(fail)?],
            )?;
            let out_w = b.weight(&format!("l{i}_attn_out_w"), &transposed(&format!("{p}.attention.output.dense.weight"))?)?;
            let out_b = b.weight(&format!("l{i}_attn_out_b"), &get(&format!("{p}.attention.output.dense.bias"))?)?;
            let projected = b.node("MatMul", ONNX_DOMAIN, &[&attended, &out_w], vec![])?;
            let g1 = b.weight(&format!("l{i}_attn_norm_g"), &get(&format!("{p}.attention.output.LayerNorm.weight"))?)?;
            let b1 = b.weight(&format!("l{i}_attn_norm_b"), &get(&format!("{p}.attention.output.LayerNorm.bias"))?)?;
            let normed = b.node("SkipLayerNormalization", MS_DOMAIN, &[&projected, &state, &g1, &b1, &out_b], vec![attr("epsilon", eps)?])?;
            let inner_w = b.weight(&format!("l{i}_inner_w"), &transposed(&format!("{p}.intermediate.dense.weight"))?)?;
            let inner_b = b.weight(&format!("l{i}_inner_b"), &get(&format!("{p}.intermediate.dense.bias"))?)?;
            let inner = b.node("MatMul", ONNX_DOMAIN, &[&normed, &inner_w], vec![])?;
            let activated = b.node("BiasGelu", MS_DOMAIN, &[&inner, &inner_b], vec![])?;
            let down_w = b.weight(&format!("l{i}_out_w"), &transposed(&format!("{p}.output.dense.weight"))?)?;
            let down_b = b.weight(&format!("l{i}_out_b"), &get(&format!("{p}.output.dense.bias"))?)?;
            let down = b.node("MatMul", ONNX_DOMAIN, &[&activated, &down_w], vec![])?;
            let g2 = b.weight(&format!("l{i}_out_norm_g"), &get(&format!("{p}.output.LayerNorm.weight"))?)?;
            let b2 = b.weight(&format!("l{i}_out_norm_b"), &get(&format!("{p}.output.LayerNorm.bias"))?)?;
            state = b.node("SkipLayerNormalization", MS_DOMAIN, &[&down, &normed, &g2, &b2, &down_b], vec![attr("epsilon", eps)?])?;
        }
        let node = Node::new("Identity", ONNX_DOMAIN, "output", [state.as_str()], ["hidden"], []).map_err(fail)?;
        b.graph.add_node(node).map_err(fail)?;

        let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17).map_err(fail)?, Opset::new(MS_DOMAIN, 1).map_err(fail)?]).map_err(fail)?;
        model.set_graph(b.graph).map_err(fail)?;
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let options = Session::builder(&environment)
            .map_err(fail)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(fail)?
            .with_intra_threads(threads)
            .map_err(fail)?;
        let session = model.into_session(&options).map_err(fail)?;
        Ok(OnnxBert { session: Mutex::new(session), hidden })
    }

    /// One padded batch (ids already cut to the length limit): the last hidden state
    /// mean-pooled over each text's real tokens and L2-normalised.
    pub(crate) fn forward(&self, ids: &[&[u32]], length: usize) -> Result<Vec<Vec<f32>>, LocalModelError> {
        let batch = ids.len();
        let mut flat = Vec::with_capacity(batch * length);
        let mut mask = Vec::with_capacity(batch * length);
        for row in ids {
            for position in 0..length {
                let real = position < row.len();
                flat.push(if real { i64::from(row[position]) } else { 0 });
                mask.push(i32::from(real));
            }
        }
        let input_ids = Tensor::from_array(([batch, length], flat)).map_err(fail)?;
        let attention_mask = Tensor::from_array(([batch, length], mask)).map_err(fail)?;
        let position_ids = Tensor::from_array(([length], (0..length as i64).collect::<Vec<i64>>())).map_err(fail)?;
        let mut session = self.session.lock().map_err(|_| fail("a previous batch panicked"))?;
        let outputs = session
            .run(ort::inputs!["input_ids" => input_ids, "attention_mask" => attention_mask, "position_ids" => position_ids])
            .map_err(fail)?;
        let (_, hidden) = outputs["hidden"].try_extract_tensor::<f32>().map_err(fail)?;
        if hidden.len() != batch * length * self.hidden {
            return Err(fail(format!("the graph returned {} values for a {batch}×{length}×{} batch", hidden.len(), self.hidden)));
        }
        let mut pooled = Vec::with_capacity(batch);
        for (b, row) in ids.iter().enumerate() {
            let real = row.len().clamp(1, length);
            let mut mean = vec![0f32; self.hidden];
            for t in 0..real {
                let offset = (b * length + t) * self.hidden;
                for (m, x) in mean.iter_mut().zip(&hidden[offset..offset + self.hidden]) {
                    *m += x;
                }
            }
            mean.iter_mut().for_each(|m| *m /= real as f32);
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            mean.iter_mut().for_each(|m| *m /= norm);
            pooled.push(mean);
        }
        Ok(pooled)
    }
}
