//! The `darkwatch` binary: parses arguments, sets up logging, calls the library, and maps
//! errors to exit codes (0 ok, 1 failure, 2 usage, 78 configuration error).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use darkwatch::config::{self, ConfigError, DarkwatchConfig};
use darkwatch::harness;
use darkwatch::ingest::{self, TableOptions};
use darkwatch::model::{self, Model};
use darkwatch::mss::MssConfig;
use darkwatch::replay::{self, ReplayRequest};
use darkwatch::score::HeadKind;

/// Exit status for configuration errors (sysexits EX_CONFIG); the systemd unit does not restart on it.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "darkwatch",
    version,
    about = "Streaming anomaly detection with autoencoders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an autoencoder on a CSV or NPY file and write a model directory.
    Train {
        /// Training data (.csv with a header row, or 2-D .npy).
        #[arg(long)]
        input: PathBuf,
        /// Model directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Configuration file (default: the documented defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Replay a recorded file through the scoring pipeline and evaluate it.
    Replay {
        /// Model directory written by `darkwatch train`.
        #[arg(long)]
        model: PathBuf,
        /// Recorded frames (.csv or .npy) with the model's features.
        #[arg(long)]
        input: PathBuf,
        /// One 0/1 label per input row (1 = anomalous): enables AUROC / AUPRC / F1.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Write one CSV row per frame (score, threshold, alarm, top contributions) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write one JSON line per alert event (Alertmanager-shaped) here.
        #[arg(long)]
        events: Option<PathBuf>,
        /// Draw score, threshold, alert spans and labelled segments into this PNG.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Score with this head instead of the model's own.
        #[arg(long, value_enum)]
        head: Option<HeadArg>,
        /// Turn mean-shift scoring off for this replay (compare with and without MSS).
        #[arg(long, conflicts_with_all = ["mss_rounds", "mss_neighbours"])]
        no_mss: bool,
        /// Mean-shift rounds m for this replay (default: the model's own).
        #[arg(long)]
        mss_rounds: Option<usize>,
        /// Mean-shift neighbourhood k for this replay (default: the model's own).
        #[arg(long)]
        mss_neighbours: Option<usize>,
        /// Pace the replay at this many frames per second (default: as fast as possible).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
        /// Configuration file (thresholds, alerts, pipeline; default: the documented defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the agent: subscribe to MQTT, score every frame, publish alerts (until SIGTERM/SIGINT).
    Run {
        /// Configuration file ([agent] model_dir, [mqtt], [assemble], [spool], …).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Everything on this machine: an embedded broker, a publisher replaying a recorded
    /// stream as ExaMon messages, the agent, and a subscriber counting alerts.
    Demo {
        #[arg(long, default_value = "models/smd-machine-1-6")]
        model: PathBuf,
        #[arg(long, default_value = "tests/data/smd/machine-1-6_test.npy")]
        input: PathBuf,
        #[arg(long, default_value = "tests/data/smd/machine-1-6_test_label.txt")]
        labels: PathBuf,
        /// First row replayed.
        #[arg(long, default_value_t = 17_500)]
        start: usize,
        /// Rows replayed (each becomes one ExaMon message per metric).
        #[arg(long, default_value_t = 4_000)]
        frames: usize,
        /// Configuration file (thresholds, alerts; the demo sets broker, spool and windows).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Train and replay every SMD machine and ODDS table given; print one table of metrics.
    Harness {
        /// SMD `<machine>_train.npy` files (test and labels beside them), ODDS `.npz`
        /// files, or folders of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// How ODDS tables are split.
        #[arg(long, value_enum, default_value_t = ProtocolArg::FitAll)]
        odds_protocol: ProtocolArg,
        /// Configuration file used for every entity (default: the documented defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Measure scoring latency and throughput on this machine.
    Bench {
        /// Model to time (default: an untrained model of the default shape for 38 features).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Frames timed one at a time.
        #[arg(long, default_value_t = 20_000)]
        frames: usize,
    },
    /// Print a model directory's metadata.
    Inspect {
        /// Model directory written by `darkwatch train`.
        dir: PathBuf,
        /// Print the model's metadata as JSON (what model.json holds) instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file without starting anything.
    Validate {
        /// Configuration file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the effective configuration (file, then environment overrides, over defaults).
    PrintConfig {
        /// Configuration file (default: only the documented defaults and the environment).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// Train on every row, score every row.
    FitAll,
    /// MSS-PAE 50/25/25 split per class; train on 75 %, score 25 %.
    Split,
}

#[derive(Clone, Copy, ValueEnum)]
enum HeadArg {
    Mse,
    MaxAbs,
    Wnll,
}

impl From<HeadArg> for HeadKind {
    fn from(h: HeadArg) -> Self {
        match h {
            HeadArg::Mse => HeadKind::Mse,
            HeadArg::MaxAbs => HeadKind::MaxAbs,
            HeadArg::Wnll => HeadKind::Wnll,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its life cycle (journald keeps it); one-shot commands only warn.
    let default = if matches!(cli.command, Command::Run { .. }) {
        "info,rumqttd=off"
    } else {
        "warn,rumqttd=off"
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // `darkwatch … | head` closing the pipe early is not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("darkwatch: {}", one_line(&e));
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Sends a state to systemd when started with `Type=notify` (a datagram to
/// `$NOTIFY_SOCKET`); does nothing otherwise.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "Could not notify systemd.");
    }
}

/// Sets `stop` on SIGTERM or SIGINT (a small runtime thread waits for them).
fn stop_on_signal(stop: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("darkwatch-signals".into())
        .spawn(move || {
            rt.block_on(async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("Signal received; draining and stopping.");
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        })?;
    Ok(())
}

/// A frame rate: finite, at least 0.001 and at most 1e9 frames per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && (1e-3..=1e9).contains(&r) => Ok(r),
        Ok(_) => Err(format!(
            "{s} is not a frame rate between 0.001 and 1e9 frames per second"
        )),
        Err(_) => Err(format!("{s} is not a number")),
    }
}

/// The error and its causes on one line, leaving out a cause whose text the message
/// before it already shows (our errors embed their I/O cause).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes to stdout, returning (not panicking on) a closed pipe.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn load_config(path: Option<&Path>) -> Result<DarkwatchConfig> {
    Ok(config::load(path, std::env::vars())?)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train { input, out, config } => train(&input, &out, config.as_deref()),
        Command::Replay {
            model,
            input,
            labels,
            out,
            events,
            plot,
            head,
            rate,
            config,
            no_mss,
            mss_rounds,
            mss_neighbours,
        } => {
            let cfg = load_config(config.as_deref())?;
            let mss = if no_mss {
                Some(MssConfig {
                    rounds: 0,
                    ..cfg.mss
                })
            } else if mss_rounds.is_some() || mss_neighbours.is_some() {
                let model_mss = Model::load(&model)?.meta.mss;
                let m = MssConfig {
                    rounds: mss_rounds.unwrap_or(model_mss.rounds.max(1)),
                    neighbours: mss_neighbours.unwrap_or(model_mss.neighbours),
                    ..model_mss
                };
                m.validate().map_err(|(k, r)| match k {
                    "bank_frames" => anyhow::anyhow!(
                        "--mss-neighbours {}: the model's reference bank holds only {} frames",
                        m.neighbours,
                        m.bank_frames
                    ),
                    _ => anyhow::anyhow!("--mss-{}: {r}", k.replace('_', "-")),
                })?;
                Some(m)
            } else {
                None
            };
            let req = ReplayRequest {
                model_dir: model,
                input,
                labels,
                out_csv: out,
                events,
                plot,
                rate,
                head: head.map(Into::into),
                mss,
            };
            let outcome = replay::replay(&req, &cfg)?;
            emit(&outcome.to_string())?;
            for (what, path) in [
                ("scores", &req.out_csv),
                ("events", &req.events),
                ("plot", &req.plot),
            ] {
                if let Some(path) = path {
                    emit(&format!("{what:<11} {}\n", path.display()))?;
                }
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = load_config(config.as_deref())?;
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            stop_on_signal(stop.clone())?;
            // Fail before telling systemd we are ready if the model cannot be loaded.
            Model::load(&cfg.agent.model_dir)?;
            sd_notify("READY=1\nSTATUS=scoring");
            let counters = Arc::new(darkwatch::agent::AgentCounters::default());
            let report = darkwatch::agent::run(&cfg, stop, counters, false);
            sd_notify("STOPPING=1");
            let report = report?;
            let c = &report.counters;
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "darkwatch: stopped after {} messages ({} undecodable, {} samples rejected), {} frames ({} incomplete, {} dropped at the ring), {} frames scored, {} alerts",
                load(&c.messages),
                load(&c.decode_errors),
                load(&c.samples_rejected),
                load(&c.frames),
                load(&c.frames_incomplete),
                report.pipeline.frames_dropped,
                report.pipeline.frames_scored,
                report.events.len()
            );
            Ok(())
        }
        Command::Demo {
            model,
            input,
            labels,
            start,
            frames,
            config,
        } => {
            let cfg = load_config(config.as_deref())?;
            let opts = darkwatch::demo::DemoOptions {
                model_dir: model,
                input,
                labels: Some(labels),
                start,
                frames,
            };
            eprintln!(
                "darkwatch: demo: embedded broker, publisher, agent and subscriber starting…"
            );
            emit(&darkwatch::demo::run(&opts, &cfg)?.to_string())
        }
        Command::Harness {
            paths,
            odds_protocol,
            config,
        } => {
            let cfg = load_config(config.as_deref())?;
            let protocol = match odds_protocol {
                ProtocolArg::FitAll => harness::OddsProtocol::FitAll,
                ProtocolArg::Split => harness::OddsProtocol::Split,
            };
            let entities = harness::discover(&paths)?;
            let mut results = Vec::new();
            for (i, e) in entities.iter().enumerate() {
                eprintln!("darkwatch: [{}/{}] {}", i + 1, entities.len(), e.name());
                results.push(harness::run_entity(e, &cfg, protocol)?);
            }
            emit(&harness::table(&results, &cfg))
        }
        Command::Bench { model, frames } => {
            let model = match model {
                Some(dir) => Model::load(&dir)?,
                None => model::fit::synthetic(38, 0),
            };
            let opts = darkwatch::bench::BenchOptions {
                latency_frames: frames.max(100),
                ..Default::default()
            };
            eprintln!("darkwatch: timing each head (about 15 s)…");
            emit(&darkwatch::bench::run(Arc::new(model), &opts).to_string())?;
            Ok(())
        }
        Command::Inspect { dir, json } => {
            let model = Model::load(&dir)?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&model.meta)?))?;
            } else {
                emit(&model::io::describe(&model, &dir))?;
            }
            Ok(())
        }
        Command::Validate { config } => {
            load_config(Some(&config))?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::PrintConfig { config } => {
            emit(&load_config(config.as_deref())?.to_toml())?;
            Ok(())
        }
    }
}

fn train(input: &Path, out: &Path, config: Option<&Path>) -> Result<()> {
    let cfg = load_config(config)?;
    let opts = TableOptions {
        timestamp_column: Some(cfg.input.timestamp_column.clone()).filter(|s| !s.is_empty()),
    };
    // Find out now, not after training, whether the model can be written.
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the model directory", out.display()))?;
    let table = ingest::read_table(input, &opts)?;
    let sha = ingest::file_sha256(input)?;
    eprintln!(
        "darkwatch: training on {} ({} rows × {} features)",
        input.display(),
        table.values.nrows(),
        table.values.ncols()
    );
    let bar = ProgressBar::new(cfg.train.epochs_max as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (model, report) = model::fit::fit(&table, &sha, &cfg, &mut |e| {
        bar.set_position(e.epoch as u64);
        match e.val_loss {
            Some(v) => bar.set_message(format!("loss {:.4} val {:.4}", e.train_loss, v)),
            None => bar.set_message(format!("loss {:.4}", e.train_loss)),
        }
    })
    .context("training failed")?;
    bar.finish_and_clear();
    model.save(out)?;
    if report.epochs_run == cfg.train.epochs_max
        && !report.stopped_early
        && report.best_epoch == report.epochs_run
    {
        eprintln!(
            "darkwatch: note: validation loss was still falling at epoch {}; a larger [train] epochs_max may fit better",
            report.epochs_run
        );
    }
    let p = &model.meta.provenance;
    println!(
        "trained {} in {:.1} s: {} epochs (best {}{}), train loss {:.4}, validation loss {}",
        model.meta.id,
        p.train_seconds,
        report.epochs_run,
        report.best_epoch,
        if report.stopped_early {
            ", stopped early"
        } else {
            ""
        },
        report.train_losses.last().copied().unwrap_or(f64::NAN),
        report
            .best_val_loss
            .map_or("n/a".into(), |v| format!("{v:.4}")),
    );
    println!(
        "calibration: training scores q0.99 {:.4}, q0.999 {:.4}",
        model.meta.calibration.quantile(0.99).unwrap_or(f32::NAN),
        model.meta.calibration.quantile(0.999).unwrap_or(f32::NAN)
    );
    println!("wrote {}", out.display());
    Ok(())
}
