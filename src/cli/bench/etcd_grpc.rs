//! The etcd target of `client bench` through etcd's native v3 gRPC API (built with the
//! `etcd-grpc` feature), so etcd is measured as its own clients reach it: no JSON gateway hop.
//!
//! A write is a put, a read a serializable get (answered by the member asked, from its own
//! state, as a trireme `getr` is answered by one replica), both through the `etcd-client`
//! crate (tonic over HTTP/2). Each worker has its own [`etcd_client::Client`] on one endpoint,
//! so its own HTTP/2 connection, to the endpoints in turn as [`super::etcd`] does. The bench's
//! workers are synchronous threads: each connection drives its client with its own
//! current-thread tokio runtime, through `block_on` on the worker's thread. That runtime runs
//! the connection's tasks (tonic's buffer, the HTTP/2 connection) on the worker thread itself,
//! so an operation wakes no other thread. One multi-thread runtime shared by all workers
//! instead hands every request and answer between threads: measured against a 3-member etcd
//! on 2 cores at 64 workers, it cost this process 104-109 µs of CPU per put and 93-101 µs per
//! get, against 76 µs and 54 µs with a runtime per connection, which also carried 20-50% more
//! operations per second.
//!
//! Failures map to the contract's kinds as the gateway target's do: a read that finds nothing
//! is `not_found`; a gRPC status by its code (Unavailable `unreachable`, DeadlineExceeded
//! `timeout`, InvalidArgument `bad_input`, others `aborted`); a transport failure
//! `unreachable`; no answer within the command's bound `timeout`.

use std::io;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use thiserror::Error;
use tokio::runtime::{Builder, Runtime};
use tonic::Code;

use crate::cli::bench::etcd::{Endpoint, Endpoints};
use crate::cli::bench::{Connection, Op, Target};
use crate::wire::message::{ErrorKind, OpError};

/// The bound on connecting and on each operation when the command has none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running etcd cluster, reached through its members' gRPC API.
#[derive(Debug)]
pub struct EtcdGrpc {
    /// The members' client URLs; workers take them in turn.
    endpoints: Endpoints,
    /// The bound on connecting and on each operation.
    timeout: Duration,
}

impl EtcdGrpc {
    /// A target spreading workers over `endpoints` (at least one), each operation bounded by
    /// `timeout` (`None`: 5 s).
    pub fn new(endpoints: Vec<Endpoint>, timeout: Option<Duration>) -> EtcdGrpc {
        EtcdGrpc {
            endpoints: Endpoints::new(endpoints),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
        }
    }
}

impl Target for EtcdGrpc {
    /// "etcd at http://A, http://B (gRPC: etcd-client/tonic, one HTTP/2 connection per
    /// worker)".
    fn describe(&self) -> String {
        format!(
            "etcd at {} (gRPC: etcd-client/tonic, one HTTP/2 connection per worker)",
            self.endpoints.describe()
        )
    }

    /// Opens a client on the next endpoint in turn, and its HTTP/2 connection (a first call,
    /// so the measured run does not pay for it and an unreachable member fails here).
    fn connect(&self) -> Result<Box<dyn Connection>, OpError> {
        let url = self.endpoints.take_turn()?.url();
        GrpcConnection::open(url.clone(), self.timeout)
            .map(|connection| Box::new(connection) as Box<dyn Connection>)
            .map_err(|e| e.into_op_error(&url))
    }
}

/// One worker's client of one member, with the runtime that drives it.
struct GrpcConnection {
    /// The member's client (dropped before the runtime, which runs its connection's tasks).
    client: Client,
    /// The worker's own current-thread runtime.
    runtime: Runtime,
    /// The member's URL, for error messages.
    url: String,
    /// The bound on each operation.
    timeout: Duration,
}

impl GrpcConnection {
    /// Starts a runtime, connects a client to `url` and makes a first call on it.
    fn open(url: String, timeout: Duration) -> Result<GrpcConnection, GrpcError> {
        let runtime = Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(GrpcError::Runtime)?;
        let options = ConnectOptions::new().with_connect_timeout(timeout);
        let client = runtime.block_on(bounded(timeout, async {
            let mut client = Client::connect([url.as_str()], Some(options)).await?;
            // The channel connects lazily: open it now, with a call that changes nothing.
            client.status().await?;
            Ok(client)
        }))?;
        Ok(GrpcConnection {
            client,
            runtime,
            url,
            timeout,
        })
    }

    /// Performs `op` on `key`, within the bound.
    fn call(&mut self, op: Op, key: &str, value: &str) -> Result<(), GrpcError> {
        let client = &mut self.client;
        self.runtime.block_on(bounded(self.timeout, async {
            match op {
                Op::Write => client.put(key, value, None).await.map(drop)?,
                Op::Read => {
                    let options = GetOptions::new().with_serializable();
                    let found = client.get(key, Some(options)).await?;
                    if found.kvs().is_empty() {
                        return Err(GrpcError::NotFound(key.to_owned()));
                    }
                }
                Op::Echo => return Err(GrpcError::NoEcho),
            }
            Ok(())
        }))
    }
}

impl Connection for GrpcConnection {
    /// A write is a put; a read a serializable get of the key alone.
    fn execute(&mut self, op: Op, key: &str, value: &str) -> Result<(), OpError> {
        self.call(op, key, value)
            .map_err(|e| e.into_op_error(&self.url))
    }
}

/// Runs `work` for at most `timeout`.
async fn bounded<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, GrpcError>>,
) -> Result<T, GrpcError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(GrpcError::TimedOut(timeout)))
}

