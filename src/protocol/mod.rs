//! Wire protocol: versioned, length-prefixed frames with explicit limits.
//!
//! Pure code, no I/O. A frame is an 8-byte header followed by its payload:
//!
//! ```text
//! u8 version (=1) | u8 type | u16 flags (=0) | u32 payload length (LE)
//! ```
//!
//! All integers are fixed-width little-endian. Decoding never panics: every
//! malformed input is a [`ProtocolError`] naming what was wrong.

use bytes::{BufMut, Bytes, BytesMut};

pub mod genid;
pub use genid::GenIds;

pub const PROTOCOL_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 8;
/// Digests per `DigestBatch` frame (16 bytes each: 64 KiB payload).
pub const DIGESTS_PER_BATCH: u32 = 4096;
/// Longest error message carried in an `Error` frame.
pub const MESSAGE_BYTES_MAX: usize = 4096;
/// Largest plaintext of one `Write` frame (larger writes go as several).
pub const WRITE_BYTES_MAX: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {kind} has non-zero reserved flags {flags:#x}")]
    Flags { kind: u8, flags: u16 },
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("unexpected {got} frame while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("chunk {index} is beyond the volume ({chunks} chunks)")]
    ChunkOutOfRange { index: u64, chunks: u64 },
    #[error(
        "chunk {index}: length {len} does not match the volume geometry (expected {expected})"
    )]
    ChunkLength { index: u64, len: u32, expected: u32 },
    #[error(
        "chunk {index}: digest mismatch (frame says {expected:032x}, data hashes to {actual:032x})"
    )]
    DigestMismatch {
        index: u64,
        expected: u128,
        actual: u128,
    },
    #[error("chunk {index}: lz4 decompression failed: {reason}")]
    Decompress { index: u64, reason: String },
}

pub type Result<T> = std::result::Result<T, ProtocolError>;

/// Encoding of a chunk's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Raw = 0,
    Lz4 = 1,
    /// The chunk is all zeros; no payload.
    Zero = 2,
}

/// Replica state as stored on the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplicaState {
    UpToDate,
    Inconsistent,
    /// Created, never written by a completed sync (reads as zeros).
    New,
}

impl ReplicaState {
    fn to_u8(self) -> u8 {
        match self {
            ReplicaState::UpToDate => 1,
            ReplicaState::Inconsistent => 2,
            ReplicaState::New => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ReplicaState::UpToDate),
            2 => Some(ReplicaState::Inconsistent),
            3 => Some(ReplicaState::New),
            _ => None,
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::UpToDate => "UpToDate",
            ReplicaState::Inconsistent => "Inconsistent",
            ReplicaState::New => "New",
        })
    }
}

pub const HELLO_FLAG_RESIZE: u8 = 1;
pub const HELLO_FLAG_REINIT: u8 = 2;
/// A live replication session (`replicate`) rather than a one-shot sync.
pub const HELLO_FLAG_LIVE: u8 = 4;
/// Live session in synchronous mode (for status only: the mirror acks the same way).
pub const HELLO_FLAG_SYNC_MODE: u8 = 8;
/// Only report the replica's state (`--dry-run`): create, lock and write nothing.
pub const HELLO_FLAG_PROBE: u8 = 16;
/// A read session (`restore`): the mirror sends a replica or a recovery
/// point; it creates and writes nothing. Size and chunk size are ignored (0).
pub const HELLO_FLAG_READ: u8 = 64;
const HELLO_FLAGS_ALL: u8 = HELLO_FLAG_RESIZE
    | HELLO_FLAG_REINIT
    | HELLO_FLAG_LIVE
    | HELLO_FLAG_SYNC_MODE
    | HELLO_FLAG_PROBE
    | HELLO_FLAG_READ;
/// Bitmap words per `ChangedBatch` frame (64 KiB payload).
pub const CHANGED_WORDS_PER_BATCH: u32 = 8192;
/// A live write or zero range with FUA: durable before it is acknowledged.
pub const LIVE_FLAG_FUA: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub volume: String,
    pub volume_bytes: u64,
    pub chunk_bytes: u32,
    pub flags: u8,
    /// Identity of the primary's source lineage (random, kept in its state dir).
    pub source_id: u128,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    pub replica_id: u128,
    pub state: ReplicaState,
    /// Source lineage that last wrote this replica (0: none).
    pub source_id: u128,
    /// Generation ids of the replica (`current`: the state it holds, 0: none).
    pub gen: GenIds,
    pub volume_bytes: u64,
    pub chunk_bytes: u32,
    /// The replica was created (or re-initialised) by this hello.
    pub created: bool,
    /// The replica was promoted to primary (and not demoted since).
    pub primary: bool,
    /// Chunks the replica's node wrote itself since it parted from this
    /// source; their bitmap follows in `ChangedBatch` frames.
    pub changed: u64,
    /// When the replica was promoted (unix seconds, 0: never).
    pub promoted_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkFrame {
    pub index: u64,
    pub encoding: Encoding,
    /// Plaintext length.
    pub raw_len: u32,
    /// xxh3-128 of the plaintext.
    pub digest: u128,
    pub payload: Bytes,
}

