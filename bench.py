"""
bench.py: how fast is the ViSS-R1 reference, and where do the time and memory of a GRPO step go?

In the spirit of nanoGPT's bench.py. It builds a randomly initialised Qwen2.5-VL of the real architecture
locally (no download) at a preset size, writes a real video file (YUV4MPEG2, decoded by decord like a
training clip, then resized, patched and prompted by viss_r1), and measures in one run, side by side:

  1. rollout   viss_r1.sample_group (vision tower + prefill once, KV cache repeated G times) against
               model.generate(num_return_sequences=G), as the authors' release samples, on the same long
               video and the same number of new tokens: wall time, completion tokens/s, ratio. Greedy
               outputs must be identical, and are checked on every run.
  2. logprobs  viss_r1.token_logprobs (chunked, completion tokens only) against full float32 logits,
               forward + backward at Qwen's 151,936-token vocabulary: peak extra memory and time.
  3. step      one GRPO step (1 prompt x G completions, beta 0.04, AdamW) split into rollout, reference
               log-probs, forward+backward and optimizer; tokens/s; MFU against a matmul rate measured here.
  4. scaling   step time and peak memory as G (2, 4, 8, 16), frames (8, 16, 32) and completion length grow.

Usage:
  python bench.py                               # cpu preset: 16 and 32 frames x 128*28*28 px, G 8; ~4 min, 2 cores
  python bench.py --preset tiny --json b.json   # smoke test, < 30 s (the test suite runs it)
  python bench.py --preset gpu --json gpu.json  # paper shapes: 32 frames x 128*28*28 px, G 8, 768 tokens, bf16
  python bench.py --preset 7b                   # Qwen2.5-VL-7B dimensions, random weights: rollout + logprobs
  python bench.py --sections rollout --frames 32 --new_tokens 16,128 --repeats 5

How it measures:
  - every figure is the median of --repeats runs after --warmup runs, with the spread (max - min) / 2. On
    CUDA each timed call sits between two CUDA events and ends with a synchronisation.
  - peak memory on CUDA: torch.cuda.max_memory_allocated() above what was allocated before. On CPU: the rise
    of the resident-set high-water mark (ru_maxrss) in a fresh process, one per configuration (the mark
    never falls, so one process measures one configuration), forked from a forkserver that has imported
    the libraries and computed nothing. A step's peak counts weights, gradients, AdamW state, activations.
  - MFU = model FLOPs / time / matmul rate (a square matmul timed here: float32 on CPU, bf16 on CUDA).
    Model FLOPs count dense matmuls only. With P prompt and C completion tokens, S = P + C, N_llm weights
    in the decoder layers, N_head = vocab x d, N_vis in the vision tower, L layers of width d:
      scoring forward of one row  2 N_llm S + 2 L d S^2 (causal QK^T and AV) + 2 N_head C
      the clip                    2 N_vis patches, once per prompt however often the code runs the tower
      decoding one token at s     2 N_llm + 4 L d s + 2 N_head;    backward = 2 x forward
  - the tiny and cpu presets give the model the tiny tokenizer's ~520-token vocabulary, so that decoding is
    not all lm_head; the log-prob comparison always uses 151,936.
"""

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import resource
import statistics
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
PARTS = ("rollout", "ref_logprobs", "fwd_bwd", "optimizer")

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
    rollout_frames: int  # the rollout comparison's clip: a long video, so that the prompt dominates
    new_tokens: tuple  # rollout comparison: short and long completions
    step_tokens: int  # completion length of the GRPO step, also the scaling sweep's base point
    scale_tokens: tuple
    lp_tokens: int  # log-prob comparison: completion tokens (G x C), width, and token_logprobs' chunk
    lp_hidden: int  # (memory does not depend on the width; time grows with it)
    lp_chunk: int  # (the training path uses the default, 1024)
    vocab: int | None = None  # None: the tiny tokenizer's own (~520)
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
                   vision_heads=2, vision_intermediate=64, frames=4, rollout_frames=4, max_pixels=56 * 84, src_h=56,
                   src_w=84, G=4,
                   new_tokens=(4, 16), step_tokens=8, scale_tokens=(4, 8), lp_tokens=128, lp_hidden=64, lp_chunk=32,
                   scale_G=(2, 4), scale_frames=(4, 8), repeats=2),
    # a 2-layer model; the step on the Pretext-GRPO / Video-R1 clip (16 frames x 128*28*28 px: 1,161 prompt
    # tokens), the rollout on the ViSS-R1 clip (32 frames: 2,121 prompt tokens)
    "cpu": Preset(hidden=192, layers=2, heads=4, kv_heads=2, intermediate=768, vision_hidden=64, vision_depth=2,
                  vision_heads=2, vision_intermediate=256, frames=16, rollout_frames=32, max_pixels=PAPER_PIXELS,
                  new_tokens=(16, 128), step_tokens=64, scale_tokens=(16, 64, 128),
                  lp_tokens=8 * 64, lp_hidden=128, lp_chunk=64),  # 8 chunks, as 8 x 768 make 6 chunks of 1,024
    # the ViSS-R1 clip (32 frames), Qwen2.5-1.5B's language model with the 7B's vision tower: ~2.2B
    # parameters, policy + reference + AdamW fit one 80 GB GPU
    "gpu": Preset(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=QWEN_VOCAB,
                  vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, frames=32,
                  rollout_frames=32, max_pixels=PAPER_PIXELS, new_tokens=(32, 768), step_tokens=768,
                  scale_tokens=(128, 384, 768), lp_tokens=8 * 768, lp_hidden=3584, lp_chunk=1024, repeats=5,
                  scale_repeats=3, warmup=2, bf16=True, grad_ckpt=True),
    # Qwen2.5-VL-7B's dimensions. Its float32 step (weights + grads + AdamW: 16 B/param) needs FSDP over
    # several GPUs, hence rollout and logprobs only (--sections step on one 141 GB GPU will not fit)
    "7b": Preset(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152_064,
                 vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, frames=32,
                 rollout_frames=32, max_pixels=PAPER_PIXELS, new_tokens=(32, 768), step_tokens=768,
                 scale_tokens=(128, 384, 768), lp_tokens=8 * 768, lp_hidden=3584, lp_chunk=1024, repeats=5,
                 scale_repeats=3, warmup=2, bf16=True, grad_ckpt=True, sections=("rollout", "logprobs")),
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


