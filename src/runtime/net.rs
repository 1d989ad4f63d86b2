//! The driver: runs a [`reliable::Endpoint`] on a real UDP socket in its own thread.
//!
//! The driver thread owns the socket, the clock and the fault injector. Applications talk to
//! it through a cloneable [`Handle`] (commands over a crossbeam channel, plus a `mio` waker so
//! the thread notices them at once) and receive the requests addressed to them on a crossbeam
//! [`Receiver`] of [`IncomingRequest`]. ICMP errors are read from the socket's error queue
//! (`IP_RECVERR`), so a request to a closed port fails with `Unreachable` at once instead of
//! timing out.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::faults::{FaultInjector, FaultSpec};
use crate::reliable::{self, Endpoint, Event, IncomingId, RequestError, RequestId, Stats};
use crate::runtime::trace::{Direction, Tracer};
use crate::util::rng::Rng;
use crate::wire::codec::Bundle;

/// Settings of one driver.
#[derive(Clone, Debug, Default)]
pub struct NetConfig {
    /// The reliable layer's tunables.
    pub reliable: reliable::Config,
    /// Faults to inject on outgoing datagrams.
    pub faults: FaultSpec,
    /// Seed of the endpoint's RNG (incarnation id); random when `None`.
    pub seed: Option<u64>,
    /// Where every datagram sent and received is recorded (`--trace`), if anywhere.
    pub trace: Option<Tracer>,
}

/// Socket buffer size asked of the kernel: room for a window of fragments from many peers.
const SOCKET_BUFFER: usize = 4 << 20;

/// A request addressed to this node, to be answered with [`Handle::respond`].
#[derive(Debug)]
pub struct IncomingRequest {
    /// Who sent it.
    pub from: SocketAddr,
    /// The handle to respond with.
    pub id: IncomingId,
    /// The request body.
    pub body: Vec<u8>,
}

/// The outcome of a request started with [`Handle::start`].
#[derive(Debug)]
pub struct Reply {
    /// The caller's tag, to tell concurrent requests apart.
    pub tag: u64,
    /// The response body, or why none came.
    pub result: Result<Vec<u8>, RequestError>,
}

/// A request a [`Job`] wants sent.
#[derive(Debug)]
pub struct JobSend {
    /// Destination.
    pub dst: SocketAddr,
    /// Request body.
    pub body: Vec<u8>,
    /// Give up at this instant.
    pub deadline: Option<Instant>,
    /// Give up after this many timeouts while the peer acknowledged nothing.
    pub unacked_attempts: Option<u32>,
    /// The job's own tag for the request, handed back with its outcome.
    pub token: u64,
}

/// A sans-IO operation run on the driver thread itself ([`Handle::run`]): its requests go out
/// and their outcomes come back without waking the thread that submitted it, which learns
/// only the job's end (through whatever the job itself holds, typically a channel). Called
/// in this order: `poll_send` until `None`, then `is_done`; after each outcome or timer,
/// again. Time never goes backwards between calls.
pub trait Job: std::marker::Send {
    /// The next request to send, if any.
    fn poll_send(&mut self) -> Option<JobSend>;
    /// The outcome of request `token` (its response body, or why none came) at `now`.
    fn handle_response(&mut self, now: Instant, token: u64, result: Result<Vec<u8>, RequestError>);
    /// The job's timer fired at `now`.
    fn handle_timeout(&mut self, now: Instant);
    /// When the job wants its timer.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Whether the job has finished (having delivered its outcome); it is then dropped.
    fn is_done(&mut self) -> bool;
}

/// What applications ask of the driver thread.
enum Command {
    /// Send a request; deliver its outcome on `reply` with `tag`.
    Request {
        /// Destination.
        dst: SocketAddr,
        /// Request body.
        body: Vec<u8>,
        /// Give up at this instant.
        deadline: Option<Instant>,
        /// Give up after this many timeouts while the peer acknowledged nothing.
        unacked_attempts: Option<u32>,
        /// Where the outcome goes.
        reply: Sender<Reply>,
        /// Echoed in the reply.
        tag: u64,
    },
    /// Answer a request raised earlier.
    Respond {
        /// Which request.
        id: IncomingId,
        /// The response body.
        body: Vec<u8>,
    },
    /// Run a job on the driver thread until it is done.
    Run(Box<dyn Job>),
    /// Report the endpoint's counters.
    Stats(Sender<Stats>),
    /// Stop the thread.
    Shutdown,
}

/// A cloneable handle on a running driver thread. The thread stops when the last clone is
/// dropped (or on [`Handle::shutdown`]).
#[derive(Clone)]
pub struct Handle {
    /// The state every clone shares.
    inner: Arc<HandleInner>,
}

