//! One client connection: the handshake, then the transmission phase with a
//! reader (this task), one task per backend operation and one writer task.

use std::fmt;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::io::{BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use super::proto::{self, Command, Decision, ExportInfo, Geometry, OptionOutcome};
use super::{
    Backend, NbdError, Stream, HANDSHAKE_TIMEOUT, INFLIGHT_BYTES_MAX, INFLIGHT_REQUESTS_MAX,
    OPTIONS_MAX, SHUTDOWN_GRACE, SOCKET_BUFFER_BYTES,
};

pub(super) async fn serve_stream<B: Backend>(
    stream: Stream,
    backend: Arc<B>,
    export_name: Arc<str>,
    stop: watch::Receiver<bool>,
) {
    match stream {
        Stream::Unix(stream) => {
            let (r, w) = stream.into_split();
            serve(r, w, "unix".to_string(), backend, export_name, stop).await
        }
        Stream::Tcp(stream, peer) => {
            let (r, w) = stream.into_split();
            serve(r, w, peer.to_string(), backend, export_name, stop).await
        }
    }
}

pub(super) async fn serve<B, R, W>(
    reader: R,
    writer: W,
    peer: String,
    backend: Arc<B>,
    export_name: Arc<str>,
    mut stop: watch::Receiver<bool>,
) where
    B: Backend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    info!(%peer, "NBD connection opened");
    let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, reader);
    let mut writer = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, writer);
    let min_block = backend.min_block();
    let export = ExportInfo {
        name: export_name.to_string(),
        size: backend.size(),
        flags: proto::TRANSMISSION_FLAGS,
        min_block,
        preferred_block: min_block.max(proto::PREFERRED_BLOCK_BYTES),
        max_payload: proto::PAYLOAD_BYTES_MAX,
    };
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        negotiate(&mut reader, &mut writer, &export),
    );
    let negotiated = tokio::select! {
        result = handshake => result,
        _ = stop.wait_for(|stopped| *stopped) => {
            info!(%peer, "NBD connection closed in the handshake: server shutting down");
            return;
        }
    };
    match negotiated {
        Err(_) => {
            warn!(%peer, "NBD handshake timed out after {HANDSHAKE_TIMEOUT:?}; closing");
            return;
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            info!(%peer, "NBD connection closed by the client in the handshake");
            return;
        }
        Ok(Err(e)) => {
            warn!(%peer, "NBD handshake failed: {e}; closing");
            return;
        }
        Ok(Ok(Negotiated::Aborted)) => {
            info!(%peer, "NBD connection closed: client aborted the handshake");
            return;
        }
        Ok(Ok(Negotiated::Transmission)) => {}
    }
    debug!(%peer, size = export.size, "NBD transmission phase");
    let stats = transmit(reader, writer, backend, export.geometry(), stop).await;
    info!(
        %peer,
        requests = stats.requests,
        rejected = stats.rejected,
        bytes_read = stats.bytes_read,
        bytes_written = stats.bytes_written,
        "NBD connection closed: {}",
        stats.end
    );
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

enum Negotiated {
    Transmission,
    Aborted,
}

fn protocol_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    export: &ExportInfo,
) -> io::Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&proto::greeting()).await?;
    writer.flush().await?;
    let client = proto::parse_client_flags(reader.read_u32().await?)
        .map_err(|bits| protocol_error(format!("unknown client flags {bits:#x}")))?;
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(512);
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; proto::OPTION_HEADER_BYTES];
        reader.read_exact(&mut header).await?;
        let header =
            proto::parse_option_header(&header).map_err(|e| protocol_error(e.to_string()))?;
        // Bounded by OPTION_DATA_BYTES_MAX in parse_option_header.
        data.clear();
        data.resize(header.len as usize, 0);
        reader.read_exact(&mut data).await?;
        out.clear();
        let outcome = proto::answer_option(export, client, header.option, &data, &mut out);
        debug!(
            option = header.option,
            len = header.len,
            ?outcome,
            "NBD option"
        );
        match outcome {
            OptionOutcome::Continue | OptionOutcome::Transmit => {
                writer.write_all(&out).await?;
                writer.flush().await?;
                if outcome == OptionOutcome::Transmit {
                    return Ok(Negotiated::Transmission);
                }
            }
            OptionOutcome::Abort => {
                // The client may already be gone; the reply is a courtesy.
                if writer.write_all(&out).await.is_ok() {
                    let _ = writer.flush().await;
                }
                return Ok(Negotiated::Aborted);
            }
            OptionOutcome::Close(reason) => return Err(protocol_error(reason)),
        }
    }
    Err(protocol_error(format!("more than {OPTIONS_MAX} options")))
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

