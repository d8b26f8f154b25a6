//! Throwaway PostgreSQL clusters and Redis servers, on free ports in temporary directories, for tests
//! that kill, restart or freeze them. Stopped (and their directories removed) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command to completion and returns its output, like `Command::output`, but kills it and
/// fails the test when it runs longer than `limit`: a hung child must fail the suite, not hang it.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// How long a child process of a test may run: generous, for a loaded 2-core machine.
pub const CHILD_PATIENCE: Duration = Duration::from_secs(120);

/// `Command::output`, bounded by [`CHILD_PATIENCE`]: what every test runs its children with.
pub trait BoundedOutput {
    fn output_bounded(&mut self) -> std::io::Result<std::process::Output>;
}

impl BoundedOutput for Command {
    fn output_bounded(&mut self) -> std::io::Result<std::process::Output> {
        Ok(output_within(self, CHILD_PATIENCE))
    }
}

/// A plain HTTP/1.1 GET on the loopback interface: the status code and the body; status 0 while
/// nothing answers.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(port, path, &[]).await;
    (status, body)
}

/// The whole response (status line, headers, body) to a GET of `path` with extra `headers`, or
/// `None` when nothing answered.
pub async fn http_response(port: u16, path: &str, headers: &[&str]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for header in headers {
        request += &format!("{header}\r\n");
    }
    request += "\r\n";
    let mut response = String::new();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// An HTTP/1.1 GET with extra header lines (`"Authorization: Bearer x"`): the status code, the
/// `Content-Type` and the body; status 0 while nothing answers.
pub async fn http_get_with(port: u16, path: &str, headers: &[&str]) -> (u16, String, String) {
    let Some(response) = http_response(port, path, headers).await else {
        return (0, String::new(), String::new());
    };
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// The value of a series in a Prometheus scrape (0 when absent).
pub fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `program` on the PATH, from Debian's `package`; where it is missing, `None` after saying the
/// test is skipped, except under CI (`CI` set, as `.ci/run` does, installing the package), where
/// that fails the test.
pub fn installed(program: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is missing: install Debian's {package} package (.ci/run does)"
        );
        eprintln!("skipped: {program} is missing (Debian's {package} package)");
    }
    found
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output_bounded()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

/// PostgreSQL refuses to run as root: as root, run its programs as the `postgres` user.
fn postgres_command(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .map(|entry| entry.unwrap().path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A throwaway CA (`ca.pem`, `ca.key`) and a certificate for 127.0.0.1 it signed (`cert.pem`,
/// `key.pem`), made with the `openssl` command in `dir`.
pub fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pgfresh-test-ca -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out server.csr",
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out cert.pem",
    ] {
        let status = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args}");
    }
}

/// An empty directory for a throwaway cluster on `port`, owned by user `postgres` (initdb and
/// pg_basebackup run as that user).
fn cluster_dir(port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfresh-pg-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if running_as_root() {
        let status = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
    dir
}

/// A PostgreSQL cluster of its own (trust auth unless a password is set, fsync off).
pub struct TempPostgres {
    pub port: u16,
    dir: PathBuf,
    /// Serves TLS with a certificate for 127.0.0.1 from [`make_certificates`] in `<dir>/tls`.
    tls: bool,
    /// More `-c name=value` settings for the server.
    settings: Vec<String>,
}

/// How a [`TempPostgres`] is set up.
#[derive(Default)]
pub struct PostgresSetup {
    /// Offer TLS with its own CA (see [`TempPostgres::certificate_authority`]).
    pub tls: bool,
    /// Require this password of user postgres (scram-sha-256) instead of trusting everyone.
    pub password: Option<&'static str>,
    /// More server settings, `name=value`.
    pub settings: &'static [&'static str],
}

impl TempPostgres {
    pub fn start() -> TempPostgres {
        TempPostgres::start_with(PostgresSetup::default())
    }

    /// A server that offers TLS with its own CA: see [`TempPostgres::certificate_authority`].
    pub fn start_tls() -> TempPostgres {
        TempPostgres::start_with(PostgresSetup {
            tls: true,
            ..PostgresSetup::default()
        })
    }

    /// The CA that signed a TLS server's certificate.
    pub fn certificate_authority(&self) -> PathBuf {
        self.dir.join("tls").join("ca.pem")
    }

    pub fn start_with(setup: PostgresSetup) -> TempPostgres {
        let tls = setup.tls;
        let port = free_port();
        let dir = cluster_dir(port);
        let mut initdb = postgres_command(&postgres_bin("initdb"));
        initdb.args(["-U", "postgres", "--no-sync"]);
        match setup.password {
            None => initdb.args(["-A", "trust"]),
            Some(password) => {
                let file = dir.join("password");
                std::fs::write(&file, password).unwrap();
                if running_as_root() {
                    Command::new("chown")
                        .arg("postgres")
                        .arg(&file)
                        .status()
                        .unwrap();
                }
                initdb.args(["-A", "scram-sha-256", "--pwfile"]).arg(&file)
            }
        };
        let out = initdb
            .arg("-D")
            .arg(dir.join("data"))
            .output_bounded()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tls {
            let certificates = dir.join("tls");
            std::fs::create_dir_all(&certificates).unwrap();
            make_certificates(&certificates);
            std::fs::set_permissions(
                certificates.join("key.pem"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            if running_as_root() {
                let status = Command::new("chown")
                    .args(["-R", "postgres"])
                    .arg(&certificates)
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        }
        let server = TempPostgres {
            port,
            dir,
            tls,
            settings: setup.settings.iter().map(|s| s.to_string()).collect(),
        };
        server.start_server();
        server
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        postgres_command(&postgres_bin("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdin(Stdio::null())
            .output_bounded()
            .expect("pg_ctl runs")
    }

    fn start_server(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        for setting in &self.settings {
            options += &format!(" -c {setting}");
        }
        if self.tls {
            let certificates = self.dir.join("tls");
            options += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                certificates.join("cert.pem").display(),
                certificates.join("key.pem").display()
            );
        }
        let log = self.dir.join("server.log");
        let out = self.pg_ctl(&[
            "-w",
            "-t",
            "60",
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "start",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server abruptly (every backend killed, as in a crash), then starts it again.
    pub fn restart(&self) {
        self.stop();
        self.start_server();
    }

    /// Stops the server abruptly, as in a crash; [`TempPostgres::start_again`] brings it back.
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_again(&self) {
        self.start_server();
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and every process it started): it keeps
    /// its connections but answers nothing, like a hung host, until the guards are dropped
    /// (SIGCONT), even when the test fails first.
    pub fn freeze(&self) -> Vec<Stopped> {
        let pid_file = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .expect("a running server's postmaster.pid");
        let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let children = Command::new("pgrep")
            .args(["-P", &postmaster.to_string()])
            .output()
            .expect("pgrep runs");
        let mut stopped = vec![Stopped::process(postmaster)];
        // A backend that exited since pgrep listed it is no longer there to stop.
        for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            stopped.extend(Stopped::if_running(child.parse().unwrap()));
        }
        stopped
    }

    /// A hot standby of this server, streaming from it: a base backup taken with `pg_basebackup -R`
    /// (which writes `primary_conninfo` and `standby.signal`), started on a port of its own. The
    /// default `wal_level = replica` and the trust `replication` lines initdb writes are all the
    /// primary needs.
    pub fn standby(&self) -> TempPostgres {
        let port = free_port();
        let dir = cluster_dir(port);
        let out = postgres_command(&postgres_bin("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast", "-D"])
            .arg(dir.join("data"))
            .stdin(Stdio::null())
            .output_bounded()
            .expect("pg_basebackup runs");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let standby = TempPostgres {
            port,
            dir,
            tls: false,
            settings: self.settings.clone(),
        };
        standby.start_server();
        standby
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of its own, with no persistence (but for [`TempRedis::start_with_snapshots`]): a
/// restart brings it back empty.
pub struct TempRedis {
    pub port: u16,
    child: Option<Child>,
    /// With TLS: the directory holding its self-signed certificate (`cert.pem`) and key.
    tls: Option<PathBuf>,
    /// In a cluster: the directory holding its cluster configuration (kept across restarts), and
    /// its cluster bus port.
    cluster: Option<(PathBuf, u16)>,
    /// More `--name value` settings.
    settings: Vec<String>,
    /// With snapshots: the directory its `SAVE` writes to, and a restart reads back from.
    snapshots: Option<PathBuf>,
}

impl TempRedis {
    pub fn start() -> TempRedis {
        TempRedis::start_with(&[])
    }

    /// A server with more settings, e.g. `["--maxmemory", "100mb"]`.
    pub fn start_with(settings: &[&str]) -> TempRedis {
        let mut server = TempRedis {
            port: free_port(),
            child: None,
            tls: None,
            cluster: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
            snapshots: None,
        };
        server.start_server();
        server
    }

    /// A server whose `SAVE` writes a snapshot, which [`TempRedis::start_again`] starts from: what
    /// it held then, and nothing written since (a restart from RDB, or a replica behind).
    pub fn start_with_snapshots() -> TempRedis {
        let dir = std::env::temp_dir().join(format!("pgfresh-rdb-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = TempRedis::start_with(&["--dir", dir.to_str().unwrap()]);
        server.snapshots = Some(dir);
        server
    }

    /// Writes the snapshot a restart starts from (`SAVE`).
    pub fn save(&self) {
        let saved = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SAVE"])
            .output()
            .expect("redis-cli runs");
        assert_eq!(String::from_utf8_lossy(&saved.stdout).trim(), "OK");
    }

    /// A server that speaks only TLS, with a certificate for 127.0.0.1 signed by a throwaway CA
    /// (made with the `openssl` command); clients trust the CA through `SSL_CERT_FILE` =
    /// [`TempRedis::certificate_authority`].
    pub fn start_tls() -> TempRedis {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("pgfresh-redis-tls-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        make_certificates(&dir);
        let mut server = TempRedis {
            port,
            child: None,
            tls: Some(dir),
            cluster: None,
            settings: Vec::new(),
            snapshots: None,
        };
        server.start_server();
        server
    }

    /// The CA that signed a TLS server's certificate.
    pub fn certificate_authority(&self) -> PathBuf {
        self.tls.as_ref().expect("a TLS server").join("ca.pem")
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn start_server(&mut self) {
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.args(&self.settings);
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(dir) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &self.port.to_string(),
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(dir.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("key.pem")),
        };
        if let Some((dir, bus_port)) = &self.cluster {
            command
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                // A replica may take over however long ago it last heard from its master.
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--cluster-port")
                .arg(bus_port.to_string())
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{}.conf", self.port)))
                .arg("--dir")
                .arg(dir);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis-server", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): it keeps its connections and its data but answers nothing, like
    /// a hung host, until the guard is dropped (SIGCONT), even when the test fails first.
    pub fn freeze(&self) -> Stopped {
        Stopped::process(self.child.as_ref().expect("a running server").id())
    }

    /// Starts it again on the same port, empty.
    pub fn start_again(&mut self) {
        self.stop();
        self.start_server();
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.stop();
        for dir in [&self.tls, &self.snapshots].into_iter().flatten() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A throwaway Redis Cluster: three masters without replicas, each its own `redis-server`, joined with
/// `redis-cli --cluster create`. A node restarted with [`TempRedis::start_again`] keeps its slots
/// (its cluster configuration is on disk) and comes back empty, like a master without persistence.
pub struct TempRedisCluster {
    pub nodes: Vec<TempRedis>,
    dir: PathBuf,
    /// Ports of killed masters, kept bound (not listening) so that no other test's server takes them
    /// over: a client still routing there is refused at once, as it would be by a dead host.
    held: Vec<tokio::net::TcpSocket>,
}

impl TempRedisCluster {
    pub fn start() -> TempRedisCluster {
        TempRedisCluster::start_with(0)
    }

    /// Three masters, each with one replica: `nodes[0..3]` are the masters, and a master that is
    /// stopped fails over to its replica within a few seconds (node timeout 1 s).
    pub fn start_with_replicas() -> TempRedisCluster {
        TempRedisCluster::start_with(1)
    }

    fn start_with(replicas: usize) -> TempRedisCluster {
        // Ports are picked free, then bound by the servers: another test may take one in between,
        // and the cluster cannot form. Such a start is tried again on other ports.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match TempRedisCluster::try_start(replicas) {
                Ok(cluster) => return cluster,
                Err(why) if attempts < 3 => {
                    eprintln!("a Redis Cluster did not form ({why}); again")
                }
                Err(why) => panic!("redis-cli --cluster create: {why}"),
            }
        }
    }

    fn try_start(replicas: usize) -> Result<TempRedisCluster, String> {
        let dir = std::env::temp_dir().join(format!(
            "pgfresh-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<TempRedis> = (0..3 * (1 + replicas))
            .map(|_| {
                let mut node = TempRedis {
                    port: free_port(),
                    child: None,
                    tls: None,
                    cluster: Some((dir.clone(), free_port())),
                    settings: Vec::new(),
                    snapshots: None,
                };
                node.start_server();
                node
            })
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output_bounded()
            .expect("redis-cli runs");
        if !out.status.success() {
            drop(nodes);
            let _ = std::fs::remove_dir_all(&dir);
            let said = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            return Err(said
                .trim()
                .lines()
                .last()
                .unwrap_or("no output")
                .to_string());
        }
        let cluster = TempRedisCluster {
            nodes,
            dir,
            held: Vec::new(),
        };
        cluster.wait_until_ok();
        Ok(cluster)
    }

    /// Seed URLs, comma-separated, as `--redis-url` takes them with `--redis-cluster`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(TempRedis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills master `index` and waits until its replica has taken over: every running node sees three
    /// live masters and a healthy cluster.
    pub fn kill_master_and_wait_for_failover(&mut self, index: usize) {
        self.nodes[index].stop();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(([127, 0, 0, 1], self.nodes[index].port).into())
            .expect("hold the killed master's port");
        self.held.push(socket);
        let dead = format!(":{}@", self.nodes[index].port);
        let port = self.nodes.iter().find(|n| n.child.is_some()).unwrap().port;
        wait_until("a replica to take over", || {
            Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", "nodes"])
                .output_bounded()
                .is_ok_and(|out| {
                    let nodes = String::from_utf8_lossy(&out.stdout);
                    let failed = nodes
                        .lines()
                        .any(|line| line.contains(&dead) && line.contains(",fail "));
                    let live_masters = nodes
                        .lines()
                        .filter(|line| line.contains("master") && !line.contains("fail"))
                        .count();
                    failed && live_masters == 3
                })
        });
        self.wait_until_ok();
    }

    /// Waits until every running node reports the cluster healthy (all slots served).
    pub fn wait_until_ok(&self) {
        for node in self.nodes.iter().filter(|node| node.child.is_some()) {
            let port = node.port.to_string();
            wait_until("redis cluster state ok", || {
                Command::new("redis-cli")
                    .args(["-p", &port, "cluster", "info"])
                    .output_bounded()
                    .is_ok_and(|out| {
                        String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
                    })
            });
        }
    }
}

impl Drop for TempRedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process stopped with SIGSTOP, continued (SIGCONT) when dropped, so that a failing test never
/// leaves a frozen server or backend behind.
pub struct Stopped(u32);

impl Stopped {
    pub fn process(pid: u32) -> Stopped {
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "SIGSTOP {pid}");
        Stopped(pid)
    }

    /// The process stopped, if it is still running.
    pub fn if_running(pid: u32) -> Option<Stopped> {
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
            .then_some(Stopped(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A PgBouncer of its own (Debian's `pgbouncer`) in front of the shared PostgreSQL, in transaction
/// pooling and otherwise with its defaults (20 server connections per database and user; the
/// `options` startup parameter refused), as a stock install is; but for `server_round_robin`, so
/// that one client's consecutive transactions land on different server connections, as they do
/// under load. `None`, after saying
/// the test is skipped, where `pgbouncer` is not installed (CI installs it).
pub struct TempPgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl TempPgBouncer {
    pub fn start() -> Option<TempPgBouncer> {
        TempPgBouncer::start_with("")
    }

    /// With more lines in its `[pgbouncer]` section, e.g. `ignore_startup_parameters = options`.
    pub fn start_with(settings: &str) -> Option<TempPgBouncer> {
        TempPgBouncer::in_front_of(5432, settings)
    }

    /// In front of the server on `server_port` (the shared one's is 5432), with more lines in its
    /// `[pgbouncer]` section.
    pub fn in_front_of(server_port: u16, settings: &str) -> Option<TempPgBouncer> {
        let program = installed("pgbouncer", "pgbouncer")?;
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("pgfresh-pgbouncer-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = transaction\n\
                 server_round_robin = 1\n{settings}\n",
                users = dir.join("users.txt").display()
            ),
        )
        .unwrap();
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        // PgBouncer refuses to run as root, as PostgreSQL does.
        let child = postgres_command(&program)
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("pgbouncer.log")).unwrap())
            .spawn()
            .expect("pgbouncer starts");
        wait_until("pgbouncer", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(TempPgBouncer { port, dir, child })
    }

    /// The URL of `database` through this PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What PgBouncer logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for TempPgBouncer {
    fn drop(&mut self) {
        // runuser passes SIGTERM on to PgBouncer.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
