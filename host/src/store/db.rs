//! The database side of the credential store, for [`super::CredentialStore`]:
//! connecting (SQLite or PostgreSQL, both through sqlx's `Any` driver),
//! migrating, and the store's queries.
//!
//! Every query has one SQL text valid on both databases: `$N` placeholders
//! (SQLite reads `$1` as a parameter named "1", bound by position), BIGINT
//! milliseconds, BYTEA blobs (SQLite stores a bound blob as a blob whatever
//! the declared type). "Newest" means highest `version`, a per-(user,
//! provider) counter assigned inside the INSERT, not the clock: thousands
//! of records can share one millisecond.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, Row};

use super::{StoreError, StoredRecord};

/// Migrations of `host/migrations/`, compiled in.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Attempts at an insert that loses the race for a version number to a
/// concurrent insert of the same (user, provider). Each lost round means
/// another insert won, so this only runs out under absurd contention.
const INSERT_ATTEMPTS: usize = 32;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// `sqlite:` URLs.
    Sqlite,
    /// `postgres:` and `postgresql:` URLs.
    Postgres,
}

impl Backend {
    fn of(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?;
        match scheme {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }

    /// Name for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }

    fn max_connections(self) -> u32 {
        // SQLite serialises writers anyway; a few connections let reads
        // proceed beside a write (WAL).
        match self {
            Self::Sqlite => 4,
            Self::Postgres => 8,
        }
    }
}

/// One stored row, still encrypted.
pub(crate) struct EncryptedRow {
    pub(crate) record: StoredRecord,
    pub(crate) nonce: Vec<u8>,
    pub(crate) ciphertext: Vec<u8>,
}

/// A row to insert (its version is assigned by the database).
pub(crate) struct NewRow<'a> {
    pub(crate) id: &'a str,
    pub(crate) user_id: &'a str,
    pub(crate) provider: &'a str,
    pub(crate) key_id: &'a str,
    pub(crate) nonce: &'a [u8],
    pub(crate) ciphertext: &'a [u8],
    pub(crate) created_at_ms: i64,
    /// The login session it came from, when it came from one.
    pub(crate) session_id: Option<&'a str>,
}

/// Connects to `url` and brings its schema up to date.
pub(crate) async fn connect(url: &str) -> Result<(AnyPool, Backend), StoreError> {
    let backend = Backend::of(url).ok_or_else(|| StoreError::UnsupportedUrl {
        url: redact_url(url),
    })?;
    sqlx::any::install_default_drivers();
    if backend == Backend::Sqlite {
        prepare_sqlite_file(url)?;
    }
    let pool = AnyPoolOptions::new()
        .max_connections(backend.max_connections())
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .map_err(|source| StoreError::Connect {
            backend: backend.name(),
            source,
        })?;
    if backend == Backend::Sqlite {
        // WAL: readers do not block the writer, and a commit is one fsync
        // of the log instead of a journal file created and deleted. The
        // mode is stored in the file, so later connections inherit it (the
        // Any driver takes no journal_mode option in its URL).
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await
            .map_err(db_err("switching SQLite to WAL mode"))?;
    }
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| StoreError::Migrate { source })?;
    Ok((pool, backend))
}

/// Creates a missing SQLite database file as an empty 0600 file (and its
/// directory, 0700), so that SQLite never creates it with the umask's
/// looser mode; SQLite gives its journal and WAL files the database file's
/// mode. An existing file is used as it is.
fn prepare_sqlite_file(url: &str) -> Result<(), StoreError> {
    let Some(path) = sqlite_path(url)? else {
        return Ok(());
    };
    let create_err = |source| StoreError::CreateDb {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(create_err)?;
        }
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(_) => {
            tracing::info!(path = %path.display(), "created the credential database");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            warn_if_loose(&path);
            Ok(())
        }
        Err(e) => Err(create_err(e)),
    }
}

