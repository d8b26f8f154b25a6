//! A database owner or a table owner who is not a superuser gains nothing when pgfresh runs as one
//! (`status`, `doctor`, `sweep` and the listener are often run as `postgres`): no statement of
//! pgfresh's own resolves a function or operator through a schema they can create in, or reads a
//! watched column through a cast of theirs.

mod common;

use std::process::{Command, Stdio};

use common::cli::{run, stdout};
use common::servers::TempRedis;
use common::{TestEnv, eventually, shop_binary, tweak};
use pgfresh::tokio_postgres::Client;

/// Whether `role` has become a superuser.
async fn is_superuser(client: &Client, role: &str) -> bool {
    client
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

/// Hands the database back to postgres and drops `role` with what it owns.
async fn drop_role(env: &TestEnv, role: &str) {
    env.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {name} OWNER TO postgres; DROP OWNED BY {role} CASCADE; DROP ROLE {role}",
            name = env.name
        ))
        .await
        .unwrap();
}

/// Functions and operators PostgreSQL has in `pg_catalog`, redefined in `public` with the same
/// arguments by the database's owner, who also put `public` first on the database's search_path: each
/// records the statement that called it, with the right of a superuser caller.
const TRAPS: &str = "
    CREATE TABLE public.sprung (trap text, query text);
    CREATE FUNCTION public.spring(trap text) RETURNS void LANGUAGE sql SECURITY DEFINER
        SET search_path = pg_catalog AS $$INSERT INTO public.sprung VALUES (trap, current_query())$$;
    CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('now()'); RETURN pg_catalog.now(); END$$;
    CREATE FUNCTION public.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('clock_timestamp()'); RETURN pg_catalog.clock_timestamp(); END$$;
    CREATE FUNCTION public.nextval(regclass) RETURNS bigint LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('nextval(regclass)'); RETURN pg_catalog.nextval($1); END$$;
    CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('nextval(text)'); RETURN pg_catalog.nextval($1::regclass); END$$;
    CREATE FUNCTION public.to_regclass(text) RETURNS regclass LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('to_regclass(text)'); RETURN pg_catalog.to_regclass($1); END$$;
    CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('current_setting(text)'); RETURN pg_catalog.current_setting($1); END$$;
    CREATE FUNCTION public.pg_try_advisory_lock(bigint) RETURNS boolean LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('pg_try_advisory_lock'); RETURN pg_catalog.pg_try_advisory_lock($1); END$$;
    CREATE FUNCTION public.pg_postmaster_start_time() RETURNS timestamptz LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('pg_postmaster_start_time'); RETURN pg_catalog.pg_postmaster_start_time(); END$$;
    CREATE FUNCTION public.pg_notification_queue_usage() RETURNS float8 LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('pg_notification_queue_usage'); RETURN pg_catalog.pg_notification_queue_usage(); END$$;
    CREATE FUNCTION public.oid_is(oid, regnamespace) RETURNS boolean LANGUAGE plpgsql AS
        $$BEGIN PERFORM public.spring('=(oid, regnamespace)'); RETURN $1 OPERATOR(pg_catalog.=) $2::oid; END$$;
    CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regnamespace, FUNCTION = public.oid_is);
";

