//! Why a repository could not be used, each as a sentence that says what to do next (the
//! `error` of a `REPO_ERROR` result), and how a libgit2 error becomes one of them.

use git2::{ErrorClass, ErrorCode};

/// Words of an error that are mostly fixed but may come from another process (the git
/// worker's answer, `super::worker`).
pub type Text = std::borrow::Cow<'static, str>;

/// Serialisable: most are found in the git worker (`super::worker`) and sent to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum RepoError {
    #[error("the repository host `{host}` is not allowed on this runner: add it to ALLOWED_REPO_HOSTS on the runner machine, or use a repository on an allowed host")]
    HostNotAllowed { host: String },
    #[error("the repository {url} was not found: check `repo_url`{hint}")]
    NotFound { url: String, hint: Text },
    #[error("{url} needs authentication and the runner has no token for {host}: set GITHUB_TOKEN (github.com) or REPO_TOKENS=`{host}=<token>` on the runner machine, or check that `repo_url` names an existing repository")]
    NoToken { url: String, host: String },
    #[error("the git server refused the runner's token for {host}: renew the token (GITHUB_TOKEN for github.com, else REPO_TOKENS) on the runner machine, and check that it can {access} {url}")]
    TokenRefused { url: String, host: String, access: Text },
    #[error("`{branch}` is neither a branch, a tag nor a commit of {url}: check `branch` (leave it out for the default branch)")]
    BranchNotFound { branch: String, url: String },
    #[error("`{branch}` names both a {kind} of {url} and the commit {commit}, and the runner will not guess which was meant: send the whole sha ({commit}) to start from the commit, or give the {kind} a name that is not hex")]
    AmbiguousBranch { branch: String, kind: Text, commit: String, url: String },
    #[error("{url} has no branches yet: push a first commit, or use another repository")]
    Empty { url: String },
    #[error("could not reach {url} ({detail}): check the runner machine's network and `repo_url`, then retry; send \"allow_stale\": true to run on the last fetched state while the server is unreachable")]
    Network { url: String, detail: String },
    #[error("{url} answered with a redirect, and the runner follows none (it could lead off ALLOWED_REPO_HOSTS): use the repository's current address in `repo_url`")]
    Redirected { url: String },
    #[error("the TLS certificate of {url} is not trusted ({detail}): install the server's CA on the runner machine (system trust store, or SSL_CERT_FILE)")]
    Tls { url: String, detail: String },
    #[error("the disk holding DATA_DIR is full ({detail}): free space on the runner machine or lower REPO_CACHE_MAX_BYTES, then retry")]
    /// `needed`: the bytes a checkout that filled the disk was measured to need before it
    /// was written (`checkout::Measured::needed`); none when a fetch filled it. `fetch_needs`:
    /// what a fetch that filled it is estimated to need from what it had received
    /// (`layout::fetch_needs`, an estimate): the room made for its next try
    /// (`Repos::make_room`), never the measure `needed` is (`runner::full_disk`).
    DiskFull {
        detail: String,
        #[serde(default)]
        needed: Option<u64>,
        #[serde(default)]
        fetch_needs: Option<u64>,
    },
    /// A full disk met by a job's fetch or checkout that had room again once what it wrote
    /// was removed (`runner::full_disk`): the repository itself does not fit. `lower` says
    /// what `REPO_CACHE_MAX_BYTES` can free, when mirrors of other repositories share the
    /// disk; `step`, which filled it ("fetch", "checkout": a fetch's was said as a checkout's).
    #[error("{url} needs more free space than the disk holding DATA_DIR has ({detail}): its {step} filled that disk, which had room again once what it wrote was removed, so nothing ran and the job fails the same here until there is more; free space on that disk or give DATA_DIR a larger one{lower}, or use a smaller repository (or a branch or commit with fewer files){}", uncounted_words(*.uncounted))]
    TooBigForDisk {
        url: String,
        detail: String,
        lower: String,
        #[serde(default)]
        step: Text,
        /// As [`RepoError::NoRoom`]'s.
        #[serde(default)]
        uncounted: bool,
    },
    /// A checkout that fit the disk's free space when measured filled the disk, which had
    /// room for it again once the checkout was removed: another writer took the room
    /// meanwhile (`runner::full_disk`). Retryable.
    #[error("the checkout of {url} filled the disk holding DATA_DIR ({detail}) though it was measured to fit (about {needed} bytes): another process wrote to that disk meanwhile, and {free} bytes are free again, so nothing ran; retry")]
    FilledMeanwhile { url: String, detail: String, needed: u64, free: u64 },
    /// A fetch that filled the disk, estimated (`layout::fetch_needs`) to fit with the
    /// disk's reserve in what is free again once what it wrote was removed, or in that and
    /// what the workspaces of other running jobs and the mirrors of other repositories that
    /// jobs hold or fetch now take (`held`: gone, or evictable for room, once those jobs are
    /// done): other writers took the room meanwhile
    /// (`runner::full_disk`). Retryable: judged "too big" it failed for good a repository
    /// that fits the disk alone, told to lower the cache for another job's fetch (rev37-2).
    #[error("the fetch of {url} filled the disk holding DATA_DIR ({detail}), though it is estimated to need about {needs} bytes and {free} bytes are free again{}: other writers took that room meanwhile, so nothing ran; retry", beside(.held))]
    FetchFilledMeanwhile { url: String, detail: String, needs: u64, free: u64, held: Option<HeldRoom> },
    /// A fetch or checkout (`step`) that ran out of room, made room for and tried again
    /// (`rounds` times, `evicted` idle mirrors gone: `Repos::make_room`), whose job's
    /// timeout ended meanwhile (`runner::run_in`): the full disk cost the time, not only
    /// the git server.
    #[error("the {step} of {url} ran out of room on the disk holding DATA_DIR, and the job's timeout_ms ({timeout_ms} ms) ended while room was made for it and it was tried again ({rounds} tries after the first, {evicted} idle mirrors of other repositories evicted), so nothing ran: free space on that disk (or lower REPO_CACHE_MAX_BYTES), or retry with a larger timeout_ms")]
    RoomTimedOut { url: String, step: Text, timeout_ms: u64, rounds: u32, evicted: usize },
    #[error("fetching {url} did not finish within the job's timeout_ms ({timeout_ms} ms): the git server is slow or not answering, or the repository is large for the time given; retry, raise timeout_ms, or send \"allow_stale\": true")]
    FetchTimedOut { url: String, timeout_ms: u64 },
    #[error("{url} sent more than REPO_MAX_FETCH_BYTES ({max_bytes} bytes) in one fetch, so the fetch was stopped and what it received removed: the repository is larger than this runner allows (or the server sends without end); raise REPO_MAX_FETCH_BYTES (and REPO_CACHE_MAX_BYTES, and the disk holding DATA_DIR) on the runner machine, or use a smaller repository")]
    FetchTooBig { url: String, max_bytes: u64 },
    #[error("{url} has {count} branches and tags, more than the {max} the runner takes from one repository, so none was fetched: delete old tags or branches on the server, or use another repository")]
    TooManyRefs { url: String, count: usize, max: usize },
    /// The server's list of refs cut as it was read (`super::advert`): counted in the
    /// list's lines, which are not its branches and tags (a line per ref the server names,
    /// pull requests' too on some hosts, and a second for each annotated tag), so not said
    /// as a count of refs. `done`: "fetched" or "pushed".
    #[error("the git server's list of refs for {url} ran past {max_lines} lines or {max_bytes} bytes as the runner read it (cut at line {lines}; the list has a line for every ref the server names, pull requests' too on some hosts, and a second for each annotated tag), so the runner stopped reading it and nothing was {done}: the repository names far more refs than the runner takes ({max_refs} branches and tags), or the server sends its list without end; delete old tags and branches (or other refs) on the server, or use another repository")]
    RefListCut { url: String, lines: usize, max_lines: usize, max_bytes: usize, max_refs: usize, done: Text },
    #[error("the runner's mirror of {url} is damaged ({detail}: a job on this runner may have written into it), so nothing ran; the agent fetches it anew for the next job: run the job again")]
    MirrorBroken { url: String, detail: String },
    #[error("checking out {url} did not finish within the job's timeout_ms ({timeout_ms} ms), and nothing ran: the repository is large for this machine's disk; raise timeout_ms")]
    CheckoutTimedOut { url: String, timeout_ms: u64 },
    #[error("{url} at {commit} is too large to check out ({what}), and nothing ran: start from a smaller branch or commit, or raise REPO_MAX_CHECKOUT_BYTES on the runner machine (a file over 1 GiB is never checked out)")]
    CheckoutTooBig { url: String, commit: String, what: String },
    #[error("{url} needs more free space than the disk holding DATA_DIR has ({what}), so its checkout was refused before anything was written and nothing ran: free space on that disk or give DATA_DIR a larger one{lower}, or use a smaller repository (or a branch or commit with fewer files){}", uncounted_words(*.uncounted))]
    /// `needed`: the bytes the checkout was measured to need (`checkout::Measured::needed`),
    /// when it is the bytes that are short (not the files and folders). `lower`: what
    /// `REPO_CACHE_MAX_BYTES` can free, set by the runner's verdict (`Repos::no_room`) only
    /// while idle mirrors of other repositories share the disk: named with none, it sent
    /// the operator to a cache that held nothing there (rev40b-1).
    NoRoom {
        url: String,
        what: String,
        #[serde(default)]
        needed: Option<u64>,
        #[serde(default)]
        lower: String,
        /// Whether the room other jobs hold was counted in part only (the walk of their
        /// workspaces cut short, `Repos::other_workspaces_bytes`): the verdict judged them
        /// at their most (`runner::held_at_most`), and the words say so.
        #[serde(default)]
        uncounted: bool,
    },
    #[error("the checkout's `{path}` is neither a file nor a folder (a FIFO, a link, a device: a command of the job made it), so the job's changes were not read and nothing was pushed: ask Claude not to change the repository's .git folder")]
    OddGitEntry { path: String },
    #[error("handing back the job's changes ({url}) did not end within 15 s past the job's timeout_ms and its grace, and was given up: a push may or may not have reached the server, so look at the branch there before running the job again")]
    HandBackAbandoned { url: String },
    #[error("the agent's git process handing back the job's changes ({url}) ended before it answered (killed: by a job of the runner machine's user, or out of memory): a push may or may not have reached the server, so look at the branch there before running the job again")]
    HandBackLost { url: String },
    /// A checkout refused for want of room ([`RepoError::NoRoom`], `needed` bytes) that
    /// fits the disk once the room held now goes (`runner::full_disk`): the workspaces of
    /// other running jobs (`workspaces` bytes: removed once those jobs are done), and the
    /// mirrors of other repositories in use (`held` bytes: held by jobs, or read by a
    /// repack, which may go for room once none holds it). Retryable: judged "too big" it
    /// failed for good a repository that fits the disk beside nothing held (evict2's
    /// leftover, session 44; beside another job of its own repository, rev40b-1). The
    /// refusal leaves a claim on that room (`claim`): jobs on repositories started after
    /// it are refused ([`RepoError::RoomClaimed`]) until the retry is through, so a
    /// repository whose jobs overlap no longer keeps its mirror from ever going (rev40b-2).
    #[error("the checkout of {url} was refused before anything was written for want of room ({what}), {}: the workspaces of other running jobs take {} of it, and the mirrors of other repositories in use now (held by jobs, or being repacked) {held}; a workspace goes once its job is done, a mirror may go for room once nothing holds it, {}", fits(.claim), counted(*.workspaces, .claim), kept(.claim))]
    RoomHeld {
        url: String,
        what: String,
        held: u64,
        #[serde(default)]
        workspaces: u64,
        /// The bytes the checkout was measured to need: its claim on the room
        /// (`claim::Claims::refused`).
        #[serde(default)]
        needed: u64,
        /// Whether the refusal claims the room, and why not ([`RoomClaim`]): the words say
        /// what holds (rev45b-4: they promised the room was kept when no claim was made).
        #[serde(default)]
        claim: RoomClaim,
    },
    /// A job on a repository started while checkouts refused for room other jobs hold
    /// ([`RepoError::RoomHeld`]) claim that room (`claims` of them, `bytes` in all,
    /// `super::claim`): refused before its fetch when that room is not free now, or at its
    /// checkout when it would take it (`measured`: its size known), so that it does not
    /// hold the room the claimants wait for (rev40b-2: their retries lost for as long as
    /// later jobs overlapped). Retryable: the claims end once their claimants' retries are
    /// through, or lapse (`lapses_s`).
    #[error("the job on {url} was refused before its checkout was written, and nothing ran: {claims} earlier job(s) of this runner, refused for want of room that running jobs hold, claim {bytes} bytes of its disk first, {}; retry in a little while ({})", if *.measured { "which this job would have taken" } else { "and that room is not free now, whatever this job's size" }, claims_end(*.under_way, *.lapses_s))]
    RoomClaimed {
        url: String,
        claims: usize,
        bytes: u64,
        lapses_s: u64,
        /// A retry of a claimant is under way: its claim stands until that job is settled.
        #[serde(default)]
        under_way: bool,
        #[serde(default)]
        measured: bool,
    },
    #[error("`working_dir` `{dir}` {why}: give a folder of the repository, like `packages/api`")]
    WorkingDir { dir: String, why: Text },
    #[error("`push_branch` `{branch}` is the repository's default branch, and the runner never pushes to it: name another branch and open a pull request from it")]
    PushToDefault { branch: String },
    #[error("{cause}; `allow_stale` could not help: this agent has no fetched state of {url} of its own to run on (it has not fetched it since it started, or its mirror was removed), and it does not run on the mirror's refs on disk, which a job may have changed: retry once the server answers")]
    NoStaleState { cause: String, url: String },
    #[error("{url} could not be fetched, so the runner does not know the repository's default branch now, which it never pushes to: nothing ran; retry with `push_branch` once the server answers, or leave `push_branch` out to run on the last fetched state")]
    PushNeedsFetch { url: String },
    #[error("the branch `{branch}` already exists on the server and does not lead to the job's commit, and the runner never force-pushes: choose a new `push_branch`, or start the job from that branch (\"branch\": \"{branch}\")")]
    NotFastForward { branch: String },
    #[error("the git server refused the push to `{branch}`: {message}; check the branch's protection rules and the token's write access")]
    PushRejected { branch: String, message: String },
    #[error("handing back the job's changes ({url}) took longer than its timeout_ms plus the grace for it, so nothing was pushed: raise timeout_ms, or check the git server's speed")]
    HandBackTooSlow { url: String },
    #[error("the push to `{branch}` of {url} broke off once the commit had begun to go out ({detail}): it may or may not have reached the server, so look at the branch there before running the job again")]
    PushInDoubt { url: String, branch: String, detail: String },
    #[error("`{path}` is {mib} MiB, more than the {max_mib} MiB a push carries (git servers such as GitHub refuse bigger files), so nothing was pushed: have Claude leave it out of the repository (delete it, or list it in .gitignore)")]
    FileTooBig { path: String, mib: u64, max_mib: u64 },
    #[error("the files the job changed come to {mib} MiB or more together, more than the {max_mib} MiB a push carries of them, so nothing was pushed (they were not read): have Claude leave big outputs out of the repository (delete them, or list them in .gitignore)")]
    ChangesTooBig { mib: u64, max_mib: u64 },
    #[error("`{path}` is {what}, which git cannot store, so nothing was pushed: have Claude remove it (or put back the file it replaced)")]
    Unstageable { path: String, what: String },
    #[error("`{path}` is a git repository of its own inside the checkout (a folder holding `.git`), which the runner does not push, as a submodule or otherwise, so nothing was pushed: have Claude remove it, or list it in .gitignore")]
    NestedRepository { path: String },
    #[error("the commit the submodule `{path}` is at could not be read ({why}), so the job's changes were not read and nothing was pushed: have Claude leave the submodule's git files as git made them, or empty its folder to keep the submodule at the commit it was")]
    Submodule { path: String, why: String },
    #[error("the submodule `{path}` keeps its refs in a reftable (`{table}`: git's `--ref-format=reftable`), which the runner does not read, so the job's changes were not read and nothing was pushed: have Claude clone the submodule with git's default ref format, or empty its folder to keep the submodule at the commit it was")]
    SubmoduleReftable { path: String, table: String },
    #[error("the submodule `{path}` is left in conflict (a merge, rebase or cherry-pick Claude did not finish), so the job's changes were not read and nothing was pushed: have Claude check out in `{path}` the commit it should be at and run `git add {path}`, or abort the merge (`git merge --abort`)")]
    SubmoduleConflicted { path: String },
    #[error("`{path}` {why}, so the job's changes were not read and nothing was pushed: have Claude make it a plain file of ignore rules, or remove it")]
    IgnoreFile { path: String, why: String },
    #[error("a git setting the runner does not control (the checkout's .git/config, written by the job) redirected the push from {url} to {to}, so nothing was pushed: remove the `url.*.insteadOf` / `pushInsteadOf` setting, and ask Claude not to change git's configuration")]
    PushRedirected { url: String, to: String },
    #[error("the changes contain a secret of the runner machine (a token), so nothing was pushed: ask Claude not to write credentials into the repository")]
    SecretInChanges,
    #[error("could not {action}: {detail}")]
    Git { action: Text, detail: String },
}

