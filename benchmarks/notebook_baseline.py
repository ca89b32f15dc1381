"""The notebook's data path against ours, same model (seed_cnn), same machine.

    python benchmarks/notebook_baseline.py --images 20000 --out docs/bench/notebook_baseline.json

Notebook: ``torchvision.datasets.MNIST`` (the ../shared/mnist .gz files extracted into
a temp ``root/MNIST/raw/`` so it loads with ``download=False``) + ``DataLoader`` with
``ToTensor()`` + ``Normalize`` per sample, shuffle, ``num_workers=0``.
Ours: ``pipeline.training.train.fit`` (one uint8 tensor, index slicing, per-batch ops), run
with augmentation off (same work as the notebook) and on (the default).
Both train seed_cnn with Nesterov SGD, batch 128, the same thread count, on the same
number of training images; the figure is training images per second (one run each).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import load_average

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def notebook_images_per_s(
    source: Path, n_images: int, batch: int, mean: float, std: float
) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipeline.training.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in FILES:
            with gzip.open(source / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
        ds = datasets.MNIST(tmp, train=True, download=False, transform=tf)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
        torch.manual_seed(0)
        model = build_model("seed_cnn").train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        seen = 0
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            seen += int(y.shape[0])
            if seen >= n_images:
                break
        return seen / (time.perf_counter() - t0)


def ours_images_per_s(
    n_images: int, batch: int, mean: float, std: float, augment: bool, threads: int
) -> float:
    from pipeline.core.config import load_config
    from pipeline.data.dataset import load_split
    from pipeline.training.train import fit

    cfg = load_config(ROOT / "params.yaml").train
    tc = replace(
        cfg,
        model="seed_cnn",
        epochs=1,
        batch_size=batch,
        val_size=1000,
        max_train_samples=n_images + 1000,
        optimizer="sgd",
        lr=0.05,
        schedule="constant",
        num_threads=threads,
        channels_last=False,  # the notebook's memory layout: compare data paths only
        augment=replace(cfg.augment, enabled=augment),
    )
    arrays = load_split(ROOT / "data" / "prepared", "train")
    result = fit(arrays, mean, std, tc, progress=False)
    return float(result.history[0].images_per_second)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "mnist")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from pipeline.data.stats import read_normalization
    from pipeline.training.device import resolve_threads

    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    mean, std = read_normalization(ROOT / "metrics" / "data_stats.json")
    out: dict[str, object] = {
        "torch_version": str(torch.__version__),
        "threads": threads,
        "images": args.images,
        "batch": args.batch,
        "model": "seed_cnn",
    }
    out["loadavg_notebook"] = load_average()
    out["notebook_images_per_s"] = round(
        notebook_images_per_s(args.source, args.images, args.batch, mean, std), 1
    )
    out["loadavg_ours"] = load_average()
    out["ours_images_per_s"] = round(
        ours_images_per_s(args.images, args.batch, mean, std, False, threads), 1
    )
    out["loadavg_ours_aug"] = load_average()
    out["ours_aug_images_per_s"] = round(
        ours_images_per_s(args.images, args.batch, mean, std, True, threads), 1
    )
    nb = float(out["notebook_images_per_s"])  # type: ignore[arg-type]
    out["ratio"] = round(float(out["ours_images_per_s"]) / nb, 2)  # type: ignore[arg-type]
    out["ratio_with_augmentation"] = round(float(out["ours_aug_images_per_s"]) / nb, 2)  # type: ignore[arg-type]
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
