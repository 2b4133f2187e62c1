//! The configuration: one TOML file, environment overrides `DARKWATCH__SECTION__KEY`,
//! typed sections with `deny_unknown_fields`, and semantic validation.
//!
//! The binary loads a [`DarkwatchConfig`] here and hands typed sections to the parts
//! that `build()` from them; the library never reads the environment itself except
//! through [`load`], which the binary calls.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::agent::AgentConfig;
use crate::alert::AlertConfig;
use crate::ingest::assemble::AssemblerConfig;
use crate::ingest::examon::ExamonConfig;
use crate::ingest::raw::RawConfig;
use crate::ingest::telegraf::TelegrafConfig;
use crate::metrics::MetricsConfig;
use crate::model::{OutputKind, ScalerKind};
use crate::mqtt::MqttConfig;
use crate::mss::MssConfig;
use crate::retrain::RetrainConfig;
use crate::ring::FullPolicy;
use crate::score::{Head, HeadKind, LogVariance};
use crate::spool::SpoolConfig;
use crate::threshold::ThresholdConfig;
use crate::train::TrainConfig;

/// Prefix of environment overrides: `DARKWATCH__TRAIN__EPOCHS_MAX=50`.
pub const ENV_PREFIX: &str = "DARKWATCH";

/// The whole configuration. Every section has documented defaults, so an empty file is valid.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DarkwatchConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub score: ScoreConfig,
    pub mss: MssConfig,
    pub threshold: ThresholdConfig,
    pub alert: AlertConfig,
    pub pipeline: PipelineConfig,
    pub input: InputConfig,
    pub agent: AgentConfig,
    pub mqtt: MqttConfig,
    pub assemble: AssemblerConfig,
    pub examon: ExamonConfig,
    pub telegraf: TelegrafConfig,
    pub raw: RawConfig,
    pub spool: SpoolConfig,
    pub metrics: MetricsConfig,
    pub onnx: OnnxConfig,
    pub cuda: CudaConfig,
    pub retrain: RetrainConfig,
    pub sae: crate::sae::detector::SaeConfig,
    /// `darkwatch alertmanager`: the bridge from MQTT alert events to Alertmanager.
    pub alertmanager: crate::alertmanager::AlertmanagerConfig,
    /// Each stream's score published over MQTT (ExaMon's `examon-ai_pub` topics).
    pub scores: crate::mqtt::ScoresConfig,
}

/// Shape of the autoencoder that `train` builds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `probabilistic` (mean and variance outputs, Gaussian NLL; needed by `wnll`) or `plain` (MSE).
    pub kind: OutputKind,
    /// Hidden layer widths; empty means the MSS-PAE rule for the input dimension.
    /// From the environment: `DARKWATCH__MODEL__HIDDEN_SIZES=16,8,16` (or one number).
    #[serde(deserialize_with = "widths")]
    pub hidden_sizes: Vec<usize>,
    /// Feature scaling fitted on the training data: `z_score` or `min_max`.
    pub scaler: ScalerKind,
    /// Frames per lag window (see [`crate::window`]): 1 scores each frame alone; 0 picks
    /// [`crate::window::auto_window`] (one-feature series get their period, 8 to 64).
    pub window_frames: usize,
    /// Autoencoders trained side by side from different seeds, their per-feature terms
    /// averaged (see [`crate::model::Autoencoder`]); 0 picks [`default_members`].
    pub members: usize,
}

/// Ensemble members `[model] members = 0` gives a model of `d` inputs (after any lag
/// window): [`SMALL_INPUT_MEMBERS`] below 20 inputs, where the MSS-PAE rule gives one hidden
/// layer of d/2 units and such a small network's ranking depends on its seed; 1 from 20 on.
pub fn default_members(d: usize) -> usize {
    if d < 20 { SMALL_INPUT_MEMBERS } else { 1 }
}

/// Members of a small-input ensemble: the deep-ensembles paper's M = 5 (Lakshminarayanan
/// et al., 2017).
pub const SMALL_INPUT_MEMBERS: usize = 5;

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: OutputKind::Probabilistic,
            hidden_sizes: Vec::new(),
            scaler: ScalerKind::ZScore,
            window_frames: 0,
            members: 0,
        }
    }
}

/// How frames are scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConfig {
    /// `wnll` (weighted Gaussian NLL), `mse`, or `max_abs`.
    pub head: HeadKind,
    /// wnll weight of the variance-normalised error.
    pub wnll_alpha: f32,
    /// wnll weight of the log-variance.
    pub wnll_beta: f32,
    /// `bounded`: the variance clamped between the feature's usual level (at least its
    /// spread) and its held-out maximum, only log-variance above the floor counts;
    /// `excess`: the same without the spread floor; `raw`: β·ln v as in the paper.
    pub wnll_log_variance: LogVariance,
    /// The `bounded` floor of each predicted variance, as a share of the feature's spread
    /// (its variance over the training rows after scaling: 1 under z-scoring).
    pub wnll_variance_floor: f32,
    /// Frames each score (and its contributions) is averaged over, per stream: the mean of
    /// the frame and the `n − 1` before it ([`crate::smooth`]); 1 scores frames alone.
    /// Stored with the model at training.
    pub smooth_frames: usize,
    /// Contributing features reported per frame (at most 16).
    pub top_contributions: usize,
    /// What runs the autoencoder: `native` (darkwatch's own kernels), `onnx` (the model
    /// directory's ONNX file through ONNX Runtime; needs the `onnx` cargo feature) or `cuda`
    /// (the same network on an NVIDIA GPU, see [`CudaConfig`]; needs the `cuda` feature).
    /// An SAE folder scores on `native` or `cuda` (the SAE and its dark-matter head on the
    /// GPU; TopK, ReLU and JumpReLU SAEs, others fall back as `[cuda] fallback` says); `onnx` does not
    /// apply to it (with the `onnx` feature a warning, then native).
    pub backend: Backend,
}

/// What runs a model's autoencoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Native,
    Onnx,
    Cuda,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Onnx => "onnx",
            Backend::Cuda => "cuda",
        }
    }
}

