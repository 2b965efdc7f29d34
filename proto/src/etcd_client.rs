//! Connecting to etcd: what the worker's registration and the router's discovery watch share.
//!
//! Endpoints are plain `http://host:port` URLs (the build has no TLS), tried in the order given;
//! connections probe with HTTP/2 pings so a vanished etcd host (no reset) is noticed within
//! ~10 s. Failed sessions are retried after a [`Backoff`]: 200 ms doubling to 3 s, reset by the
//! caller once a session is established.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Limit on each TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// An etcd endpoint that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// None given.
    #[error("no etcd endpoint given")]
    None,
    /// Not a plain `http://host:port` URL.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Bad {
        /// As given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

/// The tonic endpoint for an etcd URL.
pub fn endpoint(url: &str) -> Result<Endpoint, EndpointError> {
    let bad = |reason: String| EndpointError::Bad { endpoint: url.to_string(), reason };
    if !url.starts_with("http://") {
        return Err(bad("expected http://HOST:PORT (TLS is not supported)".into()));
    }
    Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string())).map(|e| {
        e.connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
    })
}

/// Checks a list of endpoints (at start-up: connecting skips a bad one like an unreachable one).
pub fn validate_endpoints(endpoints: &[String]) -> Result<(), EndpointError> {
    if endpoints.is_empty() {
        return Err(EndpointError::None);
    }
    endpoints.iter().try_for_each(|e| endpoint(e).map(drop))
}

/// The first endpoint that accepts a connection, with its URL. Unusable URLs are passed to
/// `on_bad` and skipped. The error is the last connection failure (`None` when no endpoint was
/// usable at all).
pub async fn connect_first(
    endpoints: &[String],
    on_bad: impl Fn(&EndpointError),
) -> Result<(Channel, String), Option<(String, tonic::transport::Error)>> {
    let mut last = None;
    for url in endpoints {
        let e = match endpoint(url) {
            Ok(e) => e,
            Err(e) => {
                on_bad(&e);
                continue;
            }
        };
        match e.connect().await {
            Ok(channel) => return Ok((channel, url.clone())),
            Err(source) => last = Some((url.clone(), source)),
        }
    }
    Err(last)
}

/// An error with its chain of causes ("transport error: tcp connect error: Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// Retry delays: 200 ms doubling to 3 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Starts at the shortest delay.
    pub fn new() -> Self {
        Backoff(BACKOFF_START)
    }

    /// The delay to wait now; the next one doubles (up to the maximum).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(BACKOFF_MAX);
        d
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.0 = BACKOFF_START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let seq: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seq, [200, 400, 800, 1600, 3000, 3000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }
}