/// Whether a checkout refused for room other jobs hold ([`RepoError::RoomHeld`]) claims it
/// for its retry (`super::claim`), and why not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RoomClaim {
    /// Not settled yet: the verdict allows a claim (`Repos::settle_claim` makes it).
    #[default]
    Wanted,
    /// Made, or renewed in its place.
    Made,
    /// None: [`super::claim::MAX_CLAIMS`] stand.
    TooMany,
    /// None: the room is held by jobs of the same repository and branch, which a claim
    /// never holds back (rev45b-2: it held back only the other repositories, at every
    /// overlap of that one's jobs).
    OwnJobs,
    /// None: the walk of the other jobs' workspaces was cut short, so the room they hold is
    /// known in part only (rev45b-1).
    Uncounted,
}

/// [`RepoError::RoomClaimed`]'s words on when the claims end: a claim whose claimant's
/// retry is fetching or checking out stands until that job is settled, however long.
fn claims_end(under_way: bool, lapses_s: u64) -> String {
    match under_way {
        false => format!("the claims end once those jobs' retries are through, or lapse within {lapses_s} s"),
        true => format!("the claims end once those jobs' retries are through; one is fetching or checking out now, and its claim stands until that job is past its checkout or ends (up to its timeout_ms), then lapses within {lapses_s} s"),
    }
}

