//! Fuzz targets: one function per decoder of untrusted bytes, with the
//! checks a fuzzer needs to call a run a failure (a panic).
//!
//! | target | what it decodes | what it checks beyond "no panic" |
//! | --- | --- | --- |
//! | [`frame`] | one wire frame (`protocol::decode`) | a decoded frame re-encodes to the same frame; a chunk or write that passes the mirror's checks holds the plaintext its digest names, inside the volume |
//! | [`nbd`] | a client's byte stream to the NBD server (handshake and requests) | the backend only sees in-bounds, aligned, non-empty ranges; every write, trim and zero range it gets was asked for by a request in the stream, with that payload; after a valid handshake the output is simple replies to cookies the requests carried, a successful read's followed by its data; the connection ends when the stream does |
//! | [`bitmap`] | a bitmap file (primary state, `NAME.changed`) | a decoded bitmap re-encodes to the same bytes, with no bit past the last chunk |
//! | [`digest_map`] | a digest map file | a loaded map has one digest per chunk and saves and loads to the same digests |
//! | [`points`] | a volume's recovery points (`index.toml` and an undo log) | every chunk a point lists reads back as a chunk of the volume's chunk size |
//! | [`volume_meta`] | a mirror store's `NAME.meta`, `NAME.digests`, `NAME.changed` | an opened replica has the geometry the primary asked for |
//! | [`primary_state`] | a primary's `volume.toml`, `digests` and `bitmap` | an opened state has a valid chunk size and one digest and bit per chunk |
//!
//! Each returns whether the input was accepted (decoded, opened), so that
//! tests can check that their seeds reach past the first checks. The seeds
//! ([`seeds`]) are valid inputs made by the real encoders. `cargo fuzz`
//! runs these functions from `fuzz/` (coverage-guided, nightly); the unit
//! tests below run them over seeded random mutations of the seeds on every
//! `cargo test` (stable). See "Fuzzing" in the README.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::config;
use crate::frontend::nbd::{self, proto, Backend, NbdError};
use crate::protocol::{self, Encoding, Frame};
use crate::track::{Bitmap, DigestMap};

/// A fuzz target: takes any bytes, panics on a broken promise, returns
/// whether the input was accepted.
pub type Target = fn(&[u8]) -> bool;

/// The targets by name, as `cargo fuzz` and the tests know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("nbd", nbd),
    ("bitmap", bitmap),
    ("digest_map", digest_map),
    ("points", points),
    ("volume_meta", volume_meta),
    ("primary_state", primary_state),
];

/// Run target `name` on `data` (`None`: no such target).
pub fn run(name: &str, data: &[u8]) -> Option<bool> {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| f(data))
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Split `data` into `n` parts: the first `n - 1` each prefixed by a
/// little-endian u16 length (cut short where the data ends), the last the rest.
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    for _ in 1..n {
        let len = match rest {
            [a, b, tail @ ..] => {
                rest = tail;
                usize::from(u16::from_le_bytes([*a, *b]))
            }
            _ => {
                rest = &[];
                0
            }
        };
        let len = len.min(rest.len());
        parts.push(&rest[..len]);
        rest = &rest[len..];
    }
    parts.push(rest);
    parts
}

/// The inverse of [`split`] (for seeds). Parts but the last must be shorter
/// than 64 KiB.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, p) in parts.iter().enumerate() {
        if k + 1 < parts.len() {
            let len = u16::try_from(p.len()).expect("seed part shorter than 64 KiB");
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// A fresh, empty directory for one run (the same path each time on a
/// thread; in memory where /dev/shm exists).
fn scratch_dir() -> PathBuf {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            let base = Path::new("/dev/shm");
            let dir = if base.is_dir() {
                tempfile::Builder::new()
                    .prefix("blkmirror-fuzz")
                    .tempdir_in(base)
            } else {
                tempfile::Builder::new().prefix("blkmirror-fuzz").tempdir()
            };
            *s = Some(dir.expect("temporary directory for the fuzz target"));
        }
        let root = s.as_ref().expect("set above").path().join("run");
        if root.exists() {
            std::fs::remove_dir_all(&root).expect("clearing the fuzz directory");
        }
        std::fs::create_dir(&root).expect("creating the fuzz directory");
        root
    })
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("writing a fuzz input file");
}

/// Boundary values the structured modes pick most of the time.
pub const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    3,
    0x7f,
    0x80,
    0xff,
    0x200,
    0x1000,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x10_0000,
    0x20_0000,
    0x40_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 50,
    (1 << 50) + 1,
    i64::MAX as u64,
    u64::MAX,
];

/// Typed values read from fuzz bytes (zeros once they run out): the
/// structured modes build a well-formed document whose values the fuzzer
/// chooses, where byte mutations of TOML text would mostly break its syntax.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        for x in &mut a {
            *x = self.byte();
        }
        u64::from_le_bytes(a)
    }
    /// A boundary value (most bytes), else any value.
    fn number(&mut self) -> u64 {
        let b = usize::from(self.byte());
        match INTERESTING_U64.get(b % 32) {
            Some(v) if b < 224 => *v,
            _ => self.u64(),
        }
    }
    /// `usual` most of the time, else [`Fields::number`].
    fn usually(&mut self, usual: u64) -> u64 {
        if self.byte() < 128 {
            usual
        } else {
            self.number()
        }
    }
    /// A 128-bit hex id, now and then not one.
    fn id(&mut self) -> String {
        match self.byte() {
            0..=239 => format!("{:016x}{:016x}", self.u64(), self.u64()),
            240..=247 => String::new(),
            _ => "not-hex".into(),
        }
    }
    fn pick<'s>(&mut self, of: &[&'s str]) -> &'s str {
        of[usize::from(self.byte()) % of.len()]
    }
}

