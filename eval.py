"""
Evaluate a Qwen2-VL-family checkpoint on the ViSS-R1 paper's video benchmarks (SPEC §8), in one file.

ViSS-R1 (Fang et al., arXiv 2511.13054) reports VSI-Bench, VideoMMMU, MMVU (multiple choice), MVBench, TempCompass
and VideoMME (no subtitles) on Video-R1's evaluation files (`eval_*.json`: Video-R1 rows + `original_question_type`).
This script answers them with a checkpoint written by viss_r1.py (or any Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder or
hub name) and prints a table next to the published numbers.

    python eval.py --ckpt out/                                      # every eval_*.json in ./eval
    python eval.py --ckpt out/ --bench eval/eval_mvbench.json --media_root /data/Evaluation --batch_size 8
    torchrun --nproc_per_node 8 eval.py --ckpt out/ --bench eval/ --media_root /data/Evaluation
    python eval.py --ckpt out/ --probe blind --probe shuffled --probe transform   # does the model look?
    python eval.py --ckpt out/ --limit 20 --nframes 4 --max_new_tokens 64         # a CPU smoke test

Writes to --out (default <ckpt>/eval): predictions_<bench>.jsonl (one line per item and probe: full output, parsed
answer, score, or why the item failed), results.json and results.txt (the printed table). Started again with the
same flags, a killed run resumes from the predictions files and never redoes a finished item.

Probes, each reported next to the normal score (always computed):
  blind      every frame replaced by constant grey of the same shape: what remains is answering without looking
  shuffled   the frames randomly permuted (seeded per item): what remains needs no temporal order
  reversed   the frames in reverse order, nothing else changed (prompt, answer, timestamps): a question about the
             direction of motion or the order of events flips its answer; one that needs no order does not
  transform  the clip transformed by a random pretext task of --probe_tasks (seeded per item): with the r1 prompt
             only the pretext question is asked (pretext prompt), with --prompt viss both questions are and the
             <transform> letter is scored: pretext accuracy per task, the skill ViSS-R1 trains

A checkpoint folder may carry its own evaluation settings, eval_settings.json (this script's flag names, paths
relative to the folder), used as defaults: the CPU demo leaves one, so `python eval.py --ckpt out/` evaluates it.

Scoring is the release's evaluation's, because the paper's figures come from it: the answer is the first
<answer>'s content, or the whole output when that is empty (no tag, or an empty tag); multiple choice by exact
match, numerical by the training rule, regression by MRA in float32 (an error of exactly 1 - θ falls outside bin
θ); any other problem type scores 0 (none occurs in the six benchmarks). 32 frames, video frames 128·28·28 to
256·28·28 px, the r1 prompt, 1,024 new tokens, as the release evaluates.

Deliberate departures from the authors' evaluation:
  1. Greedy decoding: the release samples at temperature 0.1 with top_p 0.001, which keeps only the most likely
     token, i.e. greedy up to ties. Every sampling parameter is passed explicitly, so a checkpoint's
     generation_config.json cannot add its own (the Qwen-VL Instruct releases ship repetition_penalty 1.05).
  2. An item whose video is missing or undecodable is counted as failed, named in the predictions file and left
     out of the scores, never scored as wrong; the authors' MVBench correction for missing videos
     (accuracy × 4000/3800) appears only as the labelled paper-style figure.
  3. `--prompt viss` shows the untransformed clip with the viss prompt and the question of the first of
     --probe_tasks whose option A means "untouched" (rotate, arrow or flip; else rotate): only the prompt changes,
     never the video the user question is about.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
from dataclasses import replace
from types import SimpleNamespace

import torch

import viss_r1 as V

# ---------------------------------------------------------------------------------------------------------
# Config and benchmarks
# ---------------------------------------------------------------------------------------------------------

PROBES = ("none", "blind", "transform", "shuffled", "reversed")
# key -> (name, Qwen2.5-VL-7B CoT, Video-R1-7B): the published figures at 32 frames (SPEC §8)
PUBLISHED = {"vsibench": ("VSI-Bench", 30.1, 35.8), "videommmu": ("VideoMMMU", 48.1, 52.3),
             "mmvu": ("MMVU", 60.0, 63.8), "mvbench": ("MVBench", 59.0, 63.9),
             "tempcompass": ("TempCompass", 72.6, 73.2), "videomme": ("VideoMME", 56.6, 59.3)}
CATEGORY_FIELDS = ("original_question_type", "question_type", "task_type", "category")  # first one present


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where the help text says what an unset flag means."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on Video-R1-eval files (see the docstring)",
                                formatter_class=DefaultsHelp)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (viss_r1.py --out, or a resume "
                   "checkpoint out/step-N) or hub name")
    p.add_argument("--bench", nargs="+", default=["eval"], help="benchmark files, or folders of eval_*.json")
    p.add_argument("--media_root", default=".", help="rows' relative `path`s resolve under this folder")
    p.add_argument("--out", default=None, help="predictions and results (default: <ckpt>/eval)")
    p.add_argument("--prompt", choices=("r1", "viss"), default="r1", help="r1 is the paper's evaluation prompt")
    p.add_argument("--nframes", type=int, default=32, help="frames sampled per clip (the paper: 32)")
    p.add_argument("--video_min_pixels", type=int, default=128 * 28 * 28, help="per video frame (the release's eval)")
    p.add_argument("--video_max_pixels", type=int, default=256 * 28 * 28, help="per video frame (the release's eval)")
    p.add_argument("--image_min_pixels", type=int, default=4 * 28 * 28, help="per image")
    p.add_argument("--image_max_pixels", type=int, default=256 * 28 * 28, help="per image")
    p.add_argument("--prompts", default="", help="JSON file of prompt templates (the same format as training's)")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="generated tokens per item at most")
    p.add_argument("--batch_size", type=int, default=4, help="items per generate call on each process")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows of each benchmark (0: all)")
    p.add_argument("--probe", action="append", choices=PROBES, default=[], help="repeatable; see the docstring")
    p.add_argument("--probe_tasks", default="rotate,arrow,shuffle,flip,puzzle",
                   help="pretext tasks the transform probe draws from (e.g. the ones the checkpoint was trained on)")
    p.add_argument("--seed", type=int, default=0, help="seeds the per-item probe transforms")
    ckpt = p.parse_known_args(argv)[0].ckpt  # the checkpoint's own settings, then the command line over them
    p.set_defaults(**checkpoint_settings(ckpt, {a.dest for a in p._actions}))
    args = p.parse_args(argv)
    if args.nframes < 2 or args.batch_size < 1:
        p.error("--nframes must be at least 2 and --batch_size at least 1")
    if unknown := set(args.probe_tasks.split(",")) - set(V.NUM_OPTIONS):
        p.error(f"unknown --probe_tasks {sorted(unknown)}; choose from {', '.join(V.NUM_OPTIONS)}")
    if why := V.bad_pixel_bounds(args):
        p.error(why)
    args.probes = ["none"] + [q for q in dict.fromkeys(args.probe) if q != "none"]  # the normal score always
    if args.out is None:  # a hub name gets a local folder, not one inside the hub id; a resume checkpoint (which
        step = os.path.normpath(args.ckpt)  # --save_total_limit deletes) one beside it: out/eval-step-000300
        args.out = (os.path.join(os.path.dirname(step), "eval-" + os.path.basename(step))
                    if V.is_resume_checkpoint(step) else os.path.join(args.ckpt, "eval") if os.path.isdir(args.ckpt)
                    else os.path.join("eval_results", args.ckpt.replace("/", "--")))
    return args


def checkpoint_settings(ckpt: str | None, known: set) -> dict:
    """Defaults a checkpoint carries for its own evaluation: <ckpt>/eval_settings.json, a JSON object of this
    script's flag names (e.g. {"bench": ["data/eval.json"], "media_root": "data", "nframes": 4}); paths in it are
    relative to the checkpoint folder. Flags given on the command line win."""
    if ckpt and V.is_resume_checkpoint(ckpt):  # out/step-N: the run folder's settings
        ckpt = os.path.dirname(os.path.normpath(ckpt))
    path = os.path.join(ckpt, "eval_settings.json") if ckpt and os.path.isdir(ckpt) else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        settings = json.load(f)
    if not isinstance(settings, dict) or (bad := set(settings) - known):
        raise SystemExit(f"error: {path}: unknown setting(s) {sorted(bad) if isinstance(settings, dict) else settings}")
    here = lambda v: v if os.path.isabs(v) else os.path.join(ckpt, v)  # noqa: E731
    for k in ("bench", "media_root", "prompts", "out"):
        if k in settings and settings[k]:
            settings[k] = [here(v) for v in settings[k]] if isinstance(settings[k], list) else here(settings[k])
    return settings


def find_benchmarks(specs: list[str], ckpt: str = "") -> dict[str, str]:
    """--bench values -> {name: file}; a folder gives its eval_*.json(l); eval_mvbench.json is named "mvbench"."""
    files = []
    for s in specs:
        if not os.path.exists(s):
            raise SystemExit(f"error: no benchmark at --bench {s} (looked for {os.path.abspath(s)}): pass --bench with "
                             f"Video-R1-eval files or a folder of eval_*.json, and --media_root for their videos, or "
                             f"save both in {os.path.join(ckpt or '<ckpt>', 'eval_settings.json')}")
        files += sorted(glob.glob(os.path.join(s, "eval_*.json*"))) if os.path.isdir(s) else [s]
    names = [re.sub(r"^eval_", "", os.path.splitext(os.path.basename(f))[0]) for f in files]
    if not files or len(set(names)) < len(names):
        raise SystemExit(f"error: --bench {' '.join(specs)} gives no eval_*.json, or two files of one name: {files}")
    return dict(zip(names, files))


def reference(name: str) -> str | None:
    """The PUBLISHED key a benchmark name refers to ("eval_mmvu_mc" -> "mmvu"), if any."""
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    return next((k for k in PUBLISHED if k in flat), None)


def item_ids(rows: list[dict]) -> list[str]:
    """problem_id when every row has a distinct one (stable if the file is re-sorted), else the row index."""
    ids = [str(r.get("problem_id")) for r in rows]
    unique = all("problem_id" in r for r in rows) and len(set(ids)) == len(ids)
    return ids if unique else [str(i) for i in range(len(rows))]


def prompt_kind(probe: str, prompt: str) -> str:
    return "pretext" if probe == "transform" and prompt != "viss" else prompt

# ---------------------------------------------------------------------------------------------------------
# Scoring (SPEC §8): pure functions
# ---------------------------------------------------------------------------------------------------------

def parse_answer(output: str) -> str:
    """The first <answer>'s content, or the whole output (stripped) when that is empty: no tag, or an empty one."""
    return V.extract_tag(output) or output.strip()


