//! Remote replicas end to end on one host, without ublk: real `ublkd` replica server
//! processes on 127.0.0.x, real TCP, driven through the nexus's Rust API by a
//! verifying workload (every block carries the sequence number of its last write).
//! Faults are real: SIGKILL and SIGSTOP of a server process, a second owner with a
//! higher generation, a wrong secret, garbage frames.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use replication::health::{Fence, Health, NoPersist, ReplicaHealth};
use replication::local::{Create, LocalBacking, LocalReplica};
use replication::remote::auth::{client_handshake, HELLO_MAGIC};
use replication::remote::client::stat;
use replication::remote::wire::{self, Op, OpenRequest, RequestHeader, REPLY_HEADER_LEN};
use replication::remote::{RemoteClient, RemoteSpec, Secret};
use replication::testing::{stamp_of, stamped_block};
use replication::uring::BlockingUring;
use replication::{
    BlockRequest, ByteLen, ByteOffset, Errno, Nexus, Replica, ReplicaState, ReplicationError,
};

const BLOCK: usize = 4096;
const BLOCKS: usize = 512;
const SIZE: u64 = (BLOCK * BLOCKS) as u64;
const SECRET: &[u8] = b"test-cluster-secret-0123456789";

/// One `ublkd` process that only hosts replicas.
struct ServerProc {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl ServerProc {
    fn image(&self, replica: &str) -> PathBuf {
        self.dir.join("replicas").join(format!("{replica}.img"))
    }
    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    /// Kill and start again with the same config (same address and storage).
    fn restart(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        self.child = spawn_ublkd(&self.dir);
        wait_listening(self);
    }
}

fn spawn_ublkd(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ublkd.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_ublkd"))
        .arg("--config")
        .arg(dir.join("ublk.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn wait_listening(s: &mut ServerProc) {
    let t0 = Instant::now();
    while TcpStream::connect(s.addr).is_err() {
        assert!(s.alive(), "server exited: {}", server_log(s));
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn secret_file(dir: &Path, secret: &[u8]) -> PathBuf {
    let p = dir.join("cluster.key");
    std::fs::write(&p, secret).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start a replica server on 127.0.0.`n` and wait until it accepts.
fn start_server(root: &Path, n: u8) -> ServerProc {
    let dir = root.join(format!("node{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ip = format!("127.0.0.{n}");
    let addr: SocketAddr = format!("{ip}:{}", free_port(&ip)).parse().unwrap();
    let conf = dir.join("ublk.toml");
    std::fs::write(
        &conf,
        format!(
            "[node]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{d}/ctl.sock\"\n\
             cluster_secret_file = \"{k}\"\nlog_level = \"debug\"\n\
             [server]\nlisten = \"{addr}\"\nstorage_dir = \"{d}/replicas\"\n",
            d = dir.display(),
            k = secret_file(&dir, SECRET).display(),
        ),
    )
    .unwrap();
    let child = spawn_ublkd(&dir);
    let mut s = ServerProc { child, addr, dir };
    wait_listening(&mut s);
    s
}

fn server_log(s: &ServerProc) -> String {
    std::fs::read_to_string(s.dir.join("ublkd.log")).unwrap_or_default()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn spec(s: &ServerProc, replica: &str, volume: &str, generation: u64, owner: u64) -> RemoteSpec {
    RemoteSpec {
        addr: s.addr.to_string(),
        secret: Secret::new(SECRET.to_vec()),
        open: OpenRequest {
            replica: replica.into(),
            volume: volume.into(),
            size: SIZE,
            block_size: 4096,
            generation,
            owner,
            create: true,
            stale: false,
        },
        deadline: Duration::from_millis(800),
        connect_timeout: Duration::from_secs(3),
    }
}

fn online(location: String) -> ReplicaHealth {
    ReplicaHealth {
        location,
        state: ReplicaState::Online,
        reason: None,
        errors: 0,
    }
}

/// A volume owner: remote replicas (and optionally a local file) behind one nexus.
struct Owner {
    clients: Vec<Arc<RemoteClient>>,
    local: Option<Arc<LocalBacking>>,
    health: Arc<Health>,
    fence: Arc<Fence>,
}

impl Owner {
    fn open(rt: &tokio::runtime::Runtime, specs: Vec<RemoteSpec>, local: Option<&Path>) -> Owner {
        let fence = Arc::new(Fence::default());
        let clients: Vec<Arc<RemoteClient>> = rt.block_on(async {
            join_all(
                specs
                    .into_iter()
                    .map(|s| RemoteClient::connect(s, fence.clone())),
            )
            .await
            .into_iter()
            .map(|r| Arc::new(r.expect("open remote replica").0))
            .collect()
        });
        let local =
            local.map(|p| Arc::new(LocalBacking::open(p, SIZE, Create::IfMissing).unwrap()));
        let mut hs: Vec<ReplicaHealth> = Vec::new();
        if let Some(l) = &local {
            hs.push(online(l.path().display().to_string()));
        }
        hs.extend(clients.iter().map(|c| online(c.location().to_string())));
        let health = Arc::new(
            Health::new(hs, Box::new(NoPersist))
                .unwrap()
                .with_fence(fence.clone()),
        );
        Owner {
            clients,
            local,
            health,
            fence,
        }
    }

    fn nexus(&self) -> Nexus<'static> {
        let mut reps: Vec<Box<dyn Replica>> = Vec::new();
        if let Some(l) = &self.local {
            reps.push(Box::new(LocalReplica::new(
                l.clone(),
                BlockingUring::new().unwrap(),
            )));
        }
        reps.extend(
            self.clients
                .iter()
                .map(|c| Box::new(c.replica(None)) as Box<dyn Replica>),
        );
        Nexus::new(reps, self.health.clone())
    }
}

/// A [`stamped_block`] of this test's block size.
fn block_data(block: usize, seq: u64) -> Vec<u8> {
    stamped_block(block, seq, BLOCK)
}

struct Outcome {
    /// Last acknowledged sequence per block.
    expected: Vec<u64>,
    errors: u64,
    ops: u64,
    /// Slowest acknowledged write.
    max_write: Duration,
}

/// `workers` concurrent writers (each owns the blocks ≡ its index), interleaved with
/// verified reads, for `ops` operations; `at(op)` runs once after `fault_at` ops.
fn workload(
    nexus: &Nexus,
    ops: u64,
    workers: usize,
    fault_at: u64,
    fault: impl FnMut(),
) -> Outcome {
    workload_from(nexus, vec![0; BLOCKS], 0, ops, workers, fault_at, fault)
}

/// As [`workload`], continuing from what an earlier run left (`expected`), with
/// sequence numbers above `seq_base`.
fn workload_from(
    nexus: &Nexus,
    expected: Vec<u64>,
    seq_base: u64,
    ops: u64,
    workers: usize,
    fault_at: u64,
    mut fault: impl FnMut(),
) -> Outcome {
    let expected = std::cell::RefCell::new(expected);
    let done = std::cell::Cell::new(0u64);
    let errors = std::cell::Cell::new(0u64);
    let max_write = std::cell::Cell::new(Duration::ZERO);
    let fault = std::cell::RefCell::new(Some(&mut fault));
    let worker = |w: usize| {
        let (expected, done, errors, max_write, fault) =
            (&expected, &done, &errors, &max_write, &fault);
        async move {
            let mut x = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut buf = vec![0u8; BLOCK];
            loop {
                let n = done.get();
                if n >= ops {
                    return;
                }
                done.set(n + 1);
                if n == fault_at {
                    if let Some(f) = fault.borrow_mut().take() {
                        f();
                    }
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = (x as usize % (BLOCKS / workers)) * workers + w;
                let off = ByteOffset((block * BLOCK) as u64);
                if x.is_multiple_of(4) {
                    let res = nexus
                        .submit(
                            BlockRequest::Read {
                                offset: off,
                                len: ByteLen(BLOCK as u64),
                            },
                            &mut buf,
                        )
                        .await;
                    match res {
                        Ok(_) => assert_eq!(
                            stamp_of(block, &buf),
                            expected.borrow()[block],
                            "read of block {block} is not its last acknowledged write"
                        ),
                        Err(_) => errors.set(errors.get() + 1),
                    }
                } else {
                    let seq = seq_base + n + 1;
                    buf.copy_from_slice(&block_data(block, seq));
                    let t = Instant::now();
                    let res = nexus
                        .submit(
                            BlockRequest::Write {
                                offset: off,
                                len: ByteLen(BLOCK as u64),
                                fua: x % 16 == 1,
                            },
                            &mut buf,
                        )
                        .await;
                    match res {
                        Ok(_) => {
                            expected.borrow_mut()[block] = seq;
                            max_write.set(max_write.get().max(t.elapsed()));
                        }
                        Err(_) => errors.set(errors.get() + 1),
                    }
                }
            }
        }
    };
    futures::executor::block_on(join_all((0..workers).map(worker)));
    Outcome {
        expected: expected.into_inner(),
        errors: errors.get(),
        ops: done.get(),
        max_write: max_write.get(),
    }
}

/// Every block of the replica image holds its last acknowledged write.
fn verify_image(path: &Path, expected: &[u64]) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for (block, &seq) in expected.iter().enumerate() {
        f.read_exact(&mut buf).unwrap();
        assert_eq!(
            stamp_of(block, &buf),
            seq,
            "{}: block {block}",
            path.display()
        );
    }
}

fn flush(nexus: &Nexus) {
    futures::executor::block_on(nexus.submit(BlockRequest::Flush, &mut [])).expect("flush");
}

#[test]
fn sigkill_of_a_replica_server_costs_no_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<ServerProc> = (2..4).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&servers[0], "v-r1", "v", 1, 7),
            spec(&servers[1], "v-r2", "v", 1, 7),
        ],
        Some(&tmp.path().join("local.img")),
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 3000, 8, 800, || servers[1].signal(libc::SIGKILL));
    flush(&nexus);
    assert_eq!(out.errors, 0, "the application saw I/O errors");
    assert_eq!(out.ops, 3000);
    let h = owner.health.snapshot();
    assert_eq!(
        h.iter().map(|r| r.state).collect::<Vec<_>>(),
        [
            ReplicaState::Online,
            ReplicaState::Online,
            ReplicaState::Faulted
        ],
        "{h:?}"
    );
    // Survivors hold every acknowledged write: the local file and the live server.
    verify_image(&tmp.path().join("local.img"), &out.expected);
    verify_image(&servers[0].image("v-r1"), &out.expected);
    println!("sigkill: slowest acknowledged write {:?}", out.max_write);
}

#[test]
fn sigstopped_replica_is_faulted_after_the_deadline_without_io_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<ServerProc> = (4..6).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&servers[0], "s-r1", "s", 1, 9),
            spec(&servers[1], "s-r2", "s", 1, 9),
        ],
        None,
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 1500, 8, 500, || servers[0].signal(libc::SIGSTOP));
    flush(&nexus);
    assert_eq!(out.errors, 0, "the application saw I/O errors");
    let h = owner.health.snapshot();
    assert_eq!(h[0].state, ReplicaState::Faulted, "{h:?}");
    assert!(
        h[0].reason.as_deref().unwrap_or("").contains("deadline"),
        "faulted for the deadline: {h:?}"
    );
    assert_eq!(h[1].state, ReplicaState::Online);
    verify_image(&servers[1].image("s-r2"), &out.expected);
    // The stall was the deadline, not a hang (figures go to the benchmark).
    assert!(
        out.max_write >= Duration::from_millis(800),
        "{:?}",
        out.max_write
    );
}

