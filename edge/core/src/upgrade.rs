//! The agents' door: an upgrade to `/agent/connect` gets a socket only if it carries an
//! agent's proof ([`check_upgrade`]), and every refusal is counted in
//! `claude_runner_agents_refused_total` and logged, with a bound ([`Refusals`]). The
//! machine does both for either host ([`crate::Edge::upgrade_refused`]); the Worker's
//! entry, which refuses before the pool's object is asked, does the same with a
//! [`Refusals`] of its own and hands the count on with the next request it forwards.

use crate::config::{pool_suffix, Config};
use crate::session::whole_seconds;
use ed25519_dalek::VerifyingKey;
use shared::contract::ApiError;
use shared::envelope::{UpgradeProof, CLOCK_SKEW_MS};
use shared::ids::DEFAULT_POOL;
use shared::Millis;
use std::net::IpAddr;
use tracing::warn;

/// Refusals logged one by one per [`LOG_WINDOW_MS`], at most; the rest are summed in one
/// line. Anyone may dial the door, so a line per refusal would let anyone fill the log.
pub const LOGGED_PER_WINDOW: u32 = 10;
/// See [`LOGGED_PER_WINDOW`].
pub const LOG_WINDOW_MS: Millis = 60_000;

/// Whether a request to `/agent/connect` is a WebSocket handshake (RFC 6455 §4.2.1): a
/// `GET` with `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`
/// (`header` reads one by its lower-case name). Anything else is answered
/// [`crate::http::upgrade_required`] by either host before the proof is looked at: the
/// Worker asked only for the `Upgrade` header and answered a handshake without its key 401
/// for its proof, where the native edge answered 426.
pub fn is_handshake(method: &str, header: impl Fn(&str) -> Option<String>) -> bool {
    use crate::http::{lists_token, ows_trimmed};
    let upgrade = header("upgrade").is_some_and(|v| lists_token(&v, "websocket"));
    let version = header("sec-websocket-version").is_some_and(|v| ows_trimmed(&v) == "13");
    let key = header("sec-websocket-key").is_some_and(|k| !ows_trimmed(&k).is_empty());
    method == "GET" && upgrade && version && key
}

