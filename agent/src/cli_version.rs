//! Which Claude Code CLI this agent runs: its `--version` line, read at start and again
//! whenever the binary on disk changes (an upgrade under a running agent), and reported
//! to the edge in the hello and in heartbeats so `/health` shows it.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How long `claude --version` may take (the real CLI answers in well under a second).
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `<bin> --version` and returns its first line. With what Claude's runs get of the
/// agent's environment, no secret: the probe is `exec`'d, so dumpable, and any process of
/// the agent's user (a job's) may read its `/proc/<pid>/environ` while it runs.
pub async fn probe(bin: &std::path::Path) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut probe = tokio::process::Command::new(bin);
    probe
        .arg("--version")
        .env_clear()
        .envs(crate::process::inherited_environment(&[]))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: async-signal-safe: the descriptor limit `claude-runner up` started with,
    // not the one it raised.
    unsafe { probe.pre_exec(runtime::nofile::restore_in_child) };
    let mut child = probe
        .spawn()
        .map_err(|e| format!("{} cannot run: {e}; check its permissions", bin.display()))?;
    let (mut stdout, mut stderr) = (child.stdout.take().expect("stdout is piped"), child.stderr.take().expect("stderr is piped"));
    let give_up_at = tokio::time::Instant::now() + PROBE_TIMEOUT;
    // Both read at once (one pipe filling up would hold the other), each bounded: a
    // `claude` a job put on the PATH may print without end. Past the bound it is stopped
    // (and what it started no longer read), and its first line is the version all the same.
    let mut err = tokio::spawn(async move {
        let mut err = Vec::new();
        let _ = (&mut stderr).take(MAX_PROBE_STDERR as u64).read_to_end(&mut err).await;
        err
    });
    let out = async move {
        let mut out = Vec::new();
        let read = (&mut stdout).take(MAX_PROBE_OUTPUT as u64).read_to_end(&mut out).await;
        if out.len() >= MAX_PROBE_OUTPUT {
            // Reaped here, not left to tokio's orphan reaping (which catches SIGCHLD).
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Ok((out, None));
        }
        read?;
        child.wait().await.map(|status| (out, Some(status)))
    };
    let ran = tokio::time::timeout_at(give_up_at, out).await;
    let result = match ran {
        Ok(Ok((out, status))) if status.is_none_or(|s| s.success()) => {
            let text = String::from_utf8_lossy(&out);
            match text.lines().map(str::trim).find(|l| !l.is_empty()) {
                // What the edge keeps of it, and no more: it goes in the hello, which the
                // edge reads only up to 64 KiB.
                Some(line) => Ok(shared::text::truncate(line, shared::protocol::MAX_CLAUDE_VERSION_BYTES).to_string()),
                None => Err(format!("{} --version printed nothing; reinstall Claude Code", bin.display())),
            }
        }
        Ok(Ok(_)) => {
            let err = tokio::time::timeout_at(give_up_at, &mut err).await.ok().and_then(Result::ok).unwrap_or_default();
            // On one line: a `claude` a job put on the PATH chooses it, and doctor shows a
            // detail of several lines as several (a line of its choosing as doctor's own).
            let said = shared::text::one_line(String::from_utf8_lossy(&err).trim());
            Err(format!("{} --version failed: {said}; reinstall Claude Code", bin.display()))
        }
        Ok(Err(e)) => Err(format!("{} cannot run: {e}; check its permissions", bin.display())),
        Err(_) => Err(format!("{} --version did not answer within {} s", bin.display(), PROBE_TIMEOUT.as_secs())),
    };
    // What it started may hold stderr open: no longer read.
    err.abort();
    result
}

/// Most of what `--version` prints that is read: far more than a version line (the first),
/// and no more however much a `claude` prints.
const MAX_PROBE_OUTPUT: usize = 1024 * 1024;
/// Most of what `--version` prints on stderr that is read (shown when it fails).
const MAX_PROBE_STDERR: usize = 4 * 1024;

/// The version last read, and which file (and modification time) it was read from.
#[derive(Default)]
pub struct CliVersion {
    known: Mutex<Option<(PathBuf, Option<SystemTime>, String)>>,
}

impl CliVersion {
    pub fn current(&self) -> Option<String> {
        self.known.lock().expect("version lock").as_ref().map(|(_, _, v)| v.clone())
    }

    /// Reads the version again if the binary `name` resolves to is not the one read last.
    pub async fn refresh(&self, name: &str) {
        let Some(path) = crate::process::find_binary(name) else { return };
        // Change is noticed on the file itself (npm's `claude` is a symlink into the package).
        let real = path.canonicalize().unwrap_or_else(|_| path.clone());
        let modified = std::fs::metadata(&real).and_then(|m| m.modified()).ok();
        let unchanged = self.known.lock().expect("version lock").as_ref().is_some_and(|(p, m, _)| *p == real && *m == modified);
        if unchanged {
            return;
        }
        match probe(&path).await {
            Ok(version) => {
                tracing::info!(claude = %real.display(), version = %version, "Claude Code CLI version");
                *self.known.lock().expect("version lock") = Some((real, modified, version));
            }
            Err(e) => tracing::warn!(claude = %real.display(), error = %e, "could not read the Claude Code CLI's version"),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The version goes in the agent's hello, which the edge reads only up to 64 KiB before
    /// the agent has proved itself: a `claude` (a wrapper, or one a job put on the agent's
    /// `PATH`) whose first line is 100 KB long kept the agent off the edge at every
    /// connection. The edge keeps 100 bytes of it; so does the agent.
    #[tokio::test]
    async fn a_version_line_is_kept_to_what_the_edge_keeps() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-cli-version-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("claude");
        std::fs::write(&bin, "#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' v\necho\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o700)).unwrap();
        let version = super::probe(&bin).await.unwrap();
        assert!(version.len() <= shared::protocol::MAX_CLAUDE_VERSION_BYTES, "{} bytes", version.len());
        assert!(version.starts_with("vvv"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The probe read all the `claude` printed before cutting its first line: one (a job's,
    /// on the agent's `PATH`) that prints without end, as `yes` does, filled the agent's
    /// memory for the probe's 20 s, gigabytes a second, at every start and every time the
    /// file changed. It is read no further than [`super::MAX_PROBE_OUTPUT`], then stopped;
    /// here it prints more than that and never exits.
    #[tokio::test]
    async fn a_claude_that_prints_without_end_is_read_no_further_than_a_version_needs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-cli-version-endless-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("claude");
        std::fs::write(&bin, "#!/bin/sh\necho 2.1.300 '(Claude Code)'\nhead -c 3000000 /dev/zero\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(super::probe(&bin).await, Ok("2.1.300 (Claude Code)".to_string()));
        // One that fails still says why, from its stderr.
        std::fs::write(&bin, "#!/bin/sh\necho 'no such option' >&2\nexit 3\n").unwrap();
        let failed = super::probe(&bin).await.unwrap_err();
        assert!(failed.contains("--version failed: no such option"), "{failed}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
