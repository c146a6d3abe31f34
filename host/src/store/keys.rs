//! The key file of the credential store: loading it (creating it on first
//! use) for [`super::CredentialStore::open`], and appending a new key for
//! [`rotate_key`], which an operator command calls.
//!
//! Format: text, one key per line, `<key-id> <base64 of 32 bytes>`; blank
//! lines and lines starting with `#` are ignored. The last key is the
//! current one (it encrypts new records); every listed key decrypts, so a
//! rotation only ever appends. Keys are never printed: errors name the file,
//! the line number and the key id, never the line itself.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

use super::crypto::Scrubbed;

/// Bytes of an AES-256 key.
const KEY_LEN: usize = 32;
/// Random bytes in a generated key id (it is shown as hex, twice as long).
const KEY_ID_BYTES: usize = 4;
/// Accepted lengths of a key id, in hex digits.
const KEY_ID_HEX_LEN: std::ops::RangeInclusive<usize> = 4..=32;
/// Permission bits that must be clear on the key file.
const GROUP_OTHER_BITS: u32 = 0o077;

const HEADER: &str = "\
# airlock credential store keys: one key per line, `<key-id> <base64 of 32 bytes>`.
# The last key encrypts new records; every key listed decrypts. Rotate with
# airlock_host::store::rotate_key, which appends; never delete a key that
# records still use.
";

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is missing although stored records use keys.
    #[error(
        "key file {path} is missing, but the database holds records encrypted with keys \
         {key_ids}: restore the key file from a backup (a new key file could not decrypt them)"
    )]
    MissingWithRecords {
        /// The key file.
        path: PathBuf,
        /// Key ids the records use, comma-separated.
        key_ids: String,
    },
    /// The file (or its directory) could not be written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may access the file.
    #[error(
        "key file {path} has mode {mode:03o}, which lets group or others access it: \
         run `chmod 600 {path}`"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is not a regular file.
    #[error("key file {path} is not a regular file")]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// A line is malformed; the line itself is not shown because it holds a key.
    #[error("key file {path}, line {line}: {reason}")]
    Parse {
        /// The key file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two lines use the same key id.
    #[error("key file {path}, line {line}: key id {key_id} is listed twice")]
    Duplicate {
        /// The key file.
        path: PathBuf,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The repeated id.
        key_id: String,
    },
    /// The file lists no key.
    #[error("key file {path} holds no key")]
    Empty {
        /// The key file.
        path: PathBuf,
    },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// One key: its id and the AEAD key. `Debug` shows the id only.
pub(crate) struct Key {
    id: String,
    aead: LessSafeKey,
}

impl Key {
    /// The key id stored next to every record it encrypts.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The AES-256-GCM key.
    pub(crate) fn aead(&self) -> &LessSafeKey {
        &self.aead
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Every key of the file, in file order; the last one is current.
pub(crate) struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(Key::id).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

impl Keyring {
    /// Loads the key file, creating it with one fresh key when missing;
    /// but not when records already use keys (`used_key_ids`): a new file
    /// could not decrypt them, and creating one would hide that the real
    /// file is lost.
    pub(crate) fn load_or_create(
        path: &Path,
        rng: &SystemRandom,
        used_key_ids: &[String],
    ) -> Result<Self, KeyError> {
        match read_private(path) {
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                if !used_key_ids.is_empty() {
                    return Err(KeyError::MissingWithRecords {
                        path: path.to_path_buf(),
                        key_ids: used_key_ids.join(", "),
                    });
                }
                create(path, rng)?;
                Self::parse(path, &read_private(path)?)
            }
            Err(e) => Err(e),
            Ok(text) => Self::parse(path, &text),
        }
    }

    /// The key that encrypts new records.
    pub(crate) fn current(&self) -> &Key {
        // `parse` refuses an empty file, so there is always a last key.
        &self.keys[self.keys.len() - 1]
    }

    /// The key with this id, if the file lists it.
    pub(crate) fn find(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// True when the file lists this key id.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    fn parse(path: &Path, text: &Scrubbed) -> Result<Self, KeyError> {
        let parse_err = |line, reason| KeyError::Parse {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let text = std::str::from_utf8(text.as_slice()).map_err(|_| parse_err(0, "not UTF-8"))?;
        let mut keys: Vec<Key> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut fields = trimmed.split_whitespace();
            let (Some(id), Some(encoded), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(parse_err(line, "expected `<key-id> <base64 of 32 bytes>`"));
            };
            if !valid_key_id(id) {
                return Err(parse_err(
                    line,
                    "the key id must be 4 to 32 lowercase hex digits",
                ));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyError::Duplicate {
                    path: path.to_path_buf(),
                    line,
                    key_id: id.to_string(),
                });
            }
            let bytes = base64_decode(encoded)
                .ok_or_else(|| parse_err(line, "the key is not valid base64"))?;
            if bytes.as_slice().len() != KEY_LEN {
                return Err(parse_err(line, "the key must be 32 bytes (AES-256)"));
            }
            let unbound = UnboundKey::new(&AES_256_GCM, bytes.as_slice())
                .map_err(|_| parse_err(line, "the key is not a valid AES-256 key"))?;
            keys.push(Key {
                id: id.to_string(),
                aead: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { keys })
    }
}

/// Appends a new random key to the key file at `path` and returns its id.
///
/// The file is rewritten atomically (a 0600 temp file in the same
/// directory, fsynced, renamed over the old one), so a crash leaves either
/// the old or the new file. Records stored before keep decrypting with
/// their old key; a store opened afterwards encrypts new records with the
/// new one (a running store keeps the keys it loaded at open).
pub fn rotate_key(path: &Path) -> Result<String, KeyError> {
    let rng = SystemRandom::new();
    let old = read_private(path)?;
    let ring = Keyring::parse(path, &old)?;
    let (id, line) = new_key_line(&rng, |id| ring.contains(id))?;
    let mut text = Scrubbed::with_capacity(old.as_slice().len() + line.as_slice().len() + 1);
    text.extend(old.as_slice());
    if !old.as_slice().ends_with(b"\n") && !old.as_slice().is_empty() {
        text.extend(b"\n");
    }
    text.extend(line.as_slice());
    write_atomically(path, &text, true)?;
    tracing::info!(path = %path.display(), key_id = %id, "appended a new credential store key");
    Ok(id)
}

/// Reads the key file after checking (on the open file, so a swap between
/// check and read cannot slip through) that only its owner may access it.
fn read_private(path: &Path) -> Result<Scrubbed, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // Sized up front so the buffer never reallocates and leaves copies.
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut text = Scrubbed::with_capacity(capacity);
    file.read_to_end(text.vec_mut()).map_err(read_err)?;
    Ok(text)
}

/// Creates a missing key file holding one fresh key (and its directory,
/// 0700, when that is missing too). Losing a race to another process
/// creating the same file is fine: the winner's file is then used.
fn create(path: &Path, rng: &SystemRandom) -> Result<(), KeyError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| KeyError::Write {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
    }
    let (id, line) = new_key_line(rng, |_| false)?;
    let mut text = Scrubbed::with_capacity(HEADER.len() + line.as_slice().len());
    text.extend(HEADER.as_bytes());
    text.extend(line.as_slice());
    if write_atomically(path, &text, false)? {
        tracing::info!(
            path = %path.display(),
            key_id = %id,
            "created the credential store key file"
        );
    }
    Ok(())
}

/// A fresh key as a key-file line (with its newline), with an id for which
/// `taken` is false.
fn new_key_line(
    rng: &SystemRandom,
    taken: impl Fn(&str) -> bool,
) -> Result<(String, Scrubbed), KeyError> {
    let id = loop {
        let mut raw = [0u8; KEY_ID_BYTES];
        rng.fill(&mut raw).map_err(|_| KeyError::Random)?;
        let id = hex(&raw);
        if !taken(&id) {
            break id;
        }
    };
    let mut key = Scrubbed::zeroed(KEY_LEN);
    rng.fill(key.as_mut_slice()).map_err(|_| KeyError::Random)?;
    let mut line = Scrubbed::with_capacity(id.len() + 2 + KEY_LEN.div_ceil(3) * 4);
    line.extend(id.as_bytes());
    line.extend(b" ");
    base64_encode(key.as_slice(), &mut line);
    line.extend(b"\n");
    Ok((id, line))
}

/// Writes `text` to a 0600 temp file next to `path`, fsyncs it, and moves
/// it into place: replacing the old file when `replace`, else only when
/// `path` does not exist yet. Returns false when nothing was written
/// because another process created `path` first (only when `!replace`).
fn write_atomically(path: &Path, text: &Scrubbed, replace: bool) -> Result<bool, KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keys".into());
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| KeyError::Random)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", hex(&suffix)));
    let result = write_then_move(&tmp, path, text, replace);
    // After a rename the temp name is gone; after a link or a failure it
    // must not linger with a key in it.
    let _ = fs::remove_file(&tmp);
    let created = result.map_err(write_err)?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| KeyError::Write { path: dir, source })?;
    Ok(created)
}

