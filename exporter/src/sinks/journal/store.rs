//! The SQLite journal itself: executables seen on this host, connection
//! rollups and events. Everything one flush writes goes in one transaction,
//! so a crash leaves either all of it or none of it.

use std::{
    collections::{BTreeSet, HashMap},
    fs::{self, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension, params};

use super::schema::{self, SchemaError};
use crate::model::{
    Event, EventKind, ExeKey, ExecutableSighting, FlowRecord, FlowTotals, Peer, Program, Sha256,
    Workload,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the journal's directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot create the journal {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("cannot open the journal {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("journal {path}: {source}")]
    Schema { path: PathBuf, source: SchemaError },
    #[error("writing to the journal {path}: {source}")]
    Write {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// What the journal knows of an executable after a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutableState {
    pub path: String,
    pub sha256: String,
    /// When this (path, sha256) was first seen on this host.
    pub first_seen: i64,
    /// When this path was first seen on this host, with any hash.
    pub path_first_seen: i64,
    /// Whether this path was ever seen doing network I/O.
    pub path_used_network: bool,
    /// Who ran this (path, sha256) when it was first seen.
    pub first_run: FirstRun,
}

/// Who ran an executable at one sighting: the parent's path, the user's
/// name, the container and pod; each `None` where unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstRun {
    pub parent: Option<String>,
    pub user: Option<String>,
    pub workload: Workload,
}

impl FirstRun {
    /// From the row's `first_*` columns, starting at column `at`.
    fn from_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            parent: row.get(at)?,
            user: row.get(at + 1)?,
            workload: Workload {
                container_id: row.get(at + 2)?,
                container_name: row.get(at + 3)?,
                pod: row.get(at + 4)?,
                namespace: row.get(at + 5)?,
            },
        })
    }
}

/// The `first_*` columns, in [`FirstRun::from_row`]'s order.
const FIRST_RUN_COLUMNS: &str = "first_parent, first_user, first_container_id, first_container_name, first_pod, first_namespace";

/// What one flush writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Per (path, sha256 or "" when unhashed): names, parents and users
    /// seen, and the time range.
    executables: HashMap<(String, String), Sightings>,
    flows: FlowTotals,
    pub events: Vec<Event>,
}

#[derive(Debug, Default)]
struct Sightings {
    names: BTreeSet<String>,
    parents: BTreeSet<String>,
    users: BTreeSet<u32>,
    first: i64,
    last: i64,
    modified: bool,
    used_network: bool,
    hash_failure: Option<&'static str>,
    command_line: Option<String>,
    /// Who ran it at the earliest sighting of the batch.
    first_run: Option<FirstRun>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.executables.is_empty() && self.flows.is_empty() && self.events.is_empty()
    }

    /// Entries held, for bounding memory while the journal cannot be written.
    pub fn len(&self) -> usize {
        self.executables.len() + self.flows.len() + self.events.len()
    }

    pub fn add_executable(&mut self, seen: ExecutableSighting) {
        // The journal keeps executables by path and content; the file that
        // ran matters to the flows (filled from the sighting by the fan-out).
        let sha256 = seen.sha256.map(|sha256| sha256.as_str().to_owned());
        let key = (seen.path, sha256.unwrap_or_default());
        let entry = self.executables.entry(key).or_insert_with(|| Sightings {
            first: seen.seen_at,
            last: seen.seen_at,
            ..Sightings::default()
        });
        if entry.first_run.is_none() || seen.seen_at < entry.first {
            entry.first_run = Some(FirstRun {
                parent: seen.parent_path.clone(),
                user: seen.user_name,
                workload: seen.workload,
            });
        }
        entry.modified |= seen.modified;
        entry.used_network |= seen.used_network;
        if seen.hash_failure.is_some() {
            entry.hash_failure = seen.hash_failure;
        }
        if entry.command_line.is_none() {
            entry.command_line = seen.command_line;
        }
        if !seen.name.is_empty() {
            entry.names.insert(seen.name);
        }
        if let Some(parent) = seen.parent_path {
            entry.parents.insert(parent);
        }
        entry.users.insert(seen.uid);
        entry.first = entry.first.min(seen.seen_at);
        entry.last = entry.last.max(seen.seen_at);
    }

    /// Fills the sha256 of flows drained before their executable was
    /// hashed, with the hash of the file that sent (`hash_of`).
    pub fn fill_missing_hashes(&mut self, hash_of: impl Fn(&ExeKey) -> Option<Sha256>) {
        self.flows.fill_missing_hashes(hash_of);
    }

    /// Adds traffic, merging it with the same flow's traffic in this window.
    pub fn add_flow(&mut self, flow: FlowRecord) {
        self.flows.add(flow);
    }
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// How long a build (sha256) must have been known on this host, and the
    /// destination baseline recorded, before a destination new to it is an
    /// event.
    destination_learning_period: Duration,
}

