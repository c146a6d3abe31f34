//! `writeFile` and `readFile`: atomic writes with an exact mode, bounded
//! reads. Called by the request dispatcher in [`crate::channel`] on a
//! blocking thread (the I/O is synchronous and may fsync).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use airlock_proto::{
    ErrorCode, ErrorReply, FileContents, FileWritten, ReadFileRequest, SecretBytes,
    WriteFileRequest,
};
use sha2::{Digest, Sha256};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_error(action: &str, path: &Path, e: std::io::Error) -> ErrorReply {
    let code = match e.kind() {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    ErrorReply::new(code, format!("{action} {}: {e}", path.display()))
}

/// Writes the file through a temporary sibling, fsync and rename, so a
/// reader sees the old contents or the new, never a part; then syncs the
/// directory so the rename survives a crash.
pub fn write_file(req: &WriteFileRequest) -> Result<FileWritten, ErrorReply> {
    req.validate()
        .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
    let path = Path::new(&req.path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            "path has no file name",
        ));
    };
    if req.create_parents {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error("create directory", dir, e))?;
    }
    let tmp = dir.join(format!(
        ".{}.airlock-{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_temp_then_rename(&tmp, path, dir, req);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    Ok(FileWritten {
        bytes: req.contents.len() as u64,
        sha256: sha256_hex(req.contents.expose()),
    })
}

fn write_temp_then_rename(
    tmp: &Path,
    path: &Path,
    dir: &Path,
    req: &WriteFileRequest,
) -> Result<(), ErrorReply> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| io_error("create", tmp, e))?;
    file.write_all(req.contents.expose())
        .map_err(|e| io_error("write", tmp, e))?;
    // Set the mode explicitly: the open mode is filtered by the umask.
    file.set_permissions(fs::Permissions::from_mode(req.mode))
        .map_err(|e| io_error("chmod", tmp, e))?;
    file.sync_all().map_err(|e| io_error("fsync", tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| io_error("rename onto", path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("fsync directory", dir, e))
}

/// Reads a regular file of at most `max_bytes`.
pub fn read_file(req: &ReadFileRequest) -> Result<FileContents, ErrorReply> {
    req.validate()
        .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
    let path = Path::new(&req.path);
    let file = File::open(path).map_err(|e| io_error("open", path, e))?;
    let meta = file.metadata().map_err(|e| io_error("stat", path, e))?;
    if !meta.is_file() {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let max = u64::from(req.max_bytes);
    let too_large = |size: u64| {
        ErrorReply::new(
            ErrorCode::TooLarge,
            format!(
                "{} is {size} bytes, more than the {max} allowed",
                path.display()
            ),
        )
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    // Read one byte past the limit: the file may have grown since stat.
    let mut contents = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut contents)
        .map_err(|e| io_error("read", path, e))?;
    if contents.len() as u64 > max {
        return Err(too_large(contents.len() as u64));
    }
    Ok(FileContents {
        mode: meta.permissions().mode() & 0o7777,
        contents: SecretBytes::new(contents),
    })
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trip_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/secret.json");
        let req = WriteFileRequest {
            path: path.to_string_lossy().into(),
            mode: 0o600,
            create_parents: true,
            contents: SecretBytes::new(b"{\"token\":1}".to_vec()),
        };
        let w = write_file(&req).unwrap();
        assert_eq!(w.bytes, 11);
        assert_eq!(w.sha256, sha256_hex(b"{\"token\":1}"));
        let r = read_file(&ReadFileRequest {
            path: req.path.clone(),
            max_bytes: 100,
        })
        .unwrap();
        assert_eq!(r.contents.expose(), b"{\"token\":1}");
        assert_eq!(r.mode, 0o600);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn read_refuses_large_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, vec![0u8; 200]).unwrap();
        let p = path.to_string_lossy().to_string();
        let e = read_file(&ReadFileRequest {
            path: p,
            max_bytes: 100,
        })
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        let e = read_file(&ReadFileRequest {
            path: "/no/such".into(),
            max_bytes: 100,
        })
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn relative_path_is_bad_request() {
        let e = write_file(&WriteFileRequest {
            path: "relative".into(),
            mode: 0o644,
            create_parents: false,
            contents: SecretBytes::default(),
        })
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }
}
