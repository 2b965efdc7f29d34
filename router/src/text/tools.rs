//! Tool calls in model output: parsing the text a model writes into typed calls, whole or as it
//! streams.
//!
//! Three output conventions ([`ToolCallStyle`], picked from the chat template's markers):
//! Mistral (`[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`, and the v11+ form
//! `[TOOL_CALLS]name[ARGS]{…}`, optionally `[CALL_ID]id` before `[ARGS]`), Hermes/Qwen
//! (`<tool_call>{"name": …, "arguments": {…}}</tool_call>`, repeated) and plain JSON (the output
//! starts with `{"name", "arguments"}`, an array of them, or `{"tool_calls": […]}`). `parameters`
//! is accepted for `arguments`, and arguments given as a JSON string holding an object are
//! accepted too.
//!
//! Invariants:
//! - One state machine does both jobs: [`parse_tool_calls`] is [`ToolCallStreamer::push`] of the
//!   whole text then [`ToolCallStreamer::finish`], and every decision the streamer takes on a
//!   prefix holds for every continuation of it. So feeding a text in any chunks yields the same
//!   content, calls and errors as parsing it whole (ids too, given the same seed).
//! - `content` is the text outside the calls, verbatim except that whitespace touching a call is
//!   dropped (`"Sure.\n[TOOL_CALLS] […]"` gives `"Sure."`). The streamer releases content at once
//!   unless it could still be the start of a marker, or is whitespace that could still touch one.
//! - A call is emitted once complete (a balanced JSON value, a closing tag, or the end of the
//!   output). JSON is delimited by a string-aware bracket scan, so brackets, quotes and tags
//!   inside strings never end a call early; the scan resumes where it stopped, so streaming a
//!   long call stays linear.
//! - Nothing a model meant as a call is dropped silently: malformed JSON, unterminated calls,
//!   arguments that are not an object and names not in `tools` become `errors` (the call is not
//!   in `calls`). In the JSON style only output that has the shape of a call counts as one; any
//!   other JSON is content.
//! - Every call has an id unique within the response: the model's when it gives a usable one,
//!   else `call_` + 24 random alphanumerics (Mistral: 9 alphanumerics, the length Mistral's
//!   templates insist on when the call is sent back).

use std::collections::HashSet;

use rand::distr::Alphanumeric;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use json_scan::{JsonScan, ScanEnd, scan_json};

mod json_scan;

/// A tool the model may call (the OpenAI `function` tool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// The function name calls must use.
    pub name: String,
    /// What the tool does; empty when not given.
    pub description: String,
    /// JSON Schema of the arguments (an object schema).
    pub parameters: Value,
}

/// A tool call, as the model made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// Unique within the response.
    pub id: String,
    /// One of the request's tools.
    pub name: String,
    /// The arguments; always a JSON object.
    pub arguments: Value,
}

impl ParsedToolCall {
    /// The arguments as compact JSON text (the wire form, `arguments_json`).
    pub fn arguments_json(&self) -> String {
        self.arguments.to_string()
    }
}

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallStyle {
    /// `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]` or `[TOOL_CALLS]name[ARGS]{…}`.
    Mistral,
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, repeated.
    Hermes,
    /// The output is `{"name": …, "arguments": {…}}`, an array of them, or `{"tool_calls": […]}`.
    #[default]
    Json,
}

impl ToolCallStyle {
    /// The style a chat template teaches, judged by the markers it uses; [`ToolCallStyle::Json`]
    /// when it uses none.
    pub fn detect(chat_template_source: &str) -> Self {
        if chat_template_source.contains(MISTRAL_MARKER) {
            ToolCallStyle::Mistral
        } else if chat_template_source.contains(HERMES_OPEN) {
            ToolCallStyle::Hermes
        } else {
            ToolCallStyle::Json
        }
    }
}

/// What a text (or a streamed delta of it) holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallParse {
    /// Text outside the calls (for a delta: the content released now).
    pub content: String,
    /// Complete, valid calls, in output order.
    pub calls: Vec<ParsedToolCall>,
    /// Calls that could not be used, one message each.
    pub errors: Vec<String>,
}

impl ToolCallParse {
    fn append(&mut self, other: ToolCallParse) {
        self.content.push_str(&other.content);
        self.calls.extend(other.calls);
        self.errors.extend(other.errors);
    }
}

