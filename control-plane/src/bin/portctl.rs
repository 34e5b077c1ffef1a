//! `portctl`, the operators' CLI: applies YAML documents to the control plane in one
//! all-or-nothing transaction, shows what would change, reads, deletes and exports resources,
//! and lists proxies with the config version each has acknowledged.
//!
//! It parses documents locally (shape only, [`portcullis_shared::document`]) and leaves every
//! semantic check to the server; when the server rejects something, each problem is printed
//! against the file and document it came from. Exit codes: 0 done, 1 input or request refused,
//! 2 control plane unreachable or failing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use portcullis_control_plane::admin::MAX_MESSAGE_BYTES;
use portcullis_proto::admin::v1 as api;
use portcullis_proto::admin::v1::admin_service_client::AdminServiceClient;
use portcullis_proto::config::v1 as pb;
use portcullis_shared::document::{self, DocumentError};
use portcullis_shared::kind::ResourceExt;
use portcullis_shared::{Kind, Violation};
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

#[derive(Debug, Parser)]
#[command(name = "portctl", version, about = "Operate a Portcullis control plane")]
struct Cli {
    /// The control plane's admin API.
    #[arg(long, global = true, env = "PORTCULLIS_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply every document of the given files in one transaction: all or nothing.
    Apply {
        #[command(flatten)]
        files: Files,
        /// Validate and show the changes; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete stored resources, of the kinds in the files, that the files do not have.
        #[arg(long)]
        prune: bool,
    },
    /// Show what `apply` would change (+ create, ~ update, - delete); change nothing.
    Diff {
        #[command(flatten)]
        files: Files,
        /// Include the deletions `apply --prune` would make.
        #[arg(long)]
        prune: bool,
    },
    /// Show the resources of one kind, or one resource.
    Get {
        /// upstream, issuer, key, policy, route or block (plural and capitalised forms too).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        name: Option<String>,
        /// table: one line per resource; yaml and json: documents, as `apply` reads them.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete one resource; refused while another resource refers to it.
    Delete {
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        name: String,
        /// Only if the stored revision is still this one.
        #[arg(long)]
        revision: Option<i64>,
    },
    /// Print the whole configuration as YAML documents, the input `apply` takes.
    Export,
    /// List the proxies and the config version each has acknowledged.
    Proxies,
}

#[derive(Debug, clap::Args)]
struct Files {
    /// A YAML file, a directory (its *.yaml and *.yml files, by name), or - for standard input.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true, num_args = 1..)]
    paths: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse::<Kind>().map_err(|e| e.to_string())
}

/// Why a command did not succeed; every line is printed as `error: <line>`.
#[derive(Debug)]
enum Failure {
    /// The input or the request was refused (exit 1).
    Rejected(Vec<String>),
    /// The control plane could not be reached, or failed (exit 2).
    Unavailable(String),
}

impl Failure {
    fn rejected(line: impl Into<String>) -> Failure {
        Failure::Rejected(vec![line.into()])
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Rejected(lines)) => {
            for line in lines {
                eprintln!("error: {line}");
            }
            ExitCode::from(1)
        }
        Err(Failure::Unavailable(line)) => {
            eprintln!("error: {line}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let server = cli.server;
    match cli.command {
        Command::Apply { files, dry_run, prune } => {
            let input = Input::load(&files.paths)?;
            let mut client = connect(&server).await?;
            let request = api::ApplyRequest { resources: input.resources.clone(), deletes: vec![], dry_run, prune };
            let response = client.apply(request).await.map_err(|s| failure(s, &server, &input.origins))?.into_inner();
            let mut out = String::new();
            for change in &response.changes {
                out.push_str(&describe_change(change));
                out.push('\n');
            }
            if dry_run {
                out.push_str(&format!("dry run: nothing stored (config revision {})\n", response.revision));
            } else {
                out.push_str(&format!("applied at revision {}\n", response.revision));
            }
            write_stdout(&out)
        }
        Command::Diff { files, prune } => {
            let input = Input::load(&files.paths)?;
            let mut client = connect(&server).await?;
            let request =
                api::ApplyRequest { resources: input.resources.clone(), deletes: vec![], dry_run: true, prune };
            let response = client.apply(request).await.map_err(|s| failure(s, &server, &input.origins))?.into_inner();
            let mut out = String::new();
            for change in &response.changes {
                let target = change_target(change);
                match api::change::Action::try_from(change.action) {
                    Ok(api::change::Action::Create) => out.push_str(&format!("+ {target}\n")),
                    Ok(api::change::Action::Update) => {
                        out.push_str(&format!("~ {target}: {}\n", change.fields.join(", ")))
                    }
                    Ok(api::change::Action::Delete) => out.push_str(&format!("- {target}\n")),
                    _ => {}
                }
            }
            write_stdout(&out)
        }
        Command::Get { kind, name, output } => {
            let mut client = connect(&server).await?;
            let no_origins = Origins::new();
            let resources = match name {
                Some(name) => {
                    let request = api::GetRequest { kind: kind.to_proto() as i32, name };
                    let response = client.get(request).await.map_err(|s| failure(s, &server, &no_origins))?;
                    response.into_inner().resource.into_iter().collect()
                }
                None => {
                    let request = api::ListRequest { kind: kind.to_proto() as i32 };
                    let response = client.list(request).await.map_err(|s| failure(s, &server, &no_origins))?;
                    let mut resources = response.into_inner().resources;
                    sort_resources(&mut resources);
                    resources
                }
            };
            let text = match output {
                Output::Yaml => document::to_yaml(&resources),
                Output::Json => document::to_json(&resources),
                Output::Table => resource_table(&resources),
            };
            write_stdout(&text)
        }
        Command::Delete { kind, name, revision } => {
            let mut client = connect(&server).await?;
            let request = api::DeleteRequest {
                kind: kind.to_proto() as i32,
                name: name.clone(),
                expected_revision: revision.unwrap_or(0),
            };
            let response = client.delete(request).await.map_err(|s| failure(s, &server, &Origins::new()))?;
            write_stdout(&format!("{kind}/{name} deleted at revision {}\n", response.into_inner().revision))
        }
        Command::Export => {
            let mut client = connect(&server).await?;
            let response = client
                .export(api::ExportRequest {})
                .await
                .map_err(|s| failure(s, &server, &Origins::new()))?
                .into_inner();
            let mut resources = response.resources;
            sort_resources(&mut resources);
            write_stdout(&document::to_yaml(&resources))
        }
        Command::Proxies => {
            let mut client = connect(&server).await?;
            let response = client
                .list_proxies(api::ListProxiesRequest {})
                .await
                .map_err(|s| failure(s, &server, &Origins::new()))?
                .into_inner();
            let mut text = proxy_table(&response.proxies);
            text.push_str(&format!("config version {}\n", response.config_version));
            write_stdout(&text)
        }
    }
}

// ---------------------------------------------------------------- input files

/// Where a resource was read from, to point server-side errors back at it.
#[derive(Clone, Debug)]
struct Origin {
    source: String,
    index: usize,
}

type Origins = HashMap<(Kind, String), Origin>;

struct Input {
    resources: Vec<pb::Resource>,
    origins: Origins,
}

impl Input {
    /// Reads and parses every document of every path; reports all local errors at once.
    fn load(paths: &[PathBuf]) -> Result<Input, Failure> {
        let mut errors: Vec<String> = Vec::new();
        let mut resources = Vec::new();
        let mut origins = Origins::new();
        for (source, text) in read_sources(paths)? {
            let docs = match document::parse_located(&text, &source) {
                Ok(docs) => docs,
                Err(errs) => {
                    errors.extend(errs.iter().map(ToString::to_string));
                    continue;
                }
            };
            for doc in docs {
                let Some((kind, name)) = doc.resource.kind_name() else {
                    continue;
                };
                let key = (kind, name.to_owned());
                if let Some(first) = origins.get(&key) {
                    let e = DocumentError {
                        source: source.clone(),
                        index: doc.index,
                        kind: Some(kind.document_name().to_owned()),
                        name: Some(name.to_owned()),
                        field: "name".to_owned(),
                        message: format!("also defined in {} document {}", first.source, first.index),
                    };
                    errors.push(e.to_string());
                    continue;
                }
                origins.insert(key, Origin { source: source.clone(), index: doc.index });
                resources.push(doc.resource);
            }
        }
        if !errors.is_empty() {
            return Err(Failure::Rejected(errors));
        }
        if resources.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(Failure::rejected(format!("no resources found in {}", names.join(", "))));
        }
        Ok(Input { resources, origins })
    }
}

/// (source name, text) of every file named by `paths`, in order; `-` is standard input.
fn read_sources(paths: &[PathBuf]) -> Result<Vec<(String, String)>, Failure> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            match std::io::stdin().read_to_string(&mut text) {
                Ok(_) => out.push(("-".to_owned(), text)),
                Err(e) => errors.push(format!("-: cannot read standard input: {e}")),
            }
            continue;
        }
        let files = if path.is_dir() {
            match yaml_files(path) {
                Ok(files) if files.is_empty() => {
                    errors.push(format!("{}: no *.yaml or *.yml files in this directory", path.display()));
                    continue;
                }
                Ok(files) => files,
                Err(e) => {
                    errors.push(format!("{}: cannot list directory: {e}", path.display()));
                    continue;
                }
            }
        } else {
            vec![path.clone()]
        };
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => out.push((file.display().to_string(), text)),
                Err(e) => errors.push(format!("{}: cannot read: {e}", file.display())),
            }
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(Failure::Rejected(errors)) }
}

