//! The tokenizer and chat template that travel with a model.
//!
//! Sources, in order of preference: `tokenizer.json` (+ `tokenizer_config.json` /
//! `chat_template.jinja`) in the model's directory; the GGUF's own tokenizer metadata; for
//! `dummy:` models, a byte-fallback tokenizer. The tokenizer's SHA-256 is taken over its
//! canonical JSON so that a router and a worker compare tokenizers by content, whatever file
//! they came from.

use std::path::Path;
use std::str::FromStr;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::LoadError;

/// A chat template with the special-token strings templates refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// `bos_token` as templates see it.
    pub bos_token: Option<String>,
    /// `eos_token` as templates see it.
    pub eos_token: Option<String>,
}

/// Tokenizer plus template of one model.
pub struct TextAssets {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// SHA-256 (hex) of the tokenizer's canonical JSON.
    pub tokenizer_sha256: String,
    /// The chat template, if the model has one.
    pub chat_template: Option<ChatTemplate>,
}

impl TextAssets {
    /// Wraps a tokenizer, computing its content hash.
    pub fn new(tokenizer: Tokenizer, chat_template: Option<ChatTemplate>) -> Result<Self, LoadError> {
        let canonical = tokenizer.to_string(false).map_err(|e| LoadError::Tokenizer(e.to_string()))?;
        let tokenizer_sha256 = Sha256::digest(canonical.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Ok(TextAssets { tokenizer, tokenizer_sha256, chat_template })
    }
}

fn read_text(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })
}

/// A special token in `tokenizer_config.json` is a string or `{"content": …}`.
fn token_string(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v["content"].as_str().map(str::to_string))
}

/// Loads `tokenizer.json` from `dir` (None if absent).
pub fn tokenizer_json_in(dir: &Path) -> Result<Option<Tokenizer>, LoadError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_text(&path)?;
    Tokenizer::from_str(&text).map(Some).map_err(|e| LoadError::Tokenizer(format!("{}: {e}", path.display())))
}

/// The chat template from `chat_template.jinja` or `tokenizer_config.json` in `dir`, with
/// `fallback` (e.g. a GGUF's embedded template) used when neither has one.
pub fn chat_template_in(dir: &Path, fallback: Option<String>) -> Result<Option<ChatTemplate>, LoadError> {
    let config_path = dir.join("tokenizer_config.json");
    let config: Value = if config_path.is_file() {
        serde_json::from_str(&read_text(&config_path)?).map_err(|e| LoadError::Malformed {
            path: config_path.clone(),
            format: "tokenizer_config.json",
            reason: e.to_string(),
        })?
    } else {
        Value::Null
    };
    let jinja_path = dir.join("chat_template.jinja");
    let source = if jinja_path.is_file() {
        Some(read_text(&jinja_path)?)
    } else {
        match &config["chat_template"] {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take the one named "default".
            Value::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str().map(str::to_string))
            }
            _ => None,
        }
        .or(fallback)
    };
    Ok(source.map(|source| ChatTemplate {
        source,
        bos_token: token_string(&config["bos_token"]),
        eos_token: token_string(&config["eos_token"]),
    }))
}

/// A tokenizer for random-weight models: 3 specials (`<unk>`, `<s>`, `</s>`), the 256 byte
/// tokens `<0x00>`…`<0xFF>`, then filler tokens up to `vocab_size` (at least 259). Any text
/// encodes byte by byte and decodes back exactly.
pub fn byte_fallback_tokenizer(vocab_size: usize) -> Result<Tokenizer, LoadError> {
    if vocab_size < 259 {
        return Err(LoadError::Tokenizer(format!(
            "vocab_size {vocab_size} is too small for a byte tokenizer (need 259)"
        )));
    }
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for b in 0..256usize {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for i in 259..vocab_size {
        vocab.insert(format!("<extra_{i}>"), json!(i));
    }
    let special = |id: usize, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let spec = json!({
        "version": "1.0",
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| LoadError::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips() {
        let tok = byte_fallback_tokenizer(512).unwrap();
        let text = "héllo, wörld! 🎉 123";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids().len(), text.len());
        assert!(enc.get_ids().iter().all(|&id| (3..259).contains(&id)));
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
        assert!(byte_fallback_tokenizer(100).is_err());
    }

    #[test]
    fn smollm2_assets_load() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models/smollm2-135m-instruct"));
        let tok = tokenizer_json_in(dir).unwrap().unwrap();
        let template = chat_template_in(dir, None).unwrap().unwrap();
        assert!(template.source.contains("<|im_start|>"));
        assert_eq!(template.eos_token.as_deref(), Some("<|im_end|>"));
        let a = TextAssets::new(tok, Some(template)).unwrap();
        assert_eq!(a.tokenizer_sha256.len(), 64);
    }
}
