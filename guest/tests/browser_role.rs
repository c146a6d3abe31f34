//! The browser role against the real parts: Xvfb, headful Chromium over
//! DevTools, XTest input and GetImage screenshots. One test function,
//! because the agent's reaper waits on every child of the process and two
//! reapers in one test binary would steal each other's children.
//!
//! Needs `Xvfb` and `chromium` (installed by `make test`'s setup).

use std::time::Duration;

use airlock_guest::browser::BrowserRole;
use airlock_guest::process::Reaper;
use airlock_proto::{BrowserEvent, BrowserSpec, Event, InputBatch, InputEvent, SecretText};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PAGE: &str = "data:text/html,<title>t</title><input id=f autofocus><p id=code>abc%23xyz</p>";

async fn next_browser_event(rx: &mut mpsc::Receiver<Event>) -> BrowserEvent {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Event::Browser(e))) => return e,
            Ok(Some(_)) => continue,
            other => panic!("no browser event: {other:?}"),
        }
    }
}

/// Awaits `fut`, failing the test with `what` if it takes over 30 s.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within 30 s"),
    }
}

/// The field's value once it is `chars` long: XTest input returns when the
/// X server has the events, and Chromium applies them a moment later, so
/// this waits for the page's `input` events (the test's deadline bounds it).
async fn field_value(role: &BrowserRole, chars: usize) -> String {
    let cdp = role.cdp(Duration::from_secs(30)).await.expect("cdp");
    let script = format!(
        "new Promise(r => {{ const f = document.getElementById('f'); \
         const check = () => {{ if (f.value.length >= {chars}) r(f.value); }}; \
         check(); f.addEventListener('input', check); }})"
    );
    let value = within("the typed text in the field", cdp.evaluate(&script))
        .await
        .expect("evaluate");
    value.as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn display_browser_input_screenshot_and_restart() {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(64);
    let reaper = Reaper::start(&tracker, stop.clone(), tx.clone()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let role = BrowserRole::new(reaper, tx, state.path().to_path_buf(), None, None);
    let spec = BrowserSpec {
        width: 1024,
        height: 768,
        max_width: 0,
        max_height: 0,
        proxy: None,
        chromium: None,
        extra_args: vec![],
        extra_ca_pem: None,
    };

    let info = within("starting the browser", role.start(spec))
        .await
        .expect("browser starts");
    assert!(info.display.starts_with(':'), "{info:?}");
    assert!(info.chromium_version.contains("Chrome/"), "{info:?}");
    assert!(matches!(
        next_browser_event(&mut rx).await,
        BrowserEvent::DisplayUp { .. }
    ));
    assert!(matches!(
        next_browser_event(&mut rx).await,
        BrowserEvent::BrowserUp
    ));

    // The paste-code read: text of an element, as soon as it exists.
    within("opening the page", role.open(PAGE))
        .await
        .expect("open");
    let cdp = role.cdp(Duration::from_secs(5)).await.unwrap();
    let cancel = CancellationToken::new();
    assert_eq!(
        within("the code element", cdp.wait_for_text("#code", &cancel))
            .await
            .as_deref(),
        Some("abc#xyz")
    );

    // Typing through XTest reaches the focused field of the page (once
    // Chromium has applied autofocus, as the login flow waits for too).
    cdp.settle().await;
    let text = InputEvent::Text {
        text: SecretText("Hello, X!".into()),
    };
    within("typing", role.input(InputBatch { events: vec![text] }))
        .await
        .expect("input");
    assert_eq!(field_value(&role, 9).await, "Hello, X!");

    let shot = within("a screenshot", role.screenshot())
        .await
        .expect("screenshot");
    assert_eq!((shot.width, shot.height), (1024, 768));
    let decoder = png::Decoder::new(std::io::Cursor::new(shot.png.expose().to_vec()));
    let reader = decoder.read_info().expect("a valid PNG");
    assert_eq!((reader.info().width, reader.info().height), (1024, 768));

    // Chromium crashes: it is reported, restarted, and the page comes back.
    let pid = chromium_pid(state.path());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        matches!(next_browser_event(&mut rx).await, BrowserEvent::Crashed { ref process, .. } if process == "chromium")
    );
    assert!(matches!(
        next_browser_event(&mut rx).await,
        BrowserEvent::BrowserUp
    ));
    let cdp = role.cdp(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        within("the reopened page", cdp.wait_for_text("#code", &cancel))
            .await
            .as_deref(),
        Some("abc#xyz"),
        "last page reopened"
    );

    within("stopping the browser", role.stop()).await;
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// The pid of the Chromium browser process using this profile.
fn chromium_pid(state: &std::path::Path) -> i32 {
    let needle = format!(
        "--user-data-dir={}",
        state.join("chromium-profile").display()
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains(&needle) && !cmd.contains("--type=") {
            return pid;
        }
    }
    panic!("no chromium process found");
}
