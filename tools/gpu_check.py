"""GPU smoke test at real scale: a random-weight Qwen2.5-VL of the 3B shape, 20 training
steps of 02 on a few hundred toy records, then 05's judge evaluation on the toy test set.
Prints tokens/s, peak GPU memory and any failure. Run on a CUDA machine:

    python tools/gpu_check.py --out runs/gpu_check
    python tools/gpu_check.py --tiny --out runs/gpu_check_tiny     # the same path on CPU, tiny shape
"""
import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from toy.tiny_vlm import TINY, build_tiny_vlm  # noqa: E402

# Qwen2.5-VL-3B-Instruct's shape (its config.json): text 2048 x 36 layers, 16 heads / 2 KV heads,
# vocab 151,936, tied embeddings; vision 1280 x 32 blocks, patch 14, window attention except 4 blocks.
QWEN_3B = dict(text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2, text_ffn=11008,
               vision_hidden=1280, vision_depth=32, vision_heads=16, vision_ffn=3420, patch=14, merge=2,
               image_px=448, video_px=224, vocab=512, model_vocab=151936, tie=True, embed_std=0.02,
               window=112, fullatt=[7, 15, 23, 31], rope_theta=1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="the tiny toy shape instead: a dry run on CPU")
    a = ap.parse_args()
    shape = TINY if a.tiny else QWEN_3B
    out = Path(a.out)
    prep = importlib.import_module("01_prepare_data")
    train = importlib.import_module("02_train_reward")
    ev = importlib.import_module("05_eval")
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        t = time.time()
        prep.main(prep.Config(out_dir=str(out), train_per_group=40, test_per_group=8, policy_train=4, policy_test=4,
                              gen_prompts=1))
        data = out / "data"
        records = common.read_jsonl(data / "reward_train.jsonl") + common.read_jsonl(data / "reward_test.jsonl")
        model, processor = build_tiny_vlm([r["question"] for r in records] + [r["answer"] for r in records],
                                                 0, shape)
        if not a.tiny:   # pictures upscaled to 224x224 at least: 64 visual tokens each, a realistic share
            processor.image_processor.size = {"shortest_edge": 224 * 224, "longest_edge": 448 * 448}
            model.to(torch.bfloat16)
        model.save_pretrained(out / "base3b")
        processor.save_pretrained(out / "base3b")
        report["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
        del model
        report["setup_s"] = round(time.time() - t, 1)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        train.main(train.Config(data_dir=str(data), base=str(out / "base3b"), out_dir=str(out / "reward"),
                                steps=a.steps, batch_size=4, grad_accum=2, lr=1e-5, warmup=2, eval_every=a.steps,
                                eval_size=4))
        log = [json.loads(l) for l in (out / "reward" / "log.jsonl").read_text().splitlines()]
        report.update(train_s=round(time.time() - t, 1), tokens_per_s=log[-1]["tokens_per_s"],
                      peak_gpu_gb_train=log[-1]["peak_gpu_gb"], loss_last_step=log[-1]["loss"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        res = ev.main(ev.Config(data_dir=str(data), reward=str(out / "reward"), policy="", pairs_dir="",
                                out_dir=str(out / "eval")))
        report.update(eval_s=round(time.time() - t, 1), judge_tasks=len(res["judge"]),
                      peak_gpu_gb_eval=round(torch.cuda.max_memory_allocated() / 2**30, 2)
                      if torch.cuda.is_available() else None)
    except Exception:
        report["failure"] = traceback.format_exc()
    print(json.dumps(report, indent=1))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