/// One replicated write (a byte range of the volume) in a live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveWrite {
    pub seq: u64,
    pub offset: u64,
    pub flags: u8,
    pub encoding: Encoding,
    /// Plaintext length.
    pub raw_len: u32,
    /// xxh3-128 of the plaintext.
    pub digest: u128,
    pub payload: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Error {
        message: String,
    },
    Chunk(ChunkFrame),
    /// Chunks `first..first+count` are all zeros (a run of holes).
    ZeroRun {
        first: u64,
        count: u64,
    },
    /// Everything sent before it on this stream is to be made durable.
    Barrier {
        seq: u64,
    },
    BarrierAck {
        seq: u64,
    },
    DigestRequest {
        first: u64,
        count: u64,
    },
    DigestBatch {
        first: u64,
        digests: Vec<u128>,
    },
    /// All chunks are durable; `root` is xxh3-128 over the whole digest map.
    SyncDone {
        chunks: u64,
        root: u128,
        generation: u64,
    },
    SyncComplete {
        state: ReplicaState,
    },
    /// Live: a write, applied in sequence order.
    Write(LiveWrite),
    /// Live: bytes `offset..offset+len` now read as zeros (TRIM, WRITE_ZEROES).
    ZeroRange {
        seq: u64,
        offset: u64,
        len: u64,
        flags: u8,
    },
    /// Live: make everything before it durable before applying anything after it.
    Flush {
        seq: u64,
    },
    /// Live: the current contents of a dirty chunk (resync).
    LiveChunk {
        seq: u64,
        chunk: ChunkFrame,
    },
    /// Live: what follows is a resync; the replica is Inconsistent until `InSync`.
    StartResync {
        seq: u64,
    },
    /// Live: after applying everything up to `seq` the replica equals the
    /// primary's device as of `seq`, whose generation is `generation`.
    InSync {
        seq: u64,
        generation: u64,
    },
    /// Mirror to source, after `HelloAck`: the chunks the mirror's node
    /// changed itself, as bitmap words from word `first_word`.
    ChangedBatch {
        first_word: u64,
        words: Vec<u64>,
    },
    /// Live: after applying everything before it, compare chunk `index`
    /// with `digest` (the primary's contents, read under the chunk's lock).
    VerifyChunk {
        seq: u64,
        index: u64,
        digest: u128,
    },
    /// Mirror to primary: the replica's chunk `index` hashes to `digest`,
    /// not to what `VerifyChunk` said.
    VerifyMismatch {
        index: u64,
        digest: u128,
    },
    /// Source to mirror, before any data: the source won a split brain (its
    /// policy discards the mirror's changes). The mirror keeps its changed
    /// chunks as a recovery point, steps down to secondary, then accepts data.
    Takeover,
    /// Live: the primary stops; apply, make durable, acknowledge, end.
    LiveEnd {
        seq: u64,
    },
    /// Live, mirror to primary: everything up to `seq` is applied and durable;
    /// `state` is the replica's state after it.
    Ack {
        seq: u64,
        state: ReplicaState,
    },
    /// Live, asynchronous mode, mirror to primary: everything up to `seq` is
    /// applied in order, not yet durable. Its bytes no longer count against
    /// the primary's queue; its chunks stay dirty until an `Ack` covers it.
    Applied {
        seq: u64,
    },
    /// Restore, client to mirror after `HelloAck`: read recovery point
    /// `point` (0: the replica as it is); with `digests` the mirror first
    /// sends the xxh3-128 of every chunk as of that point in `DigestBatch`
    /// frames.
    RestoreRequest {
        point: u64,
        digests: bool,
    },
    /// Restore, mirror to client: the request is accepted (digests follow
    /// if asked for).
    RestoreReady {
        point: u64,
    },
    /// Restore, client to mirror: send the chunks whose bits are set, as
    /// bitmap words from word `first_word` (batches in ascending order).
    ReadChunks {
        first_word: u64,
        words: Vec<u64>,
    },
    /// Restore, client to mirror: no more `ReadChunks`; `chunks` bits were set.
    ReadEnd {
        chunks: u64,
    },
    /// Restore, mirror to client, last frame of the data stream: `chunks`
    /// chunks were sent (with data, as zero markers or in zero runs).
    RestoreEnd {
        chunks: u64,
    },
}

impl Frame {
    /// Sequence number of a live frame sent by the primary.
    pub fn live_seq(&self) -> Option<u64> {
        match self {
            Frame::Write(w) => Some(w.seq),
            Frame::ZeroRange { seq, .. }
            | Frame::Flush { seq }
            | Frame::LiveChunk { seq, .. }
            | Frame::StartResync { seq }
            | Frame::InSync { seq, .. }
            | Frame::VerifyChunk { seq, .. }
            | Frame::LiveEnd { seq } => Some(*seq),
            _ => None,
        }
    }
}

