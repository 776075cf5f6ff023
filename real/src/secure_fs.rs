//! Files and directories nobody else may read, plant or swap: state and work directories are 0700,
//! RAM and replica files 0600. Creation uses `O_CREAT|O_EXCL|O_NOFOLLOW`, so a file or symbolic
//! link someone planted at a predictable path (say in /dev/shm or /tmp) is refused instead of
//! followed or reused; opening uses `O_NOFOLLOW` and checks owner and mode on the open descriptor
//! (`fstat`), so there is no window between the check and the use.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of state and work directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of RAM, replica, journal and witness files.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of reports others may read (status, metrics, digests): never writable by others.
pub const READABLE_FILE_MODE: u32 = 0o644;

/// Why a path was refused or could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecureFsError {
    /// A system call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Step that failed.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// A symbolic link sits where a file or directory of ours should be.
    #[error("{0} is a symbolic link; refusing to follow it")]
    Symlink(PathBuf),
    /// The path belongs to another user.
    #[error("{path} is owned by uid {owner}, not by us (uid {us}); refusing to use it")]
    NotOwned {
        /// Path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        us: u32,
    },
    /// Group or others may write the path.
    #[error("{path} is writable by group or others (mode {mode:o}); refusing to use it")]
    OpenToOthers {
        /// Path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path exists but is not of the expected kind.
    #[error("{path} exists and is not a {expected}")]
    WrongKind {
        /// Path.
        path: PathBuf,
        /// "directory" or "regular file".
        expected: &'static str,
    },
}

type Result<T> = std::result::Result<T, SecureFsError>;

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SecureFsError {
    let path = path.to_path_buf();
    move |source| SecureFsError::Io { path, what, source }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Refuses `meta` unless it is owned by us and not writable by group or others.
fn check_owned(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let us = euid();
    if meta.uid() != us {
        return Err(SecureFsError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            us,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SecureFsError::OpenToOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// `lstat`, or None when nothing is at `path`.
fn lstat(path: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, "stat")(e)),
    }
}

/// Opens a directory without following a symbolic link, checks it on the descriptor and sets
/// its mode to 0700.
fn adopt_dir(path: &Path) -> Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| refused_link(path, e, "open directory"))?;
    let meta = dir.metadata().map_err(io(path, "stat directory"))?;
    check_owned(path, &meta)?;
    if meta.mode() & 0o7777 != DIR_MODE {
        dir.set_permissions(std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(io(path, "chmod directory"))?;
    }
    Ok(())
}

/// Names why an `O_NOFOLLOW` open failed: a symbolic link there gives ELOOP (or ENOTDIR with
/// `O_DIRECTORY`), which is told apart from a plain non-directory by looking at the path.
fn refused_link(path: &Path, e: std::io::Error, what: &'static str) -> SecureFsError {
    let is_link = || std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) if is_link() => {
            SecureFsError::Symlink(path.to_path_buf())
        }
        Some(libc::ENOTDIR) => SecureFsError::WrongKind {
            path: path.to_path_buf(),
            expected: "directory",
        },
        _ => io(path, what)(e),
    }
}

/// Creates directory `path` with mode 0700 (missing parents too, also 0700). An existing
/// directory is reused only when it is ours and nobody else may write it (it is then set to
/// 0700); a symbolic link or another user's directory is refused.
pub fn private_dir(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(parent)
            .map_err(io(parent, "create directory"))?;
    }
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => adopt_dir(path),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => adopt_dir(path),
        Err(e) => Err(io(path, "create directory")(e)),
    }
}

