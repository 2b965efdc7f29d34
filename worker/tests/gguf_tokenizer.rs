//! Tokenizers rebuilt from GGUF metadata: the SentencePiece (`llama`) path against stories260K's
//! Hugging Face tokenizer, and error and option handling on small synthetic vocabularies.
//! (The byte-level `gpt2` path is checked against the real SmolLM2 file in `gguf_smollm2.rs`.)

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

mod support;

use std::collections::BTreeMap;

use support::{s, strings};
use tessera_worker::LoadError;
use tessera_worker::loader::gguf::GgufValue;
use tessera_worker::loader::gguf_tokenizer::tokenizer_from_gguf;
use tokenizers::Tokenizer;

const STORIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models/stories260K");

type Metadata = BTreeMap<String, GgufValue>;

/// GGUF tokenizer metadata for llama2.c's `tok512.bin`, converted as llama.cpp's
/// `convert-llama2c-to-ggml` does: spaces become `▁`, ids 0/1/2 are `<unk>`/`<s>`/`</s>`
/// (llama2.c stores BOS/EOS as "\n<s>\n" and "\n</s>\n"), `<0xXX>` pieces are byte tokens.
fn stories_metadata() -> Metadata {
    let bytes = std::fs::read(format!("{STORIES}/tok512.bin")).unwrap();
    let (mut tokens, mut scores, mut types) = (Vec::new(), Vec::new(), Vec::new());
    let mut pos = 4; // i32 max_token_length
    while pos < bytes.len() {
        let score = f32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap());
        let len = i32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let text = std::str::from_utf8(&bytes[pos + 8..pos + 8 + len]).unwrap().replace(' ', "\u{2581}");
        pos += 8 + len;
        let id = tokens.len();
        let (text, ty) = match id {
            0 => ("<unk>".to_string(), 2),
            1 => ("<s>".to_string(), 3),
            2 => ("</s>".to_string(), 3),
            _ if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') => (text, 6),
            _ => (text, 1),
        };
        tokens.push(text);
        scores.push(GgufValue::F32(score));
        types.push(GgufValue::I32(ty));
    }
    assert_eq!(tokens.len(), 512);
    let mut meta = Metadata::new();
    meta.insert("tokenizer.ggml.model".into(), s("llama"));
    meta.insert("tokenizer.ggml.tokens".into(), strings(tokens.iter().map(String::as_str)));
    meta.insert("tokenizer.ggml.scores".into(), GgufValue::Array(scores));
    meta.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
    meta.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
    meta.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2));
    meta.insert("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0));
    meta
}

const STORY_TEXTS: &[&str] = &[
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park.",
    "One day, she saw a big, red ball.",
    "\"Can I play too?\" asked Tom. \"Yes!\" said Lily.",
    "The dog ran fast. It was happy!",
    "Tim and Sue were best friends.\nThey played every day.",
    "  Two spaces before, and three after   ",
    "",
    " ",
    "a",
    "Mom said, \"Don't touch the hot stove.\"",
    "The sun was shining and the birds were singing.",
    "He counted: 1, 2, 3, 10, 42, 100.",
    "Zebra, xylophone and quiet jazz.",
    "The end.\n\n",
    "café naïve — über",
    "A 🐶 and a 🐱 became friends.",
    "<s>Once upon a time</s>",
    "<unk> is not a word",
    "THE BIG BEAR SAID HELLO",
];

#[test]
fn sentencepiece_metadata_encodes_like_the_reference_tokenizer_json() {
    let ours = tokenizer_from_gguf(&stories_metadata()).unwrap();
    let reference = Tokenizer::from_file(format!("{STORIES}/tokenizer.json")).unwrap();
    assert_eq!(ours.get_vocab_size(true), 512);
    // The merges derived from the scores are exactly the reference's, in order.
    let json = |t: &Tokenizer| serde_json::from_str::<serde_json::Value>(&t.to_string(false).unwrap()).unwrap();
    let (ours_json, reference_json) = (json(&ours), json(&reference));
    for part in ["/model/merges", "/model/vocab", "/normalizer", "/decoder", "/post_processor"] {
        assert_eq!(ours_json.pointer(part), reference_json.pointer(part), "{part}");
    }
    // Both add BOS: the reference's post-processor does, and GGUF's add_bos_token (absent here)
    // defaults to true for SentencePiece vocabularies, as in llama.cpp.
    for &text in STORY_TEXTS {
        for add_special in [true, false] {
            let want = reference.encode(text, add_special).unwrap();
            let got = ours.encode(text, add_special).unwrap();
            assert_eq!(
                got.get_ids(),
                want.get_ids(),
                "encoding {text:?} (specials {add_special}): {:?} vs {:?}",
                got.get_tokens(),
                want.get_tokens()
            );
        }
        let ids = ours.encode(text, true).unwrap();
        assert_eq!(ids.get_ids().first(), Some(&1), "BOS first for {text:?}");
        for skip in [true, false] {
            assert_eq!(
                ours.decode(ids.get_ids(), skip).unwrap(),
                reference.decode(ids.get_ids(), skip).unwrap(),
                "decoding {text:?} (skip specials {skip})"
            );
        }
    }
    // Byte fallback: characters outside the 512-piece vocabulary decode back intact.
    let ids = ours.encode("café 🐶", false).unwrap();
    assert!(ids.get_tokens().iter().any(|t| t.starts_with("<0x")));
    assert_eq!(ours.decode(ids.get_ids(), true).unwrap(), "café 🐶");
}

