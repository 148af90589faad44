//! The replica server: serves the replicas this node hosts to remote volume owners.
//!
//! * One listener task accepts; each authenticated connection gets its own thread
//!   with a current-thread tokio runtime, so the replica I/O can use the same
//!   io_uring [`LocalReplica`] code as the ublk queues ([`TokioUring`] drives a
//!   private ring from tokio). Requests on a connection run concurrently.
//! * A replica is `<storage_dir>/<id>.img` (created sparse on an authorised OPEN
//!   with `create`) plus `<id>.meta`: its volume, size, and the highest owner
//!   generation it has seen, written durably (temp file, fsync, rename, fsync dir)
//!   before the OPEN that raised it is answered.
//! * Fencing: every I/O frame carries the generation, session and volume id of its
//!   OPEN. A frame whose generation is below the replica's is answered FENCED and
//!   not executed. An OPEN that raises the generation waits for the I/O already
//!   admitted under the old one (a read/write lock), so after its reply no write of
//!   an older owner can land.
//! * Anything malformed, oversized or out of range closes the connection with a
//!   logged reason; the server carries on.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use io_uring::IoUring;
use replication::local::{AlignedBuf, Create, LocalBacking, LocalReplica};
use replication::remote::auth::{random_u64, server_handshake, Secret, HANDSHAKE_TIMEOUT};
use replication::remote::wire::{
    self, Op, OpenReply, OpenRequest, ReplyHeader, RequestHeader, StatReply, StatRequest, Status,
    FLAG_FUA, FLAG_NO_UNMAP, REQUEST_HEADER_LEN,
};
use replication::uring::Uring;
use replication::{ByteLen, ByteOffset, Replica, ReplicationError};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::error::DaemonError;

/// What `<id>.meta` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaMeta {
    pub version: u32,
    pub replica: String,
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    /// Highest owner generation accepted; lower ones are fenced.
    pub generation: u64,
    /// The activation (random id) that holds `generation`; it may reconnect.
    pub owner: u64,
    /// An owner reported that this replica missed writes; stays set until a rebuild.
    #[serde(default)]
    pub stale: bool,
}

const META_VERSION: u32 = 1;

/// A replica opened by this server, shared by every connection that uses it.
struct Hosted {
    backing: Arc<LocalBacking>,
    meta: Mutex<ReplicaMeta>,
    /// Mirrors `meta.generation` for the per-frame check.
    generation: AtomicU64,
    /// The session of the latest accepted OPEN: a reconnecting owner supersedes its
    /// old connection, whose late frames must not land after it.
    session: AtomicU64,
    /// I/O holds it shared from its generation check to its completion; an OPEN
    /// that raises the generation holds it exclusively.
    fence: tokio::sync::RwLock<()>,
    volume_id: u64,
}

/// Connections authenticating at once (each holds a socket for up to 10 s).
const MAX_HANDSHAKES: usize = 64;
/// I/O requests executing at once per connection (a client queue depth is 128).
const MAX_IN_FLIGHT: usize = 256;

pub struct Server {
    dir: PathBuf,
    secret: Secret,
    hosted: Mutex<HashMap<String, Arc<Hosted>>>,
}

impl Server {
    pub fn new(dir: PathBuf, secret: Secret) -> Result<Arc<Server>, DaemonError> {
        std::fs::create_dir_all(&dir)
            .map_err(DaemonError::io(format!("create {}", dir.display())))?;
        Ok(Arc::new(Server {
            dir,
            secret,
            hosted: Mutex::new(HashMap::new()),
        }))
    }

