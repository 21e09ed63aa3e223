//! The clock the agent measures its absence from the edge by: `CLOCK_BOOTTIME`, which goes
//! on while the machine is suspended. `std::time::Instant` (and tokio's) is
//! `CLOCK_MONOTONIC`, which stops then — and the edge's bounds (`LOST_AFTER_MS` after
//! which it gives a job up, two heartbeat intervals of silence after which it drops a
//! connection) run on its own clock, which does not stop with Spark. rev34-1: Spark slept
//! with a job held at the refresh gate; the edge gave the job up (502 `RUNNER_LOST`, the
//! caller told to fall back) `LOST_AFTER_MS` of real time later; on resume the agent's
//! monotonic clock had moved a few seconds and the start rule let the job start: run twice.
//!
//! One place: every age the start rule ([`crate::link`]) and the connection's silence and
//! away judgements ([`crate::connection`], [`crate::reconnect`]) compare with the edge's
//! bounds is a [`BootInstant`]. Their timers sleep on tokio's clock (a sleep cut short or
//! made long by a suspend only moves when the loop looks again; what it then compares is
//! read here).
//!
//! So are the agent's own give-up times, waited for with [`sleep_until`]: a job's deadline
//! (its `timeout_ms`, [`crate::runner`], [`crate::process`], the hand-back's stop in
//! [`crate::repo`]) and a write's ([`crate::connection`]: the link taking no byte for two
//! heartbeat intervals, or the write not through by its bound). The edge times a job out
//! `timeout_ms` (and its margin) of real time after it sent it, and drops a connection
//! after two intervals of real silence: on the monotonic clock a job running when Spark
//! slept ran on after resume for the rest of its awake time, its caller long told TIMEOUT
//! (and its push could still land), and a write into a link the edge had long dropped
//! waited its whole bound again.

use std::time::Duration;

/// Which clock: the one that counts a suspend. (Reading `CLOCK_MONOTONIC` here is the
/// clock of before rev34-1; `link::tests::a_suspend_holds_a_job_the_edge_gave_up_meanwhile`
/// fails with it.)
const CLOCK: libc::clockid_t = libc::CLOCK_BOOTTIME;

/// The longest a [`sleep_until`] sleeps on tokio's clock before it reads [`CLOCK`] again:
/// how late after a resume a give-up time that passed during the suspend is noticed. A
/// wait shorter than this (most jobs, every write that goes through) costs one tokio timer,
/// as before; a longer one wakes once a step to look — nothing beside a running Claude's
/// own output. (A `timerfd` on `CLOCK_BOOTTIME` would fire at the instant, but costs a
/// descriptor and its epoll registration per wait, and could not be moved by the tests'
/// clock, [`tests::Machine`].)
pub const STEP: Duration = Duration::from_secs(1);

/// Sleeps until [`BootInstant::now`] reaches `at`, a suspend counted: tokio's timers run on
/// the monotonic clock, which stops while the machine sleeps, so the wait sleeps on them
/// at most [`STEP`] at a time and reads the boot clock after each.
pub async fn sleep_until(at: BootInstant) {
    loop {
        let left = at.saturating_duration_since(BootInstant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(STEP)).await;
    }
}

/// A reading of [`CLOCK`]: the time since the machine booted, suspends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        BootInstant(read(CLOCK))
    }

    /// How long after `earlier` this is; zero if it is not after.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// How long ago this was, suspends included.
    pub fn elapsed(self) -> Duration {
        BootInstant::now().saturating_duration_since(self)
    }

    /// Tests: a time `d` before this one.
    #[cfg(test)]
    pub fn checked_sub(self, d: Duration) -> Option<BootInstant> {
        self.0.checked_sub(d).map(BootInstant)
    }

    /// This plus `d`; the clock's end (far past any boot) if that overflows.
    pub fn saturating_add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        self.saturating_add(d)
    }
}

/// Clock `id`, read. Linux keeps both clocks this module names for every process: a
/// failure is a kernel without them (before 2.6.39), which the agent does not run on.
fn system(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({id}) failed: {}", std::io::Error::last_os_error());
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(not(test))]
fn read(id: libc::clockid_t) -> Duration {
    system(id)
}

