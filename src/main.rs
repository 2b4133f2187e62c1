//! The `darkwatch` binary: parses arguments, sets up logging, calls the library, and maps
//! errors to exit codes (0 ok, 1 failure, 2 usage, 78 configuration error).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use darkwatch::agent::{AgentCounters, AgentError, Control, Reload};
use darkwatch::config::{self, Backend, ConfigError, DarkwatchConfig};
use darkwatch::detector::{Detector, LoadError};
use darkwatch::harness;
use darkwatch::ingest::{self, TableOptions};
use darkwatch::model::{self, Model};
use darkwatch::mss::MssConfig;
use darkwatch::replay::{self, ReplayRequest};
use darkwatch::score::HeadKind;
use darkwatch::systemd::{self, Notifier};

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
    ///
    /// Without a terminal (a pipe, CI, journald), progress is one line per epoch, at most
    /// every 5 s, and the last.
    Train {
        /// Training data: .csv with a header row naming the columns (pandas' to_csv
        /// defaults work: column names 0..d-1, and an index column of 0,1,2,… is skipped),
        /// .npy (2-D rows × features, or 1-D for one feature; either byte order), or .npz
        /// (its array X). A column named like labels (label, is_anomaly, …) is warned
        /// about; text columns must be dropped. CSV gaps (empty, NaN, Inf, null, NA, N/A
        /// cells) take the column's last value (its mean before its first; with
        /// --table always its mean), with one warning; a file over half gaps, or a column with no value, is refused. Timestamps:
        /// epoch seconds or ISO 8601 dates and date-times (UTC without an offset).
        #[arg(long)]
        input: PathBuf,
        /// Model folder to write (created if missing; not a file).
        #[arg(long)]
        out: PathBuf,
        /// Configuration file (default: the documented defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replace a model already in OUT (and remove its ONNX graph, which was exported
        /// from the old model).
        #[arg(long)]
        force: bool,
        /// The input is a table whose rows have no order (an ODDS / ADBench set, not a time
        /// series): scores are not averaged over rows (smooth_frames 1) and no row gets a
        /// lag window of the rows before it (window_frames 1), whatever the configuration
        /// says. The model records it: `replay` of it scores its input as a table, as
        /// `replay --table` does, and `inspect` says "trained as a table".
        #[arg(long)]
        table: bool,
    },
    /// Replay a recorded file through the scoring pipeline and evaluate it.
    Replay {
        /// Model directory written by `darkwatch train`.
        #[arg(long)]
        model: PathBuf,
        /// Recorded frames with the model's features: .csv (columns the model lacks are
        /// skipped, with one warning), .npy (2-D, or 1-D for one feature), or .npz (its
        /// array X). CSV gaps (empty, NaN, Inf, null, NA, N/A cells) take the column's last value (the training mean before its
        /// first; with --table always the training mean), with one warning, and no row is dropped; a file over half gaps, or a
        /// column with no value, is refused. Rows out of time order are warned about.
        #[arg(long)]
        input: PathBuf,
        /// One 0/1 label per input row (1 = anomalous): text (one label a line, no header),
        /// an .npy vector, or an .npz (its array y). Enables point-wise AUROC, AUPRC and
        /// F1. AUPRC is average precision (scikit-learn's average_precision_score: the sum
        /// over the distinct scores, highest first, of the recall gained times the
        /// precision there; a step function, no interpolation). The best F1's threshold is
        /// chosen with the labels; the F1 of the streaming alarms (the `alarm` column of
        /// --out) is at the threshold actually used.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Interpretation labels, one anomaly segment a line as `start-end:dim,dim,...`
        /// (SMD's interpretation_label format: the segment covers the 1-based rows
        /// start+1 to end, dims are the blamed features, 1-based): prints OmniAnomaly's
        /// HitRate@100 % and @150 % of the culprit metrics over every frame in a segment,
        /// and with --labels the same over the frames detected at the best-F1 threshold.
        #[arg(long)]
        interpretation: Option<PathBuf>,
        /// Write one CSV row per frame here: frame (the 0-based input row), timestamp,
        /// score, threshold, alarm (1: the threshold flagged it), frame_score (the frame's own
        /// score before smoothing), then topN_feature, topN_contribution for N = 1 to
        /// [score] top_contributions.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write one JSON line per alert event (Alertmanager-shaped) here.
        #[arg(long)]
        events: Option<PathBuf>,
        /// Draw score, threshold, alert spans and labelled segments into this PNG.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Draw the plot's scores on a symmetric log axis: nothing is clipped, so a few huge
        /// scores do not hide the rest (default: a linear axis clipped to the bulk of the
        /// scores, frames beyond it drawn at the edge).
        #[arg(long, requires = "plot")]
        plot_log: bool,
        /// Score with this head instead of the model's own.
        #[arg(long, value_enum)]
        head: Option<HeadArg>,
        /// Run the autoencoder on this backend (default: `[score] backend`); `onnx` runs the
        /// model directory's ONNX graph (`[onnx] file`) through ONNX Runtime.
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Turn mean-shift scoring off for this replay (compare with and without MSS).
        #[arg(long, conflicts_with_all = ["mss_rounds", "mss_neighbours"])]
        no_mss: bool,
        /// Mean-shift rounds m for this replay, 0 to 8 (default: the model's own).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=8))]
        mss_rounds: Option<u8>,
        /// Mean-shift neighbourhood k for this replay, at least 1 (default: the model's own).
        #[arg(long, value_parser = parse_neighbours)]
        mss_neighbours: Option<usize>,
        /// Average each frame's score over this many frames of its stream instead of the
        /// model's own span (1: score frames alone; compare with and without smoothing).
        #[arg(long, value_parser = parse_smooth_frames)]
        smooth_frames: Option<usize>,
        /// The input is a table whose rows have no order (ODDS-style data): score every row
        /// alone, and leave out what assumes an order (point-adjusted F1, alert episodes).
        /// The default for a model trained with `train --table`.
        #[arg(long, conflicts_with_all = ["smooth_frames", "events"])]
        table: bool,
        /// Pace the replay at this many frames per second (default: as fast as possible).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
        /// Configuration file (thresholds, alerts, pipeline; default: the documented defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the agent: subscribe to MQTT, score every frame, publish alerts (until SIGTERM/SIGINT).
    #[command(after_help = "\
Settings come from the file, then from environment variables DARKWATCH__SECTION__KEY
(for example DARKWATCH__MQTT__HOST=broker1, DARKWATCH__ALERT__FIRE_K=2), over the
documented defaults; `darkwatch print-config` shows the result and `darkwatch validate
--agent` checks it without starting anything.

Signals: SIGTERM or SIGINT stop it (firing alerts are resolved and a retained \"offline\"
status is published); SIGHUP reloads the file and the model, keeping the running ones
if the new ones are invalid ([mqtt], [spool] and [metrics] need a restart).

Exit status: 0 after a stop, 78 for a configuration or model error (systemd's unit does
not restart it), 1 for other failures.")]
    Run {
        /// Configuration file ([agent] model_dir, [mqtt], [assemble], [spool], …).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Forward darkwatch's alert events from MQTT to Prometheus Alertmanager (`POST
    /// /api/v2/alerts`), at least once, until SIGTERM/SIGINT. Connects to `[mqtt]`'s broker;
    /// `[alertmanager]` says where to post and what to subscribe to.
    Alertmanager {
        /// Configuration file ([mqtt] for the broker, [alertmanager]; other sections are
        /// ignored).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Record training data from MQTT: subscribe with the agent's configuration and write
    /// the frames the agent would assemble (its decoders, `[assemble]` windows and
    /// aggregation) to a CSV that `darkwatch train --input` reads: a `timestamp` column (the
    /// window's end; `[input] timestamp_column` if set), then one column per metric.
    #[command(after_help = "\
The metric names are discovered: for --discover-secs from the first sample every message
is held and the names of each stream's metrics collected; the file's columns are the
recorded stream's names, sorted (or --metrics / --metrics-from, fixed), and the held
messages are then assembled as they came. A metric first seen later is counted and named
in the summary, not written. Windows with a metric missing are left out and counted. One
stream per file: several in discovery are refused unless --stream names one.

Stops on SIGINT/SIGTERM, after --frames rows or --secs seconds; rows are written whole as
they close, so an interrupted recording keeps them. Progress on stderr every
--progress-secs, a summary line at the end.

Exit status: 0 with rows written, 78 for a configuration error, 1 otherwise (an existing
--out without --force, several streams, nothing received).")]
    Record {
        /// The agent's configuration file ([agent] format, [mqtt], [examon]/[telegraf],
        /// [assemble]).
        #[arg(long)]
        config: Option<PathBuf>,
        /// CSV file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
        /// Seconds of discovery from the first sample (default: 3 × [assemble] window_secs).
        #[arg(long)]
        discover_secs: Option<f64>,
        /// The features, comma-separated, instead of discovering them.
        #[arg(long, value_delimiter = ',', conflicts_with = "metrics_from")]
        metrics: Option<Vec<String>>,
        /// Take the features of this model folder (to record more data for a model).
        #[arg(long)]
        metrics_from: Option<PathBuf>,
        /// The stream to record (a node: Telegraf's host tag, ExaMon's node).
        #[arg(long)]
        stream: Option<String>,
        /// Stop after this many rows.
        #[arg(long)]
        frames: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        secs: Option<f64>,
        /// Seconds between progress lines.
        #[arg(long, default_value_t = 5.0)]
        progress_secs: f64,
    },
    /// Everything on this machine: an embedded broker, a publisher replaying a recorded
    /// stream as ExaMon messages, the agent, and a subscriber counting alerts.
    Demo {
        #[arg(long, default_value = DEMO_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = DEMO_INPUT)]
        input: PathBuf,
        /// Labels of `--input`, one 0/1 per row (default: the bundled labels when `--input`
        /// is the bundled test half; none for your own input, so no metrics are printed).
        #[arg(long)]
        labels: Option<PathBuf>,
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
        /// How tables (.npz) are split.
        #[arg(long, value_enum, default_value_t = ProtocolArg::FitAll)]
        odds_protocol: ProtocolArg,
        /// Configuration file used for every entity (default: the documented defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also write the numbers as CSV (one row per entity and per family mean, full
        /// precision, an empty cell where the table shows "-"). With `--odds-protocol
        /// split`, the split's rows go beside it (`results.split.csv`: entity,row,part).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Measure scoring latency and throughput on this machine.
    Bench {
        /// Model to time (default: an untrained model of the default shape for 38 features).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Frames timed one at a time (100 to 100,000,000; a p99 from under 1,000 is marked
        /// `*`); the batch throughput scores 100 times as many per head, at most 20,000,000
        /// (ONNX heads an eighth of that).
        #[arg(long, default_value_t = 20_000, value_parser = parse_bench_frames)]
        frames: usize,
        /// Score these rows (.npy/.csv, the model's metrics, e.g. its test data) instead of
        /// 4,096 synthetic ones; cycled.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Also write the report as JSON to FILE (`-`: stdout, the table then goes to
        /// stderr): the machine, and one record per timed row (README "Latency and
        /// throughput").
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// `onnx`: also time the model directory's ONNX graph through ONNX Runtime (needs
        /// the `onnx` feature), beside the native rows, in the same run.
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Configuration file (`[onnx]` library, provider, threads).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also time one online retrain on this many frames (from --retrain-data, else
        /// synthetic) and scoring latency while retrains run beside it.
        #[arg(long, value_parser = parse_retrain_frames)]
        retrain_frames: Option<usize>,
        /// Raw frames (.npy/.csv) for --retrain-frames, e.g. the model's training data.
        #[arg(long, requires = "retrain_frames")]
        retrain_data: Option<PathBuf>,
    },
    /// Measure SAE scoring on this CPU: d_in 384/768 × 16k/32k latents, TopK k = 32, random
    /// weights; tokens/s at batch 1 and at a batch, and the encoder's share of sgemm. With
    /// --sae, your own SAE instead: its per-frame latency (median and p99) with its head.
    SaeBench {
        /// SAE folder (SAELens or sparsify, as sae-score takes) to time instead of the random
        /// shapes, with its dark-matter head when it has one (as the agent scores a frame).
        #[arg(long)]
        sae: Option<PathBuf>,
        /// Activations [tokens, d] (.npy / .safetensors) to feed --sae: 4 × batch rows spread
        /// evenly over the file, reused in turn (default: random rows; a ReLU or JumpReLU
        /// SAE's time depends on the rows).
        #[arg(long, requires = "sae")]
        input: Option<PathBuf>,
        /// Seconds per measurement (four per shape, four shapes).
        #[arg(long, default_value_t = 2.0, value_parser = parse_bench_secs)]
        secs: f64,
        /// The large batch (1 to 65536; a batch that needs more than nine tenths of the
        /// memory available is refused before anything is allocated).
        #[arg(long, default_value_t = 256, value_parser = parse_sae_batch)]
        batch: usize,
        /// Also write the report as JSON to FILE (`-`: stdout, the table then goes to
        /// stderr): the machine, and one record per row.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Train a TopK sparse autoencoder on activation rows [tokens, d] (.npy / .safetensors)
    /// and write it as a SAELens folder, with a dark-matter head fitted on its errors and the
    /// threshold calibration in OUT/dark/ (so `darkwatch run` can watch live activations with
    /// it) and the training report in OUT/train_report.json.
    SaeTrain {
        /// Activations [tokens, d], or [batch, seq, d] read as batch·seq rows in row-major order
        /// (token t of sequence b is row b·seq + t): .npy (float16/32/64) or .safetensors.
        #[arg(long)]
        input: PathBuf,
        /// Tensor name in a .safetensors input with several tensors.
        #[arg(long)]
        tensor: Option<String>,
        /// One prompt id per row (.npy / .safetensors, integers; one per flattened row for a
        /// [batch, seq, d] input): the held-out share is then whole prompts.
        #[arg(long)]
        prompt_ids: Option<PathBuf>,
        /// Tensor name in a .safetensors --prompt-ids file with several (--tensor names the
        /// --input's: the same file may hold both).
        #[arg(long, requires = "prompt_ids")]
        prompt_ids_tensor: Option<String>,
        /// SAE folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Number of latents.
        #[arg(long, default_value_t = 1536)]
        latents: usize,
        /// Active latents per token.
        #[arg(long, default_value_t = 32)]
        k: usize,
        /// Epochs over the training rows (at least 1; 30 won the README's selection).
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Adam learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f32,
        /// AuxK latents per row (default d/2).
        #[arg(long)]
        k_aux: Option<usize>,
        /// Tokens without firing after which a latent counts as dead (default: one epoch).
        #[arg(long)]
        dead_tokens: Option<u64>,
        /// Share of prompts (or rows) held out from training: held-out numbers, and the
        /// scores live thresholds calibrate on (0: cross-fitted scores, with --dark-folds).
        #[arg(long, default_value_t = 0.1)]
        holdout: f64,
        /// Drop the first N tokens of every prompt from SAE training, the head fit and the
        /// calibration. Positions come from --prompt-ids (a row's index within its prompt) or
        /// from a [batch, seq, d] input (t of row b·seq + t); without either, N ≥ 1 is
        /// refused. Default: 1 when positions are known (position 0 is BOS or an attention
        /// sink in most language models, of a norm many times the others'), else 0. The skip
        /// applied is recorded in dark_head.json (skip_positions): sae-score, and the agent
        /// with [sae] id_is_position = true, leave the same positions out of their scores.
        #[arg(long, value_name = "N")]
        skip_positions: Option<usize>,
        /// Ridge of the dark-matter head, relative to the mean feature variance (≥ 0; 1 won
        /// the README's selection).
        #[arg(long, default_value_t = 1.0)]
        ridge: f64,
        /// Cross-fit the dark-matter head on out-of-fold SAE errors over this many folds, 2 or
        /// more (trains this many extra SAEs); 0 fits it on the final SAE's own training rows
        /// (whose errors are smaller than on new tokens). 1 is refused.
        #[arg(long, default_value_t = 5)]
        dark_folds: usize,
        /// `metadata.model_name` in cfg.json.
        #[arg(long)]
        model_name: Option<String>,
        /// `metadata.hook_name` in cfg.json.
        #[arg(long)]
        hook_name: Option<String>,
        /// Replace an SAE already in OUT (a folder holding an autoencoder model is always
        /// refused).
        #[arg(long)]
        force: bool,
    },
    /// Fit the dark-matter head of an existing SAE (SAELens or sparsify folder) on normal
    /// activations and write it, with the thresholds' calibration, to SAE/dark/, so that
    /// `darkwatch run` can watch live activations with the SAE.
    SaeHead {
        /// SAE folder (SAELens or sparsify).
        #[arg(long)]
        sae: PathBuf,
        /// Normal activations [tokens, d], or [batch, seq, d] read as batch·seq rows in
        /// row-major order (token t of sequence b is row b·seq + t): .npy (float16/32/64) or
        /// .safetensors.
        #[arg(long)]
        input: PathBuf,
        /// Tensor name in a .safetensors input with several tensors.
        #[arg(long)]
        tensor: Option<String>,
        /// One prompt id per row (one per flattened row for a [batch, seq, d] input): the
        /// held-out share is then whole prompts.
        #[arg(long)]
        prompt_ids: Option<PathBuf>,
        /// Tensor name in a .safetensors --prompt-ids file with several (--tensor names the
        /// --input's: the same file may hold both).
        #[arg(long, requires = "prompt_ids")]
        prompt_ids_tensor: Option<String>,
        /// The scaling factor of an SAE trained with normalize_activations =
        /// expected_average_only_in (SAELens' `norm_scaling_factor`, not in the checkpoint):
        /// recorded with the head, so `run` and `sae-score` apply it too.
        #[arg(long)]
        norm_scaling_factor: Option<f32>,
        /// Share of prompts (or rows) held out: held-out R² and the threshold calibration.
        /// 0: fit on every row and calibrate on 5-fold cross-fitted scores.
        #[arg(long, default_value_t = 0.2)]
        holdout: f64,
        /// Drop the first N tokens of every prompt from the head fit and the calibration. Positions come from --prompt-ids (a row's index within its prompt) or
        /// from a [batch, seq, d] input (t of row b·seq + t); without either, N ≥ 1 is
        /// refused. Default: 1 when positions are known (position 0 is BOS or an attention
        /// sink in most language models, of a norm many times the others'), else 0. The skip
        /// applied is recorded in dark_head.json (skip_positions): sae-score, and the agent
        /// with [sae] id_is_position = true, leave the same positions out of their scores.
        #[arg(long, value_name = "N")]
        skip_positions: Option<usize>,
        /// Ridge, relative to the mean feature variance (≥ 0). 0.01 suits a published SAE
        /// and many tokens; on about as few rows per dimension as the README's fixture, 1
        /// fits better (the held-out R² printed shows which).
        #[arg(long, default_value_t = 1e-2)]
        ridge: f64,
        /// Head folder to write (default SAE/dark, where `darkwatch run` looks; for a
        /// sparsify run folder or its one hookpoint folder, whichever of run/dark and
        /// run/HOOKPOINT/dark already holds the head).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace a head already in the folder.
        #[arg(long)]
        force: bool,
        /// Threads for the passes over the rows (default: every core). Any count writes the
        /// same head and calibration.
        #[arg(long, value_parser = parse_positive)]
        threads: Option<usize>,
    },
    /// Score activation rows through an SAE and its dark-matter head: per token ‖e‖², the
    /// predicted ‖e‖², the nonlinear error and the deviation; prompt-level max/mean; with
    /// labels, token- and prompt-level AUROC / AUPRC of each score.
    SaeScore {
        /// SAE folder (SAELens or sparsify).
        #[arg(long)]
        sae: PathBuf,
        /// Dark-matter head folder (default SAE/dark; for a sparsify run folder or its one
        /// hookpoint folder, whichever of run/dark and run/HOOKPOINT/dark holds the head).
        #[arg(long)]
        dark: Option<PathBuf>,
        /// Activations [tokens, d], or [batch, seq, d] read as batch·seq rows in row-major order
        /// (token t of sequence b is row b·seq + t): .npy (float16/32/64) or .safetensors.
        #[arg(long)]
        input: PathBuf,
        /// Tensor name in a .safetensors input with several tensors.
        #[arg(long)]
        tensor: Option<String>,
        /// One 0/1 label per row (1 = out of distribution; one per flattened row for a
        /// [batch, seq, d] input), as `replay` reads them: a text file with one per line, or
        /// an .npy vector of any integer, bool or float dtype; or an integer .safetensors.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Tensor name in a .safetensors --labels file with several.
        #[arg(long, requires = "labels")]
        labels_tensor: Option<String>,
        /// One prompt id per row (one per flattened row for a [batch, seq, d] input), integer
        /// .npy / .safetensors.
        #[arg(long)]
        prompt_ids: Option<PathBuf>,
        /// Tensor name in a .safetensors --prompt-ids file with several.
        #[arg(long, requires = "prompt_ids")]
        prompt_ids_tensor: Option<String>,
        /// In-distribution activations to fit a Mahalanobis baseline on (adds its AUROC).
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Tensor name in a .safetensors --baseline file with several.
        #[arg(long, requires = "baseline")]
        baseline_tensor: Option<String>,
        /// The scaling factor of an SAE trained with normalize_activations =
        /// expected_average_only_in (default: the one `sae-head` recorded with the head).
        #[arg(long)]
        norm_scaling_factor: Option<f32>,
        /// Covariance shrinkage of the Mahalanobis baseline towards the scaled identity.
        #[arg(long, default_value_t = 0.1)]
        shrinkage: f64,
        /// Token-level CSV to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Prompt-level CSV to write (needs --prompt-ids).
        #[arg(long)]
        prompt_out: Option<PathBuf>,
        /// Leave the first N tokens of every prompt out of the scores: of the AUROC table,
        /// the R² and normalised MSEs and the prompt max/mean; --out keeps their rows, with
        /// columns position and skipped = 1 and empty scores. Positions as for sae-train
        /// (--prompt-ids, or a [batch, seq, d] input); without them, N ≥ 1 is refused.
        /// Default: the skip_positions the head recorded in dark_head.json (what its fit and
        /// thresholds left out; 0 for heads written before it was recorded) when positions
        /// are known, else 0 with a note.
        #[arg(long, value_name = "N")]
        skip_positions: Option<usize>,
        /// Threads for the passes over the rows (default: every core). Any count gives the
        /// same scores.
        #[arg(long, value_parser = parse_positive)]
        threads: Option<usize>,
    },
    /// Print a model directory's metadata, or an online-retraining state directory's
    /// checkpoints and retrain history.
    Inspect {
        /// Model directory written by `darkwatch train`, `[retrain] state_dir`, or an SAE
        /// folder with its dark-matter head (`sae-train`, `sae-head`).
        dir: PathBuf,
        /// Print the model's metadata as JSON (what model.json holds) instead of a summary.
        /// Autoencoder models only: an SAE folder is always shown as a summary (with a note).
        #[arg(long)]
        json: bool,
        /// Configuration file: with `[score] backend = "onnx"`, also load the ONNX graph and
        /// report the execution provider it gets; with `"cuda"`, the GPU it would score on
        /// (or why not).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file, and that `[agent] model_dir` holds a model that loads and
    /// that the configuration can run (an SAE needs raw input and no online retraining; the
    /// thresholds calibrate on its held-out scores), without starting anything. A missing
    /// or broken model, or one the configuration cannot run, is a configuration error (78).
    Validate {
        /// Configuration file to check.
        #[arg(long)]
        config: PathBuf,
        /// Also check what `darkwatch run` checks before it tells systemd it is ready:
        /// `[agent] model_dir` loads on the configured backend, and `[spool] dir` and
        /// `[retrain] state_dir` can be made and written (a probe file is made and
        /// removed, as are folders made for the check: nothing is left behind). A
        /// `[metrics] listen` in use or a `[spool] dir` another agent holds (the running
        /// agent's own) is printed as a note and does not fail the check.
        #[arg(long)]
        agent: bool,
    },
    /// Print the effective configuration (file, then environment overrides, over defaults).
    #[command(
        after_help = "Environment overrides are named DARKWATCH__SECTION__KEY, double underscores \
between the parts (DARKWATCH__MQTT__PORT=1884, DARKWATCH__SCORE__BACKEND=onnx)."
    )]
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
    /// MSS-PAE's split: each class (inliers, outliers) shuffled and cut 75/25 (seeded by
    /// [train] seed); train on the 75 %, three quarters of the outliers included, and score
    /// the other 25 %.
    Split,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Native,
    Onnx,
    Cuda,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Native => Backend::Native,
            BackendArg::Onnx => Backend::Onnx,
            BackendArg::Cuda => Backend::Cuda,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum HeadArg {
    Mse,
    /// Also as written in the config file (`head = "max_abs"`).
    #[value(alias = "max_abs")]
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

/// `darkwatch demo`'s bundled model and data: paths inside a checkout of the repository.
const DEMO_MODEL: &str = "models/smd-machine-1-6";
const DEMO_INPUT: &str = "tests/data/smd/machine-1-6_test.npy";
const DEMO_LABELS: &str = "tests/data/smd/machine-1-6_test_label.txt";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its life cycle (journald keeps it); one-shot commands only warn.
    let default = if matches!(
        cli.command,
        Command::Run { .. } | Command::Alertmanager { .. }
    ) {
        "info,rumqttd=off"
    } else {
        "warn,rumqttd=off"
    };
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), default);
    // Colour only for a person at a terminal: journald, files and pipes get plain text
    // (https://no-color.org: any non-empty NO_COLOR turns it off too).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // rumqttd's warning that the embedded broker skipped messages a subscriber had not
    // taken is shown whatever the filter, and counted (darkwatch_mqtt_broker_skipped_total).
    use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
    use tracing_subscriber::util::SubscriberInitExt as _;
    let skips = tracing_subscriber::filter::filter_fn(darkwatch::mqtt::is_broker_skip_warning);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour)
                .with_filter(tracing_subscriber::filter::FilterExt::or(filter, skips)),
        )
        .with(darkwatch::mqtt::broker_skip_hook())
        .with(darkwatch::mqtt::broker_refusal_hook())
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

/// The log filter: `RUST_LOG` when it parses, else `default`. The embedded broker's own
/// log (rumqttd reports every probe connection and client disconnect as an ERROR) stays
/// off unless `RUST_LOG` names `rumqttd` itself; `RUST_LOG=info`, as the systemd unit sets
/// it, would otherwise fill the journal with it. (`main` shows rumqttd's warning that it
/// skipped messages whatever this filter says.)
fn log_filter(env: Option<&str>, default: &str) -> tracing_subscriber::EnvFilter {
    let Some(env) = env.filter(|e| !e.trim().is_empty()) else {
        return default.into();
    };
    let spec = if env.contains("rumqttd") {
        env.to_string()
    } else {
        format!("{env},rumqttd=off")
    };
    tracing_subscriber::EnvFilter::try_new(spec).unwrap_or_else(|_| default.into())
}

/// The systemd notifier of this process (`$NOTIFY_SOCKET`; off when unset).
fn notifier() -> Notifier {
    Notifier::new(std::env::var_os("NOTIFY_SOCKET"))
}

/// Handles signals on a small runtime thread: SIGTERM or SIGINT stop the agent; SIGHUP
/// re-reads `config` and the model it names and hands them to the agent only when both
/// are valid (otherwise it logs why and the agent keeps what it runs).
fn handle_signals(
    control: Control,
    config: Option<PathBuf>,
    counters: Arc<AgentCounters>,
    notify: Notifier,
) -> Result<()> {
    let (rt, mut term, mut hup) = signal_runtime()?;
    std::thread::Builder::new()
        .name("darkwatch-signals".into())
        .spawn(move || {
            rt.block_on(async {
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = term.recv() => break,
                        _ = hup.recv() => reload(&control, config.as_deref(), &counters, &notify).await,
                    }
                }
                tracing::info!("Signal received; draining and stopping.");
                control.stop();
            });
        })?;
    Ok(())
}

