//! A Hugging Face [`Tokenizer`] rebuilt from GGUF `tokenizer.ggml.*` metadata.
//!
//! Two GGUF tokenizer models are supported, each mapped onto the tokenizer.json Hugging Face's
//! own converters produce for it (we build that JSON and deserialize it):
//! - `gpt2`: byte-level BPE from `tokens` and `merges`. The pre-tokenizer follows
//!   `tokenizer.ggml.pre` (`smollm`: digits one by one, then byte-level; `default`/`gpt-2`/absent:
//!   byte-level with the GPT-2 regex; `llama-bpe`/`llama3`: the Llama-3 regex, then byte-level,
//!   with `ignore_merges` as llama.cpp and HF use for Llama 3).
//! - `llama`: SentencePiece as BPE with byte fallback, merges derived from `scores` the way
//!   HF's `SentencePieceExtractor` does, a `▁` normalizer and the matching decoder.
//!
//! Invariants:
//! - An unknown model or pre-tokenizer name is an error naming it, never a silent fallback.
//! - Token ids are the GGUF ids. Control (type 3), user-defined (4) and unknown (2) tokens become
//!   added tokens, so their text encodes as one id; control and unknown ones are special.
//! - BOS/EOS are added by a `TemplateProcessing` post-processor exactly when
//!   `tokenizer.ggml.add_bos_token` / `add_eos_token` say so; absent flags default as llama.cpp
//!   does (BOS on for `llama`, off for `gpt2`; EOS off).
//! - `tokenizer.ggml.add_space_prefix` (default true) shapes only `llama` vocabularies; like
//!   llama.cpp, byte-level BPE ignores it.
//! - Where a token string occurs twice, its first id is the one text encodes to.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;

use crate::error::LoadError;
use crate::loader::gguf::GgufValue;

/// llama.cpp's `llama_token_type` values.
const TYPE_NORMAL: u64 = 1;
const TYPE_UNKNOWN: u64 = 2;
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;

/// Llama 3's pre-tokenizer regex (HF `tokenizer.json`, llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// Builds the tokenizer described by `metadata` (the `tokenizer.ggml.*` keys of a GGUF file).
pub fn tokenizer_from_gguf(metadata: &BTreeMap<String, GgufValue>) -> Result<Tokenizer, LoadError> {
    let meta = Meta(metadata);
    let model = meta.str("tokenizer.ggml.model")?.ok_or_else(|| err("no tokenizer.ggml.model in the GGUF metadata"))?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?.ok_or_else(|| err("no tokenizer.ggml.tokens"))?;
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(err(format!("tokenizer.ggml.tokens has {} entries", tokens.len())));
    }
    let types = match meta.array("tokenizer.ggml.token_type")? {
        None => vec![TYPE_NORMAL; tokens.len()],
        Some(items) => {
            let types: Option<Vec<u64>> = items.iter().map(GgufValue::as_u64).collect();
            types
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| err("tokenizer.ggml.token_type is not one non-negative integer per token"))?
        }
    };
    let mut vocab = HashMap::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        vocab.entry(*tok).or_insert(id);
    }

    let (parts, default_add_bos) = match model {
        "gpt2" => (gpt2_parts(&meta, &tokens, &vocab)?, false),
        "llama" => (llama_parts(&meta, &tokens, &types, &vocab)?, true),
        other => return Err(err(format!("unsupported tokenizer.ggml.model {other:?} (supported: gpt2, llama)"))),
    };
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let defaults = if model == "llama" { (Some(1), Some(2)) } else { (None, None) };
    let bos = add_bos.then(|| meta.special(&tokens, "bos", defaults.0)).transpose()?;
    let eos = add_eos.then(|| meta.special(&tokens, "eos", defaults.1)).transpose()?;

    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|&(id, (tok, &ty))| {
            !tok.is_empty()
                && matches!(ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED)
                && vocab.get(*tok) == Some(&id)
        })
        .map(|(id, (tok, &ty))| {
            json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != TYPE_USER_DEFINED,
            })
        })
        .collect();

    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": parts.normalizer,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": template(bos, eos),
        "decoder": parts.decoder,
        "model": parts.model,
    });
    serde_json::from_value(json).map_err(|e| err(format!("building the {model} tokenizer from GGUF metadata: {e}")))
}

