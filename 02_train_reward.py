"""Stage 2: fine-tune a vision-language model into the unified judge (paper section III-B).

UnifiedReward is an ordinary VLM trained with next-token cross-entropy to *answer* judgment questions
for all four tasks at once: "Image 1 is better than Image 2." for a pair, "Final Score: 4" for a
single item. No reward head, no special loss: the verdict is text, and only the answer tokens carry
loss (the prompt and the media tokens are masked out).

    python 02_train_reward.py                                  # toy: toy/base -> runs/toy/reward
    python 02_train_reward.py --base Qwen/Qwen2.5-VL-3B-Instruct --data-dir data/unified \
        --template paper --out-dir runs/real/reward                        # same code, real model
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common
import feeding
import judging
import vlm


@dataclasses.dataclass
class Config:
    data_dir: str = "runs/toy/data"   # folder with reward_train.jsonl, reward_test.jsonl and their media
    base: str = "toy/base"            # checkpoint to start from: hub id or local folder (any Qwen2.5-VL)
    out_dir: str = "runs/toy/reward"  # judge checkpoint, log.jsonl, skipped.jsonl
    template: str = "short"           # wording for judging held-out records (both orders): short or paper
    steps: int = 3000                 # optimizer steps
    batch_size: int = 8               # examples per micro-batch (8 escaped the plateau sooner in wall time than 16)
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 5e-4                  # peak learning rate (AdamW); ~1e-5 for a 3B model. The tiny judge must reuse its
                                      # base's checking: 5e-4 beat 3e-4 on the mean of three seeds; 7e-4 broke 2 of 3
    warmup: int = 100                 # linear warmup steps, then cosine decay to 10%
    weight_decay: float = 0.0         # AdamW weight decay (0.1 slowed the tiny model down)
    clip: float = 1.0                 # gradient-norm clipping
    bt_weight: float = 0.0            # weight of an extra Bradley-Terry term on pairwise verdicts (0 = off; on the toy
                                      # 1.0 slowed the judge: at one seed, scores 56-65% exact after 3,000 steps)
    train_vision: bool = False        # also fine-tune the vision tower. Frozen (LLaMA-Factory's default too), steps are
                                      # 20% cheaper and the toy judge learns more per step
    cache_gb: float = 8.0             # keep every encoded example in memory after its first use while the whole set is
                                      # projected to fit in this many GB (with the tower frozen, its output, not the
                                      # pixels: about 0.09 GB for the toy); 0 = encode at every draw
    max_len: int = 0                  # longest example in tokens, never truncated: longer ones are skipped and counted
                                      # (0: by template, 2,048 for short, 13,000 for paper, the authors' cutoff)
    max_pixels: int = 0               # pixels a picture is resized down to at most (0: by template: the checkpoint's own
                                      # for short, 262,144 for paper)
    frame_pixels: int = 0             # pixels a video frame is resized down to at most (0: by template: the
                                      # checkpoint's own for short, 16,384 for paper)
    eval_every: int = 1000            # steps between held-out evaluations (and checkpoints)
    eval_size: int = 32               # test records per task and kind in periodic evals (0 = all; the final one uses all)
    seed: int = 0                     # seeds data order and initialisation of anything random
    resume: bool = False              # continue from the checkpoint in out_dir
    length_groups: int = 1            # micro-batches drawn together and regrouped by length into as many batches of
                                      # about equal padded tokens (1 = as drawn); see feeding.length_groups()
    workers: int = 0                  # DataLoader processes reading media and running the processor beside training:
                                      # several on a GPU machine; on the toy (2 cores, every example cached after the
                                      # first epoch) 2 made the first 400 steps slower (55 s vs 48 s), same weights
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~1/3 more compute
    compile: bool = False             # torch.compile each decoder layer: on an H200 the 3B judge's step is
                                      # 13% faster (tools/gpu_bench.py); on a CPU the compile costs more than it saves
    parallel: str = "ddp"             # under torchrun: ddp (a full copy per GPU), fsdp (FSDP2: weights, gradients and
                                      # AdamW sharded, ZeRO-3) or zero2 (FSDP2 keeping weights gathered forward to backward)
    precision: str = "fp32"           # fp32: fp32 weights and AdamW, bf16 math on CUDA (16 bytes per trained
                                      # parameter); bf16: bf16 weights and moments, stochastically rounded AdamW16
                                      # (8 bytes: a 7B judge fits one 80 GB GPU)

    def __post_init__(self):   # max_len, max_pixels, frame_pixels left at 0 take the template's limits
        vlm.template_limits(self)


# ---------------------------------------------------------------------------------------------
# the loss (section III-B), written by hand from the logits

def reward_loss(model, batch, kinds: list[str], decisive: list | None, bt_weight: float, norm=None):
    """Token cross-entropy on the answer tokens, plus an optional Bradley-Terry term.

    batch: collated examples; kinds: (B,) "pairwise"/"pointwise"; decisive: per row None, or
    (position, right token, wrong token) for a pairwise example with a strict label: the position of
    the token that decides the verdict ("Image [1]" vs "Image [2]") in input_ids.

    CE = mean over answer tokens t of -log p(x_t | x_<t)       (the paper's only loss)
    BT = mean over strict pairs of -log sigmoid(log p(right) - log p(wrong))
    at the decisive position: the log-probability gap between "Image 1 is better" and "Image 2 is
    better", since the rest of both answers follows deterministically from that token.
    norm: (answer tokens, strict pairs) to divide the sums by; by default this batch's own counts (the
    means above). Under torchrun each rank holds a share of the global batch and DDP averages the ranks'
    gradients, so there it is the global batch's counts over the number of ranks: the result is then
    the global batch's mean, however unevenly its tokens fall on the ranks.
    Returns (loss, stats) with stats = per-kind mean CE and the BT term, as floats.
    """
    pairs = [(r, d) for r, d in enumerate(decisive or []) if d is not None] if bt_weight > 0 else []
    other = None
    if pairs:   # the wrong verdict token in place of the right one, at each decisive position
        other = batch["input_ids"].clone()
        for r, (pos, _, wrong) in pairs:
            other[r, pos] = wrong
    logps, rows, other_logps = vlm.answer_token_logps(model, batch, other)   # (N,) each
    nll = -logps
    loss = nll.sum() / (norm[0] if norm else len(nll))
    stats = {}
    for kind in common.KINDS:
        sel = torch.tensor([kinds[r] == kind for r in rows.tolist()], device=nll.device)
        if sel.any():
            stats[f"ce_{kind}"] = nll[sel].mean().item()
    if pairs:
        at = (batch["input_ids"] != other)[:, 1:][batch["answer_mask"][:, 1:]]    # (N,) True where swapped
        bt = -torch.nn.functional.logsigmoid(logps[at] - other_logps[at])
        loss = loss + bt_weight * bt.sum() / (norm[1] if norm else len(bt))
        stats["bt"] = bt.mean().item()
    return loss, stats


class Objective(torch.nn.Module):
    """The judge with its loss in forward: the module DDP or FSDP2 wraps (common.wrap)."""

    def __init__(self, model, bt_weight: float):
        super().__init__()
        self.model, self.bt_weight = model, bt_weight

    def forward(self, batch, kinds, decisive, norm=None):
        return reward_loss(self.model, batch, kinds, decisive, self.bt_weight, norm)


def counts(batch, decisive) -> list[float]:
    """[answer tokens, strict pairs] of a batch: what reward_loss divides by."""
    return [float(batch["answer_mask"][:, 1:].sum()), float(sum(d is not None for d in decisive))]


# ---------------------------------------------------------------------------------------------
# data: the records here; the micro-batches they become come from feeding.Batches

def load_records(cfg, split: str, skips: common.SkipLog) -> list[dict]:
    """Read and check reward_{split}.jsonl; unusable records are skipped, counted and named."""
    path = Path(cfg.data_dir) / f"reward_{split}.jsonl"
    records = []
    for r in common.read_jsonl(path, skips):
        why = common.check_record(r, cfg.data_dir)
        if why:
            skips.add(path, r.get("id"), why)
        else:
            records.append(r)
    return records


# ---------------------------------------------------------------------------------------------
# evaluation

def blank_like(medium):
    """A uniform grey stand-in of the same size: the no-pixels control."""
    if isinstance(medium, common.Video):
        return common.Video(np.full_like(medium.frames, 128), medium.fps)
    return Image.new("RGB", medium.size, (128, 128, 128))


def judge_records(model, processor, records, data_dir, device, template="short", skips=None,
                  blank=False, both_orders=True, batch_size=16, max_len=4096) -> list[dict]:
    """Judge each record with the one-forward readout. Returns one prediction per usable record:
    pairwise {"id", "p": [P(first), P(second), P(tie)]}; pointwise {"id", "expected", "score"}.
    Records whose media cannot be read, or that do not fit max_len, are skipped and logged in `skips`."""
    usable, media = [], []
    for r in records:
        if not r.get("prompt"):   # released records whose wording hid the caption/question
            if skips is not None:
                skips.add(data_dir, r.get("id"), "no structured prompt: cannot render it in both orders")
            continue
        try:
            m = common.load_media(r["media"], data_dir)
        except common.MediaError as e:
            if skips is None:
                raise
            skips.add(data_dir, r.get("id"), f"unreadable media: {e}")
            continue
        usable.append(r)
        media.append([blank_like(x) for x in m] if blank else m)
    preds = [None] * len(usable)
    pair = [i for i, r in enumerate(usable) if r["kind"] == "pairwise"]
    point = [i for i, r in enumerate(usable) if r["kind"] == "pointwise"]
    if pair:
        p = judging.judge_pairwise(model, processor, [usable[i] for i in pair], [media[i] for i in pair], device,
                                  template, both_orders, batch_size, max_len)
        for i, row in zip(pair, p.tolist()):
            preds[i] = {"id": usable[i]["id"], "p": row}
    if point:
        e, b = judging.judge_pointwise(model, processor, [usable[i] for i in point], [media[i] for i in point],
                                      device, template, batch_size, max_len)
        for i, ev, bv in zip(point, e.tolist(), b.tolist()):
            preds[i] = {"id": usable[i]["id"], "expected": ev, "score": bv}
    out = []
    for p, r in zip(preds, usable):
        if math.isnan(sum(p["p"]) if "p" in p else p["expected"]):
            if skips is None:
                raise vlm.TooLong(f"{r.get('id')}: too long for {max_len} tokens")
            skips.add(data_dir, r.get("id"), f"too long: the prompt and the verdict need more than {max_len} tokens")
            continue
        out.append(dict(p, task=r["task"], kind=r["kind"], label=r.get("label"), truth=r.get("score")))
    return out


def judge_metrics(preds: list[dict]) -> dict:
    """Per task, from judge_records' output: pairwise diff and tau (judging.pair_accuracy); pointwise exact =
    share of records whose most likely score equals the true score, and the Spearman correlation of the
    expected score with the truth, which shows a judge that has learned part of a score (one of two
    attributes, say) while its exact accuracy still sits at the majority share."""
    out = {}
    for task in common.TASKS:
        pair = [p for p in preds if p["task"] == task and p["kind"] == "pairwise"]
        point = [p for p in preds if p["task"] == task and p["kind"] == "pointwise"]
        m = {}
        if pair:
            a = judging.pair_accuracy([p["p"] for p in pair], [p["label"] for p in pair])
            m.update(pair_diff=a["diff"], pair_tau=a["tau"], pair_n=a["n"], pair_ties=a["ties"])
        if point:
            m["point_exact"] = sum(p["score"] == p["truth"] for p in point) / len(point)
            m["point_spearman"] = judging.spearman([p["expected"] for p in point], [p["truth"] for p in point])
            m["point_n"] = len(point)
        if m:
            out[task] = m
    return out


def format_table(metrics: dict, control: dict | None = None) -> str:
    """Held-out judge accuracy per task, as a markdown table."""
    lines = ["| task | pairwise acc (no ties) | with ties (tau) | pointwise exact | pointwise Spearman |"
             + (" no-pixels pair / point |" if control else ""),
             "|---|---|---|---|---|" + ("---|" if control else "")]
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"
    for task, m in metrics.items():
        row = f"| {task} | {pct(m.get('pair_diff'))} (n={m.get('pair_n', 0) - m.get('pair_ties', 0)}) | " \
              f"{pct(m.get('pair_tau'))} ({m.get('pair_ties', 0)} ties) | {pct(m.get('point_exact'))} (n={m.get('point_n', 0)}) | " \
              f"{m.get('point_spearman', float('nan')):.2f} |"
        if control:
            c = control.get(task, {})
            row += f" {pct(c.get('pair_single'))} / {pct(c.get('point_exact'))} |"
        lines.append(row)
    return "\n".join(lines)


def subsample(records, per_group: int, seed: int) -> list[dict]:
    """At most `per_group` records per (task, kind), the same ones at every evaluation."""
    if per_group <= 0:
        return records
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["kind"]), []).append(r)
    rng = random.Random(seed)
    return [r for g in groups.values() for r in (rng.sample(g, per_group) if len(g) > per_group else g)]


def no_pixels_control(model, processor, records, cfg, device, skips) -> dict:
    """The judge with every medium replaced by flat grey, pairs judged in one order only.
    A judge that ignores the pixels scores the same as with them; ours should fall to chance:
    ~50% on pairs (labels are balanced) and the majority-score share on single items. The pairs'
    figure is the forced choice between the two (pair_single): two grey candidates are rightly called
    a tie, which the benchmarks' accuracy without ties counts as wrong, and would read as below chance."""
    preds = judge_records(model, processor, records, cfg.data_dir, device, cfg.template, skips,
                                 blank=True, both_orders=False, max_len=cfg.max_len)
    out = judge_metrics(preds)
    for task in out:
        strict = [p for p in preds if p["task"] == task and p["kind"] == "pairwise" and p["label"] != 0]
        forced = [[p["p"][0], p["p"][1], 0.0] for p in strict]
        out[task]["pair_single"] = judging.pair_accuracy(forced, [p["label"] for p in strict])["diff"]
    return out


