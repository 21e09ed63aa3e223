//! The callers the machine answers later: `/execute` callers waiting for their job's end
//! (waiters) and `GET /jobs/{id}/events` streams (followers). Every HTTP request is given a
//! [`CallerId`]; the host keeps one channel per id and carries out the
//! [`Effect::Answer`] / [`Effect::Stream`] / [`Effect::EndStream`] addressed to it. The
//! machine decides who gets what; a host never looks at a job's callers.
//!
//! A follower is kept with its reader — the secret its stream was opened with — and the
//! places of a job's streams, and of all streams, are parted between the readers
//! ([`Edge::follow`]), so that no reader's streams lock another out: a caller holding its
//! job's secret cannot keep the operator from following it (review rev36a-4).

use super::{Edge, Effect};
use crate::clock::Now;
use crate::http::Who;
use crate::progress::{self, MAX_FOLLOWERS, MAX_FOLLOWERS_PER_JOB, OPERATOR_FOLLOWERS};
use crate::record::{Form, Job, Mode};
use shared::job::JobState;
use crate::response::Response;
use shared::contract::{ApiError, ErrorCode};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// `/execute` callers waiting on one job, at most: its own, and those that repeat its
/// idempotency key (a caller whose answer was lost, another process of the same caller).
/// Past it a repeat is answered 429. (The event-stream followers' cap, for the same reason:
/// each of them is handed the job's result when it ends.)
pub const MAX_WAITERS_PER_JOB: usize = progress::MAX_FOLLOWERS_PER_JOB;
/// Callers waiting on jobs they did not submit themselves — repeats of an idempotency key —
/// of all jobs together, at most (a job's own `/execute` caller is bounded by the queue's
/// caps already, and is never refused for these).
pub const MAX_WAITING_REPEATS: usize = progress::MAX_FOLLOWERS;
// Repeats waiting on the jobs of one caller with its own secret (`RUNNER_SECRETS`) at most
// its equal share of all ([`Edge::caller_share`]), so no one caller, nor two, can take them
// all; and so the streams it opens ([`Edge::follow`]).

/// One HTTP caller, as the machine and its host both name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallerId(pub u64);

/// The places `n` waiters on `job` hold against the caps in all and per caller: every
/// waiter but an `/execute` job's first — the job's own caller, bounded with its job by the
/// queue's caps —, so that only the waiters that repeats of an idempotency key add count,
/// and a new `/execute` is never refused for them.
fn waiters_held(job: &Job, n: usize) -> usize {
    match job.mode {
        Mode::Wait => n.saturating_sub(1),
        Mode::Detached => n,
    }
}

/// Why a job takes no more waiters.
enum Crowded {
    /// The caller with its own secret `share` holds `held` places, its share of `all`
    /// (said in words: [`crate::http::named_share`]).
    Share { share: String, held: usize, all: usize },
    /// The job has `of_job` waiters, and all jobs hold `all` places.
    Edge { of_job: usize, all: usize },
}

/// A stream following a job, and its reader: whose secret opened it (the pool's — the
/// operator's — or a caller's own), which the places it holds are counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Follower {
    pub caller: CallerId,
    pub reader: Who,
}

/// How many of `job`'s streams `reader` may hold: on a job of a caller with its own secret,
/// that caller all but [`OPERATOR_FOLLOWERS`], the pool's secret (the operator) those; on
/// the pool secret's jobs, which no caller's own secret reaches, the pool's secret all.
fn part_of_job(job: &Job, reader: &Who) -> usize {
    match reader {
        Who::Caller(_) => MAX_FOLLOWERS_PER_JOB - OPERATOR_FOLLOWERS,
        Who::Pool if super::share_of(job).is_empty() => MAX_FOLLOWERS_PER_JOB,
        Who::Pool => OPERATOR_FOLLOWERS,
    }
}

#[derive(Debug, Default)]
pub(super) struct Callers {
    next: u64,
    /// `/execute` callers, by job.
    pub waiters: HashMap<String, Vec<CallerId>>,
    /// Event streams, by job.
    pub followers: HashMap<String, Vec<Follower>>,
    /// Callers of the re-login relay, by login id.
    pub logins: HashMap<String, Vec<CallerId>>,
    /// The ends of jobs given to callers whose answers may still be on their way.
    given: Given,
}