/// [`RepoError::RoomHeld`]'s words on whether the checkout fits: judged on the room held
/// at its most when it was not all counted, it may not (review rev45e, 2).
fn fits(claim: &RoomClaim) -> &'static str {
    match claim {
        RoomClaim::Uncounted => "though it may fit the disk once other running jobs are done (the room they hold was taken at its most: all the disk's used bytes but this repository's mirror)",
        _ => "though it fits the disk beside nothing held",
    }
}

/// Why the other jobs' workspaces were not all counted: the walk's bounds.
fn uncountable() -> String {
    format!("the runner could not count them all within {} files and folders and {} s", super::WORKSPACES_WALK, super::WORKSPACES_WALK_TIME.as_secs())
}

/// [`RepoError::RoomHeld`]'s words on the other jobs' workspaces: what was counted.
fn counted(bytes: u64, claim: &RoomClaim) -> String {
    match claim {
        RoomClaim::Uncounted => format!("at least {bytes} bytes ({})", uncountable()),
        _ => format!("{bytes} bytes"),
    }
}

/// [`RepoError::RoomHeld`]'s words on what is kept for the retry ([`RoomClaim`]).
fn kept(claim: &RoomClaim) -> String {
    let ttl = super::claim::CLAIM_TTL.as_secs();
    let why = match claim {
        RoomClaim::Made => {
            return format!("and this runner keeps jobs started meanwhile from taking that room while this job's retry (the same repository and branch) comes within {ttl} s, so nothing ran; retry")
        }
        RoomClaim::TooMany => format!("as {} earlier refused jobs claim room already", super::claim::MAX_CLAIMS),
        RoomClaim::OwnJobs => "as jobs of the same repository and branch hold it".to_string(),
        RoomClaim::Uncounted => "as the other jobs' workspaces could not all be counted".to_string(),
        RoomClaim::Wanted => "".to_string(),
    };
    format!("so nothing ran; retry once those jobs are done (the room is not kept for this job's retry meanwhile{}{why})", if why.is_empty() { "" } else { ", " })
}

