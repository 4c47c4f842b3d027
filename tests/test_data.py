"""Image datasets: the bundled shapes dataset, ADM centre crop, ImageFolder / caption folders, bad input, flips."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dit.data import (
    BadImageError,
    CaptionDataset,
    ImageFolderDataset,
    ShapesDataset,
    center_crop_arr,
    flip_decision,
    materialise,
)
from dit.data.shapes import BACKGROUNDS, CLASHES, COLOURS


# ----------------------------------------------------------------------------------------------- shapes dataset
def test_shapes_deterministic_and_seed_dependent():
    a, b = ShapesDataset(resolution=32, num_samples=24, seed=3), ShapesDataset(resolution=32, num_samples=24, seed=3)
    c = ShapesDataset(resolution=32, num_samples=24, seed=4)
    for i in (0, 5, 23):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
    assert sum(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(24)) >= 20


def test_shapes_items_classes_and_balance():
    ds = ShapesDataset(resolution=16, num_samples=36, seed=0)
    assert ds.num_classes >= 10 and len(set(ds.classes)) == ds.num_classes
    assert "red circle" in ds.classes
    item = ds[7]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert labels == [i % ds.num_classes for i in range(36)]
    assert np.bincount(labels).tolist() == [3] * ds.num_classes


def test_shapes_captions_match_ground_truth_and_pixels():
    ds = ShapesDataset(resolution=64, num_samples=24, seed=1)
    sizes = set()
    for i in range(len(ds)):
        d, item = ds.describe(i), ds[i]
        assert item["caption"] == f"a {d['size']} {d['colour']} {d['shape']} on a {d['background']} background"
        assert d["class"] == ds.classes[item["label"]] == f"{d['colour']} {d['shape']}"
        assert d["colour"] not in CLASHES.get(d["background"], ())
        sizes.add(d["size"])
        # The rendered pixels agree with the description: shape colour at its centre, background in the corner.
        img = np.asarray(ds.render(i)).astype(int)  # (H, W, 3)
        cx, cy = (int(v * 64) for v in d["center"])
        assert np.abs(img[cy, cx] - COLOURS[d["colour"]]).max() <= 2, (i, d)
        assert np.abs(img[0, 0] - BACKGROUNDS[d["background"]]).max() <= 2, (i, d)
    assert sizes == {"small", "medium", "large"}


def test_shapes_palette_never_clashes():
    for bg, bg_rgb in BACKGROUNDS.items():
        for fg, fg_rgb in COLOURS.items():
            if fg not in CLASHES.get(bg, ()):
                assert np.linalg.norm(np.subtract(bg_rgb, fg_rgb)) > 90, (fg, bg)


def test_shapes_train_val_disjoint_and_bad_args():
    train = ShapesDataset(resolution=16, num_samples=24, seed=0, split="train")
    val = ShapesDataset(resolution=16, num_samples=24, seed=0, split="val")
    train_imgs = {train[i]["image"].numpy().tobytes() for i in range(24)}
    assert not any(val[i]["image"].numpy().tobytes() in train_imgs for i in range(24))
    with pytest.raises(ValueError, match="resolution"):
        ShapesDataset(resolution=8)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")
    with pytest.raises(IndexError):
        train[24]


def test_materialise_round_trips_through_image_folder(tmp_path):
    ds = ShapesDataset(resolution=16, num_samples=24, seed=2)
    materialise(ds, tmp_path)
    assert json.loads((tmp_path / "classes.json").read_text()) == ds.classes
    folder = ImageFolderDataset(tmp_path, resolution=16)
    assert len(folder) == 24 and folder.num_classes == ds.num_classes
    by_name = {f.split("/")[-1]: k for k, f in enumerate(folder.files)}
    for i in (0, 1, 13):
        item = folder[by_name[f"{i:06d}.png"]]
        assert item["label"] == ds[i]["label"]
        assert torch.equal(item["image"], ds[i]["image"])  # PNG is lossless; same-size crop is the identity
    caps = CaptionDataset(tmp_path, resolution=16)
    assert caps.classes == ds.classes
    k = [f.split("/")[-1] for f in caps.files].index("000005.png")
    assert caps[k]["caption"] == ds.caption(5) and caps[k]["label"] == 5 % ds.num_classes


# ----------------------------------------------------------------------------------------------- centre crop
def test_center_crop_arr_matches_independent_derivations():
    from skimage import data

    chelsea = data.chelsea()  # (300, 451, 3) real photo, non-square
    # Short side already equals the target: the resize is the identity, so the result is the centre slice.
    out = np.asarray(center_crop_arr(Image.fromarray(chelsea), 300))
    assert np.array_equal(out, chelsea[:, 75:375])
    # One BOX halving of an even-sized image is the 2x2 block mean; then the centre crop.
    even = chelsea[:, :450]
    half = even.reshape(150, 2, 225, 2, 3).astype(np.float64).mean(axis=(1, 3))  # (150, 225, 3)
    out = np.asarray(center_crop_arr(Image.fromarray(even), 150)).astype(np.float64)
    assert out.shape == (150, 150, 3)
    assert np.abs(out - half[:, 37:187]).max() <= 1.0

    # General case re-derived with integer size arithmetic and PIL's crop box on the rocket photo (427 x 640).
    rocket = Image.fromarray(data.rocket())
    for size in (32, 100, 427):
        w, h = rocket.size
        img = rocket
        while min(w, h) >= 2 * size:
            w, h = w // 2, h // 2
            img = img.resize((w, h), Image.BOX)
        w2, h2 = round(w * size / min(w, h)), round(h * size / min(w, h))
        img = img.resize((w2, h2), Image.BICUBIC)
        left, top = (w2 - size) // 2, (h2 - size) // 2
        ref = np.asarray(img.crop((left, top, left + size, top + size)))
        got = np.asarray(center_crop_arr(rocket, size))
        assert got.shape == (size, size, 3) and np.array_equal(got, ref), size


# ----------------------------------------------------------------------------------------------- folders + bad input
def _noise(size=(16, 12), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], ch), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if ch == 1 else arr, mode=mode)


def _folder(tmp_path, per_class=2, classes=("cat", "dog")):
    root = tmp_path / "data"
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            _noise(seed=10 * k + j).save(root / c / f"{j}.png")
    return root


def test_image_folder_labels_and_class_list(tmp_path):
    root = _folder(tmp_path, classes=("zebra", "ant", "moose"))
    ds = ImageFolderDataset(root, resolution=8)
    assert ds.classes == ["ant", "moose", "zebra"]
    assert ds.labels == [0, 0, 1, 1, 2, 2] and len(ds) == 6
    item = ds[4]
    assert item["image"].shape == (3, 8, 8) and item["label"] == 2 and item["caption"] == "zebra"
    fixed = ImageFolderDataset(root, resolution=8, class_names=["moose", "zebra", "ant", "extra"])
    assert fixed.labels == [2, 2, 0, 0, 1, 1] and fixed.num_classes == 4
    with pytest.raises(ValueError, match="not in class_names"):
        ImageFolderDataset(root, resolution=8, class_names=["ant"])


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)
    root = _folder(tmp_path)
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder .*bird contains no images"):
        ImageFolderDataset(root, resolution=8)


@pytest.mark.parametrize("kind", ["png", "jpeg", "text"])
def test_bad_files_raise_naming_the_path(tmp_path, kind):
    root = _folder(tmp_path)
    if kind == "text":
        bad = root / "cat" / "fake.png"
        bad.write_text("this is not a PNG")
        msg = "not an image"
    else:
        bad = root / "dog" / f"cut.{kind}"
        _noise(size=(32, 32), seed=5).save(bad, quality=95) if kind == "jpeg" else _noise((32, 32)).save(bad)
        raw = bad.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])  # truncated mid-stream
        msg = "truncated"
    with pytest.raises(BadImageError, match=msg) as e:
        ImageFolderDataset(root, resolution=8)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    # skip_bad: skipped, listed, warned about; the good files remain.
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        ds = ImageFolderDataset(root, resolution=8, skip_bad=True)
    assert [p for p, _ in ds.bad_files] == [str(bad)] and len(ds) == 4
    assert all(ds[i]["image"].shape == (3, 8, 8) for i in range(len(ds)))


def test_grayscale_rgba_palette_converted_with_note(tmp_path):
    root = _folder(tmp_path, per_class=1)
    _noise(mode="L", seed=1).save(root / "cat" / "gray.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red where opaque, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "alpha.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 8, 4))
    pal.save(root / "dog" / "pal.png", transparency=0)  # index 0 (bottom half) transparent
    with pytest.warns(UserWarning, match="converting non-RGB images to RGB"):
        ds = ImageFolderDataset(root, resolution=8)
    imgs = {f.split("/")[-1]: ds[k]["image"] for k, f in enumerate(ds.files)}
    g = imgs["gray.png"]
    assert g.shape == (3, 8, 8) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    a = (imgs["alpha.png"] + 1) * 127.5  # back to 0..255
    assert torch.allclose(a[:, :, :4], torch.full_like(a[:, :, :4], 255.0), atol=1e-3)  # transparent -> white
    assert torch.allclose(a[:, :, 4:], torch.tensor([200.0, 0, 0])[:, None, None].expand(3, 8, 4), atol=1e-3)
    p = (imgs["pal.png"] + 1) * 127.5
    assert torch.allclose(p[:, :4], torch.tensor([0.0, 255, 0])[:, None, None].expand(3, 4, 8), atol=1e-3)
    assert torch.allclose(p[:, 4:], torch.full_like(p[:, 4:], 255.0), atol=1e-3)


def test_caption_dataset_sidecars_and_errors(tmp_path):
    root = tmp_path / "caps"
    (root / "sub").mkdir(parents=True)
    _noise(seed=1).save(root / "a.png")
    (root / "a.txt").write_text("a noisy square\n")
    _noise(seed=2).save(root / "sub" / "b.jpg")
    (root / "sub" / "b.txt").write_text("another one")
    ds = CaptionDataset(root, resolution=8)
    assert [ds[i]["caption"] for i in range(2)] == ["a noisy square", "another one"]
    assert ds.classes is None and ds[0]["label"] == 0
    _noise(seed=3).save(root / "c.png")  # no caption
    with pytest.raises(ValueError, match=r"c\.png has no caption"):
        CaptionDataset(root, resolution=8)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(CaptionDataset(root, resolution=8, skip_bad=True)) == 2
    (root / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="captions.jsonl line 2: not valid JSON"):
        CaptionDataset(root, resolution=8)
    (root / "captions.jsonl").write_text('{"file": "gone.png", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match="gone.png"):
        CaptionDataset(root, resolution=8)


# ----------------------------------------------------------------------------------------------- flips
def test_flip_decision_deterministic_balanced_and_epoch_dependent():
    e0 = [flip_decision(0, 0, i) for i in range(4000)]
    assert e0 == [flip_decision(0, 0, i) for i in range(4000)]
    assert 0.46 < np.mean(e0) < 0.54
    e1 = [flip_decision(0, 1, i) for i in range(4000)]
    s1 = [flip_decision(1, 0, i) for i in range(4000)]
    assert 0.4 < np.mean(np.not_equal(e0, e1)) < 0.6 and 0.4 < np.mean(np.not_equal(e0, s1)) < 0.6


def test_image_folder_flip_follows_seed_epoch_index(tmp_path):
    root = _folder(tmp_path, per_class=4)
    plain = ImageFolderDataset(root, resolution=8)
    ds = ImageFolderDataset(root, resolution=8, flip=True, seed=7)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        flips = [flip_decision(7, epoch, i) for i in range(len(ds))]
        assert any(flips) and not all(flips)  # both branches are checked
        for i in range(len(ds)):
            want = plain[i]["image"].flip(-1) if flips[i] else plain[i]["image"]
            assert torch.equal(ds[i]["image"], want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no global RNG, no warnings: a fresh copy repeats the same epoch exactly
        again = ImageFolderDataset(root, resolution=8, flip=True, seed=7)
    again.set_epoch(3)
    assert all(torch.equal(again[i]["image"], ds[i]["image"]) for i in range(len(ds)))
