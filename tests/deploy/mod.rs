//! What operators load to watch the agent and its Alertmanager bridge (`deploy/`): the
//! Prometheus rules and the two Grafana dashboards, the agent's and the bridge's. Every
//! metric they query must be one the real process they watch exports (the rules watch
//! both; or a recording rule of the rules file, or Prometheus's own `up`), every
//! `darkwatch_*` metric a process exports must have a panel on its dashboard, the rules
//! must carry what Alertmanager routes and shows by, and the dashboards must import.
//!
//! With `PROMTOOL` (or `promtool` on `PATH`) the dashboards' queries are also parsed by
//! Prometheus itself; `.ci/run` fetches promtool from apt and checks and unit-tests the rules
//! with it (`deploy/prometheus/darkwatch-rules.test.yml`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use crate::util::broker::{Agent, free_port, publish_all};
use crate::util::repo;

const RULES: &str = "deploy/prometheus/darkwatch-rules.yml";
/// The agent's dashboard: its `job` variable reads `darkwatch_model_info`.
const DASHBOARD: &str = "deploy/grafana/darkwatch.json";
/// The bridge's dashboard: its `job` variable reads `darkwatch_bridge_mqtt_connected`
/// (the bridge scraped in a job of its own; see the README, "Alerts into Alertmanager").
const BRIDGE_DASHBOARD: &str = "deploy/grafana/darkwatch-bridge.json";
const DASHBOARDS: [&str; 2] = [DASHBOARD, BRIDGE_DASHBOARD];

/// Series Prometheus makes itself for every target, which no exporter exposes.
const FROM_PROMETHEUS: &[&str] = &["up"];

/// Aggregations, keywords and operators: words in an expression that are not metrics.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "atan2",
];

/// Keywords followed by a parenthesised list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: every identifier that is not a function
/// (followed by `(`), a keyword, a label name (in `{…}` or a `by (…)` list), a duration or
/// range (`[…]`), a number, a string, or a Grafana variable (`$name`, `${name}`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let (mut braces, mut brackets) = (0usize, 0usize);
    let (mut label_list, mut grouping_next) = (false, false);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            '(' => {
                label_list = grouping_next;
                grouping_next = false;
            }
            ')' => label_list = false,
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                } else {
                    while i < chars.len() && ident(chars[i]) {
                        i += 1;
                    }
                    continue;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration: 0.99, 1e-3, 5m, 0x1f.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                continue;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
                if braces > 0 || brackets > 0 || label_list {
                    continue;
                }
                let word: String = chars[start..i].iter().collect();
                if GROUPING.contains(&word.as_str()) {
                    grouping_next = true;
                    continue;
                }
                let function = chars[i..]
                    .iter()
                    .find(|c| !c.is_whitespace())
                    .is_some_and(|&c| c == '(');
                if !function && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                    names.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The metric names of a Grafana query variable: `label_values(<selector>, <label>)` reads
/// the selector's metric; `label_values(<label>)` none; anything else is PromQL.
fn variable_query_names(query: &str) -> BTreeSet<String> {
    match query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    {
        Some(args) => match args.rsplit_once(',') {
            Some((selector, _label)) => metric_names(selector),
            None => BTreeSet::new(),
        },
        None => metric_names(query),
    }
}

#[test]
fn promql_metric_names_leave_out_functions_labels_keywords_and_variables() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{le="+Inf", x=~"$instance"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("x > 0 and on (instance) group_left (model_id) y offset 5m"),
        ["x", "y"]
    );
    assert_eq!(
        names("sum(rate(a[5m])) by (reason) / ignoring(reason) b > bool 1e-3"),
        ["a", "b"]
    );
    assert_eq!(
        names(r#"absent(up{job="darkwatch"}) or vector(0) * .5"#),
        ["up"]
    );
    assert_eq!(
        names(r#"label_replace(c, "dst", "$1 sum(d)", "src", "(.*)") + ${var}"#),
        ["c"]
    );
    assert_eq!(
        names("level:metric:rate5m > 0.8 * 536870912 unless max_over_time(m[10m]) == 1"),
        ["level:metric:rate5m", "m"]
    );
    // A misspelt metric is a name too: that is what the scrape check catches.
    assert_eq!(
        names("rate(darkwach_frames_total[5m])"),
        ["darkwach_frames_total"]
    );
    assert_eq!(
        variable_query_names(r#"label_values(darkwatch_model_info{job=~"$job"}, instance)"#)
            .into_iter()
            .collect::<Vec<_>>(),
        ["darkwatch_model_info"]
    );
    assert!(variable_query_names("label_values(instance)").is_empty());
}

/// The rules file's rules, each a YAML mapping.
fn rules() -> Vec<Yaml> {
    let text = std::fs::read_to_string(repo(RULES)).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{RULES}: {e}"));
    assert_eq!(docs.len(), 1, "{RULES}: one YAML document");
    let groups = docs[0]["groups"]
        .as_vec()
        .unwrap_or_else(|| panic!("{RULES}: no groups"));
    assert!(!groups.is_empty(), "{RULES}: no groups");
    groups
        .iter()
        .flat_map(|g| {
            assert!(
                g["name"].as_str().is_some(),
                "{RULES}: a group without a name"
            );
            g["rules"]
                .as_vec()
                .unwrap_or_else(|| panic!("{RULES}: group {:?} without rules", g["name"]))
                .clone()
        })
        .collect()
}

/// A rule's string field, or `None`.
fn field<'a>(rule: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    // Indexing what is not a mapping gives `Yaml::BadValue`, whose `as_str` is `None`.
    path.iter().fold(rule, |y, k| &y[*k]).as_str()
}

/// The names recorded by the rules file's recording rules.
fn recorded() -> BTreeSet<String> {
    rules()
        .iter()
        .filter_map(|r| field(r, &["record"]).map(String::from))
        .collect()
}

/// A dashboard (`DASHBOARD`, `BRIDGE_DASHBOARD`), parsed.
fn dashboard(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo(file)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every panel, those inside collapsed rows included.
fn panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL expression a dashboard runs (`where`, `expr`): panel targets, and the
/// query variables (as [`variable_query_names`] reads them, flagged `true`).
fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_string();
            out.push((format!("panel {:?}", p["title"]), expr, false));
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_default();
            out.push((format!("variable {:?}", v["name"]), q.to_string(), true));
        }
    }
    out
}

