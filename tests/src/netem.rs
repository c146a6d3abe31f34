//! A userspace netem between two network namespaces, for kernels without
//! `sch_netem` (this project's CI kernel has HTB and TBF, no netem): a TUN
//! device in each namespace, and this process moving IP packets between
//! them with random loss, a fixed delay each way and a rate cap with a
//! bounded queue (tail drop) in one direction. `netns::Link` sets it up;
//! the counters give what each side offered, what was delivered and what
//! was dropped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;

/// Packets that may wait in front of the cap before the queue drops
/// them: netem's default `limit`, so that the link behaves as
/// `tc qdisc ... netem loss 2% delay 40ms rate 2mbit` would.
const QUEUE_PACKETS: usize = 1000;
/// How often the readers look at the stop flag.
const POLL_MS: i32 = 100;

/// Bytes and packets one direction saw.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes the sending side offered (before loss and the cap).
    pub offered_bytes: AtomicU64,
    /// Bytes handed to the receiving side.
    pub delivered_bytes: AtomicU64,
    /// Packets dropped at random.
    pub lost: AtomicU64,
    /// Packets dropped because the queue in front of the cap was full.
    pub overflowed: AtomicU64,
}

/// One direction's settings; loss may change while it runs.
#[derive(Debug)]
struct Direction {
    /// Loss in millionths.
    loss_ppm: AtomicU32,
    delay: Duration,
    rate_bps: Option<u64>,
    counters: Arc<Counters>,
}

/// The running shaper: two readers, two writers; stopped on drop.
#[derive(Debug)]
pub struct Shaper {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    down: Arc<Direction>,
    up: Arc<Direction>,
}

impl Shaper {
    /// Moves packets from `a` to `b` (capped at `rate_kbit`) and back,
    /// each way with `loss_pct` and `delay`.
    pub fn start(a: OwnedFd, b: OwnedFd, loss_pct: f64, delay: Duration, rate_kbit: u32) -> Self {
        let (a, b) = (Arc::new(a), Arc::new(b));
        let stop = Arc::new(AtomicBool::new(false));
        let loss = AtomicU32::new((loss_pct * 10_000.0) as u32);
        let down = Arc::new(Direction {
            loss_ppm: AtomicU32::new(loss.load(Ordering::Relaxed)),
            delay,
            rate_bps: Some(u64::from(rate_kbit) * 1000),
            counters: Arc::default(),
        });
        let up = Arc::new(Direction {
            loss_ppm: loss,
            delay,
            rate_bps: None,
            counters: Arc::default(),
        });
        let mut threads = Vec::new();
        for (from, to, dir) in [(&a, &b, &down), (&b, &a, &up)] {
            let (tx, rx) = mpsc::channel();
            let (from, reader, s) = (from.clone(), dir.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                read_loop(&from, &reader, &s, &tx)
            }));
            let (to, writer) = (to.clone(), dir.clone());
            threads.push(std::thread::spawn(move || write_loop(&to, &writer, &rx)));
        }
        Self {
            stop,
            threads,
            down,
            up,
        }
    }

    /// A to B (airlockd to the viewer).
    pub fn down(&self) -> &Counters {
        &self.down.counters
    }

    /// B to A.
    pub fn up(&self) -> &Counters {
        &self.up.counters
    }

    /// Sets the loss both ways (100: the link is gone).
    pub fn set_loss(&self, loss_pct: f64) {
        let ppm = (loss_pct * 10_000.0) as u32;
        self.down.loss_ppm.store(ppm, Ordering::Relaxed);
        self.up.loss_ppm.store(ppm, Ordering::Relaxed);
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads packets, drops some at random and some at a full queue, and
/// hands the rest to the writer with the instant they are due.
fn read_loop(
    fd: &OwnedFd,
    dir: &Direction,
    stop: &AtomicBool,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut rng = Rng::seeded();
    let mut free_at = Instant::now();
    // Departure times of the packets waiting for the cap.
    let mut queued = std::collections::VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Some(n) = read_packet(fd, &mut buf) else {
            continue;
        };
        let c = &dir.counters;
        c.offered_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if rng.below_ppm(dir.loss_ppm.load(Ordering::Relaxed)) {
            c.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        let departs = match dir.rate_bps {
            Some(bps) => {
                while queued.front().is_some_and(|t| *t <= now) {
                    queued.pop_front();
                }
                if queued.len() >= QUEUE_PACKETS {
                    c.overflowed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                free_at =
                    free_at.max(now) + Duration::from_nanos(n as u64 * 8 * 1_000_000_000 / bps);
                queued.push_back(free_at);
                free_at
            }
            None => now,
        };
        if tx.send((departs + dir.delay, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Writes each packet when it is due; ends when its reader does.
fn write_loop(fd: &OwnedFd, dir: &Direction, rx: &mpsc::Receiver<(Instant, Vec<u8>)>) {
    for (due, packet) in rx {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        // SAFETY: a valid descriptor and a buffer of the given length.
        let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n > 0 {
            dir.counters
                .delivered_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// One packet, or `None` after `POLL_MS` without one.
fn read_packet(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, POLL_MS) } <= 0 {
        return None;
    }
    // SAFETY: a valid descriptor and a buffer of the given length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then_some(n as usize)
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a TUN device `name` (IP packets, no extra header) in the calling
/// thread's network namespace; it lives as long as the descriptor.
pub fn open_tun(name: &str) -> std::io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: a NUL-terminated path.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    req.name[..bytes.len().min(libc::IFNAMSIZ - 1)]
        .copy_from_slice(&bytes[..bytes.len().min(libc::IFNAMSIZ - 1)]);
    // SAFETY: TUNSETIFF reads a `struct ifreq`, which `req` is laid out as.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// xorshift64*: enough randomness for dropping packets.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self(t | 1)
    }

    fn below_ppm(&mut self, ppm: u32) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r % 1_000_000) < u64::from(ppm)
    }
}
