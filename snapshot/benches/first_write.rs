//! Where the first write after a snapshot spends its time, natively (no emulator):
//! 4 KiB random writes at QD1 through a local replica's store on a file on the
//! host's filesystem, one pass over a 256 MiB region each:
//!   overwrite   the flat store over blocks it already holds
//!   sparse      the flat store into never-written space of the file (what the
//!               filesystem's block allocation costs)
//!   first       the layered store right after a snapshot (every write a first
//!               touch: pool grain, descriptor, presence bit)
//!   steady      the layered store over blocks its head already holds
//! Run: `cargo bench -p snapshot --bench first_write`; figures to stdout and to
//! `target/bench-results/first_write.txt`.

use std::sync::Arc;
use std::time::Instant;

use futures::executor::block_on;
use snapshot::flat::{AlignedBuf, Create, LocalBacking};
use snapshot::replica::LocalReplica;
use snapshot::uring::BlockingUring;
use snapshot::ByteOffset;

const VOLUME: u64 = 1 << 30;
const REGION: u64 = 256 << 20;
const BLOCK: u64 = 4096;

fn pass(r: &LocalReplica<BlockingUring>, base: u64, seed: u64) -> f64 {
    let blocks = REGION / BLOCK;
    let mut buf = AlignedBuf::zeroed(BLOCK as usize);
    buf.as_mut_slice().fill(0x5a);
    let t = Instant::now();
    // A permutation of the region's blocks (odd multiplier modulo a power of two).
    for i in 0..blocks {
        let b = (i.wrapping_mul(40503).wrapping_add(seed)) % blocks;
        block_on(r.write(ByteOffset(base + b * BLOCK), buf.as_slice(), false)).unwrap();
    }
    t.elapsed().as_nanos() as f64 / blocks as f64 / 1000.0
}

fn main() {
    let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
    let b =
        Arc::new(LocalBacking::open(&dir.path().join("r.img"), VOLUME, Create::IfMissing).unwrap());
    b.write_label(&wire::label::Label::new(
        "bench",
        wire::VolumeUuid::random(),
        wire::ReplicaUuid::random(),
        VOLUME,
        4096,
    ))
    .unwrap();
    let r = LocalReplica::new(b.clone(), BlockingUring::new().unwrap());
    pass(&r, 0, 1); // prefill the region
    block_on(r.flush()).unwrap();
    let overwrite = pass(&r, 0, 2);
    let sparse = pass(&r, REGION, 3);
    block_on(r.flush()).unwrap();
    b.snapshot(wire::SnapshotUuid::random(), "s", 1).unwrap();
    let first = pass(&r, 0, 4);
    block_on(r.flush()).unwrap();
    let steady = pass(&r, 0, 5);
    let lines = [
        format!("first_write_us_overwrite={overwrite:.2}"),
        format!("first_write_us_sparse={sparse:.2}"),
        format!("first_write_us_first={first:.2}"),
        format!("first_write_us_steady={steady:.2}"),
    ];
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("first_write.txt"), lines.join("\n") + "\n").unwrap();
    for l in lines {
        println!("RESULT {l}");
    }
}
