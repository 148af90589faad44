//! Remote replicas end to end on one host, without ublk: real `ublkd` replica server
//! processes on 127.0.0.x, real TCP, driven through the nexus's Rust API by a
//! verifying workload. Faults are real: SIGKILL and SIGSTOP of a server process, a
//! second owner with a higher generation, a wrong secret, garbage, replayed and
//! forged frames, a flood of idle connections.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::remote::client::stat;
use replication::remote::conn::client_handshake;
use replication::remote::{RemoteClient, RemoteSpec, Secret};
use replication::state::FaultReason;
use replication::testing::RecordingSink;
use replication::{BlockRequest, ByteLen, ByteOffset, Errno, ReplicaState, ReplicationError};
use support::*;
use wire::control::{decode_control, encode_control, OpenReply, StatRequest};
use wire::frame::{
    Op, Opener, ReplyHeader, RequestHeader, Sealer, Status, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use wire::handshake::{CHALLENGE_LEN, HELLO_MAGIC};
use wire::label::LABEL_AREA;
use wire::{Generation, RequestId, VolumeTag, VolumeUuid, WireError};

#[test]
fn sigkill_of_a_replica_server_costs_no_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<ServerProc> = (2..4).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&servers[0], "v-r1", "v", vu, 1, 7),
            spec(&servers[1], "v-r2", "v", vu, 1, 7),
        ],
        Some(&tmp.path().join("local.img")),
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 3000, 8, 800, || servers[1].signal(libc::SIGKILL));
    flush(&nexus);
    assert_eq!(out.errors, 0, "the application saw I/O errors");
    assert_eq!(out.ops, 3000);
    assert_eq!(owner.states(), ["online", "online", "faulted"]);
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
    let vu = VolumeUuid::random();
    // A short deadline, so the stall it bounds shows in the workload.
    let short = |mut s: RemoteSpec| {
        s.deadline = Duration::from_millis(800);
        s
    };
    let owner = Owner::open(
        &rt,
        vec![
            short(spec(&servers[0], "s-r1", "s", vu, 1, 9)),
            short(spec(&servers[1], "s-r2", "s", vu, 1, 9)),
        ],
        None,
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 1500, 8, 500, || servers[0].signal(libc::SIGSTOP));
    flush(&nexus);
    assert_eq!(out.errors, 0, "the application saw I/O errors");
    let h = owner.health.snapshot();
    assert!(
        matches!(
            h.slots[0].state,
            ReplicaState::Faulted {
                reason: FaultReason::MissedDeadline { .. }
            }
        ),
        "faulted for the deadline: {h:?}"
    );
    assert_eq!(h.slots[1].state, ReplicaState::Online);
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
    let vu = VolumeUuid::random();
    let specs = |g, o| {
        let mut v = vec![
            spec(&servers[0], "f-r1", "f", vu, g, o),
            spec(&servers[1], "f-r2", "f", vu, g, o),
        ];
        if g > 1 {
            for s in &mut v {
                s.open.create = None;
            }
        }
        v
    };
    let a = Owner::open(&rt, specs(1, 100), None);
    let na = a.nexus();
    let out = workload(&na, 400, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);

    // The new owner asks every replica for its generation and goes above it.
    let stored = rt
        .block_on(stat(&spec(&servers[0], "f-r1", "f", vu, 0, 0)))
        .unwrap()
        .label
        .expect("f-r1 exists");
    assert_eq!(stored.generation, Generation(1));
    let b = Owner::open(&rt, specs(2, 200), None);
    let nb = b.nexus();

    // Even an old owner that does no I/O learns of it (the idle ping is fenced too),
    // so it cannot keep serving reads from a replica of its own for long.
    wait_until(5, "idle old owner fenced", || a.health.fence().is_tripped());
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
    let why = a.health.fence().reason().unwrap().to_string();
    assert!(why.contains("newer owner"), "{why}");
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
    assert_eq!(a.states(), ["online", "online"]);

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
    let mut old = spec(&servers[0], "f-r1", "f", vu, 1, 100);
    old.open.create = None;
    let err = rt
        .block_on(RemoteClient::connect(old))
        .expect_err("stale generation refused");
    assert!(
        matches!(
            err,
            ReplicationError::Fenced {
                theirs: Generation(2),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_secret_and_unauthenticated_peers_get_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_server(tmp.path(), 8);
    let rt = rt();
    let vu = VolumeUuid::random();
    let mut bad = spec(&server, "w-r1", "w", vu, 1, 1);
    bad.secret = Secret::new(b"not-the-cluster-secret!!".to_vec());
    let err = rt
        .block_on(RemoteClient::connect(bad.clone()))
        .expect_err("wrong secret refused");
    assert!(
        matches!(err, ReplicationError::Wire(WireError::Auth(_))),
        "{err}"
    );
    let err = rt
        .block_on(stat(&bad))
        .expect_err("no STAT without the secret");
    assert!(
        matches!(err, ReplicationError::Wire(WireError::Auth(_))),
        "{err}"
    );
    // A peer that skips the handshake and sends a STAT frame is dropped without a
    // reply.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let body = encode_control(&StatRequest {
        replica: "w-r1".into(),
    });
    let mut h = RequestHeader::new(Op::Stat, RequestId(1));
    h.payload_len = body.len() as u32;
    let head = Sealer::new(wire::frame::FrameKey::from_bytes([0; 16])).seal_request(&h, &body);
    // The server may hang up after the first 48 bytes (not a HELLO): a failing
    // write is part of being refused.
    let _ = s.write_all(&head);
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
    let good = rt.block_on(RemoteClient::connect(spec(&server, "w-r1", "w", vu, 1, 1)));
    assert!(good.is_ok(), "{:?}", good.err().map(|e| e.to_string()));
}

