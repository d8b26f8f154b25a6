//! What the listener's tasks share: its connections, fragments, settings and identity, and the state
//! they hand each other (the idle flag, recent renders, the queue's floor, when deferred changes
//! become ready).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::floor::QueueFloor;
use super::plan::RecentRenders;
use super::registration::Registration;
use super::stand_aside::StandAside;
use crate::config::ListenSettings;
use crate::fragment::Fragments;
use crate::ops::board::StatusBoard;
use crate::pg::Database;
use crate::pg::registry::ListenerIdentity;
use crate::shutdown::Shutdown;
use crate::store::RedisStore;

/// Everything the listener's tasks share.
pub(crate) struct Shared {
    pub(crate) db: Database,
    pub(crate) store: RedisStore,
    pub(crate) fragments: Fragments,
    pub(crate) settings: ListenSettings,
    /// This listener's id and fragment versions, as registered.
    pub(crate) me: ListenerIdentity,
    /// The `search_path` of the sessions user code runs in: through queries run under it, inside
    /// the claiming transaction on one of pgfresh's own (pinned) sessions. `None` behind a
    /// connection pooler, where pgfresh's sessions are not pinned, and run with the users' path.
    pub(crate) users_search_path: Option<String>,
    /// Whether it hears NOTIFYs (has a LISTEN session): not behind a connection pooler without a
    /// session URL. A listener that does not never asks writers to notify, and polls.
    pub(crate) notifications: bool,
    /// Its row in the registry, and the one writer of it.
    pub(crate) registration: Registration,
    /// Whether it stands aside for a listener with newer fragment versions.
    pub(crate) stand_aside: Arc<StandAside>,
    pub(crate) shutdown: Shutdown,
    /// Whether batches load on sessions of their own even behind a connection pooler: set once a
    /// load ended the claim's transaction it ran in (`listener::batch::render_changes`).
    pub(crate) loads_apart: AtomicBool,
    /// Whether this listener last told the database it is idle (wants NOTIFYs), as `registration`
    /// said it: read at every turn of the drain loop without waiting for its lock.
    pub(crate) idle: AtomicBool,
    /// Recent renders, to settle covered changes and slow down hot keys.
    pub(crate) recent: RecentRenders,
    /// Where claims start: past every change that can never be claimed again.
    pub(crate) floor: QueueFloor,
    /// When deferred changes become ready: the drain loop, or a drain with room for a worker,
    /// looks at the queue again then.
    pub(crate) next_wake: Mutex<Option<Instant>>,
    /// Why a task stopped the listener, when it found it must (another listener registered first
    /// shares Redis with it badly): what `listen` returns.
    pub(crate) fatal: Mutex<Option<crate::Error>>,
    /// Totals and samples, for the registry row, the status page and `/readyz`.
    pub(crate) board: Arc<StatusBoard>,
}

impl Shared {
    /// Makes the drain loop look at the queue again no later than `at`.
    pub(crate) fn wake_by(&self, at: Instant) {
        let mut next = self.next_wake.lock().expect("next wake lock");
        *next = Some(next.map_or(at, |earlier| earlier.min(at)));
    }
}
