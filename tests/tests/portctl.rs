//! `portctl` as operators run it: the real binary as a process against a control plane on the
//! embedded store and on a real etcd. The example configuration in `deploy/examples/` applies
//! and exports back exactly; a broken field is rejected naming the file, the resource and the
//! field, and nothing is stored; `export | apply -f -` changes nothing; deletes that would break
//! a reference are refused; `diff` shows updates by field; an unreachable server exits 2.
//!
//! Needs the binaries built first (`cargo build --bins`), like every suite that runs processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portcullis_proto::config::v1 as pb;
use portcullis_shared::document::parse_documents;
use portcullis_shared::kind::ResourceExt;
use portcullis_tests::bin_path;
use portcullis_tests::control_plane::TestControlPlane;
use portcullis_tests::etcd::EtcdServer;
use tokio::io::AsyncWriteExt;

/// Runs one scenario against the embedded store and against etcd.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cp = super::TestControlPlane::embedded().await;
                    super::$name(&cp).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let etcd = super::EtcdServer::start().await.expect("start etcd");
                    let cp = super::TestControlPlane::etcd(&etcd).await;
                    super::$name(&cp).await;
                }
            )*
        }
    };
}

on_both_stores!(
    examples_apply_and_export_exactly,
    a_broken_field_is_rejected_naming_file_resource_and_field,
    export_then_apply_changes_nothing,
    deleting_a_policy_in_use_is_refused_naming_the_route,
    diff_shows_changes_by_field_and_stores_nothing,
);

/// What a `portctl` run left behind.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "portctl failed: {self:#?}");
        self
    }
}

/// Runs `portctl --server <server> args…`, feeding `stdin` when given.
async fn portctl(server: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = tokio::process::Command::new(bin_path("portctl"));
    command
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("PORTCULLIS_SERVER")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn portctl");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await.expect("write portctl stdin");
        drop(pipe);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("portctl did not finish within 60s")
        .expect("wait for portctl");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn examples_arg() -> String {
    examples_dir().display().to_string()
}

/// Every resource of the example files, in file and document order.
fn example_resources() -> Vec<pb::Resource> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("read deploy/examples")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "deploy/examples has too few files: {files:?}");
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read example");
            parse_documents(&text, &f.display().to_string()).unwrap_or_else(|e| panic!("{e:#?}"))
        })
        .collect()
}

/// A copy of the example files in a temp dir, with `edit` applied to the text of `file`.
fn edited_examples(file: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(examples_dir()).expect("read deploy/examples") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().expect("file name");
        let mut text = std::fs::read_to_string(&path).expect("read example");
        if name == file {
            let edited = edit(&text);
            assert_ne!(edited, text, "the edit of {file} changed nothing");
            text = edited;
        }
        std::fs::write(dir.path().join(name), text).expect("write example copy");
    }
    dir
}

/// The number in the last line, `applied at revision N`.
fn applied_revision(run: &Run) -> i64 {
    let last = run.stdout.lines().last().unwrap_or_default();
    last.strip_prefix("applied at revision ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {run:#?}"))
}

async fn apply_examples(cp: &TestControlPlane) -> i64 {
    let run = portctl(&cp.admin_url(), &["apply", "-f", &examples_arg()], None).await;
    run.assert_ok();
    applied_revision(&run)
}

