"""ViSS-R1: self-supervised reinforcement learning for video reasoning, in one file.

Paper: Fang et al., "ViSS-R1: Self-Supervised Reinforcement Video Reasoning", arXiv 2511.13054.

Video R1-style GRPO tends to teach a multimodal LLM to answer from the question's text and ignore the pixels.
ViSS-R1 makes the model look: every training clip is *transformed* by a self-supervised pretext task (rotated,
reversed, shuffled, flipped, puzzled) and the model is rewarded for naming the transformation and for answering
the user's question about the restored clip, inside the same GRPO update.

    Pretext-GRPO   transformed clip + pretext question only, reward = letter + format (+ length), beta 0.04
    ViSS-R1        SFT cold start, then GRPO on the transformed clip with both questions:
                   <think>..</think><transform>X</transform><answer>..</answer>
                   reward = accuracy + 0.5 transform + format (+ length), no KL term
    GRPO / T-GRPO  the Video-R1 baseline on the original clip, beta 0.04

Run it:
    python demo.py                                    # CPU, no downloads, ~6 min: SFT -> Pretext-GRPO / ViSS-R1
    python annotate.py --model Qwen/Qwen2.5-VL-72B-Instruct --data Video-R1-COT-165k.json ...  # SSL-CoT SFT data
    torchrun --nproc_per_node 8 viss_r1.py --stage viss --model sft_out/ --data train.jsonl --media_root data/ \
        --out out/     # the paper: 8 GPUs, FSDP2, bf16, checkpointing (CUDA's defaults); `python viss_r1.py`: 1 device
    torchrun --nproc_per_node 8 viss_r1.py ... --resume     # continue after a kill or a preemption (SIGTERM)
    python viss_r1.py --export out/step-000300 --to hf/     # a resume checkpoint as a Hugging Face folder (CPU)
    python eval.py --ckpt out/                                               # the six benchmarks

Sections in data-flow order: config, distributed, media, pretext transforms, prompts, rewards, GRPO math, data,
samples, rollout, checkpoints, training loop. The algorithm only: demo.py, bench.py, dry_run.py and eval.py import
it, never the other way round; importing it loads nothing heavy (transformers and decord load where they are used).

Where the paper's numbers depend on the authors' release, this file does what it does: rollouts sample at
temperature 1.0, top_p 0.95; training frames are ~128·28·28 px, images at most 256·28·28; SFT targets join think,
transform and answer with newlines; eval.py scores as its evaluation does. Deliberate departures (each explained
where it is implemented):
  1. `shuffle` takes any frame count (4k+2 keep 4k, evenly spread) and names the real frame ranges (release: 32).
  2. The sampled fps reaches every forward as `second_per_grid_ts` (Qwen2.5-VL's M-RoPE time axis); the release
     trains at 1 s per temporal patch whatever the fps.
  3. Free-form ROUGE tokenizes like rouge-score but without the Porter stemmer.
  4. An explicit `nframes` larger than the clip repeats frames instead of raising (qwen-vl-utils raises).
  5. Images are decoded with Pillow, imported only when an image row is read (decord reads video only).
  6. Rollouts decode G samples from one shared prefill (release: G prefills); scoring runs each group as ONE
     sequence [prompt; c_1; ...; c_G] (release: G copies of clip and prompt); any number of prompts per device.
  7. Vision placeholder tokens can never be sampled; sampling and scoring use the same masked distribution.
  8. Sampling is seeded by each prompt's data-stream position: a resumed run, or one on other GPUs, draws the same.
  9. SFT: the loss covers the target tokens only (release: also the prompt's); no system message (--prompts).
 10. T-GRPO's bonus needs ordered accuracy >= 0.8 x shuffled (Video-R1's rule; the ViSS-R1 release: 1.0 x).
 11. Every pretext task is on by default; the release's final RL run: --pretext_tasks arrow,puzzle (video, image).
 12. M-RoPE positions follow the models' pretraining rule (transformers 4.x's, the release's), not the pinned 5.x
     get_rope_index: the text after a video starts one past its largest position on any axis (mrope_positions).
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import InitVar, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

# ---- Config: one dataclass, one flag per field, stage presets in one table -----------------------------------------

# The paper's settings per stage (SPEC §1, §4-§6): every other default is shared.
STAGES = {
    "pretext": dict(beta=0.04, nframes=16),  # pretext prompt; reward: letter + format (+ length)
    "viss": dict(beta=0.0, nframes=32),  # viss prompt; accuracy + 0.5 transform + format (+ length)
    "grpo": dict(beta=0.04, nframes=16),  # Video-R1's r1 prompt, optional --temporal
    "sft": dict(beta=0.0, nframes=16),  # cold start on COT rows
}


# The paper's precision where the run is on CUDA; on CPU (the demo, the tests) both stay off: float32 is faster there
DEVICE_DEFAULTS = ("bf16", "gradient_checkpointing")


def arg(default, help: str, choices: tuple | None = None):
    """A config field with its one-line meaning: the only place the meaning is written (--help reads it)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    # what to train (flag names follow TRL / Video-R1)
    stage: str = arg("viss", "the recipe; its presets are in STAGES", tuple(STAGES))
    model: str = arg("Qwen/Qwen2.5-VL-7B-Instruct", "HF checkpoint to start from (folder or hub name)")
    data: str = arg("", "Video-R1 JSON / JSONL rows (SFT rows add `process`, ViSS SFT rows `trans_opt`/`trans_ans`)")
    prompts: str = arg("", "JSON file of prompt templates replacing the built-in wording (README: Prompt templates)")
    media_root: str = arg(".", "rows' relative `path`s resolve under this folder")
    out: str = arg("out", "checkpoints, metrics.jsonl, rollouts.jsonl; the final model is saved here too")
    pretext_tasks: str = arg("rotate,arrow,shuffle,flip,puzzle",
                             "enabled pretext tasks, comma-separated (the release's final video RL: arrow)")
    temporal: bool = arg(False, "T-GRPO bonus (grpo stage, video rows): also sample G/2 on permuted frames")
    length_bonus: bool = arg(True, "+0.2 for accurate completions of 320..512 (viss: 768) tokens")
    sft_join: str = arg("newline", "SFT target: the <think> block, <transform> and <answer> joined by a newline (the "
                        "release) or nothing", ("newline", "none"))
    # rollout
    num_generations: int = arg(8, "G: completions per prompt, one group per prompt")
    per_device_prompts: int = arg(1, "prompts per process per step (the paper: 1 on each of 8 GPUs)")
    temperature: float = arg(1.0, "sampling temperature of the rollout, also applied to the scored log-probs")
    top_p: float = arg(0.95, "nucleus sampling: the most likely tokens up to this probability mass (the release's)")
    max_completion_length: int = arg(768, "new tokens per completion at most")
    prefix_sharing: bool = arg(True, "score a group as one sequence [prompt; c_1..c_G] (off, or prompt < C/4: G rows)")
    # objective
    learning_rate: float = arg(1e-6, "AdamW peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    max_grad_norm: float = arg(5.0, "clip the global gradient norm to this")
    warmup_steps: int = arg(0, "linear warmup over this many optimizer updates, then the schedule")
    lr_scheduler_type: str = arg("cosine", "cosine decays to 0 at the last update", ("cosine", "constant"))
    beta: float | None = arg(None, "KL weight (0 skips the reference model entirely)")
    epsilon: float = arg(0.2, "clip range below 1")
    epsilon_high: float | None = arg(None, "clip range above 1 (unset: --epsilon)")
    num_iterations: int = arg(1, "optimizer updates per rollout (>1: stored old log-probs, real clipping)")
    loss_type: str = arg("grpo", "how token losses are averaged (TRL's names)", ("grpo", "bnpo", "dr_grpo", "dapo"))
    scale_rewards: str = arg("group", "the std that divides advantages", ("group", "batch", "none"))
    # media
    nframes: int | None = arg(None, "frames per clip (0: sample at 2 fps up to --max_frames)")
    max_frames: int = arg(32, "frame cap when sampling at 2 fps")
    video_min_pixels: int = arg(128 * 28 * 28, "pixels per video frame at least (the release's training block)")
    video_max_pixels: int = arg(128 * 28 * 28, "pixels per video frame at most (the release's training block)")
    image_min_pixels: int = arg(4 * 28 * 28, "pixels per image at least")
    image_max_pixels: int = arg(256 * 28 * 28, "pixels per image at most")
    # run
    max_steps: int = arg(1000, "training steps (one rollout each)")
    save_steps: int = arg(100, "checkpoint every N steps (the last step always saves)")
    save_total_limit: int = arg(2, "step checkpoints kept on disk")
    save_minutes: float = arg(0, "also checkpoint when this many minutes have passed since the last save (0: off)")
    export_steps: int = arg(0, "also export the model as a Hugging Face folder <out>/hf-step-N every N steps (the "
                            "last step always exports into --out; any checkpoint: --export)")
    log_rollouts_every: int = arg(10, "print one rollout and dump the step's rollouts every N steps (0: never)")
    seed: int = arg(42, "data order, transforms and sampling; one seed gives the same run on any number of GPUs")
    resume: bool = arg(False, "continue from the latest checkpoint in --out")
    resume_with_changes: bool = arg(False, "allow --resume where the settings that shape the run (seed, data, "
                                    "stage, G, lr, loss, tasks, frames, pixels) differ from the checkpoint's")
    gradient_checkpointing: bool | None = arg(None, "recompute decoder layer activations in backward (the paper: on)")
    bf16: bool | None = arg(None, "bf16 compute; weights and AdamW state stay float32 (the paper: on)")
    max_bad_media: float = arg(0.2, "stop if more than this fraction of rows have unreadable media")
    max_nonfinite: int = arg(10, "stop after this many skipped non-finite updates")
    report_to: str = arg("none", "also send every metrics row to TensorBoard (<out>/tensorboard) or Weights & "
                         "Biases; the package is imported only then", ("none", "tensorboard", "wandb"))
    cuda: InitVar[bool | None] = None  # not a flag: the DEVICE_DEFAULTS' device (None: whether a GPU is visible)

    def __post_init__(self, cuda: bool | None):  # complete however it is built: Args(stage="sft") == parse_args
        fill_defaults(self, cuda)


def fill_defaults(args: Args, cuda: bool | None = None) -> Args:
    """Fill the Nones: STAGES, DEVICE_DEFAULTS (on iff `cuda`, default: a GPU is visible), epsilon_high = epsilon."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for k, v in {**STAGES[args.stage], **dict.fromkeys(DEVICE_DEFAULTS, cuda), "epsilon_high": args.epsilon}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def parse_args(argv=None, cuda: bool | None = None) -> Args:
    """Flags from the dataclass fields (booleans as --flag / --no-flag), then fill_defaults fills the Nones."""
    import argparse
    import typing
    p = argparse.ArgumentParser(description="ViSS-R1 training (see the module docstring)")
    hints = typing.get_type_hints(Args)
    for f in fields(Args):
        hint, preset = hints[f.name], {s: v[f.name] for s, v in STAGES.items() if f.name in v}
        shown = ", ".join(f"{s} {v}" for s, v in preset.items()) if preset else f.default
        shown = "per stage: " + shown if preset else "required" if f.default == "" else shown
        shown = "on when the run is on CUDA, off on CPU" if f.name in DEVICE_DEFAULTS else shown
        kw = dict(default=f.default, choices=f.metadata["choices"], help=f"{f.metadata['help']} (default: {shown})")
        if bool in (hint, *typing.get_args(hint)):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            base = next(t for t in typing.get_args(hint) if t is not type(None)) if typing.get_args(hint) else hint
            p.add_argument(f"--{f.name}", type=base, **kw)
    args = Args(**vars(p.parse_args(argv)), cuda=cuda)
    tasks = args.pretext_tasks.split(",")
    if unknown := [t for t in tasks if t not in NUM_OPTIONS]:
        p.error(f"unknown --pretext_tasks {unknown}; choose from {', '.join(NUM_OPTIONS)}")
    if "shuffle" in tasks and args.nframes and args.nframes % 4 and args.stage in ("pretext", "viss"):
        p.error(f"--nframes {args.nframes}: the shuffle task needs a multiple of 4 (or drop it from --pretext_tasks)")
    if args.stage != "sft" and args.num_generations < 2:
        p.error("--num_generations must be at least 2: advantages compare completions within a group")
    if why := bad_pixel_bounds(args):
        p.error(why)
    return args

# ---- Distributed: the same file runs as `python viss_r1.py` or under `torchrun`, sharded with torch's FSDP2 --------

def print0(*a, **k):
    """Print on the main process only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); NCCL on CUDA, gloo on CPU. Under torchrun it is FSDP2-sharded even on one GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # plain `python viss_r1.py`: no process group
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def shard(policy, bf16: bool, device: torch.device) -> None:
    """FSDP2: one unit per decoder layer and vision block (_no_split_modules) plus the root, bf16 compute with float32
    master weights and reductions. `policy`: a Policy, or a model called directly (a sharded teacher's generate)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    model = policy.model if isinstance(policy, Policy) else policy
    blocks = set(model._no_split_modules)  # e.g. Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock
    for module in [m for m in model.modules() if type(m).__name__ in blocks] + [model.model.visual]:
        fully_shard(module, mesh=mesh, mp_policy=mp)  # the vision tower too: generate() runs it outside forward
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    for method in ("score_rows", "score_packed") if isinstance(policy, Policy) else ():  # the root's hooks run for
        register_fsdp_forward_method(policy, method)  # forward only: the other entry points are registered


class full_weights:
    """Rollout under FSDP2: each unit all-gathers its weights on first use and keeps them to the rollout's end, so
    decoding needs no collective (ranks may stop at different lengths). Cost: a full bf16 copy per GPU (15 GB, 7B)."""

    def __init__(self, policy):
        from torch.distributed.fsdp import FSDPModule
        self.policy, self.units = policy, [m for m in policy.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for m in self.units:
            m.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for m in self.units:
            m.reshard()
            m.set_reshard_after_forward(m is not self.policy, recurse=False)  # FSDP2 keeps the root gathered


def all_gather(obj, world: int) -> list:
    """Every rank's `obj` (any picklable), in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


class RunStopped(RuntimeError):
    """A stop that every rank takes together, after agreeing on it; its message is the whole story, printed once."""