/// A fresh, empty 0700 directory at `path`: an earlier one of ours is removed first (a leftover
/// of a crashed run); one that belongs to someone else, or a symbolic link, is refused.
pub fn fresh_private_dir(path: &Path) -> Result<()> {
    if let Some(meta) = lstat(path)? {
        if meta.file_type().is_symlink() {
            return Err(SecureFsError::Symlink(path.to_path_buf()));
        }
        if !meta.is_dir() {
            return Err(SecureFsError::WrongKind {
                path: path.to_path_buf(),
                expected: "directory",
            });
        }
        check_owned(path, &meta)?;
        std::fs::remove_dir_all(path).map_err(io(path, "remove old directory"))?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(parent)
            .map_err(io(parent, "create directory"))?;
    }
    // Not `private_dir`: something appearing here between the removal and now is a race
    // someone else won, and is refused.
    std::fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(path)
        .map_err(io(path, "create directory"))?;
    adopt_dir(path)
}

/// Creates a new file at `path` with `mode` (`O_CREAT|O_EXCL|O_NOFOLLOW`), open for reading and
/// writing. Anything already there, a symbolic link included, is an error.
pub fn create_new(path: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path, "create"))
}

/// Removes what is at `path` if it is ours (a stale file of an earlier run); a symbolic link is
/// removed itself, never its target. Refuses another user's file and directories.
pub fn remove_stale(path: &Path) -> Result<()> {
    let Some(meta) = lstat(path)? else {
        return Ok(());
    };
    if meta.is_dir() {
        return Err(SecureFsError::WrongKind {
            path: path.to_path_buf(),
            expected: "regular file",
        });
    }
    if !meta.file_type().is_symlink() && meta.uid() != euid() {
        return Err(SecureFsError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            us: euid(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, "remove stale file")(e)),
    }
}

/// [`remove_stale`] then [`create_new`]: a fresh file where an earlier run of ours left one.
pub fn replace(path: &Path, mode: u32) -> Result<File> {
    remove_stale(path)?;
    create_new(path, mode)
}

/// Opens an existing regular file without following a symbolic link; it must be ours and not
/// writable by group or others.
pub fn open_existing(path: &Path, write: bool) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused_link(path, e, "open"))?;
    check_file(path, &f)?;
    Ok(f)
}

fn check_file(path: &Path, f: &File) -> Result<()> {
    let meta = f.metadata().map_err(io(path, "stat"))?;
    if !meta.is_file() {
        return Err(SecureFsError::WrongKind {
            path: path.to_path_buf(),
            expected: "regular file",
        });
    }
    check_owned(path, &meta)
}

