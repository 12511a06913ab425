"""``python -m pxfs.client.mount_main --ready-fd FD CONFIG``: the mount daemon as ``spawn`` starts it.

It forks once more before anything else (it is single-threaded here) and the first process exits,
so the daemon is nobody's child: the process that asked for the mount (the CLI, the CSI driver) may
exit or be killed and need not reap it.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "--ready-fd" or not argv[1].isdigit():
        sys.stderr.write("usage: python -m pxfs.client.mount_main --ready-fd FD CONFIG_JSON\n")
        return 2
    w = int(argv[1])
    if os.fork() > 0:
        os.close(w)
        return 0
    from pxfs.client.mounts import config_from, serve_detached

    return serve_detached(config_from(json.loads(argv[2])), w)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
