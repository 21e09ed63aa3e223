//! What the machine posts: alerts to `NOTIFY_URL` when a login needs attention, a usage
//! window is used up or opens, or no agent is connected for `OFFLINE_ALERT_MS`; and each
//! job's result to its `callback_url`. The decisions are [`crate::notify`]'s; here the
//! machine observes, asks the host to post ([`Effect::Post`]), hears how it went
//! ([`Edge::posted`]) and tries again with backoff. What is still to be posted — alerts and
//! callbacks, with their attempts and when the next is due — is stored with alerting's
//! memory ([`Effect::SaveAlerts`]), so a restart neither loses nor repeats one; a callback's
//! retry reads the job's whole record back from storage
//! ([`Effect::Recall`], [`Edge::recalled`]), since memory keeps only an ended job's header.

use super::{Edge, Effect, MAX_CALLBACKS_IN_FLIGHT, MAX_CALLBACKS_PER_RECEIVER};
use crate::clock::Now;
use crate::notify::{self, AlertKind, Observation, Outcome};
use crate::notify::{AlertDelivery, CallbackState};
use crate::record::Job;
use shared::oauth::OAuthSource;
use shared::time::{rfc3339, spoken};
use shared::Millis;
use std::collections::BTreeMap;
use tracing::{info, warn};

