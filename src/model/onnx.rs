//! The ONNX Runtime backend (cargo feature `onnx`): an autoencoder exported from PyTorch (or
//! by `tools/export_onnx.py`) scored with the same scaler, heads, thresholds and alerts as a
//! native one.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`) from `[onnx] library`,
//! `$ORT_DYLIB_PATH` or the loader path, once per process. A model directory holds the
//! usual `model.json` (features, scaler, head, calibration) and the `.onnx` file, whose
//! graph maps *scaled* rows `[batch, d]` to
//!
//! * a plain AE: one output `[batch, d]` (x̂);
//! * a probabilistic AE: two outputs `[batch, d]` (mean, then variance), or one `[batch, 2d]`
//!   output (mean then variance, split here).
//!
//! The ONNX metadata_props key `darkwatch.variance` says whether the variance output is the
//! variance (default) or its natural logarithm (`log_variance`, common in PyTorch PAEs).
//! Everything is checked at load against `model.json`; a mismatch names both sides.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ndarray::{Array2, ArrayView2, ArrayViewD, Axis, s};
use ort::ep::{self, ExecutionProvider};
use ort::session::{IoBinding, Session, builder::GraphOptimizationLevel};
use ort::value::{Tensor, TensorElementType, TensorRef, ValueType};

use super::OutputKind;
use super::nn::Recon;
use crate::config::{OnnxConfig, OnnxFallback, OnnxProvider};

/// The ONNX Runtime release darkwatch is built against (`ort` rc.15, `api-31`).
pub const RUNTIME_VERSION: &str = "1.31";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error(
        "cannot load ONNX Runtime from `{path}`: {reason}. darkwatch needs ONNX Runtime >= {RUNTIME_VERSION} \
         (tested with 1.31.1); get it with tools/get-onnxruntime.sh, then set ORT_DYLIB_PATH or [onnx] library"
    )]
    Library { path: String, reason: String },
    #[error(
        "{}: no such file: the ONNX backend scores the model's ONNX graph ([onnx] file); \
         export it with tools/export_onnx.py, or use the native backend",
        path.display()
    )]
    NoGraph { path: PathBuf },
    #[error(
        "{}: the graph was exported from model {graph_id}, but model.json holds model {model_id} \
         (retrained since?): scoring it would run the old network with the new model's scaler \
         and threshold; re-export it with tools/export_onnx.py (tools/export_bundled_onnx.sh for \
         the bundled models)",
        path.display()
    )]
    OtherModel {
        path: PathBuf,
        graph_id: String,
        model_id: String,
    },
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error(
        "{path}: execution provider {provider} is not available: {reason} ([onnx] fallback = \"error\")"
    )]
    Provider {
        path: PathBuf,
        provider: &'static str,
        reason: String,
    },
    #[error("ONNX Runtime failed to run {path}: {reason}")]
    Run { path: PathBuf, reason: String },
}

impl OnnxError {
    /// The model folder must change: its graph is not there ([`OnnxError::NoGraph`]) or
    /// was exported from another model ([`OnnxError::OtherModel`]).
    pub fn is_folders_fault(&self) -> bool {
        matches!(
            self,
            OnnxError::NoGraph { .. } | OnnxError::OtherModel { .. }
        )
    }
}

/// How the graph's outputs carry the reconstruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputLayout {
    /// One `[batch, d]` output: x̂.
    Plain(String),
    /// Two `[batch, d]` outputs: mean, variance.
    Split { mean: String, variance: String },
    /// One `[batch, 2d]` output: mean then variance.
    Stacked(String),
}

/// What the variance output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceKind {
    Variance,
    LogVariance,
}