/// A reply on its way to the writer. It holds the request's permits, so
/// memory and requests are accounted until the reply is on the socket.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Vec<u8>>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Rejected requests logged at `warn` per connection; the rest at `debug`
/// (all are counted in the connection's closing line).
const REJECTIONS_LOGGED_MAX: u64 = 16;

/// Why the transmission phase ended.
enum End {
    Disconnect,
    ClientClosed,
    Protocol(String),
    Io(io::Error),
    WriterFailed,
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Disconnect => write!(f, "client sent NBD_CMD_DISC"),
            End::ClientClosed => write!(f, "client closed the connection"),
            End::Protocol(reason) => write!(f, "protocol violation: {reason}"),
            End::Io(e) => write!(f, "read error: {e}"),
            End::WriterFailed => write!(f, "sending replies failed"),
            End::Shutdown => write!(f, "server shutting down"),
        }
    }
}

struct Stats {
    requests: u64,
    rejected: u64,
    bytes_read: u64,
    bytes_written: u64,
    end: End,
}

async fn transmit<B, R, W>(
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    backend: Arc<B>,
    geometry: Geometry,
    mut stop: watch::Receiver<bool>,
) -> Stats
where
    B: Backend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(INFLIGHT_REQUESTS_MAX));
    let bytes = Arc::new(Semaphore::new(INFLIGHT_BYTES_MAX as usize));
    // Every reply holds a slot, so at most INFLIGHT_REQUESTS_MAX replies exist
    // and a send never waits.
    let (tx, rx) = mpsc::channel::<Reply>(INFLIGHT_REQUESTS_MAX);
    let mut writer_task = tokio::spawn(write_replies(rx, writer, backend.clone()));
    let mut stats = Stats {
        requests: 0,
        rejected: 0,
        bytes_read: 0,
        bytes_written: 0,
        end: End::Shutdown,
    };
    stats.end = {
        let ctx = Reader {
            backend: &backend,
            geometry,
            slots: &slots,
            bytes: &bytes,
            tx: &tx,
        };
        ctx.run(&mut reader, &mut stop, &mut stats).await
    };
    drop(tx);
    // The writer ends once every in-flight request has replied (each task
    // holds a sender). On shutdown it gets SHUTDOWN_GRACE, in case the client
    // stopped reading.
    let grace = async {
        let _ = stop.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let written = tokio::select! {
        result = &mut writer_task => result,
        _ = grace => {
            warn!("NBD replies not delivered within {SHUTDOWN_GRACE:?} of shutdown; dropping the connection");
            writer_task.abort();
            (&mut writer_task).await
        }
    };
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if !matches!(stats.end, End::WriterFailed) {
                debug!("NBD reply writer: {e}");
            } else {
                warn!("NBD reply writer failed: {e}");
            }
        }
        Err(e) if e.is_cancelled() => {}
        Err(e) => warn!("NBD reply writer task failed: {e}"),
    }
    // Backend operations still running (their replies had nowhere to go)
    // hold slots; wait for them so nothing outlives the connection.
    let _ = slots.acquire_many(INFLIGHT_REQUESTS_MAX as u32).await;
    stats
}

struct Reader<'a, B> {
    backend: &'a Arc<B>,
    geometry: Geometry,
    slots: &'a Arc<Semaphore>,
    bytes: &'a Arc<Semaphore>,
    tx: &'a mpsc::Sender<Reply>,
}