/// Whether a peer may have an agent's socket on `/agent/connect` at all, decided from its
/// upgrade request's `X-Runner-Agent-Proof` (`proof`: its values joined with `, ` when it
/// was sent more than once, as Fetch's `get` reads them) before either host accepts the
/// upgrade: only the holder of a key in the pool's `AGENT_PUBLIC_KEYS` gets one, so nobody
/// without a key can make the edge hold a frame (the Worker's runtime copies a whole
/// message, up to 32 MiB, before the hello's limit is looked at). `wall` is the edge's
/// wall clock; the proof must be within [`CLOCK_SKEW_MS`] of it. The proof can be played
/// back within that window, so it gates the socket only: the hello still answers the
/// connection's own challenge. `Ok` is the agent's id; `Err` is the 401 to answer.
///
/// Pure: the hosts count and log a refusal through [`Refusals`].
pub fn check_upgrade(proof: Option<&str>, config: &Config, wall: Millis) -> Result<String, ApiError> {
    use shared::contract::ErrorCode::{AgentProofInvalid, AgentProofRequired};
    let pool = config.pool.as_str();
    let Some(text) = proof.map(str::trim).filter(|t| !t.is_empty()) else {
        return Err(ApiError::new(
            AgentProofRequired,
            "/agent/connect opens a socket only for an agent that proves its key on the upgrade (the X-Runner-Agent-Proof header); \
             an agent older than the edge does not send it: upgrade claude-runner on the agent to the edge's release",
        ));
    };
    let Some(proof) = UpgradeProof::parse(text) else {
        return Err(ApiError::new(
            AgentProofInvalid,
            "the X-Runner-Agent-Proof header is not `<agent_id>.<unix ms>.<base64url signature>` (sent once): \
             run a claude-runner agent of the edge's release",
        ));
    };
    // Checked before the id goes into any reason or log line.
    if !shared::ids::valid_agent_id(proof.agent_id) {
        return Err(ApiError::new(
            AgentProofInvalid,
            "the agent proof's agent id is not a valid agent id (1-64 letters, digits, `-`, `_` or `.`), or the header was sent more \
             than once: set AGENT_ID to the id in AGENT_PUBLIC_KEYS, and send the X-Runner-Agent-Proof header once",
        ));
    }
    let agent_id = proof.agent_id;
    let keys_setting = setting("AGENT_PUBLIC_KEYS", pool);
    let Some(key) = config.agents.get(agent_id) else {
        // Listed by another pool of this edge, and signed for it: the agent dials the
        // wrong pool's URL.
        // Among at most SEARCH_CHECKS of the pools that list it.
        let signed_for = config
            .other_pools
            .iter()
            .filter_map(|(name, ring)| Some((name, ring.get(agent_id)?)))
            .take(SEARCH_CHECKS)
            .find(|(name, k)| signed(&proof, name, k));
        return Err(ApiError::new(
            AgentProofInvalid,
            match signed_for {
                Some((other, _)) => format!(
                    "agent `{agent_id}`'s proof is for pool `{other}`, which lists it, but its EDGE_URL dials pool `{pool}`, which does not: \
                     point its EDGE_URL at {} — or, to serve pool `{pool}`, add `{agent_id}=<its public key>` to {keys_setting} and set its EDGE_POOL={pool}",
                    url_of(other)
                ),
                None => format!("unknown agent `{agent_id}`: add `{agent_id}=<its public key>` to {keys_setting}, the agents of pool `{pool}`"),
            },
        ));
    };
    if !signed(&proof, pool, key) {
        // Its signature is over the pool it names (its EDGE_POOL), which the header does
        // not say: a pool of this edge that it verifies for is the one (a key or a time
        // changed does not verify for any). Tried only for a listed agent, once per pool
        // and distinct key (the key listed here; that pool's own if it differs): anyone may
        // dial with a listed id and a made-up signature, and each check is theirs to cost.
        // With whether it verified only under that pool's own key, not the one listed here.
        // At most SEARCH_CHECKS of them, whatever POOLS lists: pools that list the agent
        // first (the likely one), so a made-up signature costs a bounded few checks.
        let mut budget = SEARCH_CHECKS;
        let mut check = |name: &str, k: &VerifyingKey| {
            let spent = budget == 0;
            budget = budget.saturating_sub(1);
            !spent && signed(&proof, name, k)
        };
        let (listing, others): (Vec<_>, Vec<_>) = config.other_pools.iter().partition(|(_, ring)| ring.get(agent_id).is_some());
        let signed_for = listing.into_iter().chain(others).find_map(|(name, ring)| {
            if check(name, key) {
                return Some((name, false));
            }
            ring.get(agent_id).is_some_and(|theirs| theirs != key && check(name, theirs)).then_some((name, true))
        });
        return Err(ApiError::new(
            AgentProofInvalid,
            match signed_for {
                Some((other, key_differs)) => format!(
                    "agent `{agent_id}`'s proof is for pool `{other}` (its EDGE_POOL), but its EDGE_URL dials pool `{pool}`: \
                     to serve pool `{pool}` set its EDGE_POOL={pool}{}; to serve `{other}` point its EDGE_URL at {}",
                    if key_differs {
                        format!(" and list its public key in {keys_setting}, which lists another key as `{agent_id}`'s (the one `{other}` lists signed it)")
                    } else {
                        String::new()
                    },
                    url_of(other)
                ),
                None => format!(
                    "agent `{agent_id}`'s proof does not verify for pool `{pool}`, the pool its EDGE_URL dials{}: check that its \
                     AGENT_SIGNING_KEY matches its entry in {keys_setting}, and that its EDGE_POOL is `{pool}` (an agent of another \
                     pool dials that pool's URL, {})",
                    if config.other_pools.is_empty() { "" } else { ", nor for any other pool this edge serves" },
                    url_of("<name>")
                ),
            },
        ));
    }
    let off = proof.issued_at.abs_diff(wall);
    if off > CLOCK_SKEW_MS {
        let side = if proof.issued_at < wall { "behind" } else { "ahead of" };
        return Err(ApiError::new(
            AgentProofInvalid,
            format!(
                "agent `{agent_id}`'s clock is {} s {side} the edge's ({} s allowed): check the clock of both (e.g. enable NTP)",
                whole_seconds(off),
                CLOCK_SKEW_MS / 1000
            ),
        ));
    }
    Ok(agent_id.to_string())
}

