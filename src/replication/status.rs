//! `blkmirror status`: each running process publishes a small JSON file
//! (replaced by rename, not fsynced: it is informational) that the `status`
//! command reads. A file whose process is gone is reported as not running.

use std::path::Path;

use crate::error::{Error, IoContext, Result};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MirrorStatus {
    pub role: String,
    pub volume: String,
    pub pid: u32,
    pub updated_unix: f64,
    pub mode: String,
    pub connected: bool,
    pub primary: String,
    pub replica_state: String,
    pub applied_seq: u64,
    pub durable_seq: u64,
    pub frames_applied: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PrimaryStatus {
    pub role: String,
    pub volume: String,
    pub pid: u32,
    pub updated_unix: f64,
    pub mode: String,
    pub on_disconnect: String,
    pub mirror: String,
    pub nbd: String,
    pub connected: bool,
    pub phase: String,
    pub in_sync: bool,
    pub replica_state: Option<String>,
    pub dirty_chunks: u64,
    pub queued_bytes: u64,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub lag_writes: u64,
    pub lag_seconds: f64,
    pub resync_total: u64,
    pub resync_done: u64,
    pub writes: u64,
    pub bytes_written: u64,
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Replace `path` with the JSON of `value` (rename; no fsync).
pub fn write<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::metadata(path, format!("cannot serialise status: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("renaming {}", tmp.display()))
}

/// Read a status file as a JSON value, adding `running` (its process is alive).
pub fn read(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    let mut v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::metadata(path, format!("not a status file: {e}")))?;
    let pid = v.get("pid").and_then(|p| p.as_u64()).unwrap_or(0);
    let running = pid > 0 && Path::new(&format!("/proc/{pid}")).exists();
    if let Some(o) = v.as_object_mut() {
        o.insert("running".into(), serde_json::Value::Bool(running));
        if !running {
            o.insert("connected".into(), serde_json::Value::Bool(false));
        }
    }
    Ok(v)
}
