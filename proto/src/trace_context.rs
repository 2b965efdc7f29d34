//! W3C trace context across the router → worker gRPC hop: the router writes `traceparent` (and
//! `tracestate`) into the worker call's metadata, the worker reads them as the parent of its
//! spans, so one request is one trace across processes. An invalid or absent context injects
//! nothing and extracts as "no parent".

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

struct Writer<'a>(&'a mut MetadataMap);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        // W3C keys and values are ASCII; anything else is dropped rather than sent malformed.
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

struct Reader<'a>(&'a MetadataMap);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `cx`'s span context into `metadata` (nothing when `cx` has no valid span).
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut Writer(metadata));
}

/// The remote parent carried by `metadata`, if any.
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&Reader(metadata))
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn a_context_survives_the_round_trip_and_garbage_is_no_parent() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let mut md = MetadataMap::new();
        inject(&Context::new().with_remote_span_context(sc.clone()), &mut md);
        assert_eq!(
            md.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = extract(&md);
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());

        let mut bad = MetadataMap::new();
        bad.insert("traceparent", MetadataValue::from_static("not-a-trace"));
        assert!(!extract(&bad).span().span_context().is_valid());
        let mut none = MetadataMap::new();
        inject(&Context::new(), &mut none);
        assert!(none.is_empty());
    }
}
