//! Offline SAE evaluation on activation files: reading `[tokens, d]` arrays with optional
//! per-token prompt ids and labels, scoring every token through an SAE and its dark-matter
//! head, prompt-level scores, a raw-activation Mahalanobis baseline, and the OOD-detection
//! table (AUROC / AUPRC per score, token- and prompt-level). Behind `darkwatch sae-train` and
//! `darkwatch sae-score` ([`sae_train_command`], [`sae_score_command`]).
//!
//! # Inputs
//!
//! - Activations: `.npy` (float16/float32/float64, or integers; see [`crate::ingest::npy`])
//!   or `.safetensors` (an F32, F16, BF16 or F64 tensor, named with `tensor`, or the only
//!   tensor of the file), `[tokens, d]` or `[batch, seq, d]`: leading dimensions are
//!   flattened in row-major order, so token `t` of sequence `b` is row `b·seq + t`, and
//!   prompt ids and labels count the flattened rows.
//! - Prompt ids: 1-D (or `[n, 1]`) integer arrays in `.npy` (int8–int64, uint8–uint64; read
//!   exactly; float ids whole and below 2^24 in magnitude for float32) or `.safetensors`
//!   (I8–I64, U8–U64, exact).
//! - Labels, 0 or 1: what `replay` reads ([`crate::ingest::read_labels`]: an `.npy` vector of
//!   any integer, bool or float dtype, or text with one label per line), or an integer
//!   `.safetensors` tensor.
//! - Both hold one value per activation row.
//!
//! # Prompt-level scores
//!
//! Tokens are grouped by prompt id (in order of first appearance; a prompt's tokens need not
//! be contiguous, but the commands warn when an id comes back after other ids' rows:
//! [`Reappearing`]). A prompt's score is the max, or the mean, of its tokens' scores; its
//! label is the max of its tokens' labels.
//!
//! # Threads
//!
//! The commands' passes over the rows run on every core ([`super::pass`]), with the same
//! bits on any thread count; the `*_with` functions take the thread count and a progress
//! callback.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use safetensors::tensor::Dtype;
use serde::Serialize;

use super::dark::{DarkConfig, DarkError, DarkHead, DarkScore, DarkStats, R2};
use super::detector::{Calibration, CalibrationRows, DetectorError};
use super::pass::RowProgress;
use super::pass::{self, BATCH, Passes};
use super::train::{
    self, EpochStats, SaeTrainConfig, SaeTrainError, SaeTrainReport, SaveMeta, save_saelens,
    train_topk,
};
use super::{Sae, SaeError};
use crate::eval::{self, EvalError};
use crate::ingest::IngestError;
use crate::model::io::MAX_CALIBRATION_SCORES;
use crate::threshold::MIN_CALIBRATION_SCORES;

mod tensor_file;
use tensor_file::{TensorFile, TensorRows};

