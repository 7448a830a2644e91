"""01_prepare_data.py: the toy world is deterministic, valid, disjoint, and the base loads like a hub model."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

import common
from conftest import stage


def files_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_data(tmp_path, prep):
    for name in ("a", "b"):
        prep.main(prep.Config(out_dir=str(tmp_path / name), train_per_group=2, test_per_group=1, policy_train=2,
                              policy_test=1, gen_prompts=1, gen_candidates=2, base_steps=0))
    a, b = files_digest(tmp_path / "a" / "data"), files_digest(tmp_path / "b" / "data")
    assert a == b and any(k.endswith(".mp4") for k in a) and any(k.endswith(".png") for k in a)
    prep.main(prep.Config(out_dir=str(tmp_path / "c"), seed=1, train_per_group=2, test_per_group=1, policy_train=2,
                          policy_test=1, gen_prompts=1, gen_candidates=2, base_steps=0))
    assert files_digest(tmp_path / "c" / "data") != a


def test_every_record_valid_and_consistent(toy):
    data = toy / "data"
    for split in ("train", "test"):
        records = common.read_jsonl(data / f"reward_{split}.jsonl")
        assert {(r["task"], r["kind"]) for r in records} == {(t, k) for t in common.TASKS for k in common.KINDS}
        for r in records:
            assert common.check_record(r, data) is None, r["id"]
            assert r["answer"] == common.render_answer(r["task"], r["kind"], r["label"], r["score"])
            assert r["question"] == common.render_question(r["task"], r["kind"], r["prompt"], r["responses"], r["scale"])
            n_media = 2 if r["kind"] == "pairwise" and r["task"].endswith("generation") else 1
            assert len(r["media"]) == n_media
            media = common.load_media(r["media"], data)
            assert all(isinstance(m, common.Video) == r["task"].startswith("video") for m in media)
    for row in common.read_jsonl(data / "prompts_train.jsonl"):
        assert row["answer"] == ", ".join(row["scene"][a] for a in row["asked"])
    for row in common.read_jsonl(data / "gen_candidates.jsonl"):
        assert len(row["media"]) == len(row["truth"]) == 4


def test_ground_truth_rules(prep):
    rng = np.random.default_rng(0)
    assert [prep.gen_score(n, c) for n in (0, 1, 2) for c in (False, True)] == [1, 1, 2, 3, 4, 5]
    for _ in range(200):
        fields, media, truth = prep.judge_example("image_generation", "pairwise", rng)
        s = [c["score"] for c in truth["candidates"]]
        assert fields["label"] == (0 if s[0] == s[1] else 1 if s[0] > s[1] else 2)
        fields, media, truth = prep.judge_example("video_understanding", "pointwise", rng)
        right = sum(v == truth["scene"][a] for v, a in zip(fields["responses"][0].split(", "), truth["asked"]))
        assert fields["score"] == 1 + right == 1 + truth["n_right"][0]


def test_splits_are_disjoint(toy):
    data = toy / "data"
    owner = {}
    for name in ("reward_train", "reward_test", "prompts_train", "prompts_test"):
        for r in common.read_jsonl(data / f"{name}.jsonl"):
            for m in r["media"]:
                pixels = common.load_media([m], data)[0]
                arr = pixels.frames if isinstance(pixels, common.Video) else np.asarray(pixels)
                h = hashlib.sha1(arr.tobytes()).hexdigest()
                assert owner.setdefault(h, name) == name, f"{m} in {name} repeats pixels from {owner[h]}"


def test_labels_balanced_and_some_ties(prep):
    rng = np.random.default_rng(1)
    labels = [prep.judge_example("image_generation", "pairwise", rng)[0]["label"] for _ in range(600)]
    share = {lab: labels.count(lab) / len(labels) for lab in (0, 1, 2)}
    assert 0.05 < share[0] < 0.2 and abs(share[1] - share[2]) < 0.1


def test_base_loads_like_a_hub_checkpoint(toy):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(toy / "base")
    processor = AutoProcessor.from_pretrained(toy / "base")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert json.loads((toy / "base" / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_two_media_examples_ask_about_the_labelled_one(prep):
    rng = np.random.default_rng(3)
    seen = {"describe": 0, "yes": 0, "no": 0}
    for _ in range(300):
        medium, pixels, question, answer, shown = prep.multi_example("image" if rng.random() < 0.5 else "video", rng, 0.3)
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


def test_comparison_examples_name_the_one_medium_that_fits(prep):
    """With `compare`, a two-media example asks which medium fits a caption; exactly one does, and the
    answer names it. Either medium can be the one. With compare 0 no draw is spent on the choice."""
    rng = np.random.default_rng(5)
    answers = {"Picture 1": 0, "Picture 2": 0, "Video 1": 0, "Video 2": 0}
    for _ in range(200):
        medium, pixels, question, answer, shown = prep.multi_example("image" if rng.random() < 0.5 else "video",
                                                                     rng, 0.3, compare=1.0)
        assert len(pixels) == 2 and question.startswith("Which ")
        named = re.search(r"a (\w+) square (?:at the |on the |moving )(\w+)\?", question).groups()
        fits = [all(w in s.split() for w in named) for s in shown]
        assert fits.count(True) == 1 and answer.endswith(str(fits.index(True) + 1)), (question, answer, shown)
        answers[answer] += 1
    assert min(answers.values()) > 30, answers
    # a share of 0 skips the draw (so the first phase's stream is the one it was tuned with); any other spends it
    a, b = np.random.default_rng(6), np.random.default_rng(6)
    prep.multi_example("video", a, 0.3, compare=0.0), prep.multi_example("video", b, 0.3, compare=1e-12)
    assert a.random() != b.random()


def test_rewritten_training_answers_keep_their_truth(prep):
    """Answers rewritten in a wrong form stay exactly as right as their label and score say, by the
    grader 03 uses."""
    n_right = stage("03_build_pairs").n_right
    rng = np.random.default_rng(3)
    records, truths = [], []
    for task in ("image_understanding", "video_understanding"):
        for kind in common.KINDS:
            for i in range(60):
                fields, _, truth = prep.judge_example(task, kind, rng)
                records.append(prep.toy_record(f"r{len(records)}", task, kind, [], fields))
                truths.append(truth)
    n_bad = prep.malform_answers(records, truths, 0.5, rng)
    assert n_bad > 20
    forms = {"long": 0, "other kind": 0}
    for r, t in zip(records, truths):
        row = {"scene": t["scene"], "asked": t["asked"]}
        assert [n_right(a, row) for a in r["responses"]] == t["n_right"]
        assert r["question"] == common.render_question(r["task"], r["kind"], r["prompt"], r["responses"], r["scale"])
        for a in r["responses"]:
            forms["long"] += len(a.split(", ")) > len(t["asked"])
            forms["other kind"] += len(a.split(", ")) == len(t["asked"]) and any(
                v not in prep.attrs_of(r["task"].split("_")[0])[k] for v, k in zip(a.split(", "), t["asked"]))
    assert forms["long"] > 5 and forms["other kind"] > 5


def test_held_out_answers_have_the_asked_form(toy, prep):
    asked_by = {q: a for a, q in prep.QUESTIONS.items()}
    for split, rewritten in (("test", False), ("train", True)):
        odd = 0
        for r in common.read_jsonl(toy / "data" / f"reward_{split}.jsonl"):
            if r["task"].endswith("understanding"):
                attrs = prep.attrs_of(r["task"].split("_")[0])
                for a in r["responses"]:
                    values = a.split(", ")
                    odd += len(values) != 2 or any(v not in attrs[k] for v, k in zip(values, asked_by[r["prompt"]]))
        assert (odd > 0) == rewritten, split      # rewritten answers in the training records only


def test_defect_strength_changes_pixels_not_the_random_stream(prep):
    """The base's first phase renders milder defects than the world's. Only the defective pixels may
    differ: the random stream must advance the same, so the first phase draws the very examples it was
    tuned on, and clean media are identical."""
    scene = {"colour": "red", "direction": "up", "size": "large"}
    for defect in (None, "noise", "blur"):
        rngs = [np.random.default_rng(3), np.random.default_rng(3)]
        mild, world = (prep.render("video", scene, defect, r, s) for r, s in zip(rngs, ("mild", "world")))
        assert rngs[0].random() == rngs[1].random()
        assert np.array_equal(mild, world) == (defect is None)
        if defect == "noise":   # the world's noise is stronger
            clean = prep.render("video", scene, None, np.random.default_rng(3))
            assert np.abs(world.astype(int) - clean).mean() > np.abs(mild.astype(int) - clean).mean()
