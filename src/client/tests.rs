//! Unit tests of the client: candidates, fallbacks and leader following on loopback, with
//! a real view leader to talk to (a test module may use a peer of its layer).

use super::*;
use crate::placement::view::{ServerId, View};
use crate::runtime::net::NetConfig;
use crate::runtime::node;
use crate::viewleader::{ViewLeader, ViewLeaderConfig};

/// A placement of one server at `epoch`.
fn placement(epoch: u64) -> Placement {
    Placement::new(View {
        epoch: Epoch(epoch),
        members: vec![Member {
            id: ServerId(1),
            addr: "127.0.0.1:1".parse().unwrap(),
        }],
        replicas: 3,
        vnodes: 4,
    })
}

/// The cache never goes back to an older view, drops only the epoch that was doubted,
/// and serves a view only within its lease.
#[test]
fn the_view_cache_keeps_the_newest_view_within_its_lease() {
    let cache = ViewCache::default();
    let t0 = Instant::now();
    cache.put(placement(5), t0);
    cache.put(placement(4), t0); // a slow worker's older view
    assert_eq!(cache.get(t0).unwrap().view.epoch, Epoch(5));
    cache.invalidate(Epoch(4)); // a failure with the older view
    assert_eq!(cache.get(t0).unwrap().view.epoch, Epoch(5));
    cache.invalidate(Epoch(5));
    assert!(cache.get(t0).is_none());
    cache.put(placement(6), t0);
    assert!(
        cache.get(t0 + VIEW_LEASE).is_none(),
        "expired with its lease"
    );
    assert_eq!(placement(6).replicas("k").len(), 1);
}

/// A stand-in for a group member during an election: its first `not_now` requests are
/// answered as a follower that cannot reach a leader answers them (an error of kind
/// `timeout`), the rest by a view leader.
struct Electing {
    /// Requests still to answer "not now".
    not_now: usize,
    /// The view leader that answers the rest.
    inner: ViewLeader,
    /// Answers waiting for `poll_action`.
    answers: std::collections::VecDeque<node::Action>,
}

impl node::Node for Electing {
    /// Answers "not now", or passes the request on.
    fn handle_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: crate::reliable::IncomingId,
        request: Request,
    ) {
        if self.not_now == 0 {
            return self.inner.handle_request(now, from, id, request);
        }
        self.not_now -= 1;
        let response = Response::error(
            ErrorKind::Timeout,
            "the view-leader group's leader did not answer",
        );
        self.answers
            .push_back(node::Action::Respond { id, response });
    }

    /// Passes it on.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        self.inner.handle_response(now, token, result);
    }

    /// Passes it on.
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    /// The view leader's.
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    /// Our answers first, then the view leader's actions.
    fn poll_action(&mut self) -> Option<node::Action> {
        self.answers
            .pop_front()
            .or_else(|| self.inner.poll_action())
    }
}

/// Starts an [`Electing`] member answering `not_now` requests "not now".
fn electing(not_now: usize) -> node::Running {
    let config = ViewLeaderConfig {
        dead_after: Duration::from_millis(1),
        ..ViewLeaderConfig::default()
    };
    let member = Electing {
        not_now,
        inner: ViewLeader::new(config),
        answers: Default::default(),
    };
    let socket = net::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    node::start(member, socket, NetConfig::default()).unwrap()
}

/// Contract (killing the leader "costs at most an election"): members that answer they
/// cannot reach a leader are asked again after [`GROUP_RETRY_PAUSE`] within the
/// deadline, by discovery, by a view-leader request and by a replicated operation's view
/// step alike, until a leader answers; a dead candidate beside them changes nothing.
#[test]
fn members_between_leaders_are_asked_again_until_one_answers() {
    let net = Loopback::start();
    let dead = dead_addr();

    // Discovery: the dead candidate is gone, the electing one says "not now" twice.
    let member = electing(2);
    let mut client = net.client(None, &[dead, member.addr()]);
    let started = Instant::now();
    let (_, group) = query(&mut client).unwrap();
    assert_eq!(group.leader, member.addr());
    assert!(started.elapsed() >= 2 * GROUP_RETRY_PAUSE);
    member.stop();

    // A view-leader request to the one member given.
    let member = electing(3);
    let mut client = net.client(Some(member.addr()), &[member.addr()]);
    assert_eq!(query(&mut client).unwrap().1.leader, member.addr());
    member.stop();

    // A replicated operation's view step (the read then fails on the empty view).
    let member = electing(2);
    let mut client = net.client(Some(member.addr()), &[member.addr()]);
    assert_eq!(client.getr("k").unwrap_err().kind, ErrorKind::NoServers);
    member.stop();

    // Past the deadline, the member's own answer is the error.
    let member = electing(usize::MAX);
    let mut client = Client::new(
        net.handle.clone(),
        Some(member.addr()),
        vec![member.addr()],
        "127.0.0.1:1".parse().unwrap(),
        Some(Duration::from_millis(400)),
    );
    let e = client.query_servers().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(e.message.contains("leader did not answer"), "{e:?}");
    member.stop();
    net.stop();
}