/// The file an SQLite URL names, or `None` for an in-memory database.
fn sqlite_path(url: &str) -> Result<Option<PathBuf>, StoreError> {
    let options = SqliteConnectOptions::from_str(url).map_err(|_| StoreError::UnsupportedUrl {
        url: redact_url(url),
    })?;
    let path = options.get_filename();
    let in_memory = url.contains(":memory:")
        || url.contains("mode=memory")
        || path.to_string_lossy().starts_with("file:");
    Ok((!in_memory).then(|| path.to_path_buf()))
}

fn warn_if_loose(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            // Only ciphertext lives there, but user ids and timestamps too.
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:03o}"),
                "the credential database is accessible by group or others; chmod 600 it"
            );
        }
    }
}

/// `url` with any password replaced by `***`, for messages and `Debug`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = url[..rest_start].to_string();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => out.push_str(&format!("{}:***", &userinfo[..colon])),
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    // A password may also come as a query parameter.
    match tail.find("password=") {
        Some(p) => {
            let value_end = tail[p..].find('&').map_or(tail.len(), |e| p + e);
            out.push_str(&tail[..p]);
            out.push_str("password=***");
            out.push_str(&tail[value_end..]);
        }
        None => out.push_str(tail),
    }
    out
}

const INSERT: &str = "\
INSERT INTO credential_records
    (id, user_id, provider, version, key_id, nonce, ciphertext, created_at_ms, session_id)
SELECT $1, $2, $3, COALESCE(MAX(version), 0) + 1, $4, $5, $6, $7, $8
FROM credential_records
WHERE user_id = $2 AND provider = $3";

// sqlx only takes static SQL text (injection safety), so each query spells
// its column list out.
const LATEST: &str = "\
SELECT id, user_id, provider, key_id, created_at_ms, delivered_at_ms, delivered_vm,
       nonce, ciphertext
FROM credential_records
WHERE user_id = $1 AND provider = $2
ORDER BY version DESC
LIMIT 1";

const BY_ID: &str = "\
SELECT id, user_id, provider, key_id, created_at_ms, delivered_at_ms, delivered_vm,
       nonce, ciphertext
FROM credential_records
WHERE id = $1";

const BY_SESSION: &str = "\
SELECT id, user_id, provider, key_id, created_at_ms, delivered_at_ms, delivered_vm
FROM credential_records
WHERE session_id = $1";

const KEY_IDS: &str = "SELECT DISTINCT key_id FROM credential_records ORDER BY key_id";

const MARK_DELIVERED: &str = "\
UPDATE credential_records SET delivered_at_ms = $1, delivered_vm = $2 WHERE id = $3";

const NEWEST: &str = "\
SELECT c.id, c.user_id, c.provider, c.key_id, c.created_at_ms, c.delivered_at_ms,
       c.delivered_vm
FROM credential_records c
WHERE c.user_id = $1
  AND c.version = (SELECT MAX(m.version) FROM credential_records m
                   WHERE m.user_id = c.user_id AND m.provider = c.provider)
ORDER BY c.provider";

/// Inserts a new version of (user, provider).
pub(crate) async fn insert(pool: &AnyPool, row: &NewRow<'_>) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = sqlx::query(INSERT)
            .bind(row.id)
            .bind(row.user_id)
            .bind(row.provider)
            .bind(row.key_id)
            .bind(row.nonce)
            .bind(row.ciphertext)
            .bind(row.created_at_ms)
            .bind(row.session_id)
            .execute(pool)
            .await;
        match result {
            Ok(_) => return Ok(()),
            // PostgreSQL: a concurrent insert took the same version; the
            // next attempt sees it and takes the one after.
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation() && attempt < INSERT_ATTEMPTS =>
            {
                tracing::debug!(
                    record_id = row.id,
                    attempt,
                    "version taken concurrently; retrying"
                );
            }
            Err(source) => {
                return Err(StoreError::Database {
                    op: "inserting a credential record",
                    source,
                })
            }
        }
    }
}