const T_HELLO: u8 = 1;
const T_HELLO_ACK: u8 = 2;
const T_ERROR: u8 = 3;
const T_CHUNK: u8 = 4;
const T_BARRIER: u8 = 5;
const T_BARRIER_ACK: u8 = 6;
const T_DIGEST_REQ: u8 = 7;
const T_DIGEST_BATCH: u8 = 8;
const T_SYNC_DONE: u8 = 9;
const T_SYNC_COMPLETE: u8 = 10;
const T_ZERO_RUN: u8 = 11;
const T_WRITE: u8 = 12;
const T_ZERO_RANGE: u8 = 13;
const T_FLUSH: u8 = 14;
const T_LIVE_CHUNK: u8 = 15;
const T_START_RESYNC: u8 = 16;
const T_IN_SYNC: u8 = 17;
const T_LIVE_END: u8 = 18;
const T_ACK: u8 = 19;
const T_APPLIED: u8 = 27;
const T_CHANGED_BATCH: u8 = 20;
const T_TAKEOVER: u8 = 21;
const T_VERIFY_CHUNK: u8 = 40;
const T_VERIFY_MISMATCH: u8 = 41;
const T_RESTORE_REQUEST: u8 = 22;
const T_RESTORE_READY: u8 = 23;
const T_READ_CHUNKS: u8 = 24;
const T_READ_END: u8 = 25;
const T_RESTORE_END: u8 = 26;
/// Flag of `RestoreRequest`: send the point's digests first.
const RESTORE_FLAG_DIGESTS: u8 = 1;
/// Most chunks one `ZeroRun` frame may cover.
pub const ZERO_RUN_CHUNKS_MAX: u64 = 1 << 16;

impl Frame {
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }
    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello(_) => T_HELLO,
            Frame::HelloAck(_) => T_HELLO_ACK,
            Frame::Error { .. } => T_ERROR,
            Frame::Chunk(_) => T_CHUNK,
            Frame::Barrier { .. } => T_BARRIER,
            Frame::BarrierAck { .. } => T_BARRIER_ACK,
            Frame::DigestRequest { .. } => T_DIGEST_REQ,
            Frame::DigestBatch { .. } => T_DIGEST_BATCH,
            Frame::SyncDone { .. } => T_SYNC_DONE,
            Frame::SyncComplete { .. } => T_SYNC_COMPLETE,
            Frame::ZeroRun { .. } => T_ZERO_RUN,
            Frame::Write(_) => T_WRITE,
            Frame::ZeroRange { .. } => T_ZERO_RANGE,
            Frame::Flush { .. } => T_FLUSH,
            Frame::LiveChunk { .. } => T_LIVE_CHUNK,
            Frame::StartResync { .. } => T_START_RESYNC,
            Frame::InSync { .. } => T_IN_SYNC,
            Frame::LiveEnd { .. } => T_LIVE_END,
            Frame::Ack { .. } => T_ACK,
            Frame::Applied { .. } => T_APPLIED,
            Frame::ChangedBatch { .. } => T_CHANGED_BATCH,
            Frame::Takeover => T_TAKEOVER,
            Frame::VerifyChunk { .. } => T_VERIFY_CHUNK,
            Frame::VerifyMismatch { .. } => T_VERIFY_MISMATCH,
            Frame::RestoreRequest { .. } => T_RESTORE_REQUEST,
            Frame::RestoreReady { .. } => T_RESTORE_READY,
            Frame::ReadChunks { .. } => T_READ_CHUNKS,
            Frame::ReadEnd { .. } => T_READ_END,
            Frame::RestoreEnd { .. } => T_RESTORE_END,
        }
    }
}

fn type_name(t: u8) -> &'static str {
    match t {
        T_HELLO => "Hello",
        T_HELLO_ACK => "HelloAck",
        T_ERROR => "Error",
        T_CHUNK => "Chunk",
        T_BARRIER => "Barrier",
        T_BARRIER_ACK => "BarrierAck",
        T_DIGEST_REQ => "DigestRequest",
        T_DIGEST_BATCH => "DigestBatch",
        T_SYNC_DONE => "SyncDone",
        T_SYNC_COMPLETE => "SyncComplete",
        T_ZERO_RUN => "ZeroRun",
        T_WRITE => "Write",
        T_ZERO_RANGE => "ZeroRange",
        T_FLUSH => "Flush",
        T_LIVE_CHUNK => "LiveChunk",
        T_START_RESYNC => "StartResync",
        T_IN_SYNC => "InSync",
        T_LIVE_END => "LiveEnd",
        T_ACK => "Ack",
        T_APPLIED => "Applied",
        T_CHANGED_BATCH => "ChangedBatch",
        T_TAKEOVER => "Takeover",
        T_VERIFY_CHUNK => "VerifyChunk",
        T_VERIFY_MISMATCH => "VerifyMismatch",
        T_RESTORE_REQUEST => "RestoreRequest",
        T_RESTORE_READY => "RestoreReady",
        T_READ_CHUNKS => "ReadChunks",
        T_READ_END => "ReadEnd",
        T_RESTORE_END => "RestoreEnd",
        _ => "unknown",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub payload_len: u32,
}

