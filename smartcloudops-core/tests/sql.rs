//! The `sql` prep stage on real batches: filters, derived columns, a reference-table join
//! that turns columns into labels, plans that must not carry one batch into the next, and
//! every way it can fail — at start-up with the query position, at run time into the
//! dead-letter output.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use smartcloudops_core::config::PipelineConfig;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::prep::{Prep, ReferenceTable, SqlConfig, SqlPrep};
use smartcloudops_core::schema::{MetricsBatchBuilder, MetricsColumns, metrics_schema, series_id};
use smartcloudops_core::source::{FileSource, FileSourceConfig};
use smartcloudops_core::{Error, Pipeline};
use tokio_util::sync::CancellationToken;

/// One input row: ts, metric, labels, value.
type Row<'a> = (i64, &'a str, &'a [(&'a str, &'a str)], f64);
/// One output row: metric, sorted labels, value.
type OutRow = (String, Vec<(String, String)>, f64);

fn batch(rows: &[Row<'_>]) -> RecordBatch {
    let mut b = MetricsBatchBuilder::default();
    for (ts, metric, labels, value) in rows {
        b.push(*ts, metric, labels, *value);
    }
    b.finish()
}

fn sql(query: &str) -> SqlConfig {
    SqlConfig {
        query: query.into(),
        tables: Vec::new(),
        into_labels: Vec::new(),
    }
}

fn hosts_csv(dir: &Path) -> ReferenceTable {
    let path = dir.join("hosts.csv");
    std::fs::write(
        &path,
        "host,service,owner,tier\nweb-1,checkout,team-a,1\nweb-2,checkout,team-a,1\ndb-1,orders,team-b,2\n",
    )
    .unwrap();
    ReferenceTable {
        name: "hosts".into(),
        path,
        format: None,
    }
}

/// (metric, sorted labels, value) of every output row.
fn rows(out: &RecordBatch) -> Vec<OutRow> {
    let c = MetricsColumns::try_new(out, "test").unwrap();
    (0..out.num_rows())
        .map(|r| (c.metric(r).to_owned(), c.labels(r), c.value.value(r)))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn filters_derives_and_keeps_the_canonical_schema() {
    let mut prep = SqlPrep::new(
        &sql("SELECT ts, \
                 CASE WHEN metric LIKE 'cpu%' THEN upper(metric) ELSE metric END AS metric, \
                 labels, \
                 CAST(value AS DOUBLE) / 100 AS value, \
                 regexp_replace(labels['host'], '-[0-9]+$', '') AS role \
              FROM input \
              WHERE value >= 10 AND regexp_like(labels['host'], '^(web|db)-')"),
        metrics_schema(),
    )
    .unwrap();
    let input = batch(&[
        (1_000, "cpu", &[("host", "web-1")], 50.0),
        (1_000, "cpu", &[("host", "web-2")], 5.0), // below 10
        (1_000, "mem", &[("host", "db-1")], 80.0),
        (1_000, "cpu", &[("host", "cache-1")], 90.0), // no match
    ]);
    let out = prep.process(&input).unwrap();

    // Canonical columns first, with their types; the derived column after them.
    let schema = out.schema();
    assert_eq!(&schema.fields()[..5], &metrics_schema().fields()[..]);
    assert_eq!(schema.field(5).name(), "role");
    assert_eq!(prep.output_schema(), schema);
    assert_eq!(
        rows(&out),
        vec![
            ("CPU".into(), labels(&[("host", "web-1")]), 0.5),
            ("mem".into(), labels(&[("host", "db-1")]), 0.8),
        ]
    );
    let role = out.column(5).as_string_view_opt().map_or_else(
        || {
            let a = arrow::compute::cast(out.column(5), &DataType::Utf8).unwrap();
            a.as_string::<i32>()
                .iter()
                .map(|v| v.unwrap().to_owned())
                .collect::<Vec<_>>()
        },
        |a| a.iter().map(|v| v.unwrap().to_owned()).collect(),
    );
    assert_eq!(role, ["web", "db"]);
    // The metric changed, so the series id is computed again from the new name.
    let c = MetricsColumns::try_new(&out, "t").unwrap();
    assert_eq!(c.series_id.value(0), series_id("CPU", &[("host", "web-1")]));
}

#[test]
fn a_reference_table_join_turns_columns_into_labels() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqlConfig {
        query: "SELECT i.ts, i.metric, i.labels, i.value, h.service, h.owner \
                FROM input i LEFT JOIN hosts h ON i.labels['host'] = h.host"
            .into(),
        tables: vec![hosts_csv(dir.path())],
        into_labels: vec!["service".into(), "owner".into()],
    };
    let mut prep = SqlPrep::new(&config, metrics_schema()).unwrap();
    assert_eq!(prep.output_schema(), metrics_schema());
    // `input LEFT JOIN hosts` is run as `hosts RIGHT JOIN input`: the hosts are hashed once.
    assert!(!prep.resets_per_batch(), "{}", prep.explain());

    // Two batches with different hosts: the second must not see the first's join results.
    for (host, service, owner) in [
        ("web-1", Some("checkout"), Some("team-a")),
        ("db-1", Some("orders"), Some("team-b")),
        ("unknown-9", None, None),
    ] {
        let out = prep
            .process(&batch(&[(1, "cpu", &[("host", host), ("zone", "a")], 1.0)]))
            .unwrap();
        let mut want = vec![("host", host), ("zone", "a")];
        want.extend(service.map(|s| ("service", s)));
        want.extend(owner.map(|o| ("owner", o)));
        want.sort();
        assert_eq!(
            rows(&out),
            vec![("cpu".into(), labels(&want), 1.0)],
            "{host}"
        );
        let c = MetricsColumns::try_new(&out, "t").unwrap();
        assert_eq!(c.series_id.value(0), series_id("cpu", &want), "{host}");
    }
}

#[test]
fn state_built_from_one_batch_never_leaks_into_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let queries = [
        // A scalar subquery over the batch itself.
        "SELECT * FROM input WHERE value > (SELECT avg(value) FROM input)",
        // The batch on the build side of a join: its hash table is built per batch.
        "SELECT i.* FROM (SELECT * FROM input) i JOIN (SELECT max(value) AS m FROM input) x \
         ON i.value = x.m",
        // The reference table on either side.
        "SELECT i.ts, i.metric, i.labels, i.value FROM hosts h JOIN input i \
         ON i.labels['host'] = h.host WHERE h.tier = 1",
        "SELECT i.ts, i.metric, i.labels, i.value FROM input i JOIN hosts h \
         ON i.labels['host'] = h.host WHERE h.tier = 1",
        // A top-k sort keeps its threshold in the plan.
        "SELECT * FROM input ORDER BY value DESC LIMIT 1",
    ];
    let first = batch(&[
        (1, "cpu", &[("host", "web-1")], 1.0),
        (1, "cpu", &[("host", "db-1")], 3.0),
    ]);
    let second = batch(&[
        (2, "cpu", &[("host", "web-2")], 10.0),
        (2, "cpu", &[("host", "db-1")], 30.0),
        (2, "cpu", &[("host", "web-1")], 20.0),
    ]);
    let expected: [(&[f64], &[f64]); 5] = [
        (&[3.0], &[30.0]),
        (&[3.0], &[30.0]),
        (&[1.0], &[10.0, 20.0]),
        (&[1.0], &[10.0, 20.0]),
        (&[3.0], &[30.0]),
    ];
    for (query, (want1, want2)) in queries.iter().zip(expected) {
        let config = SqlConfig {
            tables: vec![hosts_csv(dir.path())],
            ..sql(query)
        };
        let mut prep = SqlPrep::new(&config, metrics_schema()).unwrap();
        // State from `input` is rebuilt per batch; a reference table's hash table is kept
        // whichever side of the join the query names it on.
        let from_input = !query.contains("hosts") || query.contains("LIMIT");
        assert_eq!(prep.resets_per_batch(), from_input, "{}", prep.explain());
        for (input, want) in [(&first, want1), (&second, want2), (&first, want1)] {
            let out = prep.process(input).unwrap();
            let mut values: Vec<f64> = rows(&out).into_iter().map(|r| r.2).collect();
            values.sort_by(f64::total_cmp);
            assert_eq!(values, want, "{query}");
        }
    }
}

