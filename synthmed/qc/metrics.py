"""Quality-check metrics as pure functions of arrays: set distances, duplicates, diversity, label fidelity.

Nothing here loads a model or touches files: feature extractors (Inception, a chest X-ray
encoder) and the report live elsewhere and hand these functions plain ``numpy`` arrays. Every
function is deterministic; the only random draw (KID's subsets) comes from a seeded
``numpy.random.Generator``.

Sources of the ideas, adapted rather than copied:

- Fréchet distance: Heusel et al. 2017; the matrix square root with its ``eps * I`` retry
  follows ``mseitzer/pytorch-fid`` (``fid_score.calculate_frechet_distance``).
- KID: Bińkowski et al. 2018, "Demystifying MMD GANs" (cubic polynomial kernel, unbiased
  MMD^2 over random subsets), as in ``toshas/torch-fidelity``.
- Precision / recall / density / coverage: Naeem et al. 2020, "Reliable Fidelity and
  Diversity Metrics for Generative Models" (``clovaai/generative-evaluation-prdc``).
- Inception score: Salimans et al. 2016.
- dHash: the difference hash of ``JohannesBuchner/imagehash``.
- MS-SSIM: Wang, Simoncelli and Bovik 2003; the clamping of negative terms as in
  ``VainF/pytorch-msssim``. Intra-prompt MS-SSIM as a diversity measure: RoentGen
  (Chambon et al. 2022).
- Intensity bounds per region: MAISI's per-organ mean ± k·σ check (``Project-MONAI``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Hashable, Mapping, Sequence

import numpy as np

# Largest temporary matrix (in elements) the chunked routines build at once: 4M float64 = 32 MiB.
_BLOCK_ELEMENTS = 4_000_000

# Standard MS-SSIM scale weights (Wang et al. 2003, Table 1 / eq. 7), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03

# scipy.stats.chisquare's usual validity rule: every expected count at least this large.
MIN_EXPECTED_COUNT = 5.0


# ----------------------------------------------------------------------------- input checks


def _features(x, name: str) -> np.ndarray:
    """``x`` as a finite float64 [N, D] array, or a ValueError that names ``name``."""
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _same_width(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature dimension; got {a.shape} and {b.shape}")


def _image(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image [H, W]; got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _rows_per_block(width: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, width))


# ----------------------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2): the FID formula.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``. The square root
    is ``scipy.linalg.sqrtm``; if it comes back non-finite (a singular product), it is taken
    again of ``(sigma1 + eps I)(sigma2 + eps I)``. Imaginary parts from round-off are dropped
    when the largest one on the diagonal is at most ``1e-3 * max(1, |tr|)``; a larger one means
    the inputs are not covariance matrices and raises ValueError. Round-off can leave the
    result a hair below zero; it is clipped at 0.

    ``method="eigh"`` computes the same trace from symmetric eigendecompositions,
    ``tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})``, which agrees with ``sqrtm`` to round-off
    and is far faster for Inception's D = 2048 (about 3 s against about 65 s on two CPU
    cores; scipy >= 1.16's ``sqrtm`` is slow there). It needs no retry: eigenvalues below zero
    from round-off are clipped, and a clearly negative one raises ValueError.

    Args:
        mu1, mu2: float [D] means.
        sigma1, sigma2: float [D, D] covariance matrices (symmetric positive semi-definite).
        eps: diagonal offset used only for the singular-product retry of ``method="sqrtm"``.
        method: "sqrtm" (the reference route of pytorch-fid) or "eigh".

    Example:
        >>> frechet_distance([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [3.0, 4.0], [[1.0, 0.0], [0.0, 1.0]])
        25.0
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    dim = mu1.shape[0]
    for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)),
                               ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1; got {value.shape}")
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values")

    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh'; got {method!r}")
    diff = mu1 - mu2
    if method == "eigh":
        trace_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
        return max(distance, 0.0)
    with warnings.catch_warnings():
        # a singular product is handled by the retry below; scipy's warning would only be noise
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(dim) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("the matrix square root of sigma1 @ sigma2 is not finite, even with the eps * I offset")
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > 1e-3 * max(1.0, abs(float(np.trace(covmean).real))):
            raise ValueError(f"the matrix square root has a large imaginary component ({largest:.3g}); "
                             "are sigma1 and sigma2 covariance matrices?")
        covmean = covmean.real
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(distance, 0.0)


def _psd_eigenvalues(values: np.ndarray, name: str) -> np.ndarray:
    tolerance = 1e-6 * max(1.0, float(np.abs(values).max(initial=0.0)))
    if values.min(initial=0.0) < -tolerance:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {values.min():.3g})")
    return np.clip(values, 0.0, None)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) as tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the two products are similar."""
    from scipy import linalg

    values, vectors = linalg.eigh((sigma1 + sigma1.T) / 2.0)
    root1 = (vectors * np.sqrt(_psd_eigenvalues(values, "sigma1"))) @ vectors.T
    inner = root1 @ ((sigma2 + sigma2.T) / 2.0) @ root1
    inner_values = linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(_psd_eigenvalues(inner_values, "sigma1^1/2 sigma2 sigma1^1/2")).sum())


