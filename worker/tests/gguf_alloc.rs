//! Allocation bound of the GGUF header parser: on hostile input `parse_header` must never
//! reserve memory for what a header merely claims. A counting global allocator measures the peak
//! heap use of each parse; this file holds a single test so no other test allocates meanwhile.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::{header_prefix as prefix, put_str};
use tessera_worker::loader::gguf::parse_header;

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[expect(unsafe_code, reason = "a global allocator is an unsafe trait; this one only forwards to System")]
// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; the counters are side effects.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak extra heap used while parsing `bytes`.
fn peak_during_parse(bytes: &[u8]) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = parse_header(bytes);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    drop(result);
    peak
}

#[test]
fn hostile_headers_allocate_in_proportion_to_the_input() {
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut b = prefix(1 << 60, 0);
    b.extend([0u8; 4096]);
    cases.push(("2^60 tensors", b));
    let mut b = prefix(0, 1 << 60);
    b.extend([0u8; 4096]);
    cases.push(("2^60 metadata pairs", b));
    // As many tensors as could fit, all with empty names: the directory is real but small.
    let mut b = prefix(170, 0);
    b.extend([0u8; 4096]);
    cases.push(("170 empty tensors", b));
    for (what, elem, len) in [("u8", 0u32, 1u64 << 40), ("string", 8, 1 << 58), ("array", 9, 1 << 57)] {
        let mut b = prefix(0, 1);
        put_str(&mut b, "k");
        b.extend(9u32.to_le_bytes());
        b.extend(elem.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend([0u8; 4096]);
        cases.push((what, b));
    }
    // A real array of 64 Ki empty strings (8 bytes each in the file, one value each in memory).
    let mut b = prefix(0, 1);
    put_str(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 16).to_le_bytes());
    b.extend(vec![0u8; 8 << 16]);
    cases.push(("64 Ki empty strings", b));

    for (what, bytes) in &cases {
        let peak = peak_during_parse(bytes);
        // A value or directory entry is at most 64 bytes in memory for at least 1 byte in the
        // file; anything near the claimed counts would be terabytes.
        let bound = 64 * bytes.len() + (64 << 10);
        assert!(peak <= bound, "{what}: peak {peak} bytes for a {}-byte input (bound {bound})", bytes.len());
    }
    // The measurement is live: a parse that does build values shows up.
    assert!(peak_during_parse(&cases[cases.len() - 1].1) > 1 << 16);
}
