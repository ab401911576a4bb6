"""
bench.py: how fast is the ViSS-R1 reference, and where do the time and memory of a GRPO step go?

In the spirit of nanoGPT's bench.py. It builds a randomly initialised Qwen2.5-VL of the real architecture
locally (no download) at a preset size, writes a real video file (YUV4MPEG2, decoded by decord like a
training clip, then resized, patched and prompted by viss_r1), and measures in one run, side by side:

  1. rollout   viss_r1.sample_group (vision tower + prefill once, KV cache repeated G times) against
               model.generate(num_return_sequences=G), as the authors' release samples, on the same long
               video and the same number of new tokens: wall time, completion tokens/s, ratio. Greedy
               outputs must be identical, and are checked on every run. Then both sample at top_p (0.95,
               the paper's): decode ms per token, where a decode step's time goes at the vocabulary, and
               the whole rollout at 768 tokens projected from prefill + 767 decode steps.
  2. logprobs  viss_r1.token_logprobs (chunked, completion tokens only) against full float32 logits,
               forward + backward at Qwen's 151,936-token vocabulary: peak extra memory and time.
  3. step      train()'s GRPO step on one process (1 prompt x G completions on the 32-frame ViSS-R1 clip,
               grpo stage: beta 0.04, AdamW): media decode, rollout with rewards, reference log-probs,
               forward+backward, optimizer; scoring per row (G sequences [prompt; c_g]) against prefix-shared
               (one sequence [prompt; c_1..c_G]) at each --step_tokens, side by side (the two modes' steps
               interleaved in one process): time, peak memory, log-probs.
  4. scaling   step time and peak memory as G (2, 4, 8, 16), frames (8, 16, 32) and completion length grow.

  5. --accept   the GPU acceptance check (torchrun --nproc_per_node 1 bench.py --accept): PASS / FAIL lines
               for a training step of every stage, prefix-shared log-probs, greedy = generate, eval.py and
               annotate.py, then figures against dry_run.py's plan and the data sheet (README).

Usage:
  python bench.py                               # cpu preset: 16 and 32 frames x 128*28*28 px, G 8; ~4 min, 2 cores
  python bench.py --preset tiny --json b.json   # smoke test, < 30 s (the test suite runs it)
  python bench.py --preset gpu --json gpu.json  # paper shapes: 32 frames x 128*28*28 px, G 8, 768 tokens, bf16
  python bench.py --preset 7b                   # Qwen2.5-VL-7B dimensions, random weights: rollout + logprobs
  python bench.py --sections rollout --frames 32 --new_tokens 16,128 --repeats 5
  python bench.py --sections rollout --vocab 151936  # decode cost at Qwen's real vocabulary
  python bench.py --sections step --frames 2 --max_pixels 3136 --step_tokens 768   # a prompt of C/4 tokens

How it measures:
  - every figure is the median of --repeats runs after --warmup runs, with the spread (max - min) / 2. On
    CUDA each timed call sits between two CUDA events and ends with a synchronisation.
  - peak memory on CUDA: torch.cuda.max_memory_allocated() above what was allocated before. On CPU: the rise
    of the resident-set high-water mark (ru_maxrss) in a fresh process, one per configuration, forked from a
    forkserver that has imported the libraries and computed nothing. A step's peak counts weights,
    gradients, AdamW state, activations; it comes from one more, untimed, step in which blocks from 1 MiB
    up are mapped and unmapped one by one (the resident set then follows the live tensors; glibc's heap
    would keep freed memory); its scoring peak (reference + forward + backward) counts from what was in use
    before the reference forward, the mark reset there (malloc_trim, then /proc/self/clear_refs).
  - MFU = model FLOPs / time / peak: on CUDA the GPU's dense bf16 peak from its name (PEAK_BF16), else
    (any CPU) the rate of a square matmul timed here (float32 on CPU), labelled as measured. Model FLOPs
    count the dense matmuls each path executes. With P prompt and C completion tokens, S = P + C, N_llm
    weights in the decoder layers, N_head = vocab x d, N_vis in the vision tower, L layers of width d:
      scoring, G rows             G (2 N_llm S + 2 L d S^2 (causal QK^T and AV) + 2 N_head C)
      scoring, prefix-shared      2 N_llm (P + G C) + 2 L d (P^2 + 2 G C P + G C^2) + 2 N_head G C
      the clip                    2 N_vis patches, once per prompt however often the code runs the tower
      decoding one token at s     2 N_llm + 4 L d s + 2 N_head;    backward = 2 x forward
  - the tiny and cpu presets give the model the tiny tokenizer's ~520-token vocabulary, so that decoding is
    not all lm_head (--vocab 151936 gives the real one); the log-prob comparison always uses 151,936.
"""

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import demo as D  # noqa: E402  (tiny checkpoints and video files)
import viss_r1 as V  # noqa: E402

QWEN_VOCAB = 151_936  # the Qwen2/2.5-VL tokenizer (the 7B checkpoint pads its embedding to 152,064)
SECTIONS = ("rollout", "logprobs", "step", "scaling")
PARTS = ("media", "rollout", "ref_logprobs", "fwd_bwd", "optimizer")
MODES = ("rows", "shared")  # scoring: G rows [prompt; c_g], or one sequence [prompt; c_1..c_G]
# dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, matched in the device name
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}

# ---------------------------------------------------------------------------------------------------------
# Presets: model size, clip and workload in one table (the flags override the workload)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    hidden: int  # language model: width, layers, heads, KV heads, MLP width
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int  # vision tower (patch 14, temporal patch 2, 2x2 merge): width, blocks, heads, MLP width
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    frames: int  # frames sampled from a src_h x src_w clip, each resized to at most max_pixels
    max_pixels: int
    viss_frames: int  # the rollout and step sections' clip (ViSS-R1: 32 frames), so that the prompt dominates
    new_tokens: tuple  # rollout comparison: short and long completions
    step_tokens: tuple  # completion lengths of the step section (per-row vs prefix-shared scoring)
    sweep_tokens: int  # completion length at the scaling sweep's base point (frames: `frames`)
    scale_tokens: tuple
    lp_tokens: int  # log-prob comparison: completion tokens (G x C), width, and token_logprobs' chunk
    lp_hidden: int  # (memory does not depend on the width; time grows with it)
    lp_chunk: int  # (the training path uses the default, 1024)
    vocab: int | None = None  # None: the tiny tokenizer's own (~520)
    top_p: float = 0.95  # the sampled rollouts (rollout section, the step's rollout): the paper's
    src_h: int = 360
    src_w: int = 640
    G: int = 8
    scale_G: tuple = (2, 4, 8, 16)
    scale_frames: tuple = (8, 16, 32)
    repeats: int = 3
    scale_repeats: int = 2
    warmup: int = 1
    bf16: bool = False  # autocast bf16, float32 weights and AdamW state: viss_r1.train(--bf16)
    grad_ckpt: bool = False  # gradient checkpointing in the training forward
    sections: tuple = SECTIONS


PAPER_PIXELS = 128 * 28 * 28  # per frame in ViSS-R1 training: at most 128 LLM tokens per 2 frames
PRESETS = {
    "tiny": Preset(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2,
                   vision_heads=2, vision_intermediate=64, frames=4, viss_frames=4, max_pixels=56 * 84, src_h=56,
                   src_w=84, G=4, new_tokens=(4, 16), step_tokens=(4, 8), sweep_tokens=8, scale_tokens=(4, 8),
                   lp_tokens=128, lp_hidden=64, lp_chunk=32, scale_G=(2, 4), scale_frames=(4, 8), repeats=2),
    # a 2-layer model; rollout and step on the ViSS-R1 clip (32 frames x 128*28*28 px: 2,121 prompt tokens),
    # the sweep around the Pretext-GRPO / Video-R1 clip (16 frames: 1,161 prompt tokens)
    "cpu": Preset(hidden=192, layers=2, heads=4, kv_heads=2, intermediate=768, vision_hidden=64, vision_depth=2,
                  vision_heads=2, vision_intermediate=256, frames=16, viss_frames=32, max_pixels=PAPER_PIXELS,
                  new_tokens=(16, 128), step_tokens=(128, 512), sweep_tokens=64, scale_tokens=(16, 64, 128),
                  lp_tokens=8 * 64, lp_hidden=128, lp_chunk=64),  # 8 chunks, as 8 x 768 make 6 chunks of 1,024
    # the ViSS-R1 clip (32 frames), Qwen2.5-1.5B's language model with the 7B's vision tower: ~2.2B
    # parameters, policy + reference + AdamW fit one 80 GB GPU
    "gpu": Preset(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=QWEN_VOCAB,
                  vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, frames=32,
                  viss_frames=32, max_pixels=PAPER_PIXELS, new_tokens=(32, 768), step_tokens=(128, 768),
                  sweep_tokens=768, scale_tokens=(128, 384, 768), lp_tokens=8 * 768, lp_hidden=3584, lp_chunk=1024,
                  repeats=5, scale_repeats=3, warmup=2, bf16=True, grad_ckpt=True),
    # Qwen2.5-VL-7B's dimensions. Its float32 step (weights + grads + AdamW: 16 B/param) needs FSDP over
    # several GPUs, hence rollout and logprobs only (--sections step on one 141 GB GPU will not fit)
    "7b": Preset(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152_064,
                 vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, frames=32,
                 viss_frames=32, max_pixels=PAPER_PIXELS, new_tokens=(32, 768), step_tokens=(128, 768),
                 sweep_tokens=768, scale_tokens=(128, 384, 768), lp_tokens=8 * 768, lp_hidden=3584, lp_chunk=1024,
                 repeats=5, scale_repeats=3, warmup=2, bf16=True, grad_ckpt=True, sections=("rollout", "logprobs")),
}

