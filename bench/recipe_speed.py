"""Study 1's recipe by cxrkit vs a plain PyTorch loop written the way most users write it, on the same split.

The recipe is ``recipes/mobilenetv2-3class.yaml``: MobileNetV2 with ImageNet weights, normal / bacterial / viral,
``--frozen-epochs`` (10) epochs on a frozen base with a new head, then ``--finetune-epochs`` (20) epochs with the
top 14 Keras layers unfrozen at lr 1e-5, Adam, batch 32. Early stopping and the restoring of a stage's best
weights are off on both sides, so both run the whole schedule and are tested with their final weights.

The reference loop is what a typical notebook does: a Dataset that opens each JPEG with PIL every epoch,
torchvision transforms, fp32, the model in train mode, a full forward pass over every image in every epoch,
and validation after every epoch. It trains the same parameters (1,043,843 in stage 2; checked) on the same
train / val / test split, which comes from the cxrkit run.

Each side runs in its own child process, one after the other, so its peak memory is its own. The children are
this script with ``--side``. Printed: wall time per stage and in total, the speed-up, peak resident memory, and
test accuracy and macro AUC of both.

    python bench/recipe_speed.py --data ../shared/data/chest_xray --weights ../shared/weights
    python bench/recipe_speed.py --frozen-epochs 1 --finetune-epochs 1      # a quick check of the set-up
    python bench/recipe_speed.py --only cxrkit                               # cxrkit's side alone (no ratio)

cxrkit starts with an empty decoded-image cache (in a temporary folder), so building it is part of its time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from options import nonnegative, positive

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "mobilenetv2-3class.yaml"
STAGE2_PARAMS = 1_043_843  # study 1's trainable parameters in stage 2, as the paper reports them
TRAINABLE_TOP14 = ("features.16.conv.2", "features.16.conv.3", "features.17", "features.18", "classifier")


def _metrics(labels: list[str], targets, probs) -> dict[str, float]:
    from cxrkit.eval.metrics import compute_metrics

    m = compute_metrics("multiclass", labels, targets, probs)
    return {"accuracy": float(m["accuracy"]), "auc": float(m["auc"])}


def run_cxrkit(args: argparse.Namespace, out: Path) -> dict:
    """Train the recipe with cxrkit's defaults (cached activations, decoded images, bf16 where supported)."""
    from cxrkit.config import load_recipe
    from cxrkit.console import notes_console
    from cxrkit.runs import Run
    from cxrkit.serve.predictor import Predictor
    from cxrkit.train import fit
    from cxrkit.train.runtime import setup_runtime

    recipe = load_recipe(RECIPE, [f"data.root={args.data}", "runtime.device=cpu",  # a GPU must not take part
                                  f"stages.0.epochs={args.frozen_epochs}",
                                  f"stages.1.epochs={args.finetune_epochs}", "stages.1.early_stopping.patience=null",
                                  "stages.0.early_stopping.restore_best=false",
                                  "stages.1.early_stopping.restore_best=false", f"out={out}"])
    stage_seconds: list[float] = []
    original = fit.Trainer.fit_stage

    def timed(self, index, resume):  # instrumentation only: the stage itself is cxrkit's
        start = time.perf_counter()
        original(self, index, resume)
        stage_seconds.append(time.perf_counter() - start)

    fit.Trainer.fit_stage = timed
    start = time.perf_counter()
    rt = recipe.runtime
    runtime = setup_runtime(rt.device, rt.precision, rt.channels_last, rt.threads, rt.workers)
    run = Run.create(recipe.out, recipe.name)
    fit.seed_everything(recipe.seed)
    trainer = fit.Trainer(recipe, run, runtime, notes_console())
    setup = time.perf_counter() - start
    trainer.fit()
    total = time.perf_counter() - start
    predictor = Predictor(run, checkpoint="last", runtime=runtime)
    from cxrkit.eval.evaluate import mapped_targets, select_data

    ds, _, _, _ = select_data(predictor, None, "test")
    probs = predictor.predict_dataset(ds, 64)
    return {"setup_s": setup, "stages_s": stage_seconds, "total_s": total, "run": str(run.path),
            "test": _metrics(predictor.labels, mapped_targets(ds, predictor.labels, None), probs),
            "runtime": runtime.describe()}


def run_reference(args: argparse.Namespace, run_dir: Path) -> dict:
    """The plain loop, on the split the cxrkit run saved."""
    import csv

    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import load_file
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    labels = json.loads((run_dir / "labels.json").read_text())["labels"]
    rows = list(csv.DictReader((run_dir / "splits.csv").open()))

    class XRays(Dataset):
        def __init__(self, split: str, transform):
            self.items = [(r["source"], labels.index(r["label"])) for r in rows if r["split"] == split]
            self.transform = transform

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return self.transform(Image.open(path).convert("RGB")), label

    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loaders = {s: DataLoader(XRays(s, tf), batch_size=32, shuffle=s == "train", num_workers=args.workers)
               for s in ("train", "val", "test")}
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(load_file(str(Path(args.weights) / "mobilenet_v2.in1k_dequantized.safetensors")))
    model.classifier = nn.Linear(1280, len(labels))
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(split):
        model.eval()
        probs, targets, total = [], [], 0.0
        with torch.no_grad():
            for x, y in loaders[split]:
                out = model(x)
                total += loss_fn(out, y).item() * len(y)
                probs.append(torch.softmax(out, 1).numpy())
                targets.append(y.numpy())
        return total / len(loaders[split].dataset), np.concatenate(probs), np.concatenate(targets)

    def train(epochs: int, lr: float, stage: str) -> float:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        start = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            for x, y in loaders["train"]:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
            val_loss, _, _ = evaluate("val")
            print(f"reference {stage} epoch {epoch + 1}/{epochs}: {time.perf_counter() - t0:.0f} s, "
                  f"val loss {val_loss:.4f}", file=sys.stderr, flush=True)
        return time.perf_counter() - start

    for p in model.features.parameters():
        p.requires_grad = False
    frozen = train(args.frozen_epochs, 1e-3, "frozen")
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(TRAINABLE_TOP14)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the head here has 3 outputs; the paper's 1,043,843 is the same count
    assert trainable == STAGE2_PARAMS, f"reference stage 2 trains {trainable} parameters, not {STAGE2_PARAMS}"
    finetune = train(args.finetune_epochs, 1e-5, "finetune-top14")
    _, probs, targets = evaluate("test")
    return {"setup_s": 0.0, "stages_s": [frozen, finetune], "total_s": frozen + finetune,
            "test": _metrics(labels, targets, probs), "runtime": f"cpu fp32, {torch.get_num_threads()} threads"}


