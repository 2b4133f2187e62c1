//! Forward and backward kernels of the dense autoencoder.
//!
//! Owns the inference hot path ([`Autoencoder::forward`] into a preallocated [`Workspace`]) and
//! the training maths ([`Autoencoder::loss_and_grad`] into a [`TrainWorkspace`] and
//! [`Gradients`]). Fed by the types of [`crate::model`]; feeds [`crate::score`] (reconstructions)
//! and [`crate::train`] (losses and gradients).
//!
//! Inference carries one row (two at a time when there are two) through every layer, so the
//! activations stay in L1. Each layer is a set of dot products against the rows of `W` in its
//! stored `[out, in]` layout, 8 lanes wide, each summed in a fixed order: a row's result is
//! bitwise the same whatever batch it came in, and there is no packed copy of the weights that
//! could go stale when a model is retrained or swapped. On x86-64 with AVX2 and FMA (detected at
//! run time, no `target-cpu` needed) the dot products use 256-bit FMAs and the variance a
//! vectorised softplus; elsewhere a portable loop computes the same maths (rounding differs by
//! an ulp or so). Training uses ndarray's GEMM (matrixmultiply) on whole mini-batches.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2, ShapeBuilder, Zip, s};

use super::{Activation, Autoencoder, Dense, OutputKind};
use crate::rng::{Rng, member_seed};

/// The ε added to the predicted variance in the NLL: `(x − μ)² / (s + ε) + ln(s + ε)`
/// (papers.md §1.2). [`Recon::var`] does not include it.
pub const VARIANCE_EPS: f32 = 1e-5;

/// Coefficients (after the leading 7.037_683_6e-2) of the Cephes-style polynomial for
/// ln(1 + f), f ∈ [√½ − 1, √2 − 1], shared by the scalar and the AVX2 softplus.
const LN_POLY: [f32; 8] = [
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];

/// Numerically stable softplus, `ln(1 + eˣ)`, computed as `max(x, 0) + ln(1 + e^−|x|)` so the
/// exponent never overflows. NaN stays NaN; `softplus(+∞) = +∞`, `softplus(−∞) = 0`.
pub fn softplus(x: f32) -> f32 {
    relu(x) + (-x.abs()).exp().ln_1p()
}

/// ReLU that keeps NaN (so a bad input shows up in the score instead of vanishing).
fn relu(x: f32) -> f32 {
    if x < 0.0 { 0.0 } else { x }
}

/// Rows the SIMD kernel carries through the layers together (for more independent work per
/// instruction window); the workspace sizes its hidden buffers for this many.
const INTERLEAVE: usize = 2;

/// `n` rounded up to a whole number of 8-float vectors.
fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// A reconstruction of a batch, borrowed from the [`Workspace`] that computed it.
#[derive(Debug, Clone, Copy)]
pub struct Recon<'a> {
    /// `[n, d]`: x̂ for a plain AE, μ for a probabilistic one.
    pub mean: ArrayView2<'a, f32>,
    /// `[n, d]`: the variance `softplus(raw)` of a probabilistic AE (no ε added); `None` for a
    /// plain AE.
    pub var: Option<ArrayView2<'a, f32>>,
}

/// Which forward kernel a workspace runs, chosen once when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }
}

/// Preallocated buffers for [`Autoencoder::forward`]: with at most [`Workspace::capacity`] rows
/// per call, a forward pass does not allocate.
///
/// A workspace remembers only the model's shapes, never its weights, so it stays valid when the
/// weights change. Passing a model of another shape rebuilds it (allocating once).
#[derive(Debug, Clone)]
pub struct Workspace {
    kernel: Kernel,
    n_features: usize,
    /// Columns of each reconstruction part: `members · d` ([`Autoencoder::recon_width`]).
    recon_width: usize,
    output: OutputKind,
    /// `(out, in)` of each layer the buffers were laid out for.
    shapes: Vec<(usize, usize)>,
    /// Rows `out` has room for.
    capacity: usize,
    /// Input rows, `pad8(d)` apart, for inputs whose rows are not contiguous.
    x_rows: Vec<f32>,
    /// Hidden activations of [`INTERLEAVE`] rows: hidden layer `l` at `hidden_at[l]`, its rows
    /// `pad8(width)` apart. Each layer has its own region so that the lanes past its width stay 0.
    hidden: Vec<f32>,
    hidden_at: Vec<usize>,
    /// Output rows, `out_stride` floats apart: the mean at `[0, m)`, the variance at
    /// `[var_offset, var_offset + m)`, with `m` the recon width.
    out: Vec<f32>,
    out_stride: usize,
    var_offset: usize,
}

impl Workspace {
    fn new(model: &Autoencoder, max_batch: usize, kernel: Kernel) -> Workspace {
        if let Err(why) = model.check_shapes() {
            panic!("malformed autoencoder: {why}");
        }
        let d = model.n_features;
        let mut hidden_at = Vec::with_capacity(model.layers.len());
        let mut hidden_len = 0;
        for width in model.hidden_sizes() {
            hidden_at.push(hidden_len);
            hidden_len += INTERLEAVE * pad8(width);
        }
        let m = model.recon_width();
        let (out_stride, var_offset) = match model.output {
            OutputKind::Plain => (pad8(m), 0),
            OutputKind::Probabilistic => (2 * pad8(m), pad8(m)),
        };
        Workspace {
            kernel,
            n_features: d,
            recon_width: m,
            output: model.output,
            shapes: model.layers.iter().map(|l| l.w.dim()).collect(),
            capacity: max_batch,
            x_rows: vec![0.0; INTERLEAVE * pad8(d)],
            hidden: vec![0.0; hidden_len],
            hidden_at,
            out: vec![0.0; max_batch * out_stride],
            out_stride,
            var_offset,
        }
    }

    /// Rows a forward pass can take without allocating.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The kernel in use: `"avx2+fma"` or `"portable"` (for benchmark reports).
    pub fn kernel_name(&self) -> &'static str {
        match self.kernel {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => "avx2+fma",
        }
    }

    /// Whether the buffers are laid out for `model`'s shapes.
    fn fits(&self, model: &Autoencoder) -> bool {
        self.n_features == model.n_features
            && self.recon_width == model.recon_width()
            && self.output == model.output
            && self.shapes.len() == model.layers.len()
            && self
                .shapes
                .iter()
                .zip(&model.layers)
                .all(|(&shape, l)| l.w.dim() == shape && l.b.len() == shape.0)
    }

    /// Make room for `n` rows of `model`; allocates only when the shape changed or `n` exceeds
    /// the capacity.
    fn prepare(&mut self, model: &Autoencoder, n: usize) {
        if !self.fits(model) {
            *self = Workspace::new(model, n.max(self.capacity), self.kernel);
        } else if n > self.capacity {
            self.out.resize(n * self.out_stride, 0.0);
            self.capacity = n;
        }
    }

    fn recon(&self, n: usize) -> Recon<'_> {
        if n == 0 {
            let empty = ArrayView2::from_shape((0, self.recon_width), &[]).expect("empty view");
            let var = (self.output == OutputKind::Probabilistic).then_some(empty);
            return Recon { mean: empty, var };
        }
        let shape = (n, self.recon_width).strides((self.out_stride, 1));
        let mean = ArrayView2::from_shape(shape, &self.out[..])
            .expect("workspace output buffer holds n rows");
        let var = match self.output {
            OutputKind::Plain => None,
            OutputKind::Probabilistic => {
                let tail = self.out.get(self.var_offset..).unwrap_or(&[]);
                Some(
                    ArrayView2::from_shape(shape, tail)
                        .expect("workspace output buffer holds n rows"),
                )
            }
        };
        Recon { mean, var }
    }

    /// The same workspace forced onto the portable kernel (to test it on any machine).
    #[cfg(test)]
    fn portable(mut self) -> Workspace {
        self.kernel = Kernel::Portable;
        self
    }
}

/// `d(loss)/d(parameters)`, one entry per layer, shaped like the layer's `w` and `b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// `[out, in]` per layer.
    pub w: Vec<Array2<f32>>,
    /// `[out]` per layer.
    pub b: Vec<Array1<f32>>,
}

