"""Train the label-fidelity auditor on a synthmed manifest; write weights, config.json and a model card.

    synthmed generate dataset_specs/auditor_training.yaml -o out/auditor-train
    python scripts/train_auditor.py --manifest out/auditor-train/manifest.csv -o synthmed/models/auditor

    synthmed generate dataset_specs/auditor_training_drr.yaml -o out/auditor-drr-train
    python scripts/train_auditor.py --manifest out/auditor-drr-train/manifest.csv -o synthmed/models/auditor-drr \
        --checkpoint out/auditor-drr-checkpoint

Trains on split=train and reports held-out figures on split=val. Deterministic for a given seed
and thread count: one seeded torch init, one numpy generator for shuffling and augmentation.
With --checkpoint, the state after each epoch (weights, optimiser, random generators) is kept there and a
rerun of the same command goes on from the last epoch finished, to the same weights as one unbroken run.
Augmentation is light (gamma/contrast jitter, noise, shifts of a few pixels) and never flips:
left and right are labels here.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="manifest.csv (file_name, split, findings columns)")
    parser.add_argument("-o", "--out", required=True, help="folder to write config.json, model.safetensors, README.md")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows (smoke tests)")
    parser.add_argument("--blur", type=float, default=0.0, metavar="SIGMA",
                        help="also blur half the training images, Gaussian sigma drawn up to SIGMA pixels (at the input "
                             "size), so that the auditor reads soft images (a model's, a VAE's) by their content")
    parser.add_argument("--init", default=None, metavar="FOLDER",
                        help="start from the weights of an auditor folder of the same design (fine-tuning)")
    parser.add_argument("--checkpoint", default=None,
                        help="folder for the state after each epoch; a rerun with the same arguments resumes from it")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if not 0 <= args.blur <= 8:
        parser.error(f"--blur must be between 0 and 8 pixels; got {args.blur}")
    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        parser.error(f"--init {args.init}: no auditor there (config.json is missing)")
    return args


def read_manifest(path: Path, limit: int | None) -> list[dict]:
    """Rows of the manifest, checked: every column present, every image on disk."""
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        sys.exit(f"error: --manifest {path}: no such file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"file_name", "split", "findings"} - set(reader.fieldnames or ())
        if missing:
            sys.exit(f"error: {path} lacks the column(s) {', '.join(sorted(missing))}")
        rows = list(reader)[:limit]
    absent = [row["file_name"] for row in rows if not (path.parent / row["file_name"]).is_file()]
    if absent:
        sys.exit(f"error: {len(absent)} images of {path} are missing, e.g. {absent[:3]}")
    return rows


def films_of(rows: list[dict]) -> str:
    """What the auditor learns from: ``drr`` when every row comes from the drr backend, else ``phantom``."""
    backends = {row.get("backend") or "phantom" for row in rows}
    return "drr" if backends == {"drr"} else "phantom"


FILMS_TEXT = {"phantom": "phantom radiographs (synthmed's drawn phantom)",
              "drr": "digitally reconstructed radiographs of a real labelled chest CT (synthmed's drr backend)"}


def load_images(folder: Path, rows: list[dict], size: int) -> np.ndarray:
    """All images, area-resized once to size x size, as float16 [N, size, size] in [0, 1]."""
    from PIL import Image

    from synthmed.qc.auditor import area_resize

    out = np.zeros((len(rows), size, size), np.float16)
    for i, row in enumerate(rows):
        with Image.open(folder / row["file_name"]) as image:
            pixels = np.asarray(image)
        out[i] = area_resize(pixels, size)[0]
    return out


def gaussian_blur(batch, sigmas: np.ndarray):
    """Each image [N, 1, H, W] blurred with its own Gaussian sigma in pixels (0: unchanged); separable, reflect edges."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = batch.shape
    radius = max(1, int(np.ceil(3 * float(sigmas.max()))))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernels = np.zeros((n, x.size))
    for i, sigma in enumerate(sigmas):
        if sigma > 0:
            kernels[i] = np.exp(-0.5 * (x / sigma) ** 2)
        else:
            kernels[i, radius] = 1.0
    kernels = torch.from_numpy((kernels / kernels.sum(1, keepdims=True)).astype(np.float32))
    planes = F.pad(batch.reshape(1, n, h, w), (radius,) * 4, mode="reflect")
    planes = F.conv2d(planes, kernels[:, None, None, :], groups=n)
    planes = F.conv2d(planes, kernels[:, None, :, None], groups=n)
    return planes.reshape(n, 1, h, w)


