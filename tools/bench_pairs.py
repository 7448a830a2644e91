"""03's throughput, side by side with another checkout of this repository: prompts per second through
sampling and judging, on the same prompts, policy and judge.

Each checkout's 03 runs in its own process (its own common.py) on the first --prompts understanding
prompts and --gen generation prompts of the data; the runs alternate (A B A B ...) so that both see
the same machine, and the median of --repeats is reported. Time starts after the models are loaded.
Run it on a quiet machine (`uptime`):

    git worktree add /tmp/other <commit>
    python tools/bench_pairs.py --against /tmp/other
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside the checkout: time main() from its first prompt (the models are loaded before it starts).
DRIVER = """
import importlib, importlib.util, json, sys, time
sys.path.insert(0, '.')
import torch
torch.set_num_threads({threads})
stage = importlib.import_module('03_build_pairs')
import common
start = {{}}
home = importlib.import_module('vlm') if importlib.util.find_spec('vlm') else common   # where generate lives
generate = home.generate
def timed(*a, **k):
    start.setdefault('t', time.time())
    return generate(*a, **k)
home.generate = timed
cfg = stage.Config(data_dir={data!r}, policy={policy!r}, reward={reward!r}, out_dir={out!r})
if hasattr(cfg, 'image_generator'):   # judge the listed picture candidates, as a checkout without generators does
    cfg.image_generator = ''
stage.main(cfg)
print('RESULT', json.dumps({{'seconds': time.time() - start['t']}}))
"""


def subset(data: Path, n_prompts: int, n_gen: int) -> Path:
    """A data folder holding the first prompts of each file, its media linked from the original."""
    out = Path(tempfile.mkdtemp(prefix="bench_pairs_"))
    for entry in data.iterdir():
        if entry.suffix != ".jsonl":
            (out / entry.name).symlink_to(entry.resolve())
    for name, n in (("prompts_train.jsonl", n_prompts), ("gen_candidates.jsonl", n_gen)):
        lines = (data / name).read_text().splitlines()[:n]
        (out / name).write_text("".join(line + "\n" for line in lines))
    return out


def run(checkout: Path, data: Path, policy: str, reward: str, threads: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench_pairs_out_"))
    code = DRIVER.format(threads=threads, data=str(data), policy=policy, reward=reward, out=str(out))
    res = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(checkout)))
    shutil.rmtree(out, ignore_errors=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"03 failed in {checkout}:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][7:])["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="another checkout of this repository")
    ap.add_argument("--data-dir", default=str(ROOT / "runs/toy/data"))
    ap.add_argument("--policy", default=str(ROOT / "toy/base"))
    ap.add_argument("--reward", default=str(ROOT / "runs/toy/reward"))
    ap.add_argument("--prompts", type=int, default=48, help="understanding prompts")
    ap.add_argument("--gen", type=int, default=32, help="generation prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    data = subset(Path(a.data_dir), a.prompts, a.gen)
    checkouts = {"this": ROOT, "against": Path(a.against).resolve()}
    times = {k: [] for k in checkouts}
    for i in range(a.repeats):
        for name, path in checkouts.items():
            times[name].append(run(path, data, a.policy, a.reward, a.threads))
            print(f"repeat {i + 1}: {name} {times[name][-1]:.1f}s", flush=True)
    shutil.rmtree(data, ignore_errors=True)
    n = a.prompts + a.gen
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in checkouts:
        print(f"{name:8s} {checkouts[name]}: {med[name]:.1f}s median for {a.prompts} understanding + {a.gen} "
              f"generation prompts = {n / med[name]:.2f} prompts/s")
    print(f"this / against: {med['against'] / med['this']:.2f}x the throughput")


if __name__ == "__main__":
    main()
