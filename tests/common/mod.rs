//! Helpers shared by the integration and system tests: identities, a mirror
//! server child process, sync runs with parsed JSON, metadata readers, image
//! builders, a fault-injecting UDP relay and root-only utilities.
//!
//! Every child process is owned by a [`ChildGuard`] that kills it (SIGKILL)
//! when dropped, so a failing test never leaves processes behind.

#![allow(dead_code)]

pub mod nbd;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_blkmirror");

pub const MIB: u64 = 1 << 20;

/// Upper bound for any single sync run in these tests.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

/// A message that the known TOML/u64 bug produces (see `tests/sync.rs`,
/// `generation_survives_metadata_round_trip`).
pub const GENERATION_BUG: &str = "out-of-range value for u64";

// -------------------------------------------------------------------------------------------
// Processes
// -------------------------------------------------------------------------------------------

/// Nanoseconds since the epoch: makes log file names unique per process start.
pub fn nanos_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Owns a child process; SIGKILLs and reaps it on drop.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    pub fn new(child: Child, name: impl Into<String>) -> Self {
        ChildGuard {
            child: Some(child),
            name: name.into(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// `Some(status)` if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child_mut().try_wait().expect("try_wait")
    }

    /// Is the process still running?
    pub fn running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// SIGKILL (std's `Child::kill` sends SIGKILL on Unix) and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        let c = self.child_mut();
        let _ = c.kill();
        c.wait().expect("wait after kill")
    }

    /// Wait for the process to exit, at most `timeout`; kills it and panics on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            if start.elapsed() > timeout {
                self.kill9();
                panic!("{} did not exit within {:?}", self.name, timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Give up ownership (the caller reaps the child).
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("child already taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run the binary with `args` and capture everything (for short commands).
pub fn run_cmd(args: &[&str]) -> CmdOut {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running blkmirror");
    CmdOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct CmdOut {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    /// Assert a clean failure: exit code `code`, no panic, stderr contains
    /// every string of `needles` (case-insensitive).
    pub fn assert_fails(&self, code: i32, needles: &[&str]) {
        assert_eq!(
            self.code, code,
            "expected exit code {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "the process panicked:\n{}",
            self.stderr
        );
        let lower = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr does not mention {n:?}:\n{}",
                self.stderr
            );
        }
        if code == 1 {
            assert!(
                self.stderr.contains("blkmirror: error:"),
                "error message lacks the 'blkmirror: error:' prefix:\n{}",
                self.stderr
            );
        }
    }
}

// -------------------------------------------------------------------------------------------
// Identities
// -------------------------------------------------------------------------------------------

/// Check the `sha256:<64 lowercase hex>` form.
pub fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `blkmirror init DIR`; returns the fingerprint it printed.
pub fn init_identity(dir: &Path) -> String {
    let out = run_cmd(&["init", dir.to_str().expect("utf-8 path")]);
    assert_eq!(out.code, 0, "init failed: {}", out.stderr);
    let fp = out.stdout.trim().to_string();
    assert!(is_fingerprint(&fp), "init printed {:?}", out.stdout);
    fp
}

/// A node identity made by `blkmirror init`.
#[derive(Clone, Debug)]
pub struct Node {
    pub dir: PathBuf,
    pub fp: String,
}

impl Node {
    pub fn new(dir: PathBuf) -> Node {
        let fp = init_identity(&dir);
        Node { dir, fp }
    }
    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }
}

/// Start `blkmirror replicate SOURCE` as `me` towards `peer_fp` at `to`,
/// serving export `disk` on unix socket `sock`, stderr to `log`; wait for its
/// `nbd ADDR` line (the rest of stdout is drained while it runs).
#[allow(clippy::too_many_arguments)]
pub fn start_replicate(
    source: &Path,
    me: &Node,
    to: &str,
    peer_fp: &str,
    volume: &str,
    state: &Path,
    sock: &Path,
    log: &Path,
    extra: &[String],
) -> ChildGuard {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(BIN);
    cmd.arg("replicate")
        .arg(source)
        .args(["--identity", me.dir_str()])
        .args(["--to", to])
        .args(["--peer", peer_fp])
        .args(["--volume", volume])
        .args(["--state", state.to_str().expect("utf-8 path")])
        .args(["--nbd", &format!("unix:{}", sock.display())])
        .args(["--export", "disk"])
        .args(extra)
        .env("BLKMIRROR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log).expect("log file"));
    let child = cmd.spawn().expect("spawning blkmirror replicate");
    let mut guard = ChildGuard::new(child, "blkmirror replicate");
    let stdout = guard.child_mut().stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep the pipe open (and drained) for the child's lifetime.
        let mut sink = String::new();
        while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_default();
    if !line.starts_with("nbd ") {
        let _ = guard.try_wait();
        panic!(
            "replicate did not start (first line {line:?}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    guard
}

/// A running `blkmirror replicate` (see [`start_replicate`]): its NBD socket
/// (export `disk`), log, state directory and volume.
pub struct Replicating {
    pub guard: ChildGuard,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub state: PathBuf,
    pub volume: String,
}

impl Replicating {
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        source: &Path,
        me: &Node,
        to: &str,
        peer_fp: &str,
        volume: &str,
        state: &Path,
        sock: PathBuf,
        log: PathBuf,
        extra: &[String],
    ) -> Replicating {
        let guard = start_replicate(source, me, to, peer_fp, volume, state, &sock, &log, extra);
        Replicating {
            guard,
            sock,
            log,
            state: state.to_path_buf(),
            volume: volume.to_string(),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }

    pub fn client(&self) -> nbd::NbdClient {
        nbd::NbdClient::connect(&self.sock, "disk").expect("NBD connect")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// This volume's entry of `status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = run_cmd(&[
            "status",
            "--state",
            self.state.to_str().expect("utf-8"),
            "--volume",
            &self.volume,
            "--json",
        ]);
        assert_eq!(out.code, 0, "status failed: {}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
        v[0].clone()
    }

    /// Wait until the mirror is connected, in sync and nothing is dirty.
    pub fn wait_in_sync(&self, timeout: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        // Only a status written after this call counts: the file is
        // rewritten every 500 ms, and an older one may predate the writes
        // the caller just made.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let ok = wait_until(timeout, || {
            last = self.status();
            last["updated_unix"].as_f64().is_some_and(|t| t >= since)
                && last["connected"] == true
                && last["in_sync"] == true
                && last["dirty_chunks"] == 0
        });
        assert!(
            ok,
            "not in sync within {timeout:?}: {last}\nlog:\n{}",
            self.log_text()
        );
        last
    }

    /// SIGTERM, and assert a clean exit within 60 s.
    pub fn stop(mut self) {
        let pid = self.guard.id() as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let st = self.guard.wait_timeout(Duration::from_secs(60));
        assert!(
            st.success(),
            "replicate exited with {st}; log:\n{}",
            self.log_text()
        );
    }
}

// -------------------------------------------------------------------------------------------
// Mirror server
// -------------------------------------------------------------------------------------------

/// A `blkmirror serve` child process.
pub struct Server {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub store: PathBuf,
    pub log: PathBuf,
    _stdout: Option<std::process::ChildStdout>,
}

impl Server {
    /// SIGTERM (what `systemctl stop` sends), and assert a clean exit within
    /// `timeout`.
    pub fn terminate(&mut self, timeout: Duration) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.guard.id() as i32, libc::SIGTERM);
        }
        let st = self.guard.wait_timeout(timeout);
        assert!(
            st.success(),
            "serve exited with {st} after SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    /// Start `serve` on `listen` (use port 0) and wait for its "listening" line.
    pub fn start(
        identity: &Node,
        store: &Path,
        allow: &[&str],
        listen: &str,
        extra: &[&str],
    ) -> Server {
        Self::start_limited(identity, store, allow, listen, extra, None)
    }

    /// Like [`Server::start`], with RLIMIT_AS set to `address_space_bytes`
    /// in the child (so a runaway allocation fails instead of exhausting the host).
    pub fn start_limited(
        identity: &Node,
        store: &Path,
        allow: &[&str],
        listen: &str,
        extra: &[&str],
        address_space_bytes: Option<u64>,
    ) -> Server {
        let log = store.with_extension(format!("serve-{}.log", nanos_now()));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--identity", identity.dir_str()])
            .args(["--listen", listen])
            .args(["--store", store.to_str().expect("utf-8 path")]);
        for a in allow {
            cmd.args(["--allow", a]);
        }
        cmd.args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("creating the server log"));
        if let Some(limit) = address_space_bytes {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe setrlimit between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawning blkmirror serve");
        let mut guard = ChildGuard::new(child, "blkmirror serve");
        let stdout = guard.child_mut().stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            r.into_inner()
        });
        let line = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(l) => l,
            Err(_) => {
                guard.kill9();
                panic!(
                    "serve printed no 'listening' line within 15 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let stdout = reader.join().ok();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| {
                let _ = guard.try_wait();
                panic!(
                    "unexpected first line from serve: {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        assert!(addr.ip().is_loopback(), "server listens on {addr}");
        Server {
            guard,
            addr,
            store: store.to_path_buf(),
            log,
            _stdout: stdout,
        }
    }

    pub fn to(&self) -> String {
        self.addr.to_string()
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panic (with the log) if the server process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(s) = self.guard.try_wait() {
            panic!("the mirror server exited ({s}); log:\n{}", self.log_text());
        }
    }

    pub fn img(&self, volume: &str) -> PathBuf {
        self.store.join(format!("{volume}.img"))
    }
}

// -------------------------------------------------------------------------------------------
// Sync runs
// -------------------------------------------------------------------------------------------

/// Result of one `blkmirror sync --json --no-progress` run.
#[derive(Debug)]
pub struct SyncOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub json: Option<serde_json::Value>,
    pub elapsed: Duration,
}

