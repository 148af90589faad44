//! The replica server: hosts replicas for volume owners on other nodes.
//!
//! * One listener task accepts and authenticates (on the daemon's network runtime);
//!   each authenticated connection gets its own thread with a current-thread tokio
//!   runtime, so replica I/O can use the same io_uring
//!   [`replication::local::LocalReplica`] code as the ublk queues ([`TokioUring`]
//!   drives a private ring from tokio). Requests on a connection run concurrently.
//! * Replicas and their labels: [`store`].
//! * Fencing: every fenced frame carries the generation, session and volume tag of
//!   its OPEN. A frame whose generation is not the replica's is answered FENCED and
//!   not executed. An OPEN that raises the generation waits for the requests already
//!   admitted under the old one (a read/write lock), so after its reply no write of
//!   an older owner can land.
//! * Resources are bounded before they are spent: pending handshakes (globally and
//!   per peer address, the oldest evicted so a real owner always gets in),
//!   authenticated connections, connections that never open a replica, per
//!   connection the requests and buffer bytes in flight, and the buffer bytes of all
//!   connections together — a request's permits are held until its reply is on the
//!   socket, so a peer that stops reading stops being served, not the server's memory.
//! * Anything malformed, forged, oversized or out of range closes the connection
//!   with a logged reason; the server carries on.

mod bufpool;
pub mod store;
mod uring;

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bufpool::PooledBuf;
use replication::local::LocalReplica;
use replication::remote::conn::server_handshake;
use replication::ReplicationError;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use wire::control::{
    decode_control, encode_control, DeleteRequest, LabelUpdate, OpenRequest, SnapshotAction,
    StatReply, StatRequest,
};
use wire::frame::{
    encode_extents, Op, Opener, ReplyHeader, RequestHeader, Sealer, Status, View,
    EXTENT_RECORD_LEN, FLAG_FUA, FLAG_NO_UNMAP, FLAG_VIEW, MAX_EXTENTS, REQUEST_HEADER_LEN,
};
use wire::handshake::{Secret, HANDSHAKE_TIMEOUT};
use wire::{ByteLen, RequestId, SessionId};

pub use store::Store;
pub use uring::TokioUring;

use store::{Hosted, Refused};

/// How much the server lets peers use. The defaults suit a node hosting replicas
/// for a few dozen volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Authenticated connections at once (each has a thread).
    pub max_connections: usize,
    /// Handshakes in progress at once; a new connection beyond it evicts the oldest.
    pub max_handshakes: usize,
    /// Handshakes in progress from one peer address; a new one evicts that peer's oldest.
    pub max_handshakes_per_peer: usize,
    /// An authenticated connection that opens no replica for this long is closed.
    pub unopened_timeout: Duration,
    /// Requests executing or waiting for their reply to be sent, per connection.
    pub max_in_flight: usize,
    /// Bytes of request and reply buffers per connection (at least `MAX_DATA`).
    pub max_in_flight_bytes: usize,
    /// Bytes of request and reply buffers of all connections together.
    pub max_total_bytes: usize,
    /// A reply that cannot be handed to the socket for this long (the peer does
    /// not read) closes the connection: its buffers and its connection slot would
    /// otherwise stay taken for good.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            max_handshakes: 64,
            max_handshakes_per_peer: 8,
            unopened_timeout: Duration::from_secs(30),
            max_in_flight: 256,
            max_in_flight_bytes: 64 << 20,
            max_total_bytes: 1 << 30,
            send_timeout: Duration::from_secs(20),
        }
    }
}

/// Counters and limits, for `ublkctl server`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerStatus {
    pub listen: Option<String>,
    pub storage_dir: String,
    pub handshaking: usize,
    pub connections: usize,
    pub sessions: usize,
    pub accepted_total: u64,
    pub auth_failed_total: u64,
    pub handshakes_evicted_total: u64,
    pub connections_refused_total: u64,
    pub unopened_closed_total: u64,
    pub max_connections: usize,
    pub max_handshakes: usize,
}