#[tokio::test]
async fn a_database_owners_functions_are_never_called_by_pgfreshs_commands_or_listener() {
    let env = TestEnv::shop(5).await;
    let owner = format!("{}_owner", env.name);
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner}; ALTER DATABASE {name} OWNER TO {owner};
             ALTER DATABASE {name} SET search_path = public, pg_catalog;
             SET ROLE {owner}; {TRAPS} RESET ROLE;
             ALTER TABLE reviews DISABLE TRIGGER pgfresh_product;
             INSERT INTO pgfresh.failed (change_id, topic, key, enqueued_at, attempts, error)
             VALUES (1, 'product', '2', pg_catalog.now(), 10, 'parked');",
            name = env.name
        ))
        .await
        .unwrap();
    let redis = TempRedis::start();
    // As postgres, every command a DBA or an operator runs, and a listener applying a change.
    for command in [
        &["status"][..],
        &["doctor"],
        &["sweep"],
        &["retry-failed"],
        &["install"],
    ] {
        let out = run(&shop_binary(), &env.url, &redis.url(), command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("error"), "{command:?}: {stderr}");
    }
    let mut listener = Command::new(shop_binary())
        .args([
            "listen",
            "--sweep-interval",
            "0",
            "--poll-interval",
            "200ms",
        ])
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = env.client().await;
    db.batch_execute("UPDATE products SET name = 'Trapped?' WHERE id = 3")
        .await
        .unwrap();
    let store = pgfresh::RedisStore::connect(&redis.url()).await.unwrap();
    eventually("the listener to apply the change", || async {
        let card = store.get("shop:product_card:3:full").await.unwrap();
        card.is_some_and(|html| html.contains("Trapped?"))
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status();
    listener.wait().unwrap();

    let sprung: Vec<(String, String)> = db
        .query("SELECT trap, query FROM public.sprung", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert!(
        sprung.is_empty(),
        "pgfresh called the owner's code: {sprung:#?}"
    );
    assert!(!is_superuser(&db, &owner).await);
    drop(db);
    drop(admin);
    drop_role(&env, &owner).await;
    env.cleanup().await;
}

#[tokio::test]
async fn doctor_reads_a_watched_column_of_the_owners_own_type_without_the_owners_cast() {
    let env = TestEnv::shop(3).await;
    let owner = format!("{}_owner", env.name);
    let admin = env.client().await;
    // The table owner's enum, with a cast to text that makes a superuser caller their accomplice.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner}; GRANT CREATE ON SCHEMA public TO {owner};
             SET ROLE {owner};
             CREATE TYPE mood AS ENUM ('1', '2');
             CREATE FUNCTION mood_text(mood) RETURNS text LANGUAGE plpgsql AS $$BEGIN
                 IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                     EXECUTE 'ALTER ROLE {owner} SUPERUSER';
                 END IF;
                 RETURN pg_catalog.format('%s', $1); END$$;
             CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);
             CREATE TABLE feelings (id mood PRIMARY KEY);
             INSERT INTO feelings VALUES ('1'), ('2');
             RESET ROLE;
             SELECT pgfresh.watch('feelings', 'id', 'product');"
        ))
        .await
        .unwrap();
    let out = run(&shop_binary(), &env.url, &common::redis_url(), &["doctor"]);
    let report = stdout(&out);
    assert!(
        report.contains(
            "ok       2 sampled values of public.feelings.id parse as product_card's key"
        ),
        "{report}"
    );
    assert!(
        report.contains("note     running as superuser postgres: the listener needs only"),
        "{report}"
    );
    assert!(
        !is_superuser(&admin, &owner).await,
        "doctor ran the owner's cast"
    );
    admin
        .batch_execute(&format!(
            "DROP TABLE feelings; DROP OWNED BY {owner} CASCADE; REVOKE ALL ON SCHEMA public FROM {owner}; DROP ROLE {owner}"
        ))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn default_privileges_give_no_role_a_right_on_pgfreshs_objects_and_a_planted_trigger_is_refused()
 {
    let env = TestEnv::empty().await;
    let app = format!("{}_app", env.name);
    let admin = env.client().await;
    // The installing role's default privileges give `app` everything on new tables, sequences and
    // functions of this database.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app} LOGIN; GRANT CREATE ON SCHEMA public TO {app};
             ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO {app};
             ALTER DEFAULT PRIVILEGES GRANT ALL ON SEQUENCES TO {app};
             ALTER DEFAULT PRIVILEGES GRANT ALL ON FUNCTIONS TO {app};
             ALTER DEFAULT PRIVILEGES GRANT ALL ON SCHEMAS TO {app};"
        ))
        .await
        .unwrap();
    pgfresh::install(&env.db).await.unwrap();
    let held: Vec<String> = admin
        .query(
            "SELECT c.relname || ': ' || a.privilege_type FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.relnamespace = 'pgfresh'::regnamespace AND a.grantee = $1::text::regrole
             UNION ALL
             SELECT p.proname || ': ' || a.privilege_type FROM pg_proc p, aclexplode(p.proacl) a
             WHERE p.pronamespace = 'pgfresh'::regnamespace AND a.grantee = $1::text::regrole
             UNION ALL
             SELECT 'schema: ' || a.privilege_type FROM pg_namespace n, aclexplode(n.nspacl) a
             WHERE n.nspname = 'pgfresh' AND a.grantee = $1::text::regrole",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(held.is_empty(), "{app} holds {held:?}");

    // A right to read, granted by hand since, is taken away by the next install; rights that let a
    // role attach code, and a trigger and a foreign key planted with them, make it refuse, naming
    // every one.
    admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA pgfresh TO {app}; GRANT SELECT ON pgfresh.changes TO {app};"
        ))
        .await
        .unwrap();
    pgfresh::install(&env.db).await.unwrap();
    let reads: bool = admin
        .query_one(
            "SELECT has_table_privilege($1, 'pgfresh.changes', 'SELECT')",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!reads, "the install took the right to read away");
    admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA pgfresh TO {app};
             GRANT TRIGGER ON pgfresh.watches TO {app}; GRANT REFERENCES ON pgfresh.changes TO {app};
             SET ROLE {app};
             CREATE FUNCTION public.planted() RETURNS trigger LANGUAGE plpgsql AS
                 $$BEGIN RETURN NEW; END$$;
             CREATE TRIGGER planted AFTER INSERT ON pgfresh.watches
                 FOR EACH ROW EXECUTE FUNCTION public.planted();
             CREATE TABLE public.pin (change_id bigint REFERENCES pgfresh.changes (id));
             RESET ROLE;"
        ))
        .await
        .unwrap();
    let refused = pgfresh::install(&env.db).await.unwrap_err().to_string();
    assert!(
        refused.contains("trigger planted on pgfresh.watches")
            && refused
                .contains("foreign key (from public.pin) pin_change_id_fkey on pgfresh.changes"),
        "{refused}"
    );
    admin
        .batch_execute("DROP TRIGGER planted ON pgfresh.watches; DROP TABLE public.pin;")
        .await
        .unwrap();
    // What was planted is gone; the rights to plant more still refuse the install.
    let refused = pgfresh::install(&env.db).await.unwrap_err().to_string();
    for revoke in [
        format!("REVOKE TRIGGER ON TABLE pgfresh.watches FROM {app};"),
        format!("REVOKE REFERENCES ON TABLE pgfresh.changes FROM {app};"),
    ] {
        assert!(refused.contains(&revoke), "{refused}");
    }
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON SCHEMA pgfresh FROM {app}; REVOKE ALL ON pgfresh.watches FROM {app};
             REVOKE ALL ON pgfresh.changes FROM {app};
             ALTER DEFAULT PRIVILEGES REVOKE ALL ON TABLES FROM {app};
             ALTER DEFAULT PRIVILEGES REVOKE ALL ON SEQUENCES FROM {app};
             ALTER DEFAULT PRIVILEGES REVOKE ALL ON FUNCTIONS FROM {app};
             ALTER DEFAULT PRIVILEGES REVOKE ALL ON SCHEMAS FROM {app};
             DROP OWNED BY {app} CASCADE; REVOKE ALL ON SCHEMA public FROM {app}; DROP ROLE {app};"
        ))
        .await
        .unwrap();
    pgfresh::install(&env.db).await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_role_with_no_right_cannot_keep_listeners_from_sweeping() {
    let env = TestEnv::shop(4).await;
    let nobody = format!("{}_nobody", env.name);
    let admin = env.client().await;
    admin
        .batch_execute(&format!("CREATE ROLE {nobody} LOGIN"))
        .await
        .unwrap();
    // A role that may only connect holds the advisory lock listeners once elected their sweeper
    // with, and cannot touch the lease that elects them now.
    let stranger = common::connect(&env.url.replacen("postgres@", &format!("{nobody}@"), 1)).await;
    stranger
        .execute("SELECT pg_advisory_lock(x'0070676672657368'::bigint)", &[])
        .await
        .unwrap();
    let denied = common::error_of(
        &stranger,
        "UPDATE pgfresh.sweep_lease SET holder = 'me', expires_at = 'infinity'",
    )
    .await;
    assert!(denied.contains("permission denied"), "{denied}");

    // Redis loses everything: the listener sweeps it back.
    env.del(&env.marker_key()).await;
    let listener = env.start_listener(common::test_settings());
    for id in 1..=4 {
        env.wait_fresh(id).await;
    }
    listener.stop().await;
    drop(stranger);
    admin
        .batch_execute(&format!("DROP ROLE {nobody}"))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_table_owner_who_switches_capture_off_is_named_by_status_and_doctor() {
    let env = TestEnv::shop(2).await;
    let owner = format!("{}_owner", env.name);
    let admin = env.client().await;
    // The owner of a watched table (not a superuser) has its trigger fire only on replicas.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner}; ALTER TABLE reviews OWNER TO {owner};
             SET ROLE {owner};
             ALTER TABLE reviews ENABLE REPLICA TRIGGER pgfresh_product;
             RESET ROLE;"
        ))
        .await
        .unwrap();
    let status = stdout(&run(
        &shop_binary(),
        &env.url,
        &common::redis_url(),
        &["status"],
    ));
    assert!(
        status.contains(
            "warning: trigger pgfresh_product on public.reviews fires only on replicas (ENABLE REPLICA TRIGGER): changes there are not captured"
        ),
        "{status}"
    );
    let doctor = run(&shop_binary(), &env.url, &common::redis_url(), &["doctor"]);
    assert!(!doctor.status.success());
    assert!(
        stdout(&doctor).contains("fix: ALTER TABLE public.reviews ENABLE TRIGGER pgfresh_product;"),
        "{}",
        stdout(&doctor)
    );
    admin
        .batch_execute(&format!(
            "ALTER TABLE reviews OWNER TO postgres; DROP ROLE {owner}"
        ))
        .await
        .unwrap();
    env.cleanup().await;
}

