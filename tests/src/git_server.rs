//! A git server on 127.0.0.1 for the tests and the benchmark: smart HTTP over **https**
//! (a self-signed certificate made on the spot; its PEM is what the agent's
//! `SSL_CERT_FILE` points at) in front of the real `git http-backend` (CGI). It can demand
//! a token (HTTP Basic, any user name), stall (accept and never answer), slow every request
//! down (or only the answers to pushes), refuse fetches with a message of its own, and it logs every request with its start and end, so a test can see what the
//! agent sent and when.
//!
//! Repositories live in `<root>/repos/<name>.git`; [`GitServer::seed`] makes one with the
//! git CLI and gives a work tree to commit from.

use crate::TempDir;
use base64::Engine;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request as HttpRequest, Response, StatusCode};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The `Authorization` header as sent (tests check where a token went).
    pub authorization: Option<String>,
    pub status: u16,
    pub started: Instant,
    pub ended: Instant,
}

impl Logged {
    /// `git-upload-pack` / `git-receive-pack` exchanges and ref listings, by service.
    pub fn service(&self) -> &str {
        if self.path.ends_with("/git-upload-pack") || self.query.contains("service=git-upload-pack") {
            "upload-pack"
        } else if self.path.ends_with("/git-receive-pack") || self.query.contains("service=git-receive-pack") {
            "receive-pack"
        } else {
            "other"
        }
    }
}

struct State {
    root: PathBuf,
    token: Option<String>,
    log: Mutex<Vec<Logged>>,
    /// Requests whose path contains this are accepted and never answered.
    stall: Mutex<Option<String>>,
    delay_ms: AtomicU64,
    /// Pushes are carried out at once, and answered this much later.
    push_answer_delay_ms: AtomicU64,
    /// Every request is answered with a redirect to this base URL.
    redirect: Mutex<Option<String>>,
    /// Fetches are refused with this message (a pkt-line `ERR`), as a hostile server may.
    refusal: Mutex<Option<String>>,
    /// Fetches' ref listings name refs without end (up to [`ENDLESS_REFS`]).
    endless_refs: std::sync::atomic::AtomicBool,
    /// Pushes' ref listings do.
    endless_push_refs: std::sync::atomic::AtomicBool,
}

/// The refs an endless advertisement names before it ends after all: far past any bound of
/// the agent's, and the server stops by itself.
pub const ENDLESS_REFS: usize = 3_000_000;

