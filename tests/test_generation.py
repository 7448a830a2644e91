"""The generators' half: Diffusion-DPO's loss and its pairs, the sampling loop, the toy's ground-truth
reader, and the shipped picture and clip generators. Tiny random-weight generators at 16 px: seconds each."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, stage

import common
import diffusion
from toy import reader, world
from toy.tiny_generator import build_generator

dpo = stage("04_dpo")
SHIPPED = ROOT / "toy" / "generator_image"
SHIPPED_VIDEO = ROOT / "toy" / "generator_video"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight picture generator saved in the diffusers layout and loaded back as 03-05 load one."""
    folder = tmp_path_factory.mktemp("gen")
    parts = build_generator("image", folder, seed=0)
    diffusion.save_generator(diffusion.Generator(**parts), folder)
    return folder


def test_diffusion_dpo_loss_hand_values_and_log2_at_the_reference():
    mse_w, mse_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    ref_w, ref_l = torch.tensor([0.12, 0.25]), torch.tensor([0.18, 0.15])
    losses, preferred = dpo.diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=10.0)
    # pair 0: (0.10 - 0.12) - (0.20 - 0.18) = -0.04 -> inside = -5 * -0.04 = 0.2
    # pair 1: (0.30 - 0.25) - (0.10 - 0.15) = 0.10 -> inside = -0.5
    expected = [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.5))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert preferred.tolist() == [True, False]
    same, _ = dpo.diffusion_dpo_loss(mse_w, mse_l, mse_w, mse_l, beta=5000.0)
    assert same.tolist() == pytest.approx([math.log(2)] * 2)


