//! The journal's schema and its migrations.
//!
//! The schema version lives in SQLite's `user_version`. Each migration moves
//! the journal one version forward inside a transaction, so a journal is
//! always at a version this code knows, and a newer journal is refused
//! instead of being misread.

use rusqlite::{Connection, Transaction};

/// Migrations in order: entry `i` upgrades version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: executables, what ran them, connection rollups, events.
    "
    CREATE TABLE executables (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        -- Hex sha256; '' when the executable could not be hashed.
        sha256 TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        UNIQUE (path, sha256)
    );
    CREATE TABLE executable_names (
        executable_id INTEGER NOT NULL REFERENCES executables (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        PRIMARY KEY (executable_id, name)
    ) WITHOUT ROWID;
    CREATE TABLE executable_parents (
        executable_id INTEGER NOT NULL REFERENCES executables (id) ON DELETE CASCADE,
        parent_path TEXT NOT NULL,
        PRIMARY KEY (executable_id, parent_path)
    ) WITHOUT ROWID;
    CREATE TABLE executable_users (
        executable_id INTEGER NOT NULL REFERENCES executables (id) ON DELETE CASCADE,
        uid INTEGER NOT NULL,
        PRIMARY KEY (executable_id, uid)
    ) WITHOUT ROWID;
    CREATE TABLE connections (
        id INTEGER PRIMARY KEY,
        window_start INTEGER NOT NULL,
        window_seconds INTEGER NOT NULL,
        exe TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        parent TEXT,
        uid INTEGER,
        transport TEXT NOT NULL,
        local_port INTEGER,
        remote_address TEXT,
        remote_port INTEGER,
        domain TEXT,
        bytes_sent INTEGER NOT NULL,
        bytes_received INTEGER NOT NULL
    );
    CREATE INDEX connections_by_window ON connections (window_start);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        kind TEXT NOT NULL,
        exe TEXT,
        sha256 TEXT,
        detail TEXT
    );
    CREATE INDEX events_by_time ON events (time);
    ",
    // 2: exec tracking. Programs journaled from an exec alone are marked as
    // never having used the network (rows before this were all from traffic),
    // and an unhashed program keeps why it could not be hashed.
    "
    ALTER TABLE executables ADD COLUMN used_network INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE executables ADD COLUMN hash_failure TEXT;
    ",
    // 3: destinations. Every domain, country and AS each build (sha256) talked
    // to on this host, the baseline of new-destination events; and when that
    // baseline began (a journal upgraded to this version has no history of
    // destinations, so its learning period starts now).
    "
    CREATE TABLE destinations (
        sha256 TEXT NOT NULL,
        -- domain, country or asn
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        PRIMARY KEY (sha256, kind, value)
    ) WITHOUT ROWID;
    CREATE TABLE journal_info (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO journal_info (key, value)
        VALUES ('destinations_since', CAST(strftime('%s', 'now') AS INTEGER));
    ",
    // 4: every field of picosnitch's conn.log in the rollups: the process's
    // and its parent's names, the parent's sha256, the user name beside the
    // uid, the local address, and the command lines when recorded.
    "
    ALTER TABLE connections ADD COLUMN process_name TEXT;
    ALTER TABLE connections ADD COLUMN user_name TEXT;
    ALTER TABLE connections ADD COLUMN command_line TEXT;
    ALTER TABLE connections ADD COLUMN parent_name TEXT;
    ALTER TABLE connections ADD COLUMN parent_sha256 TEXT;
    ALTER TABLE connections ADD COLUMN parent_command_line TEXT;
    ALTER TABLE connections ADD COLUMN local_address TEXT;
    ",
    // 5: who ran each (path, sha256) when it was first seen here: the
    // parent's path, the user's name, the container and pod (NULL where
    // unknown, and for executables first seen before this version).
    "
    ALTER TABLE executables ADD COLUMN first_parent TEXT;
    ALTER TABLE executables ADD COLUMN first_user TEXT;
    ALTER TABLE executables ADD COLUMN first_container_id TEXT;
    ALTER TABLE executables ADD COLUMN first_container_name TEXT;
    ALTER TABLE executables ADD COLUMN first_pod TEXT;
    ALTER TABLE executables ADD COLUMN first_namespace TEXT;
    ",
];

/// The version this code writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the journal is at schema version {found}, newer than this agent's {CURRENT_VERSION}: \
         upgrade the agent or point --journal.path elsewhere"
    )]
    TooNew { found: u32 },
    #[error("migrating the journal to schema version {version}: {source}")]
    Migration {
        version: u32,
        source: rusqlite::Error,
    },
    #[error("reading the journal's schema version: {0}")]
    Version(rusqlite::Error),
}

pub fn version(conn: &Connection) -> Result<u32, rusqlite::Error> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Brings the journal to [`CURRENT_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), SchemaError> {
    let found = version(conn).map_err(SchemaError::Version)?;
    if found > CURRENT_VERSION {
        return Err(SchemaError::TooNew { found });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let target = index as u32 + 1;
        let apply = |tx: &Transaction<'_>| -> rusqlite::Result<()> {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", target)
        };
        let tx = conn
            .transaction()
            .map_err(|source| SchemaError::Migration {
                version: target,
                source,
            })?;
        apply(&tx)
            .and_then(|()| tx.commit())
            .map_err(|source| SchemaError::Migration {
                version: target,
                source,
            })?;
        tracing::info!(version = target, "journal schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_journal_reaches_the_current_version_and_stays_there() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), CURRENT_VERSION);
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), CURRENT_VERSION);
    }

    #[test]
    fn version_1_rows_are_marked_as_networked() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO executables (path, sha256, first_seen, last_seen) VALUES ('/bin/x', 'aa', 1, 1)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let used: i64 = conn
            .query_row("SELECT used_network FROM executables", [], |r| r.get(0))
            .unwrap();
        assert_eq!(used, 1);
    }

    #[test]
    fn an_upgraded_journal_starts_its_destination_baseline_at_the_upgrade() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        let before = crate::support::unix_now();
        migrate(&mut conn).unwrap();
        let since: i64 = conn
            .query_row(
                "SELECT value FROM journal_info WHERE key = 'destinations_since'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            (before..=before + 5).contains(&since),
            "{since} vs {before}"
        );
    }

    #[test]
    fn newer_journal_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", CURRENT_VERSION + 1)
            .unwrap();
        let err = migrate(&mut conn).unwrap_err().to_string();
        assert!(err.contains("newer than this agent"), "{err}");
    }
}
