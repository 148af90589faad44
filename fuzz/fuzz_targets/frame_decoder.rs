//! Fuzzes the replica wire protocol's decoders (`replication::remote::wire`):
//! request and reply headers, payload checksums and the OPEN/STAT control payloads.
//! The checks live in `common/frame_check.rs`, shared with the stable-Rust corpus
//! replay `replication/tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/frame_check.rs"]
mod frame_check;

fuzz_target!(|data: &[u8]| frame_check::check(data));
