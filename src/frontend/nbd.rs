//! NBD server: fixed newstyle handshake, simple replies, one export, over a
//! unix socket or TCP, generic over a [`Backend`].
//!
//! * Handshake: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO`
//!   (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` always, `NBD_INFO_NAME` on
//!   request), `NBD_OPT_LIST`, `NBD_OPT_ABORT`; everything else gets
//!   `NBD_REP_ERR_UNSUP`. The configured export name and the empty
//!   (default) name both select the export.
//! * Transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (FUA honoured),
//!   DISC. Requests run concurrently, at most [`INFLIGHT_REQUESTS_MAX`] and
//!   [`INFLIGHT_BYTES_MAX`] of payload per connection; past either limit the
//!   socket is not read. One writer task sends the replies and flushes its
//!   buffer only when no more replies are queued.
//! * Every malformed request is answered with the protocol's error or
//!   closes the connection; the rules are in [`proto::decide`].

pub mod client;
mod conn;
pub mod proto;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

/// Requests one connection may have in flight before the server stops
/// reading its socket.
pub const INFLIGHT_REQUESTS_MAX: usize = 64;
/// READ and WRITE payload bytes one connection may hold in memory (data read
/// but not yet written back, or written by the client but not yet applied).
pub const INFLIGHT_BYTES_MAX: u32 = 64 << 20;
/// Connections served at once by default; more wait in the listen backlog.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;
/// A client must finish option haggling within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options a client may send in one handshake.
pub const OPTIONS_MAX: u32 = 256;
/// After a shutdown, how long a connection may take to deliver the replies
/// of its in-flight requests before its socket is dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Buffer size of each connection's reader and writer.
pub const SOCKET_BUFFER_BYTES: usize = 256 << 10;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error reported to the client in a reply; each maps to an NBD errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NbdError {
    #[error("operation not permitted")]
    Perm,
    #[error("input/output error")]
    Io,
    #[error("cannot allocate memory")]
    NoMem,
    #[error("invalid argument")]
    Invalid,
    #[error("no space left on device")]
    NoSpace,
    #[error("value too large")]
    Overflow,
    #[error("operation not supported")]
    NotSupported,
    #[error("server is shutting down")]
    Shutdown,
}

impl NbdError {
    /// The value sent in the reply's error field.
    pub fn errno(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Invalid => 22,
            NbdError::NoSpace => 28,
            NbdError::Overflow => 75,
            NbdError::NotSupported => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// The error for a reply's error field (`None` for 0 and unknown values).
    pub fn from_errno(errno: u32) -> Option<NbdError> {
        Some(match errno {
            1 => NbdError::Perm,
            5 => NbdError::Io,
            12 => NbdError::NoMem,
            22 => NbdError::Invalid,
            28 => NbdError::NoSpace,
            75 => NbdError::Overflow,
            95 => NbdError::NotSupported,
            108 => NbdError::Shutdown,
            _ => return None,
        })
    }
}

impl From<io::Error> for NbdError {
    /// Maps OS errors as the spec asks (`EDQUOT`/`EFBIG` → `ENOSPC`,
    /// read-only → `EPERM`); anything without a closer match is `EIO`.
    fn from(e: io::Error) -> NbdError {
        if let Some(code) = e.raw_os_error() {
            return match code {
                libc::EPERM | libc::EACCES | libc::EROFS => NbdError::Perm,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdError::NoSpace,
                libc::EINVAL => NbdError::Invalid,
                libc::ENOMEM => NbdError::NoMem,
                libc::EOVERFLOW => NbdError::Overflow,
                libc::EOPNOTSUPP => NbdError::NotSupported,
                libc::ESHUTDOWN => NbdError::Shutdown,
                _ => NbdError::Io,
            };
        }
        match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NbdError::Perm,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => NbdError::NoSpace,
            io::ErrorKind::InvalidInput => NbdError::Invalid,
            io::ErrorKind::OutOfMemory => NbdError::NoMem,
            io::ErrorKind::Unsupported => NbdError::NotSupported,
            _ => NbdError::Io,
        }
    }
}

