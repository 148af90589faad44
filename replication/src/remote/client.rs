//! The owner's side of a remote replica: one TCP connection to a replica server,
//! driven by tokio tasks, and [`RemoteReplica`], the per-queue [`Replica`] handle the
//! nexus uses.
//!
//! ## Threads and buffers
//! A ublk queue thread sleeps in `io_uring_enter`, so it cannot run tokio futures.
//! It hands each request (op, range, a raw pointer to the tag's buffer, a oneshot)
//! to the connection's writer task over a channel; the reader task completes the
//! oneshot and then *kicks* the queue (an eventfd the queue ring polls), which wakes
//! the queue thread so its executor polls the woken tag task.
//!
//! The tag buffer is borrowed by the `Replica` future, which resolves only when the
//! oneshot fires. The tasks guarantee the buffer is no longer touched by then:
//! a reply is matched only after the request was fully sent; a missed deadline or a
//! broken connection first *stops* both tasks (abort + join), and only then fails
//! the requests still pending. Payloads go from the tag buffer to the socket with no
//! copy; a READ reply is read into a connection buffer, checked (tag), and copied.
//!
//! ## Failure
//! A request that misses the deadline, or a dropped connection, is reported to the
//! volume's [`ConnEvents`] (which decides what the replica's state becomes: the
//! volume's `Health` owns it) *before* the pending requests fail (ETIMEDOUT /
//! ENOTCONN). The client then reconnects with backoff and reports the replica's
//! label; whether the replica takes I/O again is the volume's decision. A FENCED
//! reply — a newer owner took the replica — is reported too.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use wire::control::{
    decode_control, encode_control, DeleteReply, DeleteRequest, LabelUpdate, OpenReply,
    OpenRequest, StatReply, StatRequest,
};
use wire::frame::{
    decode_extents, Extent, Op, Opener, RequestHeader, Sealer, Status, View, FLAG_FUA,
    FLAG_NO_UNMAP, FLAG_VIEW, MAX_EXTENTS_RANGE, REPLY_HEADER_LEN, VIEW_LEN,
};
use wire::handshake::Secret;
use wire::label::Label;
use wire::{
    ByteLen, ByteOffset, Generation, ReplicaUuid, RequestId, SessionId, SnapshotUuid, VolumeTag,
};

use super::conn::{client_handshake, exchange};
use crate::error::{Errno, ReplicationError};
use crate::replica::{ExtentsFuture, IoFuture, IoResult, Replica};
pub use crate::wake::Kick;

/// Why a connection went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// A request (or the idle PING) got no reply within the deadline.
    Deadline { waited: Duration },
    /// The socket closed or broke, or the peer broke the protocol.
    Closed { why: String },
}

/// What a connection tells the volume it serves. Called on the network runtime;
/// implementations must not block on it.
pub trait ConnEvents: Send + Sync {
    /// The connection is gone; called before its pending requests fail.
    fn lost(&self, why: &Lost);
    /// A new connection is up (after a loss); `label` is the replica's, as OPEN
    /// returned it; `host_rebooted`: the server's host booted again since the
    /// last OPEN (what the replica acknowledged and had not flushed is gone).
    /// Returns whether the replica may take I/O: if not, the client marks it
    /// outdated on its server so no later owner trusts it either.
    fn reconnected(&self, label: &Label, host_rebooted: bool) -> bool;
    /// The replica answered FENCED: it belongs to a newer owner generation.
    fn fenced(&self, theirs: Generation);
}

/// Where a remote replica lives and who we are to it.
#[derive(Clone)]
pub struct RemoteSpec {
    /// "host:port".
    pub addr: String,
    pub secret: Secret,
    pub open: OpenRequest,
    /// Per-request deadline.
    pub deadline: Duration,
    pub connect_timeout: Duration,
}

impl RemoteSpec {
    pub fn location(&self) -> String {
        format!("{}@{}", self.open.replica, self.addr)
    }
}

/// A buffer of the ublk tag (or a test) that a request reads into or writes from.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the buffer is only touched by the connection tasks while the request is
// pending, and the borrowing future does not resolve before then (module docs).
unsafe impl Send for RawBuf {}

enum JobData {
    None,
    /// Data of a WRITE (source) or READ (destination) in the caller's buffer.
    Borrowed(RawBuf),
    /// A control payload the job owns (SET_LABEL).
    Owned(Vec<u8>),
    /// Where the reader puts a DATA_EXTENTS answer, checked, before it completes;
    /// the view it asks about, if not the head's data.
    Extents(Arc<Mutex<Option<Vec<Extent>>>>, Option<[u8; VIEW_LEN]>),
    /// A control request (SNAPSHOT) and where its answer goes: the reply's JSON,
    /// or the server's message when it refused.
    Control(Vec<u8>, ControlSlot),
    /// READ or CHECKSUM of a snapshot: the view sent, the answer's destination.
    ViewRead(RawBuf, [u8; VIEW_LEN]),
}

