"""Train, calibrate, fit the out-of-distribution gate, derive the operating point, export and
document one model version.

    python -m training.train --model triage --version 1

Reproducible (fixed seeds, deterministic ops, one thread). Writes into
``model_repository/<model>/<version>/``: model.onnx (outputs as config.pbtxt says: probs,
[heatmap], ood_score), card.json, MODEL_CARD.md, reference.json, gate.json.

Protocol. Train split: the network (on the data set's 28×28 images and on resolution
round-trip copies, training/augment.py) and the OOD detector's Gaussians. Validation split,
put through the DICOM pipeline at three film sizes (training/pipeline_path.py): the
temperature, the OOD scales and threshold, and the operating-point threshold. Test split:
reported only, on the direct path and on the DICOM pipeline path at four film sizes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from training import augment, cards, data, metrics, ood_eval, pipeline_path
from training.nets import (
    ARCHITECTURES,
    OOD_GROUPS,
    CamNet,
    OodHead,
    ServingExport,
    ood_features,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO_ROOT / "training" / "weights"
OPSET = 17
BATCH = 128
# What each published version is: architecture, epochs, class weighting, seed.
RECIPES: dict[tuple[str, int], dict[str, Any]] = {
    ("triage", 1): {"arch": "small", "epochs": 8, "class_weight": "balanced", "seed": 1},
    ("triage", 2): {"arch": "wide", "epochs": 8, "class_weight": "balanced", "seed": 2},
    ("analysis", 1): {"arch": "small", "epochs": 8, "class_weight": "balanced", "seed": 3},
    ("analysis", 2): {"arch": "wide", "epochs": 8, "class_weight": "balanced", "seed": 4},
    ("breast_us", 1): {"arch": "small", "epochs": 40, "class_weight": "none", "seed": 5},
    ("breast_us", 2): {"arch": "wide", "epochs": 40, "class_weight": "none", "seed": 7},
    ("fundus", 1): {"arch": "small", "epochs": 30, "class_weight": "none", "seed": 6},
}
# Resolution round-trip copies made once per training image (the data set's own image is
# always a further copy); small sets get more.
ROUND_TRIP_COPIES = {"chest": 4, "breast": 12, "retina": 8}
AUGMENT_SEED = 1234
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
# Random shifts of up to this many pixels (of 28).
MAX_SHIFT = 2
# The OOD detector: covariance shrinkage toward its mean variance, the in-distribution
# reference quantile each group's distance is divided by, and the validation false-flag rate.
SHRINKAGE = 0.05
GROUP_REFERENCE_QUANTILE = 0.99
OOD_FALSE_FLAG_RATE = 0.01
# Outlier exposure for the linear OOD term: images per outside source, synthetic frames, L2.
OUTLIER_PER_SET = 1000
OUTLIER_FRAMES = 300
OUTLIER_L2 = 1e-3
# Prevalence at which PPV/NPV are stated (see cards.PREVALENCE_NOTE).
PREVALENCE = {"chest": 0.15, "breast": 0.10, "retina": 0.10}


def weights_path(model: str, version: int) -> Path:
    return WEIGHTS_DIR / f"{model}_v{version}.pt"


def make_net(arch: str, in_channels: int, classes: int) -> CamNet:
    return CamNet(**ARCHITECTURES[arch], in_channels=in_channels, classes=classes)  # type: ignore[arg-type]


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def fit(recipe: dict[str, Any], train_x: np.ndarray, y: np.ndarray, classes: int) -> CamNet:
    """``train_x``: (N, copies, C, H, W); each step takes one random copy of each image."""
    torch.manual_seed(recipe["seed"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    net = make_net(recipe["arch"], train_x.shape[2], classes)
    x = torch.from_numpy(train_x)
    yt = torch.from_numpy(y)
    weight = None
    if recipe["class_weight"] == "balanced":
        counts = torch.bincount(yt, minlength=classes).float()
        weight = counts.sum() / (classes * counts)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = recipe["epochs"] * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps)
    for epoch in range(recipe["epochs"]):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        pick = torch.randint(0, x.shape[1], (len(x),), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            xb = _shift(x[idx, pick[idx]], gen)
            loss = loss_fn(net(xb)[0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{recipe['epochs']} loss {loss.item():.4f}", flush=True)
    return net.eval()


@torch.no_grad()
def forward_features(net: CamNet, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the OOD feature groups of ``x`` (N, C, H, W)."""
    logits, groups = [], []
    for i in range(0, len(x), 512):
        xb = torch.from_numpy(x[i : i + 512])
        lo, fmap, mid = net.forward_all(xb)
        logits.append(lo.numpy())
        groups.append([g.numpy() for g in ood_features(xb, fmap, mid)])
    return np.concatenate(logits), [np.concatenate(g) for g in zip(*groups, strict=True)]


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar minimising validation NLL."""
    lt = torch.from_numpy(logits)
    yt = torch.from_numpy(y)
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lt / log_t.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().item())


def fit_gaussians(
    groups: list[np.ndarray], y: np.ndarray, classes: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group: class means and the Cholesky factor of the shared precision (shrunk)."""
    chols, means = [], []
    for f in groups:
        f = f.astype(np.float64)
        mu = np.stack([f[y == k].mean(0) for k in range(classes)])
        centred = f - mu[y]
        cov = centred.T @ centred / len(f)
        cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
        chols.append(torch.from_numpy(np.linalg.cholesky(np.linalg.inv(cov))))
        means.append(torch.from_numpy(mu))
    return chols, means


