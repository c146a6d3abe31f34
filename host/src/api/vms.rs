//! Handlers of `/api/vms`: create, list, inspect (optionally waiting for the
//! boot to settle), delete, and the operator calls into a VM's agent (exec,
//! files, status). Routed by [`super::router`].

use std::time::Duration;

use airlock_proto::limits::{DEFAULT_EXEC_OUTPUT_BYTES, MAX_FILE_BYTES};
use airlock_proto::{
    ExecRequest, Operation, ReadFileRequest, Reply, SecretBytes, WriteFileRequest,
};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;
use crate::audit::{self, Peer};
use crate::vm::{CreateVm, VmState, VmView};

/// Longest a `GET /api/vms/:id?wait=settled` may block.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Longest exec deadline a request may ask for.
const MAX_EXEC_TIMEOUT_MS: u64 = 3_600_000;

type ApiResult<T> = Result<T, ApiError>;

/// `POST /api/vms`
pub async fn create(
    State(app): State<AppState>,
    peer: Peer,
    Json(req): Json<CreateVm>,
) -> ApiResult<Response> {
    let view = app.vms.create(req)?;
    let what = format!(
        "{:?} VM, {} MiB, {} vCPU(s), owner {}",
        view.kind,
        view.memory_mib,
        view.vcpus,
        view.owner.as_deref().unwrap_or("none")
    );
    audit::vm_action(peer, "create", &view.id, &what);
    let location = format!("/api/vms/{}", view.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// Body of `GET /api/vms`.
#[derive(Debug, Serialize)]
pub struct VmList {
    vms: Vec<VmView>,
}

/// `GET /api/vms`
pub async fn list(State(app): State<AppState>) -> Json<VmList> {
    Json(VmList {
        vms: app.vms.list(),
    })
}

/// Query of `GET /api/vms/:id`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GetQuery {
    /// Block until the VM is in one of these comma-separated states
    /// (`booting`, `ready`, `failed`, `stopped`); `settled` means any state
    /// but `booting`.
    wait: Option<String>,
    /// Longest block (ms; default and maximum 300000). The VM is returned
    /// as it is when the time is up.
    timeout_ms: Option<u64>,
}

fn parse_states(list: &str) -> Result<Vec<VmState>, ApiError> {
    if list == "settled" {
        return Ok(vec![VmState::Ready, VmState::Failed, VmState::Stopped]);
    }
    list.split(',')
        .map(|s| {
            serde_json::from_value(serde_json::Value::String(s.trim().to_string())).map_err(|_| {
                ApiError::bad_request(format!(
                    "wait: {s:?} is not a state (booting, ready, failed, stopped, or settled)"
                ))
            })
        })
        .collect()
}

/// `GET /api/vms/:id[?wait=settled|STATE,...&timeoutMs=N]`: a long-poll,
/// so clients need not poll.
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> ApiResult<Json<VmView>> {
    let Some(wait) = q.wait.as_deref() else {
        return Ok(Json(app.vms.get(&id)?));
    };
    let states = parse_states(wait)?;
    let timeout = q
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT);
    Ok(Json(app.vms.wait_for(&id, &states, timeout).await?))
}

/// `DELETE /api/vms/:id`
pub async fn delete(
    State(app): State<AppState>,
    peer: Peer,
    Path(id): Path<String>,
) -> ApiResult<Json<VmView>> {
    let view = app.vms.delete(&id).await?;
    audit::vm_action(peer, "delete", &id, &format!("it was {:?}", view.state));
    Ok(Json(view))
}

/// Body of `POST /api/vms/:id/exec`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    cwd: Option<String>,
    timeout_ms: Option<u64>,
    max_output_bytes: Option<u32>,
}

/// Answer of `POST /api/vms/:id/exec`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecOutput {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    stdout_dropped_bytes: u64,
    stderr_dropped_bytes: u64,
    duration_ms: u64,
}