def augment(batch, rng: np.random.Generator, max_shift: int, blur: float = 0.0):
    """Gamma and contrast jitter, a little noise and a shift of up to ``max_shift`` pixels; no flips. With ``blur``,
    half the images (drawn) are first blurred with a Gaussian of sigma drawn up to ``blur`` pixels."""
    import torch
    import torch.nn.functional as F

    if blur > 0:
        sigmas = rng.uniform(0.0, blur, len(batch)) * (rng.random(len(batch)) < 0.5)
        if sigmas.any():
            batch = gaussian_blur(batch, sigmas)
    n, _, h, w = batch.shape
    gamma = torch.from_numpy(np.exp(rng.uniform(-0.2, 0.2, (n, 1, 1, 1))).astype(np.float32))
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (n, 1, 1, 1)).astype(np.float32))
    offset = torch.from_numpy(rng.uniform(-0.05, 0.05, (n, 1, 1, 1)).astype(np.float32))
    noise_sd = torch.from_numpy(rng.uniform(0.0, 0.015, (n, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(batch.shape).astype(np.float32))
    x = batch.clamp(0, 1) ** gamma * gain + offset + noise_sd * noise
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    shifts = rng.integers(0, 2 * max_shift + 1, (n, 2))
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)])


def evaluate(auditor, images: np.ndarray, rows: list[dict]) -> dict:
    """label_fidelity on all rows, with the same figures per view under ``by_view``."""
    from synthmed.qc.auditor import label_fidelity

    prediction = auditor.predict(images.astype(np.float32), batch_size=128)
    report = label_fidelity(prediction, rows)
    views = sorted({row.get("view") or "" for row in rows})
    report["by_view"] = {}
    for view in views:
        index = [i for i, row in enumerate(rows) if (row.get("view") or "") == view]
        if len(views) > 1 and index:
            report["by_view"][view or "?"] = label_fidelity(_take(prediction, index), [rows[i] for i in index])
    return report


