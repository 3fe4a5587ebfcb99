//! Generation identifiers and the connect-time decision (pure, no I/O).
//!
//! As in DRBD, every volume carries on each node a *current* generation id
//! (which state of the data it holds), a *bitmap* id (the state both sides
//! shared when this node started to diverge: its bitmap tracks the chunks
//! changed since) and a short *history* of older ids.
//!
//! * A completed sync or resync gives the target the source's current id.
//! * A primary that keeps writing after losing its mirror (`continue`), and
//!   a replica promoted to primary, start a new current id; the old one
//!   becomes the bitmap id.
//!
//! The side that connects (the one running `replicate` or `sync`, the
//! *source*) compares its ids with the target's and decides with
//! [`decide`].

/// How many older ids are kept.
pub const HISTORY_LEN: usize = 2;

/// Generation ids of one volume on one node. 0 means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; HISTORY_LEN],
}

impl GenIds {
    /// Start a new current id (`fresh`, non-zero): the old current becomes
    /// the bitmap id unless one is already set (still diverging from the same
    /// split), and enters the history.
    pub fn rotate(&mut self, fresh: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        }
        self.push_history(self.current);
        self.current = fresh;
    }

    /// The node now holds state `current` shared with its peer (a sync or
    /// resync completed): the bitmap id is retired.
    pub fn synced(&mut self, current: u64) {
        if self.current != current {
            self.push_history(self.current);
        }
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
        }
        self.current = current;
        self.bitmap = 0;
    }

    fn push_history(&mut self, id: u64) {
        if id == 0 || self.history.contains(&id) {
            return;
        }
        for k in (1..HISTORY_LEN).rev() {
            self.history[k] = self.history[k - 1];
        }
        self.history[0] = id;
    }

    pub fn knows(&self, id: u64) -> bool {
        id != 0 && (self.current == id || self.bitmap == id || self.history.contains(&id))
    }
}

/// What the source knows at connect time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceView {
    pub gen: GenIds,
    /// The id both sides held when the source was last in sync with this
    /// target (0: never).
    pub shared: u64,
    /// Chunks the source changed that the target may lack (its bits).
    pub changed: u64,
    /// The source's writes were not tracked (a one-shot `sync`): it may have
    /// changed anything since it was last in sync.
    pub untracked: bool,
}

/// What the target reported in its hello answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetView {
    pub gen: GenIds,
    /// Chunks the target wrote itself since it parted (an old primary's
    /// unreplicated writes, or a promoted replica's new writes).
    pub changed: u64,
    /// The target was promoted and has not been demoted since.
    pub primary: bool,
    /// The target holds nothing yet (new, or never completed a sync).
    pub empty: bool,
    /// Unix time the target became primary (promotion), 0 if never.
    pub promoted_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same data on both sides; nothing to resync.
    InSync,
    /// Bitmap resync from source to target of `source_changed ∪
    /// target_changed` chunks (the count of the union is computed by the
    /// caller, who holds both bitmaps). `target_diverged`: the target has
    /// writes of its own, kept as a recovery point before they are
    /// overwritten.
    Resync { target_diverged: bool },
    /// Full sync from source to target: no bitmap covers the difference.
    Full { reason: String },
    /// The target holds newer data than the source: the direction must be
    /// reversed (demote this side, replicate from the peer).
    TargetAhead { full: bool },
    /// Both sides wrote since they parted.
    SplitBrain,
}

impl Decision {
    pub fn describe(&self) -> &'static str {
        match self {
            Decision::InSync => "in sync",
            Decision::Resync { .. } => "bitmap resync to the peer",
            Decision::Full { .. } => "full sync to the peer",
            Decision::TargetAhead { full: false } => "bitmap resync from the peer (it is newer)",
            Decision::TargetAhead { full: true } => "full sync from the peer (it is newer)",
            Decision::SplitBrain => "split brain",
        }
    }
}

