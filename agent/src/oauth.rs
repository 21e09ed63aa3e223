//! Claude's login on this machine: where it comes from, what the edge is told about it,
//! the logins read since the agent started (masked by its redactor until dead, [`Logins`]),
//! each job's watch on them (a job that writes logins of its own is withheld,
//! [`JobWatch`]), and the gate that keeps two Claude processes from refreshing the token at
//! once.
//!
//! Claude Code refreshes an expired access token itself while a refresh token exists, and
//! rotates the refresh token when it does. Two processes refreshing together can each
//! spend the same refresh token and leave the login dead, so while the token is expired
//! (or about to be) only one Claude may start, of all the processes on this config folder
//! ([`REFRESH_LOCK`]); the others wait until the credentials file shows a fresh token or
//! that one ends — a lock another process holds, for at most [`LOCK_WAIT`].

use crate::credentials;
use crate::redact::{Layer, Redactor};
use shared::oauth::{OAuthReport, OAuthSource};
use shared::Millis;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// A token closer than this to expiry counts as expiring: the job would refresh it.
pub const NEAR_EXPIRY_MS: Millis = 5 * 60_000;

/// Where the agent looks for Claude's login.
#[derive(Debug, Clone)]
pub struct Login {
    /// Claude's config folder: `CLAUDE_CONFIG_DIR`, else `~/.claude`.
    pub config_dir: PathBuf,
    pub credentials_path: PathBuf,
    pub oauth_token_env: Option<String>,
    pub api_key_env: Option<String>,
    /// The machine's other secrets (the repository tokens): redacted like the login's.
    pub other_secrets: Vec<String>,
    /// The last redactors built ([`Redactors`]) and the secrets each was built from.
    /// Building one hashes every window of every encoded form of every secret (about a
    /// millisecond of CPU with one login, tens with a month of them), and a job asks for
    /// one three times while the secrets change only when Claude rotates its tokens.
    pub redactors: RedactorCache,
    /// The credentials file as last read (a job reads the login five times: the refresh
    /// gate, Claude's environment, three redactors).
    pub readings: ReadingCache,
    /// The logins the credentials file has held since the agent started and not dead (up
    /// to [`REMEMBERED`]: [`Logins`]): the redactor masks them all, whatever the file holds
    /// now.
    pub remembered: Remembered,
    /// How many logins not known before any reading of the file has met (kept or not): a
    /// reader that holds a redactor looks at it with each line ([`Login::changed`]), an
    /// atomic load, so a login another reader (the agent's look every second, another
    /// job) met is masked from the next line on.
    pub learnt: Learnt,
}

/// Shared by the clones of a [`Login`] (every job's context holds one).
pub type RedactorCache = Arc<std::sync::Mutex<Redactors>>;

/// The redactors [`Login::redactor`] built, in two layers ([`Redactor::layered`]): the
/// base masks the token variables, the logins remembered and the machine's other secrets,
/// and is built again only when that set changes (a login learnt or let go: the set
/// changes at a new login or an end, [`Logins`]); the file's current tokens that no login
/// remembered holds (a job's junk, of no token's shape: masked while the file holds it; at
/// most two, [`CURRENT_TOKEN_BYTES`] each) are a small layer of their own. A job writing a
/// new junk login at each write changed the whole set each time, and the whole redactor
/// (a month of logins: 35 ms) was built for the next line of every job's output, with no
/// tampering said (review rev45c, 2); now only the small layer is.
#[derive(Default)]
pub struct Redactors {
    /// The base layer and the secrets it was built from.
    base: Option<(Vec<String>, Arc<Layer>)>,
    /// The last redactors built on it ([`REDACTORS_KEPT`]), by the file's unknown tokens
    /// each masks besides: the latest first.
    built: std::collections::VecDeque<(Vec<String>, Arc<Redactor>)>,
}

/// Never the secrets, even in a debug print.
impl std::fmt::Debug for Redactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactors").field("base", &self.base.as_ref().map(|(secrets, _)| secrets.len())).field("built", &self.built.len()).finish()
    }
}

/// How many redactors [`Redactors`] keeps on its base, by the file's unknown tokens each
/// was built with: a file flipped between a login and one not remembered changes them at
/// each flip, and each flip built one anew (review rev45a, 2), which a redactor held (a
/// job's) sees as a new one at each line. Two cover a flip between two sets; they share
/// the base layer's tables (MiBs with a month of logins).
const REDACTORS_KEPT: usize = 2;

/// The credentials file's last reading, and the file as it was then; shared by clones.
pub type ReadingCache = Arc<std::sync::Mutex<Option<(FileStamp, Reading)>>>;

/// The logins read from the credentials file, shared by clones; held in memory only.
pub type Remembered = Arc<std::sync::Mutex<Logins>>;

/// [`Login::learnt`], shared by clones.
pub type Learnt = Arc<AtomicU64>;

/// How many logins the agent keeps in mind. The file holds one at a time, and a job can
/// change what it holds: move it away, blank it, write logins of its own, or let Claude
/// rotate the tokens; a login the file no longer holds is kept until both its tokens are
/// past their end ([`Logins`]), since no Claude run can show it spent. Claude refreshes
/// about once per access token's life (some 8 h) while jobs run, so a month of busy use
/// (the least a refresh token is kept: [`REFRESH_LIFETIME_MS`]) holds
/// about 90 logins, and one more for each relayed login: 128 is that with room to spare.
/// Past its access token's end a login is masked by its refresh token alone, so the
/// redactor masks about one token per login (BENCHMARKS.md, "Redaction throughput").
/// A login kept out for want of room withholds every job ([`Logins::overflowed`]), never
/// pushes one kept out.
pub const REMEMBERED: usize = 128;

/// How many bytes of tokens the agent keeps in mind, all logins together: past it a login
/// is kept out as past [`REMEMBERED`]. A redactor's build time and memory grow with the
/// bytes it masks: 126 logins of 512-byte tokens made each one take 0.87 s and ~200 MiB,
/// on the agent's one runtime thread (review rev45a, 3). Claude's logins are two tokens of
/// about 110 bytes: [`REMEMBERED`] of them fit (28 KiB), and logins of the longest tokens
/// kept ([`TOKEN_BYTES`]) fill it at 64.
pub const REMEMBERED_BYTES: usize = 32 * 1024;

/// What to do once the memory has overflowed, as the withheld jobs' errors and the log say
/// it. A restart empties the memory; it is not kept on disk, where a job could read it. So
/// a copy of a login read before that a job kept is masked after a restart only by its
/// `sk-ant-` shape: a new sign-in makes the login in use one no job has read (review
/// rev45a, 4). Whether it also ends the older ones at Anthropic is not documented (Claude
/// Code 2.1.197 calls no revocation), so the words promise only that.
pub const OVERFLOWED: &str = "restart the agent and sign Claude in again (`claude-runner login`, the edge's login page, or `claude auth login` as the agent's user): the restart forgets every login read before, so a copy a job kept of one is masked from then on only by its `sk-ant-` shape, and the new sign-in makes the login in use one no job has read";

/// How many logins a job's run may bring into the credentials file that the agent had not
/// read before ([`JobWatch`]): its Claude's refresh makes one, a concurrent job's Claude's
/// another; and one more for each [`ACCESS_LIFETIME_MS`] the job has run (a job may run
/// for a week, `MAX_TIMEOUT_MS`, and Claude refreshes each time the access token expires:
/// a 24 h job saw three refreshes and was withheld, review rev42). Logins made through the
/// relay never count. More is a job writing logins of its own: tampering, and its output
/// is withheld.
pub const NEW_PER_JOB: u64 = 2;

/// How long after its end an access token stays masked: the server's clock and this
/// machine's may differ, and the access token is valid by the server's.
pub const SPENT_GRACE_MS: Millis = 5 * 60_000;

/// The tokens the agent remembers ([`Logins`]) are of a shape real ones have: visible
/// ASCII, no whitespace, [`TOKEN_BYTES`] long (Claude's are about 110 bytes,
/// `sk-ant-oat01-…`; 256 is more than twice that). A job can write anything into the file:
/// a login of ordinary words ("the result") kept for the agent's life masked them in every
/// later job's output, and a 700 KB one made every later redactor take seconds to build
/// (hostile review rev38, 2); 512-byte ones, over a second (review rev45a, 3:
/// [`REMEMBERED_BYTES`]).
pub const TOKEN_BYTES: std::ops::RangeInclusive<usize> = 16..=256;

/// Whether `token` has the shape of a real token ([`TOKEN_BYTES`]).
fn plausible(token: &str) -> bool {
    TOKEN_BYTES.contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The most of a token the file holds now that is masked: the whole of any real one. A
/// token longer (not one Anthropic issues, a job's doing) is masked in its first
/// `CURRENT_TOKEN_BYTES` (any piece of them): its redactor is built from that much only, in
/// milliseconds, not the seconds a 700 KB one took for each job and each repository job's
/// git worker (hostile review rev38, 2).
pub const CURRENT_TOKEN_BYTES: usize = 4096;

/// Logins once read, in the order first read. A job runs as the agent's user: it can read
/// the file, keep a copy of the tokens, leave a login of its own in the file and print the
/// copy in a later job. Nothing a Claude run prints shows which login it used (a job's
/// settings choose its key, key helper and base URL: review rev43), so no run makes a
/// login spent. The login the file holds is live ([`State`]); once the file has held
/// another it is replaced, and kept until its refresh token's end — [`REFRESH_LIFETIME_MS`]
/// after its first reading, or the file's `refreshTokenExpiresAt` (the latest read) when
/// later — and its access token's, masked by its refresh token alone once its access
/// token is dead. Only a refresh that kept its refresh token (a new access token beside a
/// login's own refresh token, with a later `expiresAt`) spends a login: the refresh token
/// moves to the new login, and the old access token stays masked, alone, until its end.
///
/// No reading shortens an end (the latest read counts, and an access token's is never
/// less than [`ACCESS_LIFETIME_MS`] after its first reading). A login sharing a token with
/// one read before otherwise is a splice: tampering ([`JobWatch::tampering`]).
///
/// An access token is masked until its end, whatever the login's state, and the live
/// login's until it is replaced (a clock stepped ahead for a moment must not let it go:
/// review rev45c, 3); once let go, never again (the file's tokens add nothing when known):
/// the set masked changes at a new login or an end, never as the file flips between logins
/// known (each flip built a redactor: review rev45a, 2).
///
/// The memory is bounded ([`REMEMBERED`] logins, [`REMEMBERED_BYTES`] of tokens): a login
/// read with it full is not kept (masked while the file holds it, as the file's), and from
/// then on the memory has [`Logins::overflowed`]: every job running then or started after
/// has its output withheld until the agent restarts, and a restart forgets every login
/// read before ([`OVERFLOWED`]: what to do). Only tokens of a real token's shape are kept
/// ([`plausible`]).
#[derive(Default)]
pub struct Logins {
    logins: Vec<Known>,
    /// Logins read so far that were not known at their reading (kept or not): a job's run
    /// brought `first_reads` at its end less than at its start ([`JobWatch`]).
    first_reads: u64,
    /// Logins read so far that shared a token with one read before without being it.
    mixed: u64,
    /// Set once a login could not be kept for want of room: for the agent's life.
    overflowed: bool,
    /// The latest time a reading was learnt at: a job's run so far is measured on it
    /// ([`JobWatch::tampering`]), the same clock the logins' ends are on.
    clock: Millis,
    /// New logins made through the relay ([`Login::relayed_login`]): none counts against a
    /// job.
    relayed: u64,
    /// The last login not kept for want of room: read again (the file holds it at every
    /// reading until it changes) it is no new login, and no job's doing.
    unkept: Option<Vec<String>>,
}

/// The most an access token Anthropic issues is taken to live. Claude Code's logins carry
/// an `expiresAt` about 8 hours after they were made (Anthropic documents no lifetime;
/// people's reports of the file say 8 hours, one 12): a login is kept at least this long
/// after the agent first read it, whatever expiry the file showed then, since a job can
/// write a login first with an expiry of its choosing (`expiresAt: 1`) and so have it
/// forgotten at once, its refresh token live (hostile review rev40a, 3).
pub const ACCESS_LIFETIME_MS: Millis = 12 * 3_600_000;

/// How long a refresh token is taken to live at least, whatever the file's
/// `refreshTokenExpiresAt` says: a later end lengthens it, an earlier one does not shorten
/// it, since a job can write a login first with an end of its choosing and have its
/// refresh token let go early. Anthropic
/// documents no lifetime; refresh tokens are single-use (rotated at each refresh) and a
/// login was seen refreshing for weeks without a new sign-in. So a month: past it a
/// refresh token never used is taken as dead. It bounds what the memory holds
/// ([`REMEMBERED`]). Claude Code 2.1.197 writes no refresh token's end (its file holds
/// `accessToken`, `refreshToken`, `expiresAt`, `scopes`, `subscriptionType`,
/// `rateLimitTier`, `clientId`), so its logins are kept this long; a file naming a later end
/// (only a job's, today) keeps a login longer.
pub const REFRESH_LIFETIME_MS: Millis = 30 * 24 * 3_600_000;

/// What a remembered login is to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The file held it at the last reading that held a login kept: kept whatever its ends
    /// (its access token masked until its end, as any).
    Live,
    /// The file has held another since: kept until both its tokens are past their end.
    Replaced,
    /// A refresh kept its refresh token, which moved to the newer login: its access token
    /// alone is this login's, kept until its end.
    Spent,
}

/// One remembered login.
struct Known {
    /// Its tokens as read: the access token, then the refresh token (when it had one of a
    /// real token's shape). What is masked of them is [`Known::masked`].
    tokens: Vec<String>,
    state: State,
    /// Its access token's end: the latest `expiresAt` read, and at least
    /// [`ACCESS_LIFETIME_MS`] after its first reading.
    expires_at: Millis,
    /// The latest `expiresAt` the file gave it (0: none): a login with its refresh token
    /// and a later one is its refresh ([`Logins::learn`]).
    said_expires: Millis,
    /// Its refresh token's end: the latest `refreshTokenExpiresAt` read, and at least
    /// [`REFRESH_LIFETIME_MS`] after its first reading.
    refresh_ends: Millis,
    /// It shares a token with a login read before it: a splice, never a refresh.
    mixed: bool,
    /// Its access token past its end and the grace, seen while not live (and live again
    /// since, or not): that token is masked no more ([`Logins::forget_dead`]).
    access_gone: bool,
}

