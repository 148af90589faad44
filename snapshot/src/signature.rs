//! Recognisable data on a replica's backing that carries no ublkd label: a
//! filesystem, an LVM physical volume, a partition table, a RAID member. A local
//! replica path holding such data is refused unless the operator says to use it
//! (a renamed `/dev/sdX` must never be overwritten by a full rebuild).
//!
//! Pure: [`detect`] looks at the first [`HEAD_LEN`] bytes. The magics and their
//! offsets are those libblkid checks (util-linux `libblkid/src/superblocks`).

/// Bytes [`detect`] wants: enough for the btrfs superblock at 64 KiB.
pub const HEAD_LEN: usize = 72 << 10;

/// What `head` (the start of a device or file) holds, named for an operator;
/// `None` when nothing known is recognised (blank, zeroes, or unknown data).
pub fn detect(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let le32 = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    const MD_MAGIC: u32 = 0xa92b_4efc;
    let checks: [(bool, &'static str); 14] = [
        (at(0, b"LUKS\xba\xbe"), "a LUKS encrypted volume"),
        (at(0, b"XFSB"), "an XFS filesystem"),
        (at(1080, &[0x53, 0xef]), "an ext2/ext3/ext4 filesystem"),
        (at(65536 + 64, b"_BHRfS_M"), "a btrfs filesystem"),
        (le32(1024) == Some(0xf2f5_2010), "an F2FS filesystem"),
        (at(0, b"hsqs"), "a squashfs filesystem"),
        (at(32769, b"CD001"), "an ISO 9660 filesystem"),
        (
            (0..4).any(|s| at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001")),
            "an LVM2 physical volume",
        ),
        (
            le32(0) == Some(MD_MAGIC) || le32(4096) == Some(MD_MAGIC),
            "a Linux md RAID member",
        ),
        (
            at(512, b"EFI PART") || at(4096, b"EFI PART"),
            "a GPT partition table",
        ),
        (
            at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") || at(65526, b"SWAPSPACE2"),
            "a Linux swap area",
        ),
        (at(3, b"NTFS    "), "an NTFS filesystem"),
        (at(54, b"FAT") || at(82, b"FAT32"), "a FAT filesystem"),
        // Last: a boot sector of any of the above ends this way too.
        (
            at(510, &[0x55, 0xaa]),
            "a DOS partition table or boot sector",
        ),
    ];
    checks.iter().find(|(hit, _)| *hit).map(|(_, what)| *what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(off: usize, magic: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; HEAD_LEN];
        v[off..off + magic.len()].copy_from_slice(magic);
        v
    }

    #[test]
    fn each_known_signature_is_named() {
        let table: &[(usize, &[u8], &str)] = &[
            (0, b"LUKS\xba\xbe", "LUKS"),
            (0, b"XFSB", "XFS"),
            (1080, &[0x53, 0xef], "ext4"),
            (65600, b"_BHRfS_M", "btrfs"),
            (1024, &0xf2f5_2010u32.to_le_bytes(), "F2FS"),
            (0, b"hsqs", "squashfs"),
            (32769, b"CD001", "ISO 9660"),
            (4096, &0xa92b_4efcu32.to_le_bytes(), "md RAID"),
            (512, b"EFI PART", "GPT"),
            (4086, b"SWAPSPACE2", "swap"),
            (3, b"NTFS    ", "NTFS"),
            (82, b"FAT32", "FAT"),
            (510, &[0x55, 0xaa], "DOS partition table"),
        ];
        for (off, magic, name) in table {
            let what = detect(&with(*off, magic)).unwrap_or_else(|| panic!("{name} not seen"));
            assert!(what.contains(name), "{name}: {what}");
        }
        let mut lvm = with(512, b"LABELONE");
        lvm[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(detect(&lvm), Some("an LVM2 physical volume"));
    }

    #[test]
    fn blank_short_and_unknown_data_are_not_refused() {
        assert_eq!(detect(&vec![0u8; HEAD_LEN]), None);
        assert_eq!(detect(&[]), None);
        // A short head (a tiny volume) is looked at as far as it goes.
        assert_eq!(
            detect(&with(1080, &[0x53, 0xef])[..2048]),
            Some("an ext2/ext3/ext4 filesystem")
        );
        assert_eq!(detect(&vec![0x11u8; HEAD_LEN]), None);
        // A magic half-present is not a signature.
        assert_eq!(detect(&with(512, b"LABELONE")), None);
    }

    /// The real tool's output: `mkfs.ext4` on a file.
    #[test]
    fn a_real_ext4_filesystem_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .expect("run mkfs.ext4 (e2fsprogs)");
        assert!(st.success());
        let head = std::fs::read(&img).unwrap();
        assert_eq!(
            detect(&head[..HEAD_LEN]),
            Some("an ext2/ext3/ext4 filesystem")
        );
    }
}
