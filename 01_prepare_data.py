"""Stage 1: preference data for the four tasks, merged into one format (paper section III-A, Table II).

UnifiedReward trains one judge on pairwise and pointwise preference data for image generation, image
understanding, video generation and video understanding, gathered from many released sources (HPD,
OIP, EvalMuse, LLaVA-Critic, VideoDPO, LiFT-HRA, VideoFeedback, ShareGPTVideo). This stage maps every
source into one stream of unified records (DESIGN.md section 4): task, kind, media, prompt, responses,
label or score, and the rendered judge question and answer. The records are the only thing stage 2 reads.

With no arguments it draws the embedded toy world instead (toy/world.py): synthetic 64x64 pictures and
8-frame clips of a coloured square whose ground truth is known, so every later stage can be checked
against the truth. The toy's judge records are published in the released layout (data/sources/) and
mapped back by the same reader as the released data. The toy also writes the policy's questions
(prompts_*.jsonl, for stages 3 and 5) and the generation prompts with their candidates
(gen_candidates.jsonl, for stage 3), which have no released counterpart.

    python 01_prepare_data.py                                  # toy world -> runs/toy/data
    python 01_prepare_data.py --data-dir CodeGoat24/UnifiedReward-Data --out-dir runs/real
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import numpy as np

import common
import judging
from toy import world

# ---------------------------------------------------------------------------------------------
# the released training data (../shared/FORMATS.md), mapped to the same unified records
#
# dataset/<Source>/[pairwise|pointwise/]train_data.json: a JSON list in the LLaVA conversation format
#   {"id", "image": "a.png" | [..], "images": [..] (more than 2 = frames of clips), "video": "x.mp4",
#    "conversations": [{"from": "human", "value": "<image>\n...prompt"}, {"from": "gpt", "value": "...verdict"}]}
# or the LLaMA-Factory copy: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "images": [..]}.

# source folder -> (task, kind, score scale, media folder inside the source)
SOURCES = {
    "EvalMuse/pairwise": ("image_generation", "pairwise", None, "images"),
    "EvalMuse/pointwise": ("image_generation", "pointwise", (1, 5), "images"),
    "HPD": ("image_generation", "pairwise", None, ""),
    "OIP": ("image_generation", "pairwise", None, ""),
    "LLaVA-critic/pairwise": ("image_understanding", "pairwise", None, ""),
    "LLaVA-critic/pointwise": ("image_understanding", "pointwise", (0, 100), ""),
    "VideoDPO": ("video_generation", "pairwise", None, ""),
    "LiFT-HRA": ("video_generation", "pointwise", (1, 10), ""),
    "VideoFeedback": ("video_generation", "pointwise", (1, 10), "frames"),
    "ShareGPTVideo/pairwise": ("video_understanding", "pairwise", None, "videos"),
    "ShareGPTVideo/pointwise": ("video_understanding", "pointwise", (1, 5), "videos"),
}
# the authors' mix (their train_data.yaml): every source in full except these two
AUTHORS_MIX = {"LLaVA-critic/pointwise": "random:25000", "OIP": "random:25000"}


class Unmappable(ValueError):
    """A released record that cannot be turned into a unified record; skipped, counted and named."""


def conversation(raw: dict) -> tuple[str, str]:
    """(human prompt, judge answer) from either released layout."""
    if "conversations" in raw:
        turns = {t.get("from"): t.get("value") for t in raw["conversations"]}
        human, gpt = turns.get("human"), turns.get("gpt")
    elif "messages" in raw:
        turns = {t.get("role"): t.get("content") for t in raw["messages"]}
        human, gpt = turns.get("user"), turns.get("assistant")
    else:
        raise Unmappable("no conversations/messages")
    if not isinstance(human, str) or not isinstance(gpt, str):
        raise Unmappable("malformed conversation: needs one human and one gpt turn")
    return human, gpt


def released_media(raw: dict, task: str, kind: str) -> tuple[list, int]:
    """The record's media as unified entries (a path, or a list of frame paths for a clip), and the
    number of files named. Frame lists: a pair of clips is split in two halves."""
    files = []
    for key in ("image", "images", "video", "videos"):
        v = raw.get(key)
        files += [v] if isinstance(v, str) else list(v or [])
    n_media = 2 if kind == "pairwise" and task.endswith("generation") else 1
    if task.startswith("video") and len(files) > n_media and not any(common.is_video(f) for f in files):
        if len(files) % n_media:
            raise Unmappable(f"{len(files)} frames cannot be split into {n_media} clips")
        k = len(files) // n_media
        return [files[i * k:(i + 1) * k] for i in range(n_media)], len(files)
    if len(files) != n_media:
        raise Unmappable(f"expected {n_media} media for {task} {kind}, found {len(files)}")
    return files, len(files)


def structured_fields(human: str, task: str) -> tuple[str, list[str]]:
    """Best-effort caption/question and the judged answers from the released prompt wording, used to
    re-render the pair in the other order at evaluation time; empty when the wording differs."""
    if task.endswith("generation"):   # the released wording, or the short one ("Caption: ...\n")
        m = re.search(r"Text (?:Caption|Prompt): \[(.*?)\]", human, re.S) or re.search(r"^Caption: (.*?)$", human, re.M)
        return (m.group(1) if m else ""), []
    q = re.search(r"Question: \[?(.*?)\]?\n", human, re.S)
    answers = re.findall(r"(?:Answer [12]|Response [12]|The (?:first|second) response|Response|Answer): "
                         r"\[?(.*?)\]?(?:\n|$)", human, re.S)
    return (q.group(1).strip() if q else ""), [a.strip() for a in answers]


def to_unified(raw: dict, source: str, media_root: Path, data_dir: Path, index: int) -> dict:
    """One released record -> one unified record (raises Unmappable with the reason)."""
    task, kind, scale, _ = {**SOURCES, **world.SOURCES}[source]
    human, gpt = conversation(raw)
    media, n_files = released_media(raw, task, kind)
    placeholders = human.count("<image>") + human.count("<video>")
    if placeholders > n_files:
        raise Unmappable(f"{placeholders} <image> placeholders but {n_files} media")
    verdict = judging.parse_verdict(gpt, task, kind, scale)
    if verdict is None:
        if kind == "pointwise" and re.search(r"Final Score:\s*-?\d", gpt):
            raise Unmappable(f"score outside scale {scale}: {gpt[-40:]!r}")
        raise Unmappable(f"no {kind} verdict in the answer: {gpt[-60:]!r}")
    rel = lambda p: os.path.relpath(media_root / p, data_dir)
    prompt, responses = structured_fields(human, task)
    return {"id": f"{source.replace('/', '-')}-{raw.get('id', index)}", "source": source, "task": task,
            "kind": kind, "media": [[rel(f) for f in m] if isinstance(m, list) else rel(m) for m in media],
            "prompt": prompt, "responses": responses,
            "label": verdict if kind == "pairwise" else None, "score": verdict if kind == "pointwise" else None,
            "scale": list(scale) if scale else None,
            "question": re.sub(r"\s*<(image|video)>\s*", " ", human).strip(), "answer": gpt}


def parse_mix(mix: str) -> dict[str, str]:
    """'all', 'authors', 'HPD=all,OIP=random:5000', or a yaml file in the authors' format
    (datasets: [{json_path: dataset/OIP/train_data.json, sampling_strategy: random:25000}, ...])."""
    if mix == "all":
        return {s: "all" for s in SOURCES}
    if mix == "authors":
        return {s: AUTHORS_MIX.get(s, "all") for s in SOURCES}
    if Path(mix).is_file():
        import yaml
        out = {}
        for d in yaml.safe_load(Path(mix).read_text())["datasets"]:
            src = str(Path(d["json_path"]).parent).split("dataset/")[-1]
            out[src] = d.get("sampling_strategy", "all")
        return out
    return dict(part.split("=") for part in mix.split(","))


def sample(items: list, strategy: str, rng) -> list:
    if strategy == "all":
        return items
    kind, _, n = strategy.partition(":")
    if kind != "random" or not n.isdigit():
        raise ValueError(f"unknown sampling strategy {strategy!r} (use all or random:N)")
    idx = sorted(rng.permutation(len(items))[:int(n)])
    return [items[i] for i in idx]


def write_released(cfg, data_dir: Path) -> list[dict]:
    """Map every released source in the mix to unified records; returns them (train and test)."""
    root = Path(cfg.data_dir)
    if not root.is_dir():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.data_dir) or Path(cfg.data_dir).exists():
            raise SystemExit(f"--data-dir {cfg.data_dir}: no such folder (a folder holding dataset/<Source>/"
                             "train_data.json, or a hub dataset id)")
        from huggingface_hub import snapshot_download   # a hub id: download when a network is there
        root = Path(snapshot_download(cfg.data_dir, repo_type="dataset"))
    if (root / "dataset").is_dir():
        root = root / "dataset"
    skips = common.SkipLog(data_dir / "skipped.jsonl")
    mix = parse_mix(cfg.mix)
    found = sorted(str(p.parent.relative_to(root)) for p in root.rglob("train_data.json"))
    if not any(src in SOURCES for src in found):
        raise SystemExit(f"no released source under {root}: expected <Source>/train_data.json for one of "
                         f"{', '.join(SOURCES)}")
    absent = [src for src in mix if src not in found]
    if absent and cfg.mix not in ("all", "authors"):
        raise SystemExit(f"--mix names sources that are not under {root}: {', '.join(absent)}")
    if absent:
        print(f"not under {root}, so not in the mix: {', '.join(absent)}")
    for src in found:
        if src not in SOURCES:
            skips.add(root / src / "train_data.json", None, f"unknown source folder: {src}")
    rng = np.random.default_rng(cfg.seed)
    records = []
    for src in [s for s in found if s in SOURCES and s in mix]:
        path = root / src / "train_data.json"
        records += sample(map_source(path, src, root / src.split("/")[0] / SOURCES[src][3], data_dir, skips),
                          mix[src], rng)
    records = deduplicate(records, skips)
    print(released_table(records))
    print(skips.summary())
    return records


def deduplicate(records: list[dict], skips) -> list[dict]:
    """A record repeated exactly is kept once (so it cannot land in both train and test), the others
    skipped and named; records that share an id but differ are kept under ids made unique ("#2")."""
    by_content, by_id, out = {}, {}, []
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k != "id"}, sort_keys=True)
        if key in by_content:
            skips.add(r["source"], r["id"], f"duplicate record: the same as {by_content[key]}")
            continue
        by_content[key] = r["id"]
        n = by_id[r["id"]] = by_id.get(r["id"], 0) + 1
        out.append(r if n == 1 else {**r, "id": f"{r['id']}#{n}"})
    renamed = sum(n - 1 for n in by_id.values())
    if renamed:
        print(f"{renamed} records shared an id with a different record and were renamed <id>#2, #3, ...")
    return out


def read_json_list(path, skips) -> list[tuple[int, object]]:
    """A released json file: a list of records, as (index in the file, record). Bytes that are not
    UTF-8 spoil only the records whose strings hold them (each skipped and named); a file that does not
    parse is skipped whole and named."""
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")   # bad bytes -> lone surrogates
    try:
        raw = json.loads(text)
    except ValueError as e:
        skips.add(path, None, f"malformed json: {e}")
        return []
    if not isinstance(raw, list):
        skips.add(path, None, f"malformed json: top level is {type(raw).__name__}, not a list")
        return []
    kept = []
    for i, r in enumerate(raw):
        if re.search(r"[\udc80-\udcff]", json.dumps(r, ensure_ascii=False)):
            skips.add(path, r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}", "not UTF-8: undecodable bytes")
        else:
            kept.append((i, r))
    return kept


def map_source(path: Path, src: str, media_root: Path, data_dir: Path, skips) -> list[dict]:
    """Every record of one released json file as a unified record; the others are skipped and named."""
    kept = []
    for i, r in read_json_list(path, skips):
        try:
            if not isinstance(r, dict):
                raise Unmappable("record is not an object")
            rec = to_unified(r, src, media_root, data_dir, i)
            why = common.check_record(rec, data_dir)
            if why:
                raise Unmappable(why)
            kept.append(rec)
        except Unmappable as e:
            skips.add(path, r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}", str(e))
    return kept


def released_table(records) -> str:
    """Records per source, task and kind."""
    lines = ["| source | task | kind | records |", "|---|---|---|---|"]
    for src in SOURCES:
        rs = [r for r in records if r["source"] == src]
        if rs:
            lines.append(f"| {src} | {rs[0]['task']} | {rs[0]['kind']} | {len(rs)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    out_dir: str = "runs/toy"        # data/ is written under this folder
    data_dir: str = ""               # released data (folder with dataset/<Source>/..., or a hub id); empty = toy
    mix: str = "authors"             # released data: all, authors, SRC=all|random:N,..., or the authors' yaml
    test_share: float = 0.01         # released data: share held out as reward_test.jsonl
    seed: int = 0                    # toy world: one seed for every split
    train_per_group: int = 1000      # toy: judge training records per task and kind (x8 groups)
    test_per_group: int = 150        # toy: held-out judge records per task and kind
    malformed: float = 0.2           # toy: share of training understanding answers rewritten in the wrong form
    policy_train: int = 200          # toy: understanding questions per medium for stage 03 (sampling + DPO)
    policy_test: int = 200           # toy: held-out understanding questions per medium for stage 05
    gen_prompts: int = 60            # toy: generation prompts per medium with candidates for stage 03
    gen_candidates: int = 10         # toy: candidates per generation prompt (the paper samples N=10)


def main(cfg: Config) -> None:
    common.from_repository(cfg)
    t0 = time.time()
    data = Path(cfg.out_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    if cfg.data_dir:   # the released data: map, mix, hold out a test share
        records = write_released(cfg, data)
        order = np.random.default_rng(cfg.seed).permutation(len(records))
        n_test = int(round(cfg.test_share * len(records)))
        common.write_jsonl(data / "reward_test.jsonl", [records[i] for i in order[:n_test]])
        common.write_jsonl(data / "reward_train.jsonl", [records[i] for i in order[n_test:]])
        print(f"{len(records) - n_test} train / {n_test} test records -> {data}  ({time.time() - t0:.0f}s)")
        return
    sizes = {f: getattr(cfg, f) for f in ("train_per_group", "test_per_group", "policy_train", "policy_test",
                                          "gen_prompts", "gen_candidates")}
    with world.MediaWriter(data) as writer:
        rows, n_bad = world.draw(cfg.seed, sizes, writer, cfg.malformed)
    # the judge records go out in the released layout and come back through the released reader
    world.write_sources({"train": rows.pop("reward_train"), "test": rows.pop("reward_test")}, data / "sources")
    skips = common.SkipLog(data / "skipped.jsonl")
    for split in ("train", "test"):
        rows[f"reward_{split}"] = [r for src, spec in world.SOURCES.items() for r in map_source(
            data / "sources" / src / f"{split}_data.json", src, data / "sources" / src.split("/")[0] / spec[3],
            data, skips)]
    for name, split in rows.items():
        common.write_jsonl(data / f"{name}.jsonl", split)
    train, test = rows["reward_train"], rows["reward_test"]
    print(skips.summary())
    print(count_table(train + test))
    print(f"toy world: {len(train)} train / {len(test)} test judge records, "
          f"{len(rows['prompts_train'])} + {len(rows['prompts_test'])} policy questions, "
          f"{len(rows['gen_candidates'])} generation prompts ({n_bad} training answers in the wrong form) "
          f"-> {data}  ({time.time() - t0:.0f}s)")


def count_table(records) -> str:
    """Records per task and kind, with the share of tied pairs."""
    lines = ["| task | pairwise | (ties) | pointwise |", "|---|---|---|---|"]
    for task in common.TASKS:
        pair = [r for r in records if r["task"] == task and r["kind"] == "pairwise"]
        point = [r for r in records if r["task"] == task and r["kind"] == "pointwise"]
        lines.append(f"| {task} | {len(pair)} | {sum(r['label'] == 0 for r in pair)} | {len(point)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))
