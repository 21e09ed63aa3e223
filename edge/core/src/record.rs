//! One job's record, as the edge keeps it. The whole struct is what is stored: hosts save
//! it as JSON whenever the machine says [`crate::Effect::Save`], and hand the records back
//! to [`crate::Edge::restore`] after a restart. Its times are edge time
//! ([`crate::clock::Now::at`]).
//!
//! Once a job has ended, memory keeps only its [`Job::header`] — the record without the
//! task's text and the result's output, diff and most of its error — and the whole record
//! lives in storage, read when someone asks for it ([`crate::Effect::Deliver`]). A host may
//! store the header apart from the whole record so that rebuilding the machine reads
//! headers only (the Durable Object does).

use serde::{Deserialize, Serialize};
use shared::contract::{ApiError, ErrorCode, ExecuteResponse, JobView};
use shared::job::{JobResult, JobSpec, JobState};
use crate::clock::Now;
use shared::time::rfc3339;
use shared::Millis;
use std::sync::Arc;

/// How the caller waits for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `POST /execute`: the caller holds the request open; with no agent it falls back.
    Wait,
    /// `POST /jobs`: the caller comes back for the result; the job may wait for an agent.
    Detached,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// The task as submitted. Never changed in place: every copy of the record (an
    /// event's version before, for an undo; its `Save`; the header an ended job leaves in
    /// memory) and the order that sends it share this one (issue 11: copied, it was a
    /// tenth of the edge's allocations). A header holds its own cut version.
    #[serde(with = "shared_spec")]
    pub spec: Arc<JobSpec>,
    pub mode: Mode,
    pub state: JobState,
    pub idempotency_key: Option<String>,
    pub created_at: Millis,
    pub dispatched_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// The agent it was sent to.
    pub agent_id: Option<String>,
    /// The connection it was sent on, or that took it over after a reconnect.
    pub session_id: Option<String>,
    /// How many times it was sent (each order's nonce is `id:attempt:tag`,
    /// [`Job::order_nonce`]).
    pub attempts: u32,
    /// The tags of its latest orders ([`order_tag`]), the last one order `attempts`'s; at
    /// most [`MAX_ORDER_TAGS`]. Empty: every order it had an edge of before sent, whose
    /// nonces were `id:attempt`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order_tags: Vec<String>,
    /// Since when its agent's connection is gone; it is lost `LOST_AFTER_MS` later.
    pub orphaned_at: Option<Millis>,
    /// Its number among the orders sent on its connection (see
    /// [`shared::protocol::Slots`]); 0 once a reconnected agent said it holds the job.
    #[serde(default)]
    pub order_no: u64,
    /// The caller cancelled it while it was with an agent. The cancel goes out again
    /// whenever the agent reconnects, until the job ends: one sent on a connection that
    /// turned out dead is not lost.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Its agent accepted it (`Accepted`) but has not said it started ([`shared::protocol::StartReport`]):
    /// its Claude has not got the prompt, so if the agent's hello (or beat) no longer
    /// names it — the agent restarted before its start — it is sent again, not ended
    /// `lost`. Set by the agent's acceptance, or by its hello or beat naming the job while
    /// the edge had it dispatched (no `Started` heard, which would have made it running),
    /// and cleared by its MACed `Started`: absent (an edge of before stored the job), the
    /// job may have started, and is ended `lost` as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unstarted: bool,
    /// An `/execute` job whose waiting callers a clean stop told to follow it
    /// (`EDGE_RESTARTING`, `machine/stop.rs`), not to fall back: the restore after that
    /// stop keeps it. Without it, a restore ends an `/execute` job its agent has not
    /// started (queued, dispatched, or accepted and `unstarted`): its caller's request died
    /// with the edge, unanswered, and it may have run the task elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub callers_told_to_follow: bool,
    /// An `/execute` job whose idempotency key a `POST /jobs` repeated while it was not
    /// ended: that caller was told it is queued and follows it by its id, so the job is
    /// kept as a `POST /jobs` job is — it no longer ends unstarted when its `/execute`
    /// callers hang up, a clean stop or a restart finds it with none, or its first agent
    /// never received it ([`Job::waited_only`]). Stored, so a restart keeps it so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
    /// The `LOST_AFTER_MS` its agent was told in the welcome of the connection it was sent
    /// on or taken over by ([`crate::session::Agent::lost_after_ms`]), while it is with
    /// one: the agent starts the job only while it heard the edge within that time, so the
    /// edge gives the job up no sooner ([`Job::lost_after_ms`]), even restarted with a
    /// smaller `LOST_AFTER_MS` the agent has not been told yet (rev34-2). Absent (a job an
    /// edge of before sent): the setting alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub told_lost_after_ms: Option<u64>,
    /// The agent instance it was sent to, or that took it over
    /// ([`shared::protocol::Hello::instance`]; `""`: an agent that names none), while it
    /// is with one. Only that instance's hello settles it (and, for `""`, one that names
    /// it: that agent upgraded, `machine/sessions.rs::settles`), and another instance proving
    /// the same agent id is refused while the job may still be with this one, so that it
    /// never ends lost, nor goes to the other, while its agent runs it. Absent (a job an
    /// edge of before sent): any hello of its agent id settles it, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub result: Option<JobResult>,
    /// What identifies the task for an idempotency key: the SHA-256 of its spec (kept in
    /// the header, which drops the spec's text).
    #[serde(default)]
    pub spec_digest: String,
    /// What else identifies the request for an idempotency key: the digest of where the
    /// job may run and whom its result goes to ([`terms_digest`]; kept in the stub of a
    /// forgotten job, which drops both). Empty: a record stored before it was kept
    /// ([`Job::terms`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub terms_digest: String,
    /// This is a header: the text of the spec and of the result are in storage only.
    #[serde(default)]
    pub header_only: bool,
    /// The size of the whole record, about (set on headers): what retention counts.
    #[serde(default)]
    pub bytes: u64,
    /// Which agents may take it, whose it is, its priority among that caller's jobs.
    #[serde(default)]
    pub placement: shared::placement::Placement,
    /// While the usage window is used up, wait for its reset (else end at once).
    #[serde(default = "yes")]
    pub wait_for_usage: bool,
    /// Where its result is posted when it ends (see `crate::notify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Sent with its caller's own secret, as submitted: the order says its caller is
    /// proven only if it was, and the name still has a secret when it is sent
    /// (`machine/jobs.rs::send_job`). Absent (a job an edge of before stored): not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub caller_proven: bool,
    /// The caps forgot this ended job before its retention ended: what is stored is only
    /// what its idempotency key still answers ([`Job::spent_key`]; `machine/spent.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forgotten: bool,
}