impl SyncOut {
    /// The JSON report of a successful run; panics with stderr otherwise.
    pub fn ok(&self) -> &serde_json::Value {
        if self.code != 0 && self.stderr.contains(GENERATION_BUG) {
            panic!(
                "sync hit the known generation bug (random u64 generation > i64::MAX cannot be \
                 written to TOML metadata; see sync.rs generation_survives_metadata_round_trip):\n{}",
                self.stderr
            );
        }
        assert_eq!(
            self.code, 0,
            "sync failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        let j = self
            .json
            .as_ref()
            .unwrap_or_else(|| panic!("no JSON on stdout: {:?}", self.stdout));
        assert_eq!(j["replica_state"], "UpToDate", "report: {j}");
        j
    }

    pub fn as_cmd(&self) -> CmdOut {
        CmdOut {
            code: self.code,
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
        }
    }

    /// Assert a clean failure with exit code 1 whose message mentions every needle.
    pub fn assert_fails(&self, needles: &[&str]) {
        self.as_cmd().assert_fails(1, needles);
        assert!(
            self.json.is_none(),
            "a failed sync printed a report: {}",
            self.stdout
        );
    }
}

/// Numeric field of a JSON report.
pub fn num(j: &serde_json::Value, key: &str) -> u64 {
    j[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report field {key} is not a number: {j}"))
}

/// Parse what a sync printed on stdout.
fn parse_report(stdout: &str) -> Option<serde_json::Value> {
    let t = stdout.trim();
    if t.is_empty() {
        return None;
    }
    Some(
        serde_json::from_str(t)
            .unwrap_or_else(|e| panic!("sync printed invalid JSON ({e}): {stdout:?}")),
    )
}

/// Build the argument list of a sync.
pub fn sync_args(
    source: &Path,
    identity: &Node,
    to: &str,
    peer: &str,
    volume: &str,
    state: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "sync".into(),
        source.to_str().expect("utf-8 path").into(),
        "--identity".into(),
        identity.dir_str().into(),
        "--to".into(),
        to.into(),
        "--peer".into(),
        peer.into(),
        "--volume".into(),
        volume.into(),
        "--state".into(),
        state.to_str().expect("utf-8 path").into(),
        "--json".into(),
        "--no-progress".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Run a sync to completion (bounded by `timeout`; killed and panics beyond).
pub fn run_sync_args(args: &[String], timeout: Duration) -> SyncOut {
    let start = Instant::now();
    let child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning blkmirror sync");
    let mut guard = ChildGuard::new(child, "blkmirror sync");
    let mut so = guard.child_mut().stdout.take().expect("stdout");
    let mut se = guard.child_mut().stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let status = guard.wait_timeout(timeout);
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    let code = status.code().unwrap_or(-1);
    let json = if code == 0 {
        parse_report(&stdout)
    } else {
        None
    };
    SyncOut {
        code,
        stdout,
        stderr,
        json,
        elapsed: start.elapsed(),
    }
}

/// A primary node, a mirror node and a running server, all in one temp dir.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub primary: Node,
    pub mirror: Node,
    pub server: Server,
    pub state: PathBuf,
    /// `--tuning FILE` given to the server and to every sync, if any.
    pub tuning: Option<PathBuf>,
}

impl Pair {
    pub fn new() -> Pair {
        Self::build(&[], None)
    }

    pub fn with_server_args(extra: &[&str]) -> Pair {
        Self::build(extra, None)
    }

    /// Both sides use a QUIC idle timeout of `idle_ms` (keep-alive a fifth of it).
    pub fn with_idle_timeout(idle_ms: u64) -> Pair {
        Self::build(&[], Some(idle_ms))
    }

    fn build(extra: &[&str], idle_ms: Option<u64>) -> Pair {
        let tmp = tempdir();
        let primary = Node::new(tmp.path().join("primary-id"));
        let mirror = Node::new(tmp.path().join("mirror-id"));
        let store = tmp.path().join("store");
        let tuning = idle_ms.map(|ms| write_tuning(&tmp.path().join("tuning.toml"), ms));
        let mut args: Vec<&str> = extra.to_vec();
        if let Some(t) = &tuning {
            args.extend(["--tuning", t.to_str().expect("utf-8 path")]);
        }
        let server = Server::start(&mirror, &store, &[&primary.fp], "127.0.0.1:0", &args);
        let state = tmp.path().join("state");
        Pair {
            tmp,
            primary,
            mirror,
            server,
            state,
            tuning,
        }
    }

    /// Extra server arguments that reproduce this pair's tuning (for restarts).
    pub fn server_tuning_args(&self) -> Vec<String> {
        match &self.tuning {
            Some(t) => vec!["--tuning".into(), t.to_str().expect("utf-8 path").into()],
            None => Vec::new(),
        }
    }

    /// Start `serve` again on the pair's store and tuning, listening on
    /// `listen` (the old address, or port 0 for a new one).
    pub fn restart_server(&mut self, listen: &str) {
        let args = self.server_tuning_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let store = self.store().to_path_buf();
        self.server = Server::start(&self.mirror, &store, &[&self.primary.fp], listen, &args);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn store(&self) -> &Path {
        &self.server.store
    }

    pub fn img(&self, volume: &str) -> PathBuf {
        self.server.img(volume)
    }

    pub fn args(&self, source: &Path, volume: &str, extra: &[&str]) -> Vec<String> {
        self.args_to(source, &self.server.to(), volume, extra)
    }

    /// Sync arguments for a mirror reached at `to` (e.g. through a relay).
    pub fn args_to(&self, source: &Path, to: &str, volume: &str, extra: &[&str]) -> Vec<String> {
        let mut v = sync_args(
            source,
            &self.primary,
            to,
            &self.mirror.fp,
            volume,
            &self.state,
            extra,
        );
        v.extend(self.server_tuning_args());
        v
    }

    /// Sync `source` to volume `volume` with extra flags.
    pub fn sync(&self, source: &Path, volume: &str, extra: &[&str]) -> SyncOut {
        run_sync_args(&self.args(source, volume, extra), SYNC_TIMEOUT)
    }

    /// Spawn a sync in the background (stdout/stderr to files next to the state dir).
    pub fn spawn_sync(&self, source: &Path, volume: &str, extra: &[&str]) -> (ChildGuard, PathBuf) {
        spawn_sync_args(&self.args(source, volume, extra), &self.path("sync-bg"))
    }

    pub fn meta(&self, volume: &str) -> toml::Value {
        read_meta(self.store(), volume)
    }

    pub fn state_of(&self, volume: &str) -> String {
        meta_state(self.store(), volume)
    }
}

/// Spawn a sync with stdout/stderr going to `<prefix>.out` / `<prefix>.err`.
pub fn spawn_sync_args(args: &[String], prefix: &Path) -> (ChildGuard, PathBuf) {
    let out = prefix.with_extension("out");
    let err = prefix.with_extension("err");
    let child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("sync stdout file"))
        .stderr(File::create(&err).expect("sync stderr file"))
        .spawn()
        .expect("spawning blkmirror sync");
    (ChildGuard::new(child, "blkmirror sync (background)"), err)
}

/// Collect the result of a background sync started with [`spawn_sync_args`].
pub fn finish_background_sync(
    guard: &mut ChildGuard,
    err_path: &Path,
    timeout: Duration,
) -> SyncOut {
    let start = Instant::now();
    let status = guard.wait_timeout(timeout);
    let stdout = std::fs::read_to_string(err_path.with_extension("out")).unwrap_or_default();
    let stderr = std::fs::read_to_string(err_path).unwrap_or_default();
    let code = status.code().unwrap_or(-1);
    SyncOut {
        code,
        json: if code == 0 {
            parse_report(&stdout)
        } else {
            None
        },
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// Write a transport tuning file (`--tuning`) with a short QUIC idle timeout.
pub fn write_tuning(path: &Path, idle_timeout_ms: u64) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "idle_timeout_ms = {idle_timeout_ms}\nkeep_alive_ms = {}\n",
            idle_timeout_ms / 5
        ),
    )
    .expect("writing a tuning file");
    path.to_path_buf()
}

// -------------------------------------------------------------------------------------------
// Files, images, metadata
// -------------------------------------------------------------------------------------------

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("blkmirror-test-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// A mixed image (random, text, holes) from the library's demo module.
pub fn mixed_image(path: &Path, mib: u64, seed: u64) {
    blkmirror::demo::make_mixed_image(path, mib, seed).expect("making a mixed image");
}

/// `bytes` of seeded random data.
pub fn random_image(path: &Path, bytes: u64, seed: u64) {
    let mut f = File::create(path).expect("creating an image");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("writing an image");
        left -= n as u64;
    }
    f.sync_all().expect("fsync of an image");
}

/// Overwrite `len` bytes at `offset` with `byte`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening for write");
    f.write_all_at(data, offset).expect("write_at");
    f.sync_all().expect("fsync");
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("opening for read");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read_at");
    buf
}

