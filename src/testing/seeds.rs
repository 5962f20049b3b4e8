//! Seed handling for simulation tests: how many seeds to run, and replaying one.
//!
//! - `RAFTKV_SEED=n` runs only seed `n` (to replay a failure);
//! - `RAFTKV_SEEDS=k` runs `k` seeds instead of a test's default count.

/// Runs `test` once per seed; on failure prints the seed and how to replay it, then fails.
pub fn for_each_seed(name: &str, default_count: u64, test: impl Fn(u64)) {
    let seeds: Vec<u64> = match std::env::var("RAFTKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let count = std::env::var("RAFTKV_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default_count);
            (1..=count).collect()
        }
    };
    for seed in seeds {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(seed)));
        if let Err(panic) = outcome {
            eprintln!(
                "{name} FAILED with seed {seed}; replay with: RAFTKV_SEED={seed} cargo test {name}"
            );
            std::panic::resume_unwind(panic);
        }
    }
}