/// The references (`where`, names) that select a name neither `known` nor Prometheus's own
/// (as `where: name`), and every name selected. Each expression must select one.
fn references_check(
    references: Vec<(String, BTreeSet<String>)>,
    known: impl Fn(&str) -> bool,
) -> (Vec<String>, BTreeSet<String>) {
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (place, names) in references {
        assert!(!names.is_empty(), "{place}: selects no metric");
        for name in names {
            if !known(&name) && !FROM_PROMETHEUS.contains(&name.as_str()) {
                unknown.push(format!("{place}: {name}"));
            }
            used.insert(name);
        }
    }
    (unknown, used)
}

/// Every expression of the rules file (`where`, names it selects).
fn rule_references() -> Vec<(String, BTreeSet<String>)> {
    rules()
        .iter()
        .map(|r| {
            let name = field(r, &["alert"])
                .or(field(r, &["record"]))
                .unwrap_or("?");
            let expr = field(r, &["expr"]).unwrap_or_default();
            (format!("{RULES} rule {name}"), metric_names(expr))
        })
        .collect()
}

/// Every expression of a dashboard (`where`, names it selects).
fn dashboard_references(file: &str) -> Vec<(String, BTreeSet<String>)> {
    dashboard_queries(&dashboard(file))
        .into_iter()
        .map(|(place, expr, variable)| {
            let names = if variable {
                variable_query_names(&expr)
            } else {
                metric_names(&expr)
            };
            (format!("{file} {place}"), names)
        })
        .collect()
}

/// The metric family of a sample name: a histogram's `_bucket`, `_sum` and `_count`
/// series are its family (by the exposition's `# TYPE` line); any other name is its own.
fn family(exposition: &str, name: &str) -> String {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|f| exposition.contains(&format!("# TYPE {f} histogram")))
        .unwrap_or(name)
        .to_string()
}

