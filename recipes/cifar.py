"""CIFAR-10 with the speed-record network and schedule (airbench94's design): 94 % in 10 epochs on the original
images; on the shared JPEG copy 90.8 %, airbench's own trainer there 90.6 % (docs/recipes.md, "How good it is").

    launch recipes/cifar.py --gpus 8 --precision bf16
    launch recipes/cifar.py --debug --cpu --width 16

Data: --data-dir (default $CIFAR10_DIR, else ~/.cache/cifar10) holding CIFAR-10's own
python-pickle folder (cifar-10-batches-py/), an image-folder tree (train/<class>/*.jpg,
test/<class>/*.jpg), or a .tar/.tar.gz archive of either. When nothing is found and
--download is on, the official archive is fetched (MD5 checked). The decoded images
are cached once per node as one uint8 tensor file, so later runs start in a blink.
The launcher keeps that tensor on the GPU when it fits and cuts batches there;
flip and translation run as batched tensor ops, normalisation inside the model.
"""

import functools
import hashlib
import io
import os
import pickle
import re
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from launcher import Splits, progress

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Hparams:
    data_dir: str = field(default_factory=lambda: os.environ.get("CIFAR10_DIR", "~/.cache/cifar10"),
                          metadata={"help": "CIFAR-10 folder or archive ($CIFAR10_DIR)"})
    download: bool = field(default=True, metadata={"help": "fetch the official archive when none is found"})
    cache_dir: str = "~/.cache/launcher"
    val_size: int = field(default=5000, metadata={"help": "images held out of train for validation"})
    epochs: int = 10
    batch_size: int = 1024  # global: samples per optimizer step, however many processes share them
    lr: float = 1.5  # for the weights; per step they also shrink by lr × weight_decay = 0.2 % at the peak
    bias_lr: float = field(default=64.0, metadata={"help": "batch-norm shifts learn this many times faster"})
    momentum: float = 0.85
    weight_decay: float = 1.33e-3
    warmup: float = field(default=0.23, metadata={"help": "fraction of the steps the rate rises, from 0.2 × peak"})
    final_lr: float = 0.07  # × the peak, at the last step
    label_smoothing: float = 0.2
    width: int = field(default=64, metadata={"help": "channels of the first conv group; the others have 4 ×"})
    dirac: bool = field(default=True, metadata={"help": "each conv starts as the identity on its input channels"})
    lookahead: int = field(default=5, metadata={"help": "every N steps the weights move to their running average; "
                                                        "0 = never"})
    whiten_bias_epochs: float = field(default=3, metadata={"help": "the whitening layer's bias trains this long"})
    flip: Literal["alternate", "random", "none"] = field(
        default="alternate", metadata={"help": "mirror each training image in every other epoch, or at random"})
    tta: Literal["none", "mirror", "translate"] = field(
        default="translate", metadata={"help": "evaluation averages each image with its mirror image (and both "
                                               "moved by a pixel)"})

    def __post_init__(self):
        if self.val_size < 0:
            raise ValueError(f"--val-size must be at least 0, not {self.val_size}")


best = ("val/acc", "max")  # the evaluation that picks checkpoints/best
classes = CLASSES  # the names of the labels 0-9, for the test split's confusion matrix


# ---------------------------------------------------------------- data


def prepare(hp: Hparams) -> None:
    """Once per node, before any process starts: find or download the data and cache it decoded."""
    cached(hp)


