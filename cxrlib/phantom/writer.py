"""Write a synthetic chest X-ray phantom in the MIMIC-CXR-JPG layout: plan every image (mm), render each in
worker processes at any size, write MIMIC's CSVs and the truth; same options, same bytes (docs/phantom.md)."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..fileio import atomic_write, write_csv_atomic, write_text_atomic
from ..labels import FINDINGS
from .anatomy import (
    PIXEL_SPACING_SHORT_SIDE_MM,
    Canvas,
    add_polyline,
    bump_haze,
    expose,
    frontal_density,
    lung_masks,
    native_size,
    plan_bumps,
    plan_ribs,
    plan_vessels,
    sample_subject,
    splat_vessels,
)
from .findings import (
    CARDIOMEGALY,
    ENLARGED_CARDIOMEDIASTINUM,
    NO_FINDING_EXCLUDES,
    PATHOLOGIES,
    PREVALENCES,
    Design,
    Edema,
    Fracture,
    Pneumothorax,
    Scene,
    plan_findings,
    render_findings,
    rendered_presence,
    sample_labels,
)


def _hex_id(rng) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def output_size(native_w: int, native_h: int, max_size: int | None) -> tuple[int, int]:
    """(width, height) of the written image: the native size with its long side capped at ``max_size``."""
    if not max_size or max(native_w, native_h) <= max_size:
        return native_w, native_h
    s = max_size / max(native_w, native_h)
    return max(round(native_w * s), 8), max(round(native_h * s), 8)


def plan_frontal(rng: np.random.Generator, subject: dict, drawn: dict[str, str], design: Design) -> dict:
    """Draw the geometry, exposure, distractors and finding parameters of one frontal image (mm)."""
    width, height = native_size(rng)
    spacing = PIXEL_SPACING_SHORT_SIDE_MM / min(width, height)
    fov_w, fov_h = width * spacing, height * spacing
    thorax = min(subject["thorax_mm"] * rng.uniform(0.97, 1.03), 0.92 * fov_w)
    lung_h = min(thorax * subject["height_ratio"], 0.80 * fov_h)
    scale = thorax / 290.0
    cx = float(rng.normal(0, 6))
    y_apex = max(float(-0.5 * lung_h + rng.uniform(-0.06, 0.03) * fov_h), -0.5 * fov_h + 0.08 * fov_h)
    dome = subject["dome_mm"] * scale
    ctr = CARDIOMEGALY.draw_ratio(rng, drawn["Cardiomegaly"], design)
    med = ENLARGED_CARDIOMEDIASTINUM.draw_ratio(rng, drawn["Enlarged Cardiomediastinum"], design)
    heart_w, left = ctr * thorax, subject["heart_left_frac"] + rng.uniform(-0.03, 0.03)
    heart_b = heart_w * subject["heart_shape"]
    y_heart = y_apex + lung_h - dome - rng.uniform(0.1, 0.3) * heart_b
    med_w, med_left = med * thorax, rng.uniform(0.45, 0.6)
    view = "PA" if rng.random() < 0.6 else "AP"
    domes = [dome * rng.uniform(1.0, 1.25), dome * rng.uniform(0.85, 1.0)]  # image left (patient R) higher
    lo, hi, gamma = (float(rng.uniform(a, b)) for a, b in ((-0.15, 0.1), (1.15, 1.6), (0.75, 1.35)))
    exposure = {"lo": lo, "hi": hi, "gamma": gamma, "tilt": [float(rng.normal(0, 0.05)) for _ in range(2)]}
    heart = dict(right_mm=(1 - left) * heart_w, left_mm=left * heart_w)  # towards the image left, right
    heart.update(y=y_heart, b=heart_b, power=subject["heart_power"])
    plan = {"view": view, "native_width": width, "native_height": height, "fov_w": fov_w, "fov_h": fov_h}
    plan |= {"cx": cx, "thorax": thorax, "wall": subject["wall_mm"] * scale, "y_apex": y_apex}
    plan |= {"lung_h": lung_h, "apex_x": subject["apex_frac"] * thorax, "dome": domes, "ctr": ctr}
    plan["heart"] = heart
    plan |= {"mediastinum_ratio": med, "mediastinum": [(1 - med_left) * med_w, med_left * med_w]}
    plan |= {"exposure": exposure, "noise_seed": int(rng.integers(2**31)), "noise": design.noise}
    plan["hilum_y"] = y_apex + rng.uniform(0.38, 0.46) * lung_h
    plan["vessels"] = plan_vessels(rng, plan)
    plan["ribs"] = plan_ribs(rng, plan)
    plan["bumps"] = plan_bumps(rng, plan)
    plan["findings"] = plan_findings(rng, plan, drawn, design)
    return plan


def render_frontal(plan: dict, width: int, height: int) -> tuple[np.ndarray, dict]:
    """Render a frontal plan at width x height px; returns (uint8 image, pixel-space truth details)."""
    canvas = Canvas(width, height, plan["fov_w"], plan["fov_h"])
    x, y = canvas.x - plan["cx"], canvas.y
    sides = lung_masks(plan, canvas)
    lungs = sides[0] + sides[1]
    scene = Scene(canvas, plan, x, y, lungs, sides)
    plans = plan["findings"]
    haze = bump_haze(canvas, plan)  # soft one-sided bumps and the edema haze, before air is subtracted
    Edema.haze(haze, scene, plans["Edema"])
    vessels = splat_vessels(canvas, plan["vessels"])  # lung texture, zero-mean where a pneumothorax is
    vessels *= lungs
    vessels = Pneumothorax.texture(vessels, scene, plans["Pneumothorax"])
    bend = partial(Fracture.bend_rib, scene, plans["Fracture"])
    density = frontal_density(plan, canvas, lungs, haze, vessels, bend)
    truth = render_findings(density, scene)
    return expose(density, canvas, plan), truth


def plan_lateral(rng: np.random.Generator, frontal: dict) -> dict:
    """A simplified lateral view of the same patient (see :func:`render_lateral`)."""
    plan = dict(frontal, view="LATERAL")
    w, h = frontal["native_height"], frontal["native_width"]
    if rng.random() < 0.7:
        w, h = frontal["native_width"], frontal["native_height"]
    plan["native_width"], plan["native_height"] = w, h
    spacing = PIXEL_SPACING_SHORT_SIDE_MM / min(w, h)
    plan["fov_w"], plan["fov_h"] = w * spacing, h * spacing
    depth = frontal["thorax"] * rng.uniform(0.75, 0.9)
    return plan | {"depth": depth, "noise_seed": int(rng.integers(2**31))}


def render_lateral(plan: dict, width: int, height: int) -> tuple[np.ndarray, dict]:
    """A cartoon lateral: one lung field, the heart anterior, the spine posterior (docs/phantom.md)."""
    canvas = Canvas(width, height, plan["fov_w"], plan["fov_h"])
    x, y = canvas.x - plan["cx"], canvas.y  # x: anterior (image left) to posterior (image right)
    depth = plan["depth"]
    body = canvas.soft(depth / 2 + plan["wall"] - np.abs(x), 6.0)
    density = np.ones((height, width), np.float32) * body
    t = (y - plan["y_apex"]) / plan["lung_h"]
    half = depth / 2 - 10
    rounded = half * np.sqrt(np.clip(1 - (1 - np.clip(t / 0.3, 0, 1)) ** 2, 0, 1))
    floor = plan["y_apex"] + plan["lung_h"] - plan["dome"][0] * (1 - np.clip((x / half) ** 2, 0, 1)) + 0.1 * x
    lung = canvas.soft(rounded - np.abs(x), 2.0) * canvas.soft(t, 3.0) * canvas.soft(floor - y, 2.0)
    heart_r = plan["ctr"] * plan["thorax"] * 0.45
    hx, hy = -depth / 2 + 0.9 * heart_r, plan["y_apex"] + plan["lung_h"] - 0.6 * heart_r
    heart = canvas.soft(heart_r - np.hypot(x - hx, y - hy), 2.0)
    lung = lung * (1 - heart)
    effusion, devices = plan["findings"]["Pleural Effusion"], plan["findings"]["Support Devices"]
    if effusion.present:  # posterior costophrenic fluid, as high as the highest fluid level of the frontal
        fluid_mm = max(e.height for e in effusion.fluids)
        top = floor - fluid_mm * np.clip((x + half) / (2 * half), 0, 1) ** 2
        lung = lung * (1 - canvas.soft(y - top, 2.0))
    cx = plan["cx"]  # half the vessels, squeezed towards the hilum
    vessels = [
        {**v, "points": [(cx + 0.5 * (px - cx), py) for px, py in v["points"]]} for v in plan["vessels"][::2]
    ]
    density -= 0.58 * lung
    density += splat_vessels(canvas, vessels) * lung
    density += 0.12 * canvas.soft(22 - np.abs(x - depth / 2 + 35), 2.0) * body
    for w in devices.wires:
        if w.real:  # the wire seen from the side: its course squeezed to the lateral's depth
            points = [(cx + (p[0] - cx) * depth / plan["thorax"], p[1]) for p in w.points]
            add_polyline(density, canvas, points, w.a, "sharp", w.w)
    return expose(density, canvas, plan), {"heart_radius_px": heart_r / canvas.px}


def finding_examples(
    resolutions: Sequence[int] = (64, 512), seed: int = 0, size: int | None = None, **design_options
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{finding: {R: (with, without)}}``: one patient with and without each finding, R x R uint8."""
    design = Design(**design_options)
    size = size or max(512, 2 * max(resolutions))
    subject = dict(sample_subject(np.random.default_rng([int(seed), 99])), thorax_mm=290.0)
    base = {f: "absent" for f in PATHOLOGIES}
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for finding in FINDINGS:
        shown = dict(base, **{"Pleural Effusion" if finding == "No Finding" else finding: "strong"})
        images = []
        for state in (base, shown) if finding == "No Finding" else (shown, base):
            plan = plan_frontal(np.random.default_rng([int(seed), 5]), subject, state, design)
            width, height = output_size(plan["native_width"], plan["native_height"], size)
            images.append(render_frontal(plan, width, height)[0])
        lanczos = Image.Resampling.LANCZOS
        out[finding] = {
            int(r): tuple(np.asarray(Image.fromarray(im, "L").resize((r, r), lanczos)) for im in images)
            for r in resolutions
        }
    return out