/// Tests: a machine whose clocks the test moves ([`tests::Machine`]), on this thread, in
/// place of the system's — a suspend is the boot clock moved and the monotonic one not.
#[cfg(test)]
fn read(id: libc::clockid_t) -> Duration {
    tests::MACHINE.with(|m| m.borrow().as_ref().map(|m| m.read(id))).unwrap_or_else(|| system(id))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        pub(super) static MACHINE: RefCell<Option<Machine>> = const { RefCell::new(None) };
    }

    /// A machine's two clocks, as the kernel keeps them: running moves both, a suspend only
    /// the boot clock. Installed for this thread while the value lives.
    pub struct Machine {
        monotonic: Duration,
        boot: Duration,
    }

    /// The installed [`Machine`]'s handle; dropped, the system's clocks are read again.
    pub struct Installed(());

    impl Machine {
        /// Installs a machine booted an hour ago, which never slept yet.
        pub fn install() -> Installed {
            Machine::install_up(Duration::from_secs(3_600))
        }

        /// Installs a machine booted `up` ago, which never slept yet: with `up` short, its
        /// clocks read behind the system's, which another thread (the blocking pool's) reads.
        pub fn install_up(up: Duration) -> Installed {
            MACHINE.with(|m| *m.borrow_mut() = Some(Machine { monotonic: up, boot: up }));
            Installed(())
        }

        /// Installs a machine whose clocks read what the system's read now: work begun on
        /// the system's clocks (a job's deadline, a write's bounds) goes on on this one,
        /// whose clocks then move only as the test says — a test that waits for a bound to
        /// pass must [`Installed::suspend`] or [`Installed::run`] past it.
        pub fn install_now() -> Installed {
            let (monotonic, boot) = (system(libc::CLOCK_MONOTONIC), system(CLOCK));
            MACHINE.with(|m| *m.borrow_mut() = Some(Machine { monotonic, boot }));
            Installed(())
        }

        pub(super) fn read(&self, id: libc::clockid_t) -> Duration {
            match id {
                libc::CLOCK_BOOTTIME => self.boot,
                libc::CLOCK_MONOTONIC => self.monotonic,
                other => panic!("the test machine keeps no clock {other}"),
            }
        }
    }

    impl Installed {
        /// The machine runs for `d`: both clocks move.
        pub fn run(&self, d: Duration) {
            MACHINE.with(|m| m.borrow_mut().as_mut().map(|m| (m.monotonic += d, m.boot += d)));
        }

        /// The machine is suspended for `d`: only the boot clock moves.
        pub fn suspend(&self, d: Duration) {
            MACHINE.with(|m| m.borrow_mut().as_mut().map(|m| m.boot += d));
        }
    }

    impl Drop for Installed {
        fn drop(&mut self) {
            MACHINE.with(|m| *m.borrow_mut() = None);
        }
    }

    /// The boot clock counts at least all the time the monotonic clock does (it is the
    /// monotonic clock plus the time suspended): read around a span of the monotonic one,
    /// it moved no less.
    #[test]
    fn the_boot_clock_moves_at_least_as_far_as_the_monotonic_one() {
        let boot_before = BootInstant::now();
        let mono_before = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let mono_after = std::time::Instant::now();
        let boot_after = BootInstant::now();
        let (boot, mono) = (boot_after.saturating_duration_since(boot_before), mono_after.duration_since(mono_before));
        assert!(boot >= mono && mono >= Duration::from_millis(20), "boot clock moved {boot:?}, monotonic {mono:?}");
        assert!(boot_after > boot_before);
        assert_eq!(boot_before.saturating_duration_since(boot_after), Duration::ZERO);
        assert_eq!((boot_before + Duration::from_secs(1)).saturating_duration_since(boot_before), Duration::from_secs(1));
    }

    /// The test machine: a suspend moves the boot clock only, and what the agent reads is
    /// the boot clock.
    #[test]
    fn a_suspend_moves_only_the_boot_clock() {
        let machine = Machine::install();
        let before = BootInstant::now();
        machine.run(Duration::from_secs(1));
        machine.suspend(Duration::from_secs(60));
        assert_eq!(BootInstant::now().saturating_duration_since(before), Duration::from_secs(61));
        assert_eq!(read(libc::CLOCK_MONOTONIC), Duration::from_secs(3_601));
    }
}
