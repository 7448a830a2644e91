"""Side-by-side cost of the base's pretraining (01) in one process or in two worker processes.

    one process:  the batch of 16 in one process, which uses both cores (PyTorch's intra-op threads)
    two workers:  the batch as 2 shards of 8, one process of one thread per shard, gradients summed
                  (common.run_workers, common.sum_gradients)

Both are timed whole, start-up included (building the model in each process, and the processes'
start for the workers), in alternating runs of `--steps` steps of the first phase; the median run of
each is reported. Whole-stage times on a shared 2-core machine drift by several percent from run to
run, hence the alternation.

    python tools/bench_workers.py                          # runs/toy/data's texts for the tokenizer
    python tools/bench_workers.py --steps 300 --runs 3
"""
import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

prep = importlib.import_module("01_prepare_data")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="runs/toy/data", help="the toy data (01's output)")
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps per run")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per variant")
    a = ap.parse_args()
    rows = {n: common.read_jsonl(Path(a.data_dir) / f"{n}.jsonl") for n in
            ("reward_train", "reward_test", "prompts_train", "prompts_test", "gen_candidates")}
    corpus = prep.toy_corpus(rows["reward_train"] + rows["reward_test"], rows["prompts_train"] + rows["prompts_test"],
                             rows["gen_candidates"])
    variants = {"one process": (1, 1), "two workers": (2, 2)}   # name -> (shards, processes)
    times = {name: [] for name in variants}
    out = Path(tempfile.mkdtemp())
    for _ in range(a.runs):
        for name, (shards, world) in variants.items():
            cfg = prep.Config(base_steps=a.steps, quality_steps=0, base_shards=shards)
            t = time.perf_counter()
            common.run_workers(prep._pretrain_worker, world, cfg, corpus, out / name.replace(" ", "_"))
            times[name].append(time.perf_counter() - t)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    one, two = (statistics.median(times[n]) for n in variants)
    print(f"{a.steps} steps of 16 examples: one process {one:.1f} s, two workers {two:.1f} s, {one / two:.2f}x")


if __name__ == "__main__":
    main()
