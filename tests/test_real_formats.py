"""The real-data path on fixture files written in the released formats (../shared/FORMATS.md):
01 reading the authors' training data, and 05 reading the four reward benchmarks."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks
import common
import judging
import vlm
from conftest import stage
from toy import world

prep = stage("01_prepare_data")
ev = stage("05_eval")

GEN_PROMPT = ("You are given a text caption and two generated images based on that caption. ...\n"
              "Your task is provided as follows:\nText Caption: [{}]")


def png(path, colour=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), colour).save(path)


def conv(human, gpt):
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released") / "dataset"
    for name in ("a.png", "b.png", "c.png"):
        png(root / "HPD" / "images" / name)
        png(root / "OIP" / "images" / name)
        png(root / "EvalMuse" / "images" / name)
        png(root / "LLaVA-critic" / name)
    frames = [f"winvideos/1/{k}.png" for k in range(8)] + [f"losevideos/1/{k}.png" for k in range(8)]
    for f in frames:
        png(root / "VideoDPO" / f)
    for k in range(8):
        png(root / "VideoFeedback" / "frames" / "v1" / f"{k}.png")
    world.write_mp4(np.full((8, 32, 32, 3), 90, np.uint8), root / "LiFT-HRA" / "clip.mp4")
    world.write_mp4(np.full((8, 32, 32, 3), 90, np.uint8), root / "ShareGPTVideo" / "videos" / "v.mp4")
    two = "<image>\n<image>\n"
    write(root / "HPD" / "train_data.json", [
        {"id": "h1", "images": ["images/a.png", "images/b.png"],
         "conversations": conv(two + GEN_PROMPT.format("A yellow horse."), "Image 1 is better than Image 2.")},
        {"id": "h2", "images": ["images/a.png", "images/missing.png"],
         "conversations": conv(two + GEN_PROMPT.format("x"), "Image 2 is better than Image 1.")},
        {"id": "h3", "images": ["images/a.png", "images/b.png"], "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "h4", "images": ["images/a.png", "images/b.png"],
         "conversations": conv("<image>\n<image>\n<image>\n" + GEN_PROMPT.format("x"), "Image 1 is better than Image 2.")},
        {"id": "h5", "images": ["images/b.png", "images/a.png"],
         "conversations": conv(two + GEN_PROMPT.format("A red chair."), "I like both.")}])
    write(root / "OIP" / "train_data.json", [
        {"id": "o1", "images": ["images/a.png", "images/c.png"],
         "conversations": conv(two + GEN_PROMPT.format("Two cats."), "Both images are equally good.")},
        {"id": "o2", "images": ["images/c.png", "images/b.png"],
         "conversations": conv(two + GEN_PROMPT.format("A dog."), "Image 2 is better than Image 1.")}])
    write(root / "EvalMuse" / "pointwise" / "train_data.json", [
        {"id": "e1", "image": "a.png", "conversations": conv(
            "<image>\nExtract key elements ... Text Caption: [a cat]", "cat (animal): 1\nFinal Score: 4")},
        {"id": "e2", "image": "b.png", "conversations": conv("<image>\nText Caption: [a dog]", "Final Score: 7")}])
    write(root / "LLaVA-critic" / "pairwise" / "train_data.json", [
        {"id": "l1", "image": "a.png", "conversations": conv(
            "<image>\nQuestion: [What is it?]\nAnswer 1: A cat.\nAnswer 2: A dog.\n", "Overall Judgment: Answer 2 is better.")}])
    # the LLaMA-Factory copy of the same kind of record
    write(root / "LLaVA-critic" / "pointwise" / "train_data.json", [
        {"messages": [{"role": "user", "content": "<image>Question: [What is it?]\nResponse: [A cat.]\n"},
                      {"role": "assistant", "content": "Good.\nFinal Score: 85"}], "images": ["c.png"]}])
    write(root / "VideoDPO" / "train_data.json", [
        {"id": "vd1", "images": frames, "conversations": conv("<image>\n" * 16 + "Text Caption: [A person waking up.]",
                                                              "Video 1 is better than Video 2.")}])
    write(root / "VideoFeedback" / "train_data.json", [
        {"id": "vf1", "images": [f"v1/{k}.png" for k in range(8)], "conversations": conv(
            "<image>\n" * 8 + "Text Prompt: [rain]", "visual quality: 3\nFinal Score: 6")}])
    write(root / "LiFT-HRA" / "train_data.json", [
        {"id": "lf1", "video": "clip.mp4", "conversations": conv("<video>\nText Caption: [a car]", "Final Score: 8")}])
    write(root / "ShareGPTVideo" / "pairwise" / "train_data.json", {"not": "a list"})
    write(root / "Mystery" / "train_data.json", [])
    return root.parent


def test_released_data_maps_to_unified_records(released, tmp_path):
    prep.main(prep.Config(out_dir=str(tmp_path), data_dir=str(released), mix="all", test_share=0.0))
    data = tmp_path / "data"
    records = {r["id"]: r for r in common.read_jsonl(data / "reward_train.jsonl")}
    assert records["HPD-h1"]["label"] == 1 and records["HPD-h1"]["prompt"] == "A yellow horse."
    assert records["OIP-o1"]["label"] == 0 and records["OIP-o2"]["label"] == 2       # a tie, both orders
    assert records["EvalMuse-pointwise-e1"]["score"] == 4 and records["EvalMuse-pointwise-e1"]["scale"] == [1, 5]
    assert records["LLaVA-critic-pairwise-l1"]["label"] == 2
    assert records["LLaVA-critic-pairwise-l1"]["responses"] == ["A cat.", "A dog."]
    assert records["LLaVA-critic-pointwise-0"]["score"] == 85                      # messages layout, a number
    clips = records["VideoDPO-vd1"]["media"]
    assert len(clips) == 2 and all(len(c) == 8 for c in clips)                    # 16 frames -> two clips
    assert records["VideoFeedback-vf1"]["score"] == 6 and len(records["VideoFeedback-vf1"]["media"][0]) == 8
    assert records["LiFT-HRA-lf1"]["media"][0].endswith("clip.mp4")
    for r in records.values():
        assert common.check_record(r, data) is None and "<image>" not in r["question"]
        media = common.load_media(r["media"], data)
        assert all(isinstance(m, common.Video) == r["task"].startswith("video") for m in media)
    skipped = [json.loads(l) for l in (data / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert reasons["h2"].startswith("missing media")
    assert reasons["h3"].startswith("malformed conversation")
    assert reasons["h4"].startswith("3 <image> placeholders but 2 media")
    assert reasons["h5"].startswith("no pairwise verdict")                         # never guessed
    assert reasons["e2"].startswith("score outside scale")
    assert any(s["reason"].startswith("unknown source folder: Mystery") for s in skipped)
    assert any("not a list" in s["reason"] and "ShareGPTVideo" in s["file"] for s in skipped)


def test_mix_sampling_is_seeded(released, tmp_path):
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - json_path: dataset/OIP/train_data.json\n    sampling_strategy: random:1\n"
                   "  - json_path: dataset/HPD/train_data.json\n    sampling_strategy: all\n")
    assert prep.parse_mix(str(mix)) == {"OIP": "random:1", "HPD": "all"}
    assert prep.parse_mix("HPD=all,OIP=random:5") == {"HPD": "all", "OIP": "random:5"}
    runs = []
    for k in range(2):
        prep.main(prep.Config(out_dir=str(tmp_path / f"r{k}"), data_dir=str(released), mix=str(mix), test_share=0.0))
        runs.append([r["id"] for r in common.read_jsonl(tmp_path / f"r{k}" / "data" / "reward_train.jsonl")])
    assert runs[0] == runs[1] and sum(i.startswith("OIP") for i in runs[0]) == 1 and "HPD-h1" in runs[0]
    with pytest.raises(ValueError):
        prep.sample([1, 2], "first:1", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# benchmarks

@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    vl = root / "vl"
    png(vl / "i.png")
    ids = ["hallucination_pair-0001", "povid_12", "RLAIF-V_3", "mmmu-7", "mathverse_2", "wildvision-battle_1",
           "vlfeedback_9", "hallucination_pair-0002"]
    (vl / "test.jsonl").write_text("\n".join(json.dumps(
        {"id": i, "query": "What is it?", "response": ["A cat.", "A dog."], "image": "i.png",
         "human_ranking": [0, 1] if k % 2 == 0 else [1, 0], "models": ["m1", "m2"], "judge": "human",
         "rationale": "", "query_source": "x", "ground_truth": ""}) for k, i in enumerate(ids)))
    gi = root / "genai_image"
    png(gi / "l.png"), png(gi / "r.png", (40, 40, 200))
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote", "weird_vote"]
    (gi / "test.jsonl").write_text("\n".join(json.dumps(
        {"prompt": "a red square", "left_image": "l.png", "right_image": "r.png", "vote_type": v}) for v in votes))
    vg = root / "videogen"
    vg.mkdir()
    world.write_mp4(np.full((8, 32, 32, 3), 90, np.uint8), vg / "a.mp4")
    world.write_mp4(np.full((8, 32, 32, 3), 160, np.uint8), vg / "b.mp4")
    (vg / "eval.jsonl").write_text("\n".join(json.dumps(
        {"prompt": "a car", "path_A": "a.mp4", "path_B": "b.mp4", "Overall": o}) for o in ("A", "B", "same")))
    return root


def test_benchmark_rows_map_to_records(benches):
    skips = common.SkipLog(benches / "skipped.jsonl")
    rows, folder = benchmarks.load_rows("vlrewardbench", str(benches / "vl"))
    recs, media = benchmarks.benchmark_records("vlrewardbench", rows, folder, skips)
    groups = {r["id"]: r["group"] for r in recs}
    assert groups["hallucination_pair-0001"] == groups["hallucination_pair-0002"] == "Hallucination"
    assert groups["povid_12"] == groups["RLAIF-V_3"] == "Hallucination"
    assert groups["mmmu-7"] == groups["mathverse_2"] == "Reasoning"
    assert groups["wildvision-battle_1"] == groups["vlfeedback_9"] == "General"
    assert [r["label"] for r in recs[:2]] == [1, 2]                      # human_ranking[0] == 0 -> response 0
    rows, folder = benchmarks.load_rows("genai-image", str(benches / "genai_image"))
    recs, media = benchmarks.benchmark_records("genai-image", rows, folder, skips)
    assert [r["label"] for r in recs] == [1, 2, 0, 0]                    # both tie votes are ties
    assert skips.total == 1 and "weird_vote" in (benches / "skipped.jsonl").read_text()
    rows, folder = benchmarks.load_rows("videogen", str(benches / "videogen"))
    recs, media = benchmarks.benchmark_records("videogen", rows, folder, skips)
    assert [r["label"] for r in recs] == [1, 2, 0] and isinstance(media[0][0], common.Video)


def test_benchmark_metrics_by_hand():
    preds = [{"label": 1, "p": [0.8, 0.1, 0.1]}, {"label": 2, "p": [0.6, 0.3, 0.1]},
             {"label": 0, "p": [0.2, 0.2, 0.6]}, {"label": 0, "p": [0.5, 0.4, 0.1]},
             {"label": 2, "p": [0.0, 0.0, 0.0]}]                                  # the last one unparsed
    m = ev.benchmark_metrics("genai-image", preds)
    assert m["tau"] == pytest.approx(2 / 5) and m["diff"] == pytest.approx(1 / 3) and m["ties"] == 2
    vl = [{"label": 1, "p": [0.9, 0.1, 0], "group": "General"}, {"label": 2, "p": [0.9, 0.1, 0], "group": "General"},
          {"label": 2, "p": [0.1, 0.9, 0], "group": "Hallucination"}, {"label": 1, "p": [0.7, 0.3, 0], "group": "Reasoning"}]
    m = ev.benchmark_metrics("vlrewardbench", vl)
    assert m["overall"] == pytest.approx(3 / 4) and m["macro"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_benchmarks_run_with_the_same_judge(benches, toy, tmp_path):
    cfg = ev.Config(image_generator="", reward=str(toy / "base"), out_dir=str(tmp_path / "eval"),
                    benchmarks=f"vlrewardbench={benches / 'vl'},genai-image={benches / 'genai_image'},"
                               f"videogen={benches / 'videogen'}")
    results = ev.main(cfg)
    assert results["vlrewardbench"]["n"] == 8 and results["genai-image"]["skipped"] == 1
    assert 0 <= results["videogen"]["tau"] <= 1
    assert "| vlrewardbench | overall |" in (tmp_path / "eval" / "benchmarks.md").read_text()


def test_generate_judging_counts_unparsed_verdicts(benches, toy, tmp_path):
    """The path for judges that reason first: a verdict that cannot be parsed is counted and scored
    wrong, never read as 'Image 1'. The barely trained test base writes no verdicts at all."""
    model, processor = vlm.load_model(toy / "base"), vlm.load_processor(toy / "base")
    cfg = ev.Config(image_generator="", judge="generate", template="short")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    res = ev.run_benchmark("genai-image", str(benches / "genai_image"), model, processor, cfg, "cpu", skips)
    assert res["n"] == 4 and res["unparsed"] == 4 and res["tau"] == 0.0 and res["diff"] == 0.0


def test_a_judge_without_preference_scores_at_chance():
    """Exactly equal probabilities earn half a point, not the first position; a tie verdict on a pair
    that is not a tie is wrong."""
    no_preference = [[0.5, 0.5, 0.0]] * 4
    a = judging.pair_accuracy(no_preference, [1, 1, 1, 2])
    assert a["diff"] == a["tau"] == 0.5
    always_tie = [[0.0, 0.0, 1.0]] * 4
    a = judging.pair_accuracy(always_tie, [1, 2, 1, 0])
    assert a["diff"] == 0.0 and a["tau"] == 0.25
    m = ev.benchmark_metrics("vlrewardbench", [{"label": 1, "p": [0.5, 0.5, 0.0], "group": "General"}] * 10)
    assert m["overall"] == m["macro"] == 0.5


def test_benchmark_pairs_are_shown_in_a_seeded_random_order(benches, toy, tmp_path, monkeypatch):
    """A benchmark that lists its better response first in every row cannot reward a judge that always
    prefers the first item it is shown."""
    vl = tmp_path / "vl"
    png(vl / "i.png")
    (vl / "test.jsonl").write_text("\n".join(json.dumps(
        {"id": f"wildvision_{k}", "query": "What is it?", "response": ["A cat.", f"A dog {k}."], "image": "i.png",
         "human_ranking": [0, 1]}) for k in range(40)))
    first_always = lambda model, processor, records, media, *a, **k: torch.tensor([[1.0, 0.0, 0.0]] * len(records))
    monkeypatch.setattr(judging, "judge_pairwise", first_always)
    res = ev.run_benchmark("vlrewardbench", str(vl), None, None, ev.Config(), "cpu",
                           common.SkipLog(tmp_path / "skipped.jsonl"))
    records, media = benchmarks.benchmark_records("vlrewardbench", *benchmarks.load_rows("vlrewardbench", str(vl)),
                                          common.SkipLog(tmp_path / "s2.jsonl"))
    shown, _ = ev.random_order(records, media, ev.Config().seed)
    kept_first = sum(r["label"] == 1 for r in shown)
    assert 10 < kept_first < 30 and res["overall"] == kept_first / 40
    assert all(s["responses"] == (r["responses"] if s["label"] == 1 else r["responses"][::-1])
               for s, r in zip(shown, records))


def test_local_benchmark_folders_in_every_published_layout(tmp_path):
    """The authors' GenAI-Bench-Video data.json (video_left / video_right), and a copy of the hub's
    folders, where only the benchmark's split is read (test, not test_v1)."""
    authors = tmp_path / "authors"
    authors.mkdir()
    for name in ("l.mp4", "r.mp4"):
        world.write_mp4(np.full((8, 32, 32, 3), 90, np.uint8), authors / name)
    (authors / "data.json").write_text(json.dumps(
        [{"prompt": "a car", "video_left": "l.mp4", "video_right": "r.mp4", "vote_type": "leftvote"}] * 3))
    rows, folder = benchmarks.load_rows("genai-video", str(authors))
    recs, media = benchmarks.benchmark_records("genai-video", rows, folder, common.SkipLog(tmp_path / "s.jsonl"))
    assert len(recs) == 3 and all(isinstance(m[0], common.Video) for m in media)
    hub = tmp_path / "hub" / "image_generation"
    png(hub / "l.png")
    row = {"prompt": "a red square", "left_image": "l.png", "right_image": "l.png", "vote_type": "leftvote"}
    (hub / "test-00000-of-00001.jsonl").write_text(json.dumps(row))
    (hub / "test_v1-00000-of-00001.jsonl").write_text("\n".join([json.dumps(row)] * 5))
    rows, _ = benchmarks.load_rows("genai-image", str(tmp_path / "hub"))
    assert len(rows) == 1