/// Checks `file` against the real `/metrics` of the process it watches: every metric its
/// panels and variables select is exported there (or recorded by the rules, or `up`), and
/// every `darkwatch_*` family exported there is selected by a panel (a variable alone is
/// no place to see it). Returns the names the dashboard selects.
fn check_dashboard(file: &str, exposition: &str, recorded: &BTreeSet<String>) -> BTreeSet<String> {
    let exported = sample_names(exposition);
    let (unknown, used) = references_check(dashboard_references(file), |name| {
        exported.contains(name) || recorded.contains(name)
    });
    assert!(
        unknown.is_empty(),
        "metrics the process {file} watches does not export (histograms are queried as <name>_bucket, _sum or _count):\n{}\n\nexported: {exported:?}",
        unknown.join("\n")
    );
    let on_panels: BTreeSet<String> = dashboard_queries(&dashboard(file))
        .iter()
        .filter(|(_, _, variable)| !variable)
        .flat_map(|(_, e, _)| metric_names(e))
        .map(|n| family(exposition, &n))
        .collect();
    let missing: BTreeSet<String> = exported
        .iter()
        .map(|n| family(exposition, n))
        .filter(|f| f.starts_with("darkwatch_") && !on_panels.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but on no panel of {file}: {missing:?}"
    );
    used
}

/// The names of the samples in an exposition (histograms: `_bucket`, `_sum`, `_count`).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// The real agent's `/metrics` (online retraining on, so that its metrics are there too),
/// once it has scored a stream's frames (raw input), so that the per-stream series are
/// there too.
fn scrape_agent() -> String {
    let dir = tempfile::tempdir().unwrap();
    let (broker, metrics) = (free_port(), free_port());
    let retrain = format!(
        "[retrain]\nenabled = true\nstate_dir = \"{}\"\n",
        dir.path().join("state").display()
    );
    let cfg = crate::agent::config(
        dir.path(),
        "agent.toml",
        &repo("models/smd-machine-1-6"),
        metrics,
        "format = \"raw\"",
        &format!("port = {broker}\nnode_name = \"deploy\"\nsubscribe = [\"act/#\"]\n"),
        &retrain,
    );
    let mut agent = Agent::connected(&cfg, metrics, &[]);
    let frames = crate::agent::smd_train_rows();
    publish_all(
        broker,
        &crate::agent::raw_rows(&frames, "act/node1", 0, 5, 0.0),
    );
    agent.wait_metric("darkwatch_stream_score{stream=\"node1\"}", f64::is_finite);
    let body = agent.scrape().expect("/metrics answers");
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    let (_, text) = body.split_once("\r\n\r\n").expect("an HTTP response");
    text.to_string()
}

/// The real Alertmanager bridge's `/metrics` (its rules query these).
fn scrape_bridge() -> String {
    let metrics = free_port();
    let setup = crate::alertmanager::Setup::new(
        &format!("http://127.0.0.1:{}", free_port()),
        &format!("metrics_listen = \"127.0.0.1:{metrics}\"\n"),
    );
    let mut bridge = crate::alertmanager::Bridge::start(&setup.config);
    bridge.wait_log("Serving /metrics.", 1);
    let text = crate::alertmanager::scrape(metrics).expect("the bridge's /metrics answers");
    let (status, err) = bridge.stop();
    assert!(status.success(), "{err}");
    text
}

/// Every metric the rules query is one the agent or the Alertmanager bridge exports (or a
/// recorded one, or `up`); every metric the agent's dashboard queries is one the agent
/// exports, and every `darkwatch_*` metric the agent exports has a panel there.
#[test]
fn every_metric_the_rules_and_the_dashboard_query_is_exported_by_the_agent() {
    let exposition = scrape_agent();
    let exported = sample_names(&exposition);
    let bridge = sample_names(&scrape_bridge());
    assert!(
        bridge.contains("darkwatch_bridge_messages_in_hand"),
        "{bridge:?}"
    );
    for want in [
        "darkwatch_frames_scored_total",
        "darkwatch_scoring_latency_seconds_bucket",
        "darkwatch_retrains_total",
        "darkwatch_scores_dropped_total",
        "anomaly_score",
        "process_resident_memory_bytes",
    ] {
        assert!(
            exported.contains(want),
            "{want} not in the scrape:\n{exposition}"
        );
    }
    let recorded = recorded();
    let (unknown, mut used) = references_check(rule_references(), |name| {
        exported.contains(name) || bridge.contains(name) || recorded.contains(name)
    });
    assert!(
        unknown.is_empty(),
        "metrics neither the agent nor the bridge exports (histograms are queried as <name>_bucket, _sum or _count):\n{}\n\nagent: {exported:?}\nbridge: {bridge:?}",
        unknown.join("\n")
    );
    used.extend(check_dashboard(DASHBOARD, &exposition, &recorded));
    assert!(used.len() > 20, "{used:?}");
}

