//! Where this listener's claims start: past every change that can never be claimed again, so
//! that a claim does not walk over the rows the queue's earlier batches deleted.
//!
//! A deleted change stays in the table and its index until no snapshot can see it: while a
//! session holds an old snapshot (a long report, a forgotten `BEGIN`), every claim that starts
//! from the first id reads every change applied since, an hour at 100 changes a second being
//! 360,000 index entries and heap rows per claim. [`QueueFloor`] keeps, across drains, an id at
//! or below which nothing is left to claim, and proves it with transaction ids:
//!
//! - A claim that sees change `v` committed saw every id up to `v` already taken (ids come from
//!   the table's identity, cached one at a time, so in the order they are taken). Every change is
//!   written by a transaction that already holds its transaction id when it takes the row's id: a
//!   capture trigger runs after its row was written, a fan-out after the claim locked its rows,
//!   and pgfresh's own inserts take theirs first. So each id up to `v` belongs to a transaction
//!   that began before the claim's own transaction id `x` was assigned.
//! - Once a later claim's snapshot has `xmin` above `x`, every transaction up to `x` has ended:
//!   each change up to `v` that will ever be committed is visible to that snapshot (the
//!   *horizon*). What is not is gone (applied) or never was (rolled back).
//! - That claim also reads the first change past the floor that is ready to claim, or will be
//!   within [`LOOK_AHEAD`] (locked by another batch or not: that batch may roll back). The floor
//!   moves up to the lower of that change (less one) and the horizon. Below the horizon rows are
//!   only ever deleted, or updated in place, never added, so the floor stays true.
//! - A change that waits longer (a failure's later retries, after seconds to minutes of backoff)
//!   may be left below the floor: the batch that made it wait tells the floor when it is ready
//!   ([`QueueFloor::wait`]), and the next claim after that starts below it, once.
//! - A transaction that holds a transaction id for long (a forgotten `BEGIN` that wrote
//!   something, a prepared transaction nobody finished, in any database of the server) keeps every
//!   snapshot's `xmin` at or below it, and with it the proof above: each claim would read every
//!   change applied since it began. Its changes are not committed, so no claim can take them while
//!   it runs; what matters is not to pass them for good. So the proof above holds but for the
//!   transactions still running that claims have seen running for [`HELD_BACK`] (or that the
//!   floor passed already): as the floor rises past what they may hold, it notes each of them with
//!   the first id it passed ([`State::passed`]; after the walk below, the first past the floor it
//!   had before, since one it had not passed then holds nothing below that). Once a snapshot shows
//!   one ended (a claim's, or while the floor passed any, an empty claim's own,
//!   [`QueueFloor::ended`]), the next claim starts there ([`QueueFloor::start`]'s `due`), and goes
//!   on from each full claim ([`QueueFloor::go_on`]); a change it makes wait, however short the
//!   wait, is on the list of waiting changes below ([`QueueFloor::wait`]).
//!
//! What the proof cannot see is caught by a walk from the first id every [`WALK_FROM_START`] (or
//! less often while walks take long, [`WALK_SHARE`], but within [`WALKS_AT_LEAST`]), which also
//! forgets what claims saw (and so does a failed drain: PostgreSQL may have restarted): a change
//! written with an id before its transaction had one (the first row of an `INSERT` by hand into
//! `pgfresh.changes`, a capture on a foreign partition) or with an id below the floor (the
//! identity restarted, a failover to a standby that lagged behind), and one made to wait longer
//! than [`LOOK_AHEAD`] by another listener that has stopped since (or whose claim below it met it
//! held by another batch that then rolled back), or for any time, below this listener's floor (a
//! change of a transaction both passed, which the other's claim took and deferred), is claimed at
//! the first walk after it commits or is ready (and the poll or NOTIFY after that). If the
//! identity does not hand out ids in order (a cache or a negative increment set on it), the
//! listener keeps no floor.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pg::Snapshot;
use crate::pg::queue::{LOOK_AHEAD, Seen};

/// How often claims start from the first id again, whatever the floor says.
pub(crate) const WALK_FROM_START: Duration = Duration::from_secs(10);

