//! Choosing the next token from logits, per request.
//!
//! Order of operations (as vLLM): penalties on the raw logits — repetition (prompt and output
//! tokens: positive logits divided, negative multiplied), presence and frequency (output tokens
//! only) — then, for temperature 0, the arg-max (ties to the lower id, as `torch.argmax`);
//! otherwise divide by the temperature, keep the `top_k` best, drop tokens below
//! `min_p × p(best)`, keep the smallest set reaching `top_p`, and draw with a ChaCha RNG seeded
//! per request, so the same seed and logits give the same tokens on every machine whatever else
//! is in the batch. Log-probabilities reported are those of the raw model distribution
//! (`log_softmax` of the unpenalised logits).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::EngineError;

/// Per-request sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus probability mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the `k` most likely tokens, if set.
    pub top_k: Option<u32>,
    /// Drop tokens whose probability is below `min_p` times the best one's, in [0, 1).
    pub min_p: f32,
    /// Penalty on tokens seen in the prompt or output, ≥ 1 to discourage (1 = none).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated, in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of generated tokens, in [-2, 2].
    pub frequency_penalty: f32,
    /// RNG seed.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Rejects out-of-range values.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidSampling(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be positive".into());
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1), got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// A token choice a backend can make on its own device from a row's raw logits (a GPU then
/// returns token ids instead of logits). It exists only for samplers without penalties, whose
/// choice depends on nothing but the logits and, for a draw, one uniform number the sampler drew
/// from its own stream on the host, so the stream advances exactly as it does on the host path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DevicePick {
    /// The arg-max (ties to the lower id; NaN never wins).
    Greedy,
    /// A draw over the filtered distribution (see [`pick_with`]).
    Draw {
        /// `1 / temperature`, finite and positive.
        inv_temperature: f32,
        /// Keep the `k` most likely tokens, if set.
        top_k: Option<u32>,
        /// Nucleus mass in (0, 1].
        top_p: f32,
        /// Relative probability floor in [0, 1).
        min_p: f32,
        /// The uniform number in [0, 1) that picks the token.
        uniform: f32,
    },
}

impl DevicePick {
    /// The host's answer for one row of raw logits: what a device must reproduce.
    pub fn apply(&self, logits: &[f32]) -> u32 {
        match *self {
            DevicePick::Greedy => argmax(logits),
            DevicePick::Draw { inv_temperature, top_k, top_p, min_p, uniform } => {
                pick_with(logits, inv_temperature, top_k, top_p, min_p, uniform)
            }
        }
    }
}

/// One sampled token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// A sampler with its own RNG stream and the token counts its penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens of prompt and output (for the repetition penalty).
    seen: HashMap<u32, u32>,
    /// Occurrences in the output only (presence and frequency penalties).
    generated: HashMap<u32, u32>,
}

/// Index of the largest value; the first one on ties; NaN never wins (0 when nothing beats −∞).
///
/// Two passes the compiler vectorises — the largest value over 16 independent lanes, then the
/// first index holding it — instead of one compare-and-branch chain per value: a greedy pick over
/// a 49,152-token vocabulary is on every decode step's critical path.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in chunks.by_ref() {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            // `x > m` is false for NaN, so NaN never becomes the maximum.
            *m = if x > *m { x } else { *m };
        }
    }
    let best = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if best == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&x| x == best).map_or(0, |i| i as u32)
}

/// `log_softmax(logits)[token]` and the `n` most likely (token, log-probability) pairs.
pub fn logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().filter(|x| x.is_finite()).map(|&x| (x - max).exp()).sum::<f32>().ln();
    let lp = |x: f32| if x.is_finite() { x - log_z } else { f32::NEG_INFINITY };
    let n = n.min(logits.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if top.len() < n || top.last().is_some_and(|&(_, v)| x > v) {
                let at = top.partition_point(|&(_, v)| v >= x);
                top.insert(at, (i as u32, x));
                top.truncate(n);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: top.into_iter().map(|(t, x)| (t, lp(x))).collect(),
    }
}

