//! What agent build airlockd expects, and an early check of the image.
//!
//! The expectation comes from the agent binary airlockd was deployed with
//! (`vm.agent_binary`), not from the image: an image built from older agent
//! code must be refused, so the image cannot vouch for itself. The image's
//! manifest (written by `image/build-initramfs.sh`) is read only to warn at
//! startup that VMs from it will be refused. Called once by the daemon.

use std::path::{Path, PathBuf};

use crate::config::VmConfig;

/// The agent build VMs must run.
#[derive(Debug, Clone)]
pub struct ExpectedAgent {
    /// GNU build id (lowercase hex).
    pub build_id: String,
    /// Where the expectation comes from, for error messages.
    pub source: String,
    /// The image VMs boot, for error messages.
    pub image: PathBuf,
}

/// The expected build could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
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
    let image = vm.initramfs.clone();
    if let Some(id) = &vm.expected_build_id {
        return Ok(ExpectedAgent {
            build_id: id.to_ascii_lowercase(),
            source: "vm.expected_build_id in the config".into(),
            image,
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
        image,
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

/// Logs a warning when the image's manifest names another agent build.
pub fn warn_if_stale(expected: &ExpectedAgent) {
    let path = manifest_path(&expected.image);
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
                image = %expected.image.display(),
                image_build = id,
                expected_build = %expected.build_id,
                "the image is stale: its agent differs from the expected build, so its VMs will be refused; run `make image`"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