/// The ends of ended jobs given out (by job and form: status and text), kept only as long
/// as an answer given holds them: a caller given the same end meanwhile shares that text
/// (read from storage once), as the waiters of one job share its answer — so N readers of
/// a result of a megabyte that do not read their answers hold one copy, not N. Not kept
/// past the answers (a weak reference: the host drops the text once it is written, or its
/// connection gone), nor part of any event's undo (the text of an ended job never changes).
#[derive(Debug, Default)]
struct Given(HashMap<(String, Form), (u16, Weak<str>)>);

impl Given {
    /// The end of `job_id` in `form` an answer still holds, if any. Lets go of those no
    /// answer holds any more: a weak reference keeps its text's memory until it goes.
    fn get(&mut self, job_id: &str, form: Form) -> Option<(u16, Arc<str>)> {
        self.let_go();
        let (status, text) = self.0.get(&(job_id.to_string(), form))?;
        Some((*status, text.upgrade()?))
    }

    /// Lets go of the texts no answer holds any more.
    fn let_go(&mut self) {
        self.0.retain(|_, (_, text)| text.strong_count() > 0);
    }

    fn keep(&mut self, job_id: &str, form: Form, status: u16, text: &Arc<str>) {
        self.0.insert((job_id.to_string(), form), (status, Arc::downgrade(text)));
    }
}

impl Callers {
    pub fn set(&mut self, job_id: &str, waiters: Option<Vec<CallerId>>, followers: Option<Vec<Follower>>) {
        match waiters {
            Some(w) => self.waiters.insert(job_id.to_string(), w),
            None => self.waiters.remove(job_id),
        };
        match followers {
            Some(f) => self.followers.insert(job_id.to_string(), f),
            None => self.followers.remove(job_id),
        };
    }

    /// The job whose list in `list` holds an entry that `is_caller`, if any: the job a
    /// caller waits on (`waiters`) or follows (`followers`).
    fn job_of<T>(list: &HashMap<String, Vec<T>>, is_caller: impl Fn(&T) -> bool) -> Option<String> {
        list.iter().find(|(_, entries)| entries.iter().any(&is_caller)).map(|(job, _)| job.clone())
    }

    /// The streams of all jobs whose readers are `of`.
    fn held_by(&self, of: impl Fn(&Who) -> bool) -> usize {
        self.followers.values().flatten().filter(|f| of(&f.reader)).count()
    }
}

impl Edge {
    /// Starts the event of one HTTP request, at `now`, and names its caller.
    pub fn begin_request(&mut self, now: impl Into<Now>) -> CallerId {
        self.callers.next += 1;
        let caller = CallerId(self.callers.next);
        self.begin(super::storage::Origin::Request(caller), Some(now.into()));
        caller
    }