#[derive(Default)]
struct Counters {
    connections: AtomicUsize,
    sessions: AtomicUsize,
    accepted: AtomicU64,
    auth_failed: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    unopened_closed: AtomicU64,
}

/// Handshakes in progress, oldest first: a flood of connections that never finish
/// theirs cannot keep a real owner out, because a new connection evicts the oldest.
#[derive(Default)]
struct Admission {
    pending: Mutex<Vec<PendingHandshake>>,
    next: AtomicU64,
}

struct PendingHandshake {
    id: u64,
    peer: IpAddr,
    abort: tokio::task::AbortHandle,
}

impl Admission {
    /// Make room for a handshake from `peer`; returns how many were evicted.
    fn make_room(&self, peer: IpAddr, limits: &Limits) -> u64 {
        let mut p = self.pending.lock().unwrap();
        let mut evicted = 0;
        let evict = |p: &mut Vec<PendingHandshake>, at: usize| {
            p.remove(at).abort.abort();
        };
        if let Some(at) = (p.iter().filter(|h| h.peer == peer).count()
            >= limits.max_handshakes_per_peer)
            .then(|| p.iter().position(|h| h.peer == peer))
            .flatten()
        {
            evict(&mut p, at);
            evicted += 1;
        } else if p.len() >= limits.max_handshakes && !p.is_empty() {
            evict(&mut p, 0);
            evicted += 1;
        }
        evicted
    }