/// The CUDA backend (`[score] backend = "cuda"`): the native network's weights on an NVIDIA
/// GPU, run with cuBLAS and darkwatch's own NVRTC kernels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaConfig {
    /// The CUDA device index (0: the first GPU).
    pub device: usize,
    /// When no usable GPU is found (no driver, no device, no cuBLAS/NVRTC): `cpu` (warn and
    /// score with the native kernels) or `error` (refuse to start).
    pub fallback: CudaFallback,
    /// Let cuBLAS use TF32 tensor cores for the fp32 GEMMs (faster, ~1e-3 relative error;
    /// off: full fp32, within 1e-4 of the native scores).
    pub tf32: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            device: 0,
            fallback: CudaFallback::Cpu,
            tf32: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaFallback {
    #[default]
    Cpu,
    Error,
}

/// The ONNX Runtime backend (`[score] backend = "onnx"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxConfig {
    /// The ONNX file, relative to the model directory.
    pub file: String,
    /// The ONNX Runtime shared library. Empty: `$ORT_DYLIB_PATH`, else `libonnxruntime.so`
    /// on the loader's search path.
    pub library: String,
    /// Execution provider: `cpu` or `cuda`.
    pub provider: OnnxProvider,
    /// When the provider is not available: `cpu` (warn and run on CPU) or `error`.
    pub fallback: OnnxFallback,
    /// Threads ONNX Runtime may use inside one run (1: the scorer thread only).
    pub intra_threads: usize,
}

impl Default for OnnxConfig {
    fn default() -> Self {
        OnnxConfig {
            file: "model.onnx".into(),
            library: String::new(),
            provider: OnnxProvider::Cpu,
            fallback: OnnxFallback::Cpu,
            intra_threads: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnnxProvider {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnnxFallback {
    #[default]
    Cpu,
    Error,
}

/// Frames a score is averaged over by default: the alert rule's window (`[alert] fire_n`),
/// so the score an alert judges covers the span the rule looks at ([`crate::smooth`]).
pub const DEFAULT_SMOOTH_FRAMES: usize = 5;

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            head: HeadKind::Wnll,
            wnll_alpha: 0.5,
            wnll_beta: 2.0,
            wnll_log_variance: LogVariance::Bounded,
            wnll_variance_floor: crate::score::DEFAULT_VARIANCE_FLOOR,
            smooth_frames: DEFAULT_SMOOTH_FRAMES,
            top_contributions: 3,
            backend: Backend::Native,
        }
    }
}

impl ScoreConfig {
    /// The head this section describes.
    pub fn head(&self) -> Head {
        Head {
            kind: self.head,
            alpha: self.wnll_alpha,
            beta: self.wnll_beta,
            log_variance: self.wnll_log_variance,
            variance_floor: self.wnll_variance_floor,
        }
    }
}

/// Layer widths from a TOML array, one integer, or a comma-separated string (how an
/// environment override arrives).
fn widths<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Widths {
        List(Vec<usize>),
        One(usize),
        Text(String),
    }
    match Widths::deserialize(de)? {
        Widths::List(v) => Ok(v),
        Widths::One(w) => Ok(vec![w]),
        Widths::Text(s) if s.trim().is_empty() => Ok(Vec::new()),
        Widths::Text(s) => s
            .split(',')
            .map(|w| w.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                serde::de::Error::custom(format!("\"{s}\" is not a comma-separated list of widths"))
            }),
    }
}

/// Strings from a TOML array or a comma-separated string (how an environment override
/// arrives); blank entries are dropped.
pub(crate) fn strings<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Strings {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Strings::deserialize(de)? {
        Strings::List(v) => v,
        Strings::Text(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// Most contributions a frame can carry (fixed so records need no allocation).
pub const MAX_TOP_CONTRIBUTIONS: usize = 16;

impl PipelineConfig {
    /// The micro-batch of a scorer on the GPU: every frame that is ready, up to the larger
    /// of `batch_max_frames` and the ring's capacity. A GPU batch pays its launches and
    /// copies whatever its size. A batch never waits to fill (under a backlog a frame's
    /// result waits for its whole batch), and the buffers grow with the cap.
    pub fn gpu_batch_frames(&self) -> usize {
        self.batch_max_frames.max(self.ring_capacity_frames)
    }
}

/// The ring and the scorer thread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Frames the source-to-scorer ring holds.
    pub ring_capacity_frames: usize,
    /// Most frames the scorer drains and scores as one micro-batch. A scorer on the GPU
    /// takes up to the larger of this and `ring_capacity_frames` ([`Self::gpu_batch_frames`]).
    pub batch_max_frames: usize,
    /// What a live source does when the ring is full: `drop_newest` (counted) or `block`.
    /// File replay always blocks, so a replay never loses a frame. In the agent `block`
    /// holds the MQTT client's thread (keep-alive, acknowledgements, the alert spool).
    pub full_policy: FullPolicy,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            ring_capacity_frames: 4096,
            batch_max_frames: 256,
            full_policy: FullPolicy::DropNewest,
        }
    }
}

/// How input files are read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// CSV column holding timestamps (epoch seconds, ms, µs or ns by size; RFC 3339 or an
    /// ISO 8601 date or date-time, UTC unless it has an offset); empty means auto-detect
    /// `timestamp`, `time` or `ts`.
    pub timestamp_column: String,
}

/// A configuration that could not be loaded or is invalid. Its message names the file,
/// the key and the reason; the binary exits with 78 (EX_CONFIG) on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {reason}")]
    Load { file: String, reason: String },
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

/// Where a configuration came from, as [`ConfigError`] names it: the file (or
/// `(defaults)`) and any `DARKWATCH__` variables that override it. For errors found after
/// loading (`train` refusing a setting its data cannot take).
pub fn source_name<I>(path: Option<&Path>, env: I) -> String
where
    I: IntoIterator<Item = (String, String)>,
{
    let file = path.map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
    let mut names: Vec<String> = env
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    names.sort();
    if names.is_empty() {
        file
    } else {
        format!("{file} (with environment {})", names.join(", "))
    }
}

