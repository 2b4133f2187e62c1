//! The CUDA backend (cargo feature `cuda`): the native autoencoder's own weights run on an
//! NVIDIA GPU with cuBLAS and small NVRTC-compiled kernels, scored by the same heads (on the
//! device), thresholds and alerts as the native kernels.
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
//! # The score head
//!
//! The `ae_head` kernel scores each row on the device, one warp per row, as
//! [`crate::score::Head::score_batch`] does on the host: every head (mse, max_abs, wnll with
//! its raw, excess or bounded log-variance), an ensemble's members averaged per feature, and
//! against the mean-shifted targets when the model has an MSS bank (the targets are shifted
//! on the host and uploaded beside the input). Only each row's score and its `d`
//! contributions come back ([`CudaSession::score`]), not the `[n, 2d]` (or, for an ensemble
//! of K, `[n, 2Kd]`) reconstruction: the pipeline's per-stream smoothing averages whole
//! contribution vectors before it ranks them, so the top-k is taken on the host.
//!
//! The autoencoder's batches are synchronous (a batch of up to [`GRAPH_MAX_ROWS`] rows is one
//! CUDA graph launch: upload, layers, head, copies back). The SAE overlaps batches
//! ([`CudaSae::submit`], [`CudaSae::wait`]), and the pipeline keeps two of its batches in
//! flight ([`crate::pipeline::BatchScorer::overlaps`]). Host buffers are pinned; device
//! buffers are sized once for the scorer's largest batch (and regrown only if a larger batch
//! arrives).

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
use crate::sae::dark::DarkHead;
use crate::sae::detector::SaeScoreKind;
use crate::score::{Head, HeadKind, LogVariance};

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
        // weights are uploaded and synchronised before any session reads them, and weights
        // outlive the sessions (they hold an Arc). A `CudaSession` uses its buffers on its
        // own stream only and ends every forward with a stream synchronise. A `CudaSae`
        // writes each input buffer's device copy on its copy stream and reads it on its
        // compute stream, ordered by events (`enqueue`). Both synchronise their streams
        // before their buffers are freed (their `Drop`, and `reserve`).
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

// One feature's term for one member of the score head, crate::score's formula (within
// rounding: logf for the host's ln, and the compiler may fuse multiply-adds). kind:
// 0 mse, 1 max_abs, 2 wnll. lv (wnll): 0 raw, 1 excess, 2 bounded, 3 no variance output.
// c: the member's constants (excess: median, ceiling, e^-ceiling; bounded: lo, hi, e^-hi,
// e^-lo; d each).
__device__ __forceinline__ float head_term(int kind, int lv, float e, float s, float alpha,
                                           float beta, float eps, const float* c,
                                           unsigned j, unsigned d) {
    if (kind == 0) return e * e;
    if (kind == 1) return fabsf(e);
    if (lv == 3) return alpha * e * e / (1.0f + eps) + beta * logf(1.0f + eps);
    float v = s + eps;
    if (lv == 0) return alpha * e * e / v + beta * logf(v);
    float ln_v = logf(v);
    if (lv == 1) {
        float median = c[j], ceiling = c[d + j], inv_cap = c[2 * d + j];
        bool capped = ln_v > ceiling;
        float l = capped ? ceiling : ln_v;
        float inv_v = capped ? inv_cap : 1.0f / v;
        return alpha * e * e * inv_v + beta * fmaxf(l - median, 0.0f);
    }
    float lo = c[j], hi = c[d + j], inv_hi = c[2 * d + j], inv_lo = c[3 * d + j];
    bool below = ln_v < lo, above = ln_v > hi;
    float l = below ? lo : (above ? hi : ln_v);
    float inv_v = below ? inv_lo : (above ? inv_hi : 1.0f / v);
    return alpha * e * e * inv_v + beta * (l - lo);
}

// The score head, one warp per row: feature j's contribution is the mean of the members'
// terms (member k's mean at out[k*d + j], its variance at out[var_at + k*d + j]; var_at 0:
// none), scored against x (the input, or its mean-shifted target). The row's score is their
// sum, or for max_abs their maximum (NaN wins, as on the host).
extern "C" __global__ void ae_head(const float* x, const float* out, unsigned n, unsigned d,
                                   unsigned members, unsigned width, unsigned var_at, int kind,
                                   int lv, float alpha, float beta, float eps,
                                   const float* consts, unsigned block, float* contrib,
                                   float* scores) {
    unsigned lane = threadIdx.x & 31u;
    unsigned r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= n) return;  // the whole warp
    const float* xr = x + (size_t)r * d;
    const float* o = out + (size_t)r * width;
    float* cr = contrib + (size_t)r * d;
    float inv = 1.0f / (float)members;
    float acc = kind == 1 ? __int_as_float(0xff800000) : 0.0f;
    for (unsigned j = lane; j < d; j += 32u) {
        float xv = xr[j], c = 0.0f;
        for (unsigned k = 0; k < members; ++k) {
            float s = var_at ? o[var_at + k * d + j] : 0.0f;
            float t = head_term(kind, lv, xv - o[k * d + j], s, alpha, beta, eps,
                                consts + k * block, j, d);
            c = k == 0 ? t : c + t;
        }
        if (members > 1) c *= inv;
        cr[j] = c;
        acc = kind == 1 ? ((c > acc || c != c) ? c : acc) : acc + c;
    }
    for (int off = 16; off > 0; off >>= 1) {
        float other = __shfl_down_sync(0xffffffffu, acc, off);
        acc = kind == 1 ? ((other > acc || other != other) ? other : acc) : acc + other;
    }
    if (lane == 0) scores[r] = acc;
}
"#;

/// Rows per block of the `ae_head` kernel (a warp each).
const HEAD_ROWS_PER_BLOCK: u32 = 8;

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
    head: CudaFunction,
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
            let head = module
                .load_function("ae_head")
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
                head,
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

/// Page-locked host memory (`cuMemHostAlloc`). Copies from and to it are asynchronous and
/// run at full bus speed, and a CUDA graph can capture them (a copy from pageable memory
/// cannot be captured). `write_combined` suits buffers the host only writes (inputs): the
/// host reading such memory is very slow, so outputs use plain pinned memory.
struct Pinned<T: Plain = f32> {
    ctx: Arc<CudaContext>,
    ptr: *mut T,
    len: usize,
}

/// What a [`Pinned`] buffer holds: a number for which all-zero bytes are a valid value.
trait Plain: Copy + cudarc::driver::DeviceRepr {}
impl Plain for f32 {}
impl Plain for u32 {}

// SAFETY: the buffer is owned by one session (or SAE), used from one thread at a time, and
// the owner synchronises its stream before the host reads or writes the memory.
unsafe impl<T: Plain> Send for Pinned<T> {}