    /// `caller` waits for the job's end (it is answered at once if the job is over).
    /// Refused — only ever a repeat of the job's idempotency key, never the `/execute` that
    /// made it — (429) when the job, the caller's share or the edge has as many waiting
    /// repeats as it takes, and (503, no `fallback`) when the job is still queued and no
    /// agent is connected: answered at once, as an `/execute` that finds no agent is, while
    /// the job stays queued for one (running the task elsewhere too would run it twice).
    pub fn wait_for(&mut self, caller: CallerId, job_id: &str, effects: &mut Vec<Effect>) -> Result<(), ApiError> {
        if self.give_ended(caller, job_id, Form::Answer, effects) {
            return Ok(());
        }
        if self.job(job_id).is_some_and(|j| j.state == JobState::Queued) && !self.is_online() {
            let mut refused = ApiError::new(
                ErrorCode::RunnerOffline,
                format!(
                    "no agent is connected to this edge; job {job_id}, which this idempotency key names, stays queued and runs \
                     when one connects (unless its wait in the queue ends first): follow it with GET /jobs/{job_id}, or cancel \
                     it with DELETE /jobs/{job_id} before running the task elsewhere (a job cancelled before it reached an \
                     agent never runs)"
                ),
            )
            .with_job(job_id);
            refused.body.fallback = None;
            return Err(refused);
        }
        match self.crowded(job_id) {
            None => {}
            Some(Crowded::Share { share, held, all }) => {
                return Err(ApiError::new(
                    ErrorCode::RunnerBusy,
                    format!(
                        "caller `{share}` waits on its jobs {held} times over already, repeating their idempotency keys ({}): read \
                         the job with GET /jobs/{job_id}, or follow it with GET /jobs/{job_id}/events — it runs once whoever waits",
                        crate::http::named_share(&format!("the {all} places"))
                    ),
                )
                .with_job(job_id));
            }
            Some(Crowded::Edge { of_job, all }) => {
                return Err(ApiError::new(
                    ErrorCode::RunnerBusy,
                    format!(
                        "too many callers wait on this job already, repeating its idempotency key ({of_job} this one, {all} \
                         repeats on all jobs; at most {MAX_WAITERS_PER_JOB} per job and {MAX_WAITING_REPEATS} in all): read the \
                         job with GET /jobs/{job_id}, or follow it with GET /jobs/{job_id}/events — it runs once whoever waits"
                    ),
                )
                .with_job(job_id));
            }
        }
        self.note_callers(job_id);
        self.callers.waiters.entry(job_id.to_string()).or_default().push(caller);
        Ok(())
    }

    /// Whether job `job_id` takes one more waiter: not past [`MAX_WAITERS_PER_JOB`], nor the
    /// caps in all and per caller with its own secret, which count the places each job's
    /// waiters hold ([`waiters_held`]); a waiter that would hold none (an `/execute` job's
    /// own) is always taken.
    fn crowded(&self, job_id: &str) -> Option<Crowded> {
        let job = self.job(job_id)?;
        let list = &self.callers.waiters;
        let of_job = list.get(job_id).map_or(0, Vec::len);
        if waiters_held(job, of_job + 1) == waiters_held(job, of_job) {
            return None;
        }
        let held_by = |of: &dyn Fn(&Job) -> bool| -> usize {
            list.iter().filter_map(|(id, callers)| self.job(id).filter(|j| of(j)).map(|j| waiters_held(j, callers.len()))).sum()
        };
        // A caller with its own secret holds its own share of the places (the operator's
        // callers of its jobs too), so it cannot take every one; the pool secret's are held
        // to the caps per job and in all alone: its holder is the operator.
        let share = super::share_of(job);
        if !share.is_empty() {
            let held = held_by(&|j| super::share_of(j) == share);
            let cap = self.caller_share(MAX_WAITING_REPEATS);
            if held >= cap {
                return Some(Crowded::Share { share: share.to_string(), held, all: MAX_WAITING_REPEATS });
            }
        }
        let all = held_by(&|_| true);
        (of_job >= MAX_WAITERS_PER_JOB || all >= MAX_WAITING_REPEATS).then_some(Crowded::Edge { of_job, all })
    }

    /// `caller` follows the job's progress with `reader`'s secret: what is kept so far at
    /// once — only what came after `after` when it resumes a stream (its `Last-Event-ID`) —,
    /// then each event, then the result. Refused (404) when there is no such job, and (429)
    /// past `reader`'s places, which are parted between the readers so that none locks
    /// another out ([`Edge::streams_crowded`]).
    pub fn follow(
        &mut self,
        caller: CallerId,
        job_id: &str,
        reader: &Who,
        after: Option<progress::At>,
        effects: &mut Vec<Effect>,
    ) -> Result<(), ApiError> {
        if !self.jobs.contains_key(job_id) {
            return Err(ApiError::job_not_found(job_id));
        }
        if self.give_ended(caller, job_id, Form::Stream, effects) {
            return Ok(());
        }
        if let Some(refused) = self.streams_crowded(job_id, reader) {
            return Err(refused.with_job(job_id));
        }
        for chunk in self.progress.get(job_id).map(|b| b.replay(after)).unwrap_or_default() {
            effects.push(Effect::Stream { caller, chunk });
        }
        self.note_callers(job_id);
        self.callers.followers.entry(job_id.to_string()).or_default().push(Follower { caller, reader: reader.clone() });
        Ok(())
    }

