//! Reading SAELens and sparsify checkpoint folders into a [`Sae`] (formats: see the module
//! docs of [`crate::sae`]).

use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use super::{Normalization, Sae, SaeActivation, SaeError, SaeFormat, SaeInfo, SaeParts};

/// The config file of both formats.
pub const CONFIG_FILE: &str = "cfg.json";
/// SAELens' weights file.
pub const SAELENS_WEIGHTS: &str = "sae_weights.safetensors";
/// sparsify's weights file.
pub const SPARSIFY_WEIGHTS: &str = "sae.safetensors";

impl Sae {
    /// Loads an SAE checkpoint folder, detecting its format: SAELens (`cfg.json` +
    /// `sae_weights.safetensors`), a sparsify hookpoint folder (`cfg.json` +
    /// `sae.safetensors`), or a sparsify run folder with exactly one hookpoint subfolder.
    ///
    /// # Errors
    /// [`SaeError::NotACheckpoint`] for a folder that is neither; [`SaeError::SeveralLayers`]
    /// for a sparsify run folder with several hookpoints (listing them); otherwise an error
    /// naming the file and the key or tensor that is missing, misshapen, of an unsupported
    /// dtype, non-finite or unsupported.
    pub fn load(dir: &Path) -> Result<Sae, SaeError> {
        let has = |name: &str| dir.join(name).is_file();
        if has(CONFIG_FILE) && has(SAELENS_WEIGHTS) {
            return load_saelens(dir);
        }
        if has(CONFIG_FILE) && has(SPARSIFY_WEIGHTS) {
            return load_sparsify(dir);
        }
        let entries = fs::read_dir(dir).map_err(|source| SaeError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut layers: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                let p = e.path();
                p.join(CONFIG_FILE).is_file() && p.join(SPARSIFY_WEIGHTS).is_file()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        layers.sort();
        match layers.len() {
            1 => load_sparsify(&dir.join(&layers[0])),
            0 => {
                let found = if has(CONFIG_FILE) {
                    ": found cfg.json but no weights file"
                } else if has(SAELENS_WEIGHTS) || has(SPARSIFY_WEIGHTS) {
                    ": found a weights file but no cfg.json"
                } else {
                    ""
                };
                Err(SaeError::NotACheckpoint {
                    dir: dir.to_path_buf(),
                    found: found.into(),
                })
            }
            _ => Err(SaeError::SeveralLayers {
                dir: dir.to_path_buf(),
                layers,
            }),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SaeError> {
    fs::read(path).map_err(|source| SaeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) use crate::model::io::sha256_hex;

/// [`sha256_hex`] of a file, streamed.
///
/// # Errors
/// The file cannot be read.
pub(crate) fn file_sha256(path: &Path) -> Result<String, SaeError> {
    crate::model::io::file_sha256(path).map_err(|source| SaeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_config(path: &Path) -> Result<serde_json::Map<String, Value>, SaeError> {
    let bytes = read(path)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(SaeError::NotAnObject {
            path: path.to_path_buf(),
            found: kind(&other).into(),
        }),
        Err(e) => Err(SaeError::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to a `cfg.json` object, with errors naming the file and key.
struct Cfg<'a> {
    path: &'a Path,
    map: &'a serde_json::Map<String, Value>,
}

impl Cfg<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> SaeError {
        SaeError::Config {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The value at `key`, treating JSON null as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_at(&self, key: &str, v: &Value) -> Result<usize, SaeError> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, SaeError> {
        self.get(key).map(|v| self.usize_at(key, v)).transpose()
    }

    fn usize(&self, key: &str) -> Result<usize, SaeError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "missing (a positive integer is required)"))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, SaeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, SaeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// A string inside a nested object (`metadata.hook_name`); wrong types count as absent.
    fn nested_str(&self, outer: &str, key: &str) -> Option<String> {
        self.get(outer)?.get(key)?.as_str().map(str::to_owned)
    }
}

/// The major version of a `x.y.z` string.
fn major(version: &str) -> Option<u64> {
    version.trim().split('.').next()?.parse().ok()
}

/// SAELens' `handle_config_defaulting`: v6 when `sae_lens_version` (top level, `metadata` or
/// the older `meta`) is ≥ 6.
fn is_v6(cfg: &Cfg) -> bool {
    let version = cfg
        .opt_str("sae_lens_version")
        .ok()
        .flatten()
        .map(str::to_owned)
        .or_else(|| cfg.nested_str("metadata", "sae_lens_version"))
        .or_else(|| cfg.nested_str("meta", "sae_lens_version"));
    version.as_deref().and_then(major).is_some_and(|m| m >= 6)
}

fn load_saelens(dir: &Path) -> Result<Sae, SaeError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let map = read_config(&cfg_path)?;
    let cfg = Cfg {
        path: &cfg_path,
        map: &map,
    };
    let v6 = is_v6(&cfg);
    let d_in = cfg.usize("d_in")?;
    let d_sae = cfg.usize("d_sae")?;
    if d_in == 0 || d_sae == 0 {
        let key = if d_in == 0 { "d_in" } else { "d_sae" };
        return Err(cfg.err(key, "must be positive"));
    }
    let architecture = cfg
        .opt_str("architecture")?
        .unwrap_or("standard")
        .to_owned();
    // Pre-6 configs name the activation; SAELens ≤ 5.4 saved TopK SAEs as "standard" + "topk".
    let activation_fn = if v6 {
        None
    } else {
        match cfg.opt_str("activation_fn_str")? {
            Some(s) => Some(("activation_fn_str", s)),
            None => cfg.opt_str("activation_fn")?.map(|s| ("activation_fn", s)),
        }
    };
    let unsupported = |what: String| SaeError::Unsupported {
        path: cfg_path.clone(),
        what,
    };
    let k_of = |cfg: &Cfg| -> Result<usize, SaeError> {
        let from_kwargs = cfg
            .get("activation_fn_kwargs")
            .and_then(|kw| kw.get("k"))
            .filter(|v| !v.is_null());
        let k = match (cfg.get("k"), from_kwargs) {
            (Some(v), _) => cfg.usize_at("k", v)?,
            (None, Some(v)) => cfg.usize_at("activation_fn_kwargs.k", v)?,
            (None, None) => {
                return Err(cfg.err(
                    "k",
                    "missing: a TopK SAE needs `k` (or `activation_fn_kwargs.k` in pre-6 configs)",
                ));
            }
        };
        if k == 0 || k > d_sae {
            return Err(cfg.err("k", format!("{k} is outside 1..={d_sae} (d_sae)")));
        }
        Ok(k)
    };
    let activation = match (architecture.as_str(), activation_fn) {
        (_, Some((_, "topk"))) | ("topk", _) => SaeActivation::TopK { k: k_of(&cfg)? },
        ("standard", None | Some((_, "relu"))) => SaeActivation::Relu,
        ("jumprelu", None | Some((_, "relu"))) => SaeActivation::JumpRelu,
        ("standard" | "jumprelu", Some((key, other))) => {
            return Err(unsupported(format!("`{key}: \"{other}\"`")));
        }
        (other, _) => {
            return Err(unsupported(format!(
                "architecture \"{other}\" (darkwatch runs standard, topk and jumprelu)"
            )));
        }
    };
    if matches!(activation, SaeActivation::TopK { .. })
        && cfg.opt_bool("rescale_acts_by_decoder_norm")? == Some(true)
    {
        return Err(unsupported("`rescale_acts_by_decoder_norm: true`".into()));
    }
    if let Some(reshape) = cfg.opt_str("reshape_activations")?
        && reshape != "none"
    {
        return Err(unsupported(format!("`reshape_activations: \"{reshape}\"`")));
    }
    let apply_b_dec_to_input = cfg.opt_bool("apply_b_dec_to_input")?.unwrap_or(true);
    let normalization = match cfg.get("normalize_activations") {
        None | Some(Value::Bool(false)) => Normalization::None,
        Some(Value::Bool(true)) => Normalization::ExpectedAverageOnlyIn {
            scaling_factor: None,
        },
        Some(Value::String(s)) => match s.as_str() {
            "none" => Normalization::None,
            "constant_norm_rescale" => Normalization::ConstantNormRescale,
            "layer_norm" => Normalization::LayerNorm,
            "expected_average_only_in" => Normalization::ExpectedAverageOnlyIn {
                scaling_factor: None,
            },
            other => {
                return Err(cfg.err(
                    "normalize_activations",
                    format!(
                        "\"{other}\" is not one of none, expected_average_only_in, \
                         constant_norm_rescale, layer_norm"
                    ),
                ));
            }
        },
        Some(v) => {
            return Err(cfg.err(
                "normalize_activations",
                format!("expected a string or a boolean, found {v}"),
            ));
        }
    };
    let finetuning = cfg.opt_bool("finetuning_scaling_factor")?.unwrap_or(false);
    let hook = cfg
        .opt_str("hook_name")
        .ok()
        .flatten()
        .map(str::to_owned)
        .or_else(|| cfg.opt_str("hook_point").ok().flatten().map(str::to_owned))
        .or_else(|| cfg.nested_str("metadata", "hook_name"))
        .or_else(|| cfg.nested_str("meta", "hook_name"));

    let weights_path = dir.join(SAELENS_WEIGHTS);
    let bytes = read(&weights_path)?;
    let st = Tensors::parse(&weights_path, &bytes)?;
    let w_enc = st.matrix("W_enc", d_in, d_sae)?;
    let b_enc = st.vector("b_enc", d_sae)?;
    let mut w_dec = st.matrix("W_dec", d_sae, d_in)?;
    let b_dec = st.vector("b_dec", d_in)?;
    let threshold = match activation {
        // SAELens' JumpReLU training SAE keeps `log_threshold` (saved for inference as
        // `threshold` = exp of it); a training checkpoint holds only the former.
        SaeActivation::JumpRelu
            if st.st.tensor("threshold").is_err() && st.st.tensor("log_threshold").is_ok() =>
        {
            Some(st.vector("log_threshold", d_sae)?.mapv(f32::exp))
        }
        SaeActivation::JumpRelu => {
            let threshold = st.vector("threshold", d_sae)?;
            if st.st.tensor("log_threshold").is_ok() {
                check_log_threshold(
                    &weights_path,
                    &threshold,
                    &st.vector("log_threshold", d_sae)?,
                )?;
            }
            Some(threshold)
        }
        _ => None,
    };
    if finetuning {
        let scale = st.vector("finetuning_scaling_factor", d_sae)?;
        for (mut row, &s) in w_dec.rows_mut().into_iter().zip(&scale) {
            row.mapv_inplace(|w| w * s);
        }
    }
    let mut sae = Sae::from_parts(SaeParts {
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold,
        activation,
        apply_b_dec_to_input,
        normalization,
    })
    .map_err(|e| SaeError::Weights {
        path: weights_path.clone(),
        reason: e.to_string(),
    })?;
    sae.info = SaeInfo {
        format: SaeFormat::SaeLens,
        dir: Some(dir.to_path_buf()),
        hook,
        stored_dtype: st.dtype_summary(),
        weights_sha256: Some(sha256_hex(&bytes)),
    };
    Ok(sae)
}

fn load_sparsify(dir: &Path) -> Result<Sae, SaeError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let map = read_config(&cfg_path)?;
    let cfg = Cfg {
        path: &cfg_path,
        map: &map,
    };
    let unsupported = |what: &str| SaeError::Unsupported {
        path: cfg_path.clone(),
        what: what.into(),
    };
    match cfg.opt_str("activation")? {
        None | Some("topk") => {}
        Some(other) => {
            return Err(unsupported(&format!(
                "`activation: \"{other}\"` (darkwatch runs sparsify's topk)"
            )));
        }
    }
    for key in ["skip_connection", "transcode", "signed"] {
        if cfg.opt_bool(key)? == Some(true) {
            return Err(unsupported(&format!("`{key}: true`")));
        }
    }
    let k = cfg.usize("k")?;
    let weights_path = dir.join(SPARSIFY_WEIGHTS);
    let bytes = read(&weights_path)?;
    let st = Tensors::parse(&weights_path, &bytes)?;
    // d_in: the config's, else the size of b_dec (older configs do not store it).
    let d_in = match cfg.opt_usize("d_in")? {
        Some(d) => d,
        None => st.shape_of("b_dec")?.first().copied().unwrap_or(0),
    };
    if d_in == 0 {
        return Err(cfg.err("d_in", "must be positive"));
    }
    let num_latents = match cfg.opt_usize("num_latents")?.unwrap_or(0) {
        0 => {
            // sparsify writes both keys; guessing its default factor (32) for a config with
            // neither would only turn into a shape error on `encoder.weight`.
            let Some(factor) = cfg.opt_usize("expansion_factor")? else {
                let found = st.shape_of("encoder.weight").map_or_else(
                    |_| String::new(),
                    |s| {
                        format!(
                            "; {SPARSIFY_WEIGHTS} holds encoder.weight {s:?}, [num_latents, d_in]"
                        )
                    },
                );
                return Err(cfg.err(
                    "num_latents",
                    format!(
                        "missing (or 0), and so is `expansion_factor`: one of them gives the \
                         number of latents (num_latents, else d_in × expansion_factor){found}"
                    ),
                ));
            };
            d_in.checked_mul(factor)
                .filter(|&n| n > 0)
                .ok_or_else(|| cfg.err("expansion_factor", format!("{factor} gives no latents")))?
        }
        n => n,
    };
    if k == 0 || k > num_latents {
        return Err(cfg.err(
            "k",
            format!("{k} is outside 1..={num_latents} (num_latents)"),
        ));
    }
    let encoder = st.matrix("encoder.weight", num_latents, d_in)?;
    let b_enc = st.vector("encoder.bias", num_latents)?;
    let w_dec = st.matrix("W_dec", num_latents, d_in)?;
    let b_dec = st.vector("b_dec", d_in)?;
    let mut sae = Sae::from_parts(SaeParts {
        w_enc: encoder.t().to_owned(),
        b_enc,
        w_dec,
        b_dec,
        threshold: None,
        activation: SaeActivation::TopK { k },
        apply_b_dec_to_input: true,
        normalization: Normalization::None,
    })
    .map_err(|e| SaeError::Weights {
        path: weights_path.clone(),
        reason: e.to_string(),
    })?;
    sae.info = SaeInfo {
        format: SaeFormat::Sparsify,
        dir: Some(dir.to_path_buf()),
        hook: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        stored_dtype: st.dtype_summary(),
        weights_sha256: Some(sha256_hex(&bytes)),
    };
    Ok(sae)
}

/// A parsed safetensors file with errors that name it.
struct Tensors<'a> {
    path: PathBuf,
    st: SafeTensors<'a>,
}

impl<'a> Tensors<'a> {
    fn parse(path: &Path, bytes: &'a [u8]) -> Result<Tensors<'a>, SaeError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| SaeError::Weights {
            path: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {e}"),
        })?;
        Ok(Tensors {
            path: path.to_path_buf(),
            st,
        })
    }

    fn missing(&self, name: &str) -> SaeError {
        let mut present: Vec<&str> = self.st.names();
        present.sort_unstable();
        SaeError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
            present: if present.is_empty() {
                "no tensors".into()
            } else {
                present.join(", ")
            },
        }
    }

    fn shape_of(&self, name: &str) -> Result<Vec<usize>, SaeError> {
        let t = self.st.tensor(name).map_err(|_| self.missing(name))?;
        Ok(t.shape().to_vec())
    }

    /// The distinct stored dtypes, e.g. `BF16`.
    fn dtype_summary(&self) -> String {
        let mut dtypes: Vec<String> = self
            .st
            .iter()
            .map(|(_, t)| format!("{:?}", t.dtype()))
            .collect();
        dtypes.sort();
        dtypes.dedup();
        dtypes.join("+")
    }

    /// The tensor `name`, which must have `shape`, converted to f32 (row-major).
    fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, SaeError> {
        let t = self.st.tensor(name).map_err(|_| self.missing(name))?;
        if t.shape() != shape {
            return Err(SaeError::Shape {
                path: self.path.clone(),
                tensor: name.into(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        let data = t.data();
        let values: Vec<f32> = match t.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            // numpy's default: rounded to the nearest f32 (a value beyond f32's range becomes
            // infinite and is refused below as not finite).
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(SaeError::Dtype {
                    path: self.path.clone(),
                    tensor: name.into(),
                    found: format!("{other:?}"),
                });
            }
        };
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(SaeError::Weights {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{name}` holds {} values, expected {n}",
                    values.len()
                ),
            });
        }
        // A NaN threshold is as bad as a NaN weight; an infinite threshold just disables a
        // latent, so only weights must be finite.
        let bad = if name == "threshold" || name == "log_threshold" {
            values.iter().position(|v| v.is_nan())
        } else {
            values.iter().position(|v| !v.is_finite())
        };
        if let Some(index) = bad {
            return Err(SaeError::NonFinite {
                path: self.path.clone(),
                tensor: name.into(),
                index,
            });
        }
        Ok(values)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>, SaeError> {
        let v = self.f32s(name, &[rows, cols])?;
        Array2::from_shape_vec((rows, cols), v).map_err(|e| SaeError::Weights {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>, SaeError> {
        Ok(Array1::from(self.f32s(name, &[len])?))
    }
}

/// Refuses a JumpReLU checkpoint holding both `threshold` and `log_threshold` that disagree
/// beyond rounding (relative 1e-5): `threshold` would be used silently, though the other
/// may be the one that was trained. Agreeing ones (both saved from one SAE) are accepted.
fn check_log_threshold(
    path: &Path,
    threshold: &Array1<f32>,
    log_threshold: &Array1<f32>,
) -> Result<(), SaeError> {
    let off = threshold
        .iter()
        .zip(log_threshold)
        .map(|(&t, &l)| (f64::from(t), f64::from(l).exp()))
        .position(|(t, e)| {
            // (NaN was refused on reading; an infinite one only agrees with itself.)
            t != e
                && (t.is_infinite()
                    || e.is_infinite()
                    || (t - e).abs() > 1e-5 * t.abs().max(e.abs()))
        });
    match off {
        None => Ok(()),
        Some(i) => Err(SaeError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "holds both `threshold` and `log_threshold`, and they disagree: threshold[{i}] \
                 = {}, exp(log_threshold[{i}]) = {}; keep only the one the SAE was trained with \
                 (SAELens saves `threshold` = exp(`log_threshold`) for inference)",
                threshold[i],
                f64::from(log_threshold[i]).exp()
            ),
        }),
    }
}
