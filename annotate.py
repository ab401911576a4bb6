"""
SSL-CoT annotation, the first stage of ViSS-R1: distil the cold-start SFT data from public Video-R1 rows with a
teacher VLM, so that the recipe runs from the public data (the authors released this script, not its output).

    python annotate.py --model Qwen/Qwen2.5-VL-72B-Instruct --data Video-R1-COT-165k.json --media_root data/ \
        --out ssl_cot/                                                        # one process
    torchrun --nproc_per_node 8 annotate.py --model Qwen/Qwen2.5-VL-7B-Instruct ...    # a teacher on every GPU
    torchrun --nproc_per_node 8 annotate.py --model Qwen/Qwen2.5-VL-72B-Instruct --shard_teacher ...  # 72B: FSDP2
    python annotate.py ... --num_shards 4 --shard_index 0      # one of 4 independent jobs (nodes); then:
    python annotate.py --merge ssl_cot/                         # -> ssl_cot/ssl_cot.jsonl, ready for --stage sft
    torchrun --nproc_per_node 8 viss_r1.py --stage sft --data ssl_cot/ssl_cot.jsonl ...

Per row (SPEC §7): a pretext task uniform over the modality's three (those enabled by --pretext_tasks) and its
option as in SPEC §2, drawn from a generator seeded by --seed and the row's index, so a rerun draws the same; the
frames are sampled, transformed and resized exactly as training would; the teacher sees the transformed media,
the ViSS question (transform question + user question), the true letter and the true answer (the `annotate`
prompt, replaceable with --prompts), and writes `<think>..</think><transform>X</transform><answer>..</answer>`.
A completion is kept only if annotation_verdict finds nothing wrong: the 3-tag format, the applied letter
(the release keeps the teacher's own letter even when it is wrong), a right answer, no mention of having been
given the answers.

Files in --out (with --num_shards N the names carry `.shard-I-of-N`):
  ssl_cot.jsonl   kept rows: the input row + process (the <think> block), trans_opt, trans_ans, and the frame count
                  and pixel bounds the teacher saw (nframes, <kind>_min/max_pixels), which --stage sft replays
  rejects.jsonl   the row's index, task, letter, the reason and the teacher's completion
  failed.jsonl    rows whose media is missing or unreadable (retried by the next run), the file named
  summary.json    kept / rejected by reason / failed, by task and by problem type (also printed)
A run killed at any point continues from these files when started again with the same flags: every input row
ends in exactly one of them.

Teachers larger than one GPU (72B in bf16 is about 145 GB) are sharded with the project's own FSDP2 path
(--shard_teacher): every decoder layer and vision block is a unit, each rank annotates its own rows, and
`generate(synced_gpus=True)` keeps the ranks stepping together, because each decode step all-gathers the units.
Chosen over placing layers on GPUs by hand because it needs no other dependency (transformers' device_map needs
accelerate), runs the same code on one node or several, and is tested here on CPU (2 processes, gloo). Its cost:
one all-gather of the weights per decoded token, paid once per batch, so use large --batch_size values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
from dataclasses import replace

import torch

import eval as E  # generate_batch: the evaluation's batched generate
import viss_r1 as V


LEAK = re.compile(r"ground[\s-]*truth|reference (?:answer|letter)|(?:given|provided|supplied) (?:answer|letter|label|"
                  r"transformation)|answer key|(?:was|were|been|is|are) (?:given|provided|told|supplied) (?:to me|the)",
                  re.IGNORECASE)


def annotation_verdict(completion: str, letter: str, solution: str, problem_type: str,
                       min_accuracy: float = 0.6) -> str | None:
    """Why a teacher's SSL-CoT chain is dropped, or None to keep it: the 3-tag format, the applied transform
    letter, a right answer (multiple choice and numerical exactly; OCR, free-form and regression at least
    `min_accuracy`), and no mention of having been given the answers. Stricter than the release, which keeps
    the teacher's own letter even when it is wrong: such a row would teach the student a wrong label."""
    if not V.format_reward(completion, with_transform=True):
        return "format"
    if V.extract_tag(completion, "transform") != letter:
        return "transform"
    need = 1.0 if problem_type in ("multiple choice", "numerical") else min_accuracy
    if V.accuracy_reward(completion, solution, problem_type) < need:
        return "answer"
    if LEAK.search(V.extract_tag(completion, "think")):
        return "leak"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SSL-CoT annotation with a teacher VLM (see the module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-72B-Instruct", help="the teacher (folder or hub name)")
    p.add_argument("--data", default="", help="Video-R1 COT rows to annotate (JSON or JSONL)")
    p.add_argument("--media_root", default=".", help="rows' relative `path`s resolve under this folder")
    p.add_argument("--out", default="ssl_cot", help="output folder (see the module docstring)")
    p.add_argument("--prompts", default="", help="JSON prompt templates; its `annotate` key replaces the teacher's")
    p.add_argument("--pretext_tasks", default="rotate,arrow,shuffle,flip,puzzle", help="tasks to draw from")
    p.add_argument("--nframes", type=int, default=32, help="frames per clip (ViSS-R1 trains on 32)")
    p.add_argument("--max_frames", type=int, default=32, help="frame cap when --nframes is 0 (2 fps)")
    p.add_argument("--video_min_pixels", type=int, default=128 * 28 * 28, help="per frame (training's bounds)")
    p.add_argument("--video_max_pixels", type=int, default=128 * 28 * 28, help="per frame (training's bounds)")
    p.add_argument("--image_min_pixels", type=int, default=4 * 28 * 28, help="per image")
    p.add_argument("--image_max_pixels", type=int, default=256 * 28 * 28, help="per image")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the Qwen-VL Instruct checkpoints' "
                   "own near-greedy configuration, which the release's annotation used); > 0: sampled")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="tokens per teacher completion at most")
    p.add_argument("--batch_size", type=int, default=8, help="rows per generate call on each process")
    p.add_argument("--min_accuracy", type=float, default=0.6, help="accuracy needed for OCR, free-form and "
                   "regression answers (multiple choice and numerical must be exact)")
    p.add_argument("--seed", type=int, default=0, help="with the row's index, seeds the row's transform")
    p.add_argument("--num_shards", type=int, default=1, help="split the rows over this many independent jobs")
    p.add_argument("--shard_index", type=int, default=0, help="this job's rows: index %% num_shards == shard_index")
    p.add_argument("--shard_teacher", action=argparse.BooleanOptionalAction, default=False,
                   help="under torchrun, shard one teacher over the ranks with FSDP2 (teachers larger than a GPU)")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    p.add_argument("--merge", default="", help="merge the shards' files in this folder into one, then exit")
    args = p.parse_args(argv)
    if not args.merge and not args.data:
        p.error("--data is required")
    if not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard_index {args.shard_index} is not in 0..{args.num_shards - 1}")
    if why := V.bad_pixel_bounds(args):
        p.error(why)
    if args.nframes and args.nframes < 2:
        p.error("--nframes must be 0 (2 fps) or at least 2")
    return args