type ControlSlot = Arc<Mutex<Option<Result<Vec<u8>, String>>>>;

struct Job {
    op: Op,
    flags: u8,
    offset: u64,
    len: u32,
    data: JobData,
    submitted: Instant,
    done: oneshot::Sender<IoResult>,
    kick: Option<Arc<dyn Kick>>,
}

impl Job {
    /// The bytes that follow the header on the wire.
    fn payload(&self) -> &[u8] {
        match (&self.data, self.op) {
            // SAFETY: see RawBuf; the future borrowing it is pending.
            (JobData::Borrowed(b), Op::Write) => unsafe {
                std::slice::from_raw_parts(b.ptr, b.len)
            },
            (JobData::Owned(v), _) | (JobData::Control(v, _), _) => v,
            (JobData::ViewRead(_, v), _) | (JobData::Extents(_, Some(v)), _) => v,
            _ => &[],
        }
    }
}

struct Pending {
    job: Job,
    /// Fully handed to the socket: only then may a reply complete it.
    sent: bool,
}

/// Completes `job` and returns the kick to fire (callers batch kicks).
fn complete(job: Job, res: IoResult) -> Option<Arc<dyn Kick>> {
    let _ = job.done.send(res);
    job.kick
}

fn fire(kicks: &mut Vec<Arc<dyn Kick>>) {
    for (i, k) in kicks.iter().enumerate() {
        // One eventfd write per queue, not per completion.
        if !kicks[..i].iter().any(|o| Arc::ptr_eq(o, k)) {
            k.kick();
        }
    }
    kicks.clear();
}

/// One live connection: where jobs go.
struct Conn {
    tx: mpsc::UnboundedSender<Job>,
}

struct Shared {
    spec: RemoteSpec,
    location: String,
    conn: Mutex<Option<Conn>>,
    events: OnceLock<Arc<dyn ConnEvents>>,
    /// The owner dropped the client: stop reconnecting.
    closed: AtomicBool,
    rt: tokio::runtime::Handle,
    /// The server instance the last OPEN reached.
    instance: Mutex<Option<wire::control::ServerInstance>>,
    /// The features of the current (last) connection.
    features: std::sync::atomic::AtomicU32,
}

impl Shared {
    /// Where events go; nowhere once retired (its slot may hold another replica).
    fn events(&self) -> Option<&Arc<dyn ConnEvents>> {
        match self.closed.load(Ordering::SeqCst) {
            true => None,
            false => self.events.get(),
        }
    }

    fn submit(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        len: u32,
        data: JobData,
        kick: &Option<Arc<dyn Kick>>,
    ) -> oneshot::Receiver<IoResult> {
        let (done, rx) = oneshot::channel();
        let job = Job {
            op,
            flags,
            offset,
            len,
            data,
            submitted: Instant::now(),
            done,
            kick: kick.clone(),
        };
        let conn = self.conn.lock().unwrap();
        match conn.as_ref() {
            Some(c) => {
                if let Err(mpsc::error::SendError(job)) = c.tx.send(job) {
                    let _ = job.done.send(Err(Errno(libc::ENOTCONN)));
                }
            }
            None => {
                let _ = job.done.send(Err(Errno(libc::ENOTCONN)));
            }
        }
        rx
    }

    async fn set_label(&self, update: &LabelUpdate) -> IoResult {
        let data = JobData::Owned(encode_control(update));
        self.submit(Op::SetLabel, 0, 0, 0, data, &None)
            .await
            .unwrap_or(Err(Errno::EIO))
    }
}

/// A connection (and its reconnection loop) to one remote replica, shared by all
/// queues of the volume.
pub struct RemoteClient {
    shared: Arc<Shared>,
}

