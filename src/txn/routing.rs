//! Where keys live in one view: the view and its ring as a client fetched them
//! ([`ServersInfo`], [`Placement`]), and the rules for using one.
//!
//! Shared by the command-line client ([`crate::client`]), the sans-IO coordinators
//! ([`crate::txn::coordinator`]) and the simulator, below both of them: it imports only the view,
//! the ring and the message types.

use std::sync::Arc;

use crate::placement::ring::Ring;
use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::wire::message::{ErrorKind, OpError};

/// Builds an error of `kind` with `message`.
fn op_error(kind: ErrorKind, message: impl Into<String>) -> OpError {
    OpError {
        kind,
        message: message.into(),
        cycle: Vec::new(),
    }
}

/// What `query_servers` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServersInfo {
    /// The current view.
    pub view: View,
    /// True while the view is rebalancing.
    pub rebalancing: bool,
    /// Servers not yet finished with the current epoch.
    pub pending: Vec<ServerId>,
}

/// A view and its ring as placed by one `query_servers`.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The view.
    pub view: Arc<View>,
    /// Its ring, built once.
    pub ring: Arc<Ring>,
}

impl Placement {
    /// Builds the ring of `view`.
    pub fn new(view: View) -> Placement {
        let ring = Ring::new(&view);
        Placement {
            view: Arc::new(view),
            ring: Arc::new(ring),
        }
    }

    /// Refuses, with `rebalancing`, a view older than `floor`, the newest epoch this client
    /// already operated on: a view leader that restarted and has not heard the servers yet
    /// can only show an older epoch, and epochs a client uses never go backwards.
    pub fn check_floor(info: &ServersInfo, floor: Epoch) -> Result<(), OpError> {
        if info.view.epoch < floor {
            return Err(op_error(
                ErrorKind::Rebalancing,
                format!(
                    "the view leader shows epoch {}, older than epoch {floor} used before: it \
                     restarted and has not heard the servers yet",
                    info.view.epoch
                ),
            ));
        }
        Ok(())
    }

    /// The placement of a view replicated operations may use: refused while the view is
    /// empty (`no_servers`), or empty and rebalancing (`rebalancing`: the view leader is
    /// gathering the servers that came back). A view that rebalances is used: each replica
    /// decides per key whether it may serve it yet (issue 17).
    pub fn operable(info: ServersInfo) -> Result<Placement, OpError> {
        // Rebalancing first: an empty view that is rebalancing is gathering the servers that
        // came back (see `viewleader`), and `--wait` waits that out.
        if info.rebalancing && info.view.members.is_empty() {
            return Err(op_error(
                ErrorKind::Rebalancing,
                format!("epoch {} is still rebalancing", info.view.epoch),
            ));
        }
        if info.view.members.is_empty() {
            return Err(op_error(
                ErrorKind::NoServers,
                "there are no servers in the view",
            ));
        }
        Ok(Placement::new(info.view))
    }

    /// The replicas of `key`, primary first.
    pub fn replicas(&self, key: &str) -> Vec<Member> {
        let count = usize::try_from(self.view.replicas).unwrap_or(usize::MAX);
        self.ring.replicas(key, count)
    }
}