def make_sample(video: str, skeleton: str, frames: int, max_pixels: int) -> V.Sample:
    """The training path for one clip: decode `frames` frames, fit to max_pixels, patch, Video-R1 prompt ids."""
    from transformers import AutoConfig, AutoTokenizer
    spec = V.vision_spec(AutoConfig.from_pretrained(skeleton), skeleton)
    fr, fps, times = V.load_video(video, nframes=frames)
    media = V.fit_media(V.Media(fr, "video", fps, times), spec, 4 * 28 * 28, max_pixels)
    vis = V.vision_inputs(media, spec)
    ids, types = V.prompt_ids(AutoTokenizer.from_pretrained(skeleton), V.r1_prompt(ROW), media, spec,
                              vis["video_grid_thw"][0].tolist())
    return V.Sample(ROW, "r1", ids, types, vis, ROW["solution"], ROW["problem_type"])


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


def forward_flops(c: dict, rows: int, P: int, C: int, patches: int) -> float:
    """Scoring forward of `rows` completions of C tokens after one P-token prompt (docstring formula)."""
    S = P + C
    return 2 * c["vis"] * patches + rows * (2 * c["llm"] * S + 2 * c["L"] * c["d"] * S**2 + 2 * c["head"] * C)


def rollout_flops(c: dict, G: int, P: int, N: int, patches: int) -> float:
    """Vision and prefill once, then G rows decode N tokens at context P + t."""
    decode = sum(G * (2 * c["llm"] + 4 * c["L"] * c["d"] * (P + t) + 2 * c["head"]) for t in range(N))
    return 2 * c["vis"] * patches + 2 * c["llm"] * P + 2 * c["L"] * c["d"] * P**2 + decode

# ---------------------------------------------------------------------------------------------------------
# 1. Rollout: the shared-prefix group sampler against generate(num_return_sequences=G)
# ---------------------------------------------------------------------------------------------------------