/// A walk from the first id comes at most once per this many times what the last one's claim
/// took: over the rows a held snapshot keeps (an hour of them at 1,000 changes a second is 3.6
/// million index entries and heap rows), a walk takes long, and no more than about 1% of the time
/// goes to them.
const WALK_SHARE: u32 = 100;

/// However long the last walk took (an I/O stall), the next comes within this.
const WALKS_AT_LEAST: Duration = Duration::from_secs(300);

/// Ids seen and the transactions that saw them, kept until a snapshot proves them.
const CANDIDATES: usize = 32;

/// Changes waiting to be ready that the floor keeps track of; past that many, the walk from the
/// first id finds the others (each at most [`WALK_FROM_START`] after it is ready).
const WAITING: usize = 10_000;

/// How long claims must have seen a transaction running before the floor may pass it: a writer's
/// transaction of a few milliseconds never is, a forgotten `BEGIN` soon.
pub(crate) const HELD_BACK: Duration = Duration::from_secs(1);

/// Running transactions the floor keeps track of having passed; past that many, it waits for
/// them as it does for a shorter while.
const PASSED: usize = 1_000;

/// The floor under this listener's claims (see the module's header).
pub(crate) struct QueueFloor {
    state: Mutex<State>,
    /// How often claims start from the first id again ([`WALK_FROM_START`]).
    walk_every: Duration,
    /// Whether the identity hands out ids in the order they are taken (no cache, counting up).
    in_order: bool,
}

struct State {
    /// No change at or below this id can be claimed, now or later, but those of the
    /// transactions in `passed`, once they have ended.
    floor: i64,
    /// Bumped when the floor goes back to the first id: a claim that started before says
    /// nothing about the floor since.
    generation: u64,
    /// When claims last started from the first id.
    walked_from_start: Instant,
    /// What the claim of the last walk from the first id took.
    walk_took: Duration,
    /// The floor before the walk from the first id that is under way (`i64::MIN` after a failed
    /// drain, when what it proved may no longer hold): a transaction the floor had not passed by
    /// then holds nothing at or below it, so one passed as the floor is proven again is passed
    /// from there, not from the first id (when it ends, the claim due then is no second walk).
    before_walk: i64,
    /// What claims saw, for later snapshots to prove. Both ids grow along the list.
    candidates: VecDeque<Candidate>,
    /// Changes this listener made wait longer than [`LOOK_AHEAD`], maybe below the floor.
    waiting: Waits,
    /// Transactions that were still running when the floor rose past ids they may hold, each
    /// with the first of those ids: the floor waits for them to end.
    passed: HashMap<u64, i64>,
    /// The transactions claims' snapshots saw running, since when.
    running_since: HashMap<u64, Instant>,
}

/// Every id up to `last_id` was taken by a transaction that began before transaction `xid`
/// (which a claim had when it saw `last_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    last_id: i64,
    xid: u64,
}

impl State {
    /// Takes in which transactions had ended, and which still ran, when `snapshot` was taken:
    /// those the floor passed that have ended make a claim below them due. Returns whether one
    /// had.
    fn ended(&mut self, snapshot: &Snapshot, now: Instant) -> bool {
        let mut due = false;
        let State {
            passed,
            waiting,
            running_since,
            ..
        } = self;
        passed.retain(|&xid, &mut first| {
            let ended = snapshot.sees(xid);
            if ended {
                waiting.add(now, first);
                due = true;
            }
            !ended
        });
        running_since.retain(|&xid, _| !snapshot.sees(xid));
        for xid in snapshot.running() {
            running_since.entry(xid).or_insert(now);
        }
        due
    }

    /// Back to the first id. The changes still waiting stay on the list: the floor may rise past
    /// them again before they are ready.
    fn forget(&mut self) {
        self.walked_from_start = Instant::now();
        self.before_walk = i64::MIN;
        self.floor = i64::MIN;
        self.generation += 1;
        self.candidates.clear();
    }
}

/// Changes that become ready to claim later: when, and the first id of each lot. The listener's
/// floor and a drain's backlog keep one each, to start a claim below them once they are ready.
#[derive(Default)]
pub(crate) struct Waits(Vec<(Instant, i64)>);

