"""Pairwise judgments per second: the one-forward readout against generate + strict parsing (run after 02).

03 and 05 read a verdict from one teacher-forced forward pass (judging.answer_probs) instead of letting
the judge write its answer and parsing it. This times both on the same generation pairs from 01's
candidates, with the same judge and batch size, one after the other in one process.

    python tools/bench_judge.py                              # runs/toy/reward on 32 pairs
    python tools/bench_judge.py --reward X --pairs 64
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

stage3 = importlib.import_module("03_build_pairs")


def generation_pairs(data: Path, n: int) -> tuple[list[dict], list]:
    """The first n fixed pairs (0,1), (2,3), ... of 01's generation candidates, as records and media."""
    recs, media = [], []
    for g in common.read_jsonl(data / "gen_candidates.jsonl"):
        m = common.load_media(g["media"], data)
        for i in range(0, len(m) - 1, 2):
            recs.append({"task": g["task"], "kind": "pairwise", "prompt": g["prompt"], "responses": []})
            media.append([m[i], m[i + 1]])
        if len(recs) >= n:
            break
    return recs[:n], media[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward", default="runs/toy/reward", help="the judge")
    ap.add_argument("--data-dir", default="runs/toy/data", help="01's output, with gen_candidates.jsonl")
    ap.add_argument("--pairs", type=int, default=32, help="pairs judged by each readout (both orders each)")
    a = ap.parse_args()
    common.require(a.reward, "--reward", "02_train_reward.py")
    common.require(Path(a.data_dir) / "gen_candidates.jsonl", "--data-dir", "01_prepare_data.py", hub_ok=False)
    cfg = stage3.Config(reward=a.reward, data_dir=a.data_dir)
    judge = stage3.Judge(cfg, common.get_device())
    recs, media = generation_pairs(Path(a.data_dir), a.pairs)
    rate = {}
    for mode in ("forward", "generate"):
        t = time.time()
        judge.pairs(recs, media, mode)
        rate[mode] = len(recs) / (time.time() - t)
    print(f"{len(recs)} pairs: forward {rate['forward']:.1f}/s, generate + parse {rate['generate']:.1f}/s "
          f"-> {rate['forward'] / rate['generate']:.1f}x")


if __name__ == "__main__":
    main()
