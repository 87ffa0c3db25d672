//! Event delivery: each session's live fan-out (a broadcast "hub") and [`EventStream`], which
//! replays persisted events and then follows live ones with no gap and no duplicate at the seam.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::protocol::{Event, EventPayload};
use crate::session::SessionStatus;
use crate::storage::Storage;

const HUB_CAPACITY: usize = 128;
const REPLAY_PAGE: usize = 512;

/// How often a follower re-reads the store when nothing woke it: the bound on the delay of an
/// event committed by another process whose notice was lost (or that has no notices at all).
const POLL: Duration = Duration::from_millis(500);

/// A turn running in this process.
#[derive(Debug, Clone)]
pub(crate) struct RunningTurn {
    pub cancel: CancellationToken,
    /// Asks the turn to stop at its next step boundary and hand itself over (a drain).
    pub handover: CancellationToken,
    pub finished: Arc<tokio::sync::Notify>,
}

#[derive(Debug)]
struct Hub {
    /// Events shared, not copied, into the buffer: a hub preallocates [`HUB_CAPACITY`] slots,
    /// each the size of its item, for as long as anyone follows the session: a pointer per slot
    /// rather than a whole event.
    tx: broadcast::Sender<Arc<Event>>,
    /// Bumped when another process committed events of the session: followers re-read the store.
    wake: watch::Sender<u64>,
    running: Option<RunningTurn>,
}

/// Per-session live channels and running turns of this process.
#[derive(Debug, Default)]
pub(crate) struct Hubs {
    map: Mutex<HashMap<String, Hub>>,
    /// Cancelled when this process stops serving streams (the end of a drain): every follower
    /// ends without `done`, and its client reconnects elsewhere with `Last-Event-ID`.
    closing: CancellationToken,
    /// The newest messages of sessions whose turns ran here (what the next model call reads).
    pub recent: super::recent::RecentMessages,
}

impl Hubs {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Hub>) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut map)
    }

    fn hub<'a>(map: &'a mut HashMap<String, Hub>, session_id: &str) -> &'a mut Hub {
        map.entry(session_id.to_string()).or_insert_with(|| Hub {
            tx: broadcast::channel(HUB_CAPACITY).0,
            wake: watch::channel(0).0,
            running: None,
        })
    }

    /// Subscribes to the session's live events and to its wake-ups.
    pub fn subscribe(&self, session_id: &str) -> (broadcast::Receiver<Arc<Event>>, watch::Receiver<u64>) {
        self.with(|m| {
            let hub = Self::hub(m, session_id);
            (hub.tx.subscribe(), hub.wake.subscribe())
        })
    }

    /// Wakes the session's followers, if any, to read the store: another process committed.
    pub fn wake(&self, session_id: &str) {
        self.with(|m| {
            if let Some(hub) = m.get(session_id) {
                hub.wake.send_modify(|n| *n = n.wrapping_add(1));
            }
        })
    }

    /// Sends committed events to live followers: moved into the hub's buffer, not copied.
    pub fn publish(&self, session_id: &str, events: Vec<Event>) {
        self.with(|m| {
            if let Some(hub) = m.get(session_id) {
                for e in events {
                    let _ = hub.tx.send(Arc::new(e));
                }
            }
        })
    }

    /// Marks a turn as running here; `None` if one already runs in this process.
    pub fn start_turn(&self, session_id: &str) -> Option<RunningTurn> {
        self.with(|m| {
            let hub = Self::hub(m, session_id);
            if hub.running.is_some() {
                return None;
            }
            let turn = RunningTurn {
                cancel: CancellationToken::new(),
                handover: CancellationToken::new(),
                finished: Arc::new(tokio::sync::Notify::new()),
            };
            hub.running = Some(turn.clone());
            Some(turn)
        })
    }

    /// Marks the session's turn as ended and wakes whoever waits for it.
    pub fn finish_turn(&self, session_id: &str) {
        self.with(|m| {
            if let Some(hub) = m.get_mut(session_id) {
                if let Some(t) = hub.running.take() {
                    t.finished.notify_waiters();
                }
                if hub.tx.receiver_count() == 0 {
                    m.remove(session_id);
                }
            }
        })
    }

    /// The turn running here, if any.
    pub fn running(&self, session_id: &str) -> Option<RunningTurn> {
        self.with(|m| m.get(session_id).and_then(|h| h.running.clone()))
    }

    /// Every turn running here.
    pub fn all_running(&self) -> Vec<RunningTurn> {
        self.with(|m| m.values().filter_map(|h| h.running.clone()).collect())
    }

    /// Ends every follower of this process, now and from now on (see `closing`).
    pub fn close(&self) {
        self.closing.cancel();
    }

    fn release(&self, session_id: &str) {
        self.with(|m| {
            let idle = m
                .get(session_id)
                .is_some_and(|h| h.running.is_none() && h.tx.receiver_count() <= 1);
            if idle {
                m.remove(session_id);
            }
        })
    }
}

/// When an [`EventStream`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// At the first `done` (a turn's stream).
    UntilDone,
    /// When caught up and no turn is running; else at the running turn's `done`.
    UntilIdle,
    /// Never: the client leaves when it wants.
    Forever,
}

/// A session's events in order: persisted ones first, then live ones.
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Event> + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStream")
    }
}

impl Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Follower {
    storage: Arc<dyn Storage>,
    hubs: Arc<Hubs>,
    session_id: String,
    rx: broadcast::Receiver<Arc<Event>>,
    wake: watch::Receiver<u64>,
    last: u64,
    buffer: VecDeque<Event>,
    follow: Follow,
    catch_up: bool,
    finished: bool,
    /// The fallback read's timer, armed once per stream and moved on only when it fires (a
    /// fresh `sleep` in every wait armed and dropped a timer per event).
    poll: Pin<Box<Sleep>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.hubs.release(&self.session_id);
    }
}

