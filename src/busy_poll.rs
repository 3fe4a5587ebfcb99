//! Bounded busy polling of the async runtime.
//!
//! On a virtual machine, waking a thread that sleeps in `epoll_wait` on another
//! vCPU costs an inter-processor interrupt and a VM exit (tens of microseconds).
//! While requests are in flight, or just after a reply, a [`BusyPoll`] keeps the
//! runtime's worker awake for a bounded window: its task yields in a loop, and a
//! worker whose only runnable task has yielded polls its driver with a zero
//! timeout (`epoll_wait(.., 0)`), so a socket or io_uring completion that
//! arrives meanwhile is picked up without a wake-up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Longest busy-poll window accepted.
pub const WINDOW_MAX: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct BusyPoll {
    base: Instant,
    window_ns: u64,
    /// Poll until this time (ns since `base`).
    until_ns: AtomicU64,
    wake: Notify,
    /// Times the polling task has yielded (for tests and diagnosis).
    rounds: AtomicU64,
}

impl BusyPoll {
    /// A poller with the given window (at most [`WINDOW_MAX`]);
    /// `Duration::ZERO` disables it.
    pub fn new(window: Duration) -> Arc<BusyPoll> {
        Arc::new(BusyPoll {
            base: Instant::now(),
            window_ns: window.min(WINDOW_MAX).as_nanos() as u64,
            until_ns: AtomicU64::new(0),
            wake: Notify::new(),
            rounds: AtomicU64::new(0),
        })
    }

    pub fn enabled(&self) -> bool {
        self.window_ns > 0
    }

    /// How many times the polling task has yielded so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Activity: keep polling for one window from now.
    pub fn touch(&self) {
        if !self.enabled() {
            return;
        }
        let now = self.now_ns();
        let before = self
            .until_ns
            .fetch_max(now + self.window_ns, Ordering::Relaxed);
        if before <= now {
            // The poller may be asleep (or about to be); a stored permit
            // makes a late wake-up harmless.
            self.wake.notify_one();
        }
    }

    /// Start [`BusyPoll::run`] on the current runtime; dropping the guard
    /// stops it.
    pub fn spawn(self: &Arc<Self>) -> PollTask {
        PollTask(tokio::spawn(self.clone().run()))
    }

    /// The polling task: run it on the runtime whose wake-ups it should save.
    pub async fn run(self: Arc<Self>) {
        if !self.enabled() {
            return;
        }
        loop {
            self.wake.notified().await;
            while self.now_ns() < self.until_ns.load(Ordering::Relaxed) {
                self.rounds.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    }
}

/// The running poller; aborted when dropped.
#[derive(Debug)]
pub struct PollTask(tokio::task::JoinHandle<()>);

impl Drop for PollTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn disabled_poller_ends_at_once_and_never_spins() {
        let p = BusyPoll::new(Duration::ZERO);
        assert!(!p.enabled());
        p.touch();
        runtime().block_on(p.clone().run());
        assert_eq!(p.rounds(), 0);
    }

    #[test]
    fn window_is_capped() {
        let p = BusyPoll::new(Duration::from_secs(5));
        assert_eq!(p.window_ns, WINDOW_MAX.as_nanos() as u64);
    }

    #[test]
    fn polls_after_a_touch_then_goes_idle() {
        let rt = runtime();
        rt.block_on(async {
            let p = BusyPoll::new(Duration::from_millis(20));
            let task = tokio::spawn(p.clone().run());
            // Idle until touched.
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(p.rounds(), 0, "spun without activity");
            let t0 = Instant::now();
            p.touch();
            // Timers still fire while it spins (the driver is polled).
            tokio::time::sleep(Duration::from_millis(5)).await;
            let during = p.rounds();
            assert!(during > 0, "no polling after a touch");
            // A touch within the window extends it.
            p.touch();
            tokio::time::sleep(Duration::from_millis(60)).await;
            let after = p.rounds();
            assert!(after > during);
            tokio::time::sleep(Duration::from_millis(40)).await;
            assert_eq!(p.rounds(), after, "still polling after the window");
            assert!(t0.elapsed() >= Duration::from_millis(25));
            // And it wakes again on the next touch.
            p.touch();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(p.rounds() > after);
            task.abort();
        });
    }
}