fn yes() -> bool {
    true
}

/// [`Job::spec`] stored as the task itself, as before it was shared.
mod shared_spec {
    use super::{Arc, JobSpec};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(spec: &Arc<JobSpec>, to: S) -> Result<S::Ok, S::Error> {
        spec.as_ref().serialize(to)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(from: D) -> Result<Arc<JobSpec>, D::Error> {
        JobSpec::deserialize(from).map(Arc::new)
    }
}

/// How many of a job's latest orders [`Job::order_tags`] keeps. A job is sent again only
/// once its agent refused the order or was found never to have received it, so an older
/// order's report does not come; one that did would be ignored.
pub const MAX_ORDER_TAGS: usize = 16;

/// The tag of the order numbered `order_no` on the connection whose challenge is
/// `challenge` (a fresh random nonce of each connection): no two orders share one, across
/// the edge's restarts too, and no one off that connection can guess it. 16 hex digits.
pub fn order_tag(challenge: &str, order_no: u64) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(b"claude-runner order tag\0");
    hash.update(challenge.as_bytes());
    hash.update(order_no.to_le_bytes());
    shared::ids::hex(&hash.finalize()[..8])
}

/// What a caller is given from a job's whole record, read from storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    /// The `/execute` answer ([`Job::answer`]).
    Answer,
    /// `GET /jobs/{id}` ([`Job::view`]).
    View,
    /// The end of an event stream: the result chunk, then the end.
    Stream,
}

/// The digest of a spec, as kept in [`Job::spec_digest`].
pub fn spec_digest(spec: &JobSpec) -> String {
    use sha2::Digest;
    let text = serde_json::to_vec(spec).expect("specs serialise");
    shared::ids::hex(&sha2::Sha256::digest(&text))
}

