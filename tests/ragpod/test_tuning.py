"""A benchmark that runs a model in its own process starts again with the model processes' environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ragpod.processes import ROOT
from ragpod.tuning import MODEL_TUNING

SCRIPT = (
    "import json, os, sys; from ragpod.tuning import rerun_with_model_tuning; "
    "print('started', flush=True); rerun_with_model_tuning(); "
    "print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"
)


def test_a_program_starts_again_with_the_model_tuning_once_and_keeps_what_was_exported() -> None:
    env = {k: v for k, v in os.environ.items() if k not in MODEL_TUNING} | {"GOMP_SPINCOUNT": "1000"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *MODEL_TUNING], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[:2] == ["started", "started"]  # once as started, once again with the environment: no loop
    assert json.loads(lines[2]) == MODEL_TUNING | {"GOMP_SPINCOUNT": "1000"}
