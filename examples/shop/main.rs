//! The shop: pgfresh's reference use. A product card fragment, kept fresh in Redis, with the pgfresh
//! command line plus `setup` (schema, sample data, pgfresh, watches) and `demo` (setup, a first sweep,
//! then listen).
//!
//!     cargo run --release --example shop -- demo

mod product_card;
mod setup;
mod web;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgfresh::Database;
use pgfresh::Fragments;
use pgfresh::cli::{self, Command, Connections, Logging, StorageArgs};
use pgfresh::{ListenSettings, Storage, SweepSettings};

use product_card::{Card, ProductCard};

/// The binary's allocator is its own choice, not pgfresh's. Rendering and writing allocate many
/// short-lived buffers: with mimalloc instead of glibc's malloc a sweep took about 30% less user
/// CPU in this process, and its `no_thp` feature (Cargo.toml) keeps it from asking for transparent
/// huge pages, which tripled the peak RSS (BENCHMARKS.md, "The shop's allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "pgfresh's example shop: product cards kept fresh in Redis"
)]
struct ShopCli {
    #[command(flatten)]
    connections: Connections,
    #[command(flatten)]
    logging: Logging,
    #[command(subcommand)]
    command: ShopCommand,
}

#[derive(Subcommand)]
enum ShopCommand {
    /// Create the shop schema, load sample products when empty, install pgfresh and the watches.
    Setup {
        /// Products to load into an empty table (3 reviews each).
        #[arg(long, default_value_t = 1000)]
        products: i64,
    },
    /// Setup, fill Redis with a sweep, listen, and serve a demo shop page whose cards come from Redis.
    Demo {
        /// Products to load into an empty table (3 reviews each).
        #[arg(long, default_value_t = 1000)]
        products: i64,
        /// Where to serve the demo shop.
        #[arg(long, default_value = "127.0.0.1:8080", value_parser = cli::parse_address)]
        web: String,
        /// Where the listener serves its status page and /metrics.
        #[arg(long, default_value = "127.0.0.1:9187", value_parser = cli::parse_address)]
        http: String,
        /// Where the listener serves GET /fragments/{key}, which the demo shop asks for a card
        /// missing from Redis.
        #[arg(long, default_value = "127.0.0.1:9188", value_parser = cli::parse_address)]
        serve: String,
        /// How the cards are stored in Redis.
        #[command(flatten)]
        storage: StorageArgs,
    },
    #[command(flatten)]
    Pgfresh(Command),
}

fn main() -> ExitCode {
    let shop = ShopCli::parse();
    let fragments = Fragments::new().with(product_card::KEY_PREFIX, ProductCard);
    cli::run_command(&shop.logging, || async move {
        match shop.command {
            ShopCommand::Setup { products } => {
                let db = shop.connections.database(2)?;
                db.check().await?;
                let report = setup::setup(&db, products).await;
                db.close().await;
                let report = report?;
                println!("{}", describe_setup(&report, &db));
                Ok(ExitCode::SUCCESS)
            }
            ShopCommand::Demo {
                products,
                web,
                http,
                serve,
                storage,
            } => {
                let storage = storage.storage()?;
                let fragments = fragments.stored_as(&storage);
                fragments.validate()?;
                let demo = Demo {
                    products,
                    web,
                    http,
                    serve,
                    storage,
                };
                run_demo(&shop.connections, fragments, demo).await
            }
            ShopCommand::Pgfresh(command) => {
                cli::execute(&shop.connections, command, &fragments).await
            }
        }
    })
}

fn describe_setup(report: &setup::SetupReport, db: &Database) -> String {
    format!(
        "shop ready in database {}: {} products ({} loaded now), pgfresh installed, watching products.id and reviews.product_id",
        db.name(),
        report.products,
        report.loaded
    )
}

/// What `demo` was asked for.
struct Demo {
    products: i64,
    web: String,
    http: String,
    serve: String,
    storage: Storage,
}

async fn run_demo(
    connections: &Connections,
    fragments: Fragments,
    demo: Demo,
) -> Result<ExitCode, pgfresh::Error> {
    let db = connections.database(12)?;
    let demoed = demo_on(&db, connections, fragments, demo).await;
    // Every session ends as PostgreSQL expects before the process exits, whatever happened.
    db.close().await;
    demoed
}

/// The demo on `db`: setup, a sweep, the shop's pages and writer, and a listener until Ctrl-C.
async fn demo_on(
    db: &Database,
    connections: &Connections,
    fragments: Fragments,
    demo: Demo,
) -> Result<ExitCode, pgfresh::Error> {
    let Demo {
        products,
        web,
        http,
        serve,
        storage,
    } = demo;
    db.check().await?;
    let sink = connections.redis().await?;
    let report = setup::setup(db, products).await?;
    println!("{}", describe_setup(&report, db));

    let shutdown = pgfresh::shutdown_on_signal();
    let sweep = pgfresh::sweep(db, &sink, &fragments, &SweepSettings::default(), &shutdown).await?;
    println!("{sweep}");

    let cards = web::Shop {
        db: db.clone(),
        redis: sink.clone(),
        serve: serve.clone(),
        prefix: product_card::KEY_PREFIX.to_string(),
        storage: storage.clone(),
        recent: Default::default(),
    };
    let server = web::bind(&web, cards.clone(), shutdown.clone())
        .await
        .map_err(pgfresh::Error::Fragment)?;
    tokio::spawn(server);
    tokio::spawn(web::writer(cards, shutdown.clone()));
    let id = 42.min(report.products.max(1));
    println!(
        "\nListening. Open the demo shop at http://{web}/ (its cards come from Redis; a writer changes a few\n\
         every second) and the listener's status page at http://{http}/ (metrics at /metrics).\n\
         \nOr, in another terminal, read a card, change its product, and read it again:\n\
         \n  redis-cli -u {redis} GET {key}\
         \n  psql {database} -c \"UPDATE products SET price_cents = price_cents + 100 WHERE id = {id}\"\
         \n  redis-cli -u {redis} GET {key}\
         \n\nOr ask the listener for it (from Redis, or rendered now on a miss; add ?fresh=1 to render from current rows):\
         \n  curl -s http://{serve}/fragments/{plain_key}\
         \n\nOr add a review:\
         \n  psql {database} -c \"INSERT INTO reviews (product_id, author, rating, body) VALUES ({id}, 'You', 5, 'Fresh!')\"\
         \n\nCtrl-C stops everything.\n",
        redis = sink.url(),
        database = db.url(),
        key = shell_word(&storage.entry_key(product_card::KEY_PREFIX, id, Card::Full)),
        plain_key = Storage::plain().entry_key(product_card::KEY_PREFIX, id, Card::Full),
    );
    let mut settings = ListenSettings::default();
    settings.http = Some(http);
    settings.serve = Some(serve);
    pgfresh::listen(db.clone(), sink, fragments, settings, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `word` as one shell word: as it is when that is safe, else single-quoted.
fn shell_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-.:/@%+=,".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