/// The digest of a request's placement — `labels`, `agent_id`, `priority`; its caller is
/// its idempotency key's slot already — and its `callback_url`, as kept in
/// [`Job::terms_digest`]: a key used again with other ones is not a repeat (review rev10:
/// it was answered with the first job, which runs where and tells whom the first said).
pub fn terms_digest(placement: &shared::placement::Placement, callback_url: Option<&str>) -> String {
    use sha2::Digest;
    let terms = serde_json::json!({
        "labels": placement.labels,
        "agent_id": placement.agent_id,
        "priority": placement.priority,
        "callback_url": callback_url,
    });
    let mut hash = sha2::Sha256::new();
    hash.update(b"claude-runner repeat terms\0");
    hash.update(terms.to_string().as_bytes());
    shared::ids::hex(&hash.finalize())
}

/// A result's long texts, which a header leaves to storage ([`Job::header`]): its output,
/// diff, error and changed files (a list a repository job's result may carry up to a
/// quarter of a frame of). The task's are left by [`header_spec`].
type Long = Option<(String, Option<String>, Option<String>, Option<Vec<shared::job::FileChange>>)>;

/// The task as a header keeps it: the start of its prompt, and none of its long lists and
/// texts, which are the whole record's (a request may carry 2 × 128 tools of 512 bytes and
/// a 64 KiB commit message): memory keeps none. Made from the task, not cut out of a copy
/// of it, which the records sharing it (`Job::spec`) would have to make whole first.
fn header_spec(spec: &JobSpec) -> JobSpec {
    // Every field named (no `..`): a field added to the task is kept or left here on purpose.
    let JobSpec {
        prompt,
        repo_url,
        branch,
        working_dir,
        timeout_ms,
        allowed_tools: _,
        disallowed_tools: _,
        max_turns,
        model,
        permission_mode,
        append_system_prompt: _,
        session_id,
        include_diff,
        max_budget_usd,
        allow_stale,
        push_branch,
        commit_message: _,
    } = spec;
    JobSpec {
        // The start of the task stays, for the jobs list (`GET /jobs`).
        prompt: shared::text::truncate(prompt, PROMPT_PREVIEW_BYTES).to_string(),
        repo_url: repo_url.clone(),
        branch: branch.clone(),
        working_dir: working_dir.clone(),
        timeout_ms: *timeout_ms,
        allowed_tools: Vec::new(),
        disallowed_tools: Vec::new(),
        max_turns: *max_turns,
        model: model.clone(),
        permission_mode: permission_mode.clone(),
        append_system_prompt: None,
        session_id: session_id.clone(),
        include_diff: *include_diff,
        max_budget_usd: *max_budget_usd,
        allow_stale: *allow_stale,
        push_branch: push_branch.clone(),
        commit_message: None,
    }
}

/// How much of a prompt the jobs list shows (and a header keeps).
pub const PROMPT_PREVIEW_BYTES: usize = 200;

/// Most of an error kept in a header (the whole of it is in storage).
const HEADER_ERROR_BYTES: usize = 512;

impl Job {
    /// Whether caller `name`'s own secret (`RUNNER_SECRETS`) reaches this job: one it sent
    /// with that secret. A job the pool's secret sent naming `name` is not its — the name
    /// may have had no secret then (it was given one since) and the pool's secret may name
    /// anyone — as its idempotency key is not ([`crate::machine`], `Repeatable`).
    pub fn sent_by_own_secret_of(&self, name: &str) -> bool {
        self.caller_proven && self.placement.caller() == name
    }

    /// Where its `Idempotency-Key` is kept: under its caller, whose keys are its own.
    pub fn idempotency_slot(&self) -> Option<(String, String)> {
        self.idempotency_key.as_ref().map(|key| (self.placement.caller().to_string(), key.clone()))
    }

    pub fn new(id: String, spec: JobSpec, mode: Mode, idempotency_key: Option<String>, now: Millis) -> Job {
        Job {
            id,
            mode,
            state: JobState::Queued,
            idempotency_key,
            created_at: now,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            agent_id: None,
            session_id: None,
            attempts: 0,
            order_tags: Vec::new(),
            orphaned_at: None,
            order_no: 0,
            cancel_requested: false,
            unstarted: false,
            callers_told_to_follow: false,
            kept: false,
            told_lost_after_ms: None,
            instance: None,
            result: None,
            spec_digest: spec_digest(&spec),
            terms_digest: String::new(),
            spec: Arc::new(spec),
            header_only: false,
            bytes: 0,
            placement: Default::default(),
            wait_for_usage: true,
            callback_url: None,
            caller_proven: false,
            forgotten: false,
        }
    }

