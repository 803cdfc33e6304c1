"""Faithfulness of every map for the shipped checkpoints: `visattn faithfulness` on each,
JSON kept in benchmarks/faithfulness/, all tables in benchmarks/faithfulness.md.

    python -m benchmarks.faithfulness                    # every shipped checkpoint, n=500
    python -m benchmarks.faithfulness --only seed_cnn --n 100
    python -m benchmarks.faithfulness --render           # tables from the JSON already there
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from visattn import paths
from visattn.faithfulness import markdown_table
from visattn.zoo import shipped_checkpoints

ROOT = paths.root()
OUT = Path(__file__).resolve().parent / "faithfulness"


def run(name: str, path: str, n: int, data: str) -> None:
    """One checkpoint through the CLI; its JSON (with n, data and date) to OUT/NAME.json."""
    out = subprocess.run([sys.executable, "-m", "visattn", "faithfulness", path, "--data", data, "--n", str(n),
                          "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    record = {"checkpoint": path, "n": n, "data": data, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "results": json.loads(out)}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=2))


def render() -> str:
    parts = ["# Faithfulness of each map (deletion / insertion, Petsiuk et al. 2018)\n",
             "Mean AUC over a fixed random sample of N test images (seed 0) (predicted class, 16 steps); removed pixels become a "
             "strong blur or the image's mean colour. A random map is the floor.\n"]
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        parts.append(f"## {f.stem} (n = {r['n']}, {r['date']})\n\n{markdown_table(r['results'])}\n")
    text = "\n".join(parts)
    (OUT.parent / "faithfulness.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--data", default=str(paths.data()))
    p.add_argument("--render", action="store_true", help="only rebuild faithfulness.md from the JSON files")
    a = p.parse_args()
    if not a.render:
        for file, meta in shipped_checkpoints().items():
            name = file.removesuffix(".safetensors")
            if not a.only or name in a.only:
                print(f"{name} ...", flush=True)
                run(name, meta["path"], a.n, a.data)
    print(render())


if __name__ == "__main__":
    main()