/// An authenticated raw connection, for sending hand-made (and mis-made) frames.
struct Raw {
    s: TcpStream,
    sealer: Sealer,
    opener: Opener,
}

impl Raw {
    fn connect(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Raw {
        rt.block_on(async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let keys = client_handshake(&mut s, &Secret::new(SECRET.to_vec()))
                .await
                .unwrap();
            let s = s.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            Raw {
                s,
                sealer: Sealer::new(keys.send),
                opener: Opener::new(keys.recv),
            }
        })
    }

    /// Seal and send; returns the bytes sent (for replays). A refused frame may get
    /// the connection closed under it: the reply (or its absence) is what counts.
    fn send(&mut self, h: &RequestHeader, payload: &[u8]) -> Vec<u8> {
        let mut bytes = self.sealer.seal_request(h, payload).to_vec();
        bytes.extend_from_slice(payload);
        let _ = self.s.write_all(&bytes);
        bytes
    }

    fn reply(&mut self) -> (ReplyHeader, Vec<u8>) {
        let mut rh = [0u8; REPLY_HEADER_LEN];
        self.s.read_exact(&mut rh).unwrap();
        let (reply, seal) = self.opener.open_reply(&rh).unwrap();
        let mut p = vec![0u8; reply.payload_len as usize];
        self.s.read_exact(&mut p).unwrap();
        self.opener.open_payload(&seal, &p).unwrap();
        (reply, p)
    }

    /// OPEN (creating) `replica` of volume "g".
    fn open(&mut self, replica: &str, vu: VolumeUuid, generation: u64, owner: u64) -> OpenReply {
        let body = encode_control(&open_request(replica, "g", vu, generation, owner));
        let mut h = RequestHeader::new(Op::Open, RequestId(1));
        h.payload_len = body.len() as u32;
        self.send(&h, &body);
        let (reply, p) = self.reply();
        assert_eq!(reply.status, Status::Ok, "{}", String::from_utf8_lossy(&p));
        decode_control(&p).unwrap()
    }

    /// A WRITE on session `o`, stamped with `generation`.
    fn write(&mut self, o: &OpenReply, generation: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        let mut w = RequestHeader::new(Op::Write, RequestId(2));
        w.offset = ByteOffset(offset);
        w.len = data.len() as u32;
        w.payload_len = w.len;
        w.generation = Generation(generation);
        w.session = o.session;
        w.volume = VolumeTag::of("g");
        self.send(&w, data)
    }

    fn closed_without_reply(mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        self.s.read_to_end(&mut got).is_ok() && got.is_empty()
    }
}

#[test]
fn garbage_replayed_forged_and_flipped_frames_close_the_connection_not_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_server(tmp.path(), 9);
    let rt = rt();
    let vu = VolumeUuid::random();
    // A protocol v1 client: an explicit version reply (status 1, our version 3), then
    // close.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut hello = [0u8; 48];
    hello[..8].copy_from_slice(&HELLO_MAGIC);
    hello[8..10].copy_from_slice(&1u16.to_le_bytes());
    s.write_all(&hello).unwrap();
    let mut ch = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut ch).unwrap();
    assert_eq!(
        u16::from_le_bytes([ch[8], ch[9]]),
        1,
        "version-mismatch status"
    );
    assert_eq!(u16::from_le_bytes([ch[10], ch[11]]), 3);
    // The server logs after it answers: give it a moment.
    assert!(
        server.log_shows("upgrade ublkd on the peer"),
        "{}",
        server.log()
    );

    // Random garbage after a valid handshake.
    let mut raw = Raw::connect(&rt, server.addr);
    let junk: Vec<u8> = (0..REQUEST_HEADER_LEN as u8)
        .map(|i| i.wrapping_mul(37) ^ 0x5a)
        .collect();
    raw.s.write_all(&junk).unwrap();
    assert!(raw.closed_without_reply(), "garbage header answered");

    // A write, replayed byte for byte on the same connection: the replay is refused
    // (out of sequence) and the connection closed; the data lands once.
    let mut raw = Raw::connect(&rt, server.addr);
    let o = raw.open("g-r1", vu, 1, 5);
    let frame = raw.write(&o, 1, 0, &vec![0x11; BLOCK]);
    assert_eq!(raw.reply().0.status, Status::Ok);
    raw.s.write_all(&frame).unwrap();
    assert!(raw.closed_without_reply(), "replayed frame answered");

    // A frame forged without the session key, on an authenticated connection.
    let mut raw = Raw::connect(&rt, server.addr);
    let o = raw.open("g-r2", vu, 1, 6);
    raw.sealer = Sealer::new(wire::frame::FrameKey::from_bytes([9; 16]));
    raw.write(&o, 1, 0, &vec![0x22; BLOCK]);
    assert!(raw.closed_without_reply(), "forged frame answered");

    // One bit flipped in a write's payload on the way.
    let mut raw = Raw::connect(&rt, server.addr);
    let o = raw.open("g-r3", vu, 1, 7);
    let mut w = RequestHeader::new(Op::Write, RequestId(2));
    w.len = BLOCK as u32;
    w.payload_len = w.len;
    w.generation = Generation(1);
    w.session = o.session;
    w.volume = VolumeTag::of("g");
    let data = vec![0x33; BLOCK];
    let mut bytes = raw.sealer.seal_request(&w, &data).to_vec();
    bytes.extend_from_slice(&data);
    bytes[REQUEST_HEADER_LEN + 77] ^= 0x04;
    raw.s.write_all(&bytes).unwrap();
    assert!(raw.closed_without_reply(), "flipped payload answered");

    // An open session writing past the end of its replica: closed, nothing written.
    let mut raw = Raw::connect(&rt, server.addr);
    let o = raw.open("g-r4", vu, 1, 8);
    raw.write(&o, 1, SIZE, &vec![0xAB; BLOCK]); // one block past the end
    assert!(raw.closed_without_reply(), "out-of-range write answered");

    // None of the refused frames landed; the replayed write landed once.
    let img = |r: &str| data_of(&server.image(r));
    assert!(img("g-r1")[..BLOCK].iter().all(|&b| b == 0x11));
    assert!(img("g-r2").iter().all(|&b| b == 0), "forged write landed");
    assert!(img("g-r3").iter().all(|&b| b == 0), "flipped write landed");
    assert_eq!(
        std::fs::metadata(server.image("g-r4")).unwrap().len(),
        SIZE + LABEL_AREA,
        "file grew"
    );
    assert!(server.alive());
}