fn err(msg: impl Into<String>) -> LoadError {
    LoadError::Tokenizer(msg.into())
}

/// Typed access to metadata; a present key of the wrong type is an error, absence is `None`.
struct Meta<'a>(&'a BTreeMap<String, GgufValue>);

impl<'a> Meta<'a> {
    fn str(&self, key: &str) -> Result<Option<&'a str>, LoadError> {
        self.0.get(key).map(|v| v.as_str().ok_or_else(|| err(format!("{key} is not a string")))).transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, LoadError> {
        self.0.get(key).map(|v| v.as_bool().ok_or_else(|| err(format!("{key} is not a bool")))).transpose()
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, LoadError> {
        self.0.get(key).map(|v| v.as_u64().ok_or_else(|| err(format!("{key} is not an unsigned integer")))).transpose()
    }

    fn array(&self, key: &str) -> Result<Option<&'a [GgufValue]>, LoadError> {
        self.0.get(key).map(|v| v.as_array().ok_or_else(|| err(format!("{key} is not an array")))).transpose()
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, LoadError> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        let strings: Option<Vec<&str>> = items.iter().map(GgufValue::as_str).collect();
        strings.map(Some).ok_or_else(|| err(format!("{key} is not an array of strings")))
    }

    /// The id and text of special token `which` ("bos", "eos"), falling back to `default`.
    fn special(&self, tokens: &[&str], which: &str, default: Option<u64>) -> Result<(u32, String), LoadError> {
        let key = format!("tokenizer.ggml.{which}_token_id");
        let id = self
            .u64(&key)?
            .or(default)
            .ok_or_else(|| err(format!("tokenizer.ggml.add_{which}_token is set but {key} is missing")))?;
        let text = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .ok_or_else(|| err(format!("{key} = {id} is outside the vocabulary of {}", tokens.len())))?;
        // `tokens.len()` fits in u32 (checked on entry), so every valid id does too.
        let id = u32::try_from(id).map_err(|_| err(format!("{key} = {id} does not fit in u32")))?;
        Ok((id, (*text).to_string()))
    }
}

/// The model-specific pieces of a tokenizer.json.
struct Parts {
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    model: Value,
}

fn vocab_json(tokens: &[&str], vocab: &HashMap<&str, usize>) -> Value {
    let map: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .filter(|&(id, tok)| vocab.get(tok) == Some(&id))
        .map(|(id, tok)| ((*tok).to_string(), Value::from(id)))
        .collect();
    Value::Object(map)
}

fn byte_level(use_regex: bool) -> Value {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

fn gpt2_parts(meta: &Meta<'_>, tokens: &[&str], vocab: &HashMap<&str, usize>) -> Result<Parts, LoadError> {
    let pre = meta.str("tokenizer.ggml.pre")?;
    let (pre_tokenizer, ignore_merges) = match pre {
        None | Some("default" | "gpt-2") => (byte_level(true), false),
        Some("smollm") => (
            json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Digits", "individual_digits": true },
                byte_level(true),
            ]}),
            false,
        ),
        Some("llama-bpe" | "llama3") => (
            json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Split", "pattern": { "Regex": LLAMA3_REGEX }, "behavior": "Isolated", "invert": false },
                byte_level(false),
            ]}),
            true,
        ),
        Some(other) => {
            return Err(err(format!(
                "unsupported tokenizer.ggml.pre {other:?} (supported: default, gpt-2, smollm, llama-bpe, llama3)"
            )));
        }
    };
    let merges =
        meta.strings("tokenizer.ggml.merges")?.ok_or_else(|| err("gpt2 tokenizer without tokenizer.ggml.merges"))?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // As llama.cpp: split at the first space after the first byte.
            let at = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            let (a, b) = at
                .and_then(|p| Some((m.get(..p)?, m.get(p + 1..)?)))
                .ok_or_else(|| err(format!("merge {i} ({m:?}) is not two tokens separated by a space")))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<Vec<Value>, LoadError>>()?;
    Ok(Parts {
        normalizer: Value::Null,
        pre_tokenizer,
        decoder: byte_level(true),
        model: json!({
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab_json(tokens, vocab), "merges": merges,
        }),
    })
}

