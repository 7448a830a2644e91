"""Stage 4: align the policy on the judge's preference pairs with DPO (paper section III-D).

Direct Preference Optimization (Rafailov et al. 2023) trains the policy directly on pairs
(prompt, chosen, rejected), with a frozen copy of the starting policy as the reference:

    loss = -log sigmoid( beta * [ (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)) ] )

UnifiedReward uses beta = 0.1 for VLM policies; this toy uses 4, which keeps the policy nearer the
reference for the same margin: -log sigmoid(beta h) is nearly flat once beta h passes ~4, so each pair
stops pushing once its chosen answer leads by about one nat more than under the reference, and the
NLL term below does the rest. With small beta DPO moved the tiny policy's position words as a group
(teaching "right" broke "bottom"); at beta 4 the answers that were right stayed right.
log pi(y|x) is the sum of the answer-token log-probs. The reference log-probs are computed once,
before training, and stored: no second model sits in memory while training.

Added to it, with weight `sft_weight`: the chosen answer's negative log-likelihood per token,
-log pi(y_c|x) / |y_c| (RPO, Pang et al. 2024; Llama 3 does the same). DPO alone lets both answers'
likelihoods fall as long as their gap widens: plain DPO took the toy policy's answers from 89% to 63%
right on pictures, with doubled words ("yellowyellow, large").

The generators are aligned on the judge's generation pairs with Diffusion-DPO (Wallace et al. 2023),
the same objective with the likelihood replaced by the denoising error (see diffusion_dpo_loss); the
paper does this for SDXL-Turbo and T2V-Turbo (section III-D, Tables VI-VII). As for the policy, the
chosen sample's own denoising error is added (`gen_sft_weight`): the DPO term alone is satisfied
fastest by raising the rejected sample's error, and the toy generator's samples then fell apart.

    python 04_dpo.py                      # toy: toy/base + runs/toy/pairs/pairs.jsonl -> runs/toy/policy
                                          #  and toy/generator_image + gen_pairs.jsonl -> runs/toy/generator_image
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import diffusion
import vlm


@dataclasses.dataclass
class Config:
    data_dir: str = "runs/toy/data"                # media root of the pairs
    pairs: str = "runs/toy/pairs/pairs.jsonl"      # 03's output: prompt, media, chosen, rejected
    policy: str = "toy/base"                       # starting policy, also the frozen reference
    out_dir: str = "runs/toy/policy"               # HF checkpoint of the aligned policy, log.jsonl
    loss: str = "sigmoid"                          # sigmoid (DPO) or ipo
    beta: float = 4.0                              # DPO temperature (paper: 0.1 for VLMs; see the docstring)
    label_smoothing: float = 0.0                   # > 0: conservative DPO (assumes this share of labels flipped)
    sft_weight: float = 1.0                        # weight of the chosen answers' NLL added to the DPO loss (RPO)
    epochs: int = 16                               # passes over the pairs (about 400 steps on the toy pairs)
    batch_size: int = 8                            # pairs per micro-batch (chosen + rejected = 2x sequences)
    grad_accum: int = 1                            # micro-batches per optimizer step
    lr: float = 5e-5                               # peak learning rate (tiny model; 2e-4 wrecked its answers; ~5e-7 for a 7B policy)
    warmup: int = 10                               # warmup steps, then cosine decay
    clip: float = 1.0                              # gradient-norm clipping
    max_len: int = 2048                            # pairs longer than this are skipped, never truncated
    holdout: float = 0.1                           # share of pairs held out to watch reward accuracy
    seed: int = 0                                  # data order
    resume: bool = False                           # continue from the checkpoint in out_dir
    grad_checkpointing: bool = False               # recompute activations in the backward pass: less memory, more compute
    compile: bool = False                          # torch.compile each decoder layer: on an H200 02's 3B judge step is
                                                   # 13% faster (tools/gpu_bench.py); on a CPU the compile costs more than it saves
    parallel: str = "ddp"                          # under torchrun: ddp, fsdp (FSDP2, ZeRO-3) or zero2 (see common.wrap)
    precision: str = "fp32"                        # fp32: fp32 weights and AdamW, bf16 math on CUDA (16 bytes per trained
                                                   # parameter); bf16: bf16 weights and moments, stochastically rounded AdamW16
                                                   # (8 bytes: a 7B judge fits one 80 GB GPU)
    policy_part: bool = True                       # align the policy on pairs.jsonl
    # --- Diffusion-DPO of the generators on gen_pairs.jsonl (a task is trained when its generator is given)
    gen_pairs: str = "runs/toy/pairs/gen_pairs.jsonl"
    image_generator: str = "toy/generator_image"  # diffusers folder or hub id ("" = skip picture generation)
    video_generator: str = ""                     # an AnimateDiff-style folder, as toy/generator_video ("" = skip; the
                                                  # README's clip commands run it on 03's sampled clips)
    gen_out: str = "runs/toy/generator"            # written as <gen_out>_image/, <gen_out>_video/
    gen_beta: float = 5000.0                       # Diffusion-DPO's beta (the paper's 5000, as Wallace et al.'s SDXL run)
    gen_steps: int = 600                           # optimizer steps per generator
    gen_batch: int = 16                            # pairs per micro-batch
    gen_accum: int = 1                             # micro-batches per optimizer step
    gen_sft_weight: float = 5000.0                 # weight of the chosen samples' denoising error (in the units of beta)
    gen_lr: float = 1.5e-5                         # AdamW peak learning rate (tiny UNet; Wallace et al.: 1e-8 x batch 2048 for SDXL)


# ---------------------------------------------------------------------------------------------
# the DPO loss, from scratch

def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.0, kind="sigmoid", n_c=None, n_r=None):
    """Per-pair DPO loss and implicit rewards.

    pi_c, pi_r:   (B,) summed answer log-probs of chosen / rejected under the policy
    ref_c, ref_r: (B,) the same under the frozen reference
    h = (pi_c - ref_c) - (pi_r - ref_r)                        the log-ratio margin
    sigmoid: -(1-eps) log s(beta h) - eps log s(-beta h)       (eps = label smoothing, "conservative DPO")
    ipo:     (h - 1/(2 beta))^2                                 (Azar et al. 2023)
    n_c, n_r:     (B,) answer lengths in tokens. IPO compares per-token average log-probs, as IPO's
    authors and TRL do: its squared target 1/(2 beta) is a margin per token, and summed log-probs would
    tie it to the answers' length. DPO's sigmoid loss takes the sums, as the paper's equation.
    Returns losses (B,), chosen_rewards (B,), rejected_rewards (B,); rewards are beta * log-ratios.
    """
    if kind == "ipo":
        pi_c, ref_c, pi_r, ref_r = pi_c / n_c, ref_c / n_c, pi_r / n_r, ref_r / n_r
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


class Policy(torch.nn.Module):
    """The policy with its sequence log-likelihoods in forward: the module DDP or FSDP2 wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return vlm.answer_logps(self.model, batch)   # (B,)


