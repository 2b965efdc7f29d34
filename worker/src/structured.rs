//! Structured output: token masks that keep a sequence inside a JSON schema, any JSON object or
//! a regular expression, computed by `llguidance`.
//!
//! [`ConstraintCompiler`] is built once per worker from the model's tokenizer: it maps every
//! token id to the bytes it stands for, builds llguidance's token trie and its `ParserFactory`
//! (the expensive part), and shares them behind an `Arc`. [`ConstraintCompiler::compile`] turns a
//! [`ConstraintSpec`] into a per-sequence [`TokenConstraint`], which masks logits before each
//! sampling step and is advanced by each sampled token.
//!
//! Invariants:
//! - The token trie has exactly the model's vocabulary size. Ids the tokenizer does not know
//!   (padding rows of the embedding) and tokens whose text cannot be mapped to bytes become
//!   placeholder special tokens that no JSON or regex constraint can produce: always masked.
//! - A schema or regex llguidance cannot compile is [`EngineError::InvalidConstraint`] from
//!   `compile`. Later failures are [`EngineError::Constraint`]: a sampled token the constraint
//!   forbids, or the matcher giving up (e.g. a lexer resource limit).
//! - `mask_logits` never leaves a token finite that `accept` would refuse; once the constraint is
//!   finished only the EOS ids stay finite.
//! - llguidance never writes to stderr: the factory is quiet and nothing sets a log level.
//! - Between two JSON lexemes there may be at most one line break followed by at most
//!   [`JSON_MAX_INDENT`] spaces or tabs (as llama.cpp's JSON grammar allows), and nothing before
//!   the first: a model can indent, but cannot pad a bounded schema with runs of blank lines. The
//!   worker sets llguidance's JSON options itself, so a schema's own `x-guidance` is refused.
//! - Forced-token fast-forwarding is not used, so llguidance never needs our tokenizer's exact
//!   tokenisation: the token environment tokenises greedily and says it is not canonical.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use tokenizers::{DecoderWrapper, Tokenizer};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::EngineError;
use crate::sequence::OutputConstraint;

/// The most spaces or tabs JSON output may have between two lexemes, after at most one line break
/// (enough for indentation several levels deep).
pub const JSON_MAX_INDENT: usize = 20;

/// What the output must conform to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintSpec {
    /// A JSON value valid against this JSON schema (given as JSON text).
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression in full (Rust `regex` syntax).
    Regex(String),
}

/// Compiles constraints against one model's vocabulary. Built once per worker; `Send + Sync`,
/// shared through an `Arc`.
#[derive(Clone)]
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
}

impl ConstraintCompiler {
    /// Builds the token trie and llguidance's parser factory for `tokenizer`, padded (or cut) to
    /// the model's `vocab_size`. `eos_token_ids` (at least one) end a sequence and are the only
    /// tokens allowed once a constraint is complete.
    pub fn new(tokenizer: &Tokenizer, eos_token_ids: &[u32], vocab_size: usize) -> Result<Self, EngineError> {
        let vocab = u32::try_from(vocab_size)
            .map_err(|_| EngineError::Constraint(format!("vocabulary of {vocab_size} tokens is too large")))?;
        let (&eos, _) = eos_token_ids
            .split_first()
            .ok_or_else(|| EngineError::Constraint("structured output needs at least one EOS token id".into()))?;
        if let Some(&id) = eos_token_ids.iter().find(|&&id| id >= vocab) {
            return Err(EngineError::TokenOutOfRange { id, vocab: vocab_size });
        }
        let words = token_bytes(tokenizer, vocab)?;
        let info = TokRxInfo::new(vocab, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_token_ids);
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::Constraint(format!("building the constraint parser factory: {e:#}")))?;
        factory.quiet();
        Ok(ConstraintCompiler { factory: Arc::new(factory), vocab_size })
    }

    /// The vocabulary size masks are computed for (the model's, not the tokenizer's).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Validates and compiles `spec` into a fresh per-sequence matcher. An invalid schema or
    /// regex is [`EngineError::InvalidConstraint`] with llguidance's description of the problem.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<TokenConstraint, EngineError> {
        let grammar = match spec {
            ConstraintSpec::JsonSchema(text) => {
                let schema: Value = serde_json::from_str(text)
                    .map_err(|e| EngineError::InvalidConstraint(format!("JSON schema is not valid JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(with_json_options(schema)?)
            }
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(with_json_options(json!({ "type": "object" }))?)
            }
            ConstraintSpec::Regex(rx) => {
                check_regex(rx)?;
                TopLevelGrammar::from_regex(rx)
            }
        };
        let what = match spec {
            ConstraintSpec::JsonSchema(_) | ConstraintSpec::JsonObject => "JSON schema",
            ConstraintSpec::Regex(_) => "regex",
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| EngineError::InvalidConstraint(format!("{what}: {}", one_line(&format!("{e:#}")))))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidConstraint(format!("{what}: {}", one_line(&e))));
        }
        Ok(TokenConstraint { matcher, vocab_size: self.vocab_size })
    }
}

