//! The volume's ublk device as found at start: ours to recover, another daemon's,
//! or dead.

use std::time::Duration;

use libublk::ctrl::UblkCtrl;

use crate::config::VolumeConfig;
use crate::error::DaemonError;
use crate::frontend;

/// How the device comes up.
pub enum Mode {
    Add {
        id: i32,
    },
    Recover {
        id: u32,
        queues: u16,
        depth: u16,
        max_io: u32,
    },
}

pub fn is_quiesced(id: u32) -> bool {
    UblkCtrl::new_simple(id as i32)
        .is_ok_and(|c| c.dev_info().state as u32 == libublk::sys::UBLK_S_DEV_QUIESCED)
}

pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || nix::errno::Errno::last() != nix::errno::Errno::ESRCH)
}

/// Decide what to do with an existing device that has our recorded id.
pub fn inspect_existing(cfg: &VolumeConfig, uid: u32, id: u32) -> Result<Mode, DaemonError> {
    let c = UblkCtrl::new_simple(id as i32).map_err(|e| DaemonError::ublk("inspect device", e))?;
    let info = c.dev_info();
    if info.ublksrv_flags != frontend::owner_flags(uid) {
        return Err(DaemonError::volume(
            &cfg.name,
            format!("/dev/ublkb{id} exists but was not created by ublkd for this volume"),
        ));
    }
    match info.state as u32 {
        libublk::sys::UBLK_S_DEV_QUIESCED => {
            tracing::info!(volume = %cfg.name, id, "found QUIESCED device: recovering it");
            if (info.nr_hw_queues, info.queue_depth) != (cfg.queues, cfg.depth) {
                tracing::warn!(volume = %cfg.name, "queues/depth differ from config: keeping the device's until it is recreated");
            }
            Ok(Mode::Recover {
                id,
                queues: info.nr_hw_queues,
                depth: info.queue_depth,
                max_io: info.max_io_buf_bytes,
            })
        }
        libublk::sys::UBLK_S_DEV_LIVE if !pid_alive(info.ublksrv_pid) => {
            // Its server just died: the kernel moves the device to QUIESCED once the
            // requests the dead server held are dealt with. Give it a moment.
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(200));
                let c = UblkCtrl::new_simple(id as i32)
                    .map_err(|e| DaemonError::ublk("inspect device", e))?;
                if c.dev_info().state as u32 != libublk::sys::UBLK_S_DEV_LIVE {
                    return inspect_existing(cfg, uid, id);
                }
            }
            Err(DaemonError::volume(
                &cfg.name,
                format!(
                    "/dev/ublkb{id} stays LIVE although its server (pid {}) is gone",
                    info.ublksrv_pid
                ),
            ))
        }
        libublk::sys::UBLK_S_DEV_LIVE => Err(DaemonError::volume(
            &cfg.name,
            format!(
                "/dev/ublkb{id} is LIVE, served by pid {}: is another ublkd running?",
                info.ublksrv_pid
            ),
        )),
        _ => {
            // Added but never started (or stopped): nothing to keep.
            tracing::info!(volume = %cfg.name, id, "removing dead device before re-adding it");
            c.del_dev()
                .map_err(|e| DaemonError::ublk("delete dead device", e))?;
            Ok(Mode::Add { id: id as i32 })
        }
    }
}

/// Take back a QUIESCED device (START_USER_RECOVERY).
pub fn start_recovery(cfg: &VolumeConfig, id: u32) -> Result<(), DaemonError> {
    let c = UblkCtrl::new_simple(id as i32).map_err(|e| DaemonError::ublk("open", e))?;
    match c.start_user_recover() {
        Ok(r) if r >= 0 => Ok(()),
        // 6.12 refuses a second START_USER_RECOVERY after an attempt that died
        // half-way (queues already reset). If the device is still QUIESCED,
        // recovering it directly is what that attempt left to do.
        Ok(r) if r == -libc::EINVAL && is_quiesced(id) => {
            tracing::warn!(volume = %cfg.name, id,
                "START_USER_RECOVERY refused (EINVAL) but the device is QUIESCED: recovering it directly");
            Ok(())
        }
        other => Err(DaemonError::ublk(
            format!("START_USER_RECOVERY of ublkc{id}"),
            other,
        )),
    }
}

/// Remove the QUIESCED device of an owner that was taken over: recovering it would
/// let the kernel re-issue the dead daemon's writes onto the newer owner's data.
pub fn remove_stale(cfg: &VolumeConfig, id: u32) {
    match UblkCtrl::new_simple(id as i32) {
        Ok(c) => {
            if let Err(e) = c.del_dev_async() {
                tracing::error!(volume = %cfg.name, error = ?e, "cannot delete the stale device");
            }
        }
        Err(e) => tracing::error!(volume = %cfg.name, error = ?e, "cannot open the stale device"),
    }
}
