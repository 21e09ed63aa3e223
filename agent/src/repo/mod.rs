//! Jobs on repositories (`repo_url`): a mirror per repository fetched with git2, a fresh
//! checkout per job, and the job's changes handed back as a diff or a pushed branch.
//!
//! - [`settings`]: `ALLOWED_REPO_HOSTS`, the tokens, the cache limit, the diff cap, the
//!   commit author.
//! - [`layout`]: pure decisions of the cache — mirror folder names, what to evict.
//! - [`error`]: every failure as a sentence that says what to do (`REPO_ERROR`).
//! - [`mirror`]: the mirror cache (git2 fetches, per-repository locks, leases, eviction).
//! - [`checkout`]: a job's independent checkout from a mirror; `working_dir` inside it.
//! - [`changes`]: staging, the diff, `files_changed`, the commit and the push.
//!
//! URL rules live in `shared::repo`, so the edge refuses a bad address before queueing.

pub mod changes;
pub mod checkout;
pub mod error;
pub mod layout;
pub mod mirror;
pub mod settings;

use crate::redact::Redactor;
use changes::{Patch, PushTarget};
use checkout::Checkout;
use error::{local, RepoError};
use mirror::{Lease, MirrorCache, Source};
use settings::RepoSettings;
use shared::job::{JobResult, JobSpec};
use shared::repo::RepoUrl;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Sets libgit2 up for the whole process. Call it before any other thread starts: its
/// TLS set-up writes `SSL_CERT_FILE`/`SSL_CERT_DIR` into the environment when unset.
pub fn init_libgit2() {
    mirror::set_timeouts();
}

pub struct Repos {
    pub settings: RepoSettings,
    cache: Arc<MirrorCache>,
}

/// What the runner learns of a job's checkout ([`Repos::prepare`]): `started` once it
/// began, and `done` dropped once it has ended (its receiver then resolves), however the
/// job ended meanwhile.
pub struct CheckoutSignals {
    pub started: Arc<AtomicBool>,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// How long a hand-back given up at the job's end (plus its grace) is waited for before
/// the job ends without knowing how its push ended.
const HAND_BACK_ABANDON: std::time::Duration = std::time::Duration::from_secs(60);

/// A job's repository, checked out and ready for Claude.
pub struct Prepared {
    lease: Lease,
    url: RepoUrl,
    pub checkout: Checkout,
    /// Where Claude starts: `working_dir` inside the checkout.
    pub cwd: PathBuf,
}

/// What the job handed back.
#[derive(Debug, Default)]
pub struct Outcome {
    pub patch: Option<Patch>,
    pub pushed_commit: Option<String>,
    pub pushed_branch: Option<String>,
}

impl Repos {
    pub fn open(data_dir: &Path, settings: RepoSettings) -> std::io::Result<Repos> {
        let cache = MirrorCache::open(data_dir.join("repos"), settings.cache_max_bytes)?;
        Ok(Repos { settings, cache })
    }

    /// Clears what an agent killed mid-fetch left in the mirrors (see
    /// [`MirrorCache::recover`]). Only the agent calls it, once, before its first job.
    pub fn recover(&self) {
        self.cache.recover();
    }

    /// The repositories whose mirror this agent holds (names as `shared::repo::RepoUrl::name`).
    pub fn mirror_names(&self) -> Vec<String> {
        self.cache.mirror_names()
    }

    /// [`Repos::mirror_names`] as the disk has them now (for a hello: see
    /// [`MirrorCache::mirror_names_from_disk`]).
    pub fn mirror_names_from_disk(&self) -> Vec<String> {
        self.cache.mirror_names_from_disk()
    }

    fn source(&self, url: &RepoUrl) -> Source {
        Source {
            name: url.name(),
            url: url.url(),
            host: url.host().to_string(),
            token: self.settings.token_for(url.host()).cloned(),
        }
    }