def score_item(output: str, solution: str, problem_type: str) -> tuple[str, float]:
    """(parsed answer, score in [0, 1]) as the release's evaluation scores it (SPEC §8): multiple choice exact,
    numerical by the training rule, regression by MRA; any other type scores 0 there (none occurs in the six
    benchmarks), and so it does here."""
    answer, gt = parse_answer(output), V.extract_tag(solution)
    if problem_type == "regression":
        return answer, V.mean_relative_accuracy(answer, gt)
    if problem_type in ("multiple choice", "numerical"):
        return answer, V.accuracy_reward(f"<answer>{answer}</answer>", solution, problem_type)
    return answer, 0.0


def paper_style(name: str, acc: float | None, mra: float | None) -> tuple[float | None, str]:
    """The figure the authors report, and its rule: VSI-Bench (acc + MRA)/2, MVBench acc × 4000/3800."""
    ref = reference(name)
    if ref == "vsibench" and acc is not None and mra is not None:
        return (acc + mra) / 2, "(acc + MRA) / 2"
    if ref == "mvbench" and acc is not None:
        return acc * 4000 / 3800, "acc x 4000/3800"
    return (acc, "acc") if acc is not None else (mra, "MRA")


def summarize(records: list[dict], name: str, probe: str) -> dict:
    """One pass over one benchmark -> counts and scores in percent (None where no item of that kind)."""
    ok = [r for r in records if r["failed"] is None]
    mean = lambda xs: 100 * sum(xs) / len(xs) if xs else None  # noqa: E731
    r2 = lambda x: None if x is None else round(x, 2)  # noqa: E731
    acc = mean([r["score"] for r in ok if r["problem_type"] != "regression"])
    mra = mean([r["score"] for r in ok if r["problem_type"] == "regression"])
    paper, rule = paper_style(name, acc, mra)
    by = "task" if probe == "transform" else "category"  # pretext accuracy per task, or score per question type
    groups = {}
    for r in ok:
        if r[by] is not None:
            groups.setdefault(r[by], []).append(r["score"])
    return {"items": len(records), "scored": len(ok), "failed": len(records) - len(ok), "accuracy": r2(acc),
            "mra": r2(mra), "paper_style": r2(paper), "paper_style_rule": rule,
            f"per_{by}": {k: {"n": len(v), "score": r2(mean(v))} for k, v in sorted(groups.items())}}