#[test]
fn a_reconnect_supersedes_the_old_session_and_generations_cannot_be_forged() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 10);
    let rt = rt();
    let vu = VolumeUuid::random();
    // The same owner opens twice (a reconnect): the first session's late writes are
    // refused, not applied after the second OPEN.
    let mut old = Raw::connect(&rt, server.addr);
    let o1 = old.open("q-r1", vu, 1, 42);
    let mut new = Raw::connect(&rt, server.addr);
    let o2 = new.open("q-r1", vu, 1, 42);
    old.write(&o1, 1, 0, &vec![0x11; BLOCK]);
    let (r, p) = old.reply();
    assert_eq!(r.status, Status::NotOpen, "{}", String::from_utf8_lossy(&p));
    // A frame stamped with a generation its session was not opened at is fenced.
    new.write(&o2, 2, 0, &vec![0x22; BLOCK]);
    let (r, _) = new.reply();
    assert_eq!((r.status, r.aux), (Status::Fenced, 1));
    // Neither landed; the current session's honest write does.
    new.write(&o2, 1, BLOCK as u64, &vec![0x33; BLOCK]);
    assert_eq!(new.reply().0.status, Status::Ok);
    let img = data_of(&server.image("q-r1"));
    assert!(
        img[..BLOCK].iter().all(|&b| b == 0),
        "a refused write landed"
    );
    assert!(img[BLOCK..2 * BLOCK].iter().all(|&b| b == 0x33));
}

/// (E, protocol v3) The OPEN reply names the server's instance: this host's boot
/// id, and a process nonce that a restart changes and the boot id does not. A
/// version-2 owner's handshake still completes, and its reply carries no
/// instance (its parser rejects unknown fields).
#[test]
fn the_open_reply_names_the_server_instance_and_a_v2_owner_is_still_served() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_server(tmp.path(), 19);
    let rt = rt();
    let vu = VolumeUuid::random();
    let o1 = Raw::connect(&rt, server.addr).open("i-r1", vu, 1, 42);
    let i1 = o1.instance.expect("a v3 session's OPEN names the instance");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(i1.boot_id, boot_id.trim());
    server.restart();
    let o2 = Raw::connect(&rt, server.addr).open("i-r1", vu, 2, 42);
    let i2 = o2.instance.expect("instance");
    assert!(!i1.host_rebooted_by(&i2), "same boot");
    assert_ne!(i1.process, i2.process, "another process");
    // A version-2 owner: HELLO version 2, v2 proofs, no features.
    let raw = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut hello = [0u8; wire::handshake::HELLO_LEN];
        hello[..8].copy_from_slice(&wire::handshake::HELLO_MAGIC);
        hello[8..10].copy_from_slice(&2u16.to_le_bytes());
        s.write_all(&hello).await.unwrap();
        let mut ch = [0u8; wire::handshake::CHALLENGE_LEN];
        s.read_exact(&mut ch).await.unwrap();
        ch
    });
    assert_eq!(u16::from_le_bytes([raw[8], raw[9]]), 0, "status ok");
    assert_eq!(u16::from_le_bytes([raw[10], raw[11]]), 2, "answered as v2");
    assert_eq!(raw[12..16], [0; 4], "no features");
}

#[test]
fn an_idle_lost_connection_is_faulted_and_recorded_at_once_and_marked_outdated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut servers: Vec<ServerProc> = (11..13).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let vu = VolumeUuid::random();
    let sink = Arc::new(RecordingSink::default());
    let owner = Owner::open_with(
        &rt,
        vec![
            spec(&servers[0], "r-r1", "r", vu, 1, 3),
            spec(&servers[1], "r-r2", "r", vu, 1, 3),
        ],
        None,
        Box::new(sink.clone()),
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 300, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    // The server dies while the volume is idle: no request notices, the connection
    // does — and the fault is recorded at once, not at the next write.
    servers[1].kill();
    // No request runs: the connection's loss alone records it (within the bound).
    wait_until(5, "fault recorded", || {
        sink.persisted.lock().unwrap().iter().any(|s| {
            matches!(
                s.slots[1].state,
                ReplicaState::Faulted {
                    reason: FaultReason::ConnectionLost
                }
            )
        })
    });
    // And the survivor's label knows: r-r2 is no longer a member.
    let l1 = rt
        .block_on(stat(&spec(&servers[0], "r-r1", "r", vu, 0, 0)))
        .unwrap()
        .label
        .unwrap();
    let r2 = owner.health.snapshot().slots[1].uuid;
    assert!(!l1.membership.contains(r2), "{l1:?}");
    // When it comes back, the owner reconnects and marks it outdated on its server,
    // so that no owner ever trusts it alone.
    servers[1].start();
    wait_until(10, "marked outdated", || {
        rt.block_on(stat(&spec(&servers[1], "r-r2", "r", vu, 0, 0)))
            .is_ok_and(|st| st.label.is_some_and(|l| l.outdated))
    });
    assert!(owner.clients[1].is_connected());
    assert_eq!(owner.states(), ["online", "faulted"]);
    // It takes no I/O; the app sees no error, and the survivor holds everything.
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
    flush(&nexus);
    verify_image(&servers[0].image("r-r1"), &out2.expected);
}