/// A slow peer is a network problem (retried at activation), not an auth failure.
fn timed_out(what: String) -> ReplicationError {
    ReplicationError::Net(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// An authenticated connection, framing state included.
struct Session {
    stream: TcpStream,
    sealer: Sealer,
    opener: Opener,
    /// What the handshake agreed the connection may use.
    features: wire::version::Features,
}

async fn dial(spec: &RemoteSpec) -> Result<Session, ReplicationError> {
    let net = |e| ReplicationError::Connect {
        addr: spec.addr.clone(),
        source: e,
    };
    let mut s = tokio::time::timeout(spec.connect_timeout, TcpStream::connect(&spec.addr))
        .await
        .map_err(|_| net(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
        .map_err(net)?;
    s.set_nodelay(true).map_err(net)?;
    super::keepalive(&s);
    let keys = tokio::time::timeout(spec.connect_timeout, client_handshake(&mut s, &spec.secret))
        .await
        .map_err(|_| timed_out(format!("{}: handshake", spec.addr)))??;
    Ok(Session {
        stream: s,
        sealer: Sealer::new(keys.send),
        opener: Opener::new(keys.recv),
        features: keys.features,
    })
}

/// One control request on a fresh, authenticated connection; returns the reply
/// payload for `Status::Ok`.
async fn control(
    sess: &mut Session,
    spec: &RemoteSpec,
    op: Op,
    payload: &[u8],
) -> Result<Vec<u8>, ReplicationError> {
    let mut h = RequestHeader::new(op, RequestId(0));
    h.payload_len = payload.len() as u32;
    let (r, p) = tokio::time::timeout(
        spec.connect_timeout,
        exchange(
            &mut sess.stream,
            &mut sess.sealer,
            &mut sess.opener,
            &h,
            payload,
        ),
    )
    .await
    .map_err(|_| timed_out(format!("{}: no reply to {op:?}", spec.addr)))??;
    match r.status {
        Status::Ok => Ok(p),
        Status::Fenced => Err(ReplicationError::Fenced {
            replica: spec.location(),
            ours: spec.open.generation,
            theirs: Generation(r.aux),
        }),
        st => Err(ReplicationError::Remote {
            replica: spec.location(),
            status: st,
            message: String::from_utf8_lossy(&p).into_owned(),
        }),
    }
}

/// The replica's label (if it exists) and its server's space, without claiming it
/// (an owner picks a generation above every replica's before it opens any).
pub async fn stat(spec: &RemoteSpec) -> Result<StatReply, ReplicationError> {
    let mut s = dial(spec).await?;
    let req = StatRequest {
        replica: spec.open.replica.clone(),
    };
    let p = control(&mut s, spec, Op::Stat, &encode_control(&req)).await?;
    let reply: StatReply = decode_control(&p)?;
    Ok(StatReply {
        label: reply.label.map(Label::checked).transpose()?,
        ..reply
    })
}

/// DELETE the replica `spec` names, if its label still shows `replica_uuid` of
/// `spec`'s volume (a retired copy: `ublkctl replica reclaim`). `spec.open`'s
/// generation and owner are the requester's.
pub async fn delete(
    spec: &RemoteSpec,
    replica_uuid: ReplicaUuid,
) -> Result<DeleteReply, ReplicationError> {
    let mut s = dial(spec).await?;
    let req = DeleteRequest {
        replica: spec.open.replica.clone(),
        volume_uuid: spec.open.volume_uuid,
        replica_uuid,
        generation: spec.open.generation,
        owner: spec.open.owner,
    };
    let p = control(&mut s, spec, Op::Delete, &encode_control(&req)).await?;
    decode_control(&p).map_err(Into::into)
}

async fn open(spec: &RemoteSpec) -> Result<(Session, OpenReply), ReplicationError> {
    let mut s = dial(spec).await?;
    let p = control(&mut s, spec, Op::Open, &encode_control(&spec.open)).await?;
    let reply: OpenReply = decode_control(&p)?;
    let label = reply.label.clone().checked()?;
    if label.generation != spec.open.generation
        || label.size != spec.open.size
        || label.block_size != spec.open.block_size
        || label.volume != spec.open.volume
        || label.volume_uuid != spec.open.volume_uuid
        || (reply.created && spec.open.create != Some(label.replica_uuid))
    {
        return Err(ReplicationError::Protocol(format!(
            "{}: OPEN reply does not match the request",
            spec.location()
        )));
    }
    Ok((s, reply))
}

impl RemoteClient {
    /// Connect, authenticate and OPEN the replica at `spec.open.generation`. Must be
    /// called on the runtime the connection tasks will use.
    pub async fn connect(spec: RemoteSpec) -> Result<(RemoteClient, OpenReply), ReplicationError> {
        let (sess, reply) = open(&spec).await?;
        let shared = Arc::new(Shared {
            location: spec.location(),
            spec,
            conn: Mutex::new(None),
            events: OnceLock::new(),
            closed: AtomicBool::new(false),
            rt: tokio::runtime::Handle::current(),
            instance: Mutex::new(reply.instance.clone()),
            features: std::sync::atomic::AtomicU32::new(sess.features.0),
        });
        start(&shared, sess, reply.session, reply.label.generation);
        Ok((RemoteClient { shared }, reply))
    }

    /// The replica left the volume's set: no more reconnects (a queue that is
    /// idle may hold its handle for long). A live connection still serves the
    /// requests in flight on it and closes with the last handle.
    pub fn retire(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
    }

    /// Where connection events go (set once, when the volume's health exists).
    pub fn set_events(&self, events: Arc<dyn ConnEvents>) {
        let _ = self.shared.events.set(events);
    }

    pub fn location(&self) -> &str {
        &self.shared.location
    }

    pub fn is_connected(&self) -> bool {
        self.shared.conn.lock().unwrap().is_some()
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.shared.rt
    }

    /// The generation this client's activation opened the replica at.
    pub fn generation(&self) -> Generation {
        self.shared.spec.open.generation
    }

    /// FLUSH outside the data path (at stop): every acknowledged write durable.
    pub async fn flush(&self) -> IoResult {
        self.shared
            .submit(Op::Flush, 0, 0, 0, JobData::None, &None)
            .await
            .unwrap_or(Err(Errno::EIO))
    }

    /// SET_LABEL: replace the membership part of the replica's label, durably.
    pub async fn set_label(&self, update: &LabelUpdate) -> IoResult {
        self.shared.set_label(update).await
    }

    /// SNAPSHOT: one snapshot operation on the replica, on the data connection
    /// (fenced like a write). A server without the feature is told to upgrade.
    pub async fn snapshot_action(
        &self,
        action: &wire::control::SnapshotAction,
    ) -> Result<wire::control::SnapshotReply, ReplicationError> {
        let features = wire::version::Features(self.shared.features.load(Ordering::SeqCst));
        if !features.has(wire::version::Features::SNAPSHOTS) {
            return Err(ReplicationError::SnapshotRefused(format!(
                "the replica server of {} does not take snapshots (a ublkd before them): upgrade it first",
                self.shared.location
            )));
        }
        let slot: ControlSlot = Arc::new(Mutex::new(None));
        let data = JobData::Control(encode_control(action), slot.clone());
        let res = self
            .shared
            .submit(Op::Snapshot, 0, 0, 0, data, &None)
            .await
            .unwrap_or(Err(Errno::EIO));
        let answer = slot.lock().unwrap().take();
        match (res, answer) {
            (_, Some(Ok(p))) => Ok(decode_control(&p)?),
            (_, Some(Err(message))) => Err(ReplicationError::SnapshotFailed {
                replica: self.shared.location.clone(),
                error: message,
            }),
            (Err(e), None) => Err(ReplicationError::SnapshotFailed {
                replica: self.shared.location.clone(),
                error: e.to_string(),
            }),
            (Ok(()), None) => Err(ReplicationError::Protocol(
                "SNAPSHOT answered without a reply".into(),
            )),
        }
    }

    /// Per-queue handle; `kick` wakes that queue's thread after a completion.
    pub fn replica(self: &Arc<Self>, kick: Option<Arc<dyn Kick>>) -> RemoteReplica {
        RemoteReplica {
            client: self.clone(),
            kick,
        }
    }
}

impl std::fmt::Debug for RemoteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteClient")
            .field("location", &self.shared.location)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Drop for RemoteClient {
    fn drop(&mut self) {
        // Closing the channel ends the writer; the supervisor then tears down.
        self.retire();
        self.shared.conn.lock().unwrap().take();
    }
}

/// What every fenced frame of a connection carries.
#[derive(Clone, Copy)]
struct FrameStamp {
    generation: Generation,
    session: SessionId,
    volume: VolumeTag,
}

/// Install a connection: writer, reader and a supervisor that enforces the deadline
/// and tears everything down on the first failure.
fn start(shared: &Arc<Shared>, sess: Session, session: SessionId, generation: Generation) {
    let Session {
        stream,
        sealer,
        opener,
        ..
    } = sess;
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    // The writer holds the queue's lock for its life; once it is stopped the
    // supervisor takes what it never picked up and fails it like the sent ones,
    // after the volume heard of the loss (dropping those jobs with the writer
    // would fail them first, and with EIO instead of the connection's errno).
    let queue = Arc::new(tokio::sync::Mutex::new(rx));
    let held = queue
        .clone()
        .try_lock_owned()
        .expect("a new queue is not locked");
    let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
    let (dead_tx, dead_rx) = mpsc::unbounded_channel::<Lost>();
    let stamp = FrameStamp {
        generation,
        session,
        volume: VolumeTag::of(&shared.spec.open.volume),
    };
    let sent = Arc::new(tokio::sync::Notify::new());
    let busy = Arc::new(IdleWake::default());
    let writer = shared.rt.spawn(writer(
        wr,
        sealer,
        held,
        (pending.clone(), busy.clone()),
        sent.clone(),
        stamp,
        dead_tx.clone(),
    ));
    let reader = shared.rt.spawn(reader(
        rd,
        opener,
        pending.clone(),
        sent,
        shared.clone(),
        dead_tx,
    ));
    *shared.conn.lock().unwrap() = Some(Conn { tx });
    shared.rt.spawn(supervise(
        shared.clone(),
        writer,
        reader,
        queue,
        (pending, busy),
        dead_rx,
    ));
}

fn closed(why: String) -> Lost {
    Lost::Closed { why }
}

async fn writer(
    mut wr: OwnedWriteHalf,
    mut sealer: Sealer,
    mut rx: tokio::sync::OwnedMutexGuard<mpsc::UnboundedReceiver<Job>>,
    (pending, busy): (Arc<Mutex<HashMap<u64, Pending>>>, Arc<IdleWake>),
    sent: Arc<tokio::sync::Notify>,
    stamp: FrameStamp,
    dead: mpsc::UnboundedSender<Lost>,
) {
    // Request ids 1, 2, ...: 0 was the OPEN.
    let mut next_id: u64 = 1;
    let mut batch: Vec<Job> = Vec::with_capacity(64);
    let mut heads: Vec<[u8; wire::frame::REQUEST_HEADER_LEN]> = Vec::with_capacity(64);
    let mut ids: Vec<u64> = Vec::with_capacity(64);
    loop {
        match rx.recv().await {
            Some(j) => batch.push(j),
            None => {
                let _ = dead.send(closed("client closed".into()));
                return;
            }
        }
        // Coalesce what is already queued into one vectored write.
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        heads.clear();
        ids.clear();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        // The payload slices point into each job's buffer (owned by its pending
        // entry, or the caller's borrowed buffer), which nobody frees or completes
        // before the entry is marked sent, after this write.
        let mut payloads: Vec<RawBuf> = Vec::with_capacity(batch.len());
        {
            let mut p = pending.lock().unwrap();
            // After the insertions below (under this lock): the supervisor reads the
            // map after it says it is idle.
            let _wake = WakeIfIdle(&busy);
            for job in batch.drain(..) {
                let id = next_id;
                next_id += 1;
                let mut h = RequestHeader::new(job.op, RequestId(id));
                h.flags = job.flags;
                h.offset = ByteOffset(job.offset);
                h.len = job.len;
                if job.op.is_fenced() {
                    h.generation = stamp.generation;
                    h.session = stamp.session;
                    h.volume = stamp.volume;
                    h.payload_len = job.payload().len() as u32;
                }
                heads.push(sealer.seal_request(&h, job.payload()));
                payloads.push(RawBuf {
                    ptr: job.payload().as_ptr().cast_mut(),
                    len: job.payload().len(),
                });
                ids.push(id);
                p.insert(id, Pending { job, sent: false });
            }
        }
        for (h, b) in heads.iter().zip(&payloads) {
            slices.push(IoSlice::new(h));
            if b.len > 0 {
                // SAFETY: see above; an owned payload's Vec moved into the map, but
                // its heap buffer did not move.
                slices.push(IoSlice::new(unsafe {
                    std::slice::from_raw_parts(b.ptr, b.len)
                }));
            }
        }
        if let Err(e) = write_all_vectored(&mut wr, &mut slices).await {
            let _ = dead.send(closed(format!("send failed: {e}")));
            return;
        }
        {
            let mut p = pending.lock().unwrap();
            for id in &ids {
                if let Some(e) = p.get_mut(id) {
                    e.sent = true;
                }
            }
        }
        sent.notify_waiters();
    }
}

async fn write_all_vectored(
    wr: &mut OwnedWriteHalf,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

async fn reader(
    rd: OwnedReadHalf,
    mut opener: Opener,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    sent: Arc<tokio::sync::Notify>,
    shared: Arc<Shared>,
    dead: mpsc::UnboundedSender<Lost>,
) {
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut payload: Vec<u8> = Vec::new();
    let mut kicks: Vec<Arc<dyn Kick>> = Vec::new();
    let die = |kicks: &mut Vec<Arc<dyn Kick>>, why: String| {
        fire(kicks);
        let _ = dead.send(closed(why));
    };
    loop {
        // Fire the batched kicks before we may sleep.
        if rd.buffer().len() < REPLY_HEADER_LEN {
            fire(&mut kicks);
        }
        let mut hb = [0u8; REPLY_HEADER_LEN];
        if let Err(e) = rd.read_exact(&mut hb).await {
            return die(&mut kicks, format!("connection lost: {e}"));
        }
        let res = async {
            let (r, seal) = opener.open_reply(&hb)?;
            payload.resize(r.payload_len as usize, 0);
            if rd.buffer().len() < payload.len() {
                // About to wait: wake the queues of what completed so far.
                fire(&mut kicks);
            }
            rd.read_exact(&mut payload)
                .await
                .map_err(|e| ReplicationError::Protocol(format!("connection lost: {e}")))?;
            opener.open_payload(&seal, &payload)?;
            Ok::<_, ReplicationError>(r)
        }
        .await;
        let r = match res {
            Ok(r) => r,
            Err(e) => return die(&mut kicks, e.to_string()),
        };
        // The server replies only after it received the whole request, but the
        // writer may not have marked it sent yet: wait for that, so a reply never
        // completes a request whose buffer the writer still uses.
        let entry = loop {
            let notified = sent.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut p = pending.lock().unwrap();
                match p.get(&r.id.0) {
                    Some(e) if e.sent => break p.remove(&r.id.0),
                    Some(_) => {}
                    None => break None,
                }
            }
            fire(&mut kicks);
            notified.await;
        };
        let Some(Pending { job, .. }) = entry else {
            return die(
                &mut kicks,
                format!("protocol violation: reply to unknown request {}", r.id.0),
            );
        };
        if let JobData::Control(_, slot) = &job.data {
            *slot.lock().unwrap() = Some(match r.status {
                Status::Ok => Ok(payload.clone()),
                st => Err(format!("{st:?}: {}", String::from_utf8_lossy(&payload))),
            });
        }
        let res = match r.status {
            Status::Ok if job.op == Op::DataExtents => {
                match decode_extents(ByteOffset(job.offset), ByteLen(job.len.into()), &payload) {
                    Ok(extents) => {
                        if let JobData::Extents(slot, _) = &job.data {
                            *slot.lock().unwrap() = Some(extents);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        // Put it back so teardown fails it after the tasks stopped.
                        pending
                            .lock()
                            .unwrap()
                            .insert(r.id.0, Pending { job, sent: true });
                        return die(&mut kicks, format!("protocol violation: {e}"));
                    }
                }
            }
            Status::Ok if matches!(job.op, Op::Read | Op::Checksum) => {
                let (JobData::Borrowed(b) | JobData::ViewRead(b, _)) = job.data else {
                    unreachable!("a read has a buffer")
                };
                if payload.len() != b.len {
                    let op = job.op;
                    // Put it back so teardown fails it after the tasks stopped.
                    pending
                        .lock()
                        .unwrap()
                        .insert(r.id.0, Pending { job, sent: true });
                    return die(
                        &mut kicks,
                        format!(
                            "protocol violation: {op:?} expecting {} bytes answered with {}",
                            b.len,
                            payload.len()
                        ),
                    );
                }
                // SAFETY: the job is ours (removed from `pending`), its future pending.
                unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), b.ptr, b.len) };
                Ok(())
            }
            Status::Ok => Ok(()),
            Status::IoError => Err(Errno(if (1..4096).contains(&r.aux) {
                r.aux as i32
            } else {
                libc::EIO
            })),
            Status::Fenced => {
                if let Some(ev) = shared.events() {
                    ev.fenced(Generation(r.aux));
                }
                Err(Errno::EIO)
            }
            st => {
                tracing::error!(replica = %shared.location, status = ?st,
                    message = %String::from_utf8_lossy(&payload), "replica refused a request");
                Err(Errno::EIO)
            }
        };
        if let Some(k) = complete(job, res) {
            kicks.push(k);
        }
    }
}

async fn supervise(
    shared: Arc<Shared>,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>,
    (pending, busy): (Arc<Mutex<HashMap<u64, Pending>>>, Arc<IdleWake>),
    mut dead: mpsc::UnboundedReceiver<Lost>,
) {
    let deadline = shared.spec.deadline;
    let mut last_ping = Instant::now();
    // Woken by the oldest request's deadline, the next ping of an idle connection,
    // or the first request after idleness (`busy`): no timer runs for its own sake.
    let why = loop {
        // Idle until the map says otherwise: a request entering it from now on
        // wakes us (the writer inserts, then looks at the flag).
        busy.idle.store(true, Ordering::SeqCst);
        let oldest = pending
            .lock()
            .unwrap()
            .values()
            .map(|p| p.job.submitted)
            .min();
        let now = Instant::now();
        let wake = match oldest {
            Some(t) if now.saturating_duration_since(t) > deadline => {
                break Lost::Deadline {
                    waited: now.saturating_duration_since(t),
                }
            }
            // Busy: requests in flight stand for the ping; a look each PING_EVERY
            // keeps the pings' cadence once the connection goes idle.
            Some(t) => {
                busy.idle.store(false, Ordering::SeqCst);
                last_ping = now;
                (t + deadline + Duration::from_millis(1)).min(now + PING_EVERY)
            }
            None if now.saturating_duration_since(last_ping) >= PING_EVERY => {
                // Idle: probe liveness and the fence. The ping has the deadline too:
                // look again by then (the writer does not wake us for our own ping).
                busy.idle.store(false, Ordering::SeqCst);
                last_ping = now;
                ping(&shared);
                (now + deadline + Duration::from_millis(1)).min(now + PING_EVERY)
            }
            None => last_ping + PING_EVERY,
        };
        tokio::select! {
            why = dead.recv() => break why.unwrap_or_else(|| closed("tasks ended".into())),
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = busy.wake.notified() => {}
        }
    };
    let closed_by_owner = shared.conn.lock().unwrap().take().is_none();
    // Stop both tasks before failing their requests: after this nothing touches a
    // request's buffer.
    writer.abort();
    reader.abort();
    let _ = writer.await;
    let _ = reader.await;
    // No job enters the queue any more (the connection is unset): what is left in
    // it joins the pending ones, to fail with them.
    {
        let mut rx = queue.lock().await;
        let mut p = pending.lock().unwrap();
        let mut unsent = u64::MAX;
        while let Ok(job) = rx.try_recv() {
            p.insert(unsent, Pending { job, sent: false });
            unsent -= 1;
        }
    }
    if closed_by_owner {
        fail_pending(&pending, &why);
        return;
    }
    tracing::error!(replica = %shared.location, reason = ?why, "replica connection down");
    // The volume decides the replica's fate (and records it) before any request
    // that depended on it completes.
    if let Some(ev) = shared.events() {
        ev.lost(&why);
    }
    fail_pending(&pending, &why);
    reconnect(shared).await;
}

fn fail_pending(pending: &Mutex<HashMap<u64, Pending>>, why: &Lost) {
    let errno = match why {
        Lost::Deadline { .. } => libc::ETIMEDOUT,
        Lost::Closed { .. } => libc::ENOTCONN,
    };
    let failed: Vec<Pending> = pending.lock().unwrap().drain().map(|(_, p)| p).collect();
    let mut kicks = Vec::new();
    for p in failed {
        kicks.extend(complete(p.job, Err(Errno(errno))));
    }
    fire(&mut kicks);
}

/// How the writer wakes the supervisor of an idle connection, which sleeps until its
/// next ping: only when it says it is idle, so a busy connection costs no wake-up
/// per request.
#[derive(Default)]
struct IdleWake {
    idle: AtomicBool,
    wake: tokio::sync::Notify,
}

/// Dropped after a batch entered the pending map: wakes an idle supervisor (the
/// requests' deadlines start now).
struct WakeIfIdle<'a>(&'a IdleWake);

impl Drop for WakeIfIdle<'_> {
    fn drop(&mut self) {
        if self.0.idle.swap(false, Ordering::SeqCst) {
            self.0.wake.notify_one();
        }
    }
}