/// TOML integers are i64: a value beyond it is written as a string, which
/// the reader must refuse as well.
fn toml_int(v: u64) -> String {
    if v > i64::MAX as u64 {
        format!("\"{v}\"")
    } else {
        v.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Geometry the chunk and write checks run against: a short last chunk.
const FRAME_VOLUME_BYTES: u64 = (1 << 30) + 12_288;
const FRAME_CHUNK_BYTES: u32 = 64 * 1024;

/// Decode one frame; check that it re-encodes to itself and that what the
/// mirror's checks accept is the plaintext the frame's digest names.
pub fn frame(data: &[u8]) -> bool {
    let max = config::FRAME_PAYLOAD_BYTES_MAX;
    let (frame, used) = match protocol::decode(data, max) {
        Ok(Some(decoded)) => decoded,
        Ok(None) | Err(_) => return false,
    };
    assert!(
        (protocol::HEADER_BYTES..=data.len()).contains(&used),
        "consumed {used} of {} bytes",
        data.len()
    );
    let bytes = protocol::encode_to_vec(&frame);
    match protocol::decode(&bytes, max) {
        Ok(Some((again, n))) => {
            assert_eq!(n, bytes.len(), "re-encoded frame has trailing bytes");
            assert_eq!(again, frame, "frame changed in a round trip");
        }
        other => panic!("re-encoded {frame:?} does not decode: {other:?}"),
    }
    let mut out = vec![0u8; config::CHUNK_BYTES_MAX as usize];
    match &frame {
        Frame::Chunk(c) | Frame::LiveChunk { chunk: c, .. } => {
            if let Ok(n) = protocol::open_chunk(c, FRAME_VOLUME_BYTES, FRAME_CHUNK_BYTES, &mut out)
            {
                assert_eq!(n, c.raw_len as usize);
                assert_eq!(
                    n as u32,
                    config::chunk_len(FRAME_VOLUME_BYTES, FRAME_CHUNK_BYTES, c.index)
                );
                assert_eq!(protocol::digest(&out[..n]), c.digest, "digest not checked");
                if c.encoding == Encoding::Zero {
                    assert!(out[..n].iter().all(|&b| b == 0));
                }
            }
        }
        Frame::Write(w) => {
            if let Ok(n) = protocol::open_write(w, FRAME_VOLUME_BYTES, &mut out) {
                assert_eq!(n, w.raw_len as usize);
                assert!(
                    w.offset + n as u64 <= FRAME_VOLUME_BYTES,
                    "write past the end"
                );
                assert_eq!(protocol::digest(&out[..n]), w.digest, "digest not checked");
                let plain = protocol::write_plaintext(w, FRAME_VOLUME_BYTES)
                    .expect("write_plaintext accepts what open_write accepts");
                assert_eq!(&plain[..], &out[..n]);
            }
        }
        _ => {}
    }
    true
}

// ---------------------------------------------------------------------------------------------
// NBD
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum MemOp {
    Write(u64, Vec<u8>),
    Trim(u64, u64),
    Zero(u64, u64),
}

/// An in-memory export that checks the server's promises to a backend.
struct MemBackend {
    size: u64,
    min_block: u32,
    image: Mutex<Vec<u8>>,
    ops: Mutex<Vec<MemOp>>,
}

impl MemBackend {
    fn check(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        assert!(len > 0, "{what} of 0 bytes reached the backend");
        assert!(len <= u64::from(proto::PAYLOAD_BYTES_MAX) || what != "write");
        let end = offset.checked_add(len).expect("range overflows");
        assert!(
            end <= self.size,
            "{what} {offset}+{len} past the end ({})",
            self.size
        );
        let mb = u64::from(self.min_block);
        assert!(
            offset % mb == 0 && len % mb == 0,
            "{what} {offset}+{len} not aligned to {mb}"
        );
        offset as usize..end as usize
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn min_block(&self) -> u32 {
        self.min_block
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        let r = self.check("read", offset, u64::from(len));
        Ok(self.image.lock().expect("image")[r].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), NbdError> {
        let r = self.check("write", offset, data.len() as u64);
        self.image.lock().expect("image")[r].copy_from_slice(&data);
        self.ops
            .lock()
            .expect("ops")
            .push(MemOp::Write(offset, data));
        Ok(())
    }
    async fn flush(&self) -> Result<(), NbdError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check("trim", offset, len);
        self.ops.lock().expect("ops").push(MemOp::Trim(offset, len));
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), NbdError> {
        let r = self.check("write_zeroes", offset, len);
        self.image.lock().expect("image")[r].fill(0);
        self.ops.lock().expect("ops").push(MemOp::Zero(offset, len));
        Ok(())
    }
}

/// What the requests in a stream say about a cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CookieUse {
    /// Only in READ requests of this length.
    Read(u32),
    /// Only in requests that are not reads.
    Other,
    /// In both, or in reads of different lengths.
    Mixed,
}

/// Every request header anywhere in `stream` (also inside payloads, which
/// only widens what the checks allow), with the offset just past it.
fn request_headers(stream: &[u8]) -> Vec<(usize, proto::Request)> {
    stream
        .windows(proto::REQUEST_BYTES)
        .enumerate()
        .filter_map(|(at, h)| {
            let h: &[u8; proto::REQUEST_BYTES] = h.try_into().ok()?;
            let r = proto::parse_request(h).ok()?;
            Some((at + proto::REQUEST_BYTES, r))
        })
        .collect()
}

/// The requests the server reads from `stream` when it is the whole
/// transmission phase, one after another, with the offset just past each
/// header. This models the framing alone, not `proto::decide`: a header with
/// a bad magic ends the connection, as do DISC and a WRITE whose payload is
/// over the maximum (neither is answered); every other WRITE is followed by
/// its payload, which the server reads or drains; a request cut off by the
/// end of the stream is not served.
fn framed_requests(stream: &[u8]) -> Vec<(usize, proto::Request)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = stream.get(at..at + proto::REQUEST_BYTES) {
        let h: &[u8; proto::REQUEST_BYTES] = h.try_into().expect("a header's length");
        let Ok(r) = proto::parse_request(h) else {
            break;
        };
        let end = at + proto::REQUEST_BYTES;
        if r.kind == proto::CMD_DISC
            || (r.kind == proto::CMD_WRITE && r.len > proto::PAYLOAD_BYTES_MAX)
        {
            break;
        }
        let payload = if r.kind == proto::CMD_WRITE {
            r.len as usize
        } else {
            0
        };
        if stream.len() - end < payload {
            break;
        }
        out.push((end, r));
        at = end + payload;
    }
    out
}

/// How many requests of `requests` carry each cookie.
fn cookie_counts(requests: &[(usize, proto::Request)]) -> std::collections::HashMap<u64, u64> {
    let mut n = std::collections::HashMap::new();
    for (_, r) in requests {
        *n.entry(r.cookie).or_insert(0) += 1;
    }
    n
}

/// The cookies of `requests`.
fn cookie_uses(requests: &[(usize, proto::Request)]) -> std::collections::HashMap<u64, CookieUse> {
    let mut uses = std::collections::HashMap::new();
    for (_, r) in requests {
        let this = if r.kind == proto::CMD_READ {
            CookieUse::Read(r.len)
        } else {
            CookieUse::Other
        };
        uses.entry(r.cookie)
            .and_modify(|u| {
                if *u != this {
                    *u = CookieUse::Mixed
                }
            })
            .or_insert(this);
    }
    uses
}

/// Parses the server's replies as they are written (after `skip` bytes of
/// handshake): each must be a simple reply to a cookie some request carried,
/// followed by the data of a successful read, and no cookie may get more
/// replies than requests carried it (the caller checks at the end that each
/// got exactly as many).
#[derive(Default)]
struct Replies {
    skip: u64,
    cookies: std::collections::HashMap<u64, CookieUse>,
    /// Requests per cookie, and replies per cookie so far.
    expected: std::collections::HashMap<u64, u64>,
    got: std::collections::HashMap<u64, u64>,
    header: Vec<u8>,
    data_left: u64,
    replies: u64,
    /// A reply to a cookie used by reads and other requests: whether data
    /// follows is unknown, so parsing stops there.
    lost: bool,
    failure: Option<String>,
}

impl Replies {
    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() && !self.lost && self.failure.is_none() {
            if self.skip > 0 {
                let n = (self.skip.min(buf.len() as u64)) as usize;
                self.skip -= n as u64;
                buf = &buf[n..];
            } else if self.data_left > 0 {
                let n = (self.data_left.min(buf.len() as u64)) as usize;
                self.data_left -= n as u64;
                buf = &buf[n..];
            } else {
                let n = (proto::SIMPLE_REPLY_BYTES - self.header.len()).min(buf.len());
                self.header.extend_from_slice(&buf[..n]);
                buf = &buf[n..];
                if self.header.len() == proto::SIMPLE_REPLY_BYTES {
                    let h = std::mem::take(&mut self.header);
                    self.reply(&h);
                }
            }
        }
    }

    fn reply(&mut self, h: &[u8]) {
        self.replies += 1;
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        if magic != proto::SIMPLE_REPLY_MAGIC {
            self.failure = Some(format!("reply {} has magic {magic:#x}", self.replies));
            return;
        }
        let got = self.got.entry(cookie).or_insert(0);
        *got += 1;
        let expected = self.expected.get(&cookie).copied().unwrap_or(0);
        if *got > expected && expected > 0 {
            self.failure = Some(format!(
                "reply {} is reply {got} for cookie {cookie:#x}, which {expected} request(s) carried",
                self.replies
            ));
            return;
        }
        match self.cookies.get(&cookie) {
            None => {
                self.failure = Some(format!(
                    "reply {} is for cookie {cookie:#x}, which no request carried",
                    self.replies
                ))
            }
            Some(CookieUse::Read(len)) if error == 0 => self.data_left = u64::from(*len),
            Some(CookieUse::Mixed) if error == 0 => self.lost = true,
            Some(_) => {}
        }
    }
}

