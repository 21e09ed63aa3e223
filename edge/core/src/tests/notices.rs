//! Alerts and result callbacks as the machine posts them: when, how often, what survives a
//! restart.

use super::*;
use crate::machine::Post;
use crate::notify::AlertState;

fn notifying() -> Config {
    Config { notify_url: Some("https://ntfy.example/topic".into()), offline_alert_ms: 10_000, ..config() }
}

fn posts(effects: &[Effect]) -> Vec<Post> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Post(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn alert_kinds(effects: &[Effect]) -> Vec<String> {
    posts(effects)
        .iter()
        .filter_map(|d| d.headers.iter().find(|(n, _)| n == "x-claude-runner-alert").map(|(_, v)| v.clone()))
        .collect()
}

/// Alerting's memory as an event stores it: its last `SaveAlerts` (see `split_writes`).
fn saved_alerts(effects: &[Effect]) -> Option<AlertState> {
    effects.iter().rev().find_map(|e| match e {
        Effect::SaveAlerts(s) => Some((**s).clone()),
        _ => None,
    })
}

#[test]
fn an_agent_away_for_offline_alert_ms_is_alerted_once_even_across_a_restart() {
    let mut edge = Edge::new(notifying(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let effects = edge.disconnect(1_000, &sid);
    let stored = saved_alerts(&effects).expect("the time it went away is stored");
    assert_eq!(stored.offline_since, Some(1_000));
    // The alarm is set for the alert; nothing before it.
    assert_eq!(edge.next_deadline(), Some(11_000));
    assert!(alert_kinds(&edge.tick(10_999)).is_empty());
    // The edge restarts in between (the Worker's object leaves memory): it still knows.
    let (mut edge, _) = Edge::restore(notifying(), vec![], vec![], Some(stored), 5_000);
    assert_eq!(edge.next_deadline(), Some(11_000));
    let effects = edge.tick(11_000);
    assert_eq!(alert_kinds(&effects), vec!["offline"]);
    let alert = &posts(&effects)[0];
    assert_eq!(alert.url, "https://ntfy.example/topic");
    assert!(alert.body.contains("No agent has been connected to the edge for 10 seconds"), "{}", alert.body);
    let id = alert.id.clone();
    let stored = saved_alerts(&edge.posted(11_100, &id, Ok(200))).unwrap();
    // Delivered: not again, however long it lasts, nor after another restart.
    let (mut edge, _) = Edge::restore(notifying(), vec![], vec![], Some(stored), 20_000);
    for t in (20_000..200_000).step_by(10_000) {
        assert!(alert_kinds(&edge.tick(t)).is_empty());
    }
    // A failed post is tried again, with backoff; a delivered one is done.
    let mut edge2 = Edge::new(notifying(), 0);
    let effects = edge2.tick(10_000);
    let id2 = posts(&effects)[0].id.clone();
    assert!(posts(&edge2.posted(10_100, &id2, Err("connection refused".into()))).is_empty());
    assert!(posts(&edge2.tick(10_100 + 1_999)).is_empty());
    assert_eq!(posts(&edge2.tick(10_100 + 2_000)).len(), 1, "retried after 2 s");
    let effects = edge2.posted(12_200, &id2, Ok(200));
    assert_eq!(edge2.alert_posts_pending(), 0);
    assert!(saved_alerts(&effects).unwrap().alert_posts.is_empty(), "stored as delivered");
}

#[test]
fn an_alert_whose_post_failed_is_posted_again_after_a_restart() {
    // The only agent goes away; its offline alert's post gets a 502; the edge leaves
    // memory (the Worker's object, idle for some seconds) before the retry.
    let mut edge = Edge::new(notifying(), 0);
    let effects = edge.tick(10_000);
    let first = posts(&effects)[0].clone();
    let effects = edge.posted(10_100, &first.id, Ok(502));
    let stored = saved_alerts(&effects).expect("the failed attempt is stored");
    assert!(stored.is_raised(crate::notify::AlertKind::Offline, ""), "its condition is not decided again");
    let (mut edge, _) = Edge::restore(notifying(), vec![], vec![], Some(stored), 11_000);
    assert_eq!(edge.alert_posts_pending(), 1);
    // Its retry is due as it was (2 s after the failure): the alarm is set for it.
    assert_eq!(edge.next_deadline(), Some(12_100));
    assert!(posts(&edge.tick(12_099)).is_empty());
    let effects = edge.tick(12_100);
    let again = posts(&effects);
    assert_eq!(again.len(), 1);
    assert_eq!((&again[0].id, &again[0].url, &again[0].body, &again[0].headers), (&first.id, &first.url, &first.body, &first.headers));
    assert_eq!(saved_alerts(&effects).unwrap().alert_posts[&first.id].attempts, 2, "the attempt is stored before it goes out");
    edge.posted(12_200, &first.id, Ok(200));
    assert_eq!(edge.alert_posts_pending(), 0);
}

#[test]
fn an_alert_is_given_up_after_max_attempts_across_restarts() {
    let mut edge = Edge::new(notifying(), 0);
    let id = posts(&edge.tick(10_000))[0].id.clone();
    let mut t = 10_000;
    let mut sent = 1;
    loop {
        t += 100;
        let stored = saved_alerts(&edge.posted(t, &id, Err("connection reset".into()))).unwrap();
        // Each time from storage, as the Worker's object after an eviction.
        edge = Edge::restore(notifying(), vec![], vec![], Some(stored), t).0;
        let Some(due) = edge.next_deadline() else { break };
        t = due;
        let effects = edge.tick(t);
        match posts(&effects).len() {
            1 => sent += 1,
            _ => break,
        }
    }
    assert_eq!(sent, crate::notify::MAX_ATTEMPTS);
    assert_eq!(edge.alert_posts_pending(), 0, "given up");
}

#[test]
fn an_alert_waiting_for_its_retry_is_given_up_once_notify_url_is_unset() {
    let mut edge = Edge::new(notifying(), 0);
    let id = posts(&edge.tick(10_000))[0].id.clone();
    let stored = saved_alerts(&edge.posted(10_100, &id, Ok(503))).unwrap();
    let (mut edge, _) = Edge::restore(config(), vec![], vec![], Some(stored), 11_000);
    assert_eq!(edge.next_deadline(), Some(12_100));
    let effects = edge.tick(12_100);
    assert!(posts(&effects).is_empty());
    assert!(saved_alerts(&effects).unwrap().alert_posts.is_empty());
}

#[test]
fn a_pools_alerts_go_to_its_url_and_name_it() {
    let gpu = Config { pool: "gpu".into(), notify_url: Some("https://ntfy.example/gpu".into()), ..notifying() };
    let mut edge = Edge::new(gpu, 0);
    let effects = edge.tick(10_000);
    assert_eq!(alert_kinds(&effects), vec!["offline"]);
    let alert = &posts(&effects)[0];
    assert_eq!(alert.url, "https://ntfy.example/gpu");
    assert!(alert.body.starts_with("Pool `gpu`: No agent has been connected"), "{}", alert.body);
    assert!(alert.headers.contains(&("x-claude-runner-pool".to_string(), "gpu".to_string())), "{:?}", alert.headers);
    // The default pool's say nothing of pools.
    let effects = Edge::new(notifying(), 0).tick(10_000);
    let alert = &posts(&effects)[0];
    assert!(alert.body.starts_with("No agent has been connected") && !alert.headers.iter().any(|(n, _)| n == "x-claude-runner-pool"), "{alert:?}");
}

#[test]
fn login_and_usage_alerts_follow_the_reports() {
    let mut edge = Edge::new(notifying(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let beat = |edge: &mut Edge, t: u64, oauth: OAuthReport| pulse(edge, t, &sid, Beat { oauth, ..beat(&[], 1, 0) });
    let broken = OAuthReport { auth_failed: true, ..oauth() };
    assert_eq!(alert_kinds(&beat(&mut edge, 100, broken.clone())), vec!["login_needed"]);
    assert!(alert_kinds(&beat(&mut edge, 200, broken)).is_empty());
    let usage = shared::usage::UsageWindow {
        status: shared::usage::UsageStatus::Rejected,
        kind: Some("five_hour".into()),
        resets_at: Some(5_000),
        utilization: None,
        seen_at: 300,
    };
    let limited = OAuthReport { usage: Some(usage), ..oauth() };
    let effects = beat(&mut edge, 300, limited.clone());
    assert_eq!(alert_kinds(&effects), vec!["usage_rejected"]);
    assert!(posts(&effects)[0].body.contains("five_hour"));
    assert_eq!(alert_kinds(&beat(&mut edge, 5_000, limited)), vec!["usage_reset"], "the reset passed");
    // Nothing carries a token.
    for p in posts(&beat(&mut edge, 5_100, oauth())) {
        assert!(!p.body.contains("sk-ant"));
    }
}

#[test]
fn a_callback_is_retried_with_backoff_until_taken_and_survives_a_restart() {
    let (mut edge, sid) = ready_edge();
    sent_with_callback(&mut edge, 0, "j", "https://hooks.example.com/r");
    let mut stored_jobs = std::collections::HashMap::new();
    let report = result_msg(&edge, "j", ok_result());
    let effects = say(&mut edge, 10, &sid, report);
    for e in &effects {
        if let Effect::Save(j) = e {
            stored_jobs.insert(j.id.clone(), (**j).clone());
        }
    }
    let first = posts(&effects);
    assert_eq!(first.len(), 1);
    let d = &first[0];
    assert_eq!(d.url, "https://hooks.example.com/r");
    let header = |name: &str| d.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
    let ts: u64 = header("x-runner-timestamp").parse().unwrap();
    assert_eq!(header("x-runner-signature"), crate::notify::signature(SECRET, ts, &d.body));
    let view: Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!((view["job_id"].as_str(), view["state"].as_str(), view["result"]["output"].as_str()), (Some("j"), Some("succeeded"), Some("done")));
    // The attempt is stored before it goes out.
    assert_eq!(saved_alerts(&effects).unwrap().callbacks["j"].attempts, 1);
    // A 500: again after 2 s. A restart in between keeps it due.
    let stored = saved_alerts(&edge.posted(20, &d.id, Ok(500))).unwrap();
    assert_eq!(stored.callbacks["j"].next_at, 2_020);
    let record = stored_jobs["j"].clone();
    let (mut edge, _) = Edge::restore(config(), vec![record.clone()], vec![], Some(stored), 100);
    assert!(posts(&edge.tick(2_019)).is_empty());
    // Memory keeps only the ended job's header: the machine asks for the whole record back.
    let effects = edge.tick(2_020);
    assert!(effects.iter().any(|e| matches!(e, Effect::Recall { job_id } if job_id == "j")), "{effects:?}");
    let again = posts(&edge.recalled(2_021, "j", Ok(Some(record))));
    assert_eq!(again.len(), 1);
    assert!(again[0].id.ends_with(":2"));
    let view: Value = serde_json::from_str(&again[0].body).unwrap();
    assert_eq!(view["result"]["output"], "done", "the whole result, read back");
    // A stale report about the first attempt changes nothing; the second is taken.
    assert!(edge.posted(2_030, &d.id, Ok(200)).is_empty());
    let stored = saved_alerts(&edge.posted(2_040, &again[0].id, Ok(204))).unwrap();
    assert!(stored.callbacks.is_empty());
    assert_eq!(edge.next_deadline(), Some(10 + 60_000), "nothing more due but the retention");
}

#[test]
fn a_callback_refused_for_good_is_given_up() {
    let (mut edge, sid) = ready_edge();
    sent_with_callback(&mut edge, 0, "j", "https://hooks.example.com/r");
    let report = result_msg(&edge, "j", ok_result());
    let d = posts(&say(&mut edge, 10, &sid, report))[0].clone();
    let stored = saved_alerts(&edge.posted(20, &d.id, Ok(404))).unwrap();
    assert!(stored.callbacks.is_empty(), "a 404 will not change: given up");
    // A record gone from storage is given up too.
    assert!(edge.recalled(30, "j", Ok(None)).is_empty(), "nothing pending any more");
    // And a host not on CALLBACK_HOSTS is refused at submission.
    let body = json!({"prompt": "x", "callback_url": "https://evil.example.com/r"}).to_string();
    let submission = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    assert_eq!(edge.submit(30, "k".into(), submission, Mode::Detached).unwrap_err().status, 400);
}

/// CALLBACK_HOSTS is read at each attempt, as the signing secret and NOTIFY_URL are: a
/// host the operator took out (and restarted the edge) is posted nothing more — neither a
/// job's that was still queued nor a callback waiting for its retry; each is given up
/// with one line naming its job (review rev1).
#[test]
fn a_callback_host_taken_out_of_callback_hosts_is_posted_nothing_more() {
    let (mut edge, sid) = ready_edge();
    let mut stored = std::collections::HashMap::new();
    let mut keep = |effects: &[Effect]| {
        for e in effects {
            if let Effect::Save(j) = e {
                stored.insert(j.id.clone(), (**j).clone());
            }
        }
    };
    for id in ["retried", "queued"] {
        let body = json!({"prompt": "x", "callback_url": "https://hooks.example.com/r"}).to_string();
        let submission = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
        keep(&edge.submit(0, id.into(), submission, Mode::Detached).unwrap().effects);
    }
    let result = result_msg(&edge, "retried", ok_result());
    let effects = say(&mut edge, 10, &sid, result);
    keep(&effects);
    let d = posts(&effects)[0].clone();
    let alerts = saved_alerts(&edge.posted(20, &d.id, Ok(500))).unwrap();
    assert_eq!(alerts.callbacks["retried"].next_at, 2_020);
    // The operator takes the host out and restarts the edge.
    let after = Config { callback_hosts: vec!["127.0.0.1".into()], ..config() };
    let jobs = stored.into_values().collect();
    let (mut edge, _) = Edge::restore(after, jobs, vec![], Some(alerts), 100);
    let logs = super::logs::capture();
    let (sid, effects) = join(&mut edge, 200, "spark", &agent_key(1), vec![], 2);
    let mut effects = [effects, say(&mut edge, 200, &sid, credit(1, 0))].concat();
    let id = order_of(&effects, &sid, "spark", 200).header.job_id.clone();
    assert_eq!(id, "queued");
    effects.extend(say(&mut edge, 201, &sid, AgentMessage::Accepted { job_id: id.clone() }));
    effects.extend(report(&mut edge, 202, &sid, &id, ok_result()));
    // The retry falls due; the record is read back.
    effects.extend(edge.tick(2_020));
    let record = edge.job("retried").cloned().map(|mut j| {
        j.header_only = false;
        j.result = Some(ok_result());
        j
    });
    effects.extend(edge.recalled(2_021, "retried", Ok(record)));
    assert!(posts(&effects).is_empty(), "{:?}", posts(&effects).iter().map(|p| &p.url).collect::<Vec<_>>());
    assert!(saved_alerts(&effects).unwrap().callbacks.is_empty(), "both given up");
    let lines = logs.lines();
    for id in ["queued", "retried"] {
        let given_up: Vec<&String> = lines.iter().filter(|l| l.contains("callback given up") && l.contains(&format!("job_id={id}"))).collect();
        assert_eq!(given_up.len(), 1, "{lines:#?}");
        assert!(given_up[0].contains("CALLBACK_HOSTS"), "{}", given_up[0]);
    }
}

/// A CALLBACK_HOSTS entry with a scheme or a path (`https://hooks.example`, a webhook's
/// whole URL) was taken as written and matched no host, so every `callback_url` was refused
/// as "not allowed … CALLBACK_HOSTS lists the hosts", naming the host the operator had
/// listed. The edge now refuses the setting at its start, without repeating it (a webhook's
/// URL may hold its token), as the agent refuses such an ALLOWED_REPO_HOSTS.
#[test]
fn a_callback_hosts_entry_that_is_no_host_stops_the_start() {
    let lookup = |extra: &'static str| {
        move |name: &str| match name {
            "RUNNER_SECRET" => Some("0123456789abcdef0123".to_string()),
            "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".to_string()),
            "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".to_string()),
            "CALLBACK_HOSTS" => Some(extra.to_string()),
            _ => None,
        }
    };
    for bad in ["https://hooks.example", "hooks.example/services/T0/xoxb-token", "hooks.example:https", "a b", "user@hooks.example"] {
        let err = Config::from_lookup(lookup(bad)).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{bad} was taken"));
        assert!(err.starts_with("CALLBACK_HOSTS") && err.contains("host:port") && !err.contains("xoxb-token"), "{bad}: {err}");
    }
    let good = Config::from_lookup(lookup("Hooks.Example, ci.example:8443,127.0.0.1:9000,[::1]:9000,localhost")).unwrap();
    assert_eq!(good.callback_hosts, ["hooks.example", "ci.example:8443", "127.0.0.1:9000", "[::1]:9000", "localhost"]);
}

/// A host name with `_` — a Docker Compose service or container name (`hook_receiver`), which
/// URLs and the edge's HTTP client take — was taken as CALLBACK_HOSTS before 10af052 and
/// matched its callback_urls; that check stopped the start as "not a host".
#[test]
fn a_callback_host_with_an_underscore_is_a_host() {
    let lookup = |name: &str| match name {
        "RUNNER_SECRET" => Some("0123456789abcdef0123".to_string()),
        "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".to_string()),
        "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".to_string()),
        "CALLBACK_HOSTS" => Some("hook_receiver,ci_hooks.internal:8443".to_string()),
        _ => None,
    };
    let cfg = Config::from_lookup(lookup).unwrap_or_else(|e| panic!("refused: {e}"));
    assert_eq!(cfg.callback_hosts, ["hook_receiver", "ci_hooks.internal:8443"]);
    assert_eq!(crate::notify::check_callback("https://hook_receiver/done", &cfg.callback_hosts), Ok(()));
    assert_eq!(crate::notify::check_callback("https://ci_hooks.internal:8443/x", &cfg.callback_hosts), Ok(()));
}