/// The words of a verdict "too big" judged on room other jobs hold counted in part only:
/// judged at its most, it is too big even once they are done.
fn uncounted_words(uncounted: bool) -> String {
    match uncounted {
        true => format!("; the runner could not count the other running jobs' workspaces within {} files and folders and {} s, so it took them to hold at most all the disk holds but this repository's mirror, and even that room freed would not be enough", super::WORKSPACES_WALK, super::WORKSPACES_WALK_TIME.as_secs()),
        false => String::new(),
    }
}

impl RepoError {
    /// Whether the same job sent again (later, or to another runner) may work as it is: a
    /// server that could not be reached may answer then, and nothing ran. Every other
    /// sentence asks for a change first (a setting, `repo_url`, the server's contents), or
    /// tells of a push that may have landed.
    pub fn retryable(&self) -> bool {
        matches!(self, RepoError::Network { .. } | RepoError::FilledMeanwhile { .. } | RepoError::FetchFilledMeanwhile { .. } | RepoError::RoomHeld { .. } | RepoError::RoomClaimed { .. })
    }
}

/// The room other jobs hold on a disk a fetch filled ([`RepoError::FetchFilledMeanwhile`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldRoom {
    /// Bytes the workspaces of other running jobs take.
    pub workspaces: u64,
    /// Bytes the mirrors of other repositories in use take (held by jobs, or being repacked).
    pub mirrors: u64,
    /// Whether the walk of the workspaces was cut short: `workspaces` is what it counted,
    /// less than they hold (`Repos::other_workspaces_bytes`).
    #[serde(default)]
    pub uncounted: bool,
}