    fn register(&self, peer: IpAddr, abort: tokio::task::AbortHandle) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.pending
            .lock()
            .unwrap()
            .push(PendingHandshake { id, peer, abort });
        id
    }

    fn done(&self, id: u64) {
        self.pending.lock().unwrap().retain(|h| h.id != id);
    }

    fn len(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

pub struct Server {
    store: Store,
    secret: Secret,
    /// Named in OPEN replies of sessions with the INSTANCE feature.
    instance: wire::control::ServerInstance,
    limits: Limits,
    /// KiB of buffers, server-wide (`max_total_bytes`).
    buffers: Arc<Semaphore>,
    counters: Counters,
    admission: Admission,
    listen: Mutex<Option<SocketAddr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("replica server: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// This process on this boot of the host. A host whose boot id cannot be read
/// gets a random one per process: every restart then looks like a reboot, which
/// costs a rebuild of what was unflushed, never a stale read.
fn this_instance() -> wire::control::ServerInstance {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("unknown-{:016x}", wire::random::u64()));
    wire::control::ServerInstance {
        boot_id,
        process: wire::random::u64(),
    }
}

impl Server {
    pub fn new(
        dir: std::path::PathBuf,
        secret: Secret,
        limits: Limits,
    ) -> Result<Arc<Server>, ServerError> {
        let store = Store::new(dir.clone()).map_err(io_err(format!("create {}", dir.display())))?;
        Ok(Arc::new(Server {
            store,
            secret,
            instance: this_instance(),
            buffers: Arc::new(Semaphore::new(limits.max_total_bytes / 1024)),
            limits,
            counters: Counters::default(),
            admission: Admission::default(),
            listen: Mutex::new(None),
        }))
    }

    pub fn status(&self) -> ServerStatus {
        let c = &self.counters;
        ServerStatus {
            listen: self.listen.lock().unwrap().map(|a| a.to_string()),
            storage_dir: self.store.dir().display().to_string(),
            handshaking: self.admission.len(),
            connections: c.connections.load(Ordering::Relaxed),
            sessions: c.sessions.load(Ordering::Relaxed),
            accepted_total: c.accepted.load(Ordering::Relaxed),
            auth_failed_total: c.auth_failed.load(Ordering::Relaxed),
            handshakes_evicted_total: c.evicted.load(Ordering::Relaxed),
            connections_refused_total: c.refused.load(Ordering::Relaxed),
            unopened_closed_total: c.unopened_closed.load(Ordering::Relaxed),
            max_connections: self.limits.max_connections,
            max_handshakes: self.limits.max_handshakes,
        }
    }

    /// Bind now (so a bad address fails the start), then accept on `rt`.
    pub fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
        rt: &tokio::runtime::Handle,
    ) -> Result<SocketAddr, ServerError> {
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(io_err(format!("bind {addr}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking"))?;
        let local = std_listener.local_addr().map_err(io_err("local_addr"))?;
        *self.listen.lock().unwrap() = Some(local);
        // Registered here, not in the task: a listener that cannot be registered fails
        // the start instead of leaving a server that listens and never accepts.
        let listener = {
            let _in_rt = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .map_err(io_err("register the listener"))?
        };
        let me = self.clone();
        rt.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => me.admit(s, peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "replica server: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(listen = %local, dir = %self.store.dir().display(), "replica server listening");
        Ok(local)
    }

    /// Authenticate on the acceptor's runtime (no thread for unauthenticated peers),
    /// then hand the connection to a thread of its own.
    fn admit(self: &Arc<Self>, mut s: TcpStream, peer: SocketAddr) {
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let evicted = self.admission.make_room(peer.ip(), &self.limits);
        if evicted > 0 {
            self.counters.evicted.fetch_add(evicted, Ordering::Relaxed);
            tracing::warn!(%peer, "too many handshakes in progress: evicted the oldest");
        }
        let me = self.clone();
        let (id_tx, id_rx) = tokio::sync::oneshot::channel::<u64>();
        let task = tokio::spawn(async move {
            let id = id_rx.await.unwrap_or(u64::MAX);
            let auth =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, server_handshake(&mut s, &me.secret)).await;
            me.admission.done(id);
            let keys = match auth {
                Ok(Ok(keys)) => keys,
                Ok(Err(e)) => {
                    me.counters.auth_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "replica connection refused");
                    return;
                }
                Err(_) => {
                    me.counters.auth_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "replica connection refused: handshake timed out");
                    return;
                }
            };
            let n = me.counters.connections.fetch_add(1, Ordering::SeqCst);
            if n >= me.limits.max_connections {
                me.counters.connections.fetch_sub(1, Ordering::SeqCst);
                me.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, limit = me.limits.max_connections, "too many replica connections: closing this one");
                return;
            }
            let me2 = me.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("repl-{peer}"))
                .spawn(move || {
                    me2.clone().connection_thread(s, peer, keys);
                    me2.counters.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                me.counters.connections.fetch_sub(1, Ordering::SeqCst);
                tracing::error!(%peer, error = %e, "cannot start a connection thread");
            }
        });
        let id = self.admission.register(peer.ip(), task.abort_handle());
        let _ = id_tx.send(id);
    }

    fn connection_thread(
        self: Arc<Self>,
        s: TcpStream,
        peer: SocketAddr,
        keys: wire::handshake::SessionKeys,
    ) {
        // Move the socket off the acceptor's runtime onto this thread's.
        let s = match s.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot take over connection");
                return;
            }
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(%peer, error = %e, "cannot build a connection runtime");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        let res = local.block_on(&rt, async move {
            let s = TcpStream::from_std(s).map_err(ReplicationError::Net)?;
            s.set_nodelay(true).map_err(ReplicationError::Net)?;
            replication::remote::keepalive(&s);
            self.serve_connection(s, keys).await
        });
        match res {
            Ok(()) => tracing::debug!(%peer, "replica connection closed"),
            Err(e) => tracing::warn!(%peer, error = %e, "replica connection closed"),
        }
    }

    /// Serve an authenticated connection.
    async fn serve_connection(
        &self,
        s: TcpStream,
        keys: wire::handshake::SessionKeys,
    ) -> Result<(), ReplicationError> {
        let (rd, wr) = s.into_split();
        let lim = self.limits;
        // Permits: a request holds one slot and its buffer's KiB from before its
        // buffer exists until its reply is on the socket.
        let slots = Arc::new(Semaphore::new(lim.max_in_flight));
        let kib = Arc::new(Semaphore::new(lim.max_in_flight_bytes / 1024));
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>(lim.max_in_flight + 1);
        let writer = tokio::task::spawn_local(reply_writer(
            wr,
            Sealer::new(keys.send),
            reply_rx,
            lim.send_timeout,
        ));
        let mut opener = Opener::new(keys.recv);
        let keys_features = keys.features;
        let ring = TokioUring::new()?;
        let mut session: Option<Session> = None;
        let mut tasks = tokio::task::JoinSet::new();
        let started = Instant::now();
        // Ends when the writer does (the peer stopped reading): nothing it sends
        // gets an answer any more.
        let replies_gone = reply_tx.clone();
        let serve = async {
            loop {
                let mut hb = [0u8; REQUEST_HEADER_LEN];
                let read = rd.read_exact(&mut hb);
                let read = match &session {
                    Some(_) => read.await,
                    None => {
                        let left = lim.unopened_timeout.saturating_sub(started.elapsed());
                        match tokio::time::timeout(left, read).await {
                            Ok(r) => r,
                            Err(_) => {
                                self.counters
                                    .unopened_closed
                                    .fetch_add(1, Ordering::Relaxed);
                                break Err(ReplicationError::Protocol(format!(
                                    "no replica opened within {} s",
                                    lim.unopened_timeout.as_secs()
                                )));
                            }
                        }
                    }
                };
                match read {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                    Err(e) => break Err(ReplicationError::Net(e)),
                }
                let (h, seal) = match opener.open_request(&hb) {
                    Ok(x) => x,
                    Err(e) => break Err(e.into()),
                };
                // Reap finished request tasks as we go.
                while tasks.try_join_next().is_some() {}
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break Ok(());
                };
                if !h.op.is_fenced() {
                    // Control ops: handled in order.
                    let mut p = vec![0u8; h.payload_len as usize];
                    if let Err(e) = rd.read_exact(&mut p).await {
                        break Err(ReplicationError::Net(e));
                    }
                    if let Err(e) = opener.open_payload(&seal, &p) {
                        break Err(e.into());
                    }
                    let reply = match self
                        .control(&h, &p, &mut session, &ring, keys_features)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => break Err(e),
                    };
                    if reply_tx.send(reply.holding(vec![slot])).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                let sess = match &session {
                    Some(sess) if h.session == sess.id && h.volume == sess.hosted.volume_tag => {
                        sess
                    }
                    _ => {
                        // Drain the payload to stay in sync, then refuse.
                        if let Err(e) = skip(&mut rd, h.payload_len).await {
                            break Err(e);
                        }
                        let reply = Reply::message(
                            Status::NotOpen,
                            h.id,
                            "no open replica for this session/volume",
                        );
                        if reply_tx.send(reply.holding(vec![slot])).await.is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                };
                if (h.op == Op::Snapshot || h.flags & FLAG_VIEW != 0)
                    && !keys_features.has(wire::version::Features::SNAPSHOTS)
                {
                    break Err(ReplicationError::Protocol(format!(
                        "{:?} of a snapshot on a session that did not agree on snapshots",
                        h.op
                    )));
                }
                if !matches!(h.op, Op::SetLabel | Op::Snapshot)
                    && (h.offset.0.saturating_add(h.len as u64) > sess.hosted.size
                        || !h.offset.0.is_multiple_of(512)
                        || !h.len.is_multiple_of(512))
                {
                    break Err(ReplicationError::Protocol(format!(
                    "{:?} of {} bytes at {} is outside the replica ({} bytes) or not 512-aligned",
                    h.op, h.len, h.offset.0, sess.hosted.size
                )));
                }
                // Buffers: a WRITE's payload or a READ's data, bounded per connection.
                let buf_bytes = match h.op {
                    Op::Write | Op::Read => h.len as usize,
                    Op::Checksum => h.len.min(replication::replica::CHECKSUM_CHUNK as u32) as usize,
                    Op::DataExtents => MAX_EXTENTS * EXTENT_RECORD_LEN,
                    _ => h.payload_len as usize,
                };
                let kib_needed = buf_bytes.div_ceil(1024) as u32;
                let (Ok(budget), Ok(global)) = (
                    kib.clone().acquire_many_owned(kib_needed).await,
                    self.buffers.clone().acquire_many_owned(kib_needed).await,
                ) else {
                    break Ok(());
                };
                let mut payload = Payload::None;
                if h.payload_len > 0 {
                    let mut buf = PooledBuf::take(h.payload_len as usize);
                    let data = buf.as_mut_slice();
                    if let Err(e) = rd.read_exact(data).await {
                        break Err(ReplicationError::Net(e));
                    }
                    if let Err(e) = opener.open_payload(&seal, data) {
                        break Err(e.into());
                    }
                    payload = Payload::Aligned(buf, h.payload_len as usize);
                }
                let (hosted, replica, tx) =
                    (sess.hosted.clone(), sess.replica.clone(), reply_tx.clone());
                let (sid, sgen) = (sess.id, sess.generation);
                tasks.spawn_local(async move {
                    let reply = serve_fenced(&hosted, &replica, sid, sgen, h, payload).await;
                    let _ = tx.send(reply.holding(vec![slot, budget, global])).await;
                });
            }
        };
        let res = tokio::select! {
            res = serve => res,
            () = replies_gone.closed() => Err(ReplicationError::Protocol(format!(
                "the peer read no reply for {} s: connection closed",
                lim.send_timeout.as_secs()
            ))),
        };
        drop(replies_gone);
        // In-flight I/O references buffers the kernel may still write: let it finish
        // before this thread's ring and buffers go away.
        while tasks.join_next().await.is_some() {}
        drop(reply_tx);
        let _ = writer.await;
        if session.is_some() {
            self.counters.sessions.fetch_sub(1, Ordering::Relaxed);
        }
        drop(ring);
        res
    }

    /// OPEN, STAT, PING, DELETE.
    async fn control(
        &self,
        h: &RequestHeader,
        p: &[u8],
        session: &mut Option<Session>,
        ring: &TokioUring,
        features: wire::version::Features,
    ) -> Result<Reply, ReplicationError> {
        Ok(match h.op {
            // On an open session a PING is a cheap fence probe: an owner that only
            // reads its local replica still learns that a newer owner took over.
            Op::Ping => match session {
                Some(sess) if sess.hosted.is_deleted() => {
                    Reply::message(Status::NotOpen, h.id, "the replica was deleted")
                }
                Some(sess) if sess.hosted.generation() != sess.generation => Reply {
                    aux: sess.hosted.generation().0,
                    ..Reply::new(Status::Fenced, h.id)
                },
                _ => Reply::new(Status::Ok, h.id),
            },
            Op::Stat => {
                let req: StatRequest = decode_control(p)?;
                match self.store.load(&req.replica) {
                    Ok(hosted) => Reply::json(
                        h.id,
                        &StatReply {
                            label: hosted.map(|h| h.label()),
                            capacity: self.store.capacity(),
                        },
                    ),
                    Err(r) => Reply::refused(h.id, r),
                }
            }
            Op::Open => {
                let req: OpenRequest = decode_control(p)?;
                if session.is_some() {
                    return Err(ReplicationError::Protocol(
                        "second OPEN on one connection".into(),
                    ));
                }
                match self.store.open(&req).await {
                    Ok(mut o) => {
                        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
                        if features.has(wire::version::Features::INSTANCE) {
                            o.reply.instance = Some(self.instance.clone());
                        }
                        let reply = Reply::json(h.id, &o.reply);
                        *session = Some(Session {
                            id: o.session,
                            generation: o.reply.label.generation,
                            replica: Rc::new(LocalReplica::new(
                                o.hosted.backing.clone(),
                                ring.clone(),
                            )),
                            hosted: o.hosted,
                        });
                        reply
                    }
                    Err(r) => {
                        tracing::warn!(replica = %req.replica, volume = %req.volume,
                            generation = req.generation.0, status = ?r.status, message = %r.message, "OPEN refused");
                        Reply::refused(h.id, r)
                    }
                }
            }
            Op::Delete => {
                let req: DeleteRequest = decode_control(p)?;
                if session.is_some() {
                    return Err(ReplicationError::Protocol(
                        "DELETE on a connection with an open replica".into(),
                    ));
                }
                match self.store.delete(&req).await {
                    Ok(reply) => Reply::json(h.id, &reply),
                    Err(r) => {
                        tracing::warn!(replica = %req.replica, status = ?r.status, message = %r.message, "DELETE refused");
                        Reply::refused(h.id, r)
                    }
                }
            }
            op => unreachable!("fenced op {op:?} handled by the caller"),
        })
    }
}