# ---------------------------------------------------------------------------------------------------------
# Items: row -> media -> probe -> prompt ids and vision tensors -> batched greedy generate -> record
# ---------------------------------------------------------------------------------------------------------

def prepare(row: dict, media: V.Media, probe: str, prompt: str, args, spec, tokenizer,
            rng: random.Random) -> V.Sample:
    """A row and its loaded clip -> a Sample for generate; the probe acts before resizing, as in training."""
    kind, T = media.kind, media.frames.shape[0]
    mode, solution, ptype = prompt, row["solution"], row["problem_type"]
    tasks = [t for t in V.PRETEXT_TASKS[kind] if t != "shuffle" or T >= 4]  # shuffle needs 4 groups of frames
    tasks = [t for t in tasks if t in args.probe_tasks.split(",")] or tasks
    # departure 3: the viss prompt on the untouched clip asks a transform question whose answer A is "untouched"
    task, option = (next((t for t in tasks if t in ("rotate", "arrow", "flip")), "rotate"), 0) \
        if prompt == "viss" else (None, None)
    if probe == "blind":  # same shape, so the same grid and number of vision tokens: only the pixels go
        media = replace(media, frames=torch.full_like(media.frames, 128))
    elif probe == "shuffled":
        media = replace(media, frames=media.frames[torch.tensor(rng.sample(range(T), T))])
    elif probe == "reversed":
        media = replace(media, frames=media.frames.flip(0))
    elif probe == "transform":  # the pretext question alone (r1), or both questions with the viss prompt
        task, option = V.sample_pretext(kind, tuple(tasks), rng)
        media = V.frames_for_task(media, task)
        media = replace(media, frames=V.apply_pretext(media.frames, task, option))
        mode = "viss" if prompt == "viss" else "pretext"
        solution, ptype = f"<answer>{V.LETTERS[option]}</answer>", "multiple choice"
    media = V.fit_media(media, spec, *V.pixel_bounds(args, kind))
    vis = V.vision_inputs(media, spec)
    grid = vis["video_grid_thw" if kind == "video" else "image_grid_thw"][0].tolist()
    system, text = V.render_prompt(mode, row, task, len(media.frames), V.load_prompts(args.prompts))
    ids, types = V.prompt_ids(tokenizer, text, media, spec, grid, system)
    return V.Sample(row, mode, ids, types, vis, solution, ptype, task=task, option=option)


