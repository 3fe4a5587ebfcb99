//! `blkmirror verify`: compare a primary's source with its mirror's replica
//! by digests. Online, through the running `replicate` (every chunk's digest
//! travels in write order and the mirror compares after applying everything
//! before it); offline, by reading the source and asking the mirror for the
//! digests of its replica. `--repair` resends the chunks that differ.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::replication::live::{verify_paths, VerifyReport, VerifyRequest};
use crate::track::files::{read_toml, write_toml};
use crate::transport::{Fingerprint, Identity, Tuning};

pub struct VerifyOptions {
    pub source: PathBuf,
    pub identity: Identity,
    pub to: String,
    pub peer: Fingerprint,
    pub volume: String,
    pub state_dir: PathBuf,
    pub repair: bool,
    pub tuning: Tuning,
}

/// Longest an online verify may take before the command gives up waiting.
const ONLINE_WAIT: Duration = Duration::from_secs(6 * 3600);

pub async fn run_verify(opts: VerifyOptions) -> Result<VerifyReport> {
    crate::config::validate_volume_name(&opts.volume).map_err(Error::Config)?;
    let status_path = opts.state_dir.join(&opts.volume).join("status.json");
    let running = crate::replication::status::read(&status_path)
        .ok()
        .and_then(|v| v.get("running").and_then(|r| r.as_bool()))
        .unwrap_or(false);
    if running {
        return online(&opts).await;
    }
    super::verify_offline::run(&opts).await
}

async fn online(opts: &VerifyOptions) -> Result<VerifyReport> {
    let (req, res) = verify_paths(&opts.state_dir, &opts.volume);
    let _ = std::fs::remove_file(&res);
    let nonce = rand::random::<u32>() as u64;
    write_toml(
        &req,
        &VerifyRequest {
            nonce,
            repair: opts.repair,
        },
    )?;
    let started = Instant::now();
    loop {
        if let Ok(Some(r)) = read_toml::<VerifyReport>(&res) {
            if r.nonce == nonce {
                let _ = std::fs::remove_file(&res);
                if !r.error.is_empty() {
                    return Err(Error::Other(format!(
                        "verify of '{}' failed: {}",
                        opts.volume, r.error
                    )));
                }
                return Ok(r);
            }
        }
        let status_path = opts.state_dir.join(&opts.volume).join("status.json");
        let alive = crate::replication::status::read(&status_path)
            .ok()
            .and_then(|v| v.get("running").and_then(|r| r.as_bool()))
            .unwrap_or(false);
        if !alive {
            let _ = std::fs::remove_file(&req);
            return Err(Error::Other(format!(
                "replicate of '{}' stopped before the verify finished",
                opts.volume
            )));
        }
        if started.elapsed() > ONLINE_WAIT {
            return Err(Error::Other(format!(
                "verify of '{}' did not finish within {} s",
                opts.volume,
                ONLINE_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
