//! Finding the guest RAM file's mappings in another process: the lines of `/proc/<pid>/maps`
//! that map the same inode (device + inode number, so symlinks and renames do not matter) with
//! shared (`s`) permissions.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::DirtyError;

/// One mapping of the RAM file in the process's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamVma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Offset in the file of `start`, in bytes.
    pub offset: u64,
}

/// The shared mappings of `ram_file` in process `pid`, in address order.
pub fn ram_vmas(pid: u32, ram_file: &Path) -> Result<Vec<RamVma>, DirtyError> {
    let meta = std::fs::metadata(ram_file).map_err(DirtyError::io("stat RAM file", ram_file))?;
    let maps_path = format!("/proc/{pid}/maps");
    let text =
        std::fs::read_to_string(&maps_path).map_err(DirtyError::io("read", maps_path.as_str()))?;
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let vmas: Vec<RamVma> = text
        .lines()
        .filter_map(parse_line)
        .filter(|l| l.shared && l.dev == dev && l.inode == meta.ino())
        .map(|l| l.vma)
        .collect();
    if vmas.is_empty() {
        return Err(DirtyError::NoRamMapping {
            pid,
            path: ram_file.to_path_buf(),
        });
    }
    Ok(vmas)
}

struct MapsLine {
    vma: RamVma,
    shared: bool,
    dev: (u32, u32),
    inode: u64,
}

/// `start-end perms offset major:minor inode [path]`, numbers in hex except the inode.
fn parse_line(line: &str) -> Option<MapsLine> {
    let mut f = line.split_ascii_whitespace();
    let (start, end) = f.next()?.split_once('-')?;
    let perms = f.next()?;
    let offset = f.next()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let inode = f.next()?;
    Some(MapsLine {
        vma: RamVma {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            offset: u64::from_str_radix(offset, 16).ok()?,
        },
        shared: perms.as_bytes().get(3) == Some(&b's'),
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let l = parse_line(
            "7f0000000000-7f0010000000 rw-s 00200000 00:1a 12345      /dev/shm/ram (deleted)",
        )
        .unwrap();
        assert_eq!(
            l.vma,
            RamVma {
                start: 0x7f00_0000_0000,
                end: 0x7f00_1000_0000,
                offset: 0x20_0000
            }
        );
        assert!(l.shared);
        assert_eq!((l.dev, l.inode), ((0, 0x1a), 12345));
        let p = parse_line("55d0-55e0 r--p 00000000 fd:01 77 /usr/bin/qemu").unwrap();
        assert!(!p.shared);
        assert_eq!(p.dev, (0xfd, 1));
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn own_mapping_is_found_and_a_missing_one_is_an_error() {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let me = std::process::id();
        assert!(matches!(
            ram_vmas(me, f.path()),
            Err(DirtyError::NoRamMapping { .. })
        ));
        let ram = super::super::GuestRam::open(f.path(), 1 << 20).unwrap();
        let v = ram_vmas(me, f.path()).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].start, ram.as_slice().as_ptr() as u64);
        assert_eq!(v[0].end - v[0].start, 1 << 20);
        assert_eq!(v[0].offset, 0);
    }
}