/// What the server wrote back: its length, its first bytes, its replies.
#[derive(Default)]
struct Output {
    bytes: u64,
    head: Vec<u8>,
    replies: Option<Replies>,
}

const OUTPUT_HEAD_BYTES: usize = 4096;

struct Sink(Arc<Mutex<Output>>);

impl tokio::io::AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut out = self.0.lock().expect("output");
        out.bytes += buf.len() as u64;
        let room = OUTPUT_HEAD_BYTES.saturating_sub(out.head.len());
        out.head.extend_from_slice(&buf[..buf.len().min(room)]);
        if let Some(r) = &mut out.replies {
            r.feed(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The export name the NBD target serves.
pub const NBD_EXPORT: &str = "fuzz";

/// A client's fixed newstyle handshake that selects the export with
/// `NBD_OPT_GO` (no info requests).
pub fn nbd_handshake() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes()); // IHAVEOPT
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    let name = NBD_EXPORT.as_bytes();
    b.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// One transmission request as a client sends it.
fn nbd_request(
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; proto::REQUEST_BYTES] {
    proto::encode_request(&proto::Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    })
}

/// Whether `requests` (headers of `stream`) hold one of type `kind` for
/// `offset`/`len`, followed in `stream` by `payload` if one is given.
fn requested(
    stream: &[u8],
    requests: &[(usize, proto::Request)],
    kind: u16,
    offset: u64,
    len: u64,
    payload: Option<&[u8]>,
) -> bool {
    requests.iter().any(|(end, r)| {
        r.kind == kind
            && r.offset == offset
            && u64::from(r.len) == len
            && payload.is_none_or(|p| stream.get(*end..end + p.len()) == Some(p))
    })
}

