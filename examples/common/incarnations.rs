//! Incarnations: which data directory each node id runs on, as far as this node has seen.
//!
//! A node's *incarnation* is a number minted with its data directory ([`mint`]) and kept in
//! it; a new directory under the same node id (a lost disk, a replaced machine) is a new
//! incarnation. The peer handshake carries both sides' incarnations (see `guard.rs`), and
//! every node keeps, per peer id, the newest incarnation it has seen: [`Incarnations`].
//!
//! # The rule
//! Incarnations are ordered by when their directory was created (the high bits are the
//! creation time in seconds, the low 30 bits random), and **the newest wins**:
//! - a peer seen for the first time, or again with the same incarnation, is taken;
//! - a peer with a *newer* incarnation than the one recorded replaced its directory: it is
//!   taken, the record moves on, and the host logs it ([`Seen::Replaced`]);
//! - a peer with an *older* incarnation than the one recorded runs on a directory that was
//!   replaced, a zombie with a stale term, vote and log (an old disk plugged back in, a
//!   second process started under the same id): it is refused ([`Retired`]), in both
//!   directions. Two processes answering to one id could each vote in one term; refusing
//!   the older keeps one voice per id at every node that has seen the newer one.
//!
//! A record is stored (through the host's `save`, before the connection is used) whenever it
//! changes, so the rule holds across this node's restarts. A node that has never seen the
//! newer incarnation cannot refuse the older one; the newer one's first handshake with it
//! retires the older there too.
//!
//! Clocks only order directories created at different times: two directories of one id
//! created within a clock skew of each other may be ordered either way (the random bits keep
//! them distinct). Replacing a disk takes longer than any sane skew.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use raftkv::raft::NodeId;

/// Bits of an incarnation below the creation time.
const RANDOM_BITS: u32 = 30;

/// A new incarnation: the current time in seconds above [`RANDOM_BITS`] random bits (never
/// 0, which means "none" in the handshake).
pub fn mint() -> std::io::Result<u64> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| std::io::Error::other(format!("the clock is before 1970: {e}")))?
        .as_secs();
    let low = super::guard::random_u64()? & ((1 << RANDOM_BITS) - 1);
    Ok(((secs << RANDOM_BITS) | low).max(1))
}

/// When `incarnation`'s directory was created, in seconds since 1970 (for log lines).
pub fn created_secs(incarnation: u64) -> u64 {
    incarnation >> RANDOM_BITS
}

/// How a peer's incarnation compares with the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// No record of this id before: it is recorded now.
    First,
    /// The recorded incarnation.
    Same,
    /// A newer incarnation than the record `was`: the peer's directory was replaced. The
    /// record is now the new one.
    Replaced {
        /// The incarnation recorded before.
        was: u64,
    },
}

/// A peer's incarnation older than the one recorded: refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retired {
    /// The newer incarnation that replaced it.
    pub newer: u64,
}

/// Stores the whole table (called with the lock held, so calls never race; it should be
/// quick: the table changes only when a peer is first seen or replaced).
pub type Save = dyn Fn(&BTreeMap<NodeId, u64>) -> std::io::Result<()> + Send + Sync;

/// The newest incarnation seen of each peer id. Cheap to clone (shared).
#[derive(Clone)]
pub struct Incarnations(Arc<Mutex<Table>>);

struct Table {
    seen: BTreeMap<NodeId, u64>,
    save: Option<Box<Save>>,
}

impl std::fmt::Debug for Incarnations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Incarnations")
            .field(&self.0.lock().seen)
            .finish()
    }
}

impl Default for Incarnations {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl Incarnations {
    /// An empty table kept only in memory (tests, and hosts without a data directory).
    pub fn in_memory() -> Self {
        Self::with_store(BTreeMap::new(), None)
    }

    /// A table starting from `seen` (what `save` stored last time), storing every change
    /// through `save`.
    pub fn with_store(seen: BTreeMap<NodeId, u64>, save: Option<Box<Save>>) -> Self {
        Incarnations(Arc::new(Mutex::new(Table { seen, save })))
    }

    /// The incarnation recorded for `peer`, if any.
    pub fn known(&self, peer: NodeId) -> Option<u64> {
        self.0.lock().seen.get(&peer).copied()
    }