/// How many signatures the search over the edge's other pools may check for one refused
/// proof (beyond the one for the pool dialled): whoever dials with a listed agent id and a
/// made-up signature spends them, so they must not grow with the number of pools.
const SEARCH_CHECKS: usize = 8;

/// Whether `key` signed `proof` for `pool`: every signature the door checks, for whoever
/// dials, goes through here (counted in tests: the checks per refusal are the door's cost).
fn signed(proof: &UpgradeProof, pool: &str, key: &VerifyingKey) -> bool {
    #[cfg(test)]
    tests::SIGNATURES_CHECKED.with(|n| n.set(n.get() + 1));
    proof.verify(pool, key)
}

/// A pool's own name of the setting `base` (`AGENT_PUBLIC_KEYS_GPU` for pool `gpu`).
fn setting(base: &str, pool: &str) -> String {
    match pool {
        DEFAULT_POOL => base.to_string(),
        _ => format!("{base}_{}", pool_suffix(pool)),
    }
}

/// Where an agent of `pool` dials, said for its EDGE_URL.
fn url_of(pool: &str) -> String {
    match pool {
        DEFAULT_POOL => "the edge's own URL (no /pool/<name>)".to_string(),
        _ => format!("the edge's URL with /pool/{pool}"),
    }
}

/// Refused upgrades of one pool: the count not yet added to a metric, and the log's bound.
/// A few integers whatever comes in — no entry per peer — so a flood grows no memory; at
/// most [`LOGGED_PER_WINDOW`] lines per [`LOG_WINDOW_MS`] name their peer and reason, and
/// those past them are summed in one line with the next refusal after the window (the
/// count has every one of them at once). A refused agent says the reason in its own log
/// too, so one hidden here behind a flood is not lost to its operator.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refusals {
    /// Refusals not yet taken into a metric ([`Refusals::take`]).
    uncounted: u64,
    /// When (wall time) the log's current window began.
    window: Option<Millis>,
    /// Lines logged in it.
    logged: u32,
    /// Refusals in it not logged one by one.
    unlogged: u64,
}

impl Refusals {
    /// An upgrade from `peer` (its address, as the host knows it) refused with `refused`
    /// at `wall`: counted, and logged if the window has room.
    pub fn note(&mut self, wall: Millis, pool: &str, peer: &str, refused: &ApiError) {
        self.uncounted = self.uncounted.saturating_add(1);
        // A clock set back starts a window too: never one that would not end.
        let ended = self.window.is_none_or(|start| wall < start || wall - start >= LOG_WINDOW_MS);
        if ended {
            if self.unlogged > 0 {
                warn!(
                    pool,
                    unlogged = self.unlogged,
                    "more agent upgrades were refused than the {LOGGED_PER_WINDOW} a minute logged one by one; claude_runner_agents_refused_total counts them all"
                );
            }
            *self = Refusals { uncounted: self.uncounted, window: Some(wall), logged: 0, unlogged: 0 };
        }
        if self.logged >= LOGGED_PER_WINDOW {
            self.unlogged = self.unlogged.saturating_add(1);
            return;
        }
        self.logged += 1;
        // The address as parsed, never the peer's own text (the Worker reads it from a header).
        let peer = peer.trim().parse::<IpAddr>().map_or_else(|_| "unknown".to_string(), |ip| ip.to_string());
        let code = serde_json::to_value(refused.body.error_code).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        // The reason names the agent only once its id is checked to be one ([`check_upgrade`]).
        warn!(pool, peer = %peer, code = %code, reason = %refused.body.error, "agent upgrade refused");
    }