    /// Checks the host, brings the mirror up to date and makes the job's checkout in
    /// `workspace` (which must be empty). Dropping the future stops the fetch; a checkout
    /// under way cannot be stopped (libgit2 offers no way to), so `checkout` says when one
    /// began and when it has ended: the workspace is removed only then, and the mirror's
    /// lease is held until then (a timeout or a cancel mid-checkout left the checkout
    /// writing into a folder being removed, which stayed, and its mirror open to eviction).
    pub async fn prepare(&self, spec: &JobSpec, workspace: &Path, checkout: CheckoutSignals) -> Result<Prepared, RepoError> {
        let text = spec.repo_url.as_deref().unwrap_or_default();
        // The edge checked it; the side that fetches checks again.
        let url = RepoUrl::parse(text).map_err(|e| local("read repo_url", e))?;
        if !self.settings.host_allowed(&url) {
            return Err(RepoError::HostNotAllowed { host: url.host().to_string() });
        }
        let lease = self.cache.acquire(self.source(&url), spec.allow_stale).await?;
        if let Some(branch) = &spec.push_branch {
            // Refused before Claude runs, not after it worked for nothing.
            if lease.default_branch().as_deref() == Some(branch.as_str()) {
                return Err(RepoError::PushToDefault { branch: branch.clone() });
            }
        }
        let (fetched, dir, branch, working_dir, shown, max_bytes) =
            (lease.fetched.clone(), workspace.to_path_buf(), spec.branch.clone(), spec.working_dir.clone(), url.url(), self.settings.max_checkout_bytes);
        let CheckoutSignals { started, done } = checkout;
        started.store(true, Ordering::SeqCst);
        // The lease goes with the work and comes back with it: dropped with it if this
        // future is (then `done`, dropped last, says the workspace is the runner's again).
        let made = tokio::task::spawn_blocking(move || {
            let made = checkout::create(&lease.dir, fetched.as_deref(), &dir, branch.as_deref(), &shown, max_bytes)
                .and_then(|checkout| Ok((checkout::working_dir(&checkout.dir, working_dir.as_deref())?, checkout)));
            let made = made.map(|(cwd, checkout)| (checkout, cwd, lease));
            drop(done);
            made
        })
        .await
        .unwrap_or_else(|e| Err(local("check out the repository", e)))?;
        let (checkout, cwd, lease) = made;
        Ok(Prepared { lease, url, checkout, cwd })
    }
}

impl Prepared {
    /// The commit Claude started from.
    pub fn commit(&self) -> String {
        self.checkout.commit.to_string()
    }

    /// The job ran on the mirror's last fetched state because a fetch failed.
    pub fn stale(&self) -> bool {
        self.lease.stale
    }

    /// How long bringing the mirror up to date took.
    pub fn fetch_ms(&self) -> u64 {
        self.lease.fetch_ms
    }

