"""A minimal nginx for the benchmark: plain proxy_pass and auth_request, one worker.

The shipped deployment files carry more (TLS, forwarded headers, error
pages); these servers keep only what decides the cost of a request, so the
rows measure nginx's own work and the gateway's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from bench.processes import Server, free_port, start_server

MAIN_TEMPLATE = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}

{servers}
}}
"""

# nginx in front of the API, no authentication: the practical limit of any proxy.
PROXY_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

# nginx asks `auth_url` about each request, then proxies it to the API with
# the user id that the answer carried.
AUTH_REQUEST_SERVER = """\
    upstream {name}_auth {{
        server 127.0.0.1:{auth_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};
        location = /_bench_auth {{
            internal;
            proxy_pass http://{name}_auth{auth_path};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
        location / {{
            auth_request /_bench_auth;
            auth_request_set $authenticated_user $upstream_http_x_authenticated_user;
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-KEY "";
            proxy_set_header X-Authenticated-User $authenticated_user;
        }}
    }}
"""


@dataclasses.dataclass(frozen=True)
class AuthTarget:
    """A server that answers nginx's auth subrequests: `name` is a word, `path` starts with '/'."""

    name: str
    port: int
    path: str


def start_nginx(prefix: Path, upstream_port: int, auth_targets: list[AuthTarget]) -> tuple[Server, dict[str, int]]:
    """Start nginx with a proxy server and one auth_request server per target.

    Returns the server and the port of each row: `proxy` and each target's name.
    Raises RuntimeError when nginx is not installed or does not start.
    """
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        raise RuntimeError("nginx is not installed: run `apt-get install nginx`.")

    ports = {"proxy": free_port()}
    servers = [PROXY_SERVER.format(port=ports["proxy"])]
    for target in auth_targets:
        ports[target.name] = free_port()
        servers.append(
            AUTH_REQUEST_SERVER.format(
                name=target.name, port=ports[target.name], auth_port=target.port, auth_path=target.path
            )
        )

    prefix.mkdir(parents=True, exist_ok=True)
    config_path = prefix / "nginx.conf"
    config_path.write_text(MAIN_TEMPLATE.format(prefix=prefix, upstream_port=upstream_port, servers="\n".join(servers)))
    server = start_server("nginx", [binary, "-p", str(prefix), "-c", str(config_path)], ports["proxy"], prefix)
    return server, ports
