//! Service-manager notifications (`sd_notify(3)`): `READY=1` once the first sample is published
//! and `WATCHDOG=1` from the sampling loop, so systemd restarts an agent whose sampling has
//! stalled, not just one whose process died. Without `NOTIFY_SOCKET` (not under systemd, or
//! `Type=simple`) every call does nothing.
//!
//! This module only talks to the service manager; it never decides when the agent is ready or
//! healthy: the sampling loop says so by calling [`Notifier::sampled`].

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// What the service manager asked for, read once from the environment at start-up.
#[derive(Debug)]
pub struct Notifier {
    socket: bool,
    /// Ping at least this often: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
    ready_sent: bool,
    failed: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; `sample_interval` is only used to
    /// warn when the watchdog is too short for the sampling loop to keep it fed.
    pub fn from_env(sample_interval: Duration) -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog = sd_notify::watchdog_enabled().filter(|_| socket);
        if let Some(w) = watchdog {
            if sample_interval >= w / 2 {
                tracing::warn!(
                    watchdog_s = w.as_secs_f64(),
                    sample_interval_s = sample_interval.as_secs_f64(),
                    "the service watchdog is shorter than two sample intervals; systemd will \
                     restart the agent between samples: raise WatchdogSec or lower sample_interval_s"
                );
            } else {
                tracing::info!(
                    watchdog_s = w.as_secs_f64(),
                    "service watchdog enabled; pinged from the sampling loop"
                );
            }
        }
        Notifier {
            socket,
            ping_every: watchdog.map(|w| w / 2),
            last_ping: None,
            ready_sent: false,
            failed: false,
        }
    }

    /// True when a service manager listens.
    pub fn active(&self) -> bool {
        self.socket
    }

    /// Called after every published sample: the first sends `READY=1`, later ones feed the
    /// watchdog (at most once per half watchdog interval, so a fast loop sends little).
    pub fn sampled(&mut self, containers: usize) {
        if !self.socket {
            return;
        }
        let now = Instant::now();
        if !self.ready_sent {
            let status = format!("sampling {containers} containers");
            let mut states = vec![NotifyState::Ready, NotifyState::Status(&status)];
            if self.ping_every.is_some() {
                states.push(NotifyState::Watchdog);
            }
            self.send(&states);
            self.ready_sent = true;
            self.last_ping = Some(now);
            return;
        }
        let Some(every) = self.ping_every else {
            return;
        };
        if self
            .last_ping
            .is_none_or(|t| now.duration_since(t) >= every)
        {
            self.send(&[NotifyState::Watchdog]);
            self.last_ping = Some(now);
        }
    }

    /// Tells the service manager that shutdown has begun, so it does not count the time spent
    /// saving state against the watchdog.
    pub fn stopping(&mut self) {
        if self.socket {
            self.send(&[NotifyState::Stopping]);
        }
    }

    fn send(&mut self, states: &[NotifyState]) {
        match sd_notify::notify(states) {
            Ok(()) => self.failed = false,
            // Logged once per run of failures: a vanished socket must not flood the log.
            Err(e) if !self.failed => {
                self.failed = true;
                let socket = std::env::var("NOTIFY_SOCKET").unwrap_or_default();
                tracing::warn!(socket, error = %e, "cannot notify the service manager; will keep trying");
            }
            Err(_) => {}
        }
    }
}