impl Waits {
    /// Changes from id `first` on become ready at `at`.
    pub(crate) fn add(&mut self, at: Instant, first: i64) {
        self.0.push((at, first));
    }

    /// How many lots wait.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Forgets the lots ready by `now`, and returns the first id among them.
    pub(crate) fn take_ready(&mut self, now: Instant) -> Option<i64> {
        let mut first = None;
        self.0.retain(|&(at, id)| {
            let ready = at <= now;
            if ready {
                first = Some(first.map_or(id, |first: i64| first.min(id)));
            }
            !ready
        });
        first
    }
}

/// Where a claim starts, to hand back with what it saw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Start {
    /// The floor when the claim was sent.
    pub(crate) floor: i64,
    /// The first of the waiting changes that are ready now: the claim must look from there,
    /// whatever the floor or a backlog says.
    pub(crate) due: Option<i64>,
    /// This claim walks from the first id (see [`QueueFloor::walked`]).
    pub(crate) walk: bool,
    generation: u64,
}

impl QueueFloor {
    /// A floor that rises as claims prove it; or, not `in_order` (the identity may hand out ids
    /// out of order), one that stays at the first id.
    pub(crate) fn new(in_order: bool) -> QueueFloor {
        QueueFloor {
            state: Mutex::new(State {
                floor: i64::MIN,
                generation: 0,
                walked_from_start: Instant::now(),
                walk_took: Duration::ZERO,
                before_walk: i64::MIN,
                candidates: VecDeque::new(),
                waiting: Waits::default(),
                passed: HashMap::new(),
                running_since: HashMap::new(),
            }),
            in_order,
            walk_every: WALK_FROM_START,
        }
    }

    /// The same, walking from the first id every `every` instead of [`WALK_FROM_START`].
    #[cfg(feature = "testing")]
    pub(crate) fn walking_every(self, every: Duration) -> QueueFloor {
        QueueFloor {
            walk_every: every,
            ..self
        }
    }

    /// Where the next claim may start: the floor, or the first id once every
    /// [`WALK_FROM_START`] (less often when walks take long, [`WALK_SHARE`]).
    pub(crate) fn start(&self) -> Start {
        let mut state = self.state.lock().expect("queue floor lock");
        let every = self
            .walk_every
            .max((state.walk_took * WALK_SHARE).min(WALKS_AT_LEAST));
        let walk = state.walked_from_start.elapsed() >= every;
        if walk {
            let before = state.floor;
            state.forget();
            state.before_walk = before;
        }
        Start {
            floor: state.floor,
            due: state.waiting.take_ready(Instant::now()),
            walk,
            generation: state.generation,
        }
    }

    /// The claim of a walk from the first id (`start.walk`) took `took`.
    pub(crate) fn walked(&self, start: Start, took: Duration) {
        let mut state = self.state.lock().expect("queue floor lock");
        if start.walk && start.generation == state.generation {
            state.walk_took = took;
        }
    }

    /// Change `id` was made to wait `delay`, from a commit that has just ended: if that is
    /// longer than [`LOOK_AHEAD`], the first claim after it starts below it, whatever the floor
    /// says. That claim finds it ready: its retry time counts from the start of the transaction
    /// that set it, and the claim's transaction begins after it asked [`QueueFloor::start`].
    pub(crate) fn wait(&self, id: i64, delay: Duration) {
        let mut state = self.state.lock().expect("queue floor lock");
        // Within LOOK_AHEAD, the floor's look holds it under a change above it; a change below it
        // (claimed from a `due` id) has only this list.
        if delay <= LOOK_AHEAD && id > state.floor {
            return;
        }
        if state.waiting.len() < WAITING {
            state.waiting.add(Instant::now() + delay, id);
        }
    }

    /// Starts again from the first id, and forgets what claims saw: after a failed drain, when
    /// PostgreSQL may have restarted (and handed out ids and transaction ids again that claims
    /// had seen committed, with `synchronous_commit` off).
    pub(crate) fn forget(&self) {
        self.state.lock().expect("queue floor lock").forget();
    }

