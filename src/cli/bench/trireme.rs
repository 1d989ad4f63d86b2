//! The trireme target of `client bench`: `setr` and `getr` through [`Client`], exactly the
//! code the `client setr`/`getr` commands run (each operation learns the view, then writes by
//! two-phase commit or reads), with one [`Client`] per operation and `--timeout-ms` bounding
//! each operation.
//!
//! The network driver ([`net::Handle`]) is either one for the whole process, shared by every
//! worker ([`NetMode::Shared`]), or one per worker, each with its own socket and driver thread
//! ([`NetMode::PerWorker`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::cli::bench::{Connection, Op, Target};
use crate::cli::viewleader_targets;
use crate::client::{self, Client, SetrHooks, ViewCache};
use crate::runtime::net::{self, NetConfig};
use crate::wire::message::{ErrorKind, OpError};

/// How the workers reach the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// One socket and driver thread, shared by every worker.
    Shared,
    /// A socket and driver thread per worker.
    PerWorker,
}

impl FromStr for NetMode {
    type Err = String;

    /// Parses `shared` or `per-worker`.
    fn from_str(text: &str) -> Result<NetMode, String> {
        match text {
            "shared" => Ok(NetMode::Shared),
            "per-worker" => Ok(NetMode::PerWorker),
            _ => Err(format!("{text:?} is neither shared nor per-worker")),
        }
    }
}

/// A running trireme cluster, reached through its view leader.
#[derive(Debug)]
pub struct Trireme {
    /// The view leader (given, or found once at the start: the group's leader if the member
    /// that answered named one).
    viewleader: SocketAddr,
    /// The view-leader members an operation may fall back on when the view leader does not
    /// answer: the `--viewleader` list when it names several (empty otherwise: the default
    /// ports are not tried again for every operation).
    fallbacks: Vec<SocketAddr>,
    /// `--server`: unused by replicated operations, but every [`Client`] has one.
    server: SocketAddr,
    /// The bound on each operation (`None`: none).
    timeout: Option<Duration>,
    /// The network settings of every driver (faults, trace).
    net: NetConfig,
    /// Shared or per-worker drivers.
    mode: NetMode,
    /// The command's driver: used to find the view leader, and by every worker when shared.
    shared: net::Handle,
    /// The view every worker's operations use, fetched again when its lease ends or a
    /// replica refuses it (so an operation costs no view-leader round trip).
    views: ViewCache,
}

/// Starts a network driver on a fresh loopback socket.
fn spawn_driver(config: NetConfig) -> Result<net::Handle, OpError> {
    let unreachable = |e: std::io::Error| OpError {
        kind: ErrorKind::Unreachable,
        message: format!("cannot start a network driver: {e}"),
        cycle: Vec::new(),
    };
    let socket = net::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).map_err(unreachable)?;
    let (handle, _requests, _thread) = net::spawn(socket, config).map_err(unreachable)?;
    Ok(handle)
}

impl Trireme {
    /// Finds the view leader through `shared` (the command's driver, which shared workers
    /// use) from the `--viewleader` list `given`, as the client does
    /// ([`viewleader_targets`]): one address is used as it is; several are probed, the first
    /// that answers (or the group's leader it names) is used and operations fall back on the
    /// others; none probes the default ports, within `timeout`. Per-worker drivers are
    /// started with `net`.
    pub fn connect(
        shared: net::Handle,
        given: &[SocketAddr],
        server: SocketAddr,
        timeout: Option<Duration>,
        net: NetConfig,
        mode: NetMode,
    ) -> Result<Trireme, OpError> {
        let viewleader = match viewleader_targets(given) {
            (Some(addr), _) => addr,
            (None, candidates) => client::discover(
                &shared,
                &candidates,
                timeout.map(|t| std::time::Instant::now() + t),
            )?,
        };
        let fallbacks = if given.len() > 1 {
            given.to_vec()
        } else {
            Vec::new()
        };
        Ok(Trireme {
            viewleader,
            fallbacks,
            server,
            timeout,
            net,
            mode,
            shared,
            views: ViewCache::default(),
        })
    }
}

impl Target for Trireme {
    /// "trireme via view leader ADDR (shared/per-worker net driver)".
    fn describe(&self) -> String {
        let mode = match self.mode {
            NetMode::Shared => "one shared net driver",
            NetMode::PerWorker => "a net driver per worker",
        };
        format!("trireme via view leader {} ({mode})", self.viewleader)
    }

    /// The shared driver, or a new one for this worker.
    fn connect(&self) -> Result<Box<dyn Connection>, OpError> {
        let handle = match self.mode {
            NetMode::Shared => self.shared.clone(),
            NetMode::PerWorker => spawn_driver(self.net.clone())?,
        };
        Ok(Box::new(TriremeConnection {
            handle,
            viewleader: self.viewleader,
            fallbacks: self.fallbacks.clone(),
            server: self.server,
            timeout: self.timeout,
            views: self.views.clone(),
        }))
    }
}

/// One worker's way into the cluster.
struct TriremeConnection {
    /// The driver this worker sends through.
    handle: net::Handle,
    /// The view leader.
    viewleader: SocketAddr,
    /// The view-leader members to fall back on (see [`Trireme`]).
    fallbacks: Vec<SocketAddr>,
    /// `--server` (unused by replicated operations).
    server: SocketAddr,
    /// The bound on each operation.
    timeout: Option<Duration>,
    /// The view shared by every worker.
    views: ViewCache,
}

impl Connection for TriremeConnection {
    /// A write is `setr KEY VALUE`, a read `getr KEY`, each a fresh [`Client`] (so each has
    /// its own deadline, as one `client` command would) sharing the workers' cached view.
    fn execute(&mut self, op: Op, key: &str, value: &str) -> Result<(), OpError> {
        let mut client = Client::new(
            self.handle.clone(),
            Some(self.viewleader),
            self.fallbacks.clone(),
            self.server,
            self.timeout,
        )
        .with_view_cache(self.views.clone())
        .with_operations_on_driver();
        match op {
            Op::Write => client.setr(key, value, SetrHooks::default()).map(drop),
            Op::Read => client.getr(key).map(drop),
            Op::Echo => Err(OpError {
                kind: ErrorKind::BadInput,
                message: "the trireme target does not echo".into(),
                cycle: Vec::new(),
            }),
        }
    }
}