def reason(e: Exception) -> str:
    """A rank's exception as the line every rank stops with: a known stop's message, else the traceback."""
    import traceback
    why = str(e) if isinstance(e, (RunStopped, MediaError, DataError)) else "".join(traceback.format_exception(e))
    return f"rank {int(os.environ.get('RANK', 0))}: {why.strip()}"


def attempt(fn, *args) -> tuple:
    """(fn(*args), None) or (None, reason): a rank working alone must not raise (the others would hang): gather it."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 -- every failure becomes a reason the ranks agree on
        return None, reason(e)


def stop_if_any(reasons: list) -> None:
    """Every rank's reason to stop or None (from a gather) -> every rank raises RunStopped with the first."""
    if reasons := [r for r in reasons if r]:
        raise RunStopped(reasons[0])

# ---- Media: frame sampling, resizing and patching for the Qwen2-VL family (SPEC §6) --------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_DECODE_PIXELS = 89_478_485  # Pillow's own limit (Image.MAX_IMAGE_PIXELS); larger images: see load_image


def smart_nframes(total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 16, nframes: int | None = None) -> int:
    """Number of frames to sample, as qwen-vl-utils: `fps` frames per second of video, clamped and even.
    >>> smart_nframes(300, 30.0)              # 10 s at 2 fps = 20, clamped to max_frames
    16
    >>> smart_nframes(30, 30.0)               # 1 s -> 2 frames, raised to min_frames
    4
    """
    if nframes is not None:
        n = round(nframes / 2) * 2  # Python's round (half to even), as qwen-vl-utils' round_by_factor
        if n < 2:
            raise ValueError(f"nframes={nframes} rounds to {n}; at least 2 frames are needed")
        return n  # may exceed total_frames: frame_indices then repeats frames (departure 4)
    lo, hi = math.ceil(min_frames / 2) * 2, math.floor(min(max_frames, total_frames) / 2) * 2
    n = math.floor(min(max(total_frames / video_fps * fps, lo), hi) / 2) * 2
    if not 2 <= n <= total_frames:
        raise ValueError(f"cannot sample {n} frames from a clip of {total_frames} frames "
                         f"(min_frames={min_frames}, max_frames={max_frames})")
    return n


def frame_indices(total_frames: int, n: int) -> list[int]:
    """`n` indices spread evenly over the clip, first and last frame included: round(linspace(0, T-1, n))."""
    return [int(i) for i in np.linspace(0, total_frames - 1, n).round()]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 128 * 28 * 28,
                 max_pixels: int = 256 * 28 * 28) -> tuple[int, int]:
    """Target (h, w): multiples of `factor` (= patch · merge), area within [min_pixels, max_pixels], aspect kept.
    >>> smart_resize(480, 640, max_pixels=128 * 28 * 28)   # 307,200 px > 100,352: shrink by 1.75
    (252, 364)
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:  # too big: shrink by the exact area ratio, floor to the grid
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # too small: grow, ceil to the grid
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_video(path: str, nframes: int | None = None, fps: float = 2.0, min_frames: int = 4,
               max_frames: int = 16) -> tuple[torch.Tensor, float, list[float]]:
    """decord -> (uint8 frames [T, 3, H, W], sampled fps = T / total · video_fps, frame times = index / video_fps)."""
    import decord  # imported here so that `import viss_r1` stays cheap

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    try:
        vr = decord.VideoReader(path, num_threads=1)
        total, video_fps = len(vr), float(vr.get_avg_fps())
        if total < 1 or not video_fps > 0:
            raise ValueError(f"frames={total}, fps={video_fps}")
        n = smart_nframes(total, video_fps, fps, min_frames, max_frames, nframes)
        idx = frame_indices(total, n)
        frames = torch.from_numpy(vr.get_batch(idx).asnumpy())  # [T, H, W, 3] uint8 RGB
    except (decord.DECORDError, RuntimeError, ValueError) as e:  # one message that names the file
        raise ValueError(f"unreadable video {path}: {str(e).strip().splitlines()[-1][:200]}") from None
    return frames.permute(0, 3, 1, 2).contiguous(), n / total * video_fps, [i / video_fps for i in idx]


def load_image(path: str) -> torch.Tensor:
    """Decode an image -> uint8 [1, 3, H, W]. Pillow is imported only here (departure 5)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("image rows need Pillow (`pip install pillow`); video rows do not") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # open reads the header only: size it first
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        with im:
            if im.width * im.height > MAX_DECODE_PIXELS:  # a crawl's giant: JPEG decodes at 1/8 scale directly
                im.draft("RGB", (im.width // 8, im.height // 8))  # a no-op for formats without reduced decoding
            if im.width * im.height > MAX_DECODE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} px exceed {MAX_DECODE_PIXELS:,} and {im.format} cannot "
                                 f"be decoded at reduced size")
            arr = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # every message names the file
        raise ValueError(f"unreadable image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]  # [1, 3, H, W]


@dataclass(frozen=True)
class VisionSpec:
    """What the patcher needs to know about one checkpoint's vision tower (read, never hard-coded)."""
    model_type: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    patch_size: int  # 14 (Qwen2/2.5-VL) or 16 (Qwen3-VL)
    temporal_patch_size: int  # 2
    merge_size: int  # 2: 2x2 patches become one LLM token
    image_mean: tuple
    image_std: tuple
    image_token_id: int
    video_token_id: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def vision_spec(config, model_dir: str | None = None) -> VisionSpec:
    """VisionSpec from a transformers config (+ preprocessor_config.json in `model_dir` for mean/std)."""
    vc, qwen3 = config.vision_config, config.model_type == "qwen3_vl"  # Qwen3-VL's processor default: 0.5
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if qwen3 else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    pp = os.path.join(model_dir, "preprocessor_config.json") if model_dir else None
    if pp and os.path.isfile(pp):
        with open(pp) as f:
            cfg = json.load(f)
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return VisionSpec(config.model_type, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size,
                      tuple(mean), tuple(std), config.image_token_id, config.video_token_id)


def patchify(frames: torch.Tensor, spec: VisionSpec) -> tuple[torch.Tensor, list[int]]:
    """Normalized frames -> (pixel rows, grid [t, h, w]) in the exact layout of the Qwen2-VL processors: uint8
    [T, 3, H, W] -> [T/tp · H/p · W/p, 3·tp·p·p], rows ordered (t, h-block, w-block, merge-row, merge-col)."""
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    T, C, H, W = frames.shape
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {p * m}; smart_resize first")
    if T % tp:  # pad the time axis by repeating the last frame (an image becomes tp identical frames)
        frames = torch.cat([frames, frames[-1:].expand(tp - T % tp, -1, -1, -1)])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.image_mean, spec.image_std))
    x = (frames.float() / 255 - mean) / std  # [T', 3, H, W] float: rescale, then normalize (as the HF processor)
    gt, gh, gw = x.shape[0] // tp, H // p, W // p
    x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)  # split time into (gt, tp), H and W into (blocks, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # -> (gt, gh/m, gw/m, m, m, C, tp, p, p): merge groups contiguous
    return x.reshape(gt * gh * gw, C * tp * p * p), [gt, gh, gw]  # [patches, 3·2·14·14 = 1176] (Qwen2.5-VL)


@dataclass
class Media:
    """One row's visual input, after sampling, transform and resize: what the prompt and patcher consume."""
    frames: torch.Tensor  # uint8 [T, 3, H, W]; an image is T = 1
    kind: str  # "video" | "image"
    fps: float = 2.0  # sampled fps (videos)
    times: list[float] | None = None  # seconds of each frame position in the source clip (Qwen3-VL's stamps)
    path: str = ""  # the file it came from, named in errors


class MediaError(Exception):
    """A row whose video or image cannot be read: training skips and counts it, evaluation reports it."""


def load_media(path: str, kind: str, nframes: int | None = None, max_frames: int = 16) -> Media:
    """A row's video or image file as a Media (at the file's resolution); MediaError names an unreadable file."""
    try:
        if kind == "video":
            frames, fps, times = load_video(path, nframes=nframes, max_frames=max_frames)
            return Media(frames, "video", fps, times, path)
        return Media(load_image(path), "image", path=path)
    except (OSError, ValueError) as e:
        raise MediaError(str(e)) from None


def fit_media(media: Media, spec: VisionSpec, min_pixels: int, max_pixels: int) -> Media:
    """Resize every frame to smart_resize's grid (after the pretext transform: rotation changes H, W); MediaError if
    no grid fits (aspect ratio over 200): the row is skipped like unreadable media."""
    try:
        h, w = smart_resize(*media.frames.shape[-2:], spec.factor, min_pixels, max_pixels)
    except ValueError as e:
        raise MediaError(f"{media.path or media.kind}: {e}") from None
    frames = media.frames  # [T, 3, h, w] -> [T, 3, H, W]: bicubic with antialias, float in, float out
    if frames.shape[-2:] != (h, w):
        frames = F.interpolate(frames.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        frames = frames.round().clamp(0, 255).to(torch.uint8)  # bicubic overshoots 0 and 255 at edges, as in HF's
    return replace(media, frames=frames)


def pixel_bounds(args, kind: str) -> tuple[int, int]:
    """(min, max) pixels per frame for "video" or "image" rows, from --{video,image}_{min,max}_pixels."""
    return getattr(args, f"{kind}_min_pixels"), getattr(args, f"{kind}_max_pixels")


def bad_pixel_bounds(args) -> str | None:
    """What is wrong with the four pixel-bound flags (viss_r1.py's, eval.py's and annotate.py's), or None."""
    return next((f"--{k}_min_pixels {lo} is above --{k}_max_pixels {hi}" for k in ("video", "image")
                 if (lo := pixel_bounds(args, k)[0]) > (hi := pixel_bounds(args, k)[1])), None)


def vision_inputs(media: Media, spec: VisionSpec) -> dict:
    """Model kwargs for one fitted Media: pixel tensor, its grid and (Qwen2.5-VL) seconds per temporal patch."""
    pixels, grid = patchify(media.frames, spec)  # [t·h·w, C·tp·p·p], [t, h, w]
    if media.kind == "image":
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([grid])}
    out = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}
    if spec.model_type == "qwen2_5_vl":
        # M-RoPE spaces temporal positions by real time: tokens_per_second · temporal_patch / fps
        out["second_per_grid_ts"] = torch.tensor([spec.temporal_patch_size / media.fps], dtype=torch.float64)
    return out


def num_vision_tokens(grid: list[int], spec: VisionSpec) -> int:
    """LLM placeholder tokens for one grid: t · h · w / merge² (2x2 patches merge into one token)."""
    t, h, w = grid
    return t * h * w // spec.merge_size ** 2

