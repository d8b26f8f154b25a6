//! The plain `pgfresh` binary: no fragments of its own, enough for a DBA's `install`, `uninstall` and
//! `status`. Listening and sweeping need your fragments: build a binary with `pgfresh::cli::main`.

fn main() -> std::process::ExitCode {
    pgfresh::cli::main(pgfresh::Fragments::new())
}
