//! Primary <-> worker message benchmarks (in progress).

fn main() {}
