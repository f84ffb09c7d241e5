"""The CIFAR-10 recipe's data: every layout it accepts decodes to the same tensors, splits never leak,
pickles cannot run code, the augmentation only translates and flips; the network's whitening layer and
test-time mirror."""

import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, cifar_source
from launcher.health import report as preflight_report
from launcher.health import splits
from launcher.recipe import contract as recipe
from launcher.recipe import steps

cifar = recipe.load(ROOT / "recipes" / "cifar.py")
PER_CLASS = {"train": 3, "test": 1}  # a miniature CIFAR-10: 30 training and 10 test images


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random images sorted by class, the order an image-folder tree is read in."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in PER_CLASS.items():
        labels = np.repeat(np.arange(10), n)
        out[split] = (rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8), labels)
    return out


def write_pickles(folder: Path, images) -> Path:
    folder.mkdir(parents=True)
    x, y = images["train"]
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        batch = {"data": x[part].reshape(len(part), -1), "labels": y[part].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    x, y = images["test"]
    (folder / "test_batch").write_bytes(pickle.dumps({"data": x.reshape(len(y), -1), "labels": y.tolist()}, 2))
    return folder


def write_folders(root: Path, images) -> Path:
    for split, (x, y) in images.items():
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            path = root / split / cifar.CLASSES[label] / f"{i:04d}.png"  # PNG: lossless, so pixels compare exactly
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(path)
    return root


def tar(source: Path, target: Path, arcname: str) -> Path:
    with tarfile.open(target, "w:gz") as t:
        t.add(source, arcname=arcname)
    return target


def assert_decoded(decoded: dict, images) -> None:
    for split, (x, y) in images.items():
        assert torch.equal(decoded[f"{split}_x"], torch.from_numpy(x))
        assert torch.equal(decoded[f"{split}_y"], torch.from_numpy(y))
        assert decoded[f"{split}_x"].dtype == torch.uint8


def test_every_layout_decodes_to_the_same_images(tmp_path, images):
    pickles = write_pickles(tmp_path / "p" / "cifar-10-batches-py", images)
    folders = write_folders(tmp_path / "f", images)
    (tmp_path / "a").mkdir()
    tar(folders, tmp_path / "a" / "cifar10-jpeg.tar.gz", ".")
    layouts = {
        "pickle folder": tmp_path / "p",
        "image folders": folders,
        "pickle archive": tar(pickles, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py"),
        "image archive in a folder": tmp_path / "a",
    }
    for name, where in layouts.items():
        source = cifar.find(where)
        assert source is not None, name
        assert_decoded(cifar.decode(source), images)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Exploit(), "labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        cifar.decode(folder)
    assert not marker.exists()


def test_splits_are_disjoint_and_the_validation_draw_is_fixed(tmp_path, images):
    write_folders(tmp_path / "data", images)
    hp = cifar.Hparams(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), val_size=7, download=False)
    cifar.prepare(hp)
    splits = cifar.data(hp)
    train, val, test = (set(map(bytes, s.tensors[0].flatten(1).numpy())) for s in (splits.train, splits.val,
                                                                                      splits.test))
    assert (len(train), len(val), len(test)) == (23, 7, 10)
    assert not (train & val) and not (train & test) and not (val & test)
    torch.manual_seed(123)  # the training seed must not move the validation split
    assert torch.equal(cifar.data(hp).val.tensors[0], splits.val.tensors[0])


def test_the_decoded_cache_is_built_once_per_source(tmp_path, images):
    data = write_folders(tmp_path / "data", images)
    hp = cifar.Hparams(data_dir=str(data), cache_dir=str(tmp_path / "cache"), download=False)
    first = cifar.cached(hp)
    built = first.stat().st_mtime_ns
    assert cifar.cached(hp) == first and first.stat().st_mtime_ns == built
    assert list(first.parent.iterdir()) == [first]  # no temporary left behind
    archive = tar(data, tmp_path / "cifar.tar.gz", ".")
    assert cifar.cached(cifar.Hparams(data_dir=str(archive), cache_dir=str(tmp_path / "cache"))) != first


def orientations(x: torch.Tensor, out: torch.Tensor) -> list[bool | None]:
    """For each augmented image, whether it is its original moved by up to 2 px (False) or its mirror image
    moved (True); None when it is neither."""
    padded = torch.nn.functional.pad(x.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    return [next((mirror for mirror, img in ((False, padded[i]), (True, padded[i].flip(2)))
                  for dy in range(5) for dx in range(5) if torch.equal(out[i], img[:, dy:dy + 32, dx:dx + 32])), None)
            for i in range(len(x))]


IMAGES = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_augment_only_translates_and_flips():
    y = torch.arange(64)
    out, labels = cifar.augment(IMAGES, y)
    assert out.shape == IMAGES.shape and out.dtype == torch.uint8 and torch.equal(labels, y)
    assert None not in orientations(IMAGES, out)
    assert sum(not torch.equal(a, b) for a, b in zip(out, IMAGES, strict=True)) > 50  # it does augment


def test_the_alternating_flip_shows_each_image_in_both_orientations_in_turn():
    """airbench's flip: each image is mirrored in every other epoch, half of them starting mirrored, on any rank
    (the coin is the image's own); a random flip repeats an orientation in about half the images."""
    torch.manual_seed(0)  # the translations' and the random flip's draws
    seen = [orientations(IMAGES, cifar.augment(IMAGES, None, epoch)[0]) for epoch in range(3)]
    assert all(a != b for a, b in zip(seen[0], seen[1], strict=True)) and seen[2] == seen[0]
    assert 20 < sum(seen[0]) < 44
    assert orientations(IMAGES[:8], cifar.augment(IMAGES[:8], None, 1)[0]) == seen[1][:8]  # whatever the batch
    random = [orientations(IMAGES, cifar.augment(IMAGES, None, epoch, "random")[0]) for epoch in range(2)]
    assert 20 < sum(a == b for a, b in zip(*random, strict=True)) < 44
    assert not any(orientations(IMAGES, cifar.augment(IMAGES, None, 0, "none")[0]))


def test_the_whitening_layer_decorrelates_the_training_patches():
    """Smooth images have strongly correlated neighbouring pixels; after the fitted 2×2 layer, the 12 filters'
    outputs over the same images have (almost) the identity covariance."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(200, 3, 8, 8, generator=g) * 255
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").round().to(torch.uint8)
    filters = cifar.whitening(images, eps=0.0)
    assert filters.shape == (24, 3, 2, 2) and torch.equal(filters[12:], -filters[:12])
    out = torch.nn.functional.conv2d(cifar.normalise(images).double(), filters[:12].double())
    covariance = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)


def net_of(tta: str = "translate", dirac: bool = True):
    return cifar.Net(4, cifar.whitening(torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)), dirac, tta)


def test_evaluation_sees_each_image_and_its_mirror_image():
    net = net_of("mirror")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x.flip(3)))  # training: one view
        net.eval()
        torch.testing.assert_close(net(x), net(x.flip(3)))


def test_evaluation_also_sees_each_image_moved_by_a_pixel():
    """tta translate: half the mirrored logits, half the mean of the mirrored logits of the image moved one pixel
    up and left and one down and right (its edges mirrored), airbench's test-time augmentation."""
    net = net_of().eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="reflect")
    views = [x.float(), padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    with torch.no_grad():
        mirrored = [(net.logits(cifar.normalise(v)) + net.logits(cifar.normalise(v.flip(3)))) / 2 for v in views]
        torch.testing.assert_close(net(x), mirrored[0] / 2 + (mirrored[1] + mirrored[2]) / 4)
        assert not torch.allclose(net(x), net_of("mirror").eval()(x))


def test_a_dirac_convolution_starts_as_the_identity_on_its_input_channels():
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(cifar.conv(4, 12, dirac=True)(x)[:, :4], x)
        assert not torch.allclose(cifar.conv(4, 12, dirac=False)(x)[:, :4], x)


def test_lookahead_averages_every_few_steps_ends_on_the_average_and_resumes_exactly():
    """The weights after each step, replayed by hand: plain SGD, then every 2nd step the average moves
    1 - 0.95^5 (step/total)^3 of the way to the weights, and the weights jump to it; after the last, the average."""
    total, grads = 6, [torch.tensor([float(i), -1.0]) for i in range(1, 7)]

    def run(opt_steps, w, opt=None):
        opt = opt or cifar.Lookahead([{"params": [w]}], total, 2, lr=0.1)
        for g in opt_steps:
            w.grad = g.clone()
            opt.step()
        return opt

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    run(grads, w)
    weights, average = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])
    for step, g in enumerate(grads, start=1):
        weights = weights - 0.1 * g
        if step % 2 == 0:
            average = average + (1 - 0.95**5 * (step / total) ** 3) * (weights - average)
            weights = average.clone()
    torch.testing.assert_close(w.data, weights)
    torch.testing.assert_close(w.data, average)
    half = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    state = run(grads[:3], half).state_dict()
    resumed = cifar.Lookahead([{"params": [half]}], total, 2, lr=0.1)
    resumed.load_state_dict(state)
    run(grads[3:], half, resumed)
    torch.testing.assert_close(half.data, w.data, rtol=0, atol=0)