def pair_logps(policy, processor, pairs, media, max_len, device):
    """Chosen and rejected of each pair in ONE concatenated forward of `policy` (a Policy, maybe
    wrapped): (B,), (B,) summed log-probs, and (B,), (B,) the number of answer tokens of each."""
    encs = vlm.encode_many(processor, [(m, p["prompt"], p[side])
                                          for side in ("chosen", "rejected") for p, m in zip(pairs, media)], max_len)
    batch = vlm.to_device(vlm.collate(encs, processor.tokenizer.pad_token_id), device)
    with common.autocast(device):
        logps = policy(batch)
    n = batch["answer_mask"].sum(1)
    return logps[:len(pairs)], logps[len(pairs):], n[:len(pairs)], n[len(pairs):]


# ---------------------------------------------------------------------------------------------

def load_pairs(cfg, processor, skips) -> tuple[list[dict], list]:
    """Read pairs.jsonl; a pair with missing or unreadable media, empty text or too many tokens is
    skipped and named. Returns the pairs and their loaded media."""
    path = Path(cfg.pairs)
    pairs, media = [], []
    for p in common.read_jsonl(path, skips):
        if not all(isinstance(p.get(k), str) and p[k].strip() for k in ("prompt", "chosen", "rejected")):
            skips.add(path, p.get("id"), "empty prompt, chosen or rejected")
            continue
        if not p.get("media"):   # answers are judged against their question's media: never train text-only
            skips.add(path, p.get("id"), "no media: the pair names no picture or clip")
            continue
        try:
            m = common.load_media(p["media"], cfg.data_dir)
            for side in ("chosen", "rejected"):
                vlm.encode(processor, m, p["prompt"], p[side], cfg.max_len)
        except (common.MediaError, vlm.TooLong, FileNotFoundError) as e:
            skips.add(path, p.get("id"), str(e))
            continue
        pairs.append(p)
        media.append(m)
    return pairs, media


