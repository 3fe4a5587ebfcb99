//! `blkmirror status`: each running process publishes a small JSON file
//! (replaced by rename, not fsynced: it is informational) that the `status`
//! command reads. A file whose process is gone (or was replaced by another
//! with the same pid, or said it stopped) is reported as not running.

use std::path::Path;

use crate::error::{Error, IoContext, Result};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MirrorStatus {
    pub role: String,
    pub volume: String,
    pub pid: u32,
    /// When that process started (`/proc/PID/stat`, clock ticks since boot),
    /// so that a later process with the same pid is not taken for it.
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub updated_unix: f64,
    pub mode: String,
    pub connected: bool,
    pub primary: String,
    pub replica_state: String,
    pub applied_seq: u64,
    pub durable_seq: u64,
    pub frames_applied: u64,
    /// Of those, frames a synchronous session applied on its network task
    /// (small writes while the apply thread was idle).
    #[serde(default)]
    pub frames_inline: u64,
    /// Writes and zero ranges that arrived during a resync and were held
    /// with the resync chunks, so that their undo records share an fsync.
    #[serde(default)]
    pub writes_held: u64,
    /// Of those, lone writes written durable in one call (`O_DIRECT |
    /// O_DSYNC`) instead of buffered write + fdatasync.
    #[serde(default)]
    pub writes_direct_sync: u64,
    /// Large live writes written with `O_DIRECT`, several in flight.
    #[serde(default)]
    pub writes_direct: u64,
}

