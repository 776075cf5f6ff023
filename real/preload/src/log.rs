//! Log lines to stderr with a fixed prefix, without ever failing or panicking (QEMU's stderr may
//! be closed or a pipe nobody reads; a logging error must not take QEMU down).

/// Prefix of every line, so harnesses can grep QEMU's stderr for the tracker's verdict.
pub const PREFIX: &str = "ftvm-preload: ";

/// Writes `PREFIX`, `msg` and a newline to fd 2, ignoring errors.
pub fn line(msg: &str) {
    let mut buf = String::with_capacity(PREFIX.len() + msg.len() + 1);
    buf.push_str(PREFIX);
    buf.push_str(msg);
    buf.push('\n');
    let mut rest = buf.as_bytes();
    while !rest.is_empty() {
        // SAFETY: `rest` is a live byte slice; write(2) only reads `rest.len()` bytes from it.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return; // closed or broken stderr: drop the line rather than fail
        }
        rest = &rest[n as usize..];
    }
}
