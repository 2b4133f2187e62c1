//! The CUDA backend (cargo feature `cuda`): the native autoencoder's own weights run on an
//! NVIDIA GPU with cuBLAS and two small NVRTC-compiled kernels, scored by the same heads,
//! thresholds and alerts as the native kernels.
//!
//! The CUDA libraries are loaded at run time (cudarc's `dynamic-loading`): `libcuda.so.1`
//! (the driver), `libcublas.so.13` and `libnvrtc.so.13` (a CUDA 13 toolkit, or the PyPI
//! `nvidia-*` wheels on `LD_LIBRARY_PATH`). A build needs none of them. cudarc *panics*
//! when a library or one of its symbols is missing, so [`CudaModel::load`] checks each
//! library first (`is_culib_present`) and runs every first call into it under
//! `catch_unwind`: a machine without a GPU gets a [`CudaError`] naming the cause.
//!
//! # Layout
//!
//! Activations are row-major `[n, width]` as on the host. cuBLAS is column-major, and a
//! row-major `[r, c]` matrix is the same memory as a column-major `[c, r]` one (its
//! transpose). A dense layer `Y = X·Wᵀ` (X `[n, in]`, W `[out, in]`, Y `[n, out]`, all
//! row-major) is therefore computed as the column-major product `Yᵀ = W·Xᵀ`:
//!
//! * `Yᵀ` is column-major `[out, n]`, `ldc = out` — exactly row-major Y;
//! * `Xᵀ` is column-major `[in, n]`, `ldb = in` — exactly row-major X, no transpose (`N`);
//! * W row-major `[out, in]` reads as column-major `Wᵀ` `[in, out]`, `lda = in`; the
//!   product needs W, so `transa = T`.
//!
//! so `sgemm(T, N, m = out, n = n, k = in, A = W, lda = in, B = X, ldb = in, C = Y, ldc = out)`.
//!
//! Then one NVRTC kernel per layer adds the bias, applies the activation (ReLU keeps NaN,
//! as the native kernels do) and, on a probabilistic model's last layer, turns the
//! variance half into `softplus(raw) = relu(x) + ln1p(exp(-|x|))` (the head adds ε).
//!
//! # What is not on the device yet
//!
//! The last layer's `[n, d]` (plain) or `[n, 2d]` (mean | variance) output is copied back
//! to the host and scored by the CPU heads ([`crate::score::Head::score_batch`]); the
//! scores, contributions and top-k are *not* computed on the device. Host buffers are
//! pageable (no pinned memory, no copy/compute overlap across batches). Device buffers are
//! sized once for the scorer's largest batch (and regrown only if a larger batch arrives).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use ndarray::{ArrayView2, s};

use super::nn::Recon;
use super::{Activation, Autoencoder, OutputKind};
use crate::config::CudaConfig;

/// Why the CUDA backend cannot be used or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA driver: libcuda.so.1 cannot be loaded (no NVIDIA driver installed on this machine)"
    )]
    NoDriver,
    #[error("CUDA device {index}: {reason}")]
    Device { index: usize, reason: String },
    #[error(
        "{library} cannot be loaded: the CUDA backend needs a CUDA 13 toolkit (or the nvidia-* \
         wheels on LD_LIBRARY_PATH) beside the driver"
    )]
    Library { library: &'static str },
    #[error("NVRTC cannot compile darkwatch's kernels: {0}")]
    Compile(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("CUDA: {what}: {reason}")]
    Run { what: &'static str, reason: String },
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
    #[error("the CUDA library panicked during {what}: {reason}")]
    Panicked { what: &'static str, reason: String },
}

/// Runs `f` (a first call into a dynamically loaded CUDA library), turning a panic (missing
/// library or symbol) into an error.
fn guarded<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let reason = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::Panicked { what, reason })
        }
    }
}

fn run_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Run {
        what,
        reason: e.to_string(),
    }
}

/// Opens device `index`: checks the driver library, then creates the context.
fn open_context(index: usize) -> Result<Arc<CudaContext>, CudaError> {
    // SAFETY: only tries to load the library; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    guarded("cuInit / device lookup", || {
        let count = CudaContext::device_count().map_err(|e| CudaError::Device {
            index,
            reason: format!("the driver reports no usable device ({e})"),
        })?;
        if count <= 0 {
            return Err(CudaError::Device {
                index,
                reason: "the driver sees no CUDA device".into(),
            });
        }
        if index >= count as usize {
            return Err(CudaError::Device {
                index,
                reason: format!("no such device: the driver sees {count} (0..{count})"),
            });
        }
        let ctx = CudaContext::new(index).map_err(|e| CudaError::Device {
            index,
            reason: e.to_string(),
        })?;
        // SAFETY: darkwatch synchronises by hand, so cudarc's per-slice events (an event
        // record and wait per kernel argument, which batch-1 latency would pay) are off:
        // weights are uploaded and synchronised before any session reads them, each
        // session's buffers are used and freed only on its own stream, every forward ends
        // with a stream synchronise, and weights outlive the sessions (they hold an Arc).
        unsafe { ctx.disable_event_tracking() };
        Ok(ctx)
    })
}