impl Gradients {
    /// All-zero gradients shaped like `model`'s parameters (also the shape of Adam's moments).
    pub fn zeros(model: &Autoencoder) -> Gradients {
        Gradients {
            w: model
                .layers
                .iter()
                .map(|l| Array2::zeros(l.w.dim()))
                .collect(),
            b: model
                .layers
                .iter()
                .map(|l| Array1::zeros(l.b.len()))
                .collect(),
        }
    }

    fn fits(&self, model: &Autoencoder) -> bool {
        self.w.len() == model.layers.len()
            && self.b.len() == model.layers.len()
            && model
                .layers
                .iter()
                .zip(self.w.iter().zip(&self.b))
                .all(|(l, (w, b))| w.dim() == l.w.dim() && b.len() == l.b.len())
    }
}

/// Buffers for [`Autoencoder::loss_and_grad`]: every layer's activations and output gradients
/// for up to [`TrainWorkspace::capacity`] rows (more rows grow it).
#[derive(Debug, Clone)]
pub struct TrainWorkspace {
    capacity: usize,
    shapes: Vec<(usize, usize)>,
    /// Per layer `[capacity, out]`: `act(W a + b)`; the last layer holds its raw output.
    acts: Vec<Array2<f32>>,
    /// Per layer `[capacity, out]`: `d(loss)/d(pre-activation)`.
    deltas: Vec<Array2<f32>>,
}

impl TrainWorkspace {
    /// Rows one call can take without regrowing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn fits(&self, model: &Autoencoder) -> bool {
        self.shapes.len() == model.layers.len()
            && self
                .shapes
                .iter()
                .zip(&model.layers)
                .all(|(&s, l)| s == l.w.dim())
    }
}

impl Autoencoder {
    /// A freshly initialised autoencoder `n_features → hidden… → output.output_width(n_features)`,
    /// ReLU after every layer but the last (identity). Weights and biases follow PyTorch's
    /// default `Linear` init, `U(−1/√fan_in, 1/√fan_in)`, drawn in layer order (`w` row-major,
    /// then `b`) from [`Rng::new`]`(seed)`.
    ///
    /// # Panics
    /// If `n_features` or a hidden width is 0.
    pub fn new(n_features: usize, hidden: &[usize], output: OutputKind, seed: u64) -> Autoencoder {
        assert!(
            n_features > 0 && hidden.iter().all(|&h| h > 0),
            "autoencoder widths must be positive (n_features {n_features}, hidden {hidden:?})"
        );
        let mut rng = Rng::new(seed);
        let mut widths = Vec::with_capacity(hidden.len() + 2);
        widths.push(n_features);
        widths.extend_from_slice(hidden);
        widths.push(output.output_width(n_features));
        let n_layers = widths.len() - 1;
        let layers = (0..n_layers)
            .map(|l| {
                let (fan_in, fan_out) = (widths[l], widths[l + 1]);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let w: Vec<f32> = (0..fan_in * fan_out)
                    .map(|_| rng.uniform(-bound, bound))
                    .collect();
                let b: Vec<f32> = (0..fan_out).map(|_| rng.uniform(-bound, bound)).collect();
                Dense {
                    w: Array2::from_shape_vec((fan_out, fan_in), w)
                        .expect("fan_out × fan_in values"),
                    b: Array1::from(b),
                    act: if l + 1 == n_layers {
                        Activation::Identity
                    } else {
                        Activation::Relu
                    },
                }
            })
            .collect();
        Autoencoder {
            n_features,
            output,
            layers,
            members: 1,
        }
    }

    /// An ensemble of `members` autoencoders `n_features → hidden… → output`, merged into one
    /// network (see [`Autoencoder`]): member k is initialised as [`Autoencoder::new`] would with
    /// seed [`member_seed`]`(seed, k, 0)`, so one member is exactly `new(…, seed)`.
    ///
    /// # Panics
    /// If `members`, `n_features` or a hidden width is 0.
    pub fn ensemble(
        n_features: usize,
        hidden: &[usize],
        output: OutputKind,
        members: usize,
        seed: u64,
    ) -> Autoencoder {
        assert!(members > 0, "an ensemble needs at least one member");
        let nets: Vec<Autoencoder> = (0..members as u64)
            .map(|k| Autoencoder::new(n_features, hidden, output, member_seed(seed, k, 0)))
            .collect();
        Autoencoder::merge(nets)
    }

    /// One network holding `nets` as ensemble members (see [`Autoencoder`]); one net is
    /// returned as it is.
    ///
    /// # Panics
    /// If `nets` is empty, or its networks differ in shape or hold members themselves.
    pub fn merge(nets: Vec<Autoencoder>) -> Autoencoder {
        assert!(!nets.is_empty(), "an ensemble needs at least one member");
        assert!(
            nets.iter().all(|n| n.members == 1
                && n.widths() == nets[0].widths()
                && n.output == nets[0].output),
            "ensemble members must be single networks of one shape"
        );
        let members = nets.len();
        if members == 1 {
            return nets.into_iter().next().expect("one member");
        }
        let (n_features, output) = (nets[0].n_features, nets[0].output);
        let mut merged = Autoencoder {
            n_features,
            output,
            layers: Vec::with_capacity(nets[0].layers.len()),
            members,
        };
        let m = members * n_features;
        let last = nets[0].layers.len() - 1;
        for l in 0..=last {
            let (o1, i1) = nets[0].layers[l].w.dim();
            let n_in = if l == 0 { i1 } else { i1 * members };
            let mut w = Array2::zeros((o1 * members, n_in));
            let mut b = Array1::zeros(o1 * members);
            for (k, net) in nets.iter().enumerate() {
                let layer = &net.layers[l];
                for o in 0..o1 {
                    // Where member k's output o goes: its block, or for the last layer its
                    // slot in the means (and in the variances).
                    let row = if l == last {
                        (o / n_features) * m + k * n_features + o % n_features
                    } else {
                        k * o1 + o
                    };
                    let col = if l == 0 { 0 } else { k * i1 };
                    w.slice_mut(s![row, col..col + i1]).assign(&layer.w.row(o));
                    b[row] = layer.b[o];
                }
            }
            merged.layers.push(Dense {
                w,
                b,
                act: nets[0].layers[l].act,
            });
        }
        merged
    }

    /// Sets every weight that would join two members to 0 (gradients, after each step).
    fn mask_members(&self, w: &mut [Array2<f32>]) {
        if self.members == 1 {
            return;
        }
        for (l, g) in w.iter_mut().enumerate().skip(1) {
            for ((o, i), v) in g.indexed_iter_mut() {
                if self.member_of_input(l, i) != Some(self.member_of_output(l, o)) {
                    *v = 0.0;
                }
            }
        }
    }

