//! What the queue-thread design costs: remote replica I/O through the daemon's tokio
//! runtime (option B of notes/ublk-facts.md, what ublkd does) against the same
//! protocol exchange done inline on the calling thread with blocking syscalls (the
//! lower bound of option A, sockets on the queue's own ring: no thread hop at all).
//!
//! Both talk to a real `ublkd` replica server process over TCP loopback, 4 KiB writes.
//! QD1 isolates the per-request hop cost; QD32 shows whether it still matters once
//! requests are batched. Run: `cargo bench -p ublkd --bench remote_hop`; figures go to
//! stdout and to `target/bench-results/remote_hop.txt`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use replication::remote::conn::client_handshake;
use replication::remote::{RemoteClient, RemoteSpec, Secret};
use replication::{ByteOffset, Replica};
use wire::control::{decode_control, encode_control, OpenReply, OpenRequest};
use wire::frame::{Op, Opener, ReplyHeader, RequestHeader, Sealer, Status, REPLY_HEADER_LEN};
use wire::{Generation, OwnerId, ReplicaUuid, RequestId, VolumeTag, VolumeUuid};

const SECRET: &[u8] = b"bench-secret-0123456789abcdef";
const SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;

fn spec(addr: &str, replica: &str, owner: u64) -> RemoteSpec {
    RemoteSpec {
        addr: addr.into(),
        secret: Secret::new(SECRET.to_vec()),
        open: OpenRequest {
            replica: replica.into(),
            volume: "hop".into(),
            volume_uuid: VolumeUuid([7; 16]),
            size: SIZE,
            block_size: 4096,
            generation: Generation(1),
            owner: OwnerId(owner),
            create: Some(ReplicaUuid::random()),
        },
        deadline: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
    }
}

fn offset(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (SIZE / BLOCK as u64)) * BLOCK as u64
}

/// Option B: `Replica::write` futures awaited on a non-tokio thread; completions come
/// back from the runtime's threads (a cross-thread wake each way).
fn via_runtime(rt: &tokio::runtime::Handle, addr: &str, qd: usize, n: u64) -> f64 {
    let client = rt.block_on(async {
        RemoteClient::connect(spec(addr, &format!("b{qd}"), 1))
            .await
            .unwrap()
            .0
    });
    let client = Arc::new(client);
    let replica = client.replica(None);
    let bufs: Vec<Vec<u8>> = (0..qd).map(|i| vec![i as u8; BLOCK]).collect();
    let t = Instant::now();
    futures::executor::block_on(join_all(bufs.iter().enumerate().map(|(w, buf)| {
        let replica = &replica;
        async move {
            let mut i = w as u64;
            while i < n {
                replica
                    .write(ByteOffset(offset(i)), buf, false)
                    .await
                    .unwrap();
                i += qd as u64;
            }
        }
    })));
    n as f64 / t.elapsed().as_secs_f64()
}

/// 1 MiB writes one at a time (a rebuild's copy): MiB/s.
fn seq_1m(rt: &tokio::runtime::Handle, addr: &str, mib: u64) -> f64 {
    let client =
        rt.block_on(async { RemoteClient::connect(spec(addr, "seq", 1)).await.unwrap().0 });
    let client = Arc::new(client);
    let replica = client.replica(None);
    let buf = vec![5u8; 1 << 20];
    let t = Instant::now();
    for i in 0..mib {
        futures::executor::block_on(replica.write(
            ByteOffset((i % (SIZE >> 20)) << 20),
            &buf,
            false,
        ))
        .unwrap();
    }
    mib as f64 / t.elapsed().as_secs_f64()
}

/// Option A's lower bound at QD1: the calling thread does the exchange itself.
fn inline_qd1(rt: &tokio::runtime::Handle, addr: &str, n: u64) -> f64 {
    let (mut s, keys) = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let keys = client_handshake(&mut s, &Secret::new(SECRET.to_vec()))
            .await
            .unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        (s, keys)
    });
    let (mut sealer, mut opener) = (Sealer::new(keys.send), Opener::new(keys.recv));
    let open = encode_control(&spec(addr, "inline", 2).open);
    let mut h = RequestHeader::new(Op::Open, RequestId(0));
    h.payload_len = open.len() as u32;
    s.write_all(&sealer.seal_request(&h, &open)).unwrap();
    s.write_all(&open).unwrap();
    let (r, p) = reply(&mut s, &mut opener);
    assert_eq!(r.status, Status::Ok);
    let opened: OpenReply = decode_control(&p).unwrap();
    let data = vec![7u8; BLOCK];
    let t = Instant::now();
    for i in 0..n {
        let mut h = RequestHeader::new(Op::Write, RequestId(i + 1));
        (h.offset, h.len, h.payload_len) = (ByteOffset(offset(i)), BLOCK as u32, BLOCK as u32);
        (h.generation, h.session, h.volume) = (Generation(1), opened.session, VolumeTag::of("hop"));
        let head = sealer.seal_request(&h, &data);
        let iov = [std::io::IoSlice::new(&head), std::io::IoSlice::new(&data)];
        let k = s.write_vectored(&iov).unwrap();
        assert_eq!(k, head.len() + data.len(), "short write");
        assert_eq!(reply(&mut s, &mut opener).0.status, Status::Ok);
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn reply(s: &mut TcpStream, opener: &mut Opener) -> (ReplyHeader, Vec<u8>) {
    let mut b = [0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut b).unwrap();
    let (r, seal) = opener.open_reply(&b).unwrap();
    let mut p = vec![0u8; r.payload_len as usize];
    s.read_exact(&mut p).unwrap();
    opener.open_payload(&seal, &p).unwrap();
    (r, p)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, SECRET).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let conf = dir.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "[node]\nstate_dir = \"{d}/s\"\ncontrol_socket = \"{d}/c.sock\"\ncluster_secret_file = \"{k}\"\nlog_level = \"warn\"\n[server]\nlisten = \"{addr}\"\nstorage_dir = \"{d}/r\"\n",
            d = dir.path().display(),
            k = key.display()
        ),
    )
    .unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_ublkd"))
        .arg("--config")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while TcpStream::connect(&addr).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // As in the daemon: one runtime thread that other threads use through its Handle.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    let rt = &handle;
    let n = 20_000;
    // Warm up the server's file and both paths.
    via_runtime(rt, &addr, 1, 2000);
    inline_qd1(rt, &addr, 2000);
    let b1 = via_runtime(rt, &addr, 1, n);
    let a1 = inline_qd1(rt, &addr, n);
    let b32 = via_runtime(rt, &addr, 32, 4 * n);
    seq_1m(rt, &addr, 256);
    let s1m = seq_1m(rt, &addr, 1024);
    let lines = [
        format!("remote_hop_inline_qd1_iops={a1:.0}"),
        format!("remote_hop_runtime_qd1_iops={b1:.0}"),
        format!("remote_hop_runtime_qd32_iops={b32:.0}"),
        format!("remote_hop_cost_us_per_io_qd1={:.1}", 1e6 / b1 - 1e6 / a1),
        format!("remote_hop_qd1_ratio_runtime_vs_inline={:.2}", b1 / a1),
        format!("remote_seq_1m_qd1_mibps={s1m:.0}"),
    ];
    let _ = server.kill();
    let _ = server.wait();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("remote_hop.txt"), lines.join("\n") + "\n").unwrap();
    for l in lines {
        println!("RESULT {l}");
    }
}