#[test]
fn io_waits_for_the_last_replica_and_resumes_when_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 13);
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(&rt, vec![spec(&server, "l-r1", "l", vu, 1, 4)], None);
    let nexus = owner.nexus();
    let out = workload(&nexus, 200, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    flush(&nexus);
    // The only replica's server restarts under load (killed at the 300th request,
    // back 700 ms later): its connection drops, the replica is the newest copy, so
    // I/O waits for it instead of failing.
    let server = std::sync::Mutex::new(server);
    let (killed, restart) = std::sync::mpsc::channel::<()>();
    let out2 = std::thread::scope(|sc| {
        let srv = &server;
        sc.spawn(move || {
            if restart.recv().is_ok() {
                std::thread::sleep(Duration::from_millis(700));
                srv.lock().unwrap().start();
            }
        });
        workload_from(&nexus, out.expected.clone(), 1 << 40, 3000, 4, 300, || {
            server.lock().unwrap().kill();
            killed.send(()).unwrap();
        })
    });
    let server = server.into_inner().unwrap();
    assert_eq!(out2.errors, 0, "the application saw I/O errors");
    assert!(
        out2.max_write >= Duration::from_millis(500),
        "the outage was waited out: {:?}",
        out2.max_write
    );
    assert_eq!(owner.states(), ["online"]);
    flush(&nexus);
    verify_image(&server.image("l-r1"), &out2.expected);
}

#[test]
fn overlapping_writes_from_several_queues_leave_the_replicas_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<ServerProc> = (14..16).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&servers[0], "o-r1", "o", vu, 1, 5),
            spec(&servers[1], "o-r2", "o", vu, 1, 5),
        ],
        Some(&tmp.path().join("local.img")),
    );
    // Four "queues" (threads, each its own nexus) hammer the same 64 KiB with
    // writes of 4-32 KiB at random 4 KiB offsets, 32 in flight each.
    std::thread::scope(|sc| {
        for q in 0..4u64 {
            let owner = &owner;
            sc.spawn(move || {
                let nexus = owner.nexus();
                let mut rng = replication::testing::Rng(q * 7919 + 1);
                futures::executor::block_on(futures::future::join_all((0..32).map(|_| {
                    let mut rng = replication::testing::Rng(rng.next() | 1);
                    let nexus = &nexus;
                    async move {
                        for _ in 0..30 {
                            let blocks = 1 + rng.below(8);
                            let at = rng.below(16 - blocks + 1);
                            let mut buf = vec![rng.next() as u8; blocks * BLOCK];
                            nexus
                                .submit(
                                    BlockRequest::Write {
                                        offset: ByteOffset((at * BLOCK) as u64),
                                        len: ByteLen(buf.len() as u64),
                                        fua: false,
                                    },
                                    &mut buf,
                                )
                                .await
                                .expect("write");
                        }
                    }
                })));
            });
        }
    });
    flush(&owner.nexus());
    assert_eq!(owner.states(), ["online", "online", "online"]);
    let local = data_of(&tmp.path().join("local.img"));
    assert!(
        local[..16 * BLOCK].iter().any(|&b| b != 0),
        "nothing written"
    );
    assert!(
        data_of(&servers[0].image("o-r1")) == local,
        "o-r1 differs from the local replica"
    );
    assert!(
        data_of(&servers[1].image("o-r2")) == local,
        "o-r2 differs from the local replica"
    );
}

#[test]
fn two_hundred_idle_connections_do_not_keep_an_owner_out() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 16);
    let rt = rt();
    let vu = VolumeUuid::random();
    // 200 peers connect and say nothing (they would hold a handshake slot for 5 s
    // each, renewed forever).
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let res = rt.block_on(RemoteClient::connect(spec(&server, "i-r1", "i", vu, 1, 1)));
    assert!(res.is_ok(), "{:?}", res.err().map(|e| e.to_string()));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    // Most of the idle ones were evicted to make room, and the server says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ublkctl"))
        .args(["--socket"])
        .arg(server.dir.join("ctl.sock"))
        .args(["server", "--output", "json"])
        .output()
        .unwrap();
    let st: replica_server::ServerStatus = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(st.handshakes_evicted_total >= 100, "{st:?}");
    assert!(st.handshaking <= st.max_handshakes, "{st:?}");
    assert_eq!((st.connections, st.sessions), (1, 1), "{st:?}");
    drop(idle);
}