/// Parses a complete model output.
pub fn parse_tool_calls(style: ToolCallStyle, text: &str, tools: &[ToolSpec]) -> ToolCallParse {
    let mut streamer = ToolCallStreamer::new(style, tools);
    let mut out = streamer.push(text);
    out.append(streamer.finish());
    out
}

const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const MISTRAL_CALL_ID: &str = "[CALL_ID]";
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
/// Raw text quoted in an error message is cut to about this many bytes.
const QUOTE_LIMIT: usize = 200;

/// Splits streamed model output into content and tool calls.
#[derive(Debug, Clone)]
pub struct ToolCallStreamer {
    style: ToolCallStyle,
    tools: HashSet<String>,
    /// Text not yet released as content or consumed as a call.
    buf: String,
    /// The last thing taken from `buf` was a call (whitespace after it is dropped).
    after_call: bool,
    /// JSON style: a JSON value at the front of `buf` may still be a call.
    json_lead: bool,
    /// The bracket scan of the JSON value at the front of `buf`, kept across pushes.
    scan: Option<JsonScan>,
    used_ids: HashSet<String>,
    rng: SmallRng,
}

impl ToolCallStreamer {
    /// A streamer for calls to `tools`, with randomly seeded ids.
    pub fn new(style: ToolCallStyle, tools: &[ToolSpec]) -> Self {
        Self::with_rng(style, tools, SmallRng::from_rng(&mut rand::rng()))
    }