def prompt_ids(tokenizer, text: str, media: Media | None, spec: VisionSpec | None = None,
               grid: list[int] | None = None, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a one-turn chat (optional system message, then media, then text) and their mm_token_type_ids
    (0 text, 1 image, 2 video; transformers builds 3-D M-RoPE positions only when they come with the grids). The
    template's one placeholder per medium becomes one pad token per merged patch, as the HF processors do; Qwen3-VL
    splits a video into one block per temporal patch, each preceded by its timestamp "<t seconds>"."""
    content = ([{"type": media.kind}] if media is not None else []) + [{"type": "text", "text": text}]
    chat = [{"role": "system", "content": system}] if system else []  # none by default (SPEC §3)
    chat = tokenizer.apply_chat_template(chat + [{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    if media is None:
        return ids, [0] * len(ids)
    pad = spec.video_token_id if media.kind == "video" else spec.image_token_id
    if ids.count(pad) != 1:
        raise ValueError(f"the chat template rendered {ids.count(pad)} {media.kind} placeholders, expected 1")
    i, kind = ids.index(pad), 2 if media.kind == "video" else 1
    n = num_vision_tokens(grid, spec)
    lo, hi = i, i + 1  # the span of `ids` the expansion replaces
    if spec.model_type == "qwen3_vl" and media.kind == "video":
        # one "<t seconds><|vision_start|>pads<|vision_end|>" block per temporal patch, replacing the template's
        # own start/pad/end triple; get_rope_index gives each contiguous run of video pads one temporal patch
        lo, hi = i - 1, i + 2
        t, per_frame, tp = grid[0], n // grid[0], spec.temporal_patch_size
        times = media.times or [k / media.fps for k in range(len(media.frames))]  # seconds of each frame position
        times = times + times[-1:] * (-len(times) % tp)  # padded like the frames
        block, types = [], []
        for k in range(t):  # a temporal patch is stamped with the mean time of its first and last frame
            stamp = (times[k * tp] + times[k * tp + tp - 1]) / 2  # as Qwen3VLProcessor._calculate_timestamps
            words = tokenizer(f"<{stamp:.1f} seconds>", add_special_tokens=False)["input_ids"]
            block += words + [ids[lo]] + [pad] * per_frame + [ids[hi - 1]]
            types += [0] * (len(words) + 1) + [kind] * per_frame + [0]
    else:
        block, types = [pad] * n, [kind] * n
    return ids[:lo] + block + ids[hi:], [0] * lo + types + [0] * (len(ids) - hi)

# ---- Pretext transforms (SPEC §2): applied after frame sampling, before resizing and patching ----------------------

LETTERS = "ABCDEF"
PAIRS = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]  # shuffle / puzzle options A..F (1-based parts)
ROTATIONS = [0, 90, 180, 270]  # rotate options A..D, degrees counter-clockwise
PRETEXT_TASKS = {"video": ("rotate", "arrow", "shuffle"), "image": ("rotate", "flip", "puzzle")}
NUM_OPTIONS = {"rotate": 4, "arrow": 2, "shuffle": 6, "flip": 3, "puzzle": 6}
ARROW_REVERSE_P = 0.55  # the release reverses a clip with probability 0.55


def _swap_groups(frames: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Cut the time axis into 4 equal consecutive groups and swap groups a and b (1-based)."""
    T = frames.shape[0]
    if T % 4:
        raise ValueError(f"shuffle needs a frame count divisible by 4, got {T} frames")
    groups = list(frames.split(T // 4))
    groups[a - 1], groups[b - 1] = groups[b - 1], groups[a - 1]
    return torch.cat(groups)


def _swap_tiles(frames: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """2x2 jigsaw: crop to 2·(H//2) x 2·(W//2), tiles 1 TL, 2 TR, 3 BL, 4 BR, swap tiles a and b."""
    h, w = frames.shape[-2] // 2, frames.shape[-1] // 2
    tiles = [frames[..., r * h:(r + 1) * h, c * w:(c + 1) * w] for r in (0, 1) for c in (0, 1)]
    tiles[a - 1], tiles[b - 1] = tiles[b - 1], tiles[a - 1]
    return torch.cat([torch.cat(tiles[:2], -1), torch.cat(tiles[2:], -1)], -2)


def apply_pretext(frames: torch.Tensor, task: str, option: int) -> torch.Tensor:
    """Transform uint8 frames [T, 3, H, W] (an image: T = 1) by pretext `task` with 0-based `option`.
    rotate: option k turns every frame k·90° counter-clockwise (90/270 swap H and W: the canvas expands).
    arrow: option 1 reverses the frame order.  shuffle: swap two of 4 frame groups, PAIRS[option].
    flip: 1 left-right, 2 top-bottom.  puzzle: swap two of 4 tiles, PAIRS[option]."""
    if task not in NUM_OPTIONS or not 0 <= option < NUM_OPTIONS[task]:
        raise ValueError(f"unknown pretext task/option {task!r}/{option}")
    if task == "rotate":
        return torch.rot90(frames, option, dims=(-2, -1)).contiguous()  # k>0 turns from H towards W: CCW
    if task == "arrow":
        return frames.flip(0) if option == 1 else frames
    if task == "shuffle":
        return _swap_groups(frames, *PAIRS[option])
    if task == "flip":
        return {0: frames, 1: frames.flip(-1), 2: frames.flip(-2)}[option]
    return _swap_tiles(frames, *PAIRS[option])  # puzzle


def invert_pretext(frames: torch.Tensor, task: str, option: int) -> torch.Tensor:
    """The inverse transform ("the restored video"): every task is its own inverse except rotation."""
    return apply_pretext(frames, task, (4 - option) % 4 if task == "rotate" else option)


def sample_pretext(kind: str, tasks: tuple, rng: random.Random) -> tuple[str, int]:
    """(task, 0-based option): uniform over the modality's enabled tasks, then its options (`arrow` reverses: 0.55)."""
    enabled = [t for t in PRETEXT_TASKS[kind] if t in tasks]
    if not enabled:
        raise ValueError(f"no pretext task enabled for {kind} rows (enabled: {tasks})")
    task = rng.choice(enabled)
    return task, (int(rng.random() < ARROW_REVERSE_P) if task == "arrow" else rng.randrange(NUM_OPTIONS[task]))


def frames_for_task(media: Media, task: str) -> Media:
    """`shuffle` cuts a clip into 4 equal groups: a clip of T % 4 == 2 frames keeps an evenly spread 4·(T // 4)."""
    T = len(media.frames)
    if task != "shuffle" or T % 4 == 0:
        return media
    keep = frame_indices(T, T // 4 * 4)
    return replace(media, frames=media.frames[keep], fps=media.fps * len(keep) / T,
                   times=[media.times[i] for i in keep] if media.times else None)


def pretext_question(task: str, num_frames: int = 32, templates: dict | None = None) -> str:
    """The transformation question: one sentence stating the task, then its lettered options (one per line).
    >>> print(pretext_question("arrow", 16))
    This video may have been played backwards. Is its frame order reversed?
    Options:
    A. not reversed (original order)
    B. reversed
    """
    if task == "shuffle" and num_frames % 4:
        raise ValueError(f"shuffle needs a frame count divisible by 4, got {num_frames}")
    t, g = templates or PROMPTS, num_frames // 4  # frame ranges named from the real frame count (departure 1)
    fields = dict(num_frames=num_frames, group_size=g, subject="Every frame of this video was" if num_frames > 1
                  else "This image was", **{f"frames{k + 1}": f"frames {k * g + 1}-{(k + 1) * g}" for k in range(4)})
    options = [f"{LETTERS[i]}. {o.format(**fields)}" for i, o in enumerate(t["pretext_options"][task])]
    return t["pretext_question"][task].format(options="\n".join(options), **fields)

# ---- Prompts (SPEC §3): one user turn, media first, then text; no system prompt. Every sentence is a template ------
# that a JSON file (--prompts) can replace, e.g. with the wording a released checkpoint was trained on.

ANSWER_CONTRACT = ("Provide your detailed reasoning between the <think> </think> tags, and then give your final "
                   "answer between the <answer> </answer> tags.")
PROMPTS = {
    # the three prompts (SPEC §3); sft_r1 / sft_viss default to r1 / viss (the release adds a system message)
    "r1": "{question}\n{think}\n" + ANSWER_CONTRACT + "\n{type_instruction}",
    "pretext": "{pretext_question}\n{focus}\n{think}\n" + ANSWER_CONTRACT + "\n{type_instruction}",
    "viss": ("The {media} you see has been transformed. Answer two progressive questions about it:\n"
             "(1) Transformation Identification: which transformation was applied to the {media}?\n"
             "(2) User Question: answer the question on the basis of the restored {media}, that is, the {media} "
             "after undoing the transformation. Think even more deeply for this one.\n{think}\n"
             "Write your reasoning between <think> </think>, then the letter of the transformation between "
             "<transform> </transform>, then the answer to the user question between <answer> </answer>, "
             "exactly like this:\n<think> ... </think>\n<transform> ... </transform>\n<answer> ... </answer>\n"
             "Rules: reason from the visual input; put only the option letter inside <transform> </transform>; "
             "{type_instruction}\nTransform question: {pretext_question}\nUser Question: {question}"),
    "sft_r1": None, "sft_viss": None,
    # SSL-CoT annotation (the cold-start data): the teacher sees the transformed media and both true answers
    "annotate": (
        "The {media} you see was transformed by one of the operations in the transform question, and a user asked "
        "a question about the original {media}.\nTransform question: {pretext_question}\nUser question: "
        "{question}\nThe transformation applied is option {transform}; the answer to the user question is: "
        "{answer}\nWrite the reasoning that a careful viewer would follow to reach exactly these two answers from "
        "what is visible: first work out which transformation was applied and why, then undo it in your mind and "
        "answer the user question about the restored {media}, citing concrete visual evidence. Never say or imply "
        "that the answers were given to you: reason as if you found them yourself.\nReply in exactly this format "
        "and nothing else:\n<think> your reasoning </think>\n<transform>{transform}</transform>\n"
        "<answer>{answer}</answer>"),
    # the pieces the prompts are made of
    "think": ("Please think about this question as a person would while working it out in their head: hold an "
              "inner dialogue, use phrases such as \"let me think\", \"wait\", \"Hmm\", \"oh, I see\", \"let's "
              "break it down\", and question and check your own steps before you settle on an answer."),
    "type_instruction": {
        "multiple choice": "Please give only the single option letter (e.g., A, B, C, D) within the <answer> "
                           "</answer> tags.",
        "numerical": "Please give the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
        "regression": "Please give the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
        "OCR": "Please transcribe the text within the <answer> </answer> tags.",
        "free-form": "Please give your text answer within the <answer> </answer> tags."},
    "focus": {
        "rotate": "Look at spatial cues such as the direction of gravity, the horizon, text and upright objects.",
        "flip": "Look at spatial cues such as text direction, handedness and the position of the sky and ground.",
        "puzzle": "Look at spatial cues: edges, lines and objects that should continue across patch borders.",
        "arrow": "Look at the temporal order: whether the motion and causality run forwards or backwards in time.",
        "shuffle": "Look at temporal continuity: where the motion jumps between groups of frames."},
    "pretext_question": {  # {options}: the lettered options, one per line
        "rotate": "{subject} rotated counter-clockwise by one of the angles below (0 degrees means no rotation). "
                  "Which rotation was applied?\nOptions:\n{options}",
        "arrow": "This video may have been played backwards. Is its frame order reversed?\nOptions:\n{options}",
        "shuffle": "The {num_frames} frames of this video were cut into four consecutive groups of {group_size} "
                   "frames and two of the groups swapped places. Which two groups were swapped?\nOptions:\n{options}",
        "flip": "This image may have been flipped. Which flip was applied?\nOptions:\n{options}",
        "puzzle": "This image was cut into a 2x2 grid of patches (1 top-left, 2 top-right, 3 bottom-left, "
                  "4 bottom-right) and two patches swapped places. Which two patches were swapped?\nOptions:\n{options}"},
    "pretext_options": {  # option texts in letter order (SPEC §2); the letters are added
        "rotate": ["0 degrees (no rotation)", "90 degrees", "180 degrees", "270 degrees"],
        "arrow": ["not reversed (original order)", "reversed"],
        "shuffle": [f"group {a} ({{frames{a}}}) and group {b} ({{frames{b}}})" for a, b in PAIRS],
        "flip": ["no flip", "horizontal flip (left-right)", "vertical flip (top-bottom)"],
        "puzzle": [f"patch {a} ({n[a - 1]}) and patch {b} ({n[b - 1]})" for a, b in PAIRS
                   for n in [["top-left", "top-right", "bottom-left", "bottom-right"]]]},
}
# the fields each prompt may use (a template file is checked against them before step one)
PROMPT_FIELDS = {"r1": {"question", "problem", "options", "type_instruction", "think", "media"},
                 "pretext": {"pretext_question", "focus", "think", "type_instruction", "media", "num_frames"}}
PROMPT_FIELDS["viss"] = PROMPT_FIELDS["r1"] | PROMPT_FIELDS["pretext"]
PROMPT_FIELDS.update(sft_r1=PROMPT_FIELDS["r1"], sft_viss=PROMPT_FIELDS["viss"],
                     annotate=PROMPT_FIELDS["viss"] | {"transform", "answer"})


@functools.lru_cache(maxsize=8)  # read once per run; every sample asks
def load_prompts(path: str = "") -> dict:
    """The prompt templates: PROMPTS, each key replaced by the same key of the JSON file `path` (if given).
    A prompt is a string (the user turn) or {"system": ..., "user": ...}; tables replace entries one by one."""
    import string
    if not path:
        return PROMPTS
    try:
        with open(path) as f:
            new = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"--prompts {path}: {e}") from None
    out = {**PROMPTS}
    for key, val in (new.items() if isinstance(new, dict) else [(None, None)]):
        if key not in PROMPTS:
            raise DataError(f"--prompts {path}: unknown key {key!r} (known: {', '.join(PROMPTS)})")
        if isinstance(PROMPTS[key], dict):  # a table: replace entries, check each one's key
            if not isinstance(val, dict) or set(val) - set(PROMPTS[key]):
                raise DataError(f"--prompts {path}: {key} must map some of {list(PROMPTS[key])} to texts")
            out[key] = {**PROMPTS[key], **val}
            continue
        parts = val if isinstance(val, dict) else {"user": val}
        if set(parts) - {"system", "user"} or not all(isinstance(v, str) for v in parts.values()):
            raise DataError(f"--prompts {path}: {key} must be a string or {{\"system\": str, \"user\": str}}")
        used = {f for text in parts.values() for _, f, _, _ in string.Formatter().parse(text) if f}
        if bad := used - PROMPT_FIELDS.get(key, set()):
            raise DataError(f"--prompts {path}: {key} uses unknown field(s) {sorted(bad)}; it may use "
                            f"{sorted(PROMPT_FIELDS.get(key, ()))}")
        out[key] = parts
    return out


def render_prompt(kind: str, row: dict | None = None, task: str | None = None, num_frames: int = 32,
                  templates: dict | None = None, **extra) -> tuple[str | None, str]:
    """(system message or None, user text) of prompt `kind`; `extra`: the annotation's true `transform` and `answer`."""
    t = templates or PROMPTS
    prompt = t[kind] if t.get(kind) is not None else t[kind.removeprefix("sft_")]
    prompt = prompt if isinstance(prompt, dict) else {"user": prompt}
    ptype = row["problem_type"] if row is not None and kind != "pretext" else "multiple choice"
    fields = dict(think=t["think"], type_instruction=t["type_instruction"][ptype], num_frames=num_frames,
                  media=row["data_type"] if row else "video" if num_frames > 1 else "image")
    if row is not None:  # the question as shown: multiple choice appends "Options:" and one option per line
        mc = "Options:\n" + "\n".join(row["options"]) if row["problem_type"] == "multiple choice" else ""
        fields.update(question=row["problem"] + mc, problem=row["problem"], options="\n".join(row.get("options", [])))
    if task is not None:
        fields.update(pretext_question=pretext_question(task, num_frames, t), focus=t["focus"][task])
    fields.update(extra)
    return (prompt["system"].format(**fields) if prompt.get("system") else None), prompt["user"].format(**fields)


def r1_prompt(row: dict) -> str:  # Video-R1's: question, inner dialogue, <think>/<answer> contract, type instruction
    return render_prompt("r1", row)[1]


def pretext_prompt(task: str, num_frames: int) -> str:  # Pretext-GRPO's: pretext question, focus hint, contract
    return render_prompt("pretext", task=task, num_frames=num_frames)[1]


def viss_prompt(row: dict, task: str, num_frames: int) -> str:  # header, two progressive questions, 3-tag contract
    return render_prompt("viss", row, task, num_frames)[1]

# ---- Rewards (SPEC §4): completion text -> float, all pure functions -----------------------------------------------

FORMAT_R1 = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
FORMAT_VISS = re.compile(r"<think>.*?</think>\s*<transform>.*?</transform>\s*<answer>.*?</answer>", re.DOTALL)
LENGTH_RANGE = {"r1": (320, 512), "pretext": (320, 512), "viss": (320, 768)}


def extract_tag(text: str, tag: str = "answer") -> str:
    """Stripped content of the first <tag>...</tag>, or "" if there is none.
    >>> extract_tag("<think>x</think><answer> B </answer>")
    'B'
    """
    m = re.search(rf"<{tag}>\s*(.*?)\s*</{tag}>", text, re.DOTALL)
    return m.group(1).strip() if m else ""


def format_reward(completion: str, with_transform: bool = False) -> float:
    """1.0 iff the whole completion is <think>..</think> [<transform>..</transform>] <answer>..</answer>."""
    return 1.0 if (FORMAT_VISS if with_transform else FORMAT_R1).fullmatch(completion) else 0.0


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / max(1, number of reference words)."""
    ref, hyp = reference.split(), hypothesis.split()
    prev = list(range(len(hyp) + 1))  # one row of the edit-distance table at a time
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1] / max(1, len(ref))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_f(reference: str, prediction: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures (departure 3: no Porter stemmer)."""
    # rouge-score's default tokenizer without stemming: lowercase, non-alphanumerics -> space, split
    ref, pred = (re.sub(r"[^a-z0-9]+", " ", text.lower()).split() for text in (reference, prediction))
    scores = []
    for n in (1, 2):
        rc, pc = (Counter(zip(*[x[i:] for i in range(n)])) for x in (ref, pred))  # n-gram counts
        overlap = sum((rc & pc).values())  # clipped n-gram matches
        scores.append(_f1(overlap, max(len(pred) - n + 1, 0), max(len(ref) - n + 1, 0)))
    lcs = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]  # longest common subsequence for ROUGE-L
    for i, r in enumerate(ref):
        for j, p in enumerate(pred):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if r == p else max(lcs[i][j + 1], lcs[i + 1][j])
    scores.append(_f1(lcs[-1][-1], len(pred), len(ref)))
    return sum(scores) / 3


def accuracy_reward(completion: str, solution: str, problem_type: str) -> float:
    """Score the <answer> of `completion` against the <answer> of `solution`, by problem type (SPEC §4)."""
    pred, gt = extract_tag(completion), extract_tag(solution)
    if problem_type == "multiple choice":
        return 1.0 if pred.strip() == gt.strip() else 0.0  # exact: "A." or "(A)" score 0
    if problem_type == "numerical":
        if ("." in gt or "," in gt) != ("." in pred or "," in pred):
            return 0.0  # one is decimal, the other is not
        g, p = _to_float(gt), _to_float(pred)
        return 1.0 if g is not None and p is not None and round(g, 2) == round(p, 2) else 0.0
    if problem_type == "OCR":
        return min(1.0, max(0.0, 1.0 - word_error_rate(gt, pred)))
    if problem_type == "free-form":
        return min(1.0, max(0.0, rouge_f(gt, pred)))
    if problem_type == "regression":
        g, p = _to_float(gt), _to_float(pred)
        return 0.0 if g is None or p is None else 1.0 - min(1.0, (abs(p - g) + 1e-9) / (abs(g) + 1e-9))
    return 0.0


def transform_reward(completion: str, gt_letter: str) -> float:
    """ViSS-R1's transformation reward: 0.5 if the <transform> letter is the applied one, else 0."""
    return 0.5 if extract_tag(completion, "transform") == gt_letter else 0.0


def length_bonus(accuracies: list[float], lengths: list[int], low: int, high: int) -> list[float]:
    """+0.2 for each completion of one group with accuracy > 0.1 and low <= length <= high tokens, but only
    when more than one completion of the group is accurate (rewarding long answers only among good ones).
    >>> length_bonus([1, 1, 0], [400, 100, 400], 320, 512)
    [0.2, 0.0, 0.0]
    """
    good = [a > 0.1 for a in accuracies]
    if sum(good) <= 1:
        return [0.0] * len(accuracies)
    return [0.2 if g and low <= n <= high else 0.0 for g, n in zip(good, lengths)]


def temporal_bonus(acc_ordered: list[float], acc_shuffled: list[float]) -> list[float]:
    """T-GRPO: +0.3 per accurate (> 0.1) completion if mean accuracy on ordered frames >= 0.8x on permuted ones."""
    mean_o, mean_s = sum(acc_ordered) / len(acc_ordered), sum(acc_shuffled) / max(1, len(acc_shuffled))
    if mean_o < 0.8 * mean_s:
        return [0.0] * len(acc_ordered)
    return [0.3 if a > 0.1 else 0.0 for a in acc_ordered]


def mean_relative_accuracy(pred, gt) -> float:
    """VSI-Bench's regression score (SPEC §8): mean over θ in {0.50, ..., 0.95} of 1[|pred - gt| / (|gt| + 1e-8) <
    1 - θ], in float32 tensors as the release's evaluation (the paper's figures): the 1e-8 vanishes and an error of
    exactly 1 - θ falls outside bin θ (gt 10: 12 scores 0.6, 15 scores 0); the float32 mean, as its `.item()`.
    pred, gt: numbers or strings ("1,000" reads 1000); unparseable -> 0.
    >>> round(mean_relative_accuracy("10.7", 10), 6)   # 7% off: within every tolerance but 5%
    0.9
    """
    try:
        p, g = (torch.tensor(float(str(x).replace(",", "")), dtype=torch.float32) for x in (pred, gt))
    except ValueError:
        return 0.0
    rel = (p - g).abs() / (g.abs() + 1e-8)  # nan compares False: 0
    thresholds = torch.arange(0.5, 0.95 + 0.025, 0.05, dtype=torch.float32)  # 0.50, 0.55, ..., 0.95
    return (rel < 1 - thresholds).float().mean().item()


def group_rewards(completions: list[str], lengths: list[int], solution: str, problem_type: str,
                  mode: str = "r1", gt_letter: str | None = None, use_length_bonus: bool = True,
                  acc_shuffled: list[float] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """All rewards of one group of completions -> (totals, {component: values}); total = plain sum. mode "r1":
    accuracy + format; "pretext": the pretext letter is the solution; "viss": accuracy + 0.5·transform + 3-tag
    format. Length bonus by default; T-GRPO bonus given `acc_shuffled` (accuracies on permuted frames)."""
    parts = {"accuracy": [accuracy_reward(c, solution, problem_type) for c in completions],
             "format": [format_reward(c, with_transform=mode == "viss") for c in completions]}
    if mode == "viss":
        parts["transform"] = [transform_reward(c, gt_letter) for c in completions]
    if use_length_bonus:
        parts["length"] = length_bonus(parts["accuracy"], lengths, *LENGTH_RANGE[mode])
    if acc_shuffled is not None:
        parts["temporal"] = temporal_bonus(parts["accuracy"], acc_shuffled)
    return [sum(vals) for vals in zip(*parts.values())], parts

# ---- GRPO math (SPEC §5): advantages, memory-safe token log-probs, clipped loss with k3 KL -------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """A_i = (R_i - mean(group)) / (std + 1e-4), groups of `group_size` contiguous completions.
    scale: "group" (std of each group, Bessel-corrected: the paper), "batch" (one std over all rewards),
    "none" (centred only). A group whose rewards are all equal gets advantages of exactly 0.
    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), 4)
    tensor([ 1.4997, -0.4999, -0.4999, -0.4999])
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot form groups of {group_size} (need G >= 2)")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "group":
        return centred / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        return centred / (rewards.std() + 1e-4)
    if scale == "none":
        return centred
    raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")


def _chunk_logp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                logit_mask: torch.Tensor | None) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # [n, V], float32 only for this chunk
    logits.div_(temperature)  # in place (matmul saves its inputs, not its output): one [n, V] buffer
    if logit_mask is not None:
        logits.add_(logit_mask)
    # log_softmax keeps only its output for backward (logsumexp would keep input and output)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024, logit_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(h·Wᵀ / τ + logit_mask)[target] per position, never holding [N, vocab] float32 logits at once.
    hidden [..., D] (the states that predict `targets`), weight [V, D] (lm_head), targets [...] -> float32 [...];
    logit_mask [V] (optional, added to the logits): 0 on tokens the policy may emit, -inf on the others. Each chunk
    is recomputed in backward, so backward also peaks at one chunk (full float32 logits of 8 x 768 tokens at
    Qwen's 151,936-token vocabulary: 3.7 GB). Uses: functools, _chunk_logp."""
    shape, h, t = targets.shape, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = functools.partial(torch.utils.checkpoint.checkpoint, _chunk_logp, use_reentrant=False) if grad \
        else _chunk_logp
    out = [chunk(h[i:i + chunk_size], weight, t[i:i + chunk_size], temperature, logit_mask)
           for i in range(0, t.numel(), chunk_size)]
    return torch.cat(out).view(shape) if out else hidden.new_zeros(shape, dtype=torch.float32)


def completion_mask(completion_ids: torch.Tensor, eos_id: int | list[int]) -> torch.Tensor:
    """1 for completion tokens up to and including the first EOS (any of `eos_id`), 0 after: [B, L] -> [B, L]."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_id, device=completion_ids.device).view(-1))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).float()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              dapo_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped GRPO surrogate with an optional k3 KL penalty, per-token tensors [B, L], advantages [B].
    l_t = -min(r_t·A, clip(r_t, 1-eps_low, 1+eps_high)·A) + beta·(exp(x) - x - 1),  r_t = exp(logp - old_logp),
    x = ref_logp - logp (clamped to [-10, 10] as in the release; only extreme mismatches reach the clamp).
    Aggregation (TRL's names): grpo = mean over sequences of the per-sequence token mean (the paper); bnpo = token
    mean over the batch; dr_grpo = sum / (B · max_completion_length); dapo = sum / dapo_tokens, all ranks'
    completion tokens / world (the caller sums them over ranks: global_tokens; default: this batch's tokens).
    Uses: torch only (no collective)."""
    ratio, A = torch.exp(logp - old_logp), advantages[:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        x = (ref_logp - logp).clamp(-10, 10)
        kl = torch.exp(x) - x - 1
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (m.shape[0] * (max_completion_length or m.shape[1]))
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / (m.sum() if dapo_tokens is None else dapo_tokens).clamp(min=1)
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")
    with torch.no_grad():  # logging only
        n = m.sum().clamp(min=1)
        low, high = ((ratio < 1 - eps_low) & (A < 0)).float(), ((ratio > 1 + eps_high) & (A > 0)).float()
        stats = {"clip_ratio/low_mean": ((low * m).sum() / n).item(),
                 "clip_ratio/high_mean": ((high * m).sum() / n).item(),
                 "clip_ratio/region_mean": (((low + high) * m).sum() / n).item(),
                 "kl": ((kl * m).sum() / n).item() if kl is not None else 0.0}
    return loss, stats

def global_tokens(mask: torch.Tensor) -> torch.Tensor:
    """dapo's denominator: every rank's completion tokens summed (an all_reduce under torchrun), / world."""
    tokens = mask.sum().detach()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tokens)  # every rank divides by the same number
        tokens = tokens / torch.distributed.get_world_size()
    return tokens

# ---- Data (SPEC §7): Video-R1 JSON / JSONL rows, validated before the first step -----------------------------------

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")


class DataError(ValueError):
    """A data file the run cannot use; the message names the file, the row index and the problem."""


REQUIRED_FIELDS = ("problem", "data_type", "problem_type", "solution", "path")


def validate_row(row, index: int, source: str) -> None:
    """Raise ValueError naming the file, the row index and the problem for any row a step could choke on."""
    def bad(msg):
        raise DataError(f"{source}: row {index}: {msg}")

    if not isinstance(row, dict):
        bad(f"expected a JSON object, got {type(row).__name__}")
    if missing := [k for k in REQUIRED_FIELDS if k not in row]:
        bad(f"missing field(s) {', '.join(missing)}")
    if row["data_type"] not in ("image", "video"):
        bad(f"data_type must be 'image' or 'video', got {row['data_type']!r}")
    if row["problem_type"] not in PROBLEM_TYPES:
        bad(f"unknown problem_type {row['problem_type']!r} (expected one of {', '.join(PROBLEM_TYPES)})")
    if not isinstance(row["solution"], str) or not re.search(r"<answer>.*?</answer>", row["solution"], re.DOTALL):
        bad(f"solution must contain <answer>...</answer>, got {row['solution']!r}")
    if row["problem_type"] == "multiple choice":
        opts = row.get("options")
        if not isinstance(opts, list) or not opts:
            bad("multiple choice row without an 'options' list")
        letters = []
        for o in opts:
            m = re.match(r"\s*([A-Z])\.", o) if isinstance(o, str) else None
            if not m:
                bad(f"option {o!r} does not start with a letter and a dot (\"A. ...\")")
            letters.append(m.group(1))
        if (answer := extract_tag(row["solution"])) not in letters:
            bad(f"solution letter {answer!r} is not one of the option letters {letters}")
    if "trans_opt" in row:  # ViSS SFT rows replay a stored transform
        task, ans = row["trans_opt"], row.get("trans_ans", "")
        if task not in PRETEXT_TASKS[row["data_type"]]:
            bad(f"trans_opt {task!r} is not a {row['data_type']} pretext task")
        if len(ans) != 1 or LETTERS.find(ans) not in range(NUM_OPTIONS[task]):
            bad(f"trans_ans {ans!r} is not an option letter of {task}")
        if not isinstance(row.get("nframes", 2), int) or row.get("nframes", 2) < 2:
            bad(f"nframes {row['nframes']!r} is not a frame count (at least 2)")


def load_rows(path: str) -> list[dict]:
    """Read a Video-R1 JSON list or JSONL file and validate every row (errors name file, row and problem)."""
    with open(path) as f:
        text = f.read()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if rows is None:  # JSONL: one object per non-empty line
        rows = []
        for i, line in enumerate(l for l in text.splitlines() if l.strip()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {i}: not valid JSON: {e}") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    for i, row in enumerate(rows):
        validate_row(row, i, path)
    return rows


def resolve_path(path: str, media_root: str) -> str:
    """A row's media path ("./videos/x.mp4") under the media root; absolute paths are kept."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(media_root, path))

# ---- Samples: one data row -> media, transform, prompt ids and vision tensors, ready for a rollout -----------------

@dataclass
class Sample:
    row: dict
    mode: str  # "r1" | "pretext" | "viss" | "sft"
    ids: list[int]  # prompt token ids (vision placeholders expanded)
    types: list[int]  # mm_token_type_ids of the prompt
    vis: dict  # pixel tensors, grids, second_per_grid_ts
    solution: str  # "<answer>...</answer>" scored against
    problem_type: str
    task: str | None = None  # pretext task and 0-based option (pretext / viss modes)
    option: int | None = None
    target: str | None = None  # SFT: the assistant text to imitate
    shuffled_vis: dict | None = None  # T-GRPO: the same clip with its frames permuted
    pos: int = 0  # global position in the row stream (make_sample): seeds its sampling on any world size

    @property
    def letter(self) -> str | None:
        return LETTERS[self.option] if self.option is not None else None


def make_sample(row: dict, args: Args, spec: VisionSpec, tokenizer, rng: random.Random, pos: int = 0) -> Sample:
    """Everything one rollout needs from a row at stream position `pos` (it seeds the row's sampling); MediaError
    (callers skip and count it): unreadable or too few frames."""
    mode, kind = {"grpo": "r1"}.get(args.stage, args.stage), row["data_type"]  # the stage's prompt
    path = resolve_path(row["path"], args.media_root)
    replay = row if mode == "sft" else {}  # an SSL-CoT row stores the frame count and size its teacher saw
    nframes, bounds = replay.get("nframes", args.nframes), pixel_bounds(args, kind)
    bounds = (replay.get(f"{kind}_min_pixels", bounds[0]), replay.get(f"{kind}_max_pixels", bounds[1]))
    media = load_media(path, kind, nframes or None, args.max_frames)
    task = option = None
    if mode == "sft" and "trans_opt" in row:  # ViSS SFT rows replay their stored transform deterministically
        task, option = row["trans_opt"], LETTERS.index(row["trans_ans"])
    elif mode in ("pretext", "viss"):  # shuffle needs 4 groups of frames: not drawn for a clip of 2
        tasks = tuple(t for t in args.pretext_tasks.split(",") if t != "shuffle" or len(media.frames) >= 4)
        if not set(tasks) & set(PRETEXT_TASKS[kind]):
            raise MediaError(f"{path}: {len(media.frames)} frames, too few for every enabled --pretext_tasks")
        task, option = sample_pretext(kind, tasks, rng)
    if task is not None:
        media = frames_for_task(media, task)
        media = replace(media, frames=apply_pretext(media.frames, task, option))
    shuffled = None
    if args.temporal and mode == "r1" and kind == "video":  # T-GRPO: a random permutation of the frames
        perm = list(range(media.frames.shape[0]))
        rng.shuffle(perm)
        shuffled = replace(media, frames=media.frames[perm])
    media = fit_media(media, spec, *bounds)
    vis = vision_inputs(media, spec)
    grid = vis["video_grid_thw" if kind == "video" else "image_grid_thw"][0].tolist()
    num_frames, templates = media.frames.shape[0], load_prompts(args.prompts)
    solution, ptype, target = row["solution"], row["problem_type"], None
    if mode == "pretext":
        solution, ptype = f"<answer>{LETTERS[option]}</answer>", "multiple choice"
    if mode == "sft":  # the SFT target: the parts joined by --sft_join (the release: newlines)
        middle = [f"<transform>{LETTERS[option]}</transform>"] if task is not None else []
        target = {"newline": "\n", "none": ""}[args.sft_join].join([row["process"], *middle, row["solution"]])
    kind_of_prompt = {"sft": "sft_viss" if task is not None else "sft_r1"}.get(mode, mode)
    system, text = render_prompt(kind_of_prompt, row, task, num_frames, templates)
    ids, types = prompt_ids(tokenizer, text, media, spec, grid, system)
    if shuffled is not None:
        shuffled = vision_inputs(fit_media(shuffled, spec, *bounds), spec)
    return Sample(row, mode, ids, types, vis, solution, ptype, task, option, target, shuffled, pos)


class RowStream:
    """Rows in seeded order, epoch after epoch, every world-th to this rank; one int (`cursor`) of state resumes it."""

    def __init__(self, rows: list[dict], seed: int, rank: int = 0, world: int = 1, cursor: int = 0):
        self.rows, self.seed, self.rank, self.world, self.cursor = rows, seed, rank, world, cursor
        self.epoch, self.order = None, []

    def next(self) -> tuple[int, int, dict]:
        """-> (global position, row index, row)."""
        pos = self.cursor * self.world + self.rank
        epoch, i = divmod(pos, len(self.rows))
        if self.epoch != epoch:  # one permutation per epoch (not per row: 260k rows)
            self.epoch, self.order = epoch, list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self.order)
        self.cursor += 1
        return pos, self.order[i], self.rows[self.order[i]]

# ---- Rollout: shared-prefix group sampling and scoring log-probs ---------------------------------------------------

class Policy(torch.nn.Module):
    """The VLM with one entry point per use, each on FSDP2's hooked path (forward runs the root's hooks; shard()
    registers the two scoring methods with register_fsdp_forward_method):
      forward        a sampler step: float32 next-token logits [B, V] and the KV cache
      score_rows     log-probs [G, C] of G completions as G rows [prompt; c_g] (the vision tower runs once)
      score_packed   log-probs [G, C] of G completions packed as ONE sequence [prompt; c_1; ...; c_G]
    Every path returns hidden states from the Qwen*VLModel, never full-vocabulary logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # a *ForConditionalGeneration
        from transformers import AttentionInterface, AttentionMaskInterface, masking_utils
        # the language model attends with prefix_attention (sdpa unless a call packs a group); the vision tower: sdpa
        AttentionInterface.register("prefix_sdpa", prefix_attention)
        AttentionMaskInterface.register("prefix_sdpa", masking_utils.sdpa_mask)
        model.config.get_text_config()._attn_implementation = "prefix_sdpa"
        use_pretrained_positions(model)  # every forward (and generate) places tokens as the model was pretrained

    def forward(self, **inputs) -> tuple[torch.Tensor, object]:
        out = self.model.model(**inputs)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float(), out.past_key_values  # [B, V], the cache

    def score_rows(self, completion: torch.Tensor, temperature: float, logit_mask, **inputs) -> torch.Tensor:
        G, C = completion.shape
        if G > 1:  # the G rows share one image/clip: its vision features once, tiled
            inputs["mm_encoder_outputs"] = self.encode_once(inputs, G)
        h = self.model.model(**inputs, use_cache=False).last_hidden_state  # [G, P + C, D]
        return self.logprobs(h[:, -C - 1:-1], completion, temperature, logit_mask)  # positions P-1 .. P+C-2

    def score_packed(self, completion: torch.Tensor, temperature: float, logit_mask, prefix: int,
                     **inputs) -> torch.Tensor:
        (G, C), P = completion.shape, prefix
        inputs["mm_encoder_outputs"] = self.encode_once(inputs, 1)
        # shared_prefix reaches every layer's attention call (prefix_attention)
        h = self.model.model(**inputs, use_cache=False, shared_prefix=(P, G)).last_hidden_state[0]  # [P + G·C, D]
        starts = P + C * torch.arange(G, device=h.device)[:, None]  # [G, 1]: where completion g begins
        before = starts + torch.arange(C, device=h.device) - 1  # [G, C]: the state before each token predicts it,
        before[:, 0] = P - 1  # [G, C]: except a completion's first token, which follows the prompt's last
        return self.logprobs(h[before], completion, temperature, logit_mask)  # h[before]: [G, C, D]

    def logprobs(self, h: torch.Tensor, completion: torch.Tensor, temperature: float, logit_mask) -> torch.Tensor:
        logp = token_logprobs(h, self.model.lm_head.weight, completion, temperature, logit_mask=logit_mask)
        return logp.clone()  # not a view: FSDP2 hooks the output for backward, and views lose the hook

    def encode_once(self, inputs: dict, rows: int) -> dict:
        """Replace ONE image/clip's pixel inputs by its vision features repeated `rows` times (backward sums them)."""
        vlm, out = self.model.model, {}
        for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
            if inputs.get(pixels) is None:
                continue
            enc = getattr(vlm, f"get_{kind}_features")(inputs.pop(pixels), inputs[grid], return_dict=True)
            enc.pooler_output = tuple(enc.pooler_output) * rows  # per-item features, item = row
            if getattr(enc, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per item
                enc.deepstack_features = [tuple(f) * rows for f in enc.deepstack_features]
            out[kind] = enc
        for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if inputs.get(k) is not None:
                inputs[k] = torch.cat([inputs[k]] * rows)
        return out


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, shared_prefix=None,
                     **kwargs):
    """The language model's attention ("prefix_sdpa"): transformers' sdpa, except on a packed group. shared_prefix =
    (P, G): the sequence is [prompt (P); c_1 (C); ...; c_G (C)], each completion sees the prompt and itself only.
    Split (PrefixGrouper): the prompt attends to itself causally (P²/2 query-key pairs), the completions as a batch
    [G, H, C, d] to [the prompt's keys (copied G times); their own] through a [C, P + C] mask (G·C·(P + C/2); G rows
    cost G·(P + C)²/2). query [1, H, L, d], key/value [1, kv, L, d] (rotated), L = P + G·C -> [1, L, H, d]."""
    if shared_prefix is None:  # sampling, the per-row path: transformers' sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    (P, G), (_, H, L, d), kv = shared_prefix, query.shape, key.shape[1]
    C, r = (L - P) // G, H // kv  # completion length; r query heads share one key/value head (GQA)
    # 1. the prompt attends to itself, causally
    out_prompt = F.scaled_dot_product_attention(query[:, :, :P], key[:, :, :P], value[:, :, :P], dropout_p=dropout,
                                                scale=scaling, is_causal=True, enable_gqa=True)  # [1, H, P, d]
    # 2. the completions as a batch of G, each attending to the prompt's keys and to its own
    q = query[0, :, P:].unflatten(1, (G, C)).transpose(0, 1)  # [H, G·C, d] -> [G, H, C, d]
    k_own = key[0, :, P:].unflatten(1, (G, C)).transpose(0, 1)  # [G, kv, C, d]
    v_own = value[0, :, P:].unflatten(1, (G, C)).transpose(0, 1)  # [G, kv, C, d]
    k = torch.cat([key[:, :, :P].expand(G, -1, -1, -1), k_own], 2)  # [G, kv, P + C, d]
    v = torch.cat([value[:, :, :P].expand(G, -1, -1, -1), v_own], 2)  # [G, kv, P + C, d]
    q = q.reshape(G, kv, r * C, d)  # the r query heads of each kv head folded into the query length: no key copies
    mask = torch.ones(C, P + C, dtype=torch.bool, device=query.device).tril(P).repeat(r, 1)  # [r·C, P + C]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)  # [G, kv, r·C, d]
    # reshape, not view: CUDA's flash / memory-efficient / cuDNN kernels return [G, r·C, kv, d] memory seen as
    # [G, kv, r·C, d], which cannot be viewed as [G, H, C, d] when r > 1 (the CPU kernel's output can)
    out = out.reshape(G, H, C, d).transpose(1, 2).reshape(1, G * C, H, d)  # [G, H, C, d] -> [1, G·C, H, d]
    return torch.cat([out_prompt.transpose(1, 2), out], 1), None  # [1, P + G·C, H, d]


def mrope_positions(config, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw=None,
                    video_grid_thw=None, second_per_grid_ts=None, attention_mask=None, **_) -> tuple:
    """3-D M-RoPE positions [3, B, L] and rope delta [B, 1] by the Qwen-VL models' pretraining rule (get_rope_index's
    signature). Text advances by 1 on all three axes; a vision block of (t, h, w) merged tokens starting at s puts
    token (i, j, k) at (s + T(i), s + j, s + k), and the text after it starts ONE PAST ITS LARGEST POSITION ON ANY
    AXIS (5.x: s + max(h, w)). T(i) = i (Qwen2-VL), floor(i · second_per_grid · tokens_per_second) (Qwen2.5-VL video,
    float64), 0 (image); a Qwen3-VL video is a block [1, h, w] per temporal patch. Masked (left padding) tokens: 0."""
    merge, kind = config.vision_config.spatial_merge_size, config.model_type
    tps = getattr(config.vision_config, "tokens_per_second", 1)
    videos = [] if video_grid_thw is None else video_grid_thw.tolist()
    if kind == "qwen3_vl":
        videos = [[1, h, w] for t, h, w in videos for _ in range(t)]
    grids = {1: iter([] if image_grid_thw is None else image_grid_thw.tolist()), 2: iter(videos)}
    seconds = iter([] if second_per_grid_ts is None or kind != "qwen2_5_vl" else second_per_grid_ts.tolist())
    B, L = input_ids.shape
    positions, delta = torch.zeros(3, B, L, dtype=torch.long), []
    for b in range(B):
        keep = torch.ones(L, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        row, start = [], 0  # row: [3, n] position blocks; start: where the next block begins
        for modality, run in itertools.groupby(mm_token_type_ids[b][keep].tolist()):
            n = len(list(run))
            if modality == 0:  # text: the same position on all three axes
                row, start = row + [torch.arange(start, start + n).expand(3, n)], start + n
                continue
            t, h, w = next(grids[modality])
            h, w = h // merge, w // merge
            if t * h * w != n:
                raise ValueError(f"a run of {n} vision tokens, but its grid {t}x{h}x{w} needs {t * h * w}")
            sec = next(seconds, 1.0) if modality == 2 and kind == "qwen2_5_vl" else None  # else T(i) = i (t 1: 0)
            time = torch.tensor([i if sec is None else math.floor(i * sec * tps) for i in range(t)])
            block = torch.stack(torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij"))
            row.append(block.reshape(3, -1) + start)  # [3, t·h·w]: (time, row, column) of every token
            start = int(row[-1].max()) + 1  # one past the largest position on any axis
        positions[:, b, keep] = torch.cat(row, 1) if row else positions[:, b, keep]
        delta.append(start - int(keep.sum()))
    return positions.to(input_ids.device), torch.tensor(delta, device=input_ids.device).view(B, 1)


def use_pretrained_positions(model) -> None:
    """Make a Qwen-VL model compute positions with mrope_positions everywhere; warn when transformers' rule agrees."""
    vlm, m = model.model, model.config.vision_config.spatial_merge_size
    ids, types, grid = torch.zeros(1, 6, dtype=torch.long), torch.tensor([[0, 2, 2, 2, 2, 0]]), torch.tensor([[4, m, m]])
    if model.config.model_type != "qwen3_vl" and torch.equal(  # (Qwen3-VL's agrees already)
            type(vlm).get_rope_index(vlm, ids, mm_token_type_ids=types, video_grid_thw=grid)[0],
            mrope_positions(model.config, ids, types, video_grid_thw=grid)[0]):
        import transformers
        warnings.warn(f"transformers {transformers.__version__}'s get_rope_index follows the pretrained rule: "
                      f"viss_r1.use_pretrained_positions is no longer needed")
    vlm.get_rope_index = functools.partial(mrope_positions, model.config)


def rope_positions(model, ids: torch.Tensor, types: torch.Tensor, vis: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE positions [3, B, L] and the text offset `delta` [B, 1] (text position = index + delta)."""
    kw = {k: v for k, v in vis.items() if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    return model.model.get_rope_index(ids, mm_token_type_ids=types, **kw)


def vocab_mask(model, spec: VisionSpec, device) -> torch.Tensor:
    """The additive logit mask [V]: 0 everywhere, -inf on vision placeholder and start/end tokens (one in a
    completion breaks the next forward)."""
    cfg = model.config
    mask = torch.zeros(cfg.get_text_config().vocab_size, device=device)
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(cfg, name, None) is not None:
            mask[getattr(cfg, name)] = float("-inf")
    return mask


def decoding_ids(model, tokenizer) -> tuple[list[int], int]:
    """(EOS ids, pad id): the tokenizer's EOS, then the generation config's (Qwen: <|im_end|>, <|endoftext|>)."""
    gen = model.generation_config.eos_token_id
    gen = gen if isinstance(gen, list) else [] if gen is None else [gen]
    eos = list(dict.fromkeys([tokenizer.eos_token_id, *gen]))
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def _sample_token(logp: torch.Tensor, top_p: float, generator, tries: int = 4) -> torch.Tensor:
    """Nucleus sampling from log-probs [G, V] -> [G]: token i is kept iff the tokens more likely than i hold at most
    top_p. No sort (~50 ms a step at V 151,936 on 2 CPU cores): one inverse-CDF draw per row, kept if in the nucleus
    (then it follows p there exactly), else drawn again; rows rejected `tries` times (tiny top_p) take the sort."""
    probs = logp.exp()
    G, V = probs.shape
    cdf = probs.double().cumsum(-1)  # float64: 151,936 float32 additions would round
    out, todo = probs.new_zeros(G, dtype=torch.long), probs.new_ones(G, dtype=torch.bool)  # todo: rows to draw
    for _ in range(tries):
        u = torch.rand(G, 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
        x = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)  # [G, 1]: first token whose cdf exceeds u
        # in the nucleus iff the tokens more likely than x hold at most top_p
        keep = todo & (torch.where(probs > probs.gather(-1, x), probs, 0.0).sum(-1) <= top_p) if top_p < 1 else todo
        out, todo = torch.where(keep, x[:, 0], out), todo & ~keep
        if not todo.any():
            return out
    sorted_p, order = probs[todo].sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # mass before this token already reaches top_p
    out[todo] = order.gather(-1, torch.multinomial(sorted_p.masked_fill(drop, 0.0), 1, generator=generator))[:, 0]
    return out


@torch.no_grad()
def sample_group(policy: Policy, sample: Sample, G: int, max_new_tokens: int, temperature: float, top_p: float,
                 eos_ids: list[int], pad_id: int, logit_mask: torch.Tensor, generator=None, greedy: bool = False,
                 vis: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G completions of one prompt -> (ids [G, C], pad_id after EOS; sampling log-probs [G, C] = log_softmax(logits
    / τ) at the sampled tokens). Vision tower and prompt prefill run ONCE, then the KV cache is repeated G times."""
    device = logit_mask.device
    vis = {k: v.to(device) for k, v in (vis or sample.vis).items()}
    ids, types = torch.tensor([sample.ids], device=device), torch.tensor([sample.types], device=device)  # [1, P]
    pos, delta = rope_positions(policy.model, ids, types, vis)  # [3, 1, P], [1, 1]
    logits, cache = policy(input_ids=ids, position_ids=pos, mm_token_type_ids=types, use_cache=True, **vis)
    cache.batch_repeat_interleave(G)  # [1, kv_heads, P, d] -> [G, kv_heads, P, d]: the shared prefix, per layer
    logits = logits.expand(G, -1)  # [G, V]: every row starts from the prompt's next-token distribution
    eos, done = torch.tensor(eos_ids, device=device), torch.zeros(G, dtype=torch.bool, device=device)
    tokens, logps = [], []  # [G] per step
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits / temperature + logit_mask, -1)
        nxt = (logits + logit_mask).argmax(-1) if greedy else _sample_token(logp, top_p, generator)
        tokens.append(torch.where(done, pad_id, nxt))  # [G]; rows that ended keep emitting pad
        logps.append(torch.where(done, 0.0, logp.gather(-1, nxt[:, None]).squeeze(-1)))
        done = done | torch.isin(nxt, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        # the new token's 3-D position is text: cache length + delta on all three axes
        step_pos = (ids.shape[1] + t + delta).view(1, 1, 1).expand(3, G, 1)
        logits, cache = policy(input_ids=tokens[-1][:, None], position_ids=step_pos, past_key_values=cache,
                               use_cache=True)
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def sequence_logprobs(policy: Policy, sample: Sample, completion: torch.Tensor, temperature: float,
                      logit_mask: torch.Tensor | None, shared: bool = True) -> torch.Tensor:
    """Scoring forward: log-probs [G, C] of `completion` [G, C] after the prompt, with the vision inputs,
    second_per_grid_ts and 3-D positions the sampler used; the vision tower runs once for the G rows. shared: ONE
    sequence [prompt; c_1; ...; c_G] (prefix_attention), P + G·C tokens instead of G·(P + C). Padding after EOS
    attends causally: it changes no kept token's log-prob. Uses: rope_positions, Policy's score_packed / score_rows."""
    device, (G, C) = completion.device, completion.shape
    vis = {k: v.to(device) for k, v in sample.vis.items()}
    if shared and G > 1 and 4 * len(sample.ids) >= C:  # below P = C / 4, no faster than G rows (README)
        ids, types = torch.tensor([sample.ids], device=device), torch.tensor([sample.types], device=device)  # [1, P]
        pos, delta = rope_positions(policy.model, ids, types, vis)  # [3, 1, P], [1, 1]
        P = ids.shape[1]  # completion token t is text at position P + t + delta on all three axes, as sampled
        text = (P + delta.view(1) + torch.arange(C, device=device)).repeat(G).view(1, 1, -1).expand(3, 1, -1)
        return policy.score_packed(completion, temperature, logit_mask, P, position_ids=torch.cat([pos, text], 2),
                                   input_ids=torch.cat([ids, completion.view(1, -1)], 1),
                                   mm_token_type_ids=F.pad(types, (0, G * C)), **vis)
    ids = torch.cat([torch.tensor([sample.ids], device=device).expand(G, -1), completion], 1)  # [G, P + C]
    types = torch.tensor([sample.types + [0] * C], device=device)
    pos, _ = rope_positions(policy.model, ids[:1], types, vis)  # identical for every row: completions are text
    return policy.score_rows(completion, temperature, logit_mask, input_ids=ids, position_ids=pos.expand(3, G, -1),
                             mm_token_type_ids=types.expand(G, -1), **vis)

# ---- Checkpoints: every rank writes its own shards (torch.distributed.checkpoint); the HF folder is an export ------

PREEMPTED = 75  # exit status of a preempted run that --resume continues (EX_TEMPFAIL): a requeue script's cue
# the settings a resumed run must share with its checkpoint (else another run continues from its weights)
TRAJECTORY = ("stage", "model", "seed", "num_generations", "per_device_prompts", "temperature", "top_p",
              "max_completion_length", "learning_rate", "weight_decay", "max_grad_norm", "warmup_steps",
              "lr_scheduler_type", "beta", "epsilon", "epsilon_high", "num_iterations", "loss_type", "scale_rewards",
              "pretext_tasks", "temporal", "length_bonus", "sft_join", "nframes", "max_frames", "video_min_pixels",
              "video_max_pixels", "image_min_pixels", "image_max_pixels", "bf16")


class Preemption:
    """SIGTERM or SIGUSR1 (sent ahead of a time limit; torchrun forwards it with --signals_to_handle) is recorded
    only: train() agrees on it in the step's gather, saves that step and stops (Preempted); a second exits at once."""

    def __init__(self):
        self.signal, self.old = None, {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def handle(self, sig, frame):
        if self.signal:
            os._exit(128 + sig)
        self.signal = signal.Signals(sig).name
        print(f"rank {os.environ.get('RANK', 0)}: {self.signal}: finishing the step, then saving it", flush=True)

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)


class Preempted(RunStopped):
    """Every rank stops after saving the step a preemption signal arrived in."""


def data_identity(rows: list[dict], prompts: dict) -> dict:
    """What a resume compares besides the flags: the rows (count and a hash of their content) and the prompts."""
    import hashlib
    digest = lambda x: hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]  # noqa: E731
    return {"rows": len(rows), "rows_sha256": digest(rows), "prompts_sha256": digest(prompts)}


def resume_changes(meta: dict, args: Args, identity: dict) -> list[str]:
    """The settings that shape the run and differ between a checkpoint's meta.json and this run, one per line."""
    old, new = meta.get("args", {}), vars(args)
    return [f"--{k} {old[k]} -> {new[k]}" for k in TRAJECTORY if k in old and old[k] != new[k]] + [
        f"{'--data' if k.startswith('rows') else '--prompts'} {k} {v} -> {identity[k]}"
        for k, v in meta.get("data", {}).items() if v != identity[k]]


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def is_resume_checkpoint(path: str) -> bool:
    """A folder save_checkpoint wrote (out/step-N: sharded state/ beside the config files, no HF weights)."""
    return os.path.isdir(os.path.join(path, "state"))


def latest_checkpoint(out: str) -> str | None:
    """The newest complete `out/step-NNNNNN` (a crash mid-save leaves only a `.tmp-` directory behind)."""
    done = sorted(d for d in (os.listdir(out) if os.path.isdir(out) else []) if re.fullmatch(r"step-\d{6}", d)
                  and os.path.isfile(os.path.join(out, d, "meta.json")))
    return os.path.join(out, done[-1]) if done else None


def save_hf(path: str, model, tokenizer, processor, spec: VisionSpec, weights: dict | None = None) -> None:
    """What `from_pretrained` needs: weights (safetensors), config, tokenizer, processor config. weights None: all
    but the weights (a resume checkpoint keeps these beside its shards, for --export and eval.py)."""
    if weights is None:
        model.config.save_pretrained(path)
        if model.can_generate():
            model.generation_config.save_pretrained(path)
    else:
        model.save_pretrained(path, state_dict=weights)
    tokenizer.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    else:  # no processor class available (it needs torchvision): the fields the Qwen processors read
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(dict(image_mean=list(spec.image_mean), image_std=list(spec.image_std),
                           patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                           merge_size=spec.merge_size, image_processor_type="Qwen2VLImageProcessor"), f, indent=2)


def dcp_io(mode: str, state: dict, path: str) -> None:
    """torch.distributed.checkpoint `mode` ("save" or "load", in place) of `state` at `path`: with a process group
    every rank writes (reads) its own shards in parallel; without one (one process, --export) the same files,
    resharded on load to whatever layout `state` has."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():  # dcp warns that a single process is a single process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        getattr(dcp, mode)(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())


def train_state(policy, optimizer=None) -> dict:
    """What a resume checkpoint holds, as this rank's shards: the float32 weights, the buffers a checkpoint of
    from_pretrained's does not carry (rotary frequencies), and the AdamW state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model = policy.model if isinstance(policy, Policy) else policy
    state = {"model": get_model_state_dict(model), "buffers": dict(model.named_buffers())}
    return state if optimizer is None else {**state, "optimizer": get_optimizer_state_dict(policy, optimizer)}


def save_checkpoint(args: Args, step: int, policy, tokenizer, processor, spec, optimizer, scheduler, meta: dict,
                    rank: int, world: int) -> dict:
    """On every rank: its shards of the model and AdamW state, written in parallel (nothing gathered to one rank);
    then rank 0 writes the schedule, the config and tokenizer, meta.json last, and renames the temp dir to step-N.
    Returns what this save took: seconds, and the bytes each rank wrote."""
    tmp, dst = os.path.join(args.out, f".tmp-step-{step:06d}"), os.path.join(args.out, f"step-{step:06d}")
    t0 = time.time()
    if rank == 0:  # no rank writes into a stale temp dir (a save killed before)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    stop_if_any(all_gather(None, world))
    failed = attempt(lambda: dcp_io("save", train_state(policy, optimizer), os.path.join(tmp, "state")))[1]
    mine = sum(os.path.getsize(p) for p in glob.glob(os.path.join(tmp, "state", f"__{rank}_*.distcp")))

    def write():  # rank 0 alone, once every shard is on disk: the small files, meta.json last; then the rename
        save_hf(tmp, policy.model, tokenizer, processor, spec)
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: its presence marks a complete save
            json.dump(meta, f, indent=2)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        for old in sorted(d for d in os.listdir(args.out) if re.fullmatch(r"step-\d{6}", d))[:-args.save_total_limit]:
            shutil.rmtree(os.path.join(args.out, old), ignore_errors=True)
    stop_if_any(all_gather(failed, world))  # a full disk stops every rank, not one
    failed = attempt(write)[1] if rank == 0 else None
    everyone = all_gather((failed, mine), world)  # also the barrier: no rank goes on before the save is complete
    stop_if_any([f for f, _ in everyone])
    return {"seconds": time.time() - t0, "bytes_per_rank": [b for _, b in everyone]}


def export_hf(path: str, weights: dict, model, tokenizer, processor, spec, meta: dict) -> None:
    """Write a Hugging Face directory into `path` (--out itself at the end of a run): into a temp dir beside, each
    file then renamed into place, meta.json last (present iff the export is complete)."""
    tmp = os.path.join(path, ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if os.path.exists(os.path.join(path, "meta.json")):
        os.remove(os.path.join(path, "meta.json"))
    save_hf(tmp, model, tokenizer, processor, spec, weights)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "meta.json"):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)


def export_run(path: str, policy, tokenizer, processor, spec, meta: dict, rank: int, world: int) -> None:
    """On every rank: the full float32 weights gathered to rank 0's CPU, which exports them into `path`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    failed = attempt(export_hf, path, full, policy.model, tokenizer, processor, spec, meta)[1] if rank == 0 else None
    stop_if_any(all_gather(failed, world))  # also the barrier: every rank waits for the export


def export(ckpt: str, to: str) -> None:
    """`python viss_r1.py --export out/step-000300 --to hf/`: a resume checkpoint as a Hugging Face directory, in
    one process on the CPU (no GPU, no process group; host memory: the float32 model once)."""
    if not os.path.isfile(os.path.join(ckpt, "meta.json")) or not is_resume_checkpoint(ckpt):
        raise RunStopped(f"{ckpt} is not a complete resume checkpoint (a step-NNNNNN folder with state/, meta.json)")
    policy, tokenizer, processor, spec = load_model(ckpt, Args(), torch.device("cpu"), 1, trainable=False)
    meta = read_json(os.path.join(ckpt, "meta.json"))
    export_hf(to, policy.model.state_dict(), policy.model, tokenizer, processor, spec, meta)
    print(f"exported {ckpt} (step {meta['step']}) to {to}")


# ---- Training loop: sample prompts -> transform -> rollout -> reward -> advantages -> log-probs -> step -> log -----

def make_policy(model, args: Args, device, world: int, trainable: bool = True) -> Policy:
    """Checkpointing (trainable), the Policy wrapper, FSDP2 under torchrun (else `device`), frozen for a reference."""
    if args.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(model)
    if torch.distributed.is_initialized():  # under torchrun (any number of processes), or dry_run's fake group
        shard(policy, args.bf16, device)  # FSDP2 places each shard on `device`
    elif device.type != "cpu":  # weights are built on the CPU
        policy.to(device)
    if not trainable:
        policy.eval().requires_grad_(False)
    return policy


def load_sharded(path: str, dtype: torch.dtype, wrap, device: torch.device):
    """`wrap(model)` (FSDP2) of the checkpoint at `path`, read ONCE: every rank builds it on the meta device and
    allocates only its own shards. A resume checkpoint's shards are read by the ranks that hold them (resharded if
    the layout differs; also without a process group); a Hugging Face one by rank 0 alone, broadcast tensor by
    tensor."""
    from torch.distributed.tensor import distribute_tensor
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    if os.path.isfile(os.path.join(path, "generation_config.json")):  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(path)
    sharded = torch.distributed.is_initialized()
    if not sharded:
        model.to_empty(device=device)  # the whole model on its device, uninitialised
    wrapped = wrap(model)
    if sharded:
        model.to_empty(device=device)  # this rank's shards and the buffers, uninitialised
    if is_resume_checkpoint(path):  # weights and buffers
        dcp_io("load", train_state(model), os.path.join(path, "state"))  # in place, into this rank's shards
        return wrapped
    full = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype) if torch.distributed.get_rank() == 0 else None
    with torch.no_grad():
        for name, p in model.named_parameters():  # one whole tensor at a time in flight, then this rank's slice
            whole = full.get_parameter(name).to(device) if full else torch.empty(p.shape, dtype=p.dtype, device=device)
            torch.distributed.broadcast(whole, src=0)
            p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())
        for name, buf in model.named_buffers():  # not in a checkpoint (rotary frequencies): as rank 0's from_pretrained
            torch.distributed.broadcast(buf.copy_(full.get_buffer(name)) if full else buf, src=0)
    return wrapped


def load_whole(path: str, dtype: torch.dtype, device: torch.device):
    """A model for one device in its own dtype (no float32 copy on the way); with accelerate, straight to the GPU."""
    import importlib.util
    from transformers import AutoModelForImageTextToText
    direct = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **{"device_map": str(device)} if direct
                                                       else {}).to(device)


def load_model(path: str, args: Args, device, world: int, trainable: bool = True):
    """A Policy on `device` (sharded with FSDP2 under torchrun), plus tokenizer, processor and VisionSpec."""
    from transformers import AutoTokenizer
    build = lambda model: make_policy(model, args, device, world, trainable)  # noqa: E731
    if torch.distributed.is_initialized() or is_resume_checkpoint(path):  # read once (a resume
        policy = load_sharded(path, torch.float32, build, device)  # checkpoint: each rank reads its own shards)
    else:
        policy = build(load_whole(path, torch.float32, device))
    tokenizer, processor = AutoTokenizer.from_pretrained(path), None
    try:  # the processor classes need torchvision; without it save_hf writes the preprocessor fields itself
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError):
        pass
    return policy, tokenizer, processor, vision_spec(policy.model.config, path if os.path.isdir(path) else None)


def next_samples(stream: RowStream, n: int, args, spec, tokenizer, counters: dict, bad_names: set) -> list:
    """The next n usable samples; unreadable media is skipped, counted, named once, past --max_bad_media stops all."""
    out = []
    while len(out) < n:
        pos, idx, row = stream.next()
        counters["rows_seen"] += 1
        try:
            out.append(make_sample(row, args, spec, tokenizer, random.Random(args.seed * 7_919 + pos), pos))
        except MediaError as e:
            counters["skipped_media"] += 1
            if row["path"] not in bad_names:
                bad_names.add(row["path"])
                print(f"skipping row {idx}: {e}", flush=True)  # the message names the file
            if counters["rows_seen"] >= 10 and counters["skipped_media"] > args.max_bad_media * counters["rows_seen"]:
                raise RunStopped(f"{counters['skipped_media']} of {counters['rows_seen']} rows had unreadable media "
                                   f"(limit --max_bad_media {args.max_bad_media}); check --media_root")
    return out


def pad_right(seqs: list[torch.Tensor], value) -> torch.Tensor:
    """Stack [G_i, C_i] tensors into [sum G_i, max C_i], padding on the right."""
    C = max(s.shape[1] for s in seqs)
    return torch.cat([F.pad(s, (0, C - s.shape[1]), value=value) for s in seqs])


def rollout(policy, samples: list, args: Args, tokenizer, eos_ids: list[int], pad_id: int, logit_mask) -> dict:
    """G completions per prompt, decoded and rewarded; each prompt's sampling is seeded by its stream position.
    Uses: sample_group, completion_mask, accuracy_reward, group_rewards."""
    G, out = args.num_generations, {"comps": [], "rewards": [], "parts": {}, "texts": []}
    for s in samples:
        gen = torch.Generator(logit_mask.device).manual_seed(args.seed * 1_000_003 + s.pos)
        c, _ = sample_group(policy, s, G, args.max_completion_length, args.temperature, args.top_p, eos_ids,
                            pad_id, logit_mask, gen)
        mask = completion_mask(c, eos_ids)
        texts = tokenizer.batch_decode(c.masked_fill(mask == 0, pad_id), skip_special_tokens=True)
        acc_shuffled = None
        if s.shuffled_vis is not None:  # T-GRPO: G/2 completions on permuted frames, scored only
            cs, _ = sample_group(policy, s, max(1, G // 2), args.max_completion_length, args.temperature,
                                 args.top_p, eos_ids, pad_id, logit_mask, gen, vis=s.shuffled_vis)
            acc_shuffled = [accuracy_reward(t, s.solution, s.problem_type)
                            for t in tokenizer.batch_decode(cs, skip_special_tokens=True)]
        totals, parts = group_rewards(texts, mask.sum(1).long().tolist(), s.solution, s.problem_type, s.mode,
                                      s.letter, args.length_bonus, acc_shuffled)
        out["comps"].append(c)
        out["rewards"] += totals
        out["texts"].append(texts)
        for k, v in parts.items():
            out["parts"].setdefault(k, []).extend(v)
    return out


def lr_factor(update: int, args: Args) -> float:
    """--learning_rate's factor at update `update`: linear warmup (--warmup_steps), then cosine to 0 or constant."""
    total = max(1, args.max_steps * args.num_iterations)
    if update < args.warmup_steps:
        return (update + 1) / args.warmup_steps
    if args.lr_scheduler_type == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (update - args.warmup_steps) / max(1, total - args.warmup_steps)))


def make_scheduler(optimizer, args: Args):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, args=args))