/// Default of `journal.destination_learning_period`.
pub const DEFAULT_DESTINATION_LEARNING_PERIOD: Duration = Duration::from_secs(7 * 86_400);

/// Kinds of destinations the journal keeps per build, also the `kind` label
/// of `fleetsnitch_new_destinations_total`.
pub const DESTINATION_KINDS: [&str; 3] = ["domain", "country", "asn"];

/// A flow's destinations: the name the program resolved, the peer's country
/// and AS, each when known.
fn destinations(peer: &Peer) -> impl Iterator<Item = (&'static str, String)> {
    [
        (DESTINATION_KINDS[0], peer.domain.clone()),
        (DESTINATION_KINDS[1], peer.country.clone()),
        (DESTINATION_KINDS[2], peer.asn.map(|asn| asn.to_string())),
    ]
    .into_iter()
    .filter_map(|(kind, value)| Some((kind, value?)))
}

/// The detail of a new-destination event: `<kind> <value>`.
pub fn destination_detail(kind: &str, value: &str) -> String {
    format!("{kind} {value}")
}

/// The kind of a new-destination event's detail.
pub fn destination_kind(detail: &str) -> Option<&'static str> {
    let kind = detail.split_once(' ')?.0;
    DESTINATION_KINDS.into_iter().find(|known| *known == kind)
}

/// The journal file if users other than its owner may read or write it, and
/// its directory if they may write to it (and so replace the journal), each
/// with its mode. Sidecar files (-wal, -shm) take the journal's mode.
pub fn loose_permissions(path: &Path) -> Vec<(PathBuf, u32)> {
    let mode = |path: &Path| {
        fs::metadata(path)
            .ok()
            .map(|metadata| metadata.permissions().mode() & 0o7777)
    };
    let mut loose = Vec::new();
    if let Some(file_mode) = mode(path).filter(|mode| mode & 0o077 != 0) {
        loose.push((path.to_owned(), file_mode));
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty())
        && let Some(dir_mode) = mode(dir).filter(|mode| mode & 0o022 != 0)
    {
        loose.push((dir.to_owned(), dir_mode));
    }
    loose
}

/// The journal's `virustotal` events (sha256, time, detail), oldest first,
/// read without writing (the journal may not exist yet: then none). The
/// VirusTotal checker takes its verdicts from them after a restart.
pub fn virustotal_events(path: &Path) -> Result<Vec<(String, i64, String)>, StoreError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let read_error = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(read_error)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(read_error)?;
    let mut query = conn
        .prepare(
            "SELECT sha256, time, detail FROM events
             WHERE kind = 'virustotal' AND sha256 IS NOT NULL AND detail IS NOT NULL
             ORDER BY time, id",
        )
        .map_err(read_error)?;
    let rows = query
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .map_err(read_error)?;
    rows.collect::<Result<_, _>>().map_err(read_error)
}

