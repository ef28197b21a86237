"""A TVM RPC server that outlives the candidates it runs: the device side of autotune/rpc.py.

TVM 0.27's own server (`python -m tvm.exec.rpc_server`) serves each session in a forked process, and when that
process dies of a signal (a candidate kernel that segfaults) its listening thread raises and stops serving: the
device drops off the tracker for good. This server is TVM's, with that one step replaced: a session that dies
is logged and the server goes on listening. It needs TVM (the runtime is enough) and nothing of Kiln, so the
file can be copied to a board as is:

    python3 rpc_server.py --tracker 192.168.1.10:9190 --key rpi5 [--threads 4] [--port 9090]

`--threads` sets TVM_NUM_THREADS for the kernels it runs (the target's cores); by default TVM's (half the CPUs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("kiln.rpc_server")


def serve(
    tracker: tuple[str, int],
    key: str,
    host: str = "127.0.0.1",
    port: int = 9090,
    port_end: int = 9199,
    load_library: str | None = None,
) -> None:
    """Register with the tracker under `key` and serve sessions until killed."""
    from tvm.rpc import server

    original = server._serving

    def serving(sock, addr, opts, libraries):
        cwd = os.getcwd()
        try:
            original(sock, addr, opts, libraries)
        except RuntimeError as err:  # "Child process N exited unsuccessfully with error code -11"
            log.warning("session from %s died: %s; serving on", addr, err)
            os.chdir(cwd)  # TVM returns to its folder only when the session ends well
            sock.close()

    server._serving = serving  # (looked up by the listening loop at each session)
    state = server.PopenRPCServerState(host, port, port_end, False, tracker, key, load_library, None, False)
    print(f"kiln rpc server: {key} on {host}:{state.port}, tracker {tracker[0]}:{tracker[1]}", flush=True)
    state.thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    parser.add_argument("--key", required=True, help="the device kind the tuner asks the tracker for")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int, default=9199)
    parser.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS for the kernels")
    parser.add_argument("--load-library", default=None, help="colon-separated libraries to load in sessions")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts, in a session
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    host, port = args.tracker.rsplit(":", 1)
    serve(
        (host, int(port)),
        args.key,
        args.host,
        args.port,
        max(args.port_end, args.port + 1),
        args.load_library,
    )


if __name__ == "__main__":
    main()