/// Why an evaluation step failed.
#[derive(Debug, thiserror::Error)]
pub enum SaeEvalError {
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error(transparent)]
    Dark(#[from] DarkError),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error(transparent)]
    Train(#[from] SaeTrainError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] crate::outputs::OutputClash),
    #[error("{0}")]
    Invalid(String),
}

fn input_err(path: &Path, reason: impl Into<String>) -> SaeEvalError {
    SaeEvalError::Input {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, SaeEvalError> {
    fs::read(path).map_err(|source| SaeEvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// The elements of a 1-D id or label array, as stored: integers exactly, floats with the
/// number of significand bits that bounds the integers they hold exactly.
enum Elems {
    Ints(Vec<i128>),
    Floats {
        values: Vec<f64>,
        exact_bits: u32,
        dtype: &'static str,
    },
}

/// The element types of an id or label file (little-endian).
#[derive(Debug, Clone, Copy)]
enum ElemType {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    Bf16,
    F32,
    F64,
}

impl Elems {
    /// The elements of `data`, stored as `ty`.
    fn decode(ty: ElemType, data: &[u8]) -> Elems {
        macro_rules! ints {
            ($ty:ty, $n:expr) => {
                Elems::Ints(
                    data.chunks_exact($n)
                        .map(|c| i128::from(<$ty>::from_le_bytes(c.try_into().expect("width"))))
                        .collect(),
                )
            };
        }
        // Each float dtype holds every integer up to 2^(significand bits) exactly.
        macro_rules! floats {
            ($ty:ty, $n:expr, $bits:expr, $name:expr) => {
                Elems::Floats {
                    values: data
                        .chunks_exact($n)
                        .map(|c| f64::from(<$ty>::from_le_bytes(c.try_into().expect("width"))))
                        .collect(),
                    exact_bits: $bits,
                    dtype: $name,
                }
            };
        }
        match ty {
            ElemType::I8 => ints!(i8, 1),
            ElemType::U8 => ints!(u8, 1),
            ElemType::I16 => ints!(i16, 2),
            ElemType::U16 => ints!(u16, 2),
            ElemType::I32 => ints!(i32, 4),
            ElemType::U32 => ints!(u32, 4),
            ElemType::I64 => ints!(i64, 8),
            ElemType::U64 => ints!(u64, 8),
            ElemType::F16 => floats!(f16, 2, 11, "float16"),
            ElemType::Bf16 => floats!(bf16, 2, 8, "bfloat16"),
            ElemType::F32 => floats!(f32, 4, 24, "float32"),
            ElemType::F64 => floats!(f64, 8, 53, "float64"),
        }
    }

    /// Every element as an `i64`: integers when they fit, floats when they are whole and
    /// below 2^`exact_bits` in magnitude (from it on, neighbouring integers share one float:
    /// 2^24 + 1 is stored as 2^24 in float32, so two prompt ids could silently merge). A
    /// float that is not one is refused, for `what` = `labels` as not 0 or 1.
    fn exact(self, path: &Path, what: &str) -> Result<Vec<i64>, SaeEvalError> {
        match self {
            Elems::Ints(values) => values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    i64::try_from(v).map_err(|_| {
                        input_err(
                            path,
                            format!(
                                "{what}: element {i} = {v} is above the largest signed 64-bit \
                                 integer ({}); {what} must fit in int64",
                                i64::MAX
                            ),
                        )
                    })
                })
                .collect(),
            Elems::Floats {
                values,
                exact_bits,
                dtype,
            } => {
                let limit = 2f64.powi(exact_bits as i32);
                values
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| {
                        if v.is_finite() && v.fract() == 0.0 && v.abs() < limit {
                            Ok(v as i64)
                        } else if what == "labels" {
                            Err(input_err(
                                path,
                                format!("label {i} is {v}, expected 0 or 1"),
                            ))
                        } else {
                            Err(input_err(
                                path,
                                format!(
                                    "{what}: element {i} = {v} is not an integer below \
                                     2^{exact_bits} in magnitude, the range a {dtype} file holds \
                                     exactly (write the {what} with an integer dtype such as \
                                     int64)"
                                ),
                            ))
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The `descr` of an `.npy` header (`'<i8'`), from the header text.
fn npy_descr(header: &str) -> Option<&str> {
    let rest = &header[header.find("descr")? + "descr".len()..];
    let rest = rest[rest.find(':')? + 1..].trim_start();
    let quote = rest.chars().next().filter(|&q| q == '\'' || q == '"')?;
    let body = &rest[1..];
    Some(&body[..body.find(quote)?])
}

/// The header and data of an `.npy` file that [`crate::ingest::npy`] has already accepted
/// (magic, version, header length and data size checked there).
fn npy_parts(bytes: &[u8]) -> Option<(String, &[u8])> {
    let header_start = if *bytes.get(6)? == 1 { 10 } else { 12 };
    let header_len = bytes
        .get(8..header_start)?
        .iter()
        .rev()
        .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
    let header = bytes.get(header_start..header_start + header_len)?;
    let header = header.iter().map(|&b| char::from(b)).collect();
    Some((header, &bytes[header_start + header_len..]))
}

/// The elements of a checked 1-D (or `[n, 1]`, where C and Fortran order agree) `.npy`
/// array, decoded from its dtype: integers exactly, floats as wide as stored.
fn npy_elems(path: &Path, bytes: &[u8]) -> Result<Elems, SaeEvalError> {
    let unreadable = || input_err(path, "could not read the .npy header");
    let (header, d) = npy_parts(bytes).ok_or_else(unreadable)?;
    let descr = npy_descr(&header).ok_or_else(unreadable)?;
    let ty = match descr {
        "|u1" | "<u1" | "|b1" => ElemType::U8,
        "|i1" | "<i1" => ElemType::I8,
        "<u2" => ElemType::U16,
        "<i2" => ElemType::I16,
        "<u4" => ElemType::U32,
        "<i4" => ElemType::I32,
        "<u8" => ElemType::U64,
        "<i8" => ElemType::I64,
        "<f2" => ElemType::F16,
        "<f4" => ElemType::F32,
        "<f8" => ElemType::F64,
        other => return Err(input_err(path, format!("unsupported dtype {other:?}"))),
    };
    Ok(Elems::decode(ty, d))
}

/// Whether an `.npy` file's dtype is an integer or bool type (for activations, which must
/// be floats: an integer array is most likely token ids passed by mistake).
fn npy_integer_dtype(bytes: &[u8]) -> Option<String> {
    let (header, _) = npy_parts(bytes)?;
    let descr = npy_descr(&header)?;
    matches!(descr.as_bytes().get(1), Some(b'i' | b'u' | b'b')).then(|| descr.to_owned())
}

/// Activation rows and the shape of the file's array.
type Rows = (Array2<f32>, Vec<usize>);

/// The bytes [`read_npy_floats_direct`] reads from the file at a time.
const DIRECT_BLOCK_BYTES: usize = 1 << 20;

/// The value of `key` in an `.npy` header dict, up to the next `,` or `}` outside brackets
/// (`False`, `(100, 384)`), trimmed.
fn npy_header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let quoted = [format!("'{key}'"), format!("\"{key}\"")];
    let at = quoted
        .iter()
        .find_map(|q| header.find(q.as_str()).map(|i| i + q.len()))?;
    let rest = &header[at..];
    let rest = rest[rest.find(':')? + 1..].trim_start();
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.checked_sub(1)?,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

/// Reads a C-order float32, float16 or float64 `.npy` array of two or more dimensions
/// straight from the file into its float32 rows, [`DIRECT_BLOCK_BYTES`] at a time
/// ([`NpyRows`]): the rows are the only copy of the data held (a file read whole first, then
/// converted, took twice the memory: `sae-score` on a 154 MB input peaked at 315 MB). `None`
/// for any other file (Fortran order, another dtype or version, an odd header): the
/// whole-file reader reads those and says what is wrong with them.
fn read_npy_floats_direct(path: &Path) -> Result<Option<Rows>, SaeEvalError> {
    let Some(mut npy) = NpyRows::open(path)? else {
        return Ok(None);
    };
    let mut values = Vec::new();
    npy.read_rows(0, npy.rows, &mut values)?;
    let a = Array2::from_shape_vec((npy.rows, npy.cols), values).expect("rows × cols values");
    Ok(Some((a, npy.shape)))
}

/// A C-order float32, float16 or float64 `.npy` array of two or more dimensions, open for
/// reading its rows a block at a time: `sae-score` streams inputs of hundreds of GB through
/// one of these without holding them.
struct NpyRows {
    path: PathBuf,
    file: fs::File,
    /// Where the data starts in the file.
    data_start: u64,
    /// Bytes per value: 2, 4 or 8.
    item: usize,
    /// The rows (the leading dimensions flattened) and their width.
    rows: usize,
    cols: usize,
    /// The shape in the header.
    shape: Vec<usize>,
}

impl NpyRows {
    /// Opens `path` and reads its header. `None` for a file this reader does not take
    /// (Fortran order, another dtype or version, an odd header, trailing bytes): the
    /// whole-file reader reads those and says what is wrong with them.
    ///
    /// # Errors
    /// I/O errors, and data shorter than the header's shape needs: a truncated file is named
    /// with the row it ends in, here rather than after reading a whole file of hundreds of GB.
    fn open(path: &Path) -> Result<Option<NpyRows>, SaeEvalError> {
        use std::io::{Read as _, Seek as _};
        let io = |source| SaeEvalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut lead = [0u8; 12];
        if len < 12 || file.read_exact(&mut lead).is_err() || !lead.starts_with(b"\x93NUMPY") {
            return Ok(None);
        }
        let (header_start, header_len) = match lead[6] {
            1 => (10u64, u64::from(u16::from_le_bytes([lead[8], lead[9]]))),
            2 => (
                12,
                u64::from(u32::from_le_bytes([lead[8], lead[9], lead[10], lead[11]])),
            ),
            _ => return Ok(None),
        };
        let data_start = header_start + header_len;
        if header_len > 1 << 20 || data_start > len {
            return Ok(None);
        }
        let mut header = vec![0u8; header_len as usize];
        file.seek(std::io::SeekFrom::Start(header_start))
            .map_err(io)?;
        file.read_exact(&mut header).map_err(io)?;
        let header: String = header.iter().map(|&b| char::from(b)).collect();
        let (item, dtype) = match npy_descr(&header) {
            Some("<f4") => (4usize, "float32"),
            Some("<f2") => (2, "float16"),
            Some("<f8") => (8, "float64"),
            _ => return Ok(None),
        };
        if npy_header_value(&header, "fortran_order") != Some("False") {
            return Ok(None);
        }
        let Some(shape) = npy_header_value(&header, "shape")
            .and_then(|s| s.strip_prefix('(')?.strip_suffix(')'))
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::parse::<usize>)
                    .collect::<Result<Vec<usize>, _>>()
            })
            .and_then(Result::ok)
        else {
            return Ok(None);
        };
        let [lead_dims @ .., cols] = shape.as_slice() else {
            return Ok(None);
        };
        let cols = *cols;
        let Some(rows) = lead_dims.iter().try_fold(1usize, |a, &n| a.checked_mul(n)) else {
            return Ok(None);
        };
        let Some(bytes) = rows
            .checked_mul(cols)
            .and_then(|c| c.checked_mul(item))
            .and_then(|b| u64::try_from(b).ok())
        else {
            return Ok(None);
        };
        if lead_dims.is_empty() || rows == 0 || cols == 0 {
            return Ok(None);
        }
        let have = len - data_start;
        if have < bytes {
            let row = have / (cols * item) as u64;
            return Err(input_err(
                path,
                format!(
                    "truncated: header says {} {dtype} ({bytes} bytes of data) but the file has \
                     {have} bytes of data: it ends in row {row} of {rows} (0-based)",
                    shape
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join("×")
                ),
            ));
        }
        if have != bytes {
            return Ok(None);
        }
        Ok(Some(NpyRows {
            path: path.to_path_buf(),
            file,
            data_start,
            item,
            rows,
            cols,
            shape,
        }))
    }

    /// Reads rows `first..first + n` into `values` (replacing what it held) as float32,
    /// clamped to ±[`super::ACTIVATION_LIMIT`], [`DIRECT_BLOCK_BYTES`] of the file at a
    /// time. The values, and the errors for NaN, ±Inf and float64 values beyond float32, are
    /// those of [`crate::ingest::npy::parse_npy_rows`] (tested against it).
    ///
    /// # Errors
    /// Those values, named by row and column, and a file that ends early (cut short since it
    /// was opened), named by the row it ends in.
    fn read_rows(
        &mut self,
        first: usize,
        n: usize,
        values: &mut Vec<f32>,
    ) -> Result<(), SaeEvalError> {
        use std::io::{Read as _, Seek as _};
        let path = self.path.as_path();
        let io = |source| SaeEvalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (cols, item) = (self.cols, self.item);
        debug_assert!(first + n <= self.rows);
        let count = n * cols;
        values.clear();
        values.reserve_exact(count);
        self.file
            .seek(std::io::SeekFrom::Start(
                self.data_start + (first * cols * item) as u64,
            ))
            .map_err(io)?;
        let mut block = vec![0u8; DIRECT_BLOCK_BYTES.min(count * item)];
        while values.len() < count {
            let n = block.len().min((count - values.len()) * item);
            let start = values.len();
            if let Err(e) = self.file.read_exact(&mut block[..n]) {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    return Err(io(e));
                }
                // The row the data now ends in, from the file's length (a failed read
                // leaves no count of what it read).
                let len = self.file.metadata().map_err(io)?.len();
                let row = len.saturating_sub(self.data_start) / (cols * item) as u64;
                return Err(input_err(
                    path,
                    format!(
                        "the file ended in row {row} of {} (0-based) while it was read: \
                         truncated after it was opened?",
                        self.rows
                    ),
                ));
            }
            let bad = |i: usize, value: Option<f64>| -> SaeEvalError {
                let at = first * cols + start + i;
                let (row, col) = (at / cols, at % cols);
                let path = path.to_path_buf();
                SaeEvalError::from(match value {
                    None => IngestError::NonFiniteAt { path, row, col },
                    Some(value) => IngestError::OutOfRangeAt {
                        path,
                        row,
                        col,
                        value,
                    },
                })
            };
            match item {
                4 => values.extend(
                    block[..n]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                2 => values.extend(
                    block[..n]
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => {
                    for (i, c) in block[..n].chunks_exact(8).enumerate() {
                        let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
                        if !v.is_finite() {
                            return Err(bad(i, None));
                        }
                        if !(v as f32).is_finite() {
                            return Err(bad(i, Some(v)));
                        }
                        values.push(v as f32);
                    }
                }
            }
            if let Some(i) = values[start..].iter().position(|v| !v.is_finite()) {
                return Err(bad(i, None));
            }
        }
        super::clamp_activations(values);
        Ok(())
    }
}

/// The option that names the tensor, for messages, when the caller does not say.
const TENSOR_OPTION: &str = "the tensor option";

/// Reads activation rows `[tokens, d]` from `.npy` or `.safetensors` (`tensor` names the
/// tensor in a safetensors file with several).
///
/// # Errors
/// As [`read_activations_shaped`].
pub fn read_activations(path: &Path, tensor: Option<&str>) -> Result<Array2<f32>, SaeEvalError> {
    read_activations_shaped(path, tensor).map(|(x, _)| x)
}

/// [`read_activations`], also returning the shape of the file's array: an array of more
/// than two dimensions (`[batch, seq, d]`) is read as rows of its last dimension, its
/// leading ones flattened in row-major order (token `t` of sequence `b` is row `b·seq + t`).
///
/// # Errors
/// A missing file, an unknown extension, an array of fewer than two dimensions or not of a
/// float type (float16, float32 or float64; bfloat16 too in safetensors), no rows or columns, or a
/// non-finite value — each naming the file.
pub fn read_activations_shaped(
    path: &Path,
    tensor: Option<&str>,
) -> Result<(Array2<f32>, Vec<usize>), SaeEvalError> {
    read_activations_flagged(path, tensor, TENSOR_OPTION)
}

/// [`read_activations_shaped`], `flag` naming the option that names the tensor.
fn read_activations_flagged(
    path: &Path,
    tensor: Option<&str>,
    flag: &str,
) -> Result<(Array2<f32>, Vec<usize>), SaeEvalError> {
    if !is_safetensors(path) {
        if path.extension().and_then(|e| e.to_str()) != Some("npy") {
            return Err(input_err(
                path,
                "activations must be .npy or .safetensors [tokens, d] (or [batch, seq, d])",
            ));
        }
        if tensor.is_some() {
            return Err(input_err(
                path,
                format!("{flag} applies to .safetensors only"),
            ));
        }
        if let Some(direct) = read_npy_floats_direct(path)? {
            return Ok(direct);
        }
        let bytes = read_file(path)?;
        if let Some(descr) = npy_integer_dtype(&bytes) {
            return Err(input_err(
                path,
                format!(
                    "activations have the integer dtype {descr:?}; they must be float16, \
                     float32 or float64 (an integer array is usually token or prompt ids \
                     passed as activations by mistake)"
                ),
            ));
        }
        let (table, shape) = crate::ingest::npy::parse_npy_rows(path, &bytes)?;
        // Each dimension fits in usize: the array is in memory.
        let shape = shape.iter().map(|&n| n as usize).collect();
        return Ok((clamped(table.values), shape));
    }
    // Read through the block reader: the rows and a block, not the file's bytes beside them.
    let mut t = TensorRows::open(path, tensor, flag)?;
    let mut values = Vec::new();
    t.read_rows(0, t.rows, &mut values)?;
    let a = Array2::from_shape_vec((t.rows, t.cols), values).expect("rows × cols values");
    Ok((a, t.shape().to_vec()))
}

/// For an error about per-row inputs (prompt ids, labels) of activations read from `path`
/// with `shape`: how an array of more than two dimensions became rows, else nothing.
fn rows_note(path: &Path, shape: &[usize]) -> String {
    match shape {
        [lead @ .., seq, _] if !lead.is_empty() => format!(
            "; {} has shape {shape:?}, read as {} rows in row-major order (token t of sequence b \
             is row b·{seq} + t)",
            path.display(),
            shape[..shape.len() - 1].iter().product::<usize>()
        ),
        _ => String::new(),
    }
}

/// `a` with its values clamped to ±[`super::ACTIVATION_LIMIT`].
fn clamped(mut a: Array2<f32>) -> Array2<f32> {
    super::clamp_activations(a.as_slice_mut().expect("a new array is contiguous"));
    a
}

/// [`read_activations_shaped`] for `sae` (read from `sae_dir`): a width that does not match
/// is an error naming both shapes.
fn read_activations_for(
    sae: &Sae,
    sae_dir: &Path,
    path: &Path,
    tensor: Option<&str>,
) -> Result<(Array2<f32>, Vec<usize>), SaeEvalError> {
    let (x, shape) = read_activations_flagged(path, tensor, "--tensor")?;
    if x.ncols() != sae.d_in() {
        return Err(input_err(
            path,
            format!(
                "activations are [{}, {}], the SAE in {} takes d_in = {}",
                x.nrows(),
                x.ncols(),
                sae_dir.display(),
                sae.d_in()
            ),
        ));
    }
    Ok((x, shape))
}

/// Activation rows read a block at a time: streamed from a C-order float `.npy` ([`NpyRows`]),
/// or sliced from an array read whole (`.safetensors`, Fortran-order or otherwise unusual
/// `.npy`). `sae-score` passes over its input and its baseline through one of these, so that
/// its memory is bounded by a block, not by the file.
struct ActivationBlocks {
    rows: usize,
    cols: usize,
    shape: Vec<usize>,
    source: BlockSource,
}

enum BlockSource {
    Npy { npy: NpyRows, values: Vec<f32> },
    Tensor { rows: TensorRows, values: Vec<f32> },
    Whole(Array2<f32>),
}

impl ActivationBlocks {
    /// Opens activations as [`read_activations_shaped`] reads them (`flag` naming the option
    /// that names the tensor): a C-order float `.npy` is only opened (its header read), any
    /// other file is read whole.
    ///
    /// # Errors
    /// As [`read_activations_shaped`]; a streamed file's bad values and early end come from
    /// [`for_each`](Self::for_each).
    fn open(
        path: &Path,
        tensor: Option<&str>,
        flag: &str,
    ) -> Result<ActivationBlocks, SaeEvalError> {
        if is_safetensors(path) {
            let rows = TensorRows::open(path, tensor, flag)?;
            return Ok(ActivationBlocks {
                rows: rows.rows,
                cols: rows.cols,
                shape: rows.shape().to_vec(),
                source: BlockSource::Tensor {
                    rows,
                    values: Vec::new(),
                },
            });
        }
        let streamed = path.extension().and_then(|e| e.to_str()) == Some("npy") && tensor.is_none();
        if streamed && let Some(npy) = NpyRows::open(path)? {
            return Ok(ActivationBlocks {
                rows: npy.rows,
                cols: npy.cols,
                shape: npy.shape.clone(),
                source: BlockSource::Npy {
                    npy,
                    values: Vec::new(),
                },
            });
        }
        let (x, shape) = read_activations_flagged(path, tensor, flag)?;
        Ok(ActivationBlocks {
            rows: x.nrows(),
            cols: x.ncols(),
            shape,
            source: BlockSource::Whole(x),
        })
    }

    /// Calls `f` with the index of each block's first row and its rows, `block_rows` at a
    /// time (the last block may be shorter), from the first row on: each call reads the
    /// input again.
    ///
    /// # Errors
    /// The first error of the reader (a value that is not finite, a file cut short) or of `f`.
    fn for_each(
        &mut self,
        block_rows: usize,
        mut f: impl FnMut(usize, ArrayView2<f32>) -> Result<(), SaeEvalError>,
    ) -> Result<(), SaeEvalError> {
        let block_rows = block_rows.max(1);
        let mut first = 0;
        while first < self.rows {
            let n = block_rows.min(self.rows - first);
            match &mut self.source {
                BlockSource::Npy { npy, values } => {
                    npy.read_rows(first, n, values)?;
                    let x = ArrayView2::from_shape((n, self.cols), values.as_slice())
                        .expect("n × cols values");
                    f(first, x)?;
                }
                BlockSource::Tensor { rows, values } => {
                    rows.read_rows(first, n, values)?;
                    let x = ArrayView2::from_shape((n, self.cols), values.as_slice())
                        .expect("n × cols values");
                    f(first, x)?;
                }
                BlockSource::Whole(x) => f(first, x.slice(s![first..first + n, ..]))?,
            }
            first += n;
        }
        Ok(())
    }
}

/// The bytes of float32 activations `sae-score` reads from its input per block: long runs of
/// the file per read, and small beside the hundreds of GB an input can hold.
pub const SCORE_BLOCK_BYTES: usize = 64 << 20;

/// Rows per block of `sae-score`'s passes over `cols`-wide rows on `threads` threads:
/// [`SCORE_BLOCK_BYTES`] of rows, but at least one [`BATCH`] per thread so that every core
/// has a batch; always whole batches, so that the SAE sees the same 256-row batches as over
/// the whole input (and the baseline's covariance the same runs of [`COV_ROWS`] rows).
pub fn score_block_rows(cols: usize, threads: usize) -> usize {
    let by_bytes = SCORE_BLOCK_BYTES / (4 * cols.max(1));
    (by_bytes / BATCH).max(threads.max(1)) * BATCH
}

/// Reads one integer per row (prompt ids or labels) from `.npy` or `.safetensors`, checking
/// that there are `rows` of them.
///
/// # Errors
/// Integer dtypes are read exactly (a `uint64` above `i64::MAX` is refused); a float file's
/// elements must be whole and below 2^24 in magnitude for float32 (2^53 for float64), the
/// range its dtype holds exactly. Errors on those, and on a shape other than `[rows]` or
/// `[rows, 1]` — each naming the file and what was found.
pub fn read_ints(
    path: &Path,
    tensor: Option<&str>,
    rows: usize,
    what: &str,
) -> Result<Vec<i64>, SaeEvalError> {
    read_ints_noted(path, (tensor, TENSOR_OPTION), rows, what, "")
}

/// [`read_ints`], with `note` (from [`rows_note`]) after a shape or count error; the tensor
/// comes with the option that names it (`--prompt-ids-tensor`), for messages.
fn read_ints_noted(
    path: &Path,
    (tensor, flag): (Option<&str>, &str),
    rows: usize,
    what: &str,
    note: &str,
) -> Result<Vec<i64>, SaeEvalError> {
    let values: Vec<i64> = if is_safetensors(path) {
        // Only this tensor's bytes: ids and labels often share a file with the activations.
        let mut file = TensorFile::open(path)?;
        let t = file.pick(tensor, flag)?;
        if !matches!(*t.shape, [_] | [_, 1]) {
            return Err(input_err(
                path,
                format!("{what} must be 1-D, found shape {:?}{note}", t.shape),
            ));
        }
        let ty = match t.dtype {
            Dtype::I8 => ElemType::I8,
            Dtype::U8 | Dtype::BOOL => ElemType::U8,
            Dtype::I16 => ElemType::I16,
            Dtype::U16 => ElemType::U16,
            Dtype::I32 => ElemType::I32,
            Dtype::U32 => ElemType::U32,
            Dtype::I64 => ElemType::I64,
            Dtype::U64 => ElemType::U64,
            Dtype::F16 => ElemType::F16,
            Dtype::BF16 => ElemType::Bf16,
            Dtype::F32 => ElemType::F32,
            Dtype::F64 => ElemType::F64,
            other => {
                return Err(input_err(
                    path,
                    format!("{what} have dtype {other:?}, expected an integer or float type"),
                ));
            }
        };
        Elems::decode(ty, &file.read_all(&t)?).exact(path, what)?
    } else {
        if tensor.is_some() {
            return Err(input_err(
                path,
                format!("{flag} applies to .safetensors only"),
            ));
        }
        let bytes = read_file(path)?;
        // The ingest reader checks the header, shape and data size, but reads through
        // float32; the elements are then decoded again here, exactly, from the dtype.
        let table = crate::ingest::npy::parse_npy_allow_1d(path, &bytes)?;
        if table.values.ncols() != 1 {
            return Err(input_err(
                path,
                format!(
                    "{what} must be 1-D, found [{}, {}]{note}",
                    table.values.nrows(),
                    table.values.ncols()
                ),
            ));
        }
        npy_elems(path, &bytes)?.exact(path, what)?
    };
    if values.len() != rows {
        return Err(input_err(
            path,
            format!(
                "{} {what} for {rows} activation rows (one per row is needed){note}",
                values.len()
            ),
        ));
    }
    Ok(values)
}

/// Reads 0/1 labels, one per row: from `.safetensors`, an integer tensor; from any other
/// file, what [`crate::ingest::read_labels`] reads for `replay` (an `.npy` vector of 0/1 of
/// any integer, bool or float dtype, or text with one label per line).
///
/// # Errors
/// As [`read_ints`] for safetensors, else as [`crate::ingest::read_labels`]; a label other
/// than 0 or 1.
pub fn read_labels(
    path: &Path,
    tensor: Option<&str>,
    rows: usize,
) -> Result<Vec<u8>, SaeEvalError> {
    read_labels_noted(path, (tensor, TENSOR_OPTION), rows, "")
}

/// [`read_labels`], with `note` (from [`rows_note`]) after a shape or count error; the tensor
/// comes with the option that names it (`--labels-tensor`), for messages.
fn read_labels_noted(
    path: &Path,
    (tensor, flag): (Option<&str>, &str),
    rows: usize,
    note: &str,
) -> Result<Vec<u8>, SaeEvalError> {
    if !is_safetensors(path) {
        if tensor.is_some() {
            return Err(input_err(
                path,
                format!("{flag} applies to .safetensors only"),
            ));
        }
        return crate::ingest::read_labels(path, Some(rows)).map_err(|e| match e {
            IngestError::LabelCount { .. } | IngestError::LabelShape { .. } if !note.is_empty() => {
                SaeEvalError::Invalid(format!("{e}{note}"))
            }
            e => e.into(),
        });
    }
    read_ints_noted(path, (tensor, flag), rows, "labels", note)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            0 => Ok(0),
            1 => Ok(1),
            _ => Err(input_err(
                path,
                format!("label {i} is {v}, expected 0 or 1"),
            )),
        })
        .collect()
}

/// The SAE error e = x − SAE(x) of every row, on every core ([`sae_errors_with`]).
///
/// # Errors
/// [`SaeError::InputWidth`] when `x` does not have `d_in` columns.
pub fn sae_errors(sae: &Sae, x: ArrayView2<f32>) -> Result<Array2<f32>, SaeError> {
    sae_errors_with(sae, x, &Passes::default(), "SAE errors")
}

/// [`sae_errors`] on `passes.threads` threads, reporting progress as `stage`. Every thread
/// count gives the same bits (each 256-row batch is one forward call, wherever it runs).
///
/// # Errors
/// As [`sae_errors`].
pub fn sae_errors_with(
    sae: &Sae,
    x: ArrayView2<f32>,
    passes: &Passes,
    stage: &'static str,
) -> Result<Array2<f32>, SaeError> {
    let d = x.ncols();
    let batches = pass::map_batches(
        x,
        passes,
        stage,
        || sae.workspace(BATCH),
        |ws, chunk| Ok::<_, SaeError>(sae.forward(chunk, ws)?.error().to_owned()),
    )?;
    let mut e = Array2::zeros((x.nrows(), d));
    for (i, b) in batches.iter().enumerate() {
        e.slice_mut(s![i * BATCH..i * BATCH + b.nrows(), ..])
            .assign(b);
    }
    Ok(e)
}

/// Streams the rows of `x` through the SAE and the head in batches of 256, one
/// [`DarkScore`] per row, on every core ([`score_tokens_with`]).
///
/// # Errors
/// Width mismatches between `x`, the SAE and the head.
pub fn score_tokens(
    sae: &Sae,
    head: &DarkHead,
    x: ArrayView2<f32>,
) -> Result<Vec<DarkScore>, SaeEvalError> {
    score_tokens_with(sae, head, x, &Passes::default(), "scoring tokens")
}

/// [`score_tokens`] on `passes.threads` threads, reporting progress as `stage`. Every
/// thread count gives the same bits.
///
/// # Errors
/// As [`score_tokens`].
pub fn score_tokens_with(
    sae: &Sae,
    head: &DarkHead,
    x: ArrayView2<f32>,
    passes: &Passes,
    stage: &'static str,
) -> Result<Vec<DarkScore>, SaeEvalError> {
    Ok(score_pass(sae, head, x, passes, stage)?.0)
}

/// One pass of the rows through the SAE and the head: the head's scores, and the SAE's
/// ‖e‖² per row as its forward pass gives it (what [`defined_nmse`](super::train::defined_nmse) sums), so that
/// `sae-score` runs the SAE over its rows once, not twice.
fn score_pass(
    sae: &Sae,
    head: &DarkHead,
    x: ArrayView2<f32>,
    passes: &Passes,
    stage: &'static str,
) -> Result<(Vec<DarkScore>, Vec<f32>), SaeEvalError> {
    if head.d() != sae.d_in() {
        return Err(SaeEvalError::Invalid(format!(
            "the dark-matter head takes d = {}, the SAE d_in = {}",
            head.d(),
            sae.d_in()
        )));
    }
    let batches = pass::map_batches(
        x,
        passes,
        stage,
        || (sae.workspace(BATCH), head.workspace(BATCH)),
        |(ws, dws), chunk| {
            let fwd = sae.forward(chunk, ws)?;
            let sq = fwd.error_sq_norm().to_vec();
            Ok::<_, SaeEvalError>((head.score(chunk, fwd.error(), dws)?.to_vec(), sq))
        },
    )?;
    let mut scores = Vec::with_capacity(x.nrows());
    let mut sq = Vec::with_capacity(x.nrows());
    for (b, q) in batches {
        scores.extend(b);
        sq.extend(q);
    }
    Ok((scores, sq))
}

/// Rows per matrix product of the Mahalanobis baseline's covariance. ndarray's `dot` runs
/// matrixmultiply's dgemm, which sums the inner dimension (here the rows) in runs of 256 (its
/// `D_KC`) and adds each run's product into the result in order; adding per-run products in
/// the same order gives the same bits as one product over every row, a block of rows at a
/// time (tested).
pub const COV_ROWS: usize = 256;

/// Squared Mahalanobis distance to training rows, with the covariance shrunk towards the
/// scaled identity: Σ_s = (1 − α)·Σ + α·(tr Σ/d)·I (Σ the maximum-likelihood covariance).
#[derive(Debug, Clone)]
pub struct Mahalanobis {
    mean: Array1<f64>,
    /// Lower Cholesky factor of Σ_s.
    chol: Array2<f64>,
    shrinkage: f64,
}

impl Mahalanobis {
    /// Fits mean and shrunk covariance on `x`.
    ///
    /// # Errors
    /// [`SaeEvalError::Invalid`] for fewer than 2 rows, `shrinkage` outside (0, 1], or a
    /// covariance that is not positive definite (all rows equal).
    pub fn fit(x: ArrayView2<f32>, shrinkage: f64) -> Result<Mahalanobis, SaeEvalError> {
        Self::fit_blocks(x.dim(), shrinkage, |f| f(0, x))
    }

    /// [`fit`](Self::fit) on `n × d` rows that `pass` hands, a block at a time with the index
    /// of its first row, to the function it is given; it is called twice (the mean, then the
    /// covariance around it), and each block but the last must hold a whole number of
    /// [`COV_ROWS`]. The sums run over the rows in the order of one pass over a whole array,
    /// so any cut into blocks gives the bits of [`fit`](Self::fit) (tested against the
    /// single matrix product it once was).
    ///
    /// # Errors
    /// As [`fit`](Self::fit), and the first error of `pass`.
    fn fit_blocks(
        (n, d): (usize, usize),
        shrinkage: f64,
        mut pass: impl FnMut(
            &mut dyn FnMut(usize, ArrayView2<f32>) -> Result<(), SaeEvalError>,
        ) -> Result<(), SaeEvalError>,
    ) -> Result<Mahalanobis, SaeEvalError> {
        if n < 2 || d == 0 {
            return Err(SaeEvalError::Invalid(format!(
                "the Mahalanobis baseline needs at least 2 rows, got [{n}, {d}]"
            )));
        }
        if !(shrinkage > 0.0 && shrinkage <= 1.0) {
            return Err(SaeEvalError::Invalid(format!(
                "shrinkage {shrinkage} must be in (0, 1]"
            )));
        }
        // The row sums in row order, as `mean_axis` adds a C-order array's rows.
        let mut sum = Array1::<f64>::zeros(d);
        pass(&mut |_, x| {
            for row in x.rows() {
                for (a, &v) in sum.iter_mut().zip(&row) {
                    *a += f64::from(v);
                }
            }
            Ok(())
        })?;
        let mean = sum / n as f64;
        let mut cov: Option<Array2<f64>> = None;
        pass(&mut |first, x| {
            debug_assert_eq!(first % COV_ROWS, 0, "blocks of whole runs of COV_ROWS rows");
            for run in x.axis_chunks_iter(Axis(0), COV_ROWS) {
                let c = &run.mapv(f64::from) - &mean;
                let product = c.t().dot(&c);
                match &mut cov {
                    Some(cov) => *cov += &product,
                    None => cov = Some(product),
                }
            }
            Ok(())
        })?;
        let mut cov = cov.expect("n ≥ 2 rows") / n as f64;
        let scale = cov.diag().sum() / d as f64;
        cov *= 1.0 - shrinkage;
        for i in 0..d {
            cov[[i, i]] += shrinkage * scale;
        }
        let chol = cholesky(cov).ok_or_else(|| {
            SaeEvalError::Invalid("the shrunk covariance is not positive definite".into())
        })?;
        Ok(Mahalanobis {
            mean,
            chol,
            shrinkage,
        })
    }

    pub fn shrinkage(&self) -> f64 {
        self.shrinkage
    }

    /// (x − μ)ᵀ Σ_s⁻¹ (x − μ) per row.
    ///
    /// # Errors
    /// [`SaeEvalError::Invalid`] for a width mismatch.
    pub fn score(&self, x: ArrayView2<f32>) -> Result<Vec<f32>, SaeEvalError> {
        self.score_with(x, &Passes::default())
    }

    /// [`score`](Self::score) on `passes.threads` threads (the rows are independent, so
    /// every thread count gives the same bits).
    ///
    /// # Errors
    /// As [`score`](Self::score).
    pub fn score_with(
        &self,
        x: ArrayView2<f32>,
        passes: &Passes,
    ) -> Result<Vec<f32>, SaeEvalError> {
        let d = self.mean.len();
        if x.ncols() != d {
            return Err(SaeEvalError::Invalid(format!(
                "rows have {} features, the Mahalanobis baseline was fitted on {d}",
                x.ncols()
            )));
        }
        let batches = pass::map_batches(
            x,
            passes,
            "Mahalanobis baseline",
            || vec![0.0f64; d],
            |y, chunk| Ok::<_, SaeEvalError>(self.score_rows(chunk, y)),
        )?;
        Ok(batches.into_iter().flatten().collect())
    }

    /// The distances of `x`'s rows, with `y` (length d) as scratch.
    fn score_rows(&self, x: ArrayView2<f32>, y: &mut [f64]) -> Vec<f32> {
        let d = self.mean.len();
        x.rows()
            .into_iter()
            .map(|row| {
                // Forward substitution L y = x − μ; distance = ‖y‖².
                let mut dist = 0.0;
                for i in 0..d {
                    let li = self.chol.row(i);
                    let v = f64::from(row[i])
                        - self.mean[i]
                        - li.iter().zip(&y[..i]).map(|(l, y)| l * y).sum::<f64>();
                    y[i] = v / li[i];
                    dist += y[i] * y[i];
                }
                dist as f32
            })
            .collect()
    }
}

fn cholesky(mut a: Array2<f64>) -> Option<Array2<f64>> {
    let d = a.nrows();
    for j in 0..d {
        let mut diag = a[[j, j]];
        for k in 0..j {
            diag -= a[[j, k]] * a[[j, k]];
        }
        if diag.is_nan() || diag <= 0.0 {
            return None;
        }
        let diag = diag.sqrt();
        a[[j, j]] = diag;
        for i in j + 1..d {
            let mut v = a[[i, j]];
            for k in 0..j {
                v -= a[[i, k]] * a[[j, k]];
            }
            a[[i, j]] = v / diag;
        }
        for k in j + 1..d {
            a[[j, k]] = 0.0;
        }
    }
    Some(a)
}

/// Tokens grouped by prompt id, in order of first appearance.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    pub ids: Vec<i64>,
    /// The token rows of each prompt.
    pub members: Vec<Vec<usize>>,
}

impl Prompts {
    pub fn group(ids: &[i64]) -> Prompts {
        let mut index: HashMap<i64, usize> = HashMap::new();
        let mut out = Prompts {
            ids: Vec::new(),
            members: Vec::new(),
        };
        for (row, &id) in ids.iter().enumerate() {
            let slot = *index.entry(id).or_insert_with(|| {
                out.ids.push(id);
                out.members.push(Vec::new());
                out.ids.len() - 1
            });
            out.members[slot].push(row);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Max of each prompt's token scores (NaN if any token's is NaN).
    pub fn max(&self, scores: &[f32]) -> Vec<f32> {
        self.members
            .iter()
            .map(|m| {
                m.iter()
                    .map(|&r| scores[r])
                    .fold(f32::NEG_INFINITY, |a, v| {
                        if v.is_nan() || a.is_nan() {
                            f32::NAN
                        } else {
                            a.max(v)
                        }
                    })
            })
            .collect()
    }

    /// Mean of each prompt's token scores (f64 sum).
    pub fn mean(&self, scores: &[f32]) -> Vec<f32> {
        self.members
            .iter()
            .map(|m| (m.iter().map(|&r| f64::from(scores[r])).sum::<f64>() / m.len() as f64) as f32)
            .collect()
    }

    /// A prompt's label: the max of its tokens' labels.
    pub fn labels(&self, labels: &[u8]) -> Vec<u8> {
        self.members
            .iter()
            .map(|m| m.iter().map(|&r| labels[r]).max().unwrap_or(0))
            .collect()
    }
}

/// One line of the OOD table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OodRow {
    pub score: String,
    /// `token`, `prompt max` or `prompt mean`.
    pub level: &'static str,
    pub n: usize,
    pub n_ood: usize,
    pub auroc: Option<f64>,
    pub auprc: Option<f64>,
}

/// AUROC / AUPRC of each named score at token level and, with prompt ids, at prompt level
/// (max and mean over tokens).
///
/// # Errors
/// Length mismatches or labels other than 0/1.
pub fn ood_table(
    scores: &[(String, Vec<f32>)],
    labels: &[u8],
    prompts: Option<&Prompts>,
) -> Result<Vec<OodRow>, SaeEvalError> {
    let mut rows = Vec::new();
    let row = |score: &str, level, s: &[f32], l: &[u8]| -> Result<OodRow, SaeEvalError> {
        let r = eval::evaluate(s, l)?;
        Ok(OodRow {
            score: score.to_string(),
            level,
            n: r.n,
            n_ood: r.n_anomalous,
            auroc: r.auroc,
            auprc: r.auprc,
        })
    };
    for (name, s) in scores {
        rows.push(row(name, "token", s, labels)?);
    }
    if let Some(p) = prompts {
        let pl = p.labels(labels);
        for (name, s) in scores {
            rows.push(row(name, "prompt max", &p.max(s), &pl)?);
        }
        for (name, s) in scores {
            rows.push(row(name, "prompt mean", &p.mean(s), &pl)?);
        }
    }
    Ok(rows)
}

/// The table as Markdown.
pub fn format_ood_table(rows: &[OodRow]) -> String {
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    let mut out =
        String::from("| level | score | n (OOD) | AUROC | AUPRC |\n|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {} | {} |",
            r.level,
            r.score,
            r.n,
            r.n_ood,
            f(r.auroc),
            f(r.auprc)
        );
    }
    out
}

/// Names of the per-token scores, in table order.
pub const SCORE_NAMES: [&str; 4] = [
    "‖e‖²",
    "nonlinear ‖e − Aᵀx − b‖²",
    "deviation (‖e‖² − pred)/σ",
    "Mahalanobis (raw x)",
];

/// The token score columns from [`DarkScore`]s (‖e‖², nonlinear, deviation), plus the
/// Mahalanobis scores when given.
pub fn named_scores(
    scores: &[DarkScore],
    mahalanobis: Option<Vec<f32>>,
) -> Vec<(String, Vec<f32>)> {
    let mut out = vec![
        (
            SCORE_NAMES[0].to_string(),
            scores.iter().map(|s| s.error_sq_norm).collect(),
        ),
        (
            SCORE_NAMES[1].to_string(),
            scores.iter().map(|s| s.nonlinear_sq_norm).collect(),
        ),
        (
            SCORE_NAMES[2].to_string(),
            scores.iter().map(|s| s.deviation).collect(),
        ),
    ];
    if let Some(m) = mahalanobis {
        out.push((SCORE_NAMES[3].to_string(), m));
    }
    out
}

/// Splits rows into (train, held-out) for `sae-train`: with prompt ids, the last
/// ⌈fraction·prompts⌉ prompts (in order of first appearance) are held out; without, the last
/// ⌈fraction·rows⌉ rows. `fraction = 0` holds out nothing.
///
/// # Errors
/// [`SaeEvalError::Invalid`] for a fraction outside [0, 1) or one that leaves fewer than 2
/// training rows.
pub fn holdout_split(
    rows: usize,
    prompt_ids: Option<&[i64]>,
    fraction: f64,
) -> Result<(Vec<usize>, Vec<usize>), SaeEvalError> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(SaeEvalError::Invalid(format!(
            "the held-out fraction {fraction} must be in [0, 1)"
        )));
    }
    let (train, held): (Vec<usize>, Vec<usize>) = match prompt_ids {
        Some(ids) => {
            let p = Prompts::group(ids);
            let n_held = (fraction * p.len() as f64).ceil() as usize;
            let cut = p.len() - n_held.min(p.len());
            let mut train: Vec<usize> = p.members[..cut].iter().flatten().copied().collect();
            let mut held: Vec<usize> = p.members[cut..].iter().flatten().copied().collect();
            train.sort_unstable();
            held.sort_unstable();
            (train, held)
        }
        None => {
            let n_held = (fraction * rows as f64).ceil() as usize;
            let cut = rows - n_held.min(rows);
            ((0..cut).collect(), (cut..rows).collect())
        }
    };
    if train.len() < 2 {
        return Err(SaeEvalError::Invalid(format!(
            "holding out {fraction} leaves {} training rows",
            train.len()
        )));
    }
    Ok((train, held))
}

/// Fits the dark-matter head on the SAE errors of `x` (and reports R² on `held_out` rows),
/// on every core ([`fit_dark_head_with`]).
///
/// # Errors
/// Width mismatches or a failed fit.
pub fn fit_dark_head(
    sae: &Sae,
    x: ArrayView2<f32>,
    held_out: Option<ArrayView2<f32>>,
    config: &DarkConfig,
) -> Result<super::dark::DarkFit, SaeEvalError> {
    fit_dark_head_with(sae, x, held_out, config, &Passes::default())
}

/// [`fit_dark_head`] on `passes.threads` threads. The statistics are summed per block of
/// [`STATS_ROWS`](pass::STATS_ROWS) rows and the blocks merged in row order, so every thread
/// count gives the same head.
///
/// # Errors
/// As [`fit_dark_head`].
pub fn fit_dark_head_with(
    sae: &Sae,
    x: ArrayView2<f32>,
    held_out: Option<ArrayView2<f32>>,
    config: &DarkConfig,
    passes: &Passes,
) -> Result<super::dark::DarkFit, SaeEvalError> {
    let mut stats = DarkStats::new(sae.d_in());
    pass::for_units(
        x,
        pass::STATS_ROWS,
        1,
        passes,
        "fitting the head on the SAE's errors",
        || sae.workspace(BATCH),
        |ws, _, block| {
            let mut block_stats = DarkStats::new(sae.d_in());
            for chunk in block.axis_chunks_iter(Axis(0), BATCH) {
                let out = sae.forward(chunk, ws)?;
                block_stats.accumulate(chunk, out.error())?;
            }
            Ok::<_, SaeEvalError>(block_stats)
        },
        |block_stats| Ok(stats.merge(&block_stats)?),
    )?;
    let held = match held_out {
        Some(h) if h.nrows() > 0 => Some((
            h,
            sae_errors_with(sae, h, passes, "SAE errors of the held-out rows")?,
        )),
        _ => None,
    };
    Ok(DarkHead::fit(
        &stats,
        config,
        held.as_ref().map(|(h, e)| (*h, e.view())),
    )?)
}

/// Dark-matter statistics from out-of-fold SAE errors: the rows are split into `folds`
/// groups (whole prompts, round-robin in order of first appearance, when `prompt_ids` are
/// given; else contiguous row blocks); for each, an SAE with `config` (seed + fold + 1) is
/// trained on the other groups and its errors on the group are accumulated. An SAE fitted
/// on few rows reconstructs its own rows much better than new ones, so a head fitted on its
/// own training errors predicts too small an error for every new token; out-of-fold errors
/// are what it will see in use.
///
/// # Errors
/// Fewer than 2 folds, a fold that leaves fewer than 2 training rows, or a training error.
pub fn crossfit_dark_stats(
    x: ArrayView2<f32>,
    prompt_ids: Option<&[i64]>,
    config: &SaeTrainConfig,
    folds: usize,
) -> Result<DarkStats, SaeEvalError> {
    Ok(crossfit_dark(x, prompt_ids, config, folds, 0, &mut |_| {})?.stats())
}

/// One cross-fit fold done: its SAE trained on the other folds, its errors on the fold's
/// rows taken ([`crossfit_dark`] reports one per fold that holds rows).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FoldStats {
    /// 1-based.
    pub fold: usize,
    pub folds: usize,
    /// Rows the fold's SAE trained on (the other folds').
    pub train_rows: usize,
    /// The fold's own rows, which its SAE did not see.
    pub rows: usize,
    /// Normalised MSE of the fold's SAE on its own rows; `None` when they do not vary.
    pub nmse: Option<f64>,
}

