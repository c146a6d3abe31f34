//! A VM process and everything it started, read from `/proc`: what
//! [`super::backend::RunningVm::stop`] kills when a process did not stop
//! on its own. Killing only the process would leave its children (for a
//! host-process browser VM: Chromium, the login CLI) running, reparented
//! away where nobody can find them any more. The tree is frozen before it
//! is killed, so that nothing in it forks past the walk.

use std::collections::{BTreeSet, HashMap};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Walks of the tree at most, while processes keep appearing in it.
const MAX_WALKS: usize = 16;

/// The parent of each process now (`/proc/<pid>/stat`).
fn parents() -> HashMap<i32, Vec<i32>> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(ppid) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parent_of)
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    children
}

/// The parent pid in a `stat` line: the second field after the command,
/// which is in parentheses and may itself hold spaces and parentheses.
fn parent_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `root` and its descendants now.
pub fn tree(root: i32) -> BTreeSet<i32> {
    let children = parents();
    let mut found = BTreeSet::from([root]);
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if found.insert(*c) {
                todo.push(*c);
            }
        }
    }
    found
}

/// Freezes `root` and its descendants (SIGSTOP, walking again until no
/// new one appears), then kills them all (SIGKILL). Returns how many.
pub fn kill_tree(root: i32) -> usize {
    let mut frozen = BTreeSet::new();
    for _ in 0..MAX_WALKS {
        let now = tree(root);
        let new: Vec<i32> = now.difference(&frozen).copied().collect();
        if new.is_empty() {
            break;
        }
        for p in new {
            let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
            frozen.insert(p);
        }
    }
    for p in &frozen {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    frozen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_command_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (a b) c)) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn a_tree_is_killed_whole_grandchildren_included() {
        // sh starts a grandchild that would outlive it.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & sleep 300 & wait"])
            .spawn()
            .unwrap();
        let root = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tree(root).len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sleeps did not start"
            );
            std::thread::yield_now();
        }
        let members = tree(root);
        assert_eq!(kill_tree(root), 3);
        child.wait().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for p in members.iter().filter(|p| **p != root) {
            // Reparented and reaped by init once killed.
            while std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{p} outlived the kill"
                );
                std::thread::yield_now();
            }
        }
    }
}