thread_local! {
    /// Bytes the server writes for [`nbd_handshake`], by export geometry.
    static HANDSHAKE_OUTPUT: RefCell<std::collections::HashMap<(u32, u64), u64>> =
        RefCell::new(std::collections::HashMap::new());
}

/// How many bytes the server answers [`nbd_handshake`] with (served once per
/// geometry on a thread, then remembered).
fn handshake_output_bytes(size: u64, min_block: u32) -> u64 {
    if let Some(n) = HANDSHAKE_OUTPUT.with(|h| h.borrow().get(&(min_block, size)).copied()) {
        return n;
    }
    let alone = Arc::new(MemBackend {
        size,
        min_block,
        image: Mutex::new(Vec::new()),
        ops: Mutex::new(Vec::new()),
    });
    let n = serve_memory(nbd_handshake(), alone, None).bytes;
    HANDSHAKE_OUTPUT.with(|h| h.borrow_mut().insert((min_block, size), n));
    n
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime for the NBD target");
}

/// Serve `stream` on one connection to `backend`; returns what the server
/// wrote (with `replies`, checked as they were written).
fn serve_memory(stream: Vec<u8>, backend: Arc<MemBackend>, replies: Option<Replies>) -> Output {
    let output = Arc::new(Mutex::new(Output {
        replies,
        ..Output::default()
    }));
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let served = RUNTIME.with(|rt| {
        rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                nbd::serve_connection(
                    io::Cursor::new(stream),
                    Sink(output.clone()),
                    backend,
                    NBD_EXPORT,
                    stop_rx,
                ),
            )
            .await
        })
    });
    assert!(
        served.is_ok(),
        "the connection did not end within 20 s of its input"
    );
    let mut out = output.lock().expect("output");
    std::mem::take(&mut *out)
}

/// Feed `data` to one NBD connection as the client's bytes. The first byte
/// chooses the set-up: bit 0 prepends a valid handshake ([`nbd_handshake`]),
/// bits 1-2 the minimum block size (1, 512, 4096, 1), bits 3-4 the export
/// size (1 MiB plus 0-3 blocks of 4 KiB). Returns whether the server wrote
/// anything after its greeting.
pub fn nbd(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let min_block = [1u32, 512, 4096, 1][usize::from((mode >> 1) & 3)];
    let size = (1u64 << 20) + 4096 * u64::from((mode >> 3) & 3);
    let handshake = if mode & 1 != 0 {
        nbd_handshake()
    } else {
        Vec::new()
    };
    let backend = Arc::new(MemBackend {
        size,
        min_block,
        image: Mutex::new(vec![0u8; size as usize]),
        ops: Mutex::new(Vec::new()),
    });
    // With the handshake prepended, `rest` is the transmission phase, read
    // request after request, and the server's output after the handshake is
    // replies only. Without it, where transmission starts is unknown: any
    // header anywhere in the input may be a request.
    let requests = if handshake.is_empty() {
        request_headers(rest)
    } else {
        framed_requests(rest)
    };
    let replies = (!handshake.is_empty()).then(|| Replies {
        skip: handshake_output_bytes(size, min_block),
        cookies: cookie_uses(&requests),
        expected: cookie_counts(&requests),
        ..Replies::default()
    });
    let out = serve_memory([&handshake[..], rest].concat(), backend.clone(), replies);
    // Every change to the export was asked for, with these bytes.
    for op in backend.ops.lock().expect("ops").iter() {
        let ok = match op {
            MemOp::Write(offset, data) => requested(
                rest,
                &requests,
                proto::CMD_WRITE,
                *offset,
                data.len() as u64,
                Some(data),
            ),
            MemOp::Trim(offset, len) => {
                requested(rest, &requests, proto::CMD_TRIM, *offset, *len, None)
            }
            MemOp::Zero(offset, len) => requested(
                rest,
                &requests,
                proto::CMD_WRITE_ZEROES,
                *offset,
                *len,
                None,
            ),
        };
        assert!(
            ok,
            "the backend got {op:?}, which no request in the stream asked for"
        );
    }
    if let Some(r) = &out.replies {
        if let Some(f) = &r.failure {
            panic!("{f}");
        }
        if !r.lost {
            assert!(
                r.header.is_empty() && r.data_left == 0,
                "the output ends inside a reply ({} header bytes, {} data bytes missing)",
                r.header.len(),
                r.data_left
            );
            // Every request the server read was answered, once.
            for (cookie, &n) in &r.expected {
                let got = r.got.get(cookie).copied().unwrap_or(0);
                assert_eq!(got, n, "cookie {cookie:#x}: {n} request(s), {got} replies");
            }
        }
    }
    let greeting = proto::greeting();
    assert!(
        out.head.starts_with(&greeting),
        "the server did not start with its greeting"
    );
    out.bytes > greeting.len() as u64
}

// ---------------------------------------------------------------------------------------------
// On-disk metadata
// ---------------------------------------------------------------------------------------------

/// Input: a u16 chunk count minus one (little-endian), then the file.
pub fn bitmap(data: &[u8]) -> bool {
    let [a, b, file @ ..] = data else {
        return false;
    };
    let chunks = u64::from(u16::from_le_bytes([*a, *b])) + 1;
    let path = Path::new("fuzz.bitmap");
    let Ok(bm) = Bitmap::decode(path, file, chunks) else {
        return false;
    };
    assert_eq!(bm.chunks(), chunks);
    let encoded = bm.encode();
    let again = Bitmap::decode(path, &encoded, chunks).expect("a re-encoded bitmap decodes");
    assert_eq!(again.encode(), encoded, "bitmap changed in a round trip");
    for slot in 0..bm.peer_count() {
        assert!(bm.count(slot) <= chunks, "bits past the last chunk");
    }
    true
}