/// A used-up usage window with its alert raised and no queued work: the machine woke at
/// the window's reset only for queued jobs, so the "open again" alert waited for whatever
/// ran the machine next (the connection's silence check, up to two heartbeat intervals
/// late), while the status page already said open. It now wakes at the reset and posts it.
#[test]
fn a_raised_usage_alert_wakes_the_edge_at_the_windows_reset() {
    let mut edge = Edge::new(notifying(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let usage = shared::usage::UsageWindow {
        status: shared::usage::UsageStatus::Rejected,
        kind: Some("five_hour".into()),
        resets_at: Some(1_500),
        utilization: None,
        seen_at: 300,
    };
    let limited = OAuthReport { usage: Some(usage), ..oauth() };
    let effects = pulse(&mut edge, 300, &sid, Beat { oauth: limited, ..beat(&[], 1, 0) });
    assert_eq!(alert_kinds(&effects), vec!["usage_rejected"]);
    assert_eq!(edge.queued(), 0);
    assert_eq!(edge.next_deadline(), Some(1_500), "the window's reset, before the connection's silence check at {}", 300 + 2 * HB);
    assert!(alert_kinds(&edge.tick(1_499)).is_empty());
    assert_eq!(alert_kinds(&edge.tick(1_500)), vec!["usage_reset"]);
    assert_eq!(edge.next_deadline(), Some(300 + 2 * HB), "nothing more until the silence check");
    // Without NOTIFY_URL there is nothing to post: no wake-up for it.
    let mut quiet = Edge::new(config(), 0);
    let (sid, _) = join(&mut quiet, 0, "spark", &agent_key(1), vec![], 1);
    let usage = shared::usage::UsageWindow {
        status: shared::usage::UsageStatus::Rejected,
        kind: None,
        resets_at: Some(1_500),
        utilization: None,
        seen_at: 300,
    };
    pulse(&mut quiet, 300, &sid, Beat { oauth: OAuthReport { usage: Some(usage), ..oauth() }, ..beat(&[], 1, 0) });
    assert_eq!(quiet.next_deadline(), Some(300 + 2 * HB));
}

/// A callback URL with an internationalised host (`https://bücher.example/…`) is posted
/// to its punycode form (`xn--bcher-kva.example`, as the hosts' URL parser takes it), but
/// a CALLBACK_HOSTS entry that was not ASCII stopped the start as "not a host", so no
/// operator could allow one. An entry is taken to its punycode form, and a callback URL's
/// host too, whichever way each is written.
#[test]
fn a_callback_host_may_be_an_internationalised_name() {
    let lookup = |name: &str| match name {
        "RUNNER_SECRET" => Some("0123456789abcdef0123".to_string()),
        "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".to_string()),
        "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".to_string()),
        "CALLBACK_HOSTS" => Some("Bücher.example, ci.münchen.example:8443, xn--caf-dma.example".to_string()),
        _ => None,
    };
    let cfg = Config::from_lookup(lookup).unwrap_or_else(|e| panic!("refused: {e}"));
    assert_eq!(cfg.callback_hosts, ["xn--bcher-kva.example", "ci.xn--mnchen-3ya.example:8443", "xn--caf-dma.example"]);
    let check = |url: &str| crate::notify::check_callback(url, &cfg.callback_hosts);
    for allowed in [
        "https://bücher.example/done",
        "https://BÜCHER.example/done",
        "https://xn--bcher-kva.example/done",
        "https://ci.münchen.example:8443/x",
        "https://café.example/x",
    ] {
        assert_eq!(check(allowed), Ok(()), "{allowed}");
    }
    for refused in ["https://bucher.example/done", "https://ci.münchen.example:9000/x", "https://münchen.example/x"] {
        let err = check(refused).unwrap_err();
        assert!(err.contains("is not allowed") && err.contains("CALLBACK_HOSTS"), "{refused}: {err}");
    }
}

