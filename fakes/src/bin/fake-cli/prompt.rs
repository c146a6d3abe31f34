//! Line input from the terminal for the profiles that prompt (Claude's
//! "Paste code here if prompted > ", Gemini's consent and code prompts).
//! In production stdin is a PTY; in tests it is a pipe.

use std::io::{BufRead, Write};

use tokio::sync::mpsc;

/// Writes `text` to stdout without a newline and flushes, like
/// `rl.question` / `process.stdout.write`.
pub fn show(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Lines of stdin (without the line ending), read on a thread of their
/// own so a flow can wait for a line and a callback at once. The channel
/// closes at end of input.
pub fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}