/// Input: a byte whose low 5 bits give the expected chunk size (4 KiB
/// shifted, clamped to the valid range), a u32 volume size (little-endian),
/// then the file.
pub fn digest_map(data: &[u8]) -> bool {
    let [shift, v0, v1, v2, v3, file @ ..] = data else {
        return false;
    };
    let chunk_bytes = config::CHUNK_BYTES_MIN << (shift & 31).min(8);
    let volume_bytes = u64::from(u32::from_le_bytes([*v0, *v1, *v2, *v3]));
    let dir = scratch_dir();
    let path = dir.join("digests");
    write(&path, file);
    let Ok(mut map) = DigestMap::load(&path, volume_bytes, chunk_bytes) else {
        return false;
    };
    let chunks = config::chunk_count(volume_bytes, chunk_bytes);
    assert_eq!(map.len(), chunks);
    assert_eq!(map.all().len() as u64, chunks);
    let digests = map.all().to_vec();
    map.create_file(&path).expect("saving a loaded digest map");
    let again = DigestMap::load(&path, volume_bytes, chunk_bytes).expect("a saved map loads");
    assert_eq!(again.all(), &digests[..]);
    true
}

const POINTS_VOLUME: &str = "v";

/// Input: a byte choosing the volume's chunk size (as in [`digest_map`]),
/// a u32 volume size, then [`split`] into `index.toml` and the undo log of
/// the point the index lists first (none listed: a log of point 1).
pub fn points(data: &[u8]) -> bool {
    let [shift, v0, v1, v2, v3, rest @ ..] = data else {
        return false;
    };
    let chunk_bytes = config::CHUNK_BYTES_MIN << (shift & 31).min(8);
    let volume_bytes = u64::from(u32::from_le_bytes([*v0, *v1, *v2, *v3]));
    let parts = split(rest, 2);
    let store = scratch_dir();
    let dir = store.join(format!("{POINTS_VOLUME}.points"));
    std::fs::create_dir(&dir).expect("points directory");
    if shift & 0x80 != 0 {
        // Structured: an index whose values the fuzzer picks.
        write(
            &dir.join("index.toml"),
            points_index(parts[0], volume_bytes, chunk_bytes).as_bytes(),
        );
    } else {
        write(&dir.join("index.toml"), parts[0]);
    }
    let index_text = std::fs::read(dir.join("index.toml")).expect("index");
    // Name the log after the first id the index lists, if it parses.
    let first_id = std::str::from_utf8(&index_text)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| {
            let points = t.get("points")?.as_array()?.first()?.as_table()?.clone();
            let id = points.get("id")?.as_str()?.to_string();
            u64::from_str_radix(&id, 16).ok()
        })
        .unwrap_or(1);
    write(&dir.join(format!("{first_id:016x}.undo")), parts[1]);
    let Ok(points) =
        crate::recovery::points::Points::open(&store, POINTS_VOLUME, volume_bytes, chunk_bytes)
    else {
        return false;
    };
    let chunks = config::chunk_count(volume_bytes, chunk_bytes);
    for p in points.list() {
        let Ok(changed) = points.changed_since(p.id) else {
            continue;
        };
        for i in changed.into_iter().take(64) {
            assert!(i < chunks, "point {} lists chunk {i} of {chunks}", p.id);
            if let Ok(Some(old)) = points.chunk_at(p.id, i) {
                assert_eq!(
                    old.len() as u32,
                    config::chunk_len(volume_bytes, chunk_bytes, i),
                    "point {} chunk {i}",
                    p.id
                );
            }
        }
    }
    true
}

/// An `index.toml` built from fuzz bytes (the points' own geometry usually
/// the volume's).
fn points_index(data: &[u8], volume_bytes: u64, chunk_bytes: u32) -> String {
    let mut f = Fields(data);
    let mut t = format!(
        "format = {}\nvolume_bytes = {}\nchunk_bytes = {}\nnext_id = \"{:x}\"\n",
        toml_int(f.usually(1)),
        toml_int(f.usually(volume_bytes)),
        toml_int(f.usually(u64::from(chunk_bytes))),
        f.usually(3),
    );
    if f.byte() >= 224 {
        t += &format!(
            "[merging]\ninto = \"{:x}\"\nfrom = \"{:x}\"\ninto_bytes = {}\n",
            f.usually(1),
            f.usually(2),
            toml_int(f.number())
        );
    }
    for k in 0..u64::from(f.byte() % 4) {
        let name = f.pick(&["p", "", "a/b", "..", "x\\u0000", "long-name"]);
        let kind = f.pick(&[
            "Manual",
            "Auto",
            "Resync",
            "Failback",
            "SplitBrain",
            "Other",
        ]);
        t += &format!(
            "[[points]]\nid = \"{:x}\"\nname = \"{name}\"\nkind = \"{kind}\"\ncreated_unix = {}\n",
            f.usually(k + 1),
            toml_int(f.number())
        );
    }
    t
}

/// The hello the store target's primary sends.
fn meta_hello(flags: u8) -> protocol::Hello {
    protocol::Hello {
        volume: POINTS_VOLUME.to_string(),
        volume_bytes: 4 << 20,
        chunk_bytes: 64 * 1024,
        flags: flags & (protocol::HELLO_FLAG_RESIZE | protocol::HELLO_FLAG_REINIT),
        source_id: 1,
    }
}

/// A fingerprint the store target's primary has.
pub const META_PEER: &str =
    "sha256:0101010101010101010101010101010101010101010101010101010101010101";

