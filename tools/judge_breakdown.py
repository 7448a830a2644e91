"""Where a toy judge goes wrong: accuracy broken down by ground truth (run after 02).

02 reports one accuracy per task and kind. To see *what* a judge has not learned yet, this tool draws
fresh toy examples together with their ground truth (01's `judge_example`, from a stream of its own;
pixels go to a temporary folder), judges them exactly as 02 does, and groups the results:

  generation pairs     by what separates the two candidates: the attributes that one of them gets
                       right and the other wrong ("colour", "position", "colour+position"), or only
                       quality (both equally right, one of them noisy or blurry)
  understanding pairs  by the two attributes the question asks for
  single items         by the true score

For generation pairs it also ranks the two candidates by their single-item scores (each judged alone,
"Rate the image from 1 to 5."): where that column is right and the pairwise verdict is not, the judge
can check each candidate but has not learnt to compare two at once.

Last, clip directions: for fresh clips it scores the four answers "left/right/up/down, <true size>" to
"Which way does the square move and how big is it?" and tabulates, per true direction, which answer
scores highest and how often each gets full marks (the mistake behind 03's wrong clip-question pairs).

    python tools/judge_breakdown.py                              # runs/toy/reward, 150 per format
    python tools/judge_breakdown.py --model toy/base --n 40
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
import judging  # noqa: E402
import vlm  # noqa: E402

from toy import world as prep  # noqa: E402

stage2 = importlib.import_module("02_train_reward")


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
            right = judging.pairwise_verdict(p["p"], ties=False) == r["label"]
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


def direction_items(n: int, seed: int) -> tuple[list[dict], list, list[str]]:
    """n fresh clips, each asked about with the four direction answers (true size): 4n pointwise records
    (clip-major), their media, and the true direction of each clip."""
    rng = np.random.default_rng([seed, 59])
    records, media, truths = [], [], []
    question = prep.QUESTIONS[("direction", "size")]
    for _ in range(n):
        scene = prep.sample_scene("video", rng)
        clip = prep.as_media("video", prep.render("video", scene, None, rng))
        truths.append(scene["direction"])
        for d in prep.DIRECTIONS:
            records.append({"task": "video_understanding", "kind": "pointwise", "prompt": question,
                            "responses": [f"{d}, {scene['size']}"], "scale": list(prep.UND_SCALE)})
            media.append([clip])
    return records, media, truths


def direction_table(truths: list[str], expected, best) -> str:
    """expected, best: (4n,) expected and most likely scores of direction_items' records. Rows: true
    direction; per answer, how often it scores highest, and how often it gets full marks."""
    dirs, top = list(prep.DIRECTIONS), prep.UND_SCALE[1]
    expected, best = torch.as_tensor(expected).view(-1, 4), torch.as_tensor(best).view(-1, 4)
    lines = ["| true direction | clips | " + " | ".join(f"'{d}' highest / full marks" for d in dirs) + " |",
             "|---|---|" + "---|" * len(dirs)]
    for t in dirs:
        rows = [i for i, x in enumerate(truths) if x == t]
        if not rows:
            continue
        wins = collections.Counter(int(expected[i].argmax()) for i in rows)
        full = [sum(int(best[i, j] == top) for i in rows) for j in range(len(dirs))]
        lines.append(f"| {t} | {len(rows)} | " + " | ".join(f"{wins[j]} / {full[j]}" for j in range(len(dirs))) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/toy/reward", help="a toy judge (or base) checkpoint folder")
    ap.add_argument("--n", type=int, default=150, help="fresh examples per task and kind")
    ap.add_argument("--clips", type=int, default=120, help="fresh clips for the direction table")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    common.set_seed(a.seed)
    device = common.get_device()
    model = vlm.load_model(a.model, device).eval()
    processor = vlm.load_processor(a.model)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        records, truths = fresh_examples(a.n, a.seed, Path(tmp))
        preds = stage2.judge_records(model, processor, records, tmp, device)
        pairs = [r for r in records if r["task"].endswith("generation") and r["kind"] == "pairwise"]
        alone = stage2.judge_records(model, processor, [s for r in pairs for s in single_items(r)], tmp, device)
        singles = {r["id"]: (a["expected"], b["expected"]) for r, a, b in zip(pairs, alone[::2], alone[1::2])}
        d_records, d_media, d_truths = direction_items(a.clips, a.seed)
        expected, best = judging.judge_pointwise(model, processor, d_records, d_media, device)
    print(table(breakdown(records, truths, preds, singles)))
    print()
    print(direction_table(d_truths, expected, best))


if __name__ == "__main__":
    main()