/// Decide what a connect between `s` (source) and `t` (target) must do.
pub fn decide(s: &SourceView, t: &TargetView) -> Decision {
    if t.empty || t.gen.current == 0 {
        return Decision::Full {
            reason: "the replica has never completed a sync".into(),
        };
    }
    let source_moved = s.changed > 0 || s.untracked || (s.shared != 0 && s.gen.current != s.shared);
    // The target is where the source left it (same state, or the state
    // both shared when they parted) and was not promoted since.
    let target_unmoved = !t.primary
        && (t.gen.current == s.gen.current || (s.shared != 0 && t.gen.current == s.shared));
    if target_unmoved {
        if t.gen.current == s.gen.current && !source_moved && t.changed == 0 {
            return Decision::InSync;
        }
        return Decision::Resync {
            target_diverged: t.changed > 0,
        };
    }
    // The target moved on from a state the source knows.
    let split_from_us = t.gen.bitmap != 0
        && (t.gen.bitmap == s.gen.current || (s.shared != 0 && t.gen.bitmap == s.shared));
    if split_from_us {
        if t.gen.bitmap == s.gen.current && !source_moved {
            return Decision::TargetAhead { full: false };
        }
        return Decision::SplitBrain;
    }
    if t.gen.knows(s.gen.current) || t.gen.history.contains(&s.shared) && s.shared != 0 {
        // The target went through our current state and beyond, and its
        // bitmap no longer covers it.
        if !source_moved {
            return Decision::TargetAhead { full: true };
        }
        return Decision::SplitBrain;
    }
    if s.gen.knows(t.gen.current) {
        return Decision::Full {
            reason: format!(
                "the replica holds an older state (generation {:016x}) that no bitmap covers",
                t.gen.current
            ),
        };
    }
    Decision::Full {
        reason: format!(
            "the replica's generation {:016x} is unrelated to this volume's history",
            t.gen.current
        ),
    }
}

/// Split-brain policy of the connecting side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Refuse to connect; both sides keep their data.
    Disconnect,
    /// The side that became primary later loses its changes.
    DiscardYounger,
    /// The side with fewer changed chunks loses its changes.
    DiscardLeastChanges,
}

