"""When does the base learn to check? Probe yes/no checks during 01's pretraining (no data written).

The judge of stage 02 inherits the base's checking: whether "Is the square red?" gets the right yes/no.
From random weights the checks sit at chance (the model answers all "yes" or all "no") until they jump
(DESIGN.md 5a), and when that happens depends on the seed. This tool runs 01's pretraining with any of
01's options and, every `--every` steps, asks the model

  single checks   "Is the square red?", "Does the square move left?" (tools/probe_base.py's items:
                  per attribute, 40 scenes, half of them wanting "no")
  caption checks  "Is it a red square at the top?" (80 scenes per medium, about half "no")

and reads each answer from one forward pass (P(yes) against P(no)). It prints one json line per probe
and writes them all to --log. The toy world is drawn as 01 draws it (so the tokenizer and the base are
01's own, step for step) but no media are written. By default it runs the first phase only.

    python tools/check_curve.py --seed 1 --log runs/curve_s1.jsonl                # 01's recipe, seed 1
    python tools/check_curve.py --seed 1 --base-lr 2e-3 --log runs/curve_lr_s1.jsonl   # a variant
(2,000 first-phase steps and 8 probes: 6 minutes on a 2-core CPU, 8 when two runs share it)
"""
import dataclasses
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

prep = importlib.import_module("01_prepare_data")
probe = importlib.import_module("probe_base")


@dataclasses.dataclass
class Config(prep.Config):
    every: int = 250                  # pretraining steps between probes
    quality_steps: int = 0            # second pretraining phase (01's default: 800); 0 = the first phase only
    log: str = "runs/check_curve.jsonl"   # one json line per probe (the base itself is not kept: --out-dir is unused)


class DryWriter(prep.MediaWriter):
    """01's MediaWriter without the files: same paths and the same split checks, nothing written.
    (It skips the parent's __init__, whose only other job is to start the clip-encoding process.)"""

    def __init__(self):
        self.owner = {}

    def write(self, pixels, rel: str) -> str:
        return rel


def check_items(seed: int = 0) -> list[dict]:
    """probe_base's single checks (240 scenes) and 160 caption checks, alternately picture and clip."""
    items = [it for it in probe.probe_items(240, seed) if it["kind"] == "check"]
    rng = np.random.default_rng([seed, 41])
    for i in range(160):
        medium = "image" if i % 2 == 0 else "video"
        scene = prep.sample_scene(medium, rng)
        media = [prep.as_media(medium, prep.render(medium, scene, None, rng))]
        question, truth = prep.caption_check(medium, scene, rng)
        items.append({"medium": medium, "attr": "caption", "media": media, "question": question, "truth": truth})
    return items


def accuracy(model, processor, items) -> dict:
    """{"image colour": % right, ...}: the answer is "yes" when P(yes) > P(no), from one forward pass."""
    model.eval()
    with torch.no_grad():
        p = common.answer_probs(model, processor, [(it["media"], it["question"]) for it in items], ["yes", "no"],
                                next(model.parameters()).device, batch_size=48)
    model.train()
    hits = {}
    for it, (yes, no) in zip(items, p.tolist()):
        hits.setdefault(f"{it['medium']} {it['attr']}", []).append(("yes" if yes > no else "no") == it["truth"])
    return {k: round(100 * sum(v) / len(v)) for k, v in hits.items()}


def main(cfg: Config) -> None:
    _, corpus, _ = prep.toy_world(cfg, DryWriter())
    items = check_items()
    log = Path(cfg.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    t0 = time.time()

    def on_step(phase, step, model, processor):
        if step % cfg.every == 0:
            row = {"phase": phase, "step": step, "s": round(time.time() - t0), **accuracy(model, processor, items)}
            print(json.dumps(row), flush=True)
            common.append_jsonl(log, row)

    with tempfile.TemporaryDirectory() as tmp:
        prep.pretrain_base(cfg, corpus, Path(tmp) / "base", on_step)


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))
