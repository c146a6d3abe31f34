//! Encrypted credential store: the OAuth credential files a login produced
//! (a [`CredentialBundle`]), encrypted with AES-256-GCM and kept in SQLite
//! or PostgreSQL, with a record of which CLI VM each was delivered to.
//!
//! airlockd opens one [`CredentialStore`] at startup from the `[store]`
//! section of its config ([`StoreConfig`]); the login flow calls
//! [`CredentialStore::put`] when a browser VM hands over credentials, and
//! delivery calls [`CredentialStore::latest`] / [`CredentialStore::newest`]
//! and [`CredentialStore::mark_delivered`]. Operators rotate keys with
//! [`rotate_key`].
//!
//! The same database keeps the login sessions ([`SessionRow`]), so that a
//! restarted airlockd finds them.
//!
//! Layout: `keys` (the key file), `crypto` (sealing, scrubbed buffers),
//! `db` (connection, migrations, queries), `sessions` (the sessions' rows). Nothing secret reaches an error,
//! a log line or a `Debug` output: keys, plaintext and file contents are
//! held in types that redact themselves, and decryption failures name only
//! the record.

mod crypto;
mod db;
mod keys;
mod sessions;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use airlock_proto::SecretBytes;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Hides a password in a database URL (for printing configs and logs).
pub use db::redact_url;
pub use keys::{rotate_key, KeyError};
pub use sessions::SessionRow;
/// The sqlx crate the store is built on, so that callers holding
/// [`CredentialStore::pool`] (other tables of airlockd, tests) use the
/// same version.
pub use sqlx;

use db::{Backend, EncryptedRow, NewRow};
use keys::Keyring;

/// Longest accepted user id or provider name, in bytes.
const MAX_LABEL_LEN: usize = 256;
/// Random bytes in a record id (shown as hex).
const RECORD_ID_BYTES: usize = 16;

/// Where and how credentials are stored: the `[store]` section of
/// airlockd's config.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Database URL: `sqlite:///var/lib/airlock/airlock.db` (the default;
    /// a missing file is created with mode 0600) or
    /// `postgres://user@host:port/db`. Passwords in it are never printed.
    pub url: String,
    /// The key file (see [`rotate_key`] for its format); created with one
    /// fresh key, mode 0600, when missing.
    pub key_file: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite:///var/lib/airlock/airlock.db".into(),
            key_file: PathBuf::from("/var/lib/airlock/store.keys"),
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &db::redact_url(&self.url))
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// What a login produced: one or more files for the CLI VM. `Debug` shows
/// paths, modes and sizes, never contents.
#[derive(Clone, Serialize, Deserialize)]
pub struct CredentialBundle {
    /// The files, written into the CLI VM in this order.
    pub files: Vec<CredentialFile>,
}

/// One credential file.
#[derive(Clone, Serialize, Deserialize)]
pub struct CredentialFile {
    /// Where it goes in the CLI VM (e.g. `.codex/auth.json` under the home
    /// directory; the delivery code decides how to resolve it).
    pub path: String,
    /// Unix permission bits (0o600 for the vendors' credential files).
    pub mode: u32,
    /// The file's bytes.
    pub contents: SecretBytes,
}

impl fmt::Debug for CredentialBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialBundle")
            .field("files", &self.files)
            .finish()
    }
}

impl fmt::Debug for CredentialFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialFile")
            .field("path", &self.path)
            .field("mode", &format_args!("{:#o}", self.mode))
            .field(
                "contents",
                &format_args!("<{} bytes redacted>", self.contents.len()),
            )
            .finish()
    }
}