async fn examples_apply_and_export_exactly(cp: &TestControlPlane) {
    let url = cp.admin_url();
    let examples = example_resources();
    let run = portctl(&url, &["apply", "-f", &examples_arg()], None).await;
    run.assert_ok();
    for r in &examples {
        let (kind, name) = r.kind_name().expect("kind");
        assert!(run.stdout.contains(&format!("{kind}/{name} created\n")), "{kind}/{name}: {run:#?}");
    }
    assert!(applied_revision(&run) > 0);

    // what is stored is exactly what the files say: every example comes back from export
    let export = portctl(&url, &["export"], None).await;
    export.assert_ok();
    let exported = parse_documents(&export.stdout, "export").expect("export parses");
    for r in &examples {
        assert!(exported.contains(r), "not exported as written: {r:#?}\n{}", export.stdout);
    }
    for r in &exported {
        let (kind, _) = r.kind_name().expect("kind");
        assert!(examples.contains(r) || kind == portcullis_shared::Kind::Key, "unexpected: {r:#?}");
    }

    // get: one resource as YAML and as JSON, a kind as a table
    let route = portctl(&url, &["get", "Route", "orders-health", "-o", "yaml"], None).await;
    route.assert_ok();
    let got = parse_documents(&route.stdout, "get").expect("get -o yaml parses");
    assert_eq!(got.len(), 1);
    assert!(examples.contains(&got[0]), "{}", route.stdout);

    let json = portctl(&url, &["get", "routes", "-o", "json"], None).await;
    json.assert_ok();
    assert!(json.stdout.trim_start().starts_with('['), "{}", json.stdout);
    for name in ["orders-health", "orders-api"] {
        assert!(json.stdout.contains(&format!("\"name\": \"{name}\"")), "{}", json.stdout);
    }
    assert!(json.stdout.contains("\"kind\": \"Route\""), "{}", json.stdout);

    let table = portctl(&url, &["get", "route"], None).await;
    table.assert_ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("KIND") && lines[0].contains("NAME") && lines[0].contains("REVISION"), "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[1].contains("orders-api") && lines[2].contains("orders-health"), "sorted by name: {lines:?}");

    let missing = portctl(&url, &["get", "route", "nope"], None).await;
    assert_eq!(missing.code, Some(1), "{missing:#?}");
    assert!(missing.stderr.contains("nope"), "{missing:#?}");

    let proxies = portctl(&url, &["proxies"], None).await;
    proxies.assert_ok();
    assert!(proxies.stdout.starts_with("ID"), "{proxies:#?}");
    assert!(proxies.stdout.contains("config version "), "{proxies:#?}");
}

async fn a_broken_field_is_rejected_naming_file_resource_and_field(cp: &TestControlPlane) {
    let url = cp.admin_url();
    apply_examples(cp).await;
    let before = portctl(&url, &["export"], None).await;
    before.assert_ok();

    // rejected by the server: the route's path template does not close its parameter
    let broken =
        edited_examples("20-routes.yaml", |t| t.replace("prefix: /api/orders", "template: \"/api/orders/{id\""));
    let run = portctl(&url, &["apply", "-f", &broken.path().display().to_string()], None).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let file = broken.path().join("20-routes.yaml").display().to_string();
    let want = format!("error: {file}: document 2 (Route orders-api): spec.match.path.template: ");
    assert!(run.stderr.lines().any(|l| l.starts_with(&want)), "wanted {want:?} in:\n{}", run.stderr);
    assert!(run.stdout.is_empty(), "{run:#?}");

    // rejected locally, before the server is asked: a duration that does not parse
    let broken = edited_examples("00-upstreams.yaml", |t| t.replace("connect_timeout: 5s", "connect_timeout: 5 sec"));
    let run = portctl(&url, &["apply", "-f", &broken.path().display().to_string()], None).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let file = broken.path().join("00-upstreams.yaml").display().to_string();
    let want = format!("error: {file}: document 1 (Upstream orders): spec.connect_timeout: invalid duration \"5 sec\"");
    assert!(run.stderr.lines().any(|l| l.starts_with(&want)), "wanted {want:?} in:\n{}", run.stderr);

    // and an unknown field, from standard input
    let run = portctl(&url, &["apply", "-f", "-"], Some("kind: Route\nname: x\nspec: {upstrem: orders}\n")).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.starts_with("error: -: document 1 (Route x): spec.upstrem: unknown field"), "{run:#?}");

    let after = portctl(&url, &["export"], None).await;
    after.assert_ok();
    assert_eq!(before.stdout, after.stdout, "a rejected apply changed the stored configuration");
}

async fn export_then_apply_changes_nothing(cp: &TestControlPlane) {
    let url = cp.admin_url();
    let revision = apply_examples(cp).await;
    let export = portctl(&url, &["export"], None).await;
    export.assert_ok();

    let run = portctl(&url, &["apply", "-f", "-"], Some(&export.stdout)).await;
    run.assert_ok();
    let changes: Vec<&str> = run.stdout.lines().filter(|l| !l.starts_with("applied at")).collect();
    assert_eq!(changes.len(), example_resources().len(), "{run:#?}");
    assert!(changes.iter().all(|l| l.ends_with(" unchanged")), "{run:#?}");
    assert_eq!(applied_revision(&run), revision, "an unchanged apply moved the revision");

    let again = portctl(&url, &["export"], None).await;
    again.assert_ok();
    assert_eq!(export.stdout, again.stdout);
}

