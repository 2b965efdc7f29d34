//! Serving: the engine on its own thread (`engine_loop`), the `tessera.worker.v1.Worker` gRPC
//! service (`grpc`), the probe and metrics port (`http`, `metrics`), and the server lifecycle
//! with a graceful drain (`server`).

pub mod engine_loop;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod server;
