//! Following the guest's serial console log (QEMU `-serial file:`), e.g. to wait for the guest's
//! ready marker. The file is read incrementally from where the last read stopped.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{QemuError, Result};

/// How often the log is polled (it is a plain file: no readiness to wait on).
const POLL: Duration = Duration::from_millis(10);

/// An incremental reader of a serial log.
#[derive(Debug, Clone)]
pub struct SerialLog {
    path: PathBuf,
    offset: u64,
    /// Text after the last newline read so far, so a marker split across reads is still found.
    tail: String,
}

impl SerialLog {
    /// Follows `path` from its beginning. The file need not exist yet.
    pub fn new(path: impl AsRef<Path>) -> Self {
        SerialLog {
            path: path.as_ref().to_path_buf(),
            offset: 0,
            tail: String::new(),
        }
    }

    /// Path of the log.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole log as text (invalid UTF-8 replaced); empty if the file does not exist yet.
    pub fn read_all(&self) -> Result<String> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(QemuError::io(format!("read {:?}", self.path), e)),
        }
    }

    /// The last non-empty line of the log (for error messages).
    pub fn last_line(&self) -> String {
        self.read_all()
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }

    /// Text appended since the previous call (whole lines and any partial last line).
    pub fn read_new(&mut self) -> Result<String> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(QemuError::io(format!("open {:?}", self.path), e)),
        };
        let len = f
            .metadata()
            .map_err(|e| QemuError::io(format!("stat {:?}", self.path), e))?
            .len();
        if len < self.offset {
            // Truncated: a new QEMU reopened the file. Start over.
            self.offset = 0;
            self.tail.clear();
        }
        f.seek(SeekFrom::Start(self.offset))
            .map_err(|e| QemuError::io(format!("seek {:?}", self.path), e))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| QemuError::io(format!("read {:?}", self.path), e))?;
        self.offset += buf.len() as u64;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Waits until `marker` appears in text not yet consumed; consumes up to and including it.
    pub async fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let new = self.read_new()?;
            self.tail.push_str(&new);
            if let Some(pos) = self.tail.find(marker) {
                self.tail.drain(..pos + marker.len());
                return Ok(());
            }
            // Keep only what could still be the start of a marker split across reads.
            if let Some(nl) = self.tail.rfind('\n') {
                self.tail.drain(..=nl);
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::Timeout {
                    what: format!("{marker:?} on serial log {:?}", self.path),
                    after: timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn finds_markers_in_order_and_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut log = SerialLog::new(&path);
        // Missing file is simply empty.
        assert_eq!(log.read_new().unwrap(), "");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"boot...\nFTVM-GUEST-").unwrap();
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(b"READY\ntick 1\n").unwrap();
            })
        };
        log.wait_for("FTVM-GUEST-READY", Duration::from_secs(2))
            .await
            .unwrap();
        writer.await.unwrap();
        log.wait_for("tick 1", Duration::from_secs(1))
            .await
            .unwrap();
        // Already consumed: a second wait for the same marker times out.
        let e = log
            .wait_for("FTVM-GUEST-READY", Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(matches!(e, QemuError::Timeout { .. }), "{e}");
        assert_eq!(log.last_line(), "tick 1");
    }
}
