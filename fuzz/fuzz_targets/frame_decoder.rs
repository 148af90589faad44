//! Fuzzes the replica protocol's decoders (the `wire` crate): request and reply
//! headers and their tags, the control payloads, and replica label slots.
//! The checks live in `common/frame_check.rs`, shared with the stable-Rust corpus
//! replay `replication/tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/frame_check.rs"]
mod frame_check;

fuzz_target!(|data: &[u8]| frame_check::check(data));
