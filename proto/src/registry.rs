//! Where workers register in etcd (DESIGN.md, decision 8): the key layout both the worker (which
//! puts its key under a lease) and the router (which watches the prefix) must agree on. The value
//! stored under a key is an encoded `tessera.worker.v1.WorkerInfo`.
//!
//! Invariants: a worker's key is its model's prefix followed by its id, and ids hold no `/`, so a
//! key belongs to a model exactly when [`worker_id_in`] finds an id in it (a model name may hold
//! `/`: `a/b`'s keys lie under `a/`'s prefix, but not directly). [`prefix_range_end`] is etcd's
//! "every key with this prefix" range end.

/// The key prefix under which workers of `model` register, with a trailing `/`.
pub fn worker_prefix(model: &str) -> String {
    format!("/tessera/v1/workers/{model}/")
}

/// The key of one worker.
pub fn worker_key(model: &str, worker_id: &str) -> String {
    format!("{}{worker_id}", worker_prefix(model))
}

/// The worker id of `key` when it is a worker key directly under `prefix` (non-empty, no `/`).
pub fn worker_id_in<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(prefix).filter(|id| !id.is_empty() && !id.contains('/'))
}

/// The `range_end` that makes an etcd range or watch cover every key starting with `prefix`:
/// the prefix with trailing `0xff` bytes dropped and its last byte incremented. A prefix of only
/// `0xff` bytes (or an empty one) has no such bound: `[0]` then means "every key >= the key".
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_the_model_prefix() {
        assert_eq!(worker_key("m", "w1"), "/tessera/v1/workers/m/w1");
        assert!(worker_key("m", "w1").starts_with(&worker_prefix("m")));
        assert!(!worker_key("m2", "w").starts_with(&worker_prefix("m")));
    }

    #[test]
    fn worker_ids_are_found_only_directly_under_the_prefix() {
        let p = worker_prefix("a");
        assert_eq!(worker_id_in(&p, &worker_key("a", "w1")), Some("w1"));
        assert_eq!(worker_id_in(&p, &worker_key("a/b", "w1")), None);
        assert_eq!(worker_id_in(&p, &p), None);
        assert_eq!(worker_id_in(&p, &worker_key("ab", "w1")), None);
    }

    #[test]
    fn range_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_range_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_range_end(&[b'a', 0xfe, 0xff, 0xff]), vec![b'a', 0xff]);
        assert_eq!(prefix_range_end(&[0xff, 0xff]), vec![0]);
        assert_eq!(prefix_range_end(b""), vec![0]);
    }

    #[test]
    fn every_key_with_the_prefix_falls_inside_the_range() {
        let prefix = worker_prefix("m");
        let end = prefix_range_end(prefix.as_bytes());
        for key in [worker_key("m", "w"), worker_key("m", "\u{10ffff}"), prefix.clone()] {
            assert!(key.as_bytes() >= prefix.as_bytes() && key.as_bytes() < end.as_slice(), "{key}");
        }
        assert!(worker_key("m0", "w").as_bytes() >= end.as_slice());
    }
}
