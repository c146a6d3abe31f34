//! End-to-end tests of the spine on real microVMs: QEMU under TCG, one
//! vhost-device-vsock per VM, the static agent as `/init` of the test
//! initramfs, driven through airlockd's HTTP API.
//!
//! Each test starts its own airlockd in a temp dir; dropping it tears every
//! VM down even when the test fails, and a failing test prints airlockd's
//! log and the consoles of its VMs.

use std::time::{Duration, Instant};

use airlock_proto::{frame, Event, GuestMessage, Heartbeat, Ready, INIT_MARKER};
use airlock_tests::{fake_guest, guest_build_id, stale_image, with_daemon, Settings};
use anyhow::{ensure, Context, Result};
use futures_util::future::try_join_all;
use reqwest::Method;
use serde_json::{json, Value};

fn qemu() -> Settings {
    Settings::new("qemu")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// The v1 cgroup directory of `pid` in `controller`'s hierarchy, when
/// this host mounts one.
fn v1_cgroup_of(pid: u32, controller: &str) -> Result<Option<std::path::PathBuf>> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| {
            let mount = std::path::Path::new("/sys/fs/cgroup").join(controller);
            mount.join(path.trim_start_matches('/'))
        })
    }))
}

fn read_trimmed(path: &std::path::Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_string())
}

