//! Packet traces: every datagram a process sends or receives, as a standard pcap file.
//!
//! Writing (`--trace FILE`): the network driver calls [`Tracer::record`] for each datagram its
//! endpoint emits (before fault injection, so the trace shows what a capture at the sender
//! would on a lossy network) and for each datagram it reads off the socket. That call only
//! stamps the wall-clock time, copies the bytes and queues them; a writer thread of the
//! tracer's own synthesizes a link header, an IPv4 (or IPv6) header and a UDP header carrying
//! the real addresses and ports, and appends the packet to the file (formatted by the
//! `pcap-file` crate). The writer wakes every few milliseconds (never once per datagram) to
//! write out and flush what was queued. Each record reaches the file in one write, so a
//! process killed mid-run leaves whole records behind.
//!
//! The link type is Linux cooked capture (`LINUX_SLL`, 113), whose packet type says whether
//! the process sent (4, "outgoing") or received (0, "to us") the datagram, as a capture on the
//! process's host would; timestamps are in nanoseconds. tcpdump, tshark and Wireshark open the
//! file as it is, and traces of several processes merge by time.
//!
//! The queue is bounded by [`MAX_QUEUED_BYTES`]: when the disk cannot keep up, datagrams are
//! left out of the trace and counted (never blocking the driver, never growing memory).
//!
//! Reading ([`parse`], [`read_file`]) is what `trace-dump` and the tests use: it accepts the
//! link types a capture of our traffic may carry (Linux cooked v1 and v2, raw IP, Ethernet,
//! BSD loopback), keeps the UDP datagrams, skips other packets, and reports damage as a
//! [`TraceError::Corrupt`] that names the byte offset. A file that ends in the middle of its
//! last record (a writer killed mid-write) keeps the records before it and says where it
//! was cut ([`Trace::truncated_at`]), as tcpdump does.

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

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use log::warn;
use pcap_file::PcapError;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapParser, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};
use thiserror::Error;

/// The most datagram bytes queued for the writer thread; past it datagrams are left out of
/// the trace (and counted) rather than slowing the driver or growing memory.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// The snapshot length written in the file header: larger than any UDP datagram with its
/// synthesized link, IP and UDP headers.
const SNAPLEN: u32 = 1 << 18;

/// The largest record the reader accepts, whatever the file header claims: no link type we
/// read carries more, and it bounds what one record header can make the reader trust.
const MAX_RECORD: u32 = 1 << 20;

/// Linux cooked-capture packet type of a datagram the process received.
const SLL_HOST: u16 = 0;
/// Linux cooked-capture packet type of a datagram the process sent.
const SLL_OUTGOING: u16 = 4;
/// The ARPHRD type written in cooked headers: "no link-layer header" (`ARPHRD_NONE`).
const ARPHRD_NONE: u16 = 0xfffe;

/// How often the writer thread wakes to write out what was queued (and flush it).
const WRITER_TICK: Duration = Duration::from_millis(5);

/// The queue cost of one datagram besides its bytes: the queued job itself.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Job>();

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

