//! Journals on disk: JSON lines, one record a line, appended by an agent (the driver core's
//! [`ftvm_driver::journal::HostEntry`]) or the witness ([`ftvm_driver::journal::WitnessEntry`]),
//! and read back after a run to check it like a simulated one. A restarted process appends to
//! its host's file (its first line says how it started).
//!
//! A journal is read after the run by a checker that must not trust it: a line that is too long,
//! not JSON or not a record is an error naming the file and line, never a panic, and a last line
//! cut short by a killed process is reported as such (it is the one line a crash may leave).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::secure_fs::{self, SecureFsError};

/// Longest line a reader accepts (a record is a few hundred bytes).
pub const MAX_LINE: usize = 64 * 1024;

/// Errors writing or reading a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalFileError {
    /// The file could not be opened.
    #[error(transparent)]
    Open(#[from] SecureFsError),
    /// Writing failed.
    #[error("{path}: writing the journal: {source}")]
    Write {
        /// The journal.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading failed.
    #[error("{path}: reading the journal: {source}")]
    Read {
        /// The journal.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is not a record.
    #[error("{path}:{line}: not a journal record: {source}")]
    Parse {
        /// The journal.
        path: PathBuf,
        /// Line number (from 1).
        line: usize,
        /// Cause.
        source: serde_json::Error,
    },
    /// A line is longer than [`MAX_LINE`].
    #[error("{path}:{line}: line longer than {MAX_LINE} bytes")]
    TooLong {
        /// The journal.
        path: PathBuf,
        /// Line number (from 1).
        line: usize,
    },
}

/// Microseconds on the machine's monotonic clock, now: what journal lines are stamped with.
///
/// One clock for every process of the machine (the test hosts are processes in network
/// namespaces), and one that is never stepped. The realtime clock would not do: an agent
/// stamps its lines from `Instant` (monotonic) offsets, and while NTP slews or steps the
/// realtime clock, a witness stamping realtime drifts against it by milliseconds within seconds,
/// enough to merge a witness's decision after the release it allowed.
pub fn clock_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        let us = i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1_000;
        u64::try_from(us).unwrap_or(0)
    })
}

/// An `Instant` and the [`clock_us`] reading of the same moment, for stamping lines from
/// `Instant` offsets. Both are the monotonic clock, but two reads in a row can be far apart when
/// the thread is preempted between them (tens of microseconds on a busy two-core host), and that
/// gap would shift every line of this host against the others': a backup's ack then merged after
/// the primary's release it allowed, and the output-commit check failed a correct run. The pair
/// is taken between two clock reads at most [`PAIR_SLACK_US`] apart (the best of a few tries).
pub fn instant_and_clock_us() -> (std::time::Instant, u64) {
    let read = || {
        let before = clock_us();
        let instant = std::time::Instant::now();
        let after = clock_us();
        (
            after.saturating_sub(before),
            instant,
            before + after.saturating_sub(before) / 2,
        )
    };
    let mut best = read();
    for _ in 1..PAIR_TRIES {
        if best.0 <= PAIR_SLACK_US {
            break;
        }
        let next = read();
        if next.0 < best.0 {
            best = next;
        }
    }
    (best.1, best.2)
}

/// How far apart the clock reads around an `Instant` may be for [`instant_and_clock_us`].
const PAIR_SLACK_US: u64 = 2;
/// Tries of [`instant_and_clock_us`] before it takes the closest pair it saw.
const PAIR_TRIES: usize = 1000;

/// Appends records to a journal file.
pub struct JournalWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JournalWriter {
    /// Opens `path` for appending (created readable by others, writable only by us; a planted
    /// link is refused).
    pub fn open(path: &Path) -> Result<JournalWriter, JournalFileError> {
        let file = secure_fs::open_append(path, secure_fs::READABLE_FILE_MODE)?;
        Ok(JournalWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Writes `records`, one line each, and hands them to the kernel (a killed process loses
    /// nothing written before; a crashed host may).
    pub fn append<T: Serialize>(
        &mut self,
        records: impl IntoIterator<Item = T>,
    ) -> Result<(), JournalFileError> {
        let fail = |source| JournalFileError::Write {
            path: self.path.clone(),
            source,
        };
        for r in records {
            serde_json::to_writer(&mut self.out, &r).map_err(|e| fail(e.into()))?;
            self.out.write_all(b"\n").map_err(fail)?;
        }
        self.out.flush().map_err(fail)
    }
}

/// Reads every record of the journal at `path`. A last line without its newline (the writer
/// was killed mid-line) is skipped; any other bad line is an error.
pub fn read_journal<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, JournalFileError> {
    let file = secure_fs::open_existing(path, false)?;
    read_lines(BufReader::new(file), path)
}

fn read_lines<T: DeserializeOwned>(
    mut reader: impl BufRead,
    path: &Path,
) -> Result<Vec<T>, JournalFileError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|source| JournalFileError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            if buf.len() > MAX_LINE {
                return Err(JournalFileError::TooLong {
                    path: path.to_path_buf(),
                    line,
                });
            }
            // The writer died mid-line: the record never was.
            break;
        }
        let record = serde_json::from_slice(&buf).map_err(|source| JournalFileError::Parse {
            path: path.to_path_buf(),
            line,
            source,
        })?;
        out.push(record);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    fn read(bytes: &[u8]) -> Result<Vec<Rec>, JournalFileError> {
        read_lines(bytes, Path::new("j"))
    }

    #[test]
    fn records_round_trip_and_a_cut_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut w = JournalWriter::open(&path).unwrap();
        w.append([Rec { n: 1 }, Rec { n: 2 }]).unwrap();
        drop(w);
        // A restarted writer appends.
        JournalWriter::open(&path)
            .unwrap()
            .append([Rec { n: 3 }])
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            read(&bytes).unwrap(),
            vec![Rec { n: 1 }, Rec { n: 2 }, Rec { n: 3 }]
        );
        bytes.extend_from_slice(b"{\"n\":");
        assert_eq!(read(&bytes).unwrap().len(), 3);
    }

    #[test]
    fn bad_lines_are_errors_with_their_line_number() {
        match read(b"{\"n\":1}\nnot json\n") {
            Err(JournalFileError::Parse { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut long = vec![b' '; MAX_LINE + 10];
        long.push(b'\n');
        match read(&long) {
            Err(JournalFileError::TooLong { line: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// The pair names one moment: the clock reading plus the `Instant`'s age is the clock now.
    #[test]
    fn an_instant_and_its_clock_reading_agree() {
        let (instant, at) = instant_and_clock_us();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let now = clock_us();
        let by_instant = at + instant.elapsed().as_micros() as u64;
        assert!(now.abs_diff(by_instant) < 1_000, "{now} vs {by_instant}");
    }
}