@dataclass
class Run:
    """What a training step uses besides its prompts: built once by train(), and by dry_run.py for its plan."""
    args: Args
    policy: Policy
    ref: Policy | None  # the reference model (beta > 0), or None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    logit_mask: torch.Tensor  # vocab_mask(): 0, or -inf on the tokens never sampled
    rank: int = 0
    world: int = 1
    gather: object = None  # every rank's picklable value, in rank order (default: all_gather)
    all_ranks: object = None  # whether a boolean tensor holds on every rank (default: a host sync and a gather)

    def __post_init__(self):
        self.gather = self.gather or functools.partial(all_gather, world=self.world)
        self.all_ranks = self.all_ranks or (lambda flag: all(self.gather(bool(flag))))

    def autocast(self):  # bf16: autocast for an unsharded policy; FSDP2's mixed precision casts a sharded one
        from torch.distributed.fsdp import FSDPModule
        on = self.args.bf16 and not isinstance(self.policy, FSDPModule)
        return torch.autocast(self.logit_mask.device.type, dtype=torch.bfloat16, enabled=on)


def no_hook(phase: str, value=None):
    return value


def score_groups(model, samples: list, comps: list, temperature: float, logit_mask, shared: bool) -> torch.Tensor:
    """sequence_logprobs of each prompt's completions (every group packed into one sequence when `shared`),
    right-padded with 0 into one [rows, C] tensor."""
    return pad_right([sequence_logprobs(model, s, c, temperature, logit_mask, shared)
                      for s, c in zip(samples, comps)], 0.0)


