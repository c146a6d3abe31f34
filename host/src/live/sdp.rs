//! SDP for the HTTP signalling API: its clients do not trickle, so the
//! streamer's trickled candidates are folded into its answer as
//! `a=candidate:` lines in the m-section they belong to, each section
//! closed with `a=end-of-candidates`. Used by [`super::hub`] when a viewer
//! of `POST /api/webrtc/session/:id/offer` asks for its answer.

/// The answer `sdp` with `candidates` (m-line index, `candidate:` line)
/// added to their m-sections, skipping duplicates and lines that are not
/// candidates, and `a=end-of-candidates` closing every m-section.
pub fn fold_candidates(sdp: &str, candidates: &[(u32, String)]) -> String {
    let eol = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out: Vec<String> = Vec::new();
    let mut section: Option<u32> = None;
    let mut start = 0usize;
    for line in sdp.split(eol).filter(|l| !l.is_empty()) {
        if line.starts_with("m=") {
            close_section(&mut out, start, section, candidates);
            section = Some(section.map_or(0, |s| s + 1));
            start = out.len();
        }
        out.push(line.to_string());
    }
    close_section(&mut out, start, section, candidates);
    let mut text = out.join(eol);
    text.push_str(eol);
    text
}

/// Appends the candidates of m-section `index` (whose lines start at
/// `start` in `out`) and the end-of-candidates marker.
fn close_section(out: &mut Vec<String>, start: usize, index: Option<u32>, all: &[(u32, String)]) {
    let Some(index) = index else {
        return;
    };
    for (_, candidate) in all.iter().filter(|(i, _)| *i == index) {
        let Some(line) = attribute(candidate) else {
            continue;
        };
        if !out[start..].contains(&line) {
            out.push(line);
        }
    }
    if !out[start..].iter().any(|l| l == "a=end-of-candidates") {
        out.push("a=end-of-candidates".into());
    }
}

/// `a=candidate:...` for a trickled candidate, or `None` for anything that
/// is not one (an empty end-of-candidates marker, stray text).
fn attribute(candidate: &str) -> Option<String> {
    let c = candidate.trim();
    let c = c.strip_prefix("a=").unwrap_or(c);
    (c.starts_with("candidate:") && !c.contains(['\r', '\n'])).then(|| format!("a={c}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str =
        "v=0\r\no=- 1 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE video0 application1\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:video0\r\na=sendonly\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:application1\r\n";

    #[test]
    fn candidates_land_in_their_m_section_and_every_section_ends() {
        let cands = vec![
            (
                0,
                "candidate:1 1 UDP 2015363327 127.0.0.1 40000 typ host".to_string(),
            ),
            (
                1,
                "a=candidate:2 1 UDP 2015363327 127.0.0.1 40002 typ host".to_string(),
            ),
            (
                0,
                "candidate:1 1 UDP 2015363327 127.0.0.1 40000 typ host".to_string(),
            ),
            (0, String::new()),
            (7, "candidate:9 1 UDP 1 127.0.0.1 1 typ host".to_string()),
        ];
        let sdp = fold_candidates(ANSWER, &cands);
        let lines: Vec<&str> = sdp.split("\r\n").collect();
        let video = lines.iter().position(|l| l.starts_with("m=video")).unwrap();
        let app = lines
            .iter()
            .position(|l| l.starts_with("m=application"))
            .unwrap();
        let c0 = lines.iter().position(|l| l.contains("40000")).unwrap();
        let c1 = lines.iter().position(|l| l.contains("40002")).unwrap();
        assert!(video < c0 && c0 < app, "{sdp}");
        assert!(app < c1, "{sdp}");
        assert_eq!(lines[c0 + 1], "a=end-of-candidates");
        assert_eq!(lines[c1 + 1], "a=end-of-candidates");
        assert_eq!(sdp.matches("40000").count(), 1, "no duplicates");
        assert!(
            !sdp.contains("typ host\r\na=candidate:9"),
            "unknown m-line ignored"
        );
        assert!(sdp.ends_with("a=end-of-candidates\r\n"));
        assert!(lines[..video].iter().all(|l| !l.starts_with("a=candidate")));
    }

    #[test]
    fn bare_newlines_are_kept_and_a_folded_answer_is_stable() {
        let sdp = ANSWER.replace("\r\n", "\n");
        let once = fold_candidates(
            &sdp,
            &[(0, "candidate:1 1 UDP 1 10.0.0.1 5 typ host".into())],
        );
        assert!(!once.contains('\r'));
        assert_eq!(
            fold_candidates(
                &once,
                &[(0, "candidate:1 1 UDP 1 10.0.0.1 5 typ host".into())]
            ),
            once
        );
    }
}