/// An alert whose post failed, and whose condition ended before its retry (the edge
/// restarted meanwhile), is dropped: "no agent connected" is not posted with one back.
#[test]
fn an_alert_on_its_way_is_dropped_once_its_condition_ends() {
    let mut edge = Edge::new(notifying(), 0);
    let first = posts(&edge.tick(10_000))[0].clone();
    let stored = saved_alerts(&edge.posted(10_100, &first.id, Ok(502))).unwrap();
    let (mut edge, _) = Edge::restore(notifying(), vec![], vec![], Some(stored), 11_000);
    join(&mut edge, 11_500, "spark", &agent_key(1), vec![], 1);
    assert!(edge.health(11_600).agents.iter().all(|a| a.connected));
    let again = posts(&edge.tick(12_100));
    assert!(again.is_empty(), "'no agent connected' posted while one is: {:?}", again.iter().map(|p| &p.body).collect::<Vec<_>>());
    assert_eq!(edge.alert_posts_pending(), 0);
}

/// An alert decided long before a restart is not posted after it as news; its condition,
/// still true, is decided again and told afresh.
#[test]
fn an_alert_decided_a_day_before_a_restart_is_decided_again_not_posted_stale() {
    let mut edge = Edge::new(notifying(), 0);
    let first = posts(&edge.tick(10_000))[0].clone();
    let stored = saved_alerts(&edge.posted(10_100, &first.id, Ok(502))).unwrap();
    let day = 86_400_000;
    let (mut edge, _) = Edge::restore(notifying(), vec![], vec![], Some(stored), 10_000 + day);
    let effects = edge.tick(10_000 + day);
    assert!(posts(&effects).is_empty(), "a day-old alert posted: {:?}", posts(&effects).iter().map(|p| &p.body).collect::<Vec<_>>());
    let stored = saved_alerts(&effects).expect("the stale post's end is stored");
    assert!(stored.alert_posts.is_empty() && !stored.raised.iter().any(|k| k.starts_with("offline")), "{stored:?}");
    // Still no agent: told again, as news of now.
    let fresh = posts(&edge.tick(10_000 + day + 1_000));
    assert_eq!(fresh.len(), 1, "the offline alert decided again");
}

