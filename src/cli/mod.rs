//! Command-line parsing, logging setup and output formatting for the three programs.
//!
//! The binaries in `src/bin/` call [`viewleader_main`], [`server_main`] and [`client_main`];
//! everything here turns strings into typed values once, at the edge, and maps outcomes to
//! the contract's output lines and exit codes (0 success, 1 failure, 2 usage error).

pub mod bench;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use log::{LevelFilter, error, warn};
use serde_json::json;

use crate::cli::bench::echo::UdpEcho;
use crate::cli::bench::etcd::{Endpoint, Etcd};
#[cfg(feature = "etcd-grpc")]
use crate::cli::bench::etcd_grpc::EtcdGrpc;
use crate::cli::bench::trireme::{NetMode, Trireme};
use crate::cli::bench::{BenchConfig, Length, Rate, ReadRatio, Report, Schedule, Workload};
use crate::client::{Client, GetrOutcome, GroupInfo, ServersInfo, SetrHooks, SetrOutcome};
use crate::faults::FaultSpec;
use crate::placement::view::{Epoch, Member};
use crate::reliable;
use crate::runtime::net::{self, NetConfig};
use crate::runtime::node;
use crate::runtime::trace::{TraceError, Tracer};
use crate::server::{Server, ServerConfig};
use crate::util::rng::Rng;
use crate::viewleader::group::{Group, GroupConfig, GroupError};
use crate::viewleader::{self, ViewLeaderConfig};
use crate::wire::auth::{Auth, ClusterKey};
use crate::wire::message::{ErrorKind, OpError};

/// Flags every program takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Log debug messages too.
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
    /// Log warnings and errors only.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Fault injection on outgoing datagrams, e.g. loss=0.1,dup=0.05,reorder=0.1,delay=20ms,
    /// jitter=10ms,seed=42 (default: env TRIREME_FAULTS, else none).
    #[arg(long, global = true, value_name = "SPEC", value_parser = parse_faults)]
    pub faults: Option<FaultSpec>,
    /// Record every datagram sent and received in FILE, as a pcap trace (read it with
    /// trace-dump, tshark or Wireshark).
    #[arg(long, global = true, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Authenticate every datagram with the cluster key in FILE (at least 16 bytes of secret;
    /// make one with `head -c 32 /dev/urandom | base64 > FILE`). Datagrams without the right
    /// MAC, or replayed outside a 30 s window, are dropped unanswered. Every process of a
    /// cluster needs the same key; without one, the cluster must sit on a trusted network.
    #[arg(long, global = true, value_name = "FILE", value_parser = parse_key_file)]
    pub cluster_key_file: Option<ClusterKey>,
}

/// Reads a `--cluster-key-file` (an unreadable or too short file is a usage error, exit 2).
fn parse_key_file(text: &str) -> Result<ClusterKey, String> {
    ClusterKey::load(std::path::Path::new(text)).map_err(|e| e.to_string())
}

/// Parses an address flag: `IP:PORT`, or `:PORT` for 127.0.0.1 (so `--bind :0` lets the OS
/// pick a loopback port, as the contract says).
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let full = if text.starts_with(':') {
        format!("127.0.0.1{text}")
    } else {
        text.to_owned()
    };
    full.parse::<SocketAddr>()
        .map_err(|e| format!("{text:?} is not IP:PORT or :PORT ({e})"))
}

/// Parses one address of `--peers`: like [`parse_addr`], but port 0 is refused (the other
/// members could not reach it).
fn parse_peer(text: &str) -> Result<SocketAddr, String> {
    let addr = parse_addr(text)?;
    if addr.port() == 0 {
        return Err(format!(
            "{text:?} has port 0: a group member needs a fixed port its peers can reach"
        ));
    }
    Ok(addr)
}

/// Where a program finds the view leader, from its `--viewleader` list: one address is used
/// at once (and is the only candidate); several are probed in order (the first that answers
/// is used); none means the default ports are probed. Returns the address to start with, if
/// any, and the candidates.
pub fn viewleader_targets(given: &[SocketAddr]) -> (Option<SocketAddr>, Vec<SocketAddr>) {
    match given {
        [] => (None, viewleader::default_candidates()),
        [one] => (Some(*one), vec![*one]),
        many => (None, many.to_vec()),
    }
}

/// Parses a `--faults` value (clap reports the error as a usage error, exit 2).
fn parse_faults(text: &str) -> Result<FaultSpec, String> {
    text.parse::<FaultSpec>().map_err(|e| e.to_string())
}

impl CommonArgs {
    /// Sets up logging to stderr at the level the flags ask for.
    fn init_logging(&self) {
        let level = if self.verbose {
            LevelFilter::Debug
        } else if self.quiet {
            LevelFilter::Warn
        } else {
            LevelFilter::Info
        };
        let config = simplelog::ConfigBuilder::new()
            .set_time_format_rfc3339()
            .set_target_level(LevelFilter::Off)
            .set_thread_level(LevelFilter::Off)
            .build();
        let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
    }

    /// The fault spec in force: the flag, else env `TRIREME_FAULTS`. An invalid env value is
    /// a usage error: it is printed and the process exits 2.
    fn fault_spec(&self) -> FaultSpec {
        if let Some(spec) = self.faults {
            return spec;
        }
        let env = std::env::var("TRIREME_FAULTS").ok();
        match FaultSpec::resolve(None, env.as_deref()) {
            Ok(spec) => spec,
            Err(e) => {
                eprintln!("error: invalid TRIREME_FAULTS: {e}");
                std::process::exit(2);
            }
        }
    }

    /// Opens the `--trace` file, if one was asked for.
    fn open_trace(&self) -> Result<Option<Tracer>, TraceError> {
        self.trace.as_deref().map(Tracer::create).transpose()
    }

    /// The network settings for these flags, recording datagrams in `trace` if given.
    fn net_config(&self, trace: Option<&Tracer>) -> NetConfig {
        let faults = self.fault_spec();
        if !faults.is_none() {
            warn!("injecting faults on outgoing datagrams: {faults}");
        }
        NetConfig {
            faults,
            trace: trace.cloned(),
            reliable: reliable::Config {
                auth: self.cluster_key_file.clone().map(Auth::new),
                ..reliable::Config::default()
            },
            ..NetConfig::default()
        }
    }
}

