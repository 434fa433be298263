"""QC metrics against independent reference computations, hand-worked values and their defining properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage, stats
from scipy.spatial.distance import cdist

from synthmed.qc import metrics
from synthmed.qc.metrics import (
    check_intensity,
    dhash,
    embedding_near_duplicates,
    fid_from_features,
    fit_intensity_bounds,
    frechet_distance,
    hamming,
    inception_score,
    intra_prompt_diversity,
    kid_from_features,
    ms_ssim,
    ms_ssim_scales,
    near_duplicates,
    nearest_neighbours,
    pair_fidelity,
    precision_recall_density_coverage,
    region_stats,
    spec_fidelity,
)


def correlated_features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + shift


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A [0, 1] image with structure at several scales (white noise has none for MS-SSIM or dHash)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random((size, size)), 3.0)
    return (field - field.min()) / (field.max() - field.min())


# ----------------------------------------------------------------------------- Fréchet distance


def eigen_reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2) + ||mu1 - mu2||^2, by symmetric eigendecompositions only."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = scipy.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = scipy.linalg.eigh(root1 @ s2 @ root1, eigvals_only=True)
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_fid_matches_an_eigendecomposition_reference():
    a = correlated_features(1, 300, 8)
    b = correlated_features(2, 250, 8, shift=0.7)
    expected = eigen_reference_fid(a, b)
    assert expected > 1.0
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_the_eigh_route_agrees_with_sqrtm():
    a = correlated_features(1, 300, 8)
    b = correlated_features(2, 250, 8, shift=0.7)
    assert fid_from_features(a, b, method="eigh") == pytest.approx(fid_from_features(a, b), rel=1e-9)
    rank_deficient = correlated_features(9, 6, 8)  # fewer rows than dimensions: singular covariance
    assert fid_from_features(rank_deficient, b, method="eigh") == pytest.approx(
        eigen_reference_fid(rank_deficient, b), rel=1e-8)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2), method="eigh")
    with pytest.raises(ValueError, match="method"):
        fid_from_features(a, b, method="svd")


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_a_set_against_itself_is_zero(method):
    a = correlated_features(3, 200, 10)
    scale = np.trace(np.cov(a, rowvar=False))
    assert fid_from_features(a, a, method=method) / scale < 1e-6


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_is_symmetric(method):
    a, b = correlated_features(4, 120, 6), correlated_features(5, 140, 6, shift=0.3)
    assert fid_from_features(a, b, method=method) == pytest.approx(fid_from_features(b, a, method=method), rel=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_a_mean_shift_adds_exactly_its_squared_norm(method):
    a = correlated_features(6, 150, 5)
    shift = np.array([0.5, -1.0, 2.0, 0.0, 0.25])
    assert fid_from_features(a, a + shift, method=method) == pytest.approx(float(shift @ shift), rel=1e-7)
    sigma = np.cov(a, rowvar=False)
    assert frechet_distance(np.zeros(5), sigma, shift, sigma, method=method) == pytest.approx(
        float(shift @ shift), rel=1e-7)


def test_a_non_finite_square_root_is_retried_with_an_offset(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def singular_first(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", singular_first)
    a, b = correlated_features(7, 100, 4), correlated_features(8, 100, 4)
    value = fid_from_features(a, b)
    assert len(calls) == 2
    assert not np.allclose(calls[0], calls[1])  # the retry saw (S1 + eps I)(S2 + eps I)
    assert value == pytest.approx(eigen_reference_fid(a, b), rel=1e-4)


def test_a_large_imaginary_part_is_refused():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))  # sqrt(-I) = iI


def test_fid_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="same feature dimension"):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ----------------------------------------------------------------------------- KID


def direct_unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Bińkowski et al.'s unbiased MMD^2, one kernel evaluation at a time."""
    m, d = len(x), x.shape[1]

    def kernel(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** degree

    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2.0 * xy


def test_kid_on_whole_sets_matches_the_direct_estimator():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(25, 5)), rng.normal(0.4, 1.2, size=(25, 5))
    mean, std = kid_from_features(a, b, subsets=3, subset_size=100)  # clamped to 25: every subset is the whole set
    assert mean == pytest.approx(direct_unbiased_mmd2(a, b), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert kid_from_features(a, b, subsets=1, subset_size=25, degree=2)[0] == pytest.approx(
        direct_unbiased_mmd2(a, b, degree=2), rel=1e-10)


def test_kid_subsets_come_from_the_seeded_generator():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(30, 4)), rng.normal(0.5, 1.0, size=(40, 4))
    draws = np.random.default_rng(7)
    expected = []
    for _ in range(4):  # the documented order: rows of a, then rows of b, per round
        rows_a, rows_b = draws.choice(30, 12, replace=False), draws.choice(40, 12, replace=False)
        expected.append(direct_unbiased_mmd2(a[rows_a], b[rows_b]))
    mean, std = kid_from_features(a, b, subsets=4, subset_size=12, seed=7)
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert std == pytest.approx(np.std(expected), rel=1e-8)
    assert kid_from_features(a, b, subsets=4, subset_size=12, seed=7) == (mean, std)
    assert kid_from_features(a, b, subsets=4, subset_size=12, seed=8) != (mean, std)