def bench_rollout(model, sample: V.Sample, p: Preset, repeats: int, warmup: int, device) -> list[dict]:
    """G greedy completions of one video prompt, N new tokens each, three ways:
      ours      viss_r1.sample_group: vision tower + prefill once, the KV cache repeated G times
      generate  model.generate(num_return_sequences=G). Since transformers 5 it encodes the video once and
                repeats the features (mm_encoder_outputs), then prefills G copies of the prompt
      copies    model.generate on a batch of G copies of prompt and clip: vision tower and prefill G times,
                which is what generate(num_return_sequences=G) did in transformers 4.x, the release's
    generate samples with top_k=1, i.e. greedily on its sampling path (it refuses num_return_sequences > 1
    without sampling). N = 1 is the prompt alone."""
    policy, G = V.Policy(model).eval(), p.G
    bias, eos, pad = V.vocab_bias(model, V.vision_spec(model.config), device), never_eos(model), \
        model.config.text_config.pad_token_id
    one = dict(input_ids=torch.tensor([sample.ids], device=device),
               mm_token_type_ids=torch.tensor([sample.types], device=device),
               **{k: v.to(device) for k, v in sample.vis.items()})
    copies = {k: torch.cat([v] * G) for k, v in one.items()}  # every row carries its own clip
    greedy = dict(do_sample=True, top_k=1, top_p=1.0, temperature=1.0, eos_token_id=eos, pad_token_id=pad,
                  suppress_tokens=torch.nonzero(bias < 0).flatten().tolist())
    rows = []
    for N in [1, *p.new_tokens]:
        ways = {"ours": lambda: V.sample_group(policy, sample, G, N, 1.0, 1.0, eos, pad, bias, greedy=True)[0],
                "generate": lambda: model.generate(**one, max_new_tokens=N, num_return_sequences=G, **greedy),
                "copies": lambda: model.generate(**copies, max_new_tokens=N, **greedy)}
        same = lambda out: out["ours"].shape == (G, N) and all(  # noqa: E731
            torch.equal(out["ours"], out[k][:, len(sample.ids):]) for k in ("generate", "copies"))
        times, equal = {k: [] for k in ways}, True
        for i in range(warmup + repeats):  # interleaved, so that a change in machine load hits all three
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
                equal = same({k: fn() for k, fn in ways.items()})
        row = {"new_tokens": N, "greedy_equal": bool(equal)}
        for k in ways:
            row[f"{k}_s"] = summary(times[k])
            row[f"{k}_tok_s"] = G * N / row[f"{k}_s"]["median"]
        row["speedup"] = row["generate_s"]["median"] / row["ours_s"]["median"]
        row["speedup_vs_copies"] = row["copies_s"]["median"] / row["ours_s"]["median"]
        rows.append(row)
        print(f"  N={N:<4d} " + "  ".join(f"{k} {row[k + '_s']['median']:6.3f}s ±{row[k + '_s']['spread']:.3f}"
                                          for k in ways)
              + f"  speedup {row['speedup']:4.2f}x / {row['speedup_vs_copies']:5.2f}x  greedy equal: {equal}",
              flush=True)
    return rows

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


def grpo_step(policy, ref, optimizer, sample, G: int, N: int, bias, eos, gen, p: Preset, device) -> dict:
    """-> seconds per part. Rewards are random (the reward functions are string matching, off the clock);
    num_iterations = 1, so the old log-probs are logp.detach() and need no forward of their own."""
    t, pad = {}, policy.model.config.text_config.pad_token_id
    policy.eval()
    with torch.no_grad(), autocast(device, p):
        (comp, _), t["rollout"] = timed(lambda: V.sample_group(policy, sample, G, N, 1.0, 1.0, eos, pad, bias, gen),
                                        device)
    mask = V.completion_mask(comp, eos)
    adv = V.group_advantages(torch.rand(G, generator=gen, device=device), G)
    policy.train()
    with torch.no_grad(), autocast(device, p):  # beta 0.04, the grpo / pretext stages (the viss stage skips it)
        ref_lp, t["ref_logprobs"] = timed(lambda: V.sequence_logprobs(ref, sample, comp, 1.0, bias), device)

    def fwd_bwd():
        with autocast(device, p):
            logp = V.sequence_logprobs(policy, sample, comp, 1.0, bias)
            loss, _ = V.grpo_loss(logp, logp.detach(), adv, mask, ref_lp, beta=0.04)
        loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t["fwd_bwd"] = timed(fwd_bwd, device)[1]
    t["optimizer"] = timed(step, device)[1]
    return t


