//! Durable replacement of small files (records, metadata): write a temporary file,
//! fsync it, rename it over the target, fsync the directory. A crash leaves the old
//! or the new version, never a torn one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Atomically replace `path` with `bytes` (mode 0600: records hold replica
/// identities and are the daemon's alone).
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// [`replace`] with pretty-printed JSON.
pub fn replace_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    replace(
        path,
        &serde_json::to_vec_pretty(value).expect("records serialize"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        super::replace_json(&p, &vec![1, 2]).unwrap();
        super::replace_json(&p, &vec![3]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p)
                .unwrap()
                .replace([' ', '\n'], ""),
            "[3]"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