    /// Bind now (so a bad address fails the start), then accept on `rt`.
    pub fn listen(
        self: &Arc<Self>,
        addr: std::net::SocketAddr,
        rt: &tokio::runtime::Handle,
    ) -> Result<std::net::SocketAddr, DaemonError> {
        let std_listener = std::net::TcpListener::bind(addr)
            .map_err(DaemonError::io(format!("replica server: bind {addr}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(DaemonError::io("replica server: set_nonblocking"))?;
        let local = std_listener
            .local_addr()
            .map_err(DaemonError::io("replica server: local_addr"))?;
        let me = self.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        rt.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "replica server: cannot register listener");
                    return;
                }
            };
            loop {
                match listener.accept().await {
                    Ok((mut s, peer)) => {
                        // Authenticate on the acceptor, a bounded number at a time: an
                        // unauthenticated peer gets no thread and cannot pile them up.
                        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "too many handshakes in progress: dropping connection");
                            continue;
                        };
                        let me = me.clone();
                        tokio::spawn(async move {
                            let auth = tokio::time::timeout(
                                HANDSHAKE_TIMEOUT,
                                server_handshake(&mut s, &me.secret),
                            )
                            .await;
                            drop(permit);
                            match auth {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::warn!(%peer, error = %e, "replica connection refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::warn!(%peer, "replica connection refused: handshake timed out");
                                    return;
                                }
                            }
                            let spawned = std::thread::Builder::new()
                                .name(format!("repl-{peer}"))
                                .spawn(move || me.connection_thread(s, peer));
                            if let Err(e) = spawned {
                                tracing::error!(%peer, error = %e, "cannot start a connection thread");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replica server: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(listen = %local, dir = %self.dir.display(), "replica server listening");
        Ok(local)
    }

    fn connection_thread(self: Arc<Self>, s: TcpStream, peer: std::net::SocketAddr) {
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
            self.serve_connection(s).await
        });
        match res {
            Ok(()) => tracing::debug!(%peer, "replica connection closed"),
            Err(e) => tracing::warn!(%peer, error = %e, "replica connection closed"),
        }
    }

    /// Serve an authenticated connection.
    async fn serve_connection(&self, s: TcpStream) -> Result<(), ReplicationError> {
        let (rd, wr) = s.into_split();
        // Bounds the I/O in flight per connection (memory, and the ring's capacity):
        // the next frame is not read until a slot frees up, so TCP pushes back.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let (reply_tx, reply_rx) = mpsc::unbounded_channel::<(ReplyHeader, Payload)>();
        let writer = tokio::task::spawn_local(reply_writer(wr, reply_rx));
        let ring = TokioUring::new()?;
        let mut session: Option<Session> = None;
        let mut tasks = tokio::task::JoinSet::new();
        let res = loop {
            let mut hb = [0u8; REQUEST_HEADER_LEN];
            match rd.read_exact(&mut hb).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(ReplicationError::Net(e)),
            }
            let h = match RequestHeader::decode(&hb) {
                Ok(h) => h,
                Err(e) => break Err(e),
            };
            // Reap finished request tasks as we go.
            while tasks.try_join_next().is_some() {}
            if h.op.is_io() {
                let sess = match &session {
                    Some(sess) if h.session == sess.id && h.volume == sess.hosted.volume_id => sess,
                    _ => {
                        // Drain the payload to stay in sync, then refuse.
                        if let Err(e) = skip(&mut rd, h.payload_len).await {
                            break Err(e);
                        }
                        let msg = b"no open replica for this session/volume";
                        let _ = reply_tx.send((
                            ReplyHeader::new(Status::NotOpen, h.id).with_payload(msg),
                            Payload::Vec(msg.to_vec()),
                        ));
                        continue;
                    }
                };
                let size = sess.hosted.meta.lock().unwrap().size;
                if h.offset.saturating_add(h.len as u64) > size
                    || !h.offset.is_multiple_of(512)
                    || !h.len.is_multiple_of(512)
                {
                    break Err(ReplicationError::Protocol(format!(
                        "{:?} of {} bytes at {} is outside the replica ({} bytes) or not 512-aligned",
                        h.op, h.len, h.offset, size
                    )));
                }
                let mut payload = None;
                if h.op == Op::Write {
                    let mut buf = AlignedBuf::zeroed(h.payload_len as usize);
                    if let Err(e) = rd.read_exact(buf.as_mut_slice()).await {
                        break Err(ReplicationError::Net(e));
                    }
                    if let Err(e) = h.verify_payload(buf.as_slice()) {
                        break Err(e);
                    }
                    payload = Some(buf);
                }
                let (hosted, replica, tx) =
                    (sess.hosted.clone(), sess.replica.clone(), reply_tx.clone());
                let (sid, sgen) = (sess.id, sess.generation);
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break Ok(());
                };
                tasks.spawn_local(async move {
                    let reply = serve_io(&hosted, &replica, sid, sgen, h, payload).await;
                    drop(slot);
                    let _ = tx.send(reply);
                });
                continue;
            }
            // Control ops: handled in order.
            let mut p = vec![0u8; h.payload_len as usize];
            if let Err(e) = rd.read_exact(&mut p).await {
                break Err(ReplicationError::Net(e));
            }
            if let Err(e) = h.verify_payload(&p) {
                break Err(e);
            }
            let reply = match h.op {
                // On an open session a PING is a cheap fence probe: an owner that only
                // reads its local replica still learns that a newer owner took over.
                Op::Ping => match &session {
                    Some(sess)
                        if sess.hosted.generation.load(Ordering::SeqCst) != sess.generation =>
                    {
                        let mut r = ReplyHeader::new(Status::Fenced, h.id);
                        r.aux = sess.hosted.generation.load(Ordering::SeqCst);
                        (r, Payload::None)
                    }
                    _ => (ReplyHeader::new(Status::Ok, h.id), Payload::None),
                },
                Op::Stat => match wire::decode_control::<StatRequest>(&p) {
                    Ok(req) => self.stat(h.id, &req),
                    Err(e) => break Err(e),
                },
                Op::Open => match wire::decode_control::<OpenRequest>(&p) {
                    Ok(req) => {
                        if session.is_some() {
                            break Err(ReplicationError::Protocol(
                                "second OPEN on one connection".into(),
                            ));
                        }
                        match self.open(&req, &ring).await {
                            Ok((sess, reply)) => {
                                session = Some(sess);
                                let body = wire::encode_control(&reply);
                                (
                                    ReplyHeader::new(Status::Ok, h.id).with_payload(&body),
                                    Payload::Vec(body),
                                )
                            }
                            Err((st, aux, msg)) => {
                                tracing::warn!(replica = %req.replica, volume = %req.volume,
                                    generation = req.generation, status = ?st, %msg, "OPEN refused");
                                let body = msg.into_bytes();
                                let mut r = ReplyHeader::new(st, h.id).with_payload(&body);
                                r.aux = aux;
                                (r, Payload::Vec(body))
                            }
                        }
                    }
                    Err(e) => break Err(e),
                },
                _ => unreachable!("I/O ops handled above"),
            };
            let _ = reply_tx.send(reply);
        };
        // In-flight I/O references buffers the kernel may still write: let it finish
        // before this thread's ring and buffers go away.
        while tasks.join_next().await.is_some() {}
        drop(reply_tx);
        let _ = writer.await;
        res
    }