impl Known {
    fn access_past(&self, now: Millis) -> bool {
        self.expires_at.saturating_add(SPENT_GRACE_MS) <= now
    }

    /// Whether nothing of it may live: never while live; spent, once its access token is
    /// past its end; replaced, once its refresh token is too (a login of one token, its
    /// kind unknown, counts as both).
    fn dead(&self, now: Millis) -> bool {
        match self.state {
            State::Live => false,
            State::Spent => self.access_past(now),
            State::Replaced => self.access_past(now) && self.refresh_ends <= now,
        }
    }

    /// The tokens that are still this login's: not a refresh token moved on.
    fn held(&self) -> &[String] {
        match self.state {
            State::Spent => &self.tokens[..1],
            State::Live | State::Replaced => &self.tokens,
        }
    }

    /// The tokens masked as this login's: what it holds, less an access token gone, whatever
    /// the state (a login of one token, its kind unknown, is masked whole). Masked while
    /// live only, an access token past its end came and went as the file flipped between
    /// this login and another, and each flip built a redactor (review rev45a, 2).
    fn masked(&self) -> impl Iterator<Item = &String> {
        let access = !self.access_gone || self.held().len() < 2;
        self.held().iter().enumerate().filter(move |(at, _)| *at > 0 || access).map(|(_, token)| token)
    }
}

impl Logins {
    /// Keeps the tokens of `tokens` (a login's access and refresh token) of a real token's
    /// shape in mind, if there is room, as the live login: every other login is replaced.
    /// `expires_at` and `refresh_expires_at` are what the file says; none shortens what
    /// was read before. Whether it was a login not known before (kept or not).
    fn learn(&mut self, tokens: &[String], expires_at: Option<Millis>, refresh_expires_at: Option<Millis>, now: Millis) -> bool {
        self.forget_dead(now);
        self.clock = self.clock.max(now);
        let tokens: Vec<String> = tokens.iter().filter(|token| plausible(token)).cloned().collect();
        if tokens.is_empty() {
            return false;
        }
        let mut new = false;
        let at = match self.logins.iter().position(|known| known.tokens == tokens) {
            Some(at) => {
                let known = &mut self.logins[at];
                known.expires_at = known.expires_at.max(expires_at.unwrap_or(0));
                known.said_expires = known.said_expires.max(expires_at.unwrap_or(0));
                known.refresh_ends = known.refresh_ends.max(refresh_expires_at.unwrap_or(0));
                at
            }
            None if self.unkept.as_ref() == Some(&tokens) => return false,
            None => {
                self.first_reads += 1;
                new = true;
                // A new access token beside a login's refresh token, with a later expiry:
                // a refresh that kept its refresh token (RFC 6749 6 lets the server keep
                // it, and Claude then keeps the old one), not a splice (review rev42, 1).
                let refreshed = match tokens.as_slice() {
                    [access, refresh] => self.logins.iter().position(|known| {
                        matches!(known.held(), [old, kept] if kept == refresh && old != access)
                            && !known.mixed
                            && expires_at.is_some_and(|end| end > known.said_expires)
                    }),
                    _ => None,
                };
                let mixed = self.logins.iter().enumerate().any(|(at, known)| {
                    known.held().iter().any(|token| tokens.contains(token) && !(Some(at) == refreshed && *token == tokens[1]))
                });
                if mixed {
                    self.mixed += 1;
                    warn!("Claude's credentials file holds a login sharing a token with one read before (Claude's refresh replaces both): something wrote it; the jobs running now are withheld");
                }
                let held: usize = self.logins.iter().flat_map(|known| &known.tokens).map(String::len).sum();
                let bytes: usize = tokens.iter().map(String::len).sum();
                if self.logins.len() >= REMEMBERED || held + bytes > REMEMBERED_BYTES {
                    if !self.overflowed {
                        warn!(remembered = REMEMBERED, remembered_bytes = REMEMBERED_BYTES, "Claude's credentials file has held more logins than the agent keeps in mind, none of them past its refresh token's end (Claude's refreshes and relayed logins within a refresh token's life, or a job writing logins into it): every job's output is withheld from now until the agent restarts. {OVERFLOWED}");
                    }
                    self.overflowed = true;
                    self.unkept = Some(tokens);
                    return true;
                }
                let said_expires = expires_at.unwrap_or(0);
                let expires_at = said_expires.max(now.saturating_add(ACCESS_LIFETIME_MS));
                // The file's end only lengthens it: a job can write a login first with an end of
                // its choosing, as with `expiresAt`.
                let mut refresh_ends = refresh_expires_at.unwrap_or(0).max(now.saturating_add(REFRESH_LIFETIME_MS));
                if let Some(at) = refreshed.filter(|_| !mixed) {
                    // The refresh token moves to the new login, with what was known of its
                    // end; the old access token stays, alone, until its own end.
                    let old = &mut self.logins[at];
                    refresh_ends = refresh_ends.max(old.refresh_ends);
                    old.state = State::Spent;
                }
                self.logins.push(Known { tokens, state: State::Live, expires_at, said_expires, refresh_ends, mixed, access_gone: false });
                self.logins.len() - 1
            }
        };
        // The file holds it: the live login. The others are kept until their ends, whatever
        // wrote it (a job may have left it, its copy of the one before kept).
        for (n, known) in self.logins.iter_mut().enumerate() {
            known.state = match known.state {
                _ if n == at => State::Live,
                State::Live => State::Replaced,
                other => other,
            };
        }
        new
    }

    /// Lets go of the logins that are dead ([`Known::dead`]), and of the access tokens past
    /// their end, but the live login's.
    fn forget_dead(&mut self, now: Millis) {
        self.logins.retain(|known| !known.dead(now));
        // Once gone, gone: a reader's clock may be behind another's, and a login gone and
        // live again (the file flipped back to it) keeps what is masked as it was
        // ([`Known::masked`]: each change built a redactor, review rev45a, 2). Never the live
        // login's, though: one look with the clock stepped ahead (a bad NTP step, `date -s`)
        // let go for good an access token valid for hours once the clock was back (review
        // rev45c, 3), and its encoded forms went out unmasked. The file holds it: it is in
        // use, and masking it costs nothing to the set (it changes once, as it is replaced).
        for known in self.logins.iter_mut().filter(|known| known.state != State::Live) {
            known.access_gone |= known.access_past(now);
        }
    }

    /// Every token masked ([`Known::masked`]), in the order first read.
    fn tokens(&self) -> impl Iterator<Item = &String> {
        self.logins.iter().flat_map(Known::masked)
    }

    /// Whether `token` is one of a login remembered, masked or not.
    fn knows(&self, token: &str) -> bool {
        self.logins.iter().any(|known| known.tokens.iter().any(|held| held == token))
    }
}

/// Never the tokens, even in a debug print.
impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins").field("logins", &self.logins.len()).field("first_reads", &self.first_reads).field("overflowed", &self.overflowed).finish()
    }
}

/// A job's watch on the login memory, from before its checkout to its end: the job's run
/// is tampering when it brought more than [`NEW_PER_JOB`] logins the agent had not read, a
/// login sharing a token with one read before, or the memory overflowed
/// ([`JobWatch::tampering`]). Dropped, the file is read again, so what the job's Claude
/// refreshed is taken as the live login.
pub struct JobWatch {
    login: Login,
    first_reads: u64,
    mixed: u64,
    /// [`Logins::clock`] and [`Logins::relayed`] when the watch began.
    started: Millis,
    relayed: u64,
}

impl Login {
    /// Watches the login memory for the job that holds the watch ([`JobWatch`]).
    pub fn watch_job(&self) -> JobWatch {
        let logins = self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        JobWatch { login: self.clone(), first_reads: logins.first_reads, mixed: logins.mixed, started: logins.clock, relayed: logins.relayed }
    }

    /// A relayed login (`claude auth login`) made a new login: it counts against no job's
    /// run ([`JobWatch::tampering`]). The logins before it are replaced as any are.
    pub fn relayed_login(&self) {
        self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).relayed += 1;
    }
}

impl JobWatch {
    /// Why the job's output must be withheld, if it must: the words its result carries.
    pub fn tampering(&self) -> Option<String> {
        let logins = self.login.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let relayed = logins.relayed - self.relayed;
        let new = (logins.first_reads - self.first_reads).saturating_sub(relayed);
        let mixed = logins.mixed > self.mixed;
        // Claude refreshes once per access token's life: a long job brings more.
        let allowed = NEW_PER_JOB + logins.clock.saturating_sub(self.started) / ACCESS_LIFETIME_MS;
        if logins.overflowed && new <= allowed && !mixed {
            // Nothing says this job wrote a login: the memory may have filled with Claude's
            // refreshes and relayed logins as well as with a job's.
            return Some(format!(
                "withheld: the agent's memory of Claude's logins is full ({REMEMBERED} logins or {REMEMBERED_BYTES} bytes of their tokens read since it started, none past its refresh token's end: Claude's refreshes and relayed logins within a refresh token's life, or a job writing logins into ~/.claude), so a live login might not be masked; this job's output, diff and push are withheld, as every job's is until the agent restarts: {OVERFLOWED}; then send the job again"
            ));
        }
        let why = if mixed {
            "a login sharing a token with one read before (Claude's refresh replaces both)".to_string()
        } else if new > allowed || logins.overflowed {
            format!("{new} logins the agent had not read before (a refresh by Claude makes one)")
        } else {
            return None;
        };
        let overflow = if logins.overflowed { format!(" The agent's memory of logins is full: every job is withheld until the agent restarts; {OVERFLOWED}.") } else { String::new() };
        Some(format!(
            "withheld: while this job ran Claude's credentials file held {why}: something the job ran wrote logins of its own into it, which is how a job gets a live login out past the redactor; its output, its events from then on, its diff and its push are withheld; run it again without writing to ~/.claude, and check the login still works.{overflow}"
        ))
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        // The job's processes are gone: the file, read now, may hold the login a refresh
        // in it made, replacing the one before.
        self.login.read_cached(crate::now_ms());
    }
}

/// How long a file must have stood unchanged before a reading of it is reused on the word
/// of its times: a file system stamps times from a clock that ticks every few milliseconds,
/// so a file rewritten in place (same inode, same size: rotated tokens have the same
/// length) within the tick of its last change would look unchanged. A file changed within
/// this long of a look is read again at every look.
const SETTLED: Duration = Duration::from_secs(1);

/// A file as `stat` sees it: which file it is (through any link), its size, and when its
/// content and its inode last changed. Any write, rename over it or replacement changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path, meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether `meta` is of the file this stamp is of, unchanged (no copy of the path made:
    /// asked with each line of a job's output, [`Login::changed`]).
    fn is(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        (self.dev, self.ino, self.len, self.mtime, self.ctime) == (meta.dev(), meta.ino(), meta.len(), (meta.mtime(), meta.mtime_nsec()), (meta.ctime(), meta.ctime_nsec()))
    }

    /// Whether any change of the file from `looked` on (the wall clock just before the
    /// `stat`) must change its stamp: it last changed more than [`SETTLED`] before, or its
    /// `ctime` (which only the kernel sets, to its clock) is more than [`SETTLED`] after:
    /// the clock was stepped back since, and a change now stamps an earlier one. Without
    /// that, a clock stepped back had the file read again at every look, each line of a
    /// job's output, until the clock caught up with the file's times (review rev42, 5). An
    /// `mtime` that far ahead (`touch -d`, a copy kept from a machine whose clock ran
    /// ahead) is nothing to wait out either: a change now moves the `ctime`.
    fn settled(&self, looked: std::time::SystemTime) -> bool {
        let Ok(looked) = looked.duration_since(std::time::UNIX_EPOCH) else { return false };
        let at = |time: Duration| (time.as_secs() as i64, time.subsec_nanos() as i64);
        let (before, ahead) = (at(looked.saturating_sub(SETTLED)), at(looked.saturating_add(SETTLED)));
        if self.ctime > ahead {
            return true;
        }
        let changed = if self.mtime > ahead { self.ctime } else { self.mtime.max(self.ctime) };
        changed < before
    }
}

/// What a redactor was built after ([`Login::redactor_looked`]): the count of logins met
/// ([`Login::learnt`]) and the credentials file as `stat` saw it (`None`: not there).
pub struct Looked {
    learnt: u64,
    file: Option<FileStamp>,
    settled: bool,
}

/// What was read, with the tokens (kept on this machine, for redaction only).
#[derive(Clone)]
pub struct Reading {
    pub report: OAuthReport,
    pub tokens: Vec<String>,
    /// The file's login as read (its tokens whole, and its `expiresAt`), for the memory.
    login: Option<(Vec<String>, Option<Millis>, Option<Millis>)>,
}

/// Never the tokens, even in a debug print.
impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reading").field("report", &self.report).field("tokens", &self.tokens.len()).finish()
    }
}

impl Login {
    pub fn new(config_dir: Option<&Path>) -> Login {
        Login::from_variables(config_dir, |name| std::env::var(name).ok())
    }

    /// [`Login::new`], the variables read from `var`. A token set with surrounding
    /// whitespace (a space or newline an env file or a secret mount keeps) reaches Claude
    /// trimmed, as every setting is read; a blank one is unset.
    fn from_variables(config_dir: Option<&Path>, var: impl Fn(&str) -> Option<String>) -> Login {
        let dir = config_dir.map(Path::to_path_buf).unwrap_or_else(|| crate::config::home().join(".claude"));
        let token = |name: &str| var(name).as_deref().and_then(shared::setting::value).map(String::from);
        Login {
            credentials_path: dir.join(".credentials.json"),
            config_dir: dir,
            oauth_token_env: token("CLAUDE_CODE_OAUTH_TOKEN"),
            api_key_env: token("ANTHROPIC_API_KEY"),
            other_secrets: Vec::new(),
            redactors: RedactorCache::default(),
            readings: ReadingCache::default(),
            remembered: Remembered::default(),
            learnt: Learnt::default(),
        }
    }

