//! The `login_sessions` table beside the credential records: each login
//! session's public view, saved as it changes, so that a restarted
//! airlockd finds the sessions in progress. The store knows a session only
//! as a row ([`SessionRow`]); [`crate::session`] owns what the view means.

use sqlx::{AnyPool, Row};

use super::StoreError;

/// One session as stored.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// Its id.
    pub id: String,
    /// Whose it is.
    pub user_id: String,
    /// Its state's name.
    pub state: String,
    /// True once it can change no more.
    pub ended: bool,
    /// Its view (JSON).
    pub view: String,
    /// Its viewer tokens' digests (JSON).
    pub viewer_tokens: String,
    /// When it was created (Unix ms).
    pub created_at_ms: i64,
    /// When it last changed (Unix ms).
    pub updated_at_ms: i64,
}

const UPSERT: &str = "\
    INSERT INTO login_sessions \
        (id, user_id, state, ended, view, viewer_tokens, created_at_ms, updated_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
    ON CONFLICT (id) DO UPDATE SET state = excluded.state, ended = excluded.ended, \
        view = excluded.view, viewer_tokens = excluded.viewer_tokens, \
        updated_at_ms = excluded.updated_at_ms \
    WHERE login_sessions.updated_at_ms <= excluded.updated_at_ms \
        AND NOT (login_sessions.ended = 1 AND excluded.ended = 0)";

const OPEN: &str = "\
    SELECT id, user_id, state, ended, view, viewer_tokens, created_at_ms, updated_at_ms \
    FROM login_sessions WHERE ended = 0 ORDER BY created_at_ms";

const RECENTLY_ENDED: &str = "\
    SELECT id, user_id, state, ended, view, viewer_tokens, created_at_ms, updated_at_ms \
    FROM login_sessions WHERE ended = 1 ORDER BY updated_at_ms DESC LIMIT $1";

const PRUNE: &str = "DELETE FROM login_sessions WHERE ended = 1 AND updated_at_ms < $1";

fn db_err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |source| StoreError::Database { op, source }
}

/// Inserts or replaces the row of `row.id`; a save that lost a race to a
/// newer one (an older `updated_at_ms`, or a session not ended over an
/// ended one) changes nothing.
pub(crate) async fn save(pool: &AnyPool, row: &SessionRow) -> Result<(), StoreError> {
    sqlx::query(UPSERT)
        .bind(&row.id)
        .bind(&row.user_id)
        .bind(&row.state)
        .bind(i64::from(row.ended))
        .bind(&row.view)
        .bind(&row.viewer_tokens)
        .bind(row.created_at_ms)
        .bind(row.updated_at_ms)
        .execute(pool)
        .await
        .map_err(db_err("saving a login session"))?;
    Ok(())
}

/// Every session not ended, oldest first, then the `ended` most recently
/// ended ones.
pub(crate) async fn load(pool: &AnyPool, ended: usize) -> Result<Vec<SessionRow>, StoreError> {
    let op = "loading login sessions";
    let mut rows = sqlx::query(OPEN)
        .fetch_all(pool)
        .await
        .map_err(db_err(op))?;
    let limit = i64::try_from(ended).unwrap_or(i64::MAX);
    let mut done = sqlx::query(RECENTLY_ENDED)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(db_err(op))?;
    done.reverse();
    rows.append(&mut done);
    rows.iter().map(row).collect()
}

/// Forgets sessions that ended before `before_ms` (Unix ms).
pub(crate) async fn prune(pool: &AnyPool, before_ms: i64) -> Result<u64, StoreError> {
    let done = sqlx::query(PRUNE)
        .bind(before_ms)
        .execute(pool)
        .await
        .map_err(db_err("forgetting old login sessions"))?;
    Ok(done.rows_affected())
}

fn row(r: &sqlx::any::AnyRow) -> Result<SessionRow, StoreError> {
    let decode = db_err("decoding a login session");
    Ok(SessionRow {
        id: r.try_get("id").map_err(&decode)?,
        user_id: r.try_get("user_id").map_err(&decode)?,
        state: r.try_get("state").map_err(&decode)?,
        ended: r.try_get::<i64, _>("ended").map_err(&decode)? != 0,
        view: r.try_get("view").map_err(&decode)?,
        viewer_tokens: r.try_get("viewer_tokens").map_err(&decode)?,
        created_at_ms: r.try_get("created_at_ms").map_err(&decode)?,
        updated_at_ms: r.try_get("updated_at_ms").map_err(&decode)?,
    })
}