/// Which side loses a split brain under `policy`, or `None` (disconnect).
/// `source_primary_since`: unix time the source became primary.
pub fn split_brain_loser(
    policy: SplitBrainPolicy,
    source_changed: u64,
    source_primary_since: u64,
    t: &TargetView,
) -> Option<Side> {
    match policy {
        SplitBrainPolicy::Disconnect => None,
        SplitBrainPolicy::DiscardYounger => {
            if t.promoted_unix >= source_primary_since {
                Some(Side::Target)
            } else {
                Some(Side::Source)
            }
        }
        SplitBrainPolicy::DiscardLeastChanges => {
            if t.changed < source_changed
                || (t.changed == source_changed && t.promoted_unix >= source_primary_since)
            {
                Some(Side::Target)
            } else {
                Some(Side::Source)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(current: u64, bitmap: u64) -> GenIds {
        GenIds {
            current,
            bitmap,
            history: [0; HISTORY_LEN],
        }
    }

    #[test]
    fn rotate_and_sync_keep_the_lineage() {
        let mut a = g(10, 0);
        a.rotate(11);
        assert_eq!((a.current, a.bitmap), (11, 10));
        a.rotate(12); // still diverging from 10
        assert_eq!((a.current, a.bitmap), (12, 10));
        assert!(a.knows(11) && a.knows(10));
        a.synced(12);
        assert_eq!((a.current, a.bitmap), (12, 0));
        assert!(a.knows(10));
        let mut b = g(10, 0);
        b.synced(12);
        assert_eq!(b.history[0], 10);
    }

    fn src(current: u64, shared: u64, changed: u64) -> SourceView {
        SourceView {
            gen: g(current, 0),
            shared,
            changed,
            untracked: false,
        }
    }

    fn tgt(current: u64, bitmap: u64, changed: u64, primary: bool) -> TargetView {
        TargetView {
            gen: g(current, bitmap),
            changed,
            primary,
            empty: false,
            promoted_unix: if primary { 100 } else { 0 },
        }
    }

    #[test]
    fn decisions() {
        // Same state, nothing changed.
        assert_eq!(
            decide(&src(5, 5, 0), &tgt(5, 0, 0, false)),
            Decision::InSync
        );
        // Source wrote (tracked bits), target untouched.
        assert_eq!(
            decide(&src(5, 5, 3), &tgt(5, 0, 0, false)),
            Decision::Resync {
                target_diverged: false
            }
        );
        // Source rotated while disconnected.
        assert_eq!(
            decide(&src(6, 5, 3), &tgt(5, 0, 0, false)),
            Decision::Resync {
                target_diverged: false
            }
        );
        // Failback: the new primary (promoted from 5 to 7) meets the old
        // primary that crashed with unreplicated writes (still at 5).
        assert_eq!(
            decide(&src(7, 5, 4), &tgt(5, 0, 2, false)),
            Decision::Resync {
                target_diverged: true
            }
        );
        // The target was promoted; the source did nothing since: reverse.
        assert_eq!(
            decide(&src(5, 5, 0), &tgt(7, 5, 4, true)),
            Decision::TargetAhead { full: false }
        );
        // Both wrote: split brain.
        assert_eq!(
            decide(&src(6, 5, 3), &tgt(7, 5, 4, true)),
            Decision::SplitBrain
        );
        assert_eq!(
            decide(&src(5, 5, 1), &tgt(7, 5, 4, true)),
            Decision::SplitBrain
        );
        // An untracked source (one-shot sync) may have changed anything.
        let mut s = src(5, 5, 0);
        s.untracked = true;
        assert_eq!(decide(&s, &tgt(7, 5, 0, true)), Decision::SplitBrain);
        assert_eq!(
            decide(&s, &tgt(5, 0, 0, false)),
            Decision::Resync {
                target_diverged: false
            }
        );
        // Empty or unrelated targets need a full sync.
        let mut e = tgt(0, 0, 0, false);
        e.empty = true;
        assert!(matches!(decide(&src(5, 5, 0), &e), Decision::Full { .. }));
        assert!(matches!(
            decide(&src(5, 5, 0), &tgt(99, 0, 0, false)),
            Decision::Full { .. }
        ));
        // The target holds an ancestor the source knows from its history.
        let mut s = src(9, 8, 0);
        s.gen.history = [5, 0];
        assert!(matches!(
            decide(&s, &tgt(5, 0, 0, false)),
            Decision::Full { .. }
        ));
        // The target went beyond our state and its bitmap no longer covers it.
        let mut t = tgt(12, 11, 0, true);
        t.gen.history = [5, 0];
        assert_eq!(
            decide(&src(5, 5, 0), &t),
            Decision::TargetAhead { full: true }
        );
    }

    #[test]
    fn split_brain_policies() {
        let t = tgt(7, 5, 4, true); // promoted at 100, 4 chunks changed
        assert_eq!(
            split_brain_loser(SplitBrainPolicy::Disconnect, 3, 50, &t),
            None
        );
        assert_eq!(
            split_brain_loser(SplitBrainPolicy::DiscardYounger, 3, 50, &t),
            Some(Side::Target)
        );
        assert_eq!(
            split_brain_loser(SplitBrainPolicy::DiscardYounger, 3, 200, &t),
            Some(Side::Source)
        );
        assert_eq!(
            split_brain_loser(SplitBrainPolicy::DiscardLeastChanges, 3, 50, &t),
            Some(Side::Source)
        );
        assert_eq!(
            split_brain_loser(SplitBrainPolicy::DiscardLeastChanges, 9, 50, &t),
            Some(Side::Target)
        );
    }

    /// A model of two nodes running through random failovers, failbacks,
    /// crashes and split brains, as the commands do it (promote rotates,
    /// a primary writing on without its mirror rotates, a completed resync
    /// gives the target the source's id). Whatever `decide` says must never
    /// lose data silently: an in-sync pair holds the same writes, a bitmap
    /// resync covers every difference with one side's tracked changes, and
    /// a reversed direction only happens when the source has nothing the
    /// target lacks.
    #[test]
    fn model_failovers_never_lose_data_silently() {
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeSet;

        #[derive(Clone, Default)]
        struct Node {
            data: BTreeSet<u64>,
            gen: GenIds,
            primary: bool,
            /// The id shared with the peer when last in sync (primary state).
            shared: u64,
            /// Writes of this node the peer may lack (bits / NAME.changed).
            own: BTreeSet<u64>,
            since: u64,
            promoted: u64,
            empty: bool,
        }
        let mut fresh = 1000u64;
        let next = |f: &mut u64| {
            *f += 1;
            *f
        };
        let mut decisions = std::collections::HashMap::new();
        for seed in 0..400u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut n = [Node::default(), Node::default()];
            n[0].primary = true;
            n[0].gen.current = next(&mut fresh);
            n[0].since = 1;
            n[1].empty = true;
            let mut connected = false;
            let mut w = 0u64;
            let mut clock = 10u64;
            for _step in 0..60 {
                clock += 1;
                match rng.gen_range(0..100) {
                    // A write on a primary.
                    0..=39 => {
                        let i = rng.gen_range(0..2);
                        if !n[i].primary {
                            continue;
                        }
                        w += 1;
                        n[i].data.insert(w);
                        if connected
                            && n[1 - i].gen.current == n[i].gen.current
                            && !n[1 - i].primary
                        {
                            // Live and in sync: the mirror has it too.
                            n[1 - i].data.insert(w);
                        } else {
                            n[i].own.insert(w);
                        }
                    }
                    // The link goes down: a primary writing on (continue)
                    // starts a new generation.
                    40..=49 => {
                        if connected {
                            connected = false;
                            for x in n.iter_mut() {
                                if x.primary && x.gen.current == x.shared {
                                    let f = next(&mut fresh);
                                    x.gen.rotate(f);
                                }
                            }
                        }
                    }
                    // A primary crashes (no rotation): the link is gone.
                    50..=54 => connected = false,
                    // Promote the secondary (the other side is gone or not).
                    55..=64 => {
                        let i = rng.gen_range(0..2);
                        if n[i].primary || n[i].empty || connected {
                            continue;
                        }
                        let prev = n[i].gen.current;
                        let f = next(&mut fresh);
                        n[i].gen.rotate(f);
                        n[i].primary = true;
                        n[i].shared = prev;
                        n[i].own.clear();
                        n[i].promoted = clock;
                        n[i].since = clock;
                    }
                    // Demote a primary when the other one is primary too.
                    65..=69 => {
                        let i = rng.gen_range(0..2);
                        if n[i].primary && n[1 - i].primary && !connected {
                            n[i].primary = false;
                            n[i].promoted = 0;
                        }
                    }
                    // A primary connects to the other node.
                    _ => {
                        let s = rng.gen_range(0..2);
                        let t = 1 - s;
                        if !n[s].primary || connected {
                            continue;
                        }
                        let sv = SourceView {
                            gen: n[s].gen,
                            shared: n[s].shared,
                            changed: n[s].own.len() as u64,
                            untracked: false,
                        };
                        let tv = TargetView {
                            gen: n[t].gen,
                            changed: n[t].own.len() as u64,
                            primary: n[t].primary,
                            empty: n[t].empty,
                            promoted_unix: n[t].promoted,
                        };
                        let d = decide(&sv, &tv);
                        *decisions.entry(d.describe()).or_insert(0u32) += 1;
                        let (a, b) = (n[s].clone(), n[t].clone());
                        let only_s: BTreeSet<u64> = a.data.difference(&b.data).copied().collect();
                        let only_t: BTreeSet<u64> = b.data.difference(&a.data).copied().collect();
                        let resync_to_target = match &d {
                            Decision::InSync => {
                                assert!(
                                    only_s.is_empty() && only_t.is_empty(),
                                    "seed {seed}: in sync but the data differ"
                                );
                                true
                            }
                            Decision::Resync { target_diverged } => {
                                assert!(
                                    only_t.is_subset(&b.own),
                                    "seed {seed}: a resync would overwrite untracked target writes {only_t:?}"
                                );
                                assert!(
                                    only_s.iter().all(|x| a.own.contains(x) || b.own.contains(x)),
                                    "seed {seed}: the union of the bitmaps misses source writes {only_s:?}"
                                );
                                assert_eq!(*target_diverged, !b.own.is_empty());
                                true
                            }
                            Decision::TargetAhead { .. } => {
                                assert!(
                                    only_s.is_empty(),
                                    "seed {seed}: the source would lose {only_s:?}"
                                );
                                false
                            }
                            Decision::SplitBrain => {
                                // The policy decides; here the target loses
                                // (kept as a recovery point) half the time.
                                rng.gen_bool(0.5)
                            }
                            Decision::Full { .. } => true,
                        };
                        if resync_to_target {
                            n[t].data = a.data.clone();
                            n[t].gen.synced(a.gen.current);
                            n[t].own.clear();
                            n[t].primary = false;
                            n[t].promoted = 0;
                            n[t].empty = false;
                            n[s].own.clear();
                            n[s].shared = a.gen.current;
                            connected = true;
                        }
                    }
                }
            }
        }
        // Every kind of decision came up.
        for kind in [
            "in sync",
            "bitmap resync to the peer",
            "full sync to the peer",
            "bitmap resync from the peer (it is newer)",
            "split brain",
        ] {
            assert!(
                decisions.get(kind).copied().unwrap_or(0) > 0,
                "{kind} never decided: {decisions:?}"
            );
        }
    }
}
