//! The encrypted credential store (`airlock_host::store`) against SQLite
//! (a temp file) and a real PostgreSQL server (`airlock_tests::postgres`).
//!
//! Every database behaviour is one async fn taking a [`Fixture`]; the
//! macro at the end runs each twice, as `sqlite::NAME` and `postgres::NAME`.
//! Tampering is done the way an attacker with database access would: plain
//! SQL on the rows. Behaviours of the key file alone, which is read before
//! any database is touched, run once, at the end of the file.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use airlock_host::store::sqlx::{self, Row};
use airlock_host::store::{
    rotate_key, CredentialBundle, CredentialFile, CredentialStore, KeyError, StoreConfig,
    StoreError, StoredRecord,
};
use airlock_proto::{b64, SecretBytes};
use airlock_tests::postgres::Postgres;
use anyhow::{bail, ensure, Context, Result};

/// A token that must never appear at rest or in any `Debug` output.
const CANARY: &str = "canary-7f3a9c-oauth-refresh-token";

/// One store's configuration and the database behind it.
struct Fixture {
    dir: tempfile::TempDir,
    pg: Option<Postgres>,
    cfg: StoreConfig,
}

impl Fixture {
    fn sqlite() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("db/airlock.db");
        let cfg = StoreConfig {
            url: format!("sqlite://{}", db.display()),
            key_file: dir.path().join("keys/store.keys"),
        };
        Ok(Self { dir, pg: None, cfg })
    }

    async fn postgres() -> Result<Self> {
        let pg = tokio::task::spawn_blocking(Postgres::start).await??;
        let dir = tempfile::tempdir()?;
        let cfg = StoreConfig {
            url: pg.url.clone(),
            key_file: dir.path().join("keys/store.keys"),
        };
        Ok(Self {
            dir,
            pg: Some(pg),
            cfg,
        })
    }

    fn key_file(&self) -> &Path {
        &self.cfg.key_file
    }

    async fn open(&self) -> Result<CredentialStore> {
        Ok(CredentialStore::open(&self.cfg).await?)
    }

    /// Every byte the database keeps on disk: the SQLite file with its WAL
    /// and journal, or PostgreSQL's whole data directory after a checkpoint.
    async fn bytes_at_rest(&self, store: &CredentialStore) -> Result<Vec<u8>> {
        match &self.pg {
            None => read_tree(&self.dir.path().join("db")),
            Some(pg) => {
                sqlx::query("CHECKPOINT").execute(store.pool()).await?;
                read_tree(pg.data_dir())
            }
        }
    }
}

fn read_tree(dir: &Path) -> Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                // A file may vanish meanwhile (temp files of PostgreSQL).
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    all.extend_from_slice(&bytes);
                }
            }
        }
    }
    Ok(all)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn file(path: &str, mode: u32, contents: &[u8]) -> CredentialFile {
    CredentialFile {
        path: path.into(),
        mode,
        contents: SecretBytes::new(contents.to_vec()),
    }
}

/// A Codex-like bundle whose tokens contain `token`, plus a config file
/// and a binary file (every byte value, so nothing gets mangled as text).
fn bundle(token: &str) -> CredentialBundle {
    let auth = format!(
        "{{\"tokens\":{{\"access_token\":\"{token}-access\",\"refresh_token\":\"{token}\"}}}}"
    );
    CredentialBundle {
        files: vec![
            file(".codex/auth.json", 0o600, auth.as_bytes()),
            file(".codex/config.toml", 0o644, b"model = \"o4\"\n"),
            file(".codex/blob.bin", 0o400, &(0..=255u8).collect::<Vec<_>>()),
            file(".codex/empty", 0o600, b""),
        ],
    }
}

fn auth_contents(b: &CredentialBundle) -> &[u8] {
    b.files[0].contents.expose()
}

