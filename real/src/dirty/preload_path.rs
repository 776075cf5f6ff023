//! Where the built preload library is: `FTVM_PRELOAD` if set, else next to the running
//! executable (`target/<profile>/` for the `ftvm` binary, `target/<profile>/deps/` for test
//! binaries, which get it through ftvm-real's dev-dependency) or in its parent directory.

use std::path::PathBuf;

use super::DirtyError;

/// File name cargo gives the ftvm-preload cdylib.
pub const PRELOAD_FILE_NAME: &str = "libftvm_preload.so";

/// Environment variable that overrides the search.
pub const PRELOAD_ENV: &str = "FTVM_PRELOAD";

/// Path of the LD_PRELOAD library for QEMU.
pub fn preload_library_path() -> Result<PathBuf, DirtyError> {
    let mut searched = Vec::new();
    if let Some(p) = std::env::var_os(PRELOAD_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        searched.push(format!("{PRELOAD_ENV}={}", p.display()));
    } else if let Ok(exe) = std::env::current_exe() {
        let dir = exe.parent();
        for d in [dir, dir.and_then(|d| d.parent())].into_iter().flatten() {
            let p = d.join(PRELOAD_FILE_NAME);
            if p.is_file() {
                return Ok(p);
            }
            searched.push(d.display().to_string());
        }
    }
    Err(DirtyError::PreloadNotFound {
        name: PRELOAD_FILE_NAME,
        searched: searched.join(", "),
    })
}