/// Parse and check a frame header against the payload limit.
pub fn parse_header(b: &[u8; HEADER_BYTES], payload_bytes_max: u32) -> Result<Header> {
    if b[0] != PROTOCOL_VERSION {
        return Err(ProtocolError::Version(b[0]));
    }
    let kind = b[1];
    if type_name(kind) == "unknown" {
        return Err(ProtocolError::UnknownType(kind));
    }
    let flags = u16::from_le_bytes([b[2], b[3]]);
    if flags != 0 {
        return Err(ProtocolError::Flags { kind, flags });
    }
    let payload_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if payload_len > payload_bytes_max {
        return Err(ProtocolError::TooLarge {
            len: payload_len,
            max: payload_bytes_max,
        });
    }
    Ok(Header { kind, payload_len })
}

/// Encode a frame: header plus the fixed part of the payload into `out`. For
/// chunk frames the chunk payload is returned separately so that it can be
/// handed to the transport without a copy.
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Option<Bytes> {
    let start = out.len();
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(frame.type_byte());
    out.put_u16_le(0);
    out.put_u32_le(0); // patched below
    let mut tail = None;
    match frame {
        Frame::Hello(h) => {
            put_str(out, &h.volume);
            out.put_u64_le(h.volume_bytes);
            out.put_u32_le(h.chunk_bytes);
            out.put_u8(h.flags);
            out.put_u128_le(h.source_id);
        }
        Frame::HelloAck(a) => {
            out.put_u128_le(a.replica_id);
            out.put_u8(a.state.to_u8());
            out.put_u128_le(a.source_id);
            out.put_u64_le(a.gen.current);
            out.put_u64_le(a.volume_bytes);
            out.put_u32_le(a.chunk_bytes);
            out.put_u8(a.created as u8);
            out.put_u64_le(a.gen.bitmap);
            for h in a.gen.history {
                out.put_u64_le(h);
            }
            out.put_u8(a.primary as u8);
            out.put_u64_le(a.changed);
            out.put_u64_le(a.promoted_unix);
        }
        Frame::Error { message } => {
            let m = truncate_utf8(message, MESSAGE_BYTES_MAX);
            put_str(out, m);
        }
        Frame::Chunk(c) => {
            put_chunk(out, c);
            tail = Some(c.payload.clone());
        }
        Frame::LiveChunk { seq, chunk } => {
            out.put_u64_le(*seq);
            put_chunk(out, chunk);
            tail = Some(chunk.payload.clone());
        }
        Frame::Write(w) => {
            out.put_u64_le(w.seq);
            out.put_u64_le(w.offset);
            out.put_u8(w.flags);
            out.put_u8(w.encoding as u8);
            out.put_u32_le(w.raw_len);
            out.put_u128_le(w.digest);
            tail = Some(w.payload.clone());
        }
        Frame::ZeroRange {
            seq,
            offset,
            len,
            flags,
        } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*offset);
            out.put_u64_le(*len);
            out.put_u8(*flags);
        }
        Frame::Flush { seq } | Frame::StartResync { seq } | Frame::LiveEnd { seq } => {
            out.put_u64_le(*seq)
        }
        Frame::InSync { seq, generation } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*generation);
        }
        Frame::Takeover => {}
        Frame::VerifyChunk { seq, index, digest } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*index);
            out.put_u128_le(*digest);
        }
        Frame::VerifyMismatch { index, digest } => {
            out.put_u64_le(*index);
            out.put_u128_le(*digest);
        }
        Frame::ChangedBatch { first_word, words } => {
            out.put_u64_le(*first_word);
            out.put_u32_le(words.len() as u32);
            for w in words {
                out.put_u64_le(*w);
            }
        }
        Frame::Ack { seq, state } => {
            out.put_u64_le(*seq);
            out.put_u8(state.to_u8());
        }
        Frame::Applied { seq } => out.put_u64_le(*seq),
        Frame::Barrier { seq } | Frame::BarrierAck { seq } => out.put_u64_le(*seq),
        Frame::DigestRequest { first, count } => {
            out.put_u64_le(*first);
            out.put_u64_le(*count);
        }
        Frame::DigestBatch { first, digests } => {
            out.put_u64_le(*first);
            out.put_u32_le(digests.len() as u32);
            for d in digests {
                out.put_u128_le(*d);
            }
        }
        Frame::SyncDone {
            chunks,
            root,
            generation,
        } => {
            out.put_u64_le(*chunks);
            out.put_u128_le(*root);
            out.put_u64_le(*generation);
        }
        Frame::SyncComplete { state } => out.put_u8(state.to_u8()),
        Frame::ZeroRun { first, count } => {
            out.put_u64_le(*first);
            out.put_u64_le(*count);
        }
        Frame::RestoreRequest { point, digests } => {
            out.put_u64_le(*point);
            out.put_u8(if *digests { RESTORE_FLAG_DIGESTS } else { 0 });
        }
        Frame::RestoreReady { point } => out.put_u64_le(*point),
        Frame::ReadChunks { first_word, words } => {
            out.put_u64_le(*first_word);
            out.put_u32_le(words.len() as u32);
            for w in words {
                out.put_u64_le(*w);
            }
        }
        Frame::ReadEnd { chunks } | Frame::RestoreEnd { chunks } => out.put_u64_le(*chunks),
    }
    let fixed = out.len() - start - HEADER_BYTES;
    let total = fixed + tail.as_ref().map_or(0, |t| t.len());
    out[start + 4..start + 8].copy_from_slice(&(total as u32).to_le_bytes());
    tail
}