/// A man in the middle: forwards a connection to `to`, and once `armed` flips one
/// bit in what the server sends back.
fn tampering_proxy(
    at: &str,
    to: SocketAddr,
    armed: Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    let l = std::net::TcpListener::bind(at).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { return };
            let server = TcpStream::connect(to).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            let armed = armed.clone();
            std::thread::spawn(move || {
                let (mut from, mut to) = (server, client);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        buf[n / 2] ^= 0x10;
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_reply_altered_on_the_path_is_refused_and_the_replica_faulted_without_io_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let servers: Vec<ServerProc> = (17..19).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let vu = VolumeUuid::random();
    let armed: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let via = tampering_proxy("127.0.0.30:0", servers[1].addr, armed.clone());
    let mut tampered = spec(&servers[1], "m-r2", "m", vu, 1, 8);
    tampered.addr = via.to_string();
    let owner = Owner::open(
        &rt,
        vec![spec(&servers[0], "m-r1", "m", vu, 1, 8), tampered],
        None,
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 2000, 8, 500, || {
        armed.store(true, std::sync::atomic::Ordering::SeqCst)
    });
    flush(&nexus);
    assert_eq!(out.errors, 0, "the application saw I/O errors");
    assert_eq!(owner.states(), ["online", "faulted"]);
    verify_image(&servers[0].image("m-r1"), &out.expected);
}

#[test]
fn a_replica_whose_server_restarted_is_caught_up_by_a_partial_rebuild_under_io() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 16);
    let mut b = start_server(tmp.path(), 17);
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&a, "p-r1", "p", vu, 1, 6),
            spec(&b, "p-r2", "p", vu, 1, 6),
        ],
        None,
    );
    let nexus = owner.nexus();
    // What b acknowledged is flushed; then it dies: faulted, and what it misses
    // from then on is logged — at most the 10 requests of the second run, one
    // 64 KiB region each (an unflushed write would count too: its server may
    // have lost it).
    let out = workload(&nexus, 300, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    flush(&nexus);
    let out = workload_from(&nexus, out.expected, 1 << 30, 10, 4, 0, || {
        b.signal(libc::SIGKILL)
    });
    assert_eq!(out.errors, 0);
    assert_eq!(owner.states(), ["online", "faulted"]);
    let missed = owner
        .health
        .dirty_map(replication::SlotIndex(1))
        .expect("a faulted replica's dirty map")
        .dirty_bytes();
    assert!(
        missed > 0 && missed <= 10 * 65536,
        "{missed} of {SIZE} bytes"
    );
    b.start();
    // The daemon's rebuild manager takes it once it is reachable, while the
    // application keeps writing.
    let rebuilds = replication::rebuild::Manager::start(
        owner.health.clone(),
        owner.ranges.clone(),
        replication::rebuild::ManagerConfig::default(),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut expected = out.expected;
    let mut seq = 1u64 << 40;
    while owner.states() != ["online", "online"] {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not rebuilt: {:?}",
            owner.health.snapshot().slots
        );
        let more = workload_from(&nexus, expected, seq, 200, 4, u64::MAX, || {});
        assert_eq!(more.errors, 0);
        expected = more.expected;
        seq += 1 << 32;
    }
    drop(rebuilds);
    flush(&nexus);
    verify_image(&a.image("p-r1"), &expected);
    verify_image(&b.image("p-r2"), &expected);
}

/// DELETE removes exactly the retired copy: never one of another uuid (a replica
/// created since under the same id), never for an owner below the replica's
/// generation; the owner that retired it may, and a session still attached to it
/// is fenced from then on.
#[test]
fn delete_removes_only_the_named_copy_and_only_for_an_owner_allowed_to_open_it() {
    use replication::remote::client::delete;
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 31);
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(&rt, vec![spec(&server, "d-r1", "d", vu, 3, 30)], None);
    let nexus = owner.nexus();
    assert_eq!(workload(&nexus, 50, 4, u64::MAX, || {}).errors, 0);
    flush(&nexus);
    let label = rt
        .block_on(stat(&spec(&server, "d-r1", "d", vu, 0, 0)))
        .unwrap()
        .label
        .expect("d-r1 exists");
    let image = server.image("d-r1");

    let refused = |r: Result<_, ReplicationError>, want: Status| match r {
        Err(ReplicationError::Remote {
            status, message, ..
        }) if status == want => message,
        Err(ReplicationError::Fenced { .. }) if want == Status::Fenced => "fenced".into(),
        other => panic!("expected {want:?}, got {other:?}"),
    };
    // Another copy's uuid, another volume, an older or foreign owner: nothing goes.
    let msg = refused(
        rt.block_on(delete(
            &spec(&server, "d-r1", "d", vu, 3, 30),
            wire::ReplicaUuid::random(),
        )),
        Status::Conflict,
    );
    assert!(msg.contains("not deleted"), "{msg}");
    refused(
        rt.block_on(delete(
            &spec(&server, "d-r1", "d", VolumeUuid::random(), 3, 30),
            label.replica_uuid,
        )),
        Status::Conflict,
    );
    refused(
        rt.block_on(delete(
            &spec(&server, "d-r1", "d", vu, 2, 30),
            label.replica_uuid,
        )),
        Status::Fenced,
    );
    refused(
        rt.block_on(delete(
            &spec(&server, "d-r1", "d", vu, 3, 31),
            label.replica_uuid,
        )),
        Status::Fenced,
    );
    refused(
        rt.block_on(delete(
            &spec(&server, "nope", "d", vu, 3, 30),
            label.replica_uuid,
        )),
        Status::NotFound,
    );
    assert!(image.exists());
    assert_eq!(workload(&nexus, 10, 1, u64::MAX, || {}).errors, 0);

    // The owner that holds it deletes it: gone from disk and from STAT.
    let reply = rt
        .block_on(delete(
            &spec(&server, "d-r1", "d", vu, 3, 30),
            label.replica_uuid,
        ))
        .expect("delete");
    assert!(reply.freed_bytes > 0, "{reply:?}");
    assert!(!image.exists());
    let after = rt
        .block_on(stat(&spec(&server, "d-r1", "d", vu, 0, 0)))
        .unwrap();
    assert_eq!(after.label, None);
    // The session still attached lands nothing more: its next write is refused.
    let mut buf = block_data(1, 7);
    let res = futures::executor::block_on(nexus.submit(
        BlockRequest::Write {
            offset: ByteOffset(BLOCK as u64),
            len: ByteLen(BLOCK as u64),
            fua: true,
        },
        &mut buf,
    ));
    assert!(res.is_err(), "a write to a deleted replica succeeded");
    assert!(!image.exists(), "a late write recreated the image");
    // A deleted replica is no newer owner: its owner is not fenced (a reclaim of a
    // retired replica whose old client still reconnects must not stop the volume).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !owner.health.fence().is_tripped(),
        "{:?}",
        owner.health.fence().reason()
    );
}

