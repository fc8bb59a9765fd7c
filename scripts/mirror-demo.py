#!/usr/bin/env python3
"""The mirror half of scripts/run.sh: once the workload guest is writing its disk, mirror
the disk to a new qcow2 image over QMP (drive-mirror), wait for BLOCK_JOB_READY, complete
the job, and check that the drive now uses the target, all while the guest keeps writing.

Usage: mirror-demo.py DEMO_DIR (holding qmp.sock and serial.log; the target is
DEMO_DIR/disk0-mirror.qcow2). Exits 0 when the pivot happened.
"""

import asyncio
import os
import sys
import time

from qemu.qmp import EventListener, QMPClient


def say(msg: str) -> None:
    print(f"mirror-demo: {msg}", flush=True)


def wait_for(path: str, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if text.encode() in f.read():
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"mirror-demo: no '{text}' in {path} after {seconds} s")


async def main(demo: str) -> int:
    target = os.path.join(demo, "disk0-mirror.qcow2")
    # The guest has begun its write-verify loop: the mirror runs under its writes.
    wait_for(os.path.join(demo, "serial.log"), "write-verify-loop: ", 120)
    qmp = QMPClient("mirror-demo")
    await qmp.connect(os.path.join(demo, "qmp.sock"))
    listener = EventListener()
    with qmp.listen(listener):
        say(f"drive-mirror disk0 -> {target} (sync=full) while the guest writes")
        await qmp.execute(
            "drive-mirror",
            {"device": "disk0", "target": target, "sync": "full", "format": "qcow2"},
        )
        async for ev in listener:
            name, data = ev["event"], ev.get("data", {})
            if name == "BLOCK_JOB_READY":
                say(f"BLOCK_JOB_READY after {data['offset']} bytes; block-job-complete")
                await qmp.execute("block-job-complete", {"device": "disk0"})
            elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                if name == "BLOCK_JOB_CANCELLED" or "error" in data:
                    say(f"the mirror failed: {name} {data}")
                    return 1
                break
    block = await qmp.execute("query-block")
    now = block[0]["inserted"]["file"]
    await qmp.disconnect()
    if now != target:
        say(f"disk0 still uses {now}")
        return 1
    say(f"BLOCK_JOB_COMPLETED: disk0 now uses {now}; the guest goes on writing there")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
