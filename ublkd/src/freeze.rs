//! What a snapshot asks of the kernel around the device: freeze the filesystem
//! mounted from it (FIFREEZE, always thawed), or hold the device exclusively
//! while a revert changes what it reads (then drop its page cache).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const BLKFLSBUF: libc::c_ulong = 0x1261;

fn device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Where the filesystem on `/dev/ublkbN` is mounted, as a path this process can
/// open. The daemon runs in a mount namespace of its own (ublk mounts detached:
/// see `private_mount_namespace`), so the mount is looked up where users make
/// them, init's namespace, and reached through `/proc/1/root`.
pub fn mountpoint(id: u32) -> Result<Option<PathBuf>, String> {
    let dev = device_path(id);
    let rdev = std::fs::metadata(&dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?
        .rdev();
    for (info, root) in [
        ("/proc/1/mountinfo", "/proc/1/root"),
        ("/proc/self/mountinfo", "/"),
    ] {
        let Ok(text) = std::fs::read_to_string(info) else {
            continue;
        };
        if let Some(at) = find_mount(&text, libc::major(rdev), libc::minor(rdev)) {
            return Ok(Some(PathBuf::from(root).join(at.trim_start_matches('/'))));
        }
    }
    Ok(None)
}

/// The mount point of the first mount of device `major:minor` in a mountinfo.
fn find_mount(info: &str, major: u32, minor: u32) -> Option<String> {
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(2) != Some(&format!("{major}:{minor}").as_str()) {
            return None;
        }
        Some(unescape(f.get(4)?))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// A frozen filesystem; thawed when dropped, whatever happened meanwhile.
pub struct Frozen {
    dir: File,
    at: PathBuf,
}

impl Frozen {
    /// Freeze the filesystem mounted from `/dev/ublkbN`. Its own writes and
    /// flushes reach the device before this returns (the device must be served).
    pub fn device(id: u32) -> Result<Frozen, String> {
        let at = mountpoint(id)?.ok_or_else(|| {
            format!(
                "{} is not mounted: --freeze needs the filesystem mounted from it (take the snapshot without --freeze)",
                device_path(id).display()
            )
        })?;
        let dir = File::open(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        // SAFETY: FIFREEZE takes no argument memory (an int, ignored).
        if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) } != 0 {
            return Err(format!(
                "FIFREEZE {}: {}",
                at.display(),
                std::io::Error::last_os_error()
            ));
        }
        tracing::info!(mountpoint = %at.display(), "filesystem frozen for a snapshot");
        Ok(Frozen { dir, at })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) } != 0 {
            tracing::error!(mountpoint = %self.at.display(), error = %std::io::Error::last_os_error(),
                "FITHAW failed: thaw it by hand (fsfreeze -u)");
        } else {
            tracing::info!(mountpoint = %self.at.display(), "filesystem thawed");
        }
    }
}

/// The device held open exclusively: refused while it is in use as `stop` sees it
/// (mounted, a holder device on top, open by a process), and keeps exclusive
/// openers (a mount) out meanwhile.
pub struct Exclusive {
    file: File,
}

impl Exclusive {
    pub fn device(id: u32) -> Result<Exclusive, String> {
        let path = device_path(id);
        if let Some(why) = crate::daemon::device_busy(id) {
            return Err(format!(
                "{} is in use ({why}): unmount it and stop what uses it, then retry",
                path.display()
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => format!(
                    "{} is in use (mounted, or held open): unmount it and stop what uses it, then retry",
                    path.display()
                ),
                _ => format!("{}: {e}", path.display()),
            })?;
        Ok(Exclusive { file })
    }

    /// Forget what the kernel cached of the device: it reads differently now.
    pub fn drop_cache(&self) {
        // SAFETY: BLKFLSBUF takes no argument memory.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKFLSBUF, 0) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "BLKFLSBUF failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_of_a_device_is_found_by_its_numbers() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 259:3 / /mnt/with\\040space rw - ext4 /dev/ublkb3 rw\n";
        assert_eq!(find_mount(info, 259, 3).as_deref(), Some("/mnt/with space"));
        assert_eq!(find_mount(info, 259, 4), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/a\134b"), r"/a\b");
    }
}