/// How often an idle connection is probed.
const PING_EVERY: Duration = Duration::from_secs(1);

fn ping(shared: &Shared) {
    let (done, _) = oneshot::channel();
    let job = Job {
        op: Op::Ping,
        flags: 0,
        offset: 0,
        len: 0,
        data: JobData::None,
        submitted: Instant::now(),
        done,
        kick: None,
    };
    if let Some(c) = shared.conn.lock().unwrap().as_ref() {
        let _ = c.tx.send(job);
    }
}

/// Reconnect with exponential backoff, until it works, the replica is fenced, or
/// the client is dropped.
async fn reconnect(shared: Arc<Shared>) {
    // Never create on reconnect: a replica that vanished from its server lost the
    // volume's data.
    let mut spec = shared.spec.clone();
    spec.open.create = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::time::sleep(backoff).await;
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        match open(&spec).await {
            Ok((sess, reply)) => {
                shared.features.store(sess.features.0, Ordering::SeqCst);
                start(&shared, sess, reply.session, reply.label.generation);
                if shared.closed.load(Ordering::SeqCst) {
                    shared.conn.lock().unwrap().take(); // dropped meanwhile
                    return;
                }
                let host_rebooted = {
                    let mut known = shared.instance.lock().unwrap();
                    let rebooted = match (known.as_ref(), reply.instance.as_ref()) {
                        (Some(was), Some(now)) => was.host_rebooted_by(now),
                        // A server that does not say (a v2 peer): as before.
                        _ => false,
                    };
                    *known = reply.instance.clone();
                    rebooted
                };
                if host_rebooted {
                    tracing::warn!(replica = %shared.location,
                        "the replica's host booted again since we last reached it");
                }
                let usable = shared
                    .events()
                    .is_some_and(|ev| ev.reconnected(&reply.label, host_rebooted));
                tracing::info!(replica = %shared.location, takes_io = usable, "replica reachable again");
                if !usable && !reply.label.outdated {
                    // It missed writes: say so on the replica, so that no owner —
                    // this one after a restart, or another — trusts it.
                    let update = LabelUpdate {
                        membership: reply.label.membership.clone(),
                        outdated: true,
                    };
                    if let Err(e) = shared.set_label(&update).await {
                        tracing::warn!(replica = %shared.location, %e, "cannot mark the replica outdated");
                    }
                }
                return;
            }
            Err(ReplicationError::Fenced { theirs, .. }) => {
                if let Some(ev) = shared.events() {
                    ev.fenced(theirs);
                }
                return;
            }
            Err(e) => {
                tracing::debug!(replica = %shared.location, error = %e, "reconnect failed");
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The per-queue [`Replica`] handle of a remote replica.
pub struct RemoteReplica {
    client: Arc<RemoteClient>,
    kick: Option<Arc<dyn Kick>>,
}

impl RemoteReplica {
    /// The encoded view, when the session agreed on snapshots (a server without
    /// them would close the connection on it).
    fn view(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
    ) -> Option<[u8; VIEW_LEN]> {
        let features = wire::version::Features(self.client.shared.features.load(Ordering::SeqCst));
        features
            .has(wire::version::Features::SNAPSHOTS)
            .then(|| View { of, since }.encode())
    }

    /// READ or CHECKSUM of snapshot `of` into `out` (the data, or the 4-byte sum).
    fn snapshot_into<'a>(
        &'a self,
        op: Op,
        of: SnapshotUuid,
        offset: ByteOffset,
        len: u64,
        out: &'a mut [u8],
    ) -> IoFuture<'a> {
        let Some(view) = self.view(Some(of), None) else {
            return Box::pin(std::future::ready(Err(Errno(libc::EOPNOTSUPP))));
        };
        let raw = RawBuf {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        self.io(op, FLAG_VIEW, offset.0, len, JobData::ViewRead(raw, view))
    }

    /// DATA_EXTENTS of the head's data, or of a view. A range the op cannot carry
    /// (too long, not 512-aligned: the server would close the connection) is
    /// simply unknown.
    fn extents(
        &self,
        view: Option<[u8; VIEW_LEN]>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> ExtentsFuture<'_> {
        if !(1..=u64::from(MAX_EXTENTS_RANGE)).contains(&len.0)
            || !offset.0.is_multiple_of(512)
            || !len.0.is_multiple_of(512)
        {
            return Box::pin(std::future::ready(Ok(None)));
        }
        let flags = if view.is_some() { FLAG_VIEW } else { 0 };
        let slot = Arc::new(Mutex::new(None));
        let done = self.io(
            Op::DataExtents,
            flags,
            offset.0,
            len.0,
            JobData::Extents(slot.clone(), view),
        );
        Box::pin(async move {
            done.await?;
            Ok(slot.lock().unwrap().take())
        })
    }

    fn io(&self, op: Op, flags: u8, offset: u64, len: u64, data: JobData) -> IoFuture<'static> {
        let Ok(len32) = u32::try_from(len) else {
            return Box::pin(std::future::ready(Err(Errno::EINVAL)));
        };
        let rx = self
            .client
            .shared
            .submit(op, flags, offset, len32, data, &self.kick);
        Box::pin(async move { rx.await.unwrap_or(Err(Errno::EIO)) })
    }
}

impl Replica for RemoteReplica {
    fn location(&self) -> &str {
        self.client.location()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, offset: ByteOffset, buf: &'a mut [u8]) -> IoFuture<'a> {
        let raw = RawBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        self.io(
            Op::Read,
            0,
            offset.0,
            buf.len() as u64,
            JobData::Borrowed(raw),
        )
    }

    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], fua: bool) -> IoFuture<'a> {
        let raw = RawBuf {
            ptr: buf.as_ptr() as *mut u8,
            len: buf.len(),
        };
        let flags = if fua { FLAG_FUA } else { 0 };
        self.io(
            Op::Write,
            flags,
            offset.0,
            buf.len() as u64,
            JobData::Borrowed(raw),
        )
    }

    fn flush(&self) -> IoFuture<'_> {
        self.io(Op::Flush, 0, 0, 0, JobData::None)
    }

    fn checksum<'a>(
        &'a self,
        offset: ByteOffset,
        len: ByteLen,
        out: &'a mut [u8; 4],
    ) -> IoFuture<'a> {
        let raw = RawBuf {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        self.io(Op::Checksum, 0, offset.0, len.0, JobData::Borrowed(raw))
    }

    /// Asks the server (DATA_EXTENTS).
    fn data_extents(&self, offset: ByteOffset, len: ByteLen) -> ExtentsFuture<'_> {
        self.extents(None, offset, len)
    }

    fn read_snapshot<'a>(
        &'a self,
        of: SnapshotUuid,
        offset: ByteOffset,
        buf: &'a mut [u8],
    ) -> IoFuture<'a> {
        let len = buf.len() as u64;
        self.snapshot_into(Op::Read, of, offset, len, buf)
    }

    fn checksum_snapshot<'a>(
        &'a self,
        of: SnapshotUuid,
        offset: ByteOffset,
        len: ByteLen,
        out: &'a mut [u8; 4],
    ) -> IoFuture<'a> {
        self.snapshot_into(Op::Checksum, of, offset, len.0, out)
    }

    fn diff_extents(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> ExtentsFuture<'_> {
        if of.is_none() && since.is_none() {
            return self.data_extents(offset, len);
        }
        let Some(view) = self.view(of, since) else {
            return Box::pin(std::future::ready(Err(Errno(libc::EOPNOTSUPP))));
        };
        self.extents(Some(view), offset, len)
    }

    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_> {
        self.zeroing(Op::Discard, 0, offset.0, len.0)
    }

    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoFuture<'_> {
        let flags = if no_unmap { FLAG_NO_UNMAP } else { 0 };
        self.zeroing(Op::WriteZeroes, flags, offset.0, len.0)
    }
}

/// Most bytes one DISCARD or WRITE_ZEROES request covers: a server that cannot
/// punch holes writes the zeroes, and one request must finish within the
/// request deadline (3 s by default) even then (32 MiB at ~10 MiB/s).
pub const ZEROING_CHUNK: u64 = 32 << 20;

impl RemoteReplica {
    /// A DISCARD or WRITE_ZEROES, sent as one request per [`ZEROING_CHUNK`], one
    /// after the other: a multi-GiB one as a single request missed the deadline on
    /// a server without cheap zeroing, and the replica was faulted for it.
    fn zeroing(&self, op: Op, flags: u8, offset: u64, len: u64) -> IoFuture<'_> {
        if len <= ZEROING_CHUNK {
            return self.io(op, flags, offset, len, JobData::None);
        }
        Box::pin(async move {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(ZEROING_CHUNK);
                self.io(op, flags, offset + at, n, JobData::None).await?;
                at += n;
            }
            Ok(())
        })
    }
}