fn write_then_move(
    tmp: &Path,
    path: &Path,
    text: &Scrubbed,
    replace: bool,
) -> std::io::Result<bool> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)?;
    file.write_all(text.as_slice())?;
    file.sync_all()?;
    drop(file);
    if replace {
        fs::rename(tmp, path)?;
        return Ok(true);
    }
    // A hard link fails when `path` exists: an atomic create-if-absent
    // that never exposes a half-written file.
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn valid_key_id(id: &str) -> bool {
    KEY_ID_HEX_LEN.contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// Base64 is coded here rather than through a crate so that the key text
// never passes through buffers this module cannot scrub, and so that no
// decoder error message can quote a byte of a key.
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8], out: &mut Scrubbed) {
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, s) in sextets.iter().enumerate() {
            let c = if i <= chunk.len() {
                B64[*s as usize]
            } else {
                b'='
            };
            out.extend(&[c]);
        }
    }
}

/// Decodes padded standard base64; `None` when it is not exactly that.
fn base64_decode(text: &str) -> Option<Scrubbed> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Scrubbed::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks(4).enumerate() {
        let last = q + 1 == quads;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = B64.iter().position(|&x| x == c)?;
            n = (n << 6) | v as u32;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        for (plain, coded) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"\xff\xfe\x00", "//4A"),
        ] {
            let mut out = Scrubbed::with_capacity(8);
            base64_encode(plain, &mut out);
            assert_eq!(out.as_slice(), coded.as_bytes());
            if !plain.is_empty() {
                assert_eq!(base64_decode(coded).unwrap().as_slice(), plain);
            }
        }
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9*", "", "Zm9v\n"] {
            assert!(base64_decode(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn key_ids_are_short_lowercase_hex() {
        assert!(valid_key_id("0a1b2c3d"));
        assert!(!valid_key_id("0A1B2C3D"));
        assert!(!valid_key_id("abc"));
        assert!(!valid_key_id("key-one"));
        assert!(!valid_key_id(&"a".repeat(33)));
    }
}