/// Input: a flags byte for the primary's hello (resize, re-initialise),
/// then [`split`] into `NAME.meta`, `NAME.digests`, `NAME.changed`. The
/// store also holds a 4 MiB `NAME.img`; the hello asks for 4 MiB in 64 KiB
/// chunks.
pub fn volume_meta(data: &[u8]) -> bool {
    let Some((&flags, rest)) = data.split_first() else {
        return false;
    };
    let parts = split(rest, 3);
    let dir = scratch_dir();
    let name = POINTS_VOLUME;
    if flags & 0x80 != 0 {
        // Structured: a meta whose values the fuzzer picks; a promoted
        // volume's primary state directory holds the changed bitmap.
        let mut f = Fields(parts[0]);
        let hello = meta_hello(0);
        let promoted = f.byte() & 1 != 0;
        let meta = crate::mirror::store::VolumeMeta {
            format: f.usually(1) as u32,
            replica_id: f.id(),
            source_id: f.id(),
            state: [
                protocol::ReplicaState::New,
                protocol::ReplicaState::Inconsistent,
                protocol::ReplicaState::UpToDate,
            ][usize::from(f.byte() % 3)],
            generation: f.u64(),
            volume_bytes: f.usually(hello.volume_bytes),
            chunk_bytes: f.usually(u64::from(hello.chunk_bytes)) as u32,
            updated_unix: f.number() & (i64::MAX as u64),
            last_primary: META_PEER.into(),
            gen_bitmap: f.u64(),
            gen_history0: f.u64(),
            gen_history1: f.u64(),
            role: if promoted {
                crate::mirror::store::Role::Primary
            } else {
                crate::mirror::store::Role::Secondary
            },
            promoted_unix: 0,
            primary_state: if promoted {
                dir.join("primary").display().to_string()
            } else {
                String::new()
            },
            undo_point: f.number() & (i64::MAX as u64),
        };
        let Ok(text) = toml::to_string(&meta) else {
            return false;
        };
        write(&dir.join(format!("{name}.meta")), text.as_bytes());
        if promoted {
            std::fs::create_dir(dir.join("primary")).expect("primary state directory");
            write(&dir.join("primary/bitmap"), parts[2]);
        }
    } else {
        write(&dir.join(format!("{name}.meta")), parts[0]);
    }
    write(&dir.join(format!("{name}.digests")), parts[1]);
    if !parts[2].is_empty() {
        write(&dir.join(format!("{name}.changed")), parts[2]);
    }
    let img = std::fs::File::create(dir.join(format!("{name}.img"))).expect("image");
    img.set_len(4 << 20).expect("image size");
    drop(img);
    let store = crate::mirror::store::Store::open(&dir).expect("store");
    let hello = meta_hello(flags);
    // What `volumes` and a probe read, then what a session opens.
    let _ = store.list();
    let _ = store.probe(&hello, META_PEER);
    let Ok(replica) = store.open_volume(&hello, META_PEER, None) else {
        return false;
    };
    assert_eq!(replica.meta.volume_bytes, hello.volume_bytes);
    assert_eq!(replica.meta.chunk_bytes, hello.chunk_bytes);
    assert_eq!(
        replica.map.len(),
        config::chunk_count(hello.volume_bytes, hello.chunk_bytes)
    );
    let _ = replica.changed_words(&dir, META_PEER);
    true
}

/// Input: a byte (bit 0: the user asked for 4 KiB chunks; bit 1: `--full`;
/// bit 2: `--resize`), a u32 source size, then [`split`] into `volume.toml`,
/// `digests`, `bitmap`.
pub fn primary_state(data: &[u8]) -> bool {
    let [opts, v0, v1, v2, v3, rest @ ..] = data else {
        return false;
    };
    let volume_bytes = u64::from(u32::from_le_bytes([*v0, *v1, *v2, *v3]));
    let parts = split(rest, 3);
    let root = scratch_dir();
    let dir = root.join(POINTS_VOLUME);
    std::fs::create_dir(&dir).expect("state directory");
    if opts & 0x80 != 0 {
        // Structured: a volume.toml whose values the fuzzer picks.
        let mut f = Fields(parts[0]);
        let peers = (0..f.byte() % 3)
            .map(|_| crate::primary::state::PeerRecord {
                fingerprint: if f.byte() < 200 {
                    META_PEER.into()
                } else {
                    "sha256:zz".into()
                },
                replica_id: f.id(),
                synced: f.byte() & 1 != 0,
                generation: f.u64(),
                last_sync_unix: f.number() & (i64::MAX as u64),
                tracked: f.byte() & 1 != 0,
            })
            .collect();
        let vol = crate::primary::state::VolumeState {
            format: f.usually(1) as u32,
            source_id: f.id(),
            source: "/dev/null".into(),
            volume_bytes: f.usually(volume_bytes) & (i64::MAX as u64),
            chunk_bytes: f.usually(65536) as u32,
            peers,
            gen_current: f.u64(),
            gen_bitmap: f.u64(),
            gen_history0: f.u64(),
            gen_history1: f.u64(),
            primary_since_unix: f.number() & (i64::MAX as u64),
            demoted_to: if f.byte() < 240 {
                String::new()
            } else {
                "/elsewhere".into()
            },
        };
        let Ok(text) = toml::to_string(&vol) else {
            return false;
        };
        write(&dir.join("volume.toml"), text.as_bytes());
    } else {
        write(&dir.join("volume.toml"), parts[0]);
    }
    write(&dir.join("digests"), parts[1]);
    write(&dir.join("bitmap"), parts[2]);
    let chunk_bytes = (opts & 1 != 0).then_some(config::CHUNK_BYTES_MIN);
    let Ok(state) = crate::primary::state::PrimaryState::open(
        &root,
        POINTS_VOLUME,
        Path::new("/dev/null"),
        volume_bytes,
        chunk_bytes,
        opts & 2 != 0,
        opts & 4 != 0,
    ) else {
        return false;
    };
    let cb = state.vol.chunk_bytes;
    assert!(
        cb.is_power_of_two() && (config::CHUNK_BYTES_MIN..=config::CHUNK_BYTES_MAX).contains(&cb),
        "opened a state with chunk size {cb}"
    );
    let chunks = config::chunk_count(volume_bytes, cb);
    assert_eq!(state.map.len(), chunks);
    assert_eq!(state.bitmap.chunks(), chunks);
    true
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// Valid inputs for target `name`, made by the real encoders.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "frame" => frame_seeds(),
        "nbd" => nbd_seeds(),
        "bitmap" => bitmap_seeds(),
        "digest_map" => digest_map_seeds(),
        "points" => points_seeds(),
        "volume_meta" => volume_meta_seeds(),
        "primary_state" => primary_state_seeds(),
        _ => Vec::new(),
    }
}