def test_chosen_and_rejected_share_noise_and_timestep(tiny):
    """Identical chosen and rejected give identical errors only if they are noised alike."""
    gen = diffusion.load_generator(str(tiny))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    hidden, _ = diffusion.encode_captions(gen, ["a red square at the top"] * 3)
    t, noise = torch.tensor([10, 500, 900]), torch.randn(3, 3, 16, 16)
    mse_w, mse_l = dpo.pair_errors(gen, gen.unet, x, x.clone(), hidden, t, noise)
    assert torch.equal(mse_w, mse_l)
    other, _ = dpo.pair_errors(gen, gen.unet, x, x.clone(), hidden, t, torch.randn(3, 3, 16, 16))
    assert not torch.equal(other, mse_w)       # the noise matters, so the equality above is not vacuous


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_training_target_is_what_the_scheduler_reads_back(tiny, kind):
    """A UNet that output target() exactly would let the scheduler recover x0 at any timestep: the
    target and scheduler.step agree on what the prediction means, for every prediction_type."""
    from diffusers import DDIMScheduler
    gen = diffusion.load_generator(str(tiny))
    gen.scheduler = DDIMScheduler.from_config(gen.scheduler.config, prediction_type=kind, clip_sample=False)
    gen.scheduler.set_timesteps(20)
    x0, eps = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16)
    for t in gen.scheduler.timesteps[[2, 10, 18]]:
        tt = t.repeat(2)
        x_t = diffusion.add_noise(gen, x0, eps, tt)
        out = gen.scheduler.step(diffusion.target(gen, x0, eps, tt), t, x_t)
        assert torch.allclose(out.pred_original_sample, x0, atol=1e-4), (kind, int(t))
    if kind != "epsilon":
        assert not torch.allclose(diffusion.target(gen, x0, eps, tt), eps)
    # Diffusion-DPO's errors are taken against the same target
    hidden, _ = diffusion.encode_captions(gen, ["a red square at the top"] * 2)
    mse_w, _ = dpo.pair_errors(gen, gen.unet, x0, x0, hidden, tt, eps)
    pred = diffusion.model_output(gen, gen.unet, diffusion.add_noise(gen, x0, eps, tt), tt, hidden)
    expected = ((pred - diffusion.target(gen, x0, eps, tt)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(mse_w, expected, atol=1e-6)


def test_gradients_reach_only_the_trained_unet(tiny):
    gen = diffusion.load_generator(str(tiny))
    reference = diffusion.load_generator(str(tiny)).unet
    policy = gen.unet.train().requires_grad_(True)
    x_w, x_l = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    hidden, _ = diffusion.encode_captions(gen, ["a red square at the top", "a blue square on the left"])
    t, noise = torch.tensor([100, 700]), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = dpo.pair_errors(gen, reference, x_w, x_l, hidden, t, noise)
    losses, _ = dpo.diffusion_dpo_loss(*dpo.pair_errors(gen, policy, x_w, x_l, hidden, t, noise), *ref, 5000.0)
    losses.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is None for p in gen.text_encoder.parameters())


def write_pairs(folder: Path, n: int) -> Path:
    """n toy picture pairs in Diffusion-DPO's layout: chosen shows the caption, rejected another colour."""
    rng = np.random.default_rng(0)
    rows = []
    from PIL import Image
    for i in range(n):
        scene = world.sample_scene("image", rng)
        wrong = world.perturb(scene, ("colour",), [True], "image", rng)
        names = []
        for side, s in (("w", scene), ("l", wrong)):
            name = f"media/p{i}_{side}.png"
            (folder / "media").mkdir(exist_ok=True)
            Image.fromarray(world.render_image(s, None, rng)).save(folder / name)
            names.append(name)
        flip = i % 2   # label_0 = 0 says the second is the chosen one
        rows.append({"id": f"p{i}", "task": "image_generation", "caption": world.caption("image", scene),
                     "jpg_0": names[flip], "jpg_1": names[1 - flip], "label_0": 1 - flip})
    path = folder / "gen_pairs.jsonl"
    common.write_jsonl(path, rows)
    return path


def test_gen_pairs_round_trip_into_04_and_bad_pairs_are_counted(tiny, tmp_path):
    path = write_pairs(tmp_path, 4)
    rows = common.read_jsonl(path)
    rows.append(dict(rows[0], id="missing", jpg_0="media/nowhere.png"))
    rows.append(dict(rows[0], id="unencodable", caption="a red square, at the top!"))
    common.write_jsonl(path, rows)
    gen = diffusion.load_generator(str(tiny))
    skips = common.SkipLog(tmp_path / "skipped.jsonl")
    captions, x_w, x_l = dpo.load_gen_pairs(path, "image_generation", gen, tmp_path, skips)
    assert len(captions) == 4 and x_w.shape == x_l.shape == (4, 3, 16, 16)
    assert skips.total == 2
    logged = {r["id"]: r["reason"] for r in common.read_jsonl(tmp_path / "skipped.jsonl")}
    assert set(logged) == {"missing", "unencodable"} and "cannot encode" in logged["unencodable"]
    # label_0 = 0 swaps the sides: x_w is always the picture showing the caption's colour
    for caption, w in zip(captions, x_w):
        px = diffusion.to_pixels(gen, w[None], world.PX)[0]
        assert reader.read_image(px)["colour"] == caption.split()[1]


def train_on_pairs(tiny, tmp_path, **kw):
    """04's generator part on 8 fixed pairs; the trained and the starting generator, and the pairs."""
    path = write_pairs(tmp_path, 8)
    dpo.main(dpo.Config(gen_pairs=str(path), data_dir=str(tmp_path), image_generator=str(tiny), video_generator="",
                        gen_out=str(tmp_path / "gen"), gen_batch=8, gen_lr=1e-3, policy_part=False, **kw))
    gen, ref = diffusion.load_generator(str(tmp_path / "gen_image")), diffusion.load_generator(str(tiny))
    captions, x_w, x_l = dpo.load_gen_pairs(path, "image_generation", gen, tmp_path, common.SkipLog(tmp_path / "s.jsonl"))
    return gen, ref, x_w, x_l, diffusion.encode_captions(gen, captions)[0]


def test_a_few_diffusion_dpo_steps_raise_the_implicit_accuracy(tiny, tmp_path):
    gen, ref, x_w, x_l, hidden = train_on_pairs(tiny, tmp_path, gen_steps=30, gen_sft_weight=0.0)
    g = torch.Generator().manual_seed(1)
    accs, losses = [], []
    with torch.no_grad():
        for _ in range(8):   # fresh draws of noise and timestep, not the training ones
            t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x_w.shape, generator=g)
            loss, preferred = dpo.diffusion_dpo_loss(*dpo.pair_errors(gen, gen.unet, x_w, x_l, hidden, t, noise),
                                                     *dpo.pair_errors(ref, ref.unet, x_w, x_l, hidden, t, noise), 5000.0)
            accs.append(preferred.float().mean().item())
            losses.append(loss.mean().item())
    assert np.mean(accs) > 0.6 and np.mean(losses) < math.log(2)   # at the reference: 0 and log 2
    assert (tmp_path / "gen_image" / "train_state.pt").exists()


