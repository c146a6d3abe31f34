//! API behaviour that does not need a microVM, exercised with the process
//! backend: the real static agent runs as a host process and speaks the
//! same protocol over the same `<uds>_<port>` socket. Errors, limits, TLS,
//! exec deadlines and output caps, and the agent dying under a VM.

use std::time::Duration;

use airlock_tests::{with_daemon, Daemon, Settings};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

fn process() -> Settings {
    Settings::new("process")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_json_with_a_message_a_person_can_act_on() -> Result<()> {
    with_daemon(process().set("vm", "max_vms", "1"), async |d| {
        let cases: Vec<(Method, &str, Option<Value>, u16, &str)> = vec![
            (Method::GET, "/api/vms/vm-nope", None, 404, "no VM with id"),
            (
                Method::GET,
                "/no/such/route",
                None,
                404,
                "no route for /no/such/route",
            ),
            (
                Method::POST,
                "/api/vms",
                Some(json!({"kind": "toaster"})),
                422,
                "unknown variant `toaster`",
            ),
            (
                Method::POST,
                "/api/vms",
                Some(json!({"kind": "cli", "memoryMib": 1})),
                400,
                "memoryMib must be between 64",
            ),
            (
                Method::POST,
                "/api/vms",
                Some(json!({"kind": "cli", "vcpus": 99})),
                400,
                "vcpus must be between 1",
            ),
            (
                Method::POST,
                "/api/vms",
                Some(json!({"kind": "cli", "colour": "red"})),
                422,
                "unknown field `colour`",
            ),
            (Method::PATCH, "/api/vms", None, 405, "method not allowed"),
            (
                Method::GET,
                "/api/vms/x?wait=soon",
                None,
                400,
                "not a state",
            ),
        ];
        for (method, path, body, status, needle) in cases {
            let (got, v) = d.request(method.clone(), path, body).await?;
            assert_eq!(got, status, "{method} {path}: {v}");
            assert!(str_of(&v, "error").contains(needle), "{method} {path}: {v}");
        }
        let raw = d
            .http
            .post(format!("{}/api/vms", d.base))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await?;
        assert_eq!(raw.status(), 400);
        let v: Value = raw.json().await?;
        assert!(
            str_of(&v, "error").contains("Failed to parse the request body as JSON"),
            "{v}"
        );

        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id");
        let (status, v) = d
            .request(Method::POST, "/api/vms", Some(json!({"kind": "cli"})))
            .await?;
        assert_eq!(status, 503);
        assert!(str_of(&v, "error").contains("at most 1 VMs"), "{v}");
        let (status, v) = d
            .request(
                Method::POST,
                &format!("/api/vms/{id}/exec"),
                Some(json!({"argv": []})),
            )
            .await?;
        assert_eq!(status, 400);
        assert!(str_of(&v, "error").contains("must name a program"), "{v}");
        let (status, v) = d
            .request(
                Method::POST,
                &format!("/api/vms/{id}/exec"),
                Some(json!({"argv": ["/no/such/tool"]})),
            )
            .await?;
        assert_eq!(status, 404, "{v}");
        assert!(
            str_of(&v, "error").contains("cannot start \"/no/such/tool\""),
            "{v}"
        );
        let (status, v) = d
            .request(
                Method::GET,
                &format!("/api/vms/{id}/files?path=relative"),
                None,
            )
            .await?;
        assert_eq!(status, 400);
        assert!(str_of(&v, "error").contains("absolute path"), "{v}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_as_a_host_process_serves_the_same_protocol() -> Result<()> {
    with_daemon(process(), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id");
        assert!(vm["timings"]["requestToReadyMs"].is_u64());
        let out = d
            .exec(id, &["sh", "-c", "echo out; echo err >&2; exit 7"])
            .await?;
        assert_eq!(
            (
                out["exitCode"].as_i64(),
                str_of(&out, "stdout"),
                str_of(&out, "stderr")
            ),
            (Some(7), "out\n", "err\n")
        );

        let path = d.dir.path().join("written.txt");
        let url = format!(
            "{}/api/vms/{id}/files?path={}&mode=640",
            d.base,
            path.display()
        );
        let put = d.http.put(&url).body("hello").send().await?;
        assert_eq!(put.status(), 200);
        assert_eq!(std::fs::read_to_string(&path)?, "hello");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o640
        );

        let (status, report) = d
            .request(Method::GET, &format!("/api/vms/{id}/status"), None)
            .await?;
        assert_eq!(status, 200, "{report}");
        assert!(report["agentRssKib"].as_u64().unwrap_or(0) > 0, "{report}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_enforces_the_deadline_and_the_output_cap() -> Result<()> {
    with_daemon(process(), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let exec = format!("/api/vms/{}/exec", str_of(&vm, "id"));
        let (status, v) = d
            .request(
                Method::POST,
                &exec,
                Some(json!({"argv": ["sleep", "30"], "timeoutMs": 300})),
            )
            .await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            (v["timedOut"].as_bool(), v["signal"].as_i64()),
            (Some(true), Some(9)),
            "{v}"
        );
        assert!(v["durationMs"].as_u64().context("duration")? < 5000, "{v}");

        let body = json!({"argv": ["head", "-c", "5000", "/dev/zero"], "maxOutputBytes": 100});
        let (_, v) = d.request(Method::POST, &exec, Some(body)).await?;
        assert_eq!(str_of(&v, "stdout").len(), 100, "{v}");
        assert_eq!(v["stdoutDroppedBytes"], 4900);

        let (status, v) = d
            .request(
                Method::POST,
                &exec,
                Some(json!({"argv": ["true"], "maxOutputBytes": 99_999_999})),
            )
            .await?;
        assert_eq!(status, 400, "{v}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_agent_process_fails_the_vm_with_its_output() -> Result<()> {
    with_daemon(process(), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id");
        let pid = vm["vmmPid"].as_i64().context("pid")? as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let v = d.wait_state(id, "failed", Duration::from_secs(10)).await?;
        let error = str_of(&v, "error");
        assert!(
            error.contains("agent exited (killed by SIGKILL)"),
            "{error}"
        );
        assert!(
            error.contains("connected to host"),
            "its output is the console: {error}"
        );
        let (status, _) = d
            .request(
                Method::POST,
                &format!("/api/vms/{id}/exec"),
                Some(json!({"argv": ["true"]})),
            )
            .await?;
        assert_eq!(status, 409, "a failed VM takes no requests");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_actions_leave_audit_lines_without_contents() -> Result<()> {
    with_daemon(process().set("log", "format", "\"json\""), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id").to_string();
        d.exec(&id, &["sh", "-c", "echo argument-secret-1 >/dev/null"])
            .await?;
        let file = d.dir.path().join("audited");
        let url = format!("{}/api/vms/{id}/files?path={}", d.base, file.display());
        let put = d
            .http
            .put(format!("{url}&mode=600"))
            .body("file-secret-2")
            .send()
            .await?;
        ensure!(put.status() == 200, "{}", put.text().await?);
        let back = d.http.get(&url).send().await?.text().await?;
        assert_eq!(back, "file-secret-2");
        d.delete_vm(&id).await?;
        let log = d.log_tail(usize::MAX);
        for secret in ["argument-secret-1", "file-secret-2"] {
            assert!(!log.contains(secret), "{secret} is in airlockd's log");
        }
        let audit: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "audit")
            .collect();
        let actions: Vec<&str> = audit
            .iter()
            .filter(|l| l["fields"]["vm_id"] == id.as_str())
            .filter_map(|l| l["fields"]["action"].as_str())
            .collect();
        assert_eq!(
            actions,
            ["create", "exec", "writeFile", "readFile", "delete"],
            "{audit:?}"
        );
        for line in &audit {
            let peer = line["fields"]["peer"].as_str().unwrap_or_default();
            assert!(
                peer.starts_with("127.0.0.1:") && peer.ends_with(" token tests"),
                "who asked, and with which operator token: {line}"
            );
        }
        let exec = &audit[1]["fields"]["what"];
        assert_eq!(exec, "sh with 2 argument(s), exit code 0", "{exec}");
        let write = audit[2]["fields"]["what"].as_str().unwrap_or_default();
        assert!(write.contains("(13 bytes, mode 600, sha256 "), "{write}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_vms_by_state_and_time_their_boots() -> Result<()> {
    with_daemon(process(), async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let response = d.http.get(format!("{}/metrics", d.base)).send().await?;
        let kind = response.headers()["content-type"].to_str()?.to_string();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        let text = response.text().await?;
        for line in [
            "airlock_vms{kind=\"cli\",state=\"ready\"} 1",
            "airlock_vm_ready_seconds_count{origin=\"boot\"} 1",
            "airlock_vm_ready_seconds_bucket{origin=\"boot\",le=\"+Inf\"} 1",
            "airlock_egress_streams_total{outcome=\"refused\"} 0",
            "airlock_viewers 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        d.delete_vm(str_of(&vm, "id")).await?;
        let text = d.metrics().await?;
        assert!(!text.contains("airlock_vms{kind=\"cli\""), "{text}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_vm_frees_its_slot_at_once_and_is_forgotten_later() -> Result<()> {
    let settings = process()
        .set("vm", "max_vms", "1")
        .set("vm", "failed_vm_keep_ms", "1500");
    with_daemon(settings, async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id").to_string();
        let pid = nix::unistd::Pid::from_raw(vm["vmmPid"].as_i64().context("pid")? as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        let failed = d.wait_state(&id, "failed", Duration::from_secs(10)).await?;
        assert_eq!(failed["state"], "failed", "{failed}");
        // Listed with its error, yet not holding the only slot.
        let next = d.ready_vm(json!({"kind": "cli"})).await?;
        let (status, listed) = d
            .request(Method::GET, &format!("/api/vms/{id}"), None)
            .await?;
        assert_eq!(status, 200, "{listed}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, v) = d
                .request(Method::GET, &format!("/api/vms/{id}"), None)
                .await?;
            if status == 404 {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the failed VM is still listed after 15 s: {v}"
            );
            // Nothing announces the forgetting: look again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, all) = d.request(Method::GET, "/api/vms", None).await?;
        let ids: Vec<&str> = all["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["id"].as_str())
            .collect();
        assert_eq!(ids, [str_of(&next, "id")], "{all}");
        // Its logs outlive it.
        let logs = std::path::Path::new(str_of(&failed, "logsDir"));
        assert!(logs.join("error.txt").is_file(), "{}", logs.display());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_agent_is_noticed_by_its_silence_and_the_vm_fails() -> Result<()> {
    let settings = process().set("vm", "heartbeat_interval_ms", "200").set(
        "vm",
        "reconnect_timeout_ms",
        "1500",
    );
    with_daemon(settings, async |d| {
        let vm = d.ready_vm(json!({"kind": "cli"})).await?;
        let id = str_of(&vm, "id");
        let pid = nix::unistd::Pid::from_raw(vm["vmmPid"].as_i64().context("pid")? as i32);
        // Alive but frozen: its socket stays open, its heartbeats stop.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
        let v = d.wait_state(id, "failed", Duration::from_secs(20)).await?;
        assert_eq!(v["state"], "failed", "{v}");
        assert!(
            str_of(&v, "error").contains("did not reconnect within 1.5s"),
            "{v}"
        );
        let log =
            std::fs::read_to_string(std::path::Path::new(str_of(&v, "logsDir")).join("agent.log"))?;
        assert!(log.contains("not even a heartbeat"), "{log}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_id_mismatch_is_refused_at_the_hello() -> Result<()> {
    with_daemon(
        process().set("vm", "expected_build_id", "\"00ff00ff\""),
        async |d| {
            let id = d.create_vm(json!({"kind": "cli"})).await?;
            let v = d
                .wait_state(&id, "settled", Duration::from_secs(30))
                .await?;
            assert_eq!(v["state"], "failed");
            let error = str_of(&v, "error");
            assert!(
                error.contains("stale image") && error.contains("expects build 00ff00ff"),
                "{error}"
            );
            assert!(
                error.contains("host refused this agent"),
                "the agent was told why: {error}"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_https_with_the_configured_certificate() -> Result<()> {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let dir = tempfile::tempdir()?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.key_pair.serialize_pem())?;
    let settings = process()
        .set(
            "server",
            "tls_cert",
            &format!("{:?}", cert_path.display().to_string()),
        )
        .set(
            "server",
            "tls_key",
            &format!("{:?}", key_path.display().to_string()),
        );
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes())?;
    let d = Daemon::start_with(
        settings,
        reqwest::Client::builder()
            .add_root_certificate(root)
            .https_only(true),
    )
    .await?;
    assert!(d.base.starts_with("https://"), "{}", d.base);
    let (status, v) = d.request(Method::GET, "/health", None).await?;
    assert_eq!((status, str_of(&v, "status")), (200, "ok"));
    // Plain HTTP to the TLS port is not served.
    let plain = reqwest::Client::new()
        .get(d.base.replace("https://", "http://") + "/health")
        .send()
        .await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));
    Ok(())
}