/// A validated ONNX model: its bytes, its interface, and the provider it runs on. Each
/// [`OnnxSession`] made from it is a separate ONNX Runtime session (`run` needs `&mut`).
#[derive(Debug)]
pub struct OnnxModel {
    pub path: PathBuf,
    bytes: Arc<[u8]>,
    pub input: String,
    pub layout: OutputLayout,
    pub variance: VarianceKind,
    /// The execution provider sessions actually get: `cpu` or `cuda`.
    provider: &'static str,
    /// `darkwatch.model_id` from the file's metadata, if it has one.
    pub exported_from: Option<String>,
    n_features: usize,
    /// Columns of each output part: `members · d` (see [`crate::model::Autoencoder`]).
    recon_width: usize,
    intra_threads: usize,
}

/// The process's ONNX Runtime environment (ONNX Runtime allows one per process).
static ENVIRONMENT: OnceLock<(String, ort::environment::Environment)> = OnceLock::new();

/// The library path this configuration asks for.
fn library_path(cfg: &OnnxConfig) -> String {
    if !cfg.library.is_empty() {
        return cfg.library.clone();
    }
    std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| "libonnxruntime.so".to_owned())
}

/// Loads ONNX Runtime (once) and returns the environment.
fn environment(cfg: &OnnxConfig) -> Result<&'static ort::environment::Environment, OnnxError> {
    let path = library_path(cfg);
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        if *loaded != path {
            tracing::warn!(loaded = %loaded, requested = %path, "ONNX Runtime is already loaded in this process; keeping it");
        }
        return Ok(env);
    }
    let fail = |reason: String| OnnxError::Library {
        path: path.clone(),
        reason,
    };
    let env = ort::init_from(&path)
        .map_err(|e| fail(e.to_string()))?
        .with_name("darkwatch")
        .build()
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(library = %path, "loaded ONNX Runtime");
    Ok(&ENVIRONMENT.get_or_init(|| (path, env)).1)
}

/// The version string of the loaded ONNX Runtime, once one is loaded.
pub fn runtime_version() -> Option<String> {
    ENVIRONMENT.get().map(|_| ort::info().to_owned())
}

