//! A session's history: the steps its view lists, bounded whatever the
//! browser VM sends. Many steps carry what the guest reported (pages
//! loaded, crashes, the CLI's exit), and a hostile page or agent can
//! report endlessly; the view is re-sent to every watcher on each change,
//! so its size must not grow with the guest's chatter. A step that repeats
//! the previous one counts up instead of adding a line; beyond a cap the
//! oldest steps after the first few are dropped and counted; each detail
//! is cut to a bounded length on a character boundary. Used by
//! [`super::Inner::record`].

use serde::{Deserialize, Serialize};

use super::SessionState;

/// Most steps a session's view holds.
pub const MAX_STEPS: usize = 128;
/// Steps kept from the start when the cap drops older ones: how the
/// session began (its VM, Chromium, the login's start) stays visible.
const KEPT_FROM_START: usize = 16;
/// Longest detail, in bytes.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// One entry of a session's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// When (RFC 3339); of its last repetition when it repeated.
    pub at: String,
    /// The state after it.
    pub state: SessionState,
    /// What happened (`state`, `urlOpened`, `codeEntered`, `browserCrashed`, ...).
    pub event: String,
    /// Details for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How many times it happened again right after.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeated: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Appends `step` to `steps`; `omitted` counts the steps dropped so far.
pub fn push(steps: &mut Vec<Step>, omitted: &mut u64, mut step: Step) {
    if let Some(detail) = step.detail.take() {
        step.detail = Some(bounded(detail, MAX_DETAIL_BYTES));
    }
    if let Some(last) = steps.last_mut() {
        if last.event == step.event && last.state == step.state && last.detail == step.detail {
            last.repeated = last.repeated.saturating_add(1);
            last.at = step.at;
            return;
        }
    }
    if steps.len() >= MAX_STEPS {
        steps.remove(KEPT_FROM_START);
        *omitted = omitted.saturating_add(1);
    }
    steps.push(step);
}

/// `text` cut to at most `max` bytes on a character boundary, marked with
/// an ellipsis when cut.
pub fn bounded(text: String, max: usize) -> String {
    const MARK: &str = "…";
    if text.len() <= max {
        return text;
    }
    let mut text = airlock_proto::limits::cut(text, max.saturating_sub(MARK.len()));
    text.push_str(MARK);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(event: &str, detail: Option<&str>) -> Step {
        Step {
            at: "t".into(),
            state: SessionState::AwaitingUser,
            event: event.into(),
            detail: detail.map(Into::into),
            repeated: 0,
        }
    }

    #[test]
    fn a_repeated_step_counts_up_instead_of_adding_a_line() {
        let (mut steps, mut omitted) = (Vec::new(), 0);
        for _ in 0..1000 {
            push(
                &mut steps,
                &mut omitted,
                step("pageLoaded", Some("https://a/")),
            );
        }
        push(
            &mut steps,
            &mut omitted,
            step("pageLoaded", Some("https://b/")),
        );
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].repeated, 999);
        assert_eq!(steps[1].repeated, 0);
        assert_eq!(omitted, 0);
    }

    #[test]
    fn beyond_the_cap_the_start_stays_and_the_middle_is_counted() {
        let (mut steps, mut omitted) = (Vec::new(), 0);
        for i in 0..10_000 {
            push(
                &mut steps,
                &mut omitted,
                step("pageLoaded", Some(&i.to_string())),
            );
        }
        assert_eq!(steps.len(), MAX_STEPS);
        assert_eq!(omitted, 10_000 - MAX_STEPS as u64);
        assert_eq!(steps[0].detail.as_deref(), Some("0"));
        assert_eq!(steps[KEPT_FROM_START - 1].detail.as_deref(), Some("15"));
        assert_eq!(steps.last().unwrap().detail.as_deref(), Some("9999"));
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        let long = "日".repeat(1000);
        let (mut steps, mut omitted) = (Vec::new(), 0);
        push(&mut steps, &mut omitted, step("pageLoaded", Some(&long)));
        let kept = steps[0].detail.as_deref().unwrap();
        assert!(kept.len() <= MAX_DETAIL_BYTES, "{}", kept.len());
        assert!(kept.ends_with('…'));
        assert!(kept.trim_end_matches('…').chars().all(|c| c == '日'));
        assert_eq!(bounded("short".into(), 10), "short");
    }
}