/// Unions, merges and big sorts spawn tasks even on one partition; on a pipeline worker
/// (here the test's single-threaded runtime) waiting for them would hang.
#[tokio::test]
async fn operators_that_spawn_tasks_run_on_the_stages_own_runtime() {
    let mut prep = SqlPrep::new(
        &sql("SELECT ts, metric, labels, sum(value) AS value FROM ( \
                SELECT * FROM input WHERE value < 10 \
                UNION ALL SELECT * FROM input WHERE value >= 10 \
              ) GROUP BY ts, metric, labels ORDER BY value"),
        metrics_schema(),
    )
    .unwrap();
    for round in 0..3 {
        let rows_in: Vec<(String, f64)> = (0..500)
            .map(|i| (format!("h{i}"), f64::from(i % 20 + round)))
            .collect();
        let mut b = MetricsBatchBuilder::default();
        for (host, v) in &rows_in {
            b.push(1, "cpu", &[("host", host.as_str())], *v);
        }
        let out = prep.process(&b.finish()).unwrap();
        let values: Vec<f64> = rows(&out).into_iter().map(|r| r.2).collect();
        assert_eq!(values.len(), 500);
        assert!(values.is_sorted_by(|a, b| a <= b), "ordered by value");
        assert_eq!(
            values.iter().sum::<f64>(),
            rows_in.iter().map(|r| r.1).sum::<f64>()
        );
    }
}