def paths(out: str, num_shards: int = 1, shard_index: int = 0) -> dict[str, str]:
    tag = f".shard-{shard_index}-of-{num_shards}" if num_shards > 1 else ""
    return {k: os.path.join(out, f"{k}{tag}.{ext}") for k, ext in
            (("ssl_cot", "jsonl"), ("rejects", "jsonl"), ("failed", "jsonl"), ("summary", "json"))}


def read_jsonl(path: str) -> list[dict]:
    """Complete lines of a JSONL file; the line a killed run was writing is dropped, and the file rewritten
    without it, so the next append starts on a fresh line."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    os.replace(path + ".tmp", path)
    return out


# ---------------------------------------------------------------------------------------------------------
# One row: media -> drawn transform -> the teacher's prompt; one batch: generate -> verdicts -> records
# ---------------------------------------------------------------------------------------------------------

def draw(row: dict, index: int, frames: int, args) -> tuple[str, int]:
    """The row's (task, option): its own generator, so a rerun or another sharding draws the same."""
    tasks = tuple(t for t in args.pretext_tasks.split(",") if t != "shuffle" or frames >= 4)
    return V.sample_pretext(row["data_type"], tasks, random.Random(f"{args.seed}/{index}"))


def prepare(row: dict, index: int, args, spec, tokenizer, media: V.Media | None = None) -> tuple[V.Sample, dict]:
    """The teacher's Sample for one row (its media read from the file unless given), and the fields its kept row
    stores so that --stage sft replays it exactly: the frame count sampled (nframes) and the pixel bounds.
    Raises MediaError."""
    kind = row["data_type"]
    if media is None:
        media = V.load_media(V.resolve_path(row["path"], args.media_root), kind, args.nframes or None, args.max_frames)
    task, option = draw(row, index, len(media.frames), args)
    replay = {"nframes": len(media.frames)} if kind == "video" else {}
    lo, hi = V.pixel_bounds(args, kind)
    replay.update({f"{kind}_min_pixels": lo, f"{kind}_max_pixels": hi})
    media = V.frames_for_task(media, task)
    media = V.fit_media(replace(media, frames=V.apply_pretext(media.frames, task, option)), spec, lo, hi)
    vis = V.vision_inputs(media, spec)
    grid = vis["video_grid_thw" if kind == "video" else "image_grid_thw"][0].tolist()
    system, text = V.render_prompt("annotate", row, task, len(media.frames), V.load_prompts(args.prompts),
                                   transform=V.LETTERS[option], answer=V.extract_tag(row["solution"]))
    ids, types = V.prompt_ids(tokenizer, text, media, spec, grid, system)
    return V.Sample(row, "annotate", ids, types, vis, row["solution"], row["problem_type"], task, option), replay