/// Assert two files (or devices) have the same bytes over the length of `a`
/// (and, if `b` is a regular file, the same length).
pub fn assert_identical(a: &Path, b: &Path) {
    match blkmirror::demo::first_difference(a, b).expect("comparing files") {
        None => {}
        Some(off) => panic!(
            "{} and {} differ at byte {off} (sizes {} / {})",
            a.display(),
            b.display(),
            file_len(a),
            file_len(b)
        ),
    }
}

/// Compare the first `len` bytes of two files or devices.
pub fn assert_prefix_identical(a: &Path, b: &Path, len: u64) {
    let mut fa = File::open(a).expect("open a");
    let mut fb = File::open(b).expect("open b");
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let k = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + k as u64
            );
        }
        off += n as u64;
    }
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Bytes actually allocated to a file.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

/// Bytes of a file held in the page cache (`mincore` over a read-only
/// mapping; mapping does not fault pages in). `None` where the answer means
/// nothing: on tmpfs every page of a file is always resident.
pub fn resident_bytes(p: &Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let f = File::open(p).expect("opening a file to count its cached pages");
    // SAFETY: fstatfs writes into the zeroed statfs we own; the fd is open.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut sfs) } != 0 || sfs.f_type as i64 == TMPFS_MAGIC {
        return None;
    }
    let len = file_len(p) as usize;
    if len == 0 {
        return Some(0);
    }
    // SAFETY: sysconf takes a plain constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a fresh read-only shared mapping of an open file of `len`
    // bytes; the kernel picks the address. Nothing reads through it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap of {}", p.display());
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: addr..addr+len is the mapping made above, and vec has one
    // byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: unmapping exactly the mapping made above, used no further.
    unsafe { libc::munmap(addr, len) };
    assert_eq!(rc, 0, "mincore of {}", p.display());
    Some(vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64)
}