/// DATA_EXTENTS against a real server: a sparse image is answered with exactly the
/// blocks written (raw, and through the owner's `Replica::data_extents`), a hole
/// with nothing; a connection without the replica open, and an owner a newer one
/// fenced, get no answer; a range past the replica's end closes the connection.
/// (V) A multi-GiB DISCARD is sent in chunks a server can finish within the
/// request deadline: one of 5 GiB (more than a frame's u32 length, so as one
/// request it could not even be sent) punches the whole range.
#[test]
fn a_multi_gib_discard_goes_out_in_chunks() {
    use replication::Replica;
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 33);
    let rt = rt();
    let mut s = spec(&server, "big-r1", "big", VolumeUuid::random(), 1, 7);
    s.open.size = 8 << 30;
    let client = Arc::new(rt.block_on(RemoteClient::connect(s)).unwrap().0);
    let replica = client.replica(None);
    let at = (4 << 30) + 4096;
    futures::executor::block_on(replica.write(ByteOffset(at), &[0x77; 4096], true)).unwrap();
    futures::executor::block_on(replica.discard(ByteOffset(0), ByteLen(5 << 30))).unwrap();
    let mut back = vec![1u8; 4096];
    futures::executor::block_on(replica.read(ByteOffset(at), &mut back)).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the discard reached past 4 GiB"
    );
}

/// Requests still queued for a connection's writer when the connection dies (the
/// socket full: the server stopped reading) fail like the ones on the wire, with
/// the lost connection's errno: the ack rule retries those (with no other replica
/// online the write waits for one to come back) but fails a request with EIO. They
/// were dropped with the writer and answered EIO, so with both remotes of a volume
/// dying together a write failed on the application (the VM scenario
/// `repl_both_remotes_die` saw it).
#[test]
fn requests_queued_behind_a_full_socket_fail_with_the_connections_errno() {
    use replication::Replica;
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_server(tmp.path(), 34);
    let rt = rt();
    let mut s = spec(&server, "q-r1", "q", VolumeUuid::random(), 1, 7);
    s.open.size = 512 << 20;
    let client = Arc::new(rt.block_on(RemoteClient::connect(s)).unwrap().0);
    let replica = client.replica(None);
    server.signal(libc::SIGSTOP);
    // 64 MiB fill the writer's first batch (more than both socket buffers hold);
    // the rest wait in its queue.
    let buf = vec![0x5au8; 1 << 20];
    let writes: Vec<_> = (0..192u64)
        .map(|i| replica.write(ByteOffset(i << 20), &buf, false))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    let results = futures::executor::block_on(futures::future::join_all(writes));
    let errnos: std::collections::BTreeSet<i32> =
        results.iter().map(|r| r.unwrap_err().0).collect();
    assert_eq!(
        errnos,
        [libc::ENOTCONN].into(),
        "every request failed as its connection did"
    );
}

/// (W) An authenticated peer that sends requests and never reads the replies
/// cannot keep the server's buffers and a connection slot for good: once a reply
/// cannot be handed to the socket within the send timeout, the connection is
/// closed and everything it held is released. Without the timeout the connection
/// stayed, its replies' buffers taken, as long as the peer wished.
#[test]
fn a_peer_that_reads_no_replies_is_closed_after_the_send_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let limits = replica_server::Limits {
        send_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let server = replica_server::Server::new(
        tmp.path().join("replicas"),
        Secret::new(SECRET.to_vec()),
        limits,
    )
    .unwrap();
    let addr = server
        .listen("127.0.0.37:0".parse().unwrap(), rt.handle())
        .unwrap();
    let mut raw = Raw::connect(&rt, addr);
    let o = raw.open("w-r1", VolumeUuid::random(), 1, 7);
    // 1 MiB READs, 256 of them (the connection's in-flight limit): far more than
    // both socket buffers hold. Their replies are never read.
    for i in 0..256u64 {
        let mut h = RequestHeader::new(Op::Read, RequestId(10 + i));
        h.offset = ByteOffset((i % 2) << 20);
        h.len = 1 << 20;
        h.generation = Generation(1);
        h.session = o.session;
        h.volume = VolumeTag::of("g");
        raw.send(&h, &[]);
    }
    wait_until(2, "the connection is up", || {
        server.status().connections == 1
    });
    let closed = wait_until(15, "the server closes the connection", || {
        server.status().connections == 0
    });
    println!("closed {closed:?} after the last request");
}

