"""Latent shards: extraction with the exact identity autoencoder, resumability, manifests, LatentDataset, flips."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dit.data import LatentDataset, ShapesDataset, check_manifest, flip_decision, read_manifest
from dit.data.extract import extract_latents
from dit.data.latents import shard_name, shard_problem
from vae import load_autoencoder

REPO = Path(__file__).resolve().parents[1]


class FakeTextEncoder:
    """Deterministic stand-in for dit.text encoders: token j of a caption = its j-th word length, repeated."""

    spec, dim, max_length = "fake-text", 4, 6

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        n = len(prompts)
        tokens = torch.zeros(n, self.max_length, self.dim)
        mask = torch.zeros(n, self.max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = p.split()[: self.max_length]
            tokens[i, : len(words)] = torch.tensor([float(len(w)) for w in words])[:, None]
            mask[i, : len(words)] = True
        return {"tokens": tokens, "mask": mask, "pooled": tokens.sum(1) / mask.sum(1, keepdim=True)}


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(resolution=16, num_samples=10, seed=0)


@pytest.fixture(scope="module")
def identity():
    return load_autoencoder("identity")


def _images(ds) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(len(ds))])  # (N, 3, H, W)


def test_identity_extraction_stores_the_images(tmp_path, shapes, identity):
    stats = extract_latents(shapes, identity, tmp_path, batch_size=3, shard_size=4, dtype="fp32", flip=True,
                            progress=False)
    assert stats["images"] == 10 and stats["written"] == [0, 1, 2] and stats["img_per_s"] > 0
    m = read_manifest(tmp_path)
    assert (m["count"], m["num_shards"], m["shard_size"], m["latent_shape"]) == (10, 3, 4, [3, 16, 16])
    assert m["autoencoder"]["spec"] == "identity" and m["autoencoder"]["fingerprint"] == identity.fingerprint()
    assert m["class_names"] == shapes.classes and m["has_flip"] and m["text_encoder"] is None
    assert m["source"] == shapes.source and m["dtype"] == "fp32"
    images = _images(shapes)
    with safe_open(str(tmp_path / shard_name(1)), framework="pt") as f:  # rows 4..7
        assert torch.equal(f.get_tensor("latents"), images[4:8])
        assert torch.equal(f.get_tensor("latents_flip"), images[4:8].flip(-1))
        assert f.get_tensor("labels").tolist() == [4, 5, 6, 7]
    ds = LatentDataset(tmp_path, flip=False)
    assert len(ds) == 10 and ds.num_classes == shapes.num_classes and ds.latent_shape == (3, 16, 16)
    for i in range(10):
        item = ds[i]
        assert item["latent"].dtype == torch.float32 and torch.equal(item["latent"], images[i])
        assert item["label"] == shapes[i]["label"]


def test_bf16_default_and_text_embeddings(tmp_path, shapes, identity):
    te = FakeTextEncoder()
    extract_latents(shapes, identity, tmp_path, batch_size=4, shard_size=8, text_encoder=te, progress=False)
    m = read_manifest(tmp_path)
    assert m["dtype"] == "bf16" and m["text_encoder"] == {"spec": "fake-text", "dim": 4, "max_length": 6}
    ds = LatentDataset(tmp_path, flip=False, expect={"autoencoder": "identity", "text_encoder": "fake-text"})
    images = _images(shapes)
    want = te.encode([shapes[i]["caption"] for i in range(10)])
    for i in (0, 9):
        item = ds[i]
        assert torch.equal(item["latent"], images[i].to(torch.bfloat16).float())
        assert torch.equal(item["context"], want["tokens"][i]) and item["context"].shape == (6, 4)
        assert item["context_mask"].dtype == torch.bool and torch.equal(item["context_mask"], want["mask"][i])
        assert torch.allclose(item["pooled"], want["pooled"][i], rtol=1e-3)


def test_latent_flip_follows_seed_epoch_index(tmp_path, shapes, identity):
    extract_latents(shapes, identity, tmp_path, shard_size=4, dtype="fp32", flip=True, progress=False)
    images = _images(shapes)
    ds = LatentDataset(tmp_path, flip=True, seed=5)
    patterns = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        flips = [flip_decision(5, epoch, i) for i in range(10)]
        for i in range(10):
            assert torch.equal(ds[i]["latent"], images[i].flip(-1) if flips[i] else images[i])
        patterns.append(flips)
    assert patterns[0] != patterns[1]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives: handles reopen lazily
    assert torch.equal(clone[3]["latent"], ds[3]["latent"])
    with pytest.warns(UserWarning, match="no flipped copies"):
        shutil.rmtree(tmp_path / "noflip", ignore_errors=True)
        extract_latents(shapes, identity, tmp_path / "noflip", shard_size=4, dtype="fp32", progress=False)
        assert not LatentDataset(tmp_path / "noflip", flip=True).flip


def test_resume_redoes_only_missing_or_damaged_shards(tmp_path, shapes, identity):
    first = extract_latents(shapes, identity, tmp_path, shard_size=3, dtype="fp32", progress=False)
    assert first["written"] == [0, 1, 2, 3]
    again = extract_latents(shapes, identity, tmp_path, shard_size=3, dtype="fp32", progress=False)
    assert again["written"] == [] and again["skipped"] == [0, 1, 2, 3] and again["images"] == 0
    mtime0 = os.stat(tmp_path / shard_name(0)).st_mtime_ns
    (tmp_path / shard_name(1)).unlink()
    p2 = tmp_path / shard_name(2)
    raw = bytearray(p2.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data: header still parses, CRC32 must catch it
    p2.write_bytes(bytes(raw))
    assert "CRC32" in shard_problem(p2, {})
    p3 = tmp_path / shard_name(3)
    p3.write_bytes(p3.read_bytes()[:40])  # truncated
    assert "unreadable" in shard_problem(p3, {})
    third = extract_latents(shapes, identity, tmp_path, shard_size=3, dtype="fp32", progress=False)
    assert third["written"] == [1, 2, 3] and third["skipped"] == [0] and third["images"] == 7
    assert os.stat(tmp_path / shard_name(0)).st_mtime_ns == mtime0
    images = _images(shapes)
    ds = LatentDataset(tmp_path, flip=False)
    assert torch.equal(torch.stack([ds[i]["latent"] for i in range(10)]), images)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_manifest_mismatch_is_refused_with_a_clear_message(tmp_path, shapes, identity):
    extract_latents(shapes, identity, tmp_path, shard_size=4, progress=False)
    fp = identity.fingerprint()
    with pytest.raises(ValueError) as e:
        LatentDataset(tmp_path, expect={"autoencoder": "taef2:/weights/taef2"})
    msg = str(e.value)
    assert msg == (f"latents at {tmp_path} were made with autoencoder identity (fingerprint {fp}), "
                   "but the config asks for taef2:/weights/taef2")
    with pytest.raises(ValueError) as e:
        check_manifest(read_manifest(tmp_path), {"resolution": 32, "num_classes": 5, "latent_channels": 3,
                                                 "text_encoder": "minilm"}, where="X")
    msg = str(e.value)
    assert msg.startswith("latents at X were made with resolution 16, but the config asks for 32; ")
    assert "12 classes, but the config asks for 5" in msg and "no text encoder, but the config asks for minilm" in msg
    assert "latent_channels" not in msg and "\n" not in msg
    check_manifest(read_manifest(tmp_path), {"autoencoder": {"spec": "identity", "fingerprint": fp},
                                             "resolution": 16, "num_classes": 12, "text_encoder": None})
    with pytest.raises(ValueError, match="unknown expected field 'resolutoin'"):
        check_manifest(read_manifest(tmp_path), {"resolutoin": 16})
    # Re-extracting into the same directory with a different autoencoder normalisation is refused.
    other = load_autoencoder("identity", scale=2.0)
    with pytest.raises(ValueError, match=r"made with autoencoder identity \(fingerprint .*refusing to mix"):
        extract_latents(shapes, other, tmp_path, shard_size=4, progress=False)


def test_latent_dataset_bad_paths(tmp_path, shapes, identity):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        LatentDataset(tmp_path)
    extract_latents(shapes, identity, tmp_path, shard_size=4, progress=False)
    (tmp_path / shard_name(2)).unlink()
    with pytest.raises(FileNotFoundError, match="missing 1 shard.*shard_00002"):
        LatentDataset(tmp_path, flip=False)


def test_tool_single_process_and_bad_data(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import extract_latents as tool
    finally:
        sys.path.pop(0)
    out = tmp_path / "lat"
    assert tool.main(["--data", "shapes", "--resolution", "16", "--num-samples", "6", "--shard-size", "4",
                      "--autoencoder", "identity", "--out", str(out), "--num-workers", "0", "--cpu"]) == 0
    assert read_manifest(out)["count"] == 6
    with pytest.raises(FileNotFoundError, match="--data /no/such/dir"):
        tool.main(["--data", "/no/such/dir", "--resolution", "16", "--autoencoder", "identity", "--out", str(out)])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        tool.main(["--data", str(a_file), "--resolution", "16", "--autoencoder", "identity", "--out", str(out)])
    # A mistyped --autoencoder is reported before the folder is scanned: here the scan would stop at a corrupt file.
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FileNotFoundError, match="no-such-vae: no such file or folder"):
        tool.main(["--data", str(folder.parent), "--resolution", "16", "--autoencoder", "no-such-vae",
                   "--out", str(out), "--cpu"])


@pytest.mark.slow
def test_two_process_extraction_with_accelerate(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): shard i by process i % 2; same result as 1 process."""
    out = tmp_path / "lat"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(REPO / "tools" / "extract_latents.py"), "--cpu", "--data", "shapes", "--resolution", "16",
           "--num-samples", "10", "--shard-size", "3", "--autoencoder", "identity", "--dtype", "fp32",
           "--num-workers", "0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 shards (4 written, 0 already done); encoded 10 images" in r.stdout
    assert r.stdout.count("encoded 10 images") == 1  # reported by the main process only
    for i in range(4):  # really two processes: shard i was written by process i % 2
        with safe_open(str(out / shard_name(i)), framework="pt") as f:
            assert f.metadata()["written_by"] == f"{i % 2}/2"
    ds = LatentDataset(out, flip=False)
    shapes = ShapesDataset(resolution=16, num_samples=10, seed=0)
    assert torch.equal(torch.stack([ds[i]["latent"] for i in range(10)]), _images(shapes))
    # Bad input through the launcher: one clear line from the tool, no traceback.
    r = subprocess.run([sys.executable, str(REPO / "tools" / "extract_latents.py"), "--data", str(tmp_path / "x"),
                        "--resolution", "16", "--autoencoder", "identity", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("extract_latents: error: --data")


# --------------------------------------------------------------------------------------------------------------------
# In-memory shards and the batched path
# --------------------------------------------------------------------------------------------------------------------

def test_vectorised_flip_mask_equals_flip_decision():
    from dit.data.latents import flip_mask

    idx = torch.cat([torch.arange(3000), torch.tensor([2**31 - 1, 2**31, 2**40 + 7, 2**62 + 1])])
    for seed, epoch in [(0, 0), (5, 1), (2**40 + 3, 77), (123, 2**33)]:
        want = torch.tensor([flip_decision(seed, epoch, i) for i in idx.tolist()])
        assert torch.equal(flip_mask(seed, epoch, idx), want), (seed, epoch)
    assert 0.45 < flip_mask(1, 2, torch.arange(3000)).float().mean() < 0.55  # a fair coin, not all-equal


@pytest.mark.parametrize("in_memory", [True, False])
def test_get_batch_equals_collated_items(tmp_path, shapes, identity, in_memory):
    from torch.utils.data import default_collate

    extract_latents(shapes, identity, tmp_path, shard_size=4, flip=True, text_encoder=FakeTextEncoder(),
                    progress=False)  # bf16 latents, fp16 text, 3 shards (the last one short)
    ds = LatentDataset(tmp_path, flip=True, seed=5, in_memory=in_memory)
    assert ds.in_memory is in_memory
    images = _images(shapes).to(torch.bfloat16).float()
    idx = [3, 0, 9, 3, -1, 5, 6, 7, 8]
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        batch = ds.get_batch(idx, dtype=torch.float32)
        want = default_collate([ds[i] for i in idx])
        assert sorted(batch) == sorted(want) == ["context", "context_mask", "label", "latent", "pooled"]
        for k in want:
            assert batch[k].dtype == want[k].dtype and torch.equal(batch[k], want[k]), (epoch, k)
        flips = [flip_decision(5, epoch, i % 10) for i in idx]
        assert any(flips) and not all(flips)
        for row, i, f in zip(batch["latent"], idx, flips):  # really the flipped copy where the hash says so
            assert torch.equal(row, images[i].flip(-1) if f else images[i])
    native = ds.get_batch(idx)  # stored dtypes: what the trainer pins and copies
    assert native["latent"].dtype == torch.bfloat16 and native["context_mask"].dtype == torch.bool
    assert torch.equal(native["latent"].float(), batch["latent"])
    with pytest.raises(IndexError, match="index 10 out of range for 10 latents"):
        ds.get_batch([1, 10])
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives: shards re-map lazily
    assert torch.equal(clone.get_batch(idx)["latent"], native["latent"])


def test_in_memory_auto_threshold_and_no_file_access(tmp_path, shapes, identity, monkeypatch):
    import dit.data.latents as latents

    extract_latents(shapes, identity, tmp_path, shard_size=4, dtype="fp32", flip=True, progress=False)
    ds = LatentDataset(tmp_path, flip=True, seed=1)  # "auto": a few KiB is far below 8 GiB
    assert ds.in_memory and ds._mem["latents"].shape == (20, 3, 16, 16)  # originals, then flipped copies
    monkeypatch.setattr(latents, "IN_MEMORY_AUTO_BYTES", 100)
    assert not LatentDataset(tmp_path, flip=True).in_memory
    with pytest.raises(ValueError, match="in_memory must be True, False or 'auto', got 'yes'"):
        LatentDataset(tmp_path, in_memory="yes")
    want = ds.get_batch(range(10))
    for i in range(3):
        (tmp_path / shard_name(i)).unlink()  # everything already lives in RAM
    assert torch.equal(ds.get_batch(range(10))["latent"], want["latent"])
    assert torch.equal(ds[4]["latent"], want["latent"][4])
