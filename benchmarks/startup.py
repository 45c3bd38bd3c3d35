"""Start-up time: `fusionkit --help` and `fusionkit plugins` beside a bare `import torch`.

Each command runs ``--repeats`` times, interleaved so that machine noise hits
all three alike; the medians and their ratios to the torch import are reported.
It also checks that neither command imports timm or transformers, with their
plugins installed.

    .venv/bin/python benchmarks/startup.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from report import machine, markdown_table, write

HEAVY_CHECK = (
    "import json, runpy, sys\n"
    "sys.argv = ['fusionkit', *{argv!r}]\n"
    "try:\n    runpy.run_module('fusionkit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    "roots = {{m.split('.')[0] for m in sys.modules}}\n"
    "print('IMPORTS ' + json.dumps({{'heavy_modules_imported': sorted(roots & {{'timm', 'transformers'}}),"
    " 'plugin_modules_imported': sorted(roots & {{'fusionkit_timm', 'fusionkit_transformers'}})}}), file=sys.stderr)\n"
)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    py = sys.executable
    commands = {
        "python -c 'import torch'": [py, "-c", "import torch"],
        "fusionkit --help": [py, "-m", "fusionkit", "--help"],
        "fusionkit plugins": [py, "-m", "fusionkit", "plugins"],
    }
    for cmd in commands.values():  # warm the file cache
        timed(cmd)
    samples: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            samples[name].append(timed(cmd))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["python -c 'import torch'"]
    heavy = {}
    for name, argv in (("fusionkit --help", ["--help"]), ("fusionkit plugins", ["plugins"])):
        proc = subprocess.run([py, "-c", HEAVY_CHECK.format(argv=argv)], capture_output=True, text=True, check=True)
        line = [x for x in proc.stderr.splitlines() if x.startswith("IMPORTS ")][-1]
        heavy[name] = json.loads(line.removeprefix("IMPORTS "))
    data = {
        "machine": machine(),
        "repeats": args.repeats,
        "median_seconds": medians,
        "ratio_to_torch_import": {k: v / base for k, v in medians.items()},
        "samples": samples,
        "imports": heavy,
        "target": "fusionkit --help <= 1.5x import torch; no timm/transformers import",
        "met": medians["fusionkit --help"] / base <= 1.5 and not any(h["heavy_modules_imported"] for h in heavy.values()),
    }
    rows = [[k, f"{v:.3f}", f"{v / base:.2f}x", ", ".join(heavy.get(k, {}).get("heavy_modules_imported", [])) or "none"]
            for k, v in medians.items()]
    section = (
        "## Start-up time\n\n"
        f"`.venv/bin/python benchmarks/startup.py` (median of {args.repeats} interleaved runs; "
        f"{data['machine']['cpus']} CPUs, Python {data['machine']['python']}; every plugin in `plugins/` installed).\n\n"
        + markdown_table(["command", "median s", "vs import torch", "timm/transformers imported"], rows)
        + f"\n\nTarget `fusionkit --help` ≤ 1.5× `import torch`, no heavy imports: **{'met' if data['met'] else 'not met'}**.\n"
    )
    write("startup", data, section)


if __name__ == "__main__":
    main()
