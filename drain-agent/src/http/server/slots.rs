//! The connection slots under the cap: which connections are open, oldest first, which are
//! idle (evictable) and the eviction of the oldest idle one (see the module documentation of
//! `http::server`).

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    os::fd::{BorrowedFd, RawFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    task::{AbortHandle, JoinSet},
    time::Instant,
};

/// The open connections, oldest first, and whether each has a request in a handler.
#[derive(Default)]
pub(super) struct Slots {
    open: Mutex<SlotMap>,
    /// Notified when a connection ends.
    pub(super) freed: tokio::sync::Notify,
}

#[derive(Default)]
struct SlotMap {
    next_id: u64,
    slots: BTreeMap<u64, Slot>,
}

struct Slot {
    activity: Arc<Activity>,
    opened: Instant,
    /// The connection's socket (see [`unread_bytes`]).
    socket: RawFd,
    abort: AbortHandle,
    /// Where it was let in; a connection that takes its place takes this too.
    place: Place,
}

/// Where a connection was let in (see the module documentation of `http::server`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// Under the cap: served as usual.
    UnderCap,
    /// In the overflow reserve (or, at a stop, past it): only `/healthz` and a source's
    /// first `/drained` are served there.
    BeyondCap,
}

/// A connection that has sent no request within this long after it was accepted is idle,
/// whatever it sent: a client trickling its request head, or holding a socket silent.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// A connection accepted this recently is not idle even with nothing received yet: a
/// client writes its request right after it connects, and the agent may accept it first.
pub(super) const CONNECT_GRACE: Duration = Duration::from_millis(250);

/// What a connection is doing, for the cap.
pub(super) struct Activity {
    /// Requests in a handler now.
    in_flight: AtomicUsize,
    /// Requests started so far.
    requests: AtomicUsize,
    /// Whether writing to the client is blocked: it does not take its answers as fast as
    /// they come ([`WriteTimeout::blocked`](super::WriteTimeout::blocked)).
    write_blocked: Arc<AtomicBool>,
}

impl Activity {
    /// A connection's activity; `write_blocked` is its writer's
    /// [`WriteTimeout::blocked`](super::WriteTimeout::blocked).
    pub(super) fn new(write_blocked: Arc<AtomicBool>) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            write_blocked,
        }
    }
}

/// Whether a connection may be closed to make room for a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Idleness {
    /// A request in a handler, or the first one on its way: never closed.
    Busy,
    /// Nothing received and not read yet, nothing being written: closed first.
    Quiet,
    /// Kept alive with bytes received and not read yet, or an answer being written that
    /// the client does not take: closed when no connection is [`Idleness::Quiet`].
    Active,
}

impl Slot {
    /// Idle, evictable: no request in a handler, and not its first request on its way —
    /// nothing received and not read yet, and not accepted within [`CONNECT_GRACE`]; or no
    /// request at all within [`FIRST_REQUEST_GRACE`]. A burst of hooks at the cap must not
    /// evict its own members before their requests are read (600 at once lost 87 that way,
    /// each an early EOF or a reset: `tests/overload.rs`); sockets held silent are evicted
    /// at once.
    ///
    /// A connection that has been answered before is idle whatever it sent since, while no
    /// request of it is in a handler: what it sent may be requests it pipelined that hyper
    /// does not read while it writes an answer (nothing is read then while hyper's buffer
    /// holds a request), and a client reading its answers slowly — a segment every few
    /// seconds, progress for the write timeout — held every slot that way, and new
    /// connections waited in the listen backlog. Its answer in progress (computed already)
    /// is cut short; a kept-alive client whose next request was not read yet sees the
    /// connection closed, the usual race of keep-alive that HTTP clients retry. Such a
    /// connection goes after the [`Idleness::Quiet`] ones.
    fn idleness(&self) -> Idleness {
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            return Idleness::Busy;
        }
        let age = self.opened.elapsed();
        let asked = self.activity.requests.load(Ordering::Acquire) > 0;
        if !asked && age >= FIRST_REQUEST_GRACE {
            return Idleness::Quiet;
        }
        if !asked && age < CONNECT_GRACE {
            return Idleness::Busy;
        }
        let unread = unread_bytes(self.socket) > 0;
        if !asked {
            return if unread {
                Idleness::Busy
            } else {
                Idleness::Quiet
            };
        }
        if unread || self.activity.write_blocked.load(Ordering::Acquire) {
            Idleness::Active
        } else {
            Idleness::Quiet
        }
    }

    fn idle(&self) -> bool {
        self.idleness() != Idleness::Busy
    }
}

/// Bytes received on the socket `fd` and not read yet (`FIONREAD`, i.e. `SIOCINQ` for
/// TCP). A descriptor closed meanwhile (its connection ended; its slot goes next) reads
/// as nothing pending, and a number reused by a newer socket only makes this look busy:
/// both at worst keep a connection that is about to go anyway. Not through a shared
/// `Arc<TcpStream>` read with `try_read`: a read beside hyper's takes what hyper must see.
fn unread_bytes(fd: RawFd) -> usize {
    on_socket(fd, |fd| rustix::io::ioctl_fionread(fd))
        .ok()
        .and_then(|pending| usize::try_from(pending).ok())
        .unwrap_or(0)
}

/// How often a connection with a request in a handler is looked at for a reset.
const RESET_LOOK: Duration = Duration::from_millis(250);