def test_empty_benchmarks_say_so_and_empty_metrics_show_na(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no parquet, json or jsonl file under"):
        benchmarks.load_rows("videogen", str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "eval.jsonl").write_text("")
    with pytest.raises(SystemExit, match="videogen: "):
        benchmarks.load_rows("videogen", str(tmp_path / "blank"))
    m = ev.benchmark_metrics("genai-image", [])
    assert math.isnan(m["tau"]) and math.isnan(m["diff"])
    assert "| genai-image | tau | n/a |" in ev.benchmarks_markdown({"genai-image": m})
    assert "| image_generation | n/a | n/a | n/a | 90.0 |" in ev.to_markdown(
        {"judge": {"image_generation": {"pointwise": {"exact": 0.9, "spearman": float("nan")}}}})


def test_benchmark_rows_too_long_are_skipped_and_counted(benches, toy, tmp_path):
    model, processor = vlm.load_model(toy / "base"), vlm.load_processor(toy / "base")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    res = ev.run_benchmark("genai-image", str(benches / "genai_image"), model, processor, ev.Config(image_generator="", max_len=20),
                           "cpu", skips)
    assert res["n"] == 0 and res["skipped"] == 5 and math.isnan(res["tau"])      # 4 too long + 1 bad vote
    assert skips.counts == {"too long": 4, "ValueError": 1}