    /// The same login, with more secrets for its redactor.
    pub fn with_secrets<'a>(mut self, secrets: impl IntoIterator<Item = &'a str>) -> Login {
        self.other_secrets.extend(secrets.into_iter().map(String::from));
        self
    }

    /// The login as of now. The credentials file is looked at (`stat`) each time, and read
    /// and parsed again only when it changed since the last reading (or changed within
    /// [`SETTLED`] of it): Claude may rotate the tokens at any moment.
    ///
    /// While the token needs a refresh and another process has held the refresh lock for
    /// [`LOCK_WAIT`] of it, the report's problem names that process (see [`lock_stall`]).
    pub fn read(&self, now: Millis) -> Reading {
        let mut reading = self.read_cached(now);
        if reading.report.problem.is_none() {
            if let Some(stall) = self.refresh_stall(&reading.report, now) {
                reading.report.problem = Some(self.told(&stall, &reading.tokens));
            }
        }
        reading
    }

    /// What [`Login::read`] says of the refresh lock: something only when the token has
    /// needed a refresh for [`LOCK_WAIT`] or longer and a process other than this one holds
    /// the lock now (a refresh takes seconds; this process's own refresher is its job's
    /// business). Read from the kernel, so the agent, `doctor` and `oauth-status` all see it.
    fn refresh_stall(&self, report: &OAuthReport, now: Millis) -> Option<String> {
        if !needs_refresh(report, now) {
            return None;
        }
        let stale_for = now.checked_sub(report.expires_at?.saturating_sub(NEAR_EXPIRY_MS))?;
        if stale_for < LOCK_WAIT.as_millis() as Millis {
            return None;
        }
        let path = self.config_dir.join(REFRESH_LOCK);
        let pid = lock_holder(&path)?;
        (pid != std::process::id()).then(|| lock_stall(&path, Some(pid), &format!("while the token has needed a refresh for {} s", stale_for / 1000)))
    }

    /// The login as of now, without a look at the refresh lock.
    fn read_cached(&self, now: Millis) -> Reading {
        let looked = std::time::SystemTime::now();
        let stamp = match std::fs::metadata(&self.credentials_path) {
            Ok(meta) => FileStamp::of(&self.credentials_path, &meta),
            // No file: the login is the variables' (nothing to open).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.read_file(now, false),
            // None to see: `read_file` says why.
            Err(_) => return self.read_file(now, true),
        };
        let mut cache = self.readings.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let reading = match cache.as_ref() {
            Some((seen, reading)) if *seen == stamp && stamp.settled(looked) => {
                let mut reading = reading.clone();
                reading.report.reported_at = now;
                reading
            }
            _ => {
                let reading = self.read_file(now, true);
                *cache = Some((stamp, reading.clone()));
                reading
            }
        };
        drop(cache);
        // Learnt at every reading, the file unchanged too: the login it holds is the live
        // one, the others replaced ([`Logins::learn`]).
        if let Some((tokens, expires_at, refresh_expires_at)) = &reading.login {
            let new = self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).learn(tokens, *expires_at, *refresh_expires_at, now);
            if new {
                // After the memory took it: a reader that sees the count move builds a
                // redactor that masks it.
                self.learnt.fetch_add(1, Ordering::SeqCst);
            }
        }
        reading
    }

    /// Reads and parses the credentials file (when `exists`, else it is taken as absent),
    /// and the login's variables.
    fn read_file(&self, now: Millis, exists: bool) -> Reading {
        let mut report = OAuthReport::unconfigured(now);
        let mut tokens: Vec<String> = self.oauth_token_env.iter().chain(&self.api_key_env).cloned().collect();
        let file = &self.credentials_path;
        let read = if exists { credentials_bytes(file) } else { Err(std::io::ErrorKind::NotFound.into()) };
        match read {
            Ok(bytes) => match credentials::parse(&bytes) {
                Ok(login) => {
                    report.source = OAuthSource::CredentialsFile;
                    report.expires_at = login.expires_at;
                    report.refreshable = login.refresh_token.is_some();
                    report.refresh_expires_at = login.refresh_expires_at;
                    report.subscription_type = login.subscription_type;
                    let read: Vec<String> = std::iter::once(login.access_token).chain(login.refresh_token).collect();
                    tokens.extend(read.iter().map(|token| shared::text::truncate(token, CURRENT_TOKEN_BYTES).to_string()));
                    // Only tokens of a real one's shape are kept: no copy of a huge one.
                    let read = read.into_iter().filter(|token| plausible(token)).collect();
                    return Reading { report, tokens, login: Some((read, login.expires_at, login.refresh_expires_at)) };
                }
                Err(e) => report.problem = Some(format!("{}: {e}", file.display())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The error names the file (`files::open_named` and the read below).
            Err(e) => report.problem = Some(format!("cannot read Claude's credentials: {e}")),
        }
        if self.oauth_token_env.is_some() {
            report.source = OAuthSource::OauthTokenEnv;
        } else if self.api_key_env.is_some() {
            report.source = OAuthSource::ApiKey;
        }
        report.problem = report.problem.map(|problem| self.told(&problem, &tokens));
        Reading { report, tokens, login: None }
    }

    /// A problem as the report carries it, the one way every report (each heartbeat and
    /// hello, `oauth-status`, doctor) gets it: redacted (the problem names the folder, which
    /// is the machine's own), on one line, and at most [`shared::oauth::MAX_PROBLEM_BYTES`]
    /// (a hello over what the edge reads of one is refused at every connection).
    fn told(&self, problem: &str, tokens: &[String]) -> String {
        let redacted = self.redactor_of(self.secrets(tokens)).redact(problem);
        shared::text::truncate(&shared::text::one_line(&redacted), shared::oauth::MAX_PROBLEM_BYTES).to_string()
    }

    /// How Claude logs in, as environment variables: the token variable the agent read,
    /// only when that is the login in use (with a credentials file Claude needs none, and
    /// gets none).
    pub fn claude_env(&self, now: Millis) -> Vec<(&'static str, String)> {
        match self.read(now).report.source {
            OAuthSource::OauthTokenEnv => self.oauth_token_env.iter().map(|t| ("CLAUDE_CODE_OAUTH_TOKEN", t.clone())).collect(),
            OAuthSource::ApiKey => self.api_key_env.iter().map(|k| ("ANTHROPIC_API_KEY", k.clone())).collect(),
            OAuthSource::CredentialsFile | OAuthSource::None => Vec::new(),
        }
    }

    /// A redactor for the secrets on this machine: the last one built while they are the
    /// same. The credentials file is looked at each time (Claude may have rotated the
    /// tokens), and every login it has held is masked, not only the one it holds now.
    pub fn redactor(&self, now: Millis) -> Arc<Redactor> {
        let read = self.read(now);
        self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).forget_dead(now);
        self.redactor_of(self.secrets(&read.tokens))
    }

    /// [`Login::redactor`], and what it was built after: for [`Login::changed`].
    pub fn redactor_looked(&self, now: Millis) -> (Arc<Redactor>, Looked) {
        // Taken before the reading: a login met or a change made after it shows at the next
        // look, never one before it missed.
        let learnt = self.learnt.load(Ordering::SeqCst);
        let looked = std::time::SystemTime::now();
        let file = std::fs::metadata(&self.credentials_path).ok().map(|meta| FileStamp::of(&self.credentials_path, &meta));
        let settled = file.as_ref().is_none_or(|file| file.settled(looked));
        (self.redactor(now), Looked { learnt, file, settled })
    }

    /// Whether a redactor built after `looked` may miss a login: one not known before was
    /// met since (by any reader: the agent's look every second, another job), or the
    /// credentials file changed (or had changed within [`SETTLED`] of that look, when a
    /// change need not show in its times). An atomic load and a `stat`, cheap enough for
    /// every line of a job's output (BENCHMARKS.md, "Redaction throughput"): a job that
    /// makes a new login appear (a refresh it forces) and prints the file at once finds it
    /// masked in its next line, not up to seconds later (hostile review rev40a, 1).
    pub fn changed(&self, looked: &Looked) -> bool {
        if self.learnt.load(Ordering::SeqCst) != looked.learnt || !looked.settled {
            return true;
        }
        match (std::fs::metadata(&self.credentials_path), &looked.file) {
            (Ok(meta), Some(file)) => !file.is(&meta),
            (Err(_), None) => false,
            _ => true,
        }
    }

    /// The secrets to mask, once each, in an order that changes only when one is learnt or
    /// forgotten (so a redactor is built once per set), as the two layers of [`Redactors`]:
    /// the base (the token variables, the logins remembered, the machine's other secrets),
    /// and what `read` holds besides that no login remembered holds (a login not kept:
    /// [`Logins`]; a known access token past its end is not masked for being in the file,
    /// or the set would change as the file flips: review rev45a, 2).
    fn secrets(&self, read: &[String]) -> (Vec<String>, Vec<String>) {
        let remembered = self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let variables = self.oauth_token_env.iter().chain(&self.api_key_env);
        let mut base: Vec<String> = Vec::new();
        for secret in variables.chain(remembered.tokens()).chain(&self.other_secrets) {
            if !base.contains(secret) {
                base.push(secret.clone());
            }
        }
        let mut unknown: Vec<String> = Vec::new();
        for secret in read.iter().filter(|token| !remembered.knows(token)) {
            if !base.contains(secret) && !unknown.contains(secret) {
                unknown.push(secret.clone());
            }
        }
        (base, unknown)
    }

    /// A redactor of `base` and `unknown` ([`Login::secrets`]): one of the last built
    /// ([`REDACTORS_KEPT`]) if it was of the same, else one on the base layer kept while
    /// `base` is the same ([`Redactors`]).
    fn redactor_of(&self, (base, unknown): (Vec<String>, Vec<String>)) -> Arc<Redactor> {
        // A poisoned lock only means a panic elsewhere mid-swap: the cache is rebuilt.
        let mut cache = self.redactors.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let cache = &mut *cache;
        let layer = match &cache.base {
            Some((built_from, layer)) if *built_from == base => layer.clone(),
            _ => {
                // Let go of the old ones first: two bases' tables are never held at once here.
                cache.built.clear();
                cache.base = None;
                let layer = Arc::new(Layer::new(base.iter().cloned()));
                cache.base = Some((base, layer.clone()));
                layer
            }
        };
        let kept = cache.built.iter().position(|(built_with, _)| *built_with == unknown).and_then(|at| cache.built.remove(at));
        let (unknown, redactor) = kept.unwrap_or_else(|| {
            let redactor = Arc::new(Redactor::layered(&layer, unknown.iter().cloned()));
            (unknown, redactor)
        });
        cache.built.push_front((unknown, redactor.clone()));
        cache.built.truncate(REDACTORS_KEPT);
        redactor
    }
}

/// Whether starting Claude now would make it refresh the token.
pub fn needs_refresh(report: &OAuthReport, now: Millis) -> bool {
    report.source == OAuthSource::CredentialsFile
        && report.refreshable
        && report.expires_at.is_some_and(|t| t <= now + NEAR_EXPIRY_MS)
}

/// The file in Claude's config folder whose lock (`flock`) the refresher holds. Every
/// process that lets Claude run on this login takes the gate, and so this lock: the
/// agent's jobs, `doctor --canary`, the relay's `claude auth login`, another agent (or
/// `up`) whose Claude shares the folder. Made owner-only, never through a link, never
/// removed (a lock file removed while held lets two holders in).
pub const REFRESH_LOCK: &str = ".claude-runner-refresh.lock";

/// How long a job, the canary or a relayed login waits on a refresh lock another process
/// holds before it fails, naming the holder. A refresh takes Claude seconds; the lock held
/// longer while the token stays stale is a process that will not refresh (a job's leftover
/// or a cron line holding it, a Claude whose refresh hangs), and without a bound every job
/// on the login waited for its whole deadline and ended timed out, saying nothing.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// The process holding the `flock` on `path` (from `/proc/locks`), if the kernel says.
/// `/proc/locks` names a lock's file by device and inode; the device as `stat` gives it
/// differs on some file systems (overlayfs), so a lock on the same inode is taken as this
/// file's when the device matches or the holder has this file open.
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    let dev = meta.dev();
    let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    let exact = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let inode = format!(":{}", meta.ino());
    // Read as DATA_DIR's lock is: in whole passes, agreeing on this inode's lines (a line
    // goes unseen between two passes when another lock is let go).
    let locks = crate::drain::proc_locks(|line| line.contains(&format!("{inode} ")))?;
    // A waiter's line is not a holder's.
    let holders = locks
        .lines()
        .filter_map(crate::drain::Line::of)
        .filter(|line| !line.waits && line.kind == "FLOCK" && line.file.ends_with(&inode))
        .filter_map(|line| Some((line.pid?, line.file == exact)));
    let has_open = |pid: u32| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
        fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
    };
    let mut candidates: Vec<(u32, bool)> = holders.collect();
    candidates.sort_by_key(|(_, exact)| !exact);
    candidates.into_iter().find(|(pid, exact)| *exact || has_open(*pid)).map(|(pid, _)| pid)
}

/// A process's command line as `/proc` has it, its arguments escaped (a job can name a
/// process anything, control characters too) and cut short; `?` when it cannot be read.
fn command_line(pid: u32) -> String {
    let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return "?".into() };
    let words: Vec<String> =
        bytes.split(|b| *b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).escape_debug().to_string()).collect();
    let line = if words.is_empty() { "?".to_string() } else { words.join(" ") };
    // Short: the login's problem is at most 300 bytes, and must keep what to do.
    shared::text::truncate(&line, 60).to_string()
}

/// What is said (the login's problem, the failed job's error, the log) of a refresh lock
/// held too long: by whom, and what to do. `how_long` says for how long, as the speaker
/// knows it.
fn lock_stall(path: &Path, holder: Option<u32>, how_long: &str) -> String {
    let (who, end) = match holder {
        Some(pid) => (format!("pid {pid} ({})", command_line(pid)), format!("end it (`kill {pid}`)")),
        None => ("another process".to_string(), format!("find it (`fuser -v {}`) and end it", path.display())),
    };
    format!(
        "the refresh lock {} is held by {who} {how_long}: no Claude on this login starts until it lets go; unless it is a claude-runner or Claude refreshing it, {end}",
        path.display()
    )
}

/// Lets one Claude through while the token needs a refresh: one of this process's jobs,
/// and one process of all those on the same config folder ([`REFRESH_LOCK`]). The lock
/// is tried, never waited on (the agent's runtime has one thread): the others look again
/// every half second, or at once when a refresher of this process lets go.
///
/// A lock another process holds is waited on for at most [`LOCK_WAIT`]; then the one
/// waiting fails, naming the holder. It does not go ahead as the refresher even when the
/// holder looks like neither claude-runner nor Claude: a command line proves nothing (an
/// agent of another release, a wrapper script, an operator's `flock` holding refreshes
/// back on purpose), and two refreshes at once can destroy the login, while a failed job
/// only asks to be sent again.
#[derive(Clone)]
pub struct RefreshGate {
    /// This process's refresher: one at a time, whatever becomes of the lock.
    refreshing: Arc<AtomicBool>,
    released: Arc<Notify>,
    /// [`LOCK_WAIT`], shorter in tests.
    lock_wait: Duration,
    /// The holder last warned of: one warning per holder, not one per job.
    warned: Arc<std::sync::Mutex<Option<Option<u32>>>>,
}