def grpo_step(run: Run, samples: list, phase=no_hook) -> dict:
    """One GRPO step on this rank's prompts, in named phases: rollout (G completions per prompt, rewards), then
    advantages, reference forward and old log-probs (no grad), then --num_iterations x (scoring forward and loss,
    backward, optimizer step). `phase(name, value)` runs as each phase begins (dry_run.py records the phase's
    memory) and returns `value` or what stands in for it ("completions": a plan's fixed full-length ones)."""
    args, policy, t0 = run.args, run.policy, time.time()
    phase("rollout: prefill")
    policy.eval()
    with torch.no_grad(), run.autocast(), full_weights(policy):
        ro = rollout(policy, samples, args, run.tokenizer, run.eos_ids, run.pad_id, run.logit_mask)
    ro, t_rollout = phase("completions", ro), time.time() - t0
    # groups live on one rank; "batch" scaling needs every rank's rewards
    rewards, n = torch.tensor(sum(run.gather(ro["rewards"]), []), device=run.logit_mask.device), len(ro["rewards"])
    adv = group_advantages(rewards, args.num_generations, args.scale_rewards)[run.rank * n:(run.rank + 1) * n]
    mask = pad_right([completion_mask(c, run.eos_ids) for c in ro["comps"]], 0.0)
    score = functools.partial(score_groups, samples=samples, comps=ro["comps"], temperature=args.temperature,
                              logit_mask=run.logit_mask, shared=args.prefix_sharing)
    policy.train()
    ref_lp = old = None
    with torch.no_grad(), run.autocast():
        if run.ref is not None:
            phase("reference forward")
            ref_lp = score(run.ref)
            if hasattr(run.ref, "reshard"):  # FSDP2-sharded
                run.ref.reshard()  # FSDP2 keeps a root gathered for its backward; the reference has none
        if args.num_iterations > 1:  # the policy that sampled, for real ratios later
            phase("old log-probs")
            old = score(policy)
    dapo_tokens = global_tokens(mask) if args.loss_type == "dapo" else None

    def objective():  # the scoring forward and the loss (one update: old = the detached log-probs, ratio 1)
        logp = score(policy)
        return grpo_loss(logp, logp.detach() if old is None else old, adv, mask, ref_lp, args.beta, args.epsilon,
                         args.epsilon_high, args.loss_type, args.max_completion_length, dapo_tokens)
    return {**update(run, objective, phase), "rollout": ro, "mask": mask, "rewards": rewards, "ref_logp": ref_lp,
            "t_rollout": t_rollout}


