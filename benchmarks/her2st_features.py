"""her2st, leave-one-slide-out: which frozen features help each method (test-time augmentation, context, stains).

Run on demand (needs ../shared/data/her2st or $HISTO2EXPR_HER2ST); every step caches on disk, so
each view is embedded once and each (setting, method, seed) row is run once:

    python benchmarks/her2st_features.py embed --field 1 --views 8 --tokens    # spot view, 8 dihedral views
    python benchmarks/her2st_features.py embed --field 3 --views 8             # 3x wider context view
    python benchmarks/her2st_features.py embed --field 1 --views 4 --stain macenko
    python benchmarks/her2st_features.py embed --field 1 --views 4 --jitter 0.2 --jitter-seed 1
    python benchmarks/her2st_features.py embed --field 1 --views 1 --encoder efficientnet_lite2
    python benchmarks/her2st_features.py embed --field 1 --views 4 --tokens --backend onnx   # ONNX Runtime
    python benchmarks/her2st_features.py run --settings "f1:1;f1:4+f3:4+nbr6" --methods ridge,stnet --seeds 0,1,2 \
        --label "{method} (defaults of 2026-12-01)"
    python benchmarks/her2st_features.py run --settings f1:4+nbr6 --methods cmrcnet --seeds 0,1,2 \
        --params '{"average_epochs": null}' --label "cmrcnet (no averaging)"
    python benchmarks/her2st_features.py augment --setting f1:4 --copies f1_hed0.2s1,f1_hed0.2s2 --methods ridge
    python benchmarks/her2st_features.py report

A *setting* is a '+'-joined list of feature blocks: ``TAG:V`` is the mean over the first V views
(1; 4 = the quarter turns; 8 = with their mirror images) of the embedding ``TAG`` (``f1``: the spot
view, ``f3``: the 3x context view, ``f1_macenko``: Macenko-normalised spot view), and ``nbrK`` is the
mean of the first block over the K nearest spots of the same slide; ``lite1_f1`` / ``lite2_f1`` are
the spot views of the offline ImageNet EfficientNet-Lite1 / -Lite2 (``embed --encoder``); ``f1_onnx``: the
spot view run by ONNX Runtime instead of eager PyTorch (``embed --backend onnx``, what
``embed_patches(backend="auto")`` runs on a CPU). These are the blocks
``hx.tl.embed_patches(tta=, context=, neighbours=, stain_normalization=)`` writes; embedding each
view once lets every average be formed without embedding again. Methods that take tokens
(cmrcnet) get the spot view's 3 x 3 tokens (each view's grid turned back before averaging) with
the other blocks appended to every token, as ``embed_patches`` does.

``augment`` is a frozen proxy of stain augmentation in training: every fold also trains on the
features of HED-jittered copies (``hx.patches.Augment(stain=...)``) of its training spots, and
predicts the held-out slide's unjittered features.

``run --params JSON --label NAME`` runs the methods (with settings other than their defaults when
``--params`` is given) and records the rows under NAME, ``{method}`` in it standing for each
method's name. The rows under a method's bare name are this study's: every method at the defaults it
had when they ran (2026-11-30, before main a914795), which have changed since (CHRep and BLEEP stop
at patience 3 instead of 10, CMRCNet at 5 with its weights averaged, NH2ST fits an ensemble of 3).
So that no run at other defaults joins them under the same name, ``run`` needs ``--label``.
``report`` writes benchmarks/results/her2st_features.md (``--out NAME``: NAME.md) from this study's
rows, and names the labelled rows of the cache, which the reports of their own studies show
(``her2st_patience.md``, ``her2st_ensemble.md``, ``her2st_cmrcnet_averaging.md``,
``her2st_member_cost.md``, ``bf16_training.md``, ``backend_acceptance.md``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _her2st import DATA, mean_and_sd, read_rows, run_step, save_results, steps_parser

import histo2expr as hx
from histo2expr._cache import cache_dir

CACHE = cache_dir("benchmarks/features")
ROWS = CACHE / "rows.jsonl"
AUGMENTED = CACHE / "augmented.jsonl"
COLUMNS = ["pcc_acg", "pcc_heg50", "pcc_hvg50", "mse", "mae"]
TOKEN_GRID = 3


def cohort() -> hx.AnnData:
    import anndata as ad

    path = CACHE / "her2st_normalized.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    adata = hx.io.read_legacy_st(DATA)
    hx.pp.normalize(adata)
    adata.write_h5ad(path)
    return adata


def view_tag(args: argparse.Namespace) -> str:
    """Cache name of one embedding: ``[liteN_]fFIELD[_STAIN][_hedJITTERsSEED][_BACKEND]`` (no suffix: ``torch``)."""
    encoder = args.encoder.removeprefix("efficientnet_")
    return (
        ("" if encoder == "lite0" else f"{encoder}_")
        + f"f{args.field:g}"
        + (f"_{args.stain}" if args.stain else "")
        + (f"_hed{args.jitter:g}s{args.jitter_seed}" if args.jitter else "")
        + ("" if args.backend == "torch" else f"_{args.backend}")
    )


def embed(args: argparse.Namespace) -> None:
    """Features (and 3 x 3 tokens) of every spot under each of the first ``views`` dihedral views."""
    from histo2expr.models import InferenceEncoder, build_encoder
    from histo2expr.models.layers import pool_token_grid
    from histo2expr.patches import Augment, PatchSource, augment_rng, dihedral, patch_loader
    from histo2expr.tl._embed import _turned_back

    tag = view_tag(args)
    path = CACHE / f"{tag}.npz"
    if path.exists():
        print(f"{path} exists")
        return
    adata = hx.io.read_legacy_st(DATA)
    model = build_encoder(args.encoder).eval().to(memory_format=torch.channels_last)
    runner = InferenceEncoder(model, backend=args.backend, channels_last=True, tokens=args.tokens)
    source = PatchSource(adata, patch_size=224, field=args.field, stain_normalization=args.stain)
    jitter = None
    if args.jitter:
        jitter = Augment(dihedral=False, stain=args.jitter, brightness=0, contrast=0, saturation=0, hue=0)
    features = np.zeros((args.views, len(source), model.feature_dim), np.float32)
    tokens = (
        np.zeros((args.views, len(source), TOKEN_GRID**2, model.token_dim), np.float32)
        if args.tokens
        else None
    )
    tic = time.perf_counter()
    with torch.inference_mode():
        for batch in patch_loader(source, batch_size=64):
            rows, images = batch["index"].numpy(), batch["image"]
            if jitter is not None:
                patches = images.permute(0, 2, 3, 1).numpy()
                patches = [
                    jitter(p, augment_rng(args.jitter_seed, 0, int(r)))
                    for p, r in zip(patches, rows, strict=True)
                ]
                images = torch.from_numpy(np.stack(patches).transpose(0, 3, 1, 2).copy())
            for k in range(args.views):
                pooled, grid = runner(dihedral(images, k))
                features[k, rows] = pooled.numpy()
                if tokens is not None:
                    tokens[k, rows] = _turned_back(pool_token_grid(grid, TOKEN_GRID), k, TOKEN_GRID).numpy()
            print(tag, rows[-1], f"{time.perf_counter() - tic:.0f} s", flush=True)
    arrays = {"features": features, "seconds": time.perf_counter() - tic}
    if tokens is not None:
        arrays["tokens"] = tokens
    np.savez(path, **arrays)


_VIEWS: dict[str, dict[str, np.ndarray]] = {}


def views(tag: str) -> dict[str, np.ndarray]:
    if tag not in _VIEWS:
        with np.load(CACHE / f"{tag}.npz") as arrays:
            _VIEWS[tag] = {key: arrays[key] for key in ("features", "tokens") if key in arrays.files}
    return _VIEWS[tag]


def build(setting: str, coords: np.ndarray, slides: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features and tokens of one setting (see the module docstring)."""
    from histo2expr.models.graphs import spatial_knn

    blocks, tokens = [], None
    for part in setting.split("+"):
        if part.startswith("nbr"):
            nearest = spatial_knn(coords, slides, k=int(part[3:]))
            blocks.append(blocks[0][nearest].mean(axis=1))
            continue
        tag, n_views = part.split(":")
        blocks.append(views(tag)["features"][: int(n_views)].mean(axis=0))
        if tokens is None and "tokens" in views(tag):
            tokens = views(tag)["tokens"][: int(n_views)].mean(axis=0)
    if tokens is not None and len(blocks) > 1:
        extra = np.concatenate(blocks[1:], axis=1)[:, None, :]
        tokens = np.concatenate([tokens, np.broadcast_to(extra, (*tokens.shape[:2], extra.shape[2]))], axis=2)
    return np.concatenate(blocks, axis=1), tokens