# ---------------------------------------------------------------------------------------------------------
# Measuring: timer, peak memory, a fresh process per memory figure on CPU, the matmul rate
# ---------------------------------------------------------------------------------------------------------


def timed(fn, device: torch.device):
    """fn() once -> (its result, seconds). CUDA: events around the call, then synchronise."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def summary(xs: list) -> dict:
    return {"median": statistics.median(xs), "spread": (max(xs) - min(xs)) / 2, "n": len(xs)}


def memory_mark(device: torch.device) -> int:
    """Bytes to measure a peak from: CUDA, allocated now (peak stats reset); CPU, the high-water RSS so far."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


def peak_mib(device: torch.device, mark: int) -> float:
    now = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (now - mark) / 2**20


def mmap_threshold(nbytes: int) -> None:
    """glibc serves blocks below its mmap threshold (adaptive, up to 32 MiB) from heap arenas that keep freed
    memory, so ru_maxrss also counts the dead chunks of a loop over chunks. At 1 MiB, blocks from 1 MiB up
    are mapped and unmapped one by one and the RSS follows the live tensors (slower: every block is faulted
    in afresh); 32 MiB is glibc's usual steady state, for timing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: measure as is
        pass


def restart_peak(device: torch.device) -> tuple[int, int]:
    """-> (the peak so far, bytes in use now), and the peak counter restarts from now. CUDA: allocator stats.
    CPU (Linux, glibc): freed heap memory goes back to the OS (malloc_trim), then the kernel resets the
    resident-set high-water mark (writing 5 to /proc/self/clear_refs), which ru_maxrss reports."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return before, torch.cuda.memory_allocated()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_FORKSERVER = None


def isolated(fn, job: dict):
    """fn(job) in a fresh process on CPU (its own ru_maxrss), in this process on CUDA (peak stats reset).
    The forkserver imports torch, transformers and viss_r1 once and computes nothing, so its children start
    at the libraries' footprint and can use OpenMP threads (a child forked after OpenMP ran would hang)."""
    global _FORKSERVER
    if job["device"] != "cpu":
        out = fn(job)
        torch.cuda.empty_cache()
        return out
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "transformers", "viss_r1",
                                            "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"])
    with _FORKSERVER.Pool(1) as pool:
        return pool.apply(fn, (job,))


def matmul_rate(device: torch.device) -> float:
    """Best FLOP/s of a square matmul, the machine's practical peak: float32 2048^2 on CPU, bf16 8192^2 on CUDA."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, device)[1] for _ in range(20 if device.type == "cuda" else 3))


def mfu_peak(device: torch.device, measured: float) -> tuple[float, str]:
    """(FLOP/s that MFU divides by, its label): a known GPU's data-sheet bf16 peak, else the measured matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16.items():  # the longer names first ("H100 PCIe" before "H100")
            if key in name:
                return peak, f"{name} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    kind = "bf16" if device.type == "cuda" else "float32"
    return measured, f"measured {kind} matmul rate {measured / 1e12:.3f} TFLOP/s (peak not known for this device)"

# ---------------------------------------------------------------------------------------------------------
# Model and inputs: a random Qwen2.5-VL at the preset's size, a real video file, one prompt
# ---------------------------------------------------------------------------------------------------------


def build_skeleton(out_dir: str) -> str:
    """viss_r1's tiny checkpoint: tokenizer, chat template, special-token ids, preprocessor config, and the
    config that build_model() resizes (build_tiny_checkpoint fixes 4 heads and a 2x MLP)."""
    return D.build_tiny_checkpoint(out_dir, "qwen2_5_vl", hidden_size=64, num_layers=1, vision_hidden=32,
                                   vision_depth=1)


def build_model(skeleton: str, p: Preset, device: torch.device, grad_ckpt: bool = False):
    """A float32 Qwen2_5_VLForConditionalGeneration of the preset's size; the same weights every call."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    cfg = AutoConfig.from_pretrained(skeleton)
    head_dim = p.hidden // p.heads
    half = head_dim // 2
    hw = half * 3 // 8  # M-RoPE splits head_dim / 2 into time, height, width: 16, 24, 24 for head_dim 128
    cfg.text_config.update(dict(hidden_size=p.hidden, num_hidden_layers=p.layers, num_attention_heads=p.heads,
                                num_key_value_heads=p.kv_heads, intermediate_size=p.intermediate, head_dim=head_dim,
                                layer_types=["full_attention"] * p.layers,
                                vocab_size=p.vocab or cfg.text_config.vocab_size))
    cfg.text_config.rope_parameters["mrope_section"] = [half - 2 * hw, hw, hw]
    cfg.vision_config.update(dict(hidden_size=p.vision_hidden, depth=p.vision_depth, num_heads=p.vision_heads,
                                  intermediate_size=p.vision_intermediate, out_hidden_size=p.hidden,
                                  fullatt_block_indexes=[i for i in range(p.vision_depth) if i % 8 == 7]  # 7B's
                                  or [p.vision_depth - 1]))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def write_clip(path: str, frames: int, height: int, width: int) -> str:
    """A moving colour pattern saved as a real .y4m file at 2 fps."""
    y, x = np.mgrid[0:height, 0:width]
    clip = [np.stack([(x + 9 * t) % 256, (y + 5 * t) % 256, (x + y + 3 * t) % 256]) for t in range(frames)]
    D.write_y4m(path, np.stack(clip).astype(np.uint8), fps=2)
    return path


ROW = {"problem_id": 0, "problem": "What does the person do after opening the door? ", "data_type": "video",
       "problem_type": "multiple choice", "options": ["A. sits down", "B. leaves", "C. waves", "D. turns it off"],
       "solution": "<answer>B</answer>", "path": "clip.y4m", "data_source": "bench"}


def step_args(p: Preset, frames: int, G: int, N: int, shared: bool, media_root: str) -> V.Args:
    """train()'s configuration for the bench row: the grpo stage (Video-R1 prompt, beta 0.04), this clip size."""
    return V.parse_args(["--stage", "grpo", "--media_root", media_root, "--nframes", str(frames),
                         "--video_min_pixels", str(min(4 * 28 * 28, p.max_pixels)), "--video_max_pixels",
                         str(p.max_pixels), "--num_generations", str(G), "--max_completion_length", str(N),
                         "--top_p", str(p.top_p), "--prefix_sharing" if shared else "--no-prefix_sharing"])


def make_sample(video: str, skeleton: str, frames: int, p: Preset) -> V.Sample:
    """The training path for one clip (viss_r1.make_sample): decode `frames` frames, fit to max_pixels, patch,
    Video-R1 prompt ids."""
    from transformers import AutoConfig, AutoTokenizer
    spec = V.vision_spec(AutoConfig.from_pretrained(skeleton), skeleton)
    args = step_args(p, frames, p.G, 1, True, os.path.dirname(video))
    return V.make_sample(ROW, args, spec, AutoTokenizer.from_pretrained(skeleton), random.Random(0))


def never_eos(model) -> list[int]:
    """An EOS that is never emitted: the video placeholder, which both samplers mask (-inf bias,
    suppress_tokens). Every completion then has exactly max_new_tokens tokens, in every sampler."""
    return [model.config.video_token_id]


def autocast(device: torch.device, p: Preset):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.bf16)