def load_checkpoint(path: str, device) -> SimpleNamespace:
    """Model (bf16 on GPU, float32 on CPU), tokenizer, vision spec and the token ids generate needs."""
    from transformers import AutoTokenizer
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if V.is_resume_checkpoint(path):  # out/step-N: its shards read directly (viss_r1.py --export writes the HF folder)
        model = V.load_sharded(path, dtype, lambda m: m, torch.device(device)).eval()
    else:  # a Hugging Face folder or hub name; in bf16 on a GPU: no float32 copy on the way
        model = V.load_whole(path, dtype, torch.device(device)).eval()
    V.use_pretrained_positions(model)  # generate's positions as training's: the pretrained M-RoPE rule
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = V.vision_spec(model.config, path if os.path.isdir(path) else None)
    eos_ids, pad_id = V.decoding_ids(model, tokenizer)
    bias = V.vocab_mask(model, spec, "cpu")  # -inf on the vision placeholders: never generated
    return SimpleNamespace(model=model, tokenizer=tokenizer, spec=spec, eos_ids=eos_ids, pad_id=pad_id,
                           suppress=torch.isinf(bias).nonzero().flatten().tolist())


@torch.no_grad()
def generate_batch(model, samples: list[V.Sample], eos_ids: list[int], pad_id: int, suppress: list[int],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   synced_gpus: bool = False) -> torch.Tensor:
    """Completions of B prompts in one `generate` call -> new tokens [B, <= max_new_tokens]: greedy at temperature 0
    (evaluation), else sampled at exactly `temperature` and `top_p` (every parameter is passed, so a checkpoint's
    generation_config.json cannot add its own). `synced_gpus`: a teacher sharded with FSDP2 steps all ranks alike.

    input_ids, mm_token_type_ids, attention_mask [B, L] are padded on the left, so every prompt ends where decoding
    starts (get_rope_index skips the masked pads); the clips' pixel rows, grids and second_per_grid_ts are
    concatenated in batch order, the order in which the model hands them to the placeholder runs.
    """
    L, dev = max(len(s.ids) for s in samples), model.device
    left = lambda fill, seq: [fill] * (L - len(seq)) + seq  # noqa: E731
    ids = torch.tensor([left(pad_id, s.ids) for s in samples], device=dev)
    types = torch.tensor([left(0, s.types) for s in samples], device=dev)
    mask = torch.tensor([left(0, [1] * len(s.ids)) for s in samples], device=dev)
    vis = {k: torch.cat([s.vis[k] for s in samples if k in s.vis]).to(dev) for k in
           ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
           if any(k in s.vis for s in samples)}
    how = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None)
    out = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **vis, **how, top_k=None,
                         repetition_penalty=None, suppress_tokens=suppress, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_ids, pad_token_id=pad_id, synced_gpus=synced_gpus)
    return out[:, L:]