@torch.no_grad()
def reference_logps(policy, processor, pairs, media, cfg, device, rank=0, world=1) -> torch.Tensor:
    """(N, 2) log-probs of chosen and rejected under the starting policy, computed once (under torchrun,
    each rank its share of the batches)."""
    def one(i):
        c, r, _, _ = pair_logps(policy, processor, pairs[i:i + cfg.batch_size], media[i:i + cfg.batch_size],
                                cfg.max_len, device)
        return torch.stack([c, r], 1).float().cpu()
    return torch.cat(common.shard_map(one, list(range(0, len(pairs), cfg.batch_size)), rank, world))


# ---------------------------------------------------------------------------------------------
# Diffusion-DPO for the generators, from scratch

def diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta):
    """Per-pair Diffusion-DPO loss (Wallace et al. 2023, eq. 14, with the timestep weighting folded
    into beta as their code does) and whether the policy's implicit reward prefers the chosen one.

    mse_w, mse_l: (B,) ||eps - eps_theta(x_t, t)||^2 of chosen (w) and rejected (l), averaged over every
                  non-batch dimension (channels, [frames,] height, width); for a v-prediction UNet the
                  same error against v (diffusion.target)
    ref_w, ref_l: (B,) the same under the frozen reference
    A lower denoising error plays a higher log-likelihood: the loss rewards the policy for improving on
    the reference more on the chosen sample than on the rejected one,
        loss = -log sigmoid( -beta/2 * [ (mse_w - ref_w) - (mse_l - ref_l) ] ),
    log 2 when the policy equals the reference. Returns losses (B,), preferred (B,) bool."""
    inside = -0.5 * beta * ((mse_w - ref_w) - (mse_l - ref_l))
    return -F.logsigmoid(inside), inside > 0


def pair_errors(gen, unet, x_w, x_l, hidden, t, noise, added=None):
    """Denoising errors of chosen and rejected under `unet`, with the pair's noise and timestep shared
    (so the difference measures the samples, not the draw). x_w, x_l, noise: (B, C, [F,] H, W); t: (B,);
    hidden: (B, L, D); added: SDXL's conditions, each (B, ...), or None. Returns mse_w, mse_l: (B,)."""
    x0, eps, tt = torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t])
    added = None if added is None else {k: torch.cat([v, v]) for k, v in added.items()}
    pred = diffusion.model_output(gen, unet, diffusion.add_noise(gen, x0, eps, tt), tt, torch.cat([hidden, hidden]), added)
    return ((pred.float() - diffusion.target(gen, x0, eps, tt)) ** 2).mean(dim=tuple(range(1, pred.ndim))).chunk(2)