# ---------------------------------------------------------------------------------------------

def main(cfg: Config) -> dict:
    common.from_repository(cfg)
    common.set_seed(cfg.seed)
    device = common.get_device()
    rank, world = common.init_distributed()   # 0, 1 unless started by torchrun
    common.require(Path(cfg.data_dir) / "reward_train.jsonl", "--data-dir", "01_prepare_data.py", hub_ok=False)
    common.require(cfg.base, "--base", "python -m toy.pretrain_base")
    out = common.output_dir(cfg.out_dir)
    if cfg.resume and not (out / "train_state.pt").exists():
        raise SystemExit(f"--resume: no checkpoint to resume from in {out} (no train_state.pt)")
    if cfg.resume and world > 1:
        raise SystemExit("--resume continues single-process runs only (torchrun checkpoints hold no optimizer state)")
    skips = common.SkipLog(out / ("skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl"), resume=cfg.resume)
    common.barrier()
    train = load_records(cfg, "train", skips)
    test = load_records(cfg, "test", skips)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{len(train)} train / {len(test)} test records; {skips.summary()}")

    start = out if cfg.resume else cfg.base
    model = vlm.load_model(start, device, train=True, precision=cfg.precision)
    processor = vlm.load_processor(start, cfg.max_pixels, cfg.frame_pixels)
    vlm.prepare_for_training(model, cfg.grad_checkpointing, cfg.compile)
    if not cfg.train_vision:
        model.model.visual.requires_grad_(False)
        if device == "cuda":   # a frozen tower only runs forward, under bf16 autocast: bf16 weights suffice
            model.model.visual.to(torch.bfloat16)
    objective = Objective(model, cfg.bt_weight)
    if world > 1:   # DDP or FSDP2 around the module whose forward computes the loss
        objective = common.wrap(objective, model.model.language_model.layers, cfg.parallel,
                                frozen=() if cfg.train_vision else model.model.visual.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = vlm.make_optimizer(params, cfg.precision, cfg.lr, cfg.weight_decay)
    batches = feeding.Batches(train, processor, cfg, skips, cfg.seed, frozen=None if cfg.train_vision else model, device=device,
                      rank=rank, world=world)
    step, saved = 0, None
    if cfg.resume:
        state = torch.load(out / "train_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        step = saved = state["step"]
        print(f"resumed from {out} at step {step}")
    evalset = subsample(test, cfg.eval_size, cfg.seed)

    def judge():
        """The model to judge with (rank 0 only): the one being trained, or, when FSDP2 has sharded it,
        a whole copy read back from the checkpoint just written."""
        if any(hasattr(p, "to_local") for p in model.parameters()):
            return vlm.load_model(out, device)
        return model

    def evaluate(records, judge_model):
        judge_model.eval()
        preds = judge_records(judge_model, processor, records, cfg.data_dir, device, cfg.template, skips,
                              max_len=cfg.max_len)
        judge_model.train()
        return judge_metrics(preds)

    def checkpoint():
        nonlocal saved
        if common.all_sum([float(not common.all_finite(model.parameters()))])[0]:   # never write NaN or inf
            raise common.nonfinite("a weight is not finite", step, out, saved)
        state = common.full_state_dict(model)          # under FSDP2: gathered from every rank's shard
        if rank == 0:   # resuming needs the optimizer state: single-process runs only
            common.save_checkpoint(model, processor, out, state_dict=state, extra=None if world > 1 else {
                "step": step, "optimizer": optimizer.state_dict(), "batches": batches.state(),
                "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg)})
        common.barrier()
        saved = step

    model.train()
    t0, seen, tokens, padded, final = time.time(), 0, 0, 0, None
    bar = tqdm(total=cfg.steps, initial=step, desc="judge", dynamic_ncols=True, mininterval=2, disable=rank > 0)
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = common.lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        stats_sum: dict = {}
        for _ in range(cfg.grad_accum):
            batch, kinds, decisive = batches.next()
            batch = vlm.to_device(batch, device)
            # under torchrun: divide by the global batch's counts (see reward_loss); else by this batch's
            norm = [n / world for n in common.all_sum(counts(batch, decisive))] if world > 1 else None
            with common.autocast(device):
                loss, stats = objective(batch, kinds, decisive, norm)
            if common.all_sum([float(not torch.isfinite(loss))])[0]:          # on any rank: all stop
                raise common.nonfinite(f"the loss is {loss.item()}", step, out, saved)
            (loss / cfg.grad_accum).backward()
            seen += len(kinds)
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            value = common.all_sum([loss.item()])[0] / world   # under torchrun the global batch's loss
            for k, v in {"loss": value, **stats}.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP2: one norm of all shards
        if not torch.isfinite(norm):                     # a finite loss can still have an inf gradient
            raise common.nonfinite(f"the gradient norm is {norm.item()}", step, out, saved)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats_sum['loss']:.3f}", refresh=False)   # redrawn every 2 s, not every step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            checkpoint()
            if rank > 0:
                continue
            # periodic evaluations use a fixed subsample; the last one, the whole held-out set (the report)
            judge_model = judge()
            metrics = evaluate(test if step == cfg.steps else evalset, judge_model)
            final = (metrics, judge_model) if step == cfg.steps else None
            row = {"step": step, "time_s": round(time.time() - t0, 1), "examples": seen, **stats_sum,
                   "tokens_per_s": round(tokens / (time.time() - t0)), "pad_share": round(1 - tokens / padded, 3),
                   "lr": optimizer.param_groups[0]["lr"],
                   "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                   "eval": metrics}
            common.append_jsonl(out / "log.jsonl", row)
            bar.write(f"step {step}: " + ", ".join(
                f"{t.split('_')[0][:3]}-{t.split('_')[1][:3]} pair {m.get('pair_diff', float('nan')):.2f} "
                f"point {m.get('point_exact', float('nan')):.2f} rho {m.get('point_spearman', float('nan')):.2f}"
                for t, m in metrics.items()))
    bar.close()
    if rank > 0:   # rank 0 writes the report
        return {}

    # the report on the whole held-out set (measured at the last step unless resumed there), the control
    metrics, judge_model = final or (None, judge())
    metrics = metrics or evaluate(test, judge_model)
    judge_model.eval()
    control = no_pixels_control(judge_model, processor, test, cfg, device, skips)
    table = format_table(metrics, control)
    (out / "eval.json").write_text(json.dumps({"metrics": metrics, "no_pixels": control}, indent=1))
    print(table)
    print(f"train time {time.time() - t0:.0f}s for {step} steps; {skips.summary()}")
    return {"metrics": metrics, "no_pixels": control}


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))
    common.exit_distributed()   # under torchrun; a single process just ends