/// Writes out what `trace` recorded so far (a program about to exit runs no destructors) and
/// reports datagrams the trace had to leave out.
fn close_trace(trace: Option<&Tracer>) {
    let Some(trace) = trace else { return };
    if !trace.flush(Duration::from_secs(2)) {
        warn!(
            "trace {}: not everything was written",
            trace.path().display()
        );
    }
    let dropped = trace.dropped();
    if dropped > 0 {
        warn!(
            "trace {}: {dropped} datagrams left out (the writer fell behind)",
            trace.path().display()
        );
    }
}

/// Opens the `--trace` file of a long-running program; on failure prints the error and
/// returns `Err(1)`, the exit code.
fn open_trace_or_report(common: &CommonArgs) -> Result<Option<Tracer>, i32> {
    common.open_trace().map_err(|e| {
        eprintln!("error: cannot open the trace file: {e}");
        1
    })
}

/// `viewleader`: membership, epochs, views and locks.
#[derive(Parser, Debug)]
#[command(
    name = "viewleader",
    version,
    about = "trireme view leader: membership, epochs, views and locks"
)]
pub struct ViewLeaderArgs {
    /// Address to bind (default: first free of 127.0.0.1:39000..=39010; port 0 lets the OS pick).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub bind: Option<SocketAddr>,
    /// A server silent this long leaves the view.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub dead_after_ms: u64,
    /// Replication count carried in every view.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: u32,
    /// Ring points per server carried in every view.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub vnodes: u32,
    /// The whole view-leader group, comma separated, the same list on every member, this
    /// member's own address among them (1, 3 or 5 members; default: a group of one). Without
    /// --bind, this member binds the first address of the list it can bind on this host.
    #[arg(
        long,
        value_name = "ADDR,ADDR,...",
        value_delimiter = ',',
        value_parser = parse_peer
    )]
    pub peers: Vec<SocketAddr>,
    /// Where this member keeps its replicated state across restarts (default: in memory
    /// only; a member restarted without it rejoins as a new member, or is refused).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Common flags.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `server`: one storage node.
#[derive(Parser, Debug)]
#[command(
    name = "server",
    version,
    about = "trireme storage server: one bucket of the store"
)]
pub struct ServerArgs {
    /// Address to bind (default: first free of 127.0.0.1:38000..=38999; port 0 lets the OS pick).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub bind: Option<SocketAddr>,
    /// Members of the view-leader group, comma separated: the first that answers is used,
    /// then the group's leader it names (default: the first of 127.0.0.1:39000..=39010 that
    /// answers).
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        value_parser = parse_addr
    )]
    pub viewleader: Vec<SocketAddr>,
    /// Time between heartbeats.
    #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval_ms: u64,
    /// The address others reach this server at (default: the bound address).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub advertise: Option<SocketAddr>,
    /// Common flags.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `client`: the command-line client.
#[derive(Parser, Debug)]
#[command(name = "client", version, about = "trireme command-line client")]
pub struct ClientArgs {
    /// Members of the view-leader group, comma separated: the first that answers is used,
    /// then the group's leader it names, and another member if one stops answering (default:
    /// the first of 127.0.0.1:39000..=39010 that answers).
    #[arg(
        long,
        global = true,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        value_parser = parse_addr
    )]
    pub viewleader: Vec<SocketAddr>,
    /// Target of the unreplicated commands (print, set, get, query_all_keys).
    #[arg(long, global = true, value_name = "ADDR", default_value = "127.0.0.1:38000", value_parser = parse_addr)]
    pub server: SocketAddr,
    /// Bound on the whole command; 0 = no bound (only meaningful for lock_get).
    #[arg(long, global = true, value_name = "MS", default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Print exactly one JSON object on one line on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Common flags.
    #[command(flatten)]
    pub common: CommonArgs,
    /// The command.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// The client's commands.
#[derive(Subcommand, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub enum ClientCommand {
    /// Ask the server to log TEXT.
    Print {
        /// The text (several words are joined by spaces).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// Raw local write into the server's bucket (no replication).
    Set {
        /// The key (1..=1024 bytes).
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// The value (up to 1 MiB); `-` reads it from standard input.
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Raw local read from the server's bucket.
    Get {
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// The keys held in the server's bucket.
    QueryAllKeys,
    /// The view leader's epoch, rebalancing flag and live servers.
    QueryServers,
    /// Wait until LOCK is granted to REQUESTER (--timeout-ms bounds the wait).
    LockGet {
        /// The lock.
        #[arg(allow_hyphen_values = true)]
        lock: String,
        /// Who asks.
        #[arg(allow_hyphen_values = true)]
        requester: String,
    },
    /// Replicated write by two-phase commit on KEY's replicas: all or nothing.
    Setr {
        /// The key (1..=1024 bytes).
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// The value (up to 1 MiB); `-` reads it from standard input.
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Wait (within --timeout-ms) for rebalancing to end instead of failing.
        #[arg(long)]
        wait: bool,
        /// Test hook: sleep MS between learning the view and sending the votes.
        #[arg(long = "pause-after-view-ms", value_name = "MS", default_value_t = 0)]
        pause_after_view_ms: u64,
        /// Test hook: sleep MS between collecting all votes and sending the decision.
        #[arg(
            long = "pause-before-commit-ms",
            value_name = "MS",
            default_value_t = 0
        )]
        pause_before_commit_ms: u64,
        /// Test hook: sleep MS between the primary's commit acknowledgement and the commits
        /// to the other replicas.
        #[arg(
            long = "pause-after-primary-commit-ms",
            value_name = "MS",
            default_value_t = 0
        )]
        pause_after_primary_commit_ms: u64,
    },
    /// Replicated read: KEY's replicas tried in ring order until one has it.
    Getr {
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// Wait (within --timeout-ms) for rebalancing to end instead of failing.
        #[arg(long)]
        wait: bool,
    },
    /// The replicas of KEY in the current view, in ring order (the first is the primary).
    Locate {
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Load generator: puts a measured load on the cluster (or on etcd, or on a loopback
    /// echo) and prints throughput, failures by error kind and latency percentiles. Failures
    /// do not stop the run; --timeout-ms bounds each operation.
    Bench(BenchArgs),
    /// Release LOCK held by REQUESTER.
    LockRelease {
        /// The lock.
        #[arg(allow_hyphen_values = true)]
        lock: String,
        /// Who releases.
        #[arg(allow_hyphen_values = true)]
        requester: String,
        /// Release only the grant of the `lock_get` that printed this claim (its `--json`
        /// field "claim"): a release that arrives late then cannot release a later grant.
        #[arg(long, value_name = "N")]
        claim: Option<u64>,
    },
}

/// `client bench --op`: what the load consists of.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchOp {
    /// Replicated writes (etcd: put).
    Setr,
    /// Replicated reads (etcd: serializable get); the key space is written first.
    Getr,
    /// getr with probability --read-ratio, setr otherwise.
    Mix,
    /// A datagram to an echo thread in this process and back: the loopback round trip that
    /// any UDP protocol pays here (no --target).
    UdpEcho,
}