def test_the_chosen_error_term_lowers_the_chosen_samples_error(tiny, tmp_path):
    """beta 0 turns the Diffusion-DPO term off (a constant log 2), leaving gen_sft_weight's term alone:
    training on it lowers the chosen pictures' denoising error on fresh noise against the reference."""
    gen, ref, x_w, x_l, hidden = train_on_pairs(tiny, tmp_path, gen_steps=15, gen_beta=0.0, gen_sft_weight=1.0)
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x_w.shape, generator=g)
    with torch.no_grad():
        trained = dpo.pair_errors(gen, gen.unet, x_w, x_l, hidden, t, noise)[0].mean().item()
        before = dpo.pair_errors(ref, ref.unet, x_w, x_l, hidden, t, noise)[0].mean().item()
    assert trained < 0.9 * before


def test_sampling_is_deterministic_and_independent_of_the_batch(tiny):
    gen = diffusion.load_generator(str(tiny))
    a = diffusion.sample(gen, ["a red square at the top", "a blue square on the left"], [5, 6], steps=4)
    b = diffusion.sample(gen, ["a blue square on the left"], [6], steps=4)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a[1], b[0])
    assert not np.array_equal(a[0], diffusion.sample(gen, ["a red square at the top"], [7], steps=4)[0])


def test_bad_generators_and_captions_get_clear_errors(tiny, tmp_path):
    with pytest.raises(diffusion.NotAGenerator, match="model_index.json"):
        diffusion.load_generator(str(ROOT / "toy" / "base"))
    gen = diffusion.load_generator(str(tiny))
    assert diffusion.check_caption(gen, "a red square at the top") is None
    assert "cannot encode" in diffusion.check_caption(gen, "a red square, at the top!")
    assert "longer" in diffusion.check_caption(gen, " ".join(["red"] * 20))


@pytest.mark.parametrize("medium", ["image", "video"])
def test_reader_is_exact_on_rendered_media_at_every_size(medium):
    """The caption's attributes read back right on every rendering, clean or defective, at the toy's
    64 px and at the generator's 16 px; pictures' sizes too."""
    from PIL import Image
    rng = np.random.default_rng(3)
    for i in range(60):
        scene = world.sample_scene(medium, rng)
        pixels = world.render(medium, scene, (None, "noise", "blur")[i % 3], rng)
        frames = pixels[None] if medium == "image" else pixels
        small = np.stack([np.asarray(Image.fromarray(f).resize((16, 16), Image.BOX)) for f in frames])
        for px in (pixels, small[0] if medium == "image" else small):
            assert all(reader.caption_right(medium, scene, px).values()), (i, scene)
            if medium == "image":
                assert reader.read_image(px)["size"] == scene["size"]
    empty = np.repeat(world.BACKGROUND[None], world.FRAMES, 0)
    assert reader.read(medium, empty[0] if medium == "image" else empty)["colour"] is None


def test_reader_breaks_a_colour_tie_the_same_way_in_every_process(tmp_path):
    """A clip whose frames split evenly between two colours reads as the colour of its first frames,
    whatever Python's string-hash seed (a tie decided by a set's order changes from one process to
    the next)."""
    rng = np.random.default_rng(0)
    scene = dict(world.sample_scene("video", rng), colour="red")
    first = world.render("video", scene, None, rng)
    second = world.render("video", dict(scene, colour="blue"), None, rng)
    half = world.FRAMES // 2
    assert [reader.read_video(c[:half])["colour"] for c in (first, second)] == ["red", "blue"]   # a true tie
    np.save(tmp_path / "clip.npy", np.concatenate([first[:half], second[half:]]))
    code = f"import numpy as np; from toy import reader; print(reader.read_video(np.load({str(tmp_path / 'clip.npy')!r}))['colour'])"
    read = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in range(8)}
    assert read == {"red"}


