//! Distributed tracing, black-box: a router and a worker export OTLP/gRPC to a receiver served
//! here; one request yields the router's spans and the worker's spans under one trace id, the
//! worker's `worker.generate` a child of the router's attempt span (W3C trace context crossed
//! the hop in gRPC metadata).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tessera_proto::v1 as api;
use tessera_proto::v1::generation_client::GenerationClient;
use tessera_tests::{RouterProcess, WorkerProcess, shared_models};
use tokio_util::sync::CancellationToken;

/// A received span: (service name, span name, trace id, span id, parent span id).
type Received = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push((service.clone(), span.name, span.trace_id, span.span_id, span.parent_span_id));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_router_and_worker() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let (receiver, stop) = (receiver.clone(), stop.clone());
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(receiver)).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop.cancelled_owned(),
        )
    });
    // Export every 100 ms instead of every 5 s.
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let model = shared_models().join("stories260K");
    let model = model.to_str().unwrap();
    let worker =
        WorkerProcess::start_with_env(&["--model", model, "--kv-memory", "16MiB", "--otlp-endpoint", &endpoint], &env);
    let address = worker.grpc_url.trim_start_matches("http://").to_string();
    let router =
        RouterProcess::start_with_env(&["--model", model, "--worker", &address, "--otlp-endpoint", &endpoint], &env);
    assert!(router.wait_healthy(1, Duration::from_secs(30)));

    let mut c = GenerationClient::connect(router.grpc_url.clone()).await.unwrap();
    let request = api::GenerateRequest {
        prompt: Some(api::generate_request::Prompt::Text("Once upon a time".into())),
        sampling: Some(api::SamplingParams { temperature: Some(0.0), max_tokens: 8, ..Default::default() }),
        request_id: "traced-request-1".into(),
        ..Default::default()
    };
    c.generate(request).await.unwrap();

    // Wait until the router's request span and the worker's spans of that request have arrived.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (by_name, trace) = loop {
        let spans = receiver.spans.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let by_name: HashMap<String, Received> = spans.iter().map(|s| (s.1.clone(), s.clone())).collect();
        let complete =
            ["Generate", "router.attempt", "worker.generate", "worker.admission", "worker.prefill", "worker.decode"]
                .iter()
                .all(|n| by_name.contains_key(*n));
        if complete {
            break (by_name, spans);
        }
        assert!(Instant::now() < deadline, "spans received so far: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let root = &by_name["Generate"];
    let attempt = &by_name["router.attempt"];
    let generate = &by_name["worker.generate"];
    assert_eq!(root.0, "tessera-router");
    assert_eq!(generate.0, "tessera-worker");
    for name in ["router.attempt", "worker.generate", "worker.admission", "worker.prefill", "worker.decode"] {
        assert_eq!(by_name[name].2, root.2, "{name} is not in the router's trace");
    }
    assert!(root.4.is_empty(), "the router's request span is the root");
    assert_eq!(attempt.4, root.3, "router.attempt is a child of the request span");
    assert_eq!(generate.4, attempt.3, "worker.generate is a child of the router's attempt (across the gRPC hop)");
    for name in ["worker.admission", "worker.prefill", "worker.decode"] {
        assert_eq!(by_name[name].4, generate.3, "{name} is a child of worker.generate");
    }
    // Only Tessera's own spans are exported, not the transport's.
    assert!(trace.iter().all(|s| !s.1.starts_with("h2") && !s.1.contains("hyper")), "{trace:?}");
    // The exporters' connections end with their processes; then the receiver can stop.
    drop((router, worker));
    stop.cancel();
    server.await.unwrap().unwrap();
}