/// `client bench --target`: what the load is put on.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchTarget {
    /// The trireme cluster of --viewleader.
    Trireme,
    /// etcd at --etcd-endpoint, through the API --etcd-api names.
    Etcd,
}

/// `client bench --etcd-api`: how the etcd target is reached.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdApi {
    /// etcd's native v3 gRPC API through the etcd-client crate, as etcd's own clients reach
    /// it (needs a build with the `etcd-grpc` feature).
    Grpc,
    /// etcd's v3 JSON gateway (HTTP/1.1), which costs each request a hop inside the member.
    Gateway,
}

/// `--etcd-api`'s default: gRPC where this build has the client for it, else the gateway.
const DEFAULT_ETCD_API: &str = if cfg!(feature = "etcd-grpc") {
    "grpc"
} else {
    "gateway"
};

/// Parses `--etcd-api`; `grpc` is a usage error in a build without the `etcd-grpc` feature.
fn parse_etcd_api(text: &str) -> Result<EtcdApi, String> {
    let api = EtcdApi::from_str(text, true)
        .map_err(|_| format!("{text:?} is not an etcd API: give grpc or gateway"))?;
    if api == EtcdApi::Grpc && !cfg!(feature = "etcd-grpc") {
        return Err(
            "this client was built without etcd's gRPC client: rebuild it with \
                    `cargo build --release --features etcd-grpc`, or pass --etcd-api gateway"
                .into(),
        );
    }
    Ok(api)
}

/// The default length of a `client bench` run without `--duration` or `--ops`.
const DEFAULT_BENCH_DURATION: Duration = Duration::from_secs(5);

/// Parses a count within `1..=max` (clap reports the error as a usage error).
fn parse_count(text: &str, max: usize) -> Result<NonZeroUsize, String> {
    let n: usize = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    NonZeroUsize::new(n)
        .filter(|n| n.get() <= max)
        .ok_or_else(|| format!("{n} is not within 1..={max}"))
}

/// Parses `--concurrency`: 1..=4096 workers.
fn parse_concurrency(text: &str) -> Result<NonZeroUsize, String> {
    parse_count(text, 4096)
}

/// Parses `--keys`: 1..=10 000 000 keys.
fn parse_keys(text: &str) -> Result<NonZeroUsize, String> {
    parse_count(text, 10_000_000)
}

/// Parses `--value-size`: 0 bytes up to the contract's largest value.
fn parse_value_size(text: &str) -> Result<usize, String> {
    let max = crate::wire::message::MAX_VALUE_LEN;
    match text.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("{text:?} is not a size within 0..={max} bytes")),
    }
}

/// `client bench`'s flags.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Load")]
pub struct BenchArgs {
    /// The operation.
    #[arg(long, value_enum, default_value_t = BenchOp::Setr)]
    pub op: BenchOp,
    /// mix: the fraction of operations that are getr.
    #[arg(long, value_name = "R", default_value = "0.5")]
    pub read_ratio: ReadRatio,
    /// Workers sending at once (threads), each with its own connection.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_concurrency)]
    pub concurrency: NonZeroUsize,
    /// Run for SECS seconds (default 5 unless --ops is given).
    #[arg(long, value_name = "SECS", value_parser = bench::parse_duration, conflicts_with = "ops")]
    pub duration: Option<Duration>,
    /// Send exactly N operations.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000_000))]
    pub ops: Option<u64>,
    /// Bytes in every written value.
    #[arg(long, value_name = "BYTES", default_value = "100", value_parser = parse_value_size)]
    pub value_size: usize,
    /// Size of the key space: keys bench-0..bench-(N-1), operation i on bench-(i mod N).
    /// getr and mix write every key first (not measured), so reads hit.
    #[arg(long, value_name = "N", default_value = "1000", value_parser = parse_keys)]
    pub keys: NonZeroUsize,
    /// Open loop: OPS_PER_SEC operations per second across the workers, each due at a fixed
    /// instant, latency measured from that instant (queueing is not hidden). Default: closed
    /// loop (a worker sends when its previous operation finished).
    #[arg(long, value_name = "OPS_PER_SEC")]
    pub rate: Option<Rate>,
    /// What to load [default: trireme].
    #[arg(long, value_enum)]
    pub target: Option<BenchTarget>,
    /// etcd client URLs, comma-separated (workers take them in turn).
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoint: Vec<Endpoint>,
    /// How the etcd target is reached: grpc (etcd-client over tonic, one HTTP/2 connection
    /// per worker; builds with the `etcd-grpc` feature only) or gateway (the v3 JSON gateway,
    /// one HTTP/1.1 connection per worker). Default: grpc in a build with `etcd-grpc`, else
    /// gateway.
    #[arg(long, value_name = "grpc|gateway", default_value = DEFAULT_ETCD_API, value_parser = parse_etcd_api)]
    pub etcd_api: EtcdApi,
    /// trireme: one network driver (socket and thread) for all workers, or one per worker.
    /// Shared is the default: on 2 cores it carried 1.4-1.6 times the throughput of
    /// per-worker drivers from 16 workers on (fewer threads to wake), and the same at 1.
    #[arg(long, value_name = "shared|per-worker", default_value = "shared")]
    pub net: NetMode,
    /// Seed of the mix's choice of operations (a run can be repeated operation for operation).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
}

impl BenchArgs {
    /// The load these flags describe.
    fn config(&self) -> BenchConfig {
        BenchConfig {
            workload: match self.op {
                BenchOp::Setr => Workload::Setr,
                BenchOp::Getr => Workload::Getr,
                BenchOp::Mix => Workload::Mix(self.read_ratio),
                BenchOp::UdpEcho => Workload::UdpEcho,
            },
            concurrency: self.concurrency,
            length: match self.ops {
                Some(n) => Length::Ops(n),
                None => Length::Duration(self.duration.unwrap_or(DEFAULT_BENCH_DURATION)),
            },
            value_size: self.value_size,
            keys: self.keys,
            schedule: self.rate.map_or(Schedule::closed(), Schedule::open),
            seed: self.seed,
        }
    }
}

