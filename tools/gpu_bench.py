"""The judge's and the policy's training step at the paper's scale, on one GPU: tokens/s, model FLOP
utilisation (MFU) and peak memory for each memory option.

Random-weight Qwen2.5-VL models of the 3B and 7B shapes (their config.json) go through 02's and 04's
own step: 02's reward loss with the frozen tower's tokens computed first (vlm.visual_tokens), then
backward, clipping and the optimizer; 04's pair log-probs (chosen and rejected in one forward, the
processor included) and DPO + NLL loss. Inputs are realistic: sequences of --seq-len tokens, half of
them a pair of 512x512 pictures (324 tokens each at the paper's 262,144-pixel cap) with a short
verdict ("Image 1 is better than Image 2.", 16 tokens), half an 8-frame 480x640 clip at 16,384 pixels
a frame with a critique of 300 tokens; the question's text fills the rest.

    python tools/gpu_bench.py --out runs/gpu_bench          # on a CUDA machine
    python tools/gpu_bench.py --tiny --steps 2              # the same code on CPU with the toy's shape

MFU = model FLOPs per second / the GPU's dense bf16 peak (989 TFLOP/s for H100 and H200 SXM). Model
FLOPs of a step: 6 x (decoder weights) per trained token, 6 x (lm_head) per answer token (the
vocabulary projection is applied to answer positions only), causal attention 6 x layers x hidden x S^2
per sequence, and the frozen tower's forward, 2 x (tower weights) per patch. Activation checkpointing's
recomputation is not counted (the usual convention), so it lowers MFU.
"""
import argparse
import importlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import vlm  # noqa: E402
from toy.tiny_vlm import TINY, processor_and_config  # noqa: E402

train = importlib.import_module("02_train_reward")
dpo = importlib.import_module("04_dpo")

# Qwen2.5-VL-3B-Instruct and -7B-Instruct (their config.json); both share the 675M-parameter tower.
VISION = dict(vision_hidden=1280, vision_depth=32, vision_heads=16, vision_ffn=3420, patch=14, merge=2,
              window=112, fullatt=[7, 15, 23, 31], image_px=512, video_px=128, vocab=512, embed_std=0.02,
              rope_theta=1e6, max_positions=32768)
SHAPES = {
    "3B": dict(VISION, text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2, text_ffn=11008,
               model_vocab=151936, tie=True),
    "7B": dict(VISION, text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_ffn=18944,
               model_vocab=152064, tie=False),
    "tiny": dict(TINY, max_positions=32768),
}
PEAK_BF16 = 989e12
WORDS = "a red blue green small large circle square moving left right top bottom picture video shows".split()


def examples(processor, n: int, seq_len: int, tiny: bool):
    """n (media, question, answer, kind) of about seq_len tokens each: alternately a picture pair with a
    short verdict and an 8-frame clip with a 300-token critique."""
    rng = np.random.default_rng(0)
    side, frame = (64, 32) if tiny else (512, (480, 640))
    out = []
    for i in range(n):
        if i % 2 == 0:
            media = [Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)) for _ in range(2)]
            answer, kind = "Image 1 is better than Image 2.", "pairwise"
            answer_words = 0
        else:
            shape = (8, frame, frame, 3) if tiny else (8, *frame, 3)
            media = [common.Video(rng.integers(0, 255, shape, np.uint8), fps=8.0)]
            answer_words, kind = 300, "pointwise"
        answer = " ".join(rng.choice(WORDS, answer_words)) + " Final Score: 4" if answer_words else answer
        filler = list(rng.choice(WORDS, 8 * seq_len))
        length = lambda w: len(vlm.encode(processor, media, " ".join(filler[:w]), answer, 10 ** 6)["input_ids"])
        base, per_word = length(64), (length(128) - length(64)) / 64   # grow the question to about seq_len
        question = " ".join(filler[:max(1, 64 + int((seq_len - base) / per_word))])
        enc = vlm.encode(processor, media, question, answer, max_len=10 ** 6)
        out.append((media, question, answer, kind, enc))
    return out


def model_flops(model, batch, answer_tokens: int, tower_patches: int, trained_tower: bool) -> float:
    text = model.config.text_config
    layers = sum(p.numel() for p in model.model.language_model.layers.parameters())
    head = model.lm_head.weight.numel()
    tower = sum(p.numel() for p in model.model.visual.parameters())
    lengths = batch["attention_mask"].sum(1).double()
    tokens = float(lengths.sum())
    attention = 6 * text.num_hidden_layers * text.hidden_size * float((lengths ** 2).sum())   # causal: half of 4 S^2 d, x3
    return 6 * layers * tokens + 6 * head * answer_tokens + attention + (6 if trained_tower else 2) * tower * tower_patches


