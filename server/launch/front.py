"""edgeserve's gateway in front of llama-server or SGLang: one plan for each process `edgeserve launch` runs.

Clients see the gateway on the public address (admission, metrics, fallbacks, the OpenAI error shapes, a
drain on stop); the backend listens on 127.0.0.1 only, on its own port. The embedded backend is the gateway
already (its engine runs in the gateway's process), so it has no front. The API key, when there is one, is
the gateway's: the backend cannot be reached from outside.
"""

from __future__ import annotations

from server.launch.plan import LaunchPlan, Reason
from server.launch.registry import get_backend
from server.launch.resolve import health_url

GATEWAY = "gateway"
LOOPBACK = "127.0.0.1"
# Where each backend listens behind the gateway unless --backend-port says otherwise.
BACKEND_PORTS = {"llama-server": 8080, "sglang": 30000}
# A stop waits for the gateway's drain: its grace period, then this margin for the last bytes and exit.
STOP_MARGIN_S = 15.0


def needs_front(plan: LaunchPlan) -> bool:
    return plan.backend in BACKEND_PORTS


def behind_front(plan: LaunchPlan, backend_port: int | None = None) -> LaunchPlan:
    """The backend's plan moved to 127.0.0.1:<its port>, without an API key (the gateway checks it)."""
    spec = get_backend(plan.backend)
    port = backend_port or BACKEND_PORTS[plan.backend]
    moved = plan.model_copy(update={"host": LOOPBACK, "port": port, "api_key": None,
                                    "health_url": health_url(LOOPBACK, port, spec.health_path)})
    return spec.finish(moved)


def gateway_plan(backend: LaunchPlan, *, program: tuple[str, ...], host: str, port: int,
                 api_key: str | None) -> LaunchPlan:
    """`edgeserve serve --backend openai` on host:port in front of `backend` (already behind_front)."""
    upstream = f"http://{LOOPBACK}:{backend.port}"
    argv = [*program, "serve", "--backend", "openai", "--upstream-url", upstream, "--host", host,
            "--port", str(port), "--n-parallel", str(backend.n_parallel), "--n-ctx", str(backend.n_ctx),
            "--shutdown-grace-s", f"{backend.shutdown_grace_s:g}"]
    if api_key:
        argv += ["--api-key", api_key]
    why = (f"clients reach {backend.backend} through edgeserve's gateway on {host}:{port} (admission, "
           f"metrics, drain on stop); {backend.backend} listens on {LOOPBACK}:{backend.port} only")
    return backend.model_copy(update={
        "backend": GATEWAY, "program": (*program, "serve"), "argv": tuple(argv), "env": {}, "host": host,
        "port": port, "api_key": api_key, "health_url": health_url(host if host != "0.0.0.0" else LOOPBACK,
                                                                   port, "/ready"),
        "ladder": (), "reasons": (Reason(setting="gateway", value=True, source="default", why=why),),
    })


def stop_timeout_s(plan: LaunchPlan) -> float:
    """How long a stop may take before SIGKILL: an edgeserve gateway drains first."""
    if plan.backend in BACKEND_PORTS:
        return STOP_MARGIN_S
    return plan.shutdown_grace_s + STOP_MARGIN_S