/// The shop's card, also reached through reviews by a query that sets the session's search_path
/// (as a careless helper in an author's query might), putting `public` first.
struct UnpinningCard;

impl pgfresh::Fragment for UnpinningCard {
    type Key = i64;
    type Row = common::product_card::Product;
    type Variant = common::product_card::Card;
    type Error = pgfresh::tokio_postgres::Error;
    fn name(&self) -> &str {
        "product_card"
    }
    fn topics(&self) -> pgfresh::Topics {
        pgfresh::Topics::new().direct("product").through(
            "review",
            "SELECT product_id FROM reviews WHERE product_id = ANY($1)
               AND pg_catalog.set_config('search_path', 'public, pg_catalog', false) IS NOT NULL",
        )
    }
    async fn load(&self, db: &Client, keys: &[i64]) -> pgfresh::Loaded<Self> {
        pgfresh::Fragment::load(&common::product_card::ProductCard, db, keys).await
    }
    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> pgfresh::maud::Markup {
        pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, pgfresh::tokio_postgres::Error> {
        pgfresh::Fragment::keys_after(&common::product_card::ProductCard, db, after, limit).await
    }
}

#[tokio::test]
async fn a_through_query_that_changes_the_search_path_leaves_pgfreshs_sessions_pinned() {
    let env = TestEnv::shop(4).await;
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "{TRAPS} SELECT pgfresh.watch('reviews', 'product_id', 'review');"
        ))
        .await
        .unwrap();
    let listener = env.start_listener_with(
        pgfresh::Fragments::new().with(&env.prefix, UnpinningCard),
        tweak(common::test_settings(), |s| s.workers = 1),
    );
    // A review fans out through the query, in a claim on one of pgfresh's own sessions...
    admin
        .batch_execute(
            "INSERT INTO reviews (product_id, author, rating, body) VALUES (2, 'Ann', 5, 'Good')",
        )
        .await
        .unwrap();
    env.wait_fresh(2).await;
    // ...and the claims after it, on the same sessions (the pool hands out the one returned last),
    // still call PostgreSQL's now().
    for round in 0..20_i32 {
        let id = 1 + i64::from(round % 4);
        admin
            .execute(
                "UPDATE products SET price_cents = $2 WHERE id = $1",
                &[&id, &round],
            )
            .await
            .unwrap();
        env.wait_fresh(id).await;
    }
    listener.stop().await;
    let sprung: Vec<String> = admin
        .query("SELECT trap || ': ' || query FROM public.sprung", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        sprung.is_empty(),
        "pgfresh called public's functions: {sprung:#?}"
    );
    env.cleanup().await;
}