impl<B: Backend> Reader<'_, B> {
    async fn run<R>(
        &self,
        reader: &mut BufReader<R>,
        stop: &mut watch::Receiver<bool>,
        stats: &mut Stats,
    ) -> End
    where
        R: AsyncRead + Unpin,
    {
        let tx = self.tx;
        let halted = async {
            tokio::select! {
                _ = tx.closed() => End::WriterFailed,
                _ = stop.wait_for(|stopped| *stopped) => End::Shutdown,
            }
        };
        tokio::pin!(halted);
        // Each await below is raced against `halted` (the writer died or
        // the server is shutting down).
        macro_rules! or_halt {
            ($fut:expr) => {
                tokio::select! {
                    biased;
                    end = &mut halted => return end,
                    value = $fut => value,
                }
            };
        }
        loop {
            // Stop reading the socket while INFLIGHT_REQUESTS_MAX are in flight.
            let slot =
                or_halt!(self.slots.clone().acquire_owned()).expect("semaphore never closed");
            let mut header = [0u8; proto::REQUEST_BYTES];
            match or_halt!(reader.read_exact(&mut header)) {
                Ok(_) => self.backend.activity(),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return End::ClientClosed,
                Err(e) => return End::Io(e),
            }
            let request = match proto::parse_request(&header) {
                Ok(request) => request,
                Err(e) => {
                    warn!("NBD {e}; closing the connection");
                    return End::Protocol(e.to_string());
                }
            };
            stats.requests += 1;
            let cookie = request.cookie;
            let reply = match proto::decide(&request, &self.geometry) {
                Decision::Disconnect => return End::Disconnect,
                Decision::Close(reason) => {
                    warn!(?request, "NBD {reason}; closing the connection");
                    return End::Protocol(reason.to_string());
                }
                Decision::Succeed => Reply::new(cookie, 0, slot),
                Decision::Reject { error, drain } => {
                    stats.rejected += 1;
                    // A misbehaving client must not flood the log.
                    if stats.rejected <= REJECTIONS_LOGGED_MAX {
                        warn!(?request, "NBD request rejected: {error}");
                    } else {
                        debug!(?request, "NBD request rejected: {error}");
                    }
                    if drain > 0 {
                        match or_halt!(discard(reader, drain)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                                return End::ClientClosed
                            }
                            Err(e) => return End::Io(e),
                        }
                    }
                    Reply::new(cookie, error.errno(), slot)
                }
                Decision::Execute(command) => {
                    let payload_len = match command {
                        Command::Read { len, .. } | Command::Write { len, .. } => len,
                        _ => 0,
                    };
                    let bytes = if payload_len > 0 {
                        let permit = or_halt!(self.bytes.clone().acquire_many_owned(payload_len));
                        Some(permit.expect("semaphore never closed"))
                    } else {
                        None
                    };
                    let op = match command {
                        Command::Read { offset, len } => {
                            stats.bytes_read += u64::from(len);
                            Op::Read { offset, len }
                        }
                        Command::Write { offset, len, fua } => {
                            let data = match or_halt!(read_payload(reader, len)) {
                                Ok(data) => data,
                                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                                    return End::ClientClosed
                                }
                                Err(e) => return End::Io(e),
                            };
                            stats.bytes_written += u64::from(len);
                            Op::Write { offset, data, fua }
                        }
                        Command::Flush => Op::Flush,
                        Command::Trim { offset, len, fua } => Op::Trim { offset, len, fua },
                        Command::WriteZeroes { offset, len, fua } => {
                            Op::WriteZeroes { offset, len, fua }
                        }
                    };
                    let task = Task {
                        backend: self.backend.clone(),
                        op,
                        responder: Responder {
                            cookie,
                            tx: self.tx.clone(),
                            permits: Some((slot, bytes)),
                        },
                    };
                    tokio::spawn(task.run());
                    continue;
                }
            };
            if tx.send(reply).await.is_err() {
                return End::WriterFailed;
            }
        }
    }
}

impl Reply {
    fn new(cookie: u64, error: u32, slot: OwnedSemaphorePermit) -> Reply {
        Reply {
            cookie,
            error,
            data: None,
            _slot: slot,
            _bytes: None,
        }
    }
}

/// A backend operation with its data.
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
}

struct Task<B> {
    backend: Arc<B>,
    op: Op,
    responder: Responder,
}