/// One traced datagram: what the writer thread is queued, and what [`write_file`] takes.
#[derive(Clone, Debug)]
pub struct Entry {
    /// When it was sent or received (wall clock, so traces of several processes merge).
    pub time: SystemTime,
    /// Whether the tracing process sent or received it.
    pub direction: Direction,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// Writes `entries`, in order, as a trace file at `path`, in the format `--trace` writes
/// (so `trace-dump` reads it), at once and without a writer thread: for traces made after
/// the fact, such as a simulated run's.
pub fn write_file(path: &Path, entries: &[Entry]) -> Result<(), TraceError> {
    let io_error = |source| TraceError::Io {
        path: path.to_owned(),
        source,
    };
    let file = BufWriter::new(File::create(path).map_err(io_error)?);
    let mut writer =
        PcapWriter::with_header(file, file_header()).map_err(|e| io_error(io::Error::other(e)))?;
    let mut packet = Vec::with_capacity(2048);
    for entry in entries {
        write_entry(&mut writer, entry, &mut packet).map_err(|e| io_error(io::Error::other(e)))?;
    }
    let mut file = writer.into_writer();
    file.flush().map_err(io_error)
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
    /// Bytes queued and not yet written (datagrams plus [`ENTRY_OVERHEAD`] each): the memory
    /// bound. Shared with the writer thread, which holds no other reference to this state.
    queued_bytes: Arc<AtomicUsize>,
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
    /// Creates (truncates) the trace file at `path`, writes the pcap file header, and starts
    /// the writer thread.
    pub fn create(path: &Path) -> Result<Tracer, TraceError> {
        let io_error = |source| TraceError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::create(path).map_err(io_error)?;
        file_header()
            .write_to(&mut file)
            .map_err(|e| io_error(io::Error::other(e)))?;
        let (jobs, queue) = crossbeam_channel::unbounded();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writer_queued = Arc::clone(&queued_bytes);
        let thread_path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || write_loop(file, queue, writer_queued, thread_path))
            .map_err(io_error)?;
        Ok(Tracer {
            inner: Arc::new(TracerInner {
                jobs,
                queued_bytes,
                dropped: AtomicU64::new(0),
                thread: Mutex::new(Some(thread)),
                path: path.to_owned(),
            }),
        })
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
        let size = payload.len() + ENTRY_OVERHEAD;
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
            direction,
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

/// The pcap file header of every trace.
fn file_header() -> PcapHeader {
    PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: SNAPLEN,
        datalink: DataLink::LINUX_SLL,
        ts_resolution: TsResolution::NanoSecond,
        endianness: Endianness::Little,
    }
}

/// The writer thread: appends queued datagrams to `file` (whose header is written), flushes
/// whenever the queue runs dry, and stops when every [`Tracer`] clone is gone. Gives back
/// each written datagram's cost in `queued_bytes`.
fn write_loop(file: File, queue: Receiver<Job>, queued_bytes: Arc<AtomicUsize>, path: PathBuf) {
    let mut file = BufWriter::with_capacity(1 << 16, file);
    // pcap-file formats each record into `staging`, which then goes to the file in one
    // write, so the file never holds half a record. Its copy of the file header is dropped:
    // `Tracer::create` wrote the header already.
    let staging = Staging::default();
    let mut writer = match PcapWriter::with_header(staging.clone(), file_header()) {
        Ok(writer) => Some(writer),
        Err(e) => {
            warn!(
                "trace {}: cannot format records: {e}; tracing stops",
                path.display()
            );
            None
        }
    };
    staging.clear();
    let mut packet = Vec::with_capacity(2048);
    // The writer wakes on a tick and drains the queue, rather than blocking on it: a
    // receiver blocked on the channel would be woken by every datagram the driver records.
    loop {
        let mut disconnected = false;
        loop {
            let job = match queue.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            };
            match job {
                Job::Write(entry) => {
                    let cost = entry.payload.len() + ENTRY_OVERHEAD;
                    if let Some(pcap) = writer.as_mut() {
                        let written = write_entry(pcap, &entry, &mut packet)
                            .map_err(io::Error::other)
                            .and_then(|()| staging.write_to(&mut file));
                        if let Err(e) = written {
                            warn!("trace {}: cannot write: {e}; tracing stops", path.display());
                            writer = None;
                        }
                    }
                    queued_bytes.fetch_sub(cost, Ordering::Relaxed);
                }
                Job::Flush(done) => {
                    let _ = file.flush();
                    let _ = done.send(());
                }
            }
        }
        if writer.is_some()
            && let Err(e) = file.flush()
        {
            warn!("trace {}: cannot write: {e}; tracing stops", path.display());
            writer = None;
        }
        if disconnected {
            return;
        }
        std::thread::sleep(WRITER_TICK);
    }
}