/// [`RepoError::FetchFilledMeanwhile`]'s words for the room held beside what is free, if
/// the fetch fit only with it.
fn beside(held: &Option<HeldRoom>) -> String {
    match held {
        Some(HeldRoom { workspaces, mirrors, uncounted }) => format!(
            ", beside {}{workspaces} bytes the workspaces of other running jobs take and {mirrors} bytes the mirrors of other repositories in use now take (held by jobs, or being repacked; a workspace goes once its job is done, a mirror may go for room once nothing holds it)",
            if *uncounted { "at least " } else { "" }
        ),
        None => String::new(),
    }
}

/// What the credentials callback saw during one conversation with a git server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuthSeen {
    /// The server asked for credentials and the runner had none for the host.
    pub needed_without_token: bool,
    /// The server asked again after the token was given: it refused it.
    pub token_refused: bool,
}

/// The context of a failed conversation with a git server.
pub struct Talk<'a> {
    pub url: &'a str,
    pub host: &'a str,
    pub auth: AuthSeen,
    /// What the conversation tried: used in the generic sentence.
    pub action: &'static str,
    pub pushing: bool,
}

impl Talk<'_> {
    /// Turns a libgit2 error from a fetch or a push into the sentence a caller sees.
    pub fn error(&self, code: ErrorCode, class: ErrorClass, message: &str) -> RepoError {
        let message = &one_line(message);
        let url = self.url.to_string();
        let host = self.host.to_string();
        let lower = message.to_ascii_lowercase();
        if lower.contains("redirect") || lower.contains("another host") || lower.contains("status code: 30") {
            return RepoError::Redirected { url };
        }
        if self.auth.token_refused {
            let access = if self.pushing { "push to" } else { "read" };
            return RepoError::TokenRefused { url, host, access: access.into() };
        }
        if self.auth.needed_without_token {
            return RepoError::NoToken { url, host };
        }
        // A full disk is the runner's own OS saying so: an error of libgit2's OS class, the
        // errno's words last. A server's words ("remote error: …", libgit2's Net class) may
        // say the same of its own disk, or anything (rev31-3).
        if class == ErrorClass::Os {
            if let Some(e) = disk_full(message) {
                return e;
            }
        }
        if code == ErrorCode::Auth || lower.contains("status code: 401") || lower.contains("authentication required") {
            return RepoError::NoToken { url, host };
        }
        if lower.contains("status code: 404") || lower.contains("repository not found") || lower.contains("not found") && lower.contains("repository") {
            let hint = " (a private repository the runner's token cannot see also looks like this)";
            return RepoError::NotFound { url, hint: hint.into() };
        }
        if lower.contains("status code: 403") {
            let access = if self.pushing { "push to" } else { "read" };
            return RepoError::TokenRefused { url, host, access: access.into() };
        }
        if class == ErrorClass::Ssl || code == ErrorCode::Certificate || lower.contains("certificate") {
            return RepoError::Tls { url, detail: message.to_string() };
        }
        // libgit2 reports a socket's failure (connect, resolve, a read timing out) in the
        // OS class too, beside the local file system's: only the first is the server out of
        // reach, retryable. "failed to make directory …: Permission denied" in the mirror
        // is a local fault (`Git`, which the mirror's rebuild looks for), not "then retry".
        // Read where libgit2 puts its own words (first) and the OS's (last), never in
        // between, where the paths it names are: a mirror's folder is the repository's name
        // (`github.com+TryGhost+Ghost.git`, `socket.io`), and a word there is no socket
        // (rev24-3), nor are words between quotes of a path's own (rev31-4).
        let socket = LIBGIT2_UNREACHABLE.iter().any(|w| lower.starts_with(w)) || SOCKET_ERRNOS.iter().any(|&errno| ends_in_os_words(&lower, errno));
        if matches!(class, ErrorClass::Net | ErrorClass::Http) || class == ErrorClass::Os && socket || code == ErrorCode::Timeout {
            return RepoError::Network { url, detail: message.to_string() };
        }
        RepoError::Git { action: self.action.into(), detail: message.to_string() }
    }
}

