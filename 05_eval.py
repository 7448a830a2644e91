"""Stage 5: evaluate the judge and the policy (paper section IV).

  1. The judge on the held-out reward benchmark, per task: pairwise accuracy with ties (tau) and
     without (diff), pointwise exact accuracy and Spearman correlation, and position consistency
     (the same verdict when the two items are swapped).
  2. The policy before and after DPO on held-out questions: ground-truth accuracy with 95% intervals,
     and the judge's win rate of the after-answer over the before-answer.
  3. Pair precision of stage 3's pairs: the share whose chosen is truly better.
  4. The generators before and after Diffusion-DPO, GenEval-style (Ghosh et al. 2023): samples of every
     toy caption at fixed seeds read back by toy/reader.py, the accuracy of each caption attribute and of
     all together with 95% intervals, and the judge's win rate of the after-sample over the before-sample.

    python 05_eval.py                     # toy: toy/base and everything under runs/toy -> runs/toy/eval
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import benchmarks
import common
import judging
import vlm


@dataclasses.dataclass
class Config:
    data_dir: str = "runs/toy/data"        # reward_test.jsonl, prompts_test.jsonl and media
    reward: str = "runs/toy/reward"        # the judge
    base_policy: str = "toy/base"          # the policy before DPO
    policy: str = "runs/toy/policy"        # the policy after DPO ("" = skip the policy section)
    pairs_dir: str = "runs/toy/pairs"      # stage 3 output, for pair precision ("" = skip)
    out_dir: str = "runs/toy/eval"         # results.json, results.md
    template: str = "short"                # judge prompt wording: short (toy) or paper (released)
    judge: str = "forward"                 # forward: one-pass readout; generate: generate + strict parsing
    benchmarks: str = ""                   # comma list of vlrewardbench, genai-image, genai-video, videogen,
                                           # each optionally =folder (else the hub); empty = the toy benchmark
    max_new_tokens: int = 24               # longest policy answer
    max_len: int = 0                       # longest example in tokens, never truncated: longer ones are skipped and counted
                                           # (0: by template, 2,048 for short, 13,000 for paper, the authors' cutoff)
    max_pixels: int = 0                    # pixels a picture is resized down to at most (0: by template: the checkpoint's own
                                           # for short, 262,144 for paper)
    frame_pixels: int = 0                  # pixels a video frame is resized down to at most (0: by template: the
                                           # checkpoint's own for short, 16,384 for paper)
    batch_size: int = 16                   # sequences per forward pass
    base_image_generator: str = "toy/generator_image"       # the picture generator before Diffusion-DPO
    image_generator: str = "runs/toy/generator_image"       # ... and after ("" = skip)
    base_video_generator: str = ""                           # the clip generator before, as toy/generator_video ("" = skip)
    video_generator: str = "runs/toy/generator_video"
    gen_seeds: int = 24                    # samples per caption, at seeds 03 never draws
    gen_steps: int = 20                    # denoising steps per sample, as 03
    guidance: float = 3.0                  # classifier-free guidance, as 03
    seed: int = 0

    def __post_init__(self):   # max_len, max_pixels, frame_pixels left at 0 take the template's limits
        vlm.template_limits(self)


# ---------------------------------------------------------------------------------------------
# metrics (pure functions of predictions, tested on hand-made values)

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)   # exact at k = 0 or n; clamp rounding error


def pairwise_metrics(p_ab, p_ba, labels) -> dict:
    """p_ab: (N, 3) [first, second, tie] judged in the given order; p_ba: the same pairs judged swapped,
    in *their* order (so its "first" is the original second). labels: 1, 2 or 0 (tie)."""
    p_ab, p_ba = np.asarray(p_ab, float), np.asarray(p_ba, float)
    back = p_ba[:, [1, 0, 2]]                        # swapped-order probabilities in the original order
    avg = (p_ab + back) / 2
    consistent = np.where(p_ab[:, 0] >= p_ab[:, 1], 1, 2) == np.where(back[:, 0] >= back[:, 1], 1, 2)
    return {**judging.pair_accuracy(avg.tolist(), list(labels)), "consistency": float(consistent.mean())}


def pointwise_metrics(expected, best, truth) -> dict:
    truth = np.asarray(truth, float)
    return {"exact": float((np.asarray(best, float) == truth).mean()), "spearman": judging.spearman(expected, truth),
            "n": int(len(truth))}


def normalize(answer: str) -> str:
    return " ".join(answer.lower().replace(".", " ").split())


# ---------------------------------------------------------------------------------------------

def evaluate_judge(cfg, device, skips) -> dict:
    model = vlm.load_model(cfg.reward, device).eval()
    processor = vlm.load_processor(cfg.reward, cfg.max_pixels, cfg.frame_pixels)
    path = Path(cfg.data_dir) / "reward_test.jsonl"
    records, media = [], []
    for r in common.read_jsonl(path, skips):
        why = common.check_record(r, cfg.data_dir)
        try:
            m = None if why else common.load_media(r["media"], cfg.data_dir)
        except common.MediaError as e:
            why = f"unreadable media: {e}"
        if why:
            skips.add(path, r.get("id"), why)
            continue
        records.append(r)
        media.append(m)
    out = {}
    for task in common.TASKS:
        pair = [i for i, r in enumerate(records) if r["task"] == task and r["kind"] == "pairwise"]
        point = [i for i, r in enumerate(records) if r["task"] == task and r["kind"] == "pointwise"]
        m = {}
        if pair:
            recs = [records[i] for i in pair]
            ab = judging.judge_pairwise(model, processor, recs, [media[i] for i in pair], device, cfg.template,
                                       both_orders=False, batch_size=cfg.batch_size, max_len=cfg.max_len)
            sw = [judging.swapped(records[i], media[i]) for i in pair]
            ba = judging.judge_pairwise(model, processor, [s[0] for s in sw], [s[1] for s in sw], device,
                                       cfg.template, both_orders=False, batch_size=cfg.batch_size, max_len=cfg.max_len)
            fit = fitting(recs, (ab + ba).sum(1), path, skips, cfg.max_len)
            if fit.any():
                m["pairwise"] = pairwise_metrics(ab[fit].numpy(), ba[fit].numpy(),
                                                 [r["label"] for r, f in zip(recs, fit) if f])
        if point:
            recs = [records[i] for i in point]
            e, b = judging.judge_pointwise(model, processor, recs, [media[i] for i in point], device, cfg.template,
                                          batch_size=cfg.batch_size, max_len=cfg.max_len)
            fit = fitting(recs, e, path, skips, cfg.max_len)
            if fit.any():
                m["pointwise"] = pointwise_metrics(e[fit].numpy(), b[fit].numpy(),
                                                   [r["score"] for r, f in zip(recs, fit) if f])
        if m:
            out[task] = m
    return out


def fitting(records, values, path, skips, max_len):
    """(N,) bool: the records whose judgment was read; those too long for max_len (NaN) are skipped."""
    fit = ~values.isnan()
    for r, f in zip(records, fit.tolist()):
        if not f:
            skips.add(path, r.get("id"), f"too long: the prompt and the verdict need more than {max_len} tokens")
    return fit


def policy_answers(cfg, device, skips) -> tuple[list[dict], list, dict[str, list[str]]]:
    """The held-out questions, their media, and the greedy answers of the policy before and after DPO:
    (prompts, media, {"before": [answer per prompt], "after": [...]}). Unreadable media are skipped."""
    path = Path(cfg.data_dir) / "prompts_test.jsonl"
    prompts, media = [], []
    for p in common.read_jsonl(path, skips):
        try:
            media.append(common.load_media(p["media"], cfg.data_dir))
            prompts.append(p)
        except common.MediaError as e:
            skips.add(path, p.get("id"), f"unreadable media: {e}")
    answers = {}
    for name, ckpt in (("before", cfg.base_policy), ("after", cfg.policy)):
        model = vlm.load_model(ckpt, device).eval()
        processor = vlm.load_processor(ckpt, cfg.max_pixels, cfg.frame_pixels)
        answers[name] = [a[0].strip() for a in vlm.generate(
            model, processor, [(m, p["question"]) for p, m in zip(prompts, media)], device, cfg.max_new_tokens,
            batch_size=cfg.batch_size)]
        del model
    return prompts, media, answers


def evaluate_policies(cfg, device, skips) -> dict:
    """Ground-truth accuracy of the policy before and after DPO on held-out questions, and the judge's
    win rate of after over before where the two answers differ."""
    prompts, media, answers = policy_answers(cfg, device, skips)
    judge = vlm.load_model(cfg.reward, device).eval()
    judge_proc = vlm.load_processor(cfg.reward, cfg.max_pixels, cfg.frame_pixels)
    out = {}
    for task in sorted({p["task"] for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if p["task"] == task]
        m = {}
        for name in ("before", "after"):
            k = sum(normalize(answers[name][i]) == normalize(prompts[i]["answer"]) for i in idx)
            m[name] = {"accuracy": k / len(idx), "ci95": wilson(k, len(idx)), "n": len(idx)}
        differ = [i for i in idx if normalize(answers["after"][i]) != normalize(answers["before"][i])]
        if differ:
            recs = [{"task": task, "kind": "pairwise", "prompt": prompts[i]["question"],
                     "responses": [answers["after"][i], answers["before"][i]]} for i in differ]
            p = judging.judge_pairwise(judge, judge_proc, recs, [media[i] for i in differ], device, cfg.template,
                                      batch_size=cfg.batch_size)
            wins = int((p[:, 0] > p[:, 1]).sum())
        else:
            wins = 0
        m["judge_win_rate"] = wins / len(differ) if differ else float("nan")
        m["changed_answers"] = len(differ)
        m["examples"] = [{"question": prompts[i]["question"], "truth": prompts[i]["answer"],
                          "before": answers["before"][i], "after": answers["after"][i]} for i in idx[:3]]
        out[task] = m
    return out


def pair_precision(cfg) -> dict:
    out = {}
    for name in ("pairs.jsonl", "gen_pairs.jsonl"):
        path = Path(cfg.pairs_dir) / name
        if not path.exists():
            continue
        for p in common.read_jsonl(path):
            if p.get("truly_better") is not None:
                t = out.setdefault(p["task"], [0, 0])
                t[0] += bool(p["truly_better"])
                t[1] += 1
    return {task: {"precision": k / n, "pairs": n} for task, (k, n) in out.items()}


def evaluate_generators(cfg, device) -> dict:
    """Each generator before vs after on every caption of the toy world (16 per medium) at cfg.gen_seeds
    fixed seeds: the toy's captions are all seen in training, so what is held out is the seeds (03
    seeds its samples by prompt id; these start at 10^9)."""
    import diffusion
    from toy import reader, world
    from toy.pretrain_generator import all_scenes
    judge = vlm.load_model(cfg.reward, device).eval()
    judge_proc = vlm.load_processor(cfg.reward, cfg.max_pixels, cfg.frame_pixels)
    out = {}
    for medium, before, after in (("image", cfg.base_image_generator, cfg.image_generator),
                                  ("video", cfg.base_video_generator, cfg.video_generator)):
        if not (before and after):
            continue
        scenes = all_scenes(medium)
        captions = [world.caption(medium, s) for s in scenes for _ in range(cfg.gen_seeds)]
        seeds = [10 ** 9 + k for _ in scenes for k in range(cfg.gen_seeds)]
        truth = [s for s in scenes for _ in range(cfg.gen_seeds)]
        samples, m = {}, {}
        for name, path in (("before", before), ("after", after)):
            gen = diffusion.load_generator(path, device)
            samples[name] = np.concatenate([diffusion.sample(gen, captions[i:i + 64], seeds[i:i + 64], cfg.gen_steps,
                                                             cfg.guidance, px=world.PX) for i in range(0, len(seeds), 64)])
            right = [reader.caption_right(medium, t, px) for t, px in zip(truth, samples[name])]
            m[name] = {}
            for attr in (*world.CAPTION_ATTRS[medium], "all"):
                k = sum(all(r.values()) if attr == "all" else r[attr] for r in right)
                m[name][attr] = {"accuracy": k / len(right), "ci95": wilson(k, len(right)), "n": len(right)}
        task = f"{medium}_generation"
        as_media = (lambda px: Image.fromarray(px)) if medium == "image" else (lambda px: common.Video(px, 8.0))   # the toy's 8 fps
        recs = [{"task": task, "kind": "pairwise", "prompt": c, "responses": []} for c in captions]
        p = judging.judge_pairwise(judge, judge_proc, recs, [[as_media(a), as_media(b)] for a, b in
                                                             zip(samples["after"], samples["before"])],
                                  device, cfg.template, batch_size=cfg.batch_size)
        m["judge_win_rate"] = float((p[:, 0] > p[:, 1]).float().mean())
        out[task] = m
    return out


# ---------------------------------------------------------------------------------------------
# the published reward benchmarks (../shared/FORMATS.md), judged with the same code as the toy
# the rows come from benchmarks.py; the judge, the order and the metrics are this stage's

def random_order(records, media, seed: int) -> tuple[list[dict], list]:
    """Each pair shown in a seeded random order, its label following (as the authors' scripts do):
    VL-RewardBench lists its better response first in almost every row, so a fixed order would reward
    a judge that always prefers the first."""
    rng = random.Random(seed)
    out_r, out_m = [], []
    for r, m in zip(records, media):
        if rng.random() < 0.5:
            r, m = judging.swapped(r, m)
            r = {**r, "label": {1: 2, 2: 1, 0: 0}[r["label"]]}
        out_r.append(r)
        out_m.append(m)
    return out_r, out_m


def run_benchmark(name, source, model, processor, cfg, device, skips) -> dict:
    rows, folder = benchmarks.load_rows(name, source)
    records, media = random_order(*benchmarks.benchmark_records(name, rows, folder, skips), cfg.seed)
    if cfg.judge == "generate":
        labels = judging.judge_by_generating(model, processor, records, media, device, cfg.template)
        probs = [None if lab is None else [float(lab == 1), float(lab == 2), float(lab == 0)] for lab in labels]
    else:
        p = judging.judge_pairwise(model, processor, records, media, device, cfg.template,
                                  batch_size=cfg.batch_size, max_len=cfg.max_len)
        fit = fitting(records, p.sum(1), f"{name}:{folder}", skips, cfg.max_len).tolist()
        records = [r for r, f in zip(records, fit) if f]
        probs = p[torch.tensor(fit, dtype=torch.bool)].tolist()
    unparsed = sum(p is None for p in probs)
    preds = [{"label": r["label"], "p": p or [0.0, 0.0, 0.0], "group": r.get("group")} for r, p in zip(records, probs)]
    return {**benchmark_metrics(name, preds), "n": len(preds), "unparsed": unparsed,
            "skipped": len(rows) - len(records)}


def benchmark_metrics(name, preds) -> dict:
    """VL-RewardBench: accuracy per group, Overall (correct / all) and Macro (mean of the groups).
    Generation benchmarks: tau (ties count, right only when the judge says tie) and diff (non-tie
    pairs; a tie verdict is wrong). An unparsed verdict (p all zero) is wrong in every metric; a metric
    over no items is nan (shown as n/a)."""
    if name == "vlrewardbench":   # no ties there: every accuracy is the one without ties (diff)
        groups = {}
        for p in preds:
            groups.setdefault(p["group"], []).append(p)
        acc = {g: judging.pair_accuracy([p["p"] for p in v], [p["label"] for p in v])["diff"]
               for g, v in sorted(groups.items())}
        return {"overall": judging.pair_accuracy([p["p"] for p in preds], [p["label"] for p in preds])["diff"],
                "macro": sum(acc.values()) / len(acc) if acc else float("nan"), "groups": acc,
                "group_sizes": {g: len(v) for g, v in groups.items()}}
    a = judging.pair_accuracy([p["p"] for p in preds], [p["label"] for p in preds])
    return {"tau": a["tau"], "diff": a["diff"], "ties": a["ties"]}


def benchmarks_markdown(results: dict) -> str:
    lines = ["## Reward benchmarks (this judge | paper, UnifiedReward LLaVA-OV-7B)", "",
             "| benchmark | metric | this judge | paper |", "|---|---|---|---|"]
    for name, m in results.items():
        for metric in ("overall", "macro") if name == "vlrewardbench" else ("tau", "diff"):
            lines.append(f"| {name} | {metric} | {pct(m[metric])} | {benchmarks.PAPER[name][metric]} |")
        if name == "vlrewardbench":
            lines += [f"| {name} | {g} (n={m['group_sizes'][g]}) | {pct(a)} | |" for g, a in m["groups"].items()]
    return "\n".join(lines) + "\n"


def pct(x) -> str:
    """A share as a percentage; n/a for a metric over no items (None or nan), never 0.0."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def to_markdown(results) -> str:
    lines = ["## Reward model (held-out toy benchmark)", "",
             "| task | pair diff | pair tau | consistency | point exact | point Spearman |", "|---|---|---|---|---|---|"]
    for task, m in results["judge"].items():
        pw, pt = m.get("pairwise", {}), m.get("pointwise", {})
        sp = pt.get("spearman")
        lines.append(f"| {task} | {pct(pw.get('diff'))} | {pct(pw.get('tau'))} | {pct(pw.get('consistency'))} | "
                     f"{pct(pt.get('exact'))} | {'n/a' if sp is None or math.isnan(sp) else f'{sp:.2f}'} |")
    if results.get("policy"):
        lines += ["", "## Policy before vs after DPO (held-out questions, greedy)", "",
                  "| task | before acc [95% CI] | after acc [95% CI] | judge win rate after vs before |",
                  "|---|---|---|---|"]
        for task, m in results["policy"].items():
            b, a = m["before"], m["after"]
            lines.append(f"| {task} | {pct(b['accuracy'])} [{pct(b['ci95'][0])}, {pct(b['ci95'][1])}] | "
                         f"{pct(a['accuracy'])} [{pct(a['ci95'][0])}, {pct(a['ci95'][1])}] | "
                         f"{pct(m['judge_win_rate'])} of {m['changed_answers']} changed |")
    if results.get("generators"):
        lines += ["", "## Generators before vs after Diffusion-DPO (every caption, fixed seeds, read by toy/reader.py)", "",
                  "| task | attribute | before [95% CI] | after [95% CI] |", "|---|---|---|---|"]
        for task, m in results["generators"].items():
            for attr in m["before"]:
                b, a = m["before"][attr], m["after"][attr]
                lines.append(f"| {task} | {attr} | {pct(b['accuracy'])} [{pct(b['ci95'][0])}, {pct(b['ci95'][1])}] | "
                             f"{pct(a['accuracy'])} [{pct(a['ci95'][0])}, {pct(a['ci95'][1])}] |")
            lines.append(f"| {task} | judge win rate after vs before | | {pct(m['judge_win_rate'])} |")
    if results.get("pair_precision"):
        lines += ["", "## Pair precision of stage 3 (chosen truly better)", "", "| task | precision | pairs |",
                  "|---|---|---|"]
        lines += [f"| {t} | {pct(m['precision'])} | {m['pairs']} |" for t, m in results["pair_precision"].items()]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    common.from_repository(cfg)
    common.set_seed(cfg.seed)
    device = common.get_device()
    common.require(cfg.reward, "--reward", "02_train_reward.py")
    if not cfg.benchmarks:
        common.require(Path(cfg.data_dir) / "reward_test.jsonl", "--data-dir", "01_prepare_data.py", hub_ok=False)
        for flag, value, stage in (("--base-policy", cfg.base_policy, "python -m toy.pretrain_base"),
                                   ("--policy", cfg.policy, "04_dpo.py"),
                                   ("--pairs-dir", cfg.pairs_dir, "03_build_pairs.py"),
                                   ("--image-generator", cfg.base_image_generator and cfg.image_generator, "04_dpo.py"),
                                   ("--video-generator", cfg.base_video_generator and cfg.video_generator, "04_dpo.py")):
            if value:
                common.require(value, flag, stage)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skips = common.SkipLog(out / "skipped.jsonl")
    if cfg.benchmarks:   # the published benchmarks instead of the toy one
        model = vlm.load_model(cfg.reward, device).eval()
        processor = vlm.load_processor(cfg.reward, cfg.max_pixels, cfg.frame_pixels)
        results = {}
        for item in cfg.benchmarks.split(","):
            name, _, source = item.partition("=")
            results[name] = run_benchmark(name, source, model, processor, cfg, device, skips)
        (out / "benchmarks.json").write_text(json.dumps(results, indent=1))
        md = benchmarks_markdown(results)
        (out / "benchmarks.md").write_text(md)
        print(md + skips.summary())
        return results
    results = {"judge": evaluate_judge(cfg, device, skips)}
    if cfg.policy:
        results["policy"] = evaluate_policies(cfg, device, skips)
    if cfg.pairs_dir:
        results["pair_precision"] = pair_precision(cfg)
    results["generators"] = evaluate_generators(cfg, device)
    results["skipped"] = skips.total
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    (out / "results.md").write_text(md)
    print(md + skips.summary())
    return results


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))