impl OnnxModel {
    /// Loads and validates `path` for model `model_id` (model.json's `id`) of `n_features`
    /// features and `output` kind, whose mean (and variance) outputs are `recon_width` wide
    /// (`d` times the members). A graph that names the model it was exported from
    /// (metadata `darkwatch.model_id`, as tools/export_onnx.py writes it) must name this
    /// one; a graph without that key (exported by other tools) is taken on its shapes.
    ///
    /// # Errors
    /// ONNX Runtime cannot be loaded, the file cannot be read or parsed, its inputs or
    /// outputs do not match the model, it was exported from another model, or the
    /// configured provider is missing and `fallback = "error"`.
    pub fn load(
        path: &Path,
        model_id: &str,
        n_features: usize,
        recon_width: usize,
        output: OutputKind,
        cfg: &OnnxConfig,
    ) -> Result<OnnxModel, OnnxError> {
        // Before the runtime: a missing graph is the model folder's fault wherever the
        // runtime is, and restarting does not bring it.
        if std::fs::metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Err(OnnxError::NoGraph {
                path: path.to_path_buf(),
            });
        }
        let env = environment(cfg)?;
        let bad = |reason: String| OnnxError::Model {
            path: path.to_path_buf(),
            reason,
        };
        let bytes: Arc<[u8]> = std::fs::read(path)
            .map_err(|e| bad(format!("cannot read: {e}")))?
            .into();
        let mut model = OnnxModel {
            path: path.to_path_buf(),
            bytes,
            input: String::new(),
            layout: OutputLayout::Plain(String::new()),
            variance: VarianceKind::Variance,
            provider: "cpu",
            exported_from: None,
            n_features,
            recon_width,
            intra_threads: cfg.intra_threads.max(1),
        };
        let (session, provider) = model.session_with(env, cfg.provider, cfg.fallback)?;
        model.provider = provider;
        model.validate(&session, output)?;
        let meta = session.metadata().map_err(|e| bad(e.to_string()))?;
        model.exported_from = meta.custom("darkwatch.model_id");
        // The id hashes the weights (and the stored calibration): another id means another
        // network, or this one calibrated otherwise.
        if let Some(graph_id) = model.exported_from.as_deref()
            && graph_id != model_id
        {
            return Err(OnnxError::OtherModel {
                path: path.to_path_buf(),
                graph_id: graph_id.to_string(),
                model_id: model_id.to_string(),
            });
        }
        model.variance = match meta.custom("darkwatch.variance").as_deref() {
            None | Some("variance") => VarianceKind::Variance,
            Some("log_variance") => VarianceKind::LogVariance,
            Some(other) => {
                return Err(bad(format!(
                    "metadata darkwatch.variance = {other:?}: expected \"variance\" or \"log_variance\""
                )));
            }
        };
        Ok(model)
    }

    /// The execution provider this model's sessions run on: `cpu` or `cuda`.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// One line: file, interface, ONNX Runtime version.
    pub fn describe(&self) -> String {
        let outputs = match &self.layout {
            OutputLayout::Plain(x) => format!("`{x}`"),
            OutputLayout::Split { mean, variance } => format!("`{mean}`, `{variance}`"),
            OutputLayout::Stacked(x) => format!("`{x}` (mean | variance)"),
        };
        let variance = match self.variance {
            VarianceKind::Variance => "",
            VarianceKind::LogVariance => ", log-variance output",
        };
        format!(
            "{}: input `{}`, outputs {outputs}{variance}; exported from model {}; {}",
            self.path.display(),
            self.input,
            self.exported_from.as_deref().unwrap_or("unknown"),
            runtime_version().unwrap_or_default()
        )
    }

    /// A new session on the provider this model validated with.
    ///
    /// # Errors
    /// ONNX Runtime refuses the model (it loaded before, so this is rare).
    pub fn session(&self) -> Result<Session, OnnxError> {
        let env = ENVIRONMENT
            .get()
            .map(|(_, e)| e)
            .expect("an OnnxModel exists only after the environment loaded");
        let provider = if self.provider == "cuda" {
            OnnxProvider::Cuda
        } else {
            OnnxProvider::Cpu
        };
        Ok(self.session_with(env, provider, OnnxFallback::Error)?.0)
    }

    fn session_with(
        &self,
        env: &ort::environment::Environment,
        provider: OnnxProvider,
        fallback: OnnxFallback,
    ) -> Result<(Session, &'static str), OnnxError> {
        let bad = |e: ort::Error| OnnxError::Model {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let mut builder = Session::builder(env)
            .map_err(bad)?
            .with_intra_threads(self.intra_threads)
            .map_err(|e| bad(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| bad(e.into()))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| bad(e.into()))?;
        let mut got = "cpu";
        if provider == OnnxProvider::Cuda {
            match ep::CUDA::default().register(&mut builder) {
                Ok(()) => got = "cuda",
                Err(e) => {
                    if fallback == OnnxFallback::Error {
                        return Err(OnnxError::Provider {
                            path: self.path.clone(),
                            provider: "cuda",
                            reason: e.to_string(),
                        });
                    }
                    tracing::warn!(model = %self.path.display(), error = %e,
                        "CUDA execution provider unavailable; running on CPU ([onnx] fallback = \"cpu\")");
                }
            }
        }
        let session = builder.commit_from_memory(&self.bytes).map_err(bad)?;
        Ok((session, got))
    }

    /// Checks input and outputs against the model's feature count and output kind.
    fn validate(&mut self, session: &Session, output: OutputKind) -> Result<(), OnnxError> {
        let (input_width, d) = (self.n_features, self.recon_width);
        let bad = |reason: String| OnnxError::Model {
            path: self.path.clone(),
            reason,
        };
        let [input] = session.inputs() else {
            return Err(bad(format!(
                "the graph has {} inputs ({}); darkwatch feeds one, [batch, {input_width}] float32",
                session.inputs().len(),
                names(session.inputs().iter().map(|o| o.name()))
            )));
        };
        check_matrix(input.name(), input.dtype(), input_width, "input").map_err(&bad)?;
        self.input = input.name().to_owned();
        let outs = session.outputs();
        self.layout = match (output, outs) {
            (OutputKind::Plain, [x]) => {
                check_matrix(x.name(), x.dtype(), d, "output").map_err(&bad)?;
                OutputLayout::Plain(x.name().to_owned())
            }
            (OutputKind::Probabilistic, [mean, var]) => {
                check_matrix(mean.name(), mean.dtype(), d, "mean output").map_err(&bad)?;
                check_matrix(var.name(), var.dtype(), d, "variance output").map_err(&bad)?;
                OutputLayout::Split {
                    mean: mean.name().to_owned(),
                    variance: var.name().to_owned(),
                }
            }
            (OutputKind::Probabilistic, [both]) => {
                check_matrix(both.name(), both.dtype(), 2 * d, "output").map_err(|e| {
                    bad(format!(
                        "model.json says a probabilistic autoencoder, which needs two outputs \
                         [batch, {d}] (mean, variance) or one [batch, {}] (mean | variance): {e}",
                        2 * d
                    ))
                })?;
                OutputLayout::Stacked(both.name().to_owned())
            }
            (kind, outs) => {
                let want = match kind {
                    OutputKind::Plain => format!("one output [batch, {d}] (the reconstruction)"),
                    OutputKind::Probabilistic => format!(
                        "two outputs [batch, {d}] (mean, variance) or one [batch, {}]",
                        2 * d
                    ),
                };
                return Err(bad(format!(
                    "model.json says a {} autoencoder, which needs {want}; the graph has {} ({})",
                    match kind {
                        OutputKind::Plain => "plain",
                        OutputKind::Probabilistic => "probabilistic",
                    },
                    outs.len(),
                    names(outs.iter().map(|o| o.name()))
                )));
            }
        };
        Ok(())
    }
}