/// The matcher state of one sequence under a constraint. `Send`; not shared.
pub struct TokenConstraint {
    matcher: Matcher,
    vocab_size: usize,
}

impl TokenConstraint {
    /// Sets the logit of every token the constraint forbids next to `-inf`. `logits` has one entry
    /// per token of the model's vocabulary. Once the constraint is complete only EOS is allowed.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        if logits.len() != self.vocab_size {
            return Err(EngineError::Internal(format!(
                "constraint mask over {} logits, but the vocabulary has {} tokens",
                logits.len(),
                self.vocab_size
            )));
        }
        let mask =
            self.matcher.compute_mask_or_eos().map_err(|e| EngineError::Constraint(one_line(&format!("{e:#}"))))?;
        if mask.is_zero() {
            return Err(EngineError::Constraint("no token can continue the constrained output".into()));
        }
        let words = mask.as_slice();
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            // Missing words (never expected: the mask covers the vocabulary) forbid their tokens.
            let word = words.get(i).copied().unwrap_or(0);
            if word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// Advances past the sampled `token`; an error if the constraint did not allow it (the state
    /// is then unchanged). EOS after completion is accepted and changes nothing.
    pub fn accept(&mut self, token: u32) -> Result<(), EngineError> {
        if token as usize >= self.vocab_size {
            return Err(EngineError::TokenOutOfRange { id: token, vocab: self.vocab_size });
        }
        if let Some(e) = self.matcher.get_error() {
            return Err(EngineError::Constraint(one_line(&e)));
        }
        if self.matcher.is_stopped() {
            return if self.is_eos(token) {
                Ok(())
            } else {
                Err(EngineError::Constraint(format!("token {token} after the constrained output was complete")))
            };
        }
        match self.matcher.try_consume_tokens(&[token]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(EngineError::Constraint(format!("token {token} is not allowed by the constraint here"))),
            Err(e) => Err(EngineError::Constraint(one_line(&format!("{e:#}")))),
        }
    }

    /// True once the output is complete (EOS was accepted, or nothing more may follow): the
    /// engine ends the sequence with finish reason `Stop`.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    fn is_eos(&self, token: TokenId) -> bool {
        self.matcher.tok_env().is_ok_and(|env| env.tok_trie().eos_tokens().contains(&token))
    }
}

impl OutputConstraint for TokenConstraint {
    fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        TokenConstraint::mask_logits(self, logits)
    }

    fn accept(&mut self, token: u32) -> Result<(), EngineError> {
        TokenConstraint::accept(self, token)
    }

    fn is_finished(&self) -> bool {
        TokenConstraint::is_finished(self)
    }
}

