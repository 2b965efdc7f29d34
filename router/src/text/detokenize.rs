//! Incremental, UTF-8-safe detokenization of a token stream.
//!
//! Decoding token by token is wrong for byte-level BPE (a character can span tokens, and
//! decoders such as SentencePiece's strip a leading space only at the start of a text), and
//! decoding the whole sequence on every token is quadratic. [`Detokenizer`] decodes a short
//! window instead: the text of `ids[prefix..]` minus the text of `ids[prefix..read]` is what the
//! new tokens add, given the same context on the left. Invariants: the concatenation of all
//! deltas equals the decoding of all ids (except a trailing incomplete character, which
//! [`Detokenizer::finish`] flushes); a delta never ends inside a character (an incomplete UTF-8
//! sequence decodes as U+FFFD and is held back until later tokens complete it).

use tokenizers::Tokenizer;

/// Tokens of left context kept when the window slides.
const CONTEXT_TOKENS: usize = 6;

/// Decoding failed (an id outside the vocabulary, or a broken tokenizer).
#[derive(Debug, thiserror::Error)]
#[error("detokenizing: {0}")]
pub struct DetokenizeError(pub String);

/// Turns a growing list of token ids into text deltas.
pub struct Detokenizer<'t> {
    tokenizer: &'t Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// Ids before this index have been emitted as text.
    read: usize,
}

impl<'t> Detokenizer<'t> {
    /// A detokenizer for a fresh generation; `skip_special` drops special tokens (EOS, …).
    pub fn new(tokenizer: &'t Tokenizer, skip_special: bool) -> Self {
        Detokenizer { tokenizer, skip_special, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// A detokenizer whose left context is the tail of the prompt, so the first generated
    /// tokens decode as they would after it (e.g. keep their leading space).
    pub fn after_prompt(tokenizer: &'t Tokenizer, skip_special: bool, prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        Detokenizer { tokenizer, skip_special, ids: tail.to_vec(), prefix: 0, read: tail.len() }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, DetokenizeError> {
        self.tokenizer.decode(ids, self.skip_special).map_err(|e| DetokenizeError(e.to_string()))
    }

    /// Adds tokens and returns the text they complete (possibly empty).
    pub fn push(&mut self, new: &[u32]) -> Result<String, DetokenizeError> {
        self.ids.extend_from_slice(new);
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let all = self.decode(&self.ids[self.prefix..])?;
        if all.ends_with('\u{FFFD}') || all.len() < before.len() || !all.is_char_boundary(before.len()) {
            return Ok(String::new());
        }
        let delta = all[before.len()..].to_string();
        self.read = self.ids.len();
        self.prefix = self.read.saturating_sub(CONTEXT_TOKENS);
        Ok(delta)
    }

    /// Flushes whatever is still held back (an incomplete character at the very end decodes as
    /// U+FFFD).
    pub fn finish(&mut self) -> Result<String, DetokenizeError> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let all = self.decode(&self.ids[self.prefix..])?;
        self.read = self.ids.len();
        Ok(if all.is_char_boundary(before.len().min(all.len())) && all.len() >= before.len() {
            all[before.len()..].to_string()
        } else {
            all
        })
    }
}