/// A signal thread for the commands that only stop (`record`, `alertmanager`): SIGTERM or
/// SIGINT call `on_stop` once; SIGHUP calls `on_hup` and goes on.
fn stop_on_signal(
    on_hup: impl Fn() + Send + 'static,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<()> {
    let (rt, mut term, mut hup) = signal_runtime()?;
    std::thread::Builder::new()
        .name("darkwatch-signals".into())
        .spawn(move || {
            rt.block_on(async {
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = term.recv() => break,
                        _ = hup.recv() => on_hup(),
                    }
                }
                on_stop();
            });
        })?;
    Ok(())
}

/// A current-thread runtime for a signal thread, with SIGTERM and SIGHUP registered on it.
/// Registered by the caller before the work starts, so an early SIGHUP is not fatal.
fn signal_runtime() -> Result<(
    tokio::runtime::Runtime,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
)> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (term, hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    Ok((rt, term, hup))
}

/// `darkwatch record`: training rows from MQTT until SIGTERM/SIGINT, `--frames` or `--secs`.
fn record(
    config: Option<&Path>,
    mut opts: darkwatch::record::RecordOptions,
    metrics_from: Option<&Path>,
) -> Result<()> {
    let cfg = load_config(config)?;
    for (flag, v) in [
        ("--discover-secs", opts.discover_secs),
        ("--secs", opts.secs),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            anyhow::bail!("{flag} must be a positive number of seconds");
        }
    }
    if opts.frames == Some(0) {
        anyhow::bail!("--frames must be at least 1");
    }
    if let Some(dir) = metrics_from {
        let model = Detector::load_configured(dir, &cfg)
            .with_context(|| format!("--metrics-from {}", dir.display()))?;
        opts.metrics = Some(model.frame_features().to_vec());
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        stop_on_signal(
            || {},
            move || stop.store(true, std::sync::atomic::Ordering::SeqCst),
        )?;
    }
    match darkwatch::record::record(&cfg, opts, &stop) {
        Ok(_) => Ok(()),
        Err(darkwatch::record::RecordError::Config { key, reason }) => Err(ConfigError::Invalid {
            file: config_name(config),
            key,
            reason,
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// `darkwatch alertmanager`: the bridge, with SIGTERM/SIGINT stopping it (after the batch
/// in flight) and SIGHUP only logged (no reload: a restart applies a new configuration).
fn alertmanager(config: Option<&Path>) -> Result<()> {
    let cfg = load_config(config)?;
    if config.is_none() {
        tracing::warn!(
            url = %cfg.alertmanager.url,
            broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
            "No --config: bridging on the built-in defaults (with any DARKWATCH__ environment overrides)."
        );
    }
    let as_config = |e: darkwatch::alertmanager::BridgeError| -> anyhow::Error {
        match e {
            darkwatch::alertmanager::BridgeError::Config { key, reason } => ConfigError::Invalid {
                file: config_name(config),
                key,
                reason,
            }
            .into(),
            e => e.into(),
        }
    };
    darkwatch::alertmanager::check(&cfg).map_err(as_config)?;
    let stop = darkwatch::mqtt::ClientStop::default();
    {
        let stop = stop.clone();
        stop_on_signal(
            || {
                tracing::info!(
                    "SIGHUP: the bridge does not reload; restart it to apply a new configuration."
                );
            },
            move || {
                tracing::info!("Signal received; posting the batch in hand and stopping.");
                stop.stop();
            },
        )?;
    }
    let watchdog = systemd::watchdog_period(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    let stats = Arc::new(darkwatch::alertmanager::BridgeStats::default());
    darkwatch::alertmanager::run(&cfg, stop, notifier(), watchdog, stats.clone())
        .map_err(as_config)?;
    eprintln!(
        "darkwatch: alertmanager bridge stopped after {}",
        stats.summary()
    );
    Ok(())
}

/// One SIGHUP: validate the configuration and the model, then hand them over.
async fn reload(
    control: &Control,
    config: Option<&Path>,
    counters: &AgentCounters,
    notify: &Notifier,
) {
    let shown = config_name(config);
    tracing::info!(config = %shown, "SIGHUP: reloading the configuration and the model.");
    notify.send("RELOADING=1");
    // Checked as `run` and `validate` check, so a refusal names the file and the key.
    let loaded = load_config(config).and_then(|cfg| {
        let model = load_model(config, &cfg, Detector::load_configured)?;
        // Refused here, a reload is counted as failed and the agent runs on.
        check_runs(config, &cfg, &model)?;
        if let Some(w) = model.warning() {
            tracing::warn!("{w}");
        }
        Ok(Reload { cfg, model })
    });
    match loaded {
        Ok(next) => {
            let id = next.model.id().to_string();
            let before = counters.reloads.load(std::sync::atomic::Ordering::Relaxed);
            control.reload(next);
            // systemd waits for READY=1 after RELOADING=1: send it once the agent took over.
            for _ in 0..600 {
                if counters.reloads.load(std::sync::atomic::Ordering::Relaxed) != before
                    || control.is_stopping()
                {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            notify.send(&format!(
                "READY=1\nSTATUS=reloaded; scoring with model {id}"
            ));
        }
        Err(e) => {
            counters
                .reloads_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let why = one_line(&e);
            tracing::error!(
                error = %why,
                "Reload failed; the agent keeps running the previous configuration and model."
            );
            notify.send(&format!(
                "READY=1\nSTATUS=reload failed, running the previous configuration: {why}"
            ));
        }
    }
}

/// `bench --frames`: at least 100, so that a p99 has a frame to stand on.
fn parse_bench_frames(s: &str) -> Result<usize, String> {
    // Above 10⁸ frames a run takes hours per head; the p99 is stable long before.
    match s.parse::<usize>() {
        Ok(n) if n > 100_000_000 => Err(format!(
            "{s} frames would take hours: give at most 100000000"
        )),
        Ok(n) if n >= 100 => Ok(n),
        Ok(_) => Err(format!(
            "{s} frames are too few for a p99: give at least 100"
        )),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(format!(
            "{s} frames would take hours: give at most 100000000"
        )),
        Err(_) => Err(format!("{s} is not a number of frames")),
    }
}

/// `bench --input`: the file's rows as the model's inputs (a windowed model's windows
/// built from its metrics), every value finite.
fn bench_rows(path: &Path, model: &Model) -> anyhow::Result<darkwatch::bench::BenchData> {
    let rows = ingest::read_table(path, &TableOptions::default())?.values;
    let metrics = model.meta.frame_features().len();
    let rows = if rows.ncols() == metrics && model.n_features() != metrics {
        darkwatch::window::windows(rows.view(), model.meta.window_frames)
    } else {
        rows
    };
    if rows.ncols() != model.n_features() {
        anyhow::bail!(
            "--input {} has {} columns, the model takes {} (its metrics, in its order)",
            path.display(),
            rows.ncols(),
            metrics
        );
    }
    if rows.nrows() == 0 {
        anyhow::bail!(
            "--input {} has no rows{}",
            path.display(),
            if model.meta.window_frames > 1 {
                format!(
                    " for the model's windows of {} frames (it needs at least that many rows)",
                    model.meta.window_frames
                )
            } else {
                String::new()
            }
        );
    }
    if let Some((i, _)) = rows
        .outer_iter()
        .enumerate()
        .find(|(_, r)| r.iter().any(|v| !v.is_finite()))
    {
        anyhow::bail!(
            "--input {}: row {i} (0-based) holds a value that is not finite; bench times \
             complete frames only",
            path.display()
        );
    }
    Ok(darkwatch::bench::BenchData {
        source: path.display().to_string(),
        rows,
    })
}

/// A number of frames from 1 to `max`.
fn frames_up_to(s: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s} is not a number of frames between 1 and {max}")),
    }
}

/// Rows of one timed retrain: 100 (what a refit needs) to 10⁷ (a retrain holds them, scaled,
/// in memory).
fn parse_retrain_frames(s: &str) -> Result<usize, String> {
    let min = darkwatch::bench::RETRAIN_MIN_FRAMES;
    match s.parse::<usize>() {
        Ok(n) if n < min => Err(format!(
            "{s} frames are too few for a retrain: give at least {min} (a refit needs {min})"
        )),
        _ => frames_up_to(s, 10_000_000),
    }
}

fn parse_smooth_frames(s: &str) -> Result<usize, String> {
    frames_up_to(s, darkwatch::smooth::MAX_SMOOTH_FRAMES)
}

/// A mean-shift neighbourhood: at least 1 (1 turns the shift off).
fn parse_neighbours(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(k) if k >= 1 => Ok(k),
        _ => Err(format!(
            "{s} is not a number of neighbours of at least 1 (1 turns the shift off)"
        )),
    }
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

/// `sae-bench --sae DIR`: the SAE loaded as `sae-score` loads it, timed with its head when
/// one is found where `sae-score` looks (one that does not load is reported and left out).
fn sae_bench_own(
    dir: &Path,
    input: Option<&Path>,
    mut opts: darkwatch::sae::bench::SaeBenchOptions,
    sink: &mut BenchLines,
) -> Result<darkwatch::sae::bench::SaeBenchReport> {
    use darkwatch::sae::{Sae, bench, detector};
    let sae = Sae::load(dir)?;
    let dark = detector::head_dir(dir);
    let head = match detector::load_head(&dark, &sae, dir) {
        Ok(head) => Some(head),
        Err(detector::DetectorError::NoHead { .. }) => None,
        Err(e) => {
            eprintln!("darkwatch: warning: timing the SAE without its head: {e}");
            None
        }
    };
    let inputs = input
        .map(|p| darkwatch::sae::eval::read_activations(p, None))
        .transpose()?;
    // A width that does not match is the input's fault, not "an invalid SAE".
    if let (Some(p), Some(x)) = (input, &inputs)
        && x.ncols() != sae.d_in()
    {
        anyhow::bail!(
            "--input {}: activations are [{}, {}], the SAE in {} takes d_in = {}: give \
             activations of the SAE's hook point",
            p.display(),
            x.nrows(),
            x.ncols(),
            dir.display(),
            sae.d_in()
        );
    }
    opts.shapes = vec![(sae.d_in(), sae.d_sae())];
    // The ndarray comparison checks the kernel choice on the random shapes; not needed here.
    opts.compare_ndarray = false;
    sae_bench_batch_fits(&opts)?;
    eprintln!(
        "darkwatch: timing {} (about {})…",
        dir.display(),
        bench::duration_text(opts.estimated_secs(darkwatch::bench::matmul_gflops()))
    );
    let name = dir.display().to_string();
    let own = bench::OwnSae {
        sae: &sae,
        name: &name,
        head: head.as_ref(),
        inputs: inputs.as_ref().map(|x| x.view()),
    };
    bench::run_own(&own, &opts, sink).with_context(|| match input {
        Some(p) => format!("{} with --input {}", dir.display(), p.display()),
        None => dir.display().to_string(),
    })
}

/// Progress of `sae-head`'s and `sae-score`'s passes over the rows, on stderr as `train`
/// shows its epochs: a bar on a terminal; otherwise (a pipe, a CI log, journald) a line at
/// most every 5 s, so short runs print none.
struct RowsProgress {
    tty: bool,
    bar: ProgressBar,
    started: std::time::Instant,
    state: std::sync::Mutex<RowsState>,
}

struct RowsState {
    stage: &'static str,
    done: usize,
    last_line: std::time::Duration,
}

/// Runs `f` with the row passes `--threads` asks for (every core without it) and their
/// progress shown as [`RowsProgress`], finished when `f` returns: `sae-head` and
/// `sae-score`.
fn with_passes<T>(
    threads: Option<usize>,
    f: impl FnOnce(&darkwatch::sae::pass::Passes<'_>) -> T,
) -> T {
    let progress = RowsProgress::new();
    let report = |p| progress.report(p);
    let passes = darkwatch::sae::pass::Passes {
        threads: threads.unwrap_or_else(darkwatch::sae::pass::available_threads),
        progress: &report,
    };
    let out = f(&passes);
    progress.finish();
    out
}

impl RowsProgress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    fn new() -> RowsProgress {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} rows: {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        RowsProgress {
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            bar,
            started: std::time::Instant::now(),
            state: std::sync::Mutex::new(RowsState {
                stage: "",
                done: 0,
                last_line: std::time::Duration::ZERO,
            }),
        }
    }

    /// Called by the worker threads after each batch; reports arrive out of order by a batch
    /// or two, so only a larger count moves the display.
    fn report(&self, p: darkwatch::sae::pass::RowProgress) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if p.stage != st.stage {
            st.stage = p.stage;
            st.done = 0;
            if self.tty {
                self.bar.set_length(p.total as u64);
                self.bar.set_position(0);
                self.bar.set_message(p.stage);
            }
        }
        if p.done <= st.done {
            return;
        }
        st.done = p.done;
        if self.tty {
            self.bar.set_position(p.done as u64);
            return;
        }
        let elapsed = self.started.elapsed();
        if elapsed.saturating_sub(st.last_line) >= Self::EVERY {
            st.last_line = elapsed;
            eprintln!(
                "darkwatch: {}: {}/{} rows, {:.1} s",
                p.stage,
                p.done,
                p.total,
                elapsed.as_secs_f64()
            );
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `sae-bench --secs`: finite and positive.
fn parse_bench_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{s}: give seconds per measurement, a number above 0"
        )),
    }
}

/// A count of at least 1 (`sae-bench --batch 0` used to run batch 1 silently).
fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("0: give at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

/// `bench`'s and `sae-bench`'s lines as they are measured: the report on stdout (stderr when
/// stdout carries the JSON), flushed line by line so an interrupted run keeps its rows;
/// progress on stderr.
struct BenchLines {
    to_stderr: bool,
    failed: Option<std::io::Error>,
}

impl BenchLines {
    fn new(to_stderr: bool) -> BenchLines {
        BenchLines {
            to_stderr,
            failed: None,
        }
    }

    /// The first write error, if any (a closed pipe ends the run there).
    fn result(&mut self) -> Result<()> {
        match self.failed.take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl darkwatch::bench::BenchSink for BenchLines {
    fn line(&mut self, text: &str) {
        use std::io::Write;
        if self.failed.is_some() {
            return;
        }
        let written = if self.to_stderr {
            let mut err = std::io::stderr().lock();
            writeln!(err, "{text}").and_then(|()| err.flush())
        } else {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").and_then(|()| out.flush())
        };
        if let Err(e) = written {
            self.failed = Some(e);
        }
    }

    fn status(&mut self, text: &str) {
        eprintln!("darkwatch: {text}");
    }
}

/// Writes a bench's JSON to `path` (`-`: stdout).
/// A bench's `--json` file (not `-`, stdout) whose folder is missing, said before the
/// timing rather than after it.
fn check_json_out(json: Option<&Path>) -> Result<()> {
    let file = json.filter(|p| *p != Path::new("-"));
    darkwatch::outputs::check(&[("--json", file)], &[])?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    if path == Path::new("-") {
        return emit(&text);
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Refuses a `sae-bench --batch` too large for this machine before announcing the run.
fn sae_bench_batch_fits(opts: &darkwatch::sae::bench::SaeBenchOptions) -> Result<()> {
    match opts.check_batch() {
        Err(darkwatch::sae::SaeError::Invalid(why)) => Err(anyhow::Error::msg(why)),
        other => Ok(other?),
    }
}

/// `sae-bench --batch`: 1 to [`darkwatch::sae::bench::MAX_BATCH`] (10⁷ aborted allocating
/// 61 GB; 2⁶⁴ − 1 overflowed the array shape).
fn parse_sae_batch(s: &str) -> Result<usize, String> {
    let max = darkwatch::sae::bench::MAX_BATCH;
    match parse_positive(s)? {
        n if n > max => Err(format!("{s}: give at most {max}")),
        n => Ok(n),
    }
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

/// Loads `[agent] model_dir` with `load`, for `run` and `validate`. A folder that is missing
/// or holds no usable model ([`LoadError::is_bad_model`]) is a configuration error (exit
/// 78): restarting cannot mend it, and systemd would otherwise restart the agent into it
/// forever. Other failures (a read error, ONNX Runtime or a GPU, the state folder) exit 1.
fn load_model(
    config: Option<&Path>,
    cfg: &DarkwatchConfig,
    load: impl FnOnce(&Path, &DarkwatchConfig) -> Result<Detector, LoadError>,
) -> Result<Detector> {
    load(&cfg.agent.model_dir, cfg).map_err(|e| {
        if e.is_bad_model() {
            ConfigError::Invalid {
                file: config_name(config),
                key: "agent.model_dir".into(),
                reason: e.to_string(),
            }
            .into()
        } else {
            e.into()
        }
    })
}

/// [`darkwatch::agent::validate`] for `run` and `validate`: a setting the model
/// cannot run with ([`AgentError::Config`]: an SAE with other than raw input or with online
/// retraining, a threshold its held-out scores cannot calibrate) is a configuration error
/// (exit 78), as a bad model is in [`load_model`].
fn check_runs(config: Option<&Path>, cfg: &DarkwatchConfig, model: &Detector) -> Result<()> {
    darkwatch::agent::validate(cfg, model).map_err(|e| keyed(config, e))
}

/// [`darkwatch::agent::check_dirs`] for `run` and `validate --agent`: a `[spool] dir` or
/// `[retrain] state_dir` that cannot be made or written is a configuration error (exit 78),
/// so systemd does not restart the agent into it every `RestartSec=`.
fn check_dirs(config: Option<&Path>, cfg: &DarkwatchConfig) -> Result<()> {
    darkwatch::agent::check_dirs(cfg).map_err(|e| keyed(config, e))
}

/// An [`AgentError::Config`] as a [`ConfigError`] (exit 78) naming the file and the key;
/// any other error as it is.
fn keyed(config: Option<&Path>, e: AgentError) -> anyhow::Error {
    match e {
        AgentError::Config { key, reason } => ConfigError::Invalid {
            file: config_name(config),
            key,
            reason,
        }
        .into(),
        e => e.into(),
    }
}

/// `run` without `--config`: says that the built-in defaults are in use, and where they
/// listen, so that an agent started so does not pass for a deployed one (its embedded
/// broker receives nothing from an ExaMon or Telegraf deployment).
fn warn_defaults(cfg: &DarkwatchConfig) {
    let mqtt = &cfg.mqtt;
    let broker = match mqtt.broker {
        darkwatch::mqtt::BrokerMode::Embedded => format!(
            "an embedded MQTT broker on {}:{}, which receives only what is published to it",
            mqtt.host, mqtt.port
        ),
        darkwatch::mqtt::BrokerMode::External => {
            format!("the MQTT broker at {}:{}", mqtt.host, mqtt.port)
        }
    };
    tracing::warn!(
        model_dir = %cfg.agent.model_dir.display(),
        subscribe = %mqtt.subscribe_filters().join(","),
        "No --config: running on the built-in defaults (with any DARKWATCH__ environment overrides), so on {broker}. Give --config FILE for a deployment (config/darkwatch.toml documents every key)."
    );
}

/// The configuration file as [`ConfigError`] names it.
fn config_name(config: Option<&Path>) -> String {
    config.map_or_else(|| "(defaults)".into(), |p| p.display().to_string())
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train {
            input,
            out,
            config,
            force,
            table,
        } => train(&input, &out, config.as_deref(), force, table),
        Command::Replay {
            model,
            input,
            labels,
            interpretation,
            out,
            events,
            plot,
            plot_log,
            head,
            backend,
            rate,
            config,
            no_mss,
            mss_rounds,
            mss_neighbours,
            smooth_frames,
            table,
        } => {
            replay::check_model_dir(&model)?;
            let mut cfg = load_config(config.as_deref())?;
            if let Some(b) = backend {
                cfg.score.backend = b.into();
            }
            let mss = if no_mss {
                Some(MssConfig {
                    rounds: 0,
                    ..cfg.mss
                })
            } else if mss_rounds.is_some() || mss_neighbours.is_some() {
                let model_mss = Model::load(&model)?.meta.mss;
                let m = MssConfig {
                    rounds: mss_rounds.map_or(model_mss.rounds.max(1), usize::from),
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
                interpretation,
                out_csv: out,
                events,
                plot,
                plot_log,
                rate,
                head: head.map(Into::into),
                mss,
                smooth_frames,
                table,
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
            if config.is_none() {
                warn_defaults(&cfg);
            }
            // Fail before telling systemd we are ready if a folder the agent writes is
            // unusable or the model cannot be loaded.
            check_dirs(config.as_deref(), &cfg)?;
            let model = load_model(config.as_deref(), &cfg, Detector::load_configured)?;
            check_runs(config.as_deref(), &cfg, &model)?;
            if let Some(w) = model.warning() {
                tracing::warn!("{w}");
            }
            let control = Control::default();
            let counters = Arc::new(AgentCounters::default());
            let notify = notifier();
            handle_signals(
                control.clone(),
                config.clone(),
                counters.clone(),
                notify.clone(),
            )?;
            let watchdog = systemd::watchdog_period(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            );
            let watchdog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            systemd::spawn_watchdog(
                notify.clone(),
                watchdog,
                std::time::Duration::from_secs(5),
                counters.clone(),
                watchdog_stop.clone(),
            )?;
            notify.send(&format!(
                "READY=1\nSTATUS=scoring with model {}",
                model.id()
            ));
            let report = darkwatch::agent::run_with(&cfg, model, &control, counters, false);
            watchdog_stop.store(true, std::sync::atomic::Ordering::SeqCst);
            notify.send("STOPPING=1");
            let report = report?;
            let c = &report.counters;
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            // Messages the embedded broker acknowledged and then skipped never reached the
            // agent: said here, since no other count above includes them.
            let skipped = match cfg.mqtt.broker {
                darkwatch::mqtt::BrokerMode::Embedded => format!(
                    ", {} messages skipped by the embedded broker",
                    darkwatch::mqtt::broker_skipped().messages
                ),
                darkwatch::mqtt::BrokerMode::External => String::new(),
            };
            eprintln!(
                "darkwatch: stopped after {} messages ({} undecodable, {} samples rejected), {} frames ({} incomplete, {} dropped at the ring), {} frames scored, {}{skipped}",
                load(&c.messages),
                c.decode_errors(),
                c.samples_rejected(),
                load(&c.frames),
                load(&c.frames_incomplete),
                report.pipeline.frames_dropped,
                report.pipeline.frames_scored,
                c.alert_events_text()
            );
            Ok(())
        }
        Command::Alertmanager { config } => alertmanager(config.as_deref()),
        Command::Record {
            config,
            out,
            force,
            discover_secs,
            metrics,
            metrics_from,
            stream,
            frames,
            secs,
            progress_secs,
        } => record(
            config.as_deref(),
            darkwatch::record::RecordOptions {
                out,
                force,
                metrics,
                stream,
                discover_secs,
                frames,
                secs,
                progress_secs,
            },
            metrics_from.as_deref(),
        ),
        Command::Demo {
            model,
            input,
            labels,
            start,
            frames,
            config,
        } => {
            darkwatch::demo::check_model_dir(&model)?;
            let cfg = load_config(config.as_deref())?;
            // The bundled labels belong to the bundled input only: scored against them, any
            // other input would get metrics that mean nothing.
            let labels = labels
                .or_else(|| (input.as_os_str() == DEMO_INPUT).then(|| PathBuf::from(DEMO_LABELS)));
            // The defaults are relative paths into a checkout of the repository.
            let bundled_labels = labels.clone().unwrap_or_default();
            for (path, flag, default) in [
                (&model, "--model", DEMO_MODEL),
                (&input, "--input", DEMO_INPUT),
                (&bundled_labels, "--labels", DEMO_LABELS),
            ] {
                if path.as_os_str() == default && !path.exists() {
                    anyhow::bail!(
                        "{}: not found from {}; the demo's bundled model and data are in the source tree: run it from the repository's root, or name your own with {flag}",
                        path.display(),
                        std::env::current_dir()
                            .map_or_else(|_| "here".into(), |d| d.display().to_string())
                    );
                }
            }
            let opts = darkwatch::demo::DemoOptions {
                model_dir: model,
                input,
                labels,
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
            out,
        } => {
            let cfg = load_config(config.as_deref())?;
            let protocol = match odds_protocol {
                ProtocolArg::FitAll => harness::OddsProtocol::FitAll,
                ProtocolArg::Split => harness::OddsProtocol::Split,
            };
            let entities = harness::discover(&paths)?;
            // The CSV is written to `<out>.partial`, made before the first entity trains
            // (a wrong path fails in a second, not after the whole run), and renamed over
            // `<out>` at the end: an interrupted run leaves an earlier results file whole.
            // It never replaces an input or the configuration.
            let mut csv_out = match &out {
                Some(path) => {
                    if let Err(why) = harness::check_out(&entities, config.as_deref(), path) {
                        anyhow::bail!("--out {} {why}", path.display());
                    }
                    let mut partial = path.clone().into_os_string();
                    partial.push(".partial");
                    let partial = PathBuf::from(partial);
                    let file = std::fs::File::create(&partial)
                        .with_context(|| format!("--out {}", partial.display()))?;
                    Some((path, partial, file))
                }
                None => None,
            };
            let mut results = Vec::new();
            // One unreadable table must not throw away the hours spent on the others: each
            // failure is reported as it happens, the rest run, and the exit code says so.
            let mut failed = Vec::new();
            for (i, e) in entities.iter().enumerate() {
                eprintln!("darkwatch: [{}/{}] {}", i + 1, entities.len(), e.name());
                match harness::run_entity(e, &cfg, protocol) {
                    Ok(r) => results.push(r),
                    Err(err) => {
                        eprintln!(
                            "darkwatch: {}: {}; going on",
                            e.name(),
                            one_line(&err.into())
                        );
                        failed.push(e.name().to_string());
                    }
                }
            }
            if !results.is_empty() {
                // The file (or defaults) and any environment overrides head the table.
                let source = config::source_name(config.as_deref(), std::env::vars());
                emit(&harness::table(&results, &cfg, &source))?;
            }
            if let Some((path, partial, file)) = csv_out.as_mut() {
                std::io::Write::write_all(file, harness::csv(&results, &cfg).as_bytes())
                    .and_then(|()| file.sync_all())
                    .and_then(|()| std::fs::rename(&partial, &path))
                    .with_context(|| format!("--out {}", path.display()))?;
                eprintln!("darkwatch: wrote {}", path.display());
                // The split's rows beside the results, so baselines can score the same rows.
                let split = path.with_extension("split.csv");
                if protocol == harness::OddsProtocol::Split
                    && entities
                        .iter()
                        .any(|e| matches!(e, harness::Entity::Odds { .. }))
                {
                    if harness::reads(&entities, &split)
                        || config
                            .as_deref()
                            .is_some_and(|c| harness::same_file(c, &split))
                    {
                        eprintln!(
                            "darkwatch: note: the split's rows are not written: {} is an input",
                            split.display()
                        );
                    } else {
                        std::fs::write(&split, harness::split_rows_csv(&entities, cfg.train.seed))
                            .with_context(|| format!("{}", split.display()))?;
                        eprintln!(
                            "darkwatch: wrote {} (each table's rows in the split: entity,row,part)",
                            split.display()
                        );
                    }
                }
            }
            if !failed.is_empty() {
                anyhow::bail!(
                    "{} of {} entities failed and are not in the table: {}",
                    failed.len(),
                    entities.len(),
                    failed.join(", ")
                );
            }
            Ok(())
        }
        Command::Bench {
            model,
            frames,
            input,
            json,
            backend,
            config,
            retrain_frames,
            retrain_data,
        } => {
            check_json_out(json.as_deref())?;
            let mut cfg = load_config(config.as_deref())?;
            if let Some(b) = backend {
                cfg.score.backend = b.into();
            }
            let model = match model {
                Some(dir) => {
                    darkwatch::bench::check_model_dir(&dir).map_err(anyhow::Error::msg)?;
                    Model::load(&dir)?.with_configured_backend(&dir, &cfg)?
                }
                None if cfg.score.backend == Backend::Onnx => {
                    anyhow::bail!("--backend onnx needs --model DIR with an ONNX graph");
                }
                None if cfg.score.backend == Backend::Cuda => {
                    anyhow::bail!("--backend cuda needs --model DIR");
                }
                None => model::fit::synthetic(38, 0),
            };
            let mut opts = darkwatch::bench::BenchOptions::for_frames(frames);
            if let Some(path) = input {
                opts.data = Some(bench_rows(&path, &model)?);
            }
            // Read and check the retraining data before the heads are timed, so that a
            // wrong file fails at once, not after the timing.
            let retrain_rows = match retrain_frames {
                Some(_) => Some(match retrain_data {
                    // A windowed model's own training data: build its windows.
                    Some(path) => {
                        let rows = ingest::read_table(&path, &TableOptions::default())?.values;
                        if rows.ncols() == model.meta.frame_features().len() {
                            darkwatch::window::windows(rows.view(), model.meta.window_frames)
                        } else {
                            rows
                        }
                    }
                    None => ndarray::Array2::from_shape_fn((4096, model.n_features()), |(i, j)| {
                        ((i * 31 + j * 17) % 97) as f32 / 97.0
                    }),
                }),
                None => None,
            };
            if let Some(data) = &retrain_rows
                && data.ncols() != model.n_features()
            {
                anyhow::bail!(
                    "--retrain-data has {} columns, the model takes {}",
                    data.ncols(),
                    model.n_features()
                );
            }
            let model = Arc::new(model);
            let mut sink = BenchLines::new(json.as_deref() == Some(Path::new("-")));
            let report = darkwatch::bench::run(model.clone(), &opts, &mut sink);
            sink.result()?;
            let mut record = report.to_json();
            if let (Some(rows), Some(data)) = (retrain_frames, retrain_rows) {
                eprintln!("darkwatch: timing online retraining…");
                let native = Arc::new(Model {
                    onnx: None,
                    cuda: None,
                    ..(*model).clone()
                });
                let retrain =
                    darkwatch::bench::retrain(&native, data.view(), rows, opts.latency_frames)?;
                darkwatch::bench::BenchSink::line(&mut sink, retrain.to_string().trim_end());
                sink.result()?;
                record["retrain"] = retrain.to_json();
            }
            if let Some(path) = json {
                write_json(&path, &record)?;
            }
            Ok(())
        }
        Command::SaeBench {
            sae,
            input,
            secs,
            batch,
            json,
        } => {
            check_json_out(json.as_deref())?;
            let opts = darkwatch::sae::bench::SaeBenchOptions {
                secs_per_measurement: secs,
                batch,
                ..Default::default()
            };
            let mut sink = BenchLines::new(json.as_deref() == Some(Path::new("-")));
            let report = match sae {
                Some(dir) => sae_bench_own(&dir, input.as_deref(), opts, &mut sink)?,
                None => {
                    sae_bench_batch_fits(&opts)?;
                    eprintln!(
                        "darkwatch: timing SAE scoring (about {})…",
                        darkwatch::sae::bench::duration_text(
                            opts.estimated_secs(darkwatch::bench::matmul_gflops())
                        )
                    );
                    darkwatch::sae::bench::run(&opts, &mut sink)?
                }
            };
            darkwatch::bench::BenchSink::line(&mut sink, report.to_string().trim_end());
            sink.result()?;
            if let Some(path) = json {
                write_json(&path, &report.to_json())?;
            }
            Ok(())
        }
        Command::SaeTrain {
            input,
            tensor,
            prompt_ids,
            prompt_ids_tensor,
            out,
            latents,
            k,
            epochs,
            seed,
            batch_size,
            lr,
            k_aux,
            dead_tokens,
            holdout,
            skip_positions,
            ridge,
            dark_folds,
            model_name,
            hook_name,
            force,
        } => {
            use darkwatch::sae::{dark::DarkConfig, eval, train};
            let args = eval::SaeTrainArgs {
                input: input.clone(),
                tensor,
                prompt_ids,
                prompt_ids_tensor,
                out,
                holdout,
                skip_positions,
                config: train::SaeTrainConfig {
                    latents,
                    k,
                    epochs,
                    seed,
                    batch_size,
                    lr,
                    k_aux,
                    dead_tokens,
                    ..Default::default()
                },
                dark: DarkConfig { ridge },
                dark_folds,
                meta: train::SaveMeta {
                    model_name,
                    hook_name,
                    dataset_path: Some(input.display().to_string()),
                },
                force,
            };
            let (_, text) = eval::sae_train_command(&args, &mut |p| match p {
                eval::SaeTrainProgress::Epoch(e) => eprintln!(
                    "epoch {:>3}: train NMSE {:.4}, held-out {}, dead {:.1} %, aux {:.4}",
                    e.epoch,
                    e.train_nmse,
                    e.held_out_nmse.map_or("n/a".into(), |v| format!("{v:.4}")),
                    100.0 * e.dead_share,
                    e.aux_loss
                ),
                // The head's cross-fit SAEs: most of the time with the default 5 folds.
                eval::SaeTrainProgress::Fold(f) => eprintln!(
                    "fold {}/{}: SAE trained on {} rows, NMSE {} on the fold's {} rows it did not see",
                    f.fold,
                    f.folds,
                    f.train_rows,
                    f.nmse.map_or("n/a".into(), |v| format!("{v:.4}")),
                    f.rows
                ),
            })?;
            emit(&text)?;
            Ok(())
        }
        Command::SaeHead {
            sae,
            input,
            tensor,
            prompt_ids,
            prompt_ids_tensor,
            norm_scaling_factor,
            holdout,
            skip_positions,
            ridge,
            out,
            force,
            threads,
        } => {
            // A head beside an autoencoder's model.json is never read (the folder loads as the
            // autoencoder), as `sae-train` refuses to write an SAE there.
            if let Some(dir) = &out
                && dir.join(model::io::META_FILE).exists()
            {
                anyhow::bail!(
                    "{}: holds an autoencoder model ({}); a dark-matter head written beside it would leave a folder that is both: choose another --out folder, or drop --out to write the head to the SAE's own dark/ folder, where `run` looks for it",
                    dir.display(),
                    model::io::META_FILE
                );
            }
            let args = darkwatch::sae::eval::SaeHeadArgs {
                sae,
                input,
                tensor,
                prompt_ids,
                prompt_ids_tensor,
                norm_scaling_factor,
                holdout,
                skip_positions,
                dark: darkwatch::sae::dark::DarkConfig { ridge },
                out,
                force,
            };
            let text = with_passes(threads, |passes| {
                darkwatch::sae::eval::sae_head_command_with(&args, passes)
            });
            emit(&text?)?;
            Ok(())
        }
        Command::SaeScore {
            sae,
            dark,
            input,
            tensor,
            labels,
            labels_tensor,
            prompt_ids,
            prompt_ids_tensor,
            baseline,
            baseline_tensor,
            norm_scaling_factor,
            shrinkage,
            out,
            prompt_out,
            skip_positions,
            threads,
        } => {
            let args = darkwatch::sae::eval::SaeScoreArgs {
                sae,
                dark,
                input,
                tensor,
                labels,
                labels_tensor,
                prompt_ids,
                prompt_ids_tensor,
                baseline,
                baseline_tensor,
                norm_scaling_factor,
                baseline_shrinkage: shrinkage,
                out,
                prompt_out,
                skip_positions,
            };
            let scored = with_passes(threads, |passes| {
                darkwatch::sae::eval::sae_score_command_with(&args, passes)
            });
            let (_, text) = scored?;
            emit(&text)?;
            Ok(())
        }
        Command::Inspect { dir, json, config } => {
            // An online-retraining state directory: its checkpoints and history.
            if !dir.join(model::io::META_FILE).exists()
                && (dir.join(darkwatch::retrain::HISTORY_FILE).exists()
                    || !darkwatch::retrain::CheckpointStore::new(&dir, 1)
                        .list()
                        .is_empty())
            {
                if json {
                    let value = darkwatch::retrain::describe_state_json(&dir);
                    emit(&(serde_json::to_string_pretty(&value)? + "\n"))?;
                } else {
                    emit(&darkwatch::retrain::describe_state(&dir))?;
                }
                return Ok(());
            }
            let cfg = load_config(config.as_deref())?;
            use darkwatch::sae::detector::{DetectorError, SaeDetector};
            // An SAE checkpoint, with a dark-matter head (a detector) or without (as
            // published: SAELens, a sparsify layer or run folder).
            let mut bare = (!dir.join(model::io::META_FILE).exists())
                .then(|| darkwatch::sae::Sae::load(&dir).ok())
                .flatten();
            if bare.is_some() || SaeDetector::is_sae_dir(&dir) {
                if json {
                    eprintln!(
                        "darkwatch: note: --json describes model and state folders; an SAE folder is described as text"
                    );
                }
                let loaded = SaeDetector::load_on(
                    &dir,
                    cfg.sae.clone(),
                    cfg.score.backend,
                    &cfg.cuda,
                    cfg.pipeline.gpu_batch_frames(),
                );
                if let (Err(DetectorError::NoHead { .. }), Some(sae)) = (&loaded, bare.as_mut()) {
                    // The factor reaches the summary; a missing one warns, as for `run`.
                    darkwatch::sae::detector::apply_norm_scaling(
                        sae,
                        cfg.sae
                            .norm_scaling_factor
                            .map(|s| (s, "[sae] norm_scaling_factor")),
                        None,
                    )?;
                }
                match (loaded, bare) {
                    (Ok(det), _) => emit(&det.summary())?,
                    (Err(DetectorError::NoHead { .. }), Some(sae)) => emit(&format!(
                        "SAE checkpoint, no dark-matter head\n{}\
                         head         none: `darkwatch sae-head --sae {} --input <normal activations>` fits one\n",
                        sae.summary(),
                        dir.display()
                    ))?,
                    (Err(e), _) => return Err(e.into()),
                }
                return Ok(());
            }
            if !dir.join(model::io::META_FILE).exists() && dir.is_dir() {
                anyhow::bail!(
                    "{}: not a darkwatch model directory (no {}), an SAE checkpoint (cfg.json with its weights) or an online-retraining state directory",
                    dir.display(),
                    model::io::META_FILE
                );
            }
            let model = Model::load(&dir)?.with_configured_backend(&dir, &cfg)?;
            if json {
                // model.json leaves out a window and a smoothing span of 1; inspect shows
                // both always, so that a model that scores rows alone says so.
                let mut meta = serde_json::to_value(&model.meta)?;
                if let Some(obj) = meta.as_object_mut() {
                    for (key, v) in [
                        ("window_frames", model.meta.window_frames),
                        ("smooth_frames", model.meta.smooth_frames),
                    ] {
                        obj.entry(key).or_insert_with(|| v.into());
                    }
                    obj.entry("table")
                        .or_insert_with(|| model.meta.table.into());
                }
                emit(&format!("{}\n", serde_json::to_string_pretty(&meta)?))?;
            } else {
                emit(&model::io::describe(&model, &dir))?;
            }
            Ok(())
        }
        Command::Validate { config, agent } => {
            let cfg = load_config(Some(&config))?;
            if !agent {
                let model = load_model(Some(&config), &cfg, Detector::load_native)?;
                // What `run` refuses with 78 for this model and configuration alone (an SAE
                // with other than raw input or with retraining, thresholds that cannot
                // calibrate) is refused here too; the backend and folders need --agent.
                check_runs(Some(&config), &cfg, &model)?;
                if let Some(w) = model.warning() {
                    println!("note: {w}");
                }
                println!(
                    "{}: ok; model {} in {} loads, suits the configuration and its thresholds calibrate",
                    config.display(),
                    model.id(),
                    cfg.agent.model_dir.display()
                );
                return Ok(());
            }
            check_dirs(Some(&config), &cfg)?;
            let model = load_model(Some(&config), &cfg, Detector::load_checked)?;
            check_runs(Some(&config), &cfg, &model)?;
            if let Some(w) = model.warning() {
                println!("note: {w}");
            }
            // What `run` takes once it starts. A port in use or a held spool is most often
            // the running agent itself (validate is run before a restart): a note, not a
            // failure; the configuration is what validate judges. Another bind error fails.
            let notes = darkwatch::agent::check_claims(&cfg)
                .with_context(|| format!("{}: `run` would fail now", config.display()))?;
            for note in &notes {
                println!("note: {note}");
            }
            let metrics_taken = notes.iter().any(|n| n.starts_with("[metrics]"));
            let spool_taken = notes.len() > usize::from(metrics_taken);
            println!(
                "{}: ok; model {} (version {}, {} features, {}) in {} loads and its thresholds calibrate; {} can take the alert spool{}{}{}",
                config.display(),
                model.id(),
                model.version(),
                model.features().len(),
                model.backend_label(),
                cfg.agent.model_dir.display(),
                cfg.spool.dir.display(),
                if spool_taken {
                    " (held now, see the note)"
                } else {
                    " and no other agent holds it"
                },
                if cfg.metrics.listen.is_empty() {
                    String::new()
                } else if metrics_taken {
                    format!(
                        "; [metrics] listen {} is in use now (see the note)",
                        cfg.metrics.listen
                    )
                } else {
                    format!("; [metrics] listen {} is free", cfg.metrics.listen)
                },
                if cfg.retrain.enabled && !cfg.retrain.state_dir.as_os_str().is_empty() {
                    format!("; {} can take checkpoints", cfg.retrain.state_dir.display())
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::PrintConfig { config } => {
            emit(&load_config(config.as_deref())?.to_toml())?;
            Ok(())
        }
    }
}

/// Says which columns never change in the training rows: the model learns nothing about
/// them, and later any change in one counts in its raw units.
fn warn_constant_columns(table: &ingest::Table) {
    let constant: Vec<&str> = table
        .values
        .columns()
        .into_iter()
        .zip(&table.features)
        .filter(|(c, _)| c.iter().all(|&v| v == c[0]))
        .map(|(_, name)| name.as_str())
        .collect();
    let d = table.features.len();
    if constant.len() == d {
        eprintln!(
            "darkwatch: warning: every column of the training data is constant: the model can learn nothing from it, and any change at all will score as an anomaly. Train on rows from normal operation that vary"
        );
    } else if !constant.is_empty() {
        let shown = constant.len().min(8);
        let more = if constant.len() > shown {
            format!(" and {} more", constant.len() - shown)
        } else {
            String::new()
        };
        eprintln!(
            "darkwatch: note: {} of {d} columns are constant in the training data ({}{more}): the model cannot learn them, and any later change in one counts in its raw units",
            constant.len(),
            constant[..shown].join(", ")
        );
    }
}

/// The folders `train` made for a model (the model folder, up to the first of its parents
/// that was not there), removed when dropped, each only if empty, unless `made` is emptied.
struct RemoveIfEmpty<'a> {
    made: Vec<&'a Path>,
}

impl<'a> RemoveIfEmpty<'a> {
    /// Remembers which of `dir` and its parents do not exist yet, before they are made.
    fn before_making(dir: &'a Path) -> Self {
        let made = dir
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .collect();
        RemoveIfEmpty { made }
    }
}

impl Drop for RemoveIfEmpty<'_> {
    fn drop(&mut self) {
        // Innermost first; remove_dir refuses a folder with anything in it.
        for dir in &self.made {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// The warning for an `.npz` trained on as a stream: ODDS and ADBench tables come as
/// `.npz` (the harness takes every `.npz` for a table), and one whose outliers are stored
/// together scores higher with each score the mean of its neighbouring rows, for no merit
/// of the model. `None` for `--table`, another kind of file, or scores that are not
/// averaged (`smooth_frames` 1).
fn npz_read_as_a_stream(
    input: &Path,
    rows_unordered: bool,
    cfg: &darkwatch::config::DarkwatchConfig,
) -> Option<String> {
    let npz = input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
    if !npz || rows_unordered || cfg.score.smooth_frames <= 1 {
        return None;
    }
    Some(format!(
        "{}: an .npz is read as a stream, its rows in order: each score will be the mean of its row's and the {} rows' before it ([score] smooth_frames {}). An ODDS / ADBench table's rows have no order, and where its outliers are stored together that mean raises AUROC and AUPRC for no merit of the model; `harness` scores every .npz as a table. For a table, train with --table.",
        input.display(),
        cfg.score.smooth_frames.saturating_sub(1),
        cfg.score.smooth_frames,
    ))
}

fn train(
    input: &Path,
    out: &Path,
    config: Option<&Path>,
    force: bool,
    rows_unordered: bool,
) -> Result<()> {
    let mut cfg = load_config(config)?;
    // A table's rows have no order: averaging a row's score with the rows before it, or a
    // lag window of them, would mix unrelated points (and reward files that list their
    // outliers together).
    if rows_unordered {
        cfg.score.smooth_frames = 1;
        cfg.model.window_frames = 1;
    }
    let opts = TableOptions {
        timestamp_column: Some(cfg.input.timestamp_column.clone()).filter(|s| !s.is_empty()),
        features: None,
    };
    // An SAE folder is refused, as `sae-train` refuses a model folder: with model.json beside
    // its checkpoint, `run` and `inspect` would take the folder for an autoencoder.
    let sae = darkwatch::sae::detector::SaeDetector::files_in(out);
    if !sae.is_empty() {
        anyhow::bail!(
            "{}: holds an SAE ({}); an autoencoder model written beside it would leave a folder that is both: choose another --out folder",
            out.display(),
            sae.join(", ")
        );
    }
    // A model already there is replaced only with --force, once training succeeds.
    let old_model = darkwatch::train::check_model_folder(out, &cfg.onnx.file, force)?;
    // Find out now, not after training, whether the model can be written.
    if out.exists() && !out.is_dir() {
        anyhow::bail!(
            "{}: --out is a file, not a folder: train writes the model folder (model.json and its weights) there; choose another path",
            out.display()
        );
    }
    // A folder made here is taken away again if training fails before the model is saved
    // in it, so a failed run does not leave an empty folder that looks like a model's.
    let mut made = RemoveIfEmpty::before_making(out);
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: --out: cannot create the model folder", out.display()))?;
    // Read once, hashed from the same bytes: a pipe cannot be read again.
    let (mut table, sha) = replay::read_input_hashed(input, &opts)?;
    // Gaps are filled as replay fills them (the last value carried forward, as the agent
    // does for up to [assemble] stale_secs),
    // not dropped: a dropped row would join the rows on either side of it into one lag
    // window, and the model would learn from inputs unlike the ones it will score.
    // A table's rows have no order: its gaps take the column's mean, not a neighbour's value.
    let gaps = replay::fill_gaps(
        input,
        &mut table.values,
        &table.features,
        None,
        !rows_unordered,
    )
    .map_err(|reason| anyhow::anyhow!("{}: {reason}", input.display()))?;
    eprintln!(
        "darkwatch: training on {} ({} rows × {} feature{})",
        input.display(),
        table.values.nrows(),
        table.values.ncols(),
        if table.values.ncols() == 1 { "" } else { "s" }
    );
    if let Some(why) = npz_read_as_a_stream(input, rows_unordered, &cfg) {
        eprintln!("darkwatch: warning: {why}");
    }
    if !gaps.is_empty() {
        eprintln!("darkwatch: warning: {gaps}");
    }
    warn_constant_columns(&table);
    // The bar draws only on a terminal; a pipe, a CI log or journald gets epoch lines.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut epoch_log = darkwatch::train::EpochLog::new(std::time::Duration::from_secs(5));
    let started = std::time::Instant::now();
    let bar = ProgressBar::new(cfg.train.epochs_max as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut model, report) = model::fit::fit(&table, &sha, &cfg, &mut |e| {
        if !tty {
            for line in epoch_log.epoch(e, started.elapsed()) {
                eprintln!("darkwatch: {line}");
            }
        }
        bar.set_position(e.epoch as u64);
        let member = if e.members > 1 {
            format!(" (member {} of {})", e.member, e.members)
        } else {
            String::new()
        };
        match e.val_loss {
            Some(v) => bar.set_message(format!("loss {:.4} val {:.4}{member}", e.train_loss, v)),
            None => bar.set_message(format!("loss {:.4}{member}", e.train_loss)),
        }
    })
    .map_err(|e| match e {
        // A setting the data cannot take (a network too large, no held-out rows) is a
        // configuration error (exit 78), as one found when loading the config is.
        darkwatch::train::TrainError::InvalidConfig { key, reason } => {
            anyhow::Error::from(ConfigError::Invalid {
                file: config::source_name(config, std::env::vars()),
                key: key.into(),
                reason,
            })
        }
        e => anyhow::Error::from(e).context("training failed"),
    })?;
    bar.finish_and_clear();
    if let Some(line) = epoch_log.finish().filter(|_| !tty) {
        eprintln!("darkwatch: {line}");
    }
    for removed in darkwatch::train::clear_model_folder(&old_model)? {
        eprintln!(
            "darkwatch: note: removed {}, which belonged to the model replaced",
            removed.display()
        );
    }
    // Remembered, so that `replay` of this model scores a table without being told again.
    model.meta.table = rows_unordered;
    model.save(out)?;
    made.made.clear();
    if let Some(note) = report.still_falling_note(model.ae.members, cfg.train.epochs_max) {
        eprintln!("darkwatch: note: {note}");
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
    if model.ae.members > 1 {
        println!(
            "ensemble: {} networks, each trained from its own seed and epoch order, their per-feature terms averaged; the epochs and losses above are the first network's ([model] members)",
            model.ae.members
        );
    }
    if rows_unordered {
        println!(
            "table: rows have no order, so each row is scored alone: no smoothing (smooth_frames 1), no lag window (window_frames 1)"
        );
    }
    if model.meta.window_frames > 1 {
        // A window chosen from the data says how, a fallback above all: a period the search
        // could not take (a weekly one of a half-hourly series) is otherwise silent.
        let (auto, why) = darkwatch::window::auto_window_explained(table.values.view());
        let why = if cfg.model.window_frames == 0 && auto == model.meta.window_frames {
            format!(" ({why})")
        } else {
            String::new()
        };
        println!(
            "lag window: {} frames{why}, of {} feature(s), {} inputs ([model] window_frames)",
            model.meta.window_frames,
            model.meta.frame_features().len(),
            model.meta.features.len()
        );
    }
    let calibration = &model.meta.calibration;
    println!(
        "calibration: {} held-out scores, q0.99 {:.4}, q0.999 {:.4}",
        calibration.rows,
        calibration.quantile(0.99).unwrap_or(f32::NAN),
        calibration.quantile(0.999).unwrap_or(f32::NAN)
    );
    // The threshold the config asks for, built as replay and `run` will build it: where it
    // starts says how often the model will alert, which the loss does not.
    let scores = model.threshold_scores();
    match cfg.threshold.build(&scores) {
        Ok(t) if t.kind() != darkwatch::threshold::ThresholdKind::Dspot => {
            let start = t.threshold();
            let above = scores.iter().filter(|&&s| s > start).count();
            let largest = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            // A quantile threshold is fixed by [threshold] quantile; risk_q moves only SPOT.
            let (setting, verb) = match t.kind() {
                darkwatch::threshold::ThresholdKind::Quantile => (
                    format!("quantile {}", cfg.threshold.quantile),
                    "is fixed at",
                ),
                _ => (format!("risk_q {}", cfg.threshold.risk_q), "starts at"),
            };
            // SPOT below min_peaks: the start is the empirical fallback, which an operator's
            // trial read as a fitted tail.
            let snap = t.snapshot();
            let fallback = match (t.kind(), snap.gamma) {
                (darkwatch::threshold::ThresholdKind::Spot, None) => format!(
                    "; that is the held-out scores' empirical 1 - risk_q quantile until the stream adds {} peaks to their {} (min_peaks {}), then the GPD tail's",
                    cfg.threshold.min_peaks.saturating_sub(snap.peaks_held),
                    snap.peaks_held,
                    cfg.threshold.min_peaks
                ),
                _ => String::new(),
            };
            println!(
                "threshold: {} ({setting}) {verb} {start:.4}: {above} of {} held-out scores above it (the largest {largest:.4}){fallback}",
                t.kind().name(),
                scores.len()
            );
        }
        Ok(_) => {}
        Err(e) => eprintln!(
            "darkwatch: warning: no threshold can be calibrated on this model's {} held-out scores ({e}): replay will score without alerts and `run` will refuse this model. Train on more rows, or raise [train] validation_fraction",
            calibration.rows
        ),
    }
    println!("wrote {}", out.display());
    Ok(())
}
