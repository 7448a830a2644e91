"""Bad input and faults: every stage skips, counts and names what it cannot use, and loses nothing else.
Each test writes its own damaged files beside a copy of the small toy world."""
import json

import pytest
from PIL import Image

import common
from conftest import stage

prep = stage("01_prepare_data")

CAPTION = "Your task is provided as follows:\nText Caption: [{}]"


def released_source(root, rows, name="HPD"):
    """root/dataset/<name>/train_data.json holding `rows` (bytes are written as they are), two pictures."""
    folder = root / "dataset" / name
    (folder / "images").mkdir(parents=True)
    for f in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "images" / f)
    (folder / "train_data.json").write_bytes(rows if isinstance(rows, bytes) else json.dumps(rows).encode())
    return root


def pair(rid, caption, verdict="Image 1 is better than Image 2."):
    return {"id": rid, "images": ["images/a.png", "images/b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\n" + CAPTION.format(caption)}, {"from": "gpt", "value": verdict}]}


def skipped(path) -> dict:
    return {str(s["id"]): s["reason"] for s in map(json.loads, path.read_text().splitlines())}


def test_a_byte_that_is_not_utf8_skips_one_record_not_the_file(tmp_path):
    good = json.dumps(pair("good", "a red square")).encode()
    bad = json.dumps(pair("bad", "a blue square")).encode().replace(b"blue", b"bl\xffue")
    root = released_source(tmp_path / "in", b"[" + good + b", " + bad + b"]")
    prep.main(prep.Config(out_dir=str(tmp_path / "out"), data_dir=str(root), mix="all", test_share=0.0))
    records = common.read_jsonl(tmp_path / "out" / "data" / "reward_train.jsonl")
    assert [r["id"] for r in records] == ["HPD-good"]
    assert skipped(tmp_path / "out" / "data" / "skipped.jsonl")["bad"].startswith("not UTF-8")


def test_a_jsonl_line_that_is_not_utf8_is_skipped_and_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "\xfe"}\n{"id": "c"}\n')
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    assert [r["id"] for r in common.read_jsonl(path, skips)] == ["a", "c"]
    assert skipped(tmp_path / "skipped.jsonl")["line 2"].startswith("not UTF-8")
    with pytest.raises(ValueError, match="x.jsonl:2: not UTF-8"):
        common.read_jsonl(path)


def test_01_says_what_is_wrong_with_its_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no released source under"):
        prep.main(prep.Config(out_dir=str(tmp_path / "o"), data_dir=str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="no such folder"):
        prep.main(prep.Config(out_dir=str(tmp_path / "o"), data_dir=str(tmp_path / "nowhere" / "data")))
    root = released_source(tmp_path / "in", [pair("h1", "a red square")])
    with pytest.raises(SystemExit, match="--mix names sources that are not under .*: OIP"):
        prep.main(prep.Config(out_dir=str(tmp_path / "o"), data_dir=str(root), mix="HPD=all,OIP=all"))


def test_repeated_records_land_once_and_shared_ids_are_renamed(tmp_path):
    rows = [pair("h1", "a red square"), pair("h1", "a red square"), pair("h1", "a blue square"),
            pair("h2", "a green square")]
    root = released_source(tmp_path / "in", rows)
    prep.main(prep.Config(out_dir=str(tmp_path / "out"), data_dir=str(root), mix="all", test_share=0.5))
    data = tmp_path / "out" / "data"
    train, test = (common.read_jsonl(data / f"reward_{s}.jsonl") for s in ("train", "test"))
    assert sorted(r["id"] for r in train + test) == ["HPD-h1", "HPD-h1#2", "HPD-h2"]
    assert len(train) + len(test) == 3 and skipped(data / "skipped.jsonl")["HPD-h1"].startswith("duplicate record")