def _take(prediction, index):
    """The rows ``index`` of an AuditorPrediction."""
    from dataclasses import replace

    return replace(prediction, finding_probs=prediction.finding_probs[index],
                   location_probs=prediction.location_probs[index], severity_probs=prediction.severity_probs[index])


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def dataset_of(folder: Path) -> dict | None:
    """What the training set was built from, by its dataset card: the spec's name and its cases built."""
    try:
        card = json.loads((folder / "dataset_card.json").read_text(encoding="utf-8"))
        return {"spec_name": str(card["spec"]["name"]), "cases": int(card["count"]),
                "spec_count": int(card["spec"]["count"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _built_from(dataset: dict | None) -> str:
    if not dataset:
        return ""
    if dataset["cases"] == dataset["spec_count"]:
        return f" (spec `{dataset['spec_name']}`)"
    return f" (spec `{dataset['spec_name']}`, its first {dataset['cases']:,} cases of {dataset['spec_count']:,})"


def model_card(config: dict, report: dict) -> str:
    """README.md for the weights folder: use, data, procedure and held-out figures."""
    training = config["training"]
    findings = report["findings"]
    lines = [
        "---",
        "license: apache-2.0",
        f"tags: [synthmed, chest-x-ray, quality-control, {config.get('films', 'phantom')}]",
        "---",
        "",
        f"# synthmed auditor v{config['version']}",
        "",
        "A small CNN (pure torch, "
        f"{training['parameters']:,} parameters, float16 safetensors) that reads back findings, location "
        "and severity from a chest radiograph, and whose "
        f"{config['embedding_dim']}-d penultimate layer is synthmed's default feature space for "
        "memorisation audits and set distances (`synthmed.qc.auditor`).",
        "",
        "## Intended use",
        "",
        config["intended_use"],
        "",
        f"Trained on {FILMS_TEXT[config.get('films', 'phantom')]}; its figures hold for those images. On images "
        "from other generators (or real films) a disagreement means *the image and its label disagree "
        f"according to a model trained on {config.get('films', 'phantom')} films*: a prompt to look, not a verdict.",
        "",
        "## Inputs and outputs",
        "",
        f"- input: grayscale [N, H, W] float in [0, 1], area-resized to {config['input_size']}x"
        f"{config['input_size']}, each image standardised to zero mean and unit variance, then folded "
        f"{config.get('space_to_depth', 1)}x{config.get('space_to_depth', 1)} into channels (pixel unshuffle) "
        "so the first convolution sees every pixel",
        f"- findings: {len(config['finding_names'])} independent sigmoids (a finding implies its parents: "
        "nodule -> lung_lesion, endotracheal_tube -> support_devices)",
        f"- location: softmax over {len(config['location_names']) - 1} locations and `none` "
        "(the location of the first labelled finding that has one)",
        "- severity: softmax over none / mild / moderate / severe (same rule)",
        "",
        "## Training",
        "",
        f"- data: `{training['manifest']}`{_built_from(training.get('dataset'))} "
        f"(sha256 `{training['manifest_sha256'][:16]}...`), "
        f"{training['n_train']} train / {training['n_val']} val images, {config.get('films', 'phantom')} backend, "
        "exact labels",
        f"- command: `{training['command']}`",
        f"- {training['epochs']} epochs, batch {training['batch_size']}, AdamW, one-cycle lr peak "
        f"{training['lr']}, seed {training['seed']}, {training['threads']} CPU thread(s), "
        f"wall time {training['wall_time_s'] / 60:.1f} min, torch {training['torch']}",
        f"- augmentation: gamma/contrast jitter, Gaussian noise, shifts up to {training.get('max_shift', 5)} px"
        + (f", Gaussian blur of half the images (sigma up to {training['blur']} px, so that soft images from a model or "
           "a VAE are read by their content)" if training.get("blur") else "")
        + "; no flips (left/right is a label)"
        + (f"\n- started from the weights of `{training['init']}`" if training.get("init") else ""),
        "",
        f"## Held-out figures (split=val, {report['n_images']} images)",
        "",
        f"- finding set exact agreement (leaf findings): **{_pct(findings['exact_set_agreement'])}**",
        f"- mean per-finding accuracy: {_pct(findings['mean_accuracy'])}",
        f"- location accuracy: **{_pct(report['location']['accuracy'])}** exact, "
        f"{_pct(report['location']['side_accuracy'])} at side level, "
        f"{_pct(report['location']['located_accuracy'])} on the {report['location']['located_support']} "
        "images with a labelled location",
        f"- location as the film shows it (height and side on frontal films, height and depth on lateral ones, "
        f"where the side is not on the film): **{_pct(report['location'].get('region_accuracy'))}**",
        f"- severity accuracy: **{_pct(report['severity']['accuracy'])}**",
        "",
        "| finding | support | accuracy | sensitivity | specificity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in findings["per_finding"].items():
        lines.append(f"| {name} | {row['support']} | {_pct(row['accuracy'])} | {_pct(row['sensitivity'])} "
                     f"| {_pct(row['specificity'])} |")
    if report.get("by_view"):
        lines += ["", "By view:", "", "| view | images | finding set | location (exact) | location (as shown) | severity |",
                  "|---|---:|---:|---:|---:|---:|"]
        for view, part in report["by_view"].items():
            lines.append(f"| {view} | {part['n_images']} | {_pct(part['findings']['exact_set_agreement'])} "
                         f"| {_pct(part['location']['accuracy'])} | {_pct(part['location'].get('region_accuracy'))} "
                         f"| {_pct(part['severity']['accuracy'])} |")
    untrained = [name for name, count in training["train_support"].items() if count == 0]
    missed = [name for name, row in findings["per_finding"].items()
              if row["sensitivity"] is not None and row["sensitivity"] < 0.5]
    lines += [
        "",
        "## Limitations",
        "",
        f"- Trained on {config.get('films', 'phantom')} radiographs only; no real patient data, not a diagnostic "
        "model.",
    ]
    if untrained:
        lines.append(f"- Never seen in training, so not detected: {', '.join(f'`{n}`' for n in untrained)}.")
    if missed:
        lines.append(f"- Mostly missed on val (sensitivity below 50%): {', '.join(f'`{n}`' for n in missed)}.")
    lines.append("- The hardest distinctions are lobar consolidation vs patchy pneumonia vs hazy opacity, "
                 "and mild findings against a normal film.")
    lines.append("")
    return "\n".join(lines)


class Checkpoint:
    """The training state after an epoch: ``epoch-NNN.pt`` (weights, optimiser and schedule, torch's random
    state; tensors only, loaded with ``weights_only``) and ``state.json`` (that file's name, the epoch, the
    shuffling generator, the time spent so far, and the arguments and manifest it belongs to), written in that
    order, so a run killed at any point leaves a consistent pair. A run with other arguments or another
    manifest refuses it rather than mixing two trainings."""

    def __init__(self, args, manifest: Path):
        self.folder = Path(args.checkpoint)
        manifest_file = manifest / "manifest.csv" if manifest.is_dir() else manifest
        keep = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out")}
        self.identity = {"arguments": keep,
                         "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest()}
        self.elapsed = 0.0
        self.previous = None

    def restore(self, network, optimiser, schedule, rng) -> int:
        """Load the state if there is one; returns the last epoch it finished (0 when starting afresh)."""
        import torch

        info_file = self.folder / "state.json"
        if not info_file.is_file():
            return 0
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if info.get("identity") != self.identity:
            sys.exit(f"error: --checkpoint {self.folder} belongs to another training (other arguments or manifest); "
                     "name a new folder or remove it")
        state = torch.load(self.folder / info["state"], weights_only=True)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = info["rng"]
        self.elapsed = float(info.get("elapsed_s", 0.0))
        self.previous = info["state"]
        print(f"resumed from {self.folder} after epoch {info['epoch']}", flush=True)
        return int(info["epoch"])

    def save(self, epoch: int, network, optimiser, schedule, rng, elapsed: float) -> None:
        import os

        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:03d}.pt"
        schedule_state = {k: v for k, v in schedule.state_dict().items() if not callable(v)}
        state = {"network": network.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule_state,
                 "torch_rng": torch.get_rng_state()}
        info = {"state": name, "epoch": epoch, "identity": self.identity, "rng": rng.bit_generator.state,
                "elapsed_s": round(self.elapsed + elapsed, 1)}
        for target, write in ((name, lambda fh: torch.save(state, fh)),
                              ("state.json", lambda fh: fh.write(json.dumps(info, indent=1).encode("utf-8")))):
            temp = self.folder / f".{target}.{os.getpid()}.tmp"
            with open(temp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, self.folder / target)
        if self.previous and self.previous != name:  # only the state this training wrote before
            (self.folder / self.previous).unlink(missing_ok=True)
        self.previous = name


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from synthmed.qc.auditor import Auditor, default_config, label_targets

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.time()

    # 1. read the manifest and every image once, downsampled
    manifest = Path(args.manifest)
    rows = read_manifest(manifest, args.limit)
    folder = manifest.parent if manifest.is_file() else manifest
    config = default_config()
    config["films"] = films_of(rows)
    if config["films"] == "drr":
        config["intended_use"] = config["intended_use"].replace("trained on phantom images only",
                                                                "trained on drr films (DRRs of a labelled chest CT) only")
    size = config["input_size"]
    images = load_images(folder, rows, size)
    targets = [label_targets(row, config["finding_names"], config["location_names"], config["severity_names"])
               for row in rows]
    train = np.array([row["split"] == "train" for row in rows])
    val = np.array([row["split"] == "val" for row in rows])
    if not train.any() or not val.any():
        sys.exit(f"error: need rows in split=train and split=val; got {int(train.sum())} and {int(val.sum())}")
    findings = torch.from_numpy(np.stack([t[0] for t in targets]))
    locations = torch.from_numpy(np.array([t[1] for t in targets], np.int64))
    severities = torch.from_numpy(np.array([t[2] for t in targets], np.int64))
    train_index, val_index = np.flatnonzero(train), np.flatnonzero(val)
    val_rows = [rows[i] for i in val_index]
    pixels = torch.from_numpy(images)
    print(f"loaded {len(rows)} images ({len(train_index)} train, {len(val_index)} val) at {size}x{size} "
          f"in {time.time() - started:.0f}s", flush=True)

    # 2. model, optimiser, schedule
    auditor = Auditor.from_config(config, seed=args.seed)
    network = auditor.network
    if args.init is not None:
        try:
            start = Auditor.load(args.init)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --init {args.init}: {e}")
        design = ("blocks", "embedding_dim", "input_size", "space_to_depth", "finding_names", "location_names",
                  "severity_names")
        differ = [k for k in design if start.config.get(k) != config.get(k)]
        if differ:
            sys.exit(f"error: --init {args.init} is an auditor of another design ({', '.join(differ)} differ)")
        network.load_state_dict({k: v.float() for k, v in start.network.state_dict().items()})
    steps_per_epoch = len(train_index) // args.batch_size
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, epochs=args.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.2)
    rng = np.random.default_rng(args.seed)
    max_shift = max(1, round(5 * size / 128))  # about 2 % of the image side
    bce = torch.nn.BCEWithLogitsLoss(reduction="sum")
    ce = torch.nn.CrossEntropyLoss()

    # 3. train, with held-out figures after every epoch (resumed from the checkpoint of an earlier run)
    report = None
    checkpoint = Checkpoint(args, manifest) if args.checkpoint else None
    first = 1 if checkpoint is None else checkpoint.restore(network, optimiser, schedule, rng) + 1
    for epoch in range(first, args.epochs + 1):
        network.train()
        order = rng.permutation(train_index)
        totals = np.zeros(3)
        epoch_start = time.time()
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(pixels[batch].float()[:, None], rng, max_shift, args.blur)
            finding_logits, location_logits, severity_logits = network(x)
            losses = (bce(finding_logits, findings[batch]) / len(batch), ce(location_logits, locations[batch]),
                      ce(severity_logits, severities[batch]))
            optimiser.zero_grad(set_to_none=True)
            sum(losses).backward()
            optimiser.step()
            schedule.step()
            totals += [loss.item() for loss in losses]
        network.eval()
        report = evaluate(auditor, images[val_index], val_rows)
        totals /= steps_per_epoch
        print(f"epoch {epoch:2d}/{args.epochs}  loss finding {totals[0]:.3f} location {totals[1]:.3f} "
              f"severity {totals[2]:.3f}  |  val finding-set {_pct(report['findings']['exact_set_agreement'])} "
              f"mean-finding-acc {_pct(report['findings']['mean_accuracy'])} "
              f"location {_pct(report['location']['accuracy'])} (side {_pct(report['location']['side_accuracy'])}) "
              f"severity {_pct(report['severity']['accuracy'])}  |  {time.time() - epoch_start:.0f}s", flush=True)
        if checkpoint is not None:
            checkpoint.save(epoch, network, optimiser, schedule, rng, time.time() - started)
    if report is None:  # every epoch was done by an earlier run
        network.eval()

    # 4. write weights; the figures in config and card are those of the shipped float16 weights
    wall = time.time() - started + (checkpoint.elapsed if checkpoint is not None else 0.0)
    out = auditor.save(args.out)
    report = evaluate(Auditor.load(out), images[val_index], val_rows)
    manifest_file = folder / "manifest.csv" if manifest.is_dir() else manifest
    auditor.config["training"] = {
        "manifest": str(args.manifest),
        "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
        "dataset": dataset_of(manifest_file.parent),
        "n_train": int(len(train_index)), "n_val": int(len(val_index)),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "max_shift": max_shift, "blur": args.blur, "init": args.init, "wall_time_s": round(wall, 1), "torch": torch.__version__,
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "train_support": {name: int(findings[train_index, j].sum()) for j, name in enumerate(config["finding_names"])},
        "command": "python scripts/train_auditor.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "val": {"finding_exact_set_agreement": report["findings"]["exact_set_agreement"],
                "finding_mean_accuracy": report["findings"]["mean_accuracy"],
                "location_accuracy": report["location"]["accuracy"],
                "location_side_accuracy": report["location"]["side_accuracy"],
                "severity_accuracy": report["severity"]["accuracy"],
                "finding_accuracy": {k: v["accuracy"] for k, v in report["findings"]["per_finding"].items()},
                "finding_sensitivity": {k: v["sensitivity"] for k, v in report["findings"]["per_finding"].items()},
                "location_region_accuracy": report["location"].get("region_accuracy"),
                "by_view": {view: {"n_images": part["n_images"],
                                   "finding_exact_set_agreement": part["findings"]["exact_set_agreement"],
                                   "location_accuracy": part["location"]["accuracy"]}
                            for view, part in report.get("by_view", {}).items()}},
    }
    auditor.save(out)
    (out / "README.md").write_text(model_card(auditor.config, report), encoding="utf-8")
    print(json.dumps({"val_float16": auditor.config["training"]["val"], "wall_time_s": round(wall, 1),
                      "out": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
