"""Start ``mlflow server`` on PostgreSQL with the database password read from a file.

    python docker/mlflow_server.py --host=0.0.0.0 --port=5000 [other mlflow server flags]

Why a wrapper: a password in ``--backend-store-uri`` sits on the server's command line, which
every process of the container (``ps``) and ``docker inspect`` / ``kubectl get pod -o yaml`` can
read. This script reads the password from the file in ``MLFLOW_DB_PASSWORD_FILE`` (a Docker or
Kubernetes secret), builds the URI and hands it to ``mlflow server`` through the environment
variable ``MLFLOW_BACKEND_STORE_URI``, which ``mlflow server --backend-store-uri`` reads (its
click ``envvar``); the arguments are passed on unchanged. The other parts of the URI come from
``MLFLOW_DB_USER``, ``MLFLOW_DB_HOST`` (host or host:port) and ``MLFLOW_DB_NAME``.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote

DEFAULTS = {"MLFLOW_DB_USER": "mlflow", "MLFLOW_DB_HOST": "postgres:5432", "MLFLOW_DB_NAME": "mlflow"}


def backend_store_uri(env: dict[str, str]) -> str:
    """The PostgreSQL URI, every part percent-encoded (a password may hold ``@``, ``/`` or ``:``)."""
    path = env.get("MLFLOW_DB_PASSWORD_FILE")
    if not path:
        raise SystemExit("MLFLOW_DB_PASSWORD_FILE is not set: point it at the file holding the database password")
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().strip()
    except OSError as e:
        raise SystemExit(f"cannot read the database password from {path}: {e.strerror}") from None
    if not password:
        raise SystemExit(f"{path} is empty: it should hold the database password")
    user, host, name = (env.get(k) or DEFAULTS[k] for k in ("MLFLOW_DB_USER", "MLFLOW_DB_HOST", "MLFLOW_DB_NAME"))
    return f"postgresql+psycopg://{quote(user, safe='')}:{quote(password, safe='')}@{host}/{quote(name, safe='')}"


def main(argv: list[str]) -> None:
    if any(a == "--backend-store-uri" or a.startswith("--backend-store-uri=") for a in argv):
        raise SystemExit("pass no --backend-store-uri: it is built from MLFLOW_DB_PASSWORD_FILE")
    env = dict(os.environ)
    env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri(env)
    # exec: mlflow becomes the container's main process and receives its stop signal directly.
    os.execvpe("mlflow", ["mlflow", "server", *argv], env)


if __name__ == "__main__":
    main(sys.argv[1:])