#[test]
fn a_newer_owner_fences_the_old_one_and_none_of_its_later_writes_land() {
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<ServerProc> = (6..8).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let specs = |g, o| {
        vec![
            spec(&servers[0], "f-r1", "f", g, o),
            spec(&servers[1], "f-r2", "f", g, o),
        ]
    };
    let a = Owner::open(&rt, specs(1, 100), None);
    let na = a.nexus();
    let out = workload(&na, 400, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);

    // The new owner asks every replica for its generation and goes above it.
    let stored = rt
        .block_on(stat(&spec(&servers[0], "f-r1", "f", 0, 0)))
        .unwrap();
    assert_eq!((stored.exists, stored.generation), (true, 1));
    let b = Owner::open(&rt, specs(stored.generation + 1, 200), None);
    let nb = b.nexus();

    // Even an old owner that does no I/O learns of it (the idle ping is fenced too),
    // so it cannot keep serving reads from a replica of its own for long.
    let t = Instant::now();
    while !a.fence.is_tripped() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "idle old owner never fenced"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its next write fails and lands nowhere.
    let mut buf = block_data(3, 999_999);
    let res = futures::executor::block_on(na.submit(
        BlockRequest::Write {
            offset: ByteOffset(3 * BLOCK as u64),
            len: ByteLen(BLOCK as u64),
            fua: true,
        },
        &mut buf,
    ));
    assert_eq!(res, Err(Errno::EIO));
    assert!(
        a.fence.reason().unwrap().contains("newer owner"),
        "{:?}",
        a.fence.reason()
    );
    // Reads fail too once fenced: the data may have moved on.
    let mut rbuf = vec![0u8; BLOCK];
    let r = futures::executor::block_on(na.submit(
        BlockRequest::Read {
            offset: ByteOffset(0),
            len: ByteLen(BLOCK as u64),
        },
        &mut rbuf,
    ));
    assert_eq!(r, Err(Errno::EIO));
    // Neither replica was faulted for it: fencing is not a replica failure.
    assert!(a
        .health
        .snapshot()
        .iter()
        .all(|r| r.state == ReplicaState::Online));

    // The new owner reads the old owner's acknowledged data and writes on.
    let out_b = workload_from(&nb, out.expected.clone(), 1 << 40, 300, 4, u64::MAX, || {});
    assert_eq!(out_b.errors, 0);
    flush(&nb);
    // Both replicas hold exactly the acknowledged history: A's writes, then B's,
    // and not the fenced write (its block holds A's or B's acknowledged value).
    assert_ne!(out_b.expected[3], 999_999);
    verify_image(&servers[0].image("f-r1"), &out_b.expected);
    verify_image(&servers[1].image("f-r2"), &out_b.expected);
    // An old generation cannot come back either.
    let err = rt
        .block_on(RemoteClient::connect(
            spec(&servers[0], "f-r1", "f", 1, 100),
            Arc::new(Fence::default()),
        ))
        .expect_err("stale generation refused");
    assert!(
        matches!(err, ReplicationError::Fenced { theirs: 2, .. }),
        "{err}"
    );
}