fn frame_seeds() -> Vec<Vec<u8>> {
    use protocol::{ChunkFrame, GenIds, Hello, HelloAck, LiveWrite, ReplicaState};
    let text: Vec<u8> = b"blkmirror ".iter().copied().cycle().take(4096).collect();
    let last = config::chunk_count(FRAME_VOLUME_BYTES, FRAME_CHUNK_BYTES) - 1;
    let last_len = config::chunk_len(FRAME_VOLUME_BYTES, FRAME_CHUNK_BYTES, last) as usize;
    let zero = vec![0u8; last_len];
    let mut chunk = text.repeat(FRAME_CHUNK_BYTES as usize / text.len());
    chunk[7] = 1;
    let seal = |index: u64, data: &[u8], compress: bool| -> ChunkFrame {
        protocol::seal_chunk(
            index,
            data.to_vec(),
            protocol::digest(data),
            protocol::digest(&zero),
            compress,
        )
    };
    let lz4 = lz4_flex::block::compress(&text);
    let frames = vec![
        Frame::Hello(Hello {
            volume: "vol".into(),
            volume_bytes: FRAME_VOLUME_BYTES,
            chunk_bytes: FRAME_CHUNK_BYTES,
            flags: protocol::HELLO_FLAG_LIVE,
            source_id: 7,
        }),
        Frame::HelloAck(HelloAck {
            replica_id: 1,
            state: ReplicaState::UpToDate,
            source_id: 2,
            gen: GenIds {
                current: 3,
                bitmap: 4,
                history: [5, 6],
            },
            volume_bytes: FRAME_VOLUME_BYTES,
            chunk_bytes: FRAME_CHUNK_BYTES,
            created: false,
            primary: false,
            changed: 0,
            promoted_unix: 0,
        }),
        Frame::Error {
            message: "refused".into(),
        },
        Frame::Chunk(seal(3, &chunk, true)),
        Frame::Chunk(seal(4, &chunk, false)),
        Frame::Chunk(seal(last, &zero, true)),
        Frame::ZeroRun { first: 9, count: 4 },
        Frame::Barrier { seq: 11 },
        Frame::DigestBatch {
            first: 2,
            digests: vec![1, 2, 3],
        },
        Frame::Write(LiveWrite {
            seq: 12,
            offset: 8192,
            flags: protocol::LIVE_FLAG_FUA,
            encoding: Encoding::Raw,
            raw_len: text.len() as u32,
            digest: protocol::digest(&text),
            payload: text.clone().into(),
        }),
        Frame::Write(LiveWrite {
            seq: 13,
            offset: FRAME_VOLUME_BYTES - text.len() as u64,
            flags: 0,
            encoding: Encoding::Lz4,
            raw_len: text.len() as u32,
            digest: protocol::digest(&text),
            payload: lz4.into(),
        }),
        Frame::ZeroRange {
            seq: 14,
            offset: 4096,
            len: 1 << 20,
            flags: 0,
        },
        Frame::Flush { seq: 15 },
        Frame::LiveChunk {
            seq: 16,
            chunk: seal(5, &chunk, true),
        },
        Frame::ChangedBatch {
            first_word: 0,
            words: vec![u64::MAX, 5],
        },
        Frame::VerifyChunk {
            seq: 17,
            index: 6,
            digest: 99,
        },
        Frame::Ack {
            seq: 18,
            state: ReplicaState::Inconsistent,
        },
        Frame::ReadChunks {
            first_word: 1,
            words: vec![3],
        },
    ];
    frames.iter().map(protocol::encode_to_vec).collect()
}

fn nbd_seeds() -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut requests = Vec::new();
    // mode 0b101: handshake prepended, 4096-byte blocks.
    requests.push(0b101u8);
    requests.extend(nbd_request(0, proto::CMD_WRITE, 1, 4096, 8192));
    requests.extend(&payload);
    requests.extend(nbd_request(0, proto::CMD_READ, 2, 0, 16384));
    requests.extend(nbd_request(1, proto::CMD_WRITE, 3, 65536, 512));
    requests.extend(&payload[..512]);
    requests.extend(nbd_request(0, proto::CMD_FLUSH, 4, 0, 0));
    requests.extend(nbd_request(0, proto::CMD_TRIM, 5, 1 << 19, 4096));
    requests.extend(nbd_request(0, proto::CMD_WRITE_ZEROES, 6, 1 << 18, 8192));
    requests.extend(nbd_request(0, proto::CMD_DISC, 7, 0, 0));
    // The handshake itself, with an option list and info request, in full.
    let mut handshake = vec![0u8];
    handshake.extend_from_slice(&3u32.to_be_bytes());
    handshake.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    handshake.extend_from_slice(&proto::OPT_LIST.to_be_bytes());
    handshake.extend_from_slice(&0u32.to_be_bytes());
    handshake.extend_from_slice(&nbd_handshake()[4..]);
    handshake.extend(nbd_request(0, proto::CMD_READ, 9, 0, 512));
    // Every way a request is answered without I/O, then two that do I/O,
    // and no DISC: zero-length READ, WRITE (no payload) and TRIM succeed; a
    // WRITE past the end is refused and its payload drained; an unknown
    // command, an unaligned READ and a FLUSH with an offset are refused.
    let mut answers = vec![0b101u8];
    answers.extend(nbd_request(0, proto::CMD_READ, 10, 4096, 0));
    answers.extend(nbd_request(0, proto::CMD_WRITE, 11, 4096, 0));
    answers.extend(nbd_request(0, proto::CMD_TRIM, 12, 0, 0));
    answers.extend(nbd_request(0, proto::CMD_WRITE, 13, 1 << 20, 512));
    answers.extend(&payload[..512]);
    answers.extend(nbd_request(0, 99, 14, 0, 512));
    answers.extend(nbd_request(0, proto::CMD_READ, 15, 1, 512));
    answers.extend(nbd_request(0, proto::CMD_FLUSH, 16, 512, 0));
    answers.extend(nbd_request(
        proto::CMD_FLAG_NO_HOLE,
        proto::CMD_WRITE_ZEROES,
        17,
        8192,
        4096,
    ));
    answers.extend(nbd_request(0, proto::CMD_READ, 18, 8192, 4096));
    vec![requests, handshake, answers]
}