/// The `*.yaml` and `*.yml` files directly inside `dir`, sorted by name.
fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

// ---------------------------------------------------------------- talking to the server

async fn connect(server: &str) -> Result<AdminServiceClient<Channel>, Failure> {
    let url = if server.contains("://") { server.to_owned() } else { format!("http://{server}") };
    let unreachable = |e: &dyn std::error::Error| {
        Failure::Unavailable(format!("cannot reach control plane at {server}: {}", chain(e)))
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| unreachable(&e))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120));
    let channel = endpoint.connect().await.map_err(|e| unreachable(&e))?;
    Ok(AdminServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// An error and its sources, `outer: inner: innermost`, without repeats.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Maps a refused or failed call to what the operator sees.
fn failure(status: Status, server: &str, origins: &Origins) -> Failure {
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::AlreadyExists
        | Code::Aborted
        | Code::OutOfRange
        | Code::ResourceExhausted => Failure::Rejected(violation_lines(&status, origins)),
        Code::Unavailable => match std::error::Error::source(&status) {
            // the connection failed under the call
            Some(source) => Failure::Unavailable(format!("cannot reach control plane at {server}: {}", chain(source))),
            None => Failure::Unavailable(format!("control plane at {server} is unavailable: {}", status.message())),
        },
        code => Failure::Unavailable(format!("control plane at {server} failed: {code:?}: {}", status.message())),
    }
}

