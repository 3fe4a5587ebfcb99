//! QUIC transport with mutual TLS authenticated by pinned certificate fingerprints.
//!
//! * [`Identity`]: a node's self-signed certificate + key (`cert.pem` / `key.pem`).
//! * [`Fingerprint`]: `sha256:<hex>` of a certificate; the only thing peers trust.
//! * [`server_endpoint`] accepts clients whose fingerprint is in an allow list;
//!   [`client_endpoint`] + [`connect`] reach a server whose fingerprint is pinned.
//! * [`Tuning`]: every flow-control / MTU / congestion knob, with measured defaults.
//!
//! TLS 1.3 only, ALPN [`ALPN`], no session resumption and no 0-RTT (every connection does a
//! full mutual handshake, so the allow list / pin is checked every time).

mod identity;
pub mod stream;
mod verify;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportErrorCode, VarInt};
use rustls::crypto::CryptoProvider;
use sha2::{Digest, Sha256};

pub use identity::{Identity, CERT_FILE, CERT_NAME, KEY_FILE};
use verify::{AllowListClientVerifier, PinnedServerVerifier};

/// ALPN protocol identifier; both sides require it.
pub const ALPN: &[u8] = b"blkmirror/1";

/// TLS server name used by clients (certificates are pinned, so it is not checked).
pub const SERVER_NAME: &str = CERT_NAME;

