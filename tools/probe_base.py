"""Probe what a toy model perceives and what it can check against words (run after 01).

The judge of stage 02 needs two skills per attribute: to *perceive* it (which colour, where, which way)
and to *check* it against a word in the prompt (is the square the caption's colour?). This probe asks,
on fresh toy scenes drawn from their own random stream:

  describe  "Describe the picture." -> is the attribute's true value in the greedy description?
  check     "Is the square red?"    -> is the greedy yes/no right? (half the questions want "no")
  quality   "Describe the picture." of a clean, noisy or blurry scene -> does the description name the
            defect (", noisy"), or none for a clean one? (No yes/no check: the base is not asked one.)

A model that describes well but checks at chance (50%) lacks the comparison, which is what the judge
has to learn on top. It takes about a minute on a CPU, against ten for a judge run.

    python tools/probe_base.py                          # runs/toy/base
    python tools/probe_base.py --model runs/toy/reward --n 400
"""
import argparse
import collections
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

prep = importlib.import_module("01_prepare_data")


def probe_items(n: int, seed: int) -> list[dict]:
    """n scenes (alternately image and clip), each asked to be described and asked one yes/no check,
    the checked attribute cycling through the medium's attributes. Returns two dicts per scene:
    {medium, attr, kind: describe|check, media: [PIL image | Video], question, truth}, where a
    description's truth is the whole scene {attribute: value} and its attr is None."""
    rng = np.random.default_rng([seed, 31])
    items = []
    for i in range(n):
        medium = "image" if i % 2 == 0 else "video"
        attrs = prep.attrs_of(medium)
        scene = prep.sample_scene(medium, rng)
        media = [prep.as_media(medium, prep.render(medium, scene, None, rng))]
        items.append({"medium": medium, "attr": None, "kind": "describe", "media": media,
                      "question": prep.DESCRIBE[medium], "truth": scene})
        attr = list(attrs)[i // 2 % len(attrs)]
        yes = bool(rng.random() < 0.5)
        value = scene[attr] if yes else str(rng.choice([v for v in attrs[attr] if v != scene[attr]]))
        items.append({"medium": medium, "attr": attr, "kind": "check", "media": media,
                      "question": prep.check_question(attr, value), "truth": "yes" if yes else "no"})
    return items


def quality_items(n: int, seed: int) -> list[dict]:
    """n scenes (alternately image and clip) to describe, a third each clean, noisy and blurry, from a
    stream of their own (so the rows above stay the same). Their truth is {"quality": clean|noisy|blurry}:
    the base's descriptions name a defect (", noisy"), and a judge must see one to rank generated media."""
    rng = np.random.default_rng([seed, 37])
    items = []
    for i in range(n):
        medium = "image" if i % 2 == 0 else "video"
        defect = (None, *prep.DEFECTS)[i // 2 % 3]
        pixels = prep.render(medium, prep.sample_scene(medium, rng), defect, rng)
        items.append({"medium": medium, "attr": None, "kind": "describe", "media": [prep.as_media(medium, pixels)],
                      "question": prep.DESCRIBE[medium],
                      "truth": {"quality": prep.DEFECT_WORDS[defect] if defect else "clean"}})
    return items


def score(items: list[dict], outputs: list[str]) -> dict:
    """Share right per (medium, attribute, kind). A description is right when it contains the value as
    whole words ("left" is not found in "top lefter"); a check when the answer is exactly yes/no right."""
    hits = collections.defaultdict(list)
    for it, out in zip(items, outputs):
        if it["kind"] == "describe":
            words = f" {out.replace(',', ' ').strip()} "
            for attr, value in it["truth"].items():
                if value == "clean":   # right when no defect is named
                    right = not any(f" {w} " in words for w in prep.DEFECT_WORDS.values())
                else:
                    right = f" {value} " in words
                hits[(it["medium"], attr, "describe")].append(right)
        else:
            hits[(it["medium"], it["attr"], "check")].append(out.strip() == it["truth"])
    return {k: sum(v) / len(v) for k, v in hits.items()}


def table(acc: dict) -> str:
    lines = ["| medium | attribute | describe | check (yes/no) |", "|---|---|---|---|"]
    for medium, attr in dict.fromkeys((m, a) for m, a, _ in acc):
        check = acc.get((medium, attr, "check"))
        lines.append(f"| {medium} | {attr} | {acc[(medium, attr, 'describe')]:.0%} | "
                     + ("-" if check is None else f"{check:.0%}") + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/toy/base", help="checkpoint folder (a toy base or judge)")
    ap.add_argument("--n", type=int, default=240, help="scenes; each is described once and checked once")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    common.set_seed(a.seed)
    device = common.get_device()
    model = common.load_model(a.model, device).eval()
    processor = common.load_processor(a.model)
    items = probe_items(a.n, a.seed) + quality_items(a.n, a.seed)
    with torch.no_grad():
        outputs = [o[0] for o in common.generate(model, processor, [(it["media"], it["question"]) for it in items],
                                                 device, max_new_tokens=16, batch_size=48)]
    print(table(score(items, outputs)))


if __name__ == "__main__":
    main()
