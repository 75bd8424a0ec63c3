//! The main thread's stack, for a program that made one deep call it will not make again.

/// Gives the kernel back the main thread's stack pages more than 16 KiB below the caller's
/// frame. A stack keeps every page it ever touched: after a deep call at start-up (the `ustad`
/// binary's command-line parser, whose derived code takes ~90 KiB of stack), calling this from
/// `main` returns those pages instead of carrying them for the life of the process. Does
/// nothing when called on another thread.
pub fn release_unused() {
    let here = 0u8;
    let near = std::hint::black_box(&here) as *const u8 as usize;
    // Best effort: memory only.
    let _ = crate::sys::release_stack_below(near, 16 * 1024);
}

#[cfg(test)]
mod tests {
    #[test]
    fn off_the_main_thread_it_leaves_the_stack_alone() {
        // Each test runs on a thread of its own, whose stack is not the main thread's.
        let mut deep = [7u8; 64 * 1024];
        std::hint::black_box(&mut deep);
        super::release_unused();
        assert!(std::hint::black_box(&deep).iter().all(|&b| b == 7));
    }
}