/// A view leader on loopback (a group of one, showing its empty view at once) and a
/// client driver; dropped together.
struct Loopback {
    /// The view leader.
    viewleader: node::Running,
    /// The client's network driver.
    handle: net::Handle,
}

impl Loopback {
    /// Starts both on 127.0.0.1.
    fn start() -> Loopback {
        let config = ViewLeaderConfig {
            dead_after: Duration::from_millis(1),
            ..ViewLeaderConfig::default()
        };
        let socket = net::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let viewleader =
            node::start(ViewLeader::new(config), socket, NetConfig::default()).unwrap();
        let socket = net::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (handle, _requests, _driver) = net::spawn(socket, NetConfig::default()).unwrap();
        Loopback { viewleader, handle }
    }

    /// The view leader's address.
    fn live(&self) -> SocketAddr {
        self.viewleader.addr()
    }

    /// A client with `viewleader` and `candidates` and a 5 s bound.
    fn client(&self, viewleader: Option<SocketAddr>, candidates: &[SocketAddr]) -> Client {
        Client::new(
            self.handle.clone(),
            viewleader,
            candidates.to_vec(),
            "127.0.0.1:1".parse().unwrap(),
            Some(Duration::from_secs(5)),
        )
    }

    /// Stops both.
    fn stop(self) {
        self.handle.shutdown();
        self.viewleader.stop();
    }
}

/// An address nothing listens on (a port bound and released: the OS answers
/// "unreachable").
fn dead_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Asks `query_servers_and_group` until the fresh view leader shows its view (it answers
/// `rebalancing` for its first `dead_after`).
fn query(client: &mut Client) -> Result<(ServersInfo, GroupInfo), OpError> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match client.query_servers_and_group() {
            Err(e) if e.kind == ErrorKind::Rebalancing && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Contract (`--viewleader ADDR[,ADDR...]`): discovery skips a candidate nothing listens
/// on, uses the next that answers, and `query_servers` names it as the leader and the
/// group (a group of one answers with no leader and no group).
#[test]
fn discovery_skips_a_dead_candidate() {
    let net = Loopback::start();
    let dead = dead_addr();
    let mut client = net.client(None, &[dead, net.live()]);
    let (info, group) = query(&mut client).unwrap();
    assert!(info.view.members.is_empty());
    assert_eq!(
        group,
        GroupInfo {
            leader: net.live(),
            members: vec![net.live()]
        }
    );
    assert_eq!(client.failed, vec![dead], "the dead one is tried last");
    net.stop();
}

/// A view leader in use that died (unreachable) is replaced by the next candidate within
/// the deadline, for view-leader requests and for a replicated operation's view step
/// alike (the read then fails on the empty view, not on the dead member).
#[test]
fn a_dead_view_leader_in_use_falls_back_to_the_next_candidate() {
    let net = Loopback::start();
    let dead = dead_addr();
    let mut client = net.client(Some(dead), &[dead, net.live()]);
    let (_, group) = query(&mut client).unwrap();
    assert_eq!(group.leader, net.live());
    assert_eq!(client.viewleader().unwrap(), net.live());

    let mut client = net.client(Some(dead), &[dead, net.live()]);
    let e = client.getr("k").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoServers, "{e:?}");
    assert_eq!(client.viewleader().unwrap(), net.live());
    assert_eq!(client.failed, vec![dead]);
    net.stop();
}

/// A view leader in use that stays silent (a paused member: its socket is open, nothing
/// answers) is given up after [`VIEWLEADER_ATTEMPT`], well within the deadline, and the
/// next candidate answers; with no other candidate the request may take the whole
/// deadline.
#[test]
fn a_silent_view_leader_is_given_up_after_one_attempt() {
    let net = Loopback::start();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let paused = silent.local_addr().unwrap();
    let mut client = net.client(Some(paused), &[paused, net.live()]);
    let started = Instant::now();
    let (_, group) = query(&mut client).unwrap();
    let took = started.elapsed();
    assert_eq!(group.leader, net.live());
    assert!(
        took >= VIEWLEADER_ATTEMPT && took < Duration::from_secs(4),
        "took {took:?}"
    );
    let mut alone = Client::new(
        net.handle.clone(),
        Some(paused),
        Vec::new(),
        "127.0.0.1:1".parse().unwrap(),
        Some(Duration::from_millis(1500)),
    );
    let e = alone.query_servers().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(e.message.contains("within 1500 ms"), "{e:?}");
    drop(silent);
    net.stop();
}