fn bitmap_seeds() -> Vec<Vec<u8>> {
    let chunks = 1000u64;
    let mut bm = Bitmap::new(chunks);
    let slot = bm.peer_slot(&[1; 32]).expect("peer slot");
    bm.set(slot, 0);
    bm.set(slot, 999);
    let other = bm.peer_slot(&[2; 32]).expect("peer slot");
    bm.set_all(other);
    let mut seed = ((chunks - 1) as u16).to_le_bytes().to_vec();
    seed.extend(bm.encode());
    vec![seed]
}

fn digest_map_seeds() -> Vec<Vec<u8>> {
    let dir = scratch_dir();
    let path = dir.join("seed");
    let volume_bytes: u32 = 3 * 65536 + 4096;
    let mut map = DigestMap::new(u64::from(volume_bytes), 65536, 5);
    map.set(1, 77);
    map.create_file(&path).expect("seed map");
    let mut seed = vec![4u8];
    seed.extend_from_slice(&volume_bytes.to_le_bytes());
    seed.extend(std::fs::read(&path).expect("seed map"));
    vec![seed]
}

fn points_seeds() -> Vec<Vec<u8>> {
    use crate::recovery::points::{PointKind, Points};
    let store = scratch_dir();
    let volume_bytes: u32 = 8 * 4096 + 1024;
    let mut p =
        Points::open(&store, POINTS_VOLUME, u64::from(volume_bytes), 4096).expect("seed points");
    let id = p
        .create("before", PointKind::Manual, 1)
        .expect("seed point");
    p.save(2, &[2u8; 4096]).expect("seed record");
    p.save(8, &[8u8; 1024]).expect("seed record");
    p.sync().expect("seed sync");
    drop(p);
    let dir = store.join(format!("{POINTS_VOLUME}.points"));
    let index = std::fs::read(dir.join("index.toml")).expect("seed index");
    let log = std::fs::read(dir.join(format!("{id:016x}.undo"))).expect("seed log");
    let mut seed = vec![0u8];
    seed.extend_from_slice(&volume_bytes.to_le_bytes());
    seed.extend(join(&[&index, &log]));
    // Structured: the index built from fuzz bytes (zeros: usual values).
    let mut structured = vec![0x80u8];
    structured.extend_from_slice(&volume_bytes.to_le_bytes());
    structured.extend(join(&[&[0u8; 64], &log]));
    vec![seed, structured]
}

fn volume_meta_seeds() -> Vec<Vec<u8>> {
    let dir = scratch_dir();
    let store = crate::mirror::store::Store::open(&dir).expect("seed store");
    let hello = meta_hello(0);
    let mut replica = store
        .open_volume(&hello, META_PEER, None)
        .expect("seed replica");
    replica.save_meta().expect("seed meta");
    drop(replica);
    let meta = std::fs::read(dir.join(format!("{POINTS_VOLUME}.meta"))).expect("seed meta");
    let digests = std::fs::read(dir.join(format!("{POINTS_VOLUME}.digests"))).expect("seed map");
    let mut changed = Bitmap::new(config::chunk_count(hello.volume_bytes, hello.chunk_bytes));
    let fp: crate::transport::Fingerprint = META_PEER.parse().expect("fingerprint");
    let slot = changed.peer_slot(&fp.0).expect("slot");
    changed.set(slot, 3);
    let mut seeds = Vec::new();
    for with_changed in [false, true] {
        let mut seed = vec![0u8];
        let changed = if with_changed {
            changed.encode()
        } else {
            Vec::new()
        };
        seed.extend(join(&[&meta, &digests, &changed]));
        seeds.push(seed);
    }
    // Structured: the meta built from fuzz bytes (zeros: usual values).
    let mut structured = vec![0x80u8];
    structured.extend(join(&[&[0u8; 128], &digests, &changed.encode()]));
    seeds.push(structured);
    seeds
}

fn primary_state_seeds() -> Vec<Vec<u8>> {
    let root = scratch_dir();
    let volume_bytes: u32 = 5 * 65536;
    let state = crate::primary::state::PrimaryState::open(
        &root,
        POINTS_VOLUME,
        Path::new("/dev/null"),
        u64::from(volume_bytes),
        None,
        false,
        false,
    )
    .expect("seed state");
    drop(state);
    let dir = root.join(POINTS_VOLUME);
    let read = |f: &str| std::fs::read(dir.join(f)).expect("seed state file");
    let mut seed = vec![0u8];
    seed.extend_from_slice(&volume_bytes.to_le_bytes());
    seed.extend(join(&[
        &read("volume.toml"),
        &read("digests"),
        &read("bitmap"),
    ]));
    // Structured: volume.toml built from fuzz bytes (zeros: usual values).
    let mut structured = vec![0x80u8];
    structured.extend_from_slice(&volume_bytes.to_le_bytes());
    structured.extend(join(&[&[0u8; 128], &read("digests"), &read("bitmap")]));
    vec![seed, structured]
}

#[cfg(test)]
mod tests;