/// Metadata of one stored credential version (nothing secret).
#[derive(Debug, Clone, Serialize)]
pub struct StoredRecord {
    /// Random id (32 hex digits).
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// CLI provider, e.g. `codex`.
    pub provider: String,
    /// Id of the key that encrypted it.
    pub key_id: String,
    /// When it was stored (Unix ms).
    pub created_at_ms: i64,
    /// When it was last written into a CLI VM (Unix ms).
    pub delivered_at_ms: Option<i64>,
    /// The VM it was last written into.
    pub delivered_vm: Option<String>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL's scheme is neither SQLite nor PostgreSQL (or it does not parse).
    #[error("unsupported store url {url}: use sqlite:///PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl {
        /// The URL, password redacted.
        url: String,
    },
    /// The SQLite file (or its directory) could not be created.
    #[error("cannot create the credential database {path}: {source}")]
    CreateDb {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The database is unreachable or refused the connection.
    #[error("cannot connect to the {backend} credential database: {source}")]
    Connect {
        /// `SQLite` or `PostgreSQL`.
        backend: &'static str,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date.
    #[error("cannot migrate the credential database: {source}")]
    Migrate {
        /// Cause.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("credential database error while {op}: {source}")]
    Database {
        /// What the store was doing.
        op: &'static str,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// The key file is unusable.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A user id or provider is empty or too long.
    #[error("invalid {field}: must be 1 to {MAX_LABEL_LEN} bytes")]
    InvalidLabel {
        /// `user_id` or `provider`.
        field: &'static str,
    },
    /// No record has this id.
    #[error("no credential record with id {id}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The record's key id is not in the key file.
    #[error(
        "credential record {record_id} was encrypted with key {key_id}, which the key file \
         does not list (was a key removed from it?)"
    )]
    UnknownKey {
        /// The key id stored with the record.
        key_id: String,
        /// The record.
        record_id: String,
    },
    /// Authentication failed: wrong key material or a tampered row.
    #[error("credential record {record_id} failed authentication: wrong key or tampered record")]
    Decrypt {
        /// The record.
        record_id: String,
    },
    /// Authentic, but not a bundle (written by an incompatible version).
    #[error("credential record {record_id} decrypted but is not a valid credential bundle")]
    Corrupt {
        /// The record.
        record_id: String,
    },
    /// Encryption could not be done.
    #[error("cannot encrypt the credential: {0}")]
    Encrypt(&'static str),
}

/// The credential store. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct CredentialStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: sqlx::AnyPool,
    backend: Backend,
    keys: Keyring,
    rng: SystemRandom,
    /// SQLite allows one writer at a time, and its busy handler (sleep and
    /// retry) can starve a waiting writer past its timeout ("database is
    /// locked") under steady writes. Queueing this process's writers on a
    /// fair lock instead makes each wait only for the writes before it.
    /// PostgreSQL needs no such lock.
    write_lock: Option<tokio::sync::Mutex<()>>,
}

impl Inner {
    async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field("backend", &self.inner.backend.name())
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

/// Counts a failed database operation for `/metrics`.
fn count_error(_: &StoreError) {
    crate::metrics::inc(&crate::metrics::global().store_errors);
}

impl CredentialStore {
    /// Connects (creating a missing SQLite file with mode 0600), runs the
    /// migrations, and loads the key file, creating it with one fresh key
    /// when it is missing and no record uses a key yet (with records, a
    /// missing key file is an error: it must be restored, not replaced).
    /// The keys are read once here: a key appended later by [`rotate_key`]
    /// is used after reopening.
    pub async fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let rng = SystemRandom::new();
        let (pool, backend) = db::connect(&cfg.url).await?;
        let used_key_ids = db::key_ids_in_use(&pool).await?;
        let keys = Keyring::load_or_create(&cfg.key_file, &rng, &used_key_ids)?;
        warn_unknown_keys(&cfg.key_file, &keys, &used_key_ids);
        tracing::info!(
            backend = backend.name(),
            url = %db::redact_url(&cfg.url),
            key_file = %cfg.key_file.display(),
            current_key = keys.current().id(),
            "credential store open"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                backend,
                keys,
                rng,
                write_lock: (backend == Backend::Sqlite).then(|| tokio::sync::Mutex::new(())),
            }),
        })
    }

    /// Saves a login session's row (inserted or replaced).
    pub async fn save_session(&self, row: &SessionRow) -> Result<(), StoreError> {
        let _write = self.inner.write_guard().await;
        sessions::save(&self.inner.pool, row)
            .await
            .inspect_err(count_error)
    }

    /// The sessions not ended (oldest first), then the `ended` most
    /// recently ended; sessions ended more than `retain_ms` ago are
    /// forgotten first.
    pub async fn load_sessions(
        &self,
        ended: usize,
        retain_ms: i64,
    ) -> Result<Vec<SessionRow>, StoreError> {
        {
            let _write = self.inner.write_guard().await;
            let gone = sessions::prune(&self.inner.pool, now_ms() - retain_ms)
                .await
                .inspect_err(count_error)?;
            if gone > 0 {
                tracing::info!(sessions = gone, "forgot login sessions that ended long ago");
            }
        }
        sessions::load(&self.inner.pool, ended)
            .await
            .inspect_err(count_error)
    }

    /// Encrypts and stores a new credential version for (user, provider).
    pub async fn put(
        &self,
        user_id: &str,
        provider: &str,
        bundle: &CredentialBundle,
    ) -> Result<StoredRecord, StoreError> {
        self.insert(None, user_id, provider, bundle).await
    }

    /// Like [`CredentialStore::put`] for the credential of login session
    /// `session_id`, stored once: when the session already stored one (a
    /// browser VM sends its credential again after a restart), that record
    /// is returned and nothing is added.
    pub async fn put_for_session(
        &self,
        session_id: &str,
        user_id: &str,
        provider: &str,
        bundle: &CredentialBundle,
    ) -> Result<StoredRecord, StoreError> {
        let stored = db::by_session(&self.inner.pool, session_id)
            .await
            .inspect_err(count_error)?;
        if let Some(record) = stored {
            tracing::info!(record_id = %record.id, session_id, "this session's credential is stored already");
            return Ok(record);
        }
        self.insert(Some(session_id), user_id, provider, bundle)
            .await
    }

    async fn insert(
        &self,
        session_id: Option<&str>,
        user_id: &str,
        provider: &str,
        bundle: &CredentialBundle,
    ) -> Result<StoredRecord, StoreError> {
        check_label("user_id", user_id)?;
        check_label("provider", provider)?;
        let key = self.inner.keys.current();
        let id = self.new_record_id()?;
        let aad = crypto::associated_data(&id, user_id, provider, key.id());
        let sealed = crypto::seal(key.aead(), &self.inner.rng, &aad, bundle)?;
        let created_at_ms = now_ms();
        let row = NewRow {
            id: &id,
            user_id,
            provider,
            key_id: key.id(),
            nonce: &sealed.nonce,
            ciphertext: &sealed.ciphertext,
            created_at_ms,
            session_id,
        };
        {
            let _write = self.inner.write_guard().await;
            db::insert(&self.inner.pool, &row)
                .await
                .inspect_err(count_error)?;
        }
        tracing::info!(
            record_id = %id,
            user_id,
            provider,
            key_id = key.id(),
            files = bundle.files.len(),
            "stored credential record"
        );
        Ok(StoredRecord {
            id,
            user_id: user_id.to_string(),
            provider: provider.to_string(),
            key_id: key.id().to_string(),
            created_at_ms,
            delivered_at_ms: None,
            delivered_vm: None,
        })
    }

    /// Newest record of (user, provider), decrypted.
    pub async fn latest(
        &self,
        user_id: &str,
        provider: &str,
    ) -> Result<Option<(StoredRecord, CredentialBundle)>, StoreError> {
        match db::latest(&self.inner.pool, user_id, provider)
            .await
            .inspect_err(count_error)?
        {
            Some(row) => self.decrypt(row).map(Some),
            None => Ok(None),
        }
    }

    /// One record by id, decrypted.
    pub async fn get(&self, id: &str) -> Result<(StoredRecord, CredentialBundle), StoreError> {
        match db::by_id(&self.inner.pool, id)
            .await
            .inspect_err(count_error)?
        {
            Some(row) => self.decrypt(row),
            None => Err(StoreError::NotFound { id: id.to_string() }),
        }
    }

    /// Records that a record was written into a CLI VM (a later delivery
    /// of the same record overwrites the time and VM).
    pub async fn mark_delivered(&self, id: &str, vm_id: &str) -> Result<(), StoreError> {
        let found = {
            let _write = self.inner.write_guard().await;
            db::mark_delivered(&self.inner.pool, id, vm_id, now_ms())
                .await
                .inspect_err(count_error)?
        };
        if !found {
            return Err(StoreError::NotFound { id: id.to_string() });
        }
        tracing::info!(record_id = id, vm_id, "credential record delivered");
        Ok(())
    }

    /// For each provider of the user, the newest record if it has not been
    /// delivered yet (metadata only), ordered by provider. An older
    /// undelivered version behind a newer one is not listed: only the
    /// newest is worth delivering.
    pub async fn undelivered(&self, user_id: &str) -> Result<Vec<StoredRecord>, StoreError> {
        let mut newest = self.newest(user_id).await?;
        newest.retain(|r| r.delivered_at_ms.is_none());
        Ok(newest)
    }

    /// For each provider of the user, the newest record, delivered or not
    /// (metadata only), ordered by provider.
    pub async fn newest(&self, user_id: &str) -> Result<Vec<StoredRecord>, StoreError> {
        db::newest(&self.inner.pool, user_id)
            .await
            .inspect_err(count_error)
    }

    /// Id of the key new records are encrypted with.
    pub fn current_key_id(&self) -> &str {
        self.inner.keys.current().id()
    }

    /// The connection pool, for airlockd's other tables and for tests that
    /// inspect rows. Its queries must be valid on SQLite and PostgreSQL.
    pub fn pool(&self) -> &sqlx::AnyPool {
        &self.inner.pool
    }

    /// Closes the pool's connections (waiting for those in use). Every
    /// clone of the store is unusable afterwards.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    fn decrypt(&self, row: EncryptedRow) -> Result<(StoredRecord, CredentialBundle), StoreError> {
        let EncryptedRow {
            record,
            nonce,
            ciphertext,
        } = row;
        let Some(key) = self.inner.keys.find(&record.key_id) else {
            tracing::error!(
                record_id = %record.id,
                key_id = %record.key_id,
                "credential record uses a key the key file does not list"
            );
            return Err(StoreError::UnknownKey {
                key_id: record.key_id,
                record_id: record.id,
            });
        };
        let aad = crypto::associated_data(&record.id, &record.user_id, &record.provider, key.id());
        match crypto::open(key.aead(), &record.id, &nonce, ciphertext, &aad) {
            Ok(bundle) => Ok((record, bundle)),
            Err(e) => {
                tracing::error!(
                    record_id = %record.id,
                    key_id = %record.key_id,
                    error = %e,
                    "credential record cannot be decrypted"
                );
                Err(e)
            }
        }
    }

    fn new_record_id(&self) -> Result<String, StoreError> {
        let mut raw = [0u8; RECORD_ID_BYTES];
        self.inner
            .rng
            .fill(&mut raw)
            .map_err(|_| StoreError::Encrypt("the system random number generator failed"))?;
        Ok(keys::hex(&raw))
    }
}

/// Logs, at startup, key ids that records use but the key file lacks: not
/// fatal (other records still decrypt), but every read of those records
/// will fail, and the operator should learn that now.
fn warn_unknown_keys(key_file: &std::path::Path, keys: &Keyring, used_key_ids: &[String]) {
    let unknown: Vec<&str> = used_key_ids
        .iter()
        .map(String::as_str)
        .filter(|id| !keys.contains(id))
        .collect();
    if !unknown.is_empty() {
        tracing::error!(
            key_file = %key_file.display(),
            missing_key_ids = ?unknown,
            "the database holds records encrypted with keys the key file does not list"
        );
    }
}

fn check_label(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > MAX_LABEL_LEN {
        return Err(StoreError::InvalidLabel { field });
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
