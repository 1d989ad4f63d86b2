//! The interface between a node's protocol logic and whatever drives it.
//!
//! A [`Node`] (the view leader, a server) is a sans-IO state machine: it is handed decoded
//! requests, responses to its own requests, and timer expiries, each with the current instant,
//! and it hands back [`Action`]s (responses to send, requests to start). [`run`] drives a node
//! on a real [`net::Handle`]; tests and the simulator can drive the same node directly.
//!
//! Calling contract: after every `handle_*` call, drain [`Node::poll_action`], then re-read
//! [`Node::poll_timeout`] and call [`Node::handle_timeout`] once that instant has come.
//! `now` never goes backwards.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, warn};

use crate::message::{ErrorKind, Request, Response};
use crate::net::{self, IncomingRequest, NetConfig, Reply};
use crate::reliable::{IncomingId, RequestError};

/// Something a node wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer request `id` with `response`.
    Respond {
        /// The request being answered.
        id: IncomingId,
        /// The answer.
        response: Response,
    },
    /// Send `request` to `dst`; the outcome comes back through
    /// [`Node::handle_response`] with `token`.
    Request {
        /// The node's own tag for this request.
        token: u64,
        /// Destination.
        dst: SocketAddr,
        /// What to ask.
        request: Request,
        /// Give up at this instant.
        deadline: Option<Instant>,
    },
}

/// A node's protocol logic, without I/O. See the module documentation for the contract.
pub trait Node {
    /// A request arrived from `from`; answer it (now or later) with [`Action::Respond`].
    fn handle_request(&mut self, now: Instant, from: SocketAddr, id: IncomingId, request: Request);

    /// The outcome of the request started with `token`.
    fn handle_response(&mut self, now: Instant, token: u64, result: Result<Response, RequestError>);

    /// The instant from [`Node::poll_timeout`] has come.
    fn handle_timeout(&mut self, now: Instant);

    /// The next instant at which the node has timed work, if any.
    fn poll_timeout(&self) -> Option<Instant>;

    /// The next action to carry out, if any.
    fn poll_action(&mut self) -> Option<Action>;
}

/// A node running on its own driver thread and node thread (see [`start`]). Dropping it, or
/// calling [`Running::stop`], stops the node and its driver.
#[derive(Debug)]
pub struct Running {
    /// The driver's handle (its address, counters; requests from this process).
    pub handle: net::Handle,
    /// Dropped to stop the node thread.
    stop: Sender<()>,
    /// The node thread.
    thread: JoinHandle<()>,
    /// The driver thread.
    driver: JoinHandle<()>,
}

impl Running {
    /// The address the node's socket is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// Stops the node and its driver, and waits for both threads to end (so that nothing
    /// is sent or traced after it returns).
    pub fn stop(self) {
        let Running {
            handle,
            stop,
            thread,
            driver,
        } = self;
        drop(stop);
        handle.shutdown();
        let _ = thread.join();
        let _ = driver.join();
    }
}

/// Runs `node` on `socket`: starts a driver with `config` and a thread that drives the node
/// with [`run`]. This is how the binaries, benchmarks and tests host a node.
pub fn start<N: Node + Send + 'static>(
    mut node: N,
    socket: UdpSocket,
    config: NetConfig,
) -> io::Result<Running> {
    let (handle, requests, driver) = net::spawn(socket, config)?;
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let node_handle = handle.clone();
    let thread = std::thread::Builder::new()
        .name(format!("node-{}", handle.local_addr()))
        .spawn(move || run(&mut node, &node_handle, &requests, &stopped))?;
    Ok(Running {
        handle,
        stop,
        thread,
        driver,
    })
}

/// Drives `node` on a network driver until `shutdown` receives (or disconnects), or the
/// driver stops. Undecodable requests are answered with a `bad_input` error without
/// reaching the node.
pub fn run<N: Node>(
    node: &mut N,
    handle: &net::Handle,
    requests: &Receiver<IncomingRequest>,
    shutdown: &Receiver<()>,
) {
    let (reply_tx, reply_rx) = crossbeam_channel::unbounded::<Reply>();
    let now = Instant::now();
    node.handle_timeout(now);
    loop {
        if !carry_out(node, handle, &reply_tx) {
            return;
        }
        let wait = node
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        select! {
            recv(requests) -> incoming => {
                let Ok(incoming) = incoming else { return };
                let now = Instant::now();
                match Request::decode(&incoming.body) {
                    Ok(request) => node.handle_request(now, incoming.from, incoming.id, request),
                    Err(e) => {
                        debug!("undecodable request from {}: {e}", incoming.from);
                        let response = Response::error(ErrorKind::BadInput, format!("undecodable request: {e}"));
                        respond(handle, incoming.id, &response);
                    }
                }
            }
            recv(reply_rx) -> reply => {
                let Ok(reply) = reply else { return };
                let result = reply.result.map(|body| {
                    Response::decode(&body).unwrap_or_else(|e| {
                        Response::error(ErrorKind::BadInput, format!("undecodable response: {e}"))
                    })
                });
                node.handle_response(Instant::now(), reply.tag, result);
            }
            recv(shutdown) -> _ => return,
            default(wait) => {}
        }
        let now = Instant::now();
        if node.poll_timeout().is_some_and(|t| t <= now) {
            node.handle_timeout(now);
        }
    }
}

/// Carries out every action the node queued; false if the driver has stopped.
fn carry_out<N: Node>(
    node: &mut N,
    handle: &net::Handle,
    replies: &crossbeam_channel::Sender<Reply>,
) -> bool {
    while let Some(action) = node.poll_action() {
        match action {
            Action::Respond { id, response } => {
                if !respond(handle, id, &response) {
                    return false;
                }
            }
            Action::Request {
                token,
                dst,
                request,
                deadline,
            } => {
                let body = match request.encode() {
                    Ok(body) => body,
                    Err(e) => {
                        // Tell the node, so nothing waits forever for this request.
                        warn!("cannot encode a {} request: {e}", request.name());
                        let limit = crate::codec::MAX_MESSAGE;
                        let error = RequestError::TooLarge {
                            size: limit + 1,
                            limit,
                        };
                        node.handle_response(Instant::now(), token, Err(error));
                        continue;
                    }
                };
                if handle.start(dst, body, deadline, replies, token).is_err() {
                    return false;
                }
            }
        }
    }
    true
}

/// Encodes and sends one response; false if the driver has stopped.
fn respond(handle: &net::Handle, id: IncomingId, response: &Response) -> bool {
    let body = match response.encode() {
        Ok(body) => body,
        Err(e) => {
            warn!("cannot encode a response: {e}");
            match Response::error(ErrorKind::BadInput, e.to_string()).encode() {
                Ok(body) => body,
                Err(_) => return true,
            }
        }
    };
    handle.respond(id, body).is_ok()
}