def fid_from_features(feats_a, feats_b, *, method: str = "sqrtm") -> float:
    """Fréchet Inception Distance between two feature sets (any encoder's features).

    Means and unbiased (``ddof=1``) covariances are taken over rows, then
    :func:`frechet_distance`. FID is biased upwards for small N; compare sets of equal size.

    Args:
        feats_a: float [N_a, D] features, N_a >= 2.
        feats_b: float [N_b, D] features, N_b >= 2.
        method: "sqrtm" or "eigh" (much faster at D = 2048), as in :func:`frechet_distance`.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 4))
        >>> round(fid_from_features(x, x), 6), round(fid_from_features(x, x + 1.0), 6)
        (0.0, 4.0)
    """
    a = _features(feats_a, "feats_a")
    b = _features(feats_b, "feats_b")
    _same_width(a, b, "feats_a", "feats_b")
    for name, value in (("feats_a", a), ("feats_b", b)):
        if value.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows for a covariance; got {value.shape[0]}")
    return frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1]),
                            b.mean(axis=0), np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1]),
                            method=method)


# ----------------------------------------------------------------------------- KID


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    # k(x, y) = (x.y / D + 1)^degree: gamma = 1/D, coef0 = 1, as in Bińkowski et al.
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int) -> float:
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x, degree)
    k_yy = _polynomial_kernel(y, y, degree)
    k_xy = _polynomial_kernel(x, y, degree)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid_from_features(feats_a, feats_b, *, subsets: int = 10, subset_size: int = 100,
                      degree: int = 3, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased polynomial-kernel MMD^2 averaged over random subsets.

    Each of ``subsets`` rounds draws ``m`` rows without replacement from each set (a
    ``numpy.random.default_rng(seed)`` generator, so the result is reproducible) and computes
    the unbiased MMD^2 with kernel ``(x.y / D + 1)^degree``. ``m = min(subset_size, N_a, N_b)``:
    a set smaller than ``subset_size`` is used whole rather than refused (as clean-fid does),
    in which case every round sees the same rows. MMD^2 is unbiased, so it can be slightly
    negative for sets from one distribution.

    Args:
        feats_a: float [N_a, D] features.
        feats_b: float [N_b, D] features.
        subsets: number of rounds (>= 1).
        subset_size: rows per set per round (m >= 2 after clamping).
        degree: polynomial kernel degree (>= 1).
        seed: seed of the subset generator.

    Returns:
        (mean, std) of the per-round MMD^2 values (std with ``ddof=0``, as torch-fidelity).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
        >>> mean, std = kid_from_features(x, y + 2.0, subsets=5, subset_size=50)
        >>> mean > 1.0, abs(kid_from_features(x, y, subsets=5, subset_size=50)[0]) < 0.1
        (True, True)
    """
    a = _features(feats_a, "feats_a")
    b = _features(feats_b, "feats_b")
    _same_width(a, b, "feats_a", "feats_b")
    if int(subsets) != subsets or subsets < 1:
        raise ValueError(f"subsets must be a positive integer; got {subsets!r}")
    if int(degree) != degree or degree < 1:
        raise ValueError(f"degree must be a positive integer; got {degree!r}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per subset; got subset_size={subset_size!r} "
                         f"with {a.shape[0]} and {b.shape[0]} rows")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(subsets)):
        rows_a = rng.choice(a.shape[0], m, replace=False)
        rows_b = rng.choice(b.shape[0], m, replace=False)
        values.append(_unbiased_mmd2(a[rows_a], b[rows_b], int(degree)))
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------- PRDC


def _kth_neighbour_distances(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the row itself sits at index 0)."""
    from scipy.spatial.distance import cdist

    radii = np.empty(points.shape[0])
    step = _rows_per_block(points.shape[0])
    for start in range(0, points.shape[0], step):
        block = cdist(points[start:start + step], points)
        radii[start:start + step] = np.partition(block, k, axis=1)[:, k]
    return radii


def precision_recall_density_coverage(real, fake, *, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al. 2020).

    Each sample's ball has the radius of its k-th nearest neighbour within its own set
    (Euclidean). Precision: fraction of fake samples inside some real ball. Recall: fraction of
    real samples inside some fake ball. Density: mean number of real balls containing a fake
    sample, divided by k (about 1 when the sets match; can exceed 1). Coverage: fraction of real
    balls containing at least one fake sample. "Inside" is strict (``<``), as in the authors'
    code, which makes identical sets score exactly 1 on all four. Distances are computed in
    blocks, so memory stays bounded for large sets; time is O(N_real * (N_real + N_fake) * D).

    Args:
        real: float [N_real, D] features, N_real > k.
        fake: float [N_fake, D] features, N_fake > k.
        k: neighbourhood size.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(40, 3))
        >>> precision_recall_density_coverage(x, x, k=3)
        {'precision': 1.0, 'recall': 1.0, 'density': 1.0, 'coverage': 1.0}
    """
    from scipy.spatial.distance import cdist

    real = _features(real, "real")
    fake = _features(fake, "fake")
    _same_width(real, fake, "real", "fake")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    for name, value in (("real", real), ("fake", fake)):
        if value.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} rows; got {value.shape[0]}")

    real_radii = _kth_neighbour_distances(real, k)
    fake_radii = _kth_neighbour_distances(fake, k)
    in_real_ball = np.empty(fake.shape[0], dtype=bool)
    real_balls_hit = np.empty(fake.shape[0], dtype=np.int64)
    real_in_fake_ball = np.zeros(real.shape[0], dtype=bool)
    nearest_fake = np.full(real.shape[0], np.inf)
    step = _rows_per_block(real.shape[0])
    for start in range(0, fake.shape[0], step):
        stop = min(start + step, fake.shape[0])
        distances = cdist(real, fake[start:stop])  # [N_real, block]
        inside_real = distances < real_radii[:, None]
        in_real_ball[start:stop] = inside_real.any(axis=0)
        real_balls_hit[start:stop] = inside_real.sum(axis=0)
        real_in_fake_ball |= (distances < fake_radii[None, start:stop]).any(axis=1)
        np.minimum(nearest_fake, distances.min(axis=1), out=nearest_fake)
    return {
        "precision": float(in_real_ball.mean()),
        "recall": float(real_in_fake_ball.mean()),
        "density": float(real_balls_hit.mean() / k),
        "coverage": float((nearest_fake < real_radii).mean()),
    }


# ----------------------------------------------------------------------------- Inception score


def inception_score(probs, *, splits: int = 1) -> float:
    """Inception score ``exp(mean_x KL(p(y|x) || p(y)))`` from per-image class probabilities.

    With ``splits > 1`` the rows are cut into that many contiguous parts
    (``numpy.array_split``, so no row is dropped), the score is taken in each, and their mean is
    returned. Zero probabilities contribute 0 to the KL divergence.

    Args:
        probs: float [N, C] class probabilities; rows non-negative, each summing to 1 (within 1e-3).
        splits: number of parts (1 <= splits <= N).

    Example:
        >>> inception_score(np.eye(4)), inception_score(np.full((3, 4), 0.25))
        (4.0, 1.0)
    """
    from scipy.special import rel_entr

    p = _features(probs, "probs")
    if (p < 0).any():
        raise ValueError("probs must be non-negative")
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(f"each row of probs must sum to 1; row {worst} sums to {row_sums[worst]:.6g}")
    if int(splits) != splits or not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be an integer in [1, {p.shape[0]}]; got {splits!r}")
    scores = []
    for part in np.array_split(p, int(splits)):
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(math.exp(float(rel_entr(part, marginal).sum(axis=1).mean())))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- duplicates


def dhash(image, size: int = 8) -> int:
    """Difference hash of a 2-D image: ``size * size`` bits, one per "right neighbour is brighter".

    The image is resized to ``(size + 1) x size`` (width x height) with Pillow's bilinear
    filter on float32 values (so 16-bit and float images keep their precision, unlike
    imagehash's 8-bit grayscale), and bit ``(r, c)`` is set when pixel ``(r, c + 1)`` is
    greater than pixel ``(r, c)``. Bits are packed row by row, the first bit most significant.
    A constant image hashes to 0.

    Args:
        image: [H, W] array of any real dtype (uint8, uint16, float).
        size: hash side; the default 8 gives a 64-bit hash, the size :func:`near_duplicates` takes.

    Example:
        >>> ramp = np.tile(np.arange(32.0), (32, 1))
        >>> hex(dhash(ramp)), dhash(ramp[:, ::-1])
        ('0xffffffffffffffff', 0)
    """
    from PIL import Image

    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer; got {size!r}")
    pixels = _image(image, "image").astype(np.float32)
    small = Image.fromarray(np.ascontiguousarray(pixels)).resize((int(size) + 1, int(size)), Image.Resampling.BILINEAR)
    values = np.asarray(small, dtype=np.float32)
    bits = (values[:, 1:] > values[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits, bitorder="big").tobytes(), "big") >> (-bits.size % 8)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two non-negative integer hashes.

    Example:
        >>> hamming(0b1011, 0b0010)
        2
    """
    if a < 0 or b < 0:
        raise ValueError(f"hashes must be non-negative; got {a!r} and {b!r}")
    return bin(int(a) ^ int(b)).count("1")


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def near_duplicates(hashes: Sequence[int], ids: Sequence[Hashable], *,
                    max_distance: int = 4) -> list[tuple[Hashable, Hashable, int]]:
    """Every pair of hashes within ``max_distance`` bits of each other, as ``(id_i, id_j, distance)``.

    All N(N-1)/2 pairs are compared (XOR and popcount on uint64, a block of rows at a time so
    memory stays at a few tens of MiB): O(N^2) time, about a second for 20,000 hashes. Beyond a
    few tens of thousands, use an index (e.g. a BK-tree or multi-index hashing) instead. Pairs
    come back with ``i < j`` in input order, sorted by ``(i, j)``.

    Args:
        hashes: N integer hashes of at most 64 bits (``dhash(..., size=8)``).
        ids: N identifiers (case ids, paths) reported for each pair.
        max_distance: largest Hamming distance still counted as a duplicate (inclusive).

    Example:
        >>> near_duplicates([0b0000, 0b0001, 0b1111], ["a", "b", "c"], max_distance=1)
        [('a', 'b', 1)]
    """
    ids = list(ids)
    if len(hashes) != len(ids):
        raise ValueError(f"hashes and ids must have the same length; got {len(hashes)} and {len(ids)}")
    if int(max_distance) != max_distance or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative integer; got {max_distance!r}")
    try:
        values = np.array([int(h) for h in hashes], dtype=np.uint64).reshape(-1)
    except OverflowError:
        raise ValueError("hashes must be integers in [0, 2**64); use dhash(..., size=8)") from None
    n = values.shape[0]
    pairs: list[tuple[Hashable, Hashable, int]] = []
    step = _rows_per_block(n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        distances = _popcount64(values[start:stop, None] ^ values[None, start:])  # columns from `start` on
        rows, cols = np.nonzero(distances <= max_distance)
        keep = start + cols > start + rows
        for r, c in zip(rows[keep].tolist(), cols[keep].tolist()):
            pairs.append((ids[start + r], ids[start + c], int(distances[r, c])))
    return pairs


def embedding_near_duplicates(features, ids: Sequence[Hashable], *, min_cosine: float = 0.98,
                              chunk: int = 1024) -> list[tuple[Hashable, Hashable, float]]:
    """Every pair of rows whose cosine similarity is at least ``min_cosine``, as ``(id_i, id_j, cosine)``.

    Rows are L2-normalised and compared ``chunk`` rows at a time against all later rows (a
    [chunk, N] matrix product), so memory stays bounded; time is O(N^2 D). Pairs come back with
    ``i < j`` in input order, sorted by ``(i, j)``.

    Args:
        features: float [N, D] embeddings; no all-zero row (its cosine is undefined).
        ids: N identifiers reported for each pair.
        min_cosine: threshold in [-1, 1] (inclusive).
        chunk: rows per block.

    Example:
        >>> pairs = embedding_near_duplicates([[1.0, 0.0], [2.0, 0.01], [0.0, 1.0]], ["a", "b", "c"])
        >>> [(i, j, round(cosine, 6)) for i, j, cosine in pairs]
        [('a', 'b', 0.999988)]
    """
    x = _features(features, "features")
    ids = list(ids)
    if x.shape[0] != len(ids):
        raise ValueError(f"features and ids must have the same length; got {x.shape[0]} and {len(ids)}")
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1]; got {min_cosine!r}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"features rows {np.flatnonzero(norms == 0)[:10].tolist()} are all zero; cosine is undefined")
    unit = x / norms[:, None]
    pairs: list[tuple[Hashable, Hashable, float]] = []
    for start in range(0, unit.shape[0], int(chunk)):
        stop = min(start + int(chunk), unit.shape[0])
        similarity = unit[start:stop] @ unit[start:].T
        rows, cols = np.nonzero(similarity >= min_cosine)
        keep = cols > rows
        for r, c in zip(rows[keep].tolist(), cols[keep].tolist()):
            pairs.append((ids[start + r], ids[start + c], float(similarity[r, c])))
    return pairs


