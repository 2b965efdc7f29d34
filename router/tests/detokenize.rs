//! The incremental detokenizer against whole-sequence decoding, on real tokenizers (byte-level
//! BPE from SmolLM2, SentencePiece-style from stories260K).

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use proptest::prelude::*;
use tessera_router::text::Detokenizer;
use tokenizers::Tokenizer;

fn load(rel: &str) -> Tokenizer {
    let path = format!("{}/../../shared/models/{rel}", env!("CARGO_MANIFEST_DIR"));
    match Tokenizer::from_file(&path) {
        Ok(t) => t,
        Err(e) => panic!("loading {path}: {e}"),
    }
}

/// The deltas, the last one from `finish`.
fn streamed(tok: &Tokenizer, prompt: &[u32], ids: &[u32], chunk: usize) -> Vec<String> {
    let mut d = Detokenizer::after_prompt(tok, true, prompt);
    let mut out: Vec<String> = ids.chunks(chunk.max(1)).map(|c| d.push(c).unwrap()).collect();
    out.push(d.finish().unwrap());
    out
}

/// What the generated ids add to the decoded prompt.
fn reference(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> String {
    let p = tok.decode(prompt, true).unwrap();
    let all = tok.decode(&[prompt, ids].concat(), true).unwrap();
    all[p.len()..].to_string()
}

#[test]
fn multibyte_text_streams_exactly() {
    for rel in ["smollm2-135m-instruct/tokenizer.json", "stories260K/tokenizer.json"] {
        let tok = load(rel);
        let prompt = tok.encode("Once upon a time", false).unwrap().get_ids().to_vec();
        let text = " the café served 日本語 and emoji 🙂🚀 — “quotes”.";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        for chunk in [1, 2, 5] {
            let deltas = streamed(&tok, &prompt, &ids, chunk);
            assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{rel}: a delta split a character: {deltas:?}");
            assert_eq!(deltas.concat(), reference(&tok, &prompt, &ids), "{rel}, chunk {chunk}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Random id sequences (which may split characters anywhere) stream to the same text as
    /// decoding them whole, up to the replacement characters both produce for broken bytes.
    #[test]
    fn random_ids_stream_like_whole_decoding(ids in proptest::collection::vec(0u32..49152, 1..60), chunk in 1usize..4) {
        let tok = load("smollm2-135m-instruct/tokenizer.json");
        let prompt = [1u32, 504, 3406];
        let got = streamed(&tok, &prompt, &ids, chunk).concat();
        let want = reference(&tok, &prompt, &ids);
        prop_assert_eq!(got.replace('\u{FFFD}', ""), want.replace('\u{FFFD}', ""));
    }
}
