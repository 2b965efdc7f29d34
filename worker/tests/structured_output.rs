//! Structured output over the real SmolLM2-135M vocabulary (49152 byte-level BPE tokens): bad
//! constraints are refused when compiled, and walks through the token masks driven by seeded
//! random logits always decode (with the model's own tokenizer) to text the constraint allows.
//! Random logits stand in for the model so that every walk explores arbitrary allowed tokens,
//! including ones a model would rarely pick.

#![expect(clippy::unwrap_used, reason = "tests")]

use std::collections::HashSet;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tessera_worker::EngineError;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions};
use tessera_worker::structured::{ConstraintCompiler, ConstraintSpec, TokenConstraint};
use tokenizers::Tokenizer;

struct Setup {
    compiler: ConstraintCompiler,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    vocab: usize,
}

/// One compiler for all tests (building it is the expensive part).
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let options = ResolveOptions { cache_dir: loader::fetch::default_cache_dir(), dummy_seed: 0 };
        let model = loader::resolve(&ModelSpec::parse("smollm2-135m-instruct").unwrap(), &options).unwrap();
        let (eos, vocab) = (model.config.eos_token_ids.clone(), model.config.vocab_size);
        assert_eq!(vocab, 49152);
        assert!(!eos.is_empty());
        let compiler = ConstraintCompiler::new(&model.text.tokenizer, &eos, vocab).unwrap();
        Setup { compiler, tokenizer: model.text.tokenizer, eos, vocab }
    })
}

fn compile(spec: ConstraintSpec) -> TokenConstraint {
    setup().compiler.compile(&spec).unwrap()
}

fn invalid(spec: ConstraintSpec) -> String {
    match setup().compiler.compile(&spec) {
        Err(EngineError::InvalidConstraint(msg)) => msg,
        Err(e) => panic!("{spec:?}: expected InvalidConstraint, got {e:?}"),
        Ok(_) => panic!("{spec:?}: compiled"),
    }
}

/// Index of a draw from softmax(`logits`) (temperature 1); `-inf` entries are never drawn.
fn sample(logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(max.is_finite(), "the mask left no token");
    let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if *w > 0.0 && u < *w {
            return i as u32;
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap() as u32
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Clone, Copy)]
enum Pick {
    Greedy,
    Sample,
}

/// Random logits in [0, 4), plus `bias` from step `bias_from` on.
struct Logits<'a> {
    bias: &'a [f32],
    bias_from: usize,
}

const PLAIN: Logits<'static> = Logits { bias: &[], bias_from: 0 };

/// Drives `c` with random logits for at most `max_steps` tokens and returns the decoded text, or
/// `None` if the constraint did not finish in time. Checks on the way that a finished constraint
/// leaves only EOS unmasked, and that EOS finishes it.
fn walk(c: &mut TokenConstraint, seed: u64, pick: Pick, logits: &Logits<'_>, max_steps: usize) -> Option<String> {
    let s = setup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tokens = Vec::new();
    for step in 0..max_steps {
        let bias = if step >= logits.bias_from { logits.bias } else { &[] };
        let mut l: Vec<f32> = (0..s.vocab).map(|i| rng.random::<f32>() * 4.0 + bias.get(i).unwrap_or(&0.0)).collect();
        c.mask_logits(&mut l).unwrap();
        if c.is_finished() {
            let finite: Vec<usize> = (0..s.vocab).filter(|&i| l[i].is_finite()).collect();
            let eos: Vec<usize> = s.eos.iter().map(|&t| t as usize).collect();
            assert_eq!(finite, eos, "a finished constraint allows only EOS");
            return Some(s.tokenizer.decode(&tokens, false).unwrap());
        }
        let t = match pick {
            Pick::Greedy => argmax(&l),
            Pick::Sample => sample(&l, &mut rng),
        };
        c.accept(t).unwrap();
        if s.eos.contains(&t) {
            assert!(c.is_finished(), "EOS accepted but the constraint is not finished");
            return Some(s.tokenizer.decode(&tokens, false).unwrap());
        }
        tokens.push(t);
    }
    None
}

#[test]
fn compiler_and_constraint_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<ConstraintCompiler>();
    send::<TokenConstraint>();
}

