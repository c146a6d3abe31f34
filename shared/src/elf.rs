//! Reads the GNU build id (`NT_GNU_BUILD_ID` note) out of an ELF64 image.
//!
//! The linker hashes the agent's output into this note, so it differs for
//! every build whose bytes differ. The agent reads it from its own
//! executable to fill [`crate::Hello::build_id`]; the host reads it from the
//! agent binary it expects, and refuses a VM whose agent reports another.

/// Why no build id could be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not a little-endian ELF64 file, or the headers are cut short.
    #[error("not a little-endian ELF64 file or truncated headers")]
    NotElf64,
    /// A program header or note points outside the bytes given.
    #[error("ELF program header or note points outside the file")]
    OutOfBounds,
    /// The file has no `NT_GNU_BUILD_ID` note (linked without `--build-id`).
    #[error("no GNU build id note (link with -Wl,--build-id)")]
    Missing,
}

const PT_NOTE: u32 = 4;
const NT_GNU_BUILD_ID: u32 = 3;

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    let s = b.get(off..off + 2).ok_or(ElfError::OutOfBounds)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    let s = b.get(off..off + 4).ok_or(ElfError::OutOfBounds)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Result<usize, ElfError> {
    let s = b.get(off..off + 8).ok_or(ElfError::OutOfBounds)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    usize::try_from(u64::from_le_bytes(a)).map_err(|_| ElfError::OutOfBounds)
}

/// Returns the build id as lowercase hex.
///
/// `image` may be a prefix of the file; the note of a normally linked
/// binary lies within its first few kilobytes.
pub fn gnu_build_id(image: &[u8]) -> Result<String, ElfError> {
    // e_ident: magic, ELFCLASS64 (2), ELFDATA2LSB (1).
    if image.len() < 64 || &image[..4] != b"\x7fELF" || image[4] != 2 || image[5] != 1 {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64_at(image, 0x20)?;
    let phentsize = u16_at(image, 0x36)? as usize;
    let phnum = u16_at(image, 0x38)? as usize;
    if phentsize < 56 {
        return Err(ElfError::NotElf64);
    }
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or(ElfError::OutOfBounds)?)
            .ok_or(ElfError::OutOfBounds)?;
        if u32_at(image, ph)? != PT_NOTE {
            continue;
        }
        let off = u64_at(image, ph + 8)?;
        let size = u64_at(image, ph + 32)?;
        let end = off.checked_add(size).ok_or(ElfError::OutOfBounds)?;
        let notes = image.get(off..end).ok_or(ElfError::OutOfBounds)?;
        if let Some(id) = find_build_id(notes)? {
            return Ok(id);
        }
    }
    Err(ElfError::Missing)
}

fn find_build_id(mut notes: &[u8]) -> Result<Option<String>, ElfError> {
    let pad4 = |n: usize| {
        n.checked_add(3)
            .map(|v| v & !3)
            .ok_or(ElfError::OutOfBounds)
    };
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0)? as usize;
        let descsz = u32_at(notes, 4)? as usize;
        let kind = u32_at(notes, 8)?;
        let name_end = 12usize
            .checked_add(pad4(namesz)?)
            .ok_or(ElfError::OutOfBounds)?;
        let desc_end = name_end
            .checked_add(pad4(descsz)?)
            .ok_or(ElfError::OutOfBounds)?;
        let name = notes.get(12..12 + namesz).ok_or(ElfError::OutOfBounds)?;
        let desc = notes
            .get(name_end..name_end + descsz)
            .ok_or(ElfError::OutOfBounds)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" && !desc.is_empty() {
            return Ok(Some(desc.iter().map(|b| format!("{b:02x}")).collect()));
        }
        notes = notes.get(desc_end..).unwrap_or(&[]);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE holding a GNU build id.
    fn tiny_elf(id: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&(id.len() as u32).to_le_bytes());
        note.extend_from_slice(&NT_GNU_BUILD_ID.to_le_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(id);
        let off = f.len() as u64;
        f[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        f[64 + 8..64 + 16].copy_from_slice(&off.to_le_bytes());
        f[64 + 32..64 + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        f.extend_from_slice(&note);
        f
    }

    #[test]
    fn reads_build_id() {
        let elf = tiny_elf(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(gnu_build_id(&elf).unwrap(), "deadbeef");
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert_eq!(gnu_build_id(b"hello"), Err(ElfError::NotElf64));
        let elf = tiny_elf(&[1, 2, 3, 4]);
        assert_eq!(
            gnu_build_id(&elf[..elf.len() - 2]),
            Err(ElfError::OutOfBounds)
        );
    }
}