struct Session {
    id: SessionId,
    generation: wire::Generation,
    hosted: Arc<Hosted>,
    replica: Rc<LocalReplica<TokioUring>>,
}

enum Payload {
    None,
    Vec(Vec<u8>),
    Aligned(PooledBuf, usize),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Vec(v) => v,
            Payload::Aligned(b, n) => &b.as_slice()[..*n],
        }
    }
}

/// A reply on its way to the socket, with the permits its request holds until then.
struct Reply {
    status: Status,
    id: RequestId,
    aux: u64,
    payload: Payload,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Reply {
    fn new(status: Status, id: RequestId) -> Reply {
        Reply {
            status,
            id,
            aux: 0,
            payload: Payload::None,
            permits: Vec::new(),
        }
    }

    fn message(status: Status, id: RequestId, msg: &str) -> Reply {
        Reply {
            payload: Payload::Vec(msg.as_bytes().to_vec()),
            ..Reply::new(status, id)
        }
    }

    fn refused(id: RequestId, r: Refused) -> Reply {
        Reply {
            aux: r.aux,
            ..Reply::message(r.status, id, &r.message)
        }
    }

    fn json<T: Serialize>(id: RequestId, v: &T) -> Reply {
        Reply {
            payload: Payload::Vec(encode_control(v)),
            ..Reply::new(Status::Ok, id)
        }
    }

    fn holding(mut self, permits: Vec<OwnedSemaphorePermit>) -> Reply {
        self.permits.extend(permits);
        self
    }
}

async fn serve_fenced(
    hosted: &Hosted,
    replica: &LocalReplica<TokioUring>,
    session: SessionId,
    session_generation: wire::Generation,
    h: RequestHeader,
    payload: Payload,
) -> Reply {
    // Checked under the shared lock: an OPEN that changes either waits for us.
    let _shared = hosted.fence.read().await;
    if hosted.is_deleted() {
        return Reply::message(Status::NotOpen, h.id, "the replica was deleted");
    }
    let current = hosted.generation();
    // The frame's generation must be its session's, and the session's the replica's:
    // a client cannot stamp a newer generation on an old session.
    if h.generation != session_generation || session_generation != current {
        return Reply {
            aux: current.0,
            ..Reply::new(Status::Fenced, h.id)
        };
    }
    if hosted.current_session() != session {
        return Reply::message(
            Status::NotOpen,
            h.id,
            "session superseded by a later OPEN of the same owner",
        );
    }
    let (off, len) = (h.offset, h.len as usize);
    let view = if h.flags & FLAG_VIEW != 0 {
        match View::decode(h.op, payload.bytes()) {
            Ok(v) => Some(v),
            Err(e) => return Reply::message(Status::Invalid, h.id, &e.to_string()),
        }
    } else {
        None
    };
    let snapshot = view.and_then(|v| v.of);
    let res = match h.op {
        Op::Read => {
            let mut buf = PooledBuf::take(len);
            let read = match snapshot {
                Some(u) => replica.read_snapshot(u, off, buf.as_mut_slice()).await,
                None => replica.read(off, buf.as_mut_slice()).await,
            };
            match read {
                Ok(()) => {
                    return Reply {
                        payload: Payload::Aligned(buf, len),
                        ..Reply::new(Status::Ok, h.id)
                    }
                }
                Err(e) => Err(e),
            }
        }
        Op::Write => {
            replica
                .write(off, payload.bytes(), h.flags & FLAG_FUA != 0)
                .await
        }
        Op::Flush => replica.flush().await,
        Op::Checksum => match replica
            .checksum_of(snapshot, off, ByteLen(len as u64))
            .await
        {
            Ok(crc) => {
                return Reply {
                    payload: Payload::Vec(crc.to_vec()),
                    ..Reply::new(Status::Ok, h.id)
                }
            }
            Err(e) => Err(e),
        },
        Op::DataExtents => {
            let range = ByteLen(len as u64);
            // Storage that cannot tell (a block device) answers all of it as data.
            let extents = match view {
                Some(v) => match replica.diff_extents(v.of, v.since, off, range) {
                    Ok(e) => e,
                    Err(errno) => {
                        return Reply {
                            aux: errno.0 as u64,
                            ..Reply::new(Status::IoError, h.id)
                        }
                    }
                },
                None => replica.data_extents(off, range),
            }
            .unwrap_or_else(|| vec![(off, range)]);
            return Reply {
                payload: Payload::Vec(encode_extents(&extents)),
                ..Reply::new(Status::Ok, h.id)
            };
        }
        Op::Discard => replica.discard(off, ByteLen(len as u64)).await,
        Op::WriteZeroes => {
            replica
                .write_zeroes(off, ByteLen(len as u64), h.flags & FLAG_NO_UNMAP != 0)
                .await
        }
        Op::SetLabel => {
            return match decode_control::<LabelUpdate>(payload.bytes()) {
                Ok(u) => match hosted.set_label(&u) {
                    Ok(()) => Reply::new(Status::Ok, h.id),
                    Err(r) => Reply::refused(h.id, r),
                },
                Err(e) => Reply::message(Status::Invalid, h.id, &e.to_string()),
            }
        }
        Op::Snapshot => {
            let action: SnapshotAction = match decode_control(payload.bytes()) {
                Ok(a) => a,
                Err(e) => return Reply::message(Status::Invalid, h.id, &e.to_string()),
            };
            // The store's operations block (fsyncs, waiting for this connection's
            // own flushes to commit): on a thread of their own, not this one.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let backing = hosted.backing.clone();
            std::thread::spawn(move || {
                let _ = tx.send(backing.snapshot_action(&action));
            });
            return match rx.await {
                Ok(Ok(reply)) => Reply::json(h.id, &reply),
                Ok(Err(e)) => {
                    tracing::warn!(replica = %hosted.backing.path().display(), error = %e, "snapshot operation failed");
                    Reply {
                        aux: libc::EIO as u64,
                        ..Reply::message(Status::IoError, h.id, &e.to_string())
                    }
                }
                Err(_) => Reply::message(Status::IoError, h.id, "the snapshot operation died"),
            };
        }
        op => unreachable!("control op {op:?} in serve_fenced"),
    };
    match res {
        Ok(()) => Reply::new(Status::Ok, h.id),
        Err(errno) => {
            tracing::error!(op = ?h.op, offset = h.offset.0, %errno, "replica I/O failed");
            Reply {
                aux: errno.0 as u64,
                ..Reply::new(Status::IoError, h.id)
            }
        }
    }
}

/// Seals and sends replies in the order they are queued, flushing when no more
/// are; a reply's permits are released once it is written.
async fn reply_writer(
    wr: tokio::net::tcp::OwnedWriteHalf,
    mut sealer: Sealer,
    mut rx: mpsc::Receiver<Reply>,
    deadline: Duration,
) {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(r) = next.take() {
            let payload = r.payload.bytes();
            let h = ReplyHeader {
                status: r.status,
                id: r.id,
                aux: r.aux,
                payload_len: payload.len() as u32,
            };
            let head = sealer.seal_reply(&h, payload);
            if !within(deadline, wr.write_all(&head)).await
                || !within(deadline, wr.write_all(payload)).await
            {
                return;
            }
            next = rx.try_recv().ok();
        }
        if !within(deadline, wr.flush()).await {
            return;
        }
    }
}

/// `io` completed without error within `deadline`.
async fn within(
    deadline: Duration,
    io: impl std::future::Future<Output = std::io::Result<()>>,
) -> bool {
    matches!(tokio::time::timeout(deadline, io).await, Ok(Ok(())))
}

async fn skip(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    n: u32,
) -> Result<(), ReplicationError> {
    let mut left = n as u64;
    let mut sink = [0u8; 4096];
    while left > 0 {
        let k = left.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..k])
            .await
            .map_err(ReplicationError::Net)?;
        left -= k as u64;
    }
    Ok(())
}
