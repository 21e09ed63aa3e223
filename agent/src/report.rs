//! What the agent tells the edge about its Claude login and the subscription's usage
//! window, and when: with every heartbeat, and at once when it changes — the credentials
//! file changed (seen within a second: [`Reporter::watch`] polls it), a run failed to
//! authenticate or succeeded, Claude reported its usage window, a relayed login ended.
//! "At once" is a heartbeat queued by the change itself ([`Reporter::tell_with`]), so it
//! goes to the edge ahead of every frame queued after the change.
//!
//! A failed authentication marks the login broken until the credentials change or a run
//! succeeds; a used-up usage window stays so until its reset (eight days at most), a
//! successful run, or the operator's `agent --clear-usage`.

use crate::oauth::Login;
use shared::oauth::OAuthReport;
use shared::usage::{UsageStatus, UsageWindow};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tracing::info;

/// How often the credentials file is looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

pub struct Reporter {
    login: Login,
    auth_failed: AtomicBool,
    usage: Mutex<Option<UsageWindow>>,
    /// Queues what tells the edge of a change (the agent's heartbeat), at the change.
    teller: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// How many changes were told ([`Reporter::changes`]).
    changes: AtomicU64,
    /// What the credentials looked like at the last look.
    seen: Mutex<Option<u64>>,
}

impl Reporter {
    pub fn new(login: Login) -> Reporter {
        let reporter = Reporter {
            login,
            auth_failed: AtomicBool::new(false),
            usage: Mutex::new(None),
            teller: OnceLock::new(),
            changes: AtomicU64::new(0),
            seen: Mutex::new(None),
        };
        *reporter.seen.lock().expect("seen lock") = Some(reporter.fingerprint());
        reporter
    }

    /// The report as of now. Never carries a token.
    pub fn report(&self) -> OAuthReport {
        let mut report = self.login.read(crate::now_ms()).report;
        report.auth_failed = self.auth_failed.load(Ordering::SeqCst);
        report.usage = self.usage.lock().expect("usage lock").clone();
        report
    }

    /// Sets what each change calls to tell the edge (the agent: queue a heartbeat, which
    /// reads [`Reporter::report`]). Called in the changer's own order, before the change's
    /// method returns, so the heartbeat is queued ahead of whatever the caller queues next:
    /// a run's result on the usage limit goes after the used-up window it reported. Woken
    /// by the change, the connection's loop queued the heartbeat when it got to it — now
    /// and then after the result, and a caller's next job, sent on that answer, reached a
    /// Claude whose window was used up. `teller` must not take a lock held around a change
    /// (the agent's calls come with none of its own held). Set once; later calls are
    /// ignored.
    pub fn tell_with(&self, teller: impl Fn() + Send + Sync + 'static) {
        let _ = self.teller.set(Box::new(teller));
    }

    /// How many changes were told so far: a connection compares the count when its hello
    /// took the report with the count once its queue is cleared, as a change told between
    /// went with the queue of the connection before.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Tells the edge of a change, with no lock of the reporter's held.
    fn tell(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        if let Some(teller) = self.teller.get() {
            teller();
        }
    }

    /// Claude failed to authenticate (`true`), or authenticated (`false`).
    pub fn auth_failed(&self, failed: bool) {
        if self.auth_failed.swap(failed, Ordering::SeqCst) != failed {
            info!(auth_failed = failed, "Claude's login state changed");
            self.tell();
        }
    }

    /// Claude reported its usage window.
    pub fn saw_usage(&self, window: UsageWindow) {
        let mut usage = self.usage.lock().expect("usage lock");
        let news = usage.as_ref().is_none_or(|u| (u.status, u.resets_at, u.kind.as_deref()) != (window.status, window.resets_at, window.kind.as_deref()));
        if news {
            info!(status = ?window.status, kind = window.kind.as_deref().unwrap_or("-"), resets_at = window.resets_at, "usage window reported");
        }
        *usage = Some(window);
        drop(usage);
        if news {
            self.tell();
        }
    }