/// What the clones of a [`Handle`] share.
struct HandleInner {
    /// Commands to the driver.
    commands: Sender<Command>,
    /// Wakes the driver's poll when a command is queued.
    waker: Waker,
    /// Whether the driver may be asleep in its poll (or about to be): only then does a
    /// queued command need the waker's system call. A busy driver (many workers' requests)
    /// takes the commands on its next turn anyway.
    sleepy: Arc<AtomicBool>,
    /// The socket's bound address.
    local_addr: SocketAddr,
}

impl Drop for HandleInner {
    /// The last handle is gone: tell the driver thread to stop.
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        let _ = self.waker.wake();
    }
}

impl std::fmt::Debug for Handle {
    /// Shows the bound address only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl Handle {
    /// The address the driver's socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Queues a command and wakes the driver if it may be asleep; fails only if the driver
    /// has stopped.
    fn send(&self, command: Command) -> io::Result<()> {
        self.inner.commands.send(command).map_err(|_| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the network driver has stopped")
        })?;
        // Pairs with the driver's fence between setting `sleepy` and its last look at the
        // queue: either that look finds this command, or this load finds the flag set.
        fence(Ordering::SeqCst);
        if self.inner.sleepy.load(Ordering::SeqCst) {
            self.inner.waker.wake()?;
        }
        Ok(())
    }

    /// Starts a request to `dst`; its [`Reply`] (carrying `tag`) arrives on `reply`.
    pub fn start(
        &self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        reply: &Sender<Reply>,
        tag: u64,
    ) -> io::Result<()> {
        self.start_with(dst, body, deadline, None, reply, tag)
    }

    /// [`Handle::start`], giving up after `unacked_attempts` retransmission timeouts while
    /// the peer has acknowledged nothing (see `reliable::Endpoint::request_with`).
    pub fn start_with(
        &self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        unacked_attempts: Option<u32>,
        reply: &Sender<Reply>,
        tag: u64,
    ) -> io::Result<()> {
        self.send(Command::Request {
            dst,
            body,
            deadline,
            unacked_attempts,
            reply: reply.clone(),
            tag,
        })
    }

    /// Sends a request to `dst` and waits for its outcome (bounded by `deadline` and by the
    /// reliable layer's retransmission limit).
    pub fn call(
        &self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, RequestError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.start(dst, body, deadline, &tx, 0).is_err() {
            return Err(RequestError::Timeout { peer: dst });
        }
        match recv_spinning(&rx) {
            Ok(reply) => reply.result,
            Err(_) => Err(RequestError::Timeout { peer: dst }),
        }
    }

    /// Hands `job` to the driver thread, which runs it until it is done; fails only if the
    /// driver has stopped.
    pub fn run(&self, job: Box<dyn Job>) -> io::Result<()> {
        self.send(Command::Run(job))
    }

    /// Answers request `id` with `body`.
    pub fn respond(&self, id: IncomingId, body: Vec<u8>) -> io::Result<()> {
        self.send(Command::Respond { id, body })
    }

    /// Fetches the endpoint's counters.
    pub fn stats(&self) -> io::Result<Stats> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Stats(tx))?;
        rx.recv()
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "driver stopped"))
    }

    /// Asks the driver thread to stop.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }
}

