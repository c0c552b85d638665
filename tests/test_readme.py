"""The README's commands, run as written on a fresh machine (empty HOME, no demo cache, OMP_NUM_THREADS unset):

* the demo command, twice in the same directory: both succeed, each in its own run directory, and what the first
  prints matches the ranges of the README's demo-summary block;
* the "pipeline in five commands" block, line by line.

The commands run in a scratch directory whose `launchers/`, `data_prep/`, `ds_configs/` link to this checkout, so
relative paths resolve as in a clone and nothing is written into the checkout.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DEMO_COMMAND = "deepspeed launchers/pretrain.py --deepspeed_config ds_configs/zero3.json"
NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _readme() -> str:
    with open(README, encoding="utf-8") as fh:
        return fh.read()


def _block(name: str) -> str:
    """The fenced code inside `<!-- name: ... -->` … `<!-- /name -->`."""
    m = re.search(rf"<!-- {name}:.*?-->\s*```\w*\n(.*?)```\s*<!-- /{name} -->", _readme(), re.S)
    assert m, f"README.md has no {name} block"
    return m.group(1)


def _fields(line: str) -> tuple[str, dict[str, tuple[float, float]]]:
    """'step 25/100: loss 1.5, held-out loss 2–3' → ('step 25/100', {'loss': (1.5, 1.5), 'held-out loss': (2, 3)})."""
    head, _, rest = line.partition(": ")
    out = {}
    for part in rest.split(", "):
        m = re.fullmatch(rf"(.+?) ({NUMBER})(?:[–-]({NUMBER}))?(?: s)?", part.strip())
        if m:
            lo = float(m.group(2))
            out[m.group(1)] = (lo, float(m.group(3)) if m.group(3) else lo)
    return head.strip(), out


def _commands(block: str) -> list[str]:
    """Shell lines of a block: continuation backslashes joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [ln.split("  #")[0].strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A scratch 'clone': the checkout's directories linked in, an empty HOME, the venv's tools first on PATH."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("launchers", "data_prep", "ds_configs", "grnformer_ds"):
        os.symlink(os.path.join(REPO, name), root / name)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "GRNFORMER_DS_CACHE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")}
    env.update(HOME=str(root / "home"), PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    os.makedirs(env["HOME"])
    return root, env


def _sh(command: str, clone, timeout: int = 600) -> subprocess.CompletedProcess:
    root, env = clone
    p = subprocess.run(shlex.split(command), cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{command}\nrc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_the_readme_block_parser():
    head, f = _fields("done: step 100, loss 150–260, held-out loss 185–225, 39 s")
    assert head == "done" and f == {"step": (100, 100), "loss": (150, 260), "held-out loss": (185, 225)}
    assert _commands("a \\\n  b  # note\n\nc\n") == ["a    b", "c"]


def test_demo_command_twice_prints_what_the_readme_says(clone):
    assert f"```bash\n{DEMO_COMMAND}\n```" in _readme(), "the README's demo command changed: update this test"
    root, _ = clone
    first = _sh(DEMO_COMMAND, clone)
    printed = first.stdout.splitlines()
    for expected in _block("demo-summary").strip().splitlines():
        head, ranges = _fields(expected)
        lines = [ln for ln in printed if ln.startswith(head + ":")]
        assert len(lines) == 1, f"README says a line '{head}: …' is printed; got:\n{first.stdout[-3000:]}"
        _, got = _fields(lines[0])
        for name, (lo, hi) in ranges.items():
            assert name in got and lo <= got[name][0] <= hi, f"{lines[0]!r} vs README {expected!r}"
    ours = [ln for ln in printed if not ln.startswith("[20")]  # after DeepSpeed's launcher's own log lines
    assert ours[1].startswith("run directory: runs/demo/") and "runs/demo/latest points to it" in ours[1], ours[:4]
    assert any(ln.startswith("threads: ") for ln in printed), "the thread choice is printed"
    # DeepSpeed's launcher processes say it (twice, before our code runs); the ranks no longer do
    assert (first.stdout + first.stderr).count("Setting accelerator to CPU") <= 2

    second = _sh(DEMO_COMMAND, clone)  # exactly the same command again: a new run directory, not an error
    runs = sorted(d for d in os.listdir(root / "runs" / "demo") if d[0].isdigit())
    assert len(runs) == 2 and os.readlink(root / "runs" / "demo" / "latest") == runs[1]
    assert f"run directory: runs/demo/{runs[1]}" in second.stdout
    for run in runs:
        assert os.path.isfile(root / "runs" / "demo" / run / "hf_model" / "model.safetensors")
    assert os.path.isfile(root / "runs" / "demo" / "mlflow.db")  # one tracking store for both runs


def test_pipeline_in_five_commands_runs_as_written(clone):
    commands = _commands(_block("pipeline"))
    assert len(commands) == 5 and "--infer" in commands[1]
    outputs = [_sh(c, clone).stdout for c in commands]
    assert "GRN assets written" in outputs[1]
    assert "done: step 20" in outputs[2] and "graphs True" in outputs[2]
    assert outputs[4].strip().splitlines()[-1] == "scgpt"
