//! `make bench` for the spine. Boots VMs one after another under TCG
//! through a real airlockd and prints the medians of each boot stage, the
//! agent's size and resident memory next to those of a minimal Node.js
//! HTTP health server (the old system's approach) started in the same run,
//! and the time the initramfs takes to build. Figures, not assertions;
//! `SPECIFICATION.md` records them with this command.
//!
//! `AIRLOCK_BENCH_RUNS` sets the number of boots (default 7).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_tests::stats::{median, percentile};
use airlock_tests::{artifacts, rss_kib, Daemon, Settings};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

const STAGES: &[(&str, &str)] = &[
    (
        "vmmToInitMs",
        "VMM start -> /init (host clock, console marker)",
    ),
    (
        "guestUptimeAtInitMs",
        "kernel uptime at /init (guest clock)",
    ),
    ("initToHelloMs", "/init -> hello sent (guest clock)"),
    ("helloToReadyMs", "hello received -> ready (host clock)"),
    ("requestToReadyMs", "API request -> ready (host clock)"),
];

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
}

async fn run() -> Result<()> {
    let runs: usize = std::env::var("AIRLOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let a = artifacts()?;
    let mut results = serde_json::Map::new();
    println!("airlock spine benchmark: {runs} sequential boots, QEMU q35 + qboot under TCG, 256 MiB, 1 vCPU");

    let (stages, guest_rss) = boot_series(runs).await?;
    println!(
        "\n{:<50} {:>9} {:>9} {:>9}",
        "boot stage", "median", "min", "max"
    );
    for (key, label) in STAGES {
        let xs = &stages[key];
        println!(
            "{label:<50} {:>6.0} ms {:>6.0} ms {:>6.0} ms",
            median(xs),
            percentile(xs, 0.0),
            percentile(xs, 100.0)
        );
        results.insert(format!("{key}Median"), json!(median(xs)));
    }

    let agent_size = std::fs::metadata(&a.guest_bin)?.len() as f64;
    let agent_rss_vm = median(&guest_rss) * 1024.0;
    let agent_rss_host = host_process_agent_rss().await? as f64 * 1024.0;
    let node = node_health_server()?;
    println!(
        "\n{:<36} {:>12} {:>14} {:>10}",
        "footprint", "airlock", "Node.js", "ratio"
    );
    println!(
        "{:<36} {:>12} {:>14} {:>9.0}x",
        "binary size (agent stripped, static)",
        mib(agent_size),
        mib(node.binary_bytes),
        node.binary_bytes / agent_size
    );
    println!(
        "{:<36} {:>12} {:>14} {:>9.0}x",
        "RSS after hello, in the VM",
        mib(agent_rss_vm),
        mib(node.rss_bytes),
        node.rss_bytes / agent_rss_vm
    );
    println!(
        "{:<36} {:>12} {:>14} {:>9.0}x",
        "RSS after hello, as a host process",
        mib(agent_rss_host),
        mib(node.rss_bytes),
        node.rss_bytes / agent_rss_host
    );
    println!(
        "(Node.js {}: `http.createServer` answering /health on loopback, RSS after one request)",
        node.version
    );

    let image_ms = image_build_ms(3)?;
    println!(
        "\ninitramfs build (image/build-initramfs.sh): median {:.0} ms of 3",
        median(&image_ms)
    );

    for (k, v) in [
        ("agentBinaryBytes", agent_size),
        ("agentRssVmBytes", agent_rss_vm),
        ("agentRssHostBytes", agent_rss_host),
        ("nodeBinaryBytes", node.binary_bytes),
        ("nodeRssBytes", node.rss_bytes),
        ("binarySizeRatio", node.binary_bytes / agent_size),
        ("rssRatioVm", node.rss_bytes / agent_rss_vm),
        ("imageBuildMedianMs", median(&image_ms)),
    ] {
        results.insert(k.into(), json!(v));
    }
    results.insert("runs".into(), json!(runs));
    let out = a.build_dir.join("bench/spine.json");
    std::fs::create_dir_all(out.parent().context("dir")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    println!("\nfigures written to {}", out.display());
    Ok(())
}

/// Boots `runs` VMs one after another; returns each stage's series and the
/// agent's RSS (KiB) after its hello.
async fn boot_series(runs: usize) -> Result<(BTreeMap<&'static str, Vec<f64>>, Vec<f64>)> {
    let d = Daemon::start(Settings::new("qemu")).await?;
    let mut stages: BTreeMap<&str, Vec<f64>> =
        STAGES.iter().map(|(k, _)| (*k, Vec::new())).collect();
    let mut rss = Vec::new();
    for i in 0..runs {
        let vm = match d.ready_vm(json!({"kind": "cli"})).await {
            Ok(vm) => vm,
            Err(e) => {
                d.print_diagnostics();
                return Err(e);
            }
        };
        let id = vm["id"].as_str().context("id")?;
        for (key, series) in stages.iter_mut() {
            series.push(
                vm["timings"][*key]
                    .as_f64()
                    .with_context(|| format!("{key} missing: {vm}"))?,
            );
        }
        let (_, status) = d
            .request(reqwest::Method::GET, &format!("/api/vms/{id}/status"), None)
            .await?;
        rss.push(status["agentRssKib"].as_f64().context("agentRssKib")?);
        d.delete_vm(id).await?;
        eprintln!(
            "  boot {}/{runs}: ready {} ms after the request",
            i + 1,
            vm["timings"]["requestToReadyMs"]
        );
    }
    Ok((stages, rss))
}

/// RSS (KiB) of the same agent binary running as a host process after its
/// hello (process backend), for a like-for-like comparison with Node.js.
async fn host_process_agent_rss() -> Result<u64> {
    let d = Daemon::start(Settings::new("process")).await?;
    let vm = d.ready_vm(json!({"kind": "cli"})).await?;
    let pid = vm["vmmPid"].as_u64().context("vmmPid")? as i32;
    rss_kib(pid)
}

struct NodeFigures {
    version: String,
    binary_bytes: f64,
    rss_bytes: f64,
}

/// Starts a minimal Node.js health server, makes one request, and reads
/// its RSS and the size of the `node` binary.
fn node_health_server() -> Result<NodeFigures> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("health.js");
    std::fs::write(
        &script,
        "const http = require('http');\n\
         const s = http.createServer((req, res) => {\n\
           res.writeHead(200, {'content-type': 'application/json'});\n\
           res.end('{\"status\":\"ok\"}');\n\
         });\n\
         s.listen(0, '127.0.0.1', () => console.log('listening ' + s.address().port));\n",
    )?;
    let node = which("node")?;
    let version = String::from_utf8(Command::new(&node).arg("--version").output()?.stdout)?
        .trim()
        .to_string();
    let mut child = Command::new(&node)
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<NodeFigures> {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .context("port line")?
            .parse()?;
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        std::io::Write::write_all(&mut stream, b"GET /health HTTP/1.0\r\n\r\n")?;
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut stream, &mut reply)?;
        if !reply.contains("\"status\":\"ok\"") {
            bail!("node answered {reply:?} after {:?}", started.elapsed());
        }
        Ok(NodeFigures {
            version: version.clone(),
            binary_bytes: std::fs::metadata(std::fs::canonicalize(&node)?)?.len() as f64,
            rss_bytes: rss_kib(child.id() as i32)? as f64 * 1024.0,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn which(program: &str) -> Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH (make bench installs nodejs)"))
}

/// Times `n` builds of the test initramfs (ms each).
fn image_build_ms(n: usize) -> Result<Vec<f64>> {
    let a = artifacts()?;
    let out = tempfile::tempdir()?;
    let mut times = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let status = Command::new(&a.image_script)
            .arg("--agent")
            .arg(&a.guest_bin)
            .arg("--out")
            .arg(out.path())
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("image build failed: {status}");
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(times)
}
