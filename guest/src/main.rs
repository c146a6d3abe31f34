//! Entry point of `airlock-guest`: works out how it was started and hands
//! over to [`airlock_guest::run`]. As PID 1 it never returns; it powers the
//! VM off instead.

fn main() -> std::process::ExitCode {
    airlock_guest::main_entry()
}