def flop_counts(model) -> dict:
    n = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    cfg = model.config.get_text_config()
    return {"llm": n(model.model.language_model.layers), "head": model.lm_head.weight.numel(),
            "vis": n(model.model.visual), "L": cfg.num_hidden_layers, "d": cfg.num_attention_heads * cfg.head_dim}


def forward_flops(c: dict, rows: int, P: int, C: int, patches: int, shared: bool = False) -> float:
    """Scoring forward of `rows` completions of C tokens after one P-token prompt, as G rows or as one
    prefix-shared sequence (docstring formulas)."""
    S, L, d = P + C, c["L"], c["d"]
    if shared:
        return (2 * c["vis"] * patches + 2 * c["llm"] * (P + rows * C)
                + 2 * L * d * (P**2 + 2 * rows * C * P + rows * C**2) + 2 * c["head"] * rows * C)
    return 2 * c["vis"] * patches + rows * (2 * c["llm"] * S + 2 * L * d * S**2 + 2 * c["head"] * C)


def rollout_flops(c: dict, G: int, P: int, N: int, patches: int) -> float:
    """Vision and prefill once, then G rows decode N tokens at context P + t."""
    decode = sum(G * (2 * c["llm"] + 4 * c["L"] * c["d"] * (P + t) + 2 * c["head"]) for t in range(N))
    return 2 * c["vis"] * patches + 2 * c["llm"] * P + 2 * c["L"] * c["d"] * P**2 + decode

# ---------------------------------------------------------------------------------------------------------
# 1. Rollout: the shared-prefix group sampler against generate(num_return_sequences=G)
# ---------------------------------------------------------------------------------------------------------


def bench_rollout(model, sample: V.Sample, p: Preset, repeats: int, warmup: int, device) -> dict:
    """G greedy completions of one video prompt, N new tokens each, three ways:
      ours      viss_r1.sample_group: vision tower + prefill once, the KV cache repeated G times
      generate  model.generate(num_return_sequences=G). Since transformers 5 it encodes the video once and
                repeats the features (mm_encoder_outputs), then prefills G copies of the prompt
      copies    model.generate on a batch of G copies of prompt and clip: vision tower and prefill G times,
                which is what generate(num_return_sequences=G) did in transformers 4.x, the release's
    generate samples with top_k=1, i.e. greedily on its sampling path (it refuses num_return_sequences > 1
    without sampling). N = 1 is the prompt alone. Then ours and generate sample at top_p (temperature 1, no
    top_k) for N = 1 and the long N: decode ms per token = (t[N] - t[1]) / (N - 1)."""
    policy, G = V.Policy(model).eval(), p.G
    bias, eos, pad = V.vocab_mask(model, V.vision_spec(model.config), device), never_eos(model), \
        model.config.text_config.pad_token_id
    one = dict(input_ids=torch.tensor([sample.ids], device=device),
               mm_token_type_ids=torch.tensor([sample.types], device=device),
               **{k: v.to(device) for k, v in sample.vis.items()})
    copies = {k: torch.cat([v] * G) for k, v in one.items()}  # every row carries its own clip
    suppress = torch.nonzero(bias < 0).flatten().tolist()
    greedy = dict(do_sample=True, top_k=1, top_p=1.0, temperature=1.0, eos_token_id=eos, pad_token_id=pad,
                  suppress_tokens=suppress)
    nucleus = dict(do_sample=True, top_k=0, top_p=p.top_p, temperature=1.0, eos_token_id=eos, pad_token_id=pad,
                   suppress_tokens=suppress)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for N in [1, *p.new_tokens]:
        ways = {"ours": lambda: V.sample_group(policy, sample, G, N, 1.0, 1.0, eos, pad, bias, greedy=True)[0],
                "generate": lambda: model.generate(**one, max_new_tokens=N, num_return_sequences=G, **greedy),
                "copies": lambda: model.generate(**copies, max_new_tokens=N, **greedy)}
        same = lambda out: out["ours"].shape == (G, N) and all(  # noqa: E731
            torch.equal(out["ours"], out[k][:, len(sample.ids):]) for k in ("generate", "copies"))
        if N in (1, p.new_tokens[-1]):  # sampled, as the rollouts of training are
            ways["ours_top_p"] = lambda: V.sample_group(policy, sample, G, N, 1.0, p.top_p, eos, pad, bias, gen)[0]
            ways["generate_top_p"] = lambda: model.generate(**one, max_new_tokens=N, num_return_sequences=G,
                                                            **nucleus)
        times, equal = {k: [] for k in ways}, True
        for i in range(warmup + repeats):  # interleaved, so that a change in machine load hits all of them
            out = {}
            for k, fn in ways.items():
                with torch.no_grad(), autocast(device, p):
                    out[k], dt = timed(fn, device)
                if i >= warmup:
                    times[k].append(dt)
            if not p.bf16:
                equal &= same(out)
        if p.bf16:
            # bf16 rounds a batch-1 and a batch-G prefill differently, enough to flip a near-tie of a random
            # model's argmax: the exact check runs once more, in float32
            with torch.no_grad():
                equal = same({k: ways[k]() for k in ("ours", "generate", "copies")})
        row = {"new_tokens": N, "greedy_equal": bool(equal)}
        for k in ways:
            row[f"{k}_s"] = summary(times[k])
            row[f"{k}_tok_s"] = G * N / row[f"{k}_s"]["median"]
        row["speedup"] = row["generate_s"]["median"] / row["ours_s"]["median"]
        row["speedup_vs_copies"] = row["copies_s"]["median"] / row["ours_s"]["median"]
        rows.append(row)
        print(f"  N={N:<4d} " + "  ".join(f"{k} {row[k + '_s']['median']:6.3f}s ±{row[k + '_s']['spread']:.3f}"
                                          for k in ("ours", "generate", "copies"))
              + f"  speedup {row['speedup']:4.2f}x / {row['speedup_vs_copies']:5.2f}x  greedy equal: {equal}",
              flush=True)
    first, long = rows[0], rows[-1]
    decode = {k: (long[f"{k}_s"]["median"] - first[f"{k}_s"]["median"]) / (long["new_tokens"] - 1)
              for k in ("ours", "generate", "ours_top_p", "generate_top_p")}
    print(f"  top_p {p.top_p}: N=1 ours {first['ours_top_p_s']['median']:.3f}s generate "
          f"{first['generate_top_p_s']['median']:.3f}s; N={long['new_tokens']} ours "
          f"{long['ours_top_p_s']['median']:.3f}s"
          f" ±{long['ours_top_p_s']['spread']:.3f} generate {long['generate_top_p_s']['median']:.3f}s "
          f"±{long['generate_top_p_s']['spread']:.3f}")
    print("  decode ms/token (t[N] - t[1]) / (N - 1): greedy ours {:.1f} generate {:.1f}; top_p {} ours {:.1f} "
          "generate {:.1f}".format(*(1e3 * decode[k] for k in ("ours", "generate")), p.top_p,
                                   *(1e3 * decode[k] for k in ("ours_top_p", "generate_top_p"))))
    # the paper's 768-token rollout from these: prefill (N = 1) + 767 decode steps, sampled at top_p
    at = 768
    whole = {k: first[f"{k}_top_p_s"]["median"] + (at - 1) * decode[f"{k}_top_p"] for k in ("ours", "generate")}
    res = {"rows": rows, "decode_ms": {k: 1e3 * v for k, v in decode.items()}, "whole_tokens": at,
           "whole_s": whole, "whole_speedup": whole["generate"] / whole["ours"],
           "prefill_speedup": first["generate_top_p_s"]["median"] / first["ours_top_p_s"]["median"],
           "sampling_ms": sampling_costs(model, G, p.top_p, device, repeats + warmup)}
    print(f"  whole rollout at {at} tokens = N=1 + {at - 1} x decode, top_p {p.top_p}: ours {whole['ours']:.2f}s, "
          f"generate {whole['generate']:.2f}s: {res['whole_speedup']:.2f}x (prefill alone: "
          f"{res['prefill_speedup']:.2f}x)")
    s = res["sampling_ms"]
    print(f"  one decode step at vocab {s['vocab']}, G={G}: lm_head {s['lm_head']:.2f} ms, log_softmax "
          f"{s['log_softmax']:.2f} ms, sort-free nucleus draw {s['nucleus']:.2f} ms; a plain nucleus (generate's "
          f"top-p path) sorts {s['sort']:.2f} ms and draws with multinomial {s['multinomial']:.2f} ms", flush=True)
    return res