impl<B: Backend> Task<B> {
    async fn run(self) {
        let Task {
            backend,
            op,
            responder,
        } = self;
        let (name, offset, len) = match &op {
            Op::Read { offset, len } => ("read", *offset, u64::from(*len)),
            Op::Write { offset, data, .. } => ("write", *offset, data.len() as u64),
            Op::Flush => ("flush", 0, 0),
            Op::Trim { offset, len, .. } => ("trim", *offset, u64::from(*len)),
            Op::WriteZeroes { offset, len, .. } => ("write_zeroes", *offset, u64::from(*len)),
        };
        let mut data = None;
        let result = match op {
            Op::Read { offset, len } => match backend.read(offset, len).await {
                Ok(buf) if buf.len() == len as usize => {
                    data = Some(buf);
                    Ok(())
                }
                Ok(buf) => {
                    // Sending it would desynchronise the stream.
                    warn!(
                        offset,
                        len,
                        got = buf.len(),
                        "NBD backend read returned the wrong length"
                    );
                    Err(NbdError::Io)
                }
                Err(e) => Err(e),
            },
            Op::Write { offset, data, fua } => backend.write(offset, data, fua).await,
            Op::Flush => backend.flush().await,
            Op::Trim { offset, len, fua } => match backend.trim(offset, u64::from(len)).await {
                Ok(()) if fua => backend.flush().await,
                result => result,
            },
            Op::WriteZeroes { offset, len, fua } => {
                backend.write_zeroes(offset, u64::from(len), fua).await
            }
        };
        let error = match result {
            Ok(()) => 0,
            Err(e) => {
                warn!(op = name, offset, len, "NBD backend error: {e}");
                e.errno()
            }
        };
        responder.reply(error, data).await;
    }
}

/// Owns a request's cookie and permits until its reply is queued. If it is
/// dropped first (the backend panicked), it queues an `EIO` reply so the
/// client is not left waiting.
struct Responder {
    cookie: u64,
    tx: mpsc::Sender<Reply>,
    permits: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
}

impl Responder {
    async fn reply(mut self, error: u32, data: Option<Vec<u8>>) {
        let Some((slot, bytes)) = self.permits.take() else {
            return;
        };
        let reply = Reply {
            cookie: self.cookie,
            error,
            data,
            _slot: slot,
            _bytes: bytes,
        };
        // Fails only when the connection is going away.
        let _ = self.tx.send(reply).await;
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some((slot, bytes)) = self.permits.take() {
            error!(
                cookie = self.cookie,
                "NBD backend operation ended without a result; replying EIO"
            );
            let reply = Reply {
                cookie: self.cookie,
                error: NbdError::Io.errno(),
                data: None,
                _slot: slot,
                _bytes: bytes,
            };
            // Cannot be full: every queued reply holds one of the
            // INFLIGHT_REQUESTS_MAX slots and the channel has that capacity.
            let _ = self.tx.try_send(reply);
        }
    }
}

/// Sends replies in completion order; flushes only when none is queued.
async fn write_replies<W, B>(
    mut rx: mpsc::Receiver<Reply>,
    mut writer: BufWriter<W>,
    backend: Arc<B>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    B: Backend,
{
    while let Some(reply) = rx.recv().await {
        write_reply(&mut writer, reply).await?;
        while let Ok(reply) = rx.try_recv() {
            write_reply(&mut writer, reply).await?;
        }
        writer.flush().await?;
        backend.activity();
    }
    writer.shutdown().await
}

async fn write_reply<W>(writer: &mut BufWriter<W>, reply: Reply) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    writer
        .write_all(&proto::encode_simple_reply(reply.cookie, reply.error))
        .await?;
    if let Some(data) = &reply.data {
        writer.write_all(data).await?;
    }
    Ok(())
}

/// Reads a WRITE payload into a buffer of exactly `len` bytes, without
/// zero-filling it first.
async fn read_payload<R>(reader: &mut R, len: u32) -> io::Result<Vec<u8>>
where
    R: AsyncRead + Unpin,
{
    let len = len as usize;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let remaining = (len - data.len()) as u64;
        if (&mut *reader).take(remaining).read_buf(&mut data).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data)
}

/// Skips `len` payload bytes of a rejected WRITE through the reader's buffer.
async fn discard<R>(reader: &mut R, len: u32) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
{
    let copied = tokio::io::copy_buf(
        &mut (&mut *reader).take(u64::from(len)),
        &mut tokio::io::sink(),
    )
    .await?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
