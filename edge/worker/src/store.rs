//! Job records in the Durable Object's SQLite storage: the only part of the machine's
//! state that must outlive the object's memory (sessions live in socket attachments).
//! Workerd evicts an idle object within seconds, so every event may start with
//! [`Store::load`]; every event's `Effect::Save`s and `Effect::Forget`s land here.
//!
//! A record is the JSON of [`edge_core::job::Job`] in `jobs.record`. SQLite in a Durable
//! Object refuses strings over 2 MB, and a result (Claude's output plus a diff) may be
//! larger, so a long record continues in `job_parts`; a job whose result could not be
//! stored would come back as "running" after an eviction and end as lost.
//!
//! An ended job's `jobs.record` is its header ([`Job::header`]: no task text, no output)
//! and its whole record is in `job_whole`, read only when someone asks for it
//! ([`Store::load_one`]): the object is rebuilt after every eviction, and rebuilding reads
//! headers only, so its memory holds headers however large the results were.
//!
//! One event's writes go in one `transactionSync`: all of them or none, so a record and its
//! parts never disagree and a failed event leaves storage as it was.

use edge_core::record::Job;
use edge_core::Writes;
use serde::Deserialize;
use std::collections::HashMap;
use worker::js_sys::{Function, Reflect};
use worker::wasm_bindgen::closure::Closure;
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::{SqlStorage, SqlStorageValue, Storage};

/// Bytes per stored piece of a record: well under the 2 MB limit of a string.
const PART_BYTES: usize = 1_000_000;

pub struct Store {
    sql: SqlStorage,
    /// The storage object itself, for `transactionSync` (which the `worker` crate does
    /// not wrap).
    storage: JsValue,
}

#[derive(Deserialize)]
struct JobRow {
    id: String,
    record: String,
}

#[derive(Deserialize)]
struct PartRow {
    id: String,
    text: String,
}

impl Store {
    pub fn new(storage: Storage) -> Store {
        Store { sql: storage.sql(), storage: AsRef::<JsValue>::as_ref(storage.as_raw()).clone() }
    }

    /// Creates the tables if this object never had them.
    pub fn open(&self) -> Result<(), String> {
        self.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", vec![])?;
        self.exec("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL)", vec![])?;
        self.exec(
            "CREATE TABLE IF NOT EXISTS job_parts (id TEXT NOT NULL, part INTEGER NOT NULL, text TEXT NOT NULL, \
             PRIMARY KEY (id, part))",
            vec![],
        )?;
        self.exec(
            "CREATE TABLE IF NOT EXISTS job_whole (id TEXT NOT NULL, part INTEGER NOT NULL, text TEXT NOT NULL, \
             PRIMARY KEY (id, part))",
            vec![],
        )?;
        Ok(())
    }

    /// Alerting's stored memory, if any (an unreadable one is dropped: at worst an alert is
    /// sent again).
    pub fn load_alerts(&self) -> Result<Option<edge_core::notify::AlertState>, String> {
        #[derive(Deserialize)]
        struct Meta {
            value: String,
        }
        let cursor = self.exec("SELECT value FROM meta WHERE key = 'alerts'", vec![])?;
        let row = cursor.next::<Meta>().next().transpose().map_err(|e| format!("reading meta: {e}"))?;
        Ok(row.and_then(|m| serde_json::from_str(&m.value).ok()))
    }

    /// The pool this object serves: `named` (the name a request brought, kept the first
    /// time), else the one kept before. `None`: no request has said yet.
    pub fn pool(&self, named: Option<&str>) -> Result<Option<String>, String> {
        #[derive(Deserialize)]
        struct Value {
            value: String,
        }
        let kept = self.exec("SELECT value FROM meta WHERE key = 'pool'", vec![])?.next::<Value>().next();
        let kept = kept.transpose().map_err(|e| format!("reading meta: {e}"))?.map(|v| v.value);
        match (named, kept) {
            (Some(name), None) => {
                self.exec("INSERT INTO meta (key, value) VALUES ('pool', ?)", vec![name.into()])?;
                Ok(Some(name.to_string()))
            }
            (_, Some(kept)) => Ok(Some(kept)),
            (None, None) => Ok(None),
        }
    }