/// The bridge's dashboard against the real bridge's `/metrics`: every `darkwatch_*`
/// metric it exports (`darkwatch_bridge_*`, its build info) has a panel, and every
/// query selects only what the bridge exports (or `up`), none of the agent's.
#[test]
fn every_bridge_metric_has_a_panel_on_the_bridge_dashboard_which_queries_only_the_bridge() {
    let exposition = scrape_bridge();
    let exported = sample_names(&exposition);
    for want in [
        "darkwatch_bridge_messages_in_hand",
        "darkwatch_bridge_posts_total",
        "darkwatch_bridge_post_duration_seconds_bucket",
        "darkwatch_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(
            exported.contains(want),
            "{want} not in the scrape:\n{exposition}"
        );
    }
    let bridge_metrics = exported
        .iter()
        .filter(|n| n.starts_with("darkwatch_bridge_"))
        .count();
    assert!(bridge_metrics >= 10, "{exported:?}");
    // The agent's recording rules are the agent's: the bridge's dashboard takes none.
    let used = check_dashboard(BRIDGE_DASHBOARD, &exposition, &BTreeSet::new());
    assert!(used.len() >= 10, "{used:?}");
}

/// Each alerting rule has what Alertmanager routes and shows by; recording rules follow the
/// `level:metric:operations` naming; the README says what each alert means.
#[test]
fn every_alerting_rule_has_a_duration_a_severity_and_a_summary() {
    let rules = rules();
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let mut alerts = BTreeSet::new();
    for rule in &rules {
        let expr = field(rule, &["expr"]).unwrap_or_default();
        if let Some(record) = field(rule, &["record"]) {
            assert_eq!(
                record.split(':').count(),
                3,
                "{record}: level:metric:operations"
            );
            assert!(!expr.trim().is_empty(), "{record}: no expr");
            continue;
        }
        let alert =
            field(rule, &["alert"]).unwrap_or_else(|| panic!("neither alert nor record: {rule:?}"));
        assert!(alerts.insert(alert), "{alert}: twice");
        assert!(alert.starts_with("Darkwatch"), "{alert}");
        assert!(!expr.trim().is_empty(), "{alert}: no expr");
        let duration = field(rule, &["for"]).unwrap_or_else(|| panic!("{alert}: no `for`"));
        assert!(
            duration.starts_with(|c: char| c.is_ascii_digit())
                && duration
                    .chars()
                    .all(|c| c.is_ascii_digit() || "smhdwy".contains(c))
                && !duration.ends_with(|c: char| c.is_ascii_digit()),
            "{alert}: for: {duration:?} is not a Prometheus duration"
        );
        let severity = field(rule, &["labels", "severity"])
            .unwrap_or_else(|| panic!("{alert}: no labels.severity"));
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{alert}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            let text = field(rule, &["annotations", annotation])
                .unwrap_or_else(|| panic!("{alert}: no annotations.{annotation}"));
            assert!(!text.trim().is_empty(), "{alert}: empty {annotation}");
        }
        assert!(
            readme.contains(&format!("`{alert}`")),
            "{alert} is not explained in README.md"
        );
    }
    for required in [
        "DarkwatchDown",
        "DarkwatchMqttDisconnected",
        "DarkwatchFramesDropped",
        "DarkwatchAlertsSpoolDropped",
        "DarkwatchAlertsRejected",
        "DarkwatchStreamsSilent",
        "DarkwatchNoFramesScored",
        "DarkwatchScoringLatencyHigh",
        "DarkwatchMqttReconnectStorm",
    ] {
        assert!(alerts.contains(required), "no {required} in {RULES}");
    }
    // One target down of many fires, for that target: `up == 0` per target, no
    // aggregation that waits for all of them (`sum(up) == 0`).
    for (alert, job) in [
        ("DarkwatchDown", "darkwatch"),
        ("DarkwatchBridgeDown", "darkwatch-alertmanager"),
    ] {
        let rule = rules
            .iter()
            .find(|r| field(r, &["alert"]) == Some(alert))
            .unwrap_or_else(|| panic!("no {alert} in {RULES}"));
        assert_eq!(
            field(rule, &["expr"]).map(str::trim),
            Some(format!(r#"up{{job="{job}"}} == 0"#).as_str()),
            "{alert} watches each target of job {job} alone"
        );
    }
}

/// Each dashboard imports: a Prometheus datasource variable that every query uses, `job`
/// and `instance` variables that every query filters by, unique panel ids, and panels
/// that fit the 24-column grid; the two have different uids and titles (an import would
/// replace the other).
#[test]
fn the_dashboards_are_importable_with_unique_panel_ids_and_filtered_queries() {
    let mut uids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for file in DASHBOARDS {
        let dash = dashboard(file);
        check_importable(file, &dash);
        assert!(uids.insert(dash["uid"].to_string()), "{file}: uid twice");
        assert!(
            titles.insert(dash["title"].to_string()),
            "{file}: title twice"
        );
    }
}

/// The checks of [`the_dashboards_are_importable_with_unique_panel_ids_and_filtered_queries`]
/// on one dashboard.
fn check_importable(file: &str, dash: &serde_json::Value) {
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(
        (36..=41).contains(&schema),
        "{file}: schemaVersion {schema}"
    );
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{file}: title"
    );
    assert!(
        dash["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "{file}: uid"
    );
    let vars: BTreeMap<&str, &serde_json::Value> = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect();
    let ds = vars
        .get("datasource")
        .unwrap_or_else(|| panic!("{file}: no datasource variable"));
    assert_eq!(ds["type"], "datasource", "{file}");
    assert_eq!(ds["query"], "prometheus", "{file}");
    for name in ["job", "instance"] {
        let v = vars
            .get(name)
            .unwrap_or_else(|| panic!("{file}: no {name} variable"));
        assert_eq!(v["type"], "query", "{file}: {name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{file}: {name}");
    }
    let mut ids = BTreeSet::new();
    let all = panels(dash);
    assert!(all.len() > 10, "{file}: {} panels", all.len());
    for p in &all {
        let title = format!("{file}: {}", p["title"].as_str().unwrap_or_default());
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} twice ({title})");
        let pos = &p["gridPos"];
        let (x, w, h) = (pos["x"].as_u64(), pos["w"].as_u64(), pos["h"].as_u64());
        let (Some(x), Some(w), Some(h)) = (x, w, h) else {
            panic!("{title}: gridPos {pos}");
        };
        assert!(
            pos["y"].as_u64().is_some() && w > 0 && h > 0 && x + w <= 24,
            "{title}: {pos}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: panel {id} has no title"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId twice"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains(r#"job=~"$job""#) && expr.contains(r#"instance=~"$instance""#),
                "{title}: {expr} does not filter by $job and $instance"
            );
        }
    }
}