/// [`resident_bytes`], or `None` after reporting the test `test` as skipped
/// (the file is on tmpfs, where the count means nothing).
pub fn resident_or_skip(test: &str, p: &Path) -> Option<u64> {
    let r = resident_bytes(p);
    if r.is_none() {
        skip(test, "the file is on tmpfs");
    }
    r
}

/// `STORE/NAME.meta` parsed as TOML.
pub fn read_meta(store: &Path, volume: &str) -> toml::Value {
    let p = store.join(format!("{volume}.meta"));
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML ({e}):\n{text}", p.display()))
}

/// The `state` field of `STORE/NAME.meta`, or "" if there is no such file
/// (or it cannot be parsed, e.g. while being replaced).
pub fn meta_state(store: &Path, volume: &str) -> String {
    let p = store.join(format!("{volume}.meta"));
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// The `generation` of a replica's metadata (an integer or a hex string).
pub fn generation(meta: &toml::Value) -> u64 {
    match &meta["generation"] {
        toml::Value::Integer(i) => *i as u64,
        toml::Value::String(s) => {
            u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("generation {s:?} is not hex"))
        }
        other => panic!("generation is {other:?}"),
    }
}

/// `STATE/NAME/volume.toml` parsed as TOML.
pub fn read_primary_state(state: &Path, volume: &str) -> toml::Value {
    let p = state.join(volume).join("volume.toml");
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML ({e})", p.display()))
}