def splits(hp: Hparams) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of train, val and test. Validation is carved out of train by a fixed draw: the same
    whatever the training seed."""
    images = torch.load(cached(hp), weights_only=True)
    x, y = images["train_x"], images["train_y"]
    if hp.val_size >= len(y):
        raise ValueError(f"--val-size {hp.val_size} leaves nothing of the {len(y)} training images to train on")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    val, train = order[: hp.val_size], order[hp.val_size :]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (images["test_x"], images["test_y"])}


def data(hp: Hparams) -> Splits:
    parts = splits(hp)
    return Splits(train=TensorDataset(*parts["train"]), val=TensorDataset(*parts["val"]) if hp.val_size else None,
                  test=TensorDataset(*parts["test"]), augment=functools.partial(augment, flip=hp.flip))


def mirrored(x: torch.Tensor, epoch: int, flip: str) -> torch.Tensor:
    """Which images to mirror, (N,) bool. "alternate" mirrors each image in every other epoch, so that each
    orientation is seen in turn rather than by chance; which half starts mirrored is the parity of an image's
    pixel sum, a fair coin that the image carries with it to whichever rank and step it reaches."""
    if flip == "alternate":
        return (x.sum((1, 2, 3)) + epoch) % 2 == 1
    if flip == "random":
        return torch.rand(len(x), device=x.device) < 0.5
    return torch.zeros(len(x), dtype=torch.bool, device=x.device)


def augment(x: torch.Tensor, y: torch.Tensor, epoch: int = 0, flip: str = "alternate"):
    """Horizontal flip (`mirrored`), and a translation by up to 2 px with mirrored edges: batched, on the device."""
    n, device = len(x), x.device
    x = torch.where(mirrored(x, epoch, flip)[:, None, None, None], x.flip(3), x)
    moved = torch.randint(-2, 3, (2, n, 1), device=device) + torch.arange(32, device=device)
    rows, cols = (31 - (31 - moved.abs()).abs()).unbind(0)  # (n, 32) each, mirrored at both edges
    x = x[torch.arange(n, device=device)[:, None, None, None], torch.arange(3, device=device)[:, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    return x, y


def cached(hp: Hparams) -> Path:
    """The decoded-tensor cache for this data source, built on first use."""
    data_dir = Path(hp.data_dir).expanduser()
    source = find(data_dir)
    if source is None:
        if not hp.download:
            raise FileNotFoundError(f"no CIFAR-10 in {data_dir} (pickle folder, train/ + test/ image folders, or an "
                                    "archive of either); set --data-dir or CIFAR10_DIR, or allow --download")
        source = download(data_dir)
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    path = Path(hp.cache_dir).expanduser() / f"cifar10-{key}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(decode(source), tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return path


def find(data_dir: Path) -> Path | None:
    if data_dir.is_file():
        return data_dir
    if not data_dir.is_dir():
        return None
    for folder in (data_dir / "cifar-10-batches-py", data_dir):
        if (folder / "data_batch_1").is_file():
            return folder
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return data_dir
    archives = sorted(p for p in data_dir.iterdir() if re.search(r"cifar.*\.(tar|tar\.gz|tgz)$", p.name, re.I))
    return archives[0] if archives else None


def download(data_dir: Path) -> Path:
    target = data_dir / "cifar-10-python.tar.gz"
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp, digest = target.with_name(target.name + ".part"), hashlib.md5()
    try:
        with urllib.request.urlopen(URL, timeout=30) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"no CIFAR-10 in {data_dir} and the download from {URL} failed ({e}); "
                                "set --data-dir or CIFAR10_DIR to a copy") from None
    if digest.hexdigest() != MD5:
        tmp.unlink()
        raise ValueError(f"downloaded {URL} has MD5 {digest.hexdigest()}, expected {MD5}")
    os.replace(tmp, target)
    return target


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles of numpy arrays: allow exactly that, never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")
        return super().find_class(module, name)


def _batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()  # written by Python 2: latin1 keeps the bytes
    return np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)


def _image(raw: bytes, name: str) -> np.ndarray:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    if img.shape != (32, 32, 3):
        raise ValueError(f"{name}: {img.shape[1]}×{img.shape[0]} image, CIFAR-10 images are 32×32")
    return img.transpose(2, 0, 1)


def _sort(files, batches: dict, images: dict) -> None:
    """Read the (relative path, read function) pairs that are CIFAR-10 batches or class-folder images."""
    for relative, read in files:
        parts = relative.split("/")
        if re.fullmatch(r"data_batch_[1-5]|test_batch", parts[-1]):
            batches[parts[-1]] = read()
        elif (len(parts) >= 3 and parts[-3] in ("train", "test") and parts[-2] in CLASSES
              and re.search(r"\.(png|jpe?g|bmp)$", parts[-1], re.I)):
            images[(parts[-3], CLASSES.index(parts[-2]), parts[-1])] = read()


def decode(source: Path) -> dict[str, torch.Tensor]:
    """Every image of the source as uint8 (N, 3, 32, 32) plus int64 labels, for train and test."""
    batches: dict[str, bytes] = {}  # pickle layout: file name → bytes
    images: dict[tuple, bytes] = {}  # image folders: (split, class index, file name) → bytes
    if source.is_file():
        with tarfile.open(source, "r:*") as tar:
            files = ((m.name, tar.extractfile(m).read) for m in progress(tar, f"reading {source.name}", unit="file")
                     if m.isfile())
            _sort(files, batches, images)
    else:
        _sort(((p.relative_to(source).as_posix(), p.read_bytes) for p in sorted(source.rglob("*")) if p.is_file()),
              batches, images)

    if len(batches) == 6:
        train = [_batch(batches[f"data_batch_{i}"]) for i in range(1, 6)]
        test = _batch(batches["test_batch"])
        xs, ys = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
        arrays = {"train": (xs, ys), "test": test}
    elif images:
        arrays = {}
        for split in ("train", "test"):
            keys = sorted(k for k in images if k[0] == split)
            if not keys:
                raise ValueError(f"{source}: no {split}/<class>/ images")
            arrays[split] = (np.stack([_image(images[k], "/".join(map(str, k)))
                                       for k in progress(keys, f"decoding {split}", unit="image")]),
                             np.array([k[1] for k in keys], dtype=np.int64))
    else:
        raise ValueError(f"{source} holds neither CIFAR-10's pickle batches nor train/<class>/, test/<class>/ images")
    return {f"{split}_{kind}": torch.from_numpy(np.ascontiguousarray(a))
            for split, (x, y) in arrays.items() for kind, a in (("x", x), ("y", y))}


# ---------------------------------------------------------------- model and training


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to zero mean and unit scale per channel, on whatever device they are."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


def whitening(images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """2×2 filters that decorrelate the images' pixel patches: the patch covariance's eigenvectors, each scaled
    by 1/√eigenvalue and paired with its negation (the GELU after it keeps both signs)."""
    patches = normalise(images).unfold(2, 2, 1).unfold(3, 2, 1)  # N, 3, 31, 31, 2, 2
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    eigenvalues, vectors = torch.linalg.eigh(torch.cov(patches.T))
    filters = (vectors.T / (eigenvalues + eps).sqrt()[:, None]).reshape(12, 3, 2, 2).float()
    return torch.cat([filters, -filters])


def batch_norm(c: int) -> nn.BatchNorm2d:
    """Fast-moving statistics, and no learned gain: the shift alone trains (a gain would only fight the
    weight decay of the convolution before it)."""
    bn = nn.BatchNorm2d(c, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def conv(c_in: int, c_out: int, dirac: bool) -> nn.Conv2d:
    """A 3×3 convolution; with `dirac`, its first c_in filters start as the identity (each passes one input
    channel through), so that the deep network starts near a shallow one."""
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    if dirac:
        nn.init.dirac_(layer.weight.data[:c_in])
    return layer


def conv_group(c_in: int, c_out: int, dirac: bool) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out, dirac), nn.MaxPool2d(2), batch_norm(c_out), nn.GELU(),
                         conv(c_out, c_out, dirac), batch_norm(c_out), nn.GELU())


class Net(nn.Module):
    """The speed-record design (Page's ResNet-9 as refined in Keller Jordan's airbench): a frozen whitening
    layer fitted to the training images, three conv groups that halve the resolution, a max-pool head, a
    cooled softmax. At evaluation (`tta`), the logits of each image and its mirror image are averaged, and with
    "translate" half of them with the mean of both moved by a pixel up and left, and down and right."""

    def __init__(self, width: int, whiten: torch.Tensor, dirac: bool = True, tta: str = "translate"):
        super().__init__()
        self.tta = tta
        self.whiten = nn.Conv2d(3, len(whiten), 2)
        self.whiten.weight = nn.Parameter(whiten, requires_grad=False)  # fitted, never trained; its bias trains
        self.layers = nn.Sequential(
            nn.GELU(), conv_group(len(whiten), width, dirac), conv_group(width, 4 * width, dirac),
            conv_group(4 * width, 4 * width, dirac), nn.MaxPool2d(3), nn.Flatten(),
            nn.Linear(4 * width, 10, bias=False),
        )

    def logits(self, x):
        return self.layers(self.whiten(x)) / 9  # a cooler softmax at initialisation trains faster

    def mirrored(self, x):
        return (self.logits(x) + self.logits(x.flip(3))) / 2

    def forward(self, x):
        x = normalise(x).contiguous(memory_format=torch.channels_last)
        if self.training or self.tta == "none":
            return self.logits(x)
        if self.tta == "mirror":
            return self.mirrored(x)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        moved = (self.mirrored(padded[:, :, :32, :32]) + self.mirrored(padded[:, :, 2:, 2:])) / 2
        return (self.mirrored(x) + moved) / 2


def model(hp: Hparams) -> nn.Module:
    train_x = splits(hp)["train"][0]
    return Net(hp.width, whitening(train_x[:2000]), hp.dirac, hp.tta)


def loss(hp: Hparams):
    return nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)


def metrics(hp: Hparams) -> dict:
    return {"acc": MulticlassAccuracy(num_classes=10, average="micro")}


class Lookahead(torch.optim.SGD):
    """SGD whose weights are pulled toward their running average every `every` steps, then set to it: the average
    moves by 1 - 0.95^5·(step/total)³ of the way to the weights, so that it follows them closely at first and
    smooths the last steps' noise; after the last step the weights are the average. Its state (the average and the
    step count) is the optimizer's, which checkpoints hold."""

    def __init__(self, groups: list, total_steps: int, every: int, **options):
        super().__init__(groups, **options)
        self.total, self.every = total_steps, every

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:  # the average starts at the weights before the first step
            self.state[p].setdefault("average", p.detach().clone())
        loss = super().step(closure)
        for p in params:
            state = self.state[p]
            state["steps"] = done = state.get("steps", 0) + 1
            if done % self.every == 0:
                state["average"].lerp_(p, 1 - 0.95**5 * (done / self.total) ** 3)
                p.copy_(state["average"])
            if done == self.total:
                p.copy_(state["average"])
        return loss