def plan_dataset(subjects: int, seed: int = 0, **design_options) -> tuple[list[dict], Design]:
    """Draw every study's ids, labels and image plans (no rendering). One entry per image."""
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    design = Design(**design_options)
    root = np.random.SeedSequence([int(seed), 20240229])
    id_rng = np.random.default_rng(root.spawn(1)[0])
    subject_ids = 10_000_000 + id_rng.choice(9_999_999, size=subjects, replace=False)
    p_more = 1 - 1 / design.studies_per_subject
    more = id_rng.geometric(1 - p_more, size=subjects) if p_more > 0 else np.ones(subjects, int)
    studies = np.minimum(more, 12)
    study_ids = 50_000_000 + id_rng.choice(9_999_999, size=int(studies.sum()), replace=False)
    label_rng = np.random.default_rng(root.spawn(2)[1])
    labels = sample_labels(label_rng, design.prevalence, int(studies.sum()))
    entries, k = [], 0
    for s in range(subjects):
        subject_rng = np.random.default_rng([int(seed), 7, s])
        subject = sample_subject(subject_rng)
        draw = subject_rng.random
        split = "test" if draw() < 0.05 else "validate" if draw() < 0.05 else "train"
        day = int(subject_rng.integers(0, 365 * 60))
        for j in range(int(studies[s])):
            rng, study_id = np.random.default_rng([int(seed), 11, s, j]), int(study_ids[k])
            row = {f: labels.at[k, f] for f in FINDINGS}
            drawn = rendered_presence(row, rng)
            day += int(rng.integers(1, 400))
            date = (pd.Timestamp("2110-01-01") + pd.Timedelta(days=day)).strftime("%Y%m%d")
            views = ["frontal"] + (["lateral"] if rng.random() < design.lateral_fraction else [])
            frontal_plan = plan_frontal(rng, subject, drawn, design)
            for view in views:
                plan = frontal_plan if view == "frontal" else plan_lateral(rng, frontal_plan)
                ids = {"dicom_id": _hex_id(rng), "subject_id": int(subject_ids[s]), "study_id": study_id}
                h, m, sec, ms = (int(rng.integers(0, top)) for top in (24, 60, 60, 1000))
                time = f"{h:02d}{m:02d}{sec:02d}.{ms:03d}"
                entries.append(ids | {"split": split, "date": date, "time": time, "labels": row})
                entries[-1] |= {"drawn": drawn, "plan": plan}
            k += 1
    return entries, design