    /// Like [`ToolCallStreamer::new`], with ids drawn from `seed` (for reproducible tests).
    pub fn with_seed(style: ToolCallStyle, tools: &[ToolSpec], seed: u64) -> Self {
        Self::with_rng(style, tools, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(style: ToolCallStyle, tools: &[ToolSpec], rng: SmallRng) -> Self {
        ToolCallStreamer {
            style,
            tools: tools.iter().map(|t| t.name.clone()).collect(),
            buf: String::new(),
            after_call: false,
            json_lead: style == ToolCallStyle::Json,
            scan: None,
            used_ids: HashSet::new(),
            rng,
        }
    }

    /// Feeds a delta; returns the content that is now safe to show and the calls it completed.
    pub fn push(&mut self, delta: &str) -> ToolCallParse {
        self.buf.push_str(delta);
        self.run(false)
    }

    /// Ends the output: held-back text is released, an unfinished call becomes an error.
    pub fn finish(&mut self) -> ToolCallParse {
        self.run(true)
    }

    fn run(&mut self, at_end: bool) -> ToolCallParse {
        let mut out = ToolCallParse::default();
        while !self.buf.is_empty() {
            let step = match self.style {
                ToolCallStyle::Mistral => self.step_marked(MISTRAL_MARKER, at_end),
                ToolCallStyle::Hermes => self.step_marked(HERMES_OPEN, at_end),
                ToolCallStyle::Json => self.step_json(at_end),
            };
            match step {
                Step::NeedMore => return out,
                Step::Skip(n) => {
                    self.buf.drain(..n);
                }
                Step::Content(n) => {
                    out.content.push_str(&self.buf[..n]);
                    self.buf.drain(..n);
                    self.after_call = false;
                }
                Step::Call { len, items } => {
                    self.buf.drain(..len);
                    self.after_call = true;
                    for item in items {
                        match item.and_then(|raw| self.accept(raw)) {
                            Ok(call) => out.calls.push(call),
                            Err(e) => out.errors.push(e),
                        }
                    }
                }
            }
            // Offsets in a kept scan are relative to the old front of `buf`.
            self.scan = None;
        }
        out
    }

    /// One step for the marker styles (Mistral, Hermes).
    fn step_marked(&mut self, marker: &str, at_end: bool) -> Step {
        let buf = self.buf.as_str();
        if self.after_call {
            let ws = leading_ws(buf);
            if ws > 0 {
                return Step::Skip(ws);
            }
        }
        if buf.starts_with(marker) {
            return match self.style {
                ToolCallStyle::Hermes => hermes_call(buf, at_end, &mut self.scan),
                _ => mistral_call(buf, at_end, &mut self.scan),
            };
        }
        let (hold, complete) = match marker_at(buf, marker) {
            Some(at) => (at, buf[at..].starts_with(marker)),
            None => (buf.len(), false),
        };
        if at_end && !complete {
            return Step::Content(buf.len());
        }
        // Whitespace before a marker touches the call; before a possible marker, it may.
        let end = hold - trailing_ws(&buf[..hold]);
        match (end, complete) {
            (0, true) => Step::Skip(hold),
            (0, false) => Step::NeedMore,
            (end, _) => Step::Content(end),
        }
    }

    /// One step for the JSON style.
    fn step_json(&mut self, at_end: bool) -> Step {
        let buf = self.buf.as_str();
        if self.after_call {
            let skip = buf.bytes().take_while(|b| b.is_ascii_whitespace() || *b == b';').count();
            if skip > 0 {
                return Step::Skip(skip);
            }
        }
        if !self.json_lead {
            return Step::Content(buf.len());
        }
        let start = leading_ws(buf);
        if !matches!(buf.as_bytes().get(start), Some(b'{' | b'[')) {
            if start == buf.len() && !at_end {
                return Step::NeedMore;
            }
            self.json_lead = false;
            return Step::Content(buf.len());
        }
        match scan_json(&mut self.scan, buf, start) {
            None if !at_end => Step::NeedMore,
            Some(ScanEnd::Balanced(end)) => match json_style_calls(&buf[start..end]) {
                Some(items) => Step::Call { len: end, items },
                None => {
                    self.json_lead = false;
                    Step::Content(end)
                }
            },
            None | Some(ScanEnd::Mismatched(_)) => {
                self.json_lead = false;
                Step::Content(buf.len())
            }
        }
    }

    /// Checks a call against the tools and gives it an id.
    fn accept(&mut self, raw: RawCall) -> Result<ParsedToolCall, String> {
        if !self.tools.contains(&raw.name) {
            let mut known: Vec<&str> = self.tools.iter().map(String::as_str).collect();
            known.sort_unstable();
            return Err(format!("tool call names unknown tool {:?} (tools: {known:?})", raw.name));
        }
        let mistral = self.style == ToolCallStyle::Mistral;
        let id = match raw.id {
            Some(id) if !self.used_ids.contains(&id) && (!mistral || is_mistral_id(&id)) => id,
            _ => loop {
                let id = if mistral { self.random_id(9) } else { format!("call_{}", self.random_id(24)) };
                if !self.used_ids.contains(&id) {
                    break id;
                }
            },
        };
        self.used_ids.insert(id.clone());
        Ok(ParsedToolCall { id, name: raw.name, arguments: raw.arguments })
    }

    fn random_id(&mut self, len: usize) -> String {
        (0..len).map(|_| char::from(self.rng.sample(Alphanumeric))).collect()
    }
}

fn is_mistral_id(id: &str) -> bool {
    id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// What to do with the front of the buffer.
#[derive(Debug)]
enum Step {
    /// Undecidable until more text arrives.
    NeedMore,
    /// Drop this many bytes (whitespace touching a call, a marker's padding).
    Skip(usize),
    /// Release this many bytes as content.
    Content(usize),
    /// This many bytes were a call region holding these calls (or errors).
    Call { len: usize, items: Vec<Result<RawCall, String>> },
}

/// A call before its name is checked and its id settled.
#[derive(Debug)]
struct RawCall {
    name: String,
    arguments: Value,
    id: Option<String>,
}

/// `buf` starts with `[TOOL_CALLS]`.
fn mistral_call(buf: &str, at_end: bool, scan: &mut Option<JsonScan>) -> Step {
    let bytes = buf.as_bytes();
    let i = MISTRAL_MARKER.len() + leading_ws(&buf[MISTRAL_MARKER.len()..]);
    match bytes.get(i) {
        None => incomplete(buf, at_end),
        Some(b'[' | b'{') => match scan_json(scan, buf, i) {
            None => incomplete(buf, at_end),
            Some(ScanEnd::Balanced(end)) => Step::Call { len: end, items: calls_in(&buf[i..end]) },
            Some(ScanEnd::Mismatched(end)) => malformed(end, &buf[..end], "unbalanced brackets"),
        },
        Some(b) if is_name_byte(*b) => mistral_named_call(buf, i, at_end, scan),
        Some(_) => malformed(i, &buf[..i], "[TOOL_CALLS] is not followed by a call"),
    }
}

/// `[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}`, the name starting at `i`.
fn mistral_named_call(buf: &str, i: usize, at_end: bool, scan: &mut Option<JsonScan>) -> Step {
    let name_end = i + buf[i..].bytes().take_while(|b| is_name_byte(*b)).count();
    let name = &buf[i..name_end];
    let mut j = name_end + leading_ws(&buf[name_end..]);
    let mut id = None;
    if buf[j..].starts_with(MISTRAL_CALL_ID) {
        let id_start = j + MISTRAL_CALL_ID.len();
        let id_end = id_start + buf[id_start..].bytes().take_while(u8::is_ascii_alphanumeric).count();
        id = Some(buf[id_start..id_end].to_string());
        j = id_end + leading_ws(&buf[id_end..]);
    }
    if buf[j..].starts_with(MISTRAL_ARGS) {
        j += MISTRAL_ARGS.len();
        j += leading_ws(&buf[j..]);
    }
    let rest = &buf[j..];
    if rest.is_empty() || (id.is_none() && MISTRAL_CALL_ID.starts_with(rest)) || MISTRAL_ARGS.starts_with(rest) {
        return incomplete(buf, at_end);
    }
    if !rest.starts_with('{') {
        return malformed(j, &buf[..j], "the tool name is not followed by [ARGS] and a JSON object");
    }
    match scan_json(scan, buf, j) {
        None => incomplete(buf, at_end),
        Some(ScanEnd::Mismatched(end)) => malformed(end, &buf[..end], "unbalanced brackets"),
        Some(ScanEnd::Balanced(end)) => {
            let item = match serde_json::from_str::<Value>(&buf[j..end]) {
                Ok(args) => arguments(name, args).map(|arguments| RawCall {
                    name: name.to_string(),
                    arguments,
                    id: id.filter(|id| !id.is_empty()),
                }),
                Err(e) => {
                    Err(format!("tool call {name:?}: arguments are not valid JSON ({e}): {}", quote(&buf[..end])))
                }
            };
            Step::Call { len: end, items: vec![item] }
        }
    }
}

/// `buf` starts with `<tool_call>`.
fn hermes_call(buf: &str, at_end: bool, scan: &mut Option<JsonScan>) -> Step {
    let i = HERMES_OPEN.len() + leading_ws(&buf[HERMES_OPEN.len()..]);
    let close_from = |from: usize, why: &str| match buf[from..].find(HERMES_CLOSE) {
        Some(at) => {
            let len = from + at + HERMES_CLOSE.len();
            malformed(len, &buf[..len], why)
        }
        None => incomplete(buf, at_end),
    };
    match buf.as_bytes().get(i) {
        None => incomplete(buf, at_end),
        Some(b'[' | b'{') => match scan_json(scan, buf, i) {
            None => incomplete(buf, at_end),
            Some(ScanEnd::Mismatched(end)) => close_from(end, "unbalanced brackets"),
            Some(ScanEnd::Balanced(end)) => {
                let j = end + leading_ws(&buf[end..]);
                let rest = &buf[j..];
                if rest.starts_with(HERMES_CLOSE) {
                    Step::Call { len: j + HERMES_CLOSE.len(), items: calls_in(&buf[i..end]) }
                } else if rest.starts_with(HERMES_OPEN) {
                    // The closing tag was left out and the next call follows: this one still counts.
                    Step::Call { len: j, items: calls_in(&buf[i..end]) }
                } else if HERMES_CLOSE.starts_with(rest) || HERMES_OPEN.starts_with(rest) {
                    // So does a call the output ends in without (all of) its closing tag.
                    if at_end { Step::Call { len: buf.len(), items: calls_in(&buf[i..end]) } } else { Step::NeedMore }
                } else {
                    close_from(end, "unexpected text after the call's JSON")
                }
            }
        },
        Some(_) => close_from(i, "the call is not a JSON object"),
    }
}

/// The region runs to the end of the buffer without being complete.
fn incomplete(buf: &str, at_end: bool) -> Step {
    if at_end {
        Step::Call { len: buf.len(), items: vec![Err(format!("unterminated tool call: {}", quote(buf)))] }
    } else {
        Step::NeedMore
    }
}

fn malformed(len: usize, raw: &str, why: &str) -> Step {
    Step::Call { len, items: vec![Err(format!("malformed tool call ({why}): {}", quote(raw)))] }
}

/// The calls in a marked region's JSON: one call object, an array of them, or `{"tool_calls": […]}`.
fn calls_in(json: &str) -> Vec<Result<RawCall, String>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Array(items)) => items.into_iter().map(call_from).collect(),
        Ok(Value::Object(mut obj)) => match obj.remove("tool_calls") {
            Some(Value::Array(items)) => items.into_iter().map(call_from).collect(),
            Some(other) => {
                obj.insert("tool_calls".into(), other);
                vec![call_from(Value::Object(obj))]
            }
            None => vec![call_from(Value::Object(obj))],
        },
        Ok(other) => vec![Err(format!("tool call is not a JSON object: {}", quote(&other.to_string())))],
        Err(e) => vec![Err(format!("tool call is not valid JSON ({e}): {}", quote(json)))],
    }
}