    /// What is stored of an ended job the caps forgot before its retention ended: its
    /// header without the task's start or the result — its idempotency key, whose it is,
    /// the task's digest, how and when it ended — marked [`Job::forgotten`].
    pub fn spent_key(&self) -> Job {
        let mut stub = self.header();
        // Its placement and callback go: what a repeat is compared on stays.
        stub.terms_digest = self.terms().unwrap_or_default();
        // Nothing of the task but its digest: a stub is kept outside the retention caps.
        stub.spec = Arc::new(JobSpec { timeout_ms: self.spec.timeout_ms, ..JobSpec::default() });
        stub.placement = shared::placement::Placement { caller: self.placement.caller.clone(), ..Default::default() };
        stub.result = None;
        stub.callback_url = None;
        stub.bytes = 0;
        stub.forgotten = true;
        stub
    }

    /// Whether the job may have run: sent to an agent (it may have started, even if it was
    /// lost). Once forgotten, only such a job's key is kept (`machine/spent.rs`): a job never
    /// sent cannot run twice, and a repeat of its key makes a new job, as it did before.
    pub fn may_have_run(&self) -> bool {
        self.dispatched_at.is_some() || self.started_at.is_some()
    }

    /// Whether a repeat of its idempotency key makes a new job in its place (the key's
    /// slot goes to the new one; this record stays readable by its id while retained): it
    /// ended without ever having been sent to an agent that may have run it
    /// ([`Job::may_have_run`]: never sent, or sent and taken back, [`Job::take_back`], as
    /// its agent refused it or never received it), and not by its caller's cancel. Such a
    /// job can never run, so a new one runs the task at most once all the same — the
    /// rule a forgotten job's key follows already (`machine/spent.rs`). Its stored answer
    /// ("no agent is connected", "the edge restarted before the job started … submit it
    /// again") was given again to every repeat while it was retained, with an agent back
    /// (review rev36a, 1), though resending with the same key is the recovery the README
    /// gives. A job an agent may have started keeps its slot and its answer: it never runs
    /// twice.
    pub fn superseded_by_repeat(&self) -> bool {
        self.state.is_terminal() && self.state != JobState::Cancelled && !self.may_have_run()
    }

    /// Whether its only callers are `/execute` waiters, so that it is abandoned — never
    /// to start — once none waits: an `/execute` job no `POST /jobs` repeated ([`Job::kept`]).
    /// The one test of every `/execute`-only rule (its wait in the queue, its end once no
    /// fitting agent is connected or all are held back, its end on a hang-up, a clean stop
    /// or a restore): a kept job — whose `POST /jobs` caller was told it is queued as a
    /// `POST /jobs` job is — is a `POST /jobs` job for all of them, from that repeat on,
    /// whether or not an `/execute` caller still waits on it (review rev38, 3).
    pub fn waited_only(&self) -> bool {
        self.mode == Mode::Wait && !self.kept
    }

    /// Takes a sent job back from its agent, which refused it or never received it (it
    /// never ran): as if never sent, to be queued again or ended unstarted
    /// ([`Job::superseded_by_repeat`]). What it was sent as (`attempts`, its orders' tags)
    /// stays, so a report of an earlier order is told apart.
    pub fn take_back(&mut self) {
        self.unstarted = false;
        self.agent_id = None;
        self.session_id = None;
        self.instance = None;
        self.told_lost_after_ms = None;
        self.dispatched_at = None;
        self.started_at = None;
        self.orphaned_at = None;
        self.order_no = 0;
    }

    /// The name of the repository it works on, as agents name their mirrors.
    pub fn repo_name(&self) -> Option<String> {
        let url = self.spec.repo_url.as_deref()?;
        shared::repo::RepoUrl::parse(url).ok().map(|u| u.name())
    }

    /// Counts a new order of the job, the `order_no`th on the connection whose challenge
    /// is `challenge`, and keeps its tag.
    pub fn new_order(&mut self, challenge: &str, order_no: u64) {
        self.attempts += 1;
        if self.order_tags.len() >= MAX_ORDER_TAGS {
            self.order_tags.remove(0);
        }
        self.order_tags.push(order_tag(challenge, order_no));
    }