    /// Why `job_id` takes no more streams of `reader`, as the reader is told it: `None` if
    /// it takes one. The places are parted between the readers, so that none locks another
    /// out (review rev36a-4: a caller holding its job's secret opened all 16 of the job's,
    /// or its whole share of all — the operator's streams of its jobs counted in it —, and
    /// the operator could not follow the job):
    /// - of a job's [`MAX_FOLLOWERS_PER_JOB`], a caller with its own secret holds at most
    ///   all but [`OPERATOR_FOLLOWERS`] of its job's, which are the operator's (the pool's
    ///   secret): [`part_of_job`];
    /// - of all [`MAX_FOLLOWERS`], such a caller holds its equal share
    ///   ([`Edge::caller_share`]) of the streams it opened itself — the operator's of its
    ///   jobs are the operator's —, and all such callers together all but
    ///   [`OPERATOR_FOLLOWERS`]; the pool's secret, whose holder is the operator, is held to
    ///   [`MAX_FOLLOWERS`] alone.
    ///
    /// A reader at its own part is refused, not given a place by ending one of its streams:
    /// ending its oldest let a flood of one secret's streams (stalled, never read) cut that
    /// secret's reader that reads. A caller with its own secret is told its own count and
    /// the caps, never how many the others hold.
    ///
    /// A job's streams in all need no check of their own: a caller's own secret reaches only
    /// its own jobs (`http.rs`), so a job's readers are its caller and the pool's secret, and
    /// their parts add up to [`MAX_FOLLOWERS_PER_JOB`].
    fn streams_crowded(&self, job_id: &str, reader: &Who) -> Option<ApiError> {
        let job = self.job(job_id)?;
        let of_job = self.callers.followers.get(job_id).map_or(&[][..], Vec::as_slice);
        let part = part_of_job(job, reader);
        let mine = of_job.iter().filter(|f| f.reader == *reader).count();
        let busy = |error: String| Some(ApiError::new(ErrorCode::RunnerBusy, error));
        let read_instead = format!("read the job with GET /jobs/{job_id}");
        let all = self.callers.held_by(|_| true);
        match reader {
            Who::Caller(name) => {
                if mine >= part {
                    return busy(format!(
                        "caller `{name}` follows this job with {mine} streams already, its part of the job's (at most {part}; \
                         the rest are kept for the operator): close one you no longer read, {read_instead}, or follow it \
                         once another of your streams of it ends"
                    ));
                }
                let held = self.callers.held_by(|r| r == reader);
                if held >= self.caller_share(MAX_FOLLOWERS) {
                    return busy(format!(
                        "caller `{name}` follows {held} streams already ({}): close one you no longer read, {read_instead}, \
                         or follow it once another of your streams ends",
                        crate::http::named_share(&format!("the {MAX_FOLLOWERS} places"))
                    ));
                }
                let callers = self.callers.held_by(|r| matches!(r, Who::Caller(_)));
                (callers >= MAX_FOLLOWERS - OPERATOR_FOLLOWERS || all >= MAX_FOLLOWERS).then(|| {
                    ApiError::new(
                        ErrorCode::RunnerBusy,
                        format!(
                            "this edge's streams are all taken (at most {MAX_FOLLOWERS}, of which the callers with their own \
                             secrets together hold {} and the operator the rest): {read_instead}, or follow it once another \
                             stream ends",
                            MAX_FOLLOWERS - OPERATOR_FOLLOWERS
                        ),
                    )
                })
            }
            Who::Pool => (mine >= part || all >= MAX_FOLLOWERS).then(|| {
                ApiError::new(
                    ErrorCode::RunnerBusy,
                    format!(
                        "too many streams follow jobs already ({mine} of this job's with this secret, which may hold {part} \
                         of them; {all} in all, of at most {MAX_FOLLOWERS}): close one you no longer read, {read_instead}, or \
                         follow it once another stream ends"
                    ),
                )
            }),
        }
    }