def done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["setting"], r["method"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def put_features(adata, setting: str) -> None:
    """Put the features (and tokens) of ``setting`` where ``fit_histo2expr`` reads them."""
    slides = adata.obs["slide"].astype(str).to_numpy()
    adata.obsm["X_histo"], tokens = build(setting, adata.obsm["spatial"], slides)
    if tokens is None:
        adata.obsm.pop("X_histo_tokens", None)
    else:
        adata.obsm["X_histo_tokens"] = tokens


def run(args: argparse.Namespace) -> None:
    methods = args.methods.split(",")
    labels = {args.label.replace("{method}", method) for method in methods}
    if len(labels) < len(methods):
        msg = f"--label {args.label!r} would name the rows of {len(methods)} methods alike; put '{{method}}' in it."
        raise SystemExit(msg)
    if labels & set(hx.models.available_methods()):
        msg = f"--label {args.label!r} gives a bare method name, which holds this study's rows; add to it, e.g. '{{method}} (...)'."
        raise SystemExit(msg)
    adata = cohort()
    finished = done(ROWS)
    for setting in args.settings.split(";"):
        put_features(adata, setting)
        for seed in map(int, args.seeds.split(",")):
            for method in methods:
                label = args.label.replace("{method}", method)
                if (setting, label, seed) in finished:
                    continue
                tic, cpu = time.perf_counter(), time.process_time()
                hx.tl.fit_histo2expr(
                    adata, method=method, cv="leave_one_slide_out", genes=250, seed=seed, key_added="row",
                    progress=False, refit=False, **json.loads(args.params),
                )  # fmt: skip
                folds = adata.uns["row"]["folds"]
                row = {
                    "setting": setting,
                    "method": label,
                    "seed": seed,
                    "seconds": time.perf_counter() - tic,
                    "cpu_seconds": time.process_time() - cpu,  # one thread: the time on a core of its own
                    "per_slide": folds[["slide", *COLUMNS]].to_dict(orient="records"),
                }
                if "best_epochs" in folds:  # the epochs kept per fold (members '; '-separated)
                    row["best_epochs"] = [str(epochs) for epochs in folds["best_epochs"]]
                with ROWS.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(setting, label, seed, f"PCC(ACG) {folds['pcc_acg'].mean():.4f}", flush=True)


def _spots(rows, features, targets, slides, coords, suffix=""):
    """Training spots of ``rows``; a suffix makes jittered copies slides of their own (never neighbours of the originals)."""
    from histo2expr.models.base import SpotSet

    groups = np.char.add(slides[rows], suffix)
    return SpotSet(coords=coords[rows], groups=groups, features=features[rows], targets=targets[rows])


def augment(args: argparse.Namespace) -> None:
    """Each fold trains on the training spots and on jittered copies of them (a slide of their own each)."""
    from histo2expr._validation import log_expression
    from histo2expr.metrics import pcc_acg, pcc_top
    from histo2expr.models import get_method
    from histo2expr.models.base import SpotSet, TrainConfig, concat_spots
    from histo2expr.models.scaling import Standardizer
    from histo2expr.pp import select_genes
    from histo2expr.splits import inner_validation_split, leave_one_slide_out

    adata = cohort()
    slides = adata.obs["slide"].astype(str).to_numpy()
    coords = np.asarray(adata.obsm["spatial"], dtype=float)
    copies = args.copies.split(",") if args.copies else []
    features = build(args.setting, coords, slides)[0]
    jittered = [build(args.setting.replace("f1:", f"{copy}:"), coords, slides)[0] for copy in copies]
    setting = f"{args.setting} + {len(copies)} stain-jittered copies"
    finished = done(AUGMENTED)
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            if (setting, method, seed) in finished:
                continue
            tic, per_slide = time.perf_counter(), []
            for fold in leave_one_slide_out(slides):
                train, test = fold.train, fold.test
                genes = select_genes(adata, 250, slides=sorted(set(slides[train])), inplace=False)
                expression = log_expression(adata, genes)
                targets = (
                    Standardizer(floor_ratio=0.01, clip=None).fit(expression[train]).transform(expression)
                )
                fit, validation, _ = inner_validation_split(slides[train], seed=seed)
                fit_rows = train[fit]
                fit_spots = concat_spots(
                    [_spots(fit_rows, features, targets, slides, coords)]
                    + [_spots(fit_rows, j, targets, slides, coords, f"~{i}") for i, j in enumerate(jittered)]
                )
                validation_spots = _spots(train[validation], features, targets, slides, coords)
                model = get_method(method)()
                model.fit(fit_spots, validation_spots, TrainConfig(progress=False, seed=seed))
                predicted = model.predict(
                    SpotSet(coords=coords[test], groups=slides[test], features=features[test])
                )
                per_slide.append(
                    {
                        "slide": slides[test][0],
                        "pcc_acg": pcc_acg(targets[test], predicted),
                        "pcc_heg50": pcc_top(expression[test], predicted, 50),
                    }
                )
            row = {"setting": setting, "method": method, "seed": seed, "seconds": time.perf_counter() - tic}
            with AUGMENTED.open("a") as handle:
                handle.write(json.dumps({**row, "per_slide": per_slide}) + "\n")
            print(
                setting,
                method,
                seed,
                f"PCC(ACG) {np.mean([r['pcc_acg'] for r in per_slide]):.4f}",
                flush=True,
            )


def _rows(path: Path) -> pd.DataFrame:
    """One row per (setting, method, seed, slide)."""
    records = []
    for row in read_rows(path):
        for slide in row["per_slide"]:
            records.append({"setting": row["setting"], "method": row["method"], "seed": row["seed"], **slide})
    return pd.DataFrame(records)


def _is_study(methods: pd.Series) -> pd.Series:
    """Which rows are this study's: those under a method's bare name (see the module docstring)."""
    return methods.isin(hx.models.available_methods())


def _cpu_seconds(path: Path) -> pd.DataFrame:
    """Mean CPU seconds of a leave-one-slide-out run per setting and method (this study's rows that recorded it)."""
    table = pd.DataFrame(
        [r for r in read_rows(path) if "cpu_seconds" in r], columns=["setting", "method", "cpu_seconds"]
    )
    table = table[_is_study(table["method"])]
    return table.groupby(["setting", "method"])["cpu_seconds"].agg(["size", "mean"]).round(0)


def _summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per setting and method: the mean over slides, then its mean ± sd over seeds; the same for B4 alone."""
    keys = ["setting", "method", "seed"]
    per_seed = rows.groupby(keys)[["pcc_acg", "pcc_heg50"]].mean()
    per_seed["B4"] = rows[rows["slide"] == "B4"].set_index(keys)["pcc_acg"]

    table = per_seed.groupby(["setting", "method"]).agg(["size", mean_and_sd])
    table = pd.DataFrame(
        {
            "seeds": table[("pcc_acg", "size")],
            "PCC(ACG)": table[("pcc_acg", "mean_and_sd")],
            "PCC(HEG@50)": table[("pcc_heg50", "mean_and_sd")],
            "B4 PCC(ACG)": table[("B4", "mean_and_sd")],
        }
    )
    return table.reset_index()


def _stain_effect(rows: pd.DataFrame, augmented: pd.DataFrame, base: str = "f1:4") -> pd.DataFrame:
    """Per method, B4's PCC(ACG) (and the mean over slides) on ``base``, Macenko-normalised and with jittered copies."""
    variants = {
        base: rows[rows["setting"] == base],
        "Macenko": rows[rows["setting"] == base.replace("f1:", "f1_macenko:")],
        "HED-jittered copies": augmented[augmented["setting"].str.startswith(f"{base} + ")]
        if not augmented.empty
        else augmented,
    }
    table = {}
    for name, part in variants.items():
        if part.empty:
            continue
        per_seed = part.groupby(["method", "seed"])
        table[f"B4, {name}"] = part[part["slide"] == "B4"].groupby("method")["pcc_acg"].mean()
        table[f"mean, {name}"] = per_seed["pcc_acg"].mean().groupby("method").mean()
    return pd.DataFrame(table).round(4)


def _labelled(rows: pd.DataFrame) -> pd.DataFrame:
    """The labelled runs of the cache (not this study's): their settings and seeds, per label."""
    runs = rows.drop_duplicates(["setting", "method", "seed"])
    table = runs.groupby(["method", "setting"])["seed"].agg(lambda seeds: ", ".join(map(str, sorted(seeds))))
    return table.rename("seeds").reset_index().rename(columns={"method": "label"})


def report(args: argparse.Namespace) -> None:
    cached, augmented = _rows(ROWS), _rows(AUGMENTED)
    study = _is_study(cached["method"])
    rows = cached[study]
    seconds = {path.stem: float(np.load(path)["seconds"]) for path in sorted(CACHE.glob("*.npz"))}
    lines = [
        "# her2st, leave-one-slide-out: frozen features for every method",
        "",
        "Made with `benchmarks/her2st_features.py` (its docstring lists the steps); 1193 spots on 6 sections, "
        "250 highly expressed genes chosen on the training slides of each fold, frozen ImageNet "
        "EfficientNet-Lite0, 224 px patches at 0.69 µm/px, one torch thread on a 2-core machine shared with "
        "other jobs. Same folds and genes in every row; seeds change the initialisation, batches and the inner "
        "validation slide.",
        "",
        "Every method at the defaults it had when these rows ran (2026-11-30, before main a914795), not today's: "
        "CHRep and BLEEP stopped at patience 10 (now 3), CMRCNet at patience 10 without weight averaging (now 5, "
        "`average_epochs=3`), NH2ST was one fit (now an ensemble of 3). The rows at today's defaults are in "
        "`her2st_patience.md` (CHRep, BLEEP, CMRCNet), `her2st_ensemble.md` (NH2ST) and "
        "`backend_acceptance.md` (CHRep on the ONNX features); ridge's and ST-Net's defaults are unchanged. "
        "This report shows the rows under a method's bare name only; the labelled runs of the same cache "
        "(other settings or defaults) are listed at the end.",
        "",
        "Settings: `f1:V` spot view averaged over V dihedral views (1, 4 quarter turns, 8 with mirrors), `f2:V` / "
        "`f3:V` the 2x / 3x wider context view, `nbr6` the mean spot view of the 6 nearest spots of the slide, "
        "`f1_macenko` Macenko-normalised patches, `lite1_f1` / `lite2_f1` the spot view of EfficientNet-Lite1 / "
        '-Lite2, `f1_onnx` the spot view run by ONNX Runtime (what `embed_patches(backend="auto")` runs on a '
        "CPU); '+' concatenates. `f1:4+nbr6` is what `hx.tl.embed_patches` computes by default.",
        "",
        "## Mean over held-out slides (mean ± sd over seeds)",
        "",
        _summary(rows).to_markdown(index=False),
        "",
    ]
    if not augmented.empty:
        lines += [
            "## Stain augmentation, frozen proxy (training also on HED-jittered copies)",
            "",
            _summary(augmented).to_markdown(index=False),
            "",
        ]
    stain = _stain_effect(rows, augmented)
    if not stain.empty:
        lines += [
            "## Slide shift: B4 (the one patient-B section, the hardest) under stain normalisation and augmentation",
            "",
            "PCC(ACG) on B4 and the mean over the six held-out slides, seed 0, on the `f1:4` spot view: as it is, "
            "Macenko-normalised per slide (`f1_macenko:4`), and trained also on two HED-jittered copies of the "
            "training spots (`augment`).",
            "",
            stain.to_markdown(),
            "",
        ]
    lines += ["## PCC(ACG) per held-out slide and seed", ""]
    for name, table in (("rows", rows), ("augmented", augmented)):
        if table.empty:
            continue
        wide = table.pivot_table(index=["setting", "method", "seed"], columns="slide", values="pcc_acg")
        lines += [f"### {name}", "", wide.round(4).to_markdown(), ""]
    lines += [
        "## CPU time of one leave-one-slide-out run (one thread; rows that recorded it)",
        "",
        "Process CPU seconds, i.e. about the wall time on a core of its own: the wall times of this shared "
        "machine (2 cores, load 8-12 while these ran) are not comparable between rows.",
        "",
        _cpu_seconds(ROWS).to_markdown(),
        "",
        "## Embedding time per cached view set (one thread, shared machine)",
        "",
        pd.Series(seconds, name="seconds").round(0).to_markdown(),
        "",
        "## Labelled runs in the same cache (not in the tables above)",
        "",
        "Runs named by `--label` (other settings or defaults). The reports of their own studies show them "
        "(`her2st_patience.md`, `her2st_ensemble.md`, `her2st_cmrcnet_averaging.md`, `her2st_member_cost.md`, "
        "`bf16_training.md`, `backend_acceptance.md`); a run still under way when this report was made may have "
        "none yet.",
        "",
        _labelled(cached[~study]).to_markdown(index=False),
        "",
    ]
    save_results(args.out, lines)


def main() -> None:
    parser, steps = steps_parser(__doc__)
    step = steps.add_parser("embed")
    step.add_argument("--encoder", default="efficientnet_lite0")
    step.add_argument("--field", type=float, default=1.0)
    step.add_argument("--views", type=int, default=8)
    step.add_argument("--tokens", action="store_true")
    step.add_argument("--stain", default=None)
    step.add_argument("--jitter", type=float, default=0.0)
    step.add_argument("--jitter-seed", type=int, default=1)
    step.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="what runs the encoder (InferenceEncoder)",
    )
    step.set_defaults(func=embed)
    step = steps.add_parser("run")
    step.add_argument("--settings", required=True)
    step.add_argument("--methods", default="ridge,stnet,bleep,chrep,cmrcnet,nh2st")
    step.add_argument("--seeds", default="0")
    step.add_argument("--params", default="{}", help="method settings as a JSON object")
    step.add_argument(
        "--label",
        required=True,
        help="name of the rows, '{method}' standing for the method's (bare method names: the rows of 2026-11-30)",
    )
    step.set_defaults(func=run)
    step = steps.add_parser("augment")
    step.add_argument("--setting", default="f1:4")
    step.add_argument("--copies", default="")
    step.add_argument("--methods", default="ridge,stnet,bleep,chrep,cmrcnet,nh2st")
    step.add_argument("--seeds", default="0")
    step.set_defaults(func=augment)
    step = steps.add_parser("report")
    step.add_argument("--out", default="her2st_features", help="name of the report in benchmarks/results")
    step.set_defaults(func=report)
    run_step(parser)


if __name__ == "__main__":
    main()