    fn paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{id}.img")),
            self.dir.join(format!("{id}.meta")),
        )
    }

    fn stat(&self, id: u64, req: &StatRequest) -> (ReplyHeader, Payload) {
        if !wire::valid_name(&req.replica) {
            let msg = format!("invalid replica id {:?}", req.replica).into_bytes();
            return (
                ReplyHeader::new(Status::Invalid, id).with_payload(&msg),
                Payload::Vec(msg),
            );
        }
        let meta = match self.hosted.lock().unwrap().get(&req.replica) {
            Some(h) => Ok(Some(h.meta.lock().unwrap().clone())),
            None => load_meta(&self.paths(&req.replica).1),
        };
        let reply = match meta {
            Ok(Some(m)) => StatReply {
                exists: true,
                volume: Some(m.volume),
                size: m.size,
                generation: m.generation,
                owner: m.owner,
                stale: m.stale,
            },
            Ok(None) => StatReply {
                exists: false,
                volume: None,
                size: 0,
                generation: 0,
                owner: 0,
                stale: false,
            },
            Err(e) => {
                let msg = e.into_bytes();
                return (
                    ReplyHeader::new(Status::IoError, id).with_payload(&msg),
                    Payload::Vec(msg),
                );
            }
        };
        let body = wire::encode_control(&reply);
        (
            ReplyHeader::new(Status::Ok, id).with_payload(&body),
            Payload::Vec(body),
        )
    }

    /// OPEN: find or create the replica, check its identity, raise its generation.
    async fn open(
        &self,
        req: &OpenRequest,
        ring: &TokioUring,
    ) -> Result<(Session, OpenReply), (Status, u64, String)> {
        let invalid = |m: String| Err((Status::Invalid, 0, m));
        if !wire::valid_name(&req.replica) || !wire::valid_name(&req.volume) {
            return invalid(format!(
                "invalid replica id {:?} or volume name {:?}",
                req.replica, req.volume
            ));
        }
        if req.generation == 0 {
            return invalid("generation 0 is reserved (a fresh replica holds it)".into());
        }
        if !matches!(req.block_size, 512 | 4096)
            || req.size == 0
            || !req.size.is_multiple_of(req.block_size as u64)
        {
            return invalid(format!(
                "bad geometry: size {} block size {}",
                req.size, req.block_size
            ));
        }
        let (hosted, created) = self.hosted(req)?;
        {
            let m = hosted.meta.lock().unwrap();
            if m.volume != req.volume {
                return Err((
                    Status::Conflict,
                    0,
                    format!(
                        "replica {} belongs to volume {:?}, not {:?}",
                        req.replica, m.volume, req.volume
                    ),
                ));
            }
            if m.size != req.size || m.block_size != req.block_size {
                return Err((
                    Status::Conflict,
                    0,
                    format!(
                        "replica {} is {} bytes / {} B blocks, the volume wants {} / {}",
                        req.replica, m.size, m.block_size, req.size, req.block_size
                    ),
                ));
            }
        }
        // Wait for I/O admitted under an older generation, then raise it durably.
        let _excl = hosted.fence.write().await;
        let mut m = hosted.meta.lock().unwrap().clone();
        let previous_stale = m.stale;
        let same_owner = req.generation == m.generation && req.owner == m.owner;
        if req.generation < m.generation || (req.generation == m.generation && !same_owner) {
            return Err((
                Status::Fenced,
                m.generation,
                format!(
                    "generation {} is not above the replica's {}",
                    req.generation, m.generation
                ),
            ));
        }
        let (previous_generation, previous_owner) = (m.generation, m.owner);
        if req.stale && !m.stale {
            m.stale = true;
            tracing::warn!(replica = %req.replica, volume = %req.volume,
                "owner marks the replica stale (missed writes): no owner trusts it until a rebuild");
        }
        if !same_owner || m.stale != previous_stale {
            m.generation = req.generation;
            m.owner = req.owner;
            save_meta(&self.paths(&req.replica).1, &m)
                .map_err(|e| (Status::IoError, libc::EIO as u64, e))?;
            *hosted.meta.lock().unwrap() = m.clone();
            hosted.generation.store(m.generation, Ordering::SeqCst);
            tracing::info!(replica = %req.replica, volume = %req.volume, generation = m.generation,
                "replica opened by a new owner generation");
        }
        let id = random_u64();
        hosted.session.store(id, Ordering::SeqCst);
        let session = Session {
            id,
            generation: m.generation,
            replica: Rc::new(LocalReplica::new(hosted.backing.clone(), ring.clone())),
            hosted: hosted.clone(),
        };
        let reply = OpenReply {
            session: session.id,
            generation: m.generation,
            size: m.size,
            created,
            previous_generation,
            previous_owner,
        };
        Ok((session, reply))
    }

    /// The hosted replica for `req`, opening (or with `create`, making) it.
    fn hosted(&self, req: &OpenRequest) -> Result<(Arc<Hosted>, bool), (Status, u64, String)> {
        let mut map = self.hosted.lock().unwrap();
        if let Some(h) = map.get(&req.replica) {
            return Ok((h.clone(), false));
        }
        let (img, meta_path) = self.paths(&req.replica);
        let io_err = |e: String| (Status::IoError, libc::EIO as u64, e);
        let (meta, created) = match load_meta(&meta_path).map_err(io_err)? {
            Some(m) => (m, false),
            None if !req.create => {
                return Err((
                    Status::NotFound,
                    0,
                    format!(
                        "no replica {} on this server (and OPEN did not ask to create it)",
                        req.replica
                    ),
                ))
            }
            None => {
                let m = ReplicaMeta {
                    version: META_VERSION,
                    replica: req.replica.clone(),
                    volume: req.volume.clone(),
                    size: req.size,
                    block_size: req.block_size,
                    generation: 0,
                    owner: 0,
                    stale: false,
                };
                (m, true)
            }
        };
        // A new replica starts all zeroes: replace any image a failed create left.
        if created {
            let _ = std::fs::remove_file(&img);
        }
        let mode = if created {
            Create::IfMissing
        } else {
            Create::Never
        };
        let backing =
            LocalBacking::open(&img, meta.size, mode).map_err(|e| io_err(e.to_string()))?;
        if created {
            save_meta(&meta_path, &meta).map_err(io_err)?;
            tracing::info!(replica = %req.replica, volume = %req.volume, size = req.size, "replica created");
        }
        let h = Arc::new(Hosted {
            backing: Arc::new(backing),
            generation: AtomicU64::new(meta.generation),
            session: AtomicU64::new(0),
            volume_id: wire::volume_id(&meta.volume),
            meta: Mutex::new(meta),
            fence: tokio::sync::RwLock::new(()),
        });
        map.insert(req.replica.clone(), h.clone());
        Ok((h, created))
    }
}

