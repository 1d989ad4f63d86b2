//! The interface between a node's protocol logic and whatever drives it.
//!
//! A [`Node`] (the view leader, a server) is a sans-IO state machine: it is handed decoded
//! requests, responses to its own requests, and timer expiries, each with the current instant,
//! and it hands back [`Action`]s (responses to send, requests to start). [`start`] hosts a node
//! on a real network driver, on the driver's own thread; tests and the simulator can drive the
//! same node directly.
//!
//! Calling contract: after every `handle_*` call, drain [`Node::poll_action`], then re-read
//! [`Node::poll_timeout`] and call [`Node::handle_timeout`] once that instant has come.
//! `now` never goes backwards.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::Instant;

use log::{debug, warn};

use crate::reliable::{IncomingId, RequestError};
use crate::runtime::net::{self, IncomingRequest, Local, NetConfig, Reply};
use crate::wire::message::{ErrorKind, Request, Response};

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

/// A node running on its driver's thread (see [`start`]). Dropping it, or calling
/// [`Running::stop`], stops the node and its driver.
#[derive(Debug)]
pub struct Running {
    /// The driver's handle (its address, counters; requests from this process).
    pub handle: net::Handle,
    /// The driver thread, which runs the node too.
    driver: JoinHandle<()>,
}

impl Running {
    /// The address the node's socket is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// Stops the node and its driver, and waits for the thread to end (so that nothing is
    /// sent or traced after it returns).
    pub fn stop(self) {
        let Running { handle, driver } = self;
        handle.shutdown();
        let _ = driver.join();
    }
}

/// Runs `node` on `socket`: starts a driver with `config` that hosts the node on its own
/// thread (requests and replies reach the node with no hop between threads). This is how
/// the binaries, benchmarks and tests host a node.
pub fn start<N: Node + Send + 'static>(
    node: N,
    socket: UdpSocket,
    config: NetConfig,
) -> io::Result<Running> {
    let (handle, driver) = net::spawn_service(socket, config, Box::new(Hosted { node }))?;
    Ok(Running { handle, driver })
}

/// What a node's glue needs from the network under it: answer a request, start one. The
/// driver thread's [`Local`] is one; the simulator's in-memory hosts are another, so both run
/// the very same glue ([`deliver_request`], [`deliver_reply`], [`carry_out`]).
pub trait NodeNet {
    /// Sends `body` as the answer to request `id`.
    fn respond(&mut self, id: IncomingId, body: Vec<u8>);

    /// Starts a request of `body` to `dst` whose outcome comes back tagged `token`; an error
    /// if it cannot even start.
    fn request(
        &mut self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        token: u64,
    ) -> Result<(), RequestError>;
}

impl NodeNet for Local<'_> {
    /// Answers through the driver's endpoint.
    fn respond(&mut self, id: IncomingId, body: Vec<u8>) {
        Local::respond(self, id, body);
    }

    /// Starts the request on the driver's endpoint.
    fn request(
        &mut self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        token: u64,
    ) -> Result<(), RequestError> {
        Local::request(self, dst, body, deadline, token)
    }
}

/// A request body arrived for `node` from `from`: decodes it and hands it to the node (an
/// undecodable one is answered `bad_input` without reaching the node), then carries out what
/// the node queued.
pub fn deliver_request<N: Node + ?Sized>(
    node: &mut N,
    now: Instant,
    from: SocketAddr,
    id: IncomingId,
    body: &[u8],
    net: &mut impl NodeNet,
) {
    match Request::decode(body) {
        Ok(request) => node.handle_request(now, from, id, request),
        Err(e) => {
            debug!("undecodable request from {from}: {e}");
            let response =
                Response::error(ErrorKind::BadInput, format!("undecodable request: {e}"));
            respond(net, id, &response);
        }
    }
    carry_out(node, now, net);
}

/// The outcome of the node's request `token` arrived: decodes it (an undecodable answer
/// becomes a `bad_input` error answer), hands it to the node, and carries out what it queued.
pub fn deliver_reply<N: Node + ?Sized>(
    node: &mut N,
    now: Instant,
    token: u64,
    result: Result<Vec<u8>, RequestError>,
    net: &mut impl NodeNet,
) {
    node.handle_response(
        now,
        token,
        result.map(|body| Response::decode_or_error(&body)),
    );
    carry_out(node, now, net);
}

/// A [`Node`] as the driver thread's [`net::Service`]: decodes what arrives, calls the
/// node, and carries out the actions it queues.
struct Hosted<N> {
    /// The node.
    node: N,
}

impl<N: Node + Send + 'static> net::Service for Hosted<N> {
    /// Hands the request to the node ([`deliver_request`]).
    fn handle_request(&mut self, now: Instant, incoming: IncomingRequest, net: &mut Local<'_>) {
        deliver_request(
            &mut self.node,
            now,
            incoming.from,
            incoming.id,
            &incoming.body,
            net,
        );
    }

    /// Hands the outcome of one of the node's requests to it ([`deliver_reply`]).
    fn handle_reply(&mut self, now: Instant, reply: Reply, net: &mut Local<'_>) {
        deliver_reply(&mut self.node, now, reply.tag, reply.result, net);
    }

    /// The node's timer came due.
    fn handle_timeout(&mut self, now: Instant, net: &mut Local<'_>) {
        self.node.handle_timeout(now);
        carry_out(&mut self.node, now, net);
    }

    /// The node's next timer.
    fn poll_timeout(&self) -> Option<Instant> {
        self.node.poll_timeout()
    }
}

/// Carries out every action the node queued: responses are sent, requests started (one
/// that cannot start is reported back to the node at once, so nothing waits for it).
pub fn carry_out<N: Node + ?Sized>(node: &mut N, now: Instant, net: &mut impl NodeNet) {
    while let Some(action) = node.poll_action() {
        match action {
            Action::Respond { id, response } => respond(net, id, &response),
            Action::Request {
                token,
                dst,
                request,
                deadline,
            } => {
                let started = match request.encode() {
                    Ok(body) => net.request(dst, body, deadline, token),
                    Err(e) => {
                        warn!("cannot encode a {} request: {e}", request.name());
                        let limit = crate::wire::codec::MAX_MESSAGE;
                        Err(RequestError::TooLarge {
                            size: limit + 1,
                            limit,
                        })
                    }
                };
                if let Err(error) = started {
                    node.handle_response(now, token, Err(error));
                }
            }
        }
    }
}

/// Encodes and sends one response.
fn respond(net: &mut impl NodeNet, id: IncomingId, response: &Response) {
    let body = match response.encode() {
        Ok(body) => body,
        Err(e) => {
            warn!("cannot encode a response: {e}");
            match Response::error(ErrorKind::BadInput, e.to_string()).encode() {
                Ok(body) => body,
                Err(_) => return,
            }
        }
    };
    net.respond(id, body);
}
