//! What the host integration tests share: real `ublkd` replica-server processes on
//! 127.0.0.x, owners built from the replication crate's parts, and a verifying
//! workload (every block carries the sequence number of its last write).

#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use replication::backing::Backing;
use replication::health::{Health, StateSink};
use replication::local::{Create, LocalBacking};
use replication::remote::{RemoteClient, RemoteSpec, Secret};
use replication::testing::{health_over, stamp_of, stamped_block, test_nexus};
use replication::{BlockRequest, ByteLen, ByteOffset, Nexus};
use wire::control::OpenRequest;
use wire::label::LABEL_AREA;
use wire::{Generation, OwnerId, ReplicaUuid, VolumeUuid};

pub const BLOCK: usize = 4096;
pub const BLOCKS: usize = 512;
pub const SIZE: u64 = (BLOCK * BLOCKS) as u64;
pub const SECRET: &[u8] = b"test-cluster-secret-0123456789";

/// One `ublkd` process that only hosts replicas.
pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl ServerProc {
    pub fn image(&self, replica: &str) -> PathBuf {
        self.dir.join("replicas").join(format!("{replica}.img"))
    }
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    /// Kill and start again with the same config (same address and storage).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
    pub fn start(&mut self) {
        let starts = self.log().matches("ublkd running").count();
        self.child = spawn_ublkd(&self.dir);
        wait_listening(self, starts);
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ublkd.log")).unwrap_or_default()
    }
    /// Whether the log shows `needle` within 10 s.
    pub fn log_shows(&self, needle: &str) -> bool {
        let t0 = Instant::now();
        while !self.log().contains(needle) {
            if t0.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // A failing test shows what its servers said (their directory goes with it).
        if std::thread::panicking() {
            eprintln!("--- log of the server at {}:\n{}", self.addr, self.log());
        }
        let _ = unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Until the server accepts and its daemon has finished starting (a process that
/// listened and then failed to start would pass a bare connect).
/// `starts`: how many starts its (appended) log showed before this one.
fn wait_listening(s: &mut ServerProc, starts: usize) {
    let t0 = Instant::now();
    while TcpStream::connect(s.addr).is_err() || s.log().matches("ublkd running").count() <= starts
    {
        assert!(s.alive(), "server exited: {}", s.log());
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn secret_file(dir: &Path, secret: &[u8]) -> PathBuf {
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
pub fn start_server(root: &Path, n: u8) -> ServerProc {
    let dir = root.join(format!("node{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ip = format!("127.0.0.{n}");
    let addr: SocketAddr = format!("{ip}:{}", free_port(&ip)).parse().unwrap();
    std::fs::write(
        dir.join("ublk.toml"),
        format!(
            "[node]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{d}/ctl.sock\"\n\
             cluster_secret_file = \"{k}\"\nlog_level = \"debug\"\n\
             [server]\nlisten = \"{addr}\"\nstorage_dir = \"{d}/replicas\"\n",
            d = dir.display(),
            k = secret_file(&dir, SECRET).display(),
        ),
    )
    .unwrap();
    let starts = std::fs::read_to_string(dir.join("ublkd.log"))
        .unwrap_or_default()
        .matches("ublkd running")
        .count();
    let child = spawn_ublkd(&dir);
    let mut s = ServerProc { child, addr, dir };
    wait_listening(&mut s, starts);
    s
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An OPEN of `replica` of `volume` (`SIZE` bytes, 4 KiB blocks), creating it if missing.
pub fn open_request(
    replica: &str,
    volume: &str,
    vu: VolumeUuid,
    generation: u64,
    owner: u64,
) -> OpenRequest {
    OpenRequest {
        replica: replica.into(),
        volume: volume.into(),
        volume_uuid: vu,
        size: SIZE,
        block_size: 4096,
        generation: Generation(generation),
        owner: OwnerId(owner),
        create: Some(ReplicaUuid::random()),
    }
}

pub fn spec(
    s: &ServerProc,
    replica: &str,
    volume: &str,
    vu: VolumeUuid,
    generation: u64,
    owner: u64,
) -> RemoteSpec {
    RemoteSpec {
        addr: s.addr.to_string(),
        secret: Secret::new(SECRET.to_vec()),
        open: open_request(replica, volume, vu, generation, owner),
        // The daemon's default: a loaded CI host can hold a reply (a FUA write, a
        // label fsync) past a shorter one and fault a healthy replica.
        deadline: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(3),
    }
}

/// A volume owner: remote replicas (and optionally a local file) behind one health.
pub struct Owner {
    pub clients: Vec<Arc<RemoteClient>>,
    pub local: Option<Arc<LocalBacking>>,
    pub health: Arc<Health>,
    pub ranges: Arc<replication::ranges::RangeTable>,
}

impl Owner {
    pub fn open(
        rt: &tokio::runtime::Runtime,
        specs: Vec<RemoteSpec>,
        local: Option<&Path>,
    ) -> Owner {
        Self::open_with(rt, specs, local, Box::new(replication::health::NoPersist))
    }

    pub fn open_with(
        rt: &tokio::runtime::Runtime,
        specs: Vec<RemoteSpec>,
        local: Option<&Path>,
        sink: Box<dyn StateSink>,
    ) -> Owner {
        let vu = specs
            .first()
            .map(|s| s.open.volume_uuid)
            .unwrap_or_else(VolumeUuid::random);
        let volume = specs
            .first()
            .map(|s| s.open.volume.clone())
            .unwrap_or_else(|| "v".into());
        let opened: Vec<(Arc<RemoteClient>, ReplicaUuid)> = rt.block_on(async {
            join_all(specs.into_iter().map(RemoteClient::connect))
                .await
                .into_iter()
                .map(|r| {
                    let (c, reply) = r.expect("open remote replica");
                    (Arc::new(c), reply.label.replica_uuid)
                })
                .collect()
        });
        let local =
            local.map(|p| Arc::new(LocalBacking::open(p, SIZE, Create::IfMissing).unwrap()));
        let mut backings: Vec<(ReplicaUuid, Backing)> = Vec::new();
        if let Some(l) = &local {
            backings.push((ReplicaUuid::random(), Backing::Local(l.clone())));
        }
        backings.extend(opened.iter().map(|(c, u)| (*u, Backing::Remote(c.clone()))));
        let health = health_over(&volume, vu, SIZE, backings, sink);
        Owner {
            clients: opened.into_iter().map(|(c, _)| c).collect(),
            local,
            health,
            ranges: replication::ranges::RangeTable::new(),
        }
    }

    pub fn nexus(&self) -> Nexus {
        test_nexus(&self.health, self.ranges.clone())
    }

    pub fn states(&self) -> Vec<&'static str> {
        states_of(&self.health)
    }
}

/// The state names of a health's slots, in slot order.
pub fn states_of(h: &Health) -> Vec<&'static str> {
    h.snapshot().slots.iter().map(|s| s.state.name()).collect()
}

/// A [`stamped_block`] of this test's block size.
pub fn block_data(block: usize, seq: u64) -> Vec<u8> {
    stamped_block(block, seq, BLOCK)
}

pub struct Outcome {
    /// Last acknowledged sequence per block.
    pub expected: Vec<u64>,
    pub errors: u64,
    pub ops: u64,
    /// Slowest acknowledged write.
    pub max_write: Duration,
}

/// `workers` concurrent writers (each owns the blocks ≡ its index), interleaved with
/// verified reads, for `ops` operations; `fault` runs once after `fault_at` ops.
pub fn workload(
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
pub fn workload_from(
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

/// Every block of the replica image holds its last acknowledged write (the label
/// area after the data is not compared).
pub fn verify_image(path: &Path, expected: &[u64]) {
    let mut f = std::fs::File::open(path).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        SIZE + LABEL_AREA,
        "{}: data, then the label area",
        path.display()
    );
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

/// The first `SIZE` bytes of an image.
pub fn data_of(path: &Path) -> Vec<u8> {
    let mut v = std::fs::read(path).unwrap();
    v.truncate(SIZE as usize);
    v
}

pub fn flush(nexus: &Nexus) {
    futures::executor::block_on(nexus.submit(BlockRequest::Flush, &mut [])).expect("flush");
}

/// Poll `f` every 20 ms until it holds; panics with `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}