/// Loads `path` (or only the defaults when `None`) with environment overrides from `env`
/// (pairs of name and value; the binary passes `std::env::vars()`), then validates it.
///
/// # Errors
/// Unreadable or malformed file, unknown key, wrong type, or a value out of range.
pub fn load<I>(path: Option<&Path>, env: I) -> Result<DarkwatchConfig, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let file = path.map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
    let mut builder = config::Config::builder();
    let mut strict = None;
    if let Some(p) = path {
        // Anything readable that is not a folder: a file, or a pipe or process
        // substitution (`--config <(…)`, `/dev/stdin`), which is no regular file.
        if p.is_dir() {
            return Err(ConfigError::Load {
                file,
                reason: "is a directory, not a file".into(),
            });
        }
        // Read once: the text the `config` crate merges is the text checked strictly below
        // (a file rewritten in between, say during a reload, cannot slip past the check).
        let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Load {
            file: file.clone(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "no such file".into()
            } else {
                e.to_string()
            },
        })?;
        // The `config` crate converts between types (a float or `true` into an integer key,
        // a string of digits into a number) to read environment text; in the file a number
        // or boolean key is held to its type, so `members = 3.7` is an error rather than 4.
        // Its own message (a TOML syntax error, an unknown key) comes first where it has
        // one, from the build below.
        if let Ok(table) = text.parse::<toml::Table>() {
            strict = mistyped(&table, &defaults_table(), "");
        }
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    let overrides: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    let env_names: Vec<String> = overrides.keys().cloned().collect();
    // Values stay text: a number, boolean or list is parsed from it only where the key
    // takes one, so a password `0123` or a client id `007` arrives as written.
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(Some(overrides)),
    );
    let source = if env_names.is_empty() {
        file.clone()
    } else {
        format!("{file} (with environment {})", env_names.join(", "))
    };
    let cfg: DarkwatchConfig = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Load {
            file: source.clone(),
            // TOML syntax errors come with a multi-line snippet: keep the message one line.
            reason: with_allowed_values(
                &e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        })?;
    if let Some((key, reason)) = strict {
        return Err(ConfigError::Invalid { file, key, reason });
    }
    cfg.validate()
        .map_err(|(key, reason)| ConfigError::Invalid {
            file: source,
            key,
            reason,
        })?;
    Ok(cfg)
}

