//! Fuzz-style tests of the safetensors validation: random bytes, every truncation and random
//! corruptions of a real checkpoint's header must give `Err` or `Ok`, never a panic; a truncated
//! file must never validate.

#![expect(clippy::expect_used, reason = "test helpers: a failed expect is a failed test")]

use std::path::Path;

use proptest::prelude::*;
use tessera_worker::loader::safetensors_weights::validate_safetensors;

fn stories() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/stories260K/model.safetensors");
    std::fs::read(path).expect("stories260K checkpoint")
}

#[test]
fn the_real_file_validates() {
    let names = validate_safetensors(&stories()).expect("valid");
    assert!(names.iter().any(|n| n == "model.embed_tokens.weight"));
}

#[test]
fn every_truncation_of_the_header_and_a_sample_of_the_data_fails() {
    let bytes = stories();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize + 8;
    let cuts = (0..header_len + 64).chain((header_len..bytes.len()).step_by(4099));
    for cut in cuts.filter(|&c| c < bytes.len()) {
        assert!(validate_safetensors(&bytes[..cut]).is_err(), "truncation at {cut} validated");
    }
}

#[test]
fn hostile_header_lengths_fail_fast() {
    for len in [u64::MAX, u64::MAX / 2, 1 << 40, 100] {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(validate_safetensors(&bytes).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = validate_safetensors(&bytes);
    }

    #[test]
    fn header_corruptions_never_panic(edits in proptest::collection::vec((0usize..2048, any::<u8>()), 1..8)) {
        let mut bytes = stories();
        for (at, value) in edits {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        let _ = validate_safetensors(&bytes);
    }

    #[test]
    fn random_json_headers_never_panic(json in "\\{(\"[a-z.]{1,12}\":\\{\"dtype\":\"(F32|BF16|I8|F16|X)\",\"shape\":\\[[0-9]{1,4}(,[0-9]{1,4}){0,2}\\],\"data_offsets\":\\[[0-9]{1,6},[0-9]{1,6}\\]\\},?){0,3}\\}", data_len in 0usize..4096) {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        let _ = validate_safetensors(&bytes);
    }
}
