"""LeRF, SRG, confidence intervals and the replacements (noise, blur, ROAD imputation), checked
against hand computations; the comparison with SHAP of ABN end to end on tiny models."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from impactx_ray.eval import morf_curve, perturbed_images, random_maps
from impactx_ray.eval.morf import aopc_per_image, auc_per_image, mean_ci, srg_per_image
from impactx_ray.eval.road import ROAD_KERNEL, ROAD_NOISE, road_impute
from tests.test_morf import PatchModel, _data


def test_road_center_pixel_is_the_weighted_mean_of_its_eight_neighbours():
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    removed[0, 1, 1] = True
    out = road_impute(x, removed)
    # direct neighbours 1, 3, 5, 7 weigh 1/6, diagonal 0, 2, 6, 8 weigh 1/12: 16/6 + 16/12 = 4
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0, abs=1e-6)
    keep = ~removed[0]
    assert torch.equal(out[0, 0][keep], x[0, 0][keep])


def test_road_corner_renormalises_over_neighbours_inside_the_image():
    x = torch.tensor([[0.0, 0.3], [0.6, 0.9]]).view(1, 1, 2, 2)
    removed = torch.tensor([[[True, False], [False, False]]])
    # neighbours (0,1) and (1,0) weigh 1/6, (1,1) 1/12: (0.3/6 + 0.6/6 + 0.9/12) / (5/12)
    expected = (0.3 / 6 + 0.6 / 6 + 0.9 / 12) / (5 / 12)
    assert road_impute(x, removed)[0, 0, 0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_road_two_unknowns_in_a_row_interpolate_linearly():
    # a 1×4 row [a, ?, ?, d]: only direct neighbours, 2·v1 − v2 = a and 2·v2 − v1 = d
    x = torch.tensor([0.2, 0.0, 0.0, 0.8]).view(1, 1, 1, 4)
    removed = torch.tensor([[[False, True, True, False]]])
    out = road_impute(x, removed)[0, 0, 0]
    assert out[1].item() == pytest.approx((2 * 0.2 + 0.8) / 3, abs=1e-6)
    assert out[2].item() == pytest.approx((0.2 + 2 * 0.8) / 3, abs=1e-6)


def _road_dense(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's system written out pixel by pixel (as their ``setup_sparse_system``), solved densely."""
    h, w = removed.shape
    unknown = [tuple(p) for p in np.argwhere(removed)]
    index = {p: i for i, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros(len(unknown))
    for i, (r, c) in enumerate(unknown):
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                wgt = float(ROAD_KERNEL[dr + 1, dc + 1])
                rr, cc = r + dr, c + dc
                if wgt == 0 or not (0 <= rr < h and 0 <= cc < w):
                    continue
                a[i, i] += wgt
                if (rr, cc) in index:
                    a[i, index[rr, cc]] -= wgt
                else:
                    b[i] += wgt * img[rr, cc]
    out = img.copy()
    out[removed] = np.linalg.solve(a, b)
    return out


def test_road_equals_a_dense_solve_of_roads_equations():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 9, 11, generator=g)
    removed = torch.rand(2, 9, 11, generator=g) < 0.6
    out = road_impute(x, removed).numpy()
    for n in range(2):
        for c in range(3):
            ref = _road_dense(x[n, c].numpy().astype(np.float64), removed[n].numpy())
            np.testing.assert_allclose(out[n, c], ref, atol=1e-5)
    # a warm start from anything finite reaches the same solution
    warm = road_impute(x, removed, init=torch.rand(2, 3, 9, 11, generator=g)).numpy()
    np.testing.assert_allclose(warm, out, atol=1e-5)


def test_road_fully_removed_image_gets_the_middle_of_the_range():
    x = torch.rand(1, 3, 4, 4)
    out = road_impute(x, torch.ones(1, 4, 4, dtype=torch.bool), fill=0.5)
    assert torch.equal(out, torch.full_like(x, 0.5))


