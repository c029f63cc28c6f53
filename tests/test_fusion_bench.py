"""autoalign as a FusionBench method (issue 19): the Python API, the `fusion_bench` command, the
Hydra search-path plug-in and autoalign's own errors. Skipped without `pip install ".[fusion-bench]"`
(`make test-fusion-bench` installs it in its own virtual environment)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fusion_bench")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from omegaconf import OmegaConf  # noqa: E402  (after the skip: comes with fusion_bench)

import autoalign  # noqa: E402
from autoalign.examples.demo import make_mlp, train_model  # noqa: E402
from autoalign.integrations import fusion_bench as fb  # noqa: E402
from autoalign.integrations.checkpoints import load_checkpoint_model  # noqa: E402
from autoalign.integrations.datasets import digits  # noqa: E402

CONFIG = pathlib.Path(autoalign.__file__).parent / "integrations" / "fusion_bench_config"
BIN = pathlib.Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[pathlib.Path]:
    """Two MLPs trained on digits' train split from seeds 0 and 1 (about a second each)."""
    out = tmp_path_factory.mktemp("ckpt")
    loader = torch.utils.data.DataLoader(digits("train"), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = train_model(make_mlp(64, [64, 64], 10), loader, epochs=10, lr=1e-2, device=torch.device("cpu"))
        paths.append(out / f"seed{seed}.pt")
        torch.save({"state_dict": model.state_dict(), "arch": "mlp"}, paths[-1])
    return paths


def _pool(paths: list[pathlib.Path]) -> fb.AutoAlignModelPool:
    cfg = OmegaConf.load(CONFIG / "modelpool" / "autoalign" / "digits_mlp.yaml")
    for name, path in zip(cfg.models, paths):
        cfg.models[name].path = str(path)
    return fb.AutoAlignModelPool(models=cfg.models, train_datasets=cfg.train_datasets)


def test_every_builtin_aligner_has_a_method_config():
    names = sorted(p.stem for p in (CONFIG / "method" / "autoalign").glob("*.yaml"))
    assert names == sorted([*autoalign.list_aligners(), "auto"])
    for name in names:
        cfg = OmegaConf.load(CONFIG / "method" / "autoalign" / f"{name}.yaml")
        keys = set(cfg) - {"_target_", "dataset", "batch_size", "num_workers", "evaluate_inputs"}
        assert keys <= set(autoalign.options.MERGE_ARGUMENTS) | {"aligner_options"}, keys
        algo = fb.AutoAlignAlgorithm(**{k: v for k, v in cfg.items() if k != "_target_"})
        assert algo.merge_options.aligner == name


def test_python_api_aligned_merge_beats_plain_averaging(checkpoints):
    taskpool = fb.AccuracyTaskPool(test_dataset=digits("test"))
    acc = {}
    for aligner in ("cca", "permutation", "identity"):  # identity: plain averaging of the weights
        out = fb.AutoAlignAlgorithm(aligner=aligner, batch_size=128, num_batches=4).run(_pool(checkpoints))
        acc[aligner] = taskpool.evaluate(out["merged"])["accuracy"]
        assert set(out) == {"merged", "model/seed0", "model/seed1", "ensemble", "autoalign"}
        assert out["autoalign"]["options"]["aligner"] == aligner
        assert out["autoalign"]["options"]["num_batches"] == 4
    base = [taskpool.evaluate(load_checkpoint_model("autoalign.examples.demo.make_mlp", p, in_features=64, hidden=[64, 64],
                                                    num_classes=10))["accuracy"] for p in checkpoints]
    assert min(base) > 0.9, base
    assert acc["cca"] > acc["identity"] + 0.1, acc
    assert acc["permutation"] > acc["identity"] + 0.1, acc


def _fusion_bench(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fusion_bench"), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_writes_the_report_next_to_the_task_pool_metrics(checkpoints, tmp_path):
    report = tmp_path / "report.json"
    proc = _fusion_bench([
        "method=autoalign/cca", "modelpool=autoalign/digits_mlp", "taskpool=autoalign/digits_accuracy",
        f"modelpool.models.seed0.path={checkpoints[0]}", f"modelpool.models.seed1.path={checkpoints[1]}",
        "+method.aligner_options.ridge=0.05", f"report_save_path={report}", f"merged_model_save_path={tmp_path / 'merged.pt'}",
    ], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert set(data) == {"merged", "model/seed0", "model/seed1", "ensemble", "autoalign"}
    assert data["merged"]["accuracy"] > 0.85 and data["merged"]["num_samples"] == 449
    meta = data["autoalign"]
    assert meta["aligner"].startswith("CCAAligner(ridge=0.05")
    assert list(meta["points"]) == ["1", "3"] and meta["table"].startswith("point")
    assert {"discover", "statistics", "solve", "apply"} <= set(meta["timings"])
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert set(merged) == set(make_mlp(64, [64, 64], 10).state_dict())


def test_cli_search_path_lists_the_plug_in(tmp_path):
    proc = _fusion_bench(["--info", "searchpath"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if "| autoalign" in ln)
    assert str(CONFIG) in line


def test_cli_bad_option_gives_autoalign_s_error(checkpoints, tmp_path):
    proc = _fusion_bench([
        "method=autoalign/cca", "method.scheme=tree", "modelpool=autoalign/digits_mlp", "taskpool=autoalign/digits_accuracy",
        f"modelpool.models.seed0.path={checkpoints[0]}", f"modelpool.models.seed1.path={checkpoints[1]}",
    ], tmp_path)
    assert proc.returncode != 0
    assert "autoalign.errors.OptionError: scheme must be one of ('all_to_one', 'iterative', 'hierarchical'), got 'tree'" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("options", "named"),
    [({"aligner": "ccaa"}, "aligner"), ({"aligner_options": {"rdge": 0.1}}, "rdge"), ({"repair": "fix"}, "repair"),
     ({"batch_size": 0}, "batch_size"), ({"reference": "worst"}, "reference"), ({"averaging": "max"}, "averaging")],
)
def test_bad_options_raise_option_error_naming_them(options, named):
    with pytest.raises(autoalign.OptionError, match=named):
        fb.AutoAlignAlgorithm(**{"aligner": "cca", **options})


def test_checkpoint_loader_targets(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "r.pt")
    again = load_checkpoint_model("resnet18", tmp_path / "r.pt", num_classes=3)
    assert torch.equal(again.fc.weight, net.fc.weight)
    assert load_checkpoint_model("torchvision:resnet18", None, num_classes=3, zero_init_residual=True).fc.out_features == 3
    with pytest.raises(autoalign.OptionError, match="resnet81"):
        load_checkpoint_model("resnet81", tmp_path / "r.pt")
    with pytest.raises(autoalign.OptionError, match="does not fit"):
        load_checkpoint_model("resnet18", tmp_path / "r.pt", num_classes=4)


def test_import_autoalign_does_not_import_fusion_bench_and_the_plug_in_is_light():
    code = (
        "import sys, autoalign, autoalign.integrations; assert 'fusion_bench' not in sys.modules, 'fusion_bench'\n"
        "import subprocess\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
    light = "import sys, hydra_plugins.autoalign_fusion_bench as p; assert p.config_folder(); assert 'torch' not in sys.modules and 'autoalign' not in sys.modules"
    subprocess.run([sys.executable, "-c", light], check=True, env=ENV)


def test_calibration_loader_reads_the_pool_in_a_fixed_random_order():
    """An image folder lists its images class by class: single-class calibration batches put the
    BatchNorm statistics, and the merged resnet18, at chance."""
    from fusion_bench.modelpool import BaseModelPool

    data = torch.utils.data.TensorDataset(torch.arange(64.0), torch.arange(64) // 16)  # class by class
    pool = BaseModelPool({"a": torch.nn.Linear(1, 1)}, train_datasets={"calibration": data})
    batches = [y.tolist() for _, y in fb.AutoAlignAlgorithm(batch_size=16).calibration_loader(pool)]
    assert all(len(set(b)) > 1 for b in batches) and sorted(sum(batches, [])) == sorted(data.tensors[1].tolist())
    assert batches == [y.tolist() for _, y in fb.AutoAlignAlgorithm(batch_size=16).calibration_loader(pool)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(data.tensors[0], data.tensors[1]))

    pool = BaseModelPool({"a": torch.nn.Linear(1, 1)}, train_datasets={"calibration": Stream()})
    assert [y.tolist() for _, y in fb.AutoAlignAlgorithm(batch_size=16).calibration_loader(pool)][0] == [0] * 16  # as it comes


def _digits_image_folder(root: pathlib.Path, size: int = 16) -> None:
    """scikit-learn's digits (1,797 8x8 images, 10 classes) as an image folder of RGB PNGs
    upscaled to ``size`` pixels: 450 in ``val``, the other 1,347 in ``train``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    for i, k in enumerate(order):
        folder = root / ("val" if i < 450 else "train") / f"digit{y[k]}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((x[k].reshape(8, 8) / 16 * 255).astype("uint8")).convert("RGB")
        img.resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")


def _train_resnet18(data: torch.utils.data.Dataset, seed: int, epochs: int = 2) -> torch.nn.Module:
    """A torchvision resnet18 trained from ``seed`` (SGD, one-cycle schedule peaking at 0.02,
    batches of 32) on one thread, so that the checkpoints are the same wherever the suite runs
    (tests/conftest.py sets two), then its BatchNorm statistics re-estimated."""
    import torchvision

    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        net = torchvision.models.resnet18(num_classes=10)
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=epochs * ((len(y) + 31) // 32), pct_start=0.25)
        g = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), 32):
                idx = order[i : i + 32]
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        return autoalign.reset_bn(net, [(x[order[i : i + 64]], y[order[i : i + 64]]) for i in range(0, len(y), 64)]).eval()
    finally:
        torch.set_num_threads(threads)


def test_cli_torchvision_checkpoints_and_image_folder(tmp_path):
    """The example torchvision pool and image-folder task pool end to end, on models that learnt
    something: two resnet18s trained from seeds 0 and 1 on scikit-learn's digits written as an
    image folder (16 x 16 pixels, 2 epochs), merged with CCA by the ``fusion_bench`` command,
    against plain averaging of the same checkpoints (``identity``). Chance is 10 %.

    Measured with this recipe over eight seed pairs, (0, 1) ... (14, 15) (torch 2.14.1, one CPU
    thread; accuracy on the 450 val images): base models 88-95 %, ensemble 92-96 %, CCA 75-89 %,
    permutation 66-85 %, plain averaging 26-41 %; CCA ahead of plain averaging by 38 to 56
    points, permutation by 32 to 51. This pair: 91.3 / 88.7 %, CCA 80.9 %, plain averaging 26.7 %."""
    from autoalign.integrations.datasets import image_folder

    _digits_image_folder(tmp_path)
    train = image_folder(str(tmp_path / "train"), image_size=16)
    for seed in (0, 1):
        torch.save(_train_resnet18(train, seed).state_dict(), tmp_path / f"seed{seed}.pt")
    report = tmp_path / "report.json"
    proc = _fusion_bench([
        "method=autoalign/cca", "modelpool=autoalign/torchvision_checkpoints", "taskpool=autoalign/image_folder_accuracy",
        *(f"modelpool.models.seed{s}.path={tmp_path / f'seed{s}.pt'}" for s in (0, 1)),
        f"modelpool.train_datasets.calibration.root={tmp_path / 'train'}", "modelpool.train_datasets.calibration.image_size=16",
        f"taskpool.test_dataset.root={tmp_path / 'val'}", "taskpool.test_dataset.image_size=16", f"report_save_path={report}",
    ], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    acc = {k: v["accuracy"] for k, v in data.items() if k != "autoalign"}
    assert data["merged"]["num_samples"] == 450
    assert min(acc["model/seed0"], acc["model/seed1"]) >= 0.85 and acc["ensemble"] >= 0.9, acc  # trained
    assert "layer4.1.conv1" in data["autoalign"]["points"] and data["autoalign"]["options"]["aligner"] == "cca"
    cfg = OmegaConf.load(CONFIG / "modelpool" / "autoalign" / "torchvision_checkpoints.yaml")
    for s in (0, 1):
        cfg.models[f"seed{s}"].path = str(tmp_path / f"seed{s}.pt")
    pool = fb.AutoAlignModelPool(models=cfg.models, train_datasets={"calibration": train})
    averaged = fb.AutoAlignAlgorithm(aligner="identity", evaluate_inputs=False).run(pool)["merged"]
    acc["identity"] = fb.AccuracyTaskPool(test_dataset=image_folder(str(tmp_path / "val"), image_size=16)).evaluate(averaged)["accuracy"]
    assert acc["merged"] >= 0.65 and acc["merged"] >= acc["identity"] + 0.25, acc
