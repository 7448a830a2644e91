"""The cost of one judge training step of 02, and what 02's default step count costs at that rate.

A step here is exactly 02's: a micro-batch drawn from the cache of encoded examples (with the vision
tower frozen, its output is cached in place of the pixels), the reward loss, backward, clipping and
AdamW. One epoch is drawn first, so every example is already encoded, as in every epoch after 02's
first. The median of several blocks of steps is reported; run it on a quiet machine (`uptime`).

    python tools/bench_step.py                                   # toy/base and runs/toy/data
    python tools/bench_step.py --blocks 3 --steps 10
"""
import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import feeding  # noqa: E402
import vlm  # noqa: E402

judge = importlib.import_module("02_train_reward")


def judge_runner(base: str, data_dir: str):
    """A closure running n of 02's training steps on the toy data, after one epoch of drawing."""
    cfg = judge.Config(base=base, data_dir=data_dir)
    skips = common.SkipLog(Path(tempfile.mkdtemp()) / "skipped.jsonl")   # nothing written beside the data
    records = judge.load_records(cfg, "train", skips)
    processor = vlm.load_processor(base)
    model = vlm.load_model(base, train=True)
    model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, foreach=True)
    batches = feeding.Batches(records, processor, cfg, skips, seed=0, frozen=model)
    for _ in range(-(-len(records) // cfg.batch_size)):
        batches.next()

    def run(n: int) -> None:
        for _ in range(n):
            batch, kinds, decisive = batches.next()
            loss, _ = judge.reward_loss(model, batch, kinds, decisive, 0.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run


def seconds_per_step(run, blocks: int, steps: int) -> float:
    """Median seconds per step over `blocks` blocks of `steps` steps, after one warm-up step."""
    run(1)
    times = []
    for _ in range(blocks):
        t = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="toy/base", help="the checkpoint the judge starts from")
    ap.add_argument("--data-dir", default="runs/toy/data", help="the toy data (01's output)")
    ap.add_argument("--blocks", type=int, default=5, help="blocks of steps")
    ap.add_argument("--steps", type=int, default=30, help="steps per block")
    a = ap.parse_args()
    common.require(Path(a.data_dir) / "reward_train.jsonl", "--data-dir", "01_prepare_data.py", hub_ok=False)
    torch.manual_seed(0)
    ms = 1000 * seconds_per_step(judge_runner(a.base, a.data_dir), a.blocks, a.steps)
    steps = judge.Config().steps
    print(f"judge step {ms:.1f} ms x {steps} steps (02's default) = {ms * steps / 60000:.1f} minutes of training")


if __name__ == "__main__":
    main()