#[test]
fn wrong_secret_and_unauthenticated_peers_get_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_server(tmp.path(), 8);
    let rt = rt();
    let mut bad = spec(&server, "w-r1", "w", 1, 1);
    bad.secret = Secret::new(b"not-the-cluster-secret!!".to_vec());
    let err = rt
        .block_on(RemoteClient::connect(
            bad.clone(),
            Arc::new(Fence::default()),
        ))
        .expect_err("wrong secret refused");
    assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
    let err = rt
        .block_on(stat(&bad))
        .expect_err("no STAT without the secret");
    assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
    // A peer that skips the handshake and sends a valid STAT frame is dropped
    // without a reply.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let body = wire::encode_control(&wire::StatRequest {
        replica: "w-r1".into(),
    });
    // The server may hang up after the first 48 bytes (not a HELLO): a failing
    // write is part of being refused.
    let _ = s.write_all(&RequestHeader::new(Op::Stat, 1).with_payload(&body).encode());
    let _ = s.write_all(&body);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "unauthenticated peer got {} bytes",
        got.len()
    );
    // Nothing was created, and the server is alive for the right secret.
    assert!(!server.image("w-r1").exists());
    assert!(server.alive());
    let good = rt.block_on(RemoteClient::connect(
        spec(&server, "w-r1", "w", 1, 1),
        Arc::new(Fence::default()),
    ));
    assert!(good.is_ok(), "{:?}", good.err().map(|e| e.to_string()));
}

