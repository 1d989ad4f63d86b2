//! Cluster tests: the real `viewleader`, `server` and `client` binaries on `127.0.0.1:0`.
//!
//! Every behaviour is checked twice: on a clean loopback and with every process injecting
//! `loss=0.2,dup=0.1,reorder=0.1` on its outgoing datagrams (assignment 3.4 asks that the
//! system work; the reliable layer must make faults invisible). Each process is owned by a
//! guard that kills it when the test ends. nextest runs at most two of these tests at once
//! (`.config/nextest.toml`), so two cores are never overloaded into false failure detection.

mod bench;
mod dissector;
mod flood;
mod locks;
mod membership;
mod membership_faults;
mod rebalancing;
mod replication;
mod robustness;
mod security;
mod tracing;
mod util;
mod viewleader_list;
mod vl_group;

/// The fault spec of the `*_under_faults` variants.
pub const FAULTS: &str = "loss=0.2,dup=0.1,reorder=0.1";
/// The fault spec the rebalancing issue names for its tests (with delay and jitter).
pub const REBALANCE_FAULTS: &str = "loss=0.1,dup=0.05,reorder=0.1,delay=2ms,jitter=2ms";

/// Defines a module named after the behaviour `$body` with two tests: `clean` runs
/// `$body(&Env)` on a clean network, `under_faults` with every process injecting `$faults`
/// ([`FAULTS`] when not given).
#[macro_export]
macro_rules! cluster_test {
    ($body:ident) => {
        $crate::cluster_test!($body, $crate::FAULTS);
    };
    ($body:ident, $faults:expr) => {
        mod $body {
            /// Runs the behaviour on a clean loopback network.
            #[test]
            fn clean() {
                super::$body(&$crate::util::Env::clean());
            }

            /// Runs the behaviour with every process injecting the given faults.
            #[test]
            fn under_faults() {
                super::$body(&$crate::util::Env::faulty($faults));
            }
        }
    };
}