/// What a running `replicate` publishes: who it is, plus the core's status.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrimaryStatus {
    pub role: String,
    pub volume: String,
    pub pid: u32,
    /// See [`MirrorStatus::pid_start`].
    pub pid_start: Option<u64>,
    /// Written last by a `replicate` that ended (not by one that was killed).
    pub stopped: bool,
    pub updated_unix: f64,
    pub on_disconnect: String,
    pub mirror: String,
    pub nbd: String,
    #[serde(flatten)]
    pub core: super::primary::CoreStatus,
    pub writes: u64,
    pub bytes_written: u64,
    /// Why the mirror is not connected (a lost link, a refused pairing).
    pub link_error: Option<String>,
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

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/PID/stat`); `None` if there is no such process.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start(&stat)
}

/// [`process_start`] of this process, read once.
pub fn own_start() -> Option<u64> {
    static START: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *START.get_or_init(|| process_start(std::process::id()))
}

/// The start time from the text of `/proc/PID/stat`. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses,
/// so the fields are counted from the last `)`.
fn parse_start(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is the process that wrote a status file still running? It must exist,
/// have started when the file says (if the file says), and not have
/// written that it stopped.
fn writer_running(v: &serde_json::Value) -> bool {
    let pid = v
        .get("pid")
        .and_then(|p| p.as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    if pid == 0 || v.get("stopped").and_then(|s| s.as_bool()) == Some(true) {
        return false;
    }
    match (
        v.get("pid_start").and_then(|s| s.as_u64()),
        process_start(pid),
    ) {
        (_, None) => false,
        (Some(recorded), Some(now)) => recorded == now,
        (None, Some(_)) => true,
    }
}

/// Read a status file as a JSON value, adding `running` (its process is alive).
pub fn read(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    let mut v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::metadata(path, format!("not a status file: {e}")))?;
    let running = writer_running(&v);
    if let Some(o) = v.as_object_mut() {
        o.insert("running".into(), serde_json::Value::Bool(running));
        if !running {
            o.insert("connected".into(), serde_json::Value::Bool(false));
        }
    }
    Ok(v)
}

/// Status rows for `blkmirror status`: a primary's state directory
/// (`primary`) or a mirror's store; all volumes or one.
pub fn collect(dir: &Path, primary: bool, volume: Option<&str>) -> Result<Vec<serde_json::Value>> {
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if let Some(v) = volume {
        crate::config::validate_volume_name(v).map_err(Error::Config)?;
    }
    let mut rows = Vec::new();
    if primary {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .ctx(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("volume.toml").is_file())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        names.sort();
        for name in names {
            if volume.is_some_and(|v| v != name) {
                continue;
            }
            let vdir = dir.join(&name);
            let vol: Option<crate::primary::state::VolumeState> =
                crate::track::files::read_valid_toml(&vdir.join("volume.toml"))?;
            let Some(vol) = vol else { continue };
            let chunks = crate::config::chunk_count(vol.volume_bytes, vol.chunk_bytes);
            let bitmap = crate::track::Bitmap::load(&vdir.join("bitmap"), chunks).ok();
            let mut row = match read(&vdir.join("status.json")) {
                Ok(v) => v,
                Err(_) => {
                    serde_json::json!({"role": "primary", "volume": name, "running": false, "connected": false})
                }
            };
            let running = row
                .get("running")
                .and_then(|r| r.as_bool())
                .unwrap_or(false);
            let peers: Vec<serde_json::Value> = vol
                .peers
                .iter()
                .map(|p| {
                    let dirty = bitmap.as_ref().and_then(|b| {
                        let fp: crate::transport::Fingerprint = p.fingerprint.parse().ok()?;
                        let mut b = b.clone();
                        let n = b.peer_count();
                        let slot = b.peer_slot(&fp.0).ok()?;
                        (slot < n).then(|| b.count(slot))
                    });
                    serde_json::json!({
                        "mirror": p.fingerprint,
                        "synced": p.synced,
                        "tracked": p.tracked,
                        "dirty_chunks_on_disk": dirty,
                    })
                })
                .collect();
            if let Some(o) = row.as_object_mut() {
                o.insert("volume_bytes".into(), vol.volume_bytes.into());
                o.insert("chunk_bytes".into(), vol.chunk_bytes.into());
                o.insert("peers".into(), serde_json::Value::Array(peers));
                if !running {
                    o.insert("phase".into(), "stopped".into());
                }
            }
            rows.push(row);
        }
    } else {
        let store = crate::mirror::Store::open(dir)?;
        for (name, meta) in store.list()? {
            if volume.is_some_and(|v| v != name) {
                continue;
            }
            let mut row = match read(&store.status_path(&name)) {
                Ok(v) => v,
                Err(_) => {
                    serde_json::json!({"role": "mirror", "volume": name, "running": false, "connected": false})
                }
            };
            if let Some(o) = row.as_object_mut() {
                o.insert("replica_state".into(), meta.state.to_string().into());
                o.insert("volume_bytes".into(), meta.volume_bytes.into());
                o.insert(
                    "generation".into(),
                    format!("{:016x}", meta.generation).into(),
                );
                o.insert("last_primary".into(), meta.last_primary.clone().into());
            }
            rows.push(row);
        }
    }
    if let Some(v) = volume {
        if rows.is_empty() {
            return Err(Error::Config(format!(
                "no volume '{v}' in {}",
                dir.display()
            )));
        }
    }
    Ok(rows)
}

/// One human-readable line (or a few) per status row.
pub fn describe(r: &serde_json::Value) -> String {
    let s = |k: &str| match r.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    if s("role") == "mirror" {
        format!(
            "{} (mirror): replica {}, {}; mode {}, primary {}, applied seq {}, durable seq {}",
            s("volume"),
            s("replica_state"),
            if r.get("connected").and_then(|c| c.as_bool()) == Some(true) {
                "connected"
            } else {
                "not connected"
            },
            s("mode"),
            s("primary"),
            s("applied_seq"),
            s("durable_seq"),
        )
    } else {
        format!(
            "{} (primary): {}; mode {}, mirror {} {}, phase {}, replica {}, dirty chunks {}, queued {} bytes, lag {} writes / {} s, resync {}/{}{}",
            s("volume"),
            if r.get("running").and_then(|c| c.as_bool()) == Some(true) { "running" } else { "not running" },
            s("mode"),
            s("mirror"),
            if r.get("connected").and_then(|c| c.as_bool()) == Some(true) { "connected" } else { "not connected" },
            s("phase"),
            s("replica_state"),
            s("dirty_chunks"),
            s("queued_bytes"),
            s("lag_writes"),
            s("lag_seconds"),
            s("resync_done"),
            s("resync_total"),
            match r.get("resync_rate").and_then(|v| v.as_u64()) {
                Some(b) if b > 0 => format!(" (at most {} KiB/s)", b >> 10),
                _ => String::new(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 123456 19 20";
        assert_eq!(parse_start(&format!("42 (sh) {tail}")), Some(123456));
        assert_eq!(parse_start(&format!("42 (a) (b c) {tail}")), Some(123456));
        assert_eq!(parse_start("42 (sh) S 1 2"), None);
        assert_eq!(parse_start("garbage"), None);
        assert!(process_start(std::process::id()).is_some());
    }

    #[test]
    fn a_status_is_running_only_while_its_own_process_lives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let me = std::process::id();
        let start = process_start(me).unwrap();
        let running = |v: serde_json::Value| {
            std::fs::write(&path, v.to_string()).unwrap();
            let row = read(&path).unwrap();
            (
                row["running"].as_bool().unwrap(),
                row["connected"].as_bool(),
            )
        };
        let connected = Some(true);
        assert_eq!(
            running(serde_json::json!({"pid": me, "pid_start": start, "connected": true})),
            (true, connected)
        );
        // Files from before `pid_start` existed: the pid alone decides.
        assert!(running(serde_json::json!({"pid": me, "connected": true})).0);
        // Another process now has the pid: not the writer.
        assert_eq!(
            running(serde_json::json!({"pid": me, "pid_start": start + 1, "connected": true})),
            (false, Some(false))
        );
        // The writer said it stopped (same process, e.g. the demo).
        assert_eq!(
            running(
                serde_json::json!({"pid": me, "pid_start": start, "stopped": true, "connected": true})
            ),
            (false, Some(false))
        );
        assert!(!running(serde_json::json!({"pid": 0})).0);
        assert!(!running(serde_json::json!({"pid": u64::MAX})).0);
    }
}