async fn deleting_a_policy_in_use_is_refused_naming_the_route(cp: &TestControlPlane) {
    let url = cp.admin_url();
    apply_examples(cp).await;

    let run = portctl(&url, &["delete", "policy", "orders-read"], None).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.contains("orders-api"), "the refusal names the route: {run:#?}");

    let run = portctl(&url, &["delete", "routes", "orders-api"], None).await;
    run.assert_ok();
    assert!(run.stdout.starts_with("route/orders-api deleted at revision "), "{run:#?}");
    let run = portctl(&url, &["delete", "Policy", "orders-read"], None).await;
    run.assert_ok();

    let run = portctl(&url, &["delete", "policy", "orders-read"], None).await;
    assert_eq!(run.code, Some(1), "deleting what is gone: {run:#?}");
    let run = portctl(&url, &["delete", "upstream", "orders", "--revision", "1"], None).await;
    assert_eq!(run.code, Some(1), "still used, and a stale revision: {run:#?}");
}

async fn diff_shows_changes_by_field_and_stores_nothing(cp: &TestControlPlane) {
    let url = cp.admin_url();
    apply_examples(cp).await;
    let before = portctl(&url, &["export"], None).await;

    let run = portctl(&url, &["diff", "-f", &examples_arg()], None).await;
    run.assert_ok();
    assert_eq!(run.stdout, "", "nothing to change: {run:#?}");

    let changed = edited_examples("20-routes.yaml", |t| {
        let extra = "---\nkind: Route\nname: orders-write\nspec:\n  match: {methods: [POST], path: {exact: /api/orders}}\n  upstream: orders\n  policy: orders-read\n";
        format!("{}{extra}", t.replace("timeout: 10s", "timeout: 20s"))
    });
    let dir = changed.path().display().to_string();
    let run = portctl(&url, &["diff", "-f", &dir], None).await;
    run.assert_ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines.contains(&"~ route/orders-api: limits.timeout"), "{run:#?}");
    assert!(lines.contains(&"+ route/orders-write"), "{run:#?}");
    assert_eq!(lines.len(), 2, "unchanged resources are not shown: {run:#?}");

    let dry = portctl(&url, &["apply", "--dry-run", "-f", &dir], None).await;
    dry.assert_ok();
    assert!(dry.stdout.contains("route/orders-api updated (fields: limits.timeout)\n"), "{dry:#?}");
    let after = portctl(&url, &["export"], None).await;
    assert_eq!(before.stdout, after.stdout, "diff or a dry run stored something");

    // duplicates across files are refused locally, naming both places
    let file = changed.path().join("30-again.yaml");
    std::fs::write(&file, "kind: Upstream\nname: orders\nspec: {endpoints: [\"127.0.0.1:9001\"]}\n").expect("write");
    let run = portctl(&url, &["apply", "-f", &dir], None).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("30-again.yaml: document 1 (Upstream orders): name: also defined in")
            && run.stderr.contains("00-upstreams.yaml document 1"),
        "{run:#?}"
    );

    let applied = portctl(&url, &["apply", "-f", &examples_arg(), "-f", "-"], Some(&new_route_document())).await;
    applied.assert_ok();
    assert!(applied.stdout.contains("route/orders-write created\n"), "{applied:#?}");
}

/// A new route as a document, written from a stored resource: its revision is left out.
fn new_route_document() -> String {
    let route = pb::Route {
        name: "orders-write".into(),
        revision: 99,
        r#match: Some(pb::RouteMatch {
            methods: vec!["POST".into()],
            path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Exact("/api/orders".into())) }),
            ..Default::default()
        }),
        upstream: "orders".into(),
        policy: "orders-read".into(),
        ..Default::default()
    };
    let yaml = portcullis_shared::document::to_yaml(&[pb::Resource { kind: Some(pb::resource::Kind::Route(route)) }]);
    assert!(!yaml.contains("revision"), "{yaml}");
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_2() {
    // a port that was free a moment ago, with nothing listening on it now
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url = format!("http://127.0.0.1:{port}");
    let run = portctl(&url, &["export"], None).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.starts_with(&format!("error: cannot reach control plane at {url}: ")), "{run:#?}");

    // local errors come first: a bad file never needs the server
    let run = portctl(&url, &["apply", "-f", "-"], Some("kind: Route\n")).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let run = portctl(&url, &["apply", "-f", &examples_arg()], None).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
}
