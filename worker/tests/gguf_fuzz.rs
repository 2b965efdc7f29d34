//! Hostile input for the GGUF header parser: random bytes, every truncation of a valid file,
//! random corruptions and hand-made headers that claim absurd counts. `parse_header` must return
//! (Ok or Err) without panicking, and claims that cannot fit in the input must fail before
//! anything is allocated for them (the allocation bound itself is checked in `gguf_alloc.rs`).

mod support;

use proptest::prelude::*;
use support::{GgufWriter, header_prefix as prefix, put_str, s, strings};
use tessera_worker::loader::gguf::{GgmlType, GgufValue, parse_header};

/// A small valid file with metadata of several types and tensors of every supported type.
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", s("llama"))
        .meta("llama.block_count", GgufValue::U32(2))
        .meta("llama.rope.freq_base", GgufValue::F32(1e4))
        .meta("tokenizer.ggml.tokens", strings(["<unk>", "a", "b"]))
        .meta("tokenizer.ggml.scores", GgufValue::Array(vec![GgufValue::F32(0.0); 3]))
        .meta("flag", GgufValue::Bool(true))
        .meta("nested", GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::I64(-5)])]));
    let ramp: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
    for (name, ty) in [("f32", GgmlType::F32), ("f16", GgmlType::F16), ("q8", GgmlType::Q8_0), ("q41", GgmlType::Q4_1)]
    {
        w.tensor(name, &[32, 2], ty, &ramp);
    }
    w.to_bytes()
}

#[test]
fn the_small_file_is_valid() {
    let header = parse_header(&small_file()).unwrap();
    assert_eq!(header.tensors.len(), 4);
    assert_eq!(header.metadata.len(), 7);
}

#[test]
fn every_truncation_fails_cleanly() {
    let bytes = small_file();
    let header = parse_header(&bytes).unwrap();
    // The writer pads after the last tensor; cutting only padding leaves a valid file.
    let data_end =
        header.tensors.iter().map(|t| header.data_offset + (t.offset + t.byte_len().unwrap()) as usize).max().unwrap();
    assert!(data_end > header.data_offset && data_end <= bytes.len());
    for len in 0..bytes.len() {
        let result = parse_header(&bytes[..len]);
        // Cuts into the header fail in the reads, cuts into the data in the range checks.
        assert_eq!(result.is_ok(), len >= data_end, "truncation to {len} of {} bytes: {result:?}", bytes.len());
    }
}

#[test]
fn absurd_counts_fail_fast() {
    for (n_tensors, n_kv) in [(1u64 << 60, 0), (0, 1 << 60), (u64::MAX, u64::MAX), (1 << 40, 1 << 40)] {
        let mut bytes = prefix(n_tensors, n_kv);
        bytes.extend([0u8; 64]);
        let err = parse_header(&bytes).unwrap_err();
        assert!(err.contains("cannot fit"), "{n_tensors}/{n_kv}: {err}");
    }
    // One metadata pair: a string of length 2^62, then an array of 2^61 u64s.
    let mut bytes = prefix(0, 1);
    put_str(&mut bytes, "k");
    bytes.extend(8u32.to_le_bytes());
    bytes.extend((1u64 << 62).to_le_bytes());
    assert!(parse_header(&bytes).unwrap_err().contains("cannot fit"));
    let mut bytes = prefix(0, 1);
    put_str(&mut bytes, "k");
    bytes.extend(9u32.to_le_bytes());
    bytes.extend(10u32.to_le_bytes());
    bytes.extend((1u64 << 61).to_le_bytes());
    assert!(parse_header(&bytes).unwrap_err().contains("cannot fit"));
}

#[test]
fn deep_nesting_is_rejected() {
    // Arrays nested 100 deep, each holding one array: no stack overflow, a clear error.
    let mut bytes = prefix(0, 1);
    put_str(&mut bytes, "deep");
    bytes.extend(9u32.to_le_bytes());
    for _ in 0..100 {
        bytes.extend(9u32.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
    }
    bytes.extend([0u8; 64]);
    assert!(parse_header(&bytes).unwrap_err().contains("nested"));
}

#[test]
fn bad_values_are_rejected() {
    let one_pair = |ty: u32, payload: &[u8]| {
        let mut bytes = prefix(0, 1);
        put_str(&mut bytes, "k");
        bytes.extend(ty.to_le_bytes());
        bytes.extend(payload);
        bytes.resize(bytes.len().next_multiple_of(32), 0);
        parse_header(&bytes)
    };
    assert!(one_pair(7, &[2]).unwrap_err().contains("bool"));
    assert!(one_pair(13, &[0; 8]).unwrap_err().contains("unknown value type"));
    assert!(one_pair(8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFE]).unwrap_err().contains("UTF-8"));
    assert!(one_pair(9, &[77, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap_err().contains("element type"));
    assert!(one_pair(7, &[1]).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_header(&bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_prefix_never_panic(
        n_tensors in 0u64..4,
        n_kv in 0u64..4,
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = prefix(n_tensors, n_kv);
        bytes.extend(rest);
        let _ = parse_header(&bytes);
    }

    #[test]
    fn single_byte_corruptions_never_panic(at in any::<proptest::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = small_file();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(header) = parse_header(&bytes) {
            // Whatever still parses must still be self-consistent.
            prop_assert!(header.data_offset <= bytes.len());
            for t in &header.tensors {
                if let Some(len) = t.byte_len() {
                    let end = header.data_offset as u64 + t.offset + len;
                    prop_assert!(end <= bytes.len() as u64, "tensor {} ends at {end}", t.name);
                }
            }
        }
    }

    #[test]
    fn multi_byte_corruptions_never_panic(edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = small_file();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let _ = parse_header(&bytes);
    }
}