/// Whether CUDA device `index` is usable by this backend (driver, device, cuBLAS, NVRTC);
/// returns its name. Tests use it to decide whether to run GPU checks.
///
/// # Errors
/// The first missing piece, as [`CudaModel::load`] would report it.
pub fn probe(index: usize) -> Result<String, CudaError> {
    let ctx = open_context(index)?;
    check_libraries()?;
    guarded("cuDeviceGetName", || {
        ctx.name().map_err(run_err("cuDeviceGetName"))
    })
}

fn check_libraries() -> Result<(), CudaError> {
    // SAFETY: as in `open_context`: these only try to load the libraries.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::Library {
            library: "cuBLAS (libcublas.so.13)",
        });
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Library {
            library: "NVRTC (libnvrtc.so.13)",
        });
    }
    Ok(())
}

/// darkwatch's kernels, compiled with NVRTC at load.
const KERNELS: &str = r#"
extern "C" __global__ void bias_act(float* y, const float* b, unsigned rows, unsigned width,
                                    int relu, unsigned softplus_from) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * width) return;
    unsigned col = i % width;
    float v = y[i] + b[col];
    // ReLU that keeps NaN, as the native kernels do.
    if (relu && v < 0.0f) v = 0.0f;
    // softplus(x) = relu(x) + ln1p(exp(-|x|)); the head adds epsilon itself.
    if (col >= softplus_from) v = (v < 0.0f ? 0.0f : v) + log1pf(expf(-fabsf(v)));
    y[i] = v;
}
"#;

/// Compiles every darkwatch kernel (the autoencoder's and the SAE's) with NVRTC: to a CUBIN
/// for `arch` (e.g. `sm_90`) when given, else to PTX. Needs only `libnvrtc`, no driver or
/// GPU: a check that the sources compile.
///
/// # Errors
/// NVRTC is missing or a source does not compile (with NVRTC's log).
pub fn compile_kernels(arch: Option<&str>) -> Result<(), CudaError> {
    compile_source(KERNELS, "darkwatch_ae.cu", arch)?;
    compile_source(SAE_KERNELS, "darkwatch_sae.cu", arch)?;
    Ok(())
}

/// Loads `source` into `ctx`: a CUBIN for this exact GPU first, PTX (JIT-compiled by the
/// driver) if that fails. A CUBIN runs on a driver older than the NVRTC that built it (CUDA
/// minor-version compatibility), whereas PTX from a newer NVRTC (say a 13.x wheel on a 13.0
/// driver) can be refused with `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    source: &str,
    file: &str,
) -> Result<Arc<cudarc::driver::CudaModule>, CudaError> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(run_err("cuDeviceGetAttribute"))?;
    let arch = format!("sm_{major}{minor}");
    match compile_source(source, file, Some(&arch)).and_then(|m| {
        ctx.load_module(m)
            .map_err(run_err("cuModuleLoadData (CUBIN)"))
    }) {
        Ok(module) => Ok(module),
        Err(e) => {
            tracing::warn!(error = %e, %arch, file, "no CUBIN for this GPU; loading PTX instead");
            let ptx = compile_source(source, file, None)?;
            ctx.load_module(ptx)
                .map_err(run_err("cuModuleLoadData (PTX)"))
        }
    }
}

/// Compiles one source: to a CUBIN for `arch` when given, else to PTX.
fn compile_source(
    source: &str,
    file: &str,
    arch: Option<&str>,
) -> Result<cudarc::nvrtc::Ptx, CudaError> {
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Library {
            library: "NVRTC (libnvrtc.so.13)",
        });
    }
    guarded("NVRTC compilation", || match arch {
        None => cudarc::nvrtc::compile_ptx_with_opts(
            source,
            cudarc::nvrtc::CompileOptions {
                name: Some(file.into()),
                ..Default::default()
            },
        )
        .map_err(|e| CudaError::Compile(e.to_string())),
        Some(arch) => compile_cubin(source, file, arch).map(cudarc::nvrtc::Ptx::from_binary),
    })
}

