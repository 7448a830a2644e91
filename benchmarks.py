"""The published reward benchmarks (../shared/FORMATS.md) as unified pairwise records, for 05.

VL-RewardBench (image understanding), GenAI-Bench (image and video generation) and
VideoGen-RewardBench (video generation), read from the hub or from a local copy in the hub's layout
(parquet, json or jsonl files). Every row becomes a unified record (DESIGN.md section 4) with its
media loaded, so 05 judges them with the same code as the toy benchmark. A row that cannot be read is
skipped and named in the skip log, never dropped silently.
"""
from __future__ import annotations

import re
from pathlib import Path

import common


BENCHMARKS = {   # name -> (hub id, config, split)
    "vlrewardbench": ("MMInstruction/VL-RewardBench", None, "test"),
    "genai-image": ("TIGER-Lab/GenAI-Bench", "image_generation", "test"),
    "genai-video": ("TIGER-Lab/GenAI-Bench", "video_generation", "test"),
    "videogen": ("KwaiVGI/VideoGen-RewardBench", None, "eval"),
}
# the paper's numbers for the released judge (LLaVA-OneVision-7B backbone), for reference
PAPER = {"vlrewardbench": {"overall": 66.1, "macro": 66.5}, "genai-image": {"tau": 54.8, "diff": 70.9},
         "genai-video": {"tau": 60.7, "diff": 77.2}, "videogen": {"tau": 66.6, "diff": 79.3}}
VOTES = {"leftvote": 1, "rightvote": 2, "tievote": 0, "bothbad_vote": 0}
VL_GROUPS = {"hallucination": "Hallucination", "povid": "Hallucination", "rlhf": "Hallucination",
             "rlaif": "Hallucination", "mathverse": "Reasoning", "mmmu": "Reasoning",
             "wildvision": "General", "vlfeedback": "General"}


def benchmark_files(folder: Path, config: str | None, split: str) -> list[str]:
    """The parquet / json / jsonl files of one config and split in a local copy of a hub dataset:
    under <config>/ when there is such a folder, and named <split>-*, <split>.* or inside <split>/
    when any file is (GenAI-Bench holds test and test_v1 side by side); otherwise every file."""
    if config and (folder / config).is_dir():
        folder = folder / config
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
    of_split = [p for p in files if p.name.startswith(f"{split}-") or p.name.split(".")[0] == split
                or p.parent.name == split]
    return [str(p) for p in (of_split or files)]


def load_rows(name: str, source: str) -> tuple[list[dict], Path]:
    """Benchmark rows from a local folder (parquet / json / jsonl files in the hub layout) or the hub."""
    import datasets
    hub_id, config, split = BENCHMARKS[name]
    folder = Path(source) if source else None
    if folder and folder.is_dir():
        files = benchmark_files(folder, config, split)
        if not files:
            raise SystemExit(f"{name}: no parquet, json or jsonl file under {folder}")
        kind = "parquet" if files[0].endswith(".parquet") else "json"
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as e:   # datasets raises many types for an empty or unreadable file
            raise SystemExit(f"{name}: cannot read {', '.join(files)}: {type(e).__name__}: {e}") from None
    else:
        ds = datasets.load_dataset(source or hub_id, config, split=split)
        folder = Path(".")
    if len(ds) == 0:
        raise SystemExit(f"{name}: {source or hub_id} holds no rows")
    return list(ds), folder


def medium_of(value, folder: Path, name: str):
    """A benchmark's image or clip: a PIL image, {"bytes", "path"}, or a path relative to the folder."""
    from PIL import Image
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        import io
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or "://" in path:
        raise common.MediaError(f"{name}: medium {str(path)[:80]!r} is not a local file")
    return common.load_media([path], folder)[0]


def benchmark_records(name, rows, folder, skips) -> tuple[list[dict], list]:
    """Rows -> unified pairwise records (label 1, 2 or 0 = tie) and their media."""
    records, media = [], []
    for i, row in enumerate(rows):
        rid = str(row.get("id", i))
        try:
            if name == "vlrewardbench":
                ranking = row["human_ranking"]
                rec = {"task": "image_understanding", "prompt": row["query"], "responses": list(row["response"]),
                       "label": 1 if ranking[0] == 0 else 2, "group": VL_GROUPS.get(
                           re.split(r"[_-]", rid.lower())[0], "General")}
                m = [medium_of(row["image"], folder, name)]
            elif name.startswith("genai"):
                if row["vote_type"] not in VOTES:
                    raise ValueError(f"vote type {row['vote_type']!r} not in {sorted(VOTES)}")
                key = "image" if name == "genai-image" else "video"
                rec = {"task": f"{key}_generation", "prompt": row["prompt"], "responses": [],
                       "label": VOTES[row["vote_type"]]}
                # the hub names the columns left_video / right_video, the authors' data.json video_left / video_right
                left, right = ((row[f"{side}_{key}"] if f"{side}_{key}" in row else row[f"{key}_{side}"])
                               for side in ("left", "right"))
                m = [medium_of(left, folder, name), medium_of(right, folder, name)]
            else:
                overall = {"A": 1, "B": 2, "same": 0}
                if row["Overall"] not in overall:
                    raise ValueError(f"Overall {row['Overall']!r} not in A/B/same")
                rec = {"task": "video_generation", "prompt": row["prompt"], "responses": [],
                       "label": overall[row["Overall"]]}
                m = [medium_of(row["path_A"], folder, name), medium_of(row["path_B"], folder, name)]
        except (KeyError, ValueError, TypeError, common.MediaError) as e:
            skips.add(f"{name}:{folder}", rid, f"{type(e).__name__}: {e}")
            continue
        records.append({**rec, "id": rid, "kind": "pairwise"})
        media.append(m)
    return records, media
