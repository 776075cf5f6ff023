//! The closing lines of a log file: what a process said last, quoted in the error that reports
//! its death (QEMU's stderr, an agent's log in a local deployment).

use std::path::Path;

/// The last `n` non-blank lines of the file at `path`, oldest first (invalid UTF-8 replaced).
pub fn last_lines(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let bytes = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    Ok(lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn keeps_the_last_non_blank_lines_in_order() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"one\ntwo\n\n  \nthree\n\xfffour\n").unwrap();
        assert_eq!(
            last_lines(f.path(), 3).unwrap(),
            vec!["two", "three", "\u{fffd}four"]
        );
        assert_eq!(last_lines(f.path(), 10).unwrap().len(), 4);
        assert!(last_lines(f.path(), 0).unwrap().is_empty());
        assert!(last_lines(&f.path().with_extension("missing"), 3).is_err());
    }
}