#[test]
fn a_parquet_reference_table_works_like_csv() {
    use datafusion::parquet::arrow::ArrowWriter;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owners.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("host", DataType::Utf8, false),
        Field::new("owner", DataType::Utf8, false),
    ]));
    let table = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["web-1", "db-1"])),
            Arc::new(StringArray::from(vec!["team-a", "team-b"])),
        ],
    )
    .unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
    writer.write(&table).unwrap();
    writer.close().unwrap();

    let config = SqlConfig {
        query: "SELECT i.*, o.owner FROM input i JOIN owners o ON i.labels['host'] = o.host".into(),
        tables: vec![ReferenceTable {
            name: "owners".into(),
            path,
            format: None,
        }],
        into_labels: vec!["owner".into()],
    };
    let mut prep = SqlPrep::new(&config, metrics_schema()).unwrap();
    let out = prep
        .process(&batch(&[
            (1, "cpu", &[("host", "db-1")], 7.0),
            (1, "cpu", &[("host", "nobody")], 8.0),
        ]))
        .unwrap();
    assert_eq!(
        rows(&out),
        vec![(
            "cpu".into(),
            labels(&[("host", "db-1"), ("owner", "team-b")]),
            7.0
        )]
    );
}

#[test]
fn a_batch_of_another_schema_is_an_error_not_a_crash() {
    let mut prep = SqlPrep::new(&sql("SELECT * FROM input"), metrics_schema()).unwrap();
    let other = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "value",
            DataType::Float64,
            false,
        )])),
        vec![Arc::new(Float64Array::from(vec![1.0]))],
    )
    .unwrap();
    let err = prep.process(&other).unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(
        err.to_string().contains("planned for columns (ts:"),
        "{err}"
    );
    // And the stage still works afterwards.
    assert_eq!(
        prep.process(&batch(&[(1, "cpu", &[], 1.0)]))
            .unwrap()
            .num_rows(),
        1
    );
}

#[test]
fn runtime_failures_and_nulls_are_errors_of_the_batch() {
    let mut prep = SqlPrep::new(
        &sql("SELECT ts, metric, labels, CAST(labels['code'] AS INT) AS value FROM input"),
        metrics_schema(),
    )
    .unwrap();
    let good = batch(&[(1, "http", &[("code", "500")], 1.0)]);
    assert_eq!(rows(&prep.process(&good).unwrap())[0].2, 500.0);
    let bad = batch(&[(1, "http", &[("code", "oops")], 1.0)]);
    let err = prep.process(&bad).unwrap_err();
    assert!(matches!(err, Error::Sql(_)), "{err}");
    assert!(err.to_string().contains("oops"), "{err}");
    // A missing label gives NULL: the stage says so rather than inventing a value.
    let missing = batch(&[(1, "http", &[("path", "/")], 1.0)]);
    let err = prep.process(&missing).unwrap_err();
    assert!(
        err.to_string().contains("NULL in `value` for 1 of 1 rows"),
        "{err}"
    );
    assert_eq!(rows(&prep.process(&good).unwrap())[0].2, 500.0);
}

#[test]
fn planning_errors_name_the_field_and_the_query_position() {
    let dir = tempfile::tempdir().unwrap();
    let err = |config: SqlConfig| SqlPrep::new(&config, metrics_schema()).unwrap_err();

    let e = err(sql(
        "SELECT ts, metric, labels,\n       valu AS value FROM input",
    ));
    assert_eq!(e.field, "query");
    assert!(e.message.starts_with("line 2, column 8:"), "{e}");
    assert!(e.message.contains("valu"), "{e}");
    assert_eq!(
        e.hint.as_deref(),
        Some("           valu AS value FROM input\n           ^")
    );

    let e = err(sql("SELECT * FROM input WHERE"));
    assert!(e.message.starts_with("line 1, column"), "{e}");

    let e = err(sql("SELECT ts, metric, value FROM input"));
    assert!(e.message.contains("no `labels` column"), "{e}");

    let e = err(sql("SELECT ts, metric, labels, 'high' AS value FROM input"));
    assert!(e.message.contains("column `value` is Utf8"), "{e}");

    let e = err(sql("DROP TABLE input"));
    assert_eq!(e.field, "query");

    let e = err(SqlConfig {
        into_labels: vec!["service".into()],
        ..sql("SELECT * FROM input")
    });
    assert!(e.message.contains("into_labels names `service`"), "{e}");

    let e = err(SqlConfig {
        tables: vec![ReferenceTable {
            name: "hosts".into(),
            path: dir.path().join("missing.csv"),
            format: None,
        }],
        ..sql("SELECT * FROM input")
    });
    assert_eq!(e.field, "table[0]");
    assert!(e.message.contains("no such file"), "{e}");
}