def test_kid_of_two_halves_of_one_distribution_is_near_zero():
    x = np.random.default_rng(12).normal(size=(400, 16))
    same, _ = kid_from_features(x[:200], x[200:], subsets=10, subset_size=100)
    shifted, _ = kid_from_features(x[:200], x[200:] + 0.3, subsets=10, subset_size=100)
    assert abs(same) < 0.05
    assert shifted > 0.3


def test_kid_input_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid_from_features(x, x, subset_size=1)
    with pytest.raises(ValueError, match="subsets"):
        kid_from_features(x, x, subsets=0)
    with pytest.raises(ValueError, match="degree"):
        kid_from_features(x, x, degree=1.5)


# ----------------------------------------------------------------------------- PRDC


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """clovaai/generative-evaluation-prdc's compute_prdc, on full distance matrices."""
    real_radii = np.partition(cdist(real, real), k, axis=1)[:, k]
    fake_radii = np.partition(cdist(fake, fake), k, axis=1)[:, k]
    distance = cdist(real, fake)
    return {
        "precision": (distance < real_radii[:, None]).any(axis=0).mean(),
        "recall": (distance < fake_radii[None, :]).any(axis=1).mean(),
        "density": (1.0 / k) * (distance < real_radii[:, None]).sum(axis=0).mean(),
        "coverage": (distance.min(axis=1) < real_radii).mean(),
    }


def test_prdc_matches_the_reference_when_computed_in_blocks(monkeypatch):
    rng = np.random.default_rng(20)
    real, fake = rng.normal(size=(70, 4)), rng.normal(0.5, 1.3, size=(55, 4))
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 7 * 70)  # forces many blocks on both passes
    result = precision_recall_density_coverage(real, fake, k=4)
    expected = reference_prdc(real, fake, 4)
    assert set(result) == {"precision", "recall", "density", "coverage"}
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert 0 < result["precision"] < 1 and 0 < result["coverage"] < 1


def test_prdc_of_identical_sets_is_one():
    x = np.random.default_rng(21).normal(size=(60, 5))
    assert precision_recall_density_coverage(x, x, k=5) == {
        "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_prdc_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(22)
    result = precision_recall_density_coverage(rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 100.0, k=3)
    assert result == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_needs_more_rows_than_k():
    with pytest.raises(ValueError, match="more than k=5"):
        precision_recall_density_coverage(np.zeros((5, 2)), np.zeros((10, 2)), k=5)


# ----------------------------------------------------------------------------- Inception score


def test_inception_score_limits():
    assert inception_score(np.full((6, 4), 0.25)) == pytest.approx(1.0, abs=1e-12)
    balanced_one_hot = np.eye(5)[np.tile(np.arange(5), 2)]
    assert inception_score(balanced_one_hot) == pytest.approx(5.0, rel=1e-12)
    assert inception_score(balanced_one_hot, splits=2) == pytest.approx(5.0, rel=1e-12)


def test_inception_score_by_hand():
    probs = np.array([[0.9, 0.1], [0.1, 0.9]])  # marginal (0.5, 0.5)
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert inception_score(probs) == pytest.approx(math.exp(kl), rel=1e-12)
    one_class = np.eye(3)[[0, 0, 0, 0]]  # every image confidently the same class
    assert inception_score(one_class) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_splits_score_each_part_on_its_own_marginal():
    e0, e1 = np.eye(2)
    probs = np.array([e0, e1, e0, e0])
    assert inception_score(probs, splits=2) == pytest.approx((2.0 + 1.0) / 2, rel=1e-12)
    whole = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert inception_score(probs) == pytest.approx(whole, rel=1e-12)
    # an uneven split keeps every row: parts of 3 and 2
    assert inception_score(np.array([e0, e1, e0, e1, e1]), splits=2) == pytest.approx(
        (math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))) + 1.0) / 2, rel=1e-12)


