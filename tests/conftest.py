"""Shared test set-up.

Tiny tensors dominate these tests; on small shared CPU machines torch's intra-op thread pool costs far more than it
gives (measured ~1000x slower for a small indexing op with 2 busy threads), so the suite runs single-threaded.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