#[test]
fn validate_reports_sql_errors_at_their_config_path() {
    let dir = tempfile::tempdir().unwrap();
    hosts_csv(dir.path());
    let text = r#"
[source]
type = "generator"

[[prep]]
type = "filter"
include = ["cpu"]

[[prep]]
type = "sql"
query = "SELECT * FROM input JOIN hosts ON labels['host'] = hots.host"
[[prep.table]]
name = "hosts"
path = "hosts.csv"
"#;
    let errors = PipelineConfig::parse(text, dir.path(), |_| None).unwrap_err();
    let e = &errors.0[0];
    assert_eq!(e.path, "prep[1].query", "{errors}");
    assert!(e.message.contains("line 1, column"), "{errors}");

    // Fixed, it plans against the schema the earlier stages produce (the window's columns).
    let fixed = text.replace("hots.host", "hosts.host").replace(
        "type = \"filter\"\ninclude = [\"cpu\"]",
        "type = \"window\"\nsize = \"1m\"",
    );
    let fixed = fixed.replace(
        "SELECT *",
        "SELECT input.* EXCLUDE (window_start), date_trunc('hour', window_start) AS hour",
    );
    let config = PipelineConfig::parse(&fixed, dir.path(), |_| None).unwrap();
    config.build().unwrap();
    // Without the window before it, the same query has no `window_start` to read.
    let alone = fixed.replace("type = \"window\"\nsize = \"1m\"", "type = \"filter\"");
    let errors = PipelineConfig::parse(&alone, dir.path(), |_| None).unwrap_err();
    assert_eq!(errors.0[0].path, "prep[1].query", "{errors}");
    assert!(errors.0[0].message.contains("window_start"), "{errors}");
}

#[tokio::test]
async fn in_a_pipeline_a_failing_batch_is_dead_lettered_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let lines = (0..6).flat_map(|i| {
        // The fourth batch (rows 6, 7) carries a code that is not a number.
        let code = if i == 3 { "boom" } else { "200" };
        (0..2).map(move |j| {
            format!(
                "{{\"ts\":{},\"metric\":\"http\",\"labels\":{{\"code\":\"{code}\",\"n\":\"{j}\"}},\"value\":1}}",
                1000 * i
            )
        })
    });
    let path = common::jsonl_file(dir.path(), "in.jsonl", lines);
    let mut source = FileSourceConfig::new(path);
    source.batch_size = 2;
    let dead = Arc::new(MemoryDeadLetters::default());
    let prep = SqlPrep::new(
        &sql("SELECT ts, metric, labels, CAST(labels['code'] AS INT) AS value FROM input"),
        metrics_schema(),
    )
    .unwrap();
    let report = Pipeline::builder(FileSource::new(source))
        .prep(prep)
        .dead_letters(dead.clone())
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    let letters = dead.letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].stage, "prep:sql");
    assert!(letters[0].reason.contains("boom"), "{}", letters[0].reason);
    assert_eq!(letters[0].payload.lines().count(), 2);
    let stage = report.metrics.stage("prep:sql").unwrap();
    assert_eq!((stage.errors, stage.dead_lettered), (1, 2));
    assert_eq!(report.metrics.batches_acked, 6);
    assert_eq!(stage.rows_out, 10);
}

#[test]
fn labels_values_round_trip_through_the_map_type() {
    // `labels` passed through untouched keeps its exact type, so nothing is cast.
    let mut prep = SqlPrep::new(&sql("SELECT * FROM input"), metrics_schema()).unwrap();
    let input = batch(&[(1, "cpu", &[("a", "1"), ("b", "2")], 1.0)]);
    let out = prep.process(&input).unwrap();
    assert_eq!(out, input);
    assert!(out.column(2).is_valid(0));
}