    /// Where figures that look for the oldest change may start: the floor, or below the changes
    /// waiting for a retry that it may have passed. (Not below what transactions it passed may
    /// hold: no one sees that until they end, and then the next claim starts there.)
    pub(crate) fn current(&self) -> i64 {
        let state = self.state.lock().expect("queue floor lock");
        let first_waiting = state.waiting.0.iter().map(|&(_, id)| id).min();
        first_waiting.map_or(state.floor, |id| state.floor.min(id - 1))
    }

    /// Whether the floor passed transactions still running: then an empty claim's transaction
    /// asks for a snapshot of its own ([`QueueFloor::ended`]), since only a claim that returns
    /// rows brings one.
    pub(crate) fn passing(&self) -> bool {
        !self
            .state
            .lock()
            .expect("queue floor lock")
            .passed
            .is_empty()
    }

    /// Takes in which transactions had ended when `snapshot` was taken; returns whether one the
    /// floor passed had, so that a claim below it is due now.
    pub(crate) fn ended(&self, snapshot: &Snapshot) -> bool {
        self.state
            .lock()
            .expect("queue floor lock")
            .ended(snapshot, Instant::now())
    }

    /// A claim from a `due` id came back full, up to `last_id`: the next claim goes on from
    /// there, whatever the floor says.
    pub(crate) fn go_on(&self, last_id: i64) {
        let mut state = self.state.lock().expect("queue floor lock");
        state.waiting.add(Instant::now(), last_id.saturating_add(1));
    }