/// One line per violation in the status details, each pointing at the document it came from
/// when we have one; the status message when there are no details.
fn violation_lines(status: &Status, origins: &Origins) -> Vec<String> {
    let violations = api::ValidationErrors::decode(status.details()).map(|d| d.violations).unwrap_or_default();
    if violations.is_empty() {
        return vec![status.message().to_owned()];
    }
    violations.into_iter().map(|v| describe_violation(v, origins)).collect()
}

fn describe_violation(v: api::FieldViolation, origins: &Origins) -> String {
    let Some(kind) = Kind::from_proto(v.kind) else {
        return match v.field.as_str() {
            "" => format!("{}: {}", v.name, v.description),
            field => format!("{}: {field}: {}", v.name, v.description),
        };
    };
    match origins.get(&(kind, v.name.clone())) {
        Some(origin) => {
            // server fields are relative to the resource; in a document they sit under `spec`
            let field = match v.field.as_str() {
                "" | "name" => v.field.clone(),
                f => format!("spec.{f}"),
            };
            DocumentError {
                source: origin.source.clone(),
                index: origin.index,
                kind: Some(kind.document_name().to_owned()),
                name: Some(v.name),
                field,
                message: v.description,
            }
            .to_string()
        }
        None => Violation { kind, name: v.name, field: v.field, message: v.description }.to_string(),
    }
}

