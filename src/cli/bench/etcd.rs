//! The etcd target of `client bench`, so trireme and etcd are measured by the same harness.
//!
//! A write is a put, a read a serializable range get (answered by the member asked, from its
//! own state, as a trireme `getr` is answered by one replica), both through etcd's v3 JSON
//! gateway: `POST /v3/kv/put` with `{"key": base64, "value": base64}` and `POST /v3/kv/range`
//! with `{"key": base64, "serializable": true}`. Each worker keeps one HTTP/1.1 keep-alive
//! connection on a std [`TcpStream`], to the endpoints in turn when several are given. The
//! HTTP client is the minimum this needs (a request with `Content-Length`; a response with
//! `Content-Length` or chunked, which etcd's Go server uses for bodies over 2 KiB), so no HTTP
//! crate and no async runtime enter the build.
//!
//! Failures map to the contract's kinds: a read that finds nothing is `not_found`; a refused
//! connection `unreachable`; a socket timeout `timeout`; a gateway error by its gRPC code
//! (4 `timeout`, 14 `unreachable`, 3 `bad_input`, others `aborted`). After a transport failure
//! the connection is reopened on the next operation.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::cli::bench::{Connection, Op, Target};
use crate::wire::message::{ErrorKind, OpError};

/// The bound on connecting and on each read or write when the command has none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest status or header line accepted.
const MAX_LINE: u64 = 8 * 1024;

/// The largest response body accepted (a 1 MiB value, base64-encoded in JSON, fits).
const MAX_BODY: usize = 16 << 20;

/// Buffer size of each connection's reader.
const READ_BUFFER: usize = 64 * 1024;

/// An etcd client URL: `http://HOST:PORT` (TLS is not supported).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The address connected to.
    addr: SocketAddr,
    /// `HOST:PORT` as given, for the `Host` header and the report.
    host: String,
}

impl Endpoint {
    /// The URL: `http://HOST:PORT`, HOST as given.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// Parses `http://HOST:PORT` (a trailing `/` is allowed), resolving HOST.
    fn from_str(text: &str) -> Result<Endpoint, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("{text:?}: give an http:// URL (TLS is not supported)"))?;
        let host = rest.strip_suffix('/').unwrap_or(rest);
        if host.is_empty() || host.contains('/') {
            return Err(format!("{text:?}: give http://HOST:PORT without a path"));
        }
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("{text:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{text:?}: the host has no address"))?;
        Ok(Endpoint {
            addr,
            host: host.to_owned(),
        })
    }
}

/// The members' client URLs, handed to workers in turn (shared by both etcd targets).
#[derive(Debug)]
pub struct Endpoints {
    /// The URLs.
    list: Vec<Endpoint>,
    /// The one the next worker connects to.
    next: AtomicUsize,
}

