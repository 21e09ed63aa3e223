//! Job records in SQLite. The state machine decides what to save and when; this only
//! writes it. One table, the record as JSON: the machine's `Job` is the schema; and
//! alerting's memory in `meta`.

use edge_core::record::Job;
use edge_core::Writes;
use rusqlite::{params, Connection};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub struct Store {
    conn: Connection,
    /// `DATA_DIR/edge.sqlite3`, named by the errors met reading it at start.
    path: PathBuf,
    /// A record's JSON is written here before it is bound: one buffer for the edge's life
    /// rather than a new string, grown several times over, for every save.
    record: Vec<u8>,
    /// Transactions committed, counted for the driver's test that its groups save commits
    /// (`requests_queued_together_are_stored_in_one_commit_before_any_is_answered`): only
    /// in tests, since SQLite says no count of them short of a commit hook (rusqlite's
    /// `hooks` feature, for the product) or reading the WAL's frames in the test.
    #[cfg(test)]
    pub(crate) commits: u64,
    /// Runs the checkpoints on a thread of its own ([`Checkpointer`]).
    checkpoints: Checkpointer,
    /// `DATA_DIR/edge.lock`, held while the store is open: two edges on one database would
    /// each restore and dispatch the same queued jobs (twice run) and overwrite each
    /// other's records.
    _lock: std::fs::File,
}

/// How long a write waits for another process that holds the database (a backup, an
/// operator's query) before it fails. Every event waits for its writes, and the one task
/// that drives the machine waits with it, so this bounds how long the whole edge can
/// stall per failing write: short, so a locked database means quick 500s and results
/// kept in the agents' spools, not an edge that stops answering `/health`.
pub const BUSY_TIMEOUT_MS: u64 = 250;

/// WAL pages between checkpoints (each syncs the WAL, then the database): what bounds
/// what a power cut can lose, with the commits made while a checkpoint runs (on its own
/// thread: [`Checkpointer`]). SQLite's default is 1,000. A job writes about 6 WAL pages
/// when its four events are committed one by one (a caller at a time: about 40 jobs' events
/// in 256 pages), about 3 when the driver stores several callers' events in one commit
/// (`driver.rs`, with 8 clients: about 85 jobs' events) — under 400, the bound before
/// those groups, when it was about 65 jobs' events either way; 400 with the groups would
/// have let it grow to about 130.
pub const CHECKPOINT_PAGES: u32 = 256;

thread_local! {
    /// The WAL's frames after the last commit on this thread ([`wal_frames`]); -1 none yet.
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(-1) };
}

/// SQLite's WAL hook, called inside each commit on the committing thread (the driver's):
/// notes the WAL's frames for [`Store::apply`] to read back, and checkpoints nothing.
fn wal_frames(_: &rusqlite::hooks::Wal, frames: std::os::raw::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(frames));
    Ok(())
}

/// The checkpoints, each a sync of the WAL, a copy of its pages into the database and a
/// sync of that, on a thread and connection of their own. SQLite's automatic checkpoint
/// ran them inside the commit that crossed `CHECKPOINT_PAGES`, on the one thread that
/// drives the whole edge: every caller and agent waited out both syncs (on the bench's
/// disk about 7 ms each, 50 times in 3 s with 8 clients: an eighth of the edge's time).
/// A passive checkpoint takes no lock the driver's writes wait for, so one begins each
/// time `CHECKPOINT_PAGES` more pages are in the WAL than were known synced after the last
/// (one that could not copy them all, a reader holding an old snapshot, is followed by a
/// sync of the WAL by the thread itself). The WAL
/// starts over (at the next write) only once a checkpoint copied all of it, which under
/// steady writes a passive one seldom does (commits go on while it syncs): at
/// [`RESTART_PAGES`] the driver runs one itself, in its commit, as the automatic one did
/// at every `CHECKPOINT_PAGES` — the edge held up once where it was eight times, and no
/// write ever waits on a lock the checkpoint thread holds (a `RESTART` checkpoint there
/// would block the driver's writes, which fail after `BUSY_TIMEOUT_MS`).
struct Checkpointer {
    /// Wakes the thread for a checkpoint; dropped, it ends the thread.
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    /// Set when woken, cleared when its checkpoint is done: one wake for each.
    asked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The WAL's pages known synced after the last checkpoint (its first ones): the next
    /// begins `CHECKPOINT_PAGES` after them.
    synced: std::sync::Arc<std::sync::atomic::AtomicI32>,
    thread: Option<std::thread::JoinHandle<()>>,
    #[cfg(test)]
    probe: std::sync::Arc<Probe>,
}

