//! The pause after a failed `accept`, for every listener in the workspace.
//!
//! An accept that fails because the process is out of file descriptors (`EMFILE`, `ENFILE`)
//! leaves the pending connection queued, so retrying at once fails again: a loop that just
//! continues spins a core (and, if it logs each error, floods the log) until a descriptor is
//! freed. Mature servers pause instead (Go's `net/http`: 5 ms doubling to 1 s). [`Pause`] does
//! the same, warns once per run of errors and says when accepting works again.

use std::future::Future;
use std::time::Duration;

/// The first pause after a failed accept.
pub const FIRST: Duration = Duration::from_millis(5);
/// The longest pause.
pub const LONGEST: Duration = Duration::from_secs(1);

/// Back-off state of one accept loop.
#[derive(Debug, Default)]
pub struct Pause {
    last: Option<Duration>,
    failed: u64,
}

impl Pause {
    /// The next connection of the listener `what`: calls `accept` until it succeeds, pausing
    /// after each failure. An accept loop selects on this and its stop (a stop during a pause
    /// ends the wait).
    pub async fn accept<T, F, Fut>(&mut self, what: &str, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(conn) => {
                    self.accepted(what);
                    return conn;
                }
                Err(e) => tokio::time::sleep(self.failed(what, &e)).await,
            }
        }
    }

    /// After a failed accept on the listener `what`: how long to wait before the next. Warns at
    /// the first failure of a run.
    fn failed(&mut self, what: &str, error: &std::io::Error) -> Duration {
        if self.failed == 0 {
            tracing::warn!(listener = what, %error, "accepting a connection failed; retrying after a pause that grows to 1 s while it keeps failing (out of file descriptors? see `ulimit -n`)");
        }
        self.failed += 1;
        let pause = self.last.map_or(FIRST, |p| (p * 2).min(LONGEST));
        self.last = Some(pause);
        pause
    }

    /// After a connection was accepted: ends a run of failures.
    fn accepted(&mut self, what: &str) {
        if self.failed > 0 {
            tracing::info!(
                listener = what,
                failed = self.failed,
                "accepting connections again"
            );
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause doubles from 5 ms, stays at 1 s, and starts over after an accepted connection.
    #[test]
    fn pauses_grow_to_a_second_and_start_over() {
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let mut p = Pause::default();
        let run: Vec<u64> = (0..10)
            .map(|_| p.failed("test", &e).as_millis() as u64)
            .collect();
        assert_eq!(run, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        p.accepted("test");
        assert_eq!(p.failed("test", &e), FIRST);
        assert_eq!(p.failed("test", &e), FIRST * 2);
    }

    /// Failed accepts (out of file descriptors) pause the loop, 5 ms doubling, instead of
    /// retrying at once; the connection behind them still comes out, and the next run of
    /// failures starts from 5 ms again.
    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_and_recover() {
        let mut calls = 0u32;
        // Fails five times, accepts on call 6, fails twice, accepts on call 9.
        let mut accept = || {
            calls += 1;
            let n = calls;
            async move {
                match n {
                    6 | 9 => Ok(n),
                    _ => Err(std::io::Error::from_raw_os_error(24)),
                }
            }
        };
        let mut p = Pause::default();
        let start = tokio::time::Instant::now();
        assert_eq!(p.accept("test", &mut accept).await, 6);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(5 + 10 + 20 + 40 + 80)
        );
        let start = tokio::time::Instant::now();
        assert_eq!(p.accept("test", &mut accept).await, 9);
        assert_eq!(start.elapsed(), Duration::from_millis(5 + 10));
        assert_eq!(calls, 9);
    }
}