/// Encode a whole frame into one buffer (control frames, tests).
pub fn encode_to_vec(frame: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    let tail = encode(frame, &mut b);
    let mut v = b.to_vec();
    if let Some(t) = tail {
        v.extend_from_slice(&t);
    }
    v
}

fn put_chunk(out: &mut BytesMut, c: &ChunkFrame) {
    out.put_u64_le(c.index);
    out.put_u8(c.encoding as u8);
    out.put_u32_le(c.raw_len);
    out.put_u128_le(c.digest);
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, u16::MAX as usize);
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A cursor over a payload that turns every short read into a `Malformed` error.
struct Reader<'a> {
    kind: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                reason: format!("truncated while reading {what}"),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn u128(&mut self, what: &str) -> Result<u128> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16, what)?);
        Ok(u128::from_le_bytes(a))
    }
    fn string(&mut self, what: &str, max: usize) -> Result<String> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(self.bad(format!("{what} is {n} bytes, more than {max}")));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }
    fn bad(&self, reason: String) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            reason,
        }
    }
    fn finish(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(self.bad(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

/// Decode a payload whose header was accepted by [`parse_header`].
pub fn decode_payload(header: Header, payload: Bytes) -> Result<Frame> {
    if payload.len() != header.payload_len as usize {
        return Err(ProtocolError::Malformed {
            kind: type_name(header.kind),
            reason: format!(
                "payload is {} bytes, header says {}",
                payload.len(),
                header.payload_len
            ),
        });
    }
    let mut r = Reader {
        kind: type_name(header.kind),
        buf: &payload,
        pos: 0,
    };
    let frame = match header.kind {
        T_HELLO => {
            let volume = r.string("volume name", 255)?;
            let volume_bytes = r.u64("volume size")?;
            let chunk_bytes = r.u32("chunk size")?;
            let flags = r.u8("flags")?;
            if flags & !HELLO_FLAGS_ALL != 0 {
                return Err(r.bad(format!("unknown flags {flags:#x}")));
            }
            let source_id = r.u128("source id")?;
            Frame::Hello(Hello {
                volume,
                volume_bytes,
                chunk_bytes,
                flags,
                source_id,
            })
        }
        T_HELLO_ACK => {
            let replica_id = r.u128("replica id")?;
            let s = r.u8("state")?;
            let state =
                ReplicaState::from_u8(s).ok_or_else(|| r.bad(format!("unknown state {s}")))?;
            let source_id = r.u128("source id")?;
            let current = r.u64("generation")?;
            let volume_bytes = r.u64("volume size")?;
            let chunk_bytes = r.u32("chunk size")?;
            let created = match r.u8("created")? {
                0 => false,
                1 => true,
                v => return Err(r.bad(format!("created flag {v}"))),
            };
            let bitmap = r.u64("bitmap generation")?;
            let mut history = [0u64; genid::HISTORY_LEN];
            for h in &mut history {
                *h = r.u64("history generation")?;
            }
            let primary = match r.u8("role")? {
                0 => false,
                1 => true,
                v => return Err(r.bad(format!("role {v}"))),
            };
            let changed = r.u64("changed chunks")?;
            let promoted_unix = r.u64("promotion time")?;
            Frame::HelloAck(HelloAck {
                replica_id,
                state,
                source_id,
                gen: GenIds {
                    current,
                    bitmap,
                    history,
                },
                volume_bytes,
                chunk_bytes,
                created,
                primary,
                changed,
                promoted_unix,
            })
        }
        T_ERROR => {
            let message = r.string("message", MESSAGE_BYTES_MAX)?;
            Frame::Error { message }
        }
        T_CHUNK => Frame::Chunk(read_chunk(&mut r, &payload)?),
        T_LIVE_CHUNK => {
            let seq = r.u64("sequence")?;
            let chunk = read_chunk(&mut r, &payload)?;
            if chunk.encoding == Encoding::Lz4 && chunk.payload.is_empty() {
                return Err(r.bad("empty lz4 payload".into()));
            }
            Frame::LiveChunk { seq, chunk }
        }
        T_WRITE => {
            let seq = r.u64("sequence")?;
            let offset = r.u64("offset")?;
            let flags = r.u8("flags")?;
            if flags & !LIVE_FLAG_FUA != 0 {
                return Err(r.bad(format!("unknown write flags {flags:#x}")));
            }
            let enc = r.u8("encoding")?;
            let raw_len = r.u32("raw length")?;
            let digest = r.u128("digest")?;
            if raw_len > WRITE_BYTES_MAX {
                return Err(r.bad(format!(
                    "write of {raw_len} bytes, more than the limit of {WRITE_BYTES_MAX}"
                )));
            }
            let rest = payload.len() - r.pos;
            let encoding = match enc {
                0 if rest == raw_len as usize && rest > 0 => Encoding::Raw,
                1 if rest > 0 && rest < raw_len as usize => Encoding::Lz4,
                e => {
                    return Err(r.bad(format!(
                        "encoding {e} with {rest} payload bytes for {raw_len} plaintext bytes"
                    )))
                }
            };
            Frame::Write(LiveWrite {
                seq,
                offset,
                flags,
                encoding,
                raw_len,
                digest,
                payload: payload.slice(r.pos..),
            })
        }
        T_ZERO_RANGE => {
            let seq = r.u64("sequence")?;
            let offset = r.u64("offset")?;
            let len = r.u64("length")?;
            let flags = r.u8("flags")?;
            if flags & !LIVE_FLAG_FUA != 0 {
                return Err(r.bad(format!("unknown flags {flags:#x}")));
            }
            Frame::ZeroRange {
                seq,
                offset,
                len,
                flags,
            }
        }
        T_FLUSH => Frame::Flush {
            seq: r.u64("sequence")?,
        },
        T_START_RESYNC => Frame::StartResync {
            seq: r.u64("sequence")?,
        },
        T_IN_SYNC => Frame::InSync {
            seq: r.u64("sequence")?,
            generation: r.u64("generation")?,
        },
        T_TAKEOVER => Frame::Takeover,
        T_VERIFY_CHUNK => Frame::VerifyChunk {
            seq: r.u64("sequence")?,
            index: r.u64("chunk index")?,
            digest: r.u128("digest")?,
        },
        T_VERIFY_MISMATCH => Frame::VerifyMismatch {
            index: r.u64("chunk index")?,
            digest: r.u128("digest")?,
        },
        T_CHANGED_BATCH => {
            let first_word = r.u64("first word")?;
            let n = r.u32("count")?;
            if n == 0 || n > CHANGED_WORDS_PER_BATCH {
                return Err(r.bad(format!(
                    "{n} bitmap words (allowed 1..={CHANGED_WORDS_PER_BATCH} per batch)"
                )));
            }
            let mut words = Vec::with_capacity(n as usize);
            for _ in 0..n {
                words.push(r.u64("bitmap word")?);
            }
            Frame::ChangedBatch { first_word, words }
        }
        T_LIVE_END => Frame::LiveEnd {
            seq: r.u64("sequence")?,
        },
        T_ACK => {
            let seq = r.u64("sequence")?;
            let s = r.u8("state")?;
            let state =
                ReplicaState::from_u8(s).ok_or_else(|| r.bad(format!("unknown state {s}")))?;
            Frame::Ack { seq, state }
        }
        T_APPLIED => {
            let seq = r.u64("sequence")?;
            r.finish()?;
            Frame::Applied { seq }
        }
        T_BARRIER => {
            let seq = r.u64("sequence")?;
            r.finish()?;
            Frame::Barrier { seq }
        }
        T_BARRIER_ACK => {
            let seq = r.u64("sequence")?;
            Frame::BarrierAck { seq }
        }
        T_DIGEST_REQ => {
            let first = r.u64("first chunk")?;
            let count = r.u64("count")?;
            Frame::DigestRequest { first, count }
        }
        T_DIGEST_BATCH => {
            let first = r.u64("first chunk")?;
            let n = r.u32("count")?;
            if n > DIGESTS_PER_BATCH {
                return Err(r.bad(format!(
                    "{n} digests, more than {DIGESTS_PER_BATCH} per batch"
                )));
            }
            let mut digests = Vec::with_capacity(n as usize);
            for _ in 0..n {
                digests.push(r.u128("digest")?);
            }
            Frame::DigestBatch { first, digests }
        }
        T_SYNC_DONE => {
            let chunks = r.u64("chunk count")?;
            let root = r.u128("root digest")?;
            let generation = r.u64("generation")?;
            Frame::SyncDone {
                chunks,
                root,
                generation,
            }
        }
        T_SYNC_COMPLETE => {
            let s = r.u8("state")?;
            let state =
                ReplicaState::from_u8(s).ok_or_else(|| r.bad(format!("unknown state {s}")))?;
            Frame::SyncComplete { state }
        }
        T_ZERO_RUN => {
            let first = r.u64("first chunk")?;
            let count = r.u64("count")?;
            if count == 0 || count > ZERO_RUN_CHUNKS_MAX {
                return Err(r.bad(format!(
                    "zero run of {count} chunks (allowed 1..={ZERO_RUN_CHUNKS_MAX})"
                )));
            }
            Frame::ZeroRun { first, count }
        }
        T_RESTORE_REQUEST => {
            let point = r.u64("point")?;
            let flags = r.u8("flags")?;
            if flags & !RESTORE_FLAG_DIGESTS != 0 {
                return Err(r.bad(format!("unknown flags {flags:#x}")));
            }
            Frame::RestoreRequest {
                point,
                digests: flags & RESTORE_FLAG_DIGESTS != 0,
            }
        }
        T_RESTORE_READY => Frame::RestoreReady {
            point: r.u64("point")?,
        },
        T_READ_CHUNKS => {
            let first_word = r.u64("first word")?;
            let n = r.u32("count")?;
            if n == 0 || n > CHANGED_WORDS_PER_BATCH {
                return Err(r.bad(format!(
                    "{n} bitmap words (allowed 1..={CHANGED_WORDS_PER_BATCH} per batch)"
                )));
            }
            if first_word
                .checked_add(n as u64)
                .is_none_or(|end| end > crate::config::VOLUME_CHUNKS_MAX.div_ceil(64))
            {
                return Err(r.bad(format!(
                    "words {first_word}+{n} lie beyond the largest volume"
                )));
            }
            let mut words = Vec::with_capacity(n as usize);
            for _ in 0..n {
                words.push(r.u64("bitmap word")?);
            }
            Frame::ReadChunks { first_word, words }
        }
        T_READ_END => Frame::ReadEnd {
            chunks: r.u64("chunk count")?,
        },
        T_RESTORE_END => Frame::RestoreEnd {
            chunks: r.u64("chunk count")?,
        },
        k => return Err(ProtocolError::UnknownType(k)),
    };
    if !matches!(
        frame,
        Frame::Chunk(_) | Frame::LiveChunk { .. } | Frame::Write(_)
    ) {
        r.finish()?;
    }
    Ok(frame)
}

fn read_chunk(r: &mut Reader<'_>, payload: &Bytes) -> Result<ChunkFrame> {
    let index = r.u64("chunk index")?;
    let enc = r.u8("encoding")?;
    let raw_len = r.u32("raw length")?;
    if raw_len > crate::config::CHUNK_BYTES_MAX {
        return Err(r.bad(format!(
            "chunk {index} of {raw_len} bytes, more than the largest chunk size ({})",
            crate::config::CHUNK_BYTES_MAX
        )));
    }
    let digest = r.u128("digest")?;
    let rest = payload.len() - r.pos;
    let encoding = match enc {
        0 => Encoding::Raw,
        1 => Encoding::Lz4,
        2 => Encoding::Zero,
        e => return Err(r.bad(format!("unknown encoding {e}"))),
    };
    match encoding {
        Encoding::Raw if rest != raw_len as usize => {
            return Err(r.bad(format!(
                "raw chunk {index} carries {rest} bytes but says {raw_len}"
            )))
        }
        Encoding::Lz4 if rest == 0 || rest >= raw_len as usize => {
            return Err(r.bad(format!(
                "lz4 chunk {index} carries {rest} bytes for {raw_len} plaintext bytes"
            )))
        }
        Encoding::Zero if rest != 0 => {
            return Err(r.bad(format!("zero chunk {index} carries {rest} bytes")))
        }
        _ => {}
    }
    Ok(ChunkFrame {
        index,
        encoding,
        raw_len,
        digest,
        payload: payload.slice(r.pos..),
    })
}

/// Check a live write against the volume size and turn it into plaintext in
/// `out`, verifying its digest. Returns the plaintext length.
pub fn open_write(w: &LiveWrite, volume_bytes: u64, out: &mut [u8]) -> Result<usize> {
    let n = check_write(w, volume_bytes, out.len())?;
    decode_into(w.encoding, &w.payload, &mut out[..n], w.seq)?;
    verify_write(w, &out[..n])?;
    Ok(n)
}

/// Like [`open_write`], without a copy for raw writes: the checked plaintext.
pub fn write_plaintext(w: &LiveWrite, volume_bytes: u64) -> Result<Bytes> {
    if w.encoding == Encoding::Raw && w.payload.len() == w.raw_len as usize {
        check_write(w, volume_bytes, w.payload.len())?;
        verify_write(w, &w.payload)?;
        return Ok(w.payload.clone());
    }
    let mut out = vec![0u8; w.raw_len as usize];
    open_write(w, volume_bytes, &mut out)?;
    Ok(Bytes::from(out))
}

/// The write's length if it fits the volume and a buffer of `room` bytes.
fn check_write(w: &LiveWrite, volume_bytes: u64, room: usize) -> Result<usize> {
    let n = w.raw_len as usize;
    let end = w.offset.checked_add(w.raw_len as u64);
    if n == 0 || end.is_none_or(|e| e > volume_bytes) || room < n {
        return Err(ProtocolError::Malformed {
            kind: "Write",
            reason: format!(
                "write of {} bytes at offset {} does not fit the volume ({} bytes)",
                w.raw_len, w.offset, volume_bytes
            ),
        });
    }
    Ok(n)
}

fn verify_write(w: &LiveWrite, plain: &[u8]) -> Result<()> {
    let actual = digest(plain);
    if actual != w.digest {
        return Err(ProtocolError::Malformed {
            kind: "Write",
            reason: format!(
                "write seq {} at offset {}: digest mismatch (frame says {:032x}, data hashes to {actual:032x})",
                w.seq, w.offset, w.digest
            ),
        });
    }
    Ok(())
}

/// Decode one frame from the start of `buf` (tests and fuzzing). Returns the
/// frame and the bytes consumed, or `None` if more bytes are needed.
pub fn decode(buf: &[u8], payload_bytes_max: u32) -> Result<Option<(Frame, usize)>> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(&buf[..HEADER_BYTES]);
    let header = parse_header(&h, payload_bytes_max)?;
    let end = HEADER_BYTES + header.payload_len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let payload = Bytes::copy_from_slice(&buf[HEADER_BYTES..end]);
    Ok(Some((decode_payload(header, payload)?, end)))
}

/// Check a chunk frame against the volume geometry and turn it into plaintext
/// in `out` (which must be at least `raw_len` long). Verifies the digest.
/// Returns the plaintext length. Pure: used by the mirror before any write.
pub fn open_chunk(
    c: &ChunkFrame,
    volume_bytes: u64,
    chunk_bytes: u32,
    out: &mut [u8],
) -> Result<usize> {
    let chunks = crate::config::chunk_count(volume_bytes, chunk_bytes);
    if c.index >= chunks {
        return Err(ProtocolError::ChunkOutOfRange {
            index: c.index,
            chunks,
        });
    }
    let expected = crate::config::chunk_len(volume_bytes, chunk_bytes, c.index);
    if c.raw_len != expected {
        return Err(ProtocolError::ChunkLength {
            index: c.index,
            len: c.raw_len,
            expected,
        });
    }
    let n = c.raw_len as usize;
    if out.len() < n {
        return Err(ProtocolError::ChunkLength {
            index: c.index,
            len: c.raw_len,
            expected: out.len() as u32,
        });
    }
    decode_into(c.encoding, &c.payload, &mut out[..n], c.index)?;
    let actual = digest(&out[..n]);
    if actual != c.digest {
        return Err(ProtocolError::DigestMismatch {
            index: c.index,
            expected: c.digest,
            actual,
        });
    }
    Ok(n)
}

/// Turn an encoded payload into exactly `out.len()` plaintext bytes; `index`
/// names the chunk (or write) in errors.
fn decode_into(encoding: Encoding, payload: &[u8], out: &mut [u8], index: u64) -> Result<()> {
    let n = out.len();
    match encoding {
        Encoding::Raw if payload.len() == n => out.copy_from_slice(payload),
        Encoding::Raw => {
            return Err(ProtocolError::Malformed {
                kind: "Chunk",
                reason: format!("{index}: {} payload bytes for {n}", payload.len()),
            })
        }
        Encoding::Lz4 => {
            let got = lz4_flex::block::decompress_into(payload, out).map_err(|e| {
                ProtocolError::Decompress {
                    index,
                    reason: e.to_string(),
                }
            })?;
            if got != n {
                return Err(ProtocolError::Decompress {
                    index,
                    reason: format!("produced {got} bytes, expected {n}"),
                });
            }
        }
        Encoding::Zero => out.fill(0),
    }
    Ok(())
}

/// xxh3-128 of a chunk's plaintext.
pub fn digest(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// Build a chunk frame from plaintext: zero marker, lz4 (if `compress`) where
/// it shrinks the chunk by at least 1/16, raw otherwise. `digest` is the plaintext's xxh3-128.
pub fn seal_chunk(
    index: u64,
    data: Vec<u8>,
    digest: u128,
    zero_digest: u128,
    compress: bool,
) -> ChunkFrame {
    let raw_len = data.len() as u32;
    if digest == zero_digest && data.iter().all(|&b| b == 0) {
        return ChunkFrame {
            index,
            encoding: Encoding::Zero,
            raw_len,
            digest,
            payload: Bytes::new(),
        };
    }
    // Cheap probe: if the first 4 KiB does not compress, the chunk is sent raw
    // (random data would otherwise cost a full compression pass).
    let probe = &data[..data.len().min(4096)];
    let worth = compress
        && (data.len() <= 4096 || {
            let p = lz4_flex::block::compress(probe);
            p.len() < probe.len() * 15 / 16
        });
    if worth {
        let c = lz4_flex::block::compress(&data);
        if c.len() < data.len() - data.len() / 16 && !c.is_empty() {
            return ChunkFrame {
                index,
                encoding: Encoding::Lz4,
                raw_len,
                digest,
                payload: Bytes::from(c),
            };
        }
    }
    ChunkFrame {
        index,
        encoding: Encoding::Raw,
        raw_len,
        digest,
        payload: Bytes::from(data),
    }
}

/// Streaming root digest over a digest map, identical on both sides.
pub struct RootHasher(xxhash_rust::xxh3::Xxh3);

impl Default for RootHasher {
    fn default() -> Self {
        RootHasher(xxhash_rust::xxh3::Xxh3::new())
    }
}

impl RootHasher {
    pub fn update(&mut self, d: u128) {
        self.0.update(&d.to_le_bytes());
    }
    pub fn finish(&self) -> u128 {
        self.0.digest128()
    }
}

#[cfg(test)]
mod tests;