    /// Checks that the layers chain: the first takes `n_features` inputs, each takes the previous
    /// one's outputs, each bias matches its outputs, and the last gives `output_width(n_features)`
    /// per member; with several members, that every hidden width splits evenly among them and
    /// no weight joins two members.
    ///
    /// # Errors
    /// A sentence naming the first layer that does not fit.
    pub fn check_shapes(&self) -> Result<(), String> {
        if self.n_features == 0 {
            return Err("n_features is 0".into());
        }
        if self.layers.is_empty() {
            return Err("the model has no layers".into());
        }
        let mut width = self.n_features;
        for (i, l) in self.layers.iter().enumerate() {
            let (out, inp) = l.w.dim();
            if inp != width {
                return Err(format!("layer {i} takes {inp} inputs, but {width} arrive"));
            }
            if l.b.len() != out {
                return Err(format!(
                    "layer {i} has {out} outputs but {} biases",
                    l.b.len()
                ));
            }
            if out == 0 {
                return Err(format!("layer {i} has no outputs"));
            }
            width = out;
        }
        if self.members == 0 {
            return Err("the model has 0 members".into());
        }
        let want = self.output.output_width(self.n_features) * self.members;
        if width != want {
            return Err(match self.members {
                1 => format!(
                    "the last layer gives {width} outputs, {:?} needs {want}",
                    self.output
                ),
                k => format!(
                    "the last layer gives {width} outputs, {k} {:?} members need {want}",
                    self.output
                ),
            });
        }
        if self.members > 1 {
            for (l, layer) in self.layers.iter().enumerate() {
                if l + 1 < self.layers.len() && layer.outputs() % self.members != 0 {
                    return Err(format!(
                        "layer {l} has {} outputs, not a multiple of the {} members",
                        layer.outputs(),
                        self.members
                    ));
                }
            }
            for (l, layer) in self.layers.iter().enumerate().skip(1) {
                if let Some(((o, i), _)) = layer.w.indexed_iter().find(|&((o, i), &v)| {
                    v != 0.0 && self.member_of_input(l, i) != Some(self.member_of_output(l, o))
                }) {
                    return Err(format!(
                        "layer {l}'s weight [{o}, {i}] joins two ensemble members; it must be 0"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Buffers for forward passes of up to `max_batch` rows, using the fastest kernel this CPU
    /// supports.
    ///
    /// # Panics
    /// If the model's shapes are inconsistent (see [`Autoencoder::check_shapes`]).
    pub fn workspace(&self, max_batch: usize) -> Workspace {
        Workspace::new(self, max_batch, Kernel::detect())
    }

    /// Reconstructs each row of `x` (`[n, d]`, any strides). Allocation-free when `n` is at most
    /// the workspace's capacity and the workspace was made for a model of this shape; otherwise
    /// the workspace grows first.
    ///
    /// # Panics
    /// If `x` does not have `n_features` columns, or the model's shapes are inconsistent.
    pub fn forward<'a>(&self, x: ArrayView2<f32>, ws: &'a mut Workspace) -> Recon<'a> {
        assert_eq!(
            x.ncols(),
            self.n_features,
            "forward: input has {} features, the model takes {}",
            x.ncols(),
            self.n_features
        );
        let n = x.nrows();
        ws.prepare(self, n);
        match ws.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma if self.is_contiguous() => {
                // SAFETY: the kernel was picked only after detecting AVX2 and FMA; `prepare`
                // matched the buffers to the (validated) shapes and made room for `n` rows; every
                // `w` and `b` is contiguous in standard layout.
                unsafe { avx::forward(self, x, ws) }
            }
            _ => portable::forward(self, x, ws),
        }
        ws.recon(n)
    }

    /// Whether every `w` is standard (row-major) layout and every `b` contiguous, as the SIMD
    /// kernel's pointer arithmetic needs.
    fn is_contiguous(&self) -> bool {
        self.layers
            .iter()
            .all(|l| l.w.is_standard_layout() && l.b.as_slice().is_some())
    }

    /// Mean over the rows of `x` of the training loss (MSE summed over features for a plain AE,
    /// the NLL with α = β = 1 for a probabilistic one), computed with the inference kernel in
    /// chunks of the workspace's capacity (256 if it has none). 0 for no rows.
    pub fn loss(&self, x: ArrayView2<f32>, ws: &mut Workspace) -> f64 {
        let n = x.nrows();
        if n == 0 {
            return 0.0;
        }
        let chunk = if ws.capacity() == 0 {
            256
        } else {
            ws.capacity()
        };
        let mut total = 0.0;
        for start in (0..n).step_by(chunk) {
            let xb = x.slice(s![start..(start + chunk).min(n), ..]);
            let recon = self.forward(xb, ws);
            total += loss_sum(xb, &recon);
        }
        total / n as f64
    }

    /// Training buffers for mini-batches of up to `max_batch` rows.
    ///
    /// # Panics
    /// If the model's shapes are inconsistent (see [`Autoencoder::check_shapes`]).
    pub fn train_workspace(&self, max_batch: usize) -> TrainWorkspace {
        if let Err(why) = self.check_shapes() {
            panic!("malformed autoencoder: {why}");
        }
        let zeros = || {
            self.layers
                .iter()
                .map(|l| Array2::zeros((max_batch, l.outputs())))
                .collect()
        };
        TrainWorkspace {
            capacity: max_batch,
            shapes: self.layers.iter().map(|l| l.w.dim()).collect(),
            acts: zeros(),
            deltas: zeros(),
        }
    }

    /// The mini-batch loss of `x` (mean over rows; see [`Autoencoder::loss`]) and, written over
    /// `grads`, its gradient with respect to every weight and bias. For an ensemble the loss is
    /// the members' mean and each member's parameters get the gradient of its own loss (as if
    /// it trained alone: `members` times the gradient of the mean); weights joining members
    /// get 0. `tws` and `grads` are
    /// reshaped if they do not fit this model. No rows gives 0 and zero gradients.
    ///
    /// # Panics
    /// If `x` does not have `n_features` columns, or the model's shapes are inconsistent.
    pub fn loss_and_grad(
        &self,
        x: ArrayView2<f32>,
        tws: &mut TrainWorkspace,
        grads: &mut Gradients,
    ) -> f64 {
        assert_eq!(
            x.ncols(),
            self.n_features,
            "loss_and_grad: input has {} features",
            x.ncols()
        );
        let n = x.nrows();
        if !tws.fits(self) || n > tws.capacity {
            *tws = self.train_workspace(n.max(tws.capacity));
        }
        if !grads.fits(self) {
            *grads = Gradients::zeros(self);
        }
        if n == 0 {
            grads.w.iter_mut().for_each(|g| g.fill(0.0));
            grads.b.iter_mut().for_each(|g| g.fill(0.0));
            return 0.0;
        }
        let last = self.layers.len() - 1;

        // Forward: a_l = act(a_{l-1} W_lᵀ + b_l).
        for (l, layer) in self.layers.iter().enumerate() {
            let (done, rest) = tws.acts.split_at_mut(l);
            let mut z = rest[0].slice_mut(s![..n, ..]);
            let input = if l == 0 {
                x
            } else {
                done[l - 1].slice(s![..n, ..])
            };
            general_mat_mul(1.0, &input, &layer.w.t(), 0.0, &mut z);
            z += &layer.b;
            if layer.act == Activation::Relu {
                z.mapv_inplace(relu);
            }
        }

        // d(loss)/d(last layer's output), and the loss itself.
        let out = tws.acts[last].slice(s![..n, ..]);
        let mut g = tws.deltas[last].slice_mut(s![..n, ..]);
        let loss = output_grad(self.output, x, out, g.view_mut());
        if self.layers[last].act == Activation::Relu {
            // `new` never puts a ReLU last, but a loaded model may; the chain rule still holds.
            Zip::from(&mut g).and(&out).for_each(|g, &a| {
                if a <= 0.0 {
                    *g = 0.0;
                }
            });
        }

        // Backward: dW_l = δ_lᵀ a_{l-1}, db_l = Σ_rows δ_l, δ_{l-1} = (δ_l W_l) ⊙ act'(a_{l-1}).
        for l in (0..=last).rev() {
            let (lower, upper) = tws.deltas.split_at_mut(l);
            let delta = upper[0].slice(s![..n, ..]);
            let input = if l == 0 {
                x
            } else {
                tws.acts[l - 1].slice(s![..n, ..])
            };
            general_mat_mul(1.0, &delta.t(), &input, 0.0, &mut grads.w[l]);
            let db = &mut grads.b[l];
            db.fill(0.0);
            for row in delta.rows() {
                *db += &row;
            }
            if l > 0 {
                let mut prev = lower[l - 1].slice_mut(s![..n, ..]);
                general_mat_mul(1.0, &delta, &self.layers[l].w, 0.0, &mut prev);
                if self.layers[l - 1].act == Activation::Relu {
                    Zip::from(&mut prev).and(&input).for_each(|g, &a| {
                        if a <= 0.0 {
                            *g = 0.0;
                        }
                    });
                }
            }
        }
        // Members stay apart: a weight joining two of them starts at 0 and never moves.
        self.mask_members(&mut grads.w);
        loss / n as f64
    }
}

/// Σ over rows of the per-row training loss of a reconstruction; with several members
/// (reconstructions `members · d` wide), the mean of their losses.
fn loss_sum(x: ArrayView2<f32>, recon: &Recon) -> f64 {
    let d = x.ncols();
    let members = recon.mean.ncols() / d.max(1);
    let mut total = 0.0f64;
    for k in 0..members {
        let cols = s![.., k * d..(k + 1) * d];
        let mean = recon.mean.slice(cols);
        match recon.var {
            None => Zip::from(x).and(mean).for_each(|&x, &m| {
                let e = f64::from(x) - f64::from(m);
                total += e * e;
            }),
            Some(var) => Zip::from(x)
                .and(mean)
                .and(var.slice(cols))
                .for_each(|&x, &m, &s| {
                    let e = f64::from(x) - f64::from(m);
                    let v = f64::from(s + VARIANCE_EPS);
                    total += e * e / v + v.ln();
                }),
        }
    }
    total / members.max(1) as f64
}

/// Writes `d(mean loss)/d(raw output)` into `g` and returns the summed (not yet averaged)
/// loss. With several members (`out` holding `members` reconstructions, see
/// [`Autoencoder`]), each member's outputs get the gradient of its own loss, as if it trained
/// alone, and the loss returned is the members' mean.
fn output_grad(
    kind: OutputKind,
    x: ArrayView2<f32>,
    out: ArrayView2<f32>,
    mut g: ndarray::ArrayViewMut2<f32>,
) -> f64 {
    let inv_n = 1.0 / x.nrows() as f32;
    let d = x.ncols();
    let m = out.ncols() / kind.output_width(1);
    let members = m / d.max(1);
    let mut total = 0.0f64;
    for k in 0..members {
        let cols = s![.., k * d..(k + 1) * d];
        match kind {
            OutputKind::Plain => Zip::from(g.slice_mut(cols))
                .and(x)
                .and(out.slice(cols))
                .for_each(|g, &x, &z| {
                    let e = z - x;
                    *g = 2.0 * e * inv_n;
                    total += f64::from(e) * f64::from(e);
                }),
            OutputKind::Probabilistic => {
                let raw_cols = s![.., m + k * d..m + (k + 1) * d];
                let (mut g_mean, mut g_raw) = g.multi_slice_mut((cols, raw_cols));
                let (mean, raw) = (out.slice(cols), out.slice(raw_cols));
                Zip::from(&mut g_mean)
                    .and(&mut g_raw)
                    .and(x)
                    .and(mean)
                    .and(raw)
                    .for_each(|gm, gr, &x, &mu, &raw| {
                        // softplus and its derivative (the logistic) share e^−|raw|.
                        let t = (-raw.abs()).exp();
                        let v = relu(raw) + t.ln_1p() + VARIANCE_EPS;
                        let dv = if raw >= 0.0 { 1.0 } else { t } / (1.0 + t);
                        let (e, inv_v) = (mu - x, 1.0 / v);
                        let q = e * e * inv_v;
                        *gm = 2.0 * e * inv_v * inv_n;
                        *gr = (1.0 - q) * inv_v * dv * inv_n;
                        total += f64::from(q) + f64::from(v.ln());
                    });
            }
        }
    }
    total / members.max(1) as f64
}

/// Portable forward: the same row-at-a-time scheme in plain Rust, for CPUs without AVX2/FMA
/// (and for weights not in standard layout). Dot products keep 8 independent partial sums, which
/// the compiler maps onto whatever SIMD the target has (SSE2, NEON, VSX).
mod portable {
    use super::*;

    pub(super) fn forward(model: &Autoencoder, x: ArrayView2<f32>, ws: &mut Workspace) {
        let last = model.layers.len() - 1;
        let d = model.n_features;
        let Workspace {
            x_rows,
            hidden,
            hidden_at,
            out,
            out_stride,
            var_offset,
            ..
        } = ws;
        let (stride, var_offset) = (*out_stride, *var_offset);
        for (r, x_row) in x.rows().into_iter().enumerate() {
            let input: &[f32] = match x_row.to_slice() {
                Some(row) => row,
                None => {
                    for (s, &v) in x_rows.iter_mut().zip(&x_row) {
                        *s = v;
                    }
                    &x_rows[..d]
                }
            };
            let y = &mut out[r * stride..(r + 1) * stride];
            for (l, layer) in model.layers.iter().enumerate() {
                // Hidden layer l writes its region; it reads layer l − 1's, which lies before it.
                let at = hidden_at.get(l).copied().unwrap_or(hidden.len());
                let (before, dst) = hidden.split_at_mut(at);
                let src = if l == 0 {
                    input
                } else {
                    let from = hidden_at[l - 1];
                    &before[from..from + layer.inputs()]
                };
                if l < last {
                    dense(layer, 0..layer.outputs(), src, dst);
                } else {
                    let m = model.recon_width();
                    dense(layer, 0..m, src, &mut y[..]);
                    if model.output == OutputKind::Probabilistic {
                        let var = &mut y[var_offset..var_offset + m];
                        dense(layer, m..2 * m, src, var);
                        var.iter_mut().for_each(|v| *v = softplus_poly(*v));
                    }
                }
            }
        }
    }

    /// `y[i] = act(W[o] · x + b[o])` for the rows `o` of `rows`, `i` counting from 0.
    fn dense(layer: &Dense, rows: std::ops::Range<usize>, x: &[f32], y: &mut [f32]) {
        let relu = layer.act == Activation::Relu;
        let n_in = layer.inputs();
        let contiguous = layer.w.as_slice().zip(layer.b.as_slice());
        for (y, o) in y.iter_mut().zip(rows) {
            let v = match contiguous {
                Some((w, b)) => dot(&w[o * n_in..(o + 1) * n_in], x) + b[o],
                None => {
                    layer
                        .w
                        .row(o)
                        .iter()
                        .zip(x)
                        .map(|(w, x)| w * x)
                        .sum::<f32>()
                        + layer.b[o]
                }
            };
            *y = if relu { super::relu(v) } else { v };
        }
    }

    /// Dot product with 8 independent partial sums (so it vectorises), added pairwise.
    fn dot(w: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (wc, x8) = (w.chunks_exact(8), x.chunks_exact(8));
        let (wt, xt) = (wc.remainder(), x8.remainder());
        for (w, x) in wc.zip(x8) {
            for l in 0..8 {
                acc[l] += w[l] * x[l];
            }
        }
        for (l, (w, x)) in wt.iter().zip(xt).enumerate() {
            acc[l] += w * x;
        }
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    }

    /// Softplus with the same polynomials as the AVX2 kernel, in plain scalar arithmetic (the
    /// libm `exp` + `ln_1p` pair costs several times more).
    pub(super) fn softplus_poly(z: f32) -> f32 {
        // a = −|z|, clamped so e^a stays a normal float; comparisons leave NaN alone.
        let a = -z.abs();
        let a = if a < -87.0 { -87.0 } else { a };
        // Round to nearest with the 1.5·2²³ trick (no libm call on baseline x86-64).
        let k = (a * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = a - k * 0.693_359_4 - k * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4;
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = p * r + c;
        }
        let p = p * (r * r) + r + 1.0;
        let t = p * f32::from_bits(((k as i32 + 127) as u32) << 23);
        let u = 1.0 + t;
        let c = t - (u - 1.0);
        let (m, e) = if u > std::f32::consts::SQRT_2 {
            (u * 0.5, 1.0)
        } else {
            (u, 0.0)
        };
        let f = m - 1.0;
        let f2 = f * f;
        let mut q = 7.037_683_6e-2;
        for c in LN_POLY {
            q = q * f + c;
        }
        let y = q * f * f2 + e * -2.121_944_4e-4 - 0.5 * f2;
        let ln_u = f + y + e * 0.693_359_4;
        relu(z) + (ln_u + c / u)
    }
}

/// AVX2 + FMA forward kernel.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::*;

    /// `MASKS[8 - k..16 - k]` selects the first `k` lanes.
    static MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn first_lanes(k: usize) -> __m256i {
        debug_assert!(k <= 8);
        // SAFETY: 8 - k + 8 <= 16, so the 8 loaded ints lie inside MASKS.
        unsafe { _mm256_loadu_si256(MASKS.as_ptr().add(8 - k).cast()) }
    }

    /// Some rows of one layer: `w` points at the first of `n_out` rows of `n_in` floats, `b` at
    /// their `n_out` biases.
    #[derive(Clone, Copy)]
    struct Rows {
        w: *const f32,
        b: *const f32,
        n_in: usize,
        n_out: usize,
        relu: bool,
        /// The input is readable up to `pad8(n_in)` and its lanes past `n_in` are 0.
        padded_x: bool,
    }

    impl Rows {
        fn of(layer: &Dense, first: usize, count: usize, padded_x: bool) -> Rows {
            let n_in = layer.inputs();
            Rows {
                // `wrapping_add` keeps this safe; the offsets are in bounds by construction.
                w: layer.w.as_ptr().wrapping_add(first * n_in),
                b: layer.b.as_ptr().wrapping_add(first),
                n_in,
                n_out: count,
                relu: layer.act == Activation::Relu,
                padded_x,
            }
        }
    }

    /// Forward of every row of `x` into `ws.out`, [`INTERLEAVE`] rows at a time while they
    /// last. Every row's arithmetic is the same whichever group it falls in, so results are
    /// bitwise independent of the batch.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `ws` fits `model` (validated shapes) and holds `x.nrows()`
    /// rows; every `w` is in standard layout and every `b` contiguous.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward(model: &Autoencoder, x: ArrayView2<f32>, ws: &mut Workspace) {
        let n = x.nrows();
        let mut r = 0;
        while r < n {
            // SAFETY: forwarded from the caller; rows r..r + k exist.
            unsafe {
                // (Four rows at a time measured no faster than two.)
                r += match n - r {
                    1 => rows::<1>(model, x, ws, r),
                    _ => rows::<2>(model, x, ws, r),
                };
            }
        }
        if model.output == OutputKind::Probabilistic {
            // Softplus in its own pass: its long dependency chains then overlap across vectors
            // instead of stalling each output block.
            let m = model.recon_width();
            let (full, rem) = (m / 8, m % 8);
            let keep = _mm256_castsi256_ps(first_lanes(rem));
            let out = ws.out.as_mut_ptr();
            for r in 0..n {
                // SAFETY: row r's variance occupies pad8(m) floats from var_offset.
                unsafe {
                    let v = out.add(r * ws.out_stride + ws.var_offset);
                    for c in 0..full {
                        _mm256_storeu_ps(v.add(8 * c), softplus(_mm256_loadu_ps(v.add(8 * c))));
                    }
                    if rem > 0 {
                        let p = v.add(8 * full);
                        _mm256_storeu_ps(p, _mm256_and_ps(softplus(_mm256_loadu_ps(p)), keep));
                    }
                }
            }
        }
    }

    /// Rows `r0..r0 + R` of `x` through every layer (before softplus); returns `R`.
    ///
    /// # Safety
    /// As [`forward`], and `r0 + R <= x.nrows()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize>(
        model: &Autoencoder,
        x: ArrayView2<f32>,
        ws: &mut Workspace,
        r0: usize,
    ) -> usize {
        let d = model.n_features;
        let (rs, cs) = (x.strides()[0], x.strides()[1]);
        let last = model.layers.len() - 1;
        let hidden = ws.hidden.as_mut_ptr();
        // SAFETY (whole body): pointer offsets stay inside `x` (rows < n, columns < d), the
        // staging rows (INTERLEAVE × pad8(d) floats), each hidden layer's region (INTERLEAVE ×
        // pad8(width) floats) and output rows r0..r0 + R (out_stride floats each, below the
        // capacity); `dense` reads n_in (padded: pad8(n_in)) floats of each input and writes
        // within pad8(n_out) floats of each output.
        unsafe {
            let mut src: [*const f32; R] = std::array::from_fn(|i| {
                let row = x.as_ptr().offset((r0 + i) as isize * rs);
                if cs == 1 || d == 1 {
                    row
                } else {
                    let staged = ws.x_rows.as_mut_ptr().add(i * pad8(d));
                    for j in 0..d {
                        *staged.add(j) = *row.offset(j as isize * cs);
                    }
                    staged.cast_const()
                }
            });
            for (l, layer) in model.layers[..last].iter().enumerate() {
                let width = pad8(layer.outputs());
                let dst: [*mut f32; R] =
                    std::array::from_fn(|i| hidden.add(ws.hidden_at[l] + i * width));
                dense::<R>(Rows::of(layer, 0, layer.outputs(), l > 0), src, dst);
                src = dst.map(<*mut f32>::cast_const);
            }
            let y: [*mut f32; R] =
                std::array::from_fn(|i| ws.out.as_mut_ptr().add((r0 + i) * ws.out_stride));
            let top = &model.layers[last];
            let m = model.recon_width();
            dense::<R>(Rows::of(top, 0, m, last > 0), src, y);
            if model.output == OutputKind::Probabilistic {
                dense::<R>(
                    Rows::of(top, m, m, last > 0),
                    src,
                    y.map(|p| p.add(ws.var_offset)),
                );
            }
        }
        R
    }

