//! The reference target of `client bench --op udp-echo`: a datagram to an echo thread in this
//! process and back, over loopback.
//!
//! No protocol at all: one `send`, one `recv` on each side, so a round trip costs the kernel's
//! loopback path and two thread wake-ups. That is the floor under every request/response of
//! any UDP protocol on this machine: a trireme `getr` makes two sequential round trips (the view,
//! then the read) and a `setr` four (the view, the prepares, the primary's commit, the other
//! commits).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cli::bench::{Connection, Op, Target};
use crate::wire::message::{ErrorKind, OpError};

/// Bytes in each echoed datagram (about a small request's header and body).
const DATAGRAM: usize = 64;

/// How often the echo thread checks whether it must stop.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The bound on one round trip when the command has none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// An echo thread on a loopback socket, stopped when this is dropped.
#[derive(Debug)]
pub struct UdpEcho {
    /// Where the echo thread listens.
    addr: SocketAddr,
    /// Tells the echo thread to stop.
    stop: Arc<AtomicBool>,
    /// The echo thread, joined on drop.
    thread: Option<JoinHandle<()>>,
    /// The bound on one round trip.
    timeout: Duration,
}

impl UdpEcho {
    /// Starts the echo thread on an OS-chosen loopback port. `timeout` bounds each round trip
    /// (`None`: 5 s).
    pub fn start(timeout: Option<Duration>) -> io::Result<UdpEcho> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(STOP_POLL))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("udp-echo".into())
            .spawn(move || echo(&socket, &stopping))?;
        Ok(UdpEcho {
            addr,
            stop,
            thread: Some(thread),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
        })
    }
}

/// Sends every datagram back to its sender until `stop` is set.
fn echo(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buffer = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&buffer[..n], from);
        }
    }
}

impl Drop for UdpEcho {
    /// Stops and joins the echo thread.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Target for UdpEcho {
    /// "udp echo thread at ADDR (this process)".
    fn describe(&self) -> String {
        format!("udp echo thread at {} (this process)", self.addr)
    }

    /// A socket of its own, connected to the echo thread.
    fn connect(&self) -> Result<Box<dyn Connection>, OpError> {
        let setup = || -> io::Result<UdpSocket> {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(self.addr)?;
            socket.set_read_timeout(Some(self.timeout))?;
            Ok(socket)
        };
        let socket = setup().map_err(|e| OpError {
            kind: ErrorKind::Unreachable,
            message: format!("cannot open a socket to the echo thread: {e}"),
            cycle: Vec::new(),
        })?;
        Ok(Box::new(EchoConnection {
            socket,
            sequence: 0,
        }))
    }
}

/// One worker's socket to the echo thread.
struct EchoConnection {
    /// Connected to the echo thread.
    socket: UdpSocket,
    /// Number of the last datagram sent; an echo of an older one (a late answer) is skipped.
    sequence: u64,
}

impl Connection for EchoConnection {
    /// One round trip; the operation and key are ignored.
    fn execute(&mut self, _op: Op, _key: &str, _value: &str) -> Result<(), OpError> {
        self.sequence += 1;
        let mut datagram = [0u8; DATAGRAM];
        datagram[..8].copy_from_slice(&self.sequence.to_be_bytes());
        let failed = |e: io::Error| {
            let kind = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Unreachable,
            };
            OpError {
                kind,
                message: format!("echo: {e}"),
                cycle: Vec::new(),
            }
        };
        self.socket.send(&datagram).map_err(failed)?;
        let mut answer = [0u8; DATAGRAM];
        loop {
            let n = self.socket.recv(&mut answer).map_err(failed)?;
            if n >= 8 && answer[..8] == datagram[..8] {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The echo thread answers each worker's datagrams, and stops when dropped.
    #[test]
    fn echo_answers_round_trips() {
        let echo = UdpEcho::start(Some(Duration::from_secs(2))).unwrap();
        let mut a = echo.connect().unwrap();
        let mut b = echo.connect().unwrap();
        for _ in 0..10 {
            a.execute(Op::Echo, "", "").unwrap();
            b.execute(Op::Echo, "", "").unwrap();
        }
        drop(echo);
    }
}