/// Where [`PcapWriter`] formats one record before it is written out whole (`PcapWriter`
/// offers no access to what it wraps, so the buffer is shared). Lives on the writer thread.
#[derive(Clone, Default)]
struct Staging(Rc<RefCell<Vec<u8>>>);

impl Staging {
    /// Discards the bytes formatted so far.
    fn clear(&self) {
        self.0.borrow_mut().clear();
    }

    /// Writes the bytes formatted so far to `out` in one write, and empties the buffer.
    fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut bytes = self.0.borrow_mut();
        let written = out.write_all(&bytes);
        bytes.clear();
        written
    }
}

impl Write for Staging {
    /// Appends to the buffer.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    /// Nothing to do: the writer thread writes the buffer out.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Formats `entry` as one record (cooked header with its direction, then synthesized IP and
/// UDP headers, then the datagram), built in `packet`.
fn write_entry<W: Write>(
    writer: &mut PcapWriter<W>,
    entry: &Entry,
    packet: &mut Vec<u8>,
) -> Result<(), PcapError> {
    packet.clear();
    let packet_type = match entry.direction {
        Direction::Sent => SLL_OUTGOING,
        Direction::Received => SLL_HOST,
    };
    let protocol: u16 = match (entry.src.ip(), entry.dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => 0x0800,
        _ => 0x86dd,
    };
    packet.extend_from_slice(&packet_type.to_be_bytes());
    packet.extend_from_slice(&ARPHRD_NONE.to_be_bytes());
    packet.extend_from_slice(&[0; 10]); // no link-layer address: length 0, 8 bytes unused
    packet.extend_from_slice(&protocol.to_be_bytes());
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
    /// Whether the tracing process sent or received it, when the file says (our traces
    /// and Linux cooked captures do).
    pub direction: Option<Direction>,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The UDP payload (as much of it as was captured).
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
    /// Where the file ends in the middle of a record (its writer was killed mid-write), if
    /// it does: the byte offset of that last, partial record.
    pub truncated_at: Option<u64>,
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
    let (mut rest, parser) = PcapParser::new(bytes).map_err(|e| match e {
        PcapError::IncompleteBuffer => (
            0,
            format!(
                "not a pcap file: {} bytes, shorter than a pcap file header (24)",
                bytes.len()
            ),
        ),
        other => (0, format!("not a pcap file: {other}")),
    })?;
    let header = parser.header();
    let mut trace = Trace::default();
    while !rest.is_empty() {
        let offset = (bytes.len() - rest.len()) as u64;
        let (next, packet) = match parser.next_raw_packet(rest) {
            Ok(parsed) => parsed,
            Err(PcapError::IncompleteBuffer) => {
                // The file ends inside this record, unless its header is simply damaged.
                if let Some(len) = claimed_len(rest, header.endianness)
                    && len > MAX_RECORD
                {
                    return Err((offset, oversized(len)));
                }
                trace.truncated_at = Some(offset);
                break;
            }
            Err(e) => return Err((offset, format!("bad packet record: {e}"))),
        };
        rest = next;
        if packet.incl_len > MAX_RECORD {
            return Err((offset, oversized(packet.incl_len)));
        }
        let nanos = match header.ts_resolution {
            TsResolution::NanoSecond => packet.ts_frac,
            TsResolution::MicroSecond => packet.ts_frac.saturating_mul(1000),
        };
        if nanos >= 1_000_000_000 {
            return Err((
                offset,
                format!("bad packet record: {nanos} ns is not a fraction of a second"),
            ));
        }
        let time = Duration::new(u64::from(packet.ts_sec), nanos);
        let (direction, ip) = match link_payload(header.datalink, &packet.data) {
            Ok(Some(found)) => found,
            Ok(None) => {
                trace.skipped += 1;
                continue;
            }
            Err(reason) => return Err((offset, reason)),
        };
        match udp_datagram(ip) {
            Ok(Some((src, dst, payload))) => trace.records.push(Record {
                time,
                direction,
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

/// The captured length a record header at the start of `rest` claims, if the header is
/// there.
fn claimed_len(rest: &[u8], endianness: Endianness) -> Option<u32> {
    let bytes: [u8; 4] = rest.get(8..12)?.try_into().ok()?;
    Some(match endianness {
        Endianness::Big => u32::from_be_bytes(bytes),
        Endianness::Little => u32::from_le_bytes(bytes),
    })
}

/// The error for a record header claiming `len` captured bytes, more than any packet.
fn oversized(len: u32) -> String {
    format!("bad packet record: {len} bytes captured, more than any packet ({MAX_RECORD})")
}

/// An IP packet found in a link-layer frame, with the direction the frame records (if any).
type Framed<'a> = (Option<Direction>, &'a [u8]);

/// Strips the link-layer header of `datalink` from `frame`: the direction it records (if
/// any) and the IP packet; `None` for a frame that carries no IP; or why the frame is damaged.
fn link_payload(datalink: DataLink, frame: &[u8]) -> Result<Option<Framed<'_>>, String> {
    /// The direction a Linux cooked packet type means.
    fn cooked(packet_type: u16) -> Option<Direction> {
        match packet_type {
            SLL_HOST => Some(Direction::Received),
            SLL_OUTGOING => Some(Direction::Sent),
            _ => None,
        }
    }
    let is_ip = |ethertype: &[u8]| matches!(ethertype, [0x08, 0x00] | [0x86, 0xdd]);
    let (skip, direction, ip) = match datalink {
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => (0, None, true),
        DataLink::ETHERNET => {
            let ethertype = frame.get(12..14).ok_or("truncated Ethernet header")?;
            (14, None, is_ip(ethertype))
        }
        DataLink::LINUX_SLL => {
            let header = frame.get(..16).ok_or("truncated Linux cooked header")?;
            let packet_type = u16::from_be_bytes([header[0], header[1]]);
            (16, cooked(packet_type), is_ip(&header[14..16]))
        }
        DataLink::LINUX_SLL2 => {
            let header = frame.get(..20).ok_or("truncated Linux cooked v2 header")?;
            (20, cooked(u16::from(header[10])), is_ip(&header[0..2]))
        }
        DataLink::NULL | DataLink::LOOP => {
            // The family is in host byte order; look at the IP version nibble instead.
            let version = frame.get(4).map(|b| b >> 4);
            (4, None, matches!(version, Some(4 | 6)))
        }
        other => return Err(format!("link type {other:?} is not supported")),
    };
    if !ip {
        return Ok(None);
    }
    let packet = frame.get(skip..).ok_or("truncated link header")?;
    Ok(Some((direction, packet)))
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
    if udp_len < 8 {
        return Err(format!("UDP length {udp_len} is shorter than its header"));
    }
    // A capture cut short by its snapshot length keeps what it has.
    let udp_len = udp_len.min(udp.len());
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

    /// What is recorded reads back whole: addresses, direction, order, offsets.
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
        assert_eq!(a.direction, Some(Direction::Sent));
        assert_eq!(b.direction, Some(Direction::Received));
        assert!(a.time <= b.time);
        assert_eq!(a.offset, 24);
        assert_eq!(trace.truncated_at, None);
    }

    /// The file header is on disk as soon as the tracer exists, before any datagram.
    #[test]
    fn an_empty_trace_is_a_valid_pcap() {
        let path = scratch("empty");
        let tracer = Tracer::create(&path).unwrap();
        let trace = read_file(&path).unwrap();
        drop(tracer);
        std::fs::remove_file(&path).unwrap();
        assert!(trace.records.is_empty());
    }

    /// The synthesized IPv4 header checksum verifies; IPv6 round-trips with a valid UDP
    /// checksum.
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

    /// A file cut inside its last record keeps the records before it and says where; a
    /// damaged record header or a file that is no pcap is an error naming the offset.
    #[test]
    fn damage_is_reported_with_its_offset() {
        let path = scratch("garbage");
        let tracer = Tracer::create(&path).unwrap();
        let me: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        tracer.record(Direction::Sent, me, me, b"ok");
        drop(tracer);
        let mut bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let good_len = bytes.len() as u64;
        // A second record header claiming more bytes than the file has: a cut tail.
        let mut cut = bytes.clone();
        cut.extend_from_slice(&[0u8; 8]);
        cut.extend_from_slice(&100u32.to_le_bytes());
        cut.extend_from_slice(&100u32.to_le_bytes());
        cut.extend_from_slice(&[0x45; 10]);
        let trace = parse(&cut).unwrap();
        assert_eq!(trace.records.len(), 1);
        assert_eq!(trace.truncated_at, Some(good_len));
        // A record header claiming an impossible size: damage.
        bytes.extend_from_slice(&[0u8; 8]);
        bytes.extend_from_slice(&(MAX_RECORD + 1).to_le_bytes());
        bytes.extend_from_slice(&(MAX_RECORD + 1).to_le_bytes());
        bytes.extend(std::iter::repeat_n(0u8, MAX_RECORD as usize + 1));
        let (offset, reason) = parse(&bytes).unwrap_err();
        assert_eq!(offset, good_len);
        assert!(reason.contains("more than any packet"), "{reason}");
        let (offset, reason) = parse(b"definitely not a pcap file at all").unwrap_err();
        assert_eq!(offset, 0);
        assert!(reason.contains("not a pcap"), "{reason}");
        let (_, reason) = parse(b"short").unwrap_err();
        assert!(
            reason.contains("shorter than a pcap file header"),
            "{reason}"
        );
    }

    /// Past the queue budget datagrams are counted and left out, not queued.
    #[test]
    fn a_full_queue_drops_and_counts_instead_of_growing() {
        let path = scratch("bounded");
        let tracer = Tracer::create(&path).unwrap();
        let me: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        // Pretend the writer is a whole budget behind.
        let queued = &tracer.inner.queued_bytes;
        queued.fetch_add(MAX_QUEUED_BYTES, Ordering::Relaxed);
        tracer.record(Direction::Sent, me, me, b"lost");
        assert_eq!(tracer.dropped(), 1);
        queued.fetch_sub(MAX_QUEUED_BYTES, Ordering::Relaxed);
        tracer.record(Direction::Sent, me, me, b"kept");
        assert!(tracer.flush(Duration::from_secs(5)));
        assert_eq!(
            queued.load(Ordering::Relaxed),
            0,
            "every written datagram paid back"
        );
        drop(tracer);
        let trace = read_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(trace.records.len(), 1);
        assert_eq!(trace.records[0].payload, b"kept");
    }

    /// Dropping the last clone while the writer is busy never loses records (the writer
    /// holds no reference to the shared state, so it can never be the one to join itself).
    #[test]
    fn dropping_the_last_clone_always_leaves_a_complete_file() {
        let me: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        for i in 0..200 {
            let path = scratch(&format!("drop-{i}"));
            let tracer = Tracer::create(&path).unwrap();
            for _ in 0..5 {
                tracer.record(Direction::Sent, me, me, b"x");
            }
            drop(tracer);
            let trace = read_file(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(trace.records.len(), 5, "iteration {i}");
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the reader.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse(&bytes);
        }

        /// Arbitrary records after a valid file header never panic the reader, whatever the
        /// link type.
        #[test]
        fn parse_never_panics_after_a_valid_header(
            link in proptest::sample::select(vec![1u32, 0, 101, 113, 276, 228, 229]),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
        ) {
            let mut bytes = vec![0x4d, 0x3c, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            bytes.extend_from_slice(&SNAPLEN.to_le_bytes());
            bytes.extend_from_slice(&link.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = parse(&bytes);
        }
    }
}