/// Names in a directory (empty if it does not exist).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A loopback address nobody listens on (UDP): bind, read the port, close.
pub fn dead_udp_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local addr")
}

/// A free loopback TCP address (bind, read the port, close).
pub fn free_tcp_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("local addr")
}

/// `GET path` over plain HTTP/1.0; returns (status line, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp.as_str(), ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

/// Value of an unlabelled Prometheus sample `name` in `text`.
pub fn prom_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// Hold an exclusive flock on `path` until the returned file is dropped.
pub fn hold_flock(path: &Path) -> File {
    use std::os::fd::AsRawFd;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("creating the lock's directory");
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("opening a lock file");
    // SAFETY: flock on a valid, owned file descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0, "cannot lock {}", path.display());
    f
}

// -------------------------------------------------------------------------------------------
// Root-only helpers
// -------------------------------------------------------------------------------------------

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run a system command; `Ok(stdout)` on success, `Err(message)` otherwise.
pub fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "{program} {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

/// A loop device, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = sh(
            "losetup",
            &["--find", "--show", file.to_str().expect("utf-8 path")],
        )?;
        let dev = PathBuf::from(out.trim());
        if !dev.starts_with("/dev/") {
            return Err(format!("losetup printed {out:?}"));
        }
        Ok(LoopDev { dev })
    }
    pub fn path_str(&self) -> &str {
        self.dev.to_str().expect("utf-8 path")
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = sh("losetup", &["-d", self.path_str()]);
    }
}