/// Opens the file at `path` for reading and writing, creating it with mode 0600 if absent;
/// returns it and whether it was created. An existing file is checked as by [`open_existing`].
pub fn open_or_create_private(path: &Path) -> Result<(File, bool)> {
    match create_new(path, PRIVATE_FILE_MODE) {
        Ok(f) => Ok((f, true)),
        Err(SecureFsError::Io { source, .. }) if source.kind() == ErrorKind::AlreadyExists => {
            Ok((open_existing(path, true)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Opens `path` for appending, creating it with `mode` if absent (never following a link).
pub fn open_append(path: &Path, mode: u32) -> Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused_link(path, e, "open for appending"))?;
    check_file(path, &f)?;
    Ok(f)
}

/// Whether [`write_replace`] also makes the new contents survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync` the file before the rename and the directory after it.
    Durable,
    /// Atomic (readers see old or new contents) but not flushed: reports rewritten often.
    Atomic,
}

/// The temporary name [`write_replace`] writes to: `<name>.tmp` beside `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces the contents of `path` atomically: writes a new temporary file (`O_EXCL|O_NOFOLLOW`,
/// `mode`; a stale one of ours is removed first), then renames it over `path`.
pub fn write_replace(path: &Path, bytes: &[u8], mode: u32, durability: Durability) -> Result<()> {
    let tmp = temp_path(path);
    let mut f = replace(&tmp, mode)?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    if durability == Durability::Durable {
        f.sync_all().map_err(io(&tmp, "sync"))?;
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path, "rename"))?;
    if durability == Durability::Durable {
        sync_parent(path)?;
    }
    Ok(())
}

/// `fsync`s the directory holding `path`, making a rename or creation in it durable: a rename
/// changes the directory, not the file, and until the directory is flushed a crash can bring
/// back the old entry even though the new file's data is on disk.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "sync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// A uid that is not ours, for planting another user's files (tests run as root).
    const OTHER_UID: u32 = 65534;

    fn chown_other(p: &Path) {
        std::os::unix::fs::lchown(p, Some(OTHER_UID), None).expect("chown (tests run as root)");
    }

    #[test]
    fn private_dir_is_0700_with_its_new_parents_and_tightens_our_own_dir() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&t.path().join("a")), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn private_dir_refuses_a_symlink_another_users_dir_and_a_world_writable_dir() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = t.path().join("link");
        symlink(&target, &link).unwrap();
        assert!(matches!(private_dir(&link), Err(SecureFsError::Symlink(_))));
        assert!(matches!(
            fresh_private_dir(&link),
            Err(SecureFsError::Symlink(_))
        ));
        assert!(target.exists(), "the link's target was left alone");

        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::write(theirs.join("keep"), b"x").unwrap();
        chown_other(&theirs);
        assert!(matches!(
            private_dir(&theirs),
            Err(SecureFsError::NotOwned {
                owner: OTHER_UID,
                ..
            })
        ));
        assert!(matches!(
            fresh_private_dir(&theirs),
            Err(SecureFsError::NotOwned { .. })
        ));
        assert!(
            theirs.join("keep").exists(),
            "another user's dir is not emptied"
        );

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            private_dir(&open),
            Err(SecureFsError::OpenToOthers { mode: 0o777, .. })
        ));
    }

    #[test]
    fn fresh_private_dir_empties_our_old_dir() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("work");
        private_dir(&d).unwrap();
        std::fs::write(d.join("old"), b"x").unwrap();
        fresh_private_dir(&d).unwrap();
        assert!(!d.join("old").exists());
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn create_new_sets_the_mode_and_refuses_a_planted_symlink_or_file() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("ram");
        create_new(&f, PRIVATE_FILE_MODE).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert!(create_new(&f, PRIVATE_FILE_MODE).is_err(), "O_EXCL");

        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = t.path().join("planted");
        symlink(&victim, &link).unwrap();
        assert!(create_new(&link, PRIVATE_FILE_MODE).is_err());
        assert!(matches!(
            open_existing(&link, true),
            Err(SecureFsError::Symlink(_))
        ));
        assert!(matches!(
            open_append(&link, READABLE_FILE_MODE),
            Err(SecureFsError::Symlink(_))
        ));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn replace_removes_our_stale_file_or_a_link_but_not_another_users_file() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = t.path().join("ram");
        symlink(&victim, &p).unwrap();
        let mut f = replace(&p, PRIVATE_FILE_MODE).unwrap();
        f.write_all(b"new").unwrap();
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");

        chown_other(&p);
        assert!(matches!(
            replace(&p, PRIVATE_FILE_MODE),
            Err(SecureFsError::NotOwned { .. })
        ));
        assert!(matches!(
            open_existing(&p, false),
            Err(SecureFsError::NotOwned { .. })
        ));
    }

    #[test]
    fn open_or_create_private_creates_0600_then_reuses_only_our_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("replica.ram");
        let (_, created) = open_or_create_private(&p).unwrap();
        assert!(created);
        assert_eq!(mode(&p), 0o600);
        let (_, created) = open_or_create_private(&p).unwrap();
        assert!(!created);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            open_or_create_private(&p),
            Err(SecureFsError::OpenToOthers { .. })
        ));
    }

    #[test]
    fn write_replace_leaves_the_new_contents_and_no_temporary_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.json");
        // A stale temporary file of ours (a crash mid-write) does not block the next write.
        std::fs::write(temp_path(&p), b"torn").unwrap();
        write_replace(&p, b"one", PRIVATE_FILE_MODE, Durability::Durable).unwrap();
        write_replace(&p, b"two", PRIVATE_FILE_MODE, Durability::Atomic).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p), 0o600);
        assert!(!temp_path(&p).exists());
        assert_eq!(temp_path(&p).file_name().unwrap(), "state.json.tmp");
    }
}