def load_gen_pairs(path: Path, task: str, gen, data_dir, skips) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The `task` pairs of gen_pairs.jsonl (Diffusion-DPO's layout: caption, jpg_0 = chosen, jpg_1,
    label_0 = 1; clips mp4_0 / mp4_1) as captions and x0 of chosen and rejected, (N, C, [F,] H, W).
    A pair with a caption the generator cannot encode or media that do not load is skipped and named."""
    key = "jpg" if task == "image_generation" else "mp4"
    captions, wins, loses = [], [], []
    for p in common.read_jsonl(path, skips):
        if p.get("task") != task:
            continue
        why = diffusion.check_caption(gen, p.get("caption", ""))
        if why:
            skips.add(path, p.get("id"), why)
            continue
        try:
            m = common.load_media([p[f"{key}_0"], p[f"{key}_1"]], data_dir)
        except (common.MediaError, KeyError) as e:
            skips.add(path, p.get("id"), f"media of the pair: {e}")
            continue
        px = [np.asarray(x) if key == "jpg" else np.stack(x.frames) for x in m]
        if p.get("label_0", 1) == 0:
            px = px[::-1]
        captions.append(p["caption"])
        wins.append(diffusion.to_model_space(gen, px[0][None])[0])
        loses.append(diffusion.to_model_space(gen, px[1][None])[0])
    return captions, torch.stack(wins) if wins else None, torch.stack(loses) if loses else None


def train_generator(cfg: Config, task: str, source: str, skips) -> dict:
    """Diffusion-DPO of one generator's UNet on its task's pairs; the text encoder stays frozen, the
    starting UNet is the frozen reference. Writes <gen_out>_<medium>/ in the generator's own layout."""
    medium = task.split("_")[0]
    out = Path(f"{cfg.gen_out}_{medium}")
    common.require(source, f"--{medium}-generator", f"python -m toy.pretrain_generator --medium {medium}")
    device = common.get_device()
    state_path = out / "train_state.pt"
    resume = cfg.resume and state_path.exists()
    gen = diffusion.load_generator(out if resume else source, device)
    reference = diffusion.load_generator(source, device).unet if resume else copy.deepcopy(gen.unet)
    captions, x_w, x_l = load_gen_pairs(Path(cfg.gen_pairs), task, gen, cfg.data_dir, skips)
    if x_w is None or len(captions) < 2:
        raise SystemExit(f"need at least 2 usable {task} pairs in {cfg.gen_pairs}, found {len(captions)}")
    policy = gen.unet.train().requires_grad_(True)
    with torch.no_grad():   # the frozen text encoder's conditioning, once per pair
        encoded = [diffusion.encode_captions(gen, captions[i:i + 64]) for i in range(0, len(captions), 64)]
    hidden = torch.cat([h for h, _ in encoded])
    added = None if encoded[0][1] is None else {k: torch.cat([a[k] for _, a in encoded]) for k in encoded[0][1]}
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.gen_lr, weight_decay=0.0)
    step = 0
    if resume:
        state = torch.load(state_path, weights_only=True)
        step = state["step"]
        opt.load_state_dict(state["optimizer"])
    n_t = gen.scheduler.config.num_train_timesteps
    bar = tqdm(total=cfg.gen_steps, initial=step, desc=f"diffusion-dpo {medium}", dynamic_ncols=True, mininterval=2)
    t0, stats = time.time(), []
    while step < cfg.gen_steps:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, cfg.gen_steps, cfg.gen_lr, 10)
        opt.zero_grad(set_to_none=True)
        step_losses, step_acc = [], []
        for k in range(cfg.gen_accum):
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + k)   # each draw seeded: resumable
            idx = torch.randperm(len(captions), generator=g)[:cfg.gen_batch]
            t = torch.randint(0, n_t, (len(idx),), generator=g).to(device)     # one timestep per pair ...
            noise = torch.randn(x_w[idx].shape, generator=g).to(device)        # ... and one noise, for both
            w, l, h = x_w[idx].to(device), x_l[idx].to(device), hidden[idx]
            a = None if added is None else {k: v[idx] for k, v in added.items()}
            with torch.no_grad():
                ref_w, ref_l = pair_errors(gen, reference, w, l, h, t, noise, a)
            with common.autocast(device):
                mse_w, mse_l = pair_errors(gen, policy, w, l, h, t, noise, a)
            losses, preferred = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, cfg.gen_beta)
            loss = losses.mean() + cfg.gen_sft_weight * mse_w.mean()
            if not torch.isfinite(loss):
                raise common.nonfinite(f"the Diffusion-DPO loss is {loss.item()}", step, out, None)
            (loss / cfg.gen_accum).backward()
            step_losses.append(losses.mean().item())   # the Diffusion-DPO term: log 2 at the start
            step_acc.append(preferred.float().mean().item())
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip)
        if not torch.isfinite(norm):
            raise common.nonfinite(f"the gradient norm is {norm.item()}", step, out, None)
        opt.step()
        step += 1
        stats.append((float(np.mean(step_losses)), float(np.mean(step_acc))))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean([s[0] for s in stats[-20:]]):.3f}",
                        acc=f"{np.mean([s[1] for s in stats[-20:]]):.2f}", refresh=False)
        if step % 50 == 0 or step == cfg.gen_steps:
            policy.eval()
            diffusion.save_generator(gen, out, {"step": step, "optimizer": opt.state_dict()})
            policy.train()
            common.append_jsonl(out / "log.jsonl", {"step": step, "time_s": round(time.time() - t0, 1),
                                                    "loss": float(np.mean([s[0] for s in stats[-50:]])),
                                                    "implicit_acc": float(np.mean([s[1] for s in stats[-50:]]))})
    bar.close()
    first, last = stats[:20] or [(np.nan, np.nan)], stats[-20:] or [(np.nan, np.nan)]
    result = {"pairs": len(captions), "loss_first": float(np.mean([s[0] for s in first])),
              "loss_last": float(np.mean([s[0] for s in last])), "implicit_acc_last": float(np.mean([s[1] for s in last])),
              "seconds": round(time.time() - t0, 1)}
    print(f"{medium} generator: {result} -> {out}")
    return result