    /// Takes over what this agent last reported before it stopped (its status file) that
    /// still stands: a used-up usage window not yet reset, and a failed authentication
    /// while the credentials are the ones that failed. Without it a restart forgot both:
    /// the edge let its held jobs go, and each reached Claude to fail again (`USAGE_LIMIT`,
    /// `RUNNER_OAUTH_ERROR`) instead of the callers falling back at once.
    pub fn resume(&self, last: Option<&crate::status::Status>, now: shared::Millis) {
        let Some((report, fingerprint)) = last.and_then(|s| Some((s.login.as_ref()?, s.login_fingerprint))) else { return };
        // The file is one a job can write.
        let usage = report.usage.clone().map(|u| u.read_back(now));
        if let Some(window) = usage.filter(|u| u.blocks(now)) {
            info!(resets_at = window.resets_at, "the usage window is still used up, as reported before the restart");
            *self.usage.lock().expect("usage lock") = Some(window);
        }
        if report.auth_failed && fingerprint == Some(self.fingerprint()) {
            info!("Claude still cannot authenticate with these credentials, as reported before the restart");
            self.auth_failed.store(true, Ordering::SeqCst);
        }
    }

    /// A run succeeded: the login works and the usage window is open.
    pub fn run_succeeded(&self) {
        self.auth_failed(false);
        self.open_usage();
    }

    /// The operator said the usage window is open (`agent --clear-usage`): a used-up one
    /// holds no more work. If Claude's window is really used up, the next job that reaches
    /// it ends on the usage limit and the window is held again. Returns whether one was.
    pub fn clear_usage(&self) -> bool {
        let cleared = self.open_usage();
        info!(cleared, "the operator cleared the usage window (agent --clear-usage)");
        cleared
    }

    /// A used-up window is open from now; the edge is told at once. Returns whether one was.
    fn open_usage(&self) -> bool {
        let mut usage = self.usage.lock().expect("usage lock");
        let Some(u) = usage.as_mut().filter(|u| u.status == UsageStatus::Rejected) else { return false };
        u.status = UsageStatus::Allowed;
        u.seen_at = crate::now_ms();
        drop(usage);
        self.tell();
        true
    }

    /// Looks at the credentials once: if they changed, a failed login is forgotten (the
    /// person logged in again) and the edge is told at once. Returns whether they changed.
    pub fn look(&self) -> bool {
        let now = self.fingerprint();
        let mut seen = self.seen.lock().expect("seen lock");
        if *seen == Some(now) {
            return false;
        }
        *seen = Some(now);
        drop(seen);
        info!("Claude's credentials changed");
        self.auth_failed.store(false, Ordering::SeqCst);
        self.tell();
        true
    }

    /// Looks at the credentials every [`WATCH_EVERY`], forever.
    pub async fn watch(&self) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tick.tick().await;
            self.look();
        }
    }

    /// A digest of the credentials: the file (tokens included, so a refresh counts as a
    /// change) and the tokens from the environment (a restart may bring new ones). Written
    /// to the status file, where 64 bits of it give nothing of a token away, so a restart
    /// can tell the credentials that failed from new ones.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // Read as the login is, bounded and never waiting ([`crate::oauth::credentials_bytes`]).
        crate::oauth::credentials_bytes(&self.login.credentials_path).ok().hash(&mut h);
        self.login.oauth_token_env.hash(&mut h);
        self.login.api_key_env.hash(&mut h);
        h.finish()
    }
}

/// `claude-runner agent --clear-usage`: tells the agent running with `data_dir` (SIGUSR2,
/// as `--drain` finds and signals it, [`crate::drain::reach`]) that Claude's usage window
/// is open again ([`Reporter::clear_usage`]). False if no such agent could be told.
pub fn ask_to_clear(data_dir: &std::path::Path) -> anyhow::Result<bool> {
    ask_to_clear_to(&mut std::io::stdout(), data_dir)
}

