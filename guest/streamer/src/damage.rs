//! Which captured frames are worth converting and encoding, and when the
//! next grab happens. A login page is still most of the time, and
//! converting and encoding an unchanged 720p screen 30 times a second took
//! about 1.6 of a browser VM's two vCPUs under TCG, beside the Chromium the
//! person is waiting for. The [`Gate`] passes a frame when the X server
//! reported damage since the previous grab or the one before, the pointer
//! moved, or something asked for a frame ([`Wake`]: a keyframe request, a
//! new viewer); otherwise one a second ([`IDLE_INTERVAL`]) so that
//! receivers keep their timing.
//!
//! A dropped frame [`Gate::hold`]s the capture thread until the next
//! damage (or a wake, a pointer move, [`HOLD_MAX`]). `ximagesrc` grabs at
//! the frame rate's tick, but a tick already past when it is called again
//! is grabbed at once: so a change on a still screen is grabbed when the X
//! server reports it, not up to a frame interval later (half of one, 17 ms
//! at 30 fps, on average: a third of the glass-to-glass budget), and a
//! still screen is grabbed a few times a second instead of 30. Installed
//! by [`crate::pipeline`] on the capture's source pad; without the DAMAGE
//! extension every frame passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::damage::{self, ConnectionExt as _, ReportLevel};
use x11rb::protocol::xfixes::ConnectionExt as _;
use x11rb::protocol::xproto::{
    ClientMessageEvent, ConnectionExt as _, CreateWindowAux, EventMask, WindowClass,
};
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;

/// How often a frame of a still screen passes.
pub const IDLE_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a dropped frame holds the capture thread: bounds how long
/// a pipeline state change waits for it.
pub const HOLD_MAX: Duration = Duration::from_millis(250);

/// How often a held capture looks at the pointer (its moves cause no
/// damage: `ximagesrc` draws it into the frame itself).
const POINTER_POLL: Duration = Duration::from_millis(33);

/// What happened since the gate last looked, and a condition variable
/// that wakes a held capture when it does.
#[derive(Debug, Default)]
struct Bell {
    pending: Mutex<Pending>,
    rung: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    damaged: bool,
    woken: bool,
}

impl Bell {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ring(&self, set: impl FnOnce(&mut Pending)) {
        set(&mut self.lock());
        self.rung.notify_all();
    }

    /// Takes both flags: (damaged, woken).
    fn take(&self) -> (bool, bool) {
        let pending = std::mem::take(&mut *self.lock());
        (pending.damaged, pending.woken)
    }

    /// Waits up to `timeout` for either flag, without taking it.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .rung
            .wait_timeout_while(guard, timeout, |p| !(p.damaged || p.woken))
            .unwrap_or_else(PoisonError::into_inner);
        guard.damaged || guard.woken
    }
}

/// Asks the gate to pass the next captured frame; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<Bell>);

impl Wake {
    /// The next captured frame passes whatever the screen did, and a held
    /// capture grabs it now.
    pub fn wake(&self) {
        self.0.ring(|p| p.woken = true);
    }
}

/// What the gate remembers between ticks (only the streaming thread
/// touches it; the mutex makes the gate shareable with the pad probe).
#[derive(Debug, Default)]
struct Tick {
    pointer: Option<(i16, i16)>,
    changed_before: bool,
    last_pass: Option<Instant>,
}

/// The X side: a connection of its own, the root window's damage, and a
/// thread that turns damage notifications into a flag.
#[derive(Debug)]
struct Watch {
    conn: Arc<RustConnection>,
    root: u32,
    /// An unmapped window of ours: an event sent to it wakes the thread.
    doorbell: u32,
    stop: Arc<AtomicBool>,
    /// Cleared when the listening thread ends on its own: no damage can
    /// be seen any more, so every frame passes.
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Decides, per captured frame, whether it goes on.
#[derive(Debug)]
pub struct Gate {
    watch: Option<Watch>,
    /// Shared with the damage thread and every [`Wake`].
    wake: Wake,
    tick: Mutex<Tick>,
}

impl Gate {
    /// Watches `display` for damage. If that is impossible (no DAMAGE
    /// extension), the gate passes every frame and says so once.
    pub fn open(display: &str) -> Self {
        let wake = Wake::default();
        // The first frame passes.
        wake.wake();
        let watch = match Watch::start(display, wake.0.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no X damage tracking: every captured frame is encoded");
                None
            }
        };
        Self {
            watch,
            wake,
            tick: Mutex::default(),
        }
    }

    /// A handle that makes the next frame pass.
    pub fn waker(&self) -> Wake {
        self.wake.clone()
    }

    /// Whether the frame captured just now goes on. A change seen at this
    /// tick also passes the next frame: the damage may have come between
    /// this frame's grab and this check, so only the next grab shows it.
    pub fn pass(&self) -> bool {
        let Some(watch) = self.live_watch() else {
            return true;
        };
        let mut tick = self.tick.lock().unwrap_or_else(PoisonError::into_inner);
        let pointer = watch.pointer();
        let moved = pointer.is_some() && pointer != tick.pointer;
        tick.pointer = pointer;
        let (damaged, woken) = self.wake.0.take();
        let changed = damaged | woken | moved;
        let now = Instant::now();
        let idle = tick
            .last_pass
            .is_none_or(|t| now.duration_since(t) >= IDLE_INTERVAL);
        let pass = changed || tick.changed_before || idle;
        tick.changed_before = changed;
        if pass {
            tick.last_pass = Some(now);
        }
        pass
    }