impl Default for RefreshGate {
    fn default() -> RefreshGate {
        RefreshGate { refreshing: Arc::default(), released: Arc::default(), lock_wait: LOCK_WAIT, warned: Arc::default() }
    }
}

/// Held by the one allowed to refresh; dropping it lets the others re-check.
pub struct Refresher {
    gate: RefreshGate,
    /// The lock on [`REFRESH_LOCK`]; `None` when the file could not be used (the gate is
    /// then this process's alone, as its log said).
    lock: Option<std::fs::File>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        // Closing the file lets the lock go.
        drop(self.lock.take());
        self.gate.refreshing.store(false, Ordering::SeqCst);
        self.gate.released.notify_waiters();
    }
}

/// What one look at the gate found.
enum Look {
    /// No refresh is needed: go.
    Free,
    /// This one lets Claude refresh.
    Refresher(Refresher),
    /// Another refreshes (`elsewhere`: another process holds the lock): wait.
    Busy { elsewhere: bool },
}

impl RefreshGate {
    /// A gate that waits `lock_wait` on a lock another process holds.
    #[cfg(test)]
    fn with_lock_wait(lock_wait: Duration) -> RefreshGate {
        RefreshGate { lock_wait, ..RefreshGate::default() }
    }

    fn look(&self, login: &Login, who: &str) -> Look {
        if !needs_refresh(&login.read(crate::now_ms()).report, crate::now_ms()) {
            return Look::Free;
        }
        if self.refreshing.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Look::Busy { elsewhere: false };
        }
        let path = login.config_dir.join(REFRESH_LOCK);
        match runtime::hold_lock(&path) {
            Ok(Some(lock)) => Look::Refresher(Refresher { gate: self.clone(), lock: Some(lock) }),
            Ok(None) => {
                self.refreshing.store(false, Ordering::SeqCst);
                Look::Busy { elsewhere: true }
            }
            // Claude writes its refreshed login into this folder: a lock file that cannot
            // be made there is a link or a folder put in its place (a job's doing?).
            Err(e) => {
                warn!(who, error = %e, "Claude's login needs a refresh and the refresh lock cannot be used: only this process's jobs are kept from refreshing at once; remove what is in its place");
                Look::Refresher(Refresher { gate: self.clone(), lock: None })
            }
        }
    }

    /// Waits until `who` (a job, the canary, a relayed login) may let Claude run. Returns
    /// a guard when it is the refresher; an error naming the holder (redacted, on one line)
    /// when another process held the refresh lock for the gate's bound ([`LOCK_WAIT`]).
    pub async fn admit(&self, login: &Login, who: &str) -> Result<Option<Refresher>, String> {
        let mut told = false;
        // Since when another process has held the lock, as this one saw it.
        let mut held_since: Option<std::time::Instant> = None;
        loop {
            match self.look(login, who) {
                Look::Free => return Ok(None),
                Look::Refresher(refresher) => {
                    // A holder that comes later is warned of again.
                    *self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                    return Ok(Some(refresher));
                }
                Look::Busy { elsewhere: true } => {
                    let since = *held_since.get_or_insert_with(std::time::Instant::now);
                    let path = login.config_dir.join(REFRESH_LOCK);
                    if !told {
                        told = true;
                        info!(who, lock = %path.display(), "another process lets a Claude refresh this login (doctor --canary, another agent on the same config folder?): waiting until the token is fresh or it lets go");
                    }
                    if since.elapsed() >= self.lock_wait {
                        let holder = lock_holder(&path);
                        let stall = lock_stall(&path, holder, &format!("for at least {} s", since.elapsed().as_secs()));
                        let stall = login.told(&stall, &login.read(crate::now_ms()).tokens);
                        let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        if *warned != Some(holder) {
                            *warned = Some(holder);
                            warn!(who, problem = %stall, "a process holds the refresh lock and does not refresh: jobs on this login fail until it lets go");
                        }
                        return Err(stall);
                    }
                }
                Look::Busy { elsewhere: false } => held_since = None,
            }
            // Re-read the file every half second: the refresher's Claude writes the fresh
            // token there, which frees everyone at once.
            let _ = tokio::time::timeout(Duration::from_millis(500), self.released.notified()).await;
        }
    }
}