fn compile_cubin(source: &str, file: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    let fail =
        |what: &str, e: String| CudaError::Compile(format!("{file}, {what} for {arch}: {e}"));
    let src = std::ffi::CString::new(source).map_err(|e| fail("source", e.to_string()))?;
    let name = std::ffi::CString::new(file).map_err(|e| fail("name", e.to_string()))?;
    let prog =
        result::create_program(&src, Some(&name)).map_err(|e| fail("create", e.to_string()))?;
    let out = (|| {
        let opts = [format!("--gpu-architecture={arch}")];
        // SAFETY: `prog` is a live program; the options are valid C strings.
        if let Err(e) = unsafe { result::compile_program(prog, &opts) } {
            // SAFETY: as above.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            return Err(fail("compile", format!("{e:?}: {log}")));
        }
        let mut size = 0usize;
        // SAFETY: `prog` compiled; `size` is a valid out pointer.
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
            .result()
            .map_err(|e| fail("nvrtcGetCUBINSize", format!("{e:?}")))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the `size` bytes NVRTC asked for.
        unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| fail("nvrtcGetCUBIN", format!("{e:?}")))?;
        if cubin.is_empty() {
            return Err(fail("nvrtcGetCUBIN", "empty image".into()));
        }
        Ok(cubin)
    })();
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// One layer's weights on the device.
#[derive(Debug)]
struct DeviceLayer {
    /// `[out, in]`, row-major (as on the host).
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    inputs: usize,
    outputs: usize,
    relu: bool,
}