def outlier_tensors(
    model: str, train_x: np.ndarray, spec: Any, shape: tuple[int, int, int], seed: int
) -> np.ndarray:
    """Outlier exposure (Hendrycks et al. 2019), from training data only: the other data
    sets' *train* splits through this model's preprocessing (512 px films), this set's own
    training tensors inverted and rotated by 90° / 270°, and random constant, noise and
    ramp frames. Disjoint from every set the card's OOD figures are measured on, except in
    kind (other MedMNIST test splits, inverted / rotated *test* images, fixed blank frames);
    the DICOM files of other modalities are never seen."""
    own = data.dataset_of(model)
    rng = np.random.default_rng(seed)
    parts = []
    for other in data.DATASETS.values():
        if other.name != own.name:
            images = data.load_raw(other.name)["train"].images[:OUTLIER_PER_SET]
            parts.append(pipeline_path.tensors(other.builder, images, (512, 512), spec, shape))
    pick = rng.choice(len(train_x), size=min(OUTLIER_PER_SET, len(train_x)), replace=False)
    base = train_x[pick]
    # Inversion of the display image: (1 - d - mean) / std = (1 - 2·mean) / std - x.
    parts.append(np.float32((1 - 2 * spec.mean) / spec.std) - base)
    parts.append(np.ascontiguousarray(np.rot90(base, 1, axes=(2, 3))))
    parts.append(np.ascontiguousarray(np.rot90(base, 3, axes=(2, 3))))
    frames = []
    for _ in range(OUTLIER_FRAMES):
        kind = rng.integers(3)
        if kind == 0:
            f = np.full(shape[1:], rng.uniform(0, 1), np.float32)
        elif kind == 1:
            f = rng.uniform(0, 1, shape[1:]).astype(np.float32)
        else:
            f = np.linspace(0, 1, shape[2], dtype=np.float32)[None].repeat(shape[1], 0)
            f = np.ascontiguousarray(np.rot90(f, int(rng.integers(4))))
        frames.append((np.repeat(f[None], shape[0], 0) - spec.mean) / spec.std)
    parts.append(np.stack(frames).astype(np.float32))
    return np.concatenate(parts).astype(np.float32)


