//! Sessions saved in the store's database (`login_sessions`), so that a
//! restarted airlockd finds them ([`super::resume`]). Each change marks
//! its session; one writer task saves the marked sessions' views, at most
//! one batch per [`BATCH_INTERVAL`] (a guest that reports endlessly costs
//! at most that many writes). Changes that must not be lost to a crash, a
//! stored credential and a session's end, are saved at once instead
//! ([`Inner::save_now`]). Started by [`super::Sessions::new`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Inner, SessionHandle, SessionView};
use crate::live::token::TokenDigest;
use crate::store::SessionRow;

/// Least time between two batches of writes.
const BATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Sessions changed since their last save.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    ids: Mutex<BTreeSet<String>>,
    notify: Notify,
}

impl Dirty {
    /// Marks session `id` for the next batch.
    pub(super) fn mark(&self, id: &str) {
        let fresh = self
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string());
        if fresh {
            self.notify.notify_one();
        }
    }

    fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.ids.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 time (0 if it does
/// not parse: only ordering rows depends on it).
fn ms_of(rfc3339: &str) -> i64 {
    humantime::parse_rfc3339(rfc3339)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// The row of a session: its view and its viewer tokens' digests (an
/// ended session's links open nothing, so it keeps none).
pub(super) fn row_of(h: &SessionHandle) -> Result<SessionRow, serde_json::Error> {
    let view = &h.view();
    let tokens = match view.state.is_final() {
        true => Vec::new(),
        false => h.hub.token_digests(),
    };
    let state = serde_json::to_value(view.state)?;
    Ok(SessionRow {
        id: view.session_id.clone(),
        user_id: view.user_id.clone(),
        state: state.as_str().unwrap_or_default().to_string(),
        ended: view.state.is_final(),
        view: serde_json::to_string(view)?,
        viewer_tokens: serde_json::to_string(&tokens)?,
        created_at_ms: ms_of(&view.created_at),
        updated_at_ms: ms_of(&view.updated_at),
    })
}

/// The view a row holds, and its viewer tokens' digests.
pub(super) fn view_of(
    row: &SessionRow,
) -> Result<(SessionView, Vec<TokenDigest>), serde_json::Error> {
    Ok((
        serde_json::from_str(&row.view)?,
        serde_json::from_str(&row.viewer_tokens)?,
    ))
}

impl Inner {
    /// Saves the session now (for what a crash must not lose).
    pub(super) async fn save_now(&self, h: &SessionHandle) {
        let row = match row_of(h) {
            Ok(row) => row,
            Err(e) => {
                return tracing::warn!(session_id = %h.view().session_id, error = %e, "cannot encode a login session to save it")
            }
        };
        if let Err(e) = self.store.save_session(&row).await {
            tracing::warn!(session_id = %row.id, error = %e, "cannot save a login session: a restart of airlockd would not find this change");
        }
    }

    /// Saves the marked sessions.
    async fn save_marked(&self) {
        for id in self.dirty.take() {
            let handle = self
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&id)
                .cloned();
            if let Some(h) = handle {
                self.save_now(&h).await;
            }
        }
    }
}

/// Saves marked sessions in batches until `stop` (cancelled once every
/// session's task has ended, see [`super::Sessions::shutdown`]), then
/// saves what is left.
pub(super) async fn writer(ctx: Arc<Inner>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = ctx.dirty.notify.notified() => {}
            _ = stop.cancelled() => break,
        }
        ctx.save_marked().await;
        tokio::select! {
            _ = tokio::time::sleep(BATCH_INTERVAL) => {}
            _ = stop.cancelled() => break,
        }
    }
    ctx.save_marked().await;
}
