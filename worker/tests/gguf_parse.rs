//! GGUF reader round trips: files written by the test writer parse back to the same metadata and
//! tensor directory, tensors dequantise to within quantisation error, and the file-level API
//! reports typed errors.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

mod support;

use std::path::PathBuf;

use support::{GgufWriter, quantize, s, strings, tolerance};
use tessera_worker::LoadError;
use tessera_worker::loader::gguf::{GgmlType, GgufFile, GgufValue, parse_header};

const QUANT_TYPES: [GgmlType; 6] =
    [GgmlType::F32, GgmlType::F16, GgmlType::Bf16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

/// A deterministic pseudo-random sequence in roughly [-scale, scale] (xorshift; no RNG needed).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn every_value_type() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-100)),
        ("t.u16", GgufValue::U16(60_000)),
        ("t.i16", GgufValue::I16(-30_000)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-2_000_000_000)),
        ("t.f32", GgufValue::F32(1e-5)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.bool2", GgufValue::Bool(false)),
        ("t.string", s("héllo ▁ 🙂\n")),
        ("t.empty_string", s("")),
        ("t.u64", GgufValue::U64(u64::MAX)),
        ("t.i64", GgufValue::I64(i64::MIN)),
        ("t.f64", GgufValue::F64(std::f64::consts::PI)),
        ("t.strings", strings(["a", "", "▁b c"])),
        ("t.ints", GgufValue::Array(vec![GgufValue::I32(-1), GgufValue::I32(7)])),
        ("t.empty", GgufValue::Array(vec![])),
        (
            "t.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::F32(0.5)]),
                GgufValue::Array(vec![GgufValue::F32(-2.0), GgufValue::F32(3.0)]),
            ]),
        ),
    ]
}

#[test]
fn every_value_type_round_trips_in_v2_and_v3() {
    for version in [2, 3] {
        let mut w = GgufWriter::new();
        w.version(version);
        for (k, v) in every_value_type() {
            w.meta(k, v);
        }
        let header = parse_header(&w.to_bytes()).unwrap();
        assert_eq!(header.version, version);
        assert!(header.tensors.is_empty());
        assert_eq!(header.metadata.len(), every_value_type().len());
        for (k, v) in every_value_type() {
            assert_eq!(header.metadata.get(k), Some(&v), "key {k}");
        }
    }
}

#[test]
fn value_accessors() {
    assert_eq!(GgufValue::U8(3).as_u64(), Some(3));
    assert_eq!(GgufValue::I16(7).as_u64(), Some(7));
    assert_eq!(GgufValue::I64(-1).as_u64(), None);
    assert_eq!(GgufValue::U64(u64::MAX).as_u64(), Some(u64::MAX));
    assert_eq!(GgufValue::F32(1.0).as_u64(), None);
    assert_eq!(GgufValue::Bool(true).as_u64(), None);
    assert_eq!(GgufValue::F64(0.5).as_f32(), Some(0.5));
    assert_eq!(GgufValue::F32(0.25).as_f64(), Some(0.25));
    assert_eq!(GgufValue::U32(1).as_f32(), None);
    assert_eq!(s("x").as_str(), Some("x"));
    assert_eq!(GgufValue::U8(1).as_str(), None);
    assert_eq!(strings(["a"]).as_array().map(<[_]>::len), Some(1));
    assert_eq!(GgufValue::Bool(false).as_bool(), Some(false));
}

#[test]
fn ggml_type_table() {
    for (id, ty, block, bytes, name) in [
        (0, GgmlType::F32, 1, 4, "F32"),
        (1, GgmlType::F16, 1, 2, "F16"),
        (30, GgmlType::Bf16, 1, 2, "BF16"),
        (2, GgmlType::Q4_0, 32, 18, "Q4_0"),
        (3, GgmlType::Q4_1, 32, 20, "Q4_1"),
        (8, GgmlType::Q8_0, 32, 34, "Q8_0"),
    ] {
        assert_eq!(GgmlType::from_id(id), ty);
        assert_eq!(ty.id(), id);
        assert_eq!((ty.block_size(), ty.block_bytes(), ty.name()), (Some(block), Some(bytes), name));
    }
    assert_eq!(GgmlType::from_id(12), GgmlType::Other(12));
    assert_eq!(GgmlType::Other(12).name(), "Q4_K");
    assert_eq!(GgmlType::Other(4).name(), "unknown");
    assert_eq!(GgmlType::Other(20).name(), "IQ4_NL");
    assert_eq!(GgmlType::Other(39).name(), "MXFP4");
    assert_eq!(GgmlType::Other(31).name(), "unknown");
    assert_eq!(GgmlType::Other(12).to_string(), "Q4_K (ggml type 12)");
    assert_eq!(GgmlType::Other(9999).name(), "unknown");
    assert_eq!(GgmlType::Other(12).block_size(), None);
    assert_eq!(GgmlType::Q4_0.byte_len(64), Some(36));
    assert_eq!(GgmlType::Q4_0.byte_len(33), None);
}

