"""k-means: greedy k-means++ + Lloyd / mini-batch in torch, against brute force and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl.cli import main
from speechssl.cluster.kmeans import (
    KMeansModel,
    fit_kmeans,
    greedy_kmeans_plusplus,
    inertia,
    lloyd,
    nearest_centroids,
)
from speechssl.cluster.settings import KMeansSettings
from speechssl.features.store import ShardFiles, ShardWriter


def blobs(n_per: int, means: np.ndarray, std: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = np.repeat(np.arange(len(means)), n_per)
    x = means[z] + std * rng.standard_normal((len(z), means.shape[1]))
    return x.astype(np.float32), z


def mixture(n: int, dim: int, components: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(components))
    means = rng.standard_normal((components, dim)) * 2.0
    scales = np.exp(0.3 * rng.standard_normal((components, dim)))
    z = rng.choice(components, n, p=w)
    return (means[z] + scales[z] * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("algorithm", ["lloyd", "minibatch"])
def test_recovers_planted_clusters(algorithm):
    means = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32) * 10
    x, z = blobs(150, means, 0.5)
    model = fit_kmeans(x, KMeansSettings(k=6, algorithm=algorithm, batch_size=256, device="cpu"))
    labels = model.predict(x).numpy()
    # one cluster per planted blob, and every blob in one cluster
    assert all(len(set(labels[z == j])) == 1 for j in range(6))
    assert len(set(labels)) == 6
    # Lloyd ends at the blob means; mini-batch at running means of resampled points (std 0.5 / sqrt(n))
    atol = 1e-4 if algorithm == "lloyd" else 0.25
    for j in range(6):
        np.testing.assert_allclose(model.centroids[labels[z == j][0]].numpy(), x[z == j].mean(0), atol=atol)


def test_nearest_centroids_matches_brute_force_across_chunks():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1003, 5, generator=g) + 3, torch.randn(17, 5, generator=g) + 3
    d = torch.cdist(x.double(), c.double()) ** 2
    labels, sq = nearest_centroids(x, c, chunk=64)
    np.testing.assert_array_equal(labels.numpy(), d.argmin(1).numpy())
    np.testing.assert_allclose(sq.numpy(), d.min(1).values.numpy(), rtol=1e-4, atol=1e-4)
    assert inertia(x.double(), c.double()) == pytest.approx(float(d.min(1).values.sum()), rel=1e-12)


def test_greedy_seeding_is_seeded_and_beats_plain_kmeans_plusplus():
    x = torch.from_numpy(mixture(3000, 6, 30, seed=2))
    a = greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(5))
    b = greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(set(a.tolist())) == 20
    greedy = np.mean([inertia(x, x[greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(s))])
                      for s in range(5)])
    plain = np.mean([inertia(x, x[greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(s), n_local_trials=1)])
                     for s in range(5)])
    assert greedy < 0.9 * plain  # 2 + ln K candidates per centre: ~17% lower potential here


def test_lloyd_relocates_empty_clusters():
    x, _ = blobs(100, np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), 0.3)
    x = torch.from_numpy(x)
    start = torch.tensor([[0.0, 0.0], [10.0, 0.0], [500.0, 500.0]])  # the third centre attracts nothing
    c, total, _ = lloyd(x, start, max_iter=20, tol=0.0)
    counts = torch.bincount(nearest_centroids(x, c)[0], minlength=3)
    assert (counts > 0).all()
    assert total == pytest.approx(inertia(x.double(), c.double()), rel=1e-5)


def test_inertia_within_one_percent_of_sklearn():
    from sklearn.cluster import MiniBatchKMeans

    x = mixture(8000, 12, 60, seed=3)
    # fairseq's learn_kmeans.py settings
    sk = MiniBatchKMeans(n_clusters=30, init="k-means++", max_iter=100, batch_size=10000, compute_labels=False,
                         tol=0.0, max_no_improvement=100, init_size=None, n_init=20, reassignment_ratio=0.0,
                         random_state=0).fit(x)
    x64 = torch.from_numpy(x).double()
    ref = inertia(x64, torch.from_numpy(sk.cluster_centers_).double())
    model = fit_kmeans(x, KMeansSettings(k=30, device="cpu"))
    assert inertia(x64, model.centroids.double()) <= 1.01 * ref
    assert model.inertia == pytest.approx(inertia(x64, model.centroids.double()), rel=1e-4)
    # mini-batch is scikit-learn's algorithm with one seeding instead of 20: close, not better
    model = fit_kmeans(x, KMeansSettings(k=30, algorithm="minibatch", device="cpu"))
    assert inertia(x64, model.centroids.double()) <= 1.03 * ref


def test_bf16_phase_ends_where_fp32_lloyd_ends():
    x = torch.from_numpy(mixture(6000, 160, 40, seed=4))
    x = x - x.mean(0)
    start = x[greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(0))]
    _, fp32, _ = lloyd(x, start, 100, 1e-3)
    _, mixed, _ = lloyd(x, start, 100, 1e-3, x_low=x.bfloat16())
    assert mixed == pytest.approx(fp32, rel=1e-3)
    assert mixed == pytest.approx(inertia(x, lloyd(x, start, 100, 1e-3, x_low=x.bfloat16())[0]), rel=1e-5)


def test_model_save_load_predict(tmp_path):
    x = mixture(2000, 5, 10, seed=5)
    model = fit_kmeans(x, KMeansSettings(k=8, device="cpu"))
    model.save(tmp_path / "km.pt")
    raw = torch.load(tmp_path / "km.pt", weights_only=True)
    assert raw["k"] == 8 and raw["dim"] == 5 and raw["centroids"].shape == (8, 5)
    assert raw["settings"]["k"] == 8 and raw["inertia"] == model.inertia
    loaded = KMeansModel.load(tmp_path / "km.pt")
    d = torch.cdist(torch.from_numpy(x).double(), loaded.centroids.double())
    np.testing.assert_array_equal(loaded.predict(x).numpy(), d.argmin(1).numpy())
    with pytest.raises(ValueError, match="do not match"):
        loaded.predict(x[:, :3])
    torch.save({"centroids": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a speechssl k-means model"):
        KMeansModel.load(tmp_path / "other.pt")


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="cannot make 10 clusters"):
        fit_kmeans(np.zeros((5, 3), np.float32), KMeansSettings(k=10))
    x = mixture(100, 3, 4, seed=6)
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_kmeans(x, KMeansSettings(k=4))
    with pytest.raises(ValueError, match="algorithm"):
        KMeansSettings(k=4, algorithm="elkan")


def test_kmeans_cli(tmp_path, capsys):
    x = mixture(3000, 7, 12, seed=7)
    lengths = np.array([500, 700, 800, 1000])
    folder = tmp_path / "feats"
    for shard, (a, b) in enumerate([(0, 2), (2, 4)]):
        off = np.concatenate([[0], np.cumsum(lengths)])
        with ShardWriter(ShardFiles.of(folder, "train", shard, 2), lengths[a:b], 7) as w:
            for i in range(a, b):
                w.write(i - a, x[off[i] : off[i + 1]])
            w.commit({"kind": "mfcc", "settings": {}, "rate": 100.0, "sample_rate": 16000, "manifest_sha1": "s",
                      "manifest_lines": 4, "line_start": a, "line_end": b})
    out = tmp_path / "km.pt"
    assert main(["kmeans", str(folder), "--k", "6", "--sample-percent", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampled 2 of 4 utterances (50%)" in printed and "inertia per frame" in printed
    model = KMeansModel.load(out)
    assert model.k == 6 and model.features["rate"] == 100.0 and model.features["utterances"] == 2
    assert main(["kmeans", str(folder), "--k", "6", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    npys = [str(folder / "train_0_2.npy"), str(folder / "train_1_2.npy")]
    assert main(["kmeans", *npys, "--k", "5", "--sample-percent", "100", "--out", str(out), "--force"]) == 0
    assert KMeansModel.load(out).num_frames == 3000
