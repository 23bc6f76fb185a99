"""`echo_server.py PORT`: echoes every connection's bytes until it ends,
on one event loop (the idle, verified and ping-pong connections of the
upgrade section and of tests/tests/upgrade_load.rs)."""

import asyncio
import socket
import sys


async def serve(r, w):
    try:
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except OSError:
        pass  # the client counts its resets
    finally:
        w.close()


async def main(port):
    srv = await asyncio.start_server(serve, "0.0.0.0", port, backlog=4096)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
