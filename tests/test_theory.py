"""The theory experiment: the generator's exact moments, the paper's Section 2 claims on planted data, the SAE
ground truth, and the whole study in quick mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.heads import HeadConfig, predict_head, train_head
from analysis.theory.study import TheoryConfig, theory_study
from analysis.theory.model import (
    ConceptModel, ConceptModelConfig, concept_covariance, global_error_claim, global_error_sd,
)
from analysis.theory.predict import PredictorConfig, evaluate_draw, least_squares_head
from analysis.theory.sae_truth import SAECheckConfig, matched_cosines, sae_ground_truth
from analysis.theory.sweeps import global_error_tolerance, log_slope, slope_over_seeds

# Underparameterised (d2 = d1/8) and locally sparse: each cluster's points share their s concepts.
SPARSE = ConceptModelConfig(d1=128, s=8, d2=16, n_clusters=64, spread=0.5, noise=0.3, n_train=4000, n_test=300)


def test_features_are_the_projection_of_the_concepts_with_exactly_s_active():
    model = ConceptModel(SPARSE)
    data = model.sample(500, stream=0)
    assert data.concepts.indices.shape == (500, SPARSE.s)
    assert all(np.unique(row).size == SPARSE.s for row in data.concepts.indices)
    assert (np.diff(data.concepts.values, axis=1) <= 0).all() and (data.concepts.values > 0).all()
    phi = data.concepts.dense().astype(np.float64)
    np.testing.assert_allclose(data.x, phi @ model.A.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data.f, phi @ model.w[:, 0], rtol=1e-4, atol=1e-4)
    # Same seed, same draw; another stream, other points.
    again = ConceptModel(SPARSE).sample(500, stream=0)
    np.testing.assert_array_equal(data.x, again.x)
    assert not np.allclose(ConceptModel(SPARSE).sample(500, stream=1).x, data.x)


@pytest.mark.parametrize("local_sparsity", [True, False])
def test_exact_covariance_matches_the_sample_and_the_target_has_unit_variance(local_sparsity):
    config = SPARSE.replace(d1=32, s=4, n_clusters=8, local_sparsity=local_sparsity)
    model = ConceptModel(config)
    data = model.sample(40000, stream=0)
    phi = data.concepts.dense().astype(np.float64)
    empirical = np.cov(phi, rowvar=False)
    assert np.abs(empirical - model.sigma).max() < 0.05
    assert model.w[:, 0] @ model.sigma @ model.w[:, 0] == pytest.approx(1.0)
    assert data.f.var() == pytest.approx(1.0, abs=0.05)


def test_covariance_of_one_full_pool_is_the_closed_form_of_uniform_supports():
    s, d1, mu, sd = 3, 10, 1.5, 0.3
    sigma = concept_covariance(np.arange(d1)[None], np.full((1, d1), mu), sd, s=s, d1=d1)
    mean = s / d1 * mu
    off = sigma[~np.eye(d1, dtype=bool)]
    np.testing.assert_allclose(np.diag(sigma), s / d1 * (mu ** 2 + sd ** 2) - mean ** 2)
    np.testing.assert_allclose(off, s * (s - 1) / (d1 * (d1 - 1)) * mu ** 2 - mean ** 2)


def test_population_error_averages_to_one_minus_d2_over_d1_for_isotropic_concepts():
    d1, d2, n_draws = 128, 32, 24
    errors = [ConceptModel(SPARSE.replace(local_sparsity=False, d2=d2, seed=seed)).global_population_error()
              for seed in range(n_draws)]
    assert abs(np.mean(errors) - global_error_claim(d1, d2)) < 4 * global_error_sd(d1, d2) / math.sqrt(n_draws)
    assert np.std(errors) == pytest.approx(global_error_sd(d1, d2), rel=0.5)


def test_least_squares_head_is_the_toolkit_head_with_the_lstsq_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7)).astype(np.float32) + 2.0
    y = (x @ rng.normal(size=7) + 0.5 + 0.1 * rng.normal(size=300)).astype(np.float32)
    head = least_squares_head(x, y, ridge=0.0)
    coef = np.linalg.lstsq(np.c_[x, np.ones(300)].astype(np.float64), y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(predict_head(head, x), np.c_[x, np.ones(300)] @ coef, atol=1e-4)


@pytest.mark.parametrize("d2", [16, 64])
def test_global_head_error_matches_one_minus_d2_over_d1_on_isotropic_data(d2):
    config = SPARSE.replace(local_sparsity=False, d2=d2, n_train=6000, n_test=1500)
    seeds = range(8)  # the draw of w* against A spreads the error by global_error_sd: average it down
    errors = []
    for seed in seeds:
        train, test = ConceptModel(config.replace(seed=seed)).train_test()
        errors.append((predict_head(least_squares_head(train.x, train.y), test.x) - test.f) ** 2)
    errors = np.concatenate(errors)
    se = errors.std(ddof=1) / math.sqrt(errors.size)
    tol = global_error_tolerance(config.d1, d2, config.n_train, config.noise, se, len(seeds))
    assert abs(errors.mean() - global_error_claim(config.d1, d2)) <= tol
    assert tol < 0.25 * global_error_claim(config.d1, d2)  # the tolerance is tight enough to mean something


def test_trained_head_converges_to_the_least_squares_head(one_thread):
    train, test = ConceptModel(SPARSE.replace(local_sparsity=False)).train_test()
    trained = train_head(train.x, train.y, HeadConfig(task="regression", epochs=20, lr=3e-3))
    lstsq = least_squares_head(train.x, train.y)
    err_trained = np.mean((predict_head(trained, test.x) - test.f) ** 2)
    err_lstsq = np.mean((predict_head(lstsq, test.x) - test.f) ** 2)
    assert abs(err_trained - err_lstsq) < 0.03


def test_ttt_beats_the_global_head_when_locally_sparse_and_the_gap_closes_as_d2_reaches_d1(one_thread):
    narrow = evaluate_draw(SPARSE, PredictorConfig())
    k = PredictorConfig().ttt.n_neighbours
    gain_narrow = narrow.global_error.mean() - narrow.by_k[k]["ttt"].mean()
    assert narrow.global_error.mean() > 0.5
    assert narrow.by_k[k]["ttt"].mean() < 0.25 * narrow.global_error.mean()
    assert narrow.by_k[k]["union"].mean() < 2 * SPARSE.s  # neighbourhoods are locally sparse
    wide = evaluate_draw(SPARSE.replace(d2=SPARSE.d1), PredictorConfig())
    gain_wide = wide.global_error.mean() - wide.by_k[k]["ttt"].mean()
    assert gain_wide < 0.1 * gain_narrow


def test_isotropic_concepts_give_ttt_no_advantage(one_thread):
    draw = evaluate_draw(SPARSE.replace(local_sparsity=False), PredictorConfig())
    k = PredictorConfig().ttt.n_neighbours
    gain = draw.global_error - draw.by_k[k]["ttt"]
    assert gain.mean() <= 2 * gain.std(ddof=1) / math.sqrt(gain.size)
    assert draw.by_k[k]["union"].mean() > 5 * SPARSE.s  # neighbours share few concepts


def test_classification_targets_show_the_same_local_advantage(one_thread):
    config = SPARSE.replace(task="classification", n_classes=5)
    data = ConceptModel(config).sample(200, stream=0)
    assert data.y.dtype == np.int64 and set(np.unique(data.y)) <= set(range(5)) and data.f.shape == (200, 5)
    draw = evaluate_draw(config, PredictorConfig())
    k = PredictorConfig().ttt.n_neighbours
    assert np.isnan(draw.population_error)
    assert draw.by_k[k]["ttt"].mean() < 0.7 * draw.global_error.mean()  # 0/1 errors: about 0.26 vs 0.56


def test_matched_cosines_find_planted_columns_and_not_random_ones():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(16, 20))
    rows = np.concatenate([(A / np.linalg.norm(A, axis=0)).T * 3.0, rng.normal(size=(5, 16))])
    assert np.allclose(matched_cosines(A, rows), 1.0)
    assert (matched_cosines(A, rng.normal(size=(40, 16))) < 0.9).all()


def test_sae_recovers_the_planted_concepts(tmp_path, one_thread):
    config = SPARSE.replace(d1=48, s=3, cluster_pool=6, n_clusters=32, d2=32, n_train=3000, n_test=200)
    out = sae_ground_truth(config, SAECheckConfig(n_steps=400, lr=1e-2, n_queries=100, n_neighbours=20), tmp_path)
    assert out["recovered_fraction"]["value"] > 0.9, out["matched_cosine"]
    assert out["control_recovered_fraction"]["value"] == 0.0
    # The learned codes see the same local sparsity as the true concepts.
    assert out["union_learned"]["value"] == pytest.approx(out["union_true"]["value"], rel=0.3)


def test_slopes_read_a_power_law_per_seed():
    assert log_slope([(k, 2.0 / k) for k in (5, 10, 20, 40)]) == pytest.approx(-1.0)
    assert log_slope([(5, 1.0)]) is None
    slopes = slope_over_seeds([[(k, c / k ** 0.9) for k in (5, 10, 20)] for c in (1.0, 2.0, 3.0)], "test")
    assert slopes["value"] == pytest.approx(-0.9) and slopes["n"] == 3


def test_configs_reject_bad_values_naming_the_flag():
    with pytest.raises(ValueError, match="--s"):
        ConceptModelConfig(d1=10, s=11)
    with pytest.raises(ValueError, match="--spread"):
        ConceptModelConfig(spread=0.9)
    with pytest.raises(ValueError, match="--cluster-pool"):
        ConceptModelConfig(s=8, cluster_pool=4)
    with pytest.raises(ValueError, match="--seeds"):
        TheoryConfig(seeds=())


@pytest.mark.slow
def test_quick_study_writes_claims_measures_and_plots(tmp_path, one_thread):
    result = theory_study(TheoryConfig(quick=True), tmp_path)
    json.dumps(result)  # JSON-ready
    theory = result["theory"]
    assert len(theory["claims"]) == 8 and all("measured" in c and "paper" in c for c in theory["claims"])
    for row in theory["sweeps"]["d2"]["isotropic"]:
        assert {"value", "se", "n"} <= set(row["global"]) and "claim_global" in row
    holds = [c["holds"] for c in theory["claims"]]
    # Global error 1 − d2/d1, TTT ≫ global when locally sparse, no advantage isotropic, gap closes, best size.
    assert holds[0] and holds[1] and holds[2] and holds[3] and holds[6], [c["summary"] for c in theory["claims"]]
    assert set(result["plots"]) == {"theory_error_vs_d2", "theory_ttt_vs_neighbours", "theory_regimes",
                                    "theory_s_noise"}
    assert all(Path(p).is_file() and Path(p).stat().st_size > 1000 for p in result["plots"].values())