/// Authenticated raw connection, for sending hand-made frames.
fn raw_session(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> std::net::TcpStream {
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        client_handshake(&mut s, &Secret::new(SECRET.to_vec()))
            .await
            .unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

/// OPEN (creating) `replica` of volume "g" on an authenticated raw connection.
fn raw_open(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    replica: &str,
    generation: u64,
    owner: u64,
) -> (TcpStream, wire::OpenReply) {
    let mut s = raw_session(rt, addr);
    let open = wire::encode_control(&OpenRequest {
        replica: replica.into(),
        volume: "g".into(),
        size: SIZE,
        block_size: 4096,
        generation,
        owner,
        create: true,
        stale: false,
    });
    s.write_all(&RequestHeader::new(Op::Open, 1).with_payload(&open).encode())
        .unwrap();
    s.write_all(&open).unwrap();
    let (reply, p) = read_reply(&mut s);
    assert_eq!(
        reply.status,
        wire::Status::Ok,
        "{}",
        String::from_utf8_lossy(&p)
    );
    (s, wire::decode_control(&p).unwrap())
}

fn read_reply(s: &mut TcpStream) -> (wire::ReplyHeader, Vec<u8>) {
    let mut rh = [0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut rh).unwrap();
    let reply = wire::ReplyHeader::decode(&rh).unwrap();
    let mut p = vec![0u8; reply.payload_len as usize];
    s.read_exact(&mut p).unwrap();
    (reply, p)
}

/// A WRITE frame on session `o`, stamped with `generation`.
fn send_write(s: &mut TcpStream, o: &wire::OpenReply, generation: u64, offset: u64, data: &[u8]) {
    let mut w = RequestHeader::new(Op::Write, 2).with_payload(data);
    w.offset = offset;
    w.len = data.len() as u32;
    w.generation = generation;
    w.session = o.session;
    w.volume = wire::volume_id("g");
    // A refused frame may get the connection closed under the payload: the reply
    // (or its absence) is what the tests check.
    let _ = s.write_all(&w.encode());
    let _ = s.write_all(data);
}

fn closed_without_reply(mut s: std::net::TcpStream) -> bool {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).is_ok() && got.is_empty()
}

#[test]
fn garbage_and_out_of_range_frames_close_the_connection_not_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_server(tmp.path(), 9);
    let rt = rt();
    // Version mismatch: an explicit reply, then close.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut hello = [0u8; 48];
    hello[..8].copy_from_slice(&HELLO_MAGIC);
    hello[8..10].copy_from_slice(&9u16.to_le_bytes());
    s.write_all(&hello).unwrap();
    let mut ch = [0u8; 80];
    s.read_exact(&mut ch).unwrap();
    assert_eq!(
        u16::from_le_bytes([ch[8], ch[9]]),
        1,
        "version-mismatch status"
    );
    assert_eq!(u16::from_le_bytes([ch[10], ch[11]]), wire::PROTOCOL_VERSION);

    // Random garbage after a valid handshake.
    let mut s = raw_session(&rt, server.addr);
    let mut junk = [0u8; 64];
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x5a;
    }
    s.write_all(&junk).unwrap();
    assert!(closed_without_reply(s), "garbage header answered");

    // A well-formed header with a bad payload checksum.
    let mut s = raw_session(&rt, server.addr);
    let body = wire::encode_control(&wire::StatRequest {
        replica: "g".into(),
    });
    let mut h = RequestHeader::new(Op::Stat, 1).with_payload(&body);
    h.payload_crc ^= 1;
    s.write_all(&h.encode()).unwrap();
    s.write_all(&body).unwrap();
    assert!(closed_without_reply(s), "bad payload CRC answered");

    // An open session writing past the end of its replica: closed, nothing written.
    let owner = Owner::open(&rt, vec![spec(&server, "g-r1", "g", 1, 5)], None);
    let (mut s, opened) = raw_open(&rt, server.addr, "g-r2", 1, 6);
    let data = vec![0xAB; BLOCK];
    send_write(&mut s, &opened, 1, SIZE, &data); // one block past the end
    assert!(closed_without_reply(s), "out-of-range write answered");
    assert_eq!(
        std::fs::metadata(server.image("g-r2")).unwrap().len(),
        SIZE,
        "file grew"
    );

    // The server is alive and the earlier session still serves.
    assert!(server.alive());
    let n = owner.nexus();
    let out = workload(&n, 50, 2, u64::MAX, || {});
    assert_eq!(out.errors, 0);
}

