//! What the agent keeps on disk so that nothing is lost and nothing runs twice, in one
//! record file per job slot (`DATA_DIR/records/<n>`, framed by [`agent_core::record`]),
//! overwritten in place — a job's records cost an in-place write and an `fdatasync`,
//! never a file created, synced and deleted (a slot's file is made at its first use, its
//! name synced into `records/` then: [`Spool::slot_file`]):
//!
//! - "started", per job: its id and its order's nonce, written (and synced) into a free
//!   slot's record before Claude gets its prompt ([`Spool::started`]). A started record
//!   without its result, found at start-up, is a job an agent died running: it is reported
//!   lost (a result bound to the nonce kept), never started again — the edge may not
//!   have heard that it started, and would otherwise send it again;
//! - results, until the edge acknowledges them: kept — their payload, MACed again with
//!   each connection's key as it is sent ([`StoredResult`]), sealed on the disk with the
//!   agent's own key ([`Seal`]) — from the moment
//!   they are sent ([`Spool::sending`], in memory), and written (and synced) into the
//!   job's slot beside its started record while they travel ([`Spool::write_sent`]), so a
//!   dropped connection or an agent restart loses nothing; after reconnecting the agent
//!   names them in its hello and sends them again. (Sending first costs nothing in
//!   safety: a power cut during the sync loses the result either way unless the edge got
//!   it, and now it may have.) The acknowledgement clears the slot's started record
//!   (unsynced: a result found again after a power cut is sent again, and the edge
//!   acknowledges a result of an ended job without changing it);
//! - a slot whose result is still unacknowledged when a new job needs a slot has that
//!   result moved to a spool file of its own (`DATA_DIR/spool/<job>.json`, synced) first:
//!   only when the edge is slow to acknowledge;
//! - a result that cannot be written (a full or read-only disk) is kept in memory instead
//!   — named and sent the same way — and written to a spool file when the disk allows;
//!   until then, or its acknowledgement, its slot keeps the job's started record (a new job
//!   takes another), so an agent that dies meanwhile reports the job lost, not forgotten.
//!
//! Older agents kept a marker file per job (`DATA_DIR/started/<job>`) and a spool file per
//! result: both are still read at start-up, so an agent upgraded in place loses nothing.

use crate::files::{open_plain, write_atomically};
use agent_core::record::{self, Region};
use shared::envelope::{Domain, Envelope, Tagged};
use shared::protocol::ResultReport;
use shared::job::JobResult;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// A result as the spool keeps it: the payload of its [`ResultReport`],
/// exactly as first sent. Protocol 9 MACs it with each connection's key as it goes out
/// (a reconnect brings a new key), so no MAC is kept. A protocol-8 agent kept the signed
/// envelope (`{"payload": …, "sig": …}`): it reads as this, its signature left unread,
/// so an agent upgraded in place sends what the older one kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredResult {
    pub payload: String,
    /// When an edge first answered "not taken" for it ([`Spool::not_taken`]): the agent
    /// gives it up [`crate::agent::NOT_TAKEN_KEPT_MS`] later, counted across its restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_taken: Option<shared::Millis>,
}

impl StoredResult {
    pub fn of(report: &ResultReport) -> StoredResult {
        StoredResult { payload: serde_json::to_string(report).expect("results serialise"), not_taken: None }
    }
}

/// The field of a written result that holds [`StoredResult::not_taken`], beside its
/// payload and MAC. Outside the MAC, so the format stays one the agent of before reads (it
/// ignores a field it does not know, and this one reads its files, which lack it): a job
/// that can change it can remove the result itself, and a time ahead of the clock is
/// read as now.
const NOT_TAKEN_FIELD: &str = "not_taken_ms";

/// What proves a result read back from the disk is one this agent kept. A job that runs
/// commands runs as the agent's user and can write `DATA_DIR`; under protocol 8 a kept
/// result carried the agent's signature, which the edge checked, so another job's result
/// changed on the disk was refused. Protocol 9 MACs a result with each connection's key as
/// it goes out, so the spool seals what it writes itself: an HMAC-SHA256 under a key
/// derived from the agent's signing key (which such a job cannot read when the key comes
/// from a file only root reads, README), checked before a kept result is sent again. A
/// protocol-8 agent's records are checked against its signature instead.
pub struct Seal {
    key: shared::link::MacKey,
    own: ed25519_dalek::VerifyingKey,
}

impl Seal {
    pub fn new(agent_key: &ed25519_dalek::SigningKey) -> Seal {
        Seal { key: kept_key(agent_key, b"claude-runner/v9/spool-seal-key"), own: agent_key.verifying_key() }
    }

    /// A result as it is written: its payload and its MAC, the connections' [`Tagged`]
    /// form under the seal's own key and domain.
    fn sealed(&self, result: &StoredResult) -> serde_json::Value {
        let mut written = serde_json::to_value(Tagged::seal_text(Domain::KeptResult, result.payload.clone(), &self.key)).expect("results serialise");
        if let (Some(at), Some(fields)) = (result.not_taken, written.as_object_mut()) {
            fields.insert(NOT_TAKEN_FIELD.into(), at.into());
        }
        written
    }

    fn sealed_bytes(&self, result: &StoredResult) -> Vec<u8> {
        serde_json::to_vec(&self.sealed(result)).expect("results serialise")
    }

    /// A result read back as `job_id`'s (and, from its slot, as the result of the order
    /// `order_nonce`): its payload if the seal (or, written by a protocol-8 agent, the
    /// signature) is this agent's and the payload is that job's (the seal vouches for a
    /// payload, not for the name it is kept under: another job's sealed result copied here
    /// would be sent for this one at each reconnect, acknowledged as the other's, and this
    /// job never reported lost); `None` for anything else — changed on the disk, moved, or
    /// not a kept result at all.
    fn open(&self, written: serde_json::Value, job_id: &str, order_nonce: Option<&str>) -> Option<StoredResult> {
        #[derive(serde::Deserialize)]
        struct Written {
            payload: String,
            mac: Option<String>,
            sig: Option<String>,
            #[serde(default, rename = "not_taken_ms")]
            not_taken: Option<shared::Millis>,
        }
        let Written { payload, mac, sig, not_taken } = serde_json::from_value(written).ok()?;
        let report: ResultReport = match (mac, sig) {
            (Some(mac), None) => Tagged { payload: payload.clone(), mac }.open(Domain::KeptResult, &self.key).ok()?,
            (None, Some(sig)) => Envelope { payload: payload.clone(), sig }.open(Domain::Result, &self.own).ok()?,
            _ => return None,
        };
        let its = report.job_id == job_id && order_nonce.is_none_or(|nonce| report.order_nonce == nonce);
        its.then_some(StoredResult { payload, not_taken })
    }

    fn open_bytes(&self, bytes: &[u8], job_id: &str) -> Option<StoredResult> {
        self.open(serde_json::from_slice(bytes).ok()?, job_id, None)
    }
}

/// The key that seals one kind of what the agent keeps on its disk (`use_of` names it:
/// kept results, session records): derived from the agent's signing key, not its bytes
/// themselves — one key, one use — so it is as far out of a job's reach as that key is.
pub fn kept_key(agent_key: &ed25519_dalek::SigningKey, use_of: &[u8]) -> shared::link::MacKey {
    shared::link::MacKey::from_bytes(shared::link::MacKey::from_bytes(agent_key.to_bytes()).tag(use_of, &[]))
}

/// More record files than this in `DATA_DIR/records` are not the agent's.
const MAX_SLOT_FILES: usize = 4096;

pub struct Spool {
    dir: PathBuf,
    /// Older agents' "started" markers, one file per job.
    started: PathBuf,
    records: PathBuf,
    seal: Seal,
    kept: Mutex<Kept>,
    /// The slot record files, kept open for writing once opened (a job's three writes
    /// opened and closed the file each time).
    open: Mutex<Vec<Option<std::sync::Arc<std::fs::File>>>>,
    /// Run by [`Spool::started`] right before it writes its record: tests hold the write
    /// there to put the job's end before it.
    #[cfg(test)]
    before_record: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Results kept in memory, and what each slot's record file holds.
#[derive(Default)]
struct Kept {
    /// Results the disk refused, until it takes them.
    held: BTreeMap<String, StoredResult>,
    /// Results sent and being written: until [`Spool::write_sent`] is done with one, an
    /// acknowledgement takes it from here, and the write then undoes what it made.
    writing: BTreeMap<String, StoredResult>,
    slots: Vec<Slot>,
    /// The jobs that may have a spool file (`DATA_DIR/spool/<job>.json`): every one found
    /// at the start, and every one written since. A superset, so that a job without one —
    /// nearly every job — is looked for in memory only, not on disk as well.
    filed: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Its record holds nothing anyone needs.
    Free,
    /// A job's started record being written ([`Spool::started`]), which alone moves the
    /// slot on once the write is done: to [`Slot::Started`], or — the write failed, or
    /// the job ended meanwhile (`ended`: its start stuck on the disk, its result came,
    /// [`Spool::write_sent`]) — cleared and free. Nothing else writes the slot meanwhile:
    /// a record that lands after its job's result was kept and acknowledged left a stale
    /// started record (a restart reported the job lost, or sent its result again), and a
    /// failed one freed a slot that held that result (review rev39-4).
    Recording { claim: record::Started, ended: bool },
    /// A job's durable started record, no result yet.
    Started(record::Started),
    /// A job's started record and its result, until the edge acknowledges it.
    Holding { job_id: String, result: StoredResult },
    /// A job's started record, its result held in memory (the record refused it) until
    /// it is in a spool file or acknowledged: the record stays, so that an agent dying
    /// meanwhile reports the job lost rather than forgetting it.
    Held(String),
    /// Acknowledged, its record being cleared — or its result moving to a spool file
    /// ([`Spool::not_taken`]): no new job may take it until it is free, or the clearing
    /// would overwrite that job's started record.
    Clearing,
}

/// A job an earlier run of the agent started and did not finish: its id and the nonce of
/// its order, which the "lost" result that reports it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    pub job_id: String,
    pub order_nonce: String,
}

