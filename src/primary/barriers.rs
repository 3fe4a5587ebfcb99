//! Barrier bookkeeping of the sender, as a pure state machine: which chunks
//! were sent since the last barrier, which barriers await their durable
//! acknowledgement, and which chunks an acknowledgement makes durable.
//!
//! No I/O: the sync loop feeds it what it sent (`handle_sent`), asks it when
//! a barrier is due (`poll_barrier`) and hands it each acknowledgement
//! (`handle_ack`), which returns the chunks to checkpoint.

use std::collections::VecDeque;

use crate::protocol::ProtocolError;

#[derive(Debug)]
pub struct Barriers {
    barrier_bytes: u64,
    barrier_chunks_max: usize,
    in_flight_max: usize,
    seq: u64,
    since_bytes: u64,
    pending: Vec<(u64, u128)>,
    outstanding: VecDeque<(u64, Vec<(u64, u128)>)>,
}

impl Barriers {
    pub fn new(barrier_bytes: u64, barrier_chunks_max: usize, in_flight_max: usize) -> Self {
        Barriers {
            barrier_bytes: barrier_bytes.max(1),
            barrier_chunks_max: barrier_chunks_max.max(1),
            in_flight_max: in_flight_max.max(1),
            seq: 0,
            since_bytes: 0,
            pending: Vec::new(),
            outstanding: VecDeque::new(),
        }
    }

    /// Chunks `(index, digest)` were written to the data stream using `bytes`.
    pub fn handle_sent(&mut self, chunks: impl IntoIterator<Item = (u64, u128)>, bytes: u64) {
        self.pending.extend(chunks);
        self.since_bytes += bytes;
    }

    /// A barrier to send now, if enough was sent since the last one (or
    /// `force`, at the end, when anything at all is pending or none was sent).
    pub fn poll_barrier(&mut self, force: bool) -> Option<u64> {
        let due =
            self.since_bytes >= self.barrier_bytes || self.pending.len() >= self.barrier_chunks_max;
        if !(due || force) {
            return None;
        }
        self.seq += 1;
        self.outstanding
            .push_back((self.seq, std::mem::take(&mut self.pending)));
        self.since_bytes = 0;
        Some(self.seq)
    }

    /// Too many barriers await acknowledgement: stop sending until one comes.
    pub fn must_wait(&self) -> bool {
        self.outstanding.len() >= self.in_flight_max
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The mirror made barrier `seq` durable: the chunks it covers.
    pub fn handle_ack(&mut self, seq: u64) -> Result<Vec<(u64, u128)>, ProtocolError> {
        match self.outstanding.front() {
            None => Err(ProtocolError::Unexpected {
                got: "BarrierAck",
                state: "no barrier outstanding",
            }),
            Some((s, _)) if *s != seq => Err(ProtocolError::Malformed {
                kind: "BarrierAck",
                reason: format!("acknowledged barrier {seq}, expected {s}"),
            }),
            Some(_) => Ok(self
                .outstanding
                .pop_front()
                .map(|(_, l)| l)
                .unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barriers_by_bytes_and_acks_in_order() {
        let mut b = Barriers::new(100, 1000, 2);
        b.handle_sent([(0, 10)], 60);
        assert_eq!(b.poll_barrier(false), None);
        b.handle_sent([(1, 11)], 60);
        assert_eq!(b.poll_barrier(false), Some(1));
        b.handle_sent([(2, 12)], 150);
        assert_eq!(b.poll_barrier(false), Some(2));
        assert!(b.must_wait());
        // Out of order or unknown acknowledgements are protocol errors.
        assert!(b.handle_ack(2).is_err());
        assert_eq!(b.handle_ack(1).unwrap(), vec![(0, 10), (1, 11)]);
        assert!(!b.must_wait());
        assert_eq!(b.handle_ack(2).unwrap(), vec![(2, 12)]);
        assert!(b.handle_ack(3).is_err());
        // A forced final barrier with nothing pending still gets an ack.
        assert_eq!(b.poll_barrier(true), Some(3));
        assert_eq!(b.handle_ack(3).unwrap(), vec![]);
        assert_eq!(b.outstanding(), 0);
    }

    #[test]
    fn barriers_by_chunk_count() {
        let mut b = Barriers::new(u64::MAX, 3, 4);
        b.handle_sent((0..2).map(|i| (i, 0)), 0);
        assert_eq!(b.poll_barrier(false), None);
        b.handle_sent((2..5).map(|i| (i, 0)), 0);
        assert_eq!(b.poll_barrier(false), Some(1));
        assert_eq!(b.handle_ack(1).unwrap().len(), 5);
    }
}
