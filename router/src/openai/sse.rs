//! Server-Sent Events in OpenAI's framing: `data: {json}\n\n` per chunk, `data: [DONE]\n\n` after
//! the last, or one `data: {"error": …}\n\n` and no `[DONE]` when the request fails mid-stream.
//!
//! [`respond`] waits for the first item before answering: an error there (no worker, overload,
//! bad input found by the core) becomes a plain HTTP error response with its own status.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::error::ApiError;

/// Chunks of one response, or the status that ended it.
pub(crate) type ChunkItem = Result<Vec<Value>, Status>;

/// Answers with `chunks` as an SSE stream (or with the error its first item is).
pub(crate) async fn respond<S>(mut chunks: S) -> Result<Response, ApiError>
where
    S: Stream<Item = ChunkItem> + Send + Unpin + 'static,
{
    let first = match chunks.next().await {
        Some(Ok(first)) => Some(first),
        Some(Err(status)) => return Err(ApiError::from_status(&status)),
        None => None,
    };
    let body = Events { first, rest: chunks, finished: false };
    Ok(([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response())
}

fn frame(out: &mut Vec<u8>, data: &str) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

fn frames(chunks: &[Value]) -> Bytes {
    let mut out = Vec::new();
    for c in chunks {
        frame(&mut out, &c.to_string());
    }
    Bytes::from(out)
}

/// The body stream: the first item, then the rest, then `[DONE]` (or an error event).
struct Events<S> {
    first: Option<Vec<Value>>,
    rest: S,
    finished: bool,
}

impl<S: Stream<Item = ChunkItem> + Unpin> Stream for Events<S> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(frames(&first))));
        }
        if self.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.rest).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunks))) => Poll::Ready(Some(Ok(frames(&chunks)))),
            Poll::Ready(Some(Err(status))) => {
                self.finished = true;
                let mut out = Vec::new();
                frame(&mut out, &ApiError::from_status(&status).body().to_string());
                Poll::Ready(Some(Ok(Bytes::from(out))))
            }
            Poll::Ready(None) => {
                self.finished = true;
                let mut out = Vec::new();
                frame(&mut out, "[DONE]");
                Poll::Ready(Some(Ok(Bytes::from(out))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn body_text(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn chunks_then_done_or_an_error_event() {
        let ok = tokio_stream::iter(vec![Ok(vec![json!({"a": 1}), json!({"a": 2})]), Ok(vec![json!({"b": 3})])]);
        let text = body_text(respond(ok).await.unwrap_or_else(IntoResponse::into_response)).await;
        assert_eq!(text, "data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: {\"b\":3}\n\ndata: [DONE]\n\n");

        let failing = tokio_stream::iter(vec![Ok(vec![json!({"a": 1})]), Err(Status::internal("worker died"))]);
        let text = body_text(respond(failing).await.unwrap_or_else(IntoResponse::into_response)).await;
        assert!(text.starts_with("data: {\"a\":1}\n\ndata: {\"error\":"), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");

        let refused = tokio_stream::iter(vec![Err::<Vec<Value>, _>(Status::unavailable("no healthy worker"))]);
        let e = respond(refused).await.err();
        assert_eq!(e.map(|e| e.status), Some(axum::http::StatusCode::SERVICE_UNAVAILABLE));
    }
}