struct Session {
    id: u64,
    generation: u64,
    hosted: Arc<Hosted>,
    replica: Rc<LocalReplica<TokioUring>>,
}

enum Payload {
    None,
    Vec(Vec<u8>),
    Aligned(AlignedBuf, usize),
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

async fn serve_io(
    hosted: &Hosted,
    replica: &LocalReplica<TokioUring>,
    session: u64,
    session_generation: u64,
    h: RequestHeader,
    payload: Option<AlignedBuf>,
) -> (ReplyHeader, Payload) {
    // Checked under the shared lock: an OPEN that changes either waits for us.
    let _shared = hosted.fence.read().await;
    let current = hosted.generation.load(Ordering::SeqCst);
    // The frame's generation must be its session's, and the session's the replica's:
    // a client cannot stamp a newer generation on an old session.
    if h.generation != session_generation || session_generation != current {
        let mut r = ReplyHeader::new(Status::Fenced, h.id);
        r.aux = current;
        return (r, Payload::None);
    }
    if hosted.session.load(Ordering::SeqCst) != session {
        let msg = b"session superseded by a later OPEN of the same owner";
        let r = ReplyHeader::new(Status::NotOpen, h.id).with_payload(msg);
        return (r, Payload::Vec(msg.to_vec()));
    }
    let (off, len) = (ByteOffset(h.offset), h.len as usize);
    let res = match h.op {
        Op::Read => {
            let mut buf = AlignedBuf::zeroed(len);
            match replica.read(off, &mut buf.as_mut_slice()[..len]).await {
                Ok(()) => {
                    let r = ReplyHeader::new(Status::Ok, h.id).with_payload(&buf.as_slice()[..len]);
                    return (r, Payload::Aligned(buf, len));
                }
                Err(e) => Err(e),
            }
        }
        Op::Write => {
            let buf = payload.expect("write payload");
            replica
                .write(off, &buf.as_slice()[..len], h.flags & FLAG_FUA != 0)
                .await
        }
        Op::Flush => replica.flush().await,
        Op::Discard => replica.discard(off, ByteLen(len as u64)).await,
        Op::WriteZeroes => {
            replica
                .write_zeroes(off, ByteLen(len as u64), h.flags & FLAG_NO_UNMAP != 0)
                .await
        }
        _ => unreachable!("control op in serve_io"),
    };
    match res {
        Ok(()) => (ReplyHeader::new(Status::Ok, h.id), Payload::None),
        Err(errno) => {
            tracing::error!(op = ?h.op, offset = h.offset, %errno, "replica I/O failed");
            let mut r = ReplyHeader::new(Status::IoError, h.id);
            r.aux = errno.0 as u64;
            (r, Payload::None)
        }
    }
}

/// Sends replies in arrival order, flushing when no more are queued.
async fn reply_writer(
    wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(ReplyHeader, Payload)>,
) {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    while let Some((h, p)) = rx.recv().await {
        let mut next = Some((h, p));
        while let Some((h, p)) = next.take() {
            if wr.write_all(&h.encode()).await.is_err() || wr.write_all(p.bytes()).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
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

pub fn load_meta(path: &Path) -> Result<Option<ReplicaMeta>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice::<ReplicaMeta>(&b)
            .map(Some)
            .map_err(|e| format!("{}: corrupt replica metadata: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Durable replace: temp file, fsync, rename, fsync the directory.
pub fn save_meta(path: &Path, m: &ReplicaMeta) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let tmp = path.with_extension("meta.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&serde_json::to_vec_pretty(m).expect("meta serializes"))
        .map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(())
}

/// io_uring driven from a current-thread tokio runtime: the ring's fd becomes
/// readable when completions are queued; a driver task reaps them and wakes the
/// submitters. Lets the server reuse [`LocalReplica`] unchanged.
#[derive(Clone)]
pub struct TokioUring {
    inner: Rc<UringInner>,
}

struct UringInner {
    /// The registration owns the ring, so its fd stays valid while registered.
    ring: AsyncFd<RingCell>,
    slots: RefCell<HashMap<u64, Slot>>,
    next: std::cell::Cell<u64>,
}

struct RingCell(RefCell<IoUring>);

impl AsRawFd for RingCell {
    fn as_raw_fd(&self) -> RawFd {
        self.0.borrow().as_raw_fd()
    }
}

#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

impl TokioUring {
    /// Must be called inside a `LocalSet`: it spawns the reaper task there (which
    /// lives as long as the `LocalSet`).
    pub fn new() -> Result<TokioUring, ReplicationError> {
        let ring = IoUring::new(1024).map_err(ReplicationError::Uring)?;
        // SAFETY: `RingCell` owns the ring, so the fd is valid until the
        // registration is dropped with it.
        let ring = unsafe {
            AsyncFd::register_with_interest(
                RingCell(RefCell::new(ring)),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| ReplicationError::Uring(e.into()))?;
        let inner = Rc::new(UringInner {
            ring,
            slots: RefCell::new(HashMap::new()),
            next: std::cell::Cell::new(1),
        });
        let reaper = inner.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok(mut guard) = reaper.ring.readable().await else {
                    return;
                };
                reaper.reap();
                guard.clear_ready();
                // A completion that raced with clear_ready is seen on this pass.
                reaper.reap();
            }
        });
        Ok(TokioUring { inner })
    }
}

impl UringInner {
    fn reap(&self) {
        let mut ring = self.ring.get_ref().0.borrow_mut();
        // An SQE whose submit failed earlier is still queued: push it in now.
        if !ring.submission().is_empty() {
            let _ = ring.submit();
        }
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            if let Some(s) = slots.get_mut(&cqe.user_data()) {
                s.result = Some(cqe.result());
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

struct OpFuture {
    inner: Rc<UringInner>,
    key: u64,
}

impl Future for OpFuture {
    type Output = i32;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.inner.slots.borrow_mut();
        let slot = slots.get_mut(&self.key).expect("slot of a pending op");
        match slot.result {
            Some(r) => {
                slots.remove(&self.key);
                Poll::Ready(r)
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Uring for TokioUring {
    fn submit(&self, sqe: io_uring::squeue::Entry) -> impl Future<Output = i32> {
        let key = self.inner.next.get();
        self.inner.next.set(key + 1);
        self.inner.slots.borrow_mut().insert(key, Slot::default());
        let mut ring = self.inner.ring.get_ref().0.borrow_mut();
        let sqe = sqe.user_data(key);
        // SAFETY: the caller keeps the SQE's buffers alive until the future resolves
        // (Uring's contract), and connections wait for their in-flight I/O.
        unsafe {
            while ring.submission().push(&sqe).is_err() {
                let _ = ring.submit();
            }
        }
        // The SQE is queued either way; a failed submit is retried by the next one
        // (its buffers must stay valid, so it is never reported as done here).
        while let Err(e) = ring.submit() {
            if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                tracing::error!(error = %e, "io_uring submit failed");
                break;
            }
        }
        OpFuture {
            inner: self.inner.clone(),
            key,
        }
    }
}
