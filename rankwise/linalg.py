"""Shared numerics. Every method that needs one of these calls it from here; none re-implements it.

Conventions: weights are `out x in` (PyTorch Linear layout); factorisations return factors whose
product reproduces the input (`B @ A ~= W`, `B: out x r`, `A: r x in`).
"""
from __future__ import annotations

import contextlib

import functools
import math

import torch


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of a 2-D tensor, computed in float32 (or float64 if given).

    Returns `(U[:, :r], S[:r], Vh[:r, :])`.
    """
    if weight.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(weight.shape)}")
    work = weight if weight.dtype == torch.float64 else weight.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank, :]


def canonical_svd_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs (u_i, v_i) -> (-u_i, -v_i) so that each u_i's largest-magnitude entry is positive.

    An SVD fixes each pair only up to a joint sign, and LAPACK builds (MKL, OpenBLAS, cuSOLVER) choose
    differently. Methods whose trained tensors live in singular-vector coordinates with off-diagonal
    mixing (SALT's X Y) need the same signs at load time as at training time; this convention gives them
    whatever the backend (except for nearly tied entries or repeated singular values, which no sign rule fixes).
    """
    if U.numel() == 0:
        return U, Vh
    rows = U.abs().argmax(0)
    signs = torch.sign(U.gather(0, rows[None]).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs[:, None]


def split_low_rank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation as two balanced factors `B = U sqrt(S)`, `A = sqrt(S) Vh`."""
    U, S, Vh = truncated_svd(weight, rank)
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def stable_rank(weight: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2: a smooth, scale-free measure of how many directions carry the energy."""
    S = torch.linalg.svdvals(weight.float())
    return float((S**2).sum() / S[0] ** 2) if S.numel() and S[0] > 0 else 0.0


def effective_rank(weight: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli, 2007)."""
    S = torch.linalg.svdvals(weight.float())
    p = S / S.sum().clamp_min(torch.finfo(S.dtype).tiny)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator whose stream depends only on `seed` (same numbers in every process)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


@functools.lru_cache(maxsize=64)
def _cached_random_basis(seed: int, shape: tuple[int, ...], distribution: str) -> torch.Tensor:
    generator = seeded_generator(seed)
    if distribution == "normal":
        basis = torch.randn(shape, generator=generator)
    elif distribution == "uniform":
        basis = torch.rand(shape, generator=generator) * 2 - 1
    elif distribution == "kaiming_uniform":
        fan_in = shape[-1]
        bound = math.sqrt(6.0 / fan_in) if fan_in else 0.0
        basis = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    else:
        raise ValueError(f"unknown distribution {distribution!r}: use 'normal', 'uniform' or 'kaiming_uniform'")
    basis.requires_grad_(False)
    return basis


def random_basis(seed: int, shape: tuple[int, ...], distribution: str = "normal", cache: bool = True) -> torch.Tensor:
    """A frozen random tensor regenerated from `(seed, shape)`; one shared copy per key.

    Random-basis methods (NOLA, RandLoRA, ...) never save these: they are rebuilt from the seed.
    The returned tensor is shared: treat it as read-only. `cache=False` skips the shared cache, for
    keys used once (per-layer seeds), so the cache does not keep tensors alive after their model is gone.
    """
    key = (int(seed), tuple(int(s) for s in shape), distribution)
    return _cached_random_basis(*key) if cache else _cached_random_basis.__wrapped__(*key)


@functools.lru_cache(maxsize=32)
def orthonormal_dct(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n x n orthonormal DCT-II matrix `D` (rows are basis vectors, `D @ D.T = I`)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.to(dtype)


def tucker_product(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """The Tucker tensor `core x_0 U_0 x_1 U_1 ... x_{N-1} U_{N-1}` (n-mode products).

    `core` has shape (r_0, ..., r_{N-1}) and `factors[i]` is (d_i, r_i); the result is (d_0, ..., d_{N-1}).
    Each step contracts the leading mode and appends the expanded one, so after N steps the modes are
    back in order.
    """
    if len(factors) != core.dim():
        raise ValueError(f"tucker_product: core has {core.dim()} modes but {len(factors)} factors were given")
    result = core
    for factor in factors:
        result = torch.tensordot(result, factor, dims=([0], [1]))
    return result


def distance_kernel(left: torch.Tensor, right: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """K[i, o] = sum_h c_h * ||left[h, i] - right[h, o]||_2 for factors (H, n_left, k), (H, n_right, k).

    A non-squared distance is a non-linear kernel of the inner product, so K is generically full rank even
    though each factor has only k columns (SNELL's "kernelised LoRA").
    """
    distances = torch.cdist(left, right, p=2)  # (H, n_left, n_right)
    return torch.einsum("h,hio->io", coefficients.to(distances.dtype), distances)


def competition_sparsify(matrix: torch.Tensor, sparsity: float, reweight: bool = True, at_zero: bool = False) -> torch.Tensor:
    """Keep the entries above the `sparsity` quantile of |matrix| (about a (1 - sparsity) share survives).

    reweight=True is SNELL's competition: survivors are multiplied by their own (detached) magnitude, so the
    forward value is sign(K) K^2 and the gradient of each survivor is scaled by |K|. reweight=False is a plain
    mask. The threshold is recomputed from the current values on every call (no index tensor is stored).
    sparsity = 0 returns the matrix as is, unless `at_zero` (SNELLA's reference code): then the threshold is the
    smallest |entry| (quantile 0) and the survivors are still reweighted.
    """
    if sparsity <= 0 and not at_zero:
        return matrix
    magnitude = matrix.detach().abs()
    k = min(max(int(round(sparsity * magnitude.numel())), 1), magnitude.numel())
    threshold = magnitude.flatten().kthvalue(k).values
    keep = magnitude > threshold
    return matrix * (magnitude * keep if reweight else keep.to(matrix.dtype))

# ---- added for the random-basis and factorisation adapters (NOLA, RandLoRA, SVFit, LoLDU, SALT) ----


def derive_seed(base_seed: int, *parts) -> int:
    """A seed that depends only on `base_seed` and `parts` (stable across processes, unlike `hash`)."""
    import zlib

    text = "/".join(str(p) for p in (int(base_seed), *parts))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=16)
def _cached_kaiming_sequence(seed: int, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = seeded_generator(seed)
    out = []
    for shape in shapes:
        tensor = torch.empty(shape, dtype=dtype)
        torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        out.append(tensor)
    return tuple(out)


def kaiming_sequence(seed: int, shapes, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Kaiming-uniform(a=sqrt(5)) tensors drawn one after another from one CPU generator seeded with `seed`.

    The draw order and `dtype` are part of the result: this is how PEFT seeds RandLoRA's and VeRA's
    shared projections (bf16 draws), so equal arguments reproduce PEFT's buffers bit for bit. Cached, read-only.
    """
    return _cached_kaiming_sequence(int(seed), tuple(tuple(int(s) for s in shape) for shape in shapes), dtype)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold at least `energy` of sum(sigma^2) (at least 1)."""
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return min(int((cumulative < energy - 1e-12).sum()) + 1, singular_values.numel())


def ldu_factors(weight: torch.Tensor, rank: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First `rank` factors of the pivoted LDU of a 2-D weight, in float32: `W = P L diag(D) U`.

    Returns `(PL, D, U)`: `PL = (P L)[:, :rank]` (out x rank, the permutation folded into L's rows, so no
    permutation is applied at run time), `D = diag(U)[:rank]`, `U = (D^-1 U)[:rank]` (rank x in, unit upper-
    triangular). Then `W = PL_full diag(D_full) U_full` exactly (up to float error). Raises ValueError naming
    the pivot if some |D_k| <= eps * max|W| among the first `rank` (a rank-deficient or zero weight).
    """
    if weight.dim() != 2:
        raise ValueError(f"ldu_factors expects a 2-D tensor, got shape {tuple(weight.shape)}")
    work = weight if weight.dtype == torch.float64 else weight.float()
    P, L, U = torch.linalg.lu(work)
    D = torch.diagonal(U)[:rank].clone()
    limit = eps * float(work.abs().max()) if work.numel() else 0.0
    small = (D.abs() <= limit).nonzero()
    if small.numel() or not work.numel():
        k = int(small[0]) if small.numel() else 0
        raise ValueError(
            f"pivot {k} of the LU factorisation is {float(D[k]) if D.numel() else 0.0:.3g}: the weight is rank-deficient "
            f"(or zero) within the first {rank} pivots, so its LDU split divides by zero there"
        )
    return L[P.argmax(1), :rank], D, U[:rank] / D[:, None]  # P @ L without the dense product


def diag_sandwich(x: torch.Tensor, right: torch.Tensor, diag: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """`x @ (left @ diag(diag) @ right).T` without forming the product: two skinny matmuls and a scale.

    `left: out x r`, `diag: r`, `right: r x in`; this is the delta path of every "train the diagonal of a
    factorisation" method (SVFit, LoLDU, SALT's top block).
    """
    return torch.nn.functional.linear(torch.nn.functional.linear(x, right) * diag, left)


# ---- mixed precision in custom autograd Functions ---------------------------------------------------------------
# Under torch.autocast the ops inside a Function's forward are autocast (matmuls run in bf16/fp16) but its backward is
# not: the output gradient arrives in the low dtype, the saved fp32 tensors stay fp32, and a mixed-dtype matmul fails.
# rankwise's fused Functions read the autocast dtype once in forward (`amp_dtype`), run their products explicitly in
# it with autocast off (forward and backward alike, so the numbers do not depend on where backward is called), and
# return every gradient in its input's dtype: fp32 adapter masters get fp32 gradients. Weight-sized sums (W + delta)
# are formed in the adapter's dtype and rounded once, as autocast rounds any fp32 weight it multiplies.


def amp_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `x`'s device, or None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def to_dtype(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """`t` in `dtype` (no copy when it already is, or when dtype or t is None)."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def autocast_off(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


@contextlib.contextmanager
def amp_forward(ctx, x: torch.Tensor):
    """The forward of a fused Function under the rule above: sets `ctx.amp` (the autocast dtype or None), turns
    autocast off and yields (x in that dtype, the dtype)::

        with amp_forward(ctx, x) as (x, amp):        # x: bf16 under bf16 autocast, unchanged without autocast
            return F.linear(x, to_dtype(weight, amp))
    """
    ctx.amp = amp = amp_dtype(x)
    with autocast_off(x):
        yield to_dtype(x, amp), amp


@contextlib.contextmanager
def amp_backward(grad_out: torch.Tensor, saved_input: torch.Tensor):
    """The backward's side: autocast off, the output gradient in the saved (compute-dtype) input's dtype."""
    with autocast_off(saved_input):
        yield to_dtype(grad_out, saved_input.dtype)


def fusable_dtypes(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a fused Function may take these operands: one dtype, or any dtypes under autocast (it casts them)."""
    return amp_dtype(x) is not None or all(t.dtype == x.dtype for t in tensors)


class FusedCoreLinear(torch.autograd.Function):
    """y = x (W + left core right)^T + b as one matmul in place of the frozen base call; `core` is a vector (a
    diagonal: LoLDU, SVFit) or a k x k matrix (SALT's scaled-and-shifted singular core).

    Trained through the core only, the update's gradient needs one token-sized product, G = g^T x, then
    grad core = left^T G right^T (its diagonal for a vector core). The skinny path instead adds four token-sized
    products per step, which dominate when the core's rank is near min(out, in). Saved: x and W + delta, which is
    no larger than the token x r activation the skinny path keeps when fusing pays (tokens > out), and spares
    re-forming it in backward (one or two out x k x in products, 6-20 % of a SALT layer's step).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, core, right):
        ctx.dtypes, ctx.has_bias = (x.dtype, None if bias is None else bias.dtype), bias is not None
        with amp_forward(ctx, x) as (x, amp):
            total = to_dtype(_core_weight(*(t.to(core.dtype) for t in (weight, left)), core, right.to(core.dtype)), amp)
            ctx.save_for_backward(x, total, left, core, right)
            return torch.nn.functional.linear(x, total, to_dtype(bias, amp))

    @staticmethod
    def backward(ctx, grad_out):
        x, total, left, core, right = ctx.saved_tensors
        grad_x = grad_bias = grad_core = None
        with amp_backward(grad_out, x) as g:
            g = g.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[0]:
                grad_x = (g @ total).view(x.shape).to(ctx.dtypes[0])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = g.sum(0).to(ctx.dtypes[1])
            if ctx.needs_input_grad[4]:
                # the token-sized product in the compute dtype; the k x in result in the core's
                left_grad = (to_dtype(left, x.dtype).T @ (g.T @ x.reshape(-1, x.shape[-1]))).to(core.dtype)  # k x in
                right = to_dtype(right, core.dtype)
                grad_core = (left_grad * right).sum(1) if core.dim() == 1 else left_grad @ right.T
        return grad_x, None, grad_bias, None, grad_core, None


def _core_weight(weight, left, core, right):
    return torch.addmm(weight, left * core if core.dim() == 1 else left @ core, right)


def fused_core_forward(x: torch.Tensor, layer, left: torch.Tensor, core: torch.Tensor, right: torch.Tensor):
    """The adapted output of a frozen linear `layer` (an AdaptedLayer) plus `left core right` as one matmul
    (`FusedCoreLinear`), or None when the weight trains, dtypes differ (forming W + delta in half precision would
    round the update away; under autocast W + delta is formed in the core's dtype and rounded once, see `amp_dtype`)
    or, for a diagonal core, when the skinny path is cheaper (small r, few tokens)."""
    weight = layer.weight_matrix()
    if layer.kind != "linear" or weight.requires_grad or not fusable_dtypes(x, weight, core, left):
        return None
    if core.dim() == 1:
        out_f, in_f = weight.shape
        tokens, r = x.numel() // in_f, core.shape[0]
        if torch.is_grad_enabled() and core.requires_grad:
            skinny, fused = 2 * tokens * r * (in_f + out_f), tokens * out_f * in_f + 3 * r * out_f * in_f
        else:
            skinny, fused = tokens * r * (in_f + out_f), r * out_f * in_f
        if fused >= skinny:
            return None
    return FusedCoreLinear.apply(x, weight, layer.base_layer.bias, left, core, right)


def flat_rank_limit(weight_shape: tuple[int, ...], kind: str) -> int:
    """Largest rank of a layer's weight viewed as a matrix (conv kernels as out x (in * kernel))."""
    if kind == "conv":
        return min(weight_shape[0], math.prod(weight_shape[1:]))
    return min(weight_shape[0], weight_shape[1])


def ternary_sequence(seed: int, shapes, sparsity: float) -> tuple[torch.Tensor, ...]:
    """Sparse random projections (Li, Hastie, Church 2006): entries -1 / 0 / +1 with P(+-1) = 1/(2 sparsity) each.

    Uniform draws one tensor after another from one CPU generator seeded with `seed` (PEFT's sparse RandLoRA
    recipe); float32, not normalised.
    """
    generator = seeded_generator(seed)
    out = []
    for shape in shapes:
        uniform = torch.rand(tuple(int(s) for s in shape), generator=generator)
        tensor = torch.zeros(uniform.shape)
        tensor[uniform < 1 / (2 * sparsity)] = -1
        tensor[uniform > 1 - 1 / (2 * sparsity)] = 1
        out.append(tensor)
    return tuple(out)

def dct_ortho(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of `x` along `dim` by one FFT (Makhoul, 1980): `x @ orthonormal_dct(n).T` in O(n log n).

    Equals `scipy.fft.dct(x, type=2, norm='ortho', axis=dim)`; works for any length n.
    """
    x = x.transpose(dim, -1)
    n = x.shape[-1]
    reordered = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(reordered.to(torch.float64 if x.dtype == torch.float64 else torch.float32), dim=-1)
    k = torch.arange(n, device=x.device, dtype=spectrum.real.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    out = (spectrum * twiddle).real * math.sqrt(2.0 / n)
    out[..., 0] /= math.sqrt(2.0)
    return out.to(x.dtype).transpose(dim, -1)
class SecondMoments:
    """Running `sum x`, `sum x xᵀ` and count over the rows of 2-D batches, accumulated in float64.

    Calibration statistics of compressors (AFM's output covariance, MoDeGPT's input correlations)
    sum millions of fp32 products; float64 keeps the small eigenvalues that decide truncation.
    """

    def __init__(self, dim: int, outer: bool = True):
        self.dim = int(dim)
        self.count = 0
        # `outer=False` keeps only the O(d) sums (ASVD needs E|x|, not the d x d matrix)
        self.with_outer = bool(outer)
        self.total = torch.zeros(self.dim, dtype=torch.float64)
        self.abs_total = torch.zeros(self.dim, dtype=torch.float64)  # ASVD's per-channel mean |x|
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64) if self.with_outer else None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float64)
        if rows.shape[-1] != self.dim:
            raise ValueError(f"SecondMoments expects rows of width {self.dim}, got {rows.shape[-1]}")
        self.count += rows.shape[0]
        home = self.total.device  # the sums stay on the CPU whatever device the activations come from
        self.total += rows.sum(0).to(home)
        self.abs_total += rows.abs().sum(0).to(home)
        if self.with_outer:
            self.outer += (rows.T @ rows).to(home)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def mean_abs(self) -> torch.Tensor:
        """`E|x_j|` per channel."""
        return self.abs_total / max(self.count, 1)

    def correlation(self) -> torch.Tensor:
        """`E[x xᵀ]` (uncentred)."""
        if self.outer is None:
            raise ValueError("these SecondMoments were collected with outer=False: no correlation matrix")
        return self.outer / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """`E[x xᵀ] - μ μᵀ` (centred, population normalisation)."""
        mu = self.mean()
        return self.correlation() - torch.outer(mu, mu)


def top_eigenvectors(symmetric: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` eigenpairs of a symmetric matrix, eigenvalues descending: `(values[k], vectors[n, k])`."""
    values, vectors = torch.linalg.eigh(symmetric)
    order = torch.argsort(values, descending=True)[:k]
    return values[order], vectors[:, order]


def psd_sqrt_and_inverse_sqrt(symmetric: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(C^{1/2}, C^{-1/2})` of a positive semi-definite matrix, with `ridge * mean(diag C)` added first.

    The relative ridge keeps `C^{-1/2}` finite when calibration activations are rank-deficient.
    """
    work = symmetric.to(torch.float64)
    if ridge > 0:
        work = work + ridge * work.diagonal().mean() * torch.eye(work.shape[0], dtype=work.dtype)
    values, vectors = torch.linalg.eigh(work)
    values = values.clamp_min(torch.finfo(values.dtype).tiny)
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T

def damped_cholesky(gram: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Lower-triangular `L` with `L Lᵀ = gram` (float64), and the diagonal shift that was needed (0.0 if none).

    Calibration Gram matrices `XᵀX` are PSD but often singular (dead channels, fewer rows than
    features) or, in floating point, slightly indefinite. Then the shift is
    `max(0, -lambda_min) + damping * mean(diag)` (times 10 per further failure), the smallest that
    makes the matrix positive definite with a margin relative to its scale.
    """
    work = gram.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(work)
    if int(info) == 0:
        return factor, 0.0
    scale = float(work.diagonal().mean().abs().clamp_min(torch.finfo(torch.float64).tiny))
    lowest = float(torch.linalg.eigvalsh(work)[0])
    eye = torch.eye(work.shape[0], dtype=work.dtype)
    relative = max(damping, 1e-12)
    for _ in range(12):
        shift = max(0.0, -lowest) + relative * scale
        factor, info = torch.linalg.cholesky_ex(work + shift * eye)
        if int(info) == 0:
            return factor, shift
        relative *= 10
    raise ValueError("damped_cholesky: the matrix stays indefinite after shifting; it has non-finite entries?")


def scaled_low_rank(weight: torch.Tensor, rank: int, scale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors `(up, down)` of `weight` that are optimal in the right-scaled norm `||(W - up down) S||_F`.

        W S = U Σ Vᵀ          (SVD of the scaled weight, float64)
        up   = U_k sqrt(Σ_k)               out x k
        down = sqrt(Σ_k) V_kᵀ S^{-1}       k x in

    so `(up @ down) S` is the rank-k truncation of `W S` and the loss is exactly the dropped `σ_i²`.
    `scale` is either a 1-D positive vector (a diagonal `S`, as in ASVD) or an invertible
    lower-triangular `in x in` matrix (a Cholesky factor of `XᵀX`, as in SVD-LLM: then
    `||X Wᵀ - X W'ᵀ||_F² = ||(W - W') S||_F²`). Returns `(up, down, all singular values of W S)`.
    """
    W = weight.detach().to(torch.float64)
    S = scale.to(device=W.device, dtype=torch.float64)
    scaled = W * S if S.dim() == 1 else W @ S
    U, sigma, Vh = torch.linalg.svd(scaled, full_matrices=False)
    root = sigma[:rank].sqrt()
    up = U[:, :rank] * root
    right = root[:, None] * Vh[:rank]  # k x in, still times S
    if S.dim() == 1:
        down = right / S
    else:  # right S^{-1}: solve Sᵀ downᵀ = rightᵀ with Sᵀ upper triangular
        down = torch.linalg.solve_triangular(S.T, right.T, upper=True).T
    return up, down, sigma


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """||estimate - target||_F / ||target||_F (the error every solver and its tests report)."""
    denominator = torch.linalg.norm(target)
    return float(torch.linalg.norm(estimate - target) / denominator.clamp_min(torch.finfo(denominator.dtype).tiny))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (length a power of 2).

    Equals `x @ scipy.linalg.hadamard(n)` in O(n log n); differentiable (built from reshapes and adds).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # pair entries h apart: (a, b) -> (a + b, a - b)
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int, j: int) -> float:
    """phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) in [0, 1] (Hu et al., LoRA, arXiv 2106.09685, sec. 7.2).

    `U1`, `U2` have orthonormal columns ordered by importance (e.g. left singular vectors).
    """
    overlap = U1[:, :i].T.double() @ U2[:, :j].double()
    return float((overlap**2).sum() / min(i, j))


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD `(U, S, Vh)` of the product `B @ A` (B: out x r, A: r x in) without forming it.

    QR of both factors reduces it to an r x r core: O((out + in) r^2) instead of O(out in min(out, in)).
    """
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().T)
    U_core, S, Vh_core = torch.linalg.svd(R_B @ R_A.T)
    return Q_B @ U_core, S, Vh_core @ Q_A.T

# ---- low-rank aggregation (federated adapters: FedIT / FLoRA stacking / LoRA-FAIR) -------------------


def _check_factor_lists(Bs, As, weights) -> None:
    if not (len(Bs) == len(As) == len(weights)) or not Bs:
        raise ValueError(f"need equally many B factors, A factors and weights (>= 1), got {len(Bs)}, {len(As)}, {len(weights)}")


def mean_of_products(Bs, As, weights) -> torch.Tensor:
    """`sum_k w_k B_k A_k` in float32 (`B_k: out x r_k`, `A_k: r_k x in`, ranks may differ): the exact average update."""
    _check_factor_lists(Bs, As, weights)
    return sum(float(w) * (B.float() @ A.float()) for B, A, w in zip(Bs, As, weights))


def stack_low_rank(Bs, As, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ranks so that `B_st @ A_st == sum_k w_k B_k A_k` exactly (FLoRA, arXiv 2409.05976).

    `B_st = [B_1, ..., B_K]` (out x sum r_k), `A_st = [w_1 A_1; ...; w_K A_K]` (sum r_k x in).
    """
    _check_factor_lists(Bs, As, weights)
    B_st = torch.cat([B.float() for B in Bs], dim=1)
    A_st = torch.cat([float(w) * A.float() for A, w in zip(As, weights)], dim=0)
    return B_st, A_st


def svd_ordered_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor `B A` (B: out x r, A: r x in) as `B' A'` with the SAME product, ordered so that the first k
    components `B'[:, :k] A'[:k]` are the best rank-k approximation of `B A` (Eckart-Young) for every k.

        A = L Q (Q: r x in, orthonormal rows)      B L = U S W^T (SVD, r x r core)
        A' = c W^T Q        B' = U S / c           c = ||A||_F / sqrt(r): A' keeps A's scale

    A' has orthonormal (scaled) rows whatever B is, so no component is dead for training (a zero singular value
    gives a zero column of B', like LoRA's B = 0 init, with a live row of A'). Costs one QR of A^T and one
    out x r SVD: `B A` (out x in) is never formed. Computed in float64, returned in A's and B's dtypes.
    """
    A64, B64 = A.double(), B.double()
    r = A64.shape[0]
    Q_t, R_t = torch.linalg.qr(A64.T)                    # A^T = Q_t R_t  ->  A = R_t^T Q_t^T = L Q
    U, S, Wh = torch.linalg.svd(B64 @ R_t.T, full_matrices=False)
    c = float(torch.linalg.matrix_norm(A64)) / r ** 0.5 or 1.0
    return (U * S / c).to(B.dtype), (c * (Wh @ Q_t.T)).to(A.dtype)


def ridge_right_solve(target_At: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
    """`X = argmin_X ||T - X A||_F^2 + lam ||X||_F^2` given only `T A^T` (`A: r x in`, result `out x r`).

    The normal equations give `X (A A^T + lam I) = T A^T`: one r x r solve, `T` (out x in) is never needed.
    With `lam = 0` and a rank-deficient `A` a pseudo-inverse is used (the least-squares minimiser of least norm).
    """
    A = A.double()
    gram = A @ A.T
    rhs = target_At.double()
    if lam > 0:
        gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
        return torch.linalg.solve(gram, rhs.T).T.float()  # gram is symmetric: X^T = gram^{-1} (T A^T)^T
    return (rhs @ torch.linalg.pinv(gram, hermitian=True)).float()

def factored_row_norms(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Row norms of the product `B @ A` (out x in) without forming it: ||(BA)_i||^2 = b_i^T (A A^T) b_i.

    Costs O(out r^2 + r^2 in) instead of O(out r in); computed in float32 (float64 if given).
    """
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, B = A.detach().to(work), B.detach().to(work)
    return ((B @ (A @ A.T)) * B).sum(1).clamp_min(0).sqrt()


def orthogonality_residual(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||A A^T - I||_F + ||B^T B - I||_F for LoRA factors A (r x in) and B (out x r): how far the rows of A
    and the columns of B are from orthonormal (the regulariser of AdaLoRA-style rank allocators)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)



@torch.no_grad()
def affine_map_of(module: torch.nn.Module, in_features: int, seed: int = 0,
                  rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(W, b)` with `module(x) == x @ W.T + b` for every `x` (in float64), or None when `module` is not affine.

        b = module(0)            W[:, j] = module(e_j) - b       check: module(x) ≈ x W^T + b on random x

    Works for any layer kind (factored, gathered, scattered...) without knowing its parameters: it is how a
    compressed layer is multiplied back into a dense `nn.Linear` of the original shape. The module is probed
    on a float64 copy, so the recovered W is exact up to the module's own rounding.
    """
    import copy

    probe = copy.deepcopy(module).double()
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    bias = probe(torch.zeros(1, in_features, dtype=torch.float64, device=device))[0]
    weight = (probe(torch.eye(in_features, dtype=torch.float64, device=device)) - bias).T.contiguous()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, in_features, generator=generator, dtype=torch.float64).to(device)
    got, want = probe(x), x @ weight.T + bias
    if not torch.allclose(got, want, rtol=rtol, atol=rtol * (1 + want.abs().max().item())):
        return None
    return weight, bias