    /// The host's bound on a wait passed before the job ended (the machine ends every job
    /// by its deadline, so this guards only against a host that outlives its bound).
    pub fn wait_expired(&mut self, now: impl Into<Now>, caller: CallerId) -> Vec<Effect> {
        let now = now.into();
        self.begin(super::storage::Origin::Quiet, Some(now));
        if let Some(effects) = self.login_wait_expired(caller) {
            return effects;
        }
        let Some(job_id) = Callers::job_of(&self.callers.waiters, |c| *c == caller) else { return Vec::new() };
        self.forget_caller(&job_id, caller);
        let mut effects = Vec::new();
        if !self.give_ended(caller, &job_id, Form::Answer, &mut effects) {
            let response = Response::error(
                ApiError::new(ErrorCode::Timeout, format!("the job is still running; follow it with GET /jobs/{job_id}"))
                    .with_job(&job_id),
            );
            effects.push(Effect::Answer { caller, response });
        }
        effects
    }

    /// If the job has ended, gives `caller` its end in `form` — the text an answer on its
    /// way holds already ([`Given`]), else from storage ([`Effect::Deliver`], then
    /// [`Edge::delivered`]) — and returns true.
    pub(crate) fn give_ended(&mut self, caller: CallerId, job_id: &str, form: Form, effects: &mut Vec<Effect>) -> bool {
        if !self.job(job_id).is_some_and(|j| j.state.is_terminal()) {
            return false;
        }
        if let Some((status, text)) = self.callers.given.get(job_id, form) {
            effects.extend(Edge::given(caller, form, status, text));
        } else {
            // From storage, whole or not in memory: an ended job is kept as its header
            // (`finish`, the loaders), and a view made here without the event's clock would
            // show its times at the epoch (rev24-4). Its record was saved as it ended.
            effects.push(Effect::Deliver { caller, job_id: job_id.to_string(), form });
        }
        true
    }

    /// Lets go of the ended jobs' texts no answer holds any more (each tick, besides each
    /// time one is given): otherwise the last one given stays until the next read.
    pub(super) fn let_go_of_given(&mut self) {
        self.callers.given.let_go();
    }

    /// What `caller` is given of `job_id`'s record as the host read it from storage (after
    /// [`Effect::Deliver`]): [`Edge::deliver`], its text shared with the other callers
    /// given the same end while their answers are on their way.
    pub fn delivered(&mut self, caller: CallerId, job_id: &str, form: Form, record: Result<Option<Job>, String>, now: Now) -> Vec<Effect> {
        if let Some((status, text)) = self.callers.given.get(job_id, form) {
            return Edge::given(caller, form, status, text);
        }
        if let Ok(Some(job)) = &record {
            if let Some((status, text)) = Edge::end_of(job, form, now) {
                self.callers.given.keep(job_id, form, status, &text);
                return Edge::given(caller, form, status, text);
            }
        }
        Edge::deliver(caller, form, record, now)
    }

    /// What `caller` is given from a job's whole record (`record`: what the host read from
    /// storage). A record the host could not read is a 500 (or, on a stream, a comment
    /// saying so) that says to retry.
    pub fn deliver(caller: CallerId, form: Form, record: Result<Option<Job>, String>, now: crate::clock::Now) -> Vec<Effect> {
        let job = match record {
            Ok(Some(job)) => job,
            Ok(None) => {
                let response = Response::error(ApiError::new(ErrorCode::NotFound, "the job is no longer kept (its retention ended)"));
                return match form {
                    Form::Stream => vec![Effect::EndStream { caller }],
                    _ => vec![Effect::Answer { caller, response }],
                };
            }
            Err(problem) => {
                let text = format!("the edge could not read the job's record ({problem}); retry");
                return match form {
                    Form::Stream => vec![Effect::Stream { caller, chunk: format!(": {text}\n\n").into() }, Effect::EndStream { caller }],
                    _ => vec![Effect::Answer { caller, response: Response::error(ApiError::new(ErrorCode::InternalError, text)) }],
                };
            }
        };
        match Edge::end_of(&job, form, now) {
            Some((status, text)) => Edge::given(caller, form, status, text),
            None => Edge::deliver(caller, form, Err("the record has no result".into()), now),
        }
    }

