//! A real Django site reading what pgfresh writes: `examples/django`'s own tests (Django's test
//! runner, in a virtual environment made here from its pinned requirements) run against a shop in
//! PostgreSQL that a `listen --cache-format django` process keeps fresh in Redis.
//!
//! Without `python3` (or its `venv` module) on the machine, these tests say so and pass without
//! running; on CI (`CI` set, as `.ci/run` does) that is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use common::cli::{run, stderr, stdout};
use common::servers::{CHILD_PATIENCE, output_within};
use common::{TestEnv, eventually, redis_url, shop_binary};

/// The example project, and its requirements.
fn project() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/django")
}

/// `target/`, where the virtual environment is kept: beside the test binaries, so that
/// `CARGO_TARGET_DIR` is honoured and `cargo clean` removes it.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/django-<hash>
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// The Python of a virtual environment with the example's requirements installed, made (once per
/// version of the requirements file) under `target/django-venv`; `None`, having said why, when this
/// machine has no `python3` with `venv`.
fn django_python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON.get_or_init(make_venv).clone()
}

fn make_venv() -> Option<PathBuf> {
    let requirements = project().join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    let venv = target_dir().join("django-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join("pgfresh-requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Some(python);
    }
    let found = Command::new("python3").arg("--version").output();
    if !found.is_ok_and(|out| out.status.success()) {
        // CI installs Python (.ci/run): there, a missing one is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is missing on CI, so the Django tests cannot run"
        );
        eprintln!("skipped: python3 is not installed, so the Django tests cannot run");
        return None;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let made = output_within(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        CHILD_PATIENCE,
    );
    if !made.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 cannot make a virtual environment on CI: {}",
            stderr(&made)
        );
        eprintln!(
            "skipped: python3 cannot make a virtual environment (Debian: apt install python3-venv): {}",
            stderr(&made).trim()
        );
        return None;
    }
    // A failed install is a failure, not a skip: the machine has Python, so CI must run these.
    let installed = output_within(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                "-r",
            ])
            .arg(&requirements),
        CHILD_PATIENCE * 3,
    );
    assert!(
        installed.status.success(),
        "pip install -r {} failed: {}",
        requirements.display(),
        stderr(&installed)
    );
    std::fs::write(&stamp, wanted).unwrap();
    Some(python)
}

/// A child process killed when dropped, so that a failed test leaves no listener behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Names and text a site's data really holds, and that HTML must escape.
const HOSTILE: &str = r#"
UPDATE products SET name = 'Tom & "Jerry" <script>alert(''x'')</script>' WHERE id = 1;
UPDATE products SET name = 'Crème brûlée — ünïcødé ✓ 日本', description = 'l''été <b>&amp;</b> "quotes"' WHERE id = 2;
UPDATE products SET name = '  ', price_cents = -50 WHERE id = 4;
UPDATE products SET name = '''single'' & <double>', price_cents = 0 WHERE id = 6;
INSERT INTO reviews (product_id, author, rating, body)
VALUES (1, '<img src=x onerror=alert(1)>', 1, 'Bad & "worse"'),
       (2, 'Zoë', 5, 'Très bien ''vraiment'' ✓'),
       (6, 'A&B', 3, '<<>>');
DELETE FROM reviews WHERE product_id = 8;
"#;

#[tokio::test]
async fn djangos_cache_get_returns_what_pgfresh_wrote() {
    let Some(python) = django_python() else {
        return;
    };
    let env = TestEnv::shop(60).await;
    env.client().await.batch_execute(HOSTILE).await.unwrap();
    let shop = shop_binary();
    let redis = redis_url();
    // This test's own Django KEY_PREFIX keeps its keys apart from every other test's.
    let django = [
        ("PGFRESH_CACHE_KEY_PREFIX", env.name.as_str()),
        ("PGFRESH_CACHE_VERSION", "1"),
    ];

    // What README tells a Django site to run: a first sweep, then the listener.
    let swept = run(
        &shop,
        &env.url,
        &redis,
        &[
            "sweep",
            "--cache-format",
            "django",
            "--cache-key-prefix",
            &env.name,
        ],
    );
    assert!(swept.status.success(), "{}", stderr(&swept));
    // Misses are rendered on demand: the listener serves /fragments for the site's tag.
    let serve = format!("127.0.0.1:{}", common::servers::free_port());
    let listener = KillOnDrop(
        Command::new(&shop)
            .args([
                "listen",
                "--cache-format",
                "django",
                "--sweep-interval",
                "0",
                "--poll-interval",
                "200ms",
                "--serve",
                &serve,
            ])
            .env("DATABASE_URL", &env.url)
            .env("REDIS_URL", &redis)
            .envs(django)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the shop's listener starts"),
    );
    eventually("the listener to register", || async {
        env.registered_listeners().await == 1
    })
    .await;

    let tests = output_within(
        Command::new(&python)
            .args(["manage.py", "test", "shop", "--noinput", "-v", "2"])
            .args(["--settings", "shopsite.test_settings"])
            .current_dir(project())
            .env("DATABASE_URL", &env.url)
            .env("REDIS_URL", &redis)
            .envs(django)
            .env("PGFRESH_SHOP_BINARY", &shop)
            .env("PGFRESH_SERVE_URL", format!("http://{serve}"))
            // Generous for a loaded machine: a miss's timeout is no part of what is tested here.
            .env("PGFRESH_SERVE_TIMEOUT", "30")
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        CHILD_PATIENCE,
    );
    drop(listener);
    let report = stderr(&tests);
    println!("{report}");
    assert!(
        tests.status.success(),
        "Django's tests failed:\n{}\n{report}",
        stdout(&tests)
    );
    // Every test ran; none was skipped.
    assert!(report.contains("Ran 10 tests"), "{report}");
    assert!(report.trim_end().ends_with("OK"), "{report}");
    env.cleanup().await;
}