/// What went wrong in a call to etcd.
#[derive(Debug, Error)]
pub enum GrpcError {
    /// The tokio runtime that drives the client could not start.
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The client or the member failed the call.
    #[error("{}", describe(.0))]
    Etcd(#[from] etcd_client::Error),
    /// No answer within the bound (the client's own deadline).
    #[error("no answer within {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// A read found no such key.
    #[error("etcd holds no {0:?}")]
    NotFound(String),
    /// The load asked for an echo, which etcd does not do.
    #[error("the etcd target does not echo")]
    NoEcho,
}

/// An etcd-client error in one line (a gRPC status by its code and message alone, without
/// tonic's metadata dump).
fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            format!("gRPC {:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    }
}

impl GrpcError {
    /// The contract's kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GrpcError::Etcd(etcd_client::Error::GRpcStatus(status)) => match status.code() {
                Code::Unavailable => ErrorKind::Unreachable,
                Code::DeadlineExceeded => ErrorKind::Timeout,
                Code::InvalidArgument => ErrorKind::BadInput,
                _ => ErrorKind::Aborted,
            },
            GrpcError::Etcd(etcd_client::Error::IoError(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                ErrorKind::Timeout
            }
            GrpcError::Etcd(
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_),
            ) => ErrorKind::Unreachable,
            GrpcError::Etcd(
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_),
            )
            | GrpcError::NoEcho => ErrorKind::BadInput,
            GrpcError::Etcd(_) | GrpcError::Runtime(_) => ErrorKind::Aborted,
            GrpcError::TimedOut(_) => ErrorKind::Timeout,
            GrpcError::NotFound(_) => ErrorKind::NotFound,
        }
    }

    /// The contract's form of this failure on the member at `url`.
    fn into_op_error(self, url: &str) -> OpError {
        OpError {
            kind: self.kind(),
            message: format!("etcd at {url}: {self}"),
            cycle: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    /// The kind of a failed call: gRPC codes as the gateway target maps them, transport
    /// failures `unreachable`, the client's own deadline `timeout`, a missing key `not_found`.
    #[test]
    fn errors_map_to_the_contracts_kinds() {
        let status = |code| GrpcError::Etcd(etcd_client::Error::GRpcStatus(Status::new(code, "m")));
        assert_eq!(status(Code::Unavailable).kind(), ErrorKind::Unreachable);
        assert_eq!(status(Code::DeadlineExceeded).kind(), ErrorKind::Timeout);
        assert_eq!(status(Code::InvalidArgument).kind(), ErrorKind::BadInput);
        for other in [
            Code::Unknown,
            Code::Internal,
            Code::ResourceExhausted,
            Code::Cancelled,
        ] {
            assert_eq!(status(other).kind(), ErrorKind::Aborted, "{other:?}");
        }
        let io = |kind| GrpcError::Etcd(etcd_client::Error::IoError(io::Error::from(kind)));
        assert_eq!(
            io(io::ErrorKind::ConnectionRefused).kind(),
            ErrorKind::Unreachable
        );
        assert_eq!(io(io::ErrorKind::TimedOut).kind(), ErrorKind::Timeout);
        let invalid = GrpcError::Etcd(etcd_client::Error::InvalidArgs("empty endpoints".into()));
        assert_eq!(invalid.kind(), ErrorKind::BadInput);
        assert_eq!(
            GrpcError::TimedOut(Duration::from_secs(1)).kind(),
            ErrorKind::Timeout
        );
        assert_eq!(GrpcError::NotFound("k".into()).kind(), ErrorKind::NotFound);
        assert_eq!(GrpcError::NoEcho.kind(), ErrorKind::BadInput);
    }

    /// A gRPC failure reads as one line: the member, the code and etcd's message, without
    /// tonic's metadata.
    #[test]
    fn a_status_reads_as_one_line() {
        let error = GrpcError::Etcd(etcd_client::Error::GRpcStatus(Status::new(
            Code::Unavailable,
            "etcdserver: request timed out",
        )))
        .into_op_error("http://127.0.0.1:2379");
        assert_eq!(
            error.message,
            "etcd at http://127.0.0.1:2379: gRPC Unavailable: etcdserver: request timed out"
        );
    }

    /// The report names the API, so a gRPC run is never mistaken for a gateway one; a target
    /// without endpoints refuses to connect.
    #[test]
    fn the_target_names_its_api() {
        let endpoints = vec![
            "http://127.0.0.1:1".parse().unwrap(),
            "http://127.0.0.1:2".parse().unwrap(),
        ];
        let target = EtcdGrpc::new(endpoints, None);
        assert_eq!(
            target.describe(),
            "etcd at http://127.0.0.1:1, http://127.0.0.1:2 \
             (gRPC: etcd-client/tonic, one HTTP/2 connection per worker)"
        );
        let none = EtcdGrpc::new(Vec::new(), None);
        assert_eq!(
            none.connect().err().map(|e| e.kind),
            Some(ErrorKind::BadInput)
        );
    }

    /// Connecting to a port nobody listens on fails at once as `unreachable` (the refused
    /// connection surfaces as gRPC Unavailable), never by hanging.
    #[test]
    fn connecting_to_a_closed_port_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let target = EtcdGrpc::new(
            vec![format!("http://127.0.0.1:{port}").parse().unwrap()],
            Some(Duration::from_secs(2)),
        );
        let error = target.connect().err().expect("nobody listens");
        assert_eq!(error.kind, ErrorKind::Unreachable, "{}", error.message);
    }
}
