//! The ublk side of the data path. One thread per ublk queue; on it one task per
//! tag: fetch a request from the kernel, map it to a [`BlockRequest`], let the
//! volume's [`Nexus`] serve it on this thread's io_uring, commit the result and
//! fetch the next — the ublk commands and the replica I/O share one ring, so one
//! `io_uring_enter` both completes and fetches.

use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::sync::Arc;

use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use replication::backing::Backing;
use replication::health::Health;
use replication::local::LocalReplica;
use replication::ranges::RangeTable;
use replication::request::Geometry;
use replication::testing::MemReplica;
use replication::uring::Uring;
use replication::wake::Kick;
use replication::{BlockRequest, Nexus, Replica, ReplicationError};

/// Replica I/O on the calling queue thread's own ring.
#[derive(Clone, Copy)]
pub struct QueueRing;

impl Uring for QueueRing {
    async fn submit(&self, sqe: io_uring::squeue::Entry) -> i32 {
        ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO)
    }
}

/// What all queue threads of one volume share.
pub struct DataPath {
    pub volume: String,
    pub geometry: Geometry,
    pub health: Arc<Health>,
    /// Overlapping mutations in one order on every replica, across all queues.
    pub ranges: Arc<RangeTable>,
    /// Advertise DISCARD: every replica zeroes a discarded range without writing
    /// zeroes (otherwise a discard would be a slow zeroing write, so the kernel is
    /// not offered it; WRITE_ZEROES stays).
    pub discard: bool,
    /// Local replicas at start: each takes one SQE per request on the queue ring.
    pub local_replicas: usize,
    /// Handing the device over to the next ublkd: a request that arrives is held,
    /// never started nor completed (the kernel reissues it to the next daemon).
    pub hand_over: Arc<std::sync::atomic::AtomicBool>,
}

/// Wakes a queue thread from `io_uring_enter` when a remote replica (on a tokio
/// thread) completed one of its requests: the queue ring polls this eventfd.
struct EventFdKick(std::os::fd::OwnedFd);

impl Kick for EventFdKick {
    fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local; a full counter (EAGAIN) still wakes.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

fn eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain syscall; the fd is owned on success.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Keeps a POLLIN armed on the kick eventfd on the queue ring; its completion makes
/// the queue loop run the executor, which polls the tag tasks the remote side woke.
async fn kick_pump(kick: Arc<EventFdKick>) {
    let fd = kick.0.as_raw_fd();
    loop {
        let sqe =
            io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as u32).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(r) if r >= 0 || r == -libc::EINTR => {}
            Err(UblkError::QueueIsDown) => return,
            other => {
                // Remote completions would then wait for the next ublk event.
                tracing::error!(result = ?other, "queue eventfd poll failed: remote replica completions lose their wake-up");
                return;
            }
        }
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local; resets the counter (non-blocking).
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }
}

/// Marks devices created by ublkd in `ublksrv_flags` (which the kernel keeps across
/// daemon crashes): low 32 bits a magic, high 32 bits the volume's random uid from
/// its record, so a restarted daemon takes back only the devices of its own volumes.
pub const OWNER_MAGIC: u64 = 0x6b_64_62_75; // "ubdk"

pub fn owner_flags(volume_uid: u32) -> u64 {
    (volume_uid as u64) << 32 | OWNER_MAGIC
}