impl<T: Plain> Pinned<T> {
    fn new(ctx: &Arc<CudaContext>, len: usize, write_combined: bool) -> Result<Self, CudaError> {
        use cudarc::driver::{result, sys};
        ctx.bind_to_thread()
            .map_err(run_err("binding the CUDA context"))?;
        let flags = if write_combined {
            sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: a plain allocation; the pointer is checked and zeroed below.
        let ptr = unsafe { result::malloc_host(bytes, flags) }
            .map_err(run_err("cuMemHostAlloc (pinned host memory)"))?
            .cast::<T>();
        if ptr.is_null() {
            return Err(CudaError::Run {
                what: "cuMemHostAlloc (pinned host memory)",
                reason: "returned a null pointer".into(),
            });
        }
        // SAFETY: `ptr` holds `bytes` writable bytes; zero bytes are a valid `T` (`Plain`).
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
        Ok(Pinned {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised values (zeroed at allocation) owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as `as_slice`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Plain> Drop for Pinned<T> {
    fn drop(&mut self) {
        // No copy reads or writes the memory any more: its owner synchronised its streams
        // first. (A context-wide synchronise here would invalidate a graph another session
        // is capturing.)
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by `cuMemHostAlloc` in `new`, freed once.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
    }
}

/// An async host-to-device copy of `src` into the start of `dst`.
fn copy_htod(
    stream: &CudaStream,
    src: &[f32],
    dst: &mut CudaSlice<f32>,
    what: &'static str,
) -> Result<(), CudaError> {
    use cudarc::driver::DevicePtrMut;
    debug_assert!(src.len() <= dst.len());
    let (ptr, _sync) = dst.device_ptr_mut(stream);
    // SAFETY: `dst` holds at least `src.len()` floats; the caller keeps `src` (pinned or
    // not) alive and unchanged until the stream is synchronised.
    unsafe { cudarc::driver::result::memcpy_htod_async(ptr, src, stream.cu_stream()) }
        .map_err(run_err(what))
}

/// An async device-to-host copy of the start of `src` into `dst`.
fn copy_dtoh<T: Plain>(
    stream: &CudaStream,
    src: &CudaSlice<T>,
    dst: &mut [T],
    what: &'static str,
) -> Result<(), CudaError> {
    use cudarc::driver::DevicePtr;
    debug_assert!(dst.len() <= src.len());
    let (ptr, _sync) = src.device_ptr(stream);
    // SAFETY: `src` holds at least `dst.len()` values; the caller synchronises the stream
    // before reading `dst` and keeps it alive until then.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, ptr, stream.cu_stream()) }
        .map_err(run_err(what))
}

/// Row-major `out [n, m] = x [n, k] · w [k, m]`, enqueued on `blas`'s stream, with no
/// transposes: row-major `out` is column-major `outᵀ [m, n]` (ldc = m), and
/// `outᵀ = wᵀ · xᵀ`, where row-major `w` reads as column-major `wᵀ [m, k]` (lda = m) and
/// row-major `x` as column-major `xᵀ [k, n]` (ldb = k). The SAE's encoder, decoder and
/// dark-matter head are all this product.
///
/// # Safety
/// `x` holds at least n·k floats, `w` k·m and `out` n·m.
unsafe fn gemm_rows(
    blas: &CudaBlas,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    (n, k, m): (usize, usize, usize),
) -> Result<(), CudaError> {
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: 1.0f32,
        lda: m as i32,
        ldb: k as i32,
        beta: 0.0f32,
        ldc: m as i32,
    };
    // SAFETY: the sizes are the caller's promise; cuBLAS reads and writes within them.
    unsafe { blas.gemm(cfg, w, x, out) }.map_err(|e| CudaError::Blas(e.to_string()))
}

/// A captured forward pass for one batch size.
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: a graph is launched only by the session that owns it, from one thread at a time
// (CUDA requires that graph objects are not used concurrently, not that they stay on the
// thread that made them).
unsafe impl Send for Graph {}

/// Batches of up to this many rows replay a captured CUDA graph: one launch instead of one
/// copy, GEMM and kernel launch per layer. Larger batches are not launch-bound.
pub const GRAPH_MAX_ROWS: usize = 64;
/// The cuBLAS workspace each session provides, so that captured GEMMs allocate nothing.
const BLAS_WORKSPACE_BYTES: usize = 4 << 20;

/// What one enqueued batch does, and which of a session's graphs it is captured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The network only; its last layer comes back ([`CudaSession::forward`]).
    Forward = 0,
    /// Network and score head, scored against the input; scores and contributions come back.
    Score = 1,
    /// As `Score`, against mean-shifted targets uploaded beside the input.
    ScoreShifted = 2,
}

/// The score head a session runs on the device ([`CudaSession::set_head`]): the `ae_head`
/// kernel's parameters and the members' constants.
struct SessionHead {
    kind: i32,
    lv: i32,
    alpha: f32,
    beta: f32,
    /// `members` blocks of `block` floats ([`crate::score::prepare_member_baselines`]); one
    /// unused float when the head has none.
    consts: CudaSlice<f32>,
    block: u32,
}

/// One scorer's device state: stream, cuBLAS handle (with its own workspace), activation
/// buffers for `capacity` rows, the score head's buffers, the pinned host buffers that
/// inputs go up from and results come back into, and the CUDA graphs captured for small
/// batches.
pub struct CudaSession {
    model: Arc<CudaModel>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    /// `acts[0]` is the input `[cap, d]`, `acts[l + 1]` layer l's output `[cap, out_l]`.
    acts: Vec<CudaSlice<f32>>,
    capacity: usize,
    /// The scaled input, `[cap, d]` (write-combined: the host only writes it).
    host_in: Pinned,
    /// The last layer's output, `[cap, width]`, row-major.
    host_out: Pinned,
    /// The score head, once set.
    head: Option<SessionHead>,
    /// The mean-shifted targets `[cap, d]`, the head's scores `[cap]` and its
    /// contributions `[cap, d]`, on the device and in pinned host memory.
    target: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    contrib: CudaSlice<f32>,
    host_target: Pinned,
    host_scores: Pinned,
    host_contrib: Pinned,
    /// Slot `p · GRAPH_MAX_ROWS + n − 1` holds the graph of [`Pass`] p for batches of `n`
    /// rows, once captured: each is captured once (a capture and instantiation cost more
    /// than the launches it saves).
    graphs: Vec<Option<Graph>>,
    /// Why small batches do not use graphs (a capture failed); `None` while they do.
    graphs_off: Option<String>,
}

impl Drop for CudaSession {
    fn drop(&mut self) {
        // A failed forward can leave copies in flight into the buffers about to be freed.
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSession")
            .field("model", &self.model)
            .field("capacity", &self.capacity)
            .field("graphs", &self.graphs.iter().flatten().count())
            .field("graphs_off", &self.graphs_off)
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
            let mut workspace = stream
                .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
                .map_err(run_err("allocating the cuBLAS workspace"))?;
            {
                use cudarc::driver::DevicePtrMut;
                let (ptr, _sync) = workspace.device_ptr_mut(&stream);
                // SAFETY: a valid handle and a device buffer of that many bytes, which the
                // session keeps (and frees after the handle, declared before it).
                unsafe {
                    cudarc::cublas::sys::cublasSetWorkspace_v2(
                        *blas.handle(),
                        ptr as *mut std::ffi::c_void,
                        BLAS_WORKSPACE_BYTES,
                    )
                }
                .result()
                .map_err(|e| CudaError::Blas(e.to_string()))?;
            }
            // Placeholders: `reserve` below sizes every buffer for `max_batch` rows.
            let pinned = |wc| Pinned::new(&model.ctx, 0, wc);
            let (host_in, host_out, host_target) = (pinned(true)?, pinned(false)?, pinned(true)?);
            let (host_scores, host_contrib) = (pinned(false)?, pinned(false)?);
            let empty = || {
                stream
                    .alloc_zeros::<f32>(1)
                    .map_err(run_err("allocating device buffers"))
            };
            let (target, scores, contrib) = (empty()?, empty()?, empty()?);
            let mut s = CudaSession {
                model,
                stream: stream.clone(),
                blas,
                _workspace: workspace,
                acts: Vec::new(),
                capacity: 0,
                host_in,
                host_out,
                head: None,
                target,
                scores,
                contrib,
                host_target,
                host_scores,
                host_contrib,
                graphs: (0..3 * GRAPH_MAX_ROWS).map(|_| None).collect(),
                graphs_off: None,
            };
            s.reserve(max_batch.max(1))?;
            Ok(s)
        })
    }

    pub fn model(&self) -> &CudaModel {
        &self.model
    }

    /// Why batches of up to [`GRAPH_MAX_ROWS`] rows are launched call by call instead of
    /// as a CUDA graph; `None` when graphs are in use.
    pub fn graphs_off(&self) -> Option<&str> {
        self.graphs_off.as_deref()
    }

    /// Launches every batch call by call, as batches above [`GRAPH_MAX_ROWS`] rows are:
    /// the baseline `benches/cuda.rs` measures graphs against.
    pub fn disable_graphs(&mut self) {
        self.graphs.fill_with(|| None);
        self.graphs_off = Some("disabled by the caller".into());
    }

    fn out_width(&self) -> usize {
        self.model.output.output_width(self.model.recon_width)
    }

    /// Makes room for `n` rows (allocates only when `n` exceeds the capacity).
    fn reserve(&mut self, n: usize) -> Result<(), CudaError> {
        if n <= self.capacity {
            return Ok(());
        }
        // The graphs point at the old buffers.
        self.graphs.fill_with(|| None);
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
        let d = m.n_features;
        let alloc = |len: usize| {
            self.stream
                .alloc_zeros::<f32>(len)
                .map_err(run_err("allocating device buffers"))
        };
        let (target, scores, contrib) = (alloc(n * d)?, alloc(n)?, alloc(n * d)?);
        self.stream
            .synchronize()
            .map_err(run_err("allocating device buffers"))?;
        self.acts = acts;
        (self.target, self.scores, self.contrib) = (target, scores, contrib);
        self.host_in = Pinned::new(&m.ctx, n * d, true)?;
        self.host_out = Pinned::new(&m.ctx, n * self.out_width(), false)?;
        self.host_target = Pinned::new(&m.ctx, n * d, true)?;
        self.host_scores = Pinned::new(&m.ctx, n, false)?;
        self.host_contrib = Pinned::new(&m.ctx, n * d, false)?;
        self.capacity = n;
        Ok(())
    }

    /// Runs `head` on the device from now on ([`Self::score`]); `baseline` is the model's
    /// [`crate::score::prepare_member_baselines`] for it, as the host head takes it.
    ///
    /// # Errors
    /// The constants cannot be uploaded.
    pub fn set_head(&mut self, head: &Head, baseline: &[f32]) -> Result<(), CudaError> {
        let m = &*self.model;
        let d = m.n_features;
        let members = (m.recon_width / d.max(1)).max(1);
        let block = baseline.len() / members;
        let has_var = m.output == OutputKind::Probabilistic;
        let lv = match (head.kind, has_var, head.log_variance) {
            (HeadKind::Wnll, false, _) => 3,
            (HeadKind::Wnll, true, LogVariance::Excess) if block == 3 * d => 1,
            (HeadKind::Wnll, true, LogVariance::Bounded) if block == 4 * d => 2,
            _ => 0,
        };
        let consts = if baseline.is_empty() {
            &[0.0][..]
        } else {
            baseline
        };
        let consts = guarded("uploading the score head", || {
            let c = self
                .stream
                .clone_htod(consts)
                .map_err(run_err("uploading the score head"))?;
            self.stream
                .synchronize()
                .map_err(run_err("uploading the score head"))?;
            Ok(c)
        })?;
        self.head = Some(SessionHead {
            kind: match head.kind {
                HeadKind::Mse => 0,
                HeadKind::MaxAbs => 1,
                HeadKind::Wnll => 2,
            },
            lv,
            alpha: head.alpha,
            beta: head.beta,
            consts,
            block: block as u32,
        });
        // The captured scoring graphs hold the old head's parameters.
        for slot in &mut self.graphs[GRAPH_MAX_ROWS..] {
            *slot = None;
        }
        Ok(())
    }

    /// Enqueues `pass` for the first `n` rows of `host_in` (and `host_target`): upload,
    /// every layer, then either the last layer back into `host_out`, or the score head and
    /// its scores and contributions back into `host_scores` and `host_contrib`. Nothing is
    /// synchronised.
    fn enqueue(&mut self, n: usize, pass: Pass) -> Result<(), CudaError> {
        let m = &*self.model;
        let d = m.n_features;
        copy_htod(
            &self.stream,
            &self.host_in.as_slice()[..n * d],
            &mut self.acts[0],
            "copying the batch to the GPU",
        )?;
        if pass == Pass::ScoreShifted {
            copy_htod(
                &self.stream,
                &self.host_target.as_slice()[..n * d],
                &mut self.target,
                "copying the mean-shifted targets to the GPU",
            )?;
        }
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
        if pass == Pass::Forward {
            return copy_dtoh(
                &self.stream,
                &self.acts[m.layers.len()],
                &mut self.host_out.as_mut_slice()[..n * w],
                "copying the output back",
            );
        }
        let head = self.head.as_ref().ok_or_else(|| CudaError::Run {
            what: "score",
            reason: "no score head was set on the session".into(),
        })?;
        let x = if pass == Pass::ScoreShifted {
            &self.target
        } else {
            &self.acts[0]
        };
        let (rows, d32, w32) = (n as u32, d as u32, w as u32);
        let members = (m.recon_width / d.max(1)).max(1) as u32;
        let var_at = if m.output == OutputKind::Probabilistic {
            m.recon_width as u32
        } else {
            0
        };
        let eps = crate::model::nn::VARIANCE_EPS;
        let launch = LaunchConfig {
            grid_dim: (rows.div_ceil(HEAD_ROWS_PER_BLOCK), 1, 1),
            block_dim: (32 * HEAD_ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = self.stream.launch_builder(&m.head);
        builder
            .arg(x)
            .arg(&self.acts[m.layers.len()])
            .arg(&rows)
            .arg(&d32)
            .arg(&members)
            .arg(&w32)
            .arg(&var_at)
            .arg(&head.kind)
            .arg(&head.lv)
            .arg(&head.alpha)
            .arg(&head.beta)
            .arg(&eps)
            .arg(&head.consts)
            .arg(&head.block)
            .arg(&mut self.contrib)
            .arg(&mut self.scores);
        // SAFETY: x, contributions and targets hold capacity ≥ n rows of d floats, the
        // output n rows of w ≥ var_at + members·d, the scores n; the constants `members`
        // blocks of `block` (the kernel reads them only for the lv that needs them, which
        // `set_head` picked from their length); the argument types match the signature.
        unsafe { builder.launch(launch) }.map_err(run_err("launching ae_head"))?;
        copy_dtoh(
            &self.stream,
            &self.scores,
            &mut self.host_scores.as_mut_slice()[..n],
            "copying the scores back",
        )?;
        copy_dtoh(
            &self.stream,
            &self.contrib,
            &mut self.host_contrib.as_mut_slice()[..n * d],
            "copying the contributions back",
        )
    }

    /// The graph for batches of `n` rows: the cached one, or a new capture. `None` above
    /// [`GRAPH_MAX_ROWS`] rows, or when graphs are off (after a failed capture).
    fn graph_for(&mut self, n: usize, pass: Pass) -> Option<&Graph> {
        if self.graphs_off.is_some() || n == 0 || n > GRAPH_MAX_ROWS {
            return None;
        }
        let slot = pass as usize * GRAPH_MAX_ROWS + n - 1;
        if self.graphs[slot].is_none() {
            self.capture(n, pass);
        }
        self.graphs[slot].as_ref()
    }

    /// Captures `pass` for batches of `n` rows into its slot, or turns graphs off (logging
    /// why once) when the capture fails.
    fn capture(&mut self, n: usize, pass: Pass) {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let captured = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(run_err("cuStreamBeginCapture"))
            .and_then(|()| {
                let queued = self.enqueue(n, pass);
                // End the capture whatever happened, so the stream is usable again.
                let ended = self
                    .stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(run_err("cuStreamEndCapture"));
                queued?;
                ended?.ok_or_else(|| CudaError::Run {
                    what: "cuStreamEndCapture",
                    reason: "captured nothing".into(),
                })
            });
        match captured {
            Ok(graph) => self.graphs[pass as usize * GRAPH_MAX_ROWS + n - 1] = Some(Graph(graph)),
            Err(e) => {
                tracing::warn!(error = %e, "CUDA graph capture failed; small batches are launched call by call");
                self.graphs_off = Some(e.to_string());
                self.graphs.fill_with(|| None);
            }
        }
    }

    /// Uploads `x` (and `target`, for [`Pass::ScoreShifted`]), and runs `pass`.
    fn run(
        &mut self,
        x: ArrayView2<f32>,
        target: Option<ArrayView2<f32>>,
        pass: Pass,
    ) -> Result<(), CudaError> {
        let (n, d) = x.dim();
        let m = &*self.model;
        if d != m.n_features {
            return Err(CudaError::Run {
                what: "forward",
                reason: format!("input has {d} features, the model takes {}", m.n_features),
            });
        }
        if let Some(t) = target
            && t.dim() != x.dim()
        {
            return Err(CudaError::Run {
                what: "score",
                reason: format!("targets are {:?}, the input {:?}", t.dim(), x.dim()),
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
        fill(&mut self.host_in.as_mut_slice()[..n * d], x);
        if let Some(t) = target {
            fill(&mut self.host_target.as_mut_slice()[..n * d], t);
        }
        match self.graph_for(n, pass) {
            Some(g) => g.0.launch().map_err(run_err("cuGraphLaunch"))?,
            None => self.enqueue(n, pass)?,
        }
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
            guarded("the CUDA forward pass", || self.run(x, None, Pass::Forward))?;
        }
        let w = self.out_width();
        let all =
            ArrayView2::from_shape((n, w), &self.host_out.as_slice()[..n * w]).map_err(|e| {
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

impl CudaSession {
    /// Scores scaled rows `x` on the device: the network, then the head set by
    /// [`Self::set_head`], against `target` (the mean-shifted rows) when given, else against
    /// `x`. Returns the `n` scores and the `n × d` contributions (row-major), in this
    /// session's pinned buffers: all that comes back from the GPU.
    ///
    /// # Errors
    /// No head was set, `x` or `target` has the wrong shape, or a CUDA, cuBLAS or launch
    /// failure.
    pub fn score(
        &mut self,
        x: ArrayView2<f32>,
        target: Option<ArrayView2<f32>>,
    ) -> Result<(&[f32], &[f32]), CudaError> {
        if self.head.is_none() {
            return Err(CudaError::Run {
                what: "score",
                reason: "no score head was set on the session".into(),
            });
        }
        let n = x.nrows();
        let pass = if target.is_some() {
            Pass::ScoreShifted
        } else {
            Pass::Score
        };
        if n > 0 {
            guarded("the CUDA scoring pass", || self.run(x, target, pass))?;
        }
        let d = self.model.n_features;
        Ok((
            &self.host_scores.as_slice()[..n],
            &self.host_contrib.as_slice()[..n * d],
        ))
    }
}

/// Copies `src`'s rows into `dst` (row-major, `src.len()` floats).
fn fill(dst: &mut [f32], src: ArrayView2<f32>) {
    match src.as_slice() {
        Some(v) => dst.copy_from_slice(v),
        None => {
            for (o, v) in dst.iter_mut().zip(src.iter()) {
                *o = *v;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// SAE forward on the device.

/// Largest `k` the device TopK kernel takes.
pub const SAE_MAX_K: usize = 256;
/// Threads per block of the TopK kernel: `WARPS` = 8 warps, each a row or a segment of one
/// (the kernel's shared candidate buffers are sized for that).
const TOPK_THREADS: u32 = 256;
/// Candidates a TopK warp keeps: 4k as a power of two, 64 to 512 (the kernel's `buf`). A
/// block's shared memory holds its 8 warps' buffers of values and indices.
fn topk_buffer(k: usize) -> u32 {
    (4 * k).clamp(64, 512).next_power_of_two() as u32
}
/// Warps per row the TopK kernel can split a row into (divisors of its 8 warps per block).
pub const SAE_TOPK_PARTS: [u32; 4] = [1, 2, 4, 8];
/// The TopK kernel splits rows until the batch gives this many warps per SM (or a segment
/// would be shorter than [`TOPK_MIN_SEGMENT`] latents, or the row is in 8 parts). Each warp
/// sorts its candidates a few times, so a split costs: on an H100 (132 SMs, 768 × 32768,
/// k = 32) one warp per row was fastest at 4096 rows (0.37 ms; 2 parts 0.38, 8 parts 0.75),
/// 4 or 8 at 256 rows (84 and 80 µs against 157), 8 at 16 rows and at one (63 µs against
/// 130).
const TOPK_WARPS_PER_SM: usize = 7;
/// Shortest row segment a TopK warp scans: shorter ones spend more on the merge than they
/// save on the scan.
const TOPK_MIN_SEGMENT: usize = 2048;
/// Input buffers of a device SAE, so forwards in flight: one uploads while the other
/// computes, and the host fills the freed one meanwhile. Three measured slower on an H200
/// (1.64 against 1.33 ms per streamed batch of 4096 x 768, TF32): the bound there is the
/// host writing the pinned buffers.
pub const SAE_SLOTS: usize = 2;
/// Stages of the SAE forward: upload, prep, encoder GEMM, TopK, decode, download.
const SAE_STAGES: usize = 6;
/// Most latents the device SAE takes (indices are u32, with `u32::MAX` meaning none).
const SAE_MAX_LATENTS: usize = 1 << 24;

/// The SAE kernels: input preparation, per-row TopK (with `b_enc` and the ReLU), and the
/// sparse decode with the squared error norm.
const SAE_KERNELS: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
#define NONE 0xffffffffu
// The TopK kernel: warps per block (each a row, or a segment of one).
#define WARPS 8

// The sum of v over the block's threads, in double; every thread gets the same value (each
// sums the warps' partials in the same order). `part` holds 32 doubles.
__device__ double block_sum(double v, double* part) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();  // a previous call's partials are read
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double s = 0.0;
    for (unsigned w = 0; w < (blockDim.x + 31u) / 32u; ++w) s += part[w];
    return s;
}

// Input preparation, one block per row, as the host's prepare_inputs: norm_in by `mode`
// (0 none; 1 a fixed scale s; 2 constant_norm_rescale, c = sqrt(d) / ||x||; 3 layer_norm,
// (x - mean) / (std + 1e-5) with the unbiased std), then - b_dec when `sub`. The row's
// norm_out, y * mul + add, goes to denorm[2r], denorm[2r + 1]. Sums in double, as on the
// host.
extern "C" __global__ void sae_prep(const float* x, float* xin, const float* b_dec,
                                    unsigned d, int mode, float s, int sub, float* denorm) {
    __shared__ double part[32];
    unsigned r = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    const float* xr = x + (size_t)r * d;
    float* out = xin + (size_t)r * d;
    float mul_in = 1.0f, mul = 1.0f, add = 0.0f;
    double mean = 0.0, inv = 1.0;
    if (mode == 1) {
        mul_in = s;
        mul = 1.0f / s;
    } else if (mode == 2) {
        double sq = 0.0;
        for (unsigned c = t; c < d; c += nt) sq += (double)xr[c] * (double)xr[c];
        sq = block_sum(sq, part);
        mul_in = (float)(sqrt((double)d) / sqrt(sq));
        mul = 1.0f / mul_in;
    } else if (mode == 3) {
        double sum = 0.0;
        for (unsigned c = t; c < d; c += nt) sum += (double)xr[c];
        mean = block_sum(sum, part) / (double)d;
        double ss = 0.0;
        for (unsigned c = t; c < d; c += nt) {
            double u = (double)xr[c] - mean;
            ss += u * u;
        }
        double sd = sqrt(block_sum(ss, part) / ((double)d - 1.0));
        inv = 1.0 / (sd + (double)1e-5f);
        mul = (float)sd;
        add = (float)mean;
    }
    for (unsigned c = t; c < d; c += nt) {
        float v = mode == 3 ? (float)(((double)xr[c] - mean) * inv) : xr[c] * mul_in;
        if (sub) v -= b_dec[c];
        out[c] = v;
    }
    if (t == 0) {
        denorm[2 * r] = mul;
        denorm[2 * r + 1] = add;
    }
}

// (v, i) ranks before (w, j): the larger value, then the lower index (NaN never does).
__device__ __forceinline__ bool before(float v, unsigned i, float w, unsigned j) {
    return v > w || (v == w && i < j);
}

// Sorts the first `buf` (a power of two) entries of a warp's candidate buffer into rank
// order, best first (bitonic).
__device__ void sort_buffer(float* bv, unsigned* bi, unsigned buf, unsigned lane) {
    for (unsigned size = 2; size <= buf; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned t = lane; t < buf / 2; t += 32) {
                unsigned lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
                float a = bv[lo], b = bv[hi];
                unsigned ai = bi[lo], bj = bi[hi];
                // Best first within blocks whose bit `size` is clear, worst first otherwise.
                bool swap = (lo & size) == 0 ? before(b, bj, a, ai) : before(a, ai, b, bj);
                if (swap) { bv[lo] = b; bi[lo] = bj; bv[hi] = a; bi[hi] = ai; }
            }
            __syncwarp();
        }
    }
}

// Pads the buffer from `count` to `buf` with entries that rank after everything, then sorts.
// Not inlined: the scan offers 16 latents per lane per step, and a copy of the sort at each
// of those call sites would spread the hot loop (compare and vote) over far more code than
// the instruction cache holds.
__device__ __noinline__ void pad_and_sort(float* bv, unsigned* bi, unsigned count, unsigned buf,
                             unsigned lane) {
    for (unsigned t = count + lane; t < buf; t += 32) { bv[t] = NEG_INF; bi[t] = NONE; }
    __syncwarp();
    sort_buffer(bv, bi, buf, lane);
}

// A warp's candidate state while it scans a row (every lane holds the same copy).
struct Candidates {
    float* bv;
    unsigned* bi;
    unsigned buf, k, lane, below, count;
    float tv;      // the threshold: the k-th best candidate after the last cut
    unsigned ti;
    bool open;     // no cut yet: every latent is a candidate
};

// Offers latent j (value u, `valid` false past the row's end) to the warp's buffer. Every
// lane of the warp calls it together.
__device__ __forceinline__ void consider(Candidates& c, float u, unsigned j, bool valid) {
    bool in = valid && (c.open ? !(u != u) : before(u, j, c.tv, c.ti));
    unsigned vote = __ballot_sync(0xffffffffu, in);
    if (vote == 0) return;
    if (c.count + __popc(vote) > c.buf) {
        pad_and_sort(c.bv, c.bi, c.count, c.buf, c.lane);
        c.count = c.k;
        c.tv = c.bv[c.k - 1];
        c.ti = c.bi[c.k - 1];
        c.open = false;
        in = valid && before(u, j, c.tv, c.ti);
        vote = __ballot_sync(0xffffffffu, in);
    }
    if (in) {
        unsigned slot = c.count + __popc(vote & c.below);
        c.bv[slot] = u;
        c.bi[slot] = j;
    }
    c.count += __popc(vote);
    __syncwarp();
}

// Offers latents [lo, hi) of a row (`p`, its pre-activations before b_enc) to the warp's
// candidates, in one pass. `vec`: d_sae and lo are multiples of 4, so the pass loads float4.
__device__ __forceinline__ void scan(Candidates& c, const float* p, const float* b_enc, unsigned lo,
                     unsigned hi, bool vec) {
    unsigned lane = c.lane;
    if (vec) {
        // Four float4 loads (16 latents) in flight per lane before any is used: the row
        // comes from HBM, and fewer bytes in flight leave the scan latency-bound.
        const float4* p4 = (const float4*)(p + lo);
        const float4* b4 = (const float4*)(b_enc + lo);
        unsigned n4 = (hi - lo) >> 2;
        for (unsigned base = 0; base < n4; base += 4 * 32) {
            float4 u[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                unsigned m = base + q * 32 + lane;
                if (m < n4) {
                    // The row is read once (evict first); b_enc by every row (cached).
                    float4 a = __ldcs(p4 + m), e = __ldg(b4 + m);
                    u[q] = make_float4(a.x + e.x, a.y + e.y, a.z + e.z, a.w + e.w);
                } else {
                    u[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                unsigned m = base + q * 32 + lane;
                bool ok = m < n4;
                unsigned j = lo + 4 * m;
                consider(c, u[q].x, j, ok);
                consider(c, u[q].y, j + 1, ok);
                consider(c, u[q].z, j + 2, ok);
                consider(c, u[q].w, j + 3, ok);
            }
        }
    } else {
        for (unsigned base = lo; base < hi; base += 8 * 32) {
            float u[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                unsigned j = base + q * 32 + lane;
                u[q] = j < hi ? __ldcs(p + j) + __ldg(b_enc + j) : 0.0f;
            }
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                unsigned j = base + q * 32 + lane;
                consider(c, u[q], j, j < hi);
            }
        }
    }
}

// Per-row TopK, with `parts` warps per row (1, 2, 4 or 8: a divisor of WARPS, so a row's
// warps share a block). Warp q scans the q-th of `parts` segments of the row (a multiple of 4
// latents each) in one pass. It keeps a candidate buffer in shared memory and a threshold,
// the k-th best candidate so far (none at first): a latent that ranks before the threshold
// is appended (ballot, so the common case is a compare and a vote). When the buffer would
// overflow it is sorted and cut to its best k, which raises the threshold. At the end the
// buffer is sorted once more; its first k, in rank order (ties: lower index), are the
// segment's TopK. With parts > 1 the row's first warp then offers the other segments' TopK
// to its own buffer, past its own k-th best (a row's k-th best ranks no lower than any
// segment's), and sorts once more: the row's TopK, the same as one warp's pass over the
// whole row. Splitting a row puts more warps, each with its loads in flight, on the HBM
// when a batch has too few rows to fill the GPU with one warp each.
// The first at or below 0 ends the row: the ReLU drops it and all after it (index NONE,
// value 0). The buffer holds `buf` = 4k candidates (a power of two, 64 to 512, from the host): a cut then
// frees 3k slots, and a segment of N latents is cut about 1 + ln(N / 4k) / 3 times, each a
// sort of 4k (small sorts are cheap; the scan dominates). Needs k <= buf / 2, so a cut frees
// >= 32 slots.
extern "C" __global__ void sae_topk(const float* pre, const float* b_enc, unsigned rows,
                                    unsigned d_sae, unsigned k, unsigned buf, unsigned parts,
                                    unsigned* idx, float* val) {
    // Shared memory, sized by the launch for `buf` (topk_buffer on the host): WARPS
    // buffers of `buf` values, then WARPS of `buf` indices. A small buffer leaves the SM
    // more of its L1 for b_enc, which every row reads.
    extern __shared__ float smem[];
    unsigned* smem_i = (unsigned*)(smem + WARPS * buf);
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    unsigned unit = blockIdx.x * WARPS + warp;
    unsigned row = unit / parts, part = unit % parts;
    // Past the last row a warp still reaches the block's barrier (parts > 1).
    bool live = row < rows;
    float* bv = smem + warp * buf;
    unsigned* bi = smem_i + warp * buf;
    unsigned seg = ((d_sae + parts - 1) / parts + 3u) & ~3u;
    unsigned lo = min(part * seg, d_sae), hi = min(lo + seg, d_sae);
    unsigned below = (1u << lane) - 1u;
    if (live) {
        Candidates c = {bv, bi, buf, k, lane, below, 0u, NEG_INF, NONE, true};
        scan(c, pre + (size_t)row * d_sae, b_enc, lo, hi, (d_sae & 3u) == 0);
        pad_and_sort(bv, bi, c.count, buf, lane);
    }
    if (parts > 1) {
        __syncthreads();
        if (live && part == 0) {
            // Its buffer's first k are its segment's best, in rank order.
            Candidates c = {bv, bi, buf, k, lane, below, k, bv[k - 1], bi[k - 1], false};
            for (unsigned q = 1; q < parts; ++q) {
                const float* ov = smem + (warp + q) * buf;
                const unsigned* oi = smem_i + (warp + q) * buf;
                for (unsigned s = 0; s < k; s += 32) {
                    unsigned t = s + lane;
                    bool ok = t < k;
                    float v = ok ? ov[t] : NEG_INF;
                    unsigned i = ok ? oi[t] : NONE;
                    consider(c, v, i, ok && i != NONE);
                }
            }
            pad_and_sort(bv, bi, c.count, buf, lane);
        }
    }
    if (!live || part != 0) return;
    unsigned* out_i = idx + (size_t)row * k;
    float* out_v = val + (size_t)row * k;
    for (unsigned s = lane; s < k; s += 32) {
        float v = bv[s];
        unsigned i = bi[s];
        bool keep = i != NONE && v > 0.0f;
        out_i[s] = keep ? i : NONE;
        out_v[s] = keep ? v : 0.0f;
    }
}

// ReLU and JumpReLU SAEs, in place on the encoder's output: f = p where p > thr and p > 0,
// else 0 (NaN gives 0, as on the host), with p = pre + b_enc. thr is 0 for ReLU.
extern "C" __global__ void sae_jumprelu(float* pre, const float* b_enc, const float* thr,
                                        unsigned rows, unsigned d_sae) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * d_sae) return;
    unsigned j = (unsigned)(i % d_sae);
    float p = pre[i] + b_enc[j];
    pre[i] = (p > thr[j] && p > 0.0f) ? p : 0.0f;
}

// Column c of row r's reconstruction, as sae_decode and sae_detect both need it:
// (b_dec + the dense decoder's row of f W_dec, or the k active latents' rows of W_dec)
// * mul + add, the row's norm_out (sae_prep).
__device__ __forceinline__ float recon_at(unsigned r, unsigned c, unsigned d,
                                          const float* b_dec, const float* xhat, int dense,
                                          const unsigned* sidx, const float* sval, unsigned k,
                                          const float* w_dec, float mul, float add) {
    float y = b_dec[c];
    if (dense) y += xhat[(size_t)r * d + c];
    for (unsigned s = 0; s < k; ++s) {
        unsigned j = sidx[s];
        if (j != NONE) y += sval[s] * w_dec[(size_t)j * d + c];
    }
    return y * mul + add;
}

// One block per row: x_hat = (b_dec + sum_s val_s W_dec[idx_s]) * mul + add, e = x - x_hat,
// err_sq = sum e^2 (accumulated in double, as on the host). For a dense SAE (ReLU,
// JumpReLU) k is 0 and `dense` adds the decoder GEMM's row of f W_dec from xhat instead.
extern "C" __global__ void sae_decode(const float* x, const float* w_dec, const float* b_dec,
                                      const unsigned* idx, const float* val, unsigned d,
                                      unsigned k, const float* denorm, const float* xhat,
                                      int dense,
                                      float* err_sq) {
    __shared__ unsigned sidx[256];
    __shared__ float sval[256];
    __shared__ double part[32];
    unsigned r = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    float mul = denorm[2 * r], add = denorm[2 * r + 1];
    for (unsigned s = t; s < k; s += nt) {
        sidx[s] = idx[(size_t)r * k + s];
        sval[s] = val[(size_t)r * k + s];
    }
    __syncthreads();
    double acc = 0.0;
    for (unsigned c = t; c < d; c += nt) {
        float y = recon_at(r, c, d, b_dec, xhat, dense, sidx, sval, k, w_dec, mul, add);
        float e = x[(size_t)r * d + c] - y;
        acc += (double)e * (double)e;
    }
    double sum = block_sum(acc, part);
    if (t == 0) err_sq[r] = (float)sum;
}

// Contributions rank as on the host (top_k_indices): NaN first, then the larger value,
// then the lower index.
__device__ __forceinline__ bool ranks_before(float v, unsigned i, float w, unsigned j) {
    bool vn = isnan(v), wn = isnan(w);
    if (vn != wn) return vn;
    if (!vn && v != w) return v > w;
    return i < j;
}

// The better of (v, i) and the candidate (w, j); NONE marks no candidate.
__device__ __forceinline__ void keep_best(float& v, unsigned& i, float w, unsigned j) {
    if (j != NONE && (i == NONE || ranks_before(w, j, v, i))) {
        v = w;
        i = j;
    }
}

// One block per row: the reconstruction and error as in sae_decode, then the dark-matter
// head on the device. Per row: the score of `kind` (0 ||e||^2, 1 ||e - (x A + b)||^2,
// 2 (||e||^2 - max(0, x.w + c)) / sigma), the contributions into `contrib` (e_j^2, or the
// unexplained (e_j - e_hat_j)^2 for kind 1), and the `top` largest of them, ranked as on
// the host. e_hat holds x A (read for kind 1 only). Sums in double: more exact than the
// host's f32 sums, so the two differ by the host's rounding.
extern "C" __global__ void sae_detect(const float* x, const float* w_dec, const float* b_dec,
                                      const unsigned* idx, const float* val, unsigned d,
                                      unsigned k, const float* denorm, const float* xhat,
                                      int dense,
                                      const float* e_hat,
                                      const float* head_b, const float* head_w, float head_c,
                                      float sigma, int kind, unsigned top, float* contrib,
                                      float* score, unsigned* top_idx, float* top_val) {
    __shared__ unsigned sidx[256];
    __shared__ float sval[256];
    __shared__ double part[32];
    __shared__ float best_v[32];
    __shared__ unsigned best_i[32];
    unsigned r = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    float mul = denorm[2 * r], add = denorm[2 * r + 1];
    unsigned lane = t & 31, warp = t >> 5, warps = (nt + 31) / 32;
    for (unsigned s = t; s < k; s += nt) {
        sidx[s] = idx[(size_t)r * k + s];
        sval[s] = val[(size_t)r * k + s];
    }
    __syncthreads();
    const float* xr = x + (size_t)r * d;
    float* cr = contrib + (size_t)r * d;
    double sq = 0.0, rest = 0.0, pred = 0.0;
    for (unsigned c = t; c < d; c += nt) {
        float y = recon_at(r, c, d, b_dec, xhat, dense, sidx, sval, k, w_dec, mul, add);
        float xv = xr[c];
        float e = xv - y;
        float u = e * e;
        sq += (double)e * (double)e;
        pred += (double)xv * (double)head_w[c];
        if (kind == 1) {
            float f = e - (e_hat[(size_t)r * d + c] + head_b[c]);
            u = f * f;
            rest += (double)f * (double)f;
        }
        cr[c] = u;
    }
    double a = block_sum(sq, part), b = block_sum(rest, part), p = block_sum(pred, part);
    if (t == 0) {
        float s = (float)a;
        if (kind == 1) s = (float)b;
        // The predicted ‖e‖² is clamped at 0, as DarkHead::score does (NaN stays NaN).
        float pr = (float)p + head_c;
        if (pr < 0.0f) pr = 0.0f;
        if (kind == 2) s = ((float)a - pr) / sigma;
        score[r] = s;
    }
    // The top contributions, one per round: a block-wide best, then marked taken (-inf:
    // a contribution is a square, never -inf). __syncthreads orders the block's global
    // writes to `contrib` before the next round reads them.
    for (unsigned m = 0; m < top; ++m) {
        float v = NEG_INF;
        unsigned i = NONE;
        for (unsigned c = t; c < d; c += nt) {
            float u = cr[c];
            if (u != NEG_INF) keep_best(v, i, u, c);
        }
        for (int off = 16; off > 0; off >>= 1) {
            float w = __shfl_down_sync(0xffffffffu, v, off);
            unsigned j = __shfl_down_sync(0xffffffffu, i, off);
            keep_best(v, i, w, j);
        }
        if (lane == 0) {
            best_v[warp] = v;
            best_i[warp] = i;
        }
        __syncthreads();
        if (t == 0) {
            for (unsigned w = 1; w < warps; ++w) keep_best(v, i, best_v[w], best_i[w]);
            top_idx[(size_t)r * top + m] = i;
            top_val[(size_t)r * top + m] = i == NONE ? 0.0f : v;
            if (i != NONE) cr[i] = NEG_INF;
        }
        __syncthreads();
    }
}
"#;

/// An SAE on a GPU: weights uploaded once, buffers for `capacity` rows. Its forward runs
/// the input preparation, the encoder GEMM (cuBLAS), TopK with `b_enc` and ReLU, the sparse
/// decode and the squared error norm on the device (a ReLU or JumpReLU SAE: the activation
/// in place, then the decoder as a second GEMM); only ‖e‖² per row comes back (the
/// active latents on request). Loaded as a detector ([`Self::load_detector`]), the
/// dark-matter head runs on the device as well (its x·A GEMM for the `nonlinear` score, then
/// one launch with a block per row for the error, the chosen score and the top
/// contributions), and a row's result is its chosen score, with its top contributions beside it
/// ([`Self::top_contributions`]).
///
/// Supported: `TopK` activation with `k` ≤ [`SAE_MAX_K`], ReLU and JumpReLU, `d_sae` ≤
/// 2^24, every input normalisation (`none`, `expected_average_only_in` with or without a
/// scaling factor, `constant_norm_rescale`, `layer_norm`). Others are refused with
/// [`CudaError::Unsupported`].
pub struct CudaSae {
    /// Runs the kernels, the GEMM and the copies back.
    stream: Arc<CudaStream>,
    /// Runs the uploads, so that one batch uploads while the previous one computes.
    copy: Arc<CudaStream>,
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
    /// The device copy of each input buffer.
    x: Vec<CudaSlice<f32>>,
    xin: CudaSlice<f32>,
    pre: CudaSlice<f32>,
    idx: CudaSlice<u32>,
    val: CudaSlice<f32>,
    err_sq: CudaSlice<f32>,
    /// [`SAE_SLOTS`] pinned input buffers `[capacity, d_in]` (write-combined: the host only
    /// writes them): the host fills one while the GPU uploads and scores the others.
    host_x: Vec<Pinned>,
    /// The pinned buffers each input buffer's errors come back into.
    host_err: Vec<Pinned>,
    /// Per input buffer: its upload finished, so the host may refill it.
    uploaded: Vec<cudarc::driver::CudaEvent>,
    /// Per input buffer: the decode that read its device copy finished, so the next upload
    /// may overwrite it.
    consumed: Vec<cudarc::driver::CudaEvent>,
    /// Per input buffer: its errors are in host memory.
    done: Vec<cudarc::driver::CudaEvent>,
    /// The input buffer [`Self::input_mut`] hands out and the next submit sends.
    slot: usize,
    /// The forwards submitted and not yet waited for, oldest first: (buffer, rows).
    in_flight: std::collections::VecDeque<(usize, usize)>,
    /// Rows of the last forward enqueued (what `idx` and `val` hold once it is done).
    last_rows: usize,
    /// The input buffer and rows of the result last handed out (what
    /// [`Self::top_contributions`] reads).
    shown: (usize, usize),
    /// The dark-matter head, when loaded as a detector ([`Self::load_detector`]).
    head: Option<DeviceHead>,
    /// A ReLU or JumpReLU SAE (`k` = 0): its activation and threshold; the decoder is then a
    /// GEMM into `xhat`.
    dense: Option<DenseSae>,
    /// `[capacity, 2]`: each row's norm_out (mul, add), written by the prep kernel.
    denorm: CudaSlice<f32>,
    /// The SAE's input normalisation, as the prep kernel takes it.
    norm: NormMode,
    /// `[capacity, d_in]`: f·W_dec for a dense SAE (one placeholder value otherwise).
    xhat: CudaSlice<f32>,
    name: String,
    /// The GPU's streaming multiprocessors, for the TopK kernel's split ([`Self::topk_parts`]).
    sms: usize,
    /// Warps per row for the TopK kernel, when set by [`Self::set_topk_parts`].
    topk_parts: Option<u32>,
}

/// An SAE's input normalisation as the prep kernel's `mode` and `s` (see its comment).
#[derive(Debug, Clone, Copy)]
struct NormMode {
    mode: i32,
    s: f32,
}

impl NormMode {
    fn of(n: crate::sae::Normalization) -> NormMode {
        use crate::sae::Normalization;
        let (mode, s) = match n {
            Normalization::None
            | Normalization::ExpectedAverageOnlyIn {
                scaling_factor: None,
            } => (0, 1.0),
            Normalization::ExpectedAverageOnlyIn {
                scaling_factor: Some(s),
            } => (1, s),
            Normalization::ConstantNormRescale => (2, 1.0),
            Normalization::LayerNorm => (3, 1.0),
        };
        NormMode { mode, s }
    }
}

/// The activation of a ReLU or JumpReLU SAE on the device.
struct DenseSae {
    act: CudaFunction,
    /// `[d_sae]`: JumpReLU's threshold, 0 for ReLU.
    threshold: CudaSlice<f32>,
}

/// The dark-matter head on the device: a forward then brings back per row only the chosen
/// score and its `top` largest contributions.
struct DeviceHead {
    detect: CudaFunction,
    /// `[d, d]` row-major: ê (row) = x (row)·A + b.
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    /// Predicted ‖e‖² = max(0, x·w + c) (clamped in the kernel, as on the host).
    w: CudaSlice<f32>,
    c: f32,
    sigma: f32,
    kind: SaeScoreKind,
    top: usize,
    /// `[capacity, d]`: x·A (allocated for the `nonlinear` score only).
    e_hat: CudaSlice<f32>,
    /// `[capacity, d]`: each row's contributions, consumed by the top-k rounds.
    contrib: CudaSlice<f32>,
    top_idx: CudaSlice<u32>,
    top_val: CudaSlice<f32>,
    /// Per input buffer, the pinned buffers its top contributions come back into.
    host_idx: Vec<Pinned<u32>>,
    host_val: Vec<Pinned<f32>>,
}

impl DeviceHead {
    fn kind_code(&self) -> i32 {
        match self.kind {
            SaeScoreKind::ErrorNorm => 0,
            SaeScoreKind::Nonlinear => 1,
            SaeScoreKind::Deviation => 2,
        }
    }
}

/// Seconds per batch spent in each stage of [`CudaSae::forward_input`], each stage timed
/// alone (synchronised before and after), so their sum exceeds a pipelined forward.
#[derive(Debug, Clone, Copy, Default)]
pub struct SaeStages {
    pub upload: f64,
    pub prep: f64,
    pub encoder_gemm: f64,
    /// TopK, or a ReLU/JumpReLU SAE's activation.
    pub topk: f64,
    /// The decode (a dense SAE's decoder GEMM included, and a detector's head).
    pub decode: f64,
    pub download: f64,
}

impl SaeStages {
    /// One line, in milliseconds.
    pub fn describe(&self) -> String {
        format!(
            "upload {:.3} ms, prep {:.3}, encoder GEMM {:.3}, TopK {:.3}, decode {:.3}, \
             download {:.3}",
            self.upload * 1e3,
            self.prep * 1e3,
            self.encoder_gemm * 1e3,
            self.topk * 1e3,
            self.decode * 1e3,
            self.download * 1e3
        )
    }
}

impl Drop for CudaSae {
    fn drop(&mut self) {
        // Work still in flight (submitted, never waited for) uses the buffers about to be
        // freed.
        let _ = self.copy.synchronize();
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaSae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSae")
            .field("d_in", &self.d_in)
            .field("d_sae", &self.d_sae)
            .field("k", &self.k)
            .field("dense", &self.dense.is_some())
            .field("head", &self.head.as_ref().map(|h| h.kind.name()))
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
        Self::load_with(sae, None, max_batch, cfg)
    }

    /// As [`Self::load`], with the dark-matter head `head` on the device too: a forward's
    /// result is then each row's `kind` score, and [`Self::top_contributions`] its `top`
    /// largest contributions (the same the host's [`crate::sae::detector::SaeScorer`]
    /// computes). The host input buffers are plain pinned memory, since the caller reads
    /// them as well (not write-combined, which the host reads very slowly).
    ///
    /// # Errors
    /// As [`Self::load`], or a head of another width.
    pub fn load_detector(
        sae: &crate::sae::Sae,
        head: &DarkHead,
        kind: SaeScoreKind,
        top: usize,
        max_batch: usize,
        cfg: &CudaConfig,
    ) -> Result<CudaSae, CudaError> {
        if head.d() != sae.d_in() {
            return Err(CudaError::Unsupported(format!(
                "a dark-matter head of width {} for an SAE of d_in {}",
                head.d(),
                sae.d_in()
            )));
        }
        Self::load_with(sae, Some((head, kind, top)), max_batch, cfg)
    }

    /// Whether this kernel set covers `sae` with batches of `max_batch` rows: TopK with
    /// k ≤ [`SAE_MAX_K`], ReLU or JumpReLU (then k is 0), at most 2^24 latents (any input
    /// normalisation), and batches of at most 2^32 values. Needs no GPU; returns k.
    ///
    /// # Errors
    /// [`CudaError::Unsupported`], naming what is not covered.
    pub fn check(sae: &crate::sae::Sae, max_batch: usize) -> Result<usize, CudaError> {
        use crate::sae::SaeActivation;
        let unsupported = |what: String| Err(CudaError::Unsupported(what));
        let k = match sae.activation() {
            SaeActivation::TopK { k } if k <= SAE_MAX_K => k,
            SaeActivation::TopK { k } => {
                return unsupported(format!("TopK k = {k} (the kernel takes ≤ {SAE_MAX_K})"));
            }
            // Dense: the decoder is a GEMM over every latent.
            SaeActivation::Relu | SaeActivation::JumpRelu => 0,
        };
        let (d_in, d_sae) = (sae.d_in(), sae.d_sae());
        if d_sae > SAE_MAX_LATENTS {
            return unsupported(format!("{d_sae} latents (≤ {SAE_MAX_LATENTS})"));
        }
        // The element-wise kernels index a batch in 32 bits.
        if max_batch.max(1).saturating_mul(d_in) > u32::MAX as usize {
            return unsupported(format!(
                "batches of {max_batch} rows of {d_in} (the kernels take at most 2^32 \
                 values per batch)"
            ));
        }
        Ok(k)
    }

    /// What can be checked before uploading anything: [`Self::check`] for batches of
    /// `max_batch` rows, the driver, device `cfg.device`, cuBLAS and NVRTC, and that the
    /// SAE kernels compile and load for this GPU. Allocates no buffers (so it can run
    /// beside a scorer that holds the device's memory); returns the device's name.
    ///
    /// # Errors
    /// The first of these that fails.
    pub fn preflight(
        sae: &crate::sae::Sae,
        max_batch: usize,
        cfg: &CudaConfig,
    ) -> Result<String, CudaError> {
        Self::check(sae, max_batch)?;
        let ctx = open_context(cfg.device)?;
        check_libraries()?;
        guarded("compiling the SAE kernels", || {
            load_kernels(&ctx, SAE_KERNELS, "darkwatch_sae.cu")?;
            ctx.name().map_err(run_err("cuDeviceGetName"))
        })
    }

    fn load_with(
        sae: &crate::sae::Sae,
        head: Option<(&DarkHead, SaeScoreKind, usize)>,
        max_batch: usize,
        cfg: &CudaConfig,
    ) -> Result<CudaSae, CudaError> {
        let k = Self::check(sae, max_batch)?;
        let (d_in, d_sae) = (sae.d_in(), sae.d_sae());
        let b_enc = sae.b_enc().to_vec();
        let norm = NormMode::of(sae.normalization());
        let mut w_enc = vec![0.0f32; d_in * d_sae];
        for (i, row) in w_enc.chunks_exact_mut(d_sae).enumerate() {
            for (j, w) in row.iter_mut().enumerate() {
                *w = sae.w_enc_at(i, j);
            }
        }
        let w_dec: Vec<f32> = sae.w_dec().iter().copied().collect();
        // ReLU and JumpReLU: the activation's threshold (0 for ReLU; the kernel also
        // requires p > 0, as the host does).
        let threshold: Option<Vec<f32>> = (k == 0).then(|| match sae.threshold() {
            Some(t) => t.iter().copied().collect(),
            None => vec![0.0; d_sae],
        });
        let b_dec: Vec<f32> = sae.b_dec().iter().copied().collect();

        let ctx = open_context(cfg.device)?;
        check_libraries()?;
        guarded("loading the SAE onto the GPU", || {
            let name = ctx.name().map_err(run_err("cuDeviceGetName"))?;
            let sms = ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .map_err(run_err("cuDeviceGetAttribute"))?;
            let module = load_kernels(&ctx, SAE_KERNELS, "darkwatch_sae.cu")?;
            let f = |n: &str| {
                module
                    .load_function(n)
                    .map_err(run_err("cuModuleGetFunction"))
            };
            let (prep, topk, decode) = (f("sae_prep")?, f("sae_topk")?, f("sae_decode")?);
            let detect = f("sae_detect")?;
            let jumprelu = f("sae_jumprelu")?;
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
            let event = || ctx.new_event(None).map_err(run_err("cuEventCreate"));
            fn slots<T>(make: impl Fn() -> Result<T, CudaError>) -> Result<Vec<T>, CudaError> {
                (0..SAE_SLOTS).map(|_| make()).collect()
            }
            let cap = max_batch.max(1);
            let alloc = run_err("allocating SAE buffers");
            let head = match head {
                None => None,
                Some((h, kind, top)) => {
                    let top = top.min(d_in);
                    let flat = |a: ndarray::ArrayView1<f32>| a.iter().copied().collect::<Vec<_>>();
                    let a: Vec<f32> = h.a().iter().copied().collect();
                    let (w, c) = h.norm_weights();
                    let e_hat_len = if kind == SaeScoreKind::Nonlinear {
                        cap * d_in
                    } else {
                        1
                    };
                    Some(DeviceHead {
                        detect,
                        a: stream.clone_htod(&a).map_err(&up)?,
                        b: stream.clone_htod(&flat(h.b().view())).map_err(&up)?,
                        w: stream.clone_htod(&flat(w.view())).map_err(&up)?,
                        c,
                        sigma: h.sigma(),
                        kind,
                        top,
                        e_hat: stream.alloc_zeros(e_hat_len).map_err(&alloc)?,
                        contrib: stream.alloc_zeros(cap * d_in).map_err(&alloc)?,
                        top_idx: stream.alloc_zeros((cap * top).max(1)).map_err(&alloc)?,
                        top_val: stream.alloc_zeros((cap * top).max(1)).map_err(&alloc)?,
                        host_idx: slots(|| Pinned::new(&ctx, cap * top, false))?,
                        host_val: slots(|| Pinned::new(&ctx, cap * top, false))?,
                    })
                }
            };
            // A detector's caller reads its inputs too: no write-combining there.
            let write_combined = head.is_none();
            let dense = match &threshold {
                None => None,
                Some(t) => Some(DenseSae {
                    act: jumprelu,
                    threshold: stream.clone_htod(t).map_err(&up)?,
                }),
            };
            let xhat_len = if dense.is_some() { cap * d_in } else { 1 };
            let s = CudaSae {
                w_enc: stream.clone_htod(&w_enc).map_err(&up)?,
                b_enc: stream.clone_htod(&b_enc).map_err(&up)?,
                w_dec: stream.clone_htod(&w_dec).map_err(&up)?,
                b_dec: stream.clone_htod(&b_dec).map_err(&up)?,
                x: slots(|| stream.alloc_zeros(cap * d_in).map_err(&alloc))?,
                xin: stream.alloc_zeros(cap * d_in).map_err(&alloc)?,
                pre: stream.alloc_zeros(cap * d_sae).map_err(&alloc)?,
                idx: stream.alloc_zeros((cap * k).max(1)).map_err(&alloc)?,
                val: stream.alloc_zeros((cap * k).max(1)).map_err(&alloc)?,
                xhat: stream.alloc_zeros(xhat_len).map_err(&alloc)?,
                dense,
                err_sq: stream.alloc_zeros(cap).map_err(&alloc)?,
                denorm: stream.alloc_zeros(2 * cap).map_err(&alloc)?,
                norm,
                host_x: slots(|| Pinned::new(&ctx, cap * d_in, write_combined))?,
                host_err: slots(|| Pinned::new(&ctx, cap, false))?,
                uploaded: slots(event)?,
                consumed: slots(event)?,
                done: slots(event)?,
                slot: 0,
                in_flight: std::collections::VecDeque::with_capacity(SAE_SLOTS),
                last_rows: 0,
                shown: (0, 0),
                head,
                copy: ctx.new_stream().map_err(run_err("cuStreamCreate"))?,
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
                sms: usize::try_from(sms).unwrap_or(1).max(1),
                topk_parts: None,
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
        // SAFETY: x_in holds capacity ≥ n rows of d_in, W_enc d_in·d_sae floats, pre
        // capacity rows of d_sae.
        unsafe {
            gemm_rows(
                &self.blas,
                &self.xin,
                &self.w_enc,
                &mut self.pre,
                (n, self.d_in, self.d_sae),
            )
        }
    }

    /// A dense SAE's decoder, `xhat = f·W_dec` for `n` rows, enqueued (nothing for TopK, whose
    /// decode kernel sums its k active rows of W_dec itself).
    fn decoder_gemm(&mut self, n: usize) -> Result<(), CudaError> {
        if self.dense.is_none() {
            return Ok(());
        }
        // SAFETY: pre (the activations, in place) holds capacity ≥ n rows of d_sae, W_dec
        // d_sae·d_in floats, xhat (allocated for a dense SAE) capacity rows of d_in.
        unsafe {
            gemm_rows(
                &self.blas,
                &self.pre,
                &self.w_dec,
                &mut self.xhat,
                (n, self.d_sae, self.d_in),
            )
        }
    }

    /// The head's `e_hat = x·A` for the `n` rows of input buffer `slot`, enqueued.
    fn head_gemm(&mut self, n: usize, slot: usize) -> Result<(), CudaError> {
        let Some(h) = self.head.as_mut() else {
            return Ok(());
        };
        let d = self.d_in;
        // SAFETY: x holds capacity ≥ n rows of d, A d·d floats, e_hat (allocated for the
        // nonlinear score, the only caller) capacity rows of d.
        unsafe { gemm_rows(&self.blas, &self.x[slot], &h.a, &mut h.e_hat, (n, d, d)) }
    }

    /// Copies `x` into the pinned input buffer and runs the forward on it.
    fn run(&mut self, x: ArrayView2<f32>) -> Result<(), CudaError> {
        let (n, d) = x.dim();
        if d != self.d_in {
            return Err(CudaError::Run {
                what: "SAE forward",
                reason: format!("input has {d} features, the SAE takes {}", self.d_in),
            });
        }
        self.check_rows(n)?;
        let dst = &mut self.host_x[self.slot].as_mut_slice()[..n * d];
        match x.as_slice() {
            Some(v) => dst.copy_from_slice(v),
            None => {
                for (o, v) in dst.iter_mut().zip(x.iter()) {
                    *o = *v;
                }
            }
        }
        self.run_input(n)
    }

    fn check_rows(&self, n: usize) -> Result<(), CudaError> {
        if !self.in_flight.is_empty() {
            return Err(CudaError::Run {
                what: "SAE forward",
                reason: "a submitted forward has not been waited for".into(),
            });
        }
        if n > self.capacity {
            return Err(CudaError::Run {
                what: "SAE forward",
                reason: format!("{n} rows, buffers for {}", self.capacity),
            });
        }
        Ok(())
    }

    /// Every stage on the first `n` rows of the current input buffer, then waits for them.
    fn run_input(&mut self, n: usize) -> Result<(), CudaError> {
        self.enqueue(n, self.slot)?;
        self.done[self.slot]
            .synchronize()
            .map_err(run_err("cuEventSynchronize"))
    }

    /// Enqueues the forward of input buffer `slot`: its upload on the copy stream (after the
    /// last decode that read its device copy), everything else on the compute stream (after
    /// the upload).
    fn enqueue(&mut self, n: usize, slot: usize) -> Result<(), CudaError> {
        let queued = self.enqueue_stages(n, slot);
        if queued.is_err() {
            // Let what was queued finish, so no copy still reads an input buffer the host
            // may now refill.
            let _ = self.copy.synchronize();
            let _ = self.stream.synchronize();
        }
        self.last_rows = n;
        queued
    }

    fn enqueue_stages(&mut self, n: usize, slot: usize) -> Result<(), CudaError> {
        let order = run_err("ordering the SAE streams");
        self.copy.wait(&self.consumed[slot]).map_err(&order)?;
        self.stage(0, n, slot)?;
        self.uploaded[slot].record(&self.copy).map_err(&order)?;
        self.stream.wait(&self.uploaded[slot]).map_err(&order)?;
        for stage in 1..SAE_STAGES - 1 {
            self.stage(stage, n, slot)?;
        }
        self.consumed[slot].record(&self.stream).map_err(&order)?;
        self.stage(SAE_STAGES - 1, n, slot)?;
        self.done[slot].record(&self.stream).map_err(&order)
    }

    /// Enqueues one stage of the forward on `n` rows (≤ capacity) of input buffer `slot`:
    /// 0 upload (on the copy stream), 1 prep, 2 encoder GEMM, 3 TopK, 4 decode, 5 download.
    fn stage(&mut self, stage: usize, n: usize, slot: usize) -> Result<(), CudaError> {
        let d = self.d_in;
        let (rows, dd) = (n as u32, d as u32);
        let grid = |threads: u32, blocks: u32| LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        match stage {
            0 => copy_htod(
                &self.copy,
                &self.host_x[slot].as_slice()[..n * d],
                &mut self.x[slot],
                "copying the batch to the GPU",
            ),
            1 => {
                let sub = i32::from(self.sub_b_dec);
                let mut b = self.stream.launch_builder(&self.prep);
                b.arg(&self.x[slot])
                    .arg(&mut self.xin)
                    .arg(&self.b_dec)
                    .arg(&dd)
                    .arg(&self.norm.mode)
                    .arg(&self.norm.s)
                    .arg(&sub)
                    .arg(&mut self.denorm);
                // SAFETY: one block per row < n ≤ capacity: d elements of x and x_in per row,
                // d of b_dec, two of denorm; types match.
                unsafe { b.launch(grid(256, rows)) }
                    .map(drop)
                    .map_err(run_err("sae_prep"))
            }
            2 => self.encoder_gemm(n),
            3 if self.dense.is_some() => {
                let Some(dense) = self.dense.as_ref() else {
                    return Ok(());
                };
                let d_sae = self.d_sae as u32;
                let total = n as u64 * self.d_sae as u64;
                let blocks = u32::try_from(total.div_ceil(256)).map_err(|_| CudaError::Run {
                    what: "sae_jumprelu",
                    reason: format!("{total} pre-activations exceed one launch"),
                })?;
                let mut b = self.stream.launch_builder(&dense.act);
                b.arg(&mut self.pre)
                    .arg(&self.b_enc)
                    .arg(&dense.threshold)
                    .arg(&rows)
                    .arg(&d_sae);
                // SAFETY: n·d_sae elements of pre (capacity ≥ n), d_sae of b_enc and threshold;
                // the kernel checks the index against rows·d_sae.
                unsafe { b.launch(grid(256, blocks)) }
                    .map(drop)
                    .map_err(run_err("sae_jumprelu"))
            }
            3 => {
                let (d_sae, k, buf) = (self.d_sae as u32, self.k as u32, topk_buffer(self.k));
                let parts = self.topk_parts(n);
                let warps = u64::from(rows) * u64::from(parts);
                let blocks =
                    u32::try_from(warps.div_ceil(u64::from(TOPK_THREADS / 32))).map_err(|_| {
                        CudaError::Run {
                            what: "sae_topk",
                            reason: format!("{n} rows in {parts} parts exceed one launch"),
                        }
                    })?;
                let mut b = self.stream.launch_builder(&self.topk);
                b.arg(&self.pre)
                    .arg(&self.b_enc)
                    .arg(&rows)
                    .arg(&d_sae)
                    .arg(&k)
                    .arg(&buf)
                    .arg(&parts)
                    .arg(&mut self.idx)
                    .arg(&mut self.val);
                let launch = LaunchConfig {
                    shared_mem_bytes: 8 * buf * 8,
                    ..grid(TOPK_THREADS, blocks)
                };
                // SAFETY: `parts` (a divisor of the block's 8 warps) warps per row < n ≤
                // capacity (the kernel checks the row); each reads a segment of d_sae of pre
                // and b_enc, and a row's first warp writes k of idx and val; the shared
                // memory holds the kernel's 8 candidate buffers for this k (≤ 32 KiB).
                unsafe { b.launch(launch) }
                    .map(drop)
                    .map_err(run_err("sae_topk"))
            }
            4 => {
                self.decoder_gemm(n)?;
                if self
                    .head
                    .as_ref()
                    .is_some_and(|h| h.kind == SaeScoreKind::Nonlinear)
                {
                    self.head_gemm(n, slot)?;
                }
                let k = self.k as u32;
                let dense = i32::from(self.dense.is_some());
                let (kind, top) = self
                    .head
                    .as_ref()
                    .map_or((0, 0), |h| (h.kind_code(), h.top as u32));
                // A detector runs sae_detect, else sae_decode; both start with the same
                // reconstruction arguments.
                let (func, what, head) = match self.head.as_mut() {
                    Some(DeviceHead {
                        detect,
                        e_hat,
                        b,
                        w,
                        c,
                        sigma,
                        contrib,
                        top_idx,
                        top_val,
                        ..
                    }) => (
                        &*detect,
                        "sae_detect",
                        Some((e_hat, b, w, c, sigma, contrib, top_idx, top_val)),
                    ),
                    None => (&self.decode, "sae_decode", None),
                };
                let mut args = self.stream.launch_builder(func);
                args.arg(&self.x[slot])
                    .arg(&self.w_dec)
                    .arg(&self.b_dec)
                    .arg(&self.idx)
                    .arg(&self.val)
                    .arg(&dd)
                    .arg(&k)
                    .arg(&self.denorm)
                    .arg(&self.xhat)
                    .arg(&dense);
                match head {
                    Some((e_hat, hb, w, c, sigma, contrib, top_idx, top_val)) => {
                        args.arg(&*e_hat)
                            .arg(&*hb)
                            .arg(&*w)
                            .arg(&*c)
                            .arg(&*sigma)
                            .arg(&kind)
                            .arg(&top)
                            .arg(contrib)
                            .arg(&mut self.err_sq)
                            .arg(top_idx)
                            .arg(top_val);
                    }
                    None => {
                        args.arg(&mut self.err_sq);
                    }
                }
                // SAFETY: one block per row < n ≤ capacity; k ≤ 256 fits the shared arrays;
                // indices are < d_sae or NONE (skipped); xhat is read (n rows of d) only for
                // a dense SAE, which allocated it so. A detector also reads d of the head's
                // b and w and a row of e_hat (allocated for the nonlinear score, the only one
                // that reads it), and writes a row of contrib and `top` ≤ d of
                // top_idx/top_val per row.
                unsafe { args.launch(grid(256, rows)) }
                    .map(drop)
                    .map_err(run_err(what))
            }
            _ => {
                copy_dtoh(
                    &self.stream,
                    &self.err_sq,
                    &mut self.host_err[slot].as_mut_slice()[..n],
                    "copying the scores back",
                )?;
                match self.head.as_mut() {
                    Some(h) if h.top > 0 => {
                        let m = n * h.top;
                        copy_dtoh(
                            &self.stream,
                            &h.top_idx,
                            &mut h.host_idx[slot].as_mut_slice()[..m],
                            "copying the top contributions back",
                        )?;
                        copy_dtoh(
                            &self.stream,
                            &h.top_val,
                            &mut h.host_val[slot].as_mut_slice()[..m],
                            "copying the top contributions back",
                        )
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// The top contributions of the rows whose scores [`Self::forward`],
    /// [`Self::forward_input`] or [`Self::wait`] returned last: per row `top` (feature,
    /// value) pairs, largest first (NaN first, ties to the lower feature, as the host
    /// ranks them), and `top`. Empty without a head. Valid until the next forward or wait,
    /// or a submit from the same input buffer (each buffer has its own).
    pub fn top_contributions(&self) -> (&[u32], &[f32], usize) {
        match &self.head {
            Some(h) if h.top > 0 => {
                let (slot, n) = self.shown;
                let m = n * h.top;
                (
                    &h.host_idx[slot].as_slice()[..m],
                    &h.host_val[slot].as_slice()[..m],
                    h.top,
                )
            }
            _ => (&[], &[], 0),
        }
    }

    /// Each row's result (‖x − x̂‖², or a detector's score) for every row of `x`
    /// (`n` ≤ [`Self::capacity`]). `x` is first copied into
    /// the pinned input buffer; a caller that can write there directly uses
    /// [`Self::input_mut`] and [`Self::forward_input`] instead and saves that copy.
    ///
    /// # Errors
    /// A CUDA failure, the wrong width, or more rows than the buffers hold.
    pub fn forward(&mut self, x: ArrayView2<f32>) -> Result<&[f32], CudaError> {
        let n = x.nrows();
        if n > 0 {
            guarded("the SAE forward pass", || self.run(x))?;
        }
        self.shown = (self.slot, n);
        Ok(&self.host_err[self.slot].as_slice()[..n])
    }

    /// The pinned input buffer that [`Self::forward_input`] or [`Self::submit`] sends next,
    /// `[capacity, d_in]` row-major. After a submit it is the *next* buffer, which the host
    /// may fill while the GPU scores the submitted one; if a batch from this buffer is still
    /// uploading, this first waits for that upload (only the upload: its scores stay for
    /// [`Self::wait`]).
    ///
    /// # Errors
    /// A CUDA failure while waiting.
    pub fn input_mut(&mut self) -> Result<&mut [f32], CudaError> {
        let slot = self.slot;
        guarded("waiting for an SAE upload", || {
            self.uploaded[slot]
                .synchronize()
                .map_err(run_err("cuEventSynchronize"))
        })?;
        Ok(self.host_x[slot].as_mut_slice())
    }

    /// The buffer [`Self::input_mut`] gives, without waiting for an upload from it: for a
    /// caller that knows none is running (it waited for the last batch sent from it, or
    /// [`Self::input_mut`] just did).
    pub fn input_mut_unchecked(&mut self) -> &mut [f32] {
        self.host_x[self.slot].as_mut_slice()
    }

    /// The input rows of the batch whose results were returned last ([`Self::forward`],
    /// [`Self::forward_input`] or [`Self::wait`]), to read (slowly when write-combined, as
    /// [`Self::load`]'s are; [`Self::load_detector`]'s are not).
    pub fn input(&self) -> &[f32] {
        self.host_x[self.shown.0].as_slice()
    }

    /// Starts the forward of the first `n` rows of [`Self::input_mut`] and returns without
    /// waiting; [`Self::wait`] gives its errors, oldest first. Up to [`SAE_SLOTS`] forwards
    /// may be in flight: the next uploads while one computes, and the host fills the next
    /// buffer meanwhile.
    ///
    /// # Errors
    /// [`SAE_SLOTS`] are already in flight, `n` exceeds the capacity, or a CUDA call fails.
    pub fn submit(&mut self, n: usize) -> Result<(), CudaError> {
        if self.in_flight.len() == SAE_SLOTS {
            return Err(CudaError::Run {
                what: "SAE submit",
                reason: format!("{SAE_SLOTS} forwards are in flight: wait for one first"),
            });
        }
        if n > self.capacity {
            return Err(CudaError::Run {
                what: "SAE submit",
                reason: format!("{n} rows, buffers for {}", self.capacity),
            });
        }
        let slot = self.slot;
        if n > 0 {
            guarded("submitting an SAE forward", || self.enqueue(n, slot))?;
        }
        self.in_flight.push_back((slot, n));
        self.slot = (self.slot + 1) % SAE_SLOTS;
        Ok(())
    }

    /// Waits for the oldest forward [`Self::submit`] started and returns its rows' results
    /// (‖x − x̂‖², or a detector's scores; empty when none is in flight).
    ///
    /// # Errors
    /// A CUDA failure while it ran. That batch is then lost: the next wait is for the one
    /// submitted after it.
    pub fn wait(&mut self) -> Result<&[f32], CudaError> {
        // Taken off the queue first: a batch whose wait fails is lost, and the next wait is
        // for the batch after it (else every later wait would return the one before).
        let Some((slot, n)) = self.in_flight.pop_front() else {
            return Ok(&[]);
        };
        if n > 0 {
            guarded("waiting for an SAE forward", || {
                self.done[slot]
                    .synchronize()
                    .map_err(run_err("cuEventSynchronize"))
            })?;
        }
        self.shown = (slot, n);
        Ok(&self.host_err[slot].as_slice()[..n])
    }

    /// Each row's result (‖x − x̂‖², or a detector's score) for the first `n` rows written
    /// into [`Self::input_mut`].
    ///
    /// # Errors
    /// A CUDA failure, or more rows than the buffers hold.
    pub fn forward_input(&mut self, n: usize) -> Result<&[f32], CudaError> {
        self.check_rows(n)?;
        if n > 0 {
            guarded("the SAE forward pass", || self.run_input(n))?;
        }
        self.shown = (self.slot, n);
        Ok(&self.host_err[self.slot].as_slice()[..n])
    }

    /// Times each stage of [`Self::forward_input`] alone on `n` rows, `runs` times after a
    /// warm-up; returns the mean seconds per stage.
    ///
    /// # Errors
    /// A CUDA failure, or more rows than the buffers hold.
    pub fn time_stages(&mut self, n: usize, runs: usize) -> Result<SaeStages, CudaError> {
        self.check_rows(n)?;
        if n == 0 {
            return Ok(SaeStages::default());
        }
        let runs = runs.max(1);
        let slot = self.slot;
        guarded("timing the SAE stages", || {
            self.run_input(n)?;
            let mut total = [0.0f64; SAE_STAGES];
            let sync = run_err("cuStreamSynchronize");
            for _ in 0..runs {
                for (stage, t) in total.iter_mut().enumerate() {
                    let t0 = std::time::Instant::now();
                    self.stage(stage, n, slot)?;
                    self.copy.synchronize().map_err(&sync)?;
                    self.stream.synchronize().map_err(&sync)?;
                    *t += t0.elapsed().as_secs_f64();
                }
            }
            let per = |i: usize| total[i] / runs as f64;
            Ok(SaeStages {
                upload: per(0),
                prep: per(1),
                encoder_gemm: per(2),
                topk: per(3),
                decode: per(4),
                download: per(5),
            })
        })
    }

    /// The active latents of the last forward's first `n` rows (at most that forward's
    /// rows): per row, `k` (index, value) pairs, value 0 and index `u32::MAX` where fewer
    /// than `k` survived the ReLU.
    ///
    /// # Errors
    /// A submitted forward has not been waited for, or a CUDA failure.
    pub fn latents(&mut self, n: usize) -> Result<(Vec<u32>, Vec<f32>), CudaError> {
        self.check_rows(0)?;
        if self.dense.is_some() {
            return Err(CudaError::Unsupported(
                "the active latents of a ReLU or JumpReLU SAE (it keeps no latent list)".into(),
            ));
        }
        let n = n.min(self.last_rows);
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

    /// Warps per row the TopK kernel uses for a batch of `n` rows: the value set by
    /// [`Self::set_topk_parts`], else the fewest of [`SAE_TOPK_PARTS`] that give the GPU
    /// enough warps, keeping segments of at least 2048 latents.
    pub fn topk_parts(&self, n: usize) -> u32 {
        if let Some(parts) = self.topk_parts {
            return parts;
        }
        let target = self.sms.saturating_mul(TOPK_WARPS_PER_SM);
        let mut parts = 1u32;
        while parts < 8
            && n.saturating_mul(parts as usize) < target
            && self.d_sae / (2 * parts as usize) >= TOPK_MIN_SEGMENT
        {
            parts *= 2;
        }
        parts
    }

    /// Fixes the TopK kernel's warps per row (one of [`SAE_TOPK_PARTS`]), or with `None`
    /// returns it to [`Self::topk_parts`]'s choice. The TopK is the same for every split;
    /// only its speed differs (for benches and tests).
    ///
    /// # Errors
    /// A value not in [`SAE_TOPK_PARTS`].
    pub fn set_topk_parts(&mut self, parts: Option<u32>) -> Result<(), CudaError> {
        if let Some(p) = parts
            && !SAE_TOPK_PARTS.contains(&p)
        {
            return Err(CudaError::Run {
                what: "TopK split",
                reason: format!("{p} warps per row (one of {SAE_TOPK_PARTS:?})"),
            });
        }
        self.topk_parts = parts;
        Ok(())
    }

    /// Times the encoder GEMM alone for `n` rows (on whatever x_in holds), `runs` times after
    /// a warm-up; returns the seconds per GEMM.
    ///
    /// # Errors
    /// A CUDA or cuBLAS failure, or `n` beyond the capacity.
    pub fn time_encoder_gemm(&mut self, n: usize, runs: usize) -> Result<f64, CudaError> {
        self.check_rows(0)?;
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