/// Adds the worker's llguidance JSON options to `schema` (an object or a boolean schema).
fn with_json_options(schema: Value) -> Result<Value, EngineError> {
    let mut schema = match schema {
        Value::Object(map) => map,
        Value::Bool(true) => serde_json::Map::new(),
        Value::Bool(false) => {
            return Err(EngineError::InvalidConstraint("JSON schema `false` allows no value".into()));
        }
        other => {
            return Err(EngineError::InvalidConstraint(format!(
                "a JSON schema is an object or a boolean, not {}",
                json_kind(&other)
            )));
        }
    };
    if schema.contains_key("x-guidance") {
        return Err(EngineError::InvalidConstraint(
            "JSON schema: the `x-guidance` keyword is not accepted (the worker sets llguidance's options)".into(),
        ));
    }
    let whitespace = format!(r"[\x20\x09]{{1,{JSON_MAX_INDENT}}}|\x0D?\x0A[\x20\x09]{{0,{JSON_MAX_INDENT}}}");
    schema.insert("x-guidance".into(), json!({ "whitespace_pattern": whitespace }));
    Ok(Value::Object(schema))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// llguidance's messages may span lines (a caret under the offending spot); ours are one line.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Parses `rx` as llguidance will (Rust `regex` syntax), to name a syntax error in the user's
/// terms rather than those of the grammar llguidance wraps the regex in.
fn check_regex(rx: &str) -> Result<(), EngineError> {
    let bad = |kind: String, span: &regex_syntax::ast::Span| {
        EngineError::InvalidConstraint(format!(
            "regex {rx:?}: {kind} at bytes {}..{}",
            span.start.offset, span.end.offset
        ))
    };
    match regex_syntax::Parser::new().parse(rx) {
        Ok(_) => Ok(()),
        Err(regex_syntax::Error::Parse(e)) => Err(bad(e.kind().to_string(), e.span())),
        Err(regex_syntax::Error::Translate(e)) => Err(bad(e.kind().to_string(), e.span())),
        Err(e) => Err(EngineError::InvalidConstraint(format!("regex {rx:?}: {}", one_line(&e.to_string())))),
    }
}

/// llguidance's view of the vocabulary: the trie only. Tokenisation (used for prompts and forced
/// tokens, neither of which we use) is greedy over the trie.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// How token strings map to bytes, read from the tokenizer's decoder.
enum TokenText {
    /// GPT-2 byte-level BPE: each char of a token stands for one byte.
    ByteLevel,
    /// SentencePiece style: `space` stands for ' ', `<0xNN>` is the byte NN.
    SentencePiece { space: char },
}

impl TokenText {
    fn of(tokenizer: &Tokenizer) -> Result<Self, EngineError> {
        let decoder = tokenizer
            .get_decoder()
            .ok_or_else(|| EngineError::Constraint("structured output needs a tokenizer with a decoder".into()))?;
        let mut found = Found::default();
        found.visit(decoder)?;
        match found {
            Found { byte_level: true, .. } => Ok(TokenText::ByteLevel),
            Found { byte_fallback: true, space, .. } | Found { space: space @ Some(_), .. } => {
                Ok(TokenText::SentencePiece { space: space.unwrap_or(' ') })
            }
            Found { .. } => Err(EngineError::Constraint(format!(
                "structured output supports byte-level BPE and SentencePiece-style tokenizers, not decoder {}",
                serde_json::to_string(decoder).unwrap_or_default()
            ))),
        }
    }

    /// The bytes `name` stands for; `None` if it cannot be mapped.
    fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            TokenText::ByteLevel => name.chars().map(byte_level_char).collect(),
            TokenText::SentencePiece { space } => Some(match byte_token(name) {
                Some(b) => vec![b],
                None => name.replace(*space, " ").into_bytes(),
            }),
        }
    }
}

/// What a decoder (tree) says about token text.
#[derive(Default)]
struct Found {
    byte_level: bool,
    byte_fallback: bool,
    space: Option<char>,
}

