"""Pixel conversion speed: ours (read + decode + LUT + letterbox to 896) against dcmtk's converters,
and pydicom's decoding plugins against each other per transfer syntax.

Run: ``.venv/bin/python benchmarks/pixels.py [--runs N] [--quick] [--stages]``. Prints Markdown tables for
docs/benchmarks.md ("Pixel conversion"). dcmtk is timed as a whole process (what a caller pays) and
also with a no-op run of the same binary (``--version``: exec + dynamic linking) subtracted.
Ours runs in-process on a warm interpreter, as the worker does.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402
from dicom_agent.pixels import (  # noqa: E402
    DECODER_PREFERENCE,
    RESIZE_REDUCING_GAP,
    load_for_model,
    read_dataset,
    to_display,
)
from tests.support.builders import make_cxr, save  # noqa: E402
from tests.support.compress import VARIANTS, compress  # noqa: E402

SIZE = 896
# (label, rows, cols): a 43 x 35 cm detector at ~0.14 mm, and a 2k square one
SHAPES = [("3000x2500", 3000, 2500), ("2048x2048", 2048, 2048)]
CONVERTED = ["uncompressed", "jpeg-lossless-sv1", "jpeg-ls"]
DECODER_VARIANTS = [
    "jpeg-ls",
    "jpeg-ls-near",
    "jpeg-lossless-sv1",
    "jpeg-lossless",
    "jpeg-baseline",
    "jpeg-extended",
    "rle",
    "jpeg2000-lossless",
]


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (dcmtk runs as a child)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def medians_ms(
    fns: dict[str, Callable[[], object]], runs: int
) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) of each callable. Runs are interleaved so the load of a shared
    machine falls on all contenders alike; CPU time is what the work itself costs, which on a
    busy 2-core box is the steadier figure. One untimed warm-up call each (caches, imports)."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), cpu_seconds()
            fn()
            wall[name].append((time.perf_counter() - start) * 1000)
            cpu[name].append((cpu_seconds() - start_cpu) * 1000)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def dcmtk_tool(variant: str) -> str:
    # dcmj2pnm has no JPEG-LS codec; dcml2pnm is its JPEG-LS sibling
    return "dcml2pnm" if variant.startswith("jpeg-ls") else "dcmj2pnm"


def run_quiet(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_inputs(folder: Path, rows: int, cols: int, variants: list[str]) -> dict[str, Path]:
    files = {"uncompressed": save(make_cxr(rows=rows, cols=cols, window=(2000, 3000)), folder / "src.dcm")}
    src8 = save(make_cxr(rows=rows, cols=cols, bits_stored=8, window=(128, 256)), folder / "src8.dcm")
    for variant in variants:
        source = src8 if variant == "jpeg-baseline" else files["uncompressed"]
        files[variant] = compress(source, variant, folder / f"{variant}.dcm")
    return files


def conversion_table(files: dict[str, Path], label: str, runs: int, out: Path) -> list[str]:
    lines = []
    for variant in CONVERTED:
        path = files[variant]
        tool = dcmtk_tool(variant)
        # long side to 896 like ours (rows are the long side in both shapes), PGM: no compression
        dcmtk_cmd = [tool, "+Wi", "1", "+Syv", str(SIZE), str(path), str(out / "out.pgm")]
        t = medians_ms(
            {
                "ours": lambda p=path: load_for_model(p, SIZE),
                "dcmtk": lambda c=dcmtk_cmd: run_quiet(c),
                "noop": lambda t=tool: run_quiet([t, "--version"]),
            },
            runs,
        )
        (ours, ours_cpu), (theirs, theirs_cpu), (noop, noop_cpu) = t["ours"], t["dcmtk"], t["noop"]
        net, net_cpu = theirs - noop, theirs_cpu - noop_cpu
        size_mb = path.stat().st_size / 1e6
        lines.append(
            f"| {label} | {variant} ({size_mb:.1f} MB) | {ours:.0f} / {ours_cpu:.0f} "
            f"| {tool} {theirs:.0f} / {theirs_cpu:.0f} | {net:.0f} / {net_cpu:.0f} "
            f"| {theirs / ours:.1f}x / {theirs_cpu / ours_cpu:.1f}x "
            f"| {net / ours:.1f}x / {net_cpu / ours_cpu:.1f}x |"
        )
        print(lines[-1], flush=True)
    return lines


def decoder_table(files: dict[str, Path], label: str, runs: int) -> list[str]:
    lines = []
    for variant in DECODER_VARIANTS:
        ds = read_dataset(files[variant])
        syntax = ds.file_meta.TransferSyntaxUID
        decoder = get_decoder(syntax)
        fns = {
            plugin: (
                lambda d=ds, p=plugin, dec=decoder: dec.as_array(
                    d, index=0, decoding_plugin=p, correct_unused_bits=False
                )
            )
            for plugin in sorted(decoder.available_plugins)
        }
        cells = []
        for plugin, fn in list(fns.items()):
            try:
                fn()
            except Exception as exc:  # a plugin that cannot decode this input is a finding too
                cells.append(f"{plugin} fails ({type(exc).__name__})")
                del fns[plugin]
        timed = medians_ms(fns, runs).items()
        cells = [f"{p} {wall:.0f} / {cpu:.0f}" for p, (wall, cpu) in timed] + cells
        chosen = DECODER_PREFERENCE.get(syntax, "pydicom order")
        lines.append(f"| {label} | {syntax.name} | {', '.join(cells)} | {chosen} |")
        print(lines[-1], flush=True)
    return lines


def resize_table(path: Path, label: str, runs: int) -> list[str]:
    """Letterbox resize of the display image: time and mean |difference| against Lanczos."""
    pixels = to_display(read_dataset(path)).pixels
    image = Image.fromarray(pixels)
    rows, cols = pixels.shape
    target = (round(cols * SIZE / max(rows, cols)), round(rows * SIZE / max(rows, cols)))
    R = Image.Resampling
    resizes: dict[str, Callable[[], Image.Image]] = {
        f.name: (lambda f=f: image.resize(target, f))
        for f in (R.LANCZOS, R.BICUBIC, R.BILINEAR, R.BOX)
    }
    ours = f"BILINEAR, reducing_gap {RESIZE_REDUCING_GAP} (ours)"
    resizes[ours] = lambda: image.resize(target, R.BILINEAR, reducing_gap=RESIZE_REDUCING_GAP)
    times = medians_ms(resizes, runs)
    reference = np.asarray(resizes["LANCZOS"](), dtype=np.int16)
    lines = []
    for name, resize in resizes.items():
        diff = np.abs(np.asarray(resize(), dtype=np.int16) - reference)
        lines.append(
            f"| {label} | {name} | {times[name][0]:.1f} / {times[name][1]:.1f} | {diff.mean():.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def stages_table(path: Path, label: str, runs: int) -> list[str]:
    """Where the time of one lossless-JPEG conversion goes: CPU ms per stage of
    ``load_for_model``, with the two ways of decoding the frame side by side."""
    from dicom_agent import _imagecodecs_plugin
    from dicom_agent.pixels import _grey_transform, _PixelModule, _subsample, to_model_input

    ds = read_dataset(path)
    pm = _PixelModule.from_dataset(ds)
    words = _imagecodecs_plugin.decode_single_frame(ds.PixelData)
    transform, _ = _grey_transform(ds, pm, None, [_subsample(words)], [])
    display = to_display(ds)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    times = medians_ms(
        {
            "read (dcmread)": lambda: read_dataset(path),
            "decode, direct from the fragments (used)": lambda: (
                _imagecodecs_plugin.decode_single_frame(ds.PixelData)
            ),
            "decode, through pydicom's runner": lambda: decoder.as_array(
                ds, index=0, decoding_plugin="imagecodecs", correct_unused_bits=False
            ),
            "window table + gather": lambda: transform.render(words),
            f"letterbox to {SIZE}": lambda: to_model_input(display, SIZE),
            "whole load_for_model": lambda: load_for_model(path, SIZE),
        },
        runs,
    )
    lines = [f"| {label} | {name} | {cpu:.1f} |" for name, (_, cpu) in times.items()]
    print("\n".join(lines), flush=True)
    return lines


def machine() -> str:
    version = subprocess.run(["dcmj2pnm", "--version"], capture_output=True, text=True).stdout
    dcmtk = next((w for w in version.split() if w.startswith("v3")), "?")
    return (
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores usable, Python {platform.python_version()}, "
        f"numpy {np.__version__}, Pillow {PIL.__version__}, pydicom {pydicom.__version__}, "
        f"dcmtk {dcmtk}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per cell (median)")
    parser.add_argument("--quick", action="store_true", help="only the 2048x2048 shape")
    parser.add_argument(
        "--stages", action="store_true", help="only the per-stage breakdown of lossless JPEG"
    )
    args = parser.parse_args()
    print(f"Machine: {machine()}; median of {args.runs} runs\n")
    conv = [
        "| image | input | ours ms | dcmtk ms | dcmtk − no-op ms | speed-up | speed-up vs − no-op |",
        "|---|---|---|---|---|---|---|",
    ]
    dec = ["| image | transfer syntax | plugin: decode ms | chosen |", "|---|---|---|---|"]
    res = ["| image | filter | resize ms | mean abs diff vs LANCZOS |", "|---|---|---|---|"]
    print("All times: median wall ms / median CPU ms.\n")
    print("\n".join(conv))
    shapes = SHAPES[1:] if args.quick else SHAPES
    if args.stages:
        stages = ["| image | stage (JPEG lossless SV1) | CPU ms |", "|---|---|---|"]
        with tempfile.TemporaryDirectory() as tmp:
            for label, rows, cols in shapes:
                files = make_inputs(Path(tmp) / label, rows, cols, ["jpeg-lossless-sv1"])
                stages += stages_table(files["jpeg-lossless-sv1"], label, args.runs)
        print("\n" + "\n".join(stages))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for label, rows, cols in shapes:
            folder = Path(tmp) / label
            files = make_inputs(folder, rows, cols, sorted(set(DECODER_VARIANTS) | {"jpeg-lossless-sv1"}))
            conv += conversion_table(files, label, args.runs, folder)
            dec += decoder_table(files, label, args.runs)
            res += resize_table(files["uncompressed"], label, args.runs)
    print("\n" + "\n\n".join("\n".join(table) for table in (conv, dec, res)))


if __name__ == "__main__":
    assert set(DECODER_VARIANTS) <= set(VARIANTS)
    main()