def sampling_costs(model, G: int, top_p: float, device, repeats: int) -> dict:
    """ms per decode step of the vocabulary-sized work: lm_head on G hidden states (it reads the whole [vocab, d]
    weight), the sampler's log_softmax and its sort-free nucleus draw, against the sort + multinomial of a
    plain nucleus (what generate's top-p does)."""
    g, vocab = torch.Generator(device).manual_seed(0), model.config.text_config.vocab_size
    h = torch.randn(G, model.config.text_config.hidden_size, device=device, generator=g)
    logits, bias = torch.randn(G, vocab, device=device, generator=g) * 3, torch.zeros(vocab, device=device)
    logp = torch.log_softmax(logits + bias, -1)
    ways = {"lm_head": lambda: model.lm_head(h), "log_softmax": lambda: torch.log_softmax(logits / 1.0 + bias, -1),
            "nucleus": lambda: V._sample_token(logp, top_p, g),
            "sort": lambda: logp.exp().sort(-1, descending=True),
            "multinomial": lambda: torch.multinomial(logp.exp(), 1, generator=g)}
    with torch.no_grad():
        out = {k: 1e3 * statistics.median(timed(fn, device)[1] for _ in range(max(3, repeats)))
               for k, fn in ways.items()}
    return dict(out, vocab=vocab)

# ---------------------------------------------------------------------------------------------------------
# 2. Scoring log-probs: chunked completion-only against full float32 logits, forward + backward
# ---------------------------------------------------------------------------------------------------------


def logprob_worker(job: dict) -> dict:
    """One mode, in its own process on CPU: hidden [T, D] and lm_head [V, D] both trainable, as in the policy.
    The first run measures the peak (on CPU with exact RSS accounting) and warms up; then the timed runs."""
    device, dtype = torch.device(job["device"]), torch.bfloat16 if job["bf16"] else torch.float32
    torch.manual_seed(0)
    T, D = job["tokens"], job["hidden"]
    h = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(QWEN_VOCAB, D, device=device) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, QWEN_VOCAB, (T,), device=device)

    def run():
        h.grad = w.grad = None
        if job["mode"] == "chunked":  # each chunk's logits are recomputed in backward
            lp = V.token_logprobs(h, w, t, chunk_size=job["chunk"])
        else:  # what a plain forward gives: [T, V] logits, then a float32 log_softmax
            lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
        lp.sum().backward()
        return lp.detach()

    if device.type == "cpu":
        mmap_threshold(1 << 20)
    mark = memory_mark(device)
    lp = run()
    peak = peak_mib(device, mark)
    if device.type == "cpu":
        mmap_threshold(32 << 20)
    for _ in range(job["warmup"] - 1):
        run()
    times = [timed(run, device)[1] for _ in range(job["repeats"])]
    return {"s": summary(times), "peak_mib": peak, "head": lp[:64].float().cpu().tolist()}


def bench_logprobs(p: Preset, repeats: int, warmup: int, device) -> dict:
    out = {"tokens": p.lp_tokens, "hidden": p.lp_hidden, "vocab": QWEN_VOCAB, "chunk": p.lp_chunk}
    for mode in ("chunked", "full"):
        out[mode] = isolated(logprob_worker, dict(mode=mode, tokens=p.lp_tokens, hidden=p.lp_hidden, chunk=p.lp_chunk,
                                                  bf16=p.bf16, device=device.type, repeats=repeats, warmup=warmup))
        print(f"  {mode:8s} {out[mode]['s']['median']:7.3f}s ±{out[mode]['s']['spread']:.3f}  "
              f"peak extra {out[mode]['peak_mib']:8.1f} MiB", flush=True)
    out["max_abs_diff"] = max(abs(a - b) for a, b in zip(out["chunked"].pop("head"), out["full"].pop("head")))
    out["memory_ratio"] = out["full"]["peak_mib"] / max(out["chunked"]["peak_mib"], 1e-9)
    out["time_ratio"] = out["full"]["s"]["median"] / out["chunked"]["s"]["median"]
    print(f"  full / chunked: memory {out['memory_ratio']:.1f}x, time {out['time_ratio']:.2f}x; "
          f"the log-probs agree to {out['max_abs_diff']:.1e}")
    return out

# ---------------------------------------------------------------------------------------------------------
# 3 and 4. One GRPO step, part by part, as viss_r1.train() runs it
# ---------------------------------------------------------------------------------------------------------


def grpo_step(policy, ref, optimizer, args: V.Args, tokenizer, spec, bias, eos, p: Preset, device,
              mem: dict | None = None, row: dict = ROW) -> tuple:
    """viss_r1.grpo_step itself (the function train() calls) for one prompt on one process, timed by its phase hook
    -> (seconds per part, reference log-probs [G, N]):
      media         viss_r1.make_sample: decode the clip from its file, resize, patch, prompt ids (before the step)
      rollout       phases rollout to reference forward: sample_group at top_p, decode the texts, rewards, advantages
      ref_logprobs  "reference forward": the reference model's scoring forward (beta 0.04), no grad
      fwd_bwd       "scoring forward" and "backward": the policy's scoring forward, grpo_loss, backward
      optimizer     "optimizer step": clip the gradient norm, AdamW step, schedule, zero the gradients
    Left out: the status line, metrics.jsonl / rollouts.jsonl, checkpoints; the step's gathers and agreements of
    ranks run, on one process. num_iterations = 1, so the old log-probs are logp.detach() (no forward of their own).
    Each phase boundary synchronises the device (CUDA), as train() does not.
    mem: fill in the step's peak bytes ("step") and the scoring's (reference + forward + backward) peak MiB
    above what was in use before it ("scoring"); the counters restart between the clock's readings."""
    assert args.beta > 0 and args.num_iterations == 1, "the parts below are the grpo stage's: a reference, 1 update"
    if mem is not None:
        restart_peak(device)
    sample, media_s = timed(lambda: V.make_sample(row, args, spec, tokenizer, random.Random(0)), device)
    run = V.Run(replace(args, bf16=p.bf16), policy, ref, optimizer, V.make_scheduler(optimizer, args), tokenizer, eos,
                policy.model.config.text_config.pad_token_id, bias)
    clock = []  # (phase, when it began, when the hook returned)

    def phase(name: str, value=None):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        if mem is not None and name == "reference forward":
            mem["rollout"], mem["base"] = restart_peak(device)
        if mem is not None and name == "optimizer step":
            mem["top"] = restart_peak(device)[0]
            mem["scoring"] = (mem["top"] - mem["base"]) / 2**20
        clock.append((name, began, time.perf_counter()))
        return value

    out = V.grpo_step(run, [sample], phase)
    phase("end")
    starts = {name: (began, resumed) for name, began, resumed in clock}
    span = lambda a, b: starts[b][0] - starts[a][1]  # noqa: E731 -- from phase a's start to phase b's
    t = {"media": media_s, "rollout": span("rollout: prefill", "reference forward"),
         "ref_logprobs": span("reference forward", "scoring forward"), "fwd_bwd": span("scoring forward",
         "optimizer step"), "optimizer": span("optimizer step", "end")}
    if mem is not None:
        mem["step"] = max(mem["rollout"], mem["top"], restart_peak(device)[0])
    return t, out["ref_logp"]