def sft_step(run: Run, samples: list, phase=no_hook) -> dict:
    """One SFT step: cross-entropy on each sample's target (its tokens and EOS), mean over tokens, then update();
    the phases and the result as grpo_step's."""
    ids = [run.tokenizer(s.target, add_special_tokens=False)["input_ids"] + [run.eos_ids[0]] for s in samples]
    targets = phase("completions", {"comps": [torch.tensor([t], device=run.logit_mask.device) for t in ids]})
    mask = pad_right([completion_mask(c, run.eos_ids) for c in targets["comps"]], 0.0)
    run.policy.train()
    objective = lambda: (-(score_groups(run.policy, samples, targets["comps"], 1.0, None,  # noqa: E731
                                        run.args.prefix_sharing) * mask).sum() / mask.sum(), {})
    return {**update(run, objective, phase), "rollout": targets, "mask": mask, "rewards": None, "t_rollout": 0.0}


def update(run: Run, objective, phase=no_hook) -> dict:
    """--num_iterations x (scoring forward: `objective()` -> (loss, stats); backward; gradient clipping and AdamW
    step). An update is skipped on every rank when the loss or the gradient is not finite on one (it never reaches
    the weights); the schedule advances either way; the gradients are freed at once (the next rollout needs room)."""
    skipped = 0
    for _ in range(run.args.num_iterations):  # updates on the same rollout
        phase("scoring forward")
        with run.autocast():
            loss, stats = objective()
        phase("backward")
        finite = run.all_ranks(torch.isfinite(loss))  # every rank takes the same branch
        if finite:
            loss.backward()  # FSDP2 reduce-scatters (averages) gradients across ranks here
        phase("optimizer step")
        grad_norm = torch.tensor(float("nan"))
        if finite:
            grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), run.args.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if run.all_ranks(torch.isfinite(grad_norm)):
            run.optimizer.step()
        else:
            skipped += 1
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")  # skipping is intended
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "stats": stats, "grad_norm": grad_norm.item(), "skipped": skipped}


