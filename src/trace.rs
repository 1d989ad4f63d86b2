//! Packet traces: every datagram a process sends or receives, as a standard pcap file.
//!
//! Writing (`--trace FILE`): the network driver calls [`Tracer::record`] for each datagram its
//! endpoint emits (before fault injection, so the trace shows what a capture at the sender
//! would on a lossy network) and for each datagram it reads off the socket. That call only stamps the wall-clock time, copies the
//! bytes and queues them; a writer thread of the tracer's own synthesizes an IPv4 (or IPv6)
//! and UDP header carrying the real addresses and ports and appends the packet to the file
//! with the `pcap-file` crate, buffered, flushing whenever its queue runs empty. The file is
//! link type `RAW` (101) with nanosecond timestamps, so tcpdump, tshark and Wireshark open it
//! directly, and traces of several processes merge by time.
//!
//! The queue is bounded by [`MAX_QUEUED_BYTES`]: when the disk cannot keep up, datagrams are
//! left out of the trace and counted (never blocking the driver, never growing memory).
//!
//! Reading ([`parse`], [`read_file`]) is what `trace-dump` and the tests use: it accepts the
//! link types a capture of our traffic may carry (raw IP, Ethernet, Linux cooked, BSD
//! loopback), keeps the UDP datagrams, and reports garbage as a [`TraceError::Corrupt`] that
//! names the byte offset.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use log::warn;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapParser, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};
use thiserror::Error;

/// The most datagram bytes queued for the writer thread; past it datagrams are left out of
/// the trace (and counted) rather than slowing the driver or growing memory.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// The snapshot length written in the file header: larger than any UDP datagram with its
/// synthesized IP and UDP headers.
const SNAPLEN: u32 = 1 << 18;

/// Bytes of synthesized IPv4 + UDP header in front of each datagram.
const IPV4_UDP_LEN: usize = 20 + 8;

/// Which way a traced datagram went, seen from the tracing process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process sent it to the peer.
    Sent,
    /// The process received it from the peer.
    Received,
}

/// Why a trace could not be written or read.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The file could not be created, written or read.
    #[error("{path}: {source}")]
    Io {
        /// The trace file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The bytes are not a pcap file, or a record in it is damaged.
    #[error("{path}: offset {offset}: {reason}")]
    Corrupt {
        /// The trace file.
        path: PathBuf,
        /// Byte offset of the damaged header or record.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
}

/// A datagram queued for the writer thread.
struct Entry {
    /// When it was sent or received (wall clock, so traces of several processes merge).
    time: SystemTime,
    /// Sender.
    src: SocketAddr,
    /// Receiver.
    dst: SocketAddr,
    /// The UDP payload.
    payload: Vec<u8>,
}

/// What the writer thread is asked to do.
enum Job {
    /// Append a datagram.
    Write(Entry),
    /// Flush the file, then acknowledge.
    Flush(Sender<()>),
}

/// A cloneable handle on an open trace file. Recording is cheap and never blocks; the file is
/// written by the tracer's own thread, which stops (after flushing) when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Tracer {
    /// What every clone shares.
    inner: Arc<TracerInner>,
}

/// The state shared by the clones of a [`Tracer`].
struct TracerInner {
    /// Jobs for the writer thread.
    jobs: Sender<Job>,
    /// Datagram bytes queued and not yet written: the memory bound.
    queued_bytes: AtomicUsize,
    /// Datagrams left out because the queue was full.
    dropped: AtomicU64,
    /// The writer thread; joined on drop so the file is complete when the last clone goes.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The file, for messages.
    path: PathBuf,
}