def optimizer(model: nn.Module, hp: Hparams, total_steps: int):
    """Nesterov SGD (with `lookahead`); the normalisation shifts learn `bias_lr` times faster with weight decay as
    weak, so that every parameter decays by the same fraction per step. The rate rises for `warmup` of the steps,
    then falls linearly to `final_lr` of its peak; the whitening layer's bias stops after `whiten_bias_epochs`."""
    shifts = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    whiten = [model.whiten.bias]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not s for s in shifts + whiten)]
    groups = [{"params": others, "lr": hp.lr, "weight_decay": hp.weight_decay},
              {"params": shifts, "lr": hp.lr * hp.bias_lr, "weight_decay": hp.weight_decay / hp.bias_lr},
              {"params": whiten, "lr": hp.lr, "weight_decay": hp.weight_decay}]
    options = {"momentum": hp.momentum, "nesterov": True}
    opt = Lookahead(groups, total_steps, hp.lookahead, **options) if hp.lookahead else \
        torch.optim.SGD(groups, **options)
    warm = max(1, round(hp.warmup * total_steps))
    frozen_at = round(hp.whiten_bias_epochs / hp.epochs * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return 0.2 + 0.8 * step / warm
        return 1 - (1 - hp.final_lr) * (step - warm) / max(1, total_steps - warm)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [factor, factor, lambda step: factor(step) * (step < frozen_at)])
