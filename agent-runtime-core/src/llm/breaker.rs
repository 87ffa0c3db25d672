//! A circuit breaker for a model backend: after N consecutive failed calls it fails fast for a
//! cooldown, then lets one trial call through (half-open) whose outcome closes or reopens it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

/// Shared by every call of one backend.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Arc<Mutex<State>>,
}

/// Leave to make one call; report how it went. Dropped unreported (the call was abandoned), it
/// frees the half-open trial slot without counting anything.
#[derive(Debug)]
pub(crate) struct Permit {
    breaker: Breaker,
    trial: bool,
    reported: bool,
}

impl Breaker {
    /// A breaker opening after `threshold` consecutive failures (0: never) for `cooldown`.
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold,
            cooldown,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another call panicked mid-update of plain counters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit, or the fail-fast error while the circuit is open.
    pub(crate) fn acquire(&self) -> Result<Permit> {
        let mut state = self.lock();
        let mut trial = false;
        if let Some(until) = state.open_until {
            let now = Instant::now();
            if now < until {
                return Err(Error::Llm(format!(
                    "circuit open: backend failed {} times, retry after {}",
                    state.consecutive_failures,
                    super::secs(until - now)
                )));
            }
            if state.trial_in_flight {
                return Err(Error::Llm(format!(
                    "circuit open: backend failed {} times, a trial call is in flight",
                    state.consecutive_failures
                )));
            }
            state.trial_in_flight = true;
            trial = true;
        }
        Ok(Permit {
            breaker: self.clone(),
            trial,
            reported: false,
        })
    }
}

impl Permit {
    /// The backend answered: close the circuit.
    pub(crate) fn success(mut self) {
        self.reported = true;
        *self.breaker.lock() = State::default();
    }

    /// The backend is down (connect error, timeout, 5xx, 429): count it, open at the threshold.
    pub(crate) fn failure(mut self) {
        self.reported = true;
        let mut state = self.breaker.lock();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        state.trial_in_flight = false;
        if self.breaker.threshold > 0 && (self.trial || state.consecutive_failures >= self.breaker.threshold)
        {
            state.open_until = Some(Instant::now() + self.breaker.cooldown);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            self.breaker.lock().trial_in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_the_threshold_then_lets_one_trial_through() {
        let b = Breaker::new(2, Duration::from_millis(30));
        b.acquire().unwrap().failure();
        b.acquire().unwrap().failure();
        let err = b.acquire().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("circuit open: backend failed 2 times, retry after")
        );
        std::thread::sleep(Duration::from_millis(40));
        let trial = b.acquire().unwrap();
        assert!(b.acquire().is_err(), "only one trial while half-open");
        trial.failure();
        assert!(b.acquire().is_err(), "a failed trial reopens at once");
        std::thread::sleep(Duration::from_millis(40));
        b.acquire().unwrap().success();
        b.acquire().unwrap().failure();
        assert!(b.acquire().is_ok(), "a success reset the count");
    }

    #[test]
    fn an_abandoned_trial_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_millis(1));
        b.acquire().unwrap().failure();
        std::thread::sleep(Duration::from_millis(5));
        drop(b.acquire().unwrap());
        assert!(b.acquire().is_ok());
    }
}
