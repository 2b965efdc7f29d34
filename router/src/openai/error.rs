//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! the official SDKs map to their exception classes (400 `BadRequestError`, 401
//! `AuthenticationError`, 404 `NotFoundError`, 413, 429 `RateLimitError` with `Retry-After`,
//! 5xx `InternalServerError`).
//!
//! The generation core reports errors as gRPC statuses whose message starts with the field at
//! fault (`"sampling.max_tokens: …"`); [`ApiError::from_status`] maps the code to an HTTP status
//! and the proto field name back to the OpenAI parameter it came from.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::{Code, Status};

/// Seconds a client is told to wait after a 429.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A 400 for a parameter we do not support.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError { code: Some("unsupported_parameter"), ..ApiError::invalid(param, message) }
    }

    /// A 401.
    pub fn unauthorized(message: &str) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// A 404 for an unknown model.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server serves `{served}`."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// A 404 for an unknown route.
    pub fn no_route(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown request URL: {method} {path}."),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// A 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than this server's limit of {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// The OpenAI form of a status from the generation core.
    pub fn from_status(status: &Status) -> Self {
        let message = status.message().to_string();
        let param = message.split_once(": ").map(|(field, _)| openai_param(field)).filter(|p| is_param(p));
        let (http, kind, code) = match status.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::Unimplemented => (StatusCode::BAD_REQUEST, "invalid_request_error", Some("unsupported_parameter")),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found")),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key")),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "invalid_request_error", None),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("overloaded")),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("no_healthy_worker")),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout")),
            Code::Cancelled => {
                (StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST), "invalid_request_error", None)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError { status: http, message, kind, param, code }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The OpenAI parameter a proto field path stands for (`sampling.max_tokens` → `max_tokens`).
fn openai_param(field: &str) -> String {
    let field = field.strip_prefix("sampling.").unwrap_or(field);
    let field = field.split('.').next().unwrap_or(field);
    match field {
        "prompt" => "prompt".into(),
        "parameters_json" | "tools" => "tools".into(),
        "arguments_json" => "messages".into(),
        "schema_json" => "response_format".into(),
        other => other.into(),
    }
}

/// Whether `p` looks like a parameter name rather than the start of a sentence.
fn is_param(p: &str) -> bool {
    !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_[]".contains(c))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_http_and_name_the_parameter() {
        let e = ApiError::from_status(&Status::invalid_argument("sampling.max_tokens: 9999 exceeds the context"));
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("max_tokens")));
        let e = ApiError::from_status(&Status::invalid_argument("messages[2].role: \"robot\" is not a role"));
        assert_eq!(e.param.as_deref(), Some("messages[2]"));
        let e = ApiError::from_status(&Status::not_found("model: unknown model"));
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, Some("model_not_found")));
        let e = ApiError::from_status(&Status::unavailable("No healthy worker for m"));
        assert_eq!((e.status, e.param), (StatusCode::SERVICE_UNAVAILABLE, None));
        let e = ApiError::from_status(&Status::resource_exhausted("overloaded"));
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn the_body_has_openais_shape() {
        let body = ApiError::invalid("n", "must be at most 16").body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "n");
        assert!(body["error"]["code"].is_null());
        assert_eq!(body["error"]["message"], "must be at most 16");
    }
}