#[test]
fn invalid_constraints_are_refused() {
    let msg = invalid(ConstraintSpec::JsonSchema(r#"{"type": 12}"#.into()));
    assert!(msg.contains("type"), "{msg}");
    let msg = invalid(ConstraintSpec::JsonSchema(r#"{"type": "object", "properties": "#.into()));
    assert!(msg.contains("not valid JSON"), "{msg}");
    let msg = invalid(ConstraintSpec::JsonSchema(r#"{"type": "strnig"}"#.into()));
    assert!(msg.contains("strnig"), "{msg}");
    let msg = invalid(ConstraintSpec::JsonSchema("[1, 2]".into()));
    assert!(msg.contains("an array"), "{msg}");
    let msg = invalid(ConstraintSpec::JsonSchema(r#"{"x-guidance": {"lenient": true}}"#.into()));
    assert!(msg.contains("x-guidance"), "{msg}");
    let msg = invalid(ConstraintSpec::Regex("(ab".into()));
    assert!(msg.contains("unclosed group"), "{msg}");
    let msg = invalid(ConstraintSpec::Regex("[z-a]".into()));
    assert!(msg.contains("character class range"), "{msg}");
    // The valid neighbours compile.
    compile(ConstraintSpec::JsonSchema(r#"{"type": "integer"}"#.into()));
    compile(ConstraintSpec::JsonSchema("true".into()));
    compile(ConstraintSpec::Regex("(ab)+".into()));
}

#[test]
fn regex_walks_match() {
    for seed in 0..20 {
        let mut c = compile(ConstraintSpec::Regex("[0-9]{3}".into()));
        let text = walk(&mut c, seed, Pick::Greedy, &PLAIN, 10).unwrap();
        assert!(text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()), "seed {seed}: {text:?}");
    }
    let rx = regex::Regex::new(r"^(?:(cat|dog|bird)-[0-9]{2,4}(, )?){1,3}\.$").unwrap();
    let mut seen = HashSet::new();
    for seed in 0..40 {
        let mut c = compile(ConstraintSpec::Regex(r"((cat|dog|bird)-[0-9]{2,4}(, )?){1,3}\.".into()));
        let text = walk(&mut c, seed, Pick::Sample, &PLAIN, 60).unwrap();
        assert!(rx.is_match(&text), "seed {seed}: {text:?}");
        seen.insert(text);
    }
    assert!(seen.len() > 30, "random walks should differ: {seen:?}");
}

#[test]
fn disallowed_tokens_are_refused_and_leave_the_state_alone() {
    let s = setup();
    let id = |text: &str| {
        let ids = s.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 1, "{text:?} is one token");
        ids[0]
    };
    let mut c = compile(ConstraintSpec::Regex("[0-9]{2}".into()));
    let mut logits = vec![0.0; s.vocab];
    c.mask_logits(&mut logits).unwrap();
    assert_eq!(logits[id("a") as usize], f32::NEG_INFINITY);
    assert_eq!(logits[id("7") as usize], 0.0);
    assert!(s.eos.iter().all(|&e| logits[e as usize] == f32::NEG_INFINITY), "EOS before the output is complete");
    assert!(matches!(c.accept(id("a")), Err(EngineError::Constraint(_))));
    assert!(matches!(c.accept(s.eos[0]), Err(EngineError::Constraint(_))));
    assert!(matches!(c.accept(u32::try_from(s.vocab).unwrap()), Err(EngineError::TokenOutOfRange { .. })));
    c.accept(id("4")).unwrap();
    assert!(!c.is_finished());
    c.accept(id("2")).unwrap();
    assert!(c.is_finished(), "nothing may follow two digits");
    assert!(matches!(c.accept(id("1")), Err(EngineError::Constraint(_))));
    c.accept(s.eos[0]).unwrap();
    assert!(c.is_finished());
    // A mask of the wrong length is an error, not a partial mask.
    assert!(c.mask_logits(&mut vec![0.0; s.vocab - 1]).is_err());
}

#[test]
fn ids_beyond_the_tokenizer_are_always_masked() {
    let s = setup();
    let padded = ConstraintCompiler::new(&s.tokenizer, &s.eos, s.vocab + 64).unwrap();
    for spec in [ConstraintSpec::JsonObject, ConstraintSpec::Regex("(?s:.*)".into())] {
        let mut c = padded.compile(&spec).unwrap();
        let mut logits = vec![1.0; s.vocab + 64];
        c.mask_logits(&mut logits).unwrap();
        assert!(logits[s.vocab..].iter().all(|&l| l == f32::NEG_INFINITY), "{spec:?}");
        assert!(logits[..s.vocab].iter().any(|l| l.is_finite()), "{spec:?}");
    }
}

/// The acceptance test: 100 temperature-1 samples under a schema with nested objects, enums and
/// arrays all parse and validate.
#[test]
fn json_schema_samples_validate() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "integer"}},
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "role", "tags", "address"],
        "additionalProperties": false
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let spec = ConstraintSpec::JsonSchema(schema.to_string());
    let (mut outputs, mut roles, mut tag_counts) = (HashSet::new(), HashSet::new(), HashSet::new());
    for seed in 0..100 {
        let mut c = compile(spec.clone());
        let Some(text) = walk(&mut c, 1000 + seed, Pick::Sample, &PLAIN, 400) else {
            panic!("seed {seed}: not finished after 400 tokens");
        };
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        if let Err(e) = validator.validate(&value) {
            panic!("seed {seed}: {e}: {text}");
        }
        roles.insert(value["role"].as_str().unwrap().to_string());
        tag_counts.insert(value["tags"].as_array().unwrap().len());
        outputs.insert(text);
    }
    // The walks explore the schema rather than repeat one path.
    assert_eq!(outputs.len(), 100);
    assert_eq!(roles.len(), 3, "{roles:?}");
    assert!(tag_counts.len() >= 3, "{tag_counts:?}");
}

#[test]
fn json_object_samples_are_objects() {
    // Any JSON object is unbounded, so a purely random walk need not end: after 40 free steps a
    // bias pulls towards tokens made only of closing characters (`"`, `}`, `]`).
    let s = setup();
    let closing: Vec<f32> = (0..s.vocab as u32)
        .map(|id| {
            let text = s.tokenizer.decode(&[id], false).unwrap();
            if !text.is_empty() && text.chars().all(|c| matches!(c, '"' | '}' | ']')) { 60.0 } else { 0.0 }
        })
        .collect();
    let biased = Logits { bias: &closing, bias_from: 40 };
    let mut nonempty = HashSet::new();
    for seed in 0..30 {
        let mut c = compile(ConstraintSpec::JsonObject);
        let Some(text) = walk(&mut c, 2000 + seed, Pick::Sample, &biased, 400) else {
            panic!("seed {seed}: not finished after 400 tokens");
        };
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        let object = value.as_object().unwrap_or_else(|| panic!("seed {seed}: not an object: {text}"));
        if !object.is_empty() {
            nonempty.insert(text);
        }
    }
    assert!(nonempty.len() >= 10, "{nonempty:?}");
}
