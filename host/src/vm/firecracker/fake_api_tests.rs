//! Tests only: the Firecracker backend's HTTP client, handle and launch
//! against a fake Firecracker API (a Unix-socket HTTP server in the test
//! that records requests and answers 204, or 400 with a `fault_message`)
//! and a fake `firecracker` executable. What arrives on the wire is also
//! run through the Swagger contract check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use tokio::net::UnixListener;

use super::api::{ApiClient, ApiError};
use super::plan::{self, Telemetry};
use super::swagger::{Phase, Session, Spec};
use super::{FirecrackerBackend, FirecrackerError, FirecrackerVm, Snapshot, SnapshotPaths, View};
use crate::config::{FirecrackerConfig, VmConfig};
use crate::vm::backend::{BackendError, Boot, LaunchSpec};
use crate::vm::layout::VmDir;

/// A request as the fake Firecracker received it.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    content_type: String,
    body: Json,
}

type Log = Arc<Mutex<Vec<Received>>>;

/// Serves Firecracker's API on `listener`: 204 to everything, except 400
/// with `fault` to a request for `fail_path`.
fn fake_firecracker(listener: UnixListener, fail: Option<(&'static str, &'static str)>) -> Log {
    let log = Log::default();
    let recorded = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = recorded.clone();
            let service = service_fn(move |req| answer(req, log.clone(), fail));
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    log
}

async fn answer(
    req: Request<Incoming>,
    log: Log,
    fail: Option<(&'static str, &'static str)>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let header = parts.headers.get(hyper::header::CONTENT_TYPE);
    log.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        content_type: header.and_then(|v| v.to_str().ok()).unwrap_or("").into(),
        body: serde_json::from_slice(&bytes).unwrap_or(Json::Null),
    });
    let reply = match fail {
        Some((path, fault)) if parts.uri.path() == path => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::from(format!(r#"{{"fault_message": "{fault}"}}"#))),
        _ => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::default()),
    };
    Ok(reply.unwrap())
}

fn served(log: &Log) -> Vec<String> {
    let log = log.lock().unwrap();
    log.iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn boot_plan() -> Vec<plan::ApiRequest> {
    plan::boot(&plan::BootPlan {
        telemetry: Telemetry {
            log_path: "/v/vmm.log".into(),
            metrics_path: "/v/metrics.json".into(),
        },
        vcpus: 1,
        memory_mib: 256,
        kernel: "/k".into(),
        initrd: "/i".into(),
        boot_args: plan::kernel_cmdline(1024, None, ""),
        layers: vec!["/l0".into()],
        home: Some("/h".into()),
        vsock_uds: "/v/vsock.sock".into(),
    })
}

#[tokio::test]
async fn firecracker_api_client_sends_a_plan_in_order_to_a_fake_firecracker() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let log = fake_firecracker(UnixListener::bind(&socket).unwrap(), None);
    let plan = boot_plan();
    ApiClient::new(&socket, Duration::from_secs(5))
        .send_all(&plan)
        .await
        .unwrap();
    let expected: Vec<String> = plan
        .iter()
        .map(|r| format!("{} {}", r.method.as_str(), r.path))
        .collect();
    assert_eq!(served(&log), expected);
    // What went over the wire is what the plan says, and the contract
    // accepts it in this order.
    let spec = Spec::load();
    let mut session = Session::new(&spec, Phase::Fresh);
    for (got, sent) in log.lock().unwrap().iter().zip(&plan) {
        assert_eq!(got.content_type, "application/json");
        assert_eq!(got.body, serde_json::to_value(&sent.body).unwrap());
        session
            .apply(&got.method, &got.path, Some(&got.body))
            .unwrap();
    }
    assert_eq!(session.phase(), Phase::Running);
}

#[tokio::test]
async fn firecracker_api_client_quotes_the_fault_message_of_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let fault = "Invalid kernel path: /k (No such file or directory)";
    let log = fake_firecracker(
        UnixListener::bind(&socket).unwrap(),
        Some(("/boot-source", fault)),
    );
    let err = ApiClient::new(&socket, Duration::from_secs(5))
        .send_all(&boot_plan())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::Refused { status: 400, fault: f, .. } if f == fault),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("Firecracker refused PUT /boot-source (400): {fault}")
    );
    // Nothing is sent after the refusal.
    assert_eq!(served(&log).last().unwrap(), "PUT /boot-source");
    assert_eq!(served(&log).len(), 4);
}

fn handle(socket: &Path, vsock_uds: &str) -> FirecrackerVm {
    FirecrackerVm {
        vm_id: "vm-h".into(),
        api: ApiClient::new(socket, Duration::from_secs(5)),
        view: View::Host,
        telemetry: Telemetry {
            log_path: "/v/vmm.log".into(),
            metrics_path: "/v/metrics.json".into(),
        },
        vsock_uds: vsock_uds.into(),
    }
}