fn change_target(change: &api::Change) -> String {
    match &change.r#ref {
        Some(r) => match Kind::from_proto(r.kind) {
            Some(kind) => format!("{kind}/{}", r.name),
            None => format!("unknown/{}", r.name),
        },
        None => "unknown".to_owned(),
    }
}

fn describe_change(change: &api::Change) -> String {
    let target = change_target(change);
    match api::change::Action::try_from(change.action) {
        Ok(api::change::Action::Create) => format!("{target} created"),
        Ok(api::change::Action::Update) if change.fields.is_empty() => format!("{target} updated"),
        Ok(api::change::Action::Update) => {
            format!("{target} updated (fields: {})", change.fields.join(", "))
        }
        Ok(api::change::Action::Delete) => format!("{target} deleted"),
        Ok(api::change::Action::Unchanged) => format!("{target} unchanged"),
        _ => format!("{target} (unknown change {})", change.action),
    }
}

// ---------------------------------------------------------------- output

/// Kinds in dependency order, then names.
fn sort_resources(resources: &mut [pb::Resource]) {
    resources.sort_by(|a, b| {
        let key = |r: &pb::Resource| r.kind_name().map(|(k, n)| (k, n.to_owned()));
        key(a).cmp(&key(b))
    });
}

/// Writes to stdout; a closed pipe (`portctl export | head`) is not an error.
fn write_stdout(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Unavailable(format!("cannot write to standard output: {e}"))),
    }
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn resource_table(resources: &[pb::Resource]) -> String {
    let rows: Vec<Vec<String>> = resources
        .iter()
        .filter_map(|r| {
            let (kind, name) = r.kind_name()?;
            Some(vec![kind.to_string(), name.to_owned(), r.revision().to_string(), summary(r)])
        })
        .collect();
    table(&["KIND", "NAME", "REVISION", "SUMMARY"], &rows)
}

/// One line that tells resources of a kind apart.
fn summary(r: &pb::Resource) -> String {
    use pb::resource::Kind as K;
    match &r.kind {
        Some(K::Upstream(u)) => u.endpoints.join(","),
        Some(K::Issuer(i)) => {
            use pb::key_source::Source;
            let keys = match i.keys.as_ref().and_then(|k| k.source.as_ref()) {
                Some(Source::JwksUri(u)) => format!("jwks_uri {u}"),
                Some(Source::Discovery(u)) => format!("discovery {u}"),
                Some(Source::InlineJwks(_)) => "inline keys".to_owned(),
                Some(Source::SharedSecretFile(_)) => "shared secret".to_owned(),
                None => "no keys".to_owned(),
            };
            format!("{} ({keys})", i.issuer)
        }
        Some(K::Key(k)) => {
            let retire = k.retire_at.as_ref().map(|t| format!(", retires {}", document::format_timestamp(t)));
            format!("{} kid {}{}", k.issuer, k.kid, retire.unwrap_or_default())
        }
        Some(K::Policy(p)) => {
            let mut parts = Vec::new();
            if let Some(a) = &p.authentication {
                let mode = match pb::AuthMode::try_from(a.mode) {
                    Ok(pb::AuthMode::Required) => "required",
                    Ok(pb::AuthMode::Optional) => "optional",
                    Ok(pb::AuthMode::Public) => "public",
                    _ => "unspecified",
                };
                if a.issuers.is_empty() {
                    parts.push(mode.to_owned());
                } else {
                    parts.push(format!("{mode} ({})", a.issuers.join(",")));
                }
            }
            if let Some(z) = &p.authorization
                && !z.required_scopes.is_empty()
            {
                parts.push(format!("scopes {}", z.required_scopes.join(",")));
            }
            if !p.rate_limits.is_empty() {
                parts.push(format!("{} rate limit(s)", p.rate_limits.len()));
            }
            if p.mode == pb::PolicyMode::ReportOnly as i32 {
                parts.push("report only".to_owned());
            }
            parts.join(", ")
        }
        Some(K::Route(rt)) => {
            use pb::path_match::Kind as PK;
            let m = rt.r#match.clone().unwrap_or_default();
            let mut parts = vec![if m.methods.is_empty() { "any".to_owned() } else { m.methods.join(",") }];
            if !m.hosts.is_empty() && m.hosts.iter().all(|h| h != "*") {
                parts.push(m.hosts.join(","));
            }
            parts.push(match m.path.and_then(|p| p.kind) {
                Some(PK::Exact(p)) => format!("exact {p}"),
                Some(PK::Prefix(p)) => format!("prefix {p}"),
                Some(PK::Template(p)) => format!("template {p}"),
                None => "no path".to_owned(),
            });
            format!("{} -> {} (policy {})", parts.join(" "), rt.upstream, rt.policy)
        }
        Some(K::Block(b)) => {
            use pb::block::Target;
            let target = match &b.target {
                Some(Target::ClientId(v)) => format!("client_id {v}"),
                Some(Target::Sub(v)) => format!("sub {v}"),
                Some(Target::Jti(v)) => format!("jti {v}"),
                Some(Target::Cidr(v)) => format!("cidr {v}"),
                None => "nothing".to_owned(),
            };
            let until = match &b.expires_at {
                Some(t) => format!("until {}", document::format_timestamp(t)),
                None => "until deleted".to_owned(),
            };
            format!("{target} {until}: {}", b.reason)
        }
        None => String::new(),
    }
}

