"""
The CPU demo of ViSS-R1, and the fixtures that make it (and the tests and bench.py) possible without downloads.

    python demo.py                   # ~7 min on 2 CPU cores: SFT -> Pretext-GRPO and ViSS-R1 GRPO on synthetic clips
    python demo.py --seed 2 --out demo2

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


def write_demo_data(root: str, n: int = 64, size: int = 56, frames: int = 4, seed: int = 0,
                    n_eval: int = 32) -> tuple[str, str]:
    """Synthetic clips a tiny model can learn from: cues every vision token carries, the way it carries colour.
    The scene is tinted with one of four colours (the user question asks which); grey light is added to it
    frame after frame, the same in every pixel and for every colour (a reversed clip darkens inside every
    2-frame temporal patch: arrow); each 14x14 patch darkens towards its bottom (a rotation turns that
    texture: rotate); a small grey square drifts across as a distractor."""
    # writes videos/*.y4m, rl.jsonl (Video-R1 rows), sft.jsonl (format-only SFT rows, random answers) and
    # eval_demo.json (n_eval held-out clips in Video-R1-eval format, for eval.py)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    names = list(DEMO_COLORS)
    rl, sft, held_out = [], [], []
    for i in range(n + n_eval):
        color = names[i % len(names)]
        texture = 2.0 * (np.arange(size) % 14)  # [size] darker towards the bottom of every patch: rotate
        light = 130.0 * np.arange(frames) / max(1, frames - 1)  # [frames] brighter and brighter: arrow
        tint = 0.6 * np.array(DEMO_COLORS[color], np.float64)  # [3]
        clip = tint[None, :, None, None] + light[:, None, None, None] - texture[None, None, :, None]
        clip = np.broadcast_to(clip.clip(0, 255), (frames, 3, size, size)).astype(np.uint8)  # [frames, 3, H, W]
        s, y0, x0 = size // 4, rng.integers(0, size // 2), rng.integers(0, size // 2)
        for t in range(frames):  # the distractor drifts one pixel every other frame
            clip[t, :, y0 + t // 2:y0 + t // 2 + s, x0:x0 + s] = 128
        write_y4m(os.path.join(root, "videos", f"clip_{i:03d}.y4m"), clip)
        row = {"problem_id": i, "problem": "What colour is the scene in the video?\n", "data_type": "video",
               "problem_type": "multiple choice", "options": [f"{V.LETTERS[k]}. {c}" for k, c in enumerate(names)],
               "solution": f"<answer>{V.LETTERS[names.index(color)]}</answer>", "path": f"./videos/clip_{i:03d}.y4m",
               "data_source": "demo"}
        if i >= n:  # held out for evaluation
            held_out.append(dict(row, original_question_type="colour"))
            continue
        rl.append(row)
        guess = f"<answer>{V.LETTERS[rng.integers(4)]}</answer>"  # uninformative: teaches the format only
        sft.append(dict(row, process="<think>I look.</think>", solution=guess))
        sft.append(dict(row, process="<think>I look.</think>", solution=guess,
                        trans_opt="arrow", trans_ans="A"))  # the 3-tag ViSS format, transform always "A"
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

def run_demo(root: str = "out", seed: int = 42, sft_steps: int = 100, rl_steps: int = 120) -> dict:
    """`python demo.py`: on synthetic clips with a tiny Qwen2.5-VL built on the spot, a short SFT that
    teaches only the output format (random answers), then the paper's two RL recipes from that checkpoint:
    Pretext-GRPO (the pretext letter is the whole reward) and ViSS-R1 GRPO (user answer + transform + format).
    The pretext task is `arrow`, as in the release's final video RL run. --out ends as the ViSS-R1 checkpoint.
    Frames are 168x168 (72 vision tokens per clip): at 112x112 the colour reached the answer on some seeds only."""
    import shutil
    import time
    t0 = time.time()
    size = 168  # clips are written at the size the model sees: video_min_pixels = video_max_pixels = size²
    rl, sft = write_demo_data(os.path.join(root, "data"), size=size)
    corpus = [V.r1_prompt(json.loads(line)) for line in open(rl)][:4]
    base = build_tiny_checkpoint(os.path.join(root, "base"), "qwen2_5_vl", corpus=corpus, vision_hidden=64,
                                 vocab_size=2000, seed=seed)
    common = ["--media_root", os.path.join(root, "data"), "--nframes", "4", "--video_min_pixels", str(size * size),
              "--video_max_pixels", str(size * size), "--per_device_prompts", "8", "--save_steps", "100000",
              "--log_rollouts_every", "25", "--seed", str(seed), "--pretext_tasks", "arrow"]
    # constant lr: with cosine decay, runs that find the cue late (seed-dependent) stall before they reach it
    rlx = ["--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--max_steps", str(rl_steps),
           "--temperature", "0.7", "--top_p", "1.0", "--max_completion_length", "20"]
    stages = [("sft", base, sft, root + "/sft", ["--learning_rate", "3e-3", "--max_steps", str(sft_steps)]),
              ("pretext", root + "/sft", rl, root + "/pretext", rlx),
              ("viss", root + "/sft", rl, root, rlx)]
    curves = {}
    for stage, model, data, out, extra in stages:
        V.print0(f"\n=== {stage}: {model} -> {out} ===")
        for d in [d for d in os.listdir(out) if re.fullmatch(r"step-\d{6}", d)] if os.path.isdir(out) else []:
            shutil.rmtree(os.path.join(out, d))  # the demo's own earlier run: start it again
        V.train(V.parse_args(["--stage", stage, "--model", model, "--data", data, "--out", out] + common + extra))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            curves[stage] = [json.loads(line) for line in f]
    summary = {"minutes": (time.time() - t0) / 60}
    V.print0("\nlearning curves (means over 10-step windows):")
    for stage, key, name in [("pretext", "rewards/accuracy/mean", "Pretext-GRPO pretext accuracy"),
                             ("viss", "rewards/accuracy/mean", "ViSS-R1 user-question accuracy"),
                             ("viss", "rewards/transform/mean", "ViSS-R1 transform reward"),
                             ("viss", "rewards/format/mean", "ViSS-R1 format reward")]:
        vals = [m[key] for m in curves[stage]]
        points = [sum(vals[i:i + 10]) / len(vals[i:i + 10]) for i in range(0, len(vals), 10)]
        V.print0(f"{name:>32}: " + " ".join(f"{p:.2f}" for p in points))
        summary[name] = (points[0], points[-1])
    V.print0(f"demo finished in {summary['minutes']:.1f} min; the ViSS-R1 checkpoint is {root}")
    return summary


def main(argv=None) -> dict:
    import argparse
    p = argparse.ArgumentParser(description="ViSS-R1 CPU demo (see the module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out", help="data, checkpoints and metrics; ends as the ViSS-R1 checkpoint")
    p.add_argument("--seed", type=int, default=42, help="model initialisation, data order and sampling")
    args = p.parse_args(argv)
    return run_demo(args.out, args.seed)


if __name__ == "__main__":
    main()