impl Store {
    /// Opens (creating it if needed, readable by its owner only) and migrates the journal.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty())
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        if !path.exists() {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|source| StoreError::CreateFile {
                    path: path.to_owned(),
                    source,
                })?;
        }
        for (loose, mode) in loose_permissions(path) {
            tracing::warn!(
                path = %loose.display(),
                mode = format!("{mode:o}"),
                "the journal (or its directory) is open to other users: it lists every \
                 program and peer of this host; chmod it to 0600 (directory 0700)"
            );
        }
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_error)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        // WAL + NORMAL: a committed transaction survives a crash of the agent;
        // only a power loss can take back the last commits.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_error)?;
        schema::migrate(&mut conn).map_err(|source| StoreError::Schema {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            destination_learning_period: DEFAULT_DESTINATION_LEARNING_PERIOD,
        })
    }

    /// Sets `journal.destination_learning_period`.
    pub fn with_destination_learning_period(mut self, period: Duration) -> Self {
        self.destination_learning_period = period;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `batch` in one transaction, and deletes rollups and events older
    /// than `retention` before `now`. Returns the state of every executable in
    /// the batch and the events it caused, new ones included.
    pub fn flush(
        &mut self,
        batch: &Batch,
        window_start: i64,
        window_seconds: i64,
        now: i64,
        retention: Duration,
    ) -> Result<(Vec<ExecutableState>, Vec<Event>), StoreError> {
        let path = self.path.clone();
        let write_error = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(write_error)?;
        let mut states = Vec::with_capacity(batch.executables.len());
        let mut events = batch.events.clone();
        for ((exe, sha256), sightings) in &batch.executables {
            let (state, new_kind) =
                upsert_executable(&tx, exe, sha256, sightings).map_err(write_error)?;
            if let Some(kind) = new_kind {
                events.push(Event {
                    time: sightings.first,
                    kind,
                    exe: Some(exe.clone()),
                    sha256: Sha256::from_hex(sha256),
                    detail: event_detail(sightings),
                });
            }
            states.push(state);
        }
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO connections (window_start, window_seconds, exe, sha256, parent, uid,
                         transport, local_port, remote_address, remote_port, domain,
                         bytes_sent, bytes_received, process_name, user_name, command_line,
                         parent_name, parent_sha256, parent_command_line, local_address)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                         ?16, ?17, ?18, ?19, ?20)",
                )
                .map_err(write_error)?;
            for (flow, bytes) in batch.flows.iter() {
                // The journal keeps the flow's program and peer (every field of
                // picosnitch's conn.log); the workload and GeoIP context reaches
                // OTLP and the connection log.
                let FlowRecord {
                    program:
                        Program {
                            exe,
                            // Filled into sha256 before the flush.
                            file: _,
                            sha256,
                            parent,
                            parent_sha256,
                            parent_name,
                            command_line,
                            parent_command_line,
                            uid,
                            user_name,
                            comm,
                        },
                    peer:
                        Peer {
                            transport,
                            local_address,
                            local_port,
                            remote_address,
                            remote_port,
                            domain,
                            country: _,
                            asn: _,
                        },
                    workload: _,
                    bytes: _,
                } = flow;
                insert
                    .execute(params![
                        window_start,
                        window_seconds,
                        exe,
                        sha256.as_ref().map_or("", Sha256::as_str),
                        parent,
                        uid,
                        transport,
                        local_port,
                        remote_address.map(|address| address.to_string()),
                        remote_port,
                        domain,
                        bytes.sent as i64,
                        bytes.received as i64,
                        comm,
                        user_name,
                        command_line,
                        parent_name,
                        parent_sha256.as_ref().map(Sha256::as_str),
                        parent_command_line,
                        local_address.map(|address| address.to_string()),
                    ])
                    .map_err(write_error)?;
            }
            record_destinations(
                &tx,
                batch,
                window_start,
                now,
                self.destination_learning_period,
                &mut events,
            )
            .map_err(write_error)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (time, kind, exe, sha256, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(write_error)?;
            for event in &events {
                insert
                    .execute(params![
                        event.time,
                        event.kind.as_str(),
                        event.exe,
                        event.sha256.as_ref().map(Sha256::as_str),
                        event.detail
                    ])
                    .map_err(write_error)?;
            }
        }
        let horizon = now - retention.as_secs() as i64;
        tx.execute("DELETE FROM connections WHERE window_start < ?1", [horizon])
            .map_err(write_error)?;
        tx.execute("DELETE FROM events WHERE time < ?1", [horizon])
            .map_err(write_error)?;
        tx.commit().map_err(write_error)?;
        Ok((states, events))
    }

    /// First-seen times of a (path, sha256), if the journal knows it.
    pub fn executable_state(
        &self,
        path: &str,
        sha256: &str,
    ) -> Result<Option<ExecutableState>, StoreError> {
        let query = || -> rusqlite::Result<Option<ExecutableState>> {
            let first: Option<(i64, FirstRun)> = self
                .conn
                .query_row(
                    &format!(
                        "SELECT first_seen, {FIRST_RUN_COLUMNS} FROM executables
                         WHERE path = ?1 AND sha256 = ?2"
                    ),
                    params![path, sha256],
                    |row| Ok((row.get(0)?, FirstRun::from_row(row, 1)?)),
                )
                .optional()?;
            let Some((first_seen, first_run)) = first else {
                return Ok(None);
            };
            let path_first_seen: i64 = self.conn.query_row(
                "SELECT min(first_seen) FROM executables WHERE path = ?1",
                [path],
                |row| row.get(0),
            )?;
            let path_used_network: bool = self.conn.query_row(
                "SELECT max(used_network) FROM executables WHERE path = ?1",
                [path],
                |row| row.get(0),
            )?;
            Ok(Some(ExecutableState {
                path: path.to_owned(),
                sha256: sha256.to_owned(),
                first_seen,
                path_first_seen,
                path_used_network,
                first_run,
            }))
        };
        query().map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `PRAGMA integrity_check`; `Ok(())` when the journal is sound.
    pub fn integrity_check(&self) -> Result<(), String> {
        let verdict: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .map_err(|err| err.to_string())?;
        if verdict == "ok" {
            Ok(())
        } else {
            Err(verdict)
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Adds the destinations of the batch's flows to the baseline, and an event
/// for each one new to its build once the learning period has passed: the
/// build known on this host (any path) and the baseline recorded, both for
/// at least `learning_period`. Flows without a hash have no build to learn.
fn record_destinations(
    tx: &rusqlite::Transaction<'_>,
    batch: &Batch,
    window_start: i64,
    now: i64,
    learning_period: Duration,
    events: &mut Vec<Event>,
) -> rusqlite::Result<()> {
    let baseline_since: i64 = tx.query_row(
        "SELECT value FROM journal_info WHERE key = 'destinations_since'",
        [],
        |row| row.get(0),
    )?;
    let learning = learning_period.as_secs() as i64;
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO destinations (sha256, kind, value, first_seen)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut known_since =
        tx.prepare_cached("SELECT min(first_seen) FROM executables WHERE sha256 = ?1")?;
    for (flow, _) in batch.flows.iter() {
        let Some(sha256) = &flow.program.sha256 else {
            continue;
        };
        for (kind, value) in destinations(&flow.peer) {
            if insert.execute(params![sha256.as_str(), kind, value, window_start])? == 0 {
                continue;
            }
            let build_since: Option<i64> =
                known_since.query_row([sha256.as_str()], |row| row.get(0))?;
            let learned_since = build_since.unwrap_or(now).max(baseline_since);
            if now - learned_since >= learning {
                events.push(Event {
                    time: window_start,
                    kind: EventKind::NewDestination,
                    exe: Some(flow.program.exe.clone()),
                    sha256: Some(sha256.clone()),
                    detail: Some(destination_detail(kind, &value)),
                });
            }
        }
    }
    Ok(())
}

/// Inserts or refreshes one executable; says whether it is new to the host.
fn upsert_executable(
    tx: &rusqlite::Transaction<'_>,
    path: &str,
    sha256: &str,
    sightings: &Sightings,
) -> rusqlite::Result<(ExecutableState, Option<EventKind>)> {
    let existing: Option<(i64, i64, FirstRun)> = tx
        .query_row(
            &format!(
                "SELECT id, first_seen, {FIRST_RUN_COLUMNS} FROM executables
                 WHERE path = ?1 AND sha256 = ?2"
            ),
            params![path, sha256],
            |row| Ok((row.get(0)?, row.get(1)?, FirstRun::from_row(row, 2)?)),
        )
        .optional()?;
    let path_first_seen: Option<i64> = tx.query_row(
        "SELECT min(first_seen) FROM executables WHERE path = ?1",
        [path],
        |row| row.get(0),
    )?;
    let (id, first_seen, first_run, new_kind) = match existing {
        Some((id, first_seen, first_run)) => {
            tx.execute(
                "UPDATE executables SET last_seen = max(last_seen, ?2),
                     used_network = max(used_network, ?3),
                     hash_failure = coalesce(?4, hash_failure)
                 WHERE id = ?1",
                params![
                    id,
                    sightings.last,
                    sightings.used_network,
                    sightings.hash_failure
                ],
            )?;
            (id, first_seen, first_run, None)
        }
        None => {
            let first_run = sightings.first_run.clone().unwrap_or_default();
            tx.execute(
                &format!(
                    "INSERT INTO executables (path, sha256, first_seen, last_seen, used_network,
                         hash_failure, {FIRST_RUN_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    path,
                    sha256,
                    sightings.first,
                    sightings.last,
                    sightings.used_network,
                    sightings.hash_failure,
                    first_run.parent,
                    first_run.user,
                    first_run.workload.container_id,
                    first_run.workload.container_name,
                    first_run.workload.pod,
                    first_run.workload.namespace,
                ],
            )?;
            let kind = match path_first_seen {
                // An unhashable sighting of a known path is not a new hash.
                Some(_) if sha256.is_empty() => None,
                Some(_) if sightings.modified => Some(EventKind::Modified),
                Some(_) => Some(EventKind::NewHash),
                None => Some(EventKind::NewExecutable),
            };
            (tx.last_insert_rowid(), sightings.first, first_run, kind)
        }
    };
    for name in &sightings.names {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO executable_names (executable_id, name) VALUES (?1, ?2)",
        )?
        .execute(params![id, name])?;
    }
    for parent in &sightings.parents {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO executable_parents (executable_id, parent_path) VALUES (?1, ?2)",
        )?
        .execute(params![id, parent])?;
    }
    for uid in &sightings.users {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO executable_users (executable_id, uid) VALUES (?1, ?2)",
        )?
        .execute(params![id, uid])?;
    }
    let path_used_network: bool = tx.query_row(
        "SELECT max(used_network) FROM executables WHERE path = ?1",
        [path],
        |row| row.get(0),
    )?;
    Ok((
        ExecutableState {
            path: path.to_owned(),
            sha256: sha256.to_owned(),
            first_seen,
            path_first_seen: path_first_seen.unwrap_or(first_seen).min(first_seen),
            path_used_network,
            first_run,
        },
        new_kind,
    ))
}

/// Detail of a journal event about a new executable: what exec tracking
/// adds (no network use yet, why there is no hash, the command line).
fn event_detail(sightings: &Sightings) -> Option<String> {
    let mut parts = Vec::new();
    if !sightings.used_network {
        parts.push("exec only: never used the network".to_owned());
    }
    if let Some(reason) = sightings.hash_failure {
        parts.push(format!("not hashed: {reason}"));
    }
    if let Some(command_line) = &sightings.command_line {
        parts.push(format!("command line: {command_line}"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn seen(path: &str, sha: &str, at: i64) -> ExecutableSighting {
        ExecutableSighting {
            path: path.into(),
            file: ExeKey::default(),
            sha256: Sha256::from_hex(sha),
            name: "tool".into(),
            uid: 1000,
            user_name: Some("alice".into()),
            parent_path: Some("/bin/bash".into()),
            workload: Workload::default(),
            seen_at: at,
            modified: false,
            used_network: true,
            hash_failure: None,
            command_line: None,
        }
    }

    fn flow(exe: &str, sent: u64) -> FlowRecord {
        use crate::model::{Bytes, Peer, Program};
        FlowRecord {
            program: Program {
                exe: exe.into(),
                sha256: Sha256::from_hex("aa"),
                uid: Some(0),
                ..Program::default()
            },
            peer: Peer {
                transport: "tcp",
                local_port: Some(40000),
                remote_address: "198.18.0.2".parse().ok(),
                remote_port: Some(443),
                ..Peer::default()
            },
            bytes: Bytes { sent, received: 1 },
            ..FlowRecord::default()
        }
    }

    #[test]
    fn new_executable_then_new_hash_then_nothing_new() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db")).unwrap();

        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 100));
        let (states, events) = store.flush(&batch, 90, 10, 100, DAY).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::NewExecutable);
        assert_eq!(states[0].first_seen, 100);

        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "bb", 200));
        let (states, events) = store.flush(&batch, 190, 10, 200, DAY).unwrap();
        assert_eq!(events[0].kind, EventKind::NewHash);
        assert_eq!(states[0].first_seen, 200);
        assert_eq!(states[0].path_first_seen, 100);

        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 300));
        let (states, events) = store.flush(&batch, 290, 10, 300, DAY).unwrap();
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(states[0].first_seen, 100);
    }

    /// Who ran a version first is kept from its earliest sighting: later
    /// sightings (another user, another pod) and a reopened journal keep it.
    #[test]
    fn who_ran_a_version_first_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let in_pod = |at: i64, user: &str, pod: &str| ExecutableSighting {
            user_name: Some(user.into()),
            workload: Workload {
                container_id: Some(format!("c-{pod}")),
                container_name: Some("app".into()),
                pod: Some(pod.into()),
                namespace: Some("shop".into()),
            },
            ..seen("/usr/bin/tool", "aa", at)
        };
        let mut store = Store::open(&path).unwrap();
        let mut batch = Batch::default();
        // Sightings arrive out of order within one write: the earliest wins.
        batch.add_executable(in_pod(105, "bob", "web-2"));
        batch.add_executable(in_pod(100, "alice", "web-1"));
        batch.add_executable(in_pod(110, "carol", "web-3"));
        let (states, _) = store.flush(&batch, 90, 10, 110, DAY).unwrap();
        let expected = FirstRun {
            parent: Some("/bin/bash".into()),
            user: Some("alice".into()),
            workload: Workload {
                container_id: Some("c-web-1".into()),
                container_name: Some("app".into()),
                pod: Some("web-1".into()),
                namespace: Some("shop".into()),
            },
        };
        assert_eq!(states[0].first_run, expected);

        let mut batch = Batch::default();
        batch.add_executable(in_pod(200, "mallory", "other"));
        let (states, _) = store.flush(&batch, 190, 10, 200, DAY).unwrap();
        assert_eq!(
            states[0].first_run, expected,
            "a later sighting changes nothing"
        );
        drop(store);

        let store = Store::open(&path).unwrap();
        let state = store
            .executable_state("/usr/bin/tool", "aa")
            .unwrap()
            .unwrap();
        assert_eq!(state.first_run, expected, "kept across a reopen");
        // A version first seen with nothing known has nothing recorded.
        let mut store = store;
        let mut batch = Batch::default();
        batch.add_executable(ExecutableSighting {
            user_name: None,
            parent_path: None,
            ..seen("/usr/bin/tool", "bb", 300)
        });
        let (states, _) = store.flush(&batch, 290, 10, 300, DAY).unwrap();
        assert_eq!(states[0].first_run, FirstRun::default());
    }

    /// A flow of build "aa" at `/usr/bin/tool` to `domain`, `country`, `asn`.
    fn flow_to(domain: Option<&str>, country: Option<&str>, asn: Option<u32>) -> FlowRecord {
        let mut flow = flow("/usr/bin/tool", 10);
        flow.peer.domain = domain.map(str::to_owned);
        flow.peer.country = country.map(str::to_owned);
        flow.peer.asn = asn;
        flow
    }

    fn destination_events(events: &[Event]) -> Vec<(String, String)> {
        events
            .iter()
            .filter(|event| event.kind == EventKind::NewDestination)
            .map(|event| {
                (
                    event.exe.clone().unwrap_or_default(),
                    event.detail.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// A journal whose destination baseline began at 0 (fake times below).
    fn store_learning_for(dir: &Path, period: Duration) -> Store {
        let store = Store::open(&dir.join("j.db"))
            .unwrap()
            .with_destination_learning_period(period);
        store
            .connection()
            .execute(
                "UPDATE journal_info SET value = 0 WHERE key = 'destinations_since'",
                [],
            )
            .unwrap();
        store
    }

    #[test]
    fn a_known_build_talking_somewhere_new_is_an_event_once_learned() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_learning_for(dir.path(), Duration::from_secs(100));

        // Learning: the build is 0 s old; what it talks to is the baseline.
        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 1_000));
        batch.add_flow(flow_to(Some("a.example"), Some("DE"), Some(64_500)));
        let (_, events) = store.flush(&batch, 990, 10, 1_000, DAY).unwrap();
        assert_eq!(destination_events(&events), []);

        // Learned (150 s later): the baseline's destinations are not new, a
        // new domain, country and AS each are, once.
        let mut batch = Batch::default();
        batch.add_flow(flow_to(Some("a.example"), Some("DE"), Some(64_500)));
        batch.add_flow(flow_to(Some("b.example"), Some("FR"), Some(64_501)));
        batch.add_flow(flow_to(Some("b.example"), None, None));
        let (_, events) = store.flush(&batch, 1_140, 10, 1_150, DAY).unwrap();
        let tool = "/usr/bin/tool".to_owned();
        assert_eq!(
            destination_events(&events),
            [
                (tool.clone(), "domain b.example".to_owned()),
                (tool.clone(), "country FR".to_owned()),
                (tool.clone(), "asn 64501".to_owned()),
            ]
        );
        assert!(events.iter().all(|e| e.sha256 == Sha256::from_hex("aa")));
        let stored: i64 = store
            .connection()
            .query_row(
                "SELECT count(*) FROM events WHERE kind = 'new_destination'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 3);

        let mut batch = Batch::default();
        batch.add_flow(flow_to(Some("b.example"), Some("FR"), Some(64_501)));
        let (_, events) = store.flush(&batch, 1_190, 10, 1_200, DAY).unwrap();
        assert_eq!(destination_events(&events), []);
    }

    #[test]
    fn a_baseline_younger_than_the_learning_period_raises_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_learning_for(dir.path(), Duration::from_secs(100));
        // The build is old, but the baseline (an upgraded journal) began at 950.
        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 10));
        store.flush(&batch, 0, 10, 10, DAY).unwrap();
        store
            .connection()
            .execute(
                "UPDATE journal_info SET value = 950 WHERE key = 'destinations_since'",
                [],
            )
            .unwrap();
        let mut batch = Batch::default();
        batch.add_flow(flow_to(Some("a.example"), None, None));
        let (_, events) = store.flush(&batch, 990, 10, 1_000, DAY).unwrap();
        assert_eq!(destination_events(&events), []);
        let mut batch = Batch::default();
        batch.add_flow(flow_to(Some("b.example"), None, None));
        let (_, events) = store.flush(&batch, 1_040, 10, 1_050, DAY).unwrap();
        assert_eq!(
            destination_events(&events),
            [("/usr/bin/tool".to_owned(), "domain b.example".to_owned())]
        );
    }

    #[test]
    fn flows_without_a_hash_have_no_destinations() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_learning_for(dir.path(), Duration::ZERO);
        let mut unhashed = flow_to(Some("a.example"), Some("DE"), None);
        unhashed.program.sha256 = None;
        let mut batch = Batch::default();
        batch.add_flow(unhashed);
        let (_, events) = store.flush(&batch, 90, 10, 100, DAY).unwrap();
        assert_eq!(destination_events(&events), []);
        let rows: i64 = store
            .connection()
            .query_row("SELECT count(*) FROM destinations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn destination_details_name_their_kind() {
        for kind in DESTINATION_KINDS {
            assert_eq!(
                destination_kind(&destination_detail(kind, "x y")),
                Some(kind)
            );
        }
        assert_eq!(destination_kind("port 443"), None);
    }

    #[test]
    fn in_place_modification_is_journaled_as_modified_not_new_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db")).unwrap();
        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 100));
        store.flush(&batch, 90, 10, 100, DAY).unwrap();
        let mut batch = Batch::default();
        let mut modified = seen("/usr/bin/tool", "cc", 150);
        modified.modified = true;
        batch.add_executable(modified);
        let (_, events) = store.flush(&batch, 140, 10, 150, DAY).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Modified);
        assert_eq!(events[0].sha256, Sha256::from_hex("cc"));
    }

    #[test]
    fn reopened_journal_remembers_what_it_saw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let mut store = Store::open(&path).unwrap();
            let mut batch = Batch::default();
            batch.add_executable(seen("/usr/bin/tool", "aa", 100));
            store.flush(&batch, 90, 10, 100, DAY).unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 500));
        let (_, events) = store.flush(&batch, 490, 10, 500, DAY).unwrap();
        assert!(events.is_empty());
        let state = store
            .executable_state("/usr/bin/tool", "aa")
            .unwrap()
            .unwrap();
        assert_eq!(state.first_seen, 100);
    }

    #[test]
    fn rollups_of_one_peer_merge_within_a_window_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db")).unwrap();
        let mut batch = Batch::default();
        batch.add_flow(flow("/usr/bin/tool", 10));
        batch.add_flow(flow("/usr/bin/tool", 5));
        store.flush(&batch, 0, 10, 10, DAY).unwrap();
        let (rows, sent): (i64, i64) = store
            .connection()
            .query_row(
                "SELECT count(*), sum(bytes_sent) FROM connections",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, sent), (1, 15));

        // Two days later the window is past retention and goes.
        store
            .flush(&Batch::default(), 0, 10, 2 * 86_400, DAY)
            .unwrap();
        let rows: i64 = store
            .connection()
            .query_row("SELECT count(*) FROM connections", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn journal_is_created_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/j.db");
        Store::open(&path).unwrap();
        let file_mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(file_mode, 0o600);
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn missing_parent_that_cannot_be_created_names_the_directory() {
        let err = Store::open(Path::new("/proc/fleetsnitch-test/j.db"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/proc/fleetsnitch-test"), "{err}");
    }

    #[test]
    fn exec_only_program_is_marked_until_it_uses_the_network() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db")).unwrap();
        let mut batch = Batch::default();
        let mut exec = seen("/usr/bin/quiet", "aa", 100);
        exec.used_network = false;
        exec.command_line = Some("quiet --now".into());
        batch.add_executable(exec);
        let (states, events) = store.flush(&batch, 90, 10, 100, DAY).unwrap();
        assert!(!states[0].path_used_network);
        let detail = events[0].detail.as_deref().unwrap_or_default();
        assert!(
            detail.contains("never used the network") && detail.contains("quiet --now"),
            "{detail}"
        );

        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/quiet", "aa", 200));
        let (states, events) = store.flush(&batch, 190, 10, 200, DAY).unwrap();
        assert!(events.is_empty(), "{events:?}");
        assert!(states[0].path_used_network);
        let used: i64 = store
            .connection()
            .query_row("SELECT used_network FROM executables", [], |r| r.get(0))
            .unwrap();
        assert_eq!(used, 1);
    }

    #[test]
    fn unhashed_program_keeps_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db")).unwrap();
        let mut batch = Batch::default();
        let mut exec = seen("/tmp/gone", "", 100);
        exec.sha256 = None;
        exec.used_network = false;
        exec.hash_failure = Some("process_exited");
        batch.add_executable(exec);
        store.flush(&batch, 90, 10, 100, DAY).unwrap();
        let reason: String = store
            .connection()
            .query_row("SELECT hash_failure FROM executables", [], |r| r.get(0))
            .unwrap();
        assert_eq!(reason, "process_exited");
    }

    #[test]
    fn names_parents_and_users_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db")).unwrap();
        let mut batch = Batch::default();
        batch.add_executable(seen("/usr/bin/tool", "aa", 100));
        let mut other = seen("/usr/bin/tool", "aa", 101);
        other.name = "tool2".into();
        other.uid = 0;
        other.parent_path = Some("/usr/bin/cron".into());
        batch.add_executable(other);
        store.flush(&batch, 90, 10, 101, DAY).unwrap();
        let count =
            |sql: &str| -> i64 { store.connection().query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT count(*) FROM executable_names"), 2);
        assert_eq!(count("SELECT count(*) FROM executable_parents"), 2);
        assert_eq!(count("SELECT count(*) FROM executable_users"), 2);
    }
}