/// The POSTs and recalls of callbacks the machine handed the host in `effects`, by job.
fn handed_out(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Post(p) => p.id.strip_prefix("callback:").and_then(|r| r.rsplit_once(':')).map(|(job, _)| job.to_string()),
            Effect::Recall { job_id } => Some(job_id.clone()),
            _ => None,
        })
        .collect()
}

/// Each callback carries its job's view (output up to 1 MiB, a diff up to 6 MiB), and the
/// hosts posted every one the machine handed them at once: twenty jobs ending together
/// (or a restore finding them overdue) were twenty bodies in flight. The machine hands
/// out at most `MAX_CALLBACKS_IN_FLIGHT`; the next goes when one's outcome comes back, or
/// when one's attempt went unheard past its timeout.
#[test]
fn callbacks_in_flight_are_capped_and_the_next_goes_when_one_is_heard() {
    use crate::machine::MAX_CALLBACKS_IN_FLIGHT;
    // Eight receivers, taking turns: one alone gets only its share of the places (below).
    let hosts: Vec<String> = (0..8).map(|i| format!("h{i}.example.com")).collect();
    let cfg = || Config { callback_hosts: hosts.clone(), ..config() };
    let mut edge = Edge::new(cfg(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 20);
    say(&mut edge, 0, &sid, credit(20, 0));
    let stored = std::cell::RefCell::new(std::collections::HashMap::new());
    let alerts = std::cell::RefCell::new(None);
    let keep = |effects: &[Effect]| {
        for e in effects {
            match e {
                Effect::Save(j) => drop(stored.borrow_mut().insert(j.id.clone(), (**j).clone())),
                Effect::SaveAlerts(a) => *alerts.borrow_mut() = Some((**a).clone()),
                _ => {}
            }
        }
    };
    for i in 0..20 {
        let url = format!("https://h{}.example.com/r", i % 8);
        let body = json!({"prompt": "x", "callback_url": url}).to_string();
        let submission = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
        keep(&edge.submit(0, format!("j{i:02}"), submission, Mode::Detached).unwrap().effects);
    }
    let mut first = Vec::new();
    for i in 0..20 {
        let effects = report(&mut edge, 10, &sid, &format!("j{i:02}"), ok_result());
        keep(&effects);
        first.extend(posts(&effects));
    }
    assert_eq!(first.len(), MAX_CALLBACKS_IN_FLIGHT, "{:?}", first.iter().map(|p| &p.id).collect::<Vec<_>>());
    // The others wait their turn without the machine spinning on them.
    assert!(edge.next_deadline().is_some_and(|at| at > 10), "{:?}", edge.next_deadline());
    assert!(handed_out(&edge.tick(1_000)).is_empty());
    // One taken: the next goes (its record read back: memory keeps an ended job's header).
    let effects = edge.posted(1_000, &first[0].id, Ok(200));
    keep(&effects);
    assert_eq!(handed_out(&effects), ["j08"]);
    let whole = stored.borrow().get("j08").cloned();
    let effects = edge.recalled(1_001, "j08", Ok(whole));
    keep(&effects);
    assert_eq!(posts(&effects).len(), 1);
    // One failed, to be tried again later: it gives its place up meanwhile.
    let effects = edge.posted(1_002, &first[1].id, Ok(503));
    keep(&effects);
    assert_eq!(handed_out(&effects), ["j09"]);
    // A stale or unknown outcome frees nothing.
    assert!(handed_out(&edge.posted(1_003, &first[0].id, Ok(200))).is_empty());
    assert!(handed_out(&edge.posted(1_003, "callback:nope:1", Ok(200))).is_empty());
    // Attempts never heard of stop holding their places at their timeout; then at most
    // the cap are handed out again.
    let effects = edge.tick(10 + crate::notify::UNHEARD_AFTER_MS);
    keep(&effects);
    let again = handed_out(&effects);
    assert!(!again.is_empty() && again.len() <= MAX_CALLBACKS_IN_FLIGHT, "{again:?}");
    // After a restore every overdue one is due at once: still at most the cap.
    let alerts = alerts.take().expect("stored");
    assert!(alerts.callbacks.len() > MAX_CALLBACKS_IN_FLIGHT);
    let (mut restored, effects) = Edge::restore(cfg(), stored.take().into_values().collect(), vec![], Some(alerts), 100_000);
    let mut out = handed_out(&effects);
    out.extend(handed_out(&restored.tick(100_000)));
    assert_eq!(out.len(), MAX_CALLBACKS_IN_FLIGHT, "{out:?}");
}

/// One receiver that is slow to answer (or never does) holds at most its share of the
/// places, each up to its attempt's timeout: another receiver's result goes at once. Before,
/// eight callbacks to one slow host held every place, and every other caller's result
/// waited out their timeouts.
#[test]
fn a_slow_receiver_holds_only_its_share_of_the_callbacks_in_flight() {
    use crate::machine::MAX_CALLBACKS_PER_RECEIVER;
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 20);
    say(&mut edge, 0, &sid, credit(20, 0));
    let submit = |edge: &mut Edge, id: &str, url: &str| drop(sent_with_callback(edge, 0, id, url));
    for i in 0..10 {
        submit(&mut edge, &format!("slow{i}"), "https://HOOKS.example.com:8443/r");
    }
    submit(&mut edge, "other", "http://127.0.0.1:9/r");
    let mut slow = Vec::new();
    for i in 0..10 {
        slow.extend(posts(&report(&mut edge, 10, &sid, &format!("slow{i}"), ok_result())));
    }
    // Another port of the same host is the same receiver.
    submit(&mut edge, "slow-too", "https://hooks.example.com:9443/r");
    slow.extend(posts(&report(&mut edge, 10, &sid, "slow-too", ok_result())));
    assert_eq!(slow.len(), MAX_CALLBACKS_PER_RECEIVER, "{:?}", slow.iter().map(|p| &p.id).collect::<Vec<_>>());
    // The waiting ones are not due while their receiver's places are taken: no spinning.
    assert!(edge.next_deadline().is_some_and(|at| at > 10), "{:?}", edge.next_deadline());
    assert!(handed_out(&edge.tick(1_000)).is_empty());
    let other = posts(&report(&mut edge, 1_000, &sid, "other", ok_result()));
    assert_eq!(other.len(), 1, "another receiver's result goes while the slow one's wait");
    // One of the slow receiver's answered: its next goes.
    assert_eq!(handed_out(&edge.posted(1_001, &slow[0].id, Ok(200))).len(), 1);
}