/// A mount point, unmounted (lazily if busy) on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(args: &[&str], dir: &Path) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut a: Vec<&str> = args.to_vec();
        a.push(dir.to_str().expect("utf-8 path"));
        sh("mount", &a)?;
        Ok(Mount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let d = self.dir.to_str().expect("utf-8 path").to_string();
        if sh("umount", &[&d]).is_err() {
            let _ = sh("umount", &["-l", &d]);
        }
    }
}

impl Mount {
    /// A tmpfs of `size` (as `mount -o size=`) at `dir`, for `test`; `None`
    /// (and the test skipped, saying why) when not root or the mount fails.
    pub fn tmpfs_or_skip(test: &str, size: &str, dir: &Path) -> Option<Mount> {
        if !is_root() {
            skip(test, "needs root to mount a tmpfs");
            return None;
        }
        let opts = format!("size={size}");
        Mount::new(&["-t", "tmpfs", "-o", &opts, "tmpfs"], dir)
            .map_err(|e| skip(test, &format!("cannot mount a tmpfs: {e}")))
            .ok()
    }
}

/// Print why a root-only test is skipped.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

// -------------------------------------------------------------------------------------------
// UDP relay with a kill switch
// -------------------------------------------------------------------------------------------

/// Forwards datagrams between one client (whoever sent last to the front
/// socket) and a server. `cut(true)` drops everything in both directions.
pub struct UdpRelay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub forwarded: Arc<Mutex<(u64, u64)>>,
}

