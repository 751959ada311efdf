"""`codestore dev-server`: the click command. Heavy imports wait until it runs."""

from __future__ import annotations

import click


@click.command("dev-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Repositories, hooks, certificates. [default: user data dir]")
@click.option("--org", help="Org name tokens must carry as `iss`. [default: configured org, else dev]")
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    metavar="FILE[:KID]",
    help="PEM public (or private) key whose tokens are accepted; repeatable. [default: the configured key]",
)
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="JSON request log. [default: DATA/requests.log]")
@click.option("--tls", is_flag=True, help="Serve HTTPS with a locally generated certificate.")
@click.option(
    "--max-connections",
    type=click.IntRange(1, 100_000),
    help="Connections served at once; past it a client is answered 503. [default: what the open-files limit allows, at most 1024]",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(0.1, 86_400),
    default=60.0,
    show_default=True,
    help="Seconds a connection may take to send a request's head (idle keep-alive time included).",
)
def dev_server(
    host: str, port: int, data_dir: str | None, org: str | None, trust_keys: tuple[str, ...], log_path: str | None, tls: bool,
    max_connections: int | None, idle_timeout: float,
) -> None:
    """Run a local Code Storage-compatible server (git smart HTTP + REST)."""
    from ..devserver.run import serve

    serve(host=host, port=port, data_dir=data_dir, org=org, trust_keys=trust_keys, log_path=log_path, tls=tls,
          max_connections=max_connections, idle_timeout=idle_timeout)