fn llama_parts(
    meta: &Meta<'_>,
    tokens: &[&str],
    types: &[u64],
    vocab: &HashMap<&str, usize>,
) -> Result<Parts, LoadError> {
    let scores =
        meta.array("tokenizer.ggml.scores")?.ok_or_else(|| err("llama tokenizer without tokenizer.ggml.scores"))?;
    let scores: Vec<f32> = scores
        .iter()
        .map(GgufValue::as_f32)
        .collect::<Option<Vec<f32>>>()
        .filter(|s| s.len() == tokens.len())
        .ok_or_else(|| err("tokenizer.ggml.scores is not one float per token"))?;
    let unk = match meta.u64("tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(
            usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .ok_or_else(|| err(format!("tokenizer.ggml.unknown_token_id = {id} is outside the vocabulary")))?,
        ),
        None => tokens.iter().zip(types).find(|&(_, &t)| t == TYPE_UNKNOWN).map(|(tok, _)| tok),
    };
    let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let replace_space = json!({ "type": "Replace", "pattern": { "String": " " }, "content": SPIECE_UNDERLINE });
    let normalizer = if add_space_prefix {
        json!({ "type": "Sequence", "normalizers": [{ "type": "Prepend", "prepend": SPIECE_UNDERLINE }, replace_space] })
    } else {
        replace_space
    };
    let mut decoders = vec![
        json!({ "type": "Replace", "pattern": { "String": SPIECE_UNDERLINE }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    if add_space_prefix {
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
    }
    let merges: Vec<Value> = spm_merges(tokens, &scores, vocab).into_iter().map(|(a, b)| json!([a, b])).collect();
    Ok(Parts {
        normalizer,
        pre_tokenizer: Value::Null,
        decoder: json!({ "type": "Sequence", "decoders": decoders }),
        model: json!({
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_json(tokens, vocab), "merges": merges,
        }),
    })
}

/// BPE merges equivalent to a SentencePiece vocabulary, as HF's `SentencePieceExtractor`
/// derives them: every split of a piece into two in-vocabulary pieces is a merge; merges are
/// ordered by the score of the merged piece, highest first, ties in vocabulary order (pieces by
/// id, then splits by the ids of their halves).
fn spm_merges<'t>(tokens: &[&'t str], scores: &[f32], vocab: &HashMap<&str, usize>) -> Vec<(&'t str, &'t str)> {
    // NaN sorts last; -0.0 ties with 0.0 as it does in Python.
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s + 0.0 };
    let mut merges = Vec::new();
    for (id, (&piece, &score)) in tokens.iter().zip(scores).enumerate() {
        if vocab.get(piece) != Some(&id) {
            continue;
        }
        let mut local: Vec<(usize, usize, &'t str, &'t str)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at_checked(at)?;
                Some((*vocab.get(l)?, *vocab.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (key(score), l, r)));
    }
    // Stable, so equal scores keep the order above.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, l, r)| (l, r)).collect()
}

/// The post-processor: `[BOS] $A [EOS]`, and for pairs `[BOS] $A [EOS] [BOS] $B [EOS]` (the
/// second sequence with type id 1), as HF's Llama converter writes it.
fn template(bos: Option<(u32, String)>, eos: Option<(u32, String)>) -> Value {
    let special = |t: &Option<(u32, String)>, type_id: u32| {
        t.as_ref().map(|(_, text)| json!({ "SpecialToken": { "id": text, "type_id": type_id } }))
    };
    let sequence = |id: &str, type_id: u32| json!({ "Sequence": { "id": id, "type_id": type_id } });
    let single: Vec<Value> = special(&bos, 0).into_iter().chain([sequence("A", 0)]).chain(special(&eos, 0)).collect();
    let pair: Vec<Value> =
        single.iter().cloned().chain(special(&bos, 1)).chain([sequence("B", 1)]).chain(special(&eos, 1)).collect();
    let mut special_tokens = Map::new();
    for (id, text) in bos.iter().chain(eos.iter()) {
        special_tokens.insert(text.clone(), json!({ "id": text, "ids": [id], "tokens": [text] }));
    }
    json!({ "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens })
}