/// Registers handlers for SIGINT and SIGTERM. Call before announcing readiness, so that a
/// signal sent as soon as the `listening` line is read is handled (exit 0), not fatal.
fn termination_signals() -> Option<signal_hook::iterator::Signals> {
    let signals = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    match signal_hook::iterator::Signals::new(signals) {
        Ok(signals) => Some(signals),
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            None
        }
    }
}

/// Blocks until one of `signals` arrives (forever if handlers could not be installed).
fn wait_for_termination(signals: Option<signal_hook::iterator::Signals>) {
    match signals {
        Some(mut signals) => {
            signals.forever().next();
        }
        None => loop {
            std::thread::park();
        },
    }
}

/// Prints the contract's `listening on ...` line and flushes it, so scripts can read it.
fn announce(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Binds `--bind` or the first free port of `ports` on 127.0.0.1; exits 1 on failure.
fn bind_or_exit(
    bind: Option<SocketAddr>,
    ports: std::ops::RangeInclusive<u16>,
) -> std::net::UdpSocket {
    let (result, what) = match bind {
        Some(addr) => (net::bind(addr), addr.to_string()),
        None => {
            let what = format!("any of 127.0.0.1:{}..={}", ports.start(), ports.end());
            (
                net::bind_first_free(IpAddr::V4(Ipv4Addr::LOCALHOST), ports),
                what,
            )
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: cannot bind {what}: {e}");
        std::process::exit(1);
    })
}

/// Binds the first address of `peers` (in order) that can be bound on this host; exits 1,
/// naming every address and why it failed, if none can.
fn bind_first_peer_or_exit(peers: &[SocketAddr]) -> std::net::UdpSocket {
    let mut failures = Vec::new();
    for &addr in peers {
        match net::bind(addr) {
            Ok(socket) => return socket,
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    eprintln!(
        "error: cannot bind any address of --peers on this host ({}); give --bind",
        failures.join("; ")
    );
    std::process::exit(1);
}

/// Exits with a usage error (exit 2) that clap formats: `message` about the view-leader
/// group's flags.
fn group_usage_error(message: impl std::fmt::Display) -> ! {
    ViewLeaderArgs::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

impl ViewLeaderArgs {
    /// The group settings of the member bound at `local`: a group of one without `--peers`,
    /// else the `--peers` group with `local` among it; `--data-dir`; a random seed.
    fn group_config(&self, local: SocketAddr) -> Result<GroupConfig, GroupError> {
        let mut group = if self.peers.is_empty() {
            GroupConfig::default()
        } else {
            GroupConfig::new(self.peers.clone(), local)?
        };
        group.data_dir.clone_from(&self.data_dir);
        group.seed = Rng::from_entropy().next_u64();
        Ok(group)
    }
}

/// The view leader program; returns the exit code.
pub fn viewleader_main() -> i32 {
    let args = ViewLeaderArgs::parse();
    args.common.init_logging();
    let config = ViewLeaderConfig {
        dead_after: Duration::from_millis(args.dead_after_ms),
        replicas: args.replicas,
        vnodes: args.vnodes,
        ..ViewLeaderConfig::default()
    };
    // A list that is no group (its size, a repeated address) is refused before binding.
    if let Some(&first) = args.peers.first()
        && let Err(e) = GroupConfig::new(args.peers.clone(), first)
    {
        group_usage_error(e);
    }
    let socket = match args.bind {
        None if !args.peers.is_empty() => bind_first_peer_or_exit(&args.peers),
        bind => bind_or_exit(bind, viewleader::DEFAULT_PORTS),
    };
    let local = match socket.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("error: cannot read the bound address: {e}");
            return 1;
        }
    };
    let group = match args.group_config(local) {
        Ok(group) => group,
        Err(e) => group_usage_error(e),
    };
    let member = match Group::new(config, group) {
        Ok(member) => member,
        Err(e @ GroupError::Peers(_)) => group_usage_error(e),
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let trace = match open_trace_or_report(&args.common) {
        Ok(trace) => trace,
        Err(code) => return code,
    };
    let signals = termination_signals();
    let Some(running) = start_or_report(member, socket, &args.common, trace.as_ref()) else {
        return 1;
    };
    announce(&format!("listening on {}", running.addr()));
    wait_for_termination(signals);
    running.stop();
    close_trace(trace.as_ref());
    0
}

/// Starts `node` on `socket` with the common flags' network settings; reports a failure on
/// stderr and returns `None`.
fn start_or_report<N: node::Node + Send + 'static>(
    node: N,
    socket: std::net::UdpSocket,
    common: &CommonArgs,
    trace: Option<&Tracer>,
) -> Option<node::Running> {
    node::start(node, socket, common.net_config(trace))
        .inspect_err(|e| eprintln!("error: cannot start the network driver: {e}"))
        .ok()
}

/// The server program; returns the exit code.
pub fn server_main() -> i32 {
    let args = ServerArgs::parse();
    args.common.init_logging();
    let socket = bind_or_exit(args.bind, 38000..=38999);
    let local = match socket.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("error: cannot read the bound address: {e}");
            return 1;
        }
    };
    let advertise = args.advertise.unwrap_or(local);
    if advertise.ip().is_unspecified() {
        eprintln!("error: bound to {local}: give --advertise with an address others can reach");
        return 2;
    }
    let (viewleader, candidates) = viewleader_targets(&args.viewleader);
    let config = ServerConfig {
        advertise,
        viewleader,
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        candidates,
    };
    let trace = match open_trace_or_report(&args.common) {
        Ok(trace) => trace,
        Err(code) => return code,
    };
    let server = Server::new(config, Rng::from_entropy(), Instant::now());
    let id = server.id();
    let signals = termination_signals();
    let Some(running) = start_or_report(server, socket, &args.common, trace.as_ref()) else {
        return 1;
    };
    announce(&format!("listening on {local} id {id}"));
    wait_for_termination(signals);
    running.stop();
    close_trace(trace.as_ref());
    0
}