#[test]
fn a_reconnect_supersedes_the_old_session_and_generations_cannot_be_forged() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 10);
    let rt = rt();
    // The same owner opens twice (a reconnect): the first session's late writes are
    // refused, not applied after the second OPEN.
    let (mut old, o1) = raw_open(&rt, server.addr, "q-r1", 1, 42);
    let (mut new, o2) = raw_open(&rt, server.addr, "q-r1", 1, 42);
    send_write(&mut old, &o1, 1, 0, &vec![0x11; BLOCK]);
    let (r, p) = read_reply(&mut old);
    assert_eq!(
        r.status,
        wire::Status::NotOpen,
        "{}",
        String::from_utf8_lossy(&p)
    );
    // A frame stamped with a generation its session was not opened at is fenced.
    send_write(&mut new, &o2, 2, 0, &vec![0x22; BLOCK]);
    let (r, _) = read_reply(&mut new);
    assert_eq!((r.status, r.aux), (wire::Status::Fenced, 1));
    // Neither landed; the current session's honest write does.
    send_write(&mut new, &o2, 1, BLOCK as u64, &vec![0x33; BLOCK]);
    assert_eq!(read_reply(&mut new).0.status, wire::Status::Ok);
    let img = std::fs::read(server.image("q-r1")).unwrap();
    assert!(
        img[..BLOCK].iter().all(|&b| b == 0),
        "a refused write landed"
    );
    assert!(img[BLOCK..2 * BLOCK].iter().all(|&b| b == 0x33));
}