#[test]
fn bos_and_eos_follow_the_flags() {
    let mut meta = stories_metadata();
    meta.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(false));
    meta.insert("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(true));
    let tok = tokenizer_from_gguf(&meta).unwrap();
    let ids = tok.encode("Once upon a time", true).unwrap();
    assert_ne!(ids.get_ids().first(), Some(&1));
    assert_eq!(ids.get_ids().last(), Some(&2));
    assert_eq!(tok.encode("Once upon a time", false).unwrap().get_ids().last(), ids.get_ids().get(ids.len() - 2));

    // Asking for EOS without saying which token it is, in a vocabulary with no default, fails.
    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(true));
    assert!(matches!(tokenizer_from_gguf(&meta), Err(LoadError::Tokenizer(m)) if m.contains("eos_token_id")));
    meta.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(999));
    assert!(matches!(tokenizer_from_gguf(&meta), Err(LoadError::Tokenizer(m)) if m.contains("outside")));
    meta.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(0));
    let tok = tokenizer_from_gguf(&meta).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap().get_ids(), &[4, 0]);
}

#[test]
fn add_space_prefix_false_drops_the_leading_marker() {
    let mut meta = stories_metadata();
    meta.insert("tokenizer.ggml.add_space_prefix".into(), GgufValue::Bool(false));
    let tok = tokenizer_from_gguf(&meta).unwrap();
    let with = tokenizer_from_gguf(&stories_metadata()).unwrap();
    let a = tok.encode("Once upon", false).unwrap();
    let b = with.encode("Once upon", false).unwrap();
    assert!(b.get_tokens()[0].starts_with('\u{2581}'));
    assert!(!a.get_tokens()[0].starts_with('\u{2581}'));
    assert_eq!(tok.decode(a.get_ids(), true).unwrap(), "Once upon");
}

/// A tiny byte-level vocabulary: the single bytes `a`, `b`, `Ġ`, a control token and `ab`.
fn gpt2_metadata() -> Metadata {
    let mut meta = Metadata::new();
    meta.insert("tokenizer.ggml.model".into(), s("gpt2"));
    meta.insert("tokenizer.ggml.tokens".into(), strings(["<|end|>", "a", "b", "Ġ", "ab", "Ġa"]));
    let types = [3, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec();
    meta.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
    meta.insert("tokenizer.ggml.merges".into(), strings(["a b", "Ġ a"]));
    meta
}

#[test]
fn small_byte_level_vocabulary() {
    let tok = tokenizer_from_gguf(&gpt2_metadata()).unwrap();
    assert_eq!(tok.encode("ab a<|end|>", true).unwrap().get_ids(), &[4, 5, 0]);
    assert_eq!(tok.decode(&[4, 5, 0], false).unwrap(), "ab a<|end|>");
    assert_eq!(tok.decode(&[4, 5, 0], true).unwrap(), "ab a");
    for pre in ["default", "gpt-2", "smollm", "llama-bpe", "llama3"] {
        let mut meta = gpt2_metadata();
        meta.insert("tokenizer.ggml.pre".into(), s(pre));
        let tok = tokenizer_from_gguf(&meta).unwrap();
        assert_eq!(tok.encode("ab a", true).unwrap().get_ids(), &[4, 5], "pre-tokenizer {pre}");
    }
}

#[test]
fn unknown_names_and_bad_metadata_are_errors() {
    let expect_err = |meta: &Metadata, needle: &str| match tokenizer_from_gguf(meta) {
        Err(LoadError::Tokenizer(m)) => assert!(m.contains(needle), "{m:?} should mention {needle:?}"),
        Err(other) => panic!("expected a tokenizer error mentioning {needle:?}, got {other:?}"),
        Ok(_) => panic!("expected a tokenizer error mentioning {needle:?}, got a tokenizer"),
    };
    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.pre".into(), s("qwen2"));
    expect_err(&meta, "qwen2");

    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.model".into(), s("bert"));
    expect_err(&meta, "bert");

    let mut meta = gpt2_metadata();
    meta.remove("tokenizer.ggml.model");
    expect_err(&meta, "tokenizer.ggml.model");

    let mut meta = gpt2_metadata();
    meta.remove("tokenizer.ggml.merges");
    expect_err(&meta, "merges");

    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.merges".into(), strings(["ab"]));
    expect_err(&meta, "merge 0");

    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.merges".into(), strings(["a z"]));
    expect_err(&meta, "`z`");

    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(vec![GgufValue::I32(1)]));
    expect_err(&meta, "token_type");

    let mut meta = gpt2_metadata();
    meta.insert("tokenizer.ggml.tokens".into(), GgufValue::U32(3));
    expect_err(&meta, "tokenizer.ggml.tokens");

    let mut meta = stories_metadata();
    meta.remove("tokenizer.ggml.scores");
    expect_err(&meta, "scores");

    let mut meta = stories_metadata();
    meta.insert("tokenizer.ggml.add_bos_token".into(), s("yes"));
    expect_err(&meta, "add_bos_token");
}