/// What a successful client command produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `print` done.
    Printed,
    /// `set` stored KEY.
    Stored {
        /// The key.
        key: String,
    },
    /// `get` found VALUE under KEY.
    Value {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// `query_all_keys`.
    Keys(Vec<String>),
    /// `query_servers`.
    Servers {
        /// The view and its rebalancing status.
        info: ServersInfo,
        /// The view-leader group: its leader (the answer's `leader`, else the member that
        /// answered) and members (the answer's `group`, else the member that answered).
        group: GroupInfo,
    },
    /// `lock_get` granted.
    Locked {
        /// The lock.
        lock: String,
        /// The requester.
        requester: String,
        /// The claim the grant was made under (for `lock_release --claim`).
        claim: u64,
    },
    /// `setr` committed KEY on every replica.
    Replicated {
        /// The key.
        key: String,
        /// What the commit did.
        outcome: SetrOutcome,
    },
    /// `getr` found KEY.
    Read {
        /// The key.
        key: String,
        /// What was found, and where.
        outcome: GetrOutcome,
    },
    /// `locate`: KEY's replicas at EPOCH.
    Located {
        /// The key.
        key: String,
        /// The view's epoch.
        epoch: Epoch,
        /// The replicas in ring order.
        replicas: Vec<Member>,
    },
    /// `lock_release` done.
    Released {
        /// The lock.
        lock: String,
        /// The requester.
        requester: String,
    },
    /// `bench`: what the run measured.
    Bench(Box<Report>),
}

impl Outcome {
    /// The human output (without the final newline).
    pub fn human(&self) -> String {
        match self {
            Outcome::Printed => "printed".into(),
            Outcome::Stored { key } => format!("stored {key}"),
            Outcome::Value { value, .. } => value.clone(),
            Outcome::Keys(keys) => keys.join("\n"),
            Outcome::Servers { info, group } => {
                let mut out = format!(
                    "epoch {} rebalancing {} replicas {} vnodes {} servers {} leader {} \
                     viewleaders {}",
                    info.view.epoch,
                    info.rebalancing,
                    info.view.replicas,
                    info.view.vnodes,
                    info.view.members.len(),
                    group.leader,
                    group
                        .members
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                );
                for m in &info.view.members {
                    let state = if info.pending.contains(&m.id) {
                        " (rebalancing)"
                    } else {
                        ""
                    };
                    out.push_str(&format!("\n{} {}{state}", m.id, m.addr));
                }
                out
            }
            Outcome::Replicated { key, outcome } => format!(
                "stored {key} on {} replicas at epoch {} (version {})",
                outcome.replicas.len(),
                outcome.epoch,
                outcome.version
            ),
            Outcome::Read { outcome, .. } => outcome.value.clone(),
            Outcome::Located { replicas, .. } => replicas
                .iter()
                .map(|m| format!("{} {}", m.id, m.addr))
                .collect::<Vec<_>>()
                .join("\n"),
            Outcome::Locked {
                lock, requester, ..
            } => format!("granted {lock} to {requester}"),
            Outcome::Released { lock, requester } => format!("released {lock} held by {requester}"),
            Outcome::Bench(report) => report.table(),
        }
    }

    /// The `--json` output: one object with `"ok": true` and the command's fields.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Outcome::Printed => json!({"ok": true}),
            Outcome::Stored { key } => json!({"ok": true, "key": key}),
            Outcome::Value { key, value } => json!({"ok": true, "key": key, "value": value}),
            Outcome::Keys(keys) => json!({"ok": true, "keys": keys}),
            Outcome::Servers { info, group } => json!({
                "ok": true,
                "leader": group.leader.to_string(),
                "viewleaders": group.members.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "epoch": info.view.epoch.0,
                "rebalancing": info.rebalancing,
                "pending": info.pending.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "replicas": info.view.replicas,
                "vnodes": info.view.vnodes,
                "servers": info.view.members.iter()
                    .map(|m| json!({"id": m.id.to_string(), "addr": m.addr.to_string()}))
                    .collect::<Vec<_>>(),
            }),
            Outcome::Replicated { key, outcome } => json!({
                "ok": true,
                "key": key,
                "epoch": outcome.epoch.0,
                "version": outcome.version,
                "replicas": members_json(&outcome.replicas),
            }),
            Outcome::Read { key, outcome } => json!({
                "ok": true,
                "key": key,
                "value": outcome.value,
                "version": outcome.version,
                "from": {"id": outcome.from.id.to_string(), "addr": outcome.from.addr.to_string()},
            }),
            Outcome::Located {
                key,
                epoch,
                replicas,
            } => json!({
                "ok": true,
                "key": key,
                "epoch": epoch.0,
                "replicas": members_json(replicas),
            }),
            Outcome::Locked {
                lock,
                requester,
                claim,
            } => json!({"ok": true, "lock": lock, "requester": requester, "claim": claim}),
            Outcome::Released { lock, requester } => {
                json!({"ok": true, "lock": lock, "requester": requester})
            }
            Outcome::Bench(report) => report.json(),
        }
    }
}

/// The `--json` form of a list of servers: `[{"id": ..., "addr": ...}, ...]`.
fn members_json(members: &[Member]) -> serde_json::Value {
    members
        .iter()
        .map(|m| json!({"id": m.id.to_string(), "addr": m.addr.to_string()}))
        .collect()
}

/// The `--json` form of a failure.
pub fn error_json(error: &OpError) -> serde_json::Value {
    let mut object = json!({"ok": false, "kind": error.kind.as_str(), "error": error.message});
    if error.kind == ErrorKind::Deadlock {
        object["cycle"] = json!(error.cycle);
    }
    object
}

/// Reads a VALUE argument: `-` means standard input up to EOF (bounded to the contract's
/// limit plus one byte, so an oversized value is refused without reading it all).
fn read_value(value: String) -> Result<String, OpError> {
    if value != "-" {
        return Ok(value);
    }
    let mut bytes = Vec::new();
    let limit = crate::wire::message::MAX_VALUE_LEN as u64 + 1;
    std::io::stdin()
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| OpError {
            kind: ErrorKind::BadInput,
            message: format!("cannot read the value from standard input: {e}"),
            cycle: Vec::new(),
        })?;
    String::from_utf8(bytes).map_err(|_| OpError {
        kind: ErrorKind::BadInput,
        message: "the value on standard input is not UTF-8".into(),
        cycle: Vec::new(),
    })
}

