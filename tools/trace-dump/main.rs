//! `trace-dump`: reads trace files written with `--trace`, merges them by time and prints
//! one line per datagram (decoded header and message), a per-pair summary, or one `setr`'s
//! two-phase commit across every process.
//!
//! Exit codes: 0 success, 1 a file could not be read (the message names the file and the
//! byte offset of the damage), 2 usage error.

mod decode;
mod report;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "trace-dump",
    version,
    about = "Read trireme trace files (written with --trace) and print their datagrams merged by time",
    after_help = "KIND is a header kind (request, response, ack, probe, garbage) or a message \
                  name (Prepare, Prepared, Commit, Heartbeat, Transfer, ...), case-insensitive.\n\
                  Lines read: TIME OBSERVER sent|recv SRC > DST KIND id=REQUEST tx=TRANSMISSION \
                  frag=I/N SIZE  MESSAGE."
)]
struct Args {
    /// Trace files (pcap) to read; datagrams of all of them are merged by time.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Only datagrams sent to or by ADDR.
    #[arg(long, value_name = "ADDR")]
    peer: Option<SocketAddr>,
    /// Only datagrams of this KIND (see below).
    #[arg(long, value_name = "KIND", value_parser = parse_kind)]
    kind: Option<String>,
    /// Only datagrams about KEY (its requests, their responses and acks).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Only datagrams of the transaction whose id starts with ID (hex).
    #[arg(long, value_name = "ID", value_parser = parse_txid)]
    txid: Option<String>,
    /// Show one setr's prepare, votes and decision across all processes, one line per
    /// message, in order.
    #[arg(long, value_name = "ID", value_parser = parse_txid,
          conflicts_with_all = ["summary", "txid", "peer", "kind", "key"])]
    follow_txid: Option<String>,
    /// Per requester/responder pair: requests, retransmissions, responses resent,
    /// duplicates suppressed, fragments, bytes, latency and round-trip time percentiles
    /// (with --kind, whole exchanges whose request is of that kind).
    #[arg(long)]
    summary: bool,
    /// Print JSON: one object per line (one object in all for --summary).
    #[arg(long)]
    json: bool,
}

/// Accepts a header kind or message name (case-insensitive); returns it in lower case.
fn parse_kind(text: &str) -> Result<String, String> {
    let kinds = ["request", "response", "ack", "probe", "garbage"];
    let known = kinds.iter().any(|k| k.eq_ignore_ascii_case(text))
        || report::MESSAGE_NAMES
            .iter()
            .any(|m| m.eq_ignore_ascii_case(text));
    if known {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "unknown kind {text:?}; expected one of {} or a message name: {}",
            kinds.join(", "),
            report::MESSAGE_NAMES.join(", ")
        ))
    }
}

/// Accepts a transaction id or a prefix of one: 1 to 32 hex digits; returns it lower case.
fn parse_txid(text: &str) -> Result<String, String> {
    if !text.is_empty() && text.len() <= 32 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "{text:?} is not a transaction id (1 to 32 hex digits)"
        ))
    }
}

/// Runs the tool; returns the exit code.
fn main() {
    let args = Args::parse();
    std::process::exit(run(&args));
}

/// Loads the files and prints what `args` asks for; returns the exit code.
fn run(args: &Args) -> i32 {
    let loaded = match decode::load(&args.files) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    for (path, cut) in args.files.iter().zip(&loaded.truncated_at) {
        if let Some(offset) = cut {
            eprintln!(
                "warning: {}: offset {offset}: the file ends inside a record (its writer was \
                 killed?); the records before it are shown",
                path.display()
            );
        }
    }
    if loaded.unassembled > 0 {
        eprintln!(
            "warning: {} messages could not be reassembled (fragments that disagree, or more \
             than {} MiB of unfinished messages); shown undecoded",
            loaded.unassembled,
            decode::MAX_PENDING_BYTES >> 20
        );
    }
    let observations = loaded.observations;
    let names = report::observer_names(&args.files);
    let start = observations.first().map(|o| o.time).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let result = if let Some(txid) = &args.follow_txid {
        let steps = report::follow(&observations, txid);
        if steps.is_empty() {
            eprintln!("error: no message of a transaction {txid}... in these traces");
            return 1;
        }
        if args.json {
            report::follow_json(&steps)
                .iter()
                .try_for_each(|object| writeln!(out, "{object}"))
        } else {
            report::follow_lines(&steps, start)
                .iter()
                .try_for_each(|line| writeln!(out, "{line}"))
        }
    } else {
        let filter = report::Filter {
            peer: args.peer,
            kind: args.kind.clone(),
            key: args.key.clone(),
            txid: args.txid.clone(),
            whole_exchanges: args.summary,
        };
        let shown: Vec<&decode::Observation> =
            observations.iter().filter(|o| filter.matches(o)).collect();
        if args.summary {
            let pairs = report::summarise(shown);
            if args.json {
                writeln!(out, "{}", report::summary_json(&pairs))
            } else {
                write!(out, "{}", report::summary_table(&pairs))
            }
        } else if args.json {
            shown
                .iter()
                .try_for_each(|o| writeln!(out, "{}", report::line_json(o, &names)))
        } else {
            shown
                .iter()
                .try_for_each(|o| writeln!(out, "{}", report::line(o, &names, start)))
        }
    };
    match result {
        Ok(()) => 0,
        // A closed pipe (`trace-dump ... | head`) is not a failure worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            1
        }
    }
}
