//! Tests only: every request plan of the Firecracker backend, checked
//! against Firecracker v1.15.1's Swagger contract by [`super::swagger`]
//! (paths, methods, bodies, and the order rules), and checks that the
//! validator itself refuses wrong requests. No Firecracker runs here: the
//! machines have no usable KVM.

use serde_json::{json, Value as Json};

use super::plan::{self, ApiRequest, SnapshotFiles, Telemetry};
use super::swagger::{Phase, Session, Spec};
use super::{FirecrackerBackend, View};
use crate::config::{FirecrackerConfig, VmConfig};
use crate::vm::backend::{Boot, LaunchSpec};
use crate::vm::layout::VmDir;

fn spec_for(dir: &VmDir, boot: Boot) -> LaunchSpec {
    LaunchSpec {
        vm_id: "vm-fc".into(),
        dir: dir.clone(),
        memory_mib: 512,
        vcpus: 2,
        agent_port: 1024,
        boot,
        kind: crate::vm::VmKind::Cli,
        background: false,
    }
}

fn golden_image() -> Boot {
    Boot::Image {
        image: crate::image::GoldenImage {
            kind: "cli",
            dir: "/img".into(),
            sha256: "abc".into(),
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.cpio.gz".into(),
            layers: vec!["/img/base.squashfs".into(), "/img/airlock.squashfs".into()],
        },
        init: "/lib/systemd/systemd",
        home: Some("/homes/h.ext4".into()),
    }
}

/// The boot plan the backend builds for `boot` (unjailed).
fn boot_requests(boot: Boot) -> (Vec<ApiRequest>, VmDir, tempfile::TempDir) {
    let run = tempfile::tempdir().unwrap();
    let dir = VmDir::create(run.path(), "vm-fc").unwrap();
    let backend = FirecrackerBackend::new(FirecrackerConfig::default(), VmConfig::default());
    let spec = spec_for(&dir, boot);
    let files = backend.boot_files(&spec.boot).unwrap();
    let p = backend.boot_plan(&spec, &files, &View::Host).unwrap();
    (plan::boot(&p), dir, run)
}

fn body(r: &ApiRequest) -> Json {
    serde_json::to_value(&r.body).unwrap()
}

/// Runs `requests` through a session starting in `phase`; the phase it
/// ends in.
fn validate(spec: &Spec, phase: Phase, requests: &[ApiRequest]) -> Result<Phase, String> {
    let mut s = Session::new(spec, phase);
    for r in requests {
        s.apply(r.method.as_str(), &r.path, Some(&body(r)))?;
    }
    Ok(s.phase())
}

fn paths(requests: &[ApiRequest]) -> Vec<String> {
    requests
        .iter()
        .map(|r| format!("{} {}", r.method.as_str(), r.path))
        .collect()
}

fn telemetry() -> Telemetry {
    Telemetry {
        log_path: "/run/airlock/vms/vm-fc/vmm.log".into(),
        metrics_path: "/run/airlock/vms/vm-fc/metrics.json".into(),
    }
}

fn files() -> SnapshotFiles {
    SnapshotFiles {
        snapshot_path: "/snap/vm.state".into(),
        mem_file_path: "/snap/vm.mem".into(),
    }
}

#[test]
fn firecracker_contract_kept_in_the_repository_is_the_reference_copy() {
    assert_ne!(
        super::swagger::kept_copy_differs(),
        Some(true),
        "host/src/vm/firecracker/contract/ differs from ../shared/reference/firecracker/"
    );
}

#[test]
fn firecracker_contract_is_v1_15_1_and_names_the_pre_boot_only_requests() {
    let spec = Spec::load();
    assert_eq!(spec.version(), "1.15.1");
    let pre: Vec<String> = spec
        .pre_boot_only()
        .into_iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    for needed in [
        "PUT /boot-source",
        "PUT /drives/{drive_id}",
        "PUT /machine-config",
        "PUT /vsock",
        "PUT /snapshot/load",
    ] {
        assert!(pre.contains(&needed.to_string()), "{needed} in {pre:?}");
    }
    let post = spec.post_boot_only();
    assert!(post.contains(&("PUT".into(), "/snapshot/create".into())));
}