/// [`ask_to_clear`], written to `out`.
fn ask_to_clear_to(out: &mut impl std::io::Write, data_dir: &std::path::Path) -> anyhow::Result<bool> {
    let Some(reached) = crate::drain::reach(out, data_dir, libc::SIGUSR2, "clear")? else { return Ok(false) };
    let agent = &reached.agent;
    if !reached.catches {
        // SIGUSR2 would end it.
        crate::status::say(
            out,
            format!("Agent {} (pid {}) is of a release before --clear-usage and is not signalled; upgrade and restart it (its used-up window lasts until its reset, eight days at most).", agent.agent_id, agent.pid),
        )?;
        return Ok(false);
    }
    if let Err(e) = reached.signal(libc::SIGUSR2) {
        if e.raw_os_error() == Some(libc::ESRCH) {
            crate::status::say(out, format!("Agent {} (pid {}) stopped before it was told.", agent.agent_id, agent.pid))?;
            return Ok(false);
        }
        anyhow::bail!("cannot signal agent {} (pid {}): {e}; run this as the user the agent runs as", agent.agent_id, agent.pid);
    }
    crate::status::say(
        out,
        format!(
            "Told agent {} (pid {}) that the usage window is open: the edge sends it work again (its log says \"the operator cleared the usage window\"). If Claude's window is really used up, the next job ends with USAGE_LIMIT and the window is held again.",
            agent.agent_id, agent.pid
        ),
    )?;
    Ok(true)
}

/// The login `oauth-status` and `doctor` read, and a few words on where: this shell's
/// (`CLAUDE_CONFIG_DIR`, `config_dir`, else ~/.claude). When the running agent of
/// `data_dir` says it reads its login elsewhere (`up` started with `CLAUDE_CONFIG_DIR=/x`
/// reads /x, and the next shell may not set it), the words say so, as its status file's
/// word and no more: that file is a job's to write, and a folder a job chose is not one to
/// read (a lookalike login shown as the agent's, or `doctor --canary` running that
/// folder's settings' hooks as the operator), nor to hand the operator as one to use.
/// Every folder named is one line, its control characters escaped (a line break in it
/// printed lines of the job's choosing as doctor's).
pub fn local_login(config_dir: Option<&std::path::Path>, data_dir: &std::path::Path) -> (Login, String) {
    let login = Login::new(config_dir);
    let mut words = match config_dir {
        Some(dir) => format!("read in {} (CLAUDE_CONFIG_DIR)", shared::text::one_line(&dir.display().to_string())),
        None => format!("read in {} (CLAUDE_CONFIG_DIR is not set here)", shared::text::one_line(&login.config_dir.display().to_string())),
    };
    let agents = crate::status::running_agents(data_dir).and_then(|s| s.claude_config_dir);
    if let Some(dir) = agents.filter(|d| *d != login.config_dir) {
        words.push_str(&agents_folder_words(&dir));
    }
    (login, words)
}

/// How much of the folder a status file names is shown: a real one is far shorter (a path
/// is at most 4 KiB), and a job writing that file may make it megabytes long.
const STATUS_FOLDER_SHOWN: usize = 512;

/// The words on the folder the running agent's status file names: one line, escaped, cut
/// at [`STATUS_FOLDER_SHOWN`] (said with `…`), as that file's word only.
fn agents_folder_words(dir: &std::path::Path) -> String {
    let full = dir.display().to_string();
    let shown = shared::text::truncate(&full, STATUS_FOLDER_SHOWN);
    let cut = if shown.len() < full.len() { "…" } else { "" };
    let dir = shared::text::one_line(shown);
    format!(
        "; the running agent's status file says it reads its login in {dir}{cut}, which is not read here (a job can write that file): \
         if you started the agent with another CLAUDE_CONFIG_DIR, set the same here"
    )
}

#[cfg(test)]
mod folder_words_tests {
    /// A status file's folder of megabytes (a job writes that file) was printed whole, on
    /// one line of doctor's: cut, and every control character still escaped.
    #[test]
    fn a_status_files_folder_is_shown_short_and_on_one_line() {
        let long = std::path::PathBuf::from(format!("/x\n\u{1b}]52;c;{}", "a".repeat(4 << 20)));
        let words = super::agents_folder_words(&long);
        assert!(words.len() < 2 * super::STATUS_FOLDER_SHOWN + 300, "{} bytes", words.len());
        assert!(!words.contains('\n') && !words.contains('\u{1b}'), "{words}");
        assert!(words.contains("…, which is not read here"), "{words}");
        let short = super::agents_folder_words(std::path::Path::new("/home/op/.claude-work"));
        assert!(short.contains("in /home/op/.claude-work, which"), "{short}");
    }
}

