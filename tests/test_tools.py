"""The diagnostic tools: the base-model probe (toy/probe.py), the judge breakdown and the policy errors (tools/)."""
import sys

import pytest

from conftest import ROOT, stage


def probe():
    from toy import probe as pb
    return pb


def test_probe_items_ask_every_attribute_and_want_both_answers():
    pb = probe()
    items = pb.probe_items(24, seed=0)
    checks = [it for it in items if it["kind"] == "check"]
    describes = [it for it in items if it["kind"] == "describe"]
    assert len(checks) == len(describes) == 24
    for medium in ("image", "video"):
        asked = {it["attr"] for it in checks if it["medium"] == medium}
        assert asked == set(pb.world.attrs_of(medium))
    assert {it["truth"] for it in checks} == {"yes", "no"}
    # a "yes" check names the scene's own value, a "no" check another one
    for d, c in zip(describes, checks):
        value = d["truth"][c["attr"]]
        assert (f" {value}?" in c["question"]) == (c["truth"] == "yes")
    assert pb.probe_items(24, seed=0)[1]["question"] == items[1]["question"]   # seeded


def test_probe_score_counts_right_answers_per_attribute():
    pb = probe()
    items = pb.probe_items(12, seed=1)
    perfect = [pb.world.description(it["medium"], it["truth"]) if it["kind"] == "describe" else it["truth"]
               for it in items]
    assert set(pb.score(items, perfect).values()) == {1.0}
    always_yes = ["yes" if it["kind"] == "check" else "a square" for it in items]
    acc = pb.score(items, always_yes)
    for key, a in acc.items():
        medium, attr, kind = key.split()
        if kind == "describe":
            assert a == 0.0
        else:
            wanted = [it["truth"] == "yes" for it in items if it["kind"] == "check" and it["medium"] == medium
                      and it["attr"] == attr]
            assert a == pytest.approx(sum(wanted) / len(wanted), abs=1e-4)
    # whole words only: "left" is not found in "leftward"
    one = [{"medium": "video", "attr": None, "kind": "describe", "truth": {"direction": "left"}}]
    assert pb.score(one, ["a square moving leftward"])["video direction describe"] == 0.0


def test_probe_quality_rows_want_the_defect_named():
    pb = probe()
    items = pb.quality_items(12, seed=0)
    assert {it["truth"]["quality"] for it in items} == {"clean", "noisy", "blurry"}
    named = [("a red square, " + it["truth"]["quality"]) if it["truth"]["quality"] != "clean" else "a red square"
             for it in items]
    assert set(pb.score(items, named).values()) == {1.0}
    never = pb.score(items, ["a red square"] * len(items))   # never naming a defect: right on clean ones only
    assert never["image quality describe"] == never["video quality describe"] == pytest.approx(1 / 3, abs=1e-4)
    assert pb.score(items, ["a red square, noisy"] * len(items))["image quality describe"] == pytest.approx(1 / 3, abs=1e-4)


def test_probe_pair_items_address_one_of_two_and_score_it(monkeypatch):
    pb = probe()
    from toy import reader
    monkeypatch.setattr(pb.world, "as_media", lambda medium, px: px)   # raw pixels, for the reader
    items = pb.pair_items(8, seed=0)
    assert {(it["medium"], it["question"]) for it in items} == {
        ("image", "Describe Picture 1."), ("image", "Describe Picture 2."),
        ("video", "Describe Video 1."), ("video", "Describe Video 2.")}
    for it in items:   # the truth is what the addressed medium shows, whatever the other one shows
        assert len(it["media"]) == 2
        k = int(it["question"][-2]) - 1
        shown = reader.read(it["medium"], it["media"][k])
        assert all(shown[a] == it["truth"][a] for a in pb.world.CAPTION_ATTRS[it["medium"]]), it["question"]
    assert pb.pair_items(8, seed=0)[3]["truth"] == items[3]["truth"]   # seeded
    right = [pb.world.description(it["medium"], it["truth"]) for it in items]
    assert set(pb.score(items, right).values()) == {1.0}
    colour = items[0]["truth"]["colour"]   # one colour for every answer: right where the truth has it
    acc = pb.score(items, [f"a large {colour} square"] * len(items))
    assert acc["video direction describe one of two"] == 0.0
    same = [it["truth"]["colour"] == colour for it in items if it["medium"] == "image"]
    assert acc["image colour describe one of two"] == pytest.approx(sum(same) / len(same), abs=1e-4)
    assert "describe one of two |" in pb.table(pb.score(items, right)).splitlines()[0]


def breakdown_tool():
    sys.path.insert(0, str(ROOT / "tools"))
    return stage("judge_breakdown")


