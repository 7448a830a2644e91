"""The tiny Qwen2.5-VL that stands in for a downloaded checkpoint: its config, its tokenizer trained in
code, and its chat template. toy/pretrain_base.py builds it from random weights and pretrains it into
toy/base/; every stage then loads toy/base/ with the same calls a hub checkpoint takes.
"""
from __future__ import annotations

import torch

from vlm import END_OF_TURN

# The chat template of the tiny model: Qwen's format (<|im_start|>role\n ... <|im_end|>\n) with media
# first in the user turn, each labelled "Picture k: " / "Video k: " when add_vision_id is set, exactly
# as Qwen2.5-VL's own template renders them. No default system prompt: the tiny model learns faster
# without one (DESIGN.md section 5a). Real checkpoints bring their own template.
TINY_CHAT_TEMPLATE = (
    "{% set images = namespace(n=0) %}{% set videos = namespace(n=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set images.n = images.n + 1 %}"
    "{% if add_vision_id %}{{ 'Picture ' + images.n|string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{% set videos.n = videos.n + 1 %}"
    "{% if add_vision_id %}{{ 'Video ' + videos.n|string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Sizes of the tiny toy model. Qwen2.5-VL in miniature: a 64x64 image is 8x8 patches of 8 px, merged
# 2x2 into 16 tokens. Clips are read at 32x32 per frame (as Qwen2.5-VL's own settings give videos
# fewer pixels per frame than images): 8 frames = 4 temporal patches of 2x2 merged tokens = 16 tokens,
# which made video steps 2.6x faster than at 64x64. Token embeddings start at std 0.3 rather than 0.02
# so that a text token is not drowned by visual tokens (whose norm is ~25x larger at init).
TINY = dict(text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_ffn=512,
            vision_hidden=64, vision_depth=2, vision_heads=4, vision_ffn=256,
            patch=8, merge=2, image_px=64, video_px=32, vocab=512, tie=True, embed_std=0.3)


def build_tiny_tokenizer(corpus, vocab_size):
    """A byte-level BPE tokenizer trained in code on the toy texts, with Qwen's special tokens.
    Digits are split one per token, as Qwen's tokenizer does, so each score is a single token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TURN, pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def build_tiny_vlm(corpus, seed: int = 0, sizes: dict = TINY):
    """A randomly initialised Qwen2.5-VL with a tokenizer trained on `corpus` and an offline processor.

    It is a real `Qwen2_5_VLForConditionalGeneration`: once saved with `save_pretrained` it loads with
    `AutoModelForImageTextToText` / `AutoProcessor` exactly like a hub checkpoint.
    """
    from transformers import AutoModelForImageTextToText
    processor, config = processor_and_config(corpus, sizes)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, sizes["embed_std"])
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return model, processor


def processor_and_config(corpus, sizes: dict = TINY):
    """The offline processor (tokenizer trained on `corpus`) and the Qwen2_5_VLConfig of these sizes."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    s = sizes
    tokenizer = build_tiny_tokenizer(corpus, s["vocab"])
    px, vpx = s["image_px"] ** 2, s["video_px"] ** 2   # real media are resized down to these areas
    patches = dict(patch_size=s["patch"], merge_size=s["merge"], temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches, min_pixels=px // 4, max_pixels=px),
        video_processor=Qwen2VLVideoProcessor(**patches, min_pixels=vpx // 4, max_pixels=vpx,
                                              cap_pixels_per_frame=False, do_sample_frames=False),
        tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = s["text_hidden"] // s["text_heads"]
    t = head_dim // 2  # M-RoPE splits the rotary half-dims into (temporal, height, width) sections
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(len(tokenizer), s.get("model_vocab", 0)), hidden_size=s["text_hidden"],
            intermediate_size=s["text_ffn"],
            num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
            num_key_value_heads=s["text_kv_heads"], max_position_embeddings=s.get("max_positions", 4096),
            rope_parameters={"rope_type": "default", "rope_theta": s.get("rope_theta", 10000.0),
                             "mrope_section": [t - 2 * (3 * t // 8), 3 * t // 8, 3 * t // 8]},
            tie_word_embeddings=s["tie"], bos_token_id=None, eos_token_id=ids(END_OF_TURN),
            pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"],
            num_heads=s["vision_heads"], patch_size=s["patch"], spatial_merge_size=s["merge"],
            temporal_patch_size=2, window_size=s.get("window", s["image_px"]), out_hidden_size=s["text_hidden"],
            fullatt_block_indexes=s.get("fullatt", list(range(s["vision_depth"])))),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=s["tie"])
    return processor, config