def predict(name: str, rows: list[dict], ids: list[str], idx: list[int], probe: str, args, ctx) -> list[dict]:
    """Records of items `idx` of one benchmark: load, probe, generate as one batch, parse, score."""
    records, ready = [], []
    for i in idx:
        row = rows[i]
        rec = {"id": ids[i], "index": i, "prompt": prompt_kind(probe, args.prompt), "probe": probe,
               "problem_type": row["problem_type"], "path": row["path"], "task": None,
               "category": next((str(row[k]) for k in CATEGORY_FIELDS if k in row), None),
               "gt": V.extract_tag(row["solution"]), "output": None, "answer": None, "score": None, "failed": None}
        records.append(rec)
        rng = random.Random(f"{args.seed}/{name}/{ids[i]}/{probe}")  # a str seed hashes the same in every process
        try:  # a missing or undecodable file (or a frame no grid fits) fails this item only; the message names it
            media = V.load_media(V.resolve_path(row["path"], args.media_root), row["data_type"], nframes=args.nframes)
            ready.append((rec, prepare(row, media, probe, args.prompt, args, ctx.spec, ctx.tokenizer, rng)))
        except V.MediaError as e:
            rec["failed"] = str(e)
    if ready:
        new = generate_batch(ctx.model, [s for _, s in ready], ctx.eos_ids, ctx.pad_id, ctx.suppress,
                             args.max_new_tokens)
        for (rec, s), text in zip(ready, ctx.tokenizer.batch_decode(new, skip_special_tokens=True)):
            # the transform probe under the viss prompt scores the <transform> letter
            scored = f"<answer>{V.extract_tag(text, 'transform')}</answer>" if probe == "transform" and \
                s.mode == "viss" else text
            answer, score = score_item(scored, s.solution, s.problem_type)
            rec.update(problem_type=s.problem_type, task=s.task, gt=V.extract_tag(s.solution), output=text,
                       answer=answer, score=score)  # type and gt change under the transform probe
    return records

