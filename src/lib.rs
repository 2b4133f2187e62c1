//! darkwatch: a streaming anomaly-detection agent.
//!
//! # Layout
//!
//! The modules follow the data flow of `DESIGN.md`:
//!
//! - [`agent`]: the daemon: MQTT in, frames per stream, the pipeline, alerts out over MQTT.
//! - [`demo`]: the self-contained demo (embedded broker, publisher, agent, subscriber).
//! - [`config`]: the TOML configuration (`DarkwatchConfig`), environment overrides, validation.
//! - [`ingest`]: file inputs (CSV, NPY, label files) and the file source that replays them.
//! - [`ring`]: the lock-free SPSC frame ring between a source and the scorer, with its full policy.
//! - [`metrics`]: Prometheus `/metrics` for the agent.
//! - [`systemd`]: sd_notify (READY, STATUS, WATCHDOG tied to scorer progress) for `darkwatch run`.
//! - [`model`]: the dense autoencoder (plain or probabilistic), its scaler and its model directory.
//! - [`train`]: Adam, mini-batches and early stopping for the autoencoder.
//! - [`retrain`]: online retraining: the clean-frame reservoir, warm-start refits, the
//!   validation gate, hot swap and crash-safe checkpoints.
//! - [`mss`]: mean-shift scoring: the reference bank and the exact k-NN shift of a frame.
//! - [`smooth`]: per-stream trailing means of scores and contributions (`[score] smooth_frames`).
//! - [`score`]: score heads (`mse`, `max_abs`, `wnll`) with per-feature contributions.
//! - [`threshold`]: alarm thresholds on the scores (SPOT, drift-aware DSPOT, static quantile).
//! - [`pipeline`]: the scorer thread that drains the ring in micro-batches and feeds sinks.
//! - [`alert`]: per-stream alert state (k-of-n hysteresis) and Alertmanager-shaped events.
//! - [`spool`]: the on-disk, size-bounded FIFO that keeps alerts while the broker is unreachable.
//! - [`mqtt`]: the MQTT client (data in, alerts out through the spool) and the embedded broker.
//! - [`alertmanager`]: `darkwatch alertmanager`, the bridge from MQTT alert events to Alertmanager.
//! - [`eval`]: point-wise AUROC / AUPRC / best-F1 (and the labelled point-adjusted F1).
//! - [`harness`]: trains and replays every SMD machine and ODDS table given, one table of metrics.
//! - [`hitrate`]: OmniAnomaly's HitRate of the culprit metrics on interpretation labels (harness, replay).
//! - [`plot`]: the replay score plot (PNG with threshold, alert and label spans).
//! - [`record`]: `darkwatch record`: the frames the agent would assemble from MQTT, to a
//!   training CSV.
//! - [`outputs`]: the check that a command's output files overwrite none of its inputs or
//!   its model's files.
//! - [`bench`]: the operator-facing latency and throughput summary.
//! - [`stats`]: small allocation-free helpers (latency histogram, top-k selection).
//! - [`sae`]: sparse autoencoders on LM activations (SAELens / sparsify loaders, SIMD forward) and the dark-matter head.

pub mod agent;
pub mod alert;
pub mod alertmanager;
pub mod bench;
pub mod config;
pub mod demo;
pub mod detector;
pub mod eval;
pub mod harness;
pub mod hitrate;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod mss;
pub mod outputs;
pub mod pipeline;
pub mod plot;
pub mod record;
pub mod replay;
pub mod retrain;
pub mod ring;
pub mod rng;
pub mod sae;
pub mod score;
pub mod smooth;
pub mod spool;
pub mod stats;
pub mod systemd;
pub mod threshold;
pub mod train;
pub mod window;