    /// The nonce of the job's latest order: its id, how many times it was sent, and the
    /// order's tag. The agent binds the progress and result it signs to it.
    pub fn order_nonce(&self) -> String {
        match self.order_tags.last() {
            Some(tag) => format!("{}:{}:{tag}", self.id, self.attempts),
            None => format!("{}:{}", self.id, self.attempts),
        }
    }

    /// Whether `nonce` is one of the orders the edge sent for this job (any attempt whose
    /// tag is kept).
    pub fn issued(&self, nonce: &str) -> bool {
        self.attempt_of(nonce).is_some()
    }

    /// Which of the orders the edge sent for this job `nonce` names (1 for the first).
    /// The number alone does not say: an order whose stored dispatch a power cut lost was
    /// numbered as the next one is, and its report must not be taken for that one's — the
    /// tag does ([`order_tag`]).
    pub fn attempt_of(&self, nonce: &str) -> Option<u32> {
        let rest = nonce.strip_prefix(self.id.as_str())?.strip_prefix(':')?;
        let (number, tag) = match rest.split_once(':') {
            Some((number, tag)) => (number, Some(tag)),
            None => (rest, None),
        };
        let n = number.parse::<u32>().ok().filter(|&n| n >= 1 && n <= self.attempts && number == n.to_string())?;
        match tag {
            Some(tag) => {
                let back = (self.attempts - n) as usize;
                let kept = self.order_tags.len().checked_sub(back + 1).map(|i| self.order_tags[i].as_str());
                (kept == Some(tag)).then_some(n)
            }
            // Every order of it an edge of before sent, untagged.
            None => self.order_tags.is_empty().then_some(n),
        }
    }

    /// The digest of its spec (computed for records stored before digests were kept).
    pub fn digest(&self) -> String {
        if self.spec_digest.is_empty() {
            spec_digest(&self.spec)
        } else {
            self.spec_digest.clone()
        }
    }

    /// Its [`terms_digest`]: kept, or computed from its placement and callback for a record
    /// stored before it was kept. `None` for such a record of a forgotten job, whose stub
    /// kept neither: its repeats are compared on the task alone, as they were.
    pub fn terms(&self) -> Option<String> {
        if !self.terms_digest.is_empty() {
            Some(self.terms_digest.clone())
        } else if self.forgotten {
            None
        } else {
            Some(terms_digest(&self.placement, self.callback_url.as_deref()))
        }
    }

    /// What memory keeps of an ended job: the record without the task's text and the
    /// result's output and diff, and with its error cut short.
    pub fn header(&self) -> Job {
        self.clone().into_header()
    }

    /// [`Job::header`], made from the record itself: an ended job shrinks in memory once
    /// per job, and a copy of its whole output made only to be cut away was most of that.
    fn into_header(mut self) -> Job {
        if self.header_only {
            return self;
        }
        let (digest, bytes) = (self.digest(), self.approximate_bytes());
        let long = self.take_long();
        self.cut_to_header(&long, digest, bytes);
        self
    }

    /// [`Job::header`] of this record, which stays whole, made without a copy of its long
    /// texts: the result's are moved out for the copy and back, and the task is shared. A
    /// job's end keeps the header in memory and stores the whole record
    /// (`machine/jobs.rs::finish`).
    pub fn header_apart(&mut self) -> Job {
        if self.header_only {
            return self.clone();
        }
        let (digest, bytes) = (self.digest(), self.approximate_bytes());
        let long = self.take_long();
        let mut header = self.clone();
        header.cut_to_header(&long, digest, bytes);
        self.put_long(long);
        header
    }

    /// Takes out the result's texts a header leaves to storage.
    fn take_long(&mut self) -> Long {
        self.result.as_mut().map(|r| (std::mem::take(&mut r.output), r.diff.take(), r.error.take(), r.files_changed.take()))
    }

    /// Puts back what [`Job::take_long`] took out.
    fn put_long(&mut self, long: Long) {
        if let (Some(result), Some((output, diff, error, files))) = (&mut self.result, long) {
            (result.output, result.diff, result.error, result.files_changed) = (output, diff, error, files);
        }
    }