/// What `sae-train` reports as it goes: the final SAE's epochs, then the cross-fit folds
/// (which take most of the time with the default 5 folds).
#[derive(Debug, Clone, Copy)]
pub enum SaeTrainProgress<'a> {
    Epoch(&'a EpochStats),
    Fold(&'a FoldStats),
}

/// What [`crossfit_dark`] returns.
#[derive(Debug, Clone)]
pub struct CrossFit {
    /// Each row's fold.
    pub fold_of: Vec<usize>,
    /// Per fold, the statistics of its rows' out-of-fold errors.
    pub fold_stats: Vec<DarkStats>,
    /// The rows whose errors were kept (the last `keep`), and their errors, in that order.
    pub kept: Vec<usize>,
    pub errors: Array2<f32>,
}

impl CrossFit {
    /// The statistics of every fold together.
    pub fn stats(&self) -> DarkStats {
        merge_except(&self.fold_stats, None)
    }

    /// Scores of the kept rows (`x` holds every row), each by a head fitted on the other
    /// folds' statistics: what a head fitted on all of them will see on new tokens.
    ///
    /// # Errors
    /// A fold's head cannot be fitted.
    pub fn out_of_fold_scores(
        &self,
        x: ArrayView2<f32>,
        dark: &DarkConfig,
    ) -> Result<Vec<DarkScore>, SaeEvalError> {
        let xk = x.select(Axis(0), &self.kept);
        let folds: Vec<usize> = self.kept.iter().map(|&r| self.fold_of[r]).collect();
        out_of_fold_scores(
            &self.fold_stats,
            &folds,
            xk.view(),
            self.errors.view(),
            dark,
        )
    }
}

/// Σ‖e‖² / Σ‖x − x̄‖² of rows `x` with SAE errors `e`; `None` when the rows do not vary.
fn nmse_of_errors(x: ArrayView2<f32>, e: ArrayView2<f32>) -> Option<f64> {
    let mean = x.mapv(f64::from).mean_axis(Axis(0))?;
    let tss: f64 = x
        .rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .zip(&mean)
                .map(|(&v, m)| (f64::from(v) - m).powi(2))
                .sum::<f64>()
        })
        .sum();
    let rss: f64 = e.iter().map(|&v| f64::from(v).powi(2)).sum();
    (tss > 0.0).then(|| rss / tss)
}

/// The fold of each of `rows` rows: whole prompts round-robin in order of first appearance
/// when `prompt_ids` are given, else contiguous blocks.
fn fold_assignment(rows: usize, prompt_ids: Option<&[i64]>, folds: usize) -> Vec<usize> {
    match prompt_ids {
        Some(ids) => {
            let p = Prompts::group(ids);
            let mut f = vec![0; rows];
            for (i, m) in p.members.iter().enumerate() {
                for &r in m {
                    f[r] = i % folds;
                }
            }
            f
        }
        None => (0..rows).map(|r| r * folds / rows).collect(),
    }
}

/// The sum of every fold's statistics but `except`'s.
fn merge_except(stats: &[DarkStats], except: Option<usize>) -> DarkStats {
    let mut all = DarkStats::new(stats.first().map_or(0, DarkStats::d));
    for (i, s) in stats.iter().enumerate() {
        if Some(i) != except {
            all.merge(s).expect("folds share d");
        }
    }
    all
}

/// Scores rows (x, e) whose folds are `folds`, each by a head fitted on the statistics of
/// every other fold.
fn out_of_fold_scores(
    fold_stats: &[DarkStats],
    folds: &[usize],
    x: ArrayView2<f32>,
    e: ArrayView2<f32>,
    dark: &DarkConfig,
) -> Result<Vec<DarkScore>, SaeEvalError> {
    let mut out = vec![DarkScore::default(); x.nrows()];
    for k in 0..fold_stats.len() {
        let rows: Vec<usize> = (0..folds.len()).filter(|&i| folds[i] == k).collect();
        if rows.is_empty() {
            continue;
        }
        let head = DarkHead::fit(&merge_except(fold_stats, Some(k)), dark, None)?.head;
        let mut ws = head.workspace(256);
        for chunk in rows.chunks(256) {
            let (xc, ec) = (x.select(Axis(0), chunk), e.select(Axis(0), chunk));
            for (&i, s) in chunk.iter().zip(head.score(xc.view(), ec.view(), &mut ws)?) {
                out[i] = *s;
            }
        }
    }
    Ok(out)
}

/// [`crossfit_dark_stats`] per fold, keeping the out-of-fold SAE errors of the last `keep`
/// rows: what `sae-train` calibrates thresholds on when it holds no rows out. `on_fold` is
/// called as each fold is done.
///
/// # Errors
/// As [`crossfit_dark_stats`].
pub fn crossfit_dark(
    x: ArrayView2<f32>,
    prompt_ids: Option<&[i64]>,
    config: &SaeTrainConfig,
    folds: usize,
    keep: usize,
    on_fold: &mut dyn FnMut(&FoldStats),
) -> Result<CrossFit, SaeEvalError> {
    let rows = x.nrows();
    if folds < 2 || folds > rows {
        return Err(SaeEvalError::Invalid(format!(
            "cross-fitting needs 2..={rows} folds, got {folds}"
        )));
    }
    let fold_of = fold_assignment(rows, prompt_ids, folds);
    let kept: Vec<usize> = (rows.saturating_sub(keep)..rows).collect();
    let mut errors = Array2::zeros((kept.len(), x.ncols()));
    let mut fold_stats = Vec::with_capacity(folds);
    for fold in 0..folds {
        let mut stats = DarkStats::new(x.ncols());
        let inside: Vec<usize> = (0..rows).filter(|&r| fold_of[r] == fold).collect();
        let outside: Vec<usize> = (0..rows).filter(|&r| fold_of[r] != fold).collect();
        if !inside.is_empty() {
            if outside.len() < 2 {
                return Err(SaeEvalError::Invalid(format!(
                    "fold {fold} leaves {} rows to train on",
                    outside.len()
                )));
            }
            let cfg = SaeTrainConfig {
                seed: config.seed.wrapping_add(fold as u64 + 1),
                ..config.clone()
            };
            let xo = x.select(Axis(0), &outside);
            let trained = train_topk(xo.view(), None, &cfg, &mut |_| {})?;
            let xi = x.select(Axis(0), &inside);
            let e = sae_errors(&trained.sae, xi.view())?;
            stats.accumulate(xi.view(), e.view())?;
            on_fold(&FoldStats {
                fold: fold + 1,
                folds,
                train_rows: outside.len(),
                rows: inside.len(),
                nmse: nmse_of_errors(xi.view(), e.view()),
            });
            let first_kept = rows - kept.len();
            for (&r, row) in inside.iter().zip(e.rows()) {
                if r >= first_kept {
                    errors.row_mut(r - first_kept).assign(&row);
                }
            }
        }
        fold_stats.push(stats);
    }
    Ok(CrossFit {
        fold_of,
        fold_stats,
        kept,
        errors,
    })
}

/// The folder, under an SAE folder, where `sae-train` writes the dark-matter head.
pub const DARK_DIR: &str = "dark";
/// The training report `sae-train` writes beside the SAE.
pub const TRAIN_REPORT_FILE: &str = "train_report.json";

/// Arguments of `darkwatch sae-train`.
#[derive(Debug, Clone)]
pub struct SaeTrainArgs {
    pub input: PathBuf,
    pub tensor: Option<String>,
    pub prompt_ids: Option<PathBuf>,
    /// The tensor of a `.safetensors` `prompt_ids` file with several (`--prompt-ids-tensor`).
    pub prompt_ids_tensor: Option<String>,
    pub out: PathBuf,
    /// Share of prompts (or rows) held out from SAE and head training, for reporting.
    pub holdout: f64,
    /// Tokens dropped from the start of every prompt (`--skip-positions`); `None`: the
    /// default of [`super::positions::select_rows`].
    pub skip_positions: Option<usize>,
    pub config: SaeTrainConfig,
    pub dark: DarkConfig,
    /// 0: fit the dark-matter head on the final SAE's errors on its own training rows. K ≥ 2:
    /// cross-fit it on out-of-fold errors (see [`crossfit_dark_stats`]).
    pub dark_folds: usize,
    pub meta: SaveMeta,
    /// Replace an SAE already in `out` (an autoencoder model folder is refused regardless).
    pub force: bool,
}

/// What `sae-train` writes to `train_report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SaeTrainSummary {
    pub input: PathBuf,
    pub sae: SaeTrainReport,
    pub train_rows: usize,
    pub held_out_rows: usize,
    pub dark_ridge: f64,
    /// 0 = head fitted on the SAE's own training rows; K = cross-fitted over K folds.
    pub dark_folds: usize,
    pub dark_train_r2: R2,
    pub dark_held_out_r2: Option<R2>,
    /// Which rows' scores thresholds calibrate on: `held-out`, `out-of-fold` or `training`.
    pub calibration_rows: String,
    pub calibration_count: usize,
    /// Tokens dropped from the start of every prompt, and the rows that took.
    pub skip_positions: usize,
    pub skipped_rows: usize,
}

/// `darkwatch sae-train`: reads activations, holds out a share, trains a TopK SAE, writes it
/// (SAELens layout) to `out`, fits the dark-matter head on the training rows' SAE errors into
/// `out/dark/` with the thresholds' calibration scores (held-out rows, else out-of-fold
/// errors, else training rows), and writes `out/train_report.json`. The folder is then a
/// live detector for the agent ([`super::detector`]). Returns a text summary.
///
/// # Errors
/// Bad input, config or a failed write, each naming its file or setting.
pub fn sae_train_command(
    args: &SaeTrainArgs,
    on_progress: &mut dyn FnMut(SaeTrainProgress<'_>),
) -> Result<(SaeTrainSummary, String), SaeEvalError> {
    check_train_out(&args.out, args.force)?;
    check_train_settings(args)?;
    let (x, shape) = read_activations_flagged(&args.input, args.tensor.as_deref(), "--tensor")?;
    let note = rows_note(&args.input, &shape);
    let ids = read_prompt_ids(
        args.prompt_ids.as_deref(),
        &args.prompt_ids_tensor,
        x.nrows(),
        &note,
    )?;
    let (x, ids, selection) =
        super::positions::select_rows(&args.input, x, &shape, ids, args.skip_positions)?;
    let (train_rows, held_rows) = holdout_split(x.nrows(), ids.as_deref(), args.holdout)?;
    let train = x.select(Axis(0), &train_rows);
    let held = x.select(Axis(0), &held_rows);
    let held_view = (!held_rows.is_empty()).then(|| held.view());
    args.config.validate(x.ncols())?;
    check_head_rows(&args.input, train_rows.len(), x.nrows(), x.ncols())?;
    if args.dark_folds >= 2 {
        // Whole prompts go to folds: more folds than prompts would leave some empty.
        let (units, unit) = match &ids {
            Some(ids) => {
                let train_ids: Vec<i64> = train_rows.iter().map(|&r| ids[r]).collect();
                (Prompts::group(&train_ids).len(), "prompts")
            }
            None => (train_rows.len(), "rows"),
        };
        if args.dark_folds > units {
            return Err(SaeEvalError::Invalid(format!(
                "--dark-folds {}: the training rows hold only {units} {unit} to split into \
                 folds; give at most {units}",
                args.dark_folds
            )));
        }
    }
    fs::create_dir_all(&args.out).map_err(|source| SaeEvalError::Io {
        path: args.out.clone(),
        source,
    })?;
    let trained = train_topk(train.view(), held_view, &args.config, &mut |e| {
        on_progress(SaeTrainProgress::Epoch(e));
    })?;
    let mut crossfit = None;
    let fit = if args.dark_folds >= 2 {
        let train_ids = ids
            .as_ref()
            .map(|ids| train_rows.iter().map(|&r| ids[r]).collect::<Vec<i64>>());
        // Out-of-fold errors are kept for calibration only when no rows are held out.
        let keep = if held_view.is_some() {
            0
        } else {
            MAX_CALIBRATION_SCORES
        };
        let cf = crossfit_dark(
            train.view(),
            train_ids.as_deref(),
            &args.config,
            args.dark_folds,
            keep,
            &mut |f| on_progress(SaeTrainProgress::Fold(f)),
        )?;
        let held = match held_view {
            Some(h) => Some((h, sae_errors(&trained.sae, h)?)),
            None => None,
        };
        let fit = DarkHead::fit(
            &cf.stats(),
            &args.dark,
            held.as_ref().map(|(h, e)| (*h, e.view())),
        )?;
        crossfit = Some(cf);
        fit
    } else {
        fit_dark_head(&trained.sae, train.view(), held_view, &args.dark)?
    };
    // Only now, with the long cross-fit done, is the folder touched: a failure or Ctrl-C
    // before this leaves an SAE it held whole. With --force the old head goes first, so
    // an SAE is never paired with a head fitted to another one (an interruption from here
    // on leaves an SAE without a head, which every command refuses by name).
    let dark_dir = args.out.join(DARK_DIR);
    if dark_dir.exists() {
        fs::remove_dir_all(&dark_dir).map_err(|source| SaeEvalError::Io {
            path: dark_dir.clone(),
            source,
        })?;
    }
    save_saelens(&trained.parts, &args.out, &args.meta)?;
    // The head records the weights as written, which is how every command loads them.
    let mut head = fit.head.clone();
    let weights = args.out.join(super::load::SAELENS_WEIGHTS);
    head.record_sae(super::dark::SaeRecord {
        weights_file: super::load::SAELENS_WEIGHTS.into(),
        weights_sha256: super::load::file_sha256(&weights)?,
        norm_scaling_factor: None,
    });
    let (skip, from) = selection.recorded();
    head.record_positions(skip, from);
    head.save(&dark_dir)?;
    // Thresholds calibrate on scores of tokens neither the SAE nor the head saw: held-out
    // rows, else cross-fitted ones (each row's error from an SAE, and its score from a
    // head, fitted without its fold); the training rows only as a last resort.
    let calibration = match (held_view, &crossfit) {
        (Some(h), _) => Calibration::from_scores(
            &score_tokens(&trained.sae, &fit.head, tail(h))?,
            CalibrationRows::HeldOut,
            MAX_CALIBRATION_SCORES,
        ),
        (None, Some(cf)) => Calibration::from_scores(
            &cf.out_of_fold_scores(train.view(), &args.dark)?,
            CalibrationRows::OutOfFold,
            MAX_CALIBRATION_SCORES,
        ),
        (None, None) => Calibration::from_scores(
            &score_tokens(&trained.sae, &fit.head, tail(train.view()))?,
            CalibrationRows::Training,
            MAX_CALIBRATION_SCORES,
        ),
    };
    calibration.save(&dark_dir)?;
    let summary = SaeTrainSummary {
        input: args.input.clone(),
        sae: trained.report.clone(),
        train_rows: train_rows.len(),
        held_out_rows: held_rows.len(),
        dark_ridge: args.dark.ridge,
        dark_folds: args.dark_folds,
        dark_train_r2: fit.train,
        dark_held_out_r2: fit.held_out,
        calibration_rows: calibration.rows.name().into(),
        calibration_count: calibration.len(),
        skip_positions: selection.skip,
        skipped_rows: selection.dropped,
    };
    let report_path = args.out.join(TRAIN_REPORT_FILE);
    let json =
        serde_json::to_vec_pretty(&summary).map_err(|e| input_err(&report_path, e.to_string()))?;
    fs::write(&report_path, json).map_err(|source| SaeEvalError::Io {
        path: report_path.clone(),
        source,
    })?;
    let r = &trained.report;
    let mut text = selection.text();
    let _ = writeln!(
        text,
        "trained TopK SAE: d_in {}, {} latents, k {}, {} epochs ({} steps) on {} rows ({} held out)",
        r.d_in,
        r.config.latents,
        r.config.k,
        r.config.epochs,
        r.steps,
        train_rows.len(),
        held_rows.len()
    );
    let _ = writeln!(
        text,
        "normalised MSE: train {:.4}, held-out {}; dead latents {:.1} % (fire on no training row), \
         {:.1} % by the {}-token rule; mean L0 {:.2}",
        r.train_nmse,
        nmse_text(r.held_out_nmse, held_rows.len()),
        100.0 * r.dead_share,
        100.0 * r.dead_share_tracked,
        r.dead_tokens,
        r.mean_l0
    );
    let r2 = |v: Option<R2>| {
        v.map_or("n/a".into(), |v| {
            format!("vector {:.3}, norm {:.3}", v.vector, v.norm)
        })
    };
    let _ = writeln!(
        text,
        "dark-matter head (ridge {}, {}): R² on its fit rows {}; held-out {} (paper: vector ≈ 0.5, norm > 0.9)",
        args.dark.ridge,
        if args.dark_folds >= 2 {
            format!(
                "cross-fitted on out-of-fold errors of {} SAEs",
                args.dark_folds
            )
        } else {
            "fitted on the SAE's own training rows".to_string()
        },
        r2(Some(fit.train)),
        r2(fit.held_out)
    );
    text.push_str(&r.notes());
    text.push_str(
        &fit.held_out
            .map_or(String::new(), |h| h.below_zero_warning()),
    );
    text.push_str(&fit.head.negative_predictions_note(x.view(), "rows read")?);
    let _ = writeln!(text, "{}", calibration.describe());
    let _ = writeln!(text, "wrote {}", args.out.display());
    Ok((summary, text))
}

/// The SAE files of `dir` that `sae-train` would replace: a checkpoint (SAELens or sparsify,
/// or a sparsify layer folder), a dark-matter head folder, a training report.
fn sae_files_in(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = [
        super::load::CONFIG_FILE,
        super::load::SAELENS_WEIGHTS,
        super::load::SPARSIFY_WEIGHTS,
        DARK_DIR,
        TRAIN_REPORT_FILE,
    ]
    .into_iter()
    .filter(|name| dir.join(name).exists())
    .map(String::from)
    .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        let mut layers: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().join(super::load::CONFIG_FILE).is_file())
            .map(|e| format!("{}/", e.file_name().to_string_lossy()))
            .collect();
        layers.sort();
        found.extend(layers);
    }
    found
}

