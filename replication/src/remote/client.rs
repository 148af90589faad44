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
//! copy; a READ reply is read into a connection buffer, checked (CRC), and copied.
//!
//! ## Failure
//! A request that misses the deadline, or a dropped connection, fails every pending
//! request (ETIMEDOUT / ENOTCONN): the nexus faults the replica and acknowledges
//! from the others. The client then reconnects with backoff; a reconnected replica
//! takes I/O again only once the volume's health says it is online (after a rebuild).
//! A FENCED reply — a newer owner took the replica — trips the volume's [`Fence`].

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::auth::{client_handshake, Secret};
use super::wire::{
    self, Op, OpenReply, OpenRequest, ReplyHeader, RequestHeader, StatReply, StatRequest, Status,
    FLAG_FUA, FLAG_NO_UNMAP, REPLY_HEADER_LEN,
};
use crate::error::{Errno, ReplicationError};
use crate::health::Fence;
use crate::ids::{ByteLen, ByteOffset};
use crate::replica::{IoFuture, IoResult, Replica};

/// Wakes the thread that waits for a completion (a ublk queue thread's eventfd).
pub trait Kick: Send + Sync {
    fn kick(&self);
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

struct Job {
    op: Op,
    flags: u8,
    offset: u64,
    len: u32,
    buf: Option<RawBuf>,
    submitted: Instant,
    done: oneshot::Sender<IoResult>,
    kick: Option<Arc<dyn Kick>>,
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

/// One live connection with its tasks.
struct Conn {
    tx: mpsc::UnboundedSender<Job>,
}

struct Shared {
    spec: RemoteSpec,
    location: String,
    conn: Mutex<Option<Conn>>,
    fence: Arc<Fence>,
    /// The owner dropped the client: stop reconnecting.
    closed: std::sync::atomic::AtomicBool,
    /// Cleared for good when a connection is lost: writes acknowledged by the server
    /// but not yet flushed may be gone with it, and writes sent meanwhile are missing.
    /// A reconnected replica takes no I/O (and is marked stale on its server) until a
    /// rebuild makes it current again.
    usable: std::sync::atomic::AtomicBool,
    rt: tokio::runtime::Handle,
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

async fn dial(spec: &RemoteSpec) -> Result<TcpStream, ReplicationError> {
    let net = |e| ReplicationError::Connect {
        addr: spec.addr.clone(),
        source: e,
    };
    let s = tokio::time::timeout(spec.connect_timeout, TcpStream::connect(&spec.addr))
        .await
        .map_err(|_| net(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
        .map_err(net)?;
    s.set_nodelay(true).map_err(net)?;
    let mut s = s;
    super::keepalive(&s);
    tokio::time::timeout(spec.connect_timeout, client_handshake(&mut s, &spec.secret))
        .await
        .map_err(|_| timed_out(format!("{}: handshake", spec.addr)))??;
    Ok(s)
}

/// One control request on a fresh, authenticated connection; returns the reply
/// payload for `Status::Ok`.
async fn control(
    s: &mut TcpStream,
    spec: &RemoteSpec,
    op: Op,
    payload: &[u8],
) -> Result<(ReplyHeader, Vec<u8>), ReplicationError> {
    let h = RequestHeader::new(op, 0).with_payload(payload);
    let fut = async {
        s.write_all(&h.encode())
            .await
            .map_err(ReplicationError::Net)?;
        s.write_all(payload).await.map_err(ReplicationError::Net)?;
        let mut hb = [0u8; REPLY_HEADER_LEN];
        s.read_exact(&mut hb).await.map_err(ReplicationError::Net)?;
        let r = ReplyHeader::decode(&hb)?;
        let mut p = vec![0u8; r.payload_len as usize];
        s.read_exact(&mut p).await.map_err(ReplicationError::Net)?;
        r.verify_payload(&p)?;
        Ok::<_, ReplicationError>((r, p))
    };
    let (r, p) = tokio::time::timeout(spec.connect_timeout, fut)
        .await
        .map_err(|_| timed_out(format!("{}: no reply to {op:?}", spec.addr)))??;
    match r.status {
        Status::Ok => Ok((r, p)),
        Status::Fenced => Err(ReplicationError::Fenced {
            replica: spec.location(),
            ours: spec.open.generation,
            theirs: r.aux,
        }),
        st => Err(ReplicationError::Remote {
            replica: spec.location(),
            status: st,
            message: String::from_utf8_lossy(&p).into_owned(),
        }),
    }
}

/// The replica's identity and stored generation, without claiming it (an owner
/// picks a generation above every replica's before it opens any).
pub async fn stat(spec: &RemoteSpec) -> Result<StatReply, ReplicationError> {
    let mut s = dial(spec).await?;
    let req = StatRequest {
        replica: spec.open.replica.clone(),
    };
    let (_, p) = control(&mut s, spec, Op::Stat, &wire::encode_control(&req)).await?;
    wire::decode_control(&p)
}

async fn open(spec: &RemoteSpec) -> Result<(TcpStream, OpenReply), ReplicationError> {
    let mut s = dial(spec).await?;
    let (_, p) = control(&mut s, spec, Op::Open, &wire::encode_control(&spec.open)).await?;
    let reply: OpenReply = wire::decode_control(&p)?;
    if reply.generation != spec.open.generation || reply.size < spec.open.size {
        return Err(ReplicationError::Protocol(format!(
            "{}: OPEN reply does not match the request",
            spec.location()
        )));
    }
    Ok((s, reply))
}

impl Shared {
    /// Must be called on the runtime the connection tasks will use.
    fn new(spec: RemoteSpec, fence: Arc<Fence>, usable: bool) -> Arc<Shared> {
        Arc::new(Shared {
            location: spec.location(),
            spec,
            conn: Mutex::new(None),
            fence,
            closed: Default::default(),
            usable: std::sync::atomic::AtomicBool::new(usable),
            rt: tokio::runtime::Handle::current(),
        })
    }
}

impl RemoteClient {
    /// Connect, authenticate and OPEN the replica at `spec.open.generation`.
    pub async fn connect(
        spec: RemoteSpec,
        fence: Arc<Fence>,
    ) -> Result<(RemoteClient, OpenReply), ReplicationError> {
        let (stream, reply) = open(&spec).await?;
        let shared = Shared::new(spec, fence, true);
        start(&shared, stream, reply.session);
        Ok((RemoteClient { shared }, reply))
    }

    /// A client whose first connection failed: it keeps trying in the background
    /// (the replica is faulted meanwhile).
    pub fn disconnected(spec: RemoteSpec, fence: Arc<Fence>) -> RemoteClient {
        let shared = Shared::new(spec, fence, false);
        shared.rt.spawn(reconnect(shared.clone()));
        RemoteClient { shared }
    }

    pub fn location(&self) -> &str {
        &self.shared.location
    }

    pub fn is_connected(&self) -> bool {
        self.shared.conn.lock().unwrap().is_some()
    }

    /// FLUSH outside the data path (at stop): every acknowledged write durable.
    pub async fn flush(&self) -> IoResult {
        self.submit(Op::Flush, 0, 0, 0, None, &None)
            .await
            .unwrap_or(Err(Errno::EIO))
    }

    /// Per-queue handle; `kick` wakes that queue's thread after a completion.
    pub fn replica(self: &Arc<Self>, kick: Option<Arc<dyn Kick>>) -> RemoteReplica {
        RemoteReplica {
            client: self.clone(),
            kick,
        }
    }

    fn submit(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        len: u32,
        buf: Option<RawBuf>,
        kick: &Option<Arc<dyn Kick>>,
    ) -> oneshot::Receiver<IoResult> {
        let (done, rx) = oneshot::channel();
        let job = Job {
            op,
            flags,
            offset,
            len,
            buf,
            submitted: Instant::now(),
            done,
            kick: kick.clone(),
        };
        let conn = self.shared.conn.lock().unwrap();
        match conn.as_ref() {
            Some(c) if self.shared.usable.load(Ordering::Acquire) => {
                if let Err(mpsc::error::SendError(job)) = c.tx.send(job) {
                    let _ = job.done.send(Err(Errno(libc::ENOTCONN)));
                }
            }
            _ => {
                let _ = job.done.send(Err(Errno(libc::ENOTCONN)));
            }
        }
        rx
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
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.conn.lock().unwrap().take();
    }
}

/// Install a connection: writer, reader and a supervisor that enforces the deadline
/// and tears everything down on the first failure.
fn start(shared: &Arc<Shared>, stream: TcpStream, session: u64) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
    let (dead_tx, dead_rx) = mpsc::unbounded_channel::<String>();
    let hdr = FrameStamp {
        generation: shared.spec.open.generation,
        session,
        volume: wire::volume_id(&shared.spec.open.volume),
    };
    let sent = Arc::new(tokio::sync::Notify::new());
    let writer = shared.rt.spawn(writer(
        wr,
        rx,
        pending.clone(),
        sent.clone(),
        hdr,
        dead_tx.clone(),
    ));
    let reader = shared
        .rt
        .spawn(reader(rd, pending.clone(), sent, shared.clone(), dead_tx));
    *shared.conn.lock().unwrap() = Some(Conn { tx });
    shared
        .rt
        .spawn(supervise(shared.clone(), writer, reader, pending, dead_rx));
}

#[derive(Clone, Copy)]
struct FrameStamp {
    generation: u64,
    session: u64,
    volume: u64,
}

async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Job>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    sent: Arc<tokio::sync::Notify>,
    stamp: FrameStamp,
    dead: mpsc::UnboundedSender<String>,
) {
    let mut next_id: u64 = 1;
    let mut batch: Vec<Job> = Vec::with_capacity(64);
    let mut heads: Vec<[u8; wire::REQUEST_HEADER_LEN]> = Vec::with_capacity(64);
    let mut ids: Vec<u64> = Vec::with_capacity(64);
    let mut bufs: Vec<Option<RawBuf>> = Vec::with_capacity(64);
    loop {
        match rx.recv().await {
            Some(j) => batch.push(j),
            None => {
                let _ = dead.send("client closed".into());
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
        bufs.clear();
        {
            let mut p = pending.lock().unwrap();
            for job in batch.drain(..) {
                let id = next_id;
                next_id += 1;
                let mut h = RequestHeader::new(job.op, id);
                h.flags = job.flags;
                h.offset = job.offset;
                h.len = job.len;
                h.generation = stamp.generation;
                h.session = stamp.session;
                h.volume = stamp.volume;
                let data = match (job.op, job.buf) {
                    (Op::Write, Some(b)) => Some(b),
                    _ => None,
                };
                if let Some(b) = data {
                    // SAFETY: see RawBuf; the future borrowing it is pending.
                    h = h.with_payload(unsafe { std::slice::from_raw_parts(b.ptr, b.len) });
                }
                heads.push(h.encode());
                ids.push(id);
                bufs.push(data);
                p.insert(id, Pending { job, sent: false });
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(ids.len() * 2);
        for (h, b) in heads.iter().zip(&bufs) {
            slices.push(IoSlice::new(h));
            if let Some(b) = b {
                // SAFETY: as above; a pending entry is only completed after it was
                // sent, or after this task has been stopped.
                slices.push(IoSlice::new(unsafe {
                    std::slice::from_raw_parts(b.ptr, b.len)
                }));
            }
        }
        if let Err(e) = write_all_vectored(&mut wr, &mut slices).await {
            let _ = dead.send(format!("send failed: {e}"));
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
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    sent: Arc<tokio::sync::Notify>,
    shared: Arc<Shared>,
    dead: mpsc::UnboundedSender<String>,
) {
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut payload: Vec<u8> = Vec::new();
    let mut kicks: Vec<Arc<dyn Kick>> = Vec::new();
    loop {
        // Fire the batched kicks before we may sleep.
        if rd.buffer().len() < REPLY_HEADER_LEN {
            fire(&mut kicks);
        }
        let mut hb = [0u8; REPLY_HEADER_LEN];
        if let Err(e) = rd.read_exact(&mut hb).await {
            fire(&mut kicks);
            let _ = dead.send(format!("connection lost: {e}"));
            return;
        }
        let res = async {
            let r = ReplyHeader::decode(&hb)?;
            payload.resize(r.payload_len as usize, 0);
            if rd.buffer().len() < payload.len() {
                // About to wait: wake the queues of what completed so far.
                fire(&mut kicks);
            }
            rd.read_exact(&mut payload)
                .await
                .map_err(|e| ReplicationError::Protocol(format!("connection lost: {e}")))?;
            r.verify_payload(&payload)?;
            Ok::<_, ReplicationError>(r)
        }
        .await;
        let r = match res {
            Ok(r) => r,
            Err(e) => {
                fire(&mut kicks);
                let _ = dead.send(e.to_string());
                return;
            }
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
                match p.get(&r.id) {
                    Some(e) if e.sent => break p.remove(&r.id),
                    Some(_) => {}
                    None => break None,
                }
            }
            fire(&mut kicks);
            notified.await;
        };
        let Some(Pending { job, .. }) = entry else {
            fire(&mut kicks);
            let _ = dead.send(format!(
                "protocol violation: reply to unknown request {}",
                r.id
            ));
            return;
        };
        let res = match r.status {
            Status::Ok if job.op == Op::Read => {
                let b = job.buf.expect("read has a buffer");
                if payload.len() != b.len {
                    let _ = dead.send(format!(
                        "protocol violation: READ of {} bytes answered with {}",
                        b.len,
                        payload.len()
                    ));
                    // Put it back so teardown fails it after the tasks stopped.
                    pending
                        .lock()
                        .unwrap()
                        .insert(r.id, Pending { job, sent: true });
                    fire(&mut kicks);
                    return;
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
                shared.fence.trip(format!(
                    "replica {} now belongs to generation {} (ours is {}): a newer owner took over",
                    shared.location, r.aux, shared.spec.open.generation
                ));
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
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    mut dead: mpsc::UnboundedReceiver<String>,
) {
    let deadline = shared.spec.deadline;
    let mut last_ping = Instant::now();
    let mut tick = tokio::time::interval((deadline / 4).max(Duration::from_millis(20)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (reason, errno) = loop {
        tokio::select! {
            why = dead.recv() => break (why.unwrap_or_else(|| "tasks ended".into()), libc::ENOTCONN),
            _ = tick.tick() => {
                if pending.lock().unwrap().is_empty() && last_ping.elapsed() >= PING_EVERY {
                    // Idle: probe liveness and the fence (the ping has the deadline too).
                    last_ping = Instant::now();
                    ping(&shared);
                }
                let oldest = pending.lock().unwrap().values().map(|p| p.job.submitted).min();
                if let Some(t) = oldest {
                    let age = t.elapsed();
                    if age > deadline {
                        break (format!("a request missed the {} ms deadline (waited {} ms)",
                            deadline.as_millis(), age.as_millis()), libc::ETIMEDOUT);
                    }
                }
            }
        }
    };
    // New submissions fail fast from here on, and after a reconnect too.
    shared.usable.store(false, Ordering::Release);
    let closed_by_owner = shared.conn.lock().unwrap().take().is_none();
    // Stop both tasks before failing their requests: after this nothing touches a
    // request's buffer.
    writer.abort();
    reader.abort();
    let _ = writer.await;
    let _ = reader.await;
    let failed: Vec<Pending> = pending.lock().unwrap().drain().map(|(_, p)| p).collect();
    let n = failed.len();
    let mut kicks = Vec::new();
    for p in failed {
        kicks.extend(complete(p.job, Err(Errno(errno))));
    }
    fire(&mut kicks);
    if closed_by_owner {
        return;
    }
    tracing::error!(replica = %shared.location, reason = %reason, failed_requests = n,
        "replica connection down");
    reconnect(shared).await;
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
        buf: None,
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
    // volume's data. And tell the server it missed writes (see `usable`).
    let mut spec = shared.spec.clone();
    spec.open.create = false;
    spec.open.stale = true;
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::time::sleep(backoff).await;
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        match open(&spec).await {
            Ok((stream, reply)) => {
                tracing::info!(replica = %shared.location,
                    "replica reachable again; it takes I/O once the volume marks it online (rebuild)");
                start(&shared, stream, reply.session);
                if shared.closed.load(Ordering::SeqCst) {
                    shared.conn.lock().unwrap().take(); // dropped meanwhile
                }
                return;
            }
            Err(ReplicationError::Fenced { theirs, ours, .. }) => {
                shared.fence.trip(format!(
                    "replica {} now belongs to generation {theirs} (ours is {ours}): a newer owner took over",
                    shared.location
                ));
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
    fn io(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        len: u64,
        buf: Option<RawBuf>,
    ) -> IoFuture<'static> {
        let Ok(len32) = u32::try_from(len) else {
            return Box::pin(std::future::ready(Err(Errno::EINVAL)));
        };
        let rx = self
            .client
            .submit(op, flags, offset, len32, buf, &self.kick);
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
        self.io(Op::Read, 0, offset.0, buf.len() as u64, Some(raw))
    }

    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], fua: bool) -> IoFuture<'a> {
        let raw = RawBuf {
            ptr: buf.as_ptr() as *mut u8,
            len: buf.len(),
        };
        let flags = if fua { FLAG_FUA } else { 0 };
        self.io(Op::Write, flags, offset.0, buf.len() as u64, Some(raw))
    }

    fn flush(&self) -> IoFuture<'_> {
        self.io(Op::Flush, 0, 0, 0, None)
    }

    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_> {
        self.io(Op::Discard, 0, offset.0, len.0, None)
    }

    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoFuture<'_> {
        let flags = if no_unmap { FLAG_NO_UNMAP } else { 0 };
        self.io(Op::WriteZeroes, flags, offset.0, len.0, None)
    }
}