impl From<NbdError> for io::Error {
    fn from(e: NbdError) -> io::Error {
        // NBD errno values are the Linux ones.
        io::Error::from_raw_os_error(e.errno() as i32)
    }
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

/// What the server exports. Calls come concurrently from many requests and
/// connections. Offsets and lengths are checked against [`Backend::size`]
/// and aligned to [`Backend::min_block`] before the backend sees them, and
/// zero-length requests never reach it.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes, read once per connection at the handshake.
    fn size(&self) -> u64;
    /// Minimum block size advertised with `NBD_INFO_BLOCK_SIZE` and enforced
    /// (a power of two, 1..=65536, e.g. 512 or 4096). The preferred block
    /// size is the larger of this and 4096; the maximum payload is 32 MiB.
    fn min_block(&self) -> u32;
    /// Reads exactly `len` bytes (1..=32 MiB).
    fn read(&self, offset: u64, len: u32)
        -> impl Future<Output = Result<Vec<u8>, NbdError>> + Send;
    /// Writes `data` (1..=32 MiB); with `fua` it must be durable on return.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), NbdError>> + Send;
    /// Makes every completed write durable (global: covers all connections).
    fn flush(&self) -> impl Future<Output = Result<(), NbdError>> + Send;
    /// Discards a range (contents afterwards are unspecified). A FUA trim is
    /// followed by [`Backend::flush`].
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), NbdError>> + Send;
    /// Writes zeroes over a range; with `fua` durable on return.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), NbdError>> + Send;
    /// A hint, called when a request header has arrived and after replies
    /// have been written: the connection is busy, a next message is due
    /// soon. The default does nothing.
    fn activity(&self) {}
}

// ---------------------------------------------------------------------------------------------
// Listen addresses
// ---------------------------------------------------------------------------------------------

/// Where the server listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const UNIX_PATH_BYTES_MAX: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {input:?}: {reason} (expected unix:PATH or tcp:HOST:PORT)")]
pub struct ListenParseError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Listen {
    type Err = ListenParseError;

    /// `unix:/run/x.sock`, `tcp:127.0.0.1:10809`, `tcp:[::1]:10809`,
    /// `tcp:localhost:10809` (a host name is resolved; the first address wins).
    fn from_str(s: &str) -> Result<Listen, ListenParseError> {
        let fail = |reason: &str| ListenParseError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(fail("empty socket path"));
            }
            if path.len() > UNIX_PATH_BYTES_MAX {
                return Err(fail("socket path longer than 107 bytes"));
            }
            if path.contains('\0') {
                return Err(fail("socket path contains a NUL byte"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            if let Ok(addr) = rest.parse::<SocketAddr>() {
                return Ok(Listen::Tcp(addr));
            }
            let Some((host, port)) = rest.rsplit_once(':') else {
                return Err(fail("missing :PORT"));
            };
            let port: u16 = port
                .parse()
                .map_err(|_| fail(&format!("invalid port {port:?}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(fail("empty host (use 0.0.0.0 or [::] for all addresses)"));
            }
            let mut addrs = (host, port)
                .to_socket_addrs()
                .map_err(|e| fail(&format!("cannot resolve {host:?}: {e}")))?;
            return addrs
                .next()
                .map(Listen::Tcp)
                .ok_or_else(|| fail(&format!("{host:?} resolves to no address")));
        }
        Err(fail("unknown scheme"))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl Listen {
    /// The NBD URI (as understood by qemu, libnbd, nbdinfo, fio) of
    /// `export` at this address: `nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://HOST:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Listen::Unix(path) => format!(
                "nbd+unix:///{}?socket={}",
                percent_encode(export.as_bytes(), false),
                percent_encode(path.as_os_str().as_encoded_bytes(), true)
            ),
            Listen::Tcp(addr) => {
                format!("nbd://{addr}/{}", percent_encode(export.as_bytes(), false))
            }
        }
    }
}

fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// An NBD server with one export, bound and ready to [`NbdServer::run`].
pub struct NbdServer<B: Backend> {
    listener: Listener,
    local: Listen,
    export_name: Arc<str>,
    backend: Arc<B>,
    connections_max: usize,
}

enum Listener {
    /// The file is removed when the listener is dropped.
    Unix(UnixListener, #[allow(dead_code)] SocketFile),
    Tcp(TcpListener),
}

/// Removes the socket file when the listener goes away, unless the path
/// now holds another file (another server bound it after ours was removed).
struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the socket this server created.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.to_path_buf(),
            id: file_id(path),
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_none() || file_id(&self.path) != self.id {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.path.display(), "cannot remove the NBD socket: {e}");
            }
        }
    }
}

