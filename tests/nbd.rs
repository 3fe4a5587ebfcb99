//! NBD front-end against real clients (qemu-io, qemu-img, nbdcopy, nbdinfo,
//! fio's nbd engine) and hand-written malformed sessions over raw sockets,
//! on a unix socket and on TCP 127.0.0.1.
//!
//! The export is a file-backed [`Backend`] defined here (pread/pwrite in
//! `spawn_blocking`) that counts the operations reaching it, so tests can
//! check both the bytes in the file and which backend calls were made.
//! Every client runs with a timeout; a missing client binary fails the test
//! with the package to install.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkmirror::frontend::nbd::proto::{self, Request};
use blkmirror::frontend::nbd::{Backend, Listen, NbdError, NbdServer};
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
const EXPORT: &str = "vol0";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// File-backed backend
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
}

impl Counters {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

struct FileBackend {
    file: Arc<File>,
    size: u64,
    min_block: u32,
    counters: Arc<Counters>,
    faults: Faults,
}

/// Injected backend failures.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// A read at this offset panics.
    panic_read_at: Option<u64>,
    /// A write at this offset fails with EDQUOT (an NBD ENOSPC).
    fail_write_at: Option<u64>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, NbdError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(NbdError::from),
        Err(_) => Err(NbdError::Io),
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn min_block(&self) -> u32 {
        self.min_block
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        assert!(
            len > 0 && offset + u64::from(len) <= self.size,
            "checked by the server"
        );
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        if self.faults.panic_read_at == Some(offset) {
            panic!("injected backend panic at {offset}");
        }
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), NbdError> {
        assert!(!data.is_empty() && offset + data.len() as u64 <= self.size);
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_write_at == Some(offset) {
            return Err(io::Error::from_raw_os_error(libc::EDQUOT).into());
        }
        if fua {
            self.counters.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        let file = self.file.clone();
        blocking(move || {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), NbdError> {
        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
        let file = self.file.clone();
        blocking(move || file.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        assert!(len > 0 && offset + len <= self.size);
        self.counters.trims.fetch_add(1, Ordering::SeqCst);
        let file = self.file.clone();
        blocking(move || punch_hole(&file, offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        assert!(len > 0 && offset + len <= self.size);
        self.counters.zeroes.fetch_add(1, Ordering::SeqCst);
        let file = self.file.clone();
        blocking(move || {
            let zeroes = vec![0u8; MIB as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(MIB);
                file.write_all_at(&zeroes[..n as usize], offset + done)?;
                done += n;
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate only takes integers; the descriptor belongs to `file`,
    // which is borrowed for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------------
// Server harness
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Unix,
    Tcp,
}

/// A server on its own runtime thread, serving an image file in a temp dir.
struct TestServer {
    dir: tempfile::TempDir,
    image: PathBuf,
    size: u64,
    listen: Listen,
    uri: String,
    counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Fills `len` bytes with seeded random data, leaving every fourth MiB zero
/// (so copies exercise zero detection and write-zeroes).
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len as usize];
    for (i, chunk) in data.chunks_mut(MIB as usize).enumerate() {
        if i % 4 != 3 {
            rng.fill_bytes(chunk);
        }
    }
    data
}

impl TestServer {
    fn start(transport: Transport, size: u64) -> TestServer {
        Self::start_with(transport, size, 512, EXPORT)
    }

    fn start_with(transport: Transport, size: u64, min_block: u32, export: &str) -> TestServer {
        Self::start_full(transport, size, min_block, export, Faults::default())
    }

    fn start_full(
        transport: Transport,
        size: u64,
        min_block: u32,
        export: &str,
        faults: Faults,
    ) -> TestServer {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("export.img");
        std::fs::write(&image, pattern(size, 1)).unwrap();
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image)
                .unwrap(),
        );
        let counters = Arc::new(Counters::default());
        let backend = Arc::new(FileBackend {
            file,
            size,
            min_block,
            counters: counters.clone(),
            faults,
        });
        let listen = match transport {
            Transport::Unix => Listen::Unix(dir.path().join("nbd.sock")),
            Transport::Tcp => "tcp:127.0.0.1:0".parse().unwrap(),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let export = export.to_string();
        let thread = std::thread::spawn(move || -> io::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let server = match NbdServer::bind(&listen, &export, backend) {
                    Ok(server) => server,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(Ok((server.local_addr().clone(), server.uri())));
                server
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await
            })
        });
        let (listen, uri) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server thread did not start")
            .expect("bind failed");
        TestServer {
            dir,
            image,
            size,
            listen,
            uri,
            counters,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }

    /// Stops the server and checks that `run` returned cleanly and removed
    /// its socket file.
    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !thread.is_finished() {
                assert!(Instant::now() < deadline, "server did not stop within 30 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            let result = thread.join().expect("server thread panicked");
            if !std::thread::panicking() {
                result.expect("server run failed");
                if let Listen::Unix(path) = &self.listen {
                    assert!(!path.exists(), "socket file left behind");
                }
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// External clients
// ---------------------------------------------------------------------------------------------

/// A command for `program`, which must be installed (from `package`).
fn tool(program: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed; it is needed by this test (apt-get install {package})"
    );
    Command::new(program)
}

/// Runs a client to completion (stdout and stderr in files, so a chatty
/// client never blocks on a pipe), failing the test on timeout or a non-zero
/// exit. Returns stdout + stderr.
fn run(dir: &Path, mut cmd: Command) -> String {
    let out_path = dir.join(format!("client-{}.out", rand::thread_rng().gen::<u64>()));
    let out = File::create(&out_path).unwrap();
    // Clients may leave files behind (fio's verify state): keep them in the temp dir.
    cmd.current_dir(dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let output = std::fs::read_to_string(&out_path).unwrap_or_default();
            panic!("{shown} timed out after {CLIENT_TIMEOUT:?}; output:\n{output}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(
        status.success(),
        "{shown} failed ({status}); output:\n{output}"
    );
    output
}

fn qemu_io(server: &TestServer, commands: &[&str]) -> String {
    let mut cmd = tool("qemu-io", "qemu-utils");
    cmd.args(["-f", "raw", "-d", "unmap", &server.uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let output = run(server.dir.path(), cmd);
    for bad in ["failed", "error", "Error", "mismatch"] {
        assert!(!output.contains(bad), "qemu-io reported {bad:?}:\n{output}");
    }
    output
}

fn assert_range(data: &[u8], offset: u64, len: u64, byte: u8) {
    let range = &data[offset as usize..(offset + len) as usize];
    if let Some(pos) = range.iter().position(|&b| b != byte) {
        panic!(
            "byte at {} is {:#x}, expected {byte:#x}",
            offset as usize + pos,
            range[pos]
        );
    }
}

fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(pos) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {pos}");
    }
}

// ---------------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------------

fn qemu_io_session(transport: Transport) {
    let server = TestServer::start(transport, 16 * MIB);
    let output = qemu_io(
        &server,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x5a -f 1M 64k",
            "flush",
            "discard 2M 1M",
            "write -z 3M 1M",
            "read -P 0 3M 1M",
            "aio_write -P 0xcd 4M 64k",
            "aio_write -P 0xce 5M 64k",
            "aio_write -P 0xcf 6M 1M",
            "aio_flush",
            "read -P 0xcd 4M 64k",
            "read -P 0xce 5M 64k",
            "read -P 0xcf 6M 1M",
            "read -P 0xab 0 512",
        ],
    );
    assert!(output.contains("wrote 1048576/1048576"), "{output}");
    let data = server.contents();
    assert_range(&data, 0, MIB, 0xab);
    assert_range(&data, MIB, 64 << 10, 0x5a);
    assert_range(&data, 2 * MIB, MIB, 0); // punched by the backend's trim
    assert_range(&data, 3 * MIB, MIB, 0);
    assert_range(&data, 4 * MIB, 64 << 10, 0xcd);
    assert_range(&data, 5 * MIB, 64 << 10, 0xce);
    assert_range(&data, 6 * MIB, MIB, 0xcf);
    // Untouched areas keep the original pattern.
    let original = pattern(16 * MIB, 1);
    assert_same(
        &data[7 * MIB as usize..],
        &original[7 * MIB as usize..],
        "tail",
    );
    let c = &server.counters;
    assert!(
        Counters::get(&c.flushes) >= 2,
        "flush and aio_flush reach the backend"
    );
    assert!(
        Counters::get(&c.trims) >= 1,
        "discard reaches the backend as trim"
    );
    assert!(
        Counters::get(&c.zeroes) >= 1,
        "write -z reaches the backend"
    );
    assert!(Counters::get(&c.fua_writes) >= 1, "write -f is a FUA write");
    assert!(Counters::get(&c.reads) >= 1);
    server.stop();
}

#[test]
fn qemu_io_over_unix_socket() {
    qemu_io_session(Transport::Unix);
}

#[test]
fn qemu_io_over_tcp() {
    qemu_io_session(Transport::Tcp);
}

#[test]
fn qemu_io_with_4k_minimum_block_and_the_default_export_name() {
    let mut server = TestServer::start_with(Transport::Unix, 8 * MIB, 4096, EXPORT);
    // The empty export name selects the export.
    server.uri = server.listen.uri("");
    assert!(
        server.uri.starts_with("nbd+unix:///?socket="),
        "{}",
        server.uri
    );
    // Sub-block requests are read-modify-written by qemu, which honours the
    // advertised minimum block.
    qemu_io(
        &server,
        &[
            "write -P 0x11 4096 4096",
            "write -P 0x22 8704 512",
            "read -P 0x22 8704 512",
        ],
    );
    let data = server.contents();
    assert_range(&data, 4096, 4096, 0x11);
    assert_range(&data, 8704, 512, 0x22);
    server.stop();
}

fn qemu_img_convert(transport: Transport) {
    let size = 32 * MIB;
    let server = TestServer::start(transport, size);
    let source = server.dir.path().join("source.img");
    let expected = pattern(size, 7);
    std::fs::write(&source, &expected).unwrap();
    let mut cmd = tool("qemu-img", "qemu-utils");
    cmd.args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&source)
        .arg(&server.uri);
    run(server.dir.path(), cmd);
    assert_same(
        &server.contents(),
        &expected,
        "export after qemu-img convert",
    );
    server.stop();
}

#[test]
fn qemu_img_convert_into_the_export_over_unix_socket() {
    qemu_img_convert(Transport::Unix);
}

#[test]
fn qemu_img_convert_into_the_export_over_tcp() {
    qemu_img_convert(Transport::Tcp);
}

fn nbdcopy_both_directions(transport: Transport) {
    let size = 48 * MIB;
    let server = TestServer::start(transport, size);
    let dir = server.dir.path();
    // Upload: a file into the export (multi-conn: several connections).
    let source = dir.join("up.img");
    let expected = pattern(size, 9);
    std::fs::write(&source, &expected).unwrap();
    let mut cmd = tool("nbdcopy", "libnbd-bin");
    cmd.arg("--flush").arg(&source).arg(&server.uri);
    run(dir, cmd);
    assert_same(&server.contents(), &expected, "export after nbdcopy upload");
    assert!(Counters::get(&server.counters.flushes) >= 1, "--flush");
    // Download: the export into a pre-created file.
    let target = dir.join("down.img");
    File::create(&target).unwrap().set_len(size).unwrap();
    let mut cmd = tool("nbdcopy", "libnbd-bin");
    cmd.arg(&server.uri).arg(&target);
    run(dir, cmd);
    assert_same(
        &std::fs::read(&target).unwrap(),
        &expected,
        "nbdcopy download",
    );
    server.stop();
}

#[test]
fn nbdcopy_upload_and_download_over_unix_socket() {
    nbdcopy_both_directions(Transport::Unix);
}

#[test]
fn nbdcopy_upload_and_download_over_tcp() {
    nbdcopy_both_directions(Transport::Tcp);
}

#[test]
fn nbdinfo_reports_size_name_flags_and_block_sizes() {
    for transport in [Transport::Unix, Transport::Tcp] {
        let server = TestServer::start(transport, 24 * MIB);
        let mut cmd = tool("nbdinfo", "libnbd-bin");
        cmd.args(["--json", &server.uri]);
        let output = run(server.dir.path(), cmd);
        let json: serde_json::Value = serde_json::from_str(&output)
            .unwrap_or_else(|e| panic!("nbdinfo output is not JSON ({e}):\n{output}"));
        assert_eq!(json["protocol"], "newstyle-fixed", "{json}");
        assert_eq!(json["structured"], false, "{json}");
        let export = &json["exports"][0];
        assert_eq!(export["export-name"], EXPORT, "{json}");
        assert_eq!(export["export-size"], 24 * MIB, "{json}");
        assert_eq!(export["is_read_only"], false, "{json}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(export[flag], true, "{flag}: {json}");
        }
        assert_eq!(export["can_df"], false, "{json}");
        assert_eq!(export["block_size_minimum"], 512, "{json}");
        assert_eq!(export["block_size_preferred"], 4096, "{json}");
        assert_eq!(export["block_size_maximum"], 32 * MIB, "{json}");

        let mut cmd = tool("nbdinfo", "libnbd-bin");
        cmd.args(["--list", "--json", &server.uri]);
        let output = run(server.dir.path(), cmd);
        let json: serde_json::Value = serde_json::from_str(&output)
            .unwrap_or_else(|e| panic!("nbdinfo --list output is not JSON ({e}):\n{output}"));
        let exports = json["exports"].as_array().expect("exports");
        assert_eq!(exports.len(), 1, "{json}");
        assert_eq!(exports[0]["export-name"], EXPORT, "{json}");
        assert_eq!(exports[0]["export-size"], 24 * MIB, "{json}");

        let mut cmd = tool("nbdinfo", "libnbd-bin");
        cmd.args(["--size", &server.listen.uri("")]);
        let output = run(server.dir.path(), cmd);
        assert_eq!(output.trim(), (24 * MIB).to_string(), "default export size");
        server.stop();
    }
}

#[test]
fn nbdinfo_refuses_an_unknown_export() {
    let server = TestServer::start(Transport::Unix, 8 * MIB);
    let mut cmd = tool("nbdinfo", "libnbd-bin");
    cmd.args(["--size", &server.listen.uri("nope")]);
    let status = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!status.status.success(), "unknown export must fail");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("no export named 'nope'"), "{stderr}");
    server.stop();
}

fn fio_verify(transport: Transport) {
    let server = TestServer::start(transport, 32 * MIB);
    let mut cmd = tool("fio", "fio");
    cmd.args([
        "--name=randwrite-crc",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--numjobs=2",
        "--offset_increment=16M",
        "--group_reporting",
    ]);
    let output = run(server.dir.path(), cmd);
    for bad in [
        "verify: bad",
        "bad magic",
        "crc32c: verify failed",
        "fio: pid",
    ] {
        assert!(!output.contains(bad), "fio reported {bad:?}:\n{output}");
    }
    assert!(output.contains("err= 0"), "{output}");
    let c = &server.counters;
    // 2 jobs × 16 MiB of 4 KiB random writes, then verify reads of the same.
    assert!(
        Counters::get(&c.writes) >= 2 * 4096,
        "writes: {}",
        Counters::get(&c.writes)
    );
    assert!(
        Counters::get(&c.reads) >= 2 * 4096,
        "reads: {}",
        Counters::get(&c.reads)
    );
    server.stop();
}

#[test]
fn fio_nbd_engine_randwrite_with_verify_over_unix_socket() {
    fio_verify(Transport::Unix);
}

#[test]
fn fio_nbd_engine_randwrite_with_verify_over_tcp() {
    fio_verify(Transport::Tcp);
}

// ---------------------------------------------------------------------------------------------
// Raw sessions
// ---------------------------------------------------------------------------------------------

trait Socket: Read + Write + Send {
    fn try_clone_box(&self) -> Box<dyn Socket>;
}

impl Socket for UnixStream {
    fn try_clone_box(&self) -> Box<dyn Socket> {
        Box::new(self.try_clone().unwrap())
    }
}

impl Socket for std::net::TcpStream {
    fn try_clone_box(&self) -> Box<dyn Socket> {
        Box::new(self.try_clone().unwrap())
    }
}

/// A hand-driven NBD client over a blocking socket.
struct Raw {
    sock: Box<dyn Socket>,
}

impl Raw {
    fn connect(server: &TestServer) -> Raw {
        let sock: Box<dyn Socket> = match &server.listen {
            Listen::Unix(path) => {
                let s = UnixStream::connect(path).unwrap();
                s.set_read_timeout(Some(RAW_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(RAW_TIMEOUT)).unwrap();
                Box::new(s)
            }
            Listen::Tcp(addr) => {
                let s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(RAW_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(RAW_TIMEOUT)).unwrap();
                s.set_nodelay(true).unwrap();
                Box::new(s)
            }
        };
        let mut raw = Raw { sock };
        let greeting = raw.read_n(18);
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(&greeting[16..18], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        raw
    }

    /// Connects and sends the client flags.
    fn negotiating(server: &TestServer, flags: u32) -> Raw {
        let mut raw = Raw::connect(server);
        raw.send(&flags.to_be_bytes());
        raw
    }

    /// Connects and enters transmission with NBD_OPT_GO on `name`.
    fn transmitting(server: &TestServer) -> Raw {
        let mut raw = Raw::negotiating(server, 3);
        let (size, flags) = raw.go(EXPORT.as_bytes());
        assert_eq!(size, server.size);
        assert_eq!(flags, proto::TRANSMISSION_FLAGS);
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.sock.read_exact(&mut buf).unwrap();
        buf
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// (option, reply type, data)
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(&h[0..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert!(len <= 64 << 10, "reply of {len} bytes");
        (option, kind, self.read_n(len))
    }

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_GO; returns (size, transmission flags) from NBD_INFO_EXPORT.
    fn go(&mut self, name: &[u8]) -> (u64, u16) {
        self.send_option(
            proto::OPT_GO,
            &Raw::info_data(name, &[proto::INFO_BLOCK_SIZE]),
        );
        let mut export = None;
        loop {
            let (option, kind, data) = self.option_reply();
            assert_eq!(option, proto::OPT_GO);
            match kind {
                proto::REP_INFO => {
                    if data[0..2] == proto::INFO_EXPORT.to_be_bytes() {
                        export = Some((
                            u64::from_be_bytes(data[2..10].try_into().unwrap()),
                            u16::from_be_bytes([data[10], data[11]]),
                        ));
                    }
                }
                proto::REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!("NBD_OPT_GO failed with {other:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.send(&proto::encode_request(&r));
    }

    /// (error, cookie)
    fn reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Sends a request and expects an error reply with no payload.
    fn expect_error(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> u32 {
        let cookie = rand::thread_rng().gen::<u64>();
        self.request(kind, flags, cookie, offset, len);
        self.send(payload);
        let (error, got) = self.reply();
        assert_eq!(got, cookie, "reply carries the request's cookie");
        error
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(proto::CMD_READ, 0, 0xfeed, offset, len);
        let (error, cookie) = self.reply();
        assert_eq!((error, cookie), (0, 0xfeed));
        self.read_n(len as usize)
    }

    /// The server closed the connection: EOF (or a reset) before `RAW_TIMEOUT`.
    fn expect_closed(&mut self) {
        let mut buf = [0u8; 1];
        match self.sock.read(&mut buf) {
            Ok(0) => {}
            Ok(_) => panic!("unexpected data instead of a closed connection"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[test]
fn handshake_closes_on_bad_option_magic_oversize_option_or_unknown_flags() {
    let server = TestServer::start(Transport::Unix, 4 * MIB);
    // Bad option magic.
    let mut raw = Raw::negotiating(&server, 1);
    let mut b = b"NOTOPTS!".to_vec();
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    raw.send(&b);
    raw.expect_closed();
    // Option data beyond 64 KiB: closed without reading it.
    let mut raw = Raw::negotiating(&server, 1);
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    b.extend_from_slice(&((64 << 10) + 1u32).to_be_bytes());
    raw.send(&b);
    raw.expect_closed();
    // Unknown client flags.
    let mut raw = Raw::negotiating(&server, 1 << 7);
    raw.expect_closed();
    // NBD_OPT_EXPORT_NAME with an unknown name cannot be refused: closed.
    let mut raw = Raw::negotiating(&server, 1);
    raw.send_option(proto::OPT_EXPORT_NAME, b"nope");
    raw.expect_closed();
    // Abort is acknowledged, then closed.
    let mut raw = Raw::negotiating(&server, 1);
    raw.send_option(proto::OPT_ABORT, b"");
    assert_eq!(
        raw.option_reply(),
        (proto::OPT_ABORT, proto::REP_ACK, vec![])
    );
    raw.expect_closed();
    server.stop();
}

#[test]
fn handshake_answers_unknown_and_malformed_options_and_then_works() {
    for transport in [Transport::Unix, Transport::Tcp] {
        let server = TestServer::start(transport, 4 * MIB);
        let mut raw = Raw::negotiating(&server, 3);
        for option in [
            0x1234,
            proto::OPT_STARTTLS,
            proto::OPT_STRUCTURED_REPLY,
            proto::OPT_EXTENDED_HEADERS,
            proto::OPT_SET_META_CONTEXT,
        ] {
            raw.send_option(option, b"some data");
            let (opt, kind, _) = raw.option_reply();
            assert_eq!((opt, kind), (option, proto::REP_ERR_UNSUP));
        }
        // GO on an unknown export, then with a name length beyond the data.
        raw.send_option(proto::OPT_GO, &Raw::info_data(b"nope", &[]));
        assert_eq!(raw.option_reply().1, proto::REP_ERR_UNKNOWN);
        raw.send_option(proto::OPT_GO, &[0, 0, 1, 0, 0, 0]);
        assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
        raw.send_option(proto::OPT_INFO, &[0, 0]);
        assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
        // LIST with data is invalid; without, it names the export.
        raw.send_option(proto::OPT_LIST, b"x");
        assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
        raw.send_option(proto::OPT_LIST, b"");
        let (_, kind, data) = raw.option_reply();
        assert_eq!(kind, proto::REP_SERVER);
        assert_eq!(&data[4..], EXPORT.as_bytes());
        assert_eq!(raw.option_reply().1, proto::REP_ACK);
        // INFO with NBD_INFO_NAME on the default name gives the canonical name.
        raw.send_option(proto::OPT_INFO, &Raw::info_data(b"", &[proto::INFO_NAME]));
        let mut name = None;
        loop {
            let (_, kind, data) = raw.option_reply();
            if kind == proto::REP_ACK {
                break;
            }
            assert_eq!(kind, proto::REP_INFO);
            if data[0..2] == proto::INFO_NAME.to_be_bytes() {
                name = Some(data[2..].to_vec());
            }
        }
        assert_eq!(name.as_deref(), Some(EXPORT.as_bytes()));
        // Still negotiating: GO works and so does a read.
        let (size, _) = raw.go(b"");
        assert_eq!(size, 4 * MIB);
        let original = pattern(4 * MIB, 1);
        assert_eq!(
            raw.read(MIB, 4096),
            &original[MIB as usize..MIB as usize + 4096]
        );
        raw.request(proto::CMD_DISC, 0, 1, 0, 0);
        raw.expect_closed();
        server.stop();
    }
}

#[test]
fn export_name_option_sends_zeroes_unless_no_zeroes() {
    let server = TestServer::start(Transport::Unix, 4 * MIB);
    let original = pattern(4 * MIB, 1);
    for (flags, padding) in [(1u32, 124usize), (3, 0)] {
        let mut raw = Raw::negotiating(&server, flags);
        raw.send_option(proto::OPT_EXPORT_NAME, EXPORT.as_bytes());
        let reply = raw.read_n(10 + padding);
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), 4 * MIB);
        assert_eq!(
            u16::from_be_bytes([reply[8], reply[9]]),
            proto::TRANSMISSION_FLAGS
        );
        assert!(reply[10..].iter().all(|&b| b == 0));
        // The next bytes are the reply to our first request: framing is exact.
        assert_eq!(raw.read(0, 512), &original[..512]);
    }
    server.stop();
}

fn malformed_requests(transport: Transport) {
    let size = 4 * MIB;
    let server = TestServer::start(transport, size);
    let original = server.contents();
    let mut raw = Raw::transmitting(&server);
    let block = vec![0xee; 4096];
    // Past the end: EINVAL for reads and trims, ENOSPC for writes (their
    // payload is drained so the next request parses).
    assert_eq!(raw.expect_error(proto::CMD_READ, 0, size, 512, &[]), EINVAL);
    assert_eq!(
        raw.expect_error(proto::CMD_READ, 0, size - 512, 1024, &[]),
        EINVAL
    );
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE, 0, size - 512, 4096, &block),
        ENOSPC
    );
    assert_eq!(
        raw.expect_error(proto::CMD_TRIM, 0, size, 4096, &[]),
        EINVAL
    );
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE_ZEROES, 0, size, 4096, &[]),
        ENOSPC
    );
    // offset + length overflows.
    assert_eq!(
        raw.expect_error(proto::CMD_READ, 0, u64::MAX - 511, 4096, &[]),
        EINVAL
    );
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE, 0, u64::MAX, 4096, &block),
        EINVAL
    );
    // READ longer than the maximum payload.
    assert_eq!(
        raw.expect_error(proto::CMD_READ, 0, 0, (32 << 20) + 512, &[]),
        EINVAL
    );
    // Unknown commands (CACHE and BLOCK_STATUS are not offered) and flags.
    for kind in [5u16, 7, 9, 200] {
        assert_eq!(
            raw.expect_error(kind, 0, 0, 4096, &[]),
            EINVAL,
            "command {kind}"
        );
    }
    assert_eq!(
        raw.expect_error(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 4096, &[]),
        EINVAL
    );
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 4096, &block),
        EINVAL
    );
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE, 1 << 12, 0, 4096, &block),
        EINVAL
    );
    assert_eq!(
        raw.expect_error(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FAST_ZERO,
            0,
            4096,
            &[]
        ),
        EINVAL
    );
    // Unaligned to the 512-byte minimum block.
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE, 0, 0, 100, &block[..100]),
        EINVAL
    );
    assert_eq!(raw.expect_error(proto::CMD_READ, 0, 1, 512, &[]), EINVAL);
    // FLUSH with a non-zero offset or length.
    assert_eq!(raw.expect_error(proto::CMD_FLUSH, 0, 512, 0, &[]), EINVAL);
    // Zero-length requests succeed without a payload and without I/O.
    for kind in [
        proto::CMD_READ,
        proto::CMD_WRITE,
        proto::CMD_TRIM,
        proto::CMD_WRITE_ZEROES,
    ] {
        assert_eq!(
            raw.expect_error(kind, 0, 4096, 0, &[]),
            0,
            "zero-length {kind}"
        );
    }
    // The connection still works and the data is intact.
    assert_eq!(raw.read(0, 4096), &original[..4096]);
    assert_eq!(
        raw.read(size - 4096, 4096),
        &original[size as usize - 4096..]
    );
    raw.request(proto::CMD_DISC, 0, 2, 0, 0);
    raw.expect_closed();
    let c = &server.counters;
    assert_eq!(Counters::get(&c.writes), 0);
    assert_eq!(Counters::get(&c.zeroes), 0);
    assert_eq!(Counters::get(&c.trims), 0);
    assert_eq!(Counters::get(&c.reads), 2);
    assert_same(
        &server.contents(),
        &original,
        "export after malformed requests",
    );
    server.stop();
}

#[test]
fn malformed_requests_get_errors_over_unix_socket() {
    malformed_requests(Transport::Unix);
}

#[test]
fn malformed_requests_get_errors_over_tcp() {
    malformed_requests(Transport::Tcp);
}

#[test]
fn bad_request_magic_and_oversize_write_close_the_connection() {
    for transport in [Transport::Unix, Transport::Tcp] {
        let server = TestServer::start(transport, 4 * MIB);
        let original = server.contents();
        // Bad magic.
        let mut raw = Raw::transmitting(&server);
        let mut junk = proto::encode_request(&Request {
            flags: 0,
            kind: proto::CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: 512,
        });
        junk[0] = 0x99;
        raw.send(&junk);
        // The server may already have closed: the payload is best effort.
        let _ = raw.sock.write_all(&[0xaa; 512]);
        raw.expect_closed();
        // A WRITE announcing more than 32 MiB cannot be skipped: closed.
        let mut raw = Raw::transmitting(&server);
        raw.request(proto::CMD_WRITE, 0, 2, 0, (32 << 20) + 4096);
        let _ = raw.sock.write_all(&[0xaa; 4096]);
        raw.expect_closed();
        // So is a huge one, even with flags that would be refused anyway.
        let mut raw = Raw::transmitting(&server);
        raw.request(proto::CMD_WRITE, 0x8000, 3, 0, u32::MAX);
        raw.expect_closed();
        assert_eq!(Counters::get(&server.counters.writes), 0);
        assert_same(
            &server.contents(),
            &original,
            "export after closed sessions",
        );
        server.stop();
    }
}

#[test]
fn pipelined_requests_all_complete_before_disc_closes() {
    // More requests than the per-connection limit, sent without waiting:
    // the server must keep reading, reply to each cookie exactly once, and
    // finish everything before honouring DISC.
    let size = 8 * MIB;
    let server = TestServer::start(Transport::Unix, size);
    let mut raw = Raw::transmitting(&server);
    let mut reader = Raw {
        sock: raw.sock.try_clone_box(),
    };
    const N: u64 = 500;
    let replies = std::thread::spawn(move || {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..N {
            let (error, cookie) = reader.reply();
            assert_eq!(error, 0, "cookie {cookie:#x}");
            if cookie & 1 == 1 {
                // A read of 8 KiB: its payload follows the header.
                let data = reader.read_n(8192);
                assert!(
                    seen.insert(cookie, Some(data)).is_none(),
                    "duplicate {cookie}"
                );
            } else {
                assert!(seen.insert(cookie, None).is_none(), "duplicate {cookie}");
            }
        }
        reader.expect_closed();
        seen
    });
    let mut expected = server.contents();
    for i in 0..N {
        let offset = (i * 8192) % size;
        if i % 2 == 0 {
            let data = vec![(i % 251) as u8; 8192];
            expected[offset as usize..offset as usize + 8192].copy_from_slice(&data);
            raw.request(proto::CMD_WRITE, 0, i << 1, offset, 8192);
            raw.send(&data);
        } else {
            // Reads of areas no write in this batch touches (odd slots).
            raw.request(proto::CMD_READ, 0, (i << 1) | 1, offset, 8192);
        }
    }
    raw.request(proto::CMD_DISC, 0, 0xd15c, 0, 0);
    let seen = replies.join().expect("reply reader");
    assert_eq!(seen.len() as u64, N);
    let original = pattern(size, 1);
    for (cookie, data) in &seen {
        if let Some(data) = data {
            let offset = (((cookie >> 1) * 8192) % size) as usize;
            assert_eq!(
                data.as_slice(),
                &original[offset..offset + 8192],
                "read {cookie}"
            );
        }
    }
    assert_same(
        &server.contents(),
        &expected,
        "export after pipelined writes",
    );
    assert_eq!(Counters::get(&server.counters.writes), N / 2);
    server.stop();
}

#[test]
fn backend_errors_and_panics_become_error_replies() {
    let faults = Faults {
        panic_read_at: Some(8192),
        fail_write_at: Some(4096),
    };
    let server = TestServer::start_full(Transport::Unix, 4 * MIB, 512, EXPORT, faults);
    let original = server.contents();
    let mut raw = Raw::transmitting(&server);
    // EDQUOT from the backend reaches the client as ENOSPC.
    assert_eq!(
        raw.expect_error(proto::CMD_WRITE, 0, 4096, 512, &[1; 512]),
        ENOSPC
    );
    // A panicking backend call still gets a reply (EIO), and the connection lives on.
    assert_eq!(raw.expect_error(proto::CMD_READ, 0, 8192, 512, &[]), 5);
    assert_eq!(raw.read(0, 512), &original[..512]);
    raw.request(proto::CMD_DISC, 0, 1, 0, 0);
    raw.expect_closed();
    assert_same(
        &server.contents(),
        &original,
        "export after failed requests",
    );
    server.stop();
}

/// The crate's own client (used by `blkmirror demo` and the replication
/// tests): `NBD_OPT_GO` negotiation, every command it sends, a backend
/// error passed through, and a refused export named in its error.
#[test]
fn crate_client_negotiates_go_and_round_trips() {
    use blkmirror::frontend::nbd::client::Client;
    let faults = Faults {
        panic_read_at: None,
        fail_write_at: Some(MIB),
    };
    let server = TestServer::start_full(Transport::Unix, 4 * MIB, 512, EXPORT, faults);
    let Listen::Unix(sock) = server.listen.clone() else {
        unreachable!("a unix socket was asked for")
    };
    let mut expected = server.contents();
    let mut c = Client::connect(&sock, EXPORT).unwrap();
    assert_eq!(c.size, 4 * MIB);
    assert_eq!(c.min_block, 512);
    assert_eq!(c.flags, proto::TRANSMISSION_FLAGS);
    let block: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(c.write(65536, &block, false).unwrap(), 0);
    expected[65536..65536 + 8192].copy_from_slice(&block);
    assert_eq!(c.write(131072, &block[..4096], true).unwrap(), 0);
    expected[131072..131072 + 4096].copy_from_slice(&block[..4096]);
    assert_eq!(c.zero(2 * MIB, 65536).unwrap(), 0);
    expected[2 * MIB as usize..(2 * MIB + 65536) as usize].fill(0);
    assert_eq!(c.trim(3 * MIB, 4096).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    assert_eq!(c.read(65536, 8192).unwrap(), block);
    // The backend's EDQUOT arrives as ENOSPC, and the connection lives on.
    assert_eq!(c.write(MIB, &block[..512], false).unwrap(), ENOSPC);
    // Past the end: ENOSPC for a write (its payload drained, the connection
    // lives on), EINVAL for a read, which `read` turns into an error.
    assert_eq!(c.write(4 * MIB, &block[..512], false).unwrap(), ENOSPC);
    let e = c.read(4 * MIB - 512, 1024).unwrap_err();
    assert!(e.to_string().contains("NBD error 22"), "{e}");
    // A buffer that does not match the length is refused before sending.
    let mut short = [0u8; 16];
    let e = c
        .request(proto::CMD_READ, 0, 0, 512, None, Some(&mut short))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(c.read(0, 4096).unwrap(), &expected[..4096]);
    c.disconnect();
    let got = server.contents();
    // TRIM may leave any contents; compare everything else.
    let (t0, t1) = (3 * MIB as usize, 3 * MIB as usize + 4096);
    assert_same(
        &got[..t0],
        &expected[..t0],
        "export before the trimmed range",
    );
    assert_same(
        &got[t1..],
        &expected[t1..],
        "export after the trimmed range",
    );
    let e = Client::connect(&sock, "nope")
        .err()
        .expect("unknown export");
    let text = e.to_string();
    assert!(text.contains("refused export 'nope'"), "{text}");
    assert!(text.contains("unknown export"), "{text}");
    server.stop();
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = || {
            Arc::new(FileBackend {
                file: Arc::new(tempfile::tempfile().unwrap()),
                size: 0,
                min_block: 512,
                counters: Arc::default(),
                faults: Faults::default(),
            })
        };
        let listen = Listen::Unix(path.clone());
        let server = NbdServer::bind(&listen, "x", backend()).expect("stale socket replaced");
        let err = match NbdServer::bind(&listen, "x", backend()) {
            Ok(_) => panic!("second bind on a live socket succeeded"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(server);
        assert!(!path.exists(), "socket file removed with the server");
        // A server whose socket file was replaced leaves the new file alone.
        let server = NbdServer::bind(&listen, "x", backend()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(server);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_file(&path).unwrap();
        // A regular file is never replaced.
        std::fs::write(&path, b"data").unwrap();
        let err = match NbdServer::bind(&listen, "x", backend()) {
            Ok(_) => panic!("bind over a regular file succeeded"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        // Invalid configuration is refused up front.
        let err = match NbdServer::bind(&"tcp:127.0.0.1:0".parse().unwrap(), "a\0b", backend()) {
            Ok(_) => panic!("NUL in export name accepted"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    });
    // Outside a runtime: an error, not a panic.
    let backend = Arc::new(FileBackend {
        file: Arc::new(tempfile::tempfile().unwrap()),
        size: 0,
        min_block: 512,
        counters: Arc::default(),
        faults: Faults::default(),
    });
    let listen = Listen::Unix(dir.path().join("t.sock"));
    assert!(NbdServer::bind(&listen, "x", backend).is_err());
}

#[test]
fn shutdown_closes_idle_and_negotiating_connections() {
    let server = TestServer::start(Transport::Tcp, 4 * MIB);
    let mut idle = Raw::transmitting(&server);
    let mut negotiating = Raw::negotiating(&server, 3);
    let started = Instant::now();
    let mut server = server;
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    idle.expect_closed();
    negotiating.expect_closed();
}

/// Runs `nbd-client ARGS` (checked installed, bounded by `timeout`) and
/// returns whether it succeeded and its stdout + stderr. Unlike `run`, a
/// failure is an outcome the caller checks.
fn nbd_client(args: &[&str]) -> (bool, String) {
    let _ = tool("nbd-client", "nbd-client");
    let out = Command::new("timeout")
        .args(["60", "nbd-client"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The kernel's NBD client, as far as a machine without the `nbd` module
/// lets it go: its user-space half (`nbd-client`, from the nbd-client
/// package) lists the exports, and negotiates the export and its size with
/// `NBD_OPT_GO` before it fails to reach the kernel driver. Where the module
/// is loaded, attaching a device is left out (a test must not take one).
#[test]
fn nbd_client_tool_lists_and_negotiates_the_export() {
    let server = TestServer::start(Transport::Tcp, 8 * MIB);
    let Listen::Tcp(addr) = server.listen.clone() else {
        unreachable!("a TCP listener was asked for")
    };
    let port = addr.port().to_string();
    let list = run(server.dir.path(), {
        let mut cmd = tool("nbd-client", "nbd-client");
        cmd.args(["-l", "127.0.0.1", &port]);
        cmd
    });
    assert!(list.lines().any(|l| l.trim() == EXPORT), "{list}");
    let attempt =
        |export: &str| nbd_client(&["-N", export, "127.0.0.1", &port, "/dev/nbd15", "-nofork"]);
    let (ok, text) = attempt("nope");
    assert!(!ok, "{text}");
    assert!(text.contains("unknown export"), "{text}");
    if Path::new("/sys/module/nbd").exists() {
        eprintln!("the nbd module is loaded: not attaching /dev/nbd15 in a test");
    } else {
        let (ok, text) = attempt(EXPORT);
        assert!(!ok, "{text}");
        // Negotiation finished with the export's size; only the driver is missing.
        assert!(text.contains("size = 8MB"), "{text}");
        assert!(
            text.contains("nbd module") || text.contains("/dev/nbd15"),
            "{text}"
        );
    }
    assert_eq!(Counters::get(&server.counters.writes), 0);
    server.stop();
    // Over a unix socket, in the form the README's quick start gives.
    let server = TestServer::start(Transport::Unix, 4 * MIB);
    let Listen::Unix(sock) = server.listen.clone() else {
        unreachable!("a unix socket was asked for")
    };
    if !Path::new("/sys/module/nbd").exists() {
        let sock = sock.to_str().expect("a UTF-8 temporary path");
        let (ok, text) = nbd_client(&["-unix", sock, "/dev/nbd15", "-N", EXPORT, "-nofork"]);
        assert!(!ok, "{text}");
        assert!(text.contains("size = 4MB"), "{text}");
    }
    server.stop();
}
