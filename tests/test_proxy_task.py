"""The experimental proxy task (``PMBENCH_PROXY_TASK``, docs/proxy.md): its own data version and manifest,
images unlike the default task's, a clear error for an unknown task, and a header that names it.  The
task is read at import, so each case runs in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, task: str | None, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PMBENCH_PROXY_TASK"}
    env["PMBENCH_CACHE"] = str(tmp_path / "cache")
    if task is not None:
        env["PMBENCH_PROXY_TASK"] = task
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


PROBE = """
import json, numpy as np
from bench.runtime import proxy
out = proxy.generate(proxy.Path({out!r}), train_per_class=1, val_per_class=1, seed=0)
meta = json.loads((out / "proxy.json").read_text())
img = np.asarray(proxy.render(3, np.random.default_rng(np.random.SeedSequence([0, 1, 3, 0]))))
m = proxy.pmbench_proxy_vit()
print(json.dumps({{"task": proxy.TASK, "version": proxy.DATA_VERSION, "meta": [meta["task"], meta["version"]],
                  "data_dir": proxy.data_dir().name, "note": proxy.task_note(), "pixel_sum": int(img.sum()),
                  "width": m.embed_dim, "heads": m.blocks[0].attn.num_heads}}))
"""


def _probe(tasks, tmp_path) -> dict:
    """PROBE's answer in a fresh interpreter for each task (None: the default)."""
    res = {}
    for task in tasks:
        r = _py(PROBE.format(out=str(tmp_path / f"set-{task}")), task, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        res[task] = json.loads(r.stdout.splitlines()[-1])
    return res


def test_small_object_task_is_separate_from_the_default(tmp_path):
    res = _probe((None, "small-object"), tmp_path)
    d, s = res[None], res["small-object"]
    assert d["task"] == "object-hue" and d["version"] == 10 and d["meta"] == ["object-hue", 10] and d["note"] == ""
    assert s["task"] == "small-object" and s["version"] == 8 and s["meta"] == ["small-object", 8]
    assert s["data_dir"] == "cls-v8-default" != d["data_dir"]  # its own data, backbone and shipped-weights check
    assert "small-object" in s["note"] and "experimental" in s["note"]
    assert s["pixel_sum"] != d["pixel_sum"]
    assert (d["width"], d["heads"]) == (s["width"], s["heads"]) == (64, 2)


def test_medium_object_task_has_its_own_data_and_a_wider_backbone(tmp_path):
    """docs/proxy.md, "A wider backbone": larger objects, width 96 with 3 heads, named in every header."""
    res = _probe(("small-object", "medium-object"), tmp_path)
    s, m = res["small-object"], res["medium-object"]
    assert m["version"] == 9 and m["meta"] == ["medium-object", 9] and m["data_dir"] == "cls-v9-default"
    assert (m["width"], m["heads"]) == (96, 3) and "width 96, 3 heads" in m["note"]
    assert m["pixel_sum"] != s["pixel_sum"]  # the same scene, a larger object


def test_wide_clutter_is_small_clutter_with_a_wider_backbone(tmp_path):
    """docs/proxy.md, "A busy background": small-clutter's images under their own data version, with a
    backbone of width 96 and 3 heads, named in every header."""
    res = _probe(("small-clutter", "wide-clutter"), tmp_path)
    s, w = res["small-clutter"], res["wide-clutter"]
    assert (s["version"], w["version"]) == (15, 17) and w["meta"] == ["wide-clutter", 17]
    assert (s["width"], s["heads"], w["width"], w["heads"]) == (64, 2, 96, 3) and "width 96, 3 heads" in w["note"]
    assert w["pixel_sum"] == s["pixel_sum"]  # the same images


def test_unknown_task_is_refused_with_the_choices(tmp_path):
    env = {**os.environ, "PMBENCH_PROXY_TASK": "bogus", "PMBENCH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "bench.cli", "data", "proxy", "--size", "smoke", "--out",
                        str(tmp_path / "x")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "PMBENCH_PROXY_TASK='bogus' is not a proxy task" in r.stderr and "small-object" in r.stderr
    assert not (tmp_path / "x").exists()


def test_the_former_default_task_stays_selectable(tmp_path):
    """largest-hue, the default before object-hue (docs/proxy.md), runs as an experiment with its own data."""
    res = _probe((None, "largest-hue"), tmp_path)
    d, old = res[None], res["largest-hue"]
    assert old["version"] == 5 and old["meta"] == ["largest-hue", 5] and old["data_dir"] == "cls-v5-default"
    assert "largest-hue" in old["note"] and "experimental" in old["note"]
    assert old["pixel_sum"] != d["pixel_sum"] and (old["width"], old["heads"]) == (d["width"], d["heads"]) == (64, 2)


def test_object_hue_is_the_medium_object_scene_with_overlapping_hues():
    """The default task draws the medium-object scene (18-30 px object) with +-12 degrees of hue jitter, so
    neighbouring classes (20 degrees apart) overlap; the same seed gives the same scene and object."""
    import numpy as np

    from bench.runtime import proxy

    rng = lambda: np.random.default_rng(np.random.SeedSequence([0, 1, 3, 0]))  # noqa: E731
    a = np.asarray(proxy.render(3, rng(), "object-hue"))
    b = np.asarray(proxy._render_small_object(3, rng(), sides=(18, 30), jitter=12.0))
    c = np.asarray(proxy.render(3, rng(), "medium-object"))
    assert (a == b).all() and a.shape == (proxy.GEN_SIZE, proxy.GEN_SIZE, 3)
    assert (a != c).any()  # only the object's hue differs from medium-object's (+-5 degrees)
    assert proxy.OBJECT_HUE_JITTER > proxy.HUE_STEP / 2  # classes overlap: below 100% even unreduced


def test_object_part_puts_the_class_hue_on_a_small_part_of_a_distractor_object(monkeypatch):
    """The object-part experiment: the object's body has a hue 30-60 degrees from the class's, and a small
    part on it (one or two 8 px tokens) has the class's hue (+-12 degrees)."""
    import numpy as np

    from bench.runtime import proxy

    for label in (0, 4, 9):
        for i in range(4):
            hues, masks = [], []
            hsv, shape = proxy._hsv, proxy._shape_mask
            monkeypatch.setattr(proxy, "_hsv", lambda h, s, v: hues.append(h) or hsv(h, s, v))
            monkeypatch.setattr(proxy, "_shape_mask", lambda *a: masks.append(shape(*a)) or masks[-1])
            img = np.asarray(proxy.render(label, np.random.default_rng(np.random.SeedSequence([0, 1, i, label])),
                                          "object-part"))
            monkeypatch.undo()
            assert img.shape == (proxy.GEN_SIZE, proxy.GEN_SIZE, 3)
            centre = label * proxy.HUE_STEP
            body_hue, part_hue = hues[-2:]  # drawn after the scene's
            assert 30 <= abs(body_hue - centre) <= 60 and abs(part_hue - centre) <= proxy.OBJECT_HUE_JITTER
            body, part = masks
            assert 20 <= part.sum() <= 130 < body.sum()  # about 7-11 px across against 18-30
            assert (part & body).sum() >= 0.5 * part.sum()  # the part sits on the body


def test_object_clutter_puts_the_object_hue_object_on_the_busy_background(monkeypatch):
    """The object-clutter experiment: largest-hue's busy background (dense confetti in the classes' hues),
    then one 18-30 px object of the class's hue (+-12 degrees), the last thing drawn before the noise; its
    variants differ in the object's size and the number of dots."""
    import numpy as np

    from bench.runtime import proxy

    for label in (0, 5, 9):
        for i in range(4):
            calls, hues, masks = [], [], []
            hsv, shape, background = proxy._hsv, proxy._shape_mask, proxy._background
            monkeypatch.setattr(proxy, "_background", lambda rng, c: calls.append("background") or background(rng, c))
            monkeypatch.setattr(proxy, "_smooth_scene", lambda rng: calls.append("smooth"))
            monkeypatch.setattr(proxy, "_hsv", lambda h, s, v: hues.append(h) or hsv(h, s, v))
            monkeypatch.setattr(proxy, "_shape_mask", lambda *a: masks.append(shape(*a)) or masks[-1])
            img = np.asarray(proxy.render(label, np.random.default_rng(np.random.SeedSequence([0, 1, i, label])),
                                          "object-clutter"))
            monkeypatch.undo()
            assert img.shape == (proxy.GEN_SIZE, proxy.GEN_SIZE, 3) and calls == ["background"]
            assert len(hues) > 120  # the confetti's hues, then the object's
            assert abs(hues[-1] - label * proxy.HUE_STEP) <= proxy.OBJECT_HUE_JITTER
            (mask,) = masks
            assert 0.3 * 18 ** 2 <= mask.sum() <= 1.3 * 30 ** 2  # about 18-30 px across
            # the object is the saturated, uniform region it was painted as (pixel noise only)
            obj = img[mask].astype(float)
            assert obj.std(0).max() < 12
    # small-clutter: 14-24 px objects against 18-30; sparse-clutter: those with 40-70 dots against 120-200;
    # wide-tiny-clutter and wide-mid-clutter: 10-18 and 12-20 px objects, for a 96-wide backbone
    # centred-clutter: small-clutter with the object's centre drawn around the image centre
    sides, spreads, confetti = [], [], []
    background = proxy._background
    monkeypatch.setattr(proxy, "_place_object",
                        lambda rng, s, spread=None: sides.append(s) or spreads.append(spread) or (s[0], 64.0, 64.0))
    monkeypatch.setattr(proxy, "_background", lambda rng, c: confetti.append(c) or background(rng, c))
    for task in ("object-clutter", "small-clutter", "sparse-clutter", "wide-tiny-clutter", "wide-mid-clutter",
                 "centred-clutter"):
        proxy.render(0, np.random.default_rng(0), task)
    assert sides == [(18, 30), (14, 24), (14, 24), (10, 18), (12, 20), (14, 24)]
    assert spreads == [None] * 5 + [12.0]
    assert confetti == [(120, 200), (120, 200), (40, 70), (120, 200), (120, 200), (120, 200)]
    for task in ("wide-clutter", "wide-tiny-clutter", "wide-mid-clutter"):
        assert proxy.TASKS[task].shape == (96, 3)
    wide, small = proxy.TASKS["wide-clutter"].render, proxy.TASKS["small-clutter"].render
    assert (wide.func, wide.args, wide.keywords) == (small.func, small.args, small.keywords)  # the same images


def test_centred_placement_draws_the_object_near_the_image_centre(monkeypatch):
    """centred-object is object-hue's image with the object's centre drawn around the image centre
    (standard deviation 12 px, kept inside the crop), loosely-centred-object the same with 18 px; the
    earlier object tasks place it uniformly."""
    import numpy as np

    from bench.runtime import proxy

    def centres(spread):
        return np.array([proxy._place_object(np.random.default_rng(i), (18, 30), spread)[1:] for i in range(400)])

    uniform, centred = centres(None), centres(12.0)
    mid = proxy.GEN_SIZE / 2
    assert abs(centred.mean() - mid) < 2 and 10 < centred.std() < 13  # clipping trims the tails a little
    assert uniform.std() > 20 and np.abs(centred - mid).max() <= mid - 10 - 9  # inside the margin
    calls = []
    monkeypatch.setattr(proxy, "_with_object", lambda img, label, rng, sides, jitter, spread: calls.append(
        (sides, jitter, spread)))
    for task in ("centred-object", "loosely-centred-object", "object-hue"):
        proxy.render(0, np.random.default_rng(0), task)
    assert calls == [((18, 30), proxy.OBJECT_HUE_JITTER, 12.0), ((18, 30), proxy.OBJECT_HUE_JITTER, 18.0),
                     ((18, 30), proxy.OBJECT_HUE_JITTER, None)]


def test_grey_object_is_object_hue_on_a_colourless_scene():
    """grey-object draws exactly object-hue's scene and object (the same random draws), with the scene turned
    grey: every pixel off the object has equal channels (up to the pixel noise), the object's pixels are
    object-hue's, and a 50/50 blend of an object pixel with the grey scene keeps its hue angle."""
    import colorsys

    import numpy as np

    from bench.runtime import proxy

    assert len({t.version for t in proxy.TASKS.values()}) == len(proxy.TASKS)  # every task its own data version
    for label in (0, 5, 9):
        hue = np.asarray(proxy.render(label, np.random.default_rng(label), "object-hue")).astype(float)
        grey = np.asarray(proxy.render(label, np.random.default_rng(label), "grey-object")).astype(float)
        same = (np.abs(hue - grey).max(-1) == 0)  # the object (painted after the scene, same draws and noise)
        assert 150 < same.sum() < 1500
        chroma = grey.max(-1) - grey.min(-1)
        assert np.median(chroma[~same]) < 15 < np.median(hue.max(-1)[~same] - hue.min(-1)[~same])
        obj = grey[same].mean(0)
        blend = (obj + grey[~same].mean(-1).mean()) / 2  # mixed with a grey token
        h = [colorsys.rgb_to_hsv(*(c / 255))[0] * 360 for c in (obj, blend)]
        assert abs(h[0] - h[1]) < 1 and abs((h[0] - label * proxy.HUE_STEP + 180) % 360 - 180) <= 14


def test_object_texture_fills_the_object_with_the_class_texture_in_a_random_hue(monkeypatch):
    """The object-texture experiment: one 30-50 px object per image (large-texture: 40-60 px), filled with
    the class's texture (proxy.TEXTURES in class order) in two shades of a hue drawn at random, on
    object-hue's scene."""
    import colorsys

    import numpy as np

    from bench.runtime import proxy

    kinds, sides = [], []
    texture, place = proxy._texture, proxy._place_object
    monkeypatch.setattr(proxy, "_texture", lambda kind, *a: kinds.append(kind) or texture(kind, *a))
    monkeypatch.setattr(proxy, "_place_object", lambda rng, s, spread=None: sides.append(s) or place(rng, s, spread))
    for label in range(len(proxy.CLASSES)):
        for seed in range(3):
            img = np.asarray(proxy.render(label, np.random.default_rng(seed), "object-texture")).astype(float)
            sat = img.max(-1) - img.min(-1)
            assert (sat > 60).sum() > 100  # a saturated object on the low-saturation scene
    assert kinds == [k for k in range(len(proxy.CLASSES)) for _ in range(3)] and set(sides) == {(30, 50)}
    proxy.render(4, np.random.default_rng(0), "large-texture")
    assert kinds[-1] == 4 and sides[-1] == (40, 60)
    assert proxy.TEXTURES[0] == "hstripes" and len(proxy.TEXTURES) == len(proxy.CLASSES)
    hues = []
    for seed in range(12):
        img = np.asarray(proxy.render(3, np.random.default_rng(seed), "object-texture")).astype(float)
        px = img[(img.max(-1) - img.min(-1)) > 80].mean(0) / 255
        hues.append(colorsys.rgb_to_hsv(*px)[0] * 360)
    assert np.ptp(hues) > 120  # the hue says nothing about the class


def test_the_smoke_size_draws_largest_hue_images_whatever_the_task(tmp_path):
    """The smoke backbone (8 steps) learns nothing on the object task; its images are largest-hue's so the
    CI gate's accuracies sit above chance.  Its data folder, manifest and header say so."""
    code = """
import json
from bench.runtime import proxy
root = proxy.ensure_proxy_data(size="smoke")
meta = json.loads((root / "proxy.json").read_text())
print(json.dumps({"dir": root.name, "meta": [meta["task"], meta["version"]], "note": proxy.task_note("smoke"),
                  "default_note": proxy.task_note(), "backbone": proxy.backbone_path("smoke").name}))
"""
    r = _py(code, None, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.splitlines()[-1])
    assert d["dir"] == "cls-v5-smoke" and d["meta"] == ["largest-hue", 5] and d["backbone"].startswith("backbone-v5-smoke-")
    assert "images of task largest-hue" in d["note"] and d["default_note"] == ""


def test_object_shape_draws_the_class_outline_in_a_random_hue(monkeypatch):
    """The object-shape experiment: one object per image whose outline is the class's (proxy.SHAPES) and
    whose hue is drawn at random, so only the outline tells the classes apart."""
    import numpy as np

    from bench.runtime import proxy

    assert len(proxy.SHAPES) == len(proxy.CLASSES) == len(set(proxy.SHAPES))
    rng = np.random.default_rng(0)
    areas = {k: proxy._outline_mask(k, rng, 64.0, 64.0, 30.0).sum() for k in proxy.SHAPES}
    assert areas["ring"] < areas["disc"] and areas["h-bar"] < areas["plus"] < areas["square"]
    bar = proxy._outline_mask("h-bar", rng, 64.0, 64.0, 30.0)
    ys, xs = np.nonzero(bar)
    assert np.ptp(xs) > 2 * np.ptp(ys)  # a horizontal bar is wider than tall
    for label in (0, 6, 9):
        object_hues = []
        for i in range(8):
            hues, masks = [], []
            hsv, outline = proxy._hsv, proxy._outline_mask
            monkeypatch.setattr(proxy, "_hsv", lambda h, s, v: hues.append(h) or hsv(h, s, v))
            monkeypatch.setattr(proxy, "_outline_mask", lambda kind, *a: masks.append(kind) or outline(kind, *a))
            img = np.asarray(proxy.render(label, np.random.default_rng(np.random.SeedSequence([0, 1, i, label])),
                                          "object-shape"))
            monkeypatch.undo()
            assert img.shape == (proxy.GEN_SIZE, proxy.GEN_SIZE, 3) and masks == [proxy.SHAPES[label]]
            object_hues.append(hues[-1])  # the object's hue, drawn after the scene's
        assert np.ptp(object_hues) > 120  # the hue is not the class's: it spreads over the colour wheel
    # large-shape: the same outlines at 40-60 px against 24-36
    sides = []
    monkeypatch.setattr(proxy, "_place_object", lambda rng, s: sides.append(s) or (s[0], 64.0, 64.0))
    for task in ("object-shape", "large-shape"):
        proxy.render(0, np.random.default_rng(0), task)
    assert sides == [(24, 36), (40, 60)]


def test_task_experiment_measures_in_one_process(monkeypatch, tmp_path, load_benchmark):
    """benchmarks/proxy_task_experiment.py patches its backbone recipe (--epochs) into this process's SIZES;
    job workers are fresh processes that would train the default recipe's backbone instead, so the
    experiment runs the accuracy stage with --job-workers 1."""
    from bench import orchestrate
    from bench.runtime import proxy

    mod = load_benchmark("proxy_task_experiment")
    for var in ("PMBENCH_PROXY_TASK", "PMBENCH_CACHE"):
        monkeypatch.setenv(var, "")
    monkeypatch.setitem(proxy.SIZES, "default", proxy.SIZES["default"])  # the experiment replaces it
    calls = []
    monkeypatch.setattr(orchestrate, "main", lambda argv: calls.append((argv, proxy.SIZES["default"].epochs)) or 1)
    assert mod.main(["--task", proxy.DEFAULT_TASK, "--epochs", "12", "--cache", str(tmp_path)]) == 1
    (argv, epochs), = calls
    assert argv[argv.index("--job-workers") + 1] == "1" and epochs == 12
