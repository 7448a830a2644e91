"""Side-by-side cost of one training step, the way the code ran before and after session 6's speed-ups.

Whole-stage wall times on a shared 2-core machine drift by several percent from run to run, more
than the gains measured here, so this runs both variants in one process and alternates blocks of
steps between them (the median block is reported):

  judge step (02, epochs after the first, examples cached, vision tower frozen)
      before: pixels in every batch, so the frozen tower runs at every step; AdamW and clipping one
              tensor at a time (PyTorch's CPU default)
      after:  the tower's output cached in place of the pixels (`frozen_tower_features`); foreach
  base step (01, fresh examples drawn and processed in every step)
      before: the processor called once per example; one tensor at a time
      after:  one processor call per batch (`common.encode_many`); foreach

Both variants compute the same numbers (see the tests); only the time differs.

Last, the floor the default recipe cannot go under with this code: the model's own work (forward,
backward, clipping, AdamW) of a base step and a judge step with their batches drawn beforehand,
times 01's and 02's default step counts. Everything else a run does (drawing and encoding data,
rendering the world, evaluating, saving) comes on top.

    python tools/bench_step.py                                   # runs/toy/base and runs/toy/data
    python tools/bench_step.py --blocks 3 --steps 10
"""
import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

prep = importlib.import_module("01_prepare_data")
judge = importlib.import_module("02_train_reward")


def judge_runner(base: str, data_dir: str, after: bool):
    """A closure running n judge steps of one variant; one epoch of the data is drawn first, so that
    every example is already encoded (and, after, its visual tokens cached)."""
    cfg = judge.Config(base=base, data_dir=data_dir)
    skips = common.SkipLog(Path(tempfile.mkdtemp()) / "skipped.jsonl")   # nothing written beside the data
    records = judge.load_records(cfg, "train", skips)
    processor = common.load_processor(base)
    model = common.load_model(base, train=True)
    model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    foreach = True if after else None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, foreach=foreach)
    batches = judge.Batches(records, processor, cfg, skips, seed=0, frozen=model if after else None)
    for _ in range(-(-len(records) // cfg.batch_size)):
        batches.next()

    def run(n: int) -> None:
        for _ in range(n):
            batch, kinds, decisive = batches.next()
            loss, _ = judge.reward_loss(model, batch, kinds, decisive, 0.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip, foreach=foreach)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run


def draw_base_batch(processor, rng, cfg, after: bool):
    """One base-pretraining batch as 01 draws it -> (batch, grounding word ids, grounding targets)."""
    examples = [prep.base_example(rng, cfg.base_qa_share, cfg.base_verify_share, cfg.base_multi_share)
                for _ in range(cfg.base_batch)]
    items = [([prep.as_media(m, px) for px in pixels], q, a) for m, pixels, q, a, _ in examples]
    encoded = common.encode_many(processor, items) if after else [common.encode(processor, *it) for it in items]
    shown = [w for kind in ("image", "video") for e in examples if e[0] == kind for w in e[4]]
    return (common.collate(encoded, processor.tokenizer.pad_token_id), *prep.grounding_targets(processor, shown))


def base_step(model, visual, optimizer, batch, ids, target, foreach) -> None:
    """01's loss, backward, clipping and AdamW on one drawn batch."""
    ce = -common.answer_token_logps(model, batch)[0].mean()
    logits = model.lm_head(visual.pooled(batch))[:, ids].float()
    loss = ce + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def base_runner(base: str, after: bool, predrawn: bool = False):
    """A closure running n base-pretraining steps of one variant (as 01's loop: draw, process, train).
    predrawn: train on 10 batches drawn and encoded beforehand, in turn, to time the model's work alone."""
    cfg = prep.Config()
    processor = common.load_processor(base)
    model = common.load_model(base, train=True)
    visual = prep.VisualTokens(model)
    foreach = True if after else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, foreach=foreach)
    rng = np.random.default_rng([0, 7])
    ready = [draw_base_batch(processor, rng, cfg, after) for _ in range(10)] if predrawn else []
    k = 0

    def run(n: int) -> None:
        nonlocal k
        for _ in range(n):
            drawn = ready[k % len(ready)] if ready else draw_base_batch(processor, rng, cfg, after)
            base_step(model, visual, optimizer, *drawn, foreach)
            k += 1
    return run


def side_by_side(before, after, blocks: int, steps: int) -> tuple[float, float]:
    """Median seconds per step of each variant over alternating blocks (after a warm-up block each)."""
    times = {before: [], after: []}
    for run in (before, after):
        run(1)
    for _ in range(blocks):
        for run in (before, after):
            t = time.perf_counter()
            run(steps)
            times[run].append((time.perf_counter() - t) / steps)
    return statistics.median(times[before]), statistics.median(times[after])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/toy/base", help="the toy base checkpoint (01's output)")
    ap.add_argument("--data-dir", default="runs/toy/data", help="the toy data (01's output)")
    ap.add_argument("--blocks", type=int, default=5, help="alternating blocks per variant")
    ap.add_argument("--steps", type=int, default=30, help="steps per block")
    a = ap.parse_args()
    torch.manual_seed(0)
    for name, (b, f) in {"judge step": (judge_runner(a.base, a.data_dir, False), judge_runner(a.base, a.data_dir, True)),
                         "base step": (base_runner(a.base, False), base_runner(a.base, True))}.items():
        slow, fast = side_by_side(b, f, a.blocks, a.steps)
        print(f"{name}: before {1000 * slow:.1f} ms, after {1000 * fast:.1f} ms, {slow / fast:.2f}x")
    # the floor: a judge step of the `after` variant draws from its cache (well under a millisecond)
    judge_ms, base_ms = side_by_side(judge_runner(a.base, a.data_dir, True), base_runner(a.base, True, predrawn=True),
                                     a.blocks, a.steps)
    p, j = prep.Config(), judge.Config()
    base_steps = p.base_steps + p.quality_steps
    total = base_steps * base_ms + j.steps * judge_ms
    print(f"model work alone: base step {1000 * base_ms:.1f} ms x {base_steps} steps (01) + judge step "
          f"{1000 * judge_ms:.1f} ms x {j.steps} steps (02) = {total / 60:.1f} minutes")


if __name__ == "__main__":
    main()