def test_the_whitening_bias_stops_training_after_its_epochs():
    hp = cifar.Hparams(epochs=10, whiten_bias_epochs=3)
    opt, schedule = cifar.optimizer(net_of(), hp, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    assert all(lr[2] == lr[0] > 0 for lr in lrs[:30]) and all(lr[2] == 0 < lr[0] for lr in lrs[30:])
    assert isinstance(opt, cifar.Lookahead)


SAME_AS_AIRBENCH = """
import sys, torch
sys.path[:0] = sys.argv[1:]
import cifar, airbench_ref
airbench_ref.cpu_substitutes()
import airbench
torch.manual_seed(0)
theirs, ours = airbench.make_net94(), cifar.Net(64, torch.randn(24, 3, 2, 2))
names = list(ours.state_dict())
ours.load_state_dict(dict(zip(names, theirs.state_dict().values(), strict=True)))
x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
normalised = (x / 255 - torch.tensor(cifar.MEAN).view(1, 3, 1, 1)) / torch.tensor(cifar.STD).view(1, 3, 1, 1)
for mode in ("train", "eval"):
    for net in (theirs, ours):
        net.train(mode == "train")
    ours.tta = "none"
    expected = theirs(normalised)  # once each: in training, a forward also moves batch norm's running statistics
    print(mode, (expected - ours(x)).abs().max().item() / expected.abs().max().item())
"""


def test_the_network_is_airbench94s():
    """Given airbench94's own network's weights (PyPI's airbench, run on the CPU), the recipe's network computes the
    same logits from the raw images, training and evaluating: layer for layer the published design."""
    done = subprocess.run([sys.executable, "-c", SAME_AS_AIRBENCH, ROOT / "recipes", ROOT / "benchmarks"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    gaps = dict(line.split() for line in done.stdout.splitlines())
    assert set(gaps) == {"train", "eval"} and all(float(g) < 1e-5 for g in gaps.values()), gaps


def test_a_second_jpeg_encoding_acts_afresh_only_on_a_moved_grid(tmp_path, images):
    """benchmarks/jpeg.py: encoding a JPEG image again on its own grid changes next to nothing, on a grid moved by 3 px
    it loses as a first encoding does; its archive decodes to the same labels and the encoded pixels."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jpeg_bench", ROOT / "benchmarks" / "jpeg.py")
    jpeg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jpeg)
    ramp = np.linspace(20, 140, 32)
    smooth = (ramp[None, :, None] + ramp[None, None, :] / 4 + np.arange(3)[:, None, None] * 20).astype(np.uint8)
    first = jpeg.encode(smooth + np.random.default_rng(0).integers(0, 40, smooth.shape, dtype=np.uint8), 75, 0)

    def squared_error(shift):
        return ((jpeg.encode(first, 75, shift).astype(float) - first) ** 2).mean()

    assert squared_error(0) < 1 < 10 < squared_error(3)  # 10: PSNR 38 dB

    source = write_pickles(tmp_path / "pickles", images)
    out = tmp_path / "again.tar"
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "jpeg.py", "--data", source, "--out", out,
                           "--cache-dir", tmp_path / "cache"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "40 images at quality 75, grid moved 3 px" in done.stdout
    decoded = cifar.decode(out)
    for split, (x, y) in images.items():
        assert np.array_equal(decoded[f"{split}_y"].numpy(), y)
        assert np.array_equal(decoded[f"{split}_x"].numpy(), np.stack([jpeg.encode(img, 75, 3) for img in x]))


@pytest.mark.skipif(cifar_source() is None, reason="CIFAR10_DIR does not point at CIFAR-10 (.ci/run sets it to "
                                                   "../shared/data, which holds cifar10-jpeg.tar.gz)")
def test_the_real_splits_hold_five_near_duplicates_and_no_exact_copy(cifar_cache, capsys):
    """The pre-flight's search on the real CIFAR-10 (JPEG) splits: each pair below was looked at, and is the same
    photograph (one ship brighter); published audits find more (about 3 % of the test images), as shifted, cropped
    or rescaled copies, which a search by pixels cannot see."""
    hp = cifar.Hparams(data_dir=str(cifar_source()), cache_dir=str(cifar_cache))
    parts = steps.build(cifar, hp, 0, torch.device("cpu"), 0, True)
    report = preflight_report.Report()
    splits.leakage({"train": parts.train, **parts.evals}, 0, report)
    with capsys.disabled():
        print(f"\nCIFAR-10 near-duplicates between splits: {report.values['near_duplicates']}")
    assert report.values["shared_samples"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert {pair: (v["count"], v["examples"]) for pair, v in report.values["near_duplicates"].items()} == {
        "train/val": (2, [(396, 15824), (3472, 20699)]), "train/test": (2, [(505, 25085), (3065, 14201)]),
        "val/test": (1, [(5739, 1075)])}
    assert report.warnings == []
