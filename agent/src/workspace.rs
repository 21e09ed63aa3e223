//! A job's workspace on disk: a fresh folder under `DATA_DIR/workspaces/<job id>` that no
//! other job sees, the working directory inside it (which must stay inside, after
//! symlinks), and the Claude session an earlier job left, carried over so `session_id`
//! resumes it.

use std::path::{Path, PathBuf};

/// A fresh, empty workspace, and the working directory inside it.
pub fn prepare(workspace: &Path, working_dir: Option<&str>) -> std::io::Result<PathBuf> {
    if workspace.exists() {
        std::fs::remove_dir_all(workspace)?;
    }
    crate::files::private_dir(workspace)?;
    // The edge validated it; check again here, the side that touches the disk.
    let dir = match working_dir {
        Some(d) => shared::contract::checked_working_dir(d).map_err(|e| std::io::Error::other(e.body.error))?,
        None => String::new(),
    };
    let cwd = workspace.join(&dir);
    std::fs::create_dir_all(&cwd)?;
    let real = cwd.canonicalize()?;
    if !real.starts_with(workspace.canonicalize()?) {
        return Err(std::io::Error::other("working_dir leaves the workspace"));
    }
    Ok(real)
}

/// At the agent's start, every workspace under `root` is a leftover: its job was running
/// when the agent was killed (it is reported lost), and a checkout can be gigabytes that
/// nothing else would ever remove. Kept, like a failed job's, when `keep` is set
/// (`KEEP_FAILED_WORKSPACES`). Returns how many were removed.
pub fn clear_leftovers(root: &Path, keep: bool) -> usize {
    if keep {
        return 0;
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Claude Code files a session under `projects/<its working directory, slugged>/<id>.jsonl`
/// and `--resume` looks only under the current directory's folder. Every job has a fresh
/// workspace, so a session from an earlier job is copied to where this job's Claude looks.
pub fn carry_session(config_dir: &Path, session_id: &str, cwd: &Path) -> std::io::Result<()> {
    // The edge allows only plain ids; check again before building paths.
    if !shared::ids::plain_id(session_id, shared::ids::MAX_JOB_ID) {
        return Err(std::io::Error::other("unsafe session id"));
    }
    let projects = config_dir.join("projects");
    let file = format!("{session_id}.jsonl");
    let slug: String = cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let target = projects.join(slug);
    if target.join(&file).exists() {
        return Ok(());
    }
    let source = std::fs::read_dir(&projects)?
        .flatten()
        .map(|dir| dir.path().join(&file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    let Some(source) = source else { return Ok(()) };
    std::fs::create_dir_all(&target)?;
    std::fs::copy(source, target.join(file))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_follow_the_job_to_its_new_workspace() {
        let root = std::env::temp_dir().join(format!("cr-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = root.join("projects/-data-workspaces-job1");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("abc-123.jsonl"), "{\"turn\":1}\n").unwrap();
        let cwd = Path::new("/data/workspaces/job2/sub_dir");
        carry_session(&root, "abc-123", cwd).unwrap();
        let copied = root.join("projects/-data-workspaces-job2-sub-dir/abc-123.jsonl");
        assert_eq!(std::fs::read_to_string(copied).unwrap(), "{\"turn\":1}\n");
        // Unknown sessions are left for Claude to report; hostile ids build no paths.
        assert!(carry_session(&root, "unknown", cwd).is_ok());
        assert!(carry_session(&root, "../../etc/passwd", cwd).is_err());
    }

    #[test]
    fn leftover_workspaces_go_unless_failed_ones_are_kept() {
        let root = std::env::temp_dir().join(format!("cr-leftovers-{}", std::process::id()));
        std::fs::create_dir_all(root.join("job-a/src")).unwrap();
        std::fs::create_dir_all(root.join("job-b")).unwrap();
        assert_eq!(clear_leftovers(&root, true), 0);
        assert!(root.join("job-a/src").exists(), "KEEP_FAILED_WORKSPACES keeps them");
        assert_eq!(clear_leftovers(&root, false), 2);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        assert_eq!(clear_leftovers(&root.join("missing"), false), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn workspaces_are_fresh_and_keep_working_dir_inside() {
        let ws = std::env::temp_dir().join(format!("cr-ws-{}", std::process::id()));
        std::fs::create_dir_all(ws.join("old")).unwrap();
        let cwd = prepare(&ws, Some("a/b")).unwrap();
        assert!(cwd.ends_with("a/b"));
        assert!(!ws.join("old").exists(), "a workspace starts empty");
        assert!(prepare(&ws, Some("../x")).is_err());
        assert!(prepare(&ws, Some("/etc")).is_err());
    }
}
