//! Reads the list of migrations from `sql/install.sql`, the one place it is written: each
//! `\ir migrations/NNNN_name.sql`, after the guard `WHERE version = N` that skips it once applied.
//! The library embeds exactly these files, in this order (`src/pg/schema.rs`), so `pgfresh install`
//! and `psql -f sql/install.sql` apply the same migrations.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=sql");
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let install = std::fs::read_to_string(Path::new(&root).join("sql/install.sql"))
        .expect("sql/install.sql is readable");
    let mut list = String::from("&[\n");
    let mut guard: Option<i32> = None;
    for line in install.lines().map(str::trim) {
        if let Some(version) = line
            .split("WHERE version = ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
        {
            guard = Some(
                version
                    .trim()
                    .parse()
                    .expect("a number after WHERE version ="),
            );
        } else if let Some(file) = line.strip_prefix("\\ir migrations/") {
            let name = file
                .strip_suffix(".sql")
                .expect("a migration is a .sql file");
            let version: i32 = name[..4]
                .parse()
                .expect("a migration's name starts with its number");
            assert_eq!(
                guard.take(),
                Some(version),
                "sql/install.sql: {file} must follow the guard `WHERE version = {version}`"
            );
            let path = Path::new(&root).join("sql/migrations").join(file);
            writeln!(
                list,
                "    Migration {{ version: {version}, name: {name:?}, sql: include_str!({path:?}) }},"
            )
            .expect("writing to a String");
        }
    }
    list.push(']');
    let out =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("migrations.rs");
    std::fs::write(out, list).expect("OUT_DIR is writable");
}
