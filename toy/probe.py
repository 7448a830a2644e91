"""Probe what a toy model perceives and what it can check against words.

The judge of stage 02 needs two skills per attribute: to *perceive* it (which colour, where, which way)
and to *check* it against a word in the prompt (is the square the caption's colour?). This probe asks,
on fresh toy scenes drawn from their own random stream:

  describe  "Describe the picture." -> is the attribute's true value in the greedy description?
  check     "Is the square red?"    -> is the greedy yes/no right? (half the questions want "no")
  quality   "Describe the picture." of a clean, noisy or blurry scene -> does the description name the
            defect (", noisy"), or none for a clean one? (No yes/no check: the base is not asked one.)
  one of two "Describe Video 2." with two different scenes in one prompt -> is the addressed one's
            value named? A pairwise judge sees each of its two candidates only beside the other.

A model that describes well but checks at chance (50%) lacks the comparison, which is what the judge
has to learn on top. toy/pretrain_base.py writes this table into toy/base/MANIFEST.json; it takes
a few seconds on a CPU.

    python -m toy.probe                                 # toy/base
    python -m toy.probe --model runs/toy/reward --n 400
"""
import argparse
import collections

import numpy as np
import torch

import common
import vlm
from toy import world


def probe_items(n: int, seed: int) -> list[dict]:
    """n scenes (alternately image and clip), each asked to be described and asked one yes/no check,
    the checked attribute cycling through the medium's attributes. Returns two dicts per scene:
    {medium, attr, kind: describe|check, media: [PIL image | Video], question, truth}, where a
    description's truth is the whole scene {attribute: value} and its attr is None."""
    rng = np.random.default_rng([seed, 31])
    items = []
    for i in range(n):
        medium = "image" if i % 2 == 0 else "video"
        attrs = world.attrs_of(medium)
        scene = world.sample_scene(medium, rng)
        media = [world.as_media(medium, world.render(medium, scene, None, rng))]
        items.append({"medium": medium, "attr": None, "kind": "describe", "media": media,
                      "question": world.DESCRIBE[medium], "truth": scene})
        attr = list(attrs)[i // 2 % len(attrs)]
        yes = bool(rng.random() < 0.5)
        value = scene[attr] if yes else str(rng.choice([v for v in attrs[attr] if v != scene[attr]]))
        items.append({"medium": medium, "attr": attr, "kind": "check", "media": media,
                      "question": world.check_question(attr, value), "truth": "yes" if yes else "no"})
    return items


def quality_items(n: int, seed: int) -> list[dict]:
    """n scenes (alternately image and clip) to describe, a third each clean, noisy and blurry, from a
    stream of their own (so the rows above stay the same). Their truth is {"quality": clean|noisy|blurry}:
    the base's descriptions name a defect (", noisy"), and a judge must see one to rank generated media."""
    rng = np.random.default_rng([seed, 37])
    items = []
    for i in range(n):
        medium = "image" if i % 2 == 0 else "video"
        defect = (None, *world.DEFECTS)[i // 2 % 3]
        pixels = world.render(medium, world.sample_scene(medium, rng), defect, rng)
        items.append({"medium": medium, "attr": None, "kind": "describe", "media": [world.as_media(medium, pixels)],
                      "question": world.DESCRIBE[medium],
                      "truth": {"quality": world.DEFECT_WORDS[defect] if defect else "clean"}})
    return items


def pair_items(n: int, seed: int) -> list[dict]:
    """n prompts (alternately two pictures and two clips) of independent scenes, the first or the second
    addressed by its label ("Describe Picture 1.", as the base is pretrained on), from a stream of their
    own. Truth: the addressed scene. A medium read well alone may be read worse beside another, and a
    pairwise judge sees its candidates only that way."""
    rng = np.random.default_rng([seed, 47])
    items = []
    for i in range(n):
        medium = "image" if i % 2 == 0 else "video"
        scenes = [world.sample_scene(medium, rng) for _ in range(2)]
        k = i // 2 % 2
        items.append({"medium": medium, "attr": None, "kind": "describe one of two",
                      "media": [world.as_media(medium, world.render(medium, sc, None, rng)) for sc in scenes],
                      "question": f"Describe {'Picture' if medium == 'image' else 'Video'} {k + 1}.",
                      "truth": scenes[k]})
    return items


def question_items(n: int, seed: int) -> list[dict]:
    """n scenes (alternately image and clip), each asked one of the policy's two-attribute questions,
    from a stream of their own. Truth: the right answer ("red, top"); the base should answer these
    imperfectly, so that DPO has room."""
    rng = np.random.default_rng([seed, 43])
    items = []
    for i in range(n):
        medium = "image" if i % 2 == 0 else "video"
        scene = world.sample_scene(medium, rng)
        question, asked = world.question_for(medium, rng)
        items.append({"medium": medium, "attr": "question", "kind": "answer",
                      "media": [world.as_media(medium, world.render(medium, scene, None, rng))],
                      "question": question, "truth": world.answer_text(scene, asked)})
    return items


def score(items: list[dict], outputs: list[str]) -> dict[str, float]:
    """Share right per "medium attribute kind" (e.g. "image colour check"). A description is right when
    it contains the value as whole words ("left" is not found in "top lefter"); a check or an answer when
    it is exactly right."""
    hits = collections.defaultdict(list)
    for it, out in zip(items, outputs):
        if it["kind"].startswith("describe"):
            words = f" {out.replace(',', ' ').strip()} "
            for attr, value in it["truth"].items():
                if value == "clean":   # right when no defect is named
                    right = not any(f" {w} " in words for w in world.DEFECT_WORDS.values())
                else:
                    right = f" {value} " in words
                hits[f"{it['medium']} {attr} {it['kind']}"].append(right)
        else:
            hits[f"{it['medium']} {it['attr']} {it['kind']}"].append(out.strip() == it["truth"])
    return {k: round(sum(v) / len(v), 4) for k, v in hits.items()}


def table(acc: dict[str, float]) -> str:
    """describe / check / describe one of two per attribute, naming defects (quality), answering the
    policy's questions."""
    lines = ["| medium | attribute | describe | check (yes/no) | describe one of two |", "|---|---|---|---|---|"]
    cell = lambda key: "-" if acc.get(key) is None else f"{acc[key]:.0%}"
    for key in dict.fromkeys(" ".join(k.split()[:2]) for k in acc):
        medium, attr = key.split()
        if attr == "question":
            lines.append(f"| {medium} | two-attribute question | answered {acc[key + ' answer']:.0%} | - | - |")
            continue
        lines.append(f"| {medium} | {attr} | {cell(key + ' describe')} | {cell(key + ' check')} | "
                     f"{cell(key + ' describe one of two')} |")
    return "\n".join(lines)


def run(model_dir, n: int = 240, seed: int = 0) -> dict[str, float]:
    """Probe a checkpoint folder on n scenes of each kind: {"medium attribute kind": share right}."""
    common.set_seed(seed)
    device = common.get_device()
    model = vlm.load_model(model_dir, device).eval()
    processor = vlm.load_processor(model_dir)
    items = probe_items(n, seed) + quality_items(n, seed) + question_items(n, seed) + pair_items(n, seed)
    with torch.no_grad():
        outputs = [o[0] for o in vlm.generate(model, processor, [(it["media"], it["question"]) for it in items],
                                                 device, max_new_tokens=16, batch_size=48)]
    return score(items, outputs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy/base", help="checkpoint folder (a toy base or judge)")
    ap.add_argument("--n", type=int, default=240, help="scenes of each kind (described and checked; questions)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(table(run(a.model, a.n, a.seed)))


if __name__ == "__main__":
    main()
