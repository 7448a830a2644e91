"""Stage 3: build DPO preference pairs with the judge: pair ranking, then point sifting (paper III-C).

For each prompt the policy (or a generator) provides N=10 candidates. The judge then:
  1. pair ranking:  compares the fixed pairs (0,1), (2,3), ..., (8,9) and puts each winner in a
                    chosen list and each loser in a rejected list;
  2. point sifting: scores every candidate, and keeps argmax-score(chosen) vs argmin-score(rejected)
                    only if that chosen score is strictly higher; otherwise the prompt is dropped.
Understanding prompts: the policy samples the answers (temperature 0.7) -> pairs.jsonl for 04_dpo.py.
Generation prompts: a diffusers generator (--image-generator, --video-generator) samples the candidates
with diffusion.sample, the reverse-diffusion loop (DDIM timesteps -> UNet with and without the caption ->
classifier-free guidance -> scheduler.step), or they come from any model as a jsonl of
{"id", "task", "prompt", "media": [paths]} -> gen_pairs.jsonl in the Diffusion-DPO layout
({"caption", "jpg_0": chosen, "jpg_1": rejected, "label_0": 1, scores}; clips use "mp4_0"/"mp4_1").

    python 03_build_pairs.py                                   # toy: toy/base answers, runs/toy/reward judges
    python 03_build_pairs.py --reward CodeGoat24/UnifiedReward-qwen-3b --template paper --judge generate
    torchrun --nproc_per_node 8 03_build_pairs.py ...          # each GPU takes every 8th chunk of prompts
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
import diffusion
import judging
import vlm


@dataclasses.dataclass
class Config:
    data_dir: str = "runs/toy/data"    # prompts_train.jsonl, gen_candidates.jsonl and their media
    policy: str = "toy/base"           # the policy that answers: hub id or folder (any Qwen2.5-VL; "" = generation only)
    reward: str = "runs/toy/reward"    # the judge: hub id or folder
    out_dir: str = "runs/toy/pairs"    # candidates.jsonl, pairs.jsonl, gen_pairs.jsonl, sheet.png
    template: str = "short"            # judge prompt wording: short (toy) or paper (released judges)
    judge: str = "forward"             # forward: one-pass readout; generate: generate + strict parsing
    n_samples: int = 10                # candidates per prompt (paper: 10, ranked as 5 fixed pairs)
    temperature: float = 0.7           # policy sampling temperature (paper: 0.7)
    max_new_tokens: int = 24           # longest policy answer
    und_scale: str = "1,3"             # the judge's pointwise scale for answers (the toy's; LLaVA-Critic uses 0,100)
    gen_scale: str = "1,5"             # the judge's pointwise scale for generated media
    chunk: int = 16                    # prompts per chunk; output is appended after each chunk
    batch_size: int = 16               # sequences per forward pass
    max_len: int = 0                   # longest example in tokens, never truncated: longer ones are skipped and counted
                                       # (0: by template, 2,048 for short, 13,000 for paper, the authors' cutoff)
    max_pixels: int = 0                # pixels a picture is resized down to at most (0: by template: the checkpoint's own
                                       # for short, 262,144 for paper)
    frame_pixels: int = 0              # pixels a video frame is resized down to at most (0: by template: the
                                       # checkpoint's own for short, 16,384 for paper)
    image_generator: str = "toy/generator_image"  # samples the picture candidates: any diffusers text-to-image folder
                                       # or hub id ("" = the candidates listed in gen_candidates.jsonl)
    video_generator: str = ""          # an AnimateDiff-style folder for clips, as toy/generator_video ("" = the listed
                                       # candidates: sampling the toy's 600 clips costs minutes, so the default lists them)
    gen_steps: int = 20                # denoising steps per sample (DDIM)
    guidance: float = 3.0              # classifier-free guidance weight
    gen_px: int = 64                   # saved pictures are upscaled (nearest) to this size, the toy media's (0 = as sampled)
    seed: int = 0                      # sampling seed
    resume: bool = False               # continue an interrupted run: skip prompts already in candidates.jsonl
                                       # (without it, a run starts again and empties the outputs)

    def __post_init__(self):   # max_len, max_pixels, frame_pixels left at 0 take the template's limits
        vlm.template_limits(self)


# ---------------------------------------------------------------------------------------------
# pair ranking + point sifting, independent of where candidates and scores come from

# Scores that are floats from batched forward passes differ in the last digits with the padding: the same
# answer scores 1.6944278 once and 1.6944276 the next time. "Strictly higher" means higher by more than
# that noise, or two copies of one answer would make a pair.
SCORE_TOLERANCE = 1e-4


def rank_and_sift(n: int, first_wins, score):
    """The paper's selection for one prompt with n candidates.

    first_wins(i, j) -> True / False / None (None = the judge gave no usable verdict: pair unused);
    score(i) -> None, a number (the score the judge writes), or (written score, expected score): then the
    written score ranks, the expected score breaks its ties, and the strict filter compares written
    scores only, as the paper compares the integers its judge writes. Returns (chosen, rejected,
    chosen_list, rejected_list) or (None, None, ...) when the prompt is dropped (no ranked pair, or
    chosen score not strictly higher).
    """
    chosen_list, rejected_list = [], []
    for i in range(0, n - 1, 2):                  # fixed pairs (0,1), (2,3), ...
        verdict = first_wins(i, i + 1)
        if verdict is None:
            continue
        chosen_list.append(i if verdict else i + 1)
        rejected_list.append(i + 1 if verdict else i)
    as_key = lambda s: s if isinstance(s, tuple) else (s,)
    scored_c = [(as_key(score(i)), i) for i in chosen_list if score(i) is not None]
    scored_r = [(as_key(score(i)), i) for i in rejected_list if score(i) is not None]
    if not scored_c or not scored_r:
        return None, None, chosen_list, rejected_list
    best = max(scored_c, key=lambda t: (t[0], -t[1]))      # highest score (then expected), first index on ties
    worst = min(scored_r, key=lambda t: (t[0], t[1]))      # lowest score (then expected), first index on ties
    if not best[0][0] > worst[0][0] + SCORE_TOLERANCE:      # the strict filter: numbers, not strings
        return None, None, chosen_list, rejected_list
    return best[1], worst[1], chosen_list, rejected_list


class Judge:
    """The reward model behind one interface for both readouts: one forward pass or generate + parse."""

    def __init__(self, cfg, device):
        self.model = vlm.load_model(cfg.reward, device).eval()
        self.processor = vlm.load_processor(cfg.reward, cfg.max_pixels, cfg.frame_pixels)
        self.cfg, self.device = cfg, device
        self.judgments, self.seconds, self.unparsed, self.too_long = 0, 0.0, 0, 0
        self.memo = {}   # the vision tower's tokens of the media being judged (judge_prompts renews it)

    def pairs(self, records, media, mode=None) -> list:
        """-> per record True (first better) / False / None. mode overrides cfg.judge."""
        t = time.time()
        if (mode or self.cfg.judge) == "generate":
            labels = judging.judge_by_generating(self.model, self.processor, records, media, self.device,
                                                self.cfg.template)
            out = [None if lab in (None, 0) else lab == 1 for lab in labels]
            self.unparsed += sum(lab is None for lab in labels)
        else:
            p = judging.judge_pairwise(self.model, self.processor, records, media, self.device, self.cfg.template,
                                      batch_size=self.cfg.batch_size, max_len=self.cfg.max_len, memo=self.memo)
            long = p.isnan().any(1).tolist()           # too long to judge: the pair is not used
            self.too_long += sum(long)
            out = [None if bad else first for first, bad in zip((p[:, 0] >= p[:, 1]).tolist(), long)]
        self.seconds += time.time() - t
        self.judgments += len(records)
        return out

    def scores(self, records, media) -> list:
        """-> per record (written score, expected score) or None. Read in one forward pass, the written
        score is the most likely one (what greedy decoding would write); generate + parse reads only it."""
        t = time.time()
        if self.cfg.judge == "generate":
            out = judging.judge_by_generating(self.model, self.processor, records, media, self.device,
                                             self.cfg.template)
            self.unparsed += sum(s is None for s in out)
            out = [None if s is None else (s, s) for s in out]
        else:
            expected, written = judging.judge_pointwise(self.model, self.processor, records, media, self.device,
                                                       self.cfg.template, batch_size=self.cfg.batch_size,
                                                       max_len=self.cfg.max_len, memo=self.memo)
            self.too_long += int(expected.isnan().sum())
            out = [None if math.isnan(e) else (int(w), e) for w, e in zip(written.tolist(), expected.tolist())]
        self.seconds += time.time() - t
        self.judgments += len(records)
        return out


def scale(text: str) -> list[int]:
    lo, hi = (int(x) for x in text.split(","))
    return [lo, hi]


def judged_once(judge_fn, records, media) -> list:
    """judge_fn(records, media), each distinct judge sequence judged once. The tiny policy at temperature
    0.7 often repeats an answer (most of the toy's ten samples per question repeat another), and a
    prompt's identical answers make identical sequences; their verdicts are copied. A medium is the same
    object wherever it is shown (a prompt's picture, a sampled candidate), so object identity names it."""
    slot, firsts, which = {}, [], []
    for i, (r, m) in enumerate(zip(records, media)):
        key = (r["task"], r["kind"], r["prompt"], tuple(r["responses"]), tuple(r.get("scale", ())),
               tuple(map(id, m)))
        if key not in slot:
            slot[key] = len(firsts)
            firsts.append(i)
        which.append(slot[key])
    out = judge_fn([records[i] for i in firsts], [media[i] for i in firsts]) if firsts else []
    return [out[k] for k in which]


def judge_prompts(judge, items, cfg) -> list[tuple]:
    """Rank and sift the candidates of several prompts, judged together: every pairwise sequence of
    every prompt in one call, then every pointwise one, so the forward passes are full batches and a
    medium shown by several sequences is encoded by the tower once.

    items: (task, prompt, media, answers) with answers the understanding responses (media shared) or
    None for generation (media are the candidates). Returns per item rank_and_sift's output, the
    pairwise verdicts, and the written and expected scores."""
    pair_recs, pair_media, point_recs, point_media, sizes = [], [], [], [], []
    judge.memo = {}   # these prompts' media: shown in both orders and scored alone, the tower runs once each
    for task, prompt, media, answers in items:
        n = len(answers) if answers is not None else len(media)
        sizes.append(n)
        for i in range(0, n - 1, 2):
            if answers is not None:
                pair_recs.append({"task": task, "kind": "pairwise", "prompt": prompt,
                                  "responses": [answers[i], answers[i + 1]]})
                pair_media.append(media)
            else:
                pair_recs.append({"task": task, "kind": "pairwise", "prompt": prompt, "responses": []})
                pair_media.append([media[i], media[i + 1]])
        sc = scale(cfg.gen_scale if answers is None else cfg.und_scale)
        point_recs += [{"task": task, "kind": "pointwise", "prompt": prompt, "scale": sc,
                        "responses": [answers[i]] if answers is not None else []} for i in range(n)]
        point_media += [media if answers is not None else [media[i]] for i in range(n)]
    all_wins = judged_once(judge.pairs, pair_recs, pair_media)
    all_scores = judged_once(judge.scores, point_recs, point_media)
    out, w, s = [], 0, 0
    for n in sizes:
        wins, scores = all_wins[w:w + n // 2], all_scores[s:s + n]
        w, s = w + n // 2, s + n
        result = rank_and_sift(n, lambda i, j: wins[i // 2], lambda i: scores[i])
        written = [None if x is None else x[0] for x in scores]
        expected = [None if x is None else round(x[1], 4) for x in scores]
        out.append((result, wins, written, expected))
    return out


# ---------------------------------------------------------------------------------------------
# generation: N samples of each caption from a diffusers generator (paper section III-D)

def sample_candidates(gen, rows, cfg, data: Path, out: Path, skips, gen_path) -> list[tuple[dict, list[str]]]:
    """Draw cfg.n_samples candidates for each row's caption with diffusion.sample (the reverse-diffusion
    loop: scheduler timesteps -> UNet with and without the caption -> scheduler.step), seeded by the
    row's id and the sample's index, so a resumed run draws the same ones; each is written as it is
    made (out/samples/<id>_<k>.png or .mp4) and a file already there is kept. A caption the generator's
    tokenizer cannot encode is skipped and counted. Returns (row, media paths relative to data)."""
    done = []
    for g in rows:
        why = diffusion.check_caption(gen, g["prompt"])
        if why:
            skips.add(gen_path, g["id"], why)
            continue
        suffix = "png" if gen.medium == "image" else "mp4"
        paths = [out / "samples" / f"{g['id']}_{k}.{suffix}" for k in range(cfg.n_samples)]
        todo = [k for k, path in enumerate(paths) if not path.exists()]
        if todo:
            base = cfg.seed * 1_000_003 + int(hashlib.sha256(g["id"].encode()).hexdigest()[:8], 16)
            pixels = diffusion.sample(gen, [g["prompt"]] * len(todo), [base + k for k in todo], cfg.gen_steps,
                                      cfg.guidance, px=cfg.gen_px or None)
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            for k, px in zip(todo, pixels):
                if gen.medium == "image":
                    Image.fromarray(px).save(paths[k])
                else:
                    from toy.world import write_mp4   # PyAV, the clip writer the toy world uses
                    write_mp4(px, paths[k])
        done.append((g, [os.path.relpath(path, data) for path in paths]))
    return done


# ---------------------------------------------------------------------------------------------
# ground truth of the toy world, for pair precision

def read_truth(row: dict, media: list) -> list[int] | None:
    """How many caption attributes each sampled candidate shows, read from its pixels by the toy's
    ground-truth reader (toy/reader.py); None for prompts outside the toy world (no "scene")."""
    if "scene" not in row:
        return None
    from toy import reader
    medium = row["task"].split("_")[0]
    return [sum(reader.caption_right(medium, row["scene"], np.asarray(m) if medium == "image"
                                     else np.stack(m.frames)).values()) for m in media]


def n_right(answer: str, prompt_row: dict) -> int | None:
    """How many asked attributes a policy answer gets right ("red, top"); None without truth."""
    if "scene" not in prompt_row:
        return None
    values = [v.strip() for v in answer.split(",")]
    truth = [prompt_row["scene"][a] for a in prompt_row["asked"]]
    return sum(v == t for v, t in zip(values, truth)) if len(values) == len(truth) else 0


def contact_sheet(rows, data_dir, path, n=6) -> None:
    """A few kept pairs, chosen left and rejected right, with their scores (PIL only)."""
    rows = rows[:n]
    if not rows:
        return
    cell, pad = 96, 18
    sheet = Image.new("RGB", (2 * cell + 3 * 4, len(rows) * (cell + pad) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(rows):
        for side, key in enumerate(("chosen", "rejected")):
            m = common.load_media([r[key + "_media"]], data_dir)[0]
            img = Image.fromarray(m.frames[len(m.frames) // 2]) if isinstance(m, common.Video) else m
            x, y = 4 + side * (cell + 4), 4 + k * (cell + pad)
            sheet.paste(img.resize((cell, cell)), (x, y))
            draw.text((x, y + cell + 2), f"{key[:3]} {r[key + '_score']:g}", fill="black")
    sheet.save(path)


# ---------------------------------------------------------------------------------------------

def resume_outputs(out: Path) -> set[str]:
    """The prompts an interrupted run finished, and its outputs made whole again. A prompt is finished
    when its line in candidates.jsonl is complete (each prompt's pair is written before it): a torn
    last line is cut off, and a pair whose prompt was not finished is dropped, to be made again."""
    cands = out / "candidates.jsonl"
    done: set[str] = set()
    if cands.exists():
        lines = cands.read_bytes().splitlines(keepends=True)
        whole = [line for line in lines if line.endswith(b"\n")]      # a torn line has no newline yet
        done = {json.loads(line)["id"] for line in whole}
        cands.write_bytes(b"".join(whole))
    for name in ("pairs.jsonl", "gen_pairs.jsonl"):
        path = out / name
        if path.exists():
            rows = [line for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
            path.write_bytes(b"".join(line for line in rows if json.loads(line)["id"] in done))
    return done


def merge_ranks(out: Path, world: int, order: list[str]) -> None:
    """Under torchrun each rank wrote its chunks' lines into out/rank{r}/: put them together in out/, in
    the order of the input prompts, as one process would have written them (each chunk is sampled from
    a seed of its own, so the lines are the same whichever rank made them)."""
    position = {pid: i for i, pid in enumerate(order)}
    for name in ("candidates.jsonl", "pairs.jsonl", "gen_pairs.jsonl", "skipped.jsonl"):
        rows = [r for k in range(world) for r in common.read_jsonl(out / f"rank{k}" / name)]
        if name == "skipped.jsonl":   # every rank read the same input files: a bad line is logged once
            rows = list({json.dumps(r, sort_keys=True): r for r in rows}.values())
        else:
            rows.sort(key=lambda r: position[r["id"]])
        common.write_jsonl(out / name, rows)


def main(cfg: Config) -> dict:
    common.from_repository(cfg)
    common.set_seed(cfg.seed)
    device = common.get_device()
    rank, world = common.init_distributed()   # 0, 1 unless started by torchrun
    out, data = Path(cfg.out_dir), Path(cfg.data_dir)
    common.require(data / "prompts_train.jsonl", "--data-dir", "01_prepare_data.py", hub_ok=False)
    common.require(cfg.reward, "--reward", "02_train_reward.py")
    if cfg.policy:
        common.require(cfg.policy, "--policy", "python -m toy.pretrain_base")
    root = common.output_dir(out)
    out = common.output_dir(root / f"rank{rank}") if world > 1 else root   # this rank's lines
    cand_path = out / "candidates.jsonl"
    if cfg.resume:
        if not cand_path.exists():
            raise SystemExit(f"--resume: nothing to resume in {out} (no candidates.jsonl)")
        done = resume_outputs(out)
        print(f"resuming: {len(done)} prompts already judged in {cand_path}")
    else:
        done = set()
        for name in ("candidates.jsonl", "pairs.jsonl", "gen_pairs.jsonl"):
            (out / name).write_text("")
    skips = common.SkipLog(out / "skipped.jsonl", resume=cfg.resume)
    judge = Judge(cfg, device)
    if cfg.policy:
        policy = vlm.load_model(cfg.policy, device).eval()
        policy_proc = vlm.load_processor(cfg.policy, cfg.max_pixels, cfg.frame_pixels)

    # --- understanding: the policy answers, the judge ranks and sifts -----------------------------
    # Each chunk of prompts is sampled from a seed of its own, all of it, even when some of its prompts
    # were finished before an interruption: a resumed run then draws exactly the answers of one that
    # was never stopped (a batch's samples depend on the whole batch and on the random state).
    prompts = common.read_jsonl(data / "prompts_train.jsonl", skips) if cfg.policy else []
    for c in range(0, len(prompts), cfg.chunk):
        if (c // cfg.chunk) % world != rank or all(p["id"] in done for p in prompts[c:c + cfg.chunk]):
            continue
        chunk, media = [], []
        for p in prompts[c:c + cfg.chunk]:
            try:
                media.append(common.load_media(p["media"], data))
                chunk.append(p)
            except common.MediaError as e:
                skips.add(data / "prompts_train.jsonl", p["id"], f"unreadable media: {e}")
        torch.manual_seed(cfg.seed * 1_000_003 + c)
        samples = vlm.generate(policy, policy_proc, [(m, p["question"]) for p, m in zip(chunk, media)], device,
                                  cfg.max_new_tokens, cfg.temperature, cfg.n_samples, cfg.batch_size)
        todo = [(p, m, [a.strip() for a in answers]) for p, m, answers in zip(chunk, media, samples)
                if p["id"] not in done]
        judged = judge_prompts(judge, [(p["task"], p["question"], m, answers) for p, m, answers in todo], cfg)
        for (p, m, answers), ((ch, rj, cl, rl), wins, scores, expected) in zip(todo, judged):
            truth = [n_right(a, p) for a in answers]
            if ch is not None:
                common.append_jsonl(out / "pairs.jsonl", {
                    "id": p["id"], "task": p["task"], "media": p["media"], "prompt": p["question"],
                    "chosen": answers[ch], "rejected": answers[rj],
                    "chosen_score": scores[ch], "rejected_score": scores[rj],
                    "truly_better": None if truth[ch] is None else truth[ch] > truth[rj]})
            common.append_jsonl(cand_path, {
                "id": p["id"], "task": p["task"], "samples": answers, "distinct": len(set(answers)),
                "pair_first_wins": wins, "scores": scores, "expected": expected, "truth_right": truth, "chosen": ch, "rejected": rj})
        print(f"  understanding: {min(c + cfg.chunk, len(prompts))}/{len(prompts)} prompts")

    # --- generation: candidates from a generator, the judge ranks and sifts -------------------------
    gen_path = data / "gen_candidates.jsonl"
    gen_all = common.read_jsonl(gen_path, skips) if gen_path.exists() else []
    gen_rows = [g for g in gen_all if g["id"] not in done]
    generators, sample_seconds = {}, [0.0]
    for task, source in (("image_generation", cfg.image_generator), ("video_generation", cfg.video_generator)):
        if source:
            common.require(source, f"--{task.split('_')[0]}-generator",
                           f"python -m toy.pretrain_generator --medium {task.split('_')[0]}")
            generators[task] = diffusion.load_generator(source, device)
    for c in range(0, len(gen_rows), cfg.chunk):
        if (c // cfg.chunk) % world != rank:
            continue
        chunk, media, rows = [], [], gen_rows[c:c + cfg.chunk]
        sampled = [r for r in rows if r["task"] in generators]
        for task, gen in generators.items():   # sampled candidates replace the listed ones
            t = time.time()
            made = dict((g["id"], m) for g, m in sample_candidates(gen, [r for r in sampled if r["task"] == task],
                                                                   cfg, data, root, skips, gen_path))
            sample_seconds[0] += time.time() - t
            rows = [dict(r, media=made[r["id"]], truth=None, sampled=True) if r["id"] in made else r
                    for r in rows if r["task"] != task or r["id"] in made]
        for g in rows:
            if len(g.get("media", [])) < 2:
                skips.add(gen_path, g.get("id"), f"fewer than two candidates ({len(g.get('media', []))})")
                continue
            try:
                media.append(common.load_media(g["media"], data))
                chunk.append(g)
            except common.MediaError as e:
                skips.add(gen_path, g["id"], f"unreadable candidate: {e}")
        judged = judge_prompts(judge, [(g["task"], g["prompt"], m, None) for g, m in zip(chunk, media)], cfg)
        for g, m, ((ch, rj, cl, rl), wins, scores, expected) in zip(chunk, media, judged):
            truth = g.get("truth") or (read_truth(g, m) if g.get("sampled") else None)
            if ch is not None:
                key = "jpg" if g["task"] == "image_generation" else "mp4"
                common.append_jsonl(out / "gen_pairs.jsonl", {
                    "id": g["id"], "task": g["task"], "caption": g["prompt"], f"{key}_0": g["media"][ch],
                    f"{key}_1": g["media"][rj], "label_0": 1, "chosen_score": scores[ch], "rejected_score": scores[rj],
                    # a sampled pair whose candidates show as many caption attributes is not ordered by the reader
                    "truly_better": None if truth is None or (g.get("sampled") and truth[ch] == truth[rj])
                    else truth[ch] > truth[rj]})
            common.append_jsonl(cand_path, {"id": g["id"], "task": g["task"], "samples": g["media"],
                                            "pair_first_wins": wins, "scores": scores, "expected": expected,
                                            "truth_score": truth, "chosen": ch, "rejected": rj})

    if world > 1:   # rank 0 puts the ranks' lines together and reports on them
        common.barrier()
        totals = common.all_sum([judge.judgments, judge.seconds / world, judge.unparsed, judge.too_long])
        judge.judgments, judge.seconds, judge.unparsed, judge.too_long = int(totals[0]), totals[1], *map(int, totals[2:])
        if rank > 0:
            return {}
        merge_ranks(root, world, [p["id"] for p in prompts] + [g["id"] for g in gen_all])
        skips = common.SkipLog(root / "skipped.jsonl", resume=True)
    report = summarize(cfg, root, judge, skips)
    report["sampling_generators_s"] = round(sample_seconds[0], 1)
    if generators:
        print(f"sampling the generation candidates took {sample_seconds[0]:.0f}s")
    common.write_jsonl(root / "report.jsonl", [report])
    return report


def summarize(cfg, out, judge, skips) -> dict:
    """Kept and dropped prompts, duplicates, judgment speed and (toy) pair precision, per task."""
    cands = common.read_jsonl(out / "candidates.jsonl")
    pairs = common.read_jsonl(out / "pairs.jsonl") + common.read_jsonl(out / "gen_pairs.jsonl")
    report = {"tasks": {}}
    for task in sorted({c["task"] for c in cands}):
        cs = [c for c in cands if c["task"] == task]
        ps = [p for p in pairs if p["task"] == task]
        known = [p["truly_better"] for p in ps if p.get("truly_better") is not None]
        report["tasks"][task] = {
            "prompts": len(cs), "kept": len(ps), "dropped": len(cs) - len(ps),
            "duplicate_samples": sum(len(c["samples"]) - c.get("distinct", len(c["samples"])) for c in cs),
            "pair_precision": sum(known) / len(known) if known else None, "pairs_with_truth": len(known)}
    report["judgments_per_s"] = judge.judgments / max(judge.seconds, 1e-9)
    report["unparsed_verdicts"] = judge.unparsed
    report["too_long_to_judge"] = judge.too_long
    report["skipped"] = skips.total
    for task, m in report["tasks"].items():
        prec = "-" if m["pair_precision"] is None else f"{100 * m['pair_precision']:.1f}%"
        print(f"{task}: kept {m['kept']}/{m['prompts']} prompts (dropped {m['dropped']}), "
              f"{m['duplicate_samples']} duplicate samples, pair precision {prec} (of {m['pairs_with_truth']})")
    print(f"{report['judgments_per_s']:.1f} judgments/s ({cfg.judge}); unparsed verdicts {judge.unparsed}; "
          f"too long to judge {judge.too_long}; {skips.summary()}")
    contact_sheet([{"chosen_media": p.get("jpg_0") or p.get("mp4_0"), "rejected_media": p.get("jpg_1") or p.get("mp4_1"),
                    "chosen_score": p["chosen_score"], "rejected_score": p["rejected_score"]}
                   for p in common.read_jsonl(out / "gen_pairs.jsonl")], cfg.data_dir, out / "sheet.png")
    return report


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))
    common.exit_distributed()   # under torchrun; a single process just ends