def test_breakdown_groups_by_ground_truth():
    jb = breakdown_tool()
    cand = lambda misses, defect=None: {"misses": misses, "defect": defect}
    pair = lambda a, b: {"candidates": [a, b]}
    assert jb.category("image_generation", "pairwise", pair(cand(["position"]), cand([])), 2) == "position"
    assert jb.category("video_generation", "pairwise", pair(cand(["direction", "colour"]), cand([])), 2) \
        == "colour+direction"
    assert jb.category("image_generation", "pairwise", pair(cand(["colour"]), cand(["position"], "blur")), 1) \
        == "quality only"
    assert jb.category("image_understanding", "pairwise", {"asked": ["position", "size"]}, 1) == "asks position+size"
    assert jb.category("video_generation", "pointwise", {}, None, 4) == "true score 4"
    records = [{"task": "image_generation", "kind": "pairwise", "label": 1, "score": None},
               {"task": "image_generation", "kind": "pairwise", "label": 2, "score": None},
               {"task": "image_generation", "kind": "pairwise", "label": 0, "score": None},
               {"task": "image_generation", "kind": "pointwise", "label": None, "score": 3}]
    truths = [pair(cand([]), cand(["colour"])), pair(cand(["colour"]), cand([])), pair(cand([]), cand([])), {}]
    preds = [{"p": [0.7, 0.2, 0.1]}, {"p": [0.6, 0.3, 0.1]}, {"p": [0.3, 0.3, 0.4]}, {"score": 3}]
    for r, rid in zip(records, "abcd"):
        r["id"] = rid
    assert jb.breakdown(records, truths, preds) == {
        ("image_generation", "pairwise", "colour"): (1, 2, None),
        ("image_generation", "pointwise", "true score 3"): (1, 1, None)}
    # ranked by the two single-item scores: pair a wants the first (4.0 > 2.0: right), b the second (3 > 1: wrong)
    singles = {"a": (4.0, 2.0), "b": (3.0, 1.0), "c": (2.0, 2.0)}
    assert jb.breakdown(records, truths, preds, singles)[("image_generation", "pairwise", "colour")] == (1, 2, 1)
    two = jb.single_items({"id": "p", "task": "video_generation", "kind": "pairwise", "prompt": "a red square",
                           "media": ["x.mp4", "y.mp4"], "label": 1, "responses": []})
    assert [(s["id"], s["kind"], s["media"], s["scale"]) for s in two] == [
        ("p-0", "pointwise", ["x.mp4"], [1, 5]), ("p-1", "pointwise", ["y.mp4"], [1, 5])]


def test_direction_table_counts_highest_and_full_marks():
    jb = breakdown_tool()
    records, media, truths = jb.direction_items(2, seed=0)
    assert len(records) == len(media) == 8 and len(truths) == 2
    assert [r["responses"][0].split(",")[0] for r in records[:4]] == list(jb.prep.DIRECTIONS)
    assert media[0][0] is media[3][0] and media[0][0] is not media[4][0]     # four answers per clip
    # two clips moving down: the first scored best on "up" with full marks on up and down, the second right
    expected = [1.0, 1.2, 2.9, 2.8, 1.0, 1.1, 1.5, 2.9]
    best = [1, 1, 3, 3, 1, 1, 2, 3]
    rows = jb.direction_table(["down", "down"], expected, best).splitlines()
    assert len(rows) == 3 and rows[2] == "| down | 2 | 0 / 0 | 0 / 0 | 1 / 1 | 1 / 2 |"


def test_policy_errors_counts_each_kind_of_mistake_per_question():
    sys.path.insert(0, str(ROOT / "tools"))
    pe = stage("policy_errors")
    assert pe.error_kind("red, left", "Red, left.") == "right"
    assert pe.error_kind("red, left", "blue, left") == "first wrong"
    assert pe.error_kind("red, left", "red, top") == "second wrong"
    assert pe.error_kind("red, left", "blue, top") == "both wrong"
    assert pe.error_kind("red, left", "red, left, large") == pe.error_kind("red, left", "red") == "other form"
    q = "What colour is the square and where is it?"
    prompts = [{"task": "image_understanding", "question": q, "answer": a} for a in ("red, left", "blue, top")]
    rows = pe.table(prompts, {"before": ["red, top", "blue, top"], "after": ["red, left", "green, top"]},
                    {("image_understanding", q): 5}).splitlines()
    assert rows[2] == f"| image_understanding | {q} | before | 1 | 0 | 1 | 0 | 0 | 5 |"
    assert rows[3] == f"| image_understanding | {q} | after | 1 | 1 | 0 | 0 | 0 | 5 |"


def test_probe_questions_want_the_exact_answer():
    pb = probe()
    items = pb.question_items(10, seed=0)          # alternately image and clip
    assert all(it["question"] in pb.world.QUESTIONS.values() for it in items)
    acc = pb.score(items, [it["truth"] for it in items[:5]] + ["red, red"] * 5)   # the first five right
    assert acc == {"image question answer": 0.6, "video question answer": 0.4}