/// Writes `bytes` to a fresh file under the test target's scratch directory.
fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf_parse-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn tensors_of_every_type_round_trip_within_quantisation_error() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", s("llama"));
    let mut originals = Vec::new();
    for (i, ty) in QUANT_TYPES.into_iter().enumerate() {
        // dims [64, 3]: three rows of 64, row-major shape [3, 64].
        let v = values(64 * 3, i as u64 + 1, 2.0 + i as f32);
        w.tensor(&format!("t.{}", ty.name()), &[64, 3], ty, &v);
        originals.push((ty, v));
    }
    // A 1-D tensor and a 3-D one, to check the dims reversal.
    w.tensor("vec", &[5], GgmlType::F32, &[1.0, 2.0, 3.0, 4.0, 5.0]);
    w.tensor("cube", &[32, 2, 3], GgmlType::Q8_0, &values(192, 99, 1.0));
    let path = temp_file("types.gguf", &w.to_bytes());
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.path(), path);
    assert_eq!(file.header().tensors.len(), 8);
    assert_eq!(file.header().data_offset % 32, 0);
    assert_eq!(file.meta_str("general.architecture"), Some("llama"));

    for (ty, original) in &originals {
        let name = format!("t.{}", ty.name());
        let info = file.tensor_info(&name).unwrap();
        assert_eq!((info.ggml_type, info.dims.as_slice(), info.n_elements()), (*ty, &[64u64, 3][..], 192));
        assert_eq!(info.offset % 32, 0);
        assert_eq!(file.tensor_bytes(info), quantize(*ty, original).as_slice());
        let (shape, got) = file.tensor_f32(&name).unwrap();
        assert_eq!(shape, vec![3, 64]);
        let tol = tolerance(*ty, original);
        for (i, ((g, o), t)) in got.iter().zip(original).zip(&tol).enumerate() {
            assert!((g - o).abs() <= *t, "{name}[{i}]: got {g}, wrote {o}, tolerance {t}");
        }
        if *ty != GgmlType::F32 {
            assert!(got.iter().zip(original).any(|(g, o)| g != o), "{name} should be lossy");
        }
    }
    assert_eq!(file.tensor_f32("vec").unwrap(), (vec![5], vec![1.0, 2.0, 3.0, 4.0, 5.0]));
    assert_eq!(file.tensor_info("cube").unwrap().shape(), vec![3, 2, 32]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.meta("general.alignment", GgufValue::U32(256));
    w.tensor("a", &[3], GgmlType::F32, &[1.0, 2.0, 3.0]);
    w.tensor("b", &[2], GgmlType::F16, &[4.0, 5.0]);
    let bytes = w.to_bytes();
    let header = parse_header(&bytes).unwrap();
    assert_eq!(header.data_offset % 256, 0);
    assert_eq!(header.tensors[1].offset, 256);

    // An alignment that is not a power of two is rejected.
    let mut w = GgufWriter::new();
    w.meta("general.alignment", GgufValue::U32(48));
    assert!(parse_header(&w.to_bytes()).unwrap_err().contains("power of two"));

    // So is a tensor offset that is not a multiple of the alignment: move tensor "b" by 4 bytes
    // (its offset is the last field of the directory, just before the padding).
    let mut w = GgufWriter::new();
    w.tensor("a", &[8], GgmlType::F32, &[0.0; 8]).tensor("b", &[1], GgmlType::F32, &[1.0]);
    let mut bytes = w.to_bytes();
    let header = parse_header(&bytes).unwrap();
    let field = bytes.windows(8).position(|win| win == 32u64.to_le_bytes()).unwrap();
    assert!(field < header.data_offset);
    bytes[field] = 36;
    assert!(parse_header(&bytes).unwrap_err().contains("not a multiple of 32"));
}