/// One POST for the host to make, then report with [`Edge::posted`].
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    pub id: String,
    pub url: String,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Edge {
    /// Looks at every alert condition and posts what [`notify::decide`] says.
    pub(super) fn observe(&mut self, now: Now, effects: &mut Vec<Effect>) {
        let before = self.alerts.clone();
        self.alerts.offline_since = self.offline_since;
        if let Some(url) = self.cfg.notify_url.clone() {
            let observed = self.observations(now);
            let min = self.cfg.notify_min_interval_ms;
            for alert in notify::decide(&mut self.alerts, now.at, &observed, min) {
                info!(alert = alert.kind.as_str(), agent_id = %alert.agent, pool = %self.cfg.pool, "alert posted");
                let (body, headers) = notify::alert_request(&alert, &self.cfg.pool);
                let id = self.alert_post_id(alert.kind);
                // Kept until it is taken or given up: its condition is raised now, so it
                // is not decided again.
                let delivery = AlertDelivery::new(&alert, body, headers, now.at);
                effects.push(Effect::Post(Post { id: id.clone(), url: url.clone(), body: delivery.body.clone(), headers: delivery.headers.clone() }));
                self.alerts.alert_posts.insert(id, delivery);
            }
        }
        if self.alerts != before {
            self.note_alerts(before);
            effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        }
    }

    /// A new alert post's id: unique among those on their way, restored ones included
    /// (this count starts again at each restore).
    fn alert_post_id(&mut self, kind: AlertKind) -> String {
        loop {
            self.posts_made += 1;
            let id = format!("alert:{}:{}", kind.as_str(), self.posts_made);
            if !self.alerts.alert_posts.contains_key(&id) {
                return id;
            }
        }
    }

    fn observations(&self, now: Now) -> Vec<Observation> {
        let warn_ms = (self.cfg.oauth_warn_hours * 3_600_000.0) as Millis;
        let mut out = Vec::new();
        for (_, a) in self.ready() {
            let agent = a.agent_id.clone();
            let needs = a.needs_login(now);
            let ends_at = match (a.oauth.source, a.oauth.refreshable) {
                (OAuthSource::CredentialsFile, true) => a.oauth.refresh_expires_at,
                (OAuthSource::CredentialsFile, false) => a.oauth.expires_at,
                _ => None,
            };
            let soon = !needs && ends_at.is_some_and(|t| t <= now.wall.saturating_add(warn_ms));
            let ends = ends_at.map(rfc3339).unwrap_or_default();
            let hours = ends_at.map(|t| t.saturating_sub(now.wall) / 3_600_000).unwrap_or(0);
            let relogin = "Log in again from the edge's page (GET /) or with `claude-runner login`.";
            out.push(Observation {
                kind: AlertKind::LoginSoon,
                agent: agent.clone(),
                active: soon,
                message: format!("Agent `{agent}`'s Claude login ends at {ends} (in about {hours} h). {relogin}"),
            });
            out.push(Observation {
                kind: AlertKind::LoginNeeded,
                agent: agent.clone(),
                active: needs,
                message: format!("Agent `{agent}` cannot use Claude: its OAuth login needs renewing, and new work falls back or waits. {relogin}"),
            });
            let held = a.usage_held(now);
            let usage = a.oauth.usage.as_ref();
            let message = if held {
                format!(
                    "Agent `{agent}`'s Claude subscription used up its {} usage window until {}. New /execute calls fall back; POST /jobs jobs wait for the reset.",
                    usage.and_then(|u| u.kind.clone()).unwrap_or_else(|| "current".into()),
                    usage.and_then(|u| u.blocked_until()).map(rfc3339).unwrap_or_default()
                )
            } else {
                format!("Agent `{agent}`'s Claude usage window is open again; held jobs run now.")
            };
            out.push(Observation { kind: AlertKind::UsageRejected, agent, active: held, message });
        }
        let offline_for = self.offline_since.map(|t| now.at.saturating_sub(t));
        out.push(Observation {
            kind: AlertKind::Offline,
            agent: String::new(),
            active: offline_for.is_some_and(|d| d >= self.cfg.offline_alert_ms),
            message: format!(
                "No agent has been connected to the edge for {} (since {}). /execute calls fall back, POST /jobs jobs wait; check `claude-runner status` on the runner machine.",
                spoken(offline_for.unwrap_or(0)),
                self.offline_since.map(|t| rfc3339(now.wall_of(t))).unwrap_or_default()
            ),
        });
        out
    }

    /// When alerting next needs the machine: the offline alert's time, the reset of a
    /// usage window whose alert was raised (its "open again" goes then, not whenever the
    /// machine next runs), a post to retry.
    pub(super) fn notices_deadline(&self) -> Option<Millis> {
        let notifying = self.cfg.notify_url.is_some();
        let offline = match (notifying, self.offline_since) {
            (true, Some(t)) if !self.alerts.is_raised(AlertKind::Offline, "") => Some(t.saturating_add(self.cfg.offline_alert_ms)),
            _ => None,
        };
        let resets = self
            .ready()
            .filter(|_| notifying)
            .filter(|(_, a)| self.alerts.is_raised(AlertKind::UsageRejected, &a.agent_id))
            .filter_map(|(_, a)| a.usage_hold_until)
            .min();
        let posts = self.alerts.alert_posts.values().map(|p| p.next_at).min();
        // Those waiting for a place (every place taken, or their receiver's) are not due:
        // the next time is one in flight going unheard past its timeout (or its outcome,
        // an event).
        let flying = self.callbacks_in_flight();
        let callbacks = self.alerts.callbacks.values().filter(|c| c.in_flight || flying.has_place(&notify::callback_receiver(&c.url))).map(|c| c.next_at).min();
        [offline, resets, posts, callbacks].into_iter().flatten().min()
    }

    /// Why a job asking for a callback is refused now, if it is: [`super::MAX_PENDING_CALLBACKS`]
    /// wait for delivery or for their job's end, or its caller's equal share of them (a
    /// caller with its own secret, see [`super::share_of`]; [`Edge::caller_share`]), so one
    /// caller's receiver being down, or two callers', does not refuse every other caller's
    /// callbacks.
    /// A job holds its place from when it is taken, not only once it ended: counted only
    /// once ended, a caller's whole queue of jobs with callbacks, taken while none of its
    /// own waited and cancelled at once, all waited for a receiver that is down.
    pub(super) fn callbacks_full(&self, submission: &shared::contract::Submission) -> Option<shared::contract::ApiError> {
        // Not ended yet: queued, or sent to an agent (bounded by the queue's cap and the
        // agents' slots).
        let coming = self.queue.ids().chain(self.active.iter()).filter_map(|id| self.job(id)).filter(|j| j.callback_url.is_some());
        let coming: Vec<&str> = coming.map(super::share_of).collect();
        let pending = self.alerts.callbacks.len() + coming.len();
        let share = super::share(submission.caller_proven, &submission.placement);
        let mine = match share {
            "" => pending,
            _ => {
                let waiting = self.alerts.callbacks.keys().filter(|id| self.job(*id).is_some_and(|j| super::share_of(j) == share));
                waiting.count() + coming.iter().filter(|s| **s == share).count()
            }
        };
        let (all, of_one) = (super::MAX_PENDING_CALLBACKS, self.caller_share(super::MAX_PENDING_CALLBACKS));
        if pending < all && (share.is_empty() || mine < of_one) {
            return None;
        }
        // A caller with its own secret is told its own count, never the others' nor its
        // share's number (the share tells how many secrets there are: `http::named_share`);
        // the pool secret's holder is the operator.
        let waiting = match share {
            "" => {
                let owners = crate::http::owners(&self.cfg);
                format!(
                    "{pending} jobs with a callback_url wait for their end or for their result's delivery already ({mine} of them \
                     this caller's; at most {all} in all, {of_one} of one caller with its own secret's: an equal share among the \
                     {owners} secrets that send jobs)"
                )
            }
            _ => format!(
                "{mine} jobs of caller `{share}` with a callback_url wait for their end or for their result's delivery already (at \
                 most {all} such jobs wait in all, and the caller may hold {})",
                crate::http::named_share("them")
            ),
        };
        Some(shared::contract::ApiError::new(
            shared::contract::ErrorCode::RunnerBusy,
            format!(
                "{waiting}: their receiver may be down; retry later, or submit without callback_url and read the result with \
                 GET /jobs/{{id}}"
            ),
        ))
    }

    /// A job ended (its whole record at hand): its result goes to its callback, if any —
    /// now, or once fewer than [`MAX_CALLBACKS_IN_FLIGHT`] are on their way (it is due
    /// from now: [`Edge::hand_out_callbacks`] takes it, its record read back).
    pub(super) fn start_callback(&mut self, now: Now, job: &Job, effects: &mut Vec<Effect>) {
        let Some(url) = job.callback_url.clone() else { return };
        let before = self.alerts.clone();
        self.alerts.callbacks.insert(job.id.clone(), CallbackState { url: url.clone(), attempts: 0, next_at: now.at, in_flight: false });
        self.note_alerts(before);
        let flying = self.callbacks_in_flight();
        if flying.has_place(&notify::callback_receiver(&url)) {
            self.attempt_callback(now, job, effects);
        } else {
            info!(job_id = %job.id, in_flight = flying.all, "the job's callback waits for one of those on their way (to its receiver, or in all)");
        }
    }

    /// Callbacks handed to the host and not heard of yet, in all and by receiver.
    fn callbacks_in_flight(&self) -> InFlight {
        let mut flying = InFlight::default();
        for c in self.alerts.callbacks.values().filter(|c| c.in_flight) {
            flying.take(notify::callback_receiver(&c.url));
        }
        flying
    }

    /// Hands the host the callbacks that are due, oldest due first, while fewer than
    /// [`MAX_CALLBACKS_IN_FLIGHT`] are on their way: each POST carries up to
    /// [`notify::MAX_CALLBACK_BODY_BYTES`], and a restore (or a burst of jobs ending) finds
    /// many due at once. Called when one's outcome comes back and at each tick; an attempt
    /// the host never told of stops holding its place at its timeout. Gives up those out
    /// of attempts, whatever the places.
    fn hand_out_callbacks(&mut self, now: Now, effects: &mut Vec<Effect>) {
        let unheard: Vec<String> =
            self.alerts.callbacks.iter().filter(|(_, c)| c.in_flight && c.next_at <= now.at).map(|(id, _)| id.clone()).collect();
        if !unheard.is_empty() {
            let before = self.alerts.clone();
            for id in &unheard {
                if let Some(c) = self.alerts.callbacks.get_mut(id) {
                    c.in_flight = false;
                }
            }
            self.note_alerts(before);
        }
        let mut due: Vec<(Millis, String, u32)> =
            self.alerts.callbacks.iter().filter(|(_, c)| !c.in_flight && c.next_at <= now.at).map(|(id, c)| (c.next_at, id.clone(), c.attempts)).collect();
        due.sort();
        for (_, id, _) in due.iter().filter(|(_, _, attempts)| *attempts >= notify::MAX_ATTEMPTS) {
            self.give_up_callback(id, "no answer", effects);
        }
        // Each due one with its receiver; the places go to those whose receiver has the
        // fewest on their way, then the oldest due: a receiver that has taken places (a slow
        // one holds them until each times out) never goes ahead of one that has none.
        let mut waiting: Vec<(Millis, String, Option<String>)> = due
            .into_iter()
            .filter(|(_, _, attempts)| *attempts < notify::MAX_ATTEMPTS)
            .filter_map(|(at, id, _)| Some((at, id.clone(), notify::callback_receiver(&self.alerts.callbacks.get(&id)?.url))))
            .collect();
        let mut flying = self.callbacks_in_flight();
        loop {
            let next = waiting
                .iter()
                .enumerate()
                .filter(|(_, (_, _, to))| flying.has_place(to))
                .min_by_key(|(_, (at, id, to))| (flying.of(to), *at, id.clone()))
                .map(|(i, _)| i);
            let Some(next) = next else { break };
            let (_, id, to) = waiting.swap_remove(next);
            flying.take(to);
            match self.job(&id) {
                // Posted now: the attempt marks it on its way.
                Some(job) if !job.header_only => {
                    let job = job.clone();
                    self.attempt_callback(now, &job, effects);
                }
                Some(_) => {
                    // Not again before the host has read the record back, or said how it went.
                    let before = self.alerts.clone();
                    if let Some(c) = self.alerts.callbacks.get_mut(&id) {
                        c.next_at = now.at.saturating_add(notify::UNHEARD_AFTER_MS);
                        c.in_flight = true;
                    }
                    self.note_alerts(before);
                    effects.push(Effect::Recall { job_id: id });
                }
                None => self.give_up_callback(&id, "the job is no longer kept", effects),
            }
        }
        self.callback_settled(effects);
    }

    /// Posts the job's result (its whole record) to its callback, counting the attempt.
    fn attempt_callback(&mut self, now: Now, job: &Job, effects: &mut Vec<Effect>) {
        // CALLBACK_HOSTS is read at each attempt, as the signing secret below and NOTIFY_URL
        // are: the URL was checked when the job was submitted, and a host taken out since
        // (the edge restarted with other settings) must not be posted the job, signed —
        // neither one queued across the restart nor a retry.
        let url = self.alerts.callbacks.get(&job.id).map(|c| c.url.as_str());
        if let Some(Err(e)) = url.map(|url| notify::check_callback(url, &self.cfg.callback_hosts)) {
            let why = format!("{e} (it was when the job was submitted)");
            self.give_up_callback(&job.id, &why, effects);
            return;
        }
        // Signed with the secret the job was sent with, which its caller holds: a caller
        // with its own secret does not hold the pool's, and could not check the signature
        // (nor tell a forged callback) with it. One taken out of RUNNER_SECRETS since gets
        // none: the pool's secret would give it (perhaps taken out for a reason) a body of
        // its own job's making signed with the operator's secret, which the operator's own
        // receivers take as the edge's.
        let key = match job.caller_proven {
            true => self.cfg.own_secret(job.placement.caller()),
            false => Some(self.cfg.runner_secret.as_str()),
        };
        let Some(key) = key.map(str::to_string) else {
            let why = "its caller no longer has a secret of its own (RUNNER_SECRETS) to sign it with";
            self.give_up_callback(&job.id, why, effects);
            return;
        };
        let before = self.alerts.clone();
        let Some(callback) = self.alerts.callbacks.get_mut(&job.id) else { return };
        callback.attempts += 1;
        callback.in_flight = true;
        // If the host never says how it went, try again a while after its timeout.
        callback.next_at = now.at.saturating_add(notify::UNHEARD_AFTER_MS);
        let (url, attempt) = (callback.url.clone(), callback.attempts);
        self.note_alerts(before);
        let body = notify::callback_body(job.view(now), &self.cfg.pool);
        let timestamp = now.wall;
        let headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-runner-job-id".to_string(), job.id.clone()),
            ("x-runner-timestamp".to_string(), timestamp.to_string()),
            ("x-runner-signature".to_string(), notify::signature(&key, timestamp, &body)),
        ];
        info!(job_id = %job.id, attempt, "posting the job's result to its callback");
        effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        effects.push(Effect::Post(Post { id: format!("callback:{}:{attempt}", job.id), url, body, headers }));
    }

    /// The whole record of a job whose callback is due, read back from storage.
    pub fn recalled(&mut self, now: impl Into<Now>, job_id: &str, record: Result<Option<Job>, String>) -> Vec<Effect> {
        let now = now.into();
        self.begin(super::storage::Origin::Tick, Some(now));
        let mut effects = Vec::new();
        match record {
            Ok(Some(job)) if !job.header_only => self.attempt_callback(now, &job, &mut effects),
            Ok(_) => {
                self.give_up_callback(job_id, "its record is no longer kept", &mut effects);
                self.callback_settled(&mut effects);
            }
            // Storage could not be read now: the callback is tried again at the time set
            // when it was handed out, and gives its place up meanwhile.
            Err(e) => {
                warn!(job_id, error = %e, "could not read a job's record for its callback; trying again later");
                if self.alerts.callbacks.get(job_id).is_some_and(|c| c.in_flight) {
                    let before = self.alerts.clone();
                    if let Some(c) = self.alerts.callbacks.get_mut(job_id) {
                        c.in_flight = false;
                    }
                    self.note_alerts(before);
                }
            }
        }
        effects
    }

    /// Retries what is due: callbacks and alerts whose last attempt failed or went unheard.
    pub(super) fn retry_notices(&mut self, now: Now, effects: &mut Vec<Effect>) {
        self.hand_out_callbacks(now, effects);
        let due: Vec<String> = self.alerts.alert_posts.iter().filter(|(_, p)| p.next_at <= now.at).map(|(id, _)| id.clone()).collect();
        if due.is_empty() {
            return;
        }
        let before = self.alerts.clone();
        for id in due {
            // NOTIFY_URL is read at each attempt: it may have been taken out since (the
            // edge restarted with other settings).
            let Some(url) = self.cfg.notify_url.clone() else {
                warn!(delivery = %id, "alert given up: NOTIFY_URL is no longer set");
                self.alerts.alert_posts.remove(&id);
                continue;
            };
            let post = self.alerts.alert_posts.get_mut(&id).expect("listed above");
            if post.stale(now.at) {
                warn!(delivery = %id, attempts = post.attempts, "alert given up: decided too long ago to be news (the edge was down meanwhile?); decided again if still so");
                // Never told: its condition is looked at afresh, and told in today's words
                // if it still holds.
                let key = post.key.clone();
                self.alerts.raised.remove(&key);
                self.alerts.alert_posts.remove(&id);
                continue;
            }
            if post.attempts >= notify::MAX_ATTEMPTS {
                warn!(delivery = %id, attempts = post.attempts, "alert given up: no answer");
                self.alerts.alert_posts.remove(&id);
                continue;
            }
            post.attempts += 1;
            // If the host never says how it went, try again a while after its timeout.
            post.next_at = now.at.saturating_add(notify::UNHEARD_AFTER_MS);
            info!(delivery = %id, attempt = post.attempts, "posting an alert again");
            effects.push(Effect::Post(Post { id, url, body: post.body.clone(), headers: post.headers.clone() }));
        }
        // The attempt is stored before it goes out, as a callback's is.
        self.note_alerts(before);
        effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
    }

    /// A callback was taken or given up: its job, kept past the caps while it waited
    /// ([`Edge::keep_within_caps`]), is now counted in them again.
    fn callback_settled(&mut self, effects: &mut Vec<Effect>) {
        self.keep_within_caps(None, effects);
    }

    pub(super) fn give_up_callback(&mut self, job_id: &str, why: &str, effects: &mut Vec<Effect>) {
        let before = self.alerts.clone();
        if let Some(callback) = self.alerts.callbacks.remove(job_id) {
            warn!(job_id, attempts = callback.attempts, reason = why, "callback given up");
            self.note_alerts(before);
            effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        }
    }

    /// The host's word on one POST.
    pub fn posted(&mut self, now: impl Into<Now>, id: &str, outcome: Outcome) -> Vec<Effect> {
        let now = now.into();
        self.begin(super::storage::Origin::Tick, Some(now));
        let mut effects = Vec::new();
        let retry = notify::retry_after(&outcome);
        let taken = outcome.as_ref().is_ok_and(|s| (200..300).contains(s));
        let what = match &outcome {
            Ok(status) => format!("HTTP {status}"),
            Err(e) => notify::failure_words(e),
        };
        if let Some(rest) = id.strip_prefix("callback:") {
            let Some((job_id, attempt)) = rest.rsplit_once(':') else { return effects };
            let Some(callback) = self.alerts.callbacks.get(job_id).filter(|c| c.attempts.to_string() == attempt).cloned() else {
                return effects;
            };
            if taken {
                info!(job_id, attempt, "callback delivered");
                let before = self.alerts.clone();
                self.alerts.callbacks.remove(job_id);
                self.note_alerts(before);
                effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
            } else if !retry || callback.attempts >= notify::MAX_ATTEMPTS {
                self.give_up_callback(job_id, &what, &mut effects);
            } else {
                // Posted again later; its place goes to the next meanwhile.
                let wait = notify::backoff(callback.attempts);
                warn!(job_id, attempt, outcome = %what, retry_in_ms = wait, "callback failed; trying again");
                let before = self.alerts.clone();
                if let Some(c) = self.alerts.callbacks.get_mut(job_id) {
                    c.next_at = now.at.saturating_add(wait);
                    c.in_flight = false;
                }
                self.note_alerts(before);
                effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
            }
            // The place it held goes to the next due (settling, if it was settled, with it).
            self.hand_out_callbacks(now, &mut effects);
        } else if let Some(attempts) = self.alerts.alert_posts.get(id).map(|p| p.attempts) {
            let before = self.alerts.clone();
            if retry && attempts < notify::MAX_ATTEMPTS {
                let wait = notify::backoff(attempts);
                warn!(delivery = id, attempt = attempts, outcome = %what, retry_in_ms = wait, "alert post failed; trying again");
                if let Some(post) = self.alerts.alert_posts.get_mut(id) {
                    post.next_at = now.at.saturating_add(wait);
                }
            } else {
                match taken {
                    true => info!(delivery = id, attempt = attempts, "alert delivered"),
                    false => warn!(delivery = id, attempt = attempts, outcome = %what, "alert given up"),
                }
                self.alerts.alert_posts.remove(id);
            }
            self.note_alerts(before);
            effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        }
        effects
    }

    /// Alerts on their way, for tests and metrics.
    pub fn alert_posts_pending(&self) -> usize {
        self.alerts.alert_posts.len()
    }

    /// Callbacks still to be posted (due, on their way, or waiting for a retry): logged
    /// at a start, and for tests.
    pub fn callbacks_pending(&self) -> usize {
        self.alerts.callbacks.len()
    }
}

