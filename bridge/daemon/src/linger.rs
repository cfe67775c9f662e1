//! How long an intake waits for more messages before the flush that makes a batch durable
//! (`storage.linger_ms`).
//!
//! Every batch the intake takes in costs a durable write (a transaction and a flush of the
//! bridge's store), and what follows it — the endpoints' sends, the node's flush, the
//! agents' reads — is batched by what the intake hands on. Under heavy load batches fill by
//! themselves while the previous flush runs. At moderate rates (around a message per
//! millisecond) each batch carries a single message, and every stage then pays its fixed
//! costs once per message: ten times the CPU a message costs under load. Waiting a
//! millisecond or two for the next messages lets one flush carry several.
//!
//! The wait is only worth it when more messages are coming. [`Linger`] waits when
//! - the batch is still small (under [`SMALL`] messages: larger ones batch well already),
//! - messages have been arriving faster than one per window (the mean gap, smoothed), and
//! - recent waits gathered something: a device that publishes one message at a time and
//!   waits for each acknowledgement brings nothing new while the intake waits, and would
//!   only be slowed down. After waits that gather nothing the intake stops waiting, and
//!   tries again every [`PROBE_EVERY`] batches.
//!
//! At low rates (gaps longer than the window) no message waits at all.

use std::time::{Duration, Instant};

/// Batches of this many messages or more are flushed at once.
pub const SMALL: usize = 8;
/// After waits that gathered nothing, one batch in this many waits again to find out whether
/// that has changed.
pub const PROBE_EVERY: u32 = 64;
/// Weight of the newest observation in the smoothed gap and yield.
const ALPHA: f64 = 0.25;

/// The intake's wait before a flush (see the module's description).
#[derive(Debug)]
pub struct Linger {
    window: Duration,
    /// The first message of the previous batch, and how many that batch held.
    last: Option<(Instant, usize)>,
    /// Smoothed time between messages, µs.
    gap_us: f64,
    /// Smoothed number of messages a wait gathered.
    gathered: f64,
    /// Batches since the last wait.
    idle: u32,
}

impl Linger {
    /// Waits of up to `window`; zero never waits.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: None,
            gap_us: f64::INFINITY,
            // Optimistic: waiting is tried as soon as the gaps are short.
            gathered: 1.0,
            idle: 0,
        }
    }

    /// A batch whose first message arrived at `now` holds `len` messages so far; returns how
    /// long to wait for more before flushing it, if at all.
    pub fn wait(&mut self, now: Instant, len: usize) -> Option<Duration> {
        if let Some((at, n)) = self.last {
            let gap = now.saturating_duration_since(at).as_micros() as f64 / n.max(1) as f64;
            self.gap_us = if self.gap_us.is_finite() {
                ALPHA * gap + (1.0 - ALPHA) * self.gap_us
            } else {
                gap
            };
        }
        self.last = Some((now, len));
        if self.window.is_zero() || len >= SMALL {
            return None;
        }
        if self.gap_us >= self.window.as_micros() as f64 {
            return None;
        }
        if self.gathered < 0.5 && self.idle + 1 < PROBE_EVERY {
            self.idle += 1;
            return None;
        }
        self.idle = 0;
        Some(self.window)
    }

    /// After a wait: the batch now holds `len` messages (`added` of them came during the
    /// wait).
    pub fn waited(&mut self, len: usize, added: usize) {
        self.gathered = ALPHA * added as f64 + (1.0 - ALPHA) * self.gathered;
        if let Some((_, n)) = &mut self.last {
            *n = len;
        }
    }
}

/// A batch for the intake: `first`, what is already waiting behind it, and what arrives
/// during the wait [`Linger`] decides on (ending early once the batch is no longer small);
/// at most `max` messages.
pub async fn batch<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    first: T,
    max: usize,
    linger: &mut Linger,
) -> Vec<T> {
    let arrived = Instant::now();
    let mut batch = vec![first];
    take_ready(rx, &mut batch, max);
    if let Some(window) = linger.wait(arrived, batch.len()) {
        let before = batch.len();
        let until = tokio::time::Instant::from_std(arrived) + window;
        while batch.len() < max.min(SMALL) {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                _ => break,
            }
        }
        // Whatever else is already waiting joins too.
        take_ready(rx, &mut batch, max);
        linger.waited(batch.len(), batch.len() - before);
    }
    batch
}

/// Moves what is already queued in `rx` into `batch`, up to `max` messages in all.
fn take_ready<T>(rx: &mut tokio::sync::mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Messages a millisecond apart: a 2 ms window waits once the gap is known; a zero
    /// window never does.
    #[test]
    fn waits_when_messages_come_faster_than_the_window() {
        let t0 = Instant::now();
        let mut l = Linger::new(ms(2));
        assert_eq!(l.wait(t0, 1), None, "no gap known yet");
        assert_eq!(l.wait(t0 + ms(1), 1), Some(ms(2)));
        l.waited(3, 2);
        assert_eq!(l.wait(t0 + ms(4), 1), Some(ms(2)));
        let mut never = Linger::new(Duration::ZERO);
        assert_eq!(never.wait(t0, 1), None);
        assert_eq!(never.wait(t0 + ms(1), 1), None);
    }

    /// A message every 10 ms: nothing would come within 2 ms, so nothing waits after the
    /// first gap is known.
    #[test]
    fn does_not_wait_at_low_rates() {
        let t0 = Instant::now();
        let mut l = Linger::new(ms(2));
        let _ = l.wait(t0, 1);
        l.waited(1, 0);
        for i in 1..20 {
            assert_eq!(l.wait(t0 + ms(10 * i), 1), None, "batch {i}");
        }
    }

    /// Batches that are already large are flushed at once.
    #[test]
    fn large_batches_do_not_wait() {
        let t0 = Instant::now();
        let mut l = Linger::new(ms(2));
        assert_eq!(l.wait(t0, SMALL), None);
        assert_eq!(l.wait(t0 + ms(1), SMALL + 1), None);
    }

    /// One device publishing message by message, each after its acknowledgement: waits
    /// gather nothing, so they stop, and one batch in `PROBE_EVERY` tries again.
    #[test]
    fn stops_waiting_when_waits_gather_nothing() {
        let t0 = Instant::now();
        let mut l = Linger::new(ms(2));
        let mut t = t0;
        let mut waits = 0;
        for _ in 0..(4 * PROBE_EVERY) {
            t += Duration::from_micros(500);
            if l.wait(t, 1).is_some() {
                waits += 1;
                l.waited(1, 0);
            }
        }
        assert!(
            (4..=10).contains(&waits),
            "{waits} waits in {} batches",
            4 * PROBE_EVERY
        );
        // Once waits gather again (other devices join), it keeps waiting.
        let mut again = 0;
        for _ in 0..(3 * PROBE_EVERY) {
            t += Duration::from_micros(500);
            if l.wait(t, 1).is_some() {
                again += 1;
                l.waited(3, 2);
            }
        }
        assert!(again > PROBE_EVERY, "{again} waits once they gathered");
    }
}
