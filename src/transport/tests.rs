use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use super::*;

fn loopback4() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn test_tuning() -> Tuning {
    Tuning {
        connect_timeout_ms: 3_000,
        ..Tuning::default()
    }
}

// ----------------------------------------------------------------------------- identity

#[test]
fn generate_load_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("id");
    let generated = Identity::generate(&dir).unwrap();
    let loaded = Identity::load(&dir).unwrap();
    assert_eq!(generated.fingerprint(), loaded.fingerprint());
    assert_eq!(
        loaded.fingerprint(),
        Identity::load(&dir).unwrap().fingerprint()
    );
    assert_eq!(
        loaded.fingerprint(),
        Fingerprint::of_der(loaded.cert_der().as_ref())
    );

    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let key_mode = std::fs::metadata(dir.join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    // Debug must not leak the key.
    let dbg = format!("{loaded:?}");
    assert!(dbg.contains("sha256:"), "{dbg}");
    assert!(!dbg.contains("PRIVATE"), "{dbg}");
}

#[test]
fn generate_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Identity::generate(tmp.path()).unwrap();
    let err = Identity::generate(tmp.path()).unwrap_err();
    assert!(matches!(err, TransportError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    // Original untouched.
    assert_eq!(
        Identity::load(tmp.path()).unwrap().fingerprint(),
        first.fingerprint()
    );

    // Only one of the two files present: still refused, nothing written.
    let tmp2 = tempfile::tempdir().unwrap();
    std::fs::write(tmp2.path().join(CERT_FILE), b"x").unwrap();
    let err = Identity::generate(tmp2.path()).unwrap_err();
    assert!(err.to_string().contains(CERT_FILE), "{err}");
    assert!(!tmp2.path().join(KEY_FILE).exists());
}

#[test]
fn load_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("nope");
    let err = Identity::load(&missing).unwrap_err();
    assert!(matches!(err, TransportError::MissingDir { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = Identity::load(&empty).unwrap_err();
    assert!(matches!(err, TransportError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains(CERT_FILE), "{err}");

    // Corrupt cert.
    let a = tmp.path().join("a");
    Identity::generate(&a).unwrap();
    std::fs::write(a.join(CERT_FILE), b"garbage, not PEM\n").unwrap();
    let err = Identity::load(&a).unwrap_err();
    assert!(matches!(err, TransportError::BadPem { .. }), "{err}");
    assert!(err.to_string().contains(CERT_FILE), "{err}");

    // Corrupt key (PEM framing ok, contents not a key).
    let b = tmp.path().join("b");
    Identity::generate(&b).unwrap();
    std::fs::remove_file(b.join(KEY_FILE)).unwrap();
    std::fs::write(
        b.join(KEY_FILE),
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Identity::load(&b).unwrap_err();
    assert!(matches!(err, TransportError::BadPem { .. }), "{err}");
    assert!(err.to_string().contains(KEY_FILE), "{err}");

    // Key missing.
    std::fs::remove_file(b.join(KEY_FILE)).unwrap();
    let err = Identity::load(&b).unwrap_err();
    assert!(matches!(err, TransportError::MissingFile { .. }), "{err}");

    // Key from another identity.
    let c = tmp.path().join("c");
    let d = tmp.path().join("d");
    Identity::generate(&c).unwrap();
    Identity::generate(&d).unwrap();
    std::fs::remove_file(c.join(KEY_FILE)).unwrap();
    std::fs::copy(d.join(KEY_FILE), c.join(KEY_FILE)).unwrap();
    let err = Identity::load(&c).unwrap_err();
    assert!(matches!(err, TransportError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("does not belong"), "{err}");
}

// ----------------------------------------------------------------------------- fingerprint

#[test]
fn fingerprint_text_round_trip() {
    let fp = Fingerprint(std::array::from_fn(|i| (i as u8).wrapping_mul(37)));
    let s = fp.to_string();
    assert!(s.starts_with("sha256:"));
    assert_eq!(s.len(), 7 + 64);
    assert_eq!(s, s.to_lowercase());
    assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
    let upper = format!("sha256:{}", s[7..].to_uppercase());
    assert_eq!(upper.parse::<Fingerprint>().unwrap(), fp);

    let fp2 = Identity::ephemeral().unwrap().fingerprint();
    assert_eq!(fp2.to_string().parse::<Fingerprint>().unwrap(), fp2);
}

#[test]
fn fingerprint_rejects_bad_strings() {
    let good_hex = "ab".repeat(32);
    for bad in [
        String::new(),
        "sha256:".to_string(),
        good_hex.clone(),
        format!("SHA256:{good_hex}"),
        format!("sha1:{good_hex}"),
        format!("sha256:{}", &good_hex[..62]),
        format!("sha256:{good_hex}00"),
        format!("sha256:{}zz", &good_hex[..62]),
        format!(" sha256:{good_hex}"),
        format!("sha256:{good_hex} "),
        format!("sha256:{}é", &good_hex[..62]),
        format!("sha256:+{}", &good_hex[..63]),
    ] {
        let err = bad.parse::<Fingerprint>().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("expected \"sha256:\" followed by 64 hex digits"),
            "{msg}"
        );
    }
}

#[test]
fn tuning_validation() {
    Tuning::default().validate().unwrap();
    for t in [
        Tuning {
            initial_mtu: 1000,
            ..Tuning::default()
        },
        Tuning {
            mtu_upper_bound: 1300,
            initial_mtu: 1400,
            ..Tuning::default()
        },
        Tuning {
            stream_receive_window_bytes: 0,
            ..Tuning::default()
        },
        Tuning {
            receive_window_bytes: 1,
            ..Tuning::default()
        },
        Tuning {
            keep_alive_ms: 40_000,
            ..Tuning::default()
        },
        Tuning {
            connect_timeout_ms: 0,
            ..Tuning::default()
        },
        Tuning {
            send_window_bytes: u64::MAX,
            ..Tuning::default()
        },
    ] {
        let err = t.validate().unwrap_err();
        assert!(
            err.to_string().starts_with("invalid transport tuning"),
            "{err}"
        );
    }
}

// ----------------------------------------------------------------------------- mutual TLS

struct Pair {
    server_id: Identity,
    client_id: Identity,
}

fn pair() -> Pair {
    Pair {
        server_id: Identity::ephemeral().unwrap(),
        client_id: Identity::ephemeral().unwrap(),
    }
}

/// Echo server: accepts one connection, echoes one bidi stream. Returns the accept result.
async fn run_echo_server(endpoint: quinn::Endpoint) -> Result<Fingerprint, TransportError> {
    let incoming = endpoint.accept().await.expect("endpoint open");
    let (conn, fp) = accept(incoming).await?;
    let (mut send, mut recv) = conn.accept_bi().await.expect("bidi stream");
    let data = recv.read_to_end(1 << 20).await.expect("read");
    send.write_all(&data).await.expect("write");
    send.finish().expect("finish");
    // Wait for the client to close.
    let _ = conn.closed().await;
    Ok(fp)
}

async fn mutual_tls_round_trip(ip: std::net::IpAddr) {
    let p = pair();
    let tuning = test_tuning();
    let server = server_endpoint(
        &p.server_id,
        SocketAddr::new(ip, 0),
        &[p.client_id.fingerprint()],
        &tuning,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let server_task = tokio::spawn(run_echo_server(server.clone()));

    let client = client_endpoint(&p.client_id, unspecified_for(addr), &tuning).unwrap();
    let conn = connect(&client, addr, &p.server_id.fingerprint(), &tuning)
        .await
        .unwrap();
    assert_eq!(peer_fingerprint(&conn), Some(p.server_id.fingerprint()));
    assert!(conn.handshake_data().is_some());

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&msg).await.unwrap();
    send.finish().unwrap();
    let echoed = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(echoed, msg);
    conn.close(0u32.into(), b"done");

    let seen = server_task.await.unwrap().unwrap();
    assert_eq!(seen, p.client_id.fingerprint());
    client.wait_idle().await;
    server.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_ipv4() {
    mutual_tls_round_trip(Ipv4Addr::LOCALHOST.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_ipv6() {
    if std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
        eprintln!("skipping: IPv6 loopback not available");
        return;
    }
    mutual_tls_round_trip(Ipv6Addr::LOCALHOST.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pins_wrong_fingerprint() {
    let p = pair();
    let tuning = test_tuning();
    let server = server_endpoint(
        &p.server_id,
        loopback4(),
        &[p.client_id.fingerprint()],
        &tuning,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let server_task = tokio::spawn(run_echo_server(server.clone()));

    let wrong = Identity::ephemeral().unwrap().fingerprint();
    let client = client_endpoint(&p.client_id, unspecified_for(addr), &tuning).unwrap();
    let err = connect(&client, addr, &wrong, &tuning).await.unwrap_err();
    eprintln!("client error: {err}");
    match &err {
        TransportError::PinMismatch {
            addr: a,
            presented,
            pinned,
        } => {
            assert_eq!(*a, addr);
            assert_eq!(*presented, p.server_id.fingerprint());
            assert_eq!(*pinned, wrong);
        }
        other => panic!("unexpected error: {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&format!(
        "mirror {addr} presented certificate {} but {wrong} was pinned",
        p.server_id.fingerprint()
    )));

    let server_err = tokio::time::timeout(Duration::from_secs(5), server_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    eprintln!("server error: {server_err}");
    assert!(
        matches!(server_err, TransportError::Accept { .. }),
        "{server_err}"
    );
    assert!(
        server_err.to_string().contains("not pinned"),
        "{server_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_client_fingerprint() {
    let p = pair();
    let tuning = test_tuning();
    let someone_else = Identity::ephemeral().unwrap().fingerprint();
    let server = server_endpoint(&p.server_id, loopback4(), &[someone_else], &tuning).unwrap();
    let addr = server.local_addr().unwrap();
    let server_task = tokio::spawn(run_echo_server(server.clone()));

    let client = client_endpoint(&p.client_id, unspecified_for(addr), &tuning).unwrap();
    let started = Instant::now();
    let err = connect(&client, addr, &p.server_id.fingerprint(), &tuning)
        .await
        .unwrap_err();
    eprintln!("client error: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal must be prompt"
    );
    assert!(
        matches!(err, TransportError::HandshakeRefused { .. }),
        "unexpected error: {err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&addr.to_string()), "{msg}");
    assert!(
        msg.contains(&p.client_id.fingerprint().to_string()),
        "{msg}"
    );

    let server_err = tokio::time::timeout(Duration::from_secs(5), server_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    eprintln!("server error: {server_err}");
    let smsg = server_err.to_string();
    assert!(smsg.contains("not in the allowed list"), "{smsg}");
    assert!(
        smsg.contains(&p.client_id.fingerprint().to_string()),
        "{smsg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_times_out_when_nobody_answers() {
    // A bound socket that never answers (deterministic; no ICMP unreachable).
    let silent = std::net::UdpSocket::bind(loopback4()).unwrap();
    let addr = silent.local_addr().unwrap();
    let id = Identity::ephemeral().unwrap();
    let tuning = Tuning {
        connect_timeout_ms: 300,
        ..Tuning::default()
    };
    let client = client_endpoint(&id, unspecified_for(addr), &tuning).unwrap();
    let started = Instant::now();
    let err = connect(&client, addr, &id.fingerprint(), &tuning)
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("error after {elapsed:?}: {err}");
    assert!(elapsed < Duration::from_secs(2));
    assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("no answer from {addr} within 300ms")
    );
}

// ----------------------------------------------------------------------------- throughput

/// Move `total` bytes over one unidirectional stream in 1 MiB `Bytes` chunks; returns GiB/s
/// plus a short path summary.
async fn measure(
    tuning: &Tuning,
    total: u64,
    one_way_delay: Option<Duration>,
) -> Result<(f64, String), TransportError> {
    const CHUNK: usize = 1 << 20;
    let p = pair();
    let server = server_endpoint(
        &p.server_id,
        loopback4(),
        &[p.client_id.fingerprint()],
        tuning,
    )?;
    let addr = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let incoming = server.accept().await.unwrap();
        let (conn, _) = accept(incoming).await?;
        let mut recv = conn.accept_uni().await.unwrap();
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
            got += chunk.bytes.len() as u64;
        }
        let done = Instant::now();
        conn.close(0u32.into(), b"");
        server.wait_idle().await;
        Ok::<_, TransportError>((got, done))
    });

    let (target, proxy) = match one_way_delay {
        Some(delay) => {
            let (a, task) = delay_proxy(addr, delay).await;
            (a, Some(task))
        }
        None => (addr, None),
    };
    let client = client_endpoint(&p.client_id, unspecified_for(target), tuning)?;
    let conn = match connect(&client, target, &p.server_id.fingerprint(), tuning).await {
        Ok(c) => c,
        Err(e) => {
            receiver.abort();
            return Err(e);
        }
    };
    let payload = bytes::Bytes::from(vec![0x5au8; CHUNK]);
    let mut send = conn.open_uni().await.unwrap();
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        send.write_chunk(payload.clone()).await.unwrap();
        sent += CHUNK as u64;
    }
    send.finish().unwrap();
    let (got, done) = receiver.await.unwrap()?;
    assert_eq!(got, sent);
    let elapsed = done - start;
    let stats = conn.stats();
    let summary = format!(
        "mtu {} lost {}",
        stats.path.current_mtu, stats.path.lost_packets
    );
    conn.close(0u32.into(), b"");
    client.wait_idle().await;
    if let Some(task) = proxy {
        task.abort();
    }
    Ok((
        got as f64 / (1u64 << 30) as f64 / elapsed.as_secs_f64(),
        summary,
    ))
}

/// A UDP relay that delays every datagram by `delay` in each direction (emulates a WAN RTT
/// without touching the system's qdiscs). Returns the address clients should use.
async fn delay_proxy(
    server: SocketAddr,
    delay: Duration,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    // UdpSocketState::new enables UDP_GRO on the socket it is given, which would coalesce
    // datagrams this naive relay must keep separate; so create it on a throwaway socket and
    // only use it to set SO_RCVBUF/SO_SNDBUF on the relay socket.
    let std_sock = std::net::UdpSocket::bind(loopback4()).unwrap();
    let scratch = std::net::UdpSocket::bind(loopback4()).unwrap();
    let state = quinn::udp::UdpSocketState::new((&scratch).into()).unwrap();
    let _ = state.set_recv_buffer_size((&std_sock).into(), 4 << 20);
    let _ = state.set_send_buffer_size((&std_sock).into(), 4 << 20);
    std_sock.set_nonblocking(true).unwrap();
    let sock = std::sync::Arc::new(tokio::net::UdpSocket::from_std(std_sock).unwrap());
    let addr = sock.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, SocketAddr, Vec<u8>)>();
    let out = sock.clone();
    let sender = tokio::spawn(async move {
        while let Some((due, to, data)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            let _ = out.send_to(&data, to).await;
        }
    });
    let task = tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let to = if from == server {
                match client {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                client = Some(from);
                server
            };
            if tx
                .send((Instant::now() + delay, to, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        sender.abort();
    });
    (addr, task)
}

/// Run with: cargo test --release -- --ignored --nocapture bench_throughput
/// BENCH_GIB (default 2) sets the amount per run, BENCH_REPEAT (default 3) the runs per
/// variant (median reported), BENCH_ONLY filters variant names, BENCH_RTT_MS (default 0)
/// relays all datagrams through an in-process proxy adding that round-trip time.
#[test]
#[ignore]
fn bench_throughput() {
    let env = |k: &str| std::env::var(k).ok();
    let gib: f64 = env("BENCH_GIB").and_then(|v| v.parse().ok()).unwrap_or(2.0);
    let repeat: usize = env("BENCH_REPEAT")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only = env("BENCH_ONLY");
    let total = (gib * (1u64 << 30) as f64) as u64;
    let quinn_defaults = Tuning {
        stream_receive_window_bytes: 1_250_000,
        receive_window_bytes: VarInt::MAX.into_inner(),
        send_window_bytes: 8 * 1_250_000,
        max_concurrent_bidi_streams: 100,
        max_concurrent_uni_streams: 100,
        idle_timeout_ms: 30_000,
        keep_alive_ms: 0,
        mtu_upper_bound: 1452,
        initial_mtu: 1200,
        congestion: Congestion::Cubic,
        gso: true,
        connect_timeout_ms: 5_000,
        udp_recv_buffer_bytes: 0,
        udp_send_buffer_bytes: 0,
    };
    let d = Tuning::default();
    let win = |s: u64, c: u64, w: u64, base: &Tuning| Tuning {
        stream_receive_window_bytes: s << 20,
        receive_window_bytes: c << 20,
        send_window_bytes: w << 20,
        ..base.clone()
    };
    let os_bufs = Tuning {
        udp_recv_buffer_bytes: 0,
        udp_send_buffer_bytes: 0,
        ..d.clone()
    };
    let rtt_ms: u64 = env("BENCH_RTT_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let delay = (rtt_ms > 0).then(|| Duration::from_millis(rtt_ms / 2));
    let variants: Vec<(&str, Tuning)> = vec![
        ("quinn defaults", quinn_defaults.clone()),
        (
            "quinn defaults + 4 MiB UDP buffers",
            Tuning {
                udp_recv_buffer_bytes: 4 << 20,
                udp_send_buffer_bytes: 4 << 20,
                ..quinn_defaults.clone()
            },
        ),
        (
            "windows 16/32/32 MiB, OS UDP buffers",
            win(16, 32, 32, &os_bufs),
        ),
        ("windows 8/16/16 MiB + 4 MiB UDP", win(8, 16, 16, &d)),
        ("windows 16/32/32 MiB + 4 MiB UDP", win(16, 32, 32, &d)),
        ("windows 32/64/64 MiB + 4 MiB UDP", win(32, 64, 64, &d)),
        (
            "DEFAULT (16/32/32 MiB, 4 MiB UDP, PMTUD up to 1452, Cubic, GSO)",
            d.clone(),
        ),
        ("windows 64/128/128 MiB + 4 MiB UDP", win(64, 128, 128, &d)),
        (
            "DEFAULT, GSO off",
            Tuning {
                gso: false,
                ..d.clone()
            },
        ),
        (
            "DEFAULT, BBR",
            Tuning {
                congestion: Congestion::Bbr,
                ..d.clone()
            },
        ),
        (
            "DEFAULT, MTU fixed 1200",
            Tuning {
                mtu_upper_bound: 1200,
                ..d.clone()
            },
        ),
        (
            "DEFAULT, PMTUD up to 8972",
            Tuning {
                mtu_upper_bound: 8972,
                ..d.clone()
            },
        ),
        (
            "DEFAULT, MTU fixed 8972",
            Tuning {
                mtu_upper_bound: 8972,
                initial_mtu: 8972,
                ..d.clone()
            },
        ),
        (
            "DEFAULT, PMTUD up to 65000",
            Tuning {
                mtu_upper_bound: 65000,
                ..d.clone()
            },
        ),
        (
            "DEFAULT + 32 MiB UDP (forced as root)",
            Tuning {
                udp_recv_buffer_bytes: 32 << 20,
                udp_send_buffer_bytes: 32 << 20,
                ..d.clone()
            },
        ),
        (
            "DEFAULT + 32 MiB UDP (forced), PMTUD up to 8972",
            Tuning {
                udp_recv_buffer_bytes: 32 << 20,
                udp_send_buffer_bytes: 32 << 20,
                mtu_upper_bound: 8972,
                ..d.clone()
            },
        ),
        (
            "DEFAULT + 32 MiB UDP (forced), PMTUD up to 6500",
            Tuning {
                udp_recv_buffer_bytes: 32 << 20,
                udp_send_buffer_bytes: 32 << 20,
                mtu_upper_bound: 6500,
                ..d.clone()
            },
        ),
        (
            "DEFAULT + 32 MiB UDP (forced), PMTUD up to 4000",
            Tuning {
                udp_recv_buffer_bytes: 32 << 20,
                udp_send_buffer_bytes: 32 << 20,
                mtu_upper_bound: 4000,
                ..d.clone()
            },
        ),
        (
            "DEFAULT + 32 MiB UDP (forced), PMTUD up to 16384",
            Tuning {
                udp_recv_buffer_bytes: 32 << 20,
                udp_send_buffer_bytes: 32 << 20,
                mtu_upper_bound: 16384,
                ..d.clone()
            },
        ),
        (
            "DEFAULT + 32 MiB UDP (forced), PMTUD up to 65000",
            Tuning {
                udp_recv_buffer_bytes: 32 << 20,
                udp_send_buffer_bytes: 32 << 20,
                mtu_upper_bound: 65000,
                ..d.clone()
            },
        ),
        (
            "DEFAULT, MTU fixed 65000",
            Tuning {
                mtu_upper_bound: 65000,
                initial_mtu: 65000,
                ..d.clone()
            },
        ),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    eprintln!("{gib} GiB per run, median of {repeat}, emulated RTT {rtt_ms} ms");
    eprintln!("| variant | GiB/s median | min | max | last run |");
    eprintln!("|---|---:|---:|---:|---|");
    for (name, tuning) in variants {
        if only.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let mut rates = Vec::new();
        let mut last = String::new();
        for _ in 0..repeat {
            match rt.block_on(measure(&tuning, total, delay)) {
                Ok((rate, summary)) => {
                    rates.push(rate);
                    last = summary;
                }
                Err(e) => {
                    last = format!("FAILED: {e}");
                    break;
                }
            }
        }
        rates.sort_by(f64::total_cmp);
        match (rates.first(), rates.get(rates.len() / 2), rates.last()) {
            (Some(min), Some(med), Some(max)) => {
                eprintln!("| {name} | {med:.2} | {min:.2} | {max:.2} | {last} |")
            }
            _ => eprintln!("| {name} | - | - | - | {last} |"),
        }
    }
}

#[test]
fn gso_batches_must_fit_a_datagram() {
    let too_big = Tuning {
        mtu_upper_bound: 8972,
        ..Tuning::default()
    };
    let e = too_big.validate().unwrap_err().to_string();
    assert!(e.contains("gso"), "{e}");
    let no_gso = Tuning {
        gso: false,
        ..too_big
    };
    assert!(no_gso.validate().is_ok());
    let largest = Tuning {
        mtu_upper_bound: GSO_MTU_MAX,
        ..Tuning::default()
    };
    assert!(largest.validate().is_ok());
}

// ----------------------------------------------------------------------------- frame receiver

/// `FrameReceiver::try_recv` returns only whole frames that have arrived,
/// keeps a partial frame for the next call, and a `recv` dropped mid-frame
/// (timeout) loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_receiver_is_cancel_safe_and_try_recv_never_waits() {
    use crate::protocol::{self, Frame};
    let p = pair();
    let tuning = test_tuning();
    let server = server_endpoint(
        &p.server_id,
        loopback4(),
        &[p.client_id.fingerprint()],
        &tuning,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let incoming = server.accept().await.expect("endpoint open");
        let (conn, _) = accept(incoming).await.expect("accept");
        (server, conn)
    });
    let client = client_endpoint(&p.client_id, unspecified_for(addr), &tuning).unwrap();
    let conn = connect(&client, addr, &p.server_id.fingerprint(), &tuning)
        .await
        .unwrap();
    let (_server, server_conn) = accepting.await.unwrap();
    let link = stream::Link::new(server_conn, 1 << 20);

    let frames: Vec<Frame> = (1..=3u64)
        .map(|seq| Frame::Flush { seq })
        .chain([Frame::Ack {
            seq: 9,
            state: protocol::ReplicaState::UpToDate,
        }])
        .collect();
    let bytes: Vec<Vec<u8>> = frames.iter().map(protocol::encode_to_vec).collect();
    let mut raw = conn.open_uni().await.unwrap();
    // Half a header first: the stream exists, no frame yet.
    raw.write_all(&bytes[0][..3]).await.unwrap();
    let mut rx = link.accept_data().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_none(), "a partial frame is not a frame");
    // A recv that times out mid-frame loses nothing.
    assert!(tokio::time::timeout(Duration::from_millis(50), rx.recv())
        .await
        .is_err());
    raw.write_all(&bytes[0][3..]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("frame arrives")
        .unwrap()
        .unwrap();
    assert_eq!(got, frames[0]);
    assert!(rx.try_recv().is_none());
    // Two whole frames and the start of a third: try_recv takes the two.
    let mut burst = bytes[1].clone();
    burst.extend_from_slice(&bytes[2]);
    burst.extend_from_slice(&bytes[3][..bytes[3].len() - 1]);
    raw.write_all(&burst).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < 2 && Instant::now() < deadline {
        match rx.try_recv() {
            Some(r) => seen.push(r.unwrap().unwrap()),
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert_eq!(seen, frames[1..3]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_none(), "the third frame lacks a byte");
    raw.write_all(&bytes[3][bytes[3].len() - 1..])
        .await
        .unwrap();
    raw.finish().unwrap();
    let last = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("frame arrives")
        .unwrap();
    assert_eq!(last, Some(frames[3].clone()));
    let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("end arrives")
        .unwrap();
    assert_eq!(end, None, "a clean finish after a whole frame");
    conn.close(0u32.into(), b"done");
}
