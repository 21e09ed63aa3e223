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
    let run = tokio::process::Command::new(bin)
        .arg("--version")
        .env_clear()
        .envs(crate::process::inherited_environment(&[]))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PROBE_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().map(str::trim).find(|l| !l.is_empty()) {
                // What the edge keeps of it, and no more: it goes in the hello, which the
                // edge reads only up to 64 KiB.
                Some(line) => Ok(shared::text::truncate(line, shared::protocol::MAX_CLAUDE_VERSION_BYTES).to_string()),
                None => Err(format!("{} --version printed nothing; reinstall Claude Code", bin.display())),
            }
        }
        Ok(Ok(out)) => Err(format!(
            "{} --version failed: {}; reinstall Claude Code",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("{} cannot run: {e}; check its permissions", bin.display())),
        Err(_) => Err(format!("{} --version did not answer within {} s", bin.display(), PROBE_TIMEOUT.as_secs())),
    }
}

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
}