/// An attempt still holds its place when the host's own bound on it
/// (`DELIVERY_TIMEOUT_MS`) runs out: the host says how it went then (a timeout, its
/// connection closed), and only that frees the place. The machine counted its place free
/// at that same moment, so a host whose timer fired a moment after the machine's handed
/// the receiver a fifth connection while the fourth was still open; the machine now waits
/// a while longer before it takes an attempt as never heard of.
#[test]
fn an_attempt_holds_its_place_until_the_host_gives_it_up() {
    use crate::machine::MAX_CALLBACKS_PER_RECEIVER;
    use crate::notify::DELIVERY_TIMEOUT_MS;
    let (mut edge, sid) = posting_to(&["mute"]);
    let mut first = Vec::new();
    for i in 0..2 * MAX_CALLBACKS_PER_RECEIVER {
        first.extend(ended_with_callback(&mut edge, &sid, 10, &format!("m{i}"), "mute"));
    }
    assert_eq!(first.len(), MAX_CALLBACKS_PER_RECEIVER);
    // The host's bound on them runs out: nothing more goes to the receiver before the host
    // says so.
    assert!(handed_out(&edge.tick(10 + DELIVERY_TIMEOUT_MS)).is_empty(), "handed out while the host still held the attempts");
    // Its word on each frees a place for the next.
    let effects = edge.posted(15 + DELIVERY_TIMEOUT_MS, &first[0].id, Err("timed out".into()));
    assert_eq!(handed_out(&effects).len(), 1);
    // One it never tells of is taken as unheard a while later.
    let late = 10 + crate::notify::UNHEARD_AFTER_MS;
    assert!(crate::notify::UNHEARD_AFTER_MS > DELIVERY_TIMEOUT_MS);
    assert!(!handed_out(&edge.tick(late)).is_empty());
}

