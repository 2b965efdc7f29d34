//! Serving: the engine on its own thread (`engine_loop`), the `tessera.worker.v1.Worker` gRPC
//! service (`grpc`), the probe and metrics port (`http`, `metrics`), registration in etcd
//! (`registration`), and the server lifecycle with a graceful drain (`server`).

pub mod engine_loop;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod registration;
pub mod server;
