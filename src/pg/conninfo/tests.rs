//! The parser, the environment, the password file and redaction, against what libpq does.

use super::*;
use std::collections::HashMap;
use std::str::FromStr;

fn parsed(text: &str) -> ConnInfo {
    ConnInfo::parse(text).unwrap_or_else(|e| panic!("{text:?} did not parse: {e}"))
}

fn error(text: &str) -> String {
    match ConnInfo::parse(text) {
        Ok(info) => panic!("{text:?} parsed as {:?}", info.params),
        Err(e) => e,
    }
}

fn pairs(info: &ConnInfo) -> Vec<(&str, &str)> {
    info.params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

fn environment(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

#[test]
fn a_full_url_yields_each_part() {
    let info = parsed("postgresql://bob:s3cret@db.example:6543/app?application_name=fresh");
    assert_eq!(
        pairs(&info),
        [
            ("user", "bob"),
            ("password", "s3cret"),
            ("host", "db.example"),
            ("port", "6543"),
            ("dbname", "app"),
            ("application_name", "fresh"),
        ]
    );
}

#[test]
fn a_url_may_leave_out_every_part() {
    assert_eq!(pairs(&parsed("postgres://")), []);
    assert_eq!(pairs(&parsed("postgres://db")), [("host", "db")]);
    assert_eq!(pairs(&parsed("postgres://bob@")), [("user", "bob")]);
    assert_eq!(pairs(&parsed("postgres:///app")), [("dbname", "app")]);
    assert_eq!(
        pairs(&parsed("postgres://?sslmode=require")),
        [("sslmode", "require")]
    );
    assert_eq!(pairs(&parsed("postgres://db/?")), [("host", "db")]);
}

#[test]
fn ipv6_hosts_are_written_in_brackets() {
    let info = parsed("postgres://[::1]:5433/app");
    assert_eq!(info.get("host"), Some("::1"));
    assert_eq!(info.get("port"), Some("5433"));
    let info = parsed("postgres://[fe80::1%25eth0],[::2]:6000");
    assert_eq!(info.get("host"), Some("fe80::1%eth0,::2"));
    assert_eq!(info.get("port"), Some(",6000"));
}

#[test]
fn broken_ipv6_brackets_are_errors() {
    assert!(error("postgres://[::1/app").contains("without a matching"));
    assert!(error("postgres://[]:5432").contains("empty IPv6"));
    assert!(error("postgres://[::1]x/app").contains("after the IPv6 address"));
}

#[test]
fn several_hosts_become_lists_with_empty_entries_kept() {
    let info = parsed("postgres://host1,host2:5433/app");
    assert_eq!(info.get("host"), Some("host1,host2"));
    assert_eq!(info.get("port"), Some(",5433"));
    let info = parsed("postgres://a:1,b:2,c:3");
    assert_eq!(info.get("host"), Some("a,b,c"));
    assert_eq!(info.get("port"), Some("1,2,3"));
    assert_eq!(parsed("postgres://a,b").get("port"), Some(","));
}

#[test]
fn every_url_part_is_percent_decoded() {
    let info = parsed(
        "postgres://b%40b:p%2Fa%3Fs%23s%40@%2Fvar%2Frun%2Fpostgresql/my%20db?options=-c%20x%3Dy",
    );
    assert_eq!(info.get("user"), Some("b@b"));
    assert_eq!(info.get("password"), Some("p/a?s#s@"));
    assert_eq!(info.get("host"), Some("/var/run/postgresql"));
    assert_eq!(info.get("dbname"), Some("my db"));
    assert_eq!(info.get("options"), Some("-c x=y"));
}

#[test]
fn a_malformed_percent_escape_is_an_error() {
    assert!(error("postgres://db/app%zz").contains("malformed percent-escape"));
    assert!(error("postgres://db/app%2").contains("malformed percent-escape"));
    assert!(error("postgres://db/app%00").contains("%00"));
    assert!(error("postgres://db?application_name=a%g1").contains("\"application_name\""));
}

#[test]
fn a_malformed_escape_in_a_password_does_not_show_the_password() {
    let e = error("postgres://bob:s3cr%zzet@db/app");
    assert!(e.contains("user name or password"), "{e}");
    assert!(!e.contains("s3cr"), "{e}");
    let e = error("postgres://db/app?password=s3cr%zzet");
    assert!(!e.contains("s3cr"), "{e}");
}

#[test]
fn spaces_around_url_parts_are_dropped_and_inside_them_refused() {
    assert_eq!(parsed("postgres://db/app ").get("dbname"), Some("app"));
    assert!(error("postgres://db/my app").contains("%20"));
}

#[test]
fn query_parameters_are_read_and_checked() {
    let info =
        parsed("postgres://db/app?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=5&");
    assert_eq!(info.get("sslmode"), Some("verify-full"));
    assert_eq!(info.get("sslrootcert"), Some("/ca.pem"));
    assert_eq!(info.get("connect_timeout"), Some("5"));
    assert!(error("postgres://db/app?sslmode").contains("no \"=\""));
    assert!(error("postgres://db/app?a=b=c").contains("second \"=\""));
    assert!(error("postgres://db/app?&sslmode=require").contains("no \"=\""));
}

#[test]
fn ssl_true_in_a_url_means_sslmode_require() {
    assert_eq!(
        parsed("postgres://db/app?ssl=true").get("sslmode"),
        Some("require")
    );
    assert!(error("postgres://db/app?ssl=false").contains("unknown connection option \"ssl\""));
}

#[test]
fn requiressl_becomes_sslmode_as_in_libpq() {
    assert_eq!(parsed("requiressl=1").get("sslmode"), Some("require"));
    assert_eq!(
        parsed("postgres://db?requiressl=0").get("sslmode"),
        Some("prefer")
    );
}

#[test]
fn a_query_parameter_overrides_the_same_part_of_the_url() {
    let info = parsed("postgres://bob@db/app?user=alice&dbname=other");
    assert_eq!(
        pairs(&info),
        [("user", "alice"), ("host", "db"), ("dbname", "other")]
    );
}

#[test]
fn an_unencoded_slash_in_a_password_asks_for_percent_encoding_without_quoting() {
    for text in [
        "postgres://u:Zq/9x@h/db",
        "postgres://u:Zq?9x@h/db",
        "postgres://u:Zq/9x@h",
        "postgresql://u:Zq?9x=1@h/db",
        "postgres://u:Zq@9x@h/db",
        "postgres://u:Zq/9x@h/db?sslmode=require",
        "postgres://u:Zq@9x/Zq@h/db",
    ] {
        let e = error(text);
        assert!(
            e.contains("%2F") && e.contains("%3F") && e.contains("%23"),
            "{e}"
        );
        assert!(!e.contains("Zq") && !e.contains("9x"), "{text}: {e}");
    }
}

#[test]
fn a_bad_port_is_named_only_when_it_cannot_be_a_password() {
    assert!(error("postgres://bob@db:abc/app").contains("invalid port \"abc\""));
    assert!(error("postgres://bob@db:70000").contains("invalid port \"70000\""));
    let e = error("postgres://bob:Zq9x");
    assert!(e.contains("invalid port") && !e.contains("Zq9x"), "{e}");
    assert!(error("port=x").contains("invalid port \"x\""));
}

#[test]
fn keyword_values_allow_spaces_around_the_equals_sign() {
    let info = parsed("host = db  port= 5433 sslmode =require\tuser\n=\nbob");
    assert_eq!(
        pairs(&info),
        [
            ("host", "db"),
            ("port", "5433"),
            ("sslmode", "require"),
            ("user", "bob")
        ]
    );
}

#[test]
fn quoted_values_keep_spaces_and_escaped_quotes() {
    let info =
        parsed(r"password='it\'s a \\secret' options='-c search_path=a,b' application_name=''");
    assert_eq!(info.get("password"), Some(r"it's a \secret"));
    assert_eq!(info.get("options"), Some("-c search_path=a,b"));
    assert_eq!(info.get("application_name"), Some(""));
}

#[test]
fn unquoted_values_take_backslash_escapes() {
    assert_eq!(
        parsed(r"password=a\ b\\c\'d").get("password"),
        Some(r"a b\c'd")
    );
}

#[test]
fn a_value_containing_a_url_scheme_is_just_a_value() {
    let info = parsed("host=db application_name='x://y' sslmode=require");
    assert_eq!(info.get("sslmode"), Some("require"));
    assert_eq!(info.get("application_name"), Some("x://y"));
}

#[test]
fn empty_or_blank_text_has_no_parameters() {
    assert_eq!(pairs(&parsed("")), []);
    assert_eq!(pairs(&parsed(" \t\n ")), []);
}

#[test]
fn a_keyword_given_twice_keeps_the_last_value_once() {
    assert_eq!(
        pairs(&parsed("host=a port=1 host=b")),
        [("host", "b"), ("port", "1")]
    );
}

#[test]
fn keyword_value_mistakes_name_the_keyword_but_never_the_value() {
    assert!(error("host db").contains("missing \"=\" after \"host\""));
    let e = error("host=db password='s3cret");
    assert!(
        e.contains("unterminated") && e.contains("\"password\"") && !e.contains("s3cret"),
        "{e}"
    );
    for text in [
        "password=Zq9 Xk7 host=db",
        "password=Zq9 Xk7=x",
        "password='Zq9'Xk7 host=db",
    ] {
        let e = error(text);
        assert!(!e.contains("Zq9") && !e.contains("Xk7"), "{text}: {e}");
    }
    let e = error("postgresql+psycopg://u:s3cret@db/app");
    assert!(!e.contains("s3cret"), "{e}");
    assert!(error("=x").contains("without a keyword"));
}

#[test]
fn unknown_keywords_are_errors() {
    assert!(error("host=db xyz=1").starts_with("unknown connection option \"xyz\""));
    assert!(error("postgres://db?xyz=1").starts_with("unknown connection option \"xyz\""));
    assert!(error("Host=db").contains("\"Host\""));
}

#[test]
fn the_string_beats_the_environment() {
    let info = parsed("host=db user=''").with_environment(environment(&[
        ("PGHOST", "other"),
        ("PGUSER", "alice"),
        ("PGPASSWORD", "s3cret"),
        ("PGSSLMODE", "require"),
    ]));
    assert_eq!(info.get("host"), Some("db"));
    assert_eq!(info.get("user"), Some(""));
    assert_eq!(info.get("password"), Some("s3cret"));
    assert_eq!(info.get("sslmode"), Some("require"));
}

#[test]
fn the_environment_beats_the_defaults_and_empty_variables_count_as_unset() {
    let info = parsed("")
        .with_environment(environment(&[
            ("PGHOST", "/run/pg"),
            ("PGPORT", ""),
            ("PGUSER", "alice"),
            ("PGDATABASE", ""),
        ]))
        .with_defaults();
    assert_eq!(
        pairs(&info),
        [
            ("host", "/run/pg"),
            ("user", "alice"),
            ("port", "5432"),
            ("dbname", "alice")
        ]
    );
}

#[test]
fn defaults_fill_only_what_is_absent_or_empty() {
    let info = parsed("").with_defaults();
    assert_eq!(
        pairs(&info),
        [
            ("host", "127.0.0.1"),
            ("port", "5432"),
            ("user", "postgres"),
            ("dbname", "postgres")
        ]
    );
    let info = parsed("host='' user=bob dbname=app").with_defaults();
    assert_eq!(info.get("host"), Some("127.0.0.1"));
    assert_eq!(info.get("dbname"), Some("app"));
    assert_eq!(
        parsed("hostaddr=10.0.0.1").with_defaults().get("host"),
        None
    );
}

#[test]
fn get_and_set_work_on_one_entry_per_keyword() {
    let mut info = parsed("host=a port=1");
    info.set("host", "b");
    info.set("dbname", "d");
    assert_eq!(
        pairs(&info),
        [("host", "b"), ("port", "1"), ("dbname", "d")]
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("pgfresh-conninfo-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn pgpass(&self, text: &str, mode: u32) -> &Path {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join(".pgpass");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pgpass_password(conninfo: &str, file: &str) -> Option<String> {
    let dir = TempDir::new(&format!("{:x}", fastrand::u64(..)));
    let home = dir.pgpass(file, 0o600);
    parsed(conninfo)
        .with_defaults()
        .password_from_file(Some(home))
        .unwrap()
}

#[test]
fn the_password_file_first_matching_line_wins() {
    let file = "# comment\n\nother:5432:*:*:no\n127.0.0.1:5432:app:bob:first\n*:*:*:*:second\n";
    assert_eq!(
        pgpass_password("user=bob dbname=app", file).as_deref(),
        Some("first")
    );
    assert_eq!(pgpass_password("user=eve", file).as_deref(), Some("second"));
}

#[test]
fn the_password_file_unescapes_colons_and_backslashes() {
    let file = "*:*:my\\:db:*:pa\\:ss\\\\word:ignored\r\n";
    assert_eq!(
        pgpass_password("dbname=my:db", file).as_deref(),
        Some("pa:ss\\word")
    );
    assert_eq!(pgpass_password("dbname=other", file), None);
}

fn pgpass_result(conninfo: &str, file: &str) -> Result<Option<String>, String> {
    let dir = TempDir::new(&format!("{:x}", fastrand::u64(..)));
    let home = dir.pgpass(file, 0o600);
    parsed(conninfo)
        .with_defaults()
        .password_from_file(Some(home))
}

#[test]
fn the_password_file_is_read_host_by_host_and_no_host_gets_anothers_password() {
    let file = "a:6000:*:*:pw-one\nb:*:*:*:pw-two\nc:*:*:*:pw-one\n";
    assert_eq!(
        pgpass_password("host=a port=6000", file).as_deref(),
        Some("pw-one")
    );
    assert_eq!(
        pgpass_password("host=b port=6000", file).as_deref(),
        Some("pw-two")
    );
    // One password for every host: it goes to whichever answers.
    assert_eq!(
        pgpass_password("host=a,c port=6000", file).as_deref(),
        Some("pw-one")
    );
    // Hosts with different passwords, or with none: libpq would send each its own; pgfresh can
    // send only one, so it sends none, and says why.
    for hosts in ["host=a,b port=6000,7000", "host=a,d port=6000"] {
        let ignored = pgpass_result(hosts, file).unwrap_err();
        assert!(
            ignored.contains("different passwords") && !ignored.contains("pw-"),
            "{ignored}"
        );
    }
    assert_eq!(pgpass_password("host=a port=,6000", file), None);
    assert_eq!(
        pgpass_password("host=a", "a:5432:*:*:default-port\n").as_deref(),
        Some("default-port")
    );
}

#[test]
fn a_socket_directory_matches_localhost_in_the_password_file() {
    let file = "localhost:5432:*:*:local\n";
    assert_eq!(
        pgpass_password("host=/var/run/postgresql", file).as_deref(),
        Some("local")
    );
    assert_eq!(pgpass_password("host=127.0.0.1", file), None);
}

#[test]
fn a_password_file_others_can_read_is_refused() {
    let dir = TempDir::new("open");
    let home = dir.pgpass("*:*:*:*:s3cret\n", 0o644);
    let e = parsed("")
        .with_defaults()
        .password_from_file(Some(home))
        .unwrap_err();
    assert!(e.contains("chmod 0600") && !e.contains("s3cret"), "{e}");
}

#[test]
fn a_missing_password_file_is_no_password() {
    let dir = TempDir::new("missing");
    let info = parsed("").with_defaults();
    assert_eq!(info.password_from_file(Some(&dir.0)), Ok(None));
    assert_eq!(info.password_from_file(None), Ok(None));
    let info = parsed("passfile=/nonexistent/pgpass").with_defaults();
    assert_eq!(info.password_from_file(Some(&dir.0)), Ok(None));
}

#[test]
fn passfile_names_the_password_file() {
    let dir = TempDir::new("passfile");
    dir.pgpass("*:*:*:*:from-passfile\n", 0o600);
    let text = format!("passfile='{}'", dir.0.join(".pgpass").display());
    let info = parsed(&text).with_defaults();
    assert_eq!(
        info.password_from_file(None),
        Ok(Some("from-passfile".to_string()))
    );
}

#[test]
fn shown_is_a_url_without_the_password() {
    assert_eq!(
        parsed("postgres://bob:s3cret@db/app?sslmode=require")
            .with_defaults()
            .shown(),
        "postgres://bob@db:5432/app?sslmode=require"
    );
    assert_eq!(
        parsed("host=/var/run/postgresql,::1,b port=1,2,3 user=bob dbname=app").shown(),
        "postgres://bob@%2Fvar%2Frun%2Fpostgresql:1,[::1]:2,b:3/app"
    );
    assert_eq!(parsed("").shown(), "postgres://");
    assert_eq!(
        format!("{:?}", parsed("password=s3cret host=db")),
        "ConnInfo(\"postgres://db\")"
    );
}

#[test]
fn shown_parses_back_to_the_same_servers_user_and_database() {
    for text in [
        "postgres://b%40b:pw@[::1]:5433,db,/tmp%2Fsock:7/my%2Fdb?sslmode=verify-full",
        "host='/var/run/postgresql' user='o\\'neil' dbname='a b/c?d#e'",
        "host=h1,h2 port=,5433 user=bob",
    ] {
        let info = parsed(text);
        let back = parsed(&info.shown());
        for keyword in ["host", "port", "user", "dbname", "sslmode"] {
            assert_eq!(back.get(keyword), info.get(keyword), "{keyword} of {text}");
        }
    }
}

#[test]
fn shown_never_contains_the_password() {
    for text in [
        "postgres://bob:Zq9%2Fx@db/app",
        "postgres://bob:Zq9x@db/app?password=Zq9x",
        "postgres://bob@db/app?password=Zq9x&sslmode=require",
        "password=Zq9x host=db",
        "password = 'Zq9x with spaces' host=db",
        "host=db user=bob password=Zq9x sslmode=require",
    ] {
        let shown = parsed(text).with_defaults().shown();
        assert!(!shown.contains("Zq9x"), "{text} shows {shown}");
    }
}

#[test]
fn redact_unparsed_hides_url_passwords() {
    assert_eq!(
        redact_unparsed("postgres://u:pa/ss@h/db"),
        "postgres://***@h/db"
    );
    assert_eq!(
        redact_unparsed("postgres://h/db?password=x&sslmode=require"),
        "postgres://h/db?password=***&sslmode=require"
    );
    assert_eq!(
        redact_unparsed("postgres://h/db?sslmode=bad"),
        "postgres://h/db?sslmode=bad"
    );
}

#[test]
fn redact_unparsed_hides_keyword_value_passwords() {
    assert_eq!(
        redact_unparsed("host=db password = 'a b' port=1"),
        "host=db password = *** port=1"
    );
    assert_eq!(
        redact_unparsed("host=db password=a xyz=1"),
        "host=db password=***"
    );
    assert_eq!(
        redact_unparsed("host=db password=a b port=1"),
        "host=db password=***"
    );
    assert_eq!(
        redact_unparsed("host=db password='a b"),
        "host=db password=***"
    );
    assert_eq!(redact_unparsed("host=db junk"), "host=db junk");
}

#[test]
fn redact_unparsed_never_returns_any_of_the_password() {
    let secrets = [
        "Zq/9", "Zq?9", "Zq@9", "Zq:9", "Zq 9", "Zq'9", "Zq#9", "Zq&9", "Zq=9", "Zq\\9",
    ];
    for secret in secrets {
        let quoted = secret.replace('\\', "\\\\").replace('\'', "\\'");
        let texts = [
            format!("postgres://u:{secret}@h/db"),
            format!("postgresql://u:{secret}@h:5432/db?sslmode=require"),
            format!("postgres://u:{secret}@h1,h2/db?application_name=a@b"),
            format!("postgres://{secret}@h/db"),
            format!("postgres://h/db?password={secret}"),
            format!("postgres://h/db?password={secret}&sslmode=require"),
            format!("postgres://h/db?sslmode=require&password={secret}"),
            format!("  postgres://u:{secret}@h/db"),
            format!("POSTGRES://u:{secret}@h/db"),
            format!("host=h password={secret} port=1"),
            format!("host=h password = {secret}"),
            format!("host=h password='{quoted}' port=1"),
            format!("host=h password = '{quoted}"),
            format!("host=h password '{quoted}'"),
            format!("host=h PASSWORD={secret}"),
            format!("junk host=h password={secret} more junk"),
            format!("application_name='x://y' password={secret}"),
            format!("application_name='x password={secret}"),
            format!("host=h dbname=postgres://u:{secret}@h/db"),
            format!("host=h postgres://u:{secret}@h/db"),
        ];
        for text in texts {
            let shown = redact_unparsed(&text);
            assert!(!shown.contains("Zq"), "{text:?} shows {shown:?}");
            assert!(!shown.contains('9'), "{text:?} shows {shown:?}");
        }
    }
}

/// Passwords drawn from letters no template or message contains, and the characters that
/// break URLs and keyword/value strings.
#[test]
fn random_nasty_passwords_never_show_in_errors_shown_urls_or_redactions() {
    let alphabet: Vec<char> = "ZJV/?@: '\\#&=%".chars().collect();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..3000 {
        let secret: String = (0..rng.usize(1..9))
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        let quoted = secret.replace('\\', "\\\\").replace('\'', "\\'");
        let texts = [
            format!("postgres://u:{secret}@h/db"),
            format!("postgres://u:{secret}@h:5432/db?sslmode=require"),
            format!("postgres://u:{secret}@[::1],h2:6000/db?application_name=a@b"),
            format!("postgres://h/db?password={secret}"),
            format!("postgres://h/db?password={secret}&sslmode=require"),
            format!("postgres://h/db?sslmode=require&password={secret}"),
            format!("host=h password={secret} port=1"),
            format!("host=h password = {secret}"),
            format!("host=h password='{quoted}' port=1"),
            format!("host=h password = '{secret}"),
            format!("junk password={secret} x"),
        ];
        for text in texts {
            let outputs = [
                redact_unparsed(&text),
                match ConnInfo::parse(&text) {
                    Ok(info) => info.with_defaults().shown(),
                    Err(e) => e,
                },
            ];
            for output in outputs {
                assert!(
                    !output.contains(['Z', 'J', 'V']),
                    "{text:?} shows {output:?}"
                );
            }
        }
    }
}

#[test]
fn redact_unparsed_hides_sslpassword_too() {
    assert_eq!(redact_unparsed("sslpassword=Zq9 x"), "sslpassword=***");
    assert_eq!(
        redact_unparsed("postgres://h?sslpassword=Zq9"),
        "postgres://h?sslpassword=***"
    );
}

#[test]
fn redact_unparsed_keeps_what_is_not_secret() {
    let shown = redact_unparsed("postgres://bob:x@db:5432/app?sslmode=require");
    assert_eq!(shown, "postgres://***@db:5432/app?sslmode=require");
    assert_eq!(
        redact_unparsed("host=db sslmode=require"),
        "host=db sslmode=require"
    );
}

#[test]
fn to_tokio_postgres_round_trips_through_its_parser() {
    let info = parsed(
        "postgres://b%27ob:p%5C'a%20ss@h1,[::1]:5433/d%27b?options=-c%20search_path%3D'a%20b'&application_name=",
    );
    let text = info.to_tokio_postgres(&[]);
    let config = tokio_postgres::Config::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(config.get_user(), Some("b'ob"));
    assert_eq!(config.get_password(), Some(&b"p\\'a ss"[..]));
    assert_eq!(config.get_dbname(), Some("d'b"));
    assert_eq!(
        config.get_hosts(),
        [
            tokio_postgres::config::Host::Tcp("h1".to_string()),
            tokio_postgres::config::Host::Tcp("::1".to_string())
        ]
    );
    assert_eq!(config.get_ports(), [5432, 5433]);
    assert_eq!(config.get_options(), Some("-c search_path='a b'"));
    assert_eq!(config.get_application_name(), Some(""));
}

#[test]
fn to_tokio_postgres_leaves_out_what_the_caller_handles() {
    let info =
        parsed("host=db sslmode=verify-full sslrootcert=/ca.pem passfile=/p keepalives_count=3");
    assert_eq!(
        info.to_tokio_postgres(&["sslmode", "sslrootcert", "passfile"]),
        "host='db' keepalives_retries='3'"
    );
}

#[test]
fn a_zero_keepalive_setting_is_the_systems_default_as_in_libpq() {
    let info = parsed("host=db keepalives_idle=0 keepalives_interval=0 keepalives_count=0");
    assert_eq!(info.to_tokio_postgres(&[]), "host='db'");
    let info = parsed("host=db keepalives_idle=30 keepalives_count=2");
    assert_eq!(
        info.to_tokio_postgres(&[]),
        "host='db' keepalives_idle='30' keepalives_retries='2'"
    );
}