/// Runs one client command against a fresh driver; `cancel` fires on Ctrl-C.
fn run_client_command(
    args: &ClientArgs,
    cancel: &crossbeam_channel::Receiver<()>,
) -> Result<Outcome, OpError> {
    let command = args.command.clone();
    // Inputs are checked before any datagram is sent.
    let value = match &command {
        ClientCommand::Set { value, .. } | ClientCommand::Setr { value, .. } => {
            Some(read_value(value.clone())?)
        }
        _ => None,
    };
    // Bound to the wildcard address, so that peers on any host can be reached (a socket bound
    // to 127.0.0.1 cannot send to another host).
    let local_ip = match args.viewleader.first() {
        Some(addr) if addr.is_ipv6() => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let socket = net::bind(SocketAddr::new(local_ip, 0)).map_err(|e| OpError {
        kind: ErrorKind::Unreachable,
        message: format!("cannot bind a local socket: {e}"),
        cycle: Vec::new(),
    })?;
    let trace = args.common.open_trace().map_err(|e| OpError {
        kind: ErrorKind::BadInput,
        message: format!("cannot open the trace file: {e}"),
        cycle: Vec::new(),
    })?;
    let net_config = args.common.net_config(trace.as_ref());
    let (handle, _requests, driver) =
        net::spawn(socket, net_config.clone()).map_err(|e| OpError {
            kind: ErrorKind::Unreachable,
            message: format!("cannot start the network driver: {e}"),
            cycle: Vec::new(),
        })?;
    let timeout = (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms));
    let (viewleader, candidates) = viewleader_targets(&args.viewleader);
    let mut client = Client::new(handle.clone(), viewleader, candidates, args.server, timeout);
    let outcome = match command {
        ClientCommand::Print { text } => client.print(&text.join(" ")).map(|()| Outcome::Printed),
        ClientCommand::Set { key, .. } => {
            let value = value.unwrap_or_default();
            client.set(&key, &value).map(|()| Outcome::Stored { key })
        }
        ClientCommand::Get { key } => client.get(&key).map(|value| Outcome::Value { key, value }),
        ClientCommand::QueryAllKeys => client.query_all_keys().map(Outcome::Keys),
        ClientCommand::QueryServers => client
            .query_servers_and_group()
            .map(|(info, group)| Outcome::Servers { info, group }),
        ClientCommand::LockGet { lock, requester } => client
            .lock_get(&lock, &requester, cancel)
            .map(|claim| Outcome::Locked {
                lock,
                requester,
                claim,
            }),
        ClientCommand::Setr {
            key,
            pause_after_view_ms,
            pause_before_commit_ms,
            pause_after_primary_commit_ms,
            wait,
            ..
        } => {
            client = client.with_wait(wait);
            let hooks = SetrHooks {
                pause_after_view: Duration::from_millis(pause_after_view_ms),
                pause_before_commit: Duration::from_millis(pause_before_commit_ms),
                pause_after_primary_commit: Duration::from_millis(pause_after_primary_commit_ms),
            };
            let value = value.unwrap_or_default();
            client
                .setr(&key, &value, hooks)
                .map(|outcome| Outcome::Replicated { key, outcome })
        }
        ClientCommand::Getr { key, wait } => {
            client = client.with_wait(wait);
            client
                .getr(&key)
                .map(|outcome| Outcome::Read { key, outcome })
        }
        ClientCommand::Locate { key } => {
            client
                .locate(&key)
                .map(|(epoch, replicas)| Outcome::Located {
                    key,
                    epoch,
                    replicas,
                })
        }
        ClientCommand::LockRelease {
            lock,
            requester,
            claim,
        } => client
            .lock_release(&lock, &requester, claim)
            .map(|()| Outcome::Released { lock, requester }),
        ClientCommand::Bench(bench) => run_bench(args, &bench, &handle, net_config)
            .map(|report| Outcome::Bench(Box::new(report))),
    };
    handle.shutdown();
    // The driver records until it stops: join it, then write out the trace.
    let _ = driver.join();
    close_trace(trace.as_ref());
    outcome
}

/// Runs `client bench`: builds the target the flags name and puts the load on it. `handle`
/// is the command's network driver (the trireme target's shared one); per-worker drivers get
/// `net`.
fn run_bench(
    args: &ClientArgs,
    bench: &BenchArgs,
    handle: &net::Handle,
    net: NetConfig,
) -> Result<Report, OpError> {
    if bench.op == BenchOp::UdpEcho && bench.target.is_some() {
        ClientArgs::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--op udp-echo measures the loopback alone and takes no --target",
            )
            .exit();
    }
    let config = bench.config();
    let timeout = (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms));
    let result = match (bench.op, bench.target.unwrap_or(BenchTarget::Trireme)) {
        (BenchOp::UdpEcho, _) => {
            let echo = UdpEcho::start(timeout).map_err(|e| OpError {
                kind: ErrorKind::Unreachable,
                message: format!("cannot start the echo thread: {e}"),
                cycle: Vec::new(),
            })?;
            bench::run(&echo, &config)
        }
        (_, BenchTarget::Etcd) => {
            let endpoints = bench.etcd_endpoint.clone();
            match bench.etcd_api {
                EtcdApi::Gateway => bench::run(&Etcd::new(endpoints, timeout), &config),
                #[cfg(feature = "etcd-grpc")]
                EtcdApi::Grpc => bench::run(&EtcdGrpc::new(endpoints, timeout), &config),
                // `parse_etcd_api` refuses grpc in this build; say the same if it got here.
                #[cfg(not(feature = "etcd-grpc"))]
                EtcdApi::Grpc => {
                    return Err(OpError {
                        kind: ErrorKind::BadInput,
                        message: "this client was built without etcd's gRPC client: rebuild \
                                  it with --features etcd-grpc"
                            .into(),
                        cycle: Vec::new(),
                    });
                }
            }
        }
        (_, BenchTarget::Trireme) => {
            let trireme = Trireme::connect(
                handle.clone(),
                &args.viewleader,
                args.server,
                timeout,
                net,
                bench.net,
            )?;
            bench::run(&trireme, &config)
        }
    };
    result.map_err(|e| OpError {
        kind: e.kind(),
        message: e.to_string(),
        cycle: Vec::new(),
    })
}