def step_worker(job: dict) -> dict:
    """One configuration, in its own process on CPU: policy, frozen reference and AdamW, then the steps."""
    p, device, sample, G, N = job["preset"], torch.device(job["device"]), job["sample"], job["G"], job["N"]
    mark = memory_mark(device)
    model = build_model(job["skeleton"], p, device, grad_ckpt=p.grad_ckpt)
    policy = V.Policy(model)
    ref = V.Policy(build_model(job["skeleton"], p, device)).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    bias, eos = V.vocab_bias(model, V.vision_spec(model.config), device), never_eos(model)
    gen = torch.Generator(device).manual_seed(0)
    # warm-up: on CPU a small step does it (thread pools, first calls; nothing is tuned per shape); on CUDA the
    # real shape, since kernel choices and the caching allocator's pools depend on it
    small = device.type == "cpu"
    for _ in range(job["warmup"]):
        grpo_step(policy, ref, optimizer, sample, 2 if small else G, 2 if small else N, bias, eos, gen, p, device)
    runs = [grpo_step(policy, ref, optimizer, sample, G, N, bias, eos, gen, p, device) for _ in range(job["repeats"])]
    peak = peak_mib(device, mark)
    with torch.no_grad(), autocast(device, p):  # one vision-tower forward; each scoring forward runs it once
        vis = {k: v.to(device) for k, v in sample.vis.items()}
        vision_s = timed(lambda: model.model.visual(vis["pixel_values_videos"], grid_thw=vis["video_grid_thw"]),
                         device)[1]
    c, P, patches = flop_counts(model), len(sample.ids), sample.vis["pixel_values_videos"].shape[0]
    return {"G": G, "frames": job["frames"], "N": N, "prompt_tokens": P, "patches": patches,
            "parts": {k: summary([r[k] for r in runs]) for k in PARTS},
            "step_s": summary([sum(r.values()) for r in runs]),
            "flops": {"rollout": rollout_flops(c, G, P, N, patches), "ref_logprobs": forward_flops(c, G, P, N, patches),
                      "fwd_bwd": 3 * forward_flops(c, G, P, N, patches), "optimizer": 0.0},
            "peak_mib": peak, "params_m": sum(x.numel() for x in model.parameters()) / 1e6, "vision_s": vision_s}


