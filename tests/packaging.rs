//! The deployment files parse and agree with the binaries: the compose file starts PostgreSQL, Redis
//! and the demo wired to each other; the Dockerfile builds in one stage and runs unprivileged in
//! another; the systemd unit runs a listener that stops on SIGTERM. (No Docker engine runs on our
//! machines, so the image itself is not built here.)

use yaml_rust2::YamlLoader;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn the_compose_file_wires_the_demo_to_postgres_and_redis() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("valid YAML");
    let services = &docs[0]["services"];
    for name in ["postgres", "redis", "demo"] {
        assert!(!services[name].is_badvalue(), "service {name}");
    }
    let demo = &services["demo"];
    assert_eq!(demo["build"].as_str(), Some("."));
    assert_eq!(
        demo["environment"]["DATABASE_URL"].as_str(),
        Some("postgres://postgres@postgres:5432/postgres")
    );
    assert_eq!(
        demo["environment"]["REDIS_URL"].as_str(),
        Some("redis://redis:6379")
    );
    let ports: Vec<&str> = demo["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert_eq!(ports, ["127.0.0.1:8080:8080", "127.0.0.1:9187:9187"]);
    for dependency in ["postgres", "redis"] {
        assert_eq!(
            demo["depends_on"][dependency]["condition"].as_str(),
            Some("service_healthy")
        );
    }
}

#[test]
fn the_image_is_multi_stage_and_runs_unprivileged_on_the_demo_ports() {
    let dockerfile = read("Dockerfile");
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2,
        "build and runtime stages"
    );
    assert!(dockerfile.contains("USER pgfresh"));
    assert!(
        dockerfile.contains(r#"CMD ["demo", "--web", "0.0.0.0:8080", "--http", "0.0.0.0:9187"]"#)
    );
    assert!(
        dockerfile.contains("ca-certificates"),
        "rediss:// and sslrootcert=system need the system's roots"
    );
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert!(
        ignored.iter().any(|l| l == "target"),
        "the build context must not carry the target directory"
    );
}

#[test]
fn the_systemd_unit_runs_a_listener_with_its_endpoints() {
    let unit = read("examples/deploy/pgfresh-shop.service");
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/shop listen --http 127.0.0.1:9187 --log-format json"
        )
    );
    assert!(unit.contains("Restart=always"));
    assert!(unit.contains("User=pgfresh"));
}

#[test]
fn the_flags_the_deployment_files_use_exist() {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let shop = deps.parent().unwrap().join("examples").join("shop");
    let help = |args: &[&str]| {
        let out = std::process::Command::new(&shop)
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let demo = help(&["demo"]);
    assert!(demo.contains("--web") && demo.contains("--http"), "{demo}");
    let listen = help(&["listen"]);
    assert!(
        listen.contains("--http") && listen.contains("--log-format"),
        "{listen}"
    );
}