/// The login as this machine reads it, with what the running agent last reported that a
/// file cannot show: a failed authentication, the usage window. For `oauth-status` and
/// `doctor`.
pub fn local_report(login: &Login, data_dir: &std::path::Path) -> OAuthReport {
    let mut report = login.read(crate::now_ms()).report;
    let reported = crate::status::running_agents(data_dir).and_then(|s| s.login);
    if let Some(last) = reported {
        // A failure the credentials have not changed since still stands.
        report.auth_failed = last.auth_failed && last.expires_at == report.expires_at && last.source == report.source;
        // Read back as a restarted agent takes it over (the file is a job's to write).
        report.usage = last.usage.map(|u| u.read_back(crate::now_ms()));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter(name: &str) -> (Reporter, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("cr-report-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let login = Login { config_dir: dir.clone(), credentials_path: dir.join(".credentials.json"), oauth_token_env: None, api_key_env: None, other_secrets: Vec::new(), redactors: Default::default(), readings: Default::default(), remembered: Default::default(), learnt: Default::default() };
        let _ = std::fs::remove_file(&login.credentials_path);
        (Reporter::new(login), dir)
    }

    /// Counts the changes `r` tells the edge of.
    fn told(r: &Reporter) -> std::sync::Arc<AtomicU64> {
        let count = std::sync::Arc::new(AtomicU64::new(0));
        let counted = std::sync::Arc::clone(&count);
        r.tell_with(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        count
    }

    /// `oauth-status` and `doctor` take the usage window (and a standing auth failure)
    /// from the status file when it is the running agent's. A job (the agent's user) can
    /// hold DATA_DIR's lock itself and plant a status.json naming another running
    /// claude-runner: its "window refused until…" was shown as this machine's. Only the
    /// lock's holder's file is taken, as `status` shows it.
    #[test]
    fn a_planted_status_files_usage_window_is_not_taken_as_the_agents() {
        use std::os::unix::process::CommandExt;
        let (r, dir) = reporter("planted");
        // Holds the lock itself, a stand-in agent of this program (the program a file names
        // must be this one where that can be read).
        let mut holder = crate::status::tests::stand_in(&dir);
        // Another claude-runner agent, not holding this lock.
        let mut other = std::process::Command::new("tail").arg0("claude-runner").args(["agent", "-f", "/dev/null"]).stderr(std::process::Stdio::null()).spawn().unwrap();
        while !crate::status::runs_agent(other.id()) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut login = r.report();
        login.usage = Some(UsageWindow { status: UsageStatus::Rejected, kind: None, resets_at: None, utilization: Some(1.0), seen_at: crate::now_ms() });
        let usage_of = |pid: u32| {
            let status = crate::status::Status { agent_id: "planted".into(), pid, login: Some(login.clone()), ..Default::default() };
            std::fs::write(dir.join(crate::status::FILE_NAME), serde_json::to_vec(&status).unwrap()).unwrap();
            local_report(&r.login, &dir).usage.map(|u| u.status)
        };
        let (planted, holders) = (usage_of(other.id()), usage_of(holder.id()));
        let _ = (holder.kill(), other.kill(), holder.wait(), other.wait());
        // Nobody holds the lock: a `claude-runner` that is no agent (a `submit`) named.
        assert!(!crate::drain::lock_taken(&dir), "the lock outlived its holder");
        let mut submit = std::process::Command::new("sleep").arg0("claude-runner").arg("60").spawn().unwrap();
        while !crate::status::is_agent(submit.id()) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let not_an_agent = usage_of(submit.id());
        let _ = (submit.kill(), submit.wait());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(planted, None, "the planted file's usage window was taken as the agent's");
        assert_eq!(holders, Some(UsageStatus::Rejected), "the lock holder's file is the agent's");
        assert_eq!(not_an_agent, None, "a claude-runner that is no agent was taken for the agent");
    }

    #[test]
    fn an_auth_failure_lasts_until_the_credentials_change() {
        let (r, dir) = reporter("auth");
        let told = told(&r);
        r.auth_failed(true);
        assert_eq!(told.load(Ordering::SeqCst), 1, "the edge is told at the change");
        assert!(r.report().auth_failed);
        assert!(!r.look(), "nothing changed");
        assert!(r.report().auth_failed, "still broken until the credentials change");
        std::fs::write(dir.join(".credentials.json"), r#"{"claudeAiOauth":{"accessToken":"a","expiresAt":4102444800000}}"#).unwrap();
        assert!(r.look());
        assert!(!r.report().auth_failed, "a new login clears it");
        assert_eq!(told.load(Ordering::SeqCst), 2, "a new login is told");
        r.auth_failed(true);
        r.run_succeeded();
        assert!(!r.report().auth_failed, "a successful run clears it too");
    }

    #[test]
    fn usage_is_kept_until_a_run_succeeds() {
        let (r, _) = reporter("usage");
        let told = told(&r);
        let w = UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(9_000_000_000_000), utilization: None, seen_at: 1 };
        r.saw_usage(w.clone());
        assert_eq!(told.load(Ordering::SeqCst), 1, "told");
        assert_eq!(r.report().usage.unwrap().status, UsageStatus::Rejected);
        r.run_succeeded();
        assert_eq!(r.report().usage.unwrap().status, UsageStatus::Allowed);
    }

    /// A used-up window held the agent's work until its reset or a successful run, which
    /// never comes while the edge sends the agent nothing: the operator had no way to let
    /// it work again (hostile review rev2). `agent --clear-usage` clears it; a window that
    /// blocks nothing stays as it was.
    #[test]
    fn the_operator_clears_a_used_up_window() {
        let (r, _) = reporter("clear");
        let told = told(&r);
        assert!(!r.clear_usage(), "nothing to clear");
        let warning = UsageWindow { status: UsageStatus::AllowedWarning, kind: Some("five_hour".into()), resets_at: Some(5_000), utilization: Some(0.9), seen_at: 1 };
        r.saw_usage(warning.clone());
        assert!(!r.clear_usage());
        assert_eq!(r.report().usage, Some(warning));
        let now = crate::now_ms();
        r.saw_usage(UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(now + 3_600_000), utilization: None, seen_at: now });
        let before = told.load(Ordering::SeqCst);
        assert!(r.clear_usage());
        assert_eq!(told.load(Ordering::SeqCst), before + 1, "the edge is told at once");
        let usage = r.report().usage.unwrap();
        assert!(!usage.blocks(crate::now_ms()) && usage.status == UsageStatus::Allowed, "{usage:?}");
    }

    #[tokio::test]
    async fn a_restart_keeps_a_used_up_window_until_its_reset() {
        let (r, _) = reporter("resume");
        let window = |resets_at| UsageWindow { status: UsageStatus::Rejected, kind: None, resets_at: Some(resets_at), utilization: None, seen_at: 1 };
        let last = |w| crate::status::Status { login: Some(OAuthReport { usage: Some(w), ..r.report() }), ..Default::default() };
        r.resume(Some(&last(window(1_000))), 2_000);
        assert!(r.report().usage.is_none(), "a window that has reset is not taken over");
        r.resume(None, 2_000);
        assert!(r.report().usage.is_none());
        r.resume(Some(&last(window(5_000))), 2_000);
        assert_eq!(r.report().usage.unwrap().blocked_until(), Some(5_000));
    }

    /// The window taken over at a restart comes from `DATA_DIR/status.json`, which a job
    /// (the agent's user) can write, then end the agent: a window "seen" in the year 33000
    /// passed the cut after it was seen, and held every caller's work on the agent until
    /// then, across every restart (each rewrote it). A window is not seen after the restart
    /// that reads it, and blocks as one read from Claude then would: at most
    /// `MAX_RESET_MS` after the restart (`agent --clear-usage` opens it before).
    #[tokio::test]
    async fn a_window_taken_over_at_a_restart_was_seen_no_later_than_then() {
        let (r, _) = reporter("resume-future");
        let far = 1_000_000_000_000_000;
        let planted = UsageWindow { status: UsageStatus::Rejected, kind: None, resets_at: Some(far), utilization: None, seen_at: far };
        let last = crate::status::Status { login: Some(OAuthReport { usage: Some(planted), ..r.report() }), ..Default::default() };
        let now = 2_000;
        r.resume(Some(&last), now);
        let until = r.report().usage.and_then(|u| u.blocked_until());
        assert_eq!(until, Some(now + shared::usage::MAX_RESET_MS), "blocked until {until:?}");
    }

    /// The window's `type` read from Claude's output is cut to 64 bytes, but the one taken
    /// over from the status file (a job's to write) was kept whole: 4 MiB of it went in
    /// every hello, which the edge reads only up to 64 KiB, and the agent was refused at
    /// every connection while the window blocked (and rewrote it at each start).
    #[tokio::test]
    async fn a_window_taken_over_at_a_restart_is_cut_as_one_read_from_claude() {
        let (r, _) = reporter("resume-kind");
        let planted = UsageWindow { status: UsageStatus::Rejected, kind: Some("\u{1}".repeat(4 << 20)), resets_at: Some(5_000), utilization: None, seen_at: 1_000 };
        let last = crate::status::Status { login: Some(OAuthReport { usage: Some(planted), ..r.report() }), ..Default::default() };
        r.resume(Some(&last), 2_000);
        let kind = r.report().usage.and_then(|u| u.kind).unwrap_or_default();
        assert!(kind.len() <= shared::usage::MAX_KIND_BYTES, "a type of {} bytes", kind.len());
    }

    /// A job runs as the agent's user and can put anything where Claude's credentials file
    /// goes: a pipe (an open of it waits for a writer for ever), or a link to `/dev/zero`
    /// or a huge sparse file (read whole). The reporter looks at the file every second and
    /// at every heartbeat on the agent's one runtime thread, holding the login's reading
    /// lock: the agent froze for good — no heartbeat, no result, no job. A pipe there is
    /// a credentials file that cannot be read, said so, and nothing waits on it. (Bounded
    /// here by a writer opened after a minute: the old code waited for it.)
    #[test]
    fn a_pipe_in_place_of_the_credentials_file_holds_nothing() {
        use std::os::unix::fs::OpenOptionsExt;
        let (r, dir) = reporter("fifo");
        let path = dir.join(".credentials.json");
        crate::files::pipe_at(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            r.look();
            let report = r.report();
            let _ = r.fingerprint();
            let _ = tx.send(report);
        });
        let report = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(report) => report,
            Err(_) => {
                // Let the stuck reads go (each open finds a writer, then the end of input).
                for _ in 0..4 {
                    let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&path);
                }
                panic!("reading the login waited on a pipe put in place of the credentials file");
            }
        };
        assert!(report.problem.as_deref().is_some_and(|p| p.contains("not a plain file")), "{:?}", report.problem);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_restart_keeps_an_auth_failure_only_for_the_same_credentials() {
        let (r, dir) = reporter("resume-auth");
        let failed = |fingerprint| crate::status::Status {
            login: Some(OAuthReport { auth_failed: true, ..r.report() }),
            login_fingerprint: Some(fingerprint),
            ..Default::default()
        };
        let before = r.fingerprint();
        std::fs::write(dir.join(".credentials.json"), r#"{"claudeAiOauth":{"accessToken":"new","expiresAt":4102444800000}}"#).unwrap();
        r.resume(Some(&failed(before)), 0);
        assert!(!r.report().auth_failed, "new credentials since the failure: try them");
        r.resume(Some(&failed(r.fingerprint())), 0);
        assert!(r.report().auth_failed, "the credentials that failed still fail");
    }
}