    /// Applies the rule (module docs) to `peer` presenting `incarnation`, storing the record
    /// if it changes. An error to store it refuses the peer too (an unrecorded replacement
    /// could be forgotten at a restart), with the error.
    pub fn observe(&self, peer: NodeId, incarnation: u64) -> Result<Seen, Observed> {
        let mut table = self.0.lock();
        let seen = match table.seen.get(&peer).copied() {
            Some(known) if known == incarnation => return Ok(Seen::Same),
            Some(known) if known > incarnation => {
                return Err(Observed::Retired(Retired { newer: known }))
            }
            Some(was) => Seen::Replaced { was },
            None => Seen::First,
        };
        let before = table.seen.insert(peer, incarnation);
        if let Some(save) = &table.save {
            if let Err(e) = save(&table.seen) {
                match before {
                    Some(b) => table.seen.insert(peer, b),
                    None => table.seen.remove(&peer),
                };
                return Err(Observed::NotStored(e.to_string()));
            }
        }
        Ok(seen)
    }
}

/// Why [`Incarnations::observe`] refused a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Its incarnation is older than the record.
    Retired(Retired),
    /// The changed record could not be stored.
    NotStored(String),
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Observed::Retired(r) => write!(
                f,
                "its incarnation is older than {:#x} (created at {} s), which replaced it",
                r.newer,
                created_secs(r.newer)
            ),
            Observed::NotStored(e) => write!(f, "cannot store its incarnation: {e}"),
        }
    }
}

/// The table as text: one `id incarnation` line per peer.
pub fn encode(seen: &BTreeMap<NodeId, u64>) -> String {
    seen.iter()
        .map(|(id, inc)| format!("{id} {inc}\n"))
        .collect()
}

/// Parses [`encode`]'s text.
pub fn decode(text: &str) -> Result<BTreeMap<NodeId, u64>, String> {
    let mut seen = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .split_once(' ')
            .and_then(|(id, inc)| Some((id.parse().ok()?, inc.trim().parse().ok()?)));
        let Some((id, inc)) = parsed else {
            return Err(format!("line {}: `{line}` is not `id incarnation`", n + 1));
        };
        seen.insert(id, inc);
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_incarnation_wins_and_older_ones_are_refused() {
        let t = Incarnations::in_memory();
        assert_eq!(t.observe(2, 100), Ok(Seen::First));
        assert_eq!(t.observe(2, 100), Ok(Seen::Same));
        assert_eq!(t.observe(2, 200), Ok(Seen::Replaced { was: 100 }));
        assert_eq!(
            t.observe(2, 100),
            Err(Observed::Retired(Retired { newer: 200 }))
        );
        assert_eq!(t.known(2), Some(200));
        assert_eq!(t.observe(3, 50), Ok(Seen::First), "ids are independent");
    }

    #[test]
    fn every_change_is_stored_and_a_failed_store_changes_nothing() {
        let stored = Arc::new(Mutex::new(String::new()));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, f) = (stored.clone(), fail.clone());
        let t = Incarnations::with_store(
            BTreeMap::new(),
            Some(Box::new(move |seen| {
                if f.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(std::io::Error::other("disk full"));
                }
                *s.lock() = encode(seen);
                Ok(())
            })),
        );
        t.observe(1, 10).unwrap();
        t.observe(2, 20).unwrap();
        assert_eq!(
            decode(&stored.lock()).unwrap(),
            BTreeMap::from([(1, 10), (2, 20)])
        );
        fail.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(t.observe(2, 30), Err(Observed::NotStored(_))));
        assert_eq!(t.known(2), Some(20), "an unstored replacement is not taken");
        assert_eq!(t.observe(2, 20), Ok(Seen::Same));
    }

    #[test]
    fn minted_incarnations_order_by_creation_time() {
        let a = mint().unwrap();
        assert!(a > 0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(created_secs(a) <= now && created_secs(a) + 5 >= now);
        // One created a second later is newer whatever its random bits (here all 0).
        let later = (created_secs(a) + 1) << RANDOM_BITS;
        assert!(later > a);
        assert!(decode("1 5\nnonsense\n").is_err());
    }
}