/// What the checkpoint thread did, for the tests to look at.
#[cfg(test)]
#[derive(Default)]
struct Probe {
    /// Checkpoints done.
    done: std::sync::atomic::AtomicU64,
    /// The most WAL pages one checkpoint copied into the database (SQLite's count).
    copied: std::sync::atomic::AtomicI32,
    /// Checkpoints after which the thread synced the WAL itself.
    wal_syncs: std::sync::atomic::AtomicU64,
}

/// WAL pages at which the driver checkpoints in its commit, so that the WAL starts over:
/// a WAL of about 8 MiB at most on the disk, one such stop about every 600 jobs with 8
/// clients.
const RESTART_PAGES: i32 = 8 * CHECKPOINT_PAGES as i32;

/// What the WAL file is cut back to when it starts over: a reader that held an old
/// snapshot for long (the WAL grew past `RESTART_PAGES`) leaves no larger file behind. A
/// frame is a page and its 24-byte header, after the WAL's own 32: room for the WAL of a
/// usual start over (`RESTART_PAGES` and a checkpoint's worth more), so that one is not
/// cut and grown again each time (review rev45e, 7).
const WAL_KEPT_BYTES: i64 = 32 + (RESTART_PAGES as i64 + CHECKPOINT_PAGES as i64) * (4096 + 24);

/// The database's WAL, beside it in DATA_DIR.
const WAL_FILE: &str = "edge.sqlite3-wal";