def step_worker(job: dict) -> dict:
    """One configuration, in its own process on CPU: policy, frozen reference and AdamW, then the steps of each
    scoring mode in job["modes"], interleaved (a change in machine load hits every mode) -> {mode: figures}."""
    from transformers import AutoTokenizer
    p, device, G, N = job["preset"], torch.device(job["device"]), job["G"], job["N"]
    mark = memory_mark(device)
    model = build_model(job["skeleton"], p, device, grad_ckpt=p.grad_ckpt)
    policy = V.Policy(model)
    ref = V.Policy(build_model(job["skeleton"], p, device)).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    spec, tokenizer = V.vision_spec(model.config, job["skeleton"]), AutoTokenizer.from_pretrained(job["skeleton"])
    bias, eos = V.vocab_mask(model, spec, device), never_eos(model)
    step = lambda a, mem=None: grpo_step(policy, ref, optimizer, a, tokenizer, spec, bias, eos, p, device, mem)  # noqa
    modes = {m: step_args(p, job["frames"], G, N, m == "shared", job["media_root"]) for m in job["modes"]}
    # warm-up: on CPU a small step does it (thread pools, first calls; nothing is tuned per shape); on CUDA the
    # real shape, since kernel choices and the caching allocator's pools depend on it
    for m, args in modes.items():
        for _ in range(job["warmup"]):
            step(step_args(p, job["frames"], 2, 2, m == "shared", job["media_root"]) if device.type == "cpu" else args)
    runs = {m: [] for m in modes}
    for _ in range(job["repeats"]):
        for m, args in modes.items():
            runs[m].append(step(args))
    # memory, from one more (untimed) step per mode: on CPU with blocks from 1 MiB up mapped and unmapped one by
    # one, so that the resident set follows the live tensors (timing ran with glibc's usual 32 MiB threshold)
    if device.type == "cpu":
        mmap_threshold(1 << 20)
    mems = {m: {} for m in modes}
    for m, args in modes.items():
        step(args, mems[m])
    sample = V.make_sample(ROW, next(iter(modes.values())), spec, tokenizer, random.Random(0))
    with torch.no_grad(), autocast(device, p):  # one vision-tower forward; each scoring forward runs it once
        vis = {k: v.to(device) for k, v in sample.vis.items()}
        vision_s = timed(lambda: model.model.visual(vis["pixel_values_videos"], grid_thw=vis["video_grid_thw"]),
                         device)[1]
    c, P, patches = flop_counts(model), len(sample.ids), sample.vis["pixel_values_videos"].shape[0]
    out = {}
    for m in modes:
        packed = m == "shared" and 4 * P >= N  # viss_r1.sequence_logprobs' rule
        out[m] = {"G": G, "frames": job["frames"], "N": N, "mode": m, "prompt_tokens": P, "patches": patches,
                  "parts": {k: summary([r[0][k] for r in runs[m]]) for k in PARTS},
                  "step_s": summary([sum(r[0].values()) for r in runs[m]]),
                  "ref_logprobs": runs[m][0][1].cpu().tolist(),
                  "flops": {"media": 0.0, "rollout": rollout_flops(c, G, P, N, patches),
                            "ref_logprobs": forward_flops(c, G, P, N, patches, packed),
                            "fwd_bwd": 3 * forward_flops(c, G, P, N, patches, packed), "optimizer": 0.0},
                  "peak_mib": (mems[m]["step"] - mark) / 2**20, "scoring_peak_mib": mems[m]["scoring"],
                  "vision_s": vision_s, "params_m": sum(x.numel() for x in model.parameters()) / 1e6}
    return out


def step_report(r: dict, rate: float) -> dict:
    """Tokens/s and MFU of a step_worker result."""
    t = r["step_s"]["median"]
    r["completion_tok_s"] = r["G"] * r["N"] / t
    r["mfu"] = sum(r["flops"].values()) / t / rate
    for k in PARTS:
        r["parts"][k]["mfu"] = r["flops"][k] / r["parts"][k]["median"] / rate
    return r

# ---------------------------------------------------------------------------------------------------------
# GPU acceptance check: torchrun --nproc_per_node 1 bench.py --accept. One line per check: PASS / FAIL with
# its tolerance, then FIGURE lines (measured beside what they are compared with). Also runs on CPU (gloo,
# float32, the tiny model), in the test suite, so that it cannot rot before a GPU arrives.
# ---------------------------------------------------------------------------------------------------------

# data-sheet HBM bandwidths (bytes/s), matched in the device name like PEAK_BF16
BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "GH200": 4.0e12,
             "B200": 8.0e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12, "L40S": 0.864e12}
# Qwen2.5-VL-7B's layer shapes with few layers (--accept_layers), its vision tower 8 blocks deep
ACCEPT_GPU = replace(PRESETS["7b"], layers=4, vision_depth=8, G=4, viss_frames=16, step_tokens=(128,), repeats=1)
ACCEPT_CPU = replace(PRESETS["tiny"], repeats=1)
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME")
BF16_TOL = (0.1, 0.01)  # max and mean |log-prob difference| in nats allowed between two bf16 paths (see below)


def datasheet(table: dict, device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in sorted(table.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def accept_setup(root: str, device: torch.device, layers: int = 4) -> dict:
    """A random checkpoint saved like a real one (7B layer shapes on CUDA, the tiny model on CPU), the demo's
    clips and rows (RL, SFT with `process`, an evaluation file), and the flags every check shares."""
    p = replace(ACCEPT_GPU, layers=layers) if device.type == "cuda" else ACCEPT_CPU
    skeleton, ckpt = build_skeleton(os.path.join(root, "skeleton")), os.path.join(root, "ckpt")
    model = build_model(skeleton, p, torch.device("cpu"))
    model.save_pretrained(ckpt)
    params = sum(x.numel() for x in model.parameters())  # what a reload must hold (counted once, not per check)
    del model
    for name in os.listdir(skeleton):  # tokenizer, chat template, preprocessor config
        if not name.endswith((".safetensors", "config.json")) or name == "preprocessor_config.json":
            with open(os.path.join(skeleton, name), "rb") as src, open(os.path.join(ckpt, name), "wb") as dst:
                dst.write(src.read())
    rl, sft = D.write_demo_data(os.path.join(root, "data"), n=8, size=56)
    px = str(PAPER_PIXELS if device.type == "cuda" else 3136)
    flags = ["--nframes", "4", "--video_min_pixels", px, "--video_max_pixels", px, "--image_min_pixels", "3136",
             "--image_max_pixels", px, "--num_generations", str(p.G), "--max_completion_length", "8",
             "--gradient_checkpointing", "--bf16" if device.type == "cuda" else "--no-bf16", "--max_steps", "1"]
    return {"root": root, "ckpt": ckpt, "rl": rl, "sft": sft, "data": os.path.dirname(rl), "flags": flags,
            "device": device, "preset": p, "params": params, "bench": os.path.join(os.path.dirname(rl), "eval_demo.json")}


def check_train(ctx: dict, stage: str) -> tuple[bool, str]:
    """One FSDP2 training step of `stage` (under torchrun: sharded even on one process) with the checks' flags:
    finite loss and gradient norm, and a checkpoint that plain transformers loads with every weight."""
    from transformers import AutoModelForImageTextToText
    out = os.path.join(ctx["root"], f"train-{stage}")
    m = V.train(V.parse_args(["--stage", stage, "--model", ctx["ckpt"], "--data", ctx["sft" if stage == "sft" else
                              "rl"], "--media_root", ctx["data"], "--out", out, *ctx["flags"]]))
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    n, want = sum(x.numel() for x in loaded.parameters()), ctx["params"]
    finite = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    return finite and n == want, (f"loss {m['loss']:.4g}, grad norm {m['grad_norm']:.4g} (finite: {finite}); {out} "
                                  f"loads with from_pretrained, {n:,} of {want:,} parameters")


def accept_policy(ctx: dict):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    model = AutoModelForImageTextToText.from_pretrained(ctx["ckpt"], dtype=torch.float32).to(ctx["device"]).eval()
    tok = AutoTokenizer.from_pretrained(ctx["ckpt"])
    spec = V.vision_spec(model.config, ctx["ckpt"])
    args = V.parse_args(["--stage", "viss", "--media_root", ctx["data"], *ctx["flags"]])
    sample = V.make_sample(V.load_rows(ctx["rl"])[0], args, spec, tok, random.Random(0))
    return V.Policy(model), tok, spec, sample


def check_logprobs(ctx: dict, bf16: bool) -> tuple[bool, str]:
    """Prefix-shared against per-row log-probs of the same completions (different lengths, padded after EOS).
    float32: within 1e-5. bf16 (autocast): every activation is rounded to 8 significant bits (2^-8 = 0.4 %
    relative), and the two paths run different kernels on different shapes, so a logit of magnitude 10-20 can
    move by a few bf16 steps of 0.04-0.08: max |diff| <= 0.1 nats, mean <= 0.01 (a real bug, e.g. a wrong mask
    or position, moves log-probs by whole nats)."""
    policy, tok, spec, s = accept_policy(ctx)
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 100, (4, 12), generator=g).to(ctx["device"])
    comp[0, 5:], comp[1, 9:] = tok.pad_token_id, tok.pad_token_id
    comp[0, 4] = comp[1, 8] = tok.eos_token_id
    mask = V.completion_mask(comp, tok.eos_token_id)
    with torch.no_grad(), torch.autocast(ctx["device"].type, dtype=torch.bfloat16, enabled=bf16):
        shared, rows = (V.sequence_logprobs(policy, s, comp, 1.0, None, shared=flag) for flag in (True, False))
    d = ((shared - rows).abs() * mask)
    big, mean = d.max().item(), (d.sum() / mask.sum()).item()
    ok = (big <= BF16_TOL[0] and mean <= BF16_TOL[1]) if bf16 else big <= 1e-5
    tol = f"max <= {BF16_TOL[0]}, mean <= {BF16_TOL[1]}" if bf16 else "max <= 1e-5"
    return ok, f"max |diff| {big:.2e}, mean {mean:.2e} over {int(mask.sum())} tokens ({tol})"


def check_greedy(ctx: dict) -> tuple[bool, str]:
    """The sampler's greedy tokens equal generate()'s (eval.py's call), and so do the position_ids each feeds
    the language model in its prefill and in every decode step."""
    policy, tok, spec, s = accept_policy(ctx)
    seen = {"sampler": [], "generate": []}
    model, key = policy.model, ["sampler"]
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: seen[key[0]].append(kw["position_ids"][-3:].cpu()), with_kwargs=True)
    eos, bias = never_eos(model), V.vocab_mask(model, spec, ctx["device"])
    ours, _ = V.sample_group(policy, s, 1, 8, 1.0, 1.0, eos, tok.pad_token_id, bias, greedy=True)
    key[0] = "generate"
    theirs = __import__("eval").generate_batch(model, [s], eos, tok.pad_token_id, torch.isinf(bias).nonzero()
                                               .flatten().tolist(), 8)
    hook.remove()
    same_tokens = ours.cpu().tolist() == theirs.cpu().tolist()
    a, b = seen["sampler"], seen["generate"]
    same_pos = len(a) == len(b) and torch.equal(a[0], b[0]) and all(
        torch.equal(x[..., -1:].expand(3, 1, 1), y[..., -1:].expand(3, 1, 1)) for x, y in zip(a[1:], b[1:]))
    return same_tokens and same_pos, (f"{ours.shape[1]} greedy tokens {'equal' if same_tokens else 'DIFFER'}; "
                                      f"position_ids of the prefill and {len(a) - 1} decode steps "
                                      f"{'equal' if same_pos else 'DIFFER'}")