/// A 2-d view of an output when it is `[n, width]`.
fn as_matrix(v: ArrayViewD<'_, f32>, n: usize, width: usize) -> Option<ArrayView2<'_, f32>> {
    v.into_dimensionality::<ndarray::Ix2>()
        .ok()
        .filter(|v| v.dim() == (n, width))
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = it.map(|n| format!("`{n}`")).collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// A `[batch, width]` float32 tensor with a dynamic (or any) batch dimension.
fn check_matrix(name: &str, ty: &ValueType, width: usize, what: &str) -> Result<(), String> {
    let ValueType::Tensor { ty, shape, .. } = ty else {
        return Err(format!("{what} `{name}` is not a tensor ({ty:?})"));
    };
    if *ty != TensorElementType::Float32 {
        return Err(format!(
            "{what} `{name}` is {ty:?}; darkwatch needs float32"
        ));
    }
    match &shape[..] {
        [b, w] if *w == width as i64 && *b < 0 => Ok(()),
        [b, w] if *w == width as i64 => Err(format!(
            "{what} `{name}` has a fixed batch dimension {b}; export it with a dynamic batch \
             axis (torch.onnx.export(..., dynamic_axes={{\"{name}\": {{0: \"batch\"}}}}))"
        )),
        dims => Err(format!(
            "{what} `{name}` has shape {dims:?} (-1 = dynamic); the model needs [batch, {width}]"
        )),
    }
}

/// One session with its scratch: what a scorer owns.
pub struct OnnxSession {
    model: Arc<OnnxModel>,
    session: Session,
    /// exp(log variance), for graphs that output the log-variance.
    var_scratch: Array2<f32>,
    /// Preallocated input and output tensors bound to the session for the batch sizes a
    /// scorer mostly runs (1 and its maximum): no tensor is created per call for them.
    bound: Vec<Bound>,
}

/// The rows of one run.
enum Rows<'a> {
    /// In the input tensor of `bound[i]`, already written.
    Bound(usize),
    /// Given by the caller (no binding for its batch size): a fresh tensor refers to them.
    Given(ArrayView2<'a, f32>),
}

/// An [`IoBinding`] with its own input and output tensors for batches of `n` rows.
struct Bound {
    n: usize,
    binding: IoBinding,
    /// Held so that the memory `input_data` points into stays alive (written through it).
    #[allow(dead_code)]
    input: Tensor<f32>,
    /// In the layout's output order; held so that the memory `output_data` points into
    /// stays alive (the binding holds them too).
    #[allow(dead_code)]
    outputs: Vec<Tensor<f32>>,
    /// The tensors' data, looked up once: `[n, d]` input, then each output `[n, width]`.
    input_data: DataPtr,
    output_data: Vec<(DataPtr, usize)>,
}

/// A pointer into the data of a tensor that the same [`Bound`] owns.
struct DataPtr(std::ptr::NonNull<f32>);

// SAFETY: the pointee is owned by the Bound's tensors, which move with it; a Bound is only
// used through `&mut OnnxSession`, so never from two threads at once.
unsafe impl Send for DataPtr {}

impl Bound {
    fn new(session: &Session, model: &OnnxModel, n: usize) -> ort::Result<Bound> {
        let (d, m) = (model.n_features as i64, model.recon_width as i64);
        let n64 = n as i64;
        let alloc = session.allocator();
        let mut binding = session.create_binding()?;
        let mut input = Tensor::<f32>::new(alloc, [n64, d])?;
        // ONNX Runtime hands out the tensor uninitialised: zero it, so that no view of it
        // ever reads undefined memory.
        input.extract_tensor_mut().1.fill(0.0);
        binding.bind_input(&model.input, &input)?;
        let shapes: Vec<(&str, i64)> = match &model.layout {
            OutputLayout::Plain(x) => vec![(x, m)],
            OutputLayout::Split { mean, variance } => vec![(mean, m), (variance, m)],
            OutputLayout::Stacked(x) => vec![(x, 2 * m)],
        };
        let mut outputs = Vec::new();
        let mut output_data = Vec::new();
        for (name, width) in shapes {
            let mut t = Tensor::<f32>::new(alloc, [n64, width])?;
            binding.bind_output(name, &mut t)?;
            let data = DataPtr(std::ptr::NonNull::from(t.extract_tensor_mut().1).cast());
            output_data.push((data, width as usize));
            outputs.push(t);
        }
        let input_data = DataPtr(std::ptr::NonNull::from(input.extract_tensor_mut().1).cast());
        Ok(Bound {
            n,
            binding,
            input,
            outputs,
            input_data,
            output_data,
        })
    }

    /// The input tensor's rows, to fill before a run.
    fn input_mut(&mut self, d: usize) -> &mut [f32] {
        // SAFETY: `input_data` points at this Bound's input tensor of n·d f32, alive as long
        // as `self`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.input_data.0.as_ptr(), self.n * d) }
    }

    /// Copies the `[n, d]` rows `x` into the input tensor.
    fn fill(&mut self, x: ArrayView2<f32>) {
        let d = x.ncols();
        let dst = self.input_mut(d);
        if let Some(src) = x.as_slice() {
            dst.copy_from_slice(src);
            return;
        }
        for (dst, src) in dst.chunks_exact_mut(d).zip(x.rows()) {
            for (o, &v) in dst.iter_mut().zip(&src) {
                *o = v;
            }
        }
    }

    /// The input rows, `[n, d]`.
    fn input(&self, d: usize) -> ArrayView2<'_, f32> {
        // SAFETY: `input_data` points at this Bound's input tensor of n·d f32, alive as long
        // as `self`; `&self` rules out writes through `input_mut` meanwhile.
        unsafe { ArrayView2::from_shape_ptr((self.n, d), self.input_data.0.as_ptr().cast_const()) }
    }

    /// Output `i` after a run, `[n, width]`.
    fn output(&self, i: usize) -> ArrayView2<'_, f32> {
        let (data, width) = &self.output_data[i];
        // SAFETY: the pointer is to this Bound's output tensor i of n·width f32, which
        // ONNX Runtime wrote during the run and which lives as long as `self`.
        unsafe { ArrayView2::from_shape_ptr((self.n, *width), data.0.as_ptr().cast_const()) }
    }
}