/// An edge allowing callbacks to `<host>.example.com` for each of `hosts`, with an agent
/// taking 30 jobs.
fn posting_to(hosts: &[&str]) -> (Edge, String) {
    let hosts = hosts.iter().map(|h| format!("{h}.example.com")).collect();
    let mut edge = Edge::new(Config { callback_hosts: hosts, ..config() }, 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 30);
    say(&mut edge, 0, &sid, credit(30, 0));
    (edge, sid)
}

/// Job `id`, with its callback to `host`, sent and ended at `at`: what was posted then.
fn ended_with_callback(edge: &mut Edge, sid: &str, at: u64, id: &str, host: &str) -> Vec<Post> {
    sent_with_callback(edge, at, id, &format!("https://{host}.example.com/r"));
    posts(&report(edge, at, sid, id, ok_result()))
}

/// Job `id` sent at `at`, detached, asking for its result at `url`: what the submit did.
fn sent_with_callback(edge: &mut Edge, at: u64, id: &str, url: &str) -> Vec<Effect> {
    let body = json!({"prompt": "x", "callback_url": url}).to_string();
    let submission = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    edge.submit(at, id.into(), submission, Mode::Detached).unwrap().effects
}

/// Two receivers that are slow to answer hold at most all places but one: the last goes
/// only to a receiver with none on its way, so a third receiver's result goes at once
/// (hostile review rev12: 4 + 4 held every place). And a place that frees goes to the
/// receiver with the fewest on their way before the oldest due.
#[test]
fn two_slow_receivers_leave_a_place_and_the_next_goes_to_a_receiver_with_none_on_its_way() {
    use crate::machine::MAX_CALLBACKS_IN_FLIGHT;
    let (mut edge, sid) = posting_to(&["a", "b", "c", "d"]);
    let end = |edge: &mut Edge, at: u64, id: &str, host: &str| ended_with_callback(edge, &sid, at, id, host);
    let mut slow = Vec::new();
    for i in 0..10 {
        slow.extend(end(&mut edge, 10, &format!("a{i}"), "a"));
        slow.extend(end(&mut edge, 10, &format!("b{i}"), "b"));
    }
    assert_eq!(slow.len(), MAX_CALLBACKS_IN_FLIGHT - 1, "{:?}", slow.iter().map(|p| &p.id).collect::<Vec<_>>());
    assert_eq!(end(&mut edge, 20, "c0", "c").len(), 1, "a third receiver's callback goes at once");
    // Every place taken now: d's waits, and gets the first that frees, before a's and b's
    // older ones.
    assert!(end(&mut edge, 30, "d0", "d").is_empty());
    let a = slow.iter().find(|p| p.id.starts_with("callback:a")).unwrap();
    assert_eq!(handed_out(&edge.posted(40, &a.id, Ok(200))), ["d0"]);
}