# ----------------------------------------------------------------------------- MS-SSIM


def _gaussian_window(size: int = _SSIM_WINDOW, sigma: float = _SSIM_SIGMA) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    window = np.exp(-(offsets ** 2) / (2.0 * sigma ** 2))
    return window / window.sum()


_WINDOW = _gaussian_window()


def _filter_valid(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter keeping only the 'valid' part (no padded pixel contributes)."""
    from scipy import ndimage

    y = ndimage.correlate1d(x, _WINDOW, axis=0, mode="nearest")
    y = ndimage.correlate1d(y, _WINDOW, axis=1, mode="nearest")
    half = _SSIM_WINDOW // 2
    return y[half:-half, half:-half]


def _downsample(x: np.ndarray) -> np.ndarray:
    # 2x2 average; an odd last row or column is dropped
    h, w = x.shape[0] // 2, x.shape[1] // 2
    return x[:2 * h, :2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))


def ms_ssim_scales(shape: tuple[int, int]) -> int:
    """How many MS-SSIM scales (1 to 5) an image of ``shape`` allows: its coarsest scale must be >= 11 px.

    Example:
        >>> ms_ssim_scales((256, 256)), ms_ssim_scales((64, 64)), ms_ssim_scales((11, 40))
        (5, 3, 1)
    """
    side = min(shape)
    if side < _SSIM_WINDOW:
        raise ValueError(f"MS-SSIM needs images at least {_SSIM_WINDOW}x{_SSIM_WINDOW}; got {tuple(shape)}")
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2 >= _SSIM_WINDOW:
        side //= 2
        scales += 1
    return scales


def _ms_ssim_weights(scales: int) -> np.ndarray:
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
    # the published five weights are used as they are (they sum to 1.0001); fewer are renormalised
    return weights if scales == len(MS_SSIM_WEIGHTS) else weights / weights.sum()


def _pyramid(image: np.ndarray, scales: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per scale: (image, local mean, local mean of the square) — the parts that do not depend on the pair."""
    levels = []
    x = image
    for level in range(scales):
        if level:
            x = _downsample(x)
        levels.append((x, _filter_valid(x), _filter_valid(x * x)))
    return levels


def _ms_ssim_pyramids(pa, pb, data_range: float) -> float:
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    scales = len(pa)
    weights = _ms_ssim_weights(scales)
    value = 1.0
    for level, ((xa, mu_a, sq_a), (xb, mu_b, sq_b)) in enumerate(zip(pa, pb)):
        var_a = sq_a - mu_a * mu_a
        var_b = sq_b - mu_b * mu_b
        cov = _filter_valid(xa * xb) - mu_a * mu_b
        cs_map = (2.0 * cov + c2) / (var_a + var_b + c2)
        if level == scales - 1:
            term = float(np.mean((2.0 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1) * cs_map))
        else:
            term = float(np.mean(cs_map))
        # a negative mean contrast-structure term has no real fractional power; clamp as pytorch-msssim
        value *= max(term, 0.0) ** weights[level]
    return float(value)


def ms_ssim(a, b, *, data_range: float = 1.0) -> float:
    """Multi-scale SSIM of two 2-D images (Wang, Simoncelli and Bovik 2003); 1 means identical.

    Five scales with the standard weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), an 11x11
    Gaussian window with sigma 1.5 applied without padding ("valid"), K1 = 0.01, K2 = 0.03, and
    2x2 average pooling between scales (an odd last row or column is dropped). The coarsest
    scale must still be at least 11 pixels, so 5 scales need a shorter side of at least 176;
    a smaller image uses as many scales as fit (see :func:`ms_ssim_scales`) with the first
    weights renormalised to sum to 1. Images under 11 pixels raise ValueError. A negative
    per-scale term is clamped to 0 before its power is taken.

    Args:
        a, b: [H, W] images of the same shape (any real dtype; compared as float64).
        data_range: the value range of the images (1.0 for [0, 1] floats, 255 for uint8, ...).

    Example:
        >>> x = np.random.default_rng(0).random((64, 64))
        >>> ms_ssim(x, x), ms_ssim(x, 1.0 - x) < 0.5
        (1.0, True)
    """
    a = _image(a, "a")
    b = _image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {a.shape} and {b.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive; got {data_range!r}")
    scales = ms_ssim_scales(a.shape)
    return _ms_ssim_pyramids(_pyramid(a, scales), _pyramid(b, scales), float(data_range))


def intra_prompt_diversity(groups: Mapping[Hashable, Sequence], *, data_range: float = 1.0) -> dict:
    """Mean pairwise MS-SSIM among images generated from the same prompt (lower = more diverse).

    Each prompt's value is the mean of :func:`ms_ssim` over all its image pairs (images of one
    prompt must share a shape). ``overall`` is the mean of the per-prompt values, each prompt
    weighted equally; prompts with fewer than two images have no pair and are listed under
    ``skipped``. ``overall`` is None when no prompt has a pair.

    Args:
        groups: {prompt: [image, ...]} with 2-D images.
        data_range: as in :func:`ms_ssim`.

    Returns:
        {"per_prompt": {prompt: mean MS-SSIM}, "overall": float | None, "pairs": int, "skipped": [prompt, ...]}

    Example:
        >>> x = np.random.default_rng(0).random((32, 32))
        >>> intra_prompt_diversity({"p": [x, x, x], "q": [x]})
        {'per_prompt': {'p': 1.0}, 'overall': 1.0, 'pairs': 3, 'skipped': ['q']}
    """
    per_prompt: dict = {}
    skipped: list = []
    pairs = 0
    for prompt, images in groups.items():
        arrays = [_image(image, f"groups[{prompt!r}][{i}]") for i, image in enumerate(images)]
        if len(arrays) < 2:
            skipped.append(prompt)
            continue
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images of prompt {prompt!r} must share one shape; got {sorted(shapes)}")
        scales = ms_ssim_scales(arrays[0].shape)
        pyramids = [_pyramid(array, scales) for array in arrays]  # once per image, not per pair
        values = [_ms_ssim_pyramids(pa, pb, float(data_range)) for pa, pb in itertools.combinations(pyramids, 2)]
        per_prompt[prompt] = float(np.mean(values))
        pairs += len(values)
    overall = float(np.mean(list(per_prompt.values()))) if per_prompt else None
    return {"per_prompt": per_prompt, "overall": overall, "pairs": pairs, "skipped": skipped}


# ----------------------------------------------------------------------------- label fidelity


def _distribution_fidelity(expected: Mapping, observed: Mapping) -> dict:
    from scipy.stats import chisquare

    categories = list(expected) + [key for key in observed if key not in expected]
    p = np.array([float(expected.get(key, 0.0)) for key in categories])
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"expected must hold non-negative finite weights with a positive sum; got {dict(expected)!r}")
    p = p / p.sum()
    counts = []
    for key in categories:
        count = observed.get(key, 0)
        if int(count) != count or count < 0:
            raise ValueError(f"observed count for {key!r} must be a non-negative integer; got {count!r}")
        counts.append(int(count))
    counts = np.array(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("observed counts sum to 0; there is nothing to compare")

    q = counts / n
    tvd = float(0.5 * np.abs(p - q).sum())
    expected_n = n * p

    # Pool every possible cell expected fewer than 5 times into one; if the pool is still under
    # 5, fold it into the smallest remaining cell. Impossible cells (p = 0) are not pooled: pooling
    # would hide an observation the spec rules out inside a legitimate cell's excess.
    possible = np.flatnonzero(p > 0)
    small = possible[expected_n[possible] < MIN_EXPECTED_COUNT]
    large = possible[expected_n[possible] >= MIN_EXPECTED_COUNT]
    pooled = [categories[i] for i in small]
    cell_exp = list(expected_n[large])
    cell_obs = list(counts[large])
    if small.size:
        pool_exp, pool_obs = float(expected_n[small].sum()), int(counts[small].sum())
        if pool_exp < MIN_EXPECTED_COUNT and cell_exp:
            target = int(np.argmin(cell_exp))
            pooled.append(categories[int(large[target])])
            cell_exp[target] += pool_exp
            cell_obs[target] += pool_obs
        else:
            cell_exp.append(pool_exp)
            cell_obs.append(pool_obs)
    unexpected = [key for key, pk, ck in zip(categories, p, counts) if pk == 0 and ck > 0]
    if unexpected:  # impossible under the spec: the test rejects outright
        statistic, p_value = math.inf, 0.0
    elif len(cell_exp) >= 2:
        result = chisquare(np.asarray(cell_obs, dtype=np.float64), np.asarray(cell_exp))
        statistic, p_value = float(result.statistic), float(result.pvalue)
    else:  # one cell: the test has no degree of freedom
        statistic, p_value = None, None
    return {
        "n": n,
        "tvd": tvd,
        "score": 1.0 - tvd,
        "chi2": statistic,
        "p_value": p_value,
        "dof": max(len(cell_exp) - 1, 0),
        "pooled": pooled,
        "unexpected": unexpected,
        "cells": [{"category": key, "expected_p": float(pk), "observed_p": float(qk),
                   "expected_n": float(ek), "observed_n": int(ck)}
                  for key, pk, qk, ek, ck in zip(categories, p, q, expected_n, counts)],
    }


def spec_fidelity(expected: Mapping[str, float], observed_counts: Mapping[str, int]) -> dict:
    """How closely observed label counts follow the spec's distribution: TVD, chi-square, score.

    ``expected`` weights are normalised to sum to 1. TVD is ``0.5 * sum |p - q|`` over all
    categories, and ``score = 1 - TVD`` (1 = exact, 0 = disjoint). The chi-square
    goodness-of-fit test (``scipy.stats.chisquare``, expected counts ``n * p``) is only
    trustworthy when every expected count is at least 5, so cells below 5 are pooled into one
    cell, and if that pool is itself below 5 it is folded into the smallest remaining cell; the
    pooled categories (and the cell folded into) are listed under ``pooled``; ``dof`` is the
    number of cells tested minus 1. Categories observed but absent from ``expected`` (or given
    weight 0) are impossible under the spec: they are listed under ``unexpected``, count fully
    in TVD, and make ``chi2`` infinite and ``p_value`` 0. With fewer than two cells to test and
    nothing unexpected, ``chi2`` and ``p_value`` are None.

    Args:
        expected: {category: probability or weight}.
        observed_counts: {category: count}, non-negative integers with a positive total.

    Returns:
        {"n", "tvd", "score", "chi2", "p_value", "dof", "pooled", "unexpected", "cells"}, where
        "cells" lists, per category, expected_p, observed_p, expected_n and observed_n.

    Example:
        >>> r = spec_fidelity({"pneumonia": 0.5, "no_finding": 0.5}, {"pneumonia": 60, "no_finding": 40})
        >>> round(r["tvd"], 3), round(r["score"], 3), round(r["chi2"], 3), r["dof"]
        (0.1, 0.9, 4.0, 1)
    """
    return _distribution_fidelity(expected, observed_counts)


def pair_fidelity(expected_joint: Mapping[tuple, float], observed: Mapping[tuple, int]) -> dict:
    """:func:`spec_fidelity` over the joint distribution of two (or more) attributes.

    Keys are tuples of one fixed length, e.g. ``("pneumonia", "right_lower_lobe")``; the
    result has the same fields, with tuple categories.

    Args:
        expected_joint: {(value_1, value_2, ...): probability or weight}.
        observed: {(value_1, value_2, ...): count}.

    Example:
        >>> r = pair_fidelity({("F", "PA"): 0.5, ("M", "PA"): 0.5}, {("F", "PA"): 50, ("M", "PA"): 45, ("M", "AP"): 5})
        >>> round(r["tvd"], 3), r["unexpected"]
        (0.05, [('M', 'AP')])
    """
    lengths = {len(key) if isinstance(key, tuple) else None for key in itertools.chain(expected_joint, observed)}
    if None in lengths or len(lengths) > 1 or min(lengths, default=2) < 2:
        raise ValueError("expected_joint and observed keys must all be tuples of one length >= 2; "
                         f"got keys {list(itertools.islice(itertools.chain(expected_joint, observed), 5))!r}")
    return _distribution_fidelity(expected_joint, observed)


# ----------------------------------------------------------------------------- memorisation


def nearest_neighbours(query, reference, *, metric: str = "euclidean",
                       chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of and distance to its nearest reference row.

    Used for memorisation audits (generated image features against the training set).
    Distances are found ``chunk x chunk`` blocks at a time, so memory stays at
    O(chunk^2 + N_query) whatever the set sizes. The block search uses the fast
    ``|q|^2 + |r|^2 - 2 q.r`` form; the reported distance of each chosen pair is then recomputed
    directly, so an exact copy reports 0. Ties go to the lowest reference index (up to
    round-off among near-ties).

    Args:
        query: float [N_q, D].
        reference: float [N_r, D], N_r >= 1.
        metric: "euclidean", or "cosine" (1 - cosine similarity; no all-zero rows).
        chunk: rows per block on each side.

    Returns:
        (indices int64 [N_q], distances float64 [N_q]).

    Example:
        >>> idx, dist = nearest_neighbours([[0.0, 0.1], [5.0, 5.0]], [[0.0, 0.0], [4.0, 4.0]])
        >>> idx.tolist(), np.round(dist, 3).tolist()
        ([0, 1], [0.1, 1.414])
    """
    q = _features(query, "query")
    r = _features(reference, "reference")
    _same_width(q, r, "query", "reference")
    if r.shape[0] == 0:
        raise ValueError("reference has no rows")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine'; got {metric!r}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    chunk = int(chunk)
    if metric == "cosine":
        for name, value in (("query", q), ("reference", r)):
            norms = np.linalg.norm(value, axis=1)
            if (norms == 0).any():
                raise ValueError(f"{name} rows {np.flatnonzero(norms == 0)[:10].tolist()} are all zero; cosine is undefined")
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
    r_sq = (r * r).sum(axis=1)

    best = np.full(q.shape[0], np.inf)
    indices = np.zeros(q.shape[0], dtype=np.int64)
    for q_start in range(0, q.shape[0], chunk):
        qb = q[q_start:q_start + chunk]
        q_sq = (qb * qb).sum(axis=1)
        best_b = best[q_start:q_start + chunk]  # views: updated in place
        index_b = indices[q_start:q_start + chunk]
        for r_start in range(0, r.shape[0], chunk):
            rb = r[r_start:r_start + chunk]
            if metric == "euclidean":
                score = q_sq[:, None] + r_sq[None, r_start:r_start + chunk] - 2.0 * (qb @ rb.T)
            else:
                score = 1.0 - qb @ rb.T
            local = np.argmin(score, axis=1)
            local_best = score[np.arange(score.shape[0]), local]
            better = local_best < best_b
            best_b[better] = local_best[better]
            index_b[better] = local[better] + r_start
    if metric == "euclidean":
        distances = np.sqrt(((q - r[indices]) ** 2).sum(axis=1))
    else:
        distances = np.clip(1.0 - (q * r[indices]).sum(axis=1), 0.0, 2.0)
    return indices, distances


# ----------------------------------------------------------------------------- intensity checks


def _mask(mask, shape: tuple, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have the image's shape {tuple(shape)}; got {array.shape}")
    return array.astype(bool, copy=False)


def region_stats(image, mask) -> tuple[float, float]:
    """Mean and standard deviation (``ddof=0``) of the image's values inside a mask.

    Args:
        image: [H, W] (or any-shape) array of real values.
        mask: boolean (or 0/1) array of the image's shape; must select at least one pixel.

    Example:
        >>> region_stats(np.array([[1.0, 2.0], [3.0, 9.0]]), np.array([[True, True], [True, False]]))
        (2.0, 0.816496580927726)
    """
    pixels = np.asarray(image, dtype=np.float64)
    selected = pixels[_mask(mask, pixels.shape, "mask")]
    if selected.size == 0:
        raise ValueError("mask selects no pixel")
    return float(selected.mean()), float(selected.std())


def _masks_for(value, images: Sequence, region) -> list:
    """One mask per image: ``value`` is either a single mask shared by all images or one per image."""
    if isinstance(value, np.ndarray) and len(images) and value.shape == np.shape(images[0]):
        return [value] * len(images)
    masks = list(value)
    if len(masks) != len(images):
        raise ValueError(f"region {region!r} needs one mask per image ({len(images)}), or one shared mask; "
                         f"got {len(masks)}")
    return masks


def fit_intensity_bounds(images: Sequence, masks_by_region: Mapping[str, object],
                         k: float = 3.0) -> dict[str, tuple[float, float]]:
    """Per region, the band ``mean ± k·σ`` of the per-image region means (MAISI's per-organ check).

    Fit on reference images (real, or trusted synthetic ones), then test new images with
    :func:`check_intensity`. σ is the sample standard deviation (``ddof=1``) of the per-image
    means; images where a region's mask is empty are left out of that region's fit, and each
    region needs at least two images where it is present.

    Args:
        images: N arrays [H, W].
        masks_by_region: {region: one boolean mask shared by all images, or a sequence of N masks}.
        k: half-width of the band in standard deviations.

    Returns:
        {region: (low, high)}.

    Example:
        >>> images = [np.full((4, 4), v) for v in (1.0, 2.0, 3.0)]
        >>> fit_intensity_bounds(images, {"lung": np.ones((4, 4), bool)}, k=2.0)
        {'lung': (0.0, 4.0)}
    """
    images = list(images)
    if not images:
        raise ValueError("images is empty")
    if not k >= 0:
        raise ValueError(f"k must be non-negative; got {k!r}")
    bounds: dict[str, tuple[float, float]] = {}
    for region, value in masks_by_region.items():
        means = []
        for i, (image, mask) in enumerate(zip(images, _masks_for(value, images, region))):
            pixels = np.asarray(image, dtype=np.float64)
            selected = pixels[_mask(mask, pixels.shape, f"mask {i} of region {region!r}")]
            if selected.size:
                means.append(selected.mean())
        if len(means) < 2:
            raise ValueError(f"region {region!r} is present in {len(means)} image(s); at least 2 are needed for a spread")
        centre, spread = float(np.mean(means)), float(np.std(means, ddof=1))
        bounds[region] = (centre - k * spread, centre + k * spread)
    return bounds


def check_intensity(image, masks_by_region: Mapping[str, object],
                    bounds: Mapping[str, tuple[float, float]]) -> list[str]:
    """Regions of one image whose mean intensity falls outside their fitted ``(low, high)`` band.

    A region whose mask is empty in this image is not checked (nothing to measure); a region
    with a mask but no bounds raises ValueError, since it would otherwise pass unchecked.

    Args:
        image: [H, W] array.
        masks_by_region: {region: boolean mask of the image's shape}.
        bounds: {region: (low, high)}, e.g. from :func:`fit_intensity_bounds`; inclusive.

    Returns:
        The out-of-bounds region names, in ``masks_by_region`` order.

    Example:
        >>> check_intensity(np.full((4, 4), 9.0), {"lung": np.ones((4, 4), bool)}, {"lung": (0.0, 4.0)})
        ['lung']
    """
    pixels = np.asarray(image, dtype=np.float64)
    failing = []
    for region, mask in masks_by_region.items():
        if region not in bounds:
            raise ValueError(f"no bounds for region {region!r}; bounds has {sorted(bounds)}")
        selected = pixels[_mask(mask, pixels.shape, f"mask of region {region!r}")]
        if selected.size == 0:
            continue
        low, high = bounds[region]
        if not low <= float(selected.mean()) <= high:
            failing.append(region)
    return failing