impl Sampler {
    /// Validates `params`, seeds the RNG and counts the prompt for the repetition penalty.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self, EngineError> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        let mut seen = HashMap::new();
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                *seen.entry(t).or_insert(0) += 1;
            }
        }
        Ok(Sampler { params, rng, seen, generated: HashMap::new() })
    }

    /// Whether the choice depends on the raw logits alone (no penalties), so that a backend may
    /// make it on its device (see [`device_pick`](Self::device_pick)).
    pub fn picks_from_raw_logits(&self) -> bool {
        !self.params.has_penalties()
    }

    /// The choice to hand to the backend for the next token, drawing its uniform number now;
    /// `None` when it needs the penalised logits on the host (nothing is drawn then).
    pub fn device_pick(&mut self) -> Option<DevicePick> {
        self.picks_from_raw_logits().then(|| self.next_pick())
    }

    /// This pick's rule: the arg-max, or a draw with its uniform number taken from the stream now.
    fn next_pick(&mut self) -> DevicePick {
        // A temperature so small that 1/T overflows is greedy in the limit.
        if !self.draws_random() {
            return DevicePick::Greedy;
        }
        let p = &self.params;
        let (inv_temperature, top_k, top_p, min_p) = (1.0 / p.temperature, p.top_k, p.top_p, p.min_p);
        DevicePick::Draw { inv_temperature, top_k, top_p, min_p, uniform: self.rng.random() }
    }

    /// Records a token the sequence produced (for the penalties).
    pub fn observe(&mut self, token: u32) {
        if self.params.has_penalties() {
            *self.seen.entry(token).or_insert(0) += 1;
            *self.generated.entry(token).or_insert(0) += 1;
        }
    }

    /// Replays a token produced elsewhere with the same parameters (a migrated request): it is
    /// observed for the penalties and the random stream advances by the draw that picked it, so
    /// what follows is what this sampler would have picked had it produced the token itself.
    pub fn replay(&mut self, token: u32) {
        if self.draws_random() {
            let _: f32 = self.rng.random();
        }
        self.observe(token);
    }

    /// Whether picking a token draws one random number (every non-greedy pick does, exactly one).
    fn draws_random(&self) -> bool {
        self.params.temperature != 0.0 && (1.0 / self.params.temperature).is_finite()
    }

    fn penalised(&self, logits: &[f32]) -> Vec<f32> {
        let mut l = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
            }
        }
        for (&t, &count) in &self.generated {
            if let Some(x) = l.get_mut(t as usize) {
                *x -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
        l
    }

    /// Picks the next token (it is not recorded: call [`observe`](Self::observe) once accepted).
    /// A non-greedy pick draws exactly one number, whatever the logits hold.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let penalised;
        let logits = if self.params.has_penalties() {
            penalised = self.penalised(logits);
            &penalised[..]
        } else {
            logits
        };
        self.next_pick().apply(logits)
    }
}