/// The status panels of both dashboards (targets up, MQTT connected) and the metric each
/// reads per target (0 out, 1 fine).
const STATUS_PANELS: [(&str, &str, &str); 4] = [
    (DASHBOARD, "Agents up", "up"),
    (DASHBOARD, "MQTT connected", "darkwatch_mqtt_connected"),
    (BRIDGE_DASHBOARD, "Bridges up", "up"),
    (
        BRIDGE_DASHBOARD,
        "MQTT connected",
        "darkwatch_bridge_mqtt_connected",
    ),
];

/// What each status panel is judged on: the metric's value on each of three targets, and
/// whether the panel must show red.
const OUTAGES: [(&[f64], bool); 5] = [
    (&[1.0, 1.0, 1.0], false),
    (&[1.0, 0.0, 1.0], true),
    (&[0.0, 0.0, 1.0], true),
    (&[0.0, 0.0, 0.0], true),
    // Nothing scraped (every target gone from discovery, or a wrong job): Grafana colours
    // "no value" with the base step, green, so a query must give a value to colour (a
    // review).
    (&[], true),
];

/// A status panel's query evaluated over `values` (one series of `metric` per target), for
/// the forms a status panel may take: `sum`, `count`, `min` or `max` of `metric`,
/// `1 - metric`, or `metric == 0`, optionally `or vector(N)`. `None` is Prometheus's empty
/// result (Grafana's "no value"). Another form fails: teach it here, and promtool checks it.
fn evaluate_status_query(expr: &str, metric: &str, values: &[f64]) -> Option<f64> {
    let compact: String = expr
        .replace(r#"{job=~"$job", instance=~"$instance"}"#, "")
        .split_whitespace()
        .collect();
    let (query, fallback) = match compact.split_once("orvector(") {
        Some((q, n)) => (q, Some(n.trim_end_matches(')').parse::<f64>().unwrap())),
        None => (compact.as_str(), None),
    };
    let unknown = format!("{expr}: not a form this test can evaluate");
    let (aggregation, inner) = query
        .strip_suffix(')')
        .and_then(|q| q.split_once('('))
        .unwrap_or_else(|| panic!("{unknown}"));
    let vector: Vec<f64> = if inner == metric {
        values.to_vec()
    } else if inner == format!("1-{metric}") {
        values.iter().map(|v| 1.0 - v).collect()
    } else if inner == format!("{metric}==0") {
        values.iter().copied().filter(|&v| v == 0.0).collect()
    } else {
        panic!("{unknown}")
    };
    let result = (!vector.is_empty()).then(|| match aggregation {
        "sum" => vector.iter().sum(),
        "count" => vector.len() as f64,
        "min" => vector.iter().copied().fold(f64::INFINITY, f64::min),
        "max" => vector.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        _ => panic!("{unknown}"),
    });
    result.or(fallback)
}

/// The colour a stat panel gives the field of query `ref_id` at `value`: its field
/// config's defaults, then the overrides that match `ref_id`; a fixed colour, or the
/// thresholds' step the value reaches; `None` for no value.
fn stat_colour(panel: &serde_json::Value, ref_id: &str, value: Option<f64>) -> Option<String> {
    let mut config = panel["fieldConfig"]["defaults"].clone();
    for o in panel["fieldConfig"]["overrides"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if o["matcher"]["id"] == "byFrameRefID" && o["matcher"]["options"] == ref_id {
            for p in o["properties"].as_array().into_iter().flatten() {
                config[p["id"].as_str().unwrap()] = p["value"].clone();
            }
        }
    }
    let value = value?;
    if config["color"]["mode"] == "fixed" {
        return config["color"]["fixedColor"].as_str().map(String::from);
    }
    assert_eq!(config["color"]["mode"], "thresholds", "{}", panel["title"]);
    config["thresholds"]["steps"]
        .as_array()
        .expect("thresholds.steps")
        .iter()
        .rfind(|s| s["value"].as_f64().is_none_or(|t| value >= t))
        .and_then(|s| s["color"].as_str())
        .map(String::from)
}

/// Each status panel turns red when one target of three is out, not only when all are:
/// a `sum(up)` with red below 1 reads 2 and stays green while a third of the bridges is
/// down. And it stays free of red while all are fine. The queries are evaluated here by
/// [`evaluate_status_query`], and by promtool too when it is at hand.
#[test]
fn status_panels_turn_red_when_one_target_of_three_is_out() {
    let mut promtool_cases = String::new();
    for (file, title, metric) in STATUS_PANELS {
        let dash = dashboard(file);
        let panel = panels(&dash)
            .into_iter()
            .find(|p| p["type"] == "stat" && p["title"] == title)
            .unwrap_or_else(|| panic!("{file}: no stat panel {title:?}"));
        for (values, want_red) in OUTAGES {
            let mut colours = Vec::new();
            let mut series = String::new();
            for (i, v) in values.iter().enumerate() {
                series.push_str(&format!(
                    "      - series: '{metric}{{job=\"darkwatch\", instance=\"n{i}:9464\"}}'\n        values: '{v}'\n"
                ));
            }
            let mut exprs = String::new();
            for t in panel["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().unwrap();
                let ref_id = t["refId"].as_str().unwrap();
                let value = evaluate_status_query(expr, metric, values);
                colours.push((ref_id, value, stat_colour(panel, ref_id, value)));
                let samples = match value {
                    Some(v) => format!("\n          - labels: '{{}}'\n            value: {v}"),
                    None => " []".into(),
                };
                let filled = expr.replace("$job", "darkwatch").replace("$instance", ".*");
                exprs.push_str(&format!(
                    "      - expr: {}\n        eval_time: 0m\n        exp_samples:{samples}\n",
                    serde_json::to_string(&filled).unwrap()
                ));
            }
            let red = colours.iter().any(|(_, _, c)| c.as_deref() == Some("red"));
            assert_eq!(
                red, want_red,
                "{file} {title:?} with {metric} {values:?} per target: fields (refId, value, colour) {colours:?}"
            );
            if values.is_empty() {
                continue;
            }
            promtool_cases.push_str(&format!(
                "  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n{exprs}"
            ));
        }
    }
    let Some(promtool) = promtool("the status panels' values are not checked by Prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status-panels.test.yml");
    let text = format!("rule_files: []\nevaluation_interval: 1m\ntests:\n{promtool_cases}");
    std::fs::write(&file, &text).unwrap();
    // Fails where promtool's value differs from this test's (`exp_samples`).
    promtool_rules(&promtool, "test", &file, &text);
}

/// The dashboards' queries parse as PromQL (their variables filled in), by promtool's own
/// parser, when promtool is at hand (`PROMTOOL`, else `promtool` on `PATH`).
#[test]
fn the_dashboard_queries_parse_with_promtool_when_it_is_at_hand() {
    let Some(promtool) = promtool("the dashboards' PromQL is not parsed (.ci/run fetches it)")
    else {
        return;
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries = DASHBOARDS.iter().flat_map(|file| {
        dashboard_queries(&dashboard(file))
            .into_iter()
            .map(move |(place, expr, variable)| (format!("{file} {place}"), expr, variable))
    });
    for (i, (place, expr, variable)) in queries.enumerate() {
        let expr = if variable {
            // label_values(<selector>, <label>): the selector is PromQL.
            match variable_query_names(&expr).into_iter().next() {
                Some(metric) => metric,
                None => continue,
            }
        } else {
            expr
        };
        let filled = [
            ("$__rate_interval", "5m"),
            ("$__range", "1h"),
            ("$__interval", "1m"),
            ("$job", "darkwatch"),
            ("$instance", ".*"),
            ("$stream", ".*"),
        ]
        .iter()
        .fold(expr, |e, (var, value)| e.replace(var, value));
        assert!(
            !filled.contains('$'),
            "{place}: an unknown variable in {filled}"
        );
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&filled).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    promtool_rules(&promtool, "check", &file, &rules);
}

/// `promtool check rules` and `promtool test rules` on the shipped files (as `.ci/run`
/// does), when promtool is at hand: a rule edited without its unit tests fails here too.
#[test]
fn the_rules_pass_promtool_check_and_their_unit_tests_when_it_is_at_hand() {
    let Some(promtool) = promtool("the rules are not unit-tested here") else {
        return;
    };
    for (command, file) in [
        ("check", RULES),
        ("test", "deploy/prometheus/darkwatch-rules.test.yml"),
    ] {
        promtool_rules(&promtool, command, &repo(file), "");
    }
}

/// `promtool <command> rules <file>`, which must succeed; a failure shows promtool's
/// output, then `context` (what the file holds).
fn promtool_rules(promtool: &str, command: &str, file: &Path, context: &str) {
    let out = std::process::Command::new(promtool)
        .args([command, "rules"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {command} rules {}:\n{}{}\n{context}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// promtool (`PROMTOOL`, else `promtool` on `PATH`) when it runs; otherwise a note saying
/// what is `skipped`, and `None`.
fn promtool(skipped: &str) -> Option<String> {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let found = std::process::Command::new(&promtool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Some(promtool)
    } else {
        eprintln!("note: no promtool ({promtool}); {skipped}");
        None
    }
}