/// A place that frees goes to the waiting callback whose receiver has the fewest on their
/// way, before an older one of a receiver that holds more: the places are spread, not taken
/// by whoever ended first.
#[test]
fn a_freed_place_goes_to_the_receiver_with_the_fewest_on_their_way() {
    let (mut edge, sid) = posting_to(&["a", "b", "c"]);
    let end = |edge: &mut Edge, at: u64, id: &str, host: &str| ended_with_callback(edge, &sid, at, id, host);
    let mut c = Vec::new();
    for (id, host) in [("a0", "a"), ("a1", "a"), ("a2", "a"), ("b0", "b"), ("c0", "c"), ("c1", "c"), ("c2", "c")] {
        let posted = end(&mut edge, 10, id, host);
        assert_eq!(posted.len(), 1, "{id}");
        c.extend(posted.into_iter().filter(|p| p.id.starts_with("callback:c")));
    }
    // Seven on their way: the last place is kept for a receiver with none.
    assert!(end(&mut edge, 20, "a3", "a").is_empty());
    assert!(end(&mut edge, 30, "b1", "b").is_empty());
    // One of c's answered: b (one on its way) before a's older one (three).
    assert_eq!(handed_out(&edge.posted(40, &c[0].id, Ok(200))), ["b1"]);
}