impl Follower {
    async fn running(&self) -> bool {
        if self.hubs.running(&self.session_id).is_some() {
            return true;
        }
        // Another process may run the turn (shared Postgres).
        matches!(self.storage.get_session(&self.session_id).await, Ok(s) if s.status == SessionStatus::Running)
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.buffer.pop_front() {
                if e.seq <= self.last {
                    continue;
                }
                self.last = e.seq;
                if matches!(e.payload, EventPayload::Done { .. }) {
                    // A turn's stream ends at its `done`. One that follows until idle ends at the
                    // newest `done` only: a replay passes the `done` of every earlier turn, and
                    // more of the store may be unread (the buffer, or the next page).
                    self.finished = match self.follow {
                        Follow::UntilDone => true,
                        Follow::UntilIdle => self.buffer.is_empty() && !self.catch_up,
                        Follow::Forever => false,
                    };
                }
                return Some(e);
            }
            if self.finished || self.hubs.closing.is_cancelled() {
                return None;
            }
            if self.catch_up {
                // Marked seen before the read: a wake-up after it is not lost.
                self.wake.borrow_and_update();
                let page = self
                    .storage
                    .events_after(&self.session_id, self.last, REPLAY_PAGE)
                    .await
                    .ok()?;
                if page.len() == REPLAY_PAGE {
                    self.buffer.extend(page);
                    continue;
                }
                self.catch_up = false;
                if !page.is_empty() {
                    self.buffer.extend(page);
                    continue;
                }
                if self.follow == Follow::UntilIdle && !self.running().await {
                    // The turn may have committed its end between the read above and the status:
                    // read once more, now that no turn runs, before ending.
                    let tail = self
                        .storage
                        .events_after(&self.session_id, self.last, REPLAY_PAGE)
                        .await
                        .ok()?;
                    if tail.is_empty() {
                        return None;
                    }
                    self.buffer.extend(tail);
                    continue;
                }
            }
            // The fallback read is due `POLL` after the wait begins; the stream's one timer, when
            // it fires earlier (armed in an earlier wait), is moved on to this wait's due time.
            let (waiting_since, poll) = (Instant::now(), &mut self.poll);
            let fallback = std::future::poll_fn(move |cx| {
                loop {
                    std::task::ready!(poll.as_mut().poll(cx));
                    let due = waiting_since + POLL;
                    let now = Instant::now();
                    if due <= now {
                        poll.as_mut().reset(now + POLL);
                        return Poll::Ready(());
                    }
                    poll.as_mut().reset(due);
                }
            });
            tokio::select! {
                r = self.rx.recv() => match r {
                    // The last receiver to take an event holds the only reference: no copy.
                    Ok(e) if e.seq == self.last + 1 => self.buffer.push_back(Arc::unwrap_or_clone(e)),
                    Ok(e) if e.seq <= self.last => {}
                    // A gap, a lag or a closed hub: the store has everything.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up = true,
                    Err(broadcast::error::RecvError::Closed) => {
                        self.catch_up = true;
                        (self.rx, self.wake) = self.hubs.subscribe(&self.session_id);
                    }
                },
                // Another process committed (a notice from the store); or the fallback poll.
                r = self.wake.changed() => {
                    self.catch_up = true;
                    if r.is_err() {
                        (self.rx, self.wake) = self.hubs.subscribe(&self.session_id);
                    }
                }
                () = fallback => self.catch_up = true,
                _ = self.hubs.closing.cancelled() => return None,
            }
        }
    }
}

/// A turn's stream subscribed before the turn's first commit: every event that turn commits
/// reaches it live, so it needs no read of the store to start ([`Subscribed::after`]).
pub(crate) struct Subscribed(Follower);

impl Subscribed {
    /// The stream of events with seq > `after`, all of them committed after the subscription
    /// (a gap or a lag still falls back to reading the store).
    pub(crate) fn after(self, after: u64) -> EventStream {
        let mut f = self.0;
        f.last = after;
        f.catch_up = false;
        EventStream::of(f)
    }
}

impl EventStream {
    /// Events of `session_id` with seq > `after`, replayed then followed as `follow` says.
    /// Subscribes before reading the store, so nothing committed meanwhile is missed.
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        hubs: Arc<Hubs>,
        session_id: &str,
        after: u64,
        follow: Follow,
    ) -> EventStream {
        let mut f = Self::subscribe(storage, hubs, session_id, follow).0;
        f.last = after;
        EventStream::of(f)
    }

    /// Subscribes to `session_id`'s live events now; the stream is made once its start is known.
    pub(crate) fn subscribe(
        storage: Arc<dyn Storage>,
        hubs: Arc<Hubs>,
        session_id: &str,
        follow: Follow,
    ) -> Subscribed {
        let (rx, wake) = hubs.subscribe(session_id);
        Subscribed(Follower {
            storage,
            hubs,
            session_id: session_id.to_string(),
            rx,
            wake,
            last: 0,
            buffer: VecDeque::new(),
            follow,
            catch_up: true,
            finished: false,
            poll: Box::pin(tokio::time::sleep(POLL)),
        })
    }

    fn of(follower: Follower) -> EventStream {
        // The step's future lives inside the one boxed stream: no allocation per event.
        let stream = futures::stream::unfold(follower, |mut f| async move {
            let e = f.next().await?;
            Some((e, f))
        });
        EventStream {
            inner: Box::pin(stream),
        }
    }
}