#[test]
fn a_replica_back_after_a_lost_connection_takes_no_io_and_is_marked_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let mut servers: Vec<ServerProc> = (11..13).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&servers[0], "r-r1", "r", 1, 3),
            spec(&servers[1], "r-r2", "r", 1, 3),
        ],
        None,
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 300, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    // The server dies and comes back while the volume is idle: acknowledged writes
    // that were not flushed may be gone with it.
    servers[1].restart();
    let t = Instant::now();
    let stale = loop {
        let st = rt
            .block_on(stat(&spec(&servers[1], "r-r2", "r", 0, 0)))
            .unwrap();
        if st.stale {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never reconnected and marked stale"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stale.generation, 1, "same owner, same generation");
    assert!(owner.clients[1].is_connected());
    // Connected again, but out of the I/O set: the next write faults it, the app
    // sees no error, and the survivor holds everything.
    let out2 = workload_from(
        &nexus,
        out.expected.clone(),
        1 << 40,
        200,
        4,
        u64::MAX,
        || {},
    );
    assert_eq!(out2.errors, 0);
    let h = owner.health.snapshot();
    assert_eq!(
        (h[0].state, h[1].state),
        (ReplicaState::Online, ReplicaState::Faulted),
        "{h:?}"
    );
    flush(&nexus);
    verify_image(&servers[0].image("r-r1"), &out2.expected);
}
