//! The view-leader group: the [`ViewLeader`] state machine replicated with Raft.
//!
//! (Being built: see issue 16. Until the Raft glue lands, a group is a single member that
//! runs its [`ViewLeader`] directly.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::reliable::{IncomingId, RequestError};
use crate::runtime::node::{Action, Node};
use crate::viewleader::{ViewLeader, ViewLeaderConfig};
use crate::wire::message::{Request, Response};

/// Settings of this member of the view-leader group.
#[derive(Clone, Debug, Default)]
pub struct GroupConfig {
    /// The whole group in `--peers` order, this member among them; empty for a group of one.
    pub peers: Vec<SocketAddr>,
    /// This member's place in `peers` (0 in a group of one).
    pub me: usize,
    /// Where this member keeps its Raft state across restarts (`--data-dir`); `None` keeps
    /// it in memory only.
    pub data_dir: Option<PathBuf>,
    /// Raft's tick; zero means the default ([`DEFAULT_TICK`]).
    pub tick: Duration,
    /// Seed of this member's election timeouts (random in a real process, drawn from the
    /// run's seed in the simulator).
    pub seed: u64,
}

/// Raft's logical clock advances once per this interval by default.
pub const DEFAULT_TICK: Duration = Duration::from_millis(50);

/// Why a group member could not start.
#[derive(Debug, Error)]
pub enum GroupError {
    /// The peer list is not a usable group.
    #[error("bad --peers: {0}")]
    Peers(String),
    /// The data directory could not be read or written.
    #[error("data dir {dir}: {message}")]
    Storage {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl GroupConfig {
    /// A group of `peers` in which this member is the one at `me`; checks that the group has
    /// 1, 3 or 5 members (an even group tolerates no more failures than one member fewer),
    /// that `me` is in it and that no address appears twice.
    pub fn new(peers: Vec<SocketAddr>, me: SocketAddr) -> Result<GroupConfig, GroupError> {
        if !matches!(peers.len(), 1 | 3 | 5) {
            return Err(GroupError::Peers(format!(
                "a group has 1, 3 or 5 members, not {}",
                peers.len()
            )));
        }
        for (i, a) in peers.iter().enumerate() {
            if peers[..i].contains(a) {
                return Err(GroupError::Peers(format!("{a} appears twice")));
            }
        }
        let me = peers.iter().position(|&a| a == me).ok_or_else(|| {
            GroupError::Peers(format!("this member's address {me} is not in the list"))
        })?;
        Ok(GroupConfig {
            peers,
            me,
            ..GroupConfig::default()
        })
    }
}

/// One member of the view-leader group (a sans-IO [`Node`]).
#[derive(Debug)]
pub struct Group {
    /// The replicated state machine.
    leader: ViewLeader,
    /// This member's settings.
    config: GroupConfig,
}

impl Group {
    /// Starts a member with view-leader settings `vl` and group settings `config`.
    pub fn new(vl: ViewLeaderConfig, config: GroupConfig) -> Result<Group, GroupError> {
        Ok(Group {
            leader: ViewLeader::new(vl),
            config,
        })
    }

    /// The group's members (empty for a group of one).
    pub fn peers(&self) -> &[SocketAddr] {
        &self.config.peers
    }
}

impl Node for Group {
    /// Serves a request (see [`ViewLeader`]).
    fn handle_request(&mut self, now: Instant, from: SocketAddr, id: IncomingId, request: Request) {
        self.leader.handle_request(now, from, id, request);
    }

    /// Takes an answer to one of this member's requests.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        self.leader.handle_response(now, token, result);
    }

    /// Runs due timers.
    fn handle_timeout(&mut self, now: Instant) {
        self.leader.handle_timeout(now);
    }

    /// The next timer.
    fn poll_timeout(&self) -> Option<Instant> {
        self.leader.poll_timeout()
    }

    /// The next action.
    fn poll_action(&mut self) -> Option<Action> {
        self.leader.poll_action()
    }
}
