//! Offline verify: read the source, ask the mirror for the digests of its
//! replica (a read session: nothing on the mirror is created or written),
//! compare; `--repair` marks the differing chunks and runs a sync.

use std::net::SocketAddr;
use std::time::Instant;

use crate::block::{Device, DirectIo, OpenOptions};
use crate::config::{self, FRAME_PAYLOAD_BYTES_MAX};
use crate::error::{Error, Result};
use crate::primary::state::PrimaryState;
use crate::primary::sync::{
    collect_digests, link_err, next_control, resolve, spawn_control_reader,
};
use crate::protocol::{self, Frame, Hello, HELLO_FLAG_READ};
use crate::replication::live::VerifyReport;
use crate::transport;
use crate::transport::stream::{Link, CLOSE_OK};

use super::verify::VerifyOptions;

/// Digests of every chunk of the source (plain reads, 4 MiB at a time).
fn source_digests(dev: &Device, chunk_bytes: u32) -> Result<Vec<u128>> {
    use std::os::unix::fs::FileExt;
    let vb = dev.size_bytes();
    let cb = chunk_bytes as u64;
    let chunks = vb.div_ceil(cb);
    let per = ((4 << 20) / cb).max(1);
    let mut out = Vec::with_capacity(chunks as usize);
    let mut buf = vec![0u8; (per * cb) as usize];
    let file = std::fs::File::open(dev.path())
        .map_err(|e| Error::io(format!("opening {}", dev.path().display()), e))?;
    let mut c = 0;
    while c < chunks {
        let n = per.min(chunks - c);
        let len = ((c + n) * cb).min(vb) - c * cb;
        let b = &mut buf[..len as usize];
        file.read_exact_at(b, c * cb)
            .map_err(|e| Error::io(format!("reading {} at chunk {c}", dev.path().display()), e))?;
        for k in 0..n {
            let s = (k * cb) as usize;
            let e = (((k + 1) * cb) as usize).min(b.len());
            out.push(protocol::digest(&b[s..e]));
        }
        c += n;
    }
    Ok(out)
}

pub(super) async fn run(opts: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let dev = Device::open(
        &opts.source,
        &OpenOptions {
            write: false,
            direct: DirectIo::Off,
        },
    )?;
    let volume_bytes = dev.size_bytes();
    let st = PrimaryState::open(
        &opts.state_dir,
        &opts.volume,
        &opts.source,
        volume_bytes,
        None,
        false,
        false,
    )?;
    let chunk_bytes = st.vol.chunk_bytes;
    let chunks = config::chunk_count(volume_bytes, chunk_bytes);
    let addr = resolve(&opts.to).await?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = transport::client_endpoint(&opts.identity, bind, &opts.tuning)?;
    let conn = transport::connect(&endpoint, addr, &opts.peer, &opts.tuning).await?;
    let link = Link::new(conn, FRAME_PAYLOAD_BYTES_MAX);
    let theirs = mirror_digests(&link, &opts.volume, volume_bytes, chunk_bytes, chunks).await;
    match &theirs {
        Ok(_) => link.close(CLOSE_OK, "verify done"),
        Err(e) => link.close(crate::transport::stream::CLOSE_ERROR, &e.to_string()),
    }
    let theirs = theirs?;
    let ours = tokio::task::block_in_place(|| source_digests(&dev, chunk_bytes))?;
    let differ: Vec<u64> = (0..chunks)
        .filter(|&i| ours[i as usize] != theirs[i as usize])
        .collect();
    let cb = chunk_bytes as u64;
    let mut report = VerifyReport {
        nonce: 0,
        volume: opts.volume.clone(),
        online: false,
        chunks_checked: chunks,
        chunks_differ: differ.len() as u64,
        differ: differ.iter().take(1000).map(|&i| (i, i * cb)).collect(),
        repaired: false,
        seconds: 0.0,
        error: String::new(),
    };
    if opts.repair && !differ.is_empty() {
        // A checksum sync: the mirror recomputes its digests from the
        // replica (so nothing it believed about the damaged chunks is
        // trusted) and exactly the differing chunks travel.
        drop(st);
        let r = crate::primary::run_sync(crate::primary::SyncOptions {
            source: opts.source.clone(),
            identity: opts.identity.clone(),
            to: opts.to.clone(),
            peer: opts.peer,
            volume: opts.volume.clone(),
            full: false,
            checksum: true,
            chunk_bytes: None,
            state_dir: opts.state_dir.clone(),
            resize: false,
            limits: Default::default(),
            engine: crate::block::EnginePreference::Auto,
            tuning: opts.tuning.clone(),
            progress: false,
            compress: true,
            compress_always: false,
            dry_run: false,
            split_brain: crate::protocol::genid::SplitBrainPolicy::Disconnect,
        })
        .await?;
        tracing::info!(sent = r.chunks_sent, "repair sync done");
        report.repaired = true;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn mirror_digests(
    link: &Link,
    volume: &str,
    volume_bytes: u64,
    chunk_bytes: u32,
    chunks: u64,
) -> Result<Vec<u128>> {
    let (mut ctl_tx, ctl_rx) = link.open_control().await.map_err(link_err)?;
    let mut ctl = spawn_control_reader(ctl_rx);
    ctl_tx
        .send(&Frame::Hello(Hello {
            volume: volume.to_string(),
            volume_bytes: 0,
            chunk_bytes: 0,
            flags: HELLO_FLAG_READ,
            source_id: 0,
        }))
        .await
        .map_err(link_err)?;
    let ack = match next_control(&mut ctl).await? {
        Frame::HelloAck(a) => a,
        other => return Err(Error::unexpected(&other, "waiting for HelloAck")),
    };
    if ack.volume_bytes != volume_bytes || ack.chunk_bytes != chunk_bytes {
        return Err(Error::Other(format!(
            "the mirror's replica of '{volume}' has {} bytes in {}-byte chunks, the source {volume_bytes} in {chunk_bytes}",
            ack.volume_bytes, ack.chunk_bytes
        )));
    }
    ctl_tx
        .send(&Frame::RestoreRequest {
            point: 0,
            digests: true,
        })
        .await
        .map_err(link_err)?;
    match next_control(&mut ctl).await? {
        Frame::RestoreReady { .. } => {}
        other => return Err(Error::unexpected(&other, "waiting for RestoreReady")),
    }
    let digests = collect_digests(&mut ctl, chunks).await?;
    let _ = ctl_tx.send(&Frame::ReadEnd { chunks: 0 }).await;
    Ok(digests)
}
