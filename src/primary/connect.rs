//! What a connecting source does with the target's hello answer: collect
//! the chunks the target changed itself, compare generation ids, and turn
//! the decision into a plan (or a refusal naming what the operator must do).

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::protocol::genid::{self, Decision, Side, SourceView, SplitBrainPolicy, TargetView};
use crate::protocol::{self, Frame, HelloAck, ReplicaState};
use crate::transport::stream::LinkError;

use super::state::PrimaryState;
use super::sync::next_control;

/// The plan for this connection.
#[derive(Clone, Debug)]
pub struct Plan {
    pub decision: Decision,
    /// Chunks this source changed that the target lacks (its bits).
    pub source_changed: u64,
    /// Chunks the target changed itself.
    pub target_changed: u64,
    /// Chunks to resync: the union of both.
    pub union: u64,
    /// The target's changed chunks as bitmap words (empty: none).
    pub target_words: Vec<u64>,
    /// The target lost a split brain: it keeps its chunks as a recovery
    /// point and steps down.
    pub takeover: bool,
}

impl Plan {
    /// One line for `--dry-run` and the log.
    pub fn describe(&self, volume: &str) -> String {
        let mut s = format!(
            "volume {volume}: {}; source changed {} chunks, target changed {}, resync {} chunks",
            self.decision.describe(),
            self.source_changed,
            self.target_changed,
            self.union
        );
        if let Decision::Full { reason } = &self.decision {
            s.push_str(&format!(" (full: {reason})"));
        }
        if self.takeover {
            s.push_str("; split brain resolved against the target (it keeps its changes as a recovery point)");
        }
        s
    }
}

/// Read the `ChangedBatch` frames that follow a hello answer with
/// `ack.changed > 0`.
pub async fn read_changed(
    ctl: &mut mpsc::Receiver<std::result::Result<Frame, LinkError>>,
    ack: &HelloAck,
    chunks: u64,
) -> Result<Vec<u64>> {
    if ack.changed == 0 {
        return Ok(Vec::new());
    }
    let words = chunks.div_ceil(64) as usize;
    let mut out: Vec<u64> = Vec::with_capacity(words);
    while out.len() < words {
        match next_control(ctl).await? {
            Frame::ChangedBatch {
                first_word,
                words: w,
            } => {
                if first_word != out.len() as u64 || out.len() + w.len() > words {
                    return Err(Error::Protocol(protocol::ProtocolError::Malformed {
                        kind: "ChangedBatch",
                        reason: format!(
                            "batch at word {first_word} with {} words, expected word {} of {words}",
                            w.len(),
                            out.len()
                        ),
                    }));
                }
                out.extend_from_slice(&w);
            }
            other => {
                return Err(Error::unexpected(
                    &other,
                    "collecting the mirror's changed chunks",
                ))
            }
        }
    }
    if let Some(last) = out.last_mut() {
        let tail = chunks % 64;
        if tail != 0 {
            *last &= (1u64 << tail) - 1;
        }
    }
    Ok(out)
}

/// Decide and plan from the primary's state. `untracked`: a one-shot sync
/// (the source's writes were not watched). Refusals are `Error::Refused`
/// with the reason and the way out (`Error::Other`).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    st: &PrimaryState,
    slot: usize,
    fingerprint: &str,
    volume: &str,
    ack: &HelloAck,
    target_words: Vec<u64>,
    untracked: bool,
    policy: SplitBrainPolicy,
) -> Result<Plan> {
    let source_bits: Vec<u64> = (0..st.bitmap.word_count())
        .map(|w| st.bitmap.word(slot, w))
        .collect();
    let s = SourceView {
        gen: st.vol.gen(),
        shared: st.peer(fingerprint).map_or(0, |r| r.generation),
        changed: 0,
        untracked,
    };
    plan_from(
        s,
        &source_bits,
        st.vol.primary_since_unix,
        volume,
        ack,
        target_words,
        policy,
    )
}

/// Decide and plan from raw inputs: `s.changed` is computed from
/// `source_bits` (the source's bitmap words for this peer).
pub fn plan_from(
    mut s: SourceView,
    source_bits: &[u64],
    primary_since_unix: u64,
    volume: &str,
    ack: &HelloAck,
    target_words: Vec<u64>,
    policy: SplitBrainPolicy,
) -> Result<Plan> {
    let source_changed: u64 = source_bits.iter().map(|w| w.count_ones() as u64).sum();
    let target_changed: u64 = target_words.iter().map(|w| w.count_ones() as u64).sum();
    let union: u64 = source_bits
        .iter()
        .enumerate()
        .map(|(w, &b)| (b | target_words.get(w).copied().unwrap_or(0)).count_ones() as u64)
        .sum();
    s.changed = source_changed;
    let t = TargetView {
        gen: ack.gen,
        changed: target_changed,
        primary: ack.primary,
        empty: ack.created || ack.state == ReplicaState::New,
        promoted_unix: ack.promoted_unix,
    };
    let decision = genid::decide(&s, &t);
    let mut p = Plan {
        decision: decision.clone(),
        source_changed,
        target_changed,
        union,
        target_words,
        takeover: false,
    };
    match decision {
        Decision::TargetAhead { full } => Err(Error::Other(format!(
            "{}: the mirror's copy of '{volume}' is newer than this node's (it was promoted and written: generation {:016x} after {:016x}). \
             Do not write here: make this node a secondary with `blkmirror demote`, serve it, and replicate from the peer ({} sync, {} chunks)",
            p.describe(volume),
            ack.gen.current,
            ack.gen.bitmap,
            if full { "full" } else { "bitmap" },
            target_changed
        ))),
        Decision::SplitBrain => {
            match genid::split_brain_loser(policy, source_changed, primary_since_unix, &t) {
                None => Err(Error::Other(format!(
                    "split brain on '{volume}': both sides wrote since they parted (this node changed {source_changed} chunks, \
                     the mirror {target_changed}); disconnecting (policy disconnect). Choose a side with \
                     --after-split-brain discard-younger|discard-least-changes, or demote this node"
                ))),
                Some(Side::Source) => Err(Error::Other(format!(
                    "split brain on '{volume}': policy {policy:?} discards THIS node's changes ({source_changed} chunks; \
                     the mirror changed {target_changed}). Make this node a secondary with `blkmirror demote` (its changes \
                     are kept as a recovery point when the peer resyncs it)"
                ))),
                Some(Side::Target) => {
                    tracing::warn!(
                        volume,
                        source_changed,
                        target_changed,
                        "split brain: policy {policy:?} discards the mirror's changes (kept there as a recovery point)"
                    );
                    p.takeover = true;
                    Ok(p)
                }
            }
        }
        _ => Ok(p),
    }
}

/// Tell the mirror it lost the split brain and wait until it has kept its
/// changes and stepped down.
pub async fn take_over(
    ctl_tx: &mut crate::transport::stream::FrameSender,
    ctl: &mut mpsc::Receiver<std::result::Result<Frame, LinkError>>,
) -> Result<()> {
    ctl_tx
        .send(&Frame::Takeover)
        .await
        .map_err(super::sync::link_err)?;
    match tokio::time::timeout(std::time::Duration::from_secs(60), next_control(ctl)).await {
        Err(_) => Err(Error::ConnectionLost(
            "mirror did not confirm the takeover within 60 s".into(),
        )),
        Ok(Ok(Frame::Takeover)) => Ok(()),
        Ok(Ok(other)) => Err(Error::unexpected(
            &other,
            "waiting for the takeover confirmation",
        )),
        Ok(Err(e)) => Err(e),
    }
}
