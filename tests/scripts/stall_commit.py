"""Run a script with Orbax's commit of one checkpoint step held back forever.

    python stall_commit.py STEP SCRIPT [ARGS...]

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and commits it by
renaming that to ``<step>``. Here the rename for STEP blocks after printing
``STALLED <step>``: every array of that save is written, nothing is committed,
and a test can SIGKILL the process in exactly that state (a preemption in the
middle of a save). The script runs as ``__main__``, as from the shell.
"""

import asyncio
import os
import runpy
import sys

from orbax.checkpoint._src.path import async_path


def main() -> None:
    step, script, *args = sys.argv[1:]
    real_rename = async_path.rename

    async def rename(src, dst):
        if os.path.basename(str(dst)) == step:
            print(f"STALLED {step}", flush=True)
            while True:
                await asyncio.sleep(60)
        return await real_rename(src, dst)

    async_path.rename = rename
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