fn proxy_table(proxies: &[api::ProxyStatus]) -> String {
    let rows: Vec<Vec<String>> = proxies
        .iter()
        .map(|p| {
            let since = p.connected_since.as_ref().map_or_else(|| "-".to_owned(), document::format_timestamp);
            let nack = if p.last_nack_error.is_empty() {
                "-".to_owned()
            } else {
                format!("{}: {}", p.last_nack_version, p.last_nack_error)
            };
            vec![
                p.id.clone(),
                if p.zone.is_empty() { "-".to_owned() } else { p.zone.clone() },
                p.address.clone(),
                p.acked_version.to_string(),
                p.lag.to_string(),
                if p.connected { "yes" } else { "no" }.to_owned(),
                since,
                nack,
            ]
        })
        .collect();
    table(&["ID", "ZONE", "ADDRESS", "ACKED", "LAG", "CONNECTED", "SINCE", "LAST-NACK"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![vec!["route".to_owned(), "a-long-name".to_owned(), "7".to_owned()]];
        assert_eq!(
            table(&["KIND", "NAME", "REVISION"], &rows),
            "KIND   NAME         REVISION\nroute  a-long-name  7\n"
        );
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn violations_point_at_documents() {
        let mut origins = Origins::new();
        origins.insert((Kind::Route, "r".into()), Origin { source: "routes.yaml".into(), index: 3 });
        let v = |kind: Kind, name: &str, field: &str| api::FieldViolation {
            kind: kind.to_proto() as i32,
            name: name.into(),
            field: field.into(),
            description: "bad".into(),
        };
        for (violation, want) in [
            (
                v(Kind::Route, "r", "match.path.template"),
                "routes.yaml: document 3 (Route r): spec.match.path.template: bad",
            ),
            (v(Kind::Route, "r", "name"), "routes.yaml: document 3 (Route r): name: bad"),
            (v(Kind::Route, "r", ""), "routes.yaml: document 3 (Route r): bad"),
            (v(Kind::Route, "other", "policy"), "route other: policy: bad"),
        ] {
            assert_eq!(describe_violation(violation, &origins), want);
        }
        let details = api::ValidationErrors { violations: vec![v(Kind::Route, "r", "upstream")] };
        let status = Status::with_details(Code::InvalidArgument, "summary", details.encode_to_vec().into());
        assert_eq!(violation_lines(&status, &origins), ["routes.yaml: document 3 (Route r): spec.upstream: bad"]);
        assert_eq!(violation_lines(&Status::invalid_argument("plain"), &origins), ["plain"]);
    }
}