    /// Makes this record, its result's long texts taken out (`long`), the header: the
    /// digest and size of the whole, the start of its task ([`header_spec`]) and of its
    /// error.
    fn cut_to_header(&mut self, long: &Long, digest: String, bytes: u64) {
        self.spec_digest = digest;
        self.bytes = bytes;
        self.header_only = true;
        self.spec = Arc::new(header_spec(&self.spec));
        if let (Some(result), Some((_, _, Some(error), _))) = (&mut self.result, long) {
            result.error = Some(shared::text::truncate(error, HEADER_ERROR_BYTES).to_string());
        }
    }

    /// What memory keeps of this job: an ended one's [`header`](Job::header) (the whole
    /// record stays in storage, read again only when asked for), a live one whole. The
    /// machine and the hosts' loaders use this one rule.
    pub fn in_memory(self) -> Job {
        if self.state.is_terminal() {
            self.into_header()
        } else {
            self
        }
    }

    /// About how many bytes the whole record takes (its long texts, and a bit for the rest).
    pub fn approximate_bytes(&self) -> u64 {
        if self.header_only {
            return self.bytes;
        }
        let text = |s: Option<&str>| s.map_or(0, str::len) as u64;
        let r = self.result.as_ref();
        let tools = |list: &[String]| list.iter().map(|t| t.len() as u64 + 3).sum::<u64>();
        512 + text(Some(&self.spec.prompt))
            + text(self.spec.append_system_prompt.as_deref())
            + text(self.spec.commit_message.as_deref())
            + tools(&self.spec.allowed_tools)
            + tools(&self.spec.disallowed_tools)
            + text(r.map(|r| r.output.as_str()))
            + text(r.and_then(|r| r.diff.as_deref()))
            + text(r.and_then(|r| r.error.as_deref()))
            + r.and_then(|r| r.files_changed.as_deref()).map_or(0, |files| {
                files.iter().map(|f| 32 + f.path.len() as u64 + f.old_path.as_deref().map_or(0, str::len) as u64).sum()
            })
    }

    /// How long the edge waits for this job's agent once it is gone: `LOST_AFTER_MS` as set
    /// now (`setting`), or as its agent was last told, whichever is longer.
    pub fn lost_after_ms(&self, setting: u64) -> u64 {
        setting.max(self.told_lost_after_ms.unwrap_or(0))
    }

    /// When the edge must act on this job if nothing else happens first (`lost_after_ms`:
    /// the setting, which [`Job::lost_after_ms`] may lengthen).
    pub fn deadline(&self, lost_after_ms: u64, queue_ttl_ms: u64, margin_ms: u64) -> Option<Millis> {
        match self.state {
            JobState::Queued => Some(self.created_at.saturating_add(self.queue_wait(queue_ttl_ms))),
            JobState::Dispatched | JobState::Running => {
                let sent = self.dispatched_at.unwrap_or(self.created_at);
                let timeout = sent.saturating_add(self.spec.timeout_ms).saturating_add(margin_ms);
                let lost = self.orphaned_at.map(|t| t.saturating_add(self.lost_after_ms(lost_after_ms)));
                let due = lost.map_or(timeout, |l| l.min(timeout));
                if self.state == JobState::Dispatched {
                    // Its order was never seen taken: it may be held on the agent's path, and
                    // let through later it would start the job after the edge had ended it
                    // (lost, timed out) and the caller had run it elsewhere. So the job is
                    // not ended before that order has expired on the agent's clock too
                    // (which may run behind by the skew the agent allows either way).
                    let expired = sent
                        .saturating_add(shared::envelope::ORDER_TTL_MS)
                        .saturating_add(2 * shared::envelope::CLOCK_SKEW_MS);
                    return Some(due.max(expired));
                }
                Some(due)
            }
            _ => None,
        }
    }

    /// A waiting caller's job must start within its own timeout; a detached one — or a
    /// kept one ([`Job::waited_only`]) — may wait for an agent up to `QUEUE_TTL_MS`.
    pub fn queue_wait(&self, queue_ttl_ms: u64) -> u64 {
        match self.waited_only() {
            true => self.spec.timeout_ms,
            false => queue_ttl_ms,
        }
    }