    /// Takes in what a claim that started at `start` saw; returns whether a transaction the
    /// floor passed has ended, so that a claim below the floor is due now.
    pub(crate) fn claimed(&self, start: Start, seen: Seen) -> bool {
        let mut state = self.state.lock().expect("queue floor lock");
        let now = Instant::now();
        // True of any snapshot, whenever its claim started.
        let due = state.ended(&seen.snapshot, now);
        // Sent before the floor last went back to the first id: it may have seen what the walk
        // is for (ids handed out again), and the floor no longer is what it started from.
        if start.generation != state.generation || !self.in_order {
            return due;
        }
        // The horizon its snapshot proves: the highest id seen by a claim whose transaction id
        // came before the snapshot and is above every transaction id still running, but those
        // that have run for [`HELD_BACK`] or that the floor passed already (see the module's
        // header). Those the floor passes as it rises, when a claim from the floor looked for the
        // first change past it (only such a claim moves it).
        let passable = state.passed.len() < PASSED;
        let proven = state
            .candidates
            .iter()
            .take_while(|c| {
                c.xid < seen.snapshot.xmax()
                    && seen.snapshot.running_below(c.xid).all(|xid| {
                        state.passed.contains_key(&xid)
                            || (passable
                                && state
                                    .running_since
                                    .get(&xid)
                                    .is_some_and(|&since| now.duration_since(since) >= HELD_BACK))
                    })
            })
            .count();
        let running: Vec<u64> = match proven.checked_sub(1) {
            Some(last) => seen
                .snapshot
                .running_below(state.candidates[last].xid)
                .collect(),
            None => Vec::new(),
        };
        let horizon = proven
            .checked_sub(1)
            .map(|last| state.candidates[last].last_id);
        // Later snapshots prove at least as much: the last proven entry is all they need.
        if proven > 1 {
            state.candidates.drain(..proven - 1);
        }
        if let (Some(horizon), Some(first)) = (horizon, seen.first_past_floor) {
            let floor = first.map_or(horizon, |first| horizon.min(first - 1));
            if floor > state.floor {
                let passed_from = state.floor.max(state.before_walk).saturating_add(1);
                for xid in running {
                    state.passed.entry(xid).or_insert(passed_from);
                }
                state.floor = floor;
            }
        }
        // What this claim saw, for a later snapshot to prove: only if it adds to the list's end.
        // An entry with a higher id and a lower transaction id replaces those it outdoes.
        // A transaction id below the snapshot's xmax was taken before the claim's snapshot (by
        // a statement before it in its transaction): writers that took theirs later may hold
        // ids it saw. Claims are their transaction's first statement that takes one; if that
        // changed, this keeps the floor where it is rather than wrong.
        if seen.last_id != i64::MIN && seen.xid >= seen.snapshot.xmax() {
            if state
                .candidates
                .back()
                .is_some_and(|c| c.last_id >= seen.last_id)
            {
                return due;
            }
            while state.candidates.back().is_some_and(|c| c.xid >= seen.xid) {
                state.candidates.pop_back();
            }
            if state.candidates.len() == CANDIDATES {
                state.candidates.pop_back();
            }
            state.candidates.push_back(Candidate {
                last_id: seen.last_id,
                xid: seen.xid,
            });
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PartialEq<(i64, Option<i64>)> for Start {
        fn eq(&self, &(floor, due): &(i64, Option<i64>)) -> bool {
            (self.floor, self.due) == (floor, due)
        }
    }

    /// A claim whose snapshot's xmin and xmax are `xmin`.
    fn seen(xmin: u64, xid: u64, last_id: i64, first: Option<Option<i64>>) -> Seen {
        seen_in(&format!("{xmin}:{xmin}:"), xid, last_id, first)
    }

    /// A claim whose snapshot is `snapshot`, in `pg_current_snapshot()`'s text form.
    fn seen_in(snapshot: &str, xid: u64, last_id: i64, first: Option<Option<i64>>) -> Seen {
        Seen {
            snapshot: crate::pg::Snapshot::parse(snapshot).unwrap(),
            xid,
            last_id,
            first_past_floor: first,
        }
    }

    #[test]
    fn the_floor_rises_once_a_snapshot_proves_what_an_earlier_claim_saw() {
        let floor = QueueFloor::new(true);
        let start = floor.start();
        assert_eq!(start.floor, i64::MIN);
        // Claim 1 (transaction 100) took changes up to id 50.
        floor.claimed(start, seen(90, 100, 50, Some(Some(40))));
        assert_eq!(floor.current(), i64::MIN, "nothing proven yet");
        // Claim 2's snapshot has xmin 100: transaction 100 may still run, and a writer that took
        // an id below 50 with it.
        floor.claimed(floor.start(), seen(100, 110, 60, Some(Some(55))));
        assert_eq!(floor.current(), i64::MIN);
        // Claim 3's snapshot: every transaction up to 105 ended. Ids up to 50 are settled, and
        // the first change past the floor is 55: the floor is 50.
        floor.claimed(floor.start(), seen(106, 120, 70, Some(Some(55))));
        assert_eq!(floor.current(), 50);
        // A change still queued below the horizon holds the floor under it.
        floor.claimed(floor.start(), seen(130, 130, 80, Some(Some(58))));
        assert_eq!(floor.current(), 57);
        // An empty queue past the floor: up to the horizon (70, seen by transaction 120).
        floor.claimed(floor.start(), seen(130, 0, i64::MIN, Some(None)));
        assert_eq!(floor.current(), 70);
    }

    #[test]
    fn only_a_claim_from_the_floor_moves_it_and_it_never_goes_down() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 50, None));
        // Proven, but this claim started past the floor (a drain's backlog): it did not look for
        // the first change past the floor.
        floor.claimed(floor.start(), seen(101, 110, 60, None));
        assert_eq!(floor.current(), i64::MIN);
        floor.claimed(floor.start(), seen(111, 120, 70, Some(None)));
        assert_eq!(floor.current(), 60);
        // An older claim's snapshot, answered late, proves less: the floor stays.
        floor.claimed(floor.start(), seen(101, 0, i64::MIN, Some(Some(20))));
        assert_eq!(floor.current(), 60);
    }

    #[test]
    fn the_floor_goes_back_to_the_first_id_now_and_then() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 50, None));
        let before = floor.start();
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START;
        let walk = floor.start();
        assert_eq!(walk.floor, i64::MIN);
        // A claim sent before the walk from the start answers after it: it moves nothing.
        floor.claimed(before, seen(101, 110, 60, Some(None)));
        assert_eq!(floor.current(), i64::MIN);
        // The walk forgot what claims saw: proven again from the claims since.
        floor.claimed(walk, seen(111, 120, 70, Some(None)));
        assert_eq!(floor.current(), i64::MIN);
        floor.claimed(floor.start(), seen(121, 130, 80, Some(None)));
        assert_eq!(floor.current(), 70);
    }

    #[test]
    fn a_walk_that_took_long_comes_less_often() {
        let floor = QueueFloor::new(true);
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START;
        let walk = floor.start();
        assert!(walk.walk);
        // Over the rows a held snapshot keeps, the walk's claim took half a second: the next
        // walk comes 50 s later, not 10.
        floor.walked(walk, Duration::from_millis(500));
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START * 4;
        assert!(!floor.start().walk, "40 s after a walk that took 0.5 s");
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START;
        let walk = floor.start();
        assert!(walk.walk, "50 s after the last walk");
        // However long one took, the next comes within WALKS_AT_LEAST.
        floor.walked(walk, Duration::from_secs(60));
        floor.state.lock().unwrap().walked_from_start -= WALKS_AT_LEAST;
        let walk = floor.start();
        assert!(walk.walk);
        // Quick again: every 10 s. (A claim that did not walk says nothing of walks.)
        floor.walked(floor.start(), Duration::from_secs(60));
        floor.walked(walk, Duration::from_millis(5));
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START;
        assert!(floor.start().walk);
    }

    #[test]
    fn a_walk_from_the_first_id_or_a_failed_drain_forgets_what_claims_saw() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 1_000_000, None));
        // The identity restarted (or a failover lost the ids claims saw): the next snapshot
        // would prove a million ids settled that are still to be handed out.
        floor.forget();
        floor.claimed(floor.start(), seen(101, 110, 10, Some(Some(11))));
        assert_eq!(floor.current(), i64::MIN);
        floor.claimed(floor.start(), seen(111, 120, 12, Some(Some(11))));
        assert_eq!(
            floor.current(),
            10,
            "proven again from what claims saw since"
        );
    }

    #[test]
    fn a_claim_whose_transaction_id_came_before_its_snapshot_proves_nothing() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen_in("90:99:", 95, 50, None));
        floor.claimed(floor.start(), seen(200, 210, 60, Some(None)));
        assert_eq!(floor.current(), i64::MIN);
    }

    #[test]
    fn ids_out_of_order_keep_the_floor_at_the_first_id() {
        let floor = QueueFloor::new(false);
        floor.claimed(floor.start(), seen(90, 100, 50, None));
        floor.claimed(floor.start(), seen(101, 110, 60, Some(None)));
        assert_eq!(floor.start().floor, i64::MIN);
    }

    #[test]
    fn a_claim_starts_below_the_floor_once_where_waiting_changes_are_ready() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 50, None));
        floor.claimed(floor.start(), seen(101, 110, 60, Some(None)));
        assert_eq!(floor.current(), 50);
        floor.wait(20, Duration::from_secs(3600));
        floor.wait(30, LOOK_AHEAD * 2);
        floor.wait(40, LOOK_AHEAD * 2);
        floor.wait(55, LOOK_AHEAD / 2);
        assert_eq!(
            floor.current(),
            19,
            "figures look from the first waiting change"
        );
        assert_eq!(floor.start().due, None, "not ready yet");
        // Ready (the walk from the first id in between keeps them).
        {
            let mut state = floor.state.lock().unwrap();
            state.walked_from_start -= WALK_FROM_START;
            for (ready, _) in state.waiting.0.iter_mut().skip(1) {
                *ready -= LOOK_AHEAD * 2;
            }
        }
        let start = floor.start();
        assert_eq!((start.floor, start.due), (i64::MIN, Some(30)));
        // Once: the next claims start at the floor, until the other change is ready. A change
        // ready within LOOK_AHEAD was not listed: the floor's look holds the floor under it.
        assert_eq!(floor.start().due, None);
        assert_eq!(floor.state.lock().unwrap().waiting.len(), 1);
    }

    #[test]
    fn a_short_wait_below_the_floor_is_listed_too() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 50, None));
        floor.claimed(floor.start(), seen(101, 110, 60, Some(None)));
        // Claimed from below the floor (a `due` id), made to wait a moment: nothing else would
        // bring it back.
        floor.wait(20, LOOK_AHEAD / 2);
        assert_eq!(floor.current(), 19);
        floor.state.lock().unwrap().waiting.0[0].0 -= LOOK_AHEAD;
        assert_eq!(floor.start().due, Some(20));
    }

    #[test]
    fn a_full_claim_from_a_due_id_goes_on_from_its_last_change() {
        let floor = QueueFloor::new(true);
        floor.go_on(1200);
        assert_eq!(floor.start().due, Some(1201));
        assert_eq!(floor.start().due, None);
    }

    /// Makes every transaction claims saw running look as if they saw it `HELD_BACK` ago.
    fn age_running(floor: &QueueFloor) {
        for since in floor.state.lock().unwrap().running_since.values_mut() {
            *since -= HELD_BACK;
        }
    }

    #[test]
    fn a_transaction_holding_xmin_back_is_passed_and_what_it_commits_claimed_once_it_ends() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 40, None));
        floor.claimed(floor.start(), seen(101, 110, 45, Some(None)));
        assert_eq!(floor.current(), 40);
        // Transaction 112 begins and stays (a forgotten BEGIN that wrote): every snapshot's
        // xmin is 112 from now on. Claim 120 saw changes up to 60.
        floor.claimed(
            floor.start(),
            seen_in("112:120:112", 120, 60, Some(Some(50))),
        );
        assert_eq!(floor.current(), 45, "proven up to what claim 110 saw");
        // Claim 120's transaction id is held back by 112, seen running only just now: the floor
        // waits.
        floor.claimed(
            floor.start(),
            seen_in("112:130:112", 130, 65, Some(Some(55))),
        );
        assert_eq!(floor.start().floor, 45);
        // Once 112 has run for HELD_BACK: the floor passes it, the only transaction running
        // below 130 (135 began after claim 130 took its id), up to what claim 130 saw, below
        // the first change past the floor.
        age_running(&floor);
        let start = floor.start();
        floor.claimed(start, seen_in("112:140:112,135", 140, 70, Some(Some(62))));
        assert_eq!(floor.start().floor, 61);
        assert_eq!(floor.current(), 61);
        // Still running: nothing to claim below the floor, which goes on rising past it.
        floor.claimed(
            floor.start(),
            seen_in("112:150:112", 150, 75, Some(Some(66))),
        );
        assert_eq!(floor.start(), (65, None));
        // Ended: the next claim starts past where the floor passed it, once.
        assert!(floor.ended(&Snapshot::parse("150:160:").unwrap()));
        assert_eq!(floor.start(), (65, Some(46)));
        assert_eq!(floor.start(), (65, None));
        assert!(!floor.passing());
    }

    /// A floor at 45 that passed transaction 95, which still runs.
    fn passed_95() -> QueueFloor {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 40, None));
        floor.claimed(floor.start(), seen_in("95:110:95", 110, 45, Some(None)));
        age_running(&floor);
        floor.claimed(floor.start(), seen_in("95:120:95", 120, 50, Some(None)));
        assert_eq!(floor.start(), (45, None), "passed transaction 95");
        floor
    }

    #[test]
    fn a_short_transaction_is_never_passed() {
        let floor = passed_95();
        // A writer (125) begins after claim 120 took its id, and holds back claim 130's: though
        // 95 was passed, the floor waits for 125 to end, as it would without 95.
        floor.claimed(floor.start(), seen_in("95:130:95,125", 130, 55, Some(None)));
        assert_eq!(floor.start(), (50, None));
        floor.claimed(floor.start(), seen_in("95:140:95,125", 140, 60, Some(None)));
        assert_eq!(floor.start(), (50, None));
        floor.claimed(floor.start(), seen_in("95:150:95", 150, 65, Some(None)));
        assert_eq!(floor.start(), (60, None));
        let passed = floor.state.lock().unwrap().passed.clone();
        assert_eq!(passed.keys().collect::<Vec<_>>(), vec![&95]);
    }

    #[test]
    fn after_the_walk_from_the_first_id_transactions_passed_already_hold_nothing_back() {
        let floor = passed_95();
        // The walk from the first id forgets what claims saw; transaction 95 still runs.
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START;
        let walk = floor.start();
        assert!(walk.walk && walk.floor == i64::MIN);
        floor.claimed(walk, seen_in("95:130:95", 130, 55, Some(None)));
        // Held back by transaction 95 alone, which the floor passed already: proven at once.
        floor.claimed(floor.start(), seen_in("95:140:95", 140, 60, Some(None)));
        assert_eq!(floor.start(), (55, None));
        let passed = floor.state.lock().unwrap().passed.clone();
        assert_eq!(
            passed.get(&95),
            Some(&(i64::MIN + 1)),
            "passed from the start"
        );
    }

    #[test]
    fn a_transaction_passed_after_a_walk_is_passed_from_the_floor_before_it() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 40, None));
        floor.claimed(floor.start(), seen(101, 110, 50, Some(None)));
        floor.claimed(floor.start(), seen(111, 120, 60, Some(None)));
        // Transaction 150 begins (a write of more than a second), after the floor reached 50.
        floor.claimed(floor.start(), seen_in("150:160:150", 160, 70, Some(None)));
        assert_eq!(floor.start(), (60, None));
        age_running(&floor);
        floor.state.lock().unwrap().walked_from_start -= WALK_FROM_START;
        let walk = floor.start();
        assert!(walk.walk);
        floor.claimed(walk, seen_in("150:170:150", 170, 75, Some(None)));
        floor.claimed(floor.start(), seen_in("150:180:150", 180, 80, Some(None)));
        assert_eq!(floor.start(), (75, None), "passed transaction 150");
        // It held nothing at or below 60 (else the floor would have passed it then): when it
        // ends, the claim due starts there, not at the first id, which would be a second walk.
        assert!(floor.claimed(floor.start(), seen_in("190:190:", 190, 85, Some(None))));
        assert_eq!(floor.start(), (80, Some(61)));
    }

    #[test]
    fn only_a_claim_from_the_floor_passes_transactions_and_only_so_many() {
        let floor = QueueFloor::new(true);
        floor.claimed(floor.start(), seen(90, 100, 40, None));
        floor.claimed(floor.start(), seen_in("95:110:95", 110, 45, None));
        age_running(&floor);
        // A claim past a backlog: it did not look for the first change past the floor.
        floor.claimed(floor.start(), seen_in("95:120:95", 120, 50, None));
        assert_eq!(floor.start().floor, i64::MIN);
        // Too many transactions passed already: the floor waits for xmin, as it does for a
        // shorter while.
        {
            let mut state = floor.state.lock().unwrap();
            let running = 1_000..1_000 + PASSED as u64;
            state.passed.extend(running.map(|xid| (xid, 1)));
        }
        floor.claimed(floor.start(), seen_in("95:130:95", 130, 55, Some(None)));
        assert_eq!(floor.start().floor, i64::MIN);
        floor.state.lock().unwrap().passed.clear();
        floor.claimed(floor.start(), seen_in("95:140:95", 140, 60, Some(None)));
        assert_eq!(floor.start().floor, 55, "passed transaction 95");
    }

    #[test]
    fn candidates_stay_few_and_in_order() {
        let floor = QueueFloor::new(true);
        for i in 0..100 {
            floor.claimed(floor.start(), seen(1, 1000 + i, 10 * i as i64 + 10, None));
        }
        let state = floor.state.lock().unwrap();
        assert!(state.candidates.len() <= CANDIDATES);
        assert!(
            state
                .candidates
                .iter()
                .zip(state.candidates.iter().skip(1))
                .all(|(a, b)| a.last_id < b.last_id && a.xid < b.xid)
        );
        drop(state);
        // A claim with a higher id seen by an older transaction outdoes the entries after it.
        floor.claimed(floor.start(), seen(1, 900, 5000, None));
        let state = floor.state.lock().unwrap();
        let last = state.candidates.back().unwrap();
        assert_eq!((last.last_id, last.xid), (5000, 900));
    }
}
