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
