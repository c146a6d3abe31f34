//! Size limits both sides agree on.
//!
//! The guest is untrusted, so the host bounds everything it reads from one;
//! the agent applies the same bounds to what it is asked to produce so that
//! a well-behaved reply always fits in a frame.

/// Largest frame payload either side accepts by default (4 MiB).
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// Hard ceiling on any configured frame limit (16 MiB).
pub const MAX_FRAME_BYTES_CEILING: usize = 16 << 20;

/// Default cap on each of stdout and stderr returned by `exec` (1 MiB).
pub const DEFAULT_EXEC_OUTPUT_BYTES: u32 = 1 << 20;

/// Largest stdout/stderr cap a request may ask for (1 MiB each, so that
/// both, base64-encoded, fit in one default frame).
pub const MAX_EXEC_OUTPUT_BYTES: u32 = 1 << 20;

/// Largest file `write_file` accepts and `read_file` returns (2 MiB).
pub const MAX_FILE_BYTES: u32 = 2 << 20;

/// Most arguments in an `exec` argv.
pub const MAX_ARGV: usize = 1024;

/// Most environment variables in an `exec` request.
pub const MAX_ENV: usize = 256;

/// Longest single argument, environment entry or path (bytes).
pub const MAX_ARG_BYTES: usize = 64 << 10;

/// Longest path accepted in a file request (bytes).
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest forwarded log message (bytes); longer ones are cut by the agent
/// and rejected by the host.
pub const MAX_LOG_MESSAGE_BYTES: usize = 4096;

/// Longest short identifier-like string (versions, ids, targets).
pub const MAX_SHORT_STRING: usize = 128;

/// Most capabilities an agent may announce.
pub const MAX_CAPABILITIES: usize = 64;

/// Longest description of a vendor's OAuth error, in bytes.
pub const MAX_DENIAL_DESCRIPTION: usize = 1024;

/// Longest tail of a login CLI's output, in bytes.
pub const MAX_CLI_OUTPUT_TAIL: usize = 8192;

/// Longest reason a login failed, in bytes.
pub const MAX_FAILURE_REASON: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary: how a sender
/// keeps text within these limits (which count bytes, not characters).
pub fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_whole_characters() {
        let s = cut("aé".repeat(10), 4);
        assert_eq!(s, "aéa");
        assert_eq!(cut("short".into(), 10), "short");
    }
}