impl std::fmt::Debug for OnnxSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxSession")
            .field("model", &self.model.path)
            .finish_non_exhaustive()
    }
}

impl OnnxSession {
    /// # Errors
    /// See [`OnnxModel::session`].
    pub fn new(model: Arc<OnnxModel>, max_batch: usize) -> Result<Self, OnnxError> {
        let session = model.session()?;
        let var_scratch = match model.variance {
            VarianceKind::LogVariance => Array2::zeros((max_batch.max(1), model.recon_width)),
            VarianceKind::Variance => Array2::zeros((0, model.recon_width)),
        };
        let mut bound = Vec::new();
        // Only on the CPU provider: ONNX Runtime copies an input to the provider's device
        // when it is bound, so under CUDA later writes into it would never reach the graph.
        let sizes: &[usize] = if model.provider() == "cpu" {
            &[1, max_batch.max(1)]
        } else {
            &[]
        };
        for &n in sizes {
            if bound.iter().any(|b: &Bound| b.n == n) {
                continue;
            }
            match Bound::new(&session, &model, n) {
                Ok(b) => bound.push(b),
                // Still correct without it: each call then makes its tensors.
                Err(e) => {
                    tracing::debug!(error = %e, "ONNX Runtime: no preallocated binding for batch {n}")
                }
            }
        }
        Ok(OnnxSession {
            model,
            session,
            var_scratch,
            bound,
        })
    }

    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    /// Times ONNX Runtime's own cost on the scaled rows `x`, which `darkwatch bench`
    /// compares the whole scorer with: `Session::run_binding` on the preallocated binding
    /// for `x`'s batch size (what the scorer runs), else `Session::run`. Only the run is
    /// timed, not copying `x` in. Returns nanoseconds.
    ///
    /// # Errors
    /// ONNX Runtime fails.
    pub fn time_run(&mut self, x: ArrayView2<f32>) -> Result<u64, OnnxError> {
        self.check_width(x)?;
        let fail = |e: ort::Error| OnnxError::Run {
            path: self.model.path.clone(),
            reason: e.to_string(),
        };
        if let Some(b) = self.bound.iter_mut().find(|b| b.n == x.nrows()) {
            b.fill(x);
            let t = std::time::Instant::now();
            drop(self.session.run_binding(&b.binding).map_err(fail)?);
            return Ok(t.elapsed().as_nanos() as u64);
        }
        let input = TensorRef::from_array_view(x).map_err(fail)?;
        let t = std::time::Instant::now();
        drop(self.session.run(ort::inputs![input]).map_err(fail)?);
        Ok(t.elapsed().as_nanos() as u64)
    }