impl UdpRelay {
    pub fn start(server: SocketAddr) -> UdpRelay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("relay front socket");
        let back = UdpSocket::bind("127.0.0.1:0").expect("relay back socket");
        back.connect(server).expect("relay connect");
        let poll = Some(Duration::from_millis(50));
        front.set_read_timeout(poll).expect("timeout");
        back.set_read_timeout(poll).expect("timeout");
        let addr = front.local_addr().expect("relay addr");
        let front = Arc::new(front);
        let back = Arc::new(back);
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let forwarded = Arc::new(Mutex::new((0u64, 0u64)));
        let up = {
            let (front, back, cut, stop, client, fwd) = (
                front.clone(),
                back.clone(),
                cut.clone(),
                stop.clone(),
                client.clone(),
                forwarded.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    if cut.load(Ordering::Relaxed) {
                        continue;
                    }
                    *client.lock().expect("relay lock") = Some(from);
                    if back.send(&buf[..n]).is_ok() {
                        fwd.lock().expect("relay lock").0 += 1;
                    }
                }
            })
        };
        let down = {
            let (front, back, cut, stop, client, fwd) = (
                front,
                back,
                cut.clone(),
                stop.clone(),
                client,
                forwarded.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back.recv(&mut buf) else {
                        continue;
                    };
                    if cut.load(Ordering::Relaxed) {
                        continue;
                    }
                    let to = *client.lock().expect("relay lock");
                    if let Some(to) = to {
                        if front.send_to(&buf[..n], to).is_ok() {
                            fwd.lock().expect("relay lock").1 += 1;
                        }
                    }
                }
            })
        };
        UdpRelay {
            addr,
            cut,
            stop,
            threads: vec![up, down],
            forwarded,
        }
    }

    /// Drop (true) or forward (false) every datagram from now on.
    pub fn cut(&self, on: bool) {
        self.cut.store(on, Ordering::SeqCst);
    }

    /// Datagrams forwarded (client→server, server→client).
    pub fn counts(&self) -> (u64, u64) {
        *self.forwarded.lock().expect("relay lock")
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
