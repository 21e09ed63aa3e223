//! The time an event happened, as the host read it. The machine never reads a clock; every
//! event carries a [`Now`] with two readings, because durations and dates want different
//! clocks:
//!
//! - [`Now::at`] is edge time: milliseconds on a clock that never jumps. Every deadline,
//!   timeout and duration is measured on it, so an NTP step or an operator's `date -s`
//!   cannot time out running jobs or keep dead ones alive. The native host maps a
//!   monotonic clock onto an epoch fixed at start-up (wall time then), so edge time reads
//!   like wall time and stored records stay meaningful across a restart.
//! - [`Now::wall`] is the wall clock: what signed orders, the agent's hello and a login's
//!   expiry are checked against (the agent and OAuth speak wall time), and what people see.
//!
//! A bare [`Millis`] converts into a `Now` whose two readings agree: the Worker (whose
//! platform clock is kept right and which is rebuilt from storage every few seconds) and
//! tests use that.

use shared::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Edge time: never jumps. Deadlines and durations.
    pub at: Millis,
    /// Wall time: orders, hellos, logins, and what is shown to people.
    pub wall: Millis,
}

impl Now {
    /// The wall time at which edge time `t` happened, for display: the time now minus how
    /// long ago it was, so a clock jump since then does not show a date that never was. A
    /// time after now (a record stored by a run whose clock was ahead) shows as now: what
    /// happened is never shown as still to come. A deadline is [`Now::wall_until`]'s.
    pub fn wall_of(&self, t: Millis) -> Millis {
        self.wall.saturating_sub(self.at.saturating_sub(t))
    }

    /// The wall time at which deadline `t` (edge time, a login's expiry) falls: the time
    /// now plus how long until it (minus how long since, once past).
    pub fn wall_until(&self, t: Millis) -> Millis {
        match t.checked_sub(self.at) {
            Some(ahead) => self.wall.saturating_add(ahead),
            None => self.wall_of(t),
        }
    }
}

impl From<Millis> for Now {
    fn from(t: Millis) -> Now {
        Now { at: t, wall: t }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_times_past_and_ahead_show_as_wall_times() {
        // The wall clock jumped two hours ahead while edge time moved one second.
        let now = Now { at: 11_000, wall: 7_200_000 + 11_000 };
        assert_eq!(now.wall_of(10_000), 7_200_000 + 10_000);
        assert_eq!(now.wall_until(71_000), 7_200_000 + 71_000, "a deadline a minute ahead shows a minute ahead");
        assert_eq!(now.wall_until(10_000), 7_200_000 + 10_000);
        assert_eq!(Now::from(5).wall_of(9), 5, "what happened after now shows as now");
        assert_eq!(Now::from(5).wall_until(9), 9);
    }
}