#[test]
fn data_extents_answers_a_sparse_images_extents_and_only_to_its_owner() {
    use replication::Replica;
    use wire::frame::decode_extents;
    const K: u64 = 1024;
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 32);
    let rt = rt();
    let vu = VolumeUuid::random();
    let mut raw = Raw::connect(&rt, server.addr);
    let o = raw.open("x-r1", vu, 1, 5);
    for off in [64 * K, 68 * K, 1024 * K] {
        raw.write(&o, 1, off, &vec![0x5a; BLOCK]);
        assert_eq!(raw.reply().0.status, Status::Ok);
    }
    let ask = |raw: &mut Raw, session, generation, offset: u64, len: u64| {
        let mut h = RequestHeader::new(Op::DataExtents, RequestId(3));
        h.offset = ByteOffset(offset);
        h.len = len as u32;
        h.generation = Generation(generation);
        h.session = session;
        h.volume = VolumeTag::of("g");
        raw.send(&h, &[]);
        raw.reply()
    };
    let extents = |raw: &mut Raw, offset: u64, len: u64| {
        let (r, p) = ask(raw, o.session, 1, offset, len);
        assert_eq!(r.status, Status::Ok, "{}", String::from_utf8_lossy(&p));
        decode_extents(ByteOffset(offset), ByteLen(len), &p)
            .expect("a well-formed list")
            .into_iter()
            .map(|(o, l)| (o.0, l.0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        extents(&mut raw, 0, SIZE),
        [(64 * K, 8 * K), (1024 * K, 4 * K)]
    );
    assert_eq!(extents(&mut raw, 128 * K, 512 * K), [], "a hole");
    assert_eq!(
        extents(&mut raw, 68 * K, 1024 * K),
        [(68 * K, 4 * K), (1024 * K, 4 * K)],
        "clipped to the range"
    );

    // The owner's side asks the same over its connection.
    let client = Arc::new(
        rt.block_on(RemoteClient::connect(spec(&server, "x-r1", "g", vu, 2, 6)))
            .unwrap()
            .0,
    );
    let replica = client.replica(None);
    let got = futures::executor::block_on(replica.data_extents(ByteOffset(0), ByteLen(SIZE)));
    assert_eq!(
        got,
        Ok(Some(vec![
            (ByteOffset(64 * K), ByteLen(8 * K)),
            (ByteOffset(1024 * K), ByteLen(4 * K)),
        ]))
    );
    // That OPEN at generation 2 fenced the first owner: no answer for it.
    let (r, p) = ask(&mut raw, o.session, 1, 0, SIZE);
    assert_eq!((r.status, r.aux, p.len()), (Status::Fenced, 2, 0));
    // Nor for a connection that opened nothing.
    let mut stranger = Raw::connect(&rt, server.addr);
    let (r, p) = ask(&mut stranger, o.session, 2, 0, SIZE);
    assert_eq!(r.status, Status::NotOpen, "{}", String::from_utf8_lossy(&p));
    // A range past the end is a broken client: closed, like any I/O out of range.
    let mut past = Raw::connect(&rt, server.addr);
    let o3 = past.open("x-r3", vu, 1, 7);
    let mut h = RequestHeader::new(Op::DataExtents, RequestId(3));
    (h.offset, h.len) = (ByteOffset(SIZE - BLOCK as u64), 2 * BLOCK as u32);
    (h.generation, h.session, h.volume) = (Generation(1), o3.session, VolumeTag::of("g"));
    past.send(&h, &[]);
    assert!(
        past.closed_without_reply(),
        "out-of-range DATA_EXTENTS answered"
    );
    assert!(client.is_connected());
}

/// A replica image (flat or layered) read through its store: the head, or one
/// snapshot, block by block as stamps.
fn stamps_of(path: &std::path::Path, snapshot: Option<wire::SnapshotUuid>) -> Vec<u64> {
    use replication::local::{Create, LocalBacking, LocalReplica};
    let b = Arc::new(LocalBacking::open(path, SIZE, Create::Never).unwrap());
    let head = LocalReplica::new(b.clone(), replication::uring::BlockingUring::new().unwrap());
    let mut buf = vec![0u8; BLOCK];
    (0..BLOCKS)
        .map(|blk| {
            let off = (blk * BLOCK) as u64;
            match snapshot {
                Some(u) => b.read_snapshot(u, off, &mut buf).unwrap(),
                None => futures::executor::block_on(head.read(ByteOffset(off), &mut buf)).unwrap(),
            }
            replication::testing::stamp_of(blk, &buf)
        })
        .collect()
}

/// Snapshots of remote replicas through the barrier: every replica (two servers
/// and the local file) takes it over the SNAPSHOT op, it holds exactly what was
/// acknowledged before it while writes go on after, it survives a server's
/// SIGKILL and restart, and a delete goes to every replica.
#[test]
fn a_snapshot_is_taken_on_remote_replicas_too_and_survives_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut servers: Vec<ServerProc> = (60..62).map(|n| start_server(tmp.path(), n)).collect();
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&servers[0], "snap-r1", "snap", vu, 1, 11),
            spec(&servers[1], "snap-r2", "snap", vu, 1, 11),
        ],
        Some(&tmp.path().join("local.img")),
    );
    let nexus = owner.nexus();
    let before = workload(&nexus, 600, 8, u64::MAX, || {});
    assert_eq!(before.errors, 0);
    let uuid = wire::SnapshotUuid::random();
    let created =
        replication::snapshots::create(&owner.health, &owner.ranges, uuid, "s1", 1).unwrap();
    assert_eq!(created.replicas, 3);
    let after = workload_from(
        &nexus,
        before.expected.clone(),
        1 << 32,
        600,
        8,
        u64::MAX,
        || {},
    );
    assert_eq!(after.errors, 0);
    flush(&nexus);
    let list = replication::snapshots::list(&owner.health).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].on.len(), 3, "{list:?}");
    // Idempotent: the same uuid again changes nothing.
    let again =
        replication::snapshots::create(&owner.health, &owner.ranges, uuid, "s1", 1).unwrap();
    assert!(again.already);
    // A server killed and restarted: its replica (faulted until a rebuild, as any
    // that lost its connection) still holds the snapshot.
    servers[1].restart();
    let c = &owner.clients[1];
    wait_until(20, "the owner reconnects", || c.is_connected());
    let listed = c
        .runtime()
        .block_on(c.snapshot_action(&wire::control::SnapshotAction::List))
        .unwrap();
    assert_eq!(listed.snapshots.len(), 1);
    assert_eq!(listed.snapshots[0].uuid, uuid);
    // Taken while it is out: on the two others, and it gets it from its partial
    // rebuild (a local source, a remote target).
    let s2 = wire::SnapshotUuid::random();
    let created =
        replication::snapshots::create(&owner.health, &owner.ranges, s2, "s2", 2).unwrap();
    assert_eq!(created.replicas, 2, "the faulted one is skipped");
    let rebuild = |slot: u8, kind| {
        let out = replication::rebuild::rebuild(
            &owner.health,
            &owner.ranges,
            replication::SlotIndex(slot),
            kind,
            replication::rebuild::CopyConfig::default(),
            &replication::rebuild::Progress::default(),
        )
        .unwrap();
        assert!(
            matches!(out, replication::rebuild::Outcome::Done { .. }),
            "{out:?}"
        );
    };
    let fault = |slot: u8| {
        owner
            .health
            .fault_missing(
                replication::SlotIndex(slot),
                FaultReason::ConnectionLost,
                &[],
            )
            .unwrap()
    };
    let more = |from: &Vec<u64>, seq: u64| {
        let w = workload_from(&nexus, from.clone(), seq, 300, 8, u64::MAX, || {});
        assert_eq!(w.errors, 0);
        w.expected
    };
    let slots = owner.health.snapshot().slots;
    let slot_of = |pred: &dyn Fn(&replication::health::SlotStatus) -> bool| {
        slots.iter().find(|s| pred(s)).unwrap().slot.get() as u8
    };
    let out = slot_of(&|s| matches!(s.state, ReplicaState::Faulted { .. }));
    let local = slot_of(&|s| s.location.ends_with("local.img"));
    let at_s3 = more(&after.expected, 2 << 32);
    rebuild(out, replication::state::RebuildKind::Partial);
    // The local replica out while s3 is taken: its partial rebuild reads s3 from
    // a replica server (READ of a snapshot view over the wire).
    fault(local);
    let s3 = wire::SnapshotUuid::random();
    replication::snapshots::create(&owner.health, &owner.ranges, s3, "s3", 3).unwrap();
    let at_head = more(&at_s3, 3 << 32);
    rebuild(local, replication::state::RebuildKind::Partial);
    // And a full rebuild of it: every layer through the server's diffs.
    fault(local);
    let head = more(&at_head, 4 << 32);
    rebuild(local, replication::state::RebuildKind::Full);
    flush(&nexus);
    assert_eq!(owner.states(), ["online", "online", "online"]);
    let list = replication::snapshots::list(&owner.health).unwrap();
    assert!(
        list.iter().all(|s| s.on.len() == 3 && s.missing.is_empty()),
        "{list:?}"
    );
    // Verify compares each snapshot too (CHECKSUM of a view on the servers).
    let report = replication::verify::verify(
        &owner.health,
        &owner.ranges,
        ByteLen(1 << 20),
        replication::verify::Repair::No,
        &replication::rebuild::Progress::default(),
    )
    .unwrap();
    assert!(report.clean(), "{report:?}");
    assert_eq!(report.snapshots.len(), 3);
    assert!(report.snapshots.iter().all(|s| s.bytes == SIZE));
    let sum = |b: replication::backing::Backing, of: Option<wire::SnapshotUuid>| {
        let h = b.thread_handle().unwrap();
        let mut out = [0u8; 4];
        let len = ByteLen(1 << 20);
        futures::executor::block_on(match of {
            Some(u) => h.checksum_snapshot(u, ByteOffset(0), len, &mut out),
            None => h.checksum(ByteOffset(0), len, &mut out),
        })
        .unwrap();
        out
    };
    let remote = replication::backing::Backing::Remote(owner.clients[0].clone());
    let local = owner.health.backing(replication::SlotIndex(local)).unwrap();
    assert_eq!(sum(remote.clone(), Some(uuid)), sum(local, Some(uuid)));
    assert_ne!(
        sum(remote.clone(), Some(uuid)),
        sum(remote, None),
        "the server checksummed the snapshot, not the head"
    );
    // What each image holds, read with the servers and the owner stopped.
    drop(nexus);
    drop(owner);
    for s in &mut servers {
        s.kill();
    }
    let mut images: Vec<_> = servers
        .iter()
        .zip(["snap-r1", "snap-r2"])
        .map(|(s, id)| s.image(id))
        .collect();
    images.push(tmp.path().join("local.img"));
    assert_ne!(
        before.expected, after.expected,
        "the head moved on after the snapshot"
    );
    for img in &images {
        let at = |of, want: &Vec<u64>, what: &str| {
            assert!(stamps_of(img, of) == *want, "{}: {what}", img.display());
        };
        at(Some(uuid), &before.expected, "s1");
        at(Some(s2), &after.expected, "s2");
        at(Some(s3), &at_s3, "s3");
        at(None, &head, "the head");
    }
}
