"""Router analysis: NMI agreement matrix, usage/entropy, rasters and the PNG plots."""

from __future__ import annotations

import json
import types

import matplotlib.image
import numpy as np
import pytest
import torch

from omni_ds.eval.analysis import (
    RoutingCollector,
    agreement_matrix,
    entropy_bits,
    mean_offdiagonal,
    normalized_mutual_info,
)
from omni_ds.eval.plots import save_plots


def fake_stats(choices: np.ndarray, entropy: float = 1.0):
    """RoutingStats-shaped record (expert [N, 1], prob [N, 1], entropy) for hand-built routing."""
    n = len(choices)
    return types.SimpleNamespace(
        expert=torch.as_tensor(choices)[:, None],
        prob=torch.full((n, 1), 0.5),
        entropy=torch.tensor(entropy),
    )


def test_nmi_identical_permuted_and_independent():
    rng = np.random.default_rng(0)
    E = 8
    a = rng.integers(0, E, 50_000)
    assert normalized_mutual_info(a, a, E) == pytest.approx(1.0)
    # relabelling experts keeps all information
    assert normalized_mutual_info(a, (a * 3 + 1) % E, E) == pytest.approx(1.0)
    b = rng.integers(0, E, 50_000)
    assert normalized_mutual_info(a, b, E) < 0.005
    # half the frames copied, half independent: clearly in between
    c = np.where(rng.random(50_000) < 0.5, a, b)
    assert 0.2 < normalized_mutual_info(a, c, E) < 0.6
    # constant layers: identical, by convention 1; constant vs varied: 0
    z = np.zeros(100, dtype=np.int64)
    assert normalized_mutual_info(z, z, E) == 1.0
    assert normalized_mutual_info(z, a[:100], E) == 0.0


def test_nmi_matches_definition_on_a_small_table():
    a = np.array([0, 0, 1, 1])
    b = np.array([0, 1, 1, 1])
    # H(a) = 1, H(b) = 0.8113, I = H(b) - H(b|a) = 0.8113 - 0.5 = 0.3113 bits
    h_b = entropy_bits(np.array([0.25, 0.75]))
    expected = 2 * (h_b - 0.5) / (1 + h_b)
    assert normalized_mutual_info(a, b, 2) == pytest.approx(expected)
    assert normalized_mutual_info(b, a, 2) == pytest.approx(expected)


def test_agreement_matrix_properties():
    rng = np.random.default_rng(1)
    E, N = 4, 20_000
    base = rng.integers(0, E, N)
    layers = [base, base.copy(), rng.integers(0, E, N), (base + 1) % E, rng.integers(0, E, N)]
    m = agreement_matrix(layers, E)
    assert m.shape == (5, 5)
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    assert m[0, 1] == pytest.approx(1.0) and m[0, 3] == pytest.approx(1.0)
    assert m[0, 2] < 0.01 and m[2, 4] < 0.01
    assert ((m >= 0) & (m <= 1 + 1e-12)).all()
    assert mean_offdiagonal(np.eye(3)) == 0.0


def hand_built_collector(num_rasters=3):
    """3 MoE layers over two batches: layer 1 copies layer 0, layer 2 sends 3/4 to expert 0."""
    rng = np.random.default_rng(2)
    E = 4
    col = RoutingCollector(num_experts=E, num_rasters=num_rasters)
    for batch, lens in enumerate([[30, 20], [25, 25]]):
        n = sum(lens)
        a = rng.integers(0, E, n)
        skewed = rng.choice(E, n, p=[0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3])
        routing = [fake_stats(a, 1.0), fake_stats(a, 1.0), fake_stats(skewed, 0.5 + batch)]
        col.add(routing, torch.tensor(lens), [f"b{batch}u{i}" for i in range(2)])
    return col, E


def test_collector_usage_entropy_and_rasters():
    col, E = hand_built_collector()
    r = col.result()
    assert r.frames == 100
    np.testing.assert_allclose(r.usage.sum(axis=1), 1.0)
    np.testing.assert_array_equal(r.usage[0], r.usage[1])
    assert r.usage[2, 0] > 0.6 and r.usage_entropy_bits[2] < r.usage_entropy_bits[0] <= 2.0
    # batch entropies 0.5 and 1.5 over 50 frames each
    np.testing.assert_allclose(r.router_entropy_bits, np.array([1.0, 1.0, 1.0]) / np.log(2))
    assert r.agreement[0, 1] == pytest.approx(1.0)
    assert list(r.rasters) == ["b0u0", "b0u1", "b1u0"]
    assert r.rasters["b0u0"].shape == (3, 30) and r.rasters["b0u1"].shape == (3, 20)
    # the second utterance's raster is frames 30..49 of the batch
    np.testing.assert_array_equal(r.rasters["b0u1"][0], r.rasters["b0u1"][1])
    json.dumps(r.to_dict())  # analysis.json must be plain JSON


def test_collector_rejects_frames_that_do_not_match_lengths():
    col = RoutingCollector(num_experts=4)
    with pytest.raises(ValueError, match="non-pad frames"):
        col.add([fake_stats(np.zeros(10, dtype=np.int64))], torch.tensor([4, 4]), ["a", "b"])


def test_plots_are_written_and_show_the_data(tmp_path):
    col, E = hand_built_collector()
    r = col.result()
    paths = save_plots(r, tmp_path, title="hand-built")
    assert [p.name for p in paths] == ["usage.png", "entropy.png", "agreement.png", "rasters.png"]
    for p in paths:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        # not a blank canvas: many distinct colours
        assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 50


def test_collector_on_the_real_encoder_and_random_routing():
    from omni_ds.config.loading import from_dict
    from omni_ds.config.model import ModelConfig
    from omni_ds.eval.analysis import set_random_routing
    from omni_ds.model.encoder import build_model

    cfg = from_dict(
        ModelConfig,
        {
            "vocab_size": 10, "d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 64,
            "dropout": 0.0, "frontend": {"n_mels": 16},
            "moe": {"router": "omni", "num_experts": 4, "min_capacity": 1},
        },
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(3, 32000, generator=g) * 0.1
    lens = torch.tensor([32000, 20000, 8000])
    col = RoutingCollector(num_experts=4, num_rasters=3)
    with torch.no_grad():
        out = model(audio, lens, return_stats=True)
    col.add(out.routing, out.out_lens, ["a", "b", "c"])
    r = col.result()
    assert r.usage.shape == (3, 4) and r.frames == int(out.out_lens.sum())
    assert [v.shape for v in r.rasters.values()] == [(3, int(n)) for n in out.out_lens]
    assert (r.router_entropy_bits > 0).all() and (r.router_entropy_bits <= 2 + 1e-6).all()

    assert set_random_routing(model, True) == 3
    col = RoutingCollector(num_experts=4)
    torch.manual_seed(2)
    with torch.no_grad():
        for _ in range(20):
            out = model(audio, lens, return_stats=True)
            col.add(out.routing, out.out_lens, ["a", "b", "c"])
    r = col.result()
    # uniformly random experts: even usage, and layers carry no information about each other
    np.testing.assert_allclose(r.usage, 0.25, atol=0.05)
    assert mean_offdiagonal(r.agreement) < 0.02
    set_random_routing(model, False)
