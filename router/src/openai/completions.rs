//! `POST /v1/completions` (the legacy text-completion API): each prompt (a string, or token ids)
//! becomes one `tessera.v1.GenerateRequest` with `n` samples; choice `i·n + j` is sample `j` of
//! prompt `i`, as at OpenAI. `echo` puts the prompt's text before each choice's text; `logprobs`
//! (an integer: alternatives per token) returns OpenAI's legacy per-token arrays for the
//! generated tokens. Prompt-token logprobs (`echo` with `logprobs`), `suffix` and `best_of`
//! above `n` are refused with a 400.

use serde_json::{Value, json};
use tessera_proto::v1 as api;

use super::error::ApiError;
use super::types::CompletionRequest;
use super::{Shape, sampling, stop_list};
use crate::service::Delta;

/// Most prompts in one request.
const MAX_PROMPTS: usize = 64;
/// OpenAI's limit on `logprobs` for completions.
const MAX_LOGPROBS: u32 = 5;

/// The prompts of a request, each as the proto prompt.
pub(crate) fn prompts(v: &Value) -> Result<Vec<api::generate_request::Prompt>, ApiError> {
    use api::generate_request::Prompt;
    let ids = |xs: &[Value]| -> Option<Vec<u32>> {
        xs.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect()
    };
    let shape = "prompt must be a string, an array of strings, an array of token ids, or an array of such arrays";
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(xs) if xs.is_empty() => return Err(ApiError::invalid("prompt", "prompt is empty")),
        Value::Array(xs) if xs.iter().all(Value::is_string) => {
            xs.iter().filter_map(Value::as_str).map(|s| Prompt::Text(s.to_string())).collect()
        }
        Value::Array(xs) if xs.iter().all(Value::is_number) => {
            vec![Prompt::TokenIds(api::TokenIds { ids: ids(xs).ok_or_else(|| ApiError::invalid("prompt", shape))? })]
        }
        Value::Array(xs) if xs.iter().all(Value::is_array) => xs
            .iter()
            .map(|x| {
                let list = x.as_array().map(Vec::as_slice).unwrap_or_default();
                ids(list)
                    .map(|ids| Prompt::TokenIds(api::TokenIds { ids }))
                    .ok_or_else(|| ApiError::invalid("prompt", shape))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid("prompt", shape)),
    };
    if out.len() > MAX_PROMPTS {
        return Err(ApiError::invalid("prompt", format!("at most {MAX_PROMPTS} prompts per request")));
    }
    Ok(out)
}

/// One proto request per prompt.
pub(crate) fn to_proto(r: &CompletionRequest) -> Result<Vec<api::GenerateRequest>, ApiError> {
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    if r.best_of.is_some_and(|b| b > r.n.unwrap_or(1)) {
        return Err(ApiError::unsupported("best_of", "best_of above n is not supported"));
    }
    if r.echo && r.logprobs.is_some() {
        return Err(ApiError::unsupported("logprobs", "logprobs of the echoed prompt are not supported"));
    }
    if r.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(ApiError::invalid("logprobs", format!("logprobs must be at most {MAX_LOGPROBS}")));
    }
    if r.stream_options.is_some() && !r.stream {
        return Err(ApiError::invalid("stream_options", "stream_options is only allowed when stream is true"));
    }
    // OpenAI's default for this API is 16 tokens.
    let mut s = sampling(shape_of!(r, Some(r.max_tokens.unwrap_or(16))))?;
    s.logprobs = r.logprobs.is_some();
    s.top_logprobs = r.logprobs.unwrap_or(0);
    Ok(prompts(&r.prompt)?
        .into_iter()
        .map(|p| api::GenerateRequest {
            model: r.model.clone(),
            prompt: Some(p),
            sampling: Some(s.clone()),
            response_format: None,
            return_token_ids: false,
            request_id: String::new(),
        })
        .collect())
}

/// OpenAI's legacy logprobs object for generated tokens; `offset` is where the choice's
/// generated text starts in its `text` (after an echoed prompt).
pub(crate) fn logprobs(lps: &[api::TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(lps.len());
    for t in lps {
        offsets.push(at);
        at += t.token.len();
    }
    json!({
        "tokens": lps.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| {
            t.top_logprobs.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// One choice of a non-streamed response.
pub(crate) fn choice(index: usize, echo: &str, c: &api::Completion, want_logprobs: bool) -> Value {
    let reason = api::FinishReason::try_from(c.finish_reason).unwrap_or(api::FinishReason::Stop);
    json!({
        "index": index,
        "text": format!("{echo}{}", c.text),
        "logprobs": if want_logprobs { logprobs(&c.logprobs, echo.len()) } else { Value::Null },
        "finish_reason": super::chat::finish_reason(reason),
    })
}

/// One streamed chunk for a delta of prompt `prompt` (of `n` samples each); `echo` is sent
/// before a choice's first text.
pub(crate) fn chunk(
    head: &super::Head,
    prompt: usize,
    n: u32,
    echo: Option<&str>,
    d: &Delta,
    want_logprobs: bool,
) -> Value {
    let text = format!("{}{}", echo.unwrap_or_default(), d.text);
    let lp = if want_logprobs { logprobs(&d.logprobs, echo.map_or(0, str::len)) } else { Value::Null };
    let mut c = head.object("text_completion");
    c["choices"] = json!([{
        "index": prompt * n as usize + d.index as usize,
        "text": text,
        "logprobs": lp,
        "finish_reason": d.finish.as_ref().map(|(r, _)| super::chat::finish_reason(*r)),
    }]);
    c
}