pub struct GitServer {
    pub port: u16,
    /// The server's certificate (PEM): the agent's `SSL_CERT_FILE`.
    pub cert_file: PathBuf,
    pub dir: TempDir,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GitServer {
    /// A server; with `token`, every request must carry it as the Basic password.
    pub fn start(token: Option<&str>) -> GitServer {
        let dir = TempDir::new("git-server");
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        // Its own name: OpenSSL finds a trusted certificate by its subject, so two servers
        // in one bundle must not share one.
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("names");
        let name = format!("claude-runner test git server {}", dir.path().display());
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let signing_key = rcgen::KeyPair::generate().expect("a key");
        let cert = params.self_signed(&signing_key).expect("a certificate");
        let cert_file = dir.path().join("cert.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("the certificate suits rustls");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let state = Arc::new(State {
            root: dir.path().join("repos"),
            token: token.map(String::from),
            log: Mutex::new(Vec::new()),
            stall: Mutex::new(None),
            delay_ms: AtomicU64::new(0),
            push_answer_delay_ms: AtomicU64::new(0),
            redirect: Mutex::new(None),
            refusal: Mutex::new(None),
            endless_refs: std::sync::atomic::AtomicBool::new(false),
            endless_push_refs: std::sync::atomic::AtomicBool::new(false),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        let (acceptor, state) = (acceptor.clone(), Arc::clone(&served));
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            // Stalled connections die with the runtime.
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        GitServer { port, cert_file, dir, state, stop: Some(stop), thread: Some(thread) }
    }

    /// `127.0.0.1:PORT`: the host as ALLOWED_REPO_HOSTS and REPO_TOKENS name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The https URL of repository `name`.
    pub fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/{name}.git", self.port)
    }

    pub fn bare(&self, name: &str) -> PathBuf {
        self.state.root.join(format!("{name}.git"))
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    /// From now on, requests for repository `name` are accepted and never answered
    /// (None: answer all again).
    pub fn stall(&self, name: Option<&str>) {
        *self.state.stall.lock().unwrap() = name.map(|n| format!("/{n}.git/"));
    }

    /// Every request waits this long before it is served.
    pub fn delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, a push updates the server's branches at once and is answered `d` later
    /// (a slow server that already took it).
    pub fn delay_push_answers(&self, d: Duration) {
        self.state.push_answer_delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, fetches are refused with `message` in an `ERR` packet, sent as it is
    /// (newlines and all: what a hostile server says).
    pub fn refuse_fetches(&self, message: Option<&str>) {
        *self.state.refusal.lock().unwrap() = message.map(String::from);
    }

    /// From now on, a fetch's ref listing (`info/refs`) names refs without end (well, up to
    /// [`ENDLESS_REFS`]), as a hostile server may.
    pub fn endless_refs(&self, on: bool) {
        self.state.endless_refs.store(on, Ordering::SeqCst);
    }

    /// [`GitServer::endless_refs`] for a push's ref listing (`service=git-receive-pack`).
    pub fn endless_push_refs(&self, on: bool) {
        self.state.endless_push_refs.store(on, Ordering::SeqCst);
    }

    /// From now on, every request is redirected (302) to the same path on `base`.
    pub fn redirect(&self, base: Option<&str>) {
        *self.state.redirect.lock().unwrap() = base.map(String::from);
    }

    /// A new repository `name` whose `main` holds `files`; returns its seed (a work tree).
    pub fn seed(&self, name: &str, files: &[(&str, &[u8])]) -> Seed {
        let bare = self.bare(name);
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        git(self.dir.path(), &["init", "-q", "--bare", bare.to_str().unwrap()]);
        git(&bare, &["config", "http.receivepack", "true"]);
        let work = self.dir.path().join("work").join(name);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        let seed = Seed { work, bare };
        seed.commit(files, "first");
        seed
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A repository's work tree next to the server, to commit and push from.
pub struct Seed {
    pub work: PathBuf,
    pub bare: PathBuf,
}

impl Seed {
    /// Writes `files` (an empty content deletes the file), commits on the current branch,
    /// pushes it, and returns the commit.
    pub fn commit(&self, files: &[(&str, &[u8])], message: &str) -> String {
        for (path, content) in files {
            let p = self.work.join(path);
            if content.is_empty() {
                let _ = std::fs::remove_file(&p);
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, content).unwrap();
            }
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", message]);
        let branch = git(&self.work, &["rev-parse", "--abbrev-ref", "HEAD"]);
        git(&self.work, &["push", "-q", "origin", &branch]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Runs git in the work tree.
    pub fn git(&self, args: &[&str]) -> String {
        git(&self.work, args)
    }

    /// Runs git in the server's bare repository (what the server holds).
    pub fn server_git(&self, args: &[&str]) -> String {
        git(&self.bare, args)
    }
}

/// The git CLI with a fixed identity and no user or system config.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An answer's body: whole, or `git http-backend`'s output as it comes.
type Body = UnsyncBoxBody<Bytes, Infallible>;

fn respond(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::from(body)).boxed_unsync()).unwrap()
}

async fn handle(state: Arc<State>, req: HttpRequest<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(String::from);
    let authorization = header("authorization");
    let (content_type, encoding, protocol) = (header("content-type"), header("content-encoding"), header("git-protocol"));
    let length = header("content-length");
    let stalled = state.stall.lock().unwrap().as_ref().is_some_and(|p| path.contains(p.as_str()));
    if stalled {
        std::future::pending::<()>().await;
    }
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = req.into_body();
    let authorized = match &state.token {
        None => true,
        Some(token) => authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|d| String::from_utf8(d).ok())
            .is_some_and(|d| d.split_once(':').is_some_and(|(_, pass)| pass == token)),
    };
    let redirect = state.redirect.lock().unwrap().clone();
    let refusal = state.refusal.lock().unwrap().clone().filter(|_| query.contains("service=git-upload-pack"));
    let logged = Logged { method: method.clone(), path: path.clone(), query: query.clone(), authorization, status: 0, started, ended: started };
    let log = {
        let state = Arc::clone(&state);
        move |status: u16| state.log.lock().unwrap().push(Logged { status, ended: Instant::now(), ..logged })
    };
    let listing = path.ends_with("/info/refs");
    let endless = match () {
        _ if listing && query.contains("service=git-upload-pack") && state.endless_refs.load(Ordering::SeqCst) => Some("git-upload-pack"),
        _ if listing && query.contains("service=git-receive-pack") && state.endless_push_refs.load(Ordering::SeqCst) => Some("git-receive-pack"),
        _ => None,
    };
    let response = if let Some(service) = endless {
        log(200);
        let pkt = |text: &str| format!("{:04x}{text}", text.len() + 4);
        let first = format!("{}0000", pkt(&format!("# service={service}\n")));
        // Ten thousand refs a piece, until the client goes or the bound is reached.
        let pieces = futures_util::stream::iter((0..ENDLESS_REFS / 10_000).map(move |piece| {
            let mut text = if piece == 0 { first.clone() } else { String::new() };
            for i in piece * 10_000..(piece + 1) * 10_000 {
                text.push_str(&pkt(&format!("{:040x} refs/tags/t{i:08}\n", i + 1)));
            }
            Ok::<_, Infallible>(Frame::data(Bytes::from(text)))
        }));
        let r = Response::builder().status(200).header("content-type", format!("application/x-{service}-advertisement"));
        return Ok(r.body(StreamBody::new(pieces).boxed_unsync()).unwrap());
    } else if let Some(message) = refusal {
        let pkt = |text: &str| format!("{:04x}{text}", text.len() + 4);
        let body = format!("{}0000{}", pkt("# service=git-upload-pack\n"), pkt(&format!("ERR {message}")));
        respond(200, &[("content-type", "application/x-git-upload-pack-advertisement")], body.into_bytes())
    } else if let Some(base) = redirect {
        let to = if query.is_empty() { format!("{base}{path}") } else { format!("{base}{path}?{query}") };
        respond(302, &[("location", to.as_str())], Vec::new())
    } else if !authorized {
        respond(401, &[("www-authenticate", "Basic realm=\"git\"")], b"token required\n".to_vec())
    } else {
        let request = Request { content_type, encoding, protocol, length, body };
        let answer = cgi(&state.root, &method, &path, &query, request, log).await;
        // Its body waits (held by the server) until the answer goes.
        let push_delay = state.push_answer_delay_ms.load(Ordering::SeqCst);
        if method == "POST" && path.ends_with("/git-receive-pack") && push_delay > 0 {
            tokio::time::sleep(Duration::from_millis(push_delay)).await;
        }
        return Ok(answer);
    };
    log(response.status().as_u16());
    Ok(response)
}

/// What `git http-backend` is given of a request besides its method and path.
struct Request {
    content_type: Option<String>,
    encoding: Option<String>,
    protocol: Option<String>,
    /// Its `Content-Length`; none for a chunked body, which git reads to its end.
    length: Option<String>,
    body: hyper::body::Incoming,
}

/// Runs `git http-backend` for one request. Both ways stream, as through a real server: the
/// request's body goes to git as it comes (a pushed pack is indexed while it is sent), and
/// the answer goes out as git writes it (git sends progress and keep-alives while it packs
/// a fetch or checks a push). A request read whole before git started, and an answer held
/// back until git ended, left the agent's reads silent past their 30 s timeout on a loaded
/// machine. `log` is called with the status once git has ended, before the answer's last
/// bytes go (the client has them only after the request is logged).
async fn cgi(root: &Path, method: &str, path: &str, query: &str, request: Request, log: impl FnOnce(u16) + Send + 'static) -> Response<Body> {
    let Request { content_type, encoding, protocol, length, mut body } = request;
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "tester")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(t) = content_type {
        cmd.env("CONTENT_TYPE", t);
    }
    if let Some(e) = encoding {
        cmd.env("HTTP_CONTENT_ENCODING", e);
    }
    if let Some(p) = protocol {
        cmd.env("GIT_PROTOCOL", p);
    }
    if let Some(l) = length {
        cmd.env("CONTENT_LENGTH", l);
    }
    let Ok(mut child) = cmd.spawn() else {
        log(500);
        return respond(500, &[], b"git http-backend did not start\n".to_vec());
    };
    let mut stdin = child.stdin.take().unwrap();
    // Written while the output is read: a big answer must not wait on a full pipe.
    let writer = tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if stdin.write_all(&data).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let split = loop {
        let crlf = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
        let lf = out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
        if let Some(found) = crlf.into_iter().chain(lf).min() {
            break Some(found);
        }
        match stdout.read(&mut chunk).await {
            Ok(0) | Err(_) => break None,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    };
    let Some((at, gap)) = split else {
        let _ = writer.await;
        let _ = child.wait().await;
        log(502);
        return respond(502, &[], b"git http-backend answered without headers\n".to_vec());
    };
    let head = String::from_utf8_lossy(&out[..at]).into_owned();
    let mut status = StatusCode::OK.as_u16();
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        if k.eq_ignore_ascii_case("status") {
            status = v.trim().split(' ').next().and_then(|s| s.parse().ok()).unwrap_or(500);
        } else {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    // The rest as it comes, one piece held back until git has ended and the request is
    // logged.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let first = out.split_off(at + gap);
    tokio::spawn(async move {
        let mut held = (!first.is_empty()).then(|| Bytes::from(first));
        loop {
            match stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(piece) = held.replace(Bytes::copy_from_slice(&chunk[..n])) {
                        let _ = tx.send(piece);
                    }
                }
            }
        }
        let _ = writer.await;
        let _ = child.wait().await;
        log(status);
        if let Some(piece) = held {
            let _ = tx.send(piece);
        }
    });
    let pieces = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|piece| (Ok(Frame::data(piece)), rx)) });
    let mut r = Response::builder().status(status);
    for (k, v) in &headers {
        r = r.header(k.as_str(), v.as_str());
    }
    r.body(StreamBody::new(pieces).boxed_unsync()).unwrap()
}