def bench(shape: str, stage: str, precision: str, ckpt: bool, batch: int, seq_len: int, steps: int, tiny: bool,
          phases: bool = False, profile: str = "", compile_layers: bool = False):
    device = common.get_device()
    sizes = SHAPES[shape]
    processor, config = processor_and_config([" ".join(WORDS)] * 20, sizes)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    t = time.time()
    with torch.device(device):
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    build_s = time.time() - t
    vlm.prepare_for_training(model, ckpt, compile_layers)
    if stage == "02":
        model.model.visual.requires_grad_(False)
        if device == "cuda":
            model.model.visual.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = vlm.make_optimizer(params, precision, 1e-5, 0.0)
    n_params = sum(p.numel() for p in params)
    exs = examples(processor, batch * (2 if stage == "04" else 1), seq_len, tiny)
    pad = processor.tokenizer.pad_token_id
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, flops = [], 0.0
    if stage == "04":   # the sequences 04's step encodes, for counting its tokens and FLOPs
        encs = vlm.encode_many(processor, [(exs[2 * i][0], exs[2 * i][1], exs[2 * i + s][2])
                                              for s in (0, 1) for i in range(batch)], 10 ** 6)
        dpo_batch = (vlm.collate(encs, pad), sum(int(e[k].shape[0]) for e in encs
                                                    for k in ("pixel_values", "pixel_values_videos") if k in e))

    spent: dict = {}
    clock = [0.0]

    def mark(name):   # with --phases: seconds per phase of the step (synchronising, so a little slower)
        if phases:
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            if name:
                spent.setdefault(name, []).append(now - clock[0])
            clock[0] = now

    def step():
        nonlocal flops
        mark("")
        if stage == "02":
            encs = [dict(e) for *_, e in exs]
            patches = sum(int(e[k].shape[0]) for e in encs for k in ("pixel_values", "pixel_values_videos") if k in e)
            vlm.visual_tokens(model, encs, device)
            mark("tower")
            b = vlm.to_device(vlm.collate(encs, pad), device)
            mark("collate")
            with common.autocast(device):
                loss, _ = train.reward_loss(model, b, [k for *_, k, _ in exs], None, 0.0)
        else:   # 04: pairs of (chosen, rejected) answers to the same prompt and media
            pairs = [{"prompt": exs[2 * i][1], "chosen": exs[2 * i][2], "rejected": exs[2 * i + 1][2]}
                     for i in range(batch)]
            media = [exs[2 * i][0] for i in range(batch)]
            c, r, n_c, n_r = dpo.pair_logps(dpo.Policy(model), processor, pairs, media, 10 ** 6, device)
            losses, _, _ = dpo.dpo_loss(c.float(), r.float(), c.detach().float() - 1, r.detach().float(), 0.1,
                                        n_c=n_c, n_r=n_r)
            loss = losses.mean() - (c / n_c).mean()
            b, patches = dpo_batch
        mark("forward")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        mark("clip")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        flops = model_flops(model, b, int(b["answer_mask"][:, 1:].sum()), patches, stage == "04")
        return int(b["attention_mask"].sum())

    for i in range(steps + 2):     # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        tokens = step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.time() - t)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        cuda = device == "cuda"
        with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        Path(profile).write_text(prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40))
    sec = statistics.median(times)
    row = dict(shape=shape, stage=stage, precision=precision, grad_checkpointing=ckpt, batch=batch, compiled=compile_layers,
               tokens_per_step=tokens, trained_params_b=round(n_params / 1e9, 2),
               bytes_per_param=vlm.BYTES_PER_PARAM[precision], build_s=round(build_s, 1),
               step_s=round(sec, 3), tokens_per_s=round(tokens / sec), tflops=round(flops / sec / 1e12, 1),
               mfu=round(flops / sec / PEAK_BF16, 3))
    if phases:
        row["phases_s"] = {k: round(statistics.median(v[2:]), 3) for k, v in spent.items()}
    if device == "cuda":
        row.update(peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 1e9, 1),
                   peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 1))
    del model, opt
    return row


def matmul_tflops() -> float:
    a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda",
                                                                                      dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_bench")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--only", default="", help="comma-separated indices into the configuration list")
    ap.add_argument("--tiny", action="store_true", help="the toy's shape on CPU: a dry run of the same code")
    ap.add_argument("--phases", action="store_true", help="also time each phase of the step (synchronising)")
    ap.add_argument("--profile", action="store_true", help="write a torch.profiler table of one step per run")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # (shape, stage, precision, activation checkpointing, sequences or pairs per step, compiled decoder layers)
    runs = [("3B", "02", "fp32", True, 4, False), ("3B", "02", "bf16", True, 4, False),
            ("3B", "02", "bf16", False, 4, False), ("3B", "04", "bf16", True, 2, False),
            ("7B", "02", "bf16", True, 1, False), ("7B", "02", "bf16", True, 4, False),
            ("7B", "04", "bf16", True, 1, False), ("7B", "02", "fp32", True, 1, False),
            ("3B", "02", "bf16", True, 4, True), ("7B", "02", "bf16", True, 4, True)]
    if a.tiny:
        runs = [("tiny", *r[1:]) for r in runs[:4] + runs[8:9]]
    if a.only:
        runs = [runs[int(i)] for i in a.only.split(",")]
    info = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": importlib.import_module("transformers").__version__}
    if torch.cuda.is_available():
        info["matmul_bf16_tflops"] = round(matmul_tflops())
    print(json.dumps(info))
    rows = []
    for r in runs:
        try:
            row = bench(*r[:5], a.seq_len, a.steps, a.tiny, a.phases,
                        str(out / f"profile_{'_'.join(map(str, r))}.txt") if a.profile else "", r[5])
        except Exception as e:   # an out-of-memory configuration is a result too
            row = dict(zip(("shape", "stage", "precision", "grad_checkpointing", "batch", "compiled"), r),
                       error=f"{type(e).__name__}: {str(e)[:300]}")
            if not isinstance(e, torch.OutOfMemoryError):
                traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "gpu_bench.json").write_text(json.dumps({"info": info, "runs": rows}, indent=1))
    print("| shape | stage | precision | checkpointing | compiled | seqs x tokens | tokens/s | MFU | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['stage']} | {r['precision']} | {r['grad_checkpointing']} | {r['compiled']} | "
                  f"{r['batch']} | {r['error'][:60]} | | |")
        else:
            print(f"| {r['shape']} | {r['stage']} | {r['precision']} | {r['grad_checkpointing']} | {r['compiled']} | {r['batch']} x "
                  f"{a.seq_len} | {r['tokens_per_s']} | {100 * r['mfu']:.1f}% | {r.get('peak_alloc_gb', '-')} |")


if __name__ == "__main__":
    main()
