//! Linear-probing helpers shared by the two open-addressed tables of a
//! shard, the value cache (`cache`) and the partition index (`index`): the
//! prefetch hint their writers issue ahead of a probe, and backward-shift
//! deletion, which keeps probe runs free of tombstones.

/// Asks the CPU to start loading `at`'s cache line (a hint: never faults,
/// never changes what the program computes).
#[inline(always)]
pub(crate) fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it does not dereference in the Rust
    // sense and cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Cache lines `prefetch_bytes` asks for at most: enough for a small
/// record whole; of a larger one, its start and its end.
const PREFETCH_LINES_MAX: usize = 4;

/// Starts loading the cache lines of `bytes`: all of them for a small
/// record, else the first and the last few. A version set is an rkyv
/// archive, whose root sits at its end, so a reader's first load is the
/// record's last line and its second the siblings before it.
#[inline(always)]
pub(crate) fn prefetch_bytes(bytes: &[u8]) {
    const LINE_BYTES: usize = 64;
    let start = bytes.as_ptr();
    prefetch(start);
    let lines = (bytes.len() + (start as usize % LINE_BYTES)).div_ceil(LINE_BYTES);
    if lines <= PREFETCH_LINES_MAX {
        for line in 1..lines {
            prefetch(start.wrapping_add(line * LINE_BYTES));
        }
    } else {
        let end = start.wrapping_add(bytes.len() - 1);
        for line in 0..PREFETCH_LINES_MAX - 1 {
            prefetch(end.wrapping_sub(line * LINE_BYTES));
        }
    }
}

/// After the slot `hole` of a power-of-two table was emptied: moves back
/// the entries after it whose probe run passes through the hole, so that
/// every probe still finds them (a probe stops at the first free slot).
/// `home_of` gives an entry's home slot.
pub(crate) fn shift_back<S>(
    slots: &mut [S],
    mut hole: usize,
    is_free: impl Fn(&S) -> bool,
    home_of: impl Fn(&S) -> usize,
) {
    let mask = slots.len() - 1;
    let mut next = (hole + 1) & mask;
    while !is_free(&slots[next]) {
        let home = home_of(&slots[next]);
        // Moving back is allowed when the hole is no earlier in the probe
        // sequence than the entry's home.
        if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(hole) & mask) {
            slots.swap(hole, next);
            hole = next;
        }
        next = (next + 1) & mask;
    }
}