/// Errors from the transport module. Messages name the file, peer or address involved.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create identity directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity directory {} does not exist (generate an identity first)", path.display())]
    MissingDir { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("refusing to overwrite existing {}", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{} does not exist", path.display())]
    MissingFile { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("private key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("certificate generation failed: {0}")]
    CertGen(String),
    #[error(
        "invalid fingerprint {input:?}: {reason}; expected \"sha256:\" followed by 64 hex digits"
    )]
    BadFingerprint { input: String, reason: &'static str },
    #[error("invalid transport tuning: {0}")]
    InvalidTuning(String),
    #[error("TLS configuration error: {0}")]
    TlsConfig(String),
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start connection to mirror {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("no answer from {addr} within {}", fmt_duration(*timeout))]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("mirror {addr} presented certificate {presented} but {pinned} was pinned")]
    PinMismatch {
        addr: SocketAddr,
        presented: Fingerprint,
        pinned: Fingerprint,
    },
    #[error("mirror {addr} refused the TLS handshake (our certificate is {ours}; is it in the mirror's allowed list?): {reason}")]
    HandshakeRefused {
        addr: SocketAddr,
        ours: Fingerprint,
        reason: String,
    },
    #[error("connection to mirror {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: ConnectionError,
    },
    #[error("handshake with client {peer} failed: {source}")]
    Accept {
        peer: SocketAddr,
        source: ConnectionError,
    },
    #[error("peer {peer} presented no certificate")]
    NoPeerCertificate { peer: SocketAddr },
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

// ---------------------------------------------------------------------------------------------
// Fingerprint
// ---------------------------------------------------------------------------------------------

/// SHA-256 of a DER certificate. Text form: `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

const FP_PREFIX: &str = "sha256:";

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FP_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| TransportError::BadFingerprint {
            input: s.to_string(),
            reason,
        };
        let hex = s
            .strip_prefix(FP_PREFIX)
            .ok_or_else(|| bad("missing \"sha256:\" prefix"))?;
        let digits = hex.as_bytes();
        if digits.len() != 64 {
            return Err(bad("wrong length"));
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = hex_val(pair[0]).ok_or_else(|| bad("not a hex digit"))?;
            let lo = hex_val(pair[1]).ok_or_else(|| bad("not a hex digit"))?;
            *o = (hi << 4) | lo;
        }
        Ok(Fingerprint(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Fingerprint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a certificate fingerprint \"sha256:<64 hex digits>\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Fingerprint, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Tuning
// ---------------------------------------------------------------------------------------------

/// Congestion controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    Bbr,
}

/// Bulk-transfer tuning; every limit is explicit. See [`Tuning::default`] for the measured
/// defaults. `0` disables `idle_timeout_ms`, `keep_alive_ms` and the UDP buffer settings
/// (keeps the OS default).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// Per-stream flow-control window (bytes the peer may send ahead on one stream).
    pub stream_receive_window_bytes: u64,
    /// Connection-wide flow-control window.
    pub receive_window_bytes: u64,
    /// Maximum unacknowledged data we buffer for sending, across all streams.
    pub send_window_bytes: u64,
    pub max_concurrent_bidi_streams: u32,
    pub max_concurrent_uni_streams: u32,
    pub idle_timeout_ms: u64,
    pub keep_alive_ms: u64,
    /// Upper bound for path-MTU discovery (max UDP payload). Also advertised as our
    /// `max_udp_payload_size`. Discovery is disabled when equal to `initial_mtu`.
    pub mtu_upper_bound: u16,
    /// UDP payload size used before MTU discovery (>= 1200).
    pub initial_mtu: u16,
    pub congestion: Congestion,
    /// UDP generic segmentation offload (quinn falls back automatically if unsupported).
    pub gso: bool,
    /// Time allowed for [`connect`] (handshake until the server confirmed it).
    pub connect_timeout_ms: u64,
    /// SO_RCVBUF for the UDP socket (capped by net.core.rmem_max).
    pub udp_recv_buffer_bytes: usize,
    /// SO_SNDBUF for the UDP socket (capped by net.core.wmem_max).
    pub udp_send_buffer_bytes: usize,
}

impl Default for Tuning {
    /// Defaults measured with the `bench_throughput` test (see the README table):
    ///
    /// * 16/32/32 MiB stream/connection/send windows: quinn's 1.25 MB stream window caps a
    ///   10 ms RTT path at ~0.08 GiB/s; 16 MiB covers 1 Gbit/s up to ~130 ms RTT (10 Gbit/s up
    ///   to ~13 ms). On loopback (CPU bound) window size changes little (within ~10%).
    /// * 32 MiB UDP socket buffers (forced past rmem_max as root): with the OS default
    ///   (~208 KiB) bursts overflow the receive queue and Cubic collapses on a 10 ms RTT path
    ///   (0.03 vs 0.20 GiB/s); 32 instead of 4 MiB: 1.15 vs 0.88 GiB/s on loopback.
    /// * MTU discovery from 1200 up to 6500 ([`GSO_MTU_MAX`]): discovery settles on the
    ///   path MTU (about 1450 on Ethernet); loopback and jumbo-frame paths get large packets
    ///   (2.6 GiB/s at 6500, 2.04 at 4000, 1.15 at 1452 on loopback). The initial congestion
    ///   window is ten packets of the upper bound (see [`initial_window`]): with quinn's
    ///   default (sized for 1200-byte packets) one MTU probe in flight left less than a
    ///   packet of window and quinn held back the CONNECTION_CLOSE, so the peer saw a
    ///   stateless reset instead of the close reason.
    ///   Above 6500 a 10-packet GSO batch exceeds a UDP datagram, the kernel drops it, and
    ///   black-hole detection falls back to 1200.
    /// * Cubic and GSO on: BBR was not faster and ignores loss; GSO off costs ~4x CPU.
    fn default() -> Self {
        Tuning {
            stream_receive_window_bytes: 16 << 20,
            receive_window_bytes: 32 << 20,
            send_window_bytes: 32 << 20,
            max_concurrent_bidi_streams: 16,
            max_concurrent_uni_streams: 64,
            idle_timeout_ms: 15_000,
            keep_alive_ms: 5_000,
            mtu_upper_bound: 6500,
            initial_mtu: 1200,
            congestion: Congestion::Cubic,
            gso: true,
            connect_timeout_ms: 5_000,
            udp_recv_buffer_bytes: 32 << 20,
            udp_send_buffer_bytes: 32 << 20,
        }
    }
}

/// Packets quinn puts in one GSO send at most.
const GSO_SEGMENTS: u16 = 10;
/// Largest MTU whose GSO batches still fit a UDP datagram (65,507 bytes).
pub const GSO_MTU_MAX: u16 = 6500;

/// Largest UDP payload QUIC can use (IPv6 jumbo-less maximum).
const MAX_UDP_PAYLOAD: u16 = 65527;
const MIN_MTU: u16 = 1200;

impl Tuning {
    /// Check every value is in range; called by the endpoint constructors.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |m: String| Err(TransportError::InvalidTuning(m));
        let varint_max = VarInt::MAX.into_inner();
        for (name, v) in [
            (
                "stream_receive_window_bytes",
                self.stream_receive_window_bytes,
            ),
            ("receive_window_bytes", self.receive_window_bytes),
            ("send_window_bytes", self.send_window_bytes),
        ] {
            if v == 0 || v > varint_max {
                return bad(format!("{name} = {v} must be between 1 and {varint_max}"));
            }
        }
        if self.receive_window_bytes < self.stream_receive_window_bytes {
            return bad(format!(
                "receive_window_bytes ({}) is smaller than stream_receive_window_bytes ({})",
                self.receive_window_bytes, self.stream_receive_window_bytes
            ));
        }
        if !(MIN_MTU..=MAX_UDP_PAYLOAD).contains(&self.initial_mtu) {
            return bad(format!(
                "initial_mtu = {} must be between {MIN_MTU} and {MAX_UDP_PAYLOAD}",
                self.initial_mtu
            ));
        }
        if !(self.initial_mtu..=MAX_UDP_PAYLOAD).contains(&self.mtu_upper_bound) {
            return bad(format!(
                "mtu_upper_bound = {} must be between initial_mtu ({}) and {MAX_UDP_PAYLOAD}",
                self.mtu_upper_bound, self.initial_mtu
            ));
        }
        if self.gso && self.mtu_upper_bound > GSO_MTU_MAX {
            return bad(format!(
                "mtu_upper_bound = {} is above {GSO_MTU_MAX} with gso on: quinn batches up to \
                 {GSO_SEGMENTS} packets in one UDP send, and a batch over 64 KiB is dropped by the \
                 kernel (every large packet is lost); lower it or set gso = false",
                self.mtu_upper_bound
            ));
        }
        if self.idle_timeout_ms > varint_max {
            return bad(format!(
                "idle_timeout_ms = {} is too large",
                self.idle_timeout_ms
            ));
        }
        if self.idle_timeout_ms != 0
            && self.keep_alive_ms != 0
            && self.keep_alive_ms >= self.idle_timeout_ms
        {
            return bad(format!(
                "keep_alive_ms ({}) must be shorter than idle_timeout_ms ({})",
                self.keep_alive_ms, self.idle_timeout_ms
            ));
        }
        if self.connect_timeout_ms == 0 {
            return bad("connect_timeout_ms must be > 0".into());
        }
        Ok(())
    }

    /// Connect timeout as a [`Duration`].
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Build the quinn transport config (validates first).
    pub fn transport_config(&self) -> Result<quinn::TransportConfig, TransportError> {
        self.validate()?;
        let varint = |name: &str, v: u64| {
            VarInt::from_u64(v)
                .map_err(|_| TransportError::InvalidTuning(format!("{name} = {v} is too large")))
        };
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(
            "stream_receive_window_bytes",
            self.stream_receive_window_bytes,
        )?)
        .receive_window(varint("receive_window_bytes", self.receive_window_bytes)?)
        .send_window(self.send_window_bytes)
        .max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into())
        .max_concurrent_uni_streams(self.max_concurrent_uni_streams.into())
        .initial_mtu(self.initial_mtu)
        .enable_segmentation_offload(self.gso);
        if self.idle_timeout_ms == 0 {
            t.max_idle_timeout(None);
        } else {
            let v = varint("idle_timeout_ms", self.idle_timeout_ms)?;
            t.max_idle_timeout(Some(v.into()));
        }
        t.keep_alive_interval(
            (self.keep_alive_ms != 0).then(|| Duration::from_millis(self.keep_alive_ms)),
        );
        if self.mtu_upper_bound > self.initial_mtu {
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(self.mtu_upper_bound);
            t.mtu_discovery_config(Some(mtu));
        } else {
            t.mtu_discovery_config(None);
        }
        match self.congestion {
            Congestion::Cubic => {
                // quinn sizes the initial window from the initial MTU (1200:
                // 14,720 bytes). With MTU discovery up to several KB, one
                // probe in flight can leave less than a full packet of window,
                // and quinn then holds back even the CONNECTION_CLOSE (seen as
                // a stateless reset instead of the mirror's reason). Ten
                // packets of the upper bound keep room for it.
                let mut c = quinn::congestion::CubicConfig::default();
                c.initial_window(initial_window(self.mtu_upper_bound));
                t.congestion_controller_factory(Arc::new(c))
            }
            Congestion::Bbr => {
                let mut c = quinn::congestion::BbrConfig::default();
                c.initial_window(initial_window(self.mtu_upper_bound));
                t.congestion_controller_factory(Arc::new(c))
            }
        };
        Ok(t)
    }

    fn endpoint_config(&self) -> Result<quinn::EndpointConfig, TransportError> {
        let mut e = quinn::EndpointConfig::default();
        e.max_udp_payload_size(self.mtu_upper_bound.max(MIN_MTU))
            .map_err(|err| TransportError::InvalidTuning(format!("mtu_upper_bound: {err}")))?;
        Ok(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl fmt::Display) -> TransportError {
    TransportError::TlsConfig(e.to_string())
}

fn bind_socket(addr: SocketAddr, tuning: &Tuning) -> Result<UdpSocket, TransportError> {
    let socket = UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())
        .map_err(|source| TransportError::Bind { addr, source })?;
    // Buffer sizes are best effort: the kernel silently caps them at rmem_max/wmem_max.
    if tuning.udp_recv_buffer_bytes != 0 {
        if let Err(e) = state.set_recv_buffer_size((&socket).into(), tuning.udp_recv_buffer_bytes) {
            tracing::warn!(%addr, error = %e, "cannot set UDP receive buffer size");
        }
    }
    if tuning.udp_send_buffer_bytes != 0 {
        if let Err(e) = state.set_send_buffer_size((&socket).into(), tuning.udp_send_buffer_bytes) {
            tracing::warn!(%addr, error = %e, "cannot set UDP send buffer size");
        }
    }
    force_buffer_sizes(&socket, tuning);
    Ok(socket)
}