/// The client program; returns the exit code.
pub fn client_main() -> i32 {
    let args = ClientArgs::parse();
    args.common.init_logging();
    let (cancel_tx, cancel_rx) = crossbeam_channel::bounded::<()>(1);
    // Only lock_get handles Ctrl-C (it withdraws its request first); every other command
    // keeps the default action, so Ctrl-C stops it at once.
    let handles_interrupt = matches!(args.command, ClientCommand::LockGet { .. });
    let interrupt = if handles_interrupt {
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT]).ok()
    } else {
        None
    };
    if let Some(mut signals) = interrupt {
        // The main thread keeps `cancel_tx` alive, so the channel only ever says "interrupted".
        let interrupted = cancel_tx.clone();
        std::thread::spawn(move || {
            for _ in signals.forever() {
                let _ = interrupted.try_send(());
            }
        });
    }
    let result = run_client_command(&args, &cancel_rx);
    drop(cancel_tx);
    let mut stdout = std::io::stdout().lock();
    match result {
        Ok(outcome) => {
            let line = if args.json {
                outcome.json().to_string()
            } else {
                outcome.human()
            };
            // A value is printed even when empty (then just the newline); an empty key list
            // prints nothing.
            if args.json || !matches!(&outcome, Outcome::Keys(keys) if keys.is_empty()) {
                let _ = writeln!(stdout, "{line}");
            }
            let _ = stdout.flush();
            0
        }
        Err(e) => {
            if args.json {
                let _ = writeln!(stdout, "{}", error_json(&e));
                let _ = stdout.flush();
            } else {
                eprintln!("error: {}: {}", e.kind, e.message);
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::{Epoch, Member, ServerId, View};

    /// Contract: the `--json` objects of `query_servers`, `get` and a deadlock failure carry
    /// exactly the documented fields (the failure with its `cycle`).
    #[test]
    fn json_outputs_follow_the_contract() {
        let info = ServersInfo {
            view: View {
                epoch: Epoch(7),
                members: vec![Member {
                    id: ServerId(1),
                    addr: "127.0.0.1:38001".parse().unwrap(),
                }],
                replicas: 3,
                vnodes: 64,
            },
            rebalancing: false,
            pending: vec![],
        };
        let leader: SocketAddr = "127.0.0.1:39000".parse().unwrap();
        let servers = Outcome::Servers {
            info,
            group: GroupInfo {
                leader,
                members: vec![leader],
            },
        };
        assert_eq!(
            servers.json().to_string(),
            r#"{"epoch":7,"leader":"127.0.0.1:39000","ok":true,"pending":[],"rebalancing":false,"replicas":3,"servers":[{"addr":"127.0.0.1:38001","id":"00000000000000000000000000000001"}],"viewleaders":["127.0.0.1:39000"],"vnodes":64}"#
        );
        assert_eq!(
            servers.human().lines().next(),
            Some(
                "epoch 7 rebalancing false replicas 3 vnodes 64 servers 1 leader 127.0.0.1:39000 \
                 viewleaders 127.0.0.1:39000"
            )
        );
        let value = Outcome::Value {
            key: "k".into(),
            value: "v".into(),
        };
        assert_eq!(
            value.json().to_string(),
            r#"{"key":"k","ok":true,"value":"v"}"#
        );
        let deadlock = OpError {
            kind: ErrorKind::Deadlock,
            message: "cycle".into(),
            cycle: vec!["a".into(), "B".into(), "b".into(), "A".into()],
        };
        assert_eq!(
            error_json(&deadlock).to_string(),
            r#"{"cycle":["a","B","b","A"],"error":"cycle","kind":"deadlock","ok":false}"#
        );
    }

    /// Issue 6: `bench`'s flags parse into a typed load (defaults: setr, 1 worker, 5 s, 100 B,
    /// 1000 keys, closed loop, shared driver); --duration and --ops exclude each other, and
    /// out-of-range values are usage errors.
    #[test]
    fn bench_flags_parse_into_a_load() {
        let bench = |args: &[&str]| {
            let mut all = vec!["client", "bench"];
            all.extend_from_slice(args);
            ClientArgs::try_parse_from(all).map(|parsed| match parsed.command {
                ClientCommand::Bench(bench) => bench,
                other => panic!("parsed as {other:?}"),
            })
        };
        let defaults = bench(&[]).unwrap();
        assert_eq!(defaults.net, NetMode::Shared);
        assert_eq!(defaults.target, None);
        let config = defaults.config();
        assert_eq!(config.workload, Workload::Setr);
        assert_eq!(config.concurrency.get(), 1);
        assert_eq!(config.length, Length::Duration(Duration::from_secs(5)));
        assert_eq!((config.value_size, config.keys.get()), (100, 1000));
        assert_eq!(config.schedule, Schedule::closed());

        let mix = bench(&[
            "--op",
            "mix",
            "--read-ratio",
            "0.9",
            "--ops",
            "200",
            "--concurrency",
            "4",
            "--rate",
            "400",
            "--keys",
            "10",
            "--value-size",
            "0",
            "--json",
        ])
        .unwrap()
        .config();
        assert_eq!(mix.workload, Workload::Mix("0.9".parse().unwrap()));
        assert_eq!(mix.length, Length::Ops(200));
        assert_eq!(mix.concurrency.get(), 4);
        assert_eq!(mix.schedule, Schedule::open("400".parse().unwrap()));
        assert_eq!((mix.keys.get(), mix.value_size), (10, 0));

        let etcd = bench(&[
            "--target",
            "etcd",
            "--etcd-endpoint",
            "http://127.0.0.1:1,http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(etcd.target, Some(BenchTarget::Etcd));
        assert_eq!(etcd.etcd_endpoint.len(), 2);
        let gateway = bench(&["--target", "etcd", "--etcd-api", "gateway"]).unwrap();
        assert_eq!(gateway.etcd_api, EtcdApi::Gateway);
        assert!(bench(&["--etcd-api", "rest"]).is_err());

        for bad in [
            &["--duration", "1", "--ops", "5"][..],
            &["--concurrency", "0"],
            &["--keys", "0"],
            &["--read-ratio", "2"],
            &["--rate", "0"],
            &["--value-size", "1048577"],
            &["--op", "delete"],
            &["--etcd-endpoint", "https://127.0.0.1:2379"],
        ] {
            assert!(bench(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// Issue 18: `--etcd-api` defaults to gRPC in a build with the `etcd-grpc` feature; in one
    /// without, the default is the gateway and asking for gRPC is a usage error (exit 2) that
    /// says how to rebuild.
    #[test]
    fn etcd_api_follows_the_build() {
        let parse = |args: &[&str]| {
            let mut all = vec!["client", "bench", "--target", "etcd"];
            all.extend_from_slice(args);
            ClientArgs::try_parse_from(all).map(|parsed| match parsed.command {
                ClientCommand::Bench(bench) => bench.etcd_api,
                other => panic!("parsed as {other:?}"),
            })
        };
        if cfg!(feature = "etcd-grpc") {
            assert_eq!(parse(&[]).unwrap(), EtcdApi::Grpc);
            assert_eq!(parse(&["--etcd-api", "grpc"]).unwrap(), EtcdApi::Grpc);
        } else {
            assert_eq!(parse(&[]).unwrap(), EtcdApi::Gateway);
            let refused = parse(&["--etcd-api", "grpc"]).unwrap_err();
            assert_eq!(refused.exit_code(), 2);
            assert!(
                refused.to_string().contains("--features etcd-grpc"),
                "{refused}"
            );
        }
    }

    /// Contract: global flags may stand before or after the command; a missing argument or an
    /// invalid `--faults` spec is a usage error.
    #[test]
    fn global_flags_parse_before_or_after_the_command() {
        let before =
            ClientArgs::try_parse_from(["client", "--json", "--timeout-ms", "7", "get", "k"])
                .unwrap();
        let after =
            ClientArgs::try_parse_from(["client", "get", "k", "--json", "--timeout-ms", "7"])
                .unwrap();
        assert!(before.json && after.json);
        assert_eq!((before.timeout_ms, after.timeout_ms), (7, 7));
        assert!(ClientArgs::try_parse_from(["client", "query_all_keys"]).is_ok());
        assert!(ClientArgs::try_parse_from(["client", "set", "onlykey"]).is_err());
        assert!(ClientArgs::try_parse_from(["client", "get", "k", "--faults", "loss=2"]).is_err());
    }

    /// The usage error clap reports for `args` parsed as `P` (panics if they parse).
    fn usage_error<P: Parser + std::fmt::Debug>(args: &[&str]) -> clap::Error {
        P::try_parse_from(args).expect_err("a usage error")
    }

    /// Contract (flags): `--viewleader ADDR[,ADDR...]` takes one or more addresses on the
    /// server and the client (a global flag there); one is used at once, several are probed
    /// in order, none probes the default ports. A bad element is a usage error (exit 2)
    /// naming it.
    #[test]
    fn viewleader_lists_parse_on_the_server_and_the_client() {
        let a: SocketAddr = "127.0.0.1:39001".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:39000".parse().unwrap();
        let server =
            ServerArgs::try_parse_from(["server", "--viewleader", ":39001,10.0.0.2:39000"])
                .unwrap();
        assert_eq!(server.viewleader, vec![a, b]);
        let client = ClientArgs::try_parse_from([
            "client",
            "query_servers",
            "--viewleader",
            "127.0.0.1:39001,10.0.0.2:39000",
        ])
        .unwrap();
        assert_eq!(client.viewleader, vec![a, b]);
        assert_eq!(viewleader_targets(&[a, b]), (None, vec![a, b]));
        assert_eq!(viewleader_targets(&[a]), (Some(a), vec![a]));
        assert_eq!(
            viewleader_targets(&[]),
            (None, viewleader::default_candidates())
        );
        let none = ClientArgs::try_parse_from(["client", "query_servers"]).unwrap();
        assert!(none.viewleader.is_empty());
        for bad in [
            &[
                "client",
                "--viewleader",
                "127.0.0.1:39001,nonsense",
                "query_servers",
            ][..],
            &[
                "client",
                "--viewleader",
                "127.0.0.1:39001,",
                "query_servers",
            ],
            &["client", "--viewleader", "", "query_servers"],
        ] {
            let e = usage_error::<ClientArgs>(bad);
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let e = usage_error::<ServerArgs>(&["server", "--viewleader", "127.0.0.1:1,nonsense"]);
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("nonsense"),
            "names the bad part: {e}"
        );
    }

    /// Contract (flags): `--peers ADDR,ADDR,...` and `--data-dir DIR` parse on the view
    /// leader (default: no peers, a group of one, no data dir); a bad element or port 0 is a
    /// usage error naming it. The group the list describes is checked by `GroupConfig`
    /// (3 members, this one among them).
    #[test]
    fn peers_and_data_dir_parse_on_the_view_leader() {
        let alone = ViewLeaderArgs::try_parse_from(["viewleader"]).unwrap();
        assert!(alone.peers.is_empty() && alone.data_dir.is_none());
        let local: SocketAddr = "127.0.0.1:39000".parse().unwrap();
        let single = alone.group_config(local).unwrap();
        assert!(single.peers.is_empty() && single.data_dir.is_none());

        let args = ViewLeaderArgs::try_parse_from([
            "viewleader",
            "--peers",
            "127.0.0.1:39000,127.0.0.1:39001,:39002",
            "--data-dir",
            "/tmp/vl0",
        ])
        .unwrap();
        let expected: Vec<SocketAddr> = (39000..=39002)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect();
        assert_eq!(args.peers, expected);
        assert_eq!(args.data_dir, Some(PathBuf::from("/tmp/vl0")));
        let member = args.group_config(expected[1]).unwrap();
        assert_eq!((member.me, member.peers.len()), (1, 3));
        assert_eq!(member.data_dir, Some(PathBuf::from("/tmp/vl0")));
        assert!(
            args.group_config("127.0.0.1:40000".parse().unwrap())
                .is_err(),
            "an address outside the list is no member"
        );

        for (bad, named) in [
            ("127.0.0.1:39000,garbage,127.0.0.1:39002", "garbage"),
            ("127.0.0.1:39000,,127.0.0.1:39002", "\"\""),
            ("127.0.0.1:0,127.0.0.1:39001,127.0.0.1:39002", "port 0"),
        ] {
            let e = usage_error::<ViewLeaderArgs>(&["viewleader", "--peers", bad]);
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains(named), "{bad}: {e}");
        }
        let e = usage_error::<ViewLeaderArgs>(&["viewleader", "--data-dir"]);
        assert_eq!(e.exit_code(), 2);
    }
}
