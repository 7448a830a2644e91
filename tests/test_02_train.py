"""02_train_reward.py: the hand-written loss, overfitting, resume, bad input, NaN stop."""
import json

import pytest
import torch
import torch.nn.functional as F

import common
import feeding
import judging
import vlm
from conftest import stage

train = stage("02_train_reward")


def small_data(toy, tmp_path, records_train, records_test=None):
    """A data folder reusing the toy media with the given records."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "media").symlink_to(toy / "data" / "media")
    common.write_jsonl(data / "reward_train.jsonl", records_train)
    common.write_jsonl(data / "reward_test.jsonl", records_test if records_test is not None else records_train)
    return data


def one_per_group(toy, split="train"):
    records = common.read_jsonl(toy / "data" / f"reward_{split}.jsonl")
    seen, out = set(), []
    for r in records:
        if (r["task"], r["kind"]) not in seen:
            seen.add((r["task"], r["kind"]))
            out.append(r)
    return out


def config(toy, tmp_path, data, **kw):
    base = dict(data_dir=str(data), base=str(toy / "base"), out_dir=str(tmp_path / "reward"), steps=4,
                batch_size=8, eval_every=2, eval_size=0, warmup=2)
    return train.Config(**{**base, **kw})


def test_loss_matches_independent_computation(tiny, toy):
    model, processor = tiny
    recs = one_per_group(toy)
    encs, kinds, decisive = [], [], []
    for r in recs:
        e = vlm.encode(processor, common.load_media(r["media"], toy / "data"), r["question"], r["answer"])
        d = feeding.decisive_tokens(processor.tokenizer, r)
        n = int((~e["answer_mask"]).sum())
        decisive.append(None if d is None else (n + d[0], d[1], d[2]))
        encs.append(e)
        kinds.append(r["kind"])
    batch = vlm.collate(encs, processor.tokenizer.pad_token_id)
    loss0, stats = train.reward_loss(model, batch, kinds, decisive, bt_weight=0.0)
    loss1, _ = train.reward_loss(model, batch, kinds, decisive, bt_weight=0.5)
    logits = model(**vlm.model_inputs(batch)).logits
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["answer_mask"][:, 1:], -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss0, ce, atol=1e-5)
    # Bradley-Terry by hand: log-odds of the labelled verdict token against the opposite one
    bt = []
    for row, d in enumerate(decisive):
        if d is not None:
            z = logits[row, d[0] - 1]          # the state before the decisive token predicts it
            bt.append(-F.logsigmoid(z[d[1]] - z[d[2]]))
            # the decisive position really holds the verdict digit of the answer
            assert batch["input_ids"][row, d[0]] == d[1]
    assert len(bt) >= 2 and torch.allclose(loss1, ce + 0.5 * torch.stack(bt).mean(), atol=1e-5)
    assert set(stats) == {"ce_pairwise", "ce_pointwise"}


def twin(r):
    """The same pair in the other order, with the label flipped."""
    t = dict(r, id=r["id"] + "-swapped", label={1: 2, 2: 1, 0: 0}[r["label"]])
    if r["task"].endswith("generation"):
        t["media"] = r["media"][::-1]
    else:
        t["responses"] = r["responses"][::-1]
        t["question"] = judging.render_question(r["task"], "pairwise", r["prompt"], t["responses"])
    t["answer"] = judging.render_answer(r["task"], "pairwise", label=t["label"])
    return t


def test_overfits_eight_examples(toy, tmp_path):
    # 4 pointwise records and 2 pairs in both orders: judged in both orders, a memorized pair must be
    # memorized in both (the evaluation averages them), so each pair comes with its swapped twin
    recs = [r for r in one_per_group(toy) if r["kind"] == "pointwise"]
    for task in ("image_generation", "video_understanding"):
        pair = next(r for r in common.read_jsonl(toy / "data" / "reward_train.jsonl")
                    if r["task"] == task and r["kind"] == "pairwise" and r["label"] != 0)
        recs += [pair, twin(pair)]
    assert len(recs) == 8
    data = small_data(toy, tmp_path, recs)
    result = train.main(config(toy, tmp_path, data, steps=60, lr=2e-3, warmup=5, eval_every=60))
    for task, m in result["metrics"].items():
        assert m["point_exact"] == 1.0 and m.get("pair_tau", 1.0) == 1.0, (task, m)
    log = [json.loads(l) for l in (tmp_path / "reward" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 60
    assert vlm.load_model(tmp_path / "reward") is not None   # a plain save_pretrained folder


def test_resume_continues_from_saved_step(toy, tmp_path, monkeypatch):
    data = small_data(toy, tmp_path, common.read_jsonl(toy / "data" / "reward_train.jsonl")[:16])
    straight = config(toy, tmp_path, data, out_dir=str(tmp_path / "straight"), steps=6, eval_every=3, batch_size=4)
    train.main(straight)
    calls = {"n": 0}
    real = train.reward_loss

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:                       # dies during step 4, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "reward_loss", interrupted)
    cut = config(toy, tmp_path, data, out_dir=str(tmp_path / "cut"), steps=6, eval_every=3, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        train.main(cut)
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(train, "reward_loss", real)
    train.main(train.Config(**{**cut.__dict__, "resume": True}))
    a = vlm.load_model(tmp_path / "straight").state_dict()
    b = vlm.load_model(tmp_path / "cut").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [3, 6]


def test_bad_input_is_skipped_and_named(toy, tmp_path):
    processor = vlm.load_processor(toy / "base")
    data_in = toy / "data"
    length = lambda r: len(vlm.encode(processor, common.load_media(r["media"], data_in), r["question"],
                                         r["answer"])["input_ids"])
    pool = common.read_jsonl(data_in / "reward_train.jsonl")
    longest = max(map(length, pool))
    too_long = dict(next(r for r in pool if length(r) == longest), id="too-long")
    good = [r for r in pool if length(r) < longest][:10]
    max_len = max(map(length, good))                  # the longest record does not fit
    missing = dict(good[0], id="missing-media", media=["media/nope.png"])
    unknown = dict(good[1], id="unknown-task", task="audio_generation")
    out_of_scale = dict(next(r for r in good if r["kind"] == "pointwise"), id="bad-score", score=9)
    data = small_data(toy, tmp_path, good + [missing, unknown, out_of_scale, too_long])
    with open(data / "reward_train.jsonl", "a") as f:
        f.write("{not json\n")
    train.main(config(toy, tmp_path, data, steps=2, eval_every=2, max_len=max_len))
    skipped = [json.loads(l) for l in (tmp_path / "reward" / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert reasons["missing-media"].startswith("missing media")
    assert reasons["unknown-task"].startswith("unknown task")
    assert reasons["bad-score"].startswith("score 9 outside scale")
    assert reasons["too-long"].startswith("too long")
    assert any(k.startswith("line ") and v.startswith("malformed json") for k, v in reasons.items())
    assert all(s["file"].endswith(".jsonl") for s in skipped)


def test_nan_loss_stops_and_keeps_last_checkpoint(toy, tmp_path, monkeypatch):
    data = small_data(toy, tmp_path, common.read_jsonl(toy / "data" / "reward_train.jsonl")[:8])
    real, calls = train.reward_loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, stats = real(*a, **k)
        return (loss * float("nan") if calls["n"] == 3 else loss), stats
    monkeypatch.setattr(train, "reward_loss", poisoned)
    with pytest.raises(RuntimeError, match="the checkpoint of step 2 in .* is intact"):
        train.main(config(toy, tmp_path, data, steps=4, eval_every=2, batch_size=4))
    state = torch.load(tmp_path / "reward" / "train_state.pt", weights_only=False)
    assert state["step"] == 2
    model = vlm.load_model(tmp_path / "reward")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cached_batches_equal_fresh_ones(toy, tmp_path):
    recs = common.read_jsonl(toy / "data" / "reward_train.jsonl")[:6]
    data = small_data(toy, tmp_path, recs)
    processor = vlm.load_processor(toy / "base")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    cached = feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=4), skips, seed=0)
    fresh = feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=4, cache_gb=0), skips, seed=0)
    for _ in range(4):                            # 16 draws from 6 records: later batches come from the cache
        (a, ka, da), (b, kb, db) = cached.next(), fresh.next()
        assert ka == kb and da == db and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(cached.cache) == 6 and not fresh.cache


def test_frozen_tower_features_train_the_same(toy, tmp_path):
    """With the vision tower frozen, examples carry its output instead of pixels: the same loss and the
    same gradients, the pixels gone from the cache, and the tower run once per example."""
    recs = common.read_jsonl(toy / "data" / "reward_train.jsonl")[:6]
    data = small_data(toy, tmp_path, recs)
    processor = vlm.load_processor(toy / "base")
    model = vlm.load_model(toy / "base", train=True)
    model.model.visual.requires_grad_(False)
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    pixels = feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=4), skips, seed=0)
    tokens = feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=4), skips, seed=0, frozen=model)
    calls = {"n": 0}
    model.model.visual.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    for i in range(4):                            # 16 draws of 6 records: the last two batches come from the cache
        a, kinds, dec = pixels.next()
        before = calls["n"]
        b, _, _ = tokens.next()
        assert (calls["n"] > before) == (i < 2)   # the tower runs only for examples seen the first time
        assert "pixel_values" in a and "pixel_values" not in b and "image_embeds" in b
        grads = []
        for batch in (a, b):
            before = calls["n"]
            loss, _ = train.reward_loss(model, batch, kinds, dec, 0.0)
            assert (calls["n"] > before) == (batch is a)     # with the tower's output given, it does not run
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
            model.zero_grad()
        assert all(torch.equal(x, y) for x, y in zip(*grads))
    assert not any("pixel_values" in e or "pixel_values_videos" in e for e, _ in tokens.cache.values())


def test_frozen_vision_tower_stays_put(toy, tmp_path):
    data = small_data(toy, tmp_path, common.read_jsonl(toy / "data" / "reward_train.jsonl")[:8])
    train.main(config(toy, tmp_path, data, steps=2, eval_every=2, train_vision=False))
    before = vlm.load_model(toy / "base").state_dict()
    after = vlm.load_model(tmp_path / "reward").state_dict()
    vision = [k for k in before if k.startswith("model.visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not all(torch.equal(before[k], after[k]) for k in before if k not in vision)


def test_the_cache_turns_itself_off_when_the_set_would_not_fit(toy, tmp_path, capsys):
    recs = common.read_jsonl(toy / "data" / "reward_train.jsonl") * 3          # 96 records, 64 decide
    data = small_data(toy, tmp_path, recs)
    processor = vlm.load_processor(toy / "base")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    small = feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=8, cache_gb=1e-6), skips, seed=0)
    roomy = feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=8), skips, seed=0)
    for _ in range(10):
        (a, ka, da), (b, kb, db) = small.next(), roomy.next()
        assert ka == kb and da == db and all(torch.equal(a[k], b[k]) for k in a)   # the same batches either way
    assert not small.caching and not small.cache and small.projected_gb > 1e-6
    assert roomy.caching and len(roomy.cache) == 80 and roomy.projected_gb < 8
    assert "cache off: 96 encoded examples would take" in capsys.readouterr().out


def test_loader_workers_and_resume_draw_the_same_batches(toy, tmp_path):
    """Batches fed by two DataLoader workers (running ahead of training) equal those of the main process
    alone, and a checkpointed state resumes the draws where training had consumed them."""
    recs = common.read_jsonl(toy / "data" / "reward_train.jsonl")[:12]
    data = small_data(toy, tmp_path, recs)
    processor = vlm.load_processor(toy / "base")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    make = lambda workers: feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=4, workers=workers,
                                                                 cache_gb=0), skips, seed=0)
    alone, loaded = make(0), make(2)
    first = [alone.next()[0]["input_ids"] for _ in range(6)]
    ahead = [loaded.next()[0]["input_ids"] for _ in range(3)]
    state = loaded.state()
    resumed = make(2)
    resumed.load_state(state)
    ahead += [resumed.next()[0]["input_ids"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, ahead))
    assert not torch.equal(first[0], first[1])


def test_length_groups_cut_sorted_runs_of_about_equal_cost():
    import random
    # by hand: budget 8 packs [1 1 1 1] (cost 4) and [4 4] (cost 8); budget 7 would need three groups
    groups = feeding.length_groups([4, 1, 1, 4, 1, 1], 2, random.Random(0))
    assert sorted(sorted(g) for g in groups) == [[0, 3], [1, 2, 4, 5]]
    rng = random.Random(1)
    lengths = [rng.choice([60, 70, 200, 220, 900]) + rng.randrange(10) for _ in range(64)]
    groups = feeding.length_groups(lengths, 8, random.Random(0))
    assert len(groups) == 8 and sorted(i for g in groups for i in g) == list(range(64))
    spans = sorted((min(lengths[i] for i in g), max(lengths[i] for i in g)) for g in groups)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))      # runs of the sorted lengths
    cost = lambda gs: [len(g) * max(lengths[i] for i in g) for g in gs]
    drawn = [list(range(j, j + 8)) for j in range(0, 64, 8)]           # micro-batches as drawn
    assert sum(cost(groups)) < 0.7 * sum(cost(drawn)) and max(cost(groups)) <= max(cost(drawn))
    assert len(feeding.length_groups([5, 5], 4, random.Random(0))) == 4   # fewer examples than groups: some empty


def test_length_grouped_batches_cover_each_draw_once_and_resume_inside_a_window(toy, tmp_path):
    recs = common.read_jsonl(toy / "data" / "reward_train.jsonl")[:16]
    data = small_data(toy, tmp_path, recs)
    processor = vlm.load_processor(toy / "base")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    make = lambda k: feeding.Batches(recs, processor, config(toy, tmp_path, data, batch_size=4, length_groups=k),
                                   skips, seed=0)
    plain, grouped = make(1), make(4)
    pads = {}
    for name, b in (("plain", plain), ("grouped", grouped)):
        rows = [b.next()[0] for _ in range(4)]                          # one epoch: 16 draws
        assert sum(len(r["input_ids"]) for r in rows) == 16
        pads[name] = sum(int((r["attention_mask"] == 0).sum()) for r in rows)
        ids = sorted(tuple(x[m].tolist()) for r in rows for x, m in zip(r["input_ids"], r["attention_mask"].bool()))
        pads[name + " ids"] = ids
    assert pads["plain ids"] == pads["grouped ids"]                    # the same examples, regrouped
    assert pads["grouped"] < pads["plain"]
    first = [grouped.next()[0]["input_ids"] for _ in range(4)]         # the second epoch's window
    again = make(4)
    for _ in range(5):
        again.next()
    state = again.state()                                              # one group into the second window
    assert state["taken"] == 1
    resumed = make(4)
    resumed.load_state(state)
    assert all(torch.equal(a, resumed.next()[0]["input_ids"]) for a in first[1:])