/// Checks that `dir` can be made (with any missing parents) and take a new file, and
/// leaves nothing behind: a probe file is made and removed, and so are the folders made
/// for the check. What `validate --agent` and `run` check of each folder the agent writes
/// before it starts ([`crate::agent::check_dirs`]); safe beside an agent using `dir`.
///
/// # Errors
/// The error of making the folder or the probe file.
pub fn probe_writable_dir(dir: &Path) -> std::io::Result<()> {
    // The folders that are not there yet, deepest first: made here, removed after.
    let mut made = Vec::new();
    let mut missing = dir;
    while std::fs::symlink_metadata(missing).is_err() {
        made.push(missing);
        match missing.parent() {
            Some(p) if !p.as_os_str().is_empty() => missing = p,
            _ => break,
        }
    }
    let probed = std::fs::create_dir_all(dir).and_then(|()| {
        let probe = dir.join(format!(".tmp-darkwatch-probe-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe);
        let removed = std::fs::remove_file(&probe);
        file.and(removed)
    });
    for folder in made {
        let _ = std::fs::remove_dir(folder);
    }
    probed
}

/// The defaults as a TOML table: the type each key takes.
fn defaults_table() -> toml::Table {
    toml::Table::try_from(DarkwatchConfig::default()).unwrap_or_default()
}

/// The first key of `file` whose value is not of the number or boolean type its default
/// has (an integer also serves a float key), with the reason. String, list and enum keys
/// are left to the deserializer, which reads a number as text where a string is wanted;
/// string values are never echoed (a password may be one).
fn mistyped(file: &toml::Table, defaults: &toml::Table, prefix: &str) -> Option<(String, String)> {
    use toml::Value;
    for (key, value) in file {
        let dotted = format!("{prefix}{key}");
        let Some(default) = defaults.get(key) else {
            continue;
        };
        let shown = match value {
            Value::String(_) => "a string".to_string(),
            Value::Array(_) => "a list".to_string(),
            Value::Table(_) => "a table".to_string(),
            other => format!("{} {other}", other.type_str()),
        };
        let want = match (default, value) {
            (Value::Table(d), Value::Table(f)) => {
                if let Some(found) = mistyped(f, d, &format!("{dotted}.")) {
                    return Some(found);
                }
                continue;
            }
            (Value::Integer(_), Value::Integer(_))
            | (Value::Float(_), Value::Float(_) | Value::Integer(_))
            | (Value::Boolean(_), Value::Boolean(_)) => continue,
            (Value::Integer(_), _) => "an integer",
            (Value::Float(_), _) => "a number",
            (Value::Boolean(_), _) => "true or false",
            _ => continue,
        };
        return Some((dotted, format!("must be {want}, not {shown}")));
    }
    None
}

/// The `config` crate reports a bad enum value as "enum HeadKind does not have variant
/// constructor max-abs for key `score.head`", without the values allowed. For the enums a
/// configuration holds this becomes serde's own message, which lists them: "unknown variant
/// `max-abs`, expected one of `mse`, `max_abs`, `wnll` for key `score.head`".
fn with_allowed_values(reason: &str) -> String {
    if let Some(range) = out_of_range(reason) {
        return range;
    }
    fn probe<T: serde::de::DeserializeOwned>(value: &str) -> Option<String> {
        let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(value);
        T::deserialize(de).err().map(|e| e.to_string())
    }
    let Some((head, rest)) = reason.split_once(" does not have variant constructor ") else {
        return reason.to_string();
    };
    let Some(name) = head.rsplit_once("enum ").map(|(_, n)| n.trim()) else {
        return reason.to_string();
    };
    let (value, key) = match rest.split_once(" for key ") {
        Some((v, k)) => (v, format!(" for key {k}")),
        None => (rest, String::new()),
    };
    let hint = match name {
        "Aggregation" => probe::<crate::ingest::assemble::Aggregation>(value),
        "Backend" => probe::<Backend>(value),
        "BrokerMode" => probe::<crate::mqtt::BrokerMode>(value),
        "CudaFallback" => probe::<CudaFallback>(value),
        "FullPolicy" => probe::<crate::ring::FullPolicy>(value),
        "HeadKind" => probe::<crate::score::HeadKind>(value),
        "InputFormat" => probe::<crate::agent::InputFormat>(value),
        "LogVariance" => probe::<crate::score::LogVariance>(value),
        "OnnxFallback" => probe::<OnnxFallback>(value),
        "OnnxProvider" => probe::<OnnxProvider>(value),
        "OutputKind" => probe::<crate::model::OutputKind>(value),
        "Precision" => probe::<crate::ingest::telegraf::Precision>(value),
        "ScalerKind" => probe::<crate::model::scaler::ScalerKind>(value),
        "TelegrafFormat" => probe::<crate::ingest::telegraf::TelegrafFormat>(value),
        "ThresholdKind" => probe::<crate::threshold::ThresholdKind>(value),
        "ScoreTopicLayout" => probe::<crate::mqtt::ScoreTopicLayout>(value),
        "ScorePayload" => probe::<crate::mqtt::ScorePayload>(value),
        "SaeScoreKind" => probe::<crate::sae::detector::SaeScoreKind>(value),
        _ => None,
    };
    match hint {
        Some(hint) => format!("{hint}{key}"),
        None => reason.to_string(),
    }
}

/// serde's "invalid type: 64-bit unsigned integer `70000`, expected an unsigned 16 bit
/// integer" (a number that does not fit the key's type) as "70000 is out of range: expected
/// an integer from 0 to 65535", the key kept; `None` for any other message.
fn out_of_range(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix("invalid type: ")?;
    let (found, rest) = rest.split_once(" integer `")?;
    if !(found.ends_with("signed") || found.ends_with("-bit")) {
        return None;
    }
    let (value, rest) = rest.split_once("`, expected ")?;
    let (expected, key) = match rest.split_once(" for key ") {
        Some((e, k)) => (e, format!(" for key {k}")),
        None => (rest, String::new()),
    };
    let expected = match expected {
        "an unsigned 8 bit integer" => "an integer from 0 to 255".to_string(),
        "an unsigned 16 bit integer" => "an integer from 0 to 65535".to_string(),
        "an unsigned 32 bit integer" => format!("an integer from 0 to {}", u32::MAX),
        "an unsigned 64 bit integer" => format!("an integer from 0 to {}", u64::MAX),
        "a signed 32 bit integer" => format!("an integer from {} to {}", i32::MIN, i32::MAX),
        // The config crate's own words for a negative number where an unsigned one goes.
        e if e.starts_with("an unsigned") => "a non-negative integer".to_string(),
        _ => return None,
    };
    Some(format!("{value} is out of range: expected {expected}{key}"))
}

impl DarkwatchConfig {
    /// Semantic checks the types cannot express. Returns the dotted key and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        // Every section checks itself and names the key within it; prefix the section.
        let section = |name: &str, checked: Result<(), (&'static str, String)>| {
            checked.map_err(|(k, r)| (format!("{name}.{k}"), r))
        };
        section("train", self.train.validate())?;
        // `train` and `harness` calibrate the threshold on the held-out rows: with none they
        // would be training rows, whose scores are optimistic. (0 stays open to code that
        // holds out rows itself: online retraining does.)
        if self.train.validation_fraction <= 0.0 {
            return Err((
                "train.validation_fraction".into(),
                format!(
                    "must lie in (0, 0.5], not {}: the held-out rows decide early stopping and \
                     calibrate the threshold, and without them it would calibrate on training \
                     rows (in-sample scores, too low a threshold)",
                    self.train.validation_fraction
                ),
            ));
        }
        if self.model.hidden_sizes.contains(&0) {
            return Err((
                "model.hidden_sizes".into(),
                "layer widths must be at least 1".into(),
            ));
        }
        if self.model.members > crate::model::io::MAX_MEMBERS {
            return Err((
                "model.members".into(),
                format!(
                    "at most {}, got {} (0 picks the default)",
                    crate::model::io::MAX_MEMBERS,
                    self.model.members
                ),
            ));
        }
        if self.model.window_frames > crate::window::MAX_WINDOW_FRAMES {
            return Err((
                "model.window_frames".into(),
                format!(
                    "at most {} frames, got {}",
                    crate::window::MAX_WINDOW_FRAMES,
                    self.model.window_frames
                ),
            ));
        }
        self.score
            .head()
            .check(self.model.kind)
            .map_err(|e| ("score.head".to_string(), e.to_string()))?;
        section("mss", self.mss.validate())?;
        section("threshold", self.threshold.validate())?;
        section("alert", self.alert.validate())?;
        section("mqtt", self.mqtt.validate())?;
        section("examon", self.examon.validate())?;
        section("telegraf", self.telegraf.validate())?;
        if self.agent.format == crate::agent::InputFormat::Telegraf {
            section(
                "telegraf",
                self.telegraf.check_subscriptions(&self.mqtt.subscribe),
            )?;
        } else {
            section("telegraf", self.telegraf.check_format(self.agent.format))?;
        }
        section("alertmanager", self.alertmanager.validate())?;
        section("scores", self.scores.validate())?;
        // Scores under the alert topic would reach what subscribes to alerts (the
        // Alertmanager bridge, `darkwatch/+/alerts/#`) as alerts.
        if self.scores.publish
            && crate::mqtt::templates_overlap(&self.scores.topic, &self.mqtt.alert_topic)
        {
            return Err((
                "scores.topic".into(),
                format!(
                    "`{}` can be a topic under [mqtt] alert_topic `{}`: what subscribes to the alerts would take scores for alerts; put the scores apart, e.g. darkwatch/{{node}}/scores/{{stream}}/{{metric}}",
                    self.scores.topic, self.mqtt.alert_topic
                ),
            ));
        }
        // The compact ExaMon topic holds org, cluster, plugin and node only: streams named by
        // another key would share its topics.
        if self.scores.publish
            && self.scores.topic_layout == crate::mqtt::ScoreTopicLayout::Compact
            && self.agent.format == crate::agent::InputFormat::Examon
            && let Some(other) = self
                .examon
                .stream_key
                .iter()
                .find(|k| !matches!(k.as_str(), "org" | "cluster" | "node"))
        {
            return Err((
                "scores.topic_layout".into(),
                format!(
                    "\"compact\" (<org>/<cluster>/<plugin>/<node>/<metric>) has no level for the stream key {other:?} of [examon] stream_key, so its streams would share topics; use \"legacy\", which keeps it as a key/value pair"
                ),
            ));
        }
        section("metrics", self.metrics.validate())?;
        section("sae", self.sae.validate())?;
        // The spool itself takes any size from a one-byte record up; the agent's records
        // are alerts, which must fit.
        if self.spool.max_bytes < crate::mqtt::MIN_SPOOL_MAX_BYTES {
            return Err((
                "spool.max_bytes".into(),
                format!(
                    "must be at least {} bytes (8 MiB less 32), got {}: one alert takes up to \
                     max_bytes / {} of the spool, and the largest alert an MQTT packet holds \
                     (1 MiB) must fit",
                    crate::mqtt::MIN_SPOOL_MAX_BYTES,
                    self.spool.max_bytes,
                    crate::spool::SEGMENTS_PER_SPOOL
                ),
            ));
        }
        section("spool", self.spool.validate())?;
        if self.score.backend == Backend::Onnx && !cfg!(feature = "onnx") {
            return Err((
                "score.backend".into(),
                "\"onnx\" needs a darkwatch built with the `onnx` feature \
                 (cargo build --release --features onnx)"
                    .into(),
            ));
        }
        if self.score.backend == Backend::Cuda && !cfg!(feature = "cuda") {
            return Err((
                "score.backend".into(),
                "\"cuda\" needs a darkwatch built with the `cuda` feature \
                 (cargo build --release --features cuda)"
                    .into(),
            ));
        }
        section("retrain", self.retrain.validate())?;
        if self.retrain.enabled {
            // A retrain calibrates its candidate's threshold on its held-out rows only; with
            // fewer than the threshold needs every retrain is rejected.
            let least = crate::retrain::min_frames_to_calibrate(
                self.retrain.holdout_fraction,
                &self.threshold,
            );
            if self.retrain.min_frames < least {
                return Err((
                    "retrain.min_frames".into(),
                    format!(
                        "must be at least {least} with [retrain] holdout_fraction = {} and \
                         [threshold] kind = \"{}\", got {}: a retrain calibrates its \
                         threshold on its held-out rows ({} of {} frames here), and the \
                         threshold needs {} scores; raise min_frames (or holdout_fraction)",
                        self.retrain.holdout_fraction,
                        self.threshold.kind.name(),
                        self.retrain.min_frames,
                        crate::retrain::holdout_rows(
                            self.retrain.min_frames,
                            self.retrain.holdout_fraction
                        ),
                        self.retrain.min_frames,
                        crate::retrain::calibration_scores_needed(&self.threshold),
                    ),
                ));
            }
        }
        if self.retrain.enabled && self.score.backend == Backend::Cuda {
            return Err((
                "retrain.enabled".into(),
                "online retraining is not supported with the CUDA backend yet (a retrained \
                 model would have to be re-uploaded to the GPU); use [score] backend = \"native\""
                    .into(),
            ));
        }
        if self.retrain.enabled && self.score.backend == Backend::Onnx {
            return Err((
                "retrain.enabled".into(),
                "online retraining fine-tunes the native network; it cannot retrain an ONNX graph \
                 (use [score] backend = \"native\")"
                    .into(),
            ));
        }
        if self.onnx.file.is_empty() {
            return Err(("onnx.file".into(), "must name the ONNX file".into()));
        }
        if self.onnx.intra_threads == 0 {
            return Err(("onnx.intra_threads".into(), "must be at least 1".into()));
        }
        if let Err(e) = self.assemble.build(vec!["x".into()]) {
            let key = e
                .key()
                .map_or("assemble".into(), |k| format!("assemble.{k}"));
            return Err((key, e.to_string()));
        }
        let between = |key: &str, value: usize, max: usize| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err((
                    key.to_string(),
                    format!("must be between 1 and {max}, got {value}"),
                ))
            }
        };
        between(
            "score.smooth_frames",
            self.score.smooth_frames,
            crate::smooth::MAX_SMOOTH_FRAMES,
        )?;
        between(
            "score.top_contributions",
            self.score.top_contributions,
            MAX_TOP_CONTRIBUTIONS,
        )?;
        if self.pipeline.ring_capacity_frames == 0 {
            return Err((
                "pipeline.ring_capacity_frames".into(),
                "must be at least 1".into(),
            ));
        }
        if self.pipeline.batch_max_frames == 0 {
            return Err((
                "pipeline.batch_max_frames".into(),
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `print-config`: every key of every
    /// section, defaults included, in the structs' order. A key that is unset (an optional
    /// key whose default is worked out later, such as `[alert] silence_secs`) has no TOML
    /// value, so it shows as a comment at the top of its section (`# silence_secs is
    /// unset: …`). A set `[mqtt] password` shows as `"<set>"`, with a comment that says so
    /// first, so that the output can be pasted into a ticket and a saved copy does not
    /// pass for the real password.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        let redacted = !shown.mqtt.password.is_empty();
        if redacted {
            shown.mqtt.password = REDACTED.into();
        }
        let mut text = String::new();
        if redacted {
            text.push_str(&format!(
                "# [mqtt] password is shown as \"{REDACTED}\": put the real one back if you save this\n"
            ));
        }
        // Every field named, no `..`: a new section that is not printed does not compile.
        let DarkwatchConfig {
            model,
            train,
            score,
            mss,
            threshold,
            alert,
            pipeline,
            input,
            agent,
            mqtt,
            assemble,
            examon,
            telegraf,
            raw,
            spool,
            metrics,
            onnx,
            cuda,
            retrain,
            sae,
            alertmanager,
            scores,
        } = &shown;
        let sections: [(&str, &dyn erased::Section); 22] = [
            ("model", model),
            ("train", train),
            ("score", score),
            ("mss", mss),
            ("threshold", threshold),
            ("alert", alert),
            ("pipeline", pipeline),
            ("input", input),
            ("agent", agent),
            ("mqtt", mqtt),
            ("assemble", assemble),
            ("examon", examon),
            ("telegraf", telegraf),
            ("raw", raw),
            ("spool", spool),
            ("metrics", metrics),
            ("onnx", onnx),
            ("cuda", cuda),
            ("retrain", retrain),
            ("sae", sae),
            ("alertmanager", alertmanager),
            ("scores", scores),
        ];
        for (i, (name, section)) in sections.into_iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.push_str(&section.render(name));
        }
        text
    }
}

/// One section of `print-config`, rendered on its own so that its unset keys can be
/// written as comments under its header.
mod erased {
    use serde::Serialize;

    pub(super) trait Section {
        fn render(&self, name: &str) -> String;
    }

    impl<T: Serialize> Section for T {
        fn render(&self, name: &str) -> String {
            let one = std::collections::BTreeMap::from([(name, self)]);
            let body = match toml::to_string_pretty(&one) {
                Ok(body) => body,
                Err(e) => return format!("[{name}]\n# cannot render this section: {e}\n"),
            };
            // The keys TOML has no value for: a `None` (JSON's null; TOML leaves the key
            // out). A NaN is null too, but TOML writes it (`nan`), so it is not one.
            let json = serde_json::to_value(self).unwrap_or_default();
            let written = toml::from_str::<toml::Table>(&body).unwrap_or_default();
            let written = written.get(name).and_then(toml::Value::as_table);
            let unset: Vec<&String> = json
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| {
                    v.is_null() && !written.is_some_and(|t| t.contains_key(k.as_str()))
                })
                .map(|(k, _)| k)
                .collect();
            let header = format!("[{name}]\n");
            let rest = body.strip_prefix(&header).unwrap_or(&body);
            let mut text = header;
            for key in unset {
                text.push_str(&format!(
                    "# {key} is unset: its documented default applies (see README.md)\n"
                ));
            }
            text.push_str(rest);
            text
        }
    }
}