def step_report(r: dict, rate: float) -> dict:
    """Tokens/s and MFU of a step_worker result."""
    t = r["step_s"]["median"]
    r["completion_tok_s"] = r["G"] * r["N"] / t
    r["train_tok_s"] = r["G"] * (r["prompt_tokens"] + r["N"]) / t  # tokens through each scoring forward
    r["mfu"] = sum(r["flops"].values()) / t / rate
    for k in PARTS:
        r["parts"][k]["mfu"] = r["flops"][k] / r["parts"][k]["median"] / rate
    return r

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
    ap.add_argument("--step_tokens", type=int, help=f"completion length of the GRPO step and the sweep's base "
                                                    f"(default: {per('step_tokens')})")
    ap.add_argument("--chunk", type=int, help=f"token_logprobs chunk in the log-prob comparison "
                                              f"(default: {per('lp_chunk')})")
    ap.add_argument("--repeats", type=int, help=f"timed runs per figure, the scaling sweep's too "
                                                f"(default: {per('repeats')})")
    ap.add_argument("--warmup", type=int, help=f"untimed runs before them (default: {per('warmup')})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    ap.add_argument("--json", help="also write every figure to this file")
    a = ap.parse_args(argv)
    flags = dict(frames=a.frames, rollout_frames=a.frames, G=a.G, step_tokens=a.step_tokens, lp_chunk=a.chunk,
                 repeats=a.repeats, scale_repeats=a.repeats, warmup=a.warmup,
                 new_tokens=a.new_tokens and tuple(int(x) for x in a.new_tokens.split(",")))
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
    video = write_clip(os.path.join(work, "clip.y4m"), max([p.frames, p.rollout_frames, *p.scale_frames]), p.src_h,
                       p.src_w)
    samples, done, clock = {}, {}, [time.time()]

    def sample(frames):
        if frames not in samples:
            samples[frames] = make_sample(video, skeleton, frames, p.max_pixels)
        return samples[frames]

    def lap(name):
        res["section_s"][name] = time.time() - clock[0]
        clock[0] = time.time()

    def step_config(G, frames, N, repeats):  # section 3's configuration is also the sweep's base point
        if (G, frames, N) not in done:
            job = dict(preset=p, device=device.type, skeleton=skeleton, sample=sample(frames), G=G, N=N,
                       frames=frames, repeats=repeats, warmup=p.warmup)
            done[G, frames, N] = step_report(isolated(step_worker, job), rate)
        return done[G, frames, N]

    s = sample(p.frames)
    rate = matmul_rate(device)
    res.update(prompt_tokens=len(s.ids), patches=s.vis["pixel_values_videos"].shape[0], matmul_tflops=rate / 1e12)
    print(f"clip: {p.frames} frames of {p.src_h}x{p.src_w}, grid {s.vis['video_grid_thw'][0].tolist()}, "
          f"{res['patches']} patches, prompt {res['prompt_tokens']} tokens; matmul {rate / 1e12:.3f} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'float32'})", flush=True)
    lap("setup")
    memory = "max_memory_allocated" if device.type == "cuda" else "ru_maxrss rise in a fresh process"
    if "rollout" in sections:
        r = sample(p.rollout_frames)
        print(f"[1] rollout, G={p.G}, greedy, {p.rollout_frames} frames, grid {r.vis['video_grid_thw'][0].tolist()}, "
              f"prompt {len(r.ids)} tokens. ours: shared-prefix sample_group; generate: generate(num_return_sequences="
              f"{p.G}); copies: generate on {p.G} copies (transformers 4.x). speedup = generate/ours, copies/ours")
        res["rollout"] = bench_rollout(build_model(skeleton, p, device).eval(), r, p, p.repeats, p.warmup, device)
        lap("rollout")
    if "logprobs" in sections:
        print(f"[2] log-probs of {p.lp_tokens} tokens, vocab {QWEN_VOCAB}, width {p.lp_hidden}, chunk {p.lp_chunk}, "
              f"forward + backward; peak extra = {memory} above the inputs")
        res["logprobs"] = bench_logprobs(p, p.repeats, p.warmup, device)
        lap("logprobs")
    if "step" in sections:
        print(f"[3] GRPO step: 1 prompt x G={p.G}, {p.step_tokens} completion tokens, policy + reference + AdamW")
        res["step"] = print_step(step_config(p.G, p.frames, p.step_tokens, p.repeats))
        lap("step")
    if "scaling" in sections:
        print(f"[4] scaling around G={p.G}, frames={p.frames}, N={p.step_tokens}, {p.scale_repeats} repeats; "
              f"peak = {memory}: weights + grads + AdamW + activations")
        res["scaling"] = []
        for axis, values in (("G", p.scale_G), ("frames", p.scale_frames), ("N", p.scale_tokens)):
            for v in values:
                cfg = dict(dict(G=p.G, frames=p.frames, N=p.step_tokens), **{axis: v})
                r = step_config(cfg["G"], cfg["frames"], cfg["N"], p.scale_repeats)
                res["scaling"].append(dict(r, axis=axis))
                print(f"  {axis:6s} = {v:<4d} prompt {r['prompt_tokens']:5d}  step {r['step_s']['median']:7.3f}s "
                      f"±{r['step_s']['spread']:.3f}  peak {r['peak_mib']:8.0f} MiB  "
                      f"{r['completion_tok_s']:7.1f} completion tok/s  MFU {r['mfu']:6.2%}", flush=True)
        lap("scaling")


def print_step(r: dict) -> dict:
    t = r["step_s"]["median"]
    for k in PARTS:
        print(f"  {k:13s} {r['parts'][k]['median']:7.3f}s ±{r['parts'][k]['spread']:.3f}  "
              f"{r['parts'][k]['median'] / t:5.1%}  MFU {r['parts'][k]['mfu']:6.2%}")
    print(f"  step          {t:7.3f}s ±{r['step_s']['spread']:.3f}  {r['completion_tok_s']:.0f} completion tok/s, "
          f"{r['train_tok_s']:.0f} train tok/s, MFU {r['mfu']:.2%}, peak {r['peak_mib']:.0f} MiB, "
          f"{r['params_m']:.1f}M params")
    print(f"  one vision-tower forward takes {r['vision_s']:.3f}s, once per scoring forward for all G={r['G']} rows "
          f"({r['vision_s'] / r['parts']['ref_logprobs']['median']:.0%} of ref_logprobs); the prompt is "
          f"{r['prompt_tokens'] / (r['prompt_tokens'] + r['N']):.0%} of every scored row", flush=True)
    return r


def print_summary(res: dict) -> None:
    """The short table, last: headline figures, with the issue's targets (set for the cpu preset)."""
    rows = []
    if "rollout" in res:
        first, short, long = res["rollout"][0], res["rollout"][1], res["rollout"][-1]
        ok = all(r["greedy_equal"] for r in res["rollout"])
        rows += [(f"rollout speedup vs generate, N={short['new_tokens']}", f"{short['speedup']:.2f}x", ">= 3x",
                  short["speedup"] >= 3),
                 (f"rollout speedup vs generate, N={long['new_tokens']}", f"{long['speedup']:.2f}x", ">= 1x",
                  long["speedup"] >= 1),
                 ("rollout speedup vs G copies (4.x), short / long",
                  f"{short['speedup_vs_copies']:.2f}x / {long['speedup_vs_copies']:.2f}x", "", None),
                 (f"rollout tok/s N={long['new_tokens']}: ours / generate",
                  f"{long['ours_tok_s']:.0f} / {long['generate_tok_s']:.0f}", "", None),
                 ("prompt (N=1) s; decode ms/step: ours / generate",  # decode = (t[long] - t[1]) / (N - 1)
                  f"{first['ours_s']['median']:.3f} / {first['generate_s']['median']:.3f}; " + " / ".join(
                      f"{1e3 * (long[k]['median'] - first[k]['median']) / (long['new_tokens'] - 1):.1f}"
                      for k in ("ours_s", "generate_s")), "", None),
                 ("greedy outputs identical (every N, both baselines)", str(ok), "True", ok)]
    if "logprobs" in res:
        lp = res["logprobs"]
        rows += [("log-prob peak memory, full / chunked",
                  f"{lp['full']['peak_mib']:.0f} / {lp['chunked']['peak_mib']:.0f} MiB = {lp['memory_ratio']:.1f}x",
                  ">= 4x", lp["memory_ratio"] >= 4),
                 ("log-prob time, chunked / full", f"{1 / lp['time_ratio']:.2f}x", "", None)]
    if "step" in res:
        r = res["step"]
        top = max(PARTS, key=lambda k: r["parts"][k]["median"])
        rows += [("GRPO step", f"{r['step_s']['median']:.2f}s, {r['completion_tok_s']:.0f} completion tok/s", "", None),
                 ("step MFU; largest part",
                  f"{r['mfu']:.1%}; {top} {r['parts'][top]['median'] / r['step_s']['median']:.0%}", "", None)]
    for axis in ("G", "frames", "N") if "scaling" in res else ():
        pts = [r for r in res["scaling"] if r["axis"] == axis]
        lo, hi = pts[0], pts[-1]
        rows.append((f"{axis} {lo[axis]} -> {hi[axis]}: step time, peak memory",
                     f"x{hi['step_s']['median'] / lo['step_s']['median']:.2f}, x{hi['peak_mib'] / lo['peak_mib']:.2f}",
                     "", None))
    m = res["machine"]
    print(f"\n== summary: --preset {res['preset']}, {m['device']}, {m['nproc']} cpus, torch {m['torch']}, "
          f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, {res['wall_s']:.0f}s ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in res["section_s"].items()) + ") ==")
    for name, value, target, ok in rows:
        print(f"{name:50s} {value:30s} {target:6s} {'' if ok is None else 'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
