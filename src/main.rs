//! The `blkmirror` command line.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use blkmirror::block::EnginePreference;
use blkmirror::config::SyncLimits;
use blkmirror::error::{Error, Result};
use blkmirror::transport::{Fingerprint, Identity, Tuning};

#[derive(Parser)]
#[command(name = "blkmirror", version, about = "Block-device replication over QUIC with mutual TLS", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    /// io_uring if the kernel allows it, otherwise pread/pwrite
    Auto,
    /// io_uring or fail
    Uring,
    /// pread/pwrite
    Plain,
}

impl From<EngineArg> for EnginePreference {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Auto => EnginePreference::Auto,
            EngineArg::Uring => EnginePreference::Uring,
            EngineArg::Plain => EnginePreference::Plain,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Sync,
    Async,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnDisconnectArg {
    Suspend,
    Continue,
}

/// Who this node is, which mirror volume it talks to, and where the
/// primary keeps that volume's state (sync, replicate).
#[derive(clap::Args)]
struct MirrorArgs {
    /// Identity directory of this node
    #[arg(long)]
    identity: PathBuf,
    /// Mirror address HOST:PORT
    #[arg(long)]
    to: String,
    /// Pinned fingerprint of the mirror (sha256:<64 hex>)
    #[arg(long)]
    peer: Fingerprint,
    /// Volume name on the mirror ([A-Za-z0-9._-]{1,64}, no leading dot)
    #[arg(long)]
    volume: String,
    /// State directory (digest map and dirty bitmap per volume)
    #[arg(long, default_value = "/var/lib/blkmirror")]
    state: PathBuf,
    /// Allow the replica (and the state) to be resized to the source's size
    #[arg(long)]
    resize: bool,
    /// Connect, print what would be done (generation ids, changed chunks on each side) and exit
    #[arg(long)]
    dry_run: bool,
    /// When both sides wrote since they parted: refuse (disconnect), or discard the changes of the
    /// side that became primary later, or of the side with fewer changed chunks (the loser keeps
    /// them as a recovery point)
    #[arg(long, value_enum, default_value = "disconnect")]
    after_split_brain: blkmirror::protocol::genid::SplitBrainPolicy,
}

#[derive(Subcommand)]
enum PointsCmd {
    /// Take a recovery point now (also while a replication session runs)
    Create {
        /// Store directory of `serve`
        #[arg(long)]
        store: PathBuf,
        /// Volume whose points to work on
        #[arg(long)]
        volume: String,
        /// Name of the point ([A-Za-z0-9._:-], at most 64)
        #[arg(long)]
        name: Option<String>,
    },
    /// List the points with the space each uses
    List {
        /// Store directory of `serve`
        #[arg(long)]
        store: PathBuf,
        /// Volume whose points to work on
        #[arg(long)]
        volume: String,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Remove points by id, and/or apply a retention policy to the automatic ones
    Prune {
        /// Store directory of `serve`
        #[arg(long)]
        store: PathBuf,
        /// Volume whose points to work on
        #[arg(long)]
        volume: String,
        /// Point to remove (repeatable)
        #[arg(long = "id")]
        ids: Vec<u64>,
        /// Keep the N newest automatic points
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep the newest automatic point of each of the last N hours
        #[arg(long)]
        keep_hourly: Option<u32>,
        /// Keep the newest automatic point of each of the last N days
        #[arg(long)]
        keep_daily: Option<u32>,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a node identity (key pair and self-signed certificate) in DIR and print its fingerprint
    Init {
        /// Directory to create the identity in (cert.pem, key.pem)
        dir: PathBuf,
    },
    /// Print the fingerprint of the identity in DIR
    Fingerprint {
        /// Identity directory made by `blkmirror init`
        dir: PathBuf,
    },
    /// Run a mirror node: accept syncs from allowed primaries into a store of replicas
    Serve {
        /// Identity directory of this node
        #[arg(long)]
        identity: PathBuf,
        /// UDP address to listen on, e.g. 0.0.0.0:7700 or [::]:7700
        #[arg(long)]
        listen: SocketAddr,
        /// Directory holding the replicas (NAME.img) and their metadata
        #[arg(long)]
        store: PathBuf,
        /// Fingerprint of a primary allowed to connect (sha256:<64 hex>); repeatable
        #[arg(long = "allow", required = true)]
        allow: Vec<Fingerprint>,
        /// Serve Prometheus metrics on this TCP address
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// I/O engine
        #[arg(long, value_enum, default_value = "auto")]
        engine: EngineArg,
        /// io_uring queue depth (writes in flight per volume)
        #[arg(long, default_value_t = 32)]
        queue_depth: u32,
        /// Async runtime threads (QUIC and sessions; each volume's writes run on a thread of its own)
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// QUIC tuning file (TOML; see README)
        #[arg(long)]
        tuning: Option<PathBuf>,
        /// Take a recovery point of a replica after each completed sync or resync
        #[arg(long)]
        points_after_sync: bool,
        /// Take an automatic recovery point of every consistent replica this often (seconds)
        #[arg(long)]
        point_every: Option<u64>,
        /// Retention of automatic points: keep the N newest
        #[arg(long, default_value_t = 8)]
        keep_last: u32,
        /// Retention of automatic points: keep the newest of each of the last N hours
        #[arg(long, default_value_t = 24)]
        keep_hourly: u32,
        /// Retention of automatic points: keep the newest of each of the last N days
        #[arg(long, default_value_t = 7)]
        keep_daily: u32,
        /// Asynchronous sessions: make the replica durable (fdatasync, then acknowledge) at least this often while writes arrive, in milliseconds (100..=60000); the application's FLUSH and FUA writes commit at once (see README, "The commit interval")
        #[arg(long, default_value_t = blkmirror::mirror::ASYNC_COMMIT_DEFAULT.as_millis() as u64)]
        async_commit_ms: u64,
    },
    /// Copy a device or image to a mirror: full the first time, only changed chunks later
    Sync {
        /// Block device or image file to copy
        source: PathBuf,
        #[command(flatten)]
        mirror: MirrorArgs,
        /// Send every chunk, whatever the state says
        #[arg(long, conflicts_with = "checksum")]
        full: bool,
        /// Compare against digests the mirror computes from its replica
        #[arg(long)]
        checksum: bool,
        /// Chunk size in bytes (power of two, 4096..=1048576); default 65536
        #[arg(long)]
        chunk_size: Option<u64>,
        /// Print one JSON object with the result on stdout
        #[arg(long)]
        json: bool,
        /// Serve Prometheus metrics on this TCP address while the sync runs
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// I/O engine
        #[arg(long, value_enum, default_value = "auto")]
        engine: EngineArg,
        /// io_uring queue depth (reads in flight)
        #[arg(long, default_value_t = 32)]
        queue_depth: u32,
        /// Never draw a progress bar
        #[arg(long)]
        no_progress: bool,
        /// Send chunks raw instead of lz4 (for links faster than lz4 on this CPU)
        #[arg(long, conflicts_with = "compress_always")]
        no_compress: bool,
        /// Try lz4 on every chunk (default: adaptive, only while the link is the bottleneck)
        #[arg(long)]
        compress_always: bool,
        /// QUIC tuning file (TOML; see README)
        #[arg(long)]
        tuning: Option<PathBuf>,
    },
    /// Serve SOURCE over NBD and replicate every write to a mirror (sync: RPO 0, or async)
    Replicate {
        /// Block device or image file to export and replicate
        source: PathBuf,
        #[command(flatten)]
        mirror: MirrorArgs,
        /// sync: a write is acknowledged once durable on both sides; async: after the local write
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Where to serve NBD: unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        nbd: blkmirror::frontend::nbd::Listen,
        /// NBD export name (clients may also ask for the empty name)
        #[arg(long, default_value = "blkmirror")]
        export: String,
        /// While the mirror is unreachable: suspend (hold writes, then fail them) or continue (mark chunks for resync). Default: suspend in sync mode, continue in async mode
        #[arg(long, value_enum)]
        on_disconnect: Option<OnDisconnectArg>,
        /// Seconds writes are held while suspended before they fail with EIO
        #[arg(long, default_value_t = 30)]
        suspend_timeout: u64,
        /// Bytes of replicated writes in flight to the mirror before async mode pulls ahead (sync mode waits)
        #[arg(long, default_value_t = 64 << 20)]
        queue_bytes: u64,
        /// Most bytes per second the live resync after a reconnect may read and send, e.g. 100M (binary units K, M, G; 0: no limit). Writes keep replicating at full speed meanwhile
        #[arg(long, default_value = "0", value_parser = blkmirror::config::parse_rate)]
        resync_rate: u64,
        /// Async mode: microseconds a small write may wait for others to share its QUIC packet (0: send each at once; at most 10000; adds at most this much to the replication lag)
        #[arg(long, default_value_t = 5000)]
        linger_us: u64,
        /// Keep the runtime busy polling for this many microseconds after each NBD request and reply, which saves a thread wake-up per step of a write (0: off; at most 10000; costs up to a CPU while writes arrive; see README, "Busy polling")
        #[arg(long, default_value_t = 0)]
        busy_poll_us: u64,
        /// Read the whole source to find changes before going live, even if the bitmap tracked every write
        #[arg(long)]
        scan: bool,
        /// Chunk size in bytes for a new volume (power of two, 4096..=1048576); default 65536
        #[arg(long)]
        chunk_size: Option<u64>,
        /// Serve Prometheus metrics on this TCP address
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// I/O engine
        #[arg(long, value_enum, default_value = "auto")]
        engine: EngineArg,
        /// io_uring queue depth
        #[arg(long, default_value_t = 64)]
        queue_depth: u32,
        /// Send resync chunks raw instead of lz4
        #[arg(long)]
        no_compress: bool,
        /// Seconds between lazy writes of cleared bits and the digest map
        #[arg(long, default_value_t = 5)]
        lazy_flush_secs: u64,
        /// Async runtime threads (NBD, QUIC); 1 gives the lowest latency per write (see README)
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Drive the source's io_uring from a thread of its own instead of the async runtime (slower per write on small machines; see README)
        #[arg(long)]
        io_thread: bool,
        /// QUIC tuning file (TOML; see README)
        #[arg(long)]
        tuning: Option<PathBuf>,
    },
    /// Show the replication status of volumes on this node (primary: --state; mirror: --store)
    Status {
        /// Primary: state directory of `replicate`
        #[arg(long, conflicts_with = "store", required_unless_present = "store")]
        state: Option<PathBuf>,
        /// Mirror: store directory of `serve`
        #[arg(long)]
        store: Option<PathBuf>,
        /// Only this volume
        #[arg(long)]
        volume: Option<String>,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Make a mirror's replica a primary (after the primary is lost); then serve it with `replicate`
    Promote {
        /// Store directory of `serve`
        #[arg(long)]
        store: PathBuf,
        /// Volume to promote
        #[arg(long)]
        volume: String,
        /// State directory to write the new primary's state into (for `replicate`)
        #[arg(long, default_value = "/var/lib/blkmirror")]
        state: PathBuf,
        /// Promote even while the old primary is connected (its session is ended), or an
        /// Inconsistent replica without an undo log
        #[arg(long)]
        force: bool,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Make this node's copy of a volume a secondary in a store (failback: then `serve` it and
    /// let the new primary resync it)
    Demote {
        /// State directory of `replicate`/`sync` on this node
        #[arg(long, default_value = "/var/lib/blkmirror")]
        state: PathBuf,
        /// Volume to demote
        #[arg(long)]
        volume: String,
        /// Store directory to register the volume in (for `serve`)
        #[arg(long)]
        store: PathBuf,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Compare the source with its mirror by digests and report the chunks that differ; online
    /// (through the running `replicate`) or offline
    Verify {
        /// The primary's device or image
        source: PathBuf,
        #[command(flatten)]
        mirror: MirrorArgs,
        /// Resend the chunks that differ
        #[arg(long)]
        repair: bool,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
        /// QUIC tuning file (TOML; see README)
        #[arg(long)]
        tuning: Option<PathBuf>,
    },
    /// Recovery points of a mirror's replica: create, list, prune
    Points {
        #[command(subcommand)]
        cmd: PointsCmd,
    },
    /// List the volumes of a mirror's store with their replica state
    Volumes {
        /// Directory holding the replicas
        #[arg(long)]
        store: PathBuf,
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Run a complete primary + mirror demonstration on loopback with temporary files
    Demo {
        /// Size of the demo image in MiB
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
    /// Write a mirror's replica of a volume, or one of its recovery points, onto a device or image
    Restore {
        /// Block device or image file to write (a missing file is created with the volume's size)
        target: PathBuf,
        /// Identity directory of this node (its fingerprint must be allowed by the mirror)
        #[arg(long)]
        identity: PathBuf,
        /// Mirror address HOST:PORT
        #[arg(long)]
        from: String,
        /// Pinned fingerprint of the mirror (sha256:<64 hex>)
        #[arg(long)]
        peer: Fingerprint,
        /// Volume name on the mirror
        #[arg(long)]
        volume: String,
        /// Recovery point id to restore (default: the replica as it is now)
        #[arg(long)]
        point: Option<u64>,
        /// Print one JSON object with the result on stdout
        #[arg(long)]
        json: bool,
        /// Never draw a progress bar
        #[arg(long)]
        no_progress: bool,
        /// QUIC tuning file (TOML; see README)
        #[arg(long)]
        tuning: Option<PathBuf>,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLKMIRROR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Transport tuning: defaults, or a TOML file named by `--tuning` (fields of
/// `transport::Tuning`; unknown fields are refused).
fn tuning(path: Option<&PathBuf>) -> Result<Tuning> {
    let Some(path) = path else {
        return Ok(Tuning::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading tuning file {}", path.display()), e))?;
    let t: Tuning = toml::from_str(&text)
        .map_err(|e| Error::Config(format!("tuning file {}: {e}", path.display())))?;
    t.validate()?;
    Ok(t)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(2)
}

/// The async runtime with `workers` threads (I/O engines run on threads of their own).
fn runtime_with(workers: usize) -> Result<tokio::runtime::Runtime> {
    if !(1..=64).contains(&workers) {
        return Err(Error::Config(format!(
            "--workers {workers} is outside 1..=64"
        )));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

/// Print `value` as one line of JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let s = serde_json::to_string(value)
        .map_err(|e| Error::Other(format!("cannot encode the JSON output: {e}")))?;
    println!("{s}");
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { dir } => {
            init_logging("warn");
            let id = Identity::generate(&dir)?;
            println!("{}", id.fingerprint());
            Ok(())
        }
        Cmd::Fingerprint { dir } => {
            init_logging("warn");
            let id = Identity::load(&dir)?;
            println!("{}", id.fingerprint());
            Ok(())
        }
        Cmd::Serve {
            identity,
            listen,
            store,
            allow,
            metrics,
            engine,
            queue_depth,
            workers,
            tuning: tuning_file,
            points_after_sync,
            point_every,
            keep_last,
            keep_hourly,
            keep_daily,
            async_commit_ms,
        } => {
            init_logging("info");
            let tuning = tuning(tuning_file.as_ref())?;
            if queue_depth == 0 || queue_depth > 4096 {
                return Err(Error::Config(format!(
                    "queue depth {queue_depth} is outside 1..=4096"
                )));
            }
            use blkmirror::mirror::{ASYNC_COMMIT_MS_MAX, ASYNC_COMMIT_MS_MIN};
            if !(ASYNC_COMMIT_MS_MIN..=ASYNC_COMMIT_MS_MAX).contains(&async_commit_ms) {
                return Err(Error::Config(format!(
                    "--async-commit-ms {async_commit_ms} is outside {ASYNC_COMMIT_MS_MIN}..={ASYNC_COMMIT_MS_MAX}"
                )));
            }
            let identity = Identity::load(&identity)?;
            let rt = runtime_with(workers)?;
            let served = rt.block_on(async move {
                if let Some(m) = metrics {
                    blkmirror::metrics_http::install(m)?;
                }
                let server = blkmirror::mirror::Server::bind(blkmirror::mirror::ServeConfig {
                    identity,
                    listen,
                    store,
                    allow,
                    queue_depth,
                    engine: engine.into(),
                    tuning,
                    points_after_sync,
                    point_every: point_every.map(std::time::Duration::from_secs),
                    keep: (keep_last, keep_hourly, keep_daily),
                    async_commit: std::time::Duration::from_millis(async_commit_ms),
                })?;
                let addr = server.local_addr()?;
                println!("listening {addr}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
                let signals = StopSignals::new();
                server
                    .run_until(signals.requested(), signals.forced())
                    .await
            });
            // Sessions still winding down (an apply or reader thread in the
            // middle of a write or read) get 5 s; whatever is left then is
            // abandoned like a crash, which every on-disk state survives.
            // Dropping the runtime would wait for them without a bound.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            served
        }
        Cmd::Sync {
            source,
            mirror:
                MirrorArgs {
                    identity,
                    to,
                    peer,
                    volume,
                    state,
                    resize,
                    dry_run,
                    after_split_brain,
                },
            full,
            checksum,
            chunk_size,
            json,
            metrics,
            engine,
            queue_depth,
            no_progress,
            no_compress,
            compress_always,
            tuning: tuning_file,
        } => {
            init_logging("warn");
            let tuning = tuning(tuning_file.as_ref())?;
            let identity = Identity::load(&identity)?;
            let limits = SyncLimits {
                queue_depth,
                ..SyncLimits::default()
            };
            let progress = !no_progress && !json && std::io::stderr().is_terminal();
            let rt = runtime()?;
            let report = rt.block_on(async move {
                if let Some(m) = metrics {
                    blkmirror::metrics_http::install(m)?;
                }
                blkmirror::primary::run_sync(blkmirror::primary::SyncOptions {
                    source,
                    identity,
                    to,
                    peer,
                    volume,
                    full,
                    checksum,
                    chunk_bytes: chunk_size,
                    state_dir: state,
                    resize,
                    limits,
                    engine: engine.into(),
                    tuning,
                    progress,
                    compress: !no_compress,
                    compress_always,
                    dry_run,
                    split_brain: after_split_brain,
                })
                .await
            })?;
            if dry_run {
                if json {
                    print_json(&report)?;
                } else {
                    println!("{}", report.decision);
                }
                return Ok(());
            }
            if json {
                print_json(&report)?;
            } else {
                eprintln!("{}", blkmirror::demo::describe(&report));
            }
            Ok(())
        }
        Cmd::Replicate {
            source,
            mirror:
                MirrorArgs {
                    identity,
                    to,
                    peer,
                    volume,
                    state,
                    resize,
                    dry_run,
                    after_split_brain,
                },
            mode,
            nbd,
            export,
            on_disconnect,
            suspend_timeout,
            queue_bytes,
            resync_rate,
            linger_us,
            busy_poll_us,
            scan,
            chunk_size,
            metrics,
            engine,
            queue_depth,
            no_compress,
            lazy_flush_secs,
            workers,
            io_thread,
            tuning: tuning_file,
        } => {
            use blkmirror::replication::primary::{Mode, OnDisconnect};
            init_logging("info");
            let tuning = tuning(tuning_file.as_ref())?;
            let mode = match mode {
                ModeArg::Sync => Mode::Sync,
                ModeArg::Async => Mode::Async,
            };
            let on_disconnect = match on_disconnect {
                Some(OnDisconnectArg::Suspend) => OnDisconnect::Suspend,
                Some(OnDisconnectArg::Continue) => OnDisconnect::Continue,
                None if mode == Mode::Sync => OnDisconnect::Suspend,
                None => OnDisconnect::Continue,
            };
            if !((1 << 20)..=(16 << 30)).contains(&queue_bytes) {
                return Err(Error::Config(format!(
                    "--queue-bytes {queue_bytes} is outside 1 MiB..=16 GiB"
                )));
            }
            if !(1..=3600).contains(&lazy_flush_secs) {
                return Err(Error::Config("--lazy-flush-secs must be 1..=3600".into()));
            }
            if suspend_timeout > 86_400 {
                return Err(Error::Config("--suspend-timeout is at most 86400 s".into()));
            }
            if linger_us > 10_000 {
                return Err(Error::Config(format!(
                    "--linger-us {linger_us} is above 10000 (10 ms)"
                )));
            }
            if busy_poll_us > 10_000 {
                return Err(Error::Config(format!(
                    "--busy-poll-us {busy_poll_us} is above 10000 (10 ms)"
                )));
            }
            let limits = SyncLimits {
                queue_depth,
                ..SyncLimits::default()
            };
            limits.validate()?;
            let id1 = Identity::load(&identity)?;
            let id2 = Identity::load(&identity)?;
            let rt = runtime_with(workers)?;
            rt.block_on(async move {
                if let Some(m) = metrics {
                    blkmirror::metrics_http::install(m)?;
                }
                let opts = blkmirror::replication::live::ReplicateOptions {
                    sync: blkmirror::primary::SyncOptions {
                        source,
                        identity: id1,
                        to,
                        peer,
                        volume,
                        full: false,
                        checksum: false,
                        chunk_bytes: chunk_size,
                        state_dir: state,
                        resize,
                        limits,
                        engine: engine.into(),
                        tuning: tuning.clone(),
                        progress: std::io::stderr().is_terminal(),
                        compress: !no_compress,
                        compress_always: false,
                        dry_run,
                        split_brain: after_split_brain,
                    },
                    identity: id2,
                    mode,
                    on_disconnect,
                    suspend_timeout: std::time::Duration::from_secs(suspend_timeout),
                    queue_bytes,
                    resync_rate,
                    linger: std::time::Duration::from_micros(linger_us),
                    nbd,
                    export,
                    scan,
                    lazy_interval: std::time::Duration::from_secs(lazy_flush_secs),
                    io_thread,
                    announce: true,
                    busy_poll: std::time::Duration::from_micros(busy_poll_us),
                };
                let signals = StopSignals::new();
                blkmirror::replication::live::run_replicate(
                    opts,
                    signals.requested(),
                    signals.forced(),
                )
                .await
            })
        }
        Cmd::Status {
            state,
            store,
            volume,
            json,
        } => {
            init_logging("warn");
            let (dir, primary) = match (state, store) {
                (Some(d), _) => (d, true),
                (None, Some(d)) => (d, false),
                (None, None) => return Err(Error::Config("give --state or --store".into())),
            };
            let rows = blkmirror::replication::status::collect(&dir, primary, volume.as_deref())?;
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for r in &rows {
                    println!("{}", blkmirror::replication::status::describe(r));
                }
            }
            Ok(())
        }
        Cmd::Promote {
            store,
            volume,
            state,
            force,
            json,
        } => {
            init_logging("warn");
            let r = blkmirror::mirror::roles::promote(&store, &volume, &state, force)?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "volume {} is now primary (generation {}, was {}); serve it with: blkmirror replicate {} --state {} --volume {} ...",
                    r.volume, r.generation, r.previous_generation, r.image, r.state_dir, r.volume
                );
            }
            Ok(())
        }
        Cmd::Demote {
            state,
            volume,
            store,
            json,
        } => {
            init_logging("warn");
            let r = blkmirror::mirror::roles::demote(&state, &volume, &store)?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "volume {} is now a secondary in store {} ({} chunks written here are kept as a recovery point before a resync overwrites them); run: blkmirror serve --store {} ...",
                    r.volume, r.store, r.changed_chunks, r.store
                );
            }
            Ok(())
        }
        Cmd::Verify {
            source,
            mirror:
                MirrorArgs {
                    identity,
                    to,
                    peer,
                    volume,
                    state,
                    resize: _,
                    dry_run: _,
                    after_split_brain: _,
                },
            repair,
            json,
            tuning: tuning_file,
        } => {
            init_logging("warn");
            let tuning = tuning(tuning_file.as_ref())?;
            let identity = Identity::load(&identity)?;
            let rt = runtime()?;
            let report = rt.block_on(blkmirror::recovery::verify::run_verify(
                blkmirror::recovery::verify::VerifyOptions {
                    source,
                    identity,
                    to,
                    peer,
                    volume,
                    state_dir: state,
                    repair,
                    tuning,
                },
            ))?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "volume {}: {} of {} chunks differ ({}){}",
                    report.volume,
                    report.chunks_differ,
                    report.chunks_checked,
                    if report.online { "online" } else { "offline" },
                    if report.repaired { "; repaired" } else { "" }
                );
                for (i, off) in &report.differ {
                    println!("  chunk {i} at byte offset {off}");
                }
            }
            if report.chunks_differ > 0 && !report.repaired {
                std::process::exit(3);
            }
            Ok(())
        }
        Cmd::Points { cmd } => {
            init_logging("warn");
            use blkmirror::mirror::roles;
            match cmd {
                PointsCmd::Create {
                    store,
                    volume,
                    name,
                } => {
                    let id = roles::create_point(&store, &volume, name.as_deref(), false, None)?;
                    println!("{id}");
                }
                PointsCmd::List {
                    store,
                    volume,
                    json,
                } => {
                    let list = roles::list_points(&store, &volume)?;
                    if json {
                        print_json(&list)?;
                    } else {
                        println!(
                            "{:>6}  {:<10}  {:>20}  {:>10}  {:>14}  name",
                            "id", "kind", "created (unix)", "chunks", "bytes"
                        );
                        for p in list {
                            println!(
                                "{:>6}  {:<10}  {:>20}  {:>10}  {:>14}  {}",
                                p.id,
                                format!("{:?}", p.kind),
                                p.created_unix,
                                p.chunks,
                                p.bytes,
                                p.name
                            );
                        }
                    }
                }
                PointsCmd::Prune {
                    store,
                    volume,
                    ids,
                    keep_last,
                    keep_hourly,
                    keep_daily,
                } => {
                    let keep = match (keep_last, keep_hourly, keep_daily) {
                        (None, None, None) => None,
                        (l, h, d) => Some((l.unwrap_or(0), h.unwrap_or(0), d.unwrap_or(0))),
                    };
                    if ids.is_empty() && keep.is_none() {
                        return Err(Error::Config(
                            "give --id ID and/or --keep-last N / --keep-hourly N / --keep-daily N"
                                .into(),
                        ));
                    }
                    let (removed, freed) = roles::prune_points(&store, &volume, &ids, keep)?;
                    println!(
                        "removed {} points ({:?}), freed {freed} bytes",
                        removed.len(),
                        removed
                    );
                }
            }
            Ok(())
        }
        Cmd::Volumes { store, json } => {
            init_logging("warn");
            if !store.is_dir() {
                return Err(Error::Config(format!(
                    "store {} is not a directory",
                    store.display()
                )));
            }
            let vols = blkmirror::mirror::Store::open(&store)?.list()?;
            if json {
                let rows: Vec<serde_json::Value> = vols
                    .iter()
                    .map(|(name, m)| {
                        serde_json::json!({
                            "volume": name,
                            "state": m.state.to_string(),
                            "volume_bytes": m.volume_bytes,
                            "chunk_bytes": m.chunk_bytes,
                            "generation": format!("{:016x}", m.generation),
                            "replica_id": m.replica_id,
                            "updated_unix": m.updated_unix,
                            "last_primary": m.last_primary,
                            "role": format!("{:?}", m.role),
                            "gen_bitmap": format!("{:016x}", m.gen_bitmap),
                            "gen_history": [format!("{:016x}", m.gen_history0), format!("{:016x}", m.gen_history1)],
                            "promoted_unix": m.promoted_unix,
                            "undo_point": m.undo_point,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<24} {:<13} {:<10} {:>16} {:>8} {:<16}",
                    "VOLUME", "STATE", "ROLE", "BYTES", "CHUNK", "GENERATION"
                );
                for (name, m) in &vols {
                    println!(
                        "{:<24} {:<13} {:<10} {:>16} {:>8} {:016x}",
                        name,
                        m.state.to_string(),
                        format!("{:?}", m.role),
                        m.volume_bytes,
                        m.chunk_bytes,
                        m.generation
                    );
                }
            }
            Ok(())
        }
        Cmd::Demo { size_mib } => {
            init_logging("warn");
            blkmirror::demo::run(size_mib)
        }
        Cmd::Restore {
            target,
            identity,
            from,
            peer,
            volume,
            point,
            json,
            no_progress,
            tuning: tuning_file,
        } => {
            init_logging("warn");
            let tuning = tuning(tuning_file.as_ref())?;
            let identity = Identity::load(&identity)?;
            let progress = !no_progress && !json && std::io::stderr().is_terminal();
            let report = runtime()?.block_on(blkmirror::recovery::restore::run_restore(
                blkmirror::recovery::restore::RestoreOptions {
                    identity,
                    from,
                    peer,
                    volume,
                    point: point.unwrap_or(0),
                    target,
                    tuning,
                    progress,
                },
            ))?;
            if json {
                print_json(&report)?;
            } else {
                eprintln!("{}", report.describe());
            }
            Ok(())
        }
    }
}

/// SIGINT and SIGTERM, counted from the first time either future of
/// [`StopSignals::requested`] or [`StopSignals::forced`] is polled (until
/// then a signal keeps its default action: a `replicate` still catching up
/// stops at once, as it always did, which every on-disk state survives).
/// The first signal asks for a clean stop; a second one cuts that stop's
/// waits on the network short.
#[derive(Clone)]
struct StopSignals {
    count: std::sync::Arc<tokio::sync::watch::Sender<u32>>,
    started: std::sync::Arc<std::sync::OnceLock<()>>,
}

impl StopSignals {
    fn new() -> StopSignals {
        StopSignals {
            count: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            started: std::sync::Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Resolves at the first signal.
    fn requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.clone().nth(1)
    }

    /// Resolves at the second signal.
    fn forced(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.clone().nth(2)
    }

    async fn nth(self, n: u32) {
        let mut rx = self.count.subscribe();
        self.started.get_or_init(|| {
            let count = self.count.clone();
            tokio::spawn(count_signals(count));
        });
        if rx.wait_for(|&c| c >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn count_signals(count: std::sync::Arc<tokio::sync::watch::Sender<u32>>) {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    // A signal that cannot be handled keeps its default action (the
    // process ends at once, which every on-disk state survives).
    let handle = |kind: SignalKind, name: &str| {
        signal(kind)
            .map_err(|e| tracing::warn!("cannot handle {name}: {e}; it stops blkmirror at once"))
            .ok()
    };
    let mut int = handle(SignalKind::interrupt(), "SIGINT");
    let mut term = handle(SignalKind::terminate(), "SIGTERM");
    async fn next(s: &mut Option<Signal>) -> Option<()> {
        match s {
            Some(s) => s.recv().await,
            None => None,
        }
    }
    loop {
        let name = tokio::select! {
            Some(()) = next(&mut int) => "SIGINT",
            Some(()) = next(&mut term) => "SIGTERM",
            else => return,
        };
        count.send_modify(|c| *c = c.saturating_add(1));
        match *count.borrow() {
            1 => {
                tracing::info!("{name}: stopping (a second signal stops without waiting for peers)")
            }
            2 => tracing::warn!("{name} again: stopping without waiting for peers"),
            _ => {}
        }
    }
}

/// Keep freed memory in the heap instead of giving it back to the kernel
/// after every burst: a sync allocates and frees a 64 KiB buffer per chunk,
/// and with glibc's defaults much of that memory was returned and faulted
/// in (and zeroed) again: 2.5% of the reader's time in page faults, and a
/// full sync of the benchmark image took 2.02 s median against 1.85 s with
/// these settings (4 alternating pairs). Bounded: at most 64 MiB of free
/// heap is kept, and blocks of 4 MiB and more still get their own mapping.
fn tune_malloc() {
    // SAFETY: mallopt only adjusts glibc's allocator parameters; called once
    // at start-up before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkmirror: error: {e}");
            ExitCode::FAILURE
        }
    }
}
