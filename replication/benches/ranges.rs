//! What the range table costs per mutation with 32 in flight and no overlap (the
//! common case it must not slow down): lock a random 4 KiB range, keep the last 32
//! guards, release the oldest. The end-to-end figure is `bench_costs` of
//! `tests/vm/run bench`. Run: `cargo bench -p replication --bench ranges`; figures go
//! to stdout and to `target/bench-results/ranges.txt`.

use std::collections::VecDeque;
use std::time::Instant;

use futures::FutureExt;
use replication::ranges::RangeTable;

fn main() {
    let table = RangeTable::new();
    let mut held = VecDeque::with_capacity(33);
    let n = 2_000_000u64;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            // An odd multiplier: 2^16 consecutive i give distinct blocks, so the 32
            // held ranges never overlap (scattered like random I/O).
            let off = (i.wrapping_mul(40503) % (1 << 16)) * 4096;
            let g = table
                .lock(off, 4096, &None)
                .now_or_never()
                .expect("no overlap");
            held.push_back(g);
            if held.len() > 32 {
                held.pop_front();
            }
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    let line = format!("ranges_ns_per_mutation_qd32={best:.0}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("ranges.txt"), format!("{line}\n")).unwrap();
    println!("RESULT {line}");
}