/// An autoencoder uploaded to a GPU: its weights (once) and the compiled kernels. Each
/// [`CudaSession`] made from it has its own stream, cuBLAS handle and activation buffers.
pub struct CudaModel {
    ctx: Arc<CudaContext>,
    layers: Vec<DeviceLayer>,
    bias_act: CudaFunction,
    n_features: usize,
    /// Columns of each output part: `members · d` (see [`Autoencoder`]).
    recon_width: usize,
    output: OutputKind,
    device: usize,
    name: String,
    tf32: bool,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("device", &self.device)
            .field("name", &self.name)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl CudaModel {
    /// Opens device `cfg.device`, compiles the kernels and uploads `ae`'s weights.
    ///
    /// # Errors
    /// No driver, no such device, cuBLAS or NVRTC missing, the kernels do not compile, or an
    /// upload fails; the message names which.
    pub fn load(ae: &Autoencoder, cfg: &CudaConfig) -> Result<CudaModel, CudaError> {
        let ctx = open_context(cfg.device)?;
        check_libraries()?;
        guarded("loading the model onto the GPU", || {
            let name = ctx.name().map_err(run_err("cuDeviceGetName"))?;
            let module = load_kernels(&ctx, KERNELS, "darkwatch_ae.cu")?;
            let bias_act = module
                .load_function("bias_act")
                .map_err(run_err("cuModuleGetFunction"))?;
            let stream = ctx.default_stream();
            let mut layers = Vec::with_capacity(ae.layers.len());
            for l in &ae.layers {
                let w: Vec<f32> = l.w.iter().copied().collect(); // row-major [out, in]
                let b: Vec<f32> = l.b.iter().copied().collect();
                layers.push(DeviceLayer {
                    w: stream
                        .clone_htod(&w)
                        .map_err(run_err("uploading weights"))?,
                    b: stream.clone_htod(&b).map_err(run_err("uploading biases"))?,
                    inputs: l.inputs(),
                    outputs: l.outputs(),
                    relu: l.act == Activation::Relu,
                });
            }
            stream.synchronize().map_err(run_err("uploading weights"))?;
            Ok(CudaModel {
                ctx: ctx.clone(),
                layers,
                bias_act,
                n_features: ae.n_features,
                recon_width: ae.recon_width(),
                output: ae.output,
                device: cfg.device,
                name,
                tf32: cfg.tf32,
            })
        })
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// One line: device, precision.
    pub fn describe(&self) -> String {
        format!(
            "CUDA device {} ({}), {} layers, {}",
            self.device,
            self.name,
            self.layers.len(),
            if self.tf32 {
                "TF32 GEMMs"
            } else {
                "fp32 GEMMs"
            }
        )
    }
}

/// One scorer's device state: stream, cuBLAS handle, activation buffers for `capacity`
/// rows, and the host buffer the last layer is copied back into.
pub struct CudaSession {
    model: Arc<CudaModel>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// `acts[0]` is the input `[cap, d]`, `acts[l + 1]` layer l's output `[cap, out_l]`.
    acts: Vec<CudaSlice<f32>>,
    capacity: usize,
    /// The last layer's output, `[cap, width]`, row-major.
    host_out: Vec<f32>,
    /// Staging for inputs that are not contiguous.
    host_in: Vec<f32>,
}

impl std::fmt::Debug for CudaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSession")
            .field("model", &self.model)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl CudaSession {
    /// A stream, a cuBLAS handle and buffers for batches of up to `max_batch` rows.
    ///
    /// # Errors
    /// The stream, handle or buffers cannot be made.
    pub fn new(model: Arc<CudaModel>, max_batch: usize) -> Result<Self, CudaError> {
        guarded("creating a CUDA session", || {
            let stream = model.ctx.new_stream().map_err(run_err("cuStreamCreate"))?;
            let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(e.to_string()))?;
            let mode = if model.tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: a valid handle, just created.
            unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
                .result()
                .map_err(|e| CudaError::Blas(e.to_string()))?;
            let mut s = CudaSession {
                model,
                stream,
                blas,
                acts: Vec::new(),
                capacity: 0,
                host_out: Vec::new(),
                host_in: Vec::new(),
            };
            s.reserve(max_batch.max(1))?;
            Ok(s)
        })
    }

    pub fn model(&self) -> &CudaModel {
        &self.model
    }

    fn out_width(&self) -> usize {
        self.model.output.output_width(self.model.recon_width)
    }

    /// Makes room for `n` rows (allocates only when `n` exceeds the capacity).
    fn reserve(&mut self, n: usize) -> Result<(), CudaError> {
        if n <= self.capacity {
            return Ok(());
        }
        let m = &*self.model;
        let mut acts = Vec::with_capacity(m.layers.len() + 1);
        acts.push(
            self.stream
                .alloc_zeros::<f32>(n * m.n_features)
                .map_err(run_err("allocating device buffers"))?,
        );
        for l in &m.layers {
            acts.push(
                self.stream
                    .alloc_zeros::<f32>(n * l.outputs)
                    .map_err(run_err("allocating device buffers"))?,
            );
        }
        self.acts = acts;
        self.host_out = vec![0.0; n * self.out_width()];
        self.capacity = n;
        Ok(())
    }

    /// Uploads `x`, runs every layer, and copies the last layer back into `host_out`.
    fn run(&mut self, x: ArrayView2<f32>) -> Result<(), CudaError> {
        let (n, d) = x.dim();
        let m = &*self.model;
        if d != m.n_features {
            return Err(CudaError::Run {
                what: "forward",
                reason: format!("input has {d} features, the model takes {}", m.n_features),
            });
        }
        let widest = m.layers.iter().map(|l| l.outputs).max().unwrap_or(0).max(d);
        if n.checked_mul(widest).is_none_or(|e| e > u32::MAX as usize) {
            return Err(CudaError::Run {
                what: "forward",
                reason: format!("a batch of {n} rows is too large for the kernels"),
            });
        }
        self.reserve(n)?;
        let m = &*self.model;
        let src: &[f32] = match x.as_slice() {
            Some(v) => v,
            None => {
                self.host_in.clear();
                self.host_in.extend(x.iter().copied());
                &self.host_in
            }
        };
        self.stream
            .memcpy_htod(src, &mut self.acts[0])
            .map_err(run_err("copying the batch to the GPU"))?;
        let last = m.layers.len() - 1;
        for (l, layer) in m.layers.iter().enumerate() {
            let (before, after) = self.acts.split_at_mut(l + 1);
            let (x_dev, y_dev) = (&before[l], &mut after[0]);
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: layer.outputs as i32,
                n: n as i32,
                k: layer.inputs as i32,
                alpha: 1.0f32,
                lda: layer.inputs as i32,
                ldb: layer.inputs as i32,
                beta: 0.0f32,
                ldc: layer.outputs as i32,
            };
            // SAFETY: W holds out·in floats, X at least n·in, Y at least n·out (buffers are
            // sized for `capacity` ≥ n rows); the leading dimensions match those shapes.
            unsafe { self.blas.gemm(cfg, &layer.w, x_dev, y_dev) }
                .map_err(|e| CudaError::Blas(e.to_string()))?;
            let (rows, width) = (n as u32, layer.outputs as u32);
            let relu = i32::from(layer.relu);
            let softplus_from = if l == last && m.output == OutputKind::Probabilistic {
                m.recon_width as u32
            } else {
                width
            };
            let total = rows * width;
            let launch = LaunchConfig {
                grid_dim: (total.div_ceil(256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = self.stream.launch_builder(&m.bias_act);
            builder
                .arg(&mut *y_dev)
                .arg(&layer.b)
                .arg(&rows)
                .arg(&width)
                .arg(&relu)
                .arg(&softplus_from);
            // SAFETY: the kernel touches rows·width floats of y (sized for capacity ≥ n rows)
            // and reads b[0..width]; the argument types match its signature.
            unsafe { builder.launch(launch) }.map_err(run_err("launching bias_act"))?;
        }
        let w = self.out_width();
        let out = self.acts[m.layers.len()].slice(..n * w);
        self.stream
            .memcpy_dtoh(&out, &mut self.host_out[..n * w])
            .map_err(run_err("copying the output back"))?;
        self.stream
            .synchronize()
            .map_err(run_err("cuStreamSynchronize"))?;
        Ok(())
    }

    /// Times the device forward (upload, GEMMs, kernels, copy back) on `x`, `runs` times.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn time_runs(
        &mut self,
        x: ArrayView2<f32>,
        runs: usize,
        mut record: impl FnMut(u64),
    ) -> Result<(), CudaError> {
        for _ in 0..runs {
            let t = std::time::Instant::now();
            self.forward(x, |_| ())?;
            record(t.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    /// Runs the network on scaled rows `x` and hands the reconstruction (in this session's
    /// host buffer) to `f`.
    ///
    /// # Errors
    /// A CUDA, cuBLAS or launch failure, or `x` has the wrong width.
    pub fn forward<R>(
        &mut self,
        x: ArrayView2<f32>,
        f: impl FnOnce(&Recon<'_>) -> R,
    ) -> Result<R, CudaError> {
        let n = x.nrows();
        let d = self.model.recon_width;
        if n > 0 {
            guarded("the CUDA forward pass", || self.run(x))?;
        }
        let w = self.out_width();
        let all = ArrayView2::from_shape((n, w), &self.host_out[..n * w]).map_err(|e| {
            CudaError::Run {
                what: "forward",
                reason: e.to_string(),
            }
        })?;
        let recon = match self.model.output {
            OutputKind::Plain => Recon {
                mean: all,
                var: None,
            },
            OutputKind::Probabilistic => Recon {
                mean: all.slice_move(s![.., ..d]),
                var: Some(all.slice_move(s![.., d..])),
            },
        };
        Ok(f(&recon))
    }
}

// ------------------------------------------------------------------------------------------
// SAE forward on the device.

/// Largest `k` the device TopK kernel takes.
pub const SAE_MAX_K: usize = 256;
/// Threads per block of the TopK kernel; each thread owns `ceil(d_sae / 1024)` latents, at
/// most 128 (so `d_sae` ≤ 131072).
const TOPK_THREADS: u32 = 1024;
const SAE_MAX_LATENTS: usize = 128 * TOPK_THREADS as usize;

/// The SAE kernels: input preparation, per-row TopK (with `b_enc` and the ReLU), and the
/// sparse decode with the squared error norm.
const SAE_KERNELS: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
#define NONE 0xffffffffu

extern "C" __global__ void sae_prep(const float* x, float* xin, const float* b_dec,
                                    unsigned rows, unsigned d, float scale, int sub) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * d) return;
    float v = x[i] * scale;
    if (sub) v -= b_dec[i % d];
    xin[i] = v;
}

// One block (1024 threads) per row. Thread t owns latents t, t + 1024, ...; it keeps the best
// of those not yet taken, the block picks the best of all k times (ties: lower index). The
// winners below or at 0 are dropped by the ReLU (index NONE, value 0).
extern "C" __global__ void sae_topk(const float* pre, const float* b_enc, unsigned d_sae,
                                    unsigned k, unsigned* idx, float* val) {
    __shared__ float sv[32];
    __shared__ unsigned si[32];
    __shared__ unsigned win;
    const float* p = pre + (size_t)blockIdx.x * d_sae;
    unsigned t = threadIdx.x, nt = blockDim.x, lane = t & 31, warp = t >> 5;
    unsigned nwarps = (nt + 31) >> 5;
    unsigned taken[4] = {0u, 0u, 0u, 0u};
    float bv = NEG_INF; unsigned bi = NONE;
    for (unsigned i = 0, j = t; j < d_sae; ++i, j += nt) {
        float v = p[j] + b_enc[j];
        if (v > bv) { bv = v; bi = j; }
    }
    for (unsigned s = 0; s < k; ++s) {
        float v = bv; unsigned ix = bi;
        for (int off = 16; off > 0; off >>= 1) {
            float ov = __shfl_down_sync(0xffffffffu, v, off);
            unsigned oi = __shfl_down_sync(0xffffffffu, ix, off);
            if (ov > v || (ov == v && oi < ix)) { v = ov; ix = oi; }
        }
        if (lane == 0) { sv[warp] = v; si[warp] = ix; }
        __syncthreads();
        if (warp == 0) {
            v = lane < nwarps ? sv[lane] : NEG_INF;
            ix = lane < nwarps ? si[lane] : NONE;
            for (int off = 16; off > 0; off >>= 1) {
                float ov = __shfl_down_sync(0xffffffffu, v, off);
                unsigned oi = __shfl_down_sync(0xffffffffu, ix, off);
                if (ov > v || (ov == v && oi < ix)) { v = ov; ix = oi; }
            }
            if (lane == 0) {
                win = ix;
                size_t o = (size_t)blockIdx.x * k + s;
                bool keep = ix != NONE && v > 0.0f;
                idx[o] = keep ? ix : NONE;
                val[o] = keep ? v : 0.0f;
            }
        }
        __syncthreads();
        unsigned w = win;
        if (w != NONE && w % nt == t) {
            unsigned slot = w / nt;
            taken[slot >> 5] |= 1u << (slot & 31);
            bv = NEG_INF; bi = NONE;
            for (unsigned i = 0, j = t; j < d_sae; ++i, j += nt) {
                if (taken[i >> 5] & (1u << (i & 31))) continue;
                float u = p[j] + b_enc[j];
                if (u > bv) { bv = u; bi = j; }
            }
        }
    }
}

// One block per row: x_hat = (b_dec + sum_s val_s W_dec[idx_s]) * unscale, e = x - x_hat,
// err_sq = sum e^2 (accumulated in double, as on the host).
extern "C" __global__ void sae_decode(const float* x, const float* w_dec, const float* b_dec,
                                      const unsigned* idx, const float* val, unsigned d,
                                      unsigned k, float unscale, float* err_sq) {
    __shared__ unsigned sidx[256];
    __shared__ float sval[256];
    __shared__ double part[32];
    unsigned r = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    for (unsigned s = t; s < k; s += nt) {
        sidx[s] = idx[(size_t)r * k + s];
        sval[s] = val[(size_t)r * k + s];
    }
    __syncthreads();
    double acc = 0.0;
    for (unsigned c = t; c < d; c += nt) {
        float y = b_dec[c];
        for (unsigned s = 0; s < k; ++s) {
            unsigned j = sidx[s];
            if (j != NONE) y += sval[s] * w_dec[(size_t)j * d + c];
        }
        y = y * unscale;
        float e = x[(size_t)r * d + c] - y;
        acc += (double)e * (double)e;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if ((t & 31) == 0) part[t >> 5] = acc;
    __syncthreads();
    if (t == 0) {
        double sum = 0.0;
        for (unsigned w = 0; w < (nt + 31) / 32; ++w) sum += part[w];
        err_sq[r] = (float)sum;
    }
}
"#;

/// A TopK SAE on a GPU: weights uploaded once, buffers for `capacity` rows. Its forward runs
/// the input preparation, the encoder GEMM (cuBLAS), TopK with `b_enc` and ReLU, the sparse
/// decode and the squared error norm on the device; only ‖e‖² per row comes back (the
/// active latents on request).
///
/// Supported: `TopK` activation with `k` ≤ [`SAE_MAX_K`], `d_sae` ≤ 131072, normalisation
/// `none` or `expected_average_only_in` without a scaling factor. Others are refused with
/// [`CudaError::Unsupported`].
pub struct CudaSae {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    prep: CudaFunction,
    topk: CudaFunction,
    decode: CudaFunction,
    /// `[d_in, d_sae]` row-major.
    w_enc: CudaSlice<f32>,
    b_enc: CudaSlice<f32>,
    /// `[d_sae, d_in]` row-major.
    w_dec: CudaSlice<f32>,
    b_dec: CudaSlice<f32>,
    d_in: usize,
    d_sae: usize,
    k: usize,
    sub_b_dec: bool,
    capacity: usize,
    x: CudaSlice<f32>,
    xin: CudaSlice<f32>,
    pre: CudaSlice<f32>,
    idx: CudaSlice<u32>,
    val: CudaSlice<f32>,
    err_sq: CudaSlice<f32>,
    host_err: Vec<f32>,
    name: String,
}

impl std::fmt::Debug for CudaSae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSae")
            .field("d_in", &self.d_in)
            .field("d_sae", &self.d_sae)
            .field("k", &self.k)
            .field("device", &self.name)
            .finish_non_exhaustive()
    }
}

impl CudaSae {
    /// Uploads `sae` to device `cfg.device` with buffers for `max_batch` rows.
    ///
    /// # Errors
    /// As [`CudaModel::load`], or [`CudaError::Unsupported`] for an SAE this kernel set does
    /// not cover.
    pub fn load(
        sae: &crate::sae::Sae,
        max_batch: usize,
        cfg: &CudaConfig,
    ) -> Result<CudaSae, CudaError> {
        use crate::sae::{Normalization, SaeActivation};
        let unsupported = |what: String| Err(CudaError::Unsupported(what));
        let k = match sae.activation() {
            SaeActivation::TopK { k } if k <= SAE_MAX_K => k,
            SaeActivation::TopK { k } => {
                return unsupported(format!("TopK k = {k} (the kernel takes ≤ {SAE_MAX_K})"));
            }
            other => return unsupported(format!("activation {other:?} (TopK only)")),
        };
        match sae.normalization() {
            Normalization::None
            | Normalization::ExpectedAverageOnlyIn {
                scaling_factor: None,
            } => {}
            other => return unsupported(format!("normalisation {}", other.name())),
        }
        let (d_in, d_sae) = (sae.d_in(), sae.d_sae());
        if d_sae > SAE_MAX_LATENTS {
            return unsupported(format!("{d_sae} latents (≤ {SAE_MAX_LATENTS})"));
        }
        // b_enc has no accessor: it is the pre-activation of an input that prepares to 0
        // (b_dec when b_dec is subtracted from the input, else 0), exactly 0·W_enc + b_enc.
        let zero_in = if sae.apply_b_dec_to_input() {
            sae.b_dec().insert_axis(ndarray::Axis(0)).to_owned()
        } else {
            ndarray::Array2::zeros((1, d_in))
        };
        let mut ws = sae.workspace(1);
        let b_enc: Vec<f32> = sae
            .pre_acts(zero_in.view(), &mut ws)
            .map_err(|e| CudaError::Unsupported(e.to_string()))?
            .iter()
            .copied()
            .collect();
        let mut w_enc = vec![0.0f32; d_in * d_sae];
        for (i, row) in w_enc.chunks_exact_mut(d_sae).enumerate() {
            for (j, w) in row.iter_mut().enumerate() {
                *w = sae.w_enc_at(i, j);
            }
        }
        let w_dec: Vec<f32> = sae.w_dec().iter().copied().collect();
        let b_dec: Vec<f32> = sae.b_dec().iter().copied().collect();

        let ctx = open_context(cfg.device)?;
        check_libraries()?;
        guarded("loading the SAE onto the GPU", || {
            let name = ctx.name().map_err(run_err("cuDeviceGetName"))?;
            let module = load_kernels(&ctx, SAE_KERNELS, "darkwatch_sae.cu")?;
            let f = |n: &str| {
                module
                    .load_function(n)
                    .map_err(run_err("cuModuleGetFunction"))
            };
            let (prep, topk, decode) = (f("sae_prep")?, f("sae_topk")?, f("sae_decode")?);
            let stream = ctx.new_stream().map_err(run_err("cuStreamCreate"))?;
            let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(e.to_string()))?;
            let mode = if cfg.tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: a valid handle, just created.
            unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
                .result()
                .map_err(|e| CudaError::Blas(e.to_string()))?;
            let up = run_err("uploading the SAE");
            let cap = max_batch.max(1);
            let alloc = run_err("allocating SAE buffers");
            let s = CudaSae {
                w_enc: stream.clone_htod(&w_enc).map_err(&up)?,
                b_enc: stream.clone_htod(&b_enc).map_err(&up)?,
                w_dec: stream.clone_htod(&w_dec).map_err(&up)?,
                b_dec: stream.clone_htod(&b_dec).map_err(&up)?,
                x: stream.alloc_zeros(cap * d_in).map_err(&alloc)?,
                xin: stream.alloc_zeros(cap * d_in).map_err(&alloc)?,
                pre: stream.alloc_zeros(cap * d_sae).map_err(&alloc)?,
                idx: stream.alloc_zeros(cap * k).map_err(&alloc)?,
                val: stream.alloc_zeros(cap * k).map_err(&alloc)?,
                err_sq: stream.alloc_zeros(cap).map_err(&alloc)?,
                host_err: vec![0.0; cap],
                stream,
                blas,
                prep,
                topk,
                decode,
                d_in,
                d_sae,
                k,
                sub_b_dec: sae.apply_b_dec_to_input(),
                capacity: cap,
                name,
            };
            s.stream.synchronize().map_err(up)?;
            Ok(s)
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The encoder GEMM `pre = x_in·W_enc` for `n` rows, enqueued (not synchronised).
    fn encoder_gemm(&mut self, n: usize) -> Result<(), CudaError> {
        // Row-major pre [n, d_sae] = column-major preᵀ [d_sae, n] = W_encᵀ·x_inᵀ, where
        // row-major W_enc [d_in, d_sae] is column-major W_encᵀ (lda = d_sae) and row-major
        // x_in [n, d_in] is column-major x_inᵀ (ldb = d_in): no transposes.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: self.d_sae as i32,
            n: n as i32,
            k: self.d_in as i32,
            alpha: 1.0f32,
            lda: self.d_sae as i32,
            ldb: self.d_in as i32,
            beta: 0.0f32,
            ldc: self.d_sae as i32,
        };
        // SAFETY: W_enc holds d_in·d_sae floats, x_in and pre are sized for capacity ≥ n rows.
        unsafe { self.blas.gemm(cfg, &self.w_enc, &self.xin, &mut self.pre) }
            .map_err(|e| CudaError::Blas(e.to_string()))
    }

    fn run(&mut self, x: ArrayView2<f32>) -> Result<(), CudaError> {
        let (n, d) = x.dim();
        if d != self.d_in {
            return Err(CudaError::Run {
                what: "SAE forward",
                reason: format!("input has {d} features, the SAE takes {}", self.d_in),
            });
        }
        if n > self.capacity {
            return Err(CudaError::Run {
                what: "SAE forward",
                reason: format!("{n} rows, buffers for {}", self.capacity),
            });
        }
        let owned;
        let src: &[f32] = match x.as_slice() {
            Some(v) => v,
            None => {
                owned = x.iter().copied().collect::<Vec<f32>>();
                &owned
            }
        };
        self.stream
            .memcpy_htod(src, &mut self.x)
            .map_err(run_err("copying the batch to the GPU"))?;
        let total = (n * d) as u32;
        let (rows, dd, scale, sub) = (n as u32, d as u32, 1.0f32, i32::from(self.sub_b_dec));
        let mut b = self.stream.launch_builder(&self.prep);
        b.arg(&self.x)
            .arg(&mut self.xin)
            .arg(&self.b_dec)
            .arg(&rows)
            .arg(&dd)
            .arg(&scale)
            .arg(&sub);
        let grid = |threads: u32, blocks: u32| LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: n·d elements of x and x_in (capacity ≥ n), d of b_dec; types match.
        unsafe { b.launch(grid(256, total.div_ceil(256))) }.map_err(run_err("sae_prep"))?;
        self.encoder_gemm(n)?;
        let (d_sae, k) = (self.d_sae as u32, self.k as u32);
        let mut b = self.stream.launch_builder(&self.topk);
        b.arg(&self.pre)
            .arg(&self.b_enc)
            .arg(&d_sae)
            .arg(&k)
            .arg(&mut self.idx)
            .arg(&mut self.val);
        // SAFETY: one block per row < capacity; each reads d_sae of pre and b_enc and writes k
        // of idx and val; d_sae ≤ 128·1024 as the taken mask needs.
        unsafe { b.launch(grid(TOPK_THREADS, rows)) }.map_err(run_err("sae_topk"))?;
        let unscale = 1.0f32;
        let mut b = self.stream.launch_builder(&self.decode);
        b.arg(&self.x)
            .arg(&self.w_dec)
            .arg(&self.b_dec)
            .arg(&self.idx)
            .arg(&self.val)
            .arg(&dd)
            .arg(&k)
            .arg(&unscale)
            .arg(&mut self.err_sq);
        // SAFETY: one block per row; k ≤ 256 fits the shared arrays; indices are < d_sae or
        // NONE (skipped).
        unsafe { b.launch(grid(256, rows)) }.map_err(run_err("sae_decode"))?;
        let out = self.err_sq.slice(..n);
        self.stream
            .memcpy_dtoh(&out, &mut self.host_err[..n])
            .map_err(run_err("copying the errors back"))?;
        self.stream
            .synchronize()
            .map_err(run_err("cuStreamSynchronize"))
    }

    /// ‖x − x̂‖² for every row of `x` (`n` ≤ [`Self::capacity`]).
    ///
    /// # Errors
    /// A CUDA failure, the wrong width, or more rows than the buffers hold.
    pub fn forward(&mut self, x: ArrayView2<f32>) -> Result<&[f32], CudaError> {
        let n = x.nrows();
        if n > 0 {
            guarded("the SAE forward pass", || self.run(x))?;
        }
        Ok(&self.host_err[..n])
    }

    /// The active latents of the last forward's first `n` rows: per row, `k` (index, value)
    /// pairs, value 0 and index `u32::MAX` where fewer than `k` survived the ReLU.
    ///
    /// # Errors
    /// A CUDA failure.
    pub fn latents(&self, n: usize) -> Result<(Vec<u32>, Vec<f32>), CudaError> {
        let n = n.min(self.capacity);
        let idx = self
            .stream
            .clone_dtoh(&self.idx.slice(..n * self.k))
            .map_err(run_err("copying latents back"))?;
        let val = self
            .stream
            .clone_dtoh(&self.val.slice(..n * self.k))
            .map_err(run_err("copying latents back"))?;
        self.stream
            .synchronize()
            .map_err(run_err("cuStreamSynchronize"))?;
        Ok((idx, val))
    }

    /// Times the encoder GEMM alone for `n` rows (on whatever x_in holds), `runs` times after
    /// a warm-up; returns the seconds per GEMM.
    ///
    /// # Errors
    /// A CUDA or cuBLAS failure, or `n` beyond the capacity.
    pub fn time_encoder_gemm(&mut self, n: usize, runs: usize) -> Result<f64, CudaError> {
        if n > self.capacity {
            return Err(CudaError::Run {
                what: "GEMM timing",
                reason: format!("{n} rows, buffers for {}", self.capacity),
            });
        }
        let sync = run_err("cuStreamSynchronize");
        self.encoder_gemm(n)?;
        self.stream.synchronize().map_err(&sync)?;
        let t = std::time::Instant::now();
        for _ in 0..runs.max(1) {
            self.encoder_gemm(n)?;
        }
        self.stream.synchronize().map_err(&sync)?;
        Ok(t.elapsed().as_secs_f64() / runs.max(1) as f64)
    }
}