/// QEMU and vhost-device-vsock run as `qemu.run_as`, never root, each VM
/// in a cgroup of its own with its memory and CPU limits (cgroup v1 here;
/// required, so a host where it cannot be made fails the test), which is
/// gone with the VM.
#[tokio::test(flavor = "multi_thread")]
async fn vm_processes_run_unprivileged_in_a_cgroup_of_their_own() -> Result<()> {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists();
    let cgroups = if v1 { "required" } else { "auto" };
    let settings = qemu().set("qemu", "cgroups", &format!("\"{cgroups}\""));
    with_daemon(settings, async |d| {
        let account = std::process::Command::new("id")
            .args(["-u", "airlock-vm"])
            .output()?;
        let uid = String::from_utf8(account.stdout)?.trim().to_string();
        assert!(
            !uid.is_empty(),
            "no airlock-vm account (scripts/setup.sh makes it)"
        );
        let (_, health) = d.request(Method::GET, "/health", None).await?;
        let how = str_of(&health, "confinement");
        assert!(
            how.starts_with("as airlock-vm, each VM in its own cgroup"),
            "{health}"
        );
        let parents = health["cgroupParents"].as_array().map_or(0, Vec::len);
        assert_eq!(parents, if v1 { 2 } else { 1 }, "{health}");
        let vm = d
            .ready_vm(json!({"kind": "cli", "memoryMib": 256, "vcpus": 1}))
            .await?;
        let id = str_of(&vm, "id").to_string();
        let dir = d.run_dir().join("vms").join(&id);
        let pids = std::fs::read_to_string(dir.join("pids"))?;
        let pids: Vec<u32> = pids
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect();
        assert_eq!(pids.len(), 2, "QEMU and vhost-device-vsock: {pids:?}");
        let mut cgroups = Vec::new();
        for pid in &pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let ids = |key: &str| -> Vec<String> {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|r| r.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default()
            };
            assert_eq!(
                ids("Uid:"),
                vec![uid.clone(); 4],
                "pid {pid} runs as {:?}",
                ids("Uid:")
            );
            assert!(
                !ids("Gid:").contains(&"0".to_string()),
                "pid {pid} keeps gid 0"
            );
            assert!(
                !ids("Groups:").contains(&"0".to_string()),
                "pid {pid} keeps group root"
            );
            if v1 {
                let memory = v1_cgroup_of(*pid, "memory")?.context("no memory cgroup")?;
                let cpu = v1_cgroup_of(*pid, "cpu")?.context("no cpu cgroup")?;
                assert!(
                    memory.ends_with(&id) && cpu.ends_with(&id),
                    "pid {pid} in {memory:?} and {cpu:?}"
                );
                cgroups.push((memory, cpu));
            }
        }
        if let Some((memory, cpu)) = cgroups.first() {
            // 256 MiB of guest RAM and qemu.memory_overhead_mib (1024).
            assert_eq!(
                read_trimmed(&memory.join("memory.limit_in_bytes"))?,
                (1280u64 << 20).to_string()
            );
            // One core per vCPU and qemu.cpu_overhead_percent (50).
            assert_eq!(read_trimmed(&cpu.join("cpu.cfs_quota_us"))?, "150000");
            assert_eq!(read_trimmed(&cpu.join("cpu.cfs_period_us"))?, "100000");
        } else {
            eprintln!("this host mounts no cgroup v1 memory hierarchy: limits not checked");
        }
        // The VM's directory stays root's (its record is trusted later),
        // open only to the account's group; its sockets are in vmm/.
        let meta = std::fs::metadata(&dir)?;
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o710));
        assert_eq!(std::fs::metadata(dir.join("vmm"))?.uid().to_string(), uid);
        d.delete_vm(&id).await?;
        for (memory, cpu) in &cgroups {
            assert!(
                !memory.exists() && !cpu.exists(),
                "the VM's cgroup is left: {memory:?}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn boots_a_vm_runs_uname_and_round_trips_a_file() -> Result<()> {
    with_daemon(qemu(), async |d| {
        let (status, health) = d.request(Method::GET, "/health", None).await?;
        assert_eq!(status, 200);
        assert_eq!(health["backend"], "qemu");

        let vm = d.ready_vm(json!({"kind": "cli", "memoryMib": 256})).await?;
        let id = str_of(&vm, "id");
        assert_eq!(
            vm["agentBuildId"],
            guest_build_id()?,
            "the VM runs this build's agent"
        );
        assert_eq!(vm["accel"], "tcg");
        // QEMU runs under its seccomp sandbox, and a CLI VM's may start no
        // process.
        let pid = vm["vmmPid"].as_u64().context("vmmPid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "QEMU is not under a seccomp filter"
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        assert!(
            String::from_utf8_lossy(&cmdline).contains("spawn=deny"),
            "a CLI VM's QEMU may spawn processes"
        );
        for key in [
            "requestToVmmMs",
            "vmmToInitMs",
            "guestUptimeAtInitMs",
            "initToHelloMs",
            "helloToReadyMs",
            "requestToReadyMs",
        ] {
            assert!(vm["timings"][key].is_u64(), "timing {key} missing: {vm}");
        }

        let out = d.exec(id, &["uname", "-a"]).await?;
        assert_eq!(out["exitCode"], 0, "{out}");
        let uname = str_of(&out, "stdout");
        assert!(
            uname.starts_with(&format!("Linux {id} ")),
            "hostname comes from the host's config: {uname}"
        );
        assert!(uname.contains("x86_64"), "{uname}");

        // Every byte value, so encoding mistakes cannot hide.
        let contents: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let url = format!(
            "{}/api/vms/{id}/files?path=/root/airlock/round-trip.bin&mode=600&parents=true",
            d.base
        );
        let put: Value = d
            .http
            .put(&url)
            .body(contents.clone())
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(put["bytes"], 70_000);
        let get = d.http.get(&url).send().await?;
        assert_eq!(get.status(), 200);
        assert_eq!(get.headers()["x-file-mode"], "0600");
        assert_eq!(
            get.bytes().await?.to_vec(),
            contents,
            "read back what was written"
        );
        let stat = d
            .exec(id, &["stat", "-c", "%a %s", "/root/airlock/round-trip.bin"])
            .await?;
        assert_eq!(str_of(&stat, "stdout").trim(), "600 70000");
        let sum = d
            .exec(id, &["sha256sum", "/root/airlock/round-trip.bin"])
            .await?;
        assert!(
            str_of(&sum, "stdout").starts_with(str_of(&put, "sha256")),
            "hash the agent reported matches the file"
        );

        let gone = d.delete_vm(id).await?;
        assert_eq!(gone["state"], "stopped");
        assert_eq!(d.leftover_processes(), Vec::<String>::new());
        assert_eq!(d.leftover_vm_dirs(), Vec::<String>::new());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn acceleration_is_chosen_by_a_probe_boot_not_assumed() -> Result<()> {
    with_daemon(qemu().set("qemu", "accel", "\"auto\""), async |d| {
        // The first VM waits for the probe's verdict.
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let (_, health) = d.request(Method::GET, "/health", None).await?;
        let accel = str_of(&health, "accel");
        assert!(accel == "kvm" || accel == "tcg", "{health}");
        assert_eq!(
            vm["accel"], accel,
            "the VM runs with the chosen acceleration"
        );
        let reason = str_of(&health, "accelReason");
        if std::path::Path::new("/dev/kvm").exists() {
            // Here /dev/kvm exists, so only a probe boot may decide.
            assert!(reason.contains("probe VM"), "{reason}");
            assert!(
                d.state_dir().join("accel-probe.json").exists(),
                "the verdict is cached"
            );
        } else {
            assert!(reason.contains("/dev/kvm is not usable"), "{reason}");
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_a_baseline_cpu_without_sse42_or_avx() -> Result<()> {
    // The old system's Node.js died on exactly such vCPUs.
    let cpu = "\"qemu64,-sse4.1,-sse4.2,-ssse3,-popcnt,-avx,-avx2\"";
    with_daemon(qemu().set("qemu", "cpu", cpu), async |d| {
        let vm = d.ready_vm(json!({"kind": "browser"})).await?;
        let id = str_of(&vm, "id");
        let info = d
            .exec(id, &["grep", "-m1", "^flags", "/proc/cpuinfo"])
            .await?;
        let flags: Vec<&str> = str_of(&info, "stdout").split_whitespace().collect();
        assert!(flags.contains(&"sse2"), "{flags:?}");
        for absent in ["sse4_2", "sse4_1", "ssse3", "avx", "avx2"] {
            assert!(!flags.contains(&absent), "{absent} must be off: {flags:?}");
        }
        let out = d.exec(id, &["echo", "baseline ok"]).await?;
        assert_eq!(str_of(&out, "stdout"), "baseline ok\n");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn three_vms_at_once_all_answer_and_leave_nothing_behind() -> Result<()> {
    with_daemon(qemu(), async |d| {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(d.create_vm(json!({"kind": "cli"})).await?);
        }
        let views = try_join_all(
            ids.iter()
                .map(|id| d.wait_state(id, "settled", Duration::from_secs(120))),
        )
        .await?;
        for v in &views {
            ensure!(v["state"] == "ready", "not ready: {v}");
        }
        let mut boot_ids = Vec::new();
        for id in &ids {
            let out = d
                .exec(id, &["cat", "/proc/sys/kernel/random/boot_id"])
                .await?;
            boot_ids.push(str_of(&out, "stdout").to_string());
            let host = d.exec(id, &["hostname"]).await?;
            assert_eq!(
                str_of(&host, "stdout").trim(),
                id,
                "each answer comes from its own VM"
            );
        }
        boot_ids.sort();
        boot_ids.dedup();
        assert_eq!(boot_ids.len(), 3, "three distinct kernels");
        let (_, list) = d.request(Method::GET, "/api/vms", None).await?;
        assert_eq!(list["vms"].as_array().map(Vec::len), Some(3));

        try_join_all(ids.iter().map(|id| d.delete_vm(id))).await?;
        assert_eq!(
            d.leftover_processes(),
            Vec::<String>::new(),
            "no QEMU or vhost-device-vsock left"
        );
        assert_eq!(
            d.leftover_vm_dirs(),
            Vec::<String>::new(),
            "no sockets or per-VM files left"
        );
        assert_eq!(
            d.leftover_cgroups(),
            Vec::<String>::new(),
            "no cgroups left"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_qemu_fails_the_vm_within_a_second_and_keeps_its_console() -> Result<()> {
    with_daemon(qemu(), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id").to_string();
        let pid = vm["vmmPid"].as_i64().context("vmmPid")? as i32;

        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let v = d.wait_state(&id, "failed", Duration::from_secs(10)).await?;
        let took = killed.elapsed();
        assert_eq!(v["state"], "failed", "{v}");
        assert!(
            took < Duration::from_secs(1),
            "marked failed after {took:?}"
        );

        let error = str_of(&v, "error");
        assert!(error.contains("qemu exited (killed by SIGKILL)"), "{error}");
        assert!(
            error.contains("--- last console lines ---") && error.contains(INIT_MARKER),
            "{error}"
        );
        let logs = std::path::PathBuf::from(str_of(&v, "logsDir"));
        let console = std::fs::read_to_string(logs.join("console.log"))?;
        assert!(console.contains(INIT_MARKER), "console log kept: {console}");
        assert!(logs.join("agent.log").exists());
        assert_eq!(
            d.leftover_processes(),
            Vec::<String>::new(),
            "vhost-device-vsock stopped too"
        );
        assert_eq!(d.leftover_vm_dirs(), Vec::<String>::new());
        // A failed VM stays listed (with its error) until deleted.
        assert_eq!(d.delete_vm(&id).await?["state"], "failed");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_on_the_wrong_port_fails_at_the_boot_timeout_with_the_console_tail() -> Result<()> {
    // The guest dials port 4999; airlockd listens on 1024.
    with_daemon(
        qemu()
            .set("qemu", "extra_append", "\"airlock.port=4999\"")
            .set("vm", "boot_timeout_ms", "12000"),
        async |d| {
            let started = Instant::now();
            let id = d.create_vm(json!({"kind": "cli"})).await?;
            let v = d
                .wait_state(&id, "settled", Duration::from_secs(60))
                .await?;
            let took = started.elapsed();
            assert_eq!(v["state"], "failed", "{v}");
            assert!(
                took >= Duration::from_secs(12) && took < Duration::from_secs(20),
                "failed after {took:?}"
            );
            let error = str_of(&v, "error");
            assert!(error.contains("did not say hello within 12s"), "{error}");
            assert!(error.contains("--- last console lines ---"), "{error}");
            assert!(
                error.contains(INIT_MARKER),
                "tail shows the agent ran: {error}"
            );
            assert!(
                error.contains("cannot reach the host yet"),
                "tail shows why: {error}"
            );
            assert!(std::path::Path::new(str_of(&v, "logsDir"))
                .join("console.log")
                .exists());
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_agent_is_refused_with_an_error_naming_the_image() -> Result<()> {
    let images = tempfile::tempdir()?;
    let stale = stale_image(images.path())?;
    with_daemon(
        qemu().set(
            "vm",
            "initramfs",
            &format!("{:?}", stale.display().to_string()),
        ),
        async |d| {
            let started = Instant::now();
            let id = d.create_vm(json!({"kind": "cli"})).await?;
            let v = d
                .wait_state(&id, "settled", Duration::from_secs(60))
                .await?;
            assert_eq!(v["state"], "failed", "{v}");
            let error = str_of(&v, "error");
            assert!(
                error.contains(&format!("stale image {}", stale.display())),
                "{error}"
            );
            assert!(
                error.contains(&guest_build_id()?),
                "names the expected build: {error}"
            );
            assert!(error.contains("make image"), "says how to fix it: {error}");
            assert!(
                started.elapsed() < Duration::from_secs(50),
                "refused at the hello, not at the boot timeout"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_from_a_guest_drop_only_that_connection() -> Result<()> {
    with_daemon(qemu().set("vm", "hello_timeout_ms", "2000"), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id").to_string();
        let sock = d.run_dir().join(format!("vms/{id}/vmm/vsock.sock_1024"));
        let within = Duration::from_secs(5);

        // An oversized frame header: dropped before any payload is read.
        let mut s = fake_guest::connect(&sock).await?;
        fake_guest::send_raw(&mut s, &u32::MAX.to_be_bytes()).await?;
        fake_guest::expect_closed(&mut s, within)
            .await
            .context("oversized frame")?;

        // A frame that is not JSON.
        let mut s = fake_guest::connect(&sock).await?;
        fake_guest::send_raw(&mut s, b"\x00\x00\x00\x05hello").await?;
        fake_guest::expect_closed(&mut s, within)
            .await
            .context("garbage payload")?;

        // A valid message that is not a hello.
        let mut s = fake_guest::connect(&sock).await?;
        let beat = GuestMessage::Event(Event::Heartbeat(Heartbeat {
            seq: 0,
            uptime_ms: 1,
        }));
        fake_guest::send_raw(&mut s, &frame::encode(&beat, 1 << 20)?).await?;
        fake_guest::expect_closed(&mut s, within)
            .await
            .context("no hello")?;

        // A hello whose fields break the bounds (a 1000-byte version string).
        let mut s = fake_guest::connect(&sock).await?;
        fake_guest::send_raw(
            &mut s,
            &fake_guest::hello_with_version("ab", &"9".repeat(1000)),
        )
        .await?;
        fake_guest::expect_closed(&mut s, within)
            .await
            .context("invalid hello")?;

        // Silence: dropped at the hello deadline.
        let mut s = fake_guest::connect(&sock).await?;
        fake_guest::expect_closed(&mut s, within)
            .await
            .context("silent connection")?;

        // A correct handshake followed by garbage: the host drops it, and the
        // real agent, whose connection this one replaced, dials back in.
        let mut s = fake_guest::connect(&sock).await?;
        fake_guest::send_raw(&mut s, &fake_guest::hello(&guest_build_id()?)).await?;
        let ready = GuestMessage::Event(Event::Ready(Ready { uptime_ms: 3 }));
        fake_guest::send_raw(&mut s, &frame::encode(&ready, 1 << 20)?).await?;
        fake_guest::send_raw(&mut s, b"\x00\x00\x00\x03{{{").await?;
        let welcome = fake_guest::expect_closed(&mut s, within)
            .await
            .context("garbage after handshake")?;
        assert!(
            String::from_utf8_lossy(&welcome).contains("\"welcome\""),
            "the handshake itself succeeded"
        );

        // The VM still serves, through its real agent.
        let out = d.exec(&id, &["hostname"]).await?;
        assert_eq!(str_of(&out, "stdout").trim(), id);
        assert_eq!(
            d.request(Method::GET, &format!("/api/vms/{id}"), None)
                .await?
                .1["state"],
            "ready"
        );
        // And the host serves other VMs.
        let other = d.ready_vm(json!({"kind": "browser"})).await?;
        let out = d.exec(str_of(&other, "id"), &["true"]).await?;
        assert_eq!(out["exitCode"], 0);
        let agent_log = std::fs::read_to_string(d.run_dir().join(format!("vms/{id}/agent.log")))?;
        for why in [
            "exceeds the limit",
            "malformed message",
            "not a hello",
            "invalid hello",
            "no hello",
        ] {
            assert!(
                agent_log.contains(why),
                "agent.log records {why:?}:\n{agent_log}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_tears_down_every_vm() -> Result<()> {
    with_daemon(qemu(), async |d| {
        let ready = d.ready_vm(json!({"kind": "cli"})).await?;
        let booting = d.create_vm(json!({"kind": "cli"})).await?;
        assert_eq!(
            d.request(Method::GET, &format!("/api/vms/{booting}"), None)
                .await?
                .1["state"],
            "booting"
        );
        assert!(
            !d.leftover_processes().is_empty(),
            "VM processes are running"
        );
        let status = d.terminate()?;
        assert!(
            status.success(),
            "airlockd exits cleanly on SIGTERM: {status}"
        );
        assert_eq!(d.leftover_processes(), Vec::<String>::new());
        assert_eq!(d.leftover_vm_dirs(), Vec::<String>::new());
        assert_eq!(d.leftover_cgroups(), Vec::<String>::new(), "cgroups left");
        assert!(!d
            .run_dir()
            .join(format!("vms/{}", str_of(&ready, "id")))
            .exists());
        Ok(())
    })
    .await
}