/// The errnos of a socket's failure: the server out of reach. A message of libgit2's OS
/// class ends in the OS's words for its errno ([`os_words`]), which are read for these.
const SOCKET_ERRNOS: [i32; 7] = [libc::ECONNREFUSED, libc::ECONNRESET, libc::ECONNABORTED, libc::EHOSTUNREACH, libc::ENETUNREACH, libc::ETIMEDOUT, libc::EPIPE];

/// libgit2's own words for a server out of reach, whatever words follow them:
/// "failed to connect to HOST" (`streams/socket.c`, then the errno's words), "failed to
/// resolve address for HOST" (then `getaddrinfo`'s words, which are no errno's), and
/// "failed to resolve path '…'" of a `file://` remote that is gone (`util/fs_path.c`: the
/// local transport's server is a path; the repository tests use one as a server out of
/// reach).
const LIBGIT2_UNREACHABLE: [&str; 2] = ["failed to connect", "failed to resolve"];

/// What the OS says for `errno`, in lower case, without the " (os error N)" std adds: the
/// words libgit2 appends to a message of its OS class (`strerror`, from the same C
/// library), so they are read as this machine's C library writes them, not from a list
/// of one library's words (glibc's and musl's differ: "Connection timed out", "Operation
/// timed out").
fn os_words(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let suffix = format!(" (os error {errno})");
    text.strip_suffix(suffix.as_str()).unwrap_or(&text).to_ascii_lowercase()
}

/// Whether `text` (in lower case) ends in the OS's words for `errno` ([`os_words`]): as
/// libgit2 ends a message of its OS class (": " and `strerror`), and std an `io::Error`
/// (the words, then " (os error N)"). Read at the end only: what comes before is libgit2's
/// words and the paths it names, which may hold anything — an errno's words, quotes of
/// their own around them (rev28-4, rev31-4).
fn ends_in_os_words(text: &str, errno: i32) -> bool {
    let text = text.trim_end();
    let text = text.strip_suffix(format!(" (os error {errno})").as_str()).unwrap_or(text);
    text.strip_suffix(os_words(errno).as_str()).is_some_and(|before| before.is_empty() || before.ends_with(": "))
}

/// The disk-full error, if `message` (an OS's error, or words that end in one) is one: it
/// ends in the OS's words for ENOSPC or EDQUOT ([`crate::files::DISK_FULL_ERRNOS`], the
/// errnos `files::disk_full` reads by kind). A libgit2 error is read so only when of its
/// OS class ([`git`], [`Talk::error`]): another class's words end in what it quotes, a
/// server's words, a path.
pub fn disk_full(message: &str) -> Option<RepoError> {
    let lower = message.to_ascii_lowercase();
    crate::files::DISK_FULL_ERRNOS
        .iter()
        .any(|&errno| ends_in_os_words(&lower, errno))
        .then(|| RepoError::DiskFull { detail: message.to_string(), needed: None, fetch_needs: None })
}

/// Text from outside (a git server's words, a path Claude chose) as one line.
pub use shared::text::one_line;

/// A local git or file-system step that failed (no server involved): an OS's error
/// (`io::Error`), or words that end in one.
pub fn local(action: &'static str, message: impl ToString) -> RepoError {
    let message = one_line(&message.to_string());
    disk_full(&message).unwrap_or(RepoError::Git { action: action.into(), detail: message })
}

/// A local libgit2 step that failed: a full disk only when of libgit2's OS class (a
/// checkout's refusal of a path quotes the path, which may hold any words: rev31-4).
pub fn git(action: &'static str, e: &git2::Error) -> RepoError {
    let message = one_line(e.message());
    match e.class() {
        ErrorClass::Os => disk_full(&message),
        _ => None,
    }
    .unwrap_or(RepoError::Git { action: action.into(), detail: message })
}

/// The error of a libgit2 step that failed without a word, writing into `dir`: libgit2
/// loses the error of a write refused in one of its buffered files (its `filebuf`: a
/// checkout's index, written last, a fetch's pack index, the config), and fails with "no
/// error", of no class. Never said so: the disk holding `dir` is asked. Less free than
/// `needs` bytes (`what` names them: "its index needs") — the buffered file gives back,
/// removed, all it held, and a fetch's pack goes with its index — and the disk is full
/// ([`RepoError::DiskFull`], judged as any: `runner::full_disk`); else what is known
/// (hostile review rev31, 5: a checkout told "could not check out the repository: no
/// error"; closing-28: a fetch told "could not fetch the repository: no error").
pub fn unsaid(dir: &std::path::Path, action: &'static str, writing: &str, needs: u64, what: &str) -> RepoError {
    let why = format!("libgit2 stopped writing {writing} without saying why");
    match crate::workspace::disk_space(dir) {
        Ok(space) if space.free < super::checkout::whole_blocks(needs, space.block).saturating_add(space.block) => RepoError::DiskFull {
            detail: format!("{why}, and the disk holding it has {} bytes free, less than {what} ({needs} bytes)", space.free),
            needed: None,
            fetch_needs: None,
        },
        Ok(space) => local(action, format!("{why}, with {} bytes free on the disk holding it", space.free)),
        Err(e) => local(action, format!("{why}, and the disk holding it could not be asked for its free space ({e})")),
    }
}

