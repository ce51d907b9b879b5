"""One process of a training job started by ``torchrun`` in tests/test_distributed.py.

Reads a JSON job file (argv[1]): ``options`` (RunOptions fields), ``resume``, ``crash_after_epoch`` (the main
process stops after that epoch, standing for a crash) and ``out`` (a folder for this process's report). Each process
records the run-folder files it writes and the metrics ``train`` returned, as ``out/rank<r>.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vlprompt.engine import checkpoint
from vlprompt.engine.api import DataOptions, RunOptions, TrainConfig, train


class Crash(Exception):
    """Stands for a process dying between epochs."""


def record_writes(written: list[str]) -> None:
    """Wrap the checkpoint module's writers so this process's report lists what it wrote."""
    for name in ("atomic_write_bytes", "atomic_write_json", "atomic_save_tensors", "save_prompt"):
        original = getattr(checkpoint, name)

        def wrapper(path, *args, _original=original, _name=name, **kwargs):
            written.append(f"{_name}:{Path(path).name}")
            return _original(path, *args, **kwargs)

        setattr(checkpoint, name, wrapper)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    opts = job["options"]
    options = RunOptions(model=opts["model"], method=opts["method"], method_options=opts["method_options"],
                         data=DataOptions(**opts["data"]), train=TrainConfig(**opts["train"]), output=opts["output"])
    written: list[str] = []
    record_writes(written)
    crash_after = job.get("crash_after_epoch")

    def log(message: str) -> None:
        if crash_after is not None and message.startswith(f"epoch {crash_after}/"):
            raise Crash(message)
        print(message, flush=True)  # the trainer logs in the main process only

    report: dict = {"rank": rank, "written": written}
    try:
        report["result"] = train(options, resume=job.get("resume", False), progress=False, log=log)
    except Exception as err:  # the report says how this process ended; the exit status says it failed
        report["error"] = f"{type(err).__name__}: {err}"
        Path(job["out"], f"rank{rank}.json").write_text(json.dumps(report))
        raise
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