impl Endpoints {
    /// The rota of `list`.
    pub fn new(list: Vec<Endpoint>) -> Endpoints {
        Endpoints {
            list,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint in turn, or `bad_input` if none was given.
    pub fn take_turn(&self) -> Result<&Endpoint, OpError> {
        if self.list.is_empty() {
            return Err(OpError {
                kind: ErrorKind::BadInput,
                message: "no etcd endpoint given".into(),
                cycle: Vec::new(),
            });
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.list.len();
        Ok(&self.list[turn])
    }

    /// The URLs joined by ", ", for a target's description.
    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.list.iter().map(Endpoint::url).collect();
        urls.join(", ")
    }
}

/// A running etcd cluster, reached through the v3 JSON gateway of its members.
#[derive(Debug)]
pub struct Etcd {
    /// The members' client URLs; workers take them in turn.
    endpoints: Endpoints,
    /// The bound on connecting and on each read or write.
    timeout: Duration,
}

impl Etcd {
    /// A target spreading workers over `endpoints` (at least one), each I/O bounded by
    /// `timeout` (`None`: 5 s).
    pub fn new(endpoints: Vec<Endpoint>, timeout: Option<Duration>) -> Etcd {
        Etcd {
            endpoints: Endpoints::new(endpoints),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
        }
    }
}

impl Target for Etcd {
    /// "etcd at http://A, http://B (v3 JSON gateway)".
    fn describe(&self) -> String {
        format!("etcd at {} (v3 JSON gateway)", self.endpoints.describe())
    }

    /// Opens a connection to the next endpoint in turn.
    fn connect(&self) -> Result<Box<dyn Connection>, OpError> {
        let endpoint = self.endpoints.take_turn()?.clone();
        let mut connection = EtcdConnection {
            endpoint,
            timeout: self.timeout,
            stream: None,
            request: Vec::new(),
        };
        connection
            .stream()
            .map(drop)
            .map_err(|e| e.into_op_error(&connection.endpoint))?;
        Ok(Box::new(connection))
    }
}

/// One worker's keep-alive connection to one member.
struct EtcdConnection {
    /// The member.
    endpoint: Endpoint,
    /// The bound on connecting and on each read or write.
    timeout: Duration,
    /// The open connection, if any (dropped after a failure or a `Connection: close`).
    stream: Option<BufReader<TcpStream>>,
    /// The request being written (kept to reuse its allocation).
    request: Vec<u8>,
}

impl EtcdConnection {
    /// The open connection, opening one if needed.
    fn stream(&mut self) -> Result<&mut BufReader<TcpStream>, HttpError> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.endpoint.addr, self.timeout)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(self.timeout))?;
            stream.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(BufReader::with_capacity(READ_BUFFER, stream));
        }
        Ok(self.stream.as_mut().expect("opened above"))
    }

    /// Sends `POST path` with the JSON `body` and reads the response.
    fn post(&mut self, path: &str, body: &str) -> Result<HttpResponse, HttpError> {
        self.request.clear();
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.endpoint.host,
            body.len()
        )?;
        let request = std::mem::take(&mut self.request);
        let result = self.stream().and_then(|stream| {
            stream.get_mut().write_all(&request)?;
            read_response(stream)
        });
        self.request = request;
        match &result {
            Ok(response) if !response.close => {}
            _ => self.stream = None,
        }
        result
    }
}

impl Connection for EtcdConnection {
    /// A write is a put; a read a serializable range get of the key alone.
    fn execute(&mut self, op: Op, key: &str, value: &str) -> Result<(), OpError> {
        let (path, body) = match op {
            Op::Write => (
                "/v3/kv/put",
                format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    base64(key.as_bytes()),
                    base64(value.as_bytes())
                ),
            ),
            Op::Read => (
                "/v3/kv/range",
                format!(
                    r#"{{"key":"{}","serializable":true}}"#,
                    base64(key.as_bytes())
                ),
            ),
            Op::Echo => {
                return Err(OpError {
                    kind: ErrorKind::BadInput,
                    message: "the etcd target does not echo".into(),
                    cycle: Vec::new(),
                });
            }
        };
        let response = self
            .post(path, &body)
            .map_err(|e| e.into_op_error(&self.endpoint))?;
        if response.status != 200 {
            return Err(gateway_error(response.status, &response.body));
        }
        if op == Op::Read {
            let range: RangeResponse =
                serde_json::from_slice(&response.body).map_err(|e| OpError {
                    kind: ErrorKind::BadInput,
                    message: format!("etcd's range answer is not the expected JSON: {e}"),
                    cycle: Vec::new(),
                })?;
            if range.kvs.is_empty() {
                return Err(OpError {
                    kind: ErrorKind::NotFound,
                    message: format!("etcd holds no {key:?}"),
                    cycle: Vec::new(),
                });
            }
        }
        Ok(())
    }
}

/// The part of a range answer the bench looks at.
#[derive(Deserialize)]
struct RangeResponse {
    /// The key-value pairs found (absent when none).
    #[serde(default)]
    kvs: Vec<serde::de::IgnoredAny>,
}

/// The gateway's error body.
#[derive(Deserialize, Default)]
struct GatewayError {
    /// The gRPC status code.
    #[serde(default)]
    code: i64,
    /// The explanation.
    #[serde(default)]
    message: String,
}