/// A local libgit2 step that wrote into the repository at `dir` (its `.git` folder) and
/// failed: [`unsaid`] when libgit2 said nothing (a loose object's write refused by a full
/// disk comes back from libgit2 1.9 as "no error", of no class: rev35, a push's hand-back
/// past what staging keeps in memory told "could not collect the job's changes: no
/// error"), else [`git`].
pub fn wrote(dir: &std::path::Path, action: &'static str, e: &git2::Error, writing: &str, needs: u64, what: &str) -> RepoError {
    match e.class() {
        ErrorClass::None => unsaid(dir, action, writing, needs, what),
        _ => git(action, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rev45d-1: a fetch that fit only beside room other jobs hold, their workspaces counted
    /// in part, says the bytes counted are "at least" what they hold, as `RoomHeld` does.
    #[test]
    fn a_fetch_beside_workspaces_counted_in_part_says_at_least() {
        let said = |uncounted| {
            let held = Some(HeldRoom { workspaces: 7, mirrors: 3, uncounted });
            RepoError::FetchFilledMeanwhile { url: "u".into(), detail: "d".into(), needs: 1, free: 1, held }.to_string()
        };
        assert!(said(true).contains("beside at least 7 bytes the workspaces"), "{}", said(true));
        assert!(said(false).contains("beside 7 bytes the workspaces"), "{}", said(false));
    }

    fn talk(auth: AuthSeen) -> Talk<'static> {
        Talk { url: "https://git.example.com/a/b", host: "git.example.com", auth, action: "fetch the repository", pushing: false }
    }

    #[test]
    fn server_failures_get_their_own_sentence() {
        let t = talk(AuthSeen::default());
        let e = t.error(ErrorCode::GenericError, ErrorClass::Http, "unexpected http status code: 404");
        assert!(matches!(e, RepoError::NotFound { .. }), "{e}");
        let e = t.error(ErrorCode::GenericError, ErrorClass::Net, "failed to connect to 127.0.0.1: Connection refused");
        assert!(matches!(e, RepoError::Network { .. }), "{e}");
        assert!(e.to_string().contains("allow_stale"));
        let e = t.error(ErrorCode::Certificate, ErrorClass::Ssl, "the SSL certificate is invalid");
        assert!(matches!(e, RepoError::Tls { .. }), "{e}");
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "failed to write: No space left on device");
        assert!(matches!(e, RepoError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("REPO_CACHE_MAX_BYTES"));
        let e = t.error(ErrorCode::Auth, ErrorClass::Http, "authentication required but no callback set");
        assert!(matches!(e, RepoError::NoToken { .. }), "{e}");
        // libgit2's OS class: a socket's failure is the server out of reach (retryable); the
        // local file system's is the mirror's own fault, not "could not reach … then retry"
        // (rev23-5).
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "failed to connect to 127.0.0.1: Connection refused");
        assert!(matches!(e, RepoError::Network { .. }) && e.retryable(), "{e}");
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "failed to resolve address for git.example.com: Name or service not known");
        assert!(matches!(e, RepoError::Network { .. }), "{e}");
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "failed to make directory '/m/objects/pack': Permission denied");
        assert!(matches!(e, RepoError::Git { .. }) && !e.retryable(), "{e}");
        // A socket's word in the path (the mirror's folder is the repository's name) is no
        // socket's failure (rev24-3).
        for path in ["/m/github.com+TryGhost+Ghost.git/objects/pack", "/d/socket.io.git/x", "/srv/hosting/neural-network/connection-timeout.git"] {
            let e = t.error(ErrorCode::GenericError, ErrorClass::Os, &format!("failed to make directory '{path}': Permission denied"));
            assert!(matches!(e, RepoError::Git { .. }) && !e.retryable(), "{path}: {e}");
        }
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "failed to send request: Connection reset by peer");
        assert!(matches!(e, RepoError::Network { .. }), "{e}");
    }

    #[test]
    fn what_the_credentials_callback_saw_decides_auth_failures() {
        let refused = talk(AuthSeen { token_refused: true, ..Default::default() });
        let e = refused.error(ErrorCode::User, ErrorClass::Callback, "the token was refused");
        assert!(e.to_string().contains("refused the runner's token for git.example.com"), "{e}");
        let none = talk(AuthSeen { needed_without_token: true, ..Default::default() });
        let e = none.error(ErrorCode::User, ErrorClass::Callback, "no token");
        assert!(e.to_string().contains("REPO_TOKENS=`git.example.com=<token>`"), "{e}");
    }

    #[test]
    fn outside_words_stay_on_one_line() {
        let e = talk(AuthSeen::default()).error(ErrorCode::GenericError, ErrorClass::Net, "remote error: no\nINFO forged\r\x1b[2K");
        assert!(!e.to_string().contains(['\n', '\r', '\x1b']), "{e}");
        assert!(e.to_string().contains("remote error: no\\nINFO forged\\r\\u{1b}[2K"), "{e}");
        assert_eq!(one_line("déjà vu"), "déjà vu");
    }

    /// libgit2 appends the OS's words for an errno (`strerror`) to a message of its OS
    /// class ("SSL error: syscall failure: …" from its TLS stream, "failed to connect to
    /// HOST: …"): each socket errno's words are the server out of reach, each disk-full
    /// errno's a full disk — in this C library's words, whatever they are (glibc's
    /// ECONNABORTED, "Software caused connection abort", was missing from a hand list of
    /// them).
    #[test]
    fn the_oses_words_for_an_errno_decide_a_socket_or_a_full_disk() {
        let t = talk(AuthSeen::default());
        for errno in SOCKET_ERRNOS {
            let words = std::io::Error::from_raw_os_error(errno).to_string();
            let words = words.split(" (os error").next().unwrap();
            let e = t.error(ErrorCode::GenericError, ErrorClass::Os, &format!("SSL error: syscall failure: {words}"));
            assert!(matches!(e, RepoError::Network { .. }) && e.retryable(), "errno {errno}: {e}");
        }
        for errno in crate::files::DISK_FULL_ERRNOS {
            let words = std::io::Error::from_raw_os_error(errno).to_string();
            let e = t.error(ErrorCode::GenericError, ErrorClass::Os, &format!("failed to write: {}", words.split(" (os error").next().unwrap()));
            assert!(matches!(e, RepoError::DiskFull { .. }), "errno {errno}: {e}");
            assert!(matches!(local("check out", &words), RepoError::DiskFull { .. }), "errno {errno}: {words}");
        }
    }

    #[test]
    fn local_failures_recognise_a_full_disk() {
        assert!(matches!(local("check out", "No space left on device (os error 28)"), RepoError::DiskFull { .. }));
        assert!(matches!(local("check out", "permission denied"), RepoError::Git { .. }));
    }

    /// A full disk's words inside a quoted path (a folder Claude or a repository named)
    /// are no full disk: the failure is whatever the words outside the path say (rev28-4).
    #[test]
    fn a_full_disks_words_in_a_quoted_path_are_no_full_disk() {
        let t = talk(AuthSeen::default());
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "path too long: 'a/No space left on device/b'");
        assert!(!matches!(e, RepoError::DiskFull { .. }), "{e}");
        let e = local("check out", "path too long: 'a/No space left on device/b'");
        assert!(matches!(e, RepoError::Git { .. }), "{e}");
        let e = local("check out", "failed to write 'a/b': No space left on device");
        assert!(matches!(e, RepoError::DiskFull { .. }), "{e}");
    }

    /// Words from outside never make a full disk of the runner's (hostile review rev31, 3
    /// and 4): a git server's (libgit2's Net and Http classes: "remote error: …", a status
    /// line), nor a path with quotes of its own, which a reading "outside the quotes"
    /// split at each of them, taking the path's words for libgit2's. Nor do a path's
    /// words make a server out of reach.
    #[test]
    fn outside_words_never_make_a_full_disk_nor_a_server_out_of_reach() {
        let t = talk(AuthSeen::default());
        let full = "No space left on device";
        for class in [ErrorClass::Net, ErrorClass::Http] {
            let e = t.error(ErrorCode::GenericError, class, &format!("remote error: fatal: unable to create temporary file: {full}"));
            assert!(!matches!(e, RepoError::DiskFull { .. }), "{class:?}: {e}");
        }
        let path = format!("cannot checkout to invalid path 'x'{full}'y/.git'");
        assert!(matches!(local("check out", &path), RepoError::Git { .. }), "{path}");
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, &format!("failed to make directory '/m/x'{full}'y': Permission denied"));
        assert!(matches!(e, RepoError::Git { .. }), "{e}");
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, "failed to make directory '/m/x'connection refused'y': Permission denied");
        assert!(matches!(e, RepoError::Git { .. }) && !e.retryable(), "{e}");
        // The OS's own words, where libgit2 and std put them: last.
        let e = t.error(ErrorCode::GenericError, ErrorClass::Os, &format!("failed to write 'x'{full}'y': {full}"));
        assert!(matches!(e, RepoError::DiskFull { .. }), "{e}");
        assert!(matches!(local("check out", format!("'a/b': {}", std::io::Error::from_raw_os_error(libc::ENOSPC))), RepoError::DiskFull { .. }));
    }
    /// A libgit2 error of the agent's own steps (the hand-back's, `changes.rs`, the
    /// checkout's, the repack's) is read by its class (rev32-3): one of the OS class ending
    /// in the OS's words is the agent's full disk; any other class's words are libgit2's
    /// own and what it quotes (a server's answer, a path, a ref's name), whose ending may be
    /// anything, and are said as they are (`Git`, not retryable).
    #[test]
    fn a_libgit2_error_is_the_disks_only_when_of_the_os_class() {
        let full = "No space left on device";
        for class in [ErrorClass::Net, ErrorClass::Http, ErrorClass::Reference, ErrorClass::Index, ErrorClass::Tree, ErrorClass::Callback] {
            let e = git2::Error::new(ErrorCode::GenericError, class, format!("remote error: unable to write: {full}"));
            let said = git("push the job's commit", &e);
            assert!(matches!(said, RepoError::Git { .. }) && !said.retryable(), "{class:?}: {said}");
        }
        let e = git2::Error::new(ErrorCode::GenericError, ErrorClass::Os, format!("failed to write 'x': {full}"));
        assert!(matches!(git("commit the job's changes", &e), RepoError::DiskFull { .. }));
    }
}