/// Resolves when the client of the connection whose socket is `fd` resets it (`SO_ERROR`
/// set: a reset received, `SO_LINGER` 0 or a close with data unread, or the connection
/// timed out), with that error. For a request in a handler only: `fd` must stay open while
/// this runs, as hyper's stream does while it polls its service's future.
///
/// hyper reads nothing while a request is in a handler (`half_close`): a client's FIN is
/// not a hang-up (busybox `nc` in a preStop hook half-closes after its request, and waits
/// for the answer), and a reset is seen here instead of by a read. A client that closes
/// without a reset sends a FIN like one that half-closes: it is answered at the end (the
/// write then fails) like any other.
pub(super) async fn reset_by_client(fd: RawFd) -> io::Error {
    loop {
        tokio::time::sleep(RESET_LOOK).await;
        match on_socket(fd, |fd| rustix::net::sockopt::socket_error(fd)) {
            Ok(Ok(())) => {}
            Ok(Err(problem)) | Err(problem) => return problem.into(),
        }
    }
}

/// `op` on the connection socket whose number is `fd`, borrowed for that call. A number
/// closed meanwhile fails with EBADF (see [`unread_bytes`] and [`reset_by_client`]).
fn on_socket<R>(fd: RawFd, op: impl FnOnce(BorrowedFd<'_>) -> R) -> R {
    // SAFETY: the number is only borrowed for this one call, which reads nothing through it
    // but the descriptor; a closed number fails with EBADF.
    op(unsafe { BorrowedFd::borrow_raw(fd) })
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotMap> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn open(&self) -> usize {
        self.lock().slots.len()
    }

    /// Resolves once no connection has its first request on its way (each has one read, or
    /// is idle by [`Slot::idle`]), which is at most [`FIRST_REQUEST_GRACE`] after the last
    /// accept.
    pub(super) async fn settle(&self) {
        loop {
            let waiting =
                self.lock().slots.values().any(|slot| {
                    slot.activity.requests.load(Ordering::Acquire) == 0 && !slot.idle()
                });
            if !waiting {
                return;
            }
            tokio::select! {
                () = self.freed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    /// Whether a connection could be taken in under `limit` (now, or by evicting an idle one).
    pub(super) fn has_room(&self, limit: usize) -> bool {
        let map = self.lock();
        map.slots.len() < limit || map.slots.values().any(Slot::idle)
    }

    /// A place for one more connection, `cap` under the cap and `reserve` beyond it, closing
    /// the oldest idle one if that is needed; `None` while there is none.
    ///
    /// Under the cap first: a free place there, else the place of an idle connection (the
    /// oldest [`Idleness::Quiet`] one, else the oldest [`Idleness::Active`] one; one under the
    /// cap before one in the reserve of the same idleness). The newcomer takes the place the
    /// evicted one held: when every connection under the cap is busy, the place of an idle
    /// one in the reserve is beyond the cap. (It counted as under the cap, whatever it
    /// replaced: a pod kept a connection idle in the reserve, opened another that took its
    /// place, and had every `/drained` of it let in; repeated, it filled the reserve.) Then
    /// a free place in the reserve.
    pub(super) fn admit(&self, cap: usize, reserve: usize) -> Option<Place> {
        let victim = {
            let mut map = self.lock();
            let open = map.slots.len();
            if open < cap {
                return Some(Place::UnderCap);
            }
            let under = map
                .slots
                .values()
                .filter(|slot| slot.place == Place::UnderCap)
                .count();
            // Evicting one in the reserve leaves the newcomer there while the cap is taken.
            let cap_taken = under >= cap;
            let mut quiet = None;
            let mut active = None;
            for (id, slot) in &map.slots {
                let candidate = match slot.idleness() {
                    Idleness::Quiet => &mut quiet,
                    Idleness::Active => &mut active,
                    Idleness::Busy => continue,
                };
                match candidate {
                    None => *candidate = Some((*id, slot.place)),
                    Some((_, Place::BeyondCap)) if cap_taken && slot.place == Place::UnderCap => {
                        *candidate = Some((*id, slot.place));
                    }
                    Some(_) => {}
                }
                if cap_taken && matches!(quiet, Some((_, Place::UnderCap))) {
                    break;
                }
                if !cap_taken && quiet.is_some() {
                    break;
                }
            }
            match quiet.or(active) {
                Some((id, place)) => {
                    let left_under = under - usize::from(place == Place::UnderCap);
                    let place = if left_under < cap {
                        Place::UnderCap
                    } else {
                        Place::BeyondCap
                    };
                    map.slots.remove(&id).map(|victim| (victim, place))
                }
                None if open < cap + reserve => {
                    return Some(if cap_taken {
                        Place::BeyondCap
                    } else {
                        Place::UnderCap
                    });
                }
                None => return None,
            }
        };
        victim.map(|(victim, place)| {
            // Dropping the connection's future closes its socket.
            victim.abort.abort();
            place
        })
    }

    /// Runs a connection task that holds a slot until it ends (or is aborted).
    pub(super) fn open_slot(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        activity: Arc<Activity>,
        socket: RawFd,
        place: Place,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        // Held while spawning, so the task's guard cannot remove the slot before it exists.
        let mut map = self.lock();
        let id = map.next_id;
        map.next_id += 1;
        let guard = SlotGuard {
            slots: Arc::clone(self),
            id,
        };
        let abort = tasks.spawn(async move {
            let _guard = guard;
            work.await;
        });
        map.slots.insert(
            id,
            Slot {
                activity,
                opened: Instant::now(),
                socket,
                abort,
                place,
            },
        );
    }
}

/// Frees a connection's slot when its task ends or is aborted.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().slots.remove(&self.id);
        self.slots.freed.notify_waiters();
    }
}

/// Marks a connection busy (not evictable) while one of its requests is in a handler.
pub(super) struct Busy(Arc<Activity>);

impl Busy {
    pub(super) fn new(activity: Arc<Activity>) -> Self {
        activity.requests.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