def stand_in(kind: str, args, ctx) -> tuple[None, V.Sample, dict]:
    """A grey clip (or image) with an empty question: what a rank with nothing to annotate generates for, so that
    a sharded teacher's collectives run on every rank. Made, never read: no file can fail it."""
    row = {"problem": "", "options": [], "problem_type": "multiple choice", "solution": "<answer>A</answer>",
           "data_type": kind}
    grey = torch.full((max(2, args.nframes) if kind == "video" else 1, 3, ctx.spec.factor, ctx.spec.factor), 128,
                      dtype=torch.uint8)
    return (None, *prepare(row, -1, args, ctx.spec, ctx.tokenizer, V.Media(grey, kind, path="(stand-in)")))


def annotate_batch(rows: list[dict], batch: list[int], kind: str, args, ctx) -> tuple[list[dict], str | None]:
    """(records (kind "kept" | "rejected" | "failed") for rows `batch`, why this rank must stop or None). A sharded
    teacher needs every rank in every generate call: a rank with nothing it can annotate generates for a stand-in,
    and so does a rank that met an error (reported after the call, in the round's gather)."""
    records, ready, why = [], [], None
    for i in batch:
        try:
            ready.append((i, *prepare(rows[i], i, args, ctx.spec, ctx.tokenizer)))
        except V.MediaError as e:  # named, counted, never written as a row
            records.append({"kind": "failed", "source_index": i, "path": rows[i]["path"], "error": str(e)})
        except Exception as e:  # noqa: BLE001 -- anything else stops every rank, after this round's generate
            why, ready = V.reason(e), []
            break
    todo = ready or ([stand_in(kind, args, ctx)] if args.shard_teacher and ctx.world > 1 else [])
    if not todo:
        return records, why
    if args.temperature > 0:  # sampled: seeded by the batch, so a rerun samples the same
        torch.manual_seed(hash((args.seed, tuple(i for i, _, _ in todo))) % 2 ** 31)
    new = E.generate_batch(ctx.model, [s for _, s, _ in todo], ctx.eos_ids, ctx.pad_id, ctx.suppress,
                           args.max_new_tokens, args.temperature, args.top_p,
                           synced_gpus=args.shard_teacher and ctx.world > 1)
    for (i, s, replay), text in zip(ready, ctx.tokenizer.batch_decode(new, skip_special_tokens=True)):  # not todo
        text, row = text.strip(), rows[i]
        reason = annotation_verdict(text, s.letter, row["solution"], row["problem_type"], args.min_accuracy)
        if reason is None:
            think = re.search(r"<think>.*?</think>", text, re.DOTALL).group(0)
            kept = {**row, "process": think, "trans_opt": s.task, "trans_ans": s.letter, **replay, "source_index": i}
            records.append({"kind": "kept", "row": kept})
        else:
            records.append({"kind": "rejected", "source_index": i, "problem_id": row.get("problem_id"),
                            "problem_type": row["problem_type"], "trans_opt": s.task, "trans_ans": s.letter,
                            "reason": reason, "completion": text})
    return records, why


# ---------------------------------------------------------------------------------------------------------
# The run: resume from the output files, rows by kind in batches, batch k on rank k % world, rank 0 writes
# ---------------------------------------------------------------------------------------------------------