/// The bytes of the credentials file at `path`, up to one past [`credentials::MAX_BYTES`]
/// (enough to know it is too large). A job runs as the agent's user and can put anything
/// there: it is opened without waiting (an open of a pipe waits for a writer for ever, and
/// the login is read on the agent's runtime thread), through a link (Claude's own file may
/// be one), and read only if it is a plain file (not a pipe, a device such as
/// `/dev/zero`, a folder).
pub fn credentials_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let next_step = "a pipe, a device or a folder put in its place? Put Claude's credentials file back, `claude auth login`";
    let file = crate::files::open_named(path, "Claude credentials file", next_step)?;
    let mut bytes = Vec::new();
    file.take(credentials::MAX_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_with(dir: &Path, body: &str) -> Login {
        std::fs::write(dir.join(".credentials.json"), body).unwrap();
        Login { config_dir: dir.to_path_buf(), credentials_path: dir.join(".credentials.json"), oauth_token_env: None, api_key_env: None, other_secrets: Vec::new(), redactors: RedactorCache::default(), readings: ReadingCache::default(), remembered: Remembered::default(), learnt: Learnt::default() }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cr-oauth-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_machines_other_secrets_are_redacted_too() {
        let d = tempdir("other");
        let login = login_with(&d, "{}").with_secrets(["ghp_repository_token_123"]);
        assert_eq!(login.redactor(0).redact("push with ghp_repository_token_123"), "push with [REDACTED]");
    }


    #[test]
    fn the_redactor_is_built_again_only_when_the_tokens_change() {
        let d = tempdir("rotate");
        let file = |access: &str| format!(r#"{{"claudeAiOauth":{{"accessToken":"{access}","refreshToken":"sk-ant-ort01-refresh-000000","expiresAt":1}}}}"#);
        let login = login_with(&d, &file("Q7w2E9r4T1y6U3i8O5p0"));
        let first = login.redactor(0);
        assert!(Arc::ptr_eq(&first, &login.clone().redactor(0)), "same tokens, same redactor (shared by clones)");
        // Claude rotated the access token: the new one is masked, and so is no stale one.
        std::fs::write(&login.credentials_path, file("mZxNcBvLaKsJdHfGq0w9")).unwrap();
        let second = login.redactor(0);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.redact("a mZxNcBvLaKsJdHfGq0w9 b"), "a [REDACTED] b");
        assert_eq!(first.redact("a mZxNcBvLaKsJdHfGq0w9 b"), "a mZxNcBvLaKsJdHfGq0w9 b");
    }
    /// The file is read again whenever it changed — rewritten in place at the same size
    /// within the file system's clock tick too — and only then.
    #[test]
    fn the_credentials_file_is_read_again_only_when_it_changed() {
        let d = tempdir("stamp");
        let file = |access: &str| format!(r#"{{"claudeAiOauth":{{"accessToken":"{access}","expiresAt":1}}}}"#);
        let login = login_with(&d, &file("first-token-00001"));
        let path = login.credentials_path.clone();
        let token = |login: &Login| login.read(7).tokens;
        assert_eq!(token(&login), ["first-token-00001"]);
        // Rewritten in place, same size, at once: seen.
        std::fs::write(&path, file("second-token-0002")).unwrap();
        assert_eq!(token(&login.clone()), ["second-token-0002"]);
        // A settled file is not read again: what it says comes from the last reading
        // (made visible here by changing that reading behind the file's back).
        std::thread::sleep(SETTLED + Duration::from_millis(100));
        login.readings.lock().unwrap().as_mut().unwrap().1.tokens = vec!["cached".into()];
        assert_eq!(token(&login), ["cached"]);
        // Replaced (a new inode, as an atomic rename makes): seen at the next look.
        let tmp = d.join("tmp.json");
        std::fs::write(&tmp, file("third-token-00003")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(token(&login), ["third-token-00003"]);
        assert_eq!(login.read(9).report.reported_at, 9, "the report is of now");
        // Gone: no token from the file any more.
        std::fs::remove_file(&path).unwrap();
        assert!(token(&login).is_empty());
    }

    /// A reader holding a redactor (a job's run, for each line of its output) is told the
    /// login may have changed at its next look, not seconds later (hostile review rev40a,
    /// 1): when another reader met a login not known before (the agent's look every second,
    /// another job), when the file changed, and while it changed too lately for its times
    /// to show a change; not while it stands settled and nothing was met.
    #[test]
    fn a_reader_holding_a_redactor_is_told_at_once_that_the_login_may_have_changed() {
        let d = tempdir("changed");
        let far = 4_102_444_800_000;
        let login = login_with(&d, &credentials(&token("access"), &token("refresh"), far));
        let path = login.credentials_path.clone();
        login.redactor(0); // the agent's first reading
        std::thread::sleep(SETTLED + Duration::from_millis(100));
        let (held, looked) = login.redactor_looked(1);
        assert!(!login.changed(&looked), "nothing changed");
        // Another reader (here a clone, as the agent's look is) meets a new login.
        let (access2, refresh2) = (token("access2"), token("refresh2"));
        std::fs::write(&path, credentials(&access2, &refresh2, far)).unwrap();
        login.clone().redactor(2);
        std::fs::write(&path, credentials(&token("access"), &token("refresh"), far)).unwrap();
        assert!(login.changed(&looked), "a login met by another reader is not news");
        let (again, looked) = login.redactor_looked(3);
        assert!(masks(&again, &access2) && !masks(&held, &access2));
        // Changed within the tick: looked at again until it has settled.
        assert!(login.changed(&looked), "a file changed within SETTLED is taken as standing");
        std::thread::sleep(SETTLED + Duration::from_millis(100));
        let (_, looked) = login.redactor_looked(4);
        assert!(!login.changed(&looked));
        // The file changes (nobody has read it): a `stat` says so.
        std::fs::write(&path, credentials(&token("access3"), &token("refresh3"), far)).unwrap();
        assert!(login.changed(&looked), "a changed file is not news");
        let (_, looked) = login.redactor_looked(5);
        std::fs::remove_file(&path).unwrap();
        assert!(login.changed(&looked), "a file gone is not news");
    }

    /// rev42-5: with the wall clock stepped back (NTP, a restored VM) the credentials
    /// file's times lie ahead of it: the file was taken as changed too lately to trust its
    /// times, and read again at every look (each line of a job's output, `Login::changed`,
    /// and each reading) until the clock caught up. A `ctime` far ahead means any change
    /// from now on stamps an earlier one: settled at once. So is an `mtime` far ahead set
    /// by hand once its `ctime` has settled. Within [`SETTLED`] of the clock, either side,
    /// it is read again.
    #[test]
    fn a_clock_stepped_back_does_not_have_the_file_read_at_every_look() {
        let d = tempdir("stepped-back");
        let path = d.join("file");
        std::fs::write(&path, "x").unwrap();
        let stamp = |path: &Path| FileStamp::of(path, &std::fs::metadata(path).unwrap());
        let changed = |stamp: &FileStamp| std::time::UNIX_EPOCH + Duration::new(stamp.ctime.0 as u64, stamp.ctime.1 as u32);
        let now = stamp(&path);
        assert!(!now.settled(changed(&now)), "a file changed at the look is settled");
        assert!(!now.settled(changed(&now) - SETTLED / 2), "a file changed just ahead of the clock is settled");
        assert!(now.settled(changed(&now) + 2 * SETTLED));
        assert!(now.settled(changed(&now) - Duration::from_secs(3_600)), "with the clock stepped back an hour the file is read at every look");
        // `touch -d` a day ahead: the ctime is now.
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(std::time::SystemTime::now() + Duration::from_secs(86_400)).unwrap();
        let touched = stamp(&path);
        assert!(!touched.settled(changed(&touched)), "a file touched at the look is settled");
        assert!(touched.settled(changed(&touched) + 2 * SETTLED), "an mtime a day ahead has the file read at every look for a day");
    }

    fn credentials(access: &str, refresh: &str, expires_at: Millis) -> String {
        format!(r#"{{"claudeAiOauth":{{"accessToken":"{access}","refreshToken":"{refresh}","expiresAt":{expires_at},"scopes":["user:inference"]}}}}"#)
    }

    /// A token of its own for `seed`: no piece long enough to mask is shared with another
    /// (distinct tokens with a common part mask each other's common part).
    fn token(seed: &str) -> String {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        (0..3).map(|n| format!("{:016x}", hasher.hash_one((seed, n)))).collect()
    }

    /// Whether `redactor` masks `token` plain and base64-encoded (as a job prints it).
    fn masks(redactor: &Redactor, token: &str) -> bool {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!(r#"{{"accessToken":"{token}"}}"#));
        !redactor.redact(token).contains(token) && redactor.redact(&b64) != b64
    }

    /// rev45a-2: a file flipped between two logins already known (no new login, no splice:
    /// no tampering) made a new redactor at each flip once the older one's access token was
    /// gone (it was masked while live, not while replaced), each line of any job's output
    /// looking again while the file is unsettled. With a month of logins each build is
    /// ~30 ms of the agent's one runtime thread; with 128 logins of 512-byte tokens ~0.9 s.
    /// An access token is masked until its end whatever the state: flips build nothing.
    #[test]
    fn rev45a_flipping_the_file_between_known_logins_builds_no_redactor() {
        let d = tempdir("rev45a-flip");
        let (old, new) = ((token("a1"), token("r1")), (token("a2"), token("r2")));
        let login = login_with(&d, &credentials(&old.0, &old.1, 1));
        let t0 = 1_000_000;
        login.redactor(t0);
        std::fs::write(&login.credentials_path, credentials(&new.0, &new.1, t0 + 8 * 3_600_000)).unwrap();
        let later = t0 + ACCESS_LIFETIME_MS + SPENT_GRACE_MS + 1;
        let mut last = login.redactor(later);
        let mut builds = 0;
        let watch = login.watch_job();
        for flip in 0..10 {
            let (a, r) = if flip % 2 == 0 { &old } else { &new };
            std::fs::write(&login.credentials_path, credentials(a, r, if flip % 2 == 0 { 1 } else { t0 + 8 * 3_600_000 })).unwrap();
            let (redactor, looked) = login.redactor_looked(later);
            if !Arc::ptr_eq(&redactor, &last) {
                builds += 1;
            }
            assert!(login.changed(&looked), "unsettled: every line looks again");
            last = redactor;
        }
        assert_eq!(watch.tampering(), None, "no tampering");
        assert!(builds < 2, "{builds} redactors built for 10 flips between two known logins");
    }

    /// rev45a-2, a login not remembered: a file flipped between the real login and one of
    /// no token's shape (a job's: not remembered, not counted, masked while the file holds
    /// it) changes the set masked at each flip; each built a redactor with every login
    /// remembered. The last two sets' redactors are kept: the flips build two.
    #[test]
    fn rev45a_flipping_the_file_between_a_login_and_one_not_remembered_builds_two_redactors() {
        let d = tempdir("rev45a-junk");
        let (access, refresh) = (token("a1"), token("r1"));
        let far = 4_102_444_800_000;
        let login = login_with(&d, &credentials(&access, &refresh, far));
        let watch = login.watch_job();
        let mut seen: Vec<Arc<Redactor>> = Vec::new();
        for flip in 0..10 {
            let body = if flip % 2 == 0 { credentials(&access, &refresh, far) } else { credentials("not a token", "nor this", far) };
            std::fs::write(&login.credentials_path, body).unwrap();
            let redactor = login.redactor(1_000 + flip);
            assert!(masks(&redactor, &access) && masks(&redactor, &refresh), "the real login is masked");
            if !seen.iter().any(|held| Arc::ptr_eq(held, &redactor)) {
                // Held, so no later one is built at a freed one's address.
                seen.push(redactor);
            }
        }
        assert_eq!(watch.tampering(), None, "no tampering");
        assert_eq!(seen.len(), 2, "redactors built for 10 flips between two sets");
    }

    /// rev45c-3: the live login's access token was let go for good ("once gone, gone") at
    /// one look with the wall clock past its end: a clock stepped a day ahead for a moment
    /// (a bad NTP step, `date -s`) and back left the live token, valid for hours by its
    /// `expiresAt`, unmasked in its encoded forms (the `sk-ant-` shape masks only the plain
    /// one) for the rest of the agent's life. The live login's access token is never let go.
    #[test]
    fn a_clock_stepped_forward_for_a_moment_keeps_the_live_access_token_masked() {
        let d = tempdir("rev45c-clock");
        let (access, refresh) = (token("live-access"), token("live-refresh"));
        let t0: Millis = 1_800_000_000_000;
        let login = login_with(&d, &credentials(&access, &refresh, t0 + 8 * 3_600_000));
        assert!(masks(&login.redactor(t0), &access));
        // The clock a day ahead for a moment, then back: 7 h left by the file.
        login.redactor(t0 + 24 * 3_600_000);
        let after = login.redactor(t0 + 3_600_000);
        assert!(masks(&after, &access), "the live access token, 7 h before its end, is unmasked");
        assert!(masks(&after, &refresh));
    }

    /// rev45c-2: a job writing a new junk login (no token's shape: never remembered, never
    /// counted) at each write changed the set masked each time, and the redactor of every
    /// login remembered (a month: 90) was built anew for the next line of every job's
    /// output (35 ms each, release), with no tampering said. The remembered logins' layer
    /// is built once; only the junk's small one is built per reading, and the junk is
    /// masked while the file holds it.
    #[test]
    fn junk_logins_each_new_build_only_their_own_layer() {
        let d = tempdir("rev45c-junk");
        let far = 4_102_444_800_000;
        let (access, refresh) = (token("a"), token("r"));
        let login = login_with(&d, &credentials(&access, &refresh, far));
        for n in 0..90 {
            login.remembered.lock().unwrap().learn(&[token(&format!("a{n}")), token(&format!("r{n}"))], Some(far), None, 1);
        }
        let watch = login.watch_job();
        let first = login.redactor(1_000);
        let base = first.base().expect("a base layer").clone();
        let mut builds = 0;
        for flip in 0..20u64 {
            let junk = format!("junk login number {flip}, not a token");
            std::fs::write(&login.credentials_path, credentials(&junk, "more junk, not a token either", far)).unwrap();
            let redactor = login.redactor(1_000 + flip);
            assert!(redactor.redact(&junk).contains("[REDACTED]"), "the file's junk is unmasked while the file holds it");
            assert!(masks(&redactor, &token("r7")) && masks(&redactor, &refresh), "a remembered login is unmasked");
            if !Arc::ptr_eq(redactor.base().expect("a base layer"), &base) {
                builds += 1;
            }
        }
        assert_eq!(watch.tampering(), None, "no tampering");
        assert_eq!(builds, 0, "the remembered logins' layer was built again for junk writes");
    }

    /// rev45a-3: tokens of 512 bytes were remembered, and 126 logins of them made each
    /// redactor take 0.87 s and ~200 MiB to build. A token longer than [`TOKEN_BYTES`] is not
    /// remembered, and logins of the longest are kept only while the memory's tokens fit
    /// [`REMEMBERED_BYTES`]; the next one overflows it, as the 129th login would. A month of
    /// real logins (two tokens of about 110 bytes) fits with room.
    #[test]
    fn rev45a_logins_of_long_tokens_fill_the_memory_by_their_bytes() {
        let (far, longest) = (4_102_444_800_000, *TOKEN_BYTES.end());
        let long = |seed: String, len: usize| token(&seed).repeat(len / 48 + 1)[..len].to_string();
        assert!(!plausible(&long("over".into(), longest + 1)) && plausible(&long("at".into(), longest)));
        assert!(REMEMBERED * 2 * 128 <= REMEMBERED_BYTES, "a month of real logins overflows the memory");
        let mut logins = Logins::default();
        let fits = REMEMBERED_BYTES / (2 * longest);
        for n in 0..=fits {
            logins.learn(&[long(format!("a{n}"), longest), long(format!("r{n}"), longest)], Some(far), None, 1);
            assert_eq!(logins.overflowed, n == fits, "login {n} of {longest}-byte tokens, {fits} fit");
        }
        let held: usize = logins.logins.iter().flat_map(|known| &known.tokens).map(String::len).sum();
        assert!(held <= REMEMBERED_BYTES, "{held} bytes of tokens remembered");
    }

    /// A job moved the credentials file away (or blanked it, or left it half written),
    /// printed the tokens base64-encoded and put it back: the redactor, built from what the
    /// file held then, had no token to mask (hostile review rev36b, 1). A login once read is
    /// masked whatever the file holds later, by the one redactor built for it; a rotation
    /// adds the new tokens and keeps the old (its access token stays valid for minutes).
    #[test]
    fn a_login_once_read_stays_masked_whatever_the_file_holds_later() {
        let d = tempdir("remembered");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let far = 4_102_444_800_000;
        let login = login_with(&d, &credentials(access, refresh, far));
        let path = login.credentials_path.clone();
        let first = login.redactor(1);
        assert!(masks(&first, access) && masks(&first, refresh));
        let half = credentials(access, refresh, far)[..40].to_string();
        let oversized = " ".repeat(credentials::MAX_BYTES + 10);
        for (what, body) in [("moved away", None), ("blank", Some("")), ("not JSON", Some("{")), ("half written", Some(half.as_str())), ("oversized", Some(oversized.as_str()))] {
            match body {
                None => std::fs::rename(&path, d.join("away")).unwrap(),
                Some(body) => std::fs::write(&path, body).unwrap(),
            }
            // A job's context holds a clone of the agent's login.
            let redactor = login.clone().redactor(2);
            assert!(masks(&redactor, access) && masks(&redactor, refresh), "{what}: the tokens read before are not masked");
            assert!(Arc::ptr_eq(&redactor, &first), "{what}: a redactor was built again for the same secrets");
            let _ = std::fs::rename(d.join("away"), &path);
        }
        // Rotated: the new login is added to the old.
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, far)).unwrap();
        let rotated = login.redactor(3);
        std::fs::remove_file(&path).unwrap();
        let hidden = login.redactor(4);
        assert!(Arc::ptr_eq(&rotated, &hidden), "hiding the file changed the set");
        for token in [access, refresh, access2, refresh2] {
            assert!(masks(&hidden, token), "{token} is not masked once the file is gone");
        }
        assert!(login.read(4).tokens.is_empty(), "the reading itself is of the file as it is");
    }

    /// Claude refreshes within [`NEAR_EXPIRY_MS`] of expiry, while the old access token is
    /// valid. With the memory full of a job's far-expiring logins, the new real login was
    /// not kept, and a job that then hid the file printed it unmasked (hostile review rev38,
    /// 1). Logins read while a job runs push none out: all are kept.
    #[test]
    fn a_rotation_in_the_refresh_window_is_kept_with_the_memory_full_of_fakes() {
        let d = tempdir("rev38-rot");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let (expires, far) = (1_800_000_000_000, 4_102_444_800_000);
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - 3_600_000); // agent start
        let _job = login.watch_job();
        // A job writes three fakes, read by the agent's re-read, then the real file back.
        for n in 0..3 {
            let (a, r) = (token(&format!("f-a-{n}")), token(&format!("f-r-{n}")));
            std::fs::write(&path, credentials(&a, &r, far)).unwrap();
            login.redactor(expires - 3_000_000);
        }
        std::fs::write(&path, credentials(access, refresh, expires)).unwrap();
        login.redactor(expires - 3_000_000);
        // Claude refreshes 4 min before expiry; the agent reads the new file.
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, expires + 3_600_000)).unwrap();
        assert!(masks(&login.redactor(expires - 240_000), access2));
        // The job moves the file away and prints the tokens.
        std::fs::rename(&path, d.join("away")).unwrap();
        let hidden = login.redactor(expires - 239_000);
        assert!(masks(&hidden, access2) && masks(&hidden, refresh2), "the rotated login is not masked once the job hid the file");
        assert!(masks(&hidden, access), "the access token the rotation replaced is unmasked while valid");
    }

    /// A job's Claude refreshes the login (one new login in its run: not tampering): the
    /// old login is replaced. Nothing a later run does spends it (review rev43): its access
    /// token is masked until its end, then its refresh token alone until its own end (here a
    /// month after its first reading), and it is forgotten. The memory holds the login and
    /// one refresh token per login replaced within a refresh token's life.
    #[test]
    fn a_refresh_in_a_job_replaces_the_login_until_its_refresh_token_ends() {
        let d = tempdir("refresh");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let expires = 1_800_000_000_000;
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        // Read as it was made: kept at least until its `expiresAt`.
        let first_read = expires - ACCESS_LIFETIME_MS;
        login.redactor(first_read);
        let job = login.watch_job();
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, expires + 8 * 3_600_000)).unwrap();
        login.redactor(expires - 240_000);
        assert_eq!(job.tampering(), None, "Claude's refresh is not tampering");
        drop(job);
        // The next job's Claude runs, on the new login or not: the agent cannot tell.
        drop(login.watch_job());
        let during = login.redactor(expires + SPENT_GRACE_MS - 1);
        assert!(masks(&during, access) && masks(&during, refresh), "the replaced access token is unmasked while valid");
        let later = login.redactor(expires + SPENT_GRACE_MS + 1);
        assert!(!masks(&later, access), "an access token past its end is still masked");
        assert!(masks(&later, refresh), "a replaced refresh token is unmasked before its end");
        assert!(masks(&later, access2) && masks(&later, refresh2));
        let gone = login.redactor(first_read + REFRESH_LIFETIME_MS + 1);
        assert!(!masks(&gone, refresh), "a dead login is kept");
        assert!(masks(&gone, refresh2), "the live login is let go");
        // Its access token is past its end, but the login is live: masked still, as a clock
        // stepped ahead must not let it go (rev45c-3).
        assert!(masks(&gone, access2), "the live login's access token is let go");
        assert_eq!(login.remembered.lock().unwrap().logins.len(), 1);
    }

    /// A job writes a login first with a `refreshTokenExpiresAt` of its choosing (an hour
    /// on), then lets the agent read it replaced: the file's end only lengthens a refresh
    /// token's life, never shortens it below [`REFRESH_LIFETIME_MS`] after its first
    /// reading, as `expiresAt` never shortens an access token's (review rev45a, by reading).
    #[test]
    fn a_short_refresh_end_written_first_does_not_let_a_refresh_token_go_early() {
        let d = tempdir("short-refresh-end");
        let hour = 3_600_000;
        let now = 1_800_000_000_000;
        let (access, refresh) = (&token("access"), &token("refresh"));
        let login = login_with(&d, &credentials_ending(access, refresh, now + 8 * hour, now + hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        std::fs::write(&path, credentials(&token("access2"), &token("refresh2"), now + 16 * hour)).unwrap();
        login.redactor(now + 8 * hour);
        let later = login.redactor(now + ACCESS_LIFETIME_MS + 2 * hour);
        assert!(masks(&later, refresh), "a replaced refresh token is let go at the end the file first gave it");
        let gone = login.redactor(now + REFRESH_LIFETIME_MS + 1);
        assert!(!masks(&gone, refresh), "a refresh token past a month is kept");
    }

    /// An agent whose slots are never all free at once: a refresh read while jobs run
    /// replaces the login all the same, so its access token is let go at its end and the
    /// login at its refresh token's, whatever runs then (the memory does not grow with every
    /// refresh for as long as jobs overlap).
    #[test]
    fn a_refresh_replaces_the_login_on_an_agent_never_idle() {
        let d = tempdir("never-idle");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let expires = 1_800_000_000_000;
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - ACCESS_LIFETIME_MS);
        let first = login.watch_job();
        std::fs::write(&path, credentials(&token("access2"), &token("refresh2"), expires + 8 * 3_600_000)).unwrap();
        login.redactor(expires - 240_000);
        let second = login.watch_job();
        login.redactor(expires - 200_000);
        drop(first);
        let later = login.redactor(expires + SPENT_GRACE_MS + 1);
        assert!(!masks(&later, access) && masks(&later, refresh), "while another job runs, the replaced access token is kept past its end or its refresh token is not");
        let gone = login.redactor(expires - ACCESS_LIFETIME_MS + REFRESH_LIFETIME_MS + 1);
        assert!(!masks(&gone, refresh), "a dead login is kept while another job runs");
        drop(second);
    }

    /// The memory is bounded ([`REMEMBERED`] logins), and a job that can write the file
    /// cannot use the bound to push the real login out: nothing is forgotten for a newer
    /// login. A login read with the memory full is masked while the file holds it, and
    /// withholds every job's output from then on.
    #[test]
    fn a_job_writing_logins_of_its_own_cannot_push_the_real_one_out() {
        let d = tempdir("bounded");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let (expires, far) = (1_800_000_000_000, 4_102_444_800_000);
        let hour = 3_600_000;
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - 3 * hour);
        let job = login.watch_job();
        let fake = |n: usize| (token(&format!("fake-access-{n}")), token(&format!("fake-refresh-{n}")));
        for n in 0..REMEMBERED + 4 {
            let (a, r) = fake(n);
            std::fs::write(&path, credentials(&a, &r, far)).unwrap();
            // A redactor of 128 logins takes a debug build a while: built at the first and
            // around the bound only, the file read at each.
            login.read(expires - 2 * hour);
            if n < 2 || n + 3 >= REMEMBERED {
                let redactor = login.redactor(expires - 2 * hour);
                assert!(masks(&redactor, &a) && masks(&redactor, &r), "a login the file holds is masked, kept or not");
            }
        }
        std::fs::remove_file(&path).unwrap();
        let hidden = login.redactor(expires + 2 * hour);
        assert!(masks(&hidden, access) && masks(&hidden, refresh), "the real login was pushed out");
        assert!(masks(&hidden, &fake(REMEMBERED - 2).0), "the last login with room is kept");
        assert!(!masks(&hidden, &fake(REMEMBERED - 1).0), "the memory is bounded");
        assert!(job.tampering().is_some_and(|why| why.contains("restarts")), "a login kept out does not withhold the job");
        drop(job);
        assert!(login.watch_job().tampering().is_some(), "a login kept out does not withhold a later job");
    }

    /// A job wrote one login of its own into the file at its end: read with no job
    /// running, it made the real one look replaced, its refresh token spent, and the real
    /// one was forgotten once its access token expired, its refresh token live. Replaced,
    /// it is kept until its refresh token's end.
    #[test]
    fn a_login_a_job_left_in_the_file_does_not_unmask_the_real_one() {
        let d = tempdir("left");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let expires = 1_800_000_000_000;
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        // Read as it was made: kept at least until its `expiresAt`.
        login.redactor(expires - ACCESS_LIFETIME_MS);
        let job = login.watch_job();
        std::fs::write(&path, credentials(&token("left-a"), &token("left-r"), expires + 3_600_000)).unwrap();
        login.redactor(expires - 3_000_000);
        drop(job);
        let later = login.redactor(expires + 3_600_000);
        assert!(masks(&later, refresh), "the real refresh token, never spent, is unmasked");
        // Kept until its refresh token is dead: a month after it was first read.
        let gone = login.redactor(expires - ACCESS_LIFETIME_MS + REFRESH_LIFETIME_MS + 1);
        assert!(!masks(&gone, refresh), "a login whose refresh token is dead is kept for the agent's life");
    }

    /// A new login made through the relay (`claude auth login`) does not spend the refresh
    /// token of the one before it: read with no job running, it made the old one look
    /// replaced, and the old one was forgotten once its access token expired, its refresh
    /// token live for a job that had kept a copy.
    #[test]
    fn a_new_login_keeps_the_one_before_it_masked() {
        let d = tempdir("relogin");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let expires = 1_800_000_000_000;
        let login = login_with(&d, &credentials(access, refresh, expires));
        login.redactor(expires - ACCESS_LIFETIME_MS);
        std::fs::write(&login.credentials_path, credentials(&token("new-a"), &token("new-r"), expires + 8 * 3_600_000)).unwrap();
        login.redactor(expires - 60_000);
        login.relayed_login();
        let later = login.redactor(expires + 3_600_000);
        assert!(masks(&later, refresh), "the refresh token of the login before the new one is unmasked");
    }

    /// The whole of rev39's finding, at the unit's level: the real login stays masked when
    /// a job writes logins near its expiry, after it, or far from it, and a job that brings
    /// more than [`NEW_PER_JOB`] logins of its own is withheld.
    #[test]
    fn a_job_bringing_more_logins_than_a_refresh_is_withheld() {
        let d = tempdir("per-job");
        let expires = 1_800_000_000_000;
        let login = login_with(&d, &credentials(&token("access"), &token("refresh"), expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - 3_600_000);
        let job = login.watch_job();
        for n in 0..NEW_PER_JOB {
            std::fs::write(&path, credentials(&token(&format!("own-a-{n}")), &token(&format!("own-r-{n}")), expires + 1)).unwrap();
            login.redactor(expires - 240_000 + n as Millis);
            assert_eq!(job.tampering(), None, "{} new logins", n + 1);
        }
        std::fs::write(&path, credentials(&token("own-a-x"), &token("own-r-x"), expires + 1)).unwrap();
        login.redactor(expires - 200_000);
        let why = job.tampering().expect("withheld");
        assert!(why.contains(&format!("{} logins", NEW_PER_JOB + 1)) && why.contains("withheld"), "{why}");
        // A job started since has brought none.
        assert_eq!(login.watch_job().tampering(), None);
    }

    /// rev39-A: a job pushes the real login out of the memory with logins of its own once
    /// it nears expiry (no Claude refreshed it: the job's Claude sits in a long tool call),
    /// then hides the file. The retired login leaves at expiresAt + the grace, and its
    /// refresh token, never spent and still valid, is printed unmasked.
    #[test]
    fn rev39_an_unrefreshed_login_pushed_out_unmasks_its_refresh_token() {
        let d = tempdir("rev39-unspent");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let (expires, far) = (1_800_000_000_000, 4_102_444_800_000);
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - 3_600_000); // the agent reads the real login
        let job = login.watch_job();
        // The job (which can read the file: same user) writes 4 far-expiring logins of its
        // own, one per look of the agent (every second).
        for n in 0..4 {
            let (a, r) = (token(&format!("f-a-{n}")), token(&format!("f-r-{n}")));
            std::fs::write(&path, credentials(&a, &r, far)).unwrap();
            login.redactor(expires - 240_000 + n as Millis);
        }
        // It hides the file; no Claude refreshed meanwhile, so `refresh` is unspent.
        std::fs::remove_file(&path).unwrap();
        let during = login.redactor(expires + 60_000);
        assert!(masks(&during, refresh), "not masked even within the grace");
        drop(job);
        let later = login.redactor(expires + 3_600_000);
        assert!(masks(&later, refresh), "the real login's refresh token, never spent, is unmasked once its access token's grace is over");
    }

    /// rev39-A, fast: logins of the job's own just after the real one's expiry push it out of
    /// the memory, then out of `retired` (the one nearest its end goes first), minutes before
    /// its expiry, its refresh token never spent (no Claude refreshed: the job's own Claude
    /// sits in a tool call). 12 looks, about 12 s of a job at the agent's look every second.
    #[test]
    fn rev39_near_logins_of_a_job_unmask_the_real_login_before_it_expires() {
        let d = tempdir("rev39-fast");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let expires = 1_800_000_000_000;
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - 3_600_000);
        let job = login.watch_job();
        for n in 0..(4 - 1 + 1 + 8 + 2) {
            let (a, r) = (token(&format!("n-a-{n}")), token(&format!("n-r-{n}")));
            std::fs::write(&path, credentials(&a, &r, expires + 1 + n as Millis)).unwrap();
            login.redactor(expires - 240_000 + n as Millis);
        }
        std::fs::remove_file(&path).unwrap();
        let hidden = login.redactor(expires - 200_000);
        assert!(masks(&hidden, access), "the real access token, valid for 3 more minutes, is unmasked");
        assert!(masks(&hidden, refresh), "the real refresh token, never spent, is unmasked");
        assert!(job.tampering().is_some(), "a job that wrote 14 logins is not withheld");
    }

    /// rev39-B: the job writes the real tokens back with an expiresAt in the past (the
    /// memory does not take the new expiry: same tokens) and runs `claude -p` itself, which
    /// refreshes "expired" tokens at once: a real rotation far outside NEAR_EXPIRY_MS, with
    /// the memory full of the job's far logins, so the new real login is not kept, and is
    /// unmasked once the job hides the file.
    #[test]
    fn rev39_a_refresh_forced_early_is_not_kept_with_the_memory_full() {
        let d = tempdir("rev39-forced");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let now = 1_800_000_000_000;
        let (expires, far) = (now + 8 * 3_600_000, 4_102_444_800_000);
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let job = login.watch_job();
        for n in 0..3 {
            let (a, r) = (token(&format!("f-a-{n}")), token(&format!("f-r-{n}")));
            std::fs::write(&path, credentials(&a, &r, far)).unwrap();
            login.redactor(now + 2_000 * (n as Millis + 1));
        }
        // The real tokens back, marked expired: Claude (run by the job) refreshes them.
        std::fs::write(&path, credentials(access, refresh, now - 1_000)).unwrap();
        login.redactor(now + 10_000);
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, now + 12_000 + 8 * 3_600_000)).unwrap();
        assert!(masks(&login.redactor(now + 12_000), access2), "masked while the file holds it");
        std::fs::remove_file(&path).unwrap();
        let hidden = login.redactor(now + 14_000);
        assert!(masks(&hidden, access2) && masks(&hidden, refresh2), "the live login of a refresh forced early is unmasked once the job hides the file");
        assert!(job.tampering().is_some(), "a job that wrote 3 logins of its own and forced a refresh is not withheld");
        drop(job);
        let later = login.redactor(now + 9 * 3_600_000);
        assert!(masks(&later, access2) && masks(&later, refresh2) && masks(&later, refresh), "a login of that job is unmasked in a later one");
    }

    /// rev39, by reading: the job runs as the real login nears expiry, fills the memory with
    /// far logins of its own, then lets Claude refresh: the refreshed login is kept out of
    /// the memory, masked only while the file holds it. It cannot be kept out unseen: the
    /// job, and every later one, is withheld.
    #[test]
    fn rev39_a_refresh_kept_out_of_a_full_memory_withholds_every_job() {
        let d = tempdir("rev39-read");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let (expires, far) = (1_800_000_000_000, 4_102_444_800_000);
        let login = login_with(&d, &credentials(access, refresh, expires));
        let path = login.credentials_path.clone();
        login.redactor(expires - 3_600_000);
        let job = login.watch_job();
        for n in 0..REMEMBERED - 1 {
            std::fs::write(&path, credentials(&token(&format!("r-a-{n}")), &token(&format!("r-r-{n}")), far)).unwrap();
            login.read(expires - 600_000 + n as Millis);
        }
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, expires + 8 * 3_600_000)).unwrap();
        login.redactor(expires - 240_000);
        std::fs::remove_file(&path).unwrap();
        let hidden = login.redactor(expires - 200_000);
        assert!(masks(&hidden, access) && masks(&hidden, refresh), "the real login was pushed out");
        assert!(!masks(&hidden, access2), "the memory took a login past its bound");
        assert!(job.tampering().is_some(), "the job that kept the refresh out is not withheld");
        drop(job);
        assert!(login.watch_job().tampering().is_some(), "a later job, which could print the refresh kept out, is not withheld");
    }

    /// A job wrote a "login" of ordinary words; kept for the agent's life, every later job's
    /// output lost those words (hostile review rev38, 2). Only tokens of a real token's shape
    /// are remembered.
    #[test]
    fn a_fake_login_of_common_words_is_not_remembered() {
        let d = tempdir("rev38-words");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let far = 4_102_444_800_000;
        let login = login_with(&d, &credentials(access, refresh, far));
        login.redactor(1);
        std::fs::write(&login.credentials_path, credentials("the result", "function main", far)).unwrap();
        login.redactor(2);
        std::fs::write(&login.credentials_path, credentials(access, refresh, far)).unwrap();
        let later = login.clone().redactor(3_600_000);
        let out = later.redact("Here is the result: fn main() is the function main of the program");
        assert!(!out.contains("[REDACTED]"), "a fake login of ordinary words masks them in every later job: {out}");
    }

    /// A 700 KB fake token was remembered for the agent's life and made every later redactor
    /// (each job's, each repository job's git worker's) take seconds to build (hostile review
    /// rev38, 2). It is not remembered, and while the file holds it only its first
    /// [`CURRENT_TOKEN_BYTES`] are masked.
    #[test]
    fn a_huge_fake_token_is_not_remembered_and_masked_in_part() {
        let d = tempdir("rev38-huge");
        let far = 4_102_444_800_000;
        let big: String = (0..700_000u32).map(|i| char::from(b'a' + ((i.wrapping_mul(2654435761) >> 13) % 26) as u8)).collect();
        let login = login_with(&d, &credentials(&big, &token("realr"), far));
        let held = login.redactor(1);
        let built_from: Vec<&String> = held.secrets().collect();
        assert!(built_from.iter().all(|secret| secret.len() <= CURRENT_TOKEN_BYTES), "the redactor is built from the whole huge token");
        assert!(held.redact(&big[1000..1100]).contains("[REDACTED]"), "the file's token is not masked while it holds it");
        std::fs::write(&login.credentials_path, credentials(&token("real"), &token("realr"), far)).unwrap();
        let later = login.redactor(2);
        assert_eq!(later.redact(&big[1000..1100]), &big[1000..1100], "the huge fake is remembered");
        assert!(masks(&later, &token("realr")), "the plausible token beside it is remembered");
    }

    #[test]
    fn reads_a_real_shaped_credentials_file() {
        let d = tempdir("real");
        let login = login_with(
            &d,
            r#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-aaaa","refreshToken":"sk-ant-ort01-bbbb",
               "expiresAt":1900000000000,"refreshTokenExpiresAt":1900000000000,"scopes":["user:inference"],
               "subscriptionType":"max","rateLimitTier":"x"}}"#,
        );
        let r = login.read(0);
        assert_eq!(r.report.source, OAuthSource::CredentialsFile);
        assert_eq!(r.report.expires_at, Some(1_900_000_000_000));
        assert!(r.report.refreshable);
        assert_eq!(r.report.subscription_type.as_deref(), Some("max"));
        assert!(r.tokens.contains(&"sk-ant-oat01-aaaa".to_string()));
        // The report itself never carries a token.
        assert!(!serde_json::to_string(&r.report).unwrap().contains("sk-ant"));
    }

    #[test]
    fn expiry_in_seconds_is_understood() {
        let d = tempdir("secs");
        let login = login_with(&d, r#"{"claudeAiOauth":{"accessToken":"a","expiresAt":1900000000}}"#);
        assert_eq!(login.read(0).report.expires_at, Some(1_900_000_000_000));
    }

    #[test]
    fn broken_files_are_reported_not_fatal() {
        let d = tempdir("broken");
        for body in ["{", "[]", r#"{"claudeAiOauth":null}"#, r#"{"claudeAiOauth":{"expiresAt":"soon"}}"#] {
            let r = login_with(&d, body).read(0);
            assert_eq!(r.report.source, OAuthSource::None, "{body}");
            assert!(r.report.problem.as_deref().is_some_and(|p| p.contains("claude auth login")), "{body}");
        }
        assert!(login_with(&d, &" ".repeat(credentials::MAX_BYTES + 10)).read(0).report.problem.unwrap().contains("over 1 MiB"));
        let missing = Login { config_dir: d.clone(), credentials_path: d.join("nope.json"), oauth_token_env: Some("tok-123456789".into()), api_key_env: None, other_secrets: Vec::new(), redactors: RedactorCache::default(), readings: ReadingCache::default(), remembered: Remembered::default(), learnt: Learnt::default() };
        assert_eq!(missing.read(0).report.source, OAuthSource::OauthTokenEnv);
        assert_eq!(missing.claude_env(0), [("CLAUDE_CODE_OAUTH_TOKEN", "tok-123456789".to_string())]);
    }

    /// What the report says of a file it could not read is what the edge shows and every
    /// hello carries: never a token, never the file's content, never long. The folder's
    /// path is the one thing of the machine it names: cut, and redacted as output is.
    #[test]
    fn a_problem_is_short_and_redacted() {
        let secret = "sk-ant-oat01-VERYSECRETVERYSECRET";
        let d = tempdir("problem");
        let r = login_with(&d, &format!(r#"{{"claudeAiOauth":"{secret}"}}"#)).read(0);
        let problem = r.report.problem.expect("a problem");
        assert!(!problem.contains("VERYSECRET") && problem.contains("claude auth login"), "{problem}");
        // A repository token in the folder's name (the machine's other secrets are masked
        // too), and a folder named at length.
        let token = "ghp_QwErTyUiOpAsDfGhJkL0123456789";
        let named = d.join(token).join("x".repeat(200)).join("y".repeat(200));
        std::fs::create_dir_all(&named).unwrap();
        let login = login_with(&named, "{").with_secrets([token]);
        let problem = login.read(0).report.problem.expect("a problem");
        assert!(!problem.contains(token) && problem.contains(crate::redact::MASK), "{problem}");
        assert!(problem.len() <= shared::oauth::MAX_PROBLEM_BYTES, "{} bytes", problem.len());
    }

    #[test]
    fn claude_gets_only_the_login_in_use() {
        let d = tempdir("env");
        let mut login = login_with(&d, r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":4102444800000}}"#);
        login.oauth_token_env = Some("env-token-123456789".into());
        login.api_key_env = Some("api-key-123456789".into());
        assert!(login.claude_env(0).is_empty(), "the credentials file is in use: no token variable");
        login.credentials_path = d.join("absent.json");
        assert_eq!(login.claude_env(0), [("CLAUDE_CODE_OAUTH_TOKEN", "env-token-123456789".to_string())]);
        login.oauth_token_env = None;
        assert_eq!(login.claude_env(0), [("ANTHROPIC_API_KEY", "api-key-123456789".to_string())]);
    }

    /// A token variable set with surrounding whitespace went to Claude as it was (only a
    /// blank one counted as unset): trimmed now.
    #[test]
    fn a_token_variable_reaches_claude_trimmed() {
        let d = tempdir("trimmed");
        let set = |oauth: &'static str, api: &'static str| {
            Login::from_variables(Some(&d), move |name| match name {
                "CLAUDE_CODE_OAUTH_TOKEN" => Some(oauth.to_string()),
                "ANTHROPIC_API_KEY" => Some(api.to_string()),
                _ => None,
            })
        };
        assert_eq!(set(" tok-123456789\n", "").claude_env(0), [("CLAUDE_CODE_OAUTH_TOKEN", "tok-123456789".to_string())]);
        assert_eq!(set(" \t", "\tapi-key-123456789 ").claude_env(0), [("ANTHROPIC_API_KEY", "api-key-123456789".to_string())]);
        assert_eq!(set("", " ").claude_env(0), []);
    }

    /// The gate was this process's alone, but two processes run Claude on one login as the
    /// README has them: `doctor --canary` beside the running agent, a second agent or `up`
    /// sharing `~/.claude`; each let a Claude refresh, and two refreshes at once can
    /// destroy the login. The refresher holds a lock on a file in Claude's config folder:
    /// a gate of another process (here another gate, on its own open file) waits for it.
    #[tokio::test]
    async fn two_gates_on_one_config_folder_let_one_claude_refresh() {
        let d = tempdir("two-gates");
        let stale = r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":1000}}"#;
        let (mine, theirs) = (login_with(&d, stale), login_with(&d, stale));
        let first = RefreshGate::default().admit(&mine, "j1").await.unwrap();
        assert!(first.is_some(), "the first becomes the refresher");
        let other = RefreshGate::default();
        assert!(matches!(other.look(&theirs, "j2"), Look::Busy { elsewhere: true }), "the other process's gate waits while the first holds the lock");
        let lock = d.join(REFRESH_LOCK);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::symlink_metadata(&lock).unwrap().permissions().mode() & 0o777, 0o600);
        drop(first);
        // Let go: the other's next look takes it (a child forked meanwhile by another test
        // may hold the descriptor until its exec: the wait looks again).
        assert!(other.admit(&theirs, "j2").await.unwrap().is_some(), "the other process's job refreshes next");
    }

    /// The refresh lock's holder is named from /proc/locks, which was read in many pieces
    /// (`read_to_string`): a lock of another process let go between two reads hid the
    /// holder's line, named "another process". Here this process holds it, while other
    /// locks come and go: it is named every time.
    #[test]
    fn the_holder_of_the_refresh_lock_is_named_while_other_locks_come_and_go() {
        let d = tempdir("named-churn");
        let lock = d.join(REFRESH_LOCK);
        let _held = runtime::hold_lock(&lock).unwrap().expect("nobody else holds it");
        let churn = crate::drain::tests::other_locks_coming_and_going(&d);
        let unnamed = (0..3000).map(|_| lock_holder(&lock)).find(|holder| *holder != Some(std::process::id()));
        drop(churn);
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(unnamed, None);
    }

    /// `flock(1)` holding the refresh lock of the login in `dir` until its stdin closes.
    fn flock_holder(dir: &std::path::Path) -> std::process::Child {
        std::process::Command::new("flock").arg(dir.join(REFRESH_LOCK)).args(["sh", "-c", "read x"]).stdin(std::process::Stdio::piped()).spawn().unwrap()
    }

    /// Another process, for real: `flock(1)` holds the lock, as an agent of another release
    /// or `doctor --canary` would, until its stdin closes.
    #[tokio::test]
    async fn a_gate_waits_for_the_lock_another_process_holds() {
        let d = tempdir("other-process");
        let login = login_with(&d, r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":1000}}"#);
        let mut holder = flock_holder(&d);
        let gate = RefreshGate::default();
        // Until flock(1) holds it, the gate may take it itself: let go, look again.
        while !matches!(gate.look(&login, "j1"), Look::Busy { .. }) {
            assert!(holder.try_wait().unwrap().is_none(), "flock(1) ended without holding the lock");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waiting = {
            let (gate, login) = (gate.clone(), login.clone());
            tokio::spawn(async move { gate.admit(&login, "j1").await.unwrap().is_some() })
        };
        drop(holder.stdin.take());
        holder.wait().unwrap();
        assert!(waiting.await.unwrap(), "the job refreshes once the other process let go");
    }

    /// A process of the same user held the refresh lock and did nothing (`flock -n
    /// ~/.claude/.claude-runner-refresh.lock sleep 3600`): every job on the login waited
    /// for its whole deadline and ended timed out, nobody refreshed, and the report said
    /// nothing. Now the wait on a lock another process holds is bounded (here nothing), the
    /// job fails naming the holder, and the login's report names it too.
    #[tokio::test]
    async fn a_lock_held_by_a_process_that_does_not_refresh_is_named_not_waited_on() {
        let d = tempdir("stuck");
        let login = login_with(&d, r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":1000}}"#);
        let mut holder = flock_holder(&d);
        let pid = holder.id().to_string();
        let gate = RefreshGate::with_lock_wait(Duration::ZERO);
        // Until flock(1) holds it, the gate takes it itself: let go, look again.
        let stalled = loop {
            match gate.admit(&login, "j1").await {
                Err(stalled) => break stalled,
                Ok(_) => assert!(holder.try_wait().unwrap().is_none(), "flock(1) ended without holding the lock"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let report = login.read(crate::now_ms()).report;
        drop(holder.stdin.take());
        holder.wait().unwrap();
        assert!(stalled.contains(&format!("held by pid {pid} (flock ")) && stalled.contains(&format!("kill {pid}")), "{stalled}");
        let problem = report.problem.expect("the report names the holder");
        assert!(problem.contains(&format!("pid {pid} (flock ")) && problem.contains(REFRESH_LOCK), "{problem}");
        assert!(problem.len() <= shared::oauth::MAX_PROBLEM_BYTES);
        // Let go: the report says nothing of it any more.
        assert_eq!(login.read(crate::now_ms()).report.problem, None);
    }

    #[tokio::test]
    async fn only_one_job_refreshes_at_a_time() {
        let d = tempdir("gate");
        let login = login_with(&d, r#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":1000}}"#);
        let gate = RefreshGate::default();
        let first = gate.admit(&login, "j1").await.unwrap();
        assert!(first.is_some(), "the first job becomes the refresher");
        let second = {
            let (gate, login) = (gate.clone(), login.clone());
            tokio::spawn(async move { gate.admit(&login, "j2").await.unwrap().is_some() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "the second waits while the token is stale");
        // Claude refreshed: the file shows a fresh token.
        let fresh = format!(r#"{{"claudeAiOauth":{{"accessToken":"b","refreshToken":"r2","expiresAt":{}}}}}"#, crate::now_ms() + 3_600_000);
        std::fs::write(&login.credentials_path, fresh).unwrap();
        assert!(!second.await.unwrap(), "released without becoming a refresher");
        drop(first);
    }
    /// rev40a-1 (hostile review): the memory took a login's expiry from its first reading,
    /// and a job writes the file. A job refreshes a copy of the login (or rewrites Claude's
    /// own refresh before the agent's look) and writes the new login R2 into the file with
    /// `expiresAt: 1`; once read, it writes R2's access token beside a refresh token of its
    /// own with the real expiry (Claude works on it) and ends: two new logins, not
    /// withheld. Read after, that login made R2 spent, and R2, its expiry past, was
    /// forgotten at once: its refresh token, live, unmasked in the next job. Now no reading
    /// shortens an expiry (R2 is kept at least [`ACCESS_LIFETIME_MS`] after its first
    /// reading), and a login sharing a token with one read before spends none and
    /// withholds the job.
    #[test]
    fn a_first_reading_with_a_forged_expiry_does_not_unmask_a_live_refresh_token() {
        let d = tempdir("rev40a-forged");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let now = 1_800_000_000_000;
        let hour = 3_600_000;
        let login = login_with(&d, &credentials(access, refresh, now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let j1 = login.watch_job();
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, 1)).unwrap();
        login.redactor(now + 1_000);
        let fake_refresh = token("made-up-refresh");
        std::fs::write(&path, credentials(access2, &fake_refresh, now + 9 * hour)).unwrap();
        login.redactor(now + 2_000);
        assert!(j1.tampering().is_some_and(|why| why.contains("sharing a token")), "a job splicing a login of its own is not withheld");
        drop(j1);
        let j3 = login.watch_job();
        let later = login.redactor(now + 10 * 60_000);
        assert_eq!(j3.tampering(), None, "J3 brought nothing: not withheld");
        assert!(masks(&later, access2), "R2's access token is in the file: masked");
        assert!(masks(&later, refresh2), "R2's refresh token, read by the agent and live, is unmasked");
        let much_later = login.redactor(now + 11 * hour);
        assert!(masks(&much_later, refresh2), "R2 forgotten before an access token it could have carried has expired");
    }

    /// rev40a-1c: the same, one new login per job: J1 writes R2 with a past expiry, J2 R2's
    /// access token beside a refresh token of its own; J3 prints.
    #[test]
    fn one_login_per_job_does_not_unmask_a_live_refresh_token() {
        let d = tempdir("rev40a-one-per-job");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let now = 1_800_000_000_000;
        let hour = 3_600_000;
        let login = login_with(&d, &credentials(access, refresh, now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        let j1 = login.watch_job();
        std::fs::write(&path, credentials(access2, refresh2, 1)).unwrap();
        login.redactor(now + 1_000);
        assert_eq!(j1.tampering(), None);
        drop(j1);
        let j2 = login.watch_job();
        std::fs::write(&path, credentials(access2, &token("made-up"), now + 9 * hour)).unwrap();
        login.redactor(now + 60_000);
        assert!(j2.tampering().is_some(), "a job splicing a login of its own is not withheld");
        drop(j2);
        let j3 = login.watch_job();
        let later = login.redactor(now + 120_000);
        assert_eq!(j3.tampering(), None);
        assert!(masks(&later, refresh2), "R2's live refresh token is unmasked");
    }

    /// rev40a-1b: while no job runs, a leftover process writes a login of its own and then
    /// the real one back: the real one, in the file again and never refreshed, is not spent.
    #[test]
    fn a_login_back_in_the_file_is_not_spent() {
        let d = tempdir("rev40a-idle");
        let (access, refresh) = (&token("access"), &token("refresh"));
        let now = 1_800_000_000_000;
        let login = login_with(&d, &credentials(access, refresh, now + 3_600_000));
        let path = login.credentials_path.clone();
        login.redactor(now);
        std::fs::write(&path, credentials(&token("f-a"), &token("f-r"), now + 3_600_000)).unwrap();
        login.redactor(now + 1_000);
        std::fs::write(&path, credentials(access, refresh, now + 3_600_000)).unwrap();
        login.redactor(now + 2_000);
        let live = login.remembered.lock().unwrap().logins.iter().any(|k| k.tokens.contains(refresh) && k.state == State::Live);
        assert!(live, "the real login, in the file again and never refreshed, is not the live one");
        std::fs::remove_file(&path).unwrap();
        assert!(masks(&login.redactor(now + 2 * ACCESS_LIFETIME_MS), refresh), "its refresh token, live, is unmasked once the file is hidden");
    }

    /// A credentials file as newer Claude Code writes it: with `refreshTokenExpiresAt`.
    fn credentials_ending(access: &str, refresh: &str, expires_at: Millis, refresh_ends: Millis) -> String {
        format!(r#"{{"claudeAiOauth":{{"accessToken":"{access}","refreshToken":"{refresh}","expiresAt":{expires_at},"refreshTokenExpiresAt":{refresh_ends},"scopes":["user:inference"]}}}}"#)
    }

    /// Relayed logins on a benign agent, `every` apart, `rounds` of them, each followed by
    /// two of Claude's refreshes in jobs (rev40a-2): the file as `file(access, refresh,
    /// expires, now)` writes it; the new login is read by the agent's look before the relay
    /// ends when `read_first`. Returns the most logins held, and why a job was withheld if
    /// one was.
    fn relayed_logins(name: &str, every: Millis, rounds: usize, read_first: bool, file: impl Fn(&str, &str, Millis, Millis) -> String) -> (usize, Option<String>) {
        let d = tempdir(name);
        let hour = 3_600_000;
        let mut now = 1_800_000_000_000;
        let login = login_with(&d, &file(&token("a-0"), &token("r-0"), now + 8 * hour, now));
        let path = login.credentials_path.clone();
        login.read(now);
        let (mut n, mut most) = (1, 0);
        for _ in 0..rounds {
            now += every - 16 * hour;
            std::fs::write(&path, file(&token(&format!("a-{n}")), &token(&format!("r-{n}")), now + 8 * hour, now)).unwrap();
            n += 1;
            if read_first {
                login.read(now);
            }
            login.relayed_login();
            login.read(now);
            for _ in 0..2 {
                now += 8 * hour;
                let job = login.watch_job();
                std::fs::write(&path, file(&token(&format!("a-{n}")), &token(&format!("r-{n}")), now + 8 * hour, now)).unwrap();
                n += 1;
                login.read(now);
                drop(job);
                login.read(now + 20 * 60_000);
                most = most.max(login.remembered.lock().unwrap().logins.len());
            }
            // A job's run with the login the last refresh left.
            if let Some(why) = login.watch_job().tampering() {
                return (most, Some(why));
            }
        }
        (most, None)
    }

    /// rev40a-2: each relayed login kept every login read so far for the agent's life (the
    /// new one too when the agent's look read it first, and what its refreshes replaced),
    /// so a benign agent withheld every job after a few, blaming a job. Now every login is
    /// kept until its refresh token's end (a month after its first reading, or the file's
    /// `refreshTokenExpiresAt` when later): the memory holds what a month brought.
    #[test]
    fn relayed_logins_do_not_fill_the_memory_of_a_benign_agent() {
        let hour = 3_600_000;
        let ending = |a: &str, r: &str, expires: Millis, now: Millis| credentials_ending(a, r, expires, now + 7 * 24 * hour);
        for read_first in [true, false] {
            // A relay a day and two refreshes, the file saying refresh tokens live a week:
            // kept a month all the same (a job could write the short end), three logins a
            // day for a month.
            let (most, why) = relayed_logins("rev40a-relogins-ending", 24 * hour, 40, read_first, ending);
            assert_eq!(why, None, "a benign agent's jobs are withheld (read first: {read_first})");
            assert!(most > 3 * 7 + 1 && most <= 3 * 30 + 1, "{most} logins held");
            // A relay every three days, the file silent on the refresh token's end: a login
            // a day for a month.
            let plain = |a: &str, r: &str, expires: Millis, _: Millis| credentials(a, r, expires);
            let (most, why) = relayed_logins("rev40a-relogins-plain", 72 * hour, 20, read_first, plain);
            assert_eq!(why, None, "a benign agent's jobs are withheld (read first: {read_first})");
            assert!(most <= 30 + 1, "{most} logins held");
        }
    }

    /// rev40a-2: a memory filled with no job writing logins (a relayed login and two
    /// refreshes every 16 hours, the file silent on their refresh tokens' end, kept a month)
    /// withholds every job, and says so without blaming a job, with what to do: restart the
    /// agent.
    #[test]
    fn a_memory_filled_without_a_job_writing_logins_says_so() {
        let hour = 3_600_000;
        let plain = |a: &str, r: &str, expires: Millis, _: Millis| credentials(a, r, expires);
        let (_, why) = relayed_logins("rev40a-relogins-full", 16 * hour, 50, true, plain);
        let why = why.expect("the memory is bounded");
        assert!(why.starts_with("withheld:") && why.contains("restart the agent") && !why.contains("something the job ran wrote"), "{why}");
        // A restart forgets the logins read before (rev45a-4): the words say so, and to
        // sign in again so the login in use is one no job has read.
        assert!(why.contains("sign Claude in again") && why.contains("claude-runner login") && why.contains("forgets every login read before"), "{why}");
    }

    /// rev40a-3, the expiry alone: a job writes a refreshed login R2 with `expiresAt: 1`,
    /// then one of its own (two new logins: not withheld) and ends; read after it, that one
    /// makes R2 spent, and R2, its expiry past, was forgotten at once, its refresh token
    /// live. A login is kept at least as long as an access token lives after its first
    /// reading.
    #[test]
    fn a_login_first_read_with_a_past_expiry_is_kept_while_it_may_live() {
        let d = tempdir("rev40a-floor");
        let now = 1_800_000_000_000;
        let hour = 3_600_000;
        let login = login_with(&d, &credentials(&token("access"), &token("refresh"), now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let job = login.watch_job();
        let (access2, refresh2) = (&token("access2"), &token("refresh2"));
        std::fs::write(&path, credentials(access2, refresh2, 1)).unwrap();
        login.redactor(now + 1_000);
        std::fs::write(&path, credentials(&token("own-a"), &token("own-r"), now + 9 * hour)).unwrap();
        login.redactor(now + 2_000);
        assert_eq!(job.tampering(), None, "two new logins");
        drop(job);
        std::fs::remove_file(&path).unwrap();
        let later = login.redactor(now + 10 * 60_000);
        assert!(masks(&later, access2) && masks(&later, refresh2), "a login first read with a past expiry is forgotten at once");
        assert!(masks(&login.redactor(now + 7 * hour), refresh2), "a login first read with a past expiry is forgotten before an access token made then expires");
    }

    /// rev42-4 (benign): a job allowed a long deadline (MAX_TIMEOUT_MS takes up to a
    /// week) runs while Claude refreshes the login every 8 h: its third refresh makes the
    /// job "tampering", withheld with words blaming it for writing logins of its own.
    #[test]
    fn rev42_a_long_job_across_three_refreshes_is_not_tampering() {
        let d = tempdir("rev42-long-job");
        let hour = 3_600_000;
        let mut now = 1_800_000_000_000;
        let login = login_with(&d, &credentials(&token("a0"), &token("r0"), now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let job = login.watch_job();
        for n in 1..=3 {
            now += 8 * hour;
            std::fs::write(&path, credentials(&token(&format!("a{n}")), &token(&format!("r{n}")), now + 8 * hour)).unwrap();
            login.redactor(now);
        }
        assert_eq!(job.tampering(), None, "a 24 h job with Claude's own refreshes only");
    }

    /// rev42-1 (benign): Claude keeps the refresh token when the token endpoint returns
    /// none (non-rotating refresh: `refresh_token` defaults to the old one). The new
    /// login [a1, r0] shares r0 with [a0, r0]: counted `mixed`, the job withheld as
    /// tampering, and the memory grows by one login per refresh, none ever forgotten.
    #[test]
    fn rev42_a_refresh_keeping_its_refresh_token_is_not_tampering() {
        let d = tempdir("rev42-nonrotating");
        let hour = 3_600_000;
        let mut now = 1_800_000_000_000;
        let refresh = &token("r0");
        let login = login_with(&d, &credentials(&token("a0"), refresh, now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let mut withheld = 0;
        for n in 1..=20 {
            now += 8 * hour;
            let job = login.watch_job();
            std::fs::write(&path, credentials(&token(&format!("a{n}")), refresh, now + 8 * hour)).unwrap();
            login.redactor(now);
            if job.tampering().is_some() {
                withheld += 1;
            }
            drop(job);
            login.redactor(now + 20 * 60_000);
        }
        let held = login.remembered.lock().unwrap().logins.len();
        let later = login.watch_job().tampering();
        assert!(withheld == 0 && held <= 3 && later.is_none(), "20 benign refreshes over ~7 days: {withheld} jobs withheld, {held} logins held, a later job: {later:?}");
    }

    /// rev42-2 (hostile): a job leaves a login of its own in the file at its end (its
    /// copy of the real login kept in $HOME). With no job running, the agent takes the real
    /// login as replaced (spent); the agent is idle overnight, so 12 h later it is forgotten
    /// before any Claude run could fail and keep it. The person logs in again (relay): the
    /// old refresh token, never used, was never spent, and a later job prints it unmasked.
    #[test]
    fn rev42_a_login_left_by_a_job_before_an_idle_night_unmasks_the_real_refresh_token() {
        let d = tempdir("rev42-idle-night");
        let hour = 3_600_000;
        let now = 1_800_000_000_000;
        let (access, refresh) = (&token("real-a"), &token("real-r"));
        let login = login_with(&d, &credentials(access, refresh, now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let job = login.watch_job();
        std::fs::write(&path, credentials(&token("fake-a"), &token("fake-r"), now + 8 * hour)).unwrap();
        login.redactor(now + 1_000);
        assert_eq!(job.tampering(), None);
        drop(job);
        // The night: the agent's looks go on, no job runs.
        let morning = now + 13 * hour;
        login.redactor(morning);
        // The first job of the morning fails to authenticate; the person logs in again.
        std::fs::write(&path, credentials(&token("new-a"), &token("new-r"), morning + 9 * hour)).unwrap();
        login.redactor(morning + 120_000);
        login.relayed_login();
        let later = login.redactor(morning + 180_000);
        assert!(masks(&later, refresh), "the real login's refresh token, never used (live), is unmasked in a later job");
    }

    /// rev42-2b: no idle night: the person logs in again through the relay an hour after
    /// the job left its login in the file (before any run failed). The relay kept only
    /// logins not spent when it began, so the real one, taken as spent, was let go 12 h
    /// after its first reading, its refresh token never used.
    #[test]
    fn rev42_a_relay_after_a_job_left_a_login_does_not_keep_the_real_one() {
        let d = tempdir("rev42-relay-after");
        let hour = 3_600_000;
        let now = 1_800_000_000_000;
        let (access, refresh) = (&token("real-a2"), &token("real-r2"));
        let login = login_with(&d, &credentials(access, refresh, now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let job = login.watch_job();
        std::fs::write(&path, credentials(&token("fake-a2"), &token("fake-r2"), now - 1)).unwrap();
        login.redactor(now + 1_000);
        drop(job);
        std::fs::write(&path, credentials(&token("new-a2"), &token("new-r2"), now + 9 * hour)).unwrap();
        login.redactor(now + hour + 60_000);
        login.relayed_login();
        let later = login.redactor(now + 13 * hour);
        assert!(masks(&later, refresh), "the real login's refresh token, never used, is unmasked 13 h on");
    }

    /// rev43-1 (hostile): a job leaves a login of its own in the file (its copy of the
    /// real one kept) and settings that make later runs succeed without the file's login
    /// (`apiKeyHelper`, `ANTHROPIC_BASE_URL` or a key in `~/.claude/settings.json`, or a
    /// login of its own): the next job's Claude answered, that was taken as proof the
    /// job's login was real, the real one spent, and 13 h on its refresh token was
    /// unmasked. No run proves a login now: it is kept until its refresh token's end.
    #[test]
    fn rev43_a_success_without_the_files_login_does_not_spend_the_real_one() {
        let d = tempdir("rev43-fake-success");
        let hour = 3_600_000;
        let now = 1_800_000_000_000;
        let (access, refresh) = (&token("real-a43"), &token("real-r43"));
        let login = login_with(&d, &credentials(access, refresh, now + 8 * hour));
        let path = login.credentials_path.clone();
        login.redactor(now);
        let hostile = login.watch_job();
        std::fs::write(&path, credentials(&token("fake-a43"), &token("fake-r43"), now + 8 * hour)).unwrap();
        login.redactor(now + 1_000);
        assert!(hostile.tampering().is_none(), "one login written is within NEW_PER_JOB");
        drop(hostile);
        // The next job (benign or not): Claude authenticates via settings.json, never the
        // file, and succeeds.
        let next = login.watch_job();
        login.claude_env(now + hour);
        assert!(next.tampering().is_none());
        drop(next);
        let later = login.redactor(now + 13 * hour);
        assert!(masks(&later, refresh), "the real login's refresh token, never used, is unmasked 13 h on");
        let last = login.redactor(now + REFRESH_LIFETIME_MS - 1);
        assert!(masks(&last, refresh), "the real login's refresh token is unmasked before its end");
    }

    /// rev43-2 (benign): Claude refreshes every 8 h inside jobs that all end without
    /// success (timeouts, cancels, Claude errors) — or with it: no run counts. Every
    /// replaced login is kept until its refresh token's end (30 days: the file does not
    /// say), so the memory holds about 90 logins, each by its refresh token alone once its
    /// access token is dead, and never fills ([`REMEMBERED`]): 200 refreshes, 67 days.
    #[test]
    fn rev43_jobs_that_never_succeed_do_not_fill_the_memory() {
        let d = tempdir("rev43-never-succeed");
        let hour = 3_600_000;
        let mut now = 1_800_000_000_000;
        let login = login_with(&d, &credentials(&token("b0"), &token("s0"), now + 8 * hour));
        let path = login.credentials_path.clone();
        login.read(now);
        let mut most = 0;
        for n in 1..=200 {
            now += 8 * hour;
            let job = login.watch_job();
            login.claude_env(now);
            std::fs::write(&path, credentials(&token(&format!("b{n}")), &token(&format!("s{n}")), now + 8 * hour)).unwrap();
            login.read(now);
            drop(job);
            login.read(now + 20 * 60_000);
            if let Some(why) = login.watch_job().tampering() {
                let held = login.remembered.lock().unwrap().logins.len();
                panic!("full after {n} refreshes ({} h), {held} held: {why}", n * 8);
            }
            let logins = login.remembered.lock().unwrap();
            let held = logins.logins.len();
            most = most.max(held);
            // The live login's two tokens, the access token a refresh replaced 8 h ago
            // (alive 12 h), and one refresh token per login besides.
            assert!(logins.tokens().count() <= held + 2, "{} tokens masked for {held} logins", logins.tokens().count());
        }
        assert!(most <= 30 * 3 + 1, "{most} logins held: more than a refresh token's life brings");
    }
}
