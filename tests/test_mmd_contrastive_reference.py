"""The SPEC §3 (MMD, NST) and §4 (InfoNCE) references against explicit loops, autograd and
the published formulas they name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.reference.contrastive import info_nce
from fastkd.reference.mmd import mmd_loss, nst_loss
from tests.helpers import DEVICE

KERNELS = ("gaussian", "laplacian", "polynomial")
F64 = torch.float64


def randn(*shape, dtype=F64, requires_grad=False):
    return torch.randn(shape, dtype=F64).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def close(actual: torch.Tensor, expected: float) -> None:
    assert actual.dtype == F64
    assert math.isclose(actual.item(), expected, rel_tol=1e-12, abs_tol=1e-12), (actual.item(), expected)


# ---- loop oracles: one pair, one channel, one row at a time, in Python floats --------------


def dot(a, b):
    return sum(u * v for u, v in zip(a, b, strict=True))


def loop_kernel(a, b, kernel, bandwidths, degree, c):
    if kernel == "polynomial":
        return (dot(a, b) / c + 1) ** degree
    sq = sum((u - v) ** 2 for u, v in zip(a, b, strict=True))
    if kernel == "gaussian":
        return sum(math.exp(-sq / (2 * s * s)) for s in bandwidths)
    return sum(math.exp(-math.sqrt(sq) / s) for s in bandwidths)


def loop_mmd(x, y, kernel, bandwidths=(0.5, 1.0, 2.0, 4.0, 8.0), unbiased=False, degree=2, c=1.0):
    x, y = x.tolist(), y.tolist()

    def mean_k(a, b, skip_diagonal):
        total, count = 0.0, 0
        for i, u in enumerate(a):
            for j, v in enumerate(b):
                if skip_diagonal and i == j:
                    continue
                total += loop_kernel(u, v, kernel, bandwidths, degree, c)
                count += 1
        return total / count

    return mean_k(x, x, unbiased) + mean_k(y, y, unbiased) - 2 * mean_k(x, y, False)


def loop_adaptive_pool(plane, out_h, out_w):
    """``F.adaptive_avg_pool2d`` of one (H, W) list-of-lists: bins [⌊iH/h⌋, ⌈(i+1)H/h⌉)."""
    h, w = len(plane), len(plane[0])
    out = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        row = []
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            cells = [plane[r][q] for r in range(r0, r1) for q in range(c0, c1)]
            row.append(sum(cells) / len(cells))
        out.append(row)
    return out


def loop_nst(s, t):
    out_h, out_w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])

    def channels(maps, n):
        vectors = []
        for plane in maps[n].tolist():
            flat = [v for row in loop_adaptive_pool(plane, out_h, out_w) for v in row]
            norm = max(math.sqrt(sum(v * v for v in flat)), 1e-12)
            vectors.append([v / norm for v in flat])
        return vectors

    def mean_k(a, b):
        return sum(dot(p, q) ** 2 for p in a for q in b) / (len(a) * len(b))

    total = 0.0
    for n in range(s.shape[0]):
        a, b = channels(s, n), channels(t, n)
        total += mean_k(b, b) + mean_k(a, a) - 2 * mean_k(a, b)
    return total / s.shape[0]


def loop_info_nce(q, k, temperature, labels):
    q, k = q.tolist(), k.tolist()
    total = 0.0
    for i, row in enumerate(q):
        logits = [dot(row, key) / temperature for key in k]
        top = max(logits)
        lse = top + math.log(sum(math.exp(z - top) for z in logits))
        total += lse - logits[labels[i]]
    return total / len(q)


# ---- MMD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", (False, True))
@pytest.mark.parametrize("shape", ((3, 5, 2), (4, 4, 1), (6, 2, 7)), ids=str)
def test_mmd_matches_loops(kernel, unbiased, shape):
    n, m, d = shape
    x, y = randn(n, d), randn(m, d)
    close(mmd_loss(x, y, kernel=kernel, unbiased=unbiased), loop_mmd(x, y, kernel, unbiased=unbiased))


@pytest.mark.parametrize("kernel", ("gaussian", "laplacian"))
@pytest.mark.parametrize("bandwidths", (1.3, (0.3, 1.7), [2.0]), ids=str)
def test_mmd_bandwidths(kernel, bandwidths):
    x, y = randn(4, 3), randn(5, 3)
    listed = (bandwidths,) if isinstance(bandwidths, float) else tuple(bandwidths)
    close(mmd_loss(x, y, kernel=kernel, bandwidths=bandwidths), loop_mmd(x, y, kernel, listed))


@pytest.mark.parametrize(("degree", "c"), ((1, 1.0), (3, 2.5), (4, 0.5)))
def test_mmd_polynomial_degree_and_c(degree, c):
    x, y = randn(4, 3), randn(3, 3)
    got = mmd_loss(x, y, kernel="polynomial", degree=degree, c=c, unbiased=True)
    close(got, loop_mmd(x, y, "polynomial", unbiased=True, degree=degree, c=c))


@pytest.mark.parametrize("kernel", KERNELS)
def test_mmd_single_rows(kernel):
    x, y = randn(1, 4), randn(1, 4)
    close(mmd_loss(x, y, kernel=kernel), loop_mmd(x, y, kernel))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", (False, True))
def test_mmd_gradcheck(kernel, unbiased):
    x, y = randn(4, 3, requires_grad=True), randn(3, 3, requires_grad=True)
    fn = lambda a, b: mmd_loss(a, b, kernel=kernel, unbiased=unbiased, bandwidths=(0.8, 2.0))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("kernel", KERNELS)
def test_mmd_of_a_sample_with_itself_is_zero_with_finite_gradient(kernel):
    x = randn(5, 3, requires_grad=True)
    loss = mmd_loss(x, x.detach().clone(), kernel=kernel)
    assert loss.item() == 0.0
    loss.backward()
    # a point's distance to itself is 0; the laplacian's gradient there must not be NaN
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max().item() < 1e-12


def test_mmd_is_a_two_sample_statistic():
    """Unbiased MMD² averages to ~0 for one distribution and is clearly positive for two."""
    gen = torch.Generator().manual_seed(1)
    same, shifted = [], []
    for _ in range(20):
        x, y = (torch.randn(48, 4, generator=gen, dtype=F64).to(DEVICE) for _ in range(2))
        same.append(mmd_loss(x, y, unbiased=True).item())
        shifted.append(mmd_loss(x, y + 0.75, unbiased=True).item())
        assert mmd_loss(x, y).item() >= 0  # the biased estimator is a squared norm
    mean_same, mean_shifted = sum(same) / len(same), sum(shifted) / len(shifted)
    assert min(shifted) > 0
    assert abs(mean_same) < 0.05 * mean_shifted, (mean_same, mean_shifted)


# ---- NST ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    (
        ((2, 3, 4, 4), (2, 5, 4, 4)),  # same spatial size, different channel counts
        ((1, 2, 3, 3), (1, 4, 5, 5)),  # N = 1; teacher pooled 5×5 → 3×3 (uneven bins)
        ((2, 4, 6, 6), (2, 3, 4, 4)),  # student pooled
        ((2, 2, 4, 6), (2, 3, 5, 3)),  # non-square: both pooled to 4×3
        ((3, 1, 1, 1), (3, 1, 2, 2)),  # one channel, one pixel
    ),
    ids=str,
)
def test_nst_matches_loops(s_shape, t_shape):
    s, t = randn(*s_shape), randn(*t_shape)
    close(nst_loss(s, t), loop_nst(s, t))


def test_nst_equals_gram_closed_form():
    """Σ_{c,c'} (a_c·b_c')² = ⟨AᵀA, BᵀB⟩_F with A = (C, HW): the form the fused kernels use."""
    s, t = randn(3, 4, 5, 5), randn(3, 6, 5, 5)
    a, b = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)

    def mean_k(u, v):
        gram_u, gram_v = u.transpose(1, 2) @ u, v.transpose(1, 2) @ v  # (N, HW, HW)
        return (gram_u * gram_v).sum(dim=(1, 2)) / (u.shape[1] * v.shape[1])

    closed = (mean_k(b, b) + mean_k(a, a) - 2 * mean_k(a, b)).mean()
    close(nst_loss(s, t), closed.item())


def test_nst_pools_the_larger_map():
    s_small, s_big = randn(2, 3, 4, 4), randn(2, 3, 8, 8)
    t_small, t_big = randn(2, 5, 4, 4), randn(2, 5, 8, 8)
    close(nst_loss(s_small, t_big), nst_loss(s_small, F.adaptive_avg_pool2d(t_big, (4, 4))).item())
    close(nst_loss(s_big, t_small), nst_loss(F.adaptive_avg_pool2d(s_big, (4, 4)), t_small).item())


def test_nst_of_identical_maps_is_zero():
    s = randn(2, 3, 4, 4)
    assert abs(nst_loss(s, s.clone()).item()) < 1e-14


@pytest.mark.parametrize(("s_shape", "t_shape"), (((2, 3, 3, 3), (2, 2, 3, 3)), ((1, 2, 2, 3), (1, 3, 4, 4))),
                         ids=str)
def test_nst_gradcheck(s_shape, t_shape):
    s, t = randn(*s_shape, requires_grad=True), randn(*t_shape, requires_grad=True)
    assert torch.autograd.gradcheck(nst_loss, (s, t))


# ---- InfoNCE --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), ((1, 1), (4, 4), (3, 7)))
@pytest.mark.parametrize("temperature", (0.07, 1.0, 3.5))
def test_info_nce_matches_loops_and_cross_entropy(n, m, temperature):
    q, k = randn(n, 5), randn(m, 5)
    got = info_nce(q, k, temperature=temperature)
    close(got, loop_info_nce(q, k, temperature, list(range(n))))
    close(got, F.cross_entropy(q @ k.T / temperature, torch.arange(n, device=DEVICE)).item())


def test_info_nce_single_pair_is_zero():
    q = randn(1, 3)
    assert info_nce(q, randn(1, 3)).item() == 0.0


def test_info_nce_labels():
    q, k = randn(5, 4), randn(3, 4)  # more queries than keys is fine with labels
    labels = torch.tensor([2, 0, 0, 1, 2], device=DEVICE)
    got = info_nce(q, k, temperature=0.5, labels=labels)
    close(got, loop_info_nce(q, k, 0.5, labels.tolist()))
    close(got, F.cross_entropy(q @ k.T / 0.5, labels).item())
    close(info_nce(q, k, labels=labels.int()), info_nce(q, k, labels=labels).item())


def test_info_nce_normalize():
    q, k = randn(4, 6), randn(6, 6)
    close(info_nce(q, k, normalize=True, temperature=0.2),
          info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1), temperature=0.2).item())


def test_info_nce_symmetric_is_clip():
    """CLIP: logits = s · img txtᵀ with s = 1/τ, (CE(logits, i) + CE(logitsᵀ, i)) / 2."""
    image, text = randn(6, 8), randn(6, 8)
    image_n, text_n = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    logits_per_image = image_n @ text_n.T / 0.07
    target = torch.arange(6, device=DEVICE)
    clip = (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2
    close(info_nce(image, text, symmetric=True, normalize=True), clip.item())
    forward = loop_info_nce(image, text, 1.0, list(range(6)))
    backward = loop_info_nce(text, image, 1.0, list(range(6)))
    close(info_nce(image, text, temperature=1.0, symmetric=True), (forward + backward) / 2)


@pytest.mark.parametrize(
    "kwargs",
    ({}, {"symmetric": True}, {"normalize": True, "temperature": 0.3}, {"labels": [1, 1, 0, 3]}),
    ids=str,
)
def test_info_nce_gradcheck(kwargs):
    kwargs = dict(kwargs)
    if "labels" in kwargs:
        kwargs["labels"] = torch.tensor(kwargs["labels"], device=DEVICE)
    q, k = randn(4, 3, requires_grad=True), randn(4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, **kwargs), (q, k))


# ---- shared contract: dtypes, NaN, layout -------------------------------------------------


CALLS = {
    "mmd": (lambda a, b: mmd_loss(a, b, kernel="laplacian"), (4, 3), (5, 3)),
    "nst": (nst_loss, (2, 3, 4, 4), (2, 2, 6, 6)),
    "info_nce": (lambda a, b: info_nce(a, b, normalize=True), (3, 4), (5, 4)),
}


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize(("dtype", "loss_dtype"), ((torch.float64, torch.float64),
                                                   (torch.float32, torch.float32),
                                                   (torch.float16, torch.float32),
                                                   (torch.bfloat16, torch.float32)), ids=str)
def test_loss_dtype_and_gradient_dtype(name, dtype, loss_dtype):
    fn, a_shape, b_shape = CALLS[name]
    a, b = randn(*a_shape, dtype=dtype, requires_grad=True), randn(*b_shape, dtype=dtype)
    loss = fn(a, b)
    assert loss.dtype == loss_dtype and loss.shape == ()
    loss.backward()
    assert a.grad.dtype == dtype
    # half-precision values are exact in float32 and float64: only the arithmetic differs
    expected = fn(a.detach().double(), b.double())
    rel_tol = 1e-12 if dtype == F64 else 1e-5
    assert math.isclose(loss.item(), expected.item(), rel_tol=rel_tol, abs_tol=1e-6)


@pytest.mark.parametrize("name", CALLS)
def test_nan_input_gives_nan_loss(name):
    fn, a_shape, b_shape = CALLS[name]
    a, b = randn(*a_shape), randn(*b_shape)
    a.view(-1)[1] = float("nan")
    assert torch.isnan(fn(a, b))


@pytest.mark.parametrize("name", CALLS)
def test_non_contiguous_inputs(name):
    fn, a_shape, b_shape = CALLS[name]
    a, b = randn(*a_shape), randn(*b_shape)
    a_strided, b_strided = (v.transpose(0, -1).contiguous().transpose(0, -1) for v in (a, b))
    assert not a_strided.is_contiguous() and not b_strided.is_contiguous()
    close(fn(a_strided, b_strided), fn(a, b).item())


# ---- invalid arguments ------------------------------------------------------------------------


def _bad_cases():
    x, y = randn(4, 3), randn(5, 3)
    s, t = randn(2, 3, 4, 4), randn(2, 2, 4, 4)
    lab = torch.tensor([0, 1, 2, 4], device=DEVICE)
    above, below = torch.tensor([0, 1, 2, 5], device=DEVICE), torch.tensor([0, -1, 2, 3], device=DEVICE)
    return [
        (r"^x must be a torch\.Tensor", lambda: mmd_loss([[1.0]], y)),
        (r"^x must have dtype in", lambda: mmd_loss(x.long(), y)),
        (r"^x must have shape \(rows, D\)", lambda: mmd_loss(randn(2, 4, 3), y)),
        (r"^x must have shape \(rows, D\)", lambda: mmd_loss(randn(0, 3), y)),
        (r"^y has feature dim 4 but x has 3", lambda: mmd_loss(x, randn(5, 4))),
        (r"^y dtype torch\.float32 does not match x", lambda: mmd_loss(x, y.float())),
        (r"^kernel must be one of", lambda: mmd_loss(x, y, kernel="rbf")),
        (r"^bandwidths must be >= 1e-150, got ", lambda: mmd_loss(x, y, bandwidths=0.0)),
        (r"^bandwidths must be a positive number", lambda: mmd_loss(x, y, bandwidths=())),
        (r"^bandwidths must be >= 1e-150, got ", lambda: mmd_loss(x, y, bandwidths=(1.0, -2.0))),
        (r"^bandwidths must be a positive number", lambda: mmd_loss(x, y, bandwidths="1")),
        (r"^degree must be an integer >= 1", lambda: mmd_loss(x, y, kernel="polynomial", degree=0)),
        (r"^degree must be an integer >= 1", lambda: mmd_loss(x, y, kernel="polynomial", degree=2.5)),
        (r"^c must be > 0", lambda: mmd_loss(x, y, kernel="polynomial", c=0.0)),
        (r"^unbiased must be a bool", lambda: mmd_loss(x, y, unbiased=1)),
        (r"^unbiased=True needs at least 2 rows in x", lambda: mmd_loss(randn(1, 3), y, unbiased=True)),
        (r"^unbiased=True needs at least 2 rows in y", lambda: mmd_loss(x, randn(1, 3), unbiased=True)),
        (r"^student_maps must have at least 4 dim", lambda: nst_loss(randn(2, 3, 4), t)),
        (r"^student_maps must have dtype in", lambda: nst_loss(s.int(), t)),
        (r"^teacher_maps must be a torch\.Tensor", lambda: nst_loss(s, "maps")),
        (r"^teacher_maps batch size 3 does not match", lambda: nst_loss(s, randn(3, 2, 4, 4))),
        (r"^teacher_maps dtype torch\.float32 does not match", lambda: nst_loss(s, t.float())),
        (r"^q must be a torch\.Tensor", lambda: info_nce(3.0, x)),
        (r"^q must have dtype in", lambda: info_nce(x.to(torch.int32), y)),
        (r"^k has feature dim 2 but q has 3", lambda: info_nce(x, randn(5, 2))),
        (r"^k must have at least as many rows as q", lambda: info_nce(x, randn(3, 3))),
        (r"^temperature must be > 0", lambda: info_nce(x, y, temperature=0.0)),
        (r"^temperature must be > 0", lambda: info_nce(x, y, temperature=-0.07)),
        (r"^temperature must be finite", lambda: info_nce(x, y, temperature=float("inf"))),
        (r"^labels must lie in \[0, M\)", lambda: info_nce(x, y, labels=above)),
        (r"^labels must lie in \[0, M\)", lambda: info_nce(x, y, labels=below)),
        (r"^labels must be an integer tensor", lambda: info_nce(x, y, labels=lab.double())),
        (r"^labels shape \(3,\) must be \(N,\)", lambda: info_nce(x, y, labels=lab[:3])),
        (r"^labels must be a torch\.Tensor", lambda: info_nce(x, y, labels=[0, 1, 2, 3])),
        (r"^labels must be None when symmetric=True",
         lambda: info_nce(x, randn(4, 3), labels=lab.clamp(max=3), symmetric=True)),
        (r"^symmetric=True needs as many rows in k as in q", lambda: info_nce(x, y, symmetric=True)),
        (r"^normalize must be a bool", lambda: info_nce(x, y, normalize="yes")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_invalid_arguments_raise_value_error_naming_the_argument(case):
    """Each message starts with the argument's name and says what is wrong."""
    pattern, call = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        call()