/// Refuses an `sae-train` output folder that holds an autoencoder model (an SAE beside it
/// would make the folder both, and `run`, `inspect` and `replay` would each pick one), or
/// an SAE, unless `force` (as `sae-head` does for a head).
fn check_train_out(out: &Path, force: bool) -> Result<(), SaeEvalError> {
    // Checked before the training, which would otherwise end in a bare "File exists".
    if out.exists() && !out.is_dir() {
        return Err(input_err(
            out,
            "is a file, and --out names the folder the SAE is written into: choose a folder \
             path (a new one is made), or remove the file",
        ));
    }
    if out.join(crate::model::io::META_FILE).exists() {
        return Err(input_err(
            out,
            format!(
                "holds an autoencoder model ({}); an SAE written beside it would leave a folder \
                 that is both: choose another --out folder",
                crate::model::io::META_FILE
            ),
        ));
    }
    let found = sae_files_in(out);
    if !force && !found.is_empty() {
        return Err(input_err(
            out,
            format!(
                "already holds an SAE ({}); pass --force to replace it, or choose another --out \
                 folder",
                found.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Refuses `sae-train` settings that would quietly do something else than asked: one
/// cross-fit fold (none of the head's rows would be out of fold: it would be the
/// non-cross-fitted head of `--dark-folds 0`). (No epoch, which would write an untrained SAE,
/// is refused by [`SaeTrainConfig::validate`].)
fn check_train_settings(args: &SaeTrainArgs) -> Result<(), SaeEvalError> {
    check_ridge(&args.dark)?;
    if args.dark_folds == 1 {
        return Err(SaeEvalError::Invalid(
            "--dark-folds 1: cross-fitting takes at least 2 folds (each fold's SAE trains on \
             the others); give 2 or more, or 0 to fit the head on the final SAE's own training \
             rows (their errors are smaller than on new tokens, so its thresholds come out low)"
                .into(),
        ));
    }
    Ok(())
}

/// Refuses a head setting before any work (`--ridge -1` used to train every epoch first).
fn check_ridge(dark: &DarkConfig) -> Result<(), SaeEvalError> {
    dark.validate().map_err(|_| {
        SaeEvalError::Invalid(format!(
            "--ridge {}: the dark-matter head's ridge must be finite and at least 0 (relative \
             to the mean feature variance; 0 is plain least squares)",
            dark.ridge
        ))
    })
}

/// The prompt ids of `rows` activation rows, from `path` (the tensor `tensor` of a
/// `.safetensors` file with several, named by `--prompt-ids-tensor`).
fn read_prompt_ids(
    path: Option<&Path>,
    tensor: &Option<String>,
    rows: usize,
    note: &str,
) -> Result<Option<Vec<i64>>, SaeEvalError> {
    if let (None, Some(_)) = (path, tensor) {
        return Err(SaeEvalError::Invalid(
            "--prompt-ids-tensor names a tensor of the --prompt-ids file; give --prompt-ids".into(),
        ));
    }
    let ids = path
        .map(|p| {
            read_ints_noted(
                p,
                (tensor.as_deref(), "--prompt-ids-tensor"),
                rows,
                "prompt ids",
                note,
            )
        })
        .transpose()?;
    if let (Some(p), Some(r)) = (path, ids.as_deref().and_then(Reappearing::find)) {
        tracing::warn!(
            file = %p.display(),
            "Prompt id {} reappears at row {} after other prompts' tokens ({} ids do); each \
             id's tokens are taken as one prompt wherever they are. If the ids restart per \
             batch or file, make them unique (add an offset per batch).",
            r.id,
            r.row,
            r.ids
        );
    }
    Ok(ids)
}

/// Prompt ids that come back after other ids' rows: [`Prompts::group`] merges them into one
/// prompt, which is right for interleaved prompts but most likely a mistake when ids restart
/// per batch (two prompts with id 0 become one). Commands warn about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reappearing {
    /// The first id that reappears, and the row where it does.
    pub id: i64,
    pub row: usize,
    /// How many ids reappear.
    pub ids: usize,
}

impl Reappearing {
    /// The ids of `ids` whose rows are not contiguous, or `None` when every id's rows are.
    pub fn find(ids: &[i64]) -> Option<Reappearing> {
        let mut closed = std::collections::HashSet::new();
        let mut counted = std::collections::HashSet::new();
        let mut first = None;
        for (row, w) in ids.windows(2).enumerate() {
            if w[0] == w[1] {
                continue;
            }
            closed.insert(w[0]);
            if closed.contains(&w[1]) {
                first.get_or_insert((w[1], row + 1));
                counted.insert(w[1]);
            }
        }
        first.map(|(id, row)| Reappearing {
            id,
            row,
            ids: counted.len(),
        })
    }
}

/// Refuses, before any work, to fit a dark-matter head of width `d` on `rows` rows of
/// `input` (of `total`; the rest are held out): see [`super::dark::min_fit_rows`].
fn check_head_rows(input: &Path, rows: usize, total: usize, d: usize) -> Result<(), SaeEvalError> {
    super::dark::check_fit_rows(rows, d).map_err(|e| {
        let held = if rows < total {
            format!(" ({rows} of {total}; the others are held out)")
        } else {
            String::new()
        };
        input_err(input, format!("{e}{held}"))
    })
}

/// Arguments of `darkwatch sae-head`.
#[derive(Debug, Clone)]
pub struct SaeHeadArgs {
    /// The SAE folder (SAELens or sparsify).
    pub sae: PathBuf,
    /// Normal activations.
    pub input: PathBuf,
    pub tensor: Option<String>,
    pub prompt_ids: Option<PathBuf>,
    /// The tensor of a `.safetensors` `prompt_ids` file with several (`--prompt-ids-tensor`).
    pub prompt_ids_tensor: Option<String>,
    /// The `expected_average_only_in` scaling factor (`--norm-scaling-factor`), recorded
    /// with the head.
    pub norm_scaling_factor: Option<f32>,
    /// Share of prompts (or rows) held out from the fit: held-out R² and the threshold
    /// calibration come from them. 0: fit on every row, calibrate on cross-fitted scores.
    pub holdout: f64,
    /// Tokens dropped from the start of every prompt (`--skip-positions`); `None`: the
    /// default of [`super::positions::select_rows`].
    pub skip_positions: Option<usize>,
    pub dark: DarkConfig,
    /// Where to write the head; default [`head_dir`](super::detector::head_dir) of `sae`
    /// (`<sae>/dark`, or for a sparsify SAE with one hookpoint the one of `run/dark` and
    /// `run/<hookpoint>/dark` that already holds its head), where the agent looks for it.
    pub out: Option<PathBuf>,
    /// Replace a head already there.
    pub force: bool,
}

/// Folds of the cross-fitted calibration of `sae-head --holdout 0`.
const HEAD_FOLDS: usize = 5;

/// `darkwatch sae-head`: fits the dark-matter head of an existing SAE (a published one,
/// say) on normal activations, and writes it with the threshold calibration, so that the
/// agent can score live activations with the SAE. The calibration holds the scores of the
/// held-out rows; with no rows held out, each row's score by a head fitted on the other
/// [`HEAD_FOLDS`] − 1 folds.
///
/// # Errors
/// Bad input, a head already in place (without `force`), a failed fit or write, each
/// naming its file.
pub fn sae_head_command(args: &SaeHeadArgs) -> Result<String, SaeEvalError> {
    sae_head_command_with(args, &Passes::default())
}

/// [`sae_head_command`] with its passes over the rows on `passes.threads` threads, reporting
/// progress to `passes.progress`. Every thread count writes the same head and calibration.
///
/// # Errors
/// As [`sae_head_command`].
pub fn sae_head_command_with(args: &SaeHeadArgs, passes: &Passes) -> Result<String, SaeEvalError> {
    check_ridge(&args.dark)?;
    let mut sae = Sae::load(&args.sae)?;
    super::detector::apply_norm_scaling(
        &mut sae,
        args.norm_scaling_factor
            .map(|s| (s, "--norm-scaling-factor")),
        None,
    )?;
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| super::detector::head_dir(&args.sae));
    check_head_out(&sae, &args.sae, &dir)?;
    if !args.force && dir.join(super::dark::DARK_META_FILE).exists() {
        return Err(input_err(
            &dir,
            "already holds a dark-matter head (`sae-train` writes a cross-fitted one); \
             pass --force to replace it, or --out to write elsewhere",
        ));
    }
    let (x, shape) = read_activations_for(&sae, &args.sae, &args.input, args.tensor.as_deref())?;
    let note = rows_note(&args.input, &shape);
    let ids = read_prompt_ids(
        args.prompt_ids.as_deref(),
        &args.prompt_ids_tensor,
        x.nrows(),
        &note,
    )?;
    let (x, ids, selection) =
        super::positions::select_rows(&args.input, x, &shape, ids, args.skip_positions)?;
    let (train_rows, held_rows) = holdout_split(x.nrows(), ids.as_deref(), args.holdout)?;
    check_head_rows(&args.input, train_rows.len(), x.nrows(), x.ncols())?;
    check_calibration_rows(args, x.nrows(), ids.is_some(), &train_rows, &held_rows)?;
    let train = x.select(Axis(0), &train_rows);
    let (fit, calibration) = if held_rows.is_empty() {
        let rows = train.nrows();
        if rows < HEAD_FOLDS {
            return Err(input_err(
                &args.input,
                format!("{rows} rows; the head needs at least {HEAD_FOLDS}"),
            ));
        }
        let e = sae_errors_with(&sae, train.view(), passes, "SAE errors of the rows")?;
        let fold_of = fold_assignment(rows, ids.as_deref(), HEAD_FOLDS);
        let mut fold_stats: Vec<DarkStats> = (0..HEAD_FOLDS)
            .map(|_| DarkStats::new(sae.d_in()))
            .collect();
        for (f, stats) in fold_stats.iter_mut().enumerate() {
            let rows: Vec<usize> = (0..rows).filter(|&r| fold_of[r] == f).collect();
            let (xf, ef) = (train.select(Axis(0), &rows), e.select(Axis(0), &rows));
            stats.accumulate(xf.view(), ef.view())?;
        }
        let fit = DarkHead::fit(&merge_except(&fold_stats, None), &args.dark, None)?;
        let first = rows.saturating_sub(MAX_CALIBRATION_SCORES);
        let scores = out_of_fold_scores(
            &fold_stats,
            &fold_of[first..],
            train.slice(s![first.., ..]),
            e.slice(s![first.., ..]),
            &args.dark,
        )?;
        let c = Calibration::from_scores(&scores, CalibrationRows::OutOfFold, usize::MAX);
        (fit, c)
    } else {
        let held = x.select(Axis(0), &held_rows);
        let fit = fit_dark_head_with(&sae, train.view(), Some(held.view()), &args.dark, passes)?;
        let scores = score_tokens_with(
            &sae,
            &fit.head,
            tail(held.view()),
            passes,
            "calibration scores of the held-out rows",
        )?;
        let c = Calibration::from_scores(&scores, CalibrationRows::HeldOut, usize::MAX);
        (fit, c)
    };
    let mut head = fit.head.clone();
    if let Some(record) = super::detector::sae_record(&sae) {
        head.record_sae(record);
    }
    let (skip, from) = selection.recorded();
    head.record_positions(skip, from);
    head.save(&dir)?;
    calibration.save(&dir)?;
    let r2 = |v: R2| format!("vector {:.3}, norm {:.3}", v.vector, v.norm);
    let mut text = selection.text();
    let _ = writeln!(
        text,
        "dark-matter head (ridge {}) fitted on {} rows of {}: R² {} on them, held-out {} \
         (paper: vector ≈ 0.5, norm > 0.9)",
        args.dark.ridge,
        train_rows.len(),
        args.input.display(),
        r2(fit.train),
        fit.held_out.map_or("n/a".into(), r2)
    );
    if let Some(held) = fit.held_out.filter(|r| r.norm < 0.0) {
        let _ = writeln!(
            text,
            "warning: held-out norm R² {:.3} is below 0: the head predicts the held-out rows' \
             ‖e‖² worse than a constant (their mean) would, so its deviation scores mean little; \
             give more or more varied normal rows, or raise --ridge",
            held.norm
        );
    }
    text.push_str(&fit.head.negative_predictions_note(x.view(), "rows read")?);
    let _ = writeln!(text, "{}", calibration.describe());
    let _ = writeln!(text, "wrote {}", dir.display());
    Ok(text)
}

/// Refuses a `sae-head --out` folder inside another SAE's folder: `out` itself, or the
/// folder above it (`other-sae/dark`, where `run` would take the head for that SAE's own),
/// holding a checkpoint whose weights are not `sae`'s
/// ([`other_sae_folder`](super::detector::other_sae_folder), the test `sae-score`'s
/// remedies make too).
fn check_head_out(sae: &Sae, sae_dir: &Path, out: &Path) -> Result<(), SaeEvalError> {
    let mine = sae.info().weights_sha256.as_deref();
    if let Some(dir) = super::detector::other_sae_folder(sae_dir, mine, out) {
        return Err(input_err(
            out,
            format!(
                "is in {}, which holds another SAE than --sae {} (other weights): a head \
                 fitted for one SAE and written into another's folder would be used for it \
                 with the wrong calibration; drop --out to write {}, or choose a folder \
                 outside other SAEs",
                dir.display(),
                sae_dir.display(),
                super::detector::head_dirs(sae_dir).0.display()
            ),
        ));
    }
    Ok(())
}

/// Refuses, before the fit, a `sae-head` run whose calibration would hold fewer scores than
/// thresholds need ([`MIN_CALIBRATION_SCORES`]): the held-out rows, or with `--holdout 0`
/// every row. `run` would refuse the folder it wrote.
fn check_calibration_rows(
    args: &SaeHeadArgs,
    rows: usize,
    prompts: bool,
    train_rows: &[usize],
    held_rows: &[usize],
) -> Result<(), SaeEvalError> {
    let (n, which) = if held_rows.is_empty() {
        (
            train_rows.len(),
            "rows (--holdout 0 calibrates on every row)",
        )
    } else {
        (held_rows.len(), "held-out rows")
    };
    if n >= MIN_CALIBRATION_SCORES {
        return Ok(());
    }
    let unit = if prompts { "prompts" } else { "rows" };
    let more = if held_rows.is_empty() {
        format!("give at least {MIN_CALIBRATION_SCORES} rows")
    } else {
        format!(
            "hold out more {unit} (--holdout {}: {n} of {rows} rows), give more rows, or use \
             --holdout 0 (every row calibrates, cross-fitted)",
            args.holdout
        )
    };
    Err(input_err(
        &args.input,
        format!(
            "{n} {which} would give the threshold calibration {n} scores; `darkwatch run` needs \
             at least {MIN_CALIBRATION_SCORES}: {more}"
        ),
    ))
}

/// The last [`MAX_CALIBRATION_SCORES`] rows of `x`: all a calibration keeps.
fn tail(x: ArrayView2<'_, f32>) -> ArrayView2<'_, f32> {
    let first = x.nrows().saturating_sub(MAX_CALIBRATION_SCORES);
    x.slice_move(s![first.., ..])
}

/// Arguments of `darkwatch sae-score`.
#[derive(Debug, Clone, Default)]
pub struct SaeScoreArgs {
    pub sae: PathBuf,
    /// The head's folder; default [`head_dir`](super::detector::head_dir) of `sae`.
    pub dark: Option<PathBuf>,
    pub input: PathBuf,
    pub tensor: Option<String>,
    pub labels: Option<PathBuf>,
    /// The tensor of a `.safetensors` `labels` file with several (`--labels-tensor`).
    pub labels_tensor: Option<String>,
    pub prompt_ids: Option<PathBuf>,
    /// The tensor of a `.safetensors` `prompt_ids` file with several (`--prompt-ids-tensor`).
    pub prompt_ids_tensor: Option<String>,
    /// Activations to fit the Mahalanobis baseline on (e.g. the SAE's training rows).
    pub baseline: Option<PathBuf>,
    /// The tensor of a `.safetensors` `baseline` file with several (`--baseline-tensor`).
    pub baseline_tensor: Option<String>,
    /// The `expected_average_only_in` scaling factor (`--norm-scaling-factor`); default the
    /// one the head recorded.
    pub norm_scaling_factor: Option<f32>,
    pub baseline_shrinkage: f64,
    /// Token CSV.
    pub out: Option<PathBuf>,
    /// Prompt CSV.
    pub prompt_out: Option<PathBuf>,
    /// Tokens left out of the scores at the start of every prompt (`--skip-positions`);
    /// `None`: the skip the head recorded (with positions known; see
    /// [`super::positions::score_skip`]).
    pub skip_positions: Option<usize>,
}

/// What `sae-score` measured.
#[derive(Debug, Clone, Serialize)]
pub struct SaeScoreSummary {
    pub rows: usize,
    pub prompts: Option<usize>,
    pub table: Vec<OodRow>,
    /// Dark-matter R² on the rows labelled 0 (held-out in-distribution), when labels are given.
    pub r2_label0: Option<R2>,
    /// Normalised MSE of the SAE on the rows labelled 0, and on all rows; `None` where it is
    /// not defined (fewer than 2 rows, or rows that are all equal: it divides by their spread
    /// around their mean).
    pub nmse_label0: Option<f64>,
    pub nmse_all: Option<f64>,
    /// The positions left out of each prompt's start (0: none), and the rows that took:
    /// they are in no statistic above, and in the token CSV without scores.
    pub skip_positions: usize,
    pub skipped_rows: usize,
}

/// A normalised MSE from [`defined_nmse`](super::train::defined_nmse) on `rows` rows, or why there is none.
fn nmse_text(nmse: Option<f64>, rows: usize) -> String {
    const WHY: &str = "it divides by the rows' spread around their mean";
    match (nmse, rows) {
        (Some(v), _) => format!("{v:.4}"),
        (None, 0) => "n/a (no rows)".into(),
        (None, 1) => format!("n/a (one row: {WHY}, which one row does not have)"),
        (None, _) => format!("n/a (the rows are all equal: {WHY})"),
    }
}

/// Writes a CSV to `path` through a buffer, line by line as `write` makes it: a token CSV of
/// tens of millions of rows is never held as one string.
fn write_csv(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<(), SaeEvalError> {
    use std::io::Write as _;
    let io = |source| SaeEvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut w = std::io::BufWriter::new(fs::File::create(path).map_err(io)?);
    write(&mut w).map_err(io)?;
    w.flush().map_err(io)
}

/// The mean of rows fed one at a time and their spread around it, summed as
/// [`defined_nmse_of_errors`](train::defined_nmse_of_errors) sums them over a whole array: the mean in a first pass over
/// the rows, Σ‖x − mean‖² in a second (`tss`); whether any row differs from the first.
struct RowSpread {
    sum: Array1<f64>,
    n: usize,
    first: Option<Vec<f32>>,
    spread: bool,
    /// Σ‖x − mean‖², from −0.0 as a float `sum` starts.
    tss: f64,
    /// For the label-0 rows: Σ‖e − ē‖² of their SAE errors, for the R².
    tss_e: f64,
}

impl RowSpread {
    fn new(cols: usize) -> RowSpread {
        RowSpread {
            sum: Array1::zeros(cols),
            n: 0,
            first: None,
            spread: false,
            tss: -0.0,
            tss_e: 0.0,
        }
    }

    fn add(&mut self, row: ndarray::ArrayView1<f32>) {
        for (a, &v) in self.sum.iter_mut().zip(&row) {
            *a += f64::from(v);
        }
        self.n += 1;
        match &self.first {
            None => self.first = Some(row.to_vec()),
            Some(first) => {
                self.spread = self.spread || row.iter().zip(first).any(|(a, b)| a != b);
            }
        }
    }

    fn mean(&self) -> Array1<f64> {
        &self.sum / self.n.max(1) as f64
    }
}

/// Refuses, before anything is read or written, a `sae-score` output that is one of its
/// inputs, the other output, or a file in the SAE's folder or the head's: `--out
/// cfg.json` once left the SAE unusable.
fn check_score_outputs(args: &SaeScoreArgs) -> Result<(), SaeEvalError> {
    use crate::outputs::Protected;
    let mut protected = vec![Protected::File("--input", &args.input)];
    for (flag, path) in [
        ("--labels", &args.labels),
        ("--prompt-ids", &args.prompt_ids),
        ("--baseline", &args.baseline),
    ] {
        if let Some(path) = path {
            protected.push(Protected::File(flag, path));
        }
    }
    protected.push(Protected::Folder {
        what: "a file of the SAE folder",
        dir: &args.sae,
    });
    if let Some(dark) = &args.dark {
        protected.push(Protected::Folder {
            what: "a file of the dark-matter head's folder (--dark)",
            dir: dark,
        });
    }
    let outputs = [
        ("--out", args.out.as_deref()),
        ("--prompt-out", args.prompt_out.as_deref()),
    ];
    Ok(crate::outputs::check(&outputs, &protected)?)
}

/// `darkwatch sae-score`: scores every token row through the SAE and its head, writes the
/// token (and prompt) CSVs if asked, and with labels returns the OOD table.
///
/// # Errors
/// An output that would overwrite an input or a file of the SAE or its head (checked first);
/// bad input (shape mismatches are named with both shapes), a missing SAE or head, a failed
/// write.
pub fn sae_score_command(args: &SaeScoreArgs) -> Result<(SaeScoreSummary, String), SaeEvalError> {
    sae_score_command_with(args, &Passes::default())
}

/// [`sae_score_command`] with its passes over the rows on `passes.threads` threads,
/// reporting progress to `passes.progress`. Every thread count gives the same scores.
///
/// # Errors
/// As [`sae_score_command`].
pub fn sae_score_command_with(
    args: &SaeScoreArgs,
    passes: &Passes,
) -> Result<(SaeScoreSummary, String), SaeEvalError> {
    score_command(args, passes, None)
}

/// [`sae_score_command_with`] reading `block_rows` rows of the input at a time (rounded up to
/// whole 256-row batches) instead of [`score_block_rows`]' tens of MB: how tests cut a small
/// input into several blocks. Every block size gives the same bits.
///
/// # Errors
/// As [`sae_score_command`].
pub fn sae_score_command_in_blocks(
    args: &SaeScoreArgs,
    passes: &Passes,
    block_rows: usize,
) -> Result<(SaeScoreSummary, String), SaeEvalError> {
    score_command(args, passes, Some(block_rows))
}

/// `sae-score`, streaming its input: a C-order float `.npy` is read `block_rows` rows at a
/// time ([`score_block_rows`] by default), twice (the rows' means, then their spread around
/// them), and each row's scores kept; memory is a block plus a few numbers per row, not the
/// rows. Other inputs are read whole and passed over the same way.
fn score_command(
    args: &SaeScoreArgs,
    passes: &Passes,
    block_rows: Option<usize>,
) -> Result<(SaeScoreSummary, String), SaeEvalError> {
    use std::io::Write as _;
    check_score_outputs(args)?;
    for (tensor, flag, file) in [
        (
            &args.labels_tensor,
            "--labels-tensor",
            args.labels.is_some(),
        ),
        (
            &args.baseline_tensor,
            "--baseline-tensor",
            args.baseline.is_some(),
        ),
    ] {
        if tensor.is_some() && !file {
            let of = flag.trim_end_matches("-tensor");
            return Err(SaeEvalError::Invalid(format!(
                "{flag} names a tensor of the {of} file; give {of}"
            )));
        }
    }
    let mut sae = Sae::load(&args.sae)?;
    let dark_dir = args
        .dark
        .clone()
        .unwrap_or_else(|| super::detector::head_dir(&args.sae));
    // A published SAE has no head yet: say how to fit one, as `inspect` and `run` do.
    let head = super::detector::load_head(&dark_dir, &sae, &args.sae)?;
    super::detector::apply_norm_scaling(
        &mut sae,
        args.norm_scaling_factor
            .map(|s| (s, "--norm-scaling-factor")),
        Some((&head, &dark_dir)),
    )?;
    let mut input = ActivationBlocks::open(&args.input, args.tensor.as_deref(), "--tensor")?;
    let (rows, cols) = (input.rows, input.cols);
    if cols != sae.d_in() {
        return Err(input_err(
            &args.input,
            format!(
                "activations are [{rows}, {cols}], the SAE in {} takes d_in = {}",
                args.sae.display(),
                sae.d_in()
            ),
        ));
    }
    if head.d() != sae.d_in() {
        return Err(SaeEvalError::Invalid(format!(
            "the dark-matter head takes d = {}, the SAE d_in = {}",
            head.d(),
            sae.d_in()
        )));
    }
    let note = rows_note(&args.input, &input.shape);
    let labels = match &args.labels {
        Some(p) => Some(read_labels_noted(
            p,
            (args.labels_tensor.as_deref(), "--labels-tensor"),
            rows,
            &note,
        )?),
        None => None,
    };
    let ids = read_prompt_ids(
        args.prompt_ids.as_deref(),
        &args.prompt_ids_tensor,
        rows,
        &note,
    )?;
    let prompts = ids.as_deref().map(Prompts::group);
    let skip = super::positions::score_skip(
        &args.input,
        rows,
        ids.as_deref(),
        &input.shape,
        args.skip_positions,
        head.skip_positions(),
        &dark_dir.join(super::dark::DARK_META_FILE),
    )?;
    if head.skip_positions().is_none() && args.skip_positions.is_none() {
        tracing::info!(
            "{}: the head records no skip_positions (written before darkwatch recorded it): \
             every position is scored, as it was fitted; `sae-head --force` refits it and \
             records it",
            dark_dir.join(super::dark::DARK_META_FILE).display()
        );
    }
    let scored = |r: usize| skip.scored(r);
    let scored_rows = rows - skip.skipped;
    // Whole 256-row batches per block: the SAE and the baseline see the rows cut as they
    // would be over the whole input.
    let block = block_rows.map_or_else(
        || score_block_rows(cols, passes.threads),
        |b| b.max(1).div_ceil(BATCH) * BATCH,
    );
    let maha = match &args.baseline {
        Some(p) => {
            let mut base =
                ActivationBlocks::open(p, args.baseline_tensor.as_deref(), "--baseline-tensor")?;
            if base.cols != cols {
                return Err(input_err(
                    p,
                    format!(
                        "baseline rows have {} features, the scored rows {cols}",
                        base.cols
                    ),
                ));
            }
            let (n, stages) = (
                base.rows,
                [
                    "the Mahalanobis baseline's mean",
                    "the Mahalanobis baseline's covariance",
                ],
            );
            let mut stage = 0;
            Some(Mahalanobis::fit_blocks(
                (n, cols),
                args.baseline_shrinkage,
                |f| {
                    let name = stages[stage.min(1)];
                    stage += 1;
                    base.for_each(block, |first, x| {
                        f(first, x)?;
                        (passes.progress)(RowProgress {
                            stage: name,
                            done: first + x.nrows(),
                            total: n,
                        });
                        Ok(())
                    })
                },
            )?)
        }
        None => None,
    };

    // The first pass: every row through the SAE, the head and the baseline; of the rows, only
    // their scores are kept, and the sums that the normalised MSEs and the label-0 R² take
    // their means from.
    let is_normal = |r: usize| scored(r) && labels.as_ref().is_some_and(|l| l[r] == 0);
    let mut scores: Vec<DarkScore> = Vec::with_capacity(rows);
    let mut error_sq: Vec<f32> = Vec::with_capacity(rows);
    let mut distances: Vec<f32> = Vec::with_capacity(if maha.is_some() { rows } else { 0 });
    let mut all = RowSpread::new(cols);
    let mut normal = RowSpread::new(cols);
    // The label-0 rows' SAE errors, summed in row order as `DarkHead::r2` sums them.
    let mut e_sum = Array1::<f64>::zeros(cols);
    input.for_each(block, |first, x| {
        let report = |p: RowProgress| {
            (passes.progress)(RowProgress {
                done: first + p.done,
                total: rows,
                ..p
            })
        };
        let block_passes = Passes {
            threads: passes.threads,
            progress: &report,
        };
        let batches = pass::map_batches_at(
            x,
            &block_passes,
            "scoring tokens",
            || {
                (
                    sae.workspace(BATCH),
                    head.workspace(BATCH),
                    vec![0.0f64; cols],
                )
            },
            |(ws, dws, y), at, chunk| {
                let fwd = sae.forward(chunk, ws)?;
                let sq = fwd.error_sq_norm().to_vec();
                let s = head.score(chunk, fwd.error(), dws)?.to_vec();
                let m = maha.as_ref().map(|m| m.score_rows(chunk, y));
                let mut e0 = Vec::new();
                for (i, e) in fwd.error().rows().into_iter().enumerate() {
                    if is_normal(first + at + i) {
                        e0.extend(e.iter().copied());
                    }
                }
                Ok::<_, SaeEvalError>((s, sq, m, e0))
            },
        )?;
        for (s, q, m, e0) in batches {
            scores.extend(s);
            error_sq.extend(q);
            distances.extend(m.into_iter().flatten());
            for e in e0.chunks_exact(cols) {
                for (a, &v) in e_sum.iter_mut().zip(e) {
                    *a += f64::from(v);
                }
            }
        }
        for (i, row) in x.rows().into_iter().enumerate() {
            if !scored(first + i) {
                continue;
            }
            all.add(row);
            if is_normal(first + i) {
                normal.add(row);
            }
        }
        Ok(())
    })?;
    let normal_rows = normal.n;

    // The second pass, for the sums around those means: the rows' spread (the normalised
    // MSEs divide by it) and the label-0 rows' errors' spread (the R² of the head's vector
    // prediction), the errors from the SAE again, as before streaming.
    let all_tss = scored_rows >= 2 && all.spread;
    let normal_tss = labels.is_some() && normal_rows >= 2;
    if all_tss || normal_tss {
        let (mean_all, mean_normal) = (all.mean(), normal.mean());
        let e_bar = &e_sum / normal_rows.max(1) as f64;
        let mut tss_e = 0.0;
        let quiet = |_: RowProgress| {};
        let inner = Passes {
            threads: passes.threads,
            progress: &quiet,
        };
        input.for_each(block, |first, x| {
            if all_tss {
                for (i, row) in x.rows().into_iter().enumerate() {
                    if scored(first + i) {
                        all.tss += train::sq_dist(row, mean_all.view());
                    }
                }
            }
            if normal_tss {
                let picked: Vec<usize> = (0..x.nrows()).filter(|&i| is_normal(first + i)).collect();
                if !picked.is_empty() {
                    let xn = x.select(Axis(0), &picked);
                    if normal.spread {
                        for row in xn.rows() {
                            normal.tss += train::sq_dist(row, mean_normal.view());
                        }
                    }
                    let en = sae_errors_with(&sae, xn.view(), &inner, "SAE errors")?;
                    for e in en.rows() {
                        super::dark::add_sq_dev(&mut tss_e, e, e_bar.view());
                    }
                }
            }
            (passes.progress)(RowProgress {
                stage: "the spread of the rows and of the label-0 rows' SAE errors",
                done: first + x.nrows(),
                total: rows,
            });
            Ok(())
        })?;
        normal.tss_e = tss_e;
    }
    let maha = maha.map(|_| distances);
    let named = named_scores(&scores, maha);

    if let Some(out) = &args.out {
        write_csv(out, |csv| {
            write!(csv, "row")?;
            if ids.is_some() {
                write!(csv, ",prompt_id")?;
            }
            if labels.is_some() {
                write!(csv, ",label")?;
            }
            if skip.skip > 0 {
                write!(csv, ",position,skipped")?;
            }
            write!(
                csv,
                ",error_sq_norm,predicted_sq_norm,nonlinear_sq_norm,deviation"
            )?;
            if named.len() > 3 {
                write!(csv, ",mahalanobis")?;
            }
            writeln!(csv)?;
            for (r, sc) in scores.iter().enumerate() {
                write!(csv, "{r}")?;
                if let Some(ids) = &ids {
                    write!(csv, ",{}", ids[r])?;
                }
                if let Some(l) = &labels {
                    write!(csv, ",{}", l[r])?;
                }
                if let Some(pos) = skip.position(r) {
                    if !scored(r) {
                        // Kept so that rows line up with the input; not scored.
                        write!(csv, ",{pos},1,,,,")?;
                        if named.len() > 3 {
                            write!(csv, ",")?;
                        }
                        writeln!(csv)?;
                        continue;
                    }
                    write!(csv, ",{pos},0")?;
                }
                write!(
                    csv,
                    ",{},{},{},{}",
                    sc.error_sq_norm, sc.predicted_sq_norm, sc.nonlinear_sq_norm, sc.deviation
                )?;
                if named.len() > 3 {
                    write!(csv, ",{}", named[3].1[r])?;
                }
                writeln!(csv)?;
            }
            Ok(())
        })?;
    }
    if let Some(out) = &args.prompt_out {
        let Some(p) = &prompts else {
            return Err(SaeEvalError::Invalid(
                "prompt-level output needs prompt ids".into(),
            ));
        };
        let keys = [
            "error_sq_norm",
            "nonlinear_sq_norm",
            "deviation",
            "mahalanobis",
        ];
        // With rows skipped, each prompt's max and mean are over its scored tokens.
        let scored_members = (skip.skip > 0).then(|| Prompts {
            ids: p.ids.clone(),
            members: p
                .members
                .iter()
                .map(|m| m.iter().copied().filter(|&r| scored(r)).collect())
                .collect(),
        });
        let sp = scored_members.as_ref().unwrap_or(p);
        let maxes: Vec<Vec<f32>> = named.iter().map(|(_, s)| sp.max(s)).collect();
        let means: Vec<Vec<f32>> = named.iter().map(|(_, s)| sp.mean(s)).collect();
        let pl = labels.as_deref().map(|l| p.labels(l));
        write_csv(out, |csv| {
            write!(csv, "prompt_id,tokens")?;
            if scored_members.is_some() {
                write!(csv, ",scored_tokens")?;
            }
            if labels.is_some() {
                write!(csv, ",label")?;
            }
            for k in &keys[..named.len()] {
                write!(csv, ",{k}_max,{k}_mean")?;
            }
            writeln!(csv)?;
            for i in 0..p.len() {
                write!(csv, "{},{}", p.ids[i], p.members[i].len())?;
                let none_scored = sp.members[i].is_empty();
                if scored_members.is_some() {
                    write!(csv, ",{}", sp.members[i].len())?;
                }
                if let Some(pl) = &pl {
                    write!(csv, ",{}", pl[i])?;
                }
                for (mx, mn) in maxes.iter().zip(&means) {
                    if none_scored {
                        // Every token of the prompt is below the skip: nothing to aggregate.
                        write!(csv, ",,")?;
                    } else {
                        write!(csv, ",{},{}", mx[i], mn[i])?;
                    }
                }
                writeln!(csv)?;
            }
            Ok(())
        })?;
    }

    // The scoring pass's own errors: the same sums as `defined_nmse`, without a second run
    // of the SAE over every row.
    let rss = |sq: &mut dyn Iterator<Item = f32>| sq.fold(0.0f64, |a, v| a + f64::from(v));
    let mut error_sq_scored = error_sq
        .iter()
        .enumerate()
        .filter(|&(r, _)| scored(r))
        .map(|(_, &v)| v);
    let nmse_all = (scored_rows >= 2)
        .then(|| train::nmse_where_defined(rss(&mut error_sq_scored), all.tss, all.spread))
        .flatten();
    let (table, r2_label0, nmse_label0) = match &labels {
        Some(l) if skip.skip > 0 => {
            // The table over the scored rows only, their prompts regrouped.
            let keep: Vec<usize> = (0..rows).filter(|&r| scored(r)).collect();
            let kept_named: Vec<(String, Vec<f32>)> = named
                .iter()
                .map(|(n, s)| (n.clone(), keep.iter().map(|&r| s[r]).collect()))
                .collect();
            let kept_labels: Vec<u8> = keep.iter().map(|&r| l[r]).collect();
            let kept_prompts = ids
                .as_deref()
                .map(|ids| Prompts::group(&keep.iter().map(|&r| ids[r]).collect::<Vec<_>>()));
            let table = ood_table(&kept_named, &kept_labels, kept_prompts.as_ref())?;
            let (r2, nmse) = if normal_rows >= 2 {
                let normal_scores: Vec<DarkScore> = keep
                    .iter()
                    .filter(|&&r| l[r] == 0)
                    .map(|&r| scores[r])
                    .collect();
                let mut en_sq = keep.iter().filter(|&&r| l[r] == 0).map(|&r| error_sq[r]);
                (
                    Some(super::dark::r2_of_scores(&normal_scores, normal.tss_e)),
                    train::nmse_where_defined(rss(&mut en_sq), normal.tss, normal.spread),
                )
            } else {
                (None, None)
            };
            (table, r2, nmse)
        }
        Some(l) => {
            let table = ood_table(&named, l, prompts.as_ref())?;
            let (r2, nmse) = if normal_rows >= 2 {
                let normal_scores: Vec<DarkScore> = (0..rows)
                    .filter(|&r| l[r] == 0)
                    .map(|r| scores[r])
                    .collect();
                let mut en_sq = (0..rows).filter(|&r| l[r] == 0).map(|r| error_sq[r]);
                (
                    Some(super::dark::r2_of_scores(&normal_scores, normal.tss_e)),
                    train::nmse_where_defined(rss(&mut en_sq), normal.tss, normal.spread),
                )
            } else {
                (None, None)
            };
            (table, r2, nmse)
        }
        None => (Vec::new(), None, None),
    };
    let summary = SaeScoreSummary {
        rows,
        prompts: prompts.as_ref().map(Prompts::len),
        table,
        r2_label0,
        nmse_label0,
        nmse_all,
        skip_positions: skip.skip,
        skipped_rows: skip.skipped,
    };
    let mut text = skip.note.clone();
    let _ = writeln!(
        text,
        "scored {}{} with {} ({} latents) and {}",
        if skip.skipped > 0 {
            format!(
                "{scored_rows} of {rows} tokens ({} below position {} left out)",
                skip.skipped, skip.skip
            )
        } else {
            format!("{rows} tokens")
        },
        summary
            .prompts
            .map_or(String::new(), |p| format!(" in {p} prompts")),
        args.sae.display(),
        sae.d_sae(),
        dark_dir.display()
    );
    let _ = writeln!(
        text,
        "normalised MSE: all rows {}{}",
        nmse_text(nmse_all, rows),
        if labels.is_some() {
            format!(", label-0 rows {}", nmse_text(nmse_label0, normal_rows))
        } else {
            String::new()
        }
    );
    if let Some(r2) = r2_label0 {
        let _ = writeln!(
            text,
            "dark-matter R² on label-0 rows: vector {:.3}, norm {:.3} (paper: ≈ 0.5, > 0.9)",
            r2.vector, r2.norm
        );
    }
    if !summary.table.is_empty() {
        text.push_str(&format_ood_table(&summary.table));
    } else if labels.is_none() {
        let mean = |f: fn(&DarkScore) -> f32| {
            (0..rows)
                .filter(|&r| scored(r))
                .map(|r| f64::from(f(&scores[r])))
                .sum::<f64>()
                / scored_rows as f64
        };
        let _ = writeln!(
            text,
            "mean ‖e‖² {:.4}, predicted {:.4}, nonlinear {:.4}, deviation {:.3} (no labels: no AUROC)",
            mean(|s| s.error_sq_norm),
            mean(|s| s.predicted_sq_norm),
            mean(|s| s.nonlinear_sq_norm),
            mean(|s| s.deviation)
        );
    }
    if let Some(out) = &args.out {
        let _ = writeln!(text, "wrote {}", out.display());
    }
    if let Some(out) = &args.prompt_out {
        let _ = writeln!(text, "wrote {}", out.display());
    }
    Ok((summary, text))
}

#[cfg(test)]
mod tests {
    use super::super::train::defined_nmse_of_errors;
    use super::*;
    use crate::ingest::npy::tests::npy_bytes;
    use safetensors::tensor::TensorView;

    /// Writes `[rows, d]` little-endian f32 `values` as an `.npy` file.
    fn write_f32(path: &Path, shape: &[usize], values: &[f32]) {
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
            dims.join(", ")
        );
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(path, npy_bytes(1, &header, &data)).unwrap();
    }

    /// `rows` rows of `d` features: a few sparse factors plus a little noise, deterministic.
    fn rows(rows: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut out = Vec::with_capacity(rows * d);
        for _ in 0..rows {
            let (a, b) = (rng.next_f64() - 0.5, rng.next_f64() - 0.5);
            for j in 0..d {
                let v = a * (j as f64 * 0.7).cos() + b * (j as f64 * 0.3).sin();
                out.push((v + 0.05 * (rng.next_f64() - 0.5)) as f32);
            }
        }
        out
    }

    /// Trains a tiny SAE of other weights than [`tiny_sae`]'s (seed 9) on `input` into `out`:
    /// "another SAE" for the tests of heads that belong to a different one.
    fn train_other_tiny_sae(input: &Path, out: &Path) {
        let args = SaeTrainArgs {
            config: SaeTrainConfig {
                seed: 9,
                ..tiny_train_args(input, out).config
            },
            ..tiny_train_args(input, out)
        };
        sae_train_command(&args, &mut |_| {}).unwrap();
    }

    /// `sae-train`'s arguments for a tiny SAE (16 latents, k 2, 2 epochs, a held-out head)
    /// on `input`, written to `out`.
    fn tiny_train_args(input: &Path, out: &Path) -> SaeTrainArgs {
        SaeTrainArgs {
            input: input.to_path_buf(),
            tensor: None,
            prompt_ids: None,
            prompt_ids_tensor: None,
            out: out.to_path_buf(),
            holdout: 0.25,
            skip_positions: None,
            config: SaeTrainConfig {
                latents: 16,
                k: 2,
                epochs: 2,
                ..Default::default()
            },
            dark: DarkConfig { ridge: 1.0 },
            dark_folds: 0,
            meta: SaveMeta::default(),
            force: false,
        }
    }

    /// A folder holding `acts.npy` (240 rows of 8 features) and `sae/`, a tiny SAE trained
    /// on it with its dark-matter head.
    fn tiny_sae() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let acts = dir.path().join("acts.npy");
        write_f32(&acts, &[240, 8], &rows(240, 8, 1));
        let sae = dir.path().join("sae");
        sae_train_command(&tiny_train_args(&acts, &sae), &mut |_| {}).unwrap();
        (dir, acts, sae)
    }

    /// The passes over the rows give the same bits on 1 thread and on several: SAE errors,
    /// token scores, the head's fit, the Mahalanobis baseline, and what `sae-head` and
    /// `sae-score` write. Each 256-row batch (and each block of the head's statistics) is cut
    /// at the same rows whatever the thread count; a split that moved a row, reordered the
    /// results or merged the statistics in thread order would show here.
    #[test]
    fn passes_give_the_same_bits_on_one_thread_and_on_several() {
        let (dir, _, sae_dir) = tiny_sae();
        let sae = Sae::load(&sae_dir).unwrap();
        // Several blocks of head statistics, and a short last batch.
        let n = 2 * pass::STATS_ROWS + 300;
        let x = Array2::from_shape_vec((n, 8), rows(n, 8, 5)).unwrap();
        let head =
            super::super::detector::load_head(&sae_dir.join(DARK_DIR), &sae, &sae_dir).unwrap();
        let bits = |s: &[DarkScore]| -> Vec<[u32; 4]> {
            s.iter()
                .map(|s| {
                    [
                        s.error_sq_norm.to_bits(),
                        s.predicted_sq_norm.to_bits(),
                        s.nonlinear_sq_norm.to_bits(),
                        s.deviation.to_bits(),
                    ]
                })
                .collect()
        };
        let floats = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let one = Passes::threads(1);
        let (scores, error_sq) = score_pass(&sae, &head, x.view(), &one, "test").unwrap();
        assert_eq!(scores.len(), n);
        // The scoring pass's ‖e‖² give `defined_nmse` without a second pass.
        assert_eq!(
            defined_nmse_of_errors(x.view(), &error_sq).map(f64::to_bits),
            super::super::train::defined_nmse(&sae, x.view())
                .unwrap()
                .map(f64::to_bits)
        );
        let errors = sae_errors_with(&sae, x.view(), &one, "test").unwrap();
        let held = x.slice(s![..1000, ..]);
        let fit =
            fit_dark_head_with(&sae, x.view(), Some(held), &DarkConfig::default(), &one).unwrap();
        let maha = Mahalanobis::fit(held, 0.1).unwrap();
        let distances = maha.score_with(x.view(), &one).unwrap();
        for threads in [2, 3, 8] {
            let many = Passes::threads(threads);
            let (s, q) = score_pass(&sae, &head, x.view(), &many, "test").unwrap();
            assert_eq!(bits(&s), bits(&scores), "{threads} threads: token scores");
            assert_eq!(floats(&q), floats(&error_sq), "{threads} threads: ‖e‖²");
            let e = sae_errors_with(&sae, x.view(), &many, "test").unwrap();
            assert_eq!(
                floats(e.as_slice().unwrap()),
                floats(errors.as_slice().unwrap()),
                "{threads} threads: SAE errors"
            );
            let f = fit_dark_head_with(&sae, x.view(), Some(held), &DarkConfig::default(), &many)
                .unwrap();
            assert!(f.head == fit.head, "{threads} threads: the head differs");
            assert_eq!(f.train, fit.train);
            assert_eq!(f.held_out, fit.held_out);
            let m = maha.score_with(x.view(), &many).unwrap();
            assert_eq!(
                floats(&m),
                floats(&distances),
                "{threads} threads: Mahalanobis"
            );
        }
        // The commands: the same head, calibration and CSVs byte for byte.
        let acts = dir.path().join("big.npy");
        write_f32(&acts, &[n, 8], x.as_slice().unwrap());
        let ids = dir.path().join("ids.npy");
        let id_values: Vec<i64> = (0..n as i64).map(|r| r / 7).collect();
        write_1d(&ids, "<i8", &id_values, |v: i64| v.to_le_bytes().to_vec());
        let run = |threads: usize, holdout: f64| {
            let out = dir.path().join(format!("head-{threads}-{holdout}"));
            let text = sae_head_command_with(
                &SaeHeadArgs {
                    holdout,
                    prompt_ids: Some(ids.clone()),
                    ..head_args(&sae_dir, &acts, Some(out.clone()))
                },
                &Passes::threads(threads),
            )
            .unwrap();
            let files: Vec<_> = snapshot(&out)
                .into_iter()
                .map(|(p, b)| (p.file_name().unwrap().to_owned(), b))
                .collect();
            let (tokens, prompts) = (dir.path().join("t.csv"), dir.path().join("p.csv"));
            let (_, scored) = sae_score_command_with(
                &SaeScoreArgs {
                    sae: sae_dir.clone(),
                    dark: Some(out.clone()),
                    input: acts.clone(),
                    prompt_ids: Some(ids.clone()),
                    baseline: Some(acts.clone()),
                    baseline_shrinkage: 0.1,
                    out: Some(tokens.clone()),
                    prompt_out: Some(prompts.clone()),
                    ..Default::default()
                },
                &Passes::threads(threads),
            )
            .unwrap();
            let text = text.replace(&out.display().to_string(), "OUT");
            let scored = scored.replace(&out.display().to_string(), "OUT");
            let csv = (fs::read(tokens).unwrap(), fs::read(prompts).unwrap());
            (text, files, scored, csv)
        };
        for holdout in [0.0, 0.2] {
            let one = run(1, holdout);
            assert!(one.1.len() >= 3, "{:?}", one.0);
            assert_eq!(
                run(4, holdout),
                one,
                "holdout {holdout}: 4 threads against 1"
            );
        }
    }

    /// Every file under `dir` with its bytes.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn sae_score_refuses_outputs_onto_its_inputs_and_the_sae_folder() {
        let (dir, acts, sae) = tiny_sae();
        let before = snapshot(dir.path());
        let score = |out: Option<PathBuf>, prompt_out: Option<PathBuf>| {
            sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                input: acts.clone(),
                baseline: Some(acts.clone()),
                baseline_shrinkage: 0.1,
                out,
                prompt_out,
                ..Default::default()
            })
        };
        for (out, prompt_out, what) in [
            (
                Some(acts.clone()),
                None,
                "--out would overwrite the --input file",
            ),
            (
                Some(sae.join("cfg.json")),
                None,
                "--out would overwrite a file of the SAE folder",
            ),
            (
                None,
                Some(sae.join(DARK_DIR).join(super::super::dark::DARK_META_FILE)),
                "--prompt-out would overwrite a file of the SAE folder",
            ),
            (
                Some(sae.join("tokens.csv")),
                None,
                // Not there yet: not "overwrite" (the trial's `--out sl_topk/x.csv`).
                "--out would write a new file into the SAE folder, which",
            ),
            (
                Some(dir.path().join("t.csv")),
                Some(dir.path().join("sae/../t.csv")),
                "--prompt-out would overwrite the --out output",
            ),
        ] {
            let e = score(out, prompt_out).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("choose another file"), "{e}");
        }
        assert_eq!(snapshot(dir.path()), before, "nothing may be written");
        // The head's own folder, when given apart from the SAE's.
        let elsewhere = dir.path().join("head");
        fs::rename(sae.join(DARK_DIR), &elsewhere).unwrap();
        let e = sae_score_command(&SaeScoreArgs {
            sae: sae.clone(),
            dark: Some(elsewhere.clone()),
            input: acts.clone(),
            out: Some(elsewhere.join(super::super::dark::DARK_WEIGHTS_FILE)),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("the dark-matter head's folder"), "{e}");
        // A new file elsewhere is written.
        let tokens = dir.path().join("tokens.csv");
        sae_score_command(&SaeScoreArgs {
            sae: sae.clone(),
            dark: Some(elsewhere),
            input: acts,
            out: Some(tokens.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(fs::read_to_string(tokens).unwrap().lines().count(), 241);
    }

    /// Activation dumps as language-model code writes them: float16, and `[batch, seq, d]`
    /// (read as batch·seq rows, token t of sequence b at row b·seq + t) in .npy and
    /// .safetensors alike; per-row inputs must count the flattened rows.
    #[test]
    fn sae_score_reads_float16_and_batch_seq_d_activations() {
        use safetensors::tensor::TensorView;
        let (dir, acts, sae) = tiny_sae();
        let x = read_activations(&acts, None).unwrap();
        let flat: Vec<f32> = x.iter().copied().collect();
        let score = |input: &Path, prompt_ids: Option<PathBuf>| {
            let out = dir.path().join("tokens.csv");
            sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                input: input.to_path_buf(),
                prompt_ids,
                out: Some(out.clone()),
                ..Default::default()
            })
            .map(|_| fs::read_to_string(out).unwrap())
        };
        let want = score(&acts, None).unwrap();
        let npy3 = dir.path().join("acts3.npy");
        write_f32(&npy3, &[4, 60, 8], &flat);
        let (x3, shape) = read_activations_shaped(&npy3, None).unwrap();
        assert_eq!((x3, shape), (x.clone(), vec![4, 60, 8]));
        assert_eq!(score(&npy3, None).unwrap(), want);
        let st3 = dir.path().join("acts3.safetensors");
        let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![4, 60, 8], &bytes).unwrap();
        fs::write(
            &st3,
            safetensors::serialize(vec![("acts", view)], None).unwrap(),
        )
        .unwrap();
        assert_eq!(score(&st3, None).unwrap(), want);

        // float16 .npy: the values the safetensors F16 path gives.
        let halves: Vec<u8> = flat
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let npy16 = dir.path().join("acts16.npy");
        let header = "{'descr': '<f2', 'fortran_order': False, 'shape': (4, 60, 8), }";
        fs::write(&npy16, npy_bytes(1, header, &halves)).unwrap();
        let st16 = dir.path().join("acts16.safetensors");
        let view = TensorView::new(Dtype::F16, vec![240, 8], &halves).unwrap();
        fs::write(
            &st16,
            safetensors::serialize(vec![("a", view)], None).unwrap(),
        )
        .unwrap();
        assert_eq!(
            read_activations(&npy16, None).unwrap(),
            read_activations(&st16, None).unwrap()
        );
        assert_eq!(score(&npy16, None).unwrap(), score(&st16, None).unwrap());

        // One prompt id per sequence is not one per row: the error says how rows were made.
        let ids = dir.path().join("ids.npy");
        let header = "{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }";
        let data: Vec<u8> = (0..4i32).flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&ids, npy_bytes(1, header, &data)).unwrap();
        let e = score(&npy3, Some(ids.clone())).unwrap_err().to_string();
        assert!(
            e.contains("4 prompt ids for 240 activation rows (one per row is needed)")
                && e.contains("has shape [4, 60, 8], read as 240 rows in row-major order")
                && e.contains("token t of sequence b is row b·60 + t"),
            "{e}"
        );
        // One per flattened row is right.
        let header = "{'descr': '<i4', 'fortran_order': False, 'shape': (240,), }";
        let data: Vec<u8> = (0..240i32).flat_map(|r| (r / 60).to_le_bytes()).collect();
        fs::write(&ids, npy_bytes(1, header, &data)).unwrap();
        score(&npy3, Some(ids)).unwrap();
    }

    /// sae-score reads the labels `replay` reads: a text file (one per line) and an .npy
    /// vector of any dtype give the same table; errors stay those of the labels reader.
    /// A head fitted without position 0 (`sae-train` on a `[batch, seq, d]` input) records
    /// it, and `sae-score` leaves position 0 out of its scores where positions are known:
    /// the token CSV keeps every row (marked, no scores), the statistics leave them out. A
    /// head fitted with every position scores as before, bit for bit.
    #[test]
    fn sae_score_leaves_out_the_positions_the_head_skipped() {
        use super::super::positions::PositionsFrom;
        let dir = tempfile::tempdir().unwrap();
        let flat = rows(240, 8, 1);
        let (acts2, acts3) = (dir.path().join("acts2.npy"), dir.path().join("acts3.npy"));
        write_f32(&acts2, &[240, 8], &flat);
        write_f32(&acts3, &[4, 60, 8], &flat);
        let labels = dir.path().join("labels.txt");
        let text: String = (0..240)
            .map(|r| format!("{}\n", u8::from(r >= 180)))
            .collect();
        fs::write(&labels, text).unwrap();
        let (skip1, skip0) = (dir.path().join("sae1"), dir.path().join("sae0"));
        sae_train_command(&tiny_train_args(&acts3, &skip1), &mut |_| {}).unwrap();
        let args0 = SaeTrainArgs {
            skip_positions: Some(0),
            ..tiny_train_args(&acts3, &skip0)
        };
        sae_train_command(&args0, &mut |_| {}).unwrap();
        let head = |sae: &Path| DarkHead::load(&sae.join(DARK_DIR)).unwrap();
        assert_eq!(head(&skip1).skip_positions(), Some(1));
        assert_eq!(head(&skip1).positions_from(), Some(PositionsFrom::Shape));
        assert_eq!(head(&skip0).skip_positions(), Some(0));

        let out = dir.path().join("tokens.csv");
        let score = |sae: &Path, input: &Path, skip: Option<usize>| {
            sae_score_command(&SaeScoreArgs {
                sae: sae.to_path_buf(),
                input: input.to_path_buf(),
                labels: Some(labels.clone()),
                out: Some(out.clone()),
                skip_positions: skip,
                ..Default::default()
            })
            .map(|(summary, text)| (summary, text, fs::read_to_string(&out).unwrap()))
        };

        // Skip 1, positions from the shape: rows 0, 60, 120, 180 are kept, marked, unscored.
        let (summary, text, csv) = score(&skip1, &acts3, None).unwrap();
        assert_eq!((summary.skip_positions, summary.skipped_rows), (1, 4));
        assert!(
            text.contains("scored 236 of 240 tokens (4 below position 1 left out)")
                && text.contains("skip_positions in"),
            "{text}"
        );
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 241);
        assert_eq!(
            lines[0],
            "row,label,position,skipped,error_sq_norm,predicted_sq_norm,nonlinear_sq_norm,deviation"
        );
        for (r, line) in lines[1..].iter().enumerate() {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells[0], r.to_string());
            assert_eq!(cells[2], (r % 60).to_string(), "{line}");
            if r % 60 == 0 {
                assert_eq!(&cells[3..], ["1", "", "", "", ""], "{line}");
            } else {
                assert_eq!(cells[3], "0", "{line}");
                assert!(cells[4].parse::<f32>().is_ok(), "{line}");
            }
        }
        let token = summary.table.iter().find(|r| r.level == "token").unwrap();
        assert_eq!((token.n, token.n_ood), (236, 59));
        // The scores of the kept rows are those of --skip-positions 0, which scores all.
        let (all, text0, csv0) = score(&skip1, &acts3, Some(0)).unwrap();
        assert_eq!((all.skip_positions, all.skipped_rows), (0, 0));
        assert!(text0.contains("scored 240 tokens"), "{text0}");
        let tail = |l: &str| l.splitn(3, ',').nth(2).unwrap().to_string();
        let scored0: Vec<String> = csv0.lines().skip(1).map(tail).collect();
        for (r, line) in lines[1..].iter().enumerate() {
            if r % 60 != 0 {
                let kept = line.splitn(5, ',').nth(4).unwrap();
                assert_eq!(kept, scored0[r], "row {r}");
            }
        }
        // Without positions nothing can be left out: every row scored, with a note.
        let (summary, text, csv) = score(&skip1, &acts2, None).unwrap();
        assert_eq!(summary.skipped_rows, 0);
        assert!(
            text.contains("position-0 (BOS) rows cannot be told apart"),
            "{text}"
        );
        assert_eq!(csv, csv0);
        // Given without positions, or leaving out every row: refused.
        let e = score(&skip1, &acts2, Some(1)).unwrap_err().to_string();
        assert!(
            e.contains("--skip-positions 1 needs") && e.contains("--prompt-ids"),
            "{e}"
        );
        let e = score(&skip1, &acts3, Some(60)).unwrap_err().to_string();
        assert!(
            e.contains("--skip-positions 60 leaves out every row"),
            "{e}"
        );

        // A head fitted with every position: position 0 is scored, the outputs as from a
        // [tokens, d] input, no note.
        let (summary, text, csv3) = score(&skip0, &acts3, None).unwrap();
        let (_, text2, csv2) = score(&skip0, &acts2, None).unwrap();
        assert_eq!(summary.skipped_rows, 0);
        assert_eq!((csv3, text), (csv2, text2.clone()));
        assert!(!text2.contains("position"), "{text2}");
    }

    #[test]
    fn sae_score_takes_text_and_npy_labels_as_replay_does() {
        let (dir, acts, sae) = tiny_sae();
        let labels: Vec<u8> = (0..240).map(|r| u8::from(r % 3 == 0)).collect();
        let txt = dir.path().join("labels.txt");
        let text: String = labels.iter().map(|l| format!("{l}\n")).collect();
        fs::write(&txt, text).unwrap();
        let npy = dir.path().join("labels.npy");
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (240,), }";
        let data: Vec<u8> = labels
            .iter()
            .flat_map(|&l| f64::from(l).to_le_bytes())
            .collect();
        fs::write(&npy, npy_bytes(1, header, &data)).unwrap();
        let score = |input: &Path, labels: &Path| {
            sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                input: input.to_path_buf(),
                labels: Some(labels.to_path_buf()),
                ..Default::default()
            })
            .map(|(summary, _)| summary.table)
        };
        let from_text = score(&acts, &txt).unwrap();
        assert_eq!(from_text.len(), 3);
        assert_eq!((from_text[0].n, from_text[0].n_ood), (240, 80));
        assert_eq!(score(&acts, &npy).unwrap(), from_text);
        assert_eq!(
            crate::ingest::read_labels(&npy, Some(240)).unwrap(),
            labels,
            "replay's reader"
        );
        // The text format's own errors, by line.
        fs::write(&txt, "0\n1\nyes\n").unwrap();
        let e = score(&acts, &txt).unwrap_err().to_string();
        assert!(
            e.ends_with("labels.txt: line 3: label \"yes\" is not 0 or 1"),
            "{e}"
        );
        fs::write(&txt, "0\n1\n").unwrap();
        let e = score(&acts, &txt).unwrap_err().to_string();
        assert!(
            e.ends_with("labels.txt: 2 labels, but the data has 240 rows"),
            "{e}"
        );
        // With [batch, seq, d] activations the count names the flattened rows.
        let flat: Vec<f32> = read_activations(&acts, None)
            .unwrap()
            .iter()
            .copied()
            .collect();
        let npy3 = dir.path().join("acts3.npy");
        write_f32(&npy3, &[4, 60, 8], &flat);
        let e = score(&npy3, &txt).unwrap_err().to_string();
        assert!(
            e.contains("2 labels, but the data has 240 rows; ")
                && e.contains("has shape [4, 60, 8], read as 240 rows"),
            "{e}"
        );
        assert_eq!(score(&npy3, &npy).unwrap(), from_text);
    }

    /// A published SAE (no head yet) is refused as `inspect` and `run` refuse it: with the
    /// command that fits a head, not a raw "No such file or directory".
    #[test]
    fn sae_score_without_a_head_says_how_to_fit_one() {
        let (dir, acts, sae) = tiny_sae();
        fs::remove_dir_all(sae.join(DARK_DIR)).unwrap();
        let score = |dark: Option<PathBuf>| {
            sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                dark,
                input: acts.clone(),
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        let e = score(None);
        assert!(
            e.contains("no dark-matter head")
                && e.contains(&format!(
                    "`darkwatch sae-head --sae {} --input <normal activations>` fits one",
                    sae.display()
                ))
                && !e.contains("os error"),
            "{e}"
        );
        let detector = super::super::detector::SaeDetector::load(
            &sae,
            super::super::detector::SaeScoreKind::ErrorNorm,
        )
        .unwrap_err();
        assert_eq!(e, detector.to_string(), "the agent's wording");
        let e = score(Some(dir.path().join("nowhere")));
        assert!(e.contains("nowhere: no dark-matter head"), "{e}");
    }

    /// Settings that used to be taken silently: one cross-fit fold (quietly no cross-fit),
    /// no epoch (an untrained SAE), and a head on a handful of rows (a perfect in-sample fit
    /// that predicts nothing). Each is refused before anything is written.
    #[test]
    fn sae_train_and_sae_head_refuse_settings_that_would_mislead() {
        let (dir, acts, _) = tiny_sae();
        let out = dir.path().join("refused");
        let train = |f: &dyn Fn(&mut SaeTrainArgs)| {
            let mut args = tiny_train_args(&acts, &out);
            f(&mut args);
            sae_train_command(&args, &mut |_| {})
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let e = train(&|a| a.dark_folds = 1);
        assert!(
            e.contains("--dark-folds 1: cross-fitting takes at least 2 folds")
                && e.contains("or 0 to fit the head"),
            "{e}"
        );
        // 240 rows, 180 of them for training.
        let e = train(&|a| a.dark_folds = 181);
        assert!(
            e.contains("--dark-folds 181: the training rows hold only 180 rows"),
            "{e}"
        );
        let e = train(&|a| a.config.epochs = 0);
        assert!(
            e.contains("epochs = 0 would leave the SAE untrained"),
            "{e}"
        );
        // d = 8: each regression fits 9 coefficients, so at least 18 rows.
        let few = dir.path().join("few.npy");
        write_f32(&few, &[20, 8], &rows(20, 8, 3));
        let e = {
            let args = tiny_train_args(&few, &out);
            sae_train_command(&args, &mut |_| {})
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(
            e.contains("few.npy: 15 rows are too few to fit a dark-matter head on d = 8")
                && e.contains("give at least 18 rows")
                && e.contains("(15 of 20; the others are held out)"),
            "{e}"
        );
        assert!(!out.exists(), "nothing may be written");

        // The trial's case: sae-head on a published 16-dimensional SAE and its 8 rows.
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sae/saelens_topk_v6");
        let head = |input: &Path, holdout: f64| {
            sae_head_command(&SaeHeadArgs {
                sae: fixture.join("checkpoint"),
                input: input.to_path_buf(),
                tensor: None,
                prompt_ids: None,
                prompt_ids_tensor: None,
                norm_scaling_factor: None,
                holdout,
                skip_positions: None,
                dark: DarkConfig { ridge: 1.0 },
                out: Some(out.clone()),
                force: false,
            })
        };
        let e = head(&fixture.join("x.npy"), 0.0).unwrap_err().to_string();
        assert!(
            e.contains("8 rows are too few to fit a dark-matter head on d = 16")
                && e.contains("it fits 17 coefficients")
                && e.contains("give at least 34 rows"),
            "{e}"
        );
        let e = head(&fixture.join("x.npy"), 0.2).unwrap_err().to_string();
        assert!(
            e.contains("6 rows are too few") && e.contains("(6 of 8;"),
            "{e}"
        );
        assert!(!out.exists(), "nothing may be written");
        // Enough rows for the fit but not for the thresholds' calibration: `run` would refuse
        // the folder, so it is refused before the fit, with the minimum (it used to be
        // written with a WARNING and exit 0).
        let fit_only = dir.path().join("fit_only.npy");
        write_f32(&fit_only, &[34, 16], &rows(34, 16, 4));
        let e = head(&fit_only, 0.0).unwrap_err().to_string();
        assert!(
            e.contains("fit_only.npy: 34 rows (--holdout 0 calibrates on every row)")
                && e.contains("needs at least 50")
                && e.contains("give at least 50 rows"),
            "{e}"
        );
        let held = dir.path().join("held.npy");
        write_f32(&held, &[100, 16], &rows(100, 16, 5));
        let e = head(&held, 0.2).unwrap_err().to_string();
        assert!(
            e.contains("20 held-out rows would give the threshold calibration 20 scores")
                && e.contains("--holdout 0.2: 20 of 100 rows")
                && e.contains("--holdout 0"),
            "{e}"
        );
        assert!(!out.exists(), "nothing may be written");
        // At the minimum the head is fitted.
        let enough = dir.path().join("enough.npy");
        write_f32(&enough, &[50, 16], &rows(50, 16, 4));
        head(&enough, 0.0).unwrap();
        assert!(out.join(super::super::dark::DARK_META_FILE).is_file());
        // --ridge is checked before anything is read.
        let e = sae_head_command(&SaeHeadArgs {
            dark: DarkConfig { ridge: -1.0 },
            force: true,
            ..head_args(&fixture.join("checkpoint"), &enough, Some(out.clone()))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--ridge -1: the dark-matter head's ridge must be finite"),
            "{e}"
        );
    }

    /// `sae-head`'s arguments: `sae`, `input`, 20 % held out, ridge 1, `out`.
    fn head_args(sae: &Path, input: &Path, out: Option<PathBuf>) -> SaeHeadArgs {
        SaeHeadArgs {
            sae: sae.to_path_buf(),
            input: input.to_path_buf(),
            tensor: None,
            prompt_ids: None,
            prompt_ids_tensor: None,
            norm_scaling_factor: None,
            holdout: 0.2,
            skip_positions: None,
            dark: DarkConfig { ridge: 1.0 },
            out,
            force: false,
        }
    }

    /// `sae-train --ridge=-1` (or inf) used to train every epoch, and the cross-fit SAEs,
    /// before refusing the ridge: it is refused before the input is read.
    #[test]
    fn sae_train_refuses_a_bad_ridge_before_training() {
        let (dir, acts, _) = tiny_sae();
        let out = dir.path().join("refused");
        for ridge in [-1.0, f64::INFINITY, f64::NAN] {
            let args = SaeTrainArgs {
                dark: DarkConfig { ridge },
                dark_folds: 2,
                ..tiny_train_args(&acts, &out)
            };
            let mut progress = 0;
            let e = sae_train_command(&args, &mut |_| progress += 1)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!(
                    "--ridge {ridge}: the dark-matter head's ridge must be finite and at least 0"
                )),
                "{e}"
            );
            assert_eq!(progress, 0, "no epoch may run");
            assert!(!out.exists(), "nothing may be written");
        }
    }

    /// A head records the SAE weights it was fitted on; a head copied beside another SAE
    /// (or written into another SAE's folder) used to load there and threshold with the
    /// wrong calibration.
    #[test]
    fn a_head_is_refused_beside_other_sae_weights() {
        let (dir, acts, sae) = tiny_sae();
        let meta: serde_json::Value = serde_json::from_slice(
            &fs::read(sae.join(DARK_DIR).join(super::super::dark::DARK_META_FILE)).unwrap(),
        )
        .unwrap();
        let sha = super::super::load::file_sha256(&sae.join("sae_weights.safetensors")).unwrap();
        assert_eq!(meta["sae"]["weights_sha256"], sha.as_str(), "{meta}");
        assert_eq!(meta["sae"]["weights_file"], "sae_weights.safetensors");
        // Another SAE (another seed) with sae1's head copied in.
        let other = dir.path().join("other");
        train_other_tiny_sae(&acts, &other);
        fs::remove_dir_all(other.join(DARK_DIR)).unwrap();
        copy_dir(&sae.join(DARK_DIR), &other.join(DARK_DIR));
        let want = |e: &str| {
            assert!(
                e.contains(&format!("{}", other.join("dark/dark_head.json").display()))
                    && e.contains(&format!(
                        "{}",
                        other.join("sae_weights.safetensors").display()
                    ))
                    && e.contains(&format!("with sha256 {}…", &sha[..12]))
                    && e.contains("belong to another SAE")
                    && e.contains(&format!(
                        "`darkwatch sae-head --sae {} --input <normal activations> --force`",
                        other.display()
                    )),
                "{e}"
            );
        };
        let e = super::super::detector::SaeDetector::load(
            &other,
            super::super::detector::SaeScoreKind::ErrorNorm,
        )
        .unwrap_err()
        .to_string();
        want(&e);
        let score = sae_score_command(&SaeScoreArgs {
            sae: other.clone(),
            input: acts.clone(),
            ..Default::default()
        });
        want(&score.unwrap_err().to_string());
        // `sae-head --out` into another SAE's head folder is refused before anything is read,
        // with --force too; into its own folder it is not.
        for out in [sae.join(DARK_DIR), sae.clone()] {
            let e = sae_head_command(&SaeHeadArgs {
                force: true,
                holdout: 0.0,
                ..head_args(&other, &acts, Some(out.clone()))
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!(
                    "which holds another SAE than --sae {}",
                    other.display()
                )) && e.contains(&format!(
                    "drop --out to write {}",
                    other.join(DARK_DIR).display()
                )),
                "{e}"
            );
        }
        sae_head_command(&SaeHeadArgs {
            force: true,
            holdout: 0.0,
            ..head_args(&other, &acts, Some(other.join(DARK_DIR)))
        })
        .unwrap();
        super::super::detector::SaeDetector::load(
            &other,
            super::super::detector::SaeScoreKind::ErrorNorm,
        )
        .unwrap();
        // A head written before the weights were recorded still loads (with a warning).
        let head_json = other
            .join(DARK_DIR)
            .join(super::super::dark::DARK_META_FILE);
        let mut meta: serde_json::Value =
            serde_json::from_slice(&fs::read(&head_json).unwrap()).unwrap();
        assert!(meta["sae"].is_object(), "sae-head records the SAE: {meta}");
        meta.as_object_mut().unwrap().remove("sae");
        fs::write(&head_json, serde_json::to_vec(&meta).unwrap()).unwrap();
        super::super::detector::SaeDetector::load(
            &other,
            super::super::detector::SaeScoreKind::ErrorNorm,
        )
        .unwrap();
    }

    /// SAELens keeps an `expected_average_only_in` SAE's scaling factor outside the
    /// checkpoint, and nothing from the CLI could set it: the SAE ran unscaled, silently.
    /// `sae-head --norm-scaling-factor` now sets it and records it with the head, which every
    /// later load applies; `[sae] norm_scaling_factor` must agree with it.
    #[test]
    fn the_norm_scaling_factor_reaches_the_sae_and_stays_with_its_head() {
        use super::super::Normalization;
        use super::super::detector::{SaeConfig, SaeDetector, SaeScoreKind};
        let (dir, acts, plain) = tiny_sae();
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sae/saelens_relu_v6/checkpoint");
        let sae_dir = dir.path().join("eaoi");
        copy_dir(&fixture, &sae_dir);
        let cfg_path = sae_dir.join("cfg.json");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
        cfg["normalize_activations"] = "expected_average_only_in".into();
        fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let bare = Sae::load(&sae_dir).unwrap();
        assert!(
            bare.unscaled_warning()
                .is_some_and(|w| w.contains("--norm-scaling-factor")
                    && w.contains("[sae] norm_scaling_factor")),
            "an SAE that needs a factor says so"
        );
        assert!(
            bare.summary().contains("WITHOUT a scaling factor"),
            "{}",
            bare.summary()
        );
        let x16 = dir.path().join("x16.npy");
        write_f32(&x16, &[200, 16], &rows(200, 16, 6));
        sae_head_command(&SaeHeadArgs {
            norm_scaling_factor: Some(0.5),
            holdout: 0.0,
            ..head_args(&sae_dir, &x16, None)
        })
        .unwrap();
        // Loaded with no setting, the SAE runs with the head's factor.
        let det = SaeDetector::load(&sae_dir, SaeScoreKind::ErrorNorm).unwrap();
        assert_eq!(
            det.sae.normalization(),
            Normalization::ExpectedAverageOnlyIn {
                scaling_factor: Some(0.5)
            }
        );
        assert!(
            det.summary()
                .contains("expected_average_only_in, scaling factor 0.5"),
            "{}",
            det.summary()
        );
        let with = |s: f32| {
            SaeDetector::load(
                &sae_dir,
                SaeConfig {
                    norm_scaling_factor: Some(s),
                    ..SaeConfig::default()
                },
            )
        };
        assert_eq!(with(0.5).unwrap().id(), det.id());
        let e = with(0.25).unwrap_err().to_string();
        assert!(
            e.starts_with("[sae] norm_scaling_factor: 0.25, but the head in")
                && e.contains("scaled by 0.5"),
            "{e}"
        );
        // A head fitted on the SAE unscaled refuses a factor given later: its calibration
        // is of unscaled errors.
        let unscaled_dir = dir.path().join("eaoi-unscaled");
        copy_dir(&fixture, &unscaled_dir);
        fs::write(
            unscaled_dir.join("cfg.json"),
            serde_json::to_vec(&cfg).unwrap(),
        )
        .unwrap();
        sae_head_command(&SaeHeadArgs {
            holdout: 0.0,
            ..head_args(&unscaled_dir, &x16, None)
        })
        .unwrap();
        let e = SaeDetector::load(
            &unscaled_dir,
            SaeConfig {
                norm_scaling_factor: Some(0.5),
                ..SaeConfig::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("calibrated with the SAE unscaled"), "{e}");
        // The factor changes the errors: the calibration is of the scaled SAE.
        let score = |factor: Option<f32>| {
            sae_score_command(&SaeScoreArgs {
                sae: sae_dir.clone(),
                input: x16.clone(),
                norm_scaling_factor: factor,
                ..Default::default()
            })
        };
        let (recorded, _) = score(None).unwrap();
        assert!(score(Some(0.5)).is_ok());
        assert!(
            score(Some(2.0))
                .unwrap_err()
                .to_string()
                .contains("--norm-scaling-factor: 2")
        );
        assert!(recorded.nmse_all.is_some());
        let mut unscaled = Sae::load(&sae_dir).unwrap();
        let mut scaled = unscaled.clone();
        scaled.set_norm_scaling_factor(0.5).unwrap();
        let x = read_activations(&x16, None).unwrap();
        assert_ne!(
            sae_errors(&scaled, x.view()).unwrap(),
            sae_errors(&unscaled, x.view()).unwrap()
        );
        // A factor for an SAE of another normalisation, or a bad one, names the option.
        let e = sae_head_command(&SaeHeadArgs {
            norm_scaling_factor: Some(2.0),
            force: true,
            ..head_args(&plain, &acts, None)
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--norm-scaling-factor: a norm scaling factor applies to normalize_activations = expected_average_only_in, this SAE uses none"),
            "{e}"
        );
        // sae-score on that SAE, whose head records it unscaled, used to suggest refitting
        // the head with the factor, which sae-head then refused as above: the normalisation
        // is the first thing said.
        let e = sae_score_command(&SaeScoreArgs {
            sae: plain.clone(),
            input: acts.clone(),
            norm_scaling_factor: Some(0.06),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("expected_average_only_in, this SAE uses none: drop the setting")
                && !e.contains("sae-head"),
            "{e}"
        );
        let e = super::super::detector::apply_norm_scaling(
            &mut unscaled,
            Some((-1.0, "--norm-scaling-factor")),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be finite and positive"), "{e}");
        let bad = SaeConfig {
            norm_scaling_factor: Some(f32::NAN),
            ..SaeConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "norm_scaling_factor");
    }

    /// `sae-score --dark` naming another SAE's head used to suggest `sae-head --out` into
    /// that SAE's folder, which sae-head refuses, and then a `sae-head --force` refit that
    /// overwrote this SAE's good head: with this SAE's own head in place the remedy is only
    /// to drop --dark; with a stale one there the suggested refit is run here.
    #[test]
    fn the_head_fix_for_another_saes_head_is_a_command_sae_head_accepts() {
        let (dir, acts, victim) = tiny_sae();
        let jr = dir.path().join("jr");
        train_other_tiny_sae(&acts, &jr);
        let score_with_victims = || {
            sae_score_command(&SaeScoreArgs {
                sae: jr.clone(),
                dark: Some(victim.join(DARK_DIR)),
                input: acts.clone(),
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        // jr's own head (sae-train wrote it) fits jr: nothing to refit.
        let meta = super::super::dark::DARK_META_FILE;
        let good = fs::read(jr.join(DARK_DIR).join(meta)).unwrap();
        let e = score_with_victims();
        assert!(
            e.contains(&format!(
                "drop --dark (this SAE's head is at {})",
                jr.join(DARK_DIR).display()
            )) && !e.contains("sae-head"),
            "{e}"
        );
        assert_eq!(fs::read(jr.join(DARK_DIR).join(meta)).unwrap(), good);
        sae_score_command(&SaeScoreArgs {
            sae: jr.clone(),
            input: acts.clone(),
            ..Default::default()
        })
        .unwrap();
        // A stale head in jr/dark (the victim's, copied): the refit is suggested.
        fs::remove_dir_all(jr.join(DARK_DIR)).unwrap();
        copy_dir(&victim.join(DARK_DIR), &jr.join(DARK_DIR));
        let e = score_with_victims();
        let fix = e
            .split('`')
            .find(|c| c.starts_with("darkwatch sae-head"))
            .unwrap_or_else(|| panic!("{e}"));
        assert!(
            e.contains(&format!(
                "then drop --dark (or give --dark {})",
                jr.join(DARK_DIR).display()
            )) && !e.contains("this SAE's head is at"),
            "{e}"
        );
        let words: Vec<&str> = fix.split(' ').collect();
        let value = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .map(|i| PathBuf::from(words[i + 1]))
        };
        assert_eq!(value("--sae").as_deref(), Some(jr.as_path()), "{fix}");
        assert!(words.contains(&"--force"), "{fix}");
        // (--holdout 0: the tiny input holds too few rows to hold out 50.)
        sae_head_command(&SaeHeadArgs {
            force: words.contains(&"--force"),
            holdout: 0.0,
            ..head_args(&jr, &acts, value("--out"))
        })
        .unwrap_or_else(|e| panic!("`{fix}` was refused: {e}"));
        sae_score_command(&SaeScoreArgs {
            sae: jr.clone(),
            input: acts.clone(),
            ..Default::default()
        })
        .unwrap();
    }

    /// A head folder of an SAE nested in this SAE's folder (`sae/inner/dark`) used to count
    /// as this SAE's by its path, so the suggested `sae-head --out sae/inner/dark --force`
    /// was one sae-head refuses (it decides by the weights): both decide by the weights now.
    #[test]
    fn the_head_fix_for_a_nested_saes_head_is_a_command_sae_head_accepts() {
        let (dir, acts, outer) = tiny_sae();
        let jr = dir.path().join("jr");
        train_other_tiny_sae(&acts, &jr);
        let inner = outer.join("inner");
        fs::rename(&jr, &inner).unwrap();
        fs::remove_dir_all(outer.join(DARK_DIR)).unwrap();
        let e = sae_score_command(&SaeScoreArgs {
            sae: outer.clone(),
            dark: Some(inner.join(DARK_DIR)),
            input: acts.clone(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        let fix = e
            .split('`')
            .find(|c| c.starts_with("darkwatch sae-head"))
            .unwrap_or_else(|| panic!("{e}"));
        assert!(!fix.contains("--out") && !fix.contains("--force"), "{fix}");
        assert!(
            e.contains(&format!(
                "then drop --dark (or give --dark {})",
                outer.join(DARK_DIR).display()
            )),
            "{e}"
        );
        sae_head_command(&SaeHeadArgs {
            holdout: 0.0,
            ..head_args(&outer, &acts, None)
        })
        .unwrap_or_else(|e| panic!("`{fix}` was refused: {e}"));
        // The folder the old command named is refused by sae-head.
        let e = sae_head_command(&SaeHeadArgs {
            force: true,
            holdout: 0.0,
            ..head_args(&outer, &acts, Some(inner.join(DARK_DIR)))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("which holds another SAE"), "{e}");
        sae_score_command(&SaeScoreArgs {
            sae: outer.clone(),
            input: acts.clone(),
            ..Default::default()
        })
        .unwrap();
    }

    /// A sparsify head fitted with `--sae run/layers.3` used to be missed by `run` (and
    /// `validate`, `inspect`), and one fitted with `--sae run` by `run/layers.3`: each name
    /// of the SAE now finds the head wherever the other wrote it, and a refit replaces it.
    #[test]
    fn a_sparsify_head_is_found_from_the_run_folder_and_the_hookpoint_folder() {
        use super::super::detector::{SaeDetector, SaeScoreKind};
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let layer = run.join("layers.3");
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/sae/sparsify_topk_f32/checkpoint/layers.3"),
            &layer,
        );
        let acts = dir.path().join("acts.npy");
        write_f32(&acts, &[240, 16], &rows(240, 16, 1));
        let fit = |sae: &Path, force: bool| {
            sae_head_command(&SaeHeadArgs {
                holdout: 0.0,
                force,
                ..head_args(sae, &acts, None)
            })
            .unwrap()
        };
        let score = |sae: &Path| {
            SaeDetector::load(sae, SaeScoreKind::ErrorNorm).unwrap();
            sae_score_command(&SaeScoreArgs {
                sae: sae.to_path_buf(),
                input: acts.clone(),
                ..Default::default()
            })
            .unwrap();
        };
        let meta = super::super::dark::DARK_META_FILE;
        fit(&layer, false);
        assert!(layer.join(DARK_DIR).join(meta).is_file());
        // An empty (or half-written) run/dark used to hide layers.3/dark.
        fs::create_dir_all(run.join(DARK_DIR)).unwrap();
        score(&run);
        score(&layer);
        fs::remove_dir(run.join(DARK_DIR)).unwrap();
        fit(&run, true);
        assert!(!run.join(DARK_DIR).exists(), "a second head was written");
        fs::rename(layer.join(DARK_DIR), run.join(DARK_DIR)).unwrap();
        fs::create_dir_all(layer.join(DARK_DIR)).unwrap();
        score(&layer);
        score(&run);
        fs::remove_dir(layer.join(DARK_DIR)).unwrap();
        fit(&layer, true);
        assert!(!layer.join(DARK_DIR).exists(), "a second head was written");
        // Heads under both names: each name uses its own, and the other one is reported
        // (for the warning).
        copy_dir(&run.join(DARK_DIR), &layer.join(DARK_DIR));
        use super::super::detector::head_dirs;
        assert_eq!(
            head_dirs(&run),
            (run.join(DARK_DIR), Some(layer.join(DARK_DIR)))
        );
        assert_eq!(
            head_dirs(&layer),
            (layer.join(DARK_DIR), Some(run.join(DARK_DIR)))
        );
        fs::remove_dir_all(run.join(DARK_DIR)).unwrap();
        assert_eq!(head_dirs(&run), (layer.join(DARK_DIR), None));
        // `--out` into another SAE's folder is refused naming the folder a plain `sae-head
        // --sae run` writes (it used to say run/dark).
        let (_other_dir, _, other) = tiny_sae();
        let e = sae_head_command(&SaeHeadArgs {
            force: true,
            holdout: 0.0,
            ..head_args(&run, &acts, Some(other.join(DARK_DIR)))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "drop --out to write {}",
                layer.join(DARK_DIR).display()
            )),
            "{e}"
        );
    }

    /// `sae-train --out` naming a file used to train, then fail with "aemodel: File exists
    /// (os error 17)": refused first, naming the path and what to do.
    #[test]
    fn sae_train_out_naming_a_file_is_refused_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let acts = dir.path().join("acts.npy");
        write_f32(&acts, &[240, 8], &rows(240, 8, 1));
        let out = dir.path().join("aemodel");
        fs::write(&out, "x").unwrap();
        let mut epochs = 0;
        let e = sae_train_command(&tiny_train_args(&acts, &out), &mut |_| epochs += 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{}: is a file", out.display()))
                && e.contains("choose a folder path"),
            "{e}"
        );
        assert_eq!(epochs, 0);
    }

    /// Copies the files of `src` into `dst` (made), one level.
    fn copy_dir(src: &Path, dst: &Path) {
        fs::create_dir_all(dst).unwrap();
        for e in fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }

    /// A .safetensors file holding activations and their prompt ids (and labels) used to be
    /// refused as `--prompt-ids` ("holds 3 tensors; name one with the tensor option") though
    /// --tensor was given: --tensor names the input's, --prompt-ids-tensor and
    /// --labels-tensor the others'.
    #[test]
    fn prompt_ids_and_labels_can_come_from_the_activations_safetensors() {
        let (dir, acts, sae) = tiny_sae();
        let x = read_activations(&acts, None).unwrap();
        let n = x.nrows();
        let acts_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids: Vec<u8> = (0..n as i64).flat_map(|i| (i / 8).to_le_bytes()).collect();
        let labels: Vec<u8> = (0..n as i64)
            .flat_map(|i| i64::from(i >= 200).to_le_bytes())
            .collect();
        let st = dir.path().join("all.safetensors");
        let views = vec![
            (
                "acts",
                TensorView::new(Dtype::F32, vec![n, 8], &acts_bytes).unwrap(),
            ),
            ("ids", TensorView::new(Dtype::I64, vec![n], &ids).unwrap()),
            (
                "labels",
                TensorView::new(Dtype::I64, vec![n], &labels).unwrap(),
            ),
        ];
        fs::write(&st, safetensors::serialize(views, None).unwrap()).unwrap();
        let train = |ids_tensor: Option<&str>, out: &str| {
            let args = SaeTrainArgs {
                tensor: Some("acts".into()),
                prompt_ids: Some(st.clone()),
                prompt_ids_tensor: ids_tensor.map(String::from),
                // Every row kept: the held-out count below is of whole 8-row prompts.
                skip_positions: Some(0),
                ..tiny_train_args(&st, &dir.path().join(out))
            };
            sae_train_command(&args, &mut |_| {}).map(|(s, _)| s)
        };
        let e = train(None, "a").unwrap_err().to_string();
        assert!(
            e.contains("holds 3 tensors (acts, ids, labels); name one with --prompt-ids-tensor"),
            "{e}"
        );
        let summary = train(Some("ids"), "b").unwrap();
        // 30 prompts of 8 rows; a quarter held out, as whole prompts.
        assert_eq!(summary.held_out_rows, 64, "{summary:?}");
        let score = |labels_tensor: Option<&str>| {
            sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                input: st.clone(),
                tensor: Some("acts".into()),
                labels: Some(st.clone()),
                labels_tensor: labels_tensor.map(String::from),
                prompt_ids: Some(st.clone()),
                prompt_ids_tensor: Some("ids".into()),
                baseline: Some(st.clone()),
                baseline_tensor: Some("acts".into()),
                baseline_shrinkage: 0.1,
                ..Default::default()
            })
        };
        let e = score(None).unwrap_err().to_string();
        assert!(e.contains("name one with --labels-tensor"), "{e}");
        let (summary, _) = score(Some("labels")).unwrap();
        assert_eq!(summary.prompts, Some(30));
        let token: Vec<&OodRow> = summary
            .table
            .iter()
            .filter(|r| r.level == "token")
            .collect();
        assert_eq!(token.len(), 4, "three SAE scores and the baseline");
        assert!(token.iter().all(|r| r.n_ood == 40), "{token:?}");
        // A tensor name for an .npy file says which option is misplaced.
        let e = sae_score_command(&SaeScoreArgs {
            sae: sae.clone(),
            input: acts.clone(),
            labels: Some(acts.clone()),
            labels_tensor: Some("labels".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--labels-tensor applies to .safetensors only"),
            "{e}"
        );
    }

    /// The cross-fit folds, most of `sae-train`'s time, report as the epochs do: once per
    /// fold, after the final SAE's epochs.
    #[test]
    fn sae_train_reports_each_cross_fit_fold_after_the_epochs() {
        let (dir, acts, _) = tiny_sae();
        let args = SaeTrainArgs {
            dark_folds: 3,
            ..tiny_train_args(&acts, &dir.path().join("folds"))
        };
        let mut seen = Vec::new();
        sae_train_command(&args, &mut |p| {
            seen.push(match p {
                SaeTrainProgress::Epoch(e) => format!("epoch {}", e.epoch),
                SaeTrainProgress::Fold(f) => {
                    assert_eq!(f.folds, 3);
                    // 180 training rows in 3 blocks of 60.
                    assert_eq!((f.train_rows, f.rows), (120, 60), "{f:?}");
                    let nmse = f.nmse.unwrap();
                    assert!(nmse.is_finite() && nmse > 0.0, "{f:?}");
                    format!("fold {}", f.fold)
                }
            })
        })
        .unwrap();
        assert_eq!(seen, ["epoch 1", "epoch 2", "fold 1", "fold 2", "fold 3"]);
    }

    /// Normalised MSE divides by the rows' spread: on one row (or equal rows) there is none,
    /// and sae-score says so instead of printing "inf".
    #[test]
    fn sae_score_on_one_row_gives_no_normalised_mse_and_says_why() {
        let (dir, acts, sae) = tiny_sae();
        let x = read_activations(&acts, None).unwrap();
        let score = |rows: usize, same: bool, labels: Option<&str>| {
            let path = dir.path().join("few.npy");
            let values: Vec<f32> = (0..rows)
                .flat_map(|r| x.row(if same { 0 } else { r }).to_vec())
                .collect();
            write_f32(&path, &[rows, 8], &values);
            let lab = labels.map(|text| {
                let p = dir.path().join("few.txt");
                fs::write(&p, text).unwrap();
                p
            });
            sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                input: path,
                labels: lab,
                ..Default::default()
            })
            .unwrap()
        };
        let (summary, text) = score(1, false, None);
        assert_eq!(summary.nmse_all, None);
        assert!(
            text.contains("normalised MSE: all rows n/a (one row: it divides by the rows' spread"),
            "{text}"
        );
        assert!(!text.contains("inf"), "{text}");
        let (summary, text) = score(3, true, Some("0\n0\n1\n"));
        assert_eq!((summary.nmse_all, summary.nmse_label0), (None, None));
        assert!(
            text.contains("all rows n/a (the rows are all equal")
                && text.contains("label-0 rows n/a (the rows are all equal"),
            "{text}"
        );
        let (summary, text) = score(4, false, Some("0\n1\n1\n1\n"));
        let all = summary.nmse_all.unwrap();
        assert!(all.is_finite() && all > 0.0, "{all}");
        assert!(
            text.contains(&format!("all rows {all:.4}, label-0 rows n/a (one row")),
            "{text}"
        );
    }

    /// The same for sae-train's held-out rows: with one held out, its normalised MSE (at the
    /// end and after each epoch) is not defined, and the summary says why instead of
    /// printing "inf".
    #[test]
    fn sae_train_with_one_held_out_row_gives_no_held_out_nmse_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let acts = dir.path().join("acts.npy");
        write_f32(&acts, &[240, 8], &rows(240, 8, 1));
        let mut args = tiny_train_args(&acts, &dir.path().join("sae"));
        let train = |args: &SaeTrainArgs| {
            let mut epochs = Vec::new();
            let (summary, text) = sae_train_command(args, &mut |p| {
                if let SaeTrainProgress::Epoch(e) = p {
                    epochs.push(e.held_out_nmse);
                }
            })
            .unwrap();
            (summary, text, epochs)
        };
        args.holdout = 0.004; // ⌈0.96⌉: 1 of 240 rows
        let (summary, text, epochs) = train(&args);
        assert_eq!(summary.held_out_rows, 1);
        assert_eq!(summary.sae.held_out_nmse, None);
        assert_eq!(epochs, [None, None]);
        assert!(
            text.contains(
                "held-out n/a (one row: it divides by the rows' spread around their mean, \
                 which one row does not have)"
            ),
            "{text}"
        );
        assert!(!text.contains("held-out inf"), "{text}");
        // Two rows that differ: a number, each epoch too.
        args.holdout = 0.008;
        args.force = true;
        let (summary, text, epochs) = train(&args);
        assert_eq!(summary.held_out_rows, 2);
        let nmse = summary.sae.held_out_nmse.unwrap();
        assert!(nmse.is_finite() && nmse > 0.0, "{nmse}");
        assert!(text.contains(&format!("held-out {nmse:.4};")), "{text}");
        assert!(
            epochs.iter().all(|e| e.is_some_and(f64::is_finite)),
            "{epochs:?}"
        );
        // None held out.
        args.holdout = 0.0;
        let (_, text, epochs) = train(&args);
        assert!(text.contains("held-out n/a (no rows);"), "{text}");
        assert_eq!(epochs, [None, None]);
    }

    #[test]
    fn sae_train_refuses_an_existing_sae_without_force_and_any_autoencoder_folder() {
        let (dir, acts, sae) = tiny_sae();
        let train = |out: &Path, force: bool| {
            let args = SaeTrainArgs {
                force,
                config: SaeTrainConfig {
                    seed: 7,
                    ..tiny_train_args(&acts, out).config
                },
                ..tiny_train_args(&acts, out)
            };
            sae_train_command(&args, &mut |_| {}).map(|_| ())
        };
        let before = snapshot(&sae);
        let e = train(&sae, false).unwrap_err().to_string();
        assert!(
            e.contains(
                "already holds an SAE (cfg.json, sae_weights.safetensors, dark, train_report.json)"
            ) && e.contains("--force"),
            "{e}"
        );
        assert_eq!(snapshot(&sae), before, "nothing may be written");
        train(&sae, true).unwrap();
        assert_ne!(snapshot(&sae), before, "--force replaces it");
        Sae::load(&sae).unwrap();
        // A sparsify run folder (one layer folder) counts too.
        let run = dir.path().join("run");
        fs::create_dir_all(run.join("layers.3")).unwrap();
        fs::write(
            run.join("layers.3").join(super::super::load::CONFIG_FILE),
            "{}",
        )
        .unwrap();
        let e = train(&run, false).unwrap_err().to_string();
        assert!(e.contains("already holds an SAE (layers.3/)"), "{e}");
        // An autoencoder's model folder is refused, --force or not.
        let model = dir.path().join("model");
        fs::create_dir_all(&model).unwrap();
        fs::write(model.join(crate::model::io::META_FILE), "{}").unwrap();
        for force in [false, true] {
            let e = train(&model, force).unwrap_err().to_string();
            assert!(e.contains("holds an autoencoder model (model.json)"), "{e}");
        }
        assert_eq!(fs::read_dir(&model).unwrap().count(), 1);
        // An empty folder, or a new one, is fine.
        fs::create_dir_all(dir.path().join("empty")).unwrap();
        train(&dir.path().join("empty"), false).unwrap();
    }

    /// Ids whose rows are not contiguous are found (the commands warn: ids that restart per
    /// batch merge two prompts); contiguous ones, in any order, are not.
    #[test]
    fn reappearing_prompt_ids_are_found() {
        assert_eq!(Reappearing::find(&[]), None);
        assert_eq!(Reappearing::find(&[3, 3, 1, 1, 7, 2, 2]), None);
        assert_eq!(
            Reappearing::find(&[0, 0, 1, 1, 0, 0, 1, 2, 2]),
            Some(Reappearing {
                id: 0,
                row: 4,
                ids: 2
            })
        );
        assert_eq!(
            Reappearing::find(&[5, 6, 5, 5, 6]),
            Some(Reappearing {
                id: 5,
                row: 2,
                ids: 2
            })
        );
        // What `group` does with them: one prompt per id, in order of first appearance.
        let p = Prompts::group(&[0, 0, 1, 1, 0]);
        assert_eq!(p.members, vec![vec![0, 1, 4], vec![2, 3]]);
        assert_eq!(p.labels(&[0, 0, 0, 0, 1]), vec![1, 0]);
    }

    #[test]
    fn prompts_group_and_aggregate() {
        let p = Prompts::group(&[5, 5, 7, 5, 9]);
        assert_eq!(p.ids, vec![5, 7, 9]);
        assert_eq!(p.members, vec![vec![0, 1, 3], vec![2], vec![4]]);
        let s = [1.0, 4.0, 2.0, 1.0, 0.5];
        assert_eq!(p.max(&s), vec![4.0, 2.0, 0.5]);
        assert_eq!(p.mean(&s), vec![2.0, 2.0, 0.5]);
        assert_eq!(p.labels(&[0, 1, 0, 0, 0]), vec![1, 0, 0]);
    }

    #[test]
    fn mahalanobis_matches_a_direct_inverse() {
        // 2-D: cov diag(4, 1) (ML), no shrinkage effect beyond α.
        let x = Array2::from_shape_vec((4, 2), vec![2.0, 1.0, -2.0, -1.0, 2.0, -1.0, -2.0, 1.0])
            .unwrap();
        let m = Mahalanobis::fit(x.view(), 0.5).unwrap();
        // Σ_s = 0.5·diag(4,1) + 0.5·2.5·I = diag(3.25, 1.75).
        let q = Array2::from_shape_vec((1, 2), vec![1.0, 1.0]).unwrap();
        let got = m.score(q.view()).unwrap()[0];
        let want = 1.0 / 3.25 + 1.0 / 1.75;
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
        assert!(Mahalanobis::fit(x.view(), 0.0).is_err());
        assert!(m.score(Array2::zeros((1, 3)).view()).is_err());
    }

    #[test]
    fn holdout_split_by_prompt_and_by_row() {
        let ids = [1, 1, 2, 2, 3, 3, 3, 4];
        let (t, h) = holdout_split(8, Some(&ids), 0.25).unwrap();
        assert_eq!(t, vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(h, vec![7]);
        let (t, h) = holdout_split(8, Some(&ids), 0.5).unwrap();
        assert_eq!((t.len(), h), (4, vec![4, 5, 6, 7]));
        let (t, h) = holdout_split(10, None, 0.2).unwrap();
        assert_eq!((t.len(), h), (8, vec![8, 9]));
        assert_eq!(holdout_split(10, None, 0.0).unwrap().1, Vec::<usize>::new());
        assert!(holdout_split(10, None, 1.0).is_err());
        assert!(holdout_split(2, None, 0.9).is_err());
    }

    #[test]
    fn ints_from_safetensors_and_npy_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let st = |name: &str, dtype, shape: Vec<usize>, data: Vec<u8>| {
            let p = dir.path().join(name);
            let v = safetensors::tensor::TensorView::new(dtype, shape, &data).unwrap();
            fs::write(&p, safetensors::serialize(vec![("ids", v)], None).unwrap()).unwrap();
            p
        };
        let ids: Vec<u8> = [3i64, -1, 1 << 40]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = st("ids.safetensors", Dtype::I64, vec![3], ids);
        assert_eq!(
            read_ints(&p, None, 3, "prompt ids").unwrap(),
            vec![3, -1, 1 << 40]
        );
        let e = read_ints(&p, None, 4, "prompt ids")
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 prompt ids for 4 activation rows"), "{e}");
        assert!(
            read_labels(&p, None, 3)
                .unwrap_err()
                .to_string()
                .contains("label 0 is 3")
        );
        let e = read_ints(&p, Some("nope"), 3, "ids")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tensor `nope`") && e.contains("ids"), "{e}");
        let f = st("f.safetensors", Dtype::F32, vec![2], vec![0; 8]);
        assert_eq!(read_ints(&f, None, 2, "ids").unwrap(), vec![0, 0]);
        let half: Vec<u8> = [0.5f32, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let h = st("h.safetensors", Dtype::F32, vec![2], half);
        let e = read_ints(&h, None, 2, "ids").unwrap_err().to_string();
        assert!(e.contains("element 0 = 0.5 is not an integer"), "{e}");
        // Activations: shape and dtype errors.
        let e = read_activations(&f, None).unwrap_err().to_string();
        assert!(e.contains("[tokens, d] or [batch, seq, d]"), "{e}");
        let a = st("a.safetensors", Dtype::F16, vec![2, 3], vec![0; 12]);
        assert_eq!(read_activations(&a, None).unwrap().dim(), (2, 3));
        let e = read_activations(&dir.path().join("x.csv"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".npy or .safetensors"), "{e}");
        // .npy int32 ids.
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }";
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
        npy.extend_from_slice(h.as_bytes());
        for v in [0i32, 1, 1] {
            npy.extend_from_slice(&v.to_le_bytes());
        }
        let p = dir.path().join("l.npy");
        fs::write(&p, npy).unwrap();
        assert_eq!(read_labels(&p, None, 3).unwrap(), vec![0, 1, 1]);
    }

    /// Writes `values` as a 1-D `.npy` of dtype `descr`, each value encoded by `enc`.
    /// The `.npy` activations that [`read_npy_floats_direct`] reads from the file (C-order
    /// float32, float16, float64 of two or more dimensions, header versions 1 and 2) give
    /// the same values, shape and errors as reading the file whole through
    /// `parse_npy_rows`, across block boundaries; other files are left to that reader.
    #[test]
    fn npy_rows_read_from_the_file_match_the_whole_file_reader() {
        let dir = tempfile::tempdir().unwrap();
        type Bits = Result<(Vec<u32>, Vec<usize>), String>;
        let whole = |path: &Path| -> Bits {
            let bytes = fs::read(path).unwrap();
            crate::ingest::npy::parse_npy_rows(path, &bytes)
                .map(|(t, shape)| {
                    let a = clamped(t.values);
                    (
                        a.iter().map(|v| v.to_bits()).collect(),
                        shape.iter().map(|&n| n as usize).collect(),
                    )
                })
                .map_err(|e| SaeEvalError::from(e).to_string())
        };
        let direct = |path: &Path| -> Option<Bits> {
            match read_npy_floats_direct(path) {
                Ok(Some((a, shape))) => Some(Ok((a.iter().map(|v| v.to_bits()).collect(), shape))),
                Ok(None) => None,
                Err(e) => Some(Err(e.to_string())),
            }
        };
        // More than one block of DIRECT_BLOCK_BYTES in each dtype, and a short last block.
        let (n, d) = (DIRECT_BLOCK_BYTES / 7 + 3, 7);
        let values = rows(n, d, 2);
        let mut big = values.clone();
        big[5] = 3e6; // clamped to the activation limit by both
        type Enc = fn(f32) -> Vec<u8>;
        let dtypes: [(&str, Enc); 3] = [
            ("<f4", |v| v.to_le_bytes().to_vec()),
            ("<f2", |v| f16::from_f32(v).to_le_bytes().to_vec()),
            ("<f8", |v| f64::from(v).to_le_bytes().to_vec()),
        ];
        for (descr, enc) in dtypes {
            for (version, shape) in [(1u8, vec![n, d]), (2, vec![1, n, d])] {
                let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
                let header = format!(
                    "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}), }}",
                    dims.join(", ")
                );
                let path = dir.path().join(format!("a{version}{}.npy", &descr[1..]));
                // 3e6 is beyond float16 (refused by both readers, as the errors below).
                let first = if descr == "<f2" { &values } else { &big };
                let data: Vec<u8> = first.iter().flat_map(|&v| enc(v)).collect();
                fs::write(&path, npy_bytes(version, &header, &data)).unwrap();
                let got = direct(&path).expect("read from the file");
                assert_eq!(got, whole(&path), "{descr} {shape:?}");
                assert_eq!(got.unwrap().1, shape);
                // A NaN, an infinity, and (float64) a value beyond float32 in the second
                // block: the same error, at the same row and column.
                let mut bad_values = values.clone();
                let at = DIRECT_BLOCK_BYTES / 2 / 4 * 3 + 1;
                for bad in [f64::NAN, f64::INFINITY, 1e300] {
                    if bad == 1e300 && descr != "<f8" {
                        continue;
                    }
                    let data: Vec<u8> = bad_values
                        .iter_mut()
                        .enumerate()
                        .flat_map(|(i, v)| {
                            if i == at {
                                if descr == "<f8" {
                                    return bad.to_le_bytes().to_vec();
                                }
                                *v = bad as f32;
                            }
                            enc(*v)
                        })
                        .collect();
                    fs::write(&path, npy_bytes(version, &header, &data)).unwrap();
                    let got = direct(&path).expect("read from the file");
                    let want = whole(&path);
                    assert!(got.is_err(), "{descr} {bad}");
                    assert_eq!(got, want, "{descr} {bad}");
                }
            }
        }
        // Fortran order, an integer dtype, a 1-D array, a short file: the whole-file reader.
        let fortran = dir.path().join("f.npy");
        let data: Vec<u8> = values[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(
            &fortran,
            npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                &data,
            ),
        )
        .unwrap();
        assert!(direct(&fortran).is_none());
        let short = dir.path().join("s.npy");
        fs::write(
            &short,
            npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }",
                &data,
            ),
        )
        .unwrap();
        // Short data is named as truncated, with the row it ends in, without a whole read.
        let e = direct(&short)
            .expect("refused from its header")
            .unwrap_err();
        assert!(e.contains("truncated") && e.contains("row 2 of 3"), "{e}");
        assert!(read_activations(&short, None).is_err());
        let one = dir.path().join("one.npy");
        write_f32(&one, &[4], &values[..4]);
        assert!(direct(&one).is_none());
        let ints = dir.path().join("i.npy");
        write_1d(&ints, "<i8", &[1i64, 2], |v: i64| v.to_le_bytes().to_vec());
        assert!(direct(&ints).is_none());
    }

    /// The Mahalanobis baseline as it was fitted before `sae-score` streamed: one matrix
    /// product over every row (the oracle for the fit in runs of [`COV_ROWS`]).
    fn fit_in_one_product(x: ArrayView2<f32>, shrinkage: f64) -> Mahalanobis {
        let (n, d) = x.dim();
        let x64 = x.mapv(f64::from);
        let mean = x64.mean_axis(Axis(0)).unwrap();
        let c = &x64 - &mean;
        let mut cov = c.t().dot(&c) / n as f64;
        let scale = cov.diag().sum() / d as f64;
        cov *= 1.0 - shrinkage;
        for i in 0..d {
            cov[[i, i]] += shrinkage * scale;
        }
        Mahalanobis {
            mean,
            chol: cholesky(cov).unwrap(),
            shrinkage,
        }
    }

    fn bits64(a: &Array2<f64>) -> Vec<u64> {
        a.iter().map(|v| v.to_bits()).collect()
    }

    /// The baseline fitted in runs of 256 rows, a block at a time, has the bits of one matrix
    /// product over every row: matrixmultiply adds its runs of the inner dimension in the
    /// same order. Should it change how it cuts them, this fails and `COV_ROWS` must follow.
    #[test]
    fn the_baseline_fitted_a_block_at_a_time_matches_one_product() {
        for (n, d) in [(2, 3), (255, 5), (256, 5), (1000, 20), (2 * 256 + 1, 33)] {
            let x = Array2::from_shape_vec((n, d), rows(n, d, 7)).unwrap();
            let want = fit_in_one_product(x.view(), 0.1);
            let whole = Mahalanobis::fit(x.view(), 0.1).unwrap();
            assert_eq!(bits64(&whole.chol), bits64(&want.chol), "[{n}, {d}]");
            assert_eq!(
                whole.mean.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.mean.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            for block in [COV_ROWS, 2 * COV_ROWS] {
                let blocks = Mahalanobis::fit_blocks((n, d), 0.1, |f| {
                    for (i, rows) in x.axis_chunks_iter(Axis(0), block).enumerate() {
                        f(i * block, rows)?;
                    }
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    bits64(&blocks.chol),
                    bits64(&want.chol),
                    "[{n}, {d}] {block}"
                );
            }
        }
    }

    /// `sae-score` reads its input a block at a time and gives the bits of the computation
    /// over the whole input that it replaced (rebuilt here from the library's whole-array
    /// functions, as the command was): token and prompt CSVs, the OOD table, the normalised
    /// MSEs and the label-0 R², with labels, prompt ids and a baseline, in blocks of one
    /// batch, of two, and of more than the input; a short last block; a `[batch, seq, d]`
    /// input; and a Fortran-order `.npy`, read whole, cut into blocks the same way.
    #[test]
    fn sae_score_in_blocks_gives_the_bits_of_the_whole_input() {
        let (dir, _, sae_dir) = tiny_sae();
        let d = 8;
        let n = 3 * BATCH + 100;
        let values = rows(n, d, 11);
        let x = Array2::from_shape_vec((n, d), values.clone()).unwrap();
        let flat = dir.path().join("x.npy");
        write_f32(&flat, &[n, d], &values);
        let batched = dir.path().join("x3.npy");
        write_f32(&batched, &[4, n / 4, d], &values);
        let fortran = dir.path().join("xf.npy");
        let column_major: Vec<u8> = x.t().iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(
            &fortran,
            npy_bytes(
                1,
                &format!("{{'descr': '<f4', 'fortran_order': True, 'shape': ({n}, {d}), }}"),
                &column_major,
            ),
        )
        .unwrap();
        // Label 0 on rows that cut the batches unevenly, so the label-0 rows' errors come
        // from batches of other rows than a pass over the label-0 rows alone would form.
        let labels: Vec<u8> = (0..n)
            .map(|r| u8::from(r % 3 == 1 || r % 17 == 0))
            .collect();
        let label_file = dir.path().join("labels.txt");
        let text: String = labels.iter().map(|l| format!("{l}\n")).collect();
        fs::write(&label_file, text).unwrap();
        let ids: Vec<i64> = (0..n as i64).map(|r| r / 9).collect();
        let id_file = dir.path().join("ids.npy");
        write_1d(&id_file, "<i8", &ids, |v: i64| v.to_le_bytes().to_vec());
        let base_n = 2 * BATCH + 37;
        let base = Array2::from_shape_vec((base_n, d), rows(base_n, d, 12)).unwrap();
        let base_file = dir.path().join("base.npy");
        write_f32(&base_file, &[base_n, d], base.as_slice().unwrap());

        // The whole-input computation, from the whole-array functions.
        let sae = Sae::load(&sae_dir).unwrap();
        let head =
            super::super::detector::load_head(&sae_dir.join(DARK_DIR), &sae, &sae_dir).unwrap();
        let one = Passes::threads(1);
        let (scores, error_sq) = score_pass(&sae, &head, x.view(), &one, "test").unwrap();
        let distances = fit_in_one_product(base.view(), 0.1)
            .score_with(x.view(), &one)
            .unwrap();
        let normal: Vec<usize> = (0..n).filter(|&r| labels[r] == 0).collect();
        let xn = x.select(Axis(0), &normal);
        let en = sae_errors_with(&sae, xn.view(), &one, "test").unwrap();
        let en_sq: Vec<f32> = normal.iter().map(|&r| error_sq[r]).collect();
        let want_r2 = head.r2(xn.view(), en.view()).unwrap();
        let want_nmse0 = defined_nmse_of_errors(xn.view(), &en_sq);
        let want_nmse = defined_nmse_of_errors(x.view(), &error_sq);
        let named = named_scores(&scores, Some(distances.clone()));
        let want_table = ood_table(&named, &labels, Some(&Prompts::group(&ids))).unwrap();
        let mut want_csv = String::from(
            "row,prompt_id,label,error_sq_norm,predicted_sq_norm,nonlinear_sq_norm,deviation,\
             mahalanobis\n",
        );
        for (r, s) in scores.iter().enumerate() {
            let _ = writeln!(
                want_csv,
                "{r},{},{},{},{},{},{},{}",
                ids[r],
                labels[r],
                s.error_sq_norm,
                s.predicted_sq_norm,
                s.nonlinear_sq_norm,
                s.deviation,
                distances[r]
            );
        }

        let bits = |v: Option<f64>| v.map(f64::to_bits);
        let mut prompt_csv = None;
        for input in [&flat, &batched, &fortran] {
            for block in [BATCH, 2 * BATCH, 100, 10 * n] {
                let (tokens, prompts) = (dir.path().join("t.csv"), dir.path().join("p.csv"));
                let (summary, _) = sae_score_command_in_blocks(
                    &SaeScoreArgs {
                        sae: sae_dir.clone(),
                        input: input.clone(),
                        labels: Some(label_file.clone()),
                        prompt_ids: Some(id_file.clone()),
                        baseline: Some(base_file.clone()),
                        baseline_shrinkage: 0.1,
                        out: Some(tokens.clone()),
                        prompt_out: Some(prompts.clone()),
                        ..Default::default()
                    },
                    &Passes::threads(3),
                    block,
                )
                .unwrap();
                let what = format!("{} in blocks of {block}", input.display());
                assert_eq!(fs::read_to_string(&tokens).unwrap(), want_csv, "{what}");
                let p = fs::read(&prompts).unwrap();
                assert_eq!(prompt_csv.get_or_insert_with(|| p.clone()), &p, "{what}");
                assert_eq!(summary.table, want_table, "{what}");
                let r2 = summary.r2_label0.unwrap();
                assert_eq!(r2.vector.to_bits(), want_r2.vector.to_bits(), "{what}");
                assert_eq!(r2.norm.to_bits(), want_r2.norm.to_bits(), "{what}");
                assert_eq!(bits(summary.nmse_all), bits(want_nmse), "{what}");
                assert_eq!(bits(summary.nmse_label0), bits(want_nmse0), "{what}");
                assert!(want_nmse0.is_some() && want_nmse.is_some());
            }
        }
    }

    /// A streamed input cut short names the file and the row it ends in: before any row is
    /// read when the file is short from the start, and while it is read when it was cut
    /// after it was opened.
    #[test]
    fn a_truncated_npy_names_the_file_and_the_row_it_ends_in() {
        let (dir, _, sae_dir) = tiny_sae();
        let (n, d) = (600, 8);
        let path = dir.path().join("cut.npy");
        write_f32(&path, &[n, d], &rows(n, d, 3));
        let len = fs::metadata(&path).unwrap().len();
        // 100 rows and a half short.
        let cut = len - (100 * d as u64 + 4) * 4;
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let e = sae_score_command(&SaeScoreArgs {
            sae: sae_dir.clone(),
            input: path.clone(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(
            e.contains("truncated") && e.contains("ends in row 499 of 600"),
            "{e}"
        );

        // Cut while open: the rows before the cut are read, then the row it falls in is named.
        write_f32(&path, &[n, d], &rows(n, d, 3));
        let mut npy = NpyRows::open(&path).unwrap().unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let mut values = Vec::new();
        npy.read_rows(0, 256, &mut values).unwrap();
        let e = npy
            .read_rows(256, 344, &mut values)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("ended in row 499 of 600"), "{e}");
    }

    /// `--norm-scaling-factor` 0, −1, NaN, ∞: one message, before anything else, in
    /// `sae-head` and `sae-score` alike; `sae-score` once called −1 a mismatch with the
    /// head's factor and suggested `sae-head --norm-scaling-factor -1 --force`.
    #[test]
    fn unusable_norm_scaling_factors_are_refused_up_front() {
        let (dir, acts, sae) = tiny_sae();
        for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let e = sae_score_command(&SaeScoreArgs {
                sae: sae.clone(),
                input: acts.clone(),
                norm_scaling_factor: Some(s),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("is not a scaling factor: it must be finite and positive")
                    && !e.contains("--force"),
                "{s}: {e}"
            );
            let out = dir.path().join("head");
            let e = sae_head_command(&SaeHeadArgs {
                norm_scaling_factor: Some(s),
                ..head_args(&sae, &acts, Some(out.clone()))
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("is not a scaling factor: it must be finite and positive"),
                "{s}: {e}"
            );
            assert!(!out.exists());
        }
    }

    /// A head fitted on rows of noise, held out on rows of a twentieth of their spread, predicts
    /// the held-out rows' ‖e‖² worse than their mean (held-out norm R² < 0): `sae-head` says
    /// so, as it did not (the trial's sl_wide).
    #[test]
    fn sae_head_warns_when_the_held_out_norm_r2_is_negative() {
        let (dir, _, sae) = tiny_sae();
        let noise = dir.path().join("noise.npy");
        let mut rng = crate::rng::Rng::new(11);
        // The last half (the held-out rows) at a twentieth of the first half's spread.
        let values: Vec<f32> = (0..400 * 8)
            .map(|i| {
                let v = rng.next_f64() - 0.5;
                (if i < 200 * 8 { v } else { 0.05 * v }) as f32
            })
            .collect();
        write_f32(&noise, &[400, 8], &values);
        let text = sae_head_command(&SaeHeadArgs {
            holdout: 0.5,
            ..head_args(&sae, &noise, Some(dir.path().join("noise-head")))
        })
        .unwrap();
        let norm: f64 = text
            .split("held-out vector ")
            .nth(1)
            .and_then(|t| t.split("norm ").nth(1))
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            norm < 0.0,
            "this noise gives a negative held-out norm R²: {text}"
        );
        assert!(
            text.contains(&format!("warning: held-out norm R² {norm:.3} is below 0"))
                && text.contains("worse than a constant"),
            "{text}"
        );
    }

    fn write_1d<T: Copy>(path: &Path, descr: &str, values: &[T], enc: fn(T) -> Vec<u8>) {
        let header = format!(
            "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}",
            values.len()
        );
        let data: Vec<u8> = values.iter().flat_map(|&v| enc(v)).collect();
        fs::write(path, npy_bytes(1, &header, &data)).unwrap();
    }

    /// Integer `.npy` ids are read exactly, whatever their width: large int64 ids are not
    /// refused, and 2^24 and 2^24 + 1 stay two prompts (float32 would merge them).
    #[test]
    fn npy_integer_ids_are_read_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ids.npy");
        let ids = [89_060_441_862_201i64, 16_777_216, 16_777_217, -3];
        write_1d(&p, "<i8", &ids, |v| v.to_le_bytes().to_vec());
        assert_eq!(read_ints(&p, None, 4, "prompt ids").unwrap(), ids.to_vec());
        write_1d(&p, "<u8", &[7u64, 1 << 60], |v| v.to_le_bytes().to_vec());
        assert_eq!(
            read_ints(&p, None, 2, "prompt ids").unwrap(),
            vec![7, 1 << 60]
        );
        write_1d(&p, "<u8", &[u64::MAX], |v| v.to_le_bytes().to_vec());
        let e = read_ints(&p, None, 1, "prompt ids")
            .unwrap_err()
            .to_string();
        assert!(e.contains("above the largest signed 64-bit integer"), "{e}");
        write_1d(&p, "<i4", &[-2i32, 70_000], |v| v.to_le_bytes().to_vec());
        assert_eq!(read_ints(&p, None, 2, "ids").unwrap(), vec![-2, 70_000]);
        write_1d(&p, "<u2", &[65_535u16], |v| v.to_le_bytes().to_vec());
        assert_eq!(read_ints(&p, None, 1, "ids").unwrap(), vec![65_535]);
        write_1d(&p, "|i1", &[-128i8], |v| v.to_le_bytes().to_vec());
        assert_eq!(read_ints(&p, None, 1, "ids").unwrap(), vec![-128]);
        // Floats: whole values within the dtype's exact range only, and the message says
        // that the rule is the float file's.
        // 2^24 itself is refused: 16777217 is stored as it too.
        for id in [16_777_218f32, 16_777_216.0, -16_777_216.0] {
            write_1d(&p, "<f4", &[id], |v| v.to_le_bytes().to_vec());
            let e = read_ints(&p, None, 1, "prompt ids")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("below 2^24 in magnitude, the range a float32 file holds exactly"),
                "{e}"
            );
            assert!(e.contains("integer dtype such as int64"), "{e}");
        }
        write_1d(&p, "<f4", &[16_777_215f32, -16_777_215.0], |v| {
            v.to_le_bytes().to_vec()
        });
        assert_eq!(
            read_ints(&p, None, 2, "ids").unwrap(),
            vec![16_777_215, -16_777_215]
        );
        write_1d(&p, "<f8", &[16_777_217f64], |v| v.to_le_bytes().to_vec());
        assert_eq!(read_ints(&p, None, 1, "ids").unwrap(), vec![16_777_217]);
    }

    /// Float 0/1 labels are accepted in safetensors as they are in `.npy`.
    #[test]
    fn float_labels_accepted_in_npy_and_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let labels = [0f32, 1.0, 1.0];
        let npy = dir.path().join("l.npy");
        write_1d(&npy, "<f4", &labels, |v| v.to_le_bytes().to_vec());
        assert_eq!(read_labels(&npy, None, 3).unwrap(), vec![0, 1, 1]);
        let data: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let v = TensorView::new(Dtype::F32, vec![3], &data).unwrap();
        let st = dir.path().join("l.safetensors");
        fs::write(
            &st,
            safetensors::serialize(vec![("labels", v)], None).unwrap(),
        )
        .unwrap();
        assert_eq!(read_labels(&st, None, 3).unwrap(), vec![0, 1, 1]);
        // 0.5 used to get the ids' message ("not an integer … integer dtype").
        let data: Vec<u8> = [0f32, 0.5, 1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v = TensorView::new(Dtype::F32, vec![3], &data).unwrap();
        fs::write(
            &st,
            safetensors::serialize(vec![("labels", v)], None).unwrap(),
        )
        .unwrap();
        let e = read_labels(&st, None, 3).unwrap_err().to_string();
        assert!(
            e.contains("label 1 is 0.5, expected 0 or 1") && !e.contains("integer dtype"),
            "{e}"
        );
    }

    /// An integer `.npy` passed as activations (token ids, most likely) is refused.
    #[test]
    fn integer_npy_activations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.npy");
        let header = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }";
        let data: Vec<u8> = (0..6i32).flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&p, npy_bytes(1, header, &data)).unwrap();
        let e = read_activations(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("integer dtype \"<i4\"") && e.contains("float32"),
            "{e}"
        );
    }
}
