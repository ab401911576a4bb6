"""
dry_run.py: will this training run fit? A per-GPU memory plan of one ViSS-R1 step, measured before any GPU is
touched, by running viss_r1.py's own code on fake tensors (shapes and sizes, no data).

    python dry_run.py --stage viss --model CFG_DIR --world_size 8 --gpu_memory 80,40   # bf16 + checkpointing
    python -c "import demo; demo.write_qwen25_vl_config('cfg/qwen2.5-vl-7b', '7b')"    # a config-only CFG_DIR

Every viss_r1.py training flag is accepted (stage presets included) and means what it means there, with the
defaults of a run on CUDA (--bf16 and --gradient_checkpointing on unless --no-bf16 etc.); --model may
be a config-only directory (config.json, tokenizer, preprocessor_config.json: no weights are read). The real
architecture is built on fake tensors, sharded with FSDP2 exactly as the run shards it (viss_r1.make_policy)
over a fake process group of --world_size ranks, and one step runs through the functions train() calls:
viss_r1.rollout (sample_group: prefill, then decoding to --max_completion_length), sequence_logprobs for the
reference (beta > 0) and the policy, grpo_loss, backward with the run's checkpointing, clip_grad_norm_ and the
AdamW step. A dispatch mode sees every tensor created and freed and keeps, for each phase, its peak split into
parameters / gradients / optimizer state / activations / gathered weights (FSDP2 all-gathers) / KV cache.
The step is the steady state: the previous step's gradients and the AdamW state are alive from the start.
Each prompt is one Video-R1 row whose clip has the largest frame the run's pixel bounds allow (--video_size HxW
plans a given source size instead), sampled and prompted by viss_r1.make_sample.

What fake tensors cannot run, and what is done instead (printed with the plan):
  - data the code branches on (token ids, grids, positions, cu_seqlens, window indices) is kept real: tensors
    made from Python values or small factories stay constants that the fake mode computes for real, and
    get_rope_index (its output is built from Python numbers) runs outside the fake mode on real inputs.
    They depend on the shapes of the clip and prompt, not on weights.
  - which token is sampled is data: the plan samples (for its memory) but emits a fixed token that is never
    EOS, so every row decodes the full --max_completion_length (the worst case). Decoding all of them on fake
    tensors takes minutes, so the KV cache is first grown through its own update() to prompt + C - 2 tokens
    and sample_group then decodes the last token: that step holds the largest cache, and nothing else grows
    (--full_decode decodes every token instead; tested equal on a tiny model).
  - AdamW runs its foreach implementation, the one torch picks for CUDA tensors (CPU tensors get a loop).
Python's garbage collector runs at every phase boundary (buffers that only it frees, such as a finished
reduce-scatter's input, would otherwise linger for a nondeterministic time, as they can in a real run).
Not counted: the CUDA context and NCCL buffers (--reserve keeps room for them), allocator fragmentation, and
CPU memory (data loading). `--tensors real` runs the same accounting on real tensors (small models only; under
torchrun with real collectives): the check of the simulation, used by the tests.

These are private torch APIs (fake tensors, the fake process group, FSDP2's parameter groups): the torch pin in
requirements.txt keeps them stable, check_internals() names the one that moved, and the tests exercise them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import random
import sys
import tempfile
import time
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a plan never downloads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import demo as D  # noqa: E402  (the .y4m writer)
import viss_r1 as V  # noqa: E402

GiB = 1024 ** 3
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "gathered", "kv_cache")
HEADERS = ("parameters", "gradients", "optimizer", "activations", "gathered", "KV cache")
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 bytes
CONSTANT_BYTES = 8 << 20  # factories up to this size make constants (real values); FSDP2's buffers stay fake

# ---------------------------------------------------------------------------------------------------------
# Private torch APIs, checked in one place
# ---------------------------------------------------------------------------------------------------------


def check_internals() -> None:
    """Fail with a clear message if a private torch API this file relies on has moved (torch is pinned)."""
    import importlib
    needs = [("torch._subclasses.fake_tensor", ("FakeTensorMode", "FakeTensor", "unset_fake_temporarily",
                                                "CONSTANT_NUMEL_LIMIT")),
             ("torch.fx.experimental.symbolic_shapes", ("ShapeEnv",)),
             ("torch.testing._internal.distributed.fake_pg", ("FakeStore",)),
             ("torch.utils._python_dispatch", ("TorchDispatchMode",)),
             ("torch.distributed._tools.common_utils", ("get_untyped_storages",)),
             ("torch.distributed.fsdp._fully_shard._fsdp_param_group", ("FSDPParamGroup",)),
             ("torch.distributed.tensor._sharding_prop", ("ShardingPropagator",)),
             ("transformers.cache_utils", ("DynamicLayer",))]
    import transformers
    pins = (f"requirements.txt pins torch==2.13.0 and transformers==5.23.0; this is torch {torch.__version__}, "
            f"transformers {transformers.__version__}")
    for module, names in needs:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise RuntimeError(f"dry_run.py needs {module} ({pins}): {e}") from None
        for name in names:
            if not hasattr(mod, name):
                raise RuntimeError(f"dry_run.py needs {module}.{name}, which is gone ({pins})")
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    for cls, method in [(FSDPParamGroup, m) for m in ("unshard", "wait_for_unshard", "post_backward")] + \
                       [(ShardingPropagator, "_propagate_tensor_meta_non_cached")]:
        if not callable(getattr(cls, method, None)):
            raise RuntimeError(f"{cls.__name__}.{method} moved ({pins}): dry_run.py hooks it to label or skip "
                               f"allocations")
    if "fake" not in torch.distributed.Backend.backend_list:
        raise RuntimeError("torch.distributed has no 'fake' backend to register the fake process group with")


# ---------------------------------------------------------------------------------------------------------
# The accounting: a dispatch mode that sees every storage, by category, with each phase's peak
# ---------------------------------------------------------------------------------------------------------

class Plan:
    """Live bytes per category, and for each phase the split at its peak. `mode()` is the dispatch mode that
    feeds it; on fake tensors (fake_mode given) the same mode also keeps small factories as real constants."""

    def __init__(self, fake_mode=None):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils.weak import WeakIdKeyDictionary
        self.fake_mode = fake_mode
        self.plain = {torch.Tensor, torch.nn.Parameter, FakeTensor}  # one storage each, no subclass walk
        self.storages = WeakIdKeyDictionary()  # storage -> (weakref with a free callback, [bytes, category])
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.category = "activations"  # of storages allocated from now on
        self.phase, self.peaks, self.order = None, {}, []
        self.unseen = 0  # > 0 inside island() and DTensor's metadata propagation: ops are not counted

    # --- bookkeeping -----------------------------------------------------------------------------------
    def _change(self, category: str, delta: int) -> None:
        self.live[category] += delta
        self.total += delta
        peak = self.peaks.get(self.phase)
        if peak is not None and self.total > peak["total"]:
            self.peaks[self.phase] = dict(self.live, total=self.total)

    def track(self, t, category: str | None = None) -> None:
        """Count the storages of tensor `t` (DTensors: their local shards) not yet seen, as `category`."""
        from torch.distributed._tools.common_utils import get_untyped_storages
        for st in (t.untyped_storage(),) if type(t) in self.plain else get_untyped_storages(t):
            if st in self.storages:
                continue
            rec = [math.ceil(st.nbytes() / BLOCK) * BLOCK, category or self.category]

            def freed(_, rec=rec):
                self._change(rec[1], -rec[0])
            self.storages[st] = (weakref.ref(st, freed), rec)
            self._change(rec[1], rec[0])

    def relabel(self, t, category: str) -> None:
        """Move the storages of `t` to `category` (e.g. a gradient produced by backward, then kept)."""
        from torch.distributed._tools.common_utils import get_untyped_storages
        for st in get_untyped_storages(t):
            if st not in self.storages:
                self.track(t, category)
                continue
            rec = self.storages[st][1]
            if rec[1] != category:
                self.live[rec[1]] -= rec[0]
                rec[1] = category
                self.live[category] += rec[0]

    def resized(self, st) -> None:
        """FSDP2 frees and re-allocates unsharded parameters by resizing their storage in place."""
        if st in self.storages:
            rec = self.storages[st][1]
            new = math.ceil(st.nbytes() / BLOCK) * BLOCK
            self._change(rec[1], new - rec[0])
            rec[0] = new

    def enter(self, phase: str | None) -> None:
        """Start (or resume) a phase: its peak starts at what is alive now."""
        if phase != self.phase:
            gc.collect()  # what only the garbage collector frees, freed at phase boundaries
        self.phase = phase
        if phase is not None and phase not in self.peaks:
            self.order.append(phase)
            self.peaks[phase] = dict(self.live, total=self.total)

    @contextlib.contextmanager
    def labelled(self, category: str):
        old, self.category = self.category, category
        try:
            yield
        finally:
            self.category = old

    # --- fake tensors: constants and real islands --------------------------------------------------------
    def constant(self, t: torch.Tensor) -> torch.Tensor:
        """A real tensor as a fake one that keeps its values (the fake mode computes with constants for real)."""
        if self.fake_mode is None:
            self.track(t)
            return t
        out = self.fake_mode.fake_tensor_converter.from_real_tensor(self.fake_mode, t, make_constant=True)
        self.track(out)
        return out

    def island(self, fn):
        """`fn` run outside the fake mode on the real values of its (constant) inputs; outputs as constants.
        For functions that build tensors from Python numbers (get_rope_index): shapes only, no weights."""
        if self.fake_mode is None:
            return fn
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torch.utils._pytree import tree_map_only

        def real(t):
            if isinstance(t, FakeTensor):
                if t.constant is None:
                    raise RuntimeError(f"{fn.__qualname__} got a tensor without values: run it on real inputs")
                return t.constant
            return t

        def run(*args, **kwargs):
            args, kwargs = tree_map_only(torch.Tensor, real, (args, kwargs))
            self.unseen += 1
            try:
                with unset_fake_temporarily():
                    out = fn(*args, **kwargs)
            finally:
                self.unseen -= 1
            return tree_map_only(torch.Tensor, self.constant, out)
        return run

    def mode(self):
        """The dispatch mode: counts every new storage; on fake tensors, small factories become constants."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        aten = torch.ops.aten
        factories = {aten.empty.memory_format, aten.empty_strided.default, aten.zeros.default, aten.ones.default,
                     aten.full.default, aten.scalar_tensor.default, aten.arange.default, aten.arange.start,
                     aten.arange.start_step}
        skip = {torch.ops.prim.device.default, aten._local_scalar_dense.default}  # metadata, no storage
        plan = self

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in skip or plan.unseen:
                    return func(*args, **kwargs)
                if any(issubclass(t, DTensor) for t in types):
                    return NotImplemented  # DTensor re-dispatches its local ops, which are counted
                if plan.fake_mode is not None and func in factories and small(func, args, kwargs):
                    with unset_fake_temporarily():  # real values, e.g. torch.zeros for a position table
                        out = func(*args, **kwargs)
                    return plan.constant(out)
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor):  # the common case, without a pytree walk
                    plan.track(out)
                else:
                    for t in tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            plan.track(t)
                return out

        def small(func, args, kwargs) -> bool:
            if func.overloadpacket in (aten.arange, aten.scalar_tensor):
                return True  # index ranges: at most a sequence long
            itemsize = kwargs["dtype"].itemsize if kwargs.get("dtype") is not None else 8
            return math.prod(args[0]) * itemsize <= CONSTANT_BYTES

        return Counting()

    @contextlib.contextmanager
    def active(self):
        """For the plan's duration: the dispatch mode, a hook on storage resizes (FSDP2 frees and re-allocates
        that way), no counting inside DTensor's sharding propagation (it builds global-shape tensors to read
        their metadata, under the active fake mode or one of its own), and constants of any size."""
        import torch._subclasses.fake_tensor as fake
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
        resize, limit = torch.UntypedStorage.resize_, fake.CONSTANT_NUMEL_LIMIT
        propagate = ShardingPropagator._propagate_tensor_meta_non_cached
        plan = self

        def resize_(st, size):
            resize(st, size)
            plan.resized(st)

        def metadata_only(*args, **kwargs):
            plan.unseen += 1
            try:
                return propagate(*args, **kwargs)
            finally:
                plan.unseen -= 1
        torch.UntypedStorage.resize_, ShardingPropagator._propagate_tensor_meta_non_cached = resize_, metadata_only
        fake.CONSTANT_NUMEL_LIMIT = 1 << 40  # masks and position tables stay real whatever their size
        try:
            with self.mode():
                yield self
        finally:
            torch.UntypedStorage.resize_, ShardingPropagator._propagate_tensor_meta_non_cached = resize, propagate
            fake.CONSTANT_NUMEL_LIMIT = limit