/// What `print-config` shows for a password that is set.
pub const REDACTED: &str = "<set>";

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn print_config_hides_a_set_password() {
        let mut cfg = DarkwatchConfig::default();
        assert!(cfg.to_toml().contains("password = \"\""));
        cfg.mqtt.username = "ops".into();
        cfg.mqtt.password = "hunter2".into();
        let text = cfg.to_toml();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.starts_with("# [mqtt] password is shown as"), "{text}");
        assert!(
            text.contains(&format!("password = \"{REDACTED}\"")),
            "{text}"
        );
        assert_eq!(cfg.mqtt.password, "hunter2");
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn shipped_default_file_equals_builtin_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/darkwatch.toml");
        let cfg = load(Some(&path), Vec::new()).unwrap();
        assert_eq!(cfg, DarkwatchConfig::default());
    }

    /// The shipped file subscribes to this node's ExaMon topics (`{node}` filled in with
    /// node_name, or the hostname on a fresh node), not to the whole cluster.
    #[test]
    fn shipped_file_subscribes_to_its_own_node() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/darkwatch.toml");
        let env = vec![("DARKWATCH__MQTT__NODE_NAME".to_string(), "sn01".to_string())];
        let cfg = load(Some(&path), env).unwrap();
        assert_eq!(
            cfg.mqtt.subscribe_filters(),
            ["org/+/cluster/+/node/sn01/plugin/+/chnl/data/#"]
        );
        let fresh = load(Some(&path), Vec::new()).unwrap();
        assert_eq!(fresh.mqtt.node_name, "");
        let host = fresh.mqtt.node();
        assert!(
            !host.is_empty() && !host.contains(['+', '#', '/']),
            "{host}"
        );
        assert_eq!(
            fresh.mqtt.subscribe_filters(),
            [format!("org/+/cluster/+/node/{host}/plugin/+/chnl/data/#")]
        );
        assert_eq!(fresh.validate(), Ok(()));
    }

    #[test]
    fn unknown_key_is_named() {
        let f = write("[train]\nepochs_maxx = 3\n");
        let err = load(Some(f.path()), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("epochs_maxx"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let f = write("[train]\nepochs_max = 3\n");
        let env = vec![
            ("DARKWATCH__TRAIN__EPOCHS_MAX".to_string(), "7".to_string()),
            (
                "DARKWATCH__MODEL__HIDDEN_SIZES".to_string(),
                "8,4,8".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let cfg = load(Some(f.path()), env).unwrap();
        assert_eq!(cfg.train.epochs_max, 7);
        assert_eq!(cfg.model.hidden_sizes, vec![8, 4, 8]);
    }

    /// Environment values stay text unless the key takes a number, boolean or list: a
    /// password or client id of digits keeps its leading zeros.
    #[test]
    fn env_values_keep_their_text_and_parse_where_the_key_needs_it() {
        let env = [
            ("MQTT__USERNAME", "u"),
            ("MQTT__PASSWORD", "0123"),
            ("MQTT__CLIENT_ID", "007"),
            ("MQTT__NODE_NAME", "1e5"),
            ("SPOOL__FSYNC", "false"),
            ("MQTT__SUBSCRIBE", "a/#, b/+/c"),
            ("MQTT__KEEP_ALIVE_SECS", "15"),
            ("SCORE__WNLL_ALPHA", "0.25"),
            ("SCORE__HEAD", "max_abs"),
            ("MODEL__HIDDEN_SIZES", "16"),
        ]
        .map(|(k, v)| (format!("DARKWATCH__{k}"), v.to_string()));
        let cfg = load(None, env).unwrap();
        assert_eq!(cfg.mqtt.password, "0123");
        assert_eq!(cfg.mqtt.client_id, "007");
        assert_eq!(cfg.mqtt.node_name, "1e5");
        assert!(!cfg.spool.fsync);
        assert_eq!(cfg.mqtt.subscribe, ["a/#", "b/+/c"]);
        assert_eq!(cfg.mqtt.keep_alive_secs, 15);
        assert_eq!(cfg.score.wnll_alpha, 0.25);
        assert_eq!(cfg.score.head, crate::score::HeadKind::MaxAbs);
        assert_eq!(cfg.model.hidden_sizes, [16]);
        // A TOML array in the file still works.
        let f = write("[mqtt]\nsubscribe = [\"x/#\", \"y\"]\n");
        assert_eq!(
            load(Some(f.path()), Vec::new()).unwrap().mqtt.subscribe,
            ["x/#", "y"]
        );
        // Text where a number belongs is still an error naming the key.
        let env = [(
            "DARKWATCH__TRAIN__EPOCHS_MAX".to_string(),
            "many".to_string(),
        )];
        let err = load(None, env).unwrap_err().to_string();
        assert!(err.contains("epochs_max"), "{err}");
    }

    #[test]
    fn a_bad_enum_value_lists_the_allowed_ones() {
        let f = write("[score]\nhead = \"max-abs\"\n");
        let err = load(Some(f.path()), Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains("`max-abs`")
                && err.contains("`mse`, `max_abs`, `wnll`")
                && err.contains("score.head"),
            "{err}"
        );
        let env = [(
            "DARKWATCH__PIPELINE__FULL_POLICY".to_string(),
            "wait".to_string(),
        )];
        let err = load(None, env).unwrap_err().to_string();
        assert!(err.contains("`drop_newest` or `block`"), "{err}");
        // Other messages pass unchanged.
        assert_eq!(with_allowed_values("invalid type"), "invalid type");
        // A number the key's type cannot hold says so, with the range (the trial's port).
        for (toml, want) in [
            (
                "[mqtt]\nport = 70000\n",
                "70000 is out of range: expected an integer from 0 to 65535",
            ),
            (
                "[mqtt]\nport = -1\n",
                "-1 is out of range: expected a non-negative integer",
            ),
        ] {
            let f = write(toml);
            let err = load(Some(f.path()), Vec::new()).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("mqtt.port"), "{err}");
        }
    }

    #[test]
    fn semantic_error_names_key() {
        let f = write("[model]\nkind = \"plain\"\n[score]\nhead = \"wnll\"\n");
        match load(Some(f.path()), Vec::new()).unwrap_err() {
            ConfigError::Invalid { key, .. } => assert_eq!(key, "score.head"),
            e => panic!("wrong error {e}"),
        }
        let f = write("[pipeline]\nbatch_max_frames = 0\n");
        let err = load(Some(f.path()), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("pipeline.batch_max_frames"), "{err}");
        // `[assemble]` names its key too (it said `assemble`).
        for (set, key) in [
            ("window_secs = 0", "assemble.window_secs"),
            ("stale_secs = -1.0", "assemble.stale_secs"),
            ("max_streams = 0", "assemble.max_streams"),
            ("lateness_windows = 65", "assemble.lateness_windows"),
            ("forget_after_secs = 30", "assemble.forget_after_secs"),
            // 60 s past the last window's close: 60 + 2 × 60 here.
            (
                "window_secs = 60.0\nforget_after_secs = 179",
                "assemble.forget_after_secs",
            ),
        ] {
            let f = write(&format!("[assemble]\n{set}\n"));
            match load(Some(f.path()), Vec::new()).unwrap_err() {
                ConfigError::Invalid { key: got, .. } => assert_eq!(got, key, "{set}"),
                e => panic!("{set}: wrong error {e}"),
            }
        }
        // A topic template with a placeholder it does not fill in would publish it as it is.
        let f = write("[mqtt]\nalert_topic = \"x/{bogus}\"\n");
        let err = load(Some(f.path()), Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains("key `mqtt.alert_topic`") && err.contains("`{bogus}`"),
            "{err}"
        );
    }

    /// `[train] validation_fraction = 0` trained on every row and calibrated the threshold
    /// on those same rows, which `train` then called "held-out scores".
    #[test]
    fn no_held_out_rows_is_a_config_error() {
        for set in ["validation_fraction = 0", "validation_fraction = 0.0"] {
            let f = write(&format!("[train]\n{set}\n"));
            match load(Some(f.path()), Vec::new()).unwrap_err() {
                ConfigError::Invalid { key, reason, .. } => {
                    assert_eq!(key, "train.validation_fraction", "{reason}");
                    assert!(reason.contains("(0, 0.5]"), "{reason}");
                }
                e => panic!("{set}: wrong error {e}"),
            }
        }
        let env = vec![(
            "DARKWATCH__TRAIN__VALIDATION_FRACTION".to_string(),
            "0".to_string(),
        )];
        assert!(load(None, env).is_err());
        load(
            Some(write("[train]\nvalidation_fraction = 0.05\n").path()),
            Vec::new(),
        )
        .unwrap();
    }

    /// `--config <(…)` names a pipe, which is no regular file: it is read, not refused as
    /// missing. A folder and a missing path still say what they are.
    #[cfg(unix)]
    #[test]
    fn a_config_may_come_from_a_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("cfg.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "[train]\nepochs_max = 7\n").unwrap())
        };
        let cfg = load(Some(&fifo), Vec::new()).unwrap();
        writer.join().unwrap();
        assert_eq!(cfg.train.epochs_max, 7);
        let err = load(Some(dir.path()), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let err = load(Some(&dir.path().join("nope.toml")), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("nope.toml: no such file"), "{err}");
    }

    /// A spool whose records (`max_bytes / 8`) cannot hold an alert used to pass, and the
    /// agent then rejected every alert (`darkwatch_alerts_rejected_total`).
    #[test]
    fn a_spool_too_small_for_an_alert_is_refused() {
        let err = load(
            Some(write("[spool]\nmax_bytes = 4096\n").path()),
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("key `spool.max_bytes`: must be at least 8388576 bytes"),
            "{err}"
        );
        assert_eq!(crate::mqtt::MIN_SPOOL_MAX_BYTES, 8388576);
        let at_least = format!(
            "[spool]\nmax_bytes = {}\n",
            crate::mqtt::MIN_SPOOL_MAX_BYTES
        );
        load(Some(write(&at_least).path()), Vec::new()).unwrap();
    }

    #[test]
    fn bad_type_and_missing_file_are_errors() {
        let f = write("[train]\nepochs_max = \"many\"\n");
        assert!(load(Some(f.path()), Vec::new()).is_err());
        assert!(load(Some(Path::new("/nonexistent/x.toml")), Vec::new()).is_err());
    }

    /// The file is held to its types: no float, boolean or string of digits becomes an
    /// integer (the `config` crate would round 3.7 to 4), while an integer still serves
    /// a float key and the environment's text is still parsed.
    #[test]
    fn file_values_of_another_type_are_refused_not_converted() {
        for (text, got) in [
            (
                "[model]\nmembers = 3.7\n",
                "key `model.members`: must be an integer, not float 3.7",
            ),
            (
                "[train]\nepochs_max = true\n",
                "key `train.epochs_max`: must be an integer, not boolean true",
            ),
            (
                "[score]\nsmooth_frames = \"5\"\n",
                "key `score.smooth_frames`: must be an integer, not a string",
            ),
            (
                "[mqtt]\ntls = 1\n",
                "key `mqtt.tls`: must be true or false, not integer 1",
            ),
        ] {
            let err = load(Some(write(text).path()), Vec::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(got), "{text}: {err}");
        }
        // An integer serves a float key; a number serves a string key as its text (and a
        // password is never echoed); environment text is parsed where a number is wanted.
        let cfg = load(
            Some(
                write("[train]\nlearning_rate = 1\n[mqtt]\nusername = 42\npassword = 1234\n")
                    .path(),
            ),
            vec![("DARKWATCH__MODEL__MEMBERS".to_string(), "3".to_string())],
        )
        .unwrap();
        assert_eq!(cfg.train.learning_rate, 1.0);
        assert_eq!(
            (cfg.mqtt.username.as_str(), cfg.mqtt.password.as_str()),
            ("42", "1234")
        );
        assert_eq!(cfg.model.members, 3);
    }

    #[test]
    fn a_score_topic_under_the_alert_topic_is_refused() {
        let mut cfg = DarkwatchConfig::default();
        cfg.scores.publish = true;
        assert!(cfg.validate().is_ok());
        cfg.scores.topic = "darkwatch/{node}/alerts/{stream}/{metric}".into();
        let (key, why) = cfg.validate().unwrap_err();
        assert_eq!(key, "scores.topic");
        assert!(why.contains("alert_topic"), "{why}");
    }

    /// The keys a section accepts, as its `Deserialize` knows them (serde lists them when
    /// it refuses an unknown one, and every section denies unknown fields): `None` for the
    /// top level. No list kept by hand, so a new key is checked as soon as it exists.
    fn accepted_keys(section: Option<&str>) -> Vec<String> {
        const PROBE: &str = "no_such_key_probe";
        let text = match section {
            Some(s) => format!("[{s}]\n{PROBE} = 0\n"),
            None => format!("{PROBE} = 0\n"),
        };
        let err = toml::from_str::<DarkwatchConfig>(&text)
            .unwrap_err()
            .to_string();
        let listed = err
            .split_once(&format!("unknown field `{PROBE}`, expected "))
            .unwrap_or_else(|| panic!("{section:?}: not serde's unknown-field message: {err}"))
            .1;
        let listed = listed.lines().next().unwrap_or_default();
        let keys: Vec<String> = listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect();
        assert!(!keys.is_empty(), "{section:?}: {err}");
        keys
    }

    /// The keys `print-config` shows in `[section]`: set (`key = …`) or unset (`# key is
    /// unset`), and the section's sub-tables (`[section.key]`).
    fn printed_keys(text: &str, section: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut inside = false;
        for line in text.lines() {
            if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = header == section;
                if let Some(sub) = header.strip_prefix(&format!("{section}.")) {
                    keys.push(sub.to_string());
                }
                continue;
            }
            if !inside {
                continue;
            }
            if let Some((key, _)) = line.split_once(" = ") {
                keys.push(key.to_string());
            } else if let Some((key, _)) = line
                .strip_prefix("# ")
                .and_then(|l| l.split_once(" is unset: "))
            {
                keys.push(key.to_string());
            }
        }
        keys
    }

    /// `print-config` leaves no key out: every key of every section that the config file
    /// accepts is printed, set or unset, for the defaults and for a config with every
    /// optional key set (`[sae] id_is_position = false` was left out).
    #[test]
    fn print_config_shows_every_key_of_every_section() {
        let sections = accepted_keys(None);
        assert!(sections.len() >= 22, "{sections:?}");
        let mut set = DarkwatchConfig::default();
        set.alert.silence_secs = Some(120.0);
        set.assemble.stale_secs = Some(3.0);
        set.sae.norm_scaling_factor = Some(0.5);
        set.sae.id_is_position = true;
        set.sae.skip_positions = Some(1);
        set.mqtt.username = "ops".into();
        set.mqtt.password = "hunter2".into();
        for cfg in [DarkwatchConfig::default(), set] {
            let text = cfg.to_toml();
            for section in &sections {
                let mut want = accepted_keys(Some(section));
                let mut got = printed_keys(&text, section);
                want.sort();
                got.sort();
                assert_eq!(got, want, "[{section}] in\n{text}");
            }
            // What is printed loads back as the same configuration, the password aside.
            let mut loaded = load(Some(write(&text).path()), Vec::new()).unwrap();
            if !cfg.mqtt.password.is_empty() {
                assert_eq!(loaded.mqtt.password, REDACTED);
                loaded.mqtt.password.clone_from(&cfg.mqtt.password);
            }
            assert_eq!(loaded, cfg);
        }
        let text = DarkwatchConfig::default().to_toml();
        assert!(text.contains("\n[sae]\n"), "{text}");
        assert!(text.contains("id_is_position = false"), "{text}");
        assert!(
            text.contains("# skip_positions is unset: its documented default applies"),
            "{text}"
        );
    }

    #[test]
    fn print_config_round_trips() {
        let cfg = DarkwatchConfig::default();
        let f = write(&cfg.to_toml());
        assert_eq!(load(Some(f.path()), Vec::new()).unwrap(), cfg);
    }
}