/// The newest row of (user, provider).
pub(crate) async fn latest(
    pool: &AnyPool,
    user_id: &str,
    provider: &str,
) -> Result<Option<EncryptedRow>, StoreError> {
    let row = sqlx::query(LATEST)
        .bind(user_id)
        .bind(provider)
        .fetch_optional(pool)
        .await
        .map_err(db_err("reading the newest credential record"))?;
    row.map(|r| encrypted_row(&r)).transpose()
}

/// The row with this id.
pub(crate) async fn by_id(pool: &AnyPool, id: &str) -> Result<Option<EncryptedRow>, StoreError> {
    let row = sqlx::query(BY_ID)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db_err("reading a credential record"))?;
    row.map(|r| encrypted_row(&r)).transpose()
}

/// The record a login session stored, if it stored one.
pub(crate) async fn by_session(
    pool: &AnyPool,
    session_id: &str,
) -> Result<Option<StoredRecord>, StoreError> {
    let row = sqlx::query(BY_SESSION)
        .bind(session_id)
        .fetch_optional(pool)
        .await
        .map_err(db_err("reading a session's credential record"))?;
    row.map(|r| record(&r)).transpose()
}

/// The distinct key ids stored records use.
pub(crate) async fn key_ids_in_use(pool: &AnyPool) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(KEY_IDS)
        .fetch_all(pool)
        .await
        .map_err(db_err("listing the key ids in use"))?;
    rows.iter()
        .map(|r| r.try_get(0).map_err(db_err("decoding a key id")))
        .collect()
}

/// Sets the delivery columns; false when no row has this id.
pub(crate) async fn mark_delivered(
    pool: &AnyPool,
    id: &str,
    vm_id: &str,
    at_ms: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(MARK_DELIVERED)
        .bind(at_ms)
        .bind(vm_id)
        .bind(id)
        .execute(pool)
        .await
        .map_err(db_err("marking a credential record delivered"))?;
    Ok(done.rows_affected() > 0)
}

/// Per provider of the user, the newest row.
pub(crate) async fn newest(pool: &AnyPool, user_id: &str) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query(NEWEST)
        .bind(user_id)
        .fetch_all(pool)
        .await
        .map_err(db_err("listing a user's newest credential records"))?;
    rows.iter().map(record).collect()
}

fn record(row: &AnyRow) -> Result<StoredRecord, StoreError> {
    let decode = db_err("decoding a credential record");
    Ok(StoredRecord {
        id: row.try_get("id").map_err(&decode)?,
        user_id: row.try_get("user_id").map_err(&decode)?,
        provider: row.try_get("provider").map_err(&decode)?,
        key_id: row.try_get("key_id").map_err(&decode)?,
        created_at_ms: row.try_get("created_at_ms").map_err(&decode)?,
        delivered_at_ms: row.try_get("delivered_at_ms").map_err(&decode)?,
        delivered_vm: row.try_get("delivered_vm").map_err(&decode)?,
    })
}

fn encrypted_row(row: &AnyRow) -> Result<EncryptedRow, StoreError> {
    let decode = db_err("decoding a credential record");
    Ok(EncryptedRow {
        record: record(row)?,
        nonce: row.try_get("nonce").map_err(&decode)?,
        ciphertext: row.try_get("ciphertext").map_err(&decode)?,
    })
}

fn db_err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |source| StoreError::Database { op, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/airlock?sslmode=disable"),
            "postgres://app:***@db:5432/airlock?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://app@db/airlock?password=s3cret&x=1"),
            "postgres://app@db/airlock?password=***&x=1"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/airlock/airlock.db"),
            "sqlite:///var/lib/airlock/airlock.db"
        );
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_path("sqlite:///var/lib/airlock/airlock.db").unwrap(),
            Some(PathBuf::from("/var/lib/airlock/airlock.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:").unwrap(), None);
    }

    #[test]
    fn backends_are_chosen_by_scheme() {
        assert_eq!(Backend::of("sqlite://x.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of("postgresql://h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of("mysql://h/db"), None);
    }
}
