"""Class-conditional Gaussians of the pooled features (protohead.density): against a loop oracle, in the heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protohead import HeadOptimal
from protohead.baselines import BaselineHead
from protohead.density import FeatureDensity, fit_class_gaussians, mahalanobis_distances


def oracle_distances(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, num_classes: int,
                     shrinkage: float) -> np.ndarray:
    """(n_q, C) squared Mahalanobis distances, one class and one query at a time, with an explicit inverse."""
    means = [train[labels == c].mean(axis=0) for c in range(num_classes)]
    covariance = np.zeros((train.shape[1], train.shape[1]))
    for x, y in zip(train, labels, strict=True):
        covariance += np.outer(x - means[y], x - means[y])
    covariance /= len(train)
    shrunk = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    precision = np.linalg.inv(shrunk)
    return np.array([[(q - m) @ precision @ (q - m) for m in means] for q in queries])


@pytest.mark.parametrize(("n", "dim", "classes", "shrinkage"), [(40, 3, 2, 0.0), (30, 8, 3, 0.01), (9, 12, 3, 0.3)])
def test_distances_match_the_loop_oracle(n, dim, classes, shrinkage):
    rng = np.random.default_rng(n + dim)
    labels = np.arange(n) % classes
    train = rng.normal(size=(n, dim)) * rng.uniform(0.2, 3.0, size=dim) + labels[:, None]
    queries = rng.normal(size=(6, dim)) * 2
    means, whitening = fit_class_gaussians(torch.from_numpy(train), torch.from_numpy(labels), classes, shrinkage)
    np.testing.assert_allclose(means.numpy(), [train[labels == c].mean(0) for c in range(classes)], atol=1e-12)
    got = mahalanobis_distances(torch.from_numpy(queries), means, whitening).numpy()
    np.testing.assert_allclose(got, oracle_distances(train, labels, queries, classes, shrinkage), rtol=1e-8, atol=1e-8)


def test_fit_refuses_bad_input_by_name():
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no samples"):
        fit_class_gaussians(x, y, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_class_gaussians(torch.full((10, 4), float("nan")), y, 2)
    with pytest.raises(ValueError, match="labels must be in"):
        fit_class_gaussians(x, y + 5, 2)
    with pytest.raises(ValueError, match="shrinkage"):
        fit_class_gaussians(x, y, 2, shrinkage=1.0)
    with pytest.raises(ValueError, match="features must be"):
        fit_class_gaussians(x[:, 0], y, 2)
    with pytest.raises(ValueError, match="not positive definite"):
        fit_class_gaussians(torch.ones(10, 4), y, 2)
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureDensity()(x)


def test_far_points_score_higher_than_held_out_ones():
    """In-distribution draws stay near the class means; points off the data's subspace are flagged whatever their
    norm (the covariance, not the distance to the origin, sets the scale)."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 16, generator=generator)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.arange(600) % 3
    points = centres[labels] + torch.randn(600, 4, generator=generator) @ basis + 0.05 * torch.randn(600, 16,
                                                                                                   generator=generator)
    density = FeatureDensity()
    density.fit(points[:450], labels[:450], 3)
    held_out = density(points[450:])
    off_subspace = centres[torch.arange(150) % 3] + 0.5 * torch.randn(150, 16, generator=generator)
    assert held_out.max() < density(off_subspace).min()


def test_heads_score_ood_by_feature_distance_once_fitted_and_the_checkpoint_carries_it():
    torch.manual_seed(0)
    tokens, pooled = torch.randn(12, 5, 16), torch.randn(12, 16)
    labels = torch.arange(12) % 3
    for make in (lambda: HeadOptimal(preset="patch", num_classes=3, img_feat_dim=16, emb_dim=8, num_heads=2),
                 lambda: BaselineHead("linear", 3, 16, [4, 4, 4])):
        head = make().eval()
        logits, _, info = head(tokens, pooled)
        torch.testing.assert_close(info["ood_score"], -torch.logsumexp(logits, -1))  # unfitted: logit energy
        assert "feature_distance" not in info
        head.feature_density.fit(pooled, labels, 3)
        _, _, fitted = head(tokens, pooled)
        expected = mahalanobis_distances(pooled, head.feature_density.means, head.feature_density.whitening)
        torch.testing.assert_close(fitted["ood_score"], expected.amin(1).float())
        assert fitted["feature_distance"] is fitted["ood_score"]

        fresh = make().eval()  # an unfitted head takes a fitted head's state (and then scores as it does)
        fresh.load_state_dict(head.state_dict())
        assert fresh.feature_density.fitted
        torch.testing.assert_close(fresh(tokens, pooled)[2]["ood_score"], fitted["ood_score"])
        unfitted = make().eval()
        unfitted.load_state_dict(make().state_dict())  # and an unfitted state stays unfitted
        assert not unfitted.feature_density.fitted


def test_runs_fit_the_density_on_the_identity_view_in_eval_mode_and_keep_energy_when_they_cannot():
    from protohead.pipeline import fit_feature_density
    from protohead.training.loop import SplitInputs

    generator = torch.Generator().manual_seed(1)
    pooled = torch.randn(2 * 30, 16, generator=generator)  # rows 0..29 the images, 30..59 a second view
    labels = np.arange(30) % 3
    seen: list[tuple[int, bool]] = []

    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seen.append((int(indices.max()), train))
        return torch.zeros(len(indices), 4, 16), pooled[indices], torch.from_numpy(labels[indices % 30])

    head = HeadOptimal(preset="patch", num_classes=3, img_feat_dim=16, emb_dim=8, num_heads=2).train()
    fit_feature_density(head, SplitInputs(fetch, 30, labels, views=2), batch_size=8, num_classes=3)
    assert head.training and head.feature_density.fitted  # mode restored
    assert max(row for row, _ in seen) < 30 and not any(train for _, train in seen)
    expected, _ = fit_class_gaussians(pooled[:30], torch.from_numpy(labels), 3)
    torch.testing.assert_close(head.feature_density.means, expected.float())

    constant = HeadOptimal(preset="patch", num_classes=3, img_feat_dim=16, emb_dim=8, num_heads=2)
    pooled = torch.ones(60, 16)
    with pytest.warns(RuntimeWarning, match="no feature density fitted.*not positive definite"):
        fit_feature_density(constant, SplitInputs(fetch, 30, labels, views=2), batch_size=8, num_classes=3)
    assert not constant.feature_density.fitted
    _, _, info = constant.eval()(torch.randn(2, 4, 16), torch.randn(2, 16))
    assert "feature_distance" not in info  # the logit energy stays its OOD score