# ---------------------------------------------------------------------------------------------------------
# Distributed and resume: item i on rank i % world; rank 0 gathers every batch and appends it
# ---------------------------------------------------------------------------------------------------------

def check_settings(args) -> str | None:
    """Predictions in --out must come from the same checkpoint and settings (prompt and probe are in each line)."""
    now = {"ckpt": os.path.abspath(args.ckpt) if os.path.isdir(args.ckpt) else args.ckpt,
           **{k: getattr(args, k) for k in ("nframes", "video_min_pixels", "video_max_pixels", "image_min_pixels",
                                            "image_max_pixels", "prompts", "max_new_tokens", "seed")}}
    path = os.path.join(args.out, "settings.json")
    if not os.path.exists(path):  # a fresh --out: these settings are now its settings
        with open(path, "w") as f:
            json.dump(now, f, indent=2)
    with open(path) as f:
        old = json.load(f)
    return None if old == now else f"{args.out} holds predictions made with {old}, not {now}; use another --out"


def load_predictions(path: str) -> dict[tuple, dict]:
    """Finished records of an earlier run by (probe, prompt, id), the file rewritten without a killed run's debris:
    a truncated last line is dropped, and so are failed items, which are tried again (the media may be back)."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # the line a killed run was writing
                    continue
                if isinstance(r, dict) and r.get("failed") is None and "score" in r:
                    done[r["probe"], r["prompt"], str(r["id"])] = r
    with open(path + ".tmp", "w") as f:  # rewritten, so the next append starts on a fresh line
        f.writelines(json.dumps(r) + "\n" for r in done.values())
    os.replace(path + ".tmp", path)
    return done


def run_pass(name: str, rows: list[dict], ids: list[str], probe: str, args, ctx, done: dict, path: str) -> None:
    """Every unfinished item of one benchmark under one probe; rank 0 appends each batch and updates `done`."""
    from tqdm import tqdm
    kind = prompt_kind(probe, args.prompt)
    todo = [i for i in range(len(rows)) if (probe, kind, ids[i]) in ctx.todo]
    rounds = math.ceil(math.ceil(len(todo) / ctx.world) / args.batch_size)  # the same on every rank
    scores, failed = [done[k]["score"] for k in ((probe, kind, i) for i in ids) if k in done], 0
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=name + ("" if probe == "none" else f"/{probe}"),
               dynamic_ncols=True, disable=ctx.rank != 0)
    for b in range(rounds):
        batch = todo[ctx.rank::ctx.world][b * args.batch_size:(b + 1) * args.batch_size]
        # any other failure on one rank stops every rank at this gather (the others would wait in the next one)
        everyone = V.all_gather(V.attempt(predict, name, rows, ids, batch, probe, args, ctx), ctx.world)
        V.stop_if_any([why for _, why in everyone])
        records = sorted(sum((recs for recs, _ in everyone), []), key=lambda r: r["index"])
        if ctx.rank == 0:
            with open(path, "a") as f:  # one append per batch, flushed on close: a kill loses this batch at most
                f.writelines(json.dumps(r) + "\n" for r in records)
            for r in records:
                done[r["probe"], r["prompt"], r["id"]] = r
                scores += [r["score"]] if r["failed"] is None else []
                failed += r["failed"] is not None
            bar.update(len(records))
            bar.set_postfix(score=f"{100 * sum(scores) / max(1, len(scores)):.1f}", failed=failed)
    bar.close()

# ---------------------------------------------------------------------------------------------------------
# Report and main
# ---------------------------------------------------------------------------------------------------------

def format_table(results: dict, probes: list[str]) -> str:
    """A line per benchmark: counts, raw scores, the paper-style figure, each probe, the published numbers."""
    f = lambda x: "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    rows = [["benchmark", "items", "scored", "failed", "acc", "MRA", "paper-style", *probes[1:], "Qwen2.5-VL-7B",
             "Video-R1-7B"]]
    for name, res in results.items():
        s, ref = res["none"], PUBLISHED.get(reference(name), (name, None, None))
        rows.append([f(x) for x in [ref[0], s["items"], s["scored"], s["failed"], s["accuracy"], s["mra"],
                                    s["paper_style"], *(res[p]["paper_style"] for p in probes[1:]), ref[1], ref[2]]])
    w = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w[j]) if j else c.ljust(w[j]) for j, c in enumerate(r)) for r in rows]
    lines[1:1] = ["-" * len(lines[0])]
    lines += ["acc: mean score of the scored non-regression items; MRA: of the regression items; failed items "
              "(missing or unreadable media) are not scored.",
              "paper-style: VSI-Bench (acc + MRA)/2, MVBench acc x 4000/3800 (the authors' missing-video correction), "
              "others acc; published: the paper's figures at 32 frames."]
    if len(probes) > 1:
        lines.append("probes: blind = paper-style score on grey frames, shuffled = on permuted frames, transform = "
                     "pretext accuracy on transformed clips.")
    for name, res in results.items():
        for p, s in res.items():
            if per := s.get("per_task") or s.get("per_category"):
                lines.append(f"{name}{'' if p == 'none' else '/' + p} "
                             f"{'pretext accuracy per task' if p == 'transform' else 'score per category'}: "
                             + ", ".join(f"{k} {f(v['score'])} (n={v['n']})" for k, v in per.items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    return V.run_command(evaluate, parse_args(argv))  # a stop agreed by every rank: its reason printed once


def evaluate(args) -> dict:
    try:  # every row of every file validated before the model loads: a bad row stops the run with its index
        benches = {name: V.load_rows(path) for name, path in find_benchmarks(args.bench, args.ckpt).items()}
        V.load_prompts(args.prompts)
    except V.DataError as e:
        raise SystemExit(f"error: {e}") from None
    rank, world, device = V.setup_distributed()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    V.stop_if_any(V.all_gather(check_settings(args) if rank == 0 else None, world))  # every rank stops together
    ctx = load_checkpoint(args.ckpt, device)
    ctx.rank, ctx.world, results = rank, world, {}
    for name, rows in benches.items():
        ids, rows = item_ids(rows)[:args.limit or None], rows[:args.limit or None]
        path = os.path.join(args.out, f"predictions_{name}.jsonl")
        done = load_predictions(path) if rank == 0 else {}
        wanted = {(p, prompt_kind(p, args.prompt), i) for p in args.probes for i in ids}
        ctx.todo = V.all_gather(wanted - set(done), world)[0]  # what rank 0 found left to do, on every rank
        for probe in args.probes:
            run_pass(name, rows, ids, probe, args, ctx, done, path)
        if rank == 0:
            records = {p: [done[p, prompt_kind(p, args.prompt), i] for i in ids] for p in args.probes}
            results[name] = {p: summarize(records[p], name, p) for p in args.probes}
            if failed := [r for r in records["none"] if r["failed"] is not None]:  # the same files fail in every probe
                print(f"{name}: {len(failed)} item(s) failed, e.g. {failed[0]['failed']} (all named in {path})",
                      flush=True)
    if rank == 0:
        table = format_table(results, args.probes)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "published": PUBLISHED, "benchmarks": results}, f, indent=2)
        with open(os.path.join(args.out, "results.txt"), "w") as f:
            f.write(table + "\n")
        print(table, flush=True)
    return results  # (V.run_command waits for every rank before the group goes down)


if __name__ == "__main__":
    main()