def train(args: Args, preemption: Preemption | None = None) -> dict:
    """One stage of training -> the last step's metrics (rank 0); a signal `preemption` caught saves its step, stops."""
    from tqdm import tqdm
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed + rank)
    rows, prompts = load_rows(args.data), load_prompts(args.prompts)  # all validated before step one
    if args.stage == "sft" and (i := next((i for i, r in enumerate(rows) if "process" not in r), None)) is not None:
        raise DataError(f"{args.data}: row {i}: SFT rows need a `process` field (<think>...</think>)")
    if args.stage in ("pretext", "viss"):
        for kind in sorted({r["data_type"] for r in rows}):
            if not set(args.pretext_tasks.split(",")) & set(PRETEXT_TASKS[kind]):
                raise DataError(f"{args.data} has {kind} rows, but --pretext_tasks {args.pretext_tasks} enables no "
                                f"{kind} task ({', '.join(PRETEXT_TASKS[kind])})")
    os.makedirs(args.out, exist_ok=True)
    identity, marker = data_identity(rows, prompts), os.path.join(args.out, "PREEMPTED")
    if rank == 0 and os.path.exists(marker):  # this start continues it (or fails for its own reasons)
        os.remove(marker)
    resume = all_gather(latest_checkpoint(args.out) if rank == 0 else None, world)[0]  # rank 0's view: one choice
    if resume and not args.resume:  # never overwrite a run by accident
        raise RunStopped(f"{args.out} already holds {os.path.basename(resume)}: pass --resume to continue it, or "
                         f"choose another --out")
    if args.resume and not resume:
        print0(f"--resume: no checkpoint in {args.out} yet, starting from step 0")
    policy, tokenizer, processor, spec = load_model(resume or args.model, args, device, world)
    ref = load_model(args.model, args, device, world, trainable=False)[0] if args.beta > 0 else None  # beta 0: none
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args)
    meta = {"step": 0, "cursors": [0] * world, "counters": [dict(rows_seen=0, skipped_media=0, nonfinite=0)] * world}
    if resume:
        meta = read_json(os.path.join(resume, "meta.json"))
        if len(meta["cursors"]) != world:
            raise RunStopped(f"{resume} was written by {len(meta['cursors'])} processes; resume with as many")
        if (changed := resume_changes(meta, args, identity)) and not args.resume_with_changes:
            raise RunStopped(f"{resume} was trained with other settings; resuming would continue another run:\n  "
                             + "\n  ".join(changed) + "\npass the checkpoint's values, or --resume_with_changes")
        if meta["step"] > args.max_steps:
            raise RunStopped(f"{resume} is at step {meta['step']}, --max_steps {args.max_steps}: nothing to do")
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # the AdamW state (earlier
        state = {"optimizer": train_state(policy, optimizer)["optimizer"]}  # versions of this file: in optimizer/)
        dcp_io("load", state, os.path.join(resume, "state" if is_resume_checkpoint(resume) else "optimizer"))
        set_optimizer_state_dict(policy, optimizer, state["optimizer"])
        scheduler.load_state_dict(torch.load(os.path.join(resume, "scheduler.pt"), weights_only=True))
        scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)  # a changed lr / decay holds
        for group in optimizer.param_groups:
            group["weight_decay"] = args.weight_decay
        print0(f"resumed from {resume} at step {meta['step']}" + "".join(f"; changed: {c}" for c in changed))
        if (old := meta.get("args", {}).get("max_steps", args.max_steps)) != args.max_steps:  # a longer (shorter) run
            lr = [args.learning_rate * lr_factor(meta["step"] * args.num_iterations, replace(args, max_steps=n))
                  for n in (args.max_steps, old)]
            print0(f"--max_steps {old} -> {args.max_steps}: the {args.lr_scheduler_type} schedule now spans "
                   f"{args.max_steps} steps; the next update's lr is {lr[0]:.3g} (the old schedule's: {lr[1]:.3g})")
    counters, bad_names = dict(meta["counters"][rank]), set()
    stream = RowStream(rows, args.seed, rank, world, meta["cursors"][rank])
    sft, (eos_ids, pad_id) = args.stage == "sft", decoding_ids(policy.model, tokenizer)
    run = Run(args, policy, ref, optimizer, scheduler, tokenizer, eos_ids, pad_id, vocab_mask(policy.model, spec,
                                                                                                  device), rank, world)
    if rank == 0:
        for name in ("metrics.jsonl", "rollouts.jsonl"):  # a fresh run starts them anew; a resumed one drops
            path = os.path.join(args.out, name)  # the lines the killed run wrote after its last checkpoint
            kept = [line for line in open(path)] if resume and os.path.exists(path) else []
            with open(path, "w") as f:
                f.writelines(line for line in kept if json.loads(line)["step"] <= meta["step"])
    report = reporter(args) if rank == 0 else None
    bar = tqdm(total=args.max_steps, initial=meta["step"], desc=args.stage, dynamic_ncols=True, disable=rank != 0)
    m, t_start, step0 = {}, time.time(), meta["step"]
    t_saved = t_start  # --save_minutes counts from here
    # ---- a step's prompts are made at the end of the step before: a rank that cannot make them says so in its gather
    def prepare(step: int) -> tuple[list, str | None]:  # (this rank's samples for `step`, or why it has none)
        return attempt(next_samples, stream, args.per_device_prompts, args, spec, tokenizer, counters, bad_names) \
            if step <= args.max_steps else ([], None)

    samples, failed = prepare(meta["step"] + 1)
    stop_if_any(all_gather(failed, world))
    for step in range(meta["step"] + 1, args.max_steps + 1):
        t0 = time.time()
        out = (sft_step if sft else grpo_step)(run, samples)
        ro, mask, grad_norm, t_step = out["rollout"], out["mask"], out["grad_norm"], time.time() - t0
        if out["skipped"]:  # counted; the schedule advanced
            counters["nonfinite"] += out["skipped"]
            print0(f"step {step}: non-finite loss or gradient, update skipped ({counters['nonfinite']} so far)")
            if counters["nonfinite"] > args.max_nonfinite:
                raise RunStopped(f"{counters['nonfinite']} non-finite updates (limit --max_nonfinite)")
        # ---- next step's prompts; the stream position and counters a checkpoint of this step stores come first
        lens = mask.sum(1).tolist()
        due, lengths = args.log_rollouts_every and step % args.log_rollouts_every == 0, iter(lens)
        records = [dict(problem_id=s.row.get("problem_id"), task=s.task, gt_transform=s.letter, solution=s.solution,
                        completion=t, length=next(lengths))  # rollouts.jsonl, one per completion, when due
                   for s, texts in zip(samples, ro.get("texts", []) if due else []) for t in texts]
        local = {"loss": out["loss"], "stats": out["stats"], "parts": ro.get("parts", {}), "len": lens,
                 "counters": dict(counters), "cursor": stream.cursor, "rollouts": records}
        samples, local["failed"] = prepare(step + 1)
        local["signal"] = preemption.signal if preemption else None
        local["save_due"] = bool(args.save_minutes) and time.time() - t_saved >= 60 * args.save_minutes
        # ---- log: gather every rank's numbers (and reasons to stop); rank 0 prints a status line, appends metrics
        everyone = all_gather(local, world)
        meta = {"step": step, "cursors": [e["cursor"] for e in everyone], "counters": [e["counters"] for e in everyone],
                "args": vars(args), "data": identity}
        signalled = next((e["signal"] for e in everyone if e["signal"]), None)  # on any rank: every rank stops
        if rank == 0:
            m = log_step(args, step, everyone, grad_norm, scheduler.get_last_lr()[0], out["t_rollout"], t_step, sft,
                         out["rewards"])
            report(m)
            eta = (time.time() - t_start) / (step - step0) * (args.max_steps - step)
            bar.write(status_line(m, args.max_steps, sft) + f" | eta {eta / 60:.1f}m")
            bar.update(1)
        # ---- checkpoint (the last step always saves; --save_minutes: on rank 0's clock), HF export every N steps
        if step % args.save_steps == 0 or step == args.max_steps or signalled or everyone[0]["save_due"]:
            s = save_checkpoint(args, step, policy, tokenizer, processor, spec, optimizer, scheduler, meta, rank, world)
            t_saved, mb = time.time(), [b / 2**20 for b in s["bytes_per_rank"]]
            print0(f"step {step} saved: {max(mb):.1f} MiB per rank at most ({sum(mb):.1f} MiB in all) in "
                   f"{s['seconds']:.2f} s")
        if args.export_steps and step % args.export_steps == 0 and step < args.max_steps:
            export_run(os.path.join(args.out, f"hf-step-{step:06d}"), policy, tokenizer, processor, spec, meta, rank,
                       world)
        stop_if_any([e["failed"] for e in everyone])  # a rank could not make its next prompts: all stop here
        if signalled and step < args.max_steps:
            if rank == 0:
                with open(marker, "w") as f:  # under torchrun (whose agent exits 1 anyway) the requeue's cue
                    json.dump({"step": step, "signal": signalled, "checkpoint": latest_checkpoint(args.out)}, f)
            raise Preempted(f"{signalled}: step {step} saved in {latest_checkpoint(args.out)}; continue with the "
                            f"same command and --resume (exit status {PREEMPTED}, marker {marker})")
    bar.close()
    done = os.path.join(args.out, "meta.json")  # --out holds the last step's export iff its meta.json is this meta
    pending = rank == 0 and meta["step"] == args.max_steps > 0 and attempt(read_json, done)[0] != meta
    if all_gather(pending, world)[0]:  # rank 0's view (a resume may find the export half done or missing)
        export_run(args.out, policy, tokenizer, processor, spec, meta, rank, world)
    return m


