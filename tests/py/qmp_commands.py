"""Runs every QMP command of the foundation through the reference client, qemu.qmp.

Usage: qmp_commands.py SOCKET MODE [DRIVE_SPEC_JSON]
MODE is "daemon" (no guest) or "vm" (vmm-proc running). DRIVE_SPEC_JSON lists the
drives the command line gave, as [{"id", "file", "format", "virtual-size", "ro"}], so
query-block can be checked against what qemu-img made.

Every check raises on failure; the last line printed is "OK" on success.
"""

import asyncio
import json
import os
import sys

from qemu.qmp import ExecuteError, QMPClient

EXPECTED_COMMANDS = {
    "qmp_capabilities", "query-version", "query-commands", "query-name",
    "query-status", "stop", "cont", "system_reset", "quit", "query-block", "query-blockstats",
    "query-cpus-fast", "query-named-block-nodes", "blockdev-add", "blockdev-del", "block_resize",
    "nbd-server-start", "nbd-server-add", "nbd-server-remove", "nbd-server-stop",
    "block-export-add", "block-export-del", "query-block-exports",
    "drive-mirror", "blockdev-mirror", "block-job-change", "query-block-jobs", "query-jobs", "block-job-set-speed", "block-job-cancel",
    "block-job-pause", "block-job-resume", "block-job-complete", "block-job-finalize",
    "block-job-dismiss", "job-pause", "job-resume", "job-cancel", "job-complete",
    "job-finalize", "job-dismiss", "block-stream", "block_stream", "block-commit",
    "blockdev-snapshot-sync", "blockdev-snapshot",
    "getfd", "closefd", "migrate", "migrate_cancel", "migrate-incoming", "query-migrate", "migrate-set-parameters",
    "query-migrate-parameters", "migrate_set_speed", "migrate_set_downtime",
    "migrate-set-capabilities", "query-migrate-capabilities",
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def next_event(qmp, name, timeout=10):
    async def wait():
        async for ev in qmp.events:
            if ev["event"] == name:
                return ev
    return await asyncio.wait_for(wait(), timeout)


async def main(sock, mode, drives):
    qmp = QMPClient("splitvmm-test")
    await qmp.connect(sock)  # greeting and qmp_capabilities, done by the library
    greeting = qmp.greeting.QMP
    check(greeting.version["qemu"] == {"major": 9, "minor": 2, "micro": 0},
          f"greeting version {greeting.version}")
    check(list(greeting.capabilities) == [], f"greeting capabilities {greeting.capabilities}")

    ver = await qmp.execute("query-version")
    check(ver["qemu"] == {"major": 9, "minor": 2, "micro": 0}, f"query-version {ver}")
    check(ver["package"].startswith("splitvmm "), f"package {ver}")

    cmds = {c["name"] for c in await qmp.execute("query-commands")}
    check(cmds == EXPECTED_COMMANDS, f"query-commands {sorted(cmds)}")

    name = await qmp.execute("query-name")
    check(name == {"name": "testvm"}, f"query-name {name}")

    status = await qmp.execute("query-status")
    check(status == {"running": True, "status": "running"}, f"query-status {status}")

    await qmp.execute("stop")
    ev = await next_event(qmp, "STOP")
    check("data" not in ev and ev["timestamp"]["seconds"] > 0, f"STOP {ev}")
    status = await qmp.execute("query-status")
    check(status == {"running": False, "status": "paused"}, f"after stop {status}")
    await qmp.execute("stop")  # already stopped: succeeds

    await qmp.execute("cont")
    ev = await next_event(qmp, "RESUME")
    check("data" not in ev, f"RESUME {ev}")
    status = await qmp.execute("query-status")
    check(status == {"running": True, "status": "running"}, f"after cont {status}")

    blocks = await qmp.execute("query-block")
    check(len(blocks) == len(drives), f"query-block lists {len(blocks)} devices, want {len(drives)}")
    for info, want in zip(blocks, drives):
        check(info["device"] == want["id"], f"device {info}")
        check(info["type"] == "unknown" and info["removable"] is False and info["locked"] is False,
              f"BlockInfo fields {info}")
        ins = info["inserted"]
        check(ins["file"] == want["file"] and ins["drv"] == want["format"] and ins["ro"] == want["ro"],
              f"inserted {ins}")
        check(ins["image"]["virtual-size"] == want["virtual-size"], f"virtual-size {ins['image']}")
        check(ins["image"]["format"] == want["format"], f"image format {ins['image']}")
        for key in ("backing_file_depth", "encrypted", "detect_zeroes", "bps", "bps_rd", "bps_wr",
                    "iops", "iops_rd", "iops_wr", "cache", "write_threshold"):
            check(key in ins, f"BlockDeviceInfo lacks {key}: {ins}")
        check(("io-status" in info) == (mode == "vm"), f"io-status presence in {mode} mode: {info}")

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("unknown command succeeded")
    except ExecuteError as e:
        check(e.error_class == "CommandNotFound", f"class {e.error_class}")
        check(str(e) == "The command no-such-command has not been found", str(e))

    # getfd the way qemu.qmp passes a descriptor (a space carrying it, then the command).
    r, w = os.pipe()
    qmp.send_fd_scm(r)
    os.close(r)
    os.close(w)
    check(await qmp.execute("getfd", {"fdname": "pyfd"}) == {}, "getfd")
    check(await qmp.execute("closefd", {"fdname": "pyfd"}) == {}, "closefd")
    try:
        await qmp.execute("closefd", {"fdname": "pyfd"})
        raise AssertionError("closefd of a closed name succeeded")
    except ExecuteError as e:
        check(str(e) == "File descriptor named 'pyfd' not found", str(e))

    await qmp.execute("quit")
    ev = await next_event(qmp, "SHUTDOWN")
    check(ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, f"SHUTDOWN {ev}")
    # After quit the server closes the connection, as QEMU does when it exits. If
    # qemu.qmp's reader meets that end before disconnect() runs, disconnect() reports it
    # as EOFError, which is the expected outcome here, not a failure.
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    print("OK")


if __name__ == "__main__":
    drives = json.loads(sys.argv[3]) if len(sys.argv) > 3 else []
    asyncio.run(main(sys.argv[1], sys.argv[2], drives))
