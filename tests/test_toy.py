"""toy/: the world's rules, the pretraining mix, and the shipped base checked against its manifest."""
import hashlib
import json
import re

import numpy as np

import common
import judging
import vlm
from conftest import BASE, stage
from toy import pretrain_base as pretrain
from toy import probe, world


def test_ground_truth_rules():
    rng = np.random.default_rng(0)
    assert [world.gen_score(n, c) for n in (0, 1, 2) for c in (False, True)] == [1, 1, 2, 3, 4, 5]
    for _ in range(200):
        fields, media, truth = world.judge_example("image_generation", "pairwise", rng)
        s = [c["score"] for c in truth["candidates"]]
        assert fields["label"] == (0 if s[0] == s[1] else 1 if s[0] > s[1] else 2)
        fields, media, truth = world.judge_example("video_understanding", "pointwise", rng)
        right = sum(v == truth["scene"][a] for v, a in zip(fields["responses"][0].split(", "), truth["asked"]))
        assert fields["score"] == 1 + right == 1 + truth["n_right"][0]


def test_labels_balanced_and_some_ties():
    rng = np.random.default_rng(1)
    labels = [world.judge_example("image_generation", "pairwise", rng)[0]["label"] for _ in range(600)]
    share = {lab: labels.count(lab) / len(labels) for lab in (0, 1, 2)}
    assert 0.05 < share[0] < 0.2 and abs(share[1] - share[2]) < 0.1


def test_rewritten_training_answers_keep_their_truth():
    """Answers rewritten in a wrong form stay exactly as right as their label and score say, by the
    grader 03 uses."""
    n_right = stage("03_build_pairs").n_right
    rng = np.random.default_rng(3)
    records, truths = [], []
    for task in ("image_understanding", "video_understanding"):
        for kind in common.KINDS:
            for i in range(60):
                fields, _, truth = world.judge_example(task, kind, rng)
                records.append(world.toy_record(f"r{len(records)}", task, kind, [], fields))
                truths.append(truth)
    n_bad = world.malform_answers(records, truths, 0.5, rng)
    assert n_bad > 20
    forms = {"long": 0, "other kind": 0}
    for r, t in zip(records, truths):
        row = {"scene": t["scene"], "asked": t["asked"]}
        assert [n_right(a, row) for a in r["responses"]] == t["n_right"]
        assert r["question"] == judging.render_question(r["task"], r["kind"], r["prompt"], r["responses"], r["scale"])
        for a in r["responses"]:
            forms["long"] += len(a.split(", ")) > len(t["asked"])
            forms["other kind"] += len(a.split(", ")) == len(t["asked"]) and any(
                v not in world.attrs_of(r["task"].split("_")[0])[k] for v, k in zip(a.split(", "), t["asked"]))
    assert forms["long"] > 5 and forms["other kind"] > 5


def test_two_media_examples_ask_about_the_labelled_one():
    rng = np.random.default_rng(3)
    seen = {"describe": 0, "yes": 0, "no": 0}
    for _ in range(300):
        medium, pixels, question, answer, shown = pretrain.multi_example("image" if rng.random() < 0.5 else "video", rng, 0.3)
        assert len(pixels) == len(shown) == 2
        k = int(re.search(r"(?:Picture|Video) ([12])", question).group(1))
        words = shown[k - 1].split()
        if question.startswith("Describe"):
            seen["describe"] += 1
            assert all(w in words for w in answer.replace(",", "").split() if w not in ("a", "square", "at", "the", "on", "moving"))
        else:
            seen[answer] += 1
            named = re.search(r"a (\w+) square (?:at the |on the |moving )(\w+)\?", question).groups()
            assert (answer == "yes") == all(w in words for w in named), (question, answer, shown)
    assert min(seen.values()) > 40, seen


def test_first_phase_defects_change_pixels_not_the_random_stream():
    """The first pretraining phase renders milder defects than the world's: only defective pixels
    differ, and the random stream advances the same."""
    scene = {"colour": "red", "direction": "up", "size": "large"}
    for defect in (None, "noise", "blur"):
        rngs = [np.random.default_rng(3), np.random.default_rng(3)]
        mild, full = (world.render("video", scene, defect, r, s)
                      for r, s in zip(rngs, (pretrain.FIRST_PHASE_DEFECTS, world.DEFECT_STRENGTH)))
        assert rngs[0].random() == rngs[1].random()
        assert np.array_equal(mild, full) == (defect is None)
        if defect == "noise":   # the world's noise is stronger
            clean = world.render("video", scene, None, np.random.default_rng(3))
            assert np.abs(full.astype(int) - clean).mean() > np.abs(mild.astype(int) - clean).mean()


def test_tokenizer_corpus_is_the_default_world():
    """The shipped base's tokenizer was trained on the texts of 01's default toy world."""
    defaults = stage("01_prepare_data").Config()
    assert pretrain.CORPUS_WORLD == {k: getattr(defaults, k) for k in pretrain.CORPUS_WORLD}


def test_shipped_base_matches_its_manifest():
    """Every file of toy/base is the one its manifest names, byte for byte, and nothing is missing."""
    manifest = json.loads((BASE / "MANIFEST.json").read_text())
    files = {f.name for f in BASE.iterdir() if f.name != "MANIFEST.json"}
    assert files == set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((BASE / name).read_bytes()).hexdigest() == digest, name
    assert manifest["command"].startswith("python -m toy.pretrain_base")


def test_shipped_base_loads_like_a_hub_checkpoint():
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(BASE)
    processor = AutoProcessor.from_pretrained(BASE)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert json.loads((BASE / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_pretraining_runs_and_saves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """A few steps of both phases on a small corpus, saved and reloaded with the probe's own loader."""
    monkeypatch.setattr(pretrain, "CORPUS_WORLD", dict(train_per_group=2, test_per_group=1, policy_train=2,
                                                       policy_test=1, gen_prompts=1, gen_candidates=2))
    cfg = pretrain.Config(out=str(tmp_path / "base"), base_steps=2, quality_steps=1, batch=4, probe_n=4)
    corpus = pretrain.world_corpus(cfg.seed)
    model, processor = pretrain.pretrain(cfg, corpus)
    common.save_checkpoint(model, processor, tmp_path / "base")
    reloaded = vlm.load_model(tmp_path / "base")
    assert all(torch_equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    rows = probe.run(tmp_path / "base", n=4)
    assert {"image colour check", "video direction check", "image quality describe", "video question answer"} <= set(rows)


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)