def check_eval(ctx: dict) -> tuple[bool, str]:
    """eval.py on the checkpoint: every item generated and scored, none failed."""
    import eval as E
    out = os.path.join(ctx["root"], "eval")
    res = E.main(["--ckpt", ctx["ckpt"], "--bench", ctx["bench"], "--media_root", ctx["data"], "--out", out,
                  "--nframes", "4", "--max_new_tokens", "8", "--limit", "4"])
    s = next(iter(res.values()))["none"]
    return s["scored"] == s["items"] > 0, f"{s['scored']} of {s['items']} items scored, {s['failed']} failed"


def check_annotate(ctx: dict) -> tuple[bool, str]:
    """annotate.py with the checkpoint as the teacher: every row ends kept or rejected, none failed."""
    import annotate as N
    out = os.path.join(ctx["root"], "annotate")
    s = N.main(["--model", ctx["ckpt"], "--data", ctx["rl"], "--media_root", ctx["data"], "--out", out,
                "--nframes", "4", "--max_new_tokens", "8", "--limit", "4", "--video_min_pixels", "3136",
                "--video_max_pixels", "3136"])
    return s["failed"] == 0 and s["kept"] + s["rejected"] == s["rows"] == 4, (
        f"{s['rows']} rows: {s['kept']} kept, {s['rejected']} rejected, {s['failed']} failed")


CHECKS = {f"train {s}": (lambda c, s=s: check_train(c, s)) for s in ("sft", "pretext", "viss", "grpo")}
CHECKS.update({"log-probs float32": lambda c: check_logprobs(c, False),
               "log-probs bf16": lambda c: check_logprobs(c, True), "greedy = generate": check_greedy,
               "eval.py": check_eval, "annotate.py": check_annotate})


