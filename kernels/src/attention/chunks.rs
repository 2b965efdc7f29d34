//! A query's visible positions cut into fixed chunks of [`CHUNK`], each chunk attended to alone,
//! and the chunks' results merged in order.
//!
//! A chunk's result ("partial") holds, per query head of its group: the unnormalised weighted
//! sum of values `o = Σ_i e^(s_i − m) v_i`, the chunk's largest score `m`, and
//! `l = Σ_i e^(s_i − m)` — laid out as `group × head_dim` outputs, then `group` maxima, then
//! `group` sums ([`partial_len`]). [`fold`] merges the next chunk into a running result, in chunk
//! order; [`finish`] divides by `l`. The cut and the order depend on the query's positions alone,
//! so one task running all of a query's chunks and several threads running one chunk each give
//! every output the same bits, whatever the batch or the pool.

use super::AttentionQuery;

/// Visible positions per chunk (a multiple of the SIMD kernels' 8-position score blocks). A
/// context of up to 256 positions is one chunk, attended to in one piece as before chunking;
/// a lone sequence at a 2,048-position context has 8 chunks per KV head, work for every thread.
/// A merge costs two `exp` and `2 · head_dim` multiply-adds per head, against the chunk's
/// `2 · CHUNK · head_dim`. Measured on the test host (SmolLM2's cache, bf16, read cold, per
/// layer): batch 1 at context 2,048 took 134–175 µs with one task per KV head and 90–134 µs in
/// chunk tasks; batch 8, and context 160, unchanged within the host's noise.
pub(super) const CHUNK: usize = 256;

/// Chunks of `qr`'s visible positions.
pub(super) fn count(qr: &AttentionQuery) -> usize {
    (qr.context_len - qr.window_start).div_ceil(CHUNK)
}

/// The query that sees only chunk `c` of `qr`'s positions.
pub(super) fn query<'a>(qr: &AttentionQuery<'a>, c: usize) -> AttentionQuery<'a> {
    let window_start = qr.window_start + c * CHUNK;
    AttentionQuery {
        block_table: qr.block_table,
        context_len: (window_start + CHUNK).min(qr.context_len),
        window_start,
    }
}

/// Floats in one chunk's result for a group of `group` heads of `head_dim`.
pub(super) fn partial_len(group: usize, head_dim: usize) -> usize {
    group * head_dim + 2 * group
}

/// Folds chunk `c`'s result `part` into the running result `acc`, chunks in order: the first is
/// copied, the others merged.
pub(super) fn fold(acc: &mut Vec<f32>, part: &[f32], c: usize, group: usize, head_dim: usize) {
    if c == 0 {
        acc.clear();
        acc.extend_from_slice(part);
    } else {
        merge(acc, part, group, head_dim);
    }
}

/// Merges the next chunk's result `part` into the running one `acc`: per head, both are
/// rescaled to the larger maximum. A NaN anywhere reaches the head's output.
fn merge(acc: &mut [f32], part: &[f32], group: usize, head_dim: usize) {
    let outputs = group * head_dim;
    let (acc_o, acc_stats) = acc.split_at_mut(outputs);
    let (part_o, part_stats) = part.split_at(outputs);
    let (acc_max, acc_sum) = acc_stats.split_at_mut(group);
    let (part_max, part_sum) = part_stats.split_at(group);
    for h in 0..group {
        let max = if part_max[h] > acc_max[h] { part_max[h] } else { acc_max[h] };
        let (a, b) = ((acc_max[h] - max).exp(), (part_max[h] - max).exp());
        acc_max[h] = max;
        acc_sum[h] = acc_sum[h] * a + part_sum[h] * b;
        let heads = h * head_dim..(h + 1) * head_dim;
        for (o, &p) in acc_o[heads.clone()].iter_mut().zip(&part_o[heads]) {
            *o = *o * a + p * b;
        }
    }
}

/// The group's outputs from the merged result: each head's `o / l`.
pub(super) fn finish(acc: &[f32], group: usize, head_dim: usize, out: &mut [f32]) {
    let (o, stats) = acc.split_at(group * head_dim);
    let sums = &stats[group..];
    for ((out_h, o_h), &sum) in out.chunks_exact_mut(head_dim).zip(o.chunks_exact(head_dim)).zip(sums) {
        for (y, &v) in out_h.iter_mut().zip(o_h) {
            *y = v / sum;
        }
    }
}
