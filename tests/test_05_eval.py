"""05_eval.py: metrics on hand-made predictions, and the whole evaluation on the tiny toy."""
import math

import pytest

import common
import judging
import vlm
from conftest import stage

ev = stage("05_eval")


def test_pairwise_metrics_by_hand():
    # 4 pairs: labels 1, 2, 0 (tie), 1
    p_ab = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]]
    # the same pairs judged swapped (first = original second)
    p_ba = [[0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.25, 0.15, 0.6], [0.3, 0.6, 0.1]]
    m = ev.pairwise_metrics(p_ab, p_ba, [1, 2, 0, 1])
    # averaged in original order: [.45,.45,.1] ... pair 1: first .45 = second .45 -> forced 1 (>=)
    # pair 2: first (.6+.05)/2=.325, second (.3+.9)/2=.6 -> 2; pair 4: first .35, second .45 -> 2 (wrong)
    assert m["diff"] == pytest.approx(2 / 3)
    assert m["tau"] == pytest.approx(3 / 4)         # pair 3 is a predicted tie (.6) and a true tie
    # same forced verdict in both orders? pair 1 (1, 1) yes; 2 (1, 2), 3 (1 by >=, 2), 4 (2, 1) no
    assert m["consistency"] == pytest.approx(0.25) and m["ties"] == 1 and m["n"] == 4


def test_spearman_and_wilson_known_values():
    assert judging.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert judging.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 2, 1, 3) -> 4.5 / sqrt(4.5 * 5)
    assert judging.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert math.isnan(judging.spearman([1, 1, 1], [1, 2, 3]))
    lo, hi = ev.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert ev.wilson(0, 20)[0] == pytest.approx(0.0, abs=1e-12)
    assert ev.wilson(0, 20)[0] >= 0.0 and ev.wilson(20, 20)[1] <= 1.0      # clamped, never -0.0 or 1.0000001


def test_pointwise_metrics_by_hand():
    m = ev.pointwise_metrics([4.6, 2.1, 2.9, 1.2], [5, 2, 2, 1], [5, 2, 3, 1])
    assert m["exact"] == 0.75 and m["spearman"] == pytest.approx(1.0) and m["n"] == 4


def test_eval_runs_end_to_end(toy, tmp_path):
    """The policy section on two different checkpoints: the shipped base before, and after it a copy
    whose language model was nudged, so that some greedy answers change. Its accuracies and counts are
    recomputed here from the answers themselves."""
    import torch
    after = vlm.load_model(toy / "base")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in after.model.language_model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    common.save_checkpoint(after, vlm.load_processor(toy / "base"), tmp_path / "after")
    cfg = ev.Config(image_generator="", data_dir=str(toy / "data"), reward=str(toy / "base"), base_policy=str(toy / "base"),
                    policy=str(tmp_path / "after"), pairs_dir="", out_dir=str(tmp_path / "eval"), max_new_tokens=8)
    results = ev.main(cfg)
    assert set(results["judge"]) == set(common.TASKS)
    prompts, _, answers = ev.policy_answers(cfg, "cpu", common.SkipLog(tmp_path / "skips.jsonl"))
    assert answers["before"] != answers["after"]
    for task, m in results["policy"].items():
        idx = [i for i, p in enumerate(prompts) if p["task"] == task]
        for name in ("before", "after"):
            right = sum(ev.normalize(answers[name][i]) == ev.normalize(prompts[i]["answer"]) for i in idx)
            assert m[name]["accuracy"] == right / len(idx) and m[name]["n"] == len(idx)
        changed = sum(ev.normalize(answers["before"][i]) != ev.normalize(answers["after"][i]) for i in idx)
        assert m["changed_answers"] == changed
    assert sum(m["changed_answers"] for m in results["policy"].values()) > 0
    assert (tmp_path / "eval" / "results.md").read_text().startswith("## Reward model")