/// Fill the device parameters the kernel will expose.
pub fn init_target(dev: &mut UblkDev, dp: &DataPath) {
    let g = &dp.geometry;
    let bs_shift = g.block_size.trailing_zeros() as u8;
    let tgt = &mut dev.tgt;
    tgt.dev_size = g.size;
    // Each request can put one SQE per local replica on the ring, plus the ublk
    // command; room for two more local replicas joining while the device runs.
    let per_io = dp.local_replicas as u32 + 3;
    let sq = (dev.dev_info.queue_depth as u32 * per_io).clamp(64, 4096) as u16;
    tgt.sq_depth = sq;
    tgt.cq_depth = sq;
    let discard_sectors = if dp.discard { u32::MAX >> 9 } else { 0 };
    tgt.params = libublk::sys::ublk_params {
        types: libublk::sys::UBLK_PARAM_TYPE_BASIC | libublk::sys::UBLK_PARAM_TYPE_DISCARD,
        basic: libublk::sys::ublk_param_basic {
            // Replicas have volatile caches (FLUSH = fdatasync each) and honour FUA
            // (RWF_DSYNC), so both are advertised truthfully.
            attrs: libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA,
            logical_bs_shift: bs_shift,
            physical_bs_shift: bs_shift.max(12),
            io_opt_shift: 12,
            io_min_shift: bs_shift,
            max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
            dev_sectors: g.size >> 9,
            ..Default::default()
        },
        discard: libublk::sys::ublk_param_discard {
            discard_granularity: g.block_size,
            max_discard_sectors: discard_sectors,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    dev.set_target_json(serde_json::json!({ "ublkd": { "volume": dp.volume } }));
}

/// Body of one queue thread; returns when the device stops.
pub fn run_queue(qid: u16, dev: &UblkDev, dp: &DataPath) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(volume = %dp.volume, qid, error = ?e, "cannot set up ublk queue");
            // Without this, START_DEV would wait forever for this queue's buffers.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    // Every queue can be woken from another thread: remote completions, a range
    // released by another queue, a replica coming back, a durable state change.
    let kick = match eventfd() {
        Ok(fd) => Arc::new(EventFdKick(fd)),
        Err(e) => {
            tracing::error!(volume = %dp.volume, qid, error = %e, "cannot create the queue's eventfd");
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let k = kick.clone() as Arc<dyn Kick>;
    let handles = move |b: &Backing| -> Box<dyn Replica> {
        match b {
            Backing::Local(b) => Box::new(LocalReplica::new(b.clone(), QueueRing)),
            Backing::Remote(c) => Box::new(c.replica(Some(k.clone()))),
            Backing::Memory(m) => Box::new(MemReplica::new(m.clone())),
        }
    };
    let nexus = Rc::new(Nexus::new(
        dp.health.clone(),
        dp.ranges.clone(),
        Some(kick.clone() as Arc<dyn Kick>),
        Box::new(handles),
    ));
    let exe = Rc::new(smol::LocalExecutor::new());
    exe.spawn(kick_pump(kick)).detach();
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let (q, nexus, geo, vol) = (q.clone(), nexus.clone(), dp.geometry, dp.volume.clone());
            let hand_over = dp.hand_over.clone();
            exe.spawn(async move {
                match serve_tag(&q, tag, &nexus, &geo, &hand_over).await {
                    Err(UblkError::QueueIsDown) | Ok(()) => {}
                    Err(e) => {
                        tracing::error!(volume = %vol, qid, tag, error = ?e, "io task failed")
                    }
                }
            })
        })
        .collect();
    let ex = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while ex.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            if !matches!(e, UblkError::QueueIsDown) {
                tracing::error!(qid, error = ?e, "queue event loop failed");
            }
        }
    }));
}

/// The life of one tag: FETCH, then forever serve + COMMIT_AND_FETCH.
async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    nexus: &Nexus,
    geo: &Geometry,
    hand_over: &std::sync::atomic::AtomicBool,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        // A request arrived. Handing over: held, untouched, for the next daemon.
        if hand_over.load(std::sync::atomic::Ordering::SeqCst) {
            return futures::future::pending().await;
        }
        let res = {
            let iod = q.get_iod(tag);
            match BlockRequest::from_ublk(iod.op_flags, iod.start_sector, iod.nr_sectors, geo) {
                Ok(req) => match nexus.submit(req, buf.as_mut_slice()).await {
                    Ok(bytes) => bytes as i32,
                    Err(errno) => -errno.0,
                },
                Err(e) => {
                    tracing::warn!(tag, error = %e, "rejected request from the kernel");
                    match e {
                        ReplicationError::UnsupportedOp(_) => -libc::EOPNOTSUPP,
                        _ => -libc::EINVAL,
                    }
                }
            }
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_flags_carry_magic_and_volume_uid() {
        let a = owner_flags(7);
        assert_eq!(a & 0xffff_ffff, OWNER_MAGIC);
        assert_eq!(a >> 32, 7);
        assert_ne!(a, owner_flags(8));
    }
}