impl std::fmt::Debug for Tracer {
    /// Shows the file only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Tracer {
    /// Creates (truncates) the trace file at `path` and starts the writer thread, which
    /// writes the pcap header first.
    pub fn create(path: &Path) -> Result<Tracer, TraceError> {
        let io_error = |source| TraceError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::create(path).map_err(io_error)?;
        let (jobs, queue) = crossbeam_channel::unbounded();
        let inner = Arc::new(TracerInner {
            jobs,
            queued_bytes: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            thread: Mutex::new(None),
            path: path.to_owned(),
        });
        let shared = Arc::downgrade(&inner);
        let thread_path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || write_loop(file, queue, shared, thread_path))
            .map_err(io_error)?;
        *inner.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(Tracer { inner })
    }

    /// Records one datagram of `payload` between this process (at address `local`) and
    /// `peer`, in `direction`, stamped now. Never blocks: if the writer is
    /// [`MAX_QUEUED_BYTES`] behind, the datagram is counted as dropped instead.
    pub fn record(
        &self,
        direction: Direction,
        local: SocketAddr,
        peer: SocketAddr,
        payload: &[u8],
    ) {
        let inner = &self.inner;
        let size = payload.len();
        if inner.queued_bytes.fetch_add(size, Ordering::Relaxed) + size > MAX_QUEUED_BYTES {
            inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (src, dst) = match direction {
            Direction::Sent => (local, peer),
            Direction::Received => (peer, local),
        };
        let entry = Entry {
            time: SystemTime::now(),
            src,
            dst,
            payload: payload.to_vec(),
        };
        if inner.jobs.send(Job::Write(entry)).is_err() {
            inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (at most `timeout`) until everything recorded so far is in the file. Programs
    /// call it before they exit, since `std::process::exit` runs no destructors.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.inner.jobs.send(Job::Flush(done)).is_ok() && wait.recv_timeout(timeout).is_ok()
    }

    /// Datagrams left out of the trace so far because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The trace file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Drop for TracerInner {
    /// The last clone is gone: let the writer drain its queue and stop, and wait for it.
    fn drop(&mut self) {
        let (closed, _) = crossbeam_channel::bounded(0);
        // Replacing our sender with a dead one disconnects the writer's queue once drained.
        drop(std::mem::replace(&mut self.jobs, closed));
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The writer thread: appends queued datagrams, flushes whenever the queue runs dry, and
/// stops when every [`Tracer`] clone is gone. `shared` gives back the queue accounting.
fn write_loop(
    file: File,
    queue: Receiver<Job>,
    shared: std::sync::Weak<TracerInner>,
    path: PathBuf,
) {
    let mut output = Output(Rc::new(RefCell::new(BufWriter::with_capacity(
        1 << 16,
        file,
    ))));
    let header = PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: SNAPLEN,
        datalink: DataLink::RAW,
        ts_resolution: TsResolution::NanoSecond,
        endianness: Endianness::Little,
    };
    let mut failed = false;
    let mut writer = match PcapWriter::with_header(output.clone(), header) {
        Ok(writer) => Some(writer),
        Err(e) => {
            warn!("trace {}: cannot write: {e}; tracing stops", path.display());
            failed = true;
            None
        }
    };
    let mut packet = Vec::with_capacity(2048);
    let mut written_bytes = 0usize;
    while let Ok(job) = queue.recv() {
        let mut next = Some(job);
        while let Some(job) = next {
            match job {
                Job::Write(entry) => {
                    written_bytes += entry.payload.len();
                    if let Some(writer) = writer.as_mut().filter(|_| !failed)
                        && let Err(e) = write_entry(writer, &entry, &mut packet)
                    {
                        warn!("trace {}: cannot write: {e}; tracing stops", path.display());
                        failed = true;
                    }
                }
                Job::Flush(done) => {
                    let _ = output.flush();
                    let _ = done.send(());
                }
            }
            next = queue.try_recv().ok();
        }
        if let Some(inner) = shared.upgrade() {
            inner
                .queued_bytes
                .fetch_sub(written_bytes, Ordering::Relaxed);
        }
        written_bytes = 0;
        if !failed && let Err(e) = output.flush() {
            warn!("trace {}: cannot write: {e}; tracing stops", path.display());
            failed = true;
        }
    }
    let _ = output.flush();
}

/// The trace file's buffered writer, shared between the [`PcapWriter`] that formats packets
/// and the writer thread that flushes it (`PcapWriter` offers no access to what it wraps).
/// Both live on the writer thread only.
#[derive(Clone)]
struct Output(Rc<RefCell<BufWriter<File>>>);

impl Write for Output {
    /// Appends to the buffer.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(bytes)
    }

    /// Flushes the buffer to the OS.
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Appends `entry` as one packet with synthesized IP and UDP headers, built in `packet`.
fn write_entry(
    writer: &mut PcapWriter<Output>,
    entry: &Entry,
    packet: &mut Vec<u8>,
) -> Result<(), pcap_file::PcapError> {
    packet.clear();
    synthesize(entry.src, entry.dst, &entry.payload, packet);
    let timestamp = entry.time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let len = u32::try_from(packet.len()).unwrap_or(u32::MAX);
    writer.write_packet(&PcapPacket::new(timestamp, len, packet))?;
    Ok(())
}

/// Builds an IP packet carrying a UDP datagram of `payload` from `src` to `dst` into `out`:
/// IPv4 when both addresses are IPv4, else IPv6 (IPv4 addresses mapped).
pub fn synthesize(src: SocketAddr, dst: SocketAddr, payload: &[u8], out: &mut Vec<u8>) {
    let udp_len = (8 + payload.len()).min(usize::from(u16::MAX)) as u16;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (IPV4_UDP_LEN + payload.len()).min(usize::from(u16::MAX)) as u16;
            let start = out.len();
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            // Identification 0 with don't-fragment set: a datagram that was never split.
            out.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let checksum = internet_checksum(&out[start..start + 20], 0);
            out[start + 10..start + 12].copy_from_slice(&checksum.to_be_bytes());
            push_udp(out, src.port(), dst.port(), udp_len, 0);
            out.extend_from_slice(payload);
        }
        (s, d) => {
            let s = to_v6(s);
            let d = to_v6(d);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&udp_len.to_be_bytes());
            out.extend_from_slice(&[17, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            // The UDP checksum is mandatory over IPv6: pseudo-header, UDP header, payload.
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            let mut header = Vec::with_capacity(8);
            push_udp(&mut header, src.port(), dst.port(), udp_len, 0);
            let sum = ones_sum(payload, ones_sum(&header, ones_sum(&pseudo, 0)));
            let checksum = match !fold(sum) {
                0 => 0xffff,
                c => c,
            };
            push_udp(out, src.port(), dst.port(), udp_len, checksum);
            out.extend_from_slice(payload);
        }
    }
}

/// An IP address as IPv6 (IPv4 ones mapped).
fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends a UDP header.
fn push_udp(out: &mut Vec<u8>, src: u16, dst: u16, len: u16, checksum: u16) {
    out.extend_from_slice(&src.to_be_bytes());
    out.extend_from_slice(&dst.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&checksum.to_be_bytes());
}

/// Adds `bytes` as big-endian 16-bit words to the running one's-complement sum `sum`.
fn ones_sum(bytes: &[u8], mut sum: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for word in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([word[0], word[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Folds a running sum to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `bytes` (RFC 1071), starting from `sum`.
fn internet_checksum(bytes: &[u8], sum: u32) -> u16 {
    !fold(ones_sum(bytes, sum))
}

/// One UDP datagram read from a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// When it was recorded (since the Unix epoch).
    pub time: Duration,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The UDP payload.
    pub payload: Vec<u8>,
    /// Byte offset of the packet's record header in the file.
    pub offset: u64,
}

/// The UDP datagrams of one trace, in file order.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The datagrams.
    pub records: Vec<Record>,
    /// Packets that were not UDP over IP (other protocols, IP fragments), skipped.
    pub skipped: usize,
}

/// Reads and parses the trace file at `path`.
pub fn read_file(path: &Path) -> Result<Trace, TraceError> {
    let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes).map_err(|(offset, reason)| TraceError::Corrupt {
        path: path.to_owned(),
        offset,
        reason,
    })
}

/// Parses the bytes of a pcap file into its UDP datagrams. On damage, returns the byte
/// offset of the bad header or record and what is wrong there. Never panics.
pub fn parse(bytes: &[u8]) -> Result<Trace, (u64, String)> {
    let (mut rest, parser) =
        PcapParser::new(bytes).map_err(|e| (0, format!("not a pcap file: {}", pcap_reason(&e))))?;
    let datalink = parser.header().datalink;
    let mut trace = Trace::default();
    while !rest.is_empty() {
        let offset = (bytes.len() - rest.len()) as u64;
        let (next, packet) = parser
            .next_packet(rest)
            .map_err(|e| (offset, format!("bad packet record: {}", pcap_reason(&e))))?;
        rest = next;
        let ip = match link_payload(datalink, &packet.data) {
            Ok(Some(ip)) => ip,
            Ok(None) => {
                trace.skipped += 1;
                continue;
            }
            Err(reason) => return Err((offset, reason)),
        };
        match udp_datagram(ip) {
            Ok(Some((src, dst, payload))) => trace.records.push(Record {
                time: packet.timestamp,
                src,
                dst,
                payload: payload.to_vec(),
                offset,
            }),
            Ok(None) => trace.skipped += 1,
            Err(reason) => return Err((offset, reason)),
        }
    }
    Ok(trace)
}

/// A pcap-file error in words a user can act on.
fn pcap_reason(error: &pcap_file::PcapError) -> String {
    match error {
        pcap_file::PcapError::IncompleteBuffer => "truncated (the file ends mid-record)".into(),
        other => other.to_string(),
    }
}

/// Strips the link-layer header of `datalink` from `frame`: the IP packet, `None` for a
/// frame that carries no IP, or why the frame is damaged.
fn link_payload(datalink: DataLink, frame: &[u8]) -> Result<Option<&[u8]>, String> {
    let (skip, ip) = match datalink {
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => (0, true),
        DataLink::ETHERNET => {
            let ethertype = frame.get(12..14).ok_or("truncated Ethernet header")?;
            (14, matches!(ethertype, [0x08, 0x00] | [0x86, 0xdd]))
        }
        DataLink::LINUX_SLL => {
            let protocol = frame.get(14..16).ok_or("truncated Linux cooked header")?;
            (16, matches!(protocol, [0x08, 0x00] | [0x86, 0xdd]))
        }
        DataLink::NULL | DataLink::LOOP => (4, true),
        other => return Err(format!("link type {other:?} is not supported")),
    };
    if !ip {
        return Ok(None);
    }
    frame
        .get(skip..)
        .map(Some)
        .ok_or_else(|| "truncated link header".into())
}

/// A UDP datagram found in an IP packet: source, destination, payload.
type Udp<'a> = (SocketAddr, SocketAddr, &'a [u8]);

/// The UDP datagram in IP packet `ip`: (source, destination, payload), `None` when the
/// packet is not UDP or is an IP fragment, or why the headers are damaged.
fn udp_datagram(ip: &[u8]) -> Result<Option<Udp<'_>>, String> {
    let Some(&first) = ip.first() else {
        return Err("empty IP packet".into());
    };
    let (src_ip, dst_ip, udp): (IpAddr, IpAddr, &[u8]) = match first >> 4 {
        4 => {
            let header_len = usize::from(first & 0x0f) * 4;
            if header_len < 20 || ip.len() < header_len {
                return Err("truncated IPv4 header".into());
            }
            let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if ip[9] != 17 || fragmented {
                return Ok(None);
            }
            let src: [u8; 4] = ip[12..16].try_into().map_err(|_| "bad IPv4 source")?;
            let dst: [u8; 4] = ip[16..20].try_into().map_err(|_| "bad IPv4 destination")?;
            (src.into(), dst.into(), &ip[header_len..])
        }
        6 => {
            if ip.len() < 40 {
                return Err("truncated IPv6 header".into());
            }
            if ip[6] != 17 {
                return Ok(None);
            }
            let src: [u8; 16] = ip[8..24].try_into().map_err(|_| "bad IPv6 source")?;
            let dst: [u8; 16] = ip[24..40].try_into().map_err(|_| "bad IPv6 destination")?;
            (src.into(), dst.into(), &ip[40..])
        }
        version => return Err(format!("IP version {version} is not 4 or 6")),
    };
    if udp.len() < 8 {
        return Err("truncated UDP header".into());
    }
    let src_port = u16::from_be_bytes([udp[0], udp[1]]);
    let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 || udp_len > udp.len() {
        return Err(format!(
            "UDP length {udp_len} does not fit the {} bytes captured",
            udp.len()
        ));
    }
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    Ok(Some((
        SocketAddr::new(unmap(src_ip), src_port),
        SocketAddr::new(unmap(dst_ip), dst_port),
        &udp[8..udp_len],
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file path unique to this test process and `name`.
    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("trireme-trace-{}-{name}.pcap", std::process::id()))
    }

    #[test]
    fn recorded_datagrams_read_back_with_addresses_direction_and_order() {
        let path = scratch("roundtrip");
        let me: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let peer: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        let tracer = Tracer::create(&path).unwrap();
        tracer.record(Direction::Sent, me, peer, b"first");
        tracer.record(Direction::Received, me, peer, b"second");
        assert!(tracer.flush(Duration::from_secs(5)));
        drop(tracer);
        let trace = read_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(trace.records.len(), 2);
        let (a, b) = (&trace.records[0], &trace.records[1]);
        assert_eq!(
            (a.src, a.dst, a.payload.as_slice()),
            (me, peer, &b"first"[..])
        );
        assert_eq!(
            (b.src, b.dst, b.payload.as_slice()),
            (peer, me, &b"second"[..])
        );
        assert!(a.time <= b.time);
        assert_eq!(a.offset, 24);
    }

    #[test]
    fn ipv4_checksum_verifies_and_ipv6_round_trips() {
        let mut out = Vec::new();
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2".parse().unwrap();
        synthesize(a, b, b"abc", &mut out);
        assert_eq!(internet_checksum(&out[..20], 0), 0, "header sums to zero");
        let a6: SocketAddr = "[2001:db8::1]:7".parse().unwrap();
        let b6: SocketAddr = "[2001:db8::2]:8".parse().unwrap();
        out.clear();
        synthesize(a6, b6, b"hello", &mut out);
        let (src, dst, payload) = udp_datagram(&out).unwrap().unwrap();
        assert_eq!((src, dst, payload), (a6, b6, &b"hello"[..]));
        // Pseudo-header + UDP header + payload, checksum included, sums to all ones.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&out[8..40]);
        pseudo.extend_from_slice(&13u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(fold(ones_sum(&out[40..], ones_sum(&pseudo, 0))), 0xffff);
    }

    #[test]
    fn garbage_is_an_error_naming_the_offset() {
        let path = scratch("garbage");
        let tracer = Tracer::create(&path).unwrap();
        let me: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        tracer.record(Direction::Sent, me, me, b"ok");
        drop(tracer);
        let mut bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let good_len = bytes.len() as u64;
        assert!(parse(&bytes).is_ok());
        // A second record header claiming more bytes than the file has.
        bytes.extend_from_slice(&[0u8; 8]);
        bytes.extend_from_slice(&100u32.to_le_bytes());
        bytes.extend_from_slice(&100u32.to_le_bytes());
        bytes.extend_from_slice(&[0x45; 10]);
        let (offset, reason) = parse(&bytes).unwrap_err();
        assert_eq!(offset, good_len);
        assert!(reason.contains("truncated"), "{reason}");
        let (offset, reason) = parse(b"definitely not a pcap file at all").unwrap_err();
        assert_eq!(offset, 0);
        assert!(reason.contains("not a pcap"), "{reason}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_growing() {
        let path = scratch("bounded");
        let tracer = Tracer::create(&path).unwrap();
        let me: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        // Pretend the writer is a whole budget behind.
        tracer
            .inner
            .queued_bytes
            .fetch_add(MAX_QUEUED_BYTES, Ordering::Relaxed);
        tracer.record(Direction::Sent, me, me, b"lost");
        assert_eq!(tracer.dropped(), 1);
        tracer
            .inner
            .queued_bytes
            .fetch_sub(MAX_QUEUED_BYTES, Ordering::Relaxed);
        tracer.record(Direction::Sent, me, me, b"kept");
        drop(tracer);
        let trace = read_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(trace.records.len(), 1);
        assert_eq!(trace.records[0].payload, b"kept");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_after_a_valid_header(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let mut bytes = vec![0x4d, 0x3c, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            bytes.extend_from_slice(&SNAPLEN.to_le_bytes());
            bytes.extend_from_slice(&101u32.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = parse(&bytes);
        }
    }
}
