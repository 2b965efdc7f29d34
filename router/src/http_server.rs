//! The router's HTTP/1.1 server (OpenAI API, probes, metrics): axum's app served by hyper with
//! the protections `axum::serve` does not offer.
//!
//! Invariants:
//! - a client must send its request headers within `header_timeout` of connecting (or of the
//!   previous response on a kept-alive connection), or the connection is closed: a slow or idle
//!   client cannot pin a connection slot;
//! - accepted sockets have TCP_NODELAY (small SSE frames go out at once);
//! - every connection runs in a task of `connections`; when `stop` fires the listener closes and
//!   each connection finishes its in-flight request, then closes (hyper's graceful shutdown).

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves `app` on `listener` until `stop`, then waits for open connections to finish.
pub async fn serve(listener: TcpListener, app: axum::Router, header_timeout: Duration, stop: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_client_that_never_sends_headers_is_disconnected() {
        let timeout = Duration::from_millis(300);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let stop = CancellationToken::new();
        let app = axum::Router::new().route("/livez", get(|| async { "ok" }));
        let server = tokio::spawn(serve(listener, app, timeout, stop.clone()));

        // A well-behaved request is answered.
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
        ok.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap_or_default();
        let mut reply = String::new();
        ok.read_to_string(&mut reply).await.unwrap_or_default();
        assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok"), "{reply}");

        // A client that sends half a request line and stalls is cut off after the timeout.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
        slow.write_all(b"GET /liv").await.unwrap_or_default();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(timeout * 10, slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the stalled connection was still open after ten header timeouts");

        stop.cancel();
        server.await.unwrap_or_else(|e| panic!("{e}"));
    }
}