/// A callback's body is bounded: the view whole when it fits `MAX_CALLBACK_BODY_BYTES`,
/// else without its diff (and the list of changed files, then the output and error cut),
/// saying so in `partial` with where to read the whole. The signature is over what is
/// sent.
#[test]
fn a_callbacks_body_is_bounded_and_says_what_it_left_out() {
    use crate::notify::MAX_CALLBACK_BODY_BYTES;
    let (mut edge, sid) = ready_edge();
    sent_with_callback(&mut edge, 0, "j", "https://hooks.example.com/r");
    let output = "o".repeat(1 << 20);
    let result = JobResult { diff: Some("d".repeat(3 << 19)), output: output.clone(), ..ok_result() };
    let effects = report(&mut edge, 10, &sid, "j", result);
    let post = posts(&effects).pop().expect("posted");
    assert!(post.body.len() <= MAX_CALLBACK_BODY_BYTES, "{} bytes", post.body.len());
    let header = |name: &str| post.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
    let ts: u64 = header("x-runner-timestamp").parse().unwrap();
    assert_eq!(header("x-runner-signature"), crate::notify::signature(SECRET, ts, &post.body));
    let view: Value = serde_json::from_str(&post.body).unwrap();
    assert_eq!(view["result"]["output"].as_str(), Some(output.as_str()), "the output whole");
    assert!(view["result"]["diff"].is_null(), "the diff left out");
    assert_eq!(view["partial"]["left_out"], json!(["diff"]), "{}", view["partial"]);
    assert_eq!(view["partial"]["whole"], "GET /jobs/j");
    // Output past what the body holds (an agent is bounded by its frames, not by 1 MiB) is cut.
    let (mut edge, sid) = ready_edge();
    sent_with_callback(&mut edge, 0, "k", "https://hooks.example.com/r");
    let result = JobResult { output: "é\n".repeat(800_000), ..ok_result() };
    let post = posts(&report(&mut edge, 10, &sid, "k", result)).pop().expect("posted");
    assert!(post.body.len() <= MAX_CALLBACK_BODY_BYTES, "{} bytes", post.body.len());
    let view: Value = serde_json::from_str(&post.body).unwrap();
    let kept = view["result"]["output"].as_str().unwrap().len();
    assert!(kept > MAX_CALLBACK_BODY_BYTES / 2 && kept < 2_400_000, "{kept}");
    assert_eq!(view["partial"]["left_out"], json!(["output"]), "{}", view["partial"]);
    assert_eq!(view["partial"]["output_bytes_left_out"].as_u64(), Some(2_400_000 - kept as u64));
    // A result that fits is the view itself, as GET /jobs/{id} shows it.
    let (mut edge, sid) = ready_edge();
    sent_with_callback(&mut edge, 0, "m", "https://hooks.example.com/r");
    let post = posts(&report(&mut edge, 10, &sid, "m", JobResult { diff: Some("small".into()), ..ok_result() })).pop().unwrap();
    let view: Value = serde_json::from_str(&post.body).unwrap();
    assert!(view.get("partial").is_none() && view["result"]["diff"] == "small", "{view}");
}
