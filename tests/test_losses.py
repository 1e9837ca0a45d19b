"""Each vectorised loss equals a plain per-class / per-sample loop oracle written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protohead import losses

# ------------------------------------------------------------------ oracles (plain loops, no masking tricks)


def oracle_cluster(dist, counts, labels, weights):
    num, den = 0.0, 0.0
    for c in range(dist.shape[1]):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        if not rows:
            continue
        mins = [min(float(dist[i, c, k]) for k in range(counts[c])) for i in rows]
        w = 1.0 if weights is None else float(weights[c])
        num += w * sum(mins) / len(mins)
        den += w
    return num / den


def oracle_separation(dist, counts, labels, margin, form):
    if dist.shape[1] < 2:
        return 0.0
    values = []
    for i in range(len(labels)):
        nearest = min(float(dist[i, c, k]) for c in range(dist.shape[1]) if c != labels[i]
                      for k in range(counts[c]))
        values.append(max(0.0, margin - nearest) if form == "margin" else nearest)
    return sum(values) / len(values)


def cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def oracle_diversity(protos, counts, threshold):
    per_class = []
    for c in range(protos.shape[0]):
        pairs = [(j, k) for j in range(counts[c]) for k in range(j + 1, counts[c])]
        if pairs:
            per_class.append(sum(max(0.0, cos(protos[c, j], protos[c, k]) - threshold) for j, k in pairs)
                             / len(pairs))
    return sum(per_class) / len(per_class) if per_class else 0.0


def oracle_contrastive(protos, counts, pairs):
    items = [(c, protos[c, k]) for c in range(protos.shape[0]) for k in range(counts[c])]
    values = [cos(u, v) for i, (cu, u) in enumerate(items) for j, (cv, v) in enumerate(items)
              if i != j and (pairs == "all" or cu != cv)]
    return sum(values) / len(values) if values else 0.0


def oracle_orthogonality(protos, counts):
    total = 0.0
    for c in range(protos.shape[0]):
        p = F.normalize(protos[c, : counts[c]], dim=-1)
        total += float(((p @ p.t() - torch.eye(counts[c])) ** 2).sum())
    return total / protos.shape[0]


def oracle_ce(logits, labels, weights, gamma):
    num, den = 0.0, 0.0
    for i in range(len(labels)):
        p = torch.softmax(logits[i].double(), 0)[labels[i]]
        loss = -math.log(p) * (1 - float(p)) ** gamma
        w = 1.0 if weights is None else float(weights[labels[i]])
        num += w * loss
        den += w
    return num / den


def oracle_abstention(logits, abstain, labels, scale, payoff=1.0):
    nll, pen = [], []
    for i in range(len(labels)):
        z = torch.cat([logits[i], abstain[i : i + 1]]).double()
        alpha = float(torch.softmax(z, 0)[-1])
        p = torch.softmax(logits[i].double(), 0)
        virtual = (1 - alpha) * p
        virtual[labels[i]] += alpha / payoff
        nll.append(-math.log(float(virtual[labels[i]])))
        pen.append(-math.log(1 - alpha))
    return sum(nll) / len(nll) + scale * sum(pen) / len(pen), sum(pen) / len(pen)


# ------------------------------------------------------------------ cases


def make_case(seed, batch, num_classes, max_slots, counts=None, labels=None):
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(batch, num_classes, max_slots, generator=g, dtype=torch.float64) * 2
    protos = torch.randn(num_classes, max_slots, 6, generator=g, dtype=torch.float64)
    if counts is None:
        counts = torch.randint(1, max_slots + 1, (num_classes,), generator=g).tolist()
    valid = torch.arange(max_slots)[None, :] < torch.tensor(counts)[:, None]
    if labels is None:
        labels = torch.randint(0, num_classes, (batch,), generator=g)
    return dist, protos, counts, valid, torch.as_tensor(labels)


CASES = [
    dict(seed=0, batch=16, num_classes=7, max_slots=5),
    dict(seed=1, batch=9, num_classes=5, max_slots=4, labels=[0, 0, 1, 1, 1, 0, 1, 0, 0]),  # absent classes
    dict(seed=2, batch=1, num_classes=4, max_slots=3),  # one sample
    dict(seed=3, batch=6, num_classes=1, max_slots=3, counts=[3]),  # one class only
    dict(seed=4, batch=8, num_classes=3, max_slots=4, counts=[1, 4, 2]),  # a class with one prototype
    dict(seed=5, batch=12, num_classes=6, max_slots=1, counts=[1] * 6),  # one prototype everywhere
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_cluster_matches_oracle(case, weighted):
    dist, _, counts, valid, labels = make_case(**case)
    weights = torch.rand(dist.shape[1], dtype=torch.float64) + 0.1 if weighted else None
    got = losses.cluster_loss(dist, valid, labels, weights)
    assert float(got) == pytest.approx(oracle_cluster(dist, counts, labels, weights), rel=1e-9, abs=1e-12)


def test_cluster_absent_class_takes_no_weight():
    dist, _, _, valid, labels = make_case(seed=7, batch=10, num_classes=4, max_slots=2, labels=[0] * 5 + [1] * 5)
    weights = torch.tensor([1.0, 2.0, 1000.0, 1000.0], dtype=torch.float64)
    reference = losses.cluster_loss(dist, valid, labels, weights)
    weights[2:] = 1e-3  # changing absent classes' weights changes nothing
    assert torch.equal(losses.cluster_loss(dist, valid, labels, weights), reference)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", ["margin", "unbounded"])
def test_separation_matches_oracle(case, form):
    dist, _, counts, valid, labels = make_case(**case)
    got = losses.separation_loss(dist, valid, labels, margin=0.9, form=form)
    assert float(got) == pytest.approx(oracle_separation(dist, counts, labels, 0.9, form), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_diversity_matches_oracle(case):
    _, protos, counts, valid, _ = make_case(**case)
    got = losses.diversity_loss(protos, valid, threshold=0.1)
    assert float(got) == pytest.approx(oracle_diversity(protos, counts, 0.1), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pairs", ["different_class", "all"])
def test_contrastive_matches_oracle(case, pairs):
    _, protos, counts, valid, _ = make_case(**case)
    got = losses.contrastive_loss(protos, valid, pairs)
    assert float(got) == pytest.approx(oracle_contrastive(protos, counts, pairs), rel=1e-9, abs=1e-12)


def test_contrastive_all_pairs_pushes_same_class_prototypes_apart():
    """§2.3: the legacy form has a gradient that pulls same-class pairs apart; the fixed form has none.

    Three classes of four prototypes: the different-class form's gradient of one prototype only involves the other
    classes' prototypes, so moving a same-class partner leaves it unchanged; the all-pairs form's changes."""
    torch.manual_seed(0)
    protos = torch.randn(3, 4, 8, dtype=torch.float64)
    valid = torch.ones(3, 4, dtype=torch.bool)

    def grad_of_first(bank: torch.Tensor, pairs: str) -> torch.Tensor:
        bank = bank.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(losses.contrastive_loss(bank, valid, pairs), bank)
        return grad[0, 0]

    moved = protos.clone()
    moved[0, 1] += torch.randn(8, dtype=torch.float64)  # a same-class partner of prototype (0, 0)
    assert float(losses.contrastive_loss(protos, valid, "different_class")) != 0.0  # it acts between classes
    torch.testing.assert_close(grad_of_first(moved, "different_class"), grad_of_first(protos, "different_class"),
                               rtol=0, atol=1e-12)
    assert not torch.allclose(grad_of_first(moved, "all"), grad_of_first(protos, "all"))


@pytest.mark.parametrize("case", CASES)
def test_orthogonality_matches_oracle(case):
    _, protos, counts, valid, _ = make_case(**case)
    got = losses.orthogonality_loss(protos, valid)
    assert float(got) == pytest.approx(oracle_orthogonality(protos, counts), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("weighted", "gamma"), [(False, 0.0), (True, 0.0), (True, 2.0)])
def test_cross_entropy_matches_oracle(case, weighted, gamma):
    dist, _, _, _, labels = make_case(**case)
    logits = dist[:, :, 0] * 3
    weights = torch.rand(dist.shape[1], dtype=torch.float64) + 0.1 if weighted else None
    got = losses.cross_entropy_loss(logits, labels, weights, gamma)
    assert float(got) == pytest.approx(oracle_ce(logits, labels, weights, gamma), rel=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_abstention_matches_oracle(case):
    dist, _, _, _, labels = make_case(**case)
    logits = dist[:, :, 0] * 3
    abstain = dist[:, 0, -1] * 2
    total, penalty = losses.abstention_loss(logits, abstain, labels, scale=0.1)
    want_total, want_penalty = oracle_abstention(logits, abstain, labels, 0.1)
    assert float(total) == pytest.approx(want_total, rel=1e-9)
    assert float(penalty) == pytest.approx(want_penalty, rel=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_deep_gamblers_payoff_matches_oracle_and_makes_abstaining_pay_less(case):
    dist, _, _, _, labels = make_case(**case)
    logits, abstain = dist[:, :, 0] * 3, dist[:, 0, -1] * 2
    total, _ = losses.abstention_loss(logits, abstain, labels, scale=0.0, payoff=2.2)
    want_total, _ = oracle_abstention(logits, abstain, labels, 0.0, payoff=2.2)
    assert float(total) == pytest.approx(want_total, rel=1e-9)
    # abstaining pays at odds 1/o: raising α lowers the loss exactly where the true class has p_y < 1/o
    logits = torch.randn(200, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(200) % 7
    p_true = torch.softmax(logits, 1)[torch.arange(200), labels]
    for payoff in (1.0, 2.2, 7.0):
        abstain = torch.zeros(200, dtype=torch.float64, requires_grad=True)
        losses.abstention_loss(logits, abstain, labels, scale=0.0, payoff=payoff)[0].backward()
        torch.testing.assert_close(torch.sign(abstain.grad), torch.sign(p_true - 1 / payoff))
    with pytest.raises(ValueError, match="payoff must be finite and ≥ 1"):
        losses.abstention_loss(logits, abstain, labels, payoff=0.5)


@pytest.mark.parametrize("case", CASES)
def test_weighted_abstention_matches_oracle(case):
    """The class-weighted virtual-prediction NLL (coupled abstention with class-balanced weights)."""
    dist, _, _, _, labels = make_case(**case)
    logits, abstain = dist[:, :, 0] * 3, dist[:, 0, -1] * 2
    weights = torch.rand(dist.shape[1], dtype=torch.float64) + 0.1
    total, penalty = losses.abstention_loss(logits, abstain, labels, scale=0.7, weights=weights)
    _, want_penalty = oracle_abstention(logits, abstain, labels, 0.7)
    nll = []
    for i in range(len(labels)):
        one, _ = oracle_abstention(logits[i:i + 1], abstain[i:i + 1], labels[i:i + 1], 0.0)
        nll.append(one)
    w = [float(weights[int(y)]) for y in labels]
    want_nll = sum(wi * li for wi, li in zip(w, nll, strict=True)) / sum(w)
    assert float(total) == pytest.approx(want_nll + 0.7 * want_penalty, rel=1e-9)
    assert float(penalty) == pytest.approx(want_penalty, rel=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_cluster_sample_mean_is_protopnets_plain_mean(case):
    dist, _, counts, valid, labels = make_case(**case)
    want = sum(min(float(dist[i, int(y), k]) for k in range(counts[int(y)])) for i, y in enumerate(labels))
    got = losses.cluster_loss(dist, valid, labels, torch.rand(dist.shape[1]), reduction="sample_mean")
    assert float(got) == pytest.approx(want / len(labels), rel=1e-9)


def test_class_weights_schemes():
    counts = torch.tensor([4693, 80, 99, 0])
    inv = losses.class_weights(counts, "inv_sqrt")
    assert float(inv.mean()) == pytest.approx(1.0)
    ratio = float(inv[1] / inv[0])
    assert ratio == pytest.approx(math.sqrt(4693 / 80), rel=1e-5)
    cb = losses.class_weights(counts, "effective_number", beta=0.9999)
    expect = [(1 - 0.9999) / (1 - 0.9999 ** max(n, 1)) for n in counts.tolist()]
    expect = torch.tensor(expect) / torch.tensor(expect).mean()
    torch.testing.assert_close(cb, expect.float())
    # β matters: a smaller β weighs the classes more evenly
    assert float(losses.class_weights(counts, "effective_number", beta=0.9)[1]) != pytest.approx(float(cb[1]))


def test_uncertainty_weighting_formula():
    s = torch.tensor([0.3, -0.2])
    got = losses.uncertainty_weighted_total(torch.tensor(2.0), torch.tensor(0.5), s)
    assert float(got) == pytest.approx(math.exp(-0.3) * 2 + 0.3 + math.exp(0.2) * 0.5 - 0.2)


# ------------------------------------------------------------------ prototype usage (Sinkhorn equipartition)


def oracle_usage(dist, counts, labels, sharpness, epsilon=0.05, iterations=3):
    """Per class, plain Sinkhorn–Knopp on its members × valid slots, then the cross-entropy, in float64 loops."""
    per_class = []
    for c in range(dist.shape[1]):
        rows = [i for i in range(len(labels)) if int(labels[i]) == c]
        width = counts[c]
        if width < 2 or len(rows) < width:
            continue
        scores = [[-float(dist[i, c, k]) for k in range(width)] for i in rows]
        plan = [[math.exp((s - max(row)) / epsilon) for s in row] for row in scores]
        for _ in range(iterations):
            for k in range(width):
                column = sum(plan[r][k] for r in range(len(rows)))
                for r in range(len(rows)):
                    plan[r][k] /= column * width
            for r in range(len(rows)):
                total = sum(plan[r])
                plan[r] = [v / total / len(rows) for v in plan[r]]
        losses_c = []
        for r, row in enumerate(scores):
            norm = math.log(sum(math.exp(sharpness * s) for s in row))
            target = [v * len(rows) for v in plan[r]]
            losses_c.append(-sum(t * (sharpness * s - norm) for t, s in zip(target, row, strict=True)))
        per_class.append(sum(losses_c) / len(losses_c))
    return sum(per_class) / len(per_class) if per_class else 0.0


USAGE_CASES = [
    *CASES,
    dict(seed=6, batch=20, num_classes=3, max_slots=4, counts=[4, 3, 2], labels=[0] * 9 + [1] * 8 + [2] * 3),
    dict(seed=7, batch=10, num_classes=2, max_slots=5, counts=[5, 5], labels=[0] * 4 + [1] * 6),  # class 0: too few
]


@pytest.mark.parametrize("case", USAGE_CASES)
def test_prototype_usage_matches_oracle(case):
    dist, _, counts, valid, labels = make_case(**case)
    got = losses.prototype_usage_loss(dist, valid, labels, sharpness=3.0)
    assert float(got) == pytest.approx(oracle_usage(dist, counts, labels, 3.0), rel=1e-9, abs=1e-12)
    assert got.requires_grad == dist.requires_grad


def test_balanced_assignment_splits_a_class_evenly():
    """Every sample prefers slot 0; the target still gives each valid slot n / K of the mass, each row sums to 1."""
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0], [0.95, 0.5, 0.0]],
                          dtype=torch.float64)[None]  # (1, B=4, M=3), slot 2 unused
    members = torch.tensor([[True, True, True, True]])
    slots = torch.tensor([[True, True, False]])
    target = losses.balanced_assignment(scores, members, slots, iterations=50)
    torch.testing.assert_close(target.sum(-1), torch.ones(1, 4, dtype=torch.float64))
    torch.testing.assert_close(target.sum(1)[0, :2], torch.tensor([2.0, 2.0], dtype=torch.float64), atol=1e-3,
                               rtol=0)
    assert float(target[0, :, 2].abs().max()) == 0.0
    # the samples that like slot 1 most (relative to slot 0) are the ones sent there
    assert target[0, :, 1].argsort()[-2:].sort().values.tolist() == [2, 3]


def test_prototype_usage_spreads_the_wins_of_a_collapsed_class():
    """Gradient steps on the usage term alone turn a class won entirely by one prototype into one whose samples
    are split among its prototypes (at the start the first prototype wins all 8 samples)."""
    g = torch.Generator().manual_seed(0)
    axis = torch.eye(4, dtype=torch.float64)
    samples = F.normalize(2.0 * axis[0] + 0.5 * torch.randn(8, 4, generator=g, dtype=torch.float64), dim=-1)
    prototypes = torch.stack([axis[0], 0.2 * axis[0] + axis[3]]).requires_grad_(True)  # the first wins all 8
    labels = torch.zeros(8, dtype=torch.long)
    valid = torch.ones(1, 2, dtype=torch.bool)

    def distances():
        return 1.0 - F.normalize(samples, dim=-1) @ F.normalize(prototypes, dim=-1).t()

    assert distances().argmin(1).tolist() == [0] * 8
    optimizer = torch.optim.SGD([prototypes], lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        losses.prototype_usage_loss(distances()[:, None, :], valid, labels).backward()
        optimizer.step()
    wins = distances().argmin(1).bincount(minlength=2).tolist()
    assert min(wins) >= 3, wins


def test_prototype_usage_computes_in_float32_on_bfloat16_distances():
    """Under bfloat16 autocast the distances arrive in bfloat16: the term (Sinkhorn scaling included) runs on them
    cast to float32, so it equals the float32 computation on the same rounded values."""
    dist, _, _, valid, labels = make_case(**USAGE_CASES[-2])
    low = dist.to(torch.bfloat16)
    got = losses.prototype_usage_loss(low, valid, labels)
    assert got.dtype == torch.float32
    assert float(got) == float(losses.prototype_usage_loss(low.float(), valid, labels))
