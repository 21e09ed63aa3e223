//! The Worker's fetch handler. It finds the pool — `/pool/{name}/…` names one, anything
//! else is the `default` pool ([`edge_core::path::pool_of`]) — and hands the request, with that prefix stripped, to the
//! pool's Durable Object. One object per pool is what gives a pool one queue, one set of
//! agent sessions and one order of events. A pool the settings do not list does not exist:
//! it is a 404 here, and no object is ever made for it. Requests the core's `preflight`
//! refuses (an unknown route, a missing secret) are answered here too, so they never
//! occupy the object.
//!
//! An upgrade to `/agent/connect` is checked here too ([`edge_core::upgrade::check_upgrade`],
//! as the object checks it again): one without an agent's proof is answered 401 without
//! asking the pool's object, so whoever dials the door costs it nothing. Such refusals
//! are logged here with the core's bound and counted here, per pool; the count goes to the
//! pool's object with the next request forwarded to it ([`REFUSED_HEADER`]), which adds
//! it to `claude_runner_agents_refused_total`.
//!
//! `GET /pools` (the admin secret, `ADMIN_SECRET`) is the one route no single object can
//! answer: it asks each pool's object for its `/health` and lists what they say.

use crate::exchange;
use edge_core::config::ConfigError;
use edge_core::http::Gate;
use shared::contract::{ApiError, Health, HealthStatus, PoolList, PoolSummary};
use edge_core::upgrade::Refusals;
use shared::ids::DEFAULT_POOL;
use edge_core::Config;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use worker::wasm_bindgen::JsValue;
use worker::{console_error, event, web_sys, Context, Env, Request, Response};

/// The Durable Object namespace binding in wrangler.toml.
pub const BINDING: &str = "EDGE";
/// The header that tells a pool's object its name. Set here, on every request forwarded
/// (whatever the caller sent in it): an object cannot learn the name it was made from.
pub const POOL_HEADER: &str = "x-claude-runner-pool";
/// The header that tells a pool's object how many upgrades this Worker instance refused
/// for it since the last request it forwarded there (each logged here already). Set here
/// alone, like [`POOL_HEADER`]: a caller's own is dropped.
pub const REFUSED_HEADER: &str = "x-claude-runner-refused-upgrades";

thread_local! {
    /// Upgrades this instance refused, by pool: only pools the settings list reach it, so
    /// it holds a few integers per pool whatever comes in. An instance let go before it
    /// forwards another request to the pool takes its count with it (the object's
    /// counters, kept in its memory, are lost the same way when it is rebuilt).
    static REFUSED: RefCell<BTreeMap<String, Refusals>> = RefCell::default();
    /// Each pool's settings as this instance last read them, read again only when a value
    /// they were read from changed: reading them parses the agents' keys of every pool
    /// (the upgrade hint searches the others), which every request paid for, refused or
    /// not. Only pools whose settings read are kept: a few per pool the settings list.
    static SETTINGS: RefCell<Settings> = RefCell::default();
}

/// Pools' settings as last read, by pool, each with the values it was read from.
#[derive(Default)]
pub struct Settings(BTreeMap<String, (Vec<(String, Option<String>)>, Rc<Config>)>);

impl Settings {
    /// `pool`'s settings ([`Config::for_pool`]): those read before if every value they were
    /// read from is still the same, else read again.
    pub fn config(&mut self, get: impl Fn(&str) -> Option<String>, pool: &str) -> Result<Rc<Config>, ConfigError> {
        if let Some((values, config)) = self.0.get(pool) {
            if values.iter().all(|(name, value)| get(name) == *value) {
                return Ok(Rc::clone(config));
            }
        }
        let values = RefCell::new(BTreeMap::new());
        let read = Config::for_pool(
            |name| {
                let value = get(name);
                values.borrow_mut().insert(name.to_string(), value.clone());
                value
            },
            pool,
        );
        match read {
            Ok(config) => {
                let config = Rc::new(config);
                self.0.insert(pool.to_string(), (values.into_inner().into_iter().collect(), Rc::clone(&config)));
                Ok(config)
            }
            Err(e) => {
                self.0.remove(pool);
                Err(e)
            }
        }
    }
}

