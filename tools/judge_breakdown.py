"""Where a toy judge goes wrong: accuracy broken down by ground truth (run after 02).

02 reports one accuracy per task and kind. To see *what* a judge has not learned yet, this tool draws
fresh toy examples together with their ground truth (01's `judge_example`, from a stream of its own;
pixels go to a scratch folder), judges them exactly as 02 does, and groups the results:

  generation pairs     by what separates the two candidates: the attributes that one of them gets
                       right and the other wrong ("colour", "position", "colour+position"), or only
                       quality (both equally right, one of them noisy or blurry)
  understanding pairs  by the two attributes the question asks for
  single items         by the true score

For generation pairs it also ranks the two candidates by their single-item scores (each judged alone,
"Rate the image from 1 to 5."): where that column is right and the pairwise verdict is not, the judge
can check each candidate but has not learnt to compare two at once.

    python tools/judge_breakdown.py                              # runs/toy/reward, 150 per format
    python tools/judge_breakdown.py --model runs/toy/base --n 40
"""
import argparse
import collections
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

prep = importlib.import_module("01_prepare_data")


def category(task: str, kind: str, truth: dict, label=None, score=None) -> str:
    """The group of one example, from its ground truth (see the module docstring)."""
    if kind == "pointwise":
        return f"true score {score}"
    if task.endswith("understanding"):
        return "asks " + "+".join(truth["asked"])
    a, b = (set(c["misses"]) for c in truth["candidates"])
    if label == 0:
        return "tie"
    differ = sorted(a ^ b, key=prep.CAPTION_ATTRS[task.split("_")[0]].index)
    return "+".join(differ) if len(a) != len(b) else "quality only"


def fresh_examples(n: int, seed: int, data_dir: Path) -> tuple[list[dict], list[dict]]:
    """n unified records per task and kind with their media under data_dir, and their ground truths."""
    rng = np.random.default_rng([seed, 53])
    records, truths = [], []
    with prep.MediaWriter(data_dir) as writer:
        for task in common.TASKS:
            medium = task.split("_")[0]
            for kind in common.KINDS:
                for i in range(n):
                    fields, media, truth = prep.judge_example(task, kind, rng)
                    rid = f"probe-{prep.TASK_CODE[task]}-{kind[:4]}-{i:05d}"
                    paths = [writer.write(m, f"media/{rid}_{k}.{prep.ext(medium)}") for k, m in enumerate(media)]
                    records.append(prep.toy_record(rid, task, kind, paths, fields))
                    truths.append(truth)
    return records, truths


def single_items(pair: dict) -> list[dict]:
    """The two candidates of a generation pair as two pointwise records (same caption, 1-5 scale)."""
    return [{**pair, "id": f"{pair['id']}-{k}", "kind": "pointwise", "media": [m], "label": None,
             "score": None, "scale": list(prep.GEN_SCALE)} for k, m in enumerate(pair["media"])]


def breakdown(records: list[dict], truths: list[dict], preds: list[dict], singles: dict | None = None) -> dict:
    """{(task, kind, group): (right, n, right by single-item scores or None)}. Pairs are a forced choice
    between the two (ties left out, as in 02's "pair diff"); single items are right when the most likely
    score is the true one. singles: {pair id: (expected score of the first, of the second)}."""
    counts = collections.defaultdict(lambda: [0, 0, None])
    for r, t, p in zip(records, truths, preds):
        if r["kind"] == "pairwise":
            if r["label"] == 0:
                continue
            right = common.pairwise_verdict(p["p"], ties=False) == r["label"]
        else:
            right = p["score"] == r["score"]
        c = counts[(r["task"], r["kind"], category(r["task"], r["kind"], t, r["label"], r["score"]))]
        c[0] += int(right)
        c[1] += 1
        if singles and r["id"] in singles:
            first, second = singles[r["id"]]
            c[2] = (c[2] or 0) + int((1 if first > second else 2) == r["label"])
    return {k: tuple(v) for k, v in sorted(counts.items())}


def table(counts: dict) -> str:
    lines = ["| task | kind | group | right | right by two single-item scores |", "|---|---|---|---|---|"]
    share = lambda right, n: f"{right}/{n} = {right / n:.0%}"
    for (task, kind, group), (right, n, by_singles) in counts.items():
        lines.append(f"| {task} | {kind} | {group} | {share(right, n)} | "
                     f"{'' if by_singles is None else share(by_singles, n)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/toy/reward", help="a toy judge (or base) checkpoint folder")
    ap.add_argument("--n", type=int, default=150, help="fresh examples per task and kind")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    common.set_seed(a.seed)
    device = common.get_device()
    model = common.load_model(a.model, device).eval()
    processor = common.load_processor(a.model)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        records, truths = fresh_examples(a.n, a.seed, Path(tmp))
        preds = common.judge_records(model, processor, records, tmp, device)
        pairs = [r for r in records if r["task"].endswith("generation") and r["kind"] == "pairwise"]
        alone = common.judge_records(model, processor, [s for r in pairs for s in single_items(r)], tmp, device)
        singles = {r["id"]: (a["expected"], b["expected"]) for r, a, b in zip(pairs, alone[::2], alone[1::2])}
    print(table(breakdown(records, truths, preds, singles)))


if __name__ == "__main__":
    main()