/// The callbacks in flight, counted for [`Edge::hand_out_callbacks`]'s places.
#[derive(Default)]
struct InFlight {
    all: usize,
    /// By receiver ([`notify::callback_receiver`]; `None` for a URL no longer allowed,
    /// which is given up when its turn comes).
    to: BTreeMap<Option<String>, usize>,
}

impl InFlight {
    /// Whether a callback to `to` (a receiver, [`notify::callback_receiver`]) may go now: a
    /// place free in all, and one of its receiver's ([`MAX_CALLBACKS_PER_RECEIVER`]). The
    /// last free place goes only to a receiver with none on its way, so two slow receivers
    /// together never hold every place: a third's callback still goes at once.
    fn has_place(&self, to: &Option<String>) -> bool {
        let theirs = self.of(to);
        self.all < MAX_CALLBACKS_IN_FLIGHT && theirs < MAX_CALLBACKS_PER_RECEIVER && (theirs == 0 || self.all + 1 < MAX_CALLBACKS_IN_FLIGHT)
    }

    /// How many are on their way to `to`.
    fn of(&self, to: &Option<String>) -> usize {
        self.to.get(to).copied().unwrap_or(0)
    }

    fn take(&mut self, to: Option<String>) {
        self.all += 1;
        *self.to.entry(to).or_default() += 1;
    }
}