# ---------------------------------------------------------------------------------------------------------
# Labels: the category of a new storage follows from where it is allocated
# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def instrumented(plan: Plan, policies: list, optimizer):
    """Label allocations by their origin, for the plan's duration: FSDP2's all-gathers and copy-outs are gathered
    weights, its post-backward (reduce-scatter, sharded gradients) and the unsharded gradients it consumes are
    gradients, the optimizer step is optimizer state, the KV cache's update() is the KV cache. Without FSDP2
    (one process) each gradient is relabelled once accumulated. Everything else is activations."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import cache_utils
    undo = []

    def wrap(obj, name, category, before=None):
        fn, own = getattr(obj, name), name in vars(obj)

        def wrapped(*args, **kwargs):
            if before is not None:
                before()
            with plan.labelled(category):
                return fn(*args, **kwargs)
        setattr(obj, name, wrapped)
        undo.append(lambda: setattr(obj, name, fn) if own else delattr(obj, name))

    def unsharded_grads(group):  # produced by backward into the gathered parameters, reduced by post_backward
        for fp in group.fsdp_params:
            param = getattr(fp, "_unsharded_param", None)
            if param is not None and param.grad is not None:
                plan.relabel(param.grad, "gradients")

    sharded = False
    for policy in policies:
        for m in policy.modules():
            group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
            if group is not None:
                sharded = True
                wrap(group, "unshard", "gathered")
                wrap(group, "wait_for_unshard", "gathered")
                wrap(group, "post_backward", "gradients", before=lambda g=group: unsharded_grads(g))
    handles = [] if sharded else [p.register_post_accumulate_grad_hook(lambda p: plan.relabel(p.grad, "gradients"))
                                  for p in policies[0].parameters() if p.requires_grad]
    for cls in (cache_utils.DynamicLayer, cache_utils.DynamicSlidingWindowLayer):
        for name in ("update", "batch_repeat_interleave"):
            if name in vars(cls):
                wrap(cls, name, "kv_cache")
    previous = []

    def step_begins(*_):  # hooks return None: a pre-hook's return value would replace the step's arguments
        previous.append(plan.category)
        plan.category = "optimizer"

    def step_ends(*_):
        plan.category = previous.pop()
    handles += [optimizer.register_step_pre_hook(step_begins), optimizer.register_step_post_hook(step_ends)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for u in reversed(undo):
            u()


# ---------------------------------------------------------------------------------------------------------
# The run's input: one Video-R1 row whose clip has the planned frame size, through viss_r1.make_sample
# ---------------------------------------------------------------------------------------------------------

PLAN_ROW = {  # a multiple-choice question of typical length (the text is ~10 % of the prompt: video dominates)
    "problem_id": "dry-run", "data_type": "video", "problem_type": "multiple choice", "data_source": "dry_run",
    "problem": "The person in the video picks up several objects from the table one after another. Which object "
               "does the person pick up right after putting down the red cup, and where is it placed afterwards? ",
    "options": ["A. The blue bottle, on the shelf", "B. The notebook, in the drawer", "C. The green apple, in "
                "the bowl", "D. The phone, back on the table"],
    "solution": "<answer>C</answer>", "path": "./clip.y4m",
    "process": "<think>I look.</think>",  # read only by the sft stage
}


def frame_size(args: V.Args, spec: V.VisionSpec, video_size: str | None = None) -> tuple[int, int]:
    """(height, width) of every planned frame: the source `video_size` ("HxW") resized as make_sample resizes it,
    or by default the largest frame the run's pixel bounds allow (the most vision tokens per frame). This is the
    one place that reads the run's pixel bounds for video."""
    (lo, hi), f = V.pixel_bounds(args, "video"), spec.factor
    if video_size:
        h, w = (int(x) for x in video_size.lower().split("x"))
        return V.smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=hi)
    k = max(1, hi // (f * f))  # merged tokens per frame at most: the grid a x b with a <= b and a * b <= k largest
    a = max(range(1, math.isqrt(k) + 1), key=lambda a: (a * (k // a), a))
    return V.smart_resize(f * a, f * (k // a), factor=f, min_pixels=lo, max_pixels=hi)


def plan_samples(args: V.Args, spec: V.VisionSpec, tokenizer, root: str, video_size: str | None) -> list:
    """--per_device_prompts samples of PLAN_ROW, its clip written as a real .y4m file (decord reads it), made by
    viss_r1.make_sample as train() makes them (pretext transform, resize, patches, chat template)."""
    h, w = frame_size(args, spec, video_size)
    frames = args.nframes or args.max_frames
    D.write_y4m(os.path.join(root, "clip.y4m"), np.full((frames, 3, h, w), 128, np.uint8), fps=2)
    run = copy.copy(args)
    run.media_root = root
    return [V.make_sample(dict(PLAN_ROW), run, spec, tokenizer, random.Random(args.seed * 7_919 + i))
            for i in range(args.per_device_prompts)]


# ---------------------------------------------------------------------------------------------------------
# The rollout's data-dependent parts: the sampled token, and the jump to the last decoding step
# ---------------------------------------------------------------------------------------------------------

class Decoding:
    """Installed over viss_r1._sample_token and as a forward pre-hook of the policy during the rollout. Sampling
    runs (its memory counts) but a fixed token that is never EOS is emitted, so every row decodes C tokens. Unless
    `full`, the first decoding call grows the KV cache by C - 2 positions through the cache's own update() and
    the next draw is EOS: sample_group runs only its last, largest decoding step."""

    def __init__(self, plan: Plan, filler: int, eos: int, C: int, full: bool):
        self.plan, self.filler, self.eos, self.C, self.full = plan, filler, eos, C, full
        self.draws = 0  # draws in the current group
        self.sample_token = V._sample_token  # the real one, run for its memory

    def forward_pre_hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None:  # a prefill starts a new group
            self.draws = 0
            self.plan.enter("rollout: prefill")
            return
        self.plan.enter("rollout: decode")
        if not self.full and self.draws == 1 and self.C > 2:
            grow = lambda t: t.new_zeros(*t.shape[:2], self.C - 2, t.shape[3])  # noqa: E731  (no reference kept
            for i, layer in enumerate(cache.layers):  # to the old cache: update() frees it as decoding would)
                cache.update(grow(layer.keys), grow(layer.values), i)  # [G, kv, P, d] -> [G, kv, P + C - 2, d]

    def __call__(self, logp: torch.Tensor, top_p: float, generator) -> torch.Tensor:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
        try:
            self.sample_token(logp, top_p, generator)
        except GuardOnDataDependentSymNode:  # fake tensors: the sort-free sampler stops at its accept/reject test,
            pass  # after its first round, which holds its peak (probabilities, float64 CDF, the mass test)
        self.draws += 1
        token = self.eos if not self.full and self.draws == 2 else self.filler
        return torch.full((logp.shape[0],), token, dtype=torch.long, device=logp.device)


@contextlib.contextmanager
def decoding(policy, dec: Decoding):
    handle = policy.register_forward_pre_hook(dec.forward_pre_hook, with_kwargs=True, prepend=True)
    V._sample_token = dec
    try:
        yield
    finally:
        V._sample_token = dec.sample_token
        handle.remove()


# ---------------------------------------------------------------------------------------------------------
# One step of train(), phase by phase
# ---------------------------------------------------------------------------------------------------------

def run_plan(args: V.Args, world: int = 8, fake: bool = True, video_size: str | None = None,
             full_decode: bool = False) -> dict:
    """Build the run's policy (and reference) from args.model's config, then run one steady-state step of
    train() under the accounting. fake=False: real tensors, and `world` is the real process group's."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig
    check_internals()
    t0 = time.time()
    config = AutoConfig.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    spec = V.vision_spec(config, args.model)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.testing._internal.distributed.fake_pg import FakeStore
        rank, device = 0, torch.device("cpu")
        if world > 1:  # every rank holds the same shapes: rank 0 (the largest shards) stands for all
            torch.distributed.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        # .item() of a fake value (grpo_loss's logging) gives a symbol; nothing branches on it
        fake_mode = FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True))
    else:
        rank, world, device = V.setup_distributed()
        fake_mode = None
        torch.manual_seed(args.seed)
    try:
        with tempfile.TemporaryDirectory() as root:
            samples = plan_samples(args, spec, tokenizer, root, video_size)
        grid = samples[0].vis["video_grid_thw"][0].tolist()  # [t, h, w] patches of the (transformed) clip
        with fake_mode or contextlib.nullcontext():  # the weights: fake (or random) tensors of the real shapes
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
            ref_model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32) if args.beta > 0 else None
        if os.path.isfile(os.path.join(args.model, "generation_config.json")):  # as from_pretrained reads it
            model.generation_config = GenerationConfig.from_pretrained(args.model)
        n_params = sum(p.numel() for p in model.parameters())
        n_vision = sum(p.numel() for p in model.model.visual.parameters())
        policy = V.make_policy(model, args, device, world)  # what load_model does after from_pretrained
        ref = V.make_policy(ref_model, args, device, world, trainable=False) if ref_model is not None else None
        plan = Plan(fake_mode)
        for p in (policy, ref):
            if p is not None:  # builds M-RoPE positions from Python numbers: run for real
                p.model.model.get_rope_index = plan.island(p.model.model.get_rope_index)
        with fake_mode or contextlib.nullcontext(), plan.active():
            phases = run_step(plan, args, policy, ref, samples, tokenizer, spec, device, world, full_decode)
    finally:
        if fake and world > 1:
            torch.distributed.destroy_process_group()
    return {"phases": phases, "order": list(phases), "parameters": n_params, "vision_parameters": n_vision,
            "model_type": config.model_type, "world": world, "rank": rank, "fake": fake,
            "prompt_tokens": len(samples[0].ids), "video_tokens": V.num_vision_tokens(grid, spec),
            "frames": args.nframes or args.max_frames, "frame": list(frame_size(args, spec, video_size)),
            "completion_tokens": args.max_completion_length, "full_decode": full_decode,
            "seconds": time.time() - t0}


def run_step(plan: Plan, args: V.Args, policy, ref, samples: list, tokenizer, spec, device, world: int,
             full_decode: bool) -> dict:
    """One step of train(): viss_r1.grpo_step (or sft_step), the function train() calls, with a phase hook that
    enters each phase in the plan. What a plan does differently, and only that: the AdamW state exists from a
    steady-state setup step; AdamW runs foreach, as torch picks it for CUDA tensors; every completion is C tokens
    long (Decoding, and the hook's "completions"); the gathers and agreements of ranks are local (every rank of
    the fake group holds the same shapes)."""
    sft, C = args.stage == "sft", args.max_completion_length
    for p in (policy, ref):  # sharded fp32 weights (DTensor local shards) and buffers
        for t in [*p.parameters(), *p.buffers()] if p is not None else []:
            plan.track(t, "parameters")
    for s in samples:  # inputs as constants: the code reads their values (grids, timestamps)
        s.vis = {k: plan.constant(v) for k, v in s.vis.items()}
        if s.shuffled_vis is not None:
            s.shuffled_vis = {k: plan.constant(v) for k, v in s.shuffled_vis.items()}
    # train() builds AdamW with its defaults: torch's foreach kernels on CUDA (CPU tensors would get a loop). The
    # setup step that creates the state runs the loop (same state; DTensor's foreach dispatch is slow to simulate)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  foreach=False)
    with instrumented(plan, [policy] + ([ref] if ref is not None else []), optimizer):
        # ---- steady state: AdamW's moments (train() frees the gradients right after each optimizer step)
        plan.enter("setup")
        with plan.labelled("gradients"):
            for p in policy.parameters():
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["foreach"] = True
        eos_ids, pad_id = V.decoding_ids(policy.model, tokenizer)
        banned = set(eos_ids) | {pad_id, spec.image_token_id, spec.video_token_id}
        filler = next(i for i in range(len(tokenizer)) if i not in banned)  # a plain text token
        run = V.Run(args, policy, ref, optimizer, V.make_scheduler(optimizer, args), tokenizer, eos_ids, pad_id,
                    V.vocab_mask(policy.model, spec, device), 0, world, gather=lambda value: [value] * world,
                    all_ranks=lambda flag: True)

        def phase(name: str, value=None):
            if name == "completions":  # what a full-length rollout returns: C tokens a row, no EOS
                return dict(value, comps=[torch.full((c.shape[0], C), filler, device=device) for c in value["comps"]])
            plan.enter(name)
            return value
        with decoding(policy, Decoding(plan, filler, eos_ids[0], C, full_decode)):
            (V.sft_step if sft else V.grpo_step)(run, samples, phase)
        plan.enter(None)
    return {name: plan.peaks[name] for name in plan.order if name != "setup"}


# ---------------------------------------------------------------------------------------------------------
# The printed plan
# ---------------------------------------------------------------------------------------------------------

ARCH_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


def verdict(res: dict, gpu_memory: float, reserve: float) -> dict:
    """Which phase peaks, and whether the peak fits a card of `gpu_memory` GiB with `reserve` GiB kept free."""
    usable = (gpu_memory - reserve) * GiB
    phase = max(res["order"], key=lambda p: res["phases"][p]["total"]) if res["order"] else None
    peak = res["phases"][phase]["total"] if phase else 0
    over = [p for p in res["order"] if res["phases"][p]["total"] > usable]
    return {"peak_phase": phase, "peak": peak, "fits": not over, "overflowing": over, "usable": usable}


def host_memory(res: dict, args: V.Args, ranks_per_node: int = 8) -> dict:
    """Host memory (bytes) one node needs to load the run's models, from the parameter count: under FSDP2 rank 0
    alone reads a checkpoint (viss_r1.load_sharded: one copy in the model's dtype, freed before the next model
    loads) while every rank builds on the meta device and receives only its shards, on its GPU. One process
    holds its one copy. `every_rank`: what reading the whole checkpoint on each rank of a node would take."""
    P, ranks = res["parameters"], min(ranks_per_node, res["world"])
    policy = 4 * P  # float32 master weights; the reference (beta > 0) is read the same way, after the policy
    return {"policy": policy, "reference": policy if args.beta > 0 else 0, "teacher_bf16": 2 * P,
            "peak": policy, "every_rank": ranks * policy, "ranks_per_node": ranks}


def host_memory_line(res: dict, args: V.Args, ranks_per_node: int = 8) -> str:
    h, gb = host_memory(res, args, ranks_per_node), lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    ref = f", then the reference {gb(h['reference'])}" if h["reference"] else ""
    return (f"host memory per node to load (formula: rank 0 reads each checkpoint once, 4 bytes a parameter in "
            f"float32, and broadcasts it; the other ranks hold only their GPU shards): the policy {gb(h['policy'])}"
            f"{ref} (peak {gb(h['peak'])}); an annotate.py --shard_teacher teacher of this size in bf16 "
            f"{gb(h['teacher_bf16'])}; reading on each of {h['ranks_per_node']} ranks of a node would take "
            f"{gb(h['every_rank'])}")


def checkpoint_plan(res: dict, ranks_per_node: int = 8, write_gbs: float = 2.0) -> dict:
    """What a save writes, from the plan's own rank-0 shards (the largest): a resume checkpoint holds each rank's
    float32 weights and AdamW moments, written by every rank in parallel (viss_r1.save_checkpoint); the Hugging Face
    export is the whole float32 model, gathered to rank 0 and written by it alone. Seconds at `write_gbs` GB/s
    per node (an assumption: the filesystem's rate, not measured here)."""
    at = res["phases"][res["order"][0]]  # the AdamW state is alive from the first phase on
    rank, ranks = at["parameters"] + at["optimizer"], min(ranks_per_node, res["world"])
    return {"bytes_per_rank": rank, "bytes_per_node": ranks * rank, "seconds": ranks * rank / (write_gbs * 1e9),
            "export_bytes": 4 * res["parameters"], "export_seconds": 4 * res["parameters"] / (write_gbs * 1e9),
            "write_gbs": write_gbs}


def checkpoint_line(res: dict, ranks_per_node: int = 8, write_gbs: float = 2.0) -> str:
    c = checkpoint_plan(res, ranks_per_node, write_gbs)
    gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"  # noqa: E731
    return (f"checkpoints (planned, at an assumed {write_gbs:g} GB/s per node, --write_gbs): a resume checkpoint "
            f"is {gb(c['bytes_per_rank'])} per rank (float32 shards and AdamW moments), written in parallel, "
            f"{gb(c['bytes_per_node'])} per node in {c['seconds']:.1f} s: a preemption signal must arrive at least "
            f"one step plus that before the kill; the Hugging Face export (end of run, --export_steps) is "
            f"{gb(c['export_bytes'])}, written by rank 0 alone in {c['export_seconds']:.1f} s")


def format_plan(res: dict, args: V.Args, cards: list[float], reserve: float, brief: bool = False,
                device_defaults: tuple = (), ranks_per_node: int = 8, write_gbs: float = 2.0) -> str:
    """The printed plan: what was planned, the table by phase and category with a column per card size, one
    verdict line per card, and (unless brief) how it was measured."""
    b = lambda n: f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"  # noqa: E731
    arch = ARCH_NAMES.get(res["model_type"], res["model_type"])
    shard = f"FSDP2 over {res['world']} ranks" if res["world"] > 1 else "one process (no sharding)"
    flags = ", ".join(f for f, on in (("bf16", args.bf16), ("gradient checkpointing", args.gradient_checkpointing))
                      if on) or "float32"
    if device_defaults:  # flags the command line left to their default for a run on CUDA
        flags += f" ({' and '.join('--' + k for k in device_defaults)}: the CUDA default{'s' * (len(device_defaults) > 1)})"
    (h, w), n = res["frame"], args.per_device_prompts
    top = max((r["total"] for r in res["phases"].values()), default=0)
    unit, div = ("GiB", GiB) if top >= GiB else ("MiB", 1 << 20)  # tiny models in MiB
    rows = f"1 target of {args.max_completion_length} tokens" if args.stage == "sft" else \
        f"G {args.num_generations} x {args.max_completion_length} completion tokens"
    lines = [f"dry run of one {args.stage} step: {arch}, {b(res['parameters'])} parameters (language model "
             f"{b(res['parameters'] - res['vision_parameters'])}, vision {b(res['vision_parameters'])}), {shard}, "
             f"{flags}",
             f"per GPU: {n} prompt{'s' * (n > 1)} of {res['prompt_tokens']:,} tokens ({res['video_tokens']:,} video: "
             f"{res['frames']} frames of {h}x{w} px; {res['prompt_tokens'] - res['video_tokens']:,} text), {rows}, "
             f"beta {args.beta:g} ({'no reference model' if args.beta == 0 else 'a reference model'})",
             f"peak memory per GPU by phase, {unit} (tensor bytes, what torch.cuda.max_memory_allocated counts):", "",
             f"{'phase':<18}" + "".join(f"{hd:>12}" for hd in HEADERS) + f"{'total':>8}" +
             "".join(f"  {f'{c:g} GiB card':>13}" for c in cards)]
    verdicts = [verdict(res, c, reserve) for c in cards]
    for p in res["order"]:
        r = res["phases"][p]
        lines.append(f"{p:<18}" + "".join(f"{r[c] / div:>12.2f}" for c in CATEGORIES) + f"{r['total'] / div:>8.2f}" +
                     "".join(f"  {'fits' if r['total'] <= v['usable'] else 'DOES NOT FIT':>13}" for v in verdicts))
    lines.append("")
    for c, v in zip(cards, verdicts):
        spare = (v["usable"] - v["peak"]) / GiB
        head = f"{c:g} GiB card: peak {v['peak'] / div:.2f} {unit} in {v['peak_phase']}, "
        lines.append(head + (f"fits with {spare:.2f} GiB to spare" if v["fits"] else
                             f"does NOT fit, {-spare:.2f} GiB over; overflowing: {', '.join(v['overflowing'])}") +
                     f" ({reserve:g} GiB kept for the CUDA context and NCCL buffers)")
    lines += [host_memory_line(res, args, ranks_per_node), checkpoint_line(res, ranks_per_node, write_gbs)]
    if brief:
        return "\n".join(lines)
    C = args.max_completion_length
    how = ("fake tensors, " + (f"FSDP2 over a fake process group of {res['world']} ranks (rank 0: the largest "
                               f"shards)" if res["world"] > 1 else "one process")) if res["fake"] else \
        f"real tensors, {res['world']} process(es)"
    lines += [f"how: {how}; one steady-state step of train(): the AdamW state is alive from the start, "
              f"gradients from the backward to the end of the optimizer step (train() frees them there); Python's "
              f"garbage collector runs between phases",
              "  real values on fake tensors: token ids, grids, cu_seqlens, window indices, and the M-RoPE "
              "positions (get_rope_index run outside the fake mode): they depend on shapes, not weights",
              f"  decoding: a fixed token that is never EOS after each draw, so every row decodes {C} tokens; " +
              ("every token decoded" if res["full_decode"] else
               f"the KV cache is grown to prompt + {max(0, C - 2)} through its update(), then the last token is "
               f"decoded (the largest step)"),
              "  AdamW: foreach, as torch picks it for CUDA tensors; inputs (pixels, ids) counted as activations; "
              "not counted: CUDA context, NCCL buffers, allocator fragmentation",
              f"planned in {res['seconds']:.0f} s"]
    return "\n".join(lines)


def parse(argv=None) -> tuple[argparse.Namespace, V.Args]:
    """The dry run's own flags; every other flag goes to viss_r1.parse_args (stage presets included)."""
    p = argparse.ArgumentParser(description="Per-GPU memory plan of a ViSS-R1 training run (see the module "
                                "docstring). Every viss_r1.py training flag is accepted: python viss_r1.py --help",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world_size", type=int, default=8, help="ranks to plan for (FSDP2 over a fake process group)")
    p.add_argument("--gpu_memory", default="80", help="GiB per GPU to check the plan against; several: 80,40")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB kept free for the CUDA context and NCCL buffers")
    p.add_argument("--video_size", default=None, help="source clip HxW, resized as the run resizes it (default: "
                   "the largest frame the pixel bounds allow)")
    p.add_argument("--full_decode", action="store_true", help="decode every completion token (slow; the default "
                   "decodes only the last, largest step)")
    p.add_argument("--tensors", choices=("fake", "real"), default="fake", help="real: the same accounting on real "
                   "tensors, small models only; under torchrun with real collectives (checks the simulation)")
    p.add_argument("--ranks_per_node", type=int, default=8, help="GPUs (ranks) per node, for the host memory "
                   "that loading needs on one node")
    p.add_argument("--write_gbs", type=float, default=2.0, help="GB/s one node writes to the checkpoint "
                   "filesystem, for the checkpoint times (an assumption: measure yours)")
    p.add_argument("--brief", action="store_true", help="the table and verdicts only, not how they were measured")
    p.add_argument("--json", default=None, help="also write the plan to this file")
    own, rest = p.parse_known_args(argv)
    # a plan is for GPUs: --bf16 and --gradient_checkpointing default to what a run on CUDA gets (both on)
    own.device_defaults = [k for k in V.DEVICE_DEFAULTS if not {f"--{k}", f"--no-{k}"} & set(rest)]
    return own, V.parse_args(rest, cuda=True)


def main(argv=None) -> dict:
    return V.run_command(plan, argv)  # under torchrun (--tensors real): the group ends as every command ends it


def plan(argv=None) -> dict:
    import json
    import warnings

    from transformers.utils import logging
    own, args = parse(argv)
    logging.set_verbosity_error()  # "use_cache=True is incompatible with gradient checkpointing": as in training
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")  # transformers' rename notice
    res = run_plan(args, own.world_size, own.tensors == "fake", own.video_size, own.full_decode)
    if res["rank"] == 0:
        cards = [float(c) for c in own.gpu_memory.split(",")]
        print(format_plan(res, args, cards, own.reserve, own.brief, own.device_defaults, own.ranks_per_node,
                          own.write_gbs), flush=True)
        if own.json:
            with open(own.json, "w") as f:
                json.dump(dict(res, verdicts={f"{c:g}": verdict(res, c, own.reserve) for c in cards},
                               host_memory=host_memory(res, args, own.ranks_per_node),
                               checkpoint=checkpoint_plan(res, own.ranks_per_node, own.write_gbs)), f, indent=1)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