    /// The refusals noted since the last call, for the metric.
    pub fn take(&mut self) -> u64 {
        std::mem::take(&mut self.uncounted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use shared::contract::ErrorCode;
    use shared::keys::Keyring;

    const NOW: u64 = 1_800_000_000_000;

    thread_local! {
        /// Signatures [`signed`] checked on this thread (each test has its own).
        pub(super) static SIGNATURES_CHECKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The signatures `check_upgrade` checks for `proof` in `config`.
    fn signatures_checked(config: &Config, proof: &str) -> usize {
        SIGNATURES_CHECKED.with(|n| n.set(0));
        let _ = check_in(config, Some(proof));
        SIGNATURES_CHECKED.with(std::cell::Cell::get)
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn keyring() -> Keyring {
        Keyring::from_keys([("spark".to_string(), key(1).verifying_key()), ("rig.2".to_string(), key(2).verifying_key())])
    }

    /// The default pool, listing `spark` and `rig.2`; `others` are the edge's other pools.
    fn config(others: Vec<(String, Keyring)>) -> Config {
        Config { agents: keyring(), other_pools: others, ..crate::tests::config() }
    }

    fn check(proof: Option<&str>) -> Result<String, (ErrorCode, String)> {
        check_in(&config(Vec::new()), proof)
    }

    fn check_in(config: &Config, proof: Option<&str>) -> Result<String, (ErrorCode, String)> {
        check_upgrade(proof, config, NOW).map_err(|e| {
            assert_eq!(e.status, 401, "{e:?}");
            (e.body.error_code, e.body.error)
        })
    }

    fn refused(proof: &str, code: ErrorCode, says: &str) {
        refused_in(&config(Vec::new()), proof, code, &[says]);
    }

    fn refused_in(config: &Config, proof: &str, code: ErrorCode, says: &[&str]) {
        let (got, error) = check_in(config, Some(proof)).expect_err(proof);
        assert_eq!(got, code, "{proof}: {error}");
        for part in says {
            assert!(error.contains(part), "{part:?} not in {error}");
        }
    }

    #[test]
    fn a_proof_signed_by_a_listed_agent_for_this_pool_within_the_clock_window_lets_it_in() {
        assert_eq!(check(Some(&UpgradeProof::sign(&key(1), "default", "spark", NOW))), Ok("spark".into()));
        // An id with dots; the edges of the window.
        assert_eq!(check(Some(&UpgradeProof::sign(&key(2), "default", "rig.2", NOW - CLOCK_SKEW_MS))), Ok("rig.2".into()));
        assert_eq!(check(Some(&UpgradeProof::sign(&key(1), "default", "spark", NOW + CLOCK_SKEW_MS))), Ok("spark".into()));
    }

    #[test]
    fn no_proof_is_told_to_upgrade_the_agent() {
        for missing in [None, Some(""), Some("  ")] {
            let (code, error) = check(missing).expect_err("no proof");
            assert_eq!(code, ErrorCode::AgentProofRequired);
            assert!(error.contains("upgrade claude-runner on the agent"), "{error}");
        }
    }

    #[test]
    fn a_forged_proof_is_refused() {
        // Another key signed it for `spark`.
        refused(&UpgradeProof::sign(&key(9), "default", "spark", NOW), ErrorCode::AgentProofInvalid, "AGENT_SIGNING_KEY matches");
        // `rig.2`'s own key does not make it `spark`.
        refused(&UpgradeProof::sign(&key(2), "default", "spark", NOW), ErrorCode::AgentProofInvalid, "does not verify");
    }

    #[test]
    fn a_tampered_proof_is_refused() {
        let good = UpgradeProof::sign(&key(1), "default", "spark", NOW);
        let (_, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        // Its time moved (to play it back later), its id changed, its signature flipped.
        refused(&format!("spark.{}.{sig}", NOW + 1), ErrorCode::AgentProofInvalid, "does not verify");
        refused(&format!("rig.2.{NOW}.{sig}"), ErrorCode::AgentProofInvalid, "does not verify");
        let mut flipped = sig.to_string().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        refused(&format!("spark.{NOW}.{}", String::from_utf8(flipped).unwrap()), ErrorCode::AgentProofInvalid, "does not verify");
    }

    /// A proof sent twice reaches the check as the two joined (both hosts read a header
    /// so): never the first alone, which a proof followed by anything would pass.
    #[test]
    fn a_proof_sent_twice_is_refused_as_malformed() {
        let good = UpgradeProof::sign(&key(1), "default", "spark", NOW);
        for joined in [format!("{good}, junk"), format!("{good}, {good}"), format!("junk, {good}")] {
            let (code, error) = check(Some(&joined)).expect_err(&joined);
            assert_eq!(code, ErrorCode::AgentProofInvalid, "{joined}: {error}");
            assert!(error.contains("once"), "{joined}: {error}");
        }
    }

    #[test]
    fn another_pools_proof_names_both_pools_and_what_to_set() {
        // The native edge serves one pool: it cannot name the other, and says where to look.
        refused_in(
            &config(Vec::new()),
            &UpgradeProof::sign(&key(1), "gpu", "spark", NOW),
            ErrorCode::AgentProofInvalid,
            &["pool `default`", "EDGE_POOL is `default`", "/pool/<name>", "AGENT_SIGNING_KEY"],
        );
        // A Worker serving `gpu` too names it: the agent set EDGE_POOL=gpu, dialing the root.
        let both = config(vec![("gpu".into(), keyring()), ("team-b".into(), Keyring::from_keys([]))]);
        refused_in(
            &both,
            &UpgradeProof::sign(&key(1), "gpu", "spark", NOW),
            ErrorCode::AgentProofInvalid,
            &["proof is for pool `gpu`", "dials pool `default`", "EDGE_POOL=default", "/pool/gpu"],
        );
        // Listed only by `gpu`, whose proof it is: it dials the wrong URL.
        let elsewhere = config(vec![("gpu".into(), Keyring::from_keys([("solo".to_string(), key(3).verifying_key())]))]);
        refused_in(
            &elsewhere,
            &UpgradeProof::sign(&key(3), "gpu", "solo", NOW),
            ErrorCode::AgentProofInvalid,
            &["proof is for pool `gpu`", "which lists it", "dials pool `default`", "/pool/gpu", "AGENT_PUBLIC_KEYS", "EDGE_POOL=default"],
        );
        // A pool this edge does not serve, or another key: no pool is named.
        for (proof, not) in [(UpgradeProof::sign(&key(1), "nowhere", "spark", NOW), "nowhere"), (UpgradeProof::sign(&key(9), "gpu", "spark", NOW), "is for pool")] {
            let (_, error) = check_in(&both, Some(&proof)).unwrap_err();
            assert!(!error.contains(not) && error.contains("nor for any other pool this edge serves"), "{error}");
        }
    }

    /// Anyone may dial with a listed agent's id and a made-up signature: the search for the
    /// pool it was signed for checks each other pool's signature once per distinct key (the
    /// key listed here, and that pool's own if it differs), never one key twice — it did,
    /// two checks per pool where one would do, for every such dial.
    #[test]
    fn the_other_pools_search_checks_each_key_once() {
        let other = Keyring::from_keys([("spark".to_string(), key(7).verifying_key())]);
        let pools = config(vec![
            ("same".into(), keyring()),                // lists `spark` with the key listed here
            ("none".into(), Keyring::from_keys([])),   // does not list it
            ("other".into(), other),                   // lists it with another key
        ]);
        let forged = UpgradeProof::sign(&key(9), "default", "spark", NOW);
        // This pool's own, then 1 + 1 + 2.
        assert_eq!(signatures_checked(&pools, &forged), 1 + 1 + 1 + 2);
        // Listed only elsewhere: one check per pool that lists it.
        let unlisted = UpgradeProof::sign(&key(9), "gpu", "solo", NOW);
        let elsewhere = config(vec![
            ("gpu".into(), Keyring::from_keys([("solo".to_string(), key(3).verifying_key())])),
            ("none".into(), Keyring::from_keys([])),
        ]);
        assert_eq!(signatures_checked(&elsewhere, &unlisted), 1);
        // A valid proof checks its one signature.
        assert_eq!(signatures_checked(&pools, &UpgradeProof::sign(&key(1), "default", "spark", NOW)), 1);
    }

    /// Forty pools, each listing `spark` under a key of its own: a made-up signature cost
    /// 1 + 2 × 40 checks, as many as POOLS lists. Bounded; and the pool that lists the
    /// agent still comes first among many that do not.
    #[test]
    fn the_other_pools_search_is_bounded_whatever_pools_lists() {
        let many: Vec<(String, Keyring)> =
            (0..40u8).map(|i| (format!("p{i}"), Keyring::from_keys([("spark".to_string(), key(100 + i).verifying_key())]))).collect();
        let forged = UpgradeProof::sign(&key(9), "default", "spark", NOW);
        assert_eq!(signatures_checked(&config(many), &forged), 1 + SEARCH_CHECKS);
        let mut crowd: Vec<(String, Keyring)> = (0..40u8).map(|i| (format!("q{i}"), Keyring::from_keys([]))).collect();
        crowd.push(("gpu".into(), keyring()));
        refused_in(&config(crowd), &UpgradeProof::sign(&key(1), "gpu", "spark", NOW), ErrorCode::AgentProofInvalid, &["proof is for pool `gpu`"]);
        // Listed only elsewhere, by all forty.
        let elsewhere: Vec<(String, Keyring)> =
            (0..40u8).map(|i| (format!("p{i}"), Keyring::from_keys([("solo".to_string(), key(100 + i).verifying_key())]))).collect();
        assert_eq!(signatures_checked(&config(elsewhere), &UpgradeProof::sign(&key(9), "p0", "solo", NOW)), SEARCH_CHECKS);
    }

    /// Signed for `gpu` with the key `gpu` lists, which is not the key listed here: set
    /// EDGE_POOL alone and it is still refused, so the advice names the key too.
    #[test]
    fn another_pools_proof_under_another_key_says_the_key_listed_here_is_not_its() {
        let rotated = config(vec![("gpu".into(), Keyring::from_keys([("spark".to_string(), key(7).verifying_key())]))]);
        refused_in(
            &rotated,
            &UpgradeProof::sign(&key(7), "gpu", "spark", NOW),
            ErrorCode::AgentProofInvalid,
            &["proof is for pool `gpu`", "EDGE_POOL=default", "AGENT_PUBLIC_KEYS"],
        );
        // Under the key listed here too, EDGE_POOL is all there is to set.
        let (_, error) = check_in(&config(vec![("gpu".into(), keyring())]), Some(&UpgradeProof::sign(&key(1), "gpu", "spark", NOW))).unwrap_err();
        assert!(error.contains("EDGE_POOL=default") && !error.contains("AGENT_PUBLIC_KEYS"), "{error}");
    }

    #[test]
    fn a_listed_pools_own_settings_are_named() {
        let gpu = Config { pool: "team-b".into(), ..config(Vec::new()) };
        refused_in(&gpu, &UpgradeProof::sign(&key(1), "default", "nobody", NOW), ErrorCode::AgentProofInvalid, &["AGENT_PUBLIC_KEYS_TEAM_B"]);
    }

    #[test]
    fn an_unknown_agent_is_told_to_be_listed() {
        refused(&UpgradeProof::sign(&key(1), "default", "nobody", NOW), ErrorCode::AgentProofInvalid, "unknown agent `nobody`");
    }

    #[test]
    fn a_proof_outside_the_clock_window_is_told_to_check_the_clock() {
        refused(&UpgradeProof::sign(&key(1), "default", "spark", NOW - CLOCK_SKEW_MS - 1), ErrorCode::AgentProofInvalid, "s behind the edge's");
        refused(&UpgradeProof::sign(&key(1), "default", "spark", NOW + CLOCK_SKEW_MS + 1), ErrorCode::AgentProofInvalid, "s ahead of the edge's");
        refused(&UpgradeProof::sign(&key(1), "default", "spark", 0), ErrorCode::AgentProofInvalid, "check the clock");
    }

    /// Off by a fraction of a second past the window is said rounded up: 60.5 s was said
    /// as "60 s behind (60 s allowed)", which read as within it.
    #[test]
    fn a_clock_off_is_said_in_seconds_rounded_up() {
        for (issued_at, says) in [
            (NOW - CLOCK_SKEW_MS - 500, "61 s behind"),
            (NOW - CLOCK_SKEW_MS - 1, "61 s behind"),
            (NOW + CLOCK_SKEW_MS + 999, "61 s ahead of"),
            (NOW - 90_000, "90 s behind"),
        ] {
            refused(&UpgradeProof::sign(&key(1), "default", "spark", issued_at), ErrorCode::AgentProofInvalid, says);
        }
    }

    #[test]
    fn a_malformed_proof_is_refused_without_a_panic() {
        let sig = UpgradeProof::sign(&key(1), "default", "spark", NOW).rsplit_once('.').unwrap().1.to_string();
        let long = format!("{}.{NOW}.{sig}", "a".repeat(300));
        for bad in [
            "spark",
            "spark.1",
            &format!("spark.{NOW}"),
            &format!("spark..{sig}"),
            &format!("spark.-1.{sig}"),
            &format!("spark.+1.{sig}"),
            &format!("spark.99999999999999999999.{sig}"),
            &format!("spark.{NOW}.not-base64!"),
            &format!("spark.{NOW}.{}", &sig[..40]),
            &format!("spark.{NOW}.{sig}AA"),
            long.as_str(),
            "..",
        ] {
            refused(bad, ErrorCode::AgentProofInvalid, "X-Runner-Agent-Proof header is not");
        }
        // The shape holds, the id does not: never echoed.
        refused(&format!("evil\nline.{NOW}.{sig}"), ErrorCode::AgentProofInvalid, "not a valid agent id");
        refused(&format!(".{NOW}.{sig}"), ErrorCode::AgentProofInvalid, "not a valid agent id");
    }

    /// Every refusal is counted; at most [`LOGGED_PER_WINDOW`] a window are logged one by
    /// one, the rest summed in one line when the next window begins.
    #[test]
    fn refusals_are_all_counted_and_logged_with_a_bound() {
        let logs = crate::tests::logs::capture();
        let refused = check(None).unwrap_err();
        let refused = ApiError::new(refused.0, refused.1);
        let mut refusals = Refusals::default();
        for i in 0..25 {
            refusals.note(NOW + i, "default", "203.0.113.7", &refused);
        }
        assert_eq!(refusals.take(), 25);
        assert_eq!(refusals.take(), 0, "taken once");
        let lines = logs.lines();
        assert_eq!(lines.iter().filter(|l| l.contains("agent upgrade refused")).count(), LOGGED_PER_WINDOW as usize, "{lines:#?}");
        let first = &lines[0];
        for part in ["peer=203.0.113.7", "AGENT_PROOF_REQUIRED", "upgrade claude-runner on the agent", "pool=default"] {
            assert!(first.contains(part), "{part:?} not in {first}");
        }
        assert!(!lines.iter().any(|l| l.contains("more agent upgrades")), "the window has not ended: {lines:#?}");
        // The next window: the 15 not logged are summed, and this one is logged.
        refusals.note(NOW + LOG_WINDOW_MS, "default", "not an address", &refused);
        let lines = logs.lines();
        assert!(lines.iter().any(|l| l.contains("more agent upgrades") && l.contains("unlogged=15")), "{lines:#?}");
        assert!(lines.last().unwrap().contains("peer=unknown"), "a peer that is no address is not echoed: {lines:#?}");
        assert_eq!(refusals.take(), 1);
        // A clock set back starts a window rather than never ending the one it is in.
        let mut back = Refusals::default();
        for _ in 0..LOGGED_PER_WINDOW {
            back.note(NOW, "default", "203.0.113.7", &refused);
        }
        let before = logs.lines().len();
        back.note(NOW - 1, "default", "203.0.113.7", &refused);
        assert_eq!(logs.lines().len(), before + 1, "{:#?}", logs.lines());
    }
}
