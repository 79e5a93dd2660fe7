"""The same two-checkpoint linear combination by mergekit and by farcast: time and peak memory.

    pip install mergekit            # benchmark environment only
    python benchmarks/peer_mergekit.py --work /var/tmp/farcast-peer

A Llama-architecture run (transformers' classes, random init, about 1.1 GB of f32 per checkpoint,
saved with save_pretrained so mergekit recognises it) of three checkpoints; both tools write
-0.3 * first + 1.3 * last. farcast applies a fixed forecaster file (no fitting, no backtest), so
what is compared is the streaming alone, plus each tool's start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import timed_farcast  # noqa: E402

WEIGHTS = (-0.3, 1.3)
STEPS = (0, 100, 200)


def make_run(folder: Path) -> Path:
    if folder.exists():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    start = {name: value.detach().clone() for name, value in model.state_dict().items()}
    drift = {name: torch.randn_like(value) * 1e-3 for name, value in start.items()}
    for k, step in enumerate(STEPS):
        model.load_state_dict({name: start[name] + k * drift[name] for name in start})
        model.save_pretrained(folder / f"checkpoint-{step}", safe_serialization=True)
    return folder


def peak_of(command: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr[-2000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-peer"))
    args = parser.parse_args()
    run = args.work / "run"
    if not run.exists():  # built in a child: a large parent would inflate every child's peak RSS
        code = f"import peer_mergekit, pathlib; peer_mergekit.make_run(pathlib.Path({str(run)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
    first, last = run / "checkpoint-0", run / "checkpoint-200"
    recipe = args.work / "linear.yml"
    recipe.write_text(
        "merge_method: linear\nparameters:\n  normalize: false\ndtype: float32\nmodels:\n"
        f"  - model: {first}\n    parameters:\n      weight: {WEIGHTS[0]}\n"
        f"  - model: {last}\n    parameters:\n      weight: {WEIGHTS[1]}\n"
    )
    forecaster = args.work / "fixed.json"
    forecaster.write_text(
        json.dumps(
            {
                "format": "farcast-forecaster/1",
                "mode": "self",
                "first_step": 0,
                "context_end": 200,
                "offsets": [100],
                "weight": [[WEIGHTS[0]], [WEIGHTS[1]]],
                "bias": [0.0],
                "settings": {},
                "report": None,
            }
        )
    )
    mergekit_bin = str(Path(sys.executable).parent / "mergekit-yaml")
    rows = []
    for attempt in range(2):
        for tool in ("mergekit", "farcast"):
            out = args.work / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "mergekit":
                seconds, peak = peak_of([mergekit_bin, str(recipe), str(out), "--lazy-unpickle"])
            else:
                seconds, peak, _ = timed_farcast(
                    "predict", run, "--forecaster", forecaster, "-o", out, "--device", "cpu", "--quiet", "--json"
                )
            rows.append((tool, seconds, peak))
            print(f"{tool:8s} attempt {attempt + 1}: {seconds:6.2f} s, peak {peak:6.0f} MB", flush=True)
    ours = load_file(next((args.work / "out-farcast").glob("*.safetensors")))
    theirs = {}
    for file in (args.work / "out-mergekit").glob("*.safetensors"):
        theirs.update(load_file(file))
    common = sorted(set(ours) & set(theirs))
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in common)
    best = {tool: min((s, p) for t, s, p in rows if t == tool) for tool in ("mergekit", "farcast")}
    print(f"tensors compared: {len(common)} of {len(ours)}; largest difference {worst:.2e}")
    print(
        f"best of 2: mergekit {best['mergekit'][0]:.2f} s / {best['mergekit'][1]:.0f} MB, farcast {best['farcast'][0]:.2f} s / "
        f"{best['farcast'][1]:.0f} MB; time ratio farcast/mergekit {best['farcast'][0] / best['mergekit'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