/// With CAP_NET_ADMIN (root), lift the buffers above rmem_max/wmem_max with
/// SO_RCVBUFFORCE/SO_SNDBUFFORCE: a burst that overflows the receive buffer
/// is lost, and QUIC then halves its window. Best effort, silent otherwise.
fn force_buffer_sizes(socket: &UdpSocket, tuning: &Tuning) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    for (opt, bytes) in [
        (libc::SO_RCVBUFFORCE, tuning.udp_recv_buffer_bytes),
        (libc::SO_SNDBUFFORCE, tuning.udp_send_buffer_bytes),
    ] {
        if bytes == 0 {
            continue;
        }
        let v: libc::c_int = bytes.min(i32::MAX as usize / 2) as libc::c_int;
        // SAFETY: fd is a valid socket owned by `socket` for the whole call;
        // we pass a pointer to a live c_int and its exact size.
        let _ = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

fn new_endpoint(
    socket: UdpSocket,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    quinn::Endpoint::new(
        tuning.endpoint_config()?,
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// Server endpoint listening on `listen`: TLS 1.3 only, ALPN [`ALPN`], and a client
/// certificate whose fingerprint is in `allowed` is required. Must be called inside a tokio
/// runtime. Use [`accept`] on each `Incoming` to get the connection and the client fingerprint.
pub fn server_endpoint(
    identity: &Identity,
    listen: SocketAddr,
    allowed: &[Fingerprint],
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    let transport = tuning.transport_config()?;
    if allowed.is_empty() {
        tracing::warn!(%listen, "no client fingerprints allowed: every connection will be refused");
    }
    let provider = provider();
    let verifier = Arc::new(AllowListClientVerifier::new(
        allowed,
        provider.signature_verification_algorithms,
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection must present (and have checked) its certificate.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));

    let socket = bind_socket(listen, tuning)?;
    new_endpoint(socket, listen, Some(server), tuning)
}

/// A client endpoint together with the identity it authenticates with.
///
/// Derefs to [`quinn::Endpoint`] (for `close`, `wait_idle`, `local_addr`, ...).
#[derive(Clone, Debug)]
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
}

impl ClientEndpoint {
    /// The underlying quinn endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Fingerprint of the certificate this endpoint presents.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }
}

impl std::ops::Deref for ClientEndpoint {
    type Target = quinn::Endpoint;
    fn deref(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

/// The unspecified address (port 0) of the same family as `peer`, for [`client_endpoint`].
pub fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    let ip = match peer.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Client endpoint bound to `bind` (typically [`unspecified_for`]`(peer_addr)`). Must be called
/// inside a tokio runtime.
/// Initial congestion window: ten packets of the largest MTU discovery may
/// reach, at least quinn's default of 14,720 bytes.
fn initial_window(mtu_upper_bound: u16) -> u64 {
    (10 * mtu_upper_bound as u64).max(14_720)
}

pub fn client_endpoint(
    identity: &Identity,
    bind: SocketAddr,
    tuning: &Tuning,
) -> Result<ClientEndpoint, TransportError> {
    tuning.validate()?;
    let socket = bind_socket(bind, tuning)?;
    let endpoint = new_endpoint(socket, bind, None, tuning)?;
    Ok(ClientEndpoint {
        endpoint,
        identity: Arc::new(identity.clone()),
    })
}

fn client_config(
    identity: &Identity,
    verifier: Arc<PinnedServerVerifier>,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert_der().clone()], identity.key_der())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config()?));
    Ok(config)
}