/// Maps a gateway error answer to the contract's kinds, by its gRPC code.
fn gateway_error(status: u16, body: &[u8]) -> OpError {
    let error: GatewayError = serde_json::from_slice(body).unwrap_or_default();
    let kind = match error.code {
        4 => ErrorKind::Timeout,
        14 => ErrorKind::Unreachable,
        3 => ErrorKind::BadInput,
        _ => ErrorKind::Aborted,
    };
    let explanation = if error.message.is_empty() {
        String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
    } else {
        error.message
    };
    OpError {
        kind,
        message: format!(
            "etcd answered HTTP {status} (gRPC code {}): {explanation}",
            error.code
        ),
        cycle: Vec::new(),
    }
}

/// What went wrong in an HTTP exchange.
#[derive(Debug, Error)]
pub enum HttpError {
    /// The socket failed (refused, reset, timed out).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection before the response was complete.
    #[error("the connection closed before the response was complete")]
    Truncated,
    /// The response is not HTTP/1.1 as this client understands it.
    #[error("malformed response: {0}")]
    Malformed(String),
}

impl HttpError {
    /// The contract's form of this failure on `endpoint`.
    fn into_op_error(self, endpoint: &Endpoint) -> OpError {
        let kind = match &self {
            HttpError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                ErrorKind::Timeout
            }
            HttpError::Io(_) | HttpError::Truncated => ErrorKind::Unreachable,
            HttpError::Malformed(_) => ErrorKind::BadInput,
        };
        OpError {
            kind,
            message: format!("etcd at {}: {self}", endpoint.host),
            cycle: Vec::new(),
        }
    }
}

/// An HTTP response, as far as the bench needs it.
#[derive(Debug, PartialEq, Eq)]
struct HttpResponse {
    /// The status code.
    status: u16,
    /// The body (de-chunked).
    body: Vec<u8>,
    /// True when the server will close the connection after this response.
    close: bool,
}

/// Reads one line (at most [`MAX_LINE`] bytes) without its line ending.
fn read_line(reader: &mut impl BufRead) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = (&mut *reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(HttpError::Truncated);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n as u64 == MAX_LINE {
            HttpError::Malformed("a line is too long".into())
        } else {
            HttpError::Truncated
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError::Malformed("a line is not UTF-8".into()))
}

/// Reads exactly `n` more body bytes into `body`, within [`MAX_BODY`].
fn read_body(reader: &mut impl BufRead, n: usize, body: &mut Vec<u8>) -> Result<(), HttpError> {
    if body.len().saturating_add(n) > MAX_BODY {
        return Err(HttpError::Malformed(format!(
            "a body over {MAX_BODY} bytes"
        )));
    }
    let start = body.len();
    body.resize(start + n, 0);
    reader.read_exact(&mut body[start..]).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HttpError::Truncated
        } else {
            HttpError::Io(e)
        }
    })
}

/// Reads one HTTP/1.x response: the status line, the headers, and a body framed by
/// `Content-Length`, by chunks, or (without either) by the end of the connection.
fn read_response(reader: &mut impl BufRead) -> Result<HttpResponse, HttpError> {
    let status_line = read_line(reader)?;
    let mut words = status_line.splitn(3, ' ');
    let version = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("status line {status_line:?}")));
    }
    let status: u16 = words
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line {status_line:?}")))?;
    let mut close = version == "HTTP/1.0";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("header {line:?}")));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                close = true;
            } else if value.contains("keep-alive") {
                close = false;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(reader)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| HttpError::Malformed(format!("chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(reader)?.is_empty() {}
                break;
            }
            read_body(reader, size, &mut body)?;
            if !read_line(reader)?.is_empty() {
                return Err(HttpError::Malformed("a chunk overruns its size".into()));
            }
        }
    } else if let Some(n) = length {
        read_body(reader, n, &mut body)?;
    } else {
        reader.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_BODY {
            return Err(HttpError::Malformed(format!(
                "a body over {MAX_BODY} bytes"
            )));
        }
        close = true;
    }
    Ok(HttpResponse {
        status,
        body,
        close,
    })
}

/// Standard base64 (RFC 4648, with padding), as the gateway expects for bytes fields.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// RFC 4648's test vectors.
    #[test]
    fn base64_matches_rfc_4648() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    /// A response framed by Content-Length, one framed by chunks (with an extension and a
    /// trailer), and one ending with the connection, read back to back from one stream.
    #[test]
    fn responses_are_framed_by_length_chunks_or_close() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}\
HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n\
HTTP/1.0 503 Service Unavailable\r\n\r\nbye";
        let mut reader = &wire[..];
        let first = read_response(&mut reader).unwrap();
        assert_eq!(
            (first.status, first.body.as_slice(), first.close),
            (200, &b"{}"[..], false)
        );
        let second = read_response(&mut reader).unwrap();
        assert_eq!(
            (second.status, second.body.as_slice()),
            (200, &b"abcde"[..])
        );
        let third = read_response(&mut reader).unwrap();
        assert_eq!(
            (third.status, third.body.as_slice(), third.close),
            (503, &b"bye"[..], true)
        );
    }

    /// Cut-off and malformed responses are errors, never panics.
    #[test]
    fn bad_responses_are_errors() {
        let truncated: [&[u8]; 4] = [
            b"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Le",
        ];
        for wire in truncated {
            let result = read_response(&mut &wire[..]);
            assert!(matches!(result, Err(HttpError::Truncated)), "{result:?}");
        }
        let malformed: [&[u8]; 5] = [
            b"SMTP 220 hello\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ];
        for wire in malformed {
            let result = read_response(&mut &wire[..]);
            assert!(matches!(result, Err(HttpError::Malformed(_))), "{result:?}");
        }
    }

    /// Only http://HOST:PORT is an endpoint.
    #[test]
    fn endpoints_parse_http_urls_only() {
        let endpoint: Endpoint = "http://127.0.0.1:2379/".parse().unwrap();
        assert_eq!(endpoint.addr, "127.0.0.1:2379".parse().unwrap());
        assert_eq!(endpoint.host, "127.0.0.1:2379");
        assert!("https://127.0.0.1:2379".parse::<Endpoint>().is_err());
        assert!("127.0.0.1:2379".parse::<Endpoint>().is_err());
        assert!("http://127.0.0.1:2379/v3".parse::<Endpoint>().is_err());
    }

    /// Against a stand-in gateway: a put and a read go over one keep-alive connection with the
    /// gateway's paths and base64 bodies; a read of a missing key is `not_found`; a gateway
    /// error maps by its gRPC code.
    #[test]
    fn operations_speak_the_v3_gateway() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            // One connection; answer four requests on it, recording what was asked.
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut seen = Vec::new();
            let answers = [
                "{\"header\":{}}".to_owned(),
                "{\"header\":{},\"kvs\":[{\"key\":\"Yg==\",\"value\":\"dg==\"}],\"count\":\"1\"}"
                    .to_owned(),
                "{\"header\":{}}".to_owned(),
            ];
            let mut read_request = || {
                let request_line = read_line(&mut reader).unwrap();
                let mut length = 0;
                loop {
                    let line = read_line(&mut reader).unwrap();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        length = v.parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                (request_line, String::from_utf8(body).unwrap())
            };
            for answer in &answers {
                seen.push(read_request());
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                    answer.len()
                )
                .unwrap();
            }
            read_request();
            let error = r#"{"error":"etcdserver: request timed out","code":4,"message":"etcdserver: request timed out"}"#;
            write!(
                writer,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{error}",
                error.len()
            )
            .unwrap();
            seen
        });
        let etcd = Etcd::new(vec![url.parse().unwrap()], Some(Duration::from_secs(5)));
        let mut connection = etcd.connect().unwrap();
        connection.execute(Op::Write, "b", "v").unwrap();
        connection.execute(Op::Read, "b", "").unwrap();
        let missing = connection.execute(Op::Read, "none", "").unwrap_err();
        assert_eq!(missing.kind, ErrorKind::NotFound);
        let timed_out = connection.execute(Op::Write, "b", "v").unwrap_err();
        assert_eq!(timed_out.kind, ErrorKind::Timeout, "{}", timed_out.message);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                (
                    "POST /v3/kv/put HTTP/1.1".to_owned(),
                    r#"{"key":"Yg==","value":"dg=="}"#.to_owned()
                ),
                (
                    "POST /v3/kv/range HTTP/1.1".to_owned(),
                    r#"{"key":"Yg==","serializable":true}"#.to_owned()
                ),
                (
                    "POST /v3/kv/range HTTP/1.1".to_owned(),
                    r#"{"key":"bm9uZQ==","serializable":true}"#.to_owned()
                ),
            ]
        );
    }
}