#[event(fetch)]
async fn route(mut req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let url = match req.url() {
        Ok(url) => url,
        Err(e) => return exchange::error(&ApiError::invalid(format!("unreadable request URL: {e}"))),
    };
    let (pool, path) = match edge_core::path::pool_of(url.path()) {
        Ok(p) => p,
        Err(e) => return exchange::error(&e),
    };
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let (secret, authorization) = (header("x-runner-secret"), header("authorization"));
    let method = req.inner().method();
    // `GET /pools` before the default pool's settings are read: it lists every pool, that
    // one too (offline while its settings do not read, as any other pool's), and its gate
    // is ADMIN_SECRET alone, read without any pool's settings. Read after them, one bad
    // default-pool setting answered the whole list 503.
    if pool == DEFAULT_POOL && edge_core::path::segments(&path) == ["pools"] {
        let admin = match edge_core::config::admin_secret(|name| crate::object::setting(&env, name)) {
            Ok(admin) => admin,
            Err(e) => return exchange::respond(edge_core::http::unavailable(&path, &crate::object::misconfigured(&e))),
        };
        // The core decides (the secret, then the method); this host only lists.
        return match edge_core::http::pools_gate(&method, admin.as_deref(), secret.as_deref(), authorization.as_deref()) {
            Gate::Answer(refused) => {
                exchange::drain_refused(&mut req).await;
                exchange::respond(refused)
            }
            _ => pools(&env).await,
        };
    }
    let config = match SETTINGS.with_borrow_mut(|read| read.config(|name| crate::object::setting(&env, name), &pool)) {
        Ok(config) => config,
        Err(ConfigError::UnknownPool(_)) => {
            exchange::drain_refused(&mut req).await;
            return exchange::error(&ApiError::not_found(&format!("pool `{pool}`")));
        }
        // Answered here too: no object is touched until the settings say which exist.
        Err(e) => return exchange::respond(edge_core::http::unavailable(&path, &crate::object::misconfigured(&e))),
    };
    let with_body = match edge_core::http::preflight(&config, &method, &path, secret.as_deref(), authorization.as_deref()) {
        // Refused at once, with at most a few KiB of the body heard out (for at most a
        // second): a caller without the secret cannot make the edge read or wait.
        Gate::Answer(refused) => {
            exchange::drain_refused(&mut req).await;
            return exchange::respond(refused);
        }
        Gate::Handle { read_body } => read_body,
        Gate::AgentSocket => {
            if !exchange::asks_for_websocket(&req) {
                return exchange::respond(edge_core::http::upgrade_required());
            }
            let proof = header(shared::envelope::AGENT_PROOF_HEADER);
            let now = crate::now_ms();
            if let Err(refused) = edge_core::upgrade::check_upgrade(proof.as_deref(), &config, now) {
                // Cloudflare sets it (a client cannot).
                let peer = header("cf-connecting-ip").unwrap_or_default();
                REFUSED.with_borrow_mut(|all| all.entry(pool.clone()).or_default().note(now, &pool, &peer, &refused));
                return exchange::error(&refused);
            }
            false
        }
    };
    match forward(&req, url, &env, &pool, &path, with_body).await {
        Ok(response) => Ok(response),
        Err(e) => {
            console_error!("pool={pool} path={path} could not reach the pool's Durable Object: {e}");
            // The object may have taken the request before the failure (a reset mid-answer).
            exchange::respond(edge_core::http::host_failed(
                &method,
                &path,
                &format!(
                    "the edge could not reach its Durable Object ({e}); if this persists, check the `{BINDING}` \
                     binding and migrations in wrangler.toml"
                ),
            ))
        }
    }
}

/// `GET /pools`, once the gate checked the admin secret: every pool's summary from its
/// object's `/health` (asked with that pool's own secret). A pool whose object does not
/// answer, or whose own settings do not read (each pool's are its own: one bad pool does
/// not close the list), is listed `offline`.
async fn pools(env: &Env) -> worker::Result<Response> {
    let mut list = Vec::new();
    for (name, read) in edge_core::config::Pools::each(|name| crate::object::setting(env, name)) {
        let offline = PoolSummary { pool: name.clone(), status: HealthStatus::Offline, agents_online: 0, agents_taking_work: 0, queued_jobs: 0 };
        let pool = match read {
            Ok(pool) => pool,
            Err(e) => {
                console_error!("pool={name} {}", crate::object::misconfigured(&e));
                list.push(offline);
                continue;
            }
        };
        let summary = match pool_health(env, &pool.name, &pool.runner_secret).await {
            Ok(health) => PoolSummary {
                pool: pool.name.clone(),
                status: health.status,
                agents_online: health.agents.iter().filter(|a| a.connected).count(),
                agents_taking_work: health.agents_taking_work,
                queued_jobs: health.queued_jobs,
            },
            Err(e) => {
                console_error!("pool={} its object did not answer /health: {e}", pool.name);
                offline
            }
        };
        list.push(summary);
    }
    let body = serde_json::to_string(&PoolList { pools: list }).expect("pool lists serialise");
    exchange::respond(edge_core::Response::json(200, body))
}

