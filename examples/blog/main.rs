//! The blog: pgfresh's second complete example, the kind of site that replaces a fragment cron job.
//! Three fragments (post teasers, tag pages, author boxes) join rows that many of them share, and
//! stay fresh through renames, moves, publishing, tags and comments. The pgfresh command line plus
//! `setup` (schema, sample data, pgfresh, watches).
//!
//!     cargo run --release --example blog -- setup
//!     cargo run --release --example blog -- sweep
//!     cargo run --release --example blog -- listen

mod fragments;
mod setup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgfresh::cli::{self, Command, Connections, Logging};

#[derive(Parser)]
#[command(
    version,
    about = "pgfresh's example blog: post teasers, tag pages and author boxes kept fresh in Redis"
)]
struct BlogCli {
    #[command(flatten)]
    connections: Connections,
    #[command(flatten)]
    logging: Logging,
    #[command(subcommand)]
    command: BlogCommand,
}

#[derive(Subcommand)]
enum BlogCommand {
    /// Create the blog schema, load sample posts when empty, install pgfresh and the watches.
    Setup {
        /// Posts to load into an empty table (with n/20 authors, 40 tags, comments).
        #[arg(long, default_value_t = 1000)]
        posts: i64,
    },
    #[command(flatten)]
    Pgfresh(Command),
}

fn main() -> ExitCode {
    let blog = BlogCli::parse();
    let fragments = fragments::all();
    cli::run_command(&blog.logging, || async move {
        match blog.command {
            BlogCommand::Setup { posts } => {
                let db = blog.connections.database(2)?;
                db.check().await?;
                let report = setup::setup(&db, posts).await;
                db.close().await;
                let report = report?;
                println!(
                    "blog ready in database {}: {} posts ({} loaded now), pgfresh installed, 7 watches; \
                     run `sweep` to fill Redis, then `listen`",
                    db.name(),
                    report.posts,
                    report.loaded
                );
                Ok(ExitCode::SUCCESS)
            }
            BlogCommand::Pgfresh(command) => {
                cli::execute(&blog.connections, command, &fragments).await
            }
        }
    })
}