    /// After Claude: the diff (`include_diff`) and the push (`push_branch`). `redactor`
    /// masks the diff and refuses to push changes that hold a token.
    ///
    /// At `give_up_at` the work is told to stop at its next step (a push not yet under
    /// way never starts) and is then waited for: a push the server is already taking ends
    /// first, so the answer says what happened, and nothing lands after it.
    pub async fn finish(self, repos: &Repos, spec: &JobSpec, job_id: &str, redactor: std::sync::Arc<Redactor>, give_up_at: tokio::time::Instant) -> Result<Outcome, RepoError> {
        if !spec.include_diff && spec.push_branch.is_none() {
            return Ok(Outcome::default());
        }
        let settings = repos.settings.clone();
        let source = repos.source(&self.url);
        let shown = source.url.clone();
        let spec = spec.clone();
        let message = spec.commit_message.clone().unwrap_or_else(|| format!("Changes by Claude Runner job {job_id}"));
        let abort = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&abort);
        let mut work = tokio::task::spawn_blocking(move || {
            let prepared = self;
            let (dir, base) = (&prepared.checkout.dir, prepared.checkout.commit);
            let too_slow = || RepoError::HandBackTooSlow { url: source.url.clone() };
            let given_up = || abort.load(Ordering::SeqCst);
            let mut outcome = Outcome::default();
            if spec.include_diff {
                let mut patch = changes::patch(dir, base, settings.max_diff_bytes)?;
                // The paths are redacted with the result's other words (`runner::scrub`).
                patch.text = redactor.redact(&patch.text);
                outcome.patch = Some(patch);
            }
            if let Some(branch) = spec.push_branch {
                if given_up() {
                    return Err(too_slow());
                }
                let staged = changes::stage(dir, base, &abort).map_err(|e| if given_up() { too_slow() } else { e })?;
                if staged.adds_secret(|line| redactor.redact(line) != line)? {
                    return Err(RepoError::SecretInChanges);
                }
                let commit = staged.commit(&settings.author_name, &settings.author_email, &message)?;
                if let Some(commit) = commit {
                    if given_up() {
                        return Err(too_slow());
                    }
                    let target = PushTarget {
                        url: source.url.clone(),
                        host: source.host.clone(),
                        token: source.token.clone(),
                        branch: branch.clone(),
                        default_branch: prepared.lease.default_branch(),
                    };
                    staged.push(&target, commit, &abort).map_err(|e| if given_up() { too_slow() } else { e })?;
                    outcome.pushed_commit = Some(commit.to_string());
                }
                outcome.pushed_branch = Some(branch);
            }
            Ok(outcome)
        });
        let done = tokio::select! {
            done = &mut work => done,
            _ = tokio::time::sleep_until(give_up_at) => {
                stop.store(true, Ordering::SeqCst);
                // A push under way is waited for, so the result says how it ended on the
                // server; bounded, since libgit2 may not return (a server sending a byte at
                // a time): the job's slot is not held for ever.
                match tokio::time::timeout(HAND_BACK_ABANDON, work).await {
                    Ok(done) => done,
                    Err(_) => Ok(Err(RepoError::HandBackAbandoned { url: shown })),
                }
            }
        };
        done.unwrap_or_else(|e| Err(local("collect the job's changes", e)))
    }
}

/// Shrinks a result that would not fit in `max_bytes` of its frame (a WebSocket frame,
/// with room for the message around it): the diff is cut further (`diff_truncated`), then
/// the file list. JSON escaping can make a diff under `MAX_DIFF_BYTES` larger than the
/// frame — twice over: see [`framed_len`].
pub fn fit_result(result: &mut JobResult, max_bytes: usize) {
    for _ in 0..8 {
        let size = framed_len(result);
        if size <= max_bytes {
            return;
        }
        let over = size - max_bytes;
        match &mut result.diff {
            Some(diff) if !diff.is_empty() => {
                let keep = diff.len().saturating_sub(over + 1024);
                let cut = shared::text::truncate(diff, keep);
                // On a line boundary, as MAX_DIFF_BYTES cuts.
                let cut = cut.rfind('\n').map_or("", |i| &cut[..=i]);
                *diff = cut.to_string();
                result.diff_truncated = Some(true);
            }
            _ => match &mut result.files_changed {
                Some(files) if !files.is_empty() => {
                    files.truncate(files.len() / 2);
                }
                _ => return,
            },
        }
    }
}

/// The bytes `result` takes in its frame. Its JSON text goes as the payload of a MACed
/// envelope ([`shared::envelope::Tagged`]), a JSON string itself, where each `"` and `\`
/// of the text takes two bytes (serde_json leaves no raw control character in it to be
/// escaped again): a diff of quotes and backslashes takes four bytes a character there.
fn framed_len(result: &JobResult) -> usize {
    serde_json::to_string(result).map_or(usize::MAX, |text| text.len() + text.bytes().filter(|b| matches!(b, b'"' | b'\\')).count())
}

#[cfg(test)]
mod tests;
