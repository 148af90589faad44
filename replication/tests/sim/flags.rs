//! Scenario flags: every fault class and operation the simulator can mix in.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags(pub u32);

impl Flags {
    /// `Fault::Writes`: a replica fails writes (and flush/discard/zeroes), reads work.
    pub const WRITE_ERR: Flags = Flags(1 << 0);
    /// `Fault::Reads`: a replica fails reads.
    pub const READ_ERR: Flags = Flags(1 << 1);
    /// `Fault::All`: every operation of a replica fails with EIO.
    pub const EIO: Flags = Flags(1 << 2);
    /// Remote replicas lose their connection (the loss reported before their
    /// requests fail), and reconnect later with their label.
    pub const CONN_LOSS: Flags = Flags(1 << 3);
    /// Several remote replicas lose their connection under one request: the
    /// request's ENOTCONN errors reach the ack rule before the `lost` events.
    pub const CONN_MULTI: Flags = Flags(1 << 4);
    /// A remote replica's host crashes: its unflushed writes are gone.
    pub const HOST_CRASH: Flags = Flags(1 << 5);
    /// Partial and full rebuilds of faulted replicas, interleaved with the
    /// application's requests.
    pub const REBUILD: Flags = Flags(1 << 6);
    /// verify --repair (majority vote), interleaved with the application.
    pub const VERIFY: Flags = Flags(1 << 7);
    /// Slots added (fresh replicas, rebuilt later) and removed.
    pub const ADD_REMOVE: Flags = Flags(1 << 8);
    /// Faults, heals and reconnects while a rebuild runs (on its sources too).
    pub const REBUILD_FAULTS: Flags = Flags(1 << 9);
    /// Faults, heals and reconnects while a verify runs.
    pub const VERIFY_FAULTS: Flags = Flags(1 << 10);
    /// Removing a slot while it is Connecting.
    pub const REMOVE_CONNECTING: Flags = Flags(1 << 11);

    /// Several online replicas carry a fault that fails their label writes at once.
    pub const LABEL_FAULTS: Flags = Flags(1 << 12);

    /// Two remote replicas' connections drop one right after the other (both
    /// `lost` events before the persister runs).
    pub const CONN_PAIR: Flags = Flags(1 << 13);

    /// A rebuild's target reconnects while its rebuild runs (after its
    /// connection, or its host, went down).
    pub const TARGET_FLAP: Flags = Flags(1 << 14);

    pub const NAMES: &'static [(Flags, &'static str)] = &[
        (Flags::WRITE_ERR, "WRITE_ERR"),
        (Flags::READ_ERR, "READ_ERR"),
        (Flags::EIO, "EIO"),
        (Flags::CONN_LOSS, "CONN_LOSS"),
        (Flags::CONN_MULTI, "CONN_MULTI"),
        (Flags::HOST_CRASH, "HOST_CRASH"),
        (Flags::REBUILD, "REBUILD"),
        (Flags::VERIFY, "VERIFY"),
        (Flags::ADD_REMOVE, "ADD_REMOVE"),
        (Flags::REBUILD_FAULTS, "REBUILD_FAULTS"),
        (Flags::VERIFY_FAULTS, "VERIFY_FAULTS"),
        (Flags::REMOVE_CONNECTING, "REMOVE_CONNECTING"),
        (Flags::LABEL_FAULTS, "LABEL_FAULTS"),
        (Flags::CONN_PAIR, "CONN_PAIR"),
        (Flags::TARGET_FLAP, "TARGET_FLAP"),
    ];

    pub const NONE: Flags = Flags(0);

    pub fn all() -> Flags {
        Flags(Flags::NAMES.iter().fold(0, |m, (f, _)| m | f.0))
    }

    pub fn has(self, f: Flags) -> bool {
        self.0 & f.0 == f.0
    }

    pub fn any(self, f: Flags) -> bool {
        self.0 & f.0 != 0
    }

    pub fn without(self, f: Flags) -> Flags {
        Flags(self.0 & !f.0)
    }

    pub fn with(self, f: Flags) -> Flags {
        Flags(self.0 | f.0)
    }

    /// `A,B,C` (names as above; `ALL` for every flag).
    pub fn parse(s: &str) -> Flags {
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .fold(Flags::NONE, |m, n| {
                if n.eq_ignore_ascii_case("ALL") {
                    return Flags::all();
                }
                let f = Flags::NAMES
                    .iter()
                    .find(|(_, name)| name.eq_ignore_ascii_case(n))
                    .unwrap_or_else(|| panic!("unknown scenario flag {n:?}"))
                    .0;
                m.with(f)
            })
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        self.with(o)
    }
}

impl std::fmt::Display for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Flags::NAMES
            .iter()
            .filter(|(x, _)| self.has(*x))
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}