def accept_figures(ctx: dict) -> list[str]:
    """Measured peak memory by phase against dry_run.py's plan of the same step, decode time per token against
    the bandwidth bound, prefill and scoring MFU against the data-sheet peak, the step's time by phase."""
    device, p = ctx["device"], ctx["preset"]
    cpu = device.type == "cpu"
    where = "CPU figures (not a GPU's)" if cpu else torch.cuda.get_device_name(device)
    N = p.step_tokens[0] if not cpu else 8
    args = V.parse_args(["--stage", "grpo", "--media_root", ctx["data"], "--model", ctx["ckpt"], *ctx["flags"],
                         "--max_completion_length", str(N)])
    policy, tok, spec, _ = accept_policy(ctx)
    if args.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = accept_policy(ctx)[0].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    bias, eos = V.vocab_mask(policy.model, spec, device), never_eos(policy.model)
    row, bp, mem = dict(ROW, path=V.load_rows(ctx["rl"])[0]["path"]), replace(p, bf16=args.bf16), {}
    grpo_step(policy, ref, optimizer, args, tok, spec, bias, eos, bp, device, row=row)  # warm-up
    parts, _ = grpo_step(policy, ref, optimizer, args, tok, spec, bias, eos, bp, device, mem, row)
    lines = [f"FIGURE step time by phase ({where}): " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items())]
    plan = os.path.join(ctx["root"], "plan.json")  # dry_run.py in a process of its own: one process, no group
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dry_run.py"),
                    "--stage", "grpo", "--model", ctx["ckpt"], "--media_root", ctx["data"], "--world_size", "1",
                    *ctx["flags"], "--max_completion_length", str(N), "--json", plan], check=True,
                   capture_output=True, env={k: v for k, v in os.environ.items() if k not in DIST_ENV})
    with open(plan) as f:
        ph = json.load(f)["phases"]
    planned = {"rollout": max(ph["rollout: prefill"]["total"], ph["rollout: decode"]["total"]),
               "step": max(r["total"] for r in ph.values())}
    for k in ("rollout", "step"):
        if cpu:
            lines.append(f"FIGURE peak memory {k}: planned {planned[k] / 2**20:.1f} MiB (dry_run.py, one process); "
                         f"measured: not on CPU (no allocator counter; bench.py --sections step measures ru_maxrss)")
        else:
            got = mem[k] - 0
            lines.append(f"FIGURE peak memory {k}: measured {got / 2**30:.2f} GiB (torch.cuda.max_memory_allocated), "
                         f"planned {planned[k] / 2**30:.2f} GiB (dry_run.py, one process), "
                         f"{100 * (got - planned[k]) / planned[k]:+.1f} %")
    sample = V.make_sample(row, args, spec, tok, random.Random(0))
    P, patches = len(sample.ids), sample.vis["pixel_values_videos"].shape[0]
    policy.eval()  # (grpo_step leaves it in training mode, where checkpointing turns the KV cache off)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        t1 = timed(lambda: V.sample_group(policy, sample, p.G, 1, 1.0, 1.0, eos, 0, bias, greedy=True), device)[1]
        tN = timed(lambda: V.sample_group(policy, sample, p.G, N, 1.0, 1.0, eos, 0, bias, greedy=True), device)[1]
    per_token = (tN - t1) / (N - 1)
    params = sum(x.numel() for x in policy.parameters())
    c = flop_counts(policy.model)
    kv = 2 * c["L"] * p.G * p.kv_heads * (p.hidden // p.heads) * (P + N // 2) * (2 if args.bf16 else 4)
    step_bytes = params * (2 if args.bf16 else 4) + kv
    bw = datasheet(BANDWIDTH, device)
    bound = f"bound {step_bytes / bw * 1e3:.2f} ms ({step_bytes / 1e9:.2f} GB read per step / {bw / 1e12:.2f} " \
            f"TB/s data sheet), {step_bytes / bw / per_token:.0%} of it" if bw else "no data-sheet bandwidth here"
    lines.append(f"FIGURE decode: {per_token * 1e3:.2f} ms per step of {p.G} tokens; {bound}")
    rate = matmul_rate(device) if cpu else None
    peak, label = mfu_peak(device, rate or 0.0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        prefill_s = timed(lambda: V.sample_group(policy, sample, 1, 1, 1.0, 1.0, eos, 0, bias, greedy=True),
                          device)[1]
    lines.append(f"FIGURE MFU against {label}: prefill {forward_flops(c, 1, P, 0, patches) / prefill_s / peak:.1%} "
                 f"({P} tokens, {prefill_s:.3f} s), scoring forward+backward "
                 f"{3 * forward_flops(c, p.G, P, N, patches, True) / parts['fwd_bwd'] / peak:.1%}")
    return lines


def accept(argv=None) -> int:
    """The acceptance run: every check, then the figures; exit status 1 if a check failed."""
    ap = argparse.ArgumentParser(description="GPU acceptance check (see bench.py's docstring)")
    ap.add_argument("--accept", action="store_true")
    ap.add_argument("--accept_layers", type=int, default=4, help="language-model layers of the 7B-shaped model")
    ap.add_argument("--only", action="append", choices=list(CHECKS), help="run these checks only (repeatable)")
    ap.add_argument("--no_figures", action="store_true", help="the PASS / FAIL lines only")
    a = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        raise SystemExit("run it as `torchrun --nproc_per_node 1 bench.py --accept` (the FSDP2 path, NCCL on a GPU)")
    _, _, device = V.setup_distributed()
    t0, failed = time.time(), 0
    with tempfile.TemporaryDirectory(prefix="viss_accept_") as root:
        ctx = accept_setup(root, device, a.accept_layers)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo, float32, the tiny model)"
        print(f"acceptance check on {where}; torch {torch.__version__}", flush=True)
        for name, fn in CHECKS.items():
            if a.only and name not in a.only:
                continue
            try:
                ok, detail = fn(ctx)
            except Exception as e:  # noqa: BLE001 -- a check that crashes fails, with its reason
                ok, detail = False, f"raised {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        if not a.no_figures and not a.only:
            for line in accept_figures(ctx):
                print(line, flush=True)
    print(f"{failed} check(s) failed; {time.time() - t0:.0f} s", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------
# Main: parse, build the inputs, run the sections, print the summary table last, write JSON
# ---------------------------------------------------------------------------------------------------------


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where the help text says what an unset flag means."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse(argv=None):
    ap = argparse.ArgumentParser(description="ViSS-R1 reference benchmark (see the module docstring)",
                                 formatter_class=DefaultsHelp)
    per = lambda f: "; ".join(f"{k} {getattr(p, f)}" for k, p in PRESETS.items())  # noqa: E731  preset values
    ap.add_argument("--preset", default="cpu", choices=PRESETS, help="model size and workload (the table above)")
    ap.add_argument("--sections", help=f"comma list of {', '.join(SECTIONS)} (default: the preset's)")
    ap.add_argument("--frames", type=int, help=f"frames per clip in every section, even (default: {per('frames')})")
    ap.add_argument("--G", type=int, help=f"completions per prompt (default: {per('G')})")
    ap.add_argument("--new_tokens", help=f"rollout completion lengths, comma-separated: short,long "
                                         f"(default: {per('new_tokens')})")
    ap.add_argument("--step_tokens", help=f"completion lengths of the GRPO step section, comma-separated "
                                          f"(default: {per('step_tokens')})")
    ap.add_argument("--vocab", type=int, help="the model's vocabulary, e.g. 151936 (default: the tiny tokenizer's "
                                              "~520 for tiny and cpu, the real one for gpu and 7b)")
    ap.add_argument("--max_pixels", type=int, help=f"pixels per frame at most (default: {per('max_pixels')})")
    ap.add_argument("--chunk", type=int, help=f"token_logprobs chunk in the log-prob comparison "
                                              f"(default: {per('lp_chunk')})")
    ap.add_argument("--repeats", type=int, help=f"timed runs per figure, the scaling sweep's too "
                                                f"(default: {per('repeats')})")
    ap.add_argument("--warmup", type=int, help=f"untimed runs before them (default: {per('warmup')})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    ap.add_argument("--json", help="also write every figure to this file")
    a = ap.parse_args(argv)
    ints = lambda s: s and tuple(int(x) for x in s.split(","))  # noqa: E731
    flags = dict(frames=a.frames, viss_frames=a.frames, G=a.G, step_tokens=ints(a.step_tokens), lp_chunk=a.chunk,
                 repeats=a.repeats, scale_repeats=a.repeats, warmup=a.warmup, new_tokens=ints(a.new_tokens),
                 vocab=a.vocab, max_pixels=a.max_pixels)
    p = replace(PRESETS[a.preset], **{k: v for k, v in flags.items() if v is not None})
    sections = a.sections.split(",") if a.sections else list(p.sections)
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown --sections {sorted(unknown)}")
    return a, p, [s for s in SECTIONS if s in sections]


def machine(device: torch.device) -> dict:
    import transformers
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu, "cpu": cpu,
            "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "loadavg_start": os.getloadavg()}


def main(argv=None) -> dict:
    if "--accept" in (argv if argv is not None else __import__("sys").argv[1:]):
        raise SystemExit(V.run_command(accept, argv))  # ends the process group as every command does
    a, p, sections = parse(argv)
    device = torch.device(a.device)
    res = {"preset": a.preset, "sections": sections, "config": asdict(p), "machine": machine(device), "section_s": {}}
    m, t0 = res["machine"], time.time()
    print(f"bench --preset {a.preset} on {m['device']} ({m['nproc']} cpus, {m['torch_threads']} torch threads), "
          f"torch {m['torch']}, transformers {m['transformers']}, load average {m['loadavg_start'][0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="viss_bench_") as work:
        run(p, sections, device, work, res)
    m["loadavg_end"], res["wall_s"] = os.getloadavg(), time.time() - t0
    print_summary(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def run(p: Preset, sections: list, device: torch.device, work: str, res: dict) -> None:
    """The clip and the tokenizer skeleton, then the chosen sections in order; every figure goes into `res`."""
    skeleton = build_skeleton(os.path.join(work, "skeleton"))
    video = write_clip(os.path.join(work, "clip.y4m"), max([p.frames, p.viss_frames, *p.scale_frames]), p.src_h,
                       p.src_w)
    samples, done, clock = {}, {}, [time.time()]

    def sample(frames):
        if frames not in samples:
            samples[frames] = make_sample(video, skeleton, frames, p)
        return samples[frames]

    def lap(name):
        res["section_s"][name] = time.time() - clock[0]
        clock[0] = time.time()

    def step_config(G, frames, N, repeats, modes=("shared",)):  # one configuration in a fresh process
        if (G, frames, N, modes) not in done:
            job = dict(preset=p, device=device.type, skeleton=skeleton, media_root=work, G=G, N=N, frames=frames,
                       modes=modes, repeats=repeats, warmup=p.warmup)
            done[G, frames, N, modes] = {m: step_report(r, peak) for m, r in isolated(step_worker, job).items()}
        return done[G, frames, N, modes]

    s = sample(p.frames)
    rate = matmul_rate(device)
    peak, peak_label = mfu_peak(device, rate)
    res.update(prompt_tokens=len(s.ids), patches=s.vis["pixel_values_videos"].shape[0], matmul_tflops=rate / 1e12,
               mfu_peak_tflops=peak / 1e12, mfu_peak=peak_label)
    print(f"clip: {p.frames} frames of {p.src_h}x{p.src_w}, grid {s.vis['video_grid_thw'][0].tolist()}, "
          f"{res['patches']} patches, prompt {res['prompt_tokens']} tokens; matmul {rate / 1e12:.3f} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'float32'}); MFU against the {peak_label}", flush=True)
    lap("setup")
    memory = "max_memory_allocated" if device.type == "cuda" else "ru_maxrss rise in a fresh process"
    if "rollout" in sections:
        r = sample(p.viss_frames)
        vocab = p.vocab or "the tiny tokenizer's"
        print(f"[1] rollout, G={p.G}, greedy, {p.viss_frames} frames, grid {r.vis['video_grid_thw'][0].tolist()}, "
              f"prompt {len(r.ids)} tokens, vocab {vocab}. ours: shared-prefix sample_group; generate: generate("
              f"num_return_sequences={p.G}); copies: generate on {p.G} copies (transformers 4.x). speedup = "
              f"generate/ours, copies/ours")
        res["rollout"] = bench_rollout(build_model(skeleton, p, device).eval(), r, p, p.repeats, p.warmup, device)
        lap("rollout")
    if "logprobs" in sections:
        print(f"[2] log-probs of {p.lp_tokens} tokens, vocab {QWEN_VOCAB}, width {p.lp_hidden}, chunk {p.lp_chunk}, "
              f"forward + backward; peak extra = {memory} above the inputs")
        res["logprobs"] = bench_logprobs(p, p.repeats, p.warmup, device)
        lap("logprobs")
    if "step" in sections:
        r = sample(p.viss_frames)
        print(f"[3] GRPO step as train() runs it (grpo stage: beta 0.04, top_p {p.top_p}; 1 prompt x G={p.G}; "
              f"{p.viss_frames} frames, prompt {len(r.ids)} tokens; policy + reference + AdamW), scoring as G rows "
              f"[prompt; c_g] or prefix-shared [prompt; c_1..c_G]; peak = {memory}")
        res["step"] = []
        for N in p.step_tokens:
            res["step"].append(print_step(step_config(p.G, p.viss_frames, N, p.repeats, MODES)))
        lap("step")
    if "scaling" in sections:
        print(f"[4] scaling around G={p.G}, frames={p.frames}, N={p.sweep_tokens} (prefix-shared scoring), "
              f"{p.scale_repeats} repeats; peak = {memory}: weights + grads + AdamW + activations")
        res["scaling"] = []
        for axis, values in (("G", p.scale_G), ("frames", p.scale_frames), ("N", p.scale_tokens)):
            for v in values:
                cfg = dict(dict(G=p.G, frames=p.frames, N=p.sweep_tokens), **{axis: v})
                r = step_config(cfg["G"], cfg["frames"], cfg["N"], p.scale_repeats)["shared"]
                res["scaling"].append(dict(r, axis=axis))
                print(f"  {axis:6s} = {v:<4d} prompt {r['prompt_tokens']:5d}  step {r['step_s']['median']:7.3f}s "
                      f"±{r['step_s']['spread']:.3f}  peak {r['peak_mib']:8.0f} MiB  "
                      f"{r['completion_tok_s']:7.1f} completion tok/s  MFU {r['mfu']:6.2%}", flush=True)
        lap("scaling")


def print_step(pair: dict) -> dict:
    """Both scoring modes of one completion length side by side; -> the pair with their ratios."""
    rows, shared = dict(pair["rows"]), dict(pair["shared"])
    N = rows["N"]
    print(f"  N={N}: {'per-row time':>18s}{'MFU':>14s}{'shared':>11s}{'MFU':>14s}   per-row / shared")
    for k in PARTS:
        a, b = rows["parts"][k], shared["parts"][k]
        print(f"    {k:13s} {a['median']:8.3f}s ±{a['spread']:.3f} {a['mfu']:6.1%}  {b['median']:8.3f}s "
              f"±{b['spread']:.3f} {b['mfu']:6.1%}   {a['median'] / b['median']:5.2f}x")
    a, b = rows["step_s"], shared["step_s"]
    print(f"    {'step':13s} {a['median']:8.3f}s ±{a['spread']:.3f} {rows['mfu']:6.1%}  {b['median']:8.3f}s "
          f"±{b['spread']:.3f} {shared['mfu']:6.1%}   {a['median'] / b['median']:5.2f}x")
    for k, name in (("peak_mib", "step peak"), ("scoring_peak_mib", "scoring peak")):
        print(f"    {name:13s} {rows[k]:8.0f} MiB {'':8s}  {shared[k]:8.0f} MiB {'':8s}   {rows[k] / shared[k]:5.2f}x")
    diff = (torch.tensor(rows.pop("ref_logprobs")) - torch.tensor(shared.pop("ref_logprobs"))).abs().max().item()
    out = {"N": N, "rows": rows, "shared": shared, "logprob_max_diff": diff,
           "fwd_bwd_speedup": rows["parts"]["fwd_bwd"]["median"] / shared["parts"]["fwd_bwd"]["median"],
           "ref_speedup": rows["parts"]["ref_logprobs"]["median"] / shared["parts"]["ref_logprobs"]["median"],
           "step_speedup": a["median"] / b["median"], "memory_ratio": rows["peak_mib"] / shared["peak_mib"],
           "scoring_memory_ratio": rows["scoring_peak_mib"] / shared["scoring_peak_mib"]}
    print(f"    reference log-probs, per-row vs shared: max |diff| {diff:.1e}; {shared['completion_tok_s']:.0f} "
          f"completion tok/s shared; a vision-tower forward {shared['vision_s']:.3f}s, once per scoring forward in "
          f"both modes; the prompt is {rows['prompt_tokens'] / (rows['prompt_tokens'] + N):.0%} of a row", flush=True)
    return out


def print_summary(res: dict) -> None:
    """The short table, last: headline figures, with the issue's targets (set for the cpu preset)."""
    rows = []
    if "rollout" in res:
        ro = res["rollout"]
        first, short, long = ro["rows"][0], ro["rows"][1], ro["rows"][-1]
        ok = all(r["greedy_equal"] for r in ro["rows"])
        d = ro["decode_ms"]
        rows += [(f"rollout speedup vs generate, N={short['new_tokens']}", f"{short['speedup']:.2f}x", ">= 3x",
                  short["speedup"] >= 3),
                 (f"rollout speedup vs generate, N={long['new_tokens']}", f"{long['speedup']:.2f}x", ">= 1x",
                  long["speedup"] >= 1),
                 ("rollout speedup vs G copies (4.x), short / long",
                  f"{short['speedup_vs_copies']:.2f}x / {long['speedup_vs_copies']:.2f}x", "", None),
                 (f"rollout tok/s N={long['new_tokens']}: ours / generate",
                  f"{long['ours_tok_s']:.0f} / {long['generate_tok_s']:.0f}", "", None),
                 ("prompt (N=1) s: ours / generate", f"{first['ours_s']['median']:.3f} / "
                  f"{first['generate_s']['median']:.3f}", "", None),
                 ("decode ms/token greedy: ours / generate", f"{d['ours']:.1f} / {d['generate']:.1f}", "", None),
                 (f"decode ms/token top_p {res['config']['top_p']}: ours / generate",
                  f"{d['ours_top_p']:.1f} / {d['generate_top_p']:.1f}", "ours <=",
                  d["ours_top_p"] <= d["generate_top_p"]),
                 (f"whole rollout at {ro['whole_tokens']} tokens, top_p: ours vs generate",
                  f"{ro['whole_speedup']:.2f}x (prefill {ro['prefill_speedup']:.2f}x)", "", None),
                 ("greedy outputs identical (every N, both baselines)", str(ok), "True", ok)]
    if "logprobs" in res:
        lp = res["logprobs"]
        rows += [("log-prob peak memory, full / chunked",
                  f"{lp['full']['peak_mib']:.0f} / {lp['chunked']['peak_mib']:.0f} MiB = {lp['memory_ratio']:.1f}x",
                  ">= 4x", lp["memory_ratio"] >= 4),
                 ("log-prob time, chunked / full", f"{1 / lp['time_ratio']:.2f}x", "", None)]
    for st in res.get("step", []):  # the targets: >= 3x at 128 tokens, >= 2x at 512 (cpu preset)
        N, target = st["N"], {128: 3, 512: 2}.get(st["N"])
        rows += [(f"prefix-shared vs per-row scoring fwd+bwd, N={N}", f"{st['fwd_bwd_speedup']:.2f}x faster",
                  f">= {target}x" if target else "", st["fwd_bwd_speedup"] >= target if target else None),
                 (f"prefix-shared vs per-row reference, N={N}", f"{st['ref_speedup']:.2f}x faster", "", None),
                 (f"prefix-shared vs per-row scoring peak memory, N={N}",
                  f"{st['shared']['scoring_peak_mib']:.0f} / {st['rows']['scoring_peak_mib']:.0f} MiB", "lower",
                  st["scoring_memory_ratio"] > 1),
                 (f"prefix-shared vs per-row step peak memory, N={N}",
                  f"{st['shared']['peak_mib']:.0f} / {st['rows']['peak_mib']:.0f} MiB", "lower",
                  st["memory_ratio"] > 1),
                 (f"prefix-shared vs per-row log-probs, N={N}", f"max |diff| {st['logprob_max_diff']:.1e}", "<= 1e-5",
                  st["logprob_max_diff"] <= 1e-5),
                 (f"GRPO step N={N}, shared: time (vs per-row); MFU",
                  f"{st['shared']['step_s']['median']:.2f}s ({st['step_speedup']:.2f}x); {st['shared']['mfu']:.1%}",
                  "", None)]
    for axis in ("G", "frames", "N") if "scaling" in res else ():
        pts = [r for r in res["scaling"] if r["axis"] == axis]
        lo, hi = pts[0], pts[-1]
        rows.append((f"{axis} {lo[axis]} -> {hi[axis]}: step time, peak memory",
                     f"x{hi['step_s']['median'] / lo['step_s']['median']:.2f}, x{hi['peak_mib'] / lo['peak_mib']:.2f}",
                     "", None))
    m = res["machine"]
    print(f"\n== summary: --preset {res['preset']}, {m['device']}, {m['nproc']} cpus, torch {m['torch']}, "
          f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, {res['wall_s']:.0f}s ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in res["section_s"].items()) + f"); MFU against the "
          f"{res['mfu_peak']} ==")
    for name, value, target, ok in rows:
        print(f"{name:52s} {value:30s} {target:8s} {'' if ok is None else 'met' if ok else 'not met'}")


if __name__ == "__main__":
    main()