    /// Called after a frame was dropped: returns when the screen changed,
    /// someone asked for a frame, the pointer moved, or after
    /// [`HOLD_MAX`], so that the next grab shows the change at once.
    pub fn hold(&self) {
        let Some(watch) = self.live_watch() else {
            return;
        };
        let since = self
            .tick
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pointer;
        let deadline = Instant::now() + HOLD_MAX;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wake.0.wait(left.min(POINTER_POLL)) {
                return;
            }
            if watch.pointer() != since || !watch.alive.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// The root window being watched (`None` without damage tracking).
    pub fn root(&self) -> Option<u32> {
        self.watch.as_ref().map(|w| w.root)
    }

    fn live_watch(&self) -> Option<&Watch> {
        self.watch
            .as_ref()
            .filter(|w| w.alive.load(Ordering::Acquire))
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(mut watch) = self.watch.take() {
            watch.stop();
        }
    }
}

type XResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

impl Watch {
    fn start(display: &str, bell: Arc<Bell>) -> XResult<Self> {
        let (conn, screen) = x11rb::connect(Some(display))?;
        let root = conn.setup().roots[screen].root;
        if conn
            .extension_information(damage::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Err("the X server has no DAMAGE extension".into());
        }
        // DAMAGE needs XFixes' version negotiated first (its regions).
        conn.xfixes_query_version(5, 0)?.reply()?;
        conn.damage_query_version(1, 1)?.reply()?;
        let damage = conn.generate_id()?;
        // One notification until the damage is subtracted again.
        conn.damage_create(damage, root, ReportLevel::NON_EMPTY)?
            .check()?;
        let doorbell = conn.generate_id()?;
        conn.create_window(
            0,
            doorbell,
            root,
            0,
            0,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            0,
            &CreateWindowAux::new(),
        )?
        .check()?;
        let conn = Arc::new(conn);
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let thread = std::thread::Builder::new().name("damage".into()).spawn({
            let (conn, stop, alive) = (conn.clone(), stop.clone(), alive.clone());
            move || {
                listen(&conn, damage, &bell, &stop);
                alive.store(false, Ordering::Release);
                // A held capture must not wait for damage that cannot come.
                bell.ring(|_| {});
            }
        })?;
        Ok(Self {
            conn,
            root,
            doorbell,
            stop,
            alive,
            thread: Some(thread),
        })
    }

    /// Where the pointer is (`None` if the server does not answer).
    fn pointer(&self) -> Option<(i16, i16)> {
        let reply = self.conn.query_pointer(self.root).ok()?.reply().ok()?;
        Some((reply.root_x, reply.root_y))
    }

    /// Ends the listening thread: an event sent to our own window (with
    /// no mask, it goes to the window's creator) wakes it to see `stop`.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let bell = ClientMessageEvent::new(32, self.doorbell, x11rb::NONE, [0u32; 5]);
        let rang = self
            .conn
            .send_event(false, self.doorbell, EventMask::NO_EVENT, bell)
            .is_ok()
            && self.conn.flush().is_ok();
        if let Some(thread) = self.thread.take() {
            // Without the bell the thread ends with the connection (the
            // display going away); do not wait for that.
            if rang {
                let _ = thread.join();
            }
        }
    }
}

/// Rings the bell on each notification and re-arms it, until `stop` or
/// the connection ends.
fn listen(conn: &RustConnection, damage: u32, bell: &Bell, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match conn.wait_for_event() {
            Ok(Event::DamageNotify(_)) => {
                bell.ring(|p| p.damaged = true);
                let rearmed = conn
                    .damage_subtract(damage, x11rb::NONE, x11rb::NONE)
                    .is_ok()
                    && conn.flush().is_ok();
                if !rearmed {
                    // Unarmed, no change would be seen again: the gate
                    // passes every frame rather than freeze the view.
                    tracing::warn!("cannot re-arm X damage tracking");
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "X damage connection ended");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_damage_tracking_every_frame_passes() {
        let gate = Gate {
            watch: None,
            wake: Wake::default(),
            tick: Mutex::default(),
        };
        assert!((0..5).all(|_| gate.pass()));
    }

    #[test]
    fn a_wake_is_taken_once() {
        let w = Wake::default();
        w.wake();
        assert_eq!(w.0.take(), (false, true));
        assert_eq!(w.0.take(), (false, false));
    }

    #[test]
    fn a_wait_ends_when_the_bell_rings_and_leaves_the_flag() {
        let bell = Arc::new(Bell::default());
        let ringer = std::thread::spawn({
            let bell = bell.clone();
            move || bell.ring(|p| p.damaged = true)
        });
        let started = Instant::now();
        assert!(bell.wait(Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(bell.take(), (true, false));
        assert!(!bell.wait(Duration::from_millis(1)));
        ringer.join().unwrap();
    }
}