    /// Rows must have the model's feature count: the preallocated tensors are that wide.
    fn check_width(&self, x: ArrayView2<f32>) -> Result<(), OnnxError> {
        let d = self.model.n_features;
        if x.ncols() == d {
            return Ok(());
        }
        Err(OnnxError::Run {
            path: self.model.path.clone(),
            reason: format!("rows have {} values, the graph takes {d}", x.ncols()),
        })
    }

    /// Whether a preallocated input is held for batches of `n` rows (then
    /// [`Self::forward_bound`] runs on it; else use [`Self::forward`]).
    pub fn has_binding(&self, n: usize) -> bool {
        self.bound.iter().any(|b| b.n == n)
    }

    /// Lets `write` fill the preallocated input for `n` rows (`n·d` values, row-major:
    /// scaled frames), runs the graph on it and hands the rows and the reconstruction to
    /// `f`, both borrowing ONNX Runtime's buffers (no copy of either).
    ///
    /// # Errors
    /// No binding is held for `n` (see [`Self::has_binding`]), or as [`Self::forward`].
    pub fn forward_bound<R>(
        &mut self,
        n: usize,
        write: impl FnOnce(&mut [f32]),
        f: impl FnOnce(ArrayView2<'_, f32>, &Recon<'_>) -> R,
    ) -> Result<R, OnnxError> {
        let d = self.model.n_features;
        let Some(i) = self.bound.iter().position(|b| b.n == n) else {
            return Err(OnnxError::Run {
                path: self.model.path.clone(),
                reason: format!("no preallocated input for a batch of {n}"),
            });
        };
        write(self.bound[i].input_mut(d));
        self.run(n, d, Rows::Bound(i), f)
    }

