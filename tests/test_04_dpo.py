"""04_dpo.py: the DPO loss by hand, the stored reference, gradients, and learning on fixed pairs."""
import json
import math

import pytest
import torch

import common
import vlm
from conftest import stage

dpo = stage("04_dpo")


def test_dpo_loss_known_values():
    z = torch.zeros(3)
    losses, ch, rj = dpo.dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))          # policy == reference
    pi_c, pi_r = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-3.0, -1.0, -2.0])
    ref_c, ref_r = torch.tensor([-2.0, -2.0, -2.0]), torch.tensor([-2.0, -2.0, -2.0])
    losses, ch, rj = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    h = torch.tensor([2.0, -4.0, 0.0])                                    # (pi_c-ref_c)-(pi_r-ref_r)
    assert torch.allclose(losses, torch.log1p(torch.exp(-0.5 * h)))
    assert torch.allclose(ch, torch.tensor([0.5, -1.5, 0.0])) and torch.allclose(rj, torch.tensor([-0.5, 0.5, 0.0]))
    smooth, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.2)
    assert torch.allclose(smooth, 0.8 * torch.log1p(torch.exp(-0.5 * h)) + 0.2 * torch.log1p(torch.exp(0.5 * h)))
    # IPO on per-token averages: answers of 2 and 4 tokens
    n_c, n_r = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([4.0, 4.0, 4.0])
    ipo, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, kind="ipo", n_c=n_c, n_r=n_r)
    h_avg = (pi_c - ref_c) / 2 - (pi_r - ref_r) / 4                         # [0.75, -1.75, 0.0]
    assert torch.allclose(ipo, (h_avg - 1.0) ** 2)
    assert torch.allclose(ipo, torch.tensor([0.0625, 7.5625, 1.0]))
    with pytest.raises(ValueError):
        dpo.dpo_loss(z, z, z, z, kind="hinge?")


def fixed_pairs(toy):
    rows = common.read_jsonl(toy / "data" / "prompts_train.jsonl")[:4]
    out = []
    for r in rows:
        wrong = ", ".join("purple" for _ in r["asked"])
        out.append({"id": r["id"], "task": r["task"], "media": r["media"], "prompt": r["question"],
                    "chosen": r["answer"], "rejected": wrong, "chosen_score": 3.0, "rejected_score": 1.0})
    return out


def test_stored_reference_equals_fresh_forward_and_grads_reach_policy_only(tiny, toy, tmp_path):
    model, processor = tiny
    pairs = fixed_pairs(toy)
    media = [common.load_media(p["media"], toy / "data") for p in pairs]
    cfg = dpo.Config(image_generator="", batch_size=3)
    ref = dpo.reference_logps(dpo.Policy(model), processor, pairs, media, cfg, "cpu")
    assert not ref.requires_grad
    fresh = vlm.load_model(toy / "base")
    c, r, _, _ = dpo.pair_logps(dpo.Policy(fresh), processor, pairs, media, 4096, "cpu")
    assert torch.allclose(ref, torch.stack([c, r], 1).detach(), atol=1e-5)
    model.eval()
    c, r, _, _ = dpo.pair_logps(dpo.Policy(model), processor, pairs, media, 4096, "cpu")
    loss = dpo.dpo_loss(c, r, ref[:, 0], ref[:, 1])[0].mean()
    assert torch.allclose(loss, torch.tensor(math.log(2)), atol=1e-5)      # policy == reference at start
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert ref.grad is None and all(p.grad is None for p in fresh.parameters())


def test_dpo_steps_raise_the_margin(toy, tmp_path):
    common.write_jsonl(tmp_path / "pairs.jsonl", fixed_pairs(toy) * 3)
    cfg = dpo.Config(image_generator="", data_dir=str(toy / "data"), pairs=str(tmp_path / "pairs.jsonl"), policy=str(toy / "base"),
                     out_dir=str(tmp_path / "policy"), epochs=4, batch_size=4, lr=1e-3, warmup=1, holdout=0.2,
                     sft_weight=0.0)   # DPO alone: the NLL term by itself also widens the margin
    final = dpo.main(cfg)
    # the margin starts at exactly 0 (policy == reference) and must have grown on held-out pairs
    assert final["margin"] > 0.05 and final["reward_acc"] == 1.0
    log = common.read_jsonl(tmp_path / "policy" / "log.jsonl")
    assert [row["step"] for row in log] == [2, 4, 6, 8] and all(row["heldout"]["margin"] > 0 for row in log)
    assert vlm.load_model(tmp_path / "policy") is not None


def test_bad_pairs_are_skipped(toy, tmp_path):
    good = fixed_pairs(toy)
    textonly = {k: v for k, v in good[2].items() if k != "media"}
    bad = [dict(good[0], id="no-media", media=["media/none.png"]), dict(good[1], id="empty", chosen=" "),
           dict(textonly, id="no-media-field")]
    common.write_jsonl(tmp_path / "pairs.jsonl", good + bad)
    processor = vlm.load_processor(toy / "base")
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    cfg = dpo.Config(image_generator="", data_dir=str(toy / "data"), pairs=str(tmp_path / "pairs.jsonl"))
    kept, media = dpo.load_pairs(cfg, processor, skips)
    assert [p["id"] for p in kept] == [p["id"] for p in good] and skips.total == 3
    reasons = {json.loads(l)["id"]: json.loads(l)["reason"] for l in (tmp_path / "skipped.jsonl").read_text().splitlines()}
    assert reasons["no-media-field"].startswith("no media")   # named, never trained as text-only


def test_chosen_nll_term_keeps_the_chosen_likely(toy, tmp_path):
    processor = vlm.load_processor(toy / "base")
    pairs = fixed_pairs(toy)
    media = [common.load_media(p["media"], toy / "data") for p in pairs]
    _, _, n_c, _ = dpo.pair_logps(dpo.Policy(vlm.load_model(toy / "base")), processor, pairs, media, 4096, "cpu")
    lengths = [len(processor.tokenizer(p["chosen"] + vlm.END_OF_TURN, add_special_tokens=False)["input_ids"])
               for p in pairs]
    assert n_c.tolist() == lengths                        # the NLL is per token of the chosen answer
    common.write_jsonl(tmp_path / "pairs.jsonl", pairs * 3)
    nll = {}
    for w in (0.0, 5.0):
        cfg = dpo.Config(image_generator="", data_dir=str(toy / "data"), pairs=str(tmp_path / "pairs.jsonl"), policy=str(toy / "base"),
                         out_dir=str(tmp_path / f"policy{w}"), epochs=4, batch_size=4, lr=1e-3, warmup=1,
                         holdout=0.2, sft_weight=w)
        nll[w] = dpo.main(cfg)["nll_chosen"]
    assert nll[5.0] < nll[0.0]                            # the term pulls the chosen answers' likelihood up