fn ensure_same(expected: &CredentialBundle, got: &CredentialBundle) -> Result<()> {
    ensure!(
        expected.files.len() == got.files.len(),
        "file count {} != {}",
        got.files.len(),
        expected.files.len()
    );
    for (e, g) in expected.files.iter().zip(&got.files) {
        ensure!(e.path == g.path, "path {:?} != {:?}", g.path, e.path);
        ensure!(
            e.mode == g.mode,
            "mode of {}: {:o} != {:o}",
            e.path,
            g.mode,
            e.mode
        );
        ensure!(e.contents == g.contents, "contents of {} differ", e.path);
    }
    Ok(())
}

// The column names below come from this file's literals, hence the
// AssertSqlSafe around the formatted SQL.

async fn raw_bytes(store: &CredentialStore, column: &str, id: &str) -> Result<Vec<u8>> {
    let sql = format!("SELECT {column} FROM credential_records WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(store.pool())
        .await?;
    Ok(row.try_get(0)?)
}

async fn set_bytes(store: &CredentialStore, column: &str, id: &str, value: Vec<u8>) -> Result<()> {
    let sql = format!("UPDATE credential_records SET {column} = $1 WHERE id = $2");
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(value)
        .bind(id)
        .execute(store.pool())
        .await?;
    ensure!(done.rows_affected() == 1, "no row {id}");
    Ok(())
}

async fn set_text(store: &CredentialStore, column: &str, id: &str, value: &str) -> Result<()> {
    let sql = format!("UPDATE credential_records SET {column} = $1 WHERE id = $2");
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(value)
        .bind(id)
        .execute(store.pool())
        .await?;
    ensure!(done.rows_affected() == 1, "no row {id}");
    Ok(())
}

/// Fails unless `result` is the authentication failure of record `id`.
fn expect_decrypt<T: std::fmt::Debug>(result: Result<T, StoreError>, id: &str) -> Result<()> {
    match result {
        Err(e @ StoreError::Decrypt { .. }) => {
            let StoreError::Decrypt { record_id } = &e else {
                unreachable!()
            };
            ensure!(record_id == id, "Decrypt names {record_id}, expected {id}");
            let text = e.to_string();
            ensure!(text.contains("wrong key or tampered record"), "{text}");
            ensure!(!text.contains(CANARY), "{text}");
            Ok(())
        }
        Err(other) => bail!("expected a Decrypt error for {id}, got: {other}"),
        Ok(v) => bail!("expected a Decrypt error for {id}, got data: {v:?}"),
    }
}

/// The key lines of a key file as (id, base64).
fn key_lines(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut f = l.split_whitespace();
            (
                f.next().unwrap_or_default().to_string(),
                f.next().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

fn ids(records: &[StoredRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

// ---- behaviours run on both databases ----

async fn round_trip(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let one = bundle("token-one");
    let rec = store.put("alice", "codex", &one).await?;
    ensure!(rec.user_id == "alice" && rec.provider == "codex");
    ensure!(rec.key_id == store.current_key_id());
    ensure!(rec.delivered_at_ms.is_none() && rec.delivered_vm.is_none());
    ensure!(
        rec.created_at_ms > 1_600_000_000_000,
        "created_at_ms {}",
        rec.created_at_ms
    );

    let (latest, got) = store.latest("alice", "codex").await?.context("no latest")?;
    ensure!(latest.id == rec.id);
    ensure_same(&one, &got)?;
    let (by_id, got) = store.get(&rec.id).await?;
    ensure!(by_id.id == rec.id && by_id.created_at_ms == rec.created_at_ms);
    ensure_same(&one, &got)?;

    ensure!(store.latest("alice", "claude_code").await?.is_none());
    ensure!(store.latest("bob", "codex").await?.is_none());
    match store.get("no-such-record").await {
        Err(StoreError::NotFound { id }) => ensure!(id == "no-such-record"),
        other => bail!("expected NotFound, got {other:?}"),
    }
    match store.put("", "codex", &one).await {
        Err(StoreError::InvalidLabel { field: "user_id" }) => {}
        other => bail!("expected InvalidLabel, got {other:?}"),
    }

    // A newer version becomes the latest; the older stays readable by id.
    let two = bundle("token-two");
    let rec2 = store.put("alice", "codex", &two).await?;
    ensure!(rec2.id != rec.id);
    let (latest, got) = store.latest("alice", "codex").await?.context("no latest")?;
    ensure!(
        latest.id == rec2.id,
        "latest is {} not {}",
        latest.id,
        rec2.id
    );
    ensure_same(&two, &got)?;
    ensure_same(&one, &store.get(&rec.id).await?.1)?;

    // Everything survives reopening.
    store.close().await;
    let store = fx.open().await?;
    ensure_same(
        &two,
        &store.latest("alice", "codex").await?.context("gone")?.1,
    )?;
    Ok(())
}

async fn plaintext_not_at_rest(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let b = bundle(CANARY);
    let encoded = b64::encode(auth_contents(&b));
    let owner = "owner-at-rest-5d1e";
    let rec = store.put(owner, "codex", &b).await?;
    for column in ["nonce", "ciphertext"] {
        let bytes = raw_bytes(&store, column, &rec.id).await?;
        ensure!(
            !contains(&bytes, CANARY.as_bytes()),
            "{column} holds the token"
        );
        ensure!(
            !contains(&bytes, encoded.as_bytes()),
            "{column} holds its base64"
        );
    }
    let ciphertext = raw_bytes(&store, "ciphertext", &rec.id).await?;
    let disk = fx.bytes_at_rest(&store).await?;
    // Controls: the scan does see this row (its owner and ciphertext are
    // stored as they are), so not finding the token means something.
    ensure!(
        contains(&disk, owner.as_bytes()),
        "scan missed the row's owner"
    );
    ensure!(
        contains(&disk, &ciphertext[..32]),
        "scan missed the ciphertext"
    );
    ensure!(
        !contains(&disk, CANARY.as_bytes()),
        "the token is on disk in clear"
    );
    ensure!(
        !contains(&disk, encoded.as_bytes()),
        "the token's base64 is on disk"
    );
    Ok(())
}

async fn wrong_key_material(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let rec = store.put("alice", "codex", &bundle("t")).await?;
    let key_id = store.current_key_id().to_string();
    store.close().await;
    // Same id, other bytes: as if the key file were restored from the
    // wrong backup. fs::write keeps the file's 0600 mode.
    std::fs::write(
        fx.key_file(),
        format!("{key_id} {}\n", b64::encode(&[0x42; 32])),
    )?;
    let store = fx.open().await?;
    expect_decrypt(store.get(&rec.id).await, &rec.id)?;
    expect_decrypt(store.latest("alice", "codex").await, &rec.id)?;
    // New records work with the (new) key, so only the old one is refused.
    let fresh = store.put("alice", "codex", &bundle("u")).await?;
    store.get(&fresh.id).await?;
    Ok(())
}

/// An edit of a stored column.
type Change = fn(Vec<u8>) -> Vec<u8>;

async fn tampering_detected(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let flip_first: Change = |mut v| {
        v[0] ^= 0x01;
        v
    };
    let flip_last: Change = |mut v| {
        let n = v.len() - 1;
        v[n] ^= 0x80;
        v
    };
    let truncate: Change = |mut v| {
        v.pop();
        v
    };
    let cases = [
        ("ciphertext", "ciphertext byte", flip_first),
        ("ciphertext", "tag byte", flip_last),
        ("ciphertext", "truncated", truncate),
        ("nonce", "nonce byte", flip_first),
        ("nonce", "short nonce", truncate),
    ];
    for (i, (column, what, change)) in cases.iter().enumerate() {
        let rec = store.put("alice", &format!("p{i}"), &bundle("t")).await?;
        let bytes = raw_bytes(&store, column, &rec.id).await?;
        set_bytes(&store, column, &rec.id, change(bytes)).await?;
        expect_decrypt(store.get(&rec.id).await, &rec.id).context(*what)?;
    }

    // Moved to another user, or to another provider, by SQL.
    let rec = store.put("alice", "gemini_cli", &bundle("t")).await?;
    set_text(&store, "user_id", &rec.id, "mallory").await?;
    expect_decrypt(store.latest("mallory", "gemini_cli").await, &rec.id).context("user")?;
    let rec = store.put("alice", "claude_code", &bundle("t")).await?;
    set_text(&store, "provider", &rec.id, "codex").await?;
    expect_decrypt(store.latest("alice", "codex").await, &rec.id).context("provider")?;

    // Another record's sealed data pasted into this one (same owner).
    let a = store.put("bob", "codex", &bundle("a")).await?;
    let b = store.put("bob", "codex", &bundle("b")).await?;
    for column in ["nonce", "ciphertext"] {
        let bytes = raw_bytes(&store, column, &a.id).await?;
        set_bytes(&store, column, &b.id, bytes).await?;
    }
    expect_decrypt(store.get(&b.id).await, &b.id).context("swap")?;
    store
        .get(&a.id)
        .await
        .context("the source row is untouched")?;
    Ok(())
}

async fn relabelled_key_id(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let old_key = store.current_key_id().to_string();
    let old = store.put("alice", "codex", &bundle("old")).await?;
    store.close().await;
    let new_key = rotate_key(fx.key_file())?;
    let store = fx.open().await?;
    let new = store.put("alice", "gemini_cli", &bundle("new")).await?;
    set_text(&store, "key_id", &old.id, &new_key).await?;
    expect_decrypt(store.get(&old.id).await, &old.id)?;
    set_text(&store, "key_id", &new.id, &old_key).await?;
    expect_decrypt(store.get(&new.id).await, &new.id)?;
    Ok(())
}

async fn unknown_key(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let rec = store.put("alice", "codex", &bundle("t")).await?;
    set_text(&store, "key_id", &rec.id, "0badc0de").await?;
    let key_b64 = key_lines(fx.key_file())?[0].1.clone();
    match store.get(&rec.id).await {
        Err(e @ StoreError::UnknownKey { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains("0badc0de") && text.contains(&rec.id),
                "{text}"
            );
            ensure!(!text.contains(&key_b64), "{text}");
        }
        other => bail!("expected UnknownKey, got {other:?}"),
    }

    // The same when a key the records use was deleted from the file.
    let rec = store.put("bob", "codex", &bundle("t")).await?;
    store.close().await;
    std::fs::write(
        fx.key_file(),
        format!("abcdef01 {}\n", b64::encode(&[7; 32])),
    )?;
    let store = fx.open().await?;
    match store.latest("bob", "codex").await {
        Err(StoreError::UnknownKey { key_id, record_id }) => {
            ensure!(key_id == rec.key_id && record_id == rec.id);
        }
        other => bail!("expected UnknownKey, got {other:?}"),
    }
    Ok(())
}

async fn missing_key_file_with_records_refused(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let rec = store.put("alice", "codex", &bundle("t")).await?;
    store.close().await;
    let saved = std::fs::read(fx.key_file())?;
    std::fs::remove_file(fx.key_file())?;
    match CredentialStore::open(&fx.cfg).await {
        Err(e @ StoreError::Keys(KeyError::MissingWithRecords { .. })) => {
            let text = e.to_string();
            ensure!(
                text.contains(&rec.key_id) && text.contains("restore"),
                "{text}"
            );
        }
        other => bail!("expected MissingWithRecords, got {other:?}"),
    }
    ensure!(!fx.key_file().exists(), "a new key file was created");
    // Restoring the file brings the records back.
    std::fs::write(fx.key_file(), saved)?;
    std::fs::set_permissions(fx.key_file(), std::fs::Permissions::from_mode(0o600))?;
    let store = fx.open().await?;
    ensure_same(&bundle("t"), &store.get(&rec.id).await?.1)?;
    Ok(())
}

async fn key_rotation(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let k1 = store.current_key_id().to_string();
    let r1 = store.put("alice", "codex", &bundle("one")).await?;
    ensure!(r1.key_id == k1);
    store.close().await;

    let k2 = rotate_key(fx.key_file())?;
    ensure!(k2 != k1);
    ensure!(
        mode(fx.key_file())? == 0o600,
        "mode {:o}",
        mode(fx.key_file())?
    );
    let listed: Vec<String> = key_lines(fx.key_file())?.into_iter().map(|l| l.0).collect();
    ensure!(listed == [k1.clone(), k2.clone()], "{listed:?}");

    let store = fx.open().await?;
    ensure!(store.current_key_id() == k2);
    let r2 = store.put("alice", "codex", &bundle("two")).await?;
    ensure!(r2.key_id == k2, "new record uses {}", r2.key_id);
    let (old, got) = store.get(&r1.id).await?;
    ensure!(old.key_id == k1);
    ensure_same(&bundle("one"), &got)?;
    let (latest, got) = store.latest("alice", "codex").await?.context("none")?;
    ensure!(latest.id == r2.id);
    ensure_same(&bundle("two"), &got)?;
    store.close().await;

    // A second rotation keeps both older generations readable.
    let k3 = rotate_key(fx.key_file())?;
    let store = fx.open().await?;
    ensure!(store.current_key_id() == k3 && k3 != k1 && k3 != k2);
    store.get(&r1.id).await?;
    store.get(&r2.id).await?;
    ensure!(key_lines(fx.key_file())?.len() == 3);
    Ok(())
}

async fn delivery(fx: Fixture) -> Result<()> {
    let s = fx.open().await?;
    ensure!(s.undelivered("alice").await?.is_empty());
    let c1 = s.put("alice", "codex", &bundle("c1")).await?;
    let g1 = s.put("alice", "gemini_cli", &bundle("g1")).await?;
    let b1 = s.put("bob", "codex", &bundle("b1")).await?;
    ensure!(ids(&s.undelivered("alice").await?) == [&c1.id, &g1.id]);

    s.mark_delivered(&c1.id, "vm-1").await?;
    ensure!(ids(&s.undelivered("alice").await?) == [&g1.id]);
    let (rec, _) = s.get(&c1.id).await?;
    ensure!(rec.delivered_vm.as_deref() == Some("vm-1"));
    ensure!(rec.delivered_at_ms.is_some_and(|t| t >= c1.created_at_ms));

    // A new version is undelivered again.
    let c2 = s.put("alice", "codex", &bundle("c2")).await?;
    ensure!(ids(&s.undelivered("alice").await?) == [&c2.id, &g1.id]);
    // Delivering an older version does not hide the newest.
    let c3 = s.put("alice", "codex", &bundle("c3")).await?;
    s.mark_delivered(&c2.id, "vm-1").await?;
    ensure!(ids(&s.undelivered("alice").await?) == [&c3.id, &g1.id]);
    // Newest delivered: the provider is done, older undelivered or not.
    s.mark_delivered(&c3.id, "vm-2").await?;
    s.mark_delivered(&g1.id, "vm-2").await?;
    ensure!(s.undelivered("alice").await?.is_empty());
    let (latest, _) = s.latest("alice", "codex").await?.context("none")?;
    ensure!(latest.id == c3.id && latest.delivered_vm.as_deref() == Some("vm-2"));

    // Other users are separate.
    ensure!(ids(&s.undelivered("bob").await?) == [&b1.id]);
    match s.mark_delivered("no-such-record", "vm-1").await {
        Err(StoreError::NotFound { id }) => ensure!(id == "no-such-record"),
        other => bail!("expected NotFound, got {other:?}"),
    }
    Ok(())
}

async fn nonces_never_repeat(fx: Fixture) -> Result<()> {
    const TASKS: usize = 4;
    const PER_TASK: usize = 500;
    let store = fx.open().await?;
    let small = CredentialBundle {
        files: vec![file("auth.json", 0o600, b"{}")],
    };
    // Concurrent writers of one (user, provider): also exercises the
    // version race between inserts.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (store, small) = (store.clone(), small.clone());
        tasks.spawn(async move {
            for _ in 0..PER_TASK {
                store.put("alice", "codex", &small).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rows = sqlx::query("SELECT nonce, version FROM credential_records")
        .fetch_all(store.pool())
        .await?;
    ensure!(rows.len() == TASKS * PER_TASK, "{} rows", rows.len());
    let mut nonces = HashSet::new();
    let mut versions = HashSet::new();
    for row in &rows {
        let nonce: Vec<u8> = row.try_get("nonce")?;
        ensure!(nonce.len() == 12, "nonce of {} bytes", nonce.len());
        nonces.insert(nonce);
        versions.insert(row.try_get::<i64, _>("version")?);
    }
    ensure!(
        nonces.len() == rows.len(),
        "{} distinct nonces",
        nonces.len()
    );
    ensure!(
        versions.len() == rows.len(),
        "{} distinct versions",
        versions.len()
    );
    ensure!(versions.iter().all(|v| (1..=rows.len() as i64).contains(v)));
    store.latest("alice", "codex").await?.context("none")?;
    Ok(())
}

async fn debug_is_redacted(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let b = bundle(CANARY);
    let encoded = b64::encode(auth_contents(&b));
    let key_b64 = key_lines(fx.key_file())?[0].1.clone();
    let rec = store.put("alice", "codex", &b).await?;
    let (got_rec, got) = store.get(&rec.id).await?;
    let tampered = store.put("alice", "gemini_cli", &b).await?;
    set_text(&store, "provider", &tampered.id, "codex-x").await?;
    let err = store
        .get(&tampered.id)
        .await
        .err()
        .context("tampered row decrypted")?;
    let secret_cfg = StoreConfig {
        url: "postgres://app:hunter2-pw@db.internal:5432/airlock".into(),
        ..StoreConfig::default()
    };
    let shown = [
        format!("{b:?}"),
        format!("{got:#?}"),
        format!("{:?}", got.files[0]),
        format!("{rec:?} {got_rec:#?}"),
        format!("{store:?} {store:#?}"),
        format!("{:?}", fx.cfg),
        format!("{secret_cfg:?}"),
        format!("{err} {err:?}"),
    ];
    for text in &shown {
        ensure!(!text.contains(CANARY), "token shown: {text}");
        ensure!(!text.contains(&encoded), "token base64 shown: {text}");
        ensure!(!text.contains(&key_b64), "key shown: {text}");
        ensure!(!text.contains("hunter2-pw"), "password shown: {text}");
    }
    // Redacted, not empty: what is safe to show is there.
    ensure!(shown[0].contains(".codex/auth.json") && shown[0].contains("0o600"));
    ensure!(shown[4].contains(store.current_key_id()));
    ensure!(shown[6].contains("db.internal"));
    Ok(())
}

/// A login session's credential is stored once: handed over again (after
/// a restart), the first record comes back and nothing is added.
async fn one_record_per_session(fx: Fixture) -> Result<()> {
    let store = fx.open().await?;
    let first = store
        .put_for_session("ses-1", "alice", "codex", &bundle("t1"))
        .await?;
    let again = store
        .put_for_session("ses-1", "alice", "codex", &bundle("t1"))
        .await?;
    ensure!(again.id == first.id, "a second record for one session");
    let other = store
        .put_for_session("ses-2", "alice", "codex", &bundle("t2"))
        .await?;
    ensure!(other.id != first.id);
    let plain = store.put("alice", "codex", &bundle("t3")).await?;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM credential_records")
        .fetch_one(store.pool())
        .await?;
    ensure!(n == 3, "{n} records");
    let (latest, _) = store.latest("alice", "codex").await?.context("latest")?;
    ensure!(latest.id == plain.id);
    Ok(())
}

/// Session rows: saved, replaced, listed open first then the most recently
/// ended, and ended ones past their retention forgotten.
async fn session_rows(fx: Fixture) -> Result<()> {
    use airlock_host::store::SessionRow;
    let store = fx.open().await?;
    let row = |id: &str, ended: bool, at: i64| SessionRow {
        id: id.into(),
        user_id: "alice".into(),
        state: if ended { "completed" } else { "awaiting_user" }.into(),
        ended,
        view: format!("{{\"sessionId\":\"{id}\"}}"),
        viewer_tokens: "[]".into(),
        created_at_ms: at,
        updated_at_ms: at,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    store.save_session(&row("open", false, now)).await?;
    store
        .save_session(&row("old", true, now - 10_000_000))
        .await?;
    store.save_session(&row("done-1", true, now - 2)).await?;
    store.save_session(&row("done-2", true, now - 1)).await?;
    let mut changed = row("open", false, now);
    changed.state = "captured".into();
    store.save_session(&changed).await?;
    // A save that lost a race to a newer one changes nothing: an older
    // view, or a session not ended over an ended one.
    store.save_session(&row("open", false, now - 5)).await?;
    store.save_session(&row("done-2", false, now)).await?;
    let rows = store.load_sessions(2, 1_000_000).await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    ensure!(ids == ["open", "done-1", "done-2"], "{ids:?}");
    ensure!(rows[0].state == "captured" && !rows[0].ended);
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM login_sessions")
        .fetch_one(store.pool())
        .await?;
    ensure!(
        n == 3,
        "the session past its retention is forgotten ({n} rows)"
    );
    Ok(())
}

macro_rules! on_both_backends {
    ($($behaviour:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $behaviour() -> anyhow::Result<()> {
                    super::$behaviour(super::Fixture::sqlite()?).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $behaviour() -> anyhow::Result<()> {
                    super::$behaviour(super::Fixture::postgres().await?).await
                }
            )*
        }
    };
}

on_both_backends!(
    round_trip,
    plaintext_not_at_rest,
    wrong_key_material,
    tampering_detected,
    relabelled_key_id,
    unknown_key,
    missing_key_file_with_records_refused,
    key_rotation,
    delivery,
    nonces_never_repeat,
    debug_is_redacted,
    one_record_per_session,
    session_rows,
);

// ---- the key file alone, and SQLite files ----

#[tokio::test]
async fn key_file_created_private() -> Result<()> {
    let fx = Fixture::sqlite()?;
    let store = fx.open().await?;
    let dir = fx.key_file().parent().context("no parent")?;
    ensure!(mode(dir)? == 0o700, "dir mode {:o}", mode(dir)?);
    ensure!(
        mode(fx.key_file())? == 0o600,
        "mode {:o}",
        mode(fx.key_file())?
    );
    let lines = key_lines(fx.key_file())?;
    ensure!(lines.len() == 1, "{} keys", lines.len());
    let (id, key) = &lines[0];
    ensure!(id == store.current_key_id());
    ensure!(
        id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    ensure!(key.len() == 44, "a 32-byte key is 44 base64 characters");
    store.close().await;
    // Reopening reuses the file.
    let before = std::fs::read(fx.key_file())?;
    let store = fx.open().await?;
    ensure!(std::fs::read(fx.key_file())? == before && store.current_key_id() == id);
    Ok(())
}

#[tokio::test]
async fn loose_key_file_refused() -> Result<()> {
    let fx = Fixture::sqlite()?;
    fx.open().await?.close().await;
    for loose in [0o640, 0o604, 0o660] {
        std::fs::set_permissions(fx.key_file(), std::fs::Permissions::from_mode(loose))?;
        match CredentialStore::open(&fx.cfg).await {
            Err(e @ StoreError::Keys(KeyError::Permissions { .. })) => {
                let text = e.to_string();
                ensure!(text.contains("chmod 600"), "{text}");
                ensure!(
                    text.contains(&fx.key_file().display().to_string()),
                    "{text}"
                );
            }
            other => bail!("mode {loose:o}: expected a Permissions error, got {other:?}"),
        }
        match rotate_key(fx.key_file()) {
            Err(KeyError::Permissions { .. }) => {}
            other => bail!("rotate with mode {loose:o}: got {other:?}"),
        }
    }
    std::fs::set_permissions(fx.key_file(), std::fs::Permissions::from_mode(0o600))?;
    fx.open().await?;
    Ok(())
}

#[tokio::test]
async fn malformed_key_files_refused_without_quoting_keys() -> Result<()> {
    let fx = Fixture::sqlite()?;
    std::fs::create_dir_all(fx.key_file().parent().context("no parent")?)?;
    let k32 = b64::encode(&[0x11; 32]);
    let k16 = b64::encode(&[0x22; 16]);
    let cases: Vec<(String, &str)> = vec![
        (format!("0a1b2c3d {}!\n", &k32[..43]), "line 1"),
        (format!("# a comment\n0a1b2c3d {k16}\n"), "line 2"),
        (format!("KEY-ONE {k32}\n"), "key id"),
        (format!("0a1b2c3d {k32} trailing\n"), "expected"),
        (format!("0a1b2c3d {k32}\n0a1b2c3d {k32}\n"), "listed twice"),
        ("# nothing but comments\n\n".to_string(), "holds no key"),
    ];
    for (text, expected) in cases {
        std::fs::write(fx.key_file(), &text)?;
        std::fs::set_permissions(fx.key_file(), std::fs::Permissions::from_mode(0o600))?;
        match CredentialStore::open(&fx.cfg).await {
            Err(e @ StoreError::Keys(_)) => {
                let shown = format!("{e} {e:?}");
                ensure!(shown.contains(expected), "{expected:?} not in {shown}");
                for secret in [&k32[..20], &k16[..20]] {
                    ensure!(!shown.contains(secret), "key text in: {shown}");
                }
            }
            other => bail!("{text:?}: expected a key file error, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn rotating_a_missing_key_file_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path: PathBuf = dir.path().join("store.keys");
    match rotate_key(&path) {
        Err(KeyError::Read { .. }) => {}
        other => bail!("expected a Read error, got {other:?}"),
    }
    ensure!(!path.exists(), "rotation must not create a key file");
    Ok(())
}

#[tokio::test]
async fn sqlite_files_private() -> Result<()> {
    let fx = Fixture::sqlite()?;
    let store = fx.open().await?;
    store.put("alice", "codex", &bundle("t")).await?;
    let db_dir = fx.dir.path().join("db");
    ensure!(mode(&db_dir)? == 0o700, "db dir mode {:o}", mode(&db_dir)?);
    let mut seen = 0;
    for entry in std::fs::read_dir(&db_dir)? {
        let path = entry?.path();
        let m = mode(&path)?;
        ensure!(m & 0o077 == 0, "{} has mode {m:o}", path.display());
        seen += 1;
    }
    ensure!(seen >= 1, "no database file");
    Ok(())
}

#[tokio::test]
async fn postgres_harness_stops_on_drop() -> Result<()> {
    let pg = tokio::task::spawn_blocking(Postgres::start).await??;
    let (port, data) = (pg.port, pg.data_dir().to_path_buf());
    ensure!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    tokio::task::spawn_blocking(move || drop(pg)).await?;
    ensure!(!data.exists(), "data dir {} left behind", data.display());
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on {port}"
    );
    Ok(())
}