#[test]
fn firecracker_boot_plan_for_an_initramfs_vm_satisfies_the_contract() {
    let spec = Spec::load();
    let (requests, dir, _run) = boot_requests(Boot::Initramfs);
    assert_eq!(
        paths(&requests),
        [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /vsock",
            "PUT /actions"
        ]
    );
    assert_eq!(validate(&spec, Phase::Fresh, &requests), Ok(Phase::Running));
    let boot = body(&requests[3]);
    assert_eq!(boot["kernel_image_path"], "/var/lib/airlock/image/vmlinuz");
    assert_eq!(
        boot["initrd_path"],
        "/var/lib/airlock/image/initramfs.cpio.gz"
    );
    let args = boot["boot_args"].as_str().unwrap();
    assert!(
        args.contains("console=ttyS0") && args.contains("airlock.port=1024"),
        "{args}"
    );
    let vsock = body(&requests[4]);
    assert_eq!(vsock["guest_cid"], 3);
    assert_eq!(vsock["uds_path"], dir.vsock_uds().to_str().unwrap());
    assert_eq!(body(&requests[5]), json!({"action_type": "InstanceStart"}));
}

#[test]
fn firecracker_boot_plan_for_a_golden_image_satisfies_the_contract() {
    let spec = Spec::load();
    let (requests, _dir, _run) = boot_requests(golden_image());
    assert_eq!(
        paths(&requests)[3..7],
        [
            "PUT /boot-source",
            "PUT /drives/layer0",
            "PUT /drives/layer1",
            "PUT /drives/home"
        ]
    );
    assert_eq!(validate(&spec, Phase::Fresh, &requests), Ok(Phase::Running));
    let layer = body(&requests[4]);
    assert_eq!(layer["path_on_host"], "/img/base.squashfs");
    assert_eq!(layer["is_read_only"], true);
    assert_eq!(layer["is_root_device"], false);
    let home = body(&requests[6]);
    assert_eq!(home["is_read_only"], false);
    assert_eq!(home["cache_type"], "Writeback");
    let args = body(&requests[3])["boot_args"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        args.contains("airlock.layers=vda,vdb airlock.init=/lib/systemd/systemd airlock.home=vdc"),
        "{args}"
    );
    assert_eq!(body(&requests[3])["kernel_image_path"], "/img/vmlinuz");
}

#[test]
fn firecracker_pause_and_resume_satisfy_the_contract() {
    let spec = Spec::load();
    assert_eq!(
        validate(&spec, Phase::Running, &plan::pause()),
        Ok(Phase::Paused)
    );
    assert_eq!(
        validate(&spec, Phase::Paused, &plan::resume()),
        Ok(Phase::Running)
    );
    assert!(validate(&spec, Phase::Configuring, &plan::pause()).is_err());
}

#[test]
fn firecracker_snapshot_create_pauses_first_and_satisfies_the_contract() {
    let spec = Spec::load();
    let requests = plan::snapshot_create(&files());
    assert_eq!(paths(&requests), ["PATCH /vm", "PUT /snapshot/create"]);
    assert_eq!(
        validate(&spec, Phase::Running, &requests),
        Ok(Phase::Paused)
    );
    assert_eq!(body(&requests[1])["snapshot_type"], "Full");
    let (boot, _dir, _run) = boot_requests(Boot::Initramfs);
    let whole: Vec<ApiRequest> = boot.into_iter().chain(requests).collect();
    assert_eq!(validate(&spec, Phase::Fresh, &whole), Ok(Phase::Paused));
}