/// Why a job's started record was not written ([`Spool::started`]).
#[derive(Debug, thiserror::Error)]
pub enum NotRecorded {
    /// The job's own order cannot be recorded (its id is no plain name, its nonce too long
    /// for a record): refused before anything is written, and no want of the agent's —
    /// the job fails alone.
    #[error("{0}")]
    Order(&'static str),
    /// The records refused the write (or a held result's move to a spool file that makes
    /// room for it): whatever the error, the agent's want, never the job's — the record
    /// file is the slot's, named by no job, and what is written there is bounded first.
    #[error("{0}")]
    Records(#[from] std::io::Error),
}

/// Job ids become file names: only plain ids are allowed.
fn safe_id(id: &str) -> bool {
    shared::ids::plain_id(id, shared::ids::MAX_JOB_ID)
}

/// The result of a job an earlier run of the agent started and did not finish. Whether
/// it may be sent again is left unsaid (`retryable` unset): the started record does not
/// say whether the job asked for a push, which may have landed before the agent died;
/// the edge, which has the job, decides (`edge_core::record::push_may_have_landed`).
pub fn interrupted() -> JobResult {
    JobResult::lost("the agent stopped (it crashed or was killed) while this job ran; it was not run again: run the task again or elsewhere", 0)
}

/// An older agent's marker holds its order's nonce, a short line; more is not one.
const MAX_MARKER_BYTES: usize = 1024;

/// A spool file's bytes, read as a file the agent keeps ([`crate::files::read_plain`]):
/// a job can put a pipe or a link to anything in its place, and the spool files are read
/// at every connection, on the runtime thread.
fn read_kept(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    crate::files::read_plain(path, record::MAX_PAYLOAD, "spooled result")
}

/// Reads the record at `at` (nothing there, or a short file, reads as no record).
fn read_region(file: &std::fs::File, at: u64) -> std::io::Result<Region> {
    let mut header = vec![0; record::HEADER_BYTES];
    let got = read_up_to(file, &mut header, at)?;
    header.truncate(got);
    let Some(total) = record::length(&header) else { return Ok(record::decode(&header)) };
    let mut whole = vec![0; total];
    let got = read_up_to(file, &mut whole, at)?;
    whole.truncate(got);
    Ok(record::decode(&whole))
}

fn read_up_to(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl Spool {
    /// Opens the spool: results in `dir`, older agents' markers in `started`, the slot
    /// records in `records` (at least `slots` of them as jobs need them). Returns the
    /// spool and the jobs a dead agent left started without a result: the agent reports
    /// each lost ([`interrupted`], [`Spool::put`], which keeps it in the job's
    /// slot, or for an older agent's marker in a spool file, and removes the marker).
    pub fn open(dir: PathBuf, started: PathBuf, records: PathBuf, slots: usize, seal: Seal) -> std::io::Result<(Spool, Vec<Interrupted>)> {
        // A folder made here (and the parents made with it) is named in its parent: synced,
        // or a power cut could take the folder with the results and records later made
        // durable in it. (Older agents' markers are only read and removed: nothing in
        // `started` must survive a power cut.)
        for folder in [&dir, &records] {
            let made = crate::files::private_dir(folder)?;
            crate::files::sync_up(folder.parent(), made)?;
        }
        crate::files::private_dir(&started)?;
        // A crash's half-written results (opened by the agent holding DATA_DIR's lock).
        crate::files::remove_leftovers(&dir);
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&records)? {
            let entry = entry?;
            match entry.file_name().to_str().and_then(|n| n.parse::<usize>().ok()).filter(|n| *n < MAX_SLOT_FILES) {
                Some(n) if entry.file_name().to_str() == Some(&n.to_string()) => found.push(n),
                _ => tracing::warn!(path = %entry.path().display(), "a file in the records folder that is not a slot record, left alone"),
            }
        }
        let count = found.iter().map(|n| n + 1).max().unwrap_or(0).max(slots.max(1));
        let mut kept = Kept { slots: vec![Slot::Free; count], ..Kept::default() };
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                kept.filed.insert(id.to_string());
            }
        }
        // Records of jobs started without a result yet: lost, unless kept elsewhere.
        let mut unfinished = Vec::new();
        for n in found {
            let path = records.join(n.to_string());
            let file = open_plain(&path, false, "slot record")?;
            match read_region(&file, record::STARTED_AT)? {
                Region::Started(started) => match read_region(&file, record::RESULT_AT)? {
                    Region::Finished(f) if f.job_id == started.job_id && f.order_nonce == started.order_nonce => {
                        match seal.open(f.envelope, &started.job_id, Some(&started.order_nonce)) {
                            Some(result) => kept.slots[n] = Slot::Holding { job_id: started.job_id, result },
                            None => {
                                // Changed on the disk (its frame's checksum is no seal): not
                                // sent as the agent's; the job is reported lost instead.
                                tracing::warn!(job_id = %started.job_id, path = %path.display(), "a kept result whose seal is not this agent's, or that is another job's, is not sent; its job is reported lost");
                                unfinished.push((n, started))
                            }
                        }
                    }
                    // Torn, empty, or an earlier job's: this job's result never became durable.
                    _ => unfinished.push((n, started)),
                },
                Region::Torn => {
                    tracing::info!(path = %path.display(), "a slot record cut short (a power cut while it was written): its job never got its prompt, or its result was acknowledged; nothing is owed")
                }
                Region::Empty | Region::Finished(_) => {}
            }
        }
        let spool = Spool {
            dir,
            started,
            records,
            seal,
            kept: Mutex::new(kept),
            open: Mutex::new(Vec::new()),
            #[cfg(test)]
            before_record: Mutex::new(None),
        };
        // A result moved to a spool file whose slot was not reused before the agent
        // stopped is kept twice: the file's copy stays.
        let doubled: Vec<usize> = {
            let kept = spool.lock();
            (0..kept.slots.len())
                .filter(|n| matches!(&kept.slots[*n], Slot::Holding { job_id, .. } if spool.path(job_id).is_some_and(|p| p.exists())))
                .collect()
        };
        for n in doubled {
            spool.clear(n);
        }
        let mut interrupted_jobs = Vec::new();
        for (n, started) in unfinished {
            if spool.has(&started.job_id) {
                // Its result was kept in a spool file after all (held in memory, then written).
                spool.clear(n);
                continue;
            }
            tracing::warn!(job_id = %started.job_id, "a job was running when the agent stopped; it is reported lost, not run again");
            interrupted_jobs.push(Interrupted { job_id: started.job_id.clone(), order_nonce: started.order_nonce.clone() });
            spool.lock().slots[n] = Slot::Started(started);
        }
        // Older agents' markers.
        for entry in std::fs::read_dir(&spool.started)?.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|id| safe_id(id)) else { continue };
            if spool.has(id) || interrupted_jobs.iter().any(|j| j.job_id == id) {
                spool.finished(id);
                continue;
            }
            tracing::warn!(job_id = id, "a job was running when the agent stopped; it is reported lost, not run again");
            // Written by an older agent: its order's nonce, a short plain line.
            let nonce = crate::files::read_plain(&entry.path(), MAX_MARKER_BYTES, "started marker").unwrap_or_default();
            let nonce = shared::text::truncate(String::from_utf8_lossy(&nonce).trim(), shared::ids::MAX_JOB_ID + 16).to_string();
            interrupted_jobs.push(Interrupted { job_id: id.to_string(), order_nonce: nonce });
        }
        Ok((spool, interrupted_jobs))
    }

    fn path(&self, job_id: &str) -> Option<PathBuf> {
        safe_id(job_id).then(|| self.dir.join(format!("{job_id}.json")))
    }

    fn slot_path(&self, n: usize) -> PathBuf {
        self.records.join(n.to_string())
    }

    /// Writes `bytes` at `at` in slot `n`'s record file (made on its first use), synced
    /// when `durable`. In place: once the file has its blocks, a sync writes only them.
    fn write_slot(&self, n: usize, at: u64, bytes: &[u8], durable: bool) -> std::io::Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            let file = self.slot_file(n)?;
            let written = (|| {
                file.write_all_at(bytes, at)?;
                if durable {
                    file.sync_data()?;
                }
                // Kept open, the file could have been removed (or replaced) under the agent
                // since it was opened: a record written there would be found by no restart.
                use std::os::unix::fs::MetadataExt;
                if file.metadata()?.nlink() == 0 {
                    let path = self.slot_path(n);
                    return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} was removed while the agent ran", path.display())));
                }
                Ok(())
            })();
            let Err(e) = written else { return Ok(()) };
            // Opened again for the next write: the file may have been made again, the disk
            // repaired. A removed file is made again at once, and written once more.
            if let Some(kept) = self.open.lock().expect("slot files lock").get_mut(n) {
                *kept = None;
            }
            if tries > 1 || e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
        }
    }

    /// Slot `n`'s record file, open for writing: made on its first use, never through a
    /// link (a record is written only into the slot's own file).
    fn slot_file(&self, n: usize) -> std::io::Result<std::sync::Arc<std::fs::File>> {
        let mut open = self.open.lock().expect("slot files lock");
        if open.len() <= n {
            open.resize(n + 1, None);
        }
        if let Some(file) = &open[n] {
            return Ok(file.clone());
        }
        let file = std::sync::Arc::new(open_plain(&self.slot_path(n), true, "slot record")?);
        // Its name is the records folder's, which a record's sync does not write: synced as
        // the file is first opened (made, for a new slot), or a power cut could take the
        // file and the started record synced into it — its job then never reported lost,
        // and run again. Once per slot for the agent's run (again after a failed write),
        // never per job.
        crate::files::sync_folder(&self.records)?;
        open[n] = Some(file.clone());
        Ok(file)
    }

    /// Slot `n` owes nothing any more: its started record is cleared (not synced: see the
    /// module) and the slot is free. The caller holds the slot while it is cleared (its
    /// job's started claim, or [`Slot::Clearing`]), so that no other job writes it meanwhile.
    fn clear(&self, n: usize) {
        let _ = self.write_slot(n, record::STARTED_AT, &record::CLEARED, false);
        self.lock().slots[n] = Slot::Free;
    }

    /// The job whose started record this is never started after all (Claude could not be
    /// spawned: it goes back to the edge unstarted): its record is cleared, so a restart
    /// does not report it lost, and its slot is free. Or its start was recorded only after
    /// the job ended (`runner::run_claude`): a result of the job's already kept (being
    /// written into the slot, or held) owns the slot, and is left to clear it. Never asked
    /// while the record is still being written ([`Slot::Recording`]): each caller comes
    /// after [`Spool::started`] returned — on its thread (`process::run`'s `unready`), or
    /// after a run that waited for that thread; a run cut short while the record was
    /// written (the job ended first) leaves it to that `unready`.
    pub fn unstart(&self, job_id: &str) {
        let n = {
            let mut kept = self.lock();
            if Self::in_memory(&kept, job_id).is_some() {
                return;
            }
            let Some(n) = Self::slot_of(&kept, job_id) else { return };
            kept.slots[n] = Slot::Clearing;
            n
        };
        self.clear(n);
    }

    /// Marks `job_id`'s started record, if it is still being written, as its ended job's:
    /// [`Spool::started`] clears it once written. Whether it was being written.
    fn recording_ends(kept: &mut Kept, job_id: &str) -> bool {
        let recording = kept.slots.iter_mut().find_map(|s| match s {
            Slot::Recording { claim, ended } if claim.job_id == job_id => Some(ended),
            _ => None,
        });
        recording.map(|ended| *ended = true).is_some()
    }

    fn slot_of(kept: &Kept, job_id: &str) -> Option<usize> {
        kept.slots.iter().position(|s| matches!(s, Slot::Started(r) if r.job_id == job_id))
    }

    /// Writes (and syncs) the record that says this job's Claude may be running, holding
    /// its order's nonce, into a free slot. Nothing may start without it. A job that ended
    /// while it was written (its start stuck on the disk) has it cleared once written.
    pub fn started(&self, job_id: &str, order_nonce: &str) -> Result<(), NotRecorded> {
        if !safe_id(job_id) {
            return Err(NotRecorded::Order("unsafe job id"));
        }
        let claim = record::Started { job_id: job_id.to_string(), order_nonce: order_nonce.to_string() };
        let bytes = record::started(&claim);
        if bytes.len() as u64 > record::RESULT_AT {
            return Err(NotRecorded::Order("the order's nonce is too long to record"));
        }
        let (n, moved) = {
            let mut kept = self.lock();
            let free = kept.slots.iter().position(|s| *s == Slot::Free);
            let holding = kept.slots.iter().position(|s| matches!(s, Slot::Holding { .. }));
            match (free, holding) {
                (Some(n), _) => {
                    kept.slots[n] = Slot::Recording { claim, ended: false };
                    (n, None)
                }
                (None, Some(n)) => {
                    let Slot::Holding { job_id: other, result } = std::mem::replace(&mut kept.slots[n], Slot::Recording { claim, ended: false }) else {
                        unreachable!("a holding slot")
                    };
                    // Still named and found while it moves; an acknowledgement takes it.
                    kept.writing.insert(other.clone(), result.clone());
                    (n, Some((other, result)))
                }
                (None, None) => {
                    // More jobs at once than slots (AGENT_SLOTS lowered under a running
                    // agent's records, or a slot still being cleared): one more record file.
                    kept.slots.push(Slot::Recording { claim, ended: false });
                    (kept.slots.len() - 1, None)
                }
            }
        };
        if let Some((other, result)) = moved {
            if let Err(e) = self.move_out(&other, &result) {
                // It stays in its slot (unless acknowledged meanwhile); this job does not start.
                let mut kept = self.lock();
                kept.slots[n] = match kept.writing.remove(&other) {
                    Some(_) => Slot::Holding { job_id: other, result },
                    None => Slot::Free,
                };
                return Err(e.into());
            }
        }
        #[cfg(test)]
        if let Some(hold) = self.before_record.lock().expect("test hook").take() {
            hold();
        }
        let written = self.write_slot(n, record::STARTED_AT, &bytes, true);
        let mut kept = self.lock();
        let recorded = match std::mem::replace(&mut kept.slots[n], Slot::Clearing) {
            Slot::Recording { claim, ended: false } if written.is_ok() => {
                kept.slots[n] = Slot::Started(claim);
                return Ok(());
            }
            Slot::Recording { ended, .. } => {
                if ended {
                    tracing::info!(job_id, slot = n, "a started record written after its job ended is cleared");
                }
                written
            }
            // Only this start moves a recording slot on.
            other => {
                kept.slots[n] = other;
                return written.map_err(Into::into);
            }
        };
        drop(kept);
        // A record made for a job that ended, or whose write failed part way (its bytes
        // may be there all the same): cleared, so no restart reports the job lost.
        self.clear(n);
        recorded.map_err(Into::into)
    }

    /// The test write of the started records, which an agent held back for their want
    /// takes work again after (`runner::job_folders_take_writes`): a new file in their
    /// folder, and the write the next job's start makes — into the first free slot's
    /// record file, in place and synced (the cleared record a free slot holds), claimed
    /// meanwhile as a clearing is; with no slot free, a file in the spool folder, where
    /// that start moves a held result to. A failing record file of its own (a folder or a
    /// link put in its place, a stale handle) takes no job's start, while a new file in
    /// the folder is written: tried by the folder alone, the agent took work again at once
    /// and the job went round.
    /// The error names the folder or the record file that took no write.
    pub fn takes_writes(&self) -> std::io::Result<()> {
        let named = |path: &std::path::Path, e: std::io::Error| match e.to_string().contains(&*path.to_string_lossy()) {
            true => e,
            false => std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        };
        crate::files::probe_write(&self.records).map_err(|e| named(&self.records, e))?;
        let free = {
            let mut kept = self.lock();
            let free = kept.slots.iter().position(|s| *s == Slot::Free);
            if let Some(n) = free {
                kept.slots[n] = Slot::Clearing;
            }
            free
        };
        let Some(n) = free else { return crate::files::probe_write(&self.dir).map_err(|e| named(&self.dir, e)) };
        let written = self.write_slot(n, record::STARTED_AT, &record::CLEARED, true);
        self.lock().slots[n] = Slot::Free;
        written.map_err(|e| named(&self.slot_path(n), e))
    }

    /// Moves a result out of its slot into a spool file (synced, its folder too), unless
    /// the edge acknowledges it meanwhile.
    fn move_out(&self, job_id: &str, result: &StoredResult) -> std::io::Result<()> {
        let path = self.path(job_id).ok_or_else(|| std::io::Error::other("unsafe job id"))?;
        self.lock().filed.insert(job_id.to_string());
        let written = write_atomically(&path, &self.seal.sealed_bytes(result), true).and_then(|()| crate::files::sync_folder(&self.dir));
        let mut kept = self.lock();
        if !kept.writing.contains_key(job_id) {
            // Acknowledged meanwhile: the file is not needed.
            drop(kept);
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        if written.is_ok() {
            // From now on the file keeps it (a failed write leaves it to the caller).
            kept.writing.remove(job_id);
            tracing::info!(job_id, "a result the edge has not acknowledged yet moved from its slot to a spool file");
        }
        written
    }

    /// Older agents' marker for the job goes.
    fn finished(&self, job_id: &str) {
        let _ = std::fs::remove_file(self.started.join(job_id));
    }

    /// Keeps a result until the edge acknowledges it. If the disk refuses it, it is kept
    /// in memory (and the error returned, for the agent to report); either way it is
    /// named in the next hello and sent again.
    pub fn put(&self, job_id: &str, result: &StoredResult) -> std::io::Result<()> {
        self.sending(job_id, result);
        self.write_sent(job_id)
    }

    /// Keeps a result in memory from now on (named in a hello, found by [`Spool::get`]),
    /// before it is sent; [`Spool::write_sent`] then puts it on disk.
    pub fn sending(&self, job_id: &str, result: &StoredResult) {
        self.lock().writing.insert(job_id.to_string(), result.clone());
    }

    /// Writes (and syncs) a result kept by [`Spool::sending`] into its job's slot (a job
    /// without one — an older agent's, or one whose start could not be recorded — into a
    /// spool file), unless the edge has acknowledged it meanwhile. An error means the disk
    /// refused it: it stays in memory, named and sent until acknowledged.
    pub fn write_sent(&self, job_id: &str) -> std::io::Result<()> {
        if !safe_id(job_id) {
            self.lock().writing.remove(job_id);
            return Err(std::io::Error::other("unsafe job id"));
        }
        let (result, slot) = {
            let mut kept = self.lock();
            // Its start still being recorded (stuck on the disk while the job ended): the
            // record is cleared once written, and the result goes to a spool file, as a
            // job's without a slot.
            Self::recording_ends(&mut kept, job_id);
            let slot = Self::slot_of(&kept, job_id).map(|n| match &kept.slots[n] {
                Slot::Started(r) => (n, r.order_nonce.clone()),
                _ => unreachable!("slot_of finds started slots"),
            });
            (kept.writing.get(job_id).cloned(), slot)
        };
        match (result, slot) {
            (None, Some((n, _))) => {
                // Acknowledged before it was written.
                self.clear(n);
                Ok(())
            }
            (None, None) => {
                self.finished(job_id);
                Ok(())
            }
            (Some(result), Some((n, order_nonce))) => {
                let envelope = self.seal.sealed(&result);
                let bytes = record::finished(&record::Finished { job_id: job_id.to_string(), order_nonce, envelope });
                let written = self.write_slot(n, record::RESULT_AT, &bytes, true);
                let mut kept = self.lock();
                // The copy in memory, which may have been answered "not taken" meanwhile.
                let Some(result) = kept.writing.remove(job_id) else {
                    // Acknowledged while it was written: the slot owes nothing.
                    drop(kept);
                    self.clear(n);
                    return Ok(());
                };
                match written {
                    Ok(()) => {
                        kept.slots[n] = Slot::Holding { job_id: job_id.to_string(), result };
                        tracing::debug!(job_id, slot = n, "result kept in its slot record until the edge acknowledges it");
                    }
                    Err(_) => {
                        // Kept in memory; the slot and its started record stay until the
                        // result is durable elsewhere (a restart before then reports the
                        // job lost).
                        kept.held.insert(job_id.to_string(), result);
                        kept.slots[n] = Slot::Held(job_id.to_string());
                    }
                }
                written
            }
            (Some(result), None) => {
                let path = self.path(job_id).expect("a safe id");
                self.lock().filed.insert(job_id.to_string());
                // A result is the one thing that must outlive anything: fsync it.
                let written = write_atomically(&path, &self.seal.sealed_bytes(&result), true);
                let mut kept = self.lock();
                let written = if kept.writing.remove(job_id).is_none() {
                    // Acknowledged while it was written: the file is not needed.
                    let _ = std::fs::remove_file(&path);
                    Ok(())
                } else {
                    if written.is_err() {
                        kept.held.insert(job_id.to_string(), result);
                    }
                    written
                };
                drop(kept);
                self.finished(job_id);
                written
            }
        }
    }

    /// When an edge first answered "not taken" for `job_id`'s kept result, and whether that
    /// is now: the time kept with the result, or `now`, which is then kept with it. So the
    /// time it is kept for ([`crate::agent::NOT_TAKEN_KEPT_MS`]) runs on across restarts of
    /// the agent. A result in its job's slot moves to a spool file of its own for that
    /// (written whole and renamed into place, the slot freed: never the one copy rewritten
    /// in place, where a power cut could tear it; a result no edge takes is kept long, and
    /// a slot is for the jobs running); one the disk refuses keeps the time in memory, as it
    /// keeps the result. None: no such result is kept (acknowledged meanwhile).
    pub fn not_taken(&self, job_id: &str, now: shared::Millis) -> Option<(shared::Millis, bool)> {
        if !safe_id(job_id) {
            return None;
        }
        // Dated ahead of the clock (a job can write the file): read as now.
        let first = |result: &mut StoredResult| match result.not_taken {
            Some(at) => (at.min(now), false),
            None => {
                result.not_taken = Some(now);
                (now, true)
            }
        };
        let (mut result, slot) = {
            let mut kept = self.lock();
            // In memory only: the disk refuses it, or it is being written.
            if let Some(result) = kept.held.get_mut(job_id) {
                return Some(first(result));
            }
            if let Some(result) = kept.writing.get_mut(job_id) {
                return Some(first(result));
            }
            match kept.slots.iter().position(|s| matches!(s, Slot::Holding { job_id: id, .. } if id == job_id)) {
                Some(n) => {
                    // Still named and found while it moves; an acknowledgement takes it.
                    let Slot::Holding { result, .. } = std::mem::replace(&mut kept.slots[n], Slot::Clearing) else { unreachable!("a holding slot") };
                    (result, Some(n))
                }
                None if kept.filed.contains(job_id) => {
                    drop(kept);
                    let mut result = self.get(job_id)?;
                    let since = first(&mut result);
                    if !since.1 {
                        return Some(since);
                    }
                    let mut kept = self.lock();
                    if !kept.filed.contains(job_id) {
                        return None;
                    }
                    kept.writing.insert(job_id.to_string(), result.clone());
                    drop(kept);
                    if let Err(e) = self.move_out(job_id, &result) {
                        // The file stays as it was; the next answer tries again.
                        self.lock().writing.remove(job_id);
                        tracing::warn!(job_id, error = %e, "could not keep when this result was first not taken with it: counted from the next answer after a restart");
                    }
                    return Some(since);
                }
                None => return None,
            }
        };
        let since = first(&mut result);
        self.lock().writing.insert(job_id.to_string(), result.clone());
        let moved = self.move_out(job_id, &result);
        let n = slot.expect("from a slot");
        match moved {
            Ok(()) => self.clear(n),
            Err(e) => {
                tracing::warn!(job_id, error = %e, "could not move a result not taken to a spool file: it stays in its slot, when it was first not taken kept in memory only");
                let mut kept = self.lock();
                match kept.writing.remove(job_id) {
                    Some(result) => kept.slots[n] = Slot::Holding { job_id: job_id.to_string(), result },
                    None => {
                        drop(kept);
                        self.clear(n);
                    }
                }
            }
        }
        Some(since)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().expect("spool lock")
    }

    fn in_memory(kept: &Kept, job_id: &str) -> Option<StoredResult> {
        if let Some(r) = kept.held.get(job_id).or_else(|| kept.writing.get(job_id)) {
            return Some(r.clone());
        }
        kept.slots.iter().find_map(|s| match s {
            Slot::Holding { job_id: id, result } if id == job_id => Some(result.clone()),
            _ => None,
        })
    }

    pub fn has(&self, job_id: &str) -> bool {
        {
            let kept = self.lock();
            if Self::in_memory(&kept, job_id).is_some() {
                return true;
            }
            if !kept.filed.contains(job_id) {
                return false;
            }
        }
        self.path(job_id).is_some_and(|p| p.exists())
    }

    /// A kept result, if there is one.
    pub fn get(&self, job_id: &str) -> Option<StoredResult> {
        {
            let kept = self.lock();
            if let Some(r) = Self::in_memory(&kept, job_id) {
                return Some(r);
            }
            if !kept.filed.contains(job_id) {
                return None;
            }
        }
        self.seal.open_bytes(&read_kept(&self.path(job_id)?).ok()?, job_id)
    }

    /// The edge has the result: it goes (from memory, from its slot, from a spool file,
    /// and from a write under way).
    pub fn remove(&self, job_id: &str) {
        match self.acknowledged(job_id) {
            Some(n) => self.clear(n),
            // Only a job that may have a spool file has one to remove (a write of one under
            // way removes it itself, seeing the acknowledgement).
            None if self.lock().filed.remove(job_id) => {
                if let Some(path) = self.path(job_id) {
                    let _ = std::fs::remove_file(path);
                }
            }
            None => {}
        }
    }

    /// An acknowledgement's decision, under the lock: the result goes from memory, and the
    /// slot holding it (if one does) is returned for its record to be cleared — marked
    /// clearing meanwhile, so that a job starting before the clear is done takes another.
    fn acknowledged(&self, job_id: &str) -> Option<usize> {
        let mut kept = self.lock();
        kept.held.remove(job_id);
        kept.writing.remove(job_id);
        let n = kept.slots.iter().position(|s| matches!(s, Slot::Holding { job_id: id, .. } | Slot::Held(id) if id == job_id))?;
        kept.slots[n] = Slot::Clearing;
        Some(n)
    }

    /// Results held in memory, still waiting for the disk.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether any result is kept — in memory, in a slot, or as a spool file (named, not
    /// opened) — without reading one: asked at every disconnect (the reconnect delay is
    /// capped while the agent holds work), where [`Spool::all`] would open and decrypt
    /// every kept result, up to the whole spool each time.
    pub fn keeps_any(&self) -> bool {
        let maybe_filed = {
            let kept = self.lock();
            let in_a_slot = kept.slots.iter().any(|s| matches!(s, Slot::Holding { .. } | Slot::Held(_)));
            if in_a_slot || !kept.held.is_empty() || !kept.writing.is_empty() {
                return true;
            }
            !kept.filed.is_empty()
        };
        // The folder's names, not `filed`: that is a superset (a name found at the start
        // and moved aside since, a file removed as its result was acknowledged while it was
        // written), which would say "kept" for as long as the agent runs. The folder also
        // holds files left by an agent before this one, not yet read by a hello.
        match std::fs::read_dir(&self.dir) {
            Ok(d) => d.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json"))),
            Err(_) => maybe_filed,
        }
    }

    /// The jobs whose results are kept, sorted: those [`Spool::all`] returns, named without
    /// opening a file — asked at every heartbeat ([`shared::protocol::Beat::finished`]).
    /// The spool files found at the start are opened by the `all` of the first hello, before
    /// any heartbeat: one that is not the agent's is moved aside, its name forgotten.
    pub fn kept_ids(&self) -> Vec<String> {
        let (mut ids, filed) = {
            let kept = self.lock();
            let mut ids: std::collections::BTreeSet<String> = kept.held.keys().chain(kept.writing.keys()).cloned().collect();
            ids.extend(kept.slots.iter().filter_map(|s| match s {
                Slot::Holding { job_id, .. } => Some(job_id.clone()),
                _ => None,
            }));
            let filed: Vec<String> = kept.filed.iter().filter(|id| !ids.contains(*id)).cloned().collect();
            (ids, filed)
        };
        // `filed` is a superset (a result acknowledged while its file was written): a name
        // is kept while its file is there, a stat each (spool files are few: results the
        // edge is slow to acknowledge).
        ids.extend(filed.into_iter().filter(|id| self.path(id).is_some_and(|p| p.exists())));
        ids.into_iter().collect()
    }

    /// Every kept result, in slots, in spool files or held in memory (those are written to
    /// spool files first if the disk now allows). Unreadable files are moved aside rather
    /// than resent forever.
    pub fn all(&self) -> Vec<(String, StoredResult)> {
        let mut out: BTreeMap<String, StoredResult> = BTreeMap::new();
        let mut durable_now = Vec::new();
        {
            let mut kept = self.lock();
            let held: Vec<String> = kept.held.keys().cloned().collect();
            kept.filed.extend(held);
            let written: Vec<String> = kept
                .held
                .iter()
                .filter(|(id, r)| self.path(id).is_some_and(|p| write_atomically(&p, &self.seal.sealed_bytes(r), true).is_ok()))
                .map(|(id, _)| id.clone())
                .collect();
            for id in written {
                tracing::info!(job_id = %id, "a result held in memory is now on disk");
                kept.held.remove(&id);
                // Its slot's started record is needed no more once the file's name is durable.
                if let Some(n) = kept.slots.iter().position(|s| matches!(s, Slot::Held(h) if *h == id)) {
                    kept.slots[n] = Slot::Clearing;
                    durable_now.push((n, id));
                }
            }
            out.extend(kept.held.iter().map(|(id, r)| (id.clone(), r.clone())));
            out.extend(kept.writing.iter().map(|(id, r)| (id.clone(), r.clone())));
            for slot in &kept.slots {
                if let Slot::Holding { job_id, result } = slot {
                    out.insert(job_id.clone(), result.clone());
                }
            }
        }
        if !durable_now.is_empty() {
            let synced = crate::files::sync_folder(&self.dir).is_ok();
            for (n, id) in durable_now {
                if synced {
                    self.clear(n);
                } else {
                    // The file may not survive a power cut: the started record stays.
                    self.lock().slots[n] = Slot::Held(id);
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return out.into_iter().collect() };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            match read_kept(&path).ok().and_then(|b| self.seal.open_bytes(&b, id)) {
                Some(r) if safe_id(id) => {
                    self.lock().filed.insert(id.to_string());
                    out.insert(id.to_string(), r);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "a spooled result that cannot be read, whose seal is not this agent's, or that is another job's, moved aside");
                    if std::fs::rename(&path, path.with_extension("bad")).is_ok() {
                        self.lock().filed.remove(id);
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::contract::ErrorCode;
    use std::path::Path;

    use shared::protocol::ResultReport;

    /// A result as the agent keeps it: its report's payload.
    fn kept(job_id: &str, result: JobResult) -> StoredResult {
        StoredResult::of(&ResultReport { job_id: job_id.into(), order_nonce: format!("{job_id}:1"), result })
    }

    fn ok(job_id: &str, output: &str) -> StoredResult {
        kept(job_id, JobResult { success: true, output: output.into(), ..Default::default() })
    }

    /// A result as a protocol-8 agent kept it: the envelope it sent, signed.
    fn signed_by_protocol_8(job_id: &str, output: &str) -> shared::envelope::Envelope {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        shared::envelope::Envelope::seal(shared::envelope::Domain::Result, &opened(&ok(job_id, output)), &key)
    }

    fn opened(stored: &StoredResult) -> ResultReport {
        serde_json::from_str(&stored.payload).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cr-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Makes the spool folder in `dir` take no file (`refuse`: moved aside, a file in its
    /// place), or puts it back.
    fn refuse_files(dir: &Path, refuse: bool) {
        let (spool, aside) = (dir.join("spool"), dir.join("spool-aside"));
        if refuse {
            std::fs::rename(&spool, &aside).unwrap();
            std::fs::write(&spool, "").unwrap();
        } else {
            std::fs::remove_file(&spool).unwrap();
            std::fs::rename(&aside, &spool).unwrap();
        }
    }

    /// The spool as an agent with `slots` slots opens it in `dir` (its DATA_DIR).
    fn open(dir: &Path, slots: usize) -> (Spool, Vec<Interrupted>) {
        Spool::open(dir.join("spool"), dir.join("started"), dir.join("records"), slots, seal()).unwrap()
    }

    /// Whether anything is kept is known without reading a result: a file nobody has read
    /// yet counts and stays where it is (`all` would have opened it and moved it aside).
    #[test]
    fn whether_anything_is_kept_is_known_without_reading_a_result() {
        let dir = dir("keeps-any");
        let (spool, _) = open(&dir, 1);
        assert!(!spool.keeps_any());
        spool.put("job-1", &ok("job-1", "x")).unwrap();
        assert!(spool.keeps_any());
        spool.remove("job-1");
        assert!(!spool.keeps_any(), "{:?}", spool.all());
        std::fs::write(dir.join("spool/unread.json"), b"not a result").unwrap();
        assert!(spool.keeps_any());
        assert!(dir.join("spool/unread.json").exists(), "read and moved aside");
    }

    /// A file in the spool folder that is no kept result (planted by a job, changed on the
    /// disk), found at the start and moved aside by the next hello, keeps nothing: the
    /// agent holds no work for it. Its name, remembered at the start as a job that may
    /// have a spool file, said "kept" for as long as the agent ran — its reconnect delay
    /// capped at every disconnect, for good.
    #[test]
    fn a_file_moved_aside_is_no_longer_kept() {
        let dir = dir("keeps-aside");
        drop(open(&dir, 1));
        std::fs::write(dir.join("spool/planted.json"), b"not a result").unwrap();
        let (spool, _) = open(&dir, 1);
        assert!(spool.keeps_any(), "an unread file counts until a hello reads it");
        assert!(spool.all().is_empty());
        assert!(dir.join("spool/planted.bad").exists());
        assert!(!spool.keeps_any(), "a file moved aside still counted as a kept result");
        assert!(spool.kept_ids().is_empty(), "nor is it named in a heartbeat");
    }

    /// What a heartbeat names, read without opening a result: what `all` returns — in a
    /// slot, moved to a spool file, being written, filed without a slot — and not one
    /// acknowledged (nor a file `all` moved aside: `a_file_moved_aside_is_no_longer_kept`).
    #[test]
    fn the_kept_ids_are_those_all_returns() {
        let dir = dir("kept-ids");
        let (spool, _) = open(&dir, 1);
        let named = |expected: &[&str]| {
            assert_eq!(spool.kept_ids(), expected);
            assert_eq!(spool.kept_ids(), ids(spool.all()));
        };
        spool.started("moved", "moved:1").unwrap();
        spool.put("moved", &ok("moved", "x")).unwrap();
        named(&["moved"]);
        // A new job takes the slot ("moved" goes to a spool file), its result being written.
        spool.started("sending", "sending:1").unwrap();
        spool.sending("sending", &ok("sending", "x"));
        for id in ["no-slot", "acked"] {
            spool.put(id, &ok(id, "x")).unwrap();
        }
        spool.remove("acked");
        named(&["moved", "no-slot", "sending"]);
        spool.remove("moved");
        spool.write_sent("sending").unwrap();
        named(&["no-slot", "sending"]);
    }

    /// The tests' agent key ([5; 32]) seals what they keep.
    fn seal() -> Seal {
        Seal::new(&ed25519_dalek::SigningKey::from_bytes(&[5; 32]))
    }

    fn ids(all: Vec<(String, StoredResult)>) -> Vec<String> {
        all.into_iter().map(|(id, _)| id).collect()
    }

    /// What is in each record file's started region, and whether its result matches.
    fn regions(dir: &Path, n: usize) -> (Region, Region) {
        let file = std::fs::File::open(dir.join("records").join(n.to_string())).unwrap();
        (read_region(&file, record::STARTED_AT).unwrap(), read_region(&file, record::RESULT_AT).unwrap())
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A job (the agent's user) can put a pipe where a spooled result or an older agent's
    /// marker is looked for. The markers are read at the start, the spooled results at
    /// every connection (the hello names them) on the runtime thread: a pipe there froze the
    /// agent at every start or reconnect, for good — it was never moved aside. Now it is
    /// not a kept result: set aside like any other, and nothing waits on it.
    #[test]
    fn a_pipe_in_place_of_a_kept_result_or_marker_holds_nothing() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = dir("fifo");
        drop(open(&dir, 1));
        let fifo = |path: PathBuf| {
            crate::files::pipe_at(&path);
        };
        fifo(dir.join("spool/planted.json"));
        fifo(dir.join("started/marked"));
        let (tx, rx) = std::sync::mpsc::channel();
        let opened = dir.clone();
        std::thread::spawn(move || {
            let (spool, interrupted) = open(&opened, 1);
            let _ = tx.send((ids(spool.all()), interrupted.len(), spool.get("planted")));
        });
        let Ok((all, interrupted, got)) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            for path in [dir.join("spool/planted.json"), dir.join("started/marked")] {
                let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path);
            }
            panic!("the spool waited on a pipe put in place of a kept result or a marker");
        };
        assert!(all.is_empty(), "{all:?}");
        assert_eq!(interrupted, 1, "the marker still says its job ran");
        assert_eq!(got, None);
        assert!(dir.join("spool/planted.bad").exists(), "set aside");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keeps_results_until_removed_and_sets_bad_files_aside() {
        let dir = dir("keep");
        let (spool, _) = open(&dir, 2);
        let r = ok("job-1", "x");
        spool.started("job-1", "job-1:1").unwrap();
        spool.put("job-1", &r).unwrap();
        assert!(spool.put("../evil", &r).is_err());
        std::fs::write(dir.join("spool/junk.json"), "{").unwrap();
        let all = spool.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, r);
        assert_eq!(spool.get("job-1"), Some(r.clone()));
        assert!(dir.join("spool/junk.bad").exists());
        // Kept in its slot, not in a file of its own; found again by a new agent.
        assert!(files_in(&dir.join("spool")).iter().all(|f| f.ends_with(".bad")));
        drop(spool);
        let (spool, interrupted) = open(&dir, 2);
        assert!(interrupted.is_empty());
        assert_eq!(spool.all(), vec![("job-1".to_string(), r)]);
        spool.remove("job-1");
        assert!(spool.all().is_empty());
        drop(spool);
        assert!(open(&dir, 2).0.all().is_empty(), "an acknowledged result is not sent again");
    }

    /// The slot files stay open between writes. One removed under the agent (by hand, by
    /// a cleaner) must not swallow the next job's started record in a file no restart
    /// finds: it is made again, and the record written there.
    #[test]
    fn a_slot_file_removed_under_the_agent_is_made_again() {
        let dir = dir("removed");
        let (spool, _) = open(&dir, 1);
        spool.started("job-1", "job-1:1").unwrap();
        spool.put("job-1", &ok("job-1", "x")).unwrap();
        spool.remove("job-1");
        std::fs::remove_file(dir.join("records/0")).unwrap();
        spool.started("job-2", "job-2:1").unwrap();
        drop(spool);
        let (_, interrupted) = open(&dir, 1);
        assert_eq!(interrupted, vec![Interrupted { job_id: "job-2".into(), order_nonce: "job-2:1".into() }]);
    }

    /// A slot file replaced under the agent by something that is not a plain file — a pipe
    /// no one reads — is refused at once, saying what to move, not waited on for ever
    /// (the open for writing held every later job's start with it): the job does not
    /// start, and the agent goes on.
    #[test]
    fn a_slot_file_replaced_by_a_pipe_is_refused_not_waited_on() {
        let dir = dir("fifo");
        let (spool, _) = open(&dir, 1);
        spool.started("job-1", "job-1:1").unwrap();
        spool.put("job-1", &ok("job-1", "x")).unwrap();
        spool.remove("job-1");
        let slot = dir.join("records/0");
        std::fs::remove_file(&slot).unwrap();
        crate::files::pipe_at(&slot);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(spool.started("job-2", "job-2:1").map_err(|e| e.to_string())));
        let started = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("refused at once, not waited on for ever");
        let error = started.unwrap_err();
        assert!(error.contains("records/0") && error.contains("not a plain file"), "{error}");
    }

    /// rev8: a slot's record file is made at its first use, and its name is the records
    /// folder's: unsynced, a power cut after the first job of a slot started could lose the
    /// file and with it the job's started record (synced into the file, not its name) — the
    /// job then never reported lost, and sent again. Its name is synced as the slot is first
    /// used, and the folders the spool makes are synced into their parents; a slot used
    /// again syncs no folder (not the per-job path).
    #[test]
    fn a_slot_files_name_is_made_durable_at_its_first_use_only() {
        let dir = dir("slot-names");
        std::fs::create_dir_all(&dir).unwrap();
        crate::files::synced_folders();
        let (spool, _) = open(&dir, 2);
        let made = crate::files::synced_folders();
        assert!(made.contains(&dir), "records/ and spool/, made by the spool, named durably in DATA_DIR: {made:?}");
        spool.started("job-1", "job-1:1:t").unwrap();
        assert_eq!(crate::files::synced_folders(), vec![dir.join("records")], "the first slot file's name");
        spool.put("job-1", &ok("job-1", "x")).unwrap();
        spool.remove("job-1");
        spool.started("job-2", "job-2:1:t").unwrap();
        assert_eq!(crate::files::synced_folders(), Vec::<PathBuf>::new(), "a slot used again syncs no folder");
        spool.started("job-3", "job-3:1:t").unwrap();
        assert_eq!(crate::files::synced_folders(), vec![dir.join("records")], "the second slot's file, made now");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job's records are overwrites of one file per slot: however many jobs run, the
    /// agent creates no file per job.
    #[test]
    fn jobs_reuse_their_slots_record_files() {
        let dir = dir("reuse");
        let (spool, _) = open(&dir, 2);
        for i in 0..20 {
            let id = format!("job-{i}");
            spool.started(&id, &format!("{id}:1")).unwrap();
            spool.put(&id, &ok(&id, "x")).unwrap();
            spool.remove(&id);
        }
        assert_eq!(files_in(&dir.join("records")), vec!["0"], "sequential jobs use the first slot only");
        assert!(files_in(&dir.join("spool")).is_empty());
        assert!(files_in(&dir.join("started")).is_empty());
        assert_eq!(regions(&dir, 0).0, Region::Empty, "the last acknowledgement cleared it");
    }

    #[test]
    fn a_job_started_by_an_agent_that_died_is_reported_lost_not_run_again() {
        let dir = dir("started");
        let (spool, interrupted_jobs) = open(&dir, 2);
        assert!(interrupted_jobs.is_empty());
        spool.started("ran-half", "ran-half:3").unwrap();
        spool.started("ran-whole", "ran-whole:1").unwrap();
        spool.put("ran-whole", &ok("ran-whole", "done")).unwrap();
        drop(spool); // the agent dies here

        let (spool, interrupted_jobs) = open(&dir, 2);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "ran-half".into(), order_nonce: "ran-half:3".into() }]);
        // The agent reports it lost (as it does at start-up).
        let report = ResultReport { job_id: "ran-half".into(), order_nonce: "ran-half:3".into(), result: interrupted() };
        spool.put("ran-half", &StoredResult::of(&report)).unwrap();
        let all = spool.all();
        assert_eq!(all.len(), 2);
        let lost = opened(&spool.get("ran-half").unwrap()).result;
        assert_eq!(lost.error_code, Some(ErrorCode::RunnerLost));
        assert!(opened(&spool.get("ran-whole").unwrap()).result.success);
        drop(spool);
        // Reported once: a third start finds both results and no job to report.
        let (spool, interrupted_jobs) = open(&dir, 2);
        assert!(interrupted_jobs.is_empty());
        assert_eq!(ids(spool.all()), vec!["ran-half", "ran-whole"]);
    }

    /// An agent upgraded in place finds what the previous version left: a marker file per
    /// started job, a spool file per result.
    #[test]
    fn an_older_agents_markers_and_spooled_results_are_found() {
        let dir = dir("older");
        for d in ["spool", "started"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("started/was-running"), "was-running:4\n").unwrap();
        std::fs::write(dir.join("started/had-ended"), "had-ended:1").unwrap();
        let r = signed_by_protocol_8("had-ended", "kept by the old agent");
        std::fs::write(dir.join("spool/had-ended.json"), serde_json::to_vec(&r).unwrap()).unwrap();
        let (spool, interrupted_jobs) = open(&dir, 1);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "was-running".into(), order_nonce: "was-running:4".into() }]);
        spool.put("was-running", &kept("was-running", interrupted())).unwrap();
        assert_eq!(ids(spool.all()), vec!["had-ended", "was-running"]);
        assert!(files_in(&dir.join("started")).is_empty(), "the old markers are gone once dealt with");
        spool.remove("had-ended");
        assert!(!dir.join("spool/had-ended.json").exists());
        drop(spool);
        let (spool, interrupted_jobs) = open(&dir, 1);
        assert!(interrupted_jobs.is_empty());
        assert_eq!(ids(spool.all()), vec!["was-running"]);
    }

    /// A protocol-8 agent kept its results as the signed envelopes it sent, in its slots'
    /// records and in spool files: an agent upgraded in place reads them as their
    /// payloads, which its connections MAC and send.
    #[test]
    fn a_protocol_8_agents_signed_results_are_read_as_their_payloads() {
        let dir = dir("protocol-8");
        drop(open(&dir, 1));
        let in_slot = signed_by_protocol_8("in-slot", "kept in a slot");
        for d in ["spool", "records"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(dir.join("records/0")).unwrap();
        let started = record::Started { job_id: "in-slot".into(), order_nonce: "in-slot:1".into() };
        file.write_all_at(&record::started(&started), record::STARTED_AT).unwrap();
        let finished = record::Finished { job_id: "in-slot".into(), order_nonce: "in-slot:1".into(), envelope: serde_json::to_value(&in_slot).unwrap() };
        file.write_all_at(&record::finished(&finished), record::RESULT_AT).unwrap();
        drop(file);
        let filed = signed_by_protocol_8("filed", "kept in a file");
        std::fs::write(dir.join("spool/filed.json"), serde_json::to_vec(&filed).unwrap()).unwrap();
        let (spool, interrupted_jobs) = open(&dir, 1);
        assert!(interrupted_jobs.is_empty(), "the slot's result was read: {interrupted_jobs:?}");
        let all = spool.all();
        assert_eq!(all, vec![("filed".to_string(), StoredResult { payload: filed.payload, not_taken: None }), ("in-slot".to_string(), StoredResult { payload: in_slot.payload, not_taken: None })]);
        assert_eq!(opened(&all[1].1).result.output, "kept in a slot");
    }

    /// A job that runs commands runs as the agent's user: it can rewrite another job's
    /// result waiting on the disk, frame checksum and all. What the seal does not vouch for
    /// is never sent as the agent's: a slot's result so changed has its job reported lost,
    /// a spool file so changed is set aside; so is a protocol-8 record whose signature is
    /// not this agent's, and a result sealed by another agent's key.
    #[test]
    fn a_kept_result_changed_on_the_disk_is_never_sent_as_the_agents() {
        let dir = dir("forged");
        let (spool, _) = open(&dir, 2);
        spool.started("in-slot", "in-slot:1").unwrap();
        spool.put("in-slot", &ok("in-slot", "the real answer")).unwrap();
        spool.sending("filed", &ok("filed", "the real answer"));
        spool.write_sent("filed").unwrap();
        drop(spool);
        // Rewritten as another job (same user) would: a well-framed record, its checksum
        // recomputed, the seal copied from the real one.
        let path = dir.join("records/0");
        let bytes = std::fs::read(&path).unwrap();
        let Region::Finished(real) = record::decode(&bytes[record::RESULT_AT as usize..]) else { panic!("a result") };
        let mut forged_value = real.envelope.clone();
        forged_value["payload"] = serde_json::Value::String(ok("in-slot", "rm -rf, says the forger").payload);
        let forged = record::finished(&record::Finished { envelope: forged_value, ..real });
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&forged, record::RESULT_AT).unwrap();
        drop(file);
        let mut filed: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("spool/filed.json")).unwrap()).unwrap();
        filed["payload"] = serde_json::Value::String(ok("filed", "rm -rf, says the forger").payload);
        std::fs::write(dir.join("spool/filed.json"), serde_json::to_vec(&filed).unwrap()).unwrap();
        // And files no seal of this agent's vouches for at all.
        let other = Seal::new(&ed25519_dalek::SigningKey::from_bytes(&[6; 32]));
        std::fs::write(dir.join("spool/other-key.json"), other.sealed_bytes(&ok("other-key", "forged"))).unwrap();
        let bare = serde_json::json!({"payload": ok("bare", "forged").payload});
        std::fs::write(dir.join("spool/bare.json"), serde_json::to_vec(&bare).unwrap()).unwrap();
        let mut p8 = signed_by_protocol_8("p8", "the real answer");
        p8.payload = ok("p8", "forged").payload;
        std::fs::write(dir.join("spool/p8.json"), serde_json::to_vec(&p8).unwrap()).unwrap();

        let (spool, interrupted_jobs) = open(&dir, 2);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "in-slot".into(), order_nonce: "in-slot:1".into() }], "reported lost, not sent");
        let all = spool.all();
        assert!(all.iter().all(|(_, r)| !r.payload.contains("forge")), "{all:?}");
        assert!(spool.get("filed").is_none());
        let mut aside = files_in(&dir.join("spool"));
        aside.sort();
        assert_eq!(aside, ["bare.bad", "filed.bad", "other-key.bad", "p8.bad"]);
    }

    /// The seal vouches for a payload, and the payload names its job and order: a sealed
    /// result copied over another job's (into its slot, or to its spool file's name) is the
    /// agent's words about the first job, not the second's result. Kept under the second's
    /// name, the hello named the second job as finished and the first's result went out for
    /// it at each reconnect: the edge acknowledged the first, the second's slot or file was
    /// never cleared, and the second job was never reported lost.
    #[test]
    fn a_sealed_result_copied_over_another_jobs_is_not_kept_as_its() {
        let dir = dir("copied-over");
        let (spool, _) = open(&dir, 2);
        spool.started("donor", "donor:1").unwrap();
        spool.put("donor", &ok("donor", "the donor's answer")).unwrap();
        spool.started("victim", "victim:1").unwrap();
        spool.put("victim", &ok("victim", "the victim's answer")).unwrap();
        spool.sending("filed", &ok("filed", "the filed answer"));
        spool.write_sent("filed").unwrap();
        drop(spool);
        let finished = |n: usize| {
            let bytes = std::fs::read(dir.join(format!("records/{n}"))).unwrap();
            let Region::Finished(f) = record::decode(&bytes[record::RESULT_AT as usize..]) else { panic!("a result") };
            f
        };
        let (donor, victim) = if finished(0).job_id == "donor" { (0, 1) } else { (1, 0) };
        let moved = record::finished(&record::Finished { envelope: finished(donor).envelope, ..finished(victim) });
        let file = std::fs::OpenOptions::new().write(true).open(dir.join(format!("records/{victim}"))).unwrap();
        file.write_all_at(&moved, record::RESULT_AT).unwrap();
        drop(file);
        std::fs::copy(dir.join("spool/filed.json"), dir.join("spool/renamed.json")).unwrap();

        let (spool, interrupted_jobs) = open(&dir, 2);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "victim".into(), order_nonce: "victim:1".into() }], "reported lost");
        let all = spool.all();
        for (id, r) in &all {
            assert_eq!(&opened(r).job_id, id, "{all:?}");
        }
        assert_eq!(ids(all), ["donor", "filed"]);
        assert!(spool.get("renamed").is_none());
        assert!(files_in(&dir.join("spool")).contains(&"renamed.bad".to_string()));
    }

    /// A power cut while a record was written leaves some of its bytes over the old ones.
    /// A torn started record: the job never got its prompt, nothing is owed. A torn result:
    /// the job is reported lost, bound to its nonce, as if the agent had died while Claude ran.
    #[test]
    fn torn_records_are_read_safely() {
        let dir = dir("torn");
        let (spool, _) = open(&dir, 2);
        spool.started("job-a", "job-a:1").unwrap();
        spool.started("job-b", "job-b:1").unwrap();
        spool.put("job-b", &ok("job-b", "the result")).unwrap();
        drop(spool);
        // Slot 0: its started record cut short. Slot 1: its result cut short.
        let tear = |n: usize, at: u64| {
            let path = dir.join("records").join(n.to_string());
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.write_all_at(b"\xff\xff", at + 20).unwrap();
        };
        tear(0, record::STARTED_AT);
        tear(1, record::RESULT_AT);
        assert_eq!(regions(&dir, 0).0, Region::Torn);
        assert_eq!(regions(&dir, 1).1, Region::Torn);
        let (spool, interrupted_jobs) = open(&dir, 2);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "job-b".into(), order_nonce: "job-b:1".into() }]);
        assert!(spool.all().is_empty());
        // A foreign file among the records, and damage of every other kind: left alone.
        std::fs::write(dir.join("records/notes.txt"), "mine").unwrap();
        std::fs::write(dir.join("records/7"), b"CRr1garbage").unwrap();
        drop(spool);
        let (spool, interrupted_jobs) = open(&dir, 2);
        assert_eq!(interrupted_jobs.len(), 1, "job-b's record is still there: it was never reported");
        // Slots found beyond AGENT_SLOTS are read and used.
        assert_eq!(spool.lock().slots.len(), 8);
        assert_eq!(std::fs::read_to_string(dir.join("records/notes.txt")).unwrap(), "mine");
    }

    /// Something other than a plain file where a slot's record goes (a folder, a link, a
    /// pipe): the spool refuses to open, naming it, rather than hang on a pipe or say only
    /// "Is a directory"; and a record is never written through a link.
    #[test]
    fn a_record_that_is_not_a_plain_file_is_named_never_followed() {
        let dir = dir("not-plain");
        drop(open(&dir, 1));
        let target = dir.join("elsewhere");
        std::fs::write(&target, "not the agent's").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("records/0")).unwrap();
        let refused = |dir: &Path| match Spool::open(dir.join("spool"), dir.join("started"), dir.join("records"), 1, seal()) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        assert!(refused(&dir).contains("records/0"), "{}", refused(&dir));
        // A link made while the agent runs: the job's start fails, the link's target is untouched.
        std::fs::remove_file(dir.join("records/0")).unwrap();
        let (spool, _) = open(&dir, 1);
        std::os::unix::fs::symlink(&target, dir.join("records/0")).unwrap();
        assert!(spool.started("job-1", "job-1:1").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "not the agent's");
        drop(spool);
        std::fs::remove_file(dir.join("records/0")).unwrap();
        std::fs::create_dir(dir.join("records/0")).unwrap();
        let e = refused(&dir);
        assert!(e.contains("records/0") && e.contains("move it out of the way"), "{e}");
        std::fs::remove_dir(dir.join("records/0")).unwrap();
        crate::files::pipe_at(&dir.join("records/0"));
        assert!(refused(&dir).contains("move it out of the way"), "a pipe does not hold the start");
    }

    /// When a result was first not taken is kept with it: its slot is freed for it (the
    /// result moves to a spool file), an acknowledgement still removes it, and the file
    /// stays one the agent of before reads as its result (the field outside the seal is
    /// one it does not know), as this one reads that agent's files (without it).
    #[test]
    fn the_first_not_taken_time_is_kept_with_the_result_in_a_format_both_releases_read() {
        let dir = dir("not-taken");
        let (spool, _) = open(&dir, 1);
        let r = ok("first", "not taken");
        spool.started("first", "first:1").unwrap();
        spool.put("first", &r).unwrap();
        assert_eq!(spool.not_taken("first", 5_000), Some((5_000, true)));
        assert_eq!(spool.not_taken("first", 6_000), Some((5_000, false)));
        assert_eq!(regions(&dir, 0).0, Region::Empty, "its slot freed");
        assert_eq!(spool.not_taken("unknown", 6_000), None);
        // What the agent of before read a kept result as: a payload and its seal.
        #[derive(serde::Deserialize)]
        struct WrittenBefore {
            payload: String,
            mac: Option<String>,
        }
        let written: WrittenBefore = serde_json::from_slice(&std::fs::read(dir.join("spool/first.json")).unwrap()).unwrap();
        let sealed = Tagged { payload: written.payload.clone(), mac: written.mac.unwrap() };
        assert!(sealed.open::<ResultReport>(Domain::KeptResult, &seal().key).is_ok(), "the agent of before no longer reads it");
        assert_eq!(written.payload, r.payload);
        drop(spool);
        let (spool, _) = open(&dir, 1);
        assert_eq!(spool.get("first").and_then(|r| r.not_taken), Some(5_000), "forgotten in a restart");
        // A time ahead of the clock (a job can write the file) reads as now.
        assert_eq!(spool.not_taken("first", 4_000), Some((4_000, false)));
        spool.remove("first");
        assert!(spool.all().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The edge is slow to acknowledge: a new job needs a slot whose result is not yet
    /// acknowledged. The result moves to a spool file first, and is kept across a restart.
    #[test]
    fn a_result_is_moved_out_of_its_slot_when_a_new_job_needs_it() {
        let dir = dir("moved");
        let (spool, _) = open(&dir, 1);
        let r = ok("first", "unacknowledged");
        spool.started("first", "first:1").unwrap();
        spool.put("first", &r).unwrap();
        spool.started("second", "second:1").unwrap();
        assert!(dir.join("spool/first.json").exists(), "moved to a spool file");
        assert_eq!(spool.get("first"), Some(r.clone()));
        assert!(matches!(regions(&dir, 0).0, Region::Started(s) if s.job_id == "second"));
        drop(spool); // the agent dies while "second" runs

        let (spool, interrupted_jobs) = open(&dir, 1);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "second".into(), order_nonce: "second:1".into() }]);
        spool.put("second", &kept("second", interrupted())).unwrap();
        // Found in its spool file by the new agent (an order for it is answered with it).
        assert_eq!(spool.get("first"), Some(r.clone()));
        assert!(spool.has("first") && spool.get("never-here").is_none());
        assert_eq!(ids(spool.all()), vec!["first", "second"]);
        spool.remove("first");
        spool.remove("second");
        assert!(spool.all().is_empty());
        assert!(files_in(&dir.join("spool")).is_empty());
    }

    /// The agent dies after moving a result out but before the new job's record replaced
    /// it: the result is in its slot and in a spool file; it is kept once.
    #[test]
    fn a_result_kept_twice_after_a_move_is_kept_once() {
        let dir = dir("twice");
        let (spool, _) = open(&dir, 1);
        let r = ok("first", "x");
        spool.started("first", "first:1").unwrap();
        spool.put("first", &r).unwrap();
        drop(spool);
        std::fs::write(dir.join("spool/first.json"), seal().sealed_bytes(&r)).unwrap();
        let (spool, interrupted_jobs) = open(&dir, 1);
        assert!(interrupted_jobs.is_empty());
        assert_eq!(spool.all(), vec![("first".to_string(), r)]);
        assert_eq!(regions(&dir, 0).0, Region::Empty, "the slot's copy went");
        spool.remove("first");
        assert!(spool.all().is_empty());
    }

    #[test]
    fn a_result_the_disk_refuses_is_held_in_memory_and_written_later() {
        let dir = dir("held");
        let (spool, _) = open(&dir, 1);
        // A spool folder that takes no file makes the write fail (a job with no slot
        // record: one whose start could not be recorded).
        refuse_files(&dir, true);
        let r = ok("job-9", "kept");
        assert!(spool.put("job-9", &r).is_err());
        assert!(spool.has("job-9"));
        assert_eq!(spool.held(), 1);
        assert_eq!(spool.all(), vec![("job-9".to_string(), r.clone())], "named and sent again while held");
        refuse_files(&dir, false);
        assert_eq!(spool.all(), vec![("job-9".to_string(), r)]);
        assert_eq!(spool.held(), 0, "written once the disk allowed it");
        assert!(dir.join("spool/job-9.json").exists());
    }

    /// A slot's record file the disk will not write: the job's start fails (nothing may
    /// start without its record), and a result that cannot go into its slot is held.
    #[test]
    fn a_slot_the_disk_refuses_stops_the_start_and_holds_the_result() {
        let dir = dir("refused");
        let (spool, _) = open(&dir, 1);
        spool.started("job-1", "job-1:1").unwrap();
        // The record file replaced by a folder: every write to it fails.
        std::fs::remove_file(dir.join("records/0")).unwrap();
        std::fs::create_dir(dir.join("records/0")).unwrap();
        let r = ok("job-1", "x");
        assert!(spool.put("job-1", &r).is_err());
        assert_eq!(spool.held(), 1);
        assert_eq!(spool.get("job-1"), Some(r));
        // Slot 0 keeps job-1's started record while its result is held: the next job
        // takes a record file more, which refuses writes too.
        std::fs::create_dir(dir.join("records/1")).unwrap();
        assert!(spool.started("job-2", "job-2:1").is_err(), "a job whose start cannot be recorded does not start");
        assert!(spool.started("job-3", "job-3:1").is_err(), "and its slot is free for the next try");
        std::fs::remove_dir(dir.join("records/1")).unwrap();
        spool.started("job-3", "job-3:1").unwrap();
        assert_eq!(spool.lock().slots.len(), 2);
    }

    /// A result its slot's record could not take (on a full disk a started record is
    /// written in place, a result may need new blocks) is held in memory. Until it is
    /// durable somewhere, the job's started record must stay, even when other jobs start
    /// meanwhile: an agent that dies then reports the job lost instead of forgetting it
    /// (the edge, never told, could send it again).
    #[test]
    fn a_held_results_started_record_stays_until_the_result_is_durable() {
        let dir = dir("held-slot");
        let (spool, _) = open(&dir, 1);
        spool.started("first", "first:1").unwrap();
        let record = dir.join("records/0");
        let kept = std::fs::read(&record).unwrap();
        // The record file refuses the result, and the spool folder any file.
        std::fs::remove_file(&record).unwrap();
        std::fs::create_dir(&record).unwrap();
        refuse_files(&dir, true);
        assert!(spool.put("first", &ok("first", "held")).is_err());
        assert_eq!(spool.held(), 1);
        // The record file takes writes again (the started record in place, as on a full disk).
        std::fs::remove_dir(&record).unwrap();
        std::fs::write(&record, kept).unwrap();
        spool.started("second", "second:1").unwrap();
        assert!(matches!(regions(&dir, 0).0, Region::Started(s) if s.job_id == "first"), "the held result's job is still known to have started");
        drop(spool); // the agent dies: the held result is gone
        refuse_files(&dir, false);

        let (spool, interrupted_jobs) = open(&dir, 1);
        let mut lost: Vec<String> = interrupted_jobs.into_iter().map(|j| j.job_id).collect();
        lost.sort();
        assert_eq!(lost, vec!["first", "second"], "both reported lost, neither forgotten");
        drop(spool);

        // Written to a spool file once the disk allows it, or acknowledged: its slot is free.
        let dir = self::dir("held-slot-freed");
        let (spool, _) = open(&dir, 1);
        for id in ["a", "b"] {
            spool.started(id, &format!("{id}:1")).unwrap();
            std::fs::remove_file(dir.join("records/0")).unwrap();
            std::fs::create_dir(dir.join("records/0")).unwrap();
            refuse_files(&dir, true);
            assert!(spool.put(id, &ok(id, "held")).is_err());
            std::fs::remove_dir(dir.join("records/0")).unwrap();
            refuse_files(&dir, false);
            if id == "a" {
                assert_eq!(ids(spool.all()), vec!["a"], "written to its spool file");
            } else {
                spool.remove("b");
            }
            assert_eq!(spool.held(), 0);
            assert_eq!(spool.lock().slots, vec![Slot::Free], "the slot is free again");
        }
    }

    /// The result is sent before it is written: from then on it is named in a hello and
    /// found again, and an acknowledgement that arrives while it is written leaves nothing
    /// behind.
    #[test]
    fn a_result_sent_before_it_is_written_is_kept_and_an_early_ack_leaves_nothing() {
        let dir = dir("sending");
        let (spool, _) = open(&dir, 1);
        let r = ok("job-5", "on its way");
        spool.started("job-5", "job-5:1").unwrap();
        spool.sending("job-5", &r);
        assert_eq!(spool.all(), vec![("job-5".to_string(), r.clone())], "named in a hello while it is written");
        assert_eq!(spool.get("job-5"), Some(r.clone()));
        spool.write_sent("job-5").unwrap();
        assert!(matches!(regions(&dir, 0).1, Region::Finished(f) if f.job_id == "job-5"));
        spool.remove("job-5");

        // The edge's acknowledgement comes before the write is done.
        spool.started("job-6", "job-6:1").unwrap();
        spool.sending("job-6", &r);
        spool.remove("job-6");
        spool.write_sent("job-6").unwrap();
        assert!(!matches!(regions(&dir, 0).1, Region::Finished(f) if f.job_id == "job-6"), "an acknowledged result is not written");
        assert_eq!(regions(&dir, 0).0, Region::Empty);
        assert!(!spool.has("job-6"));
        drop(spool);
        assert!(open(&dir, 1).1.is_empty());
    }

    /// The edge acknowledges a result while a new job needs a slot, and the only one it
    /// could take is the slot of that result, its record not cleared yet. The new job's
    /// started record must survive the clearing, and the acknowledged result must not be
    /// moved out to a spool file (and sent again) on its way.
    #[test]
    fn an_acknowledgement_clearing_a_slot_does_not_race_a_new_job_for_it() {
        let dir = dir("ack-race");
        let (spool, _) = open(&dir, 1);
        spool.started("first", "first:1").unwrap();
        spool.put("first", &ok("first", "acknowledged")).unwrap();
        // The acknowledgement has taken "first" from memory, its record not cleared yet...
        let n = spool.acknowledged("first").expect("first is in its slot");
        // ...when a new job needs a slot.
        spool.started("second", "second:1").unwrap();
        spool.clear(n);
        assert!(!spool.has("first"), "an acknowledged result is not kept again");
        assert!(files_in(&dir.join("spool")).is_empty());
        let slot = spool.lock().slots.iter().position(|s| matches!(s, Slot::Started(r) if r.job_id == "second"));
        let slot = slot.expect("the running job keeps its slot");
        assert!(matches!(regions(&dir, slot).0, Region::Started(s) if s.job_id == "second"));
        drop(spool); // the agent dies while "second" runs

        let (spool, interrupted_jobs) = open(&dir, 1);
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "second".into(), order_nonce: "second:1".into() }], "reported lost, not run again");
        assert!(spool.all().is_empty());
    }

    /// Many jobs at once on a few slots, acknowledged late and out of order, with restarts
    /// in between: every result is found exactly while it is unacknowledged, and no job
    /// is ever reported lost that ended.
    #[test]
    fn slots_under_concurrent_jobs_and_late_acknowledgements() {
        let dir = dir("concurrent");
        let spool = std::sync::Arc::new(open(&dir, 3).0);
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let spool = std::sync::Arc::clone(&spool);
                std::thread::spawn(move || {
                    for i in 0..30 {
                        let id = format!("job-{t}-{i}");
                        spool.started(&id, &format!("{id}:1")).unwrap();
                        spool.sending(&id, &ok(&id, "x"));
                        spool.write_sent(&id).unwrap();
                        if i % 3 != 0 {
                            spool.remove(&id);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let unacked: Vec<String> = (0..3).flat_map(|t| (0..30).filter(|i| i % 3 == 0).map(move |i| format!("job-{t}-{i}"))).collect();
        let mut expected = unacked.clone();
        expected.sort();
        assert_eq!(ids(spool.all()), expected);
        drop(spool);
        let (spool, interrupted_jobs) = open(&dir, 3);
        assert!(interrupted_jobs.is_empty(), "{interrupted_jobs:?}");
        assert_eq!(ids(spool.all()), expected);
    }

    /// Starts `job` on its own thread with its started record's write held just before it
    /// is made: the record lands once `release` is sent (the order of a slow disk, driven).
    #[allow(clippy::type_complexity)]
    fn start_held(spool: &std::sync::Arc<Spool>, job: &'static str) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<Result<(), String>>) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (holding, is_holding) = std::sync::mpsc::channel::<()>();
        *spool.before_record.lock().unwrap() = Some(Box::new(move || {
            holding.send(()).unwrap();
            held.recv().unwrap();
        }));
        let start = {
            let spool = std::sync::Arc::clone(spool);
            std::thread::spawn(move || spool.started(job, &format!("{job}:1")).map_err(|e| e.to_string()))
        };
        is_holding.recv().unwrap();
        (release, start)
    }

    /// Review rev39, finding 4: a job ends while its started record is still being written
    /// (its start stuck on the disk: `process::run` ends it at its deadline, a cancel or
    /// the drain), and its result is acknowledged before that write is done, or after it
    /// was kept. The record, written last, was left behind: a restart reported the job
    /// lost (acknowledged before its result was written), or sent its result again. Both
    /// orders, driven by holding the record's write.
    #[test]
    fn a_started_record_written_after_its_job_ended_and_was_acknowledged_leaves_nothing() {
        for ack_first in [true, false] {
            let dir = dir(if ack_first { "late-record-ack-first" } else { "late-record-kept-first" });
            let spool = std::sync::Arc::new(open(&dir, 1).0);
            let (release, start) = start_held(&spool, "late");
            // The job ended meanwhile: its result is sent, kept, and acknowledged.
            spool.sending("late", &ok("late", "ended while its start was stuck"));
            if ack_first {
                spool.remove("late");
                spool.write_sent("late").unwrap();
            } else {
                spool.write_sent("late").unwrap();
                spool.remove("late");
            }
            release.send(()).unwrap();
            let _ = start.join().unwrap();
            // The record's own write cleared it and freed the slot, before any `unready`.
            assert_eq!(spool.lock().slots, vec![Slot::Free], "ack_first {ack_first}: the late record is left in its slot");
            // The record's thread then clears what it made (`unready`).
            spool.unstart("late");
            assert!(!spool.has("late"), "ack_first {ack_first}: an acknowledged result is kept");
            drop(spool);
            let (spool, interrupted_jobs) = open(&dir, 1);
            assert!(interrupted_jobs.is_empty(), "ack_first {ack_first}: a job that ended is reported lost after a restart: {interrupted_jobs:?}");
            assert!(spool.all().is_empty(), "ack_first {ack_first}: an acknowledged result is sent again after a restart");
            assert_eq!(spool.lock().slots, vec![Slot::Free]);
        }
    }

    /// Review rev39, finding 4: a started record whose write fails after its job ended and
    /// its result was kept set the slot free whatever it held: the result, kept in that
    /// slot, was forgotten (never named in a hello, never sent) and its slot given to the
    /// next job.
    #[test]
    fn a_started_record_that_fails_after_its_jobs_result_was_kept_loses_no_result() {
        let dir = dir("late-record-fails");
        let spool = std::sync::Arc::new(open(&dir, 1).0);
        let (release, start) = start_held(&spool, "late");
        let result = ok("late", "kept while its start was stuck");
        spool.sending("late", &result);
        let _ = spool.write_sent("late");
        // Then the record's write fails: a folder where its file was.
        let _ = std::fs::remove_file(dir.join("records/0"));
        std::fs::create_dir(dir.join("records/0")).unwrap();
        release.send(()).unwrap();
        assert!(start.join().unwrap().is_err(), "the record's write did not fail");
        spool.unstart("late");
        assert_eq!(spool.get("late"), Some(result.clone()), "the result kept is forgotten");
        assert_eq!(ids(spool.all()), vec!["late"]);
        std::fs::remove_dir(dir.join("records/0")).unwrap();
        drop(spool);
        let (spool, interrupted_jobs) = open(&dir, 1);
        assert!(interrupted_jobs.is_empty(), "{interrupted_jobs:?}");
        assert_eq!(spool.get("late"), Some(result), "the result is lost across a restart");
    }
}