async fn pool_health(env: &Env, pool: &str, secret: &str) -> worker::Result<Health> {
    let headers = worker::Headers::new();
    headers.set("x-runner-secret", secret)?;
    headers.set(POOL_HEADER, pool)?;
    let mut init = worker::RequestInit::new();
    init.with_method(worker::Method::Get).with_headers(headers);
    let req = Request::new_with_init("https://edge/health", &init)?;
    let stub = env.durable_object(BINDING)?.id_from_name(pool)?.get_stub()?;
    stub.fetch_with_request(req).await?.json::<Health>().await
}

/// Sends the request on to the pool's object: same method and headers, the path without
/// the pool prefix, and the body (a stream, not read here) only where the gate said the
/// route takes one.
async fn forward(req: &Request, mut url: worker::Url, env: &Env, pool: &str, path: &str, with_body: bool) -> worker::Result<Response> {
    url.set_path(path);
    let original = req.inner();
    let init = web_sys::RequestInit::new();
    init.set_method(&original.method());
    let headers = web_sys::Headers::new_with_headers(&original.headers())?;
    headers.set(POOL_HEADER, pool)?;
    headers.delete(REFUSED_HEADER)?;
    // Taken now: lost if this request does not reach the object.
    let refused = REFUSED.with_borrow_mut(|all| all.get_mut(pool).map_or(0, Refusals::take));
    if refused > 0 {
        headers.set(REFUSED_HEADER, &refused.to_string())?;
    }
    match original.body() {
        Some(body) if with_body => init.set_body(&JsValue::from(body)),
        _ => {
            headers.delete("content-length")?;
            headers.delete("transfer-encoding")?;
        }
    }
    init.set_headers(headers.as_ref());
    let forwarded = web_sys::Request::new_with_str_and_init(url.as_str(), &init)?;
    let stub = env.durable_object(BINDING)?.id_from_name(pool)?.get_stub()?;
    stub.fetch_with_request(forwarded.into()).await
}

#[cfg(test)]
mod tests {
    use super::Settings;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A pool's settings are read once while the values they were read from stay the
    /// same, and again as soon as one changes: another pool's too, since this pool
    /// compares its secrets with the others' and searches their agents' keys.
    #[test]
    fn settings_are_read_again_only_when_a_value_changed() {
        let values: RefCell<BTreeMap<&str, String>> = RefCell::new(
            [
                ("RUNNER_SECRET", "0123456789abcdef0123"),
                ("EDGE_SIGNING_KEY", "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="),
                ("AGENT_PUBLIC_KEYS", "spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
                ("POOLS", "gpu"),
                ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
                ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
        );
        let get = |name: &str| values.borrow().get(name).cloned();
        let mut settings = Settings::default();
        let first = settings.config(get, "default").unwrap();
        let again = settings.config(get, "default").unwrap();
        assert!(std::rc::Rc::ptr_eq(&first, &again), "read again with nothing changed");
        values.borrow_mut().insert("RUNNER_SECRET_GPU", "0123456789abcdef0123".into());
        let err = settings.config(get, "default").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("RUNNER_SECRET_GPU"), "another pool's changed value is seen: {err}");
        values.borrow_mut().insert("RUNNER_SECRET_GPU", "gpu-secret-0123456789".into());
        values.borrow_mut().insert("MAX_QUEUED_JOBS", "7".into());
        assert_eq!(settings.config(get, "default").unwrap().max_queued_jobs, 7);
        assert_eq!(settings.config(get, "gpu").unwrap().max_queued_jobs, 7);
    }

    /// A request to a pool `POOLS` does not list (anyone may send one, no secret needed)
    /// reads `POOLS` and nothing else: it read every pool's settings and parsed their
    /// agents' keys, at each such request, since only settings that read are kept.
    #[test]
    fn an_unknown_pool_reads_no_pools_settings() {
        let read = RefCell::new(Vec::new());
        let get = |name: &str| {
            read.borrow_mut().push(name.to_string());
            match name {
                "RUNNER_SECRET" => Some("0123456789abcdef0123".to_string()),
                "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".to_string()),
                "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".to_string()),
                "POOLS" => Some("gpu".to_string()),
                "RUNNER_SECRET_GPU" => Some("gpu-secret-0123456789".to_string()),
                "AGENT_PUBLIC_KEYS_GPU" => Some("rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".to_string()),
                _ => None,
            }
        };
        let mut settings = Settings::default();
        for _ in 0..2 {
            let err = settings.config(get, "nowhere").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("no pool `nowhere`"), "{err}");
        }
        assert_eq!(*read.borrow(), ["POOLS", "POOLS"], "settings read for an unknown pool");
        // A listed pool still reads.
        assert!(settings.config(get, "gpu").is_ok());
    }
}