def _child(side: str, args: argparse.Namespace, extra: list[str]) -> tuple[dict, float] | None:
    """Run one side in a child process; its result and its own peak resident memory in MiB, or None when it failed
    (it has said why)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--side", side, "--result", str(result_path), "--data", args.data,
               "--weights", args.weights, "--frozen-epochs", str(args.frozen_epochs),
               "--finetune-epochs", str(args.finetune_epochs), "--workers", str(args.workers), *extra]
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not result_path.is_file():
            print(f"{side} failed with exit status {os.waitstatus_to_exitcode(status)}", file=sys.stderr)
            return None
        return json.loads(result_path.read_text()), usage.ru_maxrss / 1024


def main() -> None:
    from cxrkit.train.runtime import default_workers

    data_dir = os.environ.get("CXR_DATA_DIR")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(data_dir) / "chest_xray") if data_dir
                        else str(REPO.parent / "shared" / "data" / "chest_xray"),
                        help="Kermany's folder (default: $CXR_DATA_DIR/chest_xray, else ../shared/data/chest_xray)")
    parser.add_argument("--weights",
                        default=os.environ.get("CXR_WEIGHTS_DIR") or str(REPO.parent / "shared" / "weights"),
                        help="folder of mobilenet_v2.in1k_dequantized.safetensors, for both sides (default: "
                             "$CXR_WEIGHTS_DIR, else ../shared/weights)")
    parser.add_argument("--frozen-epochs", type=positive, default=10)
    parser.add_argument("--finetune-epochs", type=positive, default=20)
    parser.add_argument("--workers", type=nonnegative, default=default_workers(),
                        help="DataLoader workers of the reference loop (default: as many as cxrkit uses here)")
    parser.add_argument("--only", choices=["cxrkit"], help="run cxrkit's side alone: its row, no speed-up")
    parser.add_argument("--side", choices=["cxrkit", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["CXR_WEIGHTS_DIR"] = args.weights  # both sides load the file named here

    if args.side:
        from cxrkit.errors import CxrError

        try:
            with tempfile.TemporaryDirectory() as tmp:
                if args.side == "cxrkit":
                    os.environ["CXR_CACHE_DIR"] = str(Path(tmp) / "cache")  # start cold: the build is timed too
                    result = run_cxrkit(args, Path(args.run_dir))
                else:
                    result = run_reference(args, Path(args.run_dir))
        except CxrError as err:
            raise SystemExit(f"error: {err}") from None
        Path(args.result).write_text(json.dumps(result))
        return

    weights = Path(args.weights) / "mobilenet_v2.in1k_dequantized.safetensors"
    for path, what in ((Path(args.data), "the data folder"), (weights, "the ImageNet weights")):
        if not path.exists():
            raise SystemExit(f"error: {what} {path} does not exist (see --help)")
    with tempfile.TemporaryDirectory() as runs:
        print(f"study 1 recipe, {args.frozen_epochs} + {args.finetune_epochs} epochs, {os.cpu_count()} cores, "
              f"{args.workers} loader worker(s) for the reference loop, {default_workers()} for cxrkit (its default)",
              flush=True)
        first = _child("cxrkit", args, ["--run-dir", runs])
        if first is None:
            raise SystemExit(1)
        sides = [("cxrkit", *first)]
        if args.only is None:
            second = _child("reference", args, ["--run-dir", first[0]["run"]])
            sides += [("reference", *second)] if second else []
    print()
    print(f"{'':<10} {'setup s':>8} {'frozen s':>9} {'finetune s':>11} {'total s':>8} {'peak MiB':>9} "
          f"{'test acc':>9} {'test AUC':>9}  runtime")
    for name, r, peak in sides:
        frozen, finetune = r["stages_s"]
        print(f"{name:<10} {r['setup_s']:>8.1f} {frozen:>9.1f} {finetune:>11.1f} {r['total_s']:>8.1f} {peak:>9.0f} "
              f"{r['test']['accuracy']:>9.4f} {r['test']['auc']:>9.4f}  {r['runtime']}")
    if len(sides) == 1:
        if args.only is None:  # the reference failed: cxrkit's row is still worth its hours
            raise SystemExit(1)
        return
    cx, ref = sides[0][1], sides[1][1]
    print(f"\nspeed-up: {ref['total_s'] / cx['total_s']:.1f}x in total (frozen stage "
          f"{ref['stages_s'][0] / cx['stages_s'][0]:.1f}x, fine-tuning {ref['stages_s'][1] / cx['stages_s'][1]:.1f}x); "
          f"test AUC cxrkit - reference = {cx['test']['auc'] - ref['test']['auc']:+.4f}")


if __name__ == "__main__":
    main()