#[test]
fn inconsistent_tensors_are_rejected() {
    // Q8_0 rows must be whole blocks.
    let mut w = GgufWriter::new();
    w.tensor_raw("bad_row", &[31, 2], GgmlType::Q8_0, vec![0; 68]);
    assert!(parse_header(&w.to_bytes()).unwrap_err().contains("block size"));

    // Data running past the end of the file.
    let mut w = GgufWriter::new();
    w.tensor_raw("short", &[64], GgmlType::F32, vec![0; 128]);
    let err = parse_header(&w.to_bytes()).unwrap_err();
    assert!(err.contains("past the end"), "{err}");

    // Element counts that overflow.
    let mut w = GgufWriter::new();
    w.tensor_raw("huge", &[u64::MAX / 2, 4], GgmlType::F32, vec![]);
    assert!(parse_header(&w.to_bytes()).unwrap_err().contains("overflows"));

    // Duplicate names and keys.
    let mut w = GgufWriter::new();
    w.tensor("x", &[1], GgmlType::F32, &[0.0]).tensor("x", &[1], GgmlType::F32, &[0.0]);
    assert!(parse_header(&w.to_bytes()).unwrap_err().contains("duplicate tensor"));
    let mut w = GgufWriter::new();
    w.meta("k", GgufValue::U8(1)).meta("k", GgufValue::U8(2));
    assert!(parse_header(&w.to_bytes()).unwrap_err().contains("duplicate metadata"));

    // More than four dims.
    let mut w = GgufWriter::new();
    w.tensor("five", &[1, 1, 1, 1, 1], GgmlType::F32, &[0.0]);
    assert!(parse_header(&w.to_bytes()).unwrap_err().contains("dims"));

    // Versions other than 2 and 3.
    for (version, needle) in [(1, "version 1"), (0x0300_0000, "big-endian"), (4, "version 4")] {
        let mut w = GgufWriter::new();
        w.version(version);
        let err = parse_header(&w.to_bytes()).unwrap_err();
        assert!(err.contains(needle), "version {version}: {err}");
    }
}

#[test]
fn other_types_are_listed_but_not_dequantised() {
    let mut w = GgufWriter::new();
    // 256 elements of Q4_K are one 144-byte super-block.
    w.tensor_raw("k_quant", &[256], GgmlType::Other(12), vec![0; 144]);
    let path = temp_file("other.gguf", &w.to_bytes());
    let file = GgufFile::open(&path).unwrap();
    let info = file.tensor_info("k_quant").unwrap();
    assert_eq!(info.ggml_type, GgmlType::Other(12));
    assert!(file.tensor_bytes(info).is_empty());
    match file.tensor_f32("k_quant") {
        Err(LoadError::UnsupportedDtype { tensor, dtype }) => {
            assert_eq!(tensor, "k_quant");
            assert!(dtype.contains("Q4_K"), "{dtype}");
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    assert!(matches!(file.tensor_f32("nope"), Err(LoadError::MissingTensor(n)) if n == "nope"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn metadata_helpers() {
    let mut w = GgufWriter::new();
    w.meta("n", GgufValue::U32(576)).meta("neg", GgufValue::I32(-1)).meta("eps", GgufValue::F32(1e-5));
    w.meta("name", s("smol"));
    let path = temp_file("meta.gguf", &w.to_bytes());
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.meta_u64("n"), Some(576));
    assert_eq!(file.meta_u64("neg"), None);
    assert_eq!(file.meta_u64("missing"), None);
    assert_eq!(file.meta_f32("eps"), Some(1e-5));
    assert_eq!(file.meta_f32("n"), None);
    assert_eq!(file.meta_str("name"), Some("smol"));
    assert_eq!(file.meta_str("n"), None);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn open_reports_io_and_malformed_errors() {
    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf_parse-does-not-exist.gguf");
    match GgufFile::open(&missing) {
        Err(LoadError::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    for (name, bytes) in [("empty.gguf", &b""[..]), ("not.gguf", &b"GGML\x03\0\0\0"[..])] {
        let path = temp_file(name, bytes);
        match GgufFile::open(&path) {
            Err(LoadError::Malformed { path: p, format: "GGUF", reason }) => {
                assert_eq!(p, path);
                assert!(!reason.is_empty());
            }
            other => panic!("{name}: expected Malformed, got {other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
    }
}