    /// Every stored job. A record that no longer reads as a job (e.g. written by an
    /// incompatible release) is skipped and reported, not fatal: the others still load.
    pub fn load(&self) -> Result<(Vec<Job>, Vec<String>), String> {
        let mut parts: HashMap<String, Vec<String>> = HashMap::new();
        let cursor = self.exec("SELECT id, text FROM job_parts ORDER BY id, part", vec![])?;
        for row in cursor.next::<PartRow>() {
            let row = row.map_err(|e| format!("reading job_parts: {e}"))?;
            parts.entry(row.id).or_default().push(row.text);
        }
        let mut jobs = Vec::new();
        let mut problems = Vec::new();
        let cursor = self.exec("SELECT id, record FROM jobs", vec![])?;
        for row in cursor.next::<JobRow>() {
            let row = row.map_err(|e| format!("reading jobs: {e}"))?;
            let record = join_record(row.record, parts.remove(&row.id).unwrap_or_default());
            match serde_json::from_str::<Job>(&record) {
                Ok(job) => jobs.push(job),
                Err(e) => problems.push(format!("job {} has an unreadable record ({e}); it was skipped", row.id)),
            }
        }
        Ok((jobs, problems))
    }

    /// Stores one event's writes in one transaction: all of them, or none. Each record is
    /// encoded as it is written and let go after, with its job: encoded all first, as they
    /// were, an event ending many pending jobs at once (a restore, a tick) held their JSON
    /// beside them — another copy of up to `MAX_PENDING_BYTES` in an isolate of 128 MB.
    pub fn apply(&self, writes: Writes) -> Result<(), String> {
        if writes.is_empty() {
            return Ok(());
        }
        let Writes { saves, forgets, alerts } = writes;
        let store = Store { sql: self.sql.clone(), storage: JsValue::UNDEFINED };
        // Thrown from inside the transaction, an error rolls it back.
        let body = Closure::once_into_js(move || -> Result<(), JsValue> {
            let encode = |job: &Job| serde_json::to_string(job).map_err(|e| JsValue::from_str(&format!("encoding job {}: {e}", job.id)));
            for job in saves {
                // A forgotten job's stub (its kept idempotency key) is all there is of it.
                if job.state.is_terminal() && !job.forgotten {
                    let (id, whole) = (job.id.clone(), encode(&job)?);
                    // The job's header made from itself, not from a copy of it (the machine
                    // keeps its own header, so this record is the `Save`'s alone).
                    let header = encode(&std::sync::Arc::unwrap_or_clone(job).in_memory())?;
                    store.save(&id, &header, Some(&whole)).map_err(|e| JsValue::from_str(&e))?;
                } else {
                    store.save(&job.id, &encode(&job)?, None).map_err(|e| JsValue::from_str(&e))?;
                }
            }
            let alerts = match &alerts {
                Some(a) => Some(serde_json::to_string(a).map_err(|e| JsValue::from_str(&format!("encoding the alert state: {e}")))?),
                None => None,
            };
            for id in &forgets {
                store.forget(id).map_err(|e| JsValue::from_str(&e))?;
            }
            if let Some(alerts) = &alerts {
                store
                    .exec("INSERT INTO meta (key, value) VALUES ('alerts', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", vec![alerts.as_str().into()])
                    .map_err(|e| JsValue::from_str(&e))?;
            }
            Ok(())
        });
        let transaction: Function = Reflect::get(&self.storage, &JsValue::from_str("transactionSync"))
            .ok()
            .and_then(|f| f.dyn_into().ok())
            .ok_or("this runtime's Durable Object storage has no transactionSync")?;
        transaction.call1(&self.storage, &body).map(|_| ()).map_err(|e| {
            e.as_string()
                .or_else(|| Reflect::get(&e, &JsValue::from_str("message")).ok().and_then(|m| m.as_string()))
                .unwrap_or_else(|| format!("{e:?}"))
        })
    }

