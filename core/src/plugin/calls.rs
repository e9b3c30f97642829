//! What a loaded plugin version did on this instance since it was loaded: calls,
//! failures and call durations, for the plugins page. The metrics carry the same for
//! Prometheus; this is what one `GET /plugins` can show without a query language.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// A loaded version's calls so far (each call decides one event, or a batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct LoadedCalls {
    pub calls: u64,
    /// Calls that failed: a trap, a timeout, a contract broken.
    pub errors: u64,
    /// Call durations, in microseconds (none before the first call).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// The counters behind [`LoadedCalls`], shared by the threads that call the version.
pub struct CallTally {
    calls: AtomicU64,
    errors: AtomicU64,
    durations_us: Mutex<Histogram<u64>>,
}

impl Default for CallTally {
    fn default() -> Self {
        // 1 µs to 10 min at two significant digits: about 20 KiB per loaded version.
        let histogram = Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds");
        Self { calls: AtomicU64::new(0), errors: AtomicU64::new(0), durations_us: Mutex::new(histogram) }
    }
}

impl CallTally {
    pub fn record(&self, took: Duration, ok: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = (took.as_micros() as u64).max(1);
        self.durations_us.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(us);
    }

    pub fn snapshot(&self) -> LoadedCalls {
        let h = self.durations_us.lock().unwrap_or_else(|p| p.into_inner());
        let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        LoadedCalls {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            p50_us: q(0.5),
            p99_us: q(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_errors_and_quantiles_add_up() {
        let t = CallTally::default();
        assert_eq!(t.snapshot(), LoadedCalls::default(), "nothing before the first call");
        for i in 1..=100u64 {
            t.record(Duration::from_micros(i * 10), i % 25 != 0);
        }
        let s = t.snapshot();
        assert_eq!((s.calls, s.errors), (100, 4));
        let (p50, p99) = (s.p50_us.unwrap(), s.p99_us.unwrap());
        assert!((495..=505).contains(&p50), "{p50}");
        assert!((985..=995).contains(&p99), "{p99}");
    }
}