/// Connect to the mirror at `addr`, accepting only a server certificate whose fingerprint is
/// `peer`. Returns once the server has *confirmed* the handshake (so a server that refuses our
/// certificate is reported here, not on first use), or fails after `tuning.connect_timeout_ms`.
pub async fn connect(
    endpoint: &ClientEndpoint,
    addr: SocketAddr,
    peer: &Fingerprint,
    tuning: &Tuning,
) -> Result<quinn::Connection, TransportError> {
    let timeout = tuning.connect_timeout();
    let verifier = Arc::new(PinnedServerVerifier::new(
        *peer,
        provider().signature_verification_algorithms,
    ));
    let config = client_config(&endpoint.identity, verifier.clone(), tuning)?;
    let connecting = endpoint
        .endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|source| TransportError::Connect { addr, source })?;
    let attempt = async {
        let conn = connecting.await?;
        wait_confirmed(&conn).await?;
        Ok::<_, ConnectionError>(conn)
    };
    let err = match tokio::time::timeout(timeout, attempt).await {
        Err(_elapsed) => return Err(TransportError::Timeout { addr, timeout }),
        Ok(Ok(conn)) => {
            // Belt and braces: the verifier already enforced the pin.
            return match peer_fingerprint(&conn) {
                Some(fp) if fp == *peer => {
                    tracing::debug!(%addr, fingerprint = %fp, "connected to mirror");
                    Ok(conn)
                }
                other => {
                    conn.close(VarInt::from_u32(1), b"certificate not pinned");
                    match other {
                        Some(presented) => Err(TransportError::PinMismatch {
                            addr,
                            presented,
                            pinned: *peer,
                        }),
                        None => Err(TransportError::NoPeerCertificate { peer: addr }),
                    }
                }
            };
        }
        Ok(Err(err)) => err,
    };
    if let Some(presented) = verifier.presented() {
        if presented != *peer {
            return Err(TransportError::PinMismatch {
                addr,
                presented,
                pinned: *peer,
            });
        }
    }
    Err(match err {
        ConnectionError::TimedOut => TransportError::Timeout {
            addr,
            timeout: timeout.min(idle_timeout(tuning)),
        },
        ConnectionError::ConnectionClosed(close) if is_crypto(close.error_code) => {
            TransportError::HandshakeRefused {
                addr,
                ours: endpoint.fingerprint(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        source => TransportError::Connection { addr, source },
    })
}

fn idle_timeout(tuning: &Tuning) -> Duration {
    match tuning.idle_timeout_ms {
        0 => Duration::MAX,
        ms => Duration::from_millis(ms),
    }
}

fn is_crypto(code: TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Wait until the server confirmed the handshake (HANDSHAKE_DONE received). In TLS 1.3 the
/// client finishes its handshake before the server has checked the client certificate, so
/// without this a refused client would only notice on first use of the connection.
async fn wait_confirmed(conn: &quinn::Connection) -> Result<(), ConnectionError> {
    let mut delay = Duration::from_micros(500);
    loop {
        if let Some(err) = conn.close_reason() {
            return Err(err);
        }
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        tokio::select! {
            err = conn.closed() => return Err(err),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

/// Complete the handshake of an incoming connection (server side) and return it with the
/// client's certificate fingerprint. Refused clients yield [`TransportError::Accept`], whose
/// message includes the refused fingerprint.
pub async fn accept(
    incoming: quinn::Incoming,
) -> Result<(quinn::Connection, Fingerprint), TransportError> {
    let peer = incoming.remote_address();
    let conn = incoming.await.map_err(|source| {
        tracing::warn!(%peer, error = %source, "handshake with client failed");
        TransportError::Accept { peer, source }
    })?;
    match peer_fingerprint(&conn) {
        Some(fp) => {
            tracing::debug!(%peer, fingerprint = %fp, "accepted client");
            Ok((conn, fp))
        }
        None => {
            conn.close(VarInt::from_u32(1), b"no client certificate");
            Err(TransportError::NoPeerCertificate { peer })
        }
    }
}

/// Fingerprint of the certificate the peer presented on an established connection.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_der(c))
}