/// A draw from `logits` (finite ones only; the arg-max when there are none) scaled by
/// `inv_temperature`, keeping the `top_k` best, then those with probability ≥ `min_p × p(best)`,
/// then the smallest set reaching `top_p`; `uniform` in [0, 1) picks the token whose cumulative
/// probability, best first, first exceeds it.
pub fn pick_with(
    logits: &[f32],
    inv_temperature: f32,
    top_k: Option<u32>,
    top_p: f32,
    min_p: f32,
    uniform: f32,
) -> u32 {
    // Scale relative to the best logit so large temperatures and logits stay finite.
    let best = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i as u32, (x - best) * inv_temperature))
        .collect();
    if cands.len() <= 1 {
        return cands.first().map_or_else(|| argmax(logits), |c| c.0);
    }
    cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = top_k {
        cands.truncate(k as usize);
    }
    let max = cands[0].1;
    let mut probs: Vec<f32> = cands.iter().map(|&(_, x)| (x - max).exp()).collect();
    if min_p > 0.0 {
        // probs[0] is the best (unnormalised 1.0): keep p ≥ min_p × p_best.
        let keep = probs.iter().take_while(|&&p| p >= min_p).count().max(1);
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if top_p < 1.0 {
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&p| {
                mass += p;
                mass >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let kept: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if uniform < acc {
            return cands[i].0;
        }
    }
    cands[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p, &[]).unwrap()
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[]), 0);
        // Longer than the lanes: the first of equal maxima, wherever the lanes put them.
        let mut long: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        long[40] = 9.0;
        long[90] = 9.0;
        long[3] = f32::NAN;
        assert_eq!(argmax(&long), 40);
        long[98] = f32::INFINITY;
        assert_eq!(argmax(&long), 98);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams { temperature: 1.0, top_k: Some(3), seed: 42, ..SamplingParams::greedy() };
        let mut a = sampler(params.clone());
        let mut b = sampler(params);
        let sa: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let sb: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(sa, sb);
        let mut top3: Vec<u32> = (0..100).collect();
        top3.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        assert!(sa.iter().all(|t| top3[..3].contains(t)));
        // More than one distinct token: it really samples.
        assert!(sa.iter().any(|&t| t != sa[0]));
    }

    #[test]
    fn device_picks_follow_the_host_stream() {
        let logits: Vec<f32> = (0..200).map(|i| (i as f32 * 0.71).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: Some(40),
            top_p: 0.9,
            min_p: 0.05,
            seed: 9,
            ..SamplingParams::greedy()
        };
        let (mut host, mut device) = (sampler(params.clone()), sampler(params));
        let on_host: Vec<u32> = (0..64).map(|_| host.sample(&logits)).collect();
        let on_device: Vec<u32> = (0..64)
            .map(|_| device.device_pick().map(|p| p.apply(&logits)).unwrap_or_else(|| panic!("no penalties: pickable")))
            .collect();
        assert_eq!(on_host, on_device);
        assert!(on_host.iter().any(|&t| t != on_host[0]), "it really samples");
        // Greedy needs no draw; penalties need the host.
        assert_eq!(sampler(SamplingParams::greedy()).device_pick(), Some(DevicePick::Greedy));
        let mut penalised = sampler(SamplingParams { presence_penalty: 0.5, ..SamplingParams::greedy() });
        assert_eq!(penalised.device_pick(), None);
        // Degenerate rows still draw one number, so the stream never depends on the logits.
        let mut a = sampler(SamplingParams { temperature: 1.0, seed: 4, ..SamplingParams::greedy() });
        let mut b = sampler(SamplingParams { temperature: 1.0, seed: 4, ..SamplingParams::greedy() });
        assert_eq!(a.sample(&[f32::NAN, f32::NEG_INFINITY]), 0);
        b.replay(0);
        assert_eq!(a.sample(&logits), b.sample(&logits));
    }

    #[test]
    fn tiny_top_p_and_large_min_p_are_greedy() {
        let logits = [0.1, 2.0, 0.3, 1.9];
        let mut s = sampler(SamplingParams { temperature: 0.7, top_p: 1e-6, seed: 1, ..SamplingParams::greedy() });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // p(3)/p(1) = e^-0.1/0.7 ≈ 0.87 < 0.9: min_p 0.9 leaves only token 1.
        let mut s = sampler(SamplingParams { temperature: 0.7, min_p: 0.9, seed: 1, ..SamplingParams::greedy() });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let mut s = sampler(SamplingParams { temperature: 0.7, min_p: 0.5, seed: 1, ..SamplingParams::greedy() });
        let picks: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 3) && picks.contains(&3));
    }

    #[test]
    fn penalties_change_greedy_choices() {
        let logits = [1.0, 2.0, 1.9, -1.0];
        // Repetition: token 1 is in the prompt, 2.0 / 1.2 < 1.9.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.2, ..SamplingParams::greedy() }, &[1]).unwrap();
        assert!(!s.picks_from_raw_logits());
        assert_eq!(s.sample(&logits), 2);
        // Presence: after generating token 1 once, 2.0 - 0.5 < 1.9.
        let mut s = sampler(SamplingParams { presence_penalty: 0.5, ..SamplingParams::greedy() });
        assert_eq!(s.sample(&logits), 1);
        s.observe(1);
        assert_eq!(s.sample(&logits), 2);
        // Frequency: grows with the count.
        let mut s = sampler(SamplingParams { frequency_penalty: 0.06, ..SamplingParams::greedy() });
        s.observe(1);
        assert_eq!(s.sample(&logits), 1); // 2.0 - 0.06 > 1.9
        s.observe(1);
        assert_eq!(s.sample(&logits), 2); // 2.0 - 0.12 < 1.9
        // Negative logits are multiplied, so they move further down.
        let s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }, &[3]).unwrap();
        assert_eq!(s.penalised(&logits)[3], -2.0);
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let logits = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY];
        let z = (0f32.exp() + 1f32.exp() + 2f32.exp()).ln();
        let lp = logprobs(&logits, 1, 2);
        assert!((lp.logprob - (1.0 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((lp.top[0].1 - (2.0 - z)).abs() < 1e-6);
        assert_eq!(logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn vanishing_temperature_is_greedy() {
        let logits = [0.0, 3.0, 1.0];
        let mut s = sampler(SamplingParams { temperature: 1e-38, seed: 3, ..SamplingParams::greedy() });
        assert!((0..10).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn invalid_params_rejected() {
        for p in [
            SamplingParams { temperature: -1.0, ..SamplingParams::greedy() },
            SamplingParams { top_p: 0.0, ..SamplingParams::greedy() },
            SamplingParams { top_p: 1.5, ..SamplingParams::greedy() },
            SamplingParams { top_k: Some(0), ..SamplingParams::greedy() },
            SamplingParams { min_p: 1.0, ..SamplingParams::greedy() },
            SamplingParams { repetition_penalty: 0.0, ..SamplingParams::greedy() },
            SamplingParams { presence_penalty: 2.5, ..SamplingParams::greedy() },
            SamplingParams { frequency_penalty: -3.0, ..SamplingParams::greedy() },
        ] {
            assert!(Sampler::new(p, &[]).is_err());
        }
    }
}