/// Application logic run on the driver thread itself (see [`spawn_service`]): requests
/// addressed to this process and the outcomes of its own requests are handed to it there,
/// with no hop to another thread, and it answers through a [`Local`] context.
pub trait Service: Send + 'static {
    /// A request addressed to this process arrived.
    fn handle_request(&mut self, now: Instant, request: IncomingRequest, net: &mut Local<'_>);

    /// The outcome of a request started with [`Local::request`].
    fn handle_reply(&mut self, now: Instant, reply: Reply, net: &mut Local<'_>);

    /// The instant from [`Service::poll_timeout`] has come.
    fn handle_timeout(&mut self, now: Instant, net: &mut Local<'_>);

    /// When [`Service::handle_timeout`] is next due, if ever.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// What a [`Service`] may do from the driver thread: answer requests and start its own.
pub struct Local<'a> {
    /// The endpoint.
    endpoint: &'a mut Endpoint,
    /// Where request outcomes go.
    pending: &'a mut HashMap<RequestId, Waiter>,
    /// The current instant.
    now: Instant,
}

impl Local<'_> {
    /// Answers request `id` with `body`.
    pub fn respond(&mut self, id: IncomingId, body: Vec<u8>) {
        if let Err(e) = self.endpoint.respond(self.now, id, body) {
            warn!("cannot send a response: {e}");
        }
    }

    /// Starts a request to `dst`; its outcome comes back through [`Service::handle_reply`]
    /// with `tag`, unless it cannot even start (returned here).
    pub fn request(
        &mut self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        tag: u64,
    ) -> Result<(), RequestError> {
        let id = self.endpoint.request(self.now, dst, body, deadline)?;
        self.pending.insert(id, Waiter::Service(tag));
        Ok(())
    }
}

/// Who waits for the outcome of a request.
enum Waiter {
    /// An application thread, on a channel, with its tag.
    Channel(Sender<Reply>, u64),
    /// The driver thread's own [`Service`], with its tag.
    Service(u64),
    /// A [`Job`] on the driver thread (by its number), with its token.
    Job(u64, u64),
}

/// How long a caller waiting for a reply polls its channel (yielding the CPU between polls)
/// before going to sleep on it. A loopback round trip takes tens of microseconds, about what
/// putting a thread to sleep and waking it again costs: polling first answers most requests
/// with no wake-up at all.
pub const REPLY_SPIN: Duration = Duration::from_micros(150);

/// How many callers of this process are polling for a reply right now (see [`SpinPermit`]).
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// The right of one waiting caller to poll for its reply instead of sleeping. Polling pays
/// only while a core is free to do it: with many callers waiting at once (a load generator's
/// 64 workers), each would burn a core yielding to the others, and the replies would come no
/// sooner. So at most half the machine's cores (at least one) poll at a time; the other
/// callers sleep on their channel at once.
struct SpinPermit;

impl SpinPermit {
    /// Takes a permit if fewer than the limit are taken.
    fn take() -> Option<SpinPermit> {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        let limit = *LIMIT.get_or_init(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        });
        let taken = SPINNERS.fetch_add(1, Ordering::AcqRel);
        if taken < limit {
            Some(SpinPermit)
        } else {
            SPINNERS.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

impl Drop for SpinPermit {
    /// Gives the permit back.
    fn drop(&mut self) {
        SPINNERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Receives from `rx`, polling it for up to [`REPLY_SPIN`] before blocking (if a
/// [`SpinPermit`] is free; else blocking at once).
pub fn recv_spinning<T>(rx: &Receiver<T>) -> Result<T, crossbeam_channel::RecvError> {
    recv_spinning_until(rx, None).and_then(|value| value.ok_or(crossbeam_channel::RecvError))
}

/// Receives from `rx` like [`recv_spinning`], but gives up at `until` (if given): `Ok(None)`
/// then, so the caller can fire its timer.
pub fn recv_spinning_until<T>(
    rx: &Receiver<T>,
    until: Option<Instant>,
) -> Result<Option<T>, crossbeam_channel::RecvError> {
    if let Some(permit) = SpinPermit::take() {
        let spin_until = Instant::now() + REPLY_SPIN;
        let spin_until = until.map_or(spin_until, |until| until.min(spin_until));
        loop {
            match rx.try_recv() {
                Ok(value) => return Ok(Some(value)),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Err(crossbeam_channel::RecvError);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            if Instant::now() >= spin_until {
                break;
            }
            // Yield rather than spin: where threads wait for the CPU (the driver this reply
            // comes from, among them), they run first.
            std::thread::yield_now();
        }
        drop(permit);
    }
    let Some(until) = until else {
        return rx.recv().map(Some);
    };
    match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        Ok(value) => Ok(Some(value)),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(crossbeam_channel::RecvError),
    }
}

/// Records a datagram in the trace: each datagram of a bundle as a record of its own (the
/// trace shows what the protocol said; a bundle is only how it travelled), a damaged bundle's
/// bytes whole.
fn record(
    tracer: &Tracer,
    direction: Direction,
    local: SocketAddr,
    peer: SocketAddr,
    bytes: &[u8],
) {
    let bundle = Bundle::new(bytes);
    if !bundle.is_bundle() || bundle.parts().any(|part| part.is_err()) {
        tracer.record(direction, local, peer, bytes);
        return;
    }
    for part in bundle.parts().flatten() {
        tracer.record(direction, local, peer, part);
    }
}

/// Binds a UDP socket on `addr` with enlarged buffers and ICMP error reporting enabled.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Buffer sizes are a request: the kernel may cap them, which only costs throughput.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    enable_recverr(socket.as_raw_fd(), addr.is_ipv6())?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The local address the kernel would send from toward `dst` (found by connecting a
/// throwaway UDP socket, which sends nothing): what a trace names as the source of a
/// datagram sent from a socket bound to a wildcard address.
pub fn local_ip_toward(dst: SocketAddr) -> io::Result<std::net::IpAddr> {
    let any: SocketAddr = if dst.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let probe = UdpSocket::bind(any)?;
    probe.connect(dst)?;
    Ok(probe.local_addr()?.ip())
}

/// Binds the first free port of `ports` on `ip`; the error of the last attempt otherwise.
pub fn bind_first_free(
    ip: std::net::IpAddr,
    ports: std::ops::RangeInclusive<u16>,
) -> io::Result<UdpSocket> {
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "empty port range");
    for port in ports {
        match bind(SocketAddr::new(ip, port)) {
            Ok(socket) => return Ok(socket),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Turns on `IP_RECVERR` (or `IPV6_RECVERR`): without it Linux does not report ICMP errors
/// on unconnected UDP sockets.
fn enable_recverr(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let (level, name) = if ipv6 {
        (libc::SOL_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::SOL_IP, libc::IP_RECVERR)
    };
    // SAFETY: `fd` is an open socket; the option value is a valid c_int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads one entry of the socket's error queue: the destination of the datagram that
/// caused an ICMP error, and the error number. `None` when the queue is empty.
fn read_error_queue(fd: RawFd) -> Option<(SocketAddr, i32)> {
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut data = [0u8; 64];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `msg` points at a live local buffer of the stated length.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    let mut errno = 0;
    // SAFETY: the CMSG macros walk the control buffer the kernel just filled, within
    // `msg_controllen`; the extended error is read unaligned from inside that buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            let is_recverr = (header.cmsg_level == libc::SOL_IP
                && header.cmsg_type == libc::IP_RECVERR)
                || (header.cmsg_level == libc::SOL_IPV6 && header.cmsg_type == libc::IPV6_RECVERR);
            if is_recverr {
                let err: libc::sock_extended_err =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                errno = err.ee_errno as i32;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    sockaddr_to_std(&name).map(|addr| (addr, errno))
}

/// Converts a C socket address (IPv4 or IPv6) to a std one.
fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

/// The most peer IPs whose source address a wildcard-bound, tracing driver remembers.
const TRACE_SOURCES: usize = 4096;

/// The most datagrams read in one pass, so that a flood cannot starve timers and commands.
const RECEIVE_BATCH: usize = 256;

/// Token of the socket in the poll registry.
const SOCKET: Token = Token(0);
/// Token of the waker in the poll registry.
const WAKER: Token = Token(1);

/// Starts a driver thread on `socket`. Returns the handle, the receiver of requests
/// addressed to this node, and the thread's join handle. The thread stops on
/// [`Handle::shutdown`] or when every handle is dropped.
pub fn spawn(
    socket: UdpSocket,
    config: NetConfig,
) -> io::Result<(Handle, Receiver<IncomingRequest>, JoinHandle<()>)> {
    let (requests_tx, requests_rx) = crossbeam_channel::unbounded();
    let (handle, thread) = spawn_driver(socket, config, Inbound::Channel(requests_tx))?;
    Ok((handle, requests_rx, thread))
}

/// Starts a driver thread on `socket` that runs `service` itself: every request addressed
/// to this node, and every outcome of the service's own requests, is handled on the driver
/// thread. Returns the handle (for stats, shutdown, and requests from other threads) and the
/// thread's join handle.
pub fn spawn_service(
    socket: UdpSocket,
    config: NetConfig,
    service: Box<dyn Service>,
) -> io::Result<(Handle, JoinHandle<()>)> {
    spawn_driver(socket, config, Inbound::Service(service))
}

/// Where a driver hands the requests addressed to its node.
enum Inbound {
    /// To an application thread, over a channel.
    Channel(Sender<IncomingRequest>),
    /// To a service run on the driver thread.
    Service(Box<dyn Service>),
}

/// 32 bytes from the operating system's entropy source, for the endpoint's token secret
/// (never from the protocol RNG, whose draws peers can reconstruct). Falls back to hashing
/// the clock, the process id and an address on the stack if the source fails.
fn os_secret() -> [u8; 32] {
    let mut secret = [0; 32];
    if getrandom::fill(&mut secret).is_err() {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
        hash.update(std::process::id().to_be_bytes());
        hash.update((&secret as *const _ as usize).to_be_bytes());
        secret = hash.finalize().into();
    }
    secret
}

/// Starts a driver thread on `socket` handing requests to `inbound`.
fn spawn_driver(
    socket: UdpSocket,
    config: NetConfig,
    inbound: Inbound,
) -> io::Result<(Handle, JoinHandle<()>)> {
    socket.set_nonblocking(true)?;
    let local_addr = socket.local_addr()?;
    let mut socket = mio::net::UdpSocket::from_std(socket);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let sleepy = Arc::new(AtomicBool::new(true));
    let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
    let mut rng = match config.seed {
        Some(seed) => Rng::seeded(seed),
        None => Rng::from_entropy(),
    };
    let mut reliable = config.reliable.clone();
    if reliable.token_secret.is_none() {
        reliable.token_secret = Some(os_secret());
    }
    let endpoint = Endpoint::new(reliable, &mut rng);
    let faults = match config.seed {
        // A seeded run replays its faults too, unless the spec names its own seed.
        Some(_) if config.faults.seed.is_none() => {
            FaultInjector::with_rng(config.faults, rng.fork())
        }
        _ => FaultInjector::new(config.faults),
    };
    let mut driver = Driver {
        socket,
        local_addr,
        trace_sources: HashMap::new(),
        tracer: config.trace,
        poll,
        endpoint,
        faults,
        delayed: BTreeMap::new(),
        delayed_seq: 0,
        pending: HashMap::new(),
        jobs: HashMap::new(),
        next_job: 0,
        commands: commands_rx,
        sleepy: Arc::clone(&sleepy),
        inbound,
        buffer: vec![0; 65536],
        drops_reported: (Instant::now(), Stats::default()),
    };
    let thread = std::thread::Builder::new()
        .name(format!("net-{local_addr}"))
        .spawn(move || driver.run())?;
    let inner = HandleInner {
        commands: commands_tx,
        waker,
        sleepy,
        local_addr,
    };
    Ok((
        Handle {
            inner: Arc::new(inner),
        },
        thread,
    ))
}

/// The state of the driver thread.
struct Driver {
    /// The socket.
    socket: mio::net::UdpSocket,
    /// The socket's bound address (for the trace).
    local_addr: SocketAddr,
    /// For a socket bound to a wildcard address: the source IP the kernel uses toward each
    /// peer IP, as the trace records it (looked up once per peer IP, at most
    /// [`TRACE_SOURCES`] remembered).
    trace_sources: HashMap<IpAddr, IpAddr>,
    /// Records every datagram sent and received, when tracing.
    tracer: Option<Tracer>,
    /// The readiness poll (socket and waker).
    poll: Poll,
    /// The protocol state machine.
    endpoint: Endpoint,
    /// Fault injection on the send path.
    faults: FaultInjector,
    /// Datagrams held back by fault injection, by (due instant, sequence).
    delayed: BTreeMap<(Instant, u64), (SocketAddr, Vec<u8>)>,
    /// Sequence numbers keep same-instant delayed datagrams in order.
    delayed_seq: u64,
    /// Where each outstanding request's outcome goes.
    pending: HashMap<RequestId, Waiter>,
    /// The jobs running on this thread, by number.
    jobs: HashMap<u64, Box<dyn Job>>,
    /// The number of the next job.
    next_job: u64,
    /// Commands from handles.
    commands: Receiver<Command>,
    /// Set while the driver may be asleep in its poll (see `HandleInner::sleepy`).
    sleepy: Arc<AtomicBool>,
    /// Where requests addressed to this node go.
    inbound: Inbound,
    /// Receive buffer.
    buffer: Vec<u8>,
    /// When dropped input was last reported, and the counters then.
    drops_reported: (Instant, Stats),
}

/// Dropped or refused input (junk, failed authentication, replays, bounds) is summed up in
/// one log line at most this often.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// How many full receive batches in a row may defer the service's timers (see `Driver::run`).
const MAX_DEFERRED_BATCHES: u32 = 16;

impl Driver {
    /// The thread's loop: wait for the socket, a command or the next timer; handle it; flush.
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        let mut backlog = false;
        let mut timers_deferred = 0;
        // A service starts with a timer pass, so that it can schedule its first work.
        let start = Instant::now();
        self.with_service(start, |service, net| service.handle_timeout(start, net));
        self.flush(start);
        loop {
            let now = Instant::now();
            let next = [
                self.endpoint.poll_timeout(),
                self.delayed.keys().next().map(|k| k.0),
                self.service_timeout(),
                self.jobs
                    .values()
                    .filter_map(|job| job.poll_timeout())
                    .min(),
            ]
            .into_iter()
            .flatten()
            .min();
            // Datagrams left unread by a capped batch get no new readiness event (epoll is
            // edge-triggered), so come straight back for them.
            // Say it may sleep before the last look at the command queue: a command queued
            // after that look finds the flag set and wakes the poll.
            self.sleepy.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let timeout = if backlog || !self.commands.is_empty() {
                Some(Duration::ZERO)
            } else {
                next.map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                warn!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            self.sleepy.store(false, Ordering::SeqCst);
            let now = Instant::now();
            backlog = self.receive(now);
            if !self.take_commands(now) {
                return;
            }
            // What was already read goes to the application before any timer runs: a view
            // leader that was descheduled must see the heartbeats waiting for it before it
            // expires anyone. Datagrams still queued in the socket (a full batch) defer the
            // service's timers too, for a bounded number of batches so a flood cannot
            // starve them.
            self.flush(now);
            timers_deferred = if backlog && timers_deferred < MAX_DEFERRED_BATCHES {
                timers_deferred + 1
            } else {
                0
            };
            if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
                self.endpoint.handle_timeout(now);
            }
            if timers_deferred == 0 && self.service_timeout().is_some_and(|t| t <= now) {
                self.with_service(now, |service, net| service.handle_timeout(now, net));
            }
            if timers_deferred == 0 {
                let due: Vec<u64> = self
                    .jobs
                    .iter()
                    .filter(|(_, job)| job.poll_timeout().is_some_and(|t| t <= now))
                    .map(|(&number, _)| number)
                    .collect();
                for number in due {
                    if let Some(job) = self.jobs.get_mut(&number) {
                        job.handle_timeout(now);
                    }
                    self.pump_job(now, number);
                }
            }
            self.flush(now);
            self.report_drops(now);
        }
    }

    /// Logs, at most once per [`DROP_REPORT_INTERVAL`], what the endpoint dropped or refused
    /// since the last report (each drop is also logged at debug level, rate limited).
    fn report_drops(&mut self, now: Instant) {
        let (last, earlier) = &self.drops_reported;
        if now.saturating_duration_since(*last) < DROP_REPORT_INTERVAL {
            return;
        }
        let stats = self.endpoint.stats();
        if let Some(summary) = stats.drops_since(earlier) {
            info!(
                "{}: in the last {} s: {summary}",
                self.local_addr,
                now.saturating_duration_since(*last).as_secs()
            );
        }
        self.drops_reported = (now, stats.clone());
    }

    /// When the driver thread's service (if any) wants its timer.
    fn service_timeout(&self) -> Option<Instant> {
        match &self.inbound {
            Inbound::Service(service) => service.poll_timeout(),
            Inbound::Channel(_) => None,
        }
    }

    /// Calls `f` on the driver thread's service (if any) with a context for answering.
    fn with_service(&mut self, now: Instant, f: impl FnOnce(&mut dyn Service, &mut Local<'_>)) {
        if let Inbound::Service(service) = &mut self.inbound {
            let mut net = Local {
                endpoint: &mut self.endpoint,
                pending: &mut self.pending,
                now,
            };
            f(service.as_mut(), &mut net);
        }
    }

    /// This process's address in traced datagrams to or from `peer`: the bound address, or
    /// for a wildcard-bound socket the source address the kernel picks toward `peer`.
    fn trace_source(&mut self, peer: SocketAddr) -> SocketAddr {
        let bound = self.local_addr;
        if !bound.ip().is_unspecified() {
            return bound;
        }
        let ip = match self.trace_sources.get(&peer.ip()) {
            Some(ip) => *ip,
            None => {
                let ip = local_ip_toward(peer).unwrap_or(bound.ip());
                if self.trace_sources.len() < TRACE_SOURCES {
                    self.trace_sources.insert(peer.ip(), ip);
                }
                ip
            }
        };
        SocketAddr::new(ip, bound.port())
    }

    /// Reads up to [`RECEIVE_BATCH`] datagrams (and every queued ICMP error). Returns true
    /// when the batch filled up, so more may be waiting.
    fn receive(&mut self, now: Instant) -> bool {
        for _ in 0..RECEIVE_BATCH {
            match self.socket.recv_from(&mut self.buffer) {
                Ok((n, from)) => {
                    if self.tracer.is_some() {
                        let local = self.trace_source(from);
                        if let Some(tracer) = &self.tracer {
                            record(tracer, Direction::Received, local, from, &self.buffer[..n]);
                        }
                    }
                    self.endpoint.handle_datagram(now, from, &self.buffer[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drain_error_queue(now);
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("receive error: {e}");
                    self.drain_error_queue(now);
                }
            }
        }
        true
    }

    /// Reports every peer the error queue names as unreachable.
    fn drain_error_queue(&mut self, now: Instant) {
        while let Some((peer, errno)) = read_error_queue(self.socket.as_raw_fd()) {
            let error = io::Error::from_raw_os_error(errno);
            if matches!(
                errno,
                libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH
            ) {
                debug!("{peer} is unreachable: {error}");
                self.endpoint.handle_unreachable(now, peer);
            } else {
                debug!("ICMP error for {peer}: {error}");
            }
        }
    }

    /// Starts the requests job `number` wants sent (a request the endpoint refuses is
    /// answered at once with its error), and drops the job once it is done.
    fn pump_job(&mut self, now: Instant, number: u64) {
        let Some(job) = self.jobs.get_mut(&number) else {
            return;
        };
        while let Some(send) = job.poll_send() {
            match self.endpoint.request_with(
                now,
                send.dst,
                send.body,
                send.deadline,
                send.unacked_attempts,
            ) {
                Ok(id) => {
                    self.pending.insert(id, Waiter::Job(number, send.token));
                }
                Err(e) => job.handle_response(now, send.token, Err(e)),
            }
        }
        if job.is_done() {
            self.jobs.remove(&number);
        }
    }

    /// Executes every queued command; false when the thread must stop.
    fn take_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Request {
                    dst,
                    body,
                    deadline,
                    unacked_attempts,
                    reply,
                    tag,
                }) => match self
                    .endpoint
                    .request_with(now, dst, body, deadline, unacked_attempts)
                {
                    Ok(id) => {
                        self.pending.insert(id, Waiter::Channel(reply, tag));
                    }
                    Err(e) => {
                        let _ = reply.send(Reply {
                            tag,
                            result: Err(e),
                        });
                    }
                },
                Ok(Command::Respond { id, body }) => {
                    if let Err(e) = self.endpoint.respond(now, id, body) {
                        warn!("cannot send a response: {e}");
                    }
                }
                Ok(Command::Run(job)) => {
                    let number = self.next_job;
                    self.next_job += 1;
                    self.jobs.insert(number, job);
                    self.pump_job(now, number);
                }
                Ok(Command::Stats(reply)) => {
                    let _ = reply.send(self.endpoint.stats().clone());
                }
                Ok(Command::Shutdown) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return false;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Sends what the endpoint queued (through fault injection), sends delayed datagrams that
    /// are due, and hands events to the application; repeats while handling events (on the
    /// driver thread's service) queues more.
    fn flush(&mut self, now: Instant) {
        loop {
            self.transmit(now);
            let mut handled = false;
            while let Some(event) = self.endpoint.poll_event() {
                handled = true;
                self.deliver(now, event);
            }
            if !handled {
                return;
            }
        }
    }

    /// Hands one endpoint event to whoever waits for it.
    fn deliver(&mut self, now: Instant, event: Event) {
        match event {
            Event::Request { from, id, body } => {
                let request = IncomingRequest { from, id, body };
                match &self.inbound {
                    // If the application is gone, the request simply goes unanswered.
                    Inbound::Channel(requests) => {
                        let _ = requests.send(request);
                    }
                    Inbound::Service(_) => self.with_service(now, |service, net| {
                        service.handle_request(now, request, net)
                    }),
                }
            }
            Event::Response { id, result } => match self.pending.remove(&id) {
                Some(Waiter::Channel(reply, tag)) => {
                    let _ = reply.send(Reply { tag, result });
                }
                Some(Waiter::Service(tag)) => self.with_service(now, |service, net| {
                    service.handle_reply(now, Reply { tag, result }, net)
                }),
                Some(Waiter::Job(number, token)) => {
                    if let Some(job) = self.jobs.get_mut(&number) {
                        job.handle_response(now, token, result);
                    }
                    self.pump_job(now, number);
                }
                None => {}
            },
        }
    }

    /// Puts what the endpoint queued on the wire (through fault injection), and the delayed
    /// datagrams that are due.
    fn transmit(&mut self, now: Instant) {
        while let Some(transmit) = self.endpoint.poll_transmit() {
            // Traced as the endpoint emits it, before fault injection: what a capture at the
            // sender would show on a network that loses, delays or duplicates datagrams.
            if self.tracer.is_some() {
                let local = self.trace_source(transmit.dst);
                if let Some(tracer) = &self.tracer {
                    record(
                        tracer,
                        Direction::Sent,
                        local,
                        transmit.dst,
                        &transmit.payload,
                    );
                }
            }
            if self.faults.spec().is_none() {
                self.send_now(now, transmit.dst, &transmit.payload);
                continue;
            }
            for at in self.faults.schedule(now) {
                if at <= now {
                    self.send_now(now, transmit.dst, &transmit.payload);
                } else {
                    self.delayed_seq += 1;
                    let copy = (transmit.dst, transmit.payload.clone());
                    self.delayed.insert((at, self.delayed_seq), copy);
                }
            }
        }
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (dst, payload) = entry.remove();
            self.send_now(now, dst, &payload);
        }
    }

    /// Puts one datagram on the wire. A full socket buffer drops it (the reliable layer
    /// resends); a pending ICMP error surfacing here is read from the error queue.
    fn send_now(&mut self, now: Instant, dst: SocketAddr, payload: &[u8]) {
        loop {
            match self.socket.send_to(payload, dst) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    debug!("socket buffer full; dropping a datagram to {dst}");
                    return;
                }
                Err(e) => {
                    debug!("send to {dst} failed: {e}");
                    self.drain_error_queue(now);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that asks `peer` twice in a row (the second request only after the first
    /// answer, as a `setr`'s commit follows its votes) and reports both answers, or its
    /// first failure, on `done`.
    struct TwoAsks {
        /// The peer asked.
        peer: SocketAddr,
        /// Requests sent so far.
        sent: u64,
        /// Answers received so far.
        answers: Vec<Vec<u8>>,
        /// The first failure, if any.
        failed: Option<RequestError>,
        /// Where the outcome goes.
        done: Sender<Result<Vec<Vec<u8>>, RequestError>>,
    }

    impl TwoAsks {
        /// A job asking `peer`, reporting on `done`.
        fn to(peer: SocketAddr, done: Sender<Result<Vec<Vec<u8>>, RequestError>>) -> TwoAsks {
            TwoAsks {
                peer,
                sent: 0,
                answers: Vec::new(),
                failed: None,
                done,
            }
        }
    }

    impl Job for TwoAsks {
        /// The next question, once the previous one is answered.
        fn poll_send(&mut self) -> Option<JobSend> {
            if self.failed.is_some() || self.sent >= 2 || self.answers.len() as u64 != self.sent {
                return None;
            }
            self.sent += 1;
            Some(JobSend {
                dst: self.peer,
                body: format!("question {}", self.sent).into_bytes(),
                deadline: Some(Instant::now() + Duration::from_secs(5)),
                unacked_attempts: None,
                token: self.sent,
            })
        }

        /// Keeps the answer, or the failure.
        fn handle_response(
            &mut self,
            _: Instant,
            token: u64,
            result: Result<Vec<u8>, RequestError>,
        ) {
            assert_eq!(
                token,
                self.answers.len() as u64 + 1,
                "answers come in order"
            );
            match result {
                Ok(body) => self.answers.push(body),
                Err(e) => self.failed = Some(e),
            }
        }

        /// No timer.
        fn handle_timeout(&mut self, _: Instant) {}

        /// No timer.
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }

        /// Done after two answers or a failure.
        fn is_done(&mut self) -> bool {
            let outcome = match (&self.failed, self.answers.len()) {
                (Some(e), _) => Err(e.clone()),
                (None, 2) => Ok(std::mem::take(&mut self.answers)),
                _ => return false,
            };
            let _ = self.done.send(outcome);
            true
        }
    }

    /// Runs a [`TwoAsks`] toward `peer` on `asker`'s driver and waits (10 s at most) for its
    /// outcome.
    fn run_two_asks(asker: &Handle, peer: SocketAddr) -> Result<Vec<Vec<u8>>, RequestError> {
        let (done, outcome) = crossbeam_channel::bounded(1);
        asker.run(Box::new(TwoAsks::to(peer, done))).unwrap();
        outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("the job finishes")
    }

    /// Issue 18: a job runs on the driver thread, sending its requests and taking their
    /// answers there; the thread that handed it over only sees the outcome.
    #[test]
    fn a_job_runs_on_the_driver_thread_to_its_outcome() {
        let (asker, _asked, _a) = spawn(
            bind("127.0.0.1:0".parse().unwrap()).unwrap(),
            NetConfig::default(),
        )
        .unwrap();
        let (answerer, requests, _b) = spawn(
            bind("127.0.0.1:0".parse().unwrap()).unwrap(),
            NetConfig::default(),
        )
        .unwrap();
        let echo = {
            let answerer = answerer.clone();
            std::thread::spawn(move || {
                for request in requests.iter().take(2) {
                    let mut body = b"answer to ".to_vec();
                    body.extend_from_slice(&request.body);
                    answerer.respond(request.id, body).unwrap();
                }
            })
        };
        let answers = run_two_asks(&asker, answerer.local_addr()).expect("both questions answered");
        assert_eq!(
            answers,
            [
                b"answer to question 1".to_vec(),
                b"answer to question 2".to_vec()
            ]
        );
        echo.join().unwrap();

        // A job whose peer is gone ends with the failure.
        let gone = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = gone.local_addr().unwrap();
        drop(gone);
        let failure = run_two_asks(&asker, peer).expect_err("nobody answers");
        assert!(
            matches!(
                failure,
                RequestError::Unreachable { .. } | RequestError::Timeout { .. }
            ),
            "{failure:?}"
        );
    }
}