    /// One job's whole record: `job_whole` for an ended job, else (or for a record written
    /// before headers were kept apart) `jobs` and its parts.
    pub fn load_one(&self, id: &str) -> Result<Option<Job>, String> {
        let whole = self.pieces("SELECT id, text FROM job_whole WHERE id = ? ORDER BY part", id)?;
        let record = match whole.split_first() {
            Some((first, rest)) => join_record(first.clone(), rest.to_vec()),
            None => {
                let cursor = self.exec("SELECT id, record FROM jobs WHERE id = ?", vec![id.into()])?;
                let Some(row) = cursor.next::<JobRow>().next() else { return Ok(None) };
                let row = row.map_err(|e| format!("reading jobs: {e}"))?;
                join_record(row.record, self.pieces("SELECT id, text FROM job_parts WHERE id = ? ORDER BY part", id)?)
            }
        };
        serde_json::from_str(&record).map(Some).map_err(|e| format!("job {id} has an unreadable record ({e})"))
    }

    fn pieces(&self, query: &str, id: &str) -> Result<Vec<String>, String> {
        let cursor = self.exec(query, vec![id.into()])?;
        let mut out = Vec::new();
        for row in cursor.next::<PartRow>() {
            out.push(row.map_err(|e| format!("reading a record's parts: {e}"))?.text);
        }
        Ok(out)
    }

    /// Inserts or replaces a job's record (its header, for an ended job, whose whole
    /// record goes to `job_whole`).
    fn save(&self, id: &str, record: &str, whole: Option<&str>) -> Result<(), String> {
        self.exec("DELETE FROM job_whole WHERE id = ?", vec![id.into()])?;
        for (part, text) in whole.map(|w| split_record(w, PART_BYTES)).unwrap_or_default().iter().enumerate() {
            self.exec(
                "INSERT INTO job_whole (id, part, text) VALUES (?, ?, ?)",
                vec![id.into(), (part as i64).into(), (*text).into()],
            )?;
        }
        let pieces = split_record(record, PART_BYTES);
        self.exec(
            "INSERT INTO jobs (id, record) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            vec![id.into(), pieces[0].into()],
        )?;
        self.exec("DELETE FROM job_parts WHERE id = ?", vec![id.into()])?;
        for (part, text) in pieces.iter().enumerate().skip(1) {
            self.exec(
                "INSERT INTO job_parts (id, part, text) VALUES (?, ?, ?)",
                vec![id.into(), (part as i64).into(), (*text).into()],
            )?;
        }
        Ok(())
    }

    /// Deletes a job whose retention is over.
    fn forget(&self, job_id: &str) -> Result<(), String> {
        self.exec("DELETE FROM jobs WHERE id = ?", vec![job_id.into()])?;
        self.exec("DELETE FROM job_parts WHERE id = ?", vec![job_id.into()])?;
        self.exec("DELETE FROM job_whole WHERE id = ?", vec![job_id.into()])?;
        Ok(())
    }

    fn exec(&self, query: &str, bindings: Vec<SqlStorageValue>) -> Result<worker::SqlCursor, String> {
        self.sql.exec(query, bindings).map_err(|e| format!("SQL storage: {e}"))
    }
}

/// Cuts a record into pieces of at most `max` bytes, on character boundaries. Always at
/// least one piece (possibly empty).
pub fn split_record(record: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = record;
    while rest.len() > max {
        let mut cut = shared::text::truncate(rest, max).len();
        if cut == 0 {
            // `max` is smaller than this one character: it goes alone.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (head, tail) = rest.split_at(cut);
        pieces.push(head);
        rest = tail;
    }
    if !rest.is_empty() || pieces.is_empty() {
        pieces.push(rest);
    }
    pieces
}

fn join_record(first: String, rest: Vec<String>) -> String {
    if rest.is_empty() {
        return first;
    }
    let mut record = first;
    for piece in rest {
        record.push_str(&piece);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_on_char_boundaries_and_join_back() {
        let record = "aé€😀".repeat(1000);
        for max in [4, 5, 7, 100, 10_000] {
            let pieces = split_record(&record, max);
            assert!(pieces.iter().all(|p| p.len() <= max), "max {max}");
            let joined = join_record(pieces[0].to_string(), pieces[1..].iter().map(|p| p.to_string()).collect());
            assert_eq!(joined, record);
        }
        assert_eq!(split_record("", 4), vec![""]);
        assert_eq!(split_record("abcd", 4), vec!["abcd"]);
        assert_eq!(split_record("😀😀", 2), vec!["😀", "😀"]);
    }
}
