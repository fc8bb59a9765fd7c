#!/usr/bin/env python3
"""Storage migration for disks that are not shared, the libvirt flow, over QMP with the
async `qemu.qmp` client, between two running splitvmm instances (or QEMUs):

  destination (started with --incoming URI --paused and an empty image of the same size):
      nbd-server-start, nbd-server-add writable
  source: drive-mirror sync=full mode=existing to the destination's export;
      on BLOCK_JOB_READY: migrate; on MIGRATION completed: block-job-cancel, and wait for
      BLOCK_JOB_COMPLETED without `error`
  destination, only then: nbd-server-stop, cont

Usage:
  storage-migration-example.py SRC_QMP DST_QMP --migrate tcp:HOST:PORT \\
      --nbd HOST:PORT [--device disk0] [--copy-mode write-blocking] [--no-cont] \\
      [--transcript FILE]

SRC_QMP and DST_QMP are QMP unix socket paths. --nbd is where the destination's NBD
server listens, as the source reaches it. --no-cont leaves the destination paused after
nbd-server-stop (to inspect its image first). --transcript writes every command, reply
and event of both sides, in order, as JSON lines prefixed `src->`, `src<-`, `dst->`,
`dst<-`. Exits 0 once the destination runs (or, with --no-cont, is ready to).
"""

import argparse
import asyncio
import json
import sys

from qemu.qmp import EventListener, QMPClient


class Side:
    """One QMP connection, logging to the shared transcript."""

    def __init__(self, name: str, log: list):
        self.name = name
        self.log = log
        self.qmp = QMPClient(name)
        self.events = EventListener()

    async def connect(self, path: str) -> None:
        await self.qmp.connect(path)
        self.qmp.register_listener(self.events)

    async def run(self, cmd: str, args: dict | None = None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.log.append(f"{self.name}-> {json.dumps(msg)}")
        ret = await self.qmp.execute(cmd, args)
        self.log.append(f"{self.name}<- {json.dumps({'return': ret})}")
        return ret

    async def wait(self, name: str, done=lambda data: True, fail=()) -> dict:
        """The first event `name` whose data satisfies `done`; one named in `fail`
        (or a BLOCK_JOB_ERROR) ends the flow."""
        async for ev in self.events:
            self.log.append(f"{self.name}<- {json.dumps(dict(ev))}")
            data = ev.get("data", {})
            if ev["event"] in fail or ev["event"] == "BLOCK_JOB_ERROR":
                raise SystemExit(f"{self.name}: {ev['event']} {data}")
            if ev["event"] == name and done(data):
                return data
        raise SystemExit(f"{self.name}: connection closed waiting for {name}")

    async def close(self) -> None:
        await self.qmp.disconnect()


async def main(opts) -> int:
    log: list[str] = []
    src, dst = Side("src", log), Side("dst", log)
    await src.connect(opts.src_qmp)
    await dst.connect(opts.dst_qmp)
    try:
        for side in (src, dst):
            await side.run(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
        status = await dst.run("query-status")
        if status["status"] != "inmigrate":
            raise SystemExit(f"the destination is {status['status']}, not inmigrate")

        host, port = opts.nbd.rsplit(":", 1)
        await dst.run(
            "nbd-server-start",
            {"addr": {"type": "inet", "data": {"host": host, "port": port}}},
        )
        await dst.run(
            "nbd-server-add", {"device": opts.device, "writable": True}
        )

        await src.run(
            "drive-mirror",
            {
                "device": opts.device,
                "target": f"nbd://{host}:{port}/{opts.device}",
                "sync": "full",
                "mode": "existing",
                "format": "raw",
                "copy-mode": opts.copy_mode,
            },
        )
        await src.wait("BLOCK_JOB_READY", fail=("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))

        await src.run("migrate", {"uri": opts.migrate})
        await src.wait(
            "MIGRATION",
            lambda d: d["status"] == "completed",
            fail=("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
        )
        # The source is stopped for good: the mirror is in sync, end it without pivoting.
        await src.run("block-job-cancel", {"device": opts.device})
        done = await src.wait("BLOCK_JOB_COMPLETED", fail=("BLOCK_JOB_CANCELLED",))
        if "error" in done:
            raise SystemExit(f"src: the mirror failed: {done['error']}")

        await dst.wait("MIGRATION", lambda d: d["status"] == "completed")
        await dst.run("nbd-server-stop")
        if not opts.no_cont:
            await dst.run("cont")
            await dst.wait("RESUME")
    finally:
        if opts.transcript:
            with open(opts.transcript, "w") as f:
                f.write("\n".join(log) + "\n")
        await src.close()
        await dst.close()
    print("storage-migration-example: migrated", flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src_qmp")
    p.add_argument("dst_qmp")
    p.add_argument("--migrate", required=True, help="migrate's uri, e.g. tcp:HOST:PORT")
    p.add_argument("--nbd", required=True, help="the destination's NBD HOST:PORT")
    p.add_argument("--device", default="disk0")
    p.add_argument("--copy-mode", default="write-blocking",
                   choices=("write-blocking", "background"))
    p.add_argument("--no-cont", action="store_true")
    p.add_argument("--transcript")
    sys.exit(asyncio.run(main(p.parse_args())))