def _render_entry(args) -> dict:
    """Render and write one image; returns its size and truth details."""
    entry, max_size, out_dir = args
    plan = entry["plan"]
    width, height = output_size(plan["native_width"], plan["native_height"], max_size)
    image, details = (render_lateral if plan["view"] == "LATERAL" else render_frontal)(plan, width, height)
    path = out_dir / image_relpath(entry["subject_id"], entry["study_id"], entry["dicom_id"])
    with atomic_write(path, "wb") as handle:
        Image.fromarray(image, "L").save(handle, format="JPEG", quality=95)
    details["thorax_px"] = plan["thorax"] / (plan["fov_w"] / width)
    details["heart_px"] = plan["ctr"] * plan["thorax"] / (plan["fov_w"] / width)
    details["mm_per_px"] = plan["fov_h"] / height
    return {"width": width, "height": height, "details": details}


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> Path:
    """``files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg`` as in MIMIC-CXR-JPG."""
    s = str(subject_id)
    return Path("files") / f"p{s[:2]}" / f"p{s}" / f"s{study_id}" / f"{dicom_id}.jpg"


_VIEW_TEXT = {
    "PA": ("CHEST (PA AND LAT)", "postero-anterior", "Erect"),
    "AP": ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent"),
    "LATERAL": ("CHEST (PA AND LAT)", "lateral", "Erect"),
}