impl Found {
    fn visit(&mut self, decoder: &DecoderWrapper) -> Result<(), EngineError> {
        match decoder {
            DecoderWrapper::ByteLevel(_) => self.byte_level = true,
            DecoderWrapper::ByteFallback(_) => self.byte_fallback = true,
            DecoderWrapper::Sequence(seq) => {
                for d in seq.get_decoders() {
                    self.visit(d)?;
                }
            }
            // Fields of these are private; their serialised form is the stable tokenizer.json one.
            DecoderWrapper::Replace(_) | DecoderWrapper::Metaspace(_) => {
                let v = serde_json::to_value(decoder)
                    .map_err(|e| EngineError::Constraint(format!("reading the tokenizer's decoder: {e}")))?;
                let from = if v["type"] == "Metaspace" {
                    v["replacement"].as_str()
                } else if v["content"] == " " {
                    v["pattern"]["String"].as_str()
                } else {
                    None
                };
                let mut chars = from.unwrap_or_default().chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    self.space = Some(c);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `<0xNN>` → NN.
fn byte_token(name: &str) -> Option<u8> {
    let hex = name.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The byte a GPT-2 byte-level char stands for: printable Latin-1 chars stand for themselves,
/// the other 68 bytes were shifted, in order, to U+0100…U+0143.
fn byte_level_char(c: char) -> Option<u8> {
    const fn self_mapped(b: u8) -> bool {
        matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
    }
    /// `SHIFTED[i]` is the byte U+0100 + i stands for.
    const SHIFTED: [u8; 68] = {
        let mut table = [0u8; 68];
        let (mut b, mut i) = (0usize, 0usize);
        while b < 256 {
            let byte = b as u8; // b < 256
            if !self_mapped(byte) {
                table[i] = byte;
                i += 1;
            }
            b += 1;
        }
        table
    };
    match u32::from(c) {
        code @ 0..=0xFF => u8::try_from(code).ok().filter(|&b| self_mapped(b)),
        code => SHIFTED.get(usize::try_from(code - 0x100).ok()?).copied(),
    }
}

/// The bytes of every token id below `vocab`, as llguidance wants them: special tokens are
/// `0xFF` followed by their text; ids without usable text become unique placeholder specials.
fn token_bytes(tokenizer: &Tokenizer, vocab: u32) -> Result<Vec<Vec<u8>>, EngineError> {
    let text = TokenText::of(tokenizer)?;
    let added = tokenizer.get_added_tokens_decoder();
    let special = |name: &str| {
        let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        bytes.extend_from_slice(name.as_bytes());
        bytes
    };
    let placeholder = |id: u32| special(&format!("<[{id}]>"));
    Ok((0..vocab)
        .map(|id| match added.get(&id) {
            Some(t) if t.special => special(&t.content),
            Some(t) => t.content.clone().into_bytes(),
            None => tokenizer
                .id_to_token(id)
                .and_then(|name| text.bytes(&name))
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| placeholder(id)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_chars_invert_gpt2_mapping() {
        assert_eq!(byte_level_char('a'), Some(b'a'));
        assert_eq!(byte_level_char('Ġ'), Some(b' ')); // U+0120
        assert_eq!(byte_level_char('Ċ'), Some(b'\n')); // U+010A
        assert_eq!(byte_level_char('\u{100}'), Some(0));
        assert_eq!(byte_level_char('\u{143}'), Some(0xAD));
        assert_eq!(byte_level_char('\u{144}'), None);
        assert_eq!(byte_level_char(' '), None);
        let all: std::collections::HashSet<u8> =
            (0u32..0x144).filter_map(char::from_u32).filter_map(byte_level_char).collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn byte_fallback_vocabularies_spell_text_with_byte_tokens() {
        // The dummy tokenizer: <unk> <s> </s>, then <0x00>…<0xFF> at ids 3…258, then fillers.
        let tok = crate::loader::text_assets::byte_fallback_tokenizer(300).unwrap();
        let compiler = ConstraintCompiler::new(&tok, &[2], 320).unwrap();
        let byte = |b: u8| 3 + u32::from(b);
        let step = |c: &mut TokenConstraint| {
            let mut logits = vec![0.0; 320];
            c.mask_logits(&mut logits).unwrap();
            (0..320).filter(|&i| logits[i as usize] == 0.0).collect::<Vec<u32>>()
        };
        let mut c = compiler.compile(&ConstraintSpec::Regex("é[0-9]".into())).unwrap();
        assert_eq!(step(&mut c), vec![byte(0xC3)]);
        c.accept(byte(0xC3)).unwrap();
        assert_eq!(step(&mut c), vec![byte(0xA9)]);
        c.accept(byte(0xA9)).unwrap();
        assert_eq!(step(&mut c), (b'0'..=b'9').map(byte).collect::<Vec<_>>());
        c.accept(byte(b'7')).unwrap();
        assert!(c.is_finished());
        assert_eq!(step(&mut c), vec![2]);
    }

    #[test]
    fn json_whitespace_is_one_line_break_and_bounded_indentation() {
        let tok = crate::loader::text_assets::byte_fallback_tokenizer(300).unwrap();
        let compiler = ConstraintCompiler::new(&tok, &[2], 320).unwrap();
        let byte = |b: u8| 3 + u32::from(b);
        let spec = ConstraintSpec::JsonSchema(r#"{"type": "array", "items": {"type": "integer"}}"#.into());
        // Feeds `text` byte by byte; `Err(i)` when byte `i` is refused.
        let feed = |text: &str| -> Result<(), usize> {
            let mut c = compiler.compile(&spec).unwrap();
            for (i, b) in text.bytes().enumerate() {
                let mut logits = vec![0.0; 320];
                c.mask_logits(&mut logits).unwrap();
                if logits[byte(b) as usize] != 0.0 {
                    return Err(i);
                }
                c.accept(byte(b)).unwrap();
            }
            Ok(())
        };
        let indent = " ".repeat(JSON_MAX_INDENT);
        assert_eq!(feed(&format!("[\n{indent}1,\r\n\t2, 3]")), Ok(()));
        assert_eq!(feed(&format!("[{indent} 1]")), Err(1 + JSON_MAX_INDENT));
        assert_eq!(feed("[1,\n\n2]"), Err(4));
        assert_eq!(feed(" [1]"), Err(0));
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token("<0xFF>"), Some(0xFF));
        assert_eq!(byte_token("<0x0A"), None);
        assert_eq!(byte_token("<0x0AB>"), None);
    }
}