impl Checkpointer {
    fn start(conn: Connection, wal: PathBuf) -> std::io::Result<Checkpointer> {
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let synced = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let (a, c) = (std::sync::Arc::clone(&asked), std::sync::Arc::clone(&synced));
        #[cfg(test)]
        let (probe, p) = {
            let probe = std::sync::Arc::new(Probe::default());
            (std::sync::Arc::clone(&probe), probe)
        };
        let thread = std::thread::Builder::new().name("edge-checkpoints".into()).spawn(move || {
            let mut failing = false;
            while woken.recv().is_ok() {
                // A failure (a full disk) leaves the WAL to grow until a later one succeeds,
                // as the automatic checkpoint's did; the commits themselves are unaffected.
                // Said once until one succeeds: each commit meanwhile asks again.
                let checkpoint = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i32>(1)?, r.get::<_, i32>(2)?)));
                // A checkpoint that copied less than the WAL holds (another connection
                // reading an older snapshot: an operator's `sqlite3`, a backup) may have
                // synced nothing — SQLite syncs the WAL only before copying — and what a
                // power cut can lose would grow while the reader stays (hostile review
                // rev45d, 3). One sync of the file covers every frame written to it.
                #[cfg(test)]
                if let Ok((_, _, copied)) = checkpoint {
                    p.copied.fetch_max(copied, std::sync::atomic::Ordering::AcqRel);
                }
                let checkpoint = match checkpoint {
                    // Another checkpoint held the lock (the driver's at `RESTART_PAGES`): it
                    // says nothing of the WAL (-1 pages), and is no failure and no success;
                    // the next commit asks again (review rev45e, 6).
                    Ok((busy, _, _)) if busy != 0 => None,
                    Err(e) => Some(Err(e.to_string())),
                    // Opened as the store's files are: never waiting on a pipe put there.
                    Ok((_, log, copied)) if copied < log => Some(
                        runtime::open_plain_for_writing(&wal, false)
                            .and_then(|f| f.sync_data())
                            .map(|()| {
                                #[cfg(test)]
                                p.wal_syncs.fetch_add(1, std::sync::atomic::Ordering::Release);
                                log
                            })
                            .map_err(|e| format!("cannot sync {}: {e}", wal.display())),
                    ),
                    Ok((_, log, _)) => Some(Ok(log)),
                };
                match checkpoint {
                    None => {}
                    Some(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "the job store's checkpoint failed: its WAL grows until one succeeds; free space in DATA_DIR");
                    }
                    Some(Err(_)) => {}
                    Some(Ok(n)) => {
                        c.store(n.max(0), std::sync::atomic::Ordering::Release);
                        if failing {
                            failing = false;
                            tracing::info!("the job store's checkpoint succeeded again");
                        }
                    }
                }
                #[cfg(test)]
                p.done.fetch_add(1, std::sync::atomic::Ordering::Release);
                a.store(false, std::sync::atomic::Ordering::Release);
            }
        })?;
        Ok(Checkpointer {
            wake: Some(wake),
            asked,
            synced,
            thread: Some(thread),
            #[cfg(test)]
            probe,
        })
    }

    /// After a commit on `conn` (the driver's) that left `pages` in the WAL: a checkpoint
    /// begun `CHECKPOINT_PAGES` after the pages known synced (from the WAL's start, once
    /// it started over), or run here at `RESTART_PAGES`.
    fn after_commit(&self, conn: &Connection, pages: i32) {
        if pages >= RESTART_PAGES {
            // Passive too, so it never waits: one under way on the thread makes it busy, and
            // the next commit tries again. Its failure, as the automatic one's, is not the
            // commit's (the thread's next failure is logged).
            // A reader holding an old snapshot keeps the WAL from starting over: the thread
            // is still woken below, and syncs what the checkpoints cannot copy.
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
        let synced = self.synced.load(std::sync::atomic::Ordering::Acquire);
        let since = if pages < synced { pages } else { pages - synced };
        if since >= CHECKPOINT_PAGES as i32 && !self.asked.swap(true, std::sync::atomic::Ordering::AcqRel) {
            if let Some(wake) = &self.wake {
                let _ = wake.try_send(());
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // The checkpoint under way ends first: the store's files are not left to another edge
        // while a connection of this one still writes them.
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The most the record buffer keeps between saves (a job's record with a short result is
/// about 1 KiB; a long output's is let go after its save).
const RECORD_BUFFER_KEPT: usize = 64 * 1024;

/// Why the job store at `path` (`DATA_DIR/edge.sqlite3`) cannot be opened or read at
/// start, naming it, with what to do: SQLite's words alone ("file is not a database")
/// named no file and no way on.
fn unusable(path: &Path, e: rusqlite::Error) -> anyhow::Error {
    let path = path.display();
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            anyhow::anyhow!("{path} is not an edge's job store ({e}): move it aside (its jobs are lost) or set another DATA_DIR")
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => anyhow::anyhow!(
            "{path} is damaged, not an edge's job store as it is ({e}): move it aside (its jobs are lost; `sqlite3 {path} .recover` may save some) or set another DATA_DIR"
        ),
        Some(rusqlite::ErrorCode::DiskFull) => {
            anyhow::anyhow!("cannot write the job store {path} ({e}): free space on DATA_DIR's disk or set DATA_DIR elsewhere")
        }
        _ => anyhow::anyhow!(
            "cannot use the job store {path} ({e}): check DATA_DIR's permissions and disk, and that no other program holds the file"
        ),
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. The records hold callers' prompts and
    /// Claude's results, so they are the edge user's alone: a folder the edge creates is
    /// owner-only (an existing one keeps its mode: it may be shared), and the database and
    /// its journal files are owner-only whatever they were.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| {
            anyhow::anyhow!("cannot create DATA_DIR {}: {e}; set DATA_DIR to a writable folder", dir.display())
        })?;
        let lock = runtime::hold_lock(&dir.join("edge.lock"))
            .map_err(|e| anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", dir.display()))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "another edge is running with DATA_DIR {} (it holds {}/edge.lock, let go when it exits: do not delete the file): stop it first, or give this one a DATA_DIR of its own",
                    dir.display(),
                    dir.display()
                )
            })?;
        let path = dir.join("edge.sqlite3");
        let private = |path: &Path| -> anyhow::Result<()> {
            // Created owner-only; SQLite gives its -wal and -shm files the database's mode.
            // Never waiting on a pipe put there (under `up` the folder is a job's to write).
            let file = runtime::open_plain_for_writing(path, true);
            file.and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
                .map_err(|e| anyhow::anyhow!("cannot make {} owner-only: {e}; check DATA_DIR's permissions", path.display()))
        };
        private(&path)?;
        for journal in [WAL_FILE, "edge.sqlite3-shm"] {
            if dir.join(journal).exists() {
                private(&dir.join(journal))?;
            }
        }
        let conn = Connection::open(&path).map_err(|e| unusable(&path, e))?;
        // WAL + NORMAL: a commit survives a process crash; a power cut may lose the commits
        // since the WAL was last synced — at a checkpoint, every `CHECKPOINT_PAGES` pages
        // written (sooner in practice: the kernel writes the WAL back within about 30 s) —
        // and with them jobs accepted, dispatches (the job runs twice) and results (it ends
        // lost): README's guarantees. FULL closes that window at about four fifths of the
        // edge's throughput (BENCHMARKS.md, "The native edge's SQLite with
        // `synchronous=FULL`"), so it is not taken.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout={BUSY_TIMEOUT_MS};
             PRAGMA journal_size_limit={WAL_KEPT_BYTES};
             CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        ))
        .map_err(|e| unusable(&path, e))?;
        // In place of the automatic checkpoint (a WAL hook of its own, replaced by this one):
        // the checkpoints run on their own thread ([`Checkpointer`]).
        conn.wal_hook(Some(wal_frames));
        let checkpoints = Connection::open(&path)
            .map_err(|e| unusable(&path, e))
            .and_then(|c| Checkpointer::start(c, dir.join(WAL_FILE)).map_err(|e| anyhow::anyhow!("cannot start the job store's checkpoint thread: {e}")))?;
        Ok(Store {
            conn,
            path,
            record: Vec::new(),
            #[cfg(test)]
            commits: 0,
            checkpoints,
            _lock: lock,
        })
    }

    /// Every stored job, an ended one as its header: the whole records of every retained
    /// job (up to `MAX_RETAINED_BYTES`) must not sit in memory at once — each is read,
    /// shrunk and dropped before the next, and read whole again only when asked for
    /// ([`Store::load_one`]). A record that no longer parses is skipped with a warning
    /// rather than stopping the edge from starting.
    pub fn load(&self) -> anyhow::Result<Vec<Job>> {
        let named = |e| unusable(&self.path, e);
        let mut stmt = self.conn.prepare("SELECT id, record FROM jobs").map_err(named)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(named)?;
        let mut jobs = Vec::new();
        for row in rows {
            let (id, record) = row.map_err(named)?;
            match serde_json::from_str::<Job>(&record) {
                Ok(job) => jobs.push(job.in_memory()),
                Err(e) => tracing::warn!(job_id = %id, error = %e, "skipping unreadable job record"),
            }
        }
        Ok(jobs)
    }

    /// One job's whole record (memory keeps only the header of an ended job).
    pub fn load_one(&self, id: &str) -> anyhow::Result<Option<Job>> {
        let mut stmt = self.conn.prepare_cached("SELECT record FROM jobs WHERE id = ?1")?;
        let mut rows = stmt.query(params![id])?;
        match rows.next()? {
            Some(row) => Ok(Some(serde_json::from_str(&row.get::<_, String>(0)?)?)),
            None => Ok(None),
        }
    }

    /// Alerting's stored memory, if any (an unreadable one is dropped with a warning:
    /// at worst an alert is sent again).
    pub fn load_alerts(&self) -> anyhow::Result<Option<edge_core::notify::AlertState>> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'alerts'", [], |r| r.get(0))
            .map(Some)
            .or_else(|e| if matches!(e, rusqlite::Error::QueryReturnedNoRows) { Ok(None) } else { Err(e) })
            .map_err(|e| unusable(&self.path, e))?;
        Ok(text.and_then(|t| match serde_json::from_str(&t) {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!(error = %e, "skipping unreadable alert state");
                None
            }
        }))
    }

    /// Applies one event's writes in one transaction: all of them, or none.
    ///
    /// Every statement is prepared once per connection (`BEGIN` and `COMMIT` too: a
    /// `rusqlite::Transaction` parses both at each use). A save is an upsert, not `INSERT
    /// OR REPLACE`: a job's record is rewritten several times in its life, and a replace
    /// deletes the row and inserts it again under a new rowid — the table page it left,
    /// the page it lands on and the id index all written — where an update in place
    /// writes the row's own page only.
    pub fn apply(&mut self, writes: &Writes) -> anyhow::Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.conn.prepare_cached("BEGIN")?.execute([])?;
        let applied = self.write(writes).and_then(|()| Ok(self.conn.prepare_cached("COMMIT")?.execute([]).map(drop)?));
        if applied.is_ok() {
            #[cfg(test)]
            {
                self.commits += 1;
            }
            self.checkpoints.after_commit(&self.conn, WAL_FRAMES.with(|f| f.replace(-1)));
        }
        if applied.is_err() && !self.conn.is_autocommit() {
            // All or none: what was written before the failure goes too. (Its own failure
            // is not the event's problem: the failure that caused it is reported.)
            let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut rollback| rollback.execute([]));
        }
        applied
    }

    fn write(&mut self, writes: &Writes) -> anyhow::Result<()> {
        let mut save = self.conn.prepare_cached(
            "INSERT INTO jobs (id, record) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET record = excluded.record",
        )?;
        for job in &writes.saves {
            self.record.clear();
            serde_json::to_writer(&mut self.record, &**job)?;
            // Bound as text, as before: serde_json writes UTF-8 (checked, not assumed).
            save.execute(params![job.id, std::str::from_utf8(&self.record)?])?;
        }
        // A big result's record is not kept in memory for the edge's life.
        if self.record.capacity() > RECORD_BUFFER_KEPT {
            self.record = Vec::new();
        }
        let mut forget = self.conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?;
        for id in &writes.forgets {
            forget.execute(params![id])?;
        }
        if let Some(alerts) = &writes.alerts {
            self.conn
                .prepare_cached("INSERT INTO meta (key, value) VALUES ('alerts', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value")?
                .execute(params![serde_json::to_string(alerts)?])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::record::{Job, Mode};

    fn job(id: &str) -> Job {
        let spec = serde_json::from_value(serde_json::json!({"prompt": "x", "timeout_ms": 1000})).unwrap();
        Job::new(id.into(), spec, Mode::Detached, None, 0)
    }

    #[test]
    fn a_write_to_a_database_another_process_holds_fails_fast_and_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("cr-store-locked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        store.apply(&Writes { saves: vec![job("a").into()], forgets: vec![], alerts: None }).unwrap();
        let holder = Connection::open(dir.join("edge.sqlite3")).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let started = std::time::Instant::now();
        let failed = store.apply(&Writes { saves: vec![job("b").into()], forgets: vec!["a".into()], alerts: None });
        let took = started.elapsed();
        assert!(failed.is_err());
        // It used to wait 5 s per write, the whole edge with it.
        assert!(took < std::time::Duration::from_secs(2), "a locked database stalled the write for {took:?}");
        holder.execute_batch("ROLLBACK").unwrap();
        let ids: Vec<String> = store.load().unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(ids, vec!["a".to_string()], "all of the event's writes or none");
        // The failed transaction was rolled back: the next event's writes go in.
        store.apply(&Writes { saves: vec![job("b").into()], forgets: vec!["a".into()], alerts: None }).unwrap();
        let ids: Vec<String> = store.load().unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(ids, vec!["b".to_string()]);
    }

    /// Under `claude-runner up` the store's folder is the agent's user's (`DATA_DIR/up/edge`),
    /// a job's to write: a pipe there as the database, or as its journal, held the opening
    /// for good (made owner-only by an open for writing, which waits for a reader), and `up`
    /// with it, as `edge.lock` and `up.json` no longer do. Refused at once, naming the file.
    #[test]
    fn a_pipe_where_the_database_goes_is_refused_not_waited_on() {
        for name in ["edge.sqlite3", "edge.sqlite3-wal"] {
            let dir = std::env::temp_dir().join(format!("cr-store-pipe-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let fifo = std::ffi::CString::new(dir.join(name).to_str().unwrap()).unwrap();
            // SAFETY: mkfifo with a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
            let (tx, rx) = std::sync::mpsc::channel();
            let opening = dir.clone();
            std::thread::spawn(move || tx.send(Store::open(&opening).err().map(|e| e.to_string())).unwrap());
            let Ok(refused) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
                // Lets the opening still waiting on the pipe go.
                let _ = std::fs::File::open(dir.join(name));
                panic!("{name} as a pipe: the store's opening waits on it");
            };
            let e = refused.unwrap_or_else(|| panic!("{name} as a pipe is taken"));
            assert!(e.contains(name) && e.contains("plain file"), "{e}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn a_second_store_on_the_same_folder_is_refused_until_the_first_is_closed() {
        let dir = std::env::temp_dir().join(format!("cr-store-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Store::open(&dir).unwrap();
        let refused = Store::open(&dir).err().expect("a second store on the same DATA_DIR was opened");
        assert!(refused.to_string().contains("another edge is running with DATA_DIR"), "{refused}");
        drop(first);
        Store::open(&dir).expect("the folder is free once the first store is closed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_saved_job_is_rewritten_in_place_and_read_back_as_last_saved() {
        let dir = std::env::temp_dir().join(format!("cr-store-upsert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        let mut a = job("a");
        store.apply(&Writes { saves: vec![a.clone().into(), job("b").into()], forgets: vec![], alerts: None }).unwrap();
        let rowid = |store: &Store| -> i64 { store.conn.query_row("SELECT rowid FROM jobs WHERE id = 'a'", [], |r| r.get(0)).unwrap() };
        let before = rowid(&store);
        a.attempts = 3;
        store.apply(&Writes { saves: vec![a.into()], forgets: vec![], alerts: None }).unwrap();
        assert_eq!(store.load_one("a").unwrap().unwrap().attempts, 3);
        // Updated where it was: a replace would have moved it (and rewritten the id index).
        assert_eq!(rowid(&store), before);
        assert_eq!(store.load().unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Commits `n` jobs one at a time, each record about 5 KiB: two pages of 4 KiB and more
    /// (its leaf, the id index) a commit, as one caller's event.
    fn commit_big_jobs(store: &mut Store, n: usize) {
        let mut big = job("x");
        std::sync::Arc::make_mut(&mut big.spec).prompt = "p".repeat(5000);
        for i in 0..n {
            let mut j = big.clone();
            j.id = format!("job{i}");
            store.apply(&Writes { saves: vec![j.into()], forgets: vec![], alerts: None }).unwrap();
        }
    }

    /// Waits (a minute at most) until the checkpoint thread has counted one in `count` and
    /// has none under way.
    fn checkpoint_settles(store: &Store, count: &std::sync::atomic::AtomicU64) {
        let asked = &store.checkpoints.asked;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while (count.load(std::sync::atomic::Ordering::Acquire) == 0 || asked.load(std::sync::atomic::Ordering::Acquire)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// What bounds what a power cut can lose (see CHECKPOINT_PAGES): once the WAL holds
    /// `CHECKPOINT_PAGES` pages, a checkpoint syncs them and copies them into the database
    /// file — now on the checkpoint thread, not in the commit, so nothing the driver does
    /// runs it: a store whose thread never checkpointed would grow its window for good.
    #[test]
    fn a_wal_of_checkpoint_pages_is_checkpointed_into_the_database_file() {
        let dir = std::env::temp_dir().join(format!("cr-store-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        // So many fill CHECKPOINT_PAGES pages, and no more are committed: what was, is
        // checkpointed.
        let n = CHECKPOINT_PAGES as usize / 2;
        commit_big_jobs(&mut store, n);
        let done = &store.checkpoints.probe.done;
        checkpoint_settles(&store, done);
        assert!(done.load(std::sync::atomic::Ordering::Acquire) > 0, "no checkpoint after {n} commits of two pages and more");
        // What it copied into the database (SQLite's count, the pages synced there): at
        // least the CHECKPOINT_PAGES pages that began it.
        let copied = store.checkpoints.probe.copied.load(std::sync::atomic::Ordering::Acquire);
        assert!(copied >= CHECKPOINT_PAGES as i32, "the checkpoint copied {copied} pages of the WAL into the database");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another connection reading an old snapshot (an operator's `sqlite3`, a backup) keeps
    /// every checkpoint from copying past it, and SQLite syncs the WAL only before a copy:
    /// what a power cut can lose grew for as long as the reader stayed (hostile review
    /// rev45d, 3: 1 sync in 1,200 commits). The thread syncs the WAL itself then.
    #[test]
    fn a_reader_holding_an_old_snapshot_does_not_stop_the_wal_being_synced() {
        let dir = std::env::temp_dir().join(format!("cr-store-reader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        store.apply(&Writes { saves: vec![job("first").into()], forgets: vec![], alerts: None }).unwrap();
        let reader = Connection::open(dir.join("edge.sqlite3")).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let held: i64 = reader.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0)).unwrap();
        assert_eq!(held, 1);
        commit_big_jobs(&mut store, CHECKPOINT_PAGES as usize);
        let syncs = &store.checkpoints.probe.wal_syncs;
        checkpoint_settles(&store, syncs);
        assert!(syncs.load(std::sync::atomic::Ordering::Acquire) > 0, "the WAL was never synced while a reader held an old snapshot");
        // What is known synced moves on with the WAL, so the thread is not woken at every
        // commit while the reader stays.
        let synced = store.checkpoints.synced.load(std::sync::atomic::Ordering::Acquire);
        assert!(synced >= CHECKPOINT_PAGES as i32, "the pages known synced stayed at {synced}");
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_are_encoded_in_one_buffer_that_does_not_keep_a_big_one() {
        let dir = std::env::temp_dir().join(format!("cr-store-buffer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        let mut big = job("big");
        std::sync::Arc::make_mut(&mut big.spec).prompt = "p".repeat(2 * RECORD_BUFFER_KEPT);
        let (small, other) = (job("small"), job("other"));
        store.apply(&Writes { saves: vec![small.clone().into(), big.clone().into(), other.clone().into()], forgets: vec![], alerts: None }).unwrap();
        // Each record whole and alone, though written through the same buffer.
        assert_eq!(store.load_one("small").unwrap().unwrap(), small);
        assert_eq!(store.load_one("big").unwrap().unwrap(), big);
        assert_eq!(store.load_one("other").unwrap().unwrap(), other);
        assert_eq!(store.record.capacity(), 0, "a big record's buffer is let go");
        store.apply(&Writes { saves: vec![small.clone().into()], forgets: vec![], alerts: None }).unwrap();
        assert!(store.record.capacity() > 0 && store.record.capacity() <= RECORD_BUFFER_KEPT);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