def test_road_step_adds_small_noise_only_on_removed_pixels():
    x, _, true_maps = _data()
    k = 4  # the top-left 8×8 patch
    base = perturbed_images(x, true_maps, k, region=4, replacement="road", seed=1)
    removed = torch.zeros(32, 32, dtype=torch.bool)
    removed[:8, :8] = True
    assert torch.equal(base[:, :, ~removed], x[:, :, ~removed])
    clean = road_impute(x, removed.expand(len(x), -1, -1).contiguous())
    noise = (base - clean)[:, :, removed]
    assert abs(noise.std().item() - ROAD_NOISE) < 0.002  # N(0, 0.01²) on 12·3·64 pixels
    # the imputed patch comes from its surroundings (~0.5), not from the bright patch (1.0)
    assert clean[:, :, removed].mean().item() < 0.7
    # the curve scores exactly these images (same noise stream, warm-started solves agree)
    curve = morf_curve(PatchModel(), x, torch.zeros(len(x), dtype=torch.long), true_maps,
                       region=4, steps=k, replacement="road", seed=1)
    expected = torch.softmax(PatchModel()(base), 1)[:, 0].numpy()
    np.testing.assert_allclose(curve[:, k], expected, atol=1e-4)


def test_blur_replaces_with_the_local_mean():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 16:, :] = 1.0
    maps = np.zeros((1, 32, 32), np.float32)
    maps[0, :4, :4] = 1.0
    out = perturbed_images(x, maps, 1, region=4, replacement="blur")
    assert torch.equal(out[0, 0, :4, :4], torch.zeros(4, 4))  # far from the edge: mean of zeros
    maps2 = np.zeros((1, 32, 32), np.float32)
    maps2[0, 16:20, :4] = 1.0  # just below the edge: the 9×9 box mean sees 4 rows of zeros
    out2 = perturbed_images(x, maps2, 1, region=4, replacement="blur")
    assert out2[0, 0, 16, 8].item() == 1.0 and out2[0, 0, 16, 0].item() == pytest.approx(5 / 9)


def test_lerf_is_the_reverse_order_and_srg_rewards_the_true_map():
    x, y, true_maps = _data()
    model = PatchModel()
    morf = morf_curve(model, x, y, true_maps, region=4, order="morf")
    lerf = morf_curve(model, x, y, true_maps, region=4, order="lerf")
    assert morf.shape == lerf.shape == (len(x), 65)
    np.testing.assert_array_equal(morf[:, 0], lerf[:, 0])
    # LeRF keeps the patch until the last 4 regions: the score holds, then falls
    assert (lerf[:, 60] > lerf[:, 0] - 1e-4).all() and (lerf[:, 64] < lerf[:, 0] - 0.3).all()
    rnd = random_maps(true_maps.shape, seed=0)
    srg_true = srg_per_image(morf, lerf).mean()
    srg_rand = srg_per_image(morf_curve(model, x, y, rnd, region=4),
                             morf_curve(model, x, y, rnd, region=4, order="lerf")).mean()
    assert srg_true > 0.35 and abs(srg_rand) < 0.15  # ≈ 0.48 drop × (60 − 4)/64 steps
    # LeRF of step k removes what MoRF keeps until step 64 − k: the complement, same noise
    a = perturbed_images(x, true_maps, 60, region=4, order="lerf", seed=2)
    b = perturbed_images(x, true_maps, 4, region=4, order="morf", seed=2)
    changed_a, changed_b = (a != x).any(1), (b != x).any(1)
    assert not (changed_a & changed_b).any() and (changed_a | changed_b).sum() > 0.9 * 12 * 32 * 32


def test_per_image_measures_by_hand():
    c = np.array([[1.0, 0.5, 0.0], [0.8, 0.8, 0.2]])
    np.testing.assert_allclose(aopc_per_image(c), [(0.5 + 1.0) / 2, (0.0 + 0.6) / 2])
    # trapezoids on x = 0, 1/2, 1: ((1 + .5)/2 + (.5 + 0)/2)/2 = 0.5
    np.testing.assert_allclose(auc_per_image(c), [0.5, ((0.8 + 0.8) / 2 + (0.8 + 0.2) / 2) / 2])
    np.testing.assert_allclose(srg_per_image(c, c[::-1]), [0.65 - 0.5, 0.5 - 0.65])
    v = np.array([1.0, 2.0, 3.0, 6.0])
    ci = mean_ci(v)
    half = student_t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert ci == pytest.approx({"mean": 3.0, "ci_low": 3.0 - half, "ci_high": 3.0 + half, "n": 4})
    assert mean_ci([0.4]) == {"mean": 0.4, "ci_low": 0.4, "ci_high": 0.4, "n": 1}


def test_bad_order_or_replacement_names_the_value():
    x, y, m = _data()
    with pytest.raises(ValueError, match="'sideways'"):
        morf_curve(PatchModel(), x, y, m, order="sideways")
    with pytest.raises(ValueError, match="'zeros'"):
        morf_curve(PatchModel(), x, y, m, replacement="zeros")