    /// The end of an ended job's record in `form`: its status and text (for a stream, the
    /// result's chunk). `None` if the record has no result.
    fn end_of(job: &Job, form: Form, now: Now) -> Option<(u16, Arc<str>)> {
        match (form, job.answer()) {
            (Form::View, _) => Some((200, serde_json::to_string(&job.view(now)).expect("views serialise").into())),
            (Form::Answer, Some((status, body))) => Some((status, body.into())),
            (Form::Stream, Some((status, body))) => Some((status, progress::result_chunk(&body).into())),
            (_, None) => None,
        }
    }

    /// The effects that give `caller` an end made by [`Edge::end_of`].
    fn given(caller: CallerId, form: Form, status: u16, text: Arc<str>) -> Vec<Effect> {
        match form {
            Form::View | Form::Answer => vec![Effect::Answer { caller, response: Response::json(status, text) }],
            Form::Stream => vec![Effect::Stream { caller, chunk: text }, Effect::EndStream { caller }],
        }
    }

    /// The caller hung up (or its stream could not be written): nothing more goes to it.
    /// A queued `/execute` job whose last waiter this was ends here, unstarted: its
    /// caller may run the task elsewhere, as it is told to when no answer comes
    /// (`fallback`), and the job must then never run as well — as when such a job never
    /// reaches its agent (`jobs.rs::send_again`) or outlives a restart. A job already sent
    /// goes on: it may be running.
    pub fn caller_gone(&mut self, now: impl Into<Now>, caller: CallerId) -> Vec<Effect> {
        let now = now.into();
        self.begin(super::storage::Origin::Gone(caller), Some(now));
        let mut effects = Vec::new();
        if let Some(job_id) = self.let_caller_go(caller) {
            self.end_abandoned(now, &job_id, &mut effects);
        }
        effects
    }

    /// Ends `job_id`, unstarted, if it is a queued `/execute` job nobody waits for any more.
    pub(super) fn end_abandoned(&mut self, now: Now, job_id: &str, effects: &mut Vec<Effect>) {
        if self.unwaited_in_queue(job_id) {
            let why = "its caller hung up before it started (it may have run the task elsewhere); it will not run: submit it again";
            self.end_unstarted(now, job_id, why, effects);
        }
    }

    /// Forgets `caller` wherever it waits, follows or relays; returns the job it waited
    /// on, if it was a waiter.
    pub(super) fn let_caller_go(&mut self, caller: CallerId) -> Option<String> {
        let waited = Callers::job_of(&self.callers.waiters, |c| *c == caller);
        if let Some(job_id) = waited.clone().or_else(|| Callers::job_of(&self.callers.followers, |f| f.caller == caller)) {
            self.forget_caller(&job_id, caller);
        }
        if self.callers.logins.values().any(|c| c.contains(&caller)) {
            self.note_logins();
            for callers in self.callers.logins.values_mut() {
                callers.retain(|c| *c != caller);
            }
            self.callers.logins.retain(|_, c| !c.is_empty());
        }
        waited
    }

    /// Whether no caller waits any more for this `/execute` job (its own, or one that
    /// repeated its idempotency key). Followers of its events do not count: they watch a
    /// run someone else asked for. A `POST /jobs` that repeated its key does: it was told
    /// the job is queued ([`Job::waited_only`]).
    pub(super) fn unwaited(&self, job: &Job) -> bool {
        job.waited_only() && !self.callers.waiters.get(&job.id).is_some_and(|w| !w.is_empty())
    }

    /// Whether `job_id` is a queued `/execute` job nobody waits for any more.
    pub(super) fn unwaited_in_queue(&self, job_id: &str) -> bool {
        self.job(job_id).is_some_and(|job| job.state == JobState::Queued && self.unwaited(job))
    }

    fn forget_caller(&mut self, job_id: &str, caller: CallerId) {
        self.note_callers(job_id);
        if let Some(callers) = self.callers.waiters.get_mut(job_id) {
            callers.retain(|c| *c != caller);
            if callers.is_empty() {
                self.callers.waiters.remove(job_id);
            }
        }
        if let Some(followers) = self.callers.followers.get_mut(job_id) {
            followers.retain(|f| f.caller != caller);
            if followers.is_empty() {
                self.callers.followers.remove(job_id);
            }
        }
    }

