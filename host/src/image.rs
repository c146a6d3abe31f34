//! What agent build airlockd expects, and the images VMs boot from.
//!
//! The expectation comes from the agent binary airlockd was deployed with
//! (`vm.agent_binary`), not from an image: an image built from older agent
//! code must be refused, so the image cannot vouch for itself. An image's
//! manifest is read to refuse a stale golden image before a VM boots from
//! it (and to warn at startup); the agent's hello is checked again when it
//! runs. Golden images (`image/build-image.sh`) are directories with a
//! kernel, a stage-1 initrd, read-only squashfs layers and a manifest.
//! Used by the daemon at startup and by the VM manager per VM.

use std::path::{Path, PathBuf};

use crate::config::VmConfig;

/// The agent build VMs must run.
#[derive(Debug, Clone)]
pub struct ExpectedAgent {
    /// GNU build id (lowercase hex).
    pub build_id: String,
    /// Where the expectation comes from, for error messages.
    pub source: String,
}

/// The expected build could not be determined, or an image is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A golden image's file is missing.
    #[error("{kind} image {dir} is incomplete: {file} is missing; build it with `make image`")]
    Incomplete {
        /// `browser` or `cli`.
        kind: &'static str,
        /// The image directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// A golden image's manifest is unreadable.
    #[error(
        "{kind} image {dir}: cannot read its manifest.json: {why}; rebuild it with `make image`"
    )]
    Manifest {
        /// `browser` or `cli`.
        kind: &'static str,
        /// The image directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A golden image carries another agent build than airlockd expects.
    #[error("stale {kind} image {dir}: its agent is build {image_build}, but airlockd expects build {expected} ({source_of}); rebuild the image with `make image`")]
    Stale {
        /// `browser` or `cli`.
        kind: &'static str,
        /// The image directory.
        dir: PathBuf,
        /// The build id its manifest names.
        image_build: String,
        /// The build id airlockd expects.
        expected: String,
        /// Where the expectation comes from.
        source_of: String,
    },
    /// The agent binary could not be read.
    #[error("cannot read the agent binary {path} (vm.agent_binary; build it with `make build`): {source}")]
    Read {
        /// The binary.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The binary carries no build id.
    #[error("cannot read the build id of {path}: {source}")]
    BuildId {
        /// The binary.
        path: PathBuf,
        /// Cause.
        #[source]
        source: airlock_proto::elf::ElfError,
    },
}

/// Determines the expected agent build from the config.
pub fn expected_agent(vm: &VmConfig) -> Result<ExpectedAgent, ImageError> {
    if let Some(id) = &vm.expected_build_id {
        return Ok(ExpectedAgent {
            build_id: id.to_ascii_lowercase(),
            source: "vm.expected_build_id in the config".into(),
        });
    }
    let path = &vm.agent_binary;
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.clone(),
        source,
    })?;
    let build_id =
        airlock_proto::elf::gnu_build_id(&bytes).map_err(|source| ImageError::BuildId {
            path: path.clone(),
            source,
        })?;
    Ok(ExpectedAgent {
        build_id,
        source: format!("agent binary {}", path.display()),
    })
}

/// `initramfs.cpio.gz` -> `initramfs.manifest.json` next to it.
pub fn manifest_path(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".cpio.gz")
        .or_else(|| name.strip_suffix(".cpio"))
        .unwrap_or(&name);
    image.with_file_name(format!("{stem}.manifest.json"))
}

/// Logs a warning for each image VMs would be refused from: the
/// initramfs whose manifest names another agent build, and golden images
/// that are missing or stale.
pub fn warn_if_stale(vm: &VmConfig, expected: &ExpectedAgent) {
    let golden = [("browser", &vm.browser_image), ("cli", &vm.cli_image)];
    for (kind, dir) in golden {
        if let Some(Err(e)) = dir.as_ref().map(|d| GoldenImage::open(kind, d, expected)) {
            tracing::warn!(error = %e, "VMs of this kind will be refused");
        }
    }
    let initramfs = &vm.initramfs;
    let path = manifest_path(initramfs);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
        tracing::warn!(manifest = %path.display(), "image manifest is not valid JSON");
        return;
    };
    if let Some(id) = manifest.get("agentBuildId").and_then(|v| v.as_str()) {
        if id != expected.build_id {
            tracing::warn!(
                image = %initramfs.display(),
                image_build = id,
                expected_build = %expected.build_id,
                "the image is stale: its agent differs from the expected build, so its VMs will be refused; run `make image`"
            );
        }
    }
}

