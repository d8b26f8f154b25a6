//! Running the shop example and the plain binary as a user would, and what their failures must look
//! like.

use std::path::PathBuf;
use std::process::{Command, Output};

use super::servers::BoundedOutput;

/// Runs `binary` (the shop example or the plain pgfresh) with `args` against the given services,
/// with backtraces on so that a panic would show.
pub fn run(binary: &PathBuf, database_url: &str, redis_url: &str, args: &[&str]) -> Output {
    Command::new(binary)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .env("RUST_BACKTRACE", "1")
        .output_bounded()
        .expect("binary runs")
}

/// What the process printed on stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the process printed on stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exactly one line on stderr, starting "error: ", with no secret, panic or backtrace in it.
pub fn assert_one_clear_error(out: &Output, expected: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "exit code must be non-zero");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(expected), "expected {expected:?} in {err}");
    for forbidden in ["hunter2", "panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!err.contains(forbidden), "{forbidden} in {err}");
    }
}
