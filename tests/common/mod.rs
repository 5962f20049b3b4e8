//! Helpers shared by the tests that drive real, threaded nodes.

use std::time::{Duration, Instant};

/// Polls `cond` every 5 ms for up to 10 s; true once it holds.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