@pytest.mark.parametrize("medium", ["image", "video"])
def test_shipped_generator_matches_its_manifest_and_loads(medium):
    folder = SHIPPED if medium == "image" else SHIPPED_VIDEO
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}
    assert files == set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert manifest["command"].startswith(f"python -m toy.pretrain_generator --medium {medium}")
    gen = diffusion.load_generator(str(folder))
    assert gen.medium == medium and gen.vae is None


def test_a_clip_generator_starts_from_the_picture_generators_weights(tiny, tmp_path):
    """AnimateDiff's inflation: the spatial layers and the text encoder are the picture generator's,
    the motion modules are new; one sample is (F, H, W, 3)."""
    picture = diffusion.load_generator(str(tiny))
    parts = build_generator("video", tmp_path, seed=1, picture=picture)
    spatial = picture.unet.state_dict()
    inflated = parts["unet"].state_dict()
    shared = [k for k in spatial if k in inflated]
    assert len(shared) > 0.9 * len(spatial)
    assert all(torch.equal(spatial[k], inflated[k]) for k in shared)
    assert any("motion_modules" in k for k in inflated)
    assert parts["text_encoder"] is picture.text_encoder
    gen = diffusion.Generator(**parts, medium="video")
    clip = diffusion.sample(gen, ["a red square moving left"], [0], steps=2)
    assert clip.shape == (1, 8, 16, 16, 3)


def test_05_scores_generators_by_the_reader_and_the_judge(tiny, tmp_path):
    """The random-weight generator draws no caption right; the shipped one draws most colours right."""
    ev = stage("05_eval")
    cfg = ev.Config(reward=str(ROOT / "toy" / "base"), base_image_generator=str(tiny), image_generator=str(SHIPPED),
                    video_generator="", gen_seeds=2, gen_steps=10)
    res = ev.evaluate_generators(cfg, "cpu")["image_generation"]
    assert res["before"]["all"]["n"] == res["after"]["all"]["n"] == 32
    assert res["after"]["colour"]["accuracy"] > 0.5 > res["before"]["colour"]["accuracy"]
    assert res["after"]["all"]["accuracy"] > res["before"]["all"]["accuracy"]
    assert 0.0 <= res["judge_win_rate"] <= 1.0
    assert "Generators before vs after" in ev.to_markdown({"judge": {}, "generators": {"image_generation": res}})


def test_an_sdxl_shaped_folder_samples_and_trains_through_the_same_code(tmp_path):
    """The real path on a tiny SDXL built from its classes: two text encoders (hidden states concatenated,
    the second's pooled embedding and the time ids as added conditions), a VAE, an Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from toy.tiny_generator import build_clip_tokenizer
    torch.manual_seed(0)
    tok = build_clip_tokenizer(tmp_path / "words")
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=12)
    gen = diffusion.Generator(
        unet=UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                  attention_head_dim=(2, 4), addition_embed_type="text_time", addition_time_embed_dim=4,
                                  projection_class_embeddings_input_dim=16 + 6 * 4),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16)), tokenizer_2=tok,
        vae=AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    diffusion.save_generator(gen, tmp_path / "sdxl")
    assert json.loads((tmp_path / "sdxl" / "model_index.json").read_text())["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    gen = diffusion.load_generator(str(tmp_path / "sdxl"))
    assert gen.vae is not None and gen.text_encoder_2 is not None
    hidden, added = diffusion.encode_captions(gen, ["a red square at the top", "a blue square on the left"])
    assert hidden.shape == (2, 12, 32) and added["text_embeds"].shape == (2, 16) and added["time_ids"].shape == (2, 6)
    px = diffusion.sample(gen, ["a red square at the top"], [0], steps=2)
    assert px.shape == (1, 16, 16, 3)
    x = diffusion.to_model_space(gen, np.stack([px[0], px[0]]))
    assert x.shape == (2, 4, 8, 8)
    mse_w, mse_l = dpo.pair_errors(gen, gen.unet, x[:1], x[1:], hidden[:1], torch.tensor([300]), torch.randn(1, 4, 8, 8),
                                   {k: v[:1] for k, v in added.items()})
    assert torch.isfinite(mse_w).all() and mse_w.shape == (1,)
