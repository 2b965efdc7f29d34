//! The OpenAI HTTP API's transport rules, black-box over raw HTTP/1.1 (no worker is needed for
//! them): API keys, CORS only when configured, unknown routes in OpenAI's error shape, 503 when
//! no worker is routable, and the header read timeout.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_tests::{RouterProcess, TempDir};

/// Sends one raw request; returns (status, lower-cased header block, body).
fn send(addr: &str, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, head.to_lowercase(), body.to_string())
}

fn get(addr: &str, path: &str, extra: &str) -> (u16, String, String) {
    send(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n"))
}

#[test]
fn keys_cors_errors_and_header_timeouts() {
    let temp = TempDir::new();
    let keys = temp.path().join("keys");
    std::fs::write(&keys, "sk-one\n").unwrap();
    let keys = keys.to_str().unwrap();
    let origin = "https://app.example";
    let router = RouterProcess::start(&[
        "--worker",
        "127.0.0.1:1",
        "--api-key-file",
        keys,
        "--cors-origin",
        origin,
        "--header-timeout",
        "500ms",
    ]);
    let addr = router.http_addr.as_str();
    let auth = "Authorization: Bearer sk-one\r\n";

    // Keys: none or a wrong one is a 401 in OpenAI's shape; the right one passes.
    let (code, _, body) = get(addr, "/v1/models", "");
    assert_eq!(code, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert_eq!(get(addr, "/v1/models", "Authorization: Bearer sk-two\r\n").0, 401);
    assert_eq!(get(addr, "/v1/models", auth).0, 200);
    // Probes and metrics stay open.
    assert_eq!(get(addr, "/livez", "").0, 200);

    // CORS: the configured origin gets a preflight answer and labelled responses; others don't.
    let (code, head, _) = send(
        addr,
        &format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n"
        ),
    );
    assert_eq!(code, 204, "{head}");
    assert!(head.contains(&format!("access-control-allow-origin: {origin}")), "{head}");
    assert!(head.contains("access-control-allow-headers: authorization, content-type"), "{head}");
    let (_, head, _) = get(addr, "/v1/models", &format!("{auth}Origin: {origin}\r\n"));
    assert!(head.contains("access-control-allow-origin"), "{head}");
    let (_, head, _) = get(addr, "/v1/models", &format!("{auth}Origin: https://evil.example\r\n"));
    assert!(!head.contains("access-control-allow-origin"), "{head}");

    // Unknown routes: OpenAI's 404 shape.
    let (code, _, body) = get(addr, "/v1/embeddings", auth);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("unknown_url"), "{body}");

    // No routable worker: 503 in OpenAI's shape, streaming or not.
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"smollm2-135m-instruct","messages":[{{"role":"user","content":"Hi"}}],"stream":{stream}}}"#
        );
        let (code, _, reply) = send(
            addr,
            &format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        assert_eq!(code, 503, "stream={stream}: {reply}");
        assert!(reply.contains("\"type\":\"server_error\""), "{reply}");
    }

    // A client that stalls before finishing its headers is disconnected.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    slow.write_all(b"GET /v1/mod").unwrap();
    let began = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(began.elapsed() < Duration::from_secs(5), "the stalled connection stayed open {:?}", began.elapsed());

    // Without --cors-origin there are no CORS headers at all.
    let plain = RouterProcess::start(&["--worker", "127.0.0.1:1"]);
    let (_, head, _) = get(&plain.http_addr, "/v1/models", &format!("Origin: {origin}\r\n"));
    assert!(!head.contains("access-control"), "{head}");
}