def test_inception_score_refuses_non_probabilities():
    with pytest.raises(ValueError, match="row 1 sums to 2"):
        inception_score(np.array([[0.5, 0.5], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(np.array([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((2, 2), 0.5), splits=3)


# ----------------------------------------------------------------------------- dHash


def test_dhash_bit_order_on_a_hand_built_image():
    # already (size + 1) x size, so the resize leaves it unchanged: bits 1 0 / 0 1, row by row
    assert dhash(np.array([[0.0, 1.0, 0.0], [2.0, 1.0, 3.0]]), size=2) == 0b1001


def test_dhash_of_ramps_and_constants():
    ramp = np.tile(np.arange(40.0), (30, 1))
    assert dhash(ramp) == 2 ** 64 - 1
    assert dhash(ramp[:, ::-1]) == 0
    assert dhash(np.full((16, 16), 7, dtype=np.uint16)) == 0
    assert dhash(ramp, size=16).bit_length() == 256


def test_dhash_survives_small_noise_and_dtype_but_not_a_different_image():
    image = smooth_image(30, 128)
    reference = dhash(image)
    noisy = np.clip(image + np.random.default_rng(31).normal(0, 0.01, image.shape), 0, 1)
    assert hamming(reference, dhash(noisy)) <= 2
    assert hamming(reference, dhash(np.round(image * 65535).astype(np.uint16))) <= 2
    assert hamming(reference, dhash(smooth_image(32, 128))) > 10


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0010) == 2
    assert hamming(2 ** 64 - 1, 0) == 64
    with pytest.raises(ValueError):
        hamming(-1, 0)


def brute_force_pairs(hashes, ids, max_distance):
    return [(ids[i], ids[j], hamming(hashes[i], hashes[j]))
            for i, j in itertools.combinations(range(len(hashes)), 2)
            if hamming(hashes[i], hashes[j]) <= max_distance]


@pytest.mark.parametrize("no_bitwise_count", [False, True])
def test_near_duplicates_match_brute_force(monkeypatch, no_bitwise_count):
    rng = np.random.default_rng(40)
    hashes = [int(h) for h in rng.integers(0, 2 ** 63, 60, dtype=np.uint64)]
    hashes = [h | (1 << 63) if i % 2 else h for i, h in enumerate(hashes)]  # the top bit must survive
    for i in range(0, 60, 6):  # plant near copies 0..4 bits away
        flips = rng.choice(64, i % 5, replace=False)
        hashes[i + 1] = hashes[i] ^ sum(1 << int(f) for f in flips)
    ids = [f"case-{i:03d}" for i in range(60)]
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 60 * 7)  # several row blocks
    if no_bitwise_count:
        monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2 path
    found = near_duplicates(hashes, ids, max_distance=3)
    assert found == brute_force_pairs(hashes, ids, 3)
    assert len(found) >= 8


def test_near_duplicates_input_errors():
    with pytest.raises(ValueError, match="same length"):
        near_duplicates([1, 2], ["a"])
    with pytest.raises(ValueError, match="2\\*\\*64"):
        near_duplicates([2 ** 64, 1], ["a", "b"])
    assert near_duplicates([], []) == []


def test_embedding_near_duplicates_match_brute_force():
    rng = np.random.default_rng(41)
    features = rng.normal(size=(40, 16))
    features[5] = 3.0 * features[4]  # a scaled copy is a cosine duplicate
    features[20] = features[10] + rng.normal(0, 0.02, 16)
    features[39] = features[0] + rng.normal(0, 0.02, 16)
    ids = list(range(100, 140))
    found = embedding_near_duplicates(features, ids, min_cosine=0.98, chunk=7)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    expected = [(ids[i], ids[j]) for i, j in itertools.combinations(range(40), 2) if cosine[i, j] >= 0.98]
    assert [(i, j) for i, j, _ in found] == expected
    assert {(104, 105), (110, 120), (100, 139)} <= set(expected)
    for i, j, value in found:
        assert value == pytest.approx(cosine[i - 100, j - 100], abs=1e-12)


def test_embedding_near_duplicates_threshold():
    angle = math.acos(0.985)
    features = [[1.0, 0.0], [math.cos(angle), math.sin(angle)], [-1.0, 0.0]]
    assert [(i, j) for i, j, _ in embedding_near_duplicates(features, "abc", min_cosine=0.98)] == [("a", "b")]
    assert embedding_near_duplicates(features, "abc", min_cosine=0.99) == []
    assert len(embedding_near_duplicates(features, "abc", min_cosine=-1.0)) == 3


def test_embedding_near_duplicates_refuse_zero_rows():
    with pytest.raises(ValueError, match=r"rows \[1\] are all zero"):
        embedding_near_duplicates(np.array([[1.0, 0.0], [0.0, 0.0]]), ["a", "b"])


# ----------------------------------------------------------------------------- MS-SSIM


def direct_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Single-scale SSIM of Wang et al. 2004, one 11x11 Gaussian window position at a time."""
    offsets = np.arange(11) - 5.0
    g = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for r in range(a.shape[0] - 10):
        for c in range(a.shape[1] - 10):
            pa, pb = a[r:r + 11, c:c + 11], b[r:r + 11, c:c + 11]
            mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * (pa - mu_a) ** 2).sum()
            var_b = (window * (pb - mu_b) ** 2).sum()
            cov = (window * (pa - mu_a) * (pb - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_one_scale_ms_ssim_is_windowed_ssim():
    rng = np.random.default_rng(50)
    a = rng.random((20, 17))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert ms_ssim_scales(a.shape) == 1
    assert ms_ssim(a, b) == pytest.approx(direct_ssim(a, b), rel=1e-9)


def test_two_scale_ms_ssim_combines_the_scales_with_renormalised_weights():
    rng = np.random.default_rng(51)
    a = smooth_image(51, 24)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert ms_ssim_scales(a.shape) == 2
    # scale 1: contrast-structure term only; scale 2 (2x2 means): full SSIM
    offsets = np.arange(11) - 5.0
    g = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()

    def local_mean(x):
        return ndimage.correlate1d(ndimage.correlate1d(x, g, axis=0), g, axis=1)[5:-5, 5:-5]

    var_a, var_b = local_mean(a * a) - local_mean(a) ** 2, local_mean(b * b) - local_mean(b) ** 2
    cov = local_mean(a * b) - local_mean(a) * local_mean(b)
    cs = float(np.mean((2 * cov + 0.03 ** 2) / (var_a + var_b + 0.03 ** 2)))
    half_a, half_b = a.reshape(12, 2, 12, 2).mean(axis=(1, 3)), b.reshape(12, 2, 12, 2).mean(axis=(1, 3))
    w = np.array([0.0448, 0.2856]) / (0.0448 + 0.2856)
    assert ms_ssim(a, b) == pytest.approx(cs ** w[0] * direct_ssim(half_a, half_b) ** w[1], rel=1e-9)


def test_ms_ssim_of_an_image_with_itself_is_one():
    for size in (256, 64, 11):
        x = smooth_image(52, size) if size > 11 else np.random.default_rng(52).random((11, 11))
        assert ms_ssim(x, x) == 1.0


def test_ms_ssim_falls_as_noise_grows():
    image = smooth_image(53, 192)
    rng = np.random.default_rng(54)
    noise = rng.normal(size=image.shape)
    values = [ms_ssim(image, image + level * noise) for level in (0.0, 0.01, 0.05, 0.1, 0.3)]
    assert values[0] == 1.0
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_ms_ssim_is_symmetric_and_follows_data_range():
    a, b = smooth_image(55, 96), smooth_image(56, 96)
    assert ms_ssim(a, b) == pytest.approx(ms_ssim(b, a), rel=1e-12)
    assert ms_ssim(255 * a, 255 * b, data_range=255.0) == pytest.approx(ms_ssim(a, b), rel=1e-9)
    assert ms_ssim(a, b) < 0.9


def test_ms_ssim_scales_and_small_images():
    assert [ms_ssim_scales((s, s)) for s in (11, 21, 22, 43, 44, 87, 88, 175, 176, 1024)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ms_ssim_scales((300, 30)) == 2
    with pytest.raises(ValueError, match="at least 11x11"):
        ms_ssim(np.zeros((10, 40)), np.zeros((10, 40)))
    with pytest.raises(ValueError, match="same shape"):
        ms_ssim(np.zeros((20, 20)), np.zeros((20, 21)))


def test_intra_prompt_diversity():
    rng = np.random.default_rng(57)
    base = smooth_image(57, 64)
    copies = [base, base.copy(), base.copy()]
    varied = [np.clip(base + rng.normal(0, 0.2, base.shape), 0, 1) for _ in range(3)]
    result = intra_prompt_diversity({"copies": copies, "varied": varied, "alone": [base]})
    expected_varied = np.mean([ms_ssim(x, y) for x, y in itertools.combinations(varied, 2)])
    assert result["per_prompt"]["copies"] == 1.0
    assert result["per_prompt"]["varied"] == pytest.approx(expected_varied, rel=1e-12)
    assert result["per_prompt"]["varied"] < 0.9
    assert result["overall"] == pytest.approx((1.0 + expected_varied) / 2, rel=1e-12)
    assert result["pairs"] == 6
    assert result["skipped"] == ["alone"]
    assert intra_prompt_diversity({"alone": [base]})["overall"] is None
    with pytest.raises(ValueError, match="one shape"):
        intra_prompt_diversity({"p": [np.zeros((20, 20)), np.zeros((22, 22))]})


# ----------------------------------------------------------------------------- label fidelity


def test_exact_counts_score_one():
    result = spec_fidelity({"no_finding": 0.5, "pneumonia": 0.3, "effusion": 0.2},
                           {"no_finding": 50, "pneumonia": 30, "effusion": 20})
    assert result["tvd"] == pytest.approx(0.0, abs=1e-12)
    assert result["score"] == pytest.approx(1.0, abs=1e-12)
    assert result["p_value"] == pytest.approx(1.0, abs=1e-12)
    assert result["chi2"] == pytest.approx(0.0, abs=1e-12)
    assert result["n"] == 100 and result["dof"] == 2
    assert result["pooled"] == [] and result["unexpected"] == []


def test_a_shifted_distribution_by_hand():
    result = spec_fidelity({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 30, "b": 30, "c": 40})
    assert result["tvd"] == pytest.approx(0.5 * (0.2 + 0.0 + 0.2), abs=1e-12)
    assert result["score"] == pytest.approx(0.8, abs=1e-12)
    assert result["chi2"] == pytest.approx((30 - 50) ** 2 / 50 + 0 + (40 - 20) ** 2 / 20, rel=1e-12)
    assert result["p_value"] == pytest.approx(math.exp(-28 / 2), rel=1e-9)  # chi2 sf with 2 dof
    cells = {cell["category"]: cell for cell in result["cells"]}
    assert cells["c"] == {"category": "c", "expected_p": pytest.approx(0.2), "observed_p": 0.4,
                          "expected_n": pytest.approx(20.0), "observed_n": 40}


def test_weights_are_normalised():
    assert spec_fidelity({"a": 3, "b": 1}, {"a": 60, "b": 40})["tvd"] == pytest.approx(0.15, abs=1e-12)


def test_small_cells_are_pooled_then_folded():
    # c and d expect 1 each: pooled (2 < 5) then folded into the smallest remaining cell, b
    result = spec_fidelity({"a": 0.5, "b": 0.48, "c": 0.01, "d": 0.01}, {"a": 52, "b": 43, "c": 3, "d": 2})
    assert result["pooled"] == ["c", "d", "b"]
    assert result["dof"] == 1
    assert result["chi2"] == pytest.approx((52 - 50) ** 2 / 50 + (48 - 50) ** 2 / 50, rel=1e-9)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(result["chi2"], 1), rel=1e-9)
    assert result["tvd"] == pytest.approx(0.5 * (0.02 + 0.05 + 0.02 + 0.01), abs=1e-12)  # TVD is not pooled


def test_a_large_enough_pool_is_its_own_cell():
    expected = {"a": 0.4, "b": 0.3, "c": 0.03, "d": 0.03, "e": 0.04, "f": 0.2}
    observed = {"a": 40, "b": 28, "c": 5, "d": 0, "e": 7, "f": 20}
    result = spec_fidelity(expected, observed)
    assert result["pooled"] == ["c", "d", "e"]
    assert result["dof"] == 3
    pool = (12 - 10) ** 2 / 10
    assert result["chi2"] == pytest.approx(0 + (28 - 30) ** 2 / 30 + 0 + pool, rel=1e-9)


def test_unexpected_categories_count_against_fidelity():
    result = spec_fidelity({"a": 0.5, "b": 0.5}, {"a": 45, "b": 45, "fracture": 10})
    assert result["unexpected"] == ["fracture"]
    assert result["tvd"] == pytest.approx(0.1, abs=1e-12)
    assert result["chi2"] == math.inf and result["p_value"] == 0.0  # impossible under the spec, not pooled away
    assert result["pooled"] == [] and result["dof"] == 1
    assert spec_fidelity({"a": 1.0}, {"a": 7}) | {"cells": None} == {
        "n": 7, "tvd": 0.0, "score": 1.0, "chi2": None, "p_value": None, "dof": 0,
        "pooled": [], "unexpected": [], "cells": None}


def test_spec_fidelity_input_errors():
    with pytest.raises(ValueError, match="sum to 0"):
        spec_fidelity({"a": 1.0}, {"a": 0})
    with pytest.raises(ValueError, match="non-negative integer"):
        spec_fidelity({"a": 1.0}, {"a": 2.5})
    with pytest.raises(ValueError, match="non-negative finite weights"):
        spec_fidelity({"a": -1.0, "b": 2.0}, {"a": 1})


def test_pair_fidelity_over_joint_cells():
    expected = {("pneumonia", "rll"): 0.3, ("pneumonia", "lll"): 0.2, ("no_finding", None): 0.5}
    observed = {("pneumonia", "rll"): 20, ("pneumonia", "lll"): 30, ("no_finding", None): 50}
    result = pair_fidelity(expected, observed)
    assert result["tvd"] == pytest.approx(0.1, abs=1e-12)
    assert result["chi2"] == pytest.approx(10 ** 2 / 30 + 10 ** 2 / 20, rel=1e-9)
    assert result["cells"][0]["category"] == ("pneumonia", "rll")
    exact = pair_fidelity(expected, {key: int(round(100 * p)) for key, p in expected.items()})
    assert exact["tvd"] == pytest.approx(0.0, abs=1e-12) and exact["p_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tuples of one length"):
        pair_fidelity({("a", "b"): 1.0}, {("a", "b", "c"): 1})
    with pytest.raises(ValueError, match="tuples of one length"):
        pair_fidelity({"ab": 1.0}, {"ab": 1})


# ----------------------------------------------------------------------------- nearest neighbours


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_neighbours_match_brute_force(metric):
    rng = np.random.default_rng(60)
    query, reference = rng.normal(size=(50, 6)), rng.normal(size=(33, 6))
    indices, distances = nearest_neighbours(query, reference, metric=metric, chunk=7)
    full = cdist(query, reference, metric=metric)
    assert indices.dtype == np.int64 and distances.dtype == np.float64
    assert indices.tolist() == full.argmin(axis=1).tolist()
    np.testing.assert_allclose(distances, full.min(axis=1), rtol=1e-10, atol=1e-12)


def test_exact_copies_report_zero_distance():
    rng = np.random.default_rng(61)
    reference = rng.normal(1000.0, 1.0, size=(40, 8))  # large offsets: the |q|^2 + |r|^2 - 2qr form alone is not 0
    order = rng.permutation(40)
    indices, distances = nearest_neighbours(reference[order], reference, chunk=16)
    assert indices.tolist() == order.tolist()
    assert (distances == 0.0).all()


def test_nearest_neighbours_input_errors():
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbours(np.zeros((2, 2)), np.ones((2, 2)), metric="manhattan")
    with pytest.raises(ValueError, match="all zero"):
        nearest_neighbours(np.zeros((2, 2)), np.ones((2, 2)), metric="cosine")
    with pytest.raises(ValueError, match="no rows"):
        nearest_neighbours(np.zeros((2, 2)), np.zeros((0, 2)))


# ----------------------------------------------------------------------------- intensity checks


def test_region_stats():
    image = np.arange(16.0).reshape(4, 4)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    mean, std = region_stats(image, mask)
    assert mean == pytest.approx(7.5)
    assert std == pytest.approx(np.std([5.0, 6.0, 9.0, 10.0]))
    assert region_stats(image, mask.astype(np.uint8)) == (mean, std)
    with pytest.raises(ValueError, match="no pixel"):
        region_stats(image, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        region_stats(image, np.ones((3, 4), bool))


def test_fit_intensity_bounds_by_hand():
    images = [np.full((4, 4), v) for v in (1.0, 2.0, 3.0, 10.0)]
    shared = np.ones((4, 4), bool)
    per_image = [shared, shared, shared, np.zeros((4, 4), bool)]  # the region is absent from the last image
    bounds = fit_intensity_bounds(images, {"lung": shared, "heart": per_image}, k=3.0)
    lung_sd = np.std([1.0, 2.0, 3.0, 10.0], ddof=1)
    assert bounds["lung"] == pytest.approx((4.0 - 3 * lung_sd, 4.0 + 3 * lung_sd))
    assert bounds["heart"] == pytest.approx((2.0 - 3.0, 2.0 + 3.0))  # sd of 1, 2, 3 is 1
    with pytest.raises(ValueError, match="at least 2"):
        fit_intensity_bounds(images, {"lesion": [shared] + [np.zeros((4, 4), bool)] * 3})
    with pytest.raises(ValueError, match="one mask per image"):
        fit_intensity_bounds(images, {"lung": [shared, shared]})


def test_check_intensity_flags_only_regions_outside_their_band():
    rng = np.random.default_rng(70)
    lung = np.zeros((32, 32), bool)
    lung[4:28, 2:14] = True
    heart = np.zeros((32, 32), bool)
    heart[12:26, 16:28] = True
    images = []
    for _ in range(30):
        image = rng.normal(0.1, 0.02, (32, 32))
        image[lung] += 0.2 + rng.normal(0, 0.01)
        image[heart] += 0.6 + rng.normal(0, 0.01)
        images.append(image)
    masks = {"lung": lung, "heart": heart}
    bounds = fit_intensity_bounds(images, masks)
    typical = images[0]
    assert check_intensity(typical, masks, bounds) == []
    dark_heart = typical.copy()
    dark_heart[heart] -= 0.3
    assert check_intensity(dark_heart, masks, bounds) == ["heart"]
    assert check_intensity(typical + 0.5, masks, bounds) == ["lung", "heart"]
    assert check_intensity(typical + 0.5, {"lung": np.zeros((32, 32), bool)}, bounds) == []  # absent: not checked
    with pytest.raises(ValueError, match="no bounds for region 'rib'"):
        check_intensity(typical, {"rib": lung}, bounds)