def log_step(args, step, everyone, grad_norm, lr, t_rollout, t_step, sft, R) -> dict:
    """Rank 0: reduce every rank's numbers into one metrics row (TRL's names), dump rollouts every N steps."""
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    lengths = sum((e["len"] for e in everyone), [])
    m = {"step": step, "loss": mean([e["loss"] for e in everyone]), "grad_norm": grad_norm, "lr": lr,
         "time/rollout": t_rollout, "time/train": t_step - t_rollout,
         "skipped/media": sum(e["counters"]["skipped_media"] for e in everyone),
         "skipped/nonfinite": everyone[0]["counters"]["nonfinite"]}
    m.update({k: mean([e["stats"][k] for e in everyone]) for k in everyone[0]["stats"]})
    if not sft:
        std = R.view(-1, args.num_generations).std(1)
        m.update({"reward": R.mean().item(), "reward_std": std.mean().item(),
                  "frac_reward_zero_std": (std == 0).float().mean().item(),
                  "completions/mean_length": mean(lengths),
                  "completions/clipped_ratio": mean([float(n >= args.max_completion_length) for n in lengths]),
                  "tokens_per_sec": sum(lengths) / max(t_rollout, 1e-9)})
        m.update({f"rewards/{k}/mean": mean(sum((e["parts"][k] for e in everyone), [])) for k in everyone[0]["parts"]})
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    if any(e["rollouts"] for e in everyone):  # a step that dumps them (train() builds the records: GRPO, when due)
        with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": step, "rank": rank, **x}) + "\n"
                         for rank, e in enumerate(everyone) for x in e["rollouts"])
        x, t = everyone[0]["rollouts"][0], everyone[0]["rollouts"][0]["completion"]
        task = f"task {x['task']} gt {x['gt_transform']}" if x["task"] else ""
        print(f"  rollout: problem {x['problem_id']} {task} answer gt {extract_tag(x['solution'])!r}\n"
              f"  completion: {t[:300]!r}\n  parsed: answer "
              f"{extract_tag(t)!r} transform {extract_tag(t, 'transform')!r} reward {R[0].item():.2f}", flush=True)
    return m


def reporter(args: Args):
    """--report_to: a function sending one metrics row to TensorBoard or wandb (imported only when asked for)."""
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        writer = SummaryWriter(os.path.join(args.out, "tensorboard"))

        def send(m):
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, m["step"])
            writer.flush()
        return send
    if args.report_to == "wandb":
        import wandb
        run = wandb.init(project="viss-r1", name=os.path.basename(os.path.abspath(args.out)), dir=args.out,
                         config=vars(args), resume="allow")
        return lambda m: run.log(m, step=m["step"])
    return lambda m: None


def status_line(m: dict, max_steps: int, sft: bool) -> str:
    """One fixed-format line per step: reward and its parts, zero-std groups, length, clipping, KL, grad, speed."""
    line = f"step {m['step']}/{max_steps} | loss {m['loss']:.4f} | "
    if not sft:
        parts = " ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in m.items() if k.startswith("rewards/"))
        line += (f"reward {m['reward']:.3f} ({parts}) | zero-std {m['frac_reward_zero_std']:.2f} | "
                 f"len {m['completions/mean_length']:.0f} | clip {m.get('clip_ratio/region_mean', 0):.3f} | "
                 f"kl {m.get('kl', 0):.4f} | ")
    return line + (f"gnorm {m['grad_norm']:.2f} | lr {m['lr']:.2e} | rollout {m['time/rollout']:.1f}s "
                   f"train {m['time/train']:.1f}s")


def run_command(fn, *args):
    """fn(*args) as a command's whole run (train here, eval.py, annotate.py): a stop every rank agreed on exits with
    its reason printed once, by rank 0 (a preempted run: status PREEMPTED); then the process group goes down."""
    try:
        out = fn(*args)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank past its last collective before any tears the group down
        return out
    except Preempted as e:  # saved: a requeue continues it
        print0(f"preempted: {e}")
        raise SystemExit(PREEMPTED) from None
    except (DataError, RunStopped) as e:  # the message is the whole story
        raise SystemExit(f"error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1) from None
    finally:
        if torch.distributed.is_initialized():
            import gc
            torch.distributed.destroy_process_group()
            gc.collect()  # the group's last references (FSDP2 state) go now: in the interpreter's exit, gloo aborted


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--export" in argv:  # python viss_r1.py --export out/step-000300 --to hf/
        import argparse
        p = argparse.ArgumentParser(description="export a resume checkpoint as a Hugging Face folder (CPU, no GPU)")
        p.add_argument("--export", required=True, help="a checkpoint folder, <out>/step-NNNNNN")
        p.add_argument("--to", required=True, help="the folder to write (from_pretrained and eval.py load it)")
        own = p.parse_args(argv)
        return run_command(export, own.export, own.to)
    args = parse_args(argv)
    if not args.data:
        raise SystemExit("--data is required (a Video-R1 JSON or JSONL file)")
    preemption = Preemption()
    try:
        return run_command(train, args, preemption)
    finally:
        preemption.restore()


if __name__ == "__main__":
    main()
