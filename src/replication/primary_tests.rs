use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::protocol::{open_chunk, seal_chunk, Encoding};

const CB: u32 = 4096;
const CHUNKS: u64 = 200;
const VB: u64 = CB as u64 * CHUNKS - 1536;

fn core(mode: Mode, queue: u64) -> LiveCore {
    core_rate(mode, queue, 0)
}

fn core_rate(mode: Mode, queue: u64, resync_rate: u64) -> LiveCore {
    let mut b = Bitmap::new(crate::config::chunk_count(VB, CB));
    let slot = b.peer_slot(&[7; 32]).unwrap();
    for i in 0..b.chunks() {
        b.clear(slot, i);
    }
    LiveCore::new(
        CoreConfig {
            volume_bytes: VB,
            chunk_bytes: CB,
            mode,
            on_disconnect: OnDisconnect::Continue,
            queue_bytes_max: queue,
            suspend_timeout: Duration::from_secs(1),
            resync_rate,
        },
        b,
        slot,
    )
}

fn t(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[test]
fn write_intent_is_persisted_once_per_word() {
    let mut c = core(Mode::Sync, 1 << 20);
    let p = c.prepare(3, 4);
    assert!(p.wait_batch > 0);
    // Another chunk of the same word waits for the same batch.
    assert_eq!(c.prepare(10, 10).wait_batch, p.wait_batch);
    let (b, words) = c.take_batch().unwrap();
    assert_eq!(b, p.wait_batch);
    assert_eq!(words, vec![0]);
    assert!(!c.batch_is_durable(b));
    c.batch_durable(b);
    assert!(c.batch_is_durable(b));
    // Now the word is on disk: no metadata I/O for any chunk of it.
    assert_eq!(c.prepare(60, 63).wait_batch, 0);
    assert!(c.take_batch().is_none());
    // A chunk in another word needs a new batch.
    assert!(c.prepare(64, 64).wait_batch > b);
    assert_eq!(c.dirty_count(), 2 + 1 + 4 + 1);
}

#[test]
fn overlapping_operations_are_serialised() {
    let mut c = core(Mode::Async, 1 << 20);
    let a = c.try_lock(0, 4096).unwrap();
    assert!(c.try_lock(4095, 8192).is_none());
    let b = c.try_lock(4096, 8192).unwrap();
    c.unlock(a);
    assert!(c.try_lock(0, 10).is_some());
    c.unlock(b);
}

#[test]
fn acks_clear_bits_only_for_the_latest_send() {
    let mut c = core(Mode::Sync, 1 << 20);
    c.on_connected(ReplicaState::UpToDate);
    assert_eq!(c.next_resync(t(0)), None); // nothing dirty: InSync at once
    let insync = match c.poll_outbox() {
        Some(Frame::InSync { seq, .. }) => seq,
        other => panic!("{other:?}"),
    };
    c.on_ack(insync, ReplicaState::UpToDate).unwrap();
    assert_eq!(c.covered(), insync);
    c.prepare(0, 0);
    let d = Bytes::from(vec![1u8; 100]);
    let s1 = c.send_write(0, &d, crate::protocol::digest(&d), false, t(1));
    c.prepare(0, 0);
    let s2 = c.send_write(50, &d, crate::protocol::digest(&d), false, t(2));
    let (Sent::Queued(a), Sent::Queued(b)) = (s1, s2) else {
        panic!("{s1:?} {s2:?}")
    };
    c.on_ack(a, ReplicaState::UpToDate).unwrap();
    assert!(
        c.is_dirty(0),
        "a later write to the chunk is not yet durable"
    );
    assert_eq!(c.covered(), a);
    c.on_ack(b, ReplicaState::UpToDate).unwrap();
    assert!(!c.is_dirty(0));
    assert_eq!(c.covered(), b);
    // Acks outside the sent range are protocol errors.
    assert!(c.on_ack(b + 5, ReplicaState::UpToDate).is_err());
    assert!(c.on_ack(a, ReplicaState::UpToDate).is_err());
}

/// `Applied` frees the queue but leaves the chunks dirty until `Ack`;
/// reports out of order or beyond what was sent are protocol errors.
#[test]
fn applied_frees_the_queue_and_ack_clears_the_bits() {
    let mut c = core(Mode::Async, 3 * (CB as u64 + 64));
    c.on_connected(ReplicaState::UpToDate);
    assert_eq!(c.next_resync(t(0)), None); // nothing dirty: InSync at once
    let insync = match c.poll_outbox() {
        Some(Frame::InSync { seq, .. }) => seq,
        other => panic!("{other:?}"),
    };
    c.on_ack(insync, ReplicaState::UpToDate).unwrap();
    let data = Bytes::from(vec![7u8; CB as usize]);
    let d = crate::protocol::digest(&data);
    let mut seqs = Vec::new();
    for i in 0..3u64 {
        c.prepare(i, i);
        match c.send_write(i * CB as u64, &data, d, false, t(1)) {
            Sent::Queued(s) => seqs.push(s),
            other => panic!("write {i}: {other:?}"),
        }
    }
    // The queue is full: the next write would pull ahead.
    assert!(!c.room(CB as u64));
    c.on_applied(seqs[1]).unwrap();
    assert!(c.room(CB as u64), "two frames applied: room again");
    assert!(c.is_dirty(0) && c.is_dirty(1) && c.is_dirty(2));
    assert!(c.on_applied(seqs[0]).is_err(), "backwards");
    assert!(c.on_applied(seqs[2] + 1).is_err(), "never sent");
    c.on_ack(seqs[2], ReplicaState::UpToDate).unwrap();
    assert!(!c.is_dirty(0) && !c.is_dirty(1) && !c.is_dirty(2));
    assert_eq!(c.status(t(2)).queued_bytes, 0);
}

#[test]
fn async_pull_ahead_then_resync() {
    let mut c = core(Mode::Async, 3000);
    c.on_connected(ReplicaState::UpToDate);
    c.next_resync(t(0));
    let Some(Frame::InSync { seq, .. }) = c.poll_outbox() else {
        panic!()
    };
    c.on_ack(seq, ReplicaState::UpToDate).unwrap();
    let d = Bytes::from(vec![9u8; 2048]);
    c.prepare(0, 0);
    assert!(matches!(
        c.send_write(0, &d, crate::protocol::digest(&d), false, t(1)),
        Sent::Queued(_)
    ));
    c.prepare(1, 1);
    // Queue full: the write is only marked.
    let s = c.send_write(4096, &d, crate::protocol::digest(&d), false, t(2));
    assert!(matches!(s, Sent::Skipped { .. }), "{s:?}");
    assert_eq!(c.status(t(2)).phase, Phase::Behind);
    // Later writes are marked too until the resync starts.
    c.prepare(5, 5);
    assert!(matches!(
        c.send_write(
            5 * 4096,
            &Bytes::from(vec![1u8; 10]),
            crate::protocol::digest(&Bytes::from(vec![1u8; 10])),
            false,
            t(3)
        ),
        Sent::Skipped { .. }
    ));
    // Not drained enough yet.
    assert_eq!(c.next_resync(t(3)), None);
    let w = match c.poll_outbox() {
        Some(Frame::Write(w)) => w.seq,
        other => panic!("{other:?}"),
    };
    c.on_ack(w, ReplicaState::UpToDate).unwrap();
    let claim = c.next_resync(t(4)).unwrap();
    assert_eq!(claim.chunk, 1);
    assert!(matches!(c.poll_outbox(), Some(Frame::StartResync { .. })));
    assert_eq!(c.status(t(4)).resync_total, 2);
    assert!(c.needs_resync(&claim));
    c.release_resync(claim);
}

#[test]
fn sync_mode_waits_for_room_instead_of_skipping() {
    let mut c = core(Mode::Sync, 3000);
    c.on_connected(ReplicaState::UpToDate);
    c.next_resync(t(0));
    let d = Bytes::from(vec![9u8; 2048]);
    c.prepare(0, 0);
    assert!(matches!(
        c.send_write(0, &d, crate::protocol::digest(&d), false, t(1)),
        Sent::Queued(_)
    ));
    c.prepare(1, 1);
    assert_eq!(
        c.send_write(4096, &d, crate::protocol::digest(&d), false, t(1)),
        Sent::Full
    );
}

#[test]
fn disconnect_keeps_bits_and_covered_waits_for_insync() {
    let mut c = core(Mode::Sync, 1 << 20);
    c.on_connected(ReplicaState::UpToDate);
    c.next_resync(t(0));
    let Some(Frame::InSync { seq, .. }) = c.poll_outbox() else {
        panic!()
    };
    c.on_ack(seq, ReplicaState::UpToDate).unwrap();
    let d = Bytes::from(vec![3u8; 10]);
    c.prepare(2, 2);
    let Sent::Queued(w) = c.send_write(2 * 4096, &d, crate::protocol::digest(&d), false, t(1))
    else {
        panic!()
    };
    c.on_disconnected(t(2));
    assert!(c.is_dirty(2));
    c.prepare(3, 3);
    let Sent::Skipped { target } =
        c.send_write(3 * 4096, &d, crate::protocol::digest(&d), false, t(3))
    else {
        panic!()
    };
    assert!(target > w);
    assert!(c.covered() < w);
    c.on_connected(ReplicaState::UpToDate);
    let claim = c.next_resync(t(4)).unwrap();
    assert_eq!(claim.chunk, 2);
    assert!(matches!(c.poll_outbox(), Some(Frame::StartResync { .. })));
    c.release_resync(claim);
}

/// The mirror as the simulation sees it: applies frames in order.
struct SimMirror {
    data: Vec<u8>,
    state: ReplicaState,
    applied: u64,
}

impl SimMirror {
    fn apply(&mut self, f: &Frame, snaps: &HashMap<u64, u128>) {
        let seq = f.live_seq().unwrap();
        if std::env::var("SIM_TRACE").is_ok() {
            let what = match f {
                Frame::Write(w) => format!("write {}+{}", w.offset, w.raw_len),
                Frame::ZeroRange { offset, len, .. } => format!("zero {offset}+{len}"),
                Frame::LiveChunk { chunk, .. } => format!("chunk {}", chunk.index),
                other => other.name().to_string(),
            };
            eprintln!("  mirror applies {seq}: {what}");
        }
        assert!(seq > self.applied, "sequence {seq} after {}", self.applied);
        self.applied = seq;
        match f {
            Frame::Write(w) => {
                let o = w.offset as usize;
                self.data[o..o + w.payload.len()].copy_from_slice(&w.payload);
            }
            Frame::ZeroRange { offset, len, .. } => {
                let o = *offset as usize;
                self.data[o..o + *len as usize].fill(0);
            }
            Frame::LiveChunk { chunk, .. } => {
                assert_ne!(
                    self.state,
                    ReplicaState::UpToDate,
                    "resync chunk while consistent"
                );
                let mut buf = vec![0u8; CB as usize];
                let n = open_chunk(chunk, VB, CB, &mut buf).unwrap();
                let o = (chunk.index * CB as u64) as usize;
                self.data[o..o + n].copy_from_slice(&buf[..n]);
            }
            Frame::StartResync { .. } => self.state = ReplicaState::Inconsistent,
            Frame::InSync { .. } => self.state = ReplicaState::UpToDate,
            Frame::Flush { .. } | Frame::LiveEnd { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        // Crash consistency: while the replica claims to be consistent, it
        // equals the primary's device as of this sequence number.
        if self.state == ReplicaState::UpToDate {
            let want = snaps.get(&seq).copied();
            assert_eq!(
                Some(crate::protocol::digest(&self.data)),
                want,
                "replica at seq {seq} ({}) is not a state the primary passed through",
                f.name()
            );
        }
    }
}

fn simulate(seed: u64, mode: Mode) {
    let trace = std::env::var("SIM_TRACE").is_ok();
    let mut rng = StdRng::seed_from_u64(seed);
    let queue = [3000u64, 20_000, 1 << 20][rng.gen_range(0..3)];
    // No resync rate, a chunk per step (ms), or one every 4 steps.
    let rate = [0u64, 0, CB as u64 * 1000, CB as u64 * 250][rng.gen_range(0..4)];
    let mut c = core_rate(mode, queue, rate);
    let mut dev = vec![0u8; VB as usize];
    let mut m = SimMirror {
        data: dev.clone(),
        state: ReplicaState::UpToDate,
        applied: 0,
    };
    let mut snaps: HashMap<u64, u128> = HashMap::new();
    let mut wire: Vec<Frame> = Vec::new();
    let mut acks: Vec<(u64, ReplicaState)> = Vec::new();
    let mut claims: Vec<ResyncClaim> = Vec::new();
    let zero = crate::protocol::digest(&[0u8; CB as usize]);
    let zero_tail = crate::protocol::digest(&vec![0u8; (VB % CB as u64) as usize]);
    let mut now = 0u64;
    c.on_connected(ReplicaState::UpToDate);
    // Snapshot helper: record the device digest for every seq assigned by an op.
    macro_rules! snap_new {
        ($before:expr) => {{
            let d = crate::protocol::digest(&dev);
            for s in $before..c.next_seq() {
                snaps.insert(s, d);
            }
        }};
    }
    for step in 0..400 {
        now += 1;
        let r = rng.gen_range(0..100);
        if trace {
            eprintln!(
                "step {step} r {r} next_seq {} connected {} phase {:?} mirror {:?}/{}",
                c.next_seq(),
                c.connected(),
                c.status(t(now)).phase,
                m.state,
                m.applied
            );
        }
        if r < 35 {
            // A write (or zero range) from the NBD side.
            let off = rng.gen_range(0..VB - 1);
            let len = rng.gen_range(1..=(VB - off).min(3 * CB as u64));
            let op = c
                .try_lock(off, off + len)
                .expect("sequential ops never conflict");
            let (f, l) = c.chunk_range(off, len);
            let p = c.prepare(f, l);
            if p.wait_batch > 0 {
                let (b, _) = c.take_batch().unwrap();
                c.batch_durable(b);
            }
            assert!(c.batch_is_durable(p.wait_batch));
            let before = c.next_seq();
            let zero_op = rng.gen_bool(0.15);
            let data: Vec<u8> = if zero_op {
                vec![0; len as usize]
            } else {
                let v: u8 = rng.gen();
                (0..len).map(|i| v.wrapping_add(i as u8)).collect()
            };
            let sent = loop {
                let s = if zero_op {
                    c.send_zero(off, len, false, t(now))
                } else {
                    c.send_write(
                        off,
                        &Bytes::from(data.clone()),
                        crate::protocol::digest(&Bytes::from(data.clone())),
                        false,
                        t(now),
                    )
                };
                if s != Sent::Full {
                    break s;
                }
                // Sync mode backpressure: let the mirror catch up.
                while let Some(fr) = c.poll_outbox() {
                    wire.push(fr);
                }
                for fr in wire.drain(..) {
                    m.apply(&fr, &snaps);
                }
                if trace {
                    eprintln!(
                        "  full-loop ack {} dirty5 {} stale5 {}",
                        m.applied,
                        c.is_dirty(5),
                        bit(&c.stale, 5)
                    );
                }
                c.on_ack(m.applied, m.state).unwrap();
                acks.clear();
            };
            dev[off as usize..(off + len) as usize].copy_from_slice(&data);
            if trace {
                eprintln!("  op chunks {f}..={l} zero {zero_op} -> {sent:?}");
            }
            snap_new!(before);
            c.unlock(op);
            assert!(sent.target().is_some());
        } else if r < 42 {
            let before = c.next_seq();
            c.send_flush(t(now));
            snap_new!(before);
        } else if r < 52 {
            // A resync reader claims a chunk (several may be out at once,
            // across writes, disconnects and reconnects).
            let before = c.next_seq();
            if let Some(claim) = c.next_resync(t(now)) {
                claims.push(claim);
                // No chunk is claimed twice in a session, and the claims
                // out are bounded.
                let mut live: Vec<u64> = claims
                    .iter()
                    .filter(|k| c.needs_resync(k))
                    .map(|k| k.chunk)
                    .collect();
                let n = live.len();
                live.sort_unstable();
                live.dedup();
                assert_eq!(
                    live.len(),
                    n,
                    "seed {seed} step {step}: a chunk claimed twice"
                );
                assert!(c.resync_claims.len() <= RESYNC_READS_MAX);
            }
            snap_new!(before);
        } else if r < 60 && !claims.is_empty() {
            // A resync reader finishes: lock, check, read, send.
            let claim = claims.swap_remove(rng.gen_range(0..claims.len()));
            let ch = claim.chunk;
            let start = ch * CB as u64;
            let len = crate::config::chunk_len(VB, CB, ch) as u64;
            let op = c.try_lock(start, start + len).unwrap();
            if !c.needs_resync(&claim) {
                c.release_resync(claim);
            } else {
                let data = dev[start as usize..(start + len) as usize].to_vec();
                let d = crate::protocol::digest(&data);
                let zd = if len == CB as u64 { zero } else { zero_tail };
                let chunk = seal_chunk(ch, data, d, zd, rng.gen_bool(0.5));
                if d == zd {
                    assert_eq!(chunk.encoding, Encoding::Zero);
                }
                // The read may span a disconnect (and a reconnect): then the
                // claim is void and nothing may be sent.
                let r2 = rng.gen_range(0..10);
                if r2 == 0 && c.connected() {
                    c.on_disconnected(t(now));
                    wire.clear();
                    acks.clear();
                    if rng.gen_bool(0.5) {
                        c.on_connected(m.state);
                    }
                }
                let void = !c.needs_resync(&claim);
                let before = c.next_seq();
                let sent = c.send_resync_chunk(claim, chunk, t(now));
                assert_eq!(sent.is_none(), void, "seed {seed} step {step}");
                snap_new!(before);
            }
            c.unlock(op);
        } else if r < 75 {
            // Frames travel.
            while let Some(fr) = c.poll_outbox() {
                wire.push(fr);
            }
            let n = rng.gen_range(0..=wire.len());
            for fr in wire.drain(..n).collect::<Vec<_>>() {
                m.apply(&fr, &snaps);
            }
            acks.push((m.applied, m.state));
        } else if r < 90 {
            // Acks travel (if connected). In asynchronous mode the mirror
            // may first report progress as applied, and make it durable later.
            if c.connected() {
                let mut later = Vec::new();
                for (s, st) in acks.drain(..) {
                    if mode == Mode::Async
                        && s > 0
                        && s >= c.applied
                        && s < c.next_seq()
                        && rng.gen_bool(0.5)
                    {
                        if trace {
                            eprintln!("  applied {s}");
                        }
                        c.on_applied(s).unwrap();
                        later.push((s, st));
                        continue;
                    }
                    if s > 0 && s >= c.status(t(now)).durable_seq && s < c.next_seq() {
                        if trace {
                            eprintln!(
                                "  ack {s} dirty5 {} stale5 {}",
                                c.is_dirty(5),
                                bit(&c.stale, 5)
                            );
                        }
                        c.on_ack(s, st).unwrap();
                    }
                }
                acks.extend(later);
            }
        } else if r < 95 && c.connected() {
            if trace {
                eprintln!(
                    "  disconnect dirty5 {} stale5 {}",
                    c.is_dirty(5),
                    bit(&c.stale, 5)
                );
            }
            c.on_disconnected(t(now));
            wire.clear();
            acks.clear();
        } else if !c.connected() {
            c.on_connected(m.state);
        }
        // What is reported covered has been applied by the mirror.
        assert!(c.covered() <= m.applied);
        // The queue counts exactly the sent frames not reported applied.
        assert!(c.released <= c.sent.len());
        let unreleased: u64 = c.sent.iter().skip(c.released).map(|e| e.bytes).sum();
        assert_eq!(
            c.queued_bytes, unreleased,
            "seed {seed} step {step}: queue accounting"
        );
        // The persistent bitmap always covers the dirty chunks.
        for ch in 0..c.chunks {
            if c.is_dirty(ch) {
                assert!(
                    c.persisted().get(c.slot, ch),
                    "seed {seed} step {step}: chunk {ch} dirty but not persisted"
                );
            }
        }
    }
    // Settle: connect, resync everything, deliver everything.
    if !c.connected() {
        c.on_connected(m.state);
        wire.clear();
    }
    for fr in wire.drain(..) {
        m.apply(&fr, &snaps);
    }
    // Readers still out finish (their claims may be void by now).
    for claim in claims.drain(..) {
        let before = c.next_seq();
        let ch = claim.chunk;
        let start = ch * CB as u64;
        let len = crate::config::chunk_len(VB, CB, ch) as u64;
        let data = dev[start as usize..(start + len) as usize].to_vec();
        let d = crate::protocol::digest(&data);
        c.send_resync_chunk(claim, seal_chunk(ch, data, d, 0, false), t(now));
        snap_new!(before);
    }
    for _ in 0..10_000 {
        now += 1;
        let before = c.next_seq();
        if let Some(claim) = c.next_resync(t(now)) {
            snap_new!(before);
            let ch = claim.chunk;
            let start = ch * CB as u64;
            let len = crate::config::chunk_len(VB, CB, ch) as u64;
            let data = dev[start as usize..(start + len) as usize].to_vec();
            let d = crate::protocol::digest(&data);
            let before = c.next_seq();
            c.send_resync_chunk(claim, seal_chunk(ch, data, d, 0, false), t(now));
            snap_new!(before);
        } else {
            snap_new!(before);
        }
        while let Some(fr) = c.poll_outbox() {
            if matches!(fr, Frame::InSync { .. }) && m.data != dev {
                let diff: Vec<(u64, bool, bool)> = (0..c.chunks)
                    .filter(|&ch| {
                        let a = (ch * CB as u64) as usize;
                        let b = (((ch + 1) * CB as u64).min(VB)) as usize;
                        m.data[a..b] != dev[a..b]
                    })
                    .map(|ch| (ch, c.is_dirty(ch), bit(&c.stale, ch)))
                    .collect();
                panic!("seed {seed}: InSync while chunks differ (chunk, dirty, stale): {diff:?}");
            }
            m.apply(&fr, &snaps);
        }
        if m.applied > c.status(t(now)).durable_seq {
            c.on_ack(m.applied, m.state).unwrap();
        }
        if c.quiet() {
            break;
        }
    }
    assert!(
        c.quiet(),
        "seed {seed}: did not settle: {:?}",
        c.status(t(now))
    );
    assert_eq!(m.state, ReplicaState::UpToDate);
    assert!(m.data == dev, "seed {seed}: replica differs after settling");
    // Lazy flush clears every bit on disk once nothing is dirty.
    c.take_map_updates();
    c.take_clearable_words(true);
    assert_eq!(c.persisted().count(c.slot), 0);
}

#[test]
fn seeded_simulation_sync_mode() {
    for seed in 0..80 {
        if std::env::var("SIM_SEED").is_ok_and(|s| s != seed.to_string()) {
            continue;
        }
        eprintln!("seed {seed}");
        simulate(seed, Mode::Sync);
    }
}

#[test]
fn seeded_simulation_async_mode() {
    for seed in 1000..1080 {
        simulate(seed, Mode::Async);
    }
}

#[test]
fn async_mode_holds_small_writes_for_a_batch_and_nothing_else() {
    let linger = Duration::from_micros(1000);
    let live = |mode| {
        let mut c = core(mode, 64 << 20);
        c.on_connected(ReplicaState::UpToDate);
        assert_eq!(c.next_resync(t(0)), None);
        let insync = match c.poll_outbox() {
            Some(Frame::InSync { seq, .. }) => seq,
            other => panic!("{other:?}"),
        };
        c.on_ack(insync, ReplicaState::UpToDate).unwrap();
        c
    };
    let data = Bytes::from(vec![1u8; 4096]);
    let mut c = live(Mode::Async);
    assert_eq!(c.hold_outbox_until(linger), None, "empty outbox");
    c.prepare(0, 0);
    c.send_write(0, &data, 1, false, t(10));
    // Held until the oldest frame is `linger` old, however many follow.
    assert_eq!(c.hold_outbox_until(linger), Some(t(10) + linger));
    c.prepare(1, 1);
    c.send_write(4096, &data, 1, false, t(10) + Duration::from_micros(600));
    c.send_flush(t(11));
    assert_eq!(c.hold_outbox_until(linger), Some(t(10) + linger));
    assert_eq!(c.hold_outbox_until(Duration::ZERO), None, "linger off");
    // Draining the outbox starts a new batch.
    while c.poll_outbox().is_some() {}
    assert_eq!(c.hold_outbox_until(linger), None);
    c.prepare(2, 2);
    c.send_write(8192, &data, 1, false, t(20));
    assert_eq!(c.hold_outbox_until(linger), Some(t(20) + linger));
    // A frame that is not a write, zero range or flush goes at once.
    c.send_end(t(20));
    assert_eq!(c.hold_outbox_until(linger), None);
    while c.poll_outbox().is_some() {}
    // A batch's worth of bytes goes at once.
    let big = Bytes::from(vec![2u8; OUTBOX_BATCH_BYTES as usize]);
    c.prepare(3, 3 + OUTBOX_BATCH_BYTES / CB as u64);
    c.send_write(3 * 4096, &big, 1, false, t(30));
    assert_eq!(c.hold_outbox_until(linger), None);

    // Sync mode never holds: the client waits for the mirror.
    let mut s = live(Mode::Sync);
    s.prepare(0, 0);
    s.send_write(0, &data, 1, false, t(10));
    assert_eq!(s.hold_outbox_until(linger), None);
}

/// The resync claims up to `RESYNC_READS_MAX` chunks at once, and only
/// `RESYNC_READS_BUSY` within `RESYNC_BUSY_WINDOW` of an application write.
#[test]
fn resync_reads_fewer_chunks_at_once_while_the_application_writes() {
    let mut c = core(Mode::Async, 64 << 20);
    let d = Bytes::from(vec![5u8; 100]);
    // Twenty chunks written while disconnected: all marked.
    for i in 0..20u64 {
        c.prepare(i, i);
        let s = c.send_write(i * CB as u64, &d, crate::protocol::digest(&d), false, t(0));
        assert!(matches!(s, Sent::Skipped { .. }), "{s:?}");
    }
    c.on_connected(ReplicaState::UpToDate);
    let ms = |n: u64| Duration::from_millis(n);
    // A write just now: one read at a time.
    let first = c.next_resync(ms(50)).expect("a chunk to resync");
    assert!(matches!(c.poll_outbox(), Some(Frame::StartResync { .. })));
    assert_eq!(c.next_resync(ms(50)), None, "busy: one claim at most");
    // Once the writes stopped for the window: up to the maximum.
    let quiet = ms(0) + RESYNC_BUSY_WINDOW;
    let mut claims = vec![first];
    while let Some(k) = c.next_resync(quiet) {
        claims.push(k);
    }
    assert_eq!(claims.len(), RESYNC_READS_MAX);
    let mut chunks: Vec<u64> = claims.iter().map(|k| k.chunk).collect();
    chunks.sort_unstable();
    chunks.dedup();
    assert_eq!(chunks.len(), RESYNC_READS_MAX, "distinct chunks");
    // A new write: no new claim until the claims out drop below one.
    c.prepare(30, 30);
    let _ = c.send_write(
        30 * CB as u64,
        &d,
        crate::protocol::digest(&d),
        false,
        quiet,
    );
    let busy = quiet + ms(1);
    for k in claims.drain(1..) {
        c.release_resync(k);
        assert_eq!(c.next_resync(busy), None);
    }
    c.release_resync(claims.pop().unwrap());
    assert!(c.next_resync(busy).is_some());
}

#[test]
fn resync_rate_spaces_the_claims() {
    // 10 chunks a second: one every 100 ms.
    let mut c = core_rate(Mode::Async, 64 << 20, 10 * CB as u64);
    let d = Bytes::from(vec![5u8; 100]);
    for i in 0..100u64 {
        c.prepare(i, i);
        let s = c.send_write(i * CB as u64, &d, crate::protocol::digest(&d), false, t(0));
        assert!(matches!(s, Sent::Skipped { .. }), "{s:?}");
    }
    c.on_connected(ReplicaState::UpToDate);
    // Claims taken as soon as allowed, and given back at once (each read
    // takes no time), over 2 s without writes.
    let mut at = Vec::new();
    for ms in 1000..3000u64 {
        while let Some(k) = c.next_resync(t(ms)) {
            at.push(ms);
            c.release_resync(k);
        }
        if let Some(w) = c.resync_rate_wait(t(ms)) {
            assert!(w <= Duration::from_millis(100), "wait {w:?}");
        }
    }
    // At most rate x (span + slack) + one chunk, and no fewer than the rate allows.
    let allowed = (2000 + RESYNC_RATE_SLACK.as_millis() as u64) / 100 + 1;
    assert!(
        at.len() as u64 <= allowed,
        "{} claims in 2 s: {at:?}",
        at.len()
    );
    assert!(at.len() >= 19, "{} claims in 2 s: {at:?}", at.len());
    assert_eq!(at[0], 1000, "the first claim at once");
    for w in at.windows(2) {
        assert!(w[1] - w[0] >= 90, "claims {} ms apart: {at:?}", w[1] - w[0]);
    }
    // After a pause no burst: idle time earns no credit.
    let later = t(10_000);
    let k = c.next_resync(later).expect("a claim after the pause");
    c.release_resync(k);
    assert_eq!(c.next_resync(later), None);
    assert_eq!(c.next_resync(later + t(50)), None);
    let w = c.resync_rate_wait(later).expect("a wait");
    assert_eq!(w, t(100) - RESYNC_RATE_SLACK);
    assert!(c.next_resync(later + w).is_some());

    // Without a rate: no wait, claims up to the reads' limit at once.
    let mut c = core(Mode::Async, 64 << 20);
    for i in 0..20u64 {
        c.prepare(i, i);
        let _ = c.send_write(i * CB as u64, &d, crate::protocol::digest(&d), false, t(0));
    }
    c.on_connected(ReplicaState::UpToDate);
    let mut n = 0;
    while c.next_resync(t(1000)).is_some() {
        n += 1;
    }
    assert_eq!(n, RESYNC_READS_MAX);
    assert_eq!(c.resync_rate_wait(t(1000)), None);
}

#[test]
fn resync_leaves_half_the_queue_to_the_application() {
    for mode in [Mode::Async, Mode::Sync] {
        let queue = 16 * CB as u64;
        let mut c = core(mode, queue);
        let d = Bytes::from(vec![5u8; 100]);
        c.on_disconnected(t(0));
        for i in 0..100u64 {
            c.prepare(i, i);
            let s = c.send_write(i * CB as u64, &d, crate::protocol::digest(&d), false, t(0));
            assert!(matches!(s, Sent::Skipped { .. }), "{mode:?}: {s:?}");
        }
        c.on_connected(ReplicaState::UpToDate);
        // The mirror applies nothing: the resync queues what it may.
        let mut rng = StdRng::seed_from_u64(3);
        let mut queued = 0;
        for ms in 1000..1100u64 {
            while let Some(k) = c.next_resync(t(ms)) {
                let data: Vec<u8> = (0..CB).map(|_| rng.gen()).collect();
                let dg = crate::protocol::digest(&data);
                let ch = seal_chunk(k.chunk, data, dg, 0, false);
                assert!(c.send_resync_chunk(k, ch, t(ms)).is_some());
                queued += 1;
            }
        }
        let st = c.status(t(1100));
        assert!(queued >= 4, "{mode:?}: {queued} chunks queued");
        assert!(
            st.queued_bytes <= queue / 2,
            "{mode:?}: the resync queued {} of {queue} bytes",
            st.queued_bytes
        );
        // An application write still finds room: sent, not marked for
        // the resync (async) nor told to wait (sync).
        while c.poll_outbox().is_some() {}
        c.prepare(150, 150);
        let w = Bytes::from(vec![9u8; CB as usize]);
        let s = c.send_write(
            150 * CB as u64,
            &w,
            crate::protocol::digest(&w),
            false,
            t(1100),
        );
        assert!(matches!(s, Sent::Queued(_)), "{mode:?}: {s:?}");
    }
}
