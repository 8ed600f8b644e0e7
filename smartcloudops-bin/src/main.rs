//! `smartcloudops`: run and validate SmartCloudOps pipelines described in TOML.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
mod audit;
mod eval;
mod plot;

use smartcloudops_core::config::PipelineConfig;
use smartcloudops_core::detector::Preset;
use smartcloudops_core::{RunReport, pipeline::MetricsSnapshot};
use tracing_subscriber::EnvFilter;

/// Streaming anomaly detection and automated response for cloud metrics.
///
/// A pipeline reads metrics from a source (a file, a generator, …), scores every sample
/// per series with a streaming detector and hands anomalies to actions (print, write,
/// notify). Describe one in a TOML file — see examples/quickstart.toml — then:
///
///   smartcloudops validate pipeline.toml   # check it, every error with its field
///   smartcloudops run pipeline.toml        # run until the input ends or Ctrl-C
#[derive(Debug, Parser)]
#[command(name = "smartcloudops", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// More logging on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline until its source ends, or until Ctrl-C / SIGTERM (then drain and exit).
    ///
    /// Alerts go where the config's actions send them (the `log` action prints to stdout);
    /// logs and the final report go to stderr. Exit status: 0 when every batch was
    /// acknowledged, 1 on a runtime error, 2 on a configuration error, 3 when some batches
    /// were not fully processed (nacked).
    Run {
        /// The pipeline configuration (TOML).
        config: PathBuf,

        /// Format of the report printed to stderr at the end.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        report: ReportFormat,
    },
    /// Score a detector (a preset, or any configured one) on a labelled corpus, NAB-style.
    ///
    /// Reads DIR/data/<category>/<file>.csv (timestamp,value), DIR/labels/combined_windows.json
    /// and DIR/config/profiles.json; streams every file through the detector (a fresh one
    /// per file, strictly online); prints the normalized score (0 = the null detector,
    /// 100 = perfect) for each cost profile with its threshold, and per category.
    Eval {
        /// The corpus directory.
        #[arg(long)]
        corpus: PathBuf,

        /// The detector preset to score.
        #[arg(long, value_enum, default_value_t = PresetArg::Precise)]
        preset: PresetArg,

        /// Fix the alert threshold (score in (0, 1]) instead of choosing the best one per
        /// profile; use the printed optimum of a tuning corpus to score unseen data.
        #[arg(long)]
        threshold: Option<f64>,

        /// Write OUT/<category>/<file>.csv with timestamp,value,anomaly_score per file.
        #[arg(long, value_name = "OUT")]
        write_scores: Option<PathBuf>,

        /// Draw OUT/<category>/<file>.svg: values, windows, alerts and scores per file.
        #[arg(long, value_name = "OUT")]
        plot: Option<PathBuf>,

        /// Score a custom ensemble instead of a preset: a TOML file with the fields of
        /// `[detector] type = "ensemble"` (unset fields keep the preset's values).
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        ensemble: Option<PathBuf>,

        /// Score the `[detector]` of a pipeline configuration instead of a preset: any type
        /// (`ewma`, `mad`, `seasonal`, `cusum`, `hst`, `threshold`, an ensemble, a preset
        /// with its sensitivity).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,

        /// Files scored in parallel (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,

        /// Cross-validate: `K` folds of files stratified by category, or `loco` (leave one
        /// category out). The threshold (and with --grid, the parameters) are chosen on the
        /// other folds and scored on the held-out one; reports the pooled held-out score,
        /// the folds' mean and spread, and the in-sample score beside them.
        #[arg(long, value_name = "K|loco", value_parser = eval::parse_cv)]
        cv: Option<smartcloudops_core::eval::FoldScheme>,

        /// Candidate parameters: a TOML file whose keys are ensemble fields' dotted paths and
        /// whose values are lists to try (`rest = [10, 20]`, `"context.length" = [5, 6]`),
        /// laid over the preset or --ensemble; every combination scores the corpus.
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        grid: Option<PathBuf>,

        /// Series in each generated healthy fleet, for the false-alarm budget (0: none).
        #[arg(long, default_value_t = 100)]
        fleet_series: usize,

        /// Days each generated healthy fleet runs (the first one is warm-up).
        #[arg(long, default_value_t = 8)]
        fleet_days: u64,
    },
    /// Check a pipeline configuration and report every error with its field path.
    ///
    /// Exit status 0 when valid, 2 when not.
    Validate {
        /// The pipeline configuration (TOML).
        config: PathBuf,
    },
    /// Work with the decision layer's audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit log and say where it breaks (file, line, seq, and
    /// whether a record was edited, deleted or moved).
    ///
    /// Give the files oldest first (audit.jsonl.2 audit.jsonl.1 audit.jsonl), or the live
    /// file alone: its rotated files are then found and checked first. Exit status: 0 when
    /// the chain holds, 4 when it is broken, 1 when a file cannot be read.
    Verify {
        /// The audit files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PresetArg {
    /// For millions of series: ≤ 1 KiB and millions of points/s per core.
    Fast,
    /// The best quality.
    Precise,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReportFormat {
    /// A short human summary.
    Text,
    /// All pipeline metrics as JSON.
    Json,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_NACKED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Audit {
            command: AuditCommand::Verify { files },
        } => audit::verify(&files),
        Command::Eval {
            corpus,
            preset,
            threshold,
            write_scores,
            plot,
            ensemble,
            config,
            jobs,
            cv,
            grid,
            fleet_series,
            fleet_days,
        } => {
            let args = eval::EvalArgs {
                corpus,
                preset: match preset {
                    PresetArg::Fast => Preset::Fast,
                    PresetArg::Precise => Preset::Precise,
                },
                threshold,
                write_scores,
                plot,
                ensemble,
                config,
                jobs: jobs.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
                }),
                cv,
                grid,
                fleet_series,
                fleet_days,
            };
            match eval::eval(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Run { config, report } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let code = runtime.block_on(run(config, report));
            // A blocking stdin read cannot be cancelled: do not wait for it.
            runtime.shutdown_background();
            code
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn load(path: &Path) -> Result<PipelineConfig, ExitCode> {
    PipelineConfig::load(path).map_err(|errors| {
        eprintln!("{}: {errors}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn validate(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            println!("{}: ok — {}", path.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn run(path: PathBuf, format: ReportFormat) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match run_pipeline(&config).await {
        Ok(report) => {
            print_report(&report, format);
            if report.metrics.batches_nacked > 0 {
                ExitCode::from(EXIT_NACKED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn run_pipeline(config: &PipelineConfig) -> anyhow::Result<RunReport> {
    tracing::info!("starting pipeline — {}", config.summary());
    let pipeline = config.build().context("building the pipeline")?;
    let handle = pipeline.spawn();
    let shutdown = handle.shutdown_token();
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight batches (signal again to exit now)");
        shutdown.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    let report = handle.wait().await.context("running the pipeline");
    signals.abort();
    report
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn print_report(report: &RunReport, format: ReportFormat) {
    match format {
        ReportFormat::Json => {
            let json = serde_json::json!({
                "elapsed_seconds": report.elapsed.as_secs_f64(),
                "timed_out": report.timed_out,
                "metrics": report.metrics,
            });
            eprintln!("{json}");
        }
        ReportFormat::Text => {
            eprintln!("{}", summary(&report.metrics, report.elapsed.as_secs_f64()))
        }
    }
}

fn summary(m: &MetricsSnapshot, seconds: f64) -> String {
    let rows = m.rows_acked + m.rows_nacked;
    let rate = if seconds > 0.0 {
        rows as f64 / seconds
    } else {
        0.0
    };
    format!(
        "done: {rows} rows in {seconds:.2} s ({rate:.0} rows/s); {} alerts; {} dead-lettered; \
         {} batches acknowledged, {} not ({} rows)",
        m.alerts,
        m.dead_lettered(),
        m.batches_acked,
        m.batches_nacked,
        m.rows_nacked,
    )
}
