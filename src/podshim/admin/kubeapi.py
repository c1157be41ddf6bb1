"""The one Kubernetes API call of the node installer: set or remove a label of a node,
with the pod's service account (in-cluster: ``KUBERNETES_SERVICE_HOST``/``PORT``, the
token and CA mounted at :data:`SERVICE_ACCOUNT`). Needs RBAC ``patch`` on ``nodes``
(``deploy/podshim-installer.yaml``). Standard library only.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from podshim.admin.errors import AdminError

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT = 30.0


@dataclass(frozen=True)
class Api:
    """Where the API server is and how to authenticate to it."""

    base_url: str
    token: str
    context: ssl.SSLContext | None

    @classmethod
    def in_cluster(cls, account_dir: str = SERVICE_ACCOUNT) -> Api:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise AdminError(
                "--label-node: not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST)"
            )
        try:
            with open(os.path.join(account_dir, "token")) as f:
                token = f.read().strip()
        except OSError as exc:
            raise AdminError(f"--label-node: no service account token: {exc}") from None
        context = ssl.create_default_context(cafile=os.path.join(account_dir, "ca.crt"))
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token, context)


def label_node(name: str, key: str, value: str | None, api: Api | None = None) -> None:
    """Set ``key=value`` on node ``name`` (``value`` None: remove the label) with a JSON
    merge patch."""
    label_node_with(name, {key: value}, api)


def label_node_with(name: str, labels: dict[str, str | None], api: Api | None = None) -> None:
    """Set (``None``: remove) several labels of node ``name`` in one JSON merge patch."""
    api = api or Api.in_cluster()
    body = json.dumps({"metadata": {"labels": labels}}).encode()
    req = urllib.request.Request(
        f"{api.base_url}/api/v1/nodes/{urllib.parse.quote(name, safe='')}",
        data=body,
        method="PATCH",
        headers={
            "Authorization": f"Bearer {api.token}",
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=api.context) as res:
            res.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise AdminError(f"labelling node {name}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"labelling node {name}: {exc}") from None