def read_teacher(args, device, world):
    """The teacher's weights in its compute dtype (bf16 on a GPU): sharded with FSDP2 (--shard_teacher under
    torchrun), read once by rank 0 and each rank keeping its shards (72B: 145 GB in bf16), or whole on `device`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shard_teacher and world > 1:
        def frozen_shards(m):  # the model itself is the FSDP2 root: generate calls its forward
            V.shard(m.eval().requires_grad_(False), dtype == torch.bfloat16, device)
            return m
        model = V.load_sharded(args.model, dtype, frozen_shards, device)
    else:
        model = V.load_whole(args.model, dtype, device).eval().requires_grad_(False)
    V.use_pretrained_positions(model)  # generate's positions as training's: the pretrained M-RoPE rule
    return model


def load_teacher(args, device, world):
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    model = read_teacher(args, device, world)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    spec = V.vision_spec(model.config, args.model if os.path.isdir(args.model) else None)
    eos_ids, pad_id = V.decoding_ids(model, tokenizer)
    suppress = torch.isinf(V.vocab_mask(model, spec, "cpu")).nonzero().flatten().tolist()
    if args.shard_teacher and world > 1:  # FSDP2 sets itself up on a first forward through the root, and
        model(input_ids=torch.tensor([[pad_id]], device=device))  # generate() encodes the media before its first
    return SimpleNamespace(model=model, tokenizer=tokenizer, spec=spec, eos_ids=eos_ids, pad_id=pad_id,
                           suppress=suppress, world=world)


def summarize(files: dict) -> dict:
    """Counts over everything in the output files: kept, rejected by reason, failed; by task and problem type."""
    kept, rejected, failed = (read_jsonl(files[k]) for k in ("ssl_cot", "rejects", "failed"))
    s = {"rows": len(kept) + len(rejected) + len(failed), "kept": len(kept), "rejected": len(rejected),
         "failed": len(failed), "rejected_by_reason": {}, "by_task": {}, "by_problem_type": {}}
    for r in rejected:
        s["rejected_by_reason"][r["reason"]] = s["rejected_by_reason"].get(r["reason"], 0) + 1
    for verdict, recs in (("kept", kept), ("rejected", rejected)):
        for r in recs:
            for key, val in (("by_task", r["trans_opt"]), ("by_problem_type", r["problem_type"])):
                counts = s[key].setdefault(val, {"kept": 0, "rejected": 0})
                counts[verdict] += 1
    return s


def merge(folder: str) -> dict:
    """The shards' ssl_cot / rejects / failed files -> one of each (rows ordered by source index) + summary."""
    import glob
    merged = paths(folder)
    for key in ("ssl_cot", "rejects", "failed"):
        parts = sorted(glob.glob(os.path.join(folder, f"{key}.shard-*-of-*.jsonl")))
        recs = sorted((r for p in parts for r in read_jsonl(p)), key=lambda r: r["source_index"])
        if len({r["source_index"] for r in recs}) != len(recs):
            raise SystemExit(f"error: {folder}: a row appears in two shards' {key} files (mixed runs?)")
        with open(merged[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    summary = summarize(merged)
    with open(merged["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge)
    return V.run_command(annotate, args)  # a stop agreed by every rank: its reason printed once


def annotate(args) -> dict:
    from tqdm import tqdm
    try:  # the data and the prompt file are checked before the teacher loads
        rows, _ = V.load_rows(args.data), V.load_prompts(args.prompts)
    except V.DataError as e:
        raise SystemExit(f"error: {e}") from None
    rank, world, device = V.setup_distributed()
    files = paths(args.out, args.num_shards, args.shard_index)
    done = None
    if rank == 0:  # rows already kept or rejected are done; failed ones are tried again (the media may be back)
        os.makedirs(args.out, exist_ok=True)
        done = {r["source_index"] for k in ("ssl_cot", "rejects") for r in read_jsonl(files[k])}
        open(files["failed"], "w").close()
    done = V.all_gather(done, world)[0]
    mine = [i for i in range(len(rows))[:args.limit or None] if i % args.num_shards == args.shard_index]
    ctx = load_teacher(args, device, world)
    bar = tqdm(total=len(mine), initial=len(mine) - len([i for i in mine if i not in done]), desc="annotate",
               dynamic_ncols=True, disable=rank != 0)
    counts = {"kept": 0, "rejected": 0, "failed": 0}
    for kind in ("video", "image"):  # one modality at a time: every rank runs the vision tower alike (FSDP2)
        todo = [i for i in mine if i not in done and rows[i]["data_type"] == kind]
        batches = [todo[b:b + args.batch_size] for b in range(0, len(todo), args.batch_size)]
        for r in range(math.ceil(len(batches) / world)):  # the same number of rounds on every rank
            k = r * world + rank
            records = annotate_batch(rows, batches[k] if k < len(batches) else [], kind, args, ctx)
            everyone = V.all_gather(records, world)
            V.stop_if_any([why for _, why in everyone])  # one rank's error is every rank's stop
            everyone = sorted(sum((recs for recs, _ in everyone), []),
                              key=lambda x: x["row"]["source_index"] if "row" in x else x["source_index"])
            if rank == 0:  # one append per file per round: a kill loses this round at most
                for key, verdict in (("ssl_cot", "kept"), ("rejects", "rejected"), ("failed", "failed")):
                    with open(files[key], "a") as f:
                        f.writelines(json.dumps(x.get("row", {k: v for k, v in x.items() if k != "kind"})) + "\n"
                                     for x in everyone if x["kind"] == verdict)
                for x in everyone:
                    counts[x["kind"]] += 1
                bar.update(len(everyone))
                bar.set_postfix(counts)
    bar.close()
    summary = None
    if rank == 0:
        summary = summarize(files)
        with open(files["summary"], "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary, indent=2), flush=True)
        if failed := read_jsonl(files["failed"]):
            print(f"{len(failed)} row(s) failed on their media, e.g. {failed[0]['error']} (all in {files['failed']})")
    return summary  # (V.run_command waits for every rank before the group goes down)


if __name__ == "__main__":
    main()
