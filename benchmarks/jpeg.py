"""CIFAR-10 encoded once more as JPEG: a copy of the recipe's images to train and test on, to measure what the
encoding costs in accuracy.

    python benchmarks/jpeg.py --data ../shared/data/cifar10-jpeg.tar.gz --quality 75 --out /tmp/q75.tar
    CIFAR10_DIR=/tmp/q75.tar python benchmarks/accuracy.py --seeds 1 --cpu --procs 2

The shared images are already JPEG (quality 75, 4:2:0 chroma), and the originals cannot be had here. Encoding
them again with the same settings on the same grid changes next to nothing (what quantisation removes is gone
already). With --shift S, each image is rolled S pixels down and right before the encoding and back after,
so that the 8×8 blocks and the 2×2 chroma cells fall across the old ones: the encoding acts afresh, as the first
one did on the originals, and the accuracy it costs is what one such encoding costs (the first, on the
sharper originals, most likely cost more). Writes the decoded result losslessly, an image-folder tree
(train/<class>/NNNNN.png, test/...) in an uncompressed .tar, which recipes/cifar.py reads as it is, and prints
how far the new pixels are from the old (PSNR, over all images).
"""

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def encode(image: np.ndarray, quality: int, shift: int) -> np.ndarray:
    """The image (3, 32, 32) through JPEG, its grid moved by `shift` pixels (rolled before, rolled back after)."""
    rolled = np.roll(image.transpose(1, 2, 0), (shift, shift), axis=(0, 1))
    lossy = io.BytesIO()
    Image.fromarray(rolled).save(lossy, format="JPEG", quality=quality, subsampling="4:2:0")
    return np.roll(np.asarray(Image.open(lossy).convert("RGB")), (-shift, -shift), axis=(0, 1)).transpose(2, 0, 1)


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-10 as recipes/cifar.py reads it")
    ap.add_argument("--quality", type=int, default=75)
    ap.add_argument("--shift", type=int, default=3, help="pixels the JPEG grid moves; 0 = the old grid")
    ap.add_argument("--out", type=Path, required=True, help="the .tar to write")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/launcher"),
                    help="where the recipe caches the decoded images (its default)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "recipes"))
    import cifar

    hp = cifar.Hparams(data_dir=str(args.data), cache_dir=str(args.cache_dir), download=False)
    arrays = torch.load(cifar.cached(hp), weights_only=True)
    start, squared, pixels = time.time(), 0.0, 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w") as tar:
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_x"].numpy(), arrays[f"{split}_y"].tolist()
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                again = encode(image, args.quality, args.shift)
                raw = png(again)
                squared += float(((again.astype(np.float64) - image) ** 2).sum())
                pixels += image.size
                member = tarfile.TarInfo(f"{split}/{cifar.CLASSES[label]}/{i:05d}.png")
                member.size = len(raw)
                tar.addfile(member, io.BytesIO(raw))
    psnr = 10 * np.log10(255**2 / (squared / pixels))
    size = args.out.stat().st_size / 2**20
    print(f"{pixels // 3072} images at quality {args.quality}, grid moved {args.shift} px → {args.out} "
          f"({size:.1f} MiB, {time.time() - start:.0f} s); PSNR against the source {psnr:.2f} dB")


if __name__ == "__main__":
    main()