def test_comparison_has_shap_of_abn_lerf_srg_cis_and_paper_titles(digits, tmp_path):
    from impactx_ray.config import RunConfig
    from impactx_ray.eval.compare import morf_comparison, write_morf
    from impactx_ray.explain import ExplainSettings
    from impactx_ray.models import ABN, ImpactX, create_backbone

    _, test = digits
    torch.manual_seed(0)
    impactx = ImpactX.from_backbone(create_backbone("lenet5", 10, pretrained=False), 32)
    abn = ABN(create_backbone("lenet5", 10, pretrained=False))
    settings = ExplainSettings.from_config(RunConfig(max_evals=16))
    curves, maps, x, y = morf_comparison(impactx, test, settings, abn=abn, n=6, progress=False,
                                         replacements=("noise", "blur"))
    names = {"IMPACTX", "SHAP of IMPACTX", "random", "ABN", "SHAP of ABN", "random (ABN)"}
    assert set(curves) == set(maps) == names
    assert curves.scorer["SHAP of ABN"] == "ABN" and curves.scorer["random"] == "IMPACTX"
    # SHAP of ABN is scored with ABN: its step 0 is ABN's true-class score
    p_abn = torch.softmax(abn.eval()(x), 1)[torch.arange(6), y].detach().numpy()
    np.testing.assert_allclose(curves.by["blur"]["lerf"]["SHAP of ABN"][:, 0], p_abn, atol=1e-5)
    # examples: force "both correct" on images 1, 3, 4 and check the rule picks among them only
    cls = y.numpy().copy()
    wrong = (cls + 1) % 10
    curves.predictions = {"IMPACTX": (np.where([0, 1, 1, 1, 1, 0], cls, wrong), np.full(6, .9)),
                          "ABN": (np.where([1, 1, 0, 1, 1, 1], cls, wrong), np.full(6, .8))}
    summary = write_morf(tmp_path, curves, maps, x, y, test.classes, examples=2)
    chosen = summary["examples"]["indices"]
    assert len(chosen) == 2 and set(chosen) <= {1, 3, 4} and chosen == sorted(chosen)
    again = write_morf(tmp_path / "again", curves, maps, x, y, test.classes, examples=2)
    assert again["examples"]["indices"] == chosen  # a fixed seed
    saved = json.loads((tmp_path / "morf.json").read_text())
    assert saved["replacements"] == ["noise", "blur"]
    srg = saved["metrics"]["blur"]["SHAP of ABN"]["srg"]
    assert srg["ci_low"] <= srg["mean"] <= srg["ci_high"] and srg["n"] == 6
    assert saved["aopc"]["SHAP of ABN"] == saved["metrics"]["noise"]["SHAP of ABN"]["aopc"]["mean"]
    assert "morf.blur.SHAP_of_ABN.srg_ci_low" in saved["flat_metrics"]
    assert set(saved["sanity"]) == {"IMPACTX", "ABN"}
    assert (tmp_path / "examples.png").exists() and (tmp_path / "morf_mean_blur.png").exists()
    assert (tmp_path / "lerf_blur_SHAP_of_ABN.npy").exists() and (tmp_path / "morf_ABN.npy").exists()


def test_report_shows_srg_with_cis_and_the_sanity_checks(tmp_path):
    from impactx_ray.report import collect_rows, summary_markdown, write_summary

    ci = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}
    morf = {"aopc": {"IMPACTX": 0.5},
            "metrics": {"road": {"IMPACTX": {k: ci for k in
                                             ("aopc", "aopc_lerf", "auc_morf", "auc_lerf", "srg")}}},
            "sanity": {"IMPACTX": {"random_ranking": {"road": {"aopc_minus_random": ci,
                                                               "passed": True}},
                                   "cascading_randomization": {"final_rank_correlation": 0.21,
                                                               "passed": True}}}}
    result = {"hyperparameters": {"model": "lenet5", "dataset": "digits"},
              "impactx_test_accuracy": 0.9, "morf": morf}
    (tmp_path / "result.json").write_text(json.dumps(result))
    md = summary_markdown(collect_rows(tmp_path))
    assert "| road | IMPACTX | 0.5000 [0.4000, 0.6000] |" in md
    assert "| IMPACTX (road) | 0.5000 [0.4000, 0.6000] | yes | 0.210 | yes |" in md
    write_summary(tmp_path, collect_rows(tmp_path))
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "aopc_IMPACTX" in header and "metrics" not in header and "sanity" not in header