    /// Puts the job in its terminal state. Returns false (and changes nothing) if it had
    /// one already: a job ends exactly once.
    pub fn finish(&mut self, result: JobResult, now: Millis) -> bool {
        if self.state.is_terminal() {
            return false;
        }
        self.state = result.terminal_state();
        self.finished_at = Some(now);
        self.orphaned_at = None;
        self.instance = None;
        self.result = Some(result);
        true
    }

    pub fn elapsed(&self, now: Millis) -> u64 {
        now.saturating_sub(self.started_at.or(self.dispatched_at).unwrap_or(self.created_at))
    }

    pub fn response(&self) -> Option<ExecuteResponse> {
        self.result.as_ref().map(|r| ExecuteResponse {
            result: JobResult {
                // Every failure says whether trying again may help.
                retryable: r.retryable.or_else(|| (!r.success).then(|| r.error_code.is_some_and(|c| c.retryable()))),
                ..r.clone()
            },
            job_id: self.id.clone(),
            agent_id: self.agent_id.clone(),
        })
    }

    /// What `/execute` answers once the job is over: 200 with the result, or the error
    /// that tells the caller to fall back — also for a job that never reached Claude
    /// because the login needed a person or the usage window was used up.
    pub fn answer(&self) -> Option<(u16, String)> {
        let response = self.response()?;
        let never_ran = self.dispatched_at.is_none();
        match response.result.error_code {
            Some(code) if code.status() != 200 || (never_ran && matches!(code, ErrorCode::RunnerOauthError | ErrorCode::UsageLimit)) => {
                let error = response.result.error.clone().unwrap_or_default();
                let mut err = if code.status() != 200 { ApiError::new(code, error) } else { ApiError::refused(code, error) };
                err.body.retry_at = response.result.retry_at.clone();
                // "Run it elsewhere" is wrong advice for a job that must not be sent again
                // (a push that may have landed: `push_may_have_landed`).
                if response.result.retryable == Some(false) {
                    err.body.fallback = None;
                }
                let err = err.with_job(&self.id);
                Some((err.status, err.to_json()))
            }
            _ => Some((200, serde_json::to_string(&response).expect("responses serialise"))),
        }
    }

    pub fn view(&self, now: Now) -> JobView {
        let shown = |t: Millis| rfc3339(now.wall_of(t));
        JobView {
            job_id: self.id.clone(),
            state: self.state,
            created_at: shown(self.created_at),
            agent_id: self.agent_id.clone(),
            started_at: self.started_at.map(shown),
            finished_at: self.finished_at.map(shown),
            result: self.response(),
            prompt: Some(shared::text::truncate(&self.spec.prompt, PROMPT_PREVIEW_BYTES).to_string()),
            waiting_for: None,
        }
    }
}

/// Results the edge writes itself when the agent cannot: its agent went away and did not
/// come back in time. A job the caller had cancelled ends cancelled (the caller does not
/// want it run elsewhere); any other is lost, and its caller may run it elsewhere.
pub fn lost(job: &Job, now: Millis) -> JobResult {
    if job.cancel_requested {
        return JobResult::failure(
            ErrorCode::Cancelled,
            "cancelled by the caller; its agent went away before confirming that it stopped",
            job.elapsed(now),
        );
    }
    // Whether it may be sent again is `Edge::finish`'s to say (`push_may_have_landed`).
    JobResult::lost("the agent running this job went away and did not come back in time (LOST_AFTER_MS); run the task elsewhere", job.elapsed(now))
}

/// The edge's own TIMEOUT, or a job lost by whoever found it so (`JobResult::lost`,
/// which leaves `retryable` unsaid: `Edge::finish`), for a job that asked for a push and
/// went to an agent: that push may still be under way there, or have landed just
/// before the agent went away, so sent again the job could push twice. The caller is told
/// to look at the branch first, and the result is not retryable. A job that pushes
/// nothing, or never reached an agent, is left as it is.
pub fn push_may_have_landed(job: &Job, mut result: JobResult) -> JobResult {
    if let Some(branch) = job.spec.push_branch.as_deref().filter(|_| job.agent_id.is_some()) {
        let shown = shared::text::truncate(branch, 256);
        result.error = result.error.map(|e| format!("{e}; it asked to push to `{shown}`, and a push may have landed on the server: look at the branch there before sending the job again"));
        result.retryable = Some(false);
    }
    result
}