/// JSON-style output: the calls, or `None` when the value does not have the shape of a call.
fn json_style_calls(json: &str) -> Option<Vec<Result<RawCall, String>>> {
    let value: Value = serde_json::from_str(json).ok()?;
    let looks_like_call = |v: &Value| {
        v.get("function").is_some_and(Value::is_object)
            || (v.get("name").is_some_and(Value::is_string)
                && (v.get("arguments").is_some() || v.get("parameters").is_some()))
    };
    let items = match value {
        Value::Object(mut obj) if obj.get("tool_calls").is_some_and(Value::is_array) => {
            match obj.remove("tool_calls") {
                Some(Value::Array(items)) => items,
                _ => return None,
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(looks_like_call) => items,
        v if looks_like_call(&v) => vec![v],
        _ => return None,
    };
    Some(items.into_iter().map(call_from).collect())
}

/// One call object: `{"name", "arguments"|"parameters", "id"?}` or OpenAI's
/// `{"id", "type", "function": {"name", "arguments"}}`.
fn call_from(value: Value) -> Result<RawCall, String> {
    let Value::Object(mut obj) = value else {
        return Err(format!("tool call is not a JSON object: {}", quote(&value.to_string())));
    };
    let id = match obj.remove("id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id),
        _ => None,
    };
    if let Some(Value::Object(function)) = obj.remove("function") {
        obj = function;
    }
    let name = match obj.remove("name") {
        Some(Value::String(name)) if !name.is_empty() => name,
        _ => return Err(format!("tool call has no name: {}", quote(&Value::Object(obj).to_string()))),
    };
    let args = obj.remove("arguments").or_else(|| obj.remove("parameters")).unwrap_or(Value::Null);
    let arguments = arguments(&name, args)?;
    Ok(RawCall { name, arguments, id })
}

/// Arguments must be an object; a JSON string holding an object and a missing value are
/// accepted.
fn arguments(name: &str, args: Value) -> Result<Value, String> {
    match args {
        Value::Object(_) => Ok(args),
        Value::Null => Ok(Value::Object(serde_json::Map::new())),
        Value::String(ref text) => match serde_json::from_str::<Value>(text) {
            Ok(inner @ Value::Object(_)) => Ok(inner),
            _ => Err(format!("tool call {name:?}: arguments are not a JSON object: {}", quote(text))),
        },
        other => Err(format!("tool call {name:?}: arguments are not a JSON object: {}", quote(&other.to_string()))),
    }
}

/// Where `marker` starts in `buf`, or where a suffix of `buf` could start it; the earliest.
fn marker_at(buf: &str, marker: &str) -> Option<usize> {
    buf.char_indices().map(|(i, _)| i).find(|&i| {
        let rest = &buf[i..];
        rest.starts_with(marker) || marker.starts_with(rest)
    })
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn leading_ws(s: &str) -> usize {
    s.len() - s.trim_start().len()
}

fn trailing_ws(s: &str) -> usize {
    s.len() - s.trim_end().len()
}

/// `raw`, cut for an error message.
fn quote(raw: &str) -> String {
    if raw.len() <= QUOTE_LIMIT {
        return format!("{raw:?}");
    }
    let mut end = QUOTE_LIMIT;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", &raw[..end])
}

#[cfg(test)]
mod tests;