    /// The job ended: each waiter gets its answer, each follower the result and the end.
    pub(super) fn announce_end(&mut self, job_id: &str, status: u16, body: &str, effects: &mut Vec<Effect>) {
        self.note_callers(job_id);
        let followers = self.callers.followers.remove(job_id).unwrap_or_default();
        if !followers.is_empty() {
            let chunk: progress::Chunk = progress::result_chunk(body).into();
            for Follower { caller, .. } in followers {
                effects.push(Effect::Stream { caller, chunk: chunk.clone() });
                effects.push(Effect::EndStream { caller });
            }
        }
        let waiters = self.callers.waiters.remove(job_id).unwrap_or_default();
        if !waiters.is_empty() {
            // One text for all of them (`Response::body` is shared).
            let response = Response::json(status, body);
            for caller in waiters {
                effects.push(Effect::Answer { caller, response: response.clone() });
            }
        }
    }

    /// A progress event of a running job: kept for late followers, sent to current ones.
    /// `at` is the event's order attempt and sequence number: an event not newer than the
    /// last one shown (signed by the agent, but replayed or held back on the path) is not
    /// shown again.
    /// `event` is the event's JSON text, as the agent sent it.
    pub(super) fn announce_progress(&mut self, job_id: &str, at: progress::At, event: &str, effects: &mut Vec<Effect>) {
        // The job's id is copied only when its backlog is made (its first event), not for
        // every progress event of every job, as `entry(job_id.to_string())` did.
        if !self.progress.contains_key(job_id) {
            self.progress.insert(job_id.to_string(), progress::Backlog::default());
        }
        let backlog = self.progress.get_mut(job_id).expect("made above");
        if !backlog.advance(at) {
            tracing::debug!(job_id = %job_id, attempt = at.0, seq = at.1, "progress event not newer than the last one shown ignored");
            return;
        }
        let chunk: progress::Chunk = progress::progress_chunk(at, event).into();
        for follower in self.callers.followers.get(job_id).into_iter().flatten() {
            effects.push(Effect::Stream { caller: follower.caller, chunk: chunk.clone() });
        }
        backlog.push(at, chunk);
    }

    /// Every caller still waiting is told where its job can be found, and every stream
    /// ends with where to pick it up: the edge is stopping and the jobs go on.
    pub(super) fn release_callers(&mut self, effects: &mut Vec<Effect>) {
        let jobs: Vec<String> = self.callers.waiters.keys().chain(self.callers.followers.keys()).cloned().collect();
        for job_id in jobs {
            self.note_callers(&job_id);
        }
        let waiters: Vec<(String, Vec<CallerId>)> = self.callers.waiters.drain().collect();
        for (job_id, callers) in waiters {
            let response = Response::error(
                ApiError::new(
                    ErrorCode::EdgeRestarting,
                    format!(
                        "the edge is restarting; the job goes on and its result will be kept: follow it with \
                         GET /jobs/{job_id} (do not run the task elsewhere)"
                    ),
                )
                .with_job(&job_id),
            );
            for caller in callers {
                effects.push(Effect::Answer { caller, response: response.clone() });
            }
        }
        self.note_logins();
        let restarting = Response::error(crate::machine::shutting_down());
        for caller in self.callers.logins.drain().flat_map(|(_, c)| c) {
            effects.push(Effect::Answer { caller, response: restarting.clone() });
        }
        let followers: Vec<(String, Vec<Follower>)> = self.callers.followers.drain().collect();
        for (job_id, followers) in followers {
            for Follower { caller, .. } in followers {
                effects.push(Effect::Stream { caller, chunk: progress::restart_chunk(&job_id).into() });
                effects.push(Effect::EndStream { caller });
            }
        }
    }

    /// Callers waiting or following, for tests and metrics.
    pub fn callers_waiting(&self) -> usize {
        let followers: usize = self.callers.followers.values().map(Vec::len).sum();
        [&self.callers.waiters, &self.callers.logins].iter().flat_map(|m| m.values()).map(Vec::len).sum::<usize>() + followers
    }
}
