"""Bad input and faults: every stage skips, counts and names what it cannot use, and loses nothing else.
Each test writes its own damaged files beside a copy of the small toy world."""
import json

import pytest
from PIL import Image

import common
import judging
import vlm
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


# ---------------------------------------------------------------------------------------------
# faults in the training loops

train = stage("02_train_reward")
dpo = stage("04_dpo")
pairs_stage = stage("03_build_pairs")
ev = stage("05_eval")


def small_data(toy, tmp_path, n=8, test=None):
    data = tmp_path / "data"
    data.mkdir()
    (data / "media").symlink_to(toy / "data" / "media")
    records = common.read_jsonl(toy / "data" / "reward_train.jsonl")[:n]
    common.write_jsonl(data / "reward_train.jsonl", records)
    common.write_jsonl(data / "reward_test.jsonl", records if test is None else test)
    return data


def judge_config(toy, data, out, **kw):
    return train.Config(**{**dict(data_dir=str(data), base=str(toy / "base"), out_dir=str(out), steps=4,
                                  batch_size=4, eval_every=2, eval_size=0, warmup=1), **kw})


def poison_gradients_at(monkeypatch, call: int):
    """From the `call`-th loss on, a hook turns the gradient of one weight into NaN (the loss stays finite)."""
    real, calls = train.reward_loss, {"n": 0}

    def poisoned(model, *a, **k):
        calls["n"] += 1
        loss, stats = real(model, *a, **k)
        if calls["n"] >= call:
            loss.register_hook(lambda g: g * float("nan"))
        return loss, stats
    monkeypatch.setattr(train, "reward_loss", poisoned)


def test_a_nan_gradient_stops_before_the_step_and_names_the_checkpoint_left(toy, tmp_path, monkeypatch):
    data = small_data(toy, tmp_path)
    poison_gradients_at(monkeypatch, 3)          # step 2's checkpoint is written, step 3 gets NaN gradients
    with pytest.raises(RuntimeError, match="gradient norm is nan at step 2: .* the checkpoint of step 2 in .* is intact"):
        train.main(judge_config(toy, data, tmp_path / "r"))
    import torch
    assert torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)["step"] == 2
    assert common.all_finite(vlm.load_model(tmp_path / "r").parameters())
    with pytest.raises(RuntimeError, match="no checkpoint has been written"):
        train.main(judge_config(toy, data, tmp_path / "r2", eval_every=4))


def test_a_weight_gone_non_finite_is_never_written(toy, tmp_path, monkeypatch):
    import torch
    data = small_data(toy, tmp_path)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_break(self, *a, **k):      # the second step, the one before the first checkpoint, breaks a weight
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_break)
    with pytest.raises(RuntimeError, match="a weight is not finite at step 2: .* no checkpoint has been written"):
        train.main(judge_config(toy, data, tmp_path / "r"))
    assert not (tmp_path / "r" / "train_state.pt").exists() and not (tmp_path / "r" / "model.safetensors").exists()


def test_resume_needs_a_checkpoint_and_keeps_the_earlier_skips(toy, tmp_path):
    records = common.read_jsonl(toy / "data" / "reward_train.jsonl")[:8]
    data = small_data(toy, tmp_path)
    common.write_jsonl(data / "reward_train.jsonl", records + [dict(records[0], id="gone", media=["media/gone.png"])])
    with pytest.raises(SystemExit, match="--resume: no checkpoint to resume from"):
        train.main(judge_config(toy, data, tmp_path / "r", resume=True))
    train.main(judge_config(toy, data, tmp_path / "r", steps=2))
    first = (tmp_path / "r" / "skipped.jsonl").read_text()
    assert '"gone"' in first
    train.main(judge_config(toy, data, tmp_path / "r", steps=4, resume=True))
    assert (tmp_path / "r" / "skipped.jsonl").read_text() == first        # kept, and not logged twice
    (tmp_path / "pairs.jsonl").write_text("")
    with pytest.raises(SystemExit, match="--resume: no checkpoint to resume from"):
        dpo.main(dpo.Config(image_generator="", data_dir=str(data), pairs=str(tmp_path / "pairs.jsonl"), policy=str(toy / "base"),
                            out_dir=str(tmp_path / "nothing"), resume=True))
    with pytest.raises(SystemExit, match="--resume: nothing to resume"):
        pairs_stage.main(pairs_stage.Config(data_dir=str(toy / "data"), policy=str(toy / "base"),
                                            reward=str(toy / "base"), out_dir=str(tmp_path / "none"), resume=True))


