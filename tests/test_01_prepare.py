"""01_prepare_data.py: the toy data set is deterministic, valid and disjoint; bad inputs are named."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import common
import judging
from conftest import stage
from toy import world


def files_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_data(tmp_path, prep):
    for name in ("a", "b"):
        prep.main(prep.Config(out_dir=str(tmp_path / name), train_per_group=2, test_per_group=1, policy_train=2,
                              policy_test=1, gen_prompts=1, gen_candidates=2))
    a, b = files_digest(tmp_path / "a" / "data"), files_digest(tmp_path / "b" / "data")
    assert a == b and any(k.endswith(".mp4") for k in a) and any(k.endswith(".png") for k in a)
    prep.main(prep.Config(out_dir=str(tmp_path / "c"), seed=1, train_per_group=2, test_per_group=1, policy_train=2,
                          policy_test=1, gen_prompts=1, gen_candidates=2))
    assert files_digest(tmp_path / "c" / "data") != a


def test_every_record_valid_and_consistent(toy):
    data = toy / "data"
    for split in ("train", "test"):
        records = common.read_jsonl(data / f"reward_{split}.jsonl")
        assert {(r["task"], r["kind"]) for r in records} == {(t, k) for t in common.TASKS for k in common.KINDS}
        for r in records:
            assert common.check_record(r, data) is None, r["id"]
            assert r["answer"] == judging.render_answer(r["task"], r["kind"], r["label"], r["score"])
            assert r["question"] == judging.render_question(r["task"], r["kind"], r["prompt"], r["responses"], r["scale"])
            n_media = 2 if r["kind"] == "pairwise" and r["task"].endswith("generation") else 1
            assert len(r["media"]) == n_media
            media = common.load_media(r["media"], data)
            assert all(isinstance(m, common.Video) == r["task"].startswith("video") for m in media)
    for row in common.read_jsonl(data / "prompts_train.jsonl"):
        assert row["answer"] == ", ".join(row["scene"][a] for a in row["asked"])
    for row in common.read_jsonl(data / "gen_candidates.jsonl"):
        assert len(row["media"]) == len(row["truth"]) == 4


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


def test_held_out_answers_have_the_asked_form(toy):
    asked_by = {q: a for a, q in world.QUESTIONS.items()}
    for split, rewritten in (("test", False), ("train", True)):
        odd = 0
        for r in common.read_jsonl(toy / "data" / f"reward_{split}.jsonl"):
            if r["task"].endswith("understanding"):
                attrs = world.attrs_of(r["task"].split("_")[0])
                for a in r["responses"]:
                    values = a.split(", ")
                    odd += len(values) != 2 or any(v not in attrs[k] for v, k in zip(values, asked_by[r["prompt"]]))
        assert (odd > 0) == rewritten, split      # rewritten answers in the training records only


def test_missing_inputs_name_the_stage_that_writes_them(toy, tmp_path):
    """A stage whose input is missing stops before any work, naming the stage to run or the flag to pass."""
    train, pairs = stage("02_train_reward"), stage("03_build_pairs")
    with pytest.raises(SystemExit, match="reward_train.jsonl not found: run 01_prepare_data.py first, or pass --data-dir"):
        train.main(train.Config(data_dir=str(tmp_path / "nothing"), out_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit, match="runs/none/reward not found: run 02_train_reward.py first, or pass --reward"):
        pairs.main(pairs.Config(data_dir=str(toy / "data"), reward="runs/none/reward", out_dir=str(tmp_path / "p")))


def test_toy_records_come_back_through_the_released_reader(toy):
    """01 publishes the toy's judge records in the released LLaVA layout and maps them back with the
    reader of the released data: every field the world drew survives the round trip."""
    sizes = dict(train_per_group=4, test_per_group=3, policy_train=4, policy_test=4, gen_prompts=2, gen_candidates=4)
    drawn, _ = world.draw(0, sizes, world.DryWriter(), malformed=0.2)
    for split in ("train", "test"):
        mapped = common.read_jsonl(toy / "data" / f"reward_{split}.jsonl")
        assert len(mapped) == len(drawn[f"reward_{split}"]) == 8 * sizes[f"{split}_per_group"]
        for r, want in zip(mapped, drawn[f"reward_{split}"]):
            assert {k: v for k, v in r.items() if k not in ("id", "source")} == \
                   {k: v for k, v in want.items() if k not in ("id", "source")}
            assert r["source"] in world.SOURCES and r["id"].startswith(r["source"].replace("/", "-"))
    released = json.loads((toy / "data" / "sources" / "toy-vg" / "pairwise" / "train_data.json").read_text())
    turns = released[0]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"].startswith("<video>\n<video>\n")
    assert len(released[0]["videos"]) == 2