impl<B: Backend> NbdServer<B> {
    /// Binds `listen` (a stale unix socket file nobody listens on is
    /// replaced; a live one is `AddrInUse`) and checks the export: a name of
    /// at most 4096 bytes without NUL, a minimum block that is a power of two
    /// up to 64 KiB. Must be called from within a tokio runtime (an error
    /// otherwise).
    pub fn bind(listen: &Listen, export_name: &str, backend: Arc<B>) -> io::Result<Self> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if export_name.len() > proto::NAME_BYTES_MAX || export_name.contains('\0') {
            return Err(invalid(format!(
                "NBD export name must be at most {} bytes without NUL",
                proto::NAME_BYTES_MAX
            )));
        }
        let min_block = backend.min_block();
        if !min_block.is_power_of_two() || min_block > proto::MIN_BLOCK_BYTES_MAX {
            return Err(invalid(format!(
                "backend minimum block {min_block} is not a power of two in 1..=65536"
            )));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "NbdServer::bind must be called from within a tokio runtime",
            ));
        }
        let (listener, local) = match listen {
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
                })?;
                (
                    Listener::Unix(listener, SocketFile::new(path)),
                    listen.clone(),
                )
            }
            Listen::Tcp(addr) => {
                let bound = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(TcpListener::from_std)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
                let local = Listen::Tcp(bound.local_addr()?);
                (Listener::Tcp(bound), local)
            }
        };
        info!(listen = %local, export = export_name, size = backend.size(), "NBD server listening");
        Ok(NbdServer {
            listener,
            local,
            export_name: Arc::from(export_name),
            backend,
            connections_max: CONNECTIONS_MAX_DEFAULT,
        })
    }

    /// The bound address (for `tcp:…:0`, with the port the system chose).
    pub fn local_addr(&self) -> &Listen {
        &self.local
    }

    /// The NBD URI of the export (see [`Listen::uri`]).
    pub fn uri(&self) -> String {
        self.local.uri(&self.export_name)
    }

    /// Connections served at once (at least 1); further clients wait in the
    /// listen backlog until one ends.
    pub fn with_connections_max(mut self, connections_max: usize) -> Self {
        self.connections_max = connections_max.max(1);
        self
    }

    /// Serves connections until `shutdown` completes. Then it stops
    /// accepting, closes connections still in the handshake, lets the others
    /// finish their in-flight requests (replies are sent for up to
    /// [`SHUTDOWN_GRACE`]), removes the unix socket file and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let NbdServer {
            listener,
            local,
            export_name,
            backend,
            connections_max,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut next_id: u64 = 0;
        tokio::pin!(shutdown);
        loop {
            let room = connections.len() < connections_max;
            tokio::select! {
                _ = &mut shutdown => break,
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    report_join(joined);
                }
                accepted = listener.accept(), if room => {
                    let stream = match accepted {
                        Ok(stream) => stream,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            warn!(listen = %local, "NBD accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    next_id += 1;
                    let span = tracing::info_span!("nbd", conn = next_id);
                    let task = conn::serve_stream(
                        stream,
                        backend.clone(),
                        export_name.clone(),
                        stop_rx.clone(),
                    );
                    connections.spawn(task.instrument(span));
                }
            }
        }
        info!(listen = %local, connections = connections.len(), "NBD server shutting down");
        drop(listener);
        let _ = stop_tx.send(true);
        while let Some(joined) = connections.join_next().await {
            report_join(joined);
        }
        info!(listen = %local, "NBD server stopped");
        Ok(())
    }
}

/// Serves one client connection over `reader` and `writer` until the client
/// disconnects or the stream ends (`stop` set to `true` ends it early). The
/// server's listeners use the same code; this entry point lets the fuzz
/// targets and tests drive a connection in memory.
pub async fn serve_connection<B, R, W>(
    reader: R,
    writer: W,
    backend: Arc<B>,
    export_name: &str,
    stop: watch::Receiver<bool>,
) where
    B: Backend,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let export_name = Arc::from(export_name);
    conn::serve(reader, writer, "memory".into(), backend, export_name, stop).await
}

fn report_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        error!("NBD connection task failed: {e}");
    }
}

/// A connected client.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

impl Listener {
    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                Ok(Stream::Unix(stream))
            }
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                // Replies are small and latency-bound; batching is done by
                // the writer's buffer, not by Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    warn!(%peer, "cannot set TCP_NODELAY: {e}");
                }
                Ok(Stream::Tcp(stream, peer))
            }
        }
    }
}

/// A socket file left by a server that is gone is removed; anything else at
/// the path is an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another server is listening on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