def fit_outlier_exposure(
    model: str,
    net: CamNet,
    train_groups: list[np.ndarray],
    spec: Any,
    shape: tuple[int, int, int],
    seed: int,
) -> dict[str, torch.Tensor]:
    """A linear in-vs-outlier logit on all OOD feature groups (balanced logistic loss, L2)."""
    own = data.dataset_of(model)
    train_x = data.direct(data.load_raw(own.name)["train"].images, spec, shape)
    _, out_groups = forward_features(net, outlier_tensors(model, train_x, spec, shape, seed))
    inside = np.concatenate(train_groups, axis=1)
    outside = np.concatenate(out_groups, axis=1)
    mean, std = inside.mean(0), inside.std(0) + 1e-6
    x = torch.from_numpy(((np.concatenate([inside, outside]) - mean) / std).astype(np.float32))
    y = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))])
    weight = torch.where(y > 0, len(inside) / len(outside), 1.0)
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight)).mean()
        loss = loss + OUTLIER_L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # Fold the standardisation into the weights: (f - mean) / std · w + b.
    wf = w.detach().double() / torch.from_numpy(std)
    bf = b.detach().double() - (torch.from_numpy(mean) * wf).sum()
    return {"w": wf.float(), "b": bf.float().reshape(())}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def export(model: str, wrapper: ServingExport, path: Path, in_channels: int) -> list[str]:
    outputs = ["probs", "heatmap", "ood_score"] if wrapper.attention else ["probs", "ood_score"]
    torch.onnx.export(
        wrapper,
        (torch.zeros(1, in_channels, 28, 28),),
        str(path),
        input_names=["image"],
        output_names=outputs,
        dynamic_axes={"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
        opset_version=OPSET,
        dynamo=False,
    )
    return outputs


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [session.run(None, {"image": x[i : i + 256]}) for i in range(0, len(x), 256)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def reference(probs: np.ndarray) -> dict[str, Any]:
    conf = probs.max(1)
    lo = 1.0 / probs.shape[1]
    hist, edges = np.histogram(conf, bins=20, range=(lo, 1.0))
    return {
        "source": "validation split through the DICOM pipeline, top-class confidence after calibration",
        "n": int(len(conf)),
        "bins": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in hist],
        "quantiles": {
            str(q): round(float(np.quantile(conf, q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        },
        "predicted_class_counts": np.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist(),
    }


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in d.items()}


def train(model: str, version: int, reuse_net: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    recipe = RECIPES[(model, version)]
    ds = data.dataset_of(model)
    spec, shape = data.model_spec(model)
    classes = len(ds.labels)
    labels = (data.MODEL_REPOSITORY / model / "labels.txt").read_text().split()
    assert tuple(labels) == ds.labels, (labels, ds.labels)
    op_conf = json.loads((data.MODEL_REPOSITORY / model / "operating_point.json").read_text())
    positive = [labels.index(name) for name in op_conf["positive_labels"]]
    raw = data.load_raw(ds.name)
    started = time.time()

    # Training tensors: the data set's own image plus round-trip copies through the pipeline.
    direct = {k: data.direct(v.images, spec, shape) for k, v in raw.items()}
    trips = augment.copies(
        raw["train"].images, spec, shape, ROUND_TRIP_COPIES[ds.name], AUGMENT_SEED
    )
    train_x = np.concatenate([direct["train"][:, None], trips], axis=1)
    print(f"{model} v{version}: {train_x.shape} training tensors", flush=True)
    net_path = WEIGHTS_DIR / f"{model}_v{version}.net.pt"
    if reuse_net and net_path.is_file():
        # A shortcut for iterating on what follows training; the fit is deterministic.
        net = make_net(recipe["arch"], shape[0], classes)
        net.load_state_dict(torch.load(net_path, weights_only=True))
        net.eval()
    else:
        net = fit(recipe, train_x, raw["train"].y, classes)
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), net_path)

    # Validation through the DICOM pipeline: temperature, OOD scales, thresholds.
    val_sizes = ds.sizes[:3]
    val_paths = {
        pipeline_path.size_name(s): pipeline_path.tensors(
            ds.builder, raw["val"].images, s, spec, shape
        )
        for s in val_sizes
    }
    val_x = np.concatenate(list(val_paths.values()))
    val_y = np.tile(raw["val"].y, len(val_paths))
    val_logits, val_groups = forward_features(net, val_x)
    temperature = fit_temperature(val_logits, val_y)

    train_flat = train_x.reshape(-1, *shape)
    _, train_groups = forward_features(net, train_flat)
    chols, means = fit_gaussians(train_groups, np.repeat(raw["train"].y, train_x.shape[1]), classes)
    raw_head = OodHead(chols, means, [1.0] * len(chols))
    with torch.no_grad():
        val_d = raw_head.distances([torch.from_numpy(g) for g in val_groups]).numpy()
    scales = [float(np.quantile(val_d[:, g], GROUP_REFERENCE_QUANTILE)) for g in range(len(chols))]
    linear = fit_outlier_exposure(model, net, train_groups, spec, shape, recipe["seed"])
    val_logit = np.concatenate(val_groups, axis=1) @ linear["w"].numpy() + float(linear["b"])
    linear["q"] = torch.tensor(float(np.quantile(val_logit, GROUP_REFERENCE_QUANTILE)))
    head = OodHead(chols, means, scales, linear)
    wrapper = ServingExport(net, temperature, head, attention=(model == "analysis")).eval()

    out = REPO_ROOT / "model_repository" / model / str(version)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    outputs = export(model, wrapper, onnx_path, shape[0])
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "arch": recipe["arch"],
            "in_channels": shape[0],
            "classes": classes,
            "temperature": temperature,
            "state_dict": net.state_dict(),
            "ood": {"chol": chols, "means": means, "scales": scales, "linear": linear},
            "attention": model == "analysis",
        },
        weights_path(model, version),
    )
    # Parity: torch vs ONNX Runtime on the direct test tensors, every output.
    test_x, test_y = direct["test"], raw["test"].y
    with torch.no_grad():
        torch_outs = [t.numpy() for t in wrapper(torch.from_numpy(test_x))]
    onnx_outs = ort_run(onnx_path, test_x)
    parity = {
        name: float(np.abs(o - t).max() / max(1.0, float(np.abs(t).max())))
        for name, o, t in zip(outputs, onnx_outs, torch_outs, strict=True)
    }

    # The gate, from the ONNX graph's own outputs on the pipeline-path validation split.
    val_onnx = {k: ort_run(onnx_path, v) for k, v in val_paths.items()}
    val_probs = np.concatenate([o[0] for o in val_onnx.values()])
    val_ood = np.concatenate([o[-1][:, 0] for o in val_onnx.values()])
    ood_threshold = float(np.quantile(val_ood, 1 - OOD_FALSE_FLAG_RATE))
    truth = np.isin(val_y, positive)
    score = metrics.positive_score(val_probs, positive)
    op_threshold = metrics.threshold_for_sensitivity(score, truth, op_conf["target_sensitivity"])
    val_sens, val_spec = metrics.sens_spec(score >= op_threshold, truth)
    gate = {
        "ood": {
            "threshold": ood_threshold,
            "val_false_flag_rate": float((val_ood > ood_threshold).mean()),
            "val_false_flag_rate_by_path": {
                k: float((o[-1][:, 0] > ood_threshold).mean()) for k, o in val_onnx.items()
            },
            "method": (
                "class-conditional Mahalanobis distance, shared covariance (shrinkage "
                f"{SHRINKAGE}), fitted on the training split (its images and round-trip "
                f"copies), for each feature group {list(OOD_GROUPS)}; each group's distance "
                f"divided by its {GROUP_REFERENCE_QUANTILE} quantile on the validation split "
                "(DICOM pipeline path); ood_score is the largest; threshold = the "
                f"{1 - OOD_FALSE_FLAG_RATE} quantile of ood_score on that validation split. Plus "
                "one linear outlier-exposure term on all groups together (logistic, trained "
                "on the training split against outliers made from training data only: the "
                "other MedMNIST sets' train splits, this set's training images inverted or "
                "rotated, random constant / noise / ramp frames), exp(logit - its 0.99 "
                "validation quantile)"
            ),
        },
        "operating_point": {
            "positive_labels": op_conf["positive_labels"],
            "target_sensitivity": op_conf["target_sensitivity"],
            "threshold": op_threshold,
            "derived_on": "validation split, DICOM pipeline path",
            "val_sizes": list(val_paths),
            "val_sensitivity": val_sens,
            "val_specificity": val_spec,
        },
    }
    (out / "gate.json").write_text(json.dumps(gate, indent=2) + "\n")

    # Test: direct and the DICOM pipeline at every film size, with bootstrap intervals.
    prevalence = PREVALENCE[ds.name]
    paths = {"direct": test_x} | {
        pipeline_path.size_name(s): pipeline_path.tensors(
            ds.builder, raw["test"].images, s, spec, shape
        )
        for s in ds.sizes
    }
    test: dict[str, Any] = {}
    for name, x in paths.items():
        outs = onnx_outs if name == "direct" else ort_run(onnx_path, x)
        probs, ood = outs[0], outs[-1][:, 0]

        def figs(
            idx: np.ndarray, probs: np.ndarray = probs, ood: np.ndarray = ood
        ) -> dict[str, float]:
            f = metrics.figures(probs[idx], test_y[idx], positive, op_threshold, prevalence)
            f["ood_flagged"] = float((ood[idx] > ood_threshold).mean())
            return f

        test[name] = {
            "figures": _round(figs(np.arange(len(test_y)))),
            "ci95": metrics.bootstrap(figs, len(test_y)),
        }
        print(f"  test {name}: {test[name]['figures']}", flush=True)
    ood_sets = {}
    for name, x in ood_eval.sets(model, raw["test"].images).items():
        scores = ort_run(onnx_path, x)[-1][:, 0]
        ood_sets[name] = {
            "n": int(len(x)),
            "flagged": round(float((scores > ood_threshold).mean()), 4),
        }
    print(f"  ood: {ood_sets}", flush=True)
    uncal = softmax(forward_features(net, test_x)[0])
    card = {
        "model": model,
        "version": version,
        "dataset": ds.name,
        "labels": labels,
        "recipe": recipe | {"round_trip_copies": ROUND_TRIP_COPIES[ds.name]},
        "temperature": round(temperature, 6),
        "n": {k: int(len(v.y)) for k, v in raw.items()},
        "test": metrics.summary(onnx_outs[0], test_y),
        "test_uncalibrated": metrics.summary(uncal, test_y),
        "test_paths": test,
        "prevalence": prevalence,
        "ood": ood_sets,
        "gate": gate,
        "parity_max_rel_diff": parity,
        "opset": OPSET,
        "train_seconds": round(time.time() - started, 1),
        "published": cards.PUBLISHED[ds.name],
        "val_calibrated_pipeline": metrics.summary(val_probs, val_y),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "reference.json").write_text(json.dumps(reference(val_probs), indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(cards.markdown(card))
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(data.MODEL_DATASET), required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument(
        "--reuse-net",
        action="store_true",
        help="load the trained network saved by an earlier run (training/weights/*.net.pt) "
        "instead of training it again; everything after training is recomputed",
    )
    args = parser.parse_args()
    card = train(args.model, args.version, reuse_net=args.reuse_net)
    print(json.dumps({k: card[k] for k in ("test", "ood", "temperature")}, indent=2))


if __name__ == "__main__":
    main()