    /// Runs the graph on scaled rows `x` (contiguous) and hands the reconstruction to `f`,
    /// which borrows ONNX Runtime's output buffers (no copy).
    ///
    /// # Errors
    /// ONNX Runtime fails, or an output has an unexpected shape.
    pub fn forward<R>(
        &mut self,
        x: ArrayView2<f32>,
        f: impl FnOnce(&Recon<'_>) -> R,
    ) -> Result<R, OnnxError> {
        self.check_width(x)?;
        let (n, d) = x.dim();
        match self.bound.iter().position(|b| b.n == n) {
            Some(i) => {
                self.bound[i].fill(x);
                self.run(n, d, Rows::Bound(i), |_, recon| f(recon))
            }
            None => self.run(n, d, Rows::Given(x), |_, recon| f(recon)),
        }
    }

    /// One run of `n` rows of `d` values, handing them and the reconstruction to `f`.
    fn run<R>(
        &mut self,
        n: usize,
        d: usize,
        rows: Rows<'_>,
        f: impl FnOnce(ArrayView2<'_, f32>, &Recon<'_>) -> R,
    ) -> Result<R, OnnxError> {
        let m = &*self.model;
        let width = m.recon_width;
        let fail = |reason: String| OnnxError::Run {
            path: m.path.clone(),
            reason,
        };
        let (outputs, bound, x) = match rows {
            Rows::Bound(i) => {
                let b = &mut self.bound[i];
                // The outputs land in the bound tensors; what run_binding returns aliases them.
                drop(
                    self.session
                        .run_binding(&b.binding)
                        .map_err(|e| fail(e.to_string()))?,
                );
                let b = &*b;
                (None, Some(b), b.input(d))
            }
            Rows::Given(x) => {
                let input = TensorRef::from_array_view(x).map_err(|e| fail(e.to_string()))?;
                let outputs = self
                    .session
                    .run(ort::inputs![input])
                    .map_err(|e| fail(e.to_string()))?;
                (Some(outputs), None, x)
            }
        };
        let view = |i: usize, name: &str, width: usize| -> Result<ArrayView2<'_, f32>, OnnxError> {
            let v = match (&outputs, bound) {
                (_, Some(b)) => return Ok(b.output(i)),
                (Some(o), None) => o
                    .get(name)
                    .ok_or_else(|| fail(format!("output `{name}` missing")))?
                    .try_extract_array::<f32>()
                    .map_err(|e| fail(e.to_string()))?,
                (None, None) => unreachable!("one of the two paths ran"),
            };
            as_matrix(v, n, width)
                .ok_or_else(|| fail(format!("output `{name}` is not [{n}, {width}]")))
        };
        let (mean, var) = match &m.layout {
            OutputLayout::Plain(name) => (view(0, name, width)?, None),
            OutputLayout::Split { mean, variance } => {
                (view(0, mean, width)?, Some(view(1, variance, width)?))
            }
            OutputLayout::Stacked(name) => {
                let both = view(0, name, 2 * width)?;
                let (mean, var) = both.split_at(Axis(1), width);
                (mean, Some(var))
            }
        };
        let var = match (var, m.variance) {
            (Some(lv), VarianceKind::LogVariance) => {
                if self.var_scratch.nrows() < n {
                    self.var_scratch = Array2::zeros((n, width));
                }
                let mut dst = self.var_scratch.slice_mut(s![..n, ..]);
                dst.zip_mut_with(&lv, |o, &l| *o = l.exp());
                Some(self.var_scratch.slice(s![..n, ..]))
            }
            (var, _) => var,
        };
        Ok(f(x, &Recon { mean, var }))
    }
}