def main(cfg: Config) -> dict:
    common.from_repository(cfg)
    if not cfg.policy_part:
        return generation_part(cfg)
    common.set_seed(cfg.seed)
    device = common.get_device()
    rank, world = common.init_distributed()   # 0, 1 unless started by torchrun
    say = print if rank == 0 else (lambda *a, **k: None)
    common.require(cfg.pairs, "--pairs", "03_build_pairs.py", hub_ok=False)
    common.require(cfg.policy, "--policy", "python -m toy.pretrain_base")
    out = common.output_dir(cfg.out_dir)
    if cfg.resume and not (out / "train_state.pt").exists():
        raise SystemExit(f"--resume: no checkpoint to resume from in {out} (no train_state.pt)")
    if world > 1 and (cfg.resume or cfg.batch_size % world):
        raise SystemExit(f"under torchrun: --batch-size must be a multiple of the {world} ranks (got {cfg.batch_size}),"
                         " and --resume continues single-process runs only")
    skips = common.SkipLog(out / ("skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl"), resume=cfg.resume)
    common.barrier()
    model = vlm.load_model(out if cfg.resume else cfg.policy, device, train=True, precision=cfg.precision)
    processor = vlm.load_processor(cfg.policy)
    # Dropout off while training: the policy's log-probs must be computed exactly as the reference's
    # were, or the margin h carries dropout noise even at step 0.
    vlm.prepare_for_training(model, cfg.grad_checkpointing, cfg.compile)
    pairs, media = load_pairs(cfg, processor, skips)
    say(f"{len(pairs)} pairs from {cfg.pairs}; {skips.summary()}")
    if len(pairs) < 2:
        raise SystemExit(f"need at least 2 usable pairs in {cfg.pairs}, found {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_hold = max(1, int(cfg.holdout * len(pairs)))
    hold, train = order[:n_hold], order[n_hold:]
    steps_per_epoch = max(1, len(train) // (cfg.batch_size * cfg.grad_accum))
    total = cfg.epochs * steps_per_epoch
    policy = Policy(model)
    if world > 1:   # DDP or FSDP2 around the module whose forward computes the log-likelihoods
        policy = common.wrap(policy, model.model.language_model.layers, cfg.parallel)
    optimizer = vlm.make_optimizer(model.parameters(), cfg.precision, cfg.lr, weight_decay=0.0)

    step, saved = 0, None
    if cfg.resume:
        state = torch.load(out / "train_state.pt", weights_only=True)
        ref, step = state["reference_logps"], state["step"]
        saved = step
        optimizer.load_state_dict(state["optimizer"])
        say(f"resumed at step {step}/{total}")
    else:
        t = time.time()
        ref = reference_logps(policy, processor, pairs, media, cfg, device, rank, world)   # the frozen reference, once
        say(f"reference log-probs of {len(pairs)} pairs in {time.time() - t:.1f}s")

    def run(idx, train_mode: bool):
        c, r, n_c, n_r = pair_logps(policy, processor, [pairs[i] for i in idx], [media[i] for i in idx], cfg.max_len,
                                    device)
        c, r, rc, rr = c.float(), r.float(), ref[idx, 0].to(device), ref[idx, 1].to(device)
        losses, ch, rj = dpo_loss(c, r, rc, rr, cfg.beta, cfg.label_smoothing, cfg.loss, n_c, n_r)
        # The chosen answer's own likelihood (per token), kept up by a plain NLL term: DPO alone only
        # widens the gap and lets both likelihoods fall, until greedy decoding picks tokens that neither
        # answer had (measured here: "yellowyellow, large"). Pang et al. 2024 (RPO) and Llama 3 add it.
        nll = -(c / n_c).mean()
        loss = losses.mean() + cfg.sft_weight * nll
        stats = {"loss": loss.item(), "dpo_loss": losses.mean().item(), "nll_chosen": nll.item(),
                 "reward_acc": (ch > rj).float().mean().item(), "margin": (ch - rj).mean().item(),
                 "chosen_reward": ch.mean().item(), "rejected_reward": rj.mean().item()}
        return loss, stats

    @torch.no_grad()
    def evaluate():
        rows = common.shard_map(lambda i: run(hold[i:i + cfg.batch_size], False)[1],
                                list(range(0, len(hold), cfg.batch_size)), rank, world)
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    def checkpoint():
        nonlocal saved
        if common.all_sum([float(not common.all_finite(model.parameters()))])[0]:   # never write NaN or inf
            raise common.nonfinite("a weight is not finite", step, out, saved)
        state = common.full_state_dict(model)          # under FSDP2: gathered from every rank's shard
        if rank == 0:   # resuming needs the optimizer state: single-process runs only
            common.save_checkpoint(model, processor, out, state_dict=state, extra=None if world > 1 else {
                "step": step, "optimizer": optimizer.state_dict(), "reference_logps": ref,
                "config": dataclasses.asdict(cfg)})
        common.barrier()
        saved = step

    say("held-out before:", {k: round(v, 3) for k, v in evaluate().items()})
    bar = tqdm(total=total, initial=step, desc="dpo", dynamic_ncols=True, mininterval=2, disable=rank > 0)
    t0 = time.time()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        rng = random.Random(cfg.seed + epoch)
        epoch_order = train[:]
        rng.shuffle(epoch_order)
        for group in optimizer.param_groups:
            group["lr"] = common.lr_at(step, total, cfg.lr, cfg.warmup)
        sums = {}
        for a in range(cfg.grad_accum):
            start = (k * cfg.grad_accum + a) * cfg.batch_size
            # this rank's share of the global batch: batch_size / world pairs, so that DDP's mean of the
            # ranks' gradients is the global batch's
            loss, stats = run(epoch_order[start:start + cfg.batch_size][rank::world], True)
            if common.all_sum([float(not torch.isfinite(loss))])[0]:              # on any rank: all stop
                raise common.nonfinite(f"the loss (DPO + NLL) is {loss.item()}", step, out, saved)
            (loss / cfg.grad_accum).backward()
            for key, v in zip(stats, common.all_sum(list(stats.values()))):     # means over the ranks
                sums[key] = sums.get(key, 0.0) + v / world / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP2: one norm of all shards
        if not torch.isfinite(norm):                     # a finite loss can still have an inf gradient
            raise common.nonfinite(f"the gradient norm is {norm.item()}", step, out, saved)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", acc=f"{sums['reward_acc']:.2f}", refresh=False)
        if step % steps_per_epoch == 0 or step == total:
            held = evaluate()
            checkpoint()
            if rank == 0:
                common.append_jsonl(out / "log.jsonl", {"step": step, "time_s": round(time.time() - t0, 1),
                                                        "train": sums, "heldout": held})
                bar.write(f"epoch {step // steps_per_epoch}: held-out loss {held['loss']:.3f} reward acc "
                          f"{held['reward_acc']:.2f} margin {held['margin']:.3f}")
    bar.close()
    final = evaluate()
    say("held-out after:", {k: round(v, 3) for k, v in final.items()}, f"({time.time() - t0:.0f}s); {skips.summary()}")
    if world == 1:
        final["generators"] = generation_part(cfg)["generators"]
    return final


def generation_part(cfg: Config) -> dict:
    """Diffusion-DPO of each generator given (--image-generator, --video-generator) on its pairs."""
    sources = {"image_generation": cfg.image_generator, "video_generation": cfg.video_generator}
    if not any(sources.values()):
        return {"generators": {}}
    common.require(cfg.gen_pairs, "--gen-pairs", "03_build_pairs.py", hub_ok=False)
    skips = common.SkipLog(Path(cfg.gen_out + "_skipped.jsonl"), resume=cfg.resume)
    done = {task: train_generator(cfg, task, src, skips) for task, src in sources.items() if src}
    print(f"generation pairs: {skips.summary()}")
    return {"generators": done}


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))
    common.exit_distributed()   # under torchrun; a single process just ends