#[tokio::test]
async fn firecracker_handle_pauses_resumes_and_snapshots_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let log = fake_firecracker(UnixListener::bind(&socket).unwrap(), None);
    let vm = handle(&socket, "/v/vsock.sock");
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    let paths = SnapshotPaths {
        state: "/snap/vm.state".into(),
        memory: "/snap/vm.mem".into(),
    };
    let snapshot = vm.snapshot_create(&paths).await.unwrap();
    assert_eq!(snapshot.vsock_uds, "/v/vsock.sock");
    assert_eq!(
        served(&log),
        [
            "PATCH /vm",
            "PATCH /vm",
            "PATCH /vm",
            "PUT /snapshot/create"
        ]
    );
    let create = log.lock().unwrap()[3].body.clone();
    assert_eq!(create["snapshot_path"], "/snap/vm.state");
    assert_eq!(create["mem_file_path"], "/snap/vm.mem");
    let fresh = handle(&socket, "/v/vsock.sock");
    fresh.snapshot_load(&snapshot, true).await.unwrap();
    assert_eq!(
        served(&log)[4..],
        ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
    );
}

#[tokio::test]
async fn firecracker_snapshot_load_refuses_a_vsock_path_it_cannot_override() {
    let snapshot = Snapshot {
        paths: SnapshotPaths {
            state: "/s".into(),
            memory: "/m".into(),
        },
        vsock_uds: "/run/airlock/vms/vm-old/vsock.sock".into(),
    };
    // No API socket: the refusal must come before any request.
    let vm = handle(
        Path::new("/nonexistent/fc.sock"),
        "/run/airlock/vms/vm-new/vsock.sock",
    );
    let err = vm.snapshot_load(&snapshot, true).await.unwrap_err();
    assert!(
        matches!(err, FirecrackerError::VsockMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no vsock override"), "{err}");
}

/// A backend whose `firecracker` is `script` and whose kernel, initramfs
/// and KVM device are empty files, and a VM directory to launch in.
fn fake_backend(root: &Path, script: &str) -> (FirecrackerBackend, LaunchSpec) {
    use std::os::unix::fs::PermissionsExt;
    let touch = |name: &str| -> PathBuf {
        let p = root.join(name);
        std::fs::write(&p, b"").unwrap();
        p
    };
    let binary = root.join("firecracker");
    std::fs::write(&binary, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vm = VmConfig {
        kernel: touch("vmlinux"),
        initramfs: touch("initramfs"),
        ..VmConfig::default()
    };
    let fc = FirecrackerConfig {
        binary,
        ..FirecrackerConfig::default()
    };
    let mut backend = FirecrackerBackend::new(fc, vm);
    backend.kvm_device = touch("kvm");
    let spec = LaunchSpec {
        vm_id: "vm-fake".into(),
        dir: VmDir::create(&root.join("run"), "vm-fake").unwrap(),
        memory_mib: 256,
        vcpus: 1,
        agent_port: 1024,
        boot: Boot::Initramfs,
        kind: crate::vm::VmKind::Cli,
        background: false,
    };
    (backend, spec)
}

#[tokio::test]
async fn firecracker_backend_launches_a_fake_firecracker_and_boots_it_over_the_api() {
    let root = tempfile::tempdir().unwrap();
    // Prints its arguments on the "serial console" and waits; the test
    // plays its API server.
    let (backend, spec) = fake_backend(root.path(), "echo \"fake serial: $*\"\nexec sleep 30");
    let socket = spec.dir.file("fc.sock");
    let server = {
        let socket = socket.clone();
        tokio::spawn(async move {
            // Late, so the launch really waits for the socket to appear.
            tokio::time::sleep(Duration::from_millis(200)).await;
            fake_firecracker(UnixListener::bind(&socket).unwrap(), None)
        })
    };
    let (mut vm, handle) = backend.launch_with_handle(&spec).await.unwrap();
    let log = server.await.unwrap();
    assert_eq!(
        served(&log),
        [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /vsock",
            "PUT /actions"
        ]
    );
    assert_eq!(handle.vsock_uds(), spec.dir.vsock_uds().to_str().unwrap());
    let pid = vm.vmm_pid().unwrap();
    let pids = std::fs::read_to_string(spec.dir.file("pids")).unwrap();
    assert_eq!(pids, format!("firecracker {pid}\n"));
    let expected = format!("fake serial: --id vm-fake --api-sock {}", socket.display());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !vm.console.tail_lines(5).contains(&expected) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "console: {}",
            vm.console.tail_lines(5)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vm.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn firecracker_backend_reports_an_early_exit_with_what_it_printed() {
    let root = tempfile::tempdir().unwrap();
    let script =
        "echo 'Error creating the VMM: Cannot open /dev/kvm'\necho 'stderr line' >&2\nexit 1";
    let (backend, spec) = fake_backend(root.path(), script);
    let err = backend.launch_with_handle(&spec).await.unwrap_err();
    let BackendError::EarlyExit {
        status, log_tail, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(status, "exit code 1");
    assert!(log_tail.contains("stderr line"), "{log_tail}");
}

#[tokio::test]
async fn firecracker_backend_refuses_a_missing_binary_at_launch() {
    let root = tempfile::tempdir().unwrap();
    let (mut backend, spec) = fake_backend(root.path(), "exit 0");
    backend.fc.binary = "/nonexistent/firecracker".into();
    let err = backend.launch_with_handle(&spec).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Firecracker binary /nonexistent/firecracker is missing"),
        "{text}"
    );
    backend.fc.binary = root.path().join("firecracker");
    backend.kvm_device = "/nonexistent/kvm".into();
    let err = backend.launch_with_handle(&spec).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("KVM device /nonexistent/kvm is missing"),
        "{err}"
    );
}