def make_phantom(
    out_dir: str | os.PathLike,
    subjects: int,
    seed: int = 0,
    max_size: int | None = None,
    workers: int | None = None,
    **design_options,
) -> Path:
    """Write a phantom to ``out_dir`` (long side capped at ``max_size``; options: :class:`Design`'s)."""
    out_dir = Path(out_dir)
    entries, design = plan_dataset(subjects, seed, **design_options)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    jobs = [(e, max_size, out_dir) for e in entries]
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else nullcontext() as pool:
        results = pool.map(_render_entry, jobs, chunksize=4) if pool else map(_render_entry, jobs)
        outputs = list(tqdm(results, total=len(jobs), desc="phantom", unit="img"))
    _write_tables(out_dir, entries, outputs, design, subjects, seed, max_size)
    return out_dir


def _rows(entry: dict, info: dict) -> tuple[dict, dict]:
    """An image's rows of MIMIC's metadata table and of phantom_truth.csv."""
    ids, view = {k: entry[k] for k in ("dicom_id", "subject_id", "study_id")}, entry["plan"]["view"]
    description, view_text, orientation = _VIEW_TEXT[view]
    row = ids | {"PerformedProcedureStepDescription": description, "ViewPosition": view}
    row |= {"Rows": info["height"], "Columns": info["width"], "StudyDate": entry["date"]}
    row |= {"StudyTime": entry["time"], "ProcedureCodeSequence_CodeMeaning": description}
    row |= {"ViewCodeSequence_CodeMeaning": view_text}
    row |= {"PatientOrientationCodeSequence_CodeMeaning": orientation}
    truth = ids | {"view": view, "width": info["width"], "height": info["height"]}
    drawn = entry["drawn"]
    truth |= {f"present_{finding}": int(drawn[finding] != "absent") for finding in PATHOLOGIES}
    sick = any(drawn[f] != "absent" for f in PATHOLOGIES if f not in NO_FINDING_EXCLUDES)
    truth["present_No Finding"] = int(not sick)
    plan = entry["plan"]
    truth |= {"ctr": round(plan["ctr"], 4), "mediastinum_ratio": round(plan["mediastinum_ratio"], 4)}
    edema = plan["findings"]["Edema"].a if drawn["Edema"] != "absent" else 0.0
    truth["edema_amplitude"] = round(edema, 4)
    truth["details"] = json.dumps(_rounded(info["details"]), sort_keys=True)
    return row, truth


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _gzip_csv(frame: pd.DataFrame, out_dir: Path, table: str) -> None:
    # mtime=0 keeps the gzip header (and so the file) identical across runs.
    path = out_dir / f"mimic-cxr-2.0.0-{table}.csv.gz"
    with atomic_write(path, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(frame.to_csv(index=False).encode())


def _write_tables(out_dir, entries, outputs, design, subjects, seed, max_size) -> None:
    meta_rows, truth_rows = zip(*map(_rows, entries, outputs), strict=True)
    _gzip_csv(pd.DataFrame(list(meta_rows)), out_dir, "metadata")
    labels = pd.DataFrame([{k: e[k] for k in ("subject_id", "study_id")} | e["labels"] for e in entries])
    labels = labels.drop_duplicates("study_id").sort_values(["subject_id", "study_id"], kind="stable")
    _gzip_csv(labels.astype(dict.fromkeys(FINDINGS, "Float64")), out_dir, "chexpert")
    _gzip_csv(pd.DataFrame(entries)[["dicom_id", "study_id", "subject_id", "split"]], out_dir, "split")
    write_csv_atomic(pd.DataFrame(list(truth_rows)), out_dir / "phantom_truth.csv")
    write_text_atomic(
        "Synthetic chest X-ray teaching phantom (cxrlib.phantom) - NOT real patients, NOT anatomy.\n"
        "Layout and CSV schemas follow MIMIC-CXR-JPG v2.0.0 so the same code runs on real data.\n"
        f"subjects={subjects} seed={seed} max_size={max_size} images={len(entries)} design={design}\n"
        "phantom_truth.csv: per image, what is really drawn (present_<finding>), the cardiothoracic and\n"
        "mediastinal ratios, and finding positions/sizes in pixels of the written image.\n"
        "Labels: 1 positive, 0 negative, -1 uncertain, blank not mentioned. See docs/phantom.md.\n",
        out_dir / "README.txt",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrlib.phantom", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (MIMIC-CXR-JPG layout)")
    parser.add_argument("--subjects", type=int, default=60, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--max-size", type=int, default=None, help="long side cap (px; default: native)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, <= 8)")
    for option in dataclasses.fields(Design):  # every design option, with Design's default
        kind, choices = type(option.default), PREVALENCES if option.name == "prevalence" else None
        flag, help_ = f"--{option.name.replace('_', '-')}", "design option (default %(default)s)"
        parser.add_argument(flag, type=kind, default=option.default, choices=choices, help=help_)
    args = parser.parse_args(argv)
    design = {option.name: getattr(args, option.name) for option in dataclasses.fields(Design)}
    out = make_phantom(args.out, args.subjects, args.seed, args.max_size, args.workers, **design)
    print(f"phantom written to {out}")
    return 0


def ensure_phantom(
    root: str | os.PathLike, subjects: int, seed: int = 0, max_size: int | None = None, **design_options
) -> Path:
    """Write a phantom to ``root`` unless the same one (same settings) is already complete there."""
    root = Path(root)
    marker = root / "phantom_settings.json"  # written last: the phantom in this folder is complete
    wanted = {"subjects": subjects, "seed": seed, "max_size": max_size, "options": design_options}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    make_phantom(root, subjects, seed, max_size, **design_options)
    write_text_atomic(json.dumps(wanted, indent=2), marker)
    return root