    /// `y[i][o] = act(W[o] · x[i] + b[o])` for `R` input rows, in blocks of 8 (row, output)
    /// pairs: `8 / R` outputs of each row (`R` is 1 or 2). Each pair's dot product is summed in the same order
    /// whatever `R` is. Outputs past `n_out` (up to a whole block) are written as 0.
    ///
    /// # Safety
    /// `rows` points at valid weights and biases, each `x[i]` is readable for `rows.n_in` floats
    /// (`pad8(rows.n_in)` if `padded_x`, with zeros past `n_in`) and each `y[i]` writable for
    /// `pad8(rows.n_out)` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dense<const R: usize>(rows: Rows, x: [*const f32; R], y: [*mut f32; R]) {
        let outs = 8 / R;
        let n_in = rows.n_in;
        let (full, rem) = (n_in / 8, n_in % 8);
        let tail = first_lanes(rem);
        let zero = _mm256_setzero_ps();
        let mut o = 0;
        while o < rows.n_out {
            let valid = (rows.n_out - o).min(outs);
            // SAFETY: row o + min(j, valid - 1) < n_out, and each row holds n_in floats, of which
            // the full vectors and the masked tail read only the first n_in; x likewise unless
            // it is padded.
            unsafe {
                // Rows past n_out repeat the last one; their lanes are dropped below.
                let first = rows.w.add(o * n_in);
                let w: [*const f32; 8] = if valid == outs {
                    std::array::from_fn(|j| first.add(j * n_in))
                } else {
                    std::array::from_fn(|j| first.add(j.min(valid - 1) * n_in))
                };
                let mut acc = [zero; 8];
                for c in 0..full {
                    let xv: [__m256; R] = std::array::from_fn(|i| _mm256_loadu_ps(x[i].add(8 * c)));
                    let wv: [__m256; 8] = std::array::from_fn(|j| {
                        if j < outs {
                            _mm256_loadu_ps(w[j].add(8 * c))
                        } else {
                            zero
                        }
                    });
                    for s in 0..8 {
                        acc[s] = _mm256_fmadd_ps(wv[s % outs], xv[s / outs], acc[s]);
                    }
                }
                if rem > 0 {
                    // A padded input takes a plain load, which the store that wrote it can
                    // forward; a masked load would wait for that store to retire.
                    let xv: [__m256; R] = std::array::from_fn(|i| {
                        if rows.padded_x {
                            _mm256_loadu_ps(x[i].add(8 * full))
                        } else {
                            _mm256_maskload_ps(x[i].add(8 * full), tail)
                        }
                    });
                    let wv: [__m256; 8] = std::array::from_fn(|j| {
                        if j < outs {
                            _mm256_maskload_ps(w[j].add(8 * full), tail)
                        } else {
                            zero
                        }
                    });
                    for s in 0..8 {
                        acc[s] = _mm256_fmadd_ps(wv[s % outs], xv[s / outs], acc[s]);
                    }
                }
                let (bias, keep) = bias_and_mask::<R>(rows.b.add(o), valid);
                let mut v = _mm256_add_ps(sum_lanes(&acc), bias);
                if rows.relu {
                    // max(0, v) returns its second operand for NaN, so NaN survives.
                    v = _mm256_max_ps(zero, v);
                }
                store::<R>(_mm256_and_ps(v, keep), y, o);
            }
            o += outs;
        }
    }

    /// The biases of a block (lane `s` holds `b[s % (8 / R)]`, 0 past `valid`) and the mask of
    /// its valid lanes.
    ///
    /// # Safety
    /// `b` is readable for `valid` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bias_and_mask<const R: usize>(b: *const f32, valid: usize) -> (__m256, __m256) {
        // SAFETY: only the first `valid` biases are read.
        unsafe {
            match R {
                1 => {
                    let keep = first_lanes(valid);
                    (_mm256_maskload_ps(b, keep), _mm256_castsi256_ps(keep))
                }
                _ => {
                    debug_assert_eq!(R, 2);
                    let keep = _mm256_castsi256_si128(first_lanes(valid));
                    let bias = _mm_maskload_ps(b, keep);
                    let keep = _mm_castsi128_ps(keep);
                    (_mm256_set_m128(bias, bias), _mm256_set_m128(keep, keep))
                }
            }
        }
    }

    /// Writes lanes `[i·8/R, (i+1)·8/R)` of `v` to `y[i][o..]`.
    ///
    /// # Safety
    /// Each `y[i] + o` is writable for `8 / R` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store<const R: usize>(v: __m256, y: [*mut f32; R], o: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match R {
                1 => _mm256_storeu_ps(y[0].add(o), v),
                _ => {
                    debug_assert_eq!(R, 2);
                    _mm_storeu_ps(y[0].add(o), _mm256_castps256_ps128(v));
                    _mm_storeu_ps(y[1].add(o), _mm256_extractf128_ps::<1>(v));
                }
            }
        }
    }

    /// Lane `i` of the result is the sum of the 8 lanes of `a[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_lanes(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        // u0 = [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums of lanes 0-3 | 4-7; u1 the same for a4-a7.
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
        let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
        _mm256_add_ps(lo, hi)
    }

    /// Vectorised softplus, `max(z, 0) + log1p(e^−|z|)`, with Cephes' `expf` and `logf`
    /// polynomials (a few ulp). e^−|z| is clamped at e^−87 so it stays a normal float: for
    /// z < −87 the result is about 1.6e−38 instead of e^z. NaN propagates.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softplus(z: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        // a = −|z|, clamped; max returns its second operand for NaN.
        let a = _mm256_or_ps(z, _mm256_set1_ps(-0.0));
        let a = _mm256_max_ps(_mm256_set1_ps(-87.0), a);

        // t = e^a: a = k ln2 + r, |r| <= ln2 / 2.
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(a, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_359_4), a);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.121_944_4e-4), r);
        let r2 = _mm256_mul_ps(r, r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), one);
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        )));
        let t = _mm256_mul_ps(p, scale);

        // log1p(t) for t in (0, 1]: u = 1 + t rounded, c = what the rounding lost,
        // log1p(t) ≈ ln(u) + c / u.
        let u = _mm256_add_ps(one, t);
        let c = _mm256_sub_ps(t, _mm256_sub_ps(u, one));
        // ln(u) = e ln2 + ln(m), m = u or u / 2 so that m − 1 ∈ [√½ − 1, √2 − 1].
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(u, _mm256_set1_ps(std::f32::consts::SQRT_2));
        let e = _mm256_and_ps(big, one);
        let m = _mm256_blendv_ps(u, _mm256_mul_ps(u, _mm256_set1_ps(0.5)), big);
        let f = _mm256_sub_ps(m, one);
        let f2 = _mm256_mul_ps(f, f);
        let mut q = _mm256_set1_ps(7.037_683_6e-2);
        for c in LN_POLY {
            q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(c));
        }
        let mut y = _mm256_mul_ps(_mm256_mul_ps(q, f), f2);
        y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.121_944_4e-4), y);
        y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5), f2, y);
        let ln_u = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693_359_4), _mm256_add_ps(f, y));
        // 1/u from the 12-bit estimate and one Newton step (cheaper than a division); when t is
        // tiny, c / u is the whole answer, so it needs the full precision.
        let inv = _mm256_rcp_ps(u);
        let inv = _mm256_mul_ps(inv, _mm256_fnmadd_ps(u, inv, _mm256_set1_ps(2.0)));
        let log1p = _mm256_fmadd_ps(c, inv, ln_u);

        _mm256_add_ps(_mm256_max_ps(_mm256_setzero_ps(), z), log1p)
    }

    /// Applies the vector softplus to each value (for tests), if the CPU can.
    #[cfg(test)]
    pub(super) fn softplus_values(xs: &mut [f32]) -> bool {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return false;
        }
        #[target_feature(enable = "avx2,fma")]
        fn run(xs: &mut [f32]) {
            for chunk in xs.chunks_mut(8) {
                let mut lane = [0.0f32; 8];
                lane[..chunk.len()].copy_from_slice(chunk);
                // SAFETY: `lane` holds 8 floats.
                unsafe {
                    let v = softplus(_mm256_loadu_ps(lane.as_ptr()));
                    _mm256_storeu_ps(lane.as_mut_ptr(), v);
                }
                chunk.copy_from_slice(&lane[..chunk.len()]);
            }
        }
        // SAFETY: AVX2 and FMA were detected above.
        unsafe { run(xs) };
        true
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ShapeBuilder, array};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = Rng::new(seed);
        Array2::from_shape_simple_fn((rows, cols), || rng.uniform(-2.0, 2.0))
    }

    #[test]
    fn an_ensemble_reconstructs_as_its_members_do_alone_and_trains_them_apart() {
        for output in [OutputKind::Plain, OutputKind::Probabilistic] {
            let (d, k) = (6, 3);
            let mut merged = Autoencoder::ensemble(d, &[4, 3], output, k, 7);
            assert_eq!(merged.members, k);
            assert_eq!(merged.recon_width(), k * d);
            assert_eq!(merged.widths(), vec![d, 12, 9, k * output.output_width(d)]);
            merged.check_shapes().unwrap();
            let x = random(5, d, 1);
            let check = |merged: &Autoencoder, alone: &[Autoencoder]| {
                for mut ws in workspaces(merged, 8) {
                    let recon = merged.forward(x.view(), &mut ws);
                    let (mean, var) = (recon.mean.to_owned(), recon.var.map(|v| v.to_owned()));
                    for (m, member) in alone.iter().enumerate() {
                        let mut own = member.workspace(8);
                        let r = member.forward(x.view(), &mut own);
                        let cols = s![.., m * d..(m + 1) * d];
                        for (a, b) in mean.slice(cols).iter().zip(r.mean.iter()) {
                            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
                        }
                        if let (Some(v), Some(rv)) = (&var, r.var) {
                            for (a, b) in v.slice(cols).iter().zip(rv.iter()) {
                                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
                            }
                        }
                    }
                }
            };
            let mut alone: Vec<Autoencoder> = (0..k as u64)
                .map(|m| Autoencoder::new(d, &[4, 3], output, member_seed(7, m, 0)))
                .collect();
            check(&merged, &alone);

            // A gradient step on the merged network is each member's own step: the weights
            // joining members stay 0 and each member's loss is the one it has alone.
            let mut tws = merged.train_workspace(8);
            let mut grads = Gradients::zeros(&merged);
            let loss = merged.loss_and_grad(x.view(), &mut tws, &mut grads);
            let mut alone_loss = 0.0;
            for member in alone.iter_mut() {
                let mut t = member.train_workspace(8);
                let mut g = Gradients::zeros(member);
                alone_loss += member.loss_and_grad(x.view(), &mut t, &mut g);
                for (layer, g) in member.layers.iter_mut().zip(&g.w) {
                    layer.w.scaled_add(-0.1, g);
                }
                for (layer, g) in member.layers.iter_mut().zip(&g.b) {
                    layer.b.scaled_add(-0.1, g);
                }
            }
            assert!((loss - alone_loss / k as f64).abs() < 1e-4 * alone_loss.abs());
            for (layer, g) in merged.layers.iter_mut().zip(&grads.w) {
                layer.w.scaled_add(-0.1, g);
            }
            for (layer, g) in merged.layers.iter_mut().zip(&grads.b) {
                layer.b.scaled_add(-0.1, g);
            }
            merged.check_shapes().unwrap();
            check(&merged, &alone);

            // A weight joining two members is refused.
            merged.layers[1].w[[0, 11]] = 0.5;
            assert!(
                merged
                    .check_shapes()
                    .unwrap_err()
                    .contains("joins two ensemble members")
            );
        }
    }

    /// Workspaces for every kernel this machine can run (the portable one always).
    fn workspaces(model: &Autoencoder, max_batch: usize) -> Vec<Workspace> {
        let native = model.workspace(max_batch);
        let portable = native.clone().portable();
        if native.kernel == Kernel::Portable {
            vec![portable]
        } else {
            vec![native, portable]
        }
    }

    // ---- reference maths in f64, written independently of the kernels ----

    type RefLayer = (Array2<f64>, Array1<f64>, Activation);

    fn to_f64(model: &Autoencoder) -> Vec<RefLayer> {
        model
            .layers
            .iter()
            .map(|l| (l.w.mapv(f64::from), l.b.mapv(f64::from), l.act))
            .collect()
    }

    fn softplus64(x: f64) -> f64 {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }

    fn ref_loss(layers: &[RefLayer], output: OutputKind, x: &Array2<f64>) -> f64 {
        let d = x.ncols();
        let mut total = 0.0;
        for row in x.rows() {
            let mut a: Vec<f64> = row.to_vec();
            for (w, b, act) in layers {
                a = (0..w.nrows())
                    .map(|o| {
                        let z: f64 = b[o] + (0..w.ncols()).map(|k| w[[o, k]] * a[k]).sum::<f64>();
                        if *act == Activation::Relu {
                            z.max(0.0)
                        } else {
                            z
                        }
                    })
                    .collect();
            }
            for j in 0..d {
                let e = row[j] - a[j];
                total += match output {
                    OutputKind::Plain => e * e,
                    OutputKind::Probabilistic => {
                        let v = softplus64(a[d + j]) + 1e-5;
                        e * e / v + v.ln()
                    }
                };
            }
        }
        total / x.nrows() as f64
    }

    fn check_gradients(output: OutputKind) {
        let model = Autoencoder::new(5, &[4, 3, 4], output, 11);
        let x = random(7, 5, 12);
        let mut tws = model.train_workspace(4); // smaller than the batch: must grow
        let mut grads = Gradients::zeros(&model);
        let loss = model.loss_and_grad(x.view(), &mut tws, &mut grads);

        let x64 = x.mapv(f64::from);
        let base = to_f64(&model);
        let ref_value = ref_loss(&base, output, &x64);
        assert!(
            (loss - ref_value).abs() <= 1e-5 * ref_value.abs().max(1.0),
            "{loss} vs {ref_value}"
        );

        // Central differences in f64 for every parameter.
        let h = 1e-6;
        let mut numeric: Vec<(String, f64, f64)> = Vec::new();
        for l in 0..base.len() {
            for idx in 0..base[l].0.len() {
                let (o, k) = (idx / base[l].0.ncols(), idx % base[l].0.ncols());
                let mut p = base.clone();
                p[l].0[[o, k]] += h;
                let up = ref_loss(&p, output, &x64);
                p[l].0[[o, k]] -= 2.0 * h;
                let down = ref_loss(&p, output, &x64);
                numeric.push((
                    format!("w{l}[{o},{k}]"),
                    (up - down) / (2.0 * h),
                    grads.w[l][[o, k]].into(),
                ));
            }
            for o in 0..base[l].1.len() {
                let mut p = base.clone();
                p[l].1[o] += h;
                let up = ref_loss(&p, output, &x64);
                p[l].1[o] -= 2.0 * h;
                let down = ref_loss(&p, output, &x64);
                numeric.push((
                    format!("b{l}[{o}]"),
                    (up - down) / (2.0 * h),
                    grads.b[l][o].into(),
                ));
            }
        }
        assert_eq!(numeric.len(), model.parameter_count());
        let scale = numeric.iter().map(|(_, n, _)| n.abs()).fold(0.0, f64::max);
        assert!(scale > 1e-3, "degenerate check: all gradients ~0");
        for (name, num, ana) in &numeric {
            let tol = 1e-3 * num.abs() + 1e-5 * scale;
            assert!(
                (num - ana).abs() <= tol,
                "{output:?} {name}: analytic {ana}, numeric {num}"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_plain() {
        check_gradients(OutputKind::Plain);
    }

    #[test]
    fn gradients_match_finite_differences_probabilistic() {
        check_gradients(OutputKind::Probabilistic);
    }

    fn tiny(output: OutputKind) -> Autoencoder {
        let out = match output {
            OutputKind::Plain => (array![[2.0], [-1.0]], array![0.1, 0.2]),
            OutputKind::Probabilistic => (
                array![[2.0], [-1.0], [1.0], [-3.0]],
                array![0.1, 0.2, 0.0, 0.5],
            ),
        };
        Autoencoder {
            n_features: 2,
            output,
            layers: vec![
                Dense {
                    w: array![[1.0, -2.0]],
                    b: array![0.5],
                    act: Activation::Relu,
                },
                Dense {
                    w: out.0,
                    b: out.1,
                    act: Activation::Identity,
                },
            ],
            members: 1,
        }
    }

    #[test]
    fn forward_matches_hand_computation() {
        let x = array![[3.0f32, 1.0], [1.0, 2.0]];
        // Row 0: h = relu(3 − 2 + 0.5) = 1.5. Row 1: h = relu(1 − 4 + 0.5) = 0.
        let mean = array![[3.1f32, -1.3], [0.1, 0.2]];
        // Raw variance row 0: [1.5, −4.0]; row 1: [0.0, 0.5]; softplus by hand:
        // ln(1 + e^1.5) = 1.7014132, ln(1 + e^−4) = 0.0181499, ln 2 = 0.6931472, ln(1 + e^0.5) = 0.9740770.
        let var = array![
            [1.701_413_2f32, 0.018_149_9],
            [std::f32::consts::LN_2, 0.974_077]
        ];
        for output in [OutputKind::Plain, OutputKind::Probabilistic] {
            let model = tiny(output);
            for mut ws in workspaces(&model, 2) {
                let kernel = ws.kernel;
                let r = model.forward(x.view(), &mut ws);
                for (a, b) in r.mean.iter().zip(&mean) {
                    assert!((a - b).abs() < 1e-6, "{kernel:?} mean {a} vs {b}");
                }
                match output {
                    OutputKind::Plain => assert!(r.var.is_none()),
                    OutputKind::Probabilistic => {
                        let v = r.var.expect("probabilistic output has a variance");
                        assert_eq!(v.dim(), (2, 2));
                        for (a, b) in v.iter().zip(&var) {
                            assert!((a - b).abs() < 1e-6, "{kernel:?} var {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn batch_forward_equals_row_by_row_and_ignores_strides() {
        let model = Autoencoder::new(38, &[19, 10, 19], OutputKind::Probabilistic, 3);
        let x = random(37, 38, 4);
        // The same values with column stride 37 (Fortran order) and reversed columns.
        let mut fortran = Array2::zeros((37, 38).f());
        fortran.assign(&x);
        let mut reversed = x.clone();
        reversed.invert_axis(ndarray::Axis(1));
        for mut ws in workspaces(&model, 64) {
            let batch = model.forward(x.view(), &mut ws);
            let (mean, var) = (
                batch.mean.to_owned(),
                batch.var.map(|v| v.to_owned()).expect("var"),
            );
            for r in 0..x.nrows() {
                let one = model.forward(x.slice(s![r..r + 1, ..]), &mut ws);
                assert_eq!(one.mean.row(0), mean.row(r));
                assert_eq!(one.var.expect("var").row(0), var.row(r));
            }
            let f = model.forward(fortran.view(), &mut ws);
            assert_eq!(f.mean, mean);
            assert_eq!(f.var.expect("var"), var);
            let mut rev = model.forward(reversed.view(), &mut ws).mean.to_owned();
            rev.invert_axis(ndarray::Axis(1));
            // Reversed columns feed the model different inputs; just check it ran and is finite.
            assert!(rev.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn simd_and_portable_kernels_agree() {
        for output in [OutputKind::Plain, OutputKind::Probabilistic] {
            for (d, hidden) in [
                (38, vec![19, 10, 19]),
                (7, vec![3]),
                (9, vec![]),
                (1, vec![1]),
            ] {
                let model = Autoencoder::new(d, &hidden, output, d as u64);
                let x = random(13, d, 5);
                let mut ws = workspaces(&model, 13);
                let expect = model
                    .forward(x.view(), ws.last_mut().expect("portable"))
                    .mean
                    .to_owned();
                let expect_var = ws
                    .last_mut()
                    .map(|w| model.forward(x.view(), w).var.map(|v| v.to_owned()));
                let first = &mut ws[0];
                let r = model.forward(x.view(), first);
                for (a, b) in r.mean.iter().zip(&expect) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "d={d} {a} vs {b}");
                }
                if let (Some(v), Some(Some(e))) = (r.var, expect_var) {
                    for (a, b) in v.iter().zip(&e) {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "d={d} var {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn forward_agrees_with_f64_reference() {
        let model = Autoencoder::new(10, &[5, 3, 5], OutputKind::Probabilistic, 8);
        let x = random(5, 10, 9);
        for mut ws in workspaces(&model, 5) {
            // The mean loss through `loss` covers mean and variance against the reference.
            let got = model.loss(x.view(), &mut ws);
            let want = ref_loss(
                &to_f64(&model),
                OutputKind::Probabilistic,
                &x.mapv(f64::from),
            );
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn softplus_is_stable_for_large_magnitudes() {
        let xs = [
            -1e30f32, -1000.0, -100.0, -88.0, -30.0, -1.0, 0.0, 1e-3, 1.0, 20.0, 100.0, 1000.0,
            1e30,
        ];
        for &x in &xs {
            let s = softplus(x);
            let want = softplus64(f64::from(x));
            assert!(s.is_finite() && s >= 0.0, "softplus({x}) = {s}");
            assert!(
                (f64::from(s) - want).abs() <= 1e-6 * want.max(1e-30) + 1e-38,
                "softplus({x}) = {s}"
            );
        }
        assert_eq!(softplus(f32::INFINITY), f32::INFINITY);
        assert_eq!(softplus(f32::NEG_INFINITY), 0.0);
        assert!(softplus(f32::NAN).is_nan());

        // The vector kernel: a fine sweep against f64, plus the extremes.
        let mut sweep: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        sweep.extend_from_slice(&xs);
        sweep.extend_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        let portable: Vec<f32> = sweep.iter().map(|&x| portable::softplus_poly(x)).collect();
        let mut kernels = vec![("portable", portable)];
        #[cfg(target_arch = "x86_64")]
        {
            let mut got = sweep.clone();
            if avx::softplus_values(&mut got) {
                kernels.push(("avx2", got));
            }
        }
        for (kernel, got) in kernels {
            check_softplus(kernel, &sweep, &got);
        }
    }

    fn check_softplus(kernel: &str, sweep: &[f32], got: &[f32]) {
        for (&x, &s) in sweep.iter().zip(got) {
            if x.is_nan() {
                assert!(s.is_nan());
                continue;
            }
            let want = softplus64(f64::from(x));
            if x == f32::INFINITY {
                assert_eq!(s, x);
            } else if x < -87.0 {
                // Clamped: e^x is below the smallest normal float; anything that tiny is 0 here.
                assert!((0.0..2e-38).contains(&s), "{kernel} softplus({x}) = {s}");
            } else {
                let err = (f64::from(s) - want).abs() / want;
                assert!(
                    err < 1e-6,
                    "vector softplus({x}) = {s}, want {want}, rel err {err}"
                );
            }
        }
    }

    #[test]
    fn huge_raw_variance_stays_finite() {
        let mut model = tiny(OutputKind::Probabilistic);
        model.layers[1].b[2] = 1e6;
        model.layers[1].b[3] = -1e6;
        for mut ws in workspaces(&model, 1) {
            let r = model.forward(array![[3.0f32, 1.0]].view(), &mut ws);
            let v = r.var.expect("var");
            assert_eq!(v[[0, 0]], 1e6 + 1.5);
            assert!(v[[0, 1]] >= 0.0 && v[[0, 1]] < 1e-30);
        }
    }

    #[test]
    fn workspace_grows_past_max_batch() {
        let model = Autoencoder::new(6, &[3], OutputKind::Probabilistic, 1);
        let x = random(10, 6, 2);
        for mut small in workspaces(&model, 2) {
            let mut big = model.workspace(10);
            if small.kernel == Kernel::Portable {
                big = big.portable();
            }
            let want = model.forward(x.view(), &mut big).mean.to_owned();
            assert_eq!(model.forward(x.view(), &mut small).mean, want);
            assert!(small.capacity() >= 10);
            let mut empty = model.workspace(0);
            assert_eq!(
                model.forward(x.slice(s![..0, ..]), &mut empty).mean.dim(),
                (0, 6)
            );
            assert_eq!(model.forward(x.view(), &mut empty).mean.dim(), (10, 6));
        }
    }

    #[test]
    fn workspace_adapts_to_a_model_of_another_shape() {
        let a = Autoencoder::new(6, &[3], OutputKind::Plain, 1);
        let b = Autoencoder::new(6, &[4, 2, 4], OutputKind::Probabilistic, 2);
        let x = random(4, 6, 3);
        let mut ws = a.workspace(4);
        let _ = a.forward(x.view(), &mut ws);
        let got = b.forward(x.view(), &mut ws).mean.to_owned();
        assert_eq!(got, b.forward(x.view(), &mut b.workspace(4)).mean);
    }

    #[test]
    fn non_standard_weight_layout_gives_the_same_output() {
        let model = Autoencoder::new(9, &[5], OutputKind::Probabilistic, 4);
        let mut fortran = model.clone();
        for l in &mut fortran.layers {
            let mut w = Array2::zeros(l.w.dim().f());
            w.assign(&l.w);
            l.w = w;
        }
        let x = random(3, 9, 5);
        let mut ws = model.workspace(3).portable();
        let want = model.forward(x.view(), &mut ws).mean.to_owned();
        // Strided weights take the plain loop (another summation order) whatever the CPU.
        for mut ws in workspaces(&model, 3) {
            let got = fortran.forward(x.view(), &mut ws).mean.to_owned();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn new_follows_pytorch_init_and_is_seeded() {
        let m = Autoencoder::new(38, &[19, 10, 19], OutputKind::Probabilistic, 5);
        assert_eq!(m.widths(), vec![38, 19, 10, 19, 76]);
        assert!(m.check_shapes().is_ok());
        let acts: Vec<_> = m.layers.iter().map(|l| l.act).collect();
        assert_eq!(
            acts,
            [
                Activation::Relu,
                Activation::Relu,
                Activation::Relu,
                Activation::Identity
            ]
        );
        for l in &m.layers {
            let bound = 1.0 / (l.inputs() as f32).sqrt();
            assert!(l.w.iter().chain(&l.b).all(|v| v.abs() <= bound));
            // Spread over the interval, not a constant.
            assert!(l.w.iter().any(|v| *v > 0.5 * bound) && l.w.iter().any(|v| *v < -0.5 * bound));
        }
        assert_eq!(
            m,
            Autoencoder::new(38, &[19, 10, 19], OutputKind::Probabilistic, 5)
        );
        assert_ne!(
            m,
            Autoencoder::new(38, &[19, 10, 19], OutputKind::Probabilistic, 6)
        );
    }

    #[test]
    fn check_shapes_names_the_bad_layer() {
        let mut m = Autoencoder::new(4, &[2], OutputKind::Plain, 0);
        m.layers[1].b = Array1::zeros(3);
        assert!(m.check_shapes().unwrap_err().contains("layer 1"));
    }

    #[test]
    fn empty_batch_gives_zero_loss_and_gradients() {
        let model = Autoencoder::new(4, &[2], OutputKind::Probabilistic, 0);
        let mut tws = model.train_workspace(8);
        let mut grads = Gradients::zeros(&model);
        grads.w[0].fill(1.0);
        let x = Array2::<f32>::zeros((0, 4));
        assert_eq!(model.loss_and_grad(x.view(), &mut tws, &mut grads), 0.0);
        assert_eq!(grads, Gradients::zeros(&model));
        assert_eq!(model.loss(x.view(), &mut model.workspace(1)), 0.0);
    }
}