/// `POST /api/vms/:id/exec`
pub async fn exec(
    State(app): State<AppState>,
    peer: Peer,
    Path(id): Path<String>,
    Json(body): Json<ExecBody>,
) -> ApiResult<Json<ExecOutput>> {
    let cfg = &app.vms.config().vm;
    let timeout_ms = body.timeout_ms.unwrap_or(cfg.exec_timeout_ms);
    if timeout_ms == 0 || timeout_ms > MAX_EXEC_TIMEOUT_MS {
        return Err(ApiError::bad_request(format!(
            "timeoutMs must be between 1 and {MAX_EXEC_TIMEOUT_MS}"
        )));
    }
    let req = ExecRequest {
        argv: body.argv,
        env: body.env,
        cwd: body.cwd,
        timeout_ms,
        max_output_bytes: body.max_output_bytes.unwrap_or(DEFAULT_EXEC_OUTPUT_BYTES),
    };
    req.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let wait = Duration::from_millis(timeout_ms + cfg.request_margin_ms);
    let argv = req.argv.clone();
    let reply = app.vms.call(&id, Operation::Exec(req), wait).await?;
    let Reply::Exec(r) = reply else {
        return Err(unexpected(&id));
    };
    audit::exec(peer, &id, &argv, r.exit_code);
    Ok(Json(ExecOutput {
        exit_code: r.exit_code,
        signal: r.signal,
        timed_out: r.timed_out,
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        stdout_dropped_bytes: r.stdout_dropped,
        stderr_dropped_bytes: r.stderr_dropped,
        duration_ms: r.duration_ms,
    }))
}

fn unexpected(id: &str) -> ApiError {
    ApiError::from(crate::vm::VmError::Invalid(format!(
        "VM {id}: the agent answered with the wrong kind of reply"
    )))
}

/// Query of the file endpoints.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileQuery {
    /// Absolute path in the VM.
    path: String,
    /// Octal permission bits for a write (default `644`).
    mode: Option<String>,
    /// Create missing parent directories on a write.
    #[serde(default)]
    parents: bool,
    /// Largest file a read returns (default and maximum 2 MiB).
    max_bytes: Option<u32>,
}

/// Answer of a write.
#[derive(Debug, Serialize)]
pub struct Written {
    bytes: u64,
    sha256: String,
}

/// `PUT /api/vms/:id/files?path=/abs/path&mode=600[&parents=true]` with the
/// raw contents as the body.
pub async fn put_file(
    State(app): State<AppState>,
    peer: Peer,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Bytes,
) -> ApiResult<Json<Written>> {
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .map_err(|_| ApiError::bad_request(format!("mode {m:?} is not octal")))?,
    };
    let req = WriteFileRequest {
        path: q.path,
        mode,
        create_parents: q.parents,
        contents: SecretBytes::new(body.to_vec()),
    };
    req.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let wait = Duration::from_millis(app.vms.config().vm.request_margin_ms * 2);
    let path = req.path.clone();
    match app.vms.call(&id, Operation::WriteFile(req), wait).await? {
        Reply::FileWritten(w) => {
            let what = format!(
                "{path} ({} bytes, mode {mode:o}, sha256 {})",
                w.bytes, w.sha256
            );
            audit::vm_action(peer, "writeFile", &id, &what);
            Ok(Json(Written {
                bytes: w.bytes,
                sha256: w.sha256,
            }))
        }
        _ => Err(unexpected(&id)),
    }
}

/// `GET /api/vms/:id/files?path=/abs/path` returns the raw contents, with
/// the file's mode in `X-File-Mode`.
pub async fn get_file(
    State(app): State<AppState>,
    peer: Peer,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Response> {
    let req = ReadFileRequest {
        path: q.path,
        max_bytes: q.max_bytes.unwrap_or(MAX_FILE_BYTES).min(MAX_FILE_BYTES),
    };
    req.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let wait = Duration::from_millis(app.vms.config().vm.request_margin_ms * 2);
    let path = req.path.clone();
    match app.vms.call(&id, Operation::ReadFile(req), wait).await? {
        Reply::File(f) => {
            let what = format!("{path} ({} bytes)", f.contents.len());
            audit::vm_action(peer, "readFile", &id, &what);
            Ok((
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (
                        header::HeaderName::from_static("x-file-mode"),
                        format!("{:04o}", f.mode),
                    ),
                ],
                f.contents.into_inner(),
            )
                .into_response())
        }
        _ => Err(unexpected(&id)),
    }
}

/// `GET /api/vms/:id/status`: the agent's own report (uptime, memory, RSS).
pub async fn status(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<airlock_proto::StatusReport>> {
    let wait = Duration::from_millis(app.vms.config().vm.request_margin_ms);
    match app.vms.call(&id, Operation::Status, wait).await? {
        Reply::Status(s) => Ok(Json(s)),
        _ => Err(unexpected(&id)),
    }
}