#[test]
fn firecracker_snapshot_load_on_a_fresh_process_satisfies_the_contract() {
    let spec = Spec::load();
    let requests = plan::snapshot_load(&telemetry(), &files(), true);
    assert_eq!(
        paths(&requests),
        ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
    );
    assert_eq!(validate(&spec, Phase::Fresh, &requests), Ok(Phase::Running));
    let paused = plan::snapshot_load(&telemetry(), &files(), false);
    assert_eq!(validate(&spec, Phase::Fresh, &paused), Ok(Phase::Paused));
    let mut after_resume = paused;
    after_resume.extend(plan::resume());
    assert_eq!(
        validate(&spec, Phase::Fresh, &after_resume),
        Ok(Phase::Running)
    );
}

/// One request on a session in `phase`, for the refusals below.
fn refusal(phase: Phase, method: &str, path: &str, body: Json) -> String {
    let spec = Spec::load();
    let mut s = Session::new(&spec, phase);
    match s.apply(method, path, Some(&body)) {
        Ok(()) => panic!("{method} {path} {body} was accepted in {phase:?}"),
        Err(e) => e,
    }
}

#[test]
fn firecracker_contract_validator_refuses_bad_bodies() {
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": "/k", "kernel_path": "/k"}),
    );
    assert!(e.contains("unknown field kernel_path"), "{e}");
    let e = refusal(Phase::Running, "PATCH", "/vm", json!({"state": "Stopped"}));
    assert!(e.contains("is not one of Paused, Resumed"), "{e}");
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/drives/a",
        json!({"drive_id": "a", "path_on_host": "/d"}),
    );
    assert!(
        e.contains("required field is_root_device is missing"),
        "{e}"
    );
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": "2", "mem_size_mib": 128}),
    );
    assert!(e.contains("is not an integer"), "{e}");
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/vsock",
        json!({"guest_cid": 2, "uds_path": "/v"}),
    );
    assert!(e.contains("below the minimum 3"), "{e}");
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/drives/a",
        json!({"drive_id": "b", "is_root_device": false}),
    );
    assert!(e.contains("differs from the path"), "{e}");
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": "/s", "vsock_override": {"uds_path": "/v"}}),
    );
    assert!(e.contains("unknown field vsock_override"), "{e}");
}

#[test]
fn firecracker_contract_validator_refuses_unknown_paths_and_methods() {
    let e = refusal(Phase::Fresh, "PUT", "/boot", json!({}));
    assert!(e.contains("no such path"), "{e}");
    let e = refusal(Phase::Running, "PUT", "/vm", json!({"state": "Paused"}));
    assert!(e.contains("has no PUT"), "{e}");
}

#[test]
fn firecracker_contract_validator_refuses_requests_out_of_order() {
    let kernel = json!({"kernel_image_path": "/k"});
    let e = refusal(Phase::Running, "PUT", "/boot-source", kernel.clone());
    assert!(e.contains("pre-boot only"), "{e}");
    let e = refusal(
        Phase::Running,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": "/s", "mem_file_path": "/m"}),
    );
    assert!(e.contains("paused VM only"), "{e}");
    let e = refusal(
        Phase::Configuring,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": "/s"}),
    );
    assert!(e.contains("only a fresh process"), "{e}");
    let e = refusal(
        Phase::Fresh,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    assert!(e.contains("no boot source"), "{e}");
    let e = refusal(Phase::Running, "PUT", "/logger", json!({"log_path": "/l"}));
    assert!(e.contains("after the start"), "{e}");
    // The same requests in a boot plan, one moved after the start.
    let spec = Spec::load();
    let (mut requests, _dir, _run) = boot_requests(Boot::Initramfs);
    let boot_source = requests.remove(3);
    requests.push(boot_source);
    let e = validate(&spec, Phase::Fresh, &requests).unwrap_err();
    assert!(e.contains("no boot source configured"), "{e}");
    let (mut requests, _dir, _run) = boot_requests(Boot::Initramfs);
    let vsock = requests.remove(4);
    requests.push(vsock);
    let e = validate(&spec, Phase::Fresh, &requests).unwrap_err();
    assert!(
        e.contains("PUT /vsock") && e.contains("pre-boot only"),
        "{e}"
    );
}