/// The files of a golden image, in the order the VM sees its drives.
pub const LAYER_FILES: [&str; 3] = ["base.squashfs", "vendor.squashfs", "airlock.squashfs"];

/// A golden image, checked against the expected agent.
#[derive(Debug, Clone)]
pub struct GoldenImage {
    /// `browser` or `cli`.
    pub kind: &'static str,
    /// Its directory.
    pub dir: PathBuf,
    /// The image's identity (`imageSha256` of its manifest).
    pub sha256: String,
    /// The kernel.
    pub kernel: PathBuf,
    /// The stage-1 initrd (the agent assembles the root from the layers).
    pub initrd: PathBuf,
    /// Read-only squashfs layers, bottom first.
    pub layers: Vec<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    image_sha256: String,
    agent_build_id: String,
}

impl GoldenImage {
    /// Opens the image in `dir` and refuses it unless its agent is the
    /// `expected` build.
    pub fn open(
        kind: &'static str,
        dir: &Path,
        expected: &ExpectedAgent,
    ) -> Result<Self, ImageError> {
        let files = ["manifest.json", "vmlinuz", "initrd.cpio.gz"]
            .into_iter()
            .chain(LAYER_FILES);
        for file in files {
            if !dir.join(file).is_file() {
                return Err(ImageError::Incomplete {
                    kind,
                    dir: dir.into(),
                    file,
                });
            }
        }
        let bad = |why: String| ImageError::Manifest {
            kind,
            dir: dir.into(),
            why,
        };
        let text =
            std::fs::read_to_string(dir.join("manifest.json")).map_err(|e| bad(e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if m.agent_build_id.to_ascii_lowercase() != expected.build_id {
            return Err(ImageError::Stale {
                kind,
                dir: dir.into(),
                image_build: m.agent_build_id,
                expected: expected.build_id.clone(),
                source_of: expected.source.clone(),
            });
        }
        Ok(Self {
            kind,
            dir: dir.into(),
            sha256: m.image_sha256,
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio.gz"),
            layers: LAYER_FILES.iter().map(|f| dir.join(f)).collect(),
        })
    }

    /// How errors and refusals name it.
    pub fn describe(&self) -> String {
        format!("{} image {}", self.kind, self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir(build: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "vmlinuz",
            "initrd.cpio.gz",
            "base.squashfs",
            "vendor.squashfs",
            "airlock.squashfs",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let manifest = format!("{{\"imageSha256\": \"abc\", \"agentBuildId\": \"{build}\"}}");
        std::fs::write(dir.path().join("manifest.json"), manifest).unwrap();
        dir
    }

    fn expected(build: &str) -> ExpectedAgent {
        ExpectedAgent {
            build_id: build.into(),
            source: "agent binary /x".into(),
        }
    }

    #[test]
    fn a_golden_image_with_the_expected_agent_opens() {
        let dir = image_dir("aaaa");
        let img = GoldenImage::open("browser", dir.path(), &expected("aaaa")).unwrap();
        assert_eq!(img.sha256, "abc");
        assert_eq!(img.layers[0], dir.path().join("base.squashfs"));
    }

    #[test]
    fn a_stale_or_incomplete_golden_image_is_refused_by_name() {
        let dir = image_dir("bbbb");
        let e = GoldenImage::open("browser", dir.path(), &expected("aaaa"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stale browser image") && e.contains(&dir.path().display().to_string()),
            "{e}"
        );
        assert!(e.contains("bbbb") && e.contains("aaaa"), "{e}");
        std::fs::remove_file(dir.path().join("base.squashfs")).unwrap();
        let e = GoldenImage::open("cli", dir.path(), &expected("bbbb"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("base.squashfs is missing"), "{e}");
    }

    #[test]
    fn manifest_sits_next_to_the_image() {
        assert_eq!(
            manifest_path(Path::new("/a/initramfs.cpio.gz")),
            Path::new("/a/initramfs.manifest.json")
        );
        assert_eq!(
            manifest_path(Path::new("/a/stale.cpio")),
            Path::new("/a/stale.manifest.json")
        );
    }

    #[test]
    fn reads_build_id_of_this_test_binary() {
        // The workspace links everything with --build-id, tests included.
        let exe = std::env::current_exe().unwrap();
        let vm = VmConfig {
            agent_binary: exe,
            ..VmConfig::default()
        };
        let e = expected_agent(&vm).unwrap();
        assert_eq!(e.build_id.len(), 40);
    }
}