def test_an_output_folder_that_cannot_be_written_stops_before_training(toy, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the output folder"):
        train.main(judge_config(toy, toy / "data", tmp_path / "a_file" / "reward"))


def test_default_paths_from_another_folder_say_where_they_belong(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="the default paths are relative to the repository"):
        train.main(train.Config(data_dir=str(toy / "data"), out_dir=str(tmp_path / "r")))   # base: toy/base
    with pytest.raises(SystemExit, match="pass --out-dir"):
        prep.main(prep.Config())                           # would write runs/toy here
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def judged_length(processor, record, data) -> int:
    """Tokens the one-forward readout needs for a record: its prompt in the longer of its orders, plus
    the verdict's decision path."""
    media = common.load_media(record["media"], data)
    orders = [(record, media)] + ([judging.swapped(record, media)] if record["kind"] == "pairwise" else [])
    answers = [a for _, a in judging.verdict_candidates(record["task"], record["kind"], record.get("scale"))]
    path, _ = judging.decision_path(processor.tokenizer, answers)
    return len(path) + max(len(vlm.encode(processor, m, judging.render_question(
        r["task"], r["kind"], r["prompt"], r["responses"], r.get("scale")))["input_ids"]) for r, m in orders)


def test_held_out_records_too_long_are_skipped_and_counted(toy, tmp_path):
    processor = vlm.load_processor(toy / "base")
    records = common.read_jsonl(toy / "data" / "reward_test.jsonl")
    lengths = {r["id"]: judged_length(processor, r, toy / "data") for r in records}
    max_len = sorted(lengths.values())[len(lengths) // 2]
    too_long = {i for i, n in lengths.items() if n > max_len}
    assert 0 < len(too_long) < len(records)
    fits = lambda r: len(vlm.encode(processor, common.load_media(r["media"], toy / "data"), r["question"],
                                       r["answer"])["input_ids"]) <= max_len
    data = small_data(toy, tmp_path, test=records)
    common.write_jsonl(data / "reward_train.jsonl",
                       [r for r in common.read_jsonl(toy / "data" / "reward_train.jsonl") if fits(r)])
    train.main(judge_config(toy, data, tmp_path / "r", steps=2, max_len=max_len))
    reasons = skipped(tmp_path / "r" / "skipped.jsonl")
    assert {i for i, why in reasons.items() if why.startswith("too long")} == too_long
    assert (tmp_path / "r" / "model.safetensors").exists() and (tmp_path / "r" / "eval.json").exists()
    ev.main(ev.Config(image_generator="", data_dir=str(toy / "data"), reward=str(toy / "base"), policy="", pairs_dir="",
                      out_dir=str(tmp_path / "e"), max_len=max_len))
    reasons = skipped(tmp_path / "e" / "skipped.jsonl")
    assert {i for i, why in reasons.items() if why.startswith("too long")} == too_long


def test_an_unreadable_medium_is_logged_once_over_many_evaluations(toy, tmp_path):
    records = common.read_jsonl(toy / "data" / "reward_test.jsonl")[:4]
    data = small_data(toy, tmp_path, test=records[:3])
    (data / "broken.png").write_bytes(b"not a png")
    common.write_jsonl(data / "reward_test.jsonl", records[:3] + [dict(records[3], id="broken", media=["broken.png"] *
                                                                   len(records[3]["media"]))])
    train.main(judge_config(toy, data, tmp_path / "r", steps=3, eval_every=1))   # four evaluations + the control
    lines = [json.loads(l) for l in (tmp_path / "r" / "skipped.jsonl").read_text().splitlines()]
    assert [l["id"] for l in lines].count("broken") == 1


def killed_at_call(monkeypatch, module, name: str, call: int, run) -> None:
    """Run `run` with module.name raising KeyboardInterrupt at its `call`-th call, as a kill would."""
    real, calls = getattr(module, name), {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, name, real)


def test_dpo_killed_and_resumed_ends_as_an_uninterrupted_run(toy, tmp_path, monkeypatch):
    import torch
    rows = common.read_jsonl(toy / "data" / "prompts_train.jsonl")[:4]
    pairs = [{"id": r["id"], "task": r["task"], "media": r["media"], "prompt": r["question"], "chosen": r["answer"],
              "rejected": "purple, purple"} for r in rows] * 3
    common.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = lambda out, **kw: dpo.Config(**{**dict(image_generator="", data_dir=str(toy / "data"), pairs=str(tmp_path / "pairs.jsonl"),
                                                 policy=str(toy / "base"), out_dir=str(out), epochs=3, batch_size=4,
                                                 lr=1e-3, warmup=1, holdout=0.2), **kw})
    dpo.main(cfg(tmp_path / "straight"))
    # killed in epoch 3, after epoch 2's checkpoint (2 steps an epoch, evaluations call the loss too)
    killed_at_call(monkeypatch, dpo, "dpo_loss", 6, lambda: dpo.main(cfg(tmp_path / "cut")))
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"] in (2, 4)
    dpo.main(cfg(tmp_path / "cut", resume=True))
    a, b = (vlm.load_model(tmp_path / d).state_dict() for d in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_killed_and_resumed_end_as_an_uninterrupted_run(toy, tmp_path, monkeypatch):
    cfg = lambda out, **kw: pairs_stage.Config(**{**dict(data_dir=str(toy / "data"), policy=str(toy / "base"),
                                                         reward=str(toy / "base"), out_dir=str(out), n_samples=4,
                                                         max_new_tokens=8, chunk=3), **kw})
    pairs_stage.main(cfg(tmp_path / "straight"))
    # killed while the second chunk of questions is being written out (this judge keeps no question's
    # pair, so each prompt appends one line)
    killed_at_call(monkeypatch, common, "append_jsonl", 5, lambda: pairs_stage.main(cfg(tmp_path / "cut")))
    assert 3 < len((tmp_path / "cut" / "candidates.jsonl").read_text().splitlines()) < 6
    with open(tmp_path / "cut" / "candidates.jsonl", "a") as f:
        f.write('{"id": "torn", "task"')                          # a line cut off mid-write
    pairs_stage.main(cfg(tmp_path / "cut", resume=True))
    for name in ("candidates.jsonl", "pairs.jsonl", "gen_pairs.jsonl"):   # sampled pictures sit in <out>/samples
        straight = (tmp_path / "straight" / name).read_text().replace("/straight/samples/", "/cut/samples/")
        assert (tmp_path / "cut" / name).read_text() == straight, name
